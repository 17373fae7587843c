//! The network edge: QUIC endpoints (quinn) with mutual TLS 1.3 (rustls),
//! partner authentication, and the line-framed control stream.
//!
//! Guarantees:
//! - TLS 1.3 only, client certificates mandatory, ALPN `deft/1`;
//! - a peer certificate is accepted only if it is pinned for a partner
//!   (fingerprint or certificate file) or chains to a partner's CA with a
//!   DNS SAN equal to the partner id; otherwise the handshake fails, before
//!   any command is read, and the refusal is logged with the fingerprint;
//! - a control line longer than [`proto::MAX_LINE`] is refused without
//!   buffering more than that.
//!
//! No policy lives here: what a partner may do is decided in `transfer`.

use crate::config::{Config, PartnerConfig};
use crate::identity::{self, Fingerprint, Identity};
use crate::proto::{self, Decoder, Name, Request, Response};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, BufReader};

/// Name sent as SNI. Peers are identified by certificate, never by SNI.
const SNI: &str = "deft";
/// How long a connection may stay silent before it is considered dead.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// UDP socket buffers: large enough that a burst of a full window of
/// chunks is not dropped by the kernel before quinn reads it. The kernel
/// caps the request at net.core.rmem_max/wmem_max (4 MiB on the bench
/// machine), and a 1 GiB transfer on loopback then loses 0.3 to 1.2 % of its
/// packets to receive-buffer overflow; forcing 32 MiB (SO_RCVBUFFORCE, as
/// root) removed the losses but made neither a push nor a pull faster
/// (docs/PERFORMANCE.md, session of 2026-12-06, night).
const SOCKET_BUFFER: usize = 8 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("tls setup: {0}")]
    Tls(#[from] rustls::Error),
    #[error("quic setup: {0}")]
    Setup(String),
    #[error("socket {addr}: {source}")]
    Socket { addr: SocketAddr, source: std::io::Error },
    #[error("partner {partner}: no endpoint configured; add one with `deftfs partner add {partner} ... --endpoint HOST:PORT`")]
    NoEndpoint { partner: String },
    #[error("partner {partner}: cannot resolve {endpoint}: {detail}")]
    Resolve { partner: String, endpoint: String, detail: String },
    #[error("partner {partner}: could not connect to {tried}: {detail}")]
    Connect { partner: String, tried: String, detail: String },
    /// Not tried: an attempt failed a moment ago ([`crate::reach`]).
    #[error("partner {partner} is unreachable: {why}")]
    Unreachable { partner: String, why: String },
    #[error("connection lost: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("stream: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("stream: {0}")]
    Read(String),
    #[error("peer sent an invalid line: {0}")]
    Protocol(#[from] proto::ProtoError),
    #[error("peer closed the control stream")]
    Closed,
    #[error("timed out waiting for the peer")]
    Timeout,
}

/// Who a certificate belongs to, from the node's configuration.
pub struct PartnerDirectory {
    pins: HashMap<Fingerprint, Name>,
    /// (partner id, verifier that checks a chain to that partner's CA).
    cas: Vec<(Name, Arc<dyn ServerCertVerifier>)>,
    provider: Arc<CryptoProvider>,
}

impl std::fmt::Debug for PartnerDirectory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PartnerDirectory").field("pins", &self.pins.len()).field("cas", &self.cas.len()).finish()
    }
}

