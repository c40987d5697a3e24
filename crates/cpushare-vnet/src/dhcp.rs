//! Addresses for VMs that ask for one: a seller answers DHCP for the VM
//! behind each of its ports with the address the control plane gave that VM,
//! so an unmodified livecd with a DHCP client joins the cluster's subnet. The
//! request never leaves the seller.

use std::net::Ipv4Addr;

use crate::frames::VNET_HDR;

/// The made-up server the answers come from (the subnet's last address).
pub const SERVER_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x77, 0xff, 0xfe];

/// What a VM behind a port is to be told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    pub mac: [u8; 6],
    pub ip: Ipv4Addr,
    pub prefix: u8,
}

const DISCOVER: u8 = 1;
const OFFER: u8 = 2;
const REQUEST: u8 = 3;
const ACK: u8 = 5;
const MAGIC: [u8; 4] = [99, 130, 83, 99];

fn checksum(b: &[u8]) -> u16 {
    let mut acc: u32 = b.chunks(2).map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32).sum();
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// If `frame` (virtio-net header first) is a DHCP discover or request from
/// the VM `lease` is for, the answer to send back to it (header first).
pub fn answer(frame: &[u8], lease: &Lease) -> Option<Vec<u8>> {
    let eth = frame.get(VNET_HDR..)?;
    if eth.len() < 14 + 20 + 8 + 240 || eth[12..14] != [0x08, 0x00] || eth[6..12] != lease.mac {
        return None;
    }
    let ip = &eth[14..];
    let ihl = ((ip[0] & 0x0f) as usize) * 4;
    if ip[9] != 17 || ip.len() < ihl + 8 + 240 {
        return None;
    }
    let udp = &ip[ihl..];
    if udp[0..2] != 68u16.to_be_bytes() || udp[2..4] != 67u16.to_be_bytes() {
        return None;
    }
    let bootp = &udp[8..];
    if bootp[0] != 1 || bootp[236..240] != MAGIC {
        return None;
    }
    // The message type among the options.
    let mut kind = None;
    let mut i = 240;
    while i + 1 < bootp.len() && bootp[i] != 255 {
        if bootp[i] == 0 {
            i += 1;
            continue;
        }
        let len = bootp[i + 1] as usize;
        if bootp[i] == 53 && len == 1 && i + 2 < bootp.len() {
            kind = Some(bootp[i + 2]);
        }
        i += 2 + len;
    }
    let reply_kind = match kind? {
        DISCOVER => OFFER,
        REQUEST => ACK,
        _ => return None,
    };
    let server = server_ip(lease);
    let mask = netmask(lease.prefix).to_be_bytes();
    let mut b = vec![0u8; 240];
    b[0] = 2; // reply
    b[1] = 1;
    b[2] = 6;
    b[4..8].copy_from_slice(&bootp[4..8]); // the client's transaction id
    b[10..12].copy_from_slice(&bootp[10..12]); // its flags
    b[16..20].copy_from_slice(&lease.ip.octets());
    b[20..24].copy_from_slice(&server.octets());
    b[28..34].copy_from_slice(&lease.mac);
    b[236..240].copy_from_slice(&MAGIC);
    for opt in [&[53, 1, reply_kind][..], &[54, 4], &server.octets(), &[51, 4], &86_400u32.to_be_bytes(), &[1, 4], &mask, &[255]] {
        b.extend_from_slice(opt);
    }
    let udp_len = 8 + b.len();
    let mut out = vec![0u8; VNET_HDR];
    out.extend_from_slice(&lease.mac);
    out.extend_from_slice(&SERVER_MAC);
    out.extend_from_slice(&[0x08, 0x00]);
    let mut iph = [0u8; 20];
    iph[0] = 0x45;
    iph[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    iph[8] = 64;
    iph[9] = 17;
    iph[12..16].copy_from_slice(&server.octets());
    iph[16..20].copy_from_slice(&lease.ip.octets());
    let c = checksum(&iph);
    iph[10..12].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&iph);
    out.extend_from_slice(&67u16.to_be_bytes());
    out.extend_from_slice(&68u16.to_be_bytes());
    out.extend_from_slice(&(udp_len as u16).to_be_bytes());
    out.extend_from_slice(&[0, 0]); // no UDP checksum: allowed over IPv4
    out.extend_from_slice(&b);
    Some(out)
}

