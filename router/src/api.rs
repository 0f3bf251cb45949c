//! The router's HTTPS JSON API (warp filters). With `admin.rs` and `https.rs`, the only router
//! modules that know HTTP; it converts between JSON bodies and the service's domain types.
//!
//! | method | path | auth | body / query | reply |
//! |---|---|---|---|---|
//! | POST | /api/register | - | `{name, password}` | 201 `{user_id, name}`; 429 `rate_limited` past the per-address limit |
//! | POST | /api/login | - | `{name, password, takeover?}` | 200 `{user_id, name, token, server_id, server_addr, expires_at_ms}` |
//! | POST | /api/relogin | bearer (a session token) | - | 200 as login; 401 `unauthorized` or `session_ended` when only the password will do; 409 `session_live` (the login is still connected to a live server); 429, 503 `no_server` as for login |
//! | POST | /api/logout | bearer | - | 200 `{}` |
//! | POST | /api/password | bearer | `{old_password, new_password}` | 200 `{}`: the password is changed (or was: the same change asked again is answered so), the caller's login stays; 403 `wrong_password`; 409 `password_changed` (another change came first); 429 `too_many_attempts` (5 tries a minute per user, and the address's login attempts); 400 for a new password outside 4-256 bytes or equal to the old |
//! | POST | /api/account/delete | bearer | `{password}` | 200 `{}`: the account is deleted (its session kicked, its groups left, its inbox, blocks, last seen, status, settings and read receipts gone; its name free again); 403 `wrong_password`; 429 `too_many_attempts` (tries counted with password changes) |
//! | GET | /api/users/online | bearer | `?prefix=&after=&limit=` | 200 `{users: [{id, name}], more}` (a page by name, at most 1,000) |
//! | GET | /api/users/named/NAME | bearer | - | 200 `{id, name, online, last_seen_ms?, status?}` (the status the user set, unless it blocks the caller; for an offline user, the latest of its logins and its sessions' ends, if recorded and neither it nor the caller hides last seen; a user who blocks the caller shows offline and never seen); 404 `unknown_user` (a name is found in any case) |
//! | POST | /api/messages | bearer | `{to? , group?, body}` | 200 `{msg_id, msg_id_str, recipients}`, and `recipient_online` for a private message; 403 `blocked` (the recipient blocks the caller; nothing stored) |
//! | POST | /api/groups | bearer | `{name, invite_only?}` | 201 `{name}` |
//! | POST | /api/groups/NAME/join, /leave | bearer | - | 200 `{}`; counts 10 against the limit below (told to the other online members of a group of at most 100; a leave declines a waiting invitation); 403 `invite_only` |
//! | POST | /api/groups/NAME/invitations | bearer (the owner) | `{user_id}` | 200 `{}`: invites the user (told to them if online; their join lets them in); 403 `not_owner`, `blocked`; 404 `unknown_group`, `unknown_user`; 409 `too_many_invitations`; counts 10 |
//! | POST | /api/groups/NAME/owner | bearer (the owner) | `{user_id}` | 200 `{}`: hands the group to that member (told if online), the caller staying a member; waiting invitations are void; 403 `not_owner`; 404 `unknown_group`, `no_such_member`, `unknown_user` (an account that is gone); counts 10 |
//! | DELETE | /api/groups/NAME/members/ID | bearer (the owner) | - | 200 `{}`: removes the member (told to them and to the group) or withdraws their invitation; removing yourself is leaving; 403 `not_owner`; 404 `unknown_group`, `no_such_member`; counts 10 |
//! | GET | /api/groups/NAME/members | bearer | - | 200 `{members: [{id, name, online, owner}]}` |
//! | GET | /api/groups | bearer | - | 200 `{groups: [...], invitations: [...]}` (the groups whose invitations wait for the caller) |
//! | POST | /api/blocks | bearer | `{user_id}` | 200 `{id, name, already_blocked}`: the user's private messages to the caller (`403 blocked` to them, and on their server's ack) and group invitations are refused from now on; 400 for yourself; 404 `unknown_user`; 409 `too_many_blocked` past 1,000; counts 10 |
//! | DELETE | /api/blocks/ID | bearer | - | 200 `{was_blocked}`; counts 10 |
//! | GET | /api/blocks | bearer | - | 200 `{blocked: [{id, name}]}` (by id) |
//! | GET, POST | /api/settings | bearer | POST: `{hide_last_seen?, hide_read_receipts?}` | 200 `{hide_last_seen, hide_read_receipts}`: the caller's settings (after the change); a user who hides its last seen (or read receipts) shows none to anyone and sees no one's |
//! | POST | /api/status | bearer | `{status}` | 200 `{status?}`: the caller's status, a line about itself that a lookup by name shows (its blanks between words made one space; at most 140 characters, none a control or invisible one; empty or absent clears it); 400 otherwise |
//! | POST | /api/unsend | bearer | `{user_id or group, msg_id}` (the id a number or a decimal string) | 200 `{msg_id, msg_id_str, recipients, recipient_online?}` as for a message (the unsend's own id; asked again, another unsend is stored, which clients act on once): takes back the caller's message `msg_id` to the user or group, sent at most 24 hours ago (an entry in each recipient's inbox, in the message's place where the store finds it still waiting, and after it; their clients drop the message); 400 for yourself, `all`, an id no message has yet, or not exactly one of `user_id` and `group`; 403 `too_late`, `blocked`, `not_member`; 404 `unknown_user`, `unknown_group`; 429 `rate_limited` past 60 a minute; 503 `retry` (it may be stored; asked again, another is) |
//! | POST | /api/receipts | bearer | `{user_id, msg_id}` (the id a number or a decimal string) | 200 `{}`: the caller read the user's private messages up to `msg_id`; kept for the user (the reader's latest) and told to them if online, unless either hides read receipts or the user blocks the caller (the answer is the same); 400 for yourself or an id no message has yet; 404 `unknown_user`; 429 `rate_limited` past 600 a minute |
//! | GET | /api/receipts | bearer | - | 200 `{receipts: [{id, name, up_to_msg_id, up_to_msg_id_str, read_at_ms}]}`: who read the caller's messages, how far, the latest first (at most 1,000 readers; on Redis the list expires a month after its latest receipt; none while the caller hides read receipts) |
//! | POST | /api/reports | bearer | `{user_id, reason?}` | 200 `{id, name, already_reported}`: the user is reported to the operators (the admin page lists the newest reports), unless the caller reported them in the last 24 hours (`already_reported`, nothing kept); 400 for yourself or a reason over 500 bytes; 404 `unknown_user`; 429 `rate_limited` past 10 a minute; counts 10 |
//! | GET | /health | - | - | 200 `{status, servers}` (liveness) |
//! | GET | /ready | - | - | 200 when the store answers, a server is linked and a message-id node is held, else 503 `not_ready` |
//! | GET | /metrics | - | - | Prometheus text exposition |
//! | GET | /admin, /admin/api/state | admin token | `?token=` | the admin page and its JSON |
//! | POST | /admin/api/users/ID/delete | admin token (`Authorization: Bearer` only) | - | 200 `{id, name}`: an operator deletes the account; 404 `unknown_user`; 401 without the token; 404 `not_found` with the admin page off |
//!
//! Every error is `{"code": "...", "message": "..."}` with a fitting status. Every bearer call
//! but logout counts (a re-login against its token's login) against its user's per-second
//! limit (`429 rate_limited` past it). Per-address limits count an IPv6 client under its /64.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use cim_core::now_ms;
use cim_core::token::Claims;
use cim_proto::v1::{ChatMessage, chat_message::Target};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use crate::https::PeerAddr;
use crate::service::{LoginGrant, MAX_ONLINE_PAGE, Sender, Sent, Service, ServiceError};
use crate::store::Privacy;
use cim_core::limit::address_key;

