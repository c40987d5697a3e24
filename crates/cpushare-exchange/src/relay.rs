//! The relay: a byte stream per lease between its buyer and its seller through
//! the exchange, for sellers that take no inbound connections.
//!
//! Whichever side comes first waits; the second joins it, and two pumps copy
//! frames across. Each pump's outgoing queue holds a handful of frames, so a
//! slow reader stops its pump, which stops reading its writer's stream, and
//! HTTP/2 flow control pushes back to the writer: memory per relay stays bounded.
//! A pump stops when either side leaves, the lease ends, or the writer's
//! certificate is revoked.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use cpushare_market::LeaseId;
use cpushare_proto::v1::RelayFrame;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::engine::{Notice, Shared};

/// Frames queued per direction.
const QUEUE: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Buyer,
    Seller,
}

struct Waiting {
    side: Side,
    inbound: Streaming<RelayFrame>,
    first: prost::bytes::Bytes,
    out: mpsc::Sender<Result<RelayFrame, Status>>,
    fingerprint: String,
}

#[derive(Default)]
pub struct Relays {
    waiting: Mutex<HashMap<LeaseId, Waiting>>,
}

type Out = Pin<Box<dyn Stream<Item = Result<RelayFrame, Status>> + Send>>;

impl Relays {
    /// Joins `side` of `lease`'s relay; returns what the other side sends.
    pub fn join(
        &self,
        lease: LeaseId,
        side: Side,
        first: prost::bytes::Bytes,
        inbound: Streaming<RelayFrame>,
        shared: Arc<Shared>,
        fingerprint: String,
    ) -> Out {
        let (out, out_rx) = mpsc::channel(QUEUE);
        let mut waiting = self.waiting.lock().unwrap();
        match waiting.remove(&lease) {
            Some(other) if other.side != side => {
                tokio::spawn(pump(lease, inbound, first, other.out.clone(), shared.clone(), fingerprint));
                tokio::spawn(pump(lease, other.inbound, other.first, out, shared, other.fingerprint));
            }
            // First here, or the same side reconnecting (it replaces its old stream).
            _ => {
                waiting.insert(lease, Waiting { side, inbound, first, out, fingerprint });
            }
        }
        Box::pin(ReceiverStream::new(out_rx))
    }

    /// Forgets sides still waiting for a lease that ended.
    pub fn lease_ended(&self, lease: LeaseId) {
        self.waiting.lock().unwrap().remove(&lease);
    }
}

async fn pump(
    lease: LeaseId,
    mut from: Streaming<RelayFrame>,
    first: prost::bytes::Bytes,
    to: mpsc::Sender<Result<RelayFrame, Status>>,
    shared: Arc<Shared>,
    fingerprint: String,
) {
    let mut notices = shared.notices.subscribe();
    if !first.is_empty() && to.send(Ok(RelayFrame { lease: 0, data: first })).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            frame = from.message() => {
                let Ok(Some(frame)) = frame else { break };
                if shared.caller(&fingerprint).is_none() {
                    let _ = to.send(Err(Status::permission_denied("the other side's certificate was revoked"))).await;
                    break;
                }
                if to.send(Ok(RelayFrame { lease: 0, data: frame.data })).await.is_err() {
                    break;
                }
            }
            notice = notices.recv() => match notice.as_deref() {
                Ok(Notice::Lease { lease: l, kind: "ended", .. }) if *l == lease => {
                    let _ = to.send(Err(Status::aborted(format!("{lease} ended")))).await;
                    break;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                _ => {}
            }
        }
    }
}
