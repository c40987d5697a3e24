//! Frames for ports that take only plain Ethernet (a VM on QEMU's datagram
//! socket): the buyer's tap hands out 64 KiB TCP frames (segmentation
//! offload) and frames whose checksum is left for later; they cross the
//! network whole, and are cut into MTU-sized frames with their checksums
//! done here, at the last hop, where a port needs it.

use crate::frames::VNET_HDR;

pub const F_NEEDS_CSUM: u8 = 1;
pub const GSO_NONE: u8 = 0;
pub const GSO_TCPV4: u8 = 1;
pub const GSO_TCPV6: u8 = 4;
const GSO_ECN: u8 = 0x80;

/// The fields of a virtio-net header (little-endian, as the tap gives it on x86).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHdr {
    pub flags: u8,
    pub gso_type: u8,
    pub hdr_len: u16,
    pub gso_size: u16,
    pub csum_start: u16,
    pub csum_offset: u16,
}

impl VnetHdr {
    pub fn read(b: &[u8]) -> VnetHdr {
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr { flags: b[0], gso_type: b[1], hdr_len: u(2), gso_size: u(4), csum_start: u(6), csum_offset: u(8) }
    }

    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }
}

/// One's complement sum of `b`, folded in but not complemented.
fn sum(mut acc: u32, b: &[u8]) -> u32 {
    let mut chunks = b.chunks_exact(2);
    for c in &mut chunks {
        acc = acc.wrapping_add(u16::from_be_bytes([c[0], c[1]]) as u32);
        if acc >= 0xffff_0000 {
            acc = (acc & 0xffff) + (acc >> 16);
        }
    }
    if let [last] = chunks.remainder() {
        acc = acc.wrapping_add((*last as u32) << 8);
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The plain Ethernet frames a frame (virtio-net header first) stands for,
/// without the header: segmented if it is an offload frame, its checksum
/// completed if that was left to do. None for what cannot be parsed.
pub fn plain_frames(frame: &[u8]) -> Option<Vec<Vec<u8>>> {
    if frame.len() < VNET_HDR + 14 {
        return None;
    }
    let hdr = VnetHdr::read(frame);
    let eth = &frame[VNET_HDR..];
    match hdr.gso_type & !GSO_ECN {
        GSO_NONE => {
            let mut f = eth.to_vec();
            if hdr.flags & F_NEEDS_CSUM != 0 {
                let (start, offset) = (hdr.csum_start as usize, hdr.csum_offset as usize);
                if start + offset + 2 > f.len() {
                    return None;
                }
                let c = !fold(sum(0, &f[start..]));
                f[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
            }
            Some(vec![f])
        }
        GSO_TCPV4 | GSO_TCPV6 => segment_tcp(eth, hdr.gso_size as usize),
        _ => None,
    }
}

/// Cuts a TCP offload frame into frames of at most `mss` payload bytes,
/// each with its own IP length, identification and checksums, its own
/// sequence number, and the flags only the first or last may carry.
fn segment_tcp(eth: &[u8], mss: usize) -> Option<Vec<Vec<u8>>> {
    let ether_type = u16::from_be_bytes([eth[12], eth[13]]);
    let ip = 14;
    let (v4, ip_len) = match ether_type {
        0x0800 => (true, ((*eth.get(ip)? & 0x0f) as usize) * 4),
        0x86dd => (false, 40),
        _ => return None,
    };
    let tcp = ip + ip_len;
    let tcp_len = ((*eth.get(tcp + 12)? >> 4) as usize) * 4;
    let payload_at = tcp + tcp_len;
    // Headers shorter than their fixed parts are a peer's junk (checked
    // before anything is indexed: frames come from other buyers' VMs).
    if mss == 0 || ip_len < 20 || tcp_len < 20 || payload_at > eth.len() || (v4 && eth[ip + 9] != 6) || (!v4 && eth[ip + 6] != 6) {
        return None;
    }
    let payload = &eth[payload_at..];
    let seq = u32::from_be_bytes(eth[tcp + 4..tcp + 8].try_into().ok()?);
    let id = u16::from_be_bytes([eth[ip + 4], eth[ip + 5]]);
    let flags = eth[tcp + 13];
    let (fin_psh, cwr) = (0x09u8, 0x80u8);
    let count = payload.len().div_ceil(mss).max(1);
    let mut out = Vec::with_capacity(count);
    for (i, chunk) in payload.chunks(mss).enumerate() {
        let mut f = Vec::with_capacity(payload_at + chunk.len());
        f.extend_from_slice(&eth[..payload_at]);
        f.extend_from_slice(chunk);
        let seg_tcp_len = tcp_len + chunk.len();
        if v4 {
            f[ip + 2..ip + 4].copy_from_slice(&((ip_len + seg_tcp_len) as u16).to_be_bytes());
            f[ip + 4..ip + 6].copy_from_slice(&id.wrapping_add(i as u16).to_be_bytes());
            f[ip + 10..ip + 12].copy_from_slice(&[0, 0]);
            let c = !fold(sum(0, &f[ip..ip + ip_len]));
            f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
        } else {
            f[ip + 4..ip + 6].copy_from_slice(&(seg_tcp_len as u16).to_be_bytes());
        }
        f[tcp + 4..tcp + 8].copy_from_slice(&seq.wrapping_add((i * mss) as u32).to_be_bytes());
        let mut fl = flags;
        if i + 1 < count {
            fl &= !fin_psh;
        }
        if i > 0 {
            fl &= !cwr;
        }
        f[tcp + 13] = fl;
        // The pseudo-header, then the segment.
        f[tcp + 16..tcp + 18].copy_from_slice(&[0, 0]);
        let mut acc = if v4 { sum(0, &f[ip + 12..ip + 20]) } else { sum(0, &f[ip + 8..ip + 40]) };
        acc = acc.wrapping_add(6).wrapping_add(seg_tcp_len as u32);
        let c = !fold(sum(acc, &f[tcp..]));
        f[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
        out.push(f);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP frame with `payload`, checksums right, as a sender would make it.
    fn tcp4(payload: &[u8], seq: u32, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        f[14] = 0x45;
        f[14 + 8] = 64;
        f[14 + 9] = 6;
        f[14 + 12..14 + 16].copy_from_slice(&[10, 77, 0, 1]);
        f[14 + 16..14 + 20].copy_from_slice(&[10, 77, 0, 2]);
        f[14 + 4..14 + 6].copy_from_slice(&100u16.to_be_bytes());
        f[34..36].copy_from_slice(&5000u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[38..42].copy_from_slice(&seq.to_be_bytes());
        f[34 + 12] = 5 << 4;
        f[34 + 13] = flags;
        f.extend_from_slice(payload);
        let total = (20 + 20 + payload.len()) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        let c = !fold(sum(0, &f[14..34]));
        f[24..26].copy_from_slice(&c.to_be_bytes());
        let mut acc = sum(0, &f[26..34]);
        acc = acc.wrapping_add(6).wrapping_add((20 + payload.len()) as u32);
        let c = !fold(sum(acc, &f[34..]));
        f[50..52].copy_from_slice(&c.to_be_bytes());
        f
    }

    #[test]
    fn an_offload_frame_becomes_the_frames_a_sender_would_have_sent() {
        let payload: Vec<u8> = (0..4000u32).map(|i| i as u8).collect();
        let big = tcp4(&payload, 1000, 0x18); // PSH|ACK
        let mut framed = vec![0u8; VNET_HDR];
        VnetHdr { flags: F_NEEDS_CSUM, gso_type: GSO_TCPV4, hdr_len: 54, gso_size: 1448, csum_start: 34, csum_offset: 16 }.write(&mut framed);
        framed.extend_from_slice(&big);
        let segs = plain_frames(&framed).unwrap();
        assert_eq!(segs.len(), 3);
        for (i, s) in segs.iter().enumerate() {
            let chunk = &payload[i * 1448..((i + 1) * 1448).min(payload.len())];
            let mut expect = tcp4(chunk, 1000 + (i * 1448) as u32, if i == 2 { 0x18 } else { 0x10 });
            expect[18..20].copy_from_slice(&(100 + i as u16).to_be_bytes());
            // The identification changed: so did the IP checksum.
            expect[24..26].copy_from_slice(&[0, 0]);
            let c = !fold(sum(0, &expect[14..34]));
            expect[24..26].copy_from_slice(&c.to_be_bytes());
            assert_eq!(s, &expect, "segment {i}");
        }
    }

    #[test]
    fn a_checksum_left_to_do_is_done() {
        let done = tcp4(b"hello world", 7, 0x18);
        // As a tap hands it out: the TCP checksum field holds the pseudo-header's sum only.
        let mut partial = done.clone();
        let acc = sum(0, &partial[26..34]).wrapping_add(6).wrapping_add(20 + 11);
        partial[50..52].copy_from_slice(&fold(acc).to_be_bytes());
        let mut framed = vec![0u8; VNET_HDR];
        VnetHdr { flags: F_NEEDS_CSUM, csum_start: 34, csum_offset: 16, ..Default::default() }.write(&mut framed);
        framed.extend_from_slice(&partial);
        assert_eq!(plain_frames(&framed).unwrap(), vec![done]);
        assert!(plain_frames(&framed[..12]).is_none());
    }

    proptest::proptest! {
        /// Frames come from peers, that is from other buyers' VMs: any header
        /// and any bytes give frames or None, never a panic, and an offload
        /// frame's pieces carry at most its segment size each.
        #[test]
        fn any_frame_from_a_peer_is_cut_or_refused_never_a_panic(
            flags in 0u8..4, gso_type in proptest::sample::select(vec![GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_TCPV4 | GSO_ECN, 3, 0xff]),
            gso_size in 0u16..2000, csum_start in 0u16..200, csum_offset in 0u16..40,
            ihl_and_offset in proptest::prelude::any::<(u8, u8)>(),
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..3000),
            ether in proptest::sample::select(vec![0x0800u16, 0x86dd, 0x0806]),
        ) {
            let mut f = vec![0u8; VNET_HDR];
            VnetHdr { flags, gso_type, hdr_len: 0, gso_size, csum_start, csum_offset }.write(&mut f);
            f.extend_from_slice(&[0xff; 12]);
            f.extend_from_slice(&ether.to_be_bytes());
            let mut body = body;
            // Make the IP and TCP header lengths (and protocol) sometimes plausible, sometimes not.
            if let Some(b) = body.get_mut(0) { *b = 0x40 | (ihl_and_offset.0 & 0x0f); }
            if let Some(b) = body.get_mut(9) { *b = 6; }
            if let Some(b) = body.get_mut(6) { *b = 6; }
            let tcp = if ether == 0x86dd { 40 } else { (ihl_and_offset.0 & 0x0f) as usize * 4 };
            if let Some(b) = body.get_mut(tcp + 12) { *b = ihl_and_offset.1; }
            f.extend_from_slice(&body);
            if let Some(frames) = plain_frames(&f) {
                if gso_type & !GSO_ECN != GSO_NONE {
                    for p in &frames {
                        proptest::prop_assert!(p.len() >= 14 + 20 + 20);
                        proptest::prop_assert!(p.len() <= f.len() - VNET_HDR);
                    }
                }
            }
        }
    }
}
