//! `mqbridge demo`: the bridge end to end with nothing installed. Two embedded brokers ("edge"
//! speaking to the bridge in MQTT 3.1.1, "cloud" in MQTT 5), a real config file loaded like
//! `run` loads one, sample telemetry published on the edge and read back on the cloud, with
//! what arrives and the live rates printed, and a zero-loss check at the end. Both brokers are
//! shaped as BifroMQ by default (`BrokerOptions::bifromq`); a surge above one pair's 200
//! PUBLISH/s shows the pacing and the auto pool at work.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    io::Write,
    path::Path,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rumqttc::v5;
use tokio::{signal::unix::SignalKind, sync::oneshot};

use crate::broker::{BrokerOptions, EmbeddedBroker};

/// What `mqbridge demo` is asked to do.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Stop after this long (then drain and check); `None`: until Ctrl-C / SIGTERM.
    pub duration: Option<Duration>,
    /// Sample messages published per second on the edge.
    pub rate: u32,
    /// Messages per second during the surge (`SURGE_FROM` for `SURGE_FOR`); 0: no surge.
    pub surge: u32,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            duration: None,
            rate: 20,
            surge: 600,
        }
    }
}

/// When the surge starts and how long it lasts: more than one pair carries at the cloud's
/// 200 PUBLISH/s per connection, so the auto pool grows, and shrinks back after.
const SURGE_FROM: Duration = Duration::from_secs(5);
const SURGE_FOR: Duration = Duration::from_secs(10);
/// Edge publishers: each stays under the edge's own 200 PUBLISH/s per connection (BifroMQ
/// discards beyond it) up to 800 msg/s in all.
const PUBLISHERS: u64 = 4;

/// The end of a demo run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Messages the edge broker acknowledged.
    pub sent: u64,
    /// Distinct messages that arrived on the cloud.
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
}

/// The auto pool's bounds.
const POOL_MIN: usize = 1;
const POOL_MAX: usize = 8;
const SUBSCRIBER_FILTER: &str = "sites/demo/+/telemetry/#";
/// How long the end of the run waits for the last messages to cross.
const DRAIN: Duration = Duration::from_secs(10);
/// The sample sensors: edge topic, JSON field, base value, spread.
const SENSORS: [(&str, &str, f64, f64); 4] = [
    ("factory/line1/telemetry/temp", "celsius", 21.5, 1.5),
    ("factory/line1/telemetry/pressure", "hpa", 1013.2, 4.0),
    ("factory/line2/telemetry/temp", "celsius", 23.0, 2.0),
    ("factory/line2/telemetry/vibration", "mm_s", 2.4, 0.8),
];

/// The config the demo runs: a real one, loaded through `config::load_plan`.
fn config_toml(edge: &EmbeddedBroker, cloud: &EmbeddedBroker) -> String {
    format!(
        r#"# Written by `mqbridge demo`: two in-process brokers and one route between them.
[bridge]
name = "demo"
instance = "local"
drain_timeout = "5s"

# Both brokers are shaped as BifroMQ by default: its per-connection quotas, told to the bridge.
[brokers.edge]
url = "{edge}"
protocol = "3.1.1"
keep_alive = "10s"
session_expiry = "1h"
bandwidth_limit = "512KiB/s"
max_filters_per_subscribe = 10

[brokers.cloud]
url = "{cloud}"
protocol = "5"
keep_alive = "10s"
max_publish_rate = 200
bandwidth_limit = "512KiB/s"

[[routes]]
name = "telemetry-up"
from = "edge"
to = "cloud"
topics = ["factory/+/telemetry/#"]
share = "$share"
qos = 1
pool_size = "auto"
pool_size_min = {POOL_MIN}
pool_size_max = {POOL_MAX}

[[routes.rewrite]]
match = "factory/+/telemetry/#"
to = "sites/demo/{{1}}/telemetry/{{2}}"
"#,
        edge = edge.url(),
        cloud = cloud.url(),
    )
}

/// What the sample clients saw, shared by their tasks and the reporting loop.
#[derive(Default)]
struct Tally {
    /// Publishes handed to the edge client.
    published: u64,
    /// Of those, acknowledged by the edge broker.
    acked: u64,
    received: HashSet<u64>,
    duplicates: u64,
    /// Edge topic of every message not yet seen on the cloud, by sequence number.
    pending_topic: HashMap<u64, &'static str>,
    /// When a line was last printed per cloud topic (one per topic per second).
    last_line: HashMap<String, Instant>,
}

