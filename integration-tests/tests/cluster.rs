//! cim as a real cluster: `cim-router` and `cim-server` processes on a real Redis and a real
//! ZooKeeper. Round-robin spread, chat across servers, `kill -9` failover, Redis restart,
//! ZooKeeper session expiry, concurrent logins, consistent hashing, sends while no router
//! answers, message-id nodes held one router at a time.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use anyhow::Context;
use cim_client::{Client, ClientConfig, ClientError, Event, Events, LoginOptions};
use cim_integration_tests::cluster::{HEARTBEAT_MS, ProcCluster, ROUTE_LEASE_MS, ZK_SESSION_MS};
use cim_integration_tests::{
    WAIT, eventually, metric_value, next_event, next_event_past_retries, next_message,
    router_metrics,
};
use redis::AsyncCommands;

async fn login(
    config: &ClientConfig,
    name: &str,
    takeover: bool,
) -> anyhow::Result<(Client, Events)> {
    Ok(Client::login(config, name, "password", LoginOptions { takeover }).await?)
}

/// Registers and logs in `n` users named `<prefix><i>`, alternating between routers.
async fn users(
    cluster: &ProcCluster,
    prefix: &str,
    n: usize,
) -> anyhow::Result<Vec<(Client, Events)>> {
    let mut out = Vec::new();
    for i in 0..n {
        let config = cluster.client_config(i % cluster.routers.len());
        let name = format!("{prefix}{i}");
        cim_client::register(&config, &name, "password").await?;
        out.push(login(&config, &name, false).await?);
    }
    Ok(out)
}

