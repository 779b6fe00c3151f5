//! When a pair lingers (sans-IO): under load it stops reading for `LINGER` with its sockets'
//! wake-up marks raised, so that every read, write and wake-up carries many messages instead of
//! a few (most of the bridge's CPU per message is wake-ups and syscalls; docs/ARCHITECTURE.md).
//! The driver reports each pass and applies the [`Change`] this returns to its sockets.

use std::time::{Duration, Instant};

/// How long a pair lingers. Writes are never held back meanwhile.
pub const LINGER: Duration = Duration::from_millis(1);
/// Messages one pass must take from the source for the pair to linger (fewer: low rate, no wait).
pub const LINGER_BATCH: usize = 4;
/// The smallest target window that lingers: a pair moves at most a window per `LINGER`, so
/// only windows of 100 or more linger (100,000 msg/s per pair and more).
pub const LINGER_MIN_WINDOW: usize = 100;
/// Acks a pair waits for (at most `LINGER`) when the target's window is full, before it reads
/// the source again: the window then refills by a batch, not one message per ack and wake-up
/// (mosquitto writes every ack on its own).
pub const ACK_BATCH: usize = 32;

/// Why a pair lingers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Under load: neither socket is read.
    Load,
    /// The target's window is full: the target is read (its wake-up mark at `ACK_BATCH` acks),
    /// the source is not, and the lingering ends as soon as `ACK_BATCH` slots are free.
    Acks,
}

/// What one pass of the driver saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct Pass {
    /// Messages taken from the source.
    pub taken: usize,
    /// Acks (PUBACK, PUBREC, PUBCOMP) taken from the target.
    pub acks: usize,
    /// The target's window and the slots of it that are free.
    pub window: usize,
    pub free: usize,
    pub draining: bool,
    pub target_up: bool,
    /// The last reads left nothing behind (a read that filled its buffer may have).
    pub source_dry: bool,
    pub target_dry: bool,
}

/// What the driver does to its sockets' wake-up marks after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// Raise the marks (for `Acks`: the target's to `ACK_BATCH` acks, the source's fully).
    Start(Kind),
    /// Lower both marks: whatever arrived meanwhile makes the sockets readable now.
    End,
}

#[derive(Debug, Clone)]
pub struct Lingering {
    current: Option<(Instant, Kind)>,
    /// Messages taken since `recent_since`: the arrival rate, for a pair whose passes are each
    /// too small to linger on (one with a core to itself is never kept waiting).
    recent: usize,
    recent_since: Instant,
    /// The pair lingered since `recent_since`.
    lingered_recently: bool,
}

impl Lingering {
    pub fn new(now: Instant) -> Self {
        Lingering {
            current: None,
            recent: 0,
            recent_since: now,
            lingered_recently: false,
        }
    }

    /// Why the pair lingers now, if it does.
    pub fn kind(&self) -> Option<Kind> {
        self.current.map(|(_, k)| k)
    }

    /// When the current lingering ends at the latest.
    pub fn until(&self) -> Option<Instant> {
        self.current.map(|(t, _)| t)
    }

    /// Starts, extends or ends lingering after a pass.
    pub fn after_pass(&mut self, now: Instant, p: &Pass) -> Change {
        // Under load also when each pass is small but together they come at `LINGER_BATCH` or
        // more per `LINGER` — only for a pair that did not linger meanwhile: one that does is
        // batching already, and more lingering would only add latency.
        self.recent += p.taken;
        let span = now.saturating_duration_since(self.recent_since);
        let mut busy = false;
        if span >= LINGER {
            busy = !self.lingered_recently
                && self.recent as u128 * LINGER.as_nanos()
                    >= LINGER_BATCH as u128 * span.as_nanos();
            self.recent = 0;
            self.recent_since = now;
            self.lingered_recently = false;
        }
        let may = !p.draining && p.window >= LINGER_MIN_WINDOW;
        // Not before both sockets were read dry: a burst larger than one read goes on at once.
        if (p.taken >= LINGER_BATCH || busy) && may && p.source_dry && p.target_dry {
            return self.start(now, Kind::Load);
        }
        if let Some((until, kind)) = self.current {
            if now >= until || (kind == Kind::Acks && p.free >= ACK_BATCH) {
                self.current = None;
                return Change::End;
            }
            return Change::Nothing;
        }
        if p.acks > 0 && may && p.free < ACK_BATCH && p.target_up && p.target_dry {
            // The window is full and the target acks one message at a time: without this, each
            // ack would wake the pair to forward one message.
            return self.start(now, Kind::Acks);
        }
        Change::Nothing
    }

