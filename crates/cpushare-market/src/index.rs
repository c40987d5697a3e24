//! A priority index over orders with four numeric attributes, answering
//! "the best-priority entry whose attributes pass these thresholds".
//!
//! Why not a plain price-ordered list: a buyer who wants 16 GiB per CPU and a
//! 20 ms latency would walk past every cheap small slot before finding one
//! that fits, and on a book of 100,000 slots that walk is the whole book.
//!
//! The index is a fixed-depth tree. Level `d` splits on attribute `d` by its
//! binary order of magnitude (bit length, so 32 buckets), and the leaves are
//! cells holding entries in priority order. Every node caches the best key in
//! its subtree. A query visits children best-first and stops as soon as a
//! subtree cannot beat what it already found; a subtree whose every bucket
//! passes every remaining threshold is answered by its cached best without
//! descending. Only the cells on a threshold's boundary are scanned entry by
//! entry, and only while they can still win.

use std::collections::BTreeMap;

use crate::OrderId;

/// Priority key: smaller is better. Asks use (price, seq), bids (MAX - price, seq);
/// `seq` is unique, so keys never tie.
pub type Key = (u64, u64);

const NONE_KEY: Key = (u64::MAX, u64::MAX);
const FANOUT: usize = 32;
const DIMS: usize = 4;

/// How an entry's attribute must relate to the query's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// entry >= query; a query of 0 constrains nothing.
    AtLeast,
    /// entry <= query; a query of `u32::MAX` constrains nothing.
    AtMost,
}

impl Bound {
    fn passes(self, entry: u32, query: u32) -> bool {
        match self {
            Bound::AtLeast => entry >= query,
            Bound::AtMost => entry <= query,
        }
    }

    fn unconstrained(self, query: u32) -> bool {
        match self {
            Bound::AtLeast => query == 0,
            Bound::AtMost => query == u32::MAX,
        }
    }

    /// Buckets that may hold a passing entry, as a bit mask.
    fn reachable(self, query: u32) -> u32 {
        let b = bucket(query);
        match self {
            // hi(bucket) >= query  <=>  bucket >= bucket(query)
            Bound::AtLeast => !0u32 << b,
            // lo(bucket) <= query  <=>  bucket <= bucket(query)
            Bound::AtMost => {
                if b == FANOUT - 1 {
                    !0
                } else {
                    (1u32 << (b + 1)) - 1
                }
            }
        }
    }

    /// Whether every value in the bucket passes.
    fn whole_bucket_passes(self, bucket: usize, query: u32) -> bool {
        let (lo, hi) = bucket_range(bucket);
        match self {
            Bound::AtLeast => lo >= query,
            Bound::AtMost => hi <= query,
        }
    }
}

/// Binary order of magnitude, clamped to the fan-out.
fn bucket(v: u32) -> usize {
    ((32 - v.leading_zeros()) as usize).min(FANOUT - 1)
}

fn bucket_range(b: usize) -> (u32, u32) {
    match b {
        0 => (0, 0),
        b if b == FANOUT - 1 => (1 << (b - 1), u32::MAX),
        b => (1 << (b - 1), (1u32 << b) - 1),
    }
}

#[derive(Debug, Clone)]
struct Node {
    best: Key,
    best_id: OrderId,
    /// Which children exist.
    present: u32,
    /// Child node index (levels 0..3) or cell index (level 3's children).
    child: [u32; FANOUT],
}

