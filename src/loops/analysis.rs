//! Which routes could send each other's messages around in circles, and what cuts each loop:
//! the marker where the echo lands on an MQTT 5 broker, the digest where it lands on a 3.x one.
//! `check` prints this; loading refuses a configuration with a loop nothing can cut.

use crate::{
    config::{BridgePlan, BrokerPlan, LoopMarkers, Plan, RoutePlan},
    topic::{RewriteRule, TopicFilter},
};

/// Where one route's output lands in another route's input.
#[derive(Debug, Clone)]
pub struct Overlap<'a> {
    pub output: TopicFilter,
    pub input: &'a TopicFilter,
}

/// How an echo landing on a broker is recognised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// MQTT 5: the `mqbridge-via` user property.
    Marker,
    /// MQTT 3.x: the echo digest of recent forwards.
    Digest,
    /// MQTT 3.x with the digest turned off: nothing recognises it.
    Nothing,
}

impl Cut {
    /// How an echo of `route`'s output is recognised where it lands (`route.to`), as far as
    /// this config shows: `route` writes markers there unless its `loop_markers` is "off" (in
    /// a loop, "auto" writes them).
    pub fn of(route: &RoutePlan, bridge: &BridgePlan) -> Cut {
        Cut::at(&route.to, route.loop_markers != LoopMarkers::Off, bridge)
    }

    /// How an echo landing on `broker` is recognised, `markers` telling whether whoever wrote
    /// it there added loop markers.
    pub fn at(broker: &BrokerPlan, markers: bool, bridge: &BridgePlan) -> Cut {
        if broker.protocol.is_v5() {
            // The digest is for 3.x brokers only (MQTT 5 has the markers).
            if markers { Cut::Marker } else { Cut::Nothing }
        } else if !bridge.loop_digest_window.is_zero() && bridge.loop_digest_capacity > 0 {
            Cut::Digest
        } else {
            Cut::Nothing
        }
    }
}

/// Two routes (or one route from a broker to itself) whose outputs come back.
#[derive(Debug)]
pub struct Finding<'a> {
    /// `a` publishes on `a.to` what `b` takes back (`there`), and, for a loop, `b` publishes on
    /// `b.to` what `a` takes back (`back`).
    pub a: &'a RoutePlan,
    pub b: &'a RoutePlan,
    pub there: Overlap<'a>,
    pub back: Option<Overlap<'a>>,
}

impl Finding<'_> {
    pub fn is_loop(&self) -> bool {
        self.back.is_some() || std::ptr::eq(self.a, self.b)
    }

    /// The cuts of this finding: at `a.to` for `a`'s output, at `b.to` for `b`'s (loops only).
    pub fn cuts(&self, bridge: &BridgePlan) -> Vec<(&str, Cut)> {
        let mut cuts = vec![(self.a.to.name.as_str(), Cut::of(self.a, bridge))];
        if self.back.is_some() && !std::ptr::eq(self.a, self.b) {
            cuts.push((self.b.to.name.as_str(), Cut::of(self.b, bridge)));
        }
        cuts
    }
}

/// Every pair of routes in opposite directions (and route from a broker to itself) whose
/// output the other takes back.
pub fn find(plan: &Plan) -> Vec<Finding<'_>> {
    let mut found = Vec::new();
    let routes = &plan.routes;
    for (i, a) in routes.iter().enumerate() {
        for b in &routes[i..] {
            if !(a.from.name == b.to.name && a.to.name == b.from.name) {
                continue;
            }
            match (takes_output(a, b), takes_output(b, a)) {
                (Some(there), back) => found.push(Finding { a, b, there, back }),
                (None, Some(back)) => found.push(Finding {
                    a: b,
                    b: a,
                    there: back,
                    back: None,
                }),
                (None, None) => {}
            }
        }
    }
    found
}

/// Why the plan has a loop nothing can cut, if it has one.
pub fn uncuttable(plan: &Plan) -> Option<String> {
    find(plan).into_iter().find_map(|f| {
        let cuts = f.cuts(&plan.bridge);
        (f.is_loop() && cuts.iter().all(|(_, c)| *c == Cut::Nothing)).then(|| {
            format!(
                "routes {} and {} send each other's messages around forever: nothing marks \
                 what reaches {} (MQTT 3.x with the echo digest off, or loop_markers = \"off\"); \
                 set loop_markers = \"always\" or \"auto\" towards an MQTT 5 broker, \
                 loop_digest_window (e.g. \"10s\") towards a 3.x one, or make the topics disjoint",
                f.a.name,
                f.b.name,
                cuts.iter()
                    .map(|(b, _)| *b)
                    .collect::<Vec<_>>()
                    .join(" and ")
            )
        })
    })
}

