//! Remembers certificate chains a client has already verified, so that a process connecting
//! again and again to the same router and servers (a console client's API calls, a phone
//! reconnecting, a load generator's thousands of clients) checks each chain's signatures once
//! every few minutes instead of in every handshake. Browsers keep the same kind of cache.
//!
//! Only the chain is cached. Every handshake still checks the server's signature over the
//! handshake itself, which proves it holds the certificate's key. A cache entry covers the
//! exact chain bytes, server name, stapled OCSP response and trust anchors that were verified,
//! and it ages out after [`VERIFIED_FOR`]: a chain is checked again at least that often, so a
//! certificate past its `notAfter` is refused at most that much later. (A handshake resumed from
//! a session ticket checks no certificate at all, as in any TLS 1.3 client; the router's
//! ticket keys live only in its process, so a restarted router is checked in full.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use ring::digest::{Context, SHA256};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// How long a verified chain is trusted without checking it again.
pub const VERIFIED_FOR: Duration = Duration::from_secs(300);
/// Most chains remembered per process; beyond this the cache is cleared. A client talks to a
/// router or two and a handful of servers, so this is only reached by a misuse.
const MAX_ENTRIES: usize = 1024;

/// SHA-256 over everything a verification depended on.
type ChainKey = [u8; 32];

/// Chains verified in this process, shared by every client configuration in it.
fn verified_chains() -> &'static Mutex<HashMap<ChainKey, UnixTime>> {
    static CHAINS: OnceLock<Mutex<HashMap<ChainKey, UnixTime>>> = OnceLock::new();
    CHAINS.get_or_init(Default::default)
}

/// A webpki server verifier that skips the chain check for a chain it verified recently.
#[derive(Debug)]
pub struct CachingServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    /// SHA-256 over the trust anchors, so that a chain verified against other roots (another
    /// configuration in the same process) never counts.
    roots_digest: [u8; 32],
    /// Chains this verifier checked in full (cache misses).
    chain_checks: AtomicU64,
}

impl CachingServerVerifier {
    /// A verifier trusting `roots`, with cim's one crypto provider ([`crate::tls::provider`]):
    /// verdicts are shared by every verifier in the process, so they must all check the same
    /// way (same signature algorithms, no revocation lists).
    pub fn new(roots: RootCertStore) -> Result<Self, rustls::client::VerifierBuilderError> {
        let mut digest = Context::new(&SHA256);
        for anchor in &roots.roots {
            for part in [
                anchor.subject.as_ref(),
                anchor.subject_public_key_info.as_ref(),
                anchor.name_constraints.as_deref().unwrap_or_default(),
            ] {
                add_field(&mut digest, part);
            }
        }
        let roots_digest = finish(digest);
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), crate::tls::provider())
                .build()?;
        Ok(Self {
            inner,
            roots_digest,
            chain_checks: AtomicU64::new(0),
        })
    }

    /// How many chains this verifier has checked in full rather than found in the cache.
    pub fn chain_checks(&self) -> u64 {
        self.chain_checks.load(Ordering::Relaxed)
    }

    fn key(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
    ) -> ChainKey {
        let mut digest = Context::new(&SHA256);
        add_field(&mut digest, &self.roots_digest);
        let kind: &[u8] = match server_name {
            ServerName::DnsName(_) => b"dns",
            _ => b"ip",
        };
        add_field(&mut digest, kind);
        add_field(&mut digest, server_name.to_str().as_bytes());
        add_field(&mut digest, ocsp_response);
        add_field(&mut digest, end_entity);
        for cert in intermediates {
            add_field(&mut digest, cert);
        }
        finish(digest)
    }
}

/// Hashes `field` with its length first, so that no two field lists hash the same bytes.
fn add_field(digest: &mut Context, field: &[u8]) {
    digest.update(&(field.len() as u64).to_be_bytes());
    digest.update(field);
}

fn finish(digest: Context) -> [u8; 32] {
    let mut out = [0; 32];
    out.copy_from_slice(digest.finish().as_ref());
    out
}

/// Whether a chain verified at `verified` may still be trusted at `now`.
fn still_fresh(verified: UnixTime, now: UnixTime) -> bool {
    now.as_secs()
        .checked_sub(verified.as_secs())
        .is_some_and(|age| age < VERIFIED_FOR.as_secs())
}

