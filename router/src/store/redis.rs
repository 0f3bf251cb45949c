//! Redis [`Store`] for clusters. Uses a `ConnectionManager`, which reconnects by itself: while
//! Redis is down every call fails fast with [`StoreError::Unavailable`] and service resumes
//! when it is back, without restarting cim.
//!
//! Key layout (documented in ARCHITECTURE.md). Per-user keys share the hash tag `{u<id>}`, so
//! a user's keys live in one Redis Cluster slot and single-user scripts stay cluster-safe:
//!
//! | key | type | content |
//! |---|---|---|
//! | `cim:next_user_id` | string | last assigned user id (INCR) |
//! | `cim:name:<name>` | string | user id owning `<name>` (SET NX makes names unique) |
//! | `cim:fold:<name in lower case>` | string | user id owning the name in any case ([`folded_name_key`]) |
//! | `cim:gfold:<name in lower case>` | string | name of the group owning the name in any case ([`folded_group_key`]) |
//! | `cim:{u<id>}:account` | hash | `name`, `pw` (argon2 PHC string), `status` (if set) |
//! | `cim:{u<id>}:route` | string, PX lease | `<session_id>\|<confirmed 0/1>\|<server_id>` |
//! | `cim:online` | set | ids of users with a confirmed route (filtered against routes on read) |
//! | `cim:server:{<server_id>}:users` | set | ids routed to that server (for cleanup and lease renewal) |
//! | `cim:{u<id>}:seq` | string | last inbox sequence number of the user (INCR, never reset) |
//! | `cim:{u<id>}:inbox` | sorted set, PX ttl | score seq, member `<seq>:<entry bytes>` ([`InboxEntry::encode`]) |
//! | `cim:{u<id>}:m:<msg_id>` | string, PX dedup window | seq the message got in this inbox (idempotent append) |
//! | `cim:{u<id>}:sent:<client_msg_id>` | string `<msg id>:<fingerprint hex>`, PX dedup window | msg id given to the sender's message, and the message's fingerprint (a bare id: recorded by an older version) |
//! | `cim:{u<id>}:revoked:<session_id>` | string (`logout`, `replaced`, `relogin`), PX token lifetime | the login ended, and why |
//! | `cim:group:{<name>}:owner` | string | owner's user id (exists iff the group exists) |
//! | `cim:group:{<name>}:members` | set | member ids |
//! | `cim:{u<id>}:groups` | set | names of the user's groups |
//! | `cim:id_nodes` | hash | message-id node -> `<hold expires, ms>\|<issued until, ms>\|<owner>` (Redis clock for the expiry) |
//!
//! No `KEYS` anywhere; every multi-step change that must be atomic is one Lua script (over keys of one hash slot).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use crate::ids::issued_at_ms;

use super::{
    Account, Block, Claim, DeletedAccount, GroupInfo, ID_NODES, IdNode, InboxEntry, InboxLimits,
    InboxPage, Invite, Join, MAX_INVITATIONS_LISTED, Privacy, PrivateAppend, ReadReceipt, Relogin,
    Removal, Renewal, Report, Revocation, Route, Store, StoreError, Transfer,
};

const NEXT_USER_ID: &str = "cim:next_user_id";
const ID_NODES_KEY: &str = "cim:id_nodes";
const ONLINE: &str = "cim:online";
/// Users' reports of others (JSON), newest first, capped.
const REPORTS: &str = "cim:reports";

/// Present while `reporter`'s reports of `reported` are not kept again; in the hash slot of
/// [`REPORTS`] (its tag is that key's whole name), so one script checks it and keeps a
/// report.
fn reported_key(reporter: u64, reported: u64) -> String {
    format!("{{{REPORTS}}}:reported:{reporter}:{reported}")
}

/// Keeps a report unless its pair was reported lately. KEYS: the reports, the pair's mark.
/// ARGV: the report's JSON, the cap, how long the mark lasts (ms). Returns 1 kept, 0 not.
const ADD_REPORT: &str = r"
if not redis.call('SET', KEYS[2], '1', 'NX', 'PX', ARGV[3]) then return 0 end
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('LTRIM', KEYS[1], 0, tonumber(ARGV[2]) - 1)
return 1
";

fn name_key(name: &str) -> String {
    format!("cim:name:{name}")
}
/// Holds the id of the account whose name is `name` in lower case, so that names are unique
/// whatever their case (an account made before these keys has none until
/// [`RedisStore::fold_names`] adds it).
fn folded_name_key(name: &str) -> String {
    format!("cim:fold:{}", cim_core::names::folded(name))
}
/// Holds the name of the group whose name is `name` in lower case, so that group names are
/// unique whatever their case (a group made before these keys has none until
/// [`RedisStore::fold_group_names`] adds it; one deleted leaves its key, which the next
/// group of that name in any case takes over).
fn folded_group_key(name: &str) -> String {
    format!("cim:gfold:{}", cim_core::names::folded(name))
}
fn account_key(user: u64) -> String {
    format!("cim:{{u{user}}}:account")
}
fn login_key(user: u64) -> String {
    format!("cim:{{u{user}}}:login")
}
fn route_key(user: u64) -> String {
    format!("cim:{{u{user}}}:route")
}
fn server_users_key(server_id: &str) -> String {
    format!("cim:server:{{{server_id}}}:users")
}
fn seq_key(user: u64) -> String {
    format!("cim:{{u{user}}}:seq")
}
fn inbox_key(user: u64) -> String {
    format!("cim:{{u{user}}}:inbox")
}
fn appended_key(user: u64, msg_id: u64) -> String {
    format!("cim:{{u{user}}}:m:{msg_id}")
}
fn revoked_key(user: u64, session_id: u64) -> String {
    format!("{}{session_id}", revoked_prefix(user))
}
/// The revocation keys of `user` without the session (the claim script adds it).
fn revoked_prefix(user: u64) -> String {
    format!("cim:{{u{user}}}:revoked:")
}
fn group_owner_key(name: &str) -> String {
    format!("cim:group:{{{name}}}:owner")
}
fn group_members_key(name: &str) -> String {
    format!("cim:group:{{{name}}}:members")
}
/// Present (`1`) while the group is invite-only; a group created before invite-only groups
/// existed has none, and is open.
fn group_invite_only_key(name: &str) -> String {
    format!("cim:group:{{{name}}}:invite_only")
}
/// Invited users who have not joined yet.
fn group_invited_key(name: &str) -> String {
    format!("cim:group:{{{name}}}:invited")
}
/// When the user was last seen (ms since the Unix epoch, Redis's clock): written by the route
/// scripts that confirm and release routes, kept without expiry.
fn last_seen_key(user: u64) -> String {
    format!("cim:{{u{user}}}:seen")
}
/// Present (`1`) while the user hides `what`.
fn hides_key(user: u64, what: Privacy) -> String {
    let what = match what {
        Privacy::LastSeen => "seen",
        Privacy::ReadReceipts => "reads",
    };
    format!("cim:{{u{user}}}:hides_{what}")
}
/// Receipts for the user's messages: a hash of reader id -> `<msg id>:<read at, ms>`, whose
/// expiry each receipt renews.
fn read_receipts_key(user: u64) -> String {
    format!("cim:{{u{user}}}:reads")
}
/// How long a user's receipts are kept after the latest: a month.
const READ_RECEIPTS_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// The users `user` blocks (a set of ids), under `user`'s hash tag: a private message's append
/// to `user`'s inbox reads it in the same script.
fn blocked_key(user: u64) -> String {
    format!("cim:{{u{user}}}:blocked")
}
fn user_groups_key(user: u64) -> String {
    format!("cim:{{u{user}}}:groups")
}
/// Groups whose invitations may wait for the user: added after an invitation is stored, taken
/// out by a join or a removal; a group deleted or passed on leaves its name here, and the
/// listing drops what the group no longer holds.
fn user_invites_key(user: u64) -> String {
    format!("cim:{{u{user}}}:invites")
}

/// Creates a group with its owner as its first member, all or nothing. KEYS: owner,
/// members, invite-only, invited. ARGV: owner, `1` for invite-only. Returns 1 created, 0 the
/// name is taken.
const CREATE_GROUP: &str = r"
if not redis.call('SET', KEYS[1], ARGV[1], 'NX') then return 0 end
redis.call('SADD', KEYS[2], ARGV[1])
if ARGV[2] == '1' then redis.call('SET', KEYS[3], '1') else redis.call('DEL', KEYS[3]) end
redis.call('DEL', KEYS[4])
return 1
";

/// Leaves a group, and deletes the group with its invitations once its last member left (its
/// name is free again); an owner who leaves hands the group to the member with the lowest id
/// (compared as decimal strings: Lua's numbers would round ids past 2^53), without the
/// invitations it made, which the new owner could not see. KEYS: owner,
/// members, invite-only, invited. ARGV: user. Returns 1 if the user was a member.
const LEAVE: &str = r"
local removed = redis.call('SREM', KEYS[2], ARGV[1])
if removed == 1 then
  if redis.call('SCARD', KEYS[2]) == 0 then
    redis.call('DEL', KEYS[1], KEYS[3], KEYS[4])
  elseif redis.call('GET', KEYS[1]) == ARGV[1] then
    local heir = nil
    for _, m in ipairs(redis.call('SMEMBERS', KEYS[2])) do
      if heir == nil or #m < #heir or (#m == #heir and m < heir) then heir = m end
    end
    redis.call('SET', KEYS[1], heir)
    redis.call('DEL', KEYS[4])
  end
end
return removed
";

/// Joins a group under its cap; an invite-only one only with an invitation, which the join
/// uses up. KEYS: owner, members, invite-only, invited. ARGV: user, cap. Returns 1 joined,
/// 2 already a member, 3 full, 4 invite-only and not invited, 0 no such group.
const JOIN: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then
  redis.call('SREM', KEYS[4], ARGV[1])
  return 2
end
if redis.call('EXISTS', KEYS[3]) == 1 and redis.call('SISMEMBER', KEYS[4], ARGV[1]) == 0 then
  return 4
end
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[2]) then return 3 end
redis.call('SREM', KEYS[4], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
";

/// Lua: whether ARGV[1] owns the group (KEYS[1] names it, and it is a member of KEYS[2]: a
/// group made before owners passed it on may name one who left). Returns nil for no group.
macro_rules! owner_function {
    () => {
        r"
local function owned()
  local owner = redis.call('GET', KEYS[1])
  if not owner then return nil end
  return owner == ARGV[1] and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1
end
"
    };
}

/// The owner invites a user. KEYS: the group's four (owner, members, invite-only, invited).
/// ARGV: owner, user, cap on waiting invitations. Returns 1 invited, 2 already invited,
/// 3 already a member, 4 too many invitations wait, 5 not the owner, 0 no such group.
const INVITE: &str = concat!(
    owner_function!(),
    r"
local owns = owned()
if owns == nil then return 0 end
if not owns then return 5 end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 1 then return 3 end
if redis.call('SISMEMBER', KEYS[4], ARGV[2]) == 1 then return 2 end
if redis.call('SCARD', KEYS[4]) >= tonumber(ARGV[3]) then return 4 end
redis.call('SADD', KEYS[4], ARGV[2])
return 1
"
);

/// The owner removes another member, or withdraws an invitation. KEYS: the group's four.
/// ARGV: owner, user. Returns 1 removed, 4 uninvited, 2 neither a member (nor the
/// owner itself) nor invited, 3 not the owner, 0 no such group.
const REMOVE_MEMBER: &str = concat!(
    owner_function!(),
    r"
local owns = owned()
if owns == nil then return 0 end
if not owns then return 3 end
if ARGV[2] == ARGV[1] then return 2 end
local uninvited = redis.call('SREM', KEYS[4], ARGV[2])
if redis.call('SREM', KEYS[2], ARGV[2]) == 1 then return 1 end
if uninvited == 1 then return 4 end
return 2
"
);

/// The owner hands the group to another member; the invitations go, as when an owner leaves
/// (the new owner could not see them). KEYS: the group's four. ARGV: owner, user. Returns 1
/// handed over (or the user is the owner, when nothing changes), 2 the user is no member, 3
/// not the owner, 0 no such group.
const TRANSFER: &str = concat!(
    owner_function!(),
    r"
local owns = owned()
if owns == nil then return 0 end
if not owns then return 3 end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return 2 end
if ARGV[2] == ARGV[1] then return 1 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[4])
return 1
"
);

