//! How bytes reach a broker: plain TCP, TLS (rustls), MQTT over WebSocket, or WebSocket over TLS.
//! `open` hands the pair driver two boxed halves it reads and writes like a TCP socket; the MQTT
//! layer above never knows which transport it runs on.
//!
//! Plain TCP is split directly. TLS and WebSocket run behind a small pump task and a bounded
//! in-memory pipe, because the driver only ever calls `write` (never `flush`): a TLS or WebSocket
//! stream may keep accepted bytes in its own buffer until flushed, and nobody would flush them.

use std::{
    collections::HashMap,
    io,
    path::{Path, PathBuf},
    pin::Pin,
    sync::{Arc, LazyLock, Mutex, OnceLock},
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rustls::{
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime, pem::PemObject},
};
use tokio::{
    io::{
        AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf, ReadHalf,
        WriteHalf,
    },
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::TlsConnector;
use tokio_tungstenite::{
    WebSocketStream,
    tungstenite::{
        Message as WsMessage, client::IntoClientRequest, http::HeaderValue,
        protocol::frame::coding::CloseCode,
    },
};
use tracing::{debug, warn};

use super::{LinkError, wakeup::WakeThreshold};
use crate::config::{BrokerPlan, TlsPlan, Transport};

/// What the pair driver reads from.
pub type Reader = Box<dyn AsyncRead + Send + Unpin>;
/// What the pair driver writes to.
pub type Writer = Box<dyn AsyncWrite + Send + Unpin>;

/// Each step of opening a connection (TCP, TLS, WebSocket) must finish within this.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes held in each direction of the pipe between the driver and a pump task. Bounded, so a
/// slow broker pushes back on the driver exactly as a full socket would.
const PIPE_BYTES: usize = 64 * 1024;
/// Largest chunk the pump moves at once (and so the largest WebSocket frame we send).
const CHUNK: usize = 16 * 1024;
/// After the driver let go of a connection, how long the pump may still spend delivering what
/// the driver wrote last (its DISCONNECT) before it closes the socket regardless.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Opens the transport to `broker`: TCP, then the TLS and/or WebSocket handshakes it needs.
/// The wake-up threshold is the TCP socket's when the driver reads the socket itself.
pub async fn open(broker: &BrokerPlan) -> Result<(Reader, Writer, WakeThreshold), LinkError> {
    let addr = display_addr(&broker.host, broker.port);
    let tcp = step(
        "TCP connect",
        &addr,
        TcpStream::connect((broker.host.as_str(), broker.port)),
    )
    .await?
    .map_err(|source| LinkError::Connect {
        addr: addr.clone(),
        source,
    })?;
    tcp.set_nodelay(true)?;
    match broker.transport {
        Transport::Tcp => {
            let threshold = WakeThreshold::tcp(std::os::fd::AsRawFd::as_raw_fd(&tcp));
            let (r, w) = tcp.into_split();
            Ok((Box::new(r), Box::new(w), threshold))
        }
        Transport::Tls => {
            let tls = tls_handshake(broker, &addr, tcp).await?;
            let (r, w) = spawn_pump(&broker.name, "TLS", StreamPump(tls));
            Ok((r, w, WakeThreshold::none()))
        }
        Transport::Ws => {
            let ws = ws_handshake(broker, &addr, tcp).await?;
            let (r, w) = spawn_pump(&broker.name, "WebSocket", WsPump(ws));
            Ok((r, w, WakeThreshold::none()))
        }
        Transport::Wss => {
            let tls = tls_handshake(broker, &addr, tcp).await?;
            let ws = ws_handshake(broker, &addr, tls).await?;
            let (r, w) = spawn_pump(&broker.name, "WebSocket over TLS", WsPump(ws));
            Ok((r, w, WakeThreshold::none()))
        }
    }
}

/// Builds (once) the TLS settings of every broker that uses TLS, so that unreadable certificates
/// fail the start rather than every connection attempt, and `insecure_skip_verify` is warned
/// about at start, once per broker.
pub fn prepare<'a>(brokers: impl IntoIterator<Item = &'a BrokerPlan>) -> Result<(), LinkError> {
    for broker in brokers {
        tls_config(broker)?;
    }
    Ok(())
}

