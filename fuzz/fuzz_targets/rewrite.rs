//! The rewrite engine on arbitrary strings: the input is split at the first two NUL bytes into a
//! match filter, a `to` template and a topic. `RewriteRule::compile` must accept or refuse without
//! panicking; a compiled rule must match exactly the topics its filter matches, and whatever it
//! returns as a rewritten topic must be a valid topic name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mqbridge::topic::{RewriteRule, TopicFilter, TopicName};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, '\0');
    let (Some(filter), Some(to), Some(topic)) = (parts.next(), parts.next(), parts.next()) else {
        return;
    };
    let Ok(rule) = RewriteRule::compile(filter, to) else {
        return;
    };
    let parsed = TopicFilter::parse(filter).expect("compile accepted the filter");
    match rule.apply(topic) {
        None => assert!(
            !parsed.matches(topic),
            "{filter:?} matches {topic:?} but apply said no"
        ),
        Some(result) => {
            assert!(parsed.matches(topic), "{filter:?} does not match {topic:?}");
            if let Ok(rewritten) = result {
                assert!(
                    TopicName::parse(&rewritten).is_ok(),
                    "{filter:?} -> {to:?} on {topic:?} gave the invalid name {rewritten:?}"
                );
            }
        }
    }
});
