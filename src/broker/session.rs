//! One client's session in the embedded broker, without I/O: the queue of deliveries waiting
//! for the client's window, the QoS 1/2 deliveries in flight by packet id, and the QoS 2
//! packet ids received from the client and not yet released. The connection glue feeds it
//! acks and writes what `next_transmit` returns; it survives reconnects of persistent sessions.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet, VecDeque},
    num::NonZeroU16,
    time::Instant,
};

use ntex_mqtt::QoS;

use super::message::Delivery;

/// What the connection must write next.
#[derive(Debug, Clone)]
pub(crate) enum Transmit {
    /// A PUBLISH; `packet_id` is `None` for QoS 0. `dup` marks a resend after a reconnect.
    Publish {
        packet_id: Option<NonZeroU16>,
        dup: bool,
        delivery: Delivery,
    },
    /// A PUBREL for a QoS 2 delivery the client has PUBREC'd.
    Release(NonZeroU16),
}

#[derive(Debug)]
enum Stage {
    /// PUBLISH sent, waiting for PUBACK (QoS 1) or PUBREC (QoS 2).
    Published,
    /// PUBREL sent, waiting for PUBCOMP.
    Released,
}

#[derive(Debug)]
struct InFlight {
    delivery: Delivery,
    stage: Stage,
    /// Order of first sending, to see acks that overtake (MQTT-4.6.0-2/3).
    seq: u64,
}

/// Why a delivery was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// QoS 0 for a client that is not connected: MQTT lets the broker drop those.
    OfflineQos0,
    /// The queue is at its bound.
    QueueFull,
}

#[derive(Debug)]
pub(crate) struct Session {
    /// Survives disconnection (3.x `clean_session = 0`, 5 with Session Expiry > 0).
    pub persistent: bool,
    queue: VecDeque<Delivery>,
    in_flight: BTreeMap<NonZeroU16, InFlight>,
    /// The send order (`InFlight::seq`) of the in-flight deliveries in stage `Published`, kept
    /// with every change of `in_flight`: whether an ack overtakes an earlier PUBLISH is then one
    /// look at the smallest. Scanning `in_flight` for it on every ack pegged a core once a slow
    /// subscriber had thousands in flight, and the broker fell further behind.
    unacked_seqs: BTreeSet<u64>,
    last_id: u16,
    /// The most QoS 1/2 deliveries unacknowledged at once: the client's Receive Maximum
    /// (MQTT 5) capped by the broker's own outgoing window.
    window: usize,
    max_queued: usize,
    online: bool,
    /// QoS 2 packet ids received from the client and PUBREC'd, waiting for its PUBREL: a
    /// resent PUBLISH with one of these ids is a duplicate and is not routed again.
    pub inbound_qos2: HashSet<NonZeroU16>,
    next_seq: u64,
    /// PUBACKs and PUBRECs that came before one for a message sent earlier and still unacked:
    /// the client broke MQTT-4.6.0-2/3 (acks in the order the PUBLISHes were received).
    pub acks_out_of_order: u64,
}

impl Session {
    pub fn new(persistent: bool, max_queued: usize) -> Session {
        Session {
            persistent,
            queue: VecDeque::new(),
            in_flight: BTreeMap::new(),
            unacked_seqs: BTreeSet::new(),
            last_id: 0,
            window: 1,
            max_queued: max_queued.max(1),
            online: false,
            inbound_qos2: HashSet::new(),
            next_seq: 0,
            acks_out_of_order: 0,
        }
    }

    /// Queues a delivery; it goes out through `next_transmit` while the client is connected.
    pub fn enqueue(&mut self, delivery: Delivery) -> Result<(), Refused> {
        if !self.online && delivery.qos == QoS::AtMostOnce {
            return Err(Refused::OfflineQos0);
        }
        if self.queue.len() >= self.max_queued {
            return Err(Refused::QueueFull);
        }
        self.queue.push_back(delivery);
        Ok(())
    }

