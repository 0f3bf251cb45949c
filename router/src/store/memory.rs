//! In-memory [`Store`] for the embedded mode and unit tests. Leases are checked lazily against
//! a monotonic clock.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::expiring::{ExpiringMap, Weight};
use super::{
    Account, Block, Claim, DeletedAccount, GroupInfo, ID_NODES, IdNode, InboxEntry, InboxLimits,
    InboxPage, Invite, Join, MAX_INVITATIONS_LISTED, Privacy, PrivateAppend, ReadReceipt, Relogin,
    Removal, Renewal, Report, Revocation, Route, Store, StoreError, Transfer, sweep_when_doubled,
};

/// Most idempotency records kept; beyond this the oldest are forgotten early (about 100 MB at
/// most). The dedup window then shrinks to a million sends: at the 15,000-30,000 sends a second
/// one process carries, 33 to 66 s, still past a client's 30 s of resends.
const MAX_SENT_RECORDS: usize = 1_000_000;
/// Weight of the append records kept, in (user, seq) pairs of 16 bytes (a record weighs its
/// pairs and [`RECORD_OVERHEAD_PAIRS`]), before the oldest records go early: under a sustained
/// fan-out ten minutes of them would grow without bound. About 256 MB at most: 2.3 million
/// private messages (77 s at 30,000 a second) or 16,000 messages to 1,000 members, either far
/// more than a client's 30 s of resends.
const MAX_APPENDED_PAIRS: usize = 16_000_000;
/// What a record costs besides its pairs, in pairs: its map slot, its vector's allocation and
/// its place in the expiry queue, about 100 bytes. Counted as free, a private message's
/// record (one pair) let the cap hold seven times the memory it meant.
const RECORD_OVERHEAD_PAIRS: usize = 6;
/// Maps of each kind of per-message record: one grows by 1/256 of the records at a time, and
/// empty they cost 12 KiB.
const RECORD_SHARDS: usize = 256;

#[derive(Debug)]
struct Lease {
    route: Route,
    expires: Instant,
}

#[derive(Default)]
struct Inbox {
    last_seq: u64,
    /// One `Arc` per message, shared by every member's inbox it went to.
    entries: VecDeque<(u64, Arc<InboxEntry>)>,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<u64, Account>,
    /// Name in lower case -> its account: names are unique whatever their case.
    by_name: HashMap<String, u64>,
    next_id: u64,
    routes: HashMap<u64, Lease>,
    /// The session of each user's latest login (see [`Claim::Won`]).
    logins: HashMap<u64, u64>,
    online: BTreeSet<u64>,
    inboxes: HashMap<u64, Inbox>,
    /// msg id -> (user, seq) of every inbox the message was appended to within
    /// [`InboxLimits::dedup`], kept after the entries are trimmed: a sender may resend after the
    /// recipients acked. One record per message, not per recipient: a group message's record
    /// costs one map entry and 16 bytes a member.
    appended: ExpiringMap<u64, AppendRecord, RECORD_SHARDS, MAX_APPENDED_PAIRS>,
    /// (sender, client msg id) -> msg id.
    sent: ExpiringMap<(u64, u64), (u64, u64), RECORD_SHARDS, MAX_SENT_RECORDS>,
    /// (user, session) -> expiry and reason of revocations (logout, takeover, re-login).
    revoked: HashMap<(u64, u64), (Instant, Revocation)>,
    /// Size of `revoked` at which expired marks are swept next (twice what the last sweep
    /// left): takeovers and re-logins revoke too, so a sweep per revocation would make a
    /// failover storm quadratic.
    revoked_sweep_at: usize,
    /// Group name -> the group.
    groups: HashMap<String, Group>,
    /// User -> groups.
    memberships: HashMap<u64, BTreeSet<String>>,
    /// User -> groups whose invitations wait for it (as each group's `invited`).
    invitations: HashMap<u64, BTreeSet<String>>,
    /// Message-id node -> its holder (kept after the hold ends, for its `issued_until_ms`).
    id_nodes: HashMap<u16, IdNodeHold>,
    /// User -> the users it blocks.
    blocked: HashMap<u64, BTreeSet<u64>>,
    /// User -> when it was last seen: its latest login's confirmation or route's release (ms
    /// since the Unix epoch).
    last_seen: HashMap<u64, u64>,
    /// Users' reports of others, newest first.
    reports: VecDeque<Report>,
    /// (reporter, reported) -> until when another report of the pair is not kept.
    reported: HashMap<(u64, u64), Instant>,
    /// Size of `reported` at which expired pairs are swept next.
    reported_sweep_at: usize,
    /// Users who hide when they were last seen.
    hiding_last_seen: BTreeSet<u64>,
    /// Users who hide that they read others' messages.
    hiding_read_receipts: BTreeSet<u64>,
    /// User -> the status it set.
    statuses: HashMap<u64, String>,
    /// Sender -> reader -> the reader's latest receipt for the sender's messages.
    read_receipts: HashMap<u64, HashMap<u64, ReadReceipt>>,
}

/// A named group.
#[derive(Debug)]
struct Group {
    owner: u64,
    invite_only: bool,
    members: BTreeSet<u64>,
    /// Invited users who have not joined yet.
    invited: BTreeSet<u64>,
}

impl Group {
    /// Whether `user` may act as the group's owner.
    fn owned_by(&self, user: u64) -> bool {
        self.owner == user && self.members.contains(&user)
    }
}

/// A router's hold on a message-id node.
#[derive(Debug)]
struct IdNodeHold {
    owner: String,
    expires: Instant,
    issued_until_ms: u64,
}

