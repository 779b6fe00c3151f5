//! The benchmark of issue #6 still runs: `examples/bench` in `--quick` mode, one QoS 1 case
//! (direct, mosquitto's bridge, mqbridge pool 1 with and without a spool) against real mosquitto
//! brokers. Its Markdown tables must parse, and mqbridge must deliver every message.

// The benchmark's code, compiled into this test so that no separately built example is needed.
#[allow(dead_code)]
#[path = "../examples/bench/harness/mod.rs"]
mod harness;

use std::path::Path;

/// The Markdown tables' rows as cells, header first, without the alignment rows.
fn tables(markdown: &str) -> Vec<Vec<Vec<String>>> {
    markdown
        .split("\n\n")
        .map(table)
        .filter(|t| !t.is_empty())
        .collect()
}

fn table(markdown: &str) -> Vec<Vec<String>> {
    markdown
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("| ---"))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_owned())
                .collect()
        })
        .collect()
}

/// `bench --quick` with these options (split at spaces), this build's mqbridge and a JSON file
/// of its own.
fn quick(options: &str, json: &Path) -> harness::Report {
    let mut args = vec!["bench", "--quick"];
    args.extend(options.split_whitespace());
    let json_arg = json.to_str().expect("utf-8 path");
    args.extend_from_slice(&[
        "--mqbridge",
        env!("CARGO_BIN_EXE_mqbridge"),
        "--json",
        json_arg,
    ]);
    let report =
        harness::run_with_args(args).unwrap_or_else(|e| panic!("the benchmark failed: {e}"));
    println!("{}", report.markdown);
    report
}

#[test]
fn quick_benchmark_runs_and_mqbridge_loses_nothing() {
    let json = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-smoke.json");
    let report = quick("--qos 1 --payload 64 --pools 1 --idle-timeout 10s", &json);

    let tables = tables(&report.markdown);
    assert_eq!(
        tables.len(),
        2,
        "the main table and spool on / off: {tables:?}"
    );
    let rows = &tables[0];
    let header = &rows[0];
    let col = |name: &str| {
        header
            .iter()
            .position(|h| h.starts_with(name))
            .unwrap_or_else(|| panic!("no column {name:?} in {header:?}"))
    };
    let (path, rate, lost) = (col("path"), col("msg/s"), col("lost / dup"));
    assert_eq!(
        rows.len(),
        5,
        "header + direct, mosquitto, mqbridge, mqbridge spool: {rows:?}"
    );
    for row in &rows[1..] {
        assert_eq!(row.len(), header.len(), "ragged row {row:?}");
        let msgs: f64 = row[rate]
            .trim_end_matches(" †")
            .replace(',', "")
            .parse()
            .unwrap_or_else(|_| {
                panic!("msg/s {:?} is not a number", row[rate]);
            });
        assert!(msgs > 0.0, "{row:?}");
    }
    let mqbridge: Vec<_> = rows[1..]
        .iter()
        .filter(|r| r[path].starts_with("mqbridge"))
        .collect();
    assert_eq!(mqbridge.len(), 2, "{rows:?}");
    for row in mqbridge {
        let lost_count: u64 = row[lost]
            .split(" / ")
            .next()
            .and_then(|n| n.replace(',', "").parse().ok())
            .unwrap_or_else(|| panic!("lost / dup {:?} does not parse", row[lost]));
        assert_eq!(lost_count, 0, "mqbridge lost messages at QoS 1: {row:?}");
    }
    // Spool on against spool off: one row, a ratio and fsyncs that are numbers.
    let spool = &tables[1];
    assert_eq!(spool.len(), 2, "{spool:?}");
    let col = |name: &str| spool[0].iter().position(|h| h == name).expect(name);
    let ratio: f64 = spool[1][col("× spool off")].parse().expect("a ratio");
    let fsyncs: f64 = spool[1][col("fsyncs/s")]
        .parse()
        .expect("fsyncs per second");
    assert!(ratio > 0.0 && fsyncs >= 0.0, "{spool:?}");

    let written = std::fs::read_to_string(&json).expect("the JSON file");
    assert!(written.contains("\"path\": \"mqbridge\""), "{written}");
    assert!(report.runs.iter().all(|r| r.count == r.distinct + r.lost()));
    assert_eq!(report.summary.len(), 4);
}

/// `--congestion`: the run happens in a network namespace of its own with the algorithm asked
/// for, and the host's setting is the same afterwards. Needs root (as CI runs).
#[test]
fn congestion_runs_in_a_private_namespace_and_leaves_the_host_alone() {
    // SAFETY: geteuid only reads the process's credentials.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: --congestion needs root to create a network namespace");
        return;
    }
    let knob = harness::procs::CONGESTION_KNOB;
    let host = std::fs::read_to_string(knob).expect("the host's setting");
    let host = host.trim().to_owned();
    // The run moves this thread into the namespace; a thread started before stays outside and
    // reads the host's setting afterwards.
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let outside = std::thread::spawn(move || {
        wait.recv().expect("the test's signal");
        std::fs::read_to_string(knob).expect("the host's setting")
    });
    // Another algorithm than the host's, so that reading the host's would not pass.
    let other = if host == "reno" { "cubic" } else { "reno" };
    assert_eq!(
        std::fs::read_link("/proc/thread-self/ns/net").ok(),
        std::fs::read_link("/proc/self/ns/net").ok(),
        "this test starts in the process's network namespace"
    );
    let json = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-congestion.json");
    let report = quick(
        &format!("--qos 0 --payload 64 --pools 1 --paths mqbridge --congestion {other}"),
        &json,
    );
    assert!(
        report
            .markdown
            .contains(&format!("TCP congestion control {other};")),
        "the machine line names the namespace's algorithm: {}",
        report.markdown
    );
    assert!(report.runs.iter().all(|r| r.count > 0 && r.lost() == 0));
    let written = std::fs::read_to_string(&json).expect("the JSON file");
    assert!(
        written.contains(&format!("\"tcp_congestion_control\": \"{other}\"")),
        "{written}"
    );
    assert_ne!(
        std::fs::read_link("/proc/thread-self/ns/net").ok(),
        std::fs::read_link("/proc/self/ns/net").ok(),
        "the run happened in a namespace of its own"
    );
    go.send(()).expect("the outside thread waits");
    let after = outside.join().expect("the outside thread");
    assert_eq!(after.trim(), host, "the host's setting was changed");
}