/// The network mask of a prefix length (0 to 32).
pub fn netmask(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0)
}

/// The subnet's last usable address, where answers come from.
pub fn server_ip(lease: &Lease) -> Ipv4Addr {
    let host_bits = 32 - lease.prefix as u32;
    let net = u32::from(lease.ip) & netmask(lease.prefix);
    Ipv4Addr::from(net | ((1u32 << host_bits) - 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: u8, mac: [u8; 6]) -> Vec<u8> {
        let mut bootp = vec![0u8; 240];
        bootp[0] = 1;
        bootp[4..8].copy_from_slice(&[1, 2, 3, 4]);
        bootp[28..34].copy_from_slice(&mac);
        bootp[236..240].copy_from_slice(&MAGIC);
        bootp.extend_from_slice(&[53, 1, kind, 255]);
        let mut f = vec![0u8; VNET_HDR];
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 0, 0, 0, 0, 255, 255, 255, 255];
        let total = (20 + 8 + bootp.len()) as u16;
        ip[2..4].copy_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&ip);
        f.extend_from_slice(&68u16.to_be_bytes());
        f.extend_from_slice(&67u16.to_be_bytes());
        f.extend_from_slice(&((8 + bootp.len()) as u16).to_be_bytes());
        f.extend_from_slice(&[0, 0]);
        f.extend_from_slice(&bootp);
        f
    }

    #[test]
    fn a_discover_gets_an_offer_and_a_request_an_ack_with_the_vms_address() {
        let lease = Lease { mac: [0x52, 0x54, 0, 0x77, 0, 5], ip: Ipv4Addr::new(10, 77, 0, 5), prefix: 16 };
        for (ask, expect) in [(DISCOVER, OFFER), (REQUEST, ACK)] {
            let a = answer(&request(ask, lease.mac), &lease).unwrap();
            let eth = &a[VNET_HDR..];
            assert_eq!(&eth[..6], &lease.mac);
            let bootp = &eth[14 + 20 + 8..];
            assert_eq!(&bootp[16..20], &[10, 77, 0, 5], "yiaddr");
            assert_eq!(&bootp[4..8], &[1, 2, 3, 4], "the transaction id");
            assert_eq!(&bootp[240..243], &[53, 1, expect]);
            assert!(bootp.windows(6).any(|w| w == [1, 4, 255, 255, 0, 0]), "the /16 mask");
            assert_eq!(checksum(&eth[14..34]), 0, "the IP header checksums");
        }
        assert_eq!(server_ip(&lease), Ipv4Addr::new(10, 77, 255, 254));
        assert!(answer(&request(DISCOVER, [1, 2, 3, 4, 5, 6]), &lease).is_none(), "another VM's request");
        assert!(answer(&request(7, lease.mac), &lease).is_none(), "a release gets no answer");
    }

    proptest::proptest! {
        /// What a VM sends its seller's node is the buyer's to choose: a
        /// discover with any bytes changed, cut or added gets an answer or
        /// none, never a panic, and an answer goes only to the lease's MAC.
        #[test]
        fn any_frame_from_a_vm_is_answered_or_ignored_never_a_panic(
            changes in proptest::collection::vec((0usize..400, proptest::prelude::any::<u8>()), 0..8),
            cut in 0usize..400,
            extra in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            let lease = Lease { mac: [0x52, 0x54, 0, 0x77, 0, 2], ip: Ipv4Addr::new(10, 77, 0, 2), prefix: 16 };
            let mut f = request(DISCOVER, lease.mac);
            for (at, b) in changes {
                if let Some(x) = f.get_mut(at) { *x = b; }
            }
            f.truncate(cut.max(1).min(f.len()));
            f.extend_from_slice(&extra);
            if let Some(reply) = answer(&f, &lease) {
                proptest::prop_assert_eq!(&reply[VNET_HDR..VNET_HDR + 6], &lease.mac[..]);
            }
        }
    }
}
