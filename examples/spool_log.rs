//! How fast a pair's spool log takes messages on this disk: 64 B and 4 KiB records appended in
//! groups of 1, 16 and 256 per fdatasync (group commit), then read back and acknowledged.
//! `cargo run --release --example spool_log [dir]` (default: a directory under target/).

use std::time::Instant;

use bytes::Bytes;
use mqbridge::{
    config::Qos,
    spool::{Log, LogOptions, Record},
};

fn main() {
    let base = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/spool-bench"));
    println!("| payload | per fdatasync | appends/s | fdatasyncs/s | read + ack/s |");
    println!("| ---: | ---: | ---: | ---: | ---: |");
    for size in [64usize, 4096] {
        for group in [1usize, 16, 256] {
            let dir = base.join(format!("{size}-{group}"));
            let _ = std::fs::remove_dir_all(&dir);
            let mut log = Log::open(&dir, LogOptions::default()).expect("open");
            let n = if group == 1 { 5_000 } else { 100_000 };
            let payload = Bytes::from(vec![b'x'; size]);
            let started = Instant::now();
            let mut syncs = 0;
            for i in 0..n {
                log.append(Record {
                    seq: 0,
                    stored_at_ms: 0,
                    expires_at_ms: None,
                    qos: Qos::AtLeastOnce,
                    retain: false,
                    topic: format!("factory/line-{}/telemetry", i % 8),
                    properties: None,
                    payload: payload.clone(),
                });
                if (i + 1) % group == 0 {
                    log.sync().expect("sync");
                    syncs += 1;
                }
            }
            log.sync().expect("sync");
            let write = started.elapsed().as_secs_f64();
            let started = Instant::now();
            loop {
                let batch = log.read(1024).expect("read");
                if batch.is_empty() {
                    break;
                }
                for r in batch {
                    log.ack(r.seq).expect("ack");
                }
            }
            log.sync().expect("sync");
            let read = started.elapsed().as_secs_f64();
            println!(
                "| {size} B | {group} | {:.0} | {:.0} | {:.0} |",
                n as f64 / write,
                f64::from(syncs) / write,
                n as f64 / read
            );
            drop(log);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}
