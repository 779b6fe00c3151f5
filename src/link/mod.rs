//! One MQTT connection to one broker, for any protocol version, behind one small interface:
//! decode what arrived into `Inbound`, encode what to send into a write buffer. The pair driver
//! owns the socket halves and decides when to read and write; nothing here buffers on its own.
//!
//! Codec: rumqttc's `mqttbytes` (v4 and v5) for the packets, our own CONNECT for MQTT 3.1.
//! Transport (TCP, TLS, WebSocket): `transport`.

mod transport;
mod v3;
mod v5;
mod wakeup;

pub use transport::{Reader, Writer, prepare, reload_tls};
pub use wakeup::WakeThreshold;

use std::{io, time::Duration};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    config::{BrokerPlan, Protocol, Qos, Secret},
    message::{Message, Properties},
};

/// Why a connection failed or ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("connection lost: {0}")]
    Io(#[from] io::Error),
    #[error("the broker closed the connection")]
    Closed,
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A CONNACK refusal: `what` in words with its code, `hint` what to change (starts with
    /// "; " when there is one).
    #[error("the broker refused the connection: {what}{hint}")]
    Refused { what: String, hint: String },
    #[error("no CONNACK within {0:?}")]
    Timeout(Duration),
    #[error("{step} with {addr} did not finish within {after:?}")]
    StepTimeout {
        step: &'static str,
        addr: String,
        after: Duration,
    },
    /// The handshake failed: the cause is rustls's words (e.g. "invalid peer certificate:
    /// UnknownIssuer", "received fatal alert: CertificateRequired").
    #[error("TLS handshake with {addr} failed: {source}{hint}")]
    Tls {
        addr: String,
        source: io::Error,
        /// What to do about it, when known (starts with a space).
        hint: &'static str,
    },
    /// The broker's TLS settings cannot be used (unreadable CA, certificate or key file); the
    /// message names the broker and the file.
    #[error("{0}")]
    TlsConfig(String),
    #[error("WebSocket handshake with {url} failed: {source}{hint}")]
    WebSocket {
        url: String,
        source: Box<tokio_tungstenite::tungstenite::Error>,
        /// What to do about it, when known (starts with a space).
        hint: &'static str,
    },
}

impl LinkError {
    /// Whether retrying cannot help until the operator changes something (a refusal that names
    /// a key, a TLS or WebSocket set-up that does not match the port): logged as an error, not
    /// a warning.
    pub fn needs_the_operator(&self) -> bool {
        match self {
            LinkError::Refused { hint, .. } => !hint.is_empty(),
            LinkError::Tls { hint, .. } | LinkError::WebSocket { hint, .. } => !hint.is_empty(),
            LinkError::TlsConfig(_) => true,
            _ => false,
        }
    }
}

/// What the broker said in its CONNACK.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnAckInfo {
    pub session_present: bool,
    /// 0 = accepted; v3 return codes 1-5 or v5 reason codes.
    pub code: u8,
    pub receive_maximum: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub maximum_packet_size: Option<u32>,
    pub topic_alias_maximum: Option<u16>,
    /// v5: Shared Subscription Available (absent = 1, available).
    pub shared_subscription_available: Option<u8>,
    /// v5: Retain Available (absent = 1): 0 means a PUBLISH with RETAIN 1 is a protocol error.
    pub retain_available: Option<u8>,
    /// v5: Server Keep Alive, which replaces the one we asked for (MQTT-3.2.2-21).
    pub server_keep_alive: Option<u16>,
    pub reason: Option<String>,
}

/// A PUBLISH as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundPublish {
    pub pkid: u16,
    pub qos: Qos,
    pub dup: bool,
    pub retain: bool,
    pub topic: String,
    pub payload: Bytes,
    pub properties: Option<Box<Properties>>,
}

