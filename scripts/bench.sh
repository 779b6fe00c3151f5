#!/usr/bin/env bash
# The side-by-side benchmark of issue #6 (direct vs mosquitto's bridge vs mqbridge): builds mqbridge
# and the load generator (examples/bench) in release mode, then runs it with the given options.
# Without options: the full matrix behind docs/BENCHMARKS.md. Needs mosquitto (scripts/test.sh
# installs it); brokers are started on free loopback ports, never 1883.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet --bin mqbridge --example bench
# The example finds target/release/mqbridge next to its own directory.
exec target/release/examples/bench "$@"
