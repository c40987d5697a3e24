//! Serving the API over mutual TLS.

use std::net::SocketAddr;
use std::sync::Arc;

use cpushare_proto::v1::{admin_server::AdminServer, exchange_server::ExchangeServer};
use cpushare_proto::{PROTOCOL_HEADER, PROTOCOL_VERSION};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
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
    // The chain includes the CA so that a node can pin it on first contact.
    let chain = format!("{}{}", pki::pem("CERTIFICATE", &server.cert), pki::pem("CERTIFICATE", authority.cert_der()));
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(chain, pki::pem("PRIVATE KEY", &server.key_pkcs8)))
        .client_ca_root(Certificate::from_pem(pki::pem("CERTIFICATE", authority.cert_der())))
        .client_auth_optional(true);
    let listener = TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    let handler = Handler(api);
    let exchange = ExchangeServer::new(handler.clone()).max_decoding_message_size(max);
    let admin = AdminServer::new(handler).max_decoding_message_size(max);
    let (stop, stopped) = oneshot::channel::<()>();
    let router = Server::builder()
        .tls_config(tls)?
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        // HTTP/2's default 64 KiB windows cap a relay at one window per round
        // trip; these let a bulk transfer keep the pipe full.
        .initial_stream_window_size(Some(crate::STREAM_WINDOW))
        .initial_connection_window_size(Some(crate::CONNECTION_WINDOW))
        .max_frame_size(Some(crate::MAX_FRAME))
        .add_service(InterceptedService::new(exchange, check_version))
        .add_service(InterceptedService::new(admin, check_version));
    // Serving from our own listener, tonic applies none of its socket settings:
    // no Nagle (small answers must not wait for an acknowledgement), and the
    // socket reads ahead of rustls.
    let incoming = TcpListenerStream::new(listener).map(|tcp| {
        let tcp = tcp?;
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::warn!("cannot set TCP_NODELAY on a connection: {e}");
        }
        Ok::<_, std::io::Error>(ReadAhead::new(tcp))
    });
    let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
        let _ = stopped.await;
    }));
    tracing::info!(%addr, "exchange listening");
    Ok(Listening { addr, stop, task })
}
