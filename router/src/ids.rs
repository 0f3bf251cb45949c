//! Message ids: 64-bit, unique across routers and roughly time-ordered. Layout (snowflake):
//! 41 bits of milliseconds since 2025-01-01, 10 bits of node number, 12 bits of sequence.
//!
//! Uniqueness across routers rests on the node number, so a router never picks its own: it
//! holds one of the [`ID_NODES`] in the store under a lease that [`NodeHolder::keep`] renews
//! (`cim:id_nodes` on Redis). The generator issues ids only while the hold is sure to be alive
//! by the router's monotonic clock, which stops it before the store can let another router
//! claim the node; a router that cannot renew cannot reach its store, so its sends would fail
//! anyway. A new holder's ids start after the latest time the previous holder was allowed to
//! put in an id, so a clock that is behind (another machine's, or this one stepped back) cannot
//! repeat them.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::{ID_NODES, IdNode, Store};

const EPOCH_MS: u64 = 1_735_689_600_000;
const NODE_BITS: u32 = 10;
const SEQ_BITS: u32 = 12;
const MAX_SEQ: u64 = (1 << SEQ_BITS) - 1;
const _: () = assert!(ID_NODES as u64 == 1 << NODE_BITS);

/// When message `id` was issued, ms since the Unix epoch (by its router's clock).
pub fn issued_at_ms(id: u64) -> u64 {
    (id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS
}

/// Generates message ids for one router, with the node number it holds.
#[derive(Debug)]
pub struct IdGenerator {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    /// The node held, if any.
    node: Option<u64>,
    /// (ms since [`EPOCH_MS`], sequence) of the last id issued.
    last: (u64, u64),
    /// The hold on `node` is alive at least until then.
    valid_until: Instant,
    /// Ids carry no later time than this (ms since [`EPOCH_MS`]): the store tells the next
    /// holder of the node so.
    issue_until: u64,
}

impl Default for IdGenerator {
    fn default() -> Self {
        Self::unassigned()
    }
}

impl IdGenerator {
    /// A generator holding no node yet: it issues nothing until [`IdGenerator::hold`].
    pub fn unassigned() -> Self {
        Self {
            state: Mutex::new(State {
                node: None,
                last: (0, 0),
                valid_until: Instant::now(),
                issue_until: 0,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The node held, if ids can be issued with it at `now` (wall clock `now_ms`): the hold
    /// is alive and the clock is not past the time ids may carry.
    pub fn node(&self, now_ms: u64, now: Instant) -> Option<u16> {
        let state = self.state();
        let wall = now_ms.saturating_sub(EPOCH_MS);
        state
            .node
            .filter(|_| now < state.valid_until && wall <= state.issue_until)
            .map(|n| n as u16)
    }

    /// The next id, given the wall clock in ms since the Unix epoch and the monotonic `now`;
    /// `None` while no node is held (not claimed yet, lost, or its hold not renewed in time).
    /// Within one millisecond up to 4096 ids are issued; beyond that the clock is borrowed from
    /// the future, so ids stay unique and increasing even if the wall clock steps back.
    pub fn next(&self, now_ms: u64, now: Instant) -> Option<u64> {
        let mut state = self.state();
        let node = state.node.filter(|_| now < state.valid_until)?;
        let wall = now_ms.saturating_sub(EPOCH_MS);
        let last = state.last;
        let (ms, seq) = if wall > last.0 {
            (wall, 0)
        } else if last.1 < MAX_SEQ {
            (last.0, last.1 + 1)
        } else {
            (last.0 + 1, 0)
        };
        if ms > state.issue_until {
            // The wall clock jumped past what the store was told; wait for the next renewal.
            return None;
        }
        state.last = (ms, seq);
        Some((ms << (NODE_BITS + SEQ_BITS)) | (node << SEQ_BITS) | seq)
    }

    /// Starts issuing with `claimed`, whose hold is alive until `valid_until`, with times up
    /// to `issue_until_ms` (ms since the Unix epoch). Its ids come after any the node's earlier
    /// holder may have issued.
    pub fn hold(&self, claimed: IdNode, valid_until: Instant, issue_until_ms: u64) {
        let mut state = self.state();
        state.node = Some(u64::from(claimed.node % ID_NODES));
        let floor = claimed.issued_until_ms.saturating_sub(EPOCH_MS);
        if floor >= state.last.0 {
            state.last = (floor, MAX_SEQ);
        }
        state.valid_until = valid_until;
        state.issue_until = issue_until_ms.saturating_sub(EPOCH_MS);
    }

    /// The latest time (ms since the Unix epoch) in an id issued so far, or that a previous
    /// holder of the node may have issued.
    pub fn latest_ms(&self) -> u64 {
        self.state().last.0 + EPOCH_MS
    }

    /// The hold was renewed: alive until `valid_until`, times up to `issue_until_ms`.
    pub fn extend(&self, valid_until: Instant, issue_until_ms: u64) {
        let mut state = self.state();
        state.valid_until = state.valid_until.max(valid_until);
        state.issue_until = state
            .issue_until
            .max(issue_until_ms.saturating_sub(EPOCH_MS));
    }

    /// The node is no longer ours: stop issuing at once.
    pub fn lose(&self) {
        self.state().node = None;
    }
}

/// Claims and keeps a router's node number in the store.
pub struct NodeHolder {
    ids: Arc<IdGenerator>,
    store: Arc<dyn Store>,
    /// Unique per router process (a restarted router must not take its predecessor's hold
    /// for its own, nor two routers configured with one id each other's).
    owner: String,
    lease: Duration,
}

impl NodeHolder {
    /// A holder for `router_id`'s generator `ids`, with holds of `lease`.
    pub fn new(
        ids: Arc<IdGenerator>,
        store: Arc<dyn Store>,
        router_id: &str,
        lease: Duration,
    ) -> Self {
        Self {
            ids,
            store,
            owner: format!("{router_id}#{:016x}", rand::random::<u64>()),
            lease,
        }
    }

    /// The latest time ids may carry until the next renewal: far enough ahead of the clock and
    /// of the ids issued so far that renewals keep it ahead of both.
    fn issue_until_ms(&self) -> u64 {
        let latest = cim_core::now_ms().max(self.ids.latest_ms());
        latest + 2 * self.lease.as_millis() as u64
    }

    /// The hold lives at least this long after the store was asked (the store counts its
    /// lease from a later instant; the margin covers clock rate differences).
    fn valid_until(&self, asked: Instant) -> Instant {
        asked + self.lease - self.lease / 100
    }

    /// Tries once to claim a node, starting at a random one. Returns it if claimed.
    pub async fn claim(&self) -> Option<u16> {
        let asked = Instant::now();
        let issue_until_ms = self.issue_until_ms();
        let first = rand::random::<u16>() % ID_NODES;
        match self
            .store
            .claim_id_node(&self.owner, first, self.lease, issue_until_ms)
            .await
        {
            Ok(Some(claimed)) => {
                self.ids
                    .hold(claimed, self.valid_until(asked), issue_until_ms);
                tracing::info!(node = claimed.node, owner = %self.owner, "message-id node claimed");
                if claimed.issued_until_ms + self.lease.as_millis() as u64 > issue_until_ms
                    && !self.renew(claimed.node).await
                {
                    // The previous holder's clock was ahead: our ids start after its, so the
                    // time they may carry must move on at once. Taken meanwhile: claim anew.
                    self.ids.lose();
                    return None;
                }
                Some(claimed.node)
            }
            Ok(None) => {
                tracing::error!("every message-id node is held: no message can be sent");
                None
            }
            Err(e) => {
                tracing::warn!(error = %e, "message-id node not claimed");
                None
            }
        }
    }

    /// Renews the hold on `node`. Returns false if another router holds it now. A store that
    /// cannot be reached is retried at the next turn: the generator stops by itself when the
    /// hold may have lapsed.
    async fn renew(&self, node: u16) -> bool {
        let asked = Instant::now();
        let issue_until_ms = self.issue_until_ms();
        match self
            .store
            .renew_id_node(&self.owner, node, self.lease, issue_until_ms)
            .await
        {
            Ok(true) => {
                self.ids.extend(self.valid_until(asked), issue_until_ms);
                true
            }
            Ok(false) => false,
            Err(e) => {
                tracing::warn!(node, error = %e, "message-id node not renewed");
                true
            }
        }
    }

    /// Keeps `held` (or claims one when `None`) until `shutdown`, then releases it. A hold
    /// found taken by another router stops the generator at once and a new node is claimed.
    pub async fn keep(self, mut held: Option<u16>, shutdown: CancellationToken) {
        let renew_every = self.lease / 6;
        let retry_every = renew_every.min(Duration::from_secs(1));
        loop {
            let wait = if held.is_some() {
                renew_every
            } else {
                retry_every
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
            let Some(node) = held else {
                held = self.claim().await;
                continue;
            };
            if !self.renew(node).await {
                self.ids.lose();
                tracing::warn!(
                    node,
                    "message-id node taken by another router; claiming another"
                );
                held = self.claim().await;
            }
        }
        if let Some(node) = held {
            self.ids.lose();
            let release = self.store.release_id_node(&self.owner, node);
            if let Ok(Err(e)) = tokio::time::timeout(Duration::from_secs(2), release).await {
                tracing::debug!(node, error = %e, "message-id node not released");
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const HOUR_MS: u64 = 3_600_000;

    fn held(node: u16, issued_until_ms: u64) -> IdGenerator {
        let ids = IdGenerator::unassigned();
        let claimed = IdNode {
            node,
            issued_until_ms,
        };
        ids.hold(
            claimed,
            Instant::now() + Duration::from_secs(60),
            EPOCH_MS + HOUR_MS,
        );
        ids
    }

    #[test]
    fn ids_increase_even_when_the_clock_stalls_or_steps_back() {
        let ids = held(3, 0);
        let now = Instant::now();
        let mut prev = 0;
        for i in 0..10_000u64 {
            let wall = EPOCH_MS + 1_000 - (i % 7); // stalls and steps back
            let id = ids.next(wall, now).unwrap();
            assert!(id > prev);
            prev = id;
        }
    }

    #[test]
    fn an_id_tells_when_it_was_issued() {
        let ids = held(1_023, 0);
        let wall = EPOCH_MS + 1_234;
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(issued_at_ms(ids.next(wall, now).unwrap()), wall);
        }
    }

    #[test]
    fn nodes_never_collide() {
        let now = Instant::now();
        let a = held(1, 0);
        let b = held(2, 0);
        assert_ne!(a.next(EPOCH_MS + 5, now), b.next(EPOCH_MS + 5, now));
    }

    #[test]
    fn nothing_is_issued_without_a_live_hold() {
        let ids = IdGenerator::unassigned();
        let now = Instant::now();
        assert_eq!(ids.next(EPOCH_MS + 5, now), None);
        let ids = held(4, 0);
        assert!(ids.next(EPOCH_MS + 5, now).is_some());
        assert_eq!(ids.next(EPOCH_MS + 5, now + Duration::from_secs(61)), None);
        ids.extend(now + Duration::from_secs(120), EPOCH_MS + HOUR_MS);
        assert!(
            ids.next(EPOCH_MS + 6, now + Duration::from_secs(61))
                .is_some()
        );
        // Past the time the store was told ids may carry: nothing until it is told more.
        assert_eq!(ids.next(EPOCH_MS + HOUR_MS + 1, now), None);
        ids.lose();
        assert_eq!(ids.next(EPOCH_MS + 7, now), None);
        assert_eq!(ids.node(EPOCH_MS + 7, now), None);
    }

    #[test]
    fn a_new_holder_issues_after_the_previous_one() {
        let now = Instant::now();
        let previous = held(9, 0);
        let previous_id = previous.next(EPOCH_MS + 50_000, now).unwrap();
        // The next holder's clock is 40 s behind; the store says ids reached 50 s.
        let next = held(9, EPOCH_MS + 50_000);
        let id = next.next(EPOCH_MS + 10_000, now).unwrap();
        assert!(id > previous_id, "{id} after {previous_id}");
        assert_eq!(next.node(EPOCH_MS + 10_000, now), Some(9));
        assert_eq!(
            next.node(EPOCH_MS + HOUR_MS + 1, now),
            None,
            "clock past the bound"
        );
    }
}
