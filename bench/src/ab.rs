//! `cim-ab`: compares two builds of cim on this machine. Runs one `cim-bench` command with each
//! build's binaries in turn (the order swapped every pair, so a box that speeds up or slows
//! down over the runs favours neither), prints each run's figures as it ends and a Markdown
//! summary at the end (`cim_bench::compare`). Exits non-zero if a run fails or loses or
//! duplicates a delivery.
//!
//! ```text
//! cim-ab --before /tmp/old --after target/release --pairs 5 private --rate 10000
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use cim_bench::compare::{FIGURES, faults, show, summarise, table};
use clap::Parser;
use serde_json::Value;

/// Compares two builds of cim with the same cim-bench command, run pair after pair.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory holding the first build's cim-bench and cim-router (and cim-server, for
    /// bench/cluster.sh-style targets).
    #[arg(long)]
    before: PathBuf,
    /// Directory holding the second build's binaries.
    #[arg(long)]
    after: PathBuf,
    /// Pairs of runs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=100))]
    pairs: u64,
    /// The cim-bench scenario and options (`--json` is added).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    bench: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut pairs = Vec::new();
    let mut faulty = 0;
    for pair in 1..=args.pairs {
        // Odd pairs run the before build first, even ones the after build.
        let before_first = pair % 2 == 1;
        let (first, second) = if before_first {
            (("before", &args.before), ("after", &args.after))
        } else {
            (("after", &args.after), ("before", &args.before))
        };
        let mut reports = Vec::new();
        for (label, dir) in [first, second] {
            let report = run(dir, &args.bench)?;
            faulty += faults(&report);
            println!("pair {pair} {label:<6} {}", line(&report));
            reports.push(report);
        }
        let second = reports.pop().context("two runs")?;
        let first = reports.pop().context("two runs")?;
        pairs.push(if before_first {
            (first, second)
        } else {
            (second, first)
        });
    }
    println!();
    println!("cim-bench {}", args.bench.join(" "));
    println!();
    print!("{}", table(&summarise(&pairs)));
    if faulty > 0 {
        bail!("{faulty} lost or duplicated deliveries");
    }
    Ok(())
}

/// Runs `dir/cim-bench ARGS --json` and returns its report.
fn run(dir: &Path, bench: &[String]) -> anyhow::Result<Value> {
    let exe = dir.join("cim-bench");
    let output = Command::new(&exe)
        .args(bench)
        .arg("--json")
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    if !output.status.success() {
        bail!(
            "{} {} failed ({}): {}",
            exe.display(),
            bench.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout)
        .with_context(|| format!("{} printed no JSON report", exe.display()))
}

/// One run's figures on one line.
fn line(report: &Value) -> String {
    FIGURES
        .iter()
        .filter_map(|f| Some(format!("{} {}", f.name, show((f.read)(report)?))))
        .collect::<Vec<_>>()
        .join(", ")
}
