//! The generator's side of MQTT 3.1.1. CONNECT and SUBSCRIBE go through rumqttc's v4 encoders;
//! PUBLISH and the acks on the hot path are written and scanned by hand, in place, so that the
//! generator costs a few hundred nanoseconds per message and never allocates per message.

use std::{io, net::SocketAddr};

use bytes::{Buf, BufMut, BytesMut};
use rumqttc::mqttbytes::{QoS, v4};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

/// Measured messages are published here; `FILTER` takes them (and the probes) everywhere.
pub const MEASURE_TOPIC: &[u8] = b"bench/m";
/// Probes that show the path is up before a measurement starts; never counted.
pub const PROBE_TOPIC: &[u8] = b"bench/p";
pub const FILTER: &str = "bench/#";
/// Message id (u64 LE) then send time (ns since the run's base instant, u64 LE).
pub const HEADER_LEN: usize = 16;

pub const PUBACK: u8 = 0x40;
pub const PUBREC: u8 = 0x50;
pub const PUBREL: u8 = 0x62;
pub const PUBCOMP: u8 = 0x70;

fn qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn protocol_error(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

/// A connected, CONNACKed MQTT 3.1.1 session (clean, no keep-alive) and whatever the broker sent
/// after the CONNACK.
pub struct Session {
    pub stream: TcpStream,
    pub rbuf: BytesMut,
}

impl Session {
    pub async fn connect(addr: SocketAddr, client_id: &str) -> io::Result<Session> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut session = Session {
            stream,
            rbuf: BytesMut::with_capacity(64 * 1024),
        };
        let mut connect = v4::Connect::new(client_id);
        // No PINGREQ/PINGRESP traffic during a measurement.
        connect.keep_alive = 0;
        connect.clean_session = true;
        let mut buf = BytesMut::new();
        connect.write(&mut buf).map_err(protocol_error)?;
        session.stream.write_all(&buf).await?;
        match session.next_control_packet().await? {
            v4::Packet::ConnAck(ack) if ack.code == v4::ConnectReturnCode::Success => Ok(session),
            other => Err(protocol_error(format!(
                "{addr} refused {client_id}: {other:?}"
            ))),
        }
    }

    pub async fn subscribe(&mut self, filter: &str, q: u8) -> io::Result<()> {
        let mut subscribe = v4::Subscribe::new(filter, qos(q));
        subscribe.pkid = 1;
        let mut buf = BytesMut::new();
        subscribe.write(&mut buf).map_err(protocol_error)?;
        self.stream.write_all(&buf).await?;
        match self.next_control_packet().await? {
            v4::Packet::SubAck(ack)
                if !ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, v4::SubscribeReasonCode::Failure)) =>
            {
                Ok(())
            }
            other => Err(protocol_error(format!("SUBSCRIBE {filter}: {other:?}"))),
        }
    }

    /// Reads until one whole packet is there (only during setup: it allocates).
    async fn next_control_packet(&mut self) -> io::Result<v4::Packet> {
        loop {
            match v4::Packet::read(&mut self.rbuf, 1 << 20) {
                Ok(packet) => return Ok(packet),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => return Err(protocol_error(e)),
            }
            if self.stream.read_buf(&mut self.rbuf).await? == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
        }
    }
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
            return;
        }
    }
}

/// Appends one PUBLISH whose payload is `id`, `sent_ns` and zeros up to `payload_len` bytes
/// (at least `HEADER_LEN`).
pub fn put_publish(
    buf: &mut BytesMut,
    topic: &[u8],
    q: u8,
    pkid: u16,
    id: u64,
    sent_ns: u64,
    payload_len: usize,
) {
    let pkid_len = if q > 0 { 2 } else { 0 };
    buf.put_u8(0x30 | (q << 1));
    put_remaining_length(buf, 2 + topic.len() + pkid_len + payload_len);
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic);
    if q > 0 {
        buf.put_u16(pkid);
    }
    buf.put_u64_le(id);
    buf.put_u64_le(sent_ns);
    buf.put_bytes(0, payload_len - HEADER_LEN);
}

/// Appends PUBACK, PUBREC, PUBREL or PUBCOMP.
pub fn put_ack(buf: &mut BytesMut, kind: u8, pkid: u16) {
    buf.put_u8(kind);
    buf.put_u8(2);
    buf.put_u16(pkid);
}

/// One packet seen in place in a read buffer.
pub enum Packet<'a> {
    Publish {
        qos: u8,
        pkid: u16,
        topic: &'a [u8],
        payload: &'a [u8],
    },
    /// PUBACK, PUBREC, PUBREL or PUBCOMP: the first byte and the packet id.
    Ack { kind: u8, pkid: u16 },
    /// Anything else (PINGRESP, SUBACK of a late subscription…): skipped.
    Other,
}

/// The packet at the start of `buf` and its length, or `None` while it is incomplete.
pub fn scan(buf: &[u8]) -> io::Result<Option<(Packet<'_>, usize)>> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let byte1 = buf[0];
    let mut remaining = 0usize;
    let mut shift = 0;
    let mut at = 1;
    loop {
        let Some(&b) = buf.get(at) else {
            return Ok(None);
        };
        remaining |= ((b & 0x7f) as usize) << shift;
        at += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(protocol_error("malformed remaining length"));
        }
    }
    let total = at + remaining;
    if buf.len() < total {
        return Ok(None);
    }
    let mut body = &buf[at..total];
    let packet = match byte1 >> 4 {
        3 => {
            let q = (byte1 >> 1) & 3;
            if body.len() < 2 {
                return Err(protocol_error("short PUBLISH"));
            }
            let topic_len = body.get_u16() as usize;
            let need = topic_len + if q > 0 { 2 } else { 0 };
            if body.len() < need {
                return Err(protocol_error("short PUBLISH"));
            }
            let topic = &body[..topic_len];
            body = &body[topic_len..];
            let pkid = if q > 0 { body.get_u16() } else { 0 };
            Packet::Publish {
                qos: q,
                pkid,
                topic,
                payload: body,
            }
        }
        4..=7 if body.len() >= 2 => Packet::Ack {
            kind: byte1,
            pkid: u16::from_be_bytes([body[0], body[1]]),
        },
        _ => Packet::Other,
    };
    Ok(Some((packet, total)))
}

/// The id and send time carried by a measured message's payload.
pub fn read_header(payload: &[u8]) -> Option<(u64, u64)> {
    let id = payload.get(..8)?;
    let sent = payload.get(8..16)?;
    Some((
        u64::from_le_bytes(id.try_into().ok()?),
        u64::from_le_bytes(sent.try_into().ok()?),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publish_reads_back() {
        let mut buf = BytesMut::new();
        put_publish(&mut buf, MEASURE_TOPIC, 1, 7, 42, 99, 4096);
        put_ack(&mut buf, PUBREL, 9);
        let (packet, len) = scan(&buf).unwrap().unwrap();
        match packet {
            Packet::Publish {
                qos,
                pkid,
                topic,
                payload,
            } => {
                assert_eq!((qos, pkid, topic), (1, 7, MEASURE_TOPIC));
                assert_eq!(payload.len(), 4096);
                assert_eq!(read_header(payload), Some((42, 99)));
            }
            _ => panic!("not a publish"),
        }
        let (packet, _) = scan(&buf[len..]).unwrap().unwrap();
        assert!(matches!(
            packet,
            Packet::Ack {
                kind: PUBREL,
                pkid: 9
            }
        ));
        assert!(scan(&buf[..len - 1]).unwrap().is_none());
    }
}
