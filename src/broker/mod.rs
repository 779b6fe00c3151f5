//! The embedded MQTT broker: MQTT 3.1, 3.1.1 and 5, QoS 0-2, shared subscriptions (`$share`,
//! BifroMQ's ordered `$oshare`), retained messages, clean and persistent sessions, Receive
//! Maximum honoured both ways. It backs `mqbridge demo` and the fault-injection tests
//! (`Script`), so nothing needs to be installed to see or test the bridge.
//!
//! It is built on ntex-mqtt, which runs on its own single-threaded ntex runtime: each broker
//! runs on a dedicated thread, and this handle talks to it only through a channel (stop),
//! the bound port and the thread-safe `Script` and `BrokerStats`. Nothing here blocks the
//! caller's tokio runtime beyond a thread start.

mod message;
mod mqtt31;
mod retained;
mod script;
mod server;
mod session;
mod state;
mod stats;
mod subscriptions;
mod wire;

use std::{
    cell::RefCell,
    io,
    net::{SocketAddr, TcpListener},
    rc::Rc,
    sync::{Mutex, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::oneshot;

pub use self::script::Script;
pub use self::stats::{BrokerStats, ClientStats, ConnectInfo};

/// How to start an [`EmbeddedBroker`].
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// Where to listen; port 0 picks a free one (see [`EmbeddedBroker::port`]).
    pub addr: SocketAddr,
    /// Names the thread and log lines ("edge", "cloud").
    pub name: String,
    /// Receive Maximum advertised to MQTT 5 clients: the most QoS 1/2 publishes a client may
    /// have unacknowledged towards the broker (the script can override it).
    pub receive_maximum: u16,
    /// Maximum Packet Size advertised to MQTT 5 clients and enforced on every client.
    pub maximum_packet_size: Option<u32>,
    /// The broker's own window: the most QoS 1/2 messages out to one client unacknowledged.
    /// An MQTT 5 client's Receive Maximum lowers it for that client.
    pub outgoing_window: u16,
    /// Bound on one session's queue; beyond it messages for that session are dropped (and
    /// counted in [`ClientStats::dropped`]).
    pub max_queued: usize,
    /// Fault-injection rules; keep a clone to change them while the broker runs.
    pub script: Script,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        BrokerOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            name: "broker".to_string(),
            receive_maximum: 1024,
            maximum_packet_size: None,
            outgoing_window: 32,
            max_queued: 10_000,
            script: Script::default(),
        }
    }
}

impl BrokerOptions {
    /// Defaults with a name.
    pub fn named(name: &str) -> BrokerOptions {
        BrokerOptions {
            name: name.to_string(),
            ..BrokerOptions::default()
        }
    }
}

/// A running broker. Stops when dropped.
#[derive(Debug)]
pub struct EmbeddedBroker {
    name: String,
    addr: SocketAddr,
    script: Script,
    stats: BrokerStats,
    running: Mutex<Option<(oneshot::Sender<()>, JoinHandle<()>)>>,
}

impl EmbeddedBroker {
    /// Binds `options.addr` and starts serving on a thread of its own. Returns once the
    /// broker accepts connections.
    pub fn start(options: BrokerOptions) -> io::Result<EmbeddedBroker> {
        let listener = TcpListener::bind(options.addr)?;
        let addr = listener.local_addr()?;
        let stats = BrokerStats::default();
        let (ready_tx, ready_rx) = mpsc::channel();
        let (stop_tx, stop_rx) = oneshot::channel();
        let limits = state::Limits {
            outgoing_window: options.outgoing_window.max(1),
            max_queued: options.max_queued,
        };
        let advertised = server::Advertised {
            receive_maximum: options.receive_maximum.max(1),
            maximum_packet_size: options.maximum_packet_size,
        };
        let (script, thread_stats, name) =
            (options.script.clone(), stats.clone(), options.name.clone());
        let thread = std::thread::Builder::new()
            .name(format!("mqbroker-{}", options.name))
            .spawn(move || {
                ntex_rt::System::build()
                    .name(&name)
                    .build(ntex_net::DefaultRuntime)
                    .block_on(async move {
                        let state = Rc::new(RefCell::new(state::State::new(
                            limits,
                            script,
                            thread_stats,
                        )));
                        server::serve(listener, state, advertised, ready_tx, stop_rx).await;
                    });
            })?;
        match ready_rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                let _ = thread.join();
                return Err(e);
            }
            Err(_) => {
                return Err(io::Error::other(format!(
                    "embedded broker {:?} did not start",
                    options.name
                )));
            }
        }
        tracing::debug!(broker = %options.name, %addr, "embedded broker listening");
        Ok(EmbeddedBroker {
            name: options.name,
            addr,
            script: options.script,
            stats,
            running: Mutex::new(Some((stop_tx, thread))),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// `mqtt://<addr>`, as a bridge config's `url` wants it.
    pub fn url(&self) -> String {
        format!("mqtt://{}", self.addr)
    }

    /// The fault-injection rules (shared with the broker: changes apply at once).
    pub fn script(&self) -> &Script {
        &self.script
    }

    /// The counters.
    pub fn stats(&self) -> &BrokerStats {
        &self.stats
    }

    /// Closes every connection and stops the broker's thread. Idempotent; sessions and
    /// retained messages are gone afterwards. Waits for the thread, which takes milliseconds.
    pub fn stop(&self) {
        let running = self
            .running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some((stop, thread)) = running {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}

impl Drop for EmbeddedBroker {
    fn drop(&mut self) {
        self.stop();
    }
}