/// Builds every broker's TLS configuration again from its files (a SIGHUP: certificates and keys
/// rotated at the same paths are read anew) and, only if all of them build, puts them in place
/// of the old ones: every connection made from then on, by kept routes too, uses them.
pub fn reload_tls<'a>(brokers: impl IntoIterator<Item = &'a BrokerPlan>) -> Result<(), LinkError> {
    let mut fresh = Vec::new();
    for broker in brokers {
        if let Some(tls) = &broker.tls {
            fresh.push((
                config_key(broker, tls),
                Arc::new(build_tls_config(&broker.name, tls)?),
            ));
        }
    }
    let mut configs = CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    configs.extend(fresh);
    Ok(())
}

fn config_key(broker: &BrokerPlan, tls: &TlsPlan) -> ConfigKey {
    ConfigKey {
        broker: broker.name.clone(),
        ca_file: tls.ca_file.clone(),
        cert_file: tls.cert_file.clone(),
        key_file: tls.key_file.clone(),
        insecure_skip_verify: tls.insecure_skip_verify,
    }
}

/// `host:port`, with brackets around an IPv6 address.
fn display_addr(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Runs one step of the connection set-up with a deadline.
async fn step<T>(
    step: &'static str,
    addr: &str,
    fut: impl Future<Output = T>,
) -> Result<T, LinkError> {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .map_err(|_| LinkError::StepTimeout {
            step,
            addr: addr.to_owned(),
            after: STEP_TIMEOUT,
        })
}

// ---------------------------------------------------------------------------------------------
// TLS

async fn tls_handshake<S>(
    broker: &BrokerPlan,
    addr: &str,
    stream: S,
) -> Result<tokio_rustls::client::TlsStream<S>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let config = tls_config(broker)?.ok_or_else(|| {
        // The loader gives every mqtts:// and wss:// broker a TLS plan; this is a bug if seen.
        LinkError::TlsConfig(format!("broker {:?}: TLS without a TLS plan", broker.name))
    })?;
    let name = broker
        .tls
        .as_ref()
        .and_then(|t| t.server_name.as_deref())
        .unwrap_or(&broker.host);
    // Parses IP addresses as such, so that an IP url is checked against the certificate's IP SANs.
    let server_name = ServerName::try_from(name.to_owned()).map_err(|_| {
        LinkError::TlsConfig(format!(
            "broker {:?}: {name:?} is not a valid TLS server name (host name or IP address); \
             set tls.server_name",
            broker.name
        ))
    })?;
    step(
        "TLS handshake",
        addr,
        TlsConnector::from(config).connect(server_name, stream),
    )
    .await?
    .map_err(|source| LinkError::Tls {
        addr: addr.to_owned(),
        hint: tls_hint(&source),
        source,
    })
}

/// What to do about the TLS failures an operator meets most, as a suffix to rustls's words.
fn tls_hint(e: &io::Error) -> &'static str {
    use rustls::{AlertDescription as Alert, CertificateError as Cert, Error as Tls};
    // A port that does not speak TLS closes on the ClientHello (mosquitto takes its first byte
    // for an invalid packet) or answers with bytes that are no TLS record.
    let plain_port = " (does this port speak TLS? a plain MQTT or WebSocket port closes at the \
                      handshake: use mqtt:// or ws://, or the broker's TLS port)";
    if matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
    ) {
        return plain_port;
    }
    match e.get_ref().and_then(|e| e.downcast_ref::<Tls>()) {
        Some(Tls::InvalidMessage(_)) => plain_port,
        Some(Tls::InvalidCertificate(Cert::UnknownIssuer | Cert::BadSignature)) => {
            " (is tls.ca_file the CA that signed the broker's certificate?)"
        }
        Some(Tls::InvalidCertificate(
            Cert::NotValidForName | Cert::NotValidForNameContext { .. },
        )) => " (set tls.server_name to a name in the broker's certificate)",
        Some(Tls::AlertReceived(Alert::CertificateRequired)) => {
            " (the broker wants a client certificate: set tls.cert_file and tls.key_file)"
        }
        Some(Tls::AlertReceived(Alert::UnknownCA | Alert::BadCertificate)) => {
            " (the broker refused our client certificate)"
        }
        _ => "",
    }
}

