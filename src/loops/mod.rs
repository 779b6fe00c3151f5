//! Loop prevention for mirrors and rings (SPEC 4.6): the `mqbridge-via` marker on MQTT 5,
//! a short-lived digest of forwarded messages where a broker speaks 3.x, and the static
//! analysis `check` prints. All pure: the pair machine asks, these answer.

pub mod analysis;
pub mod digest;
pub mod marker;

pub use digest::EchoDigest;