    /// The client (re)connected with this window. Returns what was in flight, to be resent
    /// first with the same packet ids: PUBLISH with DUP, or PUBREL where the client had
    /// already PUBREC'd (MQTT 3.1.1 4.4, MQTT 5 4.4).
    pub fn attach(&mut self, window: usize) -> Vec<Transmit> {
        self.online = true;
        self.window = window.max(1);
        self.in_flight
            .iter()
            .map(|(&id, f)| match f.stage {
                Stage::Published => Transmit::Publish {
                    packet_id: Some(id),
                    dup: true,
                    delivery: f.delivery.clone(),
                },
                Stage::Released => Transmit::Release(id),
            })
            .collect()
    }

    /// The connection went away; a persistent session keeps queue and in-flight state.
    pub fn detach(&mut self) {
        self.online = false;
        // QoS 0 messages are not kept for an absent client.
        self.queue.retain(|d| d.qos != QoS::AtMostOnce);
    }

    pub fn is_online(&self) -> bool {
        self.online
    }

    /// The next PUBLISH to write, if the client is connected and (for QoS 1/2) its window has
    /// room. Order is kept: a QoS 1/2 message at the head waits for room even if QoS 0
    /// messages follow it. Expired messages (MQTT 5 Message Expiry) are skipped and counted.
    pub fn next_transmit(&mut self, now: Instant, expired: &mut u64) -> Option<Transmit> {
        while self.online {
            let head = self.queue.front()?;
            if head.message.is_expired(now) {
                self.queue.pop_front();
                *expired += 1;
                continue;
            }
            if head.qos == QoS::AtMostOnce {
                let delivery = self.queue.pop_front()?;
                return Some(Transmit::Publish {
                    packet_id: None,
                    dup: false,
                    delivery,
                });
            }
            if self.in_flight.len() >= self.window {
                return None;
            }
            let id = self.free_id()?;
            let delivery = self.queue.pop_front()?;
            self.next_seq += 1;
            self.unacked_seqs.insert(self.next_seq);
            self.in_flight.insert(
                id,
                InFlight {
                    delivery: delivery.clone(),
                    stage: Stage::Published,
                    seq: self.next_seq,
                },
            );
            return Some(Transmit::Publish {
                packet_id: Some(id),
                dup: false,
                delivery,
            });
        }
        None
    }

    /// Counts a first ack for `id` that overtakes an earlier, still unacknowledged PUBLISH.
    fn note_order(&mut self, id: NonZeroU16) {
        let Some(seq) = self.in_flight.get(&id).map(|f| f.seq) else {
            return;
        };
        if self.unacked_seqs.first().is_some_and(|&first| first < seq) {
            self.acks_out_of_order += 1;
        }
    }

    /// Forgets `id` in flight, and its place in the send order.
    fn remove(&mut self, id: NonZeroU16) {
        if let Some(f) = self.in_flight.remove(&id) {
            self.unacked_seqs.remove(&f.seq);
        }
    }

    /// PUBACK (QoS 1). Returns whether `id` was in flight.
    pub fn on_puback(&mut self, id: NonZeroU16) -> bool {
        if self
            .in_flight
            .get(&id)
            .is_some_and(|f| matches!(f.stage, Stage::Published))
        {
            self.note_order(id);
        }
        match self.in_flight.get(&id) {
            Some(f)
                if matches!(f.stage, Stage::Published) && f.delivery.qos == QoS::AtLeastOnce =>
            {
                self.remove(id);
                true
            }
            _ => false,
        }
    }

    /// PUBREC (QoS 2): the PUBREL to send, unless the client refused the message (MQTT 5
    /// reason code >= 0x80 ends the exchange). A repeated PUBREC gets the PUBREL again.
    pub fn on_pubrec(&mut self, id: NonZeroU16, refused: bool) -> Option<Transmit> {
        if self
            .in_flight
            .get(&id)
            .is_some_and(|f| matches!(f.stage, Stage::Published))
        {
            self.note_order(id);
        }
        let f = self.in_flight.get_mut(&id)?;
        if f.delivery.qos != QoS::ExactlyOnce {
            return None;
        }
        if refused {
            self.remove(id);
            return None;
        }
        f.stage = Stage::Released;
        let seq = f.seq;
        self.unacked_seqs.remove(&seq);
        Some(Transmit::Release(id))
    }