/// Identity of one broker's TLS settings: the config is built once per key and reused by every
/// connection (and reconnection) of every pair.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConfigKey {
    broker: String,
    ca_file: Option<PathBuf>,
    cert_file: Option<PathBuf>,
    key_file: Option<PathBuf>,
    insecure_skip_verify: bool,
}

static CONFIGS: LazyLock<Mutex<HashMap<ConfigKey, Arc<ClientConfig>>>> =
    LazyLock::new(Default::default);

/// The broker's rustls client config, built on first use and cached; `None` without TLS.
fn tls_config(broker: &BrokerPlan) -> Result<Option<Arc<ClientConfig>>, LinkError> {
    let Some(tls) = &broker.tls else {
        return Ok(None);
    };
    let key = config_key(broker, tls);
    // Held while building, so that pairs connecting at once build (and warn) only once.
    let mut configs = CONFIGS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(config) = configs.get(&key) {
        return Ok(Some(config.clone()));
    }
    let config = Arc::new(build_tls_config(&broker.name, tls)?);
    configs.insert(key, config.clone());
    Ok(Some(config))
}

fn build_tls_config(broker: &str, tls: &TlsPlan) -> Result<ClientConfig, LinkError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkError::TlsConfig(format!("broker {broker:?}: {e}")))?;
    let builder = if tls.insecure_skip_verify {
        warn!(
            broker,
            "tls.insecure_skip_verify = true: the broker's certificate is NOT verified; anyone \
             on the network path can read and alter this broker's traffic. Use only for tests."
        );
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(
                provider.signature_verification_algorithms,
            )))
    } else {
        builder.with_root_certificates(root_store(broker, tls.ca_file.as_deref())?)
    };
    match (&tls.cert_file, &tls.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let certs = read_certs(broker, "cert_file", cert_file)?;
            let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                LinkError::TlsConfig(format!(
                    "broker {broker:?}: tls.key_file {}: {} (expected a PEM private key)",
                    key_file.display(),
                    pem_error(&e)
                ))
            })?;
            builder.with_client_auth_cert(certs, key).map_err(|e| {
                LinkError::TlsConfig(format!(
                    "broker {broker:?}: tls.cert_file {} with tls.key_file {}: {e}",
                    cert_file.display(),
                    key_file.display()
                ))
            })
        }
        // The loader refuses one without the other.
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// `ca_file` alone when set (a private CA should not be diluted by the public ones), else the
/// operating system's roots.
fn root_store(broker: &str, ca_file: Option<&Path>) -> Result<RootCertStore, LinkError> {
    let mut roots = RootCertStore::empty();
    match ca_file {
        Some(file) => {
            for cert in read_certs(broker, "ca_file", file)? {
                roots.add(cert).map_err(|e| {
                    LinkError::TlsConfig(format!(
                        "broker {broker:?}: tls.ca_file {}: {e}",
                        file.display()
                    ))
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for e in &found.errors {
                debug!(broker, "system root certificates: {e}");
            }
            let (added, ignored) = roots.add_parsable_certificates(found.certs);
            debug!(broker, added, ignored, "system root certificates loaded");
            if roots.is_empty() {
                return Err(LinkError::TlsConfig(format!(
                    "broker {broker:?}: no system root certificates found (install \
                     ca-certificates, or set tls.ca_file)"
                )));
            }
        }
    }
    Ok(roots)
}

/// Every certificate in a PEM file; an error names the broker, the key and the file.
fn read_certs(
    broker: &str,
    key: &str,
    file: &Path,
) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    let error = |why: String| {
        LinkError::TlsConfig(format!(
            "broker {broker:?}: tls.{key} {}: {why}",
            file.display()
        ))
    };
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| error(pem_error(&e)))?;
    if certs.is_empty() {
        return Err(error(
            "no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into(),
        ));
    }
    Ok(certs)
}

fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::NoItemsFound => "nothing usable in it".into(),
        e => e.to_string(),
    }
}

