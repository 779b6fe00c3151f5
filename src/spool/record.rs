//! One spooled message on disk, and the scan that reads a segment back: plain data in, data out.
//!
//! A record is `magic | body length | CRC-32 of the body | body`. The body holds the sequence
//! number, when it was stored and when its Message Expiry runs out (wall-clock milliseconds, so
//! the countdown goes on while the process is down), QoS and RETAIN, the topic, the v5 properties
//! and the payload. A scan checks every record's checksum: a torn tail (a crash mid-write) or a
//! damaged record is skipped and counted, and the scan resynchronises on the next magic, so
//! what follows the damage is still read. Nothing here panics on any input.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{config::Qos, message::Properties};

/// Starts every record ("MQS1"): where a scan picks up again after damage.
pub const MAGIC: [u8; 4] = *b"MQS1";
const HEADER: usize = 12;
/// Larger bodies are damage, not records (MQTT's own limit is 256 MiB per packet).
pub const MAX_BODY: usize = 268_435_456 + 65_536;

/// A message as the spool keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Per log, increasing by one per record appended.
    pub seq: u64,
    /// Unix time in milliseconds when it was appended.
    pub stored_at_ms: u64,
    /// Unix time in milliseconds when its Message Expiry runs out.
    pub expires_at_ms: Option<u64>,
    pub qos: Qos,
    pub retain: bool,
    pub topic: String,
    pub properties: Option<Box<Properties>>,
    pub payload: Bytes,
}

impl Record {
    /// Appends the record, framed, to `out`; returns its length on disk.
    pub fn encode(&self, out: &mut BytesMut) -> usize {
        let start = out.len();
        out.put_slice(&MAGIC);
        out.put_u32(0); // length, set below
        out.put_u32(0); // checksum, set below
        let body = out.len();
        out.put_u64(self.seq);
        out.put_u64(self.stored_at_ms);
        out.put_u64(self.expires_at_ms.unwrap_or(0));
        let flags = self.qos as u8
            | (u8::from(self.retain) << 2)
            | (u8::from(self.properties.is_some()) << 3);
        out.put_u8(flags);
        put_str(out, &self.topic);
        if let Some(p) = self.properties.as_deref() {
            out.put_u8(p.payload_format_indicator.map_or(0xff, |v| v.min(0xfe)));
            out.put_u32(
                p.message_expiry_interval
                    .map_or(0, |v| v.saturating_add(1).max(1)),
            );
            put_opt(out, p.content_type.as_ref().map(String::as_bytes));
            put_opt(out, p.response_topic.as_ref().map(String::as_bytes));
            put_opt(out, p.correlation_data.as_deref());
            out.put_u16(p.user_properties.len().min(usize::from(u16::MAX)) as u16);
            for (k, v) in p.user_properties.iter().take(usize::from(u16::MAX)) {
                put_str(out, k);
                put_str(out, v);
            }
        }
        out.put_slice(&self.payload);
        let len = out.len() - body;
        let crc = crc32fast::hash(&out[body..]);
        out[start + 4..start + 8].copy_from_slice(&(len as u32).to_be_bytes());
        out[start + 8..start + 12].copy_from_slice(&crc.to_be_bytes());
        out.len() - start
    }

