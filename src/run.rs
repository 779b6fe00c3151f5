//! `mqbridge run`: starts every route from a validated plan, serves the admin endpoint when
//! `[admin]` is set, logs a summary line per interval, applies a changed config file on SIGHUP
//! (route by route, see `reload`), and on SIGINT/SIGTERM drains in-flight messages before
//! exiting.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Instant,
};

use tokio::signal::unix::{Signal, SignalKind};
use tracing::{error, info};

use crate::{admin, config::Plan, link, loops::EchoDigest, route_set::Routes};

/// The runtime `run` is driven on: `bridge.worker_threads` = 1 (the default) is a
/// single-threaded runtime, more a multi-threaded one with that many workers. Pairs that share
/// one thread cost less CPU per message than pairs spread over cores (no task migration, no
/// cross-core wake-ups; measurements in docs/ARCHITECTURE.md).
pub fn runtime(worker_threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    if worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(worker_threads)
            .enable_all()
            .build()
    }
}

/// Runs `plan`, read from the file at `path`, until a termination signal, then drains. SIGHUP
/// reads `path` again and applies what changed. Returns when every pair has stopped.
pub async fn run(path: &Path, plan: Plan) -> anyhow::Result<()> {
    // Installed before anything else: SIGHUP's default action ends the process.
    let hangups = tokio::signal::unix::signal(SignalKind::hangup())?;
    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let signalled = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    let reloads = Reloads {
        path: path.to_owned(),
        hangups,
    };
    serve(plan, signalled, Some(reloads)).await
}

/// As [`run`], but stops (and drains) when `shutdown` completes instead of on a signal, and
/// never reloads: for `mqbridge demo` and for embedding the bridge in other programs.
pub async fn run_until(plan: Plan, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    serve(plan, shutdown, None).await
}

/// Where reloads come from: SIGHUP, for the file the plan was read from.
struct Reloads {
    path: PathBuf,
    hangups: Signal,
}

impl Reloads {
    /// The next SIGHUP; never, without reloads.
    async fn next(reloads: &mut Option<Reloads>) {
        if let Some(r) = reloads
            && r.hangups.recv().await.is_some()
        {
            return;
        }
        std::future::pending().await
    }
}

async fn serve(
    plan: Plan,
    shutdown: impl Future<Output = ()>,
    mut reloads: Option<Reloads>,
) -> anyhow::Result<()> {
    let epoch = Instant::now();
    // Bound before any route starts: a taken port is an error before any broker is touched.
    let admin_listener = match plan.admin_listen {
        Some(addr) => Some((addr, admin::bind(addr).await?)),
        None => None,
    };
    // TLS settings are built once, before any connection: an unusable certificate or key file
    // stops the start, and insecure_skip_verify is warned about here, once per broker.
    link::prepare(plan.brokers.values().map(|b| b.as_ref()))?;
    // One digest for the life of the process: routes started by a reload share it with the
    // routes that kept running, so echoes of messages forwarded before the reload are still cut.
    let digest = Arc::new(Mutex::new(EchoDigest::new(
        plan.bridge.loop_digest_window,
        plan.bridge.loop_digest_capacity,
    )));
    let bridge = plan.bridge.clone();
    let mut routes = Routes::start(plan, digest, epoch);
    info!(bridge = %bridge.name, instance = %bridge.instance, routes = routes.running(), pairs = routes.pairs(), "mqbridge running");
    // The endpoint reads the route set at scrape time; a reload replaces it whole.
    let admin_routes = admin::RouteSet::new(routes.stats());
    // Kept serving through the drain, so probes see the pairs go down rather than a refusal.
    let admin_task = admin_listener.map(|(addr, listener)| {
        let state = admin::Admin::new(admin_routes.clone(), epoch, bridge.stall_timeout)
            .named(&bridge.name, &bridge.instance);
        info!(listen = %addr, "admin endpoint: /metrics, /healthz, /readyz, /status");
        admin::spawn(listener, Arc::new(state))
    });

    tokio::pin!(shutdown);
    let mut summary = tokio::time::interval(bridge.summary_interval);
    summary.tick().await;
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = summary.tick() => {
                let secs = last_at.elapsed().as_secs_f64().max(1e-3);
                last_at = Instant::now();
                routes.log_summary(secs);
            }
            () = Reloads::next(&mut reloads) => {
                let Some(path) = reloads.as_ref().map(|r| r.path.clone()) else { continue };
                info!(config = %path.display(), "SIGHUP: reloading the configuration");
                match routes.reload(&path).await {
                    Ok(applied) => info!(
                        added = ?applied.added,
                        removed = ?applied.removed,
                        changed = ?applied.changed,
                        unchanged = ?applied.unchanged,
                        routes = routes.plan().routes.len(),
                        "configuration reloaded"
                    ),
                    // The same words as `mqbridge check` prints for this file.
                    Err(e) => error!(
                        config = %path.display(),
                        "configuration reload rejected, the running configuration stays: {e}"
                    ),
                }
                admin_routes.replace(routes.stats());
            }
            done = routes.next_drained(), if routes.draining() => {
                routes.drained(done);
                admin_routes.replace(routes.stats());
            }
        }
    }
    info!(drain_timeout = ?routes.plan().bridge.drain_timeout, "stopping: draining in-flight messages");
    routes.shutdown().await;
    if let Some(task) = admin_task {
        task.abort();
    }
    info!("stopped");
    Ok(())
}
