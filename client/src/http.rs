//! The router's HTTPS JSON API from the client side: a small HTTP/1.1 client on hyper and
//! tokio-rustls, trusting only the configured CA.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cim_core::tls;
use cim_proto::v1::chat_message::Target;
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio_rustls::TlsConnector;
use tokio_util::task::AbortOnDropHandle;

use crate::{ClientConfig, ClientError};

/// Largest response body read from the router.
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// A user in the online list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct OnlineUser {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
}

/// A page of online users, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct OnlinePage {
    /// The users, by name.
    pub users: Vec<OnlineUser>,
    /// More follow the last one: ask again with `after` set to its name.
    #[serde(default)]
    pub more: bool,
}

/// A user found by name (more may come).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct NamedUser {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
    /// Whether the user was online when asked.
    pub online: bool,
    /// When an offline user was last seen (ms since the Unix epoch): the latest of its logins
    /// and its sessions' ends the router recorded, if any.
    #[serde(default)]
    pub last_seen_ms: Option<u64>,
    /// The line the user set about itself ([`crate::Client::set_status`]), if any.
    #[serde(default)]
    pub status: Option<String>,
}

#[derive(Deserialize)]
struct StatusReply {
    #[serde(default)]
    status: Option<String>,
}

/// A user on our block list.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockedUser {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
}

/// The router's answer to a block.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockReply {
    /// The blocked user's id.
    pub id: u64,
    /// Its name.
    pub name: String,
    /// It was blocked before.
    pub already_blocked: bool,
}

/// The user's settings, as the router keeps them (more may come).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct Settings {
    /// Whether we hide when we were last seen (and so see no one else's).
    pub hide_last_seen: bool,
    /// Whether we give no read receipts (and so are given none). False from a router older
    /// than read receipts.
    #[serde(default)]
    pub hide_read_receipts: bool,
}

/// A reader's receipt for our private messages, as the router keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ReadReceipt {
    /// Who read.
    #[serde(rename = "id")]
    pub user_id: u64,
    /// Its name.
    pub name: String,
    /// The latest of our messages it read.
    pub up_to_msg_id: u64,
    /// When, ms since the Unix epoch.
    pub read_at_ms: u64,
}

#[derive(Deserialize)]
struct ReceiptList {
    receipts: Vec<ReadReceipt>,
}

/// The router's answer to a report.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[non_exhaustive]
pub struct ReportReply {
    /// The reported user's name.
    pub name: String,
    /// We reported them in the last 24 hours already: this report was not kept (false from
    /// an older router, which keeps every one).
    #[serde(default)]
    pub already_reported: bool,
}

#[derive(Deserialize)]
struct BlockList {
    blocked: Vec<BlockedUser>,
}

#[derive(Deserialize)]
struct Unblocked {
    was_blocked: bool,
}

#[derive(Deserialize)]
struct ErrorBody {
    code: String,
    message: String,
    /// With `session_ended`: `replaced` when another login of the user replaced this one.
    #[serde(default)]
    ended: Option<String>,
}

#[derive(Serialize)]
struct Credentials<'a> {
    name: &'a str,
    password: &'a str,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    takeover: bool,
}

#[derive(Deserialize)]
struct Registered {
    user_id: u64,
}

/// The router's answer to a login.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Grant {
    pub(crate) user_id: u64,
    pub(crate) name: String,
    pub(crate) token: String,
    pub(crate) server_id: String,
    pub(crate) server_addr: SocketAddr,
}

impl Grant {
    pub(crate) fn session_info(&self) -> crate::SessionInfo {
        crate::SessionInfo {
            user_id: self.user_id,
            name: self.name.clone(),
            server_id: self.server_id.clone(),
            server_addr: self.server_addr,
        }
    }
}

/// Client of the router's HTTPS API.
#[derive(Clone)]
pub struct RouterApi {
    authority: String,
    host: String,
    port: u16,
    tls: TlsConnector,
    timeout: Duration,
}

