//! The side-by-side benchmark (issue #6): one broker hop ("direct"), mosquitto's built-in bridge,
//! and mqbridge, measured interleaved in one run on fresh brokers, for each QoS and payload size.
//! `examples/bench/main.rs` is the command line; `tests/bench_smoke.rs` runs `--quick` in-process.

mod delay;
mod load;
pub mod procs;
mod report;
mod wire;

use std::{
    io,
    path::{Path as FsPath, PathBuf},
    process::{Command, ExitCode},
    time::Duration,
};

use clap::Parser;

pub use report::Report;

use load::{LoadSpec, Shared};
use procs::{BridgeSection, Broker, BrokerSettings, Mqbridge, MqbridgeSettings};

/// mosquitto's default `max_inflight_messages`.
const MOSQUITTO_DEFAULT_INFLIGHT: u64 = 20;

/// Side-by-side benchmark: direct (one broker hop) vs mosquitto's built-in bridge vs mqbridge.
///
/// Starts its own mosquitto brokers on free loopback ports for every measurement, runs the
/// cases interleaved (direct, mosquitto bridge, mqbridge pools, then again…) and prints a
/// Markdown table of medians; the raw runs go to the JSON file.
#[derive(Parser, Debug, Clone)]
#[command(name = "bench")]
pub struct Opts {
    /// Smoke test: small counts, one repetition.
    #[arg(long)]
    pub quick: bool,
    /// QoS levels to measure.
    #[arg(long, value_delimiter = ',', default_values_t = vec![0u8, 1, 2])]
    pub qos: Vec<u8>,
    /// Payload sizes in bytes (at least 16: id and timestamp).
    #[arg(long, value_delimiter = ',', default_values_t = vec![64usize, 4096])]
    pub payload: Vec<usize>,
    /// mqbridge pool sizes (pairs).
    #[arg(long, value_delimiter = ',', default_values_t = vec![1u16, 2, 4])]
    pub pools: Vec<u16>,
    /// Paths to measure: direct, mosquitto, mqbridge, mqbridge-spool (mqbridge with
    /// `spool = true` on its route, compared with mqbridge in a table of its own).
    #[arg(long, value_delimiter = ',', default_values_t = vec!["direct".to_string(), "mosquitto".into(), "mqbridge".into(), "mqbridge-spool".into()])]
    pub paths: Vec<String>,
    /// Repetitions of every case (default 5, 1 with --quick); the table shows medians.
    #[arg(long)]
    pub reps: Option<usize>,
    /// Messages per run for every case (default: per QoS and payload, see --scale).
    #[arg(long)]
    pub count: Option<u64>,
    /// Multiplies the default message counts.
    #[arg(long, default_value_t = 1.0)]
    pub scale: f64,
    /// Window at QoS 0 and 1: brokers' max_inflight_messages, mqbridge's max_inflight, and the
    /// publisher's unacknowledged messages (end to end at QoS 0).
    #[arg(long, default_value_t = 1000)]
    pub window: u64,
    /// Window at QoS 2.
    #[arg(long, default_value_t = 100)]
    pub window_qos2: u64,
    /// The subscriber ends a run after this long without a new message (the rest is lost).
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// The generator's pause after a read that brought little, so that packets accumulate and
    /// acks go out in batches (0 = never).
    #[arg(long, default_value = "500us", value_parser = humantime::parse_duration)]
    pub nap: Duration,
    /// Where the raw runs and the summary go.
    #[arg(long, default_value = "target/bench/results.json")]
    pub json: PathBuf,
    /// The mqbridge binary (default: `mqbridge` in the directory above this example's).
    #[arg(long)]
    pub mqbridge: Option<PathBuf>,
    /// The mosquitto binary (default: $MOSQUITTO, /usr/sbin/mosquitto, or from PATH).
    #[arg(long)]
    pub mosquitto: Option<PathBuf>,
    /// Extra lines for every broker's config (`;` separates lines), e.g. `max_queued_messages 1000`.
    #[arg(long, default_value = "")]
    pub broker_extra: String,
    /// Extra lines for the mosquitto bridge's `connection` section (`;` separates lines), e.g.
    /// `try_private false`.
    #[arg(long, default_value = "")]
    pub bridge_extra: String,
    /// Keep the scratch directory (configs and logs of every run).
    #[arg(long)]
    pub keep: bool,
    /// Give mqbridge the last CPU and run everything else (brokers, generator, mosquitto's
    /// bridge inside broker A) on the others, as when the bridge runs on a host or pod of its
    /// own. Needs at least 2 CPUs.
    #[arg(long)]
    pub bridge_core: bool,
    /// A long link: a proxy in front of broker B delays every byte by this much each way, for
    /// mosquitto's bridge and mqbridge alike (the publisher and subscriber stay local). Several
    /// values run the whole matrix once each.
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration)]
    pub delay: Vec<Duration>,
    /// Publish at a steady rate (messages per second) instead of as fast as the window allows:
    /// a source broker assigns each message of a shared subscription to a member when it is
    /// published, so only a steady stream shows an automatically sized pool at work.
    #[arg(long)]
    pub rate: Option<u64>,
    /// mqbridge's protocol towards broker B: "3.1.1" or "5" (mosquitto's bridge speaks 3.1.1).
    #[arg(long, default_value = "3.1.1")]
    pub target_protocol: String,
    /// Brokers and mqbridge keep their default windows (mosquitto: max_inflight_messages 20,
    /// its Receive Maximum as a v5 target; mqbridge: its defaults) instead of --window.
    #[arg(long)]
    pub default_windows: bool,
    /// Run everything in a network namespace of its own whose loopback uses this TCP congestion
    /// control (e.g. `cubic`; the host's setting is left alone). `bbr` paces every flow, also on
    /// loopback, and moved these results by tens of percent (docs/BENCHMARKS.md). Needs root.
    #[arg(long, value_name = "ALGORITHM")]
    pub congestion: Option<String>,
    /// Broker B is the embedded broker shaped as this broker ("bifromq": 200 PUBLISH/s and
    /// 512 KiB/s in per connection, Receive Maximum 200), in a process of its own, and mqbridge
    /// is told its quotas. mqbridge paths only.
    #[arg(long, value_name = "PROFILE")]
    pub shaped_target: Option<String>,
    /// `pool_size_min` of `mqbridge-auto`.
    #[arg(long, default_value_t = 1)]
    pub pool_min: u16,
    /// With --rate: rise to the rate linearly over this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ramp: Option<Duration>,
    /// mqbridge's `ack_delay` on broker A (its source), e.g. `10ms`: acks to the source wait
    /// that long at most to leave together.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ack_delay: Option<Duration>,
}

