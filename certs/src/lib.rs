//! Creates cim's development PKI with rcgen: a CA, a certificate for the servers' QUIC
//! endpoints, a certificate the router uses both for HTTPS and as its client certificate on
//! router -> server links, and the shared secret that signs session tokens.
//!
//! Files are written into one directory and existing files are never overwritten: generating
//! into a directory that already holds any of them is an error, and [`ensure`] reuses a complete
//! set as it is.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// File names inside a certificate directory.
pub const CA_CERT: &str = "ca.pem";
/// The hosts the certificates were made for, one a line (not part of [`ALL_FILES`]: sets made
/// before it was kept have none).
pub const HOSTS: &str = "hosts.txt";
/// CA private key.
pub const CA_KEY: &str = "ca-key.pem";
/// Certificate presented by servers on their client and internal QUIC endpoints.
pub const SERVER_CERT: &str = "server.pem";
/// Key for [`SERVER_CERT`].
pub const SERVER_KEY: &str = "server-key.pem";
/// Certificate presented by routers: HTTPS server and router -> server client certificate.
pub const ROUTER_CERT: &str = "router.pem";
/// Key for [`ROUTER_CERT`].
pub const ROUTER_KEY: &str = "router-key.pem";
/// Hex-encoded 32-byte secret that signs session tokens (shared by routers and servers).
pub const TOKEN_SECRET: &str = "token-secret";

const ALL_FILES: [&str; 7] = [
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    SERVER_KEY,
    ROUTER_CERT,
    ROUTER_KEY,
    TOKEN_SECRET,
];

/// Host names and addresses every dev certificate covers.
pub const DEFAULT_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Why certificates could not be created or found.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    /// A file that would be written already exists; nothing was overwritten.
    #[error("{0} already exists; refusing to overwrite existing keys")]
    Exists(PathBuf),
    /// Some but not all files of a set exist, so the set cannot be reused.
    #[error(
        "{dir} holds an incomplete certificate set (missing {missing}); remove it or pick another directory"
    )]
    Incomplete {
        /// Directory inspected.
        dir: PathBuf,
        /// First missing file.
        missing: String,
    },
    /// A reused set's certificates were made for other hosts than one now asked for.
    #[error(
        "the certificates in {dir} do not cover {host} (made for {made_for}); remove the directory to make a new set"
    )]
    HostNotCovered {
        /// Directory inspected.
        dir: PathBuf,
        /// Host asked for.
        host: String,
        /// Hosts the set covers.
        made_for: String,
    },
    /// rcgen refused the parameters.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system random generator failed.
    #[error("random generator failed")]
    Random,
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// File involved.
        path: PathBuf,
        /// Underlying error.
        source: std::io::Error,
    },
}

/// Paths of a complete certificate set.
#[derive(Debug, Clone)]
pub struct CertPaths {
    /// Directory holding the set.
    pub dir: PathBuf,
}

impl CertPaths {
    /// Paths of the set in `dir` (whether or not it exists yet).
    pub fn in_dir(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
    /// CA certificate (PEM).
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join(CA_CERT)
    }
    /// Server certificate chain (PEM).
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join(SERVER_CERT)
    }
    /// Server private key (PEM).
    pub fn server_key(&self) -> PathBuf {
        self.dir.join(SERVER_KEY)
    }
    /// Router certificate chain (PEM).
    pub fn router_cert(&self) -> PathBuf {
        self.dir.join(ROUTER_CERT)
    }
    /// Router private key (PEM).
    pub fn router_key(&self) -> PathBuf {
        self.dir.join(ROUTER_KEY)
    }
    /// Token signing secret (hex).
    pub fn token_secret(&self) -> PathBuf {
        self.dir.join(TOKEN_SECRET)
    }
}

/// Generates a new set into `dir` (created if missing), covering `DEFAULT_HOSTS` plus
/// `extra_hosts`. Fails without writing anything if any of the files already exists.
pub fn generate(dir: &Path, extra_hosts: &[String]) -> Result<CertPaths, CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if let Some(existing) = ALL_FILES.iter().map(|f| dir.join(f)).find(|p| p.exists()) {
        return Err(CertError::Exists(existing));
    }
    let hosts: Vec<String> = DEFAULT_HOSTS
        .iter()
        .map(|h| h.to_string())
        .chain(extra_hosts.iter().cloned())
        .collect();

    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.distinguished_name = name("cim dev CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, &ca_key);

    let leaf = |cn: &str, usages: Vec<ExtendedKeyUsagePurpose>| -> Result<_, CertError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(hosts.clone())?;
        params.distinguished_name = name(cn);
        params.extended_key_usages = usages;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf("cim server", vec![ExtendedKeyUsagePurpose::ServerAuth])?;
    let (router_pem, router_key) = leaf(
        "cim router",
        vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ],
    )?;
    let mut secret = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut secret)
        .map_err(|_| CertError::Random)?;
    let secret_hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();

    let paths = CertPaths::in_dir(dir);
    write_new(&paths.ca_cert(), &ca_cert.pem())?;
    write_new(&dir.join(CA_KEY), &ca_key.serialize_pem())?;
    write_new(&paths.server_cert(), &server_pem)?;
    write_new(&paths.server_key(), &server_key)?;
    write_new(&paths.router_cert(), &router_pem)?;
    write_new(&paths.router_key(), &router_key)?;
    write_new(&paths.token_secret(), &secret_hex)?;
    // A record, not a key: one left from an earlier set is replaced.
    let record = dir.join(HOSTS);
    fs::write(&record, hosts.join("\n") + "\n").map_err(|source| CertError::Io {
        path: record,
        source,
    })?;
    Ok(paths)
}

