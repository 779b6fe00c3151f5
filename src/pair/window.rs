//! The pair window: ack chaining and flow control between one source and one target connection,
//! as a plain state machine (events in, actions out; no sockets, no clocks).
//!
//! Invariants it keeps (and the property tests check):
//! - a QoS ≥ 1 source message is acknowledged to the source only after the target acknowledged
//!   the forwarded copy (PUBACK after PUBACK, PUBREC after PUBREC), and at most once;
//! - the target never has more than `window` of our QoS ≥ 1 publishes unacknowledged;
//! - a disconnect of either side loses nothing that was not acknowledged: held messages are sent
//!   again when the target is back, and a source redelivery (DUP) of a message still held is
//!   recognised by its packet id and not forwarded twice.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::{config::Qos, message::Message};

/// Packet ids are small, dense and not attacker-chosen in any way that matters here (a
/// broker could only slow its own pair), so they hash as themselves: no SipHash per message.
#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }
    fn write_u16(&mut self, n: u16) {
        // Spread the id over the high bits too: hashbrown uses the top 7 bits as tags.
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

type IdBuild = std::hash::BuildHasherDefault<IdHasher>;
/// A map keyed by packet id.
pub type IdMap<V> = HashMap<u16, V, IdBuild>;
type IdSet = HashSet<u16, IdBuild>;

/// What identifies a message for recognising a redelivery of it (QoS 2 only).
fn digest(m: &Message) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (m.topic.as_str(), &m.payload[..]).hash(&mut h);
    h.finish()
}

/// An acknowledgement owed to the source broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceAck {
    /// QoS 1 done.
    PubAck(u16),
    /// QoS 2, first half: the target has taken the message.
    PubRec(u16),
    /// QoS 2, second half: answer to the source's PUBREL.
    PubComp(u16),
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write PUBLISH `pkid` to the target; the message is `Window::held(pkid)`.
    SendPublish { pkid: u16, dup: bool },
    /// Write this message to the target at QoS 0 (nothing is held for it).
    SendQos0(Message),
    /// Write PUBREL to the target.
    SendPubRel(u16),
    /// Write this acknowledgement to the source.
    AckSource(SourceAck),
    /// The target refused a message with a reason code ≥ 0x80; it is acknowledged to the source
    /// anyway (it would be refused again), so the driver logs, counts and dead-letters it.
    Refused { message: Message, reason: u8 },
    /// The target said "not now" (`is_transient`): the message is queued again, as a new
    /// PUBLISH, and nothing is written until the driver calls [`Window::resume`] after a pause.
    Backoff { reason: u8 },
}

/// Reason codes of a PUBACK or PUBREC that mean "not now", not "never": 0x97 Quota exceeded and
/// 0x91 Packet Identifier in use. The exchange is over (an ack ≥ 0x80 ends it, MQTT-4.4.0-2), so
/// the message goes out again under a new packet id; nothing is dead-lettered.
pub fn is_transient(reason: u8) -> bool {
    matches!(reason, 0x91 | 0x97)
}

/// Where a held message came from, so its ack can go back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SourceRef {
    pkid: u16,
    qos: Qos,
    /// Source session generation: acks for a lost session are dropped, not sent to the new one.
    epoch: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// PUBLISH not written yet (target down, or window shrank on reconnect).
    Queued,
    /// PUBLISH written, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL written, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct Slot {
    message: Message,
    source: Option<SourceRef>,
    stage: Stage,
    /// Order of first arrival, for resending in order after a reconnect.
    seq: u64,
    /// Written to the target at least once: a resend carries DUP.
    sent: bool,
    /// Counted in `qos2_on_wire` when it was written (its QoS may be lowered afterwards, to a
    /// v5 target's Maximum QoS, by `held_mut`).
    wire_qos2: bool,
    /// What it counts against `max_bytes` ([`cost`]), fixed when it was taken.
    cost: usize,
}

/// Counters the driver turns into metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    /// Source PUBLISH packets taken (redeliveries of a held message not included).
    pub received: u64,
    /// Messages the target took (QoS 0 when written, QoS ≥ 1 on its ack).
    pub forwarded: u64,
    /// Refused by the target with a reason code ≥ 0x80.
    pub refused: u64,
    /// Source redeliveries recognised as already forwarded.
    pub redeliveries: u64,
    /// Acks from the target for packet ids we do not hold.
    pub unsolicited_acks: u64,
    /// Held messages whose Message Expiry ran out before they could be written.
    pub expired: u64,
    /// Messages published again after a transient refusal (0x97, 0x91).
    pub retried: u64,
    /// Source sessions found lost by a new PUBLISH reusing an id we owe an ack for.
    pub source_sessions_lost: u64,
    /// QoS 2 publishes the target answered with PUBACK: a broker without QoS 2 (RabbitMQ 3.x)
    /// took them at QoS 1.
    pub qos2_taken_as_qos1: u64,
}

/// How a held message ended without a target ack (`Window::settle_unsent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsent {
    Expired,
    SentAtQos0,
    TooLarge,
}

/// What a held message counts against `max_bytes`: its topic, payload and properties, and the
/// slot that holds it (about 200 bytes; small messages cost mostly that).
fn cost(m: &Message) -> usize {
    std::mem::size_of::<Slot>()
        + m.topic.len()
        + m.payload.len()
        + m.source_topic.as_ref().map_or(0, String::len)
        + m.properties
            .as_ref()
            .map_or(0, |_| std::mem::size_of::<crate::message::Properties>())
}

/// The window and ack-chaining state of one pair.
#[derive(Debug)]
pub struct Window {
    /// Most QoS ≥ 1 messages held at once (= target Receive Maximum capped by `max_inflight`).
    window: usize,
    /// Most bytes of held messages ([`cost`]): with small messages the count allows thousands,
    /// with large ones this bounds the memory (`max_inflight_bytes`).
    max_bytes: usize,
    /// The `cost` of every slot held.
    held_bytes: usize,
    slots: IdMap<Slot>,
    /// Held messages not yet written, in arrival order.
    queued: VecDeque<u16>,
    /// Slots written and not finished (`Published` or `Released`).
    on_wire: usize,
    /// At most this many of them QoS 2 (a 3.x target's QoS 2 window, within `window`).
    qos2_window: usize,
    /// QoS 2 slots written and not finished.
    qos2_on_wire: usize,
    /// Source packet id → target packet id, while the source ack is outstanding.
    pending: IdMap<u16>,
    /// QoS 2 source ids we sent PUBREC for and whose PUBREL has not come yet.
    awaiting_rel: IdSet,
    /// QoS 1 acks that fell due while the source was down: sent when the source redelivers.
    owed: IdSet,
    /// Source ids held or owed when the current source connection came up. The broker redelivers
    /// them with DUP right away; one whose ack we already sent on this connection crossed it, and
    /// must be neither forwarded nor acked again (the broker may reuse the id once it has the ack).
    carried: IdSet,
    /// The current source connection's PUBLISHes (QoS ≥ 1) in arrival order, each with its
    /// PUBACK or PUBREC once due: acks leave only from the front, so the source gets them in the
    /// order it sent the messages, refusals and discards included (MQTT-4.6.0-2/3). Every entry
    /// is a packet id the broker has in flight, so there are never more than 65,535.
    ack_order: VecDeque<(u16, Option<SourceAck>)>,
    /// Source messages not forwarded whose ack waits until their dead letter is written.
    held: IdMap<SourceRef>,
    /// QoS 2 source ids taken and not yet released (PUBREL): a digest of their message.
    qos2_digests: IdMap<u64>,
    /// QoS 2 exchanges the source completed (PUBREL seen), by id, until a PUBLISH without DUP
    /// reuses the id. mosquitto 2.0 may resend such a PUBLISH with DUP after a connection died at
    /// CONNECT (against MQTT-4.3.3); the same id and message is then answered, not forwarded.
    released: IdMap<(u64, u64)>,
    /// Source connections established so far; `released` entries carry the one they were
    /// released on, and are good for the resends at the start of later ones, until one of them
    /// gets past its resends (its first PUBLISH without DUP).
    source_conns: u64,
    /// From a source connection's start to its first PUBLISH without DUP: the broker is still
    /// resending what it had in flight.
    resend_phase: bool,
    source_up: bool,
    target_up: bool,
    /// After a transient refusal, until [`Window::resume`]: nothing new is written.
    paused: bool,
    epoch: u64,
    next_pkid: u16,
    next_seq: u64,
    actions: VecDeque<Action>,
    counters: Counters,
}

