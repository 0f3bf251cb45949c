//! Operations: configuration is validated with errors naming the option, the example
//! configuration files work, and the admin page renders the live cluster in a real headless
//! Chromium.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use cim_client::{Client, LoginOptions};
use cim_integration_tests::{Proc, TestCluster, bin_path};
use http::Method;

async fn refused(bin: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = tokio::process::Command::new(bin_path(bin)?)
        .args(args)
        .output()
        .await?;
    anyhow::ensure!(
        !out.status.success(),
        "{bin} {args:?} should have been refused"
    );
    Ok(String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_refused_naming_the_option() -> anyhow::Result<()> {
    let err = refused("cim-router", &["--heartbeat-ms", "5"]).await?;
    assert!(err.contains("--heartbeat-ms"), "{err}");
    let err = refused("cim-router", &["--strategy", "fastest"]).await?;
    assert!(
        err.contains("--strategy") && err.contains("fastest"),
        "{err}"
    );
    let err = refused("cim-router", &["--redis", "redis://127.0.0.1:1"]).await?;
    assert!(err.contains("--zookeeper"), "{err}");
    let err = refused(
        "cim-server",
        &[
            "--id",
            "s1",
            "--zookeeper",
            "127.0.0.1:1",
            "--max-msgs-per-sec",
            "0",
        ],
    )
    .await?;
    assert!(err.contains("--max-msgs-per-sec"), "{err}");

    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "heartbeat_ms = 5000\n")?;
    let err = refused("cim-router", &["--config", file.to_str().unwrap()]).await?;
    assert!(err.contains("heartbeat_ms"), "{err}");
    std::fs::write(&file, "heartbeat-ms = 1\n")?;
    let err = refused("cim-router", &["--config", file.to_str().unwrap()]).await?;
    assert!(err.contains("--heartbeat-ms"), "{err}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_router_configuration_starts_the_embedded_mode() -> anyhow::Result<()> {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/cim-router.toml");
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("certs");
    let mut router = Proc::spawn(
        "cim-router",
        &[
            "--config",
            example.to_str().unwrap(),
            // The command line wins over the file.
            "--http",
            "127.0.0.1:0",
            "--certs",
            certs.to_str().unwrap(),
        ],
    )?;
    router.expect_line("router: https://127.0.0.1:").await?;
    router.expect_line("admin: https://127.0.0.1:").await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_page_shows_the_live_cluster_in_a_real_browser() -> anyhow::Result<()> {
    let cluster = TestCluster::start(2).await?;
    let config = cluster.client_config();
    let (_alice, _a) = cluster.user("alice").await?;
    let (_bob, _b) = cluster.user("bob").await?;
    let refused = Client::login(&config, "alice", "wrong", LoginOptions::default()).await;
    assert!(refused.is_err());

    // The page and its data need the token.
    let api = cim_client::RouterApi::new(&config)?;
    let (status, _) = api
        .raw(Method::GET, "/admin", Default::default(), None)
        .await?;
    assert_eq!(status.as_u16(), 401);
    let (status, _) = api
        .raw(
            Method::GET,
            "/admin/api/state?token=nope",
            Default::default(),
            None,
        )
        .await?;
    assert_eq!(status.as_u16(), 401);

    let chromium = ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .ok_or_else(|| anyhow::anyhow!("chromium not found: run ./test.sh, which installs it"))?;
    let profile = tempfile::tempdir()?;
    let url = format!(
        "{}/admin?token=test-admin-token",
        cluster.embedded.router_url
    );
    let run = tokio::process::Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            // A test browser facing the dev CA; cim's own clients always verify.
            "--ignore-certificate-errors",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run).await??;
    let dom = String::from_utf8_lossy(&out.stdout);
    // Rendered by the page's script from live data: server rows, online users, the error.
    for server in ["server-1", "server-2"] {
        assert!(
            dom.contains(&format!(r#"<td class="server-id">{server}</td>"#)),
            "{server} missing:\n{dom}"
        );
    }
    for user in ["alice", "bob"] {
        assert!(
            dom.contains(&format!(r#"<li class="online-user">{user}</li>"#)),
            "{user} missing:\n{dom}"
        );
    }
    assert!(
        dom.contains("invalid_credentials"),
        "the refused login is not listed:\n{dom}"
    );
    assert!(dom.contains(r#"<span id="online-count">2</span>"#), "{dom}");
    Ok(())
}
