//! Ethernet frames over datagrams: a frame (with its 10-byte virtio-net
//! header in front, so that 64 KiB segmentation-offload frames cross whole)
//! is cut into equal pieces that each fit one UDP datagram, and put together
//! again on the other side, in whatever order the pieces come.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The virtio-net header every frame carries in front (zeros: a plain frame).
pub const VNET_HDR: usize = 10;
/// The smallest frame: the header and an Ethernet header.
pub const MIN_FRAME: usize = VNET_HDR + 14;
/// The largest frame: a 64 KiB offload frame with its headers.
pub const MAX_FRAME: usize = VNET_HDR + 65_550;
/// A frame not complete this long after its first piece is dropped.
const PARTIAL_LIFETIME: Duration = Duration::from_secs(2);
/// Frames being put together per peer at once.
const PARTIALS: usize = 16;

pub type Mac = [u8; 6];

pub fn destination(frame: &[u8]) -> Mac {
    frame[VNET_HDR..VNET_HDR + 6].try_into().expect("a frame has an Ethernet header")
}

pub fn source(frame: &[u8]) -> Mac {
    frame[VNET_HDR + 6..VNET_HDR + 12].try_into().expect("a frame has an Ethernet header")
}

/// Broadcast and multicast addresses have the group bit set.
pub fn is_group(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

struct Partial {
    buf: Vec<u8>,
    next: u8,
    count: u8,
    later: BTreeMap<u8, Vec<u8>>,
    started: Instant,
}

/// The frames a peer is sending, by frame id.
#[derive(Default)]
pub struct Reassembly {
    partial: BTreeMap<u32, Partial>,
}

impl Reassembly {
    /// Adds a piece; returns the frame when it is complete.
    pub fn add(&mut self, frame: u32, index: u8, count: u8, bytes: &[u8], now: Instant) -> Option<Vec<u8>> {
        if count == 1 {
            return (index == 0).then(|| bytes.to_vec());
        }
        if !self.partial.contains_key(&frame) {
            if self.partial.len() >= PARTIALS {
                // The oldest frame id gives way: its pieces were lost.
                self.partial.pop_first();
            }
            self.partial.insert(frame, Partial { buf: Vec::with_capacity(bytes.len() * count as usize), next: 0, count, later: BTreeMap::new(), started: now });
        }
        let p = self.partial.get_mut(&frame).expect("just inserted");
        if p.count != count || index < p.next || p.later.contains_key(&index) || p.buf.len() + bytes.len() > MAX_FRAME {
            return None;
        }
        if index == p.next {
            p.buf.extend_from_slice(bytes);
            p.next += 1;
            while let Some(b) = p.later.remove(&p.next) {
                p.buf.extend_from_slice(&b);
                p.next += 1;
            }
        } else {
            p.later.insert(index, bytes.to_vec());
        }
        if p.next == p.count {
            return self.partial.remove(&frame).map(|p| p.buf);
        }
        None
    }

    /// Drops frames whose pieces stopped coming.
    pub fn expire(&mut self, now: Instant) {
        self.partial.retain(|_, p| now.duration_since(p.started) < PARTIAL_LIFETIME);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_in_any_order_make_the_frame_once() {
        let now = Instant::now();
        let frame: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let pieces: Vec<&[u8]> = frame.chunks(1400).collect();
        let n = pieces.len() as u8;
        let mut r = Reassembly::default();
        let order = [3u8, 0, 1, 6, 2, 5, 4, 7];
        let mut out = None;
        for (k, &i) in order.iter().enumerate() {
            let got = r.add(9, i, n, pieces[i as usize], now);
            if k + 1 < order.len() {
                assert!(got.is_none());
            } else {
                out = got;
            }
        }
        assert_eq!(out.unwrap(), frame);
        assert!(r.add(9, 7, n, pieces[7], now).is_none(), "a late duplicate starts nothing whole");
        assert_eq!(r.add(10, 0, 1, b"whole", now).unwrap(), b"whole");
        // A frame missing a piece is dropped after a while.
        r.add(11, 0, 2, b"half", now);
        r.expire(now + PARTIAL_LIFETIME);
        assert!(r.add(11, 1, 2, b"rest", now + PARTIAL_LIFETIME).is_none());
    }
}
