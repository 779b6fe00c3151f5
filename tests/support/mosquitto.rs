//! A real mosquitto 2.0 broker on a private port of 127.0.0.1, with mosquitto's defaults as users
//! run it (a persistent session queues at most 1,000 messages: `max_queued_messages`), logging to
//! its own file. A test that needs another limit says so and why (`MosquittoOpts`).

use super::process::{kill_and_reap, signal, tail, wait_exit};
use super::temp::{TestDir, free_port};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// What a test may change in the generated `mosquitto.conf`.
#[derive(Clone, Debug, Default)]
pub struct MosquittoOpts {
    /// `max_inflight_messages` (mosquitto's default is 20; 0 means no limit).
    pub max_inflight_messages: Option<u32>,
    /// Save sessions and queued messages in the broker's directory on `stop()`, so that they
    /// survive `restart()`. Off by default: a restart then loses every session.
    pub persistence: bool,
    /// `max_queued_messages` for offline persistent sessions (`None`: mosquitto's default of
    /// 1,000, beyond which it drops). Raise it only where a test's backlog exceeds that on
    /// purpose, and say so: the default is what a bridge meets in the field.
    pub max_queued_messages: Option<u32>,
    /// Raw lines appended to the config, e.g. `"max_packet_size 1000\n"`.
    pub extra: String,
}

impl MosquittoOpts {
    /// A source whose queue for offline sessions is deep enough for the test's whole backlog
    /// (`max_queued_messages 1000000`). Only for tests about the bridge's own handling of cuts,
    /// kills and outages while a fast stream keeps coming: with mosquitto's default of 1,000,
    /// the source itself drops the excess while the bridge is away ("Outgoing messages are being
    /// dropped"), which no bridge without a spool can prevent (issue #15).
    pub fn deep_queue() -> Self {
        MosquittoOpts {
            max_queued_messages: Some(1_000_000),
            ..Default::default()
        }
    }
}

/// A running (or stopped, see [`Mosquitto::stop`]) broker. Dropping it kills the process.
pub struct Mosquitto {
    port: u16,
    dir: TestDir,
    conf: PathBuf,
    child: Option<Child>,
}

impl Mosquitto {
    /// Starts a broker with the default options on a free port and waits until it listens.
    pub async fn start() -> Mosquitto {
        Mosquitto::start_with(MosquittoOpts::default()).await
    }

    pub async fn start_with(opts: MosquittoOpts) -> Mosquitto {
        let dir = TestDir::new("mosquitto");
        let conf = dir.path().join("mosquitto.conf");
        let mut broker = Mosquitto {
            port: 0,
            dir,
            conf,
            child: None,
        };
        // Another process may grab the port between free_port() and the bind: try a few.
        let mut last_error = String::new();
        for _ in 0..5 {
            broker.port = free_port();
            std::fs::write(&broker.conf, broker.config_text(&opts))
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", broker.conf.display()));
            match broker.spawn_and_wait().await {
                Ok(()) => return broker,
                Err(e) => last_error = e,
            }
        }
        panic!("mosquitto did not start: {last_error}\n{}", broker.log());
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `mqtt://127.0.0.1:PORT`, as a bridge config's `url` wants it.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// SIGTERM, then waits for the exit (mosquitto saves persistence here); SIGKILL after 10 s.
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            if wait_exit(&mut child, STOP_TIMEOUT).await.is_none() {
                kill_and_reap(&mut child);
            }
        }
    }

    /// SIGKILL: a crash, nothing saved, connections reset.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is read or acknowledged.
    pub fn pause(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "STOP");
        }
    }

    /// Undoes [`Mosquitto::pause`].
    pub fn resume(&mut self) {
        if let Some(pid) = self.pid() {
            signal(pid, "CONT");
        }
    }

    /// Starts the broker again on the same port and config (stopping it first if it runs), and
    /// waits until it listens.
    pub async fn restart(&mut self) {
        self.stop().await;
        // The port is ours, so a failure is transient (a previous socket still closing).
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.spawn_and_wait().await {
                Ok(()) => return,
                Err(e) if Instant::now() >= deadline => {
                    panic!(
                        "mosquitto did not restart on {}: {e}\n{}",
                        self.port,
                        self.log()
                    )
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The broker's log file and its own stdout/stderr, across restarts.
    pub fn log(&self) -> String {
        let dir = self.dir.path();
        let mut text = std::fs::read_to_string(dir.join("mosquitto.log")).unwrap_or_default();
        let out = std::fs::read_to_string(dir.join("mosquitto.out")).unwrap_or_default();
        if !out.trim().is_empty() {
            text.push_str("--- mosquitto stdout/stderr ---\n");
            text.push_str(&out);
        }
        text
    }

    /// Waits until the log contains `needle` (subscriptions are logged, e.g. `$share/g/t/#`).
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.log().contains(needle)).await
    }

    fn config_text(&self, opts: &MosquittoOpts) -> String {
        let dir = self.dir.path().display();
        let mut conf = format!(
            "# generated by tests/support/mosquitto.rs\n\
             listener {port} 127.0.0.1\n\
             allow_anonymous true\n\
             # Not the default: Nagle with delayed ACKs adds 40 ms stalls to every\n\
             # request/response the tests wait on (speed only; no guarantee depends on it).\n\
             set_tcp_nodelay true\n\
             log_dest file {dir}/mosquitto.log\n\
             log_type error\n\
             log_type warning\n\
             log_type notice\n\
             log_type information\n\
             log_type subscribe\n\
             log_type unsubscribe\n\
             log_timestamp_format %H:%M:%S\n\
             connection_messages true\n",
            port = self.port,
        );
        if let Some(n) = opts.max_queued_messages {
            conf.push_str(&format!("max_queued_messages {n}\n"));
        }
        if opts.persistence {
            conf.push_str(&format!(
                "persistence true\npersistence_location {dir}/\nautosave_interval 1800\n"
            ));
        } else {
            conf.push_str("persistence false\n");
        }
        if running_as_root() {
            // Otherwise mosquitto switches to its own user, who cannot write our log file.
            conf.push_str("user root\n");
        }
        if let Some(n) = opts.max_inflight_messages {
            conf.push_str(&format!("max_inflight_messages {n}\n"));
        }
        conf.push_str(&opts.extra);
        conf.push('\n');
        conf
    }

    async fn spawn_and_wait(&mut self) -> Result<(), String> {
        let out_path = self.dir.path().join("mosquitto.out");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(|e| format!("cannot open {}: {e}", out_path.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", mosquitto_bin()))?;
        // Kept in self at once, so that even a cancelled start leaves nothing running.
        self.child = Some(child);

        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned above");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("mosquitto on port {} exited: {status}", self.port));
            }
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return Ok(());
            }
            if Instant::now() >= deadline {
                self.kill();
                return Err(format!("mosquitto not listening on {}", self.port));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- mosquitto 127.0.0.1:{} (last lines of {}) ---\n{}",
                self.port,
                self.dir.path().join("mosquitto.log").display(),
                tail(&self.log(), 60)
            );
        }
    }
}

/// `$MOSQUITTO` if set, else the Debian location, else whatever `PATH` finds.
fn mosquitto_bin() -> String {
    if let Ok(bin) = std::env::var("MOSQUITTO") {
        return bin;
    }
    if Path::new("/usr/sbin/mosquitto").exists() {
        return "/usr/sbin/mosquitto".into();
    }
    "mosquitto".into()
}

/// /proc/self belongs to the effective user of this process.
fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}
