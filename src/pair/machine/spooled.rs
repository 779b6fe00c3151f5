//! A pair with a spool (SPEC 4.9): two windows instead of one, the spool between them.
//!
//! ```text
//! source ──PUBLISH──▶ intake window ──append──▶ spool ──read──▶ outlet window ──PUBLISH──▶ target
//!        ◀──ack─────  (acked when durable)                      (acked: the record goes)
//! ```
//!
//! The intake window is an ordinary `Window` whose "target" is the spool: a message is
//! "published" by appending it, and "acknowledged" when the spool says it is durable or the
//! target acknowledged it, whichever comes first (a healthy target does not wait for fsync), so every
//! rule the window keeps towards the source (acks in arrival order, redeliveries recognised,
//! QoS 2 exactly once while the process runs, a lost source session noticed) holds unchanged.
//! The outlet window is the pair's usual `window`, fed from the spool instead of the source; its
//! acks to its "source" delete records. The target's window, pacing, expiry and dead letters
//! apply as without a spool. The I/O layer carries appends, acks and reads to the spool thread
//! (`Event::Spool`) and hands back what it answered (`spool_durable`, `spool_failed`,
//! `spool_records`); it decides nothing.

use std::{
    collections::VecDeque,
    time::{Duration, Instant},
};

use super::{DropReason, Event, Machine, SpoolOp, write_ack};
use crate::{
    config::Qos,
    message::Message,
    pair::window::{Action, IdMap, SourceAck, Window},
};

/// The most messages taken from the source and not yet durable: what a v5 source is told as
/// Receive Maximum. Sized for group commit (one fsync takes what arrived during the last), not
/// for the target's window.
pub const INTAKE_WINDOW: usize = 1024;
/// Messages held in memory ahead of the outlet window, at most (as many as the intake takes
/// in flight: a healthy target is fed from memory, nothing read back), and bytes of them.
const READ_AHEAD: usize = INTAKE_WINDOW;
const READ_AHEAD_BYTES: usize = 4 << 20;
/// Records asked for in one read from disk, at most.
const READ_BATCH: usize = 256;
/// Records past `spool.max_age` taken out in one pass at most, with a dead letter topic (the
/// dead letter queue is bounded; the rest waits for room).
const TOO_OLD_BATCH: usize = 64;
/// After a failed sync, the pause before the group is appended again.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// The spool side of a pair's state.
pub struct Intake {
    window: Window,
    /// Per append sent to the spool and not yet answered, in order (consecutive sequence
    /// numbers from `appending_first`): the intake window's packet id and QoS, `None` once
    /// there is nothing to acknowledge (QoS 0, or released early by the target's ack).
    appending: VecDeque<Option<(u16, Qos)>>,
    appending_first: u64,
    to_append: Vec<(u64, Message)>,
    /// The log is open: `next_seq` numbers the next append.
    opened: bool,
    next_seq: u64,
    /// The first record not yet in `loaded` (or fed): where a read from disk starts. While the
    /// outlet keeps up, appends go to `loaded` straight from memory and nothing is read back.
    next_unread: u64,
    to_ack: Vec<u64>,
    /// Records read and not yet given to the outlet window (seq, message, when it is older than
    /// `spool.max_age`), and their bytes.
    loaded: VecDeque<(u64, Message, Option<Instant>)>,
    loaded_bytes: usize,
    reading: bool,
    /// The last read found nothing: wait for new durable records before asking again.
    dry: bool,
    /// Outlet window packet id -> spool sequence number.
    outlet: IdMap<u64>,
    next_id: u16,
    /// The spool reports itself full: stop reading the source.
    pub full: bool,
    /// A sync failed: the intake is appended again from here.
    retry_at: Option<Instant>,
    /// `spool.max_age`.
    max_age: Option<Duration>,
}

impl Intake {
    pub fn new(max_age: Option<Duration>) -> Box<Intake> {
        let mut window = Window::new(INTAKE_WINDOW);
        window.target_connected(false, INTAKE_WINDOW);
        Box::new(Intake {
            window,
            appending: VecDeque::new(),
            appending_first: 0,
            to_append: Vec::new(),
            opened: false,
            next_seq: 0,
            next_unread: 0,
            to_ack: Vec::new(),
            loaded: VecDeque::new(),
            loaded_bytes: 0,
            reading: false,
            dry: false,
            outlet: IdMap::default(),
            next_id: 0,
            full: false,
            retry_at: None,
            max_age,
        })
    }

