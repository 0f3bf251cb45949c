//! In-memory [`Store`] for the embedded mode and unit tests. Leases are checked lazily against
//! a monotonic clock.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{Account, Claim, Route, Store, StoreError};

#[derive(Debug)]
struct Lease {
    route: Route,
    expires: Instant,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<u64, Account>,
    by_name: HashMap<String, u64>,
    next_id: u64,
    routes: HashMap<u64, Lease>,
    online: BTreeSet<u64>,
}

impl Inner {
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
        if inner.by_name.contains_key(name) {
            return Err(StoreError::NameTaken);
        }
        inner.next_id += 1;
        let account = Account {
            id: inner.next_id,
            name: name.to_string(),
            password_hash: password_hash.to_string(),
        };
        inner.by_name.insert(name.to_string(), account.id);
        inner.accounts.insert(account.id, account.clone());
        Ok(account)
    }

    async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError> {
        let inner = self.inner();
        Ok(inner
            .by_name
            .get(name)
            .and_then(|id| inner.accounts.get(id))
            .cloned())
    }

    async fn accounts_by_id(&self, ids: &[u64]) -> Result<Vec<Account>, StoreError> {
        let inner = self.inner();
        Ok(ids
            .iter()
            .filter_map(|id| inner.accounts.get(id).cloned())
            .collect())
    }

    async fn claim_route(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        let previous = inner.live_route(user, now).map(|l| l.route.clone());
        if let Some(existing) = &previous
            && !force
        {
            return Ok(Claim::Busy(existing.clone()));
        }
        inner.online.remove(&user);
        inner.routes.insert(
            user,
            Lease {
                route,
                expires: now + pending_lease,
            },
        );
        Ok(Claim::Won { previous })
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
        let Some(held) = inner.live_route(user, now) else {
            return Ok(false);
        };
        if held.route.session_id != session_id || held.route.server_id != server_id {
            return Ok(false);
        }
        held.route.confirmed = true;
        held.expires = now + lease;
        inner.online.insert(user);
        Ok(true)
    }

    async fn release_route(&self, user: u64, session_id: u64) -> Result<bool, StoreError> {
        let mut inner = self.inner();
        if inner
            .routes
            .get(&user)
            .is_some_and(|l| l.route.session_id == session_id)
        {
            inner.routes.remove(&user);
            inner.online.remove(&user);
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
    ) -> Result<Vec<u64>, StoreError> {
        let now = Instant::now();
        let mut inner = self.inner();
        let mut lost = Vec::new();
        for &(user, session_id) in sessions {
            if let Some(held) = inner.live_route(user, now)
                && held.route.session_id != session_id
            {
                lost.push(user);
                continue;
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
        Ok(lost)
    }

    async fn remove_server_routes(&self, server_id: &str) -> Result<Vec<u64>, StoreError> {
        let mut inner = self.inner();
        let users: Vec<u64> = inner
            .routes
            .iter()
            .filter(|(_, l)| l.route.server_id == server_id)
            .map(|(u, _)| *u)
            .collect();
        for user in &users {
            inner.routes.remove(user);
            inner.online.remove(user);
        }
        Ok(users)
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

    #[tokio::test]
    async fn second_claim_is_busy_unless_forced_and_stale_sessions_cannot_confirm() {
        let store = MemoryStore::new();
        assert_eq!(
            store
                .claim_route(1, route("s1", 10), LEASE, false)
                .await
                .unwrap(),
            Claim::Won { previous: None }
        );
        assert!(matches!(
            store
                .claim_route(1, route("s2", 11), LEASE, false)
                .await
                .unwrap(),
            Claim::Busy(_)
        ));
        assert!(store.confirm_route(1, 10, "s1", LEASE).await.unwrap());
        assert_eq!(store.online_users().await.unwrap(), vec![1]);

        let Claim::Won { previous } = store
            .claim_route(1, route("s2", 11), LEASE, true)
            .await
            .unwrap()
        else {
            panic!("forced claim must win");
        };
        assert_eq!(previous.unwrap().session_id, 10);
        // The replaced session can neither confirm nor release the new route.
        assert!(!store.confirm_route(1, 10, "s1", LEASE).await.unwrap());
        assert!(!store.release_route(1, 10).await.unwrap());
        assert!(store.confirm_route(1, 11, "s2", LEASE).await.unwrap());
        assert!(store.release_route(1, 11).await.unwrap());
        assert!(store.online_users().await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn unconfirmed_claims_lapse() {
        let store = MemoryStore::new();
        store
            .claim_route(1, route("s1", 10), Duration::from_secs(5), false)
            .await
            .unwrap();
        tokio::time::advance(Duration::from_secs(6)).await;
        assert_eq!(
            store
                .claim_route(1, route("s1", 11), LEASE, false)
                .await
                .unwrap(),
            Claim::Won { previous: None }
        );
    }

    #[tokio::test]
    async fn removing_a_server_drops_its_routes_only() {
        let store = MemoryStore::new();
        store
            .claim_route(1, route("s1", 10), LEASE, false)
            .await
            .unwrap();
        store
            .claim_route(2, route("s2", 20), LEASE, false)
            .await
            .unwrap();
        store.confirm_route(1, 10, "s1", LEASE).await.unwrap();
        store.confirm_route(2, 20, "s2", LEASE).await.unwrap();
        assert_eq!(store.remove_server_routes("s1").await.unwrap(), vec![1]);
        assert_eq!(store.online_users().await.unwrap(), vec![2]);
    }
}
