//! Nothing lost: through a lossy relay, across blackouts, socket rebinds, retries, sends that
//! share a stream (also cut off by a blackout), a message stored while its recipient logs in
//! or while its connected recipient's route was missing,
//! a login storm whose session reports travel in batches, a killed server and a killed router
//! (one of two), every acked
//! message reaches its recipient exactly once and in order. Each scenario runs on the
//! in-memory store and on a real Redis, except the login race and the login storm, which need
//! a store that stops or slows down at the right moment.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;

use cim_client::{Client, ClientConfig, Event, Events, LoginOptions, Target};
use cim_integration_tests::cluster::ProcCluster;
use cim_integration_tests::relay::{Impairments, Relay};
use cim_integration_tests::{
    Backend, TestCluster, WAIT, eventually, metric_value, next_event, next_event_past_retries,
    next_message, router_metrics,
};
use cim_proto::v1::{ClientControl, Login, Ping, ServerControl, client_control, server_control};
use cim_proto::{read_required, write_frame};
use cim_router::store::{
    Account, Block, Claim, DeletedAccount, GroupInfo, IdNode, InboxEntry, InboxLimits, InboxPage,
    Invite, Join, MemoryStore, Privacy, PrivateAppend, ReadReceipt, Relogin, Removal, Renewal,
    Report, Revocation, Route, Store, StoreError, Transfer,
};
use tokio::sync::Notify;

/// A one-server cluster with a relay in front of the server.
async fn relayed(
    backend: Backend,
    impairments: Impairments,
    seed: u64,
) -> anyhow::Result<(TestCluster, Relay)> {
    relayed_with(backend, impairments, seed, |_| {}).await
}

/// [`relayed`] with the cluster's configuration adjusted by `tweak`.
async fn relayed_with(
    backend: Backend,
    impairments: Impairments,
    seed: u64,
    tweak: impl FnOnce(&mut cim_router::embedded::EmbeddedConfig),
) -> anyhow::Result<(TestCluster, Relay)> {
    let cluster = TestCluster::start_with(1, backend, tweak).await?;
    let server = cluster.embedded.servers[0].1;
    let relay = Relay::start(server, impairments, seed).await?;
    Ok((cluster, relay))
}

/// Registers `name` and logs in, through `relay` if given.
async fn user(
    cluster: &TestCluster,
    relay: Option<&Relay>,
    name: &str,
) -> anyhow::Result<(Client, Events)> {
    let mut config: ClientConfig = cluster.client_config();
    if let Some(relay) = relay {
        config.server_overrides = HashMap::from([(cluster.embedded.servers[0].1, relay.addr)]);
    }
    cim_client::register(&config, name, "password").await?;
    Ok(Client::login(&config, name, "password", LoginOptions::default()).await?)
}

/// Receives messages until `want` arrived, skipping connection events. Fails on anything else.
async fn receive(
    events: &mut Events,
    want: usize,
    timeout: Duration,
) -> anyhow::Result<Vec<cim_client::IncomingMessage>> {
    let mut got = Vec::with_capacity(want);
    let deadline = tokio::time::Instant::now() + timeout;
    while got.len() < want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(events, left).await {
            Ok(Event::Message(m)) => got.push(m),
            Ok(Event::Disconnected(_) | Event::Reconnected(_)) => {}
            Ok(other) => anyhow::bail!("unexpected event {other:?}"),
            Err(e) => anyhow::bail!("{e:#}: got {} of {want} messages", got.len()),
        }
    }
    Ok(got)
}

/// Asserts `got` is exactly `prefix0..prefixN` with gapless sequence numbers.
fn assert_exactly_in_order(got: &[cim_client::IncomingMessage], prefix: &str, n: usize) {
    let bodies: Vec<String> = got.iter().map(|m| m.body.clone()).collect();
    let want: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    assert_eq!(bodies, want);
    assert_gapless(got);
}

/// Asserts that the sequence numbers of `got` follow each other without a gap.
fn assert_gapless(got: &[cim_client::IncomingMessage]) {
    for pair in got.windows(2) {
        assert_eq!(
            pair[1].seq,
            pair[0].seq + 1,
            "sequence numbers must be gapless"
        );
    }
}

/// Sends a marker and checks it is the very next message: nothing extra arrived before it.
async fn assert_nothing_more(
    from: &Client,
    to: &Client,
    to_events: &mut Events,
) -> anyhow::Result<()> {
    from.send_private(to.info().user_id, "marker").await?;
    let next = receive(to_events, 1, WAIT).await?;
    assert_eq!(
        next[0].body, "marker",
        "a duplicate or stray message arrived"
    );
    Ok(())
}

async fn lossy_link_delivers_every_message_once_in_order(backend: Backend) -> anyhow::Result<()> {
    let (cluster, relay) = relayed(backend, Impairments::lossy(0.10), 7).await?;
    let (alice, mut _alice_events) = user(&cluster, Some(&relay), "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    let n = 1000;
    let to = bob.info().user_id;
    let sender = tokio::spawn(async move {
        for i in 0..n {
            alice.send_private(to, &format!("m{i}")).await?;
        }
        Ok::<_, anyhow::Error>(alice)
    });
    let got = receive(&mut bob_events, n, Duration::from_secs(120)).await?;
    let alice = sender.await??;
    assert_exactly_in_order(&got, "m", n);
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    let dropped = relay
        .stats()
        .dropped
        .load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        dropped > 100,
        "the relay should have dropped packets, dropped {dropped}"
    );
    Ok(())
}

async fn an_offline_recipient_gets_everything_in_order_when_back(
    backend: Backend,
) -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(2, backend).await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, _bob_events) = user(&cluster, None, "bob").await?;
    let bob_id = bob.info().user_id;
    bob.close().await;
    for i in 0..100 {
        alice
            .send_private(bob_id, &format!("while away {i}"))
            .await?;
    }
    let config = cluster.client_config();
    let (bob, mut bob_events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    let got = receive(&mut bob_events, 100, WAIT).await?;
    assert_exactly_in_order(&got, "while away ", 100);
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    // Bob's login said his inbox held more than he had, so he pulled.
    assert!(bob.stats().pulls >= 1, "{:?}", bob.stats());
    Ok(())
}

/// A message stored while its recipient's route was missing (it lapsed, or was removed while
/// the server was out of discovery) while the recipient stayed connected reaches the client
/// once the server's renewal brings the route back, within a few heartbeats. Before, nothing
/// pushed it: it waited for the client's next message or its idle pull, minutes later.
async fn a_message_stored_while_the_route_was_missing_arrives_once_it_is_back(
    backend: Backend,
) -> anyhow::Result<()> {
    // Renewals far enough apart that the send below lands before the route is back.
    let cluster = TestCluster::start_with(1, backend, |c| {
        c.renew_interval = Duration::from_secs(2);
    })
    .await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, None, "bob").await?;
    let bob_id = bob.info().user_id;
    alice.send_private(bob_id, "before").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "before");
    cluster.drop_route(bob_id).await?;
    alice.send_private(bob_id, "while unrouted").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "while unrouted");
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

/// A message stored whose push never reached the recipient's server (a router that could not
/// reach it, or failed to read the route: here the entry goes into the store directly) while
/// the recipient stays connected arrives by the server's next renewal, which says the inbox
/// is ahead of what the server pushed. Before, it waited for the next message or the 5-minute
/// idle pull.
async fn a_message_whose_push_was_lost_arrives_after_the_next_renewal(
    backend: Backend,
) -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(1, backend, |c| {
        c.renew_interval = Duration::from_millis(500);
    })
    .await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, None, "bob").await?;
    let bob_id = bob.info().user_id;
    alice.send_private(bob_id, "pushed").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "pushed");
    let entry = InboxEntry {
        msg_id: 42,
        from_user: alice.info().user_id,
        from_name: "alice".into(),
        group: String::new(),
        body: "never pushed".into(),
        created_at_ms: cim_core::now_ms(),
        unsends: None,
    };
    let (seq, _) = cluster
        .embedded
        .store
        .append_private(bob_id, &entry, InboxLimits::default())
        .await?
        .stored()
        .context("bob's account is gone")?;
    assert_eq!(seq, 2);
    assert_eq!(next_message(&mut bob_events).await?.body, "never pushed");
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