/// A decoded packet from the broker, the same for every protocol version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    ConnAck(ConnAckInfo),
    Publish(InboundPublish),
    PubAck {
        pkid: u16,
        reason: u8,
    },
    PubRec {
        pkid: u16,
        reason: u8,
    },
    PubRel {
        pkid: u16,
    },
    PubComp {
        pkid: u16,
    },
    SubAck {
        pkid: u16,
        codes: Vec<u8>,
    },
    UnsubAck {
        pkid: u16,
    },
    PingReq,
    PingResp,
    Disconnect {
        reason: u8,
    },
    /// A packet a client never expects from a broker (e.g. CONNECT): a protocol violation.
    Unexpected(String),
    /// A PUBLISH larger than we take (`max_packet_size`): its fixed header, topic and packet id
    /// were read (the payload of `publish` is empty); the next `skip` bytes of the stream are
    /// the rest of it, to be discarded unread. `size` is the whole packet's.
    TooLarge {
        publish: InboundPublish,
        size: usize,
        skip: usize,
    },
}

/// What we put in our CONNECT.
#[derive(Debug, Clone)]
pub struct ConnectParams {
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive_secs: u16,
    pub session_expiry_secs: u32,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// v5 only: the window we allow the broker (mirrors the target's).
    pub receive_maximum: Option<u16>,
    /// v5 only: the largest packet we accept.
    pub maximum_packet_size: Option<u32>,
    /// 3.x only: announce a bridge (protocol level | 0x80).
    pub try_private: bool,
}

impl ConnectParams {
    /// Parameters for a connection to `broker` with the given client id.
    pub fn for_broker(broker: &BrokerPlan, client_id: String) -> Self {
        let expiry = broker.session_expiry.as_secs().min(u64::from(u32::MAX)) as u32;
        ConnectParams {
            client_id,
            clean_start: expiry == 0,
            keep_alive_secs: broker.keep_alive.as_secs().min(u64::from(u16::MAX)) as u16,
            session_expiry_secs: expiry,
            username: broker.username.clone(),
            password: broker.password.clone(),
            receive_maximum: None,
            maximum_packet_size: None,
            try_private: broker.try_private,
        }
    }
}

/// Encoder/decoder for one protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    protocol: Protocol,
    /// Largest packet we accept.
    max_incoming: u32,
}

/// Largest packet accepted unless configured otherwise (MQTT's own limit is 256 MiB).
pub const DEFAULT_MAX_INCOMING: u32 = 16 * 1024 * 1024;

impl Codec {
    pub fn new(protocol: Protocol, max_incoming: u32) -> Self {
        Codec {
            protocol,
            max_incoming,
        }
    }

    pub fn protocol(&self) -> Protocol {
        self.protocol
    }

    /// Takes one whole packet off the front of `buf`, or `None` if it is not all there yet.
    pub fn decode(&self, buf: &mut BytesMut) -> Result<Option<Inbound>, LinkError> {
        if buf.is_empty() {
            return Ok(None);
        }
        // rumqttc says "insufficient bytes" both for a frame not all there yet and for a complete
        // frame whose inner lengths overrun it (after splitting that frame off the buffer). Only
        // the first means "wait for more"; the second is a malformed packet.
        let frame = frame_len(buf);
        if let Some(size) = frame
            && size > self.max_incoming as usize
            && buf[0] >> 4 == 3
            && (buf[0] >> 1) & 3 != 3
        {
            return Ok(too_large_publish(buf, size));
        }
        let complete = frame.is_some_and(|n| buf.len() >= n);
        let decoded = match self.protocol {
            Protocol::V5 => v5::decode(buf, self.max_incoming),
            _ => v3::decode(buf, self.max_incoming as usize),
        };
        match decoded {
            Ok(None) if complete => Err(LinkError::Protocol(
                "malformed packet: its contents overrun its remaining length".into(),
            )),
            other => other,
        }
    }

