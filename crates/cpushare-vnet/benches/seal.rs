//! Sealing a data packet: AES-256-GCM, what the network's data packets use,
//! against ChaCha20-Poly1305, WireGuard's (the peer), both from ring, on
//! packets of a full frame's size. Run with `cargo bench -p cpushare-vnet --bench seal`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ring::aead::{Aad, Algorithm, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, CHACHA20_POLY1305};

/// An Ethernet frame of the default MTU, as the node seals it.
const PACKET: usize = 1400;

fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal a 1,400-byte packet");
    group.throughput(Throughput::Bytes(PACKET as u64));
    for (name, alg) in [("aes-256-gcm (cpushare)", &AES_256_GCM), ("chacha20-poly1305 (wireguard)", &CHACHA20_POLY1305)] {
        let key = LessSafeKey::new(UnboundKey::new(alg as &Algorithm, &[7u8; 32]).unwrap());
        let mut packet = vec![0u8; PACKET];
        let mut counter = 0u64;
        group.bench_function(name, |b| {
            b.iter(|| {
                counter += 1;
                let mut n = [0u8; 12];
                n[4..].copy_from_slice(&counter.to_le_bytes());
                key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(n), Aad::from(&[0u8; 16]), &mut packet).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, seal);
criterion_main!(benches);
