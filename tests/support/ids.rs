//! Numbered payloads (`"{prefix}-{id}"`, optionally `":"` and padding) and the counting behind
//! "every message arrived exactly once" assertions.

use super::client::Received;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

/// The payload `publish_numbered` sends for `id`.
pub fn numbered_payload(prefix: &str, id: u32) -> String {
    format!("{prefix}-{id}")
}

/// `"{prefix}-{id}:"` padded with `x` to `len` bytes (or longer if `len` is too small), for
/// tests about message sizes; `parse_id` reads it back.
pub fn padded_payload(prefix: &str, id: u32, len: usize) -> Bytes {
    let mut payload = format!("{prefix}-{id}:").into_bytes();
    if payload.len() < len {
        payload.resize(len, b'x');
    }
    Bytes::from(payload)
}

/// The largest number that follows `marker` on a line of `text` ("pairs=4", "pairs 4"): the
/// most pairs a log or the demo's output reported.
pub fn largest_after(text: &str, marker: &str) -> Option<u32> {
    text.lines()
        .filter_map(|l| l.split(marker).nth(1)?.split(' ').next()?.parse().ok())
        .max()
}

/// The id in a numbered payload of `prefix`; `None` for any other payload.
pub fn parse_id(payload: &[u8], prefix: &str) -> Option<u32> {
    let rest = payload
        .strip_prefix(prefix.as_bytes())?
        .strip_prefix(b"-")?;
    let digits = match rest.iter().position(|&b| b == b':') {
        Some(end) => &rest[..end],
        None => rest,
    };
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The ids of `prefix` in arrival order (for ordering assertions).
pub fn ids_in_order(received: &[Received], prefix: &str) -> Vec<u32> {
    received
        .iter()
        .filter_map(|r| parse_id(&r.payload, prefix))
        .collect()
}

/// How the numbered messages of one prefix arrived, against the ids that were sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdCount {
    /// Distinct expected ids that arrived.
    pub unique: usize,
    /// Arrivals beyond the first, summed over all ids.
    pub duplicates: usize,
    /// Expected ids that never arrived, ascending.
    pub missing: Vec<u32>,
    /// Ids of this prefix outside the expected range, ascending (each once).
    pub unexpected: Vec<u32>,
}

impl IdCount {
    pub fn exactly_once(&self) -> bool {
        self.duplicates == 0 && self.missing.is_empty() && self.unexpected.is_empty()
    }

    pub fn at_least_once(&self) -> bool {
        self.missing.is_empty() && self.unexpected.is_empty()
    }
}

impl fmt::Display for IdCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} unique, {} duplicates, {} missing {}, {} unexpected {}",
            self.unique,
            self.duplicates,
            self.missing.len(),
            first_few(&self.missing),
            self.unexpected.len(),
            first_few(&self.unexpected),
        )
    }
}

fn first_few(ids: &[u32]) -> String {
    const SHOWN: usize = 20;
    let shown: Vec<String> = ids.iter().take(SHOWN).map(u32::to_string).collect();
    let more = if ids.len() > SHOWN { ", …" } else { "" };
    format!("[{}{more}]", shown.join(", "))
}

/// Counts the numbered messages of `prefix` in `received` against the ids `expected`
/// (`start..start + count` of the publisher). Payloads of other prefixes are ignored.
pub fn count_ids(received: &[Received], prefix: &str, expected: Range<u32>) -> IdCount {
    let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
    for id in ids_in_order(received, prefix) {
        *seen.entry(id).or_default() += 1;
    }
    let mut count = IdCount {
        unique: 0,
        duplicates: 0,
        missing: Vec::new(),
        unexpected: Vec::new(),
    };
    for (&id, &n) in &seen {
        if expected.contains(&id) {
            count.unique += 1;
        } else {
            count.unexpected.push(id);
        }
        count.duplicates += n - 1;
    }
    count.missing = expected.filter(|id| !seen.contains_key(id)).collect();
    count
}

/// Panics with the counts unless every id in `expected` arrived exactly once.
pub fn assert_exactly_once(received: &[Received], prefix: &str, expected: Range<u32>) {
    let count = count_ids(received, prefix, expected.clone());
    assert!(
        count.exactly_once(),
        "{prefix:?} ids {expected:?} not exactly once: {count}"
    );
}

/// Panics with the counts unless every id in `expected` arrived at least once.
pub fn assert_at_least_once(received: &[Received], prefix: &str, expected: Range<u32>) {
    let count = count_ids(received, prefix, expected.clone());
    assert!(
        count.at_least_once(),
        "{prefix:?} ids {expected:?} not at least once: {count}"
    );
}

/// The ids of `prefix` that arrived more than once, with how many times each arrived, ascending.
pub fn duplicate_ids(received: &[Received], prefix: &str) -> Vec<(u32, usize)> {
    let mut seen: BTreeMap<u32, usize> = BTreeMap::new();
    for id in ids_in_order(received, prefix) {
        *seen.entry(id).or_default() += 1;
    }
    seen.into_iter().filter(|&(_, n)| n > 1).collect()
}
