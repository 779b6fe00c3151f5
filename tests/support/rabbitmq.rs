//! A RabbitMQ 3.10 node of the test's own, with the `rabbitmq_mqtt` and `rabbitmq_web_mqtt`
//! plugins: a real MQTT-over-WebSocket server (`ws://127.0.0.1:PORT/ws`) next to a plain MQTT
//! listener, for what Debian's mosquitto 2.0.11 (no websockets) cannot serve.
//!
//! The machine's own node (`rabbit@localhost`, port 5672) is never touched: the node started here
//! has a unique name, free loopback ports for every listener (AMQP, distribution, MQTT, Web MQTT),
//! and all its files (data, logs, config, enabled plugins, Erlang cookie through `HOME`) inside a
//! [`TestDir`]; `RABBITMQ_CONF_ENV_FILE` points at an empty file so that
//! `/etc/rabbitmq/rabbitmq-env.conf` (which names the system node) does not apply. Only epmd,
//! the Erlang port mapper daemon on 127.0.0.1:4369, is shared with the system node.
//!
//! The server script runs in a process group of its own. Erlang starts its port programs
//! (`erl_child_setup`, `inet_gethost`, the disk monitor's shell) in sessions of their own, so
//! they leave that group; every process of the node is found instead by the node name in its
//! environment (`ps e`), where `RABBITMQ_NODENAME` is inherited by all of them.

use super::process::{kill_and_reap, signal, tail, wait_exit};
use super::temp::{TestDir, free_port};
use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use tokio::time::Instant;

/// A node boots in 5–15 s on a loaded 2-core machine; two starting at once take longer.
const START_TIMEOUT: Duration = Duration::from_secs(120);
/// A SIGTERM stops a node in about a second.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the processes of a killed node may take to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);
/// The Debian package's server script (a symlink into `lib/rabbitmq_server-<version>/sbin`).
const DEBIAN_SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
/// What the node logs once every plugin has started.
const BOOTED: &str = "Server startup complete";
/// The plugins the node runs, as `RABBITMQ_ENABLED_PLUGINS_FILE` wants them.
const PLUGINS: &str = "[rabbitmq_mqtt,rabbitmq_web_mqtt].\n";

static NEXT_NODE: AtomicU32 = AtomicU32::new(0);

/// A running (or stopped, see [`RabbitMq::stop`]) node. Dropping it kills every process of it.
pub struct RabbitMq {
    node: String,
    amqp_port: u16,
    dist_port: u16,
    mqtt_port: u16,
    ws_port: u16,
    dir: TestDir,
    child: Option<Child>,
    started_in: Duration,
}

impl RabbitMq {
    /// Starts a node on free ports and waits until its MQTT and Web MQTT listeners accept and
    /// it has logged the end of its boot.
    /// Panics, naming what is missing, when RabbitMQ or its `rabbitmq_web_mqtt` plugin is not
    /// installed, or when the node does not come up.
    pub async fn start() -> RabbitMq {
        let server = server_script();
        let n = NEXT_NODE.fetch_add(1, Ordering::Relaxed);
        let mut node = RabbitMq {
            node: format!("mqbtest-{}-{n}@localhost", std::process::id()),
            amqp_port: 0,
            dist_port: 0,
            mqtt_port: 0,
            ws_port: 0,
            dir: TestDir::new("rabbitmq"),
            child: None,
            started_in: Duration::ZERO,
        };
        for sub in ["mnesia", "log", "home"] {
            let path = node.dir.path().join(sub);
            std::fs::create_dir_all(&path)
                .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        }
        node.dir.write("enabled_plugins", PLUGINS);
        node.dir.write("rabbitmq-env.conf", "");
        // Another process may take a port between free_port() and the bind: a node that cannot
        // bind a listener exits (eaddrinuse in its output), and is tried again on new ports.
        let mut last_error = String::new();
        for _ in 0..3 {
            node.amqp_port = free_port();
            node.dist_port = free_port();
            node.mqtt_port = free_port();
            node.ws_port = free_port();
            node.dir.write("rabbitmq.conf", &node.config_text());
            let port_clashes = node.log().matches("eaddrinuse").count();
            match node.spawn_and_wait(&server).await {
                Ok(()) => return node,
                Err(e) => {
                    node.kill_all();
                    last_error = e;
                    if node.log().matches("eaddrinuse").count() == port_clashes {
                        break;
                    }
                }
            }
        }
        panic!(
            "RabbitMQ node {} did not start: {last_error}\n{}",
            node.node,
            tail(&node.log(), 80)
        );
    }

