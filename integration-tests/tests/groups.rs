//! Named groups and presence: a 200-member group over three servers (every member gets every
//! message once, all in the same order, one push per server per message), leaving, offline
//! catch-up, errors, the HTTP group API, joins and leaves told to the group, and presence
//! events for users who share a group (also when a server leaves discovery for a moment, or
//! comes back at another address).

#![allow(clippy::unwrap_used)]

use anyhow::Context;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cim_client::{Client, Event, Events, LoginOptions};
use cim_integration_tests::{
    Backend, TestCluster, WAIT, eventually, metric_value, next_event, router_metrics,
};
use cim_proto::v1::{ClientControl, Ping, ServerControl, client_control, server_control};
use cim_proto::{read_required, write_frame};
use http::Method;

async fn cluster(servers: usize) -> anyhow::Result<TestCluster> {
    TestCluster::start_with(servers, Backend::Memory, |c| {
        // Hundreds of accounts: a cheap hash keeps set-up short (the cost is tested elsewhere).
        c.password_cost = cim_router::password::Cost {
            memory_kib: 256,
            iterations: 1,
        };
        c.max_group_size = 300;
    })
    .await
}

/// The next chat message, skipping presence events and group changes.
async fn next_chat(events: &mut Events) -> anyhow::Result<cim_client::IncomingMessage> {
    next_chat_noting_changes(events, &mut Vec::new()).await
}

/// A group change: the group, who, and whether they joined.
type Change = (String, u64, bool);

/// The group change `event` tells, if it is one.
fn change_of(event: &Event) -> Option<Change> {
    match event {
        Event::GroupChange {
            group,
            user_id,
            joined,
            ..
        } => Some((group.clone(), *user_id, *joined)),
        _ => None,
    }
}

/// [`next_chat`], adding the group changes it skips to `changes`.
async fn next_chat_noting_changes(
    events: &mut Events,
    changes: &mut Vec<Change>,
) -> anyhow::Result<cim_client::IncomingMessage> {
    loop {
        let event = next_event(events, WAIT).await?;
        match event {
            Event::Message(m) => return Ok(m),
            other => note_change(other, changes)?,
        }
    }
}

/// Adds the change `event` tells to `changes`; a presence event is skipped, anything else is
/// unexpected.
fn note_change(event: Event, changes: &mut Vec<Change>) -> anyhow::Result<()> {
    match (change_of(&event), event) {
        (Some(change), _) => changes.push(change),
        (None, Event::Presence { .. }) => {}
        (None, other) => anyhow::bail!("unexpected event {other:?}"),
    }
    Ok(())
}

/// The group changes `events` bring after `changes` (those seen already): waits for `want` in
/// all, then half a second more, so that any beyond them show.
async fn group_changes(
    events: &mut Events,
    mut changes: Vec<Change>,
    want: usize,
) -> anyhow::Result<Vec<Change>> {
    while changes.len() < want {
        note_change(next_event(events, WAIT).await?, &mut changes)?;
    }
    while let Ok(event) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        note_change(event.context("the session ended")?, &mut changes)?;
    }
    Ok(changes)
}

