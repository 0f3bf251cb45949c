//! The abuse suite: forged, expired and misdirected tokens, a claimed sender, a client on the
//! internal endpoint, an oversized frame, garbage on the control stream, a send stream with
//! other frames or too many sends, oversized sends among shared ones, a client that leaves
//! its acks unread, a client that leaves its control stream unread or ends it early, a ping
//! flood, 10,000 streams at once, a request body that never ends, garbage UDP, malformed JSON
//! on every endpoint, a login brute force, a message flood, a client that never acks a
//! delivery and a router that reads sends and never answers.
//! After each, well-behaved clients on the same server still chat and no accepted message is
//! lost.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use cim_client::{Client, ClientError, Event, Events, LoginOptions, RouterApi};
use cim_core::token::{Claims, TokenKey};
use cim_core::transport::{self, Link};
use cim_core::{ALPN_INTERNAL, now_ms, tls};
use cim_integration_tests::{Backend, TestCluster, WAIT, eventually, next_event, next_message};
use cim_proto::v1::{
    ChatMessage, ClientControl, ClientRequest, DeliveryBatch, Forward, ForwardBatchResult,
    LoginResult, Ping, Pull, PullResult, SendAck, ServerControl, ServerRequest,
    chat_message::Target, client_control, client_request, server_control, server_request,
};
use cim_proto::{ProstMessage, read_frame, read_required, write_frame};
use http::{Method, StatusCode};

/// A cluster with two well-behaved users, checked after every abuse.
struct Scene {
    cluster: TestCluster,
    alice: Client,
    bob: Client,
    bob_events: Events,
    sent: u32,
}

impl Scene {
    async fn new() -> anyhow::Result<Self> {
        Self::with(|_| {}).await
    }

    async fn with(
        tweak: impl FnOnce(&mut cim_router::embedded::EmbeddedConfig),
    ) -> anyhow::Result<Self> {
        let cluster = TestCluster::start_with(1, Backend::Memory, tweak).await?;
        let (alice, _) = cluster.user("alice").await?;
        let (bob, bob_events) = cluster.user("bob").await?;
        Ok(Self {
            cluster,
            alice,
            bob,
            bob_events,
            sent: 0,
        })
    }

    /// Alice and Bob still chat: the next message Bob sees is the one Alice sends now.
    async fn still_chatting(&mut self) -> anyhow::Result<()> {
        self.sent += 1;
        let body = format!("still fine {}", self.sent);
        self.alice
            .send_private(self.bob.info().user_id, &body)
            .await?;
        let m = next_message(&mut self.bob_events).await?;
        assert_eq!(
            (m.body, m.from_user),
            (body, self.alice.info().user_id),
            "an accepted message went missing"
        );
        Ok(())
    }

    fn server_addr(&self) -> SocketAddr {
        self.cluster.embedded.servers[0].1
    }

    fn token_key(&self) -> TokenKey {
        let secret = std::fs::read_to_string(
            self.cluster
                .dir
                .path()
                .join("certs")
                .join(cim_certs::TOKEN_SECRET),
        )
        .unwrap();
        TokenKey::from_hex(&secret).unwrap()
    }

    fn api(&self) -> RouterApi {
        RouterApi::new(&self.cluster.client_config()).unwrap()
    }

    /// See [`TestCluster::http_login`].
    async fn http_login(&self, name: &str) -> anyhow::Result<(u64, String)> {
        self.cluster.http_login(name).await
    }

    /// Sends Login with `token` on a new raw connection; returns the login result code.
    async fn raw_login(&self, token: &str) -> anyhow::Result<(quinn::Connection, String)> {
        let (conn, code, send, recv) = self.raw_session(token, false).await?;
        // Keep the control stream open for the session's lifetime.
        std::mem::forget((send, recv));
        Ok((conn, code))
    }

    /// [`Scene::raw_login`] that says whether it takes token renewals and keeps the control
    /// stream.
    async fn raw_session(
        &self,
        token: &str,
        token_renewal: bool,
    ) -> anyhow::Result<(
        quinn::Connection,
        String,
        quinn::SendStream,
        quinn::RecvStream,
    )> {
        let (conn, result, send, recv) = self.cluster.raw_login(0, token, token_renewal).await?;
        Ok((conn, result.code, send, recv))
    }

    /// A new user "raw" logged in on a raw connection: the connection and its control stream.
    async fn raw_user_session(
        &self,
    ) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
        self.raw_user_session_with_window(None).await
    }

    /// [`Scene::raw_user_session`] on a connection whose streams hold at most `stream_window`
    /// unread bytes.
    async fn raw_user_session_with_window(
        &self,
        stream_window: Option<u32>,
    ) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
        let (_, token) = self.http_login("raw").await?;
        let conn = self
            .cluster
            .raw_connection_with_window(0, stream_window)
            .await?;
        let (conn, result, send, recv) = TestCluster::raw_login_on(conn, &token, false).await?;
        assert_eq!(result.code, "", "the raw login was refused");
        Ok((conn, send, recv))
    }
}

fn claims(user_id: u64, server_id: &str, expires_at_ms: u64) -> Claims {
    Claims {
        user_id,
        user_name: "alice".into(),
        server_id: server_id.into(),
        session_id: 77,
        expires_at_ms,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misdirected_tokens_are_refused_with_reasons() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let server_id = scene.cluster.embedded.servers[0].0.clone();
    let alice = scene.alice.info().user_id;
    let forged = TokenKey::new(b"not the cluster secret").sign(&claims(
        alice,
        &server_id,
        now_ms() + 60_000,
    ));
    let expired = scene
        .token_key()
        .sign(&claims(alice, &server_id, now_ms() - 1));
    let elsewhere = scene
        .token_key()
        .sign(&claims(alice, "server-9", now_ms() + 60_000));
    for (token, code) in [
        (forged.as_str(), "invalid_token"),
        (expired.as_str(), "token_expired"),
        (elsewhere.as_str(), "wrong_server"),
        ("garbage", "invalid_token"),
    ] {
        let (_conn, got) = scene.raw_login(token).await?;
        assert_eq!(got, code);
        scene.still_chatting().await?;
    }
    // The HTTP API refuses the forged token too.
    let err = scene.api().online_users(&forged, "").await.unwrap_err();
    assert!(matches!(err, ClientError::Api { status: 401, .. }), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cannot_claim_another_sender() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (mallory_id, mallory_token) = scene.http_login("mallory").await?;
    // Mallory's own session; the frame carries an extra field (15 = alice's id) that a naive
    // server might take for a sender. It is ignored: the sender is the session's user.
    let conn = {
        let (conn, code) = scene.raw_login(&mallory_token).await?;
        assert_eq!(code, "");
        conn
    };
    let request = ClientRequest {
        kind: Some(client_request::Kind::Send(ChatMessage {
            client_msg_id: 1,
            target: Some(Target::ToUser(scene.bob.info().user_id)),
            body: "i am alice".into(),
        })),
    };
    let mut body = request.encode_to_vec();
    body.extend_from_slice(&[15 << 3, scene.alice.info().user_id as u8]);
    let mut frame = (body.len() as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&body);
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&frame).await?;
    send.finish()?;
    let ack: SendAck = read_required(&mut recv, 4096).await?;
    assert_eq!(ack.code, "");
    let m = next_message(&mut scene.bob_events).await?;
    assert_eq!(
        (m.body.as_str(), m.from_user, m.from_name.as_str()),
        ("i am alice", mallory_id, "mallory")
    );

    // Over HTTP, a body naming a sender is refused outright.
    let (status, reply) = scene
        .api()
        .raw(
            Method::POST,
            "/api/messages",
            Bytes::from(format!(
                r#"{{"to":{},"body":"x","from":1}}"#,
                scene.bob.info().user_id
            )),
            Some(&mallory_token),
        )
        .await?;
    assert_eq!(
        status,
        StatusCode::BAD_REQUEST,
        "{}",
        String::from_utf8_lossy(&reply)
    );
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_use_the_internal_endpoint() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let roots = tls::load_roots(&scene.cluster.embedded.ca)?;
    let config = transport::client_config(
        tls::client_config(roots, &[ALPN_INTERNAL], None)?,
        Link::Internal,
    )?;
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse()?, config)?;
    let internal = scene.cluster.embedded.internal_addrs[0];
    let connecting = endpoint.connect(internal, "127.0.0.1")?;
    let refusal = match tokio::time::timeout(WAIT, connecting).await? {
        Err(e) => e,
        Ok(conn) => {
            // With TLS 1.3 the client may think it is connected until the server's verdict on
            // its (missing) certificate arrives: any use must fail, and the connection with it.
            let used = tokio::time::timeout(WAIT, async {
                let (mut send, mut recv) = conn.open_bi().await?;
                send.write_all(b"\0\0\0\x02\x0a\x00").await?;
                send.finish()?;
                let mut buf = Vec::new();
                let n = tokio::io::AsyncReadExt::read_to_end(&mut recv, &mut buf).await?;
                anyhow::Ok(n)
            })
            .await?;
            assert!(
                used.is_err(),
                "a client without a cluster certificate used it"
            );
            conn.close_reason().expect("the connection was closed")
        }
    };
    assert!(refusal.to_string().contains("no certificates"), "{refusal}");
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_frame_is_refused_and_the_connection_survives() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (_, token) = scene.http_login("raw").await?;
    let (conn, code) = scene.raw_login(&token).await?;
    assert_eq!(code, "");
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&0x7fff_ffffu32.to_be_bytes()).await?;
    // The server may refuse on the prefix alone and stop reading: a failed write of the
    // rest is expected, the refusal must still arrive.
    let _ = send.write_all(&[0u8; 1024]).await;
    let ack: SendAck = read_required(&mut recv, 4096).await?;
    assert_eq!(ack.code, "too_large");
    // The same connection still sends.
    let request = ClientRequest {
        kind: Some(client_request::Kind::Send(ChatMessage {
            client_msg_id: 9,
            target: Some(Target::ToUser(scene.bob.info().user_id)),
            body: "after the big one".into(),
        })),
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &request, 4096).await?;
    send.finish()?;
    let ack: SendAck = read_required(&mut recv, 4096).await?;
    assert_eq!(ack.code, "");
    assert_eq!(
        next_message(&mut scene.bob_events).await?.body,
        "after the big one"
    );
    scene.still_chatting().await
}