/// A client whose application is a full event queue behind (it waits on a send instead of
/// reading) still reconnects after losing its connection, and the send goes through: the
/// `Disconnected` event waits for room while the reconnect runs. Before, the reconnect waited
/// behind the event, the send behind the reconnect, and both until the send timed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_event_queue_does_not_hold_up_the_reconnect() -> anyhow::Result<()> {
    let (cluster, relay) = relayed(Backend::Memory, Impairments::none(), 13).await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let mut config = cluster.client_config();
    config.server_overrides = HashMap::from([(cluster.embedded.servers[0].1, relay.addr)]);
    config.send_timeout = Duration::from_secs(15);
    cim_client::register(&config, "bob", "password").await?;
    let (bob, mut bob_events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    // More than Bob's event queue holds (1,024), none read.
    let bob_id = bob.info().user_id;
    for i in 0..1100 {
        alice.send_private(bob_id, &format!("queued {i}")).await?;
    }
    eventually(WAIT, || async {
        (bob.last_seq().await >= 1024).then_some(())
    })
    .await?;
    // The connection goes (heartbeat timeout: 2 s) and comes back after three seconds.
    relay.set_blackout(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    relay.set_blackout(false);
    let sent = tokio::time::timeout(
        Duration::from_secs(12),
        bob.send_private(alice.info().user_id, "still here"),
    )
    .await;
    assert!(
        matches!(sent, Ok(Ok(_))),
        "the send waited for the application: {sent:?}"
    );
    // Every message comes, once and in order.
    let got = receive(&mut bob_events, 1100, WAIT).await?;
    assert_exactly_in_order(&got, "queued ", 1100);
    Ok(())
}

async fn a_five_second_blackout_heals_by_itself(backend: Backend) -> anyhow::Result<()> {
    let (cluster, relay) = relayed(backend, Impairments::none(), 11).await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    relay.set_blackout(true);
    for i in 0..20 {
        alice
            .send_private(bob.info().user_id, &format!("dark {i}"))
            .await?;
    }
    // The blackout lasts five seconds: that is the scenario, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(5)).await;
    relay.set_blackout(false);
    match next_event(&mut bob_events, WAIT).await? {
        Event::Disconnected(_) => {}
        other => panic!("expected a disconnect, got {other:?}"),
    }
    // Five seconds outlast the server's heartbeat timeout (2 s here), so the server has ended
    // the session: the client resumes it (its route comes back) or, past its short resume
    // attempt, logs in again with its token. Never with the password.
    match next_event_past_retries(&mut bob_events, Duration::from_secs(30)).await? {
        Event::Reconnected(_) => {
            let stats = bob.stats();
            assert_eq!(stats.relogins, stats.token_relogins, "{stats:?}");
        }
        other => panic!("expected a reconnect, got {other:?}"),
    }
    let got = receive(&mut bob_events, 20, WAIT).await?;
    assert_exactly_in_order(&got, "dark ", 20);
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

/// Blacks `relay` out until the client notices, and for `after_notice` more, then lets traffic
/// through again; returns how the client reconnected.
async fn outage(
    relay: &Relay,
    events: &mut Events,
    after_notice: Duration,
) -> anyhow::Result<cim_client::Reconnected> {
    relay.set_blackout(true);
    match next_event(events, WAIT).await? {
        Event::Disconnected(_) => {}
        other => anyhow::bail!("expected a disconnect, got {other:?}"),
    }
    tokio::time::sleep(after_notice).await;
    relay.set_blackout(false);
    match next_event_past_retries(events, Duration::from_secs(30)).await? {
        Event::Reconnected(how) => Ok(how),
        other => anyhow::bail!("expected a reconnect, got {other:?}"),
    }
}

async fn a_short_outage_resumes_with_zero_rtt(backend: Backend) -> anyhow::Result<()> {
    let (cluster, relay) = relayed(backend, Impairments::none(), 13).await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    let how = outage(&relay, &mut bob_events, Duration::ZERO).await?;
    assert!(!how.relogin, "{how:?}");
    assert!(how.zero_rtt, "resumption should use 0-RTT: {how:?}");
    alice
        .send_private(bob.info().user_id, "after resume")
        .await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "after resume");
    Ok(())
}

async fn an_outage_after_the_login_token_expired_resumes_with_a_renewed_one(
    backend: Backend,
) -> anyhow::Result<()> {
    // Tokens live 6 s; the server renews a session's token when less than 3 s are left.
    let ttl = Duration::from_secs(6);
    let (cluster, relay) =
        relayed_with(backend, Impairments::none(), 19, |c| c.token_ttl = ttl).await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    // Signed before this instant, so expired by this instant plus the lifetime.
    let logged_in = tokio::time::Instant::now();
    let login_token = bob.token();
    // Past the login token's lifetime, the session holds a newer token...
    tokio::time::sleep_until(logged_in + ttl + Duration::from_millis(500)).await;
    assert!(bob.stats().token_renewals >= 1, "{:?}", bob.stats());
    assert_ne!(bob.token(), login_token);
    // ...that the router's HTTP API accepts, where the login token is refused.
    assert_eq!(bob.online_users("").await?.len(), 2);
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    let expired = api
        .call::<(), serde_json::Value>(
            http::Method::GET,
            "/api/users/online",
            None,
            Some(&login_token),
        )
        .await
        .unwrap_err();
    assert_eq!(expired.code(), Some("unauthorized"), "{expired}");
    // An outage now resumes the same session on the same server, no password login.
    let how = outage(&relay, &mut bob_events, Duration::ZERO).await?;
    assert!(!how.relogin, "{how:?}");
    alice
        .send_private(bob.info().user_id, "after the outage")
        .await?;
    assert_eq!(
        next_message(&mut bob_events).await?.body,
        "after the outage"
    );
    Ok(())
}

async fn a_blackout_the_server_outlasts_resumes_the_same_session(
    backend: Backend,
) -> anyhow::Result<()> {
    // The server keeps a silent session for 10 s; the client gives up on the server after
    // 0.9 s and on a resume attempt after 2 s, then asks the router, which answers
    // `session_live` and sends it back to resuming until the blackout ends.
    let (cluster, relay) = relayed_with(backend, Impairments::none(), 23, |c| {
        c.heartbeat_timeout = Duration::from_secs(10)
    })
    .await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    // Dark long enough after the notice for the resume attempt to fail and the router to be
    // asked (the scenario).
    let how = outage(&relay, &mut bob_events, Duration::from_secs(4)).await?;
    assert!(!how.relogin, "{how:?}");
    assert_eq!(bob.stats().relogins, 0, "{:?}", bob.stats());
    alice
        .send_private(bob.info().user_id, "same session")
        .await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "same session");
    Ok(())
}

async fn rebinding_the_socket_keeps_the_session(backend: Backend) -> anyhow::Result<()> {
    let (cluster, relay) = relayed(backend, Impairments::none(), 17).await?;
    let (alice, mut alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    alice.send_private(bob.info().user_id, "before").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "before");

    let before = bob.stats();
    let old_addr = bob.local_addr()?;
    let new_addr = bob.rebind("127.0.0.1:0".parse()?)?;
    alice
        .send_private(bob.info().user_id, "after rebind")
        .await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "after rebind");
    bob.send_private(alice.info().user_id, "from the new address")
        .await?;
    assert_eq!(
        next_message(&mut alice_events).await?.body,
        "from the new address"
    );
    let after = bob.stats();
    assert_eq!(
        (after.reconnects, after.relogins),
        (before.reconnects, before.relogins),
        "{after:?}"
    );
    assert_ne!(new_addr, old_addr, "the session moved to another socket");
    Ok(())
}

/// Asserts that `got` holds `{prefix}{k}-{i}` for every sender `k` and `i` below `per_sender`,
/// each once, every sender's in order.
fn assert_each_sender_once_in_order(
    got: &[cim_client::IncomingMessage],
    prefix: &str,
    senders: usize,
    per_sender: usize,
) {
    for k in 0..senders {
        let from_k: Vec<&str> = got
            .iter()
            .map(|m| m.body.as_str())
            .filter(|b| b.starts_with(&format!("{prefix}{k}-")))
            .collect();
        let want: Vec<String> = (0..per_sender)
            .map(|i| format!("{prefix}{k}-{i}"))
            .collect();
        assert_eq!(from_k, want, "sender {k}'s messages, once each, in order");
    }
}

