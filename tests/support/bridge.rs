//! The `mqbridge` binary under test: `run -c <file>` as a child process with its output in a log
//! file, one-shot CLI invocations (`check`, `--help`), a tiny HTTP client for the admin
//! endpoint, and the process's resources (memory, descriptors, threads, tasks) for long tests.

use super::process::{kill_and_reap, signal, tail, wait_exit};
use super::temp::TestDir;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const BIN: &str = env!("CARGO_BIN_EXE_mqbridge");

/// A `mqbridge run` process. Dropping it kills the process (SIGKILL).
pub struct Bridge {
    dir: TestDir,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    exit: Option<ExitStatus>,
}

impl Bridge {
    /// Writes `config_toml` to `bridge.toml` and runs `mqbridge run -c bridge.toml`, with
    /// `MQBRIDGE_LOG` taken from the test's environment or `info`. Does not wait for anything:
    /// see [`Bridge::wait_log`] or poll `/readyz` with [`http_get`].
    pub fn start(config_toml: &str) -> Bridge {
        Bridge::start_with_env(config_toml, &[])
    }

    /// As [`Bridge::start`], with extra environment variables (`MQBRIDGE__…` overrides).
    pub fn start_with_env(config_toml: &str, env: &[(&str, &str)]) -> Bridge {
        let dir = TestDir::new("bridge");
        let config = dir.write("bridge.toml", config_toml);
        let log = dir.path().join("bridge.log");
        let mut bridge = Bridge {
            dir,
            config,
            log,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
            exit: None,
        };
        bridge.spawn();
        bridge
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        self.poll_exit();
        self.child.is_some()
    }

    /// SIGKILL and reap: a crash, nothing drained.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            self.exit = Some(kill_and_reap(&mut child));
        }
    }

    /// SIGTERM: the bridge should drain and exit 0; see [`Bridge::wait_exit`].
    pub fn terminate(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "TERM");
        }
    }

    /// SIGINT, like Ctrl-C.
    pub fn interrupt(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "INT");
        }
    }

    /// SIGHUP: the bridge reads its config file again (see [`Bridge::rewrite_config`]).
    pub fn hangup(&self) {
        if let Some(pid) = self.pid() {
            signal(pid, "HUP");
        }
    }

    /// Replaces the config file, for the next SIGHUP (or restart), in one rename, so that a
    /// reload never reads a half-written file.
    pub fn rewrite_config(&self, config_toml: &str) {
        let tmp = self.config.with_extension("toml.new");
        std::fs::write(&tmp, config_toml)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", tmp.display()));
        std::fs::rename(&tmp, &self.config)
            .unwrap_or_else(|e| panic!("cannot replace {}: {e}", self.config.display()));
    }

    /// The exit status once the process has exited, waiting at most `timeout`; `None` if it is
    /// still running then. Returns the status of the last run again when called after the exit.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(child) = self.child.as_mut()
            && let Some(status) = wait_exit(child, timeout).await
        {
            self.child = None;
            self.exit = Some(status);
        }
        if self.child.is_some() {
            None
        } else {
            self.exit
        }
    }

    /// SIGTERM, then [`Bridge::wait_exit`].
    pub async fn stop(&mut self, timeout: Duration) -> Option<ExitStatus> {
        self.terminate();
        self.wait_exit(timeout).await
    }

    /// SIGTERM, and asserts that the bridge drained and exited 0 within 15 s (its log if not).
    pub async fn stop_cleanly(&mut self) {
        let status = self.stop(Duration::from_secs(15)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "the bridge did not stop cleanly ({status:?}):\n{}",
            self.log()
        );
    }

    /// Kills the process if it still runs and starts it again with the same config and
    /// environment; the log continues in the same file.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Everything the bridge wrote to stdout and stderr, across restarts.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.log().contains(needle)).await
    }

    fn poll_exit(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.child = None;
            self.exit = Some(status);
        }
    }

    fn spawn(&mut self) {
        let mut out = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", self.log.display()));
        let _ = writeln!(out, "=== mqbridge run -c {} ===", self.config.display());
        let err = out.try_clone().expect("clone log file handle");
        let level = std::env::var("MQBRIDGE_LOG").unwrap_or_else(|_| "info".into());
        let child = Command::new(BIN)
            .arg("run")
            .arg("-c")
            .arg(&self.config)
            .env("MQBRIDGE_LOG", level)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
        self.child = Some(child);
        self.exit = None;
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- mqbridge (last lines of {}) ---\n{}",
                self.log.display(),
                tail(&self.log(), 200)
            );
        }
    }
}