fn per_server(clients: &[(Client, Events)]) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for (c, _) in clients {
        *counts.entry(c.info().server_id.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_thirty_clients_and_they_chat_across_servers() -> anyhow::Result<()> {
    let cluster = ProcCluster::start(2, 3, "round-robin").await?;
    let mut clients = users(&cluster, "u", 30).await?;
    let counts = per_server(&clients);
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");

    // Private message between users on different servers.
    let (a, b) = (0..30)
        .flat_map(|a| (0..30).map(move |b| (a, b)))
        .find(|&(a, b)| clients[a].0.info().server_id != clients[b].0.info().server_id)
        .unwrap();
    let to = clients[b].0.info().user_id;
    clients[a].0.send_private(to, "across servers").await?;
    let m = next_message(&mut clients[b].1).await?;
    assert_eq!(
        (m.body.as_str(), m.from_user),
        ("across servers", clients[a].0.info().user_id)
    );

    // A broadcast reaches the 29 others, on all three servers.
    let ack = clients[0].0.send_group("all", "hello cluster").await?;
    assert_eq!(ack.recipients, 29);
    for (_, events) in clients.iter_mut().skip(1) {
        assert_eq!(next_message(events).await?.body, "hello cluster");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_killed_server_move_to_live_servers_and_its_routes_go() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(2, 3, "round-robin").await?;
    let mut clients = users(&cluster, "k", 12).await?;
    let victim_server = "s2";
    let victims: Vec<usize> = (0..clients.len())
        .filter(|&i| clients[i].0.info().server_id == victim_server)
        .collect();
    assert_eq!(victims.len(), 4);
    // One more user on the victim server will not come back: it must drop out of the online
    // list by itself.
    let mut quiet_config = cluster.client_config(0);
    quiet_config.reconnect = false;
    cim_client::register(&quiet_config, "quiet", "password").await?;
    let (quiet, mut quiet_events) = loop {
        let (client, events) = login(&quiet_config, "quiet", false).await?;
        if client.info().server_id == victim_server {
            break (client, events);
        }
        client.logout().await?;
    };
    let quiet_id = quiet.info().user_id;
    let survivor = (0..clients.len())
        .find(|&i| clients[i].0.info().server_id != victim_server)
        .unwrap();

    let password_logins_before = password_logins(&cluster).await?;
    cluster.signal_server(victim_server, "KILL").await?;
    let killed_at = tokio::time::Instant::now();
    // The victims reconnect by themselves, through the router, to live servers.
    for &i in &victims {
        match next_event(
            &mut clients[i].1,
            Duration::from_millis(HEARTBEAT_MS * 3 + 3000),
        )
        .await?
        {
            Event::Disconnected(_) => {}
            other => panic!("expected a disconnect, got {other:?}"),
        }
        match next_event_past_retries(&mut clients[i].1, Duration::from_secs(30)).await? {
            Event::Reconnected(how) => {
                assert!(how.relogin, "{how:?}");
                assert_ne!(how.server_id, victim_server);
            }
            other => panic!("expected a reconnect, got {other:?}"),
        }
        assert_ne!(clients[i].0.info().server_id, victim_server);
        // With their session tokens: no password hashing on the routers.
        assert_eq!(clients[i].0.stats().token_relogins, 1);
    }
    assert_eq!(password_logins(&cluster).await?, password_logins_before);
    match next_event(
        &mut quiet_events,
        Duration::from_millis(HEARTBEAT_MS * 3 + 3000),
    )
    .await?
    {
        Event::Disconnected(_) => {}
        other => panic!("expected a disconnect, got {other:?}"),
    }
    // They chat again, both ways.
    for &i in &victims {
        let to = clients[survivor].0.info().user_id;
        clients[i].0.send_private(to, "back online").await?;
        assert_eq!(
            next_message(&mut clients[survivor].1).await?.body,
            "back online"
        );
        let to = clients[i].0.info().user_id;
        clients[survivor].0.send_private(to, "welcome back").await?;
        assert_eq!(next_message(&mut clients[i].1).await?.body, "welcome back");
    }
    // The dead server's routes are gone within the ZooKeeper session timeout plus slack.
    let mut redis = cluster.redis.conn().await?;
    let bound = Duration::from_millis(ZK_SESSION_MS) + Duration::from_secs(5);
    let remaining = bound.saturating_sub(killed_at.elapsed());
    eventually(remaining, || {
        let mut redis = redis.clone();
        async move {
            let left: Vec<u64> = redis.smembers("cim:server:{s2}:users").await.ok()?;
            let route: Option<String> =
                redis.get(format!("cim:{{u{quiet_id}}}:route")).await.ok()?;
            (left.is_empty() && route.is_none()).then_some(())
        }
    })
    .await?;
    let online = clients[survivor].0.online_users("").await?;
    assert!(!online.iter().any(|u| u.id == quiet_id), "{online:?}");
    assert_eq!(online.len(), 12);
    for &i in &victims {
        let route: String = redis
            .get(format!("cim:{{u{}}}:route", clients[i].0.info().user_id))
            .await?;
        assert!(!route.ends_with(victim_server), "{route}");
    }
    drop(quiet);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_restart_gives_clean_errors_then_normal_service() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 2, "round-robin").await?;
    let config = cluster.client_config(0);
    let mut clients = users(&cluster, "r", 2).await?;
    let bob_id = clients[1].0.info().user_id;

    let api = cim_client::RouterApi::new(&config)?;
    let ready = |api: cim_client::RouterApi| async move {
        api.raw(http::Method::GET, "/ready", Default::default(), None)
            .await
            .map(|(status, _)| status.as_u16())
    };
    assert_eq!(ready(api.clone()).await?, 200);
    let before = metric(&api, "cim_router_messages_total").await?;

    cluster.redis.kill().await?;
    // Readiness may answer from a store scan up to a second old.
    eventually(WAIT, || {
        let api = api.clone();
        async move { (ready(api).await.ok()? == 503).then_some(()) }
    })
    .await
    .context("readiness must fail while redis is down")?;
    let err = Client::login(&config, "r0", "password", LoginOptions { takeover: true })
        .await
        .err()
        .expect("login must fail while redis is down");
    assert!(
        matches!(&err, ClientError::Api { status: 503, .. }),
        "{err}"
    );
    assert_eq!(err.code(), Some("unavailable"));
    let err = clients[0]
        .0
        .send_private(bob_id, "during outage")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("unavailable"), "{err}");
    let err = cim_client::register(&config, "newcomer", "password")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some("unavailable"), "{err}");

    cluster.redis.restart().await?;
    eventually(WAIT, || async {
        clients[0].0.send_private(bob_id, "after outage").await.ok()
    })
    .await?;
    assert_eq!(next_message(&mut clients[1].1).await?.body, "after outage");
    cim_client::register(&config, "newcomer", "password").await?;
    let (newcomer, _events) = login(&config, "newcomer", false).await?;
    assert_eq!(newcomer.online_users("").await?.len(), 3);
    assert_eq!(ready(api.clone()).await?, 200);
    // The message counter moved with the message that went through.
    assert!(metric(&api, "cim_router_messages_total").await? > before);
    Ok(())
}