/// Replaces an account's password hash if it is still the one given. KEYS: account. ARGV:
/// expected hash, new hash. Returns 1 if replaced.
const SET_PASSWORD: &str = r"
if redis.call('HGET', KEYS[1], 'pw') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'pw', ARGV[2])
return 1
";

/// Deletes an account and the keys kept for its user alone, in one step (all in the user's
/// hash slot), and revokes the user's latest login as logged out. KEYS: account, groups list,
/// invitations list, latest login, then the user's other keys. ARGV: the user's revocation
/// keys without the session (as for [`CLAIM`]), the revocation's lifetime in ms. Returns
/// false if there is no account, else {name, groups, invitations}.
const DELETE_ACCOUNT: &str = r"
local name = redis.call('HGET', KEYS[1], 'name')
if not name then return false end
local groups = redis.call('SMEMBERS', KEYS[2])
local invitations = redis.call('SMEMBERS', KEYS[3])
local last = redis.pcall('GET', KEYS[4])
if type(last) == 'string' and string.match(last, '^%d+$') then
  redis.call('SET', ARGV[1] .. last, 'logout', 'PX', ARGV[2])
end
redis.call('DEL', unpack(KEYS))
return {name, groups, invitations}
";

/// Moves a name from one user to another (or frees it, for none) if it still names the
/// first. KEYS: the name's key. ARGV: the user it names, the new one or ''. Returns 1 if moved.
const MOVE_NAME: &str = r"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], ARGV[2])
end
return 1
";

/// Sets (or, with no value, clears) an account's status if the account exists: a bare `HSET`
/// on a deleted account would make a hash its claim script takes for a live account. KEYS:
/// account. ARGV: the status, if any. Returns 1 if the account exists.
const SET_STATUS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] then
  redis.call('HSET', KEYS[1], 'status', ARGV[1])
else
  redis.call('HDEL', KEYS[1], 'status')
end
return 1
";

/// Keeps a reader's receipt unless the sender hides receipts or the reader's kept one is as
/// far on; a new reader past the cap pushes out the one read longest ago (of those read at
/// once, the lowest reader id). KEYS: receipts,
/// the sender's hides-receipts. ARGV: reader, msg id, read at ms, cap, ttl ms. Message ids are
/// compared as decimal strings (Lua's numbers are doubles). Returns 1 kept, 0 not.
const ADD_READ_RECEIPT: &str = r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local id = string.match(old, '^(%d+):') or ''
  if #id > #ARGV[2] or (#id == #ARGV[2] and id >= ARGV[2]) then return 0 end
elseif redis.call('HLEN', KEYS[1]) >= tonumber(ARGV[4]) then
  local kept = redis.call('HGETALL', KEYS[1])
  local oldest, oldest_at
  for i = 1, #kept, 2 do
    local at = tonumber(string.match(kept[i + 1], ':(%d+)$') or '0')
    local earlier = oldest_at and (at < oldest_at or (at == oldest_at and tonumber(kept[i]) < tonumber(oldest)))
    if not oldest_at or earlier then oldest, oldest_at = kept[i], at end
  end
  redis.call('HDEL', KEYS[1], oldest)
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
return 1
";

/// Adds a user to a blocked set unless it holds the cap already. KEYS: the set. ARGV: user,
/// cap. Returns 1 blocked, 2 blocked already, 0 at the cap.
const BLOCK: &str = r"
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 1 then return 2 end
if redis.call('SCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SADD', KEYS[1], ARGV[1])
return 1
";

fn sent_key(sender: u64, client_msg_id: u64) -> String {
    format!("cim:{{u{sender}}}:sent:{client_msg_id}")
}

/// Lua function shared by the append scripts ([`APPEND`] and the others): appends an entry
/// once per message id and returns its seq, given `seen`, the appended-marker as the script
/// read it (the seq of an earlier append of the message, or false). KEYS[1..3]: seq, inbox,
/// appended-marker. ARGV: entry bytes, max length, inbox ttl ms, dedup ms.
macro_rules! append_function {
    () => {
        r"
local function append(seen)
  if seen then return tonumber(seen) end
  local seq = redis.call('INCR', KEYS[1])
  redis.call('ZADD', KEYS[2], seq, seq .. ':' .. ARGV[1])
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -(tonumber(ARGV[2]) + 1))
  redis.call('PEXPIRE', KEYS[2], ARGV[3])
  redis.call('SET', KEYS[3], seq, 'PX', ARGV[4])
  return seq
end
"
    };
}

