//! The store contract, checked the same way on the in-memory store and on a real Redis:
//! private appends check the recipient, keep gapless per-user sequence numbers, are idempotent
//! per message id (also after the recipient acked), and return the recipient's route; a sender's retry of a message gets the
//! message id its first attempt got; an inbox with no entries tells the last seq it gave, one
//! with entries does not; the online list holds confirmed sessions only; a revoked
//! login's server cannot renew its route back; a token re-login's claim ends the token's login
//! atomically, once, and only over the route it was checked against; a message-id node is held
//! by one router at a time, and its next holder learns how far the last one's ids went; a
//! group starts with its owner as a member and stops joins at its cap; a blocked sender's
//! private messages are refused without a sequence number. On
//! Redis, a route that cannot be read counts as none and does not block a login, and an inbox
//! entry that cannot be read is skipped.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use anyhow::Context;

use cim_integration_tests::cluster::RedisProc;
use cim_router::store::{
    Block, Claim, DeletedAccount, GroupInfo, ID_NODES, IdNode, InboxEntry, InboxLimits, InboxPage,
    Invite, Join, MemoryStore, Privacy, PrivateAppend, ReadReceipt, RedisStore, Relogin, Removal,
    Renewal, Report, Revocation, Route, Store, Transfer,
};

/// How long the logins a claim replaces stay revoked, in these tests.
const REPLACED_FOR: Duration = Duration::from_secs(3600);

fn entry(msg_id: u64) -> InboxEntry {
    InboxEntry {
        msg_id,
        from_user: 1,
        from_name: "alice".into(),
        group: String::new(),
        body: format!("m{msg_id}"),
        created_at_ms: 5,
        unsends: None,
    }
}

/// An unsend takes its message's place while the message is in the inbox (only a message of
/// the same sender's, and only once), and is appended whether it took one or not.
async fn unsends_take_their_messages_place(store: &dyn Store) -> anyhow::Result<()> {
    let limits = InboxLimits::default();
    let carl = store.create_account("unsend-carl", "hash").await?.id;
    // Stored now: a scan for a message stops at entries stored well before its id's time.
    let now = cim_core::now_ms();
    let from = |sender: u64, msg_id: u64| InboxEntry {
        from_user: sender,
        created_at_ms: now,
        ..entry(msg_id)
    };
    let unsend = |sender: u64, msg_id: u64, unsent: u64| InboxEntry {
        body: "(unsent)".into(),
        unsends: Some(unsent),
        ..from(sender, msg_id)
    };
    for message in [from(1, 100), from(2, 101), from(1, 102)] {
        store.append_private(carl, &message, limits).await?;
    }
    let stored = |append: PrivateAppend| match append {
        PrivateAppend::Stored { seq, replaced, .. } => Some((seq, replaced)),
        _ => None,
    };
    // Sender 1 unsends 100: it is replaced in its place (seq 1), and appended as seq 4.
    let append = store
        .append_private(carl, &unsend(1, 200, 100), limits)
        .await?;
    assert_eq!(stored(append), Some((4, true)));
    // A resend of that unsend changes nothing.
    let append = store
        .append_private(carl, &unsend(1, 200, 100), limits)
        .await?;
    assert_eq!(stored(append), Some((4, false)));
    // Sender 1 cannot take back sender 2's 101: appended only.
    let append = store
        .append_private(carl, &unsend(1, 201, 101), limits)
        .await?;
    assert_eq!(stored(append), Some((5, false)));
    // Once 102 is trimmed, its unsend is appended only.
    store.trim_inbox(&[(carl, 3)]).await?;
    let append = store
        .append_private(carl, &unsend(1, 202, 102), limits)
        .await?;
    assert_eq!(stored(append), Some((6, false)));
    let page = store.fetch_inbox(carl, 0, 0, 10, limits, 6).await?;
    let entries: Vec<(u64, u64, Option<u64>)> = page
        .entries
        .iter()
        .map(|(seq, e)| (*seq, e.msg_id, e.unsends))
        .collect();
    assert_eq!(
        entries,
        [
            (4, 200, Some(100)),
            (5, 201, Some(101)),
            (6, 202, Some(102)),
        ],
        "what is left after the trim"
    );
    // Before the trim, seq 1 held the unsend instead of 100. Found also once the message's
    // append marker (which names its seq) has expired.
    let fresh = store.create_account("unsend-fresh", "hash").await?.id;
    let brief = InboxLimits {
        dedup: Duration::from_millis(1),
        ..limits
    };
    store.append_private(fresh, &from(1, 300), brief).await?;
    store.append_private(fresh, &from(1, 301), brief).await?;
    // A group message of the sender's is no private message to take back.
    let in_group = InboxEntry {
        group: "team".into(),
        ..from(1, 303)
    };
    store.append_inbox(&[fresh], &in_group, brief).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let append = store
        .append_private(fresh, &unsend(1, 302, 300), limits)
        .await?;
    assert_eq!(stored(append), Some((4, true)));
    let append = store
        .append_private(fresh, &unsend(1, 304, 303), limits)
        .await?;
    assert_eq!(stored(append), Some((5, false)));
    let page = store.fetch_inbox(fresh, 0, 0, 10, limits, 6).await?;
    let entries: Vec<(u64, u64, Option<u64>, &str)> = page
        .entries
        .iter()
        .map(|(seq, e)| (*seq, e.msg_id, e.unsends, e.body.as_str()))
        .collect();
    assert_eq!(
        entries,
        [
            (1, 302, Some(300), "(unsent)"),
            (2, 301, None, "m301"),
            (3, 303, None, "m303"),
            (4, 302, Some(300), "(unsent)"),
            (5, 304, Some(303), "(unsent)"),
        ]
    );
    // Found past the scan's first page (from the newest entry back).
    let busy = store.create_account("unsend-busy", "hash").await?.id;
    for msg_id in 400..=460 {
        store.append_private(busy, &from(2, msg_id), brief).await?;
    }
    tokio::time::sleep(Duration::from_millis(20)).await;
    let append = store
        .append_private(busy, &unsend(2, 500, 400), limits)
        .await?;
    assert_eq!(stored(append), Some((62, true)));

    // In a group: each member's copy is taken back where it still waits (a private message
    // of that id is not the group's), and the unsend appended for every member.
    let (first, second) = (
        store.create_account("unsend-m1", "hash").await?.id,
        store.create_account("unsend-m2", "hash").await?.id,
    );
    let in_team = |msg_id: u64| InboxEntry {
        group: "team".into(),
        ..from(1, msg_id)
    };
    store
        .append_inbox(&[first, second], &in_team(600), limits)
        .await?;
    store.append_private(first, &from(1, 601), limits).await?;
    store.trim_inbox(&[(second, 1)]).await?;
    let team_unsend = |msg_id: u64, unsent: u64| InboxEntry {
        group: "team".into(),
        ..unsend(1, msg_id, unsent)
    };
    for (id, unsent) in [(701, 601), (700, 600)] {
        let seqs = store
            .append_inbox(&[first, second], &team_unsend(id, unsent), limits)
            .await?;
        assert_eq!(seqs.len(), 2);
    }
    let entries_of = |page: InboxPage| -> Vec<(u64, u64, Option<u64>)> {
        page.entries
            .iter()
            .map(|(seq, e)| (*seq, e.msg_id, e.unsends))
            .collect()
    };
    assert_eq!(
        entries_of(store.fetch_inbox(first, 0, 0, 10, limits, 6).await?),
        [
            (1, 700, Some(600)),
            (2, 601, None),
            (3, 701, Some(601)),
            (4, 700, Some(600)),
        ],
        "the group's copy taken back; the private message of the id the unsend names is not"
    );
    assert_eq!(
        entries_of(store.fetch_inbox(second, 0, 0, 10, limits, 6).await?),
        [(2, 701, Some(601)), (3, 700, Some(600))]
    );
    // Once its append marker has expired, a group's message is not looked for (members'
    // inboxes are not scanned): the unsend is appended only.
    store.append_inbox(&[second], &in_team(602), brief).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .append_inbox(&[second], &team_unsend(702, 602), limits)
        .await?;
    assert_eq!(
        entries_of(store.fetch_inbox(second, 3, 3, 10, limits, 6).await?),
        [(4, 602, None), (5, 702, Some(602))]
    );
    Ok(())
}

