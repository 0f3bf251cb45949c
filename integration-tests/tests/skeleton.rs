//! The whole CIM flow over real QUIC and HTTPS on 127.0.0.1: register, login with server
//! assignment, group and private chat, online users, duplicate login, logout, bad
//! credentials, token re-login and its refusals (also when re-logins race with one token),
//! dead-server detection, two real console clients chatting, TLS resumption of a client's API
//! calls, blocking a user, and read receipts.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::{Context, bail};
use cim_client::{Client, ClientError, Event, Events, LoginOptions, ReadReceipt, RouterApi};
use cim_integration_tests::{
    Backend, Proc, TestCluster, WAIT, eventually, metric_value, next_event, next_message,
    router_metrics,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registration_refuses_taken_names_and_login_assigns_a_server() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2).await?;
    let config = cluster.client_config();
    let alice = cim_client::register(&config, "alice", "password").await?;
    let bob = cim_client::register(&config, "bob", "password").await?;
    assert_ne!(alice, bob);
    let err = cim_client::register(&config, "alice", "other-password")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("name_taken"), "{err}");
    let err = cim_client::register(&config, "bad name!", "password")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("bad_request"), "{err}");

    let (client, _events) =
        Client::login(&config, "alice", "password", LoginOptions::default()).await?;
    let servers: Vec<&String> = cluster.embedded.servers.iter().map(|(id, _)| id).collect();
    assert!(servers.contains(&&client.info().server_id));
    assert_eq!(client.info().user_id, alice);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_message_reaches_everyone_else_and_private_only_its_target() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2).await?;
    let (alice, mut alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let (carol, mut carol_events) = cluster.user("carol").await?;
    // Round robin spreads the three over both servers, so delivery crosses servers.
    assert_ne!(alice.info().server_id, bob.info().server_id);

    let ack = alice.send_group("all", "hello everyone").await?;
    assert_eq!(ack.recipients, 2);
    for events in [&mut bob_events, &mut carol_events] {
        let m = next_message(events).await?;
        assert_eq!(
            (m.from_name.as_str(), m.body.as_str()),
            ("alice", "hello everyone")
        );
        assert_eq!(m.group.as_deref(), Some("all"));
        assert_eq!(m.from_user, alice.info().user_id);
    }

    bob.send_private(carol.info().user_id, "just for carol")
        .await?;
    let m = next_message(&mut carol_events).await?;
    assert_eq!(
        (m.from_name.as_str(), m.body.as_str(), m.group),
        ("bob", "just for carol", None)
    );

    // Streams are ordered per recipient only through later traffic: the next thing alice
    // and bob see must be these markers, proving they got neither earlier message.
    carol.send_private(alice.info().user_id, "marker-a").await?;
    carol.send_private(bob.info().user_id, "marker-b").await?;
    assert_eq!(next_message(&mut alice_events).await?.body, "marker-a");
    assert_eq!(next_message(&mut bob_events).await?.body, "marker-b");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_users_track_login_and_logout() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2).await?;
    let config = cluster.client_config();
    cim_client::register(&config, "dave", "password").await?; // registered, never online
    let (alice, _a) = cluster.user("alice").await?;
    let (bob, _b) = cluster.user("bob").await?;
    let names =
        |users: Vec<cim_client::OnlineUser>| users.into_iter().map(|u| u.name).collect::<Vec<_>>();
    assert_eq!(names(alice.online_users("").await?), ["alice", "bob"]);
    assert_eq!(names(alice.online_users("b").await?), ["bob"]);
    // Pages by name: a page of one says more follow, the page after the last name is the end.
    let first = alice.online_page("", "", Some(1)).await?;
    assert_eq!(
        (names(first.users), first.more),
        (vec!["alice".into()], true)
    );
    let second = alice.online_page("", "alice", Some(1)).await?;
    assert_eq!(
        (names(second.users), second.more),
        (vec!["bob".into()], false)
    );
    let refused = alice.online_page("", "", Some(1001)).await.unwrap_err();
    assert_eq!(refused.code(), Some("bad_request"), "{refused}");

    bob.logout().await?;
    assert_eq!(names(alice.online_users("").await?), ["alice"]);

    // A session that simply closes (no logout) leaves the online list too.
    let (carol, _c) = cluster.user("carol").await?;
    assert_eq!(names(alice.online_users("").await?), ["alice", "carol"]);
    carol.close().await;
    eventually(WAIT, || async {
        (names(alice.online_users("").await.ok()?) == ["alice"]).then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_login_is_refused_unless_it_takes_over() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2).await?;
    let config = cluster.client_config();
    let (first, mut first_events) = cluster.user("alice").await?;

    let refused = Client::login(&config, "alice", "password", LoginOptions::default()).await;
    let err = refused.err().expect("second login must be refused");
    assert!(
        matches!(&err, ClientError::Api { status: 409, .. }),
        "{err}"
    );
    assert_eq!(err.code(), Some("already_online"));

    let (second, _second_events) = Client::login(
        &config,
        "alice",
        "password",
        LoginOptions { takeover: true },
    )
    .await?;
    match next_event(&mut first_events, WAIT).await? {
        Event::Kicked(reason) => assert!(reason.contains("elsewhere"), "{reason}"),
        other => panic!("expected a kick, got {other:?}"),
    }
    // The kicked session's events end, though the application still holds its client (an
    // event loop like `run_handler` returns).
    let after_kick = tokio::time::timeout(WAIT, first_events.next()).await;
    assert_eq!(after_kick.ok(), Some(None), "events go on after the kick");
    // The old session's token can no longer act; the new one can.
    let api = cim_client::RouterApi::new(&config)?;
    let stale = api.online_users(&first.token(), "").await.unwrap_err();
    assert_eq!(stale.code(), Some("unauthorized"), "{stale}");
    assert_eq!(second.online_users("").await?.len(), 1);
    drop(first);
    let (bob, mut bob_events) = cluster.user("bob").await?;
    second
        .send_private(bob.info().user_id, "from the new session")
        .await?;
    assert_eq!(
        next_message(&mut bob_events).await?.body,
        "from the new session"
    );
    Ok(())
}

/// A user's route on a server the router has not linked yet (it just started, or is still
/// dialing) still refuses a second login: the server is in discovery, so the session may
/// well be live. Before, only linked servers counted, and the route was released: a second
/// login came in beside the live session, with no kick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_on_a_server_not_linked_yet_refuses_a_second_login() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let config = cluster.client_config();
    let ula = cim_client::register(&config, "ula", "password").await?;
    // A server in discovery that the router cannot reach (nothing listens there).
    let unreachable = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    let ghost = cim_core::discovery::ServerInfo {
        id: "ghost".into(),
        client_addr: unreachable,
        internal_addr: unreachable,
        load: 0,
        incarnation: 0,
    };
    cluster.embedded.discovery.register_server(ghost).await?;
    let store = &cluster.embedded.store;
    let route = cim_router::store::Route {
        server_id: "ghost".into(),
        session_id: 7,
        confirmed: false,
    };
    store
        .claim_route(
            ula,
            route,
            Duration::from_secs(30),
            false,
            Duration::from_secs(3600),
        )
        .await?;
    assert!(
        store
            .confirm_route(ula, 7, "ghost", Duration::from_secs(30))
            .await?
    );

    let refused = Client::login(&config, "ula", "password", LoginOptions::default()).await;
    let err = refused.err().context("a second login must be refused")?;
    assert_eq!(err.code(), Some("already_online"), "{err}");
    Ok(())
}

/// `POST /api/relogin` with `token`: the new token, or the refusal's status and code.
async fn relogin(api: &RouterApi, token: &str) -> Result<String, (u16, String)> {
    match api
        .call::<(), serde_json::Value>(http::Method::POST, "/api/relogin", None, Some(token))
        .await
    {
        Ok(grant) => Ok(grant["token"].as_str().unwrap_or_default().to_string()),
        Err(ClientError::Api { status, code, .. }) => Err((status, code)),
        Err(e) => panic!("re-login failed without an answer: {e}"),
    }
}

/// A token's re-login makes a new login whose token may re-log in at once (its route is not
/// confirmed yet): a user's chain of them stops at 30 a minute, each link having left a
/// revocation mark and a kick behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_token_re_logins_is_limited_per_user() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let config = cluster.client_config();
    let api = RouterApi::new(&config)?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let mut token = alice.token();
    alice.close().await;
    token = eventually(WAIT, || {
        let (api, token) = (&api, &token);
        async move { relogin(api, token).await.ok() }
    })
    .await?;
    for link in 2..=30 {
        token = relogin(&api, &token)
            .await
            .unwrap_or_else(|e| panic!("re-login {link} refused: {e:?}"));
    }
    assert_eq!(
        relogin(&api, &token).await,
        Err((429, "rate_limited".into()))
    );
    // Someone else's chain is their own.
    let (bob, _bob_events) = cluster.user("bob").await?;
    let bobs = bob.token();
    bob.close().await;
    eventually(WAIT, || {
        let (api, bobs) = (&api, &bobs);
        async move { relogin(api, bobs).await.ok() }
    })
    .await?;
    Ok(())
}