    pub fn connect(&self, p: &ConnectParams, buf: &mut BytesMut) {
        match self.protocol {
            Protocol::V31 => v3::encode_connect(p, 3 | bridge_bit(p), buf),
            Protocol::V311 => v3::encode_connect(p, 4 | bridge_bit(p), buf),
            Protocol::V5 => v5::encode_connect(p, buf),
        }
    }

    /// PUBLISH `m`; on v5 its Message Expiry Interval is `expiry` (what is left of it).
    pub fn publish(
        &self,
        pkid: u16,
        dup: bool,
        m: &Message,
        expiry: Option<u32>,
        buf: &mut BytesMut,
    ) {
        match self.protocol {
            Protocol::V5 => v5::encode_publish(pkid, dup, m, expiry, buf),
            _ => v3::encode_publish(pkid, dup, m, buf),
        }
    }

    pub fn puback(&self, pkid: u16, buf: &mut BytesMut) {
        v3::encode_ack(0x40, pkid, buf); // v5 allows the short form for reason Success
    }

    pub fn pubrec(&self, pkid: u16, buf: &mut BytesMut) {
        v3::encode_ack(0x50, pkid, buf);
    }

    pub fn pubrel(&self, pkid: u16, buf: &mut BytesMut) {
        v3::encode_ack(0x62, pkid, buf);
    }

    pub fn pubcomp(&self, pkid: u16, buf: &mut BytesMut) {
        v3::encode_ack(0x70, pkid, buf);
    }

    /// SUBSCRIBE. `retained_copies`: v5 only, whether the broker sends retained messages for a
    /// new subscription (Retain Handling 1) or never (2); 3.x brokers send them on every
    /// SUBSCRIBE.
    pub fn subscribe(
        &self,
        pkid: u16,
        filters: &[String],
        qos: Qos,
        retained_copies: bool,
        buf: &mut BytesMut,
    ) {
        match self.protocol {
            Protocol::V5 => v5::encode_subscribe(pkid, filters, qos, retained_copies, buf),
            _ => v3::encode_subscribe(pkid, filters, qos, buf),
        }
    }

    pub fn unsubscribe(&self, pkid: u16, filters: &[String], buf: &mut BytesMut) {
        match self.protocol {
            Protocol::V5 => v5::encode_unsubscribe(pkid, filters, buf),
            _ => v3::encode_unsubscribe(pkid, filters, buf),
        }
    }

    pub fn pingreq(&self, buf: &mut BytesMut) {
        buf.extend_from_slice(&[0xC0, 0]);
    }

    pub fn pingresp(&self, buf: &mut BytesMut) {
        buf.extend_from_slice(&[0xD0, 0]);
    }

    pub fn disconnect(&self, buf: &mut BytesMut) {
        match self.protocol {
            Protocol::V5 => v5::encode_disconnect(buf),
            _ => buf.extend_from_slice(&[0xE0, 0]),
        }
    }

    /// v5 only: DISCONNECT (normal) with Session Expiry Interval 0, which ends the session with
    /// the connection (allowed when CONNECT set a non-zero interval, MQTT-3.14.2-2 forbids only
    /// the reverse). `false` on 3.x, which needs a clean-session connection for that.
    pub fn disconnect_ending_session(&self, buf: &mut BytesMut) -> bool {
        if self.protocol != Protocol::V5 {
            return false;
        }
        buf.extend_from_slice(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 0]);
        true
    }
}

fn bridge_bit(p: &ConnectParams) -> u8 {
    if p.try_private { 0x80 } else { 0 }
}

/// An established connection: CONNACK received and accepted.
pub struct Connection {
    pub reader: Reader,
    pub writer: Writer,
    /// The reader's socket's wake-up threshold (plain TCP only); lives as long as `reader`.
    pub wake_threshold: WakeThreshold,
    /// Bytes read and not decoded yet (may already hold packets that followed the CONNACK).
    pub rbuf: BytesMut,
    pub codec: Codec,
    pub connack: ConnAckInfo,
}

