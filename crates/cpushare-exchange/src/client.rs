//! Connecting to an exchange: TLS with the exchange's CA pinned, the node's
//! certificate as client identity, and the protocol version on every call.

use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use cpushare_proto::v1::{admin_client::AdminClient, exchange_client::ExchangeClient};
use cpushare_proto::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Uri};
use tonic::{Request, Status};

use crate::pki::{fingerprint, Identity};

/// The default port of an exchange.
pub const DEFAULT_PORT: u16 = 7471;

/// How a client decides to trust the exchange.
#[derive(Clone)]
pub enum Trust {
    /// The exchange's CA certificate, saved at enrollment.
    Ca(CertificateDer<'static>),
    /// Only a CA with this fingerprint (first contact, pinned up front).
    Fingerprint(String),
    /// Any CA, whose fingerprint is recorded for the user to check (first contact).
    FirstUse,
}

/// A connection's CA fingerprint, as the exchange presented it.
pub type SeenCa = Arc<Mutex<Option<String>>>;

fn add_version(mut req: Request<()>) -> Result<Request<()>, Status> {
    req.metadata_mut().insert(PROTOCOL_HEADER, PROTOCOL_VERSION.to_string().parse().expect("a number is ASCII"));
    Ok(req)
}

pub type Versioned = InterceptedService<Channel, fn(Request<()>) -> Result<Request<()>, Status>>;

/// Clients for both services over one connection.
#[derive(Clone)]
pub struct Connection {
    pub exchange: ExchangeClient<Versioned>,
    pub admin: AdminClient<Versioned>,
    pub seen_ca: SeenCa,
    /// The underlying channel, for clients of other shapes.
    pub channel: Channel,
    dialer: Dialer,
}

impl Connection {
    /// The node identity this connection presents, if any.
    pub fn identity(&self) -> Option<&Identity> {
        self.dialer.identity.as_ref()
    }

    /// The exchange's CA certificate, when this connection was made trusting it
    /// (an enrolled node's): what nodes' signed statements are checked against.
    pub fn ca(&self) -> Option<&CertificateDer<'static>> {
        self.dialer.ca.as_ref()
    }
}

impl Connection {
    /// A second connection with the same identity and trust. One HTTP/2
    /// connection is one TLS stream, handled on one core at each end: bulk
    /// transfers in parallel (a buyer's relays to several sellers) each want
    /// their own.
    pub async fn another(&self) -> anyhow::Result<Connection> {
        self.dialer.dial(self.seen_ca.clone()).await
    }
}

/// What it takes to open a connection: TLS settings and the address.
#[derive(Clone)]
struct Dialer {
    url: String,
    host: String,
    port: u16,
    tls: tokio_rustls::TlsConnector,
    server_name: ServerName<'static>,
    ca: Option<CertificateDer<'static>>,
    identity: Option<Identity>,
}

impl Dialer {
    async fn dial(&self, seen_ca: SeenCa) -> anyhow::Result<Connection> {
        let (tls, server_name, host, port) = (self.tls.clone(), self.server_name.clone(), self.host.clone(), self.port);
        let connector = tower::service_fn(move |_: Uri| {
            let (tls, server_name, host) = (tls.clone(), server_name.clone(), host.clone());
            async move {
                let tcp = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                let mut stream = tls.connect(server_name, crate::read_ahead::ReadAhead::new(tcp)).await?;
                stream.get_mut().1.set_buffer_limit(Some(crate::TLS_BUFFER));
                Ok::<_, std::io::Error>(TokioIo::new(stream))
            }
        });
        // The scheme only tells tonic not to add TLS of its own: the connector does it.
        let channel = Endpoint::from_shared(format!("http://{}:{port}", "exchange"))?
            .connect_timeout(std::time::Duration::from_secs(10))
            .http2_keep_alive_interval(std::time::Duration::from_secs(20))
            .tcp_nodelay(true)
            .initial_stream_window_size(crate::STREAM_WINDOW)
            .initial_connection_window_size(crate::CONNECTION_WINDOW)
            .max_frame_size(crate::MAX_FRAME)
            .connect_with_connector(connector)
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the exchange at {}: {}", self.url, error_chain(&e)))?;
        let f: fn(Request<()>) -> Result<Request<()>, Status> = add_version;
        Ok(Connection {
            exchange: ExchangeClient::with_interceptor(channel.clone(), f).max_decoding_message_size(16 << 20),
            admin: AdminClient::with_interceptor(channel.clone(), f),
            seen_ca,
            channel,
            dialer: self.clone(),
        })
    }
}

