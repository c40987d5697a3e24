//! Hash maps keyed by the market's ids, laid out so that ids issued close
//! together sit close together in memory.
//!
//! Why: the market's tables (slots, buy orders, leases) outgrow the CPU's caches
//! at internet scale, and a lookup that misses them costs more than the rest of
//! an operation. Ids are issued in time order, and what happens at one time
//! tends to be touched again together: a buy order and the leases it opened
//! were created one after another, and leases opened in the same minute come up
//! for renewal or end in the same minute. A multiplicative hash (FxHash)
//! scatters those neighbours over the whole table; this one keeps each run of
//! [`RUN`] consecutive ids in neighbouring buckets and scatters the runs.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

/// Consecutive ids that share a stretch of buckets.
const RUN: u64 = 16;
const MIX: u64 = 0x9E37_79B9_7F4A_7C15;
/// hashbrown tells apart the keys of one probe group by the hash's top 7 bits:
/// those come from the id itself, so that a run's ids differ there too.
const TAG: u64 = 0xFE00_0000_0000_0000;

#[derive(Debug, Default, Clone, Copy)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write_u64(&mut self, id: u64) {
        let run = (id / RUN).wrapping_mul(MIX);
        let tag = id.wrapping_mul(MIX) & TAG;
        self.0 = tag | (run.wrapping_mul(RUN) & !TAG) | (id % RUN);
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only u64 ids are hashed here; anything else still gets a sound hash.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(MIX);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    fn hash(id: u64) -> u64 {
        BuildHasherDefault::<IdHasher>::default().hash_one(crate::OrderId(id))
    }

    #[test]
    fn a_run_of_ids_fills_neighbouring_buckets_and_runs_scatter() {
        let mask = (1 << 18) - 1;
        let base = hash(1600) & mask;
        for id in 1600..1616 {
            assert_eq!(hash(id) & mask, base + id % RUN, "id {id} leaves its run's stretch");
        }
        // Tags differ within a run, or a lookup would compare every key of the group.
        let tags: std::collections::HashSet<u64> = (1600..1616).map(|id| hash(id) >> 57).collect();
        assert!(tags.len() > 8, "only {} tags among 16 ids", tags.len());
        // Runs spread over the table: 4,096 runs of ids use most of 4,096 stretches.
        let stretches: std::collections::HashSet<u64> = (0..4096).map(|r| (hash(r * RUN) & mask) / RUN).collect();
        assert!(stretches.len() > 2500, "runs crowd into {} of 4096 stretches", stretches.len());
    }
}