/// An expired token whose login a newer one replaced is refused as replaced, not just as
/// expired: on a plain `unauthorized` the client logs in with its password and takeover, so a
/// laptop that slept past its token's life took the user back from the phone that logged in
/// meanwhile. The latest login's own expired token is refused as expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_of_a_replaced_login_says_it_was_replaced() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(1, Backend::Memory, |config| {
        config.token_ttl = Duration::from_secs(1);
    })
    .await?;
    let config = cluster.client_config();
    let api = RouterApi::new(&config)?;
    let (_, laptop) = cluster.http_login("ivy").await?;
    let (phone, _phone_events) =
        Client::login(&config, "ivy", "password", LoginOptions { takeover: true }).await?;
    let phone_token = phone.token();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        relogin(&api, &laptop).await,
        Err((401, "logged_in_elsewhere".into()))
    );
    assert_eq!(
        relogin(&api, &phone_token).await,
        Err((401, "unauthorized".into()))
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_re_logs_in_once_and_never_a_live_or_ended_login() -> anyhow::Result<()> {
    // On Redis: single use, takeovers and logouts are revocations stored there.
    let cluster = TestCluster::start_on(2, Backend::Redis).await?;
    let config = cluster.client_config();
    let api = RouterApi::new(&config)?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let first = alice.token();

    // While its login is connected to a live server, a token (a leaked one, say) cannot move
    // it elsewhere.
    assert_eq!(
        relogin(&api, &first).await,
        Err((409, "session_live".into()))
    );
    // Once the connection is gone, the token logs the user in again without the password.
    alice.close().await;
    let second = eventually(WAIT, || {
        let (api, first) = (&api, &first);
        async move { relogin(api, first).await.ok() }
    })
    .await?;
    // Once: the first token's login has ended.
    assert_eq!(
        relogin(&api, &first).await,
        Err((401, "session_ended".into()))
    );
    // A signature that is not the payload's is refused.
    let (payload, _) = first.split_once('.').unwrap();
    let (_, tag) = second.split_once('.').unwrap();
    assert_eq!(
        relogin(&api, &format!("{payload}.{tag}")).await,
        Err((401, "unauthorized".into()))
    );
    // A login replaced by a password login elsewhere cannot come back by token, not even
    // once the newer login has ended; the refusal says it was replaced, so that its client
    // stops rather than take the user back with its password.
    let (third, _third_events) = Client::login(
        &config,
        "alice",
        "password",
        LoginOptions { takeover: true },
    )
    .await?;
    let replaced = Err((401, "logged_in_elsewhere".into()));
    assert_eq!(relogin(&api, &second).await, replaced);
    // On the wire it is `session_ended`, which older clients know, with the reason beside it.
    let (status, body) = api
        .raw(
            http::Method::POST,
            "/api/relogin",
            Default::default(),
            Some(&second),
        )
        .await?;
    let body: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(
        (status.as_u16(), &body["code"], &body["ended"]),
        (401, &"session_ended".into(), &"replaced".into()),
        "{body}"
    );
    let last = third.token();
    third.logout().await?;
    assert_eq!(relogin(&api, &second).await, replaced);
    // A logged-out login can neither come back nor use the HTTP API.
    assert_eq!(
        relogin(&api, &last).await,
        Err((401, "session_ended".into()))
    );
    let err = api.online_users(&last, "").await.unwrap_err();
    assert_eq!(err.code(), Some("unauthorized"), "{err}");
    let (_, body) = api
        .raw(http::Method::GET, "/metrics", Default::default(), None)
        .await?;
    let metrics = String::from_utf8(body.to_vec())?;
    assert!(
        metrics.lines().any(|l| l == "cim_router_relogins_total 1"),
        "{metrics}"
    );
    Ok(())
}

/// A token whose login never connected (its client's connect failed after the re-login) re-logs
/// in again over its own pending route; a retry of that re-login (its answer lost) is told the
/// login was re-logged in, so its client falls back to the password rather than stop as
/// replaced by another device.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_re_login_learns_its_login_was_re_logged_in_not_replaced() -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(1, Backend::Redis).await?;
    let api = RouterApi::new(&cluster.client_config())?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let first = alice.token();
    alice.close().await;
    let second = eventually(WAIT, || {
        let (api, first) = (&api, &first);
        async move { relogin(api, first).await.ok() }
    })
    .await?;
    let third = relogin(&api, &second).await;
    assert!(third.is_ok(), "{third:?}");
    assert_eq!(
        relogin(&api, &second).await,
        Err((401, "session_ended".into()))
    );
    Ok(())
}

/// Re-logins racing with one token (a client's retry and its first attempt, or a leaked token
/// used at the same moment): exactly one gets a login, the others are told it has ended.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_re_logins_with_one_token_get_one_login() -> anyhow::Result<()> {
    const RACERS: usize = 8;
    let cluster = TestCluster::start_on(1, Backend::Redis).await?;
    let api = RouterApi::new(&cluster.client_config())?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let token = alice.token();
    alice.close().await;
    let live = Err((409, "session_live".to_string()));
    let deadline = tokio::time::Instant::now() + WAIT;
    let results = loop {
        let mut racers = tokio::task::JoinSet::new();
        for _ in 0..RACERS {
            let (api, token) = (api.clone(), token.clone());
            racers.spawn(async move { relogin(&api, &token).await });
        }
        let results = racers.join_all().await;
        // Until the server reports the connection closed, the login is live.
        if results.iter().any(|r| *r != live) {
            break results;
        }
        assert!(tokio::time::Instant::now() < deadline, "still live");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let granted = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(granted, 1, "{results:?}");
    let ended = Err((401, "session_ended".to_string()));
    assert!(
        results
            .iter()
            .all(|r| r.is_ok() || *r == ended || *r == live),
        "{results:?}"
    );
    assert_eq!(relogin(&api, &token).await, ended);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_credentials_get_clear_errors_and_nothing_breaks() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let config = cluster.client_config();
    cim_client::register(&config, "alice", "password").await?;
    for (name, password) in [
        ("alice", "wrong"),
        ("nobody", "password"),
        ("", ""),
        ("alice", ""),
    ] {
        let err = Client::login(&config, name, password, LoginOptions::default())
            .await
            .err()
            .expect("login must fail");
        assert!(
            matches!(&err, ClientError::Api { status: 401, .. }),
            "{name}: {err}"
        );
        assert_eq!(err.code(), Some("invalid_credentials"));
    }
    let (alice, _a) = cluster.user("bob").await?;
    assert_eq!(alice.online_users("").await?.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_refused_with_codes_and_offline_users_get_theirs_later()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let config = cluster.client_config();
    let (alice, _a) = cluster.user("alice").await?;
    let bob = cim_client::register(&config, "bob", "password").await?;
    let err = alice.send_private(999_999, "hello?").await.unwrap_err();
    assert_eq!(err.code(), Some("unknown_user"), "{err}");
    let err = alice
        .send_group("no-such-group", "hello?")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("unknown_group"), "{err}");
    let err = alice.send_group("all", "").await.unwrap_err();
    assert_eq!(err.code(), Some("bad_request"), "{err}");
    // Too large: refused by the body's length, or by its frame's before the body is read.
    let limit = cim_proto::DEFAULT_MAX_BODY_BYTES;
    for (len, why) in [
        (limit + 1, format!("{} bytes, at most {limit}", limit + 1)),
        (20_000, format!("more than {limit} bytes")),
    ] {
        let err = alice.send_group("all", &"x".repeat(len)).await.unwrap_err();
        assert_eq!(err.code(), Some("too_large"), "{err}");
        assert!(err.to_string().contains(&why), "{err}");
    }
    // The session survives all of that; a broadcast with nobody else online reaches no one.
    let broadcast = alice.send_group("all", "still here").await?;
    assert_eq!(
        (broadcast.recipients, broadcast.recipient_online),
        (0, None)
    );

    // Bob is offline: his messages are stored and acked (saying he is offline), and arrive in
    // order when he logs in.
    for i in 0..5 {
        let ack = alice.send_private(bob, &format!("offline {i}")).await?;
        assert_eq!((ack.recipients, ack.recipient_online), (1, Some(false)));
    }
    let (_bob, mut bob_events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    for i in 0..5 {
        let m = next_message(&mut bob_events).await?;
        assert_eq!((m.body, m.seq), (format!("offline {i}"), i + 1));
    }
    let ack = alice.send_private(bob, "online now").await?;
    assert_eq!(ack.recipient_online, Some(true));
    // Logged in over HTTP but not (yet) on a server: not online, nothing is pushed.
    let (carol, _token) = cluster.http_login("carol").await?;
    let ack = alice.send_private(carol, "not connected yet").await?;
    assert_eq!(ack.recipient_online, Some(false));
    Ok(())
}

/// A client whose server process dies without a goodbye packet (`SIGKILL` of the embedded
/// router and its server) finds out by its heartbeat timeout (three 200 ms intervals here),
/// not only when it next sends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_notices_a_killed_server_by_its_heartbeat() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let certs_arg = certs.to_string_lossy().into_owned();
    let mut router = Proc::spawn(
        "cim-router",
        &[
            "--http",
            "127.0.0.1:0",
            "--certs",
            &certs_arg,
            "--servers",
            "1",
            "--heartbeat-ms",
            "200",
            "--heartbeat-timeout-ms",
            "1000",
        ],
    )?;
    let line = router.expect_line("router: ").await?;
    let url = line.trim_start_matches("router: ").trim().to_string();
    router.expect_line("press Ctrl-C").await?;
    let ca = std::fs::read(certs.join("ca.pem"))?;
    let mut config = cim_client::ClientConfig::new(url, ca);
    config.bind_addr = "127.0.0.1:0".parse()?;
    config.reconnect = false;
    cim_client::register(&config, "alice", "password").await?;
    let (_client, mut events) = eventually(WAIT, || async {
        Client::login(&config, "alice", "password", LoginOptions::default())
            .await
            .ok()
    })
    .await?;

    router.child.start_kill()?; // SIGKILL: no goodbye packets
    router.child.wait().await?;
    match next_event(&mut events, WAIT).await? {
        Event::Disconnected(reason) => assert!(reason.contains("heartbeat"), "{reason}"),
        other => panic!("expected a disconnect, got {other:?}"),
    }
    Ok(())
}