/// Largest request body accepted, in bytes.
pub const MAX_HTTP_BODY: u64 = 64 * 1024;
/// Largest body read (to refuse it cleanly) before the connection is simply cut: twice the
/// limit, so the bodies buffered before a request is authenticated stay small.
const MAX_DRAINED_BODY: u64 = 2 * MAX_HTTP_BODY;

/// An API error: a status and a JSON body with a stable code.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    /// With `session_ended`: why the login ended, when that tells the client what to do.
    ended: Option<&'static str>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            ended: None,
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let status = match &e {
            ServiceError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServiceError::NameTaken | ServiceError::AlreadyOnline | ServiceError::SessionLive => {
                StatusCode::CONFLICT
            }
            ServiceError::InvalidCredentials
            | ServiceError::Unauthorized(_)
            | ServiceError::SessionEnded(_)
            | ServiceError::LoggedInElsewhere => StatusCode::UNAUTHORIZED,
            ServiceError::UnknownUser | ServiceError::UnknownGroup => StatusCode::NOT_FOUND,
            ServiceError::GroupExists
            | ServiceError::PasswordChanged
            | ServiceError::ClientMsgIdReused(_)
            | ServiceError::GroupFull
            | ServiceError::TooManyGroups(_) => StatusCode::CONFLICT,
            ServiceError::NotMember
            | ServiceError::InviteOnly
            | ServiceError::NotOwner
            | ServiceError::WrongPassword => StatusCode::FORBIDDEN,
            ServiceError::NoSuchMember => StatusCode::NOT_FOUND,
            ServiceError::TooManyInvitations | ServiceError::TooManyBlocked(_) => {
                StatusCode::CONFLICT
            }
            ServiceError::Blocked | ServiceError::TooLate => StatusCode::FORBIDDEN,
            ServiceError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ServiceError::NoServer
            | ServiceError::Unavailable(_)
            | ServiceError::Retry(_)
            | ServiceError::Busy => StatusCode::SERVICE_UNAVAILABLE,
            ServiceError::TooManyAttempts | ServiceError::RateLimited(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ServiceError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        e.log_detail();
        let mut error = ApiError::new(status, e.code(), e.to_string());
        if matches!(e, ServiceError::LoggedInElsewhere) {
            error.ended = Some("replaced");
        }
        error
    }
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            message: self.message,
            ended: self.ended,
        };
        warp::reply::with_status(warp::reply::json(&body), self.status).into_response()
    }
}

