//! The processes under test: mosquitto brokers (with or without a bridge `connection`) and
//! `mqbridge run`, each on free loopback ports with a generated config in a scratch directory,
//! and what /proc tells about them (CPU time, peak RSS).

use std::{
    fs::File,
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering::Relaxed},
    time::{Duration, Instant},
};

static NEXT_PORT: AtomicU32 = AtomicU32::new(0);

/// A port on 127.0.0.1 that was free a moment ago, below Linux's ephemeral range so that no
/// outgoing connection can hold it. Never 1883.
pub fn free_port() -> io::Result<u16> {
    const RANGE: std::ops::Range<u32> = 20_000..32_000;
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    for _ in 0..(RANGE.end - RANGE.start) {
        let n = NEXT_PORT.fetch_add(1, Relaxed);
        let port = (RANGE.start + seed.wrapping_add(n.wrapping_mul(17)) % (RANGE.end - RANGE.start))
            as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(io::Error::other("no free port in 20000..32000"))
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The TCP congestion control of the calling thread's network namespace (read and written).
pub const CONGESTION_KNOB: &str = "/proc/sys/net/ipv4/tcp_congestion_control";

/// `--congestion`: moves this thread (and so every process and thread it starts from here on)
/// into a network namespace of its own, brings its loopback up and sets its TCP congestion
/// control. The host's network and its setting stay as they are. Needs root (CAP_SYS_ADMIN).
pub fn private_network(congestion: &str) -> io::Result<()> {
    // SAFETY: unshare takes flags only; CLONE_NEWNET affects the calling thread alone, which is
    // the one that starts the brokers, mqbridge and the generator's threads.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("cannot create a network namespace ({e}); run as root"),
        ));
    }
    let up = Command::new("ip")
        .args(["link", "set", "lo", "up"])
        .status()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run `ip link set lo up`: {e}")))?;
    if !up.success() {
        return Err(io::Error::other(format!(
            "`ip link set lo up` failed: {up}"
        )));
    }
    std::fs::write(CONGESTION_KNOB, congestion).map_err(|e| {
        let known = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
            .unwrap_or_default();
        io::Error::new(
            e.kind(),
            format!("cannot set it ({e}); this kernel offers: {}", known.trim()),
        )
    })
}

/// A set of CPUs for `sched_setaffinity` (`--bridge-core`).
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    pub fn of(cpus: impl IntoIterator<Item = usize>) -> CpuSet {
        // SAFETY: cpu_set_t is a plain bit array; all zeroes is the empty set, and CPU_SET only
        // sets a bit of it (it ignores numbers beyond its size).
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for cpu in cpus {
            unsafe { libc::CPU_SET(cpu, &mut set) };
        }
        CpuSet(set)
    }

    /// The CPUs this process may run on, in order.
    pub fn allowed() -> io::Result<Vec<usize>> {
        // SAFETY: as above; sched_getaffinity writes at most size_of::<cpu_set_t>() bytes.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let size = 8 * std::mem::size_of_val(&set);
        Ok((0..size)
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect())
    }

    /// Confines the calling thread, and the threads and processes it starts from now on.
    pub fn confine_this_thread(&self) -> io::Result<()> {
        // SAFETY: the set lives for the call; the kernel only reads it.
        let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&self.0), &self.0) };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Confines the process `cmd` starts (before it runs its program).
    pub fn confine(&self, cmd: &mut Command) {
        use std::os::unix::process::CommandExt;
        let set = *self;
        // SAFETY: the closure runs in the forked child before exec and only makes one syscall
        // (async-signal-safe) on a copy it owns.
        unsafe {
            cmd.pre_exec(move || set.confine_this_thread());
        }
    }
}

