//! The measured comparison behind the spool's storage decision (docs/ARCHITECTURE.md, #15): our
//! segment log against redb on the spool's workload. Per pair the spool is a FIFO queue: append
//! records in groups made durable by one sync each (group commit), read them back in order,
//! delete them from the head once the target acknowledged them. Both stores get the same encoded
//! records (64 B and 4 KiB payloads), groups of 1, 16 and 256 per durable commit, then a drain
//! that reads 1,024 at a time in order and deletes them (deletes are not synced on their own in
//! either: the log moves its cursor, redb commits them without durability, then one durable
//! commit at the end).
//!
//! `cargo run --release --features redb-compare --example spool_vs_redb [dir]`

use std::{path::Path, time::Instant};

use bytes::{Bytes, BytesMut};
use mqbridge::{
    config::Qos,
    spool::{Log, LogOptions, Record},
};
use redb::{Database, Durability, TableDefinition};

const TABLE: TableDefinition<u64, &[u8]> = TableDefinition::new("spool");

fn record(i: u64, payload: &Bytes) -> Record {
    Record {
        seq: 0,
        stored_at_ms: 0,
        expires_at_ms: None,
        qos: Qos::AtLeastOnce,
        retain: false,
        topic: format!("factory/line-{}/telemetry", i % 8),
        properties: None,
        payload: payload.clone(),
    }
}

/// Bytes of every file under `dir`.
fn disk_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|es| {
            es.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

struct Rates {
    appends: f64,
    drain: f64,
    peak_bytes: u64,
}

fn ours(dir: &Path, n: u64, group: u64, payload: &Bytes) -> Rates {
    let _ = std::fs::remove_dir_all(dir);
    let mut log = Log::open(dir, LogOptions::default()).expect("open");
    let started = Instant::now();
    for i in 0..n {
        log.append(record(i, payload));
        if (i + 1) % group == 0 {
            log.sync().expect("sync");
        }
    }
    log.sync().expect("sync");
    let appends = n as f64 / started.elapsed().as_secs_f64();
    let peak_bytes = disk_bytes(dir);
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
    log.save_cursor().expect("cursor");
    let drain = n as f64 / started.elapsed().as_secs_f64();
    drop(log);
    let _ = std::fs::remove_dir_all(dir);
    Rates {
        appends,
        drain,
        peak_bytes,
    }
}

fn redb(dir: &Path, n: u64, group: u64, payload: &Bytes) -> Rates {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).expect("dir");
    let db = Database::create(dir.join("spool.redb")).expect("create");
    let started = Instant::now();
    let mut buf = BytesMut::new();
    let mut i = 0;
    while i < n {
        let mut tx = db.begin_write().expect("begin");
        tx.set_durability(Durability::Immediate);
        {
            let mut table = tx.open_table(TABLE).expect("table");
            for _ in 0..group.min(n - i) {
                buf.clear();
                let mut r = record(i, payload);
                r.seq = i + 1;
                r.encode(&mut buf);
                table.insert(i + 1, &buf[..]).expect("insert");
                i += 1;
            }
        }
        tx.commit().expect("commit");
    }
    let appends = n as f64 / started.elapsed().as_secs_f64();
    let peak_bytes = disk_bytes(dir);
    let started = Instant::now();
    let mut next = 1u64;
    loop {
        let keys: Vec<u64> = {
            let tx = db.begin_read().expect("read");
            let table = tx.open_table(TABLE).expect("table");
            let mut keys = Vec::new();
            for entry in table.range(next..).expect("range").take(1024) {
                let (k, v) = entry.expect("entry");
                std::hint::black_box(v.value().len());
                keys.push(k.value());
            }
            keys
        };
        let Some(&last) = keys.last() else {
            break;
        };
        next = last + 1;
        let mut tx = db.begin_write().expect("begin");
        tx.set_durability(Durability::None);
        {
            let mut table = tx.open_table(TABLE).expect("table");
            for k in keys {
                table.remove(k).expect("remove");
            }
        }
        tx.commit().expect("commit");
    }
    let mut tx = db.begin_write().expect("begin");
    tx.set_durability(Durability::Immediate);
    tx.commit().expect("commit");
    let drain = n as f64 / started.elapsed().as_secs_f64();
    drop(db);
    let _ = std::fs::remove_dir_all(dir);
    Rates {
        appends,
        drain,
        peak_bytes,
    }
}

fn main() {
    let base = std::env::args()
        .nth(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/spool-vs-redb"));
    println!(
        "| payload | per durable commit | log appends/s | redb appends/s | log drain/s | redb drain/s | log peak disk | redb peak disk |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for size in [64usize, 4096] {
        for group in [1u64, 16, 256] {
            let n = match (group, size) {
                (1, _) => 3_000,
                (_, 4096) => 30_000,
                _ => 100_000,
            };
            let payload = Bytes::from(vec![b'x'; size]);
            let a = ours(&base.join("log"), n, group, &payload);
            let b = redb(&base.join("redb"), n, group, &payload);
            let mib = |b: u64| format!("{:.1} MiB", b as f64 / (1 << 20) as f64);
            println!(
                "| {size} B | {group} | {:.0} | {:.0} | {:.0} | {:.0} | {} | {} |",
                a.appends,
                b.appends,
                a.drain,
                b.drain,
                mib(a.peak_bytes),
                mib(b.peak_bytes)
            );
        }
    }
}