impl Node {
    fn empty() -> Self {
        Node { best: NONE_KEY, best_id: OrderId(0), present: 0, child: [0; FANOUT] }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: OrderId,
    attrs: [u32; DIMS],
}

#[derive(Debug, Clone, Default)]
struct Cell {
    entries: BTreeMap<Key, Entry>,
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct FilterIndex {
    bounds: [Bound; DIMS],
    /// `nodes[0]` is the root; levels 0..DIMS-1.
    nodes: Vec<Node>,
    cells: Vec<Cell>,
    len: usize,
}

impl FilterIndex {
    pub fn new(bounds: [Bound; DIMS]) -> Self {
        FilterIndex { bounds, nodes: vec![Node::empty()], cells: Vec::new(), len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path of node indices from the root to the level-3 node, creating nodes as needed,
    /// and the cell index.
    fn path_mut(&mut self, attrs: &[u32; DIMS]) -> ([usize; DIMS], usize) {
        let mut path = [0usize; DIMS];
        let mut node = 0usize;
        for d in 0..DIMS {
            path[d] = node;
            let b = bucket(attrs[d]);
            let present = self.nodes[node].present & (1 << b) != 0;
            let next = if present {
                self.nodes[node].child[b] as usize
            } else {
                let idx = if d + 1 < DIMS {
                    self.nodes.push(Node::empty());
                    self.nodes.len() - 1
                } else {
                    self.cells.push(Cell::default());
                    self.cells.len() - 1
                };
                let n = &mut self.nodes[node];
                n.present |= 1 << b;
                n.child[b] = idx as u32;
                idx
            };
            node = next;
        }
        (path, node)
    }

    fn path(&self, attrs: &[u32; DIMS]) -> Option<([usize; DIMS], usize)> {
        let mut path = [0usize; DIMS];
        let mut node = 0usize;
        for d in 0..DIMS {
            path[d] = node;
            let b = bucket(attrs[d]);
            if self.nodes[node].present & (1 << b) == 0 {
                return None;
            }
            node = self.nodes[node].child[b] as usize;
        }
        Some((path, node))
    }

    pub fn insert(&mut self, key: Key, id: OrderId, attrs: [u32; DIMS]) {
        let (path, cell) = self.path_mut(&attrs);
        let old = self.cells[cell].entries.insert(key, Entry { id, attrs });
        assert!(old.is_none(), "priority key {key:?} inserted twice");
        self.len += 1;
        for &n in &path {
            let node = &mut self.nodes[n];
            if key < node.best {
                node.best = key;
                node.best_id = id;
            }
        }
    }

    /// Removes the entry; returns whether it was there.
    pub fn remove(&mut self, key: Key, attrs: [u32; DIMS]) -> bool {
        let Some((path, cell)) = self.path(&attrs) else { return false };
        if self.cells[cell].entries.remove(&key).is_none() {
            return false;
        }
        self.len -= 1;
        // Refresh cached bests bottom-up; an ancestor whose best was not the removed key is
        // unaffected, and so are all above it.
        for d in (0..DIMS).rev() {
            let n = path[d];
            if self.nodes[n].best != key {
                break;
            }
            let (best, best_id) = self.best_of_children(n, d);
            let node = &mut self.nodes[n];
            node.best = best;
            node.best_id = best_id;
        }
        true
    }

    fn best_of_children(&self, n: usize, level: usize) -> (Key, OrderId) {
        let node = &self.nodes[n];
        let mut best = (NONE_KEY, OrderId(0));
        let mut mask = node.present;
        while mask != 0 {
            let b = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let c = self.child_best(node.child[b] as usize, level);
            if c.0 < best.0 {
                best = c;
            }
        }
        best
    }

    /// Best of the child at `idx` below a node of `level`.
    fn child_best(&self, idx: usize, level: usize) -> (Key, OrderId) {
        if level + 1 < DIMS {
            let c = &self.nodes[idx];
            (c.best, c.best_id)
        } else {
            match self.cells[idx].entries.first_key_value() {
                Some((k, e)) => (*k, e.id),
                None => (NONE_KEY, OrderId(0)),
            }
        }
    }

    /// The entry with the smallest key `<= limit` whose attributes pass `query` under the
    /// index's bounds.
    pub fn best(&self, query: [u32; DIMS], limit: Key) -> Option<(Key, OrderId)> {
        let mut free_from = [false; DIMS + 1];
        free_from[DIMS] = true;
        for d in (0..DIMS).rev() {
            free_from[d] = free_from[d + 1] && self.bounds[d].unconstrained(query[d]);
        }
        let mut search = Search { index: self, query, free_from, found: None, limit };
        search.node(0, 0, true);
        search.found
    }

    /// Every entry in priority order (for checks and snapshots; not fast).
    pub fn entries(&self) -> Vec<(Key, OrderId, [u32; DIMS])> {
        let mut out: Vec<_> = self
            .cells
            .iter()
            .flat_map(|c| c.entries.iter().map(|(k, e)| (*k, e.id, e.attrs)))
            .collect();
        out.sort_unstable_by_key(|e| e.0);
        out
    }

    /// Verifies every cached best and every entry's placement. For tests.
    pub fn check(&self) -> Result<(), String> {
        let mut count = 0;
        self.check_node(0, 0, &mut count)?;
        if count != self.len {
            return Err(format!("index holds {count} entries but counts {}", self.len));
        }
        Ok(())
    }

    fn check_node(&self, n: usize, level: usize, count: &mut usize) -> Result<Key, String> {
        let node = &self.nodes[n];
        let mut best = NONE_KEY;
        let mut mask = node.present;
        while mask != 0 {
            let b = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let idx = node.child[b] as usize;
            let k = if level + 1 < DIMS {
                self.check_node(idx, level + 1, count)?
            } else {
                for e in self.cells[idx].entries.values() {
                    *count += 1;
                    if bucket(e.attrs[level]) != b {
                        return Err(format!("entry {:?} in the wrong cell", e.id));
                    }
                }
                self.cells[idx].entries.keys().next().copied().unwrap_or(NONE_KEY)
            };
            best = best.min(k);
        }
        if best != node.best {
            return Err(format!("node {n} caches best {:?}, subtree best is {best:?}", node.best));
        }
        Ok(best)
    }
}

struct Search<'a> {
    index: &'a FilterIndex,
    query: [u32; DIMS],
    free_from: [bool; DIMS + 1],
    found: Option<(Key, OrderId)>,
    limit: Key,
}

impl Search<'_> {
    /// Whether a subtree whose best key is `key` could still improve the answer.
    fn could_win(&self, key: Key) -> bool {
        match self.found {
            Some((k, _)) => key < k,
            None => key <= self.limit,
        }
    }

