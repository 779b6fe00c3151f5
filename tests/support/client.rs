//! Real MQTT clients (rumqttc) in either protocol: a `Collector` that records everything its
//! filters receive, and a `Publisher` that keeps at most `PUBLISH_WINDOW` QoS 1/2 messages in
//! flight and counts the acknowledgements, so "published" means "the broker took it".

use super::ids::numbered_payload;
use bytes::Bytes;
use rumqttc::v5;
use rumqttc::v5::mqttbytes::v5 as packet5;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The most QoS 1/2 messages a `Publisher` has unacknowledged. mosquitto 2.0 acknowledges and
/// then silently drops QoS 2 publishes beyond its window of 20, so never more.
pub const PUBLISH_WINDOW: u16 = 20;

const MAX_PACKET: usize = 64 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a publisher waits without any ack before it gives up.
const ACK_PROGRESS_TIMEOUT: Duration = Duration::from_secs(30);

static NEXT_CLIENT: AtomicU32 = AtomicU32::new(0);

/// The protocol a test client speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    V311,
    V5,
}

impl Proto {
    pub const ALL: [Proto; 2] = [Proto::V311, Proto::V5];

    /// The spelling of a bridge config's `protocol` key.
    pub fn as_config(self) -> &'static str {
        match self {
            Proto::V311 => "3.1.1",
            Proto::V5 => "5",
        }
    }
}

/// One PUBLISH a `Collector` received.
#[derive(Clone, Debug)]
pub struct Received {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub dup: bool,
    /// MQTT 5 only; empty otherwise.
    pub user_properties: Vec<(String, String)>,
    /// MQTT 5 only: all publish properties as received.
    pub properties: Option<packet5::PublishProperties>,
    pub at: Instant,
}

impl Received {
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }

    /// The values of user property `key`, in order.
    pub fn user_property(&self, key: &str) -> Vec<&str> {
        self.user_properties
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

fn client_id(role: &str) -> String {
    // Short enough for MQTT 3.1's 23 characters, unique across concurrent test processes.
    let n = NEXT_CLIENT.fetch_add(1, Ordering::Relaxed);
    format!("t{role}{}-{n}", std::process::id() % 100_000)
}

fn qos4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        2 => rumqttc::QoS::ExactlyOnce,
        _ => panic!("QoS {qos} does not exist"),
    }
}

fn qos5(qos: u8) -> v5::mqttbytes::QoS {
    match qos {
        0 => v5::mqttbytes::QoS::AtMostOnce,
        1 => v5::mqttbytes::QoS::AtLeastOnce,
        2 => v5::mqttbytes::QoS::ExactlyOnce,
        _ => panic!("QoS {qos} does not exist"),
    }
}

/// How a client connects: a fresh clean session, or a persistent one under a fixed client id.
#[derive(Clone, Debug)]
enum Session {
    Clean(&'static str),
    Persistent(String),
}

impl Session {
    fn client_id(&self) -> String {
        match self {
            Session::Clean(role) => client_id(role),
            Session::Persistent(id) => id.clone(),
        }
    }

    fn clean(&self) -> bool {
        matches!(self, Session::Clean(_))
    }
}

fn options4(session: &Session, port: u16) -> rumqttc::MqttOptions {
    let mut options = rumqttc::MqttOptions::new(session.client_id(), "127.0.0.1", port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_session(session.clean())
        .set_inflight(PUBLISH_WINDOW)
        .set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options
}

fn options5(session: &Session, port: u16) -> v5::MqttOptions {
    let mut options = v5::MqttOptions::new(session.client_id(), "127.0.0.1", port);
    if !session.clean() {
        options.set_session_expiry_interval(Some(3600));
    }
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_clean_start(session.clean())
        .set_outgoing_inflight_upper_limit(PUBLISH_WINDOW)
        .set_max_packet_size(Some(MAX_PACKET as u32));
    options
}

/// State shared between a client handle and the task polling its event loop.
#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    connacks: AtomicUsize,
    subacks: AtomicUsize,
    /// QoS 1/2 publishes completed: PUBACK, PUBCOMP, or a refusing PUBREC.
    acked: AtomicU64,
    /// Acks carrying an MQTT 5 reason code >= 0x80.
    refused: AtomicU64,
    /// PUBLISH packets handed to the socket.
    written: AtomicU64,
    stopping: AtomicBool,
    finished: AtomicBool,
    /// A failure the test should hear about (refused SUBACK/CONNACK).
    fatal: Mutex<Option<String>>,
    last_error: Mutex<Option<String>>,
    notify: Notify,
}

impl Shared {
    fn bump(&self) {
        self.notify.notify_waiters();
    }

