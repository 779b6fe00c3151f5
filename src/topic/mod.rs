//! Topic names, topic filters and the rewrite engine (SPEC §3). Pure code, no I/O.

pub mod filter;
pub mod name;
pub mod rewrite;

pub use filter::TopicFilter;
pub use name::TopicName;
pub use rewrite::{Rewrite, RewriteError, RewriteRule};

/// Why a string is not a valid topic name or filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("is empty")]
    Empty,
    #[error("is longer than 65535 bytes")]
    TooLong,
    #[error("contains a NUL character")]
    Nul,
    #[error("contains a wildcard ('+' or '#'), which a topic name may not")]
    Wildcard,
    #[error("'#' must be the last level and stand alone (e.g. \"a/#\")")]
    BadMultiLevel,
    #[error("'+' must stand alone in its level (e.g. \"a/+/b\")")]
    BadSingleLevel,
}
