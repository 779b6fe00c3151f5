//! `mqbridge check`: the resolved plan as an operator reads it (brokers, routes, pairs,
//! subscriptions, capacity, rewrite examples, loop analysis) and the `--topic` dry run.
//! Pure functions from a validated `Plan` to text; nothing here opens a socket.

use std::fmt::{self, Write};

use bytesize::ByteSize;
use humantime::format_duration;

use crate::config::{
    BrokerPlan, Plan, PropertiesMode, Qos, RetainMode, RoutePlan, Share, Side, Transport,
    client_id, load::sample_topic,
};
use crate::loops::analysis::{self, Cut};
use crate::topic::{RewriteRule, TopicFilter, TopicName};

/// Pairs listed one by one in `check`; a bigger pool shows the first ones and a count.
const PAIRS_SHOWN: usize = 8;

/// The whole resolved plan, for `mqbridge check -c FILE`. Secrets show as `<redacted>`.
pub fn render_plan(plan: &Plan) -> String {
    let mut out = String::new();
    write_plan(&mut out, plan).expect("writing to a String cannot fail");
    out
}

/// Which routes take `topic` and what each rewrites it to, for `check --topic T`.
pub fn dry_run(plan: &Plan, topic: &str) -> String {
    let mut out = String::new();
    write_dry_run(&mut out, plan, topic).expect("writing to a String cannot fail");
    out
}

fn write_plan(out: &mut String, plan: &Plan) -> fmt::Result {
    let b = &plan.bridge;
    writeln!(out, "bridge \"{}\", instance \"{}\"", b.name, b.instance)?;
    writeln!(
        out,
        "  drain timeout {}, stall timeout {}, summary every {}, {} worker thread{}",
        format_duration(b.drain_timeout),
        format_duration(b.stall_timeout),
        format_duration(b.summary_interval),
        b.worker_threads,
        if b.worker_threads == 1 { "" } else { "s" }
    )?;
    match plan.admin_listen {
        Some(addr) => writeln!(
            out,
            "  admin: http://{addr} (/metrics, /healthz, /readyz, /status)"
        )?,
        None => writeln!(out, "  admin: off (no [admin] table)")?,
    }

    writeln!(out, "\nbrokers")?;
    for broker in plan.brokers.values() {
        write_broker(out, plan, broker)?;
    }

    writeln!(out, "\nroutes")?;
    for route in &plan.routes {
        write_route(out, plan, route)?;
    }

    writeln!(out, "\nloop analysis")?;
    write_loops(out, plan)
}