struct Shared(Mutex<Tally>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Tally> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs the demo; prints as it goes. Returns the summary (`lost` > 0 is for the caller to
/// turn into a failure).
pub async fn run(options: DemoOptions) -> anyhow::Result<Summary> {
    let edge = EmbeddedBroker::start(BrokerOptions::bifromq("edge"))
        .context("cannot start the edge broker")?;
    let cloud = EmbeddedBroker::start(BrokerOptions::bifromq("cloud"))
        .context("cannot start the cloud broker")?;
    let dir = std::env::temp_dir().join(format!("mqbridge-demo-{}", std::process::id()));
    let result = run_with(&options, &edge, &cloud, &dir).await;
    let _ = std::fs::remove_dir_all(&dir);
    edge.stop();
    cloud.stop();
    result
}

async fn run_with(
    options: &DemoOptions,
    edge: &EmbeddedBroker,
    cloud: &EmbeddedBroker,
    dir: &Path,
) -> anyhow::Result<Summary> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("demo.toml");
    let toml = config_toml(edge, cloud);
    std::fs::write(&path, &toml).with_context(|| format!("cannot write {}", path.display()))?;
    println!("mqbridge demo: two in-process brokers and a bridge between them");
    println!(
        "  edge  broker {}  (the bridge speaks MQTT 3.1.1 to it)",
        edge.addr()
    );
    println!(
        "  cloud broker {}  (the bridge speaks MQTT 5 to it)",
        cloud.addr()
    );
    println!(
        "  both shaped as BifroMQ by default: {}",
        BrokerOptions::bifromq("").describe()
    );
    println!("bridge config ({}):", path.display());
    for line in toml.lines().filter(|l| !l.starts_with('#')) {
        println!("  | {line}");
    }
    let plan = crate::config::load_plan(&path).map_err(|e| anyhow::anyhow!("{e}"))?;

    let shared = Arc::new(Shared(Mutex::new(Tally::default())));
    let viewer = start_viewer(cloud.port(), shared.clone()).await?;
    let (stop_bridge, bridge_stopped) = oneshot::channel::<()>();
    let bridge = tokio::spawn(crate::run::run_until(plan, async move {
        let _ = bridge_stopped.await;
    }));
    wait_for_bridge(edge).await?;
    println!(
        "bridge ready: an auto pool of {POOL_MIN} to {POOL_MAX} pairs shares $share/demo-telemetry-up/factory/+/telemetry/#; publishing {}/s on the edge{}",
        options.rate,
        match options.duration {
            Some(d) => format!(" for {}", humantime::format_duration(d)),
            None => " until Ctrl-C".to_string(),
        }
    );
    if options.surge > 0 {
        println!(
            "surge: {}/s from {}s to {}s, more than one pair carries at 200 PUBLISH/s: watch the pairs",
            options.surge,
            SURGE_FROM.as_secs(),
            (SURGE_FROM + SURGE_FOR).as_secs()
        );
    }
    let _ = std::io::stdout().flush();

    let publishers: Vec<Publisher> = (0..PUBLISHERS)
        .map(|i| Publisher::start(edge.port(), i, shared.clone()))
        .collect();
    let outcome = traffic(
        options,
        &publishers,
        &shared,
        (edge, cloud),
        stop_signal(options.duration),
    )
    .await;

    // Drain: everything the edge acknowledged must cross before the bridge stops.
    let drained = wait(DRAIN, || {
        let t = shared.lock();
        t.acked == t.published && t.received.len() as u64 >= t.acked
    })
    .await;
    let _ = stop_bridge.send(());
    let bridge_result = tokio::time::timeout(Duration::from_secs(20), bridge).await;
    for p in publishers {
        p.stop().await;
    }
    viewer.abort();
    outcome?;
    match bridge_result {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => return Err(e.context("the bridge failed")),
        Ok(Err(e)) => bail!("the bridge task failed: {e}"),
        Err(_) => bail!("the bridge did not stop within 20s"),
    }
    let t = shared.lock();
    let received = t.received.len() as u64;
    let summary = Summary {
        sent: t.acked,
        received,
        lost: t.acked.saturating_sub(received),
        duplicates: t.duplicates,
    };
    println!(
        "summary: sent={} received={} lost={} duplicates={} over_quota={}{}",
        summary.sent,
        summary.received,
        summary.lost,
        summary.duplicates,
        over_quota(cloud),
        if drained { "" } else { " (drain timed out)" }
    );
    Ok(summary)
}

/// PUBLISH packets the cloud discarded over its PUBLISH/s quota (the bridge paces to stay
/// under it: 0).
fn over_quota(cloud: &EmbeddedBroker) -> u64 {
    let stats = cloud.stats();
    stats
        .client_ids()
        .iter()
        .filter_map(|c| stats.client(c))
        .map(|c| c.over_rate)
        .sum()
}

/// Publishes at the configured rate (the surge's during it) and prints a rate line per second,
/// with the bridge's pairs as the edge sees them, until `stop`.
async fn traffic(
    options: &DemoOptions,
    publishers: &[Publisher],
    shared: &Shared,
    (edge, cloud): (&EmbeddedBroker, &EmbeddedBroker),
    stop: impl Future<Output = ()>,
) -> anyhow::Result<()> {
    tokio::pin!(stop);
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut report = tokio::time::interval(Duration::from_secs(1));
    report.tick().await;
    let (mut last_published, mut last_received) = (0u64, 0u64);
    let mut seq = 0u64;
    // Messages due so far (fractional), from the rate in force at each tick.
    let (mut due, mut last_tick) = (0.0f64, started);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tick.tick() => {
                let now = Instant::now();
                let since = now.duration_since(started);
                let surging = options.surge > 0 && since >= SURGE_FROM && since < SURGE_FROM + SURGE_FOR;
                let rate = if surging { options.surge } else { options.rate };
                due += f64::from(rate) * now.duration_since(last_tick).as_secs_f64();
                last_tick = now;
                while due >= 1.0 {
                    publishers[(seq % PUBLISHERS) as usize].publish(seq, shared).await?;
                    seq += 1;
                    due -= 1.0;
                }
            }
            _ = report.tick() => {
                let pairs = pairs_subscribed(edge);
                let t = shared.lock();
                let received = t.received.len() as u64;
                println!(
                    "[{:>3}s] published {}/s  forwarded {}/s  in flight {}  pairs {}  over quota {}  (sent {}, received {})",
                    started.elapsed().as_secs(),
                    t.published - last_published,
                    received - last_received,
                    t.published.saturating_sub(received),
                    pairs,
                    over_quota(cloud),
                    t.acked,
                    received,
                );
                let _ = std::io::stdout().flush();
                (last_published, last_received) = (t.published, received);
            }
        }
    }
}

