//! The job protocol a buyer and a seller speak over a lease's relay: each
//! relay frame carries one `JobMessage` (see `exchange.proto`); an empty frame
//! only opens the relay.

use anyhow::Context;
use cpushare_proto::v1 as pb;
use prost::bytes::Bytes;
use prost::Message;

use crate::RELAY_CHUNK;

/// What a seller's signed statement of the VM it booted is called (the
/// protocol's `VmAttestation`; see [`crate::pki::verify_statement`]).
pub const VM_BOOT_STATEMENT: &str = "vm-boot";

/// One job message as a relay frame.
pub fn frame(body: pb::job_message::Body) -> pb::RelayFrame {
    pb::RelayFrame { lease: 0, data: pb::JobMessage { body: Some(body) }.encode_to_vec().into() }
}

/// Sends what `from` holds, at most `limit` bytes, as chunks (`wrap` says
/// which kind: file data, an image) of `fragment`, each read straight into its
/// frame. The last chunk says so (there is always one); a short read is the end.
pub async fn send_file(
    out: &tokio::sync::mpsc::Sender<pb::RelayFrame>,
    wrap: fn(pb::Chunk) -> pb::job_message::Body,
    fragment: u64,
    mut from: impl std::io::Read + Send,
    limit: u64,
) -> anyhow::Result<()> {
    use std::io::Read;
    let mut left = limit;
    loop {
        let want = left.min(RELAY_CHUNK as u64) as usize;
        let mut last = false;
        let frame = chunk_frame(wrap, |buf, chunk| {
            buf.reserve_exact(want);
            let n = (&mut from).take(want as u64).read_to_end(buf)?;
            left -= n as u64;
            last = n < want || left == 0;
            chunk.fragment = fragment;
            chunk.last = last;
            Ok(())
        })?;
        out.send(frame).await.map_err(|_| anyhow::anyhow!("the relay closed"))?;
        if last {
            return Ok(());
        }
    }
}

/// Room kept in front of a chunk's data for the message's header.
const HEADER_ROOM: usize = 48;

/// A frame carrying a chunk (`wrap` says which kind: input, file data...)
/// whose data `fill` appends to the vector it is given, reading it from a
/// file or copying it from a slice. The data lands in the frame itself: one
/// copy, not one into a chunk and another into its encoding. `fill` may also
/// set the chunk's other fields (`last` once it knows).
pub fn chunk_frame(
    wrap: fn(pb::Chunk) -> pb::job_message::Body,
    fill: impl FnOnce(&mut Vec<u8>, &mut pb::Chunk) -> std::io::Result<()>,
) -> std::io::Result<pb::RelayFrame> {
    use prost::encoding::{decode_varint, encode_key, encode_varint, encoded_len_varint, WireType};
    let mut buf = vec![0u8; HEADER_ROOM];
    let mut meta = pb::Chunk::default();
    fill(&mut buf, &mut meta)?;
    let n = buf.len() - HEADER_ROOM;
    // The message without the data is: the chunk's key, its length, its other
    // fields. With the data field added at the end (field order is free), the
    // length grows by the data field's key, length and bytes.
    let without = pb::JobMessage { body: Some(wrap(meta)) }.encode_to_vec();
    let mut rest = &without[..];
    decode_varint(&mut rest).expect("our own encoding");
    let key = &without[..without.len() - rest.len()];
    let fields_len = decode_varint(&mut rest).expect("our own encoding") as usize;
    let mut head = Vec::with_capacity(HEADER_ROOM);
    head.extend_from_slice(key);
    encode_varint((fields_len + 1 + encoded_len_varint(n as u64) + n) as u64, &mut head);
    head.extend_from_slice(rest);
    encode_key(2, WireType::LengthDelimited, &mut head);
    encode_varint(n as u64, &mut head);
    assert!(head.len() <= HEADER_ROOM, "a chunk's header fits its room");
    let start = HEADER_ROOM - head.len();
    buf[start..HEADER_ROOM].copy_from_slice(&head);
    Ok(pb::RelayFrame { lease: 0, data: Bytes::from(buf).slice(start..) })
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

#[cfg(test)]
mod tests {
    use super::*;
    use pb::job_message::Body;

    #[test]
    fn a_chunk_frame_decodes_as_the_chunk_it_stands_for() {
        for (n, fragment, last, size) in [(0usize, 0u64, false, 0u64), (5, 7, true, 0), (300, u64::MAX, true, 1 << 40), (70_000, 1, false, 70_000)] {
            let data: Vec<u8> = (0..n).map(|i| i as u8).collect();
            let frame = chunk_frame(Body::FileData, |buf, meta| {
                buf.extend_from_slice(&data);
                meta.fragment = fragment;
                meta.last = last;
                meta.size = size;
                Ok(())
            })
            .unwrap();
            let decoded = pb::JobMessage::decode(frame.data).unwrap().body;
            assert_eq!(decoded, Some(Body::FileData(pb::Chunk { fragment, data: data.into(), last, size })));
        }
    }
}
