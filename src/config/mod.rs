//! Configuration: `schema` (documented serde structs as the operator writes them), `load` (file +
//! `MQBRIDGE__…` environment overrides), `plan` (the validated, resolved form everything else runs
//! from). Nothing half-valid ever runs: `load::load_plan` either returns a whole `Plan` or a
//! `ConfigError` naming the key path and the fix.

pub mod load;
pub mod plan;
pub mod schema;

pub use load::{ConfigError, load_plan};
pub use plan::*;