/// A `cim-client` console registering and logging in `name` (password `pw-1234`) on `cluster`,
/// keeping its message history in the cluster's directory (a console started again for the
/// same name finds what the one before kept).
fn console(cluster: &TestCluster, name: &str) -> anyhow::Result<Proc> {
    let ca = cluster.embedded.ca.to_string_lossy().into_owned();
    let url = cluster.embedded.router_url.clone();
    let history = cluster.dir.path().join(format!("history/{name}.log"));
    let history = history.to_string_lossy().into_owned();
    let args = [
        "--router",
        &url,
        "--ca",
        &ca,
        "--name",
        name,
        "--password",
        "pw-1234",
        "--register",
        "--bind",
        "127.0.0.1:0",
        "--history",
        &history,
    ];
    Proc::spawn("cim-client", &args)
}

/// The user id in a console's `logged in as NAME (id N) ...` line.
fn id_in(line: &str) -> anyhow::Result<u64> {
    let id = line.split("(id ").nth(1).and_then(|r| r.split(')').next());
    Ok(id.with_context(|| format!("no id in {line:?}"))?.parse()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_console_clients_chat_through_stdin_and_stdout() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2).await?;
    let mut alice = console(&cluster, "alice")?;
    let alice_line = alice.expect_line("logged in as alice").await?;
    let mut bob = console(&cluster, "bob")?;
    let bob_line = bob.expect_line("logged in as bob").await?;
    let (alice_id, bob_id) = (id_in(&alice_line)?, id_in(&bob_line)?);

    alice.send_line(":olu").await?;
    alice.expect_line("online users (2)").await?;
    alice.expect_line(&format!("{bob_id} bob")).await?;

    alice.send_line("hello bob, this is everyone").await?;
    let line = bob.expect_line("hello bob, this is everyone").await?;
    // The sender's id comes with the name: a reply is `id;;text`.
    assert!(line.contains(&format!("alice ({alice_id}): ")), "{line}");

    bob.send_line(&format!("{alice_id};;a secret for alice"))
        .await?;
    let line = alice.expect_line("a secret for alice").await?;
    assert!(
        line.contains(&format!("bob ({bob_id}) (private): ")),
        "{line}"
    );
    // Alice's console showed it, so it tells Bob she read it; his says which message.
    bob.expect_line(&format!("* alice ({alice_id}) read: a secret for alice"))
        .await?;
    bob.send_line(":receipts").await?;
    bob.expect_line("read receipts (1)").await?;
    bob.expect_line(&format!("alice ({alice_id}) read your messages at"))
        .await?;
    alice.send_line(":receipts hide").await?;
    alice.expect_line("you give no read receipts").await?;
    bob.send_line(":receipts").await?;
    bob.expect_line("read receipts (0)").await?;
    alice.send_line(":receipts show").await?;
    alice.expect_line("you give read receipts").await?;
    // `:q words` (CIM's) searches the history, ignoring case: what came in, what went out.
    alice.send_line(":q SECRET").await?;
    alice
        .expect_line("history: 1 line(s) with \"SECRET\":")
        .await?;
    let line = alice.expect_line("a secret for alice").await?;
    assert!(
        line.contains(&format!("] bob ({bob_id}) (private): a secret")),
        "{line}"
    );
    bob.send_line(":q hello bob").await?;
    bob.expect_line("history: 1 line(s)").await?;
    let line = bob.expect_line("hello bob, this is everyone").await?;
    assert!(
        line.contains(&format!("] alice ({alice_id}): hello")),
        "{line}"
    );
    bob.send_line(":q for alice").await?;
    let line = bob.expect_line("a secret for alice").await?;
    assert!(
        line.contains(&format!("] you to {alice_id} (private): ")),
        "{line}"
    );
    bob.send_line(":q nothing like it").await?;
    bob.expect_line("history: no line with \"nothing like it\"")
        .await?;

    // Joining and leaving a group is told to its other members.
    alice.send_line(":create team").await?;
    alice.expect_line("created #team").await?;
    bob.send_line(":join team").await?;
    bob.expect_line("joined #team").await?;
    alice
        .expect_line(&format!("* bob ({bob_id}) joined #team"))
        .await?;
    bob.send_line(":leave team").await?;
    bob.expect_line("left #team").await?;
    alice
        .expect_line(&format!("* bob ({bob_id}) left #team"))
        .await?;
    // An invite-only group: only its owner lets users in (their join does, once invited), and
    // takes them out.
    alice.send_line(":create club invite-only").await?;
    alice.expect_line("created #club (invite-only").await?;
    bob.send_line(":join club").await?;
    let refused = bob.expect_line("! ").await?;
    assert!(refused.contains("invite-only"), "{refused}");
    alice.send_line(&format!(":invite club {bob_id}")).await?;
    alice
        .expect_line(&format!("invited {bob_id} to #club"))
        .await?;
    bob.expect_line(&format!(
        "* alice ({alice_id}) invited you to #club: :join club to join"
    ))
    .await?;
    bob.send_line(":join club").await?;
    bob.expect_line("joined #club").await?;
    alice
        .expect_line(&format!("* bob ({bob_id}) joined #club"))
        .await?;
    bob.send_line(":members club").await?;
    bob.expect_line(&format!("{alice_id} alice online (owner)"))
        .await?;
    alice.send_line(&format!(":remove club {bob_id}")).await?;
    bob.expect_line(&format!(
        "* you were removed from #club by alice ({alice_id})"
    ))
    .await?;
    // A group handed over: its new owner's console and another member's say so.
    let (carol, _carol_events) = cluster.user("carol").await?;
    let carol_id = carol.info().user_id;
    carol.create_group("hall").await?;
    for console in [&mut alice, &mut bob] {
        console.send_line(":join hall").await?;
        console.expect_line("joined #hall").await?;
    }
    carol.transfer_group("hall", alice_id).await?;
    alice
        .expect_line(&format!(
            "* you own #hall now: carol ({carol_id}) handed it to you"
        ))
        .await?;
    bob.expect_line(&format!(
        "* alice ({alice_id}) owns #hall now: carol ({carol_id}) handed it over"
    ))
    .await?;
    carol.logout().await?;
    // Users by name: found, written to, blocked.
    bob.send_line(":status at lunch").await?;
    bob.expect_line("your status: at lunch").await?;
    alice.send_line(":who bob").await?;
    alice
        .expect_line(&format!("bob ({bob_id}) is online: at lunch"))
        .await?;
    bob.send_line(":status clear").await?;
    bob.expect_line("your status is cleared").await?;
    alice.send_line(":who nobody").await?;
    alice.expect_line("no user is named nobody").await?;
    alice.send_line("nobody;;hello?").await?;
    alice.expect_line("! no user is named nobody").await?;
    // Blocking: Bob's private messages to Alice are refused until she unblocks him.
    alice.send_line(":block bob").await?;
    alice
        .expect_line(&format!("blocked bob ({bob_id}): their private messages"))
        .await?;
    alice.send_line(":blocked").await?;
    alice
        .expect_line(&format!("you block (1): bob ({bob_id})"))
        .await?;
    bob.send_line("alice;;let me back").await?;
    let refused = bob
        .expect_line(&format!("! not sent to alice ({alice_id}): "))
        .await?;
    assert!(refused.contains("blocked"), "{refused}");
    alice.send_line(&format!(":unblock {bob_id}")).await?;
    alice.expect_line(&format!("unblocked {bob_id}")).await?;
    bob.send_line("alice;;thanks").await?;
    alice
        .expect_line(&format!("bob ({bob_id}) (private): thanks"))
        .await?;
    // Bob takes back his latest message to Alice, then the one before (the refused one was
    // never sent); Alice's console says which message each unsend takes back.
    bob.send_line(":unsend alice").await?;
    bob.expect_line(&format!("you unsent to alice ({alice_id}): thanks"))
        .await?;
    alice
        .expect_line(&format!("* bob ({bob_id}) unsent: thanks"))
        .await?;
    bob.send_line(":unsend").await?;
    bob.expect_line(&format!("you unsent to {alice_id}: a secret for alice"))
        .await?;
    alice
        .expect_line(&format!("* bob ({bob_id}) unsent: a secret for alice"))
        .await?;
    // One refused for good (Alice blocks Bob now) is forgotten all the same.
    bob.send_line("alice;;one more").await?;
    alice
        .expect_line(&format!("bob ({bob_id}) (private): one more"))
        .await?;
    alice.send_line(":block bob").await?;
    alice.expect_line("blocked bob").await?;
    bob.send_line(":unsend").await?;
    let refused = bob.expect_line("! ").await?;
    assert!(refused.contains("blocked"), "{refused}");
    bob.send_line(":unsend alice").await?;
    bob.expect_line("! no message sent to them from this console is left")
        .await?;
    alice.send_line(":unblock bob").await?;
    alice.expect_line("unblocked bob").await?;
    // In a group too.
    bob.send_line("#hall see the hall").await?;
    alice
        .expect_line(&format!("bob ({bob_id}) [hall]: see the hall"))
        .await?;
    bob.send_line(":unsend #hall").await?;
    bob.expect_line("you unsent to #hall: see the hall").await?;
    alice
        .expect_line(&format!("* bob ({bob_id}) unsent in #hall: see the hall"))
        .await?;
    bob.send_line(":info").await?;
    bob.expect_line(&format!("you are bob (id {bob_id})"))
        .await?;

    // A message over the server's limit is refused naming it and its length: the console
    // checks the limit the server gave at login, however far over it is.
    let limit = cim_proto::DEFAULT_MAX_BODY_BYTES;
    for len in [limit + 1, 20_000, 70_000] {
        bob.send_line(&format!("{alice_id};;{}", "x".repeat(len)))
            .await?;
        bob.expect_line(&format!("message too long: {len} bytes, at most {limit}"))
            .await?;
    }
    // `:q!` with words after it is no quit (nor a search).
    bob.send_line(":q! hello").await?;
    bob.expect_line(":q! takes nothing after it").await?;
    bob.send_line(":info").await?;
    bob.expect_line("you are bob").await?;

    bob.send_line(":q").await?;
    bob.expect_line("bye").await?;
    alice.send_line(":who bob").await?;
    alice
        .expect_line(&format!("bob ({bob_id}) is offline, last seen 20"))
        .await?;
    alice.send_line(":olu").await?;
    alice.expect_line("online users (1)").await?;
    alice.send_line(":olu bo").await?;
    alice
        .expect_line("online users (0): no one whose name starts with \"bo\"")
        .await?;
    alice.send_line(&format!("{bob_id};;see you later")).await?;
    alice
        .expect_line(&format!("(sent to {bob_id}, who is offline"))
        .await?;
    alice.send_line("anyone there?").await?;
    alice
        .expect_line("(sent, but no one else is online)")
        .await?;
    // An invitation made while Bob was away waits for him: his next console says so.
    alice.send_line(&format!(":invite club {bob_id}")).await?;
    alice
        .expect_line(&format!("invited {bob_id} to #club"))
        .await?;
    let mut bob = console(&cluster, "bob")?;
    // Both at start, in either order.
    let (mut invited, mut shown) = (false, false);
    while !(invited && shown) {
        let line = bob.expect_line("").await?;
        invited |= line.contains("* invitations waiting (1): #club");
        shown |= line.contains("(private): see you later");
    }
    bob.send_line(":groups").await?;
    bob.expect_line("invitations waiting (1): #club").await?;
    bob.send_line(":q").await?;
    bob.expect_line("bye").await?;
    // Bob's console showed the message and quit within its second of gathering receipts: it
    // told Alice he read it before it logged out.
    alice
        .expect_line(&format!("* bob ({bob_id}) read: see you later"))
        .await?;
    alice.send_line(":q").await?;
    alice.expect_line("bye").await?;

    // The history outlives the console: a new one finds what the last one sent.
    let mut alice = console(&cluster, "alice")?;
    alice.expect_line("logged in as alice").await?;
    alice.send_line(":q see you").await?;
    let line = alice.expect_line("see you later").await?;
    assert!(
        line.contains(&format!("] you to {bob_id} (private): ")),
        "{line}"
    );
    alice.send_line(":q anyone there").await?;
    let line = alice.expect_line("anyone there?").await?;
    assert!(line.contains("] you: anyone there?"), "{line}");
    alice.send_line(":q").await?;
    alice.expect_line("bye").await?;
    Ok(())
}

