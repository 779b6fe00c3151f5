//! Dead letters' own small outbound window on the source connection (pure). A dead letter is a
//! QoS 1 PUBLISH of ours to the source broker, so it obeys what that broker announced (Receive
//! Maximum, Maximum QoS, Maximum Packet Size), is tracked by packet id until its PUBACK, and is
//! sent again after a reconnect. Each one may hold back the source ack of the message it stands
//! for (`original`): that ack is released only once the dead letter is written, so the broker
//! has the dead letter before it learns the original is done (both go on one connection, in
//! order). While the queue is full the pair reads no more from the source.

use std::collections::{BTreeMap, VecDeque};

use crate::{config::Qos, message::Message};

/// Dead letters on the wire at once, at most (and never more than the broker's Receive Maximum).
pub const WINDOW: usize = 16;
/// Dead letters waiting for room; the pair stops reading its source at this many.
pub const QUEUE: usize = 256;
/// Our packet ids for dead letters: clear of SUBSCRIBE's (1..), UNSUBSCRIBE's (900..) and the
/// share probe's (901, 902).
const FIRST_ID: u16 = 1000;

/// A dead letter, and the source packet id whose ack waits for it to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message: Message,
    pub original: Option<u16>,
}

/// What to write for a dead letter: its packet id (0 at QoS 0) and DUP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub pkid: u16,
    pub dup: bool,
    pub letter: DeadLetter,
}

#[derive(Debug)]
pub struct DeadLetters {
    queued: VecDeque<DeadLetter>,
    /// Written, PUBACK not yet seen; resent with DUP after a reconnect.
    in_flight: BTreeMap<u16, Message>,
    /// Ids of `in_flight` to send again on the current connection (popped from the back).
    resend: Vec<u16>,
    next_id: u16,
    window: usize,
    max_qos: Qos,
    max_packet: Option<u32>,
    up: bool,
}

impl Default for DeadLetters {
    fn default() -> Self {
        DeadLetters {
            queued: VecDeque::new(),
            in_flight: BTreeMap::new(),
            resend: Vec::new(),
            next_id: FIRST_ID,
            window: WINDOW,
            max_qos: Qos::AtLeastOnce,
            max_packet: None,
            up: false,
        }
    }
}

/// Why a dead letter cannot be sent at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unsendable {
    /// Over the source broker's Maximum Packet Size.
    TooLarge,
}

impl DeadLetters {
    /// The source connection is up with what its CONNACK allows. What was written and not
    /// acknowledged goes again first (same ids, DUP: the session may hold them).
    pub fn connected(
        &mut self,
        receive_maximum: Option<u16>,
        max_qos: Option<Qos>,
        max_packet: Option<u32>,
    ) {
        self.up = true;
        self.resend = self.in_flight.keys().rev().copied().collect();
        self.window = usize::from(receive_maximum.unwrap_or(u16::MAX)).clamp(1, WINDOW);
        self.max_qos = max_qos.unwrap_or(Qos::AtLeastOnce).min(Qos::AtLeastOnce);
        self.max_packet = max_packet;
    }

    pub fn disconnected(&mut self) {
        self.up = false;
    }

    /// Whether the pair may take in more from the source (a dead letter may follow).
    pub fn has_room(&self) -> bool {
        self.queued.len() < QUEUE
    }

    pub fn queued(&self) -> usize {
        self.queued.len()
    }

    /// The letters waiting for the source (machine tests read their headers, which a 3.x
    /// source's encoding drops).
    #[cfg(test)]
    pub fn queued_letters(&self) -> impl Iterator<Item = &Message> {
        self.queued.iter().map(|l| &l.message)
    }

    /// Queues a dead letter (the caller checks `has_room` before reading more). A letter over
    /// the broker's Maximum Packet Size cannot be sent: it is handed back.
    pub fn push(&mut self, letter: DeadLetter) -> Result<(), (Unsendable, DeadLetter)> {
        if let Some(max) = self.max_packet
            && letter.message.encoded_size_bound() > max as usize
        {
            return Err((Unsendable::TooLarge, letter));
        }
        self.queued.push_back(letter);
        Ok(())
    }

