//! A validated MQTT topic filter and the MQTT matching rules: what routes subscribe to and
//! what rewrite rules match on. `overlaps` answers "could one message match both?", which
//! the loop analysis needs before any socket opens.

use std::fmt;
use std::str::FromStr;

use super::TopicError;
use super::name::MAX_LEN;

/// A topic filter: `+` stands for exactly one level, a final `#` for any number of remaining
/// levels (zero included: `a/#` matches `a`).
///
/// Invariant: `raw` satisfies the MQTT filter rules, and `wildcards`/`multi` describe it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicFilter {
    raw: String,
    /// `+` levels plus one for a final `#`; cached because rewrite compilation and the loop
    /// analysis ask often.
    wildcards: usize,
    multi: bool,
}

impl TopicFilter {
    /// Validates `s` against the MQTT filter rules: non-empty, at most 65535 bytes, no NUL,
    /// `+` only as a whole level, `#` only as the whole last level.
    pub fn parse(s: &str) -> Result<TopicFilter, TopicError> {
        if s.is_empty() {
            return Err(TopicError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(TopicError::TooLong);
        }
        if s.contains('\0') {
            return Err(TopicError::Nul);
        }
        let mut wildcards = 0;
        let mut multi = false;
        let mut levels = s.split('/').peekable();
        while let Some(level) = levels.next() {
            match level {
                "+" => wildcards += 1,
                "#" if levels.peek().is_none() => {
                    wildcards += 1;
                    multi = true;
                }
                _ if level.contains('#') => return Err(TopicError::BadMultiLevel),
                _ if level.contains('+') => return Err(TopicError::BadSingleLevel),
                _ => {}
            }
        }
        Ok(TopicFilter {
            raw: s.to_owned(),
            wildcards,
            multi,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether the topic name `topic` matches this filter, per MQTT: levels are compared one
    /// by one, empty levels count (`a//b` has three), and a topic starting with `$` is not
    /// matched by a filter whose first level is a wildcard (so `#` does not see `$SYS/...`).
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$') && self.starts_with_wildcard() {
            return false;
        }
        let mut filter = self.raw.split('/');
        let mut levels = topic.split('/');
        loop {
            match (filter.next(), levels.next()) {
                // `#` also covers "no level left": `a/#` matches `a`.
                (Some("#"), _) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(t)) if f == t => {}
                (None, None) => return true,
                _ => return false,
            }
        }
    }

    /// The number of `+` levels, plus one if the filter ends with `#`: the placeholders
    /// `{1}..{n}` a rewrite template may use.
    pub fn wildcards(&self) -> usize {
        self.wildcards
    }

    /// Whether the last level is `#`.
    pub fn ends_with_multi(&self) -> bool {
        self.multi
    }

    /// Whether some topic name could match both filters. Conservative in no direction: it is
    /// exact, including the `$` rule (`#` and `$SYS/#` do not overlap).
    pub fn overlaps(&self, other: &TopicFilter) -> bool {
        // A filter starting with a literal `$...` level only matches `$` topics, which a
        // filter starting with a wildcard never matches.
        let dollar = |f: &TopicFilter| f.raw.starts_with('$');
        if (dollar(self) && other.starts_with_wildcard())
            || (dollar(other) && self.starts_with_wildcard())
        {
            return false;
        }
        let mut a = self.raw.split('/');
        let mut b = other.raw.split('/');
        // Whether the common topic's first level can only be empty: then a topic ending
        // after it would be "", which is no topic name (`/#` and `+` only share "").
        let mut empty_first = false;
        let mut depth = 0;
        loop {
            match (a.next(), b.next()) {
                // Both accept any continuation, e.g. "x".
                (Some("#"), Some("#")) => return true,
                // The common topic ends here, after `depth` levels.
                (Some("#") | None, None) | (None, Some("#")) => {
                    return !(depth == 1 && empty_first);
                }
                // The topic goes on for at least one more level, so it is not "".
                (Some("#"), Some(_)) | (Some(_), Some("#")) => return true,
                // One filter is longer and its next level is not `#`, so the numbers of
                // levels they accept are disjoint.
                (None, Some(_)) | (Some(_), None) => return false,
                (Some(x), Some(y)) if x == y || x == "+" || y == "+" => {
                    // Here a literal "" faces "" or `+`: the level can only be empty.
                    if depth == 0 {
                        empty_first = x.is_empty() || y.is_empty();
                    }
                }
                _ => return false,
            }
            depth += 1;
        }
    }

    fn starts_with_wildcard(&self) -> bool {
        self.raw.starts_with('#') || self.raw == "+" || self.raw.starts_with("+/")
    }
}

impl fmt::Display for TopicFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

impl FromStr for TopicFilter {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicFilter::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topic::TopicName;
    use proptest::prelude::*;
    use std::sync::LazyLock;

