//! MQTT 5 packets, on rumqttc's v5 codec: CONNECT with the window we advertise, PUBLISH with its
//! properties, reason codes turned into numbers.

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::{self, v5};

use super::{ConnAckInfo, ConnectParams, Inbound, InboundPublish, LinkError};
use crate::{
    config::Qos,
    message::{Message, Properties},
};

fn qos(q: Qos) -> mqttbytes::QoS {
    match q {
        Qos::AtMostOnce => mqttbytes::QoS::AtMostOnce,
        Qos::AtLeastOnce => mqttbytes::QoS::AtLeastOnce,
        Qos::ExactlyOnce => mqttbytes::QoS::ExactlyOnce,
    }
}

fn from_qos(q: mqttbytes::QoS) -> Qos {
    match q {
        mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
        mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
        mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

pub(super) fn encode_connect(p: &ConnectParams, buf: &mut BytesMut) {
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(p.session_expiry_secs);
    props.receive_maximum = p.receive_maximum;
    props.max_packet_size = p.maximum_packet_size;
    let connect = v5::Connect {
        keep_alive: p.keep_alive_secs,
        client_id: p.client_id.clone(),
        clean_start: p.clean_start,
        properties: Some(props),
    };
    // MQTT 5 allows a password without a user name (3.1.2.9); rumqttc leaves out an empty
    // user name and sets only the password flag.
    let login = (p.username.is_some() || p.password.is_some()).then(|| {
        v5::Login::new(
            p.username.clone().unwrap_or_default(),
            p.password.as_ref().map(|s| s.expose()).unwrap_or_default(),
        )
    });
    let _ = connect.write(&None, &login, buf);
}

fn puback_code(r: v5::PubAckReason) -> u8 {
    use v5::PubAckReason::*;
    match r {
        Success => 0x00,
        NoMatchingSubscribers => 0x10,
        UnspecifiedError => 0x80,
        ImplementationSpecificError => 0x83,
        NotAuthorized => 0x87,
        TopicNameInvalid => 0x90,
        PacketIdentifierInUse => 0x91,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
    }
}

fn pubrec_code(r: v5::PubRecReason) -> u8 {
    use v5::PubRecReason::*;
    match r {
        Success => 0x00,
        NoMatchingSubscribers => 0x10,
        UnspecifiedError => 0x80,
        ImplementationSpecificError => 0x83,
        NotAuthorized => 0x87,
        TopicNameInvalid => 0x90,
        PacketIdentifierInUse => 0x91,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
    }
}

fn connack_code(c: v5::ConnectReturnCode) -> u8 {
    use v5::ConnectReturnCode::*;
    match c {
        Success => 0,
        RefusedProtocolVersion => 0x84,
        BadClientId => 0x85,
        ServiceUnavailable => 0x88,
        UnspecifiedError => 0x80,
        MalformedPacket => 0x81,
        ProtocolError => 0x82,
        ImplementationSpecificError => 0x83,
        UnsupportedProtocolVersion => 0x84,
        ClientIdentifierNotValid => 0x85,
        BadUserNamePassword => 0x86,
        NotAuthorized => 0x87,
        ServerUnavailable => 0x88,
        ServerBusy => 0x89,
        Banned => 0x8A,
        BadAuthenticationMethod => 0x8C,
        TopicNameInvalid => 0x90,
        PacketTooLarge => 0x95,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
        RetainNotSupported => 0x9A,
        QoSNotSupported => 0x9B,
        UseAnotherServer => 0x9C,
        ServerMoved => 0x9D,
        ConnectionRateExceeded => 0x9F,
    }
}

pub(super) fn decode(buf: &mut BytesMut, max: u32) -> Result<Option<Inbound>, LinkError> {
    // A DISCONNECT with a reason code and no property length (`E0 01 rc`) is valid (MQTT 5
    // 3.14.2.2: "if the Remaining Length is less than 2, a value of 0 is used"); rumqttc reads a
    // property length regardless and calls it malformed, and it refuses reason codes it does
    // not know. Brokers send exactly this when they close a connection with a reason.
    if buf.len() >= 3 && buf[0] == 0xE0 && buf[1] == 1 {
        let reason = buf[2];
        let _ = buf.split_to(3);
        return Ok(Some(Inbound::Disconnect { reason }));
    }
    let packet = match v5::Packet::read(buf, Some(max)) {
        Ok(p) => p,
        Err(mqttbytes::Error::InsufficientBytes(_)) => return Ok(None),
        Err(e) => return Err(LinkError::Protocol(e.to_string())),
    };
    Ok(Some(match packet {
        v5::Packet::ConnAck(c) => {
            let p = c.properties;
            Inbound::ConnAck(ConnAckInfo {
                session_present: c.session_present,
                code: connack_code(c.code),
                receive_maximum: p.as_ref().and_then(|p| p.receive_max),
                maximum_qos: p.as_ref().and_then(|p| p.max_qos),
                maximum_packet_size: p.as_ref().and_then(|p| p.max_packet_size),
                topic_alias_maximum: p.as_ref().and_then(|p| p.topic_alias_max),
                shared_subscription_available: p
                    .as_ref()
                    .and_then(|p| p.shared_subscription_available),
                server_keep_alive: p.as_ref().and_then(|p| p.server_keep_alive),
                retain_available: p.as_ref().and_then(|p| p.retain_available),
                reason: p.as_ref().and_then(|p| p.reason_string.clone()),
            })
        }
        v5::Packet::Publish(p) => {
            let topic = String::from_utf8(p.topic.to_vec())
                .map_err(|_| LinkError::Protocol("PUBLISH topic is not UTF-8".into()))?;
            Inbound::Publish(InboundPublish {
                pkid: p.pkid,
                qos: from_qos(p.qos),
                dup: p.dup,
                retain: p.retain,
                topic,
                payload: p.payload,
                properties: p.properties.map(|pp| {
                    Box::new(Properties {
                        payload_format_indicator: pp.payload_format_indicator,
                        message_expiry_interval: pp.message_expiry_interval,
                        content_type: pp.content_type,
                        response_topic: pp.response_topic,
                        correlation_data: pp.correlation_data,
                        user_properties: pp.user_properties,
                    })
                }),
            })
        }
        v5::Packet::PubAck(a) => Inbound::PubAck {
            pkid: a.pkid,
            reason: puback_code(a.reason),
        },
        v5::Packet::PubRec(a) => Inbound::PubRec {
            pkid: a.pkid,
            reason: pubrec_code(a.reason),
        },
        v5::Packet::PubRel(a) => Inbound::PubRel { pkid: a.pkid },
        v5::Packet::PubComp(a) => Inbound::PubComp { pkid: a.pkid },
        v5::Packet::SubAck(s) => Inbound::SubAck {
            pkid: s.pkid,
            codes: s
                .return_codes
                .iter()
                .map(|c| match c {
                    v5::SubscribeReasonCode::Success(q) => *q as u8,
                    _ => 0x80,
                })
                .collect(),
        },
        v5::Packet::UnsubAck(u) => Inbound::UnsubAck { pkid: u.pkid },
        v5::Packet::PingResp(_) => Inbound::PingResp,
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
        },
        other => Inbound::Unexpected(format!("{other:?}").chars().take(40).collect()),
    }))
}

pub(super) fn encode_publish(
    pkid: u16,
    dup: bool,
    m: &Message,
    expiry: Option<u32>,
    buf: &mut BytesMut,
) {
    let properties = m.properties.as_deref().map(|p| v5::PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: expiry.or(p.message_expiry_interval),
        topic_alias: None,
        response_topic: p.response_topic.clone(),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        subscription_identifiers: Vec::new(),
        content_type: p.content_type.clone(),
    });
    let publish = v5::Publish {
        dup,
        qos: qos(m.qos),
        retain: m.retain,
        topic: bytes::Bytes::copy_from_slice(m.topic.as_bytes()),
        pkid: if m.qos == Qos::AtMostOnce { 0 } else { pkid },
        payload: m.payload.clone(),
        properties,
    };
    let _ = publish.write(buf);
}

