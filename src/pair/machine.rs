//! The pair's whole protocol state as one pure machine (sans-IO, in the manner of quinn-proto's
//! `Connection`): both sides' sessions, subscriptions, packet ids, the window, keep-alive,
//! reconnect and retry deadlines, parking and retirement, dead letters, and read admission. It
//! never touches a socket or a clock: every call takes `now`, bytes come in through
//! [`Machine::recv_buf`] / [`Machine::handle_read`], go out through [`Machine::transmit`] /
//! [`Machine::written`], and what only the I/O layer can do (open or close a connection, raise
//! a socket's wake-up mark) comes out of [`Machine::poll_event`]. `driver` runs it over sockets.
//!
//! Backpressure: [`Machine::read_room`] lets the source be read only while the window can take
//! another message and the target's write buffer is below its bounds, so a slow target leaves
//! messages in the source broker.

use std::{
    collections::VecDeque,
    sync::{Arc, atomic::Ordering::Relaxed},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use tracing::{debug, error, info, warn};

use super::{
    PairSpec,
    ack_hold::AckHold,
    dead_letter::{self, DeadLetter, DeadLetters},
    linger,
    pacing::Pacer,
    share_probe::{self, ShareProbe},
    stats::PairStats,
    window::{Action, Counters, SourceAck, Unsent, Window},
};
use crate::{
    config::{BrokerPlan, PropertiesMode, Protocol, Qos, RetainMode, Share},
    link::{self, Codec, ConnAckInfo, ConnectParams, Inbound, InboundPublish},
    loops::marker,
    message::Message,
};

/// Stop decoding source packets while the target's unwritten bytes exceed this.
const TARGET_WBUF_HIGH: usize = 1024 * 1024;
/// Write the target before reading more from the source once this much waits for it: a burst
/// then flows on a chunk at a time instead of being read whole first (less latency, and the
/// target broker starts on it sooner).
const TARGET_WRITE_FIRST: usize = READ_CHUNK;
/// Stop reading the source socket while this many undecoded bytes wait.
const SOURCE_RBUF_HIGH: usize = 256 * 1024;
/// `ACK_BATCH` acks on the wire: PUBACK, PUBREC and PUBCOMP are 4 bytes (a longer v5 ack only
/// makes the mark come sooner).
const ACK_BATCH_BYTES: i32 = 4 * linger::ACK_BATCH as i32;
/// Room made in a read buffer before each read, so that one read takes in a whole burst.
const READ_CHUNK: usize = 64 * 1024;
/// While an oversize PUBLISH is skipped, a read this large shows the source alive (a PINGRESP
/// hidden in the skipped bytes cannot).
const SKIP_ALIVE_BYTES: usize = 1024;
/// The smallest read of a source whose bytes are paced (`bandwidth_limit`).
const MIN_PACED_READ: usize = 4096;
pub const BACKOFF_MIN: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// The pause after a "not now" ack (0x97 quota exceeded, 0x91 packet id in use), doubling up
/// to the maximum while they keep coming, back to the minimum after an accepted one.
const RETRY_BACKOFF_MIN: Duration = Duration::from_millis(100);
const RETRY_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// As long as a CONNACK may take.
pub const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection that lasted this long was healthy: the next reconnect starts from `BACKOFF_MIN`.
const HEALTHY_AFTER: Duration = Duration::from_secs(10);
/// Target connections in a row that ended with our messages on the wire and not one ack: the
/// oldest of them is taken for the cause (a broker that closes the connection on a message it
/// cannot take, e.g. one over a 3.x broker's packet size limit, which 3.x cannot announce).
pub const POISON_AFTER: u32 = 5;
/// A close counts against the message only this soon after a PUBLISH was written: a broker that
/// chokes on a packet closes as it reads it, not a minute later (a proxy's idle timeout).
const POISON_CLOSE_WITHIN: Duration = Duration::from_secs(5);
/// Connections in a row that the broker closed this soon after accepting them look like
/// another client taking the session over (two processes with one client id).
const TAKEOVER_WITHIN: Duration = Duration::from_secs(5);
/// How many such closes in a row before the pair says so (and again every `TAKEOVER_AFTER`).
pub const TAKEOVER_AFTER: u32 = 3;
/// A parking pair leaves once nothing arrived for this long.
pub const PARK_QUIET: Duration = Duration::from_millis(500);
const UNSUBSCRIBE_PKID: u16 = 900;
/// The machine wakes at least this often (stats, the pool's controller).
const IDLE_TICK: Duration = Duration::from_secs(1);
/// What an MQTT 3.x source lets us have in flight, as far as we can tell: it cannot say, and
/// mosquitto's default (`max_inflight_messages`) is 20. Bounds the acks held back from it.
pub const MQTT3_SOURCE_WINDOW: usize = 20;
/// How long a publish may stay unacknowledged while the target acknowledges ones written after
/// it before the pair takes it for dropped and reconnects to send it again (see `skipped_since`).
pub const SKIPPED_ACK_GRACE: Duration = Duration::from_secs(10);
/// How long a connected target (its keep-alive answered) may acknowledge nothing while
/// publishes wait for their acks before the pair takes them for dropped and reconnects to send
/// them again, at least. A slow target still acknowledges something now and then (a throttled
/// one, tens a second); a silent one dropped what it was sent (BifroMQ over its quota drops a
/// whole second's excess, and the source's window then holds no later publish whose ack would
/// show it).
pub const ACK_SILENCE: Duration = Duration::from_secs(60);

/// The silence a pair allows its target: `ACK_SILENCE`, or twice `bridge.stall_timeout` when
/// the operator raised that for a target known to be slow (a pair is reported stalled first,
/// and only then sends again).
pub fn ack_silence(stall_timeout: Duration) -> Duration {
    ACK_SILENCE.max(stall_timeout.saturating_mul(2))
}

/// Which connection of the pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Source,
    Target,
}

/// What only the I/O layer can do, asked for by the machine.
#[derive(Debug)]
pub enum Event {
    /// Open a connection (transport, CONNECT, CONNACK); report it with `connected` or `lost`.
    Connect(Role, ConnectParams),
    /// Close this side's connection, or abandon its connection attempt.
    Close(Role),
    /// Change the side's socket wake-up mark (`link::WakeThreshold`).
    Wake(Role, Wake),
    /// Hand this to the pair's spool (a route with `spool = true`); answers come back through
    /// `spool_durable`, `spool_failed` and `spool_records`.
    Spool(SpoolOp),
}

/// What a pair's spool must do (see `machine::spooled`).
#[derive(Debug)]
pub enum SpoolOp {
    /// Append these under these sequence numbers (increasing), and say when they are durable.
    Append(Vec<(u64, Message)>),
    /// The target took these records: they may go.
    Ack(Vec<u64>),
    /// Read up to `max` durable records from sequence number `from` on.
    Read { from: u64, max: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Wake only once much has arrived.
    Raise,
    /// Wake once this many bytes have arrived.
    RaiseTo(i32),
    /// Wake for any byte.
    Lower,
}

/// Why an activation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    Shutdown,
    Parked,
}

/// What an activation is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Subscribe and forward until shutdown or parked.
    Serve,
    /// A pool index no longer run: resume its sessions, unsubscribe, forward what they still
    /// deliver, then leave (SPEC 4.1).
    Retire,
}

/// What one activation did, for the pool.
pub struct Activation {
    pub ended: Ended,
    /// The first source CONNACK's session present flag (`None`: the source never connected).
    pub source_session: Option<bool>,
    pub forwarded: u64,
}

/// Why a message was not delivered: the `reason` label of `mqbridge_messages_dropped_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    Refused,
    InvalidTopic,
    TooLarge,
    Expired,
    /// Our own message coming back (marker or digest): suppressed, not dead-lettered.
    Loop,
    /// The target kept closing the connection over it.
    TargetDisconnects,
    /// It waited in the spool longer than `spool.max_age`.
    MaxAge,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Refused => "refused",
            DropReason::InvalidTopic => "invalid_topic",
            DropReason::TooLarge => "too_large",
            DropReason::Expired => "expired",
            DropReason::Loop => "loop",
            DropReason::TargetDisconnects => "target_disconnects",
            DropReason::MaxAge => "max_age",
        }
    }

    fn counter(self, s: &PairStats) -> &std::sync::atomic::AtomicU64 {
        match self {
            DropReason::Refused => &s.dropped_refused,
            DropReason::InvalidTopic => &s.dropped_invalid_topic,
            DropReason::TooLarge => &s.dropped_too_large,
            DropReason::Expired => &s.dropped_expired,
            DropReason::Loop => &s.dropped_loop,
            DropReason::TargetDisconnects => &s.dropped_target_disconnects,
            DropReason::MaxAge => &s.dropped_max_age,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Down,
    Connecting,
    Up,
}

/// One side's connection state and its reconnect schedule.
struct Side {
    role: Role,
    broker: Arc<BrokerPlan>,
    client_id: String,
    codec: Codec,
    link: Link,
    /// The last read filled the buffer's room: the socket may hold more (no lingering yet).
    more_to_read: bool,
    rbuf: BytesMut,
    wbuf: BytesMut,
    retry_at: Instant,
    backoff: Duration,
    last_write: Instant,
    /// When the current connection was established.
    up_since: Instant,
    /// The current connection did useful work (an ack from the target, a SUBACK from the
    /// source): losing it restarts the backoff from `BACKOFF_MIN`.
    healthy: bool,
    ping_sent: Option<Instant>,
    /// When the keep-alive PINGREQ now unanswered was written (kept until its PINGRESP, which
    /// `ping_sent` is not): an idle connection's round trip.
    probe_sent: Option<Instant>,
    /// Successful connections so far (the first is not a reconnect).
    connects: u64,
    /// The current connection's Server Keep Alive (v5 CONNACK).
    server_keep_alive: Option<Duration>,
    /// Connections in a row the broker closed within `TAKEOVER_WITHIN` of accepting them.
    quick_closes: u32,
}

impl Side {
    fn new(role: Role, broker: Arc<BrokerPlan>, client_id: String, now: Instant) -> Self {
        Side {
            role,
            codec: Codec::new(broker.protocol, broker.max_packet_size),
            broker,
            client_id,
            link: Link::Down,
            more_to_read: false,
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            retry_at: now,
            backoff: BACKOFF_MIN,
            last_write: now,
            up_since: now,
            healthy: false,
            ping_sent: None,
            probe_sent: None,
            connects: 0,
            server_keep_alive: None,
            quick_closes: 0,
        }
    }

    fn name(&self) -> &'static str {
        match self.role {
            Role::Source => "source",
            Role::Target => "target",
        }
    }

    fn is_up(&self) -> bool {
        self.link == Link::Up
    }

    fn established(&mut self, now: Instant, codec: Codec, rbuf: BytesMut, connack: &ConnAckInfo) {
        self.link = Link::Up;
        self.more_to_read = false;
        self.rbuf = rbuf;
        self.wbuf.clear();
        self.codec = codec;
        // The backoff is not reset here but when a connection proves healthy (see `lost`): a
        // broker that accepts and then drops us at once must not be hammered.
        self.up_since = now;
        self.healthy = false;
        self.last_write = now;
        self.ping_sent = None;
        self.probe_sent = None;
        self.connects += 1;
        self.server_keep_alive = connack
            .server_keep_alive
            .map(|s| Duration::from_secs(u64::from(s)));
    }

    /// Drops the connection (if any) and schedules the next attempt with backoff and `jitter`
    /// (0.5 to 1.0). `peer_closed`: the broker ended it (not our decision). `operator`: retrying
    /// cannot help until the config changes (logged as an error).
    fn lost(
        &mut self,
        now: Instant,
        why: &dyn std::fmt::Display,
        jitter: f64,
        peer_closed: bool,
        operator: bool,
    ) {
        let was_up = self.is_up();
        let lasted = now.saturating_duration_since(self.up_since);
        if was_up && (self.healthy || lasted >= HEALTHY_AFTER) {
            self.backoff = BACKOFF_MIN;
        }
        // The delay actually waited: the backoff with its jitter.
        let delay = self.backoff.mul_f64(jitter);
        let shown = Duration::from_millis(delay.as_millis() as u64);
        if was_up && peer_closed && lasted < TAKEOVER_WITHIN {
            self.quick_closes += 1;
        } else if was_up {
            self.quick_closes = 0;
        }
        if was_up && self.quick_closes > 0 && self.quick_closes.is_multiple_of(TAKEOVER_AFTER) {
            error!(broker = %self.broker.name, side = self.name(), client_id = %self.client_id, "connection lost: {why}; the broker closed this client's connection {} times in a row within {TAKEOVER_WITHIN:?} of accepting it: another client may be taking the session over (a second mqbridge with the same bridge.instance? the client id is <client_id_prefix>-<bridge.instance>-<route>-<index>: give each process its own bridge.instance), or the broker refuses something this client does (its log says which); reconnecting in {shown:?}", self.quick_closes);
        } else if was_up && operator {
            error!(broker = %self.broker.name, side = self.name(), client_id = %self.client_id, "connection lost: {why}; reconnecting in {shown:?}");
        } else if was_up {
            warn!(broker = %self.broker.name, side = self.name(), client_id = %self.client_id, "connection lost: {why}; reconnecting in {shown:?}");
        } else if operator {
            error!(broker = %self.broker.name, side = self.name(), url = %self.broker.url, "cannot connect: {why}; retrying in {shown:?}");
        } else {
            warn!(broker = %self.broker.name, side = self.name(), url = %self.broker.url, "cannot connect: {why}; retrying in {shown:?}");
        }
        self.link = Link::Down;
        self.rbuf = BytesMut::new();
        self.wbuf.clear();
        self.retry_at = now + delay;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
    }

    /// The keep-alive in force: ours, or the broker's Server Keep Alive (v5) when it set one.
    fn keep_alive(&self) -> Duration {
        self.server_keep_alive.unwrap_or(self.broker.keep_alive)
    }

    /// Makes room for a read (while connected) and returns how much there is.
    fn read_room(&mut self) -> usize {
        if self.is_up() && self.rbuf.capacity() - self.rbuf.len() < READ_CHUNK / 4 {
            self.rbuf.reserve(READ_CHUNK);
        }
        self.rbuf.capacity() - self.rbuf.len()
    }
}

