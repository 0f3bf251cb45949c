//! The router's state behind one trait: accounts, routes (user -> server session) with leases,
//! the online set, per-user inboxes (sequence-numbered, capped in length and age), groups, and
//! the users each user blocks. The in-memory store serves the embedded mode and unit tests;
//! the Redis store serves clusters.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;

mod expiring;
mod memory;
mod redis;

pub use self::redis::{FoldedNames, RedisStore};
pub use memory::MemoryStore;

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Unique numeric id, assigned at registration.
    pub id: u64,
    /// Unique name chosen at registration.
    pub name: String,
    /// Argon2 PHC string.
    pub password_hash: String,
}

/// Where a user's session lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Server holding (or about to hold) the session.
    pub server_id: String,
    /// Login this route belongs to.
    pub session_id: u64,
    /// Whether the server has confirmed the session is open (until then it is a pending
    /// claim from an HTTP login).
    pub confirmed: bool,
}

/// Drops the entries of `map` that are not `live` once it holds twice as many as the last
/// sweep left (and at least `floor`), so sweeps cost a constant per insert however many
/// entries stay live.
pub(crate) fn sweep_when_doubled<K, V>(
    map: &mut HashMap<K, V>,
    sweep_at: &mut usize,
    floor: usize,
    live: impl Fn(&V) -> bool,
) {
    if map.len() >= (*sweep_at).max(floor) {
        map.retain(|_, v| live(v));
        *sweep_at = map.len() * 2;
    }
}

/// A message stored in a recipient's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    /// cim's message id.
    pub msg_id: u64,
    /// Sender id.
    pub from_user: u64,
    /// Sender name.
    pub from_name: String,
    /// Group name, empty for a private message.
    pub group: String,
    /// Text.
    pub body: String,
    /// Acceptance time, milliseconds since the Unix epoch.
    pub created_at_ms: u64,
    /// The sender's earlier message (private, or in the same group) this entry takes back (see
    /// [`Store::append_private`]); its body is then only a note for readers that do not know.
    pub unsends: Option<u64>,
}

impl InboxEntry {
    /// The bit of a record's tag that says a reader must know the record to read the entry.
    pub const MUST_UNDERSTAND: u16 = 0x8000;
    /// The tag of the record that holds [`InboxEntry::unsends`] (8 bytes, big-endian). Not one
    /// that must be understood: a router that does not know it delivers the entry as a message
    /// whose text is the note, and the message it takes back has been replaced already.
    pub const UNSENDS: u16 = 1;

