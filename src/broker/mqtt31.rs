//! MQTT 3.1 for the embedded broker. ntex-mqtt's server accepts only protocol name `MQTT`
//! (levels 4 and 5), so a 3.1 CONNECT (`MQIsdp`, level 3) is rewritten to its 3.1.1 form
//! before ntex-mqtt reads it; every later packet of 3.1 is the same as 3.1.1.

/// What the first bytes of a connection say about its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sniff {
    /// Not enough bytes yet.
    NeedMore,
    /// A 3.1 CONNECT whose whole packet is `len` bytes long.
    Mqtt31 { len: usize },
    /// Anything else: left to ntex-mqtt.
    Other,
}

/// Looks at the start of a connection (at least the fixed header and protocol name).
pub(crate) fn sniff(buf: &[u8]) -> Sniff {
    if buf.is_empty() {
        return Sniff::NeedMore;
    }
    if buf[0] != 0x10 {
        return Sniff::Other;
    }
    let Some((remaining, header)) = remaining_length(&buf[1..]) else {
        return if buf.len() < 5 {
            Sniff::NeedMore
        } else {
            Sniff::Other
        };
    };
    let start = 1 + header;
    let name = b"\x00\x06MQIsdp\x03";
    let have = &buf[start.min(buf.len())..];
    let n = have.len().min(name.len());
    if have[..n] != name[..n] {
        return Sniff::Other;
    }
    if n < name.len() {
        return Sniff::NeedMore;
    }
    Sniff::Mqtt31 {
        len: start + remaining,
    }
}

/// The 3.1.1 form of a whole 3.1 CONNECT packet: protocol name `MQTT`, level 4, the rest
/// (flags, keep alive, payload) unchanged. `None` if `packet` is not a 3.1 CONNECT.
pub(crate) fn rewrite_connect(packet: &[u8]) -> Option<Vec<u8>> {
    let Sniff::Mqtt31 { len } = sniff(packet) else {
        return None;
    };
    if packet.len() != len {
        return None;
    }
    let (remaining, header) = remaining_length(&packet[1..])?;
    // "\0\x06MQIsdp\x03" (9 bytes) becomes "\0\x04MQTT\x04" (7 bytes).
    let rest = &packet[1 + header + 9..];
    let new_remaining = remaining - 2;
    let mut out = Vec::with_capacity(packet.len());
    out.push(0x10);
    encode_remaining_length(new_remaining, &mut out);
    out.extend_from_slice(b"\x00\x04MQTT\x04");
    out.extend_from_slice(rest);
    Some(out)
}

/// Decodes an MQTT Remaining Length: (value, bytes used).
fn remaining_length(buf: &[u8]) -> Option<(usize, usize)> {
    let mut value = 0usize;
    for (i, &b) in buf.iter().take(4).enumerate() {
        value |= usize::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

fn encode_remaining_length(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect31(client_id: &str) -> Vec<u8> {
        let mut body = b"\x00\x06MQIsdp\x03\x02\x00\x3c".to_vec();
        body.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        body.extend_from_slice(client_id.as_bytes());
        let mut p = vec![0x10];
        encode_remaining_length(body.len(), &mut p);
        p.extend(body);
        p
    }

    #[test]
    fn rewrites_a_31_connect_to_311() {
        let p = connect31("abc");
        assert_eq!(sniff(&p[..4]), Sniff::NeedMore);
        assert_eq!(sniff(&p), Sniff::Mqtt31 { len: p.len() });
        let out = rewrite_connect(&p).unwrap();
        assert_eq!(
            out,
            b"\x10\x0f\x00\x04MQTT\x04\x02\x00\x3c\x00\x03abc".to_vec()
        );
    }

    #[test]
    fn long_connects_shrink_their_length_field() {
        // 128 bytes of remaining length take two bytes; 126 take one.
        let id = "x".repeat(128 - 14);
        let p = connect31(&id);
        assert_eq!(p[1] & 0x80, 0x80);
        let out = rewrite_connect(&p).unwrap();
        assert_eq!(out[1], 126);
        assert_eq!(out.len(), p.len() - 3);
    }

    #[test]
    fn leaves_311_and_5_alone() {
        assert_eq!(sniff(b"\x10\x0f\x00\x04MQTT\x04\x02"), Sniff::Other);
        assert_eq!(sniff(b"\x30\x00"), Sniff::Other);
    }
}
