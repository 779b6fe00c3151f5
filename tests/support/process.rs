//! Child-process chores shared by the broker and bridge handles: signals without libc, waiting
//! with a deadline, and the tail of a log for failure reports.

use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// Sends `signal` ("TERM", "INT", "KILL", "STOP", "CONT", …) to `pid` with kill(1).
pub fn signal(pid: u32, signal: &str) {
    // A failure means the process is already gone; callers reap it either way.
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Reaps `child` if it exits within `timeout`.
pub async fn wait_exit(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("cannot wait for pid {}: {e}", child.id()),
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// SIGKILL and reap; a no-op for a process that already exited.
pub fn kill_and_reap(child: &mut Child) -> ExitStatus {
    if let Ok(Some(status)) = child.try_wait() {
        return status;
    }
    let _ = child.kill();
    child
        .wait()
        .unwrap_or_else(|e| panic!("cannot reap pid {}: {e}", child.id()))
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