/// Lua function shared by [`APPEND_UNSEND`] and [`APPEND_PRIVATE_UNSEND`]: puts `entry`, an unsend, in the
/// place of the message it takes back in `inbox` (keeping its seq), and says whether it found
/// it. The message is the member whose entry starts with `wanted` (its id and sender, 16
/// bytes) and whose group field is `group` (its `u32` length and bytes: the length alone,
/// zero, for a private message). It is looked for at the seq its append `marker` names while
/// that lasts (10 minutes), else by a scan from the inbox's newest entry, in pages, that stops
/// at an entry stored before `not_before` (ms; the message is newer) and reads at most
/// `budget` bytes of entries (and one page past; 0 for a group's, whose members' inboxes are
/// not scanned), so that an unsend, made up or not, costs Redis a bounded read.
macro_rules! take_back_function {
    () => {
        r"
local function take_back(inbox, marker, wanted, group, budget, entry, not_before)
  local function replace(member)
    local colon = string.find(member, ':', 1, true)
    if not colon or string.sub(member, colon + 1, colon + 16) ~= wanted then return false end
    local b1, b2, b3, b4 = string.byte(member, colon + 25, colon + 28)
    if not b4 then return false end
    local group_at = colon + 29 + ((b1 * 256 + b2) * 256 + b3) * 256 + b4
    if string.sub(member, group_at, group_at + #group - 1) ~= group then return false end
    local seq = string.sub(member, 1, colon - 1)
    redis.call('ZREM', inbox, member)
    redis.call('ZADD', inbox, seq, seq .. ':' .. entry)
    return true
  end
  local at = redis.call('GET', marker)
  if at then
    for _, member in ipairs(redis.call('ZRANGEBYSCORE', inbox, at, at)) do
      if replace(member) then return true end
    end
    return false
  end
  local from = 0
  while budget > 0 do
    local page = redis.call('ZREVRANGE', inbox, from, from + 49)
    if #page == 0 then return false end
    for _, member in ipairs(page) do
      if replace(member) then return true end
      local colon = string.find(member, ':', 1, true) or 0
      local stored_at = 0
      for i = colon + 17, colon + 24 do
        stored_at = stored_at * 256 + (string.byte(member, i) or 0)
      end
      if stored_at < not_before then return false end
      budget = budget - #member
    end
    from = from + 50
  end
  return false
end
"
    };
}

/// Appends an entry once per message id (see `append_function`). Returns the entry's seq.
/// The group messages' hot path: it defines nothing more.
const APPEND: &str = concat!(
    append_function!(),
    "return append(redis.call('GET', KEYS[3]))\n"
);

/// [`APPEND`] for an unsend in a group (ARGV[5..8]: the `wanted`, `group`, `budget` and
/// `not_before` of `take_back_function`; KEYS[4]: the marker of the message it takes back):
/// first puts it in that message's place, unless it is a resend.
const APPEND_UNSEND: &str = concat!(
    append_function!(),
    take_back_function!(),
    r"
local seen = redis.call('GET', KEYS[3])
if not seen then
  take_back(KEYS[2], KEYS[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[1], tonumber(ARGV[8]))
end
return append(seen)
"
);

/// The private append scripts' checks: nil for an unknown recipient, `{0, false, 0}` when the
/// recipient blocks the sender and the message was not stored before the block (a seq is
/// never 0); sets `resend`. KEYS: seq, inbox, appended-marker, account, route, blocked users;
/// ARGV[5]: the sender.
macro_rules! private_checks {
    () => {
        r"
if redis.call('EXISTS', KEYS[4]) == 0 then return false end
local resend = redis.call('GET', KEYS[3])
if redis.call('SISMEMBER', KEYS[6], ARGV[5]) == 1 and not resend then
  return {0, false, 0}
end
local replaced = 0
"
    };
}

/// The private append scripts' end: appends, and returns `{seq, route or false, replaced}`; a
/// route key of another type reads as false (the entry is appended by then).
macro_rules! private_append {
    () => {
        r"
local seq = append(resend)
local route = redis.pcall('GET', KEYS[5])
if type(route) == 'table' then route = false end
return {seq, route, replaced}
"
    };
}

/// [`APPEND`] for a private message, with the recipient's existence and its blocks checked
/// and its route read in the same call (all keys share the recipient's hash tag): KEYS as for
/// [`APPEND`], then account, route, blocked users; ARGV as for [`APPEND`], then the sender.
/// Returns as `private_checks` and `private_append` say (`replaced` 0).
const APPEND_PRIVATE: &str = concat!(append_function!(), private_checks!(), private_append!());

/// [`APPEND_PRIVATE`] for an unsend (KEYS[7]: the marker of the message it takes back;
/// ARGV[6..9]: the `wanted`, `group`, `budget` and `not_before` of `take_back_function`):
/// first puts it in that message's place, unless it is a resend.
const APPEND_PRIVATE_UNSEND: &str = concat!(
    append_function!(),
    take_back_function!(),
    private_checks!(),
    r"
if not resend and take_back(
  KEYS[2], KEYS[7], ARGV[6], ARGV[7], tonumber(ARGV[8]), ARGV[1], tonumber(ARGV[9])
) then
  replaced = 1
end
",
    private_append!()
);

/// The `wanted`, `group`, `budget` and `not_before` arguments of `take_back_function` for
/// `entry`, an unsend of message `unsent`.
fn take_back_args(entry: &InboxEntry, unsent: u64) -> [Vec<u8>; 4] {
    let budget = if entry.group.is_empty() {
        UNSEND_SCAN_BYTES
    } else {
        0
    };
    let not_before = issued_at_ms(unsent).saturating_sub(UNSEND_SCAN_SLACK.as_millis() as u64);
    let mut wanted = Vec::with_capacity(16);
    wanted.extend_from_slice(&unsent.to_be_bytes());
    wanted.extend_from_slice(&entry.from_user.to_be_bytes());
    let mut group = Vec::with_capacity(4 + entry.group.len());
    group.extend_from_slice(&(entry.group.len() as u32).to_be_bytes());
    group.extend_from_slice(entry.group.as_bytes());
    [
        wanted,
        group,
        budget.to_string().into_bytes(),
        not_before.to_string().into_bytes(),
    ]
}

/// Bytes of inbox entries a private unsend whose message's marker has expired reads, at most
/// (and a page of 50 entries past), looking for its message from the newest entry back: a
/// few thousand typical entries, 64 of the largest.
const UNSEND_SCAN_BYTES: usize = 1024 * 1024;
/// How long before the time in its id a message may have been stored, at most: the scan for
/// it stops at an entry stored earlier. A router issues ids up to two leases of its
/// message-id node (30 s by default) ahead of its clock, and routers' clocks differ.
const UNSEND_SCAN_SLACK: Duration = Duration::from_secs(600);

/// ARGV[1..4] of every append script: entry bytes, max length, inbox ttl ms, dedup ms.
fn append_args(entry: &InboxEntry, limits: InboxLimits) -> Vec<Vec<u8>> {
    vec![
        entry.encode(),
        limits.max_len.max(1).to_string().into_bytes(),
        (limits.ttl.as_millis() as u64).to_string().into_bytes(),
        (limits.dedup.as_millis() as u64).to_string().into_bytes(),
    ]
}

/// Splits a `<seq>:<entry>` inbox member into its seq and its encoded entry.
fn split_member(member: &[u8]) -> Option<(u64, &[u8])> {
    let colon = member.iter().position(|b| *b == b':')?;
    let seq = std::str::from_utf8(&member[..colon]).ok()?.parse().ok()?;
    Some((seq, &member[colon + 1..]))
}

fn encode_route(route: &Route) -> String {
    format!(
        "{}|{}|{}",
        route.session_id,
        u8::from(route.confirmed),
        route.server_id
    )
}

fn decode_route(value: &str) -> Result<Route, StoreError> {
    let mut parts = value.splitn(3, '|');
    let corrupt = || StoreError::Corrupt(format!("route {value:?}"));
    let session_id = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(corrupt)?;
    let confirmed = parts.next().ok_or_else(corrupt)? == "1";
    let server_id = parts.next().ok_or_else(corrupt)?.to_string();
    Ok(Route {
        server_id,
        session_id,
        confirmed,
    })
}

/// Logs an index update (a server's user set, the online set) that failed after the route
/// itself changed: the change stands, since failing it would make the caller retry a claim
/// that already won, or leave a login half done. The indexes repair themselves: the online set
/// is checked against routes when read and refilled by renewals, and a server's user set is
/// filled again by confirms and renewals (and read only to clean up after a departed server).
fn index_kept(result: Result<(), StoreError>, user: u64, after: &str) {
    if let Err(e) = result {
        tracing::warn!(user, after, error = %e, "route index not updated; it repairs itself");
    }
}

/// A route as read for a message's push, a listing or a claim's previous holder: one that
/// cannot be decoded (written by something else, or damaged) is logged and taken as no route
/// (it holds no session anyone can use). A private message is stored
/// before its route is read, and its recipient pulls it at the next connect, so an unreadable
/// route must not fail a stored message's send (the sender would resend it until its attempts
/// ran out) nor a group push to every other member.
fn readable_route(user: u64, value: Option<&[u8]>) -> Option<Route> {
    let value = value?;
    let decoded = std::str::from_utf8(value)
        .map_err(|_| StoreError::Corrupt(format!("route {:?}", String::from_utf8_lossy(value))))
        .and_then(decode_route);
    match decoded {
        Ok(route) => Some(route),
        Err(e) => {
            // Read on every send to the user until a login overwrites it: unreadable routes
            // (all of them together) are logged at the 1st, 2nd, 4th, 8th... reading, so a busy
            // recipient does not flood the log.
            static UNREADABLE: AtomicU64 = AtomicU64::new(0);
            let seen = UNREADABLE.fetch_add(1, Ordering::Relaxed) + 1;
            if seen.is_power_of_two() {
                tracing::warn!(user, error = %e, seen, "unreadable route taken as none");
            }
            None
        }
    }
}

/// Claims a route: refuses if one exists and force is off. Returns {won, previous or '', last
/// login or ''}. A
/// value that is not a route (of another type, or not of the route's form) holds no session
/// and never blocks a claim; it is overwritten (and returned, for the caller to log).
/// KEYS[2] records the session of the user's latest login (no expiry): a won claim writes its
/// own there and returns the one before ('' for none) as its third value.
/// A won claim revokes, in the same step, the replaced route's session and that last login
/// (unless either is the new session or ARGV[6], the re-login's own): `replaced`, for ARGV[4]
/// ms, at ARGV[5] .. session (the user's revocation keys, in the route key's hash slot).
/// KEYS[3] is the user's account: without one (deleted after its password or token was
/// checked) the script returns {3, '', ''} and claims nothing.
/// A re-login's claim also gives KEYS[4], the revocation marker of the token's login, with
/// ARGV[7] its lifetime in ms and ARGV[8] the session of the route the router checked the
/// token against ('' for none): it returns {2, '', ''} without claiming if the login has ended
/// or the route's session differs, and otherwise ends the login in the same step (without
/// one, ARGV[7] and ARGV[8] are empty). ARGV[9], unless empty, is a value of the route's form
/// the caller could not read (a damaged server id, say): held there, it does not block the
/// claim either.
const CLAIM: &str = r"
if redis.call('EXISTS', KEYS[3]) == 0 then return {3, '', ''} end
local cur = redis.pcall('GET', KEYS[1])
if type(cur) == 'table' then cur = false end
if KEYS[4] then
  if redis.call('EXISTS', KEYS[4]) == 1 then return {2, '', ''} end
  local session = cur and string.match(cur, '^(%d+)|[01]|') or ''
  if session ~= ARGV[8] then return {2, '', ''} end
  redis.call('SET', KEYS[4], 'relogin', 'PX', ARGV[7])
end
if cur and ARGV[3] == '0' and cur ~= ARGV[9] and string.match(cur, '^%d+|[01]|') then
  return {0, cur, ''}
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local last = redis.pcall('GET', KEYS[2])
if type(last) ~= 'string' then last = '' end
local new = string.match(ARGV[1], '^(%d+)|')
redis.call('SET', KEYS[2], new)
local previous = cur and string.match(cur, '^(%d+)|[01]|') or ''
for _, ended in ipairs({previous, last}) do
  if ended ~= '' and ended ~= new and ended ~= ARGV[6] then
    redis.call('SET', ARGV[5] .. ended, 'replaced', 'PX', ARGV[4])
  end
end
return {1, cur or '', last}
";

/// Lua function of the route scripts below: the route held at KEYS[1], or false for none. A
/// value that is not a route (of another type, or a string not of the route's form) holds no
/// session, as for [`CLAIM`]: it reads as none instead of failing the script (and, in a
/// pipeline, every renewal after it).
macro_rules! route_function {
    () => {
        r"
local function route()
  local cur = redis.pcall('GET', KEYS[1])
  if type(cur) ~= 'string' or not string.match(cur, '^%d+|[01]|') then return false end
  return cur
end
"
    };
}

/// Lua function of the route scripts that confirm or release a route: records its user as
/// seen now (Redis's clock, one for every router) in `key`, its last-seen key, unless a later
/// time is recorded there (a write of another router's that came first). A value of another
/// type or form is replaced.
macro_rules! seen_function {
    () => {
        r"
local function seen(key)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local old = redis.pcall('GET', key)
  if type(old) == 'string' and (tonumber(old) or 0) >= now then return end
  redis.call('SET', key, string.format('%d', now))
end
"
    };
}

/// Confirms a route if it still belongs to the session on the server and the session was not
/// revoked (a logout that came while its client was still connecting), and records the user
/// as seen. KEYS: route, the session's revocation marker, last seen. ARGV: session id, server
/// id, lease ms.
const CONFIRM: &str = concat!(
    route_function!(),
    seen_function!(),
    r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local cur = route()
if not cur then return 0 end
local sess, conf, server = string.match(cur, '^(%d+)|(%d)|(.*)$')
if sess ~= ARGV[1] or server ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], sess .. '|1|' .. server, 'PX', ARGV[3])
seen(KEYS[3])
return 1
"
);

/// Sets a confirmed route (with a fresh lease) unless another session holds the user or the
/// session was revoked (logged out, replaced, re-logged in).
/// KEYS: route, the session's revocation marker. ARGV: session id, route value, lease ms.
/// Returns 1 if renewed, 2 if set where there was no route, 0 if not set.
const RESTORE: &str = concat!(
    route_function!(),
    r"
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local cur = route()
if cur and string.match(cur, '^(%d+)|') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
if cur then return 1 end
return 2
"
);

/// Deletes a route if it belongs to the session (ARGV[1]) and, unless ARGV[2] is empty, to the
/// server ARGV[2], and records the user as seen. KEYS: route, last seen. Returns the deleted
/// value or ''.
const RELEASE: &str = concat!(
    route_function!(),
    seen_function!(),
    r"
local cur = route()
if not cur then return '' end
local session, server = string.match(cur, '^(%d+)|%d|(.*)$')
if session ~= ARGV[1] then return '' end
if ARGV[2] ~= '' and server ~= ARGV[2] then return '' end
redis.call('DEL', KEYS[1])
seen(KEYS[2])
return cur
"
);

/// Deletes a route if it is on the server, and records the user as seen. KEYS: route, last
/// seen. Returns 1 if deleted.
const REMOVE_IF_SERVER: &str = concat!(
    route_function!(),
    seen_function!(),
    r"
local cur = route()
if not cur then return 0 end
if string.match(cur, '^%d+|%d|(.*)$') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
seen(KEYS[2])
return 1
"
);

/// Accounts and routes in Redis.
pub struct RedisStore {
    conn: ConnectionManager,
    claim: Script,
    confirm: Script,
    release: Script,
    remove_if_server: Script,
    restore: Script,
    append: Script,
    append_unsend: Script,
    append_private: Script,
    append_private_unsend: Script,
    create_group: Script,
    join: Script,
    invite: Script,
    remove_member: Script,
    leave: Script,
    block: Script,
    add_read_receipt: Script,
    add_report: Script,
    set_status: Script,
    set_password: Script,
    delete_account: Script,
    transfer: Script,
    move_name: Script,
    claim_id_node: Script,
    renew_id_node: Script,
    release_id_node: Script,
}

/// One read per item of `items`, in order: the command `add` puts in the pipeline for it,
/// [`READ_CHUNK`] to a pipeline.
async fn read_each<I, T: redis::FromRedisValue>(
    conn: &mut ConnectionManager,
    items: &[I],
    add: impl Fn(&mut redis::Pipeline, &I),
) -> Result<Vec<T>, StoreError> {
    let mut read = Vec::with_capacity(items.len());
    for chunk in items.chunks(READ_CHUNK) {
        let mut pipe = redis::pipe();
        for item in chunk {
            add(&mut pipe, item);
        }
        let answers: Vec<T> = pipe.query_async(conn).await.map_err(unavailable)?;
        read.extend(answers);
    }
    Ok(read)
}

