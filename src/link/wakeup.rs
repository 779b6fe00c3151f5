//! Fewer wake-ups under load: a TCP socket's receive low-water mark (`SO_RCVLOWAT`). While a
//! pair lingers (see `pair::linger`, asked for by `pair::machine`), the mark is raised so that the kernel does not wake the
//! process for every packet a broker writes (mosquitto writes one packet per syscall); when the
//! pair is ready to read again the mark drops back to one byte, and Linux signals the socket
//! readable at once if anything arrived meanwhile (`tcp_set_rcvlowat` calls `tcp_data_ready`).
//! Measured: about a third less CPU per forwarded message at high rates (docs/ARCHITECTURE.md).
//!
//! TLS and WebSocket connections run behind a pump task (`transport`) and get no handle here.

use std::os::fd::RawFd;

/// The low-water mark of one connection's socket. It holds only the descriptor number, so it
/// must live exactly as long as the reader half that owns the socket: the driver keeps and
/// drops both together.
#[derive(Debug, Default)]
pub struct WakeThreshold {
    fd: Option<RawFd>,
    /// The mark while raised.
    raised: Option<libc::c_int>,
}

/// Linux caps the mark at half the receive buffer; asking for more means "as much as it can".
const RAISED: libc::c_int = 1 << 20;

impl WakeThreshold {
    pub fn tcp(fd: RawFd) -> WakeThreshold {
        WakeThreshold {
            fd: Some(fd),
            raised: None,
        }
    }

    /// No handle: the connection is not plain TCP.
    pub fn none() -> WakeThreshold {
        WakeThreshold::default()
    }

    /// Wake the process only once much has arrived.
    pub fn raise(&mut self) {
        self.raise_to(RAISED);
    }

    /// Wake the process only once `bytes` have arrived.
    pub fn raise_to(&mut self, bytes: libc::c_int) {
        if self.raised != Some(bytes) && self.set(bytes) {
            self.raised = Some(bytes);
        }
    }

    /// Wake it for any byte again (and now, if bytes are waiting).
    pub fn lower(&mut self) {
        if self.raised.is_some() {
            self.set(1);
            self.raised = None;
        }
    }

    fn set(&self, bytes: libc::c_int) -> bool {
        let Some(fd) = self.fd else {
            return false;
        };
        // SAFETY: `fd` is the descriptor of a socket owned by the reader half this handle lives
        // beside (see the type's doc); setsockopt only reads the `c_int` it is given.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_RCVLOWAT,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        rc == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connected pair whose server side has read everything: a read shorter than its buffer,
    /// so the runtime now waits for the kernel's next wake-up.
    async fn waiting_reader() -> (tokio::net::TcpStream, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, server) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut client, (mut server, _)) = (client.unwrap(), server.unwrap());
        client.write_all(b"a").await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(server.read(&mut buf).await.unwrap(), 1);
        (client, server)
    }

    /// The property the driver relies on: with the mark raised a few bytes do not make the
    /// socket readable; lowering it makes them readable without anything more arriving.
    #[tokio::test]
    async fn lowering_the_mark_wakes_a_reader_for_bytes_that_arrived_while_it_was_raised() {
        let (mut client, mut server) = waiting_reader().await;
        let mut buf = [0u8; 16];
        let mut mark = WakeThreshold::tcp(server.as_raw_fd());
        mark.raise();
        assert!(mark.raised.is_some());
        client.write_all(b"ping").await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), server.read(&mut buf)).await;
        assert!(early.is_err(), "readable below the raised mark: {early:?}");
        mark.lower();
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("readable once the mark is lowered")
            .unwrap();
        assert_eq!(&buf[..n], b"ping");
    }

    #[test]
    fn without_a_socket_it_does_nothing() {
        let mut mark = WakeThreshold::none();
        mark.raise();
        mark.lower();
        assert!(mark.raised.is_none());
    }

    /// What batching acks relies on: with the mark at 8 bytes, one 4-byte ack does not wake the
    /// reader, the second does, and both are read at once.
    #[tokio::test]
    async fn a_mark_of_two_acks_wakes_the_reader_on_the_second() {
        let (mut client, mut server) = waiting_reader().await;
        let mut buf = [0u8; 16];
        let mut mark = WakeThreshold::tcp(server.as_raw_fd());
        mark.raise_to(8);
        client.write_all(&[0x40, 2, 0, 1]).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), server.read(&mut buf)).await;
        assert!(early.is_err(), "readable below the mark: {early:?}");
        client.write_all(&[0x40, 2, 0, 2]).await.unwrap();
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("readable at the mark")
            .unwrap();
        assert_eq!(&buf[..n], &[0x40, 2, 0, 1, 0x40, 2, 0, 2]);
    }
}