/// A child process killed (and reaped) on drop.
pub struct Proc {
    pub name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command, log: PathBuf) -> io::Result<Proc> {
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot run {cmd:?}: {e}")))?;
        Ok(Proc { name, child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(format!(
                "{} exited ({status}); its log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            )),
            _ => None,
        }
    }

    /// Waits until `ready` holds, or fails with the process's log.
    pub fn wait_until(
        &mut self,
        timeout: Duration,
        mut ready: impl FnMut() -> bool,
    ) -> io::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(why) = self.exited() {
                return Err(io::Error::other(why));
            }
            if ready() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{} not ready within {timeout:?}; its log {}:\n{}",
                        self.name,
                        self.log.display(),
                        tail(&self.log)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// CPU seconds used so far (utime + stime of all its threads, /proc/<pid>/stat).
    pub fn cpu_seconds(&self) -> io::Result<f64> {
        cpu_seconds(self.pid())
    }

    /// Peak resident set size in KiB (VmHWM).
    pub fn peak_rss_kib(&self) -> io::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| io::Error::other("no VmHWM in /proc/<pid>/status"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime of `pid` in seconds.
pub fn cpu_seconds(pid: u32) -> io::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces and parentheses: fields are counted after the last ')'.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| io::Error::other("malformed /proc/<pid>/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Field 3 (state) is fields[0]; utime is field 14, stime field 15.
    let ticks: f64 = [11, 12]
        .iter()
        .map(|&i| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        })
        .sum();
    Ok(ticks / clock_ticks_per_second())
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

/// What every broker of a run shares.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    pub mosquitto: PathBuf,
    /// `max_inflight_messages`; `None`: mosquitto's default (20).
    pub max_inflight: Option<u64>,
    /// Lines appended to the general part of the config.
    pub extra: String,
}

/// mosquitto's own bridge, configured in the first broker.
pub struct BridgeSection {
    pub remote: u16,
    pub qos: u8,
    /// Lines appended to the `connection` section.
    pub extra: String,
}

pub struct Broker {
    pub proc: Proc,
    pub port: u16,
}

impl Broker {
    /// Broker B as the embedded broker shaped as BifroMQ (`BrokerOptions::bifromq`), in a
    /// process of its own (this benchmark run again with `--serve-shaped`), so that its CPU is
    /// its own. It writes its counters to `shaped.stats` in `dir` (see [`ShapedStats`]).
    pub fn start_shaped(dir: &Path, profile: &str) -> io::Result<Broker> {
        let port = free_port()?;
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--serve-shaped")
            .arg(profile)
            .arg(port.to_string())
            .arg(dir.join("shaped.stats"));
        let mut proc = Proc::spawn("shaped-broker", cmd, dir.join("shaped-broker.out"))?;
        proc.wait_until(Duration::from_secs(10), || {
            TcpStream::connect(loopback(port)).is_ok()
        })?;
        Ok(Broker { proc, port })
    }

    pub fn start(
        dir: &Path,
        name: &'static str,
        settings: &BrokerSettings,
        bridge: Option<&BridgeSection>,
    ) -> io::Result<Broker> {
        let mut last = None;
        for attempt in 0..5 {
            let port = free_port()?;
            let conf = dir.join(format!("{name}.conf"));
            std::fs::write(&conf, broker_config(dir, name, port, settings, bridge))?;
            let mut cmd = Command::new(&settings.mosquitto);
            cmd.arg("-c").arg(&conf);
            let mut proc = Proc::spawn(name, cmd, dir.join(format!("{name}.out")))?;
            match proc.wait_until(Duration::from_secs(10), || {
                TcpStream::connect(loopback(port)).is_ok()
            }) {
                Ok(()) => return Ok(Broker { proc, port }),
                // Another process may have taken the port in between: try another.
                Err(e) if attempt < 4 => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("mosquitto did not start")))
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }
}

/// A broker's config: mosquitto's defaults but for the window, no queue limits, and the logs.
///
/// `set_tcp_nodelay` stays at mosquitto's default (false) on purpose: mosquitto sets
/// `TCP_NODELAY` only on the connections it accepts, never on its own bridge's outgoing one. With
/// it on, broker A sends to mqbridge (and to the subscriber in the direct path) one segment per
/// message, while its built-in bridge keeps Nagle's coalescing towards broker B; on the AMD
/// machine that made broker A 10-50 % dearer per message on the paths it does not favour.
fn broker_config(
    dir: &Path,
    name: &str,
    port: u16,
    settings: &BrokerSettings,
    bridge: Option<&BridgeSection>,
) -> String {
    let mut conf = format!(
        "# generated by examples/bench\n\
         listener {port} 127.0.0.1\n\
         allow_anonymous true\n\
         persistence false\n\
         {inflight}\
         max_queued_messages 0\n\
         max_queued_bytes 0\n\
         log_dest file {log}\n\
         log_type error\n\
         log_type warning\n\
         log_type notice\n\
         log_type information\n",
        inflight = settings
            .max_inflight
            .map_or(String::new(), |n| format!("max_inflight_messages {n}\n")),
        log = dir.join(format!("{name}.log")).display(),
    );
    if running_as_root() {
        // Otherwise mosquitto switches to its own user, who cannot write the log file.
        conf.push_str("user root\n");
    }
    conf.push_str(&settings.extra);
    conf.push('\n');
    if let Some(b) = bridge {
        conf.push_str(&format!(
            "\nconnection bench-bridge\n\
             address 127.0.0.1:{remote}\n\
             topic bench/# out {qos}\n\
             bridge_protocol_version mqttv311\n\
             cleansession false\n\
             notifications false\n\
             keepalive_interval 60\n\
             restart_timeout 1\n\
             start_type automatic\n",
            remote = b.remote,
            qos = b.qos,
        ));
        conf.push_str(&b.extra);
        conf.push('\n');
    }
    conf
}

/// What the shaped broker counted, from its stats file: PUBLISH packets over its PUBLISH/s
/// quota (discarded) and messages dropped from full session inboxes.
#[derive(Debug, Default, Clone, Copy)]
pub struct ShapedStats {
    pub over_rate: u64,
    pub dropped: u64,
}

impl ShapedStats {
    pub fn read(dir: &Path) -> ShapedStats {
        let text = std::fs::read_to_string(dir.join("shaped.stats")).unwrap_or_default();
        let field = |name: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(name)?.parse().ok())
                .unwrap_or(0)
        };
        ShapedStats {
            over_rate: field("over_rate="),
            dropped: field("dropped="),
        }
    }
}

/// `--serve-shaped PROFILE PORT STATS`: runs the embedded broker shaped as `PROFILE` on
/// `PORT` until killed, writing its counters to `STATS` every 200 ms. The outbound quota is
/// left off: the counting subscriber is the instrument, not the system measured (BifroMQ's
/// 512 KiB/s would hold it to about 6,000 msg/s of 64 B).
pub fn serve_shaped(profile: &str, port: u16, stats: &Path) -> io::Result<()> {
    if profile != "bifromq" {
        return Err(io::Error::other(format!(
            "--shaped-target {profile}: only \"bifromq\""
        )));
    }
    let mut options = mqbridge::broker::BrokerOptions::bifromq("shaped");
    options.addr = loopback(port);
    options.quotas.outbound_bytes = None;
    let broker = mqbridge::broker::EmbeddedBroker::start(options)?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let s = broker.stats();
        let (mut over, mut dropped) = (0, 0);
        for c in s.client_ids().iter().filter_map(|c| s.client(c)) {
            over += c.over_rate;
            dropped += c.dropped;
        }
        let tmp = stats.with_extension("tmp");
        std::fs::write(&tmp, format!("over_rate={over} dropped={dropped}\n"))?;
        std::fs::rename(&tmp, stats)?;
    }
}