/// A console hands its group to another member with `:owner`, then deletes its account with
/// `:delete-account` and exits 0 without a logout. The name goes to a new account, and another
/// console's `name;;text` reaches its new holder: the id that console kept for the name is
/// refused `unknown_user`, and the name looked up again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_hands_its_group_on_deletes_its_account_and_its_name_moves_on()
-> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let mut alice = console(&cluster, "alice")?;
    let alice_id = id_in(&alice.expect_line("logged in as alice").await?)?;
    let mut bob = console(&cluster, "bob")?;
    let bob_id = id_in(&bob.expect_line("logged in as bob").await?)?;
    alice.send_line("bob;;first").await?;
    bob.expect_line("(private): first").await?;

    bob.send_line(":create den").await?;
    bob.expect_line("created #den").await?;
    alice.send_line(":join den").await?;
    alice.expect_line("joined #den").await?;
    bob.send_line(":owner den alice").await?;
    bob.expect_line(&format!("#den is owned by alice ({alice_id}) now"))
        .await?;
    alice
        .expect_line(&format!(
            "* you own #den now: bob ({bob_id}) handed it to you"
        ))
        .await?;

    bob.send_line(":delete-account pw-1234").await?;
    bob.expect_line("account deleted; bye").await?;
    let status = tokio::time::timeout(WAIT, bob.child.wait()).await??;
    assert!(status.success(), "{status}");

    let mut new_bob = console(&cluster, "bob")?;
    let new_id = id_in(&new_bob.expect_line("logged in as bob").await?)?;
    assert_ne!(new_id, bob_id);
    alice.send_line("bob;;second").await?;
    let line = new_bob.expect_line("(private): second").await?;
    assert!(line.contains("alice ("), "{line}");
    new_bob.send_line(":report alice too friendly").await?;
    new_bob
        .expect_line(&format!("reported alice ({alice_id}) to the operators"))
        .await?;
    alice.send_line(":members den").await?;
    alice.expect_line("#den members (1):").await?;
    alice
        .expect_line(&format!("{alice_id} alice online (owner)"))
        .await?;
    new_bob.send_line(":q").await?;
    new_bob.expect_line("bye").await?;
    alice.send_line(":q").await?;
    alice.expect_line("bye").await?;
    Ok(())
}