impl RouterApi {
    /// A client for the router named in `config`.
    pub fn new(config: &ClientConfig) -> Result<Self, ClientError> {
        let uri: Uri = config
            .router_url
            .parse()
            .map_err(|e| ClientError::Config(format!("router url: {e}")))?;
        if uri.scheme_str() != Some("https") {
            return Err(ClientError::Config(
                "router url must start with https://".into(),
            ));
        }
        let host = uri
            .host()
            .ok_or_else(|| ClientError::Config("router url has no host".into()))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(443);
        let roots =
            tls::roots_from_pem(&config.ca_pem).map_err(|e| ClientError::Config(e.to_string()))?;
        let mut tls = tls::client_config(roots, &[b"http/1.1"], None)
            .map_err(|e| ClientError::Config(e.to_string()))?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            authority: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
            host,
            port,
            tls: TlsConnector::from(Arc::new(tls)),
            timeout: config.http_timeout,
        })
    }

    /// Creates an account; returns its id.
    pub async fn register(&self, name: &str, password: &str) -> Result<u64, ClientError> {
        let body = Credentials {
            name,
            password,
            takeover: false,
        };
        let reply: Registered = self
            .call(Method::POST, "/api/register", Some(&body), None)
            .await?;
        Ok(reply.user_id)
    }

    pub(crate) async fn login(
        &self,
        name: &str,
        password: &str,
        takeover: bool,
    ) -> Result<Grant, ClientError> {
        let body = Credentials {
            name,
            password,
            takeover,
        };
        self.call(Method::POST, "/api/login", Some(&body), None)
            .await
    }

    /// Logs the session `token` belongs to in again, on a server the router picks, without
    /// the password. Refused with `unauthorized` (expired or forged token) or
    /// `session_ended` (logged out, or re-logged in already) or `logged_in_elsewhere` (replaced
    /// by another login).
    pub(crate) async fn relogin(&self, token: &str) -> Result<Grant, ClientError> {
        self.call::<(), _>(Method::POST, "/api/relogin", None, Some(token))
            .await
    }

    /// Ends the session `token` belongs to.
    pub async fn logout(&self, token: &str) -> Result<(), ClientError> {
        let _: serde_json::Value = self
            .call::<(), _>(Method::POST, "/api/logout", None, Some(token))
            .await?;
        Ok(())
    }

    /// Online users whose name starts with `prefix`: the first page (at most 1,000).
    pub async fn online_users(
        &self,
        token: &str,
        prefix: &str,
    ) -> Result<Vec<OnlineUser>, ClientError> {
        Ok(self.online_page(token, prefix, "", None).await?.users)
    }

    /// A page of the online users whose name starts with `prefix` and comes after `after`:
    /// at most `limit` (1 to 1,000; the router's cap when `None`).
    pub async fn online_page(
        &self,
        token: &str,
        prefix: &str,
        after: &str,
        limit: Option<usize>,
    ) -> Result<OnlinePage, ClientError> {
        let mut path = format!(
            "/api/users/online?prefix={}&after={}",
            query_encoded(prefix),
            query_encoded(after)
        );
        if let Some(limit) = limit {
            path.push_str(&format!("&limit={limit}"));
        }
        self.call::<(), _>(Method::GET, &path, None, Some(token))
            .await
    }

    /// Changes the password of the login `token` belongs to.
    pub async fn change_password(
        &self,
        token: &str,
        old: &str,
        new: &str,
    ) -> Result<(), ClientError> {
        let body = serde_json::json!({ "old_password": old, "new_password": new });
        let _: serde_json::Value = self
            .call(Method::POST, "/api/password", Some(&body), Some(token))
            .await?;
        Ok(())
    }

    /// Deletes the account of the login `token` belongs to, given its password.
    pub async fn delete_account(&self, token: &str, password: &str) -> Result<(), ClientError> {
        let body = serde_json::json!({ "password": password });
        let _: serde_json::Value = self
            .call(
                Method::POST,
                "/api/account/delete",
                Some(&body),
                Some(token),
            )
            .await?;
        Ok(())
    }

    /// The user named `name` (in any case), or `None` if there is none.
    pub async fn user_named(
        &self,
        token: &str,
        name: &str,
    ) -> Result<Option<NamedUser>, ClientError> {
        // No account has a name outside the rule, and only a name within it is safe in a path.
        if !cim_core::names::is_valid_name(name) {
            return Ok(None);
        }
        let path = format!("/api/users/named/{name}");
        match self
            .call::<(), _>(Method::GET, &path, None, Some(token))
            .await
        {
            Ok(user) => Ok(Some(user)),
            Err(e) if e.code() == Some(cim_proto::UNKNOWN_USER) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Blocks `user` for the login `token` belongs to: its private messages and group
    /// invitations to us are refused from now on.
    pub async fn block(&self, token: &str, user: u64) -> Result<BlockReply, ClientError> {
        let body = serde_json::json!({ "user_id": user });
        self.call(Method::POST, "/api/blocks", Some(&body), Some(token))
            .await
    }

    /// Unblocks `user`; returns whether it was blocked.
    pub async fn unblock(&self, token: &str, user: u64) -> Result<bool, ClientError> {
        let path = format!("/api/blocks/{user}");
        let reply: Unblocked = self
            .call::<(), _>(Method::DELETE, &path, None, Some(token))
            .await?;
        Ok(reply.was_blocked)
    }

    /// Our settings.
    pub async fn settings(&self, token: &str) -> Result<Settings, ClientError> {
        self.call::<(), _>(Method::GET, "/api/settings", None, Some(token))
            .await
    }

    /// Hides (or shows again) when we were last seen; returns the settings after it.
    pub async fn hide_last_seen(&self, token: &str, hidden: bool) -> Result<Settings, ClientError> {
        self.hide(token, "hide_last_seen", hidden).await
    }

    /// Gives no read receipts, and is given none (or gives them again); returns the settings
    /// after it. An older router refuses the unknown setting (`bad_json`).
    pub async fn hide_read_receipts(
        &self,
        token: &str,
        hidden: bool,
    ) -> Result<Settings, ClientError> {
        self.hide(token, "hide_read_receipts", hidden).await
    }

    /// Changes one setting, `hide_...`, to `hidden`; returns the settings after it.
    async fn hide(
        &self,
        token: &str,
        setting: &str,
        hidden: bool,
    ) -> Result<Settings, ClientError> {
        let body = serde_json::json!({ setting: hidden });
        self.call(Method::POST, "/api/settings", Some(&body), Some(token))
            .await
    }

    /// Sets our status (empty: clears it); returns the status kept.
    pub async fn set_status(
        &self,
        token: &str,
        status: &str,
    ) -> Result<Option<String>, ClientError> {
        let body = serde_json::json!({ "status": status });
        let reply: StatusReply = self
            .call(Method::POST, "/api/status", Some(&body), Some(token))
            .await?;
        Ok(reply.status)
    }

    /// Takes back our message `msg_id` to `target`.
    pub async fn unsend(
        &self,
        token: &str,
        target: &Target,
        msg_id: u64,
    ) -> Result<(), ClientError> {
        let body = match target {
            Target::ToUser(user) => serde_json::json!({ "user_id": user, "msg_id": msg_id }),
            Target::Group(group) => serde_json::json!({ "group": group, "msg_id": msg_id }),
        };
        let _: serde_json::Value = self
            .call(Method::POST, "/api/unsend", Some(&body), Some(token))
            .await?;
        Ok(())
    }

    /// Tells `user` we read its private messages up to `msg_id`.
    pub async fn mark_read(&self, token: &str, user: u64, msg_id: u64) -> Result<(), ClientError> {
        let body = serde_json::json!({ "user_id": user, "msg_id": msg_id });
        let _: serde_json::Value = self
            .call(Method::POST, "/api/receipts", Some(&body), Some(token))
            .await?;
        Ok(())
    }

    /// Who read our private messages, how far, the latest first.
    pub async fn read_receipts(&self, token: &str) -> Result<Vec<ReadReceipt>, ClientError> {
        let list: ReceiptList = self
            .call::<(), _>(Method::GET, "/api/receipts", None, Some(token))
            .await?;
        Ok(list.receipts)
    }

    /// Reports `user` to the operators, with `reason` (at most 500 bytes, may be empty).
    pub async fn report(
        &self,
        token: &str,
        user: u64,
        reason: &str,
    ) -> Result<ReportReply, ClientError> {
        let body = serde_json::json!({ "user_id": user, "reason": reason });
        self.call(Method::POST, "/api/reports", Some(&body), Some(token))
            .await
    }

    /// The users we block, by id.
    pub async fn blocked_users(&self, token: &str) -> Result<Vec<BlockedUser>, ClientError> {
        let list: BlockList = self
            .call::<(), _>(Method::GET, "/api/blocks", None, Some(token))
            .await?;
        Ok(list.blocked)
    }

    /// Sends one request and parses a JSON reply; error replies become [`ClientError::Api`].
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
        bearer: Option<&str>,
    ) -> Result<R, ClientError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| ClientError::Config(e.to_string()))?,
            None => Vec::new(),
        };
        let (status, bytes) = self.raw(method, path, Bytes::from(body), bearer).await?;
        if !status.is_success() {
            let err: ErrorBody = serde_json::from_slice(&bytes).map_err(|_| ClientError::Api {
                status: status.as_u16(),
                code: "unknown".into(),
                message: String::from_utf8_lossy(&bytes).into_owned(),
            })?;
            // A login another one replaced comes as `session_ended` (what older clients know,
            // and take as a cue for their password); told apart here by its `ended` field.
            let code = match err.ended.as_deref() {
                Some("replaced") if err.code == "session_ended" => "logged_in_elsewhere".into(),
                _ => err.code,
            };
            return Err(ClientError::Api {
                status: status.as_u16(),
                code,
                message: err.message,
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Http(format!("bad reply: {e}")))
    }

    /// Sends one request with a raw body; returns the status and body bytes. Fails after the
    /// configured `http_timeout` ([`HTTP_TIMEOUT`] by default): a router that stalls (paused, or cut off after the request went out,
    /// with no TCP keep-alive to notice) must not hold up a login or a reconnect for good.
    pub async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        bearer: Option<&str>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let limit = self.timeout;
        tokio::time::timeout(limit, self.exchange(method, path, body, bearer))
            .await
            .map_err(|_| ClientError::Http(format!("no answer within {limit:?}")))?
    }

    /// [`RouterApi::raw`] without its time limit.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Bytes,
        bearer: Option<&str>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let http_err = |e: &dyn std::fmt::Display| ClientError::Http(e.to_string());
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| http_err(&e))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(self.host.clone()).map_err(|e| http_err(&e))?;
        let stream = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| http_err(&e))?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| http_err(&e))?;
        // Given up (timed out), the exchange takes its connection with it; once answered,
        // the connection closes by itself (its sender is dropped) as it always did.
        let driver = AbortOnDropHandle::new(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.authority)
            .header(http::header::CONTENT_TYPE, "application/json");
        if let Some(token) = bearer {
            request = request.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let request = request.body(Full::new(body)).map_err(|e| http_err(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| http_err(&e))?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        driver.detach();
        Ok((status, bytes))
    }
}

/// Default longest time a call to the router's HTTPS API may take, connection included.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(30);

/// `value` percent-encoded for a query string (unreserved characters kept).
fn query_encoded(value: &str) -> String {
    value
        .bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}