    pub fn window(&mut self) -> &mut Window {
        &mut self.window
    }

    pub fn window_ref(&self) -> &Window {
        &self.window
    }

    /// Taken from the source and not yet durable (or not yet acknowledged to it).
    pub fn in_flight(&self) -> usize {
        self.window.in_flight()
    }

    pub fn retry_at(&self) -> Option<Instant> {
        self.retry_at
    }

    /// When the oldest record held for the outlet passes `spool.max_age` (it is then taken
    /// out, whether or not the target is there).
    pub fn too_old_at(&self) -> Option<Instant> {
        self.loaded.front().and_then(|(_, _, at)| *at)
    }

    /// Numbers a message for the spool; while the outlet has read everything before it, it
    /// is also kept in memory for the outlet (and not read back from disk).
    fn append(&mut self, now: Instant, m: Message) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.next_unread == seq && self.has_room_ahead() {
            self.next_unread = seq + 1;
            self.load(now, seq, m.clone(), Duration::ZERO);
        }
        self.to_append.push((seq, m));
        seq
    }

    fn has_room_ahead(&self) -> bool {
        self.loaded.len() < READ_AHEAD && self.loaded_bytes < READ_AHEAD_BYTES
    }

    /// Holds a record for the outlet; `age`: how long it has been in the spool already.
    fn load(&mut self, now: Instant, seq: u64, m: Message, age: Duration) {
        self.loaded_bytes += size(&m);
        let too_old_at = self.max_age.map(|max| now + max.saturating_sub(age));
        self.loaded.push_back((seq, m, too_old_at));
    }

    fn unload(&mut self) -> Option<(u64, Message)> {
        let (seq, m, _) = self.loaded.pop_front()?;
        self.loaded_bytes -= size(&m);
        Some((seq, m))
    }

    /// Queues an append's acknowledgement towards the source (`None`: nothing to acknowledge).
    fn appending_push(&mut self, seq: u64, ack: Option<(u16, Qos)>) {
        if self.appending.is_empty() {
            self.appending_first = seq;
        }
        debug_assert_eq!(self.appending_first + self.appending.len() as u64, seq);
        self.appending.push_back(ack);
    }

    fn appending_pop(&mut self) -> Option<(u16, Qos)> {
        let ack = self.appending.pop_front()?;
        self.appending_first += 1;
        ack
    }

    /// The target acknowledged record `seq` (or the outlet is otherwise done with it) before
    /// the spool said it is durable: the source is acknowledged now; the spool's answer then
    /// finds nothing left to do for it.
    fn release(&mut self, seq: u64) {
        let Some(at) = seq.checked_sub(self.appending_first) else {
            return;
        };
        let Some(slot) = self.appending.get_mut(at as usize) else {
            return;
        };
        match slot.take() {
            Some((pkid, Qos::ExactlyOnce)) => self.window.target_pubrec(pkid, 0),
            Some((pkid, _)) => {
                self.window.target_puback(pkid, 0);
            }
            None => {}
        }
    }

    /// The intake window has actions for `spool_pass`.
    fn has_actions(&self) -> bool {
        self.window.has_actions()
    }

    fn next_outlet_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.outlet.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }
}

impl Machine {
    /// The window that faces the source: the intake's with a spool, else the pair's one.
    pub(super) fn source_window(&mut self) -> &mut Window {
        match self.intake.as_mut() {
            Some(i) => i.window(),
            None => &mut self.window,
        }
    }

    pub(super) fn source_window_ref(&self) -> &Window {
        match self.intake.as_ref() {
            Some(i) => i.window_ref(),
            None => &self.window,
        }
    }

    /// The pair's log is open: appends are numbered from `next_seq`, and what it holds from
    /// `first_unacked` on (a previous run's backlog) is forwarded first.
    pub fn spool_opened(&mut self, now: Instant, next_seq: u64, first_unacked: u64) {
        if let Some(intake) = self.intake.as_mut() {
            intake.opened = true;
            intake.next_seq = next_seq;
            intake.next_unread = first_unacked.min(next_seq);
            intake.dry = false;
        }
        self.apply_actions(now);
    }

