//! Operations: configuration is validated with errors naming the option, the example
//! configuration files work, the admin page renders the live cluster in a real headless
//! Chromium, an operator deletes an account with the admin token, and a server's plain-HTTP
//! ops endpoint answers and bounds what a peer holds.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use cim_client::{Client, Event, LoginOptions};
use cim_integration_tests::cluster::ProcCluster;
use cim_integration_tests::{
    Proc, TestCluster, WAIT, bin_path, eventually, metric_value, next_event,
};
use http::Method;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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
    let (alice, _a) = cluster.user("alice").await?;
    let (bob, _b) = cluster.user("bob").await?;
    // Shown as text, not markup.
    bob.report(alice.info().user_id, "<b>spam</b>").await?;
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
    assert!(
        dom.contains(r#"<td class="reason">&lt;b&gt;spam&lt;/b&gt;</td>"#),
        "the report is not listed:\n{dom}"
    );
    assert!(
        dom.contains(r#"<button class="delete-account">Delete account</button>"#),
        "the report has no deletion button:\n{dom}"
    );
    Ok(())
}

/// A user reports another to the operators (not itself, not an unknown user, with a reason of
/// at most 500 bytes, at most 10 a minute); the admin API lists the report, and an operator
/// deletes the account with the admin token and nothing else: its session is kicked, it can
/// no longer log in, and messages to it are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reported_account_is_deleted_by_an_operator() -> anyhow::Result<()> {
    let cluster = TestCluster::start(1).await?;
    let config = cluster.client_config();
    let (alice, mut alice_events) = cluster.user("alice").await?;
    let (bob, _bob_events) = cluster.user("bob").await?;
    let alice_id = alice.info().user_id;
    let api = cim_client::RouterApi::new(&config)?;

    let reply = bob.report(alice_id, " sends spam ").await?;
    assert_eq!(
        (reply.name.as_str(), reply.already_reported),
        ("alice", false)
    );
    let code = |e: cim_client::ClientError| e.code().map(str::to_string);
    let refused = [
        (bob.info().user_id, "me".to_string(), "bad_request"),
        (alice_id, "x".repeat(501), "bad_request"),
        (987_654, String::new(), "unknown_user"),
    ];
    for (user, reason, want) in refused {
        let err = bob.report(user, &reason).await.unwrap_err();
        assert_eq!(code(err).as_deref(), Some(want), "{user}");
    }
    // Ten a minute (the unknown user's counted): paced under the per-second API limit, so
    // the refusal is the per-minute one.
    // Bob's repeats are answered, not kept: Alice's report is his alone once a day.
    for n in 0..8 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let reply = bob.report(alice_id, &format!("again {n}")).await?;
        assert!(reply.already_reported, "{n}");
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = bob.report(alice_id, "once more").await.unwrap_err();
    assert!(err.to_string().contains("too many reports"), "{err}");
    assert_eq!(code(err).as_deref(), Some("rate_limited"));
    let (status, body) = api
        .raw(
            Method::GET,
            "/admin/api/state?token=test-admin-token",
            Default::default(),
            None,
        )
        .await?;
    assert_eq!(status.as_u16(), 200);
    let state: serde_json::Value = serde_json::from_slice(&body)?;
    let reports = state["reports"].as_array().context("reports")?;
    assert_eq!(reports.len(), 1, "{reports:?}");
    let first = &reports[0];
    assert_eq!(
        (
            &first["reporter"],
            &first["reported"],
            &first["reported_id"]
        ),
        (&"bob".into(), &"alice".into(), &alice_id.into())
    );
    assert_eq!(first["reason"], "sends spam");

    let delete = |path: String, token: Option<String>| {
        let api = &api;
        async move {
            let (status, body) = api
                .raw(Method::POST, &path, Default::default(), token.as_deref())
                .await?;
            let json: serde_json::Value = serde_json::from_slice(&body)?;
            anyhow::Ok((status.as_u16(), json))
        }
    };
    // By the id the report names, with the admin token in the header alone.
    let path = format!("/admin/api/users/{alice_id}/delete");
    let admin = Some("test-admin-token".to_string());
    for (path, token) in [
        (path.clone(), None),
        (format!("{path}?token=nope"), None),
        // Not in the query string, which ends up in logs and histories.
        (format!("{path}?token=test-admin-token"), None),
        // A user's token is no admin token.
        (path.clone(), Some(bob.token())),
    ] {
        let (status, json) = delete(path.clone(), token).await?;
        assert_eq!(
            (status, &json["code"]),
            (401, &"unauthorized".into()),
            "{path}"
        );
    }
    let unknown = "/admin/api/users/987654/delete".to_string();
    let (status, json) = delete(unknown, admin.clone()).await?;
    assert_eq!((status, &json["code"]), (404, &"unknown_user".into()));

    let (status, json) = delete(path, admin).await?;
    assert_eq!(status, 200, "{json}");
    assert_eq!(
        (&json["id"], &json["name"]),
        (&alice_id.into(), &"alice".into())
    );
    loop {
        match next_event(&mut alice_events, WAIT).await? {
            Event::Kicked(reason) => {
                assert_eq!(reason, "account deleted");
                break;
            }
            Event::Presence { .. } => {}
            other => anyhow::bail!("unexpected {other:?}"),
        }
    }
    let err = Client::login(&config, "alice", "password", LoginOptions::default())
        .await
        .err()
        .context("a login of the deleted account")?;
    assert_eq!(err.code(), Some("invalid_credentials"), "{err}");
    let err = bob.send_private(alice_id, "hello?").await.unwrap_err();
    assert_eq!(err.code(), Some("unknown_user"), "{err}");

    // An offline user's latest login ends too: its token calls nothing more.
    let (carol, _carol_events) = cluster.user("carol").await?;
    let (carol_id, carol_token) = (carol.info().user_id, carol.token());
    carol.close().await;
    let admin = Some("test-admin-token".to_string());
    let (status, json) = delete(format!("/admin/api/users/{carol_id}/delete"), admin).await?;
    assert_eq!(status, 200, "{json}");
    let err = api.blocked_users(&carol_token).await.unwrap_err();
    assert!(
        matches!(err.code(), Some("unauthorized" | "session_ended")),
        "{err}"
    );
    let metrics = cim_integration_tests::router_metrics(&api).await?;
    assert_eq!(
        metric_value(&metrics, "cim_router_accounts_deleted_total")?,
        2.0
    );
    assert_eq!(
        metric_value(&metrics, "cim_router_reports_total")?,
        1.0,
        "repeats are not counted"
    );
    Ok(())
}