fn write_broker(out: &mut String, plan: &Plan, broker: &BrokerPlan) -> fmt::Result {
    let transport = match broker.transport {
        Transport::Tcp => "tcp",
        Transport::Tls => "tls",
        Transport::Ws => "ws",
        Transport::Wss => "wss",
    };
    writeln!(
        out,
        "  {}: {} ({transport} {}:{}{})",
        broker.name, broker.url, broker.host, broker.port, broker.path
    )?;
    let mut login = format!(
        "    MQTT {}, client ids \"{}-{}-…\"",
        broker.protocol, broker.client_id_prefix, plan.bridge.instance
    );
    if let Some(user) = &broker.username {
        write!(login, ", username \"{user}\"")?;
    }
    if let Some(password) = &broker.password {
        // `Secret`'s Display is the redaction itself.
        write!(login, ", password {password}")?;
    }
    writeln!(out, "{login}")?;
    writeln!(
        out,
        "    loop marker id \"{}\" (mqbridge-from; brokers.{}.id)",
        broker.id, broker.name
    )?;
    if broker.session_expiry.is_zero() {
        writeln!(
            out,
            "    session: clean (session_expiry = 0s): QoS ≥ 1 messages not yet acknowledged are \
             lost when the bridge restarts"
        )?;
    } else {
        writeln!(
            out,
            "    session: persistent, kept {} after a disconnect",
            format_duration(broker.session_expiry)
        )?;
    }
    writeln!(
        out,
        "    keep alive {}, max in flight {} (QoS 2: {}; {} per pair), at most {} filters per \
         SUBSCRIBE",
        format_duration(broker.keep_alive),
        broker.max_inflight,
        broker.max_inflight_qos2,
        ByteSize(broker.max_inflight_bytes).display().iec(),
        broker.max_filters_per_subscribe
    )?;
    if broker.max_qos < Qos::ExactlyOnce {
        let q = broker.max_qos as u8;
        writeln!(
            out,
            "    as a target: QoS {q} at most (max_qos); messages of a higher QoS go at QoS {q}"
        )?;
    }
    let limits = broker.per_connection_limits();
    writeln!(
        out,
        "    per-connection limits: {}",
        limits.as_deref().unwrap_or("none")
    )?;
    match &broker.tls {
        None => writeln!(out, "    TLS: off")?,
        Some(tls) => {
            let ca = tls
                .ca_file
                .as_ref()
                .map_or("the system roots".to_owned(), |p| p.display().to_string());
            let name = tls.server_name.as_deref().unwrap_or(&broker.host);
            write!(out, "    TLS: verified against {ca} as \"{name}\"")?;
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                write!(
                    out,
                    ", client certificate {} (key {})",
                    cert.display(),
                    key.display()
                )?;
            }
            writeln!(out)?;
            if tls.insecure_skip_verify {
                writeln!(
                    out,
                    "    WARNING: insecure_skip_verify = true: the certificate is NOT verified; \
                     anyone on the path can read and forge this traffic"
                )?;
            }
        }
    }
    if !plan
        .routes
        .iter()
        .any(|r| r.from.name == broker.name || r.to.name == broker.name)
    {
        writeln!(out, "    unused: no route names it")?;
    }
    Ok(())
}