/// A login that ended by closing (no logout, no takeover: its route is simply gone) ends for
/// good once the user logs in again. Its token, left behind or stolen, no longer calls the
/// API, resumes its session, or re-logs in, not even after the newer login has ended. Before,
/// it did all three, and the older login could take the user back from the newer one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_login_ends_when_the_user_logs_in_again() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (ivy, old_token) = scene.http_login("ivy").await?;
    let (conn, code) = scene.raw_login(&old_token).await?;
    assert_eq!(code, "");
    conn.close(0u32.into(), b"app closed");
    let store = scene.cluster.embedded.store.clone();
    eventually(WAIT, || async {
        let route = store.routes(&[ivy]).await.ok()?.pop()?;
        route.is_none().then_some(())
    })
    .await?;

    let api = scene.api();
    let login = serde_json::json!({"name": "ivy", "password": "password"});
    let grant: serde_json::Value = api
        .call(Method::POST, "/api/login", Some(&login), None)
        .await?;
    let new_token = grant["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("login without a token: {grant}"))?
        .to_string();
    let (status, _) = api
        .raw(
            Method::GET,
            "/api/groups",
            Default::default(),
            Some(&old_token),
        )
        .await?;
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "the old token still calls the API"
    );
    let (_resumed, code) = scene.raw_login(&old_token).await?;
    assert_ne!(code, "", "the old login resumed");

    let (status, _) = api
        .raw(
            Method::POST,
            "/api/logout",
            Default::default(),
            Some(&new_token),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    let (status, reply) = api
        .raw(
            Method::POST,
            "/api/relogin",
            Default::default(),
            Some(&old_token),
        )
        .await?;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{reply:?}");
    let reply: serde_json::Value = serde_json::from_slice(&reply)?;
    assert_eq!(reply["ended"], "replaced", "{reply}");
    scene.still_chatting().await
}

/// A second "router" linked to the server's internal endpoint (with a router certificate):
/// it reads each request and hands its forwards to `answer`, which returns their acks in
/// order, or `None` to answer nothing (the stream is reset). Requests without forwards are
/// left unanswered too. The link lasts while the returned connection is kept.
async fn fake_router(
    scene: &Scene,
    answer: impl Fn(Vec<Forward>) -> Option<Vec<SendAck>> + Send + 'static,
) -> anyhow::Result<quinn::Connection> {
    let certs = cim_certs::CertPaths::in_dir(scene.cluster.dir.path().join("certs"));
    let (cert, key) = (certs.router_cert(), certs.router_key());
    let config = transport::client_config(
        tls::client_config(
            tls::load_roots(&certs.ca_cert())?,
            &[ALPN_INTERNAL],
            Some((&cert, &key)),
        )?,
        Link::Internal,
    )?;
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse()?, config)?;
    let internal = scene.cluster.embedded.internal_addrs[0];
    let link = endpoint.connect(internal, "127.0.0.1")?.await?;
    let router = link.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = router.accept_bi().await {
            let Ok(request) = read_required::<ServerRequest, _>(&mut recv, 1 << 22).await else {
                continue;
            };
            let (forwards, batched) = match request.kind {
                Some(server_request::Kind::Forwards(batch)) => (batch.forwards, true),
                Some(server_request::Kind::Forward(forward)) => (vec![forward], false),
                _ => (Vec::new(), false),
            };
            let acks = if forwards.is_empty() {
                None
            } else {
                answer(forwards)
            };
            let reply = acks.and_then(|acks| {
                let frame = if batched {
                    cim_proto::encode_frame(&ForwardBatchResult { acks }, 1 << 20)
                } else {
                    cim_proto::encode_frame(acks.first()?, 1 << 20)
                };
                frame.ok()
            });
            match reply {
                Some(frame) => {
                    let _ = send.write_all(&frame).await;
                    let _ = send.finish();
                }
                None => {
                    let _ = send.reset(0u32.into());
                }
            }
        }
    });
    // Let the server take the link before the sends start.
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(link)
}

/// A send without a client message id (0) has no dedup: once a router may have acted on it
/// (it read the request and never answered), it is not sent again through another router,
/// where it would be stored a second time; its sender is told to send again and decides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_without_an_id_is_not_resent_through_another_router() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    // A second router that reads every request, answers none, and notes the messages it was
    // handed.
    let seen = Arc::new(Mutex::new(Vec::<String>::new()));
    let seen_by_silent = seen.clone();
    let silent = fake_router(&scene, move |forwards| {
        let mut seen = seen_by_silent.lock().unwrap();
        seen.extend(
            forwards
                .into_iter()
                .filter_map(|f| f.message.map(|m| m.body)),
        );
        None
    })
    .await?;

    let (conn, _control, _control_recv) = scene.raw_user_session().await?;
    let bob = scene.bob.info().user_id;
    let (mut stored, mut unconfirmed) = (Vec::new(), Vec::new());
    // Batches go to the two routers in turn: some of these reach the silent one.
    for i in 0..12 {
        let body = format!("no id {i}");
        let request = ClientRequest {
            kind: Some(client_request::Kind::Send(ChatMessage {
                client_msg_id: 0,
                target: Some(Target::ToUser(bob)),
                body: body.clone(),
            })),
        };
        let (mut send, mut recv) = conn.open_bi().await?;
        write_frame(&mut send, &request, 4096).await?;
        send.finish()?;
        let ack: SendAck = tokio::time::timeout(WAIT, read_required(&mut recv, 4096)).await??;
        match ack.code.as_str() {
            "" => stored.push(body),
            cim_proto::SEND_RETRY => unconfirmed.push(body),
            other => anyhow::bail!("unexpected answer {other}: {}", ack.message),
        }
    }
    let seen = seen.lock().unwrap().clone();
    assert!(!seen.is_empty(), "no send reached the silent router");
    assert_eq!(
        unconfirmed, seen,
        "exactly the sends the silent router saw are unconfirmed"
    );
    // Bob gets the stored ones, once each, and none the silent router saw.
    for body in &stored {
        assert_eq!(&next_message(&mut scene.bob_events).await?.body, body);
    }
    scene.still_chatting().await?;
    drop(silent);
    Ok(())
}

/// A router that refuses every send as `unavailable` (it holds no message-id node, say, or
/// lost its store) stored nothing: a private send with a client message id goes on to the
/// next router instead of failing. Before, every send the server handed it came back refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_an_unavailable_router_refused_goes_to_another() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let refusals = Arc::new(AtomicUsize::new(0));
    let counted = refusals.clone();
    let unavailable = fake_router(&scene, move |forwards| {
        counted.fetch_add(forwards.len(), Ordering::SeqCst);
        let acks: Vec<SendAck> = forwards
            .iter()
            .map(|f| SendAck {
                client_msg_id: f.message.as_ref().map_or(0, |m| m.client_msg_id),
                code: cim_proto::SEND_UNAVAILABLE.into(),
                message: "no message-id node".into(),
                ..Default::default()
            })
            .collect();
        Some(acks)
    })
    .await?;
    let bob = scene.bob.info().user_id;
    let mut sent = Vec::new();
    // Private sends go to the two routers in turn.
    for i in 0..12 {
        let body = format!("through {i}");
        scene.alice.send_private(bob, &body).await?;
        sent.push(body);
    }
    assert!(
        refusals.load(Ordering::SeqCst) > 0,
        "no send reached the unavailable router"
    );
    for body in &sent {
        assert_eq!(&next_message(&mut scene.bob_events).await?.body, body);
    }
    scene.still_chatting().await?;
    drop(unavailable);
    Ok(())
}

