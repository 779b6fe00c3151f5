//! The thread that owns a route's spool logs (one per pair) and does their file I/O, off the
//! async runtime. Pairs send commands; the thread takes every command that is waiting, applies
//! them, makes each touched log durable with one sync, and only then answers: appends that
//! arrive while a sync runs, or within `GROUP_EVERY` of the last one, are grouped into the next
//! one, so a log is synced at most 500 times a second whatever the message rate (and the pair
//! and this thread wake each other as rarely). A healthy target does not wait for it: the pair
//! acknowledges its source on the target's ack when that comes first.
//!
//! It decides nothing about messages: what to append, when to acknowledge the source and what
//! to forward are the pair machine's. An I/O error fails the group it happened in (the pair is
//! told, and acknowledges nothing of it); the thread goes on.

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
        mpsc,
    },
    thread::JoinHandle,
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::sync::mpsc::UnboundedSender;
use tracing::{error, warn};

use super::{Log, LogOptions, Record};

/// A group is synced at most this often: what arrives in between waits for the next one.
const GROUP_EVERY: std::time::Duration = std::time::Duration::from_millis(2);
/// How often at most a moved cursor is written (each write is a file write and a rename).
const CURSOR_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// A pair's view of its log, updated by the thread after every group (for admission and
/// metrics).
#[derive(Debug, Default)]
pub struct LogGauges {
    pub messages: AtomicU64,
    pub bytes: AtomicU64,
    /// Unix ms when the oldest unacknowledged record was stored (0: none).
    pub oldest_ms: AtomicU64,
    /// At or over `max_bytes`: the pair stops reading its source.
    pub full: AtomicBool,
    pub fsyncs: AtomicU64,
    /// Records found damaged (and skipped) in this log since it was opened.
    pub damaged: AtomicU64,
}

/// What the thread tells a pair.
#[derive(Debug)]
pub enum Reply {
    /// This many of the pair's appends, in the order sent, are durable.
    Durable(usize),
    /// This many of the pair's appends could not be made durable: the pair must not acknowledge
    /// them to the source (it reconnects, and the source redelivers).
    Failed(usize, String),
    /// Records read for forwarding, oldest first (empty: nothing more now).
    Records(Vec<Record>),
}

enum Command {
    Open {
        pair: usize,
        replies: UnboundedSender<Reply>,
        gauges: Arc<LogGauges>,
        opened: std::sync::mpsc::Sender<Result<Opened, String>>,
    },
    Append(usize, Vec<Record>),
    Ack(usize, Vec<u64>),
    /// Pair, from sequence number, at most this many.
    Read(usize, u64, usize),
    Close(usize),
}

/// The handle pairs use; cloning shares the thread.
#[derive(Clone, Debug)]
pub struct Spool {
    tx: mpsc::Sender<Command>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Command::Open { .. } => "Open",
            Command::Append(..) => "Append",
            Command::Ack(..) => "Ack",
            Command::Read(..) => "Read",
            Command::Close(..) => "Close",
        })
    }
}

/// Where an opened log stands: what the pair numbers its next append with, and where its
/// unacknowledged records start (what a restart forwards first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub next_seq: u64,
    pub first_unacked: u64,
}

struct OpenLog {
    log: Log,
    replies: UnboundedSender<Reply>,
    gauges: Arc<LogGauges>,
    appended: usize,
    /// Appends waiting for the next sync, not yet given to the log: a record the target
    /// acknowledged meanwhile (`None`) is never written (a healthy target's usual case).
    staged: Vec<(u64, Option<Record>)>,
    /// Appends wait for a sync.
    dirty: bool,
    /// Acks applied since the gauges were last published.
    acked: bool,
    cursor_saved: std::time::Instant,
    /// Acks since the cursor was last written.
    cursor_moved: bool,
    reads: Vec<(u64, usize)>,
}

impl Spool {
    /// Starts the thread for a route whose pairs keep their logs in `<dir>/<pair index>`.
    pub fn start(dir: PathBuf, max_bytes: u64, options: LogOptions) -> (Spool, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("mqbridge-spool".into())
            .spawn(move || run(&dir, max_bytes, options, &rx))
            .expect("spawning the spool thread");
        (Spool { tx }, thread)
    }

