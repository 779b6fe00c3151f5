//! The protocol-neutral message that crosses a pair: what a source PUBLISH becomes after decoding,
//! and what the target link encodes for its own protocol version.

use bytes::Bytes;

use crate::config::Qos;

/// MQTT 5 PUBLISH properties that a bridge carries from source to target. Topic Alias and
/// Subscription Identifier are per-connection and never cross (SPEC 4.4).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    pub payload_format_indicator: Option<u8>,
    /// Seconds left to live when the bridge received the message.
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// In order, duplicates kept.
    pub user_properties: Vec<(String, String)>,
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        *self == Properties::default()
    }
}

/// One application message on its way through a pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The topic as it will be published on the target (already rewritten).
    pub topic: String,
    pub payload: Bytes,
    /// The QoS it is forwarded with (never above what it was received with).
    pub qos: Qos,
    pub retain: bool,
    /// v5 properties, `None` when the source is 3.x or the route drops them.
    pub properties: Option<Box<Properties>>,
}