impl ServerCertVerifier for CachingServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let key = self.key(end_entity, intermediates, server_name, ocsp_response);
        let chains = verified_chains();
        let cached = chains
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&key)
            .copied();
        if cached.is_some_and(|verified| still_fresh(verified, now)) {
            return Ok(ServerCertVerified::assertion());
        }
        self.chain_checks.fetch_add(1, Ordering::Relaxed);
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        let mut chains = chains.lock().unwrap_or_else(|p| p.into_inner());
        if chains.len() >= MAX_ENTRIES {
            chains.clear();
        }
        chains.insert(key, now);
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls;

    /// A new CA with its server certificate: (roots, server chain).
    fn ca_and_server() -> (RootCertStore, Vec<CertificateDer<'static>>) {
        let dir = tempfile::tempdir().unwrap();
        let paths = cim_certs::generate(dir.path(), &[]).unwrap();
        (
            tls::load_roots(&paths.ca_cert()).unwrap(),
            tls::load_certs(&paths.server_cert()).unwrap(),
        )
    }

    fn verify(
        verifier: &CachingServerVerifier,
        chain: &[CertificateDer<'static>],
        name: &'static str,
    ) -> Result<ServerCertVerified, rustls::Error> {
        verify_at(verifier, chain, name, &[], UnixTime::now())
    }

    fn verify_at(
        verifier: &CachingServerVerifier,
        chain: &[CertificateDer<'static>],
        name: &'static str,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let name = ServerName::try_from(name).unwrap();
        verifier.verify_server_cert(&chain[0], &chain[1..], &name, ocsp, now)
    }

    #[test]
    fn a_verdict_covers_only_its_ocsp_bytes_and_its_five_minutes() {
        let (roots, chain) = ca_and_server();
        let verifier = CachingServerVerifier::new(roots).unwrap();
        let now = UnixTime::now();
        let later = |secs| UnixTime::since_unix_epoch(Duration::from_secs(now.as_secs() + secs));
        verify_at(&verifier, &chain, "127.0.0.1", &[], now).unwrap();
        verify_at(&verifier, &chain, "127.0.0.1", &[], later(299)).unwrap();
        assert_eq!(verifier.chain_checks(), 1);
        verify_at(&verifier, &chain, "127.0.0.1", b"stapled", later(299)).unwrap();
        assert_eq!(
            verifier.chain_checks(),
            2,
            "other OCSP bytes, another check"
        );
        verify_at(&verifier, &chain, "127.0.0.1", &[], later(300)).unwrap();
        assert_eq!(verifier.chain_checks(), 3, "five minutes on, checked again");
    }

    #[test]
    fn a_verified_chain_is_checked_once_and_only_for_its_own_roots_and_name() {
        let (roots_a, chain_a) = ca_and_server();
        let (roots_b, chain_b) = ca_and_server();
        let a = CachingServerVerifier::new(roots_a).unwrap();
        let b = CachingServerVerifier::new(roots_b).unwrap();

        verify(&a, &chain_a, "localhost").unwrap();
        verify(&a, &chain_a, "localhost").unwrap();
        assert_eq!(a.chain_checks(), 1, "the second handshake used the cache");

        // The cache is per process; another configuration's roots never inherit a verdict.
        assert!(verify(&b, &chain_a, "localhost").is_err());
        assert!(verify(&b, &chain_a, "localhost").is_err());
        assert_eq!(b.chain_checks(), 2, "a rejected chain is not remembered");
        verify(&b, &chain_b, "localhost").unwrap();

        // Nor does another name the certificate does not cover.
        assert!(verify(&a, &chain_a, "evil.example").is_err());
        assert_eq!(a.chain_checks(), 2);
    }

    #[test]
    fn a_verification_ages_out_and_a_clock_going_back_does_not_count() {
        let verified = UnixTime::since_unix_epoch(Duration::from_secs(1_000_000));
        let at = |secs| UnixTime::since_unix_epoch(Duration::from_secs(secs));
        assert!(still_fresh(verified, at(1_000_000)));
        assert!(still_fresh(verified, at(1_000_000 + 299)));
        assert!(!still_fresh(verified, at(1_000_000 + 300)));
        assert!(!still_fresh(verified, at(999_999)));
    }
}
