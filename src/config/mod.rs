//! Configuration: `schema` (documented serde structs as the operator writes them), `load` (file
//! and overrides into a validated `plan`, the resolved form everything else runs from), `env`
//! (`MQBRIDGE__…` environment overrides), `error` (every error naming the key path and the fix). Nothing half-valid ever runs: `load::load_plan` either returns a whole `Plan` or a
//! `ConfigError` naming the key path and the fix.

pub mod env;
pub mod error;
pub mod load;
pub mod plan;
pub mod schema;

pub use error::ConfigError;
pub use load::load_plan;
pub use plan::*;
