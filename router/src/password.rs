//! Password hashing with Argon2id. Parameters follow OWASP's minimum recommendation
//! (19 MiB memory, 2 iterations, 1 lane); hashes are PHC strings, so parameters can be raised
//! later without invalidating stored hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};

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

fn hasher(cost: Cost) -> Result<Argon2<'static>, HashError> {
    let params = Params::new(cost.memory_kib, cost.iterations, LANES, None)
        .map_err(|e| HashError(e.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

/// Why hashing failed.
#[derive(Debug, thiserror::Error)]
#[error("password hashing failed: {0}")]
pub struct HashError(String);

/// Hashes `password` with a fresh random salt. CPU-heavy: call from a blocking thread.
pub fn hash(password: &str, cost: Cost) -> Result<String, HashError> {
    let salt_bytes: [u8; 16] = rand::random();
    let salt = SaltString::encode_b64(&salt_bytes).map_err(|e| HashError(e.to_string()))?;
    hasher(cost)?
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| HashError(e.to_string()))
}

/// Checks `password` against a stored PHC hash. CPU-heavy: call from a blocking thread.
pub fn verify(password: &str, stored: &str) -> bool {
    // The stored PHC string carries its own parameters, which verification uses.
    PasswordHash::new(stored).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
}
