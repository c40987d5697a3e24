//! SOCKS5 (RFC 1928) as far as a proxy into a cluster needs it: no
//! authentication, and CONNECT to an IPv4 address (or a name that is one:
//! the cluster has no DNS). Pure parsing of what a client sends, so that
//! any bytes at all get an answer and never a panic.

use std::net::{Ipv4Addr, SocketAddrV4};

/// A message parsed from the front of a buffer, or the need for more bytes.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    More,
    /// The message and how many bytes it took.
    Done(T, usize),
}

/// Why a client is refused; each maps to the reply code it is told.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("not SOCKS version 5 (version byte {0})")]
    Version(u8),
    #[error("the client offers no method we take (only \"no authentication\")")]
    NoMethod,
    #[error("command {0} is not supported (only CONNECT)")]
    Command(u8),
    #[error("address type {0} is not supported (IPv4 only: the cluster is 10.77.0.0/16)")]
    AddressType(u8),
    #[error("{0:?} is not an IPv4 address (the cluster has no names)")]
    Name(String),
}

impl Refused {
    /// The REP field of the reply that tells the client so.
    pub fn reply_code(&self) -> u8 {
        match self {
            Refused::Command(_) => COMMAND_NOT_SUPPORTED,
            Refused::AddressType(_) | Refused::Name(_) => ADDRESS_TYPE_NOT_SUPPORTED,
            Refused::Version(_) | Refused::NoMethod => GENERAL_FAILURE,
        }
    }
}

pub const SUCCEEDED: u8 = 0;
pub const GENERAL_FAILURE: u8 = 1;
pub const NOT_ALLOWED: u8 = 2;
pub const HOST_UNREACHABLE: u8 = 4;
pub const CONNECTION_REFUSED: u8 = 5;
pub const COMMAND_NOT_SUPPORTED: u8 = 7;
pub const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 8;

/// The answer to a greeting that offers "no authentication".
pub const NO_AUTHENTICATION: [u8; 2] = [5, 0];
/// The answer to one that does not.
pub const NO_ACCEPTABLE_METHOD: [u8; 2] = [5, 0xff];

/// The client's greeting: version 5, then its methods.
pub fn greeting(b: &[u8]) -> Result<Parsed<()>, Refused> {
    let Some(&version) = b.first() else { return Ok(Parsed::More) };
    if version != 5 {
        return Err(Refused::Version(version));
    }
    let Some(&n) = b.get(1) else { return Ok(Parsed::More) };
    let Some(methods) = b.get(2..2 + n as usize) else { return Ok(Parsed::More) };
    if methods.contains(&0) {
        Ok(Parsed::Done((), 2 + n as usize))
    } else {
        Err(Refused::NoMethod)
    }
}

/// The client's request: where to connect.
pub fn request(b: &[u8]) -> Result<Parsed<SocketAddrV4>, Refused> {
    let Some(head) = b.get(..4) else {
        // Refuse a wrong version or command as soon as it is seen.
        return match b {
            [v, ..] if *v != 5 => Err(Refused::Version(*v)),
            [_, c, ..] if *c != 1 => Err(Refused::Command(*c)),
            _ => Ok(Parsed::More),
        };
    };
    let (version, command, kind) = (head[0], head[1], head[3]);
    if version != 5 {
        return Err(Refused::Version(version));
    }
    if command != 1 {
        return Err(Refused::Command(command));
    }
    let port = |at: usize| b.get(at..at + 2).map(|p| u16::from_be_bytes([p[0], p[1]]));
    match kind {
        1 => {
            let (Some(ip), Some(port)) = (b.get(4..8), port(8)) else { return Ok(Parsed::More) };
            Ok(Parsed::Done(SocketAddrV4::new(Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]), port), 10))
        }
        3 => {
            let Some(&len) = b.get(4) else { return Ok(Parsed::More) };
            let end = 5 + len as usize;
            let (Some(name), Some(port)) = (b.get(5..end), port(end)) else { return Ok(Parsed::More) };
            let name = String::from_utf8_lossy(name).into_owned();
            let ip: Ipv4Addr = name.parse().map_err(|_| Refused::Name(name))?;
            Ok(Parsed::Done(SocketAddrV4::new(ip, port), end + 2))
        }
        other => Err(Refused::AddressType(other)),
    }
}

/// The server's reply: a code and the address it connected from.
pub fn reply(code: u8, bound: SocketAddrV4) -> [u8; 10] {
    let mut r = [5, code, 0, 1, 0, 0, 0, 0, 0, 0];
    r[4..8].copy_from_slice(&bound.ip().octets());
    r[8..10].copy_from_slice(&bound.port().to_be_bytes());
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn curl_s_greeting_and_requests() {
        // curl --socks5 offers no authentication and username/password.
        assert_eq!(greeting(&[5, 2, 0, 2]), Ok(Parsed::Done((), 4)));
        assert_eq!(greeting(&[5, 1, 2]), Err(Refused::NoMethod));
        assert_eq!(greeting(&[4, 1, 0]), Err(Refused::Version(4)));
        assert_eq!(greeting(&[5, 2, 0]), Ok(Parsed::More));
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 77, 0, 2), 80);
        assert_eq!(request(&[5, 1, 0, 1, 10, 77, 0, 2, 0, 80, 0xaa]), Ok(Parsed::Done(to, 10)));
        let mut named = vec![5, 1, 0, 3, 9];
        named.extend_from_slice(b"10.77.0.2");
        named.extend_from_slice(&[0, 80]);
        assert_eq!(request(&named), Ok(Parsed::Done(to, named.len())));
        let mut host = vec![5, 1, 0, 3, 7];
        host.extend_from_slice(b"example\0\x50");
        assert_eq!(request(&host), Err(Refused::Name("example".into())));
        assert_eq!(request(&[5, 2, 0, 1]), Err(Refused::Command(2)));
        assert_eq!(request(&[5, 2]), Err(Refused::Command(2)));
        assert_eq!(request(&[5, 1, 0, 4, 0]), Err(Refused::AddressType(4)));
        assert_eq!(reply(SUCCEEDED, to), [5, 0, 0, 1, 10, 77, 0, 2, 0, 80]);
        assert_eq!(Refused::Command(2).reply_code(), COMMAND_NOT_SUPPORTED);
    }

    proptest! {
        #[test]
        fn any_bytes_get_an_answer_never_a_panic(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Parsed::Done((), n)) = greeting(&b) { prop_assert!(n <= b.len()); }
            if let Ok(Parsed::Done(_, n)) = request(&b) { prop_assert!(n <= b.len()); }
        }

        #[test]
        fn every_prefix_of_a_request_asks_for_more(ip in any::<[u8; 4]>(), port in any::<u16>(), named in any::<bool>()) {
            let to = SocketAddrV4::new(Ipv4Addr::from(ip), port);
            let mut r = vec![5, 1, 0];
            if named {
                let name = to.ip().to_string();
                r.push(3);
                r.push(name.len() as u8);
                r.extend_from_slice(name.as_bytes());
            } else {
                r.push(1);
                r.extend_from_slice(&ip);
            }
            r.extend_from_slice(&port.to_be_bytes());
            for cut in 0..r.len() {
                prop_assert_eq!(request(&r[..cut]), Ok(Parsed::More));
            }
            prop_assert_eq!(request(&r), Ok(Parsed::Done(to, r.len())));
        }
    }
}