/// Reuses a complete set in `dir`, or generates one covering `extra_hosts` too if the
/// directory holds none of the files. Returns the paths and whether a new set was created. A
/// reused set whose record of hosts (written with it) lacks one of `extra_hosts` is refused:
/// clients would fail every handshake with a name the certificates do not carry.
pub fn ensure(dir: &Path, extra_hosts: &[String]) -> Result<(CertPaths, bool), CertError> {
    let present: Vec<bool> = ALL_FILES.iter().map(|f| dir.join(f).exists()).collect();
    if present.iter().all(|p| *p) {
        // Sets made before the record was kept are taken as they are.
        if let Ok(recorded) = fs::read_to_string(dir.join(HOSTS)) {
            let covered: Vec<&str> = recorded.lines().collect();
            // Addresses compare as addresses (`2001:DB8::1` is `2001:db8::1`), names as text.
            let same = |a: &str, b: &str| match (a.parse::<IpAddr>(), b.parse::<IpAddr>()) {
                (Ok(a), Ok(b)) => a == b,
                _ => a.eq_ignore_ascii_case(b),
            };
            let missing = |host: &&String| !covered.iter().any(|c| same(c, host));
            if let Some(host) = extra_hosts.iter().find(missing) {
                return Err(CertError::HostNotCovered {
                    dir: dir.to_owned(),
                    host: host.clone(),
                    made_for: covered.join(", "),
                });
            }
        }
        return Ok((CertPaths::in_dir(dir), false));
    }
    if let Some(i) = present.iter().position(|p| !p)
        && present.iter().any(|p| *p)
    {
        return Err(CertError::Incomplete {
            dir: dir.to_owned(),
            missing: ALL_FILES[i].to_string(),
        });
    }
    Ok((generate(dir, extra_hosts)?, true))
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "cim");
    dn
}

/// Creates `path` exclusively (fails if it exists) with owner-only permissions for keys.
fn write_new(path: &Path, contents: &str) -> Result<(), CertError> {
    let io_err = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            CertError::Exists(path.to_owned())
        } else {
            io_err(e)
        }
    })?;
    file.write_all(contents.as_bytes()).map_err(io_err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_full_set_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let paths = generate(dir.path(), &["cim.example".into()]).unwrap();
        let ca_before = fs::read_to_string(paths.ca_cert()).unwrap();
        assert!(ca_before.contains("BEGIN CERTIFICATE"));
        assert_eq!(fs::read_to_string(paths.token_secret()).unwrap().len(), 64);

        let err = generate(dir.path(), &[]).unwrap_err();
        assert!(matches!(err, CertError::Exists(_)), "{err}");
        assert_eq!(fs::read_to_string(paths.ca_cert()).unwrap(), ca_before);

        let (_, created) = ensure(dir.path(), &["cim.example".into()]).unwrap();
        assert!(!created);
        assert_eq!(fs::read_to_string(paths.ca_cert()).unwrap(), ca_before);
        // A host the set was not made for is refused, not silently reused.
        let err = ensure(dir.path(), &["10.0.0.5".into()]).unwrap_err();
        assert!(
            matches!(&err, CertError::HostNotCovered { host, .. } if host == "10.0.0.5"),
            "{err}"
        );
    }

    #[test]
    fn ensure_makes_a_set_for_the_hosts_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let (_, created) = ensure(dir.path(), &["10.0.0.5".into()]).unwrap();
        assert!(created);
        let hosts = fs::read_to_string(dir.path().join(HOSTS)).unwrap();
        assert!(hosts.lines().any(|h| h == "10.0.0.5"), "{hosts}");
        assert!(ensure(dir.path(), &["10.0.0.5".into()]).is_ok());
        assert!(ensure(dir.path(), &["LOCALHOST".into(), "::1".into()]).is_ok());
    }

    #[test]
    fn ensure_refuses_a_partial_set() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CA_KEY), "old key").unwrap();
        let err = ensure(dir.path(), &[]).unwrap_err();
        assert!(matches!(err, CertError::Incomplete { .. }), "{err}");
        assert_eq!(
            fs::read_to_string(dir.path().join(CA_KEY)).unwrap(),
            "old key"
        );
    }
}