/// Password logins counted by all the routers.
async fn password_logins(cluster: &ProcCluster) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for i in 0..cluster.routers.len() {
        let api = cim_client::RouterApi::new(&cluster.client_config(i))?;
        total += metric(&api, "cim_router_logins_total").await?;
    }
    Ok(total)
}

/// The value of a counter on the router's /metrics.
async fn metric(api: &cim_client::RouterApi, name: &str) -> anyhow::Result<f64> {
    metric_value(&router_metrics(api).await?, name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_come_back_after_their_zookeeper_session_expires() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 2, "round-robin").await?;
    // Freeze s2 past its session timeout: ZooKeeper expires the session and drops its node.
    cluster.signal_server("s2", "STOP").await?;
    cluster.wait_servers(1).await?;
    cluster.signal_server("s2", "CONT").await?;
    // It notices the new session, registers again, and the router links to it again.
    cluster.wait_servers(2).await?;
    // And it serves: of two round-robin logins one lands on it, and they chat.
    let mut clients = users(&cluster, "z", 2).await?;
    let servers = per_server(&clients);
    assert_eq!(servers.get("s2"), Some(&1), "{servers:?}");
    let to = clients[1].0.info().user_id;
    clients[0].0.send_private(to, "after expiry").await?;
    assert_eq!(next_message(&mut clients[1].1).await?.body, "after expiry");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn of_concurrent_logins_of_one_user_exactly_one_wins() -> anyhow::Result<()> {
    let cluster = ProcCluster::start(2, 2, "round-robin").await?;
    cim_client::register(&cluster.client_config(0), "solo", "password").await?;
    // Spawned all at once (a lazy `map` would start each only after the one before ended).
    let attempts: Vec<_> = (0..8)
        .map(|i| {
            let config = cluster.client_config(i % 2);
            tokio::spawn(async move { login(&config, "solo", false).await })
        })
        .collect();
    let mut won = Vec::new();
    let mut refused = 0;
    for attempt in attempts {
        match attempt.await? {
            Ok(pair) => won.push(pair),
            Err(e) => {
                let code = e
                    .downcast_ref::<ClientError>()
                    .and_then(|e| e.code())
                    .map(str::to_owned);
                assert_eq!(code.as_deref(), Some("already_online"), "{e:#}");
                refused += 1;
            }
        }
    }
    assert_eq!((won.len(), refused), (1, 7));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hash_moves_only_the_departed_servers_users() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 3, "consistent-hash").await?;
    let config = cluster.client_config(0);
    let names: Vec<String> = (0..30).map(|i| format!("h{i}")).collect();
    let mut before = HashMap::new();
    for name in &names {
        cim_client::register(&config, name, "password").await?;
        let (client, _events) = login(&config, name, false).await?;
        before.insert(name.clone(), client.info().server_id.clone());
        client.logout().await?;
    }
    let on_s3 = before.values().filter(|s| *s == "s3").count();
    assert!(on_s3 > 0 && on_s3 < 30, "{before:?}");

    cluster.signal_server("s3", "TERM").await?; // graceful: leaves discovery at once
    cluster.wait_servers(2).await?;
    // Where the departed server's users went: the ring (the test's own Redis numbers the users
    // from 1, and the hash is fixed) spreads them over both servers left, not all onto one.
    let mut moved_to = std::collections::HashSet::new();
    for name in &names {
        let (client, _events) = login(&config, name, false).await?;
        let now = client.info().server_id.clone();
        if before[name] == "s3" {
            assert_ne!(now, "s3");
            moved_to.insert(now);
        } else {
            assert_eq!(now, before[name], "{name} moved although its server stayed");
        }
        client.logout().await?;
    }
    assert_eq!(moved_to.len(), 2, "{moved_to:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sessions_keep_their_routes_past_the_route_lease() -> anyhow::Result<()> {
    let cluster = ProcCluster::start(1, 2, "round-robin").await?;
    let mut clients = users(&cluster, "l", 2).await?;
    // Waiting is the point here: routes expire one lease after their last renewal, so only
    // working renewals keep these sessions reachable.
    tokio::time::sleep(Duration::from_millis(ROUTE_LEASE_MS * 2)).await;
    assert_eq!(clients[0].0.online_users("").await?.len(), 2);
    let to = clients[1].0.info().user_id;
    clients[0].0.send_private(to, "still routed").await?;
    assert_eq!(next_message(&mut clients[1].1).await?.body, "still routed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_server_loses_nothing() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 3, "round-robin").await?;
    let clients = users(&cluster, "rr", 6).await?;
    let ids: Vec<u64> = clients.iter().map(|(c, _)| c.info().user_id).collect();
    let (clients, mut events): (Vec<Client>, Vec<Events>) = clients.into_iter().unzip();
    let sending = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Each client sends to the next one in a ring, as fast as acks come back.
    let mut senders = Vec::new();
    for (i, client) in clients.into_iter().enumerate() {
        let to = ids[(i + 1) % ids.len()];
        let sending = sending.clone();
        let progress = progress.clone();
        senders.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut n = 0;
            while sending.load(std::sync::atomic::Ordering::Relaxed) {
                let body = format!("{i}:{n}");
                if client.send_private(to, &body).await.is_ok() {
                    acked.push(body);
                    progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                n += 1;
            }
            (client, acked)
        }));
    }
    // Traffic flows before, between and after the restarts.
    let flowing = |at_least: usize| {
        let progress = progress.clone();
        eventually(Duration::from_secs(30), move || {
            let progress = progress.clone();
            async move {
                (progress.load(std::sync::atomic::Ordering::Relaxed) >= at_least).then_some(())
            }
        })
    };
    flowing(60).await?;
    for id in ["s1", "s2", "s3"] {
        cluster.restart_server(id).await?;
        cluster.wait_servers(3).await?;
        let now = progress.load(std::sync::atomic::Ordering::Relaxed);
        flowing(now + 60).await?;
    }
    sending.store(false, std::sync::atomic::Ordering::Relaxed);
    let mut acked_for = vec![Vec::new(); ids.len()];
    let mut keep = Vec::new();
    for (i, sender) in senders.into_iter().enumerate() {
        let (client, acked) = sender.await?;
        acked_for[(i + 1) % ids.len()] = acked;
        keep.push(client);
    }
    for (r, want) in acked_for.iter().enumerate() {
        assert!(
            want.len() > 10,
            "too few messages went through: {}",
            want.len()
        );
        let mut got = Vec::new();
        let mut drained = 0;
        let mut count = |event: Event, got: &mut Vec<String>| match event {
            Event::Message(m) => got.push(m.body),
            Event::Drain(_) => drained += 1,
            Event::Disconnected(_) | Event::Reconnecting { .. } | Event::Reconnected(_) => {}
            other => panic!("unexpected {other:?}"),
        };
        while got.len() < want.len() {
            count(
                next_event(&mut events[r], Duration::from_secs(30)).await?,
                &mut got,
            );
        }
        // What came after the last message: a drain there still counts; a message there is
        // one too many.
        while let Ok(event) = next_event(&mut events[r], Duration::from_millis(200)).await {
            count(event, &mut got);
        }
        assert_eq!(&got, want, "client {r}: every acked message once, in order");
        // Every client sat on a server when it restarted (each one did), and was drained off.
        assert!(drained >= 1, "client {r} was never drained");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_no_router_answers_is_resent_until_a_router_does() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 1, "round-robin").await?;
    let mut clients = users(&cluster, "nr", 2).await?;
    let (bob, mut bob_events) = clients.pop().unwrap();
    let (alice, _alice_events) = clients.pop().unwrap();
    alice.send_private(bob.info().user_id, "before").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "before");

    // The only router dies. The server cannot learn whether a forward was stored (a router may
    // store it and then lose the link), so it answers "retry" and the client sends the same
    // id again until a router answers.
    cluster.routers[0].1.child.kill().await?;
    let bob_id = bob.info().user_id;
    let sending = tokio::spawn(async move {
        let ack = alice.send_private(bob_id, "across the gap").await;
        (alice, ack)
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    cluster.add_router().await?;
    let (alice, ack) = sending.await?;
    // If Bob's route lapsed while no router renewed it, the first push went nowhere; the next
    // message then shows Bob the gap and he pulls.
    resent_once_in_order(&alice, ack?, bob_id, &mut bob_events, "across the gap").await
}

/// Checks that a send acked after resends arrived once, before a message sent after it.
async fn resent_once_in_order(
    alice: &Client,
    ack: cim_client::Ack,
    bob_id: u64,
    bob_events: &mut Events,
    body: &str,
) -> anyhow::Result<()> {
    assert!(ack.msg_id > 0 && ack.recipients == 1, "{ack:?}");
    assert!(
        alice.stats().send_retries >= 1,
        "the first attempt cannot have succeeded"
    );
    alice.send_private(bob_id, "after").await?;
    let mut got = Vec::new();
    for _ in 0..2 {
        got.push(next_message(bob_events).await?.body);
    }
    assert_eq!(got, [body, "after"], "each message once, in order");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_whose_append_fails_after_its_id_was_recorded_is_resent_not_refused()
-> anyhow::Result<()> {
    let cluster = ProcCluster::start(1, 1, "round-robin").await?;
    let mut clients = users(&cluster, "af", 2).await?;
    let (bob, mut bob_events) = clients.pop().unwrap();
    let (alice, _alice_events) = clients.pop().unwrap();
    let bob_id = bob.info().user_id;
    alice.send_private(bob_id, "before").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "before");

    // Scripts (the inbox append) are refused while plain commands (recording the message id)
    // work: the router has the id but cannot tell whether an append ran, as after a lost reply.
    let mut redis = cluster.redis.conn().await?;
    let acl = |rule: &'static str| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg("default").arg(rule);
        cmd
    };
    let _: () = acl("-@scripting").query_async(&mut redis).await?;
    let alice = std::sync::Arc::new(alice);
    let sending = tokio::spawn({
        let alice = alice.clone();
        async move { alice.send_private(bob_id, "while appends fail").await }
    });
    // Scripts come back once the router has refused at least one attempt.
    eventually(WAIT, || async {
        (alice.stats().send_retries >= 1).then_some(())
    })
    .await?;
    let _: () = acl("+@all").query_async(&mut redis).await?;
    let ack = sending.await??;
    resent_once_in_order(&alice, ack, bob_id, &mut bob_events, "while appends fail").await
}

