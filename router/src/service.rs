//! What the router does, independent of how it is asked: registration, login with server
//! assignment, logout, online users, and sending (recipient resolution and fan-out with one
//! push per server). The HTTP API and the server links both call into [`Service`].

use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cim_core::limit::WindowCounter;
use cim_core::metrics::Gauge;

use cim_core::discovery::ServerInfo;
use cim_core::now_ms;
use cim_core::token::{Claims, TokenError};
use cim_proto::v1::ReadReceipt as ReadReceiptNotice;
use cim_proto::v1::{
    ChatMessage, Delivery, GroupChange, GroupInvite, GroupOwner, GroupOwnerChange, Presence,
    PullResult, Recipient, SendAck, chat_message::Target, server_control,
};
use futures_util::future::join_all;
use futures_util::{StreamExt, TryStreamExt};
use tokio::sync::watch;

use crate::RouterConfig;
use crate::ids::{self, IdGenerator};
use crate::links::{Notice, ServerLinks};
use crate::password::{self, PasswordWork, WorkError};
use crate::presence::PresenceQueue;
use crate::select::Selector;
use crate::store::{
    Account, Block, Claim, InboxEntry, Invite, Join, MAX_BLOCKED, MAX_INVITATIONS_LISTED,
    MAX_READ_RECEIPTS, Privacy, PrivateAppend, ReadReceipt, Relogin, Removal, Report, Revocation,
    Route, Store, StoreError, Transfer, sweep_when_doubled,
};

/// Errors kept for the admin page.
const RECENT_ERRORS: usize = 50;

/// A refusal or failure, as shown on the admin page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentError {
    /// When, milliseconds since the Unix epoch.
    pub at_ms: u64,
    /// Stable code.
    pub code: String,
    /// What happened.
    pub message: String,
}

/// Locks sharding group sends.
const GROUP_LOCKS: usize = 256;
/// Group member lists one presence announcement reads at once.
const PRESENCE_GROUP_READS: usize = 16;

/// A member of a group, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
    /// Whether the member has a session now.
    pub online: bool,
    /// Whether the member owns the group.
    pub owner: bool,
}

/// A user looked up by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedUser {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
    /// Whether the user has a session now.
    pub online: bool,
    /// When an offline user was last seen (ms since the Unix epoch), if recorded and neither
    /// it nor the asker hides last seen.
    pub last_seen_ms: Option<u64>,
    /// The line the user set about itself ([`Service::set_status`]), if any.
    pub status: Option<String>,
}

/// A user on a block list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockedUser {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
}

/// How [`Service::unless_deleted`] undoes a change that landed for a deleted account.
#[derive(Debug, Clone, Copy)]
enum Undo {
    /// It joined (or created) the group: it leaves.
    Leave,
    /// It was invited: the invitation is declined.
    Decline,
    /// It was handed the group: it goes back to this owner.
    HandBackTo(u64),
}

/// A reader's receipt for the caller's messages, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptView {
    /// Who read.
    pub reader: u64,
    /// Its name.
    pub name: String,
    /// The latest message of the caller's it read.
    pub up_to_msg_id: u64,
    /// When, ms since the Unix epoch.
    pub at_ms: u64,
}

/// A user's groups, by name.
#[derive(Debug, Clone, Default)]
pub struct MyGroups {
    /// The groups it is a member of.
    pub groups: Vec<String>,
    /// The groups whose invitations wait for it (at most
    /// [`crate::store::MAX_INVITATIONS_LISTED`]).
    pub invitations: Vec<String>,
}

/// Window of the login limits.
const LOGIN_WINDOW: Duration = Duration::from_secs(60);
/// Password changes and account deletions one user may try per [`LOGIN_WINDOW`], together:
/// each is an Argon2 check of the current password (and a change a hash of the new one).
pub const PASSWORD_CHECKS_PER_USER: u32 = 5;
/// How long a password change made on this router is remembered, to answer the same change
/// asked again (its answer lost) as done.
const PASSWORD_CHANGE_REMEMBERED: Duration = Duration::from_secs(600);
/// Reports the store keeps for the operators (the oldest go).
pub const MAX_REPORTS_KEPT: usize = 1_000;
/// Longest reason a report may give, in bytes.
pub const MAX_REPORT_REASON: usize = 500;
/// Reports one user may make per [`LOGIN_WINDOW`]: the list is shared and capped, and one
/// user's flood must not push everyone else's reports out of it.
const REPORTS_PER_USER: u32 = 10;
/// Longest status a user may set, in characters.
pub const MAX_STATUS_CHARS: usize = 140;
/// Read receipts one user may give per [`LOGIN_WINDOW`]: each may push a notice to the user
/// whose messages it read. A console gives at most one per peer a second.
const READ_RECEIPTS_PER_USER: u32 = 600;
/// How far past this router's clock another router's clock may be, in ms: with the
/// message-id node leases it bounds how far ahead of this clock a message's id may have been
/// issued (see [`Service::mark_read`]).
const CLOCK_SKEW_MS: u64 = 60_000;
/// How long after sending a message its sender may unsend it.
pub const UNSEND_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Unsends one user may ask for per [`LOGIN_WINDOW`]: each is stored like a message.
const UNSENDS_PER_USER: u32 = 60;
/// The text of an entry that unsends a message, for clients that do not know unsends.
pub const UNSENT_NOTE: &str = "(unsent a message)";
/// How long a read receipt's notice may take: it is best effort, as a group change's.
const RECEIPT_NOTICE_WAIT: Duration = Duration::from_secs(1);
/// How long a user's report of another is the only one kept: its repeats within it are
/// answered, not kept.
const REPORT_ONCE_PER: Duration = Duration::from_secs(24 * 3600);
/// Heirs whose accounts are gone that one owner's leave takes out of the group, at most.
const DELETED_HEIRS_PASSED: usize = 16;
/// Groups a deleted account leaves at once (and invitations it declines).
const LEAVES_AT_ONCE: usize = 16;
/// Why the session of an account being deleted ends (its `Kick`).
pub const ACCOUNT_DELETED: &str = "account deleted";
/// Window of the per-user API request limit.
const API_WINDOW: Duration = Duration::from_secs(1);
/// Token re-logins of one user per [`LOGIN_WINDOW`]. Each makes a new login, whose own token
/// may re-log in at once (its route is unconfirmed), and leaves a revocation mark for a token
/// lifetime and a kick: a chain of them at HTTPS speed left millions of marks behind. A
/// client whose new server keeps failing re-logs in a few times a minute (it backs off).
const RELOGINS_PER_USER: u32 = 30;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Limiter state stays usable even if a holder panicked: worst case a count is off.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub use cim_proto::BROADCAST_GROUP;

/// Why a request failed. Each variant maps to a stable code.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed or a field is out of range.
    #[error("{0}")]
    BadRequest(String),
    /// Registration of an existing name.
    #[error("user name is taken")]
    NameTaken,
    /// Unknown user or wrong password (deliberately not told apart).
    #[error("unknown user or wrong password")]
    InvalidCredentials,
    /// A password change whose current password is wrong.
    #[error("the current password is wrong")]
    WrongPassword,
    /// A password change that lost to another change made since its old password was checked.
    #[error("the password was changed meanwhile; try again with the new one")]
    PasswordChanged,
    /// The user is online elsewhere and takeover was not requested.
    #[error("user is already online; log in with takeover to replace that session")]
    AlreadyOnline,
    /// No server is available to take the session.
    #[error("no server available")]
    NoServer,
    /// The bearer token is missing, forged or expired.
    #[error("{0}")]
    Unauthorized(String),
    /// A re-login's token belongs to a login that has ended (logged out, or replaced by a
    /// newer login); only the password can start a new one.
    #[error("the session has ended: {0}")]
    SessionEnded(&'static str),
    /// A re-login's token belongs to a login another login of the user replaced: the client
    /// must not take the user back with its password (the newer login wins); it has been
    /// logged out.
    #[error("the user logged in elsewhere")]
    LoggedInElsewhere,
    /// A re-login's token belongs to a login still connected to a live server: a token alone
    /// cannot move a live session (a leaked one must not steal it). Retry once the session
    /// has ended (its server reports it closed, or leaves).
    #[error("the session is still connected to a live server")]
    SessionLive,
    /// The recipient does not exist.
    #[error("unknown recipient")]
    UnknownUser,
    /// The group does not exist.
    #[error("unknown group")]
    UnknownGroup,
    /// A group of that name, in any case, exists.
    #[error("group name is taken (names count no case: #Team and #team are one)")]
    GroupExists,
    /// The group is at its size cap.
    #[error("group is full")]
    GroupFull,
    /// The user is in as many groups as a user may be.
    #[error("in {0} groups already, the most a user may be in")]
    TooManyGroups(usize),
    /// The caller is not a member of the group.
    #[error("not a member of the group")]
    NotMember,
    /// A join of an invite-only group.
    #[error("the group is invite-only: join it once its owner invited you")]
    InviteOnly,
    /// An invitation, a removal or a handover by someone who does not own the group.
    #[error("only the group's owner invites, removes members and hands the group over")]
    NotOwner,
    /// A removal of a user who is neither in the group nor invited, or a handover to a user
    /// who is not a member.
    #[error("that user is not a member of the group (nor, for a removal, invited)")]
    NoSuchMember,
    /// As many invitations wait as the group may have members, or 1,000 for the user.
    #[error("too many invitations wait for an answer")]
    TooManyInvitations,
    /// A private message or a group invitation to a user who blocks its sender.
    #[error("that user does not take your messages or invitations")]
    Blocked,
    /// An unsend of a message sent longer ago than [`UNSEND_WINDOW`].
    #[error("a message can be unsent for 24 hours after it was sent")]
    TooLate,
    /// A block past the cap of users one user may block.
    #[error("{0} users blocked already, the most one user may block")]
    TooManyBlocked(usize),
    /// The body exceeds the configured limit.
    #[error("message body exceeds {0} bytes")]
    TooLarge(usize),
    /// The sender's client message id is recorded for another message (another target or
    /// body) within the dedup window: taking it for a retry would ack a message never stored.
    #[error("client_msg_id {0} was used for another message; use a new id for each message")]
    ClientMsgIdReused(u64),
    /// The store or another dependency is unavailable; retry later.
    #[error("service unavailable")]
    Unavailable(#[from] StoreError),
    /// Too many login attempts for this user or from this address; retry later.
    #[error("too many login attempts; retry in a minute")]
    TooManyAttempts,
    /// Too many registrations from this address, or API requests of this user; retry later.
    #[error("{0}")]
    RateLimited(&'static str),
    /// Storing a message failed in a way that leaves its outcome unknown (the store may have
    /// run the append and lost the reply); a resend with the same client message id settles it.
    /// The store's error goes to the log, not to the client.
    #[error(
        "storing the message did not finish and may have run; resend with the same client_msg_id"
    )]
    Retry(StoreError),
    /// Too many logins and registrations are hashing passwords; retry shortly.
    #[error("too many logins in progress; retry shortly")]
    Busy,
    /// A bug or an unexpected failure; details are in the log.
    #[error("internal error")]
    Internal(String),
}

impl ServiceError {
    /// Logs what the error's text leaves out for the caller, whichever way it is answered
    /// (HTTP, or a server's ack): an internal error's detail, and the store's error (at the
    /// 1st, 2nd, 4th... one, so that an outage does not log every send).
    pub fn log_detail(&self) {
        static STORE_ERRORS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        match self {
            ServiceError::Internal(detail) => tracing::error!(detail, "internal error"),
            ServiceError::Unavailable(inner) | ServiceError::Retry(inner) => {
                let seen = STORE_ERRORS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                if seen.is_power_of_two() {
                    tracing::warn!(error = %inner, seen, "store unavailable");
                }
            }
            _ => {}
        }
    }

    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ServiceError::BadRequest(_) => cim_proto::BAD_REQUEST,
            ServiceError::NameTaken => "name_taken",
            ServiceError::InvalidCredentials => "invalid_credentials",
            ServiceError::WrongPassword => "wrong_password",
            ServiceError::PasswordChanged => "password_changed",
            ServiceError::AlreadyOnline => "already_online",
            ServiceError::NoServer => "no_server",
            ServiceError::Unauthorized(_) => "unauthorized",
            ServiceError::SessionEnded(_) => "session_ended",
            // The code older clients know (they fall back to their password); the reason is
            // told apart in the answer's `ended` field (see `api.rs`).
            ServiceError::LoggedInElsewhere => "session_ended",
            ServiceError::SessionLive => "session_live",
            ServiceError::UnknownUser => cim_proto::UNKNOWN_USER,
            ServiceError::UnknownGroup => "unknown_group",
            ServiceError::GroupExists => "group_exists",
            ServiceError::GroupFull => "group_full",
            ServiceError::TooManyGroups(_) => "too_many_groups",
            ServiceError::NotMember => "not_member",
            ServiceError::InviteOnly => "invite_only",
            ServiceError::NotOwner => "not_owner",
            ServiceError::NoSuchMember => "no_such_member",
            ServiceError::TooManyInvitations => "too_many_invitations",
            ServiceError::Blocked => cim_proto::BLOCKED,
            ServiceError::TooManyBlocked(_) => "too_many_blocked",
            ServiceError::TooLate => "too_late",
            ServiceError::TooLarge(_) => cim_proto::TOO_LARGE,
            ServiceError::ClientMsgIdReused(_) => cim_proto::CLIENT_MSG_ID_REUSED,
            ServiceError::Unavailable(StoreError::NameTaken) => "name_taken",
            ServiceError::Unavailable(_) => cim_proto::SEND_UNAVAILABLE,
            ServiceError::TooManyAttempts => "too_many_attempts",
            ServiceError::RateLimited(_) => cim_proto::RATE_LIMITED,
            ServiceError::Busy => "busy",
            ServiceError::Retry(_) => cim_proto::SEND_RETRY,
            ServiceError::Internal(_) => "internal",
        }
    }
}

impl From<WorkError> for ServiceError {
    fn from(e: WorkError) -> Self {
        match e {
            WorkError::Busy => ServiceError::Busy,
            WorkError::Failed(detail) => ServiceError::Internal(detail),
        }
    }
}

impl From<TokenError> for ServiceError {
    fn from(e: TokenError) -> Self {
        ServiceError::Unauthorized(e.to_string())
    }
}

/// A successful login.
#[derive(Debug, Clone)]
pub struct LoginGrant {
    /// The account.
    pub user_id: u64,
    /// Account name.
    pub name: String,
    /// Signed session token for the assigned server.
    pub token: String,
    /// Assigned server.
    pub server: ServerInfo,
    /// Token expiry, milliseconds since the Unix epoch.
    pub expires_at_ms: u64,
}

/// The sender of a message, from an authenticated session.
#[derive(Debug, Clone)]
pub struct Sender {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
}

/// The wire form of a stored entry.
fn delivery_of(seq: u64, entry: &InboxEntry) -> Delivery {
    Delivery {
        msg_id: entry.msg_id,
        seq,
        from_user: entry.from_user,
        from_name: entry.from_name.clone(),
        group: entry.group.clone(),
        body: entry.body.clone(),
        created_at_ms: entry.created_at_ms,
        unsends: entry.unsends.unwrap_or(0),
    }
}