/// What a one-shot `mqbridge` invocation returned.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    /// The exit code; `None` when a signal ended the process.
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

/// Runs `mqbridge <args>` to completion (for `check`, `--help`, `--version`; not for `run`),
/// with `env` added to the environment.
pub fn mqbridge_cli(args: &[&str], env: &[(&str, &str)]) -> CliOutput {
    let output = Command::new(BIN)
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {BIN}: {e}"));
    CliOutput {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `GET path` on `addr` ("127.0.0.1:9464") over HTTP/1.0: the status code and body, or `None`
/// when nothing answers within 2 s.
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.ok()?;
        let response = String::from_utf8_lossy(&response).into_owned();
        let (head, body) = response.split_once("\r\n\r\n")?;
        let status = head.split_whitespace().nth(1)?.parse().ok()?;
        Some((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(2), exchange)
        .await
        .ok()
        .flatten()
}

/// The sum of the sample lines of `metric` in a Prometheus text body (over all label sets); 0
/// when there is none. `metric` is a name (`mqbridge_inflight` takes every
/// `mqbridge_inflight{…}` line, never `mqbridge_inflight_max`) or a name with its whole label set.
pub fn metric(body: &str, metric: &str) -> f64 {
    body.lines()
        .filter(|l| {
            // The name itself, not a longer one it begins (mqbridge_window_full_… is not
            // mqbridge_window).
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What a running bridge process uses, from /proc and its admin endpoint (see
/// [`sample_resources`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Resources {
    /// Resident memory now (VmRSS) and at its peak so far (VmHWM).
    pub rss_kib: u64,
    pub hwm_kib: u64,
    /// Open file descriptors.
    pub fds: usize,
    pub threads: u64,
    /// Tasks alive in the bridge's runtime (`mqbridge_runtime_tasks` on /metrics; 0 when the
    /// endpoint does not answer).
    pub tasks: u64,
}

/// Samples process `pid` (/proc/<pid>/status and /proc/<pid>/fd), then its admin endpoint at
/// `admin` ("127.0.0.1:PORT"). Fields that cannot be read are 0.
pub async fn sample_resources(pid: u32, admin: &str) -> Resources {
    // /proc first: the scrape's own connection would otherwise be counted while it closes.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let tasks = http_get(admin, "/metrics")
        .await
        .map(|(_, body)| metric(&body, "mqbridge_runtime_tasks") as u64)
        .unwrap_or(0);
    Resources {
        rss_kib: field("VmRSS:"),
        hwm_kib: field("VmHWM:"),
        fds,
        threads: field("Threads:"),
        tasks,
    }
}

/// CPU time (user + system) process `pid` has used so far, from /proc/<pid>/stat.
pub fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis((ticks(11) + ticks(12)) * 1000 / hz)
}

/// The share of one core process `pid` uses over `span` (0.0 to 1.0 per core).
pub async fn cpu_share(pid: u32, span: Duration) -> f64 {
    let before = cpu_time(pid);
    let t0 = std::time::Instant::now();
    tokio::time::sleep(span).await;
    let used = cpu_time(pid).saturating_sub(before);
    used.as_secs_f64() / t0.elapsed().as_secs_f64()
}