#[derive(Serialize)]
struct ErrorBody {
    code: &'static str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ended: Option<&'static str>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegisterRequest {
    name: String,
    password: String,
}

#[derive(Serialize)]
struct RegisterResponse {
    user_id: u64,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LoginRequest {
    name: String,
    password: String,
    #[serde(default)]
    takeover: bool,
}

#[derive(Serialize)]
struct LoginResponse {
    user_id: u64,
    name: String,
    token: String,
    server_id: String,
    server_addr: String,
    expires_at_ms: u64,
}

impl From<LoginGrant> for LoginResponse {
    fn from(grant: LoginGrant) -> Self {
        Self {
            user_id: grant.user_id,
            name: grant.name,
            token: grant.token,
            server_id: grant.server.id,
            server_addr: grant.server.client_addr.to_string(),
            expires_at_ms: grant.expires_at_ms,
        }
    }
}

#[derive(Serialize)]
struct UserJson {
    id: u64,
    name: String,
}

#[derive(Serialize)]
struct NamedUserJson {
    id: u64,
    name: String,
    online: bool,
    /// When an offline user last went offline, if recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen_ms: Option<u64>,
    /// The line the user set about itself, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
}

/// A user's status (a change: empty clears it; an answer: absent when there is none).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct StatusJson {
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<String>,
}

#[derive(Serialize)]
struct OnlineResponse {
    users: Vec<UserJson>,
    /// More users follow the last one: ask again with `after` set to its name.
    more: bool,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct OnlineQuery {
    prefix: String,
    /// Only names after this one (the last name of the page before).
    after: String,
    /// Most users to return (1 to [`MAX_ONLINE_PAGE`], which is the default).
    limit: Option<usize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SendRequest {
    to: Option<u64>,
    group: Option<String>,
    body: String,
    /// Optional idempotency key: a retry with the same value is stored once.
    #[serde(default)]
    client_msg_id: u64,
}

#[derive(Serialize)]
struct SendResponse {
    msg_id: u64,
    /// `msg_id` in decimal: message ids are above 2^53, which a JSON number loses in
    /// JavaScript (and in any parser that reads numbers as doubles).
    msg_id_str: String,
    recipients: u32,
    /// For a private message: whether its recipient was online when it was stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    recipient_online: Option<bool>,
}

impl From<Sent> for SendResponse {
    fn from(sent: Sent) -> Self {
        SendResponse {
            msg_id: sent.msg_id,
            msg_id_str: sent.msg_id.to_string(),
            recipients: sent.recipients,
            recipient_online: sent.recipient_online,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateGroupRequest {
    name: String,
    /// Only users the owner invites get in.
    #[serde(default)]
    invite_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InviteRequest {
    user_id: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    old_password: String,
    new_password: String,
}

/// A user's settings (all of them in an answer; those given in a change).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    hide_last_seen: Option<bool>,
    hide_read_receipts: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnsendRequest {
    /// Whom the message went to: a user...
    user_id: Option<u64>,
    /// ...or a group.
    group: Option<String>,
    /// The message's id.
    #[serde(deserialize_with = "number_or_decimal")]
    msg_id: u64,
}

/// A `u64` given as a JSON number or as a string of its decimal digits: message ids are above
/// 2^53, which a JSON number loses in JavaScript (the API gives them as `msg_id_str` too).
fn number_or_decimal<'de, D: serde::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(
        untagged,
        expecting = "a message id: a whole number or a string of its decimal digits"
    )]
    enum Id {
        Number(u64),
        Decimal(String),
    }
    match Id::deserialize(d)? {
        Id::Number(n) => Ok(n),
        Id::Decimal(s) => s.parse().map_err(|_| {
            let got = serde::de::Unexpected::Str(&s);
            serde::de::Error::invalid_value(got, &"a message id in decimal digits")
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReceiptRequest {
    /// Whose messages were read.
    user_id: u64,
    /// The latest of them read.
    #[serde(deserialize_with = "number_or_decimal")]
    msg_id: u64,
}

#[derive(Serialize)]
struct ReceiptJson {
    id: u64,
    name: String,
    up_to_msg_id: u64,
    /// The id as a string, for JSON readers whose numbers are doubles.
    up_to_msg_id_str: String,
    read_at_ms: u64,
}

#[derive(Serialize)]
struct ReceiptsResponse {
    receipts: Vec<ReceiptJson>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReportRequest {
    user_id: u64,
    #[serde(default)]
    reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountDeletion {
    password: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BlockRequest {
    user_id: u64,
}

#[derive(Serialize)]
struct BlockResponse {
    id: u64,
    name: String,
    /// The user was blocked before this request.
    already_blocked: bool,
}

#[derive(Serialize)]
struct BlockedResponse {
    blocked: Vec<UserJson>,
}

#[derive(Serialize)]
struct MemberJson {
    id: u64,
    name: String,
    online: bool,
    owner: bool,
}

#[derive(Serialize)]
struct MembersResponse {
    members: Vec<MemberJson>,
}

#[derive(Serialize)]
struct GroupsResponse {
    groups: Vec<String>,
    invitations: Vec<String>,
}

#[derive(Serialize)]
struct HealthResponse {
    status: &'static str,
    servers: usize,
}

/// Parses `data` as each JSON request body the API accepts (for fuzzing the body decoders);
/// returns how many parsed.
pub fn parse_all_bodies(data: &[u8]) -> usize {
    usize::from(serde_json::from_slice::<RegisterRequest>(data).is_ok())
        + usize::from(serde_json::from_slice::<LoginRequest>(data).is_ok())
        + usize::from(serde_json::from_slice::<SendRequest>(data).is_ok())
        + usize::from(serde_json::from_slice::<BlockRequest>(data).is_ok())
        + usize::from(serde_json::from_slice::<PasswordChange>(data).is_ok())
}

/// All routes of the API, with errors turned into JSON.
pub fn routes(
    service: Arc<Service>,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_service_for_admin = service.clone();
    let with_service = warp::any().map(move || service.clone());
    let register = warp::path!("api" / "register")
        .and(warp::post())
        .and(with_service.clone())
        .and(warp::ext::optional::<PeerAddr>())
        .and(json_body::<RegisterRequest>())
        .then(
            |service: Arc<Service>,
             peer: Option<PeerAddr>,
             req: Result<RegisterRequest, ApiError>| async move {
                let result = async {
                    let req = req?;
                    let peer = peer.map(|p| address_key(p.0.ip()));
                    let account = service.register(&req.name, &req.password, peer).await?;
                    let body = RegisterResponse {
                        user_id: account.id,
                        name: account.name,
                    };
                    Ok::<_, ApiError>(warp::reply::with_status(
                        warp::reply::json(&body),
                        StatusCode::CREATED,
                    ))
                };
                respond_api(result.await)
            },
        );
    let login =
        warp::path!("api" / "login")
            .and(warp::post())
            .and(with_service.clone())
            .and(warp::ext::optional::<PeerAddr>())
            .and(json_body::<LoginRequest>())
            .then(
                |service: Arc<Service>,
                 peer: Option<PeerAddr>,
                 req: Result<LoginRequest, ApiError>| async move {
                    let result = async {
                        let req = req?;
                        let peer = peer.map(|p| address_key(p.0.ip()));
                        let grant = service
                            .login(&req.name, &req.password, req.takeover, peer)
                            .await?;
                        Ok::<_, ApiError>(warp::reply::json(&LoginResponse::from(grant)))
                    };
                    respond_api(result.await)
                },
            );
    // A session whose server died or is draining comes back with its token, no password.
    let relogin = warp::path!("api" / "relogin")
        .and(warp::post())
        .and(with_service.clone())
        .and(warp::ext::optional::<PeerAddr>())
        .and(bearer())
        .then(
            |service: Arc<Service>, peer: Option<PeerAddr>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let grant = service.relogin(&auth?, peer.map(|p| address_key(p.0.ip()))).await?;
                    Ok::<_, ApiError>(warp::reply::json(&LoginResponse::from(grant)))
                };
                respond_api(result.await)
            },
        );
    let logout = warp::path!("api" / "logout")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    // Not limited: a client over its limit must still be able to log out.
                    let claims = authenticate_as(&service, auth, false).await?;
                    service.logout(&claims).await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let online = warp::path!("api" / "users" / "online")
        .and(warp::get())
        .and(with_service.clone())
        .and(bearer())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .then(
            |service: Arc<Service>, auth: Result<String, ApiError>, query: String| async move {
                let result = async {
                    authenticate(&service, auth).await?;
                    let q = online_query(&query)?;
                    let limit = q.limit.unwrap_or(MAX_ONLINE_PAGE);
                    let page = service.online_users(&q.prefix, &q.after, limit).await?;
                    let users = page
                        .users
                        .into_iter()
                        .map(|a| UserJson {
                            id: a.id,
                            name: a.name,
                        })
                        .collect();
                    let more = page.more;
                    Ok::<_, ApiError>(warp::reply::json(&OnlineResponse { users, more }))
                };
                respond_api(result.await)
            },
        );
    let user_named = warp::path!("api" / "users" / "named" / String)
        .and(warp::get())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |name: String, service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let user = service.user_named(claims.user_id, &name).await?;
                    Ok::<_, ApiError>(warp::reply::json(&NamedUserJson {
                        id: user.id,
                        name: user.name,
                        online: user.online,
                        last_seen_ms: user.last_seen_ms,
                        status: user.status,
                    }))
                };
                respond_api(result.await)
            },
        );
    let send = warp::path!("api" / "messages")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<SendRequest>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<SendRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    let target = match (req.to, req.group) {
                        (Some(to), None) => Target::ToUser(to),
                        (None, Some(group)) => Target::Group(group),
                        _ => {
                            return Err(ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                "give exactly one of `to` and `group`",
                            ));
                        }
                    };
                    let message = ChatMessage {
                        client_msg_id: req.client_msg_id,
                        target: Some(target),
                        body: req.body,
                    };
                    // The request counted one; a broadcast costs as much as on a server.
                    let cost = cim_core::limit::send_cost(&message);
                    service.check_api_extra(claims.user_id, claims.session_id, cost)?;
                    let sender = Sender {
                        id: claims.user_id,
                        name: claims.user_name,
                    };
                    let sent = service.send(&sender, &message).await?;
                    Ok(warp::reply::json(&SendResponse::from(sent)))
                };
                respond_api(result.await)
            },
        );
    let create_group = warp::path!("api" / "groups")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<CreateGroupRequest>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<CreateGroupRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    service
                        .create_group(claims.user_id, &req.name, req.invite_only)
                        .await?;
                    Ok::<_, ApiError>(warp::reply::with_status(
                        warp::reply::json(&serde_json::json!({"name": req.name})),
                        StatusCode::CREATED,
                    ))
                };
                respond_api(result.await)
            },
        );
    // Only the actions below: `POST .../invitations` whose body was refused before it was
    // read (no length, far too long) must not end here as an unknown action.
    let group_action = warp::path!("api" / "groups" / String / String)
        .and(warp::post())
        .and_then(|name: String, action: String| async move {
            match action.as_str() {
                "join" | "leave" => Ok((name, action)),
                _ => Err(warp::reject::not_found()),
            }
        })
        .untuple_one()
        .and(with_service.clone())
        .and(bearer())
        .then(
            |name: String,
             action: String,
             service: Arc<Service>,
             auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    membership_change(&service, &claims)?;
                    // The guard above let only a join or a leave through.
                    if action == "join" {
                        service.join_group(claims.user_id, &name).await?
                    } else {
                        service.leave_group(claims.user_id, &name).await?
                    }
                    Ok(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let invite = warp::path!("api" / "groups" / String / "invitations")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<InviteRequest>())
        .then(
            |name: String,
             service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<InviteRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    membership_change(&service, &claims)?;
                    service.invite(claims.user_id, &name, req.user_id).await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let transfer = warp::path!("api" / "groups" / String / "owner")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<InviteRequest>())
        .then(
            |name: String,
             service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<InviteRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    membership_change(&service, &claims)?;
                    service
                        .transfer_group(claims.user_id, &name, req.user_id)
                        .await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let remove_member = warp::path!("api" / "groups" / String / "members" / u64)
        .and(warp::delete())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |name: String, user: u64, service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    membership_change(&service, &claims)?;
                    service.remove_member(claims.user_id, &name, user).await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let group_members = warp::path!("api" / "groups" / String / "members")
        .and(warp::get())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |name: String, service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let members = service
                        .group_members(claims.user_id, &name)
                        .await?
                        .into_iter()
                        .map(|m| MemberJson {
                            id: m.id,
                            name: m.name,
                            online: m.online,
                            owner: m.owner,
                        })
                        .collect();
                    Ok::<_, ApiError>(warp::reply::json(&MembersResponse { members }))
                };
                respond_api(result.await)
            },
        );
    let my_groups = warp::path!("api" / "groups")
        .and(warp::get())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let mine = service.my_groups(claims.user_id).await?;
                    Ok::<_, ApiError>(warp::reply::json(&GroupsResponse {
                        groups: mine.groups,
                        invitations: mine.invitations,
                    }))
                };
                respond_api(result.await)
            },
        );
    let password = warp::path!("api" / "password")
        .and(warp::post())
        .and(with_service.clone())
        .and(warp::ext::optional::<PeerAddr>())
        .and(bearer())
        .and(json_body::<PasswordChange>())
        .then(
            |service: Arc<Service>,
             peer: Option<PeerAddr>,
             auth: Result<String, ApiError>,
             req: Result<PasswordChange, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    let peer = peer.map(|p| address_key(p.0.ip()));
                    service
                        .change_password(&claims, &req.old_password, &req.new_password, peer)
                        .await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let settings = warp::path!("api" / "settings")
        .and(warp::get())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    settings_of(&service, claims.user_id).await
                };
                respond_api(result.await)
            },
        );
    let change_settings = warp::path!("api" / "settings")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<Settings>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<Settings, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    let changes = [
                        (Privacy::LastSeen, req.hide_last_seen),
                        (Privacy::ReadReceipts, req.hide_read_receipts),
                    ];
                    for (what, hidden) in changes {
                        if let Some(hidden) = hidden {
                            service.set_hidden(claims.user_id, what, hidden).await?;
                        }
                    }
                    settings_of(&service, claims.user_id).await
                };
                respond_api(result.await)
            },
        );
    let report = warp::path!("api" / "reports")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<ReportRequest>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<ReportRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    membership_change(&service, &claims)?;
                    let (name, already) = service
                        .report_user(&claims, req.user_id, &req.reason)
                        .await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({
                        "id": req.user_id,
                        "name": name,
                        "already_reported": already,
                    })))
                };
                respond_api(result.await)
            },
        );
    let delete_account = warp::path!("api" / "account" / "delete")
        .and(warp::post())
        .and(with_service.clone())
        .and(warp::ext::optional::<PeerAddr>())
        .and(bearer())
        .and(json_body::<AccountDeletion>())
        .then(
            |service: Arc<Service>,
             peer: Option<PeerAddr>,
             auth: Result<String, ApiError>,
             req: Result<AccountDeletion, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    let peer = peer.map(|p| address_key(p.0.ip()));
                    to_the_end(async move {
                        service.delete_account(&claims, &req.password, peer).await
                    })
                    .await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let block = warp::path!("api" / "blocks")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<BlockRequest>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<BlockRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    membership_change(&service, &claims)?;
                    let (name, already_blocked) =
                        service.block(claims.user_id, req.user_id).await?;
                    Ok::<_, ApiError>(warp::reply::json(&BlockResponse {
                        id: req.user_id,
                        name,
                        already_blocked,
                    }))
                };
                respond_api(result.await)
            },
        );
    let unblock = warp::path!("api" / "blocks" / u64)
        .and(warp::delete())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |user: u64, service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    membership_change(&service, &claims)?;
                    let was_blocked = service.unblock(claims.user_id, user).await?;
                    Ok::<_, ApiError>(warp::reply::json(
                        &serde_json::json!({ "was_blocked": was_blocked }),
                    ))
                };
                respond_api(result.await)
            },
        );
    let blocked = warp::path!("api" / "blocks")
        .and(warp::get())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let blocked = service
                        .blocked_users(claims.user_id)
                        .await?
                        .into_iter()
                        .map(|u| UserJson {
                            id: u.id,
                            name: u.name,
                        })
                        .collect();
                    Ok::<_, ApiError>(warp::reply::json(&BlockedResponse { blocked }))
                };
                respond_api(result.await)
            },
        );
    let status = warp::path!("api" / "status")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<StatusJson>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<StatusJson, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    let status = req.status.unwrap_or_default();
                    let status = service.set_status(claims.user_id, &status).await?;
                    Ok::<_, ApiError>(warp::reply::json(&StatusJson { status }))
                };
                respond_api(result.await)
            },
        );
    let unsend = warp::path!("api" / "unsend")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<UnsendRequest>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<UnsendRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    let sender = Sender {
                        id: claims.user_id,
                        name: claims.user_name,
                    };
                    let target = match (req.user_id, req.group) {
                        (Some(user), None) => Target::ToUser(user),
                        (None, Some(group)) => Target::Group(group),
                        _ => {
                            return Err(ApiError::new(
                                StatusCode::BAD_REQUEST,
                                "bad_request",
                                "give exactly one of `user_id` and `group`",
                            ));
                        }
                    };
                    let sent = service.unsend(&sender, &target, req.msg_id).await?;
                    Ok::<_, ApiError>(warp::reply::json(&SendResponse::from(sent)))
                };
                respond_api(result.await)
            },
        );
    let mark_read = warp::path!("api" / "receipts")
        .and(warp::post())
        .and(with_service.clone())
        .and(bearer())
        .and(json_body::<ReceiptRequest>())
        .then(
            |service: Arc<Service>,
             auth: Result<String, ApiError>,
             req: Result<ReceiptRequest, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let req = req?;
                    service.mark_read(&claims, req.user_id, req.msg_id).await?;
                    Ok::<_, ApiError>(warp::reply::json(&serde_json::json!({})))
                };
                respond_api(result.await)
            },
        );
    let receipts = warp::path!("api" / "receipts")
        .and(warp::get())
        .and(with_service.clone())
        .and(bearer())
        .then(
            |service: Arc<Service>, auth: Result<String, ApiError>| async move {
                let result = async {
                    let claims = authenticate(&service, auth).await?;
                    let receipts = service
                        .read_receipts(claims.user_id)
                        .await?
                        .into_iter()
                        .map(|r| ReceiptJson {
                            id: r.reader,
                            name: r.name,
                            up_to_msg_id: r.up_to_msg_id,
                            up_to_msg_id_str: r.up_to_msg_id.to_string(),
                            read_at_ms: r.at_ms,
                        })
                        .collect();
                    Ok::<_, ApiError>(warp::reply::json(&ReceiptsResponse { receipts }))
                };
                respond_api(result.await)
            },
        );
    let metrics = warp::path!("metrics")
        .and(warp::get())
        .and(with_service.clone())
        .map(|service: Arc<Service>| match &service.config.registry {
            Some(registry) => warp::reply::with_header(
                cim_core::metrics::render(registry),
                "content-type",
                "text/plain; version=0.0.4",
            )
            .into_response(),
            None => ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                "metrics are not enabled",
            )
            .into_response(),
        });
    let ready = warp::path!("ready")
        .and(warp::get())
        .and(with_service.clone())
        .then(|service: Arc<Service>| async move {
            match service.ready().await {
                Ok(()) => {
                    warp::reply::json(&serde_json::json!({"status": "ready"})).into_response()
                }
                Err(why) => {
                    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "not_ready", why).into_response()
                }
            }
        });
    let admin = crate::admin::routes(with_service_for_admin);
    let health = warp::path!("health")
        .and(warp::get())
        .and(with_service)
        .map(|service: Arc<Service>| {
            warp::reply::json(&HealthResponse {
                status: "ok",
                servers: service.usable_servers().len(),
            })
            .into_response()
        });

    // Each route is boxed before they are combined: the nested type of (then) fourteen `or`s of
    // unboxed filters took rustc over a minute and a half to check (coherence and auto traits),
    // three times per test run. A boxed filter costs one dynamic call per route tried.
    let [first, rest @ ..]: [BoxedFilter<(Response,)>; 30] = [
        register.boxed(),
        login.boxed(),
        relogin.boxed(),
        logout.boxed(),
        password.boxed(),
        delete_account.boxed(),
        online.boxed(),
        user_named.boxed(),
        send.boxed(),
        create_group.boxed(),
        invite.boxed(),
        transfer.boxed(),
        remove_member.boxed(),
        group_action.boxed(),
        group_members.boxed(),
        my_groups.boxed(),
        block.boxed(),
        unblock.boxed(),
        blocked.boxed(),
        report.boxed(),
        unsend.boxed(),
        mark_read.boxed(),
        receipts.boxed(),
        status.boxed(),
        settings.boxed(),
        change_settings.boxed(),
        metrics.boxed(),
        ready.boxed(),
        admin.boxed(),
        health.boxed(),
    ];
    rest.into_iter()
        .fold(first, |all, route| all.or(route).unify().boxed())
        .recover(recover)
        .unify()
}