pub(super) fn encode_unsubscribe(pkid: u16, filters: &[String], buf: &mut BytesMut) {
    let unsub = v5::Unsubscribe {
        pkid,
        filters: filters.to_vec(),
        properties: None,
    };
    let _ = unsub.write(buf);
}

pub(super) fn encode_subscribe(
    pkid: u16,
    filters: &[String],
    q: Qos,
    retained_copies: bool,
    buf: &mut BytesMut,
) {
    let sub = v5::Subscribe {
        pkid,
        filters: filters
            .iter()
            .map(|f| v5::Filter {
                path: f.clone(),
                qos: qos(q),
                // No Local is forbidden on shared subscriptions; loops are cut by markers.
                nolocal: false,
                // Retain As Published: forward the retain flag as the publisher set it.
                preserve_retain: true,
                // A retained message is forwarded once per route, not once per pair nor again
                // on every reconnect (SPEC 4.5): pair 0 asks for it on a new subscription only.
                retain_forward_rule: if retained_copies {
                    v5::RetainForwardRule::OnNewSubscribe
                } else {
                    v5::RetainForwardRule::Never
                },
            })
            .collect(),
        properties: None,
    };
    let _ = sub.write(buf);
}

pub(super) fn encode_disconnect(buf: &mut BytesMut) {
    let d = v5::Disconnect {
        reason_code: v5::DisconnectReasonCode::NormalDisconnection,
        properties: None,
    };
    let _ = d.write(buf);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::ConnectParams;

    fn params(username: Option<&str>, password: Option<&str>) -> ConnectParams {
        ConnectParams {
            client_id: "c".into(),
            clean_start: true,
            keep_alive_secs: 30,
            session_expiry_secs: 0,
            username: username.map(str::to_string),
            password: password.map(|p| crate::config::Secret::new(p.to_string())),
            receive_maximum: None,
            maximum_packet_size: None,
            try_private: false,
        }
    }

    fn login_of(p: &ConnectParams) -> Option<(String, String)> {
        let mut buf = BytesMut::new();
        encode_connect(p, &mut buf);
        match v5::Packet::read(&mut buf, None).expect("a valid CONNECT") {
            v5::Packet::Connect(_, _, login) => login.map(|l| (l.username, l.password)),
            other => panic!("{other:?}"),
        }
    }

    /// Issue #14, hole 13: a v5 password without a user name was never sent.
    #[test]
    fn a_password_without_a_user_name_is_sent_on_v5() {
        assert_eq!(
            login_of(&params(None, Some("s3cret"))),
            Some((String::new(), "s3cret".into()))
        );
        assert_eq!(
            login_of(&params(Some("u"), Some("p"))),
            Some(("u".into(), "p".into()))
        );
        assert_eq!(login_of(&params(None, None)), None);
    }
}