async fn pushes(cluster: &TestCluster) -> anyhow::Result<u64> {
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    let pushes = metric_value(&router_metrics(&api).await?, "cim_router_pushes_total")?;
    Ok(pushes as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_200_member_group_over_three_servers_gets_every_message_once_in_one_order()
-> anyhow::Result<()> {
    let cluster = cluster(3).await?;
    let config = cluster.client_config();
    let mut clients: Vec<Arc<Client>> = Vec::new();
    let mut events: Vec<Events> = Vec::new();
    for i in 0..200 {
        let name = format!("m{i}");
        cim_client::register(&config, &name, "password").await?;
        let (c, e) = Client::login(&config, &name, "password", LoginOptions::default()).await?;
        clients.push(Arc::new(c));
        events.push(e);
    }
    let mut per_server: HashMap<String, usize> = HashMap::new();
    for c in &clients {
        *per_server.entry(c.info().server_id).or_default() += 1;
    }
    assert_eq!(per_server.len(), 3, "{per_server:?}");
    clients[0].create_group("big").await?;
    for c in clients.iter().skip(1) {
        c.join_group("big").await?;
    }
    assert_eq!(clients[5].group_members("big").await?.len(), 200);

    let before = pushes(&cluster).await?;
    // Three members send ten messages each, concurrently.
    let senders = [0usize, 77, 150];
    let mut tasks = Vec::new();
    for &s in &senders {
        let client = clients[s].clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..10 {
                let ack = client.send_group("big", &format!("from {s}: {i}")).await?;
                assert_eq!(ack.recipients, 199);
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    // Every member gets every message not its own, once, and all in the same order.
    let mut reference: Option<Vec<u64>> = None;
    let mut orders: Vec<(u64, Vec<(u64, u64)>)> = Vec::new();
    let mut owners_changes = Vec::new();
    for (i, e) in events.iter_mut().enumerate() {
        let want = if senders.contains(&i) { 20 } else { 30 };
        let mut got = Vec::new();
        for _ in 0..want {
            let m = if i == 0 {
                next_chat_noting_changes(e, &mut owners_changes).await?
            } else {
                next_chat(e).await?
            };
            assert_eq!(m.group.as_deref(), Some("big"));
            got.push((m.msg_id, m.from_user));
        }
        let me = clients[i].info().user_id;
        assert!(
            got.iter().all(|(_, from)| *from != me),
            "a member got its own message"
        );
        if want == 30 && reference.is_none() {
            reference = Some(got.iter().map(|(id, _)| *id).collect());
        }
        orders.push((me, got));
    }
    let reference = reference.unwrap();
    let unique: std::collections::HashSet<u64> = reference.iter().copied().collect();
    assert_eq!(unique.len(), 30, "each message once");
    for (me, got) in orders {
        let expected: Vec<u64> = reference
            .iter()
            .copied()
            .filter(|id| {
                got.iter().any(|(g, _)| g == id) || !got.iter().any(|(_, from)| *from == me)
            })
            .collect();
        let ids: Vec<u64> = got.iter().map(|(id, _)| *id).collect();
        let filtered: Vec<u64> = expected.into_iter().filter(|id| ids.contains(id)).collect();
        assert_eq!(ids, filtered, "member {me} saw another order");
    }
    // One push per server holding online recipients per message: 30 messages x 3 servers.
    let after = pushes(&cluster).await?;
    assert_eq!(after - before, 30 * 3);
    // The owner heard of the joins while the group had at most 100 members (m1 to m99), and
    // of no later one.
    let joined: Vec<Change> = (1..100)
        .map(|i| ("big".to_string(), clients[i].info().user_id, true))
        .collect();
    let owners_changes = group_changes(&mut events[0], owners_changes, joined.len()).await?;
    assert_eq!(owners_changes, joined);
    // And nothing more: a last message is every other member's next one.
    clients[0].send_group("big", "the end").await?;
    for (i, e) in events.iter_mut().enumerate().skip(1) {
        assert_eq!(next_chat(e).await?.body, "the end", "member {i} got more");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_stops_delivery_and_offline_members_catch_up() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let config = cluster.client_config();
    let (alice, _a) = cluster.user("alice").await?;
    let (bob, mut bob_first_events) = cluster.user("bob").await?;
    let (carol, mut carol_events) = cluster.user("carol").await?;
    alice.create_group("team").await?;
    bob.join_group("team").await?;
    carol.join_group("team").await?;
    assert_eq!(carol.my_groups().await?, vec!["team".to_string()]);

    carol.leave_group("team").await?;
    assert_eq!(
        alice.send_group("team", "without carol").await?.recipients,
        1
    );
    // Carol's next message is this marker: she did not get the group message.
    alice.send_private(carol.info().user_id, "marker").await?;
    assert_eq!(next_chat(&mut carol_events).await?.body, "marker");
    assert_eq!(
        next_chat(&mut bob_first_events).await?.body,
        "without carol"
    );

    bob.close().await;
    for i in 0..5 {
        alice
            .send_group("team", &format!("while bob is away {i}"))
            .await?;
    }
    let (_bob, mut bob_events) =
        Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    let mut bodies = Vec::new();
    while bodies.last().map(String::as_str) != Some("while bob is away 4") {
        bodies.push(next_chat(&mut bob_events).await?.body);
    }
    // His first client had "without carol"; the new one gets it again only if his ack had not
    // yet trimmed it from his inbox (acks are reported twice a second).
    if bodies.first().map(String::as_str) == Some("without carol") {
        bodies.remove(0);
    }
    let want: Vec<String> = (0..5).map(|i| format!("while bob is away {i}")).collect();
    assert_eq!(bodies, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_errors_have_codes_and_the_http_api_works() -> anyhow::Result<()> {
    let cluster = cluster(1).await?;
    let (alice, _a) = cluster.user("alice").await?;
    let (bob, _b) = cluster.user("bob").await?;
    alice.create_group("club").await?;
    let code = |r: Result<(), cim_client::ClientError>| r.unwrap_err().code().map(str::to_owned);
    for name in ["club", "Club"] {
        assert_eq!(
            code(bob.create_group(name).await).as_deref(),
            Some("group_exists"),
            "{name}"
        );
    }
    assert_eq!(
        code(alice.create_group("all").await).as_deref(),
        Some("bad_request")
    );
    assert_eq!(
        code(bob.join_group("nope").await).as_deref(),
        Some("unknown_group")
    );
    assert_eq!(
        code(bob.leave_group("club").await).as_deref(),
        Some("not_member")
    );
    assert_eq!(
        code(bob.leave_group("nope").await).as_deref(),
        Some("unknown_group")
    );
    // Dots alone are no name (`..` in a URL path means the folder above).
    assert_eq!(
        code(alice.create_group("..").await).as_deref(),
        Some("bad_request")
    );
    let err = bob.send_group("club", "let me in").await.unwrap_err();
    assert_eq!(err.code(), Some("not_member"));
    // Nor may he see who is in it, and who of them is online.
    let err = bob.group_members("club").await.unwrap_err();
    assert_eq!(err.code(), Some("not_member"));

    // The same over HTTP.
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    let token = bob.token();
    let _: serde_json::Value = api
        .call(
            Method::POST,
            "/api/groups/club/join",
            None::<&()>,
            Some(&token),
        )
        .await?;
    let members: serde_json::Value = api
        .call::<(), _>(Method::GET, "/api/groups/club/members", None, Some(&token))
        .await?;
    let names: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["alice", "bob"]);
    assert!(members["members"][0]["online"].as_bool().unwrap());
    let mine: serde_json::Value = api
        .call::<(), _>(Method::GET, "/api/groups", None, Some(&token))
        .await?;
    assert_eq!(mine["groups"], serde_json::json!(["club"]));
    let created: serde_json::Value = api
        .call(
            Method::POST,
            "/api/groups",
            Some(&serde_json::json!({"name": "second"})),
            Some(&token),
        )
        .await?;
    assert_eq!(created["name"], "second");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_events_reach_users_who_share_a_group() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let config = cluster.client_config();
    let (alice, mut alice_events) = cluster.user("alice").await?;
    let (bob, _b) = cluster.user("bob").await?;
    alice.create_group("pals").await?;
    bob.join_group("pals").await?;
    let bob_id = bob.info().user_id;

    bob.logout().await?;
    let offline = wait_presence(&mut alice_events).await?;
    assert_eq!(offline, (bob_id, "bob".to_string(), false));
    let (_bob, _b) = Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    let online = wait_presence(&mut alice_events).await?;
    assert_eq!(online, (bob_id, "bob".to_string(), true));

    // A takeover leaves Bob online: Alice is not told so again (its router announces it as
    // any login; the pause lets that go out before the logout's, which would otherwise
    // replace it in the router's queue), and the next she hears is his logout. The rule
    // itself has a unit test in `client/src/presence.rs`.
    let takeover = LoginOptions { takeover: true };
    let (bob_again, _b2) = Client::login(&config, "bob", "password", takeover).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    bob_again.logout().await?;
    let offline = wait_presence(&mut alice_events).await?;
    assert_eq!(offline, (bob_id, "bob".to_string(), false));

    // Users who share no group with alice come and go unannounced: the next presence she
    // hears of is Bob's login, made after theirs.
    let (dave, _d) = cluster.user("dave").await?;
    dave.close().await;
    let (carol, _c) = cluster.user("carol").await?;
    let (_bob, _b) = Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    let online = wait_presence(&mut alice_events).await?;
    assert_eq!(online, (bob_id, "bob".to_string(), true));
    carol.send_private(alice.info().user_id, "marker").await?;
    match next_event(&mut alice_events, WAIT).await? {
        Event::Message(m) => assert_eq!(m.body, "marker"),
        other => panic!("expected only the marker, got {other:?}"),
    }
    Ok(())
}

/// Alice, Bob, Carol and Dave logged in on `cluster`'s two servers (both in use).
async fn four_users_on_two_servers(cluster: &TestCluster) -> anyhow::Result<[(Client, Events); 4]> {
    let mut users = Vec::new();
    for name in ["alice", "bob", "carol", "dave"] {
        users.push(cluster.user(name).await?);
    }
    let servers: std::collections::HashSet<String> =
        users.iter().map(|(c, _)| c.info().server_id).collect();
    assert_eq!(servers.len(), 2, "the users share one server");
    Ok(<[_; 4]>::try_from(users).ok().unwrap())
}

/// A join or a leave is told to the group's other online members, on every server, whether
/// made on a client's connection or over HTTP; not to the user who made it, not to anyone
/// outside the group, and not again for a join of a member.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_leaves_are_told_to_the_groups_online_members() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let [
        (alice, mut alice_events),
        (bob, mut bob_events),
        (carol, mut carol_events),
        (dave, mut dave_events),
    ] = four_users_on_two_servers(&cluster).await?;
    let (bob_id, carol_id) = (bob.info().user_id, carol.info().user_id);

    alice.create_group("pals").await?;
    bob.join_group("pals").await?;
    bob.join_group("pals").await?;
    // Carol joins over HTTP.
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    let _: serde_json::Value = api
        .call::<(), _>(
            Method::POST,
            "/api/groups/pals/join",
            None,
            Some(&carol.token()),
        )
        .await?;
    bob.leave_group("pals").await?;

    let change = |who, joined| ("pals".to_string(), who, joined);
    let wanted: [(&str, &mut Events, Vec<Change>); 4] = [
        (
            "alice",
            &mut alice_events,
            vec![
                change(bob_id, true),
                change(carol_id, true),
                change(bob_id, false),
            ],
        ),
        ("bob", &mut bob_events, vec![change(carol_id, true)]),
        ("carol", &mut carol_events, vec![change(bob_id, false)]),
        ("dave", &mut dave_events, vec![]),
    ];
    for (name, events, want) in wanted {
        let got = group_changes(events, Vec::new(), want.len()).await?;
        assert_eq!(got, want, "{name}");
    }
    dave.close().await;
    Ok(())
}

/// What a user hears of groups besides messages and presence.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Heard {
    /// A group change: group, user, joined, and the owner's id when the owner removed them.
    Change(String, u64, bool, Option<u64>),
    /// An invitation: group, and the owner who made it.
    Invite(String, u64),
    /// We own the group now: group, the owner before us, and whether it handed the group to
    /// us (rather than left).
    Owner(String, u64, bool),
    /// Another member owns it now: group, the owner now, the one before, and whether that one
    /// handed it over.
    OwnerChange(String, u64, u64, bool),
}

/// Notes what `event` tells of groups in `heard`, skips presence, and returns a message.
fn note_heard(event: Event, heard: &mut Vec<Heard>) -> Option<cim_client::IncomingMessage> {
    match event {
        Event::GroupChange {
            group,
            user_id,
            joined,
            by,
            ..
        } => heard.push(Heard::Change(group, user_id, joined, by.map(|(id, _)| id))),
        Event::GroupInvite {
            group, by_user_id, ..
        } => heard.push(Heard::Invite(group, by_user_id)),
        Event::GroupOwner {
            group,
            previous_owner_id,
            handed_over,
            ..
        } => heard.push(Heard::Owner(group, previous_owner_id, handed_over)),
        Event::GroupOwnerChange {
            group,
            owner_id,
            previous_owner_id,
            handed_over,
            ..
        } => heard.push(Heard::OwnerChange(
            group,
            owner_id,
            previous_owner_id,
            handed_over,
        )),
        Event::Message(m) => return Some(m),
        _ => {}
    }
    None
}

/// What `events` tell of groups after `heard` (what was heard already): waits for `want`
/// things in all, then half a second more, so that any beyond them show. A message is an
/// error.
async fn heard_of_groups(
    events: &mut Events,
    mut heard: Vec<Heard>,
    want: usize,
) -> anyhow::Result<Vec<Heard>> {
    while heard.len() < want {
        let event = next_event(events, WAIT).await?;
        if let Some(m) = note_heard(event, &mut heard) {
            anyhow::bail!("unexpected message {m:?}");
        }
    }
    while let Ok(event) = tokio::time::timeout(Duration::from_millis(500), events.next()).await {
        if let Some(m) = note_heard(event.context("the session ended")?, &mut heard) {
            anyhow::bail!("unexpected message {m:?}");
        }
    }
    Ok(heard)
}

/// An invite-only group is entered only by users its owner invited (in-band or over HTTP),
/// each by its own join; the owner removes members, who then can neither send to it nor join
/// it again, and withdraws invitations; only the owner does either (a non-owner is told so
/// before anything about the user it named). The invited user hears the invitation; a member
/// removed and the other online members hear who removed them; the owner, who did it, hears
/// nothing of it; outsiders hear nothing. The listing names the owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invite_only_groups_owner_invites_and_removes_its_members() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let [
        (alice, mut alice_events),
        (bob, mut bob_events),
        (carol, mut carol_events),
        (dave, mut dave_events),
    ] = four_users_on_two_servers(&cluster).await?;
    let (alice_id, bob_id, carol_id, dave_id) = (
        alice.info().user_id,
        bob.info().user_id,
        carol.info().user_id,
        dave.info().user_id,
    );
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    let refusal = |result: Result<(), cim_client::ClientError>| {
        result.err().and_then(|e| e.code().map(str::to_string))
    };
    let http = |method: Method, path: String, body: Option<serde_json::Value>, token: String| {
        let api = &api;
        async move {
            api.call::<serde_json::Value, serde_json::Value>(
                method,
                &path,
                body.as_ref(),
                Some(&token),
            )
            .await
            .map(|_| ())
        }
    };

    alice.create_invite_only_group("club").await?;
    assert_eq!(
        refusal(bob.join_group("club").await).as_deref(),
        Some("invite_only")
    );
    alice.invite("club", bob_id).await?;
    assert_eq!(bob.groups_and_invitations().await?.invitations, ["club"]);
    assert_eq!(
        refusal(dave.invite("club", 987_654).await).as_deref(),
        Some("not_owner"),
        "a non-owner learns nothing of the user"
    );
    assert_eq!(
        refusal(alice.invite("club", 987_654).await).as_deref(),
        Some("unknown_user")
    );
    bob.join_group("club").await?;
    let mine = bob.groups_and_invitations().await?;
    assert_eq!(
        (mine.groups, mine.invitations),
        (vec!["club".to_string()], vec![])
    );
    assert_eq!(
        refusal(bob.invite("club", carol_id).await).as_deref(),
        Some("not_owner"),
        "a member is no owner"
    );
    // Carol is invited, and joins, over HTTP.
    let body = serde_json::json!({"user_id": carol_id});
    http(
        Method::POST,
        "/api/groups/club/invitations".into(),
        Some(body),
        alice.token(),
    )
    .await?;
    let carols: serde_json::Value = api
        .call::<(), _>(Method::GET, "/api/groups", None, Some(&carol.token()))
        .await?;
    assert_eq!(
        carols,
        serde_json::json!({"groups": [], "invitations": ["club"]})
    );
    http(
        Method::POST,
        "/api/groups/club/join".into(),
        None,
        carol.token(),
    )
    .await?;
    bob.send_group("club", "hello club").await?;
    // What came before the message counts too.
    let (mut alice_heard, mut carol_heard) = (Vec::new(), Vec::new());
    for (events, heard) in [
        (&mut alice_events, &mut alice_heard),
        (&mut carol_events, &mut carol_heard),
    ] {
        let got = loop {
            if let Some(m) = note_heard(next_event(events, WAIT).await?, heard) {
                break m;
            }
        };
        assert_eq!(got.body, "hello club");
    }
    let members = bob.group_members("club").await?;
    let owners: Vec<(&str, bool)> = members.iter().map(|m| (m.name.as_str(), m.owner)).collect();
    assert_eq!(owners, [("alice", true), ("bob", false), ("carol", false)]);

    // Bob is removed in-band: he can neither send to the group nor join it again.
    alice.remove_member("club", bob_id).await?;
    assert_eq!(
        refusal(bob.send_group("club", "still here?").await.map(|_| ())).as_deref(),
        Some("not_member")
    );
    assert_eq!(
        refusal(bob.join_group("club").await).as_deref(),
        Some("invite_only")
    );
    // Carol is removed over HTTP, once; Dave, no owner, removes no one.
    let remove = |who: u64, token: String| {
        http(
            Method::DELETE,
            format!("/api/groups/club/members/{who}"),
            None,
            token,
        )
    };
    let code = |result: Result<(), cim_client::ClientError>| refusal(result);
    assert_eq!(
        code(remove(alice_id, dave.token()).await).as_deref(),
        Some("not_owner")
    );
    remove(carol_id, alice.token()).await?;
    assert_eq!(
        code(remove(carol_id, alice.token()).await).as_deref(),
        Some("no_such_member")
    );
    // An invitation withdrawn, or declined (a leave), lets no one in.
    alice.invite("club", dave_id).await?;
    alice.remove_member("club", dave_id).await?;
    assert_eq!(
        refusal(dave.join_group("club").await).as_deref(),
        Some("invite_only")
    );
    alice.invite("club", dave_id).await?;
    dave.leave_group("club").await?;
    assert!(dave.groups_and_invitations().await?.invitations.is_empty());
    assert_eq!(
        refusal(dave.join_group("club").await).as_deref(),
        Some("invite_only")
    );
    assert_eq!(alice.group_members("club").await?.len(), 1);

    let change = |who, joined, by| Heard::Change("club".to_string(), who, joined, by);
    let invite = Heard::Invite("club".to_string(), alice_id);
    let wanted: [(&str, &mut Events, Vec<Heard>, Vec<Heard>); 4] = [
        (
            "alice",
            &mut alice_events,
            alice_heard,
            vec![change(bob_id, true, None), change(carol_id, true, None)],
        ),
        (
            "bob",
            &mut bob_events,
            Vec::new(),
            vec![
                invite.clone(),
                change(carol_id, true, None),
                change(bob_id, false, Some(alice_id)),
            ],
        ),
        (
            "carol",
            &mut carol_events,
            carol_heard,
            vec![
                invite.clone(),
                change(bob_id, false, Some(alice_id)),
                change(carol_id, false, Some(alice_id)),
            ],
        ),
        (
            "dave",
            &mut dave_events,
            Vec::new(),
            vec![invite.clone(), invite.clone()],
        ),
    ];
    for (name, events, heard, want) in wanted {
        let got = heard_of_groups(events, heard, want.len()).await?;
        assert_eq!(got, want, "{name}");
    }
    Ok(())
}

/// An owner who leaves passes its group to the member with the lowest id, who is told (and
/// may now invite and remove); the others hear that the owner left and who owns the group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_who_leaves_passes_the_group_on_and_the_heir_is_told() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let [
        (alice, mut alice_events),
        (bob, mut bob_events),
        (carol, mut carol_events),
        (dave, _dave_events),
    ] = four_users_on_two_servers(&cluster).await?;
    let (alice_id, bob_id, carol_id) = (
        alice.info().user_id,
        bob.info().user_id,
        carol.info().user_id,
    );
    assert!(bob_id < carol_id, "Bob registered first");
    alice.create_invite_only_group("torch").await?;
    for (user, id) in [(&bob, bob_id), (&carol, carol_id)] {
        alice.invite("torch", id).await?;
        user.join_group("torch").await?;
    }
    alice.leave_group("torch").await?;
    let members = carol.group_members("torch").await?;
    let owners: Vec<(&str, bool)> = members.iter().map(|m| (m.name.as_str(), m.owner)).collect();
    assert_eq!(owners, [("bob", true), ("carol", false)]);
    bob.invite("torch", dave.info().user_id).await?;
    dave.join_group("torch").await?;

    let change = |who, joined| Heard::Change("torch".to_string(), who, joined, None);
    let invite = |by| Heard::Invite("torch".to_string(), by);
    let dave_id = dave.info().user_id;
    let bob_heard = heard_of_groups(&mut bob_events, Vec::new(), 5).await?;
    assert_eq!(
        bob_heard,
        [
            invite(alice_id),
            change(carol_id, true),
            change(alice_id, false),
            Heard::Owner("torch".to_string(), alice_id, false),
            change(dave_id, true),
        ]
    );
    let carol_heard = heard_of_groups(&mut carol_events, Vec::new(), 4).await?;
    assert_eq!(
        carol_heard,
        [
            invite(alice_id),
            change(alice_id, false),
            Heard::OwnerChange("torch".to_string(), bob_id, alice_id, false),
            change(dave_id, true)
        ]
    );
    let alice_heard = heard_of_groups(&mut alice_events, Vec::new(), 2).await?;
    assert_eq!(alice_heard, [change(bob_id, true), change(carol_id, true)]);
    Ok(())
}