/// Starts `loops` tasks that each send `{prefix}{k}-0`, `{prefix}{k}-1`, ... to `to` from
/// `client`, one after the other: `loops` sends in flight.
fn send_loops(
    client: &Arc<Client>,
    to: u64,
    prefix: &'static str,
    loops: usize,
    per_loop: usize,
) -> Vec<tokio::task::JoinHandle<anyhow::Result<()>>> {
    (0..loops)
        .map(|k| {
            let client = client.clone();
            tokio::spawn(async move {
                for i in 0..per_loop {
                    client.send_private(to, &format!("{prefix}{k}-{i}")).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect()
}

async fn a_retried_client_message_id_is_delivered_once(backend: Backend) -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(1, backend).await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, None, "bob").await?;
    let to = Target::ToUser(bob.info().user_id);
    let first = alice.send_with_id(42, to.clone(), "only once").await?;
    let again = alice.send_with_id(42, to.clone(), "only once").await?;
    assert_eq!(first.msg_id, again.msg_id);
    let got = receive(&mut bob_events, 1, WAIT).await?;
    assert_eq!(got[0].body, "only once");
    // The same id for another message is no retry: refused, not acked with the first's id
    // (which would report a message never stored as sent).
    let alice_id = alice.info().user_id;
    for (target, body) in [
        (to.clone(), "another message"),
        (Target::ToUser(alice_id), "only once"),
    ] {
        let reused = alice.send_with_id(42, target, body).await.unwrap_err();
        assert_eq!(reused.code(), Some("client_msg_id_reused"), "{reused}");
    }
    let retried = alice.send_with_id(42, to.clone(), "only once").await?;
    assert_eq!(
        retried.msg_id, first.msg_id,
        "the record stays the first message's"
    );
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

async fn a_busy_recipient_gets_every_message_once_in_order(backend: Backend) -> anyhow::Result<()> {
    let cluster = TestCluster::start_on(1, backend).await?;
    let (bob, mut bob_events) = user(&cluster, None, "bob").await?;
    let to = bob.info().user_id;
    let (senders, per_sender) = (8, 250);
    let mut tasks = Vec::new();
    for k in 0..senders {
        let (sender, _events) = user(&cluster, None, &format!("sender{k}")).await?;
        tasks.push(tokio::spawn(async move {
            for i in 0..per_sender {
                sender.send_private(to, &format!("s{k}-{i}")).await?;
            }
            Ok::<_, anyhow::Error>(sender)
        }));
    }
    // Bob reads nothing until every message is stored: his event queue fills, his streams
    // stall and the server's deliveries to him queue up and leave in batches.
    let mut clients = Vec::new();
    for task in tasks {
        clients.push(task.await??);
    }
    let got = receive(&mut bob_events, senders * per_sender, WAIT).await?;
    assert_gapless(&got);
    assert_each_sender_once_in_order(&got, "s", senders, per_sender);
    assert_nothing_more(&clients[0], &bob, &mut bob_events).await?;
    Ok(())
}

/// A sender with several sends in flight: the ones queued behind an unacked send share a
/// stream. Through a lossy link, so that shared streams lose packets on the way.
async fn sends_that_share_streams_are_delivered_once_in_order(
    backend: Backend,
) -> anyhow::Result<()> {
    let (cluster, relay) = relayed(backend, Impairments::lossy(0.05), 11).await?;
    let (alice, _alice_events) = user(&cluster, Some(&relay), "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    let alice = Arc::new(alice);
    let to = bob.info().user_id;
    let (loops, per_loop) = (8, 50);
    let tasks = send_loops(&alice, to, "w", loops, per_loop);
    for task in tasks {
        task.await??;
    }
    let got = receive(&mut bob_events, loops * per_loop, Duration::from_secs(120)).await?;
    assert_gapless(&got);
    assert_each_sender_once_in_order(&got, "w", loops, per_loop);
    let shared = alice.stats().sends_shared;
    assert!(shared > 0, "no send shared a stream");
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

/// Shared send streams cut off by a blackout longer than a send attempt: the sends on them
/// fail, are sent again with the same ids (on the resumed or new connection), and each is
/// delivered once, every sender loop's in order.
async fn shared_send_streams_cut_by_a_blackout_are_retried_once(
    backend: Backend,
) -> anyhow::Result<()> {
    let (cluster, relay) = relayed(backend, Impairments::none(), 13).await?;
    let (alice, _alice_events) = user(&cluster, Some(&relay), "alice").await?;
    let (bob, mut bob_events) = user(&cluster, None, "bob").await?;
    let alice = Arc::new(alice);
    let to = bob.info().user_id;
    let (loops, per_loop) = (8, 20);
    let tasks = send_loops(&alice, to, "b", loops, per_loop);
    let mut got = receive(&mut bob_events, 40, WAIT).await?;
    relay.set_blackout(true);
    // Longer than a send attempt (5 s): that is the scenario, not a synchronisation.
    tokio::time::sleep(Duration::from_secs(6)).await;
    relay.set_blackout(false);
    for task in tasks {
        task.await??;
    }
    got.extend(receive(&mut bob_events, loops * per_loop - got.len(), WAIT).await?);
    assert_each_sender_once_in_order(&got, "b", loops, per_loop);
    let stats = alice.stats();
    assert!(stats.send_retries > 0, "nothing was retried: {stats:?}");
    assert!(stats.sends_shared > 0, "no send shared a stream: {stats:?}");
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

/// A login storm on one server: the server reports the opened sessions to the router in
/// batches, and each login must get its own confirmation back. Half the users have messages
/// waiting and half have none; a login answered with the confirmation of a user with an empty
/// inbox (which tells the client there is nothing to pull) would never see its waiting
/// messages. Then they all close at once, and the reports of the closed sessions go in
/// batches too: each must release its own user's route (or that user stays online and cannot
/// log in again without taking over). Route confirmations and releases take 200 ms, so the
/// reports queue up behind the two batches in flight, and a cheap password cost lets the logins
/// reach the server together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_storm_gets_each_session_its_own_confirmation() -> anyhow::Result<()> {
    const USERS: usize = 48;
    let store = PausingStore::new(Duration::from_millis(200));
    store.slow_reports.store(true, Ordering::SeqCst);
    let cluster = TestCluster::start_on_store(1, store.clone(), |config| {
        config.password_cost = cim_router::password::Cost {
            memory_kib: 256,
            iterations: 1,
        };
    })
    .await?;
    let config = cluster.client_config();
    let mut ids = Vec::new();
    for i in 0..USERS {
        ids.push(cim_client::register(&config, &format!("storm{i}"), "password").await?);
    }
    let waiting = |i: usize| if i.is_multiple_of(2) { i % 3 + 1 } else { 0 };
    let (sender, _sender_events) = cluster.user("sender").await?;
    for (i, &id) in ids.iter().enumerate() {
        for k in 0..waiting(i) {
            sender.send_private(id, &format!("waiting {i}.{k}")).await?;
        }
    }

    let mut clients = log_in_at_once(&config, USERS).await?;
    for (i, (client, events)) in clients.iter_mut().enumerate() {
        assert_eq!(client.info().user_id, ids[i]);
        let want: Vec<String> = (0..waiting(i))
            .map(|k| format!("waiting {i}.{k}"))
            .collect();
        let got = receive(events, want.len(), WAIT).await?;
        let got: Vec<String> = got.into_iter().map(|m| m.body).collect();
        assert_eq!(got, want, "user {i}");
        assert_nothing_more(&sender, client, events).await?;
    }

    let closing: Vec<_> = clients
        .into_iter()
        .map(|(client, _)| tokio::spawn(client.close()))
        .collect();
    for close in closing {
        close.await?;
    }
    eventually(WAIT, || async {
        let online = sender.online_users("storm").await.ok()?;
        online.is_empty().then_some(())
    })
    .await?;
    log_in_at_once(&config, USERS).await?;
    Ok(())
}

/// Logs `storm0` to `storm{n-1}` in, all at once.
async fn log_in_at_once(config: &ClientConfig, n: usize) -> anyhow::Result<Vec<(Client, Events)>> {
    let logins: Vec<_> = (0..n)
        .map(|i| {
            let config = config.clone();
            tokio::spawn(async move {
                let name = format!("storm{i}");
                Client::login(&config, &name, "password", LoginOptions::default()).await
            })
        })
        .collect();
    let mut clients = Vec::new();
    for login in logins {
        clients.push(login.await??);
    }
    Ok(clients)
}

macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Backend::Memory).await
                }
            )*
        }
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() -> anyhow::Result<()> {
                    super::$scenario(super::Backend::Redis).await
                }
            )*
        }
    };
}

on_both_backends!(
    lossy_link_delivers_every_message_once_in_order,
    an_offline_recipient_gets_everything_in_order_when_back,
    a_message_stored_while_the_route_was_missing_arrives_once_it_is_back,
    a_message_whose_push_was_lost_arrives_after_the_next_renewal,
    a_five_second_blackout_heals_by_itself,
    a_short_outage_resumes_with_zero_rtt,
    an_outage_after_the_login_token_expired_resumes_with_a_renewed_one,
    a_blackout_the_server_outlasts_resumes_the_same_session,
    rebinding_the_socket_keeps_the_session,
    a_retried_client_message_id_is_delivered_once,
    a_busy_recipient_gets_every_message_once_in_order,
    sends_that_share_streams_are_delivered_once_in_order,
    shared_send_streams_cut_by_a_blackout_are_retried_once,
);

/// Registers and logs in a user for each of `names`, in order.
async fn logged_in(config: &ClientConfig, names: &[&str]) -> anyhow::Result<Vec<(Client, Events)>> {
    let mut logins = Vec::new();
    for name in names {
        cim_client::register(config, name, "password").await?;
        logins.push(Client::login(config, name, "password", LoginOptions::default()).await?);
    }
    Ok(logins)
}

/// Makes `n` sends back to back (`send(i)` the i-th) and runs `kill` once 100 of them went:
/// the sends acked, by index.
async fn sends_with_a_kill_midway(
    n: usize,
    mut send: impl AsyncFnMut(usize) -> Result<cim_client::Ack, cim_client::ClientError>,
    kill: impl Future<Output = anyhow::Result<()>>,
) -> anyhow::Result<Vec<usize>> {
    let (midway, at_midway) = tokio::sync::oneshot::channel();
    let sending = async {
        let mut midway = Some(midway);
        let mut acked = Vec::new();
        for i in 0..n {
            match send(i).await {
                Ok(_) => acked.push(i),
                Err(e) => eprintln!("send {i} not acked: {e}"),
            }
            if i == 100
                && let Some(midway) = midway.take()
            {
                let _ = midway.send(());
            }
        }
        acked
    };
    let killing = async {
        let _ = at_midway.await;
        kill.await
    };
    let (acked, killed) = tokio::join!(sending, killing);
    killed?;
    Ok(acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_killed_mid_stream_loses_no_acked_message() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 2, "round-robin").await?;
    let mut logins = logged_in(&cluster.client_config(0), &["alice", "filler", "bob"]).await?;
    let (bob, mut bob_events) = logins.pop().unwrap();
    let (alice, _alice_events) = logins.remove(0);
    // Round robin put alice and bob on the same server: killing it hits sender and recipient.
    assert_eq!(alice.info().server_id, bob.info().server_id);
    let doomed = alice.info().server_id.clone();

    let to = bob.info().user_id;
    let acked = sends_with_a_kill_midway(
        300,
        async |i| alice.send_private(to, &format!("s{i}")).await,
        cluster.signal_server(&doomed, "KILL"),
    )
    .await?;
    assert!(acked.len() >= 100, "only {} acked", acked.len());

    let got = receive(&mut bob_events, acked.len(), Duration::from_secs(60)).await?;
    let bodies: Vec<String> = got.iter().map(|m| m.body.clone()).collect();
    let want: Vec<String> = acked.iter().map(|i| format!("s{i}")).collect();
    assert_eq!(bodies, want, "every acked message exactly once, in order");
    assert_nothing_more(&alice, &bob, &mut bob_events).await?;
    Ok(())
}

