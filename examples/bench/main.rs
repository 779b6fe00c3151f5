//! The side-by-side benchmark of issue #6: direct (one broker hop) vs mosquitto's built-in
//! bridge vs mqbridge, interleaved in one run, with its own load generator on raw sockets.
//!
//!     bash scripts/bench.sh [options]                       # builds, then runs this
//!     cargo run --release --example bench -- [options]      # needs target/release/mqbridge
//!
//! `--help` lists the options; `--quick` is the smoke test (`tests/bench_smoke.rs`).

mod harness;

fn main() -> std::process::ExitCode {
    harness::main_from_env()
}