/// The next presence event, skipping group changes.
async fn wait_presence(events: &mut Events) -> anyhow::Result<(u64, String, bool)> {
    loop {
        match next_event(events, Duration::from_secs(10)).await? {
            Event::Presence {
                user_id,
                name,
                online,
            } => return Ok((user_id, name, online)),
            Event::GroupChange { .. } => {}
            other => anyhow::bail!("expected a presence event, got {other:?}"),
        }
    }
}

/// A user whose route went missing while the session lived on (it lapsed, or was removed
/// while the server was out of discovery, and the user was announced offline) is announced
/// online again when the server's renewal brings the route back. Before, contacts kept
/// seeing a connected user as offline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_a_renewal_brings_back_is_announced_online() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(1, Backend::Memory, |c| {
        c.renew_interval = Duration::from_millis(300);
    })
    .await?;
    // Alice on a raw connection, to see what the router announces: the client library tells
    // its application only a change, and here Bob's route goes without an offline word (in
    // service, one removed with its server announces it; one whose lease lapsed does not).
    let (_, token) = cluster.http_login("alice").await?;
    let (_conn, result, control, mut alice) = cluster.raw_login(0, &token, false).await?;
    assert_eq!(result.code, "");
    let pinging = tokio::spawn(keep_pinging(control));
    let config = cluster.client_config();
    let api = cim_client::RouterApi::new(&config)?;
    let body = serde_json::json!({"name": "pals"});
    let _: serde_json::Value = api
        .call(Method::POST, "/api/groups", Some(&body), Some(&token))
        .await?;
    // Bob is a member before he logs in, and his login's announcement is taken first: an
    // announcement queued at login reads the groups later, so with a join after the login
    // it could reach Alice late and pass for the renewal's.
    let bob_id = cim_client::register(&config, "bob", "password").await?;
    cluster
        .embedded
        .store
        .join_group("pals", bob_id, usize::MAX)
        .await?;
    let (_bob, _b) = Client::login(&config, "bob", "password", LoginOptions::default()).await?;
    assert_eq!(
        next_raw_presence(&mut alice).await?,
        (bob_id, true),
        "login"
    );
    cluster.drop_route(bob_id).await?;
    assert_eq!(
        next_raw_presence(&mut alice).await?,
        (bob_id, true),
        "renewal"
    );
    pinging.abort();
    Ok(())
}

