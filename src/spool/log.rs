//! The spool's files: a directory of append-only segments and a cursor, for one pair.
//!
//! Segments are named by the sequence number of their first record and hold records back to
//! back (`record.rs`). Appends go to the last segment and become durable together on `sync`
//! (one `fdatasync` for a whole group, so fsyncs stay few under any load); a segment that grew
//! past the segment size is closed and a new one started. Acknowledged records are not
//! rewritten: the cursor (the lowest sequence number not yet acknowledged) moves, is written
//! with the next sync, and segments wholly below it are deleted. A crash between an ack and the
//! cursor's next write replays those records (at least once, never lost).
//!
//! Opening takes an exclusive lock on `<dir>/lock` (a second process gets an error naming the
//! directory), reads the cursor and scans every segment: damage is skipped and counted, a torn
//! tail is cut off so appends go on after the last good record. This module does blocking file
//! I/O and nothing else: it runs on a thread of its own, never on the runtime.

use std::{
    collections::{BTreeSet, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Read, Seek, SeekFrom, Write},
    path::{Path, PathBuf},
};

use bytes::BytesMut;

use super::record::{self, Damage, Record};

/// How a log is kept.
#[derive(Debug, Clone, Copy)]
pub struct LogOptions {
    /// A segment that reached this many bytes is closed; the next append starts a new one.
    pub segment_bytes: u64,
}

impl Default for LogOptions {
    fn default() -> Self {
        LogOptions {
            segment_bytes: 64 << 20,
        }
    }
}

#[derive(Debug)]
struct Segment {
    first_seq: u64,
    /// The last record's sequence number (`first_seq - 1` while empty).
    last_seq: u64,
    path: PathBuf,
    bytes: u64,
    /// When its first record was stored (Unix ms; `None` while empty).
    first_stored_ms: Option<u64>,
}

/// Where the next read continues: a segment (by its first sequence number) and an offset.
#[derive(Debug, Clone, Copy)]
struct ReadAt {
    segment: u64,
    offset: u64,
}

/// One pair's spool on disk.
#[derive(Debug)]
pub struct Log {
    dir: PathBuf,
    options: LogOptions,
    _lock: File,
    segments: VecDeque<Segment>,
    /// The open last segment, when appends have started on it.
    writer: Option<File>,
    pending: BytesMut,
    pending_first: Option<u64>,
    pending_last: Option<u64>,
    pending_first_ms: Option<u64>,
    next_seq: u64,
    durable_below: u64,
    /// Every record below this sequence number is acknowledged.
    acked_below: u64,
    /// Acknowledged records at or above `acked_below` (acks may come out of order).
    acked_above: BTreeSet<u64>,
    cursor_written: u64,
    read_at: Option<ReadAt>,
    /// The last record `read` returned or skipped.
    last_read: Option<u64>,
    /// Damage found since open (recovery and reads).
    pub damage: Damage,
}

const CURSOR: &str = "cursor";
/// Bytes read from a segment at a time.
const READ_CHUNK: u64 = 64 << 10;
const LOCK: &str = "lock";
const SUFFIX: &str = ".seg";

