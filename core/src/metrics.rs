//! Prometheus metrics (prometheus-client): the counters and gauges of routers and servers, and
//! the text exposition served on `/metrics`.

use std::borrow::Cow;
use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
pub use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
pub use prometheus_client::registry::Registry;

/// Labels of a per-code error counter.
pub type CodeLabels = Vec<(String, String)>;

fn latency_histogram() -> Histogram {
    // 100 us .. ~3 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 16))
}

/// What a router counts.
#[derive(Debug, Clone)]
pub struct RouterMetrics {
    /// Successful logins with a password.
    pub logins: Counter,
    /// Successful re-logins with a session token (`POST /api/relogin`, no password hash).
    pub relogins: Counter,
    /// Refused logins and re-logins (bad credentials or token, limits).
    pub login_failures: Counter,
    /// Messages accepted (stored and acked).
    pub messages: Counter,
    /// Inbox entries written (one per recipient).
    pub stored: Counter,
    /// Push requests sent to servers (one per server per message).
    pub pushes: Counter,
    /// Requests refused, by error code.
    pub errors: Family<CodeLabels, Counter>,
    /// Time from a send's arrival to its ack (stored), seconds.
    pub send_latency: Histogram,
    /// Servers with a live link.
    pub linked_servers: Gauge,
    /// Users online (as of the last online-users query).
    pub online_users: Gauge,
    /// Inbox depth a client finds when it pulls (entries after its last seen one).
    pub inbox_depth: Histogram,
    /// HTTPS connections whose TLS handshake completed.
    pub https_handshakes: Counter,
    /// Of those, handshakes resumed from a session ticket (no certificate, no signature).
    pub https_resumed: Counter,
    /// Routes removed because their server left or was replaced by a new process.
    pub departed_routes: Counter,
    /// Group sends waiting for their group's turn (a send of the same group, or of one that
    /// shares its lock, is being stored): a hot group shows here.
    pub group_sends_waiting: Gauge,
    /// Accounts deleted, by their users or by an operator.
    pub accounts_deleted: Counter,
    /// Reports users made of others.
    pub reports: Counter,
    /// Read receipts kept (a receipt no further on than the reader's last is not counted).
    pub read_receipts: Counter,
    /// Messages (private and group) unsent by their senders.
    pub unsends: Counter,
}

impl RouterMetrics {
    /// Metrics registered in `registry` under `cim_router_*`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Self::unregistered();
        let r = registry.sub_registry_with_prefix("cim_router");
        r.register("logins", "Successful password logins", m.logins.clone());
        r.register(
            "relogins",
            "Successful re-logins with a session token",
            m.relogins.clone(),
        );
        r.register(
            "login_failures",
            "Refused logins and re-logins",
            m.login_failures.clone(),
        );
        r.register(
            "messages",
            "Messages accepted (stored, acked)",
            m.messages.clone(),
        );
        r.register("stored", "Inbox entries written", m.stored.clone());
        r.register("pushes", "Push requests to servers", m.pushes.clone());
        r.register("errors", "Refused requests by code", m.errors.clone());
        r.register(
            "send_latency_seconds",
            "Send arrival to ack",
            m.send_latency.clone(),
        );
        r.register(
            "linked_servers",
            "Servers with a live link",
            m.linked_servers.clone(),
        );
        r.register(
            "online_users",
            "Users online at the last query",
            m.online_users.clone(),
        );
        r.register(
            "inbox_depth",
            "Inbox entries waiting when a client pulls",
            m.inbox_depth.clone(),
        );
        r.register(
            "https_handshakes",
            "HTTPS connections whose TLS handshake completed",
            m.https_handshakes.clone(),
        );
        r.register(
            "https_resumed",
            "HTTPS handshakes resumed from a session ticket",
            m.https_resumed.clone(),
        );
        r.register(
            "departed_routes",
            "Routes removed because their server left or was replaced",
            m.departed_routes.clone(),
        );
        r.register(
            "group_sends_waiting",
            "Group sends waiting for their group's turn",
            m.group_sends_waiting.clone(),
        );
        r.register(
            "accounts_deleted",
            "Accounts deleted, by their users or by an operator",
            m.accounts_deleted.clone(),
        );
        r.register("reports", "Reports users made of others", m.reports.clone());
        r.register(
            "read_receipts",
            "Read receipts kept",
            m.read_receipts.clone(),
        );
        r.register(
            "unsends",
            "Messages unsent by their senders",
            m.unsends.clone(),
        );
        Arc::new(m)
    }

    /// Metrics that are counted but not exported (tests, tools).
    pub fn unregistered() -> Self {
        Self {
            logins: Counter::default(),
            relogins: Counter::default(),
            login_failures: Counter::default(),
            messages: Counter::default(),
            stored: Counter::default(),
            pushes: Counter::default(),
            errors: Family::default(),
            send_latency: latency_histogram(),
            linked_servers: Gauge::default(),
            online_users: Gauge::default(),
            inbox_depth: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            https_handshakes: Counter::default(),
            https_resumed: Counter::default(),
            departed_routes: Counter::default(),
            group_sends_waiting: Gauge::default(),
            accounts_deleted: Counter::default(),
            reports: Counter::default(),
            read_receipts: Counter::default(),
            unsends: Counter::default(),
        }
    }

    /// Counts a refused request.
    pub fn error(&self, code: &str) {
        self.errors
            .get_or_create(&vec![("code".to_string(), code.to_string())])
            .inc();
    }
}

