//! `/metrics`: the Prometheus text exposition of every route, built at scrape time by a custom
//! `prometheus-client` collector that sums the pairs' `PairStats` atomics. Nothing is updated
//! per message on behalf of metrics: the pair's task only bumps its own atomics, lock-free.

use std::fmt;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, NoLabelSet, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

use super::{RouteSet, RouteStats};
use crate::pair::stats::{LATENCY_BUCKETS, LatencySnapshot, PairStats};

/// `Content-Type` of the exposition (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// The registry behind `/metrics`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(routes: RouteSet) -> Metrics {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(BridgeCollector { routes }));
        Metrics { registry }
    }

    /// The exposition text as of now.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; an error could only come from our own encoding.
        if let Err(e) = prometheus_text::encode(&mut out, &self.registry) {
            tracing::warn!("metrics encoding failed: {e}");
        }
        out
    }
}

#[derive(Debug)]
struct BridgeCollector {
    /// Read once per scrape: a reload between two scrapes shows in the next one whole.
    routes: RouteSet,
}

/// One route's pairs summed at one moment.
#[derive(Debug, Default)]
struct RouteSample<'a> {
    route: &'a str,
    source_broker: &'a str,
    target_broker: &'a str,
    pairs: u64,
    pairs_ready: u64,
    received: u64,
    forwarded: u64,
    bytes_forwarded: u64,
    drops: Vec<(&'static str, u64)>,
    redeliveries: u64,
    qos_downgraded: u64,
    properties_dropped: u64,
    retain_cleared: u64,
    dead_lettered: u64,
    dead_letters_unsendable: u64,
    paced: u64,
    window_full_ms: u64,
    skipped_acks: u64,
    round_trip_us: u64,
    retried: u64,
    subscriptions_downgraded: u64,
    in_flight: u64,
    window: u64,
    source_up: u64,
    target_up: u64,
    source_reconnects: u64,
    target_reconnects: u64,
    latency: LatencySnapshot,
}