    fn filter(s: &str) -> TopicFilter {
        TopicFilter::parse(s).unwrap()
    }

    #[test]
    fn accepts_valid_filters() {
        for s in [
            "#",
            "+",
            "a",
            "a/b",
            "a/+",
            "a/#",
            "+/+",
            "+/#",
            "/",
            "/#",
            "a//b",
            "$SYS/#",
            "a/+/b/#",
            "$share/g/a",
        ] {
            let f = filter(s);
            assert_eq!(f.as_str(), s);
            assert_eq!(f.to_string(), s);
            assert_eq!(s.parse::<TopicFilter>().unwrap(), f);
        }
    }

    #[test]
    fn rejects_misplaced_multi_level_wildcard() {
        for s in ["#/a", "a/#/b", "a#", "a/b#", "##", "a/#/#"] {
            assert_eq!(
                TopicFilter::parse(s),
                Err(TopicError::BadMultiLevel),
                "{s:?}"
            );
        }
    }

    #[test]
    fn rejects_single_level_wildcard_inside_a_level() {
        for s in ["a+", "a/+b", "++", "a/b+/c"] {
            assert_eq!(
                TopicFilter::parse(s),
                Err(TopicError::BadSingleLevel),
                "{s:?}"
            );
        }
    }

    #[test]
    fn rejects_empty_nul_and_too_long() {
        assert_eq!(TopicFilter::parse(""), Err(TopicError::Empty));
        assert_eq!(TopicFilter::parse("a/\0"), Err(TopicError::Nul));
        assert!(TopicFilter::parse(&"a".repeat(MAX_LEN)).is_ok());
        assert_eq!(
            TopicFilter::parse(&"a".repeat(MAX_LEN + 1)),
            Err(TopicError::TooLong)
        );
    }

    #[test]
    fn counts_wildcards() {
        let cases = [
            ("a/b", 0, false),
            ("+", 1, false),
            ("#", 1, true),
            ("a/+/#", 2, true),
            ("factory/+/telemetry/#", 2, true),
            ("+/+/+", 3, false),
        ];
        for (s, n, multi) in cases {
            let f = filter(s);
            assert_eq!(f.wildcards(), n, "{s}");
            assert_eq!(f.ends_with_multi(), multi, "{s}");
        }
    }

    #[test]
    fn spec_example_matches() {
        let f = filter("factory/+/telemetry/#");
        assert!(f.matches("factory/line-3/telemetry/temp/c"));
        assert!(f.matches("factory/line-3/telemetry"));
        assert!(!f.matches("factory/line-3/status"));
        assert!(!f.matches("factory/telemetry"));
    }

    #[test]
    fn multi_level_matches_the_parent_level() {
        assert!(filter("a/#").matches("a"));
        assert!(filter("a/#").matches("a/"));
        assert!(filter("a/#").matches("a/b/c"));
        assert!(!filter("a/#").matches("ab"));
        assert!(!filter("a/#").matches("b"));
    }

    #[test]
    fn single_level_matches_exactly_one_level() {
        assert!(filter("+").matches("a"));
        assert!(!filter("+").matches("a/b"));
        assert!(filter("+/+").matches("/"));
        assert!(filter("a/+/c").matches("a//c"));
        assert!(!filter("a/+").matches("a"));
    }

    #[test]
    fn empty_levels_are_levels() {
        assert!(filter("/a").matches("/a"));
        assert!(!filter("a").matches("/a"));
        assert!(
            filter("+/a").matches("/a"),
            "\"/a\" has an empty first level"
        );
        assert!(filter("a//b").matches("a//b"));
        assert!(!filter("a/b").matches("a//b"));
        assert!(!filter("a/").matches("a"));
    }

    #[test]
    fn dollar_topics_are_hidden_from_leading_wildcards() {
        assert!(!filter("#").matches("$SYS/x"));
        assert!(!filter("+/x").matches("$SYS/x"));
        assert!(!filter("+").matches("$SYS"));
        assert!(filter("$SYS/#").matches("$SYS/x"));
        assert!(filter("$SYS/+").matches("$SYS/x"));
        // Only the first level is special.
        assert!(filter("a/#").matches("a/$x"));
        assert!(filter("a/+").matches("a/$x"));
    }