/// The console prints what others send with control characters escaped (no forged lines, no
/// terminal escapes), exits at once when its session is taken over (no Enter needed, status 2),
/// and at the end of its input logs out like `:q` (status 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_escapes_what_it_prints_and_leaves_at_once() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let mut alice = console(&cluster, "alice")?;
    let alice_id = id_in(&alice.expect_line("logged in as alice").await?)?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    bob.send_private(alice_id, "one\n[00:00:00] admin (private): \u{1b}[2Jtwo")
        .await?;
    let line = alice.expect_line("one\\n[00:00:00] admin").await?;
    assert!(line.contains("\\u{1b}[2Jtwo"), "{line}");
    // No terminal to ask for passwords at: the line must give them.
    alice.send_line(":password").await?;
    alice
        .expect_line("! use :password at a terminal, or :password <old> <new>")
        .await?;
    alice.send_line(":delete-account").await?;
    alice
        .expect_line("! use :delete-account at a terminal, or :delete-account <password>")
        .await?;

    // Taken over elsewhere: the console says so and exits without waiting for input.
    let config = cluster.client_config();
    let takeover = LoginOptions { takeover: true };
    let (_elsewhere, _events) = Client::login(&config, "alice", "pw-1234", takeover).await?;
    alice.expect_line("session ended").await?;
    let status = tokio::time::timeout(WAIT, alice.child.wait()).await??;
    assert_eq!(
        status.code(),
        Some(2),
        "a session ended elsewhere is no quit: {status}"
    );

    // End of input right after a message: the message still goes out, then Carol is logged
    // out, so no longer online.
    let mut carol = console(&cluster, "carol")?;
    carol.expect_line("logged in as carol").await?;
    assert!(bob.online_users("carol").await?.len() == 1);
    let bob_id = bob.info().user_id;
    carol
        .send_line(&format!("{bob_id};;typed just before the end"))
        .await?;
    drop(carol.child.stdin.take());
    carol.expect_line("bye").await?;
    let got = next_message(&mut bob_events).await?;
    assert_eq!(got.body, "typed just before the end");
    let status = tokio::time::timeout(WAIT, carol.child.wait()).await??;
    assert!(status.success(), "{status}");
    assert!(bob.online_users("carol").await?.is_empty());

    // No password given and no terminal to ask at: the console does not start.
    let ca = cluster.embedded.ca.to_string_lossy().into_owned();
    let url = cluster.embedded.router_url.clone();
    let args = [
        "--router",
        &url,
        "--ca",
        &ca,
        "--name",
        "dave",
        "--register",
    ];
    let mut dave = Proc::spawn("cim-client", &args)?;
    let status = tokio::time::timeout(WAIT, dave.child.wait()).await??;
    assert_eq!(status.code(), Some(1), "{status}");
    assert!(bob.user_id_of("dave").await?.is_none(), "not registered");
    Ok(())
}

/// A burst of plain lines pasted into the console goes out whole, at the pace the server
/// allows (a broadcast costs fifty sends: eight at once, then four a second), instead of
/// mostly refused `rate_limited`; and a console that quits after a command failed exits with
/// status 3, so a script piping commands in can tell.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pasted_burst_goes_out_whole_and_a_failure_shows_in_the_exit_status() -> anyhow::Result<()>
{
    // The production default (the test clusters' is far higher).
    let cluster = TestCluster::start_with(1, Backend::Memory, |c| {
        c.server_limits.messages_per_sec = 200;
        c.server_limits.message_burst = 400;
    })
    .await?;
    let (_bob, mut bob_events) = cluster.user("bob").await?;
    let mut alice = console(&cluster, "alice")?;
    alice.expect_line("logged in as alice").await?;
    const LINES: usize = 16;
    for i in 0..LINES {
        alice.send_line(&format!("pasted {i}")).await?;
    }
    for i in 0..LINES {
        assert_eq!(
            next_message(&mut bob_events).await?.body,
            format!("pasted {i}")
        );
    }
    alice.send_line("#nosuchgroup hello").await?;
    alice.send_line(":q").await?;
    alice.expect_line("bye").await?;
    let status = tokio::time::timeout(WAIT, alice.child.wait()).await??;
    assert_eq!(status.code(), Some(3), "{status}");
    assert!(
        !alice.seen.iter().any(|line| line.contains("rate_limited")),
        "no pasted line was refused: {:?}",
        alice.seen
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_credit_is_granted_in_bulk_to_busy_clients() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    const SENDS: usize = 48;
    for i in 0..SENDS {
        alice
            .send_private(bob.info().user_id, &format!("m{i}"))
            .await?;
    }
    for i in 0..SENDS {
        assert_eq!(next_message(&mut bob_events).await?.body, format!("m{i}"));
    }
    // One stream per send and (sent one at a time) one per delivery. With the quiet allowance
    // of 16 streams, quinn grants credit every third stream: 16 MAX_STREAMS frames for 48.
    // The server widens a fast sender's allowance, and clients always grant a wide one to
    // their server, so credit comes every 17 streams.
    let to_alice = alice.transport_stats().unwrap().frame_rx.max_streams_bidi;
    let from_bob = bob.transport_stats().unwrap().frame_tx.max_streams_bidi;
    // Widening alone sends one MAX_STREAMS frame, so zero would mean the stats are not these.
    assert!(
        (1..=8).contains(&to_alice),
        "server granted credit {to_alice} times"
    );
    assert!(from_bob <= 8, "bob granted credit {from_bob} times");
    Ok(())
}

#[tokio::test]
async fn client_links_ask_for_prompt_acks_and_send_no_mtu_probes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    alice.send_private(bob.info().user_id, "hello").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "hello");
    // The request rides in an ACK_FREQUENCY frame early in the connection; clients make no
    // such request of the server.
    for client in [&alice, &bob] {
        let stats = client.transport_stats().unwrap();
        assert!(
            stats.frame_rx.ack_frequency >= 1,
            "no ack delay was asked of {}",
            client.info().name
        );
        assert_eq!(stats.frame_tx.ack_frequency, 0);
        // quinn would otherwise probe 1,326 to 1,452-byte datagrams right after the handshake
        // (loopback carries them all) and settle above QUIC's 1,200-byte minimum.
        assert_eq!(
            stats.path.sent_plpmtud_probes,
            0,
            "{} probed",
            client.info().name
        );
        assert_eq!(stats.path.current_mtu, 1200);
    }
    Ok(())
}

/// `(handshakes, resumed)` HTTPS handshakes the router counted, read through `api`.
async fn https_handshakes(api: &RouterApi) -> anyhow::Result<(u64, u64)> {
    // One read: every read of /metrics is a connection of its own, counted too.
    let metrics = router_metrics(api).await?;
    Ok((
        metric_value(&metrics, "cim_router_https_handshakes_total")? as u64,
        metric_value(&metrics, "cim_router_https_resumed_total")? as u64,
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_later_api_calls_resume_tls_even_after_a_storm_of_others() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let config = cluster.client_config();
    let alice = RouterApi::new(&config)?;
    // Each call is a connection of its own; the reply counts the connection it came on. The
    // counts start with the test cluster's own set-up calls.
    let (handshakes, resumed) = https_handshakes(&alice).await?;
    assert_eq!(
        https_handshakes(&alice).await?,
        (handshakes + 1, resumed + 1)
    );
    // A storm of other clients, more than a server-side session cache of 256 would keep.
    const OTHERS: u64 = 300;
    for _ in 0..OTHERS / 20 {
        let mut calls = tokio::task::JoinSet::new();
        for _ in 0..20 {
            let other = RouterApi::new(&config)?;
            calls.spawn(async move { https_handshakes(&other).await });
        }
        while let Some(result) = calls.join_next().await {
            result??;
        }
    }
    // Alice still resumes: the ticket she holds is all the router needs.
    assert_eq!(
        https_handshakes(&alice).await?,
        (handshakes + 2 + OTHERS, resumed + 2)
    );
    Ok(())
}

/// A router that takes the connection and never answers (stalled, or cut off after the
/// request went out) fails the call after the client's `http_timeout` instead of holding it
/// up for good: a login, or a reconnect's re-login, would otherwise never end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_never_answers_fails_the_call_in_time() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = silent.local_addr()?.port();
    let held = tokio::spawn(async move {
        let mut connections = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            connections.push(tcp);
        }
    });
    let mut config = cluster.client_config();
    config.router_url = format!("https://127.0.0.1:{port}");
    config.http_timeout = Duration::from_millis(500);
    let register = cim_client::register(&config, "alice", "password");
    let err = tokio::time::timeout(WAIT, register)
        .await?
        .expect_err("nothing answered");
    assert!(err.to_string().contains("no answer within"), "{err}");
    let login = Client::login(&config, "alice", "password", LoginOptions::default());
    let err = tokio::time::timeout(WAIT, login)
        .await?
        .err()
        .expect("nothing answered");
    assert!(err.to_string().contains("no answer within"), "{err}");
    held.abort();
    Ok(())
}