impl<'a> RouteSample<'a> {
    fn take(r: &'a RouteStats) -> RouteSample<'a> {
        let g = PairStats::get;
        let up = |b: &std::sync::atomic::AtomicBool| {
            u64::from(b.load(std::sync::atomic::Ordering::Relaxed))
        };
        let mut s = RouteSample {
            route: &r.name,
            source_broker: &r.source_broker,
            target_broker: &r.target_broker,
            ..Default::default()
        };
        for p in r.pairs.iter() {
            s.pairs += 1;
            s.pairs_ready += u64::from(p.ready());
            s.received += g(&p.received);
            s.forwarded += g(&p.forwarded);
            s.bytes_forwarded += g(&p.bytes_forwarded);
            let drops = p.drops();
            if s.drops.is_empty() {
                s.drops = drops.iter().map(|(reason, _)| (*reason, 0)).collect();
            }
            for (sum, (_, n)) in s.drops.iter_mut().zip(drops) {
                sum.1 += n;
            }
            s.redeliveries += g(&p.redeliveries);
            s.qos_downgraded += g(&p.qos_downgraded);
            s.properties_dropped += g(&p.properties_dropped);
            s.retain_cleared += g(&p.retain_cleared);
            s.dead_letters_unsendable += g(&p.dead_letters_unsendable);
            s.dead_lettered += g(&p.dead_lettered);
            s.paced += g(&p.paced);
            s.window_full_ms += g(&p.window_full_ms);
            s.skipped_acks += g(&p.skipped_acks);
            s.round_trip_us = s.round_trip_us.max(g(&p.target_round_trip_us));
            s.retried += g(&p.retried);
            s.subscriptions_downgraded += g(&p.subscriptions_downgraded);
            s.in_flight += g(&p.in_flight);
            s.window += g(&p.window);
            s.source_up += up(&p.source_up);
            s.target_up += up(&p.target_up);
            s.source_reconnects += g(&p.source_reconnects);
            s.target_reconnects += g(&p.target_reconnects);
            s.latency.merge(&p.forward_latency.snapshot());
        }
        s
    }

    /// (broker, connections up, reconnects) for the route's brokers. A route from a broker to
    /// itself has one series for it: a label set must not repeat within a metric.
    fn brokers(&self) -> Vec<(&'a str, u64, u64)> {
        let source = (self.source_broker, self.source_up, self.source_reconnects);
        let target = (self.target_broker, self.target_up, self.target_reconnects);
        if self.source_broker == self.target_broker {
            vec![(source.0, source.1 + target.1, source.2 + target.2)]
        } else {
            vec![source, target]
        }
    }
}

type RouteLabel<'a> = [(&'static str, &'a str); 1];
type PairLabels<'a> = [(&'static str, &'a str); 2];

/// The metrics that are one number per route, summed over its pairs: name, HELP, TYPE and the
/// value. (Families with more labels, and the latency histogram, are written out below.)
type RouteFamily = (
    &'static str,
    &'static str,
    MetricType,
    fn(&RouteSample) -> u64,
);

const ROUTE_FAMILIES: &[RouteFamily] = &[
    (
        "mqbridge_messages_received",
        "Messages taken from the source (redeliveries of held messages not counted).",
        MetricType::Counter,
        |s| s.received,
    ),
    (
        "mqbridge_messages_forwarded",
        "Messages the target took (QoS 0 when written, QoS 1/2 on its acknowledgement).",
        MetricType::Counter,
        |s| s.forwarded,
    ),
    (
        "mqbridge_bytes_forwarded",
        "Payload bytes the target took: acknowledged (QoS 1, 2; once, however often resent) or written (QoS 0).",
        MetricType::Counter,
        |s| s.bytes_forwarded,
    ),
    (
        "mqbridge_paced",
        "Times a pair held a message back to stay within the target's per-connection quotas (max_publish_rate, bandwidth_limit); growing steadily: the route's offered load exceeds what its pairs may carry.",
        MetricType::Counter,
        |s| s.paced,
    ),
    (
        "mqbridge_window_full_milliseconds",
        "Milliseconds the pairs' windows towards the target were full while it was connected, summed over pairs: rising by about 1000 per second per pair, the route is window-bound (it carries window / round trip per pair; pool_size = \"auto\" adds pairs).",
        MetricType::Counter,
        |s| s.window_full_ms,
    ),
    (
        "mqbridge_skipped_acks",
        "Target reconnects because it acknowledged publishes written after one it never acknowledged (brokers acknowledge in order): it dropped that publish without a word, as BifroMQ does over its PUBLISH/s quota on MQTT 3.x; the publish is sent again. Set the target's max_publish_rate.",
        MetricType::Counter,
        |s| s.skipped_acks,
    ),
    (
        "mqbridge_target_round_trip_microseconds",
        "The longest round trip to the target a pair of the route measured while idle (keep-alive PINGREQ to PINGRESP; 0 until one did): against the forward latency, what the distance costs and what the target adds.",
        MetricType::Gauge,
        |s| s.round_trip_us,
    ),
    (
        "mqbridge_publishes_retried",
        "Publishes sent to the target again because it answered \"not now\" (0x97 quota exceeded, 0x91 packet identifier in use); nothing is lost, but the target is at its limit.",
        MetricType::Counter,
        |s| s.retried,
    ),
    (
        "mqbridge_subscriptions_downgraded",
        "SUBACKs from the source that granted a lower QoS than the route's qos: messages arrive at that QoS at most.",
        MetricType::Counter,
        |s| s.subscriptions_downgraded,
    ),
    (
        "mqbridge_inflight",
        "QoS 1/2 messages held by the route's pairs: taken from the source, not yet acknowledged by the target.",
        MetricType::Gauge,
        |s| s.in_flight,
    ),
    (
        "mqbridge_window",
        "Most QoS 1/2 messages the route's pairs may hold at once (sum of the pairs' windows).",
        MetricType::Gauge,
        |s| s.window,
    ),
    (
        "mqbridge_pairs",
        "Pairs of connections in the route (pool_size).",
        MetricType::Gauge,
        |s| s.pairs,
    ),
    (
        "mqbridge_pairs_ready",
        "Pairs with both connections up and the source subscribed.",
        MetricType::Gauge,
        |s| s.pairs_ready,
    ),
    (
        "mqbridge_redeliveries",
        "Source redeliveries recognised as already held or forwarded, and not forwarded again.",
        MetricType::Counter,
        |s| s.redeliveries,
    ),
    (
        "mqbridge_qos_downgraded",
        "Messages forwarded at a lower QoS than received because of the target's Maximum QoS (or its max_qos).",
        MetricType::Counter,
        |s| s.qos_downgraded,
    ),
    (
        "mqbridge_properties_dropped",
        "MQTT 5 messages whose properties could not be carried to the target.",
        MetricType::Counter,
        |s| s.properties_dropped,
    ),
    (
        "mqbridge_dead_letters_unsendable",
        "Dead letters not sent because they are over the source broker's Maximum Packet Size.",
        MetricType::Counter,
        |s| s.dead_letters_unsendable,
    ),
    (
        "mqbridge_retain_cleared",
        "Messages forwarded without their retain flag because the target has no retained messages (MQTT 5 Retain Available = 0).",
        MetricType::Counter,
        |s| s.retain_cleared,
    ),
    (
        "mqbridge_dead_lettered",
        "Undeliverable messages published to the route's dead letter topic.",
        MetricType::Counter,
        |s| s.dead_lettered,
    ),
];

impl Collector for BridgeCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> fmt::Result {
        let routes = self.routes.snapshot();
        let samples: Vec<RouteSample> = routes.iter().map(RouteSample::take).collect();
        let by_route = |value: fn(&RouteSample) -> u64| {
            samples
                .iter()
                .map(move |s| -> (RouteLabel, u64) { ([("route", s.route)], value(s)) })
        };
        use MetricType::{Counter, Gauge};
        for (name, help, metric_type, value) in ROUTE_FAMILIES {
            family(&mut enc, name, help, *metric_type, by_route(*value))?;
        }
        family(
            &mut enc,
            "mqbridge_messages_dropped",
            "Messages not delivered, by reason.",
            Counter,
            samples.iter().flat_map(|s| {
                s.drops.iter().map(|(reason, n)| -> (PairLabels, u64) {
                    ([("route", s.route), ("reason", reason)], *n)
                })
            }),
        )?;
        let brokers: Vec<(PairLabels, u64, u64)> = samples
            .iter()
            .flat_map(|s| {
                s.brokers().into_iter().map(|(broker, up, reconnects)| {
                    ([("broker", broker), ("route", s.route)], up, reconnects)
                })
            })
            .collect();
        family(
            &mut enc,
            "mqbridge_connections_up",
            "Connections of the route's pairs to this broker that are up.",
            Gauge,
            brokers.iter().map(|(l, up, _)| (*l, *up)),
        )?;
        family(
            &mut enc,
            "mqbridge_reconnects",
            "Reconnections of the route's pairs to this broker (the first connection not counted).",
            Counter,
            brokers.iter().map(|(l, _, n)| (*l, *n)),
        )?;