/// A resend refused after an earlier attempt went unanswered says nothing about that attempt,
/// which may have been stored: the client waits out a passing refusal (`rate_limited`,
/// `unavailable`) and reports any other that does not refuse the message itself as an unknown
/// outcome, never as "not sent" (an application sending again under a new id would deliver it
/// twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_resend_does_not_say_an_earlier_attempt_was_not_stored() -> anyhow::Result<()> {
    let scene = Scene::new().await?;
    // Answers by body: a probe is refused at once; otherwise each client message id gets, in
    // turn, the answers its body lists ("retry,not_member"), then an ack.
    let asked = Arc::new(Mutex::new(std::collections::HashMap::<u64, usize>::new()));
    let fake = fake_router(&scene, move |forwards| {
        let acks: Vec<SendAck> = forwards
            .iter()
            .map(|f| {
                let message = f.message.clone().unwrap_or_default();
                let id = message.client_msg_id;
                let mut asked = asked.lock().unwrap();
                let turn = asked.entry(id).or_default();
                let code = message.body.split(',').nth(*turn).unwrap_or("").to_string();
                *turn += 1;
                SendAck {
                    client_msg_id: id,
                    msg_id: if code.is_empty() { 77 } else { 0 },
                    code,
                    ..Default::default()
                }
            })
            .collect();
        Some(acks)
    })
    .await?;
    // A group's sends all go to one router: find a group name the fake router gets.
    let mut group = None;
    for i in 0..64 {
        let name = format!("g{i}");
        let probe = scene
            .alice
            .send_group(&name, "probe_refused")
            .await
            .unwrap_err();
        if probe.code() == Some("probe_refused") {
            group = Some(name);
            break;
        }
    }
    let group = group.context("no group name reached the fake router")?;
    let target = || Target::Group(group.clone());

    let unknown = scene
        .alice
        .send_with_id(1001, target(), "retry,not_member")
        .await
        .unwrap_err();
    assert!(
        matches!(unknown, ClientError::Timeout),
        "a refusal after an unanswered attempt reads as not sent: {unknown:?}"
    );
    let waited = scene
        .alice
        .send_with_id(1002, target(), "retry,rate_limited,unavailable")
        .await?;
    assert_eq!(waited.msg_id, 77, "passing refusals are waited out");
    // A refusal of the message itself is final: no attempt of it could have been stored.
    let too_large = scene
        .alice
        .send_with_id(1004, target(), "retry,too_large")
        .await
        .unwrap_err();
    assert_eq!(too_large.code(), Some("too_large"), "{too_large:?}");
    // A first attempt's refusal is the answer.
    let refused = scene
        .alice
        .send_with_id(1003, target(), "not_member")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some("not_member"), "{refused:?}");
    drop(fake);
    Ok(())
}

/// A server that takes each login and hangs up at once (here a fake one, with the cluster's
/// server certificate, that the client's server address is sent to) is not redialed in a loop:
/// the client waits longer after each connection that ended soon after it began. Before, the
/// first attempt of each reconnect went at once: a connection (and a catch-up pull) per round
/// trip, for as long as it lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_hangs_up_after_each_login_is_not_redialed_in_a_loop() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let certs = cim_certs::CertPaths::in_dir(cluster.dir.path().join("certs"));
    let tls = tls::server_config(
        &certs.server_cert(),
        &certs.server_key(),
        &[cim_core::ALPN_CLIENT],
        None,
    )?;
    let endpoint = transport::server_endpoint("127.0.0.1:0".parse()?, tls, Link::Client)?;
    let fake = endpoint.local_addr()?;
    let logins = Arc::new(AtomicUsize::new(0));
    let counted = logins.clone();
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let counted = counted.clone();
            tokio::spawn(async move {
                let conn = incoming.await?;
                let (mut send, mut recv) = conn.accept_bi().await?;
                let _login: ClientControl = read_required(&mut recv, 4096).await?;
                let result = ServerControl {
                    kind: Some(server_control::Kind::LoginResult(LoginResult {
                        heartbeat_interval_ms: 1000,
                        ..Default::default()
                    })),
                };
                write_frame(&mut send, &result, 4096).await?;
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                conn.close(cim_core::close::code(cim_core::close::OVERLOAD), b"hang up");
                anyhow::Ok(())
            });
        }
    });
    let mut config = cluster.client_config();
    config
        .server_overrides
        .insert(cluster.embedded.servers[0].1, fake);
    cim_client::register(&config, "hung", "password").await?;
    let (client, _events) =
        Client::login(&config, "hung", "password", LoginOptions::default()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let seen = logins.load(Ordering::SeqCst);
    // With 100 ms doubling to 10 s (random below each ceiling): at most about 7 in 2 s.
    assert!((2..=10).contains(&seen), "{seen} logins in 2 s");
    client.close().await;
    Ok(())
}

/// A client that finishes its control stream while one of its message streams is still open
/// (a frame begun, never ended) has its connection closed: the session ended, so the
/// connection must not live on, held by that stream, outside every limit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_whose_control_stream_ends_loses_its_connection() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (conn, mut control, _control_recv) = scene.raw_user_session().await?;
    let (mut half, _half_recv) = conn.open_bi().await?;
    half.write_all(&[0, 0]).await?;
    control.finish()?;
    let closed = tokio::time::timeout(WAIT, conn.closed()).await;
    assert!(closed.is_ok(), "the connection outlived its session");
    scene.still_chatting().await
}

/// `count` pings, framed, with nonces from 0.
fn pings(count: u64) -> Vec<u8> {
    let mut pings = Vec::new();
    for nonce in 0..count {
        let ping = ClientControl {
            kind: Some(client_control::Kind::Ping(Ping {
                nonce,
                ..Default::default()
            })),
        };
        let body = ping.encode_to_vec();
        pings.extend_from_slice(&(body.len() as u32).to_be_bytes());
        pings.extend_from_slice(&body);
    }
    pings
}

/// Stream window of a raw session whose control stream the test leaves unread: about 16
/// pongs (6 to 8 bytes each at these nonces) fill it.
const UNREAD_CONTROL_WINDOW: u32 = 128;

/// A raw session whose control stream the test leaves unread: sends twice as many pings as
/// [`UNREAD_CONTROL_WINDOW`] holds pongs, so the server's pong writes block, and no more than
/// a client may send at once.
async fn raw_session_with_unread_pongs(
    scene: &Scene,
) -> anyhow::Result<(quinn::Connection, quinn::SendStream, quinn::RecvStream)> {
    let (conn, mut control, control_recv) = scene
        .raw_user_session_with_window(Some(UNREAD_CONTROL_WINDOW))
        .await?;
    control.write_all(&pings(32)).await?;
    Ok((conn, control, control_recv))
}

/// Waits for `conn` to close, and checks that cim closed it with `code` and `reason`.
async fn assert_closed_with(
    conn: &quinn::Connection,
    code: u32,
    reason: &str,
    what: &str,
) -> anyhow::Result<()> {
    let closed = tokio::time::timeout(WAIT, conn.closed())
        .await
        .with_context(|| format!("{what}: still open"))?;
    match closed {
        quinn::ConnectionError::ApplicationClosed(close) => assert_eq!(
            (close.error_code, &close.reason[..]),
            (cim_core::close::code(code), reason.as_bytes()),
            "{what}"
        ),
        other => panic!("{what}: closed by {other:?}"),
    }
    Ok(())
}

/// A client that reads nothing of its control stream is gone as much as one that sends
/// nothing: the server's blocked pong write ends the session after a heartbeat timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_its_control_stream_unread_is_timed_out() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (conn, _control, _control_recv) = raw_session_with_unread_pongs(&scene).await?;
    // Ended by the blocked pong write (not as a ping flood, nor by the heartbeat deadline,
    // which a blocked loop does not see).
    let what = "a session past its heartbeat timeout";
    assert_closed_with(&conn, cim_core::close::NORMAL, "session ended", what).await?;
    scene.still_chatting().await
}

