//! The admin HTTP endpoint (`[admin] listen`): `/metrics` (Prometheus text), `/healthz` (the
//! process runs), `/readyz` (every pair connected, subscribed and not stalled) and `/status`
//! (routes and pairs as JSON, what `mqbridge top` shows). A small
//! hyper server on the bridge's runtime; it only reads the pairs' atomics, never blocks them.
//! The set of routes it reports is a [`RouteSet`], replaced whole when a reload changes routes.

pub mod health;
pub mod metrics;
pub mod status;

use std::{
    collections::HashMap,
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::Incoming,
    header::{self, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, warn};

use self::{
    health::{BusySince, PairHealth, PairId, Readiness},
    metrics::Metrics,
    status::{PairStatus, RouteStatus, SpoolStatus, Status},
};
use crate::{pair::stats::PairStats, route::RunningRoute};

/// A route as the endpoint sees it: names for labels and messages, and its pairs' stats.
#[derive(Debug, Clone)]
pub struct RouteStats {
    pub name: String,
    pub source_broker: String,
    pub target_broker: String,
    pub pairs: Vec<Arc<PairStats>>,
    /// Per pair, with a spool (else empty).
    pub spool: Vec<Arc<crate::spool::LogGauges>>,
}

impl RouteStats {
    pub fn of(route: &RunningRoute) -> RouteStats {
        RouteStats {
            name: route.plan.name.clone(),
            source_broker: route.plan.from.name.clone(),
            target_broker: route.plan.to.name.clone(),
            pairs: route.pairs.clone(),
            spool: route.spool.clone(),
        }
    }
}

/// The routes the endpoint reports, shared with `run`, which replaces the whole list when a
/// reload starts or stops routes. Requests and the stall sampler take a snapshot (one `Arc`
/// clone under a read lock); the pairs never touch it, so the message path never waits on it.
#[derive(Debug, Clone, Default)]
pub struct RouteSet(Arc<RwLock<Arc<[RouteStats]>>>);

impl RouteSet {
    pub fn new(routes: Vec<RouteStats>) -> RouteSet {
        RouteSet(Arc::new(RwLock::new(routes.into())))
    }

    /// Puts `routes` in place of the current list.
    pub fn replace(&self, routes: Vec<RouteStats>) {
        // A panic elsewhere cannot leave a half-written list: the value is swapped whole.
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = routes.into();
    }

    /// The list as of now; later replacements do not change it.
    pub fn snapshot(&self) -> Arc<[RouteStats]> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// What the endpoint serves from.
#[derive(Debug)]
pub struct Admin {
    /// `bridge.name` and `bridge.instance`, for `/status`.
    bridge: String,
    instance: String,
    routes: RouteSet,
    metrics: Metrics,
    /// Process start: the zero of `PairStats::last_progress_ms`.
    epoch: Instant,
    stall_timeout: Duration,
    /// One per pair of the routes last sampled, with the pair it belongs to: pairs come and go
    /// with reloads, so they are matched by identity rather than by position. Only the admin
    /// task and its requests touch it.
    busy: Mutex<Vec<(Arc<PairStats>, BusySince)>>,
}

/// An answer: status, content type, body.
type Answer = (StatusCode, &'static str, String);

const TEXT: &str = "text/plain; charset=utf-8";

impl Admin {
    pub fn new(routes: RouteSet, epoch: Instant, stall_timeout: Duration) -> Admin {
        Admin {
            bridge: String::new(),
            instance: String::new(),
            metrics: Metrics::new(routes.clone()),
            routes,
            epoch,
            stall_timeout,
            busy: Mutex::new(Vec::new()),
        }
    }

    /// The bridge's name and instance, as `/status` reports them.
    pub fn named(mut self, bridge: &str, instance: &str) -> Admin {
        self.bridge = bridge.to_owned();
        self.instance = instance.to_owned();
        self
    }

    /// How often the pairs' in-flight counts are sampled for stall detection: often enough that
    /// a stall is reported within a small part of `stall_timeout`.
    fn sample_every(&self) -> Duration {
        (self.stall_timeout / 10).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Reads every pair of `routes` once, noting when its in-flight count rose from zero.
    fn sample(&self, routes: &[RouteStats]) -> Vec<PairHealth> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.now_ms();
        // A panic while holding this lock cannot leave the counts inconsistent: take it anyway.
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        // Keyed by address while `busy` still holds every old pair, so no address is reused.
        let before: HashMap<*const PairStats, BusySince> =
            busy.iter().map(|(p, b)| (Arc::as_ptr(p), *b)).collect();
        let mut now_busy = Vec::with_capacity(before.len());
        let healths = routes
            .iter()
            .flat_map(|r| {
                r.pairs
                    .iter()
                    .enumerate()
                    .map(|(i, p)| (p, r.spool.get(i).map(|g| g.full.load(Relaxed))))
            })
            .map(|(p, spool_full)| {
                let mut since = before.get(&Arc::as_ptr(p)).copied().unwrap_or_default();
                let in_flight = PairStats::get(&p.in_flight);
                since.observe(in_flight, now);
                now_busy.push((p.clone(), since));
                PairHealth {
                    source_up: p.source_up.load(Relaxed),
                    target_up: p.target_up.load(Relaxed),
                    subscribed: p.subscribed.load(Relaxed),
                    parked: p.parked.load(Relaxed),
                    in_flight,
                    waiting_since_ms: since.waiting_since(PairStats::get(&p.last_progress_ms)),
                    spool_full,
                }
            })
            .collect();
        *busy = now_busy;
        healths
    }

    pub fn readiness(&self) -> Readiness {
        let routes = self.routes.snapshot();
        let healths = self.sample(&routes);
        let ids = routes.iter().flat_map(|r| {
            (0..r.pairs.len()).map(|index| PairId {
                route: &r.name,
                index,
                source_broker: &r.source_broker,
                target_broker: &r.target_broker,
            })
        });
        health::readiness(ids.zip(healths), self.now_ms(), self.stall_timeout)
    }

    /// The `/status` answer as of now: each pair read once (with the stall sampling `/readyz`
    /// does), each route's totals summed from its pair rows.
    pub fn status(&self) -> Status {
        use std::sync::atomic::Ordering::Relaxed;
        let routes = self.routes.snapshot();
        let mut healths = self.sample(&routes).into_iter();
        let now = self.now_ms();
        let stall_ms = u64::try_from(self.stall_timeout.as_millis()).unwrap_or(u64::MAX);
        let unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let g = PairStats::get;
        let routes = routes
            .iter()
            .map(|r| {
                let pairs = r
                    .pairs
                    .iter()
                    .enumerate()
                    .map(|(index, p)| {
                        let health = healths.next().unwrap_or_default();
                        let spool = r.spool.get(index).map(|s| {
                            let oldest = s.oldest_ms.load(Relaxed);
                            SpoolStatus {
                                messages: s.messages.load(Relaxed),
                                bytes: s.bytes.load(Relaxed),
                                full: s.full.load(Relaxed),
                                oldest_age_s: (oldest > 0)
                                    .then(|| unix_ms.saturating_sub(oldest) / 1000),
                            }
                        });
                        let last = g(&p.last_progress_ms);
                        PairStatus {
                            index,
                            state: status::pair_state(&health, now, stall_ms).to_owned(),
                            source_up: health.source_up,
                            target_up: health.target_up,
                            subscribed: health.subscribed,
                            received: g(&p.received),
                            forwarded: g(&p.forwarded),
                            bytes_forwarded: g(&p.bytes_forwarded),
                            dropped: p
                                .drops()
                                .iter()
                                .map(|(reason, n)| ((*reason).to_owned(), *n))
                                .collect(),
                            in_flight: health.in_flight,
                            window: g(&p.window),
                            reconnects: g(&p.source_reconnects) + g(&p.target_reconnects),
                            // 0 is the value before any progress.
                            last_progress_age_ms: (last > 0).then(|| now.saturating_sub(last)),
                            spool,
                        }
                    })
                    .collect();
                let ready = r.pairs.iter().filter(|p| p.ready()).count() as u64;
                RouteStatus::from_pairs(&r.name, &r.source_broker, &r.target_broker, ready, pairs)
            })
            .collect();
        Status {
            bridge: self.bridge.clone(),
            instance: self.instance.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            uptime_s: self.epoch.elapsed().as_secs(),
            routes,
        }
    }

    /// The answer to `method path`, without any I/O.
    pub fn answer(&self, method: &Method, path: &str) -> Answer {
        if method != Method::GET && method != Method::HEAD {
            return (
                StatusCode::METHOD_NOT_ALLOWED,
                TEXT,
                "only GET and HEAD\n".into(),
            );
        }
        match path {
            "/metrics" => (StatusCode::OK, metrics::CONTENT_TYPE, self.metrics.render()),
            "/healthz" => (StatusCode::OK, TEXT, "ok\n".into()),
            "/status" => match serde_json::to_string(&self.status()) {
                Ok(json) => (StatusCode::OK, status::CONTENT_TYPE, json + "\n"),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    TEXT,
                    format!("cannot encode the status: {e}\n"),
                ),
            },
            "/readyz" => {
                let r = self.readiness();
                let status = if r.is_ready() {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                (status, TEXT, r.to_string())
            }
            _ => (
                StatusCode::NOT_FOUND,
                TEXT,
                "not found; try /metrics, /healthz, /readyz or /status\n".into(),
            ),
        }
    }
}

/// Binds `admin.listen`. Done before any route starts, so a taken port stops the bridge before
/// it touches a broker.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "admin.listen: cannot listen on {addr}: {e}; free the port or set another admin.listen"
        )
    })
}