/// Messages (`Event::Message`) until `want` of them came, whatever else happens meanwhile
/// (presence, reconnects).
async fn messages(events: &mut Events, want: usize) -> anyhow::Result<Vec<String>> {
    let mut got = Vec::with_capacity(want);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < want {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match next_event(events, left).await {
            Ok(Event::Message(m)) => got.push(m.body),
            Ok(_) => {}
            Err(e) => anyhow::bail!("{e:#}: got {} of {want}: {got:?}", got.len()),
        }
    }
    Ok(got)
}

/// Two routers, and the one that is not the clients' HTTPS router is killed (`kill -9`) while
/// a sender sends private and named-group messages back to back: whatever it held (a forward
/// read, an append made, a push not yet sent) is resent or pulled, so every acked message
/// reaches each recipient exactly once, in the order it was acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_killed_mid_stream_loses_no_acked_message() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(2, 2, "round-robin").await?;
    let mut logins = logged_in(&cluster.client_config(0), &["alice", "bob", "carol"]).await?;
    let (carol, mut carol_events) = logins.pop().unwrap();
    let (bob, mut bob_events) = logins.pop().unwrap();
    let (alice, _alice_events) = logins.pop().unwrap();
    alice.create_group("crew").await?;
    bob.join_group("crew").await?;
    carol.join_group("crew").await?;

    let n = 300;
    let to = bob.info().user_id;
    let doomed = &mut cluster.routers[1].1.child;
    let acked = sends_with_a_kill_midway(
        n,
        async |i| {
            if i % 3 == 2 {
                alice.send_group("crew", &format!("g{i}")).await
            } else {
                alice.send_private(to, &format!("p{i}")).await
            }
        },
        async { Ok(doomed.kill().await?) },
    )
    .await?;
    // The servers send what a dead router held to the other one, and the clients resend what
    // they were told to: every send is acked in the end.
    assert_eq!(acked.len(), n, "only {} of {n} acked", acked.len());

    let body = |i: &usize| format!("{}{i}", if i % 3 == 2 { 'g' } else { 'p' });
    let want_bob: Vec<String> = acked.iter().map(body).collect();
    let want_carol: Vec<String> = acked.iter().filter(|i| *i % 3 == 2).map(body).collect();
    assert_eq!(
        messages(&mut bob_events, want_bob.len()).await?,
        want_bob,
        "bob"
    );
    assert_eq!(
        messages(&mut carol_events, want_carol.len()).await?,
        want_carol,
        "carol"
    );
    // Nothing after them: no duplicate was on its way.
    alice.send_group("crew", "last").await?;
    assert_eq!(messages(&mut bob_events, 1).await?, ["last"]);
    assert_eq!(messages(&mut carol_events, 1).await?, ["last"]);
    Ok(())
}

/// The memory store, except that it can pause for `hold` at these moments (the first two once
/// armed):
/// - the next read of where a user's inbox stands (the router's, when it confirms a session),
///   after the read: long enough for a message to be stored and pushed in between;
/// - the next route release (a server's report that a connection closed), before it;
/// - with `slow_reports` set, every route confirmation and release (a server's reports that a
///   session opened or closed), before it;
/// - the next route renewal (a server's), once armed, before it;
/// - with `slow_reports` set, every scan of the online users, before it (and it counts them);
/// - the next `route_reads_held` route reads, after them.
struct PausingStore {
    inner: MemoryStore,
    hold: Duration,
    slow_reports: AtomicBool,
    armed: AtomicBool,
    read: Notify,
    release_armed: AtomicBool,
    releasing: Notify,
    released: AtomicUsize,
    renew_armed: AtomicBool,
    renewing: Notify,
    renewed: AtomicUsize,
    online_scans: AtomicUsize,
    route_reads_held: AtomicUsize,
    /// Inboxes trimmed by ack reports (one per user reported).
    trims: AtomicUsize,
    /// Trims still to fail (as on a store that is down), before any succeeds.
    failing_trims: AtomicUsize,
    /// Removals of a departed server's routes still to fail, before any succeeds.
    failing_removals: AtomicUsize,
    /// Private appends still to run and then fail (their reply lost).
    lost_append_replies: AtomicUsize,
    /// Group appends still to hold for `hold` (after `group_append_held` is notified).
    group_appends_held: AtomicUsize,
    /// Password changes still to make and then hold for `hold` before answering.
    password_changes_held: AtomicUsize,
    /// How long the next password changes wait before they are made, one each.
    password_change_waits: std::sync::Mutex<std::collections::VecDeque<Duration>>,
    group_append_held: Notify,
}

impl PausingStore {
    fn new(hold: Duration) -> Arc<Self> {
        Arc::new(Self {
            inner: MemoryStore::new(),
            hold,
            slow_reports: AtomicBool::new(false),
            armed: AtomicBool::new(false),
            read: Notify::new(),
            release_armed: AtomicBool::new(false),
            releasing: Notify::new(),
            released: AtomicUsize::new(0),
            renew_armed: AtomicBool::new(false),
            renewing: Notify::new(),
            renewed: AtomicUsize::new(0),
            online_scans: AtomicUsize::new(0),
            route_reads_held: AtomicUsize::new(0),
            trims: AtomicUsize::new(0),
            failing_trims: AtomicUsize::new(0),
            failing_removals: AtomicUsize::new(0),
            lost_append_replies: AtomicUsize::new(0),
            group_appends_held: AtomicUsize::new(0),
            group_append_held: Notify::new(),
            password_changes_held: AtomicUsize::new(0),
            password_change_waits: Default::default(),
        })
    }
}

/// Waits until `user` has no route in `store`, then checks it is not listed online.
async fn gone_offline(store: &PausingStore, user: u64) -> anyhow::Result<()> {
    eventually(WAIT, || async {
        let route = store.inner.routes(&[user]).await.ok()?.pop()?;
        route.is_none().then_some(())
    })
    .await?;
    assert!(!store.inner.online_users().await?.contains(&user));
    Ok(())
}

