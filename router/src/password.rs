//! Password hashing with Argon2id. Parameters follow OWASP's minimum recommendation
//! (19 MiB memory, 2 iterations, 1 lane); hashes are PHC strings, so parameters can be raised
//! later without invalidating stored hashes.
//!
//! [`PasswordWork`] bounds how many hashes run at once: each holds its memory cost (19 MiB by
//! default) for tens of milliseconds, so a login storm (every client of a dead server logging
//! in again) must queue for the cores instead of growing the blocking pool and memory with it.
//! The memory of finished hashes is kept for the next ones ([`ReusedMemory`]).

use argon2::password_hash::{
    Decimal, Ident, Output, ParamsString, PasswordHash, PasswordHasher, PasswordVerifier, Salt,
    SaltString,
};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Semaphore;

/// Memory cost in KiB.
pub const MEMORY_KIB: u32 = 19 * 1024;
/// Iterations.
pub const ITERATIONS: u32 = 2;
/// Lanes.
pub const LANES: u32 = 1;

/// Cost of new hashes (verification reads the cost from the stored hash).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Memory in KiB.
    pub memory_kib: u32,
    /// Iterations.
    pub iterations: u32,
}

impl Default for Cost {
    fn default() -> Self {
        Self {
            memory_kib: MEMORY_KIB,
            iterations: ITERATIONS,
        }
    }
}

/// Most Argon2 memory kept between hashes, in blocks of 1 KiB: 64 MiB, three buffers at the
/// default cost whatever the number of cores.
const KEEP_BLOCKS_AT_MOST: usize = 64 * 1024;

/// Argon2 memory kept between hashes. Allocating 19 MiB afresh for every login meant zeroing
/// it or faulting its pages in each time, about a tenth of a hash. Concurrent hashes already
/// held this much at their peak; kept, it stays after a storm, so its total is capped.
///
/// What a hash leaves in the memory must be no shortcut to testing guesses against its
/// password. The last pass of a hash of two or more passes overwrites every block of the
/// first, so its memory is kept as it is; a one-pass hash's memory would be such a shortcut,
/// so it is zeroed before it is kept. Zeroing memory that is still in the cache costs less
/// than the page faults of a fresh allocation (a few percent of a login at the bench's cheap
/// cost).
struct KeptMemory {
    buffers: Mutex<Vec<Vec<Block>>>,
}

static KEPT_MEMORY: KeptMemory = KeptMemory {
    buffers: Mutex::new(Vec::new()),
};

impl KeptMemory {
    fn buffers(&self) -> std::sync::MutexGuard<'_, Vec<Vec<Block>>> {
        self.buffers.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `hash` with the `count` Argon2 blocks `params` need, reusing a kept buffer when
    /// the params allow. Argon2 writes every block before it reads it, so what an earlier hash
    /// left is never used.
    fn with_blocks<T>(&self, params: &Params, hash: impl FnOnce(&mut [Block]) -> T) -> T {
        let count = params.block_count();
        if count > KEEP_BLOCKS_AT_MOST {
            return hash(&mut vec![Block::default(); count]);
        }
        let mut blocks = self.buffers().pop().unwrap_or_default();
        if blocks.len() < count {
            blocks.resize(count, Block::default());
        }
        let result = hash(&mut blocks[..count]);
        if params.t_cost() < 2 {
            blocks[..count].fill(Block::default());
        }
        let mut buffers = self.buffers();
        let kept: usize = buffers.iter().map(Vec::len).sum();
        if kept + blocks.len() <= KEEP_BLOCKS_AT_MOST {
            buffers.push(blocks);
        }
        result
    }
}

/// Argon2 through kept memory; the same PHC strings and checks as `Argon2`'s own
/// `PasswordHasher` (whose blanket `PasswordVerifier` verification uses this).
struct ReusedMemory<'a>(&'a KeptMemory);

impl PasswordHasher for ReusedMemory<'_> {
    type Params = Params;

    fn hash_password<'a>(
        &self,
        password: &[u8],
        salt: impl Into<Salt<'a>>,
    ) -> argon2::password_hash::Result<PasswordHash<'a>> {
        self.hash_password_customized(password, None, None, Params::default(), salt)
    }

    fn hash_password_customized<'a>(
        &self,
        password: &[u8],
        algorithm: Option<Ident<'a>>,
        version: Option<Decimal>,
        params: Params,
        salt: impl Into<Salt<'a>>,
    ) -> argon2::password_hash::Result<PasswordHash<'a>> {
        let algorithm = algorithm
            .map(Algorithm::try_from)
            .transpose()?
            .unwrap_or_default();
        let version = version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let salt = salt.into();
        let mut salt_buf = [0u8; 64];
        let salt_bytes = salt.decode_b64(&mut salt_buf)?;
        let output_len = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
        let argon2 = Argon2::new(algorithm, version, params.clone());
        let output = Output::init_with(output_len, |out| {
            self.0.with_blocks(&params, |blocks| {
                argon2.hash_password_into_with_memory(password, salt_bytes, out, blocks)
            })?;
            Ok(())
        })?;
        Ok(PasswordHash {
            algorithm: algorithm.ident(),
            version: Some(version.into()),
            params: ParamsString::try_from(&params)?,
            salt: Some(salt),
            hash: Some(output),
        })
    }
}

