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
    /// When its Message Expiry Interval runs out (set when received with one). The interval
    /// forwarded is what is left of it, so time held in the bridge counts (SPEC 4.4).
    pub expires_at: Option<std::time::Instant>,
    /// The topic as received from the source, when the route rewrote it: what a dead letter
    /// names (`mqbridge-original-topic`). Not kept on disk by the spool (a message read back
    /// from it names its rewritten topic).
    pub source_topic: Option<String>,
}

impl Message {
    /// The topic as received from the source.
    pub fn source_topic(&self) -> &str {
        self.source_topic.as_deref().unwrap_or(&self.topic)
    }

    /// Seconds left before expiry at `now`: `None` without expiry, `Some(0)` once expired.
    pub fn remaining_expiry(&self, now: std::time::Instant) -> Option<u32> {
        self.expires_at.map(|at| {
            let left = at.saturating_duration_since(now);
            // Round up: a message with 0.4 s left is not expired yet.
            (left.as_millis().div_ceil(1000)).min(u128::from(u32::MAX)) as u32
        })
    }

    /// An upper bound of the PUBLISH packet's size, to compare with a Maximum Packet Size.
    pub fn encoded_size_bound(&self) -> usize {
        let props = self.properties.as_deref().map_or(0, |p| {
            16 + p.content_type.as_ref().map_or(0, |s| s.len() + 3)
                + p.response_topic.as_ref().map_or(0, |s| s.len() + 3)
                + p.correlation_data.as_ref().map_or(0, |s| s.len() + 3)
                + p.user_properties
                    .iter()
                    .map(|(k, v)| k.len() + v.len() + 5)
                    .sum::<usize>()
        });
        // Fixed header (≤ 5), topic length + topic, packet id, properties length (≤ 4).
        5 + 2 + self.topic.len() + 2 + 4 + props + self.payload.len()
    }
}