/// A client that stops reading its control stream (here: more pongs than its narrow stream
/// window holds) cannot keep its session past a takeover: a
/// blocked control write held up the loop that sees kicks (and the heartbeat deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_its_control_stream_unread_is_still_kicked() -> anyhow::Result<()> {
    // A heartbeat timeout longer than the wait below: the kick itself must end the session,
    // not the timeout of the blocked control write.
    let mut scene = Scene::with(|config| {
        config.heartbeat_interval = Duration::from_secs(10);
        config.heartbeat_timeout = Duration::from_secs(30);
    })
    .await?;
    let (conn, _control, _control_recv) = raw_session_with_unread_pongs(&scene).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Another login of the user takes the session over.
    let (again, _events) = Client::login(
        &scene.cluster.client_config(),
        "raw",
        "password",
        LoginOptions { takeover: true },
    )
    .await?;
    let what = "the replaced session";
    assert_closed_with(&conn, cim_core::close::KICKED, "kicked", what).await?;
    again
        .send_private(scene.bob.info().user_id, "from the new login")
        .await?;
    assert_eq!(
        next_message(&mut scene.bob_events).await?.body,
        "from the new login"
    );
    scene.still_chatting().await
}

/// A client may send a burst of pings, each answered, but a flood of them ends its session
/// with a reason that says so; everyone else chats on. Before, every ping got its pong,
/// however many came.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ping_flood_ends_that_session_only() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (conn, mut control, mut control_recv) = scene.raw_user_session().await?;
    control.write_all(&pings(30)).await?;
    for nonce in 0..30 {
        let pong: ServerControl =
            tokio::time::timeout(WAIT, read_required(&mut control_recv, 4096)).await??;
        assert!(
            matches!(pong.kind, Some(server_control::Kind::Pong(ref p)) if p.nonce == nonce),
            "{pong:?}"
        );
    }
    // The server may close the connection before all of it is written.
    let _ = control.write_all(&pings(1000)).await;
    let reason = "ping rate limit exceeded";
    assert_closed_with(&conn, cim_core::close::OVERLOAD, reason, "a ping flood").await?;
    scene.still_chatting().await
}

/// Writes `request` to the router on a new HTTPS connection and reads the answer until the
/// router closes it.
async fn raw_https(cluster: &TestCluster, request: &[u8]) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = cluster.embedded.router_url.clone();
    let authority = url.trim_start_matches("https://").to_string();
    let roots = tls::load_roots(&cluster.embedded.ca)?;
    let mut config = tls::client_config(roots, &[b"http/1.1"], None)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(&authority).await?;
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1")?;
    let mut stream = connector.connect(name, tcp).await?;
    stream.write_all(request).await?;
    stream.flush().await?;
    let mut answer = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut answer))
        .await
        .map_err(|_| anyhow::anyhow!("no answer"))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

/// A client that sends a request's headers and then trickles its body (here: stops) is
/// answered `408` once the router's request timeout passes, instead of holding one of the
/// router's bounded HTTPS connections for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_never_ends_is_answered_in_time() -> anyhow::Result<()> {
    let mut scene = Scene::with(|config| {
        config.http_request_timeout = Duration::from_millis(500);
    })
    .await?;
    let head = "POST /api/login HTTP/1.1\r\nHost: cim\r\nContent-Type: application/json\r\n\
                Content-Length: 100\r\n\r\n{\"na";
    let answer = raw_https(&scene.cluster, head.as_bytes()).await?;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"timeout\""), "{answer}");
    scene.still_chatting().await
}

/// Every route that takes a JSON body by POST.
const JSON_BODY_ROUTES: [&str; 14] = [
    "/api/register",
    "/api/login",
    "/api/messages",
    "/api/groups",
    "/api/groups/club/invitations",
    "/api/groups/club/owner",
    "/api/blocks",
    "/api/password",
    "/api/account/delete",
    "/api/reports",
    "/api/receipts",
    "/api/unsend",
    "/api/status",
    "/api/settings",
];

/// A body refused before it is read (here: no length given) is answered as such on every
/// route that takes one, not taken up by another route of the same path shape as an unknown
/// group action (`POST /api/groups/NAME/ACTION`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_refused_unread_is_answered_by_its_own_route() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let token = scene.alice.token();
    for path in JSON_BODY_ROUTES {
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: cim\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        );
        let answer = raw_https(&scene.cluster, head.as_bytes()).await?;
        assert!(answer.starts_with("HTTP/1.1 411"), "{path}: {answer}");
        assert!(answer.contains("\"length_required\""), "{path}: {answer}");
    }
    scene.still_chatting().await
}

/// A request head past 16 KiB (a header of 64 KiB here) is refused `431` and its connection
/// closed: before, hyper's default let each connection hold about 400 KB of head before any
/// request was authenticated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_request_head_is_refused() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let filler = "x".repeat(64 * 1024);
    let head = format!("GET /health HTTP/1.1\r\nHost: cim\r\nX-Filler: {filler}\r\n\r\n");
    // The router answers once it has read 16 KiB and closes the connection with the rest
    // unread: the write of the rest, or the read of the answer, may then find the connection
    // reset. Either way the head was refused; what must not come is a 200.
    match raw_https(&scene.cluster, head.as_bytes()).await {
        Ok(answer) => assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
            "{answer}"
        ),
        Err(e) => {
            let kind = e.downcast_ref::<std::io::Error>().map(|e| e.kind());
            assert!(
                matches!(
                    kind,
                    Some(
                        std::io::ErrorKind::BrokenPipe
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::UnexpectedEof
                    )
                ),
                "{e:#}"
            );
        }
    }
    let head = "GET /health HTTP/1.1\r\nHost: cim\r\nConnection: close\r\n\r\n";
    let answer = raw_https(&scene.cluster, head.as_bytes()).await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    scene.still_chatting().await
}

/// The Authorization header is read as clients send it: the scheme in any case (RFC 7235),
/// and one that is not visible ASCII is a `401`, logged at debug. Before, `bearer` was refused
/// and bytes outside ASCII were an unexplained `400` with a warning per request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_headers_are_read_as_clients_send_them() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (_, token) = scene.cluster.http_login("zed").await?;
    let request = |auth: &[u8]| {
        let mut request = b"GET /api/groups HTTP/1.1\r\nHost: cim\r\nConnection: close\r\n\
                            Authorization: "
            .to_vec();
        request.extend_from_slice(auth);
        request.extend_from_slice(b"\r\n\r\n");
        request
    };
    let answer = raw_https(
        &scene.cluster,
        &request(format!("bearer {token}").as_bytes()),
    )
    .await?;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let answer = raw_https(&scene.cluster, &request(b"Bearer \xff\xfe")).await?;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("\"unauthorized\""), "{answer}");
    scene.still_chatting().await
}