/// Threads of a process now (`/proc/PID/status`).
pub fn threads(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
}

/// `mqbridge run` with one route A → B over MQTT 3.1.1 and an admin port for `/readyz`.
pub struct Mqbridge {
    pub proc: Proc,
    admin: u16,
}

pub struct MqbridgeSettings<'a> {
    pub binary: &'a Path,
    /// Confine the process to these CPUs (`--bridge-core`).
    pub cpus: Option<&'a CpuSet>,
    pub source: u16,
    pub target: u16,
    /// "3.1.1" or "5".
    pub target_protocol: &'a str,
    pub qos: u8,
    /// Pairs, or with `pool_auto` the most pairs (`pool_size = "auto"` from `pool_min`).
    pub pool_size: u16,
    pub pool_auto: bool,
    pub pool_min: u16,
    /// Lines for broker B's table (its quotas, for a shaped target).
    pub target_extra: &'a str,
    /// Lines for broker A's table (the source), e.g. `ack_delay`.
    pub source_extra: &'a str,
    /// `max_inflight` on both brokers; `None`: mqbridge's defaults.
    pub max_inflight: Option<u64>,
    /// `spool = true` on the route, the spool under the run's directory.
    pub spool: bool,
}

impl Mqbridge {
    /// `mqbridge_spool_fsyncs_total` from its metrics (with a spool).
    pub fn spool_fsyncs(&self) -> Option<u64> {
        let mut conn = TcpStream::connect(loopback(self.admin)).ok()?;
        let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
        conn.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        std::io::Read::read_to_string(&mut conn, &mut body).ok()?;
        body.lines()
            .find(|l| l.starts_with("mqbridge_spool_fsyncs_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    }

    pub fn start(dir: &Path, s: &MqbridgeSettings) -> io::Result<Mqbridge> {
        let admin = free_port()?;
        let conf = dir.join("mqbridge.toml");
        std::fs::write(&conf, mqbridge_config(s, admin))?;
        let mut cmd = Command::new(s.binary);
        cmd.arg("run").arg("-c").arg(&conf);
        if let Some(cpus) = s.cpus {
            cpus.confine(&mut cmd);
        }
        let mut proc = Proc::spawn("mqbridge", cmd, dir.join("mqbridge.log"))?;
        proc.wait_until(Duration::from_secs(20), || ready(admin))?;
        Ok(Mqbridge { proc, admin })
    }
}

/// The config `bench` runs mqbridge with: one route A → B, everything else at its default.
pub fn mqbridge_config(s: &MqbridgeSettings, admin: u16) -> String {
    format!(
        r#"# generated by examples/bench
[bridge]
name = "bench"
instance = "b"

[admin]
listen = "127.0.0.1:{admin}"

[brokers.a]
url = "mqtt://127.0.0.1:{source}"
protocol = "3.1.1"
{inflight}{source_extra}
[brokers.b]
url = "mqtt://127.0.0.1:{target}"
protocol = "{target_protocol}"
{inflight}{target_extra}
[[routes]]
name = "bench"
from = "a"
to = "b"
topics = ["bench/#"]
qos = {qos}
{pool}
{spool}"#,
        source = s.source,
        target = s.target,
        target_protocol = s.target_protocol,
        target_extra = s.target_extra,
        source_extra = s.source_extra,
        inflight = s
            .max_inflight
            .map_or(String::new(), |n| format!("max_inflight = {n}\n")),
        qos = s.qos,
        pool = if s.pool_auto {
            format!(
                "pool_size = \"auto\"\npool_size_min = {}\npool_size_max = {}",
                s.pool_min, s.pool_size
            )
        } else {
            format!("pool_size = {}", s.pool_size)
        },
        spool = if s.spool {
            "spool = true\n\n[spool]\ndir = \"spool\"\n"
        } else {
            ""
        },
    )
}

/// `GET /readyz` answers 200: every pair connected and subscribed.
fn ready(admin: u16) -> bool {
    let Ok(mut conn) = TcpStream::connect(loopback(admin)) else {
        return false;
    };
    let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
    if conn
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}
