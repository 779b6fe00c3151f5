//! The side-by-side benchmark of issue #6: direct (one broker hop) vs mosquitto's built-in
//! bridge vs mqbridge, interleaved in one run, with its own load generator on raw sockets.
//!
//!     bash scripts/bench.sh [options]                       # builds, then runs this
//!     cargo run --release --example bench -- [options]      # needs target/release/mqbridge
//!
//! `--help` lists the options; `--quick` is the smoke test (`tests/bench_smoke.rs`).

mod harness;

fn main() -> std::process::ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // The benchmark runs itself again as a shaped broker B (`--shaped-target`).
    if let [_, flag, profile, port, stats] = args.as_slice()
        && flag == "--serve-shaped"
    {
        let port = port.parse().unwrap_or(0);
        if let Err(e) = harness::procs::serve_shaped(profile, port, stats.as_ref()) {
            eprintln!("bench: shaped broker: {e}");
        }
        return std::process::ExitCode::FAILURE;
    }
    harness::main_from_env()
}