/// What a server counts.
#[derive(Debug, Clone)]
pub struct ServerMetrics {
    /// Open client connections.
    pub connections: Gauge,
    /// Connections refused by caps.
    pub refused_connections: Counter,
    /// Connection attempts told to validate their address first (a QUIC Retry).
    pub retried_connections: Counter,
    /// Successful control-stream logins.
    pub logins: Counter,
    /// Fresh session tokens handed to connected clients.
    pub token_renewals: Counter,
    /// Messages received from clients.
    pub messages_in: Counter,
    /// Deliveries acked by clients.
    pub deliveries: Counter,
    /// Deliveries that failed (the entry stays in the inbox).
    pub delivery_failures: Counter,
    /// Sends refused by the per-session rate limit.
    pub rate_limited: Counter,
    /// Bytes of messages waiting in the sessions' outboxes or on their way to clients, each
    /// message counted once however many sessions it waits for.
    pub queued_bytes: Gauge,
}

impl ServerMetrics {
    /// Metrics registered in `registry` under `cim_server_*`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let m = Self::unregistered();
        let r = registry.sub_registry_with_prefix("cim_server");
        r.register(
            "connections",
            "Open client connections",
            m.connections.clone(),
        );
        r.register(
            "refused_connections",
            "Connections refused by caps",
            m.refused_connections.clone(),
        );
        r.register(
            "retried_connections",
            "Connection attempts told to validate their address first",
            m.retried_connections.clone(),
        );
        r.register("logins", "Control-stream logins", m.logins.clone());
        r.register(
            "token_renewals",
            "Fresh session tokens handed to connected clients",
            m.token_renewals.clone(),
        );
        r.register(
            "messages_in",
            "Messages received from clients",
            m.messages_in.clone(),
        );
        r.register(
            "deliveries",
            "Deliveries acked by clients",
            m.deliveries.clone(),
        );
        r.register(
            "delivery_failures",
            "Failed deliveries",
            m.delivery_failures.clone(),
        );
        r.register(
            "rate_limited",
            "Sends refused by the rate limit",
            m.rate_limited.clone(),
        );
        r.register(
            "queued_bytes",
            "Bytes of messages waiting for delivery to clients",
            m.queued_bytes.clone(),
        );
        Arc::new(m)
    }

    /// Metrics that are counted but not exported.
    pub fn unregistered() -> Self {
        Self {
            connections: Gauge::default(),
            refused_connections: Counter::default(),
            retried_connections: Counter::default(),
            logins: Counter::default(),
            token_renewals: Counter::default(),
            messages_in: Counter::default(),
            deliveries: Counter::default(),
            delivery_failures: Counter::default(),
            rate_limited: Counter::default(),
            queued_bytes: Gauge::default(),
        }
    }
}

/// A registry under a `server` label, for several servers in one process.
pub fn labelled<'a>(registry: &'a mut Registry, server_id: &str) -> &'a mut Registry {
    registry.sub_registry_with_label((Cow::Borrowed("server"), Cow::Owned(server_id.to_string())))
}

/// The text exposition of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