/// Splits `https://host[:port]` (or `host[:port]`).
pub fn parse_url(url: &str) -> anyhow::Result<(String, u16)> {
    let rest = url.strip_prefix("https://").unwrap_or(url);
    if rest.contains("://") {
        bail!("{url:?}: an exchange URL looks like https://exchange.example:{DEFAULT_PORT}");
    }
    let rest = rest.trim_end_matches('/');
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, _)) if !h.ends_with(']') && h.contains(':') => (rest, DEFAULT_PORT), // bare IPv6
        Some((h, p)) => (h, p.parse().with_context(|| format!("{url:?}: the port {p:?} is not a number"))?),
        None => (rest, DEFAULT_PORT),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        bail!("{url:?} names no host");
    }
    Ok((host.to_string(), port))
}

pub async fn connect(url: &str, trust: Trust, identity: Option<&Identity>) -> anyhow::Result<Connection> {
    let (host, port) = parse_url(url)?;
    let mut provider = rustls::crypto::ring::default_provider();
    // AES-128-GCM first (the exchange follows the client's order): as safe
    // here as AES-256 and a third cheaper on the bulk bytes of relays.
    provider.cipher_suites.sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = Arc::new(provider);
    let seen_ca: SeenCa = Arc::default();
    let trusted = match &trust {
        Trust::Ca(ca) => Some(ca.clone()),
        _ => None,
    };
    let verifier: Arc<dyn ServerCertVerifier> = match trust {
        Trust::Ca(ca) => {
            *seen_ca.lock().unwrap() = Some(fingerprint(&ca));
            let mut roots = RootCertStore::empty();
            roots.add(ca)?;
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?
        }
        Trust::Fingerprint(f) => Arc::new(PinningVerifier { expected: Some(f), seen: seen_ca.clone(), provider: provider.clone() }),
        Trust::FirstUse => Arc::new(PinningVerifier { expected: None, seen: seen_ca.clone(), provider: provider.clone() }),
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(vec![id.cert.clone()], id.key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));
    let server_name = ServerName::try_from(host.clone())?;
    Dialer { url: url.to_string(), host, port, tls, server_name, ca: trusted, identity: identity.cloned() }.dial(seen_ca).await
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Verifies the exchange's certificate against the CA it presents in its chain,
/// after checking that CA's fingerprint (when one is pinned).
#[derive(Debug)]
struct PinningVerifier {
    expected: Option<String>,
    seen: SeenCa,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinningVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = intermediates
            .last()
            .ok_or_else(|| rustls::Error::General("the exchange did not present its CA certificate".into()))?;
        let seen = fingerprint(ca);
        *self.seen.lock().unwrap() = Some(seen.clone());
        if let Some(expected) = &self.expected {
            if *expected != seen {
                return Err(rustls::Error::General(format!(
                    "the exchange's CA fingerprint is {seen}, not the {expected} you pinned: this may not be the exchange you meant"
                )));
            }
        }
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned()).map_err(|e| rustls::Error::General(e.to_string()))?;
        let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_with_and_without_scheme_and_port() {
        assert_eq!(parse_url("https://x.example:9000").unwrap(), ("x.example".into(), 9000));
        assert_eq!(parse_url("x.example").unwrap(), ("x.example".into(), DEFAULT_PORT));
        assert_eq!(parse_url("127.0.0.1:5").unwrap(), ("127.0.0.1".into(), 5));
        assert_eq!(parse_url("[::1]:5").unwrap(), ("::1".into(), 5));
        assert!(parse_url("http://x").is_err());
        assert!(parse_url("x:port").is_err());
        assert!(parse_url("https://").is_err());
    }
}