/// Pings on a raw session's control stream every 100 ms, as a client would, until aborted.
async fn keep_pinging(mut control: quinn::SendStream) -> anyhow::Result<()> {
    for nonce in 1.. {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let ping = ClientControl {
            kind: Some(client_control::Kind::Ping(Ping {
                nonce,
                ..Default::default()
            })),
        };
        write_frame(&mut control, &ping, 4096).await?;
    }
    Ok(())
}

/// The next presence frame on a raw session's control stream (user, online), past pongs.
async fn next_raw_presence(control: &mut quinn::RecvStream) -> anyhow::Result<(u64, bool)> {
    let next = async {
        loop {
            let frame: ServerControl = read_required(control, 4096).await?;
            match frame.kind {
                Some(server_control::Kind::Presence(p)) => return Ok((p.user_id, p.online)),
                Some(server_control::Kind::Pong(_)) => {}
                other => anyhow::bail!("unexpected control frame {other:?}"),
            }
        }
    };
    // One deadline for the whole wait: pongs come all the time.
    tokio::time::timeout(WAIT, next)
        .await
        .context("no presence in time")?
}

/// Alice and Bob share a group on a one-server cluster; returns Bob's id, the server's
/// discovery entry and Alice's events.
async fn pals_on_one_server(
    cluster: &TestCluster,
) -> anyhow::Result<(u64, cim_core::discovery::ServerInfo, Vec<(Client, Events)>)> {
    let (alice, alice_events) = cluster.user("alice").await?;
    let (bob, bob_events) = cluster.user("bob").await?;
    alice.create_group("pals").await?;
    bob.join_group("pals").await?;
    let server = cluster.embedded.discovery.servers().borrow()[0].clone();
    Ok((
        bob.info().user_id,
        server,
        vec![(alice, alice_events), (bob, bob_events)],
    ))
}