/// Why hashing failed.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes `password` with a fresh random salt. CPU-heavy: call from a blocking thread.
pub fn hash(password: &str, cost: Cost) -> Result<String, HashError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| HashError(e.to_string()))?;
    let params = Params::new(cost.memory_kib, cost.iterations, LANES, None)
        .map_err(|e| HashError(e.to_string()))?;
    ReusedMemory(&KEPT_MEMORY)
        .hash_password_customized(
            password.as_bytes(),
            Some(Algorithm::Argon2id.ident()),
            Some(Version::V0x13.into()),
            params,
            &salt,
        )
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Checks `password` against a stored PHC hash. CPU-heavy: call from a blocking thread.
pub fn verify(password: &str, stored: &str) -> bool {
    // The stored PHC string carries its own parameters, which verification uses.
    PasswordHash::new(stored).is_ok_and(|parsed| {
        ReusedMemory(&KEPT_MEMORY)
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// Runs password hashing on blocking threads, at most `slots` at once, with at most
/// `max_waiting` more queued; the rest are turned away ([`WorkError::Busy`]) so a storm costs
/// clients a retry, not the router its memory.
pub struct PasswordWork {
    slots: Arc<Semaphore>,
    /// Hashes running or queued.
    admitted: Arc<AtomicUsize>,
    max_admitted: usize,
}

/// Why [`PasswordWork::run`] did not run its job.
#[derive(Debug, thiserror::Error)]
pub enum WorkError {
    #[error("too many logins and registrations in progress; retry shortly")]
    Busy,
    #[error("password hashing task failed: {0}")]
    Failed(String),
}

impl PasswordWork {
    /// Queued hashes per slot before new ones are refused: at the default cost a core hashes
    /// 20-30 passwords a second, so a full queue drains in about 2-3 s.
    const WAITING_PER_SLOT: usize = 64;

    /// One slot per core (`available_parallelism`).
    pub fn for_this_machine() -> Self {
        Self::new(std::thread::available_parallelism().map_or(2, |n| n.get()))
    }

    /// `slots` hashes at once, each slot with a queue of its own size.
    pub fn new(slots: usize) -> Self {
        let slots = slots.max(1);
        Self {
            slots: Arc::new(Semaphore::new(slots)),
            admitted: Arc::new(AtomicUsize::new(0)),
            max_admitted: slots * (1 + Self::WAITING_PER_SLOT),
        }
    }

    /// Runs `job` on a blocking thread once a slot is free. The job holds its slot and its
    /// place until it ends, even if the caller stops waiting (a client that hangs up mid-login
    /// must not free a slot while its hash still runs).
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, WorkError> {
        let admitted =
            Admitted::try_new(&self.admitted, self.max_admitted).ok_or(WorkError::Busy)?;
        // The semaphore is never closed.
        let slot = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| WorkError::Failed(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            // Fields drop in order: the place is given back before the slot, so whoever gets
            // the slot next already sees this hash gone from the count.
            let _held = (admitted, slot);
            job()
        })
        .await
        .map_err(|e| WorkError::Failed(e.to_string()))
    }
}

/// A place among the admitted hashes, given back on drop.
struct Admitted(Arc<AtomicUsize>);

impl Admitted {
    fn try_new(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::{PasswordWork, WorkError};
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn hashing_runs_at_most_slots_at_once_and_refuses_past_the_queue() {
        let work = Arc::new(PasswordWork::new(2));
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let release_rx = Arc::new(std::sync::Mutex::new(release_rx));
        let capacity = 2 * (1 + PasswordWork::WAITING_PER_SLOT);
        let mut jobs = Vec::new();
        for _ in 0..capacity {
            let (work, running, most, release_rx) = (
                work.clone(),
                running.clone(),
                most.clone(),
                release_rx.clone(),
            );
            jobs.push(tokio::spawn(async move {
                work.run(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    release_rx.lock().unwrap().recv().unwrap();
                    running.fetch_sub(1, Ordering::SeqCst);
                })
                .await
            }));
        }
        // Wait until both slots are taken and everyone else is queued.
        while running.load(Ordering::SeqCst) < 2 || work.admitted.load(Ordering::SeqCst) < capacity
        {
            tokio::task::yield_now().await;
        }
        assert!(matches!(work.run(|| ()).await, Err(WorkError::Busy)));
        for _ in 0..capacity {
            release_tx.send(()).unwrap();
        }
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert_eq!(most.load(Ordering::SeqCst), 2);
        assert_eq!(work.admitted.load(Ordering::SeqCst), 0);
        // Room again once the queue drained.
        work.run(|| ()).await.unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_that_stops_waiting_does_not_free_the_slot_of_a_running_hash() {
        let work = Arc::new(PasswordWork::new(1));
        let (started_tx, started_rx) = std::sync::mpsc::channel::<()>();
        let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
        let caller = tokio::spawn({
            let work = work.clone();
            async move {
                work.run(move || {
                    started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                })
                .await
            }
        });
        tokio::task::spawn_blocking(move || started_rx.recv().unwrap())
            .await
            .unwrap();
        caller.abort();
        let _ = caller.await;
        // The hash still runs: the next one must wait for its slot.
        assert_eq!(work.admitted.load(Ordering::SeqCst), 1);
        assert_eq!(work.slots.available_permits(), 0);
        release_tx.send(()).unwrap();
        work.run(|| ()).await.unwrap();
        assert_eq!(work.admitted.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn right_password_verifies_and_wrong_does_not() {
        let h = super::hash("s3cret", super::Cost::default()).unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(super::verify("s3cret", &h));
        assert!(!super::verify("s3cret!", &h));
        assert!(!super::verify("s3cret", "not a hash"));
        let cheap = super::Cost {
            memory_kib: 1024,
            iterations: 1,
        };
        let h = super::hash("s3cret", cheap).unwrap();
        assert!(h.contains("m=1024,t=1"));
        assert!(super::verify("s3cret", &h));
    }

    #[test]
    fn hashes_match_argon2s_own_whatever_the_kept_memory_held() {
        use super::*;
        // A pool of its own (other tests hash in parallel), holding a buffer full of garbage.
        let memory = KeptMemory {
            buffers: Mutex::new(vec![vec![Block::default(); 4096]]),
        };
        for block in memory.buffers()[0].iter_mut() {
            for word in AsMut::<[u64]>::as_mut(block) {
                *word = 0xA5A5_A5A5_A5A5_A5A5;
            }
        }
        let salt = SaltString::encode_b64(b"0123456789abcdef").unwrap();
        // The hash through the kept memory and argon2's own, which must be the same.
        let ours_and_theirs = |params: Params| {
            let ours = ReusedMemory(&memory)
                .hash_password_customized(
                    b"s3cret",
                    Some(Algorithm::Argon2id.ident()),
                    Some(Version::V0x13.into()),
                    params.clone(),
                    &salt,
                )
                .unwrap()
                .to_string();
            let theirs = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
                .hash_password(b"s3cret", &salt)
                .unwrap()
                .to_string();
            (ours, theirs)
        };
        for (memory_kib, passes, output_len) in [(1024, 2, None), (2048, 3, Some(64))] {
            let params = Params::new(memory_kib, passes, LANES, output_len).unwrap();
            let (ours, theirs) = ours_and_theirs(params);
            assert_eq!(ours, theirs);
            // The garbage buffer was used (a fresh one would be kept beside it) and kept.
            let kept: Vec<usize> = memory.buffers().iter().map(Vec::len).collect();
            assert_eq!(kept, vec![4096]);
            // Hashes stored before (by argon2's own hasher) verify here, and ours there.
            let parsed = PasswordHash::new(&theirs).unwrap();
            assert!(
                ReusedMemory(&memory)
                    .verify_password(b"s3cret", &parsed)
                    .is_ok()
            );
            assert!(
                ReusedMemory(&memory)
                    .verify_password(b"s3cret!", &parsed)
                    .is_err()
            );
            assert!(
                Argon2::default()
                    .verify_password(b"s3cret", &PasswordHash::new(&ours).unwrap())
                    .is_ok()
            );
        }
        // A one-pass hash uses the kept memory too, and leaves it zeroed where it hashed.
        let (ours, theirs) = ours_and_theirs(Params::new(1024, 1, LANES, None).unwrap());
        assert_eq!(ours, theirs);
        {
            let buffers = memory.buffers();
            assert_eq!(buffers.len(), 1);
            let words = |blocks: &[Block]| {
                blocks
                    .iter()
                    .flat_map(|b| AsRef::<[u64]>::as_ref(b).iter().copied())
                    .collect::<Vec<u64>>()
            };
            assert!(words(&buffers[0][..1024]).iter().all(|&w| w == 0));
            // Beyond what it used, the two-pass hashes' blocks are as they left them.
            assert!(words(&buffers[0][1024..]).iter().any(|&w| w != 0));
        }
        // Costs above the cap get memory of their own.
        let huge = Params::new(65 * 1024, 2, LANES, None).unwrap();
        memory.with_blocks(&huge, |_| ());
        assert_eq!(memory.buffers().len(), 1);
    }
}