/// Where a renewal of the source connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Renew {
    No,
    /// Not reading the socket; taking in what the buffer holds and writing the acks.
    Draining,
    /// DISCONNECT written into the buffer; the connection ends once it is on the wire.
    Disconnecting,
}

/// A pair leaving an automatically sized pool: it unsubscribes (so the broker stops giving its
/// session messages), keeps forwarding what was already on its way, and disconnects once the
/// unsubscription is confirmed, nothing is held and nothing arrived for `PARK_QUIET`.
#[derive(Debug)]
struct Parking {
    unsubscribed: bool,
    /// A retiring index whose source had no session: done as soon as it is known.
    nothing_held: bool,
}

/// One pair's protocol state.
pub struct Machine {
    spec: PairSpec,
    /// The window towards the target (fed by the source, or by the spool).
    window: Window,
    /// With a spool: the window towards the source, whose "target" is the spool.
    intake: Option<Box<spooled::Intake>>,
    source: Side,
    target: Side,
    events: VecDeque<Event>,
    /// xorshift state for reconnect jitter (seeded, so tests are repeatable).
    rng: u64,
    /// The target's Maximum QoS (v5 CONNACK), 2 when unknown.
    target_max_qos: Qos,
    /// The target answered a QoS 2 PUBLISH at least once (PUBREC): it takes QoS 2.
    target_took_qos2: bool,
    /// The target's Maximum Packet Size, mirrored to the source on v5.
    target_max_packet: Option<u32>,
    /// The target keeps retained messages (v5 CONNACK Retain Available, 1 when absent).
    target_retain: bool,
    /// SUBSCRIBE packet ids still waiting for their SUBACK.
    suback_pending: Vec<u16>,
    /// QoS 0 messages encoded into the target's write buffer and not written yet.
    qos0_buffered: usize,
    draining: bool,
    drain_deadline: Option<Instant>,
    /// Dead letters' own window on the source connection.
    dead_letters: DeadLetters,
    /// The window the source connection advertised (v5), to notice a change of the target's.
    advertised: Option<u16>,
    /// Acks to the source waiting a few milliseconds for others to leave with them.
    ack_hold: AckHold,
    last_drop_log: Option<Instant>,
    /// Drops not logged one by one since the last drop line (at most one a second).
    drops_unlogged: u64,
    /// The source connection resumed an existing session (which may hold older subscriptions).
    resumed_session: bool,
    /// The source's read buffer ends in an incomplete packet.
    source_partial: bool,
    /// Bytes of an oversize PUBLISH still to discard from the source stream, and the PUBLISH
    /// (its head) with why it is dropped, settled once all of it went by.
    source_skip: usize,
    skipped: Option<(InboundPublish, String)>,
    /// The current target connection has acknowledged something.
    target_progress: bool,
    /// Target connections in a row that ended without an ack while our messages were out.
    target_fail_streak: u32,
    /// Counters of earlier activations of this pair (an auto-sized pool parks and wakes pairs).
    base: Counters,
    parking: Option<Parking>,
    /// The first source CONNACK's session present flag.
    source_session: Option<bool>,
    /// After a transient refusal (0x97, 0x91): when the window may write again, and the
    /// pause after the next one.
    retry_at: Option<Instant>,
    retry_backoff: Duration,
    /// When a PUBLISH was last written to the target (the poison heuristic's clock).
    last_publish_write: Option<Instant>,
    /// Renewing the source connection to mirror a changed target window.
    renew_source: Renew,
    /// The route's SUBACKs must have come by then (as a CONNACK must).
    suback_deadline: Option<Instant>,
    /// An index no longer in the pool, cleaning up (`Mode::Retire`): quieter logs.
    retiring: bool,
    /// The shared-subscription self-test of a 3.x source (`None`: not wanted).
    probe: Option<ShareProbe>,
    last_source_read: Instant,
    /// A parking pair: since when the source's window holds nothing (its acks to the source
    /// went out then, so the source was free to send more only from then on).
    source_free_since: Option<Instant>,
    /// First write per target packet id, for `mqbridge_forward_latency_seconds`. The source is
    /// read only while the window has room, so this is (within a pass) the receive time.
    sent_at: super::window::IdMap<Instant>,
    /// Target packet ids in the order first written (with that time; entries whose publish was
    /// acknowledged or let go are skipped lazily): to see a publish the target passed over.
    send_order: VecDeque<(u16, Instant)>,
    /// Since when the oldest publish awaiting its ack was written before one the target has
    /// acknowledged. Brokers acknowledge in order (MQTT 3.1.1 and 5, 4.6), so after
    /// `SKIPPED_ACK_GRACE` the target dropped it without a word (BifroMQ over its PUBLISH/s
    /// quota on MQTT 3.x) and only a reconnect sends it again; without this the pair's window
    /// and the source's held that message, and what came after, for ever.
    skipped_since: Option<Instant>,
    /// The target's last PUBACK or PUBREC (or its CONNACK): see `ACK_SILENCE`.
    last_target_ack: Instant,
    /// The target's per-connection quotas (PUBLISH/s, bytes/s) for what we publish to it.
    target_pacer: Pacer,
    /// The source's per-connection byte quota for what we read from it.
    source_pacer: Pacer,
    last_pacing_log: Option<Instant>,
    /// Messages taken from the source in the current pass.
    source_batch: usize,
    /// Under load: no reads (but acks, when waiting for them) for a while (`pair::linger`).
    linger: linger::Lingering,
    /// Acks (PUBACK, PUBREC, PUBCOMP) taken from the target in the current pass.
    target_acks: usize,
    /// Since when the window towards the target is full (target connected), and for how long
    /// it was full before (`PairStats::window_full_ms`).
    window_full_since: Option<Instant>,
    window_full_before: Duration,
}

impl Machine {
    /// A pair's state at the start of an activation. `draining`: shutdown was asked already.
    /// `seed` drives the reconnect jitter.
    pub fn new(spec: PairSpec, mode: Mode, draining: bool, now: Instant, seed: u64) -> Self {
        let route = spec.route.clone();
        let base = Counters {
            received: PairStats::get(&spec.stats.received),
            forwarded: PairStats::get(&spec.stats.forwarded),
            redeliveries: PairStats::get(&spec.stats.redeliveries),
            retried: PairStats::get(&spec.stats.retried),
            ..Counters::default()
        };
        Machine {
            base,
            events: VecDeque::new(),
            rng: seed | 1,
            parking: (mode == Mode::Retire).then_some(Parking {
                unsubscribed: false,
                nothing_held: false,
            }),
            source_session: None,
            retry_at: None,
            retry_backoff: RETRY_BACKOFF_MIN,
            last_publish_write: None,
            renew_source: Renew::No,
            suback_deadline: None,
            retiring: mode == Mode::Retire,
            probe: (mode == Mode::Serve
                && route.share != Share::None
                && route.from.share_probe
                && route.from.protocol != Protocol::V5)
                .then(|| {
                    let prefix = match route.share {
                        Share::OShare => format!("$oshare/{}", route.group),
                        _ => format!("$share/{}", route.group),
                    };
                    ShareProbe::new(&prefix, &spec.source_client_id)
                }),
            last_source_read: now,
            source_free_since: None,
            window: {
                let mut w = Window::new(usize::from(route.to.max_inflight));
                w.set_max_bytes(usize::try_from(route.to.max_inflight_bytes).unwrap_or(usize::MAX));
                if spec.spool.is_some() {
                    w.source_connected(true); // its source is the spool, always there
                }
                w
            },
            intake: spec
                .spool
                .is_some()
                .then(|| spooled::Intake::new(route.spool.as_ref().and_then(|s| s.max_age))),
            source: Side::new(
                Role::Source,
                route.from.clone(),
                spec.source_client_id.clone(),
                now,
            ),
            target: Side::new(
                Role::Target,
                route.to.clone(),
                spec.target_client_id.clone(),
                now,
            ),
            target_max_qos: Qos::ExactlyOnce,
            target_took_qos2: false,
            target_max_packet: None,
            target_retain: true,
            suback_pending: Vec::new(),
            qos0_buffered: 0,
            draining,
            drain_deadline: None,
            dead_letters: DeadLetters::default(),
            advertised: None,
            ack_hold: AckHold::new(spec.route.from.ack_delay),
            last_drop_log: None,
            drops_unlogged: 0,
            resumed_session: false,
            source_partial: false,
            source_skip: 0,
            skipped: None,
            target_progress: false,
            target_fail_streak: 0,
            sent_at: Default::default(),
            send_order: VecDeque::new(),
            skipped_since: None,
            last_target_ack: now,
            target_pacer: Pacer::new(route.to.max_publish_rate, route.to.bandwidth_limit, now),
            source_pacer: Pacer::new(None, route.from.bandwidth_limit, now),
            last_pacing_log: None,
            source_batch: 0,
            linger: linger::Lingering::new(now),
            target_acks: 0,
            window_full_since: None,
            window_full_before: Duration::ZERO,
            spec,
        }
    }