/// A user is found by name (in any case: names are unique whatever their case) on Redis, with
/// whether it is online and, once it went offline, when: by a logout, and by a closed
/// connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_found_by_name_with_presence_and_last_seen() -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(2, Backend::Redis).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, _bob_events) = cluster.user("bob").await?;
    let bob_id = bob.info().user_id;
    let found = alice.find_user("bob").await?.context("bob is found")?;
    assert_eq!(
        (found.id, found.online, found.last_seen_ms),
        (bob_id, true, None)
    );
    let found = alice.find_user("BoB").await?.context("in any case")?;
    assert_eq!((found.id, found.name.as_str()), (bob_id, "bob"));
    let config = cluster.client_config();
    let taken = cim_client::register(&config, "Bob", "password").await;
    assert_eq!(taken.unwrap_err().code(), Some("name_taken"));

    assert!(alice.find_user("nobody").await?.is_none());
    assert!(alice.find_user("../api").await?.is_none());
    // A status: set, seen, refused when not one short line, cleared.
    assert_eq!(found.status, None);
    let status = bob.set_status("  at lunch, back at 2 ").await?;
    assert_eq!(status.as_deref(), Some("at lunch, back at 2"));
    let found = alice.find_user("bob").await?.context("bob")?;
    assert_eq!(found.status.as_deref(), Some("at lunch, back at 2"));
    for bad in [
        "x".repeat(141),
        "two\nlines".into(),
        "a\u{2028}b".into(),
        "\u{202e}reversed".into(),
        "\u{200b}".into(),
    ] {
        let refused = bob.set_status(&bad).await.unwrap_err();
        assert_eq!(refused.code(), Some("bad_request"), "{bad:?}");
    }
    assert_eq!(
        bob.set_status(&"é".repeat(140))
            .await?
            .map(|s| s.chars().count()),
        Some(140)
    );
    let spread = bob.set_status(" so    much   room ").await?;
    assert_eq!(spread.as_deref(), Some("so much room"));
    assert_eq!(bob.set_status("").await?, None);
    assert_eq!(alice.find_user("bob").await?.context("bob")?.status, None);
    assert_eq!(alice.user_id_of("bob").await?, Some(bob_id));

    let seen_since = |since: u64| {
        let alice = &alice;
        eventually(WAIT, move || async move {
            let found = alice.find_user("bob").await.ok()??;
            let seen = found.last_seen_ms.filter(|at| *at >= since)?;
            (!found.online).then_some(seen)
        })
    };
    // Redis runs on this machine, by its clock; a moment after the login's confirmation.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let before = cim_core::now_ms();
    bob.logout().await?;
    let seen = seen_since(before).await?;
    assert!(seen <= cim_core::now_ms() + 1000, "{seen}");

    // Back, then gone without a logout: the server's close report records it.
    let config = cluster.client_config();
    let (bob, _bob_events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    assert!(alice.find_user("bob").await?.context("bob")?.online);
    tokio::time::sleep(Duration::from_millis(10)).await;
    let before = cim_core::now_ms();
    assert!(before > seen);
    bob.close().await;
    let seen = seen_since(before).await?;
    assert!(seen <= cim_core::now_ms() + 1000, "{seen}");

    // A user who blocks the asker shows offline and never seen to it, not to others.
    let (carol, _carol_events) = cluster.user("carol").await?;
    let carol_id = carol.info().user_id;
    carol.set_status("busy").await?;
    carol.block(alice.info().user_id).await?;
    let hidden = alice.find_user("carol").await?.context("carol")?;
    assert_eq!((hidden.id, hidden.online), (carol_id, false));
    assert_eq!(
        hidden.status, None,
        "a blocker's status is not shown to whom it blocks"
    );
    carol.logout().await?;
    let (dave, _dave_events) = cluster.user("dave").await?;
    let shown = dave.find_user("carol").await?.context("carol")?;
    assert!(!shown.online && shown.last_seen_ms.is_some(), "{shown:?}");
    assert_eq!(shown.status.as_deref(), Some("busy"));
    let hidden = alice.find_user("carol").await?.context("carol")?;
    assert_eq!((hidden.online, hidden.last_seen_ms), (false, None));
    // Names outside the rule are no one's, whatever reaches the router.
    let api = RouterApi::new(&config)?;
    for path in ["..%2Fapi", "a%20b", &"x".repeat(2000)] {
        let (status, body) = api
            .raw(
                http::Method::GET,
                &format!("/api/users/named/{path}"),
                Default::default(),
                Some(&alice.token()),
            )
            .await?;
        assert_eq!(status, 404, "{path}: {body:?}");
    }

    // A user who hides its last seen shows none to anyone, and sees no one's while it hides.
    assert!(!dave.settings().await?.hide_last_seen);
    assert!(dave.hide_last_seen(true).await?.hide_last_seen);
    assert!(dave.settings().await?.hide_last_seen);
    let by_dave = dave.find_user("carol").await?.context("carol")?;
    assert_eq!(by_dave.last_seen_ms, None, "who hides sees no one's");
    let dave_offline = || {
        let alice = &alice;
        eventually(WAIT, move || async move {
            let found = alice.find_user("dave").await.ok()??;
            (!found.online).then_some(found.last_seen_ms)
        })
    };
    dave.logout().await?;
    assert_eq!(dave_offline().await?, None);
    let (dave, _dave_events) =
        Client::login(&config, "dave", "password", LoginOptions::default()).await?;
    assert!(!dave.hide_last_seen(false).await?.hide_last_seen);
    let by_dave = dave.find_user("carol").await?.context("carol")?;
    assert!(by_dave.last_seen_ms.is_some());
    let dave_id = dave.info().user_id;
    dave.logout().await?;
    assert!(dave_offline().await?.is_some());
    // A login names its user in any case too.
    let (dave, _dave_events) =
        Client::login(&config, "DaVe", "password", LoginOptions::default()).await?;
    assert_eq!(
        (dave.info().user_id, dave.info().name.as_str()),
        (dave_id, "dave")
    );
    Ok(())
}

/// A user blocks another, on Redis over two servers: the blocked user's private messages are
/// refused (`blocked`, in-band and over HTTP) and never stored, its invitations too; the block
/// goes one way, is listed with names, and ends with an unblock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocked_users_messages_and_invitations_are_refused_until_unblocked() -> anyhow::Result<()>
{
    let cluster = TestCluster::start_on(2, Backend::Redis).await?;
    let api = RouterApi::new(&cluster.client_config())?;
    let (alice, mut alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let (alice_id, bob_id) = (alice.info().user_id, bob.info().user_id);
    bob.send_private(alice_id, "before").await?;
    assert_eq!(next_message(&mut alice_events).await?.body, "before");

    let blocked = alice.block(bob_id).await?;
    assert_eq!((blocked.id, blocked.name.as_str()), (bob_id, "bob"));
    assert!(!blocked.already_blocked);
    assert!(alice.block(bob_id).await?.already_blocked);
    let listed = alice.blocked_users().await?;
    assert_eq!(
        listed
            .iter()
            .map(|u| (u.id, u.name.as_str()))
            .collect::<Vec<_>>(),
        [(bob_id, "bob")]
    );

    let err = bob.send_private(alice_id, "blocked one").await.unwrap_err();
    assert_eq!(err.code(), Some(cim_proto::BLOCKED), "{err}");
    assert!(
        !err.send_outcome_unknown(),
        "a refusal, not an unknown outcome"
    );
    let err = api
        .call::<_, serde_json::Value>(
            http::Method::POST,
            "/api/messages",
            Some(&serde_json::json!({"to": alice_id, "body": "over http"})),
            Some(&bob.token()),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(&err, ClientError::Api { status: 403, code, .. } if code == "blocked"),
        "{err}"
    );
    bob.create_group("bobs").await?;
    let err = bob.invite("bobs", alice_id).await.unwrap_err();
    assert_eq!(err.code(), Some(cim_proto::BLOCKED), "{err}");
    // A broadcast to everyone online leaves out whom it would reach blocked.
    let ack = bob
        .send_group(cim_proto::BROADCAST_GROUP, "to everyone")
        .await?;
    assert_eq!(ack.recipients, 0, "alice blocks bob");
    // One way: alice still writes to bob.
    alice.send_private(bob_id, "still here").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "still here");

    // Refusals over HTTP: oneself, no such user.
    for (user, status, code) in [
        (alice_id, 400, "bad_request"),
        (9_999_999, 404, "unknown_user"),
    ] {
        let err = api
            .call::<_, serde_json::Value>(
                http::Method::POST,
                "/api/blocks",
                Some(&serde_json::json!({ "user_id": user })),
                Some(&alice.token()),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: s, code: c, .. } if *s == status && c == code),
            "{err}"
        );
    }

    assert!(alice.unblock(bob_id).await?);
    assert!(!alice.unblock(bob_id).await?);
    assert!(alice.blocked_users().await?.is_empty());
    bob.send_private(alice_id, "after").await?;
    let next = next_message(&mut alice_events).await?;
    assert_eq!(
        (next.body.as_str(), next.seq),
        ("after", 2),
        "nothing was stored while blocked"
    );
    bob.invite("bobs", alice_id).await?;
    Ok(())
}

