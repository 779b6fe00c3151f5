//! Topic rewriting (SPEC §3): ordered rules `match` filter → `to` template, first match wins.
//! Templates are compiled once into segments so that applying a rule on the per-message hot
//! path is one match, a few substring lookups and a single allocation.

use std::borrow::Cow;

use super::name::{self, MAX_LEN};
use super::{TopicError, TopicFilter};

/// Why a rewrite rule does not compile. Each message names the offending part and the fix;
/// the config layer prefixes it with the key (`routes[1].rewrite[0].to: ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RewriteError {
    // Not named `source`: the reason is part of the message, and a source would make
    // anyhow's `{:#}` print it twice.
    #[error("the match filter \"{filter}\" is invalid: {reason}")]
    InvalidFilter { filter: String, reason: TopicError },
    #[error("the template yields an invalid topic: {0}")]
    InvalidTemplate(TopicError),
    #[error("\"{{0}}\": placeholders count from 1 ({{1}} is the first wildcard of the filter)")]
    ZeroIndex,
    #[error(
        "\"{{{placeholder}}}\" but the filter \"{filter}\" has {wildcards} wildcard{}",
        if *.wildcards == 1 { "" } else { "s" }
    )]
    IndexOutOfRange {
        placeholder: String,
        filter: String,
        wildcards: usize,
    },
    #[error("unknown placeholder \"{{{placeholder}}}\": use {}", choices(*.wildcards))]
    UnknownPlaceholder {
        placeholder: String,
        wildcards: usize,
    },
    #[error("unbalanced '{0}' in the template (literal braces are not supported)")]
    UnbalancedBrace(char),
}

/// The placeholders a filter with `wildcards` wildcards offers, for error messages.
fn choices(wildcards: usize) -> String {
    match wildcards {
        0 => "{topic} (the filter has no wildcards)".to_owned(),
        1 => "{1} or {topic}".to_owned(),
        n => format!("{{1}}..{{{n}}} or {{topic}}"),
    }
}

/// One piece of a compiled template. Placeholders are resolved to topic level positions at
/// compile time, so applying never looks at the filter again.
#[derive(Debug, Clone)]
enum Segment {
    Literal(String),
    /// The single topic level at this index (a `+` capture).
    Level(usize),
    /// All topic levels from this index on, slashes kept (the `#` capture). `slash` is the
    /// `/` the template had just before the placeholder, written only if `#` matched at
    /// least one level, so that `a/#` → `b/{1}` maps `a` to `b` rather than `b/`.
    Rest {
        level: usize,
        slash: bool,
    },
    /// The whole source topic.
    Topic,
}

/// One compiled rule: a filter and the template that rewrites the topics it matches.
#[derive(Debug, Clone)]
pub struct RewriteRule {
    filter: TopicFilter,
    template: String,
    segments: Vec<Segment>,
    /// Sum of the literal lengths, to size the output in one allocation.
    literal_len: usize,
}

impl RewriteRule {
    /// Parses the filter and the template, and checks statically everything that can be:
    /// placeholder indices, braces, and literal parts that no topic name may contain.
    pub fn compile(match_filter: &str, to: &str) -> Result<RewriteRule, RewriteError> {
        let filter =
            TopicFilter::parse(match_filter).map_err(|reason| RewriteError::InvalidFilter {
                filter: match_filter.to_owned(),
                reason,
            })?;
        let segments = compile_template(&filter, to)?;
        let literal_len = segments
            .iter()
            .map(|s| match s {
                Segment::Literal(l) => l.len(),
                Segment::Rest { slash: true, .. } => 1,
                _ => 0,
            })
            .sum();
        if literal_len > MAX_LEN {
            return Err(RewriteError::InvalidTemplate(TopicError::TooLong));
        }
        Ok(RewriteRule {
            filter,
            template: to.to_owned(),
            segments,
            literal_len,
        })
    }

    pub fn filter(&self) -> &TopicFilter {
        &self.filter
    }