    fn fail(&self, why: String) {
        *self.fatal.lock().unwrap() = Some(why);
        self.bump();
    }

    fn connection_error(&self, error: String) {
        *self.last_error.lock().unwrap() = Some(error);
        self.bump();
    }

    fn record(&self, received: Received) {
        self.received.lock().unwrap().push(received);
        self.bump();
    }

    fn errors(&self) -> String {
        format!(
            "fatal: {:?}, last connection error: {:?}",
            self.fatal.lock().unwrap(),
            self.last_error.lock().unwrap()
        )
    }

    /// Waits until `condition` holds (true) or `timeout` passes (false), waking on every event.
    async fn wait(&self, timeout: Duration, condition: impl Fn(&Shared) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if condition(self) {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return condition(self);
            }
        }
    }
}

/// Polls a v3.1.1 event loop until the handle goes away, feeding `shared`.
async fn drive4(
    mut eventloop: rumqttc::EventLoop,
    client: rumqttc::AsyncClient,
    filters: Vec<(String, u8)>,
    shared: Arc<Shared>,
) {
    use rumqttc::{Event, Outgoing, Packet};
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                shared.connacks.fetch_add(1, Ordering::SeqCst);
                // A clean session forgets subscriptions: subscribe on every (re)connection.
                if !filters.is_empty() {
                    let subs = filters
                        .iter()
                        .map(|(f, q)| rumqttc::SubscribeFilter::new(f.clone(), qos4(*q)));
                    if let Err(e) = client.try_subscribe_many(subs) {
                        shared.fail(format!("cannot subscribe: {e}"));
                    }
                }
                shared.bump();
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                if refused {
                    shared.fail(format!("SUBACK refused {filters:?}: {ack:?}"));
                } else {
                    shared.subacks.fetch_add(1, Ordering::SeqCst);
                    shared.bump();
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => shared.record(Received {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos as u8,
                retain: p.retain,
                dup: p.dup,
                user_properties: Vec::new(),
                properties: None,
                at: Instant::now(),
            }),
            Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => {
                shared.acked.fetch_add(1, Ordering::SeqCst);
                shared.bump();
            }
            Ok(Event::Outgoing(Outgoing::Publish(_))) => {
                shared.written.fetch_add(1, Ordering::SeqCst);
                shared.bump();
            }
            Ok(_) => {}
            Err(e) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                shared.connection_error(e.to_string());
                // The next poll reconnects; don't spin while the broker is away.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    shared.finished.store(true, Ordering::SeqCst);
    shared.bump();
}

/// Polls an MQTT 5 event loop until the handle goes away, feeding `shared`.
async fn drive5(
    mut eventloop: v5::EventLoop,
    client: v5::AsyncClient,
    filters: Vec<(String, u8)>,
    shared: Arc<Shared>,
) {
    use packet5::{ConnectReturnCode, Packet, PubAckReason, PubRecReason, SubscribeReasonCode};
    use v5::Event;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                if ack.code != ConnectReturnCode::Success {
                    shared.fail(format!("CONNACK refused: {ack:?}"));
                    continue;
                }
                shared.connacks.fetch_add(1, Ordering::SeqCst);
                if !filters.is_empty() {
                    // Retain As Published, so tests see the retain flag a publisher (or the
                    // bridge) set, not the broker's "live message" zero.
                    let subs = filters.iter().map(|(f, q)| {
                        let mut filter = packet5::Filter::new(f.clone(), qos5(*q));
                        filter.preserve_retain = true;
                        filter
                    });
                    if let Err(e) = client.try_subscribe_many(subs) {
                        shared.fail(format!("cannot subscribe: {e}"));
                    }
                }
                shared.bump();
            }
            Ok(Event::Incoming(Packet::SubAck(ack))) => {
                let refused = ack
                    .return_codes
                    .iter()
                    .any(|c| !matches!(c, SubscribeReasonCode::Success(_)));
                if refused {
                    shared.fail(format!("SUBACK refused {filters:?}: {ack:?}"));
                } else {
                    shared.subacks.fetch_add(1, Ordering::SeqCst);
                    shared.bump();
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let user_properties = p
                    .properties
                    .as_ref()
                    .map(|props| props.user_properties.clone())
                    .unwrap_or_default();
                shared.record(Received {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload,
                    qos: p.qos as u8,
                    retain: p.retain,
                    dup: p.dup,
                    user_properties,
                    properties: p.properties,
                    at: Instant::now(),
                })
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if !matches!(
                    ack.reason,
                    PubAckReason::Success | PubAckReason::NoMatchingSubscribers
                ) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                }
                shared.acked.fetch_add(1, Ordering::SeqCst);
                shared.bump();
            }
            Ok(Event::Incoming(Packet::PubRec(rec))) => {
                // A refusing PUBREC ends the exchange: no PUBREL, no PUBCOMP.
                if !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ) {
                    shared.refused.fetch_add(1, Ordering::SeqCst);
                    shared.acked.fetch_add(1, Ordering::SeqCst);
                    shared.bump();
                }
            }
            Ok(Event::Incoming(Packet::PubComp(_))) => {
                shared.acked.fetch_add(1, Ordering::SeqCst);
                shared.bump();
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Publish(_))) => {
                shared.written.fetch_add(1, Ordering::SeqCst);
                shared.bump();
            }
            Ok(_) => {}
            Err(e) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    break;
                }
                shared.connection_error(e.to_string());
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    shared.finished.store(true, Ordering::SeqCst);
    shared.bump();
}