    /// Compact binary form: three big-endian u64 then three u32-length-prefixed strings, then
    /// the records (`u16` tag, `u32` length, bytes) of the fields that are set.
    pub fn encode(&self) -> Vec<u8> {
        let mut out =
            Vec::with_capacity(50 + self.from_name.len() + self.group.len() + self.body.len());
        for n in [self.msg_id, self.from_user, self.created_at_ms] {
            out.extend_from_slice(&n.to_be_bytes());
        }
        for s in [&self.from_name, &self.group, &self.body] {
            out.extend_from_slice(&(s.len() as u32).to_be_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        if let Some(unsent) = self.unsends {
            out.extend_from_slice(&Self::UNSENDS.to_be_bytes());
            out.extend_from_slice(&8u32.to_be_bytes());
            out.extend_from_slice(&unsent.to_be_bytes());
        }
        out
    }

    /// Parses [`InboxEntry::encode`]'s output. Records a later version may add after the
    /// text (each a `u16` tag, a `u32` length and that many bytes) are skipped, so that a
    /// router reads the entries of a newer one whose additions it does not know, instead of
    /// skipping them as unreadable (and their messages with them), unless the tag has
    /// [`InboxEntry::MUST_UNDERSTAND`]: such a record changes what the entry means (an
    /// edit, a deletion), and an entry misread is worse than one skipped. Bytes that are not
    /// whole records make the entry unreadable, as does a known record of the wrong length.
    pub fn decode(mut bytes: &[u8]) -> Option<Self> {
        fn u64_of(b: &mut &[u8]) -> Option<u64> {
            let (head, rest) = b.split_at_checked(8)?;
            *b = rest;
            Some(u64::from_be_bytes(head.try_into().ok()?))
        }
        fn string_of(b: &mut &[u8]) -> Option<String> {
            let (len, rest) = b.split_at_checked(4)?;
            let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
            let (s, rest) = rest.split_at_checked(len)?;
            *b = rest;
            String::from_utf8(s.to_vec()).ok()
        }
        let b = &mut bytes;
        let mut entry = InboxEntry {
            msg_id: u64_of(b)?,
            from_user: u64_of(b)?,
            created_at_ms: u64_of(b)?,
            from_name: string_of(b)?,
            group: string_of(b)?,
            body: string_of(b)?,
            unsends: None,
        };
        while !b.is_empty() {
            let (tag, rest) = b.split_at_checked(2)?;
            let tag = u16::from_be_bytes(tag.try_into().ok()?);
            let (len, rest) = rest.split_at_checked(4)?;
            let len = u32::from_be_bytes(len.try_into().ok()?) as usize;
            let (mut record, rest) = rest.split_at_checked(len)?;
            match tag {
                Self::UNSENDS if len == 8 => entry.unsends = Some(u64_of(&mut record)?),
                Self::UNSENDS => return None,
                _ if tag & Self::MUST_UNDERSTAND != 0 => return None,
                _ => {}
            }
            *b = rest;
        }
        Some(entry)
    }
}

/// Caps on each inbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxLimits {
    /// Most entries kept per user; older ones are dropped first.
    pub max_len: usize,
    /// Entries older than this are dropped.
    pub ttl: Duration,
    /// How long a sender's client message id (and so the message id it got) and each inbox's
    /// seq for a message id are remembered: a resend within it is stored once. One window for
    /// both, so a resend that keeps its message id never gets a second seq.
    pub dedup: Duration,
}

impl Default for InboxLimits {
    fn default() -> Self {
        Self {
            max_len: 1000,
            ttl: Duration::from_secs(7 * 24 * 3600),
            dedup: Duration::from_secs(600),
        }
    }
}

/// What [`Store::renew_routes`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Renewal {
    /// Users whose route belongs to another login or whose login was revoked: their sessions
    /// on the server are stale.
    pub stale: Vec<u64>,
    /// Users whose route was missing and is back: they show online again.
    pub restored: Vec<u64>,
}

/// A page of inbox entries.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InboxPage {
    /// `(seq, entry)`, oldest first.
    pub entries: Vec<(u64, InboxEntry)>,
    /// Whether entries beyond this page exist.
    pub more: bool,
}

/// Outcome of [`Store::join_group`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Join {
    /// The user is now a member.
    Joined,
    /// The user already was a member.
    AlreadyMember,
    /// The group is at its size cap.
    Full,
    /// No such group.
    NoGroup,
    /// An invite-only group, and the user has no invitation.
    InviteOnly,
}

/// Users one user may block at most ([`Store::block_user`]).
pub const MAX_BLOCKED: usize = 1_000;

/// Outcome of [`Store::block_user`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Block {
    /// The user is blocked now.
    Blocked,
    /// The user was blocked already.
    AlreadyBlocked,
    /// As many users as the cap allows are blocked already.
    Full,
}

/// Outcome of [`Store::append_private`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrivateAppend {
    /// Stored in the recipient's inbox with this sequence number; the recipient's route, read
    /// in the same step.
    Stored {
        /// The entry's sequence number in the recipient's inbox.
        seq: u64,
        /// The recipient's route, if any.
        route: Option<Route>,
        /// For an entry that unsends a message: whether that message was still in the inbox
        /// (and was replaced by the entry).
        replaced: bool,
    },
    /// No such account.
    NoUser,
    /// The recipient blocks the sender: nothing was stored.
    Blocked,
}

impl PrivateAppend {
    /// The sequence number and route of a stored entry; `None` if nothing was stored.
    pub fn stored(self) -> Option<(u64, Option<Route>)> {
        match self {
            PrivateAppend::Stored { seq, route, .. } => Some((seq, route)),
            PrivateAppend::NoUser | PrivateAppend::Blocked => None,
        }
    }
}

