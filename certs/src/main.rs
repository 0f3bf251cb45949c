//! `cim-certs`: writes a dev CA, router and server certificates and a token secret.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Create cim's development certificates. Existing files are never overwritten.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Directory to write into (created if missing).
    #[arg(long, short, env = "CIM_CERTS_DIR", default_value = "certs-dev")]
    out: PathBuf,
    /// Extra DNS names or IP addresses the router and server certificates cover
    /// (localhost, 127.0.0.1 and ::1 are always included).
    #[arg(long = "host")]
    hosts: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let paths = cim_certs::generate(&args.out, &args.hosts)
        .with_context(|| format!("creating certificates in {}", args.out.display()))?;
    println!(
        "wrote CA, server, router certificates and token secret to {}",
        paths.dir.display()
    );
    println!("clients trust: {}", paths.ca_cert().display());
    Ok(())
}
