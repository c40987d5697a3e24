//! The order-entry stream (`PlaceOrders`): many orders in flight on one
//! stream, each answered in the order sent once what it changed is durable.
//!
//! Why a stream: a unary call per order costs an HTTP/2 stream, its headers,
//! the client certificate's fingerprint and a round trip of its own, which on
//! loopback is most of an order's cost. Here the entries of one stream share
//! all of that, and their engine jobs land in the same group commits.

use std::sync::Arc;

use cpushare_market::OrderId;
use cpushare_proto::v1 as pb;
use futures::stream::FuturesOrdered;
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use crate::service::Api;

/// Entries read ahead of their answers, per stream (the proto's `ORDER_WINDOW`).
pub const ORDER_WINDOW: usize = 64;

pub(crate) fn serve(api: Arc<Api>, fingerprint: String, mut entries: Streaming<pb::OrderEntry>) -> crate::service::OrderAcks {
    let (out, acks) = mpsc::channel::<Result<pb::OrderAck, Status>>(ORDER_WINDOW);
    tokio::spawn(async move {
        let mut pending = FuturesOrdered::new();
        let mut open = true;
        while open || !pending.is_empty() {
            tokio::select! {
                entry = entries.message(), if open && pending.len() < ORDER_WINDOW => match entry {
                    Ok(Some(entry)) => {
                        let api = api.clone();
                        let fingerprint = fingerprint.clone();
                        pending.push_back(async move {
                            let tag = entry.tag;
                            match answer(&api, &fingerprint, entry).await {
                                Ok(placed) => pb::OrderAck { tag, placed: Some(placed), code: 0, error: String::new() },
                                Err(status) => pb::OrderAck { tag, placed: None, code: status.code() as i32, error: status.message().to_string() },
                            }
                        });
                    }
                    Ok(None) => open = false,
                    Err(status) => {
                        // A broken or malformed stream: what is in flight still lands
                        // (it may already be committed), but nobody hears of it.
                        tracing::debug!(%status, "order-entry stream broke");
                        let _ = out.send(Err(status)).await;
                        return;
                    }
                },
                Some(ack) = pending.next() => {
                    if out.send(Ok(ack)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    Box::pin(ReceiverStream::new(acks))
}

/// One entry, as its unary call would do it; the caller is checked again for
/// each, so that revoking a node stops its stream's next order.
async fn answer(api: &Api, fingerprint: &str, entry: pb::OrderEntry) -> Result<pb::OrderReply, Status> {
    let c = api.trusted(fingerprint)?;
    match entry.order {
        Some(pb::order_entry::Order::Buy(r)) => api.place_buy_as(c, r).await,
        Some(pb::order_entry::Order::Sell(r)) => api.place_sell_as(c, r).await,
        Some(pb::order_entry::Order::Cancel(r)) => {
            api.cancel_order_as(c, OrderId(r.order)).await?;
            Ok(pb::OrderReply { order: r.order, leases: Vec::new() })
        }
        None => Err(Status::invalid_argument("an order entry needs a buy, a sell or a cancel")),
    }
}
