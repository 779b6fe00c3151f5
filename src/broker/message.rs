//! What the embedded broker carries: one application message as a publisher sent it, and one
//! delivery of it to one subscriber (with that subscription's QoS, retain flag and ids).
//! Messages are shared between deliveries (`Rc`): fan-out never copies a payload.

use std::{num::NonZeroU32, rc::Rc, time::Instant};

use ntex_bytes::{ByteString, Bytes};
use ntex_mqtt::{QoS, v5::codec::PublishProperties};

/// A message as received from a publisher.
#[derive(Debug)]
pub(crate) struct Message {
    pub topic: ByteString,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// MQTT 5 publish properties as sent (topic alias and subscription ids already removed);
    /// `None` from 3.x publishers.
    pub properties: Option<PublishProperties>,
    /// The publishing client, for No Local.
    pub publisher: Rc<str>,
    /// When the broker took it: Message Expiry Interval counts from here.
    pub received_at: Instant,
}

impl Message {
    /// Seconds left of the Message Expiry Interval at `now`: `None` without one, `Some(0)`
    /// once expired (the message must then not be delivered).
    pub fn expiry_left(&self, now: Instant) -> Option<u32> {
        let interval = self.properties.as_ref()?.message_expiry_interval?.get();
        let held = now.saturating_duration_since(self.received_at).as_secs();
        Some(u64::from(interval).saturating_sub(held) as u32)
    }

    pub fn is_expired(&self, now: Instant) -> bool {
        self.expiry_left(now) == Some(0)
    }
}

/// One message on its way to one session.
#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub message: Rc<Message>,
    /// min(published QoS, subscription QoS).
    pub qos: QoS,
    /// The RETAIN flag this delivery carries (set for retained messages sent at subscribe,
    /// and for live ones only under Retain As Published).
    pub retain: bool,
    /// Subscription Identifiers of the matching subscriptions (MQTT 5).
    pub subscription_ids: Vec<NonZeroU32>,
}
