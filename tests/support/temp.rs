//! Scratch directories (one per broker, bridge or file, under cargo's `target/tmp`) and ports.
//! Directories are removed when their owner drops normally and kept when a test panics, so the
//! logs of a failed test can still be read.

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);
static NEXT_PORT: AtomicU32 = AtomicU32::new(0);
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// Ports are taken below Linux's ephemeral range (32768..61000): an outgoing connection can then
/// never occupy a broker's port while the broker is down, nor connect to itself on loopback.
const PORT_RANGE: std::ops::Range<u32> = 20_000..32_000;

/// A port on 127.0.0.1 that was free a moment ago and that no other test in this process got.
pub fn free_port() -> u16 {
    let span = PORT_RANGE.end - PORT_RANGE.start;
    // Different test processes start at different places in the range.
    let seed = std::process::id().wrapping_mul(7919)
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut taken = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..span {
        let n = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
        let port = (PORT_RANGE.start + seed.wrapping_add(n) % span) as u16;
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return port;
        }
    }
    panic!("no free port in {PORT_RANGE:?}");
}

/// A fresh directory under `target/tmp/mqbridge-tests`, named after the running test.
pub struct TestDir {
    path: PathBuf,
    keep: bool,
}

impl TestDir {
    pub fn new(kind: &str) -> TestDir {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("mqbridge-tests")
            .join(format!("{}-{kind}-{}-{n}", test_name(), std::process::id()));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        let keep = std::env::var_os("MQBRIDGE_KEEP_TEST_DIRS").is_some();
        TestDir { path, keep }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `contents` to `name` inside the directory and returns the file's path.
    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let file = self.path.join(name);
        std::fs::write(&file, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", file.display()));
        file
    }

    /// Keeps the directory after the drop, for files a test hands to something outliving it.
    pub fn keep(mut self) -> PathBuf {
        self.keep = true;
        self.path.clone()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("test files kept in {}", self.path.display());
        } else if !self.keep {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Writes `contents` to a file called `name` in a new directory of its own (kept after the test,
/// under `target/tmp`), and returns its path. The extension of `name` is kept, so `x.yaml` works.
pub fn write_temp(name: &str, contents: &str) -> PathBuf {
    let dir = TestDir::new("file");
    let file = dir.write(name, contents);
    dir.keep();
    file
}

/// The libtest thread is named after the test; spawned tasks run elsewhere and get "test".
fn test_name() -> String {
    let thread = std::thread::current();
    let name = match thread.name() {
        Some(name) if name != "main" && !name.starts_with("tokio-") => name,
        _ => "test",
    };
    let mut clean: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    clean.truncate(60);
    clean
}
