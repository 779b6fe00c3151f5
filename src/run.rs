//! `mqbridge run`: starts every route from a validated plan, serves the admin endpoint when
//! `[admin]` is set, logs a summary line per interval, and on SIGINT/SIGTERM drains in-flight
//! messages before exiting.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{signal::unix::SignalKind, sync::watch};
use tracing::info;

use crate::{admin, config::Plan, link, loops::EchoDigest, route};

/// Runs until a termination signal, then drains. Returns when every pair has stopped.
pub async fn run(plan: Plan) -> anyhow::Result<()> {
    let epoch = Instant::now();
    // Bound before any route starts: a taken port is an error before any broker is touched.
    let admin_listener = match plan.admin_listen {
        Some(addr) => Some((addr, admin::bind(addr).await?)),
        None => None,
    };
    // TLS settings are built once, before any connection: an unusable certificate or key file
    // stops the start, and insecure_skip_verify is warned about here, once per broker.
    link::prepare(plan.brokers.values().map(|b| b.as_ref()))?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let digest = Arc::new(Mutex::new(EchoDigest::new(
        plan.bridge.loop_digest_window,
        plan.bridge.loop_digest_capacity,
    )));
    let routes: Vec<_> = plan
        .routes
        .iter()
        .map(|r| route::start(&plan, r, &digest, &stop_rx, epoch))
        .collect();
    info!(bridge = %plan.bridge.name, instance = %plan.bridge.instance, routes = routes.len(), pairs = routes.iter().map(|r| r.pairs.len()).sum::<usize>(), "mqbridge running");
    // Kept serving through the drain, so probes see the pairs go down rather than a refusal.
    let admin_task = admin_listener.map(|(addr, listener)| {
        let stats = routes.iter().map(admin::RouteStats::of).collect();
        let state = admin::Admin::new(stats, epoch, plan.bridge.stall_timeout);
        info!(listen = %addr, "admin endpoint: /metrics, /healthz, /readyz");
        admin::spawn(listener, Arc::new(state))
    });

    let mut term = tokio::signal::unix::signal(SignalKind::terminate())?;
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt())?;
    let mut summary = tokio::time::interval(plan.bridge.summary_interval);
    summary.tick().await;
    let mut last: Vec<(u64, u64)> = vec![(0, 0); routes.len()];
    let mut last_at = Instant::now();
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = summary.tick() => {
                let secs = last_at.elapsed().as_secs_f64().max(1e-3);
                last_at = Instant::now();
                for (r, prev) in routes.iter().zip(last.iter_mut()) {
                    let t = r.totals();
                    info!(
                        route = %r.plan.name,
                        received_per_s = format!("{:.0}", (t.received - prev.0) as f64 / secs),
                        forwarded_per_s = format!("{:.0}", (t.forwarded - prev.1) as f64 / secs),
                        received = t.received,
                        forwarded = t.forwarded,
                        dropped = t.dropped,
                        in_flight = t.in_flight,
                        in_flight_max = t.in_flight_max,
                        window = t.window,
                        pairs_ready = t.pairs_ready,
                        pairs = r.pairs.len(),
                        reconnects = t.reconnects,
                        "summary"
                    );
                    *prev = (t.received, t.forwarded);
                }
            }
        }
    }
    info!(drain_timeout = ?plan.bridge.drain_timeout, "stopping: draining in-flight messages");
    let _ = stop_tx.send(true);
    let limit = plan.bridge.drain_timeout + Duration::from_secs(3);
    let mut routes = routes;
    for r in &mut routes {
        r.join(limit).await;
    }
    for r in &routes {
        let t = r.totals();
        info!(route = %r.plan.name, received = t.received, forwarded = t.forwarded, dropped = t.dropped, loops = t.loops, in_flight = t.in_flight, in_flight_max = t.in_flight_max, window = t.window, "final");
    }
    if let Some(task) = admin_task {
        task.abort();
    }
    info!("stopped");
    Ok(())
}