async fn private_appends_follow_the_contract(store: &dyn Store) -> anyhow::Result<()> {
    let limits = InboxLimits::default();
    let bob = store.create_account("bob", "hash").await?;
    assert_eq!(
        store.inbox_caught_up_to(bob.id).await?,
        Some(0),
        "nothing appended yet"
    );
    assert!(
        store
            .append_private(bob.id + 1000, &entry(1), limits)
            .await?
            == PrivateAppend::NoUser,
        "an unknown recipient is refused"
    );
    let (seq, route) = store
        .append_private(bob.id, &entry(10), limits)
        .await?
        .stored()
        .unwrap();
    assert_eq!((seq, route), (1, None), "first entry, bob not logged in");
    assert_eq!(
        store.inbox_caught_up_to(bob.id).await?,
        None,
        "an entry waits"
    );

    let route = Route {
        server_id: "server-1".into(),
        session_id: 77,
        confirmed: false,
    };
    store
        .claim_route(
            bob.id,
            route.clone(),
            Duration::from_secs(30),
            false,
            REPLACED_FOR,
        )
        .await?;
    assert!(
        store
            .confirm_route(bob.id, 77, "server-1", Duration::from_secs(30))
            .await?
    );
    let (seq, got) = store
        .append_private(bob.id, &entry(11), limits)
        .await?
        .stored()
        .unwrap();
    assert_eq!(seq, 2);
    assert_eq!(
        got,
        Some(Route {
            confirmed: true,
            ..route
        })
    );

    // A retry of the same message keeps its sequence number and adds nothing.
    let (again, _) = store
        .append_private(bob.id, &entry(10), limits)
        .await?
        .stored()
        .unwrap();
    assert_eq!(again, 1);
    // Private and group appends share the one sequence.
    assert_eq!(
        store.append_inbox(&[bob.id], &entry(12), limits).await?,
        vec![3]
    );
    let page = store.fetch_inbox(bob.id, 0, 0, 10, limits, 6).await?;
    let ids: Vec<u64> = page.entries.iter().map(|(_, e)| e.msg_id).collect();
    assert_eq!(ids, vec![10, 11, 12]);
    // A pull after 2 whose application is done only with 1 trims 1 and keeps 2.
    let page = store.fetch_inbox(bob.id, 2, 1, 10, limits, 6).await?;
    let ids: Vec<u64> = page.entries.iter().map(|(_, e)| e.msg_id).collect();
    assert_eq!(ids, vec![12]);
    let page = store.fetch_inbox(bob.id, 0, 0, 10, limits, 6).await?;
    let ids: Vec<u64> = page.entries.iter().map(|(_, e)| e.msg_id).collect();
    assert_eq!(
        ids,
        vec![11, 12],
        "only what the application finished is trimmed"
    );

    // Bob has everything and says so; a late resend of a message he had is still not
    // appended again.
    store.trim_inbox(&[(bob.id, 3)]).await?;
    let (late, _) = store
        .append_private(bob.id, &entry(11), limits)
        .await?
        .stored()
        .unwrap();
    assert_eq!(late, 2, "a resend after the ack keeps its sequence number");
    let page = store.fetch_inbox(bob.id, 3, 3, 10, limits, 6).await?;
    assert!(page.entries.is_empty(), "nothing new after the resend");
    assert_eq!(
        store.inbox_caught_up_to(bob.id).await?,
        Some(3),
        "trimmed empty: caught up to the last seq given"
    );
    assert_eq!(
        store.append_inbox(&[bob.id], &entry(13), limits).await?,
        vec![4],
        "the resend took no sequence number"
    );
    assert_eq!(
        store.inbox_caught_up_to(bob.id).await?,
        None,
        "an entry waits"
    );
    assert_eq!(
        store.inbox_heads(&[bob.id, bob.id + 1000]).await?,
        vec![4, 0],
        "the last seq given out, 0 for an inbox never written"
    );
    Ok(())
}

/// A blocked sender's private messages are refused without taking a sequence number, but for
/// a resend of one stored before the block; blocks go one way, stop at their cap, and end with
/// an unblock.
async fn blocks_follow_the_contract(store: &dyn Store) -> anyhow::Result<()> {
    let limits = InboxLimits::default();
    let blocker = store.create_account("blocker", "hash").await?.id;
    let pest = store.create_account("pest", "hash").await?.id;
    let friend = store.create_account("friend", "hash").await?.id;
    let from = |sender: u64, msg_id: u64| InboxEntry {
        from_user: sender,
        ..entry(msg_id)
    };
    assert!(!store.blocks(blocker, pest).await?);
    assert!(store.blocked_users(blocker).await?.is_empty());
    let seq_of = |append: PrivateAppend| append.stored().map(|(seq, _)| seq);
    assert_eq!(
        seq_of(
            store
                .append_private(blocker, &from(pest, 899), limits)
                .await?
        ),
        Some(1)
    );

    assert_eq!(store.block_user(blocker, pest, 2).await?, Block::Blocked);
    assert_eq!(
        store.block_user(blocker, pest, 2).await?,
        Block::AlreadyBlocked
    );
    assert!(store.blocks(blocker, pest).await?);
    assert!(!store.blocks(pest, blocker).await?, "a block goes one way");
    assert_eq!(
        store.blocking(&[friend, blocker, pest], pest).await?,
        vec![false, true, false]
    );
    assert_eq!(
        store
            .append_private(blocker, &from(pest, 900), limits)
            .await?,
        PrivateAppend::Blocked
    );
    assert_eq!(
        store.inbox_heads(&[blocker]).await?,
        vec![1],
        "a refused message takes no sequence number"
    );
    assert_eq!(
        seq_of(
            store
                .append_private(blocker, &from(pest, 899), limits)
                .await?
        ),
        Some(1),
        "a resend of a message stored before the block was stored, and is answered so"
    );
    assert_eq!(
        seq_of(
            store
                .append_private(blocker, &from(friend, 901), limits)
                .await?
        ),
        Some(2),
        "others still get through"
    );
    // Online, the blocker is refused the message all the same (its route is not read out).
    let route = Route {
        server_id: "server-1".into(),
        session_id: 5,
        confirmed: false,
    };
    store
        .claim_route(blocker, route, Duration::from_secs(30), false, REPLACED_FOR)
        .await?;
    assert!(
        store
            .confirm_route(blocker, 5, "server-1", Duration::from_secs(30))
            .await?
    );
    assert_eq!(
        store
            .append_private(blocker, &from(pest, 900), limits)
            .await?,
        PrivateAppend::Blocked
    );
    assert!(
        store
            .append_private(pest, &from(blocker, 902), limits)
            .await?
            .stored()
            .is_some(),
        "the blocker may still write to whom it blocks"
    );

    assert_eq!(store.block_user(blocker, friend, 2).await?, Block::Blocked);
    assert_eq!(
        store.block_user(blocker, friend + 1000, 2).await?,
        Block::Full,
        "the cap holds"
    );
    assert_eq!(store.blocked_users(blocker).await?, vec![pest, friend]);
    assert!(store.unblock_user(blocker, friend).await?);
    assert!(!store.unblock_user(blocker, friend).await?);
    assert_eq!(store.blocked_users(blocker).await?, vec![pest]);

    assert!(store.unblock_user(blocker, pest).await?);
    assert_eq!(
        seq_of(
            store
                .append_private(blocker, &from(pest, 900), limits)
                .await?
        ),
        Some(3),
        "after the unblock the same message is stored"
    );
    assert!(store.blocked_users(blocker).await?.is_empty());
    Ok(())
}

/// A reader's receipt only moves forward (ids compared exactly, past a double's precision), a
/// new reader past the cap pushes out the one read longest ago (of two read at once, the lower
/// id), and a sender who hides read receipts is kept none.
async fn read_receipts_move_forward_under_a_cap(store: &dyn Store) -> anyhow::Result<()> {
    /// Adds reader's receipt for sender's messages up to msg id, read at ms, under a cap.
    async fn add(
        store: &dyn Store,
        sender: u64,
        (reader, up_to_msg_id, at_ms): (u64, u64, u64),
        cap: usize,
    ) -> anyhow::Result<bool> {
        let receipt = ReadReceipt {
            reader,
            up_to_msg_id,
            at_ms,
        };
        Ok(store.add_read_receipt(sender, &receipt, cap).await?)
    }
    /// The receipts kept for sender (in no order), by reader.
    async fn kept(store: &dyn Store, sender: u64) -> anyhow::Result<Vec<(u64, u64, u64)>> {
        let mut kept: Vec<_> = (store.read_receipts(sender).await?.iter())
            .map(|r| (r.reader, r.up_to_msg_id, r.at_ms))
            .collect();
        kept.sort_unstable();
        Ok(kept)
    }
    let sender = 7_001;
    assert!(kept(store, sender).await?.is_empty());
    assert!(add(store, sender, (1, 999, 10), 2).await?);
    assert!(!add(store, sender, (1, 999, 11), 2).await?, "as far");
    assert!(!add(store, sender, (1, 998, 11), 2).await?, "behind");
    assert!(add(store, sender, (1, 1_000, 12), 2).await?, "a digit more");
    let big = 1u64 << 62;
    assert!(add(store, sender, (1, big + 2, 13), 2).await?);
    let behind = add(store, sender, (1, big + 1, 14), 2).await?;
    assert!(!behind, "one id behind, the same as a double");
    let on = add(store, sender, (1, big + 3, 14), 2).await?;
    assert!(on, "one id on, the same as a double");
    assert_eq!(kept(store, sender).await?, [(1, big + 3, 14)]);

    assert!(add(store, sender, (2, 5, 20), 2).await?);
    // Full: reader 1's (read at 14) goes for a new reader; a kept reader's moves on in place.
    assert!(add(store, sender, (3, 5, 30), 2).await?);
    assert!(add(store, sender, (2, 6, 40), 2).await?);
    assert_eq!(kept(store, sender).await?, [(2, 6, 40), (3, 5, 30)]);

    store
        .set_hidden(sender, Privacy::ReadReceipts, true)
        .await?;
    assert!(!add(store, sender, (3, 7, 50), 2).await?);
    store
        .set_hidden(sender, Privacy::ReadReceipts, false)
        .await?;
    assert_eq!(kept(store, sender).await?.len(), 2, "kept while hidden");
    assert!(add(store, sender, (3, 7, 50), 2).await?);
    assert_eq!(kept(store, sender).await?, [(2, 6, 40), (3, 7, 50)]);

    // Read at once: the lower reader goes first, whichever came first.
    let tied = 7_002;
    for reader in [12, 11, 13] {
        assert!(add(store, tied, (reader, 1, 60), 3).await?);
    }
    assert!(add(store, tied, (14, 1, 61), 3).await?);
    let readers: Vec<u64> = kept(store, tied).await?.iter().map(|r| r.0).collect();
    assert_eq!(readers, [12, 13, 14]);
    Ok(())
}