    /// PUBCOMP (QoS 2). Returns whether `id` was in flight.
    pub fn on_pubcomp(&mut self, id: NonZeroU16) -> bool {
        match self.in_flight.get(&id) {
            Some(f) if matches!(f.stage, Stage::Released) => {
                self.remove(id);
                true
            }
            _ => false,
        }
    }

    /// Forgets an in-flight delivery that could not be written (too large for the client's
    /// Maximum Packet Size: MQTT 5 says to discard it as if it had been acknowledged).
    pub fn forget(&mut self, id: NonZeroU16) {
        self.remove(id);
    }

    /// QoS 1/2 deliveries sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.in_flight.len()
    }

    /// A packet id not in flight, going round 1..=65535 so a freed id is not reused at once
    /// (a late ack for it then cannot be mistaken for the new message's).
    fn free_id(&mut self) -> Option<NonZeroU16> {
        for _ in 0..u16::MAX {
            self.last_id = if self.last_id == u16::MAX {
                1
            } else {
                self.last_id + 1
            };
            let id = NonZeroU16::new(self.last_id)?;
            if !self.in_flight.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;

    use ntex_bytes::{ByteString, Bytes};

    use super::*;
    use crate::broker::message::Message;

    fn delivery(qos: QoS, n: u32) -> Delivery {
        Delivery {
            message: Rc::new(Message {
                topic: ByteString::from("t"),
                payload: Bytes::from(n.to_string()),
                qos,
                retain: false,
                properties: None,
                publisher: Rc::from("p"),
                received_at: Instant::now(),
            }),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
        }
    }

    fn drain(s: &mut Session) -> Vec<Transmit> {
        let mut expired = 0;
        std::iter::from_fn(|| s.next_transmit(Instant::now(), &mut expired)).collect()
    }

    fn id(t: &Transmit) -> NonZeroU16 {
        match t {
            Transmit::Publish { packet_id, .. } => packet_id.unwrap(),
            Transmit::Release(id) => *id,
        }
    }

    #[test]
    fn never_more_in_flight_than_the_window() {
        let mut s = Session::new(false, 100);
        s.attach(3);
        for n in 0..10 {
            s.enqueue(delivery(QoS::AtLeastOnce, n)).unwrap();
        }
        let first = drain(&mut s);
        assert_eq!(first.len(), 3);
        assert_eq!(s.unacked(), 3);
        assert!(s.on_puback(id(&first[1])));
        let more = drain(&mut s);
        assert_eq!(more.len(), 1, "one ack makes room for one message");
        assert_eq!(s.unacked(), 3);
    }

    #[test]
    fn acks_may_come_in_any_order() {
        let mut s = Session::new(false, 100);
        s.attach(10);
        for n in 0..3 {
            s.enqueue(delivery(QoS::AtLeastOnce, n)).unwrap();
        }
        let sent = drain(&mut s);
        assert!(s.on_puback(id(&sent[2])));
        assert!(s.on_puback(id(&sent[0])));
        assert!(!s.on_puback(id(&sent[0])), "a repeated ack is ignored");
        assert!(s.on_puback(id(&sent[1])));
        assert_eq!(s.unacked(), 0);
    }

    #[test]
    fn an_ack_is_out_of_order_only_when_it_overtakes_an_earlier_unacked_publish() {
        let mut s = Session::new(false, 100_000);
        s.attach(50_000);
        for n in 0..50_000 {
            let qos = if n % 2 == 0 {
                QoS::AtLeastOnce
            } else {
                QoS::ExactlyOnce
            };
            s.enqueue(delivery(qos, n)).unwrap();
        }
        let sent = drain(&mut s);
        assert_eq!(sent.len(), 50_000);
        // In order, through both QoS: a PUBREC ends the wait for a first ack as a PUBACK does,
        // and a PUBCOMP that follows it later overtakes nothing.
        for (n, t) in sent[..1000].iter().enumerate() {
            if n % 2 == 0 {
                assert!(s.on_puback(id(t)));
            } else {
                assert!(s.on_pubrec(id(t), false).is_some());
            }
        }
        for t in sent[..1000].iter().skip(1).step_by(2) {
            assert!(s.on_pubcomp(id(t)));
        }
        assert_eq!(s.acks_out_of_order, 0);
        // The last one first overtakes 48,999; then the oldest, in order again.
        assert!(s.on_pubrec(id(&sent[49_999]), false).is_some());
        assert_eq!(s.acks_out_of_order, 1);
        assert!(s.on_puback(id(&sent[1000])));
        assert_eq!(s.acks_out_of_order, 1);
        // A delivery forgotten (too large to write) no longer counts as waiting.
        s.forget(id(&sent[1001]));
        assert!(s.on_puback(id(&sent[1002])));
        assert_eq!(s.acks_out_of_order, 1);
        assert_eq!(
            s.unacked(),
            48_997,
            "one in 50,000 released, waiting for its PUBCOMP"
        );
    }

    #[test]
    fn qos2_goes_through_pubrec_pubrel_pubcomp() {
        let mut s = Session::new(false, 100);
        s.attach(10);
        s.enqueue(delivery(QoS::ExactlyOnce, 1)).unwrap();
        let sent = drain(&mut s);
        let pid = id(&sent[0]);
        assert!(!s.on_puback(pid), "PUBACK does not complete QoS 2");
        assert!(matches!(s.on_pubrec(pid, false), Some(Transmit::Release(r)) if r == pid));
        assert_eq!(s.unacked(), 1);
        assert!(s.on_pubcomp(pid));
        assert_eq!(s.unacked(), 0);
    }

    #[test]
    fn refused_pubrec_ends_the_exchange() {
        let mut s = Session::new(false, 100);
        s.attach(10);
        s.enqueue(delivery(QoS::ExactlyOnce, 1)).unwrap();
        let pid = id(&drain(&mut s)[0]);
        assert!(s.on_pubrec(pid, true).is_none());
        assert_eq!(s.unacked(), 0);
    }

    #[test]
    fn reconnect_resends_in_flight_with_the_same_ids() {
        let mut s = Session::new(true, 100);
        s.attach(10);
        s.enqueue(delivery(QoS::AtLeastOnce, 1)).unwrap();
        s.enqueue(delivery(QoS::ExactlyOnce, 2)).unwrap();
        let sent = drain(&mut s);
        s.on_pubrec(id(&sent[1]), false);
        s.detach();
        s.enqueue(delivery(QoS::AtLeastOnce, 3)).unwrap();
        assert!(s.enqueue(delivery(QoS::AtMostOnce, 4)).is_err());
        let resent = s.attach(10);
        assert!(
            matches!(&resent[0], Transmit::Publish { dup: true, packet_id, .. } if *packet_id == Some(id(&sent[0])))
        );
        assert!(matches!(&resent[1], Transmit::Release(r) if *r == id(&sent[1])));
        assert_eq!(drain(&mut s).len(), 1, "then what was queued while away");
    }

    #[test]
    fn queue_is_bounded() {
        let mut s = Session::new(true, 2);
        s.enqueue(delivery(QoS::AtLeastOnce, 1)).unwrap();
        s.enqueue(delivery(QoS::AtLeastOnce, 2)).unwrap();
        assert_eq!(
            s.enqueue(delivery(QoS::AtLeastOnce, 3)),
            Err(Refused::QueueFull)
        );
    }

    #[test]
    fn packet_ids_skip_those_in_flight() {
        let mut s = Session::new(false, 100_000);
        s.attach(2);
        s.enqueue(delivery(QoS::AtLeastOnce, 0)).unwrap();
        let held = id(&drain(&mut s)[0]);
        let mut seen = HashSet::new();
        for n in 0..70_000 {
            s.enqueue(delivery(QoS::AtLeastOnce, n)).unwrap();
            let t = drain(&mut s);
            let pid = id(&t[0]);
            assert_ne!(pid, held);
            seen.insert(pid);
            assert!(s.on_puback(pid));
        }
        assert_eq!(seen.len(), 65_534);
    }
}