    /// The spool made this many appends durable, in the order they were asked for.
    pub fn spool_durable(&mut self, now: Instant, n: usize) {
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        intake.dry = false;
        for _ in 0..n {
            match intake.appending_pop() {
                Some((pkid, Qos::ExactlyOnce)) => {
                    intake.window.target_pubrec(pkid, 0);
                    // The spool has it: the QoS 2 exchange with our "target" ends here (its
                    // PUBREL, asked for next, is answered at once).
                }
                Some((pkid, _)) => {
                    intake.window.target_puback(pkid, 0);
                }
                None => {}
            }
        }
        self.apply_actions(now);
    }

    /// The spool could not make this many appends durable: they are not acknowledged to the
    /// source, and are appended again after a pause (the disk may have room again).
    pub fn spool_failed(&mut self, now: Instant, n: usize) {
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        for _ in 0..n {
            intake.appending_pop();
        }
        // As a target connection lost: what the intake window holds unacknowledged goes again
        // once the pause is over; groups still in flight are answered as they come.
        intake.window.target_disconnected();
        intake.retry_at = Some(now + RETRY_AFTER);
    }

    /// Records the spool read, oldest first, each with how long it has been in the spool;
    /// empty: none more now.
    pub fn spool_records(&mut self, now: Instant, records: Vec<(u64, Message, Duration)>) {
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        intake.reading = false;
        intake.dry = records.is_empty();
        for (seq, m, age) in records {
            if seq >= intake.next_unread {
                intake.next_unread = seq + 1;
                intake.load(now, seq, m, age);
            }
        }
        self.apply_actions(now);
    }

    /// The spool is over `max_bytes` (or no longer): the source is read only while it is not.
    pub fn spool_full(&mut self, full: bool) {
        if let Some(intake) = self.intake.as_mut() {
            intake.full = full;
        }
    }

    /// A failed group's pause is over: append what the intake holds again. Returns whether it
    /// was (the intake window then has actions to apply).
    pub(super) fn spool_retry_due(&mut self, now: Instant) -> bool {
        let Some(intake) = self.intake.as_mut() else {
            return false;
        };
        if intake.retry_at.is_none_or(|t| now < t) {
            return false;
        }
        intake.retry_at = None;
        intake.window.target_connected(true, INTAKE_WINDOW);
        true
    }

    /// Moves the intake window's actions to the spool and the source, feeds the outlet window
    /// from what was read, and asks the I/O layer for what the spool must do. Returns whether
    /// it fed the outlet anything (whose actions then want applying).
    pub(super) fn spool_pass(&mut self, now: Instant) -> bool {
        let Some(intake) = self.intake.as_mut() else {
            return false;
        };
        let mut fed = false;
        while let Some(action) = intake.window.poll_action() {
            match action {
                Action::SendPublish { pkid, .. } => {
                    if let Some(m) = intake.window.held(pkid) {
                        let (qos, m) = (m.qos, m.clone());
                        let seq = intake.append(now, m);
                        intake.appending_push(seq, Some((pkid, qos)));
                    }
                }
                Action::SendQos0(m) => {
                    let seq = intake.append(now, m);
                    intake.appending_push(seq, None);
                }
                Action::SendPubRel(pkid) => intake.window.target_pubcomp(pkid),
                Action::AckSource(ack) => write_ack(self.source.codec, &mut self.source.wbuf, ack),
                // The spool never refuses nor asks to wait.
                Action::Refused { .. } | Action::Backoff { .. } => {}
            }
        }
        // Feed the outlet: QoS 0 only while the target can take it now. A record past
        // `spool.max_age` is taken out instead (dead-lettered below, as many as the dead
        // letter queue has room for).
        let mut too_old = Vec::new();
        while let Some((_, m, too_old_at)) = intake.loaded.front() {
            if too_old_at.is_some_and(|t| now >= t) {
                if self.spec.route.dead_letter.is_some()
                    && (!self.dead_letters.has_room() || too_old.len() >= TOO_OLD_BATCH)
                {
                    break;
                }
                let (seq, m) = intake.unload().expect("checked");
                intake.to_ack.push(seq);
                too_old.push(m);
                fed = true;
                continue;
            }
            if !self.window.can_accept() || (m.qos == Qos::AtMostOnce && !self.target.is_up()) {
                break;
            }
            let (seq, m) = intake.unload().expect("checked");
            fed = true;
            if m.qos == Qos::AtMostOnce {
                // Written (or counted dropped) by the outlet right away: the record may go.
                intake.to_ack.push(seq);
                self.window.source_publish(None, Qos::AtMostOnce, false, m);
            } else {
                let id = intake.next_outlet_id();
                intake.outlet.insert(id, seq);
                let qos = m.qos;
                self.window.source_publish(Some(id), qos, false, m);
            }
        }
        if !intake.to_append.is_empty() {
            let batch = std::mem::take(&mut intake.to_append);
            self.events.push_back(Event::Spool(SpoolOp::Append(batch)));
        }
        if intake.opened
            && !intake.reading
            && !intake.dry
            && intake.next_unread < intake.next_seq
            && intake.loaded.len() < READ_AHEAD / 2
            && intake.loaded_bytes < READ_AHEAD_BYTES / 2
        {
            intake.reading = true;
            let max = (READ_AHEAD - intake.loaded.len()).min(READ_BATCH);
            let from = intake.next_unread;
            self.events
                .push_back(Event::Spool(SpoolOp::Read { from, max }));
        }
        for m in too_old {
            self.drop_message(
                now,
                m.source_topic(),
                &m.payload,
                m.properties.as_deref(),
                DropReason::MaxAge,
                "it waited in the spool longer than spool.max_age",
            );
        }
        fed
    }