/// Reports are kept newest first, the oldest dropped past the cap; a reporter's repeat of a
/// report within its window is not kept, and is once the window is over.
async fn reports_are_kept_newest_first_under_a_cap(store: &dyn Store) -> anyhow::Result<()> {
    assert!(store.reports(10).await?.is_empty());
    let report = |n: u64| Report {
        at_ms: n,
        reporter_id: n,
        reporter: "alice".into(),
        reported_id: 2,
        reported: "bob".into(),
        reason: format!("reason {n}"),
    };
    for n in 1..=3 {
        assert!(
            store
                .add_report(&report(n), 2, Duration::from_secs(60))
                .await?
        );
    }
    assert_eq!(store.reports(10).await?, [report(3), report(2)]);
    assert_eq!(store.reports(1).await?, [report(3)]);
    assert!(store.reports(0).await?.is_empty());
    let window = Duration::from_millis(300);
    assert!(!store.add_report(&report(3), 2, window).await?, "a repeat");
    assert_eq!(store.reports(10).await?, [report(3), report(2)]);
    let mut fresh = report(4);
    fresh.reporter_id = 3;
    fresh.reported_id = 5;
    assert!(
        store.add_report(&fresh, 2, window).await?,
        "another user reported"
    );
    assert!(!store.add_report(&fresh, 2, window).await?);
    tokio::time::sleep(window + Duration::from_millis(50)).await;
    assert!(
        store.add_report(&fresh, 2, window).await?,
        "after the window"
    );
    assert_eq!(store.reports(10).await?, [fresh.clone(), fresh]);
    Ok(())
}

/// A group's owner hands it to a member (never to a non-member), and stays a member without
/// its rights; the waiting invitations are void, as when an owner leaves.
async fn a_group_is_handed_over_to_a_member(store: &dyn Store) -> anyhow::Result<()> {
    let (giver, taker, outsider) = (9101, 9102, 9103);
    assert!(store.create_group("handed", giver, true).await?);
    assert_eq!(
        store.invite("handed", giver, taker, 10).await?,
        Invite::Invited
    );
    assert_eq!(store.join_group("handed", taker, 10).await?, Join::Joined);
    assert_eq!(
        store.invite("handed", giver, outsider, 10).await?,
        Invite::Invited
    );
    assert_eq!(
        store.transfer_group("handed", taker, taker).await?,
        Transfer::NotOwner
    );
    assert_eq!(
        store.transfer_group("handed", giver, outsider).await?,
        Transfer::NotMember,
        "an invited user is no member yet"
    );
    assert_eq!(
        store.transfer_group("nowhere", giver, taker).await?,
        Transfer::NoGroup
    );
    assert_eq!(
        store.transfer_group("handed", giver, giver).await?,
        Transfer::Transferred,
        "to oneself: nothing changes"
    );
    assert_eq!(store.user_invitations(outsider).await?, ["handed"]);
    assert_eq!(
        store.transfer_group("handed", giver, taker).await?,
        Transfer::Transferred
    );
    assert_eq!(
        store.group_info("handed").await?.map(|g| g.owner),
        Some(taker)
    );
    assert_eq!(
        store.group_members("handed").await?,
        Some(vec![giver, taker])
    );
    assert_eq!(
        store.transfer_group("handed", giver, giver).await?,
        Transfer::NotOwner,
        "the old owner has no rights left"
    );
    assert_eq!(
        store.remove_member("handed", giver, taker).await?,
        Removal::NotOwner
    );
    // The invitation went with the handover.
    assert!(store.user_invitations(outsider).await?.is_empty());
    assert_eq!(
        store.join_group("handed", outsider, 10).await?,
        Join::InviteOnly
    );
    Ok(())
}

/// A deleted account goes with what is kept for it alone, in one step: after it no private
/// append stores for it and no claim gives it a route; its name is free again, and the
/// groups and invitations it had are returned for the caller to leave.
async fn an_account_is_deleted_with_what_is_its_alone(store: &dyn Store) -> anyhow::Result<()> {
    let limits = InboxLimits::default();
    let lease = Duration::from_secs(30);
    let leaver = store.create_account("leaver", "hash").await?.id;
    let host = store.create_account("host", "hash").await?.id;
    assert!(store.create_group("leavers-club", leaver, false).await?);
    assert!(store.create_group("hosts-club", host, true).await?);
    assert_eq!(
        store.invite("hosts-club", host, leaver, 10).await?,
        Invite::Invited
    );
    assert_eq!(store.block_user(leaver, host, 10).await?, Block::Blocked);
    assert!(
        store
            .append_private(leaver, &entry(950), limits)
            .await?
            .stored()
            .is_some()
    );
    let route = |session_id| Route {
        server_id: "server-1".into(),
        session_id,
        confirmed: false,
    };
    store
        .claim_route(leaver, route(7), lease, false, REPLACED_FOR)
        .await?;
    assert!(store.confirm_route(leaver, 7, "server-1", lease).await?);
    assert!(store.release_route(leaver, 7, None).await?);
    assert!(store.last_seen(leaver).await?.is_some());
    assert_eq!(store.revocation(leaver, 7).await?, None);
    assert!(store.set_status(leaver, Some("away")).await?);
    assert!(store.set_status(host, Some("here")).await?);
    assert!(store.set_status(host, None).await?);
    assert_eq!(
        store.statuses(&[leaver, host]).await?,
        [Some("away".to_string()), None]
    );
    let read = ReadReceipt {
        reader: host,
        up_to_msg_id: 950,
        at_ms: 1,
    };
    assert!(store.add_read_receipt(leaver, &read, 10).await?);
    for what in [Privacy::LastSeen, Privacy::ReadReceipts] {
        assert_eq!(store.hidden(&[leaver, host], what).await?, [false, false]);
        store.set_hidden(leaver, what, true).await?;
        store.set_hidden(host, what, true).await?;
        store.set_hidden(host, what, false).await?;
        assert_eq!(store.hidden(&[leaver, host], what).await?, [true, false]);
    }

    let deleted = store
        .delete_account(leaver, REPLACED_FOR)
        .await?
        .context("deleted")?;
    assert_eq!(
        deleted,
        DeletedAccount {
            name: "leaver".into(),
            groups: vec!["leavers-club".into()],
            invitations: vec!["hosts-club".into()],
        }
    );
    assert_eq!(
        store.delete_account(leaver, REPLACED_FOR).await?,
        None,
        "deleted once"
    );
    assert_eq!(
        store.revocation(leaver, 7).await?,
        Some(Revocation::LoggedOut),
        "the latest login ends with the account, though its route was gone"
    );
    assert!(store.account_by_name("leaver").await?.is_none());
    assert!(!store.user_exists(leaver).await?);
    assert!(store.accounts_by_id(&[leaver]).await?.is_empty());
    assert_eq!(
        store.append_private(leaver, &entry(951), limits).await?,
        PrivateAppend::NoUser
    );
    assert_eq!(store.inbox_heads(&[leaver]).await?, vec![0], "inbox gone");
    let page = store.fetch_inbox(leaver, 0, 0, 10, limits, 6).await?;
    assert!(page.entries.is_empty());
    for force in [false, true] {
        assert_eq!(
            store
                .claim_route(leaver, route(8), lease, force, REPLACED_FOR)
                .await?,
            Claim::NoAccount
        );
    }
    assert_eq!(route_of(store, leaver).await?, None);
    assert_eq!(store.last_seen(leaver).await?, None);
    for what in [Privacy::LastSeen, Privacy::ReadReceipts] {
        assert_eq!(store.hidden(&[leaver], what).await?, [false]);
    }
    assert!(store.read_receipts(leaver).await?.is_empty());
    assert_eq!(store.statuses(&[leaver]).await?, [None]);
    assert!(!store.set_status(leaver, Some("back")).await?);
    assert!(
        !store.user_exists(leaver).await?,
        "a status set after the deletion makes no account"
    );
    assert!(store.blocked_users(leaver).await?.is_empty());
    assert!(store.user_groups(leaver).await?.is_empty());
    assert!(store.user_invitations(leaver).await?.is_empty());
    // The groups are the caller's to leave: the store left the member sets alone.
    assert_eq!(
        store.group_members("leavers-club").await?,
        Some(vec![leaver])
    );
    // The name is free; the id is never given again.
    let again = store.create_account("leaver", "hash-2").await?;
    assert!(again.id > host, "{} {host}", again.id);
    assert_eq!(
        store.account_by_name("leaver").await?.map(|a| a.id),
        Some(again.id)
    );
    // Deleting the other account leaves the name's new holder alone.
    assert!(store.delete_account(host, REPLACED_FOR).await?.is_some());
    assert_eq!(
        store.account_by_name("leaver").await?.map(|a| a.id),
        Some(again.id)
    );
    Ok(())
}

/// A password hash is replaced only while it is the one the old password was checked against.
async fn a_password_hash_is_replaced_once(store: &dyn Store) -> anyhow::Result<()> {
    let user = store.create_account("changer", "hash-1").await?.id;
    assert!(store.set_password_hash(user, "hash-1", "hash-2").await?);
    assert!(
        !store.set_password_hash(user, "hash-1", "hash-3").await?,
        "a second change on the same old password"
    );
    let account = store
        .account_by_name("changer")
        .await?
        .context("the account")?;
    assert_eq!(account.password_hash, "hash-2");
    assert!(!store.set_password_hash(user + 1000, "hash-2", "x").await?);
    Ok(())
}

/// Names are unique whatever their case, found in any case and kept as registered; a deleted
/// account's name is free again in every case.
async fn names_are_unique_whatever_their_case(store: &dyn Store) -> anyhow::Result<()> {
    let mixed = store.create_account("MixedCase", "hash").await?;
    for taken in ["mixedcase", "MIXEDCASE", "MixedCase"] {
        assert!(
            matches!(
                store.create_account(taken, "hash").await,
                Err(cim_router::store::StoreError::NameTaken)
            ),
            "{taken}"
        );
    }
    for lookup in ["mixedcase", "MIXEDCASE", "MixedCase"] {
        let found = store.account_by_name(lookup).await?.context("found")?;
        assert_eq!((found.id, found.name.as_str()), (mixed.id, "MixedCase"));
    }
    store.delete_account(mixed.id, REPLACED_FOR).await?;
    assert!(store.account_by_name("mixedcase").await?.is_none());
    let next = store.create_account("mixedCASE", "hash").await?;
    let found = store.account_by_name("MixedCase").await?.context("found")?;
    assert_eq!((found.id, found.name.as_str()), (next.id, "mixedCASE"));
    Ok(())
}

