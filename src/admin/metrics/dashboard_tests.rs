//! `examples/grafana/mqbridge.json` asks only for what this exporter emits: every metric a query
//! names is a sample of `/metrics`, and every label it filters or groups by is on that metric.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::*;
use crate::spool::LogGauges;

const DASHBOARD: &str = include_str!("../../../examples/grafana/mqbridge.json");

/// Labels Prometheus adds to every series it scrapes: a query may use them on any metric.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];

/// Sample name → the labels on its samples.
type Exported = BTreeMap<String, BTreeSet<String>>;

/// What `/metrics` emits for a route with a spool, where every family has samples.
fn exported() -> Exported {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let _in_runtime = rt.enter(); // for mqbridge_runtime_tasks
    let route = RouteStats {
        name: "up".into(),
        source_broker: "edge".into(),
        target_broker: "cloud".into(),
        pairs: vec![Arc::new(PairStats::default())],
        spool: vec![Arc::new(LogGauges::default())],
    };
    let text = Metrics::new(RouteSet::new(vec![route])).render();
    // Each family has samples here, so each of its sample names and labels is known.
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        let sampled = text.lines().any(|l| l.starts_with(name));
        assert!(sampled, "no {name} samples in:\n{text}");
    }
    let mut out = Exported::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let series = line.rsplit_once(' ').expect("name and value").0;
        let (name, mut rest) = series.split_once('{').unwrap_or((series, ""));
        let labels = out.entry(name.to_string()).or_default();
        // `key="value",…}`: the values here are plain names and numbers.
        while let Some((key, value)) = rest.split_once("=\"") {
            labels.insert(key.to_string());
            let end = value.find('"').expect("closing quote");
            rest = value[end + 1..].trim_start_matches([',', '}']);
        }
    }
    out
}

#[derive(Debug, PartialEq)]
enum Tok {
    Ident(String),
    Str,
    Punct(char),
}

/// PromQL tokens, without numbers, durations and range brackets (`[$__rate_interval]`).
fn tokens(query: &str) -> Vec<Tok> {
    let mut out = Vec::new();
    let mut c = query.chars().peekable();
    let word = |x: &char| x.is_alphanumeric() || *x == '_' || *x == ':';
    while let Some(ch) = c.next() {
        match ch {
            '"' | '\'' | '`' => {
                while let Some(x) = c.next() {
                    match x {
                        '\\' if ch != '`' => drop(c.next()),
                        _ if x == ch => break,
                        _ => {}
                    }
                }
                out.push(Tok::Str);
            }
            '[' => while c.next().is_some_and(|x| x != ']') {},
            _ if ch.is_ascii_digit() || ch == '.' => while c.next_if(word).is_some() {},
            _ if word(&ch) => {
                let mut s = ch.to_string();
                while let Some(x) = c.next_if(word) {
                    s.push(x);
                }
                out.push(Tok::Ident(s));
            }
            _ if ch.is_whitespace() => {}
            _ => out.push(Tok::Punct(ch)),
        }
    }
    out
}

/// What is wrong with one query (nothing: empty). Its metrics are the `mqbridge_` names; its
/// labels those of `{…}` matchers (checked against their metric), and of `by (…)`,
/// `without (…)`, `on (…)`, `ignoring (…)` and `label_values(…, label)` (checked against
/// every metric of the query).
fn problems(query: &str, exported: &Exported) -> Vec<String> {
    let toks = tokens(query);
    let mut problems = Vec::new();
    let mut metrics = Vec::new();
    let mut labels: Vec<(&str, Option<&str>)> = Vec::new();
    let open = |i: usize, p: char| toks.get(i) == Some(&Tok::Punct(p));
    let mut i = 0;
    while i < toks.len() {
        if let Tok::Ident(name) = &toks[i] {
            let is_metric = name.starts_with("mqbridge_");
            let is_grouping = ["by", "without", "on", "ignoring"].contains(&name.as_str());
            if is_metric {
                metrics.push(name.as_str());
            }
            if (is_metric && open(i + 1, '{')) || (is_grouping && open(i + 1, '(')) {
                let close = if is_metric { '}' } else { ')' };
                i += 2;
                while i < toks.len() && !open(i, close) {
                    if let Tok::Ident(label) = &toks[i] {
                        labels.push((label, is_metric.then_some(name.as_str())));
                    }
                    i += 1;
                }
            }
        }
        i += 1;
    }
    if toks.first() == Some(&Tok::Ident("label_values".into())) {
        match &toks[toks.len().saturating_sub(2)..] {
            [Tok::Ident(label), Tok::Punct(')')] => labels.push((label, None)),
            _ => problems.push("label_values(metric, label) without its label".into()),
        }
    }
    if metrics.is_empty() {
        problems.push("names no mqbridge metric".into());
    }
    for metric in &metrics {
        if !exported.contains_key(*metric) {
            problems.push(format!("{metric} is not a sample of /metrics"));
        }
    }
    for (label, on) in labels {
        for metric in on.map_or(metrics.clone(), |m| vec![m]) {
            let Some(has) = exported.get(metric) else {
                continue;
            };
            if !has.contains(label) && !TARGET_LABELS.contains(&label) {
                problems.push(format!("{metric} has no label {label:?} (it has {has:?})"));
            }
        }
    }
    problems
}