    /// An outlet window's ack towards its "source", the spool: the record is done with (QoS 1
    /// PUBACK, QoS 2 PUBCOMP), or the first half of QoS 2, answered at once with our PUBREL.
    pub(super) fn spool_outlet_ack(&mut self, ack: SourceAck) {
        let Some(intake) = self.intake.as_mut() else {
            return;
        };
        match ack {
            SourceAck::PubRec(id) => {
                // The target took responsibility for it (PUBREC): the source may be answered.
                if let Some(&seq) = intake.outlet.get(&id) {
                    intake.release(seq);
                }
                self.window.source_pubrel(id);
            }
            SourceAck::PubAck(id) | SourceAck::PubComp(id) => {
                if let Some(seq) = intake.outlet.remove(&id) {
                    intake.release(seq);
                    intake.to_ack.push(seq);
                }
            }
        }
    }

    /// The intake window has work that `spool_pass` has not seen (a release by the target).
    pub(super) fn intake_has_actions(&self) -> bool {
        self.intake.as_ref().is_some_and(|i| i.has_actions())
    }

    /// Acks for the spool gathered in this pass go out as one event.
    pub(super) fn spool_flush_acks(&mut self) {
        if let Some(intake) = self.intake.as_mut()
            && !intake.to_ack.is_empty()
        {
            let acks = std::mem::take(&mut intake.to_ack);
            self.events.push_back(Event::Spool(SpoolOp::Ack(acks)));
        }
    }

    /// With a spool: may the source be read as far as the spool goes (open, not full, no failed
    /// group waiting)? The intake window's room is `source_window()`'s, checked beside it.
    pub(super) fn intake_open(&self) -> bool {
        self.intake
            .as_ref()
            .is_none_or(|i| i.opened && !i.full && i.retry_at.is_none())
    }

    /// Nothing is left in the spool: every record read and acknowledged by the target (or
    /// no spool). A pair that leaves the pool waits for this (SPEC 4.9: nothing orphaned).
    pub(super) fn spool_empty(&self) -> bool {
        self.intake.as_ref().is_none_or(|i| {
            i.opened
                && !i.reading
                && i.loaded.is_empty()
                && i.outlet.is_empty()
                && i.appending.is_empty()
                && i.to_append.is_empty()
                && (i.next_unread >= i.next_seq || i.dry)
        })
    }

    /// Nothing taken from the source is still to be made durable or acknowledged to it.
    pub(super) fn intake_drained(&self) -> bool {
        self.intake.as_ref().is_none_or(|i| i.in_flight() == 0)
    }
}

/// What a message held ahead counts against `READ_AHEAD_BYTES`.
fn size(m: &Message) -> usize {
    m.topic.len() + m.payload.len()
}