    // ---- The I/O layer's calls -------------------------------------------------------------

    /// What the I/O layer must do next, in order.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// One pass over everything that arrived: start due connections, keep-alives, decode both
    /// read buffers, encode what the window asks for. Returns how the activation ended, once it
    /// has (the I/O layer then writes the goodbyes and stops).
    pub fn handle_input(&mut self, now: Instant) -> Option<Ended> {
        self.start_due_connections(now);
        if self.keep_alive_due().is_some_and(|t| now >= t) {
            // Also on a busy pass: a QoS 0 source we never write to still needs its PINGREQ.
            self.keep_alive_tick(now);
        }
        self.process_target_input(now);
        self.process_source_input(now);
        self.apply_actions(now);
        self.renew_source_when_quiet(now);
        self.track_window(now);
        self.publish_stats();
        if self.draining {
            let deadline = *self
                .drain_deadline
                .get_or_insert(now + self.spec.drain_timeout);
            if self.drained() || now >= deadline {
                return Some(Ended::Shutdown);
            }
        } else if self.parking.is_some() {
            if self.source_window_ref().in_flight() == 0 {
                self.source_free_since.get_or_insert(now);
            } else {
                self.source_free_since = None;
            }
            if self.parked(now) {
                return Some(Ended::Parked);
            }
        }
        self.linger(now);
        None
    }

    /// How many bytes the I/O layer may read from `role`'s socket now (`None`: do not read).
    /// This is the pair's backpressure: the source is read only while the window has room.
    pub fn read_room(&mut self, now: Instant, role: Role) -> Option<usize> {
        let lingering = self.linger.kind();
        match role {
            Role::Target => {
                // While waiting for acks the target is read (at its raised mark); under load not.
                (self.target.is_up() && lingering != Some(linger::Kind::Load))
                    .then(|| self.target.read_room())
            }
            Role::Source => {
                let read = self.source.is_up()
                    && self.renew_source == Renew::No
                    && self.source_window_ref().can_accept()
                    && self.intake_open()
                    && self.dead_letters.has_room()
                    && !self.draining
                    && lingering.is_none()
                    && (self.source.rbuf.len() < SOURCE_RBUF_HIGH || self.source_partial)
                    && self.target.wbuf.len() < TARGET_WRITE_FIRST
                    && self.source_pacer.ready(now);
                if !read {
                    return None;
                }
                let mut room = self.source.read_room();
                if let Some(allowed) = self.source_pacer.byte_allowance(now) {
                    // A paced source is read in pieces its quota allows (a little over, paid back).
                    room = room.min(allowed.max(MIN_PACED_READ));
                }
                Some(room)
            }
        }
    }

    /// The buffer a read of `role`'s socket goes into.
    pub fn recv_buf(&mut self, role: Role) -> &mut BytesMut {
        &mut self.side(role).rbuf
    }

    /// Both read buffers and both pending transmits at once, for an I/O layer that waits on all
    /// four: (source read, target read, source transmit, target transmit).
    pub fn buffers(&mut self, now: Instant) -> (&mut BytesMut, &mut BytesMut, &[u8], &[u8]) {
        let held = self.source_acks_wait(now);
        let Machine { source, target, .. } = self;
        (
            &mut source.rbuf,
            &mut target.rbuf,
            if held { &[] } else { &source.wbuf },
            &target.wbuf,
        )
    }

    /// What is to be written to `role`'s connection now: `transmit(role)`, unless the source's
    /// buffer holds only acks that may wait a little longer for others (`ack_hold`).
    pub fn transmit_now(&self, now: Instant, role: Role) -> &[u8] {
        match role {
            Role::Source if self.source_acks_wait(now) => &[],
            _ => self.transmit(role),
        }
    }

    /// Whether the source's write buffer is only acks that may wait: never while draining,
    /// parking or spooling, at most a quarter of the source's window of them, and only while
    /// the source has less than half its window in flight to us, held acks included (a window-
    /// bound pair gets its acks out at once).
    fn source_acks_wait(&self, now: Instant) -> bool {
        let window = self
            .advertised
            .map_or(MQTT3_SOURCE_WINDOW, |w| usize::from(w).max(1));
        let held = self.ack_hold.acks();
        held > 0
            && !self.draining
            && self.parking.is_none()
            && self.intake.is_none()
            && (self.window.in_flight() + held) * 2 < window
            && self.ack_hold.holds(now, self.source.wbuf.len(), window / 4)
    }

    /// A read of `n` bytes (of `room` offered) went into `recv_buf(role)`; 0 means the peer
    /// closed the connection.
    pub fn handle_read(&mut self, now: Instant, role: Role, n: usize, room: usize) {
        if n == 0 {
            return self.lost(now, role, &link::LinkError::Closed);
        }
        // Inside an oversize PUBLISH a PINGRESP cannot be told from payload: only a real stream
        // of its bytes counts as life (a broker that announced 256 MiB and then sends nothing
        // but PINGRESPs is dead to us after the keep-alive).
        let skipping = role == Role::Source && self.source_skip > 0;
        let side = self.side(role);
        if !skipping || n >= SKIP_ALIVE_BYTES {
            side.ping_sent = None;
        }
        side.more_to_read = n >= room;
        if role == Role::Source {
            self.last_source_read = now;
            self.source_pacer.spend(now, 0, n);
        }
    }

    /// The bytes waiting to be written to `role`'s connection.
    pub fn transmit(&self, role: Role) -> &[u8] {
        match role {
            Role::Source => &self.source.wbuf,
            Role::Target => &self.target.wbuf,
        }
    }

    /// The first `n` bytes of `transmit(role)` are on the wire.
    pub fn written(&mut self, now: Instant, role: Role, n: usize) {
        if n == 0 {
            return;
        }
        if role == Role::Source {
            self.ack_hold.clear();
        }
        let side = self.side(role);
        let _ = side.wbuf.split_to(n);
        side.last_write = now;
        if role == Role::Target && self.target.wbuf.is_empty() {
            self.qos0_buffered = 0;
        }
    }

    /// A connection asked for with `Event::Connect` is established (its CONNACK accepted).
    /// `rbuf` holds what was read after the CONNACK.
    pub fn connected(
        &mut self,
        now: Instant,
        role: Role,
        connack: ConnAckInfo,
        codec: Codec,
        rbuf: BytesMut,
    ) {
        match role {
            Role::Source => self.source_established(now, connack, codec, rbuf),
            Role::Target => self.target_established(now, connack, codec, rbuf),
        }
    }

    /// `role`'s connection (or the attempt to make one) failed, or the broker closed it.
    pub fn lost(&mut self, now: Instant, role: Role, why: &dyn std::fmt::Display) {
        self.close_as(now, role, why, true, false)
    }

    /// The attempt to connect `role` failed with `e` (an error in the log when only the
    /// operator can mend it: a refusal naming a key, TLS or WebSocket on the wrong port).
    pub fn cannot_connect(&mut self, now: Instant, role: Role, e: &link::LinkError) {
        self.close_as(now, role, e, true, e.needs_the_operator())
    }

    /// The broker sent DISCONNECT with `reason`: the connection ends, logged with the reason's
    /// name (a session taken over, 0x8E, names `bridge.instance`: an error).
    fn disconnected_by_broker(&mut self, now: Instant, role: Role, reason: u8) {
        let mut why = format!(
            "the broker sent DISCONNECT: {} ({reason:#04x})",
            link::reason_name(reason)
        );
        let taken_over = reason == 0x8E;
        if taken_over {
            why.push_str(&format!(
                ": another client connected with client id {:?} (a second mqbridge with the \
                 same bridge.instance? the client id is \
                 <client_id_prefix>-<bridge.instance>-<route>-<index>: give each process its \
                 own bridge.instance)",
                self.side(role).client_id
            ));
        }
        // A broker that says why (server busy, session taken over, …) did not choke on our
        // message: that is no evidence for the poison heuristic.
        self.close_as(now, role, &why, false, taken_over)
    }

    /// Ends `role`'s connection. `peer_closed`: the broker (or the network) ended it without a
    /// word, the only close that may count against the message last written (the poison
    /// heuristic); our own decisions (keep-alive, protocol errors) and a DISCONNECT with a
    /// reason never do.
    fn close(&mut self, now: Instant, role: Role, why: &dyn std::fmt::Display, peer_closed: bool) {
        self.close_as(now, role, why, peer_closed, false)
    }

    /// [`Machine::close`], logged as an error when `operator` (see [`Side::lost`]).
    fn close_as(
        &mut self,
        now: Instant,
        role: Role,
        why: &dyn std::fmt::Display,
        peer_closed: bool,
        operator: bool,
    ) {
        match role {
            Role::Source => {
                self.source_window().source_disconnected();
                self.spec.stats.source_up.store(false, Relaxed);
                self.spec.stats.subscribed.store(false, Relaxed);
                self.source_partial = false;
                self.source_skip = 0;
                self.skipped = None;
                self.dead_letters.disconnected();
            }
            Role::Target => {
                let was_up = self.target.is_up();
                self.window.target_disconnected();
                self.spec.stats.target_up.store(false, Relaxed);
                self.qos0_buffered = 0;
                let right_after_a_write = self
                    .last_publish_write
                    .is_some_and(|t| now.saturating_duration_since(t) <= POISON_CLOSE_WITHIN);
                if !peer_closed {
                    // Neither evidence against the message nor for it.
                } else if was_up
                    && !self.target_progress
                    && self.window.on_wire() > 0
                    && right_after_a_write
                {
                    self.target_fail_streak += 1;
                } else if was_up {
                    self.target_fail_streak = 0;
                }
            }
        }
        if self.side(role).link != Link::Down {
            self.events.push_back(Event::Close(role));
        }
        let jitter = self.jitter();
        self.side(role)
            .lost(now, why, jitter, peer_closed, operator);
        if self.target_fail_streak >= POISON_AFTER {
            self.target_fail_streak = 0;
            if self.qos2_refused() {
                // Not the message: the QoS. Kept (the source holds the rest); the operator
                // decides whether exactly once may become at least once.
                let broker = &self.target.broker.name;
                error!(route = %self.spec.route.name, pair = self.spec.index, broker = %broker, "the target closed the connection {POISON_AFTER} times in a row right after a QoS 2 PUBLISH and has never acknowledged one: a 3.x broker without QoS 2 does that (NATS logs \"publish QoS=2 not supported\"); nothing is dropped and the route waits: set brokers.{broker}.max_qos = 1 to forward QoS 2 messages to it at QoS 1 (at least once), or lower routes.{}.qos", self.spec.route.name);
            } else {
                self.give_up_poison(now);
            }
        }
    }

    /// Shutdown was asked: finish what is held (up to `drain_timeout`), take nothing new.
    pub fn shutdown(&mut self, now: Instant) {
        if !self.draining {
            self.draining = true;
            self.drain_deadline = Some(now + self.spec.drain_timeout);
            debug!(route = %self.spec.route.name, pair = self.spec.index, in_flight = self.window.in_flight(), "draining");
        }
    }