    pub fn template(&self) -> &str {
        &self.template
    }

    /// Rewrites `topic` if the rule's filter matches it.
    ///
    /// `None`: the rule does not match. `Some(Err)`: it matched but the result is not a valid
    /// topic name (empty, a wildcard, a NUL, too long), which the caller dead-letters.
    pub fn apply(&self, topic: &str) -> Option<Result<String, TopicError>> {
        if !self.filter.matches(topic) {
            return None;
        }
        // Captures are usually disjoint parts of the topic, so this is almost always exact.
        let mut out = String::with_capacity(self.literal_len + topic.len());
        for segment in &self.segments {
            match segment {
                Segment::Literal(l) => out.push_str(l),
                Segment::Topic => out.push_str(topic),
                Segment::Level(i) => {
                    // The filter matched, so the level exists.
                    let rest = rest_from(topic, *i).unwrap_or_default();
                    out.push_str(rest.split_once('/').map_or(rest, |(level, _)| level));
                }
                Segment::Rest { level, slash } => {
                    // `None` when `#` matched no level (`a/#` on `a`): nothing to write, not
                    // even the separator.
                    if let Some(rest) = rest_from(topic, *level) {
                        if *slash {
                            out.push('/');
                        }
                        out.push_str(rest);
                    }
                }
            }
        }
        Some(name::validate(&out).map(|()| out))
    }
}

/// The part of `topic` from level `index` (0-based) on, or `None` if it has fewer levels.
fn rest_from(topic: &str, index: usize) -> Option<&str> {
    if index == 0 {
        return Some(topic);
    }
    topic
        .match_indices('/')
        .nth(index - 1)
        .map(|(at, _)| &topic[at + 1..])
}

/// Splits the template into literals and placeholders, resolving each placeholder against
/// the filter's wildcards.
fn compile_template(filter: &TopicFilter, to: &str) -> Result<Vec<Segment>, RewriteError> {
    if to.is_empty() {
        return Err(RewriteError::InvalidTemplate(TopicError::Empty));
    }
    // Topic level index of each wildcard, in order: `{n}` is `wildcard_levels[n - 1]`.
    let wildcard_levels: Vec<usize> = filter
        .as_str()
        .split('/')
        .enumerate()
        .filter(|(_, level)| matches!(*level, "+" | "#"))
        .map(|(i, _)| i)
        .collect();

    let mut segments = Vec::new();
    let mut rest = to;
    while !rest.is_empty() {
        let literal_end = rest.find(['{', '}']).unwrap_or(rest.len());
        if literal_end > 0 {
            let literal = &rest[..literal_end];
            check_literal(literal)?;
            segments.push(Segment::Literal(literal.to_owned()));
        }
        rest = &rest[literal_end..];
        if rest.starts_with('}') {
            return Err(RewriteError::UnbalancedBrace('}'));
        }
        if rest.is_empty() {
            break;
        }
        // `rest` starts with '{'; the placeholder runs to the next '}' with no '{' inside.
        let close = rest.find('}').ok_or(RewriteError::UnbalancedBrace('{'))?;
        let placeholder = &rest[1..close];
        if placeholder.contains('{') {
            return Err(RewriteError::UnbalancedBrace('{'));
        }
        let segment = resolve(filter, &wildcard_levels, placeholder)?;
        if let Segment::Rest { level, .. } = segment {
            // Take the separator before `#`'s capture out of the literal, to write it only
            // when the capture has levels.
            let slash = match segments.last_mut() {
                Some(Segment::Literal(l)) if l.ends_with('/') => {
                    l.pop();
                    if l.is_empty() {
                        segments.pop();
                    }
                    true
                }
                _ => false,
            };
            segments.push(Segment::Rest { level, slash });
        } else {
            segments.push(segment);
        }
        rest = &rest[close + 1..];
    }
    Ok(segments)
}