impl Log {
    /// Whether another process holds the log in `dir` (an error naming it), without reading
    /// or changing anything in it.
    pub fn check_free(dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)?;
        lock(dir).map(drop)
    }

    /// Opens (creating) the log in `dir`. Fails when another process holds it.
    pub fn open(dir: &Path, options: LogOptions) -> io::Result<Log> {
        fs::create_dir_all(dir)?;
        let lock = lock(dir)?;
        let acked_below = read_cursor(&dir.join(CURSOR)).unwrap_or(0);
        let mut firsts: Vec<u64> = Vec::new();
        for entry in fs::read_dir(dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(first) = name
                .strip_suffix(SUFFIX)
                .and_then(|n| n.parse::<u64>().ok())
            {
                firsts.push(first);
            }
        }
        firsts.sort_unstable();
        let mut log = Log {
            dir: dir.to_path_buf(),
            options,
            _lock: lock,
            segments: VecDeque::new(),
            writer: None,
            pending: BytesMut::new(),
            pending_first: None,
            pending_last: None,
            pending_first_ms: None,
            next_seq: acked_below.max(1),
            durable_below: acked_below.max(1),
            acked_below: acked_below.max(1),
            acked_above: BTreeSet::new(),
            cursor_written: acked_below,
            read_at: None,
            last_read: None,
            damage: Damage::default(),
        };
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = segment_path(dir, first);
            let data = fs::read(&path)?;
            let (found, damage) = record::scan(&data);
            log.add_damage(damage);
            let good_end = found.last().map_or(0, |f| f.end) as u64;
            let last_seq = found
                .last()
                .map_or(first.saturating_sub(1), |f| f.record.seq);
            if i + 1 == count && damage.torn_tail {
                // Appends go on after the last good record.
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .set_len(good_end)?;
            }
            let bytes = if i + 1 == count && damage.torn_tail {
                good_end
            } else {
                data.len() as u64
            };
            log.next_seq = log.next_seq.max(last_seq + 1).max(first);
            log.segments.push_back(Segment {
                first_seq: first,
                last_seq,
                path,
                bytes,
                first_stored_ms: found.first().map(|f| f.record.stored_at_ms),
            });
        }
        log.durable_below = log.next_seq;
        log.drop_acked_segments()?;
        Ok(log)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records appended and not yet acknowledged.
    pub fn len(&self) -> u64 {
        self.next_seq - self.acked_below - self.acked_above.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes on disk (and about to be), whole segments: what `max_bytes` is held against.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum::<u64>() + self.pending.len() as u64
    }

    /// When the oldest segment holding unacknowledged records was started (Unix ms): the age
    /// of the oldest message, to a segment's precision.
    pub fn oldest_stored_at_ms(&self) -> Option<u64> {
        if self.is_empty() {
            return None;
        }
        self.segments
            .iter()
            .find(|s| s.last_seq >= self.acked_below)
            .and_then(|s| s.first_stored_ms)
    }

    /// The oldest record not yet acknowledged (or `next_seq` when none is).
    pub fn first_unacked(&self) -> u64 {
        self.acked_below
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Every record below this is durable.
    pub fn durable_below(&self) -> u64 {
        self.durable_below
    }

    /// Adds a record to the group that the next `sync` makes durable. Its `seq` is kept when
    /// it is at least `next_seq` (the pair numbers its appends itself, so that it can forward
    /// a message from memory before reading it back); numbers skipped count as gone. A lower
    /// one (0, say) is replaced by `next_seq`.
    pub fn append(&mut self, mut record: Record) -> u64 {
        if record.seq < self.next_seq {
            record.seq = self.next_seq;
        }
        for skipped in self.next_seq..record.seq {
            self.acked_above.insert(skipped);
        }
        self.next_seq = record.seq + 1;
        record.encode(&mut self.pending);
        self.pending_first.get_or_insert(record.seq);
        self.pending_last = Some(record.seq);
        self.pending_first_ms.get_or_insert(record.stored_at_ms);
        record.seq
    }

    /// Writes what was appended and makes it durable (one fdatasync), and the cursor with it.
    /// On an error nothing of the group counts as durable; the caller must not acknowledge it.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(last) = self.pending_last {
            let first = self.pending_first.unwrap_or(self.durable_below);
            let roll = self
                .segments
                .back()
                .is_none_or(|s| s.bytes >= self.options.segment_bytes);
            if roll {
                let path = segment_path(&self.dir, first);
                self.segments.push_back(Segment {
                    first_seq: first,
                    last_seq: first - 1,
                    path,
                    bytes: 0,
                    first_stored_ms: None,
                });
                self.writer = None;
            }
            if self.writer.is_none() {
                let seg = self.segments.back().expect("a segment");
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&seg.path)?;
                if roll {
                    sync_dir(&self.dir)?;
                }
                self.writer = Some(file);
            }
            let file = self.writer.as_mut().expect("open");
            let written = file
                .write_all(&self.pending)
                .and_then(|()| file.sync_data());
            if let Err(e) = written {
                // The file may hold part of the group: reopen and cut it back on the next try.
                self.writer = None;
                let seg = self.segments.back().expect("a segment");
                let _ = OpenOptions::new()
                    .write(true)
                    .open(&seg.path)
                    .and_then(|f| f.set_len(seg.bytes));
                return Err(e);
            }
            let seg = self.segments.back_mut().expect("a segment");
            seg.bytes += self.pending.len() as u64;
            seg.last_seq = last;
            seg.first_stored_ms = seg.first_stored_ms.or(self.pending_first_ms);
            self.pending_first_ms = None;
            self.pending.clear();
            self.pending_first = None;
            self.pending_last = None;
            self.durable_below = last + 1;
        }
        Ok(())
    }

    /// Writes the cursor if it moved. Not on every ack (a file write and rename each): a
    /// cursor behind the acks only replays acknowledged records after a crash (at least once).
    /// The spool thread calls it at most once a second, and on close.
    pub fn save_cursor(&mut self) -> io::Result<()> {
        if self.cursor_written != self.acked_below {
            write_cursor(&self.dir, self.acked_below)?;
            self.cursor_written = self.acked_below;
        }
        Ok(())
    }

    /// Drops an appended group that could not be made durable: the caller leaves those
    /// messages unacknowledged at the source (they come again under new numbers). Their
    /// numbers count as gone.
    pub fn discard_pending(&mut self) {
        if let (Some(first), Some(last)) = (self.pending_first, self.pending_last) {
            for seq in first..=last {
                self.acked_above.insert(seq);
            }
            while self.acked_above.remove(&self.acked_below) {
                self.acked_below += 1;
            }
        }
        self.pending.clear();
        self.pending_first = None;
        self.pending_last = None;
        self.pending_first_ms = None;
        self.durable_below = self.next_seq;
    }

    /// The target took `seq`: it may go. Segments wholly acknowledged are deleted.
    pub fn ack(&mut self, seq: u64) -> io::Result<()> {
        if seq < self.acked_below || seq >= self.next_seq {
            return Ok(());
        }
        self.acked_above.insert(seq);
        while self.acked_above.remove(&self.acked_below) {
            self.acked_below += 1;
        }
        if self.is_empty() && self.pending_last.is_none() {
            // Nothing left: every segment goes (the last one too), so the space is free again
            // and the next group starts a new segment.
            return self.drop_all_segments();
        }
        self.drop_acked_segments()
    }

    /// Reads up to `max` durable records after the last one read (from the oldest
    /// unacknowledged one after an open), skipping acknowledged and damaged ones.
    pub fn read(&mut self, max: usize) -> io::Result<Vec<Record>> {
        self.read_from(0, max)
    }

    /// As `read`, from sequence number `from` on: what the pair already has in memory is not
    /// read again.
    pub fn read_from(&mut self, from: u64, max: usize) -> io::Result<Vec<Record>> {
        let behind = self.last_read.map_or(self.acked_below, |l| l + 1) < from;
        if behind {
            // Skip whole segments below `from` rather than scanning them.
            let target = self.segments.iter().rev().find(|s| s.first_seq <= from);
            let current = self.read_at.map(|a| a.segment);
            if let Some(t) = target
                && current.is_none_or(|c| c < t.first_seq)
            {
                self.read_at = Some(ReadAt {
                    segment: t.first_seq,
                    offset: 0,
                });
                self.last_read = Some(t.first_seq.saturating_sub(1));
            }
        }
        let mut out = Vec::new();
        while out.len() < max {
            let at = match self.read_at {
                Some(at) => at,
                None => match self.segments.front() {
                    Some(s) => ReadAt {
                        segment: s.first_seq,
                        offset: 0,
                    },
                    None => break,
                },
            };
            let Some(idx) = self.segments.iter().position(|s| s.first_seq == at.segment) else {
                // Its segment was deleted (everything in it acknowledged): go on from the
                // oldest remaining one.
                self.read_at = None;
                if self.segments.is_empty() {
                    break;
                }
                continue;
            };
            let seg = &self.segments[idx];
            if at.offset >= seg.bytes {
                match self.segments.get(idx + 1) {
                    Some(next) => {
                        self.read_at = Some(ReadAt {
                            segment: next.first_seq,
                            offset: 0,
                        });
                        continue;
                    }
                    None => break,
                }
            }
            // A chunk at a time (reading the rest of a 64 MiB segment for every batch made a
            // drain quadratic); the whole rest only for a record larger than a chunk.
            let rest = seg.bytes - at.offset;
            let mut file = File::open(&seg.path)?;
            file.seek(SeekFrom::Start(at.offset))?;
            let mut data = Vec::new();
            (&mut file)
                .take(rest.min(READ_CHUNK))
                .read_to_end(&mut data)?;
            let (mut found, _) = record::scan(&data);
            let mut whole = data.len() as u64 == rest;
            if found.is_empty() && !whole {
                file.take(rest - data.len() as u64).read_to_end(&mut data)?;
                found = record::scan(&data).0;
                whole = true;
            }
            // Damage here was counted when the log was opened; what it destroyed is counted
            // as `lost` below. A chunk that ends inside a record is read again from its start.
            let mut offset = if whole {
                at.offset + data.len() as u64
            } else {
                at.offset + found.last().map_or(0, |f| f.end) as u64
            };
            for f in found {
                if out.len() == max {
                    offset = at.offset + f.start as u64;
                    break;
                }
                let seq = f.record.seq;
                self.skip_gap_before(seq)?;
                if seq >= from && seq >= self.acked_below && !self.acked_above.contains(&seq) {
                    out.push(f.record);
                }
            }
            self.read_at = Some(ReadAt {
                segment: at.segment,
                offset,
            });
        }
        Ok(out)
    }

    /// Reading starts again from the oldest unacknowledged record (after a target reconnect
    /// without its session, say).
    pub fn rewind(&mut self) {
        self.read_at = None;
        self.last_read = None;
    }

    /// Records missing between the last one read and `seq` were damaged: they count as gone
    /// (acknowledged), so the log can empty. The damage itself was counted by the scan.
    fn skip_gap_before(&mut self, seq: u64) -> io::Result<()> {
        let from = self.last_read.map_or(self.acked_below, |l| l + 1);
        self.last_read = Some(seq);
        for missing in from.max(self.acked_below)..seq {
            if !self.acked_above.contains(&missing) {
                self.damage.lost += 1;
                self.ack(missing)?;
            }
        }
        Ok(())
    }

    fn add_damage(&mut self, d: Damage) {
        self.damage.corrupt += d.corrupt;
        self.damage.skipped_bytes += d.skipped_bytes;
        self.damage.torn_tail |= d.torn_tail;
    }

    fn drop_all_segments(&mut self) -> io::Result<()> {
        self.writer = None;
        self.read_at = None;
        while let Some(seg) = self.segments.pop_front() {
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn drop_acked_segments(&mut self) -> io::Result<()> {
        // Never the last segment: appends go on in it.
        while self.segments.len() > 1
            && self
                .segments
                .front()
                .is_some_and(|s| s.last_seq < self.acked_below)
        {
            let seg = self.segments.pop_front().expect("checked");
            match fs::remove_file(&seg.path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Takes `dir`'s lock file (held while the returned file is open).
fn lock(dir: &Path) -> io::Result<File> {
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(fs::TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "spool directory {} is in use by another process",
                dir.display()
            ),
        )),
        Err(fs::TryLockError::Error(e)) => Err(e),
    }
}

fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}{SUFFIX}"))
}