/// For each of `keys`, in order, whether its set holds `member` (`SISMEMBER`s).
async fn set_holds(
    conn: &mut ConnectionManager,
    keys: &[String],
    member: u64,
) -> Result<Vec<bool>, StoreError> {
    read_each(conn, keys, |pipe, key| {
        pipe.sismember(key, member);
    })
    .await
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Checks that Redis takes `SET` with both `NX` and `GET` (Redis 7.0 and newer), which
/// `message_id` relies on, so that an older Redis is refused at start, by name, instead of
/// failing every send. A probe of the command itself, not of the version string, so that
/// Redis-compatible servers and Redis with `INFO` denied by ACL work.
async fn probe_set_nx_get(conn: &mut ConnectionManager) -> Result<(), StoreError> {
    let probe: redis::RedisResult<Option<String>> =
        set_unless_present("cim:probe:set-nx-get", "1", 1000)
            .query_async(conn)
            .await;
    match probe {
        Ok(_) => Ok(()),
        Err(e) if e.code().is_some() => Err(StoreError::Unavailable(format!(
            "Redis 7.0 or newer is needed (SET with NX and GET was refused: {e})"
        ))),
        Err(e) => Err(unavailable(e)),
    }
}

/// Warns unless Redis is set never to evict keys (`maxmemory-policy noeviction`, Redis's
/// default): evicting a user's `seq` counter would start the inbox at 1 again (and the
/// client would drop the new messages as seen), evicting the `sent:`/`m:` records would
/// store a resend twice. Only a warning: managed Redis often refuses `CONFIG`, and the
/// policy can change later.
async fn check_eviction_policy(conn: &mut ConnectionManager) {
    let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query_async(conn)
        .await;
    match policy.as_deref() {
        Ok([_, policy]) if policy == "noeviction" => {}
        Ok([_, policy]) => tracing::warn!(
            policy = %policy,
            "Redis may evict keys (maxmemory-policy is not noeviction): evicted inbox counters \
             or dedup records lose or repeat messages; set maxmemory-policy noeviction"
        ),
        Ok(_) | Err(_) => {
            tracing::info!("could not read Redis's maxmemory-policy; it must be noeviction")
        }
    }
}

/// Lua: Redis's clock in ms, the one hold expiries are kept in (each router's own clock would
/// do only if all agreed).
macro_rules! now_ms {
    () => {
        "local t = redis.call('TIME')\n\
         local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// [`Store::claim_id_node`]. KEYS[1]: [`ID_NODES_KEY`]. ARGV: owner, first node, lease ms,
/// issue-until ms, node count. Returns `{node, issued until ms of the previous holder}` or nil.
/// The record keeps the later of the two bounds (the new holder's ids start after the old
/// one's). A record that cannot be read holds nothing.
const CLAIM_ID_NODE: &str = concat!(
    now_ms!(),
    r"
local nodes = tonumber(ARGV[5])
for i = 0, nodes - 1 do
  local node = tostring((tonumber(ARGV[2]) + i) % nodes)
  local held = redis.call('HGET', KEYS[1], node)
  local expires, issued = 0, '0'
  if held then
    local e, u = string.match(held, '^(%d+)|(%d+)|')
    if e then expires, issued = tonumber(e), u end
  end
  if expires <= now then
    local bound = math.max(tonumber(ARGV[4]), tonumber(issued))
    redis.call('HSET', KEYS[1], node,
      string.format('%.0f|%.0f|%s', now + tonumber(ARGV[3]), bound, ARGV[1]))
    return {node, issued}
  end
end
return false
"
);

/// [`Store::renew_id_node`]. KEYS[1]: [`ID_NODES_KEY`]. ARGV: owner, node, lease ms,
/// issue-until ms. Returns 1, or 0 if another owner holds the node. A missing record (Redis
/// lost it) is written again: nobody else claimed the node since.
const RENEW_ID_NODE: &str = concat!(
    now_ms!(),
    r"
local issued = tonumber(ARGV[4])
local held = redis.call('HGET', KEYS[1], ARGV[2])
if held then
  local u, owner = string.match(held, '^%d+|(%d+)|(.*)$')
  if owner ~= ARGV[1] then return 0 end
  issued = math.max(issued, tonumber(u))
end
redis.call('HSET', KEYS[1], ARGV[2],
  string.format('%.0f|%.0f|%s', now + tonumber(ARGV[3]), issued, ARGV[1]))
return 1
"
);

/// [`Store::release_id_node`]. KEYS[1]: [`ID_NODES_KEY`]. ARGV: owner, node.
const RELEASE_ID_NODE: &str = r"
local held = redis.call('HGET', KEYS[1], ARGV[2])
if not held then return 0 end
local u, owner = string.match(held, '^%d+|(%d+)|(.*)$')
if owner ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], ARGV[2], '0|' .. u .. '|' .. owner)
return 1
";

/// Commands per pipeline: a group's fan-out or a server's lease renewal goes to Redis in
/// pieces this size, [`PIPELINES_IN_FLIGHT`] at a time, so neither the router nor Redis holds
/// one huge batch (a 16 KiB message to 10,000 members was 160 MB of commands at once, and its
/// entry copied once per member).
const PIPELINE_CHUNK: usize = 256;

/// Pipelines of one call sent before the first is answered.
const PIPELINES_IN_FLIGHT: usize = 4;

/// Plain reads per pipeline (routes, accounts): a listing of everyone online or a broadcast
/// reads one per online user, and in one pipeline 100,000 of them were one reply held at once
/// and one stretch of Redis's time past the 2 s response timeout.
const READ_CHUNK: usize = 1024;

/// `SET key value NX PX ttl_ms GET`: stores `value` unless `key` holds one, and replies with
/// the value it already held (nil when it stored ours).
fn set_unless_present(key: &str, value: &str, ttl_ms: u64) -> redis::Cmd {
    let mut cmd = redis::cmd("SET");
    cmd.arg(key)
        .arg(value)
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms)
        .arg("GET");
    cmd
}

/// One `SCAN` page (about 1,000 keys) of the keys matching `pattern` from `cursor`: the next
/// cursor (0 at the end) and the keys.
async fn scan_page(
    conn: &mut ConnectionManager,
    cursor: u64,
    pattern: &str,
) -> Result<(u64, Vec<String>), StoreError> {
    redis::cmd("SCAN")
        .arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000)
        .query_async(conn)
        .await
        .map_err(unavailable)
}

/// What [`RedisStore::fold_names`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FoldedNames {
    /// Names given their folded key now.
    pub added: u64,
    /// Names that had it already (about: a `SCAN` may give a key twice).
    pub present: u64,
    /// Name keys naming no account (not an id, or one a deletion left behind: the name's next
    /// registration takes it over).
    pub skipped: u64,
    /// Names whose folded key another account's name (the same in another case) holds, with
    /// the holder's, at most [`FoldedNames::CLASHES_LISTED`]: both accounts stay, each found
    /// by its own name as registered, and the other cases find the key's holder (whichever
    /// came first in the scan, or was made since).
    pub clashes: Vec<(String, String)>,
    /// How many clashes there were in all.
    pub clash_count: u64,
}

impl FoldedNames {
    /// Clashing names listed, at most.
    pub const CLASHES_LISTED: usize = 100;
}