/// `insecure_skip_verify`: any certificate for any name is accepted. The handshake signatures
/// are still checked, so the peer at least holds the key of the certificate it showed.
#[derive(Debug)]
struct AcceptAnyCertificate(WebPkiSupportedAlgorithms);

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_schemes()
    }
}

// ---------------------------------------------------------------------------------------------
// WebSocket

async fn ws_handshake<S>(
    broker: &BrokerPlan,
    addr: &str,
    stream: S,
) -> Result<WebSocketStream<S>, LinkError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let scheme = if broker.transport == Transport::Wss {
        "wss"
    } else {
        "ws"
    };
    let url = format!("{scheme}://{addr}{}", broker.path);
    let ws_error = |source| LinkError::WebSocket {
        url: url.clone(),
        hint: ws_hint(&source),
        source: Box::new(source),
    };
    let mut request = url.as_str().into_client_request().map_err(ws_error)?;
    // MQTT over WebSocket (MQTT 5.0 §6): brokers refuse, or answer as plain HTTP, without it.
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    let (ws, _response) = step(
        "WebSocket handshake",
        addr,
        tokio_tungstenite::client_async(request, stream),
    )
    .await?
    .map_err(ws_error)?;
    Ok(ws)
}

/// What to do about a failed WebSocket upgrade, as a suffix to tungstenite's words.
fn ws_hint(e: &tokio_tungstenite::tungstenite::Error) -> &'static str {
    use tokio_tungstenite::tungstenite::{Error as Ws, error::ProtocolError};
    const PLAIN_PORT: &str = " (does this port speak WebSocket? a plain MQTT port closes at the \
                              HTTP upgrade: use mqtt://, or the broker's WebSocket port)";
    match e {
        // A plain MQTT port takes "GET …" for a malformed packet and closes.
        Ws::Io(_) | Ws::ConnectionClosed | Ws::AlreadyClosed => PLAIN_PORT,
        Ws::Protocol(ProtocolError::HandshakeIncomplete | ProtocolError::HttparseError(_)) => {
            PLAIN_PORT
        }
        Ws::Http(_) => {
            " (the server answered the upgrade with an HTTP error: check the URL's path)"
        }
        _ => "",
    }
}

// ---------------------------------------------------------------------------------------------
// The pump: moves bytes between the driver's pipe and a TLS or WebSocket stream.

/// Starts the pump task for `transport` and returns the driver's ends of the pipe.
///
/// The pipe itself cannot carry an error, only its end: when the pump fails (a TLS alert, a
/// broken WebSocket), it leaves the cause in `failure` before closing the pipe, and the driver's
/// halves report that cause instead of a bare end of stream.
fn spawn_pump<P: PumpParts>(broker: &str, label: &'static str, transport: P) -> (Reader, Writer) {
    let (driver_end, pump_end) = tokio::io::duplex(PIPE_BYTES);
    let (mut from_driver, mut to_driver) = tokio::io::split(pump_end);
    let failure = Arc::new(OnceLock::new());
    // Closed when the driver has dropped both halves (`recv` then returns `None`), even if it
    // never shut its writer down: the pump must not outlive the connection.
    let (alive, mut gone) = mpsc::channel::<()>(1);
    let (mut up, mut down) = transport.into_parts();
    let broker = broker.to_owned();
    let failed = failure.clone();
    tokio::spawn(async move {
        let up = up.run(&mut from_driver);
        let down = down.run(&mut to_driver);
        tokio::pin!(up, down);
        let result = tokio::select! {
            r = &mut up => r,
            r = &mut down => r,
            _ = gone.recv() => {
                // What the driver wrote last (its DISCONNECT) may still be in the pipe.
                let _ = tokio::time::timeout(CLOSE_GRACE, &mut up).await;
                Ok(())
            }
        };
        match result {
            Ok(()) => debug!(broker, transport = label, "transport closed"),
            Err(e) => {
                debug!(broker, transport = label, "transport failed: {e}");
                let _ = failed.set(format!("{label}: {e}{}", tls_hint(&e)));
            }
        }
        // Dropping the pipe's end here, after `failure` is set, is what the driver sees.
    });
    let (r, w) = tokio::io::split(driver_end);
    let end = |alive| PipeEnd {
        failure: failure.clone(),
        _alive: alive,
    };
    (
        Box::new(PipeReader(r, end(alive.clone()))),
        Box::new(PipeWriter(w, end(alive))),
    )
}

