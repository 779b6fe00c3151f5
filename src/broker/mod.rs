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
mod quotas;
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

pub use self::quotas::Quotas;
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
    /// Per-connection quotas (rates, filters per SUBSCRIBE, shared group size), enforced as
    /// BifroMQ enforces them (see [`Quotas`]). Default: none.
    pub quotas: Quotas,
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
            quotas: Quotas::default(),
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

    /// Shaped as BifroMQ by default, for both roles: 200 PUBLISH/s and 512 KiB/s each way per
    /// connection, Receive Maximum 200, 10 filters per SUBSCRIBE, 200 members per shared
    /// group, a session inbox of 1,000 that drops beyond it, and no window of its own towards
    /// clients (BifroMQ sends MQTT 3.x subscribers as much as their inbox holds; MQTT 5 ones
    /// their Receive Maximum).
    pub fn bifromq(name: &str) -> BrokerOptions {
        BrokerOptions {
            name: name.to_string(),
            receive_maximum: 200,
            outgoing_window: u16::MAX,
            max_queued: 1_000,
            quotas: Quotas::BIFROMQ,
            ..BrokerOptions::default()
        }
    }

    /// The limits in force, for people ("200 PUBLISH/s in, 512 KiB/s each way, …").
    pub fn describe(&self) -> String {
        let q = &self.quotas;
        let mut parts = Vec::new();
        if let Some(r) = q.publish_rate {
            parts.push(format!("{r} PUBLISH/s in"));
        }
        match (q.inbound_bytes, q.outbound_bytes) {
            (Some(i), Some(o)) if i == o => parts.push(format!("{} KiB/s each way", i / 1024)),
            (i, o) => {
                parts.extend(i.map(|i| format!("{} KiB/s in", i / 1024)));
                parts.extend(o.map(|o| format!("{} KiB/s out", o / 1024)));
            }
        }
        parts.push(format!("Receive Maximum {}", self.receive_maximum));
        parts.push(format!("inbox {}", self.max_queued));
        if let Some(f) = q.max_filters_per_subscribe {
            parts.push(format!("{f} filters per SUBSCRIBE"));
        }
        if let Some(m) = q.max_shared_group_members {
            parts.push(format!("{m} members per shared group"));
        }
        parts.join(", ")
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
            quotas: options.quotas,
            started: std::time::Instant::now(),
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
                        let state = Rc::new_cyclic(|me| {
                            RefCell::new(state::State::new(
                                limits,
                                script,
                                thread_stats,
                                me.clone(),
                            ))
                        });
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