/// The crypto provider: ring, TLS 1.3 suites only.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl PartnerDirectory {
    /// Build from the configuration; certificate and CA files are read now
    /// (relative paths are relative to `home`).
    pub fn new(config: &Config, home: &std::path::Path) -> Result<PartnerDirectory, DirectoryError> {
        let provider = provider();
        let mut pins = HashMap::new();
        let mut cas: Vec<(Name, Arc<dyn ServerCertVerifier>)> = Vec::new();
        for partner in &config.partners {
            for fp in &partner.fingerprints {
                pins.insert(*fp, partner.id.clone());
            }
            for cert in &partner.allowed_certs {
                let der = identity::load_cert_file(&home.join(cert))
                    .map_err(|e| DirectoryError::Cert { partner: partner.id.to_string(), detail: e.to_string() })?;
                pins.insert(Fingerprint::of_cert(&der), partner.id.clone());
            }
            if let Some(ca) = &partner.ca {
                cas.push((partner.id.clone(), ca_verifier(&home.join(ca), partner, &provider)?));
            }
        }
        Ok(PartnerDirectory { pins, cas, provider })
    }

    /// The partner a certificate chain authenticates, if any.
    pub fn identify(&self, end_entity: &CertificateDer<'_>, intermediates: &[CertificateDer<'_>], now: UnixTime) -> Option<Name> {
        if let Some(id) = self.pins.get(&Fingerprint::of_cert(end_entity)) {
            return Some(id.clone());
        }
        for (id, verifier) in &self.cas {
            let Ok(name) = ServerName::try_from(id.as_str()) else { continue };
            if verifier.verify_server_cert(end_entity, intermediates, &name, &[], now).is_ok() {
                return Some(id.clone());
            }
        }
        None
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DirectoryError {
    #[error("partner {partner}: certificate: {detail}")]
    Cert { partner: String, detail: String },
    #[error("partner {partner}: CA {path}: {detail}")]
    Ca { partner: String, path: String, detail: String },
}

fn ca_verifier(
    path: &std::path::Path,
    partner: &PartnerConfig,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ServerCertVerifier>, DirectoryError> {
    let err = |detail: String| DirectoryError::Ca { partner: partner.id.to_string(), path: path.display().to_string(), detail };
    let der = identity::load_cert_file(path).map_err(|e| err(e.to_string()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from(der)).map_err(|e| err(e.to_string()))?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| err(e.to_string()))?;
    Ok(verifier)
}

/// Server side: accepts client certificates of any known partner.
#[derive(Debug)]
struct AnyPartner(Arc<PartnerDirectory>);

impl ClientCertVerifier for AnyPartner {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.0.identify(end_entity, intermediates, now) {
            Some(_) => Ok(ClientCertVerified::assertion()),
            None => {
                tracing::warn!(target: "audit", fingerprint = %Fingerprint::of_cert(end_entity), "refused connection: certificate is not a known partner's");
                Err(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }
}

/// Client side: accepts only the partner we meant to reach.
#[derive(Debug)]
struct ThisPartner {
    directory: Arc<PartnerDirectory>,
    expected: Name,
}

impl ServerCertVerifier for ThisPartner {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.directory.identify(end_entity, intermediates, now) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            other => {
                tracing::warn!(target: "audit", expected = %self.expected, found = ?other, fingerprint = %Fingerprint::of_cert(end_entity), "refused server: certificate is not the partner's");
                Err(rustls::Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls13RequiredForQuic))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.directory.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.directory.schemes()
    }
}

fn key_of(identity: &Identity) -> PrivateKeyDer<'static> {
    PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(identity.key_der().to_vec()))
}

/// Transport parameters. `loopback` raises the datagram size: on loopback
/// the path MTU is 64 KiB and per-packet cost, not bandwidth, is the limit.
fn transport_config(loopback: bool) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.keep_alive_interval(Some(KEEP_ALIVE));
    t.max_concurrent_uni_streams(4096u32.into());
    // One bidirectional stream, the control stream (PROTOCOL.md 3): a peer
    // cannot open others, whose unread bytes the server would have to hold
    // (2 MiB each).
    t.max_concurrent_bidi_streams(1u32.into());
    // One chunk (<= 1 MiB + header) fits a stream window; a full window of
    // chunks fits the connection window.
    t.stream_receive_window((2u32 * 1024 * 1024).into());
    t.receive_window((128u32 * 1024 * 1024).into());
    t.send_window(128 * 1024 * 1024);
    t.send_fairness(false);
    // No ACK frequency extension (`ack_frequency_config`): quinn already
    // acknowledges once per batch of received datagrams, one ACK per 50 to
    // 120 packets of a bulk transfer on loopback, and asking for fewer
    // (threshold 16) changed neither the ACK count nor the time
    // (docs/PERFORMANCE.md, session of 2026-12-06, night).
    if loopback {
        t.initial_mtu(LOOPBACK_MTU);
        t.min_mtu(LOOPBACK_MTU);
        t.mtu_discovery_config(None);
        // Start with a congestion window of LOOPBACK_WINDOW instead of ten
        // packets: a fresh connection then sends a 300 KB manifest or the
        // first MiB of chunks at once instead of over seven round trips of
        // slow start. TCP gets the same on loopback from its 64 KiB MTU.
        let mut cubic = quinn::congestion::CubicConfig::default();
        cubic.initial_window(LOOPBACK_WINDOW);
        t.congestion_controller_factory(Arc::new(cubic));
    }
    t
}