/// A user changes its password on Redis: only with the current one, five tries a minute per
/// user (past it even the right one waits, while logins go on); the old one stops logging
/// in, the new one does, and the login that changed it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_is_changed_only_with_the_current_one() -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(1, Backend::Redis).await?;
    let config = cluster.client_config();
    let (alice, mut alice_events) = cluster.user("alice").await?;
    let (bob, _bob_events) = cluster.user("bob").await?;
    let err = alice
        .change_password("wrong", "new-secret")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("wrong_password"), "{err}");
    for new in ["abc", "password"] {
        let err = alice.change_password("password", new).await.unwrap_err();
        assert_eq!(err.code(), Some("bad_request"), "{new}: {err}");
    }
    alice.change_password("password", "new-secret").await?;

    let login = |password: &'static str| {
        let config = config.clone();
        async move {
            let takeover = LoginOptions { takeover: true };
            Client::login(&config, "alice", password, takeover).await
        }
    };
    let err = login("password").await.err().context("the old password")?;
    assert_eq!(err.code(), Some("invalid_credentials"), "{err}");
    // The login that changed it still sends and receives.
    bob.send_private(alice.info().user_id, "still with you")
        .await?;
    assert_eq!(
        next_message(&mut alice_events).await?.body,
        "still with you"
    );
    let (again, _again_events) = login("new-secret").await?;

    // Guessing through a session: five tries a minute for the user (two made above), then
    // none, right or wrong, before any hash, whatever new login asks; the user's logins are
    // not locked.
    for _ in 0..3 {
        let err = again
            .change_password("guess", "x-secret")
            .await
            .unwrap_err();
        assert_eq!(err.code(), Some("wrong_password"), "{err}");
    }
    let err = again
        .change_password("new-secret", "x-secret")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("too_many_attempts"), "{err}");
    let (third, _third_events) = login("new-secret").await?;
    let err = third
        .change_password("new-secret", "x-secret")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("too_many_attempts"), "{err}");
    Ok(())
}

