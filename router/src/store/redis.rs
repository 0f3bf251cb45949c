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
//! | `cim:{u<id>}:account` | hash | `name`, `pw` (argon2 PHC string) |
//! | `cim:{u<id>}:route` | string, PX lease | `<session_id>\|<confirmed 0/1>\|<server_id>` |
//! | `cim:online` | set | ids of users with a confirmed route (filtered against routes on read) |
//! | `cim:server:{<server_id>}:users` | set | ids routed to that server (for cleanup and lease renewal) |
//!
//! No `KEYS` anywhere; every multi-step change that must be atomic is a single-key Lua script.

use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};

use super::{Account, Claim, Route, Store, StoreError};

const NEXT_USER_ID: &str = "cim:next_user_id";
const ONLINE: &str = "cim:online";

fn name_key(name: &str) -> String {
    format!("cim:name:{name}")
}
fn account_key(user: u64) -> String {
    format!("cim:{{u{user}}}:account")
}
fn route_key(user: u64) -> String {
    format!("cim:{{u{user}}}:route")
}
fn server_users_key(server_id: &str) -> String {
    format!("cim:server:{{{server_id}}}:users")
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

/// Claims a route: refuses if one exists and force is off. Returns {won, previous or ''}.
const CLAIM: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and ARGV[3] == '0' then return {0, cur} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return {1, cur or ''}
";

/// Confirms a route if it still belongs to the session on the server.
const CONFIRM: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
local sess, conf, server = string.match(cur, '^(%d+)|(%d)|(.*)$')
if sess ~= ARGV[1] or server ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], sess .. '|1|' .. server, 'PX', ARGV[3])
return 1
";

/// Sets a confirmed route (with a fresh lease) unless another session holds the user.
/// Returns 1 if set.
const RESTORE: &str = r"
local cur = redis.call('GET', KEYS[1])
if cur and string.match(cur, '^(%d+)|') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
";

/// Deletes a route if it belongs to the session. Returns the deleted value or ''.
const RELEASE: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur then return '' end
if string.match(cur, '^(%d+)|') ~= ARGV[1] then return '' end
redis.call('DEL', KEYS[1])
return cur
";

/// Deletes a route if it is on the server. Returns 1 if deleted.
const REMOVE_IF_SERVER: &str = r"
local cur = redis.call('GET', KEYS[1])
if not cur then return 0 end
if string.match(cur, '^%d+|%d|(.*)$') ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
return 1
";

/// Accounts and routes in Redis.
pub struct RedisStore {
    conn: ConnectionManager,
    claim: Script,
    confirm: Script,
    release: Script,
    remove_if_server: Script,
}

fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RedisStore {
    /// Connects to `url` (e.g. `redis://127.0.0.1:6379`). Fails if Redis is unreachable now;
    /// later outages are survived.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(unavailable)?;
        Ok(Self {
            conn,
            claim: Script::new(CLAIM),
            confirm: Script::new(CONFIRM),
            release: Script::new(RELEASE),
            remove_if_server: Script::new(REMOVE_IF_SERVER),
        })
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// Drops `user` from the online set, then re-adds it if a confirmed route appeared in the
    /// meantime (a concurrent login's confirm may have added it just before our removal).
    async fn leave_online(&self, user: u64) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let _: () = conn.srem(ONLINE, user).await.map_err(unavailable)?;
        let current: Option<String> = conn.get(route_key(user)).await.map_err(unavailable)?;
        if let Some(route) = current.as_deref().map(decode_route).transpose()?
            && route.confirmed
        {
            let _: () = conn.sadd(ONLINE, user).await.map_err(unavailable)?;
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
        let won: bool = conn.set_nx(name_key(name), id).await.map_err(unavailable)?;
        if !won {
            let _: () = conn.del(account_key(id)).await.map_err(unavailable)?;
            return Err(StoreError::NameTaken);
        }
        Ok(Account {
            id,
            name: name.to_string(),
            password_hash: password_hash.to_string(),
        })
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let mut conn = self.conn();
        let id: Option<u64> = conn.get(name_key(name)).await.map_err(unavailable)?;
        match id {
            Some(id) => Ok(self.accounts_by_id(&[id]).await?.pop()),
            None => Ok(None),
        }
    }

    async fn accounts_by_id(&self, ids: &[u64]) -> Result<Vec<Account>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for id in ids {
            pipe.cmd("HMGET")
                .arg(account_key(*id))
                .arg("name")
                .arg("pw");
        }
        let rows: Vec<(Option<String>, Option<String>)> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
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
    ) -> Result<Claim, StoreError> {
        let mut conn = self.conn();
        let (won, previous): (i64, String) = self
            .claim
            .key(route_key(user))
            .arg(encode_route(&route))
            .arg(pending_lease.as_millis() as u64)
            .arg(if force { "1" } else { "0" })
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        let previous = (!previous.is_empty())
            .then(|| decode_route(&previous))
            .transpose()?;
        if won == 0 {
            return match previous {
                Some(p) => Ok(Claim::Busy(p)),
                None => Err(StoreError::Corrupt("claim refused without a route".into())),
            };
        }
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
        self.leave_online(user).await?;
        Ok(Claim::Won { previous })
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
            .arg(session_id)
            .arg(server_id)
            .arg(lease.as_millis() as u64)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if ok == 1 {
            let _: () = redis::pipe()
                .sadd(ONLINE, user)
                .ignore()
                .sadd(server_users_key(server_id), user)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(ok == 1)
    }

    async fn release_route(&self, user: u64, session_id: u64) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let released: String = self
            .release
            .key(route_key(user))
            .arg(session_id)
            .invoke_async(&mut conn)
            .await
            .map_err(unavailable)?;
        if released.is_empty() {
            return Ok(false);
        }
        let route = decode_route(&released)?;
        let _: () = conn
            .srem(server_users_key(&route.server_id), user)
            .await
            .map_err(unavailable)?;
        self.leave_online(user).await?;
        Ok(true)
    }

    async fn routes(&self, users: &[u64]) -> Result<Vec<Option<Route>>, StoreError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.get(route_key(*user));
        }
        let values: Vec<Option<String>> = pipe
            .query_async(&mut self.conn())
            .await
            .map_err(unavailable)?;
        values
            .into_iter()
            .map(|v| v.as_deref().map(decode_route).transpose())
            .collect()
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
        for id in stale {
            self.leave_online(id).await?;
        }
        Ok(online)
    }

    async fn renew_routes(
        &self,
        server_id: &str,
        sessions: &[(u64, u64)],
        lease: Duration,
    ) -> Result<Vec<u64>, StoreError> {
        if sessions.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn();
        let mut pipe = redis::pipe();
        for &(user, session_id) in sessions {
            let route = Route {
                server_id: server_id.to_string(),
                session_id,
                confirmed: true,
            };
            // EVAL, not EVALSHA: a pipeline cannot recover from NOSCRIPT (empty script
            // cache after a Redis restart).
            pipe.cmd("EVAL")
                .arg(RESTORE)
                .arg(1)
                .arg(route_key(user))
                .arg(session_id)
                .arg(encode_route(&route))
                .arg(lease.as_millis() as u64);
        }
        let results: Vec<i64> = pipe.query_async(&mut conn).await.map_err(unavailable)?;
        let mut lost = Vec::new();
        let mut kept = Vec::new();
        for (&(user, _), ok) in sessions.iter().zip(results) {
            if ok == 1 {
                kept.push(user);
            } else {
                lost.push(user);
            }
        }
        if !kept.is_empty() {
            let _: () = redis::pipe()
                .sadd(ONLINE, &kept)
                .ignore()
                .sadd(server_users_key(server_id), &kept)
                .ignore()
                .query_async(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(lost)
    }

    async fn remove_server_routes(&self, server_id: &str) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.conn();
        let users: Vec<u64> = conn
            .smembers(server_users_key(server_id))
            .await
            .map_err(unavailable)?;
        let mut removed = Vec::new();
        for user in users {
            let deleted: i64 = self
                .remove_if_server
                .key(route_key(user))
                .arg(server_id)
                .invoke_async(&mut conn)
                .await
                .map_err(unavailable)?;
            if deleted == 1 {
                self.leave_online(user).await?;
                removed.push(user);
            }
        }
        let _: () = conn
            .del(server_users_key(server_id))
            .await
            .map_err(unavailable)?;
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