/// How long a broker may take to answer CONNECT.
const CONNACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a connection: transport (TCP, TLS, WebSocket), CONNECT, CONNACK. Refusals come back as
/// `LinkError::Refused`.
pub async fn connect(broker: &BrokerPlan, params: &ConnectParams) -> Result<Connection, LinkError> {
    let (mut reader, mut writer, wake_threshold) = transport::open(broker).await?;
    let codec = Codec::new(broker.protocol, broker.max_packet_size);
    let mut wbuf = BytesMut::new();
    codec.connect(params, &mut wbuf);
    writer.write_all(&wbuf).await?;
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let connack = tokio::time::timeout(CONNACK_TIMEOUT, async {
        loop {
            if let Some(code) = v3_answer_to_v5(broker.protocol, &rbuf) {
                return Err(LinkError::Refused {
                    what: format!(
                        "it answered MQTT 5's CONNECT with an MQTT 3.1.1 CONNACK ({})",
                        refusal_words(Protocol::V311, code, None)
                    ),
                    hint: format!(
                        "; it does not speak MQTT 5: set brokers.{}.protocol = \"3.1.1\"",
                        broker.name
                    ),
                });
            }
            if let Some(packet) = codec.decode(&mut rbuf)? {
                return match packet {
                    Inbound::ConnAck(c) => Ok(c),
                    other => Err(LinkError::Protocol(format!(
                        "expected CONNACK, got {other:?}"
                    ))),
                };
            }
            if reader.read_buf(&mut rbuf).await? == 0 {
                return Err(LinkError::Closed);
            }
        }
    })
    .await
    .map_err(|_| LinkError::Timeout(CONNACK_TIMEOUT))??;
    if connack.code != 0 {
        return Err(refusal(broker, params, &connack));
    }
    Ok(Connection {
        reader,
        writer,
        wake_threshold,
        rbuf,
        codec,
        connack,
    })
}

/// An MQTT 5 reason code (CONNACK, PUBACK, PUBREC, SUBACK, DISCONNECT) in words.
pub fn reason_name(code: u8) -> &'static str {
    match code {
        0x00 => "success",
        0x04 => "disconnect with will message",
        0x10 => "no matching subscribers",
        0x80 => "unspecified error",
        0x81 => "malformed packet",
        0x82 => "protocol error",
        0x83 => "implementation specific error",
        0x84 => "unsupported protocol version",
        0x85 => "client identifier not valid",
        0x86 => "bad user name or password",
        0x87 => "not authorized",
        0x88 => "server unavailable",
        0x89 => "server busy",
        0x8A => "banned",
        0x8B => "server shutting down",
        0x8C => "bad authentication method",
        0x8D => "keep alive timeout",
        0x8E => "session taken over",
        0x8F => "topic filter invalid",
        0x90 => "topic name invalid",
        0x91 => "packet identifier in use",
        0x92 => "packet identifier not found",
        0x93 => "receive maximum exceeded",
        0x94 => "topic alias invalid",
        0x95 => "packet too large",
        0x96 => "message rate too high",
        0x97 => "quota exceeded",
        0x98 => "administrative action",
        0x99 => "payload format invalid",
        0x9A => "retain not supported",
        0x9B => "QoS not supported",
        0x9C => "use another server",
        0x9D => "server moved",
        0x9E => "shared subscriptions not supported",
        0x9F => "connection rate exceeded",
        0xA0 => "maximum connect time",
        0xA1 => "subscription identifiers not supported",
        0xA2 => "wildcard subscriptions not supported",
        _ => "unknown reason",
    }
}

/// A 3.x CONNACK (remaining length 2; a v5 one has at least 3) in answer to our v5 CONNECT:
/// the broker does not speak MQTT 5 (NATS, RabbitMQ before 3.13). Its return code, once the
/// four bytes are there.
fn v3_answer_to_v5(protocol: Protocol, buf: &[u8]) -> Option<u8> {
    (protocol == Protocol::V5 && buf.len() >= 4 && buf[0] == 0x20 && buf[1] == 0x02).then(|| buf[3])
}