/// A server out of discovery for a moment while its router link works (its ZooKeeper session
/// expired while it lived, or the router's own did and it read the listing before the servers
/// were back) keeps its users' routes: nobody is announced offline. Before, every such blip
/// removed all of the server's routes, announced its users offline and online again, and
/// dropped the link.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_out_of_discovery_for_a_moment_keeps_its_users_online() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (bob_id, server, mut clients) = pals_on_one_server(&cluster).await?;
    let discovery = &cluster.embedded.discovery;
    discovery.deregister_server(&server.id).await?;
    let store = &cluster.embedded.store;
    for _ in 0..15 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let route = store.routes(&[bob_id]).await?[0].clone();
        assert!(route.is_some(), "bob's route went while his server was out");
    }
    discovery.register_server(server).await?;
    // Bob's login may still be announced (online) to Alice, now that they share a group, and
    // his joining it.
    let alice_events = &mut clients[0].1;
    while let Ok(event) = next_event(alice_events, Duration::from_secs(2)).await {
        if !matches!(
            event,
            Event::Presence { online: true, .. } | Event::GroupChange { joined: true, .. }
        ) {
            anyhow::bail!("a blip of discovery reached the users: {event:?}");
        }
    }
    let route = store.routes(&[bob_id]).await?[0].clone();
    assert!(route.is_some_and(|r| r.confirmed), "bob's route stays");
    Ok(())
}