enum AnyClient {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

impl AnyClient {
    /// Connects and spawns the event loop; subscribes `filters` on every connection.
    fn spawn(
        port: u16,
        proto: Proto,
        session: &Session,
        filters: Vec<(String, u8)>,
        shared: Arc<Shared>,
    ) -> (AnyClient, JoinHandle<()>) {
        match proto {
            Proto::V311 => {
                let (client, eventloop) = rumqttc::AsyncClient::new(options4(session, port), 64);
                let task = tokio::spawn(drive4(eventloop, client.clone(), filters, shared));
                (AnyClient::V4(client), task)
            }
            Proto::V5 => {
                let (client, eventloop) = v5::AsyncClient::new(options5(session, port), 64);
                let task = tokio::spawn(drive5(eventloop, client.clone(), filters, shared));
                (AnyClient::V5(client), task)
            }
        }
    }

    async fn disconnect(&self) {
        let _ = match self {
            AnyClient::V4(c) => c.disconnect().await.map_err(|e| e.to_string()),
            AnyClient::V5(c) => c.disconnect().await.map_err(|e| e.to_string()),
        };
    }
}

/// A subscriber on 127.0.0.1 that records every PUBLISH it gets (a clean session unless made
/// with [`Collector::start_persistent`]). It resubscribes by itself after the broker restarts
/// (see [`Collector::wait_for_subacks`]).
pub struct Collector {
    proto: Proto,
    shared: Arc<Shared>,
    client: AnyClient,
    task: JoinHandle<()>,
}

impl Collector {
    /// Subscribes `filter` at `qos` and returns once the SUBACK is in, so everything published
    /// afterwards is seen. Panics if the broker refuses or nothing answers within 10 s.
    pub async fn start(port: u16, proto: Proto, filter: &str, qos: u8) -> Collector {
        Collector::start_many(port, proto, &[(filter, qos)]).await
    }