/// A CONNACK's code in words, with the code and the broker's reason string.
fn refusal_words(protocol: Protocol, code: u8, reason: Option<&str>) -> String {
    let words = match (protocol, code) {
        (Protocol::V5, code) => reason_name(code),
        (_, 1) => "unsupported protocol version",
        (_, 2) => "client identifier not valid",
        (_, 3) => "server unavailable",
        (_, 4) => "bad user name or password",
        (_, 5) => "not authorized",
        _ => "refused",
    };
    match reason {
        Some(r) => format!("{words} (code {code:#04x}: {r})"),
        None => format!("{words} (code {code:#04x})"),
    }
}

/// A CONNACK refusal: in words, and what to change when the code points at our config.
fn refusal(broker: &BrokerPlan, params: &ConnectParams, c: &ConnAckInfo) -> LinkError {
    let name = &broker.name;
    let v5 = broker.protocol.is_v5();
    let what = refusal_words(broker.protocol, c.code, c.reason.as_deref());
    let hint = match (v5, c.code) {
        (false, 1) | (true, 0x84) => {
            let other = match broker.protocol {
                Protocol::V5 => "\"3.1.1\"",
                Protocol::V311 => "\"5\" or \"3.1\"",
                Protocol::V31 => "\"3.1.1\"",
            };
            format!(
                "; it does not speak MQTT {}: set brokers.{name}.protocol = {other}",
                broker.protocol
            )
        }
        (false, 4 | 5) | (true, 0x86 | 0x87 | 0x8C) => {
            let sent = match (&params.username, &params.password) {
                (Some(u), Some(_)) => format!("username {u:?} and a password were sent"),
                (Some(u), None) => format!("username {u:?} was sent without a password"),
                (None, Some(_)) => "a password was sent without a username".to_string(),
                (None, None) => "no credentials were sent".to_string(),
            };
            format!(
                "; {sent}: check brokers.{name}.username and brokers.{name}.password \
                 (and the broker's ACL for this client id)"
            )
        }
        (false, 2) | (true, 0x85) => format!(
            "; client id {:?}: check brokers.{name}.client_id_prefix (MQTT 3.1 allows 23 \
             characters) and bridge.instance",
            params.client_id
        ),
        (true, 0x8A) => format!(
            "; client id {:?} is banned on this broker",
            params.client_id
        ),
        _ => String::new(),
    };
    LinkError::Refused { what, hint }
}

/// The length of the frame at the start of `buf` (fixed header included), once its Remaining
/// Length is all there; `None` before that or when the Remaining Length is malformed.
/// The head of a PUBLISH of `size` bytes that is over our limit: topic and packet id, once they
/// are in `buf` (`None` until then). Takes what `buf` holds of the packet.
fn too_large_publish(buf: &mut BytesMut, size: usize) -> Option<Inbound> {
    let flags = buf[0] & 0x0f;
    let qos = Qos::from_u8((flags >> 1) & 3)?;
    let header = buf[1..].iter().take(4).position(|b| b & 0x80 == 0)? + 2;
    let topic_len = usize::from(u16::from_be_bytes([
        *buf.get(header)?,
        *buf.get(header + 1)?,
    ]));
    let topic_end = header + 2 + topic_len;
    let id_len = if qos == Qos::AtMostOnce { 0 } else { 2 };
    if buf.len() < topic_end + id_len {
        return None;
    }
    let topic = String::from_utf8_lossy(&buf[header + 2..topic_end]).into_owned();
    let pkid = if id_len == 2 {
        u16::from_be_bytes([buf[topic_end], buf[topic_end + 1]])
    } else {
        0
    };
    let taken = buf.len().min(size);
    let _ = buf.split_to(taken);
    Some(Inbound::TooLarge {
        publish: InboundPublish {
            pkid,
            qos,
            dup: flags & 0x08 != 0,
            retain: flags & 0x01 != 0,
            topic,
            payload: Bytes::new(),
            properties: None,
        },
        size,
        skip: size - taken,
    })
}