/// A user's last seen is recorded as its route is confirmed, released or removed with its
/// server, and never goes back.
async fn last_seen_follows_route_changes(store: &dyn Store) -> anyhow::Result<()> {
    let user = store.create_account("seldom", "hash").await?.id;
    assert_eq!(store.last_seen(user).await?, None);
    let lease = Duration::from_secs(30);
    let mut last = 0;
    for (session, server) in [(1, "seen-server-1"), (2, "seen-server-2")] {
        let route = Route {
            server_id: server.into(),
            session_id: session,
            confirmed: false,
        };
        store
            .claim_route(user, route, lease, false, REPLACED_FOR)
            .await?;
        let before = cim_core::now_ms();
        assert!(store.confirm_route(user, session, server, lease).await?);
        let confirmed = store.last_seen(user).await?.context("a confirmation")?;
        assert!(confirmed >= before.max(last), "{confirmed} {before} {last}");
        // Released a moment later (the record is in ms).
        tokio::time::sleep(Duration::from_millis(3)).await;
        if session == 1 {
            assert!(store.release_route(user, session, None).await?);
        } else {
            assert_eq!(store.remove_server_routes(server).await?, vec![user]);
        }
        last = store.last_seen(user).await?.context("a release")?;
        assert!(last > confirmed, "{last} {confirmed}");
    }
    // Nothing released, nothing recorded.
    assert!(!store.release_route(user, 9, None).await?);
    assert_eq!(store.last_seen(user).await?, Some(last));
    Ok(())
}

async fn message_ids_are_recorded_once(store: &dyn Store) -> anyhow::Result<()> {
    let window = Duration::from_secs(60);
    let (hello, bye) = (0xfeed_beef_0000_0001, 0xfeed_beef_0000_0002);
    assert_eq!(store.message_id(7, 1, hello, 100, window).await?, Some(100));
    assert_eq!(
        store.message_id(7, 1, hello, 101, window).await?,
        Some(100),
        "a retry gets the first attempt's id"
    );
    assert_eq!(
        store.message_id(7, 1, bye, 101, window).await?,
        None,
        "another message under a used id is no retry"
    );
    assert_eq!(
        store.message_id(7, 1, hello, 101, window).await?,
        Some(100),
        "and does not replace the record"
    );
    assert_eq!(store.message_id(7, 2, bye, 102, window).await?, Some(102));
    assert_eq!(
        store.message_id(8, 1, bye, 103, window).await?,
        Some(103),
        "client message ids are per sender"
    );
    Ok(())
}

async fn only_confirmed_sessions_are_online(store: &dyn Store) -> anyhow::Result<()> {
    let lease = Duration::from_secs(30);
    let carol = store.create_account("carol", "hash").await?;
    let dave = store.create_account("dave", "hash").await?;
    let route = |server: &str, session_id| Route {
        server_id: server.into(),
        session_id,
        confirmed: false,
    };
    store
        .claim_route(carol.id, route("server-1", 5), lease, false, REPLACED_FOR)
        .await?;
    store
        .claim_route(dave.id, route("server-2", 6), lease, false, REPLACED_FOR)
        .await?;
    assert!(store.confirm_route(carol.id, 5, "server-1", lease).await?);
    assert!(
        !store.confirm_route(dave.id, 7, "server-2", lease).await?,
        "another session cannot confirm dave's route"
    );
    let online = store.online_users().await?;
    assert!(online.contains(&carol.id), "{online:?}");
    assert!(
        !online.contains(&dave.id),
        "a claimed but unconfirmed session is not online"
    );
    // Carol's route moves to server-2 (a session id is bound to one server in practice, but
    // the store does not rely on it); server-1 then reports the session closed.
    store
        .claim_route(carol.id, route("server-2", 5), lease, true, REPLACED_FOR)
        .await?;
    assert!(store.confirm_route(carol.id, 5, "server-2", lease).await?);
    assert!(
        !store.release_route(carol.id, 5, Some("server-1")).await?,
        "a server's close report must not release a route to another server"
    );
    assert!(store.online_users().await?.contains(&carol.id));
    assert_eq!(
        store.routes(&[carol.id]).await?[0]
            .as_ref()
            .map(|r| r.server_id.as_str()),
        Some("server-2")
    );
    assert!(store.release_route(carol.id, 5, Some("server-2")).await?);
    assert!(!store.online_users().await?.contains(&carol.id));
    // A logout releases the route wherever it is.
    store
        .claim_route(dave.id, route("server-1", 8), lease, true, REPLACED_FOR)
        .await?;
    assert!(store.confirm_route(dave.id, 8, "server-1", lease).await?);
    assert!(!store.release_route(dave.id, 7, None).await?);
    assert!(store.release_route(dave.id, 8, None).await?);
    assert!(!store.online_users().await?.contains(&dave.id));
    Ok(())
}

async fn revoked_sessions_do_not_get_their_routes_back(store: &dyn Store) -> anyhow::Result<()> {
    let lease = Duration::from_secs(30);
    let erin = store.create_account("erin", "hash").await?;
    let frank = store.create_account("frank", "hash").await?;
    // Neither has a route (lapsed, or released by a logout); erin's login was revoked.
    store
        .revoke_session(erin.id, 8, Duration::from_secs(60), Revocation::Replaced)
        .await?;
    assert_eq!(
        store.revocation(erin.id, 8).await?,
        Some(Revocation::Replaced),
        "why is kept"
    );
    assert_eq!(store.revocation(frank.id, 9).await?, None);
    let renewal = store
        .renew_routes("server-1", &[(erin.id, 8), (frank.id, 9)], lease)
        .await?;
    assert_eq!(
        renewal.stale,
        vec![erin.id],
        "a revoked login's server must end it"
    );
    assert_eq!(renewal.restored, vec![frank.id], "frank's route came back");
    let routes = store.routes(&[erin.id, frank.id]).await?;
    assert_eq!(routes[0], None);
    assert_eq!(routes[1].as_ref().map(|r| r.session_id), Some(9));
    // Renewed again, it is there already: not restored.
    let renewal = store
        .renew_routes("server-1", &[(frank.id, 9)], lease)
        .await?;
    assert_eq!(renewal, Renewal::default());
    // A login logged out while its client was still connecting: its route is there, pending,
    // and the server's confirmation of it must fail.
    let gail = store.create_account("gail", "hash").await?;
    let pending = Route {
        server_id: "server-1".into(),
        session_id: 10,
        confirmed: false,
    };
    store
        .claim_route(gail.id, pending, lease, false, REPLACED_FOR)
        .await?;
    store
        .revoke_session(gail.id, 10, Duration::from_secs(60), Revocation::LoggedOut)
        .await?;
    assert!(
        !store.confirm_route(gail.id, 10, "server-1", lease).await?,
        "a revoked login was confirmed"
    );
    Ok(())
}

/// Entries past their age at the front of an inbox (a user away longer than the TTL, whose
/// inbox newer messages kept alive) are skipped, never returned as an empty page with more to
/// come: a client stops pulling at such a page and would never catch up.
async fn expired_entries_never_hide_fresh_ones(store: &dyn Store) -> anyhow::Result<()> {
    let limits = InboxLimits {
        max_len: 1000,
        ttl: Duration::from_millis(1000),
        ..Default::default()
    };
    let ivy = store.create_account("ivy", "hash").await?;
    for msg_id in 1..=12 {
        let mut old_or_new = entry(500 + msg_id);
        old_or_new.created_at_ms = if msg_id <= 10 { 5 } else { 5000 };
        store.append_private(ivy.id, &old_or_new, limits).await?;
    }
    let seqs = |page: &cim_router::store::InboxPage| -> Vec<u64> {
        page.entries.iter().map(|(seq, _)| *seq).collect()
    };
    let page = store.fetch_inbox(ivy.id, 0, 0, 3, limits, 5500).await?;
    assert_eq!((seqs(&page), page.more), (vec![11, 12], false));
    let page = store.fetch_inbox(ivy.id, 0, 0, 1, limits, 5500).await?;
    assert_eq!((seqs(&page), page.more), (vec![11], true));
    Ok(())
}

async fn route_of(store: &dyn Store, user: u64) -> anyhow::Result<Option<Route>> {
    Ok(store.routes(&[user]).await?.pop().flatten())
}