/// The (user, seq) pairs a message got, one per inbox it went to.
type AppendRecord = Vec<(u64, u64)>;

impl Weight for AppendRecord {
    fn weight(&self) -> usize {
        self.len() + RECORD_OVERHEAD_PAIRS
    }
}

/// A message id and its fingerprint: one record.
impl Weight for (u64, u64) {
    fn weight(&self) -> usize {
        1
    }
}

/// Puts `entry`, if it unsends a message, in that message's place in `inbox` (the sender's,
/// in the same group or none), as [`Store::append_private`] says; whether it found it. A
/// group's message is looked for only at `at`, the seq its append record names while that
/// lasts (as on Redis, whose members' inboxes are not scanned); a private one in the whole
/// inbox.
fn take_back(inbox: &mut Inbox, entry: &Arc<InboxEntry>, at: Option<u64>) -> bool {
    let Some(unsent) = entry.unsends else {
        return false;
    };
    let message = if entry.group.is_empty() {
        inbox.entries.iter_mut().find(|(_, e)| e.msg_id == unsent)
    } else {
        // Entries are in seq order.
        let Some(at) = at else { return false };
        let index = inbox
            .entries
            .binary_search_by_key(&at, |(seq, _)| *seq)
            .ok();
        index.and_then(|i| inbox.entries.get_mut(i))
    };
    match message {
        Some((_, e)) if e.from_user == entry.from_user && e.group == entry.group => {
            *e = entry.clone();
            true
        }
        _ => false,
    }
}

impl Inner {
    /// The users who hide `what`.
    fn hiding(&mut self, what: Privacy) -> &mut BTreeSet<u64> {
        match what {
            Privacy::LastSeen => &mut self.hiding_last_seen,
            Privacy::ReadReceipts => &mut self.hiding_read_receipts,
        }
    }

    /// Appends `entry` to each of `recipients`' inboxes once per message id, as
    /// [`Store::append_inbox`] says. Returns the seqs in `recipients` order.
    fn append(
        &mut self,
        recipients: &[u64],
        entry: &Arc<InboxEntry>,
        limits: InboxLimits,
    ) -> Vec<u64> {
        let now = Instant::now();
        // Entries past the inbox's time to live go as later ones come (Redis lets the whole
        // inbox expire): fetches skip them, but they took memory for good.
        let oldest = entry
            .created_at_ms
            .saturating_sub(limits.ttl.as_millis() as u64);
        let Inner {
            inboxes, appended, ..
        } = self;
        // Where an unsend's message was appended, while its record lasts.
        let unsent_at: HashMap<u64, u64> = entry
            .unsends
            .and_then(|unsent| appended.get(&unsent, now))
            .map(|record| record.iter().copied().collect())
            .unwrap_or_default();
        let append = |record: &mut AppendRecord| {
            // A resend: the inboxes it already reached keep the seq they gave it.
            let earlier: HashMap<u64, u64> = record.iter().copied().collect();
            recipients
                .iter()
                .map(|user| {
                    if let Some(seq) = earlier.get(user) {
                        return *seq;
                    }
                    let inbox = inboxes.entry(*user).or_default();
                    // A private unsend's message was taken back by `append_private`.
                    if !entry.group.is_empty() {
                        take_back(inbox, entry, unsent_at.get(user).copied());
                    }
                    inbox.last_seq += 1;
                    let seq = inbox.last_seq;
                    inbox.entries.push_back((seq, entry.clone()));
                    record.push((*user, seq));
                    while inbox.entries.len() > limits.max_len
                        || inbox
                            .entries
                            .front()
                            .is_some_and(|(_, e)| e.created_at_ms < oldest)
                    {
                        inbox.entries.pop_front();
                    }
                    seq
                })
                .collect()
        };
        appended.upsert(
            entry.msg_id,
            now,
            limits.dedup,
            || Vec::with_capacity(recipients.len()),
            append,
        )
    }

    /// Forgets that an invitation to `group` waits for `user`.
    fn uninvite(&mut self, user: u64, group: &str) {
        if let Some(groups) = self.invitations.get_mut(&user) {
            groups.remove(group);
            if groups.is_empty() {
                self.invitations.remove(&user);
            }
        }
    }

    /// Voids every invitation waiting in group `name` (deleted, passed on or handed over:
    /// the invitations go with its owner).
    fn void_invitations(&mut self, name: &str) {
        let void = match self.groups.get_mut(name) {
            Some(group) => std::mem::take(&mut group.invited),
            None => return,
        };
        for invited in void {
            self.uninvite(invited, name);
        }
    }

    /// Why `session_id` of `user` was revoked, if it was and the mark has not expired.
    fn revocation(&self, user: u64, session_id: u64, now: Instant) -> Option<Revocation> {
        self.revoked
            .get(&(user, session_id))
            .filter(|(expires, _)| *expires > now)
            .map(|(_, why)| *why)
    }

    /// Whether `session_id` of `user` was revoked and the mark has not expired.
    fn is_revoked(&self, user: u64, session_id: u64, now: Instant) -> bool {
        self.revocation(user, session_id, now).is_some()
    }

    /// Marks `session_id` of `user` as ended, for `why`, for `ttl`.
    fn revoke(&mut self, user: u64, session_id: u64, ttl: Duration, why: Revocation, now: Instant) {
        let live = |(expires, _): &(Instant, Revocation)| *expires > now;
        sweep_when_doubled(&mut self.revoked, &mut self.revoked_sweep_at, 1024, live);
        self.revoked.insert((user, session_id), (now + ttl, why));
    }

