//! A lossy UDP relay for tests: sits between clients and a server and drops, duplicates,
//! reorders and delays datagrams in both directions, with blackout windows on demand. Seeded,
//! so a run's impairments are reproducible (up to task scheduling).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;
use tokio_util::task::AbortOnDropHandle;

/// What the relay does to each datagram.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Impairments {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is sent twice.
    pub duplicate: f64,
    /// Probability that a datagram is held back by `reorder_by`, letting later ones overtake it.
    pub reorder: f64,
    /// How long a reordered datagram is held back.
    pub reorder_by: Duration,
    /// Delay added to every datagram.
    pub delay: Duration,
    /// Extra random delay, uniform in `[0, jitter]`.
    pub jitter: Duration,
}

impl Impairments {
    /// A perfect link.
    pub fn none() -> Self {
        Self {
            loss: 0.0,
            duplicate: 0.0,
            reorder: 0.0,
            reorder_by: Duration::ZERO,
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
        }
    }

    /// `loss` drop rate with a fifth of it as duplication and reordering, and 1 ms of jitter.
    pub fn lossy(loss: f64) -> Self {
        Self {
            loss,
            duplicate: loss / 5.0,
            reorder: loss / 5.0,
            reorder_by: Duration::from_millis(3),
            delay: Duration::ZERO,
            jitter: Duration::from_millis(1),
        }
    }
}

/// Counters of what the relay did.
#[derive(Debug, Default)]
pub struct RelayStats {
    /// Datagrams received from either side.
    pub received: AtomicU64,
    /// Dropped by loss or blackout.
    pub dropped: AtomicU64,
    /// Extra copies sent.
    pub duplicated: AtomicU64,
    /// Held back to be overtaken.
    pub reordered: AtomicU64,
}

struct Shared {
    impairments: Mutex<Impairments>,
    blackout: AtomicBool,
    rng: Mutex<StdRng>,
    stats: RelayStats,
}

impl Shared {
    /// Decides the fate of one datagram: the delays at which copies are sent (empty: dropped).
    fn plan(&self) -> Vec<Duration> {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        if self.blackout.load(Ordering::Relaxed) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let imp = *self.impairments.lock().unwrap_or_else(|p| p.into_inner());
        let mut rng = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        if rng.random_bool(imp.loss.clamp(0.0, 1.0)) {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let copies = if rng.random_bool(imp.duplicate.clamp(0.0, 1.0)) {
            self.stats.duplicated.fetch_add(1, Ordering::Relaxed);
            2
        } else {
            1
        };
        (0..copies)
            .map(|_| {
                let jitter = imp.jitter.mul_f64(rng.random::<f64>());
                let mut delay = imp.delay + jitter;
                if rng.random_bool(imp.reorder.clamp(0.0, 1.0)) {
                    self.stats.reordered.fetch_add(1, Ordering::Relaxed);
                    delay += imp.reorder_by;
                }
                delay
            })
            .collect()
    }
}

/// A running relay. Dropping it stops it.
pub struct Relay {
    /// Address clients send to.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Relay {
    /// Starts a relay on `127.0.0.1:0` forwarding to `upstream`.
    pub async fn start(
        upstream: SocketAddr,
        impairments: Impairments,
        seed: u64,
    ) -> anyhow::Result<Self> {
        let front = Arc::new(UdpSocket::bind("127.0.0.1:0").await?);
        let addr = front.local_addr()?;
        let shared = Arc::new(Shared {
            impairments: Mutex::new(impairments),
            blackout: AtomicBool::new(false),
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
            stats: RelayStats::default(),
        });
        let task = tokio::spawn(run(front, upstream, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    /// Drops everything in both directions while on.
    pub fn set_blackout(&self, on: bool) {
        self.shared.blackout.store(on, Ordering::Relaxed);
    }

    /// Changes the impairments from now on.
    pub fn set_impairments(&self, impairments: Impairments) {
        *self
            .shared
            .impairments
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = impairments;
    }

    /// What the relay did so far.
    pub fn stats(&self) -> &RelayStats {
        &self.shared.stats
    }
}

/// Sends `data` after each planned delay.
fn forward(socket: Arc<UdpSocket>, to: Option<SocketAddr>, data: Vec<u8>, plan: Vec<Duration>) {
    for delay in plan {
        let socket = socket.clone();
        let data = data.clone();
        let send = async move {
            let _ = match to {
                Some(addr) => socket.send_to(&data, addr).await,
                None => socket.send(&data).await,
            };
        };
        if delay.is_zero() {
            tokio::spawn(send);
        } else {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                send.await;
            });
        }
    }
}

async fn run(front: Arc<UdpSocket>, upstream: SocketAddr, shared: Arc<Shared>) {
    // One upstream socket per client address, so the server sees each client (and each
    // client address change) separately. Each one's return path ends with this task, also
    // when it is aborted (a dropped relay): else a stopped relay went on carrying traffic
    // from the server to its clients.
    let mut upstreams: HashMap<SocketAddr, (Arc<UdpSocket>, AbortOnDropHandle<()>)> =
        HashMap::new();
    let mut buf = vec![0u8; 65_536];
    loop {
        let Ok((len, client)) = front.recv_from(&mut buf).await else {
            break;
        };
        let socket = match upstreams.get(&client) {
            Some((socket, _)) => socket.clone(),
            None => {
                let Ok(socket) = UdpSocket::bind("127.0.0.1:0").await else {
                    continue;
                };
                if socket.connect(upstream).await.is_err() {
                    continue;
                }
                let socket = Arc::new(socket);
                let back = AbortOnDropHandle::new(tokio::spawn(backward(
                    socket.clone(),
                    front.clone(),
                    client,
                    shared.clone(),
                )));
                upstreams.insert(client, (socket.clone(), back));
                socket
            }
        };
        forward(socket, None, buf[..len].to_vec(), shared.plan());
    }
}

async fn backward(
    upstream: Arc<UdpSocket>,
    front: Arc<UdpSocket>,
    client: SocketAddr,
    shared: Arc<Shared>,
) {
    let mut buf = vec![0u8; 65_536];
    while let Ok(len) = upstream.recv(&mut buf).await {
        forward(
            front.clone(),
            Some(client),
            buf[..len].to_vec(),
            shared.plan(),
        );
    }
}