/// The ways from the publisher to the subscriber.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// publisher → broker A → subscriber.
    Direct,
    /// publisher → broker A → (A's `connection` bridge) → broker B → subscriber.
    Mosquitto,
    /// publisher → broker A → mqbridge (pool) → broker B → subscriber.
    Mqbridge(u16),
    /// The same with `spool = true` (acknowledged once on disk, SPEC 4.9).
    MqbridgeSpool(u16),
    /// mqbridge with `pool_size = "auto"`, from 1 up to this many pairs.
    MqbridgeAuto(u16),
}

impl Path {
    pub fn label(self) -> String {
        match self {
            Path::Direct => "direct (1 hop)".into(),
            Path::Mosquitto => "mosquitto bridge".into(),
            Path::Mqbridge(p) => format!("mqbridge pool {p}"),
            Path::MqbridgeSpool(p) => format!("mqbridge pool {p} spool"),
            Path::MqbridgeAuto(p) => format!("mqbridge auto ≤{p}"),
        }
    }

    pub fn key(self) -> String {
        match self {
            Path::Direct => "direct".into(),
            Path::Mosquitto => "mosquitto".into(),
            Path::Mqbridge(p) => format!("mqbridge-{p}"),
            Path::MqbridgeSpool(p) => format!("mqbridge-spool-{p}"),
            Path::MqbridgeAuto(p) => format!("mqbridge-auto-{p}"),
        }
    }
}