/// Datagram size used on loopback. Loopback carries 64 KiB, but quinn 0.11
/// sends GSO batches of up to ten datagrams, which must fit the 64 KiB UDP
/// limit (larger ones are dropped: the handshake fails and throughput
/// collapses from about 6.5 KB), and quinn-proto asserts that a packet is
/// under 16 KiB. 4000 cuts the per-packet cost by almost three compared
/// with 1452; 6400 with GSO, or 12000 to 16000 without, measured the same
/// within noise (docs/PERFORMANCE.md).
const LOOPBACK_MTU: u16 = 4000;

/// Initial congestion window on loopback, bytes.
const LOOPBACK_WINDOW: u64 = 2 << 20;

/// Endpoint settings: accept datagrams up to the loopback MTU (the default,
/// 1472 bytes, would drop them).
fn endpoint_config() -> Result<quinn::EndpointConfig, TransportError> {
    let mut cfg = quinn::EndpointConfig::default();
    cfg.max_udp_payload_size(65_527).map_err(|e| TransportError::Setup(e.to_string()))?;
    Ok(cfg)
}

fn bind_socket(addr: SocketAddr) -> Result<std::net::UdpSocket, TransportError> {
    let err = |source| TransportError::Socket { addr, source };
    let domain = if addr.is_ipv4() { socket2::Domain::IPV4 } else { socket2::Domain::IPV6 };
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)).map_err(err)?;
    if addr.is_ipv6() {
        // Accept IPv4 too on a [::] listener.
        let _ = socket.set_only_v6(false);
    }
    // Best effort: the kernel caps these at net.core.*mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into()).map_err(err)?;
    Ok(socket.into())
}

/// A QUIC endpoint with this node's identity: serves incoming connections
/// when built with [`Endpoint::server`], and connects to partners.
pub struct Endpoint {
    pub quinn: quinn::Endpoint,
    identity: Arc<Identity>,
    directory: Arc<PartnerDirectory>,
    server: Option<(Arc<rustls::ServerConfig>, Arc<quinn::ServerConfig>, Arc<quinn::ServerConfig>)>,
}