/// Serves the endpoint on `listener` and samples the pairs for stall detection, until aborted.
pub fn spawn(listener: TcpListener, admin: Arc<Admin>) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(admin.sample_every());
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    admin.sample(&admin.routes.snapshot());
                }
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        tokio::spawn(serve_connection(stream, peer, admin.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: wait rather than spin.
                        warn!("admin endpoint: accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    })
}

async fn serve_connection(stream: tokio::net::TcpStream, peer: SocketAddr, admin: Arc<Admin>) {
    let service = service_fn(move |req: Request<Incoming>| {
        let (status, content_type, body) = admin.answer(req.method(), req.uri().path());
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        async move { Ok::<_, Infallible>(response) }
    });
    // A client that never finishes its headers must not hold a connection open forever.
    let result = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(stream), service)
        .await;
    if let Err(e) = result {
        debug!(%peer, "admin endpoint: connection ended: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    fn admin(pairs: usize) -> Admin {
        let route = RouteStats {
            name: "up".into(),
            source_broker: "edge".into(),
            target_broker: "cloud".into(),
            pairs: (0..pairs).map(|_| Arc::new(PairStats::default())).collect(),
            spool: Vec::new(),
        };
        Admin::new(
            RouteSet::new(vec![route]),
            Instant::now(),
            Duration::from_secs(30),
        )
    }

    fn connect(p: &PairStats) {
        p.source_up.store(true, Relaxed);
        p.target_up.store(true, Relaxed);
        p.subscribed.store(true, Relaxed);
    }

    #[test]
    fn healthz_answers_while_nothing_is_connected() {
        let a = admin(1);
        assert_eq!(a.answer(&Method::GET, "/healthz").0, StatusCode::OK);
    }

    #[test]
    fn readyz_waits_for_every_pair() {
        let a = admin(2);
        let pairs = a.routes.snapshot()[0].pairs.clone();
        connect(&pairs[0]);
        let (status, _, body) = a.answer(&Method::GET, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            body.contains("route up pair 1: source down (broker edge); target down (broker cloud)"),
            "{body}"
        );
        connect(&pairs[1]);
        assert_eq!(a.answer(&Method::GET, "/readyz").0, StatusCode::OK);
    }

    #[test]
    fn readyz_does_not_call_a_fresh_message_stalled_after_an_idle_spell() {
        // Last progress at 0 ms and the process is older than stall_timeout: a message that
        // arrives now has only just started waiting.
        let route = RouteStats {
            name: "up".into(),
            source_broker: "edge".into(),
            target_broker: "cloud".into(),
            spool: Vec::new(),
            pairs: vec![Arc::new(PairStats::default())],
        };
        let long_ago = Instant::now() - Duration::from_secs(120);
        let a = Admin::new(
            RouteSet::new(vec![route]),
            long_ago,
            Duration::from_secs(30),
        );
        let pair = a.routes.snapshot()[0].pairs[0].clone();
        connect(&pair);
        PairStats::set(&pair.in_flight, 1);
        assert_eq!(a.answer(&Method::GET, "/readyz").0, StatusCode::OK);
    }

    #[test]
    fn metrics_are_prometheus_text() {
        let a = admin(1);
        let (status, content_type, body) = a.answer(&Method::GET, "/metrics");
        assert_eq!(status, StatusCode::OK);
        assert!(content_type.starts_with("text/plain; version=0.0.4"));
        assert!(body.contains("mqbridge_messages_forwarded_total{route=\"up\"} 0"));
    }

    #[test]
    fn a_replaced_route_set_is_what_the_next_answer_reports() {
        let stats = |name: &str| RouteStats {
            name: name.into(),
            source_broker: "edge".into(),
            target_broker: "cloud".into(),
            spool: Vec::new(),
            pairs: vec![Arc::new(PairStats::default())],
        };
        let (up, added) = (stats("up"), stats("added"));
        connect(&up.pairs[0]);
        let set = RouteSet::new(vec![up.clone()]);
        let a = Admin::new(set.clone(), Instant::now(), Duration::from_secs(30));
        assert_eq!(a.answer(&Method::GET, "/readyz").0, StatusCode::OK);

        // A reload added a route whose pair is still connecting, and removed none.
        set.replace(vec![up.clone(), added.clone()]);
        let (status, _, body) = a.answer(&Method::GET, "/readyz");
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("route added pair 0"), "{body}");
        let metrics = a.answer(&Method::GET, "/metrics").2;
        assert!(
            metrics.contains(r#"mqbridge_pairs{route="added"} 1"#),
            "{metrics}"
        );

        // Then removed `up`: gone from both answers.
        connect(&added.pairs[0]);
        set.replace(vec![added]);
        assert_eq!(a.answer(&Method::GET, "/readyz").0, StatusCode::OK);
        assert!(
            !a.answer(&Method::GET, "/metrics")
                .2
                .contains(r#"route="up""#)
        );
    }

    #[test]
    fn status_is_json_with_each_route_summed_and_each_pair_listed() {
        let a = admin(2).named("edge-1", "pod-0");
        let pairs = a.routes.snapshot()[0].pairs.clone();
        connect(&pairs[0]);
        for (p, n) in pairs.iter().zip([10, 5]) {
            PairStats::set(&p.received, n);
            PairStats::set(&p.forwarded, n - 1);
            PairStats::set(&p.bytes_forwarded, 100 * n);
            PairStats::set(&p.window, 20);
        }
        PairStats::set(&pairs[0].in_flight, 1);
        PairStats::set(&pairs[0].last_progress_ms, 1);
        PairStats::add(&pairs[1].dropped_refused, 2);
        PairStats::add(&pairs[1].target_reconnects, 3);

        let (status, content_type, body) = a.answer(&Method::GET, "/status");
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "application/json");
        let v: serde_json::Value = serde_json::from_str(&body).expect(&body);
        assert_eq!(v["bridge"], "edge-1");
        assert_eq!(v["instance"], "pod-0");
        assert!(v["uptime_s"].is_u64(), "{v}");
        let route = &v["routes"][0];
        assert_eq!(route["name"], "up");
        assert_eq!(route["source"], "edge");
        assert_eq!(route["target"], "cloud");
        assert_eq!(route["pairs_ready"], 1);
        assert_eq!(route["received"], 15);
        assert_eq!(route["forwarded"], 13);
        assert_eq!(route["bytes_forwarded"], 1500);
        assert_eq!(route["in_flight"], 1);
        assert_eq!(route["window"], 40);
        assert_eq!(route["reconnects"], 3);
        assert_eq!(route["dropped"]["refused"], 2);
        assert_eq!(route["dropped"]["loop"], 0, "every reason is listed");
        assert!(route["spool"].is_null());
        assert!(route["last_progress_age_ms"].is_u64(), "{route}");
        let listed = route["pairs"].as_array().expect("pairs is a list");
        assert_eq!(listed.len(), 2);
        assert_eq!(listed[0]["index"], 0);
        assert_eq!(listed[0]["state"], "ready");
        assert_eq!(listed[0]["source_up"], true);
        assert_eq!(listed[0]["in_flight"], 1);
        assert_eq!(listed[0]["window"], 20);
        assert!(listed[0]["last_progress_age_ms"].is_u64());
        assert_eq!(listed[1]["index"], 1);
        assert_eq!(listed[1]["state"], "connecting");
        assert_eq!(listed[1]["received"], 5);
        assert_eq!(listed[1]["dropped"]["refused"], 2);
        assert!(listed[1]["last_progress_age_ms"].is_null(), "never acked");
        // What `mqbridge top` reads back.
        let parsed: Status = serde_json::from_str(&body).expect("the top's type");
        assert_eq!(serde_json::to_string(&parsed).unwrap(), body.trim_end());
    }

    #[test]
    fn status_shows_a_spooled_pair_riding_out_a_target_outage() {
        let route = RouteStats {
            name: "up".into(),
            source_broker: "edge".into(),
            target_broker: "cloud".into(),
            pairs: vec![Arc::new(PairStats::default())],
            spool: vec![Arc::new(crate::spool::LogGauges::default())],
        };
        let gauges = route.spool[0].clone();
        let pair = route.pairs[0].clone();
        pair.source_up.store(true, Relaxed);
        pair.subscribed.store(true, Relaxed);
        gauges.messages.store(7, Relaxed);
        gauges.bytes.store(4096, Relaxed);
        let a = Admin::new(
            RouteSet::new(vec![route]),
            Instant::now(),
            Duration::from_secs(30),
        );
        let s = a.status();
        let r = &s.routes[0];
        assert_eq!(r.pairs[0].state, "spooling");
        let spool = r.spool.expect("a spooled route reports its spool");
        assert_eq!((spool.messages, spool.bytes, spool.full), (7, 4096, false));
        assert_eq!(spool.oldest_age_s, None);
        assert_eq!(r.pairs[0].spool, Some(spool));
    }

    #[test]
    fn other_paths_and_methods_are_refused() {
        let a = admin(1);
        assert_eq!(a.answer(&Method::GET, "/").0, StatusCode::NOT_FOUND);
        for path in ["/metrics", "/status"] {
            assert_eq!(
                a.answer(&Method::POST, path).0,
                StatusCode::METHOD_NOT_ALLOWED
            );
        }
    }
}