/// Takes one off `count` if it is not 0: whether one was left.
fn take_one(count: &AtomicUsize) -> bool {
    count
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// A one-server cluster on a [`PausingStore`] that pauses for `hold`.
async fn paused_cluster(hold: Duration) -> anyhow::Result<(Arc<PausingStore>, TestCluster)> {
    let store = PausingStore::new(hold);
    let cluster = TestCluster::start_on_store(1, store.clone(), |_| {}).await?;
    Ok((store, cluster))
}

#[async_trait]
impl Store for PausingStore {
    async fn inbox_caught_up_to(&self, user: u64) -> Result<Option<u64>, StoreError> {
        let seq = self.inner.inbox_caught_up_to(user).await?;
        if self.armed.swap(false, Ordering::SeqCst) {
            self.read.notify_one();
            tokio::time::sleep(self.hold).await;
        }
        Ok(seq)
    }
    async fn inbox_heads(&self, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        self.inner.inbox_heads(users).await
    }
    async fn create_account(&self, name: &str, hash: &str) -> Result<Account, StoreError> {
        self.inner.create_account(name, hash).await
    }
    async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        self.inner.account_by_name(name).await
    }
    async fn set_password_hash(
        &self,
        user: u64,
        expected: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError> {
        let wait = self.password_change_waits.lock().unwrap().pop_front();
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
        let changed = self.inner.set_password_hash(user, expected, new_hash).await;
        if take_one(&self.password_changes_held) {
            tokio::time::sleep(self.hold).await;
        }
        changed
    }
    async fn user_exists(&self, id: u64) -> Result<bool, StoreError> {
        self.inner.user_exists(id).await
    }
    async fn accounts_by_id(&self, ids: &[u64]) -> Result<Vec<Account>, StoreError> {
        self.inner.accounts_by_id(ids).await
    }
    async fn delete_account(
        &self,
        user: u64,
        revoke_for: Duration,
    ) -> Result<Option<DeletedAccount>, StoreError> {
        self.inner.delete_account(user, revoke_for).await
    }
    async fn claim_route(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
        replaced_for: Duration,
    ) -> Result<Claim, StoreError> {
        self.inner
            .claim_route(user, route, pending_lease, force, replaced_for)
            .await
    }
    async fn claim_route_relogin(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        replaced_for: Duration,
        relogin: &Relogin,
    ) -> Result<Claim, StoreError> {
        self.inner
            .claim_route_relogin(user, route, pending_lease, replaced_for, relogin)
            .await
    }
    async fn confirm_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        if self.slow_reports.load(Ordering::SeqCst) {
            tokio::time::sleep(self.hold).await;
        }
        self.inner
            .confirm_route(user, session_id, server_id, lease)
            .await
    }
    async fn revoke_session(
        &self,
        user: u64,
        session: u64,
        ttl: Duration,
        why: Revocation,
    ) -> Result<(), StoreError> {
        self.inner.revoke_session(user, session, ttl, why).await
    }
    async fn revocation(
        &self,
        user: u64,
        session_id: u64,
    ) -> Result<Option<Revocation>, StoreError> {
        self.inner.revocation(user, session_id).await
    }
    async fn last_login(&self, user: u64) -> Result<Option<u64>, StoreError> {
        self.inner.last_login(user).await
    }
    async fn release_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: Option<&str>,
    ) -> Result<bool, StoreError> {
        if self.slow_reports.load(Ordering::SeqCst) {
            tokio::time::sleep(self.hold).await;
        }
        if !self.release_armed.swap(false, Ordering::SeqCst) {
            return self.inner.release_route(user, session_id, server_id).await;
        }
        self.releasing.notify_one();
        tokio::time::sleep(self.hold).await;
        let released = self.inner.release_route(user, session_id, server_id).await;
        self.released.fetch_add(1, Ordering::SeqCst);
        released
    }
    async fn routes(&self, users: &[u64]) -> Result<Vec<Option<Route>>, StoreError> {
        let routes = self.inner.routes(users).await?;
        if take_one(&self.route_reads_held) {
            tokio::time::sleep(self.hold).await;
        }
        Ok(routes)
    }
    async fn online_users(&self) -> Result<Vec<u64>, StoreError> {
        self.online_scans.fetch_add(1, Ordering::SeqCst);
        if self.slow_reports.load(Ordering::SeqCst) {
            tokio::time::sleep(self.hold).await;
        }
        self.inner.online_users().await
    }
    async fn renew_routes(
        &self,
        server_id: &str,
        sessions: &[(u64, u64)],
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let held = self.renew_armed.swap(false, Ordering::SeqCst);
        if held {
            self.renewing.notify_one();
            tokio::time::sleep(self.hold).await;
        }
        let lost = self.inner.renew_routes(server_id, sessions, lease).await;
        if held {
            self.renewed.fetch_add(1, Ordering::SeqCst);
        }
        lost
    }
    async fn remove_server_routes(&self, server_id: &str) -> Result<Vec<u64>, StoreError> {
        if take_one(&self.failing_removals) {
            return Err(StoreError::Unavailable("removals fail in this test".into()));
        }
        self.inner.remove_server_routes(server_id).await
    }
    async fn message_id(
        &self,
        sender: u64,
        client_msg_id: u64,
        fingerprint: u64,
        new_msg_id: u64,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        self.inner
            .message_id(sender, client_msg_id, fingerprint, new_msg_id, ttl)
            .await
    }
    async fn append_inbox(
        &self,
        recipients: &[u64],
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<Vec<u64>, StoreError> {
        if take_one(&self.group_appends_held) {
            self.group_append_held.notify_one();
            tokio::time::sleep(self.hold).await;
        }
        self.inner.append_inbox(recipients, entry, limits).await
    }
    async fn append_private(
        &self,
        to: u64,
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<PrivateAppend, StoreError> {
        let appended = self.inner.append_private(to, entry, limits).await;
        if take_one(&self.lost_append_replies) {
            return Err(StoreError::Unavailable(
                "the append's reply was lost".into(),
            ));
        }
        appended
    }
    async fn fetch_inbox(
        &self,
        user: u64,
        after_seq: u64,
        trim_up_to: u64,
        limit: usize,
        limits: InboxLimits,
        now_ms: u64,
    ) -> Result<InboxPage, StoreError> {
        self.inner
            .fetch_inbox(user, after_seq, trim_up_to, limit, limits, now_ms)
            .await
    }
    async fn trim_inbox(&self, acked: &[(u64, u64)]) -> Result<(), StoreError> {
        if take_one(&self.failing_trims) {
            return Err(StoreError::Unavailable("trims fail in this test".into()));
        }
        self.trims.fetch_add(acked.len(), Ordering::SeqCst);
        self.inner.trim_inbox(acked).await
    }
    async fn create_group(
        &self,
        name: &str,
        owner: u64,
        invite_only: bool,
    ) -> Result<bool, StoreError> {
        self.inner.create_group(name, owner, invite_only).await
    }
    async fn join_group(&self, name: &str, user: u64, cap: usize) -> Result<Join, StoreError> {
        self.inner.join_group(name, user, cap).await
    }
    async fn invite(
        &self,
        name: &str,
        owner: u64,
        user: u64,
        cap: usize,
    ) -> Result<Invite, StoreError> {
        self.inner.invite(name, owner, user, cap).await
    }
    async fn remove_member(
        &self,
        name: &str,
        owner: u64,
        user: u64,
    ) -> Result<Removal, StoreError> {
        self.inner.remove_member(name, owner, user).await
    }
    async fn transfer_group(
        &self,
        name: &str,
        owner: u64,
        user: u64,
    ) -> Result<Transfer, StoreError> {
        self.inner.transfer_group(name, owner, user).await
    }
    async fn hidden(&self, users: &[u64], what: Privacy) -> Result<Vec<bool>, StoreError> {
        self.inner.hidden(users, what).await
    }
    async fn statuses(&self, users: &[u64]) -> Result<Vec<Option<String>>, StoreError> {
        self.inner.statuses(users).await
    }
    async fn set_status(&self, user: u64, status: Option<&str>) -> Result<bool, StoreError> {
        self.inner.set_status(user, status).await
    }
    async fn set_hidden(&self, user: u64, what: Privacy, hidden: bool) -> Result<(), StoreError> {
        self.inner.set_hidden(user, what, hidden).await
    }
    async fn add_read_receipt(
        &self,
        sender: u64,
        receipt: &ReadReceipt,
        cap: usize,
    ) -> Result<bool, StoreError> {
        self.inner.add_read_receipt(sender, receipt, cap).await
    }
    async fn read_receipts(&self, sender: u64) -> Result<Vec<ReadReceipt>, StoreError> {
        self.inner.read_receipts(sender).await
    }
    async fn add_report(
        &self,
        report: &Report,
        cap: usize,
        once_per: Duration,
    ) -> Result<bool, StoreError> {
        self.inner.add_report(report, cap, once_per).await
    }
    async fn reports(&self, limit: usize) -> Result<Vec<Report>, StoreError> {
        self.inner.reports(limit).await
    }
    async fn decline_invitation(&self, name: &str, user: u64) -> Result<bool, StoreError> {
        self.inner.decline_invitation(name, user).await
    }
    async fn group_info(&self, name: &str) -> Result<Option<GroupInfo>, StoreError> {
        self.inner.group_info(name).await
    }
    async fn leave_group(&self, name: &str, user: u64) -> Result<bool, StoreError> {
        self.inner.leave_group(name, user).await
    }
    async fn group_members(&self, name: &str) -> Result<Option<Vec<u64>>, StoreError> {
        self.inner.group_members(name).await
    }
    async fn group_size(&self, name: &str) -> Result<usize, StoreError> {
        self.inner.group_size(name).await
    }
    async fn user_invitations(&self, user: u64) -> Result<Vec<String>, StoreError> {
        self.inner.user_invitations(user).await
    }
    async fn last_seen(&self, user: u64) -> Result<Option<u64>, StoreError> {
        self.inner.last_seen(user).await
    }
    async fn block_user(&self, user: u64, other: u64, cap: usize) -> Result<Block, StoreError> {
        self.inner.block_user(user, other, cap).await
    }
    async fn unblock_user(&self, user: u64, other: u64) -> Result<bool, StoreError> {
        self.inner.unblock_user(user, other).await
    }
    async fn blocking(&self, users: &[u64], other: u64) -> Result<Vec<bool>, StoreError> {
        self.inner.blocking(users, other).await
    }
    async fn blocked_users(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        self.inner.blocked_users(user).await
    }
    async fn user_groups(&self, user: u64) -> Result<Vec<String>, StoreError> {
        self.inner.user_groups(user).await
    }
    async fn claim_id_node(
        &self,
        owner: &str,
        first: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<Option<IdNode>, StoreError> {
        let store = &self.inner;
        store
            .claim_id_node(owner, first, lease, issue_until_ms)
            .await
    }
    async fn renew_id_node(
        &self,
        owner: &str,
        node: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<bool, StoreError> {
        let store = &self.inner;
        store
            .renew_id_node(owner, node, lease, issue_until_ms)
            .await
    }
    async fn release_id_node(&self, owner: &str, node: u16) -> Result<(), StoreError> {
        self.inner.release_id_node(owner, node).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_stored_while_its_recipient_logs_in_is_pushed_to_the_new_session()
-> anyhow::Result<()> {
    let store = PausingStore::new(Duration::from_millis(500));
    let cluster = TestCluster::start_on_store(1, store.clone(), |_| {}).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let mut config = cluster.client_config();
    // No idle pull (a safety net at a random heartbeat) may blur the count of pulls below.
    config.idle_pull_every = Duration::from_secs(86_400);
    let bob_id = cim_client::register(&config, "bob", "password").await?;
    store.armed.store(true, Ordering::SeqCst);
    let login = {
        let config = config.clone();
        tokio::spawn(async move {
            Client::login(&config, "bob", "password", LoginOptions::default()).await
        })
    };
    // The router has confirmed Bob's session and read his last seq (0). The message is stored
    // after that read and pushed while Bob's server still waits for the router's answer.
    tokio::time::timeout(WAIT, store.read.notified()).await?;
    alice.send_private(bob_id, "after the read").await?;
    let (bob, mut bob_events) = login.await??;
    let got = receive(&mut bob_events, 1, WAIT).await?;
    assert_eq!(got[0].body, "after the read");
    // It came by push: the login result said nothing was stored, and Bob never pulled (the
    // catch-up pull would have come 200 ms after the connect).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(bob.stats().pulls, 0, "{:?}", bob.stats());

    // Bob's inbox is empty again once his ack is in, and his route gone once his client has
    // closed. A new client of his (an app restart) then continues from his last seq without
    // pulling, and the next message is released at once.
    bob.close().await;
    eventually(WAIT, || async {
        let caught_up = store.inner.inbox_caught_up_to(bob_id).await.ok()?;
        let route = store.inner.routes(&[bob_id]).await.ok()?.pop()?;
        (caught_up == Some(1) && route.is_none()).then_some(())
    })
    .await?;
    let (restarted, mut events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    alice.send_private(bob_id, "after the restart").await?;
    let got = receive(&mut events, 1, WAIT).await?;
    assert_eq!((got[0].body.as_str(), got[0].seq), ("after the restart", 2));
    // Released without a pull: with the base left at 0, seq 2 would have waited on the gap
    // and come only with a pull.
    assert_eq!(restarted.stats().pulls, 0, "{:?}", restarted.stats());
    assert_eq!(restarted.stats().skipped, 0, "{:?}", restarted.stats());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_reported_late_does_not_release_the_route_of_the_resumed_session()
-> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::from_millis(800)).await?;
    let (bob_id, token) = cluster.http_login("bob").await?;
    let (first, result, _send, _recv) = cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    // Bob's connection ends, and the server's report of it is slow to reach the store.
    store.release_armed.store(true, Ordering::SeqCst);
    first.close(0u32.into(), b"gone");
    tokio::time::timeout(WAIT, store.releasing.notified()).await?;
    // His client resumes the same login on a new connection while that report is on its way.
    let (_second, result, _send2, _recv2) = cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    eventually(WAIT, || async {
        (store.released.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await?;
    // Had the report been taken after the new connection's confirmation, Bob's route would be
    // gone now (until the server's next renewal), and messages to him stored but not pushed.
    let route = store.inner.routes(&[bob_id]).await?.pop().flatten();
    let server = &cluster.embedded.servers[0].0;
    assert!(
        route
            .as_ref()
            .is_some_and(|r| r.confirmed && &r.server_id == server),
        "the resumed session lost its route: {route:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_that_fails_after_the_router_confirmed_it_does_not_keep_the_user_online()
-> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::from_millis(500)).await?;
    let (carol_id, token) = cluster.http_login("carol").await?;
    // Carol's client sends its login and is gone before the answer: the router has confirmed
    // the session, and the server cannot deliver the login result.
    store.armed.store(true, Ordering::SeqCst);
    let conn = cluster.raw_connection(0).await?;
    let (mut send, _recv) = conn.open_bi().await?;
    let login = ClientControl {
        kind: Some(client_control::Kind::Login(Login {
            token,
            last_seen_seq: 0,
            token_renewal: false,
        })),
    };
    write_frame(&mut send, &login, 4096).await?;
    tokio::time::timeout(WAIT, store.read.notified()).await?;
    conn.close(0u32.into(), b"gone");
    // The server tells the router, which takes her offline well before her route's lease
    // would have run out.
    gone_offline(&store, carol_id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_closes_while_its_successor_is_confirmed_leaves_the_route()
-> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::from_millis(500)).await?;
    let (dan_id, token) = cluster.http_login("dan").await?;
    let (first, result, _send, _recv) = cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    // Dan's login resumes on a second connection while the first is still on the server. The
    // router confirms it; right then the first connection ends, and its close is reported and
    // taken after that confirmation.
    store.armed.store(true, Ordering::SeqCst);
    let close_first = async {
        tokio::time::timeout(WAIT, store.read.notified()).await?;
        first.close(0u32.into(), b"gone");
        anyhow::Ok(())
    };
    let (second, closed) = tokio::join!(cluster.raw_login(0, &token, false), close_first);
    closed?;
    let (_second, result, _send2, _recv2) = second?;
    assert_eq!(result.code, "");
    // The server confirmed the second connection again once that report was answered.
    let route = store.inner.routes(&[dan_id]).await?.pop().flatten();
    assert!(
        route.as_ref().is_some_and(|r| r.confirmed),
        "the resumed session lost its route: {route:?}"
    );
    Ok(())
}

/// Messages that reach a client whose application has dropped its event stream are not
/// acknowledged: they stay in the inbox, and the user's next client gets them. Before, the
/// client acked them on arrival, the inbox was trimmed, and no application ever saw them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_no_application_took_stay_for_the_next_client() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let bob_id = bob.info().user_id;
    alice.send_private(bob_id, "seen").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "seen");
    drop(bob_events);
    for i in 0..3 {
        alice.send_private(bob_id, &format!("unseen {i}")).await?;
    }
    // Time for the deliveries, their acks and the server's trim report (every 500 ms).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        bob.last_seq().await,
        1,
        "acked past what the application got"
    );
    bob.close().await;
    let got = next_client_gets(&cluster, "bob", 3).await?;
    assert_eq!(got, ["unseen 0", "unseen 1", "unseen 2"]);
    Ok(())
}

/// Logs `name` in as a new client (taking over) and returns the bodies of the first `n`
/// messages it gets.
async fn next_client_gets(
    cluster: &TestCluster,
    name: &str,
    n: usize,
) -> anyhow::Result<Vec<String>> {
    let config = cluster.client_config();
    let (_client, mut events) =
        Client::login(&config, name, "password", LoginOptions { takeover: true }).await?;
    Ok(receive(&mut events, n, WAIT)
        .await?
        .into_iter()
        .map(|m| m.body)
        .collect())
}

/// A message counts as done only once the application asks for the next event after it (or
/// closes the client): a client that dies with messages it took and did not finish with, or
/// never took, leaves them in the inbox for the user's next client, and the ones it finished
/// with do not come again (their ack rides on a heartbeat ping when nothing else carries it).
/// Before, the client acked a message when it queued it for the application, and a crash lost
/// up to a full event queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_the_application_did_not_finish_come_again_after_a_crash() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let bob_id = bob.info().user_id;
    for body in ["finished", "taken", "queued"] {
        alice.send_private(bob_id, body).await?;
    }
    // All three reach Bob's client (and are acked as far as his application got: nowhere)
    // before his application takes any.
    eventually(WAIT, || async { (bob.last_seq().await == 3).then_some(()) }).await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "finished");
    assert_eq!(next_message(&mut bob_events).await?.body, "taken");
    // Heartbeats carry the ack of "finished", and the server reports it (every 500 ms): the
    // inbox then starts at "taken".
    let store = &cluster.embedded.store;
    let limits = cim_router::store::InboxLimits::default();
    eventually(WAIT, || async {
        let page = store
            .fetch_inbox(bob_id, 0, 0, 10, limits, cim_core::now_ms())
            .await
            .ok()?;
        (page.entries.first()?.1.body == "taken").then_some(())
    })
    .await?;
    // The client dies without closing (no final ack).
    drop(bob);
    drop(bob_events);
    let got = next_client_gets(&cluster, "bob", 2).await?;
    assert_eq!(got, ["taken", "queued"]);
    Ok(())
}

/// A client closed while it reconnects still acknowledges what its application finished: the
/// close waits (at most 2 s) for the connection to come back. Before, the final ack was
/// skipped when no connection was up, and the user's next client got those messages again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_during_a_reconnect_still_acks_what_the_application_finished() -> anyhow::Result<()>
{
    let (cluster, relay) = relayed(Backend::Memory, Impairments::none(), 29).await?;
    let (alice, _alice_events) = user(&cluster, None, "alice").await?;
    let (bob, mut bob_events) = user(&cluster, Some(&relay), "bob").await?;
    let bob_id = bob.info().user_id;
    for body in ["one", "two", "three"] {
        alice.send_private(bob_id, body).await?;
    }
    for body in ["one", "two", "three"] {
        assert_eq!(next_message(&mut bob_events).await?.body, body);
    }
    // Cut off: asking for the next event (the disconnect) finishes "three" while no
    // connection can carry its ack.
    relay.set_blackout(true);
    match next_event(&mut bob_events, WAIT).await? {
        Event::Disconnected(_) => {}
        other => anyhow::bail!("expected a disconnect, got {other:?}"),
    }
    relay.set_blackout(false);
    bob.close().await;
    let caught_up = cluster.embedded.store.inbox_caught_up_to(bob_id).await?;
    assert_eq!(
        caught_up,
        Some(3),
        "the finished messages wait for the next client"
    );
    Ok(())
}

/// A login resumed on a new connection while the old one is still in its server's map waits
/// for the router's confirmation; if the router kicks that login meanwhile (here a logout over
/// HTTP, after the confirmation left the router), the resume is refused. Before, the kick took
/// the old connection out of the map, the resume found the slot empty and came in: a
/// logged-out login ran, able to send as its user, until the next route renewal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_kicked_while_its_resume_waits_for_the_router_is_refused() -> anyhow::Result<()> {
    let store = PausingStore::new(Duration::from_millis(1000));
    let cluster = TestCluster::start_on_store(1, store.clone(), |_| {}).await?;
    let (_bob_id, token) = cluster.http_login("bob").await?;
    let (first, result, _send, _recv) = cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    // The next confirmation's answer is held after the router made it.
    store.armed.store(true, Ordering::SeqCst);
    let resumed = cluster.raw_login(0, &token, false);
    let logout = async {
        tokio::time::timeout(WAIT, store.read.notified()).await?;
        let api = cim_client::RouterApi::new(&cluster.client_config())?;
        api.logout(&token).await?;
        tokio::time::timeout(WAIT, first.closed()).await?;
        anyhow::Ok(())
    };
    let (resumed, logged_out) = tokio::join!(resumed, logout);
    logged_out?;
    let (conn, result, _send, _recv) = resumed?;
    assert_eq!(
        result.code, "session_replaced",
        "a logged-out login came in: {result:?}"
    );
    let closed = tokio::time::timeout(WAIT, conn.closed()).await;
    assert!(closed.is_ok(), "the refused connection stayed");
    Ok(())
}

/// A heartbeat acknowledges what the application finished only when that moved: an idle
/// session's pings cost the store no trims. Before, each ping of every session that had ever
/// finished a message was reported, and trimmed, again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_heartbeats_trim_nothing() -> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::ZERO).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    alice.send_private(bob.info().user_id, "hi").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "hi");
    // Bob's application comes back for more: "hi" is done, and a ping says so.
    let _ = tokio::time::timeout(Duration::from_millis(100), bob_events.next()).await;
    eventually(WAIT, || async {
        (store.trims.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await?;
    // Time for a report to settle, then several heartbeats (300 ms) and reports (500 ms).
    tokio::time::sleep(Duration::from_millis(700)).await;
    let settled = store.trims.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(
        store.trims.load(Ordering::SeqCst),
        settled,
        "idle pings trimmed"
    );
    Ok(())
}

/// Acks a router could not store (its store failed the trim) are reported again. Before, the
/// server took the router's refusal for done and dropped them: the inbox kept the messages,
/// and the user's next client got them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_a_router_could_not_trim_are_reported_again() -> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::ZERO).await?;
    store.failing_trims.store(2, Ordering::SeqCst);
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let bob_id = bob.info().user_id;
    alice.send_private(bob_id, "hi").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "hi");
    // Bob's application comes back for more: "hi" is done, and a ping says so, once.
    let _ = tokio::time::timeout(Duration::from_millis(100), bob_events.next()).await;
    eventually(WAIT, || async {
        let caught_up = store.inner.inbox_caught_up_to(bob_id).await.ok()?;
        (caught_up == Some(1)).then_some(())
    })
    .await?;
    assert_eq!(store.failing_trims.load(Ordering::SeqCst), 0);
    Ok(())
}

/// A departed (here: replaced) server's routes are removed even when the store fails the
/// first try: a blip left its users online, and unannounced, until their leases ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departed_servers_routes_go_even_if_the_first_removal_fails() -> anyhow::Result<()> {
    let store = PausingStore::new(Duration::ZERO);
    let cluster = TestCluster::start_on_store(1, store.clone(), |_| {}).await?;
    let (bob, _bob_events) = cluster.user("bob").await?;
    store.failing_removals.store(1, Ordering::SeqCst);
    cluster.reincarnate_server(&bob.info().server_id).await?;
    cluster.wait_departed_routes(1.0).await?;
    assert_eq!(store.failing_removals.load(Ordering::SeqCst), 0);
    Ok(())
}

/// A send without a client message id whose append ran but whose reply was lost is answered
/// `retry` (outcome unknown), not `unavailable` (which says nothing was stored: a caller
/// trusting it sent the message again and it was delivered twice).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_without_an_id_whose_append_reply_was_lost_is_of_unknown_outcome()
-> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::ZERO).await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let (_alice_id, token) = cluster.http_login("alice").await?;
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    store.lost_append_replies.store(1, Ordering::SeqCst);
    let body = serde_json::json!({"to": bob.info().user_id, "body": "stored, reply lost"});
    let sent = api
        .call::<_, serde_json::Value>(
            http::Method::POST,
            "/api/messages",
            Some(&body),
            Some(&token),
        )
        .await
        .unwrap_err();
    assert_eq!(sent.code(), Some(cim_proto::SEND_RETRY), "{sent}");
    // It was stored (though not pushed): the next message's gap brings it to Bob first.
    let body = serde_json::json!({"to": bob.info().user_id, "body": "after"});
    api.call::<_, serde_json::Value>(
        http::Method::POST,
        "/api/messages",
        Some(&body),
        Some(&token),
    )
    .await?;
    assert_eq!(
        next_message(&mut bob_events).await?.body,
        "stored, reply lost"
    );
    assert_eq!(next_message(&mut bob_events).await?.body, "after");
    Ok(())
}