/// One address cannot take every HTTPS place of the router by opening connections and
/// saying nothing (a TCP connect costs it nothing): past its share (512) new ones are closed at
/// once, and its places come back when its connections close. Before, the 513th waited out
/// the handshake timeout like the rest, and 4,096 such connections stopped all logins.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_connections_from_one_address_are_capped() -> anyhow::Result<()> {
    use tokio::io::AsyncReadExt;
    let mut scene = Scene::new().await?;
    let url = scene.cluster.embedded.router_url.clone();
    let authority = url.trim_start_matches("https://").to_string();
    let mut held = Vec::new();
    for _ in 0..512 {
        held.push(tokio::net::TcpStream::connect(&authority).await?);
    }
    let mut extra = tokio::net::TcpStream::connect(&authority).await?;
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut byte)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "a connection past the address's share was kept: {read:?}"
    );
    drop(held);
    let api = scene.api();
    eventually(WAIT, || async {
        api.raw(Method::GET, "/health", Default::default(), None)
            .await
            .ok()
            .filter(|(status, _)| *status == StatusCode::OK)
    })
    .await?;
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_control_stream_ends_that_session_only() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let undecodable: &[u8] = &[0, 0, 0, 3, 0xff, 0xff, 0xff];
    let oversized: &[u8] = &0x0010_0000u32.to_be_bytes();
    // Half a length prefix, then the end of the stream.
    let truncated: &[u8] = &[0, 0];
    for (name, garbage) in [
        ("undecodable", undecodable),
        ("oversized", oversized),
        ("truncated", truncated),
    ] {
        let (_, token) = scene.http_login(name).await?;
        let (conn, code, mut send, mut recv) = scene.raw_session(&token, false).await?;
        assert_eq!(code, "");
        // The control stream works: a ping gets its pong.
        let ping = ClientControl {
            kind: Some(client_control::Kind::Ping(Ping {
                nonce: 41,
                ..Default::default()
            })),
        };
        write_frame(&mut send, &ping, 4096).await?;
        let pong: ServerControl =
            tokio::time::timeout(WAIT, read_required(&mut recv, 4096)).await??;
        assert!(
            matches!(pong.kind, Some(server_control::Kind::Pong(p)) if p.nonce == 41),
            "{name}: {pong:?}"
        );
        send.write_all(garbage).await?;
        if name == "truncated" {
            send.finish()?;
        }
        assert_closed_with(&conn, cim_core::close::PROTOCOL, "bad control frame", name).await?;
    }
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_stream_carries_only_sends_and_only_so_many() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (_, token) = scene.http_login("batcher").await?;
    let (conn, result, control_send, control_recv) =
        scene.cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    let most = result.max_sends_per_stream as usize;
    assert!(most > 1, "the server takes one send per stream");
    let to = scene.bob.info().user_id;
    let send = |id: u64| ClientRequest {
        kind: Some(client_request::Kind::Send(ChatMessage {
            client_msg_id: id,
            target: Some(Target::ToUser(to)),
            body: format!("batched {id}"),
        })),
    };
    let pull = ClientRequest {
        kind: Some(client_request::Kind::Pull(cim_proto::v1::Pull {
            after_seq: 0,
            limit: 10,
            trim_up_to: None,
        })),
    };
    // Three sends, then a pull; then one send more than a stream may carry. Each time the
    // sends before the offending frame are stored and acked in order, then a refusal takes
    // the offending frame's place and the stream ends.
    let mut next_id = 1;
    let mut delivered = Vec::new();
    for (sends, offender) in [(3, pull), (most, send(0))] {
        let (mut tx, mut rx) = conn.open_bi().await?;
        let ids: Vec<u64> = (next_id..next_id + sends as u64).collect();
        next_id += sends as u64;
        for &id in &ids {
            write_frame(&mut tx, &send(id), 4096).await?;
        }
        write_frame(&mut tx, &offender, 4096).await?;
        tx.finish()?;
        for &id in &ids {
            let ack: SendAck = tokio::time::timeout(WAIT, read_required(&mut rx, 4096)).await??;
            assert_eq!((ack.client_msg_id, ack.code.as_str()), (id, ""));
        }
        let refusal: SendAck = tokio::time::timeout(WAIT, read_required(&mut rx, 4096)).await??;
        assert_eq!(
            (refusal.client_msg_id, refusal.code.as_str()),
            (0, "protocol")
        );
        let end = tokio::time::timeout(WAIT, read_frame::<SendAck, _>(&mut rx, 4096)).await??;
        assert!(end.is_none(), "more after the refusal: {end:?}");
        delivered.extend(ids.iter().map(|id| format!("batched {id}")));
    }
    let mut got = Vec::new();
    for _ in 0..delivered.len() {
        got.push(next_message(&mut scene.bob_events).await?.body);
    }
    got.sort();
    delivered.sort();
    assert_eq!(got, delivered, "every acked send, once");
    drop((control_send, control_recv));
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_whose_acks_go_unread_are_still_stored() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (_, token) = scene.http_login("deaf").await?;
    // A client that gives the server room for 16 bytes per stream and never reads its send
    // stream: the first ack cannot even be written.
    let roots = tls::load_roots(&scene.cluster.embedded.ca)?;
    let mut config = transport::client_config(
        tls::client_config(roots, &[cim_core::ALPN_CLIENT], None)?,
        Link::Client,
    )?;
    let mut tight = transport::transport_config(Link::Client, quinn::Side::Client);
    tight.stream_receive_window(quinn::VarInt::from_u32(16));
    config.transport_config(std::sync::Arc::new(tight));
    let endpoint = transport::client_endpoint("127.0.0.1:0".parse()?, config)?;
    let conn = endpoint.connect(scene.server_addr(), "127.0.0.1")?.await?;
    let (mut control, mut control_recv) = conn.open_bi().await?;
    let login = ClientControl {
        kind: Some(client_control::Kind::Login(cim_proto::v1::Login {
            token,
            last_seen_seq: 0,
            token_renewal: false,
        })),
    };
    write_frame(&mut control, &login, 4096).await?;
    let reply: ServerControl =
        tokio::time::timeout(WAIT, read_required(&mut control_recv, 4096)).await??;
    assert!(
        matches!(&reply.kind, Some(server_control::Kind::LoginResult(r)) if r.code.is_empty()),
        "{reply:?}"
    );
    let to = scene.bob.info().user_id;
    let (mut tx, _unread) = conn.open_bi().await?;
    for id in 1..=32u64 {
        let request = ClientRequest {
            kind: Some(client_request::Kind::Send(ChatMessage {
                client_msg_id: id,
                target: Some(Target::ToUser(to)),
                body: format!("unread {id}"),
            })),
        };
        write_frame(&mut tx, &request, 4096).await?;
    }
    tx.finish()?;
    // Every send goes on to the router and is stored although its ack waits.
    let mut got = Vec::new();
    for _ in 0..32 {
        got.push(next_message(&mut scene.bob_events).await?.body);
    }
    got.sort();
    let mut want: Vec<String> = (1..=32).map(|id| format!("unread {id}")).collect();
    want.sort();
    assert_eq!(got, want);
    drop((control, control_recv));
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_sends_among_shared_ones_are_refused_alone() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (sharer, _events) = scene.cluster.user("sharer").await?;
    let sharer = std::sync::Arc::new(sharer);
    let to = scene.bob.info().user_id;
    // The first send goes out at once; the others start while it waits for its ack, so they
    // queue and share a stream, three of 60 KiB (over the server's frame limit, under the
    // client's) among them: more than a stream's flow-control window, so the server stops
    // the stream before the client has written it all.
    let big = "x".repeat(60 * 1024);
    let is_big = |i: usize| [2, 4, 6].contains(&i);
    let mut sends = Vec::new();
    for i in 0..9 {
        let sharer = sharer.clone();
        let body = if is_big(i) {
            big.clone()
        } else {
            format!("small {i}")
        };
        sends.push(tokio::spawn(
            async move { sharer.send_private(to, &body).await },
        ));
    }
    let mut delivered = Vec::new();
    for (i, send) in sends.into_iter().enumerate() {
        let result = tokio::time::timeout(WAIT, send).await??;
        if is_big(i) {
            match result {
                Err(ClientError::SendRefused { code, .. }) => assert_eq!(code, "too_large"),
                other => panic!("oversized send {i}: {other:?}"),
            }
        } else {
            result?;
            delivered.push(format!("small {i}"));
        }
    }
    // No check of `sends_shared`: it counts acked sends that shared a stream, and the small
    // sends of a stream stopped at a big one may all be acked later, each alone.
    let mut got = Vec::new();
    for _ in 0..delivered.len() {
        got.push(next_message(&mut scene.bob_events).await?.body);
    }
    got.sort();
    assert_eq!(got, delivered, "every acked send, once");
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_streams_at_once_do_not_hurt_anyone_else() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (_, token) = scene.http_login("flooder").await?;
    let (conn, code) = scene.raw_login(&token).await?;
    assert_eq!(code, "");
    let mut tasks = Vec::new();
    for _ in 0..10_000 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let (mut send, _recv) = conn.open_bi().await?;
            send.write_all(b"\0\0\0\x05garb").await?;
            send.finish()?;
            anyhow::Ok(())
        }));
    }
    let opened = tokio::time::timeout(Duration::from_secs(120), futures_join(tasks)).await?;
    // Each stream got its credit and its garbage in (the server resets each one, as its frame
    // ends early), and the connection stays: a broken stream is no reason to drop the session.
    assert_eq!(opened, 10_000);
    assert!(conn.close_reason().is_none(), "{:?}", conn.close_reason());
    scene.still_chatting().await
}