/// Just enough JSON to walk the dashboard (serde_json is not a dependency).
#[derive(Debug)]
enum Json {
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
    /// A number, `true`, `false` or `null`, as written.
    Scalar(String),
}

type Chars<'a> = std::iter::Peekable<std::str::Chars<'a>>;

impl Json {
    fn parse(text: &str) -> Json {
        let mut c = text.chars().peekable();
        let v = Json::value(&mut c);
        Json::skip_ws(&mut c);
        assert_eq!(c.next(), None, "text after the JSON value");
        v
    }

    fn skip_ws(c: &mut Chars) {
        while c.next_if(|x| x.is_whitespace()).is_some() {}
    }

    fn value(c: &mut Chars) -> Json {
        Json::skip_ws(c);
        match c.peek() {
            Some('"') => Json::Str(Json::string(c)),
            Some('[') => Json::Arr(Json::list(c, ']', Json::value)),
            Some('{') => Json::Obj(Json::list(c, '}', |c| {
                Json::skip_ws(c);
                let key = Json::string(c);
                Json::skip_ws(c);
                assert_eq!(c.next(), Some(':'), "after {key:?}");
                (key, Json::value(c))
            })),
            _ => {
                let mut lit = String::new();
                while let Some(x) = c.next_if(|x| x.is_ascii_alphanumeric() || "+-.".contains(*x)) {
                    lit.push(x);
                }
                let ok =
                    ["true", "false", "null"].contains(&lit.as_str()) || lit.parse::<f64>().is_ok();
                assert!(ok, "not a JSON value: {lit:?}");
                Json::Scalar(lit)
            }
        }
    }

    /// `[…]` or `{…}`, opening bracket included.
    fn list<T>(c: &mut Chars, close: char, item: fn(&mut Chars) -> T) -> Vec<T> {
        c.next();
        let mut out = Vec::new();
        Json::skip_ws(c);
        if c.next_if_eq(&close).is_some() {
            return out;
        }
        loop {
            out.push(item(c));
            Json::skip_ws(c);
            match c.next() {
                Some(',') => {}
                Some(x) if x == close => return out,
                other => panic!("expected ',' or {close:?}, got {other:?}"),
            }
        }
    }

    fn string(c: &mut Chars) -> String {
        assert_eq!(c.next(), Some('"'));
        let mut s = String::new();
        loop {
            match c.next().expect("unterminated string") {
                '"' => return s,
                '\\' => match c.next().expect("unterminated escape") {
                    'n' => s.push('\n'),
                    't' => s.push('\t'),
                    'r' => s.push('\r'),
                    'b' => s.push('\u{8}'),
                    'f' => s.push('\u{c}'),
                    'u' => {
                        let hex: String = c.by_ref().take(4).collect();
                        let code = u32::from_str_radix(&hex, 16).expect("\\u and 4 hex digits");
                        s.push(char::from_u32(code).unwrap_or('\u{fffd}'));
                    }
                    x => s.push(x), // \" \\ \/
                },
                x => s.push(x),
            }
        }
    }

    fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(fields) => fields.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Json::Str(s)) => Some(s),
            _ => None,
        }
    }

    fn scalar(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Json::Scalar(s)) => Some(s),
            _ => None,
        }
    }

    fn items(&self, key: &str) -> &[Json] {
        match self.get(key) {
            Some(Json::Arr(items)) => items,
            _ => &[],
        }
    }
}

/// The dashboard's panels, rows' own panels included (rows themselves left out).
fn panels(dashboard: &Json) -> Vec<&Json> {
    let mut out = Vec::new();
    let mut todo: Vec<&Json> = dashboard.items("panels").iter().collect();
    while let Some(p) = todo.pop() {
        todo.extend(p.items("panels"));
        if p.str("type") != Some("row") {
            out.push(p);
        }
    }
    out
}

fn exprs(panel: &Json) -> Vec<&str> {
    panel
        .items("targets")
        .iter()
        .filter_map(|t| t.str("expr"))
        .collect()
}

fn variable<'a>(dashboard: &'a Json, name: &str) -> &'a Json {
    let templating = dashboard.get("templating").expect("templating");
    templating
        .items("list")
        .iter()
        .find(|v| v.str("name") == Some(name))
        .unwrap_or_else(|| panic!("no ${name} variable"))
}

/// Every PromQL query: the panels' and the query variables'.
fn queries(dashboard: &Json) -> Vec<&str> {
    let mut out: Vec<&str> = panels(dashboard).into_iter().flat_map(exprs).collect();
    let templating = dashboard.get("templating").expect("templating");
    for v in templating.items("list") {
        if v.str("type") == Some("query") {
            let query = v.get("query").expect("a query variable's query");
            out.extend(query.str("query").or(v.str("query")));
        }
    }
    out
}