/// A server id back in discovery at another address is a new process without the old one's
/// sessions (as one with another incarnation is: `links::same_process`): its routes are
/// removed as for a departure, so their clients can log in again.
/// Before, the routes stayed, on a server id that counted as alive, and a token re-login was
/// refused `session_live` until the lease ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_id_back_at_another_address_loses_the_old_routes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (bob_id, mut server, _clients) = pals_on_one_server(&cluster).await?;
    // Nothing listens at the new address: the old process's link must not come back.
    let elsewhere = std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?;
    server.internal_addr = elsewhere;
    server.client_addr = elsewhere;
    cluster.embedded.discovery.register_server(server).await?;
    let store = &cluster.embedded.store;
    eventually(WAIT, || async {
        let route = store.routes(&[bob_id]).await.ok()?.pop()?;
        route.is_none().then_some(())
    })
    .await
    .context("bob's route to the old process stays")?;
    Ok(())
}

/// A server id back at the same address with another incarnation (a process restarted
/// within the departure grace, before the routers saw it leave) is a new process without the
/// old one's sessions: the old routes go, and their users are announced offline (here the
/// process is in fact the same, and its renewal brings the route back at once), instead of
/// staying and refusing their token re-logins as live until the lease ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_id_back_with_another_incarnation_loses_the_old_routes() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (_bob_id, server, _clients) = pals_on_one_server(&cluster).await?;
    cluster.reincarnate_server(&server.id).await?;
    // The process is in fact the same: its renewal brings the routes back at once, so they
    // are watched for on the router's count of removals.
    cluster.wait_departed_routes(2.0).await
}

