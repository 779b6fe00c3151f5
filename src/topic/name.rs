//! A validated MQTT topic name: what a PUBLISH carries, as opposed to a filter.
//! Parse once at the edge (config, rewrite results), then trust the type.

use std::fmt;
use std::str::FromStr;

use super::TopicError;

/// The MQTT limit on any UTF-8 string in a packet, topic names and filters included.
pub(crate) const MAX_LEN: usize = 65535;

/// A topic name: non-empty, at most 65535 bytes, no NUL, no wildcards.
///
/// Empty levels are allowed (`"a//b"`, `"/a"`), as MQTT allows them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TopicName(String);

impl TopicName {
    /// Validates `s` as a topic name.
    pub fn parse(s: &str) -> Result<TopicName, TopicError> {
        validate(s)?;
        Ok(TopicName(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The topic name rules without taking ownership, shared with the rewrite engine so that a
/// rewritten topic is checked exactly as a configured one would be.
pub(crate) fn validate(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_LEN {
        return Err(TopicError::TooLong);
    }
    // One pass over the bytes: this also runs on every rewritten message.
    for b in s.bytes() {
        match b {
            0 => return Err(TopicError::Nul),
            b'+' | b'#' => return Err(TopicError::Wildcard),
            _ => {}
        }
    }
    Ok(())
}

impl fmt::Display for TopicName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TopicName {
    type Err = TopicError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TopicName::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_ordinary_names() {
        for s in [
            "a",
            "a/b/c",
            "/a",
            "a/",
            "a//b",
            "/",
            "$SYS/broker/load",
            "ünï/çødé",
        ] {
            let name = TopicName::parse(s).unwrap();
            assert_eq!(name.as_str(), s);
            assert_eq!(name.to_string(), s);
            assert_eq!(s.parse::<TopicName>().unwrap(), name);
        }
    }

    #[test]
    fn rejects_empty() {
        assert_eq!(TopicName::parse(""), Err(TopicError::Empty));
    }

    #[test]
    fn rejects_wildcards_anywhere() {
        for s in ["+", "#", "a/+", "a/#", "a+b", "a#", "+/a"] {
            assert_eq!(TopicName::parse(s), Err(TopicError::Wildcard), "{s:?}");
        }
    }

    #[test]
    fn rejects_nul() {
        assert_eq!(TopicName::parse("a\0b"), Err(TopicError::Nul));
    }

    #[test]
    fn length_limit_is_in_bytes() {
        assert!(TopicName::parse(&"a".repeat(MAX_LEN)).is_ok());
        assert_eq!(
            TopicName::parse(&"a".repeat(MAX_LEN + 1)),
            Err(TopicError::TooLong)
        );
        // 'é' is two bytes in UTF-8: 32768 of them are 65536 bytes.
        assert_eq!(
            TopicName::parse(&"é".repeat(32768)),
            Err(TopicError::TooLong)
        );
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(s in any::<String>()) {
            if let Ok(name) = TopicName::parse(&s) {
                prop_assert_eq!(name.as_str(), s.as_str());
            }
        }

        #[test]
        fn parse_accepts_exactly_the_valid_names(s in "[a$+#/\\x00]{0,8}") {
            let valid = !s.is_empty() && !s.contains(['+', '#', '\0']);
            prop_assert_eq!(TopicName::parse(&s).is_ok(), valid);
        }
    }
}
