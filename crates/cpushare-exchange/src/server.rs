//! Serving the API over mutual TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use cpushare_proto::v1::{admin_server::AdminServer, exchange_server::ExchangeServer};
use cpushare_proto::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use futures::future::ready;
use futures::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Server;
use tonic::{Request, Status};

use crate::pki::{self, Authority};
use crate::read_ahead::ReadAhead;
use crate::service::{Api, Handler};

/// A running server: where it listens, and how to stop it.
pub struct Listening {
    pub addr: SocketAddr,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Listening {
    /// Stops accepting and gives calls in flight a few seconds to finish; long-lived
    /// streams (seller sessions, subscriptions) are then cut, and their clients
    /// reconnect to the next exchange process.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(std::time::Duration::from_secs(3), &mut self.task).await.is_err() {
            self.task.abort();
        }
    }
}

/// Refuses clients older than [`crate::PROTOCOL_MIN`], with what to do about it.
#[allow(clippy::result_large_err)]
pub fn check_version(req: Request<()>) -> Result<Request<()>, Status> {
    let sent = req.metadata().get(PROTOCOL_HEADER).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    match sent {
        Some(v) if v >= crate::PROTOCOL_MIN => Ok(req),
        other => Err(Status::failed_precondition(format!(
            "upgrade to at least protocol {} (cpushare {}): this exchange speaks protocols {}..{}, your client sent {}",
            crate::PROTOCOL_MIN,
            env!("CARGO_PKG_VERSION"),
            crate::PROTOCOL_MIN,
            PROTOCOL_VERSION,
            other.map_or("none".to_string(), |v| v.to_string()),
        ))),
    }
}

/// Serves `api` on `listen` (port 0 picks one) with the exchange's certificate.
/// Client certificates are optional at the TLS layer so that new nodes can
/// enroll; every other call checks the caller's certificate itself.
pub async fn serve(
    api: Arc<Api>,
    authority: &Authority,
    server: &pki::Identity,
    listen: SocketAddr,
) -> anyhow::Result<Listening> {
    let max = api.max_message();
    let tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(authority, server)?));
    let listener = TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let handler = Handler(api);
    let exchange = ExchangeServer::new(handler.clone()).max_decoding_message_size(max);
    let admin = AdminServer::new(handler).max_decoding_message_size(max);
    let (stop, stopped) = oneshot::channel::<()>();
    let router = Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        // HTTP/2's default 64 KiB windows cap a relay at one window per round
        // trip; these let a bulk transfer keep the pipe full.
        .initial_stream_window_size(Some(crate::STREAM_WINDOW))
        .initial_connection_window_size(Some(crate::CONNECTION_WINDOW))
        .max_frame_size(Some(crate::MAX_FRAME))
        .add_service(InterceptedService::new(exchange, check_version))
        .add_service(InterceptedService::new(admin, check_version));
    // TLS is ours rather than tonic's so that each connection's rustls can be
    // reached (see `accept`); tonic still sees the client's certificate
    // through its `Connected` for rustls streams.
    let incoming = TcpListenerStream::new(listener)
        .filter_map(|tcp| async move {
            match tcp {
                Ok(tcp) => Some(tcp),
                Err(e) => {
                    // Out of descriptors, say: a pause, not a busy loop.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    None
                }
            }
        })
        .map(move |tcp| accept(tls.clone(), tcp))
        // Handshakes run side by side: a slow client holds up nobody.
        .buffer_unordered(HANDSHAKES)
        .filter_map(ready)
        .map(Ok::<_, std::io::Error>);
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stopped.await;
    }));
    tracing::info!(%addr, "exchange listening");
    Ok(Listening { addr, stop, task })
}

/// TLS handshakes in progress at once, at most; more connections wait in the
/// listener's backlog.
const HANDSHAKES: usize = 1024;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The exchange's rustls configuration: its certificate chain (with the CA,
/// so that a node can pin it on first contact), client certificates checked
/// against the CA but optional at this layer so that new nodes can enroll
/// (every other call checks the caller's certificate itself), HTTP/2 only.
fn tls_config(authority: &Authority, server: &pki::Identity) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(authority.cert_der().clone())?;
    let clients = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(clients)
        .with_single_cert(vec![server.cert.clone(), authority.cert_der().clone()], server.key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// One connection's TLS handshake, within a deadline; `None` (logged) if it
/// fails. Serving from our own listener, tonic applies none of its socket
/// settings: no Nagle (small answers must not wait for an acknowledgement),
/// and the socket reads ahead of rustls.
async fn accept(tls: tokio_rustls::TlsAcceptor, tcp: TcpStream) -> Option<tokio_rustls::server::TlsStream<ReadAhead<TcpStream>>> {
    if let Err(e) = tcp.set_nodelay(true) {
        tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
    }
    let peer = tcp.peer_addr().ok();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(ReadAhead::new(tcp))).await {
        Ok(Ok(mut stream)) => {
            stream.get_mut().1.set_buffer_limit(Some(crate::TLS_BUFFER));
            Some(stream)
        }
        Ok(Err(e)) => {
            tracing::debug!(?peer, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(?peer, "TLS handshake timed out");
            None
        }
    }
}