/// One measurement.
#[derive(Clone, Debug)]
pub struct Run {
    pub qos: u8,
    pub payload: usize,
    pub path: Path,
    pub rep: usize,
    pub window: u64,
    pub count: u64,
    pub distinct: u64,
    pub duplicates: u64,
    /// First publish to last first delivery.
    pub secs: f64,
    pub rate: f64,
    /// CPU seconds spent during the measurement.
    pub cpu_broker_a: f64,
    pub cpu_broker_b: Option<f64>,
    pub cpu_mqbridge: Option<f64>,
    pub cpu_generator: f64,
    pub mqbridge_peak_rss_kib: Option<u64>,
    pub p50_us: u32,
    pub p99_us: u32,
    /// First publish to the publisher's last ack (QoS 1/2) or write (QoS 0); `None`: it never
    /// finished (the run ended on the idle timeout).
    pub publish_secs: Option<f64>,
    /// The 1-minute load average when the run started (other work on the machine shows here).
    pub load1: f64,
    /// With a spool: groups made durable (fdatasyncs) over the whole run, from its metrics.
    pub spool_fsyncs: Option<u64>,
}

impl Run {
    pub fn lost(&self) -> u64 {
        self.count - self.distinct
    }
}

/// Default messages per run: about two seconds each on 2 cores, so that five repetitions of
/// the whole matrix take about six minutes.
fn default_count(qos: u8, payload: usize, quick: bool) -> u64 {
    match (quick, payload <= 256, qos) {
        (true, true, _) => 5_000,
        (true, false, _) => 2_000,
        (false, true, 0) => 200_000,
        (false, true, 1) => 80_000,
        (false, true, _) => 35_000,
        (false, false, 0) => 100_000,
        (false, false, 1) => 60_000,
        (false, false, _) => 30_000,
    }
}