impl Endpoint {
    /// An endpoint that accepts partners' connections on `listen`.
    pub fn server(listen: SocketAddr, identity: Arc<Identity>, directory: Arc<PartnerDirectory>) -> Result<Endpoint, TransportError> {
        let tls = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(Arc::new(AnyPartner(directory.clone())))
            .with_single_cert(vec![CertificateDer::from(identity.cert_der().to_vec())], key_of(&identity))?;
        let mut tls = tls;
        tls.alpn_protocols = vec![proto::ALPN.to_vec()];
        let tls = Arc::new(tls);
        let make = |loopback: bool| -> Result<Arc<quinn::ServerConfig>, TransportError> {
            let crypto =
                quinn::crypto::rustls::QuicServerConfig::try_from(tls.clone()).map_err(|e| TransportError::Setup(e.to_string()))?;
            let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(crypto));
            cfg.transport_config(Arc::new(transport_config(loopback)));
            Ok(Arc::new(cfg))
        };
        let (wide, lo) = (make(false)?, make(true)?);
        let socket = bind_socket(listen)?;
        let quinn = quinn::Endpoint::new(endpoint_config()?, Some((*wide).clone()), socket, Arc::new(quinn::TokioRuntime))
            .map_err(|source| TransportError::Socket { addr: listen, source })?;
        Ok(Endpoint { quinn, identity, directory, server: Some((tls, wide, lo)) })
    }

    /// A client-only endpoint on an ephemeral port.
    pub fn client(identity: Arc<Identity>, directory: Arc<PartnerDirectory>) -> Result<Endpoint, TransportError> {
        let any: SocketAddr = "[::]:0".parse().map_err(|_| TransportError::Setup("bad bind address".into()))?;
        let socket = match bind_socket(any) {
            Ok(s) => s,
            // No IPv6 on this host: fall back to IPv4 only.
            Err(_) => bind_socket(SocketAddr::from(([0, 0, 0, 0], 0)))?,
        };
        let quinn = quinn::Endpoint::new(endpoint_config()?, None, socket, Arc::new(quinn::TokioRuntime))
            .map_err(|source| TransportError::Socket { addr: any, source })?;
        Ok(Endpoint { quinn, identity, directory, server: None })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.quinn.local_addr()
    }

    /// The next incoming connection attempt, not authenticated yet; None
    /// when the endpoint is closed. Cancel-safe. Finish each with
    /// [`Endpoint::handshake`] on a task of its own: a handshake takes a
    /// round trip or more, and one that stalls (a peer that sent its first
    /// packet and nothing else) lasts until the idle timeout, which must
    /// not hold up every other partner's connection.
    pub async fn incoming(&self) -> Option<quinn::Incoming> {
        self.quinn.accept().await
    }

    /// Complete the handshake of `incoming` and identify the partner.
    /// Failures (unknown certificates) are logged and give None.
    pub async fn handshake(&self, incoming: quinn::Incoming) -> Option<(quinn::Connection, Name, Vec<u8>)> {
        let remote = incoming.remote_address();
        let config = match &self.server {
            Some((_, _, lo)) if remote.ip().is_loopback() => lo.clone(),
            Some((_, wide, _)) => wide.clone(),
            None => return None,
        };
        let connecting = match incoming.accept_with(config) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(%remote, "incoming connection failed: {e}");
                return None;
            }
        };
        match connecting.await {
            Ok(conn) => match self.peer_of(&conn) {
                Some((id, der)) => {
                    tracing::info!(target: "audit", %remote, partner = %id, "partner connected");
                    Some((conn, id, der))
                }
                None => {
                    conn.close(1u32.into(), b"unknown partner");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(target: "audit", %remote, "handshake failed: {e}");
                None
            }
        }
    }

    fn peer_of(&self, conn: &quinn::Connection) -> Option<(Name, Vec<u8>)> {
        let certs = conn.peer_identity()?.downcast::<Vec<CertificateDer<'static>>>().ok()?;
        let (leaf, rest) = certs.split_first()?;
        let id = self.directory.identify(leaf, rest, UnixTime::now())?;
        Some((id, leaf.to_vec()))
    }

    /// Connect to a partner, trying its endpoints in order. Returns the
    /// connection and the partner's certificate (DER).
    pub async fn connect(&self, partner: &PartnerConfig) -> Result<(quinn::Connection, Vec<u8>), TransportError> {
        if partner.endpoints.is_empty() {
            return Err(TransportError::NoEndpoint { partner: partner.id.to_string() });
        }
        let mut tls = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ThisPartner { directory: self.directory.clone(), expected: partner.id.clone() }))
            .with_client_auth_cert(vec![CertificateDer::from(self.identity.cert_der().to_vec())], key_of(&self.identity))?;
        tls.alpn_protocols = vec![proto::ALPN.to_vec()];
        let crypto =
            Arc::new(quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).map_err(|e| TransportError::Setup(e.to_string()))?);
        let mut failures = Vec::new();
        for endpoint in &partner.endpoints {
            let addrs = match tokio::net::lookup_host(endpoint.as_str()).await {
                Ok(a) => a.collect::<Vec<_>>(),
                Err(e) => {
                    failures.push(format!("{endpoint} ({e})"));
                    continue;
                }
            };
            for addr in addrs {
                let mut cfg = quinn::ClientConfig::new(crypto.clone());
                cfg.transport_config(Arc::new(transport_config(addr.ip().is_loopback())));
                let attempt = async {
                    let conn =
                        self.quinn.connect_with(cfg, addr, SNI).map_err(|e| e.to_string())?.await.map_err(|e| explain_connect_error(&e))?;
                    Ok::<_, String>(conn)
                };
                match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                    Ok(Ok(conn)) => {
                        let der = self.peer_of(&conn).map(|(_, d)| d).unwrap_or_default();
                        return Ok((conn, der));
                    }
                    Ok(Err(e)) => failures.push(format!("{addr} ({e})")),
                    Err(_) => failures.push(format!("{addr} (no answer within 10 s)")),
                }
            }
        }
        Err(TransportError::Connect { partner: partner.id.to_string(), tried: partner.endpoints.join(", "), detail: failures.join("; ") })
    }
}

/// Turn a handshake failure into something a user can act on.
fn explain_connect_error(e: &quinn::ConnectionError) -> String {
    let text = e.to_string();
    if text.contains("certificate")
        || text.contains("UnknownIssuer")
        || text.contains("0x12a")
        || text.contains("0x130")
        || text.contains("bad certificate")
        || text.contains("unknown ca")
    {
        format!("{text}: the partner does not know our certificate, or its certificate is not the one pinned for it; compare fingerprints with `deftfs id` on both nodes")
    } else {
        text
    }
}