/// Counts a change of a group's members (or of the caller's blocks) against the caller's API
/// limit: the request counted one, and such a change costs as much as on a server.
fn membership_change(service: &Service, claims: &Claims) -> Result<(), ServiceError> {
    let cost = cim_core::limit::MEMBERSHIP_CHANGE_COST;
    service.check_api_extra(claims.user_id, claims.session_id, cost)
}

/// Reads the body (capped) and parses it as JSON, yielding our own error on failure.
fn json_body<T: DeserializeOwned + Send>()
-> impl Filter<Extract = (Result<T, ApiError>,), Error = Rejection> + Clone {
    // Bodies a little over the limit are read and refused with a clear 413 (a server that
    // answers before reading leaves the client with a broken pipe instead); far larger ones are
    // rejected on their Content-Length without being read.
    warp::body::content_length_limit(MAX_DRAINED_BODY)
        .and(warp::body::bytes())
        .map(|bytes: Bytes| {
            if bytes.len() as u64 > MAX_HTTP_BODY {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("request body exceeds {MAX_HTTP_BODY} bytes"),
                ));
            }
            serde_json::from_slice::<T>(&bytes).map_err(|e| {
                // The error's text can quote the body (a password sent as a number): the log
                // gets only its kind and place.
                tracing::info!(kind = ?e.classify(), line = e.line(), column = e.column(), "bad json body");
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "bad_json",
                    format!("invalid JSON body: {e}"),
                )
            })
        })
}