/// A message accepted for delivery.
#[derive(Debug, Clone, Copy)]
pub struct Sent {
    /// Assigned message id.
    pub msg_id: u64,
    /// Recipient inboxes it is stored in.
    pub recipients: u32,
    /// For a private message: whether the recipient had a confirmed route (was online, so it
    /// was pushed) when it was stored.
    pub recipient_online: Option<bool>,
}

/// A session a server renews ([`Service::renew_sessions`]).
#[derive(Debug, Clone, Copy)]
pub struct RenewedSession {
    pub user: u64,
    pub session: u64,
    /// The highest inbox seq the server pushed to the session or told it about.
    pub told_up_to: u64,
}

/// What a server's renewal of its sessions found ([`Service::renew_sessions`]).
#[derive(Debug, Default)]
pub struct SessionsRenewed {
    /// Users whose route belongs to another login or whose login was revoked.
    pub lost: Vec<u64>,
    /// Users whose inbox gave out entries past what the server told their session, with the
    /// last seq given out.
    pub behind: Vec<(u64, u64)>,
}

/// Users' latest password changes: user -> (keyed hash of the (old, new) pair, when tried).
type PasswordChanges = HashMap<u64, (u64, Instant)>;

/// The router's behaviour over its store, discovery view and server links.
pub struct Service {
    pub(crate) config: Arc<RouterConfig>,
    login_failures: Mutex<WindowCounter<String>>,
    /// Password changes and account deletions tried per user in the last minute (apart from
    /// failed logins).
    password_checks: Mutex<WindowCounter<u64>>,
    /// Each user's latest password change tried here (its current password given) in the
    /// last [`PASSWORD_CHANGE_REMEMBERED`]: a hash of its (old, new) pair, keyed with
    /// `password_change_key`, so that the same change asked again is known without keeping
    /// either password; with the size at which the map is swept next.
    password_changes: Mutex<(PasswordChanges, usize)>,
    password_change_key: std::hash::RandomState,
    /// Reports made per user in the last minute ([`REPORTS_PER_USER`]).
    report_counts: Mutex<WindowCounter<u64>>,
    /// Read receipts given per user in the last minute ([`READ_RECEIPTS_PER_USER`]).
    receipt_counts: Mutex<WindowCounter<u64>>,
    /// Unsends asked for per user in the last minute ([`UNSENDS_PER_USER`]).
    unsend_counts: Mutex<WindowCounter<u64>>,
    login_attempts: Mutex<WindowCounter<IpAddr>>,
    /// Registrations per address per minute.
    registrations: Mutex<WindowCounter<IpAddr>>,
    /// Authenticated API requests per login (user id, session id) per second.
    api_requests: Mutex<WindowCounter<(u64, u64)>>,
    /// Token re-logins per user per minute ([`RELOGINS_PER_USER`]).
    relogins: Mutex<WindowCounter<u64>>,
    /// Sends to one group are appended under one of these locks, so every member's inbox
    /// holds the group's messages in the same order.
    group_locks: Vec<tokio::sync::Mutex<()>>,
    /// The latest refusals and failures, newest last, for the admin page.
    recent_errors: Mutex<std::collections::VecDeque<RecentError>>,
    /// Password hashing, bounded to the cores.
    password_work: PasswordWork,
    pub(crate) store: Arc<dyn Store>,
    pub(crate) servers: watch::Receiver<Arc<Vec<ServerInfo>>>,
    pub(crate) links: Arc<ServerLinks>,
    selector: Selector,
    /// Message ids, with the node number [`crate::ids::NodeHolder`] keeps for this router.
    pub(crate) ids: Arc<IdGenerator>,
    /// Presence announcements waiting for [`crate::presence::run`]'s workers.
    pub(crate) presence: PresenceQueue,
    /// The latest scan of the online users (see [`Service::online_scan`]).
    online_scans: OnlineScans,
    /// Recent member listings of big groups (see [`Service::group_members`]).
    member_listings: std::sync::Mutex<HashMap<String, MemberListing>>,
    /// Checked against for unknown names (see [`Service::stand_in_hash`]).
    stand_in_hash: std::sync::OnceLock<String>,
}

/// Scans of the online users, one at a time (see [`Service::online_scan`]).
#[derive(Default)]
struct OnlineScans {
    /// Calls made so far.
    requested: std::sync::atomic::AtomicU64,
    /// The latest scan; held while a scan runs.
    last: tokio::sync::Mutex<Option<OnlineScan>>,
}

/// One scan of the online users.
struct OnlineScan {
    /// The calls made before it began, all answered by it.
    covers: u64,
    /// When it ended.
    at: Instant,
    /// How long it took.
    took: Duration,
    /// The online users, sorted by name.
    users: Arc<Vec<OnlineUser>>,
}

/// A group's member listing and when it was read.
type MemberListing = (Instant, Vec<Member>);

/// Members from which a group's member listing is kept for [`BIG_GROUP_LISTING_AGE`] and
/// answers every listing of it meanwhile.
const BIG_GROUP_LISTING: usize = 1000;
/// See [`BIG_GROUP_LISTING`].
const BIG_GROUP_LISTING_AGE: Duration = Duration::from_secs(1);
/// Groups with more members than this do not announce joins and leaves: in a big group they
/// are noise to its members, and each reads every member's route.
const GROUP_CHANGE_MAX_MEMBERS: usize = 100;
/// Longest a join or leave waits for its announcement.
const GROUP_CHANGE_WAIT: Duration = Duration::from_secs(1);

/// A scan of the online users that took this long or longer answers calls for as long again
/// after it ended: back to back (a flood of listings, or many users paging through a big
/// list) such scans keep the store busy at most half the time. A small deployment's scans
/// take far less, and every listing sees the logins and logouts before it.
const SLOW_SCAN: Duration = Duration::from_millis(50);

impl OnlineScan {
    /// Whether it answers a call that accepts a scan `max_age` old (see [`SLOW_SCAN`]).
    fn fresh_enough(&self, max_age: Duration) -> bool {
        let reuse = if self.took >= SLOW_SCAN {
            self.took
        } else {
            Duration::ZERO
        };
        self.at.elapsed() <= max_age.max(reuse)
    }
}

/// What tells one message from another under the same client message id: a 64-bit FNV-1a
/// hash of its target and body (fixed, so routers of different builds agree).
pub fn send_fingerprint(message: &ChatMessage) -> u64 {
    let mut hash = cim_core::fnv::Fnv1a::default();
    match &message.target {
        Some(Target::ToUser(to)) => {
            hash.write(b"u");
            hash.write(&to.to_le_bytes());
        }
        Some(Target::Group(g)) => {
            hash.write(b"g");
            hash.write(&(g.len() as u64).to_le_bytes());
            hash.write(g.as_bytes());
        }
        None => hash.write(b"-"),
    }
    hash.write(message.body.as_bytes());
    hash.finish()
}

/// A user online, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnlineUser {
    /// Account id.
    pub id: u64,
    /// Account name.
    pub name: String,
}

/// Most users one online listing returns: a listing of everyone online must not cost the
/// router (and the caller) the whole set at once.
pub const MAX_ONLINE_PAGE: usize = 1000;

/// A page of an online listing.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct OnlinePage {
    /// Users by name.
    pub users: Vec<OnlineUser>,
    /// More users follow the last one (ask again with `after` set to its name).
    pub more: bool,
}

/// How listings order names: in any case first, as names are found (`amy` before `Bob`), then
/// as registered (names made before they were unique whatever their case may differ only in
/// it).
fn by_name(a: &str, b: &str) -> std::cmp::Ordering {
    folded_cmp(a, b).then_with(|| a.cmp(b))
}

/// `a` and `b` compared in any case.
fn folded_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn fold(s: &str) -> impl Iterator<Item = u8> + '_ {
        s.bytes().map(|c| c.to_ascii_lowercase())
    }
    fold(a).cmp(fold(b))
}

/// The page of `online` (sorted [`by_name`]) whose names start with `prefix` in any case and
/// come after `after`: at most `limit` users, and at most [`MAX_ONLINE_PAGE`].
fn online_page(online: &[OnlineUser], prefix: &str, after: &str, limit: usize) -> OnlinePage {
    let limit = limit.min(MAX_ONLINE_PAGE);
    let start = online.partition_point(|u| {
        folded_cmp(&u.name, prefix).is_lt() || by_name(&u.name, after).is_le()
    });
    let starts_with = |name: &str| {
        let head = name.as_bytes().get(..prefix.len());
        head.is_some_and(|head| head.eq_ignore_ascii_case(prefix.as_bytes()))
    };
    let mut matching = online[start..].iter().take_while(|u| starts_with(&u.name));
    let users: Vec<OnlineUser> = matching.by_ref().take(limit).cloned().collect();
    OnlinePage {
        users,
        more: matching.next().is_some(),
    }
}

