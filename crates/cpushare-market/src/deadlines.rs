//! Lease deadlines (ready timeouts and period ends) in time order.
//!
//! A min-heap with lazy deletion: when a lease's deadline moves or the lease
//! ends, its old entry stays and is skipped when it comes up, so that moving a
//! deadline costs one push instead of a search. The heap is rebuilt from the
//! live leases when stale entries outnumber them three to one: a rebuild reads
//! the whole lease table (some 5 ms at 100,000 leases), so it is made rarely,
//! for 16 bytes a stale entry.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::{LeaseId, Time};

#[derive(Debug, Clone, Default)]
pub(crate) struct Deadlines {
    heap: BinaryHeap<Reverse<(Time, LeaseId)>>,
}

impl Deadlines {
    pub fn push(&mut self, at: Time, lease: LeaseId) {
        self.heap.push(Reverse((at, lease)));
    }

    /// The earliest entry for which `live` holds, dropping stale ones on the way.
    pub fn first_live(&mut self, live: impl Fn(Time, LeaseId) -> bool) -> Option<(Time, LeaseId)> {
        while let Some(&Reverse((at, lease))) = self.heap.peek() {
            if live(at, lease) {
                return Some((at, lease));
            }
            self.heap.pop();
        }
        None
    }

    /// Rebuilds from the live deadlines once stale entries outnumber them three to one.
    pub fn compact(&mut self, live: usize, deadlines: impl Iterator<Item = (Time, LeaseId)>) {
        if self.heap.len() > 4 * live + 1024 {
            self.heap = deadlines.map(Reverse).collect();
        }
    }

    /// Every entry, stale ones included, in no order (for checks).
    pub fn entries(&self) -> impl Iterator<Item = (Time, LeaseId)> + '_ {
        self.heap.iter().map(|e| e.0)
    }
}
