//! The job protocol a buyer and a seller speak over a lease's relay: each
//! relay frame carries one `JobMessage` (see `exchange.proto`); an empty frame
//! only opens the relay.

use anyhow::Context;
use cpushare_proto::v1 as pb;
use prost::bytes::Bytes;
use prost::Message;

use crate::RELAY_CHUNK;

/// One job message as a relay frame.
pub fn frame(body: pb::job_message::Body) -> pb::RelayFrame {
    pb::RelayFrame { lease: 0, data: pb::JobMessage { body: Some(body) }.encode_to_vec().into() }
}

/// The next job message from the other party; `None` when the relay closes.
pub async fn next(inbound: &mut tonic::Streaming<pb::RelayFrame>) -> anyhow::Result<Option<pb::job_message::Body>> {
    loop {
        let Some(frame) = inbound.message().await.map_err(|s| anyhow::anyhow!("the relay broke: {}", s.message()))? else { return Ok(None) };
        if frame.data.is_empty() {
            continue;
        }
        if let Some(body) = pb::JobMessage::decode(frame.data).context("a malformed job message")?.body {
            return Ok(Some(body));
        }
    }
}

/// `data` (a program, an input or an output) as chunks of [`RELAY_CHUNK`]
/// bytes, without copying: the first carries the whole size, the last says
/// so, and there is always at least one.
pub fn chunks(fragment: u64, data: Bytes) -> impl Iterator<Item = pb::Chunk> {
    let count = data.len().div_ceil(RELAY_CHUNK).max(1);
    (0..count).map(move |k| pb::Chunk {
        fragment,
        data: data.slice((k * RELAY_CHUNK).min(data.len())..((k + 1) * RELAY_CHUNK).min(data.len())),
        last: k + 1 == count,
        size: if k == 0 { data.len() as u64 } else { 0 },
    })
}