/// Invitations [`Store::user_invitations`] lists at most (by group name).
pub const MAX_INVITATIONS_LISTED: usize = 1_000;

/// Outcome of [`Store::invite`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invite {
    /// The user is invited now.
    Invited,
    /// The user was invited already.
    AlreadyInvited,
    /// The user is a member.
    AlreadyMember,
    /// As many invitations wait as the group may have members.
    Full,
    /// No such group.
    NoGroup,
    /// The inviter does not own the group.
    NotOwner,
}

/// Outcome of [`Store::remove_member`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    /// The user was a member and is no more.
    Removed,
    /// The user was not a member; its invitation is withdrawn.
    Uninvited,
    /// The user was neither a member nor invited.
    NotMember,
    /// No such group.
    NoGroup,
    /// The remover does not own the group.
    NotOwner,
}

/// What [`Store::group_info`] tells of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupInfo {
    /// Its owner: its creator, or the member it passed to when the owner left. Acts as owner
    /// only while a member (a group made before owners passed it on may name one who left).
    pub owner: u64,
    /// Whether only users its owner invites get in.
    pub invite_only: bool,
}

/// Outcome of [`Store::claim_route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The claim holds; `previous` is the route it replaced (takeover), if any.
    Won {
        /// Route that was overwritten.
        previous: Option<Route>,
        /// The session of the user's login granted before this one (kept per user, without
        /// expiry, whether or not its route is still there), if any: a login whose session
        /// closed left no route, and its tokens must still end now that a newer login began.
        last_login: Option<u64>,
    },
    /// Another login holds the user and takeover was not requested.
    Busy(Route),
    /// A re-login's claim found its login ended, or the user's route changed since the token
    /// was checked: nothing was claimed.
    Ended,
    /// The account was deleted (after its password or token was checked): nothing was
    /// claimed.
    NoAccount,
}

/// A user's report of another (spam, abuse), kept for the operators (the admin page).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// When it was made, ms since the Unix epoch.
    pub at_ms: u64,
    /// Who reported.
    pub reporter_id: u64,
    /// Its name then.
    pub reporter: String,
    /// Whom it reported.
    pub reported_id: u64,
    /// Its name then.
    pub reported: String,
    /// In the reporter's words (may be empty).
    pub reason: String,
}

/// Something of a user's that it may keep from others: hiding it also keeps others' from it,
/// as in the common messengers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Privacy {
    /// When it was last seen (a lookup by name shows it offline without a time).
    LastSeen,
    /// That it read a user's messages.
    ReadReceipts,
}

/// A reader's word that it read a user's private messages up to one of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadReceipt {
    /// Who read.
    pub reader: u64,
    /// The latest message it read (message ids grow with time, roughly: see `ids`).
    pub up_to_msg_id: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// Most readers whose receipts are kept for one user; a new reader's pushes out the one read
/// longest ago.
pub const MAX_READ_RECEIPTS: usize = 1_000;

/// Outcome of [`Store::transfer_group`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// The user owns the group now.
    Transferred,
    /// The user is not a member.
    NotMember,
    /// The caller does not own the group.
    NotOwner,
    /// No such group.
    NoGroup,
}

/// What [`Store::delete_account`] deleted, for the caller to finish with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedAccount {
    /// The account's name (free again).
    pub name: String,
    /// The groups the user was in, sorted: it is still in their member sets.
    pub groups: Vec<String>,
    /// The groups whose invitations may have waited for the user, sorted.
    pub invitations: Vec<String>,
}

/// Why a login ended, as its revocation records it: a client whose token is refused falls back
/// to its password only when the login was not replaced by another one, so a device that was
/// away does not take the user back from the newer login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revocation {
    /// Logged out.
    LoggedOut,
    /// Another login of the user took over.
    Replaced,
    /// Its token logged in again (a new login began).
    ReLoggedIn,
    /// Ended by a router that did not record why.
    Unrecorded,
}