pub fn main_from_env() -> ExitCode {
    let opts = Opts::parse();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run_delays(&opts, &args.join(" ")) {
        Ok(report) => {
            print!("{}", report.markdown);
            eprintln!("bench: runs and summary written to {}", opts.json.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Parses `args` (the first is the program name) and runs the benchmark.
#[allow(dead_code)] // for tests/bench_smoke.rs
pub fn run_with_args<I, T>(args: I) -> Result<Report, String>
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
    let opts = Opts::try_parse_from(&args).map_err(|e| e.to_string())?;
    let shown: Vec<String> = args[1..]
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    run(&opts, &shown.join(" "))
}

struct Context {
    mqbridge: PathBuf,
    /// `--bridge-core`: the CPUs mqbridge is confined to.
    bridge_cpus: Option<procs::CpuSet>,
    mosquitto: PathBuf,
    scratch: PathBuf,
    broker_extra: String,
    bridge_extra: String,
    /// `--delay`: the proxy's runtime and the one-way delay.
    link: Option<(tokio::runtime::Runtime, Duration)>,
    target_protocol: String,
    default_windows: bool,
    rate: Option<u64>,
    ramp: Option<Duration>,
    shaped_target: Option<String>,
    pool_min: u16,
    ack_delay: Option<Duration>,
}

/// Runs the benchmark once per `--delay` value (or once without), the reports one after the
/// other, each delay's runs in a JSON file of its own (`results-50ms.json`).
fn run_delays(opts: &Opts, args: &str) -> Result<Report, String> {
    if opts.delay.len() <= 1 {
        return run(opts, args);
    }
    let mut all: Option<Report> = None;
    for &d in &opts.delay {
        let mut one = opts.clone();
        one.delay = vec![d];
        let stem = opts
            .json
            .file_stem()
            .map_or("results".into(), |s| s.to_string_lossy());
        one.json = opts
            .json
            .with_file_name(format!("{stem}-{}.json", humantime::format_duration(d)));
        let report = run(&one, args)?;
        all = Some(match all {
            None => report,
            Some(mut a) => {
                a.markdown.push('\n');
                a.markdown.push_str(&report.markdown);
                a.summary.extend(report.summary);
                a.runs.extend(report.runs);
                a
            }
        });
    }
    all.ok_or_else(|| "--delay: nothing to run".into())
}

/// Runs the benchmark; `args` is the command line as shown in the report.
pub fn run(opts: &Opts, args: &str) -> Result<Report, String> {
    if let Some(p) = opts.payload.iter().find(|&&p| p < wire::HEADER_LEN) {
        return Err(format!(
            "--payload {p}: at least {} bytes",
            wire::HEADER_LEN
        ));
    }
    if let Some(q) = opts.qos.iter().find(|&&q| q > 2) {
        return Err(format!("--qos {q}: 0, 1 or 2"));
    }
    let paths = paths(opts)?;
    // One per run: the smoke tests run several in one process, side by side.
    static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run_no = RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let scratch =
        std::env::temp_dir().join(format!("mqbridge-bench-{}-{run_no}", std::process::id()));
    std::fs::create_dir_all(&scratch)
        .map_err(|e| format!("cannot create {}: {e}", scratch.display()))?;
    // A private copy: a rebuild of target/release during the run must not change what is measured.
    let mqbridge = scratch.join("mqbridge");
    let original = mqbridge_binary(opts)?;
    std::fs::copy(&original, &mqbridge)
        .map_err(|e| format!("cannot copy {}: {e}", original.display()))?;
    let mosquitto = mosquitto_binary(opts);
    if let Some(cc) = &opts.congestion {
        procs::private_network(cc).map_err(|e| format!("--congestion {cc}: {e}"))?;
    }
    // Before `--bridge-core` confines this process: the machine's cores, not the ones left.
    let machine = report::Machine::describe(&mosquitto, &mqbridge);
    let bridge_cpus = if opts.bridge_core {
        let cpus = procs::CpuSet::allowed().map_err(|e| format!("--bridge-core: {e}"))?;
        let Some((&last, rest)) = cpus.split_last().filter(|(_, rest)| !rest.is_empty()) else {
            return Err(format!(
                "--bridge-core: needs at least 2 CPUs, this process may use {cpus:?}"
            ));
        };
        // Inherited by the generator's threads and by every broker started from here on.
        procs::CpuSet::of(rest.iter().copied())
            .confine_this_thread()
            .map_err(|e| format!("--bridge-core: {e}"))?;
        Some(procs::CpuSet::of([last]))
    } else {
        None
    };
    if opts.delay.len() > 1 {
        return Err("--delay: one value per run (run_delays runs several)".into());
    }
    if !["3.1.1", "5"].contains(&opts.target_protocol.as_str()) {
        return Err(format!(
            "--target-protocol {}: \"3.1.1\" or \"5\"",
            opts.target_protocol
        ));
    }
    // The delay proxy runs on a runtime of its own: the probes' runtime only runs in block_on.
    let link = match opts.delay.first() {
        Some(&d) => Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .map(|rt| (rt, d))
                .map_err(|e| format!("cannot start the delay proxy's runtime: {e}"))?,
        ),
        None => None,
    };
    let ctx = Context {
        mqbridge,
        bridge_cpus,
        mosquitto,
        scratch,
        broker_extra: opts.broker_extra.replace(';', "\n"),
        bridge_extra: opts.bridge_extra.replace(';', "\n"),
        link,
        target_protocol: opts.target_protocol.clone(),
        default_windows: opts.default_windows,
        rate: opts.rate,
        ramp: opts.ramp,
        shaped_target: opts.shaped_target.clone(),
        pool_min: opts.pool_min,
        ack_delay: opts.ack_delay,
    };
    if ctx.shaped_target.is_some()
        && paths
            .iter()
            .any(|p| matches!(p, Path::Direct | Path::Mosquitto))
    {
        return Err("--shaped-target: mqbridge paths only (--paths mqbridge-auto)".into());
    }
    let reps = opts.reps.unwrap_or(if opts.quick { 1 } else { 5 });
    // Only the probes run here; publisher and subscriber have threads of their own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;

    let mut runs = Vec::new();
    for &qos in &opts.qos {
        for &payload in &opts.payload {
            let count = opts.count.unwrap_or_else(|| {
                ((default_count(qos, payload, opts.quick) as f64 * opts.scale) as u64).max(1)
            });
            let window = if qos == 2 && opts.default_windows {
                // mosquitto 2.0.11 takes at most its max_inflight_messages (20 by default) QoS 2
                // publishes from a client and fails the connection beyond them ("Bad socket
                // read/write on client bench-pub"): the publisher honours the broker's default.
                MOSQUITTO_DEFAULT_INFLIGHT.min(opts.window_qos2)
            } else if qos == 2 {
                opts.window_qos2
            } else {
                opts.window
            };
            for rep in 0..reps {
                for &path in &paths {
                    let case = Case {
                        qos,
                        payload,
                        path,
                        rep,
                        count,
                        window,
                        idle_timeout: opts.idle_timeout,
                        nap: opts.nap,
                    };
                    let run = run_case(&rt, &ctx, &case).map_err(|e| {
                        format!(
                            "QoS {qos}, {payload} B, {}, repetition {}: {e} (configs and logs \
                             in {})",
                            path.label(),
                            rep + 1,
                            ctx.scratch.display()
                        )
                    })?;
                    let fsyncs = run
                        .spool_fsyncs
                        .map(|n| format!("  fsyncs {:.0}/s", n as f64 / run.secs))
                        .unwrap_or_default();
                    eprintln!(
                        "QoS {qos} {payload:>5} B  rep {}/{reps}  {:<18} {:>9.0} msg/s  \
                         lost {} dup {}  p50 {:.2} ms{fsyncs}",
                        rep + 1,
                        path.label(),
                        run.rate,
                        run.lost(),
                        run.duplicates,
                        run.p50_us as f64 / 1000.0
                    );
                    runs.push(run);
                }
            }
        }
    }
    let machine = machine.finish();
    let report = Report::new(opts, args, reps, machine, runs);
    if let Some(dir) = opts.json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    std::fs::write(&opts.json, &report.json)
        .map_err(|e| format!("cannot write {}: {e}", opts.json.display()))?;
    if !opts.keep {
        let _ = std::fs::remove_dir_all(&ctx.scratch);
    }
    Ok(report)
}

fn paths(opts: &Opts) -> Result<Vec<Path>, String> {
    let mut paths = Vec::new();
    for name in &opts.paths {
        match name.as_str() {
            "direct" => paths.push(Path::Direct),
            "mosquitto" => paths.push(Path::Mosquitto),
            "mqbridge" => paths.extend(opts.pools.iter().map(|&p| Path::Mqbridge(p))),
            "mqbridge-spool" => paths.extend(opts.pools.iter().map(|&p| Path::MqbridgeSpool(p))),
            "mqbridge-auto" => paths.extend(opts.pools.iter().map(|&p| Path::MqbridgeAuto(p))),
            other => {
                return Err(format!(
                    "--paths {other}: one of direct, mosquitto, mqbridge, mqbridge-spool, \
                     mqbridge-auto (pool_size = \"auto\" up to each --pools)"
                ));
            }
        }
    }
    if paths.is_empty() {
        return Err("--paths: nothing to measure".into());
    }
    Ok(paths)
}

fn mqbridge_binary(opts: &Opts) -> Result<PathBuf, String> {
    let path = match &opts.mqbridge {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.parent()?.join("mqbridge")))
            .unwrap_or_else(|| PathBuf::from("target/release/mqbridge")),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no mqbridge binary at {}: build it first (`cargo build --release`), pass \
             --mqbridge PATH, or run `bash scripts/bench.sh`, which does both",
            path.display()
        ))
    }
}