impl Service {
    pub(crate) fn new(
        config: Arc<RouterConfig>,
        store: Arc<dyn Store>,
        servers: watch::Receiver<Arc<Vec<ServerInfo>>>,
        links: Arc<ServerLinks>,
    ) -> Self {
        Self {
            login_failures: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            password_checks: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            password_changes: Mutex::new((HashMap::new(), 0)),
            password_change_key: std::hash::RandomState::new(),
            report_counts: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            receipt_counts: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            unsend_counts: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            login_attempts: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            registrations: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            api_requests: Mutex::new(WindowCounter::new(API_WINDOW, 100_000)),
            relogins: Mutex::new(WindowCounter::new(LOGIN_WINDOW, 100_000)),
            group_locks: (0..GROUP_LOCKS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
            recent_errors: Mutex::new(std::collections::VecDeque::new()),
            password_work: PasswordWork::for_this_machine(),
            selector: Selector::new(config.strategy),
            ids: Arc::new(IdGenerator::unassigned()),
            presence: PresenceQueue::default(),
            online_scans: OnlineScans::default(),
            member_listings: Default::default(),
            stand_in_hash: std::sync::OnceLock::new(),
            config,
            store,
            servers,
            links,
        }
    }

    /// Creates an account, unless `peer` has registered too often this minute. Requests refused
    /// as malformed or `busy` (to be retried) do not count.
    pub async fn register(
        &self,
        name: &str,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<Account, ServiceError> {
        validate_user_name(name)?;
        validate_password(password)?;
        if let Some(ip) = peer {
            self.hit_within(
                &self.registrations,
                ip,
                self.config.api_limits.registrations_per_ip,
                "too many registrations from this address; retry in a minute",
                || format!("registrations from {ip} over the limit"),
            )?;
        }
        let registered = self.create_account(name, password).await;
        if let (Some(ip), Err(ServiceError::Busy)) = (peer, &registered) {
            lock(&self.registrations).forgive(&ip);
        }
        registered
    }

    async fn create_account(&self, name: &str, password: &str) -> Result<Account, ServiceError> {
        let password = password.to_string();
        let cost = self.config.password_cost;
        let hash = self
            .password_work
            .run(move || password::hash(&password, cost))
            .await?
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        match self.store.create_account(name, &hash).await {
            Ok(account) => Ok(account),
            Err(StoreError::NameTaken) => Err(ServiceError::NameTaken),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks credentials, claims the user's route and assigns a server.
    ///
    /// A user who is already online is refused with [`ServiceError::AlreadyOnline`] unless
    /// `takeover` is set, in which case the old session is kicked. A route left behind by a
    /// server that is gone never blocks a login.
    pub async fn login(
        &self,
        name: &str,
        password: &str,
        takeover: bool,
        peer: Option<IpAddr>,
    ) -> Result<LoginGrant, ServiceError> {
        let now = Instant::now();
        let limits = self.config.login_limits;
        self.check_attempts(peer, now, true)?;
        // Only a name an account could have is counted: the counter keeps its names, and one
        // of up to a request body's size per failed attempt would grow it by gigabytes.
        if name.len() > MAX_LOGIN_NAME {
            return Err(self.login_refused(ServiceError::InvalidCredentials, "login"));
        }
        // Counted in one case, as names are found in any: `ALICE` and `alice` are one user's
        // tries.
        let counted = cim_core::names::folded(name);
        if lock(&self.login_failures).count(&counted, now) >= limits.failures_per_user {
            tracing::warn!(name, "login failures of user over the limit");
            self.config.metrics.login_failures.inc();
            return Err(ServiceError::TooManyAttempts);
        }
        let result = self.check_credentials(name, password).await;
        match &result {
            Err(ServiceError::InvalidCredentials) => {
                lock(&self.login_failures).hit(counted, now);
            }
            Ok(_) => lock(&self.login_failures).reset(&counted),
            Err(_) => {}
        }
        let account = result.map_err(|e| self.login_refused(e, &format!("login of {name:?}")))?;
        let grant = self.assign(account, takeover, None).await?;
        self.config.metrics.logins.inc();
        Ok(grant)
    }

    /// Logs a session in again with its token instead of the password, when its server died,
    /// is draining or cannot be reached: no password hash, so a dead server's clients come
    /// back at the speed of token checks rather than of Argon2.
    ///
    /// The token must be genuine and unexpired (servers renew the tokens of live sessions),
    /// its login must not have ended (logged out, or replaced by a newer login on a live
    /// server), and the account must exist. The token's login then ends, so each token
    /// re-logs in once, and a new login begins on a live server, as a password login with
    /// takeover would.
    pub async fn relogin(
        &self,
        token: &str,
        peer: Option<IpAddr>,
    ) -> Result<LoginGrant, ServiceError> {
        // Genuine re-logins are not counted against the address (a failover behind one NAT
        // would hit the limit); refused tokens are, so an address that keeps sending bad ones
        // is stopped like one guessing passwords.
        let now = Instant::now();
        self.check_attempts(peer, now, false)?;
        // A route that lapsed or was cleaned up (its server left discovery) between the
        // checks and the claim is no one else's login: check and claim once more.
        let refused = |e: ServiceError| {
            if let (Some(ip), ServiceError::Unauthorized(_)) = (peer, &e) {
                lock(&self.login_attempts).hit(ip, now);
            }
            self.login_refused(e, "re-login")
        };
        // The token and the limits once per request, however often the checks run below.
        let claims = self.relogin_claims(token, now).await.map_err(refused)?;
        let mut attempts = 0;
        let grant = loop {
            attempts += 1;
            let (account, seen_route_session) =
                self.check_relogin(&claims).await.map_err(refused)?;
            // The claim ends the token's login in the same atomic step, and only if the login
            // and the user's route are still as checked: of two re-logins with one token (a
            // client's retry racing its first attempt, or a leaked token), one wins.
            let relogin = Relogin {
                session_id: claims.session_id,
                seen_route_session,
                revoke_for: self.revocation_ttl(claims.expires_at_ms),
            };
            match self.assign(account, true, Some(&relogin)).await {
                Ok(grant) => break grant,
                // The login ended or the route changed since the check: by whom, the
                // revocation says; none yet is a login that replaced it, or a route gone.
                Err(ServiceError::SessionEnded(_)) => {
                    let revocation = self
                        .store
                        .revocation(claims.user_id, claims.session_id)
                        .await?;
                    match revocation {
                        Some(why) => return Err(self.login_refused(ended(why), "re-login")),
                        None if attempts < 2 => continue,
                        None => {
                            let e = ServiceError::SessionEnded("the route changed meanwhile");
                            return Err(self.login_refused(e, "re-login"));
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        };
        lock(&self.relogins).hit(claims.user_id, now);
        self.config.metrics.relogins.inc();
        tracing::info!(user = claims.user_id, from = %claims.server_id, "re-login with token");
        Ok(grant)
    }

    /// Ends the login `claims` belongs to for as long as its newest token may live.
    async fn revoke(&self, claims: &Claims, why: Revocation) -> Result<(), ServiceError> {
        (self.revoke_session(claims.user_id, claims.session_id, claims.expires_at_ms, why)).await
    }

    /// Ends `user`'s login `session`, `why`, for as long as a token expiring at
    /// `expires_at_ms` (0: any token of it) may live.
    async fn revoke_session(
        &self,
        user: u64,
        session: u64,
        expires_at_ms: u64,
        why: Revocation,
    ) -> Result<(), ServiceError> {
        let ttl = self.revocation_ttl(expires_at_ms);
        Ok(self.store.revoke_session(user, session, ttl, why).await?)
    }

    /// Counts one API request of `user`'s login `session` (with one of its tokens) and refuses
    /// it past the limit for the rest of the second. It is counted before the store is asked
    /// whether the login has ended, so a flood costs no store reads; and per login, not per
    /// user, so someone holding a token of a login that ended cannot use up the user's
    /// current one.
    pub(crate) fn check_api_rate(&self, user: u64, session: u64) -> Result<(), ServiceError> {
        self.check_api_rate_n(user, session, 1)
    }

    /// Counts what a costlier request (a broadcast, a join or leave) adds to the one
    /// [`Service::check_api_rate`] counted for it, `cost` in all, but never more than the
    /// limit allows in one second: under a limit below `cost` such a request still goes, one
    /// a second.
    pub(crate) fn check_api_extra(
        &self,
        user: u64,
        session: u64,
        cost: u32,
    ) -> Result<(), ServiceError> {
        let limit = self.config.api_limits.requests_per_user;
        let extra = cost.min(limit).saturating_sub(1);
        if extra == 0 {
            return Ok(());
        }
        self.check_api_rate_n(user, session, extra)
    }

    /// [`Service::check_api_rate`] for a request that costs `cost`.
    fn check_api_rate_n(&self, user: u64, session: u64, cost: u32) -> Result<(), ServiceError> {
        let count = lock(&self.api_requests).hit_n((user, session), cost, Instant::now());
        let limit = self.config.api_limits.requests_per_user;
        self.within_limit(
            (count, cost),
            limit,
            "too many requests for this user; slow down",
            || format!("API requests of user {user} over {limit} a second"),
        )
    }

    /// Counts one request of `key` in `counter` and refuses it as [`Service::within_limit`]
    /// says past `limit` for the window.
    fn hit_within<K: std::hash::Hash + Eq + Clone>(
        &self,
        counter: &Mutex<WindowCounter<K>>,
        key: K,
        limit: u32,
        why: &'static str,
        what: impl FnOnce() -> String,
    ) -> Result<(), ServiceError> {
        let count = lock(counter).hit(key, Instant::now());
        self.within_limit((count, 1), limit, why, what)
    }

    /// Refuses `rate_limited` with `why` once `count` (this window's, this request's `cost`
    /// included) is past `limit`. Only the window's first refusal (the request that crossed
    /// the limit) is logged and shown on the admin page (`what`): a flood must not flood the
    /// log too.
    fn within_limit(
        &self,
        (count, cost): (u32, u32),
        limit: u32,
        why: &'static str,
        what: impl FnOnce() -> String,
    ) -> Result<(), ServiceError> {
        if count <= limit {
            return Ok(());
        }
        let e = ServiceError::RateLimited(why);
        if count.saturating_sub(cost) <= limit {
            let what = what();
            tracing::warn!("{what}");
            self.record_error(e.code(), what);
        }
        Err(e)
    }

    /// Counts and records a refused login or re-login.
    fn login_refused(&self, e: ServiceError, what: &str) -> ServiceError {
        self.config.metrics.login_failures.inc();
        self.record_error(e.code(), format!("{what}: {e}"));
        e
    }

    /// Refuses `peer` once its login attempts this minute are over the limit, counting this
    /// one if `record` (a re-login is counted only once refused).
    fn check_attempts(
        &self,
        peer: Option<IpAddr>,
        now: Instant,
        record: bool,
    ) -> Result<(), ServiceError> {
        if let Some(ip) = peer {
            let attempts = {
                let mut counter = lock(&self.login_attempts);
                if record {
                    counter.hit(ip, now)
                } else {
                    counter.count(&ip, now) + 1
                }
            };
            if attempts > self.config.login_limits.attempts_per_ip {
                tracing::warn!(%ip, attempts, "login attempts from address over the limit");
                self.config.metrics.login_failures.inc();
                return Err(ServiceError::TooManyAttempts);
            }
        }
        Ok(())
    }

    /// How long a revocation must last: until the login's newest token (expiring at
    /// `expires_at_ms`, or at most a full lifetime from now) has expired, plus a minute for
    /// clocks.
    fn revocation_ttl(&self, expires_at_ms: u64) -> Duration {
        let left = Duration::from_millis(expires_at_ms.saturating_sub(now_ms()));
        left.max(self.config.token_ttl) + Duration::from_secs(60)
    }

    /// The claims of a genuine, unexpired token, counted against its login's API rate and
    /// its user's re-logins (see [`Service::relogin`]).
    async fn relogin_claims(&self, token: &str, now: Instant) -> Result<Claims, ServiceError> {
        let claims = match self.config.token_key.verify(token, now_ms(), None) {
            Err(TokenError::Expired) => return Err(self.expired_token_refusal(token).await),
            verified => verified?,
        };
        // Counted against the token's login as its API calls are, before any store read: a
        // refusal other than a bad token (`session_live`, `session_ended`) is not counted
        // against the address, and a loop of them cost several reads each.
        self.check_api_rate(claims.user_id, claims.session_id)?;
        if lock(&self.relogins).count(&claims.user_id, now) >= RELOGINS_PER_USER {
            return Err(ServiceError::RateLimited(
                "too many re-logins for this user; slow down",
            ));
        }
        Ok(claims)
    }

    /// Whether the login of `claims` may re-log in now (see [`Service::relogin`]): its account,
    /// and the session of the user's route it was checked against.
    async fn check_relogin(&self, claims: &Claims) -> Result<(Account, Option<u64>), ServiceError> {
        let revocation = self
            .store
            .revocation(claims.user_id, claims.session_id)
            .await?;
        if let Some(why) = revocation {
            return Err(ended(why));
        }
        let current = self.store.routes(&[claims.user_id]).await?.pop().flatten();
        if let Some(route) = &current
            && self.server_alive(&route.server_id)
        {
            if route.session_id != claims.session_id {
                // Another login holds the user: a replacement whose revocation of this login
                // is still to come, or a re-login with this very token that won since the
                // check above (which its revocation says).
                let revocation = self
                    .store
                    .revocation(claims.user_id, claims.session_id)
                    .await?;
                return Err(ended(revocation.unwrap_or(Revocation::Replaced)));
            }
            if route.confirmed {
                return Err(ServiceError::SessionLive);
            }
        }
        let account = self
            .store
            .accounts_by_id(&[claims.user_id])
            .await?
            .pop()
            .ok_or(ServiceError::InvalidCredentials)?;
        Ok((account, current.map(|r| r.session_id)))
    }

    /// Why an expired token may not re-log in. A login that ended says how (as for a live
    /// token), and one that a newer login replaced says so (`session_ended`, replaced: the
    /// client stops) even once its revocation mark is gone: on `unauthorized` the client logs
    /// in with its password and takeover, and would take the user back from the newer login
    /// on another device.
    async fn expired_token_refusal(&self, token: &str) -> ServiceError {
        let expired = ServiceError::from(TokenError::Expired);
        let Ok(claims) = self.config.token_key.verify_signature(token) else {
            return expired;
        };
        let (user, session) = (claims.user_id, claims.session_id);
        let why = match self.store.revocation(user, session).await {
            Ok(Some(why)) => return ended(why),
            Ok(None) => self.store.last_login(user).await,
            Err(e) => return e.into(),
        };
        match why {
            Ok(Some(latest)) if latest != session => ended(Revocation::Replaced),
            Ok(_) => expired,
            Err(e) => e.into(),
        }
    }

    async fn check_credentials(&self, name: &str, password: &str) -> Result<Account, ServiceError> {
        if name.len() > MAX_LOGIN_NAME || password.len() > 256 {
            return Err(ServiceError::InvalidCredentials);
        }
        let account = self.store.account_by_name(name).await?;
        // An unknown name is checked against a stand-in hash of the same cost, so it takes as
        // long (and queues, or is answered `busy`, the same) as a wrong password: the answer's
        // timing does not tell which names exist.
        let stored = match &account {
            Some(account) => account.password_hash.clone(),
            None => self.stand_in_hash().await?,
        };
        let password = password.to_string();
        let ok = self
            .password_work
            .run(move || password::verify(&password, &stored))
            .await?;
        match account {
            Some(account) if ok => Ok(account),
            _ => Err(ServiceError::InvalidCredentials),
        }
    }

    /// The user of `claims` changes its password from `old` to `new`, a try counted as
    /// [`Service::password_try`] says. The user's login, the one asking, stays; its earlier
    /// logins ended when it began. Asking again with the same passwords once the change is
    /// made (tried on this router in the last [`PASSWORD_CHANGE_REMEMBERED`]) is answered as done:
    /// a client whose answer was lost asks again to learn it. Only a caller that gives both
    /// passwords of that change is told so: a wrong `old` tests no second guess.
    pub async fn change_password(
        &self,
        claims: &Claims,
        old: &str,
        new: &str,
        peer: Option<IpAddr>,
    ) -> Result<(), ServiceError> {
        validate_password(new)?;
        if old == new {
            return Err(ServiceError::BadRequest(
                "the new password is the current one".into(),
            ));
        }
        let change = std::hash::BuildHasher::hash_one(&self.password_change_key, (old, new));
        self.password_try(claims, peer, "password change", async {
            match self.holds_password(claims, old).await? {
                Some(account) => {
                    // Remembered before it is made: the same change asked again while this
                    // one is under way (its answer slow) is known too.
                    self.remember_change(claims.user_id, change);
                    self.replace_password(claims, account, new).await
                }
                None if self.changed_recently(claims.user_id, change)
                    && self.holds_password(claims, new).await?.is_some() =>
                {
                    tracing::info!(user = claims.user_id, "password change asked again");
                    Ok(())
                }
                None => Err(self.wrong_password(claims, "password change")),
            }
        })
        .await
    }

    /// Remembers `change` as `user`'s latest password change tried here. The map is swept of
    /// changes past [`PASSWORD_CHANGE_REMEMBERED`] whenever it has doubled since the last
    /// sweep (from 1,024), so it holds at most twice the changes of that long.
    fn remember_change(&self, user: u64, change: u64) {
        let mut changes = lock(&self.password_changes);
        let (map, sweep_at) = &mut *changes;
        sweep_when_doubled(map, sweep_at, 1024, |(_, at)| {
            at.elapsed() < PASSWORD_CHANGE_REMEMBERED
        });
        map.insert(user, (change, Instant::now()));
    }

    /// Whether `user`'s latest password change tried here (its current password given), in the
    /// last [`PASSWORD_CHANGE_REMEMBERED`], was `change`.
    fn changed_recently(&self, user: u64, change: u64) -> bool {
        lock(&self.password_changes)
            .0
            .get(&user)
            .is_some_and(|(c, at)| *c == change && at.elapsed() < PASSWORD_CHANGE_REMEMBERED)
    }

    /// Runs `checked`, a request of `claims`'s user that checks its password (`what`: a
    /// change, a deletion), as one try. A user may try [`PASSWORD_CHECKS_PER_USER`] times a
    /// minute, counted before any hash (a stolen session token guesses no faster than a login
    /// could, whatever new logins it re-logs in to, and no account keeps the password workers
    /// busy), and each try counts against `peer`'s login attempts. Counted apart from failed
    /// logins, so only a holder of the user's tokens uses the tries up: someone else's failed
    /// logins cannot stop a user changing a password they fear is known. A try answered
    /// `busy` is given back.
    async fn password_try<T>(
        &self,
        claims: &Claims,
        peer: Option<IpAddr>,
        what: &str,
        checked: impl Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, ServiceError> {
        let now = Instant::now();
        self.check_attempts(peer, now, true)?;
        let tries = lock(&self.password_checks).hit(claims.user_id, now);
        if tries > PASSWORD_CHECKS_PER_USER {
            tracing::warn!(
                user = claims.user_id,
                what,
                "password checks of user over the limit"
            );
            self.config.metrics.login_failures.inc();
            return Err(ServiceError::TooManyAttempts);
        }
        let done = checked.await;
        // A try the password workers had no room for is no try: it is to be retried.
        if matches!(done, Err(ServiceError::Busy)) {
            lock(&self.password_checks).forgive(&claims.user_id);
        }
        done
    }

    /// The account of `claims`'s user if `password` is its password, else `wrong_password`
    /// (logged and counted as a failed login, for `what`).
    async fn own_account(
        &self,
        claims: &Claims,
        password: &str,
        what: &str,
    ) -> Result<Account, ServiceError> {
        match self.holds_password(claims, password).await? {
            Some(account) => Ok(account),
            None => Err(self.wrong_password(claims, what)),
        }
    }

    /// The account of `claims`'s user if `password` is its password.
    async fn holds_password(
        &self,
        claims: &Claims,
        password: &str,
    ) -> Result<Option<Account>, ServiceError> {
        match self.check_credentials(&claims.user_name, password).await {
            Ok(account) if account.id == claims.user_id => Ok(Some(account)),
            Ok(_) | Err(ServiceError::InvalidCredentials) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `wrong_password` for `claims`'s user, logged and counted as a failed login (for `what`).
    fn wrong_password(&self, claims: &Claims, what: &str) -> ServiceError {
        let what = format!("{what} of user {}", claims.user_id);
        self.login_refused(ServiceError::WrongPassword, &what)
    }

    /// Replaces the password of `account` (`claims`'s user's), as read, with `new`: refused
    /// `password_changed` if another change came first, unless that one made it `new` too (the
    /// same change asked again while the first was still under way).
    async fn replace_password(
        &self,
        claims: &Claims,
        account: Account,
        new: &str,
    ) -> Result<(), ServiceError> {
        let owned = new.to_string();
        let cost = self.config.password_cost;
        let hash = self
            .password_work
            .run(move || password::hash(&owned, cost))
            .await?
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        if !self
            .store
            .set_password_hash(account.id, &account.password_hash, &hash)
            .await?
        {
            if self.holds_password(claims, new).await?.is_some() {
                tracing::info!(
                    user = account.id,
                    "password change made meanwhile, the same"
                );
                return Ok(());
            }
            return Err(ServiceError::PasswordChanged);
        }
        tracing::info!(user = account.id, "password changed");
        Ok(())
    }

    /// Deletes the account of `claims`'s user, given its password (a try counted as
    /// [`Service::password_try`] says). Its login ends (its session is kicked: `account
    /// deleted`); it leaves its groups (each passed on or deleted as on any leave, the members
    /// told) and declines its invitations; then its account, inbox, blocks and last seen go in
    /// one store step, after which no message is stored for it, no login claims a route for
    /// it and no login of it (one that raced the deletion included) calls the API. Its name
    /// is free again; its id is never given again. Messages it sent stay with their
    /// recipients. A deletion that fails before the store step has ended the login and left
    /// some groups: a login and a deletion again finish it. Once the account is gone, the
    /// deletion is done: what is left to tidy (a login that raced it, groups it joined
    /// meanwhile) is tried and logged if it fails, since the user can no longer retry.
    pub async fn delete_account(
        &self,
        claims: &Claims,
        password: &str,
        peer: Option<IpAddr>,
    ) -> Result<(), ServiceError> {
        self.password_try(claims, peer, "account deletion", async {
            self.own_account(claims, password, "account deletion")
                .await?;
            self.delete_checked_account(claims).await
        })
        .await
    }

    /// [`Service::delete_account`] once the password is checked.
    async fn delete_checked_account(&self, claims: &Claims) -> Result<(), ServiceError> {
        // This login ends first: its tokens call nothing more.
        self.revoke(claims, Revocation::LoggedOut).await?;
        self.delete_user(claims.user_id).await
    }

    /// An operator deletes the account `user` (the admin API; by id, which is never given
    /// again, as reports name it: a name may have passed to someone else since), as
    /// [`Service::delete_account`] would without its password: its latest login ends, its
    /// session is kicked (`account deleted`). Returns its name.
    pub async fn delete_user_as_operator(&self, user: u64) -> Result<String, ServiceError> {
        let name = self.known_name(user).await?;
        // Its latest login ends first, online or not: its tokens call nothing more while its
        // groups are left.
        if let Some(session) = self.store.last_login(user).await? {
            self.revoke_login(user, session).await?;
        }
        self.delete_user(user).await?;
        tracing::warn!(user, name, "account deleted by an operator");
        Ok(name)
    }

    /// Deletes `user`'s account (see [`Service::delete_account`]) once whoever asked may and
    /// the login asking has ended.
    async fn delete_user(&self, user: u64) -> Result<(), ServiceError> {
        // Its session ends first: it joins nothing while its groups are left.
        self.end_route(user).await?;
        // Left while the account is there: the members are told who left.
        let groups = self.store.user_groups(user).await?;
        let invitations = self.store.user_invitations(user).await?;
        self.leave_all(user, groups, invitations).await?;
        let revoke_for = self.revocation_ttl(0);
        let Some(deleted) = self.store.delete_account(user, revoke_for).await? else {
            // Another deletion of the user's came first.
            return Ok(());
        };
        tracing::info!(user, name = %deleted.name, "account deleted");
        self.config.metrics.accounts_deleted.inc();
        // A login whose password check came before the deletion may have claimed a route
        // after the end above (the store step revoked it; no claim wins from now on): its
        // session ends too, and the groups it joined meanwhile are left (without telling:
        // the name is gone).
        let tidy = async {
            self.end_route(user).await?;
            self.leave_all(user, deleted.groups, deleted.invitations)
                .await
        };
        if let Err(e) = tidy.await {
            tracing::warn!(user, error = %e, "deleted account not tidied");
        }
        Ok(())
    }

    /// Undoes what `user` just got in group `name` (a membership, an invitation, the
    /// ownership) if its account was deleted meanwhile: a session's in-band request, an
    /// invitation or a handover can pass its checks before the deletion and land after it,
    /// which would leave the group a member (even an owner) that is gone. Refused
    /// `unknown_user` then.
    async fn unless_deleted(&self, user: u64, name: &str, undo: Undo) -> Result<(), ServiceError> {
        if self.store.user_exists(user).await? {
            return Ok(());
        }
        match undo {
            Undo::Leave => {
                self.store.leave_group(name, user).await?;
            }
            Undo::Decline => {
                self.store.decline_invitation(name, user).await?;
            }
            Undo::HandBackTo(owner) => {
                let back = self.store.transfer_group(name, user, owner).await?;
                if back != Transfer::Transferred {
                    tracing::warn!(
                        owner,
                        user,
                        group = name,
                        ?back,
                        "group not handed back from a deleted account"
                    );
                }
            }
        }
        tracing::info!(user, group = name, "change for a deleted account undone");
        Err(ServiceError::UnknownUser)
    }

    /// Ends the session holding `user`'s route, if any, as its account is deleted: its login
    /// is revoked (no token of it calls the API, re-logs in or renews the route back), its
    /// session kicked and its route released.
    async fn end_route(&self, user: u64) -> Result<(), ServiceError> {
        let Some(route) = self.store.routes(&[user]).await?.pop().flatten() else {
            return Ok(());
        };
        self.revoke_login(user, route.session_id).await?;
        self.kick_route(user, &route, ACCOUNT_DELETED).await;
        self.release_session(user, route.session_id).await
    }

    /// Ends `user`'s login `session` as logged out, for as long as any token of it may live.
    async fn revoke_login(&self, user: u64, session: u64) -> Result<(), ServiceError> {
        (self.revoke_session(user, session, 0, Revocation::LoggedOut)).await
    }

    /// Releases `user`'s route if `session` holds it, and tells the user's groups it left (if
    /// the session had already closed, its server announced the departure).
    async fn release_session(&self, user: u64, session: u64) -> Result<(), ServiceError> {
        if self.store.release_route(user, session, None).await? {
            self.announce_presence(user, false);
        }
        Ok(())
    }

    /// `user` leaves `groups` and declines `invitations`, [`LEAVES_AT_ONCE`] at a time (a
    /// leave waits up to [`GROUP_CHANGE_WAIT`] for its announcement).
    async fn leave_all(
        &self,
        user: u64,
        groups: Vec<String>,
        invitations: Vec<String>,
    ) -> Result<(), ServiceError> {
        futures_util::stream::iter(groups)
            .map(|group| async move {
                match self.leave_group(user, &group).await {
                    // Gone or left meanwhile.
                    Err(ServiceError::NotMember | ServiceError::UnknownGroup) => Ok(()),
                    left => left,
                }
            })
            .buffer_unordered(LEAVES_AT_ONCE)
            .try_collect::<()>()
            .await?;
        futures_util::stream::iter(invitations)
            .map(|group| async move {
                self.store.decline_invitation(&group, user).await?;
                Ok::<_, StoreError>(())
            })
            .buffer_unordered(LEAVES_AT_ONCE)
            .try_collect::<()>()
            .await?;
        Ok(())
    }

    /// A hash at the configured cost that no password matches in practice (of 32 random
    /// bytes), made once.
    async fn stand_in_hash(&self) -> Result<String, ServiceError> {
        if let Some(hash) = self.stand_in_hash.get() {
            return Ok(hash.clone());
        }
        let cost = self.config.password_cost;
        let secret = format!("{:032x}", rand::random::<u128>());
        let hash = self
            .password_work
            .run(move || password::hash(&secret, cost))
            .await?
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        Ok(self.stand_in_hash.get_or_init(|| hash).clone())
    }

    /// Claims the route of a verified account and picks its server; a token re-login's claim
    /// also ends the token's login (see [`Store::claim_route_relogin`]).
    async fn assign(
        &self,
        account: Account,
        takeover: bool,
        relogin: Option<&Relogin>,
    ) -> Result<LoginGrant, ServiceError> {
        // Picked first: with no server to give, the route is left as it is.
        let server = self
            .selector
            .pick(&self.usable_servers(), account.id, rand::random())
            .cloned()
            .ok_or(ServiceError::NoServer)?;
        // A takeover (and a re-login) replaces whatever holds the route, so only a login
        // without one reads it: another login on a live server refuses it. A route to a server
        // that is gone holds no one: it is released (if it is still that one) and the route
        // claimed like a free one, so of two logins that both found it one wins and the other
        // is refused as already online. Its login ends as the one before this (the claim
        // names it).
        let force = takeover || {
            let current = self.store.routes(&[account.id]).await?.pop().flatten();
            match current {
                Some(r) if self.server_alive(&r.server_id) => {
                    return Err(ServiceError::AlreadyOnline);
                }
                Some(r) => {
                    self.store
                        .release_route(account.id, r.session_id, Some(&r.server_id))
                        .await?;
                    false
                }
                None => false,
            }
        };
        let session_id = rand::random::<u64>().max(1);
        let route = Route {
            server_id: server.id.clone(),
            session_id,
            confirmed: false,
        };
        let lease = self.config.pending_lease;
        // The logins the claim replaces end with it (see `Store::claim_route`).
        let replaced_for = self.revocation_ttl(0);
        let claim = match relogin {
            Some(relogin) => {
                self.store
                    .claim_route_relogin(account.id, route, lease, replaced_for, relogin)
                    .await?
            }
            None => {
                self.store
                    .claim_route(account.id, route, lease, force, replaced_for)
                    .await?
            }
        };
        match claim {
            Claim::Busy(_) => return Err(ServiceError::AlreadyOnline),
            // Deleted since its password or token was checked.
            Claim::NoAccount => return Err(ServiceError::InvalidCredentials),
            Claim::Ended => {
                return Err(ServiceError::SessionEnded(
                    "it was re-logged in, logged out or replaced meanwhile",
                ));
            }
            // The claim revoked the logins it replaced (the previous route's and the last
            // one, with no route left if its session closed) in the same step, so none of
            // their tokens can call the API or take the user back once this login ends; a
            // re-login's own login it ended as re-logged in. What is left is the kick.
            Claim::Won { previous, .. } => {
                if let Some(previous) = previous {
                    let own = relogin.map(|r| r.session_id);
                    let why = if own == Some(previous.session_id) {
                        "logged in again"
                    } else {
                        "logged in elsewhere"
                    };
                    self.kick_route(account.id, &previous, why).await;
                }
            }
        }
        let expires_at_ms = now_ms() + self.config.token_ttl.as_millis() as u64;
        let token = self.config.token_key.sign(&Claims {
            user_id: account.id,
            user_name: account.name.clone(),
            server_id: server.id.clone(),
            session_id,
            expires_at_ms,
        });
        tracing::info!(user = account.id, server = %server.id, "login");
        Ok(LoginGrant {
            user_id: account.id,
            name: account.name,
            token,
            server,
            expires_at_ms,
        })
    }

    /// Ends the session a token belongs to.
    pub async fn logout(&self, claims: &Claims) -> Result<(), ServiceError> {
        // Revoked first: from then on neither a confirmation (a client still connecting when
        // the kick below finds no session on its server) nor a renewal or a late session
        // report can put the route back for the session.
        self.revoke(claims, Revocation::LoggedOut).await?;
        let routes = self.store.routes(&[claims.user_id]).await?;
        if let Some(Some(route)) = routes.first()
            && route.session_id == claims.session_id
        {
            self.kick_route(claims.user_id, route, "logged out").await;
        }
        self.release_session(claims.user_id, claims.session_id)
            .await?;
        tracing::info!(user = claims.user_id, "logout");
        Ok(())
    }

    async fn kick_route(&self, user_id: u64, route: &Route, reason: &str) {
        if let Err(e) = self
            .links
            .kick(&route.server_id, user_id, route.session_id, reason)
            .await
        {
            tracing::info!(user = user_id, server = %route.server_id, error = %e, "could not kick old session");
        }
    }

    /// One page of the online users whose name starts with `prefix`, by name: at most `limit`
    /// (capped at [`MAX_ONLINE_PAGE`]) of those named after `after`, and whether more follow.
    pub async fn online_users(
        &self,
        prefix: &str,
        after: &str,
        limit: usize,
    ) -> Result<OnlinePage, ServiceError> {
        let online = self.online_scan(Duration::ZERO).await?;
        Ok(online_page(&online, prefix, after, limit))
    }

    /// The online users, sorted by name, from a scan of the store that began after
    /// this call did, or that ended at most `max_age` ago (or, for a slow scan, at most as
    /// long ago as it took: [`SLOW_SCAN`]). Scans run one at a time, and every
    /// call that came in while one ran shares the next: a scan reads a route and an account per
    /// online user, so callers arriving together (a flood of listings or readiness probes)
    /// cost the store one scan at a time instead of one each.
    pub(crate) async fn online_scan(
        &self,
        max_age: Duration,
    ) -> Result<Arc<Vec<OnlineUser>>, ServiceError> {
        let ticket = self
            .online_scans
            .requested
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let mut last = self.online_scans.last.lock().await;
        if let Some(scan) = last.as_ref()
            && (scan.covers >= ticket || scan.fresh_enough(max_age))
        {
            return Ok(scan.users.clone());
        }
        // Every call that came in so far is answered by this scan.
        let covers = self
            .online_scans
            .requested
            .load(std::sync::atomic::Ordering::SeqCst);
        let began = Instant::now();
        let ids = self.store.online_users().await?;
        // Names only: the scan is kept, and accounts carry password hashes.
        let mut users: Vec<OnlineUser> = self
            .store
            .accounts_by_id(&ids)
            .await?
            .into_iter()
            .map(|a| OnlineUser {
                id: a.id,
                name: a.name,
            })
            .collect();
        users.sort_by(|a, b| by_name(&a.name, &b.name));
        let users = Arc::new(users);
        *last = Some(OnlineScan {
            covers,
            at: Instant::now(),
            took: began.elapsed(),
            users: users.clone(),
        });
        Ok(users)
    }

    /// A server reports a session as open: confirm the route if it still belongs to it.
    pub async fn session_opened(
        &self,
        user_id: u64,
        session_id: u64,
        server_id: &str,
    ) -> Result<bool, ServiceError> {
        let lease = self.config.route_lease;
        if self
            .store
            .confirm_route(user_id, session_id, server_id, lease)
            .await?
        {
            return Ok(true);
        }
        // A session resuming after its route lapsed or was released (its old connection
        // timed out first) gets the route back, unless another login holds the user or the
        // session was logged out.
        let route = self.store.routes(&[user_id]).await?.pop().flatten();
        if route.is_some() || self.store.revocation(user_id, session_id).await?.is_some() {
            return Ok(false);
        }
        let renewal = self
            .store
            .renew_routes(server_id, &[(user_id, session_id)], lease)
            .await?;
        Ok(renewal.stale.is_empty())
    }

    /// Where `user`'s inbox stands if it holds nothing (see [`Store::inbox_caught_up_to`]).
    pub async fn inbox_caught_up_to(&self, user: u64) -> Result<Option<u64>, ServiceError> {
        Ok(self.store.inbox_caught_up_to(user).await?)
    }

    /// A server lists its open sessions, each with the highest seq it pushed to it or told it
    /// about: renew their routes. Users whose route came back (it lapsed, or was removed while
    /// their server was out of discovery, and they were announced offline) are announced
    /// online again. Sessions whose inbox gave out more than the server told them get their
    /// inbox head back: those entries were pushed to no one (stored while the route was
    /// missing, or their push was lost on the way to the server), and their client pulls.
    pub async fn renew_sessions(
        &self,
        server_id: &str,
        sessions: &[RenewedSession],
    ) -> Result<SessionsRenewed, ServiceError> {
        let refs: Vec<(u64, u64)> = sessions.iter().map(|s| (s.user, s.session)).collect();
        let renewal = self
            .store
            .renew_routes(server_id, &refs, self.config.route_lease)
            .await?;
        for &user in &renewal.restored {
            self.announce_presence(user, true);
        }
        // A set: a chunk of 2,000 sessions checked against a list of as many was 4 million
        // comparisons.
        let stale: std::collections::HashSet<u64> = renewal.stale.iter().copied().collect();
        let kept: Vec<&RenewedSession> = sessions
            .iter()
            .filter(|s| !stale.contains(&s.user))
            .collect();
        let users: Vec<u64> = kept.iter().map(|s| s.user).collect();
        let behind = match self.store.inbox_heads(&users).await {
            Ok(heads) => kept
                .iter()
                .zip(heads)
                .filter(|(session, head)| *head > session.told_up_to)
                .map(|(session, head)| (session.user, head))
                .collect(),
            Err(e) => {
                // The routes are renewed; the clients' idle pulls fetch what waits.
                tracing::warn!(server = server_id, users = users.len(), error = %e, "could not read the inbox heads of renewed sessions");
                Vec::new()
            }
        };
        Ok(SessionsRenewed {
            lost: renewal.stale,
            behind,
        })
    }

    /// `server_id` reports a connection of a session as closed.
    /// Returns whether the route was this session's on that server (so the user is now offline).
    pub async fn session_closed(
        &self,
        server_id: &str,
        user_id: u64,
        session_id: u64,
    ) -> Result<bool, ServiceError> {
        Ok(self
            .store
            .release_route(user_id, session_id, Some(server_id))
            .await?)
    }

    /// Sends a message from `sender`: resolves recipients, stores the message in each
    /// recipient's inbox (the durable point: the caller acks the sender after this returns),
    /// then queues it for the servers holding online recipients, one push per server (a group
    /// message's routes are read by a task of its own). A repeat of the same `client_msg_id`
    /// is stored once and gets the same id.
    pub async fn send(
        self: &Arc<Self>,
        sender: &Sender,
        message: &ChatMessage,
    ) -> Result<Sent, ServiceError> {
        if message.body.is_empty() {
            return Err(ServiceError::BadRequest("message body is empty".into()));
        }
        if message.body.len() > self.config.max_body_bytes {
            return Err(ServiceError::TooLarge(self.config.max_body_bytes));
        }
        // Before any id is taken or recorded for it.
        let Some(target) = &message.target else {
            return Err(ServiceError::BadRequest("message has no recipient".into()));
        };
        // Same order for every member: one group's appends never interleave (servers send a
        // group's messages through one router while the router set is stable). The members
        // are read under the lock: read before, a member who left (or joined) while this send
        // waited for it got (or missed) a message ordered after the leave (or the join). The
        // read goes alongside the message id's, so the lock is held no longer than before.
        let _ordered = match target {
            Target::Group(g) if g != BROADCAST_GROUP => Some(self.group_turn(g).await),
            _ => None,
        };
        let now = now_ms();
        let fresh_id = self.next_msg_id(now)?;
        let recipients = async {
            match target {
                // The recipient's existence is checked as its inbox is appended to.
                Target::ToUser(to) => Ok((vec![*to], String::new())),
                Target::Group(g) if g == BROADCAST_GROUP => {
                    let mut online = self.store.online_users().await?;
                    online.retain(|u| *u != sender.id);
                    // A blocked user's broadcasts do not reach whom it blocks: everyone online
                    // is no shared space the blocker chose, as a group is.
                    let blocking = self.store.blocking(&online, sender.id).await?;
                    let mut blocking = blocking.into_iter();
                    online.retain(|_| !blocking.next().unwrap_or(false));
                    Ok((online, g.clone()))
                }
                Target::Group(g) => {
                    let others = self.other_members(g, sender.id).await?;
                    Ok((others, g.clone()))
                }
            }
        };
        let msg_id = async {
            if message.client_msg_id == 0 {
                return Ok(fresh_id);
            }
            self.store
                .message_id(
                    sender.id,
                    message.client_msg_id,
                    send_fingerprint(message),
                    fresh_id,
                    self.config.inbox.dedup,
                )
                .await?
                .ok_or_else(|| {
                    tracing::info!(
                        user_id = sender.id,
                        client_msg_id = message.client_msg_id,
                        "client message id reused for another message"
                    );
                    ServiceError::ClientMsgIdReused(message.client_msg_id)
                })
        };
        let ((recipients, group), msg_id) = tokio::try_join!(recipients, msg_id)?;
        let entry = InboxEntry {
            msg_id,
            from_user: sender.id,
            from_name: sender.name.clone(),
            group,
            body: message.body.clone(),
            created_at_ms: now,
            unsends: None,
        };
        // An append that fails may have run (a lost reply, a timeout): its outcome is unknown,
        // never "not stored". With a client message id a resend settles it; without one, the
        // sender decides (a resend may store it twice). Before, a send without an id was
        // answered `unavailable`, which says nothing was stored.
        let (seqs, routes) = match target {
            Target::ToUser(to) => {
                let (seq, route, _) = self.append_private(*to, &entry).await?;
                (vec![seq], Some(vec![route]))
            }
            Target::Group(_) => {
                let seqs = self
                    .store
                    .append_inbox(&recipients, &entry, self.config.inbox)
                    .await
                    .map_err(ServiceError::Retry)?;
                (seqs, None)
            }
        };
        let stored = recipients.len() as u32;
        // Online as a push counts it: a pending claim (an HTTP login whose client has not
        // reached its server yet) gets no push.
        let recipient_online = routes.as_ref().map(|routes| {
            routes
                .iter()
                .all(|route| route.as_ref().is_some_and(|r| r.confirmed))
        });
        self.config.metrics.messages.inc();
        self.config.metrics.stored.inc_by(u64::from(stored));
        match routes {
            // A private message: its route came with the append, so it is queued for its
            // server right here, without a task of its own.
            Some(routes) => self.push_routed(recipients, seqs, routes, &entry),
            None => self.push_later(recipients, seqs, entry),
        }
        Ok(Sent {
            msg_id,
            recipients: stored,
            recipient_online,
        })
    }

    /// The turn of group `name` to append (see [`Service::send`]), waited for if another send
    /// to a group of its shard holds it.
    async fn group_turn(&self, name: &str) -> tokio::sync::MutexGuard<'_, ()> {
        let lock = &self.group_locks[shard(name)];
        match lock.try_lock() {
            Ok(turn) => turn,
            Err(_) => {
                let _waiting = Waiting::on(&self.config.metrics.group_sends_waiting);
                lock.lock().await
            }
        }
    }

    /// The members of group `name`, for `member`, who must be one (`unknown_group`,
    /// `not_member` otherwise).
    async fn members_for(&self, name: &str, member: u64) -> Result<Vec<u64>, ServiceError> {
        let members = self
            .store
            .group_members(name)
            .await?
            .ok_or(ServiceError::UnknownGroup)?;
        if !members.contains(&member) {
            return Err(ServiceError::NotMember);
        }
        Ok(members)
    }

    /// The members of group `name` but `sender`, who must be one.
    async fn other_members(&self, name: &str, sender: u64) -> Result<Vec<u64>, ServiceError> {
        let mut members = self.members_for(name, sender).await?;
        members.retain(|u| *u != sender);
        Ok(members)
    }

    /// Reads the routes of `recipients`, on a task of its own, and queues stored `entry` (at
    /// `seqs`) for their servers.
    fn push_later(self: &Arc<Self>, recipients: Vec<u64>, seqs: Vec<u64>, entry: InboxEntry) {
        let service = self.clone();
        tokio::spawn(async move {
            match service.store.routes(&recipients).await {
                Ok(routes) => service.push_routed(recipients, seqs, routes, &entry),
                // Stored entries are not lost: recipients pull them when they (re)connect.
                Err(e) => tracing::warn!(msg_id = entry.msg_id, error = %e, "push skipped"),
            }
        });
    }

    /// A fresh message id, issued at `now`.
    fn next_msg_id(&self, now: u64) -> Result<u64, ServiceError> {
        self.ids
            .next(now, tokio::time::Instant::now())
            .ok_or_else(|| {
                ServiceError::Unavailable(StoreError::Unavailable(
                    "this router cannot issue message ids until its id node is confirmed".into(),
                ))
            })
    }

    /// Stores private `entry` for `to` ([`Store::append_private`]): its seq, `to`'s route and
    /// whether it replaced the message it unsends. A failed append's outcome is unknown.
    async fn append_private(
        &self,
        to: u64,
        entry: &InboxEntry,
    ) -> Result<(u64, Option<Route>, bool), ServiceError> {
        match self
            .store
            .append_private(to, entry, self.config.inbox)
            .await
            .map_err(ServiceError::Retry)?
        {
            PrivateAppend::Stored {
                seq,
                route,
                replaced,
            } => Ok((seq, route, replaced)),
            PrivateAppend::NoUser => Err(ServiceError::UnknownUser),
            PrivateAppend::Blocked => Err(ServiceError::Blocked),
        }
    }

    /// `sender` unsends (takes back) its message `msg_id` to `target` (a user, or a group it
    /// is a member of), sent at most [`UNSEND_WINDOW`] ago. An entry saying so goes to the
    /// recipients' inboxes (the group's other members now): in the message's place where the
    /// store finds it still waiting (see [`Store::append_private`]), so a recipient who has
    /// not had it never does, and after it, for one who has, whose client drops it. Refused as a message to `target` would be
    /// (`unknown_user`, `blocked`, `unknown_group`, `not_member`), `too_late` past the
    /// window, `rate_limited` past [`UNSENDS_PER_USER`] a minute; a message to everyone online
    /// cannot be unsent. Once the message has left an inbox, the router cannot tell whose it
    /// was: the recipient's client acts only on an unsend of a message from the same sender.
    /// Answered like a send, with the unsend's own id.
    pub async fn unsend(
        self: &Arc<Self>,
        sender: &Sender,
        target: &Target,
        msg_id: u64,
    ) -> Result<Sent, ServiceError> {
        match target {
            Target::ToUser(to) if *to == sender.id => {
                return Err(ServiceError::BadRequest(
                    "unsend a message you sent to another user or a group".into(),
                ));
            }
            Target::Group(g) if g == BROADCAST_GROUP => {
                return Err(ServiceError::BadRequest(
                    "a message to everyone online cannot be unsent".into(),
                ));
            }
            _ => {}
        }
        let now = now_ms();
        let issued = self.issued_at(msg_id)?;
        if issued.saturating_add(UNSEND_WINDOW.as_millis() as u64) < now {
            return Err(ServiceError::TooLate);
        }
        self.hit_within(
            &self.unsend_counts,
            sender.id,
            UNSENDS_PER_USER,
            "too many unsends this minute; retry in a minute",
            || format!("unsends of user {} over the limit", sender.id),
        )?;
        // Made once the group's turn has come, as a send's.
        let entry = |group: &str| -> Result<InboxEntry, ServiceError> {
            let now = now_ms();
            Ok(InboxEntry {
                msg_id: self.next_msg_id(now)?,
                from_user: sender.id,
                from_name: sender.name.clone(),
                group: group.to_string(),
                body: UNSENT_NOTE.into(),
                created_at_ms: now,
                unsends: Some(msg_id),
            })
        };
        let sent = match target {
            Target::ToUser(to) => {
                let entry = entry("")?;
                let (seq, route, replaced) = self.append_private(*to, &entry).await?;
                tracing::debug!(user = sender.id, to, msg_id, replaced, "message unsent");
                let recipient_online = route.as_ref().is_some_and(|r| r.confirmed);
                self.push_routed(vec![*to], vec![seq], vec![route], &entry);
                Sent {
                    msg_id: entry.msg_id,
                    recipients: 1,
                    recipient_online: Some(recipient_online),
                }
            }
            Target::Group(g) => {
                // In the group's order, as a send through this router (one router orders a
                // group's sends only while the servers send them through it: an unsend over
                // HTTPS may reach another, as a message over HTTPS may).
                let _ordered = self.group_turn(g).await;
                let others = self.other_members(g, sender.id).await?;
                let entry = entry(g)?;
                let seqs = self
                    .store
                    .append_inbox(&others, &entry, self.config.inbox)
                    .await
                    .map_err(ServiceError::Retry)?;
                tracing::debug!(user = sender.id, group = g, msg_id, "group message unsent");
                let sent = Sent {
                    msg_id: entry.msg_id,
                    recipients: others.len() as u32,
                    recipient_online: None,
                };
                self.push_later(others, seqs, entry);
                sent
            }
        };
        self.config.metrics.unsends.inc();
        Ok(sent)
    }

    /// The latest time, in ms, at which any router may have issued a message id by now: a
    /// router issues ids up to two leases of its message-id node ahead of its clock (a
    /// node's next holder starts after the time its previous holder may have reached), and
    /// its clock may be ahead of this one's.
    fn latest_possible_issue(&self) -> u64 {
        let lease_ms = self.config.id_node_lease.as_millis() as u64;
        now_ms() + 2 * lease_ms + CLOCK_SKEW_MS
    }

    /// When message `msg_id` was issued (ms), refused `bad_request` for an id no message can
    /// have yet (0, or later than [`Service::latest_possible_issue`]).
    fn issued_at(&self, msg_id: u64) -> Result<u64, ServiceError> {
        let issued = ids::issued_at_ms(msg_id);
        if msg_id == 0 || issued > self.latest_possible_issue() {
            return Err(ServiceError::BadRequest(format!(
                "no message has id {msg_id}"
            )));
        }
        Ok(issued)
    }

    /// Queues a stored message for the servers of its online recipients (by their `routes`):
    /// one push per server. A push that fails leaves the entries in the inboxes, for the
    /// recipients to pull.
    fn push_routed(
        &self,
        recipients: Vec<u64>,
        seqs: Vec<u64>,
        routes: Vec<Option<Route>>,
        entry: &InboxEntry,
    ) {
        let mut by_server: HashMap<String, Vec<Recipient>> = HashMap::new();
        for ((user_id, seq), route) in recipients.into_iter().zip(seqs).zip(routes) {
            if let Some(route) = route.filter(|r| r.confirmed) {
                by_server
                    .entry(route.server_id)
                    .or_default()
                    .push(Recipient { user_id, seq });
            }
        }
        let delivery = delivery_of(0, entry);
        for (server, users) in by_server {
            self.config.metrics.pushes.inc();
            self.links.push(&server, users, delivery.clone());
        }
    }

    /// A page of `user`'s inbox after `after_seq`, for a client's pull; entries up to
    /// `trim_up_to` (never past `after_seq`; `None`: up to it) are trimmed.
    pub async fn fetch(
        &self,
        user: u64,
        after_seq: u64,
        trim_up_to: Option<u64>,
        limit: u32,
    ) -> Result<PullResult, ServiceError> {
        // Servers ask for at most 200; a page is never larger than an inbox.
        let limit = limit.clamp(
            1,
            u32::try_from(self.config.inbox.max_len.max(1)).unwrap_or(u32::MAX),
        );
        let trim_up_to = trim_up_to.map_or(after_seq, |trim| trim.min(after_seq));
        let page = self
            .store
            .fetch_inbox(
                user,
                after_seq,
                trim_up_to,
                limit as usize,
                self.config.inbox,
                now_ms(),
            )
            .await?;
        // A full page means at least that many (more are waiting); good enough for a depth.
        let depth = page.entries.len() + usize::from(page.more);
        self.config.metrics.inbox_depth.observe(depth as f64);
        // A page stops at about MAX_PULL_BYTES of text (always taking one entry): the server
        // holds a reply until its client has read it.
        let mut deliveries = Vec::with_capacity(page.entries.len());
        let mut bytes = 0;
        let mut more = page.more;
        for (seq, entry) in &page.entries {
            let size = entry.body.len() + entry.from_name.len() + entry.group.len();
            if !deliveries.is_empty() && bytes + size > MAX_PULL_BYTES {
                more = true;
                break;
            }
            bytes += size;
            deliveries.push(delivery_of(*seq, entry));
        }
        Ok(PullResult {
            deliveries,
            more,
            code: String::new(),
            message: String::new(),
        })
    }

    /// Clients acknowledged their inboxes up to these sequence numbers.
    pub async fn trim(&self, acked: &[(u64, u64)]) -> Result<(), ServiceError> {
        Ok(self.store.trim_inbox(acked).await?)
    }

    /// [`Service::send`] for a message that arrived from a server, answered as the sender's ack.
    pub async fn send_from_server(
        self: &Arc<Self>,
        sender: &Sender,
        message: &ChatMessage,
    ) -> SendAck {
        match self.send(sender, message).await {
            Ok(sent) => SendAck {
                client_msg_id: message.client_msg_id,
                msg_id: sent.msg_id,
                code: String::new(),
                message: String::new(),
                recipients: sent.recipients,
                recipient_online: sent.recipient_online,
            },
            Err(e) => {
                self.config.metrics.error(e.code());
                // A blocked sender's refusals are the block working, not a fault: kept out of
                // the admin page's recent errors, which a blocked user sending at its rate
                // would otherwise fill.
                if !matches!(e, ServiceError::Blocked) {
                    self.record_error(e.code(), format!("send from user {}: {e}", sender.id));
                }
                e.log_detail();
                if let ServiceError::BadRequest(detail) = &e {
                    tracing::warn!(detail, "send refused");
                }
                SendAck {
                    client_msg_id: message.client_msg_id,
                    msg_id: 0,
                    code: e.code().to_string(),
                    message: e.to_string(),
                    recipients: 0,
                    recipient_online: None,
                }
            }
        }
    }

    /// Creates a group; its creator is its owner and first member. Only users its owner
    /// invites get into an `invite_only` one.
    pub async fn create_group(
        &self,
        user: u64,
        name: &str,
        invite_only: bool,
    ) -> Result<(), ServiceError> {
        validate_group_name(name)?;
        self.check_group_count(user, name).await?;
        if !self.store.create_group(name, user, invite_only).await? {
            return Err(ServiceError::GroupExists);
        }
        self.unless_deleted(user, name, Undo::Leave).await?;
        tracing::info!(user, group = name, invite_only, "group created");
        Ok(())
    }

    /// Adds `user` to a group (joining twice is fine; an invite-only one only with an
    /// invitation), and tells its online members.
    pub async fn join_group(&self, user: u64, name: &str) -> Result<(), ServiceError> {
        self.check_group_count(user, name).await?;
        match self
            .store
            .join_group(name, user, self.config.max_group_size)
            .await?
        {
            Join::Joined => {
                self.unless_deleted(user, name, Undo::Leave).await?;
                self.announce_group_change(user, name, true, None).await;
                Ok(())
            }
            Join::AlreadyMember => Ok(()),
            Join::Full => Err(ServiceError::GroupFull),
            Join::NoGroup => Err(ServiceError::UnknownGroup),
            Join::InviteOnly => Err(ServiceError::InviteOnly),
        }
    }

    /// `owner` invites `user` to a group it owns (the only way into an invite-only one: the
    /// user's join then lets them in), and tells them if they are online. Joining stays the
    /// user's choice: no one is put in a group, and its messages, unasked.
    pub async fn invite(&self, owner: u64, name: &str, user: u64) -> Result<(), ServiceError> {
        // Ownership first (the store checks it again): no one else learns whether the user
        // exists.
        match self.store.group_info(name).await? {
            None => return Err(ServiceError::UnknownGroup),
            Some(info) if info.owner != owner => return Err(ServiceError::NotOwner),
            Some(_) => {}
        }
        self.known_user(user).await?;
        if self.store.blocks(user, owner).await? {
            return Err(ServiceError::Blocked);
        }
        // A cap, checked before the store call (invitations at once may pass it by a few):
        // the user can decline them (a leave), and no one fills their list for good.
        if self.store.user_invitations(user).await?.len() >= MAX_INVITATIONS_LISTED {
            return Err(ServiceError::TooManyInvitations);
        }
        match self
            .store
            .invite(name, owner, user, self.config.max_group_size)
            .await?
        {
            Invite::Invited => {
                self.unless_deleted(user, name, Undo::Decline).await?;
                tracing::info!(owner, user, group = name, "invited");
                self.announce_invitation(owner, name, user).await;
                Ok(())
            }
            Invite::AlreadyInvited | Invite::AlreadyMember => Ok(()),
            Invite::Full => Err(ServiceError::TooManyInvitations),
            Invite::NoGroup => Err(ServiceError::UnknownGroup),
            Invite::NotOwner => Err(ServiceError::NotOwner),
        }
    }

    /// `owner` removes `user` from a group it owns (removing oneself is leaving), or
    /// withdraws their invitation; a removed member and the group's other online members are
    /// told. In an open group the removed member may join again.
    pub async fn remove_member(
        &self,
        owner: u64,
        name: &str,
        user: u64,
    ) -> Result<(), ServiceError> {
        if user == owner {
            return self.leave_group(owner, name).await;
        }
        match self.store.remove_member(name, owner, user).await? {
            Removal::Removed => {
                tracing::info!(owner, user, group = name, "member removed");
                self.announce_group_change(user, name, false, Some(owner))
                    .await;
                Ok(())
            }
            Removal::Uninvited => Ok(()),
            Removal::NotMember => Err(ServiceError::NoSuchMember),
            Removal::NoGroup => Err(ServiceError::UnknownGroup),
            Removal::NotOwner => Err(ServiceError::NotOwner),
        }
    }

    /// `owner` hands a group it owns to `user`, one of its members, and stays a member; the
    /// invitations are void, as when an owner leaves. `user` is told if online. Handing it to
    /// oneself changes nothing. A user whose account is gone (deleted, with its clean-up
    /// not done) is refused `unknown_user`, and a group handed to it meanwhile handed back:
    /// it would never leave, and no one could act as owner again.
    pub async fn transfer_group(
        &self,
        owner: u64,
        name: &str,
        user: u64,
    ) -> Result<(), ServiceError> {
        // Checked before too: the handover voids the invitations, which a refused one must
        // not.
        if !self.store.user_exists(user).await? {
            return Err(ServiceError::UnknownUser);
        }
        match self.store.transfer_group(name, owner, user).await? {
            Transfer::Transferred if user == owner => Ok(()),
            Transfer::Transferred => {
                self.unless_deleted(user, name, Undo::HandBackTo(owner))
                    .await?;
                tracing::info!(owner, user, group = name, "group handed over");
                self.announce_new_owner(owner, name, user, true).await;
                Ok(())
            }
            Transfer::NotMember => Err(ServiceError::NoSuchMember),
            Transfer::NotOwner => Err(ServiceError::NotOwner),
            Transfer::NoGroup => Err(ServiceError::UnknownGroup),
        }
    }

    /// Refuses to put `user` in one more group than `max_groups_per_user` (joining one it is
    /// in already is fine): each of a user's groups is read at every login and logout of
    /// theirs, to tell its members. Checked before the store call, so joins at once may pass
    /// it by a few; a cap, not an invariant.
    async fn check_group_count(&self, user: u64, name: &str) -> Result<(), ServiceError> {
        let groups = self.store.user_groups(user).await?;
        let limit = self.config.max_groups_per_user;
        if groups.len() >= limit && !groups.iter().any(|g| g == name) {
            return Err(ServiceError::TooManyGroups(limit));
        }
        Ok(())
    }

    /// Removes `user` from a group, and tells its online members.
    pub async fn leave_group(&self, user: u64, name: &str) -> Result<(), ServiceError> {
        // Read first: an owner's leave passes the group on, and the heir is told.
        let owned = self
            .store
            .group_info(name)
            .await?
            .is_some_and(|info| info.owner == user);
        if self.store.leave_group(name, user).await? {
            self.announce_group_change(user, name, false, None).await;
            // The leave is made: a store error past it is logged, not answered, or the user
            // would be told its leave failed.
            let heir = match owned {
                true => self.pass_over_deleted_heirs(name).await,
                false => Ok(None),
            };
            match heir {
                Ok(Some(heir)) => self.announce_new_owner(user, name, heir, false).await,
                Ok(None) => {}
                Err(e) => tracing::warn!(
                    user,
                    group = name,
                    error = %e,
                    "group left; passing over its deleted heirs failed"
                ),
            }
            Ok(())
        } else if self.store.decline_invitation(name, user).await? {
            Ok(())
        } else if self.store.group_size(name).await? == 0 {
            Err(ServiceError::UnknownGroup)
        } else {
            Err(ServiceError::NotMember)
        }
    }

    /// Takes out of group `name` an heir whose account is gone (a deletion whose tidying
    /// failed left it a member), so the group passes on to a member who can act as its owner:
    /// a group owned by no one who can would be stuck. At most [`DELETED_HEIRS_PASSED`] in a
    /// row. Returns the owner the group has then (`None`: its last member left).
    async fn pass_over_deleted_heirs(&self, name: &str) -> Result<Option<u64>, ServiceError> {
        for _ in 0..DELETED_HEIRS_PASSED {
            let Some(info) = self.store.group_info(name).await? else {
                return Ok(None);
            };
            if self.store.user_exists(info.owner).await? {
                return Ok(Some(info.owner));
            }
            tracing::warn!(
                user = info.owner,
                group = name,
                "deleted heir taken out of the group"
            );
            self.store.leave_group(name, info.owner).await?;
        }
        Ok(self.store.group_info(name).await?.map(|info| info.owner))
    }

    /// Members of a group with their presence, sorted by name, for `caller`, who must be one:
    /// anyone else could watch the members come and go online.
    pub async fn group_members(
        &self,
        caller: u64,
        name: &str,
    ) -> Result<Vec<Member>, ServiceError> {
        let ids = self.members_for(name, caller).await?;
        // Read after the members: an owner who left meanwhile has passed the group on.
        let owner = self.store.group_info(name).await?.map(|info| info.owner);
        // A big group's listing reads a route and an account per member: it is read at most
        // once a second, whoever asks and however often (any user may join any group).
        let big = ids.len() >= BIG_GROUP_LISTING;
        if big
            && let Some((at, members)) = lock(&self.member_listings).get(name)
            && at.elapsed() < BIG_GROUP_LISTING_AGE
        {
            return Ok(members.clone());
        }
        let routes = self.store.routes(&ids).await?;
        let online: std::collections::HashSet<u64> = ids
            .iter()
            .zip(routes)
            .filter(|(_, r)| r.as_ref().is_some_and(|r| r.confirmed))
            .map(|(id, _)| *id)
            .collect();
        let mut members: Vec<Member> = self
            .store
            .accounts_by_id(&ids)
            .await?
            .into_iter()
            .map(|a| Member {
                online: online.contains(&a.id),
                owner: owner == Some(a.id),
                id: a.id,
                name: a.name,
            })
            .collect();
        members.sort_by(|a, b| by_name(&a.name, &b.name));
        if big {
            let mut listings = lock(&self.member_listings);
            listings.retain(|_, (at, _)| at.elapsed() < BIG_GROUP_LISTING_AGE);
            listings.insert(name.to_string(), (Instant::now(), members.clone()));
        }
        Ok(members)
    }

    /// The account named `name` (in any case: `Alice` finds alice), whether it is online,
    /// and if not when it was last seen, for `caller`: how a user finds the id of someone
    /// offline, whom the online list leaves out. A user who blocks `caller` shows offline and
    /// never seen to it, as the online list cannot hide them; a user who hides its last seen
    /// shows none, and a `caller` who hides its own sees none.
    pub async fn user_named(&self, caller: u64, name: &str) -> Result<NamedUser, ServiceError> {
        // No account has a name outside the rule: nothing else becomes a store key.
        validate_name(name).map_err(|_| ServiceError::UnknownUser)?;
        let account = self
            .store
            .account_by_name(name)
            .await?
            .ok_or(ServiceError::UnknownUser)?;
        if self.store.blocks(account.id, caller).await? {
            return Ok(NamedUser {
                id: account.id,
                name: account.name,
                online: false,
                last_seen_ms: None,
                status: None,
            });
        }
        // Side by side: the status costs no round trip of its own.
        let user = [account.id];
        let (status, route) = tokio::join!(self.store.statuses(&user), self.store.routes(&user));
        let status = status?.pop().flatten();
        let route = route?.pop().flatten();
        let online = route.is_some_and(|r| r.confirmed);
        // Hidden by the user, or by the caller: who hides its own sees no one's.
        let hidden = async {
            let hiding = self
                .store
                .hidden(&[account.id, caller], Privacy::LastSeen)
                .await?;
            Ok::<_, ServiceError>(hiding.contains(&true))
        };
        let last_seen_ms = if online || hidden.await? {
            None
        } else {
            self.store.last_seen(account.id).await?
        };
        Ok(NamedUser {
            id: account.id,
            name: account.name,
            online,
            last_seen_ms,
            status,
        })
    }

    /// `user` sets its status, a line about itself that others see when they look it up by
    /// name (`:who`), or clears it with an empty one. One line (no control or invisible
    /// characters: [`cim_core::text::is_control_or_format`]), its blanks between words made
    /// one space, at most [`MAX_STATUS_CHARS`] characters. Returns the status kept.
    pub async fn set_status(
        &self,
        user: u64,
        status: &str,
    ) -> Result<Option<String>, ServiceError> {
        if status.chars().any(cim_core::text::is_control_or_format) {
            return Err(ServiceError::BadRequest(
                "a status is one line of text, without control or invisible characters".into(),
            ));
        }
        // Blanks between words come as one space: a status reads as a line, not a layout.
        let status = status.split_whitespace().collect::<Vec<_>>().join(" ");
        if status.chars().count() > MAX_STATUS_CHARS {
            return Err(ServiceError::BadRequest(format!(
                "a status is at most {MAX_STATUS_CHARS} characters"
            )));
        }
        let status = status.as_str();
        let kept = (!status.is_empty()).then_some(status);
        if !self.store.set_status(user, kept).await? {
            return Err(ServiceError::UnknownUser);
        }
        Ok(kept.map(str::to_string))
    }

    /// Whether `user` hides `what`.
    pub async fn hides(&self, user: u64, what: Privacy) -> Result<bool, ServiceError> {
        Ok(self.store.hidden(&[user], what).await? == [true])
    }

    /// `user` hides (or shows again) `what`, and, as the price, sees no one else's:
    /// - when it was last seen: a lookup by name shows it offline without a time;
    /// - that it read others' messages: it gives no receipts, and is given none (those kept
    ///   for it stay, unlisted, for when it shows them again).
    pub async fn set_hidden(
        &self,
        user: u64,
        what: Privacy,
        hidden: bool,
    ) -> Result<(), ServiceError> {
        self.store.set_hidden(user, what, hidden).await?;
        tracing::info!(user, ?what, hidden, "hidden or shown");
        Ok(())
    }

    /// The user of `claims` read `sender`'s private messages up to `up_to_msg_id`: the
    /// receipt is kept for `sender` in place of the reader's last (one no further on is
    /// dropped) and told to `sender` if online. It goes nowhere, as the reader is not told,
    /// when the reader or `sender` hides read receipts or `sender` blocks the reader.
    /// `unknown_user` for an account that is gone; at most [`READ_RECEIPTS_PER_USER`] a
    /// minute.
    pub async fn mark_read(
        &self,
        claims: &Claims,
        sender: u64,
        up_to_msg_id: u64,
    ) -> Result<(), ServiceError> {
        let reader = claims.user_id;
        if sender == reader {
            return Err(ServiceError::BadRequest(
                "a read receipt is for another user's messages".into(),
            ));
        }
        self.issued_at(up_to_msg_id)?;
        self.hit_within(
            &self.receipt_counts,
            reader,
            READ_RECEIPTS_PER_USER,
            "too many read receipts this minute; retry in a minute",
            || format!("read receipts of user {reader} over the limit"),
        )?;
        // Three reads, side by side.
        let readers = [reader];
        let (exists, hides, blocked) = tokio::try_join!(
            self.store.user_exists(sender),
            self.store.hidden(&readers, Privacy::ReadReceipts),
            self.store.blocks(sender, reader),
        )?;
        let hides = hides == [true];
        if !exists {
            return Err(ServiceError::UnknownUser);
        }
        if hides || blocked {
            return Ok(());
        }
        let receipt = ReadReceipt {
            reader,
            up_to_msg_id,
            at_ms: now_ms(),
        };
        if !(self
            .store
            .add_read_receipt(sender, &receipt, MAX_READ_RECEIPTS)
            .await?)
        {
            return Ok(());
        }
        self.config.metrics.read_receipts.inc();
        let notice = ReadReceiptNotice {
            reader_id: reader,
            reader_name: claims.user_name.clone(),
            up_to_msg_id,
            read_at_ms: receipt.at_ms,
        };
        let notice = Notice::Control(server_control::Kind::ReadReceipt(notice));
        // Not waited for: the answer takes as long whether the receipt was kept or not.
        self.notify_online_later(vec![sender], notice, RECEIPT_NOTICE_WAIT);
        Ok(())
    }

    /// The read receipts kept for `user`'s messages, the latest first: none when `user` hides
    /// its own, and none from readers who hide theirs now, whom `user` blocks, or whose
    /// accounts are gone.
    pub async fn read_receipts(&self, user: u64) -> Result<Vec<ReceiptView>, ServiceError> {
        if self.hides(user, Privacy::ReadReceipts).await? {
            return Ok(Vec::new());
        }
        let mut receipts = self.store.read_receipts(user).await?;
        receipts.sort_unstable_by_key(|r| (Reverse((r.at_ms, r.up_to_msg_id)), r.reader));
        let readers: Vec<u64> = receipts.iter().map(|r| r.reader).collect();
        // Three reads, side by side.
        let (hiding, blocked, accounts) = tokio::try_join!(
            self.store.hidden(&readers, Privacy::ReadReceipts),
            self.store.blocked_users(user),
            self.store.accounts_by_id(&readers),
        )?;
        let names: HashMap<u64, String> = accounts.into_iter().map(|a| (a.id, a.name)).collect();
        Ok(receipts
            .into_iter()
            .zip(hiding)
            .filter(|(r, hides)| !hides && blocked.binary_search(&r.reader).is_err())
            .filter_map(|(r, _)| {
                Some(ReceiptView {
                    reader: r.reader,
                    name: names.get(&r.reader)?.clone(),
                    up_to_msg_id: r.up_to_msg_id,
                    at_ms: r.at_ms,
                })
            })
            .collect())
    }

    /// `user` blocks `other`: `other`'s private messages to `user` are refused (`blocked`)
    /// from now on, and so are its invitations to groups. Returns `other`'s name and whether
    /// it was blocked already. Messages stored before stay, and groups are shared as before.
    pub async fn block(&self, user: u64, other: u64) -> Result<(String, bool), ServiceError> {
        if other == user {
            return Err(ServiceError::BadRequest("you cannot block yourself".into()));
        }
        let name = self.known_name(other).await?;
        match self.store.block_user(user, other, MAX_BLOCKED).await? {
            Block::Blocked => {
                tracing::info!(user, blocked = other, "user blocked");
                Ok((name, false))
            }
            Block::AlreadyBlocked => Ok((name, true)),
            Block::Full => Err(ServiceError::TooManyBlocked(MAX_BLOCKED)),
        }
    }

    /// `user` unblocks `other`. Returns whether it was blocked.
    pub async fn unblock(&self, user: u64, other: u64) -> Result<bool, ServiceError> {
        let was = self.store.unblock_user(user, other).await?;
        if was {
            tracing::info!(user, unblocked = other, "user unblocked");
        }
        Ok(was)
    }

    /// The user of `claims` reports `user` to the operators (spam, abuse), with `reason` in its
    /// own words (at most [`MAX_REPORT_REASON`] bytes, may be empty), at most
    /// [`REPORTS_PER_USER`] a minute. The report is kept with both names (the admin page shows
    /// the newest) and logged, unless the reporter reported `user` within
    /// [`REPORT_ONCE_PER`]: one user's repeats would push others' reports off the page.
    /// Returns `user`'s name and whether it was reported lately (nothing kept).
    pub async fn report_user(
        &self,
        claims: &Claims,
        user: u64,
        reason: &str,
    ) -> Result<(String, bool), ServiceError> {
        let reason = reason.trim();
        if reason.len() > MAX_REPORT_REASON {
            return Err(ServiceError::BadRequest(format!(
                "a report's reason is at most {MAX_REPORT_REASON} bytes"
            )));
        }
        if user == claims.user_id {
            return Err(ServiceError::BadRequest(
                "you cannot report yourself".into(),
            ));
        }
        let reporter = claims.user_id;
        self.hit_within(
            &self.report_counts,
            reporter,
            REPORTS_PER_USER,
            "too many reports this minute; retry in a minute",
            || format!("reports of user {reporter} over the limit"),
        )?;
        let reported = self.known_name(user).await?;
        let report = Report {
            at_ms: now_ms(),
            reporter_id: reporter,
            reporter: claims.user_name.clone(),
            reported_id: user,
            reported: reported.clone(),
            reason: reason.to_string(),
        };
        let kept = (self.store)
            .add_report(&report, MAX_REPORTS_KEPT, REPORT_ONCE_PER)
            .await?;
        if !kept {
            return Ok((reported, true));
        }
        self.config.metrics.reports.inc();
        tracing::warn!(reporter, reported = user, reason, "user reported");
        Ok((reported, false))
    }

    /// The newest `limit` reports, newest first (for the admin page).
    pub async fn reports(&self, limit: usize) -> Result<Vec<Report>, ServiceError> {
        Ok(self.store.reports(limit).await?)
    }

    /// The users `user` blocks, by id. Blocks of accounts deleted since are dropped here, so
    /// they stop counting against [`MAX_BLOCKED`].
    pub async fn blocked_users(&self, user: u64) -> Result<Vec<BlockedUser>, ServiceError> {
        let ids = self.store.blocked_users(user).await?;
        let accounts = self.store.accounts_by_id(&ids).await?;
        if accounts.len() < ids.len() {
            let live: std::collections::HashSet<u64> = accounts.iter().map(|a| a.id).collect();
            // Side by side: up to MAX_BLOCKED of them.
            let gone = ids.iter().filter(|id| !live.contains(id));
            futures_util::future::try_join_all(gone.map(|g| self.store.unblock_user(user, *g)))
                .await?;
        }
        Ok(accounts
            .into_iter()
            .map(|a| BlockedUser {
                id: a.id,
                name: a.name,
            })
            .collect())
    }

    /// Groups `user` belongs to, and those whose invitations wait for it.
    pub async fn my_groups(&self, user: u64) -> Result<MyGroups, ServiceError> {
        Ok(MyGroups {
            groups: self.store.user_groups(user).await?,
            invitations: self.store.user_invitations(user).await?,
        })
    }

    /// Queues telling the online users who share a group with `user` that it came online or
    /// left (see [`crate::presence`]). Best effort: presence is not stored, failures are
    /// logged.
    pub fn announce_presence(&self, user: u64, online: bool) {
        self.presence.announce(user, online);
    }

    /// Tells the users who share a group with `user` that it is now `online` (or offline).
    pub(crate) async fn announce_now(&self, user: u64, online: bool) {
        if let Err(e) = self.try_announce_presence(user, online).await {
            tracing::debug!(user, error = %e, "presence not announced");
        }
    }

    async fn try_announce_presence(&self, user: u64, online: bool) -> Result<(), ServiceError> {
        let groups = self.store.user_groups(user).await?;
        if groups.is_empty() {
            return Ok(());
        }
        // Read a few at a time, not one after another: a user may be in a thousand groups.
        let store = &self.store;
        let members: Vec<Option<Vec<u64>>> = futures_util::stream::iter(groups)
            .map(|group| async move { store.group_members(&group).await })
            .buffer_unordered(PRESENCE_GROUP_READS)
            .try_collect()
            .await?;
        let mut peers: std::collections::BTreeSet<u64> =
            members.into_iter().flatten().flatten().collect();
        peers.remove(&user);
        let peers: Vec<u64> = peers.into_iter().collect();
        let Some(name) = self.user_name(user).await? else {
            return Ok(());
        };
        let presence = Presence {
            user_id: user,
            name,
            online,
        };
        self.notify_online(&peers, Notice::Presence(presence)).await
    }

    /// Tells the group's other online members that `user` joined it (or left it), or that
    /// the owner `by` removed `user`, who is then told too, in a group of any size. Best
    /// effort, as presence: not stored, failures logged, and given up after
    /// [`GROUP_CHANGE_WAIT`] (the change is answered after it, so that one client's changes
    /// are told in the order it made them).
    async fn announce_group_change(&self, user: u64, group: &str, joined: bool, by: Option<u64>) {
        let announce = self.try_announce_group_change(user, group, joined, by);
        within_group_change_wait("group change", user, group, announce).await;
    }

    async fn try_announce_group_change(
        &self,
        user: u64,
        group: &str,
        joined: bool,
        by: Option<u64>,
    ) -> Result<(), ServiceError> {
        let mut told = self.group_change_audience(group).await?;
        let actor = by.unwrap_or(user);
        told.retain(|&member| member != actor);
        if by.is_some() && !told.contains(&user) {
            told.push(user);
        }
        if told.is_empty() {
            return Ok(());
        }
        let Some(name) = self.user_name(user).await? else {
            return Ok(());
        };
        let by_name = match by {
            Some(by) => self.user_name(by).await?.unwrap_or_default(),
            None => String::new(),
        };
        let change = GroupChange {
            group: group.to_string(),
            user_id: user,
            name,
            joined,
            by_user_id: by.unwrap_or(0),
            by_name,
        };
        self.notify_online(&told, Notice::GroupChange(change)).await
    }

    /// Tells `new_owner`, if online, that it owns the group now: its owner, `previous`, handed
    /// it over (`handed_over`), or left and it was the heir; and
    /// the group's other online members (in a group of at most [`GROUP_CHANGE_MAX_MEMBERS`],
    /// as for a group change) who owns it. Best effort, as group changes: waits at most
    /// [`GROUP_CHANGE_WAIT`].
    async fn announce_new_owner(
        &self,
        previous: u64,
        group: &str,
        new_owner: u64,
        handed_over: bool,
    ) {
        let announce = async {
            let previous_name = self.user_name(previous).await?;
            let owner = GroupOwner {
                group: group.to_string(),
                previous_owner_id: previous,
                previous_owner_name: previous_name.clone().unwrap_or_default(),
                handed_over,
            };
            let notice = Notice::Control(server_control::Kind::GroupOwner(owner));
            let heir = [new_owner];
            let tell_owner = self.notify_online(&heir, notice);
            // The rest of the group, as a group change is told, at the same time; not of an
            // owner whose account is gone (its groups are left after the account), as a
            // group change is not.
            let tell_others = async {
                let Some(previous_owner_name) = previous_name else {
                    return Ok(());
                };
                let mut others = self.group_change_audience(group).await?;
                others.retain(|m| *m != new_owner && *m != previous);
                if others.is_empty() {
                    return Ok(());
                }
                let Some(owner_name) = self.user_name(new_owner).await? else {
                    return Ok(());
                };
                let change = GroupOwnerChange {
                    group: group.to_string(),
                    owner_id: new_owner,
                    owner_name,
                    previous_owner_id: previous,
                    previous_owner_name,
                    handed_over,
                };
                let notice = Notice::Control(server_control::Kind::GroupOwnerChange(change));
                self.notify_online(&others, notice).await
            };
            let (owner_told, others_told) = tokio::join!(tell_owner, tell_others);
            owner_told.and(others_told)
        };
        within_group_change_wait("new owner", previous, group, announce).await;
    }

    /// Tells `user`, if online, that `owner` invited them to `group`. Best effort, as group
    /// changes: waits at most [`GROUP_CHANGE_WAIT`].
    async fn announce_invitation(&self, owner: u64, group: &str, user: u64) {
        let announce = async {
            let by_name = self.user_name(owner).await?.unwrap_or_default();
            let invite = GroupInvite {
                group: group.to_string(),
                by_user_id: owner,
                by_name,
            };
            let notice = Notice::Control(server_control::Kind::GroupInvite(invite));
            self.notify_online(&[user], notice).await
        };
        within_group_change_wait("invitation", user, group, announce).await;
    }

    /// The members told of a change in `group`: all of them in a group of at most
    /// [`GROUP_CHANGE_MAX_MEMBERS`], none in a bigger one.
    async fn group_change_audience(&self, group: &str) -> Result<Vec<u64>, ServiceError> {
        // Sized first: a big group's members are not read at all (and checked again after
        // the read, as joins may have come between).
        if self.store.group_size(group).await? > GROUP_CHANGE_MAX_MEMBERS {
            return Ok(Vec::new());
        }
        let members = self.store.group_members(group).await?.unwrap_or_default();
        if members.len() > GROUP_CHANGE_MAX_MEMBERS {
            return Ok(Vec::new());
        }
        Ok(members)
    }

    /// `unknown_user` if `user` has no account (cheaper than [`Service::known_name`]).
    async fn known_user(&self, user: u64) -> Result<(), ServiceError> {
        match self.store.user_exists(user).await? {
            true => Ok(()),
            false => Err(ServiceError::UnknownUser),
        }
    }

    /// `user`'s name, or `unknown_user` if there is no such account.
    async fn known_name(&self, user: u64) -> Result<String, ServiceError> {
        self.user_name(user).await?.ok_or(ServiceError::UnknownUser)
    }

    async fn user_name(&self, user: u64) -> Result<Option<String>, ServiceError> {
        Ok(self
            .store
            .accounts_by_id(&[user])
            .await?
            .pop()
            .map(|a| a.name))
    }

    /// Passes `notice` to those of `users` who are online, one request per server holding
    /// some of them. Best effort: a failed push is logged.
    async fn notify_online(&self, users: &[u64], notice: Notice) -> Result<(), ServiceError> {
        notify_online(&*self.store, &self.links, users, notice).await
    }

    /// [`Service::notify_online`] on a task of its own, given at most `wait`: the caller
    /// answers at once, in the same time whether anyone was told or not.
    fn notify_online_later(&self, users: Vec<u64>, notice: Notice, wait: Duration) {
        let (store, links) = (self.store.clone(), self.links.clone());
        tokio::spawn(async move {
            let push = notify_online(&*store, &links, &users, notice);
            match tokio::time::timeout(wait, push).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(?users, error = %e, "notice not told"),
                Err(_) => tracing::debug!(?users, "notice timed out"),
            }
        });
    }

    /// Remembers a refusal or failure for the admin page.
    pub fn record_error(&self, code: &str, message: String) {
        let mut recent = lock(&self.recent_errors);
        if recent.len() == RECENT_ERRORS {
            recent.pop_front();
        }
        recent.push_back(RecentError {
            at_ms: now_ms(),
            code: code.to_string(),
            message,
        });
    }

    /// The latest refusals and failures, newest last.
    pub fn recent_errors(&self) -> Vec<RecentError> {
        lock(&self.recent_errors).iter().cloned().collect()
    }

    /// Every server in discovery, whether it is linked, and messages forwarded by it.
    pub fn server_overview(&self) -> Vec<(ServerInfo, bool, u64)> {
        self.servers
            .borrow()
            .iter()
            .map(|s| {
                (
                    s.clone(),
                    self.links.is_connected(&s.id),
                    self.links.forwarded(&s.id),
                )
            })
            .collect()
    }

    /// Servers that are in discovery and reachable over a live link.
    pub fn usable_servers(&self) -> Vec<ServerInfo> {
        let usable: Vec<ServerInfo> = self
            .servers
            .borrow()
            .iter()
            .filter(|s| self.links.is_connected(&s.id))
            .cloned()
            .collect();
        self.config.metrics.linked_servers.set(usable.len() as i64);
        usable
    }

    /// Whether a route's server counts as alive for a login: it is in discovery and its link
    /// from this router did not go down. One not linked yet (this router just started, or is
    /// still dialing) counts as alive: taking its users' routes would let a second login in
    /// beside a live session.
    fn server_alive(&self, server_id: &str) -> bool {
        self.servers.borrow().iter().any(|s| s.id == server_id) && !self.links.link_lost(server_id)
    }

    /// Whether the router can serve: the store answers and at least one server is linked.
    pub async fn ready(&self) -> Result<(), String> {
        // A scan at most a second old answers for the store: probes need no fresher one.
        let online = self
            .online_scan(Duration::from_secs(1))
            .await
            .map_err(|e| format!("store: {e}"))?;
        self.config.metrics.online_users.set(online.len() as i64);
        if self.usable_servers().is_empty() {
            return Err("no server linked".into());
        }
        if self
            .ids
            .node(now_ms(), tokio::time::Instant::now())
            .is_none()
        {
            return Err("no message-id node held".into());
        }
        Ok(())
    }
}

/// Passes `notice` to those of `users` who are online, one request per server holding some of
/// them. Best effort: a failed push is logged.
async fn notify_online(
    store: &dyn Store,
    links: &Arc<ServerLinks>,
    users: &[u64],
    notice: Notice,
) -> Result<(), ServiceError> {
    let routes = store.routes(users).await?;
    let mut by_server: HashMap<String, Vec<u64>> = HashMap::new();
    for (&user, route) in users.iter().zip(routes) {
        if let Some(route) = route.filter(|r| r.confirmed) {
            by_server.entry(route.server_id).or_default().push(user);
        }
    }
    if by_server.is_empty() {
        // No one to tell (a login storm's users are mostly alone): no task for it.
        return Ok(());
    }
    // In a task of its own: a caller that stops waiting (a join whose announcement took
    // longer than `GROUP_CHANGE_WAIT`) leaves the pushes to land late, not to be lost.
    let links = links.clone();
    let pushing = tokio::spawn(async move {
        let pushes = by_server.into_iter().map(|(server, recipients)| {
            let (links, notice) = (&links, notice.clone());
            async move {
                if let Err(e) = links.notify(&server, recipients, notice).await {
                    tracing::debug!(%server, error = %e, "notice push failed");
                }
            }
        });
        join_all(pushes).await;
    });
    let _ = pushing.await;
    Ok(())
}

/// Runs `announce` (of a change in `group` concerning `user`, `what` it is) for at most
/// [`GROUP_CHANGE_WAIT`]: best effort, a failure or a timeout is logged, not returned (its
/// pushes, in a task of their own, may still land).
async fn within_group_change_wait(
    what: &str,
    user: u64,
    group: &str,
    announce: impl std::future::Future<Output = Result<(), ServiceError>>,
) {
    match tokio::time::timeout(GROUP_CHANGE_WAIT, announce).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(what, user, group, error = %e, "not announced"),
        Err(_) => tracing::debug!(what, user, group, "announcement timed out"),
    }
}

/// Counts one waiter in a gauge for as long as it lives (a send given up while it waits, too).
struct Waiting<'a>(&'a Gauge);

impl<'a> Waiting<'a> {
    fn on(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

fn shard(group: &str) -> usize {
    (cim_core::fnv::fnv1a(group.as_bytes()) % GROUP_LOCKS as u64) as usize
}

/// Most bytes of message text (bodies, names, groups) in one pull reply: 200 entries of 16 KiB
/// would be over 3 MB, held by the server until its client reads it.
const MAX_PULL_BYTES: usize = 512 * 1024;

/// Longest name a login is checked for (registration allows 32 bytes).
const MAX_LOGIN_NAME: usize = 64;

/// A name of 1-32 characters of A-Z, a-z, 0-9, '_', '-', '.', not dots alone (`..` in a URL
/// path is read as "the folder above" by most HTTP clients).
fn validate_name(name: &str) -> Result<(), ServiceError> {
    if cim_core::names::is_valid_name(name) {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(format!(
            "name must be {}",
            cim_core::names::NAME_RULE
        )))
    }
}

/// A user name as [`validate_name`] has it, and not digits alone: the console reads
/// `42;;hello` as user id 42, so a user named `42` could not be told apart from the user with
/// that id. Names registered before this rule still log in.
fn validate_user_name(name: &str) -> Result<(), ServiceError> {
    validate_name(name)?;
    if name.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ServiceError::BadRequest(
            "name must not be digits alone (they read as a user id)".into(),
        ));
    }
    Ok(())
}

fn validate_group_name(name: &str) -> Result<(), ServiceError> {
    if name == BROADCAST_GROUP {
        return Err(ServiceError::BadRequest(format!(
            "{BROADCAST_GROUP:?} is reserved for everyone online"
        )));
    }
    validate_name(name).map_err(|_| {
        ServiceError::BadRequest(format!("group name must be {}", cim_core::names::NAME_RULE))
    })
}

fn validate_password(password: &str) -> Result<(), ServiceError> {
    if (4..=256).contains(&password.len()) {
        Ok(())
    } else {
        Err(ServiceError::BadRequest(
            "password must be 4-256 bytes long".into(),
        ))
    }
}

/// The refusal of a token whose login ended for `why`.
fn ended(why: Revocation) -> ServiceError {
    match why {
        Revocation::Replaced => ServiceError::LoggedInElsewhere,
        _ => ServiceError::SessionEnded("it was logged out or re-logged in already"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_plain_and_not_dots_alone() {
        for good in ["alice", "a.b", "x", "A_b-9", ".hidden", &"n".repeat(32)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in ["", ".", "..", "...", "a b", "é", "a/b", &"n".repeat(33)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_group_name("all").is_err());
        assert!(validate_user_name("42").is_err(), "digits read as an id");
        assert!(validate_user_name("r2d2").is_ok());
        assert!(
            validate_group_name("42").is_ok(),
            "a group is named after #"
        );
    }

    #[test]
    fn a_slow_online_scan_answers_for_as_long_as_it_took() {
        let scan = |took_ms, ended_ms_ago| OnlineScan {
            covers: 0,
            at: Instant::now() - Duration::from_millis(ended_ms_ago),
            took: Duration::from_millis(took_ms),
            users: Arc::default(),
        };
        assert!(
            !scan(10, 20).fresh_enough(Duration::ZERO),
            "a fast one never"
        );
        assert!(
            scan(10, 20).fresh_enough(Duration::from_secs(1)),
            "as asked"
        );
        assert!(scan(200, 20).fresh_enough(Duration::ZERO));
        assert!(!scan(200, 400).fresh_enough(Duration::ZERO));
    }

    #[test]
    fn a_fingerprint_tells_targets_and_bodies_apart() {
        let message = |target, body: &str| ChatMessage {
            target: Some(target),
            body: body.into(),
            ..Default::default()
        };
        let hi_bob = send_fingerprint(&message(Target::ToUser(2), "hi"));
        assert_eq!(hi_bob, send_fingerprint(&message(Target::ToUser(2), "hi")));
        // The FNV-1a of b"u", 2u64 LE and b"hi" (as Python computes it): routers of every
        // build must agree on it.
        assert_eq!(hi_bob, 0x297b_0c90_9cc5_3865, "{hi_bob:#x}");
        let others = [
            message(Target::ToUser(3), "hi"),
            message(Target::ToUser(2), "hi!"),
            message(Target::Group("team".into()), "hi"),
            message(Target::Group("tea".into()), "mhi"),
        ];
        let mut all: Vec<u64> = others.iter().map(send_fingerprint).collect();
        all.push(hi_bob);
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), 5);
    }

    #[test]
    fn online_listings_come_in_pages_by_name() {
        let online: Vec<OnlineUser> = ["al", "alice", "amy", "Bea", "bob", "bobby", "carl"]
            .iter()
            .zip(1..)
            .map(|(name, id)| OnlineUser {
                id,
                name: name.to_string(),
            })
            .collect();
        let names = |page: OnlinePage| {
            let names: Vec<String> = page.users.into_iter().map(|u| u.name).collect();
            (names.join(" "), page.more)
        };
        let page = |prefix, after, limit| names(online_page(&online, prefix, after, limit));
        assert_eq!(
            page("", "", 10),
            ("al alice amy Bea bob bobby carl".into(), false)
        );
        assert_eq!(page("", "", 2), ("al alice".into(), true));
        assert_eq!(page("", "alice", 2), ("amy Bea".into(), true));
        assert_eq!(page("", "Bea", 2), ("bob bobby".into(), true));
        // A prefix in any case.
        assert_eq!(page("b", "", 5), ("Bea bob bobby".into(), false));
        assert_eq!(page("BO", "", 5), ("bob bobby".into(), false));
        assert_eq!(page("b", "Bea", 1), ("bob".into(), true));
        assert_eq!(page("", "bobby", 2), ("carl".into(), false));
        assert_eq!(page("a", "", 3), ("al alice amy".into(), false));
        assert_eq!(page("a", "", 2), ("al alice".into(), true));
        assert_eq!(page("a", "alice", 2), ("amy".into(), false));
        // A cursor before the prefix starts at the prefix; one past it ends the listing.
        assert_eq!(page("bob", "al", 5), ("bob bobby".into(), false));
        assert_eq!(page("al", "b", 5), (String::new(), false));
        assert_eq!(page("zed", "", 5), (String::new(), false));
        assert_eq!(page("", "", 0), (String::new(), true));
        let many: Vec<OnlineUser> = (0..MAX_ONLINE_PAGE as u64 + 5)
            .map(|id| OnlineUser {
                id,
                name: format!("u{id:05}"),
            })
            .collect();
        let capped = online_page(&many, "", "", usize::MAX);
        assert_eq!((capped.users.len(), capped.more), (MAX_ONLINE_PAGE, true));
    }

    /// A service on the memory store, with no servers and a cheap password cost.
    fn service() -> Service {
        let mut config = RouterConfig::new(
            "router-test",
            "127.0.0.1:0".parse().unwrap(),
            "unused.pem".into(),
            "unused.key".into(),
            "unused-ca.pem".into(),
            cim_core::token::TokenKey::new(&[7; 32]),
        );
        config.password_cost = password::Cost {
            memory_kib: 64,
            iterations: 1,
        };
        let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let (_, servers) = watch::channel(Arc::new(Vec::new()));
        Service::new(
            Arc::new(config),
            Arc::new(crate::store::MemoryStore::new()),
            servers,
            Arc::new(ServerLinks::new(endpoint)),
        )
    }

    #[tokio::test]
    async fn an_unknown_name_costs_a_password_check_like_a_wrong_password() {
        let service = service();
        service
            .register("known", "right password", None)
            .await
            .unwrap();
        let wrong = service.check_credentials("known", "wrong password").await;
        assert!(matches!(wrong, Err(ServiceError::InvalidCredentials)));
        assert!(service.stand_in_hash.get().is_none());
        let unknown = service.check_credentials("nobody", "any password").await;
        assert!(matches!(unknown, Err(ServiceError::InvalidCredentials)));
        let stand_in = service
            .stand_in_hash
            .get()
            .expect("checked against a stand-in hash");
        assert!(
            stand_in.starts_with("$argon2id$v=19$m=64,t=1"),
            "{stand_in}"
        );
        assert!(
            service
                .check_credentials("known", "right password")
                .await
                .is_ok()
        );
    }
}
