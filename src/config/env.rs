//! `MQBRIDGE__<PATH>` environment overrides: read from the process (or given), resolved to the
//! key each one sets (a broker or route by name or index), merged over the file, and blamed by
//! name when the key they set is wrong.

use std::{collections::BTreeMap, fs, path::Path};

use config::{FileFormat, Source, Value, ValueKind};

use super::{error::*, schema};

/// Environment variables starting with this override config keys: `MQBRIDGE__A__B` sets `a.b`,
/// `MQBRIDGE__ROUTES__0__QOS` sets `routes[0].qos`.
pub const ENV_PREFIX: &str = "MQBRIDGE__";

/// The process environment's `MQBRIDGE__…` variables and `HOSTNAME` (the default instance).
pub(super) fn process_env() -> Result<Vec<(String, String)>, ConfigError> {
    let mut env = Vec::new();
    for (key, value) in std::env::vars_os() {
        let Ok(key) = key.into_string() else { continue };
        if strip_env_prefix(&key).is_none() && key != "HOSTNAME" {
            continue;
        }
        let value = value.into_string().map_err(|_| ConfigError::Env {
            var: key.clone(),
            message: "is not valid UTF-8".into(),
        })?;
        env.push((key, value));
    }
    Ok(env)
}

/// The part of `var` after `MQBRIDGE__` (in any case, as `config`'s own env source allows).
pub(super) fn strip_env_prefix(var: &str) -> Option<&str> {
    var.get(..ENV_PREFIX.len())
        .filter(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
        .map(|_| &var[ENV_PREFIX.len()..])
}

/// One environment override, resolved to the key it sets.
pub(super) struct Override {
    var: String,
    /// `config`'s path syntax, matching its error paths: `brokers.edge.password`, `routes[0].qos`.
    path: String,
    value: String,
}

pub(super) fn read(
    path: &Path,
    env: &BTreeMap<String, String>,
) -> Result<(schema::Config, Vec<Override>), ConfigError> {
    let text = fs::read_to_string(path).map_err(|reason| ConfigError::Read {
        path: path.to_owned(),
        reason,
    })?;
    let extension = path.extension().and_then(|e| e.to_str());
    let format = match extension.map(str::to_ascii_lowercase).as_deref() {
        Some("yaml" | "yml") => FileFormat::Yaml,
        Some("json") => FileFormat::Json,
        _ => FileFormat::Toml,
    };
    let syntax = |e: config::ConfigError| ConfigError::Syntax {
        path: path.to_owned(),
        message: e.to_string(),
    };
    let file = config::Config::builder()
        .add_source(config::File::from_str(&text, format))
        .build()
        .map_err(syntax)?;
    let overrides = resolve_overrides(&file.collect().map_err(syntax)?, env)?;

    let mut builder = config::Config::builder().add_source(file);
    for o in &overrides {
        // Kept as strings: `schema` parses every value from a string, and guessing types here
        // would turn a password like "0123" into the number 123.
        builder = builder
            .set_override(&o.path, o.value.clone())
            .map_err(|e| ConfigError::Env {
                var: o.var.clone(),
                message: format!("cannot set {}: {e}", o.path),
            })?;
    }
    let config = builder
        .build()
        .and_then(|c| c.try_deserialize::<schema::Config>())
        .map_err(|e| blame_env(translate(e), &overrides))?;
    Ok((config, overrides))
}

/// Maps each `MQBRIDGE__…` variable to the key it sets. Done here rather than with `config`'s
/// `Environment` source, which lowercases every level (so `[brokers.Edge]` could not be reached)
/// and turns `ROUTES__0` into a table key `"0"` that replaces the `routes` list.
pub(super) fn resolve_overrides(
    root: &config::Map<String, Value>,
    env: &BTreeMap<String, String>,
) -> Result<Vec<Override>, ConfigError> {
    let mut overrides = Vec::new();
    for (var, value) in env {
        let Some(rest) = strip_env_prefix(var) else {
            continue;
        };
        let error = |message: String| ConfigError::Env {
            var: var.clone(),
            message,
        };
        let mut path = String::new();
        // Where we are in the file's tree; `None` once below what the file has.
        let mut table = Some(root);
        let mut list: Option<&[Value]> = None;
        for level in rest.split("__") {
            if level.is_empty() {
                return Err(error(
                    "has an empty level; separate levels with two underscores, e.g. \
                     MQBRIDGE__BROKERS__CLOUD__PASSWORD"
                        .into(),
                ));
            }
            let child = if let Some(items) = list {
                let index: usize = level.parse().map_err(|_| {
                    error(format!(
                        "{path} is a list: the level after it must be an index like 0, not {level:?}"
                    ))
                })?;
                let item = items.get(index).ok_or_else(|| {
                    let n = items.len();
                    let entries = if n == 1 { "entry" } else { "entries" };
                    error(format!(
                        "{path} has {n} {entries}, so index {index} names none"
                    ))
                })?;
                path.push_str(&format!("[{index}]"));
                Some(item)
            } else {
                if !level
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    return Err(error(format!(
                        "{level:?} cannot name a key: use letters, digits, '-' and '_'"
                    )));
                }
                // The file's spelling if it has the key in any case, else the schema's
                // lowercase one.
                let key = table
                    .and_then(|t| {
                        t.keys()
                            .find(|k| k.as_str() == level.to_ascii_lowercase())
                            .or_else(|| t.keys().find(|k| k.eq_ignore_ascii_case(level)))
                    })
                    .cloned()
                    .unwrap_or_else(|| level.to_ascii_lowercase());
                let child = table.and_then(|t| t.get(&key));
                if path == "brokers"
                    && child.is_none()
                    && let Some(t) = table
                {
                    // A typo would otherwise add a broker no route uses, silently.
                    let known: Vec<&str> = t.keys().map(String::as_str).collect();
                    return Err(error(format!(
                        "names broker {level:?}, which the config file does not have (it has: \
                         {}); a variable can change a broker's keys, not add a broker",
                        known.join(", ")
                    )));
                }
                if !path.is_empty() {
                    path.push('.');
                }
                path.push_str(&key);
                child
            };
            (table, list) = match child.map(|v| &v.kind) {
                Some(ValueKind::Table(t)) => (Some(t), None),
                Some(ValueKind::Array(a)) => (None, Some(a.as_slice())),
                _ => (None, None),
            };
        }
        overrides.push(Override {
            var: var.clone(),
            path,
            value: value.clone(),
        });
    }
    Ok(overrides)
}

/// Adds "(set by MQBRIDGE__…)" to an error about a key an environment variable set, or one
/// beneath or above it.
pub(super) fn blame_env(err: ConfigError, overrides: &[Override]) -> ConfigError {
    let Some(key) = err.key() else { return err };
    let under = |a: &str, b: &str| {
        a.strip_prefix(b)
            .is_some_and(|rest| rest.starts_with(['.', '[']))
    };
    match overrides
        .iter()
        .find(|o| o.path == key || under(&key, &o.path) || under(&o.path, &key))
    {
        Some(o) => ConfigError::FromEnv {
            var: o.var.clone(),
            error: Box::new(err),
        },
        None => err,
    }
}