/// Completes after `duration`, or on SIGINT/SIGTERM when there is none.
async fn stop_signal(duration: Option<Duration>) {
    if let Some(d) = duration {
        tokio::time::sleep(d).await;
        return;
    }
    let int = tokio::signal::unix::signal(SignalKind::interrupt());
    let term = tokio::signal::unix::signal(SignalKind::terminate());
    match (int, term) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    println!();
}

/// Polls `condition` every 20 ms for at most `timeout`.
async fn wait(timeout: Duration, condition: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// The bridge's pairs subscribed on the edge (an auto pool's parked pairs unsubscribe).
fn pairs_subscribed(edge: &EmbeddedBroker) -> usize {
    edge.stats()
        .subscriptions()
        .iter()
        .filter(|(_, f)| f.starts_with("$share/"))
        .count()
}

/// Waits until the pool's first pairs have their shared subscription on the edge (so nothing
/// published from now on finds no subscriber).
async fn wait_for_bridge(edge: &EmbeddedBroker) -> anyhow::Result<()> {
    let ready = wait(Duration::from_secs(15), || {
        pairs_subscribed(edge) >= POOL_MIN
    })
    .await;
    if !ready {
        bail!("the bridge did not subscribe on the edge broker within 15s");
    }
    Ok(())
}

/// The edge-side sample sensors: one MQTT 3.1.1 client publishing QoS 1.
struct Publisher {
    client: rumqttc::AsyncClient,
    task: tokio::task::JoinHandle<()>,
    /// Set before the DISCONNECT, so the connection closing is not reported as an error.
    stopping: Arc<AtomicBool>,
}

impl Publisher {
    fn start(port: u16, index: u64, shared: Arc<Shared>) -> Publisher {
        let id = format!("demo-edge-sensors-{index}");
        let mut options = rumqttc::MqttOptions::new(id, "127.0.0.1", port);
        options
            .set_keep_alive(Duration::from_secs(10))
            .set_inflight(100);
        let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 100);
        let stopping = Arc::new(AtomicBool::new(false));
        let quiet = stopping.clone();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_))) => {
                        shared.lock().acked += 1;
                    }
                    Ok(_) => {}
                    Err(_) if quiet.load(Ordering::SeqCst) => break,
                    Err(e) => {
                        eprintln!("demo: edge publisher: {e}");
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
            }
        });
        Publisher {
            client,
            task,
            stopping,
        }
    }

    async fn publish(&self, seq: u64, shared: &Shared) -> anyhow::Result<()> {
        let (topic, field, base, spread) = SENSORS[(seq % SENSORS.len() as u64) as usize];
        // A slow wobble around the base value: readable numbers, no randomness needed.
        let value = base + spread * ((seq as f64) * 0.37).sin();
        let payload = format!("{{\"seq\":{seq},\"{field}\":{value:.1}}}");
        {
            let mut t = shared.lock();
            t.published += 1;
            t.pending_topic.insert(seq, topic);
        }
        self.client
            .publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
            .await
            .context("the edge publisher stopped")
    }

    async fn stop(self) {
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.client.disconnect().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.task.abort();
    }
}

