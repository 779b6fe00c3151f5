//! A tiny MQTT-over-WebSocket front for a real mosquitto: accepts WebSocket connections (ws://, or
//! wss:// with a given certificate) on a private port and relays binary frames to and from the
//! broker's TCP port. Debian's mosquitto is built without websockets, so this is how the bridge's
//! WebSocket transport meets a real broker in tests. It records what the clients asked for
//! (subprotocol, path) and every frame kind it saw, so a test can check the bridge spoke MQTT
//! over WebSocket properly.

use std::path::Path;
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{ErrorResponse, Request, Response},
    http::{HeaderValue, StatusCode},
};

/// What the relay saw, across all its connections.
#[derive(Debug, Default, Clone)]
pub struct RelaySeen {
    /// Handshakes accepted.
    pub connections: usize,
    /// `Sec-WebSocket-Protocol` of each handshake (`""` when absent).
    pub protocols: Vec<String>,
    /// Request path of each handshake.
    pub paths: Vec<String>,
    pub binary_frames: usize,
    /// Text frames: MQTT over WebSocket forbids them.
    pub text_frames: usize,
}

/// A running relay; dropping it stops accepting and ends every relayed connection.
pub struct WsRelay {
    port: u16,
    seen: Arc<Mutex<RelaySeen>>,
    task: JoinHandle<()>,
}

impl WsRelay {
    /// ws:// on a free port of 127.0.0.1, relaying to `127.0.0.1:broker_port`. Only `path` is
    /// served; any other path is answered with 404, as a broker would.
    pub async fn start(broker_port: u16, path: &str) -> WsRelay {
        WsRelay::start_inner(broker_port, path, None).await
    }

    /// wss:// with the PEM certificate chain and key given (e.g. `make-dev-certs.sh`'s server).
    pub async fn start_tls(broker_port: u16, path: &str, cert: &Path, key: &Path) -> WsRelay {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|i| i.collect())
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", cert.display()));
        let key = PrivateKeyDer::from_pem_file(key)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", key.display()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate and key");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        WsRelay::start_inner(broker_port, path, Some(acceptor)).await
    }

    async fn start_inner(
        broker_port: u16,
        path: &str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> WsRelay {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the WebSocket relay");
        let port = listener.local_addr().expect("relay address").port();
        let seen = Arc::new(Mutex::new(RelaySeen::default()));
        let path = path.to_owned();
        let task = {
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((tcp, _)) = listener.accept().await {
                    let (seen, path, tls) = (seen.clone(), path.clone(), tls.clone());
                    connections.spawn(async move {
                        match tls {
                            Some(acceptor) => {
                                if let Ok(stream) = acceptor.accept(tcp).await {
                                    relay(stream, broker_port, &path, &seen).await;
                                }
                            }
                            None => relay(tcp, broker_port, &path, &seen).await,
                        }
                    });
                }
            })
        };
        WsRelay { port, seen, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn seen(&self) -> RelaySeen {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for WsRelay {
    fn drop(&mut self) {
        // Aborting the accept loop drops its JoinSet, which aborts every relayed connection.
        self.task.abort();
    }
}

/// One client: WebSocket handshake, then frames ↔ the broker's TCP stream until either closes.
// The handshake callback's `Result<Response, ErrorResponse>` is tungstenite's signature.
#[allow(clippy::result_large_err)]
async fn relay<S>(stream: S, broker_port: u16, path: &str, seen: &Mutex<RelaySeen>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let callback = |req: &Request, mut resp: Response| -> Result<Response, ErrorResponse> {
        let protocol = req
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let mut s = seen.lock().unwrap();
        s.protocols.push(protocol.clone());
        s.paths.push(req.uri().path().to_owned());
        if req.uri().path() != path {
            let mut not_found = ErrorResponse::new(Some("no MQTT endpoint here".into()));
            *not_found.status_mut() = StatusCode::NOT_FOUND;
            return Err(not_found);
        }
        if protocol.split(',').any(|p| p.trim() == "mqtt") {
            resp.headers_mut()
                .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(resp)
    };
    let Ok(ws) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
        return;
    };
    seen.lock().unwrap().connections += 1;
    let Ok(mut tcp) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
        return;
    };
    let (mut ws_tx, mut ws_rx) = ws.split();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            frame = ws_rx.next() => match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    seen.lock().unwrap().binary_frames += 1;
                    if tcp.write_all(&bytes).await.is_err() {
                        break;
                    }
                }
                Some(Ok(Message::Text(_))) => {
                    seen.lock().unwrap().text_frames += 1;
                    break;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
                Some(Ok(_)) => {}
            },
            n = tcp.read(&mut buf) => match n {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let frame = Message::Binary(buf[..n].to_vec().into());
                    if ws_tx.send(frame).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = ws_tx.close().await;
}
