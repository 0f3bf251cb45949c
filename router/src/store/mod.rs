//! The router's state behind one trait: accounts, routes (user -> server session) with leases,
//! and the online set. The in-memory store serves the embedded mode and unit tests; the Redis
//! store serves clusters.

use std::time::Duration;

use async_trait::async_trait;

mod memory;
mod redis;

pub use self::redis::RedisStore;
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

/// Outcome of [`Store::claim_route`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The claim holds; `previous` is the route it replaced (takeover), if any.
    Won {
        /// Route that was overwritten.
        previous: Option<Route>,
    },
    /// Another login holds the user and takeover was not requested.
    Busy(Route),
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
    /// Creates an account with a fresh id; fails with [`StoreError::NameTaken`] if the name
    /// exists.
    async fn create_account(&self, name: &str, password_hash: &str) -> Result<Account, StoreError>;
    /// Looks up an account by name.
    async fn account_by_name(&self, name: &str) -> Result<Option<Account>, StoreError>;
    /// Looks up accounts by id; missing ids are skipped.
    async fn accounts_by_id(&self, ids: &[u64]) -> Result<Vec<Account>, StoreError>;

    /// Atomically claims `user`'s route for a new login. Without `force`, an existing route
    /// makes the claim fail with [`Claim::Busy`]; with it, the route is replaced. A claim that
    /// the server does not confirm within `pending_lease` lapses.
    async fn claim_route(
        &self,
        user: u64,
        route: Route,
        pending_lease: Duration,
        force: bool,
    ) -> Result<Claim, StoreError>;
    /// Marks the route as confirmed (session open) and the user online, if the route still
    /// belongs to `session_id` on `server_id`. Returns whether it did.
    async fn confirm_route(
        &self,
        user: u64,
        session_id: u64,
        server_id: &str,
        lease: Duration,
    ) -> Result<bool, StoreError>;
    /// Removes the route and online entry if they still belong to `session_id`.
    async fn release_route(&self, user: u64, session_id: u64) -> Result<bool, StoreError>;
    /// Current routes of `users`, in the same order.
    async fn routes(&self, users: &[u64]) -> Result<Vec<Option<Route>>, StoreError>;
    /// Ids of users with a confirmed session.
    async fn online_users(&self) -> Result<Vec<u64>, StoreError>;
    /// Renews the leases of sessions open on `server_id`, given as `(user, session_id)`. A
    /// session whose route is missing (lapsed, or removed while the server was out of
    /// discovery) gets it back, confirmed. Returns the users whose route belongs to another
    /// login: their sessions on this server are stale.
    async fn renew_routes(
        &self,
        server_id: &str,
        sessions: &[(u64, u64)],
        lease: Duration,
    ) -> Result<Vec<u64>, StoreError>;
    /// Removes every route on `server_id` (the server is gone). Returns the users affected.
    async fn remove_server_routes(&self, server_id: &str) -> Result<Vec<u64>, StoreError>;
}