impl RedisStore {
    /// Gives each account made before names were unique whatever their case its folded name
    /// key ([`folded_name_key`]), so that no new account takes its name in another case. Run
    /// once after every router is upgraded (`cim-router --fold-names`); running it again
    /// changes nothing. A `SCAN` over the name keys; each page's names are read, checked
    /// and folded in a few pipelines, and only a folded key that is taken is looked at alone.
    pub async fn fold_names(&self) -> Result<FoldedNames, StoreError> {
        let mut conn = self.conn();
        let mut done = FoldedNames::default();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = scan_page(&mut conn, cursor, &name_key("*")).await?;
            self.fold_page(&mut conn, &keys, &mut done).await?;
            if next == 0 {
                return Ok(done);
            }
            cursor = next;
        }
    }

    /// Gives each group made before group names were unique whatever their case its folded
    /// key ([`folded_group_key`]), so that no new group takes its name in another case; as
    /// [`RedisStore::fold_names`] does for accounts (run by the same `--fold-names`), over
    /// the groups' owner keys. A clash is two groups whose names differ only in case: both
    /// stay, and the key names the first one seen.
    pub async fn fold_group_names(&self) -> Result<FoldedNames, StoreError> {
        let mut conn = self.conn();
        let mut done = FoldedNames::default();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = scan_page(&mut conn, cursor, &group_owner_key("*")).await?;
            self.fold_group_page(&mut conn, &keys, &mut done).await?;
            if next == 0 {
                return Ok(done);
            }
            cursor = next;
        }
    }

    /// [`RedisStore::fold_group_names`] for one page of group owner keys.
    async fn fold_group_page(
        &self,
        conn: &mut ConnectionManager,
        keys: &[String],
        done: &mut FoldedNames,
    ) -> Result<(), StoreError> {
        let (prefix, suffix) = ("cim:group:{", "}:owner");
        let names: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(prefix)?.strip_suffix(suffix))
            .collect();
        // Redis refuses an empty pipeline: a page with nothing to ask about asks nothing.
        if names.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.set_nx(folded_group_key(name), *name);
        }
        let set: Vec<bool> = pipe.query_async(conn).await.map_err(unavailable)?;
        let held: Vec<&str> = names
            .iter()
            .zip(set)
            .filter_map(|(name, set)| (!set).then_some(*name))
            .collect();
        done.added += (names.len() - held.len()) as u64;
        if held.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for name in &held {
            pipe.get(folded_group_key(name));
        }
        let holders: Vec<Option<String>> = pipe.query_async(conn).await.map_err(unavailable)?;
        for (name, holder) in held.into_iter().zip(holders) {
            if holder.as_deref() == Some(name) {
                done.present += 1;
            } else if self.claim_group_name(conn, name).await? {
                // Held for a group that is gone, or freed meanwhile: taken over.
                done.added += 1;
            } else {
                done.clash_count += 1;
                if done.clashes.len() < FoldedNames::CLASHES_LISTED {
                    done.clashes
                        .push((name.to_string(), holder.unwrap_or_default()));
                }
            }
        }
        Ok(())
    }

    /// [`RedisStore::fold_names`] for one page of name keys.
    async fn fold_page(
        &self,
        conn: &mut ConnectionManager,
        keys: &[String],
        done: &mut FoldedNames,
    ) -> Result<(), StoreError> {
        let prefix = name_key("");
        let names: Vec<&str> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix))
            .collect();
        // Redis refuses an empty pipeline: a page with nothing to ask about asks nothing.
        if names.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.get(name_key(name));
        }
        let holders: Vec<Option<String>> = pipe.query_async(conn).await.map_err(unavailable)?;
        let named: Vec<(&str, u64)> = names
            .iter()
            .zip(holders)
            .filter_map(|(name, id)| Some((*name, id?.parse().ok()?)))
            .collect();
        done.skipped += (names.len() - named.len()) as u64;
        if named.is_empty() {
            return Ok(());
        }
        // A name a deletion left behind names no one: its next registration takes it.
        let named_count = named.len();
        let mut pipe = redis::pipe();
        for (_, id) in &named {
            pipe.exists(account_key(*id));
        }
        let live: Vec<bool> = pipe.query_async(conn).await.map_err(unavailable)?;
        let named: Vec<(&str, u64)> = named
            .into_iter()
            .zip(live)
            .filter_map(|(named, live)| live.then_some(named))
            .collect();
        done.skipped += (named_count - named.len()) as u64;
        if named.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (name, id) in &named {
            pipe.set_nx(folded_name_key(name), *id);
        }
        let set: Vec<bool> = pipe.query_async(conn).await.map_err(unavailable)?;
        let (set, held): (Vec<_>, Vec<_>) = named.into_iter().zip(set).partition(|(_, set)| *set);
        done.added += set.len() as u64;
        if held.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for ((name, _), _) in &held {
            pipe.get(folded_name_key(name));
        }
        let holders: Vec<Option<String>> = pipe.query_async(conn).await.map_err(unavailable)?;
        for (((name, id), _), holder) in held.into_iter().zip(holders) {
            if holder.as_deref() == Some(id.to_string().as_str()) {
                done.present += 1;
            } else if self.claim_name(conn, &folded_name_key(name), id).await? {
                // Held by an account that is gone, or freed meanwhile: taken over.
                done.added += 1;
            } else {
                done.clash_count += 1;
                if done.clashes.len() < FoldedNames::CLASHES_LISTED {
                    let holder = holder.and_then(|h| h.parse::<u64>().ok());
                    let holder = match holder {
                        Some(holder) => self.accounts_by_id(&[holder]).await?.pop(),
                        None => None,
                    };
                    let holder = holder.map(|a| a.name).unwrap_or_default();
                    done.clashes.push((name.to_string(), holder));
                }
            }
        }
        Ok(())
    }

    /// Runs one of the group scripts with `keys` and `args`; returns its outcome code and the
    /// connection, for the user-side index writes that follow.
    async fn group_script(
        &self,
        script: &Script,
        keys: [String; 4],
        args: &[String],
    ) -> Result<(i64, ConnectionManager), StoreError> {
        let mut conn = self.conn();
        let mut invocation = script.prepare_invoke();
        for key in keys {
            invocation.key(key);
        }
        for arg in args {
            invocation.arg(arg);
        }
        let outcome = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        Ok((outcome, conn))
    }

    /// Gives the name key `key` ([`name_key`], [`folded_name_key`]) to the account `id`,
    /// unless another account has it: a key left naming an account that is gone (a deletion
    /// that stopped before it freed the name) is taken over. Returns whether `id` has it.
    async fn claim_name(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
        id: u64,
    ) -> Result<bool, StoreError> {
        // Twice: a name freed between the attempt and the read is tried again.
        for _ in 0..2 {
            let won: bool = conn.set_nx(key, id).await.map_err(unavailable)?;
            if won {
                return Ok(true);
            }
            let holder: Option<String> = conn.get(key).await.map_err(unavailable)?;
            let Some(holder) = holder else { continue };
            let Ok(holder) = holder.parse::<u64>() else {
                return Ok(false);
            };
            // Ids are never given again: an account gone stays gone.
            if self.user_exists(holder).await? {
                return Ok(false);
            }
            if self
                .move_name(conn, key, &holder.to_string(), &id.to_string())
                .await?
            {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Gives the folded key of group name `name` ([`folded_group_key`]) to that group, unless
    /// another group of that name in another case exists: a key left naming a group that is
    /// gone is taken over. Returns whether `name` has it.
    async fn claim_group_name(
        &self,
        conn: &mut ConnectionManager,
        name: &str,
    ) -> Result<bool, StoreError> {
        let key = folded_group_key(name);
        // Twice: a key freed between the attempt and the read is tried again.
        for _ in 0..2 {
            let won: bool = conn.set_nx(&key, name).await.map_err(unavailable)?;
            if won {
                return Ok(true);
            }
            let holder: Option<String> = conn.get(&key).await.map_err(unavailable)?;
            let Some(holder) = holder else { continue };
            if holder == name {
                return Ok(true);
            }
            let live: bool = conn
                .exists(group_owner_key(&holder))
                .await
                .map_err(unavailable)?;
            if live {
                return Ok(false);
            }
            if self.move_name(conn, &key, &holder, name).await? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Moves the name key `key` from `from` to `to` (or frees it, for an empty `to`) if it
    /// still names `from`.
    async fn move_name(
        &self,
        conn: &mut ConnectionManager,
        key: &str,
        from: &str,
        to: &str,
    ) -> Result<bool, StoreError> {
        let moved: i64 = self
            .move_name
            .key(key)
            .arg(from)
            .arg(to)
            .invoke_async(conn)
            .await
            .map_err(unavailable)?;
        Ok(moved == 1)
    }

    /// A group's four keys: owner, members, invite-only flag, invitations.
    fn group_keys(name: &str) -> [String; 4] {
        [
            group_owner_key(name),
            group_members_key(name),
            group_invite_only_key(name),
            group_invited_key(name),
        ]
    }

    /// Splits `groups` into those whose invitations hold `user` and those that do not,
    /// [`READ_CHUNK`] to a pipeline.
    async fn held_invitations(
        &self,
        conn: &mut ConnectionManager,
        groups: Vec<String>,
        user: u64,
    ) -> Result<(Vec<String>, Vec<String>), StoreError> {
        let keys: Vec<String> = groups.iter().map(|g| group_invited_key(g)).collect();
        let holds = set_holds(conn, &keys, user).await?;
        let (held, not): (Vec<_>, Vec<_>) = groups.into_iter().zip(holds).partition(|(_, h)| *h);
        Ok((
            held.into_iter().map(|(g, _)| g).collect(),
            not.into_iter().map(|(g, _)| g).collect(),
        ))
    }

    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`). Fails if Redis is unreachable now;
    /// later outages are survived.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let mut conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;
        probe_set_nx_get(&mut conn).await?;
        check_eviction_policy(&mut conn).await;
        Ok(Self {
            conn,
            claim: Script::new(CLAIM),
            confirm: Script::new(CONFIRM),
            release: Script::new(RELEASE),
            remove_if_server: Script::new(REMOVE_IF_SERVER),
            restore: Script::new(RESTORE),
            append: Script::new(APPEND),
            append_unsend: Script::new(APPEND_UNSEND),
            append_private: Script::new(APPEND_PRIVATE),
            append_private_unsend: Script::new(APPEND_PRIVATE_UNSEND),
            create_group: Script::new(CREATE_GROUP),
            join: Script::new(JOIN),
            invite: Script::new(INVITE),
            remove_member: Script::new(REMOVE_MEMBER),
            leave: Script::new(LEAVE),
            block: Script::new(BLOCK),
            add_read_receipt: Script::new(ADD_READ_RECEIPT),
            add_report: Script::new(ADD_REPORT),
            set_status: Script::new(SET_STATUS),
            set_password: Script::new(SET_PASSWORD),
            delete_account: Script::new(DELETE_ACCOUNT),
            transfer: Script::new(TRANSFER),
            move_name: Script::new(MOVE_NAME),
            claim_id_node: Script::new(CLAIM_ID_NODE),
            renew_id_node: Script::new(RENEW_ID_NODE),
            release_id_node: Script::new(RELEASE_ID_NODE),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// GETs the key `key_of` names for each of `users`, [`READ_CHUNK`] to a pipeline. Errors
    /// of single commands come back in place (a key of another type: `WRONGTYPE`); any other
    /// failure fails the call.
    async fn get_each(
        &self,
        users: &[u64],
        key_of: fn(u64) -> String,
    ) -> Result<Vec<redis::RedisResult<Option<Vec<u8>>>>, StoreError> {
        let mut values = Vec::with_capacity(users.len());
        for chunk in users.chunks(READ_CHUNK) {
            let mut pipe = redis::pipe();
            for user in chunk {
                pipe.get(key_of(*user));
            }
            let chunk_values: Vec<redis::RedisResult<Option<Vec<u8>>>> = pipe
                .ignore_errors()
                .query_async(&mut self.conn())
                .await
                .map_err(unavailable)?;
            values.extend(chunk_values);
        }
        Ok(values)
    }

    /// Runs EVALSHA calls of `script` (one per `(keys, args)`) in pipelines of
    /// [`PIPELINE_CHUNK`], [`PIPELINES_IN_FLIGHT`] at a time. Returns the replies in order.
    async fn eval_pipelined<T, A>(
        &self,
        script: &Script,
        calls: &[(Vec<String>, A)],
    ) -> Result<Vec<T>, StoreError>
    where
        T: redis::FromRedisValue + Send,
        A: AsRef<[Vec<u8>]> + Sync,
    {
        // In flight together, pipelines are not a round trip each: a 1,000-member group's
        // append (all of its group's turn) was four in a row.
        let pipelines: Vec<_> = calls
            .chunks(PIPELINE_CHUNK)
            .map(|chunk| self.eval_pipeline(script, chunk))
            .collect();
        let mut answered = futures_util::stream::iter(pipelines).buffered(PIPELINES_IN_FLIGHT);
        let mut replies = Vec::with_capacity(calls.len());
        while let Some(pipeline_replies) = answered.next().await {
            replies.extend(pipeline_replies?);
        }
        Ok(replies)
    }

    /// One pipeline of [`RedisStore::eval_pipelined`], loading the script and retrying once if
    /// Redis lost its script cache (e.g. after a restart).
    async fn eval_pipeline<T, A>(
        &self,
        script: &Script,
        calls: &[(Vec<String>, A)],
    ) -> Result<Vec<T>, StoreError>
    where
        T: redis::FromRedisValue,
        A: AsRef<[Vec<u8>]>,
    {
        let mut conn = self.conn();
        let build = || {
            let mut pipe = redis::pipe();
            for (keys, args) in calls {
                let cmd = pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys.len());
                for k in keys {
                    cmd.arg(k);
                }
                for a in args.as_ref() {
                    cmd.arg(a.as_slice());
                }
            }
            pipe
        };
        match build().query_async(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                script
                    .prepare_invoke()
                    .load_async(&mut conn)
                    .await
                    .map_err(unavailable)?;
                build().query_async(&mut conn).await.map_err(unavailable)
            }
            Err(e) => Err(unavailable(e)),
        }
    }

    /// [`Store::claim_route`], and with `relogin` [`Store::claim_route_relogin`].
    async fn claim(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
        replaced_for: Duration,
        relogin: Option<&Relogin>,
    ) -> Result<Claim, StoreError> {
        let mut conn = self.conn();
        // A route of the script's form that cannot be read, seen by the first try: claimed
        // over on the second.
        let mut unreadable: Vec<u8> = Vec::new();
        let (won, previous, last_login) = loop {
            let mut invocation = self.claim.key(route_key(user));
            invocation
                .key(login_key(user))
                .key(account_key(user))
                .arg(encode_route(&route))
                .arg(pending_lease.as_millis() as u64)
                .arg(if force { "1" } else { "0" })
                .arg(replaced_for.as_millis() as u64)
                .arg(revoked_prefix(user))
                .arg(
                    relogin
                        .map(|r| r.session_id.to_string())
                        .unwrap_or_default(),
                );
            match relogin {
                Some(relogin) => invocation
                    .key(revoked_key(user, relogin.session_id))
                    .arg(relogin.revoke_for.as_millis() as u64)
                    .arg(
                        relogin
                            .seen_route_session
                            .map(|s| s.to_string())
                            .unwrap_or_default(),
                    ),
                None => invocation.arg("").arg(""),
            };
            invocation.arg(&unreadable[..]);
            let (won, previous, last_login): (i64, Vec<u8>, String) = invocation
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            // A route of the script's form that cannot be read (a damaged server id, say)
            // holds no session anyone can use, as for every other reader: it is claimed over
            // like a value of another form. Refused, its user could log in only with takeover.
            // Named to the script, not forced: a login that took the route meanwhile still
            // refuses this one.
            if won == 0
                && unreadable.is_empty()
                && !previous.is_empty()
                && readable_route(user, Some(&previous)).is_none()
            {
                unreadable = previous;
                continue;
            }
            break (won, previous, last_login);
        };
        match won {
            2 => return Ok(Claim::Ended),
            3 => return Ok(Claim::NoAccount),
            _ => {}
        }
        let previous = readable_route(user, (!previous.is_empty()).then_some(&previous[..]));
        if won == 0 {
            return match previous {
                Some(p) => Ok(Claim::Busy(p)),
                None => Err(StoreError::Corrupt("claim refused without a route".into())),
            };
        }
        let indexed = async {
            let _: () = conn
                .sadd(server_users_key(&route.server_id), user)
                .await
                .map_err(unavailable)?;
            if let Some(p) = &previous
                && p.server_id != route.server_id
            {
                let _: () = conn
                    .srem(server_users_key(&p.server_id), user)
                    .await
                    .map_err(unavailable)?;
            }
            self.leave_online(&[user]).await
        };
        index_kept(indexed.await, user, "claim");
        Ok(Claim::Won {
            previous,
            last_login: last_login.parse().ok(),
        })
    }

    /// Drops `users` from the online set, then re-adds those with a confirmed route by now (a
    /// concurrent login's confirm may have added one just before our removal). Three round
    /// trips, however many users.
    async fn leave_online(&self, users: &[u64]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let _: () = conn.srem(ONLINE, users).await.map_err(unavailable)?;
        let routes = self.routes(users).await?;
        let back: Vec<u64> = users
            .iter()
            .zip(routes)
            .filter(|(_, route)| route.as_ref().is_some_and(|r| r.confirmed))
            .map(|(&user, _)| user)
            .collect();
        if !back.is_empty() {
            let _: () = conn.sadd(ONLINE, &back).await.map_err(unavailable)?;
        }
        Ok(())
    }
}

#[async_trait]
impl Store for RedisStore {
    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError> {
        let mut conn = self.conn();
        let id: u64 = conn.incr(NEXT_USER_ID, 1).await.map_err(unavailable)?;
        // Write the account before publishing the name, so a visible name always resolves.
        let _: () = conn
            .hset_multiple(account_key(id), &[("name", name), ("pw", password_hash)])
            .await
            .map_err(unavailable)?;
        // The name in any case first, then as given (what older routers claim and read). A
        // registration that fails half way (the name taken, Redis gone) takes back what it
        // claimed and its account, as far as it can: the id is never used again.
        let (folded, exact) = (folded_name_key(name), name_key(name));
        let mut claimed = Vec::new();
        for key in [&folded, &exact] {
            let outcome = self.claim_name(&mut conn, key, id).await;
            if !matches!(outcome, Ok(true)) {
                for key in claimed {
                    if let Err(e) = self.move_name(&mut conn, key, &id.to_string(), "").await {
                        tracing::warn!(id, key, error = %e, "failed registration's name key not freed");
                    }
                }
                let deleted: Result<(), _> = conn.del(account_key(id)).await;
                if let Err(e) = deleted {
                    tracing::warn!(id, error = %e, "failed registration's account not deleted");
                }
                return Err(outcome.err().unwrap_or(StoreError::NameTaken));
            }
            claimed.push(key);
        }
        Ok(Account {
            id,
            name: name.to_string(),
            password_hash: password_hash.to_string(),
        })
    }

    async fn set_password_hash(
        &self,
        user: u64,
        expected: &str,
        new_hash: &str,
    ) -> Result<bool, StoreError> {
        let changed: i64 = self
            .set_password
            .key(account_key(user))
            .arg(expected)
            .arg(new_hash)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(changed == 1)
    }

    async fn delete_account(
        &self,
        user: u64,
        revoke_for: Duration,
    ) -> Result<Option<DeletedAccount>, StoreError> {
        let mut conn = self.conn();
        let deleted: Option<(String, Vec<String>, Vec<String>)> = self
            .delete_account
            .key(account_key(user))
            .key(user_groups_key(user))
            .key(user_invites_key(user))
            .key(login_key(user))
            .key(seq_key(user))
            .key(inbox_key(user))
            .key(blocked_key(user))
            .key(last_seen_key(user))
            .key(hides_key(user, Privacy::LastSeen))
            .key(hides_key(user, Privacy::ReadReceipts))
            .key(read_receipts_key(user))
            .arg(revoked_prefix(user))
            .arg(revoke_for.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some((name, mut groups, mut invitations)) = deleted else {
            return Ok(None);
        };
        // Another slot: a second call. Should it fail, the name names no account (no login or
        // lookup finds it), and the next registration of the name takes it over: the
        // deletion stands.
        for key in [name_key(&name), folded_name_key(&name)] {
            if let Err(e) = self.move_name(&mut conn, &key, &user.to_string(), "").await {
                tracing::warn!(user, error = %e, "deleted account's name not freed; its next registration takes it over");
            }
        }
        groups.sort();
        invitations.sort();
        Ok(Some(DeletedAccount {
            name,
            groups,
            invitations,
        }))
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        // Both in one round trip: the name as given first (and alone for an account made
        // before the folded keys), then in any case.
        let (exact, folded): (Option<u64>, Option<u64>) = redis::pipe()
            .get(name_key(name))
            .get(folded_name_key(name))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        // The first that names an account: a name a deletion left behind (naming no one)
        // must not hide the account that took the name over in another case. Both keys
        // name the same account as a rule: it is read once.
        let folded = folded.filter(|f| Some(*f) != exact);
        let ids: Vec<u64> = exact.into_iter().chain(folded).collect();
        Ok(self.accounts_by_id(&ids).await?.into_iter().next())
    }

    async fn user_exists(&self, id: u64) -> Result<bool, StoreError> {
        self.conn()
            .exists(account_key(id))
            .await
            .map_err(unavailable)
    }

    async fn accounts_by_id(&self, ids: &[u64]) -> Result<Vec<Account>, StoreError> {
        let rows: Vec<(Option<String>, Option<String>)> =
            read_each(&mut self.conn(), ids, |pipe, id| {
                pipe.cmd("HMGET")
                    .arg(account_key(*id))
                    .arg("name")
                    .arg("pw");
            })
            .await?;
        Ok(ids
            .iter()
            .zip(rows)
            .filter_map(|(id, row)| match row {
                (Some(name), Some(pw)) => Some(Account {
                    id: *id,
                    name,
                    password_hash: pw,
                }),
                _ => None,
            })
            .collect())
    }

    async fn claim_route(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
        replaced_for: Duration,
    ) -> Result<Claim, StoreError> {
        self.claim(user, route, pending_lease, force, replaced_for, None)
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
        self.claim(
            user,
            route,
            pending_lease,
            true,
            replaced_for,
            Some(relogin),
        )
        .await
    }

    async fn confirm_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let ok: i64 = self
            .confirm
            .key(route_key(user))
            .key(revoked_key(user, session_id))
            .key(last_seen_key(user))
            .arg(session_id)
            .arg(server_id)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if ok == 1 {
            let indexed = redis::pipe()
                .sadd(ONLINE, user)
                .ignore()
                .sadd(server_users_key(server_id), user)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable);
            index_kept(indexed, user, "confirm");
        }
        Ok(ok == 1)
    }

    async fn revoke_session(
        &self,
        user: u64,
        session_id: u64,
        ttl: Duration,
        why: Revocation,
    ) -> Result<(), StoreError> {
        let _: () = self
            .conn()
            .pset_ex(
                revoked_key(user, session_id),
                why.as_str(),
                ttl.as_millis() as u64,
            )
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn revocation(
        &self,
        user: u64,
        session_id: u64,
    ) -> Result<Option<Revocation>, StoreError> {
        let stored: Option<Vec<u8>> = self
            .conn()
            .get(revoked_key(user, session_id))
            .await
            .map_err(unavailable)?;
        Ok(stored.map(|v| Revocation::parse(&String::from_utf8_lossy(&v))))
    }

    async fn last_login(&self, user: u64) -> Result<Option<u64>, StoreError> {
        let stored: Option<String> = self
            .conn()
            .get(login_key(user))
            .await
            .map_err(unavailable)?;
        // Anything but a session id reads as none, as the claim script does.
        Ok(stored.and_then(|s| s.parse().ok()))
    }

    async fn release_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: Option<&str>,
    ) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let released: String = self
            .release
            .key(route_key(user))
            .key(last_seen_key(user))
            .arg(session_id)
            .arg(server_id.unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if released.is_empty() {
            return Ok(false);
        }
        let indexed = async {
            // The released route was read by the script; unreadable, it names no server.
            if let Some(route) = readable_route(user, Some(released.as_bytes())) {
                let _: () = conn
                    .srem(server_users_key(&route.server_id), user)
                    .await
                    .map_err(unavailable)?;
            }
            self.leave_online(&[user]).await
        };
        index_kept(indexed.await, user, "release");
        Ok(true)
    }

    async fn routes(&self, users: &[u64]) -> Result<Vec<Option<Route>>, StoreError> {
        let values = self.get_each(users, route_key).await?;
        let mut routes = Vec::with_capacity(users.len());
        for (user, value) in users.iter().zip(values) {
            routes.push(match value {
                Ok(value) => readable_route(*user, value.as_deref()),
                Err(e) if e.code() == Some("WRONGTYPE") => {
                    tracing::warn!(user, error = %e, "unreadable route taken as none");
                    None
                }
                Err(e) => return Err(unavailable(e)),
            });
        }
        Ok(routes)
    }

    async fn online_users(&self) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.conn();
        let mut ids: Vec<u64> = conn.smembers(ONLINE).await.map_err(unavailable)?;
        ids.sort_unstable();
        let routes = self.routes(&ids).await?;
        let mut online = Vec::with_capacity(ids.len());
        let mut stale = Vec::new();
        for (id, route) in ids.into_iter().zip(routes) {
            match route {
                Some(r) if r.confirmed => online.push(id),
                Some(_) => {}
                None => stale.push(id),
            }
        }
        // Routes whose lease ran out leave the set lazily.
        for chunk in stale.chunks(PIPELINE_CHUNK) {
            self.leave_online(chunk).await?;
        }
        Ok(online)
    }

    async fn renew_routes(
        &self,
        server_id: &str,
        sessions: &[(u64, u64)],
        lease: Duration,
    ) -> Result<Renewal, StoreError> {
        if sessions.is_empty() {
            return Ok(Renewal::default());
        }
        let calls: Vec<(Vec<String>, Vec<Vec<u8>>)> = sessions
            .iter()
            .map(|&(user, session_id)| {
                let route = Route {
                    server_id: server_id.to_string(),
                    session_id,
                    confirmed: true,
                };
                let args = vec![
                    session_id.to_string().into_bytes(),
                    encode_route(&route).into_bytes(),
                    (lease.as_millis() as u64).to_string().into_bytes(),
                ];
                (vec![route_key(user), revoked_key(user, session_id)], args)
            })
            .collect();
        let results: Vec<i64> = self.eval_pipelined(&self.restore, &calls).await?;
        let mut conn = self.conn();
        let mut renewal = Renewal::default();
        let mut kept = Vec::new();
        for (&(user, _), outcome) in sessions.iter().zip(results) {
            match outcome {
                0 => renewal.stale.push(user),
                2 => {
                    renewal.restored.push(user);
                    kept.push(user);
                }
                _ => kept.push(user),
            }
        }
        if !kept.is_empty() {
            // The routes are renewed: a failure here must not lose the stale and restored
            // lists (the next renewal adds the users back).
            let indexed: redis::RedisResult<()> = redis::pipe()
                .sadd(ONLINE, &kept)
                .ignore()
                .sadd(server_users_key(server_id), &kept)
                .ignore()
                .query_async(&mut conn)
                .await;
            if let Err(e) = indexed {
                tracing::warn!(server = server_id, users = kept.len(), error = %e, "route index not updated after a renewal; it repairs itself");
            }
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
        // One plain command instead of a script: records the new id unless one is recorded,
        // and returns the recorded one (NX with GET needs Redis 7).
        let key = sent_key(sender, client_msg_id);
        let recorded: Option<String> = set_unless_present(
            &key,
            &format!("{new_msg_id}:{fingerprint:x}"),
            ttl.as_millis() as u64,
        )
        .query_async(&mut self.conn())
        .await
        .map_err(unavailable)?;
        let Some(recorded) = recorded else {
            return Ok(Some(new_msg_id));
        };
        let corrupt = || StoreError::Corrupt(format!("{key}: {recorded:?}"));
        // A bare id was recorded by a version that kept no fingerprint.
        let (msg_id, recorded_fingerprint) = match recorded.split_once(':') {
            Some((id, fp)) => (
                id,
                Some(u64::from_str_radix(fp, 16).map_err(|_| corrupt())?),
            ),
            None => (recorded.as_str(), None),
        };
        let msg_id = msg_id.parse().map_err(|_| corrupt())?;
        Ok(recorded_fingerprint
            .is_none_or(|fp| fp == fingerprint)
            .then_some(msg_id))
    }

    async fn append_inbox(
        &self,
        recipients: &[u64],
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<Vec<u64>, StoreError> {
        if recipients.is_empty() {
            return Ok(Vec::new());
        }
        // One copy of the entry for all members (a pipeline still packs one per command, so
        // at most PIPELINE_CHUNK times PIPELINES_IN_FLIGHT of them are held at once).
        let mut args = append_args(entry, limits);
        let script = match entry.unsends {
            Some(unsent) => {
                args.extend(take_back_args(entry, unsent));
                &self.append_unsend
            }
            None => &self.append,
        };
        let calls: Vec<(Vec<String>, &[Vec<u8>])> = recipients
            .iter()
            .map(|&user| {
                let mut keys = vec![
                    seq_key(user),
                    inbox_key(user),
                    appended_key(user, entry.msg_id),
                ];
                if let Some(unsent) = entry.unsends {
                    keys.push(appended_key(user, unsent));
                }
                (keys, &args[..])
            })
            .collect();
        self.eval_pipelined(script, &calls).await
    }

    async fn append_private(
        &self,
        to: u64,
        entry: &InboxEntry,
        limits: InboxLimits,
    ) -> Result<PrivateAppend, StoreError> {
        let (script, unsent) = match entry.unsends {
            Some(unsent) => (&self.append_private_unsend, Some(unsent)),
            None => (&self.append_private, None),
        };
        let mut call = script.prepare_invoke();
        call.key(seq_key(to))
            .key(inbox_key(to))
            .key(appended_key(to, entry.msg_id))
            .key(account_key(to))
            .key(route_key(to))
            .key(blocked_key(to));
        for arg in append_args(entry, limits) {
            call.arg(arg);
        }
        call.arg(entry.from_user);
        if let Some(unsent) = unsent {
            call.key(appended_key(to, unsent));
            for arg in take_back_args(entry, unsent) {
                call.arg(arg);
            }
        }
        let stored: Option<(u64, Option<Vec<u8>>, u8)> = call
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(match stored {
            None => PrivateAppend::NoUser,
            Some((0, _, _)) => PrivateAppend::Blocked,
            Some((seq, route, replaced)) => PrivateAppend::Stored {
                seq,
                route: readable_route(to, route.as_deref()),
                replaced: replaced == 1,
            },
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
        let key = inbox_key(user);
        let oldest = now_ms.saturating_sub(limits.ttl.as_millis() as u64);
        // Entries past their age stay until the length cap or an ack removes them, and are
        // skipped here; a page's worth of them at the front must not read as an empty page
        // with more to come (a client stops pulling at that and never catches up), so the
        // scan goes on past them, at most through a whole capped inbox.
        let scans = limits.max_len / (limit + 1) + 2;
        let mut entries = Vec::with_capacity(limit.min(256));
        let mut more = false;
        let mut cursor = after_seq;
        'scan: for scan in 0..scans {
            let mut range = redis::cmd("ZRANGEBYSCORE");
            range
                .arg(&key)
                .arg(format!("({cursor}"))
                .arg("+inf")
                .arg("LIMIT")
                .arg(0)
                .arg(limit + 1);
            let members: Vec<Vec<u8>> = if scan == 0 {
                // The client's application is done with everything up to `trim_up_to`: trim
                // it first.
                let (_, members): ((), Vec<Vec<u8>>) = redis::pipe()
                    .zrembyscore(&key, "-inf", trim_up_to)
                    .add_command(range)
                    .query_async(&mut self.conn())
                    .await
                    .map_err(unavailable)?;
                members
            } else {
                range
                    .query_async(&mut self.conn())
                    .await
                    .map_err(unavailable)?
            };
            let exhausted = members.len() <= limit;
            for member in &members {
                let Some((seq, encoded)) = split_member(member) else {
                    return Err(StoreError::Corrupt(format!("inbox entry of user {user}")));
                };
                cursor = seq;
                // An entry that cannot be read (damaged, or written by a newer version in a
                // rolling upgrade) is skipped like an expired one: failing the page would
                // hold every later entry back until the entry aged out.
                let Some(entry) = InboxEntry::decode(encoded) else {
                    static UNREADABLE: AtomicU64 = AtomicU64::new(0);
                    let seen = UNREADABLE.fetch_add(1, Ordering::Relaxed) + 1;
                    if seen.is_power_of_two() {
                        tracing::warn!(user, seq, seen, "unreadable inbox entry skipped");
                    }
                    continue;
                };
                if entry.created_at_ms < oldest {
                    continue;
                }
                if entries.len() == limit {
                    more = true;
                    break 'scan;
                }
                entries.push((seq, entry));
            }
            if exhausted {
                break;
            }
            more = scan + 1 == scans;
        }
        Ok(InboxPage { entries, more })
    }

    async fn trim_inbox(&self, acked: &[(u64, u64)]) -> Result<(), StoreError> {
        if acked.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (user, up_to) in acked {
            pipe.zrembyscore(inbox_key(*user), "-inf", *up_to).ignore();
        }
        let _: () = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn inbox_caught_up_to(&self, user: u64) -> Result<Option<u64>, StoreError> {
        // One transaction: an append between the two reads would otherwise pair an empty inbox
        // with a seq it never gave out yet, and its entry would look already seen.
        let (seq, entries): (Option<u64>, u64) = redis::pipe()
            .atomic()
            .get(seq_key(user))
            .zcard(inbox_key(user))
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok((entries == 0).then_some(seq.unwrap_or(0)))
    }

    async fn inbox_heads(&self, users: &[u64]) -> Result<Vec<u64>, StoreError> {
        let values = self.get_each(users, seq_key).await?;
        let mut heads = Vec::with_capacity(users.len());
        for (user, value) in users.iter().zip(values) {
            let seq = match value {
                Ok(None) => Some(0),
                Ok(Some(bytes)) => std::str::from_utf8(&bytes)
                    .ok()
                    .and_then(|s| s.parse().ok()),
                Err(e) if e.code() == Some("WRONGTYPE") => None,
                Err(e) => return Err(unavailable(e)),
            };
            // One unreadable counter must not fail the others' heads (a renewal's answer).
            heads.push(seq.unwrap_or_else(|| {
                tracing::warn!(user, "unreadable inbox seq taken as 0");
                0
            }));
        }
        Ok(heads)
    }

    async fn create_group(
        &self,
        name: &str,
        owner: u64,
        invite_only: bool,
    ) -> Result<bool, StoreError> {
        // The name in any case first: another group's refuses it. (Two creations of one name
        // in two cases at the same instant may both pass: the key and the group live in two
        // hash slots.)
        if !self.claim_group_name(&mut self.conn(), name).await? {
            return Ok(false);
        }
        // The owner is a member from the start: a failure in between must not leave a group
        // whose name is taken and whose owner is not in it.
        let args = [owner.to_string(), u8::from(invite_only).to_string()];
        let (created, mut conn) = self
            .group_script(&self.create_group, Self::group_keys(name), &args)
            .await?;
        let created = created == 1;
        if created {
            let _: () = conn
                .sadd(user_groups_key(owner), name)
                .await
                .map_err(unavailable)?;
        }
        Ok(created)
    }

    async fn join_group(&self, name: &str, user: u64, cap: usize) -> Result<Join, StoreError> {
        let args = [user.to_string(), cap.to_string()];
        let (outcome, mut conn) = self
            .group_script(&self.join, Self::group_keys(name), &args)
            .await?;
        let join = match outcome {
            1 => Join::Joined,
            2 => Join::AlreadyMember,
            3 => Join::Full,
            4 => Join::InviteOnly,
            _ => Join::NoGroup,
        };
        if matches!(join, Join::Joined | Join::AlreadyMember) {
            let _: () = redis::pipe()
                .sadd(user_groups_key(user), name)
                .ignore()
                .srem(user_invites_key(user), name)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(join)
    }

    async fn invite(
        &self,
        name: &str,
        owner: u64,
        user: u64,
        cap: usize,
    ) -> Result<Invite, StoreError> {
        let args = [owner.to_string(), user.to_string(), cap.to_string()];
        let (outcome, mut conn) = self
            .group_script(&self.invite, Self::group_keys(name), &args)
            .await?;
        let invite = match outcome {
            1 => Invite::Invited,
            2 => Invite::AlreadyInvited,
            3 => Invite::AlreadyMember,
            4 => Invite::Full,
            5 => Invite::NotOwner,
            _ => Invite::NoGroup,
        };
        if matches!(invite, Invite::Invited | Invite::AlreadyInvited) {
            let _: () = conn
                .sadd(user_invites_key(user), name)
                .await
                .map_err(unavailable)?;
        }
        Ok(invite)
    }

    async fn transfer_group(
        &self,
        name: &str,
        owner: u64,
        user: u64,
    ) -> Result<Transfer, StoreError> {
        let args = [owner.to_string(), user.to_string()];
        let (outcome, _) = self
            .group_script(&self.transfer, Self::group_keys(name), &args)
            .await?;
        Ok(match outcome {
            1 => Transfer::Transferred,
            2 => Transfer::NotMember,
            3 => Transfer::NotOwner,
            _ => Transfer::NoGroup,
        })
    }

    async fn remove_member(
        &self,
        name: &str,
        owner: u64,
        user: u64,
    ) -> Result<Removal, StoreError> {
        let args = [owner.to_string(), user.to_string()];
        let (outcome, mut conn) = self
            .group_script(&self.remove_member, Self::group_keys(name), &args)
            .await?;
        let removal = match outcome {
            1 => Removal::Removed,
            2 => Removal::NotMember,
            3 => Removal::NotOwner,
            4 => Removal::Uninvited,
            _ => Removal::NoGroup,
        };
        if matches!(removal, Removal::Removed | Removal::Uninvited) {
            let _: () = redis::pipe()
                .srem(user_groups_key(user), name)
                .ignore()
                .srem(user_invites_key(user), name)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(removal)
    }

    async fn decline_invitation(&self, name: &str, user: u64) -> Result<bool, StoreError> {
        let (declined, _): (bool, i64) = redis::pipe()
            .srem(group_invited_key(name), user)
            .srem(user_invites_key(user), name)
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(declined)
    }

    async fn group_info(&self, name: &str) -> Result<Option<GroupInfo>, StoreError> {
        let mut conn = self.conn();
        let (owner, invite_only): (Option<String>, bool) = redis::pipe()
            .get(group_owner_key(name))
            .exists(group_invite_only_key(name))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let Some(owner) = owner else {
            return Ok(None);
        };
        let owner = owner
            .parse()
            .map_err(|_| StoreError::Corrupt(format!("group owner {owner:?}")))?;
        Ok(Some(GroupInfo { owner, invite_only }))
    }

    async fn leave_group(&self, name: &str, user: u64) -> Result<bool, StoreError> {
        let (removed, mut conn) = self
            .group_script(&self.leave, Self::group_keys(name), &[user.to_string()])
            .await?;
        let _: () = conn
            .srem(user_groups_key(user), name)
            .await
            .map_err(unavailable)?;
        Ok(removed == 1)
    }

    async fn group_members(&self, name: &str) -> Result<Option<Vec<u64>>, StoreError> {
        let mut conn = self.conn();
        let (exists, mut members): (bool, Vec<u64>) = redis::pipe()
            .exists(group_owner_key(name))
            .smembers(group_members_key(name))
            .query_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if !exists {
            return Ok(None);
        }
        members.sort_unstable();
        Ok(Some(members))
    }

    async fn group_size(&self, name: &str) -> Result<usize, StoreError> {
        self.conn()
            .scard(group_members_key(name))
            .await
            .map_err(unavailable)
    }

    async fn user_invitations(&self, user: u64) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn();
        let mut named: Vec<String> = conn
            .smembers(user_invites_key(user))
            .await
            .map_err(unavailable)?;
        named.sort();
        let (mut waiting, gone) = self.held_invitations(&mut conn, named, user).await?;
        if !gone.is_empty() {
            let _: () = conn
                .srem(user_invites_key(user), &gone)
                .await
                .map_err(unavailable)?;
            // An owner may have invited the user again between the read and the removal
            // (its index write found the name still there): those go back.
            let (again, _) = self.held_invitations(&mut conn, gone, user).await?;
            if !again.is_empty() {
                let _: () = conn
                    .sadd(user_invites_key(user), &again)
                    .await
                    .map_err(unavailable)?;
                waiting.extend(again);
                waiting.sort();
            }
        }
        waiting.truncate(MAX_INVITATIONS_LISTED);
        Ok(waiting)
    }

    async fn last_seen(&self, user: u64) -> Result<Option<u64>, StoreError> {
        let stored: Option<String> = self
            .conn()
            .get(last_seen_key(user))
            .await
            .map_err(unavailable)?;
        // Written by cim alone; anything else reads as not recorded.
        Ok(stored.and_then(|s| s.parse().ok()))
    }

    async fn statuses(&self, users: &[u64]) -> Result<Vec<Option<String>>, StoreError> {
        read_each(&mut self.conn(), users, |pipe, user| {
            pipe.hget(account_key(*user), "status");
        })
        .await
    }

    async fn set_status(&self, user: u64, status: Option<&str>) -> Result<bool, StoreError> {
        let mut script = self.set_status.key(account_key(user));
        if let Some(status) = status {
            script.arg(status);
        }
        let set: i64 = script
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(set == 1)
    }

    async fn hidden(&self, users: &[u64], what: Privacy) -> Result<Vec<bool>, StoreError> {
        read_each(&mut self.conn(), users, |pipe, user| {
            pipe.exists(hides_key(*user, what));
        })
        .await
    }

    async fn set_hidden(&self, user: u64, what: Privacy, hidden: bool) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let key = hides_key(user, what);
        let _: () = if hidden {
            conn.set(key, 1).await
        } else {
            conn.del(key).await
        }
        .map_err(unavailable)?;
        Ok(())
    }

    async fn block_user(&self, user: u64, other: u64, cap: usize) -> Result<Block, StoreError> {
        let outcome: i64 = self
            .block
            .key(blocked_key(user))
            .arg(other)
            .arg(cap)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        match outcome {
            1 => Ok(Block::Blocked),
            2 => Ok(Block::AlreadyBlocked),
            0 => Ok(Block::Full),
            other => Err(StoreError::Corrupt(format!(
                "block script returned {other}"
            ))),
        }
    }

    async fn unblock_user(&self, user: u64, other: u64) -> Result<bool, StoreError> {
        self.conn()
            .srem(blocked_key(user), other)
            .await
            .map_err(unavailable)
    }

    async fn blocking(&self, users: &[u64], other: u64) -> Result<Vec<bool>, StoreError> {
        let keys: Vec<String> = users.iter().map(|u| blocked_key(*u)).collect();
        set_holds(&mut self.conn(), &keys, other).await
    }

    async fn blocked_users(&self, user: u64) -> Result<Vec<u64>, StoreError> {
        let mut blocked: Vec<u64> = self
            .conn()
            .smembers(blocked_key(user))
            .await
            .map_err(unavailable)?;
        blocked.sort_unstable();
        Ok(blocked)
    }

    async fn add_read_receipt(
        &self,
        sender: u64,
        receipt: &ReadReceipt,
        cap: usize,
    ) -> Result<bool, StoreError> {
        let kept: i64 = self
            .add_read_receipt
            .key(read_receipts_key(sender))
            .key(hides_key(sender, Privacy::ReadReceipts))
            .arg(receipt.reader)
            .arg(receipt.up_to_msg_id)
            .arg(receipt.at_ms)
            .arg(cap.max(1))
            .arg(READ_RECEIPTS_TTL.as_millis() as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(kept == 1)
    }

    async fn read_receipts(&self, sender: u64) -> Result<Vec<ReadReceipt>, StoreError> {
        let kept: Vec<(String, String)> = self
            .conn()
            .hgetall(read_receipts_key(sender))
            .await
            .map_err(unavailable)?;
        Ok(kept
            .iter()
            .filter_map(|(reader, value)| {
                let (msg_id, at_ms) = value.split_once(':')?;
                Some(ReadReceipt {
                    reader: reader.parse().ok()?,
                    up_to_msg_id: msg_id.parse().ok()?,
                    at_ms: at_ms.parse().ok()?,
                })
            })
            .collect())
    }

    async fn add_report(
        &self,
        report: &Report,
        cap: usize,
        once_per: Duration,
    ) -> Result<bool, StoreError> {
        let json = serde_json::to_string(report).map_err(|e| StoreError::Corrupt(e.to_string()))?;
        let kept: i64 = self
            .add_report
            .key(REPORTS)
            .key(reported_key(report.reporter_id, report.reported_id))
            .arg(json)
            .arg(cap.max(1))
            .arg(once_per.as_millis().max(1) as u64)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(kept == 1)
    }

    async fn reports(&self, limit: usize) -> Result<Vec<Report>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let stored: Vec<Vec<u8>> = self
            .conn()
            .lrange(REPORTS, 0, limit as isize - 1)
            .await
            .map_err(unavailable)?;
        Ok(stored
            .iter()
            .filter_map(|json| match serde_json::from_slice(json) {
                Ok(report) => Some(report),
                Err(e) => {
                    tracing::warn!(error = %e, "unreadable report skipped");
                    None
                }
            })
            .collect())
    }

    async fn user_groups(&self, user: u64) -> Result<Vec<String>, StoreError> {
        let mut groups: Vec<String> = self
            .conn()
            .smembers(user_groups_key(user))
            .await
            .map_err(unavailable)?;
        groups.sort();
        Ok(groups)
    }

    async fn claim_id_node(
        &self,
        owner: &str,
        first: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<Option<IdNode>, StoreError> {
        let claimed: Option<(u16, u64)> = self
            .claim_id_node
            .key(ID_NODES_KEY)
            .arg(owner)
            .arg(first % ID_NODES)
            .arg(lease.as_millis() as u64)
            .arg(issue_until_ms)
            .arg(ID_NODES)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(claimed.map(|(node, issued_until_ms)| IdNode {
            node,
            issued_until_ms,
        }))
    }

    async fn renew_id_node(
        &self,
        owner: &str,
        node: u16,
        lease: Duration,
        issue_until_ms: u64,
    ) -> Result<bool, StoreError> {
        let renewed: i64 = self
            .renew_id_node
            .key(ID_NODES_KEY)
            .arg(owner)
            .arg(node)
            .arg(lease.as_millis() as u64)
            .arg(issue_until_ms)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(renewed == 1)
    }

    async fn release_id_node(&self, owner: &str, node: u16) -> Result<(), StoreError> {
        let _: i64 = self
            .release_id_node
            .key(ID_NODES_KEY)
            .arg(owner)
            .arg(node)
            .invoke_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    async fn remove_server_routes(&self, server_id: &str) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.conn();
        let users: Vec<u64> = conn
            .smembers(server_users_key(server_id))
            .await
            .map_err(unavailable)?;
        // Pipelined, as renewals are: one by one, a server with 100,000 users took 300,000
        // round trips while its users showed online.
        let server = [server_id.as_bytes().to_vec()];
        let calls: Vec<(Vec<String>, &[Vec<u8>])> = users
            .iter()
            .map(|&user| (vec![route_key(user), last_seen_key(user)], &server[..]))
            .collect();
        let deleted: Vec<i64> = self.eval_pipelined(&self.remove_if_server, &calls).await?;
        let removed: Vec<u64> = users
            .iter()
            .zip(deleted)
            .filter(|&(_, deleted)| deleted == 1)
            .map(|(&user, _)| user)
            .collect();
        // The routes are gone: an index failure must not lose the users to announce offline
        // (the online set is checked against routes when read).
        let indexed = async {
            for chunk in removed.chunks(PIPELINE_CHUNK) {
                self.leave_online(chunk).await?;
            }
            conn.del::<_, ()>(server_users_key(server_id))
                .await
                .map_err(unavailable)
        };
        if let Err(e) = indexed.await {
            tracing::warn!(server = server_id, users = removed.len(), error = %e, "route index not updated after a server left; it repairs itself");
        }
        Ok(removed)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn routes_encode_and_decode() {
        let route = Route {
            server_id: "server|with|bars".into(),
            session_id: 42,
            confirmed: true,
        };
        assert_eq!(decode_route(&encode_route(&route)).unwrap(), route);
        assert!(decode_route("nope").is_err());
    }

    #[test]
    fn per_user_keys_share_a_hash_tag() {
        assert_eq!(account_key(7), "cim:{u7}:account");
        assert_eq!(route_key(7), "cim:{u7}:route");
    }
}