/// The token of an `Authorization: Bearer <token>` header's value; the scheme's name is
/// case-insensitive (RFC 7235).
pub(crate) fn bearer_token(header: &str) -> Option<&str> {
    let scheme = header.get(..7)?;
    scheme
        .eq_ignore_ascii_case("bearer ")
        .then(|| header[7..].trim())
}

/// The bearer token from the Authorization header, if any.
fn bearer() -> impl Filter<Extract = (Result<String, ApiError>,), Error = Rejection> + Clone {
    warp::header::optional::<String>("authorization").map(|header: Option<String>| {
        header
            .as_deref()
            .and_then(bearer_token)
            .map(str::to_string)
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "missing `Authorization: Bearer <token>` header",
                )
            })
    })
}

/// The claims of a genuine, unexpired token whose login was not logged out or replaced.
async fn authenticate(
    service: &Service,
    token: Result<String, ApiError>,
) -> Result<Claims, ApiError> {
    authenticate_as(service, token, true).await
}

/// [`authenticate`], counted against the user's request limit if `limited`.
async fn authenticate_as(
    service: &Service,
    token: Result<String, ApiError>,
    limited: bool,
) -> Result<Claims, ApiError> {
    let token = token?;
    let claims = service
        .config
        .token_key
        .verify(&token, now_ms(), None)
        .map_err(ServiceError::from)?;
    if limited {
        service.check_api_rate(claims.user_id, claims.session_id)?;
    }
    if service
        .store
        .revocation(claims.user_id, claims.session_id)
        .await
        .map_err(ServiceError::from)?
        .is_some()
    {
        return Err(ServiceError::Unauthorized("the session has ended".into()).into());
    }
    Ok(claims)
}