async fn futures_join(tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>) -> usize {
    let mut ok = 0;
    for t in tasks {
        if matches!(t.await, Ok(Ok(()))) {
            ok += 1;
        }
    }
    ok
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_udp_at_the_server_port_is_ignored() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..10_000usize {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 1 + (seed as usize % 1400);
        let datagram: Vec<u8> = (0..len)
            .map(|j| (seed >> (j % 56)) as u8 ^ i as u8)
            .collect();
        socket.send_to(&datagram, scene.server_addr()).await?;
    }
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_json_and_wrong_types_get_clear_errors_on_every_endpoint() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let api = scene.api();
    let token = scene.alice.token();
    let bad_bodies = [
        "not json",
        "{",
        "[]",
        "null",
        r#"{"name": 5, "password": true}"#,
        r#"{"to": "x", "body": 1}"#,
        "\u{0}\u{1}",
    ];
    for path in JSON_BODY_ROUTES {
        for body in bad_bodies {
            let (status, reply) = api
                .raw(Method::POST, path, Bytes::from(body), Some(&token))
                .await?;
            let json: serde_json::Value = serde_json::from_slice(&reply)?;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{path} {body:?}: {json}");
            assert!(
                json["code"] == "bad_json" || json["code"] == "bad_request",
                "{path} {body:?}: {json}"
            );
            assert!(json["message"].is_string());
        }
        let huge = Bytes::from(vec![b'x'; 66_000]);
        let (status, _) = api.raw(Method::POST, path, huge, Some(&token)).await?;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{path}");
    }
    for (method, path) in [
        (Method::GET, "/api/users/online?prefix=%ZZ&x[]=1"),
        (Method::POST, "/api/logout"),
        (Method::GET, "/api/users/online"),
    ] {
        let (status, reply) = api
            .raw(method.clone(), path, Bytes::new(), Some("not-a-token"))
            .await?;
        let json: serde_json::Value = serde_json::from_slice(&reply)?;
        assert!(status.is_client_error(), "{method} {path}: {status} {json}");
        assert!(json["code"].is_string());
    }
    let (status, _) = api
        .raw(Method::GET, "/no/such/thing", Bytes::new(), None)
        .await?;
    assert_eq!(status, StatusCode::NOT_FOUND);
    let (status, _) = api
        .raw(Method::DELETE, "/api/login", Bytes::new(), None)
        .await?;
    assert!(status.is_client_error());
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_brute_force_hits_the_limit() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let config = scene.cluster.client_config();
    cim_client::register(&config, "victim", "right-password").await?;
    for _ in 0..5 {
        let err = Client::login(&config, "victim", "guess", LoginOptions::default())
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), Some("invalid_credentials"), "{err}");
    }
    // Locked for the rest of the minute, even with the right password.
    let login = Client::login(&config, "victim", "right-password", LoginOptions::default());
    assert_too_many(login.await.err(), "too_many_attempts");
    // Others are unaffected.
    cim_client::register(&config, "carol", "password").await?;
    Client::login(&config, "carol", "password", LoginOptions::default()).await?;
    scene.still_chatting().await
}

/// A connection from an address that has used half its share is told to validate the address
/// first (a QUIC Retry), as are all once many unvalidated handshakes are under way: spoofed
/// first packets cannot fill another address's share or the server. Real clients go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crowded_addresses_validate_before_they_get_a_place() -> anyhow::Result<()> {
    let mut scene = Scene::with(|config| config.server_limits.max_connections_per_ip = 4).await?;
    let api = RouterApi::new(&scene.cluster.client_config())?;
    let retried = || async {
        let metrics = cim_integration_tests::router_metrics(&api).await?;
        cim_integration_tests::metric_value(&metrics, "cim_server_retried_connections_total")
    };
    // Alice and Bob hold two of 127.0.0.1's four places: Carol and Dave validate first.
    assert_eq!(retried().await?, 0.0);
    let (carol, _carol_events) = scene.cluster.user("carol").await?;
    assert_eq!(retried().await?, 1.0);
    let (_dave, _dave_events) = scene.cluster.user("dave").await?;
    assert_eq!(retried().await?, 2.0);
    // The address is full: the next is refused, validated or not.
    let config = scene.cluster.client_config();
    cim_client::register(&config, "eve", "password").await?;
    let refused = Client::login(&config, "eve", "password", LoginOptions::default()).await;
    let refused = refused.err().expect("a fifth connection from one address");
    assert!(
        refused
            .to_string()
            .contains("refused to accept a new connection"),
        "{refused}"
    );
    carol
        .send_private(scene.bob.info().user_id, "validated")
        .await?;
    assert_eq!(next_message(&mut scene.bob_events).await?.body, "validated");
    scene.still_chatting().await
}

/// Checks that a call was refused `429` with `code`.
fn assert_too_many(err: Option<ClientError>, code: &str) {
    let err = err.expect("refused");
    assert!(
        matches!(&err, ClientError::Api { status: 429, .. }),
        "{err}"
    );
    assert_eq!(err.code(), Some(code), "{err}");
}

/// Registrations from one address and API requests of one user are limited: an account
/// factory or a bot flooding the HTTP send API gets `429 rate_limited`, and nothing it was
/// refused is stored. Re-logins with one token count against its login the same way (their
/// refusals other than a bad token are not counted against the address).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_and_api_floods_are_limited() -> anyhow::Result<()> {
    let mut scene = Scene::with(|config| {
        config.api_limits = cim_router::ApiLimits {
            registrations_per_ip: 3,
            requests_per_user: 5,
        }
    })
    .await?;
    // Alice and Bob took two registrations of this minute; Dave takes the last.
    let (_, token) = scene.cluster.http_login("dave").await?;
    let config = scene.cluster.client_config();
    let register = cim_client::register(&config, "eve", "password");
    assert_too_many(register.await.err(), "rate_limited");

    // Dave floods the send API: five a second go through, the rest are refused.
    let api = RouterApi::new(&config)?;
    let post = |body: serde_json::Value| {
        api.raw(
            Method::POST,
            "/api/messages",
            body.to_string().into(),
            Some(&token),
        )
    };
    let bob = scene.bob.info().user_id;
    let (mut accepted, mut refused) = (Vec::new(), 0);
    let flood_began = std::time::Instant::now();
    for i in 0..20 {
        let body = serde_json::json!({"to": bob, "body": format!("flood {i}")});
        let (status, reply) = post(body).await?;
        match status {
            StatusCode::OK => {
                // Bob is online: his message is pushed at once, and the answer says so.
                let reply: serde_json::Value = serde_json::from_slice(&reply)?;
                assert_eq!(reply["recipient_online"], true, "{reply}");
                accepted.push(format!("flood {i}"));
            }
            StatusCode::TOO_MANY_REQUESTS => {
                let reply: serde_json::Value = serde_json::from_slice(&reply)?;
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                refused += 1;
            }
            other => anyhow::bail!("unexpected {other}: {reply:?}"),
        }
    }
    // Five in each window of a second the twenty requests spanned: one or two when they are
    // quick, more on a slow machine (one after another, each its own HTTPS connection).
    let windows = flood_began.elapsed().as_secs() as usize + 2;
    assert!(
        (5..=5 * windows).contains(&accepted.len()),
        "{accepted:?} in {windows} windows at most"
    );
    assert_eq!(accepted.len() + refused, 20);
    let mut delivered = Vec::new();
    for _ in 0..accepted.len() {
        delivered.push(next_message(&mut scene.bob_events).await?.body);
    }
    assert_eq!(delivered, accepted, "what was accepted arrives, in order");
    // Others are unaffected; so is Dave a second later.
    scene.still_chatting().await?;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let body = serde_json::json!({"to": bob, "body": "calm again"});
    let (status, _) = post(body).await?;
    assert_eq!(status, StatusCode::OK);

    assert_eq!(
        next_message(&mut scene.bob_events).await?.body,
        "calm again"
    );
    // A broadcast costs fifty requests, as on a server, or a whole second's under a lower
    // limit: after another request this second it is refused, alone in a second it goes.
    let body = serde_json::json!({"group": "all", "body": "everyone!"});
    let (status, _) = post(body.clone()).await?;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, reply) = post(body).await?;
    assert_eq!(status, StatusCode::OK, "{reply:?}");
    // Over the limit again, Dave can still log out.
    for _ in 0..6 {
        api.raw(Method::GET, "/api/groups", Default::default(), Some(&token))
            .await?;
    }
    let (status, _) = api
        .raw(
            Method::POST,
            "/api/logout",
            Default::default(),
            Some(&token),
        )
        .await?;
    assert_eq!(status, StatusCode::OK);
    // Someone still holding the ended login's token cannot use up Dave's next login's limit.
    for _ in 0..10 {
        let (status, _) = api
            .raw(Method::GET, "/api/groups", Default::default(), Some(&token))
            .await?;
        assert_ne!(status, StatusCode::OK, "an ended login's token is refused");
    }
    let login = serde_json::json!({"name": "dave", "password": "password"});
    let grant: serde_json::Value = api
        .call(Method::POST, "/api/login", Some(&login), None)
        .await?;
    let token = grant["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("login without a token: {grant}"))?;
    let (status, reply) = api
        .raw(Method::GET, "/api/groups", Default::default(), Some(token))
        .await?;
    assert_eq!(status, StatusCode::OK, "{reply:?}");
    // Re-logins with Dave's token (one wins, the rest are refused: that login has ended)
    // count against his login as its API calls do, before the store is asked. All at once:
    // one after another, a slow machine could spread them over more than four seconds.
    let mut relogins = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let (api, token) = (api.clone(), token.to_string());
        relogins.spawn(async move {
            api.raw(
                Method::POST,
                "/api/relogin",
                Default::default(),
                Some(&token),
            )
            .await
        });
    }
    let mut limited = 0;
    while let Some(answer) = relogins.join_next().await {
        let (status, reply) = answer??;
        if status == StatusCode::TOO_MANY_REQUESTS {
            let reply: serde_json::Value = serde_json::from_slice(&reply)?;
            assert_eq!(reply["code"], "rate_limited", "{reply}");
            limited += 1;
        }
    }
    assert!(limited >= 10, "{limited} of 20 re-logins limited");
    Ok(())
}

