//! Configuration errors in the operator's words: every one names the key path
//! (`routes[1].rewrite[0].to`) and what to do; `config`'s and serde's messages are translated
//! into them, with "did you mean" for a mistyped key.

use std::{io, path::PathBuf};

/// Why a configuration cannot run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    // The causes below are part of each message rather than `source`s, so that a reporter
    // walking the error chain does not print them twice.
    #[error("cannot read {}: {reason}", path.display())]
    Read { path: PathBuf, reason: io::Error },
    /// The file is not valid TOML, YAML or JSON.
    #[error("{}: {message}", path.display())]
    Syntax { path: PathBuf, message: String },
    /// A key the schema does not have (`parent` is empty at the top level).
    #[error("unknown key \"{key}\" {}", unknown_key_context(.parent, .key, .known))]
    UnknownKey {
        parent: String,
        key: String,
        known: Vec<String>,
    },
    /// A value that is wrong where it stands, or missing.
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
    /// An `MQBRIDGE__…` variable that does not name a config key.
    #[error("{var}: {message}")]
    Env { var: String, message: String },
    /// An error in a value an environment variable set: told so, since the file looks fine.
    #[error("{error} (set by {var})")]
    FromEnv {
        var: String,
        error: Box<ConfigError>,
    },
}

impl ConfigError {
    /// The key path the error is about (`routes[0].from`), if it is about one.
    pub fn key(&self) -> Option<String> {
        match self {
            ConfigError::UnknownKey { parent, key, .. } => Some(join_key(parent, key)),
            ConfigError::Invalid { key, .. } => Some(key.clone()),
            ConfigError::FromEnv { error, .. } => error.key(),
            _ => None,
        }
    }
}

pub(super) fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

pub(super) fn unknown_key_context(parent: &str, key: &str, known: &[String]) -> String {
    let place = if parent.is_empty() {
        "at the top level".to_owned()
    } else {
        format!("in {parent}")
    };
    match did_you_mean(key, known.iter().map(String::as_str)) {
        Some(near) => format!("{place} (did you mean \"{near}\"?)"),
        None if known.is_empty() => place,
        None => format!("{place} (known keys: {})", known.join(", ")),
    }
}

pub(super) fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}.{key}")
    }
}

/// The candidate closest to `word`: one a prefix of the other (`pool` → `pool_size`) first,
/// else the smallest edit distance.
pub(super) fn did_you_mean<'a>(
    word: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    candidates
        .into_iter()
        .filter_map(|c| {
            let d = edit_distance(&word, c);
            let prefix =
                word.len().min(c.len()) >= 3 && (c.starts_with(&word) || word.starts_with(c));
            (d <= (word.len() / 3).max(1) || prefix).then_some(((!prefix, d), c))
        })
        // A key the word begins (`pool` → `pool_size`) before a near miss (`spool`).
        .min_by_key(|&(rank, _)| rank)
        .map(|(_, c)| c)
}

/// Edit distance counting a swap of neighbours as one edit (`nmae` → `name`), as typos go.
pub(super) fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // d[i][j]: distance between the first i chars of a and the first j of b.
    let mut d = vec![vec![0; b.len() + 1]; a.len() + 1];
    for (i, row) in d.iter_mut().enumerate() {
        row[0] = i;
    }
    d[0] = (0..=b.len()).collect();
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            d[i][j] = (d[i - 1][j - 1] + cost)
                .min(d[i - 1][j] + 1)
                .min(d[i][j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d[i][j] = d[i][j].min(d[i - 2][j - 2] + 1);
            }
        }
    }
    d[a.len()][b.len()]
}

/// Turns `config`/serde errors into ours. `config` records where an error happened as a key
/// path (`routes[0].pool_size`) around serde's message; the messages are serde's stable
/// wording (`unknown field `x`, expected one of ...`, `invalid type: ...`).
pub(super) fn translate(err: config::ConfigError) -> ConfigError {
    use config::ConfigError as C;
    match err {
        C::At { error, key, .. } => {
            let key = key.map(|k| fix_path(&k)).unwrap_or_default();
            match *error {
                C::Message(message) => from_serde_message(key, &message),
                other => invalid(key, other.to_string()),
            }
        }
        C::Message(message) => from_serde_message(String::new(), &message),
        C::Type {
            unexpected,
            expected,
            key,
            ..
        } => invalid(
            key.map(|k| fix_path(&k)).unwrap_or_default(),
            format!(
                "expected {}, found {}",
                plain_type(expected),
                plain_type(&unexpected.to_string())
            ),
        ),
        C::NotFound(key) => invalid(fix_path(&key), "missing"),
        other => invalid(String::new(), other.to_string()),
    }
}

pub(super) fn from_serde_message(parent: String, message: &str) -> ConfigError {
    // All `backquoted` words: the field first, then what serde expected.
    let quoted = || message.split('`').skip(1).step_by(2);
    if message.starts_with("unknown field `") {
        let mut words = quoted();
        return ConfigError::UnknownKey {
            parent,
            key: words.next().unwrap_or_default().to_owned(),
            known: words.map(str::to_owned).collect(),
        };
    }
    if message.starts_with("missing field `") {
        let field = quoted().next().unwrap_or_default();
        return invalid(join_key(&parent, field), "missing");
    }
    if let Some(rest) = message.strip_prefix("invalid type: ")
        && let Some((found, expected)) = rest.split_once(", expected ")
    {
        return invalid(
            parent,
            format!(
                "expected {}, found {}",
                plain_type(expected),
                plain_type(found)
            ),
        );
    }
    invalid(parent, message)
}

/// Serde's type words in the operator's terms.
pub(super) fn plain_type(s: &str) -> String {
    if s.starts_with("struct ") || s == "a map" || s == "map" {
        return "a table".into();
    }
    match s {
        "a sequence" | "sequence" => "a list".into(),
        "unit value" => "nothing".into(),
        _ => s.into(),
    }
}

/// `config` joins a missing field to an index without a dot (`routes[0]name`).
pub(super) fn fix_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len() + 2);
    let mut after_bracket = false;
    for c in path.chars() {
        if after_bracket && c != '.' && c != '[' {
            out.push('.');
        }
        after_bracket = c == ']';
        out.push(c);
    }
    out
}