    /// Opens pair `pair`'s log (recovering what a previous run left). Blocking: call it off the
    /// runtime (`spawn_blocking`) or before it runs.
    pub fn open(
        &self,
        pair: usize,
        replies: UnboundedSender<Reply>,
        gauges: Arc<LogGauges>,
    ) -> Result<Opened, String> {
        let (opened, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Command::Open {
                pair,
                replies,
                gauges,
                opened,
            })
            .map_err(|_| "the spool thread is gone".to_string())?;
        rx.recv()
            .map_err(|_| "the spool thread is gone".to_string())?
    }

    /// A handle on no thread: every command is dropped (tests of the pair machine, which
    /// never talks to it).
    pub fn unconnected() -> Spool {
        Spool {
            tx: mpsc::channel().0,
        }
    }

    pub fn append(&self, pair: usize, records: Vec<Record>) {
        let _ = self.tx.send(Command::Append(pair, records));
    }

    pub fn ack(&self, pair: usize, seqs: Vec<u64>) {
        let _ = self.tx.send(Command::Ack(pair, seqs));
    }

    /// Up to `max` durable records from `from` on (the pair has what is below in memory).
    pub fn read(&self, pair: usize, from: u64, max: usize) {
        let _ = self.tx.send(Command::Read(pair, from, max));
    }

