//! `mqbridge demo`: with nothing installed, two embedded brokers and a bridge between them;
//! sample telemetry crosses from the edge to the cloud, rewritten, and none is lost.

mod support;

use support::{largest_after, mqbridge_cli};

#[test]
fn demo_runs_for_its_duration_and_loses_nothing() {
    let out = mqbridge_cli(&["demo", "--duration", "3s"], &[]);
    assert_eq!(
        out.code(),
        Some(0),
        "stdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    let stdout = &out.stdout;
    assert!(
        stdout
            .contains("edge factory/line1/telemetry/temp -> cloud sites/demo/line1/telemetry/temp"),
        "messages shown crossing with their rewritten topic:\n{stdout}"
    );
    assert!(stdout.contains("forwarded"), "a rate line:\n{stdout}");
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    assert!(summary.contains("lost=0"), "{summary}");
    assert!(summary.contains("duplicates=0"), "{summary}");
    let field = |name: &str| -> u64 {
        summary
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name}= in {summary}"))
    };
    assert!(field("sent") >= 40, "about 20/s for 3s: {summary}");
    assert_eq!(field("sent"), field("received"), "{summary}");
}

/// The demo's brokers are shaped as BifroMQ: during the surge (600/s from 5 s, three times one
/// pair's 200 PUBLISH/s at the cloud) the auto pool grows, nothing goes over the cloud's quota,
/// and nothing is lost.
#[test]
fn demo_surge_grows_the_pool_within_bifromqs_quotas() {
    let out = mqbridge_cli(&["demo", "--duration", "9s"], &[]);
    let stdout = &out.stdout;
    assert_eq!(out.code(), Some(0), "{stdout}\n{}", out.stderr);
    assert!(
        stdout.contains("both shaped as BifroMQ by default: 200 PUBLISH/s in, 512 KiB/s each way, Receive Maximum 200"),
        "{stdout}"
    );
    let most_pairs = largest_after(stdout, "  pairs ").unwrap_or(0);
    assert!(
        most_pairs >= 2,
        "the pool grew during the surge: {most_pairs}\n{stdout}"
    );
    let summary = stdout.lines().find(|l| l.starts_with("summary:")).unwrap();
    assert!(summary.contains("lost=0"), "{summary}");
    assert!(summary.contains("over_quota=0"), "{summary}");
}