    /// The next thing to write, while the window has room: first the resends of a new
    /// connection, then queued letters in order.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        if !self.up {
            return None;
        }
        if let Some(pkid) = self.resend.pop() {
            let message = self.in_flight.get(&pkid)?.clone();
            return Some(Transmit {
                pkid,
                dup: true,
                letter: DeadLetter {
                    message,
                    original: None,
                },
            });
        }
        if self.max_qos == Qos::AtMostOnce {
            let mut letter = self.queued.pop_front()?;
            letter.message.qos = Qos::AtMostOnce;
            return Some(Transmit {
                pkid: 0,
                dup: false,
                letter,
            });
        }
        if self.in_flight.len() >= self.window {
            return None;
        }
        let letter = self.queued.pop_front()?;
        let pkid = self.allocate();
        self.in_flight.insert(pkid, letter.message.clone());
        Some(Transmit {
            pkid,
            dup: false,
            letter,
        })
    }

    /// A PUBACK from the source for one of ours. Returns whether it was ours.
    pub fn puback(&mut self, pkid: u16) -> bool {
        self.in_flight.remove(&pkid).is_some()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    fn allocate(&mut self) -> u16 {
        loop {
            let id = self.next_id;
            self.next_id = if id >= u16::MAX - 1 { FIRST_ID } else { id + 1 };
            if !self.in_flight.contains_key(&id) {
                return id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(n: u8) -> DeadLetter {
        DeadLetter {
            message: Message {
                topic: "dlq".into(),
                payload: bytes::Bytes::from(vec![n; 10]),
                qos: Qos::AtLeastOnce,
                retain: false,
                properties: None,
                expires_at: None,
                source_topic: None,
            },
            original: Some(u16::from(n)),
        }
    }

    fn drain(d: &mut DeadLetters) -> Vec<Transmit> {
        std::iter::from_fn(|| d.poll_transmit()).collect()
    }

    #[test]
    fn at_most_the_brokers_receive_maximum_on_the_wire_and_a_puback_makes_room() {
        let mut d = DeadLetters::default();
        d.connected(Some(2), None, None);
        for n in 1..=4 {
            d.push(letter(n)).unwrap();
        }
        let sent = drain(&mut d);
        assert_eq!(sent.len(), 2, "the source's Receive Maximum of 2");
        assert_eq!(sent[0].letter.original, Some(1));
        assert!(d.puback(sent[0].pkid));
        let next = drain(&mut d);
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].letter.original, Some(3), "in order");
    }

    #[test]
    fn what_was_on_the_wire_goes_again_after_a_reconnect_with_dup() {
        let mut d = DeadLetters::default();
        d.connected(None, None, None);
        d.push(letter(1)).unwrap();
        d.push(letter(2)).unwrap();
        let first = drain(&mut d);
        d.disconnected();
        d.connected(None, None, None);
        let again = drain(&mut d);
        assert_eq!(again.len(), 2);
        assert_eq!(
            (again[0].pkid, again[0].dup, again[1].pkid),
            (first[0].pkid, true, first[1].pkid)
        );
    }

    #[test]
    fn a_source_without_qos_1_gets_them_at_qos_0_and_one_too_large_is_handed_back() {
        let mut d = DeadLetters::default();
        d.connected(None, Some(Qos::AtMostOnce), Some(12));
        let (why, back) = d.push(letter(1)).unwrap_err();
        assert_eq!((why, back.original), (Unsendable::TooLarge, Some(1)));
        d.connected(None, Some(Qos::AtMostOnce), None);
        d.push(letter(2)).unwrap();
        let sent = drain(&mut d);
        assert_eq!(
            (sent[0].pkid, sent[0].letter.message.qos),
            (0, Qos::AtMostOnce)
        );
        assert_eq!(d.in_flight(), 0);
    }

    #[test]
    fn a_full_queue_says_so() {
        let mut d = DeadLetters::default();
        for n in 0..QUEUE {
            assert!(d.has_room());
            d.push(letter(n as u8)).unwrap();
        }
        assert!(!d.has_room());
    }
}