/// Sends `request` on a new connection to `addr` and reads until the server closes it: the
/// answer, or an error for a reset.
async fn exchange(addr: &str, request: &[u8]) -> std::io::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), tcp.read_to_end(&mut answer))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    Ok(String::from_utf8_lossy(&answer).into_owned())
}

async fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: ops\r\nConnection: close\r\n\r\n");
    Ok(exchange(addr, request.as_bytes()).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_servers_ops_endpoint_answers_and_closes_what_never_finishes_a_request()
-> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 0, "round-robin").await?;
    cluster
        .add_server_with("s1", &["--metrics", "127.0.0.1:0"])
        .await?;
    cluster.wait_servers(1).await?;
    let listening = cluster
        .server("s1")?
        .seen
        .last()
        .context("no start line")?
        .clone();
    let ops = listening
        .split(", ops on ")
        .nth(1)
        .with_context(|| format!("no ops address in {listening:?}"))?
        .trim()
        .to_string();

    assert!(get(&ops, "/health").await?.starts_with("HTTP/1.1 200"));
    eventually(WAIT, || async {
        get(&ops, "/ready")
            .await
            .ok()?
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await?;
    let metrics = get(&ops, "/metrics").await?;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    metric_value(&metrics, "cim_server_logins_total")?;
    assert_eq!(metric_value(&metrics, "cim_server_queued_bytes")?, 0.0);
    assert!(
        get(&ops, "/nothing-here")
            .await?
            .starts_with("HTTP/1.1 404")
    );

    // A head that never ends is closed after the head timeout (5 s), with or without a
    // `408`: what must not happen is that it holds its place for good.
    // `exchange` gives up after 20 s: a connection still open then was not closed.
    match exchange(&ops, b"GET /health HTTP/1.1\r\nHost: ops\r\n").await {
        Ok(answer) => assert!(
            !answer.contains(" 200 "),
            "an unfinished head was answered: {answer}"
        ),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "never closed"),
    }

    // A head past 16 KiB is refused (`431`, or a reset when the rest of it stays unread).
    let mut long = b"GET /health HTTP/1.1\r\nHost: ops\r\nX-Filler: ".to_vec();
    long.extend(std::iter::repeat_n(b'a', 32 * 1024));
    long.extend_from_slice(b"\r\n\r\n");
    match exchange(&ops, &long).await {
        Ok(answer) => assert!(answer.starts_with("HTTP/1.1 431"), "{answer}"),
        Err(e) => assert_ne!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
    }

    // Still serving after both.
    assert!(get(&ops, "/health").await?.starts_with("HTTP/1.1 200"));
    Ok(())
}