/// Whether `route` adds loop markers to what it forwards (to an MQTT 5 target): always with
/// `loop_markers = "always"`, never with "off", and with "auto" when this config has a loop
/// through it (`find`).
pub fn writes_markers(plan: &Plan, route: &RoutePlan) -> bool {
    route.to.protocol.is_v5()
        && match route.loop_markers {
            LoopMarkers::Always => true,
            LoopMarkers::Off => false,
            LoopMarkers::Auto => find(plan)
                .iter()
                .any(|f| f.is_loop() && (f.a.name == route.name || f.b.name == route.name)),
        }
}

/// Whether a route must remember what it forwards (its target speaks 3.x and some route reads
/// from it), and whether it must look for echoes (its source speaks 3.x and some route writes
/// to it). Both only where the digest is on.
pub fn digest_roles(plan: &Plan, route: &RoutePlan) -> (bool, bool) {
    let on = !plan.bridge.loop_digest_window.is_zero() && plan.bridge.loop_digest_capacity > 0;
    let record = on
        && !route.to.protocol.is_v5()
        && plan.routes.iter().any(|r| r.from.name == route.to.name);
    let check = on
        && !route.from.protocol.is_v5()
        && plan.routes.iter().any(|r| r.to.name == route.from.name);
    (record, check)
}

/// The first place where something `a` publishes is subscribed by `b` (which must read from
/// `a`'s target).
pub fn takes_output<'b>(a: &RoutePlan, b: &'b RoutePlan) -> Option<Overlap<'b>> {
    output_filters(a).into_iter().find_map(|output| {
        b.topics
            .iter()
            .find(|input| output.overlaps(input))
            .map(|input| Overlap { output, input })
    })
}

/// Filters covering every topic `route` can publish: its topics as they are where no rule
/// covers them, and each overlapping rule's template with captures widened to wildcards.
/// Conservative: it may claim a little more than the route can produce, never less.
pub fn output_filters(route: &RoutePlan) -> Vec<TopicFilter> {
    let mut outputs: Vec<TopicFilter> = Vec::new();
    let mut push = |f: TopicFilter| {
        if !outputs.contains(&f) {
            outputs.push(f);
        }
    };
    for topic in &route.topics {
        let mut covered = false;
        for rule in route.rewrite.rules() {
            if rule.filter().overlaps(topic) {
                push(template_filter(rule));
            }
            if covers(rule.filter(), topic) {
                // Every topic of this filter stops at this rule.
                covered = true;
                break;
            }
        }
        if !covered {
            push(topic.clone());
        }
    }
    outputs
}

/// A filter matching every topic the rule's template can produce: a level holding a `+`
/// capture becomes `+`, and from a level holding a multi-level capture (the `#` capture or
/// `{topic}`) on, `#`.
pub fn template_filter(rule: &RewriteRule) -> TopicFilter {
    let filter = rule.filter();
    let multi = filter
        .ends_with_multi()
        .then(|| format!("{{{}}}", filter.wildcards()));
    let mut levels = Vec::new();
    for level in rule.template().split('/') {
        if level.contains("{topic}") || multi.as_deref().is_some_and(|m| level.contains(m)) {
            levels.push("#");
            break;
        }
        levels.push(if level.contains('{') { "+" } else { level });
    }
    TopicFilter::parse(&levels.join("/"))
        .unwrap_or_else(|_| TopicFilter::parse("#").expect("\"#\" is a valid filter"))
}

/// Whether every topic `inner` matches is matched by `outer` too.
pub fn covers(outer: &TopicFilter, inner: &TopicFilter) -> bool {
    let o = outer.as_str();
    let i = inner.as_str();
    // A leading wildcard does not match `$` topics, which a literal `$…` level does.
    if (o.starts_with('+') || o.starts_with('#')) && i.starts_with('$') {
        return false;
    }
    let mut outer = o.split('/');
    let mut inner = i.split('/');
    loop {
        match (outer.next(), inner.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(level)) if level != "#" => {}
            (Some(a), Some(b)) if a == b && a != "+" && a != "#" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn covering_is_containment() {
        assert!(covers(&filter("#"), &filter("a/+/b")));
        assert!(covers(&filter("a/+"), &filter("a/b")));
        assert!(covers(&filter("a/#"), &filter("a")));
        assert!(!covers(&filter("a/+"), &filter("a/#")));
        assert!(!covers(&filter("a/b"), &filter("a/+")));
        assert!(!covers(&filter("a"), &filter("a/#")));
        assert!(!covers(&filter("#"), &filter("$SYS/#")));
    }

    #[test]
    fn templates_widen_to_filters() {
        let rule = |f: &str, t: &str| RewriteRule::compile(f, t).unwrap();
        let out = |f: &str, t: &str| template_filter(&rule(f, t)).as_str().to_owned();
        assert_eq!(
            out("factory/+/telemetry/#", "sites/edge-1/{1}/telemetry/{2}"),
            "sites/edge-1/+/telemetry/#"
        );
        assert_eq!(out("a/#", "b/{1}/c"), "b/#");
        assert_eq!(out("+/x", "p-{1}/y"), "+/y");
        assert_eq!(out("a/b", "c/{topic}"), "c/#");
        assert_eq!(out("a/b", "c"), "c");
    }
}
