//! rustls configuration from PEM files, always on the ring provider (a second provider
//! compiled in makes rustls refuse to pick a default).

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::cert_cache::CachingServerVerifier;

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {message}")]
    Pem {
        /// File involved.
        path: String,
        /// What went wrong.
        message: String,
    },
    /// rustls refused the configuration (bad key, unsupported algorithm).
    #[error("tls configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// A certificate verifier could not be built.
    #[error("certificate verifier: {0}")]
    Verifier(String),
}

/// The one crypto provider cim uses: ring's, with TLS_AES_128_GCM_SHA256 preferred. ring
/// lists AES-256-GCM with SHA-384 first; SHA-384 runs in software while SHA-256 has CPU
/// instructions on current x86 and ARM, and the handshake's key schedule and transcript hashes
/// were about 6% of a login storm's CPU on each side. The other suites stay available.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Loads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_err = |message: String| TlsError::Pem {
        path: path.display().to_string(),
        message,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err("no certificate found".into()));
    }
    Ok(certs)
}

/// Loads the first private key in a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

/// A root store holding the certificates of a PEM CA file.
pub fn load_roots(ca_path: &Path) -> Result<RootCertStore, TlsError> {
    roots_from_certs(load_certs(ca_path)?)
}

/// A root store from PEM bytes (for callers that already hold the CA).
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            path: "<ca>".into(),
            message: e.to_string(),
        })?;
    roots_from_certs(certs)
}

fn roots_from_certs(certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert)?;
    }
    Ok(roots)
}

/// Server-side TLS 1.3 configuration. With `client_roots`, clients must present a certificate
/// signed by one of them (mutual TLS, used on router -> server links).
pub fn server_config(
    cert_path: &Path,
    key_path: &Path,
    alpn: &[&[u8]],
    client_roots: Option<RootCertStore>,
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match client_roots {
        Some(roots) => {
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(load_certs(cert_path)?, load_key(key_path)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Client-side TLS 1.3 configuration trusting `roots`, optionally presenting a certificate.
/// Chains it has verified are remembered for a few minutes ([`CachingServerVerifier`]).
pub fn client_config(
    roots: RootCertStore,
    alpn: &[&[u8]],
    client_cert: Option<(&Path, &Path)>,
) -> Result<rustls::ClientConfig, TlsError> {
    let verifier =
        CachingServerVerifier::new(roots).map_err(|e| TlsError::Verifier(e.to_string()))?;
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client_cert {
        Some((cert, key)) => builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use rustls::CipherSuite;

    #[test]
    fn aes_128_gcm_is_preferred_and_no_suite_is_dropped() {
        let suites: Vec<CipherSuite> = super::provider()
            .cipher_suites
            .iter()
            .map(|s| s.suite())
            .collect();
        assert_eq!(suites[0], CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(
            suites.len(),
            rustls::crypto::ring::default_provider().cipher_suites.len()
        );
        assert!(suites.contains(&CipherSuite::TLS13_AES_256_GCM_SHA384));
    }
}