fn mosquitto_binary(opts: &Opts) -> PathBuf {
    if let Some(p) = &opts.mosquitto {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("MOSQUITTO") {
        return p.into();
    }
    if FsPath::new("/usr/sbin/mosquitto").exists() {
        return "/usr/sbin/mosquitto".into();
    }
    "mosquitto".into()
}

struct Case {
    qos: u8,
    payload: usize,
    path: Path,
    rep: usize,
    count: u64,
    window: u64,
    idle_timeout: Duration,
    nap: Duration,
}

/// Starts the case's processes, waits until a probe crosses the path, measures, stops them.
fn run_case(rt: &tokio::runtime::Runtime, ctx: &Context, case: &Case) -> io::Result<Run> {
    let dir = ctx.scratch.join(format!(
        "q{}-{}-{}-rep{}",
        case.qos,
        case.payload,
        case.path.key(),
        case.rep + 1
    ));
    std::fs::create_dir_all(&dir)?;
    let settings = BrokerSettings {
        mosquitto: ctx.mosquitto.clone(),
        max_inflight: (!ctx.default_windows).then_some(case.window),
        extra: ctx.broker_extra.clone(),
    };
    // `--delay`: broker B as the bridges reach it, through the proxy.
    let remote = |b: &Broker| -> io::Result<(u16, Option<delay::Link>)> {
        match &ctx.link {
            Some((rt, d)) => {
                let link = rt.block_on(delay::Link::start(b.port, *d))?;
                Ok((link.port, Some(link)))
            }
            None => Ok((b.port, None)),
        }
    };
    let mut links = None;
    let (broker_a, broker_b, bridge) = match case.path {
        Path::Direct => (
            Broker::start(&dir, "broker-a", &settings, None)?,
            None,
            None,
        ),
        Path::Mosquitto => {
            let b = Broker::start(&dir, "broker-b", &settings, None)?;
            let (port, link) = remote(&b)?;
            links = link;
            let section = BridgeSection {
                remote: port,
                qos: case.qos,
                extra: ctx.bridge_extra.clone(),
            };
            let a = Broker::start(&dir, "broker-a", &settings, Some(&section))?;
            (a, Some(b), None)
        }
        Path::Mqbridge(pool_size)
        | Path::MqbridgeSpool(pool_size)
        | Path::MqbridgeAuto(pool_size) => {
            let a = Broker::start(&dir, "broker-a", &settings, None)?;
            let b = match &ctx.shaped_target {
                Some(profile) => Broker::start_shaped(&dir, profile)?,
                None => Broker::start(&dir, "broker-b", &settings, None)?,
            };
            let (port, link) = remote(&b)?;
            links = link;
            // The shaped broker's own quotas, told to mqbridge as an operator would.
            let target_extra = match ctx.shaped_target {
                Some(_) => {
                    let q = mqbridge::broker::Quotas::BIFROMQ;
                    format!(
                        "max_publish_rate = {}\nbandwidth_limit = \"{}KiB/s\"\n",
                        q.publish_rate.unwrap_or(0),
                        q.inbound_bytes.unwrap_or(0) / 1024
                    )
                }
                None => String::new(),
            };
            let bridge = Mqbridge::start(
                &dir,
                &MqbridgeSettings {
                    binary: &ctx.mqbridge,
                    source: a.port,
                    target: port,
                    target_protocol: &ctx.target_protocol,
                    qos: case.qos,
                    pool_size,
                    pool_auto: matches!(case.path, Path::MqbridgeAuto(_)),
                    pool_min: ctx.pool_min,
                    target_extra: &target_extra,
                    source_extra: &ctx.ack_delay.map_or(String::new(), |d| {
                        format!("ack_delay = \"{}\"\n", humantime::format_duration(d))
                    }),
                    max_inflight: (!ctx.default_windows).then_some(case.window),
                    cpus: ctx.bridge_cpus.as_ref(),
                    spool: matches!(case.path, Path::MqbridgeSpool(_)),
                },
            )?;
            (a, Some(b), Some(bridge))
        }
    };
    let publish_to = broker_a.addr();
    let subscribe_to = broker_b.as_ref().unwrap_or(&broker_a).addr();
    let spec = LoadSpec {
        qos: case.qos,
        count: case.count,
        payload: case.payload,
        window: case.window,
        idle_timeout: case.idle_timeout,
        nap: case.nap,
        rate: ctx.rate,
        ramp: ctx.ramp,
    };
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN);
    let shared = Shared::new();
    let cpu = || -> io::Result<[f64; 4]> {
        Ok([
            broker_a.proc.cpu_seconds()?,
            broker_b
                .as_ref()
                .map_or(Ok(0.0), |b| b.proc.cpu_seconds())?,
            bridge.as_ref().map_or(Ok(0.0), |b| b.proc.cpu_seconds())?,
            procs::cpu_seconds(std::process::id())?,
        ])
    };

    let counting = load::spawn_subscriber(subscribe_to, spec.clone(), shared.clone())?;
    if let Err(e) = rt.block_on(load::probe(publish_to, &shared, Duration::from_secs(20))) {
        shared.stop();
        let _ = load::join(counting);
        return Err(e);
    }
    let before = cpu()?;
    shared.start_measuring();
    let publisher = load::spawn_publisher(publish_to, spec.clone(), shared.clone());
    let received = load::join(counting);
    let after = cpu();
    shared.stop();
    let published = publisher.and_then(load::join);
    let (received, after, published) = (received?, after?, published?);
    let peak_rss = bridge.as_ref().map(|b| b.proc.peak_rss_kib()).transpose()?;
    if ctx.shaped_target.is_some() {
        let shaped = procs::ShapedStats::read(&dir);
        let threads = bridge.as_ref().and_then(|b| procs::threads(b.proc.pid()));
        eprintln!(
            "shaped target: {} PUBLISH over its quota (discarded), {} dropped from full \
             inboxes; mqbridge threads {threads:?}, peak RSS {peak_rss:?} KiB",
            shaped.over_rate, shaped.dropped
        );
        if shaped.dropped > 0 {
            // B acknowledged them to mqbridge, then had no room for them in its subscriber's
            // inbox: the run's "lost" counts them, but the bridge did not lose them.
            eprintln!(
                "shaped target: {} of the messages counted lost below were dropped by broker B \
                 (its inbox of 1,000 full: B fell behind), after it had acknowledged them",
                shaped.dropped
            );
        }
    }
    let fsyncs = bridge.as_ref().and_then(Mqbridge::spool_fsyncs);
    drop(bridge);
    drop(links);
    drop(broker_b);
    drop(broker_a);

    let start_ns = shared.publish_start_ns();
    let secs = if received.last_ns > start_ns && start_ns > 0 {
        (received.last_ns - start_ns) as f64 / 1e9
    } else {
        f64::NAN
    };
    let mut latencies = received.latencies_us;
    latencies.sort_unstable();
    let pct = |p: f64| -> u32 {
        if latencies.is_empty() {
            0
        } else {
            latencies[((latencies.len() - 1) as f64 * p).round() as usize]
        }
    };
    let used = |i: usize| after[i] - before[i];
    Ok(Run {
        qos: case.qos,
        payload: case.payload,
        path: case.path,
        rep: case.rep,
        window: case.window,
        count: case.count,
        distinct: received.distinct,
        duplicates: received.duplicates,
        secs,
        rate: received.distinct as f64 / secs,
        cpu_broker_a: used(0),
        cpu_broker_b: (case.path != Path::Direct).then(|| used(1)),
        cpu_mqbridge: matches!(
            case.path,
            Path::Mqbridge(_) | Path::MqbridgeSpool(_) | Path::MqbridgeAuto(_)
        )
        .then(|| used(2)),
        spool_fsyncs: fsyncs,
        cpu_generator: used(3),
        mqbridge_peak_rss_kib: peak_rss,
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        publish_secs: published
            .done_ns
            .map(|done| done.saturating_sub(start_ns) as f64 / 1e9),
        load1,
    })
}

/// `cmd args…`'s first line of output, or "unknown".
fn first_line(cmd: &FsPath, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = if o.stdout.is_empty() {
                o.stderr
            } else {
                o.stdout
            };
            String::from_utf8(text).ok()
        })
        .and_then(|s| s.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}