    pub fn is_draining(&self) -> bool {
        self.draining
    }

    /// The pool parks this pair: unsubscribe, forward what is on its way, then end.
    pub fn park(&mut self) {
        self.parking = Some(Parking {
            unsubscribed: false,
            nothing_held: false,
        });
        if self.source.is_up() {
            self.unsubscribe();
        }
        // Else the source connects to unsubscribe (`source_may_connect`, `source_established`).
        self.spec.stats.subscribed.store(false, Relaxed);
        debug!(route = %self.spec.route.name, pair = self.spec.index, "parking: unsubscribing");
    }

    pub fn is_parking(&self) -> bool {
        self.parking.is_some()
    }

    /// The activation ends: what is still to be written to `role` followed by a DISCONNECT,
    /// if the side is up (with a persistent session the broker keeps what we did not
    /// acknowledge and delivers it to the next run).
    pub fn goodbye(&mut self, role: Role) -> Option<BytesMut> {
        let side = self.side(role);
        if !side.is_up() {
            return None;
        }
        side.link = Link::Down;
        let mut buf = std::mem::take(&mut side.wbuf);
        side.codec.disconnect(&mut buf);
        Some(buf)
    }

    /// Both goodbyes were written (or given up on).
    pub fn stopped(&mut self) {
        self.spec.stats.source_up.store(false, Relaxed);
        self.spec.stats.target_up.store(false, Relaxed);
        if self.retiring {
            debug!(route = %self.spec.route.name, pair = self.spec.index, left_in_flight = self.window.in_flight(), "retiring index: disconnected");
        } else {
            info!(route = %self.spec.route.name, pair = self.spec.index, left_in_flight = self.window.in_flight(), "pair stopped");
        }
    }

    pub fn activation(&self, ended: Ended) -> Activation {
        Activation {
            ended,
            source_session: self.source_session,
            forwarded: self.window.counters().forwarded,
        }
    }

    /// When the machine must be woken without I/O: a reconnect falls due, a keep-alive, a
    /// pacing quota, a retry, a SUBACK or drain deadline, the end of lingering.
    pub fn poll_timeout(&mut self, now: Instant) -> Instant {
        let mut t = now + IDLE_TICK;
        // Paced: wake when the quota allows the next read (only if we would read at all, and
        // only if a quota holds it back: "ready now" is no deadline, and waking for it every
        // timer tick made idle pairs cost CPU).
        if self.source.is_up() && self.source_window_ref().can_accept() && !self.draining {
            let at = self
                .target_pacer
                .ready_at(now)
                .max(self.source_pacer.ready_at(now));
            if at > now {
                t = t.min(at);
            }
        }
        // A reconnect only when it will be started: the source waits for the target's first
        // connection, and its past deadline made a pair whose target is down spin.
        if self.target.link == Link::Down {
            t = t.min(self.target.retry_at);
        }
        if self.source_may_connect() {
            t = t.min(self.source.retry_at);
        }
        let deadlines = [
            self.keep_alive_due(),
            self.dropped_ack_due(),
            self.intake.as_ref().and_then(|i| i.retry_at()),
            self.intake.as_ref().and_then(|i| i.too_old_at()),
            self.probe.as_ref().and_then(ShareProbe::poll_timeout),
            self.retry_at,
            self.suback_deadline,
            self.drain_deadline,
            self.linger.until(),
            self.source_acks_wait(now)
                .then(|| self.ack_hold.due())
                .flatten(),
        ];
        for d in deadlines.into_iter().flatten() {
            t = t.min(d);
        }
        t
    }

