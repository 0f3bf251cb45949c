//! cim-bench: drives many real clients through a real cim and reports throughput, latency,
//! login rate and server memory per connection. Also home of the lossy UDP relay that the
//! `lossy` scenario and the integration tests put between clients and servers, and of the quinn
//! floor: cim's traffic shapes on bare quinn, to read cim's figures against, and of `cim-ab`,
//! which compares two builds run side by side.

pub mod compare;
pub mod floor;
pub mod relay;
pub mod run;
pub mod stats;
pub mod target;
