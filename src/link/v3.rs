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
        v4::Packet::PingResp => Inbound::PingResp,
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect { reason: 0 },
        other => Inbound::Unexpected(format!("{other:?}").chars().take(40).collect()),
    }))
}

pub(super) fn encode_publish(pkid: u16, dup: bool, m: &Message, buf: &mut BytesMut) {
    let publish = v4::Publish {
        dup,
        qos: qos(m.qos),
        retain: m.retain,
        topic: m.topic.clone(),
        pkid: if m.qos == Qos::AtMostOnce { 0 } else { pkid },
        payload: m.payload.clone(),
    };
    // Only fails for a topic or payload over the protocol's limits, checked before we get here.
    let _ = publish.write(buf);
}

pub(super) fn encode_ack(kind: u8, pkid: u16, buf: &mut BytesMut) {
    // PUBACK 0x40, PUBREC 0x50, PUBREL 0x62, PUBCOMP 0x70: all four bytes, same shape.
    buf.put_u8(kind);
    buf.put_u8(2);
    buf.put_u16(pkid);
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