/// A literal part may be anything a topic name may contain.
fn check_literal(literal: &str) -> Result<(), RewriteError> {
    if literal.contains('\0') {
        return Err(RewriteError::InvalidTemplate(TopicError::Nul));
    }
    if literal.contains(['+', '#']) {
        return Err(RewriteError::InvalidTemplate(TopicError::Wildcard));
    }
    Ok(())
}

fn resolve(
    filter: &TopicFilter,
    wildcard_levels: &[usize],
    placeholder: &str,
) -> Result<Segment, RewriteError> {
    if placeholder == "topic" {
        return Ok(Segment::Topic);
    }
    let wildcards = wildcard_levels.len();
    // Only plain decimal digits: `usize::from_str` would also take "+1".
    if placeholder.is_empty() || !placeholder.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RewriteError::UnknownPlaceholder {
            placeholder: placeholder.to_owned(),
            wildcards,
        });
    }
    let out_of_range = || RewriteError::IndexOutOfRange {
        placeholder: placeholder.to_owned(),
        filter: filter.as_str().to_owned(),
        wildcards,
    };
    // Digits that overflow are out of range too.
    let index: usize = placeholder.parse().map_err(|_| out_of_range())?;
    if index == 0 {
        return Err(RewriteError::ZeroIndex);
    }
    let level = *wildcard_levels.get(index - 1).ok_or_else(out_of_range)?;
    if index == wildcards && filter.ends_with_multi() {
        Ok(Segment::Rest {
            level,
            slash: false,
        })
    } else {
        Ok(Segment::Level(level))
    }
}

/// A route's ordered rewrite rules: the first rule whose filter matches decides.
#[derive(Debug, Clone, Default)]
pub struct Rewrite {
    rules: Vec<RewriteRule>,
}

impl Rewrite {
    pub fn new(rules: Vec<RewriteRule>) -> Rewrite {
        Rewrite { rules }
    }