/// `user`'s settings, as answered.
async fn settings_of(service: &Service, user: u64) -> Result<warp::reply::Json, ApiError> {
    let (last_seen, read_receipts) = tokio::try_join!(
        service.hides(user, Privacy::LastSeen),
        service.hides(user, Privacy::ReadReceipts),
    )?;
    Ok(warp::reply::json(&Settings {
        hide_last_seen: Some(last_seen),
        hide_read_receipts: Some(read_receipts),
    }))
}

/// Runs `work` (a deletion) on a task of its own, so that a client hanging up does not stop
/// it half way, and waits for it.
pub(crate) async fn to_the_end<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, ServiceError>> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::spawn(work)
        .await
        .map_err(|e| ServiceError::Internal(e.to_string()))?
}

fn respond_api<R: Reply>(result: Result<R, ApiError>) -> Response {
    match result {
        Ok(r) => r.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Turns warp's rejections (no route, wrong method, body too large) into JSON errors.
async fn recover(rejection: Rejection) -> Result<Response, Infallible> {
    let error = if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
    } else if let Some(header) = rejection.find::<warp::reject::InvalidHeader>() {
        // Ahead of the method check: another route's method refusal is merged in. Not
        // visible ASCII: a client's mistake (or a probe), not the router's, so not a
        // warning per request.
        tracing::debug!(header = header.name(), "invalid header");
        if header.name() == "authorization" {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the Authorization header is not a token",
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("invalid {} header", header.name()),
            )
        }
    } else if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("request body exceeds {MAX_HTTP_BODY} bytes"),
        )
    } else if rejection.find::<warp::reject::LengthRequired>().is_some() {
        ApiError::new(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "a Content-Length header is required",
        )
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "method not allowed",
        )
    } else if rejection.find::<warp::reject::InvalidQuery>().is_some() {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "invalid query string",
        )
    } else {
        tracing::warn!(?rejection, "unhandled rejection");
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", "bad request")
    };
    Ok(error.into_response())
}