/// A re-login's claim ends the token's login in the same step, so it wins once; and it claims
/// nothing once the route has changed since the token was checked (a password login came in
/// between) or when the login ended otherwise (logged out, taken over). Every won claim names
/// the user's login before it, also one whose route is gone.
async fn a_relogin_claim_ends_its_login_once(store: &dyn Store) -> anyhow::Result<()> {
    let lease = Duration::from_secs(30);
    let route = |session_id| Route {
        server_id: "server-1".into(),
        session_id,
        confirmed: false,
    };
    let relogin = |session_id, seen_route_session| Relogin {
        session_id,
        seen_route_session,
        revoke_for: Duration::from_secs(60),
    };
    let gina = store.create_account("gina", "hash").await?;
    store
        .claim_route(gina.id, route(20), lease, false, REPLACED_FOR)
        .await?;

    // The token of login 20 re-logs in as 21, over its own route, and ends login 20.
    assert_eq!(
        store
            .claim_route_relogin(
                gina.id,
                route(21),
                lease,
                REPLACED_FOR,
                &relogin(20, Some(20))
            )
            .await?,
        Claim::Won {
            previous: Some(route(20)),
            last_login: Some(20)
        }
    );
    assert_eq!(
        store.revocation(gina.id, 20).await?,
        Some(Revocation::ReLoggedIn),
        "a re-login's own login reads as re-logged in, not replaced"
    );
    // A second re-login with that token, checked against the route it finds now, is refused
    // and changes nothing.
    assert_eq!(
        store
            .claim_route_relogin(
                gina.id,
                route(22),
                lease,
                REPLACED_FOR,
                &relogin(20, Some(21))
            )
            .await?,
        Claim::Ended
    );
    assert_eq!(route_of(store, gina.id).await?, Some(route(21)));
    // Login 21's token, checked against a route that has changed since (here: login 23's,
    // claimed in between, which replaced login 21 in the same step), and checked when there
    // was none: both refused, and login 21 stays replaced (not re-logged in).
    store
        .claim_route(gina.id, route(23), lease, true, REPLACED_FOR)
        .await?;
    for seen in [Some(21), None] {
        assert_eq!(
            store
                .claim_route_relogin(gina.id, route(24), lease, REPLACED_FOR, &relogin(21, seen))
                .await?,
            Claim::Ended,
            "checked against {seen:?}"
        );
    }
    assert_eq!(
        store.revocation(gina.id, 21).await?,
        Some(Revocation::Replaced)
    );
    assert_eq!(route_of(store, gina.id).await?, Some(route(23)));
    // A login whose session closed (its route released) is still the last login: the next
    // claim names it, so the router can end it.
    assert!(store.release_route(gina.id, 23, None).await?);
    assert_eq!(
        store
            .claim_route(gina.id, route(25), lease, false, REPLACED_FOR)
            .await?,
        Claim::Won {
            previous: None,
            last_login: Some(23)
        }
    );
    assert_eq!(store.last_login(gina.id).await?, Some(25));
    // ...and ends it in the same step: a claim whose answer is lost leaves no login it
    // replaced live.
    assert_eq!(
        store.revocation(gina.id, 23).await?,
        Some(Revocation::Replaced)
    );
    assert_eq!(store.revocation(gina.id, 25).await?, None);

    // A user without a route: a re-login checked against none claims it.
    let hank = store.create_account("hank", "hash").await?;
    assert_eq!(store.last_login(hank.id).await?, None);
    assert_eq!(
        store
            .claim_route_relogin(hank.id, route(30), lease, REPLACED_FOR, &relogin(29, None))
            .await?,
        Claim::Won {
            previous: None,
            last_login: None
        }
    );
    assert_eq!(
        store.revocation(hank.id, 29).await?,
        Some(Revocation::ReLoggedIn)
    );
    Ok(())
}

/// A group append to more members than one pipeline carries: every member gets the entry once,
/// with its own next seq, and the seqs come back in the members' order.
async fn a_large_group_append_reaches_every_member_once(store: &dyn Store) -> anyhow::Result<()> {
    let limits = InboxLimits::default();
    let mut members = Vec::new();
    for i in 0..700 {
        members.push(
            store
                .create_account(&format!("member{i}"), "hash")
                .await?
                .id,
        );
    }
    // The first member already has an entry: its seqs run one ahead of everyone else's.
    store
        .append_private(members[0], &entry(800), limits)
        .await?;
    let first = store.append_inbox(&members, &entry(801), limits).await?;
    let again = store.append_inbox(&members, &entry(801), limits).await?;
    let second = store.append_inbox(&members, &entry(802), limits).await?;
    let mut expected_first = vec![1; members.len()];
    expected_first[0] = 2;
    assert_eq!(first, expected_first);
    assert_eq!(again, first, "the same message again is not appended again");
    assert_eq!(second, first.iter().map(|s| s + 1).collect::<Vec<_>>());
    let last = *members.last().unwrap();
    let page = store.fetch_inbox(last, 0, 0, 10, limits, 5).await?;
    let ids: Vec<u64> = page.entries.iter().map(|(_, e)| e.msg_id).collect();
    assert_eq!(ids, [801, 802]);

    // Reads of many users (a broadcast, a listing) come back whole and in order, however
    // the store splits them: routes where some users have one, accounts where some exist.
    let mut many: Vec<u64> = (0..2500u64).map(|i| 1_000_000 + i).collect();
    let with_route = [0, 1023, 1024, 2047, 2048, 2499];
    let mut routed = Vec::new();
    for &i in &with_route {
        // Only an account gets a route.
        many[i] = store
            .create_account(&format!("routed{i}"), "hash")
            .await?
            .id;
        routed.push(many[i]);
        let route = Route {
            server_id: format!("server-{i}"),
            session_id: i as u64,
            confirmed: false,
        };
        store
            .claim_route(many[i], route, Duration::from_secs(60), false, REPLACED_FOR)
            .await?;
    }
    let routes = store.routes(&many).await?;
    let held: Vec<(usize, String)> = routes
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.as_ref()?.server_id.clone())))
        .collect();
    let expected: Vec<(usize, String)> = with_route
        .iter()
        .map(|&i| (i, format!("server-{i}")))
        .collect();
    assert_eq!(held, expected);
    let mut ids: Vec<u64> = many.clone();
    ids.splice(1500..1500, members.iter().copied());
    let accounts = store.accounts_by_id(&ids).await?;
    let found: Vec<u64> = accounts.iter().map(|a| a.id).collect();
    // Three routed ones before position 1500, where the members go, and three after.
    let mut existing = routed.clone();
    existing.splice(3..3, members.iter().copied());
    assert_eq!(
        found, existing,
        "every existing account, in the order asked"
    );
    Ok(())
}

/// Message-id nodes: one holder at a time, renewable by it alone, free again once released or
/// lapsed, and the next holder learns the latest time the previous one's ids may carry.
async fn id_nodes_are_held_once(store: &dyn Store) -> anyhow::Result<()> {
    let long = Duration::from_secs(60);
    let claim = |owner: &'static str, first: u16, lease: Duration, until: u64| async move {
        store.claim_id_node(owner, first, lease, until).await
    };
    let a = claim("a#1", 7, long, 5_000).await?;
    assert_eq!(a.map(|n| n.node), Some(7));
    // Held: the next claim starting there gets the next one; the wrap-around is kept.
    assert_eq!(claim("b#1", 7, long, 0).await?.map(|n| n.node), Some(8));
    let last = claim("c#1", ID_NODES - 1, long, 0).await?;
    assert_eq!(last.map(|n| n.node), Some(ID_NODES - 1));
    assert_eq!(
        claim("d#1", ID_NODES - 1, long, 0).await?.map(|n| n.node),
        Some(0)
    );
    // Only the holder renews; renewing keeps the later of the times given.
    assert!(store.renew_id_node("a#1", 7, long, 9_000).await?);
    assert!(store.renew_id_node("a#1", 7, long, 6_000).await?);
    assert!(!store.renew_id_node("b#1", 7, long, 0).await?);
    // Another owner's release frees nothing; the holder's does, and the next holder learns
    // how far its ids went.
    store.release_id_node("b#1", 7).await?;
    assert_eq!(claim("e#1", 7, long, 0).await?.map(|n| n.node), Some(9));
    store.release_id_node("a#1", 7).await?;
    assert_eq!(
        claim("f#1", 7, long, 0).await?,
        Some(IdNode {
            node: 7,
            issued_until_ms: 9_000
        })
    );
    assert!(!store.renew_id_node("a#1", 7, long, 0).await?);
    // A holder whose clock is behind keeps the later bound recorded for the next one.
    store.release_id_node("f#1", 7).await?;
    assert_eq!(
        claim("f#2", 7, long, 0).await?.map(|n| n.issued_until_ms),
        Some(9_000)
    );
    // A hold that is not renewed lapses and can be claimed.
    let short = Duration::from_millis(200);
    assert_eq!(
        claim("g#1", 500, short, 1_234).await?.map(|n| n.node),
        Some(500)
    );
    assert_eq!(claim("h#1", 500, long, 0).await?.map(|n| n.node), Some(501));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        claim("h#2", 500, long, 0).await?,
        Some(IdNode {
            node: 500,
            issued_until_ms: 1_234
        })
    );
    assert!(!store.renew_id_node("g#1", 500, long, 0).await?);
    Ok(())
}

/// A group is created with its owner as its first member, once per name; joins stop at the
/// cap and count a member once (its size says so too); a member that leaves is gone from the
/// group and from its own list of groups.
async fn groups_follow_the_contract(store: &dyn Store) -> anyhow::Result<()> {
    let (owner, other, third) = (7001, 7002, 7003);
    assert!(store.create_group("crew", owner, false).await?);
    assert!(
        !store.create_group("crew", other, false).await?,
        "the name is taken"
    );
    for case in ["Crew", "CREW"] {
        assert!(
            !store.create_group(case, other, false).await?,
            "{case}: the name is taken in any case"
        );
        assert_eq!(store.group_members(case).await?, None);
    }
    let open = GroupInfo {
        owner,
        invite_only: false,
    };
    assert_eq!(store.group_info("crew").await?, Some(open));
    assert_eq!(store.group_members("crew").await?, Some(vec![owner]));
    assert_eq!(store.user_groups(owner).await?, vec!["crew".to_string()]);
    assert_eq!(store.join_group("crew", other, 2).await?, Join::Joined);
    assert_eq!(
        store.join_group("crew", other, 2).await?,
        Join::AlreadyMember
    );
    assert_eq!(store.join_group("crew", third, 2).await?, Join::Full);
    assert_eq!(store.join_group("nope", third, 2).await?, Join::NoGroup);
    assert_eq!(store.group_members("crew").await?, Some(vec![owner, other]));
    assert_eq!(store.group_size("crew").await?, 2);
    assert_eq!(store.group_size("nope").await?, 0);
    assert!(store.leave_group("crew", other).await?);
    assert!(!store.leave_group("crew", other).await?);
    assert!(store.user_groups(other).await?.is_empty());
    assert_eq!(store.group_members("nope").await?, None);
    // The last member leaving deletes the group: its name is free again.
    assert!(store.leave_group("crew", owner).await?);
    assert_eq!(store.group_members("crew").await?, None);
    assert_eq!(store.group_size("crew").await?, 0);
    assert_eq!(store.join_group("crew", other, 2).await?, Join::NoGroup);
    assert_eq!(store.group_info("crew").await?, None);
    // In any case: the key the old group left is taken over.
    assert!(store.create_group("Crew", third, false).await?);
    assert_eq!(store.group_members("Crew").await?, Some(vec![third]));
    assert!(!store.create_group("crew", owner, false).await?);
    assert!(store.leave_group("Crew", third).await?);
    Ok(())
}