fn write_route(out: &mut String, plan: &Plan, route: &RoutePlan) -> fmt::Result {
    writeln!(
        out,
        "  {}: {} → {}",
        route.name, route.from.name, route.to.name
    )?;
    let how = match route.share {
        Share::Share => format!("shared in group \"{}\"", route.group),
        Share::OShare => format!(
            "shared in order-keeping group \"{}\" (BifroMQ $oshare)",
            route.group
        ),
        Share::None => "not shared: every pair receives every message".to_owned(),
    };
    writeln!(
        out,
        "    subscribes on {} at QoS {}, {how}:",
        route.from.name, route.qos as u8
    )?;
    for subscription in route.subscriptions() {
        writeln!(out, "      {subscription}")?;
    }
    if route.from.protocol.is_v5() {
        writeln!(
            out,
            "    {} is told the target's window as its Receive Maximum (at most {}): no more \
             unacknowledged to a pair",
            route.from.name, route.to.max_inflight
        )?;
    } else {
        writeln!(
            out,
            "    {} speaks MQTT {} and cannot be told a window: its own in-flight limit caps each \
             pair at that many messages per round trip (mosquitto: max_inflight_messages, 20 by \
             default); on a long link raise it there, or add pairs",
            route.from.name, route.from.protocol
        )?;
    }
    if !route.from.ack_delay.is_zero() && route.spool.is_none() {
        writeln!(
            out,
            "    acks to {} wait up to {} to leave together (ack_delay; at most a quarter of its \
             window, none once half of it is in flight): less CPU on sparse pairs, and if {} \
             delays small writes (mosquitto's default), its next messages wait as long",
            route.from.name,
            humantime::format_duration(route.from.ack_delay),
            route.from.name
        )?;
    }

    let pairs = route.pool_size_max;
    if route.pool_auto {
        writeln!(
            out,
            "    pool: auto, {} to {} pairs (grows while the target's quotas hold pairs back or their windows are full, shrinks after 10 s idle or once fewer pairs would do); source client id → target client id:",
            route.pool_size, route.pool_size_max
        )?;
    } else {
        writeln!(
            out,
            "    {pairs} pair{} (source client id → target client id):",
            plural(pairs)
        )?;
    }
    for index in 0..pairs.min(PAIRS_SHOWN) {
        writeln!(
            out,
            "      {index}: {} → {}",
            client_id(&plan.bridge, route, index, Side::Source),
            client_id(&plan.bridge, route, index, Side::Target)
        )?;
    }
    if pairs > PAIRS_SHOWN {
        writeln!(
            out,
            "      … {} more, up to index {}",
            pairs - PAIRS_SHOWN,
            pairs - 1
        )?;
    }
    writeln!(out, "    capacity: {}", capacity(route))?;

    let retain = match route.retain {
        RetainMode::AsPublished => "retain flag as published",
        RetainMode::Clear => "retain flag cleared",
    };
    // Properties exist only where both ends speak MQTT 5 (SPEC 4.4).
    let properties = match (route.from.protocol.is_v5(), route.to.protocol.is_v5()) {
        (false, _) => "no v5 properties (3.x source)",
        (true, false) => "v5 properties dropped (3.x target)",
        (true, true) if route.properties == PropertiesMode::Drop => "v5 properties dropped",
        (true, true) => "v5 properties forwarded",
    };
    writeln!(
        out,
        "    forwards at QoS min(received, {}), {retain}, {properties}; \
         up to {} QoS 0 messages queued per pair",
        route.qos as u8, route.queue_capacity
    )?;
    let markers = match (
        route.to.protocol.is_v5(),
        analysis::writes_markers(plan, route),
    ) {
        (false, _) => "none (MQTT 3.x target)".to_string(),
        (true, true) => format!(
            "mqbridge-via / mqbridge-from added (loop_markers = \"{}\")",
            route.loop_markers
        ),
        (true, false) => format!("none added (loop_markers = \"{}\")", route.loop_markers),
    };
    writeln!(out, "    loop markers: {markers}")?;
    match &route.dead_letter {
        Some(topic) => writeln!(
            out,
            "    undeliverable messages: published to \"{topic}\" on {}",
            route.from.name
        )?,
        None => writeln!(
            out,
            "    undeliverable messages: logged and counted (no dead_letter topic)"
        )?,
    }
    let per_pair = route.to.max_inflight_bytes;
    writeln!(
        out,
        "    held in memory while the target is slow or away: at most {} of messages ({} pair{} × \
         {}, {}'s max_inflight_bytes)",
        ByteSize(per_pair.saturating_mul(pairs as u64))
            .display()
            .iec(),
        pairs,
        plural(pairs),
        ByteSize(per_pair).display().iec(),
        route.to.name
    )?;
    match &route.spool {
        Some(spool) => writeln!(
            out,
            "    spool: {} (one directory per pair), up to {} ({} per pair), {}; acknowledges the source once on disk or taken by the target, keeps reading while the target is away",
            spool.dir.display(),
            bytesize::ByteSize::b(spool.max_bytes).display().iec(),
            bytesize::ByteSize::b(spool.max_bytes / route.pool_size_max.max(1) as u64)
                .display()
                .iec(),
            match spool.max_age {
                Some(age) => format!(
                    "messages older than {} {}",
                    humantime::format_duration(age),
                    if route.dead_letter.is_some() {
                        "dead-lettered"
                    } else {
                        "dropped (counted)"
                    }
                ),
                None => "no age limit".into(),
            }
        )?,
        None => writeln!(
            out,
            "    spool: off (acknowledges the source once the target did; an outage is held by the source broker's queue)"
        )?,
    }

    let rules = route.rewrite.rules();
    if rules.is_empty() {
        return writeln!(out, "    rewrite: none, topics are forwarded unchanged");
    }
    writeln!(out, "    rewrite (first match wins; no match = unchanged):")?;
    for (n, rule) in rules.iter().enumerate() {
        write_rule_example(out, route, n + 1, rule)?;
    }
    Ok(())
}