/// The cloud-side viewer: an MQTT 5 client subscribed to the rewritten topics. Prints what
/// arrives (one line per topic per second at most) and records it for the rates and the
/// zero-loss check.
async fn start_viewer(
    port: u16,
    shared: Arc<Shared>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut options = v5::MqttOptions::new("demo-cloud-viewer", "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut eventloop) = v5::AsyncClient::new(options, 100);
    client
        .subscribe(SUBSCRIBER_FILTER, v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .context("the cloud viewer cannot subscribe")?;
    let (subscribed_tx, subscribed_rx) = oneshot::channel();
    let task = tokio::spawn(async move {
        let _client = client;
        let mut subscribed = Some(subscribed_tx);
        loop {
            match eventloop.poll().await {
                Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::SubAck(_))) => {
                    if let Some(tx) = subscribed.take() {
                        let _ = tx.send(());
                    }
                }
                Ok(v5::Event::Incoming(v5::mqttbytes::v5::Packet::Publish(p))) => {
                    let topic = String::from_utf8_lossy(&p.topic).into_owned();
                    let payload = String::from_utf8_lossy(&p.payload).into_owned();
                    arrived(&shared, topic, payload);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("demo: cloud viewer: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    });
    tokio::time::timeout(Duration::from_secs(10), subscribed_rx)
        .await
        .context("the cloud viewer got no SUBACK within 10s")?
        .ok();
    Ok(task)
}

fn arrived(shared: &Shared, topic: String, payload: String) {
    let Some(seq) = sequence_number(&payload) else {
        return;
    };
    let mut t = shared.lock();
    if !t.received.insert(seq) {
        t.duplicates += 1;
        return;
    }
    let edge_topic = t.pending_topic.remove(&seq).unwrap_or("?");
    let now = Instant::now();
    let due = t
        .last_line
        .get(&topic)
        .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(1));
    if due {
        println!("  edge {edge_topic} -> cloud {topic}  {payload}");
        t.last_line.insert(topic, now);
    }
}

/// The `"seq"` of a sample payload (`{"seq":12,...}`).
fn sequence_number(payload: &str) -> Option<u64> {
    let rest = payload.strip_prefix("{\"seq\":")?;
    let end = rest.find(|c: char| !c.is_ascii_digit())?;
    rest[..end].parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_sequence_numbers() {
        assert_eq!(sequence_number("{\"seq\":42,\"celsius\":21.5}"), Some(42));
        assert_eq!(sequence_number("{\"x\":1}"), None);
    }
}