        // Process-wide: a task leak (a pair or connection task that never ends) shows here.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            family(
                &mut enc,
                "mqbridge_runtime_tasks",
                "Tasks alive in the process's async runtime (pairs, connections, admin).",
                Gauge,
                [([("", ""); 0], rt.metrics().num_alive_tasks() as u64)],
            )?;
        }

        spool_families(&mut enc, &routes)?;

        let mut m = enc.encode_descriptor(
            "mqbridge_forward_latency_seconds",
            "Time from receiving a QoS 1/2 message from the source to the target's acknowledgement.",
            None,
            MetricType::Histogram,
        )?;
        for s in &samples {
            let labels: RouteLabel = [("route", s.route)];
            let buckets: Vec<(f64, u64)> = LATENCY_BUCKETS
                .iter()
                .copied()
                .chain([f64::INFINITY])
                .zip(s.latency.buckets)
                .collect();
            m.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
                s.latency.sum_seconds,
                s.latency.count(),
                &buckets,
                None,
            )?;
        }
        Ok(())
    }
}

/// One metric: its HELP and TYPE lines, then one sample per label set. Counters get their
/// `_total` suffix from the encoder.
/// `mqbridge_spool_*{route}`, for routes with a spool (SPEC 4.9), summed over their pairs.
fn spool_families(enc: &mut DescriptorEncoder, routes: &[RouteStats]) -> fmt::Result {
    use std::sync::atomic::Ordering::Relaxed;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let spooled: Vec<&RouteStats> = routes.iter().filter(|r| !r.spool.is_empty()).collect();
    let series = |f: fn(&RouteStats) -> u64| {
        spooled
            .iter()
            .map(move |r| -> (RouteLabel, u64) { ([("route", r.name.as_str())], f(r)) })
    };
    family(
        enc,
        "mqbridge_spool_messages",
        "Messages in the route's spool: taken from the source, not yet acknowledged by the target.",
        MetricType::Gauge,
        series(|r| r.spool.iter().map(|g| g.messages.load(Relaxed)).sum()),
    )?;
    family(
        enc,
        "mqbridge_spool_bytes",
        "Bytes the route's spool uses on disk (whole segments), held against spool.max_bytes.",
        MetricType::Gauge,
        series(|r| r.spool.iter().map(|g| g.bytes.load(Relaxed)).sum()),
    )?;
    family(
        enc,
        "mqbridge_spool_full",
        "1 while a pair's spool is at spool.max_bytes: the route has stopped reading its source.",
        MetricType::Gauge,
        series(|r| u64::from(r.spool.iter().any(|g| g.full.load(Relaxed)))),
    )?;
    family(
        enc,
        "mqbridge_spool_fsyncs",
        "Groups of appends made durable (one fdatasync each).",
        MetricType::Counter,
        series(|r| r.spool.iter().map(|g| g.fsyncs.load(Relaxed)).sum()),
    )?;
    family(
        enc,
        "mqbridge_spool_damaged_records",
        "Records found damaged (checksum) or torn (cut short by a crash) when the spool was opened, skipped.",
        MetricType::Counter,
        series(|r| r.spool.iter().map(|g| g.damaged.load(Relaxed)).sum()),
    )?;
    let oldest = spooled.iter().map(|r| -> (RouteLabel, u64) {
        let age_ms = r
            .spool
            .iter()
            .map(|g| g.oldest_ms.load(Relaxed))
            .filter(|&t| t > 0)
            .min()
            .map_or(0, |t| now_ms.saturating_sub(t));
        ([("route", r.name.as_str())], age_ms / 1000)
    });
    family(
        enc,
        "mqbridge_spool_oldest_age_seconds",
        "Age of the oldest message in the route's spool (to a segment's precision); 0 when empty.",
        MetricType::Gauge,
        oldest,
    )
}

