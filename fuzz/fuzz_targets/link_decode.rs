//! The link codec's decoder on arbitrary bytes from a broker, for each protocol: it must never
//! panic, never hand out a packet without consuming bytes (the driver would spin), and give the
//! same packets whether the bytes arrive at once or in pieces (the socket splits them anywhere).
//!
//! Input: byte 0 picks the protocol, byte 1 the size of the pieces, the rest is the stream.
//!
//! A complete but malformed frame whose inner lengths overrun it (e.g. an MQTT 5 PUBACK
//! `40 04 00 01 00 80`, found by this target) used to come back as `Ok(None)` with its bytes
//! consumed, silently skipping the packet; `Codec::decode` now reports it as a protocol error.
//! `MQBRIDGE_FUZZ_STRICT=1` keeps the check that no `Ok(None)` consumes bytes a crash; without it
//! such a skip is tolerated and counted as a `None` packet.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use mqbridge::config::Protocol;
use mqbridge::link::{Codec, Inbound};
use std::sync::OnceLock;

/// Small, so that oversize packets are exercised too.
const MAX_INCOMING: u32 = 64 * 1024;

fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("MQBRIDGE_FUZZ_STRICT").is_some())
}

/// Every packet the stream decodes to (a skipped malformed frame shows as `None`), and whether
/// decoding ended in an error.
fn decode_all(codec: &Codec, stream: &[u8], piece: usize) -> (Vec<Option<Inbound>>, bool) {
    let mut buf = BytesMut::new();
    let mut packets = Vec::new();
    for chunk in stream.chunks(piece.max(1)) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match codec.decode(&mut buf) {
                Ok(Some(p)) => {
                    assert!(buf.len() < before, "a packet decoded from no bytes: {p:?}");
                    packets.push(Some(p));
                }
                Ok(None) if buf.len() < before => {
                    assert!(!strict(), "Ok(None) consumed {} bytes", before - buf.len());
                    packets.push(None);
                }
                Ok(None) => break,
                Err(_) => return (packets, true),
            }
        }
    }
    (packets, false)
}

fuzz_target!(|data: &[u8]| {
    let [which, piece, stream @ ..] = data else {
        return;
    };
    let protocol = match which % 3 {
        0 => Protocol::V31,
        1 => Protocol::V311,
        _ => Protocol::V5,
    };
    let codec = Codec::new(protocol, MAX_INCOMING);
    let (whole, whole_failed) = decode_all(&codec, stream, stream.len());
    let (pieces, pieces_failed) = decode_all(&codec, stream, usize::from(*piece % 16) + 1);
    assert_eq!(
        whole_failed, pieces_failed,
        "{protocol:?}: error at once vs in pieces"
    );
    assert_eq!(whole, pieces, "{protocol:?}: packets at once vs in pieces");
});
