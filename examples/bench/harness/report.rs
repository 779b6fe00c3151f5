//! Medians over repetitions, the Markdown table and the JSON file.

use std::{fmt::Write as _, path::Path as FsPath};

use super::{Opts, Path, Run, first_line};

/// Where the numbers were taken.
#[derive(Clone, Debug)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub kernel: String,
    /// `net.ipv4.tcp_congestion_control`: every socket of the run uses it (bbr paces loopback
    /// flows, which moved these results by tens of percent: docs/BENCHMARKS.md).
    pub congestion: String,
    pub mosquitto: String,
    pub mqbridge: String,
    /// `git describe --always --dirty` of the working tree the run started in.
    pub source: String,
    pub load_before: String,
    pub load_after: String,
}

impl Machine {
    pub fn describe(mosquitto: &FsPath, mqbridge: &FsPath) -> Machine {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
            })
            .unwrap_or_else(|| "unknown".into());
        Machine {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            cpu,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_owned())
                .unwrap_or_default(),
            congestion: std::fs::read_to_string(super::procs::CONGESTION_KNOB)
                .map(|s| s.trim().to_owned())
                .unwrap_or_else(|_| "unknown".into()),
            mosquitto: first_line(mosquitto, &["-h"]),
            mqbridge: first_line(mqbridge, &["--version"]),
            source: first_line(FsPath::new("git"), &["describe", "--always", "--dirty"]),
            load_before: loadavg(),
            load_after: String::new(),
        }
    }

    pub fn finish(mut self) -> Machine {
        self.load_after = loadavg();
        self
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// One row of the table: a case's medians over its repetitions.
#[derive(Clone, Debug)]
pub struct Summary {
    pub qos: u8,
    pub payload: usize,
    pub path: Path,
    pub window: u64,
    pub reps: usize,
    pub messages: u64,
    pub rate: f64,
    pub vs_direct: Option<f64>,
    pub vs_mosquitto: Option<f64>,
    /// CPU seconds per 100k delivered messages.
    pub cpu_broker_a: f64,
    pub cpu_broker_b: Option<f64>,
    pub cpu_mqbridge: Option<f64>,
    pub cpu_generator: f64,
    pub mqbridge_peak_rss_kib: Option<u64>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub lost: u64,
    pub duplicates: u64,
    /// Spool rows: this rate over the same pool's without a spool, and fsyncs per second.
    pub vs_spool_off: Option<f64>,
    pub fsyncs_per_s: Option<f64>,
}

pub struct Report {
    #[allow(dead_code)] // for tests/bench_smoke.rs
    pub summary: Vec<Summary>,
    #[allow(dead_code)] // for tests/bench_smoke.rs
    pub runs: Vec<Run>,
    pub markdown: String,
    pub json: String,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn per_100k(cpu: f64, delivered: u64) -> f64 {
    if delivered == 0 {
        f64::NAN
    } else {
        cpu / delivered as f64 * 100_000.0
    }
}

fn summarize(runs: &[Run]) -> Vec<Summary> {
    let mut cases: Vec<(u8, usize, Path)> = Vec::new();
    for r in runs {
        if !cases.contains(&(r.qos, r.payload, r.path)) {
            cases.push((r.qos, r.payload, r.path));
        }
    }
    let mut rows: Vec<Summary> = cases
        .iter()
        .map(|&(qos, payload, path)| {
            let of: Vec<&Run> = runs
                .iter()
                .filter(|r| (r.qos, r.payload, r.path) == (qos, payload, path))
                .collect();
            let med = |f: &dyn Fn(&Run) -> f64| median(of.iter().map(|r| f(r)).collect());
            let opt = |f: &dyn Fn(&Run) -> Option<f64>| -> Option<f64> {
                let v: Vec<f64> = of.iter().filter_map(|r| f(r)).collect();
                (!v.is_empty()).then(|| median(v))
            };
            Summary {
                qos,
                payload,
                path,
                window: of[0].window,
                reps: of.len(),
                messages: of.iter().map(|r| r.count).sum(),
                rate: med(&|r| r.rate),
                vs_direct: None,
                vs_mosquitto: None,
                cpu_broker_a: med(&|r| per_100k(r.cpu_broker_a, r.distinct)),
                cpu_broker_b: opt(&|r| r.cpu_broker_b.map(|c| per_100k(c, r.distinct))),
                cpu_mqbridge: opt(&|r| r.cpu_mqbridge.map(|c| per_100k(c, r.distinct))),
                cpu_generator: med(&|r| per_100k(r.cpu_generator, r.distinct)),
                mqbridge_peak_rss_kib: of.iter().filter_map(|r| r.mqbridge_peak_rss_kib).max(),
                p50_ms: med(&|r| r.p50_us as f64 / 1000.0),
                p99_ms: med(&|r| r.p99_us as f64 / 1000.0),
                lost: of.iter().map(|r| r.lost()).sum(),
                duplicates: of.iter().map(|r| r.duplicates).sum(),
                vs_spool_off: None,
                fsyncs_per_s: opt(&|r| r.spool_fsyncs.map(|n| n as f64 / r.secs)),
            }
        })
        .collect();
    // A case that lost messages is no reference: its rate is over what got through.
    let reference = |rows: &[Summary], qos, payload, path| {
        rows.iter()
            .find(|s| (s.qos, s.payload, s.path) == (qos, payload, path) && s.lost == 0)
            .map(|s| s.rate)
    };
    for i in 0..rows.len() {
        let (qos, payload) = (rows[i].qos, rows[i].payload);
        let direct = reference(&rows, qos, payload, Path::Direct);
        let mosquitto = reference(&rows, qos, payload, Path::Mosquitto);
        let lossless = rows[i].lost == 0;
        rows[i].vs_direct = direct.filter(|_| lossless).map(|d| rows[i].rate / d);
        rows[i].vs_mosquitto = mosquitto.filter(|_| lossless).map(|m| rows[i].rate / m);
        if let Path::MqbridgeSpool(pool) = rows[i].path {
            let off = reference(&rows, qos, payload, Path::Mqbridge(pool));
            rows[i].vs_spool_off = off.filter(|_| lossless).map(|o| rows[i].rate / o);
        }
    }
    rows
}

fn thousands(x: f64) -> String {
    if !x.is_finite() {
        return "–".into();
    }
    let digits = format!("{:.0}", x);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn size(bytes: usize) -> String {
    if bytes >= 1024 && bytes.is_multiple_of(1024) {
        format!("{} KiB", bytes / 1024)
    } else {
        format!("{bytes} B")
    }
}

fn opt(x: Option<f64>, digits: usize) -> String {
    match x {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "–".into(),
    }
}

/// The command that reproduces a run with `args` (for docs/BENCHMARKS.md).
fn command_line(args: &str) -> String {
    if args.is_empty() {
        "bash scripts/bench.sh".into()
    } else {
        format!("bash scripts/bench.sh {args}")
    }
}

impl Report {
    pub fn new(opts: &Opts, args: &str, reps: usize, machine: Machine, runs: Vec<Run>) -> Report {
        let command = command_line(args);
        let summary = summarize(&runs);
        let markdown = markdown(opts, &command, reps, &machine, &summary, &runs);
        let json = json(opts, &command, reps, &machine, &summary, &runs);
        Report {
            summary,
            runs,
            markdown,
            json,
        }
    }
}

/// Is the generator the bottleneck? In the direct runs, how busy broker A (single-threaded
/// mosquitto) and the generator were, as fractions of one core.
fn generator_check(runs: &[Run]) -> Option<String> {
    let direct: Vec<&Run> = runs
        .iter()
        .filter(|r| r.path == Path::Direct && r.secs.is_finite() && r.secs > 0.0)
        .collect();
    if direct.is_empty() {
        return None;
    }
    let range = |f: &dyn Fn(&Run) -> f64| {
        let v: Vec<f64> = direct.iter().map(|r| f(r) * 100.0).collect();
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{lo:.0}–{hi:.0} %")
    };
    let generator = range(&|r| r.cpu_generator / r.secs);
    let broker = range(&|r| r.cpu_broker_a / r.secs);
    Some(format!(
        "Generator check: in the direct runs broker A (mosquitto, one thread) was busy {broker} \
         of a core and the generator (publisher and subscriber threads together) {generator}, \
         so the direct rate is mosquitto's limit, not the generator's."
    ))
}

fn markdown(
    opts: &Opts,
    command: &str,
    reps: usize,
    m: &Machine,
    rows: &[Summary],
    runs: &[Run],
) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Machine: {} cores ({}), Linux {}, loopback, TCP congestion control {}; {}; {} (source \
         {}). Load average (1/5/15 min) {} before, {} after.",
        m.cores,
        m.cpu,
        m.kernel,
        m.congestion,
        m.mosquitto,
        m.mqbridge,
        m.source,
        m.load_before,
        m.load_after
    );
    let _ = writeln!(
        out,
        "MQTT 3.1.1 everywhere; windows {} (QoS 0/1) and {} (QoS 2); medians of {reps} \
         interleaved repetition(s){}.",
        opts.window,
        opts.window_qos2,
        if opts.quick { ", --quick" } else { "" }
    );
    if let Some(cc) = &opts.congestion {
        let _ = writeln!(
            out,
            "--congestion {cc}: brokers, generator and mqbridge ran in a network namespace of \
             their own, its loopback with TCP congestion control {cc}; the host's setting was \
             left alone."
        );
    }
    if opts.bridge_core {
        let _ = writeln!(
            out,
            "--bridge-core: mqbridge ran on the last CPU alone; brokers, generator (and \
             mosquitto's bridge, inside broker A) on the others."
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| QoS | payload | path | msg/s | × direct | × mosquitto bridge | CPU broker A | \
         CPU broker B | CPU mqbridge | CPU generator | mqbridge peak RSS | latency p50 / p99 \
         (ms) | lost / dup of messages |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    for r in rows {
        // Per 100k delivered means nothing when most were not delivered.
        let cpu = |x: Option<f64>| match x {
            Some(_) if r.lost > 0 => "n/a".to_string(),
            x => opt(x, 3),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} | {:.1} / {:.1} | {} / {} of {} |",
            r.qos,
            size(r.payload),
            r.path.label(),
            thousands(r.rate),
            if r.lost > 0 { " †" } else { "" },
            opt(r.vs_direct, 2),
            opt(r.vs_mosquitto, 2),
            cpu(Some(r.cpu_broker_a)),
            cpu(r.cpu_broker_b),
            cpu(r.cpu_mqbridge),
            cpu(Some(r.cpu_generator)),
            r.mqbridge_peak_rss_kib
                .map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            r.p50_ms,
            r.p99_ms,
            r.lost,
            r.duplicates,
            thousands(r.messages as f64),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "CPU columns: CPU seconds per 100,000 delivered messages (utime + stime from \
         /proc/<pid>/stat); mosquitto's bridge runs inside broker A. Lost / dup: totals over all \
         repetitions; lost = not delivered when the subscriber gave up ({:?} without a new \
         message). † Messages were lost: the rate is over the delivered ones only, and neither it nor the CPU per message compare (n/a). \
         Command: `{}`",
        opts.idle_timeout, command
    );
    spool_table(&mut out, rows);
    link_table(&mut out, opts, rows);
    if let Some(check) = generator_check(runs) {
        let _ = writeln!(out);
        let _ = writeln!(out, "{check}");
    }
    out
}

/// `--delay`: each mqbridge row against its ceiling, pairs × window / round trip (a QoS 1/2 pair
/// carries at most its window per round trip).
fn link_table(out: &mut String, opts: &Opts, rows: &[Summary]) {
    let Some(&one_way) = opts.delay.first() else {
        return;
    };
    let rtt = one_way.as_secs_f64() * 2.0;
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "Long link: broker B behind a proxy delaying every byte {one_way:?} each way (round trip \
         {:.0} ms), for mosquitto's bridge and mqbridge alike; mqbridge's target speaks MQTT {}{}.",
        rtt * 1000.0,
        opts.target_protocol,
        if opts.default_windows {
            "; brokers and mqbridge at their default windows"
        } else {
            ""
        }
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| QoS | path | window per pair | ceiling msg/s | msg/s | share of ceiling | lost |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for r in rows.iter().filter(|r| r.qos > 0) {
        let pairs = match r.path {
            Path::Mqbridge(p) | Path::MqbridgeSpool(p) | Path::MqbridgeAuto(p) => p,
            Path::Mosquitto => {
                let _ = writeln!(
                    out,
                    "| {} | {} | no window kept (mosquitto 2.0.11 does not enforce \
                     max_inflight_messages on outgoing QoS 1 once a queue forms) | – | {} | – | {} |",
                    r.qos,
                    r.path.label(),
                    thousands(r.rate),
                    r.lost
                );
                continue;
            }
            Path::Direct => continue,
        };
        // The window a pair is given towards broker B: --window, or the defaults (mosquitto's
        // Receive Maximum 20 as a v5 target; mqbridge's own for QoS 1 and 20 for QoS 2 to 3.x).
        let window = match (opts.default_windows, opts.target_protocol.as_str(), r.qos) {
            (false, _, _) => r.window as f64,
            (true, "5", _) | (true, _, 2) => 20.0,
            (true, _, _) => f64::from(mqbridge::config::schema::default_max_inflight(
                mqbridge::config::Protocol::V311,
            )),
        };
        let ceiling = f64::from(pairs) * window / rtt;
        let _ = writeln!(
            out,
            "| {} | {} | {window:.0} | {} | {} | {:.0} % | {} |",
            r.qos,
            r.path.label(),
            thousands(ceiling),
            thousands(r.rate),
            r.rate / ceiling * 100.0,
            r.lost
        );
    }
}

/// Spool on against spool off, per pool (SPEC 4.9: a healthy target, what durability costs).
fn spool_table(out: &mut String, rows: &[Summary]) {
    let spooled: Vec<(&Summary, &Summary)> = rows
        .iter()
        .filter_map(|on| {
            let Path::MqbridgeSpool(pool) = on.path else {
                return None;
            };
            let off = rows.iter().find(|r| {
                (r.qos, r.payload, r.path) == (on.qos, on.payload, Path::Mqbridge(pool))
            })?;
            Some((on, off))
        })
        .collect();
    if spooled.is_empty() {
        return;
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "| QoS | payload | pool | spool off msg/s | spool on msg/s | × spool off | fsyncs/s | \
         CPU mqbridge off / on | mqbridge peak RSS off / on |"
    );
    let _ = writeln!(
        out,
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let rss = |r: &Summary| {
        r.mqbridge_peak_rss_kib
            .map_or("–".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
    };
    for (on, off) in spooled {
        let pool = match on.path {
            Path::MqbridgeSpool(p) => p,
            _ => unreachable!("filtered"),
        };
        let _ = writeln!(
            out,
            "| {} | {} | {pool} | {} | {} | {} | {} | {} / {} | {} / {} |",
            on.qos,
            size(on.payload),
            thousands(off.rate),
            thousands(on.rate),
            opt(on.vs_spool_off, 2),
            opt(on.fsyncs_per_s.map(f64::round), 0),
            opt(off.cpu_mqbridge, 3),
            opt(on.cpu_mqbridge, 3),
            rss(off),
            rss(on),
        );
    }
}

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "null".into()
    }
}

fn onum(x: Option<f64>) -> String {
    x.map_or("null".into(), num)
}

/// `{"key": value, …}` from already encoded values.
fn obj(fields: &[(&str, String)]) -> String {
    let inner: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}: {v}", esc(k)))
        .collect();
    format!("{{{}}}", inner.join(", "))
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        return "[]".into();
    }
    format!("[\n    {}\n  ]", items.join(",\n    "))
}

fn json(
    opts: &Opts,
    command: &str,
    reps: usize,
    m: &Machine,
    rows: &[Summary],
    runs: &[Run],
) -> String {
    let machine = obj(&[
        ("cores", m.cores.to_string()),
        ("cpu", esc(&m.cpu)),
        ("kernel", esc(&m.kernel)),
        ("tcp_congestion_control", esc(&m.congestion)),
        ("mosquitto", esc(&m.mosquitto)),
        ("mqbridge", esc(&m.mqbridge)),
        ("source", esc(&m.source)),
        ("load_before", esc(&m.load_before)),
        ("load_after", esc(&m.load_after)),
    ]);
    let options = obj(&[
        ("command", esc(command)),
        ("quick", opts.quick.to_string()),
        ("reps", reps.to_string()),
        ("window", opts.window.to_string()),
        ("window_qos2", opts.window_qos2.to_string()),
        ("nap_us", opts.nap.as_micros().to_string()),
        ("bridge_core", opts.bridge_core.to_string()),
        (
            "private_network",
            opts.congestion.as_deref().map_or("null".into(), esc),
        ),
    ]);
    let rss = |k: Option<u64>| k.map_or("null".into(), |k| k.to_string());
    let summary: Vec<String> = rows
        .iter()
        .map(|r| {
            obj(&[
                ("qos", r.qos.to_string()),
                ("payload", r.payload.to_string()),
                ("path", esc(&path_kind(r.path))),
                ("pool", pool(r.path)),
                ("window", r.window.to_string()),
                ("reps", r.reps.to_string()),
                ("messages", r.messages.to_string()),
                ("msgs_per_sec", num(r.rate)),
                ("vs_direct", onum(r.vs_direct)),
                ("vs_mosquitto", onum(r.vs_mosquitto)),
                ("vs_spool_off", onum(r.vs_spool_off)),
                ("fsyncs_per_s", onum(r.fsyncs_per_s)),
                (
                    "cpu_s_per_100k",
                    obj(&[
                        ("broker_a", num(r.cpu_broker_a)),
                        ("broker_b", onum(r.cpu_broker_b)),
                        ("mqbridge", onum(r.cpu_mqbridge)),
                        ("generator", num(r.cpu_generator)),
                    ]),
                ),
                ("mqbridge_peak_rss_kib", rss(r.mqbridge_peak_rss_kib)),
                ("p50_ms", num(r.p50_ms)),
                ("p99_ms", num(r.p99_ms)),
                ("lost", r.lost.to_string()),
                ("duplicates", r.duplicates.to_string()),
            ])
        })
        .collect();
    let runs: Vec<String> = runs
        .iter()
        .map(|r| {
            obj(&[
                ("qos", r.qos.to_string()),
                ("payload", r.payload.to_string()),
                ("path", esc(&path_kind(r.path))),
                ("pool", pool(r.path)),
                ("rep", (r.rep + 1).to_string()),
                ("count", r.count.to_string()),
                ("delivered", r.distinct.to_string()),
                ("lost", r.lost().to_string()),
                ("duplicates", r.duplicates.to_string()),
                ("secs", num(r.secs)),
                ("publish_secs", onum(r.publish_secs)),
                ("msgs_per_sec", num(r.rate)),
                (
                    "cpu_s",
                    obj(&[
                        ("broker_a", num(r.cpu_broker_a)),
                        ("broker_b", onum(r.cpu_broker_b)),
                        ("mqbridge", onum(r.cpu_mqbridge)),
                        ("generator", num(r.cpu_generator)),
                    ]),
                ),
                ("mqbridge_peak_rss_kib", rss(r.mqbridge_peak_rss_kib)),
                ("p50_us", r.p50_us.to_string()),
                ("p99_us", r.p99_us.to_string()),
                ("load1", num(r.load1)),
                (
                    "spool_fsyncs",
                    r.spool_fsyncs.map_or("null".into(), |n| n.to_string()),
                ),
            ])
        })
        .collect();
    format!(
        "{{\n  \"machine\": {machine},\n  \"options\": {options},\n  \"summary\": {},\n  \
         \"runs\": {}\n}}\n",
        list(&summary),
        list(&runs)
    )
}

fn path_kind(p: Path) -> String {
    match p {
        Path::Direct => "direct".into(),
        Path::Mosquitto => "mosquitto".into(),
        Path::Mqbridge(_) => "mqbridge".into(),
        Path::MqbridgeSpool(_) => "mqbridge-spool".into(),
        Path::MqbridgeAuto(_) => "mqbridge-auto".into(),
    }
}

fn pool(p: Path) -> String {
    match p {
        Path::Mqbridge(n) | Path::MqbridgeSpool(n) | Path::MqbridgeAuto(n) => n.to_string(),
        _ => "null".into(),
    }
}