/// A big group's member listing (1,000 members or more: a route and an account read per
/// member) is read at most once a second, however often it is asked for: any user may join
/// any group, and listing the biggest at the API limit kept the store busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_groups_member_listing_is_read_at_most_once_a_second() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let (alice, _a) = cluster.user("alice").await?;
    alice.create_group("crowd").await?;
    let store = &cluster.embedded.store;
    let mut extras = Vec::new();
    for i in 0..1000 {
        let account = store.create_account(&format!("extra{i}"), "hash").await?;
        store.join_group("crowd", account.id, 10_000).await?;
        extras.push(account.id);
    }
    assert_eq!(alice.group_members("crowd").await?.len(), 1001);
    store.leave_group("crowd", extras[0]).await?;
    assert_eq!(
        alice.group_members("crowd").await?.len(),
        1001,
        "the listing of a second ago answers"
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(alice.group_members("crowd").await?.len(), 1000);
    Ok(())
}

/// A user may be in at most `max_groups_per_user` groups, created or joined: each of a user's
/// groups is read at every login and logout of theirs, to tell its members. Rejoining one it
/// is in, and joining again after leaving one, still work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_is_in_at_most_so_many_groups() -> anyhow::Result<()> {
    let cluster = TestCluster::start_with(1, Backend::Memory, |c| {
        c.max_groups_per_user = 2;
    })
    .await?;
    let (alice, _a) = cluster.user("alice").await?;
    let (bob, _b) = cluster.user("bob").await?;
    bob.create_group("third").await?;
    alice.create_group("first").await?;
    alice.create_group("second").await?;
    let code = |r: Result<(), cim_client::ClientError>| r.unwrap_err().code().map(str::to_owned);
    assert_eq!(
        code(alice.create_group("more").await).as_deref(),
        Some("too_many_groups")
    );
    assert_eq!(
        code(alice.join_group("third").await).as_deref(),
        Some("too_many_groups")
    );
    alice.join_group("first").await?;
    alice.leave_group("second").await?;
    alice.join_group("third").await?;
    let mut groups = alice.my_groups().await?;
    groups.sort();
    assert_eq!(groups, ["first", "third"]);
    Ok(())
}

