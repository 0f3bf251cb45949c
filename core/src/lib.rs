//! What cim's router and servers share: signed session tokens, rustls configuration from PEM
//! files, QUIC endpoint setup with cim's transport limits, and the server/router discovery
//! trait with its in-process implementation.

pub mod batch;
pub mod cert_cache;
pub mod config;
pub mod discovery;
pub mod fnv;
pub mod http1;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod names;
pub mod pending;
pub mod text;
pub mod tls;
pub mod token;
pub mod transport;

/// ALPN protocol spoken between clients and servers.
pub const ALPN_CLIENT: &[u8] = b"cim/1";
/// ALPN protocol spoken on router -> server links.
pub const ALPN_INTERNAL: &[u8] = b"cim-internal/1";

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// QUIC application close codes shared by all cim endpoints.
pub mod close {
    /// Normal end (logout, shutdown).
    pub const NORMAL: u32 = 0;
    /// The peer broke the protocol (bad frame, unexpected message).
    pub const PROTOCOL: u32 = 1;
    /// Login refused (bad token, wrong server).
    pub const AUTH: u32 = 2;
    /// The session was replaced by a newer login or ended by logout.
    pub const KICKED: u32 = 3;
    /// The server is draining; log in again through the router.
    pub const DRAIN: u32 = 4;
    /// No heartbeat within the dead-peer timeout.
    pub const TIMEOUT: u32 = 5;
    /// A limit was exceeded.
    pub const OVERLOAD: u32 = 6;

    /// The close code as a quinn `VarInt`.
    pub fn code(c: u32) -> quinn::VarInt {
        quinn::VarInt::from_u32(c)
    }
}
