//! The parsers a VM or a peer feeds frames to: the wire format, frame
//! pieces, DHCP answers to what a VM sends, offload segmentation of a
//! peer's large frames, and the SOCKS5 proxy's requests.
#![no_main]

use std::time::Instant;

use cpushare_vnet::{dhcp, frames, gso, socks5, wire};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = wire::parse(data);
    let _ = wire::parse_inner(data);
    let lease = dhcp::Lease { mac: [0x52, 0x54, 0, 0x77, 0, 2], ip: [10, 77, 0, 2].into(), prefix: data.first().map_or(16, |p| p % 33) };
    if let Some(answer) = dhcp::answer(data, &lease) {
        assert!(answer.len() >= 14, "an answer is a frame");
    }
    if let Some(frames) = gso::plain_frames(data) {
        for f in frames {
            assert!(f.len() <= 64 * 1024 + 128, "a segment no larger than a frame");
        }
    }
    let _ = socks5::greeting(data);
    let _ = socks5::request(data);
    // Pieces of frames in any order, counts and sizes.
    let mut r = frames::Reassembly::default();
    let now = Instant::now();
    for c in data.chunks(7) {
        if c.len() >= 3 {
            let _ = r.add(u32::from(c[0] % 4), c[1] % 8, c[2] % 8, &c[3..], now);
        }
    }
    r.expire(now);
});