impl Revocation {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Revocation::LoggedOut => "logout",
            Revocation::Replaced => "replaced",
            Revocation::ReLoggedIn => "relogin",
            Revocation::Unrecorded => "1",
        }
    }

    /// Reads the stored form; anything else was written without a reason.
    pub fn parse(stored: &str) -> Self {
        match stored {
            "logout" => Revocation::LoggedOut,
            "replaced" => Revocation::Replaced,
            "relogin" => Revocation::ReLoggedIn,
            _ => Revocation::Unrecorded,
        }
    }
}

/// What a token re-login's claim ([`Store::claim_route_relogin`]) ends and expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relogin {
    /// The login the token belongs to: it must not have ended, and ends with the claim.
    pub session_id: u64,
    /// Session of the user's route when the token was checked (`None`: no readable route);
    /// the claim fails if the route has changed since.
    pub seen_route_session: Option<u64>,
    /// How long the ended login stays revoked (the rest of its newest token's life).
    pub revoke_for: Duration,
}

/// Number of node numbers in message ids (10 bits): at most this many routers hold one at once.
pub const ID_NODES: u16 = 1024;

/// A router's hold on a node number of message ids ([`Store::claim_id_node`]). Two routers that
/// issued ids with one node number could issue the same id, and a recipient's inbox takes a
/// second message with an id it has seen for a resend: acknowledged, never stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdNode {
    /// The node number, below [`ID_NODES`].
    pub node: u16,
    /// The latest time (ms since the Unix epoch) any earlier holder of this node may have put
    /// in an id: the new holder's ids must come after it, even if its clock is behind theirs.
    pub issued_until_ms: u64,
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Registration of a name that exists.
    #[error("user name is taken")]
    NameTaken,
    /// The backend could not be reached or failed.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Stored data could not be understood.
    #[error("corrupt store entry: {0}")]
    Corrupt(String),
}