/// The message-id nodes held in Redis, as node -> owner (router id and process tag).
async fn id_node_owners(cluster: &ProcCluster) -> anyhow::Result<HashMap<u16, String>> {
    let mut redis = cluster.redis.conn().await?;
    let held: HashMap<u16, String> = redis.hgetall("cim:id_nodes").await?;
    let now_ms = cim_core::now_ms();
    Ok(held
        .into_iter()
        .filter_map(|(node, value)| {
            let mut parts = value.splitn(3, '|');
            let expires: u64 = parts.next()?.parse().ok()?;
            let owner = parts.nth(1)?.to_string();
            (expires > now_ms).then_some((node, owner))
        })
        .collect())
}

/// The node number in a message id (bits 12 to 21).
fn node_of(msg_id: u64) -> u16 {
    ((msg_id >> 12) & 1023) as u16
}

/// Two routers could share a node number if each picked its own, and then issue the same id
/// to two messages (a recipient takes the second for a resend of the first: acked, never
/// stored). Each router holds its node in Redis instead; one whose node is taken (as after its
/// hold lapsed) stops using it and claims another.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_router_holds_its_own_message_id_node() -> anyhow::Result<()> {
    let cluster = ProcCluster::start(2, 1, "round-robin").await?;
    let held = id_node_owners(&cluster).await?;
    let node_of_router = |held: &HashMap<u16, String>, router: &str| {
        let nodes: Vec<u16> = held
            .iter()
            .filter(|(_, owner)| owner.starts_with(&format!("{router}#")))
            .map(|(node, _)| *node)
            .collect();
        assert_eq!(nodes.len(), 1, "{router} holds one node: {held:?}");
        nodes[0]
    };
    let r1 = node_of_router(&held, "r1");
    let r2 = node_of_router(&held, "r2");
    assert_ne!(r1, r2);

    // A message through router 1's HTTP API carries its node.
    let (bob, mut bob_events) = users(&cluster, "idn", 1).await?.pop().unwrap();
    let config = cluster.client_config(0);
    cim_client::register(&config, "carol", "password").await?;
    let api = cim_client::RouterApi::new(&config)?;
    let login: serde_json::Value = api
        .call(
            http::Method::POST,
            "/api/login",
            Some(&serde_json::json!({"name": "carol", "password": "password"})),
            None,
        )
        .await?;
    let token = login["token"].as_str().context("no token")?.to_string();
    let to = bob.info().user_id;
    let send = |body: &'static str| {
        let (api, token) = (&api, &token);
        async move {
            let sent: serde_json::Value = api
                .call(
                    http::Method::POST,
                    "/api/messages",
                    Some(&serde_json::json!({"to": to, "body": body})),
                    Some(token),
                )
                .await?;
            let id = sent["msg_id"].as_u64().context("no msg_id")?;
            // The decimal twin for JavaScript, whose numbers round ids above 2^53.
            assert!(id > 1 << 53, "message ids are above 2^53: {id}");
            assert_eq!(sent["msg_id_str"].as_str(), Some(id.to_string().as_str()));
            anyhow::Ok(id)
        }
    };
    let first = send("first").await?;
    assert_eq!(node_of(first), r1, "message {first} has router 1's node");
    assert_eq!(next_message(&mut bob_events).await?.msg_id, first);

    // Someone else takes router 1's node: it claims another within a renewal and its ids move.
    let mut redis = cluster.redis.conn().await?;
    let forever = cim_core::now_ms() + 3_600_000;
    let _: () = redis
        .hset("cim:id_nodes", r1, format!("{forever}|0|intruder#1"))
        .await?;
    let moved = eventually(WAIT, || async {
        let held = id_node_owners(&cluster).await.ok()?;
        held.iter()
            .find(|(_, owner)| owner.starts_with("r1#"))
            .map(|(node, _)| *node)
    })
    .await?;
    assert!(moved != r1 && moved != r2, "moved to {moved}");
    let second = send("second").await?;
    assert_eq!(node_of(second), moved);
    let got = next_message(&mut bob_events).await?;
    assert_eq!((got.msg_id, got.body.as_str()), (second, "second"));
    Ok(())
}

/// A server that no router reaches any more drains its clients after
/// `--routerless-drain-ms`, so that they log in again through a router and land on a server it
/// can reach. Before, heartbeats kept them on it, unable to send (every send answered
/// `retry`) or receive, for as long as the cut lasted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_no_router_reaches_drains_its_clients() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 0, "round-robin").await?;
    cluster
        .add_server_with("s1", &["--routerless-drain-ms", "1000"])
        .await?;
    cluster.wait_servers(1).await?;
    let (_ann, mut events) = users(&cluster, "rl", 1).await?.pop().unwrap();
    cluster.routers[0].1.child.kill().await?;
    // The link times out (4 s without packets), and a second later the server drains.
    let reason = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match events.next().await {
                Some(Event::Drain(reason)) => return Some(reason),
                Some(_) => {}
                None => return None,
            }
        }
    })
    .await
    .context("no drain")?;
    assert_eq!(reason.as_deref(), Some("no router reaches this server"));
    Ok(())
}