/// A group send that waits for its group's turn at the router reads the members once its turn
/// came: a member who left meanwhile (the leave acked) does not get it. Before, the members
/// were read before the wait, and the leaver got a message ordered after the leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_send_waiting_its_turn_skips_a_member_who_left_meanwhile() -> anyhow::Result<()> {
    // Alice's append is held long enough for Bob's send to reach its wait on a loaded machine.
    let store = PausingStore::new(Duration::from_secs(3));
    let cluster = TestCluster::start_on_store(1, store.clone(), |_| {}).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, _bob_events) = cluster.user("bob").await?;
    let (carol, _carol_events) = cluster.user("carol").await?;
    alice.create_group("team").await?;
    bob.join_group("team").await?;
    carol.join_group("team").await?;
    // Alice's send holds the group's turn in the store; Bob's comes while it does.
    store.group_appends_held.store(1, Ordering::SeqCst);
    let alice = Arc::new(alice);
    let first = tokio::spawn({
        let alice = alice.clone();
        async move { alice.send_group("team", "before the leave").await }
    });
    tokio::time::timeout(WAIT, store.group_append_held.notified()).await?;
    let bob = Arc::new(bob);
    let second = tokio::spawn({
        let bob = bob.clone();
        async move { bob.send_group("team", "after the leave").await }
    });
    // Bob's send waits for the group's turn when Carol leaves.
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    eventually(WAIT, || async {
        let metrics = router_metrics(&api).await.ok()?;
        let waiting = metric_value(&metrics, "cim_router_group_sends_waiting").ok()?;
        (waiting == 1.0).then_some(())
    })
    .await?;
    carol.leave_group("team").await?;
    first.await??;
    second.await??;
    let carol_id = carol.info().user_id;
    let limits = cim_router::store::InboxLimits::default();
    let page = store
        .inner
        .fetch_inbox(carol_id, 0, 0, 10, limits, cim_core::now_ms())
        .await?;
    let bodies: Vec<&str> = page.entries.iter().map(|(_, e)| e.body.as_str()).collect();
    assert_eq!(bodies, ["before the leave"]);
    Ok(())
}

