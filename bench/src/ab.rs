//! `cim-ab`: compares two builds of cim on this machine. Runs one `cim-bench` command with each
//! build's binaries in turn (the order swapped every pair, so a box that speeds up or slows
//! down over the runs favours neither), prints each run's figures as it ends and a Markdown
//! summary at the end (`cim_bench::compare`). Exits non-zero if a run fails, or, after the
//! summary, if any run had a fault (`cim_bench::compare::faults`).
//!
//! ```text
//! cim-ab --before /tmp/old --after target/release --pairs 6 private --rate 10000
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use cim_bench::compare::{FIGURES, as_pair, before_runs_first, faults, show, summarise, table};
use clap::Parser;
use serde_json::Value;

/// Compares two builds of cim with the same cim-bench command, run pair after pair.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Directory holding the first build's cim-bench and the cim-router it starts. (With
    /// `--router` among the cim-bench arguments both builds' harnesses drive the same existing
    /// cluster, which compares the harnesses only.)
    #[arg(long)]
    before: PathBuf,
    /// Directory holding the second build's binaries.
    #[arg(long)]
    after: PathBuf,
    /// Pairs of runs (an even number gives each build the first run equally often).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=100))]
    pairs: u64,
    /// The cim-bench scenario and options (`--json` is added if missing).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    bench: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut pairs = Vec::new();
    let mut faulty = 0;
    for pair in 1..=args.pairs {
        let before_first = before_runs_first(pair);
        let (before, after) = (("before", &args.before), ("after", &args.after));
        let order = if before_first {
            [before, after]
        } else {
            [after, before]
        };
        let mut run_one = |(label, dir): (&str, &PathBuf)| -> anyhow::Result<Value> {
            let report = run(dir, &args.bench)?;
            let found = faults(&report);
            if !found.is_empty() {
                eprintln!("pair {pair} {label}: {}", found.join(", "));
                faulty += 1;
            }
            println!("pair {pair} {label:<6} {}", line(&report));
            Ok(report)
        };
        let first = run_one(order[0])?;
        let second = run_one(order[1])?;
        pairs.push(as_pair(first, second, before_first));
    }
    println!();
    println!("cim-bench {}", args.bench.join(" "));
    println!();
    print!("{}", table(&summarise(&pairs)));
    if faulty > 0 {
        bail!("{faulty} runs failed (lost, duplicated or misdelivered deliveries, failed sends)");
    }
    Ok(())
}

/// Runs `dir/cim-bench ARGS --json` and returns its report. A run that printed its report
/// counts even if it exited non-zero: cim-bench does so for the faults the caller counts.
fn run(dir: &Path, bench: &[String]) -> anyhow::Result<Value> {
    let exe = dir.join("cim-bench");
    let mut command = Command::new(&exe);
    command.args(bench);
    if !bench.iter().any(|a| a == "--json") {
        command.arg("--json");
    }
    let output = command
        .output()
        .with_context(|| format!("running {}", exe.display()))?;
    match serde_json::from_slice(&output.stdout) {
        Ok(report) => Ok(report),
        Err(_) => bail!(
            "{} {} printed no report ({}): {}",
            exe.display(),
            bench.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ),
    }
}

/// One run's figures on one line.
fn line(report: &Value) -> String {
    FIGURES
        .iter()
        .filter_map(|f| Some(format!("{} {}", f.name, show((f.read)(report)?))))
        .collect::<Vec<_>>()
        .join(", ")
}
