//! A pair's end of its route's spool thread, for the driver: carries the machine's spool
//! operations (`Event::Spool`) to the thread and its answers back, and converts between the
//! machine's monotonic clock and the wall clock Message Expiry is kept in on disk.

use std::time::Duration;

use super::{machine::SpoolOp, spec::SpoolLink};
use crate::{
    message::Message,
    spool::{Record, Reply, writer::Opened},
};

/// The driver's handle on the pair's log.
pub struct SpoolIo {
    pub link: SpoolLink,
    pair: usize,
    replies: tokio::sync::mpsc::UnboundedReceiver<Reply>,
}

impl SpoolIo {
    pub async fn open(
        link: &Option<SpoolLink>,
        pair: usize,
    ) -> Result<Option<(SpoolIo, Opened)>, String> {
        let Some(link) = link.clone() else {
            return Ok(None);
        };
        let (tx, replies) = tokio::sync::mpsc::unbounded_channel();
        let (s, g) = (link.spool.clone(), link.gauges.clone());
        let opened = tokio::task::spawn_blocking(move || s.open(pair, tx, g))
            .await
            .map_err(|e| e.to_string())??;
        Ok(Some((
            SpoolIo {
                link,
                pair,
                replies,
            },
            opened,
        )))
    }

    pub fn send(&self, op: SpoolOp) {
        let spool = &self.link.spool;
        match op {
            SpoolOp::Append(messages) => {
                let now = std::time::Instant::now();
                let records = messages
                    .into_iter()
                    .map(|(seq, m)| to_record(seq, m, now))
                    .collect();
                spool.append(self.pair, records);
            }
            SpoolOp::Ack(seqs) => spool.ack(self.pair, seqs),
            SpoolOp::Read { from, max } => spool.read(self.pair, from, max),
        }
    }

    pub fn close(self) {
        self.link.spool.close(self.pair);
    }
}

pub async fn spool_reply(spool: &mut Option<SpoolIo>) -> Option<Reply> {
    match spool {
        Some(s) => s.replies.recv().await,
        None => std::future::pending().await,
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Message Expiry goes to disk as a wall-clock deadline: it keeps counting while the process
/// is down.
fn to_record(seq: u64, m: Message, now: std::time::Instant) -> Record {
    let wall = wall_ms();
    Record {
        seq,
        stored_at_ms: wall,
        expires_at_ms: m
            .expires_at
            .map(|at| wall + at.saturating_duration_since(now).as_millis() as u64),
        qos: m.qos,
        retain: m.retain,
        topic: m.topic,
        properties: m.properties,
        payload: m.payload,
    }
}

/// A record read back: its number, its message and how long it has been in the spool.
pub fn from_record(r: Record, now: std::time::Instant) -> (u64, Message, Duration) {
    let wall = wall_ms();
    let age = Duration::from_millis(wall.saturating_sub(r.stored_at_ms));
    let message = Message {
        topic: r.topic,
        payload: r.payload,
        qos: r.qos,
        retain: r.retain,
        properties: r.properties,
        expires_at: r
            .expires_at_ms
            .map(|ms| now + Duration::from_millis(ms.saturating_sub(wall))),
        source_topic: None,
    };
    (r.seq, message, age)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Qos;

    #[test]
    fn message_expiry_goes_to_disk_as_a_deadline_and_comes_back_as_time_left() {
        let now = std::time::Instant::now();
        let m = Message {
            topic: "t".into(),
            payload: bytes::Bytes::from_static(b"p"),
            qos: Qos::AtLeastOnce,
            retain: true,
            properties: None,
            expires_at: Some(now + Duration::from_secs(60)),
            source_topic: None,
        };
        let r = to_record(1, m.clone(), now);
        let left = r.expires_at_ms.unwrap() - wall_ms();
        assert!((59_000..=60_000).contains(&left), "{left}");
        // Read back 10 s later (as after a restart): 10 s less to live.
        let later = now + Duration::from_secs(10);
        let mut r = r;
        r.expires_at_ms = r.expires_at_ms.map(|t| t - 10_000);
        r.stored_at_ms -= 10_000;
        let (_, back, age) = from_record(r, later);
        assert!((10_000..=10_100).contains(&age.as_millis()), "{age:?}");
        let remaining = back.remaining_expiry(later).unwrap();
        assert!((49..=50).contains(&remaining), "{remaining}");
        assert_eq!(
            (back.topic, back.retain, back.qos),
            (m.topic, m.retain, m.qos)
        );
    }
}