/// Only the owner invites and removes members, and an invitation (used up by the join) is the
/// only way into an invite-only group; a removed member is gone from the group and its own
/// list; an owner who leaves hands the group to the member with the lowest id (by number, not
/// by text); one named owner but no longer a member (left before owners passed groups on) is
/// no owner; a group re-created under the name of a deleted invite-only one is open, and its
/// old invitations are gone.
async fn owners_and_invite_only_groups_follow_the_contract(
    store: &dyn Store,
) -> anyhow::Result<()> {
    let (owner, member, outsider, heir) = (7101, 7110, 7120, 950);
    assert!(store.create_group("club", owner, true).await?);
    let info = |owner, invite_only| Some(GroupInfo { owner, invite_only });
    assert_eq!(store.group_info("club").await?, info(owner, true));
    assert_eq!(
        store.join_group("club", member, 10).await?,
        Join::InviteOnly
    );
    assert_eq!(
        store.invite("club", outsider, member, 10).await?,
        Invite::NotOwner
    );
    // Invitations wait up to the cap, members apart (the owner is one already).
    assert_eq!(
        store.invite("club", owner, member, 1).await?,
        Invite::Invited
    );
    assert_eq!(store.user_invitations(member).await?, ["club"]);
    assert_eq!(
        store.invite("club", owner, member, 10).await?,
        Invite::AlreadyInvited
    );
    assert_eq!(
        store.invite("nope", owner, member, 10).await?,
        Invite::NoGroup
    );
    assert_eq!(
        store.invite("club", owner, outsider, 1).await?,
        Invite::Full
    );
    assert_eq!(
        store.group_members("club").await?,
        Some(vec![owner]),
        "an invitation is no membership"
    );
    assert_eq!(store.join_group("club", member, 10).await?, Join::Joined);
    assert!(store.user_invitations(member).await?.is_empty());
    // The join used the invitation up: a member who leaves needs another.
    assert!(store.leave_group("club", member).await?);
    assert_eq!(
        store.join_group("club", member, 10).await?,
        Join::InviteOnly
    );
    store.invite("club", owner, member, 10).await?;
    assert_eq!(store.join_group("club", member, 10).await?, Join::Joined);
    assert_eq!(store.user_groups(member).await?, vec!["club".to_string()]);
    assert_eq!(
        store.invite("club", owner, member, 10).await?,
        Invite::AlreadyMember
    );
    assert_eq!(
        store.invite("club", member, outsider, 10).await?,
        Invite::NotOwner,
        "a member is no owner"
    );

    assert_eq!(
        store.remove_member("club", member, owner).await?,
        Removal::NotOwner
    );
    assert_eq!(
        store.remove_member("club", owner, outsider).await?,
        Removal::NotMember
    );
    assert_eq!(
        store.remove_member("club", owner, owner).await?,
        Removal::NotMember,
        "an owner leaves instead"
    );
    assert_eq!(
        store.remove_member("nope", owner, member).await?,
        Removal::NoGroup
    );
    assert_eq!(
        store.remove_member("club", owner, member).await?,
        Removal::Removed
    );
    assert_eq!(store.group_members("club").await?, Some(vec![owner]));
    assert!(store.user_groups(member).await?.is_empty());
    assert_eq!(
        store.join_group("club", member, 10).await?,
        Join::InviteOnly,
        "a removed member stays out"
    );
    // A withdrawn invitation lets no one in.
    store.invite("club", owner, outsider, 10).await?;
    assert_eq!(
        store.remove_member("club", owner, outsider).await?,
        Removal::Uninvited
    );
    assert!(store.user_invitations(outsider).await?.is_empty());
    assert_eq!(
        store.join_group("club", outsider, 10).await?,
        Join::InviteOnly
    );
    // So does a declined one.
    store.invite("club", owner, outsider, 10).await?;
    assert!(store.decline_invitation("club", outsider).await?);
    assert!(!store.decline_invitation("club", outsider).await?);
    assert!(store.user_invitations(outsider).await?.is_empty());
    assert_eq!(
        store.join_group("club", outsider, 10).await?,
        Join::InviteOnly
    );

    // The owner leaves: the lowest id left (950 < 7110, though "7110" < "950" as text) owns
    // the group, and may invite and remove; the one who left may not; its invitations,
    // which the new owner cannot see, are gone.
    for user in [member, heir] {
        store.invite("club", owner, user, 10).await?;
        store.join_group("club", user, 10).await?;
    }
    store.invite("club", owner, outsider, 10).await?;
    store.create_group("other", owner, true).await?;
    store.invite("other", owner, outsider, 10).await?;
    assert_eq!(store.user_invitations(outsider).await?, ["club", "other"]);
    assert!(store.leave_group("club", owner).await?);
    assert_eq!(store.group_info("club").await?, info(heir, true));
    assert_eq!(store.user_invitations(outsider).await?, ["other"]);
    // A deleted group's invitations go with it.
    assert!(store.leave_group("other", owner).await?);
    assert!(store.user_invitations(outsider).await?.is_empty());
    assert_eq!(
        store.join_group("club", outsider, 10).await?,
        Join::InviteOnly
    );
    assert_eq!(
        store.invite("club", owner, outsider, 10).await?,
        Invite::NotOwner
    );
    store.invite("club", heir, outsider, 10).await?;
    assert_eq!(
        store.remove_member("club", heir, member).await?,
        Removal::Removed
    );
    assert!(store.leave_group("club", heir).await?);
    assert_eq!(store.group_info("club").await?, None);
    // The name is free, and a new group under it is open, without the old invitations.
    assert!(store.create_group("club", member, true).await?);
    assert_eq!(
        store.join_group("club", outsider, 10).await?,
        Join::InviteOnly
    );
    assert!(store.user_invitations(outsider).await?.is_empty());
    assert!(store.leave_group("club", member).await?);
    assert!(store.create_group("club", member, false).await?);
    assert_eq!(store.group_info("club").await?, info(member, false));
    assert_eq!(store.join_group("club", outsider, 10).await?, Join::Joined);
    assert!(store.leave_group("club", outsider).await?);
    assert!(store.leave_group("club", member).await?);
    Ok(())
}

/// A group whose owner left before owners passed groups on still names it: it is no owner
/// then (it cannot invite or remove), and the group goes on.
async fn a_departed_owner_of_an_older_group_is_no_owner(
    store: &RedisStore,
    redis_url: &str,
) -> anyhow::Result<()> {
    let (owner, member) = (7201, 7202);
    assert!(store.create_group("old", owner, false).await?);
    assert_eq!(store.join_group("old", member, 10).await?, Join::Joined);
    // What an older router's leave did: the member goes, the owner key stays.
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("SREM")
        .arg("cim:group:{old}:members")
        .arg(owner)
        .query_async(&mut conn)
        .await?;
    assert_eq!(
        store.invite("old", owner, 7203, 10).await?,
        Invite::NotOwner
    );
    assert_eq!(
        store.remove_member("old", owner, member).await?,
        Removal::NotOwner
    );
    assert_eq!(store.group_members("old").await?, Some(vec![member]));
    // The index of a user's invitations drops, when read, a group that went: an invitation
    // of a group deleted since is gone from it.
    assert!(store.create_group("gone", member, true).await?);
    store.invite("gone", member, 7203, 10).await?;
    assert!(store.leave_group("gone", member).await?);
    assert!(store.user_invitations(7203).await?.is_empty());
    let indexed: Vec<String> = redis::cmd("SMEMBERS")
        .arg("cim:{u7203}:invites")
        .query_async(&mut conn)
        .await?;
    assert!(indexed.is_empty(), "{indexed:?}");
    Ok(())
}