    /// Acts on every deadline that passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.keep_alive_tick(now);
        self.dropped_ack_check(now);
        let t = self.probe.as_mut().and_then(|p| p.handle_timeout(now));
        self.probe_transmit(t);
        if self.suback_deadline.is_some_and(|d| now >= d) {
            self.suback_deadline = None;
            if self.source.is_up() && !self.suback_pending.is_empty() {
                error!(route = %self.spec.route.name, pair = self.spec.index, broker = %self.source.broker.name, "no SUBACK within {SUBACK_TIMEOUT:?}: the source broker took the connection but not the subscription; reconnecting");
                self.lost(now, Role::Source, &"no SUBACK");
            }
        }
        if self.retry_at.is_some_and(|r| now >= r) {
            self.retry_at = None;
            self.window.resume();
            self.apply_actions(now);
        }
        if self.spool_retry_due(now) {
            self.apply_actions(now);
        }
    }

    /// Messages held (taken from the source, not yet finished with the target).
    pub fn in_flight(&self) -> usize {
        self.window.in_flight()
    }

    pub fn is_up(&self, role: Role) -> bool {
        self.side_ref(role).is_up()
    }

    // ---- Inside the machine ----------------------------------------------------------------

    fn side(&mut self, role: Role) -> &mut Side {
        match role {
            Role::Source => &mut self.source,
            Role::Target => &mut self.target,
        }
    }

    fn side_ref(&self, role: Role) -> &Side {
        match role {
            Role::Source => &self.source,
            Role::Target => &self.target,
        }
    }

    /// 0.5 to 1.0, from a xorshift64 generator.
    fn jitter(&mut self) -> f64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        0.5 + (x >> 11) as f64 / (1u64 << 53) as f64 / 2.0
    }

    /// Starts, extends or ends lingering after a pass (`pair::linger` decides).
    fn linger(&mut self, now: Instant) {
        let acks = std::mem::take(&mut self.target_acks);
        let pass = linger::Pass {
            taken: std::mem::take(&mut self.source_batch),
            // With a spool the source waits for no target ack: a full window does not stop
            // its reading (lingering under load, which batches both sockets, still applies).
            acks: if self.intake.is_some() { 0 } else { acks },
            window: self.window.binding_window(),
            free: self.window.free(),
            draining: self.draining,
            target_up: self.target.is_up(),
            source_dry: !self.source.more_to_read,
            target_dry: !self.target.more_to_read,
        };
        let (source, target) = match self.linger.after_pass(now, &pass) {
            linger::Change::Nothing => return,
            linger::Change::Start(linger::Kind::Load) => (Wake::Raise, Wake::Raise),
            linger::Change::Start(linger::Kind::Acks) => {
                (Wake::Raise, Wake::RaiseTo(ACK_BATCH_BYTES))
            }
            linger::Change::End => (Wake::Lower, Wake::Lower),
        };
        self.events.push_back(Event::Wake(Role::Source, source));
        self.events.push_back(Event::Wake(Role::Target, target));
    }

    fn start_due_connections(&mut self, now: Instant) {
        let target = &mut self.target;
        if target.link == Link::Down && now >= target.retry_at {
            let params = ConnectParams::for_broker(&target.broker, target.client_id.clone());
            target.link = Link::Connecting;
            self.events.push_back(Event::Connect(Role::Target, params));
        }
        // The source connects once the target has, so its advertised window mirrors the target's.
        if self.source_may_connect() && now >= self.source.retry_at {
            let source = &mut self.source;
            let mut params = ConnectParams::for_broker(&source.broker, source.client_id.clone());
            if source.broker.protocol == Protocol::V5 {
                let window = match self.intake.as_ref() {
                    Some(i) => i.window_ref().window(),
                    None => self.window.window(),
                };
                let window = window.min(usize::from(u16::MAX)) as u16;
                params.receive_maximum = Some(window);
                // Not the target's Maximum Packet Size: a v5 broker silently discards what is
                // over the client's limit, and an oversize message must be dead-lettered and
                // counted here instead (SPEC 4.7). Ours only guards our memory.
                params.maximum_packet_size = Some(source.broker.max_packet_size);
                self.advertised = Some(window);
            }
            source.link = Link::Connecting;
            self.events.push_back(Event::Connect(Role::Source, params));
        }
    }

    /// Whether the source connection is to be (re)established once its backoff allows.
    fn source_may_connect(&self) -> bool {
        // Also while parking: the UNSUBSCRIBE must reach the broker, or it keeps queueing for
        // us, and what the session still holds must be taken before the pair leaves.
        // With a spool the source runs on its own (SPEC 4.9): the spool takes what the target
        // cannot, and the source's window is the intake's, not the target's.
        !self.draining
            && (self.target.connects > 0 || self.intake.is_some())
            && self.source.link == Link::Down
    }

    fn target_established(
        &mut self,
        now: Instant,
        mut info: ConnAckInfo,
        codec: Codec,
        rbuf: BytesMut,
    ) {
        let target = &self.target.broker;
        if target.protocol == Protocol::V31 && !target.session_expiry.is_zero() {
            // MQTT 3.1 has no session present flag: we asked for a persistent session, so the
            // broker holds it (unless it lost it, which it cannot tell us). Taking it for gone
            // would forget QoS 2 exchanges past PUBREC without their PUBREL (#14 hole 2); if it
            // is gone, a PUBREL is answered PUBCOMP and a DUP resend taken as new.
            info.session_present = true;
        }
        self.target_progress = false;
        self.skipped_since = None;
        self.last_target_ack = now;
        let broker_window = info.receive_maximum.unwrap_or(u16::MAX);
        let window = usize::from(broker_window.min(self.target.broker.max_inflight));
        // A v5 broker says its Maximum QoS; a 3.x one cannot, and the operator may (`max_qos`).
        self.target_max_qos = info
            .maximum_qos
            .and_then(Qos::from_u8)
            .unwrap_or(Qos::ExactlyOnce)
            .min(self.target.broker.max_qos);
        self.target_max_packet = info.maximum_packet_size;
        self.target_retain = info.retain_available != Some(0);
        if self.target.connects > 0 {
            PairStats::add(&self.spec.stats.target_reconnects, 1);
        }
        let first = self.target.connects == 0;
        self.target.established(now, codec, rbuf, &info);
        if self.retiring {
            debug!(route = %self.spec.route.name, pair = self.spec.index, session_present = info.session_present, "retiring index: target connected");
        } else {
            info!(route = %self.spec.route.name, pair = self.spec.index, broker = %self.target.broker.name, client_id = %self.target.client_id, session_present = info.session_present, window, "target connected");
        }
        if first && info.session_present {
            self.release_stranded();
        }
        let qos2_window = window.min(usize::from(self.target.broker.max_inflight_qos2));
        self.window
            .target_connected_qos2(info.session_present, window, qos2_window);
        self.spec.stats.target_up.store(true, Relaxed);
        // The source advertised the old target's window: if the target came back with another,
        // reconnect the source so what it may send us mirrors the target again.
        let now_window = Some(window.min(usize::from(u16::MAX)) as u16);
        if self.intake.is_none()
            && self.source.is_up()
            && self.advertised.is_some()
            && self.advertised != now_window
        {
            if self.source.broker.session_expiry.is_zero() {
                // A clean session loses what is in flight with the connection: keep the old
                // window (the pair holds at most that much) rather than lose messages.
                info!(route = %self.spec.route.name, pair = self.spec.index, "the target's window changed; the source keeps its old window until it reconnects (a clean session would lose what is in flight)");
            } else if self.renew_source == Renew::No {
                info!(route = %self.spec.route.name, pair = self.spec.index, "the target's window changed; renewing the source connection to mirror it once what it sent is taken and acknowledged");
                self.renew_source = Renew::Draining;
            }
        }
    }

    /// The source connection is renewed (the target's window changed) only once everything it
    /// delivered was taken from the read buffer and every ack written, then with a DISCONNECT:
    /// nothing it sent is thrown away, and no ack is left unsaid.
    fn renew_source_when_quiet(&mut self, now: Instant) {
        match self.renew_source {
            Renew::No => {}
            Renew::Draining => {
                if !self.source.is_up() {
                    self.renew_source = Renew::No; // it went anyway; the reconnect mirrors
                } else if self.source_taken_in() && self.source.wbuf.is_empty() {
                    self.source.codec.disconnect(&mut self.source.wbuf);
                    self.renew_source = Renew::Disconnecting;
                }
            }
            Renew::Disconnecting => {
                if !self.source.is_up() || self.source.wbuf.is_empty() {
                    self.renew_source = Renew::No;
                    if self.source.is_up() {
                        self.lost(
                            now,
                            Role::Source,
                            &"renewing it to mirror the target's window",
                        );
                    }
                    self.source.retry_at = now;
                }
            }
        }
    }

    /// Nothing complete waits undecoded in the source's read buffer.
    fn source_taken_in(&self) -> bool {
        self.source.rbuf.is_empty() || self.source_partial
    }

    /// A target session resumed by a pair that knows nothing of it (a new process, or a pair
    /// woken by an auto-sized pool) may hold QoS 2 exchanges an earlier run left half done:
    /// messages the target took (PUBREC) whose PUBREL never came. Left there they are never
    /// delivered, they fill the target's window (new publishes get 0x97), and a new message
    /// reusing one of their packet ids is taken for a duplicate. So PUBREL every id once, before
    /// anything is published: the target delivers what it held and answers PUBCOMP (or "not
    /// found"), which the window counts as unsolicited. 64 Ki × 4 bytes, once.
    fn release_stranded(&mut self) {
        info!(route = %self.spec.route.name, pair = self.spec.index, "resumed a target session this process did not start: releasing any QoS 2 exchange left in it");
        self.target.wbuf.reserve(4 * usize::from(u16::MAX));
        for pkid in 1..=u16::MAX {
            self.target.codec.pubrel(pkid, &mut self.target.wbuf);
        }
    }

    fn source_established(
        &mut self,
        now: Instant,
        mut info: ConnAckInfo,
        codec: Codec,
        rbuf: BytesMut,
    ) {
        let source = &self.source.broker;
        if source.protocol == Protocol::V31
            && !source.session_expiry.is_zero()
            && self.source.connects > 0
        {
            // MQTT 3.1 cannot say: a reconnect asked for the session we had, so take it as kept
            // (what we owe it is acknowledged, its DUP resends recognised). The window notices a
            // lost one by a new PUBLISH reusing an id we still owe (#14 hole 2). A first
            // connection is taken as new: nothing is owed yet, and a subscribe-time retained
            // copy is forwarded by pair 0.
            info.session_present = true;
        }
        if self.source.connects > 0 {
            PairStats::add(&self.spec.stats.source_reconnects, 1);
        }
        self.source.established(now, codec, rbuf, &info);
        if self.retiring {
            debug!(route = %self.spec.route.name, pair = self.spec.index, session_present = info.session_present, "retiring index: source connected");
        } else {
            info!(route = %self.spec.route.name, pair = self.spec.index, broker = %self.source.broker.name, client_id = %self.source.client_id, session_present = info.session_present, "source connected");
        }
        self.source_window().source_connected(info.session_present);
        self.dead_letters.connected(
            info.receive_maximum,
            info.maximum_qos.and_then(Qos::from_u8),
            info.maximum_packet_size,
        );
        self.send_dead_letters();
        self.spec.stats.source_up.store(true, Relaxed);
        // A resumed session keeps whatever it subscribed before, perhaps under an older config
        // whose filters we no longer know (MQTT cannot list them): check what arrives.
        self.resumed_session = info.session_present;
        self.source_session.get_or_insert(info.session_present);
        if let Some(p) = self.probe.as_mut() {
            p.reset();
        }
        let route = &self.spec.route;
        if route.share != Share::None && info.shared_subscription_available == Some(0) {
            error!(route = %route.name, broker = %self.source.broker.name, "the source broker has no shared subscriptions (its CONNACK says Shared Subscription Available = 0), so `routes.{}.share` cannot work there: set share = \"none\" on that route (and pool_size = 1, or every pair gets every message); retrying", route.name);
            return self.lost(now, Role::Source, &"no shared subscriptions on this broker");
        }
        // A parking pair waits for quiet from here: the broker resends what the session held.
        self.last_source_read = now;
        if self.retiring
            && !info.session_present
            && self.source.broker.protocol != Protocol::V31
            && let Some(p) = self.parking.as_mut()
        {
            // Nothing was kept for this index: no subscription, no queue. (MQTT 3.1 cannot say,
            // so there the full clean-up runs.)
            p.unsubscribed = true;
            p.nothing_held = true;
            return;
        }
        match &self.parking {
            Some(p) if !p.unsubscribed => self.unsubscribe(),
            Some(_) => {}
            None => self.subscribe(now),
        }
    }

    /// SUBSCRIBE every filter, split to respect `max_filters_per_subscribe`. Done on every
    /// connect: a resumed session keeps its subscriptions, but the config may have changed.
    fn subscribe(&mut self, now: Instant) {
        let route = &self.spec.route;
        let subs = route.subscriptions();
        let per_packet = self.source.broker.max_filters_per_subscribe.max(1);
        self.suback_pending.clear();
        for (i, chunk) in subs.chunks(per_packet).enumerate() {
            // Ids for SUBSCRIBE live in their own range, apart from nothing we publish here.
            let pkid = 1 + i as u16;
            self.source.codec.subscribe(
                pkid,
                chunk,
                route.qos,
                self.spec.index == 0,
                &mut self.source.wbuf,
            );
            self.suback_pending.push(pkid);
        }
        self.suback_deadline = Some(now + SUBACK_TIMEOUT);
        self.spec.stats.subscribed.store(false, Relaxed);
    }

    /// The target keeps closing over a QoS 2 PUBLISH and never took one: it does not take QoS 2.
    fn qos2_refused(&self) -> bool {
        !self.target_took_qos2
            && self.target.broker.protocol != Protocol::V5
            && self
                .window
                .oldest()
                .is_some_and(|m| m.qos == Qos::ExactlyOnce)
    }

    /// The target keeps closing the connection with our messages on the wire and acks none:
    /// the oldest held message is taken for the cause and treated as undeliverable, so the
    /// messages behind it move again.
    fn give_up_poison(&mut self, now: Instant) {
        if let Some(m) = self.window.give_up_oldest() {
            let why = format!(
                "the target closed the connection {POISON_AFTER} times in a row with it on the wire \
                 and acknowledged nothing (too large for a 3.x broker, or a name it rejects?)"
            );
            self.drop_message(
                now,
                m.source_topic(),
                &m.payload,
                m.properties.as_deref(),
                DropReason::TargetDisconnects,
                &why,
            );
        }
    }

    fn process_target_input(&mut self, now: Instant) {
        while self.target.is_up() {
            let packet = match self.target.codec.decode(&mut self.target.rbuf) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => return self.close(now, Role::Target, &e, false),
            };
            match packet {
                Inbound::PubAck { pkid, reason } => {
                    self.target_ack(now, pkid, reason);
                    if self.window.target_puback(pkid, reason) {
                        self.qos2_taken_as_qos1();
                    }
                }
                Inbound::PubRec { pkid, reason } => {
                    self.target_ack(now, pkid, reason);
                    self.target_took_qos2 = true;
                    self.window.target_pubrec(pkid, reason)
                }
                Inbound::PubComp { pkid } => {
                    self.target_progress = true;
                    self.target_acks += 1;
                    self.window.target_pubcomp(pkid)
                }
                Inbound::PingResp => {
                    // Written while idle: the path's round trip, without the acks' queueing.
                    if let Some(sent) = self.target.probe_sent.take() {
                        let us = now.saturating_duration_since(sent).as_micros();
                        PairStats::set(&self.spec.stats.target_round_trip_us, us.max(1) as u64);
                    }
                }
                Inbound::SubAck { .. } | Inbound::UnsubAck { .. } => {}
                Inbound::PingReq => self.target.codec.pingresp(&mut self.target.wbuf),
                Inbound::Publish(p) => {
                    // We subscribe nothing on the target; a stale session might still deliver.
                    // Ack it so the broker's window towards us never fills.
                    match p.qos {
                        Qos::AtMostOnce => {}
                        Qos::AtLeastOnce => self.target.codec.puback(p.pkid, &mut self.target.wbuf),
                        Qos::ExactlyOnce => self.target.codec.pubrec(p.pkid, &mut self.target.wbuf),
                    }
                }
                Inbound::PubRel { pkid } => self.target.codec.pubcomp(pkid, &mut self.target.wbuf),
                Inbound::Disconnect { reason } => {
                    return self.disconnected_by_broker(now, Role::Target, reason);
                }
                Inbound::ConnAck(_) | Inbound::Unexpected(_) | Inbound::TooLarge { .. } => {
                    let why = format!("unexpected packet {packet:?}");
                    return self.close(now, Role::Target, &why, false);
                }
            }
            self.apply_actions(now);
        }
    }

    /// A PUBACK or PUBREC from the target: progress, and the forward latency.
    fn target_ack(&mut self, now: Instant, pkid: u16, reason: u8) {
        if reason < 0x80 {
            self.retry_backoff = RETRY_BACKOFF_MIN;
        }
        self.target_progress = true;
        self.target_acks += 1;
        self.target.healthy = true;
        if reason < 0x80 {
            // Bytes forwarded are what the target took: counted once, at its first ack (the
            // slot is still `Published`), however often the message was written.
            let taken = self.window.held_mut(pkid).map(|m| m.payload.len());
            PairStats::add(&self.spec.stats.bytes_forwarded, taken.unwrap_or(0) as u64);
        }
        self.last_target_ack = now;
        let Some(at) = self.sent_at.remove(&pkid) else {
            return;
        };
        if reason < 0x80 {
            let secs = now.saturating_duration_since(at).as_secs_f64();
            self.spec.stats.forward_latency.record(secs);
        }
        self.note_skipped(now, at);
    }

    /// Whether an entry of `send_order` is a publish still waiting for its ack.
    fn waiting_for_ack(&self, (id, at): (u16, Instant)) -> bool {
        self.sent_at.get(&id) == Some(&at) && self.window.awaits_ack(id)
    }

    /// The oldest publish still waiting for its ack (`send_order` pruned up to it).
    fn oldest_waiting(&mut self) -> Option<(u16, Instant)> {
        while let Some(&front) = self.send_order.front() {
            if self.waiting_for_ack(front) {
                return Some(front);
            }
            self.send_order.pop_front();
        }
        None
    }

    /// After an ack for a publish first written at `acked`: is an older one still unacknowledged
    /// (`skipped_since`)? Keeps `send_order` to the publishes still waiting.
    fn note_skipped(&mut self, now: Instant, acked: Instant) {
        match self.oldest_waiting() {
            Some((_, at)) if at < acked => {
                self.skipped_since.get_or_insert(now);
            }
            _ => self.skipped_since = None,
        }
        // Bounded: a stuck front keeps acknowledged entries behind it.
        if self.send_order.len() > 2 * self.sent_at.len() + 1024 {
            let order = std::mem::take(&mut self.send_order);
            self.send_order = order
                .into_iter()
                .filter(|e| self.waiting_for_ack(*e))
                .collect();
        }
    }

    /// When the target is due to have dropped a publish: `SKIPPED_ACK_GRACE` after it passed
    /// one over, `ACK_SILENCE` after its last ack.
    fn dropped_ack_due(&self) -> Option<Instant> {
        if !self.target.is_up() {
            return None;
        }
        let silence = self.last_target_ack + self.spec.ack_silence;
        Some(
            self.skipped_since
                .map_or(silence, |s| (s + SKIPPED_ACK_GRACE).min(silence)),
        )
    }

    /// The target passed a publish over (`SKIPPED_ACK_GRACE`) or acknowledged nothing for
    /// `ACK_SILENCE` while publishes waited: it dropped them; reconnect to send them again.
    fn dropped_ack_check(&mut self, now: Instant) {
        if self.dropped_ack_due().is_none_or(|due| now < due) {
            return;
        }
        let skipped = self.skipped_since.take().is_some();
        let Some((pkid, _)) = self.oldest_waiting() else {
            // Nothing waits (what was held was acknowledged or let go): look again later.
            self.last_target_ack = now;
            return;
        };
        let broker = self.target.broker.name.clone();
        if skipped {
            error!(route = %self.spec.route.name, pair = self.spec.index, broker = %broker, pkid, "the target acknowledged publishes written after packet id {pkid} but not it for {SKIPPED_ACK_GRACE:?}: it dropped it without a word (BifroMQ does over its PUBLISH/s quota on MQTT 3.x: set brokers.{broker}.max_publish_rate to its MsgPubPerSec); reconnecting to send it again");
        } else {
            error!(route = %self.spec.route.name, pair = self.spec.index, broker = %broker, pkid, "the target is connected but acknowledged nothing for {:?} while packet id {pkid} and others waited: taking them for dropped (BifroMQ drops over its PUBLISH/s quota on MQTT 3.x without an ack: set brokers.{broker}.max_publish_rate); reconnecting to send them again", self.spec.ack_silence);
        }
        PairStats::add(&self.spec.stats.skipped_acks, 1);
        self.lost(
            now,
            Role::Target,
            &"publishes the target never acknowledged",
        );
    }

    fn process_source_input(&mut self, now: Instant) {
        while self.source.is_up()
            && !self.draining
            && self.source_window_ref().can_accept()
            && self.intake_open()
            && self.dead_letters.has_room()
            && self.qos0_buffered < self.spec.route.queue_capacity
            && self.target.wbuf.len() < TARGET_WBUF_HIGH
            && self.target_paced_ready(now)
        {
            if self.source_skip > 0 {
                // The rest of a PUBLISH over `max_packet_size`, discarded as it arrives.
                let n = self.source_skip.min(self.source.rbuf.len());
                let _ = self.source.rbuf.split_to(n);
                self.source_skip -= n;
                if self.source_skip > 0 {
                    self.source_partial = true;
                    break;
                }
                // All of it went by: only now is it done with (acknowledged, dead-lettered). A
                // connection lost before leaves it to the broker to send again.
                if let Some((publish, why)) = self.skipped.take() {
                    self.undeliverable(now, publish, DropReason::TooLarge, &why);
                    self.apply_actions(now);
                }
            }
            let packet = match self.source.codec.decode(&mut self.source.rbuf) {
                Ok(Some(p)) => {
                    self.source_partial = false;
                    p
                }
                Ok(None) => {
                    // A packet is partly here: read on whatever the buffer's size, or a message
                    // larger than SOURCE_RBUF_HIGH would never complete.
                    self.source_partial = !self.source.rbuf.is_empty();
                    break;
                }
                Err(e) => return self.lost(now, Role::Source, &e),
            };
            match packet {
                Inbound::Publish(p) => {
                    self.source_batch += 1;
                    self.source_publish(now, p)
                }
                Inbound::TooLarge {
                    publish,
                    size,
                    skip,
                } => {
                    // A 3.x source cannot be told our limit; reading on past the packet keeps
                    // the pair going (before: a reconnect loop over it, #14 hole 8).
                    let max = self.source.broker.max_packet_size;
                    let why = format!(
                        "{size} bytes is over brokers.{}.max_packet_size ({max} bytes); skipped unread, dead-lettered without its payload",
                        self.source.broker.name
                    );
                    if skip == 0 {
                        self.undeliverable(now, publish, DropReason::TooLarge, &why);
                    } else {
                        self.source_skip = skip;
                        self.skipped = Some((publish, why));
                        self.source_partial = true;
                        break;
                    }
                }
                Inbound::PubRel { pkid } => self.source_window().source_pubrel(pkid),
                Inbound::SubAck { pkid, codes } => self.suback(now, pkid, &codes),
                Inbound::UnsubAck { pkid } if pkid == UNSUBSCRIBE_PKID => {
                    if let Some(p) = self.parking.as_mut() {
                        p.unsubscribed = true;
                    }
                }
                Inbound::UnsubAck { .. } => {} // the share probe's
                Inbound::PubAck { pkid, .. } => {
                    if self.dead_letters.puback(pkid) {
                        self.send_dead_letters();
                    }
                }
                Inbound::PingResp | Inbound::PubRec { .. } | Inbound::PubComp { .. } => {}
                Inbound::PingReq => self.source.codec.pingresp(&mut self.source.wbuf),
                Inbound::Disconnect { reason } => {
                    return self.disconnected_by_broker(now, Role::Source, reason);
                }
                Inbound::ConnAck(_) | Inbound::Unexpected(_) => {
                    let why = format!("unexpected packet {packet:?}");
                    return self.lost(now, Role::Source, &why);
                }
            }
            self.apply_actions(now);
        }
    }

    fn suback(&mut self, now: Instant, pkid: u16, codes: &[u8]) {
        if pkid == share_probe::SUBSCRIBE_PKID {
            let code = codes.first().copied().unwrap_or(0x80);
            let t = self.probe.as_mut().and_then(|p| p.suback(code));
            return self.probe_transmit(t);
        }
        let route = &self.spec.route;
        if let Some(bad) = codes.iter().find(|c| **c >= 0x80) {
            // 3.x SUBACK has only 0x80 (failure); v5 says why (0x87 not authorized, 0x9E…).
            let words = if self.source.broker.protocol.is_v5() {
                link::reason_name(*bad)
            } else {
                "failure"
            };
            warn!(route = %route.name, broker = %self.source.broker.name, subscriptions = ?route.subscriptions(), "the source broker refused a subscription: {words} ({bad:#04x}) (shared subscriptions or ACLs?); retrying by reconnecting");
            return self.lost(now, Role::Source, &"subscription refused");
        }
        let asked = self.spec.route.qos as u8;
        if let Some(granted) = codes.iter().copied().filter(|c| *c < asked).min() {
            PairStats::add(&self.spec.stats.subscriptions_downgraded, 1);
            warn!(route = %route.name, pair = self.spec.index, broker = %self.source.broker.name, granted, asked, "the source broker granted QoS {granted} where routes.{}.qos asks for {asked}: messages arrive at QoS {granted} at most (a broker limit such as mosquitto's max_qos)", route.name);
        }
        let was_pending = !self.suback_pending.is_empty();
        self.suback_pending.retain(|p| *p != pkid);
        if self.suback_pending.is_empty() {
            self.suback_deadline = None;
        }
        self.source.healthy = true;
        if was_pending && self.suback_pending.is_empty() {
            match self.probe.as_mut() {
                Some(p) => {
                    let t = p.start(now);
                    self.probe_transmit(Some(t));
                }
                None => self.ready(),
            }
        }
    }

    fn ready(&mut self) {
        self.spec.stats.subscribed.store(true, Relaxed);
        info!(route = %self.spec.route.name, pair = self.spec.index, "pair ready: subscribed");
    }

    /// Writes what the share probe asks for, and acts on its verdict when it has one.
    fn probe_transmit(&mut self, t: Option<share_probe::Transmit>) {
        let Some(t) = t else { return };
        let buf = &mut self.source.wbuf;
        match t {
            share_probe::Transmit::Subscribe { pkid, filter } => {
                self.source
                    .codec
                    .subscribe(pkid, &[filter], Qos::AtMostOnce, false, buf)
            }
            share_probe::Transmit::Publish { topic } => {
                let m = Message {
                    topic,
                    payload: bytes::Bytes::from_static(b"mqbridge share probe"),
                    qos: Qos::AtMostOnce,
                    retain: false,
                    properties: None,
                    expires_at: None,
                    source_topic: None,
                };
                self.source.codec.publish(0, false, &m, None, buf);
            }
            share_probe::Transmit::Unsubscribe { pkid, filter } => {
                self.source.codec.unsubscribe(pkid, &[filter], buf);
                let route = self.spec.route.clone();
                match self.probe.as_ref().and_then(ShareProbe::verdict) {
                    Some(share_probe::Verdict::Shares) => self.ready(),
                    _ => {
                        error!(route = %route.name, pair = self.spec.index, broker = %self.source.broker.name, "the source broker does not deliver shared subscriptions: a probe published to {} never came back through {}/{}/… within {:?}, so this pair would receive nothing; it stays not ready. The broker takes `$share/…` as a literal filter (NATS, aedes and amqtt do): set `routes.{}.share = \"none\"` (with pool_size = 1), or `brokers.{}.share_probe = false` if its ACLs forbid the probe topic", self.probe.as_ref().map(ShareProbe::topic).unwrap_or(""), if route.share == Share::OShare { "$oshare" } else { "$share" }, route.group, share_probe::PROBE_TIMEOUT, route.name, self.source.broker.name);
                    }
                }
            }
        }
    }

    /// Acknowledges a source PUBLISH that is not forwarded (the reason was counted).
    fn discard(&mut self, p: &InboundPublish) {
        if p.qos != Qos::AtMostOnce {
            self.source_window().source_discard(p.pkid, p.qos, p.dup);
        }
    }

    /// Turns a source PUBLISH into the message for the target: rewritten topic (and response
    /// topic), capped QoS, retain and properties per the route, then hands it to the window.
    /// What cannot be delivered is dead-lettered and acknowledged here (SPEC 4.7).
    fn source_publish(&mut self, now: Instant, mut p: InboundPublish) {
        if let Some(probe) = self.probe.as_mut()
            && let Some(t) = probe.publish(&p.topic)
        {
            self.discard(&p);
            return self.probe_transmit(t);
        }
        let route = self.spec.route.clone();
        if self.resumed_session && !route.topics.iter().any(|f| f.matches(&p.topic)) {
            // From a subscription of an older config kept by the resumed session: not ours to
            // forward. Acknowledged, so the broker does not redeliver it forever.
            PairStats::add(&self.spec.stats.stale_subscription, 1);
            if self
                .last_drop_log
                .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
            {
                self.last_drop_log = Some(now);
                warn!(route = %route.name, topic = %p.topic, "a message matching none of the route's topics arrived through the resumed session's older subscriptions; not forwarded (set session_expiry = \"0s\" once, or unsubscribe the old filter, to clear them)");
            }
            return self.discard(&p);
        }
        if p.retain
            && self.source.broker.protocol != Protocol::V5
            && !self.source.broker.try_private
            && (self.spec.index != 0 || self.resumed_session)
        {
            // On 3.x a live message arrives with RETAIN 0 (MQTT-3.3.1-9), so RETAIN 1 is the
            // copy a SUBSCRIBE brings (MQTT-3.3.1-8): pair 0's first subscription forwards it,
            // every other pair and every re-SUBSCRIBE of a kept session would repeat it.
            PairStats::add(&self.spec.stats.retained_copies, 1);
            return self.discard(&p);
        }
        if self.is_echo(now, &p) {
            PairStats::add(&self.spec.stats.dropped_loop, 1);
            return self.discard(&p);
        }
        let mut rewritten = false;
        let topic = match route.rewrite.apply(&p.topic) {
            Ok(std::borrow::Cow::Owned(t)) => {
                rewritten = true;
                t
            }
            // Unchanged: the received topic moves on as it is, no copy.
            // Checked: a broken source may send a wildcard or NUL, which the target would refuse
            // by closing the connection.
            Ok(std::borrow::Cow::Borrowed(_)) => match crate::topic::name::validate(&p.topic) {
                Ok(()) => std::mem::take(&mut p.topic),
                Err(e) => {
                    let why = format!("the topic {e}");
                    return self.undeliverable(now, p, DropReason::InvalidTopic, &why);
                }
            },
            Err(e) => {
                let why = format!("the rewritten topic {e}");
                return self.undeliverable(now, p, DropReason::InvalidTopic, &why);
            }
        };
        let mut qos = p.qos.min(route.qos);
        if qos > self.target_max_qos {
            qos = self.target_max_qos;
            PairStats::add(&self.spec.stats.qos_downgraded, 1);
        }
        let target_v5 = self.target.broker.protocol == Protocol::V5;
        let mut properties = None;
        if let Some(mut props) = p.properties.clone() {
            if route.properties == PropertiesMode::Forward && target_v5 {
                if let Some(rt) = props.response_topic.as_deref()
                    && let Ok(std::borrow::Cow::Owned(rewritten)) = route.rewrite.apply(rt)
                {
                    props.response_topic = Some(rewritten);
                }
                properties = Some(props);
            } else {
                if !props.is_empty() {
                    PairStats::add(&self.spec.stats.properties_dropped, 1);
                }
                // Dropping properties keeps the loop markers: rings stay cut.
                let marks: Vec<_> = marker::markers(&props).cloned().collect();
                if target_v5 && !marks.is_empty() {
                    properties = Some(Box::new(crate::message::Properties {
                        user_properties: marks,
                        ..Default::default()
                    }));
                }
            }
        }
        let loops = &self.spec.loops;
        if target_v5 && loops.markers {
            marker::add(&mut properties, &loops.bridge_name, &loops.source_id);
        }
        let expires_at = p
            .properties
            .as_ref()
            .and_then(|pp| pp.message_expiry_interval)
            .map(|secs| now + Duration::from_secs(u64::from(secs)));
        let mut message = Message {
            topic,
            payload: p.payload.clone(),
            qos,
            retain: p.retain && route.retain == RetainMode::AsPublished,
            properties,
            expires_at,
            source_topic: None,
        };
        if message.retain && !self.target_retain {
            // RETAIN 1 to a broker without retained messages is a protocol error (it would
            // disconnect us with 0x9A, again and again): forward it as a live message.
            message.retain = false;
            PairStats::add(&self.spec.stats.retain_cleared, 1);
        }
        if let Some(max) = self.target_max_packet
            && message.encoded_size_bound() > max as usize
        {
            let why = format!(
                "{} bytes is over the target's Maximum Packet Size of {max}",
                message.encoded_size_bound()
            );
            if p.topic.is_empty() {
                p.topic = message.topic; // moved above; the log and dead letter name it
            }
            return self.undeliverable(now, p, DropReason::TooLarge, &why);
        }
        if self.spec.loops.record_echoes
            && let Some(d) = &self.spec.loops.digest
        {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            d.record(
                now,
                &self.target.broker.name,
                &message.topic,
                &message.payload,
            );
        }
        if rewritten {
            // Kept for a dead letter, which names the topic as received (moved, not copied).
            message.source_topic = Some(std::mem::take(&mut p.topic));
        }
        let pkid = (p.qos != Qos::AtMostOnce).then_some(p.pkid);
        self.source_window()
            .source_publish(pkid, p.qos, p.dup, message);
    }

    /// Whether a source message is one of ours coming back: it carries our marker (v5), or the
    /// digest remembers forwarding it to this (3.x) broker.
    fn is_echo(&self, now: Instant, p: &InboundPublish) -> bool {
        let loops = &self.spec.loops;
        let props = p.properties.as_deref();
        if marker::crossed(props, &loops.bridge_name) || marker::visited(props, &loops.target_id) {
            return true;
        }
        if !loops.check_echoes || p.dup {
            // A redelivery of something already judged must not consume another digest entry.
            return false;
        }
        loops.digest.as_ref().is_some_and(|d| {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            d.take_echo(now, &self.source.broker.name, &p.topic, &p.payload)
        })
    }

    /// A source message that will not reach the target: logged, counted, dead-lettered when the
    /// route has a `dead_letter` topic, and only then acknowledged to the source.
    fn undeliverable(&mut self, now: Instant, p: InboundPublish, reason: DropReason, why: &str) {
        let original = (p.qos != Qos::AtMostOnce).then_some(p.pkid);
        let props = p.properties.as_deref();
        let held = self.drop_message_of(now, &p.topic, &p.payload, props, reason, why, original);
        if held {
            // Its ack waits until the dead letter is written (`send_dead_letters`).
            self.source_window()
                .source_discard_held(p.pkid, p.qos, p.dup);
            self.send_dead_letters();
        } else {
            self.discard(&p);
        }
    }

    /// Logs (rate-limited), counts and dead-letters one dropped message whose source ack (if
    /// any) was already decided.
    fn drop_message(
        &mut self,
        now: Instant,
        topic: &str,
        payload: &bytes::Bytes,
        props: Option<&crate::message::Properties>,
        reason: DropReason,
        why: &str,
    ) {
        self.drop_message_of(now, topic, payload, props, reason, why, None);
        self.send_dead_letters();
    }

    /// Logs (rate-limited), counts and queues the dead letter of one dropped message. With
    /// `original` (its source packet id), returns whether that message's ack must wait for the
    /// dead letter to be written.
    #[allow(clippy::too_many_arguments)]
    fn drop_message_of(
        &mut self,
        now: Instant,
        topic: &str,
        payload: &bytes::Bytes,
        props: Option<&crate::message::Properties>,
        reason: DropReason,
        why: &str,
        original: Option<u16>,
    ) -> bool {
        let stats = &self.spec.stats;
        PairStats::add(reason.counter(stats), 1);
        if self
            .last_drop_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
        {
            self.last_drop_log = Some(now);
            let suppressed = std::mem::take(&mut self.drops_unlogged);
            if suppressed > 0 {
                warn!(route = %self.spec.route.name, topic, reason = reason.as_str(), "undeliverable message: {why} ({suppressed} more since the last such line, not logged one by one; mqbridge_messages_dropped_total counts each)");
            } else {
                warn!(route = %self.spec.route.name, topic, reason = reason.as_str(), "undeliverable message: {why}");
            }
        } else {
            self.drops_unlogged += 1;
        }
        let Some(dl) = self.spec.route.dead_letter.clone() else {
            return false;
        };
        let mut user = props.map(|p| p.user_properties.clone()).unwrap_or_default();
        user.push(("mqbridge-original-topic".into(), topic.to_string()));
        user.push(("mqbridge-reason".into(), reason.as_str().into()));
        let message = Message {
            topic: dl.as_str().to_string(),
            payload: payload.clone(),
            qos: Qos::AtLeastOnce,
            retain: false,
            properties: Some(Box::new(crate::message::Properties {
                user_properties: user,
                ..Default::default()
            })),
            expires_at: None,
            source_topic: None,
        };
        match self.dead_letters.push(DeadLetter { message, original }) {
            Ok(()) => original.is_some(),
            Err((dead_letter::Unsendable::TooLarge, letter)) => {
                PairStats::add(&self.spec.stats.dead_letters_unsendable, 1);
                warn!(route = %self.spec.route.name, topic, size = letter.message.encoded_size_bound(), "the dead letter is over the source broker's Maximum Packet Size: not sent (counted in mqbridge_dead_letters_unsendable_total)");
                false
            }
        }
    }

    /// Writes dead letters while their window on the source has room: resends after a
    /// reconnect first, then in order. Each written one releases its original's source ack,
    /// which is written after it on the same connection: the broker has the dead letter before
    /// it learns the original is done.
    fn send_dead_letters(&mut self) {
        if !self.source.is_up() {
            return;
        }
        while let Some(t) = self.dead_letters.poll_transmit() {
            self.source.codec.publish(
                t.pkid,
                t.dup,
                &t.letter.message,
                None,
                &mut self.source.wbuf,
            );
            if !t.dup {
                PairStats::add(&self.spec.stats.dead_lettered, 1);
            }
            if let Some(original) = t.letter.original {
                self.source_window().release_held(original);
            }
        }
    }

    /// Encodes what the window asked for into the write buffers.
    fn apply_actions(&mut self, now: Instant) {
        // With a spool, feeding the outlet may free room for more: go on until nothing moves.
        loop {
            let fed = self.spool_pass(now);
            self.apply_window_actions(now);
            if !fed && !self.intake_has_actions() {
                break;
            }
        }
        self.spool_flush_acks();
    }

    fn apply_window_actions(&mut self, now: Instant) {
        while let Some(action) = self.window.poll_action() {
            match action {
                Action::SendPublish { pkid, dup } => {
                    if !dup && !self.fit_to_target(now, pkid) {
                        continue;
                    }
                    let Some(m) = self.window.held(pkid) else {
                        continue;
                    };
                    let mut expiry = m.remaining_expiry(now);
                    if dup && expiry == Some(0) {
                        // The resumed target session holds this exchange (MQTT-4.4.0-1): it
                        // must be completed; only a message never sent to it may expire.
                        expiry = Some(1);
                    }
                    if expiry == Some(0) {
                        let (topic, payload, props) = (
                            m.source_topic().to_string(),
                            m.payload.clone(),
                            m.properties.clone(),
                        );
                        self.window.expired(pkid);
                        self.drop_message(
                            now,
                            &topic,
                            &payload,
                            props.as_deref(),
                            DropReason::Expired,
                            "its Message Expiry Interval ran out while held",
                        );
                        continue;
                    }
                    let size = m.encoded_size_bound();
                    self.target_pacer.spend(now, 1, size);
                    self.target
                        .codec
                        .publish(pkid, dup, m, expiry, &mut self.target.wbuf);
                    self.last_publish_write = Some(now);
                    let first = if dup {
                        // A resend keeps its first time: the outage counts in its latency.
                        !self.sent_at.contains_key(&pkid)
                    } else {
                        true
                    };
                    if first {
                        self.sent_at.insert(pkid, now);
                        self.send_order.push_back((pkid, now));
                    }
                }
                Action::SendQos0(m) => self.send_qos0(now, m),
                Action::SendPubRel(pkid) => self.target.codec.pubrel(pkid, &mut self.target.wbuf),
                Action::AckSource(ack) if self.intake.is_some() => self.spool_outlet_ack(ack),
                Action::AckSource(ack) => {
                    let before = self.source.wbuf.len();
                    write_ack(self.source.codec, &mut self.source.wbuf, ack);
                    match ack {
                        // QoS 2 acks never wait: the source's next step (PUBREL) waits on them,
                        // and its window (mosquitto's 20) holds the exchange until PUBCOMP.
                        SourceAck::PubRec(_) | SourceAck::PubComp(_) => self.ack_hold.clear(),
                        SourceAck::PubAck(_) => {
                            let bytes = self.source.wbuf.len() - before;
                            self.ack_hold.added(now, before, bytes);
                        }
                    }
                    self.mark_progress(now);
                }
                Action::Backoff { reason } => {
                    let pause = self.retry_backoff;
                    self.retry_at = Some(now + pause);
                    self.retry_backoff = (pause * 2).min(RETRY_BACKOFF_MAX);
                    if self
                        .last_drop_log
                        .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1))
                    {
                        self.last_drop_log = Some(now);
                        warn!(route = %self.spec.route.name, pair = self.spec.index, broker = %self.target.broker.name, "the target said {} ({reason:#04x}): publishing again in {pause:?}", link::reason_name(reason));
                    }
                }
                Action::Refused { message, reason } => {
                    let why = format!(
                        "the target refused it: {} ({reason:#04x})",
                        link::reason_name(reason)
                    );
                    self.drop_message(
                        now,
                        message.source_topic(),
                        &message.payload,
                        message.properties.as_deref(),
                        DropReason::Refused,
                        &why,
                    );
                }
            }
        }
    }

    /// Writes a QoS 0 message to the target (dropped, counted, while the target is down).
    fn send_qos0(&mut self, now: Instant, m: Message) {
        let expiry = m.remaining_expiry(now);
        if expiry == Some(0) {
            self.drop_message(
                now,
                m.source_topic(),
                &m.payload,
                m.properties.as_deref(),
                DropReason::Expired,
                "its Message Expiry Interval ran out",
            );
        } else if self.target.is_up() {
            PairStats::add(&self.spec.stats.bytes_forwarded, m.payload.len() as u64);
            let size = m.encoded_size_bound();
            self.target_pacer.spend(now, 1, size);
            self.target
                .codec
                .publish(0, false, &m, expiry, &mut self.target.wbuf);
            self.qos0_buffered += 1;
        } else {
            PairStats::add(&self.spec.stats.dropped_qos0_target_down, 1);
        }
    }

    /// Fits a held message, before its first write to this target session, to what the target's
    /// current connection allows: it may have come back with Retain Available 0, a lower Maximum
    /// QoS or a smaller Maximum Packet Size than when the message was taken in. Returns whether
    /// it is still to be written as a QoS ≥ 1 PUBLISH (otherwise it was settled here).
    fn fit_to_target(&mut self, now: Instant, pkid: u16) -> bool {
        let (retain_ok, max_qos, max_packet) = (
            self.target_retain,
            self.target_max_qos,
            self.target_max_packet,
        );
        let Some(m) = self.window.held_mut(pkid) else {
            return false;
        };
        if m.retain && !retain_ok {
            m.retain = false;
            PairStats::add(&self.spec.stats.retain_cleared, 1);
        }
        if let Some(max) = max_packet
            && m.encoded_size_bound() > max as usize
        {
            let why = format!(
                "{} bytes is over the target's Maximum Packet Size of {max}",
                m.encoded_size_bound()
            );
            let m = m.clone();
            self.window.settle_unsent(pkid, Unsent::TooLarge);
            let props = m.properties.as_deref();
            let topic = m.source_topic();
            self.drop_message(now, topic, &m.payload, props, DropReason::TooLarge, &why);
            return false;
        }
        if m.qos > max_qos {
            PairStats::add(&self.spec.stats.qos_downgraded, 1);
            if max_qos == Qos::AtMostOnce {
                let mut m = m.clone();
                m.qos = Qos::AtMostOnce;
                self.window.settle_unsent(pkid, Unsent::SentAtQos0);
                self.send_qos0(now, m);
                return false;
            }
            m.qos = max_qos;
        }
        true
    }

    /// Whether the target's quotas allow one more publish now. A pair held back says so at debug
    /// level (at most every 30 s): the route says it for the pool (`route::PacingWatch`), once,
    /// where 256 pairs at the quota said it 256 times.
    fn target_paced_ready(&mut self, now: Instant) -> bool {
        if self.target_pacer.ready(now) {
            return true;
        }
        PairStats::add(&self.spec.stats.paced, 1);
        if self
            .last_pacing_log
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(30))
        {
            self.last_pacing_log = Some(now);
            let b = &self.target.broker;
            debug!(route = %self.spec.route.name, pair = self.spec.index, broker = %b.name, max_publish_rate = ?b.max_publish_rate, bandwidth_limit = ?b.bandwidth_limit, "pair held back by the target's per-connection limit");
        }
        false
    }

    fn mark_progress(&self, now: Instant) {
        let ms = now.saturating_duration_since(self.spec.epoch).as_millis() as u64;
        PairStats::set(&self.spec.stats.last_progress_ms, ms);
    }

    /// The target answered a QoS 2 PUBLISH with PUBACK (it has no QoS 2): counted as a QoS
    /// downgrade, and said once per pair.
    fn qos2_taken_as_qos1(&mut self) {
        PairStats::add(&self.spec.stats.qos_downgraded, 1);
        if self.window.counters().qos2_taken_as_qos1 == 1 {
            warn!(route = %self.spec.route.name, pair = self.spec.index, broker = %self.target.broker.name, "the target answered a QoS 2 publish with PUBACK: it has no QoS 2 (RabbitMQ 3.x), so messages reach it at QoS 1, at least once; set routes.{}.qos = 1 to say so (counted in mqbridge_qos_downgraded_total)", self.spec.route.name);
        }
    }

    /// Accounts the time the window towards the target is full while the target is connected
    /// (QoS ≥ 1 only: QoS 0 takes no slot), published as `PairStats::window_full_ms`.
    fn track_window(&mut self, now: Instant) {
        let full = self.target.is_up() && self.window.free() == 0;
        match (full, self.window_full_since) {
            (true, None) => self.window_full_since = Some(now),
            (false, Some(since)) => {
                self.window_full_before += now.saturating_duration_since(since);
                self.window_full_since = None;
            }
            _ => {}
        }
        let ongoing = self
            .window_full_since
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(s));
        let ms = (self.window_full_before + ongoing).as_millis() as u64;
        PairStats::set(&self.spec.stats.window_full_ms, ms);
    }

    fn publish_stats(&self) {
        let s = &self.spec.stats;
        let c = self.window.counters();
        let taken = self.source_window_ref().counters();
        let b = self.base;
        PairStats::set(&s.received, b.received + taken.received);
        PairStats::set(&s.forwarded, b.forwarded + c.forwarded);
        PairStats::set(&s.redeliveries, b.redeliveries + taken.redeliveries);
        PairStats::set(&s.retried, b.retried + c.retried);
        let in_flight = self.window.in_flight() as u64;
        PairStats::set(&s.in_flight, in_flight);
        PairStats::raise(&s.in_flight_max, in_flight);
        PairStats::set(&s.window, self.window.window() as u64);
    }

    fn unsubscribe(&mut self) {
        let subs = self.spec.route.subscriptions();
        self.source
            .codec
            .unsubscribe(UNSUBSCRIBE_PKID, &subs, &mut self.source.wbuf);
    }

    /// Parking is complete: the broker confirmed the UNSUBSCRIBE, and on a live source
    /// connection nothing more arrived for `PARK_QUIET` (what the session held was resent and
    /// taken), and nothing is held.
    /// With a spool, also once the spool is empty: a pair leaving the pool forwards its
    /// backlog first (waiting for the target if it is away), so nothing acknowledged to the
    /// source is left in a directory no pair runs.
    fn parked(&self, now: Instant) -> bool {
        self.parking.as_ref().is_some_and(|p| {
            (p.nothing_held
                || (p.unsubscribed
                    && self.source.is_up()
                    && self.drained()
                    // Quiet since the source was free to send: a source holding its window for
                    // our acks sends nothing, and its session's queue would be lost with it
                    // (a target slow to ack for PARK_QUIET ended a retiring index with 130
                    // messages still queued for it at the source).
                    && self.source_free_since.is_some_and(|d| {
                        now.duration_since(self.last_source_read.max(d)) >= PARK_QUIET
                    })))
                && self.spool_empty()
        })
    }

    fn drained(&self) -> bool {
        // With a spool what the target has not taken stays in it: only the intake must be
        // done (everything durable and acknowledged to the source), and the outlet while the
        // target is there to finish with.
        let outlet_done =
            self.window.in_flight() == 0 || (self.intake.is_some() && !self.target.is_up());
        outlet_done
            && self.intake_drained()
            && self.dead_letters.in_flight() == 0
            && self.dead_letters.queued() == 0
            && self.target.wbuf.is_empty()
            && self.source.wbuf.is_empty()
    }

    /// Whether the source is read as far as its windows go (a PINGRESP would be seen).
    fn reading_source(&self) -> bool {
        self.source_window_ref().can_accept() && self.intake_open() && !self.draining
    }

    /// The next keep-alive deadline of either side: a PINGREQ due, or a PINGRESP overdue.
    fn keep_alive_due(&self) -> Option<Instant> {
        let read_source = self.reading_source();
        [(&self.source, read_source), (&self.target, true)]
            .into_iter()
            .filter(|(side, _)| side.is_up() && !side.keep_alive().is_zero())
            .map(|(side, reading)| {
                let ka = side.keep_alive();
                match side.ping_sent {
                    Some(sent) if reading => sent + ka + Duration::from_millis(1),
                    // Not read on purpose: the tick forgets the ping and pings again when due.
                    Some(sent) => sent.max(side.last_write) + ka.mul_f32(0.75),
                    None => side.last_write + ka.mul_f32(0.75),
                }
            })
            .min()
    }

    /// PINGREQ on idle connections; a connection whose PINGRESP does not come is dead.
    fn keep_alive_tick(&mut self, now: Instant) {
        let read_source = self.reading_source();
        for role in [Role::Source, Role::Target] {
            let reading = role == Role::Target || read_source;
            let side = self.side(role);
            let ka = side.keep_alive();
            if !side.is_up() || ka.is_zero() {
                continue;
            }
            if let Some(sent) = side.ping_sent {
                if !reading {
                    // We are not reading this socket on purpose; its PINGRESP waits unread.
                    side.ping_sent = None;
                } else if now.duration_since(sent) > ka {
                    self.close(now, role, &format!("no PINGRESP within {ka:?}"), false);
                    continue;
                }
            }
            let side = self.side(role);
            if now.duration_since(side.last_write) >= ka.mul_f32(0.75) && side.ping_sent.is_none() {
                side.codec.pingreq(&mut side.wbuf);
                side.ping_sent = Some(now);
                side.probe_sent.get_or_insert(now);
            }
        }
    }
}

/// Encodes an ack owed to the source.
fn write_ack(codec: Codec, buf: &mut BytesMut, ack: SourceAck) {
    match ack {
        SourceAck::PubAck(id) => codec.puback(id, buf),
        SourceAck::PubRec(id) => codec.pubrec(id, buf),
        SourceAck::PubComp(id) => codec.pubcomp(id, buf),
    }
}

#[cfg(test)]
mod tests;

mod spooled;