/// A transport split into its two directions, each run as one future of the pump task.
trait PumpParts {
    type Up: PumpUp;
    type Down: PumpDown;
    fn into_parts(self) -> (Self::Up, Self::Down);
}

trait PumpUp: Send + 'static {
    /// Copies the driver's bytes to the broker until the driver closes its side, then closes
    /// the transport cleanly.
    fn run<'a>(
        &'a mut self,
        from_driver: &'a mut ReadHalf<DuplexStream>,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;
}

trait PumpDown: Send + 'static {
    /// Copies the broker's bytes to the driver until the broker closes.
    fn run<'a>(
        &'a mut self,
        to_driver: &'a mut WriteHalf<DuplexStream>,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;
}

/// A byte stream (TLS): bytes in, bytes out.
struct StreamPump<S>(S);

impl<S> PumpParts for StreamPump<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    type Up = tokio::io::WriteHalf<S>;
    type Down = tokio::io::ReadHalf<S>;
    fn into_parts(self) -> (Self::Up, Self::Down) {
        let (r, w) = tokio::io::split(self.0);
        (w, r)
    }
}

impl<S> PumpUp for tokio::io::WriteHalf<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    async fn run(&mut self, from_driver: &mut ReadHalf<DuplexStream>) -> io::Result<()> {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = from_driver.read(&mut buf).await?;
            if n == 0 {
                // TLS close_notify, then FIN.
                return self.shutdown().await;
            }
            self.write_all(&buf[..n]).await?;
            // Written is not sent: TLS keeps records until flushed.
            self.flush().await?;
        }
    }
}

impl<S> PumpDown for tokio::io::ReadHalf<S>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    async fn run(&mut self, to_driver: &mut WriteHalf<DuplexStream>) -> io::Result<()> {
        tokio::io::copy(self, to_driver).await.map(drop)
    }
}

/// MQTT over WebSocket: each chunk the driver writes goes out as one binary frame; frames that
/// arrive are a byte stream (an MQTT packet may span frames, a frame may hold several packets).
struct WsPump<S>(WebSocketStream<S>);

type WsSink<S> = futures_util::stream::SplitSink<WebSocketStream<S>, WsMessage>;
type WsStream<S> = futures_util::stream::SplitStream<WebSocketStream<S>>;

impl<S> PumpParts for WsPump<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Up = WsSink<S>;
    type Down = WsStream<S>;
    fn into_parts(self) -> (Self::Up, Self::Down) {
        self.0.split()
    }
}

impl<S> PumpUp for WsSink<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self, from_driver: &mut ReadHalf<DuplexStream>) -> io::Result<()> {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            if from_driver.read_buf(&mut buf).await? == 0 {
                // A Close frame; the broker answers with its own and closes.
                return self.close().await.map_err(io::Error::other);
            }
            self.send(WsMessage::Binary(buf.split().freeze()))
                .await
                .map_err(io::Error::other)?;
        }
    }
}