fn frame_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for (i, byte) in buf.iter().skip(1).take(4).enumerate() {
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some(1 + (i + 1) + remaining);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(protocol: Protocol, bytes: &[u8]) -> Result<Vec<Inbound>, LinkError> {
        let codec = Codec::new(protocol, 64 * 1024);
        let mut buf = BytesMut::from(bytes);
        let mut out = Vec::new();
        while let Some(p) = codec.decode(&mut buf)? {
            out.push(p);
        }
        Ok(out)
    }

    #[test]
    fn frame_length_counts_the_fixed_header() {
        assert_eq!(frame_len(&[0x40]), None);
        assert_eq!(frame_len(&[0x40, 0x02]), Some(4));
        assert_eq!(frame_len(&[0x30, 0x80]), None);
        assert_eq!(frame_len(&[0x30, 0x80, 0x01]), Some(3 + 128));
        assert_eq!(
            frame_len(&[0x30, 0xff, 0xff, 0xff, 0x7f]),
            Some(5 + 268_435_455)
        );
        assert_eq!(frame_len(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]), None);
    }

    #[test]
    fn a_complete_frame_whose_contents_overrun_it_is_a_protocol_error_not_skipped() {
        // Found by fuzzing (fuzz/seeds/link_decode/known_*): a PUBACK with a truncated property
        // length, and a CONNACK without its properties length.
        for bytes in [
            &[0x40, 0x04, 0x00, 0x01, 0x00, 0x80][..],
            &[0x20, 0x02, 0x00, 0x00],
        ] {
            let err = decode_all(Protocol::V5, bytes).expect_err("a malformed packet");
            assert!(err.to_string().contains("malformed"), "{err}");
        }
    }

    #[test]
    fn an_incomplete_frame_waits_for_more_and_then_decodes() {
        let puback = [0x40u8, 0x03, 0x00, 0x07, 0x00];
        let codec = Codec::new(Protocol::V5, 64 * 1024);
        let mut buf = BytesMut::new();
        for (i, byte) in puback.iter().enumerate() {
            buf.extend_from_slice(&[*byte]);
            let got = codec.decode(&mut buf).expect("no error on a partial frame");
            if i + 1 < puback.len() {
                assert!(got.is_none(), "decoded from {} of 5 bytes", i + 1);
                assert_eq!(buf.len(), i + 1, "a partial frame is left in the buffer");
            } else {
                assert!(
                    matches!(got, Some(Inbound::PubAck { pkid: 7, reason: 0 })),
                    "{got:?}"
                );
            }
        }
    }

    #[test]
    fn good_packets_around_the_check_still_decode_on_every_version() {
        for protocol in [Protocol::V31, Protocol::V311, Protocol::V5] {
            let got = decode_all(protocol, &[0x40, 0x02, 0x00, 0x05, 0xd0, 0x00]).unwrap();
            assert!(
                matches!(
                    got[..],
                    [Inbound::PubAck { pkid: 5, .. }, Inbound::PingResp]
                ),
                "{protocol:?}: {got:?}"
            );
        }
    }

    /// `E0 01 9A` (DISCONNECT, Retain not supported, no properties) is a valid v5 packet; it was
    /// reported as "malformed packet" (issue #14, hole 12), and so was any code rumqttc lacks.
    #[test]
    fn a_v5_disconnect_with_only_a_reason_code_decodes() {
        for reason in [0x9A, 0x8E, 0x89, 0x00, 0xA2] {
            let got = decode_all(Protocol::V5, &[0xE0, 0x01, reason, 0xd0, 0x00]).unwrap();
            assert!(
                matches!(got[..], [Inbound::Disconnect { reason: r }, Inbound::PingResp] if r == reason),
                "{reason:#04x}: {got:?}"
            );
        }
    }
}