    /// Decodes one checked body.
    fn decode_body(mut b: Bytes) -> Option<Record> {
        if b.len() < 27 {
            return None;
        }
        let seq = b.get_u64();
        let stored_at_ms = b.get_u64();
        let expires = b.get_u64();
        let flags = b.get_u8();
        let qos = Qos::from_u8(flags & 3)?;
        let topic = get_str(&mut b)?;
        let properties = if flags & 8 != 0 {
            if b.remaining() < 5 {
                return None;
            }
            let pfi = b.get_u8();
            let expiry = b.get_u32();
            let content_type = get_opt_str(&mut b)?;
            let response_topic = get_opt_str(&mut b)?;
            let correlation_data = get_opt(&mut b)?;
            if b.remaining() < 2 {
                return None;
            }
            let n = b.get_u16();
            let mut user_properties = Vec::with_capacity(usize::from(n).min(b.remaining() / 4));
            for _ in 0..n {
                user_properties.push((get_str(&mut b)?, get_str(&mut b)?));
            }
            Some(Box::new(Properties {
                payload_format_indicator: (pfi != 0xff).then_some(pfi),
                message_expiry_interval: expiry.checked_sub(1),
                content_type,
                response_topic,
                correlation_data,
                user_properties,
            }))
        } else {
            None
        };
        Some(Record {
            seq,
            stored_at_ms,
            expires_at_ms: (expires != 0).then_some(expires),
            qos,
            retain: flags & 4 != 0,
            topic,
            properties,
            payload: b,
        })
    }
}

fn put_str(out: &mut BytesMut, s: &str) {
    put_bytes(out, s.as_bytes());
}

fn put_bytes(out: &mut BytesMut, b: &[u8]) {
    // Topics, property strings and user properties are MQTT strings: at most 65,535 bytes.
    let b = &b[..b.len().min(usize::from(u16::MAX))];
    out.put_u16(b.len() as u16);
    out.put_slice(b);
}

fn put_opt(out: &mut BytesMut, b: Option<&[u8]>) {
    match b {
        None => out.put_u8(0),
        Some(b) => {
            out.put_u8(1);
            put_bytes(out, b);
        }
    }
}

fn get_bytes(b: &mut Bytes) -> Option<Bytes> {
    if b.remaining() < 2 {
        return None;
    }
    let n = usize::from(b.get_u16());
    (b.remaining() >= n).then(|| b.split_to(n))
}

fn get_str(b: &mut Bytes) -> Option<String> {
    String::from_utf8(get_bytes(b)?.to_vec()).ok()
}

fn get_opt(b: &mut Bytes) -> Option<Option<Bytes>> {
    if !b.has_remaining() {
        return None;
    }
    match b.get_u8() {
        0 => Some(None),
        1 => get_bytes(b).map(Some),
        _ => None,
    }
}

fn get_opt_str(b: &mut Bytes) -> Option<Option<String>> {
    match get_opt(b)? {
        None => Some(None),
        Some(v) => String::from_utf8(v.to_vec()).ok().map(Some),
    }
}

/// What one scan found besides good records.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Damage {
    /// Records whose frame was complete but whose checksum or contents were wrong.
    pub corrupt: u64,
    /// Bytes skipped to find the next record (damage, or a torn tail).
    pub skipped_bytes: u64,
    /// The segment ended inside a record: a write a crash cut short.
    pub torn_tail: bool,
    /// Sequence numbers found missing between good records (what the damage destroyed).
    pub lost: u64,
}

impl Damage {
    pub fn is_clean(&self) -> bool {
        *self == Damage::default()
    }
}

/// One result of [`scan`]: a good record and where it ended in the input.
#[derive(Debug)]
pub struct Found {
    pub record: Record,
    /// Where the record starts in the input.
    pub start: usize,
    /// Offset just past the record.
    pub end: usize,
}

/// Reads every good record of a segment's bytes, in order, with what was damaged. The offset
/// after the last good record is where appends may go on (a torn tail is cut off there).
pub fn scan(data: &[u8]) -> (Vec<Found>, Damage) {
    let mut found = Vec::new();
    let mut damage = Damage::default();
    let mut at = 0;
    while at < data.len() {
        match frame_at(data, at) {
            Frame::Good(record, end) => {
                found.push(Found {
                    record,
                    start: at,
                    end,
                });
                at = end;
            }
            Frame::Torn => {
                // Only a frame that reaches the end of the data is a torn write; damage in the
                // middle is skipped below like any other.
                damage.torn_tail = true;
                damage.skipped_bytes += (data.len() - at) as u64;
                break;
            }
            Frame::Bad => {
                damage.corrupt += 1;
                let next = find_magic(data, at + 1);
                damage.skipped_bytes += (next - at) as u64;
                at = next;
            }
            Frame::NoMagic => {
                let next = find_magic(data, at + 1);
                damage.skipped_bytes += (next - at) as u64;
                at = next;
            }
        }
    }
    (found, damage)
}