    pub fn rules(&self) -> &[RewriteRule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The rewritten topic: unchanged and borrowed when no rule matches (the common case for
    /// routes without rewrites costs nothing), else the first matching rule's result.
    pub fn apply<'a>(&self, topic: &'a str) -> Result<Cow<'a, str>, TopicError> {
        self.rules
            .iter()
            .find_map(|rule| rule.apply(topic))
            .map_or(Ok(Cow::Borrowed(topic)), |result| result.map(Cow::Owned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rule(filter: &str, to: &str) -> RewriteRule {
        RewriteRule::compile(filter, to).unwrap()
    }

    fn rewritten(filter: &str, to: &str, topic: &str) -> Option<Result<String, TopicError>> {
        rule(filter, to).apply(topic)
    }

    #[test]
    fn spec_example() {
        let r = rule("factory/+/telemetry/#", "sites/edge-1/{1}/telemetry/{2}");
        assert_eq!(r.filter().as_str(), "factory/+/telemetry/#");
        assert_eq!(r.template(), "sites/edge-1/{1}/telemetry/{2}");
        assert_eq!(
            r.apply("factory/line-3/telemetry/temp/celsius"),
            Some(Ok("sites/edge-1/line-3/telemetry/temp/celsius".into()))
        );
        assert_eq!(
            r.apply("factory/line-3/telemetry"),
            Some(Ok("sites/edge-1/line-3/telemetry".into()))
        );
        assert_eq!(r.apply("factory/line-3/status"), None);
    }

    #[test]
    fn empty_multi_level_capture_drops_the_slash_before_it() {
        assert_eq!(rewritten("a/#", "b/{1}", "a"), Some(Ok("b".into())));
        assert_eq!(rewritten("a/#", "b/{1}", "a/x/y"), Some(Ok("b/x/y".into())));
        assert_eq!(rewritten("a/#", "b/{1}/c", "a"), Some(Ok("b/c".into())));
        assert_eq!(rewritten("a/#", "{1}/b", "a/x"), Some(Ok("x/b".into())));
    }

    #[test]
    fn a_multi_level_capture_of_one_empty_level_keeps_the_slash() {
        // "a/" has an empty second level: `#` matched it, so the prefix rename stays
        // reversible ("a/" → "b/", not "b" which is where "a" goes).
        assert_eq!(rewritten("a/#", "b/{1}", "a/"), Some(Ok("b/".into())));
        assert_eq!(rewritten("a/#", "b/{1}", "a//x"), Some(Ok("b//x".into())));
    }

    #[test]
    fn single_level_captures_are_exact_levels() {
        assert_eq!(rewritten("+/+", "{2}/{1}", "a/b"), Some(Ok("b/a".into())));
        assert_eq!(rewritten("a/+/c", "x/{1}", "a//c"), Some(Ok("x/".into())));
        assert_eq!(rewritten("+/a", "{1}x", "/a"), Some(Ok("x".into())));
        assert_eq!(rewritten("+", "{1}/{1}", "a"), Some(Ok("a/a".into())));
    }

    #[test]
    fn whole_topic_placeholder() {
        assert_eq!(
            rewritten("#", "mirror/{topic}", "a/b"),
            Some(Ok("mirror/a/b".into()))
        );
        assert_eq!(
            rewritten("a", "{topic}/{topic}", "a"),
            Some(Ok("a/a".into()))
        );
        assert_eq!(rewritten("a/b", "c", "a/b"), Some(Ok("c".into())));
    }

    #[test]
    fn result_that_is_no_topic_name_is_an_error() {
        assert_eq!(rewritten("a/#", "{1}", "a"), Some(Err(TopicError::Empty)));
        assert_eq!(rewritten("+/x", "{1}", "/x"), Some(Err(TopicError::Empty)));
        let long = "x".repeat(MAX_LEN);
        assert_eq!(
            rewritten("+", "y/{1}", &long),
            Some(Err(TopicError::TooLong))
        );
        // A caller handing in a topic that is no valid name gets it back as an error.
        assert_eq!(
            rewritten("#", "{topic}", "a/+"),
            Some(Err(TopicError::Wildcard))
        );
    }

    #[test]
    fn dollar_topics_are_not_rewritten_by_leading_wildcards() {
        assert_eq!(rewritten("#", "b/{1}", "$SYS/x"), None);
        assert_eq!(rewritten("+/x", "b/{1}", "$SYS/x"), None);
        assert_eq!(
            rewritten("$SYS/#", "b/{1}", "$SYS/x"),
            Some(Ok("b/x".into()))
        );
    }

    #[test]
    fn compile_rejects_bad_filters() {
        let err = RewriteRule::compile("a/#/b", "x").unwrap_err();
        assert_eq!(
            err,
            RewriteError::InvalidFilter {
                filter: "a/#/b".into(),
                reason: TopicError::BadMultiLevel
            }
        );
        assert!(
            err.to_string()
                .starts_with("the match filter \"a/#/b\" is invalid: ")
        );
    }

    #[test]
    fn compile_rejects_placeholders_beyond_the_wildcards() {
        let err = RewriteRule::compile("a/+/#", "x/{3}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"{3}\" but the filter \"a/+/#\" has 2 wildcards"
        );
        let err = RewriteRule::compile("a/+", "{2}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "\"{2}\" but the filter \"a/+\" has 1 wildcard"
        );
        let err = RewriteRule::compile("a", "{99999999999999999999999}").unwrap_err();
        assert!(matches!(
            err,
            RewriteError::IndexOutOfRange { wildcards: 0, .. }
        ));
    }

    #[test]
    fn compile_rejects_index_zero() {
        let err = RewriteRule::compile("a/+", "{0}").unwrap_err();
        assert_eq!(err, RewriteError::ZeroIndex);
        assert!(err.to_string().contains("count from 1"));
    }

    #[test]
    fn compile_rejects_unknown_placeholders() {
        let err = RewriteRule::compile("a/+/#", "{x}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown placeholder \"{x}\": use {1}..{2} or {topic}"
        );
        for p in ["{}", "{+1}", "{ 1}", "{Topic}", "{-1}", "{1.0}"] {
            assert!(
                matches!(
                    RewriteRule::compile("+", p),
                    Err(RewriteError::UnknownPlaceholder { .. })
                ),
                "{p}"
            );
        }
        let err = RewriteRule::compile("a", "{1x}").unwrap_err();
        assert!(
            err.to_string()
                .ends_with("use {topic} (the filter has no wildcards)")
        );
    }

    #[test]
    fn compile_rejects_unbalanced_braces() {
        for t in ["{", "a/{1", "{{1}}", "a{b{1}", "{1}{"] {
            assert_eq!(
                RewriteRule::compile("+", t).unwrap_err(),
                RewriteError::UnbalancedBrace('{'),
                "{t}"
            );
        }
        for t in ["}", "a}", "{1}}", "}{1}"] {
            assert_eq!(
                RewriteRule::compile("+", t).unwrap_err(),
                RewriteError::UnbalancedBrace('}'),
                "{t}"
            );
        }
        assert_eq!(
            RewriteError::UnbalancedBrace('{').to_string(),
            "unbalanced '{' in the template (literal braces are not supported)"
        );
    }

    #[test]
    fn compile_rejects_templates_that_cannot_be_topic_names() {
        let invalid = |t: &str| RewriteRule::compile("+", t).unwrap_err();
        assert_eq!(
            invalid(""),
            RewriteError::InvalidTemplate(TopicError::Empty)
        );
        assert_eq!(
            invalid("a/+"),
            RewriteError::InvalidTemplate(TopicError::Wildcard)
        );
        assert_eq!(
            invalid("{1}/#"),
            RewriteError::InvalidTemplate(TopicError::Wildcard)
        );
        assert_eq!(
            invalid("a\0{1}"),
            RewriteError::InvalidTemplate(TopicError::Nul)
        );
        assert_eq!(
            invalid(&"a".repeat(MAX_LEN + 1)),
            RewriteError::InvalidTemplate(TopicError::TooLong)
        );
        assert_eq!(
            invalid("a/+").to_string(),
            "the template yields an invalid topic: \
             contains a wildcard ('+' or '#'), which a topic name may not"
        );
    }

    #[test]
    fn first_matching_rule_wins() {
        let rewrite = Rewrite::new(vec![
            rule("a/special", "special"),
            rule("a/+", "generic/{1}"),
            rule("#", "never/{1}"),
        ]);
        assert_eq!(rewrite.rules().len(), 3);
        assert!(!rewrite.is_empty());
        assert_eq!(rewrite.apply("a/special").unwrap(), "special");
        assert_eq!(rewrite.apply("a/x").unwrap(), "generic/x");
        assert_eq!(rewrite.apply("b").unwrap(), "never/b");
    }

    #[test]
    fn no_match_borrows_the_topic_unchanged() {
        let rewrite = Rewrite::new(vec![rule("a/#", "b/{1}")]);
        assert!(matches!(rewrite.apply("c/d"), Ok(Cow::Borrowed("c/d"))));
        assert!(matches!(rewrite.apply("a/d"), Ok(Cow::Owned(t)) if t == "b/d"));
        let none = Rewrite::default();
        assert!(none.is_empty());
        assert!(matches!(none.apply("x"), Ok(Cow::Borrowed("x"))));
    }

    #[test]
    fn an_invalid_result_stops_at_the_first_match() {
        // The first match decides even when its result is invalid: later rules are not a
        // fallback, or a typo would silently send messages elsewhere.
        let rewrite = Rewrite::new(vec![rule("a/#", "{1}"), rule("#", "fallback")]);
        assert_eq!(rewrite.apply("a"), Err(TopicError::Empty));
    }

    const LITERALS: [&str; 4] = ["a", "b", "$s", ""];

    fn filter_levels() -> impl Strategy<Value = Vec<&'static str>> {
        let level = prop_oneof![prop::sample::select(&LITERALS[..]), Just("+")];
        (prop::collection::vec(level, 0..=3), any::<bool>())
            .prop_map(|(mut levels, multi)| {
                if multi {
                    levels.push("#");
                }
                levels
            })
            .prop_filter("a filter is non-empty", |l| !l.join("/").is_empty())
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(&LITERALS[..]), 1..=5)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("a topic name is non-empty", |t| !t.is_empty())
    }

    proptest! {
        #[test]
        fn whole_topic_template_is_the_identity(f in filter_levels(), t in topic()) {
            let r = rule(&f.join("/"), "{topic}");
            match r.apply(&t) {
                Some(result) => prop_assert_eq!(result, Ok(t.clone())),
                None => prop_assert!(!r.filter().matches(&t)),
            }
        }

        #[test]
        fn applies_exactly_when_the_filter_matches(f in filter_levels(), t in topic()) {
            let r = rule(&f.join("/"), "x");
            prop_assert_eq!(r.apply(&t).is_some(), r.filter().matches(&t));
        }

        #[test]
        fn joining_all_captures_agrees_with_the_reference(
            f in filter_levels().prop_filter("a wildcard to capture", |f| {
                f.iter().any(|l| matches!(*l, "+" | "#"))
            }),
            t in topic(),
        ) {
            let k = f.iter().filter(|l| matches!(**l, "+" | "#")).count();
            let template = (1..=k).map(|i| format!("{{{i}}}")).collect::<Vec<_>>().join("/");
            let r = rule(&f.join("/"), &template);
            let Some(result) = r.apply(&t) else { return Ok(()) };
            // The captures straight from the level lists: `Some` for each `+`, and for `#`
            // the remaining levels or `None` when there are none.
            let levels: Vec<&str> = t.split('/').collect();
            let captures: Vec<Option<String>> = f
                .iter()
                .enumerate()
                .filter_map(|(i, l)| match *l {
                    "+" => Some(Some(levels[i].to_owned())),
                    "#" => Some((i < levels.len()).then(|| levels[i..].join("/"))),
                    _ => None,
                })
                .collect();
            let expected = captures.iter().flatten().cloned().collect::<Vec<_>>().join("/");
            if expected.is_empty() {
                // Only possible when every capture is empty.
                prop_assert!(captures.iter().flatten().all(String::is_empty));
                prop_assert_eq!(result, Err(TopicError::Empty));
            } else {
                prop_assert_eq!(result, Ok(expected));
            }
        }

        #[test]
        fn prefix_rename_is_reversible(rest in topic(), bare in any::<bool>()) {
            // Moving "src/#" to "dst/#" and back returns every topic unchanged, including
            // "src" itself and topics with empty levels.
            let there = rule("src/#", "dst/{1}");
            let back = rule("dst/#", "src/{1}");
            let t = if bare { "src".to_owned() } else { format!("src/{rest}") };
            let moved = there.apply(&t).unwrap().unwrap();
            prop_assert_eq!(back.apply(&moved), Some(Ok(t)));
        }

        #[test]
        fn compile_never_panics(f in "[a+#/]{0,5}", to in "[a{}0-3topic/+#]{0,10}") {
            let _ = RewriteRule::compile(&f, &to);
        }

        #[test]
        fn compile_never_panics_on_anything(f in any::<String>(), to in any::<String>()) {
            let _ = RewriteRule::compile(&f, &to);
        }

        #[test]
        fn compiled_rules_never_panic_when_applied(
            f in filter_levels(),
            to in "[a{}1-3/]{1,10}",
            t in "[a$/+#]{0,8}",
        ) {
            if let Ok(r) = RewriteRule::compile(&f.join("/"), &to) {
                let _ = r.apply(&t);
            }
        }
    }
}