/// A session that closes while its server's route renewal, which listed it, is on its way
/// stays closed: the close report waits for the renewal's answer. Before, the report could be
/// taken first (on another router, or another stream of the same one), and the late renewal
/// put the released route back: the user showed online, and a login without takeover was
/// refused as already online, until the lease ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_during_a_renewal_is_not_undone_by_it() -> anyhow::Result<()> {
    let store = PausingStore::new(Duration::from_millis(1000));
    let cluster = TestCluster::start_on_store(1, store.clone(), |config| {
        config.renew_interval = Duration::from_millis(200);
    })
    .await?;
    let (fay_id, token) = cluster.http_login("fay").await?;
    let (conn, result, _send, _recv) = cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    store.renew_armed.store(true, Ordering::SeqCst);
    tokio::time::timeout(WAIT, store.renewing.notified()).await?;
    // The renewal listing Fay's session is held at the store: her connection ends now.
    conn.close(0u32.into(), b"gone");
    eventually(WAIT, || async {
        (store.renewed.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await?;
    // Once that renewal is through, her route is gone (and stays gone).
    gone_offline(&store, fay_id).await
}

/// Listings of the online users that come in together share scans of the store (each reads
/// a route and an account per online user): twenty at once cost two scans, not twenty, and
/// each still sees everyone who was online when it was asked. Before, each listing (and each
/// unauthenticated readiness probe) ran its own scan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn online_listings_asked_together_share_a_scan() -> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::from_millis(500)).await?;
    let (_alice, _a) = cluster.user("alice").await?;
    let (bob, _b) = cluster.user("bob").await?;
    store.slow_reports.store(true, Ordering::SeqCst);
    let before = store.online_scans.load(Ordering::SeqCst);
    let bob = Arc::new(bob);
    let mut listings = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let bob = bob.clone();
        listings.spawn(async move { bob.online_users("").await });
    }
    while let Some(listing) = listings.join_next().await {
        let names: Vec<String> = listing??.into_iter().map(|u| u.name).collect();
        assert_eq!(names, ["alice", "bob"]);
    }
    let scans = store.online_scans.load(Ordering::SeqCst) - before;
    assert!(scans <= 2, "{scans} scans for 20 listings");
    Ok(())
}

/// Of two logins without takeover that both find the user's route on a server that is gone,
/// one wins and the other is refused as already online, as if the route were not there.
/// Before, both replaced the route by force, and the second kicked the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_logins_over_a_departed_servers_route_do_not_both_win() -> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::from_millis(400)).await?;
    let config = cluster.client_config();
    let zed = cim_client::register(&config, "zed", "password").await?;
    let gone = Route {
        server_id: "server-gone".into(),
        session_id: 5,
        confirmed: false,
    };
    let claim = store
        .inner
        .claim_route(
            zed,
            gone,
            Duration::from_secs(30),
            false,
            Duration::from_secs(3600),
        )
        .await?;
    assert!(matches!(claim, Claim::Won { .. }));
    // Both logins read that route before either claims.
    store.route_reads_held.store(2, Ordering::SeqCst);
    let api = cim_client::RouterApi::new(&config)?;
    let body = serde_json::json!({"name": "zed", "password": "password"}).to_string();
    let login = || api.raw(http::Method::POST, "/api/login", body.clone().into(), None);
    let (first, second) = tokio::join!(login(), login());
    let mut statuses = [first?.0.as_u16(), second?.0.as_u16()];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "exactly one login wins");
    Ok(())
}