    #[test]
    fn overlap_examples() {
        let yes = [
            ("#", "a/b"),
            ("a/#", "a"),
            ("a/+", "+/b"),
            ("a/+/c", "a/b/+"),
            ("+/+", "a/#"),
            ("$SYS/#", "$SYS/+"),
            ("a/b", "a/b"),
            ("/#", "/#"),
            ("/#", "+/+"),
            ("/#", "/"),
        ];
        let no = [
            ("a/+", "b/+"),
            ("a/+", "a/+/+"),
            ("a", "a/b"),
            ("#", "$SYS/#"),
            ("+/x", "$SYS/x"),
            ("a/b/#", "a/c/#"),
            ("a/", "a"),
            // They only share "", which is no topic name.
            ("/#", "+"),
        ];
        for (x, y) in yes {
            assert!(filter(x).overlaps(&filter(y)), "{x} {y}");
            assert!(filter(y).overlaps(&filter(x)), "{y} {x}");
        }
        for (x, y) in no {
            assert!(!filter(x).overlaps(&filter(y)), "{x} {y}");
            assert!(!filter(y).overlaps(&filter(x)), "{y} {x}");
        }
    }

    /// The MQTT rules written as directly as possible, over level lists.
    fn reference_matches(filter: &[&str], topic: &[&str]) -> bool {
        fn go(f: &[&str], t: &[&str]) -> bool {
            match (f.first(), t.first()) {
                (Some(&"#"), _) => true,
                (Some(&"+"), Some(_)) => go(&f[1..], &t[1..]),
                (Some(x), Some(y)) => x == y && go(&f[1..], &t[1..]),
                (None, None) => true,
                _ => false,
            }
        }
        let hidden = topic[0].starts_with('$') && (filter[0] == "+" || filter[0] == "#");
        !hidden && go(filter, topic)
    }

    const LITERALS: [&str; 4] = ["a", "b", "$s", ""];

    fn topic_levels() -> impl Strategy<Value = Vec<&'static str>> {
        prop::collection::vec(prop::sample::select(&LITERALS[..]), 1..=4)
    }

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

    /// Every topic name of up to 4 levels over the test alphabet, plus a letter no filter
    /// uses for `+` and `#` to match: enough to find a common topic of any two test filters.
    static ALL_TOPICS: LazyLock<Vec<String>> = LazyLock::new(|| {
        let alphabet = ["a", "b", "$s", "", "z"];
        let mut all: Vec<Vec<&str>> = vec![vec![]];
        let mut out = Vec::new();
        for _ in 0..4 {
            all = all
                .iter()
                .flat_map(|t| {
                    alphabet.iter().map(move |l| {
                        let mut t = t.clone();
                        t.push(l);
                        t
                    })
                })
                .collect();
            out.extend(all.iter().map(|t| t.join("/")));
        }
        out.retain(|t| TopicName::parse(t).is_ok());
        out
    });

    proptest! {
        #[test]
        fn matches_agrees_with_the_reference(f in filter_levels(), t in topic_levels()) {
            let parsed = TopicFilter::parse(&f.join("/")).unwrap();
            prop_assert_eq!(parsed.matches(&t.join("/")), reference_matches(&f, &t));
        }

        #[test]
        fn overlaps_is_exact(a in filter_levels(), b in filter_levels()) {
            let (a, b) = (filter(&a.join("/")), filter(&b.join("/")));
            let witness = ALL_TOPICS.iter().find(|t| a.matches(t) && b.matches(t));
            prop_assert_eq!(a.overlaps(&b), witness.is_some(), "witness: {:?}", witness);
            prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
        }

        #[test]
        fn a_filter_overlaps_itself(f in filter_levels()) {
            let f = filter(&f.join("/"));
            prop_assert!(f.overlaps(&f));
        }

        #[test]
        fn parse_never_panics(s in any::<String>()) {
            if let Ok(f) = TopicFilter::parse(&s) {
                prop_assert_eq!(f.as_str(), s.as_str());
            }
        }

        #[test]
        fn parse_counts_what_it_accepts(s in "[a$+#/\\x00]{0,8}") {
            if let Ok(f) = TopicFilter::parse(&s) {
                let plus = s.split('/').filter(|l| *l == "+").count();
                prop_assert_eq!(f.wildcards(), plus + usize::from(f.ends_with_multi()));
                prop_assert_eq!(f.ends_with_multi(), s.ends_with('#'));
            }
        }

        #[test]
        fn a_topic_name_is_a_filter_matching_only_itself(
            s in "[a$/]{1,6}",
            t in "[a$/]{1,6}",
        ) {
            let f = filter(&s);
            prop_assert_eq!(f.wildcards(), 0);
            prop_assert_eq!(f.matches(&t), s == t);
        }
    }
}