fn family<L: EncodeLabelSet>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric_type: MetricType,
    series: impl IntoIterator<Item = (L, u64)>,
) -> fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, metric_type)?;
    for (labels, value) in series {
        let sample = m.encode_family(&labels)?;
        match metric_type {
            MetricType::Counter => ConstCounter::new(value).encode(sample)?,
            _ => ConstGauge::new(value).encode(sample)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn route(name: &str, from: &str, to: &str, pairs: usize) -> RouteStats {
        RouteStats {
            name: name.into(),
            source_broker: from.into(),
            target_broker: to.into(),
            pairs: (0..pairs).map(|_| Arc::new(PairStats::default())).collect(),
            spool: Vec::new(),
        }
    }

    fn has_line(text: &str, line: &str) -> bool {
        text.lines().any(|l| l == line)
    }

    #[test]
    fn route_counters_are_the_sum_of_their_pairs() {
        let up = route("up", "edge", "cloud", 2);
        for (p, n) in up.pairs.iter().zip([5, 7]) {
            PairStats::add(&p.received, n);
            PairStats::add(&p.forwarded, n);
            PairStats::add(&p.bytes_forwarded, 10 * n);
            PairStats::add(&p.dropped_refused, 1);
            PairStats::add(&p.paced, 2 * n);
            PairStats::set(&p.in_flight, n);
            PairStats::set(&p.window, 20);
        }
        let text = Metrics::new(RouteSet::new(vec![up])).render();
        for line in [
            "# TYPE mqbridge_messages_received_total counter",
            r#"mqbridge_messages_received_total{route="up"} 12"#,
            r#"mqbridge_messages_forwarded_total{route="up"} 12"#,
            r#"mqbridge_bytes_forwarded_total{route="up"} 120"#,
            r#"mqbridge_messages_dropped_total{route="up",reason="refused"} 2"#,
            r#"mqbridge_messages_dropped_total{route="up",reason="loop"} 0"#,
            r#"mqbridge_messages_dropped_total{route="up",reason="target_down_qos0"} 0"#,
            "# TYPE mqbridge_paced_total counter",
            r#"mqbridge_paced_total{route="up"} 24"#,
            "# TYPE mqbridge_inflight gauge",
            r#"mqbridge_inflight{route="up"} 12"#,
            r#"mqbridge_window{route="up"} 40"#,
            r#"mqbridge_pairs{route="up"} 2"#,
            r#"mqbridge_pairs_ready{route="up"} 0"#,
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }
    }

    #[test]
    fn connections_are_labelled_by_broker_and_route() {
        let up = route("up", "edge", "cloud", 3);
        for p in &up.pairs {
            p.target_up
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        up.pairs[0]
            .source_up
            .store(true, std::sync::atomic::Ordering::Relaxed);
        PairStats::add(&up.pairs[1].target_reconnects, 2);
        let same = route("loopback", "edge", "edge", 1);
        PairStats::add(&same.pairs[0].source_reconnects, 1);
        PairStats::add(&same.pairs[0].target_reconnects, 1);
        let text = Metrics::new(RouteSet::new(vec![up, same])).render();
        for line in [
            r#"mqbridge_connections_up{broker="edge",route="up"} 1"#,
            r#"mqbridge_connections_up{broker="cloud",route="up"} 3"#,
            r#"mqbridge_reconnects_total{broker="edge",route="up"} 0"#,
            r#"mqbridge_reconnects_total{broker="cloud",route="up"} 2"#,
            // One broker on both sides: one series, both sides counted.
            r#"mqbridge_reconnects_total{broker="edge",route="loopback"} 2"#,
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }
        assert_eq!(
            text.matches(r#"mqbridge_connections_up{broker="edge",route="loopback"}"#)
                .count(),
            1
        );
    }

    #[test]
    fn latency_is_a_cumulative_histogram_per_route() {
        let up = route("up", "edge", "cloud", 2);
        up.pairs[0].forward_latency.record(0.0008);
        up.pairs[0].forward_latency.record(0.02);
        up.pairs[1].forward_latency.record(0.0009);
        up.pairs[1].forward_latency.record(90.0);
        let text = Metrics::new(RouteSet::new(vec![up])).render();
        for line in [
            "# TYPE mqbridge_forward_latency_seconds histogram",
            r#"mqbridge_forward_latency_seconds_bucket{route="up",le="0.0005"} 0"#,
            r#"mqbridge_forward_latency_seconds_bucket{route="up",le="0.001"} 2"#,
            r#"mqbridge_forward_latency_seconds_bucket{route="up",le="0.025"} 3"#,
            r#"mqbridge_forward_latency_seconds_bucket{route="up",le="60"} 3"#,
            r#"mqbridge_forward_latency_seconds_bucket{route="up",le="+Inf"} 4"#,
            r#"mqbridge_forward_latency_seconds_count{route="up"} 4"#,
        ] {
            assert!(has_line(&text, line), "missing {line:?} in:\n{text}");
        }
        let sum: f64 = text
            .lines()
            .find_map(|l| l.strip_prefix(r#"mqbridge_forward_latency_seconds_sum{route="up"} "#))
            .expect("a _sum sample")
            .parse()
            .unwrap();
        assert!((sum - 90.0217).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn every_sample_line_is_well_formed() {
        let text = Metrics::new(RouteSet::new(vec![route("up", "edge", "cloud", 1)])).render();
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let (series, value) = line.rsplit_once(' ').expect("name and value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            assert!(series.starts_with("mqbridge_"), "{line}");
            assert!(series.ends_with('}'), "every sample carries labels: {line}");
        }
    }
    #[tokio::test]
    async fn the_runtime_task_count_is_a_plain_gauge() {
        let text = Metrics::new(RouteSet::new(vec![])).render();
        let value: u64 = text
            .lines()
            .find_map(|l| l.strip_prefix("mqbridge_runtime_tasks "))
            .unwrap_or_else(|| panic!("no mqbridge_runtime_tasks sample in:\n{text}"))
            .parse()
            .unwrap();
        // A #[tokio::test] runs its body on the runtime's own thread, not as a spawned task.
        let parked = tokio::spawn(std::future::pending::<()>());
        let text = Metrics::new(RouteSet::new(vec![])).render();
        assert!(
            has_line(&text, &format!("mqbridge_runtime_tasks {}", value + 1)),
            "{text}"
        );
        parked.abort();
    }
}

#[cfg(test)]
mod dashboard_tests;