/// What the brokers' per-connection limits allow the whole pool to move.
fn capacity(route: &RoutePlan) -> String {
    // An auto-sized pool can carry what its largest size can.
    let pairs = route.pool_size_max as u64;
    let mut parts = Vec::new();
    // The target connection publishes: the target's PUBLISH rate limits a pair.
    if let Some(rate) = route.to.max_publish_rate {
        parts.push(format!(
            "{} messages/s ({pairs} × {rate}/s, {}'s max_publish_rate)",
            pairs * u64::from(rate),
            route.to.name
        ));
    }
    // Bytes come in on the source connection and go out on the target one: the smaller
    // limit is the pair's.
    let bytes = [&route.from, &route.to]
        .into_iter()
        .filter_map(|b| b.bandwidth_limit.map(|l| (l, &b.name)))
        .min();
    if let Some((limit, name)) = bytes {
        parts.push(format!(
            "{}/s ({pairs} × {}/s, {name}'s bandwidth_limit)",
            ByteSize(pairs.saturating_mul(limit)).display().iec(),
            ByteSize(limit).display().iec()
        ));
    }
    if parts.is_empty() {
        "not limited by configuration (no max_publish_rate or bandwidth_limit)".to_owned()
    } else {
        parts.join(", ")
    }
}

fn write_rule_example(
    out: &mut String,
    route: &RoutePlan,
    n: usize,
    rule: &RewriteRule,
) -> fmt::Result {
    writeln!(
        out,
        "      {n}. {} → {}",
        rule.filter().as_str(),
        rule.template()
    )?;
    let sample = sample_topic(rule.filter());
    match rule.apply(&sample) {
        Some(Ok(rewritten)) => writeln!(out, "         e.g. {sample} → {rewritten}")?,
        Some(Err(e)) => writeln!(out, "         e.g. {sample} → invalid topic ({e})")?,
        None => {}
    }
    // Where `#` may match no level at all the result can still be invalid (an empty topic,
    // say): not an error, those messages are dead-lettered, but worth showing.
    if rule.filter().ends_with_multi() {
        let shortest = shortest_topic(rule.filter());
        if let Some(Err(e)) = rule.apply(&shortest) {
            writeln!(
                out,
                "         note: {shortest} → invalid topic ({e}): such messages are dead-lettered"
            )?;
        }
    }
    if !route.topics.iter().any(|t| t.overlaps(rule.filter())) {
        writeln!(
            out,
            "         note: never applies: none of the route's topics can match it"
        )?;
    }
    Ok(())
}

