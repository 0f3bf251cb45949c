#!/usr/bin/env bash
# Runs cim's whole test suite: builds the binaries the process-level tests spawn, then runs
# every unit, property and integration test.
set -euo pipefail
cd "$(dirname "$0")"

cargo build --workspace --bins
cargo test --workspace "$@"