impl<S> PumpDown for WsStream<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn run(&mut self, to_driver: &mut WriteHalf<DuplexStream>) -> io::Result<()> {
        while let Some(message) = self.next().await {
            match message.map_err(io::Error::other)? {
                WsMessage::Binary(bytes) => to_driver.write_all(&bytes).await?,
                WsMessage::Close(Some(frame)) if frame.code != CloseCode::Normal => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        format!(
                            "the broker closed the WebSocket: {} {}",
                            frame.code, frame.reason
                        ),
                    ));
                }
                WsMessage::Close(_) => return Ok(()),
                // Answered by tungstenite itself.
                WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_) => {}
                WsMessage::Text(_) => {
                    // MQTT 5.0 §6: anything but binary frames closes the connection.
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the broker sent a text WebSocket frame (MQTT needs binary frames)",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// What both of the driver's halves hold: the pump task ends once both are dropped.
struct PipeEnd {
    failure: Arc<OnceLock<String>>,
    _alive: mpsc::Sender<()>,
}

impl PipeEnd {
    fn failure(&self) -> Option<io::Error> {
        self.failure
            .get()
            .map(|why| io::Error::new(io::ErrorKind::ConnectionAborted, why.clone()))
    }
}

struct PipeReader(ReadHalf<DuplexStream>, PipeEnd);

impl AsyncRead for PipeReader {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.0).poll_read(cx, buf))?;
        let eof = buf.filled().len() == before && buf.remaining() > 0;
        match self.1.failure() {
            Some(e) if eof => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

struct PipeWriter(WriteHalf<DuplexStream>, PipeEnd);

impl PipeWriter {
    /// A write into a closed pipe fails with "broken pipe": say why it closed instead.
    fn explain<T>(&self, r: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match r {
            Poll::Ready(Err(e)) => Poll::Ready(Err(self.1.failure().unwrap_or(e))),
            r => r,
        }
    }
}

impl AsyncWrite for PipeWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.0).poll_write(cx, buf);
        self.explain(r)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.0).poll_flush(cx);
        self.explain(r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.0).poll_shutdown(cx);
        self.explain(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_addresses_get_brackets() {
        assert_eq!(display_addr("::1", 8883), "[::1]:8883");
        assert_eq!(display_addr("127.0.0.1", 8883), "127.0.0.1:8883");
        assert_eq!(display_addr("broker.local", 443), "broker.local:443");
    }

    #[tokio::test]
    async fn the_pump_carries_bytes_both_ways_and_ends_with_the_driver() {
        let (near, mut far) = tokio::io::duplex(1024);
        let (mut reader, mut writer) = spawn_pump("b", "TLS", StreamPump(near));
        writer.write_all(b"CONNECT").await.unwrap();
        let mut got = [0u8; 7];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"CONNECT");
        far.write_all(b"CONNACK").await.unwrap();
        reader.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"CONNACK");
        // The driver lets go without shutting down: the broker side sees the end.
        drop((reader, writer));
        let n = tokio::time::timeout(Duration::from_secs(5), far.read(&mut got)).await;
        assert!(matches!(n, Ok(Ok(0))), "{n:?}");
    }

    /// A transport whose reads fail, like a TLS stream receiving a fatal alert.
    struct Failing;

    impl AsyncRead for Failing {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Ready(Err(io::Error::other(
                "received fatal alert: BadCertificate",
            )))
        }
    }

    impl AsyncWrite for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(b.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_driver_reads_why_the_transport_failed() {
        let (mut reader, _writer) = spawn_pump("b", "TLS", StreamPump(Failing));
        let mut buf = BytesMut::new();
        let e = reader.read_buf(&mut buf).await.unwrap_err();
        assert_eq!(e.to_string(), "TLS: received fatal alert: BadCertificate");
    }

    #[test]
    fn ip_addresses_are_server_names() {
        assert!(matches!(
            ServerName::try_from("127.0.0.1".to_owned()),
            Ok(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            ServerName::try_from("::1".to_owned()),
            Ok(ServerName::IpAddress(_))
        ));
    }
}
