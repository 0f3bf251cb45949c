//! The harness's own correctness: a short `cim-bench` run against its embedded cluster must
//! count every delivery, lose none, duplicate none, and report sane latencies; a failover run
//! against a process cluster must kill the server it names and follow its clients back; the
//! quinn floor's runs must count and report the same way.

#![allow(clippy::unwrap_used)]

use cim_integration_tests::bin_path;
use cim_integration_tests::cluster::ProcCluster;

async fn bench(args: &[&str]) -> anyhow::Result<serde_json::Value> {
    let out = tokio::process::Command::new(bin_path("cim-bench")?)
        .args(args)
        .arg("--json")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "cim-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_str(stdout.trim())?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_run_counts_every_delivery_once() -> anyhow::Result<()> {
    let r = private_run("private", &[]).await?;
    assert!(r["git_rev"].is_string() && r["command"].as_str().unwrap().contains("private"));
    Ok(())
}

/// A one-second `scenario` run (`private` or `floor-private`, with `extra` arguments) of six
/// clients: more than ten messages, each delivered exactly once, sane latencies, datagrams and
/// CPU.
async fn private_run(scenario: &str, extra: &[&str]) -> anyhow::Result<serde_json::Value> {
    let mut args = vec![
        scenario,
        "--clients",
        "6",
        "--duration",
        "1",
        "--concurrency",
        "6",
    ];
    args.extend(extra);
    let r = bench(&args).await?;
    assert_eq!(r["scenario"], scenario);
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 10, "{r}");
    assert_eq!(r["delivered"].as_u64(), Some(sent), "{r}");
    assert_eq!(
        (
            r["lost"].as_u64(),
            r["duplicated"].as_u64(),
            r["misdelivered"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    let lat = &r["latency_us"];
    assert!(
        lat["p50"].as_u64().unwrap() > 0 && lat["p50"].as_u64() <= lat["p99"].as_u64(),
        "{r}"
    );
    // Each client has one send in flight, so every message's send is a datagram of its own.
    let datagrams = r["client_datagrams_per_msg"].as_f64().unwrap();
    assert!((1.0..100.0).contains(&datagrams), "{r}");
    // Both the process under test (the embedded cluster, or the floor server) and the harness
    // did work for every message.
    for side in ["cluster_cpu_us_per_msg", "harness_cpu_us_per_msg"] {
        let micros = r[side].as_f64().unwrap();
        assert!(micros > 0.0 && micros.is_finite(), "{side}: {r}");
    }
    Ok(r)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_run_expects_one_delivery_per_other_member() -> anyhow::Result<()> {
    let r = bench(&[
        "group",
        "--members",
        "5",
        "--senders",
        "2",
        "--window",
        "3",
        "--duration",
        "1",
        "--concurrency",
        "5",
    ])
    .await?;
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 0, "{r}");
    assert_eq!(r["window"].as_u64(), Some(3), "{r}");
    // Three sends in flight per sender: their messages must still be told apart.
    assert_eq!(r["delivered"].as_u64(), Some(sent * 4), "{r}");
    assert_eq!(
        (
            r["lost"].as_u64(),
            r["duplicated"].as_u64(),
            r["misdelivered"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{r}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_loop_run_counts_every_delivery_once_and_writes_its_timeline() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let timeline = dir.path().join("timeline.csv");
    let path = timeline.to_str().unwrap();
    let r = private_run("private", &["--rate", "300", "--timeline", path]).await?;
    let sent = r["sent"].as_u64().unwrap();
    assert!(sent > 100, "{r}");
    // One row per 100 ms of sending, in order, accounting for every delivery.
    let csv = std::fs::read_to_string(&timeline)?;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("sent_s,deliveries,p50_us,p99_us,max_us"));
    let rows: Vec<Vec<f64>> = lines
        .map(|l| l.split(',').map(|f| f.parse().unwrap()).collect())
        .collect();
    assert!(rows.len() >= 5, "{csv}");
    assert!(rows.windows(2).all(|w| w[0][0] < w[1][0]), "{csv}");
    assert!(rows.iter().all(|r| r[2] <= r[3] && r[3] <= r[4]), "{csv}");
    let counted: f64 = rows.iter().map(|r| r[1]).sum();
    assert_eq!(counted as u64, sent, "{csv}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_and_login_runs_report_their_numbers() -> anyhow::Result<()> {
    let r = bench(&[
        "lossy",
        "--loss",
        "10",
        "--clients",
        "4",
        "--duration",
        "1",
        "--concurrency",
        "4",
    ])
    .await?;
    assert_eq!(r["loss_pct"].as_f64(), Some(10.0));
    assert!(r["sent"].as_u64().is_some_and(|sent| sent > 0), "{r}");
    assert_eq!(r["lost"].as_u64(), Some(0), "{r}");
    assert_eq!(r["delivered"].as_u64(), r["sent"].as_u64(), "{r}");
    let r = bench(&["login", "--clients", "8", "--concurrency", "4"]).await?;
    assert!(r["logins_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    // Each login is timed: a handshake and two round trips take more than nothing.
    let took = &r["login_latency_us"];
    assert!(
        took["p50"].as_u64().unwrap() > 0 && took["p50"].as_u64() <= took["max"].as_u64(),
        "{r}"
    );
    let r = bench(&["idle", "--connections", "20", "--concurrency", "10"]).await?;
    assert!(r["server_rss_bytes_per_conn"].is_u64(), "{r}");
    assert!(r["server_rss_bytes_per_account"].is_u64(), "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floor_runs_count_every_delivery_once_and_report_their_numbers() -> anyhow::Result<()> {
    let r = private_run("floor-private", &[]).await?;
    assert_eq!(r["clients"].as_u64(), Some(6), "{r}");
    let r = bench(&["floor-login", "--clients", "8", "--concurrency", "4"]).await?;
    assert_eq!(r["clients"].as_u64(), Some(8), "{r}");
    assert!(r["logins_per_sec"].as_f64().unwrap() > 0.0, "{r}");
    // Read from /proc in 10 ms ticks: eight logins may not reach one.
    let server_cpu = r["cluster_cpu_us_per_login"].as_f64().unwrap();
    assert!(server_cpu >= 0.0 && server_cpu.is_finite(), "{r}");
    let r = bench(&["floor-idle", "--connections", "20", "--concurrency", "10"]).await?;
    assert_eq!(r["clients"].as_u64(), Some(20), "{r}");
    assert!(r["server_rss_bytes_per_conn"].is_u64(), "{r}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_run_follows_the_killed_servers_clients_back() -> anyhow::Result<()> {
    let mut cluster = ProcCluster::start(1, 2, "round-robin").await?;
    let pid = cluster.server("s1")?.child.id().unwrap();
    let ca = cluster.certs.path().join(cim_certs::CA_CERT);
    let kill = format!("s1={pid}");
    let r = bench(&[
        "failover",
        "--router",
        &cluster.routers[0].0,
        "--ca",
        ca.to_str().unwrap(),
        "--clients",
        "6",
        "--concurrency",
        "6",
        "--kill",
        &kill,
    ])
    .await?;
    let f = &r["failover"];
    // Round robin put three of the six on s1; all came back, with their tokens.
    assert_eq!(f["victims"].as_u64(), Some(3), "{r}");
    assert_eq!(f["recovered"].as_u64(), Some(3), "{r}");
    assert_eq!(
        (
            f["token_relogins"].as_u64(),
            f["password_relogins"].as_u64()
        ),
        (Some(3), Some(0)),
        "{r}"
    );
    // Noticing takes the heartbeat timeout; coming back at least the resume attempt.
    let (noticed, back) = (&f["detect_us"], &f["recover_us"]);
    assert!(noticed["p50"].as_u64().unwrap() > 0, "{r}");
    assert!(back["p50"].as_u64().unwrap() > 0, "{r}");
    assert!(f["last_back_s"].as_f64().unwrap() > 0.0, "{r}");
    // The process is gone.
    assert!(cluster.server("s1")?.child.try_wait()?.is_some());
    Ok(())
}