enum Frame {
    Good(Record, usize),
    /// Starts with the magic and runs past the end of the data.
    Torn,
    /// A complete frame that fails its checksum or does not decode.
    Bad,
    NoMagic,
}

fn frame_at(data: &[u8], at: usize) -> Frame {
    let rest = &data[at..];
    if rest.len() < 4 {
        return if MAGIC.starts_with(rest) {
            Frame::Torn
        } else {
            Frame::NoMagic
        };
    }
    if rest[..4] != MAGIC {
        return Frame::NoMagic;
    }
    if rest.len() < HEADER {
        return Frame::Torn;
    }
    let len = u32::from_be_bytes([rest[4], rest[5], rest[6], rest[7]]) as usize;
    let crc = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]);
    if len > MAX_BODY {
        return Frame::Bad;
    }
    if rest.len() < HEADER + len {
        // A damaged length can also point past the end: only call it torn when no further
        // record starts inside the claimed span.
        return if find_magic(data, at + 1) == data.len() {
            Frame::Torn
        } else {
            Frame::Bad
        };
    }
    let body = &rest[HEADER..HEADER + len];
    if crc32fast::hash(body) != crc {
        return Frame::Bad;
    }
    match Record::decode_body(Bytes::copy_from_slice(body)) {
        Some(r) => Frame::Good(r, at + HEADER + len),
        None => Frame::Bad,
    }
}