/// A message stream whose frame never arrives in full (a length, then nothing) is reset
/// after the server's frame timeout (10 s), freeing the frame's buffer and its task. Before,
/// it stayed open for as long as the session's heartbeats kept it alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_that_never_arrives_in_full_is_given_up() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (conn, mut control, mut control_recv) = scene.raw_user_session().await?;
    // The session stays alive: it pings, and reads the pongs.
    let heartbeat = tokio::spawn(async move {
        for nonce in 0.. {
            let ping = ClientControl {
                kind: Some(client_control::Kind::Ping(Ping {
                    nonce,
                    ..Default::default()
                })),
            };
            write_frame(&mut control, &ping, 4096).await?;
            let _: ServerControl = read_required(&mut control_recv, 4096).await?;
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        anyhow::Ok(())
    });
    let (mut send, mut recv) = conn.open_bi().await?;
    send.write_all(&16_000u32.to_be_bytes()).await?;
    let read = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(1024)).await;
    match read {
        Ok(Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(_)))) => {}
        other => anyhow::bail!("the half-written stream was not reset: {other:?}"),
    }
    assert!(conn.close_reason().is_none(), "the session itself ended");
    heartbeat.abort();
    scene.still_chatting().await
}

/// Pulls `limit` inbox entries after `after_seq` on a raw connection; the reply.
async fn raw_pull(
    conn: &quinn::Connection,
    after_seq: u64,
    limit: u32,
) -> anyhow::Result<PullResult> {
    let request = ClientRequest {
        kind: Some(client_request::Kind::Pull(Pull {
            after_seq,
            limit,
            trim_up_to: None,
        })),
    };
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &request, 4096).await?;
    send.finish()?;
    Ok(tokio::time::timeout(WAIT, read_required(&mut recv, 1 << 23)).await??)
}

/// A pull reply stops at about 512 KiB of text and says more waits, however many entries were
/// asked for: the server holds a reply until its client reads it, and a client asking for
/// 200 entries of 16 KiB each and never reading could pin over 3 MB a stream. The next pull
/// gets the rest, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_reply_is_capped_in_bytes() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let (carl, token) = scene.http_login("carl").await?;
    let big = "x".repeat(16_000);
    for _ in 0..40 {
        scene.alice.send_private(carl, &big).await?;
    }
    let (conn, code) = scene.raw_login(&token).await?;
    assert_eq!(code, "");
    let first = raw_pull(&conn, 0, 200).await?;
    assert!(first.more, "a capped page must say more waits");
    assert!(
        (1..40).contains(&first.deliveries.len()),
        "{} entries",
        first.deliveries.len()
    );
    let last = first.deliveries.last().map_or(0, |d| d.seq);
    let rest = raw_pull(&conn, last, 200).await?;
    let seqs: Vec<u64> = first
        .deliveries
        .iter()
        .chain(&rest.deliveries)
        .map(|d| d.seq)
        .collect();
    assert_eq!(seqs, (1..=40).collect::<Vec<u64>>());
    assert!(!rest.more);
    scene.still_chatting().await
}