    /// As [`Collector::start`], with several filters in one SUBSCRIBE.
    pub async fn start_many(port: u16, proto: Proto, filters: &[(&str, u8)]) -> Collector {
        Collector::connect(port, proto, Session::Clean("c"), filters).await
    }

    /// A subscriber with a persistent session under `client_id` (v5: Session Expiry 1 h). After
    /// [`Collector::disconnect`], starting one with the same id receives what the broker queued
    /// meanwhile (mosquitto here queues up to a million messages per session).
    pub async fn start_persistent(
        port: u16,
        proto: Proto,
        client_id: &str,
        filters: &[(&str, u8)],
    ) -> Collector {
        let session = Session::Persistent(client_id.to_string());
        Collector::connect(port, proto, session, filters).await
    }

    async fn connect(
        port: u16,
        proto: Proto,
        session: Session,
        filters: &[(&str, u8)],
    ) -> Collector {
        let shared = Arc::new(Shared::default());
        let filters: Vec<(String, u8)> = filters.iter().map(|(f, q)| (f.to_string(), *q)).collect();
        let (client, task) =
            AnyClient::spawn(port, proto, &session, filters.clone(), shared.clone());
        let collector = Collector {
            proto,
            shared,
            client,
            task,
        };
        let subscribed = collector
            .shared
            .wait(CONNECT_TIMEOUT, |s| {
                s.subacks.load(Ordering::SeqCst) > 0 || s.fatal.lock().unwrap().is_some()
            })
            .await;
        if !subscribed || collector.shared.fatal.lock().unwrap().is_some() {
            panic!(
                "collector on 127.0.0.1:{port} ({proto:?}) could not subscribe {filters:?}: {}",
                collector.shared.errors()
            );
        }
        collector
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// A copy of everything received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.shared.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.shared.received.lock().unwrap().len()
    }

    /// Forgets what was received so far.
    pub fn clear(&self) {
        self.shared.received.lock().unwrap().clear();
    }

