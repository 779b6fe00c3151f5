//! Writing to one client connection of the embedded broker: a session's `Transmit` encoded
//! with ntex-mqtt's v3 or v5 codec straight into the connection's ntex write buffer.
//!
//! Outgoing QoS 1/2 deliveries bypass ntex-mqtt's `MqttSink` on purpose: its in-flight queue
//! requires acks in send order (an out-of-order PUBACK closes the connection) and keeps one
//! QoS 2 release at a time, while a broker must accept acks in any order, keep many QoS 2
//! exchanges open and resend them with their packet ids after a reconnect.

use std::time::Instant;

use ntex_io::IoRef;
use ntex_mqtt::{error::EncodeError, v3, v5};

use super::session::Transmit;

/// Why a transmit was not written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WireError {
    /// Larger than the client's Maximum Packet Size (MQTT 5): discard the message.
    TooLarge,
    Other,
}

pub(crate) enum Wire {
    V3 {
        io: IoRef,
        codec: v3::codec::Codec,
        sink: v3::MqttSink,
    },
    V5 {
        io: IoRef,
        codec: v5::codec::Codec,
        sink: v5::MqttSink,
    },
}

impl Wire {
    pub fn v3(io: IoRef, sink: v3::MqttSink) -> Wire {
        Wire::V3 {
            io,
            codec: v3::codec::Codec::new(),
            sink,
        }
    }

    /// `max_packet_size`: the client's Maximum Packet Size from its CONNECT.
    pub fn v5(io: IoRef, sink: v5::MqttSink, max_packet_size: Option<u32>) -> Wire {
        let codec = v5::codec::Codec::new();
        if let Some(size) = max_packet_size {
            codec.set_max_outbound_size(size);
        }
        Wire::V5 { io, codec, sink }
    }

    /// Whether the connection's write buffer is over its high-water mark: stop writing until
    /// ntex says it drained (`Control::WrBackpressure`).
    pub fn is_backpressured(&self) -> bool {
        match self {
            Wire::V3 { io, .. } | Wire::V5 { io, .. } => io.is_wr_backpressure(),
        }
    }

    pub fn send(&self, transmit: &Transmit, now: Instant) -> Result<(), WireError> {
        let result = match (self, transmit) {
            (
                Wire::V3 { io, codec, .. },
                Transmit::Publish {
                    packet_id,
                    dup,
                    delivery,
                },
            ) => {
                let m = &delivery.message;
                let packet = v3::codec::Publish {
                    dup: *dup,
                    retain: delivery.retain,
                    qos: delivery.qos,
                    topic: m.topic.clone(),
                    packet_id: *packet_id,
                    payload_size: m.payload.len() as u32,
                };
                io.encode(
                    v3::codec::Encoded::Publish(packet, Some(m.payload.clone())),
                    codec,
                )
            }
            (Wire::V3 { io, codec, .. }, Transmit::Release(packet_id)) => io.encode(
                v3::codec::Encoded::Packet(v3::codec::Packet::PublishRelease {
                    packet_id: *packet_id,
                }),
                codec,
            ),
            (
                Wire::V5 { io, codec, .. },
                Transmit::Publish {
                    packet_id,
                    dup,
                    delivery,
                },
            ) => {
                let m = &delivery.message;
                let mut properties = m.properties.clone().unwrap_or_default();
                // The time the message spent here counts against its expiry (MQTT 5 3.3.2.3.3).
                properties.message_expiry_interval = m
                    .expiry_left(now)
                    .and_then(|left| std::num::NonZeroU32::new(left.max(1)));
                properties.subscription_ids = delivery.subscription_ids.clone();
                let packet = v5::codec::Publish {
                    dup: *dup,
                    retain: delivery.retain,
                    qos: delivery.qos,
                    topic: m.topic.clone(),
                    packet_id: *packet_id,
                    payload_size: m.payload.len() as u32,
                    properties,
                };
                io.encode(
                    v5::codec::Encoded::Publish(packet, Some(m.payload.clone())),
                    codec,
                )
            }
            (Wire::V5 { io, codec, .. }, Transmit::Release(packet_id)) => io.encode(
                v5::codec::Encoded::Packet(v5::codec::Packet::PublishRelease(
                    v5::codec::PublishAck2 {
                        packet_id: *packet_id,
                        reason_code: v5::codec::PublishAck2Reason::Success,
                        properties: Vec::new(),
                        reason_string: None,
                    },
                )),
                codec,
            ),
        };
        result.map_err(|e| match e {
            EncodeError::OverMaxPacketSize => WireError::TooLarge,
            _ => WireError::Other,
        })
    }

    /// Closes the connection; `takeover` tells an MQTT 5 client why (Session Taken Over),
    /// otherwise it hears Server Shutting Down.
    pub fn close(&self, takeover: bool) {
        match self {
            Wire::V3 { sink, .. } => sink.close(),
            Wire::V5 { sink, .. } => {
                let reason = if takeover {
                    v5::codec::DisconnectReasonCode::SessionTakenOver
                } else {
                    v5::codec::DisconnectReasonCode::ServerShuttingDown
                };
                sink.close_with_reason(v5::codec::Disconnect::new(reason));
            }
        }
    }

    /// Cuts the connection without a DISCONNECT (scripted faults).
    pub fn cut(&self) {
        match self {
            Wire::V3 { sink, .. } => sink.force_close(),
            Wire::V5 { sink, .. } => sink.force_close(),
        }
    }
}