#[test]
fn every_dashboard_query_names_exported_metrics_and_their_labels() {
    let exported = exported();
    let dashboard = Json::parse(DASHBOARD);
    let queries = queries(&dashboard);
    assert!(queries.len() >= 30, "{queries:?}");
    let wrong: Vec<String> = queries
        .iter()
        .flat_map(|q| {
            problems(q, &exported)
                .into_iter()
                .map(move |p| format!("{q}\n    {p}"))
        })
        .collect();
    assert!(
        wrong.is_empty(),
        "the dashboard asks for what /metrics does not have:\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_check_catches_what_is_not_exported() {
    let exported = exported();
    for (query, why) in [
        (
            "sum by (route) (rate(mqbridge_messages_recieved_total[1m]))",
            "misspelled",
        ),
        ("rate(mqbridge_received_total[1m])", "no such family"),
        (
            r#"mqbridge_forward_latency_seconds{route="up"}"#,
            "a histogram's samples are _bucket, _sum and _count",
        ),
        (
            "sum by (reason) (mqbridge_inflight)",
            "grouped by a label it lacks",
        ),
        (
            r#"mqbridge_pairs{broker="edge"}"#,
            "filtered by a label it lacks",
        ),
        ("label_values(mqbridge_pairs, broker)", "a label it lacks"),
        ("sum(rate(up[1m]))", "no mqbridge metric"),
    ] {
        assert!(!problems(query, &exported).is_empty(), "{why}: {query}");
    }
    let fine = r#"sum by (route, reason, instance) (rate(mqbridge_messages_dropped_total{route=~"$route",job="mqbridge"}[5m]))"#;
    assert_eq!(problems(fine, &exported), Vec::<String>::new());
}

#[test]
fn the_dashboard_has_a_panel_for_each_view_of_a_route() {
    let dashboard = Json::parse(DASHBOARD);
    let panels = panels(&dashboard);
    // What a panel must show: for each group, one of its queries holding every string.
    let wanted: &[(&str, &[&[&str]])] = &[
        (
            "received rate",
            &[&["by (route)", "rate(mqbridge_messages_received_total{"]],
        ),
        (
            "forwarded rate",
            &[&["by (route)", "rate(mqbridge_messages_forwarded_total{"]],
        ),
        (
            "in flight against window",
            &[
                &["by (route)", "mqbridge_inflight{"],
                &["by (route)", "mqbridge_window{"],
            ],
        ),
        (
            "drops by reason",
            &[&["by (route, reason)", "mqbridge_messages_dropped_total{"]],
        ),
        (
            "latency quantiles",
            &[&[
                "histogram_quantile(0.99",
                "by (route, le)",
                "mqbridge_forward_latency_seconds_bucket{",
            ]],
        ),
        (
            "reconnects",
            &[&["by (route, broker)", "mqbridge_reconnects_total{"]],
        ),
        (
            "pairs ready against pairs",
            &[
                &["by (route)", "mqbridge_pairs_ready{"],
                &["by (route)", "mqbridge_pairs{"],
            ],
        ),
        (
            "dead letters",
            &[&["by (route)", "mqbridge_dead_lettered_total{"]],
        ),
        (
            "redeliveries",
            &[&["by (route)", "mqbridge_redeliveries_total{"]],
        ),
        (
            "spool backlog",
            &[&["by (route)", "mqbridge_spool_messages{"]],
        ),
    ];
    for (what, groups) in wanted {
        let shown = panels.iter().any(|p| {
            let exprs = exprs(p);
            groups
                .iter()
                .all(|g| exprs.iter().any(|e| g.iter().all(|s| e.contains(s))))
        });
        assert!(shown, "no panel shows {what}");
    }
    let heatmap = panels.iter().find(|p| p.str("type") == Some("heatmap"));
    let heatmap = heatmap.expect("a latency heatmap");
    assert!(exprs(heatmap)[0].contains("mqbridge_forward_latency_seconds_bucket{"));

    let mut ids = BTreeSet::new();
    for &p in &panels {
        let title = p.str("title").unwrap_or("untitled");
        assert!(p.str("description").is_some(), "{title}: no description");
        for source in [p].into_iter().chain(p.items("targets")) {
            let uid = source.get("datasource").and_then(|d| d.str("uid"));
            assert_eq!(uid, Some("${datasource}"), "{title}");
        }
        let id = p.scalar("id").unwrap_or_else(|| panic!("{title}: no id"));
        assert!(ids.insert(id), "{title}: id {id} taken");
        // Every metric of every query follows the $instance and (routes') $route choice.
        for e in exprs(p) {
            let metrics = e.matches("mqbridge_").count();
            assert_eq!(
                e.matches(r#"instance=~"$instance""#).count(),
                metrics,
                "{e}"
            );
            if !e.contains("mqbridge_runtime_tasks") {
                assert_eq!(e.matches(r#"route=~"$route""#).count(), metrics, "{e}");
            }
        }
    }
    assert_eq!(
        variable(&dashboard, "datasource").str("query"),
        Some("prometheus")
    );
    for name in ["instance", "route"] {
        let v = variable(&dashboard, name);
        assert_eq!(v.scalar("multi"), Some("true"), "${name}");
        assert_eq!(v.scalar("includeAll"), Some("true"), "${name}");
    }
}