/// A join or a group's creation that lands after its user's account was deleted (a session's
/// in-band request that passed its checks before the deletion) is undone and refused
/// `unknown_user`: no group keeps a member that is gone, who could even come to own it; nor
/// is a group handed to a member whose account is gone (its clean-up not done), nor passed to
/// one when its owner leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_for_a_deleted_account_is_undone() -> anyhow::Result<()> {
    let cluster = cluster(1).await?;
    let (alice, _alice_events) = cluster.user("alice").await?;
    let (bob, _bob_events) = cluster.user("bob").await?;
    let (carol, _carol_events) = cluster.user("carol").await?;
    let (alice_id, bob_id) = (alice.info().user_id, bob.info().user_id);
    assert!(alice_id < bob_id, "Alice, the lowest id, is the heir");
    bob.create_group("open").await?;
    bob.create_group("kept").await?;
    alice.join_group("kept").await?;
    // The account goes from the store alone, as if the deletion ran between the checks of
    // the requests below and their store calls; the session stays.
    let store = &cluster.embedded.store;
    store
        .delete_account(alice_id, Duration::from_secs(60))
        .await?
        .context("deleted")?;
    let refusal = |result: Result<(), cim_client::ClientError>| {
        result.err().and_then(|e| e.code().map(str::to_string))
    };
    assert_eq!(
        refusal(alice.join_group("open").await).as_deref(),
        Some("unknown_user")
    );
    assert_eq!(store.group_members("open").await?, Some(vec![bob_id]));
    assert_eq!(
        refusal(alice.create_group("own").await).as_deref(),
        Some("unknown_user")
    );
    assert_eq!(store.group_info("own").await?, None);
    assert!(store.user_groups(alice_id).await?.is_empty());
    assert_eq!(
        refusal(bob.transfer_group("kept", alice_id).await).as_deref(),
        Some("unknown_user")
    );
    assert_eq!(
        store.group_info("kept").await?.map(|g| g.owner),
        Some(bob_id)
    );
    // Bob leaves: the group passes over Alice, who is gone, to Carol.
    carol.join_group("kept").await?;
    bob.leave_group("kept").await?;
    let carol_id = carol.info().user_id;
    assert_eq!(
        store.group_info("kept").await?.map(|g| g.owner),
        Some(carol_id)
    );
    assert_eq!(store.group_members("kept").await?, Some(vec![carol_id]));
    Ok(())
}

/// An owner hands its group to a member, in-band or over HTTP, and stays a member without the
/// owner's rights: the new owner is told and may invite and remove, the other members hear who
/// owns it, and neither the old owner nor an invited user does; a non-member or someone else's
/// group is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_owner_hands_its_group_to_a_member() -> anyhow::Result<()> {
    let cluster = cluster(2).await?;
    let [
        (alice, mut alice_events),
        (bob, mut bob_events),
        (carol, mut carol_events),
        (dave, mut dave_events),
    ] = four_users_on_two_servers(&cluster).await?;
    let (alice_id, bob_id, carol_id, dave_id) = (
        alice.info().user_id,
        bob.info().user_id,
        carol.info().user_id,
        dave.info().user_id,
    );
    let refusal = |result: Result<(), cim_client::ClientError>| {
        result.err().and_then(|e| e.code().map(str::to_string))
    };
    alice.create_group("relay").await?;
    bob.join_group("relay").await?;
    carol.join_group("relay").await?;
    assert_eq!(
        refusal(alice.transfer_group("relay", dave_id).await).as_deref(),
        Some("no_such_member")
    );
    assert_eq!(
        refusal(bob.transfer_group("relay", carol_id).await).as_deref(),
        Some("not_owner")
    );
    alice.transfer_group("relay", bob_id).await?;
    let owners: Vec<(u64, bool)> = carol
        .group_members("relay")
        .await?
        .iter()
        .map(|m| (m.id, m.owner))
        .collect();
    assert_eq!(owners.len(), 3);
    assert!(owners.contains(&(alice_id, false)) && owners.contains(&(bob_id, true)));
    assert_eq!(
        refusal(alice.invite("relay", dave_id).await).as_deref(),
        Some("not_owner"),
        "the old owner has no rights left"
    );
    bob.invite("relay", dave_id).await?;
    // Over HTTP, Bob hands it to Carol.
    let api = cim_client::RouterApi::new(&cluster.client_config())?;
    let body = serde_json::json!({ "user_id": carol_id });
    let _: serde_json::Value = api
        .call(
            Method::POST,
            "/api/groups/relay/owner",
            Some(&body),
            Some(&bob.token()),
        )
        .await?;
    carol.remove_member("relay", alice_id).await?;

    let change = |who, joined, by| Heard::Change("relay".to_string(), who, joined, by);
    let bob_heard = heard_of_groups(&mut bob_events, Vec::new(), 3).await?;
    assert_eq!(
        bob_heard,
        [
            change(carol_id, true, None),
            Heard::Owner("relay".to_string(), alice_id, true),
            change(alice_id, false, Some(carol_id)),
        ]
    );
    // Carol hears who owns the group, then that she does; who removed Alice, she hears
    // nothing of it. The owner who handed the group over hears nothing of that.
    let carol_heard = heard_of_groups(&mut carol_events, Vec::new(), 2).await?;
    assert_eq!(
        carol_heard,
        [
            Heard::OwnerChange("relay".to_string(), bob_id, alice_id, true),
            Heard::Owner("relay".to_string(), bob_id, true),
        ]
    );
    let alice_heard = heard_of_groups(&mut alice_events, Vec::new(), 4).await?;
    assert_eq!(
        alice_heard,
        [
            change(bob_id, true, None),
            change(carol_id, true, None),
            Heard::OwnerChange("relay".to_string(), carol_id, bob_id, true),
            change(alice_id, false, Some(carol_id)),
        ]
    );
    // Dave, invited but no member, hears of his invitation alone.
    let dave_heard = heard_of_groups(&mut dave_events, Vec::new(), 1).await?;
    assert_eq!(dave_heard, [Heard::Invite("relay".to_string(), bob_id)]);
    Ok(())
}
