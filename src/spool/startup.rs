//! What a start checks before any pair runs: every spool it will use can be locked (two
//! processes never share one), and no spool that still holds messages is left without an owner
//! (a route renamed or removed, or `spool = false`): those messages were acknowledged to their
//! source, so the process refuses to start rather than orphan them. A pool made smaller is no
//! orphan: the route retires the indexes past it with their spools (forwarded first).

use std::path::Path;

use super::{Log, LogOptions};
use crate::config::Plan;

/// Checks `plan`'s spools; the error names the directory and what to do.
pub fn check(plan: &Plan) -> Result<(), String> {
    let Some(base) = plan.spool_dir.as_deref() else {
        return Ok(());
    };
    let Ok(entries) = std::fs::read_dir(base) else {
        return Ok(()); // nothing spooled yet
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let name = entry.file_name().to_string_lossy().into_owned();
        let route = plan
            .routes
            .iter()
            .find(|r| r.name == name && r.spool.is_some());
        for pair in pair_dirs(&path) {
            let index = pair_index(&pair);
            // An index past the pool is retired with its spool: its backlog is forwarded
            // before it ends (route.rs `sweep`).
            let owned = route.is_some() && index.is_some();
            if owned {
                // Ours to run: only proven free of another process.
                Log::check_free(&pair).map_err(|e| e.to_string())?;
                continue;
            }
            let held = held(&pair)?;
            if held > 0 {
                let why = match route {
                    None => {
                        format!("no route named \"{name}\" with spool = true in this configuration")
                    }
                    Some(_) => format!("\"{}\" is not a pair's directory", pair.display()),
                };
                return Err(format!(
                    "the spool in {} holds {held} messages acknowledged to their source, but {why}; \
                     start once with the configuration that wrote it (the route, spool = true) \
                     until it has drained (mqbridge_spool_messages 0), or move the \
                     directory away if those messages are not wanted",
                    pair.display()
                ));
            }
        }
    }
    Ok(())
}

/// The pool index a pair's directory is named by (`None`: not a pair's directory).
pub fn pair_index(pair_dir: &Path) -> Option<usize> {
    pair_dir.file_name()?.to_str()?.parse().ok()
}

/// The directories in a route's spool directory (one per pair index it ever ran).
pub fn pair_dirs(route_dir: &Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(route_dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir())
                .collect()
        })
        .unwrap_or_default()
}

/// Messages `dir`'s log holds (opening it proves no other process has it).
fn held(dir: &Path) -> Result<u64, String> {
    let mut log = Log::open(dir, LogOptions::default()).map_err(|e| e.to_string())?;
    // Count what a reader would see: damaged records do not count.
    let mut n = 0;
    loop {
        let batch = log.read(4096).map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Ok(n);
        }
        n += batch.len() as u64;
    }
}