    /// Successful SUBACKs so far: 1 after `start`, one more after each reconnection.
    pub fn suback_count(&self) -> usize {
        self.shared.subacks.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` messages have arrived.
    pub async fn wait_for_count(&self, n: usize, timeout: Duration) -> bool {
        self.wait_for(timeout, |received| received.len() >= n).await
    }

    /// Waits until `condition` holds for everything received so far.
    pub async fn wait_for(
        &self,
        timeout: Duration,
        condition: impl Fn(&[Received]) -> bool,
    ) -> bool {
        self.shared
            .wait(timeout, |s| condition(&s.received.lock().unwrap()))
            .await
    }

    /// Waits until the subscription is re-established after a reconnection (`n` SUBACKs in all).
    pub async fn wait_for_subacks(&self, n: usize, timeout: Duration) -> bool {
        self.shared
            .wait(timeout, |s| s.subacks.load(Ordering::SeqCst) >= n)
            .await
    }

    /// Waits until nothing new has arrived for `quiet` (at most `max` in all), to let late
    /// duplicates show up before an exactly-once assertion. Returns the count then.
    pub async fn settle(&self, quiet: Duration, max: Duration) -> usize {
        let deadline = Instant::now() + max;
        let mut last = self.count();
        loop {
            let now = Instant::now();
            if now >= deadline {
                return last;
            }
            let until = (now + quiet).min(deadline);
            let grew = self
                .shared
                .wait(until - now, |s| s.received.lock().unwrap().len() != last)
                .await;
            if !grew {
                return self.count();
            }
            last = self.count();
        }
    }

    /// Sends DISCONNECT and waits (up to 5 s) for the connection to close.
    pub async fn disconnect(self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.client.disconnect().await;
        self.shared
            .wait(Duration::from_secs(5), |s| {
                s.finished.load(Ordering::SeqCst)
            })
            .await;
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A clean-session publisher on 127.0.0.1 with its own flow control: at most
/// [`PUBLISH_WINDOW`] QoS 1/2 messages unacknowledged (QoS 2 counts until PUBCOMP).
pub struct Publisher {
    port: u16,
    proto: Proto,
    shared: Arc<Shared>,
    client: AnyClient,
    task: JoinHandle<()>,
    /// QoS 1/2 publishes handed to the client.
    sent_acked: u64,
    /// All publishes handed to the client.
    sent_total: u64,
}

impl Publisher {
    /// Connects and waits for the CONNACK (panics after 10 s).
    pub async fn connect(port: u16, proto: Proto) -> Publisher {
        let shared = Arc::new(Shared::default());
        let (client, task) = AnyClient::spawn(
            port,
            proto,
            &Session::Clean("p"),
            Vec::new(),
            shared.clone(),
        );
        let publisher = Publisher {
            port,
            proto,
            shared,
            client,
            task,
            sent_acked: 0,
            sent_total: 0,
        };
        let connected = publisher
            .shared
            .wait(CONNECT_TIMEOUT, |s| {
                s.connacks.load(Ordering::SeqCst) > 0 || s.fatal.lock().unwrap().is_some()
            })
            .await;
        if !connected || publisher.shared.fatal.lock().unwrap().is_some() {
            panic!(
                "publisher could not connect to 127.0.0.1:{port} ({proto:?}): {}",
                publisher.shared.errors()
            );
        }
        publisher
    }

    pub fn proto(&self) -> Proto {
        self.proto
    }

    /// QoS 1/2 publishes acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.shared.acked.load(Ordering::SeqCst)
    }

    /// Acks with an MQTT 5 reason code >= 0x80 so far (the broker refused the message).
    pub fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::SeqCst)
    }

    /// Publishes one message, first waiting for room in the window.
    pub async fn publish(&mut self, topic: &str, qos: u8, retain: bool, payload: impl Into<Bytes>) {
        self.send(topic, qos, retain, payload.into(), None).await;
    }

    /// MQTT 5 only: publishes with `properties` (user properties, message expiry, …).
    pub async fn publish_v5(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: impl Into<Bytes>,
        properties: packet5::PublishProperties,
    ) {
        assert_eq!(self.proto, Proto::V5, "publish properties need MQTT 5");
        self.send(topic, qos, retain, payload.into(), Some(properties))
            .await;
    }

    /// Publishes ids `start..start + count` with payload `"{prefix}-{id}"` on `topic(id)`, one
    /// every `pace` if given. Returns after handing the last one over: see
    /// [`Publisher::wait_acked`].
    pub async fn publish_numbered(
        &mut self,
        topic: impl Fn(u32) -> String,
        qos: u8,
        start: u32,
        count: u32,
        prefix: &str,
        pace: Option<Duration>,
    ) {
        let mut ticker = pace.map(|p| {
            let mut t = tokio::time::interval(p);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        });
        for id in start..start + count {
            if let Some(t) = ticker.as_mut() {
                t.tick().await;
            }
            self.publish(&topic(id), qos, false, numbered_payload(prefix, id))
                .await;
        }
    }

    /// Waits until every QoS 1/2 publish so far is acknowledged and every publish was written
    /// to the socket.
    pub async fn wait_acked(&self, timeout: Duration) -> bool {
        let (acked, total) = (self.sent_acked, self.sent_total);
        self.shared
            .wait(timeout, |s| {
                s.acked.load(Ordering::SeqCst) >= acked && s.written.load(Ordering::SeqCst) >= total
            })
            .await
    }

    /// Sends DISCONNECT after everything queued, and waits (up to 5 s) for the connection to
    /// close, so QoS 0 messages are on the wire before this returns.
    pub async fn disconnect(self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        self.client.disconnect().await;
        self.shared
            .wait(Duration::from_secs(5), |s| {
                s.finished.load(Ordering::SeqCst)
            })
            .await;
    }

    async fn send(
        &mut self,
        topic: &str,
        qos: u8,
        retain: bool,
        payload: Bytes,
        properties: Option<packet5::PublishProperties>,
    ) {
        if qos > 0 {
            self.wait_for_window().await;
            self.sent_acked += 1;
        }
        self.sent_total += 1;
        let result = match (&self.client, properties) {
            (AnyClient::V4(c), _) => c
                .publish_bytes(topic, qos4(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
            (AnyClient::V5(c), None) => c
                .publish(topic, qos5(qos), retain, payload)
                .await
                .map_err(|e| e.to_string()),
            (AnyClient::V5(c), Some(p)) => c
                .publish_with_properties(topic, qos5(qos), retain, payload, p)
                .await
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = result {
            panic!(
                "publish on {topic:?} to 127.0.0.1:{} failed: {e}",
                self.port
            );
        }
    }

    async fn wait_for_window(&self) {
        let window = u64::from(PUBLISH_WINDOW);
        let sent = self.sent_acked;
        let room = self
            .shared
            .wait(ACK_PROGRESS_TIMEOUT, |s| {
                sent - s.acked.load(Ordering::SeqCst).min(sent) < window
            })
            .await;
        if !room {
            panic!(
                "no ack from 127.0.0.1:{} for {ACK_PROGRESS_TIMEOUT:?} ({} of {sent} acked): {}",
                self.port,
                self.acked(),
                self.shared.errors()
            );
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Connects, publishes ids `start..start + count` as `"{prefix}-{id}"` on `topic(id)`, waits
/// until the broker acknowledged every QoS 1/2 message (at most [`PUBLISH_WINDOW`] in flight),
/// and disconnects. Panics if the acks do not come.
pub async fn publish_numbered(
    port: u16,
    proto: Proto,
    topic: impl Fn(u32) -> String,
    qos: u8,
    start: u32,
    count: u32,
    prefix: &str,
) {
    publish_numbered_inner(port, proto, topic, qos, start, count, prefix, None).await;
}

/// As [`publish_numbered`], one message every `pace` (for QoS 0 at a moderate rate).
#[allow(clippy::too_many_arguments)]
pub async fn publish_numbered_paced(
    port: u16,
    proto: Proto,
    topic: impl Fn(u32) -> String,
    qos: u8,
    start: u32,
    count: u32,
    prefix: &str,
    pace: Duration,
) {
    publish_numbered_inner(port, proto, topic, qos, start, count, prefix, Some(pace)).await;
}

#[allow(clippy::too_many_arguments)]
async fn publish_numbered_inner(
    port: u16,
    proto: Proto,
    topic: impl Fn(u32) -> String,
    qos: u8,
    start: u32,
    count: u32,
    prefix: &str,
    pace: Option<Duration>,
) {
    let mut publisher = Publisher::connect(port, proto).await;
    publisher
        .publish_numbered(topic, qos, start, count, prefix, pace)
        .await;
    let timeout = ACK_PROGRESS_TIMEOUT + Duration::from_millis(u64::from(count));
    if !publisher.wait_acked(timeout).await {
        panic!(
            "127.0.0.1:{port} acknowledged {} of {} {prefix:?} publishes: {}",
            publisher.acked(),
            publisher.sent_acked,
            publisher.shared.errors()
        );
    }
    publisher.disconnect().await;
}

/// Connects, publishes one message, waits for its ack (QoS 1/2), and disconnects.
pub async fn publish_one(
    port: u16,
    proto: Proto,
    topic: &str,
    qos: u8,
    retain: bool,
    payload: impl Into<Bytes>,
) {
    let mut publisher = Publisher::connect(port, proto).await;
    publisher.publish(topic, qos, retain, payload).await;
    if !publisher.wait_acked(ACK_PROGRESS_TIMEOUT).await {
        panic!(
            "127.0.0.1:{port} did not acknowledge the publish on {topic:?}: {}",
            publisher.shared.errors()
        );
    }
    publisher.disconnect().await;
}