    /// Closes the pair's log (its lock is released); the thread ends once every handle is gone.
    pub fn close(&self, pair: usize) {
        let _ = self.tx.send(Command::Close(pair));
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn run(dir: &std::path::Path, max_bytes: u64, options: LogOptions, rx: &mpsc::Receiver<Command>) {
    let mut logs: std::collections::BTreeMap<usize, OpenLog> = Default::default();
    let mut synced_at: Option<std::time::Instant> = None;
    loop {
        if let Some(at) = synced_at.take() {
            // Commands sent while this thread sleeps wake nobody; they make the next group.
            std::thread::sleep(GROUP_EVERY.saturating_sub(at.elapsed()));
        }
        // Woken by a command, or once a second to write cursors that moved.
        let mut batch = match rx.recv_timeout(CURSOR_EVERY) {
            Ok(first) => vec![first],
            Err(mpsc::RecvTimeoutError::Timeout) => Vec::new(),
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        };
        batch.extend(rx.try_iter());
        for command in batch {
            match command {
                Command::Open {
                    pair,
                    replies,
                    gauges,
                    opened,
                } => {
                    let path = dir.join(pair.to_string());
                    match Log::open(&path, options) {
                        Ok(log) => {
                            let damage = log.damage;
                            if !damage.is_clean() {
                                warn!(dir = %path.display(), corrupt = damage.corrupt, skipped_bytes = damage.skipped_bytes, torn_tail = damage.torn_tail, "spool: damaged records found and skipped");
                            }
                            gauges
                                .damaged
                                .store(damage.corrupt + u64::from(damage.torn_tail), Relaxed);
                            let at = Opened {
                                next_seq: log.next_seq(),
                                first_unacked: log.first_unacked(),
                            };
                            let mut o = OpenLog::new(log, replies, gauges);
                            publish_gauges(&mut o, max_bytes);
                            logs.insert(pair, o);
                            let _ = opened.send(Ok(at));
                        }
                        Err(e) => {
                            let _ = opened.send(Err(format!(
                                "cannot open the spool in {}: {e}",
                                path.display()
                            )));
                        }
                    }
                }
                Command::Append(pair, records) => {
                    if let Some(o) = logs.get_mut(&pair) {
                        o.stage(records);
                    }
                }
                Command::Ack(pair, seqs) => {
                    if let Some(o) = logs.get_mut(&pair) {
                        o.ack(seqs);
                    }
                }
                Command::Read(pair, from, max) => {
                    if let Some(o) = logs.get_mut(&pair) {
                        o.reads.push((from, max));
                    }
                }
                Command::Close(pair) => {
                    if let Some(mut o) = logs.remove(&pair) {
                        o.unstage();
                        let _ = o.log.sync();
                        let _ = o.log.save_cursor();
                    }
                }
            }
        }
        for o in logs.values_mut() {
            let mut replies = Vec::new();
            if o.dirty {
                o.dirty = false;
                let appended = std::mem::take(&mut o.appended);
                o.unstage();
                synced_at = Some(std::time::Instant::now());
                match o.log.sync() {
                    Ok(()) => {
                        o.gauges.fsyncs.fetch_add(1, Relaxed);
                        if appended > 0 {
                            replies.push(Reply::Durable(appended));
                        }
                    }
                    Err(e) => {
                        error!(dir = %o.log.dir().display(), error = %e, "spool: cannot write; the messages are not acknowledged to the source");
                        o.log.discard_pending();
                        if appended > 0 {
                            replies.push(Reply::Failed(appended, e.to_string()));
                        }
                    }
                }
            }
            for (from, max) in std::mem::take(&mut o.reads) {
                let records = o.log.read_from(from, max).unwrap_or_else(|e| {
                    error!(dir = %o.log.dir().display(), error = %e, "spool: cannot read");
                    Vec::new()
                });
                replies.push(Reply::Records(records));
            }
            o.cursor_moved |= o.acked;
            if o.cursor_moved && o.cursor_saved.elapsed() >= CURSOR_EVERY {
                o.cursor_moved = false;
                o.cursor_saved = std::time::Instant::now();
                if let Err(e) = o.log.save_cursor() {
                    warn!(dir = %o.log.dir().display(), error = %e, "spool: cannot write the cursor (a restart replays acknowledged records)");
                }
            }
            // Gauges first: a pair that hears back sees them current.
            if o.acked || !replies.is_empty() {
                o.acked = false;
                publish_gauges(o, max_bytes);
            }
            for r in replies {
                let _ = o.replies.send(r);
            }
        }
    }
}

impl OpenLog {
    fn new(log: Log, replies: UnboundedSender<Reply>, gauges: Arc<LogGauges>) -> OpenLog {
        OpenLog {
            log,
            replies,
            gauges,
            appended: 0,
            staged: Vec::new(),
            dirty: false,
            acked: false,
            cursor_saved: std::time::Instant::now(),
            cursor_moved: false,
            reads: Vec::new(),
        }
    }

    /// Appends wait here for the next sync.
    fn stage(&mut self, records: Vec<Record>) {
        let now = now_ms();
        for mut r in records {
            r.stored_at_ms = now;
            self.staged.push((r.seq, Some(r)));
            self.appended += 1;
        }
        self.dirty = true;
    }

    /// The target has these records: a staged one is never written, a written one may go.
    fn ack(&mut self, seqs: Vec<u64>) {
        for seq in seqs {
            // The pair numbers its appends from the log's `next_seq` on, in increasing order.
            if seq >= self.log.next_seq()
                && let Ok(at) = self.staged.binary_search_by_key(&seq, |s| s.0)
            {
                self.staged[at].1 = None;
                continue;
            }
            if let Err(e) = self.log.ack(seq) {
                warn!(dir = %self.log.dir().display(), error = %e, "spool: cannot delete an acknowledged segment");
            }
        }
        self.acked = true;
    }

    /// Gives the staged appends the target did not acknowledge meanwhile to the log.
    fn unstage(&mut self) {
        for r in self.staged.drain(..).filter_map(|(_, r)| r) {
            self.log.append(r);
        }
    }
}

fn publish_gauges(o: &mut OpenLog, max_bytes: u64) {
    let g = &o.gauges;
    let bytes = o.log.bytes();
    g.messages.store(o.log.len(), Relaxed);
    g.bytes.store(bytes, Relaxed);
    g.full.store(bytes >= max_bytes, Relaxed);
    g.oldest_ms
        .store(o.log.oldest_stored_at_ms().unwrap_or(0), Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Qos;
    use bytes::Bytes;
    use tokio::sync::mpsc::unbounded_channel;

    fn msg(i: u32) -> Record {
        Record {
            seq: 0,
            stored_at_ms: 0,
            expires_at_ms: None,
            qos: Qos::AtLeastOnce,
            retain: false,
            topic: format!("t/{i}"),
            properties: None,
            payload: Bytes::from_static(b"payload"),
        }
    }

    #[tokio::test]
    async fn appends_are_grouped_answered_in_order_and_read_back() {
        let dir =
            std::env::temp_dir().join(format!("mqbridge-spool-writer-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (spool, thread) = Spool::start(dir.clone(), 1 << 30, LogOptions::default());
        let (tx, mut rx) = unbounded_channel();
        let gauges = Arc::new(LogGauges::default());
        let s = spool.clone();
        let g = gauges.clone();
        tokio::task::spawn_blocking(move || s.open(0, tx, g))
            .await
            .unwrap()
            .unwrap();
        const N: u32 = 2000;
        for i in 0..N {
            spool.append(0, vec![msg(i)]);
        }
        let mut durable = 0;
        while durable < N as usize {
            match rx.recv().await.unwrap() {
                Reply::Durable(n) => durable += n,
                other => panic!("{other:?}"),
            }
        }
        let fsyncs = gauges.fsyncs.load(Relaxed);
        assert!(
            fsyncs >= 1 && fsyncs < u64::from(N),
            "{fsyncs} fsyncs for {N} appends"
        );
        assert_eq!(gauges.messages.load(Relaxed), u64::from(N));
        assert!(gauges.oldest_ms.load(Relaxed) > 0);
        let mut seqs = Vec::new();
        let mut topics = Vec::new();
        loop {
            spool.read(0, 0, 500);
            let Reply::Records(records) = rx.recv().await.unwrap() else {
                panic!("not records")
            };
            if records.is_empty() {
                break;
            }
            seqs.extend(records.iter().map(|r| r.seq));
            topics.extend(records.into_iter().map(|r| r.topic));
        }
        let expected: Vec<String> = (0..N).map(|i| format!("t/{i}")).collect();
        assert_eq!(topics, expected);
        spool.ack(0, seqs);
        spool.read(0, 0, 1); // a round trip: the acks were applied before it
        let _ = rx.recv().await;
        assert_eq!(gauges.messages.load(Relaxed), 0);
        assert_eq!(gauges.oldest_ms.load(Relaxed), 0);
        spool.close(0);
        drop(spool);
        thread.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn what_the_target_acknowledged_before_the_sync_is_never_written() {
        let dir =
            std::env::temp_dir().join(format!("mqbridge-spool-staged-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut o = OpenLog::new(
            Log::open(&dir, LogOptions::default()).unwrap(),
            unbounded_channel().0,
            Arc::default(),
        );
        let numbered = |seqs: std::ops::RangeInclusive<u64>| {
            seqs.map(|seq| Record {
                seq,
                ..msg(seq as u32)
            })
            .collect::<Vec<_>>()
        };
        o.stage(numbered(1..=10));
        o.ack(vec![1, 2, 3, 5, 10]);
        o.unstage();
        o.log.sync().unwrap();
        let one = o.log.bytes() / 5;
        assert_eq!(o.log.len(), 5, "4, 6, 7, 8, 9 are kept");
        assert_eq!(o.log.bytes(), 5 * one, "and only they were written");
        let kept: Vec<u64> = o.log.read(100).unwrap().iter().map(|r| r.seq).collect();
        assert_eq!(kept, [4, 6, 7, 8, 9]);
        // Acks of written records delete them as before; the numbering goes on after 10.
        o.ack(vec![4, 6, 7, 8, 9]);
        assert!(o.log.is_empty());
        assert_eq!(
            o.log.next_seq(),
            10,
            "10 was never written: the next append may take it"
        );
        o.stage(numbered(11..=11));
        o.unstage();
        o.log.sync().unwrap();
        assert_eq!(o.log.len(), 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn a_full_spool_says_so_and_still_keeps_what_it_was_given() {
        let dir = std::env::temp_dir().join(format!("mqbridge-spool-full-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (spool, _thread) = Spool::start(dir.clone(), 1000, LogOptions::default());
        let (tx, mut rx) = unbounded_channel();
        let gauges = Arc::new(LogGauges::default());
        let (s, g) = (spool.clone(), gauges.clone());
        tokio::task::spawn_blocking(move || s.open(3, tx, g))
            .await
            .unwrap()
            .unwrap();
        spool.append(3, (0..40).map(msg).collect());
        assert!(matches!(rx.recv().await, Some(Reply::Durable(40))));
        assert!(
            gauges.full.load(Relaxed),
            "{} bytes",
            gauges.bytes.load(Relaxed)
        );
        assert_eq!(gauges.messages.load(Relaxed), 40);
        spool.close(3);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