/// A departed server's routes go, with their users' online entries; routes that moved to
/// another server, and their users, stay. Enough users for several pipelined chunks.
async fn a_departed_servers_routes_are_removed(store: &dyn Store) -> anyhow::Result<()> {
    let lease = Duration::from_secs(30);
    let mut on_gone = Vec::new();
    for i in 0..1200u64 {
        let user = store.create_account(&format!("gone{i}"), "hash").await?.id;
        let route = Route {
            server_id: "server-gone".into(),
            session_id: 100 + i,
            confirmed: false,
        };
        store
            .claim_route(user, route, lease, false, REPLACED_FOR)
            .await?;
        assert!(
            store
                .confirm_route(user, 100 + i, "server-gone", lease)
                .await?
        );
        on_gone.push(user);
    }
    // One of them has since logged in on another server.
    let moved = on_gone.pop().unwrap();
    let route = Route {
        server_id: "server-kept".into(),
        session_id: 99,
        confirmed: false,
    };
    store
        .claim_route(moved, route, lease, true, REPLACED_FOR)
        .await?;
    assert!(store.confirm_route(moved, 99, "server-kept", lease).await?);
    // Two more whose leases lapse first: they were offline already, so neither a release
    // nor the removal finds them (they are not announced offline twice).
    let short = Duration::from_millis(50);
    let mut lapsed = Vec::new();
    for (i, name) in ["lapsed-a", "lapsed-b"].into_iter().enumerate() {
        let user = store.create_account(name, "hash").await?.id;
        let session = 5000 + i as u64;
        let route = Route {
            server_id: "server-gone".into(),
            session_id: session,
            confirmed: false,
        };
        store
            .claim_route(user, route, short, false, REPLACED_FOR)
            .await?;
        assert!(
            store
                .confirm_route(user, session, "server-gone", short)
                .await?
        );
        lapsed.push((user, session));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (user, session) = lapsed[0];
    assert!(
        !store
            .release_route(user, session, Some("server-gone"))
            .await?,
        "a lapsed route was released"
    );

    let mut removed = store.remove_server_routes("server-gone").await?;
    removed.sort_unstable();
    assert_eq!(removed, on_gone);
    let online = store.online_users().await?;
    assert!(online.contains(&moved), "the moved user stays online");
    assert!(!on_gone.iter().any(|u| online.contains(u)), "{online:?}");
    assert!(store.routes(&on_gone).await?.iter().all(Option::is_none));
    assert!(store.routes(&[moved]).await?[0].is_some());
    Ok(())
}

#[tokio::test]
async fn memory_store_follows_the_contract() -> anyhow::Result<()> {
    let store = MemoryStore::new();
    private_appends_follow_the_contract(&store).await?;
    unsends_take_their_messages_place(&store).await?;
    only_confirmed_sessions_are_online(&store).await?;
    revoked_sessions_do_not_get_their_routes_back(&store).await?;
    a_relogin_claim_ends_its_login_once(&store).await?;
    expired_entries_never_hide_fresh_ones(&store).await?;
    id_nodes_are_held_once(&store).await?;
    a_large_group_append_reaches_every_member_once(&store).await?;
    groups_follow_the_contract(&store).await?;
    owners_and_invite_only_groups_follow_the_contract(&store).await?;
    a_departed_servers_routes_are_removed(&store).await?;
    blocks_follow_the_contract(&store).await?;
    last_seen_follows_route_changes(&store).await?;
    a_password_hash_is_replaced_once(&store).await?;
    names_are_unique_whatever_their_case(&store).await?;
    an_account_is_deleted_with_what_is_its_alone(&store).await?;
    a_group_is_handed_over_to_a_member(&store).await?;
    reports_are_kept_newest_first_under_a_cap(&store).await?;
    read_receipts_move_forward_under_a_cap(&store).await?;
    message_ids_are_recorded_once(&store).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_follows_the_contract() -> anyhow::Result<()> {
    let redis = RedisProc::start().await?;
    let store = RedisStore::connect(&redis.url()).await?;
    private_appends_follow_the_contract(&store).await?;
    unsends_take_their_messages_place(&store).await?;
    only_confirmed_sessions_are_online(&store).await?;
    revoked_sessions_do_not_get_their_routes_back(&store).await?;
    a_relogin_claim_ends_its_login_once(&store).await?;
    expired_entries_never_hide_fresh_ones(&store).await?;
    id_nodes_are_held_once(&store).await?;
    a_large_group_append_reaches_every_member_once(&store).await?;
    groups_follow_the_contract(&store).await?;
    owners_and_invite_only_groups_follow_the_contract(&store).await?;
    a_departed_servers_routes_are_removed(&store).await?;
    blocks_follow_the_contract(&store).await?;
    last_seen_follows_route_changes(&store).await?;
    a_password_hash_is_replaced_once(&store).await?;
    names_are_unique_whatever_their_case(&store).await?;
    an_account_is_deleted_with_what_is_its_alone(&store).await?;
    a_group_is_handed_over_to_a_member(&store).await?;
    reports_are_kept_newest_first_under_a_cap(&store).await?;
    read_receipts_move_forward_under_a_cap(&store).await?;
    a_departed_owner_of_an_older_group_is_no_owner(&store, &redis.url()).await?;
    message_ids_are_recorded_once(&store).await?;
    // An unsend's scan (its message's marker expired) stops at an entry stored well before
    // the message's id time: the message cannot be further back.
    let reader = store.create_account("unsend-scan-stop", "hash").await?.id;
    let brief = InboxLimits {
        dedup: Duration::from_millis(1),
        ..InboxLimits::default()
    };
    let message = InboxEntry {
        created_at_ms: cim_core::now_ms(),
        ..entry(900)
    };
    store.append_private(reader, &message, brief).await?;
    store.append_private(reader, &entry(901), brief).await?;
    tokio::time::sleep(Duration::from_millis(20)).await;
    let unsend = InboxEntry {
        unsends: Some(900),
        ..entry(902)
    };
    let append = store
        .append_private(reader, &unsend, InboxLimits::default())
        .await?;
    assert!(
        matches!(
            append,
            PrivateAppend::Stored {
                seq: 3,
                replaced: false,
                ..
            }
        ),
        "{append:?}"
    );
    // A record an older router wrote (a bare id, no fingerprint) is taken as the same
    // message: a retry across a rolling upgrade still gets its first id.
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let _: () = redis::cmd("SET")
        .arg("cim:{u9}:sent:1")
        .arg("555")
        .query_async(&mut conn)
        .await?;
    let window = Duration::from_secs(60);
    assert_eq!(store.message_id(9, 1, 77, 600, window).await?, Some(555));
    // A report cim cannot read is skipped, not an error.
    let _: () = redis::cmd("LPUSH")
        .arg("cim:reports")
        .arg("not json")
        .query_async(&mut conn)
        .await?;
    let reports = store.reports(10).await?;
    assert_eq!(reports.len(), 2, "{reports:?}");
    // A name left naming an account that is gone (a deletion that stopped before freeing it)
    // is taken over by the next registration; one naming something else stays taken.
    for (name, holder) in [("ghost", "99999"), ("odd", "not-an-id")] {
        let _: () = redis::cmd("SET")
            .arg(format!("cim:name:{name}"))
            .arg(holder)
            .query_async(&mut conn)
            .await?;
    }
    let ghost = store.create_account("ghost", "hash").await?;
    assert_eq!(
        store.account_by_name("ghost").await?.map(|a| a.id),
        Some(ghost.id)
    );
    assert!(matches!(
        store.create_account("odd", "hash").await,
        Err(cim_router::store::StoreError::NameTaken)
    ));
    // A later last seen (another router's write that landed first) is not replaced by an
    // earlier one; a value cim cannot read is.
    let user = store.create_account("later", "hash").await?.id;
    let lease = Duration::from_secs(30);
    for (session, stored, kept) in [(7, "99999999999999", true), (8, "garbage", false)] {
        let route = Route {
            server_id: "server-1".into(),
            session_id: session,
            confirmed: false,
        };
        store
            .claim_route(user, route, lease, true, REPLACED_FOR)
            .await?;
        let _: () = redis::cmd("SET")
            .arg(format!("cim:{{u{user}}}:seen"))
            .arg(stored)
            .query_async(&mut conn)
            .await?;
        let before = cim_core::now_ms();
        assert!(store.release_route(user, session, None).await?);
        let seen = store.last_seen(user).await?;
        if kept {
            assert_eq!(seen, Some(99_999_999_999_999));
        } else {
            let now = cim_core::now_ms();
            assert!(
                seen.is_some_and(|at| (before..=now).contains(&at)),
                "{seen:?}"
            );
        }
    }
    Ok(())
}

/// A route Redis holds but cim cannot read (written by something else, or damaged: not a
/// route, not UTF-8, not a string, of a route's form with a server id that is not UTF-8)
/// counts as none: a private message to its user is still
/// stored and its send succeeds (the recipient pulls it at the next connect), a listing of
/// several routes keeps the readable ones, and a login without takeover claims the route over
/// it. Before, the send of the stored message was answered retry on every attempt (each resend
/// finding it stored already), one such route failed a whole group's push, and its user could
/// log in only with takeover.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_route_fails_neither_a_stored_message_nor_a_login() -> anyhow::Result<()> {
    let redis = RedisProc::start().await?;
    let store = RedisStore::connect(&redis.url()).await?;
    let lease = Duration::from_secs(30);
    let erin = store.create_account("erin", "hash").await?;
    let frank = store.create_account("frank", "hash").await?;
    let gina = store.create_account("gina", "hash").await?;
    let hugo = store.create_account("hugo", "hash").await?;
    let ivan = store.create_account("ivan", "hash").await?;
    let frank_route = Route {
        server_id: "server-2".into(),
        session_id: 9,
        confirmed: false,
    };
    store
        .claim_route(frank.id, frank_route.clone(), lease, false, REPLACED_FOR)
        .await?;
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let route_key = |user: u64| format!("cim:{{u{user}}}:route");
    let _: () = redis::cmd("SET")
        .arg(route_key(erin.id))
        .arg("not a route")
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SET")
        .arg(route_key(gina.id))
        .arg(&[0xff_u8, 0xfe, b'|', b'1'][..])
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SADD")
        .arg(route_key(hugo.id))
        .arg("a set, not a string")
        .query_async(&mut conn)
        .await?;
    // Of a route's form, but its server id is not UTF-8.
    let _: () = redis::cmd("SET")
        .arg(route_key(ivan.id))
        .arg(&b"5|1|\xffserver"[..])
        .query_async(&mut conn)
        .await?;

    let limits = InboxLimits::default();
    for (i, user) in [erin.id, gina.id, hugo.id, ivan.id].into_iter().enumerate() {
        let (seq, route) = store
            .append_private(user, &entry(40 + i as u64), limits)
            .await?
            .stored()
            .expect("the account exists");
        assert_eq!((seq, route), (1, None), "user {user}");
        let page = store.fetch_inbox(user, 0, 0, 10, limits, 6).await?;
        assert_eq!(
            page.entries.len(),
            1,
            "the message is in user {user}'s inbox"
        );
    }
    assert_eq!(
        store
            .routes(&[erin.id, frank.id, gina.id, hugo.id, ivan.id])
            .await?,
        vec![None, Some(frank_route), None, None, None]
    );
    // Nor does one keep its user from logging in without takeover: it holds no session.
    for user in [erin.id, gina.id, hugo.id, ivan.id] {
        let route = Route {
            server_id: "server-1".into(),
            session_id: user + 100,
            confirmed: false,
        };
        let claim = store
            .claim_route(user, route.clone(), lease, false, REPLACED_FOR)
            .await?;
        let won = Claim::Won {
            previous: None,
            last_login: None,
        };
        assert_eq!(claim, won, "user {user}");
        assert_eq!(store.routes(&[user]).await?, vec![Some(route)]);
    }
    Ok(())
}

/// An inbox entry Redis holds but cim cannot read (damaged, or written by a newer router in a
/// rolling upgrade) is skipped like an expired one. Before, every pull of that inbox failed,
/// so nothing after the entry reached its user until the entry aged out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_inbox_entry_holds_back_none_after_it() -> anyhow::Result<()> {
    let redis = RedisProc::start().await?;
    let store = RedisStore::connect(&redis.url()).await?;
    let limits = InboxLimits::default();
    let ida = store.create_account("ida", "hash").await?;
    store.append_private(ida.id, &entry(1), limits).await?;
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let seq: u64 = redis::cmd("INCR")
        .arg(format!("cim:{{u{}}}:seq", ida.id))
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("ZADD")
        .arg(format!("cim:{{u{}}}:inbox", ida.id))
        .arg(seq)
        .arg(format!("{seq}:not an entry"))
        .query_async(&mut conn)
        .await?;
    store.append_private(ida.id, &entry(3), limits).await?;

    let page = store.fetch_inbox(ida.id, 0, 0, 10, limits, 6).await?;
    let got: Vec<(u64, u64)> = page.entries.iter().map(|(s, e)| (*s, e.msg_id)).collect();
    assert_eq!(got, vec![(1, 1), (3, 3)]);
    assert!(!page.more);
    // A page that ends on it still moves past it.
    let page = store.fetch_inbox(ida.id, 1, 1, 1, limits, 6).await?;
    let got: Vec<(u64, u64)> = page.entries.iter().map(|(s, e)| (*s, e.msg_id)).collect();
    assert_eq!(got, vec![(3, 3)]);
    Ok(())
}