/// The sample topic with `#` matching no level: `a/+/#` → `a/x1`.
fn shortest_topic(filter: &TopicFilter) -> String {
    let sample = sample_topic(filter);
    match sample.strip_suffix("rest/of/topic") {
        Some(prefix) => prefix.strip_suffix('/').unwrap_or(prefix).to_owned(),
        None => sample,
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// Route pairs whose outputs come back, and what cuts each way round.
fn write_loops(out: &mut String, plan: &Plan) -> fmt::Result {
    let findings = analysis::find(plan);
    for f in &findings {
        let (a, b) = (f.a, f.b);
        if std::ptr::eq(a, b) {
            writeln!(
                out,
                "  could loop: {} ({} → itself) takes back what it publishes:",
                a.name, a.from.name
            )?;
        } else if f.is_loop() {
            writeln!(
                out,
                "  could loop: {} ({} → {}) and {} ({} → {})",
                a.name, a.from.name, a.to.name, b.name, b.from.name, b.to.name
            )?;
        } else {
            writeln!(
                out,
                "  could echo: what {} forwards to {} is taken back to {} by {}",
                a.name, a.to.name, a.from.name, b.name
            )?;
        }
        write_overlap(out, a, b, &f.there)?;
        // A route into its own source: "back" is the same overlap again.
        if let Some(back) = f.back.as_ref().filter(|_| !std::ptr::eq(a, b)) {
            write_overlap(out, b, a, back)?;
        }
        for (broker, cut) in f.cuts(&plan.bridge) {
            writeln!(out, "    at {broker}: {}", describe(cut))?;
        }
    }
    if findings.is_empty() {
        writeln!(
            out,
            "  no loops: no route takes another route's output back to where it came from"
        )?;
    }
    Ok(())
}

fn write_overlap(
    out: &mut String,
    a: &RoutePlan,
    b: &RoutePlan,
    o: &analysis::Overlap,
) -> fmt::Result {
    writeln!(
        out,
        "    {} publishes {} on {}, which {} takes with {}",
        a.name, o.output, a.to.name, b.name, o.input
    )
}

/// How `run` recognises an echo on a broker, in words.
fn describe(cut: Cut) -> &'static str {
    match cut {
        Cut::Marker => {
            "cut by the mqbridge-via marker (MQTT 5); counted as dropped{reason=\"loop\"}"
        }
        Cut::Digest => {
            "MQTT 3.x carries no marker: a short-lived digest of what this process forwarded \
             suppresses the echo (not across replicas, and an identical message within the \
             window is taken for an echo); better make the topics disjoint"
        }
        Cut::Nothing => {
            "NOT cut: loop_markers = \"off\" towards MQTT 5, or MQTT 3.x with the echo digest off \
             (bridge.loop_digest_window)"
        }
    }
}

fn write_dry_run(out: &mut String, plan: &Plan, topic: &str) -> fmt::Result {
    if let Err(e) = TopicName::parse(topic) {
        return writeln!(
            out,
            "\"{topic}\" is not a topic name ({e}); give a topic as a publisher would send it"
        );
    }
    writeln!(out, "topic \"{topic}\"")?;
    let mut taken = false;
    for route in &plan.routes {
        let Some(filter) = route.topics.iter().find(|f| f.matches(topic)) else {
            continue;
        };
        taken = true;
        writeln!(
            out,
            "  {} ({} → {}) takes it when published on {} (filter {filter})",
            route.name, route.from.name, route.to.name, route.from.name
        )?;
        let rule = route
            .rewrite
            .rules()
            .iter()
            .enumerate()
            .find_map(|(n, rule)| rule.apply(topic).map(|result| (n + 1, rule, result)));
        let rewritten = match rule {
            None => {
                writeln!(
                    out,
                    "    → \"{topic}\" on {} (unchanged: no rewrite rule matches)",
                    route.to.name
                )?;
                topic.to_owned()
            }
            Some((n, rule, Ok(rewritten))) => {
                writeln!(
                    out,
                    "    → \"{rewritten}\" on {} (rewrite {n}: {} → {})",
                    route.to.name,
                    rule.filter().as_str(),
                    rule.template()
                )?;
                rewritten
            }
            Some((n, rule, Err(e))) => {
                let fate = match &route.dead_letter {
                    Some(dl) => format!("published to \"{dl}\" on {}", route.from.name),
                    None => "logged and counted as dropped".to_owned(),
                };
                writeln!(
                    out,
                    "    → no valid topic ({e}) by rewrite {n}: {} → {}; the message is {fate}",
                    rule.filter().as_str(),
                    rule.template()
                )?;
                continue;
            }
        };
        writeln!(
            out,
            "      at QoS min(received, {}){}",
            route.qos as u8,
            if route.retain == RetainMode::Clear {
                ", retain cleared"
            } else {
                ""
            }
        )?;
        for back in plan.routes.iter().filter(|b| {
            b.from.name == route.to.name && b.topics.iter().any(|f| f.matches(&rewritten))
        }) {
            writeln!(
                out,
                "      note: {} ({} → {}) takes it again from {}",
                back.name, back.from.name, back.to.name, back.from.name
            )?;
        }
    }
    if !taken {
        writeln!(out, "  no route takes it")?;
    }
    Ok(())
}