/// A user deletes its account with its password (a wrong one changes nothing): its session
/// ends and does not come back, its groups pass on as on a leave (the members hear it), its
/// invitations are declined, it can no longer be written to, found or logged in as, its old
/// token calls nothing, and its name is free for a new account with a new id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_account_leaves_its_groups_and_frees_its_name() -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(2, Backend::Redis).await?;
    let config = cluster.client_config();
    let (alice, mut alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let alice_id = alice.info().user_id;
    alice.create_group("club").await?;
    bob.join_group("club").await?;
    bob.create_invite_only_group("den").await?;
    bob.invite("den", alice_id).await?;
    let (carol, _carol_events) = cluster.user("carol").await?;
    carol.block(alice_id).await?;

    let err = alice.delete_account("wrong").await.unwrap_err();
    assert_eq!(err.code(), Some("wrong_password"), "{err}");
    bob.send_private(alice_id, "still here?").await?;
    let heard = loop {
        match next_event(&mut alice_events, WAIT).await? {
            Event::Message(m) => break m.body,
            Event::Presence { .. } | Event::GroupChange { .. } | Event::GroupInvite { .. } => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    };
    assert_eq!(heard, "still here?", "a wrong password deletes nothing");
    // Over the API beside the client, which therefore hears of it only from its server.
    let token = alice.token();
    let api = RouterApi::new(&config)?;
    api.delete_account(&token, "password").await?;

    // Alice's session is ended by the router, and no reconnect follows.
    loop {
        match next_event(&mut alice_events, WAIT).await? {
            Event::Kicked(reason) => {
                assert_eq!(reason, "account deleted");
                break;
            }
            Event::Presence { .. } | Event::GroupChange { .. } => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    assert!(
        tokio::time::timeout(WAIT, alice_events.next())
            .await?
            .is_none(),
        "the events end"
    );
    // Bob hears her leave the club, which is his now.
    let (mut left, mut owns) = (false, false);
    while !(left && owns) {
        match next_event(&mut bob_events, WAIT).await? {
            Event::GroupChange {
                group,
                user_id,
                joined: false,
                ..
            } if group == "club" && user_id == alice_id => left = true,
            Event::GroupOwner {
                group,
                previous_owner_id,
                ..
            } if group == "club" && previous_owner_id == alice_id => owns = true,
            Event::Presence { .. } => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let members = bob.group_members("club").await?;
    assert_eq!(members.len(), 1, "{members:?}");
    assert!(members[0].owner && members[0].id == bob.info().user_id);

    let refusal = |e: ClientError| e.code().map(str::to_string);
    assert_eq!(
        refusal(bob.send_private(alice_id, "hello?").await.unwrap_err()).as_deref(),
        Some("unknown_user")
    );
    assert_eq!(
        refusal(bob.invite("den", alice_id).await.unwrap_err()).as_deref(),
        Some("unknown_user")
    );
    assert!(bob.find_user("alice").await?.is_none());
    // Her invitation to the den was declined: a new one is stored afresh.
    let store = &cluster.embedded.store;
    // Carol's block of her is listed no more, and no longer counts against Carol's cap.
    assert!(carol.blocked_users().await?.is_empty());
    let carol_id = carol.info().user_id;
    assert!(store.blocked_users(carol_id).await?.is_empty());
    let again = store
        .invite("den", bob.info().user_id, alice_id, 100)
        .await?;
    assert_eq!(again, cim_router::store::Invite::Invited);
    let err = Client::login(
        &config,
        "alice",
        "password",
        LoginOptions { takeover: true },
    )
    .await
    .err()
    .context("a login of the deleted account")?;
    assert_eq!(err.code(), Some("invalid_credentials"), "{err}");
    let err = api.blocked_users(&token).await.unwrap_err();
    assert!(
        matches!(err.code(), Some("unauthorized" | "session_ended")),
        "{err}"
    );

    // The name is free: a new account, with a new id, nothing of the old one's.
    let (again, _again_events) = cluster.user("alice").await?;
    assert!(again.info().user_id > bob.info().user_id);
    let mine = again.groups_and_invitations().await?;
    assert!(
        mine.groups.is_empty() && mine.invitations.is_empty(),
        "{mine:?}"
    );
    assert_eq!(
        bob.find_user("alice").await?.map(|u| u.id),
        Some(again.info().user_id)
    );
    Ok(())
}

/// The next read receipt `events` tell, past other notices (presence); a message is an error.
async fn next_read(events: &mut Events) -> anyhow::Result<ReadReceipt> {
    loop {
        match next_event(events, WAIT).await? {
            Event::Read(read) => return Ok(read),
            Event::Message(m) => bail!("expected a read receipt, got {m:?}"),
            _ => {}
        }
    }
}

/// Read receipts, on Redis over two servers: a reader's receipt reaches the sender at once and
/// stays listed for it (also for a sender offline then); it only moves forward; it goes
/// nowhere, as the reader is not told, while either hides receipts or the sender blocks the
/// reader; a bad one gets a clear error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_receipt_reaches_its_sender_unless_either_hides_them() -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(2, Backend::Redis).await?;
    let config = cluster.client_config();
    let (alice, mut alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let (carol, mut carol_events) = cluster.user("carol").await?;
    let (alice_id, bob_id) = (alice.info().user_id, bob.info().user_id);
    let carol_id = carol.info().user_id;
    let first = alice.send_private(bob_id, "first").await?.msg_id;
    let second = alice.send_private(bob_id, "second").await?.msg_id;
    for _ in 0..2 {
        next_message(&mut bob_events).await?;
    }

    bob.mark_read(alice_id, second).await?;
    let read = next_read(&mut alice_events).await?;
    assert_eq!(
        (read.user_id, read.name.as_str(), read.up_to_msg_id),
        (bob_id, "bob", second)
    );
    assert_eq!(alice.read_receipts().await?, std::slice::from_ref(&read));
    // Behind what it said already: kept as it was.
    bob.mark_read(alice_id, first).await?;
    assert_eq!(alice.read_receipts().await?, [read]);
    for (user, msg_id) in [(bob_id, second), (alice_id, 0), (alice_id, u64::MAX)] {
        let refused = bob.mark_read(user, msg_id).await.unwrap_err();
        assert_eq!(refused.code(), Some("bad_request"), "{user} {msg_id}");
    }
    let refused = bob.mark_read(987_654_321, second).await.unwrap_err();
    assert_eq!(refused.code(), Some("unknown_user"));

    // Read while its sender is offline: listed at its next login.
    let third = alice.send_private(bob_id, "third").await?.msg_id;
    next_message(&mut bob_events).await?;
    alice.logout().await?;
    drop(alice_events);
    bob.mark_read(alice_id, third).await?;
    let (alice, mut alice_events) =
        Client::login(&config, "alice", "password", LoginOptions::default()).await?;
    let listed = alice.read_receipts().await?;
    assert_eq!((listed.len(), listed[0].up_to_msg_id), (1, third));

    // Bob hides his: they go nowhere (the next Alice hears is Carol's), and his kept one is
    // not listed until he shows them again.
    assert!(bob.hide_read_receipts(true).await?.hide_read_receipts);
    assert!(bob.settings().await?.hide_read_receipts);
    let fourth = alice.send_private(bob_id, "fourth").await?.msg_id;
    next_message(&mut bob_events).await?;
    bob.mark_read(alice_id, fourth).await?;
    assert!(alice.read_receipts().await?.is_empty());
    let to_carol = alice.send_private(carol_id, "hi carol").await?.msg_id;
    next_message(&mut carol_events).await?;
    carol.mark_read(alice_id, to_carol).await?;
    assert_eq!(next_read(&mut alice_events).await?.user_id, carol_id);
    assert!(!bob.hide_read_receipts(false).await?.hide_read_receipts);
    let readers = |listed: Vec<ReadReceipt>| -> Vec<(u64, u64)> {
        listed.iter().map(|r| (r.user_id, r.up_to_msg_id)).collect()
    };
    assert_eq!(
        readers(alice.read_receipts().await?),
        [(carol_id, to_carol), (bob_id, third)]
    );

    // Alice hides hers: she is given none, and what was kept waits for her showing them.
    alice.hide_read_receipts(true).await?;
    assert!(alice.read_receipts().await?.is_empty());
    bob.mark_read(alice_id, fourth).await?;
    alice.hide_read_receipts(false).await?;
    assert_eq!(
        readers(alice.read_receipts().await?),
        [(carol_id, to_carol), (bob_id, third)]
    );

    // Alice blocks Bob: his receipts go nowhere, and he is not listed.
    alice.block(bob_id).await?;
    bob.mark_read(alice_id, fourth).await?;
    assert_eq!(
        readers(alice.read_receipts().await?),
        [(carol_id, to_carol)]
    );
    let again = alice.send_private(carol_id, "again").await?.msg_id;
    next_message(&mut carol_events).await?;
    carol.mark_read(alice_id, again).await?;
    assert_eq!(next_read(&mut alice_events).await?.user_id, carol_id);

    // A reader whose account is gone is not listed.
    carol.delete_account("password").await?;
    assert!(alice.read_receipts().await?.is_empty());

    // An id may run ahead of the clock by two message-id node leases (30 s each here) and a
    // minute of clocks apart, not more. (Bob's receipts go nowhere now, but are checked.)
    const ID_EPOCH_MS: u64 = 1_735_689_600_000;
    let issued_in = |secs: u64| (cim_core::now_ms() + secs * 1000 - ID_EPOCH_MS) << 22;
    bob.mark_read(alice_id, issued_in(100)).await?;
    let refused = bob.mark_read(alice_id, issued_in(1_000)).await.unwrap_err();
    assert_eq!(refused.code(), Some("bad_request"));
    Ok(())
}

/// Unsending, on Redis over two servers: an online recipient gets the unsend right after the
/// message, naming it; an offline one never gets the message's text, only the unsend (twice:
/// in the message's place and after it); a message of 24 hours ago, another user's id, one's
/// own id, a user who blocks the sender or is gone get a clear refusal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsent_message_is_taken_back_and_never_reaches_an_offline_recipient()
-> anyhow::Result<()> {
    let cluster = TestCluster::start_on(2, Backend::Redis).await?;
    let config = cluster.client_config();
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let (alice_id, bob_id) = (alice.info().user_id, bob.info().user_id);

    let oops = alice.send_private(bob_id, "oops").await?.msg_id;
    assert_eq!(next_message(&mut bob_events).await?.body, "oops");
    alice.unsend(bob_id, oops).await?;
    let unsend = next_message(&mut bob_events).await?;
    assert_eq!(
        (unsend.from_user, unsend.unsends, unsend.group),
        (alice_id, Some(oops), None)
    );
    assert_ne!(unsend.msg_id, oops, "an unsend has an id of its own");

    bob.logout().await?;
    drop(bob_events);
    let secret = alice.send_private(bob_id, "secret").await?.msg_id;
    let after = alice.send_private(bob_id, "after").await?.msg_id;
    alice.unsend(bob_id, secret).await?;
    let (bob, mut bob_events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    let mut got = Vec::new();
    for _ in 0..3 {
        let m = next_message(&mut bob_events).await?;
        got.push((m.msg_id == after, m.unsends, m.body == "secret"));
    }
    assert_eq!(
        got,
        [
            (false, Some(secret), false),
            (true, None, false),
            (false, Some(secret), false)
        ],
        "the unsend in the message's place, the next message, the unsend again"
    );

    let refusals = [
        (bob_id, 1, "too_late"),
        (alice_id, after, "bad_request"),
        (bob_id, u64::MAX, "bad_request"),
        (987_654_321, after, "unknown_user"),
    ];
    for (user, msg_id, code) in refusals {
        let err = alice.unsend(user, msg_id).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{user} {msg_id}: {err}");
    }
    // An id given as a decimal string (as JavaScript must) is read; one that is not, refused.
    let api = RouterApi::new(&config)?;
    for (msg_id, status, code) in [("1", 403, "too_late"), ("x1", 400, "bad_json")] {
        let body = serde_json::json!({"user_id": bob_id, "msg_id": msg_id});
        let err = api
            .call::<_, serde_json::Value>(
                http::Method::POST,
                "/api/unsend",
                Some(&body),
                Some(&alice.token()),
            )
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Api { status: s, code: c, .. } if (*s, c.as_str()) == (status, code)),
            "{msg_id}: {err}"
        );
    }
    bob.block(alice_id).await?;
    let err = alice.unsend(bob_id, after).await.unwrap_err();
    assert_eq!(err.code(), Some("blocked"), "{err}");

    // In a group: a member online gets the unsend after the message; one offline only the
    // unsend; a non-member cannot unsend there, and no one can in `all`.
    let (carol, _carol_events) = cluster.user("carol").await?;
    alice.create_group("club").await?;
    for member in [&bob, &carol] {
        member.join_group("club").await?;
    }
    carol.logout().await?;
    let said = alice.send_group("club", "wrong room").await?.msg_id;
    let m = next_message_past_notices(&mut bob_events).await?;
    assert_eq!((m.msg_id, m.group.as_deref()), (said, Some("club")));
    alice.unsend_in_group("club", said).await?;
    let m = next_message_past_notices(&mut bob_events).await?;
    assert_eq!((m.unsends, m.group.as_deref()), (Some(said), Some("club")));
    let (_carol, mut carol_events) =
        Client::login(&config, "carol", "password", LoginOptions::default()).await?;
    for _ in 0..2 {
        let m = next_message_past_notices(&mut carol_events).await?;
        assert_eq!(
            (m.unsends, m.body.as_str()),
            (Some(said), "(unsent a message)")
        );
    }
    let (dave, _dave_events) = cluster.user("dave").await?;
    let err = dave.unsend_in_group("club", said).await.unwrap_err();
    assert_eq!(err.code(), Some("not_member"), "{err}");
    let err = alice.unsend_in_group("all", said).await.unwrap_err();
    assert_eq!(err.code(), Some("bad_request"), "{err}");
    Ok(())
}

/// The next message `events` tell, past notices (presence, group changes).
async fn next_message_past_notices(
    events: &mut Events,
) -> anyhow::Result<cim_client::IncomingMessage> {
    loop {
        if let Event::Message(m) = next_event(events, WAIT).await? {
            return Ok(m);
        }
    }
}