/// The route scripts read a route key they cannot read (not a string, or not a route) as no
/// route: a server's renewal restores its sessions' routes over such keys, and one such key
/// among a server's sessions fails neither the renewal of the others nor a confirm or release.
/// Before, a key of another type failed its script, and with it the whole renewal pipeline:
/// every session of that server lost its route when the leases ran out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_route_fails_no_renewal() -> anyhow::Result<()> {
    let redis = RedisProc::start().await?;
    let store = RedisStore::connect(&redis.url()).await?;
    let lease = Duration::from_secs(30);
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    let route_key = |user: u64| format!("cim:{{u{user}}}:route");
    let mut ids = Vec::new();
    for name in ["ivan", "jack", "kate"] {
        ids.push(store.create_account(name, "hash").await?.id);
    }
    let (ivan, jack, kate) = (ids[0], ids[1], ids[2]);
    let _: () = redis::cmd("SADD")
        .arg(route_key(ivan))
        .arg("a set, not a string")
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SET")
        .arg(route_key(jack))
        .arg("not a route")
        .query_async(&mut conn)
        .await?;
    let kate_route = Route {
        server_id: "server-1".into(),
        session_id: 3,
        confirmed: false,
    };
    assert!(matches!(
        store
            .claim_route(kate, kate_route, lease, false, REPLACED_FOR)
            .await?,
        Claim::Won { .. }
    ));

    assert!(!store.confirm_route(ivan, 1, "server-1", lease).await?);
    assert!(!store.release_route(ivan, 1, Some("server-1")).await?);
    assert!(!store.release_route(jack, 2, None).await?);
    let renewal = store
        .renew_routes("server-1", &[(ivan, 1), (jack, 2), (kate, 3)], lease)
        .await?;
    assert!(renewal.stale.is_empty(), "{renewal:?}");
    let confirmed = |session_id| {
        Some(Route {
            server_id: "server-1".into(),
            session_id,
            confirmed: true,
        })
    };
    assert_eq!(
        store.routes(&[ivan, jack, kate]).await?,
        vec![confirmed(1), confirmed(2), confirmed(3)]
    );

    // Nor does an unreadable inbox counter fail the others' inbox heads (a renewal's answer).
    let seq_key = |user: u64| format!("cim:{{u{user}}}:seq");
    let _: () = redis::cmd("SADD")
        .arg(seq_key(ivan))
        .arg("a set")
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SET")
        .arg(seq_key(jack))
        .arg("not a number")
        .query_async(&mut conn)
        .await?;
    let _: () = redis::cmd("SET")
        .arg(seq_key(kate))
        .arg("12")
        .query_async(&mut conn)
        .await?;
    assert_eq!(
        store.inbox_heads(&[ivan, jack, kate, 8004]).await?,
        vec![0, 0, 12, 0]
    );
    Ok(())
}

/// Accounts an older router made have no folded name key: `fold_names` gives them one, after
/// which no other case of their name is free; run again, it changes nothing. Two such names
/// the same but for case (the second made before the first was folded) both stay, each found
/// as registered. On a Redis of its own: a keyspace with no names, then one whose names all
/// lack their key (so every step of a page is tried with nothing to do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_older_routers_made_get_their_folded_names() -> anyhow::Result<()> {
    let redis = RedisProc::start().await?;
    let store = RedisStore::connect(&redis.url()).await?;
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    for i in 0..50 {
        redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(i)
            .query_async::<()>(&mut conn)
            .await?;
    }
    assert_eq!(store.fold_names().await?, Default::default(), "no names");

    let older = |name: &'static str| {
        let mut conn = conn.clone();
        let store = &store;
        async move {
            let id = store.create_account(name, "hash").await?.id;
            let key = format!("cim:fold:{}", name.to_ascii_lowercase());
            redis::cmd("DEL")
                .arg(key)
                .query_async::<()>(&mut conn)
                .await?;
            anyhow::Ok(id)
        }
    };
    let old = older("Old").await?;
    let pair = older("Pair").await?;
    let gone = older("Gone").await?;
    store.delete_account(gone, REPLACED_FOR).await?;
    redis::cmd("SET")
        .arg("cim:name:Gone")
        .arg(gone)
        .query_async::<()>(&mut conn)
        .await?;
    let folded = store.fold_names().await?;
    assert_eq!(
        (folded.added, folded.present, folded.skipped),
        (2, 0, 1),
        "{folded:?}"
    );
    // Made meanwhile, in another case: a registration of the same name is refused now.
    assert!(matches!(
        store.create_account("OLD", "hash").await,
        Err(cim_router::store::StoreError::NameTaken)
    ));
    redis::cmd("DEL")
        .arg("cim:fold:pair")
        .query_async::<()>(&mut conn)
        .await?;
    let twin = store.create_account("PAIR", "hash").await?.id;
    let folded = store.fold_names().await?;
    assert_eq!(
        (folded.added, folded.present, folded.clash_count),
        (0, 2, 1),
        "{folded:?}"
    );
    assert_eq!(folded.clashes, [("Pair".to_string(), "PAIR".to_string())]);
    for (name, id) in [("oLD", old), ("Pair", pair), ("PAIR", twin), ("pair", twin)] {
        let found = store.account_by_name(name).await?.map(|a| a.id);
        assert_eq!(found, Some(id), "{name}");
    }
    // A name a deletion left behind hides no account that took it over in another case.
    redis::cmd("SET")
        .arg("cim:name:gone")
        .arg(gone)
        .query_async::<()>(&mut conn)
        .await?;
    let heir = store.create_account("GONE", "hash").await?.id;
    let found = store.account_by_name("gone").await?.map(|a| a.id);
    assert_eq!(found, Some(heir));

    // Groups an older router made (no folded key): `Club`, and `Team` with `team`, which
    // differ only in case. Folded, `club` is taken; the twins both stay.
    for (name, owner) in [("Club", 1), ("Team", 2), ("team", 3)] {
        redis::pipe()
            .set(format!("cim:group:{{{name}}}:owner"), owner)
            .sadd(format!("cim:group:{{{name}}}:members"), owner)
            .query_async::<()>(&mut conn)
            .await?;
    }
    assert!(
        store.create_group("club", 4, false).await?,
        "before folding"
    );
    assert!(store.leave_group("club", 4).await?);
    let folded = store.fold_group_names().await?;
    assert_eq!((folded.added, folded.clash_count), (2, 1), "{folded:?}");
    assert!(!store.create_group("club", 4, false).await?);
    assert!(!store.create_group("TEAM", 4, false).await?);
    let again = store.fold_group_names().await?;
    assert_eq!(
        (again.added, again.present, again.clash_count),
        (0, 2, 1),
        "{again:?}"
    );
    Ok(())
}

/// Groups an older router made, each lacking its folded key, get them in one run (a page
/// whose names all lack their key: no step is left with nothing to ask), on a Redis of its
/// own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn older_groups_that_all_lack_their_folded_key_get_it() -> anyhow::Result<()> {
    let redis = RedisProc::start().await?;
    let store = RedisStore::connect(&redis.url()).await?;
    let mut conn = redis::Client::open(redis.url())?
        .get_multiplexed_async_connection()
        .await?;
    for (name, owner) in [("Solo", 1), ("Duo", 2)] {
        redis::pipe()
            .set(format!("cim:group:{{{name}}}:owner"), owner)
            .sadd(format!("cim:group:{{{name}}}:members"), owner)
            .query_async::<()>(&mut conn)
            .await?;
    }
    let folded = store.fold_group_names().await?;
    assert_eq!(
        (folded.added, folded.present, folded.clash_count),
        (2, 0, 0),
        "{folded:?}"
    );
    assert!(!store.create_group("solo", 3, false).await?);
    Ok(())
}