/// Broadcasts to everyone online, pulls and group requests count against a session's message
/// rate: a broadcast (stored in every online inbox) as 50 sends, the others as one each.
/// Before, a session could broadcast at the full message rate, and pull or list groups with
/// no limit at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_and_pulls_count_against_the_message_rate() -> anyhow::Result<()> {
    let mut scene = Scene::with(|c| {
        c.server_limits.messages_per_sec = 20;
        c.server_limits.message_burst = 100;
    })
    .await?;
    // A broadcast takes 50 of the 100 in the bucket: two go, the third waits for the refill.
    let mut broadcast = Vec::new();
    for i in 0..3 {
        match scene.alice.send_group("all", &format!("to all {i}")).await {
            Ok(_) => broadcast.push(format!("to all {i}")),
            Err(e) if e.code() == Some("rate_limited") => {}
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(broadcast.len(), 2, "{broadcast:?}");
    for body in &broadcast {
        assert_eq!(&next_message(&mut scene.bob_events).await?.body, body);
    }

    let (conn, _control, _control_recv) = scene.raw_user_session().await?;
    let mut limited = 0;
    for _ in 0..150 {
        let reply = raw_pull(&conn, 0, 10).await?;
        match reply.code.as_str() {
            "" => {}
            "rate_limited" => limited += 1,
            other => anyhow::bail!("unexpected pull answer {other}: {}", reply.message),
        }
    }
    assert!(limited > 0, "no pull was throttled");
    scene.still_chatting().await
}

/// A join or a leave, told to the group's other members, costs ten sends: a session toggling
/// its membership is throttled long before one sending group messages would be. Other group
/// requests cost one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_count_ten_against_the_message_rate() -> anyhow::Result<()> {
    let mut scene = Scene::with(|c| {
        c.server_limits.messages_per_sec = 1;
        c.server_limits.message_burst = 35;
        c.api_limits.requests_per_user = 20;
    })
    .await?;
    scene.alice.create_group("toggle").await?;
    let mut changes = 0;
    let refused = loop {
        let change = if changes % 2 == 0 {
            scene.bob.join_group("toggle").await
        } else {
            scene.bob.leave_group("toggle").await
        };
        match change {
            Ok(()) => changes += 1,
            Err(e) => break e,
        }
        anyhow::ensure!(changes < 10, "no join or leave was throttled");
    };
    assert_eq!(refused.code(), Some("rate_limited"), "{refused:?}");
    // 35 = 3 x 10 + 5, and the rest pays for plain requests.
    assert_eq!(changes, 3);
    for _ in 0..4 {
        scene.bob.my_groups().await?;
    }

    // Over HTTP, against 20 requests a second: two changes fit in a second, and sixty in a
    // row (at a few milliseconds each) pass that, where as plain requests they would not.
    // (Another group: Bob, still in the first, would hear of these.)
    scene.alice.create_group("over_http").await?;
    let (_, token) = scene.http_login("carol").await?;
    let api = scene.api();
    let mut refused = None;
    for i in 0..60 {
        let path = if i % 2 == 0 {
            "/api/groups/over_http/join"
        } else {
            "/api/groups/over_http/leave"
        };
        if let Err(e) = api
            .call::<(), serde_json::Value>(Method::POST, path, None, Some(&token))
            .await
        {
            refused = Some(e);
            break;
        }
    }
    assert_too_many(refused, "rate_limited");
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_flood_is_throttled_then_disconnected() -> anyhow::Result<()> {
    // One send a second after a burst of 20: the 100 refusals in a row that end the session
    // must not be broken by a refill, however slowly a loaded machine runs them (at 20 a
    // second, a send slower than half a millisecond let one through and reset the count).
    let mut scene = Scene::with(|c| {
        c.server_limits.messages_per_sec = 1;
        c.server_limits.message_burst = 20;
    })
    .await?;
    let config = scene.cluster.client_config();
    cim_client::register(&config, "spammer", "password").await?;
    let mut quiet = config.clone();
    quiet.reconnect = false;
    let (spammer, mut spammer_events) =
        Client::login(&quiet, "spammer", "password", LoginOptions::default()).await?;
    let to = scene.bob.info().user_id;
    let mut limited = 0;
    let mut cut_off = false;
    for i in 0..400 {
        match spammer.send_private(to, &format!("spam {i}")).await {
            Ok(_) => {}
            Err(e) if e.code() == Some("rate_limited") => limited += 1,
            Err(_) => {
                cut_off = true;
                break;
            }
        }
    }
    assert!(limited > 0, "no send was throttled");
    assert!(cut_off, "a sender that keeps flooding must be disconnected");
    // The send that failed was cut off by the server ending the session, not by a timeout.
    match next_event(&mut spammer_events, WAIT).await? {
        Event::Disconnected(reason) => assert!(reason.contains("rate limit"), "{reason}"),
        other => panic!("expected the session to end, got {other:?}"),
    }
    // Bob got the spam that was accepted, then Alice's message: drain until it shows up.
    scene.sent += 1;
    let body = format!("still fine {}", scene.sent);
    scene.alice.send_private(to, &body).await?;
    loop {
        let m = next_message(&mut scene.bob_events).await?;
        if m.body == body {
            break;
        }
        assert!(m.body.starts_with("spam "), "{m:?}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_renewals_go_only_to_clients_that_take_them() -> anyhow::Result<()> {
    let mut scene = Scene::new().await?;
    let key = scene.token_key();
    for (name, takes) in [("older", false), ("newer", true)] {
        // The router's token for this login, re-signed to expire in a minute: under half of
        // its ten-minute lifetime, so a renewal is due at once.
        let (_, token) = scene.http_login(name).await?;
        let mut claims = key.verify(&token, now_ms(), None).unwrap();
        claims.expires_at_ms = now_ms() + 60_000;
        let (_conn, code, mut send, mut recv) =
            scene.raw_session(&key.sign(&claims), takes).await?;
        assert_eq!(code, "");
        if !takes {
            // A renewal is due at login and again at each ping (after its pong): with none
            // sent, each ping's pong is the next frame.
            for nonce in [1, 2] {
                let ping = ClientControl {
                    kind: Some(client_control::Kind::Ping(Ping {
                        nonce,
                        ..Default::default()
                    })),
                };
                write_frame(&mut send, &ping, 4096).await?;
                let next: ServerControl =
                    tokio::time::timeout(WAIT, read_required(&mut recv, 4096)).await??;
                match next.kind {
                    Some(server_control::Kind::Pong(pong)) => assert_eq!(pong.nonce, nonce),
                    other => panic!("a client that takes no renewals got {other:?}"),
                }
            }
            continue;
        }
        let next: ServerControl =
            tokio::time::timeout(WAIT, read_required(&mut recv, 4096)).await??;
        match next.kind {
            Some(server_control::Kind::TokenRenewal(renewal)) => {
                let fresh = key.verify(&renewal.token, now_ms(), None).unwrap();
                assert_eq!(fresh.session_id, claims.session_id);
                assert!(fresh.expires_at_ms > now_ms() + 500_000, "{fresh:?}");
            }
            other => panic!("a client that takes renewals got {other:?}"),
        }
    }
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_never_acked_does_not_hold_up_the_next() -> anyhow::Result<()> {
    // The raw session below sends no pings: keep the server from ending it meanwhile.
    let mut scene = Scene::with(|c| c.heartbeat_timeout = Duration::from_secs(30)).await?;
    let (carol, token) = scene.http_login("carol").await?;
    let (conn, code, _control_send, _control_recv) = scene.raw_session(&token, false).await?;
    assert_eq!(code, "");
    let delivery = async |body: &str| -> anyhow::Result<(quinn::SendStream, quinn::RecvStream)> {
        scene.alice.send_private(carol, body).await?;
        // The server keeps one delivery stream in flight and waits for its ack (10 s at most)
        // before the next, unless that ack is late: then a second stream carries the queue. A
        // guard against waiting out the unanswered stream, not a timing check.
        let (send, mut recv) = tokio::time::timeout(Duration::from_secs(5), conn.accept_bi())
            .await
            .map_err(|_| anyhow::anyhow!("no delivery stream for {body:?}"))??;
        let batch: DeliveryBatch = read_required(&mut recv, 65_536).await?;
        let bodies: Vec<&str> = batch.deliveries.iter().map(|d| d.body.as_str()).collect();
        assert_eq!(bodies, [body]);
        Ok((send, recv))
    };
    // Carol takes the first delivery and never acks it.
    let _held = delivery("first").await?;
    let _second = delivery("second").await?;
    scene.still_chatting().await
}

/// Pings on a raw session's control stream and returns its Pong's `missed_up_to`.
async fn pong_missed_up_to(
    control_send: &mut quinn::SendStream,
    control_recv: &mut quinn::RecvStream,
    nonce: u64,
) -> anyhow::Result<u64> {
    let ping = ClientControl {
        kind: Some(client_control::Kind::Ping(Ping {
            nonce,
            ..Default::default()
        })),
    };
    write_frame(control_send, &ping, 4096).await?;
    loop {
        let frame: ServerControl = read_required(control_recv, 4096).await?;
        if let Some(server_control::Kind::Pong(pong)) = frame.kind
            && pong.nonce == nonce
        {
            return Ok(pong.missed_up_to);
        }
    }
}

/// A delivery the server gave up on (here the client refused its stream) is named in the next
/// Pong: a client that stays connected and gets no later message would otherwise never learn
/// to pull it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_delivery_is_named_in_the_next_pong() -> anyhow::Result<()> {
    let mut scene = Scene::with(|c| c.heartbeat_timeout = Duration::from_secs(30)).await?;
    let (carol, token) = scene.http_login("carol").await?;
    let (conn, code, mut control_send, mut control_recv) = scene.raw_session(&token, false).await?;
    assert_eq!(code, "");
    let mut nonce = 0;
    let mut missed_up_to = async || -> anyhow::Result<u64> {
        nonce += 1;
        pong_missed_up_to(&mut control_send, &mut control_recv, nonce).await
    };
    assert_eq!(missed_up_to().await?, 0);
    scene.alice.send_private(carol, "refused").await?;
    let (mut send, mut recv) = tokio::time::timeout(WAIT, conn.accept_bi()).await??;
    let batch: DeliveryBatch = read_required(&mut recv, 65_536).await?;
    let seq = batch.deliveries[0].seq;
    send.reset(quinn::VarInt::from_u32(0))?;
    recv.stop(quinn::VarInt::from_u32(0))?;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let missed = missed_up_to().await?;
        if missed == seq {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "missed_up_to stayed {missed}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    scene.still_chatting().await
}

/// A client that takes none of its deliveries (it accepts no stream, acks nothing) holds about
/// a megabyte of them on the server, not its queue's 4,096 of the largest messages (64 MiB):
/// what comes past it is dropped at once and named in the next Pong, long before the delivery
/// timeout (10 s) would drop the lot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_takes_nothing_holds_a_megabyte_not_its_whole_queue() -> anyhow::Result<()> {
    let mut scene = Scene::with(|c| c.heartbeat_timeout = Duration::from_secs(30)).await?;
    let (carol, token) = scene.http_login("carol").await?;
    let (_conn, code, mut control_send, mut control_recv) =
        scene.raw_session(&token, false).await?;
    assert_eq!(code, "");
    let started = tokio::time::Instant::now();
    let body = "x".repeat(16_000);
    let n = 100;
    for _ in 0..n {
        scene.alice.send_private(carol, &body).await?;
    }
    // Carol's inbox seqs are 1..=n: the last was dropped as it came.
    let mut nonce = 0;
    loop {
        nonce += 1;
        let missed = pong_missed_up_to(&mut control_send, &mut control_recv, nonce).await?;
        if missed == n {
            break;
        }
        // The clock started before the first send, so before the first delivery stream
        // opened: until the server's delivery timeout (10 s) has passed, nothing was dropped
        // by it, and a drop was the queue refusing the message.
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "missed_up_to stayed {missed}: the queue took everything"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    scene.still_chatting().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_login_alone_on_the_server_is_told_its_inbox_is_caught_up() -> anyhow::Result<()> {
    let scene = Scene::new().await?;
    let (_, token) = scene.http_login("carol").await?;
    // Nothing ever stored for Carol, and no session of hers on the server: she may continue
    // from seq 0 without pulling.
    let (_first, result, _send, _recv) = scene.cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    assert_eq!(result.inbox_caught_up_to, Some(0));
    // The same session again on a second connection while the first is there: it replaces the
    // first only once the router confirmed it, so pushes in between may have gone to the first,
    // and it is told nothing (the client pulls).
    let (_second, result, _send2, _recv2) = scene.cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    assert_eq!(result.inbox_caught_up_to, None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_the_router_refuses_leaves_no_session_behind() -> anyhow::Result<()> {
    let scene = Scene::new().await?;
    let (_, replaced) = scene.http_login("dora").await?;
    let body = serde_json::json!({"name": "dora", "password": "password", "takeover": true});
    let grant: serde_json::Value = scene
        .api()
        .call(Method::POST, "/api/login", Some(&body), None)
        .await?;
    let current = grant["token"].as_str().unwrap().to_string();
    // The replaced login's token is still signed and unexpired: the server takes its session
    // in before asking the router, which refuses it.
    let (_refused, result, _send, _recv) = scene.cluster.raw_login(0, &replaced, false).await?;
    assert_ne!(result.code, "", "a replaced login must be refused");
    // Had the refused session stayed in the server's map, the current login would find
    // another session of Dora's there and not be told that its inbox is caught up.
    let (_conn, result, _send2, _recv2) = scene.cluster.raw_login(0, &current, false).await?;
    assert_eq!(result.code, "");
    assert_eq!(result.inbox_caught_up_to, Some(0));
    Ok(())
}