    /// [`Store::claim_route`], and with `relogin` [`Store::claim_route_relogin`].
    #[allow(clippy::too_many_arguments)]
    fn claim(
        &mut self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
        replaced_for: Duration,
        relogin: Option<&Relogin>,
        now: Instant,
    ) -> Claim {
        if !self.accounts.contains_key(&user) {
            return Claim::NoAccount;
        }
        let previous = self.live_route(user, now).map(|l| l.route.clone());
        if let Some(relogin) = relogin {
            if self.is_revoked(user, relogin.session_id, now)
                || previous.as_ref().map(|r| r.session_id) != relogin.seen_route_session
            {
                return Claim::Ended;
            }
            let why = Revocation::ReLoggedIn;
            self.revoke(user, relogin.session_id, relogin.revoke_for, why, now);
        }
        if let Some(existing) = &previous
            && !force
        {
            return Claim::Busy(existing.clone());
        }
        self.online.remove(&user);
        let new = route.session_id;
        let last_login = self.logins.insert(user, new);
        // The logins this one replaces end in the same step (see `Store::claim_route`).
        let own = relogin.map(|r| r.session_id);
        for ended in [previous.as_ref().map(|r| r.session_id), last_login]
            .into_iter()
            .flatten()
        {
            if ended != new && Some(ended) != own {
                self.revoke(user, ended, replaced_for, Revocation::Replaced, now);
            }
        }
        self.routes.insert(
            user,
            Lease {
                route,
                expires: now + pending_lease,
            },
        );
        Claim::Won {
            previous,
            last_login,
        }
    }

    /// The live route of `user`, dropping it if its lease ran out.
    fn live_route(&mut self, user: u64, now: Instant) -> Option<&mut Lease> {
        if self.routes.get(&user).is_some_and(|l| l.expires <= now) {
            self.routes.remove(&user);
            self.online.remove(&user);
        }
        self.routes.get_mut(&user)
    }
}

