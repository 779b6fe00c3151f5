//! A spool segment's bytes as a crash, a full disk or a bad sector may leave them: the scan
//! must never panic, every record it returns must lie inside the input and re-encode to exactly
//! the bytes it was read from (the checksum let nothing else through), and opening a log
//! directory holding those bytes as its only segment must read the same records back.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqbridge::spool::{Log, LogOptions, record};

fuzz_target!(|data: &[u8]| {
    let (found, damage) = record::scan(data);
    let mut last_end = 0;
    for f in &found {
        assert!(f.start >= last_end && f.end <= data.len() && f.start < f.end);
        last_end = f.end;
        let mut again = BytesMut::new();
        f.record.encode(&mut again);
        assert_eq!(&again[..], &data[f.start..f.end], "a record that does not re-encode");
    }
    assert!(damage.skipped_bytes as usize <= data.len());

    // Through the log: the bytes as segment 1 of a directory of their own.
    let dir = std::env::temp_dir().join(format!("mqbridge-fuzz-spool-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{:020}.seg", 1)), data).unwrap();
    if let Ok(mut log) = Log::open(&dir, LogOptions::default()) {
        let mut n = 0;
        while let Ok(batch) = log.read(64) {
            if batch.is_empty() {
                break;
            }
            n += batch.len();
            for r in batch {
                let _ = log.ack(r.seq);
            }
        }
        // Records with sequence numbers below 1 or repeated are not read twice.
        assert!(n <= found.len(), "{n} read from {} found", found.len());
    }
    let _ = std::fs::remove_dir_all(&dir);
});