fn find_magic(data: &[u8], from: usize) -> usize {
    if from >= data.len() {
        return data.len();
    }
    data[from..]
        .windows(4)
        .position(|w| w == MAGIC)
        .map_or(data.len(), |p| from + p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn record(seq: u64, payload: &[u8]) -> Record {
        Record {
            seq,
            stored_at_ms: 1_700_000_000_000 + seq,
            expires_at_ms: seq.is_multiple_of(2).then_some(1_800_000_000_000),
            qos: Qos::from_u8((seq % 3) as u8).unwrap(),
            retain: seq.is_multiple_of(5),
            topic: format!("t/{seq}"),
            properties: (seq % 2 == 1).then(|| {
                Box::new(Properties {
                    payload_format_indicator: Some(1),
                    message_expiry_interval: Some(60),
                    content_type: Some("text/plain".into()),
                    response_topic: None,
                    correlation_data: Some(Bytes::from_static(b"c")),
                    user_properties: vec![("k".into(), "v".into()), ("k".into(), "w".into())],
                })
            }),
            payload: Bytes::copy_from_slice(payload),
        }
    }

    fn encoded(records: &[Record]) -> BytesMut {
        let mut out = BytesMut::new();
        for r in records {
            r.encode(&mut out);
        }
        out
    }

    #[test]
    fn records_read_back_as_written() {
        let records: Vec<Record> = (1..=6).map(|i| record(i, b"payload")).collect();
        let data = encoded(&records);
        let (found, damage) = scan(&data);
        assert!(damage.is_clean(), "{damage:?}");
        let back: Vec<Record> = found.into_iter().map(|f| f.record).collect();
        assert_eq!(back, records);
    }

    #[test]
    fn a_torn_tail_is_cut_and_said() {
        let records: Vec<Record> = (1..=3).map(|i| record(i, b"payload")).collect();
        let data = encoded(&records);
        let cut = data.len() - 5;
        let (found, damage) = scan(&data[..cut]);
        assert_eq!(found.len(), 2);
        assert!(damage.torn_tail);
        assert_eq!(damage.corrupt, 0);
        assert_eq!(found[1].end + damage.skipped_bytes as usize, cut);
    }

    #[test]
    fn a_damaged_record_is_skipped_and_the_rest_is_read() {
        let records: Vec<Record> = (1..=3).map(|i| record(i, b"payload")).collect();
        let mut data = encoded(&records);
        let second = records[0].encode(&mut BytesMut::new());
        data[second + 20] ^= 0x55; // inside the second record's body
        let (found, damage) = scan(&data);
        let seqs: Vec<u64> = found.iter().map(|f| f.record.seq).collect();
        assert_eq!(seqs, [1, 3]);
        assert_eq!(damage.corrupt, 1);
        assert!(!damage.torn_tail);
    }

    #[test]
    fn a_damaged_length_does_not_hide_later_records() {
        let records: Vec<Record> = (1..=3).map(|i| record(i, b"payload")).collect();
        let mut data = encoded(&records);
        data[5] = 0x7f; // the first record claims a body far past the end
        let (found, damage) = scan(&data);
        let seqs: Vec<u64> = found.iter().map(|f| f.record.seq).collect();
        assert_eq!(seqs, [2, 3]);
        assert!(!damage.torn_tail);
    }

    /// The fuzz seed, written by hand from the format described above (Python, zlib's CRC-32):
    /// the format is what the docs say, and the seeds are valid.
    #[test]
    fn a_segment_written_from_the_format_description_reads() {
        let data = include_bytes!("../../fuzz/seeds/spool_scan/segment");
        let (found, damage) = scan(data);
        assert!(damage.is_clean(), "{damage:?}");
        assert_eq!(found.len(), 7);
        let r = &found[0].record;
        assert_eq!(
            (r.seq, r.topic.as_str(), &r.payload[..]),
            (1, "t/1", &b"payload-1"[..])
        );
        let p = r
            .properties
            .as_deref()
            .expect("odd records carry properties");
        assert_eq!(p.message_expiry_interval, Some(60));
        assert_eq!(p.user_properties, [("k".to_string(), "v".to_string())]);
        assert_eq!(found[1].record.expires_at_ms, Some(1_800_000_000_000));
    }

    proptest! {
        /// Whatever the bytes, a scan returns without panicking, and every record it returns
        /// passed its checksum.
        #[test]
        fn any_bytes_scan_without_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let (found, _) = scan(&data);
            for f in found {
                prop_assert!(f.end <= data.len());
            }
        }

        /// Truncated at any byte: every record wholly before the cut is read, nothing after it.
        #[test]
        fn truncation_at_any_byte_loses_only_the_cut_record(n in 1u64..8, cut_at in any::<prop::sample::Index>()) {
            let records: Vec<Record> = (1..=n).map(|i| record(i, &vec![b'x'; i as usize * 7])).collect();
            let data = encoded(&records);
            let cut = cut_at.index(data.len() + 1);
            let (found, damage) = scan(&data[..cut]);
            let whole = {
                let mut end = 0;
                records.iter().take_while(|r| { end += r.encode(&mut BytesMut::new()); end <= cut }).count()
            };
            prop_assert_eq!(found.len(), whole);
            prop_assert_eq!(damage.corrupt, 0);
            for (f, r) in found.iter().zip(&records) {
                prop_assert_eq!(&f.record, r);
            }
        }

        /// Any one byte flipped: at most the record holding it is lost.
        #[test]
        fn a_flipped_byte_loses_at_most_its_record(n in 2u64..8, at in any::<prop::sample::Index>(), bits in 1u8..=255) {
            let records: Vec<Record> = (1..=n).map(|i| record(i, b"some payload")).collect();
            let mut data = encoded(&records);
            let i = at.index(data.len());
            data[i] ^= bits;
            let (found, _) = scan(&data);
            prop_assert!(found.len() + 1 >= records.len(), "{} of {}", found.len(), records.len());
            for f in &found {
                prop_assert_eq!(&f.record, &records[(f.record.seq - 1) as usize]);
            }
        }
    }
}
