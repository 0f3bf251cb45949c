//! The cim under test: by default a `cim-router` embedded-mode process started by the bench
//! (so its memory can be read from /proc), or an existing cluster given by URL and CA.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A cim to benchmark.
pub struct Target {
    /// Router URL.
    pub router_url: String,
    /// CA certificate (PEM).
    pub ca_pem: Vec<u8>,
    /// Server client addresses by id (known for the embedded process).
    pub servers: HashMap<String, SocketAddr>,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

impl Target {
    /// An existing cluster.
    pub fn external(router_url: String, ca: &PathBuf) -> anyhow::Result<Self> {
        Ok(Self {
            router_url,
            ca_pem: std::fs::read(ca).with_context(|| format!("reading {}", ca.display()))?,
            servers: HashMap::new(),
            child: None,
            _dir: None,
        })
    }

    /// Starts `cim-router` in embedded mode with `servers` servers, from the directory of this
    /// executable. New accounts use a cheap Argon2 cost so that setting up thousands of users
    /// does not dominate the run (the cost is a security setting, not a delivery guarantee).
    pub async fn embedded(servers: u16, extra_args: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let bin = exe.with_file_name("cim-router");
        if !bin.exists() {
            bail!(
                "{} not found: build it with cargo build --release -p cim-router",
                bin.display()
            );
        }
        let dir = tempfile::tempdir()?;
        let certs = dir.path().join("certs");
        let mut child = Command::new(&bin)
            .args(["--http", "127.0.0.1:0", "--servers", &servers.to_string()])
            .arg("--certs")
            .arg(&certs)
            .args(["--argon2-memory-kib", "256", "--argon2-iterations", "1"])
            // All bench clients share 127.0.0.1 and send at full speed.
            .args([
                "--max-login-attempts-per-ip",
                "100000000",
                "--max-registrations-per-ip",
                "100000000",
                "--max-connections-per-ip",
                "1000000",
            ])
            .args(["--max-msgs-per-sec", "1000000"])
            .args(extra_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut router_url = None;
        let mut server_addrs = HashMap::new();
        read_start(&mut child, "cim-router", |line| {
            if let Some(url) = line.strip_prefix("router: ") {
                router_url = Some(url.trim().to_string());
            } else if let Some((id, addr)) = line
                .strip_prefix("server: ")
                .and_then(|rest| rest.split_once(" at "))
            {
                server_addrs.insert(id.to_string(), addr.trim().parse()?);
            }
            Ok(line.starts_with("press Ctrl-C"))
        })
        .await?;
        Ok(Self {
            router_url: router_url.context("no router url printed")?,
            ca_pem: std::fs::read(certs.join(cim_certs::CA_CERT))?,
            servers: server_addrs,
            child: Some(child),
            _dir: Some(dir),
        })
    }

    /// Starts the quinn floor server (`crate::floor`): this executable as `cim-bench
    /// floor-server`, with a fresh certificate set. Its QUIC and TCP addresses are the servers
    /// `quic` and `tcp`.
    pub async fn floor() -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let certs = cim_certs::generate(&dir.path().join("certs"), &[])?;
        let mut child = Command::new(std::env::current_exe()?)
            .arg("floor-server")
            .arg("--certs")
            .arg(&certs.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("starting the floor server")?;
        let mut servers = HashMap::new();
        read_start(&mut child, "the floor server", |line| {
            let Some(rest) = line.strip_prefix("floor: ") else {
                return Ok(false);
            };
            let (quic, tcp) = rest.trim().split_once(' ').context("floor: QUIC TCP")?;
            servers.insert("quic".to_string(), quic.parse()?);
            servers.insert("tcp".to_string(), tcp.parse()?);
            Ok(true)
        })
        .await?;
        Ok(Self {
            router_url: format!("quinn floor at {}", servers["quic"]),
            ca_pem: std::fs::read(certs.ca_cert())?,
            servers,
            child: Some(child),
            _dir: Some(dir),
        })
    }

    /// Process id of the embedded process (none for an existing cluster).
    fn pid(&self) -> Option<u32> {
        self.child.as_ref()?.id()
    }

    /// CPU time (user + system) the embedded process has used so far.
    pub fn cpu_seconds(&self) -> Option<f64> {
        process_cpu_seconds(&self.pid()?.to_string())
    }

    /// Resident memory of the embedded process, in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        let pid = self.pid()?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    }
}

/// Reads `child`'s stdout lines into `line` until it returns true (within 30 s), then keeps
/// draining stdout so the child never blocks on a full pipe.
async fn read_start(
    child: &mut Child,
    what: &str,
    mut line: impl FnMut(&str) -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let stdout = child.stdout.take().context("no stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let read = async {
        while let Some(next) = lines.next_line().await? {
            if line(&next)? {
                return Ok::<_, anyhow::Error>(());
            }
        }
        bail!("{what} exited during start")
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .with_context(|| format!("{what} did not start"))??;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    Ok(())
}

/// Clock ticks per second of `/proc/<pid>/stat` (USER_HZ: 100 on x86-64 and aarch64 Linux).
const USER_HZ: f64 = 100.0;

/// CPU time (user + system) used so far by process `pid` (`"self"` for this one), from /proc.
pub fn process_cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some(cpu_ticks(&stat)? as f64 / USER_HZ)
}

/// utime + stime of a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its closing parenthesis.
fn cpu_ticks(stat: &str) -> Option<u64> {
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    // After the name: state (3), ppid, pgrp, session, tty, tpgid, flags, minflt, cminflt,
    // majflt, cmajflt, then utime (14) and stime (15).
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_counted_after_the_command_name() {
        let stat = "4242 (cim (a) b) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 9 0";
        assert_eq!(cpu_ticks(stat), Some(287));
        assert_eq!(cpu_ticks("4242 (cut short) S 1 2"), None);
    }

    #[test]
    fn cpu_time_is_read_from_proc() {
        assert!(process_cpu_seconds("self").is_some());
        assert!(process_cpu_seconds("0").is_none());
    }
}