    /// `mqbtest-<pid>-<n>@localhost`.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The plain MQTT listener (for the test's own clients).
    pub fn mqtt_port(&self) -> u16 {
        self.mqtt_port
    }

    /// `ws://127.0.0.1:PORT/ws`, as a bridge config's `url` wants it (web_mqtt serves `/ws`).
    pub fn ws_url(&self) -> String {
        format!("ws://127.0.0.1:{}/ws", self.ws_port)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// From spawning the server script to the node being ready (see [`RabbitMq::start`]).
    pub fn started_in(&self) -> Duration {
        self.started_in
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The node's log file and the server script's stdout/stderr.
    pub fn log(&self) -> String {
        let mut text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let out = std::fs::read_to_string(self.dir.path().join("rabbitmq.out")).unwrap_or_default();
        if !out.trim().is_empty() {
            text.push_str("--- rabbitmq-server stdout/stderr ---\n");
            text.push_str(&out);
        }
        text
    }

    /// Waits until the node's log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        super::wait_until(timeout, || self.log().contains(needle)).await
    }

    /// Stops the node as an operator would (SIGTERM to the server script, which stops the Erlang
    /// VM), SIGKILLs whatever is left after 30 s, and panics unless no process of the node
    /// remains afterwards (checked with `ps`).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM");
            if wait_exit(&mut child, STOP_TIMEOUT).await.is_none() {
                eprintln!("RabbitMQ node {} ignored SIGTERM for 30 s", self.node);
                kill_group(child.id());
                kill_and_reap(&mut child);
            }
        }
        // The port programs exit when the VM is gone; a SIGTERMed node takes about a second.
        let gone = super::wait_until(STOP_TIMEOUT, || node_processes(&self.node).is_empty()).await;
        if !gone {
            self.kill_all();
        }
        let left = node_processes(&self.node);
        assert!(
            left.is_empty(),
            "processes of RabbitMQ node {} still running after stop: {left:#?}",
            self.node
        );
    }

    /// Every process of this node still running (pid and command line), from `ps`.
    pub fn processes(&self) -> Vec<(u32, String)> {
        node_processes(&self.node)
    }

    fn log_file(&self) -> PathBuf {
        self.dir
            .path()
            .join("log")
            .join(format!("{}.log", self.node))
    }

    fn config_text(&self) -> String {
        format!(
            "# generated by tests/support/rabbitmq.rs\n\
             listeners.tcp.default = 127.0.0.1:{amqp}\n\
             mqtt.listeners.tcp.default = 127.0.0.1:{mqtt}\n\
             mqtt.allow_anonymous = true\n\
             mqtt.default_user = guest\n\
             mqtt.default_pass = guest\n\
             mqtt.vhost = /\n\
             mqtt.exchange = amq.topic\n\
             web_mqtt.tcp.ip = 127.0.0.1\n\
             web_mqtt.tcp.port = {ws}\n\
             log.file.level = info\n\
             log.console = false\n",
            amqp = self.amqp_port,
            mqtt = self.mqtt_port,
            ws = self.ws_port,
        )
    }

    async fn spawn_and_wait(&mut self, server: &Path) -> Result<(), String> {
        let dir = self.dir.path().to_path_buf();
        let out_path = dir.join("rabbitmq.out");
        let out = File::options()
            .create(true)
            .append(true)
            .open(&out_path)
            .map_err(|e| format!("cannot open {}: {e}", out_path.display()))?;
        let err = out.try_clone().map_err(|e| e.to_string())?;
        let d = |sub: &str| dir.join(sub);
        let spawned_at = Instant::now();
        let child = Command::new(server)
            .current_dir(&dir)
            // The Erlang cookie is read (or created) in $HOME: ours, not root's.
            .env("HOME", d("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_USE_LONGNAME", "false")
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.amqp_port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", d("mnesia"))
            .env("RABBITMQ_LOG_BASE", d("log"))
            .env("RABBITMQ_CONFIG_FILE", d("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d("advanced.config"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d("enabled_plugins"))
            .env("RABBITMQ_CONF_ENV_FILE", d("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d("rabbitmq.pid"))
            // The distribution listener on loopback only, as the system node's env file does.
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env("ERL_CRASH_DUMP", d("erl_crash.dump"))
            .env_remove("ERL_FLAGS")
            .env_remove("RABBITMQ_ENV_LOADED")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", server.display()))?;
        // Kept in self at once, so that even a cancelled start leaves nothing running.
        self.child = Some(child);

        let deadline = spawned_at + START_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("spawned above");
            if let Ok(Some(status)) = child.try_wait() {
                self.child = None;
                return Err(format!("rabbitmq-server exited during the boot: {status}"));
            }
            // The listeners open shortly before the boot completes; wait for both.
            if accepts(self.mqtt_port).await
                && accepts(self.ws_port).await
                && self.log().contains(BOOTED)
            {
                self.started_in = spawned_at.elapsed();
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "not ready after {START_TIMEOUT:?} (MQTT on {}, Web MQTT on {}, \
                     {BOOTED:?} in the log)",
                    self.mqtt_port, self.ws_port
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL to the server script's process group and to every process of the node, then
    /// waits (blocking, at most 10 s) until `ps` shows none of them.
    fn kill_all(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(child.id());
            kill_and_reap(&mut child);
        }
        let deadline = std::time::Instant::now() + KILL_TIMEOUT;
        loop {
            let left = node_processes(&self.node);
            if left.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                eprintln!(
                    "processes of RabbitMQ node {} survived SIGKILL: {left:#?}",
                    self.node
                );
                return;
            }
            for (pid, _) in &left {
                signal(*pid, "KILL");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.kill_all();
        if std::thread::panicking() {
            eprintln!(
                "--- RabbitMQ node {} (last lines of {}) ---\n{}",
                self.node,
                self.log_file().display(),
                tail(&self.log(), 60)
            );
        }
    }
}

async fn accepts(port: u16) -> bool {
    tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_ok()
}

/// SIGKILL to every process of group `pgid` (the server script and the Erlang VM).
fn kill_group(pgid: u32) {
    let _ = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// The processes whose environment names `node` (`RABBITMQ_NODENAME=<node>`), from
/// `ps e` (command line followed by the environment), except epmd: a node that finds no epmd
/// starts one, which other nodes then share, so it is not this node's to kill.
fn node_processes(node: &str) -> Vec<(u32, String)> {
    let out = Command::new("ps")
        .args(["-e", "e", "-ww", "-o", "pid=", "-o", "args="])
        .stderr(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run ps (Debian package procps): {e}"));
    let needle = format!("RABBITMQ_NODENAME={node}");
    let me = std::process::id();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim_start();
            let (pid, args) = line.split_once(' ')?;
            let pid: u32 = pid.parse().ok()?;
            let named = args.split(' ').any(|word| word == needle.as_str());
            let epmd = args
                .split(' ')
                .next()
                .is_some_and(|cmd| cmd.ends_with("/epmd") || cmd == "epmd");
            (named && !epmd && pid != me).then(|| {
                // The command line only: the environment is long and says nothing new.
                let cmd = args
                    .split(" RABBITMQ_")
                    .next()
                    .unwrap_or(args)
                    .chars()
                    .take(200)
                    .collect();
                (pid, cmd)
            })
        })
        .collect()
}

/// `$RABBITMQ_SERVER` if set, else the Debian package's script; panics naming what to install
/// when it, or the `rabbitmq_web_mqtt` plugin beside it, is missing.
fn server_script() -> PathBuf {
    let script = std::env::var_os("RABBITMQ_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEBIAN_SERVER));
    let real = std::fs::canonicalize(&script).unwrap_or_else(|e| {
        panic!(
            "RabbitMQ is needed for this test and {} is missing ({e}): install Debian's \
             rabbitmq-server package (3.10, with the rabbitmq_web_mqtt plugin), or set \
             RABBITMQ_SERVER to a rabbitmq-server script",
            script.display()
        )
    });
    // <home>/sbin/rabbitmq-server → <home>/plugins/rabbitmq_web_mqtt-<version>
    let plugins = real
        .parent()
        .and_then(Path::parent)
        .map(|home| home.join("plugins"))
        .unwrap_or_default();
    let has_plugin = |name: &str| {
        std::fs::read_dir(&plugins).is_ok_and(|entries| {
            entries.filter_map(Result::ok).any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!("{name}-"))
            })
        })
    };
    for plugin in ["rabbitmq_mqtt", "rabbitmq_web_mqtt"] {
        assert!(
            has_plugin(plugin),
            "RabbitMQ's {plugin} plugin is needed for this test and is not in {}",
            plugins.display()
        );
    }
    real
}
