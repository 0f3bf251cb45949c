//! Records the git revision the harness is built from (`CIM_BUILD_REV`, "-dirty" when the
//! tree had changes), so a report names the build that ran, not whatever the directory it
//! runs in has checked out: `cim-ab` runs two builds from one directory.

use std::process::Command;

fn main() {
    let rev = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=7"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=CIM_BUILD_REV={rev}");
    // A new commit (the reflog), a checkout, or a change staged builds the harness again with
    // its name. An edit not staged yet is not seen: "-dirty" then lags until the next build
    // that runs this script.
    for path in ["../.git/HEAD", "../.git/logs/HEAD", "../.git/index"] {
        println!("cargo:rerun-if-changed={path}");
    }
}