/// Reads an online listing's query string; a limit outside 1 to [`MAX_ONLINE_PAGE`] or an
/// unknown parameter is a `400`, not a default.
fn online_query(query: &str) -> Result<OnlineQuery, ApiError> {
    let q: OnlineQuery = serde_urlencoded::from_str(query).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("invalid query string: {e}"),
        )
    })?;
    match q.limit {
        Some(limit) if !(1..=MAX_ONLINE_PAGE).contains(&limit) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit must be 1 to {MAX_ONLINE_PAGE}"),
        )),
        _ => Ok(q),
    }
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, online_query};

    #[test]
    fn a_bearer_token_is_read_whatever_the_scheme_case() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer abc "), Some("abc"));
        assert_eq!(bearer_token("BEARER abc"), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bear"), None);
    }

    #[test]
    fn an_online_query_is_read_or_refused_with_a_reason() {
        let q = online_query("prefix=b%C3%B6&after=bob&limit=5").unwrap();
        assert_eq!(
            (q.prefix.as_str(), q.after.as_str(), q.limit),
            ("bö", "bob", Some(5))
        );
        let q = online_query("").unwrap();
        assert_eq!(
            (q.prefix.as_str(), q.after.as_str(), q.limit),
            ("", "", None)
        );
        for bad in ["limit=0", "limit=1001", "limit=x", "limit=-1", "colour=red"] {
            let refused = online_query(bad).err().unwrap();
            assert_eq!(refused.code, "bad_request", "{bad}");
        }
    }
}