/// Accounts and routes in this process's memory.
#[derive(Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent before it can panic.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl Store for MemoryStore {
    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError> {
        let mut inner = self.inner();
        let folded = cim_core::names::folded(name);
        if inner.by_name.contains_key(&folded) {
            return Err(StoreError::NameTaken);
        }
        inner.next_id += 1;
        let account = Account {
            id: inner.next_id,
            name: name.to_string(),
            password_hash: password_hash.to_string(),
        };
        inner.by_name.insert(folded, account.id);
        inner.accounts.insert(account.id, account.clone());
        Ok(account)
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let inner = self.inner();
        Ok(inner
            .by_name
            .get(&cim_core::names::folded(name))
            .and_then(|id| inner.accounts.get(id))
            .cloned())
    }

    async fn set_password_hash(
        &self,
        user: u64,
        expected: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        match inner.accounts.get_mut(&user) {
            Some(account) if account.password_hash == expected => {
                account.password_hash = new_hash.to_string();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn user_exists(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.inner().accounts.contains_key(&id))
    }

    async fn accounts_by_id(&self, ids: &[u64]) -> Result<Vec<Account>, StoreError> {
        let inner = self.inner();
        Ok(ids
            .iter()
            .filter_map(|id| inner.accounts.get(id).cloned())
            .collect())
    }

    async fn delete_account(
        &self,
        user: u64,
        revoke_for: Duration,
    ) -> Result<Option<DeletedAccount>, StoreError> {
        let mut inner = self.inner();
        let Some(account) = inner.accounts.remove(&user) else {
            return Ok(None);
        };
        let folded = cim_core::names::folded(&account.name);
        if inner.by_name.get(&folded) == Some(&user) {
            inner.by_name.remove(&folded);
        }
        inner.inboxes.remove(&user);
        if let Some(last) = inner.logins.remove(&user) {
            let why = Revocation::LoggedOut;
            inner.revoke(user, last, revoke_for, why, Instant::now());
        }
        inner.blocked.remove(&user);
        inner.last_seen.remove(&user);
        inner.hiding_last_seen.remove(&user);
        inner.hiding_read_receipts.remove(&user);
        inner.read_receipts.remove(&user);
        inner.statuses.remove(&user);
        let groups = inner.memberships.remove(&user).unwrap_or_default();
        let invitations = inner.invitations.remove(&user).unwrap_or_default();
        Ok(Some(DeletedAccount {
            name: account.name,
            groups: groups.into_iter().collect(),
            invitations: invitations.into_iter().collect(),
        }))
    }

    async fn claim_route(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
        replaced_for: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        Ok(self
            .inner()
            .claim(user, route, pending_lease, force, replaced_for, None, now))
    }

    async fn claim_route_relogin(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        replaced_for: Duration,
        relogin: &Relogin,
    ) -> Result<Claim, StoreError> {
        Ok(self.inner().claim(
            user,
            route,
            pending_lease,
            true,
            replaced_for,
            Some(relogin),
            Instant::now(),
        ))
    }

    async fn confirm_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        if inner.is_revoked(user, session_id, now) {
            return Ok(false);
        }
        let Some(held) = inner.live_route(user, now) else {
            return Ok(false);
        };
        if held.route.session_id != session_id || held.route.server_id != server_id {
            return Ok(false);
        }
        held.route.confirmed = true;
        held.expires = now + lease;
        inner.online.insert(user);
        see(&mut inner.last_seen, user);
        Ok(true)
    }

    async fn revoke_session(
        &self,
        user: u64,
        session_id: u64,
        ttl: Duration,
        why: Revocation,
    ) -> Result<(), StoreError> {
        self.inner()
            .revoke(user, session_id, ttl, why, Instant::now());
        Ok(())
    }

    async fn revocation(
        &self,
        user: u64,
        session_id: u64,
    ) -> Result<Option<Revocation>, StoreError> {
        Ok(self.inner().revocation(user, session_id, Instant::now()))
    }

    async fn last_login(&self, user: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.inner().logins.get(&user).copied())
    }

    async fn release_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        // A lapsed lease holds nothing to release (as on Redis, where the key is gone).
        if inner.live_route(user, Instant::now()).is_some_and(|l| {
            l.route.session_id == session_id
                && server_id.is_none_or(|server| l.route.server_id == server)
        }) {
            inner.routes.remove(&user);
            inner.online.remove(&user);
            see(&mut inner.last_seen, user);
            return Ok(true);
        }
        Ok(false)
    }

    async fn routes(&self, users: &[u64]) -> Result<Vec<Option<Route>>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        Ok(users
            .iter()
            .map(|&u| inner.live_route(u, now).map(|l| l.route.clone()))
            .collect())
    }

    async fn online_users(&self) -> Result<Vec<u64>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        let ids: Vec<u64> = inner.online.iter().copied().collect();
        Ok(ids
            .into_iter()
            .filter(|&u| inner.live_route(u, now).is_some_and(|l| l.route.confirmed))
            .collect())
    }

    async fn renew_routes(
        &self,
        server_id: &str,
        sessions: &[(u64, u64)],
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        let mut renewal = Renewal::default();
        for &(user, session_id) in sessions {
            let held = inner
                .live_route(user, now)
                .map(|held| held.route.session_id);
            if inner.is_revoked(user, session_id, now) || held.is_some_and(|s| s != session_id) {
                renewal.stale.push(user);
                continue;
            }
            if held.is_none() {
                renewal.restored.push(user);
            }
            let route = Route {
                server_id: server_id.to_string(),
                session_id,
                confirmed: true,
            };
            inner.routes.insert(
                user,
                Lease {
                    route,
                    expires: now + lease,
                },
            );
            inner.online.insert(user);
        }
        Ok(renewal)
    }

    async fn message_id(
        &self,
        sender: u64,
        client_msg_id: u64,
        fingerprint: u64,
        new_msg_id: u64,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let key = (sender, client_msg_id);
        let (msg_id, recorded) = self.inner().sent.upsert(
            key,
            Instant::now(),
            ttl,
            || (new_msg_id, fingerprint),
            |recorded| *recorded,
        );
        Ok((recorded == fingerprint).then_some(msg_id))
    }

    async fn append_inbox(
        &self,
        recipients: &[u64],
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<Vec<u64>, StoreError> {
        if recipients.is_empty() {
            // Nothing to append, and no record to keep (a broadcast with no one else online).
            return Ok(Vec::new());
        }
        let shared = Arc::new(entry.clone());
        Ok(self.inner().append(recipients, &shared, limits))
    }

    async fn append_private(
        &self,
        to: u64,
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<PrivateAppend, StoreError> {
        let shared = Arc::new(entry.clone());
        let now = Instant::now();
        // One step, as on Redis: a block or the dedup record's expiry cannot come between the
        // check and the append.
        let mut inner = self.inner();
        if !inner.accounts.contains_key(&to) {
            return Ok(PrivateAppend::NoUser);
        }
        let blocked = inner
            .blocked
            .get(&to)
            .is_some_and(|blocked| blocked.contains(&entry.from_user));
        let stored_before = || {
            inner
                .appended
                .get(&entry.msg_id, now)
                .is_some_and(|record| record.iter().any(|(user, _)| *user == to))
        };
        let resend = stored_before();
        if blocked && !resend {
            return Ok(PrivateAppend::Blocked);
        }
        // Not for a resend, as on Redis.
        let replaced = !resend
            && inner
                .inboxes
                .get_mut(&to)
                .is_some_and(|inbox| take_back(inbox, &shared, None));
        let seq = inner
            .append(&[to], &shared, limits)
            .first()
            .copied()
            .ok_or_else(|| StoreError::Corrupt("append returned no sequence number".into()))?;
        let route = inner.live_route(to, now).map(|l| l.route.clone());
        Ok(PrivateAppend::Stored {
            seq,
            route,
            replaced,
        })
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
        let mut inner = self.inner();
        let Some(inbox) = inner.inboxes.get_mut(&user) else {
            return Ok(InboxPage::default());
        };
        trim(inbox, trim_up_to);
        let oldest = now_ms.saturating_sub(limits.ttl.as_millis() as u64);
        let mut fresh = inbox
            .entries
            .iter()
            .filter(|(seq, e)| *seq > after_seq && e.created_at_ms >= oldest);
        let entries: Vec<(u64, InboxEntry)> = fresh
            .by_ref()
            .take(limit)
            .map(|(seq, e)| (*seq, InboxEntry::clone(e)))
            .collect();
        let more = fresh.next().is_some();
        Ok(InboxPage { entries, more })
    }

    async fn trim_inbox(&self, acked: &[(u64, u64)]) -> Result<(), StoreError> {
        let mut inner = self.inner();
        for (user, up_to) in acked {
            if let Some(inbox) = inner.inboxes.get_mut(user) {
                trim(inbox, *up_to);
            }
        }
        Ok(())
    }

    async fn inbox_caught_up_to(&self, user: u64) -> Result<Option<u64>, StoreError> {
        Ok(match self.inner().inboxes.get(&user) {
            None => Some(0),
            Some(inbox) => inbox.entries.is_empty().then_some(inbox.last_seq),
        })
    }

    async fn inbox_heads(&self, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        let inner = self.inner();
        Ok(users
            .iter()
            .map(|user| inner.inboxes.get(user).map_or(0, |inbox| inbox.last_seq))
            .collect())
    }

    async fn create_group(
        &self,
        name: &str,
        owner: u64,
        invite_only: bool,
    ) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        // Unique whatever the case, as on Redis (a scan: groups are made rarely).
        if inner.groups.keys().any(|g| g.eq_ignore_ascii_case(name)) {
            return Ok(false);
        }
        let group = Group {
            owner,
            invite_only,
            members: BTreeSet::from([owner]),
            invited: BTreeSet::new(),
        };
        inner.groups.insert(name.to_string(), group);
        inner
            .memberships
            .entry(owner)
            .or_default()
            .insert(name.to_string());
        Ok(true)
    }

    async fn join_group(&self, name: &str, user: u64, cap: usize) -> Result<Join, StoreError> {
        let mut inner = self.inner();
        let Some(group) = inner.groups.get_mut(name) else {
            return Ok(Join::NoGroup);
        };
        if group.members.contains(&user) {
            group.invited.remove(&user);
            inner.uninvite(user, name);
            return Ok(Join::AlreadyMember);
        }
        if group.invite_only && !group.invited.contains(&user) {
            return Ok(Join::InviteOnly);
        }
        if group.members.len() >= cap {
            return Ok(Join::Full);
        }
        group.invited.remove(&user);
        group.members.insert(user);
        inner
            .memberships
            .entry(user)
            .or_default()
            .insert(name.to_string());
        inner.uninvite(user, name);
        Ok(Join::Joined)
    }

    async fn invite(
        &self,
        name: &str,
        owner: u64,
        user: u64,
        cap: usize,
    ) -> Result<Invite, StoreError> {
        let mut inner = self.inner();
        let Some(group) = inner.groups.get_mut(name) else {
            return Ok(Invite::NoGroup);
        };
        Ok(if !group.owned_by(owner) {
            Invite::NotOwner
        } else if group.members.contains(&user) {
            Invite::AlreadyMember
        } else if group.invited.contains(&user) {
            Invite::AlreadyInvited
        } else if group.invited.len() >= cap {
            Invite::Full
        } else {
            group.invited.insert(user);
            inner
                .invitations
                .entry(user)
                .or_default()
                .insert(name.to_string());
            Invite::Invited
        })
    }

    async fn transfer_group(
        &self,
        name: &str,
        owner: u64,
        user: u64,
    ) -> Result<Transfer, StoreError> {
        let mut inner = self.inner();
        let Some(group) = inner.groups.get_mut(name) else {
            return Ok(Transfer::NoGroup);
        };
        if !group.owned_by(owner) {
            return Ok(Transfer::NotOwner);
        }
        if !group.members.contains(&user) {
            return Ok(Transfer::NotMember);
        }
        if user != owner {
            group.owner = user;
            // As when an owner leaves: the new owner could not see them.
            inner.void_invitations(name);
        }
        Ok(Transfer::Transferred)
    }

    async fn remove_member(
        &self,
        name: &str,
        owner: u64,
        user: u64,
    ) -> Result<Removal, StoreError> {
        let mut inner = self.inner();
        let Some(group) = inner.groups.get_mut(name) else {
            return Ok(Removal::NoGroup);
        };
        if !group.owned_by(owner) {
            return Ok(Removal::NotOwner);
        }
        if user == owner {
            return Ok(Removal::NotMember);
        }
        let uninvited = group.invited.remove(&user);
        let removed = group.members.remove(&user);
        inner.uninvite(user, name);
        if !removed {
            return Ok(if uninvited {
                Removal::Uninvited
            } else {
                Removal::NotMember
            });
        }
        if let Some(groups) = inner.memberships.get_mut(&user) {
            groups.remove(name);
        }
        Ok(Removal::Removed)
    }

    async fn leave_group(&self, name: &str, user: u64) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        let (was, now_empty, voided) = match inner.groups.get_mut(name) {
            Some(group) => {
                let was = group.members.remove(&user);
                // Deleted, or passed on: the invitations go either way.
                let voided = group.members.is_empty() || group.owner == user;
                if let Some(&heir) = group.members.first()
                    && group.owner == user
                {
                    group.owner = heir;
                }
                (was, group.members.is_empty(), voided)
            }
            None => (false, false, false),
        };
        if voided {
            inner.void_invitations(name);
        }
        if now_empty {
            inner.groups.remove(name);
        }
        if let Some(groups) = inner.memberships.get_mut(&user) {
            groups.remove(name);
        }
        Ok(was)
    }

    async fn decline_invitation(&self, name: &str, user: u64) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        let declined = inner
            .groups
            .get_mut(name)
            .is_some_and(|group| group.invited.remove(&user));
        inner.uninvite(user, name);
        Ok(declined)
    }

    async fn group_info(&self, name: &str) -> Result<Option<GroupInfo>, StoreError> {
        Ok(self.inner().groups.get(name).map(|group| GroupInfo {
            owner: group.owner,
            invite_only: group.invite_only,
        }))
    }

    async fn group_members(&self, name: &str) -> Result<Option<Vec<u64>>, StoreError> {
        Ok(self
            .inner()
            .groups
            .get(name)
            .map(|group| group.members.iter().copied().collect()))
    }

    async fn group_size(&self, name: &str) -> Result<usize, StoreError> {
        Ok(self
            .inner()
            .groups
            .get(name)
            .map_or(0, |group| group.members.len()))
    }

    async fn user_invitations(&self, user: u64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .inner()
            .invitations
            .get(&user)
            .map(|g| g.iter().take(MAX_INVITATIONS_LISTED).cloned().collect())
            .unwrap_or_default())
    }

    async fn last_seen(&self, user: u64) -> Result<Option<u64>, StoreError> {
        Ok(self.inner().last_seen.get(&user).copied())
    }

    async fn statuses(&self, users: &[u64]) -> Result<Vec<Option<String>>, StoreError> {
        let inner = self.inner();
        Ok(users
            .iter()
            .map(|u| inner.statuses.get(u).cloned())
            .collect())
    }

    async fn set_status(&self, user: u64, status: Option<&str>) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        if !inner.accounts.contains_key(&user) {
            return Ok(false);
        }
        match status {
            Some(status) => inner.statuses.insert(user, status.to_string()),
            None => inner.statuses.remove(&user),
        };
        Ok(true)
    }

    async fn hidden(&self, users: &[u64], what: Privacy) -> Result<Vec<bool>, StoreError> {
        let mut inner = self.inner();
        let hiding = inner.hiding(what);
        Ok(users.iter().map(|u| hiding.contains(u)).collect())
    }

    async fn set_hidden(&self, user: u64, what: Privacy, hidden: bool) -> Result<(), StoreError> {
        let mut inner = self.inner();
        let hiding = inner.hiding(what);
        if hidden {
            hiding.insert(user);
        } else {
            hiding.remove(&user);
        }
        Ok(())
    }

    async fn add_read_receipt(
        &self,
        sender: u64,
        receipt: &ReadReceipt,
        cap: usize,
    ) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        if inner.hiding_read_receipts.contains(&sender) {
            return Ok(false);
        }
        let kept = inner.read_receipts.entry(sender).or_default();
        match kept.get(&receipt.reader) {
            Some(old) if old.up_to_msg_id >= receipt.up_to_msg_id => return Ok(false),
            Some(_) => {}
            None if kept.len() >= cap.max(1) => {
                // The one read longest ago; of those read at once, the lowest reader id (as
                // on Redis).
                let longest_ago = kept.values().min_by_key(|r| (r.at_ms, r.reader));
                if let Some(reader) = longest_ago.map(|r| r.reader) {
                    kept.remove(&reader);
                }
            }
            None => {}
        }
        kept.insert(receipt.reader, *receipt);
        Ok(true)
    }

    async fn read_receipts(&self, sender: u64) -> Result<Vec<ReadReceipt>, StoreError> {
        Ok(self
            .inner()
            .read_receipts
            .get(&sender)
            .map(|kept| kept.values().copied().collect())
            .unwrap_or_default())
    }

    async fn block_user(&self, user: u64, other: u64, cap: usize) -> Result<Block, StoreError> {
        let mut inner = self.inner();
        let blocked = inner.blocked.entry(user).or_default();
        Ok(if blocked.contains(&other) {
            Block::AlreadyBlocked
        } else if blocked.len() >= cap {
            Block::Full
        } else {
            blocked.insert(other);
            Block::Blocked
        })
    }

    async fn unblock_user(&self, user: u64, other: u64) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        let Some(blocked) = inner.blocked.get_mut(&user) else {
            return Ok(false);
        };
        let was = blocked.remove(&other);
        if blocked.is_empty() {
            inner.blocked.remove(&user);
        }
        Ok(was)
    }

    async fn blocking(&self, users: &[u64], other: u64) -> Result<Vec<bool>, StoreError> {
        let inner = self.inner();
        Ok(users
            .iter()
            .map(|user| {
                inner
                    .blocked
                    .get(user)
                    .is_some_and(|blocked| blocked.contains(&other))
            })
            .collect())
    }

    async fn blocked_users(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        Ok(self
            .inner()
            .blocked
            .get(&user)
            .map(|blocked| blocked.iter().copied().collect())
            .unwrap_or_default())
    }

    async fn add_report(
        &self,
        report: &Report,
        cap: usize,
        once_per: Duration,
    ) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        let now = Instant::now();
        let pair = (report.reporter_id, report.reported_id);
        if inner.reported.get(&pair).is_some_and(|until| *until > now) {
            return Ok(false);
        }
        // Pairs whose time is up go (at least as many kept as reports).
        let inner = &mut *inner;
        let live = |until: &Instant| *until > now;
        sweep_when_doubled(&mut inner.reported, &mut inner.reported_sweep_at, cap, live);
        inner.reported.insert(pair, now + once_per);
        inner.reports.push_front(report.clone());
        inner.reports.truncate(cap);
        Ok(true)
    }

    async fn reports(&self, limit: usize) -> Result<Vec<Report>, StoreError> {
        Ok(self.inner().reports.iter().take(limit).cloned().collect())
    }

    async fn user_groups(&self, user: u64) -> Result<Vec<String>, StoreError> {
        Ok(self
            .inner()
            .memberships
            .get(&user)
            .map(|g| g.iter().cloned().collect())
            .unwrap_or_default())
    }

    async fn claim_id_node(
        &self,
        owner: &str,
        first: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<Option<IdNode>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        let free = (0..ID_NODES)
            .map(|i| (first % ID_NODES + i) % ID_NODES)
            .find(|n| inner.id_nodes.get(n).is_none_or(|h| h.expires <= now));
        let Some(node) = free else {
            return Ok(None);
        };
        let previous = inner.id_nodes.get(&node).map_or(0, |h| h.issued_until_ms);
        let hold = IdNodeHold {
            owner: owner.to_string(),
            expires: now + lease,
            // The new holder's ids start after the old one's: the later bound stays.
            issued_until_ms: issue_until_ms.max(previous),
        };
        inner.id_nodes.insert(node, hold);
        Ok(Some(IdNode {
            node,
            issued_until_ms: previous,
        }))
    }

    async fn renew_id_node(
        &self,
        owner: &str,
        node: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        let hold = inner.id_nodes.entry(node).or_insert_with(|| IdNodeHold {
            owner: owner.to_string(),
            expires: now,
            issued_until_ms: 0,
        });
        if hold.owner != owner {
            return Ok(false);
        }
        hold.expires = now + lease;
        hold.issued_until_ms = hold.issued_until_ms.max(issue_until_ms);
        Ok(true)
    }

    async fn release_id_node(&self, owner: &str, node: u16) -> Result<(), StoreError> {
        let now = Instant::now();
        if let Some(hold) = self.inner().id_nodes.get_mut(&node)
            && hold.owner == owner
        {
            hold.expires = now;
        }
        Ok(())
    }

    async fn remove_server_routes(&self, server_id: &str) -> Result<Vec<u64>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        let Inner {
            routes,
            online,
            last_seen,
            ..
        } = &mut *inner;
        let mut removed = Vec::new();
        routes.retain(|user, lease| {
            if lease.route.server_id != server_id {
                return true;
            }
            online.remove(user);
            // Users whose lease had lapsed were offline already (as on Redis, where the key
            // is gone): they are not announced offline again.
            if lease.expires > now {
                removed.push(*user);
                see(last_seen, *user);
            }
            false
        });
        Ok(removed)
    }
}