/// The cursor, if it is there and intact (else every record is replayed: duplicates, not loss).
fn read_cursor(path: &Path) -> Option<u64> {
    let data = fs::read(path).ok()?;
    let value: [u8; 8] = data.get(..8)?.try_into().ok()?;
    let crc = data.get(8..12)?;
    (crc32fast::hash(&value).to_be_bytes() == crc).then_some(u64::from_be_bytes(value))
}

fn write_cursor(dir: &Path, value: u64) -> io::Result<()> {
    let mut data = value.to_be_bytes().to_vec();
    data.extend_from_slice(&crc32fast::hash(&value.to_be_bytes()).to_be_bytes());
    let tmp = dir.join("cursor.tmp");
    fs::write(&tmp, &data)?;
    // Not synced: a cursor lost to a crash only replays acknowledged records (duplicates).
    fs::rename(tmp, dir.join(CURSOR))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Qos;
    use bytes::Bytes;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "mqbridge-spool-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn msg(i: u64) -> Record {
        Record {
            seq: 0,
            stored_at_ms: 1,
            expires_at_ms: None,
            qos: Qos::AtLeastOnce,
            retain: false,
            topic: format!("t/{i}"),
            properties: None,
            payload: Bytes::from(format!("m{i}")),
        }
    }

    fn topics(records: &[Record]) -> Vec<String> {
        records.iter().map(|r| r.topic.clone()).collect()
    }

    fn small() -> LogOptions {
        LogOptions { segment_bytes: 100 }
    }

    #[test]
    fn what_was_synced_is_read_back_in_order_after_a_reopen() {
        let d = dir("reopen");
        let mut log = Log::open(&d, small()).unwrap();
        for i in 0..10 {
            log.append(msg(i));
            log.sync().unwrap(); // a group goes to one segment: roll over between groups
        }
        assert_eq!(log.len(), 10);
        assert!(log.segments.len() > 1, "rolled over small segments");
        drop(log);
        let mut log = Log::open(&d, small()).unwrap();
        let back = log.read(100).unwrap();
        assert_eq!(
            topics(&back),
            (0..10).map(|i| format!("t/{i}")).collect::<Vec<_>>()
        );
        assert!(log.damage.is_clean());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn acked_records_are_gone_after_a_reopen_and_their_segments_deleted() {
        let d = dir("ack");
        let mut log = Log::open(&d, small()).unwrap();
        let seqs: Vec<u64> = (0..10)
            .map(|i| {
                let seq = log.append(msg(i));
                log.sync().unwrap();
                seq
            })
            .collect();
        let files = fs::read_dir(&d).unwrap().count();
        // Out of order, as acks for different QoS may come.
        for &s in seqs[..6].iter().rev() {
            log.ack(s).unwrap();
        }
        log.ack(seqs[8]).unwrap();
        assert_eq!(log.len(), 3);
        assert!(
            fs::read_dir(&d).unwrap().count() < files,
            "segments deleted"
        );
        log.sync().unwrap();
        log.save_cursor().unwrap();
        drop(log);
        let mut log = Log::open(&d, small()).unwrap();
        let back = log.read(100).unwrap();
        // 8 was acknowledged above the cursor: replayed after a restart (at least once).
        assert_eq!(topics(&back), ["t/6", "t/7", "t/8", "t/9"]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_segment_larger_than_a_read_chunk_is_read_whole_and_in_order() {
        let d = dir("chunks");
        let mut log = Log::open(&d, LogOptions::default()).unwrap();
        for i in 0..60u64 {
            let mut m = msg(i);
            // Sizes that do not divide the chunk: records straddle its boundaries.
            m.payload = Bytes::from(vec![b'p'; 40_000 + (i as usize * 977) % 5_000]);
            log.append(m);
        }
        log.append({
            let mut big = msg(60);
            big.payload = Bytes::from(vec![b'b'; 3 << 20]); // larger than a chunk
            big
        });
        log.sync().unwrap();
        let mut back = Vec::new();
        loop {
            let batch = log.read(7).unwrap();
            if batch.is_empty() {
                break;
            }
            back.extend(batch);
        }
        let expected: Vec<String> = (0..=60).map(|i| format!("t/{i}")).collect();
        assert_eq!(topics(&back), expected);
        assert_eq!(back[60].payload.len(), 3 << 20);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_emptied_log_gives_its_space_back() {
        let d = dir("empty");
        let mut log = Log::open(&d, LogOptions::default()).unwrap();
        let seqs: Vec<u64> = (0..5).map(|i| log.append(msg(i))).collect();
        log.sync().unwrap();
        assert!(log.bytes() > 0);
        for s in seqs {
            log.ack(s).unwrap();
        }
        assert_eq!(log.bytes(), 0, "the last segment went too");
        log.append(msg(9));
        log.sync().unwrap();
        assert_eq!(topics(&log.read(10).unwrap()), ["t/9"]);
        drop(log);
        let mut log = Log::open(&d, LogOptions::default()).unwrap();
        assert_eq!(topics(&log.read(10).unwrap()), ["t/9"]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn reads_continue_where_they_stopped_and_see_later_appends() {
        let d = dir("reads");
        let mut log = Log::open(&d, small()).unwrap();
        for i in 0..5 {
            log.append(msg(i));
        }
        log.sync().unwrap();
        assert_eq!(topics(&log.read(2).unwrap()), ["t/0", "t/1"]);
        assert_eq!(topics(&log.read(2).unwrap()), ["t/2", "t/3"]);
        log.append(msg(5));
        assert_eq!(topics(&log.read(10).unwrap()), ["t/4"], "not yet durable");
        log.sync().unwrap();
        assert_eq!(topics(&log.read(10).unwrap()), ["t/5"]);
        log.rewind();
        assert_eq!(log.read(10).unwrap().len(), 6);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_second_opener_is_refused_naming_the_directory() {
        let d = dir("lock");
        let _log = Log::open(&d, small()).unwrap();
        let err = Log::open(&d, small()).unwrap_err();
        assert!(err.to_string().contains(&d.display().to_string()), "{err}");
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_torn_tail_loses_only_the_torn_record_and_appends_go_on() {
        let d = dir("torn");
        let mut log = Log::open(&d, LogOptions::default()).unwrap();
        for i in 0..4 {
            log.append(msg(i));
        }
        log.sync().unwrap();
        drop(log);
        let seg = segment_path(&d, 1);
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        let mut log = Log::open(&d, LogOptions::default()).unwrap();
        assert!(log.damage.torn_tail);
        log.append(msg(9));
        log.sync().unwrap();
        let back = log.read(100).unwrap();
        assert_eq!(topics(&back), ["t/0", "t/1", "t/2", "t/9"]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_record_is_skipped_counted_and_does_not_keep_the_log_from_emptying() {
        let d = dir("flip");
        let mut log = Log::open(&d, LogOptions::default()).unwrap();
        let seqs: Vec<u64> = (0..4).map(|i| log.append(msg(i))).collect();
        log.sync().unwrap();
        drop(log);
        let seg = segment_path(&d, 1);
        let mut data = fs::read(&seg).unwrap();
        let one = msg(0).encode(&mut BytesMut::new());
        data[one + 15] ^= 0xff; // inside the second record
        fs::write(&seg, &data).unwrap();
        let mut log = Log::open(&d, LogOptions::default()).unwrap();
        let back = log.read(100).unwrap();
        assert_eq!(topics(&back), ["t/0", "t/2", "t/3"]);
        assert_eq!((log.damage.corrupt, log.damage.lost), (1, 1));
        for r in &back {
            log.ack(r.seq).unwrap();
        }
        assert!(log.is_empty(), "{} left of {seqs:?}", log.len());
        let _ = fs::remove_dir_all(&d);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u8),
        Sync,
        Ack(prop::sample::Index),
        Read(u8),
        Reopen,
        /// A crash: appends not yet synced are gone.
        Crash,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (1u8..5).prop_map(Op::Append),
            2 => Just(Op::Sync),
            3 => any::<prop::sample::Index>().prop_map(Op::Ack),
            2 => (1u8..6).prop_map(Op::Read),
            1 => Just(Op::Reopen),
            1 => Just(Op::Crash),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Against a model: every record synced and not acknowledged is read back (after any
        /// reopen or crash), in the order appended, and nothing acknowledged before the last
        /// sync comes back.
        #[test]
        fn nothing_durable_and_unacknowledged_is_ever_lost(ops in proptest::collection::vec(op(), 1..60)) {
            let d = dir("model");
            let mut log = Some(Log::open(&d, small()).unwrap());
            // seq -> (topic, durable); acked removes.
            let mut model: BTreeMap<u64, (String, bool)> = BTreeMap::new();
            let mut acked_synced: BTreeSet<u64> = BTreeSet::new();
            let mut acked_unsynced: BTreeSet<u64> = BTreeSet::new();
            let mut delivered: BTreeMap<u64, String> = BTreeMap::new();
            let mut n = 0u64;
            for op in ops {
                let l = log.as_mut().unwrap();
                match op {
                    Op::Append(k) => for _ in 0..k {
                        let seq = l.append(msg(n));
                        model.insert(seq, (format!("t/{n}"), false));
                        n += 1;
                    },
                    Op::Sync => {
                        l.sync().unwrap();
                        l.save_cursor().unwrap();
                        for v in model.values_mut() { v.1 = true; }
                        acked_synced.extend(std::mem::take(&mut acked_unsynced));
                    }
                    Op::Ack(i) => {
                        let durable: Vec<u64> = delivered.keys().copied().collect();
                        if !durable.is_empty() {
                            let seq = durable[i.index(durable.len())];
                            l.ack(seq).unwrap();
                            delivered.remove(&seq);
                            model.remove(&seq);
                            acked_unsynced.insert(seq);
                        }
                    }
                    Op::Read(k) => {
                        for r in l.read(usize::from(k)).unwrap() {
                            let (topic, durable) = model.get(&r.seq).cloned()
                                .unwrap_or_else(|| panic!("read {} which was acknowledged", r.seq));
                            prop_assert!(durable);
                            prop_assert_eq!(&r.topic, &topic);
                            prop_assert!(delivered.keys().next_back().is_none_or(|&last| last < r.seq), "out of order");
                            delivered.insert(r.seq, topic);
                        }
                    }
                    Op::Reopen | Op::Crash => {
                        if matches!(op, Op::Reopen) {
                            log.as_mut().unwrap().sync().unwrap();
                            log.as_mut().unwrap().save_cursor().unwrap();
                            for v in model.values_mut() { v.1 = true; }
                            acked_synced.extend(std::mem::take(&mut acked_unsynced));
                        }
                        drop(log.take()); // releases the lock, as the process's end would
                        log = Some(Log::open(&d, small()).unwrap());
                        model.retain(|_, v| v.1);
                        // Acks whose cursor never reached the disk come back, as may acks
                        // above the cursor: at least once.
                        delivered.clear();
                        let l = log.as_mut().unwrap();
                        let mut back = Vec::new();
                        loop {
                            let got = l.read(100).unwrap();
                            if got.is_empty() { break; }
                            back.extend(got);
                        }
                        l.rewind();
                        let seqs: Vec<u64> = back.iter().map(|r| r.seq).collect();
                        for seq in model.keys() {
                            prop_assert!(seqs.contains(seq), "durable {seq} lost; read {seqs:?}");
                        }
                        for r in &back {
                            if let std::collections::btree_map::Entry::Vacant(e) = model.entry(r.seq) {
                                prop_assert!(acked_synced.contains(&r.seq) || acked_unsynced.contains(&r.seq),
                                    "{} came back from nowhere", r.seq);
                                e.insert((r.topic.clone(), true));
                            }
                        }
                        acked_unsynced.clear();
                    }
                }
            }
            drop(log);
            let _ = fs::remove_dir_all(&d);
        }
    }
}