/// Accounts, routes and online state.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Creates an account with a fresh id; fails with [`StoreError::NameTaken`] if the name,
    /// in any case, is an account's (`Alice` when `alice` exists; a name left naming a
    /// deleted account, by a deletion that stopped before freeing it, is taken over).
    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError>;
    /// Looks up an account by name: the one with the name as given, or else the one whose
    /// name differs only in case.
    async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError>;
    /// Replaces `user`'s password hash with `new_hash` if it is still `expected` (what the old
    /// password was checked against). Returns whether it did: two changes at once cannot
    /// both pass on one old password.
    async fn set_password_hash(
        &self,
        user: u64,
        expected: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError>;
    /// Whether an account with this id exists (cheaper than fetching it; used per message).
    async fn user_exists(&self, id: u64) -> Result<bool, StoreError>;
    /// Looks up accounts by id; missing ids are skipped.
    async fn accounts_by_id(&self, ids: &[u64]) -> Result<Vec<Account>, StoreError>;
    /// Deletes `user`'s account with what is kept for it alone (its inbox, blocks, last seen,
    /// its lists of groups and invitations), in one step that also revokes its latest login
    /// (as logged out, for `revoke_for`: a login that claimed its route before the step ends
    /// with it, whatever became of its route): from then on no private append stores for
    /// it, no claim gives it a route and no token of it calls the API or renews a route.
    /// Its name is free again (unless it names someone else by then). Its route, its
    /// groups' member sets and their invitations are the caller's to end: it gets the groups
    /// and invitations the lists held. `None` if there was no such account.
    async fn delete_account(
        &self,
        user: u64,
        revoke_for: Duration,
    ) -> Result<Option<DeletedAccount>, StoreError>;

    /// Atomically claims `user`'s route for a new login. Without `force`, an existing route
    /// makes the claim fail with [`Claim::Busy`]; with it, the route is replaced. A claim that
    /// the server does not confirm within `pending_lease` lapses. A won claim also ends, in
    /// the same step, the logins it replaces (the replaced route's session and the user's
    /// last login, see [`Claim::Won`]): revoked as [`Revocation::Replaced`] for
    /// `replaced_for`, so a claim whose answer is lost leaves none of them live. A user
    /// without an account (deleted after its password or token was checked) gets
    /// [`Claim::NoAccount`], and nothing is claimed.
    async fn claim_route(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
        replaced_for: Duration,
    ) -> Result<Claim, StoreError>;
    /// A token re-login's claim: [`Store::claim_route`] with takeover that, in the same
    /// atomic step, also ends the login the token belongs to (as [`Store::revoke_session`] would),
    /// and claims nothing ([`Claim::Ended`]) if that login has ended already or the user's
    /// route is no longer the one the router checked the token against. Of two re-logins
    /// with one token, one wins; a password login in between is not taken over.
    async fn claim_route_relogin(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        replaced_for: Duration,
        relogin: &Relogin,
    ) -> Result<Claim, StoreError>;
    /// Marks the route as confirmed (session open) and the user online, if the route still
    /// belongs to `session_id` on `server_id` and the session was not revoked, and records the
    /// user as seen. Returns whether it did.
    async fn confirm_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// Marks a login as ended (logged out, replaced by another login, or re-logged in with
    /// its token: `why`) for `ttl` (the rest of its newest token's life), so its token cannot
    /// bring the session back.
    async fn revoke_session(
        &self,
        user: u64,
        session_id: u64,
        ttl: Duration,
        why: Revocation,
    ) -> Result<(), StoreError>;
    /// Whether and why [`Store::revoke_session`] (or a re-login's claim) ended this login.
    async fn revocation(
        &self,
        user: u64,
        session_id: u64,
    ) -> Result<Option<Revocation>, StoreError>;
    /// The session id of `user`'s latest login (the last route claim), kept with no expiry.
    async fn last_login(&self, user: u64) -> Result<Option<u64>, StoreError>;
    /// Removes the route and online entry if they still belong to `session_id`, and, given
    /// `server_id`, if the route is on that server, recording the user as seen: a server's close report releases only a
    /// route to itself (a logout, without `server_id`, releases the route wherever it is).
    async fn release_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: Option<&str>,
    ) -> Result<bool, StoreError>;
    /// Current routes of `users`, in the same order; a route that cannot be read counts as
    /// none (and is logged).
    async fn routes(&self, users: &[u64]) -> Result<Vec<Option<Route>>, StoreError>;
    /// Ids of users with a confirmed session.
    async fn online_users(&self) -> Result<Vec<u64>, StoreError>;
    /// Renews the leases of sessions open on `server_id`, given as `(user, session_id)`. A
    /// session whose route is missing (lapsed, or removed while the server was out of
    /// discovery) gets it back, confirmed. Says which sessions are stale (another login holds
    /// the user, or the login was revoked) and which routes came back.
    async fn renew_routes(
        &self,
        server_id: &str,
        sessions: &[(u64, u64)],
        lease: Duration,
    ) -> Result<Renewal, StoreError>;
    /// Removes every route on `server_id` (the server is gone), recording their users as seen.
    /// Returns the users affected.
    async fn remove_server_routes(&self, server_id: &str) -> Result<Vec<u64>, StoreError>;

    /// The message id of `sender`'s message `client_msg_id`: the one recorded by an earlier
    /// attempt, or else `new_msg_id`, which is recorded for `ttl` with the message's
    /// `fingerprint` (its target and body, [`crate::service::send_fingerprint`]). Makes sends
    /// idempotent. `None` when `client_msg_id` is recorded for a message with another
    /// fingerprint: the sender reused the id for a different message, which must not be
    /// taken for a retry (acked and dropped). A record without a fingerprint (written before
    /// they were kept) counts as the same message.
    async fn message_id(
        &self,
        sender: u64,
        client_msg_id: u64,
        fingerprint: u64,
        new_msg_id: u64,
        ttl: Duration,
    ) -> Result<Option<u64>, StoreError>;
    /// Appends `entry` to each recipient's inbox with that recipient's next sequence number,
    /// once per message id: appending the same message again returns the sequence number it
    /// already has. Returns the sequence numbers in `recipients` order. `recipients` names each
    /// user at most once (a group's members, the users online). An entry that unsends a group
    /// message first takes its place in each inbox that still holds it, as
    /// [`Store::append_private`] says (a message of the same sender, id and group), but only
    /// by the seq its append record names: members' inboxes are not scanned.
    async fn append_inbox(
        &self,
        recipients: &[u64],
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<Vec<u64>, StoreError>;
    /// A private message's storage in one step: if account `to` exists and does not block
    /// the entry's sender, appends `entry` to its inbox like [`Store::append_inbox`] and
    /// returns the entry's sequence number with the recipient's route, read in the same step.
    /// A resend of a message stored before a block keeps its sequence number (it was stored,
    /// and its answer must say so); nothing else from a blocked sender is stored.
    ///
    /// An entry that [unsends](InboxEntry::unsends) a message of its sender's first takes that
    /// message's place in the inbox, if it is still there (neither trimmed nor capped out; a
    /// message of that id from anyone else, or in a group, is left alone) and found: by the
    /// seq its append record names while that lasts (the dedup window), else by a scan from
    /// the newest entry back that stops at entries stored well before the message and, on
    /// Redis, reads at most 1 MiB. A recipient who has not had a message found so never does;
    /// then the entry is appended like any other, for a recipient who had it already.
    async fn append_private(
        &self,
        to: u64,
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<PrivateAppend, StoreError>;
    /// Up to `limit` entries of `user` after `after_seq`, oldest first, skipping entries older
    /// than the limits allow. Entries up to `trim_up_to` are trimmed first (the client's
    /// application is done with them; callers pass at most `after_seq`).
    async fn fetch_inbox(
        &self,
        user: u64,
        after_seq: u64,
        trim_up_to: u64,
        limit: usize,
        limits: InboxLimits,
        now_ms: u64,
    ) -> Result<InboxPage, StoreError>;
    /// Trims each `(user, up_to)` inbox of entries up to `up_to` (acknowledged by the client).
    async fn trim_inbox(&self, acked: &[(u64, u64)]) -> Result<(), StoreError>;
    /// If `user`'s inbox holds no entries: the last sequence number it ever gave out (0 if
    /// none), read in the same instant as the inbox was seen empty. `None` while entries wait.
    async fn inbox_caught_up_to(&self, user: u64) -> Result<Option<u64>, StoreError>;
    /// The last sequence number each of `users`' inboxes gave out (0 if none), in the same
    /// order: whatever was stored for them up to now lies at or below it.
    async fn inbox_heads(&self, users: &[u64]) -> Result<Vec<u64>, StoreError>;

    /// Creates group `name` owned by `owner`, who becomes its first member; only members its
    /// owner invites get into an `invite_only` one. Returns false if the name is taken, in any
    /// case (ASCII letters): names are unique whatever their case, though each group is found
    /// by its name as made. On Redis two creations of one name in two cases at the same
    /// instant may both pass, and a group made before this has no claim on its name in other
    /// cases until `--fold-names` gives it one.
    async fn create_group(
        &self,
        name: &str,
        owner: u64,
        invite_only: bool,
    ) -> Result<bool, StoreError>;
    /// Adds `user` to `name` unless the group has `cap` members already, or is invite-only
    /// and `user` has no invitation. An invitation is used up by the join.
    async fn join_group(&self, name: &str, user: u64, cap: usize) -> Result<Join, StoreError>;
    /// `owner` invites `user` to `name` (any group it owns and is a member of), unless `cap`
    /// invitations wait already.
    async fn invite(
        &self,
        name: &str,
        owner: u64,
        user: u64,
        cap: usize,
    ) -> Result<Invite, StoreError>;
    /// `owner` hands group `name` to `user`, one of its members (itself: nothing changes);
    /// `owner` stays a member, and the invitations are void, as when an owner leaves (the new
    /// owner could not see them).
    async fn transfer_group(
        &self,
        name: &str,
        owner: u64,
        user: u64,
    ) -> Result<Transfer, StoreError>;
    /// `owner` removes `user` (another member: an owner leaves) from `name`, and withdraws
    /// an invitation of theirs.
    async fn remove_member(&self, name: &str, owner: u64, user: u64)
    -> Result<Removal, StoreError>;
    /// Removes `user` from `name`; a group whose last member left is deleted with its
    /// invitations (its name can be taken again), and one whose owner left passes to the
    /// member with the lowest id, without the old owner's invitations.
    /// Returns whether it was a member.
    async fn leave_group(&self, name: &str, user: u64) -> Result<bool, StoreError>;
    /// `user` declines its invitation to `name`. Returns whether one waited.
    async fn decline_invitation(&self, name: &str, user: u64) -> Result<bool, StoreError>;
    /// The owner of `name` and whether it is invite-only; `None` if there is no such group.
    async fn group_info(&self, name: &str) -> Result<Option<GroupInfo>, StoreError>;
    /// Members of `name`, sorted; `None` if there is no such group.
    async fn group_members(&self, name: &str) -> Result<Option<Vec<u64>>, StoreError>;
    /// How many members `name` has (0 if there is no such group), without reading them.
    async fn group_size(&self, name: &str) -> Result<usize, StoreError>;
    /// Groups `user` belongs to, sorted.
    async fn user_groups(&self, user: u64) -> Result<Vec<String>, StoreError>;
    /// Groups whose invitations wait for `user`, sorted, at most [`MAX_INVITATIONS_LISTED`].
    async fn user_invitations(&self, user: u64) -> Result<Vec<String>, StoreError>;

    /// When `user` was last seen (ms since the Unix epoch), if recorded: the latest of its
    /// route's confirmations and releases (by [`Store::confirm_route`],
    /// [`Store::release_route`] and [`Store::remove_server_routes`], in the same step as the
    /// route change, so an older time never replaces a newer one). A route whose lease lapsed
    /// leaves the time of its login.
    async fn last_seen(&self, user: u64) -> Result<Option<u64>, StoreError>;

    /// For each of `users`, in order, the status it set (a line about itself), if any.
    async fn statuses(&self, users: &[u64]) -> Result<Vec<Option<String>>, StoreError>;
    /// `user` sets its status, or clears it (`None`); in one step with a check that the
    /// account exists (a status is kept with the account, and goes with it). Returns false if
    /// there is no such account.
    async fn set_status(&self, user: u64, status: Option<&str>) -> Result<bool, StoreError>;

    /// For each of `users`, in order, whether it hides `what`.
    async fn hidden(&self, users: &[u64], what: Privacy) -> Result<Vec<bool>, StoreError>;
    /// `user` hides (or shows again) `what`.
    async fn set_hidden(&self, user: u64, what: Privacy, hidden: bool) -> Result<(), StoreError>;

    /// Keeps `receipt` for `sender` (whose messages it is about) in place of an older one from
    /// the same reader, and keeps at most `cap` readers' (the one read longest ago goes).
    /// Returns false, keeping nothing, when `sender` hides [`Privacy::ReadReceipts`] or holds
    /// a receipt from the reader that is as far on already.
    async fn add_read_receipt(
        &self,
        sender: u64,
        receipt: &ReadReceipt,
        cap: usize,
    ) -> Result<bool, StoreError>;
    /// The receipts kept for `sender`, in no order.
    async fn read_receipts(&self, sender: u64) -> Result<Vec<ReadReceipt>, StoreError>;

    /// `user` blocks `other`: `other`'s private messages to `user` are refused from now on
    /// (and so are its group invitations, by the service), unless `cap` users are blocked
    /// already.
    async fn block_user(&self, user: u64, other: u64, cap: usize) -> Result<Block, StoreError>;
    /// `user` unblocks `other`. Returns whether it was blocked.
    async fn unblock_user(&self, user: u64, other: u64) -> Result<bool, StoreError>;
    /// Whether `user` blocks `other`.
    async fn blocks(&self, user: u64, other: u64) -> Result<bool, StoreError> {
        Ok(self.blocking(&[user], other).await?.first() == Some(&true))
    }
    /// For each of `users`, in order, whether it blocks `other` (a broadcast's recipients).
    async fn blocking(&self, users: &[u64], other: u64) -> Result<Vec<bool>, StoreError>;
    /// The users `user` blocks, sorted.
    async fn blocked_users(&self, user: u64) -> Result<Vec<u64>, StoreError>;

    /// Keeps `report`, newest first, and at most `cap` reports (the oldest go), unless its
    /// reporter reported the same user within `once_per` (then it keeps nothing). Returns
    /// whether it kept the report.
    async fn add_report(
        &self,
        report: &Report,
        cap: usize,
        once_per: Duration,
    ) -> Result<bool, StoreError>;
    /// The newest `limit` reports, newest first (an unreadable one is skipped).
    async fn reports(&self, limit: usize) -> Result<Vec<Report>, StoreError>;

    /// Claims a free message-id node for `owner` (unique per router process) for `lease`,
    /// trying `first` and then the next numbers in turn. A node is free once its holder's
    /// lease has lapsed or it was released. `issue_until_ms` is the latest time the owner puts
    /// in an id before it renews; the later of it and the previous holder's stays recorded.
    /// `None` when all [`ID_NODES`] are held.
    async fn claim_id_node(
        &self,
        owner: &str,
        first: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<Option<IdNode>, StoreError>;
    /// Extends `owner`'s hold on `node` by `lease` (counted from now) and records
    /// `issue_until_ms` (the later of it and what was recorded stays). Returns false if the
    /// node is another owner's now: the hold lapsed and someone claimed it.
    async fn renew_id_node(
        &self,
        owner: &str,
        node: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<bool, StoreError>;
    /// Frees `node` if `owner` holds it (a router stopping), keeping the time its ids reached.
    async fn release_id_node(&self, owner: &str, node: u16) -> Result<(), StoreError>;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn inbox_entries_round_trip(msg_id in any::<u64>(), from in any::<u64>(), at in any::<u64>(),
                                    name in ".{0,20}", group in ".{0,20}", body in ".{0,200}") {
            let entry = InboxEntry { msg_id, from_user: from, from_name: name, group, body, created_at_ms: at, unsends: None };
            prop_assert_eq!(InboxEntry::decode(&entry.encode()), Some(entry.clone()));
            let unsend = InboxEntry { unsends: Some(msg_id ^ at), ..entry };
            prop_assert_eq!(InboxEntry::decode(&unsend.encode()), Some(unsend));
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = InboxEntry::decode(&bytes);
        }

        #[test]
        fn a_later_versions_records_are_skipped(
            records in proptest::collection::vec((2u16..0x8000, proptest::collection::vec(any::<u8>(), 0..40)), 0..4),
            cut in 1usize..64,
        ) {
            let entry = InboxEntry { msg_id: 7, from_user: 2, from_name: "bob".into(), group: String::new(), body: "hi".into(), created_at_ms: 9, unsends: None };
            let mut bytes = entry.encode();
            for (tag, data) in &records {
                bytes.extend_from_slice(&tag.to_be_bytes());
                bytes.extend_from_slice(&(data.len() as u32).to_be_bytes());
                bytes.extend_from_slice(data);
            }
            prop_assert_eq!(InboxEntry::decode(&bytes), Some(entry.clone()));
            // A record cut short is no record: the entry is unreadable.
            if let Some((_, last)) = records.last() {
                let last_len = 6 + last.len();
                let cut = 1 + (cut - 1) % (last_len - 1);
                prop_assert_eq!(InboxEntry::decode(&bytes[..bytes.len() - cut]), None);
            }
            // One whose length runs past the end, and one that must be understood: unreadable.
            let mut long = entry.encode();
            long.extend_from_slice(&[0, 1, 0xff, 0xff, 0xff, 0xff, 1, 2]);
            prop_assert_eq!(InboxEntry::decode(&long), None);
            let mut must = bytes.clone();
            must.extend_from_slice(&[0x80, 0, 0, 0, 0, 0]);
            prop_assert_eq!(InboxEntry::decode(&must), None);
            // A known record of the wrong length: unreadable.
            let mut short = bytes.clone();
            short.extend_from_slice(&[0, 1, 0, 0, 0, 1, 7]);
            prop_assert_eq!(InboxEntry::decode(&short), None);
        }
    }
}
