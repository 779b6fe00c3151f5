//! MQTT 3.1 and 3.1.1 packets, on rumqttc's v4 codec. The two versions differ on the wire only in
//! CONNECT (protocol name `MQIsdp` and level 3 for 3.1), which we write ourselves.

use bytes::{BufMut, BytesMut};
use rumqttc::mqttbytes::{self, QoS, v4};

use super::{ConnAckInfo, ConnectParams, Inbound, InboundPublish, LinkError};
use crate::{config::Qos, message::Message};

fn qos(q: Qos) -> QoS {
    match q {
        Qos::AtMostOnce => QoS::AtMostOnce,
        Qos::AtLeastOnce => QoS::AtLeastOnce,
        Qos::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn from_qos(q: QoS) -> Qos {
    match q {
        QoS::AtMostOnce => Qos::AtMostOnce,
        QoS::AtLeastOnce => Qos::AtLeastOnce,
        QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

pub(super) fn encode_connect(p: &ConnectParams, level: u8, buf: &mut BytesMut) {
    let name: &[u8] = if level & 0x7f == 3 {
        b"MQIsdp"
    } else {
        b"MQTT"
    };
    let mut flags = 0u8;
    if p.clean_start {
        flags |= 0x02;
    }
    let mut payload = BytesMut::new();
    put_str(&mut payload, p.client_id.as_bytes());
    if let Some(user) = &p.username {
        flags |= 0x80;
        put_str(&mut payload, user.as_bytes());
    }
    if let Some(pass) = &p.password {
        flags |= 0x40;
        put_str(&mut payload, pass.expose().as_bytes());
    }
    let remaining = 2 + name.len() + 1 + 1 + 2 + payload.len();
    buf.put_u8(0x10);
    put_remaining_length(buf, remaining);
    put_str(buf, name);
    buf.put_u8(level);
    buf.put_u8(flags);
    buf.put_u16(p.keep_alive_secs);
    buf.extend_from_slice(&payload);
}

fn put_str(buf: &mut BytesMut, s: &[u8]) {
    buf.put_u16(s.len() as u16);
    buf.extend_from_slice(s);
}

fn put_remaining_length(buf: &mut BytesMut, mut len: usize) {
    loop {
        let mut byte = (len % 128) as u8;
        len /= 128;
        if len > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if len == 0 {
            break;
        }
    }
}

pub(super) fn decode(buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, LinkError> {
    let packet = match v4::Packet::read(buf, max) {
        Ok(p) => p,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(LinkError::Protocol(e.to_string())),
    };
    Ok(Some(match packet {
        v4::Packet::ConnAck(c) => Inbound::ConnAck(ConnAckInfo {
            session_present: c.session_present,
            code: c.code as u8,
            ..ConnAckInfo::default()
        }),
        v4::Packet::Publish(p) => Inbound::Publish(InboundPublish {
            pkid: p.pkid,
            qos: from_qos(p.qos),
            dup: p.dup,
            retain: p.retain,
            topic: p.topic,
            payload: p.payload,
            properties: None,
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck {
            pkid: a.pkid,
            reason: 0,
        },
        v4::Packet::PubRec(a) => Inbound::PubRec {
            pkid: a.pkid,
            reason: 0,
        },
        v4::Packet::PubRel(a) => Inbound::PubRel { pkid: a.pkid },
        v4::Packet::PubComp(a) => Inbound::PubComp { pkid: a.pkid },
        v4::Packet::SubAck(s) => Inbound::SubAck {
            pkid: s.pkid,
            codes: s
                .return_codes
                .iter()
                .map(|c| match c {
                    v4::SubscribeReasonCode::Success(q) => *q as u8,
                    v4::SubscribeReasonCode::Failure => 0x80,
                })
                .collect(),
        },
        v4::Packet::UnsubAck(u) => Inbound::UnsubAck { pkid: u.pkid },
        v4::Packet::PingResp => Inbound::PingResp,
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect { reason: 0 },
        other => Inbound::Unexpected(format!("{other:?}").chars().take(40).collect()),
    }))
}

/// PUBLISH, written directly: it is the per-message path, and rumqttc's `Publish` would need
/// an owned copy of the topic for every message.
pub(super) fn encode_publish(pkid: u16, dup: bool, m: &Message, buf: &mut BytesMut) {
    let with_id = m.qos != Qos::AtMostOnce;
    let remaining = 2 + m.topic.len() + if with_id { 2 } else { 0 } + m.payload.len();
    let mut first = 0x30 | ((m.qos as u8) << 1);
    if dup && with_id {
        first |= 0x08;
    }
    if m.retain {
        first |= 0x01;
    }
    buf.reserve(5 + remaining);
    buf.put_u8(first);
    put_remaining_length(buf, remaining);
    put_str(buf, m.topic.as_bytes());
    if with_id {
        buf.put_u16(pkid);
    }
    buf.extend_from_slice(&m.payload);
}

pub(super) fn encode_ack(kind: u8, pkid: u16, buf: &mut BytesMut) {
    // PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70: all four bytes, same shape.
    buf.put_u8(kind);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

pub(super) fn encode_unsubscribe(pkid: u16, filters: &[String], buf: &mut BytesMut) {
    let unsub = v4::Unsubscribe {
        pkid,
        topics: filters.to_vec(),
    };
    let _ = unsub.write(buf);
}

pub(super) fn encode_subscribe(pkid: u16, filters: &[String], q: Qos, buf: &mut BytesMut) {
    let sub = v4::Subscribe {
        pkid,
        filters: filters
            .iter()
            .map(|f| v4::SubscribeFilter::new(f.clone(), qos(q)))
            .collect(),
    };
    let _ = sub.write(buf);
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;

    /// Our hand-written PUBLISH decodes to the same packet with rumqttc's decoder.
    #[test]
    fn publish_round_trips_through_rumqttc() {
        for (qos, dup, retain, payload_len) in [
            (Qos::AtMostOnce, false, false, 0),
            (Qos::AtLeastOnce, true, true, 200),
            (Qos::ExactlyOnce, false, true, 20_000),
        ] {
            let m = Message {
                topic: "a/b/ü".into(),
                payload: Bytes::from(vec![7u8; payload_len]),
                qos,
                retain,
                properties: None,
                expires_at: None,
                source_topic: None,
            };
            let mut buf = BytesMut::new();
            encode_publish(42, dup, &m, &mut buf);
            match decode(&mut buf, 1 << 20).unwrap().unwrap() {
                Inbound::Publish(p) => {
                    assert_eq!(p.topic, m.topic);
                    assert_eq!(p.payload, m.payload);
                    assert_eq!((p.qos, p.retain), (qos, retain));
                    assert_eq!(p.dup, dup && qos != Qos::AtMostOnce);
                    assert_eq!(p.pkid, if qos == Qos::AtMostOnce { 0 } else { 42 });
                }
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
        }
    }
}