/// A login that waited for the router while a newer login of the same user got onto the
/// server does not push that newer one out. Erin's client resumes her login on a second
/// connection (her first still holds her place on the server, so the resume waits for the
/// router); the router confirms it, and its answer is slow. Meanwhile Erin logs in again
/// elsewhere with takeover, which the router kicks her first connection for, and that login
/// gets onto the same server and is confirmed. The resume's late answer must not replace it:
/// the server asks the router again and refuses the resume, whose login was replaced. Before,
/// it went in and kicked the newest login ("logged in elsewhere"), and no client of Erin's
/// stayed connected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_confirmed_resume_does_not_push_out_a_newer_login() -> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::from_millis(1500)).await?;
    let (_, token) = cluster.http_login("erin").await?;
    let (_first, result, _send, _recv) = cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    store.armed.store(true, Ordering::SeqCst);
    let resume = tokio::spawn({
        let cluster_token = token.clone();
        let conn = cluster.raw_connection(0).await?;
        async move {
            let (mut send, mut recv) = conn.open_bi().await?;
            let login = ClientControl {
                kind: Some(client_control::Kind::Login(Login {
                    token: cluster_token,
                    last_seen_seq: 0,
                    token_renewal: false,
                })),
            };
            write_frame(&mut send, &login, 4096).await?;
            let reply: ServerControl = read_required(&mut recv, 4096).await?;
            anyhow::Ok((conn, reply, send, recv))
        }
    });
    tokio::time::timeout(WAIT, store.read.notified()).await?;

    // The router has confirmed the resume and is slow to say so: Erin takes over.
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    let body = serde_json::json!({"name": "erin", "password": "password", "takeover": true});
    let grant: serde_json::Value = api
        .call(http::Method::POST, "/api/login", Some(&body), None)
        .await?;
    let newest = grant["token"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("login without a token: {grant}"))?;
    let (_third, result, mut send, mut recv) = cluster.raw_login(0, newest, false).await?;
    assert_eq!(result.code, "", "the takeover login is refused");

    let (_resumed, reply, _rs, _rr) = resume.await??;
    let Some(server_control::Kind::LoginResult(resumed)) = reply.kind else {
        anyhow::bail!("expected a login result, got {reply:?}");
    };
    assert_eq!(
        resumed.code, "session_replaced",
        "the replaced resume got in"
    );
    // The newest login still holds its place: its heartbeat is answered, no kick came first.
    let ping = ClientControl {
        kind: Some(client_control::Kind::Ping(Ping {
            nonce: 7,
            ..Default::default()
        })),
    };
    write_frame(&mut send, &ping, 4096).await?;
    let reply: ServerControl = tokio::time::timeout(WAIT, read_required(&mut recv, 4096)).await??;
    assert!(
        matches!(reply.kind, Some(server_control::Kind::Pong(_))),
        "the newest login got {reply:?}"
    );
    Ok(())
}

/// An application that falls behind on its events (more messages than the event channel
/// holds) can still ask for its last sequence number from its event loop, and then gets every
/// message in order. The inbox lock is held while events are emitted; `last_seq` once waited
/// for it, and so for the application itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_application_behind_on_its_events_can_still_ask_for_its_last_seq() -> anyhow::Result<()>
{
    const MESSAGES: usize = 1_200;
    let cluster = TestCluster::start(1).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, mut bob_events) = cluster.user("bob").await?;
    let bob_id = bob.info().user_id;
    for i in 0..MESSAGES {
        alice.send_private(bob_id, &format!("queued {i}")).await?;
    }
    // Every message is acked, so stored; once the event queue is full, the ones past it wait
    // to be emitted, and the emitter holds the inbox lock while it waits for room.
    eventually(WAIT, || async {
        (bob_events.waiting() == cim_client::Events::CAPACITY).then_some(())
    })
    .await?;
    let last = tokio::time::timeout(WAIT, bob.last_seq()).await?;
    assert!(last <= cim_client::Events::CAPACITY as u64, "{last}");
    let got = receive(&mut bob_events, MESSAGES, WAIT).await?;
    assert_exactly_in_order(&got, "queued ", MESSAGES);
    assert_eq!(bob.last_seq().await, got.last().map_or(0, |m| m.seq));
    Ok(())
}

/// A device that was away (its path blacked out) while the user logged in with takeover on
/// another device learns, when it comes back, that it was replaced, and stops: it does not
/// fall back to its password and take the user back from the newer login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_replaced_while_away_stops_instead_of_taking_the_user_back() -> anyhow::Result<()>
{
    let (cluster, relay) = relayed(Backend::Memory, Impairments::none(), 9).await?;
    let (away, mut away_events) = user(&cluster, Some(&relay), "alice").await?;
    let (bob, _bob_events) = user(&cluster, None, "bob").await?;
    relay.set_blackout(true);
    match next_event(&mut away_events, WAIT).await? {
        Event::Disconnected(_) => {}
        other => panic!("expected a disconnect, got {other:?}"),
    }
    let (newer, mut newer_events) = Client::login(
        &cluster.client_config(),
        "alice",
        "password",
        LoginOptions { takeover: true },
    )
    .await?;
    relay.set_blackout(false);
    let kicked = loop {
        match next_event(&mut away_events, Duration::from_secs(30)).await? {
            Event::Kicked(reason) => break reason,
            Event::Disconnected(_) | Event::Reconnecting { .. } | Event::Reconnected(_) => {}
            other => panic!("unexpected event {other:?}"),
        }
    };
    assert!(kicked.contains("elsewhere"), "{kicked}");
    drop(away);
    // The newer login was left alone and still gets its messages.
    bob.send_private(newer.info().user_id, "to the newer device")
        .await?;
    match next_event(&mut newer_events, WAIT).await? {
        Event::Message(m) => assert_eq!(m.body, "to the newer device"),
        other => panic!("the newer login got {other:?}"),
    }
    Ok(())
}

/// A message stored while its recipient's route was gone (so no push went out) still reaches a
/// client that stays connected and gets nothing after it to show the gap: its periodic pull
/// fetches it. Renewals are kept out of the wait: one would bring the route back and name the
/// message missed in the next pong, which makes the client pull too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_pushed_reaches_a_quiet_client_by_its_periodic_pull() -> anyhow::Result<()>
{
    let cluster = TestCluster::start_with(1, Backend::Redis, |c| {
        c.renew_interval = WAIT * 6;
    })
    .await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let mut config = cluster.client_config();
    config.idle_pull_every = Duration::from_secs(1);
    cim_client::register(&config, "bob", "password").await?;
    let (bob, mut bob_events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    let bob_id = bob.info().user_id;
    alice.send_private(bob_id, "pushed").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "pushed");

    // Bob's route vanishes (as when it lapsed while his server was cut off from the store):
    // the next message is stored but pushed nowhere.
    let redis_proc = cluster.redis.as_ref().expect("a Redis cluster");
    let mut conn = redis_proc.conn().await?;
    let route_key = format!("cim:{{u{bob_id}}}:route");
    let _: () = ::redis::AsyncCommands::del(&mut conn, route_key).await?;
    alice.send_private(bob_id, "never pushed").await?;
    assert_eq!(next_message(&mut bob_events).await?.body, "never pushed");
    Ok(())
}

/// A password change whose answer is lost (the store holds it past the client's HTTP time
/// limit, after the change is made) is asked again by the client, and the router answers the
/// repeat as done: the call succeeds, the new password logs in and the old one does not.
/// Before, the repeat was refused `wrong_password` and the client kept the old password,
/// which its next re-login by password would have been refused with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_change_whose_answer_is_lost_is_asked_again() -> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::from_millis(1500)).await?;
    let mut config = cluster.client_config();
    config.http_timeout = Duration::from_millis(500);
    cim_client::register(&config, "alice", "password").await?;
    let (alice, _events) =
        Client::login(&config, "alice", "password", LoginOptions::default()).await?;
    store.password_changes_held.store(1, Ordering::SeqCst);
    alice.change_password("password", "new-secret").await?;
    assert_eq!(store.password_changes_held.load(Ordering::SeqCst), 0);

    let takeover = LoginOptions { takeover: true };
    let err = Client::login(&config, "alice", "password", takeover)
        .await
        .err()
        .context("the old password still logs in")?;
    assert_eq!(err.code(), Some("invalid_credentials"), "{err}");
    Client::login(&config, "alice", "new-secret", takeover).await?;
    Ok(())
}

/// The same password change asked twice at once (the first slow to be made, the second
/// checked against the old password before the first made it, and made after): both are
/// answered done. Before, the second was refused `password_changed`, and a client whose first
/// answer was lost kept the old password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_password_change_asked_twice_at_once_is_done_for_both() -> anyhow::Result<()> {
    let (store, cluster) = paused_cluster(Duration::ZERO).await?;
    let config = cluster.client_config();
    let (alice, _events) = cluster.user("alice").await?;
    store
        .password_change_waits
        .lock()
        .unwrap()
        .extend([Duration::from_millis(1000), Duration::from_millis(1500)]);
    let api = cim_client::RouterApi::new(&config)?;
    let body = serde_json::json!({"old_password": "password", "new_password": "new-secret"});
    let change = || {
        let (api, body, token) = (api.clone(), body.clone(), alice.token());
        async move {
            api.call::<_, serde_json::Value>(
                http::Method::POST,
                "/api/password",
                Some(&body),
                Some(&token),
            )
            .await
        }
    };
    let first = tokio::spawn(change());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = change().await;
    first.await??;
    second?;
    let takeover = LoginOptions { takeover: true };
    Client::login(&config, "alice", "new-secret", takeover).await?;
    Ok(())
}