    fn start(&mut self, now: Instant, kind: Kind) -> Change {
        self.lingered_recently = true;
        self.current = Some((now + LINGER, kind));
        Change::Start(kind)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn busy_pass(taken: usize) -> Pass {
        Pass {
            taken,
            window: 1000,
            free: 1000,
            target_up: true,
            source_dry: true,
            target_dry: true,
            ..Pass::default()
        }
    }

    #[test]
    fn a_big_pass_lingers_for_one_ms_then_it_ends() {
        let t0 = Instant::now();
        let mut l = Lingering::new(t0);
        assert_eq!(l.after_pass(t0, &busy_pass(50)), Change::Start(Kind::Load));
        assert_eq!(l.until(), Some(t0 + LINGER));
        assert_eq!(l.after_pass(t0 + MS / 2, &busy_pass(0)), Change::Nothing);
        assert_eq!(l.after_pass(t0 + MS, &busy_pass(0)), Change::End);
        assert_eq!(l.kind(), None);
    }

    #[test]
    fn low_rates_small_windows_draining_and_undrained_sockets_never_linger() {
        let t0 = Instant::now();
        let mut l = Lingering::new(t0);
        // One message per pass, one pass per ms: 1 per ms, below the rate.
        for i in 1..20u32 {
            assert_eq!(l.after_pass(t0 + MS * i, &busy_pass(1)), Change::Nothing);
        }
        let small_window = Pass {
            window: 20,
            free: 0,
            acks: 5,
            ..busy_pass(50)
        };
        let draining = Pass {
            draining: true,
            ..busy_pass(50)
        };
        let more_to_read = Pass {
            source_dry: false,
            ..busy_pass(50)
        };
        for p in [small_window, draining, more_to_read] {
            assert_eq!(l.after_pass(t0, &p), Change::Nothing, "{p:?}");
        }
    }

    #[test]
    fn small_passes_at_a_high_rate_linger_unless_the_pair_lingered_meanwhile() {
        let t0 = Instant::now();
        let mut l = Lingering::new(t0);
        // Three passes of 2 within a ms: each too small, together 6 per ms.
        for i in 0..3u32 {
            assert_eq!(
                l.after_pass(t0 + MS * i / 3, &busy_pass(2)),
                Change::Nothing
            );
        }
        assert_eq!(
            l.after_pass(t0 + MS, &busy_pass(2)),
            Change::Start(Kind::Load)
        );
        // A pair that lingered in the last ms is batching already: the rate alone does not
        // make it linger again.
        let mut l = Lingering::new(t0);
        assert_eq!(l.after_pass(t0, &busy_pass(50)), Change::Start(Kind::Load));
        assert_eq!(l.after_pass(t0 + MS, &busy_pass(3)), Change::End);
    }

    #[test]
    fn a_full_window_waits_for_a_batch_of_acks_and_goes_on_when_there_is_room() {
        let t0 = Instant::now();
        let mut l = Lingering::new(t0);
        let full = Pass {
            acks: 1,
            free: 1,
            ..busy_pass(1)
        };
        assert_eq!(l.after_pass(t0, &full), Change::Start(Kind::Acks));
        let some = Pass {
            acks: 10,
            free: 11,
            ..busy_pass(0)
        };
        assert_eq!(l.after_pass(t0 + MS / 4, &some), Change::Nothing);
        let room = Pass {
            acks: 30,
            free: ACK_BATCH + 9,
            ..busy_pass(0)
        };
        assert_eq!(l.after_pass(t0 + MS / 2, &room), Change::End);
        // No acks in the pass (a stalled target): no lingering, the pair waits for the next ack.
        let stalled = Pass {
            acks: 0,
            free: 0,
            ..busy_pass(0)
        };
        assert_eq!(l.after_pass(t0 + MS * 2, &stalled), Change::Nothing);
    }
}