/// The client's or server's half of a control stream: typed messages in
/// and out, one line at a time, each line bounded.
pub struct Control<In: proto::decode::Message> {
    send: quinn::SendStream,
    recv: BufReader<quinn::RecvStream>,
    decoder: Decoder<In>,
    line: Vec<u8>,
}

impl<In: proto::decode::Message> Control<In>
where
    Decoder<In>: PushLine<In>,
{
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        Control { send, recv: BufReader::with_capacity(64 * 1024, recv), decoder: Decoder::default(), line: Vec::new() }
    }

    /// Write raw text (one or more CRLF-terminated lines).
    pub async fn send_raw(&mut self, text: &str) -> Result<(), TransportError> {
        self.send.write_all(text.as_bytes()).await?;
        Ok(())
    }

    /// Next complete message. A malformed line yields `Err(Protocol)` and
    /// the stream stays usable.
    pub async fn recv(&mut self) -> Result<In, TransportError> {
        recv_message(&mut self.recv, &mut self.line, &mut self.decoder).await
    }

    pub async fn finish(&mut self) {
        let _ = self.send.finish();
    }

    pub fn split(self) -> (quinn::SendStream, ControlReader<In>) {
        (self.send, ControlReader { recv: self.recv, decoder: self.decoder, line: self.line })
    }
}

/// The reading half of a control stream, after `split`.
pub struct ControlReader<In: proto::decode::Message> {
    recv: BufReader<quinn::RecvStream>,
    decoder: Decoder<In>,
    line: Vec<u8>,
}

impl<In: proto::decode::Message> ControlReader<In>
where
    Decoder<In>: PushLine<In>,
{
    pub async fn recv(&mut self) -> Result<In, TransportError> {
        recv_message(&mut self.recv, &mut self.line, &mut self.decoder).await
    }
}

/// The next complete message: lines are read into `line`, reused, and
/// decoded in place (a manifest is thousands of lines; a String for each
/// was a good part of reading one).
async fn recv_message<In: proto::decode::Message>(
    recv: &mut BufReader<quinn::RecvStream>,
    line: &mut Vec<u8>,
    decoder: &mut Decoder<In>,
) -> Result<In, TransportError> {
    loop {
        match read_line_bytes(recv, line).await? {
            None => return Err(TransportError::Closed),
            Some(Err(e)) => return Err(TransportError::Protocol(e)),
            Some(Ok(())) => {
                if let Some(msg) = decoder.push_bytes(line)? {
                    return Ok(msg);
                }
            }
        }
    }
}

/// Uniform access to the two decoders.
pub trait PushLine<M> {
    fn push(&mut self, line: &str) -> Result<Option<M>, proto::ProtoError>;
}

impl PushLine<Request> for Decoder<Request> {
    fn push(&mut self, line: &str) -> Result<Option<Request>, proto::ProtoError> {
        self.push_line(line)
    }
}

impl PushLine<Response> for Decoder<Response> {
    fn push(&mut self, line: &str) -> Result<Option<Response>, proto::ProtoError> {
        self.push_line(line)
    }
}

/// Read one CRLF- (or LF-) terminated line, at most MAX_LINE bytes.
/// `Ok(None)`: clean end of stream. `Ok(Some(Err))`: the line was too long
/// (it is skipped up to its end) or not UTF-8.
pub async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Result<String, proto::ProtoError>>, TransportError> {
    Ok(read_line_bytes(reader, buf)
        .await?
        .map(|line| line.and_then(|()| String::from_utf8(std::mem::take(buf)).map_err(|_| proto::ProtoError::NotUtf8))))
}

/// [`read_line`] into `buf`, without its CR LF, and not checked for UTF-8.
pub async fn read_line_bytes<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<Result<(), proto::ProtoError>>, TransportError> {
    buf.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await.map_err(|e| TransportError::Read(e.to_string()))?;
        if available.is_empty() {
            return if buf.is_empty() && !too_long { Ok(None) } else { Err(TransportError::Closed) };
        }
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if !too_long {
            if buf.len() + take > proto::MAX_LINE {
                too_long = true;
                buf.clear();
            } else {
                buf.extend_from_slice(&available[..take]);
            }
        }
        reader.consume(take);
        if done {
            if too_long {
                return Ok(Some(Err(proto::ProtoError::LineTooLong)));
            }
            while matches!(buf.last(), Some(b'\n') | Some(b'\r')) {
                buf.pop();
            }
            return Ok(Some(Ok(())));
        }
    }
}