/// Records `user` as seen now, unless a later time is recorded.
fn see(last_seen: &mut HashMap<u64, u64>, user: u64) {
    let at = last_seen.entry(user).or_default();
    *at = (*at).max(cim_core::now_ms());
}

/// Drops entries up to `up_to`. Their msg-id records stay until [`InboxLimits::dedup`] passes: a
/// sender may resend (same id) after the recipient has the message and acked it.
fn trim(inbox: &mut Inbox, up_to: u64) {
    while inbox.entries.front().is_some_and(|(seq, _)| *seq <= up_to) {
        inbox.entries.pop_front();
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn route(server: &str, session: u64) -> Route {
        Route {
            server_id: server.into(),
            session_id: session,
            confirmed: false,
        }
    }

    const LEASE: Duration = Duration::from_secs(30);
    /// How long the logins a claim replaces stay revoked, in these tests.
    const REPLACED_FOR: Duration = Duration::from_secs(3600);

    #[tokio::test]
    async fn names_are_unique() {
        let store = MemoryStore::new();
        let a = store.create_account("alice", "h").await.unwrap();
        assert!(matches!(
            store.create_account("alice", "x").await,
            Err(StoreError::NameTaken)
        ));
        let b = store.create_account("bob", "h").await.unwrap();
        assert_ne!(a.id, b.id);
        assert_eq!(store.account_by_name("bob").await.unwrap(), Some(b));
    }

    /// A store with accounts 1 to `n` (only an account gets a route).
    async fn with_accounts(n: u64) -> MemoryStore {
        let store = MemoryStore::new();
        for i in 1..=n {
            let account = store
                .create_account(&format!("user{i}"), "h")
                .await
                .unwrap();
            assert_eq!(account.id, i);
        }
        store
    }

    #[tokio::test]
    async fn second_claim_is_busy_unless_forced_and_stale_sessions_cannot_confirm() {
        let store = with_accounts(2).await;
        assert_eq!(
            store
                .claim_route(1, route("s1", 10), LEASE, false, REPLACED_FOR)
                .await
                .unwrap(),
            Claim::Won {
                previous: None,
                last_login: None
            }
        );
        assert!(matches!(
            store
                .claim_route(1, route("s2", 11), LEASE, false, REPLACED_FOR)
                .await
                .unwrap(),
            Claim::Busy(_)
        ));
        assert!(store.confirm_route(1, 10, "s1", LEASE).await.unwrap());
        assert_eq!(store.online_users().await.unwrap(), vec![1]);

        let Claim::Won {
            previous,
            last_login,
        } = store
            .claim_route(1, route("s2", 11), LEASE, true, REPLACED_FOR)
            .await
            .unwrap()
        else {
            panic!("forced claim must win");
        };
        assert_eq!(previous.unwrap().session_id, 10);
        assert_eq!(last_login, Some(10));
        // The replaced session can neither confirm nor release the new route.
        assert!(!store.confirm_route(1, 10, "s1", LEASE).await.unwrap());
        assert!(!store.release_route(1, 10, Some("s1")).await.unwrap());
        assert!(!store.release_route(1, 10, None).await.unwrap());
        assert!(store.confirm_route(1, 11, "s2", LEASE).await.unwrap());
        assert!(store.release_route(1, 11, None).await.unwrap());
        assert!(store.online_users().await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn unconfirmed_claims_lapse() {
        let store = with_accounts(2).await;
        store
            .claim_route(
                1,
                route("s1", 10),
                Duration::from_secs(5),
                false,
                REPLACED_FOR,
            )
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            store
                .claim_route(1, route("s1", 11), LEASE, false, REPLACED_FOR)
                .await
                .unwrap(),
            Claim::Won {
                previous: None,
                last_login: Some(10)
            },
            "the lapsed claim's login is still the last one"
        );
    }

    fn entry(msg_id: u64, at: u64) -> InboxEntry {
        InboxEntry {
            msg_id,
            from_user: 9,
            from_name: "bob".into(),
            group: String::new(),
            body: format!("m{msg_id}"),
            created_at_ms: at,
            unsends: None,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn append_records_expire_even_in_an_inbox_that_gets_nothing_more() {
        let store = MemoryStore::new();
        let limits = InboxLimits::default();
        store
            .append_inbox(&[1], &entry(100, 5), limits)
            .await
            .unwrap();
        tokio::time::advance(limits.dedup).await;
        // Any later append prunes every inbox's expired records, not only its own.
        store
            .append_inbox(&[2], &entry(101, 6), limits)
            .await
            .unwrap();
        let inner = store.inner();
        assert_eq!(
            (inner.appended.len(), inner.appended.weight()),
            (1, 1 + RECORD_OVERHEAD_PAIRS)
        );
    }

    #[tokio::test]
    async fn entries_past_the_inbox_ttl_go_when_later_ones_come() {
        let store = MemoryStore::new();
        let limits = InboxLimits::default();
        let ttl = limits.ttl.as_millis() as u64;
        for (msg_id, at) in [(1, 1_000), (2, 2_000), (3, 1_500 + ttl)] {
            store
                .append_inbox(&[1], &entry(msg_id, at), limits)
                .await
                .unwrap();
        }
        let kept: Vec<u64> = store.inner().inboxes[&1]
            .entries
            .iter()
            .map(|(seq, _)| *seq)
            .collect();
        assert_eq!(kept, [2, 3]);
    }

    #[tokio::test]
    async fn an_append_to_no_one_keeps_no_record() {
        let store = MemoryStore::new();
        let limits = InboxLimits::default();
        let seqs = store.append_inbox(&[], &entry(100, 5), limits).await;
        assert!(seqs.unwrap().is_empty());
        assert_eq!(store.inner().appended.len(), 0);
    }

    #[tokio::test]
    async fn inbox_sequences_are_per_user_gapless_and_idempotent() {
        let store = MemoryStore::new();
        let limits = InboxLimits::default();
        assert_eq!(
            store
                .append_inbox(&[1, 2], &entry(100, 5), limits)
                .await
                .unwrap(),
            vec![1, 1]
        );
        assert_eq!(
            store
                .append_inbox(&[1], &entry(101, 5), limits)
                .await
                .unwrap(),
            vec![2]
        );
        // The same message again keeps its sequence numbers.
        assert_eq!(
            store
                .append_inbox(&[1, 2], &entry(100, 5), limits)
                .await
                .unwrap(),
            vec![1, 1]
        );
        assert_eq!(
            store
                .append_inbox(&[2], &entry(102, 5), limits)
                .await
                .unwrap(),
            vec![2]
        );

        let page = store.fetch_inbox(1, 0, 0, 10, limits, 10).await.unwrap();
        let seqs: Vec<u64> = page.entries.iter().map(|(s, _)| *s).collect();
        assert_eq!((seqs, page.more), (vec![1, 2], false));
        let page = store.fetch_inbox(1, 0, 0, 1, limits, 10).await.unwrap();
        assert!(page.more);
        // Fetching after 1 trims entry 1 for good.
        store.fetch_inbox(1, 1, 1, 10, limits, 10).await.unwrap();
        assert_eq!(
            store
                .fetch_inbox(1, 0, 0, 10, limits, 10)
                .await
                .unwrap()
                .entries
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn inboxes_are_capped_in_length_and_age_and_trimmed_on_ack() {
        let store = MemoryStore::new();
        let limits = InboxLimits {
            max_len: 3,
            ttl: Duration::from_millis(100),
            ..Default::default()
        };
        for id in 0..5 {
            store
                .append_inbox(&[1], &entry(id, 1000 + id * 30), limits)
                .await
                .unwrap();
        }
        let page = store.fetch_inbox(1, 0, 0, 10, limits, 1170).await.unwrap();
        let seqs: Vec<u64> = page.entries.iter().map(|(s, _)| *s).collect();
        // Length cap keeps 3..=5; the age cap drops 3 (created at 1060, older than 1170-100).
        assert_eq!(seqs, vec![4, 5]);
        store.trim_inbox(&[(1, 4)]).await.unwrap();
        let page = store.fetch_inbox(1, 0, 0, 10, limits, 1170).await.unwrap();
        assert_eq!(
            page.entries.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            vec![5]
        );
    }

    #[tokio::test]
    async fn message_ids_are_stable_per_client_message() {
        let store = MemoryStore::new();
        let ttl = Duration::from_secs(60);
        assert_eq!(
            store.message_id(1, 7, 9, 100, ttl).await.unwrap(),
            Some(100)
        );
        assert_eq!(
            store.message_id(1, 7, 9, 200, ttl).await.unwrap(),
            Some(100)
        );
        assert_eq!(store.message_id(1, 7, 8, 200, ttl).await.unwrap(), None);
        assert_eq!(
            store.message_id(2, 7, 8, 300, ttl).await.unwrap(),
            Some(300)
        );
    }

    #[tokio::test]
    async fn removing_a_server_drops_its_routes_only() {
        let store = with_accounts(2).await;
        store
            .claim_route(1, route("s1", 10), LEASE, false, REPLACED_FOR)
            .await
            .unwrap();
        store
            .claim_route(2, route("s2", 20), LEASE, false, REPLACED_FOR)
            .await
            .unwrap();
        store.confirm_route(1, 10, "s1", LEASE).await.unwrap();
        store.confirm_route(2, 20, "s2", LEASE).await.unwrap();
        assert_eq!(store.remove_server_routes("s1").await.unwrap(), vec![1]);
        assert_eq!(store.online_users().await.unwrap(), vec![2]);
    }
}