    /// `passing`: every attribute fixed on the path to here passes for the whole bucket.
    fn node(&mut self, n: usize, level: usize, passing: bool) {
        let node = &self.index.nodes[n];
        if !self.could_win(node.best) {
            return;
        }
        if passing && self.free_from[level] {
            self.found = Some((node.best, node.best_id));
            return;
        }
        let bound = self.index.bounds[level];
        let q = self.query[level];
        let mut mask = node.present & bound.reachable(q);
        // Visit children best-first so that the first fit prunes the rest.
        let mut order: [(Key, u8); FANOUT] = [(NONE_KEY, 0); FANOUT];
        let mut len = 0;
        while mask != 0 {
            let b = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            let best = self.index.child_best(node.child[b] as usize, level).0;
            if self.could_win(best) {
                order[len] = (best, b as u8);
                len += 1;
            }
        }
        let order = &mut order[..len];
        order.sort_unstable_by_key(|o| o.0);
        for &(best, b) in order.iter() {
            if !self.could_win(best) {
                break;
            }
            let b = b as usize;
            let child = node.child[b] as usize;
            let child_passing = passing && bound.whole_bucket_passes(b, q);
            if level + 1 < DIMS {
                self.node(child, level + 1, child_passing);
            } else {
                self.cell(child, child_passing);
            }
        }
    }

    fn cell(&mut self, c: usize, passing: bool) {
        let upper = match self.found {
            Some((k, _)) => k,
            None => self.limit,
        };
        for (k, e) in self.index.cells[c].entries.range(..=upper) {
            if !self.could_win(*k) {
                break;
            }
            if passing || self.passes(&e.attrs) {
                self.found = Some((*k, e.id));
                return;
            }
        }
    }

    fn passes(&self, attrs: &[u32; DIMS]) -> bool {
        (0..DIMS).all(|d| self.index.bounds[d].passes(attrs[d], self.query[d]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOUNDS: [Bound; 4] = [Bound::AtLeast, Bound::AtLeast, Bound::AtLeast, Bound::AtMost];

    fn naive(
        entries: &[(Key, OrderId, [u32; 4])],
        q: [u32; 4],
        limit: Key,
    ) -> Option<(Key, OrderId)> {
        entries
            .iter()
            .filter(|(k, _, a)| *k <= limit && (0..4).all(|d| BOUNDS[d].passes(a[d], q[d])))
            .map(|(k, id, _)| (*k, *id))
            .min()
    }

    #[test]
    fn bucket_ranges_cover_u32() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!(bucket(2), 2);
        assert_eq!(bucket(3), 2);
        assert_eq!(bucket(u32::MAX), 31);
        for b in 0..FANOUT {
            let (lo, hi) = bucket_range(b);
            assert_eq!(bucket(lo), b);
            assert_eq!(bucket(hi), b);
        }
    }

    #[test]
    fn finds_cheapest_that_fits_not_cheapest_overall() {
        let mut ix = FilterIndex::new(BOUNDS);
        // cheap but small RAM
        ix.insert((10, 1), OrderId(1), [1, 512, 1000, 20]);
        // dearer, enough RAM, too slow a link
        ix.insert((20, 2), OrderId(2), [1, 8192, 1000, 400]);
        // dearest, fits
        ix.insert((30, 3), OrderId(3), [1, 8192, 1000, 20]);
        assert_eq!(ix.best([0, 4096, 0, 100], (u64::MAX, u64::MAX)), Some(((30, 3), OrderId(3))));
        assert_eq!(ix.best([0, 0, 0, u32::MAX], (u64::MAX, u64::MAX)), Some(((10, 1), OrderId(1))));
        // price limit excludes the only fit
        assert_eq!(ix.best([0, 4096, 0, 100], (29, u64::MAX)), None);
        assert!(ix.remove((30, 3), [1, 8192, 1000, 20]));
        assert!(!ix.remove((30, 3), [1, 8192, 1000, 20]));
        assert_eq!(ix.best([0, 4096, 0, 100], (u64::MAX, u64::MAX)), None);
        ix.check().unwrap();
    }

    proptest! {
        #[test]
        fn agrees_with_a_linear_scan(
            ops in prop::collection::vec((any::<bool>(), 0u64..50, prop::array::uniform4(0u32..5000)), 1..200),
            queries in prop::collection::vec((prop::array::uniform4(0u32..6000), 0u64..60), 1..30),
        ) {
            let mut ix = FilterIndex::new(BOUNDS);
            let mut live: Vec<(Key, OrderId, [u32; 4])> = Vec::new();
            for (seq, (insert, price, attrs)) in ops.into_iter().enumerate() {
                if insert || live.is_empty() {
                    let key = (price, seq as u64);
                    ix.insert(key, OrderId(seq as u64), attrs);
                    live.push((key, OrderId(seq as u64), attrs));
                } else {
                    let victim = live.remove(price as usize % live.len());
                    prop_assert!(ix.remove(victim.0, victim.2));
                }
                ix.check().map_err(TestCaseError::fail)?;
            }
            for (mut q, limit) in queries {
                if q[3] > 5500 { q[3] = u32::MAX; }
                let limit = (limit, u64::MAX);
                prop_assert_eq!(ix.best(q, limit), naive(&live, q, limit));
            }
        }
    }
}