impl Window {
    /// A window allowing `window` QoS ≥ 1 messages in flight (at least 1).
    pub fn new(window: usize) -> Self {
        Window {
            window: window.clamp(1, u16::MAX as usize),
            max_bytes: usize::MAX,
            held_bytes: 0,
            slots: IdMap::default(),
            queued: VecDeque::new(),
            on_wire: 0,
            qos2_window: window.clamp(1, u16::MAX as usize),
            qos2_on_wire: 0,
            pending: IdMap::default(),
            awaiting_rel: IdSet::default(),
            owed: IdSet::default(),
            carried: IdSet::default(),
            ack_order: VecDeque::new(),
            held: IdMap::default(),
            qos2_digests: IdMap::default(),
            released: IdMap::default(),
            source_conns: 0,
            resend_phase: false,
            source_up: false,
            target_up: false,
            paused: false,
            epoch: 0,
            next_pkid: 1,
            next_seq: 0,
            actions: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    /// True while one more source message may be read: the target is up and the window has room.
    /// The driver stops reading the source socket otherwise, so the source broker holds the rest.
    pub fn can_accept(&self) -> bool {
        self.target_up && self.free() > 0
    }

    /// Bounds the bytes of held messages (the last one taken may cross it: a message larger
    /// than the bound still goes, alone).
    pub fn set_max_bytes(&mut self, max_bytes: usize) {
        self.max_bytes = max_bytes.max(1);
    }

    /// Bytes of the messages held, as counted against `max_bytes`.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// QoS ≥ 1 messages held (written or queued), the `mqbridge_inflight` gauge.
    pub fn in_flight(&self) -> usize {
        self.slots.len()
    }

    /// Messages written to the target and not yet finished: never above `window()`.
    pub fn on_wire(&self) -> usize {
        self.on_wire
    }

    pub fn window(&self) -> usize {
        self.window
    }

    /// Slots of the window not held (whether or not the target is up).
    pub fn free(&self) -> usize {
        if self.held_bytes >= self.max_bytes {
            return 0;
        }
        self.window.saturating_sub(self.slots.len())
    }

    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The held message for a `SendPublish` action.
    pub fn held(&self, pkid: u16) -> Option<&Message> {
        self.slots.get(&pkid).map(|s| &s.message)
    }

    /// The held message of a `SendPublish` about to be written, to fit it to what the target's
    /// current connection allows (retain, a Maximum QoS of 1). The caller changes it only for a
    /// first write to this target session (no DUP): a resend must repeat what the session holds.
    pub fn held_mut(&mut self, pkid: u16) -> Option<&mut Message> {
        self.slots
            .get_mut(&pkid)
            .filter(|s| s.stage == Stage::Published)
            .map(|s| &mut s.message)
    }

    /// Whether `poll_action` has something.
    pub fn has_actions(&self) -> bool {
        !self.actions.is_empty()
    }

    /// Next action for the driver, in order.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ---- source side -------------------------------------------------------------------------

    /// The source connection is up (CONNACK received). Without a resumed session the broker
    /// forgot every packet id we owe an ack for: those acks are dropped, the messages still go.
    pub fn source_connected(&mut self, session_present: bool) {
        // Acks due on the last connection and not said yet: a QoS 1 one is owed (said when the
        // broker resends); a QoS 2 one is said again when the broker resends (`awaiting_rel`).
        for (_, ack) in std::mem::take(&mut self.ack_order) {
            if let Some(SourceAck::PubAck(id)) = ack {
                self.owed.insert(id);
            }
        }
        self.source_up = true;
        self.source_conns += 1;
        // What earlier connections released stays answerable until a connection gets past the
        // broker's resends (`source_publish`), however many connections die before one does:
        // mosquitto resends a released PUBLISH after a connection that died right after its
        // CONNACK, and the chaos tests cut connections that fast (269 to 898 duplicates when
        // the digests were kept for the next connection only).
        self.resend_phase = true;
        if !session_present {
            self.source_session_lost();
        }
        self.carried = self
            .pending
            .keys()
            .chain(self.owed.iter())
            .copied()
            .collect();
    }

    /// The source broker no longer has the session our acks belong to: every ack we owe it is
    /// void (its ids may name new messages now); the messages themselves still go.
    fn source_session_lost(&mut self) {
        self.epoch += 1;
        self.pending.clear();
        self.awaiting_rel.clear();
        self.owed.clear();
        self.carried.clear();
        self.ack_order.clear();
        self.held.clear();
        self.qos2_digests.clear();
        self.released.clear();
        for slot in self.slots.values_mut() {
            slot.source = None;
        }
    }

    pub fn source_disconnected(&mut self) {
        self.source_up = false;
    }

    /// A PUBLISH from the source. `pkid` is `None` at QoS 0. `message.qos` is the QoS it will be
    /// forwarded with, already capped by the route and the target; `source_qos` is what the
    /// source used and decides the ack.
    pub fn source_publish(
        &mut self,
        pkid: Option<u16>,
        source_qos: Qos,
        dup: bool,
        message: Message,
    ) {
        let pkid = match (source_qos, pkid) {
            (Qos::AtMostOnce, _) | (_, None) => {
                self.counters.received += 1;
                self.counters.forwarded += 1;
                self.actions.push_back(Action::SendQos0(message));
                return;
            }
            (_, Some(id)) => id,
        };
        if !dup && self.resend_phase {
            // The broker moved past its resends: what earlier connections released is done.
            self.resend_phase = false;
            let now = self.source_conns;
            self.released.retain(|_, (_, conn)| *conn == now);
        }
        if self.held.contains_key(&pkid) {
            // Redelivery of a message whose dead letter is still to be written: its ack follows.
            return self.redelivered_in_place(pkid);
        }
        if self.pending.contains_key(&pkid) && !dup {
            // A new message under an id whose ack we still owe: a broker that kept the session
            // would resend that one with DUP (MQTT-3.3.1-1) and never reuse the id before our
            // ack, so the session is gone (MQTT 3.1 cannot say so in its CONNACK; #14 hole 2).
            self.counters.source_sessions_lost += 1;
            self.source_session_lost();
        }
        if self.pending.contains_key(&pkid) {
            // Redelivery of a message we still hold: its ack follows the target's.
            return self.redelivered_in_place(pkid);
        }
        if self.awaiting_rel.contains(&pkid) {
            if dup {
                // Our PUBREC was lost; say it again, do not forward again (exactly once).
                self.counters.redeliveries += 1;
                self.answer_in_order(SourceAck::PubRec(pkid));
                return;
            }
            // A new message reusing the id means the broker finished the old one.
            self.awaiting_rel.remove(&pkid);
        }
        if self.owed.remove(&pkid) && dup {
            self.counters.redeliveries += 1;
            self.answer_in_order(SourceAck::PubAck(pkid));
            return;
        }
        let digest = (source_qos == Qos::ExactlyOnce).then(|| digest(&message));
        if let Some(d) = digest {
            match self.released.remove(&pkid) {
                Some((done, _)) if dup && self.resend_phase && done == d => {
                    // Already forwarded once under this id: answer as a QoS 2 receiver does.
                    self.counters.redeliveries += 1;
                    self.qos2_digests.insert(pkid, d);
                    self.awaiting_rel.insert(pkid);
                    self.answer_in_order(SourceAck::PubRec(pkid));
                    return;
                }
                _ => {}
            }
            self.qos2_digests.insert(pkid, d);
        }
        if self.carried.remove(&pkid) && dup {
            // Redelivered before our ack (sent on this connection) reached the broker.
            self.counters.redeliveries += 1;
            return;
        }
        self.counters.received += 1;
        self.ack_order.push_back((pkid, None));
        let source = SourceRef {
            pkid,
            qos: source_qos,
            epoch: self.epoch,
        };
        if message.qos == Qos::AtMostOnce {
            // Forwarded at QoS 0 (route or target caps it): taken once written.
            self.counters.forwarded += 1;
            self.actions.push_back(Action::SendQos0(message));
            self.ack_source(source);
            return;
        }
        let target_pkid = self.allocate_pkid();
        self.pending.insert(pkid, target_pkid);
        self.insert_slot(target_pkid, message, Some(source));
    }

    /// A source PUBLISH that will not be forwarded (e.g. its topic rewrites to an invalid name):
    /// the driver has logged, counted and dead-lettered it, so it is acknowledged now rather than
    /// redelivered forever.
    pub fn source_discard(&mut self, pkid: u16, source_qos: Qos, dup: bool) {
        if self.pending.contains_key(&pkid) || (dup && self.awaiting_rel.contains(&pkid)) {
            self.counters.redeliveries += 1;
        } else {
            self.counters.received += 1;
        }
        if self.pending.contains_key(&pkid) {
            return;
        }
        self.owed.remove(&pkid);
        self.ack_order.push_back((pkid, None));
        self.ack_source(SourceRef {
            pkid,
            qos: source_qos,
            epoch: self.epoch,
        });
    }

    /// As [`Window::source_discard`], but the ack waits for [`Window::release_held`]: the
    /// message's dead letter must be written first.
    pub fn source_discard_held(&mut self, pkid: u16, source_qos: Qos, dup: bool) {
        if source_qos == Qos::AtMostOnce || self.pending.contains_key(&pkid) {
            return self.source_discard(pkid, source_qos, dup);
        }
        if self.held.contains_key(&pkid) {
            self.counters.redeliveries += 1;
            return;
        }
        self.counters.received += 1;
        self.owed.remove(&pkid);
        self.ack_order.push_back((pkid, None));
        let epoch = self.epoch;
        self.held.insert(
            pkid,
            SourceRef {
                pkid,
                qos: source_qos,
                epoch,
            },
        );
    }

    /// The dead letter of a held message was written: its source ack may go.
    pub fn release_held(&mut self, pkid: u16) {
        if let Some(source) = self.held.remove(&pkid) {
            self.ack_source(source);
        }
    }

    /// PUBREL from the source for a QoS 2 message we sent PUBREC for.
    pub fn source_pubrel(&mut self, pkid: u16) {
        self.awaiting_rel.remove(&pkid);
        // A PUBREC still waiting its turn is moot: the broker had one (this PUBREL answers it),
        // and once the exchange completes it may reuse the id for a new message, which a late
        // PUBREC would acknowledge unseen.
        self.ack_order
            .retain(|(_, due)| *due != Some(SourceAck::PubRec(pkid)));
        if let Some(d) = self.qos2_digests.remove(&pkid) {
            self.released.insert(pkid, (d, self.source_conns));
        } else if let Some((_, conn)) = self.released.get_mut(&pkid) {
            // The broker says PUBREL again (our PUBCOMP was lost): the exchange is released on
            // this connection too, and its PUBLISH may be resent on the next.
            *conn = self.source_conns;
        }
        self.push_source(SourceAck::PubComp(pkid));
    }

    // ---- target side -------------------------------------------------------------------------

    /// The target connection is up with room for `window` messages (its Receive Maximum capped by
    /// our `max_inflight`). Held messages are written again, in order; with a resumed session the
    /// same packet ids and DUP, and QoS 2 messages past PUBREC get their PUBREL again.
    pub fn target_connected(&mut self, session_present: bool, window: usize) {
        self.target_connected_qos2(session_present, window, window)
    }

    /// [`Window::target_connected`] with at most `qos2_window` of the `window` QoS 2 (towards
    /// 3.x targets, whose QoS 1 window may be larger than the QoS 2 one mosquitto enforces).
    pub fn target_connected_qos2(
        &mut self,
        session_present: bool,
        window: usize,
        qos2_window: usize,
    ) {
        self.target_up = true;
        self.paused = false; // a new connection starts with fresh quotas
        self.window = window.clamp(1, u16::MAX as usize);
        self.qos2_window = qos2_window.clamp(1, self.window);
        self.qos2_on_wire = 0;
        let mut held: Vec<(u64, u16)> = self.slots.iter().map(|(id, s)| (s.seq, *id)).collect();
        held.sort_unstable();
        self.queued.clear();
        self.on_wire = 0;
        for (_, pkid) in held {
            let slot = self.slots.get_mut(&pkid).expect("listed above");
            match slot.stage {
                Stage::Released if !session_present => {
                    // A new target session knows nothing of it, but the target took it at PUBREC.
                    self.take_slot(pkid);
                }
                Stage::Released => {
                    self.on_wire += 1;
                    self.qos2_on_wire += 1;
                    slot.wire_qos2 = true;
                    self.actions.push_back(Action::SendPubRel(pkid));
                }
                Stage::Queued | Stage::Published => {
                    slot.stage = Stage::Queued;
                    // A new target session never saw it: a first PUBLISH again (no DUP), which
                    // may expire; one the resumed session holds is resent whatever its expiry.
                    slot.sent &= session_present;
                    self.queued.push_back(pkid);
                }
            }
        }
        self.send_queued();
    }

    pub fn target_disconnected(&mut self) {
        self.target_up = false;
    }

    /// PUBACK from the target (QoS 1). `reason` ≥ 0x80 means refused. True when it answered a
    /// QoS 2 publish (counted in `qos2_taken_as_qos1`).
    pub fn target_puback(&mut self, pkid: u16, reason: u8) -> bool {
        if self.is(pkid, Stage::Published, Qos::ExactlyOnce) {
            // RabbitMQ 3.x has no QoS 2 and answers it with PUBACK: it took the message, at
            // QoS 1. Taken as its ack, or the slot would be held for ever (the window fills and
            // the route stalls).
            self.counters.qos2_taken_as_qos1 += 1;
            self.finish(pkid, reason);
            return true;
        }
        if !self.is(pkid, Stage::Published, Qos::AtLeastOnce) {
            self.counters.unsolicited_acks += 1;
            return false;
        }
        self.finish(pkid, reason);
        false
    }

    /// PUBREC from the target (QoS 2). `reason` ≥ 0x80 means refused and ends the exchange.
    pub fn target_pubrec(&mut self, pkid: u16, reason: u8) {
        if !self.is(pkid, Stage::Published, Qos::ExactlyOnce) {
            if self
                .slots
                .get(&pkid)
                .is_some_and(|s| s.stage == Stage::Released)
            {
                // A repeated PUBREC (e.g. our PUBREL crossed it): say PUBREL again.
                self.actions.push_back(Action::SendPubRel(pkid));
            } else {
                self.counters.unsolicited_acks += 1;
            }
            return;
        }
        if reason >= 0x80 {
            self.finish(pkid, reason);
            return;
        }
        let slot = self.slots.get_mut(&pkid).expect("checked above");
        slot.stage = Stage::Released;
        let source = slot.source.take();
        self.counters.forwarded += 1;
        self.actions.push_back(Action::SendPubRel(pkid));
        if let Some(source) = source {
            self.pending.remove(&source.pkid);
            self.ack_source(source);
        }
    }

    /// PUBCOMP from the target: the QoS 2 exchange is over and its place in the window is free.
    pub fn target_pubcomp(&mut self, pkid: u16) {
        if self
            .slots
            .get(&pkid)
            .is_none_or(|s| s.stage != Stage::Released)
        {
            self.counters.unsolicited_acks += 1;
            return;
        }
        let slot = self.take_slot(pkid).expect("checked above");
        self.off_wire(&slot);
        self.send_queued();
    }

    /// A written slot is finished (or taken back).
    fn off_wire(&mut self, slot: &Slot) {
        self.on_wire -= 1;
        if slot.wire_qos2 {
            self.qos2_on_wire -= 1;
        }
    }

    /// QoS 2 messages written and not finished: never above the QoS 2 window.
    pub fn qos2_on_wire(&self) -> usize {
        self.qos2_on_wire
    }

    /// The window that bounds what the target takes now: while QoS 2 exchanges are on the
    /// wire their own window (20 towards a 3.x target) binds, not the whole one (16384 there).
    /// Lingering is decided on it: on the whole window it held each QoS 2 batch back.
    pub fn binding_window(&self) -> usize {
        if self.qos2_on_wire > 0 {
            self.qos2_window
        } else {
            self.window
        }
    }

    /// The machine found the message of a `SendPublish` expired: it is not written. Its place in
    /// the window is freed and the source acknowledged (an expired message is done, not lost).
    pub fn expired(&mut self, pkid: u16) {
        self.settle_unsent(pkid, Unsent::Expired);
    }

    /// The message of a `SendPublish` is done without a target ack: expired, written at QoS 0
    /// (the target's Maximum QoS fell to 0), or too large for the target's current Maximum
    /// Packet Size (refused). Its place is freed and the source acknowledged.
    pub fn settle_unsent(&mut self, pkid: u16, how: Unsent) {
        let Some(slot) = self.slots.get(&pkid) else {
            return;
        };
        if slot.stage != Stage::Published {
            return;
        }
        let slot = self.take_slot(pkid).expect("checked above");
        self.off_wire(&slot);
        match how {
            Unsent::Expired => self.counters.expired += 1,
            Unsent::SentAtQos0 => self.counters.forwarded += 1,
            Unsent::TooLarge => self.counters.refused += 1,
        }
        if let Some(source) = slot.source {
            self.pending.remove(&source.pkid);
            self.ack_source(source);
        }
        self.send_queued();
    }

    /// The driver gives up on the oldest held message that is not past PUBREC (the target keeps
    /// closing the connection over it): it is removed and acknowledged to the source, and
    /// returned for the driver to log, count and dead-letter.
    pub fn give_up_oldest(&mut self) -> Option<Message> {
        let pkid = self.oldest_not_released()?;
        let slot = self.take_slot(pkid).expect("found above");
        if slot.stage == Stage::Published {
            self.off_wire(&slot);
        }
        self.queued.retain(|id| *id != pkid);
        self.counters.refused += 1;
        if let Some(source) = slot.source {
            self.pending.remove(&source.pkid);
            self.ack_source(source);
        }
        self.send_queued();
        Some(slot.message)
    }

    /// The oldest held message not past PUBREC: what [`Window::give_up_oldest`] would give up.
    pub fn oldest(&self) -> Option<&Message> {
        let pkid = self.oldest_not_released()?;
        self.slots.get(&pkid).map(|s| &s.message)
    }

    fn oldest_not_released(&self) -> Option<u16> {
        self.slots
            .iter()
            .filter(|(_, s)| s.stage != Stage::Released)
            .min_by_key(|(_, s)| s.seq)
            .map(|(id, _)| *id)
    }

    // ---- internals ---------------------------------------------------------------------------

    /// Whether the PUBLISH with this packet id is written and waits for its PUBACK or PUBREC.
    pub fn awaits_ack(&self, pkid: u16) -> bool {
        self.slots
            .get(&pkid)
            .is_some_and(|s| s.stage == Stage::Published)
    }

    fn is(&self, pkid: u16, stage: Stage, qos: Qos) -> bool {
        self.slots
            .get(&pkid)
            .is_some_and(|s| s.stage == stage && s.message.qos == qos)
    }

    /// The pause after a transient refusal is over: write what is queued.
    pub fn resume(&mut self) {
        self.paused = false;
        self.send_queued();
    }

    /// The first ack of a published slot: done (or refused). Frees the slot and acks the source.
    fn finish(&mut self, pkid: u16, reason: u8) {
        let slot = self.take_slot(pkid).expect("caller checked");
        self.off_wire(&slot);
        if is_transient(reason) {
            return self.requeue(pkid, slot, reason);
        }
        if reason >= 0x80 {
            self.counters.refused += 1;
            self.actions.push_back(Action::Refused {
                message: slot.message,
                reason,
            });
        } else {
            self.counters.forwarded += 1;
        }
        if let Some(source) = slot.source {
            self.pending.remove(&source.pkid);
            self.ack_source(source);
        }
        self.send_queued();
    }

    /// Queues a message the target refused for now under a new packet id, in its place by
    /// arrival, and pauses writing. On 0x91 the old id is released (PUBREL): the target holds a
    /// stale exchange under it.
    fn requeue(&mut self, old: u16, mut slot: Slot, reason: u8) {
        self.counters.retried += 1;
        if reason == 0x91 {
            self.actions.push_back(Action::SendPubRel(old));
        }
        let new = self.allocate_pkid();
        if let Some(src) = slot.source {
            self.pending.insert(src.pkid, new);
        }
        slot.stage = Stage::Queued;
        slot.sent = false; // a new PUBLISH, not a resend: no DUP
        let seq = slot.seq;
        self.put_slot(new, slot);
        let at = self
            .queued
            .iter()
            .position(|id| self.slots.get(id).is_some_and(|s| s.seq > seq))
            .unwrap_or(self.queued.len());
        self.queued.insert(at, new);
        if !self.paused {
            self.paused = true;
            self.actions.push_back(Action::Backoff { reason });
        }
    }

    fn insert_slot(&mut self, pkid: u16, message: Message, source: Option<SourceRef>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let cost = cost(&message);
        self.put_slot(
            pkid,
            Slot {
                message,
                source,
                stage: Stage::Queued,
                seq,
                sent: false,
                wire_qos2: false,
                cost,
            },
        );
        self.queued.push_back(pkid);
        self.send_queued();
    }

    fn put_slot(&mut self, pkid: u16, slot: Slot) {
        self.held_bytes += slot.cost;
        if let Some(old) = self.slots.insert(pkid, slot) {
            self.held_bytes -= old.cost;
        }
    }

    fn take_slot(&mut self, pkid: u16) -> Option<Slot> {
        let slot = self.slots.remove(&pkid)?;
        self.held_bytes -= slot.cost;
        Some(slot)
    }

    /// Writes queued messages while the target is up and the window has room.
    fn send_queued(&mut self) {
        while self.target_up && !self.paused && self.on_wire < self.window {
            let Some(&pkid) = self.queued.front() else {
                break;
            };
            let slot = self.slots.get_mut(&pkid).expect("queued ids are held");
            let qos2 = slot.message.qos == Qos::ExactlyOnce;
            if qos2 && self.qos2_on_wire >= self.qos2_window {
                // In order: what comes after waits too (acks to the source leave in order).
                break;
            }
            self.queued.pop_front();
            slot.wire_qos2 = qos2;
            slot.stage = Stage::Published;
            let dup = std::mem::replace(&mut slot.sent, true);
            self.on_wire += 1;
            self.qos2_on_wire += usize::from(qos2);
            self.actions.push_back(Action::SendPublish { pkid, dup });
        }
    }

    fn ack_source(&mut self, source: SourceRef) {
        if source.epoch != self.epoch {
            return; // that session is gone; its broker will not expect this ack
        }
        let ack = match source.qos {
            Qos::AtMostOnce => return,
            Qos::AtLeastOnce if self.source_up => SourceAck::PubAck(source.pkid),
            Qos::AtLeastOnce => {
                self.owed.insert(source.pkid);
                return;
            }
            Qos::ExactlyOnce => {
                self.awaiting_rel.insert(source.pkid);
                SourceAck::PubRec(source.pkid)
            }
        };
        self.ack_in_order(source.pkid, ack);
    }

    /// A redelivery of a message whose ack is still to come: it takes its place among what
    /// this connection delivered, once.
    fn redelivered_in_place(&mut self, pkid: u16) {
        self.counters.redeliveries += 1;
        let placed = self
            .ack_order
            .iter()
            .any(|(id, due)| *id == pkid && due.is_none());
        if !placed {
            self.ack_order.push_back((pkid, None));
        }
    }

    /// Says `ack` for source id `pkid` once every PUBLISH that arrived before it is acked. An
    /// id not in the current connection's order (its resend has not come yet) is acked at once.
    fn ack_in_order(&mut self, pkid: u16, ack: SourceAck) {
        match self
            .ack_order
            .iter_mut()
            .find(|(id, due)| *id == pkid && due.is_none())
        {
            Some((_, due)) => *due = Some(ack),
            None => return self.push_source(ack),
        }
        self.flush_acks();
    }

    /// Answers a PUBLISH that just arrived (a resend of something done) behind what came before.
    fn answer_in_order(&mut self, ack: SourceAck) {
        self.ack_order.push_back((0, Some(ack)));
        self.flush_acks();
    }

    fn flush_acks(&mut self) {
        while let Some((_, Some(_))) = self.ack_order.front() {
            let (_, ack) = self.ack_order.pop_front().expect("checked");
            self.push_source(ack.expect("checked"));
        }
    }

    fn push_source(&mut self, ack: SourceAck) {
        if self.source_up {
            self.actions.push_back(Action::AckSource(ack));
        }
    }

    fn allocate_pkid(&mut self) -> u16 {
        // At most 65535 slots exist (the window is capped), so a free id is always found.
        loop {
            let id = self.next_pkid;
            self.next_pkid = self.next_pkid.checked_add(1).unwrap_or(1);
            if !self.slots.contains_key(&id) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! A model of both brokers around the window, driven by random event sequences, with lossy
    //! links that drop what is in transit when a connection breaks.
    use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

    use bytes::Bytes;
    use proptest::prelude::*;

    use super::*;

    fn msg(id: u32, qos: Qos) -> Message {
        Message {
            topic: format!("t/{id}"),
            payload: Bytes::from(id.to_be_bytes().to_vec()),
            qos,
            retain: false,
            properties: None,
            expires_at: None,
            source_topic: None,
        }
    }

    fn id_of(m: &Message) -> u32 {
        u32::from_be_bytes(m.payload[..4].try_into().unwrap())
    }

    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// The source broker offers its next message (if the pair reads).
        Offer,
        /// Deliver what the bridge wrote towards the target.
        ToTarget,
        /// The target acks one outstanding publish/pubrel (by index).
        TargetAck(usize),
        /// Deliver what the bridge wrote towards the source.
        ToSource,
        /// The source broker sends PUBREL for one PUBREC'd message (by index).
        SourceRel(usize),
        SourceDrop,
        TargetDrop,
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            4 => Just(Step::Offer),
            4 => Just(Step::ToTarget),
            4 => (0usize..64).prop_map(Step::TargetAck),
            4 => Just(Step::ToSource),
            2 => (0usize..64).prop_map(Step::SourceRel),
            1 => Just(Step::SourceDrop),
            1 => Just(Step::TargetDrop),
        ]
    }

    /// Source broker with a persistent session: a queue of messages, in-flight publishes by
    /// packet id, and what it has been acknowledged.
    #[derive(Default)]
    struct SourceBroker {
        next: u32,
        total: u32,
        qos: Vec<Qos>,
        /// pkid → (message id, PUBREC received)
        inflight: BTreeMap<u16, (u32, bool)>,
        next_pkid: u16,
        acked: HashSet<u32>,
        up: bool,
        /// Packets written by the bridge towards the source, lost on disconnect.
        wire: VecDeque<SourceAck>,
        /// Packet ids to send again after a reconnect (PUBLISH with DUP, or PUBREL).
        redeliver: VecDeque<u16>,
    }

    /// Target broker: QoS 2 receiver state by packet id, and what its subscribers got.
    #[derive(Default)]
    struct TargetBroker {
        up: bool,
        /// What the bridge wrote (the held message is encoded at write time), lost on disconnect.
        wire: VecDeque<(Action, Option<Message>)>,
        /// Acks the target owes on the current connection: pkid → what it will answer. A broker
        /// answers packets received on the connection; what it owed the last one is gone.
        ackable: BTreeMap<u16, TargetAck>,
        /// QoS 2 messages received and not released (the receiver's dedupe state, kept in the
        /// target's session across reconnects).
        stored: HashMap<u16, u32>,
        delivered: HashMap<u32, u32>,
        /// Message ids the target has acknowledged (PUBACK or PUBREC sent).
        took: HashSet<u32>,
        max_unacked: usize,
    }

    #[derive(Debug, Clone, Copy)]
    #[allow(clippy::enum_variant_names)] // named after the packets
    enum TargetAck {
        PubAck(u32),
        PubRec(u32),
        PubComp,
    }

    struct World {
        w: Window,
        s: SourceBroker,
        t: TargetBroker,
        window: usize,
        /// At most this many QoS 2 on the wire (half the window: a 3.x target's QoS 2 window).
        qos2_window: usize,
    }

    impl World {
        fn new(qos: Vec<Qos>, window: usize) -> Self {
            let mut w = World {
                w: Window::new(window),
                s: SourceBroker {
                    total: qos.len() as u32,
                    qos,
                    next_pkid: 1,
                    ..Default::default()
                },
                t: TargetBroker::default(),
                window,
                qos2_window: window.div_ceil(2),
            };
            w.connect_target();
            w.connect_source();
            w
        }

        fn pump(&mut self) {
            while let Some(a) = self.w.poll_action() {
                match a {
                    Action::AckSource(ack) => self.s.wire.push_back(ack),
                    Action::Refused { .. } | Action::Backoff { .. } => {
                        panic!("nothing refuses here")
                    }
                    Action::SendPublish { pkid, dup } => {
                        let m = self
                            .w
                            .held(pkid)
                            .expect("a publish we are asked to send is held")
                            .clone();
                        self.t
                            .wire
                            .push_back((Action::SendPublish { pkid, dup }, Some(m)));
                    }
                    other => self.t.wire.push_back((other, None)),
                }
            }
        }

        fn connect_source(&mut self) {
            self.s.up = true;
            self.w.source_connected(true);
            // Every unacknowledged publish goes again with DUP, PUBREL for PUBREC'd ones, before
            // anything new; the pair reads them like any other packet.
            self.s.redeliver = self.s.inflight.keys().copied().collect();
        }

        fn connect_target(&mut self) {
            self.t.up = true;
            self.w
                .target_connected_qos2(true, self.window, self.qos2_window);
            self.pump();
        }

        fn apply(&mut self, step: Step) {
            match step {
                Step::Offer if self.s.up && self.w.can_accept() && !self.s.redeliver.is_empty() => {
                    let pkid = self.s.redeliver.pop_front().unwrap();
                    if let Some(&(id, rec)) = self.s.inflight.get(&pkid) {
                        if rec {
                            self.w.source_pubrel(pkid);
                        } else {
                            let q = self.s.qos[id as usize];
                            self.w.source_publish(Some(pkid), q, true, msg(id, q));
                        }
                    }
                }
                Step::Offer => {
                    if self.s.up && self.w.can_accept() && self.s.next < self.s.total {
                        let id = self.s.next;
                        self.s.next += 1;
                        let q = self.s.qos[id as usize];
                        if q == Qos::AtMostOnce {
                            self.w.source_publish(None, q, false, msg(id, q));
                        } else {
                            let mut pkid = self.s.next_pkid;
                            while self.s.inflight.contains_key(&pkid) {
                                pkid = pkid % 100 + 1;
                            }
                            self.s.next_pkid = pkid % 100 + 1;
                            self.s.inflight.insert(pkid, (id, false));
                            self.w.source_publish(Some(pkid), q, false, msg(id, q));
                        }
                    }
                }
                Step::ToTarget => {
                    while let Some((a, m)) = self.t.wire.pop_front() {
                        self.target_receives(a, m);
                    }
                }
                Step::TargetAck(i) => {
                    if !self.t.up || self.t.ackable.is_empty() {
                        return;
                    }
                    let pkid = *self.t.ackable.keys().nth(i % self.t.ackable.len()).unwrap();
                    match self.t.ackable.remove(&pkid).unwrap() {
                        TargetAck::PubAck(id) => {
                            self.t.took.insert(id);
                            self.w.target_puback(pkid, 0);
                        }
                        TargetAck::PubRec(id) => {
                            self.t.took.insert(id);
                            self.w.target_pubrec(pkid, 0);
                        }
                        TargetAck::PubComp => self.w.target_pubcomp(pkid),
                    }
                }
                Step::ToSource => {
                    while let Some(ack) = self.s.wire.pop_front() {
                        self.source_receives(ack);
                    }
                }
                Step::SourceRel(i) => {
                    let recs: Vec<u16> = self
                        .s
                        .inflight
                        .iter()
                        .filter(|(_, (_, r))| *r)
                        .map(|(p, _)| *p)
                        .collect();
                    if self.s.up && self.s.redeliver.is_empty() && !recs.is_empty() {
                        self.w.source_pubrel(recs[i % recs.len()]);
                    }
                }
                Step::SourceDrop => {
                    self.s.up = false;
                    self.s.wire.clear();
                    self.w.source_disconnected();
                }
                Step::TargetDrop => {
                    self.t.up = false;
                    self.t.wire.clear();
                    self.t.ackable.clear();
                    self.w.target_disconnected();
                }
            }
            self.pump();
            if !self.s.up && matches!(step, Step::Offer) {
                self.connect_source();
            }
            if !self.t.up && matches!(step, Step::ToTarget) {
                self.connect_target();
            }
            self.check();
        }

        fn target_receives(&mut self, a: Action, m: Option<Message>) {
            match a {
                Action::SendPublish { pkid, .. } => {
                    let m = m.expect("publishes carry their message");
                    let id = id_of(&m);
                    if m.qos == Qos::AtLeastOnce {
                        *self.t.delivered.entry(id).or_default() += 1;
                        self.t.ackable.insert(pkid, TargetAck::PubAck(id));
                    } else {
                        // A QoS 2 receiver delivers once per packet id until PUBREL.
                        if self.t.stored.insert(pkid, id).is_none() {
                            *self.t.delivered.entry(id).or_default() += 1;
                        }
                        self.t.ackable.insert(pkid, TargetAck::PubRec(id));
                    }
                    let outstanding = self.t.stored.len()
                        + self
                            .t
                            .ackable
                            .keys()
                            .filter(|p| !self.t.stored.contains_key(p))
                            .count();
                    self.t.max_unacked = self.t.max_unacked.max(outstanding);
                }
                Action::SendQos0(m) => *self.t.delivered.entry(id_of(&m)).or_default() += 1,
                Action::SendPubRel(pkid) => {
                    self.t.stored.remove(&pkid);
                    self.t.ackable.insert(pkid, TargetAck::PubComp);
                }
                other => panic!("{other:?} is not for the target"),
            }
            self.pump();
        }

        fn source_receives(&mut self, ack: SourceAck) {
            match ack {
                SourceAck::PubAck(pkid) => {
                    let (id, rec) = self
                        .s
                        .inflight
                        .remove(&pkid)
                        .expect("PUBACK for an id in flight");
                    assert!(!rec);
                    assert_eq!(self.s.qos[id as usize], Qos::AtLeastOnce);
                    assert!(
                        self.t.took.contains(&id),
                        "message {id} acked before the target took it"
                    );
                    assert!(self.s.acked.insert(id), "message {id} acked twice");
                }
                SourceAck::PubRec(pkid) => {
                    let entry = self
                        .s
                        .inflight
                        .get_mut(&pkid)
                        .expect("PUBREC for an id in flight");
                    let id = entry.0;
                    assert!(
                        self.t.took.contains(&id),
                        "message {id} acked before the target took it"
                    );
                    if !entry.1 {
                        entry.1 = true;
                        assert!(self.s.acked.insert(id), "message {id} acked twice");
                    }
                }
                SourceAck::PubComp(pkid) => {
                    if self.s.inflight.get(&pkid).is_some_and(|(_, r)| *r) {
                        self.s.inflight.remove(&pkid);
                    }
                }
            }
        }

        fn check(&self) {
            assert!(
                self.t.max_unacked <= self.window,
                "target saw {} unacked > window {}",
                self.t.max_unacked,
                self.window
            );
            assert!(self.w.on_wire() <= self.window);
            assert!(self.w.qos2_on_wire() <= self.qos2_window);
            assert!(self.w.in_flight() <= self.window);
            let held: usize = self.w.slots.values().map(|s| s.cost).sum();
            assert_eq!(self.w.held_bytes(), held);
        }

        /// Reconnect everything and let every exchange finish.
        fn settle(&mut self) {
            for _ in 0..10_000 {
                if !self.s.up {
                    self.connect_source();
                }
                if !self.t.up {
                    self.connect_target();
                }
                for step in [
                    Step::ToTarget,
                    Step::TargetAck(0),
                    Step::ToSource,
                    Step::SourceRel(0),
                    Step::Offer,
                ] {
                    self.apply(step);
                }
                if self.s.next == self.s.total
                    && self.s.inflight.is_empty()
                    && self.w.in_flight() == 0
                    && self.t.wire.is_empty()
                    && self.t.ackable.is_empty()
                {
                    return;
                }
            }
            panic!(
                "did not settle: {} in flight at the source, {} held",
                self.s.inflight.len(),
                self.w.in_flight()
            );
        }
    }

    fn qos_list() -> impl Strategy<Value = Vec<Qos>> {
        prop::collection::vec(
            prop_oneof![
                Just(Qos::AtMostOnce),
                Just(Qos::AtLeastOnce),
                Just(Qos::ExactlyOnce)
            ],
            1..60,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

        /// Every QoS ≥ 1 message is acked exactly once and only after the target took it; the
        /// target never sees more than the window; nothing is lost across disconnects; QoS 2
        /// reaches the target's subscribers exactly once.
        #[test]
        fn ack_chaining_survives_any_interleaving(qos in qos_list(), window in 1usize..8, bytes_bound in prop::option::of(1usize..4), steps in prop::collection::vec(step(), 0..300)) {
            let mut world = World::new(qos.clone(), window);
            if let Some(n) = bytes_bound {
                // A bytes bound of 1 to 3 messages, below or above the count.
                world.w.set_max_bytes(n * cost(&msg(0, Qos::AtLeastOnce)));
            }
            for s in steps {
                world.apply(s);
            }
            world.settle();
            for (id, q) in qos.iter().enumerate() {
                let id = id as u32;
                let got = world.t.delivered.get(&id).copied().unwrap_or(0);
                match q {
                    Qos::AtMostOnce => prop_assert!(got <= 1),
                    Qos::AtLeastOnce => {
                        prop_assert!(got >= 1, "QoS 1 message {} lost", id);
                        prop_assert!(world.s.acked.contains(&id));
                    }
                    Qos::ExactlyOnce => {
                        prop_assert_eq!(got, 1, "QoS 2 message {} delivered {} times", id, got);
                        prop_assert!(world.s.acked.contains(&id));
                    }
                }
            }
        }
    }

    #[test]
    fn window_full_stops_reading_and_an_ack_resumes_it() {
        let mut w = Window::new(2);
        w.target_connected(false, 2);
        w.source_connected(false);
        w.source_publish(Some(1), Qos::AtLeastOnce, false, msg(1, Qos::AtLeastOnce));
        w.source_publish(Some(2), Qos::AtLeastOnce, false, msg(2, Qos::AtLeastOnce));
        assert!(!w.can_accept());
        assert_eq!(
            w.poll_action(),
            Some(Action::SendPublish {
                pkid: 1,
                dup: false
            })
        );
        assert_eq!(
            w.poll_action(),
            Some(Action::SendPublish {
                pkid: 2,
                dup: false
            })
        );
        assert_eq!(w.poll_action(), None, "no ack before the target's");
        w.target_puback(2, 0);
        assert!(w.can_accept());
        assert_eq!(
            w.poll_action(),
            None,
            "2's ack waits for 1's (arrival order)"
        );
        w.target_puback(1, 0);
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubAck(1)))
        );
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubAck(2)))
        );
    }

    #[test]
    fn qos2_source_ack_waits_for_target_pubrec_and_window_for_pubcomp() {
        let mut w = Window::new(1);
        w.target_connected(false, 1);
        w.source_connected(false);
        w.source_publish(Some(7), Qos::ExactlyOnce, false, msg(1, Qos::ExactlyOnce));
        assert_eq!(
            w.poll_action(),
            Some(Action::SendPublish {
                pkid: 1,
                dup: false
            })
        );
        w.target_pubrec(1, 0);
        assert_eq!(w.poll_action(), Some(Action::SendPubRel(1)));
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubRec(7)))
        );
        assert!(!w.can_accept(), "PUBREL outstanding still holds the window");
        // A redelivery of 7 (our PUBREC was lost) is answered, not forwarded again.
        w.source_publish(Some(7), Qos::ExactlyOnce, true, msg(1, Qos::ExactlyOnce));
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubRec(7)))
        );
        w.target_pubcomp(1);
        w.source_pubrel(7);
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubComp(7)))
        );
        assert!(w.can_accept());
    }

    #[test]
    fn refused_message_is_reported_and_still_acked() {
        let mut w = Window::new(4);
        w.target_connected(false, 4);
        w.source_connected(false);
        w.source_publish(Some(3), Qos::AtLeastOnce, false, msg(1, Qos::AtLeastOnce));
        w.poll_action();
        w.target_puback(1, 0x87);
        assert!(matches!(
            w.poll_action(),
            Some(Action::Refused { reason: 0x87, .. })
        ));
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubAck(3)))
        );
        assert_eq!(w.counters().refused, 1);
    }

    /// A window of `size` with both sides up (sessions present or not).
    fn connected(size: usize, target_session: bool, source_session: bool) -> Window {
        let mut w = Window::new(size);
        w.target_connected(target_session, size);
        w.source_connected(source_session);
        w
    }

    /// `max_inflight_bytes`: with room in the count, the bytes held stop the reading; an ack
    /// gives them back; a message larger than the whole bound still goes, alone.
    #[test]
    fn held_bytes_bound_the_window_as_the_count_does() {
        let one = cost(&msg(1, Qos::AtLeastOnce));
        let mut w = connected(100, false, false);
        w.set_max_bytes(3 * one);
        let mut sent = Vec::new();
        for id in 1..=3u16 {
            assert!(w.can_accept(), "message {id}");
            w.source_publish(
                Some(id),
                Qos::AtLeastOnce,
                false,
                msg(id.into(), Qos::AtLeastOnce),
            );
            while let Some(a) = w.poll_action() {
                if let Action::SendPublish { pkid, .. } = a {
                    sent.push(pkid);
                }
            }
        }
        assert_eq!(w.held_bytes(), 3 * one);
        assert!(!w.can_accept(), "3 messages hold the bytes allowed");
        assert_eq!(
            w.free(),
            0,
            "full for the pool and the window-full time too"
        );
        w.target_puback(sent[0], 0);
        while w.poll_action().is_some() {}
        assert_eq!(w.held_bytes(), 2 * one);
        assert!(w.can_accept());

        let mut w = connected(100, false, false);
        w.set_max_bytes(one / 2);
        assert!(w.can_accept());
        w.source_publish(Some(1), Qos::AtLeastOnce, false, msg(1, Qos::AtLeastOnce));
        assert!(matches!(w.poll_action(), Some(Action::SendPublish { .. })));
        assert!(!w.can_accept(), "nothing more until it is acknowledged");
    }

    /// The QoS 2 exchange of `pkid` with `message` goes all the way through (PUBCOMP to the source).
    fn complete_qos2(w: &mut Window, pkid: u16, message: Message) {
        w.source_publish(Some(pkid), Qos::ExactlyOnce, false, message);
        let Some(Action::SendPublish { pkid: t, .. }) = w.poll_action() else {
            panic!("forwarded")
        };
        w.target_pubrec(t, 0);
        w.target_pubcomp(t);
        w.source_pubrel(pkid);
        while w.poll_action().is_some() {}
    }

    fn forwarded(w: &mut Window) -> bool {
        std::iter::from_fn(|| w.poll_action()).any(|a| matches!(a, Action::SendPublish { .. }))
    }

    /// The source connection drops and comes back, `times` times, its session kept.
    fn reconnect_source(w: &mut Window, times: usize) {
        for _ in 0..times {
            w.source_disconnected();
            w.source_connected(true);
        }
    }

    /// The broker moves past its resends on this connection: a new PUBLISH without DUP.
    fn past_resends(w: &mut Window) {
        w.source_publish(Some(3), Qos::ExactlyOnce, false, msg(2, Qos::ExactlyOnce));
        while w.poll_action().is_some() {}
    }

    /// The DUP PUBLISH of `online` under id 7 is answered PUBREC, not forwarded.
    fn resend_is_answered(w: &mut Window, online: Message) {
        w.source_publish(Some(7), Qos::ExactlyOnce, true, online);
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubRec(7))),
            "answered, not forwarded"
        );
        assert_eq!(w.poll_action(), None);
    }

    /// Issue #14, hole 3: the digest of a released QoS 2 message (kept for mosquitto's resend
    /// of it at a reconnect) swallowed a new message that reused the id with the same topic and
    /// payload (a repeated "online") when that one came with DUP. It is good only for the resends
    /// at the start of later connections, until one of them gets past its resends.
    #[test]
    fn a_released_digest_is_forgotten_once_the_broker_moved_past_its_resends() {
        let online = || msg(1, Qos::ExactlyOnce);
        // Past the resends on the next connection: a new message with DUP is forwarded.
        let mut w = connected(8, true, true);
        complete_qos2(&mut w, 7, online());
        reconnect_source(&mut w, 1);
        past_resends(&mut w);
        w.source_publish(Some(7), Qos::ExactlyOnce, true, online());
        assert!(
            forwarded(&mut w),
            "a new message, not a resend of the released one"
        );

        // Two connections later, the one between past its resends: forwarded too.
        let mut w = connected(8, true, true);
        complete_qos2(&mut w, 7, online());
        reconnect_source(&mut w, 1);
        past_resends(&mut w);
        reconnect_source(&mut w, 1);
        w.source_publish(Some(7), Qos::ExactlyOnce, true, online());
        assert!(forwarded(&mut w));

        // Connections that die before the broker gets past its resends (mosquitto resends a
        // released PUBLISH after a connection died right after its CONNACK, and the chaos test
        // cut three in a row): it is still mosquitto's resend on the one after them, answered.
        let mut w = connected(8, true, true);
        complete_qos2(&mut w, 7, online());
        reconnect_source(&mut w, 3);
        resend_is_answered(&mut w, online());

        // Right at the start of the next connection it is still mosquitto's resend: answered.
        let mut w = connected(8, true, true);
        complete_qos2(&mut w, 7, online());
        reconnect_source(&mut w, 1);
        resend_is_answered(&mut w, online());
    }

    /// The broker says PUBREL again for a released exchange (our PUBCOMP was lost with the
    /// connection): that connection released it too. Its digest outlives the connection's move
    /// past the resends, and answers mosquitto's resend of the PUBLISH on the next one (the
    /// chaos test's run with 898 duplicates: PUBREL again on one connection, PUBLISH again on
    /// the next that lasted).
    #[test]
    fn a_pubrel_said_again_keeps_the_released_digest_for_the_next_connection() {
        let online = || msg(1, Qos::ExactlyOnce);
        let mut w = connected(8, true, true);
        complete_qos2(&mut w, 7, online());
        reconnect_source(&mut w, 1);
        w.source_pubrel(7);
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubComp(7)))
        );
        past_resends(&mut w);
        reconnect_source(&mut w, 1);
        resend_is_answered(&mut w, online());
    }

    /// Issue #14, hole 5: 0x97 (quota exceeded) means "not now". It was dead-lettered and acked
    /// as final; now the message goes out again as a new PUBLISH after the driver's pause, ahead
    /// of what arrived after it, and the source is acked only when the target takes it.
    #[test]
    fn quota_exceeded_publishes_again_after_a_pause_in_arrival_order() {
        let mut w = connected(2, false, false);
        for (src, id) in [(3, 1), (4, 2), (5, 3)] {
            w.source_publish(
                Some(src),
                Qos::AtLeastOnce,
                false,
                msg(id, Qos::AtLeastOnce),
            );
        }
        let sent: Vec<_> = std::iter::from_fn(|| w.poll_action()).collect();
        assert_eq!(
            sent,
            [
                Action::SendPublish {
                    pkid: 1,
                    dup: false
                },
                Action::SendPublish {
                    pkid: 2,
                    dup: false
                }
            ]
        );
        w.target_puback(1, 0x97);
        assert_eq!(w.poll_action(), Some(Action::Backoff { reason: 0x97 }));
        assert_eq!(
            w.poll_action(),
            None,
            "no ack to the source, no dead letter, no send"
        );
        w.target_puback(2, 0);
        assert_eq!(
            w.poll_action(),
            None,
            "paused, nothing written; 4's ack waits for 3's"
        );
        w.resume();
        let Some(Action::SendPublish { pkid, dup }) = w.poll_action() else {
            panic!("the refused message is published again first")
        };
        assert!(!dup, "a new PUBLISH, not a resend");
        assert_ne!(pkid, 1, "under a new packet id");
        assert_eq!(w.held(pkid).unwrap().topic, "t/1");
        assert!(matches!(w.poll_action(), Some(Action::SendPublish { .. })));
        w.target_puback(pkid, 0);
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubAck(3)))
        );
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubAck(4)))
        );
        let c = w.counters();
        assert_eq!((c.refused, c.retried), (0, 1));
    }

    #[test]
    fn packet_id_in_use_releases_the_id_and_publishes_again() {
        let mut w = connected(4, true, false);
        w.source_publish(Some(9), Qos::ExactlyOnce, false, msg(1, Qos::ExactlyOnce));
        w.poll_action();
        w.target_pubrec(1, 0x91);
        assert_eq!(
            w.poll_action(),
            Some(Action::SendPubRel(1)),
            "the stale exchange is released"
        );
        assert_eq!(w.poll_action(), Some(Action::Backoff { reason: 0x91 }));
        w.resume();
        assert!(matches!(
            w.poll_action(),
            Some(Action::SendPublish { pkid, dup: false }) if pkid != 1
        ));
    }

    #[test]
    fn a_reconnect_ends_the_pause() {
        let mut w = connected(4, false, false);
        w.source_publish(Some(3), Qos::AtLeastOnce, false, msg(1, Qos::AtLeastOnce));
        w.poll_action();
        w.target_puback(1, 0x97);
        w.poll_action();
        w.target_disconnected();
        w.target_connected(false, 4);
        assert!(matches!(w.poll_action(), Some(Action::SendPublish { .. })));
    }

    #[test]
    fn target_reconnect_resends_held_messages_in_order_with_dup() {
        let mut w = Window::new(3);
        w.target_connected(false, 3);
        w.source_connected(false);
        for i in 1..=3 {
            w.source_publish(
                Some(i),
                Qos::AtLeastOnce,
                false,
                msg(u32::from(i), Qos::AtLeastOnce),
            );
        }
        while w.poll_action().is_some() {}
        w.target_disconnected();
        assert!(!w.can_accept());
        w.target_connected(true, 2); // the target came back with a smaller window
        assert_eq!(
            w.poll_action(),
            Some(Action::SendPublish { pkid: 1, dup: true })
        );
        assert_eq!(
            w.poll_action(),
            Some(Action::SendPublish { pkid: 2, dup: true })
        );
        assert_eq!(w.poll_action(), None, "the third waits for room");
        w.target_puback(1, 0);
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubAck(1)))
        );
        assert_eq!(
            w.poll_action(),
            Some(Action::SendPublish { pkid: 3, dup: true })
        );
    }

    #[test]
    fn qos2_stays_within_its_window_while_qos1_uses_the_whole_window() {
        let mut w = Window::new(8);
        w.source_connected(false);
        w.target_connected_qos2(false, 8, 2);
        // QoS 2, 2, 2, then QoS 1 × 3: the third QoS 2 waits, and what came after it too (in
        // order), although the window has room.
        for (id, q) in [
            (1, Qos::ExactlyOnce),
            (2, Qos::ExactlyOnce),
            (3, Qos::ExactlyOnce),
        ]
        .into_iter()
        .chain((4..=6).map(|id| (id, Qos::AtLeastOnce)))
        {
            w.source_publish(Some(id), q, false, msg(u32::from(id), q));
        }
        let sent = |w: &mut Window| -> Vec<u16> {
            std::iter::from_fn(|| w.poll_action())
                .filter_map(|a| match a {
                    Action::SendPublish { pkid, .. } => Some(pkid),
                    _ => None,
                })
                .collect()
        };
        let first = sent(&mut w);
        assert_eq!(first.len(), 2, "two QoS 2 on the wire: {first:?}");
        assert_eq!(w.qos2_on_wire(), 2);
        assert_eq!(w.in_flight(), 6, "all six taken from the source");
        // The first QoS 2 completes (PUBREC, PUBCOMP): the third goes, then the QoS 1s.
        w.target_pubrec(first[0], 0);
        w.target_pubcomp(first[0]);
        let next = sent(&mut w);
        assert_eq!(next.len(), 4, "{next:?}");
        assert_eq!(w.qos2_on_wire(), 2);
        assert_eq!(w.on_wire(), 5);
    }

    #[test]
    fn a_qos2_message_lowered_to_qos1_after_it_went_out_frees_its_qos2_place() {
        // A v5 target's Maximum QoS 1 lowers a held QoS 2 message when it is written
        // (`held_mut`); its PUBACK must free the QoS 2 place it took, or after `qos2_window`
        // such messages no QoS 2 message would go out again.
        let mut w = Window::new(4);
        w.source_connected(false);
        w.target_connected_qos2(false, 4, 1);
        for id in 1..=3u16 {
            w.source_publish(
                Some(id),
                Qos::ExactlyOnce,
                false,
                msg(u32::from(id), Qos::ExactlyOnce),
            );
            let sent: Vec<u16> = std::iter::from_fn(|| w.poll_action())
                .filter_map(|a| match a {
                    Action::SendPublish { pkid, .. } => Some(pkid),
                    _ => None,
                })
                .collect();
            let [pkid] = sent[..] else {
                panic!("message {id}: {sent:?}");
            };
            w.held_mut(pkid).unwrap().qos = Qos::AtLeastOnce;
            w.target_puback(pkid, 0);
            assert_eq!(w.qos2_on_wire(), 0, "message {id}");
            assert_eq!(w.on_wire(), 0);
        }
    }

    #[test]
    fn a_puback_for_a_qos2_publish_is_taken_as_its_ack() {
        // RabbitMQ 3.x answers QoS 2 with PUBACK: the message is done, the source acknowledged,
        // and the window free again (before: an unsolicited ack, the slot held for ever).
        let mut w = Window::new(1);
        w.source_connected(false);
        w.target_connected(false, 1);
        w.source_publish(Some(7), Qos::ExactlyOnce, false, msg(1, Qos::ExactlyOnce));
        let mut acts: Vec<Action> = std::iter::from_fn(|| w.poll_action()).collect();
        let Some(Action::SendPublish { pkid, .. }) = acts.pop() else {
            panic!("{acts:?}");
        };
        w.target_puback(pkid, 0);
        let acts: Vec<Action> = std::iter::from_fn(|| w.poll_action()).collect();
        assert!(
            acts.iter()
                .any(|a| matches!(a, Action::AckSource(SourceAck::PubRec(7)))),
            "{acts:?}"
        );
        assert_eq!(w.in_flight(), 0);
        assert!(w.can_accept());
        assert_eq!(w.counters().qos2_taken_as_qos1, 1);
        assert_eq!(w.counters().unsolicited_acks, 0);
        assert_eq!(w.counters().forwarded, 1);
    }

    #[test]
    fn lost_source_session_drops_acks_but_not_messages() {
        let mut w = Window::new(2);
        w.target_connected(false, 2);
        w.source_connected(false);
        w.source_publish(Some(9), Qos::AtLeastOnce, false, msg(1, Qos::AtLeastOnce));
        w.poll_action();
        w.source_disconnected();
        w.source_connected(false); // the broker forgot the session: id 9 means nothing now
        w.target_puback(1, 0);
        assert_eq!(w.poll_action(), None, "no ack for a forgotten packet id");
        assert_eq!(w.counters().forwarded, 1);
    }

    /// MQTT 3.1 cannot report a lost session, so a reconnect is taken as resumed; a new PUBLISH
    /// (no DUP) under an id we still owe an ack for shows the broker forgot it (#14 hole 2):
    /// the new message is forwarded, and the old ack never goes out under its id.
    #[test]
    fn a_new_publish_reusing_an_owed_id_means_the_source_session_was_lost() {
        let mut w = Window::new(4);
        w.target_connected(false, 4);
        w.source_connected(false);
        w.source_publish(Some(9), Qos::AtLeastOnce, false, msg(1, Qos::AtLeastOnce));
        assert!(matches!(
            w.poll_action(),
            Some(Action::SendPublish { pkid: 1, .. })
        ));
        w.source_disconnected();
        w.source_connected(true); // a 3.1 reconnect: taken as kept
        w.source_publish(Some(9), Qos::AtLeastOnce, false, msg(2, Qos::AtLeastOnce));
        assert_eq!(w.counters().source_sessions_lost, 1);
        assert!(
            matches!(w.poll_action(), Some(Action::SendPublish { pkid: 2, .. })),
            "the new message is forwarded, not taken for a redelivery"
        );
        w.target_puback(1, 0);
        assert_eq!(w.poll_action(), None, "the old message's ack is void");
        w.target_puback(2, 0);
        assert_eq!(
            w.poll_action(),
            Some(Action::AckSource(SourceAck::PubAck(9))),
            "the new message's ack goes out"
        );
        // A DUP resend under an owed id is a redelivery, as before.
        w.source_publish(Some(5), Qos::AtLeastOnce, false, msg(3, Qos::AtLeastOnce));
        w.poll_action();
        w.source_publish(Some(5), Qos::AtLeastOnce, true, msg(3, Qos::AtLeastOnce));
        assert_eq!(w.counters().source_sessions_lost, 1);
        assert_eq!(w.poll_action(), None);
    }

    /// Acks to the source leave in the order its PUBLISHes arrived (MQTT-4.6.0-2/3), whatever
    /// order the target acks in, and a message not forwarded waits for those before it (#14
    /// hole 14). Before, each ack went out as soon as it was due.
    #[test]
    fn source_acks_leave_in_arrival_order() {
        let mut w = Window::new(8);
        w.target_connected(false, 8);
        w.source_connected(false);
        w.source_publish(Some(10), Qos::ExactlyOnce, false, msg(1, Qos::ExactlyOnce));
        w.source_publish(Some(11), Qos::AtLeastOnce, false, msg(2, Qos::AtLeastOnce));
        w.source_discard(12, Qos::AtLeastOnce, false); // e.g. an invalid topic: not forwarded
        while w.poll_action().is_some() {}
        // The target takes the QoS 1 message first, then the QoS 2 one.
        w.target_puback(2, 0);
        assert_eq!(w.poll_action(), None, "11 waits for 10, 12 for 11");
        w.target_pubrec(1, 0);
        let acks: Vec<_> = std::iter::from_fn(|| w.poll_action())
            .filter_map(|a| match a {
                Action::AckSource(ack) => Some(ack),
                _ => None,
            })
            .collect();
        assert_eq!(
            acks,
            [
                SourceAck::PubRec(10),
                SourceAck::PubAck(11),
                SourceAck::PubAck(12)
            ]
        );
    }
}
