//! A priority index over orders with five attributes, answering "the
//! best-priority entry whose attributes pass these thresholds".
//!
//! Why not a plain price-ordered list: a buyer who wants 16 GiB per CPU and a
//! 20 ms latency would walk past every cheap small slot before finding one
//! that fits, and on a book of 100,000 slots that walk is the whole book.
//!
//! The index is a shallow tree over the first [`TREE`] attributes (for the
//! book: RAM, score, sandbox kinds). Level `d` splits on attribute `d`: numbers
//! by a log-linear bucket (four buckets per power of two), small bit sets (the
//! kinds) by their exact value. The leaves are cells holding entries in
//! priority order; the remaining attributes (latency, inbound UDP) are checked
//! while scanning, since they do not follow price.
//!
//! Every node caches each child's best key. A query visits children
//! best-first and stops as soon as a subtree cannot beat what it already found;
//! a subtree whose every bucket passes every threshold is answered by its cached
//! best without descending (a bit set that every entry in the index shares a bit
//! with counts as no threshold). Cells are scanned only where a threshold falls
//! inside their bucket or a scanned attribute is constrained, and only while
//! they can still win.
//!
//! Which attributes are tree levels was measured (BENCHMARKS.md): prices follow
//! score and RAM, so a bucket on a score or RAM threshold begins with exactly
//! the entries that fail it, and those two must be split finely; latency and
//! UDP do not follow price, so a scan finds a passing entry within a few steps.
//! Deeper trees, or extra flat lists per score bucket, cost more in upkeep and
//! node visits than they saved in scanning.

use arrayvec::ArrayVec;

use crate::OrderId;

/// Priority key: smaller is better. Asks use (price, seq), bids (MAX - price, seq),
/// packed by [`key`] so that comparing two keys is one wide comparison; `seq` is
/// unique, so keys never tie. `u128::MAX` is reserved: it marks "empty".
pub type Key = u128;

/// The key ordering by `primary`, then by `seq`.
pub const fn key(primary: u64, seq: u64) -> Key {
    (primary as u128) << 64 | seq as u128
}

const NONE_KEY: Key = Key::MAX;
/// Buckets split each binary order of magnitude in 2^SUB_BITS (log-linear, as in HDR
/// histograms), so a threshold's boundary bucket holds few entries that fail it.
/// (Three bits measured slower: the extra children cost more than the shorter scans save.)
const SUB_BITS: u32 = 2;
const FANOUT: usize = 128;
pub const DIMS: usize = 5;
/// Attributes the tree splits on; the rest are checked while scanning.
pub const TREE: usize = 3;

/// How an entry's attribute must relate to the query's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bound {
    /// entry >= query; a query of 0 constrains nothing.
    AtLeast,
    /// entry <= query; a query of `u32::MAX` constrains nothing.
    AtMost,
    /// entry & query != 0, for small bit sets (values below 128).
    Intersects,
}

impl Bound {
    #[cfg(test)]
    fn passes(self, entry: u32, query: u32) -> bool {
        match self {
            Bound::AtLeast => entry >= query,
            Bound::AtMost => entry <= query,
            Bound::Intersects => entry & query != 0,
        }
    }

    fn bucket(self, v: u32) -> usize {
        match self {
            Bound::Intersects => {
                assert!((v as usize) < FANOUT, "bit set {v:#x} too wide for the index");
                v as usize
            }
            _ => bucket(v),
        }
    }

    /// The buckets that may hold a passing entry.
    fn reach(self, query: u32) -> Reach {
        let b = bucket(query) as u8;
        let all = Reach { lo: 0, hi: u8::MAX, free: u8::MAX, bits: u8::MAX };
        match self {
            // hi(bucket) >= query  <=>  bucket >= bucket(query)
            Bound::AtLeast => Reach { lo: b, ..all },
            // lo(bucket) <= query  <=>  bucket <= bucket(query)
            Bound::AtMost => Reach { hi: b, ..all },
            // A bit set's bucket is its value (below 128: higher query bits reach none).
            Bound::Intersects => Reach { free: 0, bits: (query & (FANOUT as u32 - 1)) as u8, ..all },
        }
    }
}

/// Which children of a tree level a query reaches: a range of buckets for a
/// number, the sets that share a bit with its own for a bit set, both tested in
/// one go without a branch (a bucket passes when in `lo..=hi` and when
/// `(bucket | free) & bits != 0`; numbers have `free` and `bits` all ones).
#[derive(Debug, Clone, Copy)]
struct Reach {
    lo: u8,
    hi: u8,
    free: u8,
    bits: u8,
}

impl Reach {
    #[inline]
    fn reaches(self, bucket: u8) -> bool {
        (self.lo <= bucket) & (bucket <= self.hi) & ((bucket | self.free) & self.bits != 0)
    }
}

/// Log-linear bucket: small values exactly, then 2^SUB_BITS buckets per power of
/// two; values too large for the fan-out share the last bucket.
fn bucket(v: u32) -> usize {
    let exact = 1u32 << SUB_BITS;
    if v < exact {
        return v as usize;
    }
    let len = 32 - v.leading_zeros();
    let shift = len - 1 - SUB_BITS;
    ((((len - SUB_BITS) << SUB_BITS) + ((v >> shift) & (exact - 1))) as usize).min(FANOUT - 1)
}

/// The values a bucket holds (for tests: buckets must tile the numbers).
#[cfg(test)]
fn bucket_range(b: usize) -> (u32, u32) {
    let exact = 1usize << SUB_BITS;
    if b < exact {
        return (b as u32, b as u32);
    }
    let len = (b >> SUB_BITS) as u32 + SUB_BITS;
    let shift = len - 1 - SUB_BITS;
    let lo = (1u32 << (len - 1)) | (((b & (exact - 1)) as u32) << shift);
    let hi = if b == FANOUT - 1 { u32::MAX } else { lo + ((1u32 << shift) - 1) };
    (lo, hi)
}

/// An entry with its key: what a subtree caches of its best.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Best {
    key: Key,
    entry: Entry,
}

const NONE: Best = Best { key: NONE_KEY, entry: Entry { id: OrderId(0), attrs: [0; DIMS] } };

impl Best {
    fn found(&self) -> (Key, OrderId) {
        (self.key, self.entry.id)
    }
}

/// A child of a node, with its subtree's best entry inline (key and attributes),
/// so that scanning a node's children reads one contiguous array, and a search
/// takes a subtree's best without descending whenever that entry passes.
#[derive(Debug, Clone, Copy)]
struct Child {
    best: Best,
    bucket: u8,
    /// A node index, or a cell index below the last tree level.
    index: u32,
}

/// Children stay where they were added (a bucket finds its child through `slot`),
/// and `order` lists them by their subtree's best key, kept sorted as bests
/// change. So a search visits children best first and stops at the first that
/// cannot win, without gathering and sorting them, and a node's best is its
/// first child's (removing a best no longer compares every child).
#[derive(Debug, Clone)]
struct Node {
    /// Per bucket, the position of its child in `children` (`ABSENT` if none).
    slot: [u8; FANOUT],
    children: Vec<Child>,
    /// The children, best key first: each child's key, bucket and position in
    /// `children`, so that a search passes over a child it cannot reach (or that
    /// cannot win) reading this array alone, in order.
    order: Vec<Ordered>,
}

#[derive(Debug, Clone, Copy)]
struct Ordered {
    key: Key,
    pos: u8,
    bucket: u8,
}

const ABSENT: u8 = u8::MAX;

impl Default for Node {
    fn default() -> Self {
        Node { slot: [ABSENT; FANOUT], children: Vec::new(), order: Vec::new() }
    }
}

impl Node {
    fn position(&self, bucket: usize) -> Option<usize> {
        let pos = self.slot[bucket];
        (pos != ABSENT).then_some(pos as usize)
    }

    /// The subtree's best entry.
    fn best(&self) -> Best {
        match self.order.first() {
            Some(o) => self.children[o.pos as usize].best,
            None => NONE,
        }
    }

    /// Sets the best of the child at `pos` and moves it to its place in `order`.
    fn set_best(&mut self, pos: usize, best: Best) {
        let old = self.children[pos].best.key;
        self.children[pos].best = best;
        let key = best.key;
        let mut at = self.order.iter().position(|o| o.pos as usize == pos).expect("every child is in the order");
        self.order[at].key = key;
        if key < old {
            while at > 0 && self.order[at - 1].key > key {
                self.order.swap(at - 1, at);
                at -= 1;
            }
        } else {
            while at + 1 < self.order.len() && self.order[at + 1].key < key {
                self.order.swap(at, at + 1);
                at += 1;
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    id: OrderId,
    attrs: [u32; DIMS],
}

/// Entries in priority order, grouped by the primary part of their keys (the
/// price): levels in key order, each a queue in `seq` order.
///
/// Why not one ordered map: an order enters the book with a fresh `seq`, so an
/// insert is a push at the back of its price level, and a trade usually takes the
/// best, the front of the first level; a queue does both without searching or
/// shifting, and a scan reads the entries of a level contiguously. (A B-tree of
/// keys and entries was a quarter of the book's upkeep and most of its cache misses.)
#[derive(Debug, Clone, Default)]
struct Cell {
    /// Each level's primary, in order: what finding a level reads, packed so that
    /// a binary search over a cell's levels (eight on average) touches one cache
    /// line, not one per step (the levels themselves are some sixty bytes each).
    primaries: Vec<u64>,
    levels: Vec<Level>,
}

#[derive(Debug, Clone)]
struct Level {
    /// The seqs at the front and at the back of the queue, kept here so that the
    /// usual insert (a fresh seq) is placed without reading the queue's far end
    /// from memory, and an entry in the middle is found by interpolation.
    first: u64,
    last: u64,
    /// In `seq` order (seqs are unique). An entry taken from the middle is marked
    /// dead where it stands instead of closing the gap: a level holds some seventy
    /// entries on average (a 100,000-slot book), and shifting half of them took a
    /// slot's withdrawal some fifteen trips to memory. The front and the back are
    /// always live; dead entries are dropped when they reach either end, and all at
    /// once when they outnumber the live ones.
    queue: std::collections::VecDeque<Queued>,
    dead: u32,
}

#[derive(Debug, Clone, Copy)]
struct Queued {
    seq: u64,
    entry: Entry,
}

/// Entries either side of an interpolated guess whose lines are fetched together.
const WINDOW: usize = 4;

/// Marks a dead entry (ids are issued from 1 up and never reach it).
const DEAD: OrderId = OrderId(u64::MAX);

impl Queued {
    fn is_live(&self) -> bool {
        self.entry.id != DEAD
    }
}

fn split(key: Key) -> (u64, u64) {
    ((key >> 64) as u64, key as u64)
}

impl Level {
    /// Where `seq` is or would go (dead entries keep their place in the order).
    ///
    /// A level's seqs were issued at random times in between its first and its last,
    /// so where `seq` falls in that span is where it stands in the queue give or take
    /// a few: the search starts there and widens (a slot withdrawn from the middle of
    /// a level of seventy entries took a binary search's six trips to memory).
    fn position(&self, seq: u64) -> Result<usize, usize> {
        let n = self.queue.len();
        if n == 0 || seq > self.last {
            // The usual insert: a fresh seq, after every other.
            return Err(n);
        }
        if seq <= self.first {
            // The usual removal: a trade of the level's oldest.
            return if seq == self.first { Ok(0) } else { Err(0) };
        }
        let at = |i: usize| self.queue[i].seq;
        let guess = ((seq - self.first) as u128 * (n - 1) as u128 / (self.last - self.first) as u128) as usize;
        // The search below reads entries near the guess one after the other, each
        // likely a trip to memory: ask for the lines around it all at once first.
        for i in guess.saturating_sub(WINDOW)..(guess + WINDOW + 1).min(n) {
            crate::records::prefetch(&self.queue[i]);
        }
        // Bracket `seq` between `lo` (its seq below) and `hi` (at or above), widening
        // from the guess by doubling steps, then halve the bracket.
        let (mut lo, mut hi) = if at(guess) < seq {
            let (mut lo, mut step) = (guess, 1);
            while lo + step < n && at(lo + step) < seq {
                lo += step;
                step *= 2;
            }
            (lo, (lo + step).min(n - 1))
        } else {
            let (mut hi, mut step) = (guess, 1);
            while hi >= step && at(hi - step) >= seq {
                hi -= step;
                step *= 2;
            }
            (hi.saturating_sub(step), hi)
        };
        // Now at(lo) < seq <= at(hi) (at(0) < seq <= at(n - 1) holds from the checks above).
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            if at(mid) < seq {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        if at(hi) == seq {
            Ok(hi)
        } else {
            Err(hi)
        }
    }

    fn live(&self) -> usize {
        self.queue.len() - self.dead as usize
    }

    /// Drops dead entries from both ends (so that both are live again), and all of
    /// them once they outnumber the live ones.
    fn tidy(&mut self) {
        while self.queue.front().is_some_and(|q| !q.is_live()) {
            self.queue.pop_front();
            self.dead -= 1;
            if let Some(front) = self.queue.front() {
                self.first = front.seq;
            }
        }
        while self.queue.back().is_some_and(|q| !q.is_live()) {
            self.queue.pop_back();
            self.dead -= 1;
        }
        if self.dead > 8 && self.dead as usize > self.live() {
            self.queue.retain(|q| q.is_live());
            self.dead = 0;
        }
        if let Some(back) = self.queue.back() {
            self.last = back.seq;
        }
    }
}

impl Cell {
    fn level(&self, primary: u64) -> Result<usize, usize> {
        self.primaries.binary_search(&primary)
    }

    fn insert(&mut self, key: Key, entry: Entry) -> bool {
        let (primary, seq) = split(key);
        let level = match self.level(primary) {
            Ok(i) => &mut self.levels[i],
            Err(i) => {
                self.primaries.insert(i, primary);
                self.levels.insert(i, Level { first: seq, last: seq, queue: Default::default(), dead: 0 });
                &mut self.levels[i]
            }
        };
        match level.position(seq) {
            Ok(at) if level.queue[at].is_live() => false,
            Ok(at) => {
                // The same key again, where it had been taken out.
                level.queue[at].entry = entry;
                level.dead -= 1;
                true
            }
            Err(at) => {
                if at == level.queue.len() {
                    level.last = seq;
                }
                if at == 0 {
                    level.first = seq;
                }
                level.queue.insert(at, Queued { seq, entry });
                true
            }
        }
    }

    fn remove(&mut self, key: Key) -> bool {
        let (primary, seq) = split(key);
        let Ok(i) = self.level(primary) else { return false };
        let level = &mut self.levels[i];
        let Ok(at) = level.position(seq) else { return false };
        if !level.queue[at].is_live() {
            return false;
        }
        level.queue[at].entry.id = DEAD;
        level.dead += 1;
        level.tidy();
        if level.queue.is_empty() {
            self.primaries.remove(i);
            self.levels.remove(i);
        }
        true
    }

    fn best(&self) -> Best {
        match self.primaries.first().zip(self.levels.first().and_then(|l| l.queue.front())) {
            Some((&primary, q)) => Best { key: key(primary, q.seq), entry: q.entry },
            None => NONE,
        }
    }

    fn iter(&self) -> impl Iterator<Item = (Key, &Entry)> {
        self.primaries
            .iter()
            .zip(&self.levels)
            .flat_map(|(&p, l)| l.queue.iter().filter(|q| q.is_live()).map(move |q| (key(p, q.seq), &q.entry)))
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct FilterIndex {
    bounds: [Bound; DIMS],
    /// `nodes[0]` is the root; levels 0..TREE-1.
    nodes: Vec<Node>,
    root_best: Best,
    cells: Vec<Cell>,
    len: usize,
}

/// The most entries one [`FilterIndex::best_n`] returns.
pub const MAX_N: usize = 8;

/// Entries found by a search, best first.
pub type Found = ArrayVec<(Key, OrderId), MAX_N>;

impl FilterIndex {
    pub fn new(bounds: [Bound; DIMS]) -> Self {
        assert!(bounds[TREE..].iter().all(|b| *b != Bound::Intersects), "bit sets must be tree levels");
        assert!(bounds.iter().filter(|b| **b == Bound::Intersects).count() <= 1, "at most one bit set");
        FilterIndex {
            bounds,
            nodes: vec![Node::default()],
            root_best: NONE,
            cells: Vec::new(),
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn insert(&mut self, key: Key, id: OrderId, attrs: [u32; DIMS]) {
        assert!(key != NONE_KEY, "the key {key:?} is reserved");
        let entry = Entry { id, attrs };
        let best = Best { key, entry };
        if key < self.root_best.key {
            self.root_best = best;
        }
        let mut node = 0usize;
        for (d, &attr) in attrs[..TREE].iter().enumerate() {
            let b = self.bounds[d].bucket(attr);
            let pos = match self.nodes[node].position(b) {
                Some(pos) => pos,
                None => {
                    let index = if d + 1 < TREE {
                        self.nodes.push(Node::default());
                        self.nodes.len() - 1
                    } else {
                        self.cells.push(Cell::default());
                        self.cells.len() - 1
                    };
                    let n = &mut self.nodes[node];
                    let pos = n.children.len();
                    n.slot[b] = pos as u8;
                    n.children.push(Child { best: NONE, bucket: b as u8, index: index as u32 });
                    n.order.push(Ordered { key: NONE_KEY, pos: pos as u8, bucket: b as u8 });
                    pos
                }
            };
            let n = &mut self.nodes[node];
            if key < n.children[pos].best.key {
                n.set_best(pos, best);
            }
            node = n.children[pos].index as usize;
        }
        let fresh = self.cells[node].insert(key, entry);
        assert!(fresh, "priority key {key:?} inserted twice");
        self.len += 1;
    }

    /// Removes the entry; returns whether it was there.
    pub fn remove(&mut self, key: Key, attrs: [u32; DIMS]) -> bool {
        // (node, position of the child on the path) per level
        let mut path = [(0usize, 0usize); TREE];
        let mut node = 0usize;
        for d in 0..TREE {
            let Some(pos) = self.nodes[node].position(self.bounds[d].bucket(attrs[d])) else { return false };
            path[d] = (node, pos);
            node = self.nodes[node].children[pos].index as usize;
        }
        let cell = node;
        if !self.cells[cell].remove(key) {
            return false;
        }
        self.len -= 1;
        // Refresh cached bests bottom-up. A subtree whose best was not the removed key
        // keeps its best, and so do all above it.
        for d in (0..TREE).rev() {
            let (n, pos) = path[d];
            let child = self.nodes[n].children[pos];
            if child.best.key != key {
                return true;
            }
            let best = if d + 1 < TREE { self.nodes[child.index as usize].best() } else { self.cells[cell].best() };
            self.nodes[n].set_best(pos, best);
        }
        if self.root_best.key == key {
            self.root_best = self.nodes[0].best();
        }
        true
    }

    /// The entry with the smallest key `<= limit` whose attributes pass `query` under the
    /// index's bounds.
    pub fn best(&self, query: [u32; DIMS], limit: Key) -> Option<(Key, OrderId)> {
        self.best_n(query, limit, 1).first().copied()
    }

    /// The `n` (at most [`MAX_N`]) entries with the smallest keys `<= limit` whose
    /// attributes pass `query`, best first: what `n` calls of [`best`](Self::best) would
    /// give, each after removing the last one found, in one walk (an order for
    /// several CPUs is filled from one search instead of one per CPU).
    pub fn best_n(&self, query: [u32; DIMS], limit: Key, n: usize) -> Found {
        assert!((1..=MAX_N).contains(&n), "between 1 and {MAX_N} entries at a time, not {n}");
        if self.is_empty() || self.root_best.key > limit {
            // Nothing in the index is within the limit (often: the book is empty; the
            // check on emptiness is for a limit of `Key::MAX`, the empty key itself).
            return Found::new();
        }
        let reach = std::array::from_fn(|d| self.bounds[d].reach(query[d]));
        // Numbers pass within a range; a bit set (always a tree level) by sharing a bit.
        let mut lo = [0; DIMS];
        let mut hi = [u32::MAX; DIMS];
        // With no bit set, a set test that always passes.
        let mut set = SetTest { dim: 0, free: u32::MAX, bits: u32::MAX };
        for d in 0..DIMS {
            match self.bounds[d] {
                Bound::AtLeast => lo[d] = query[d],
                Bound::AtMost => hi[d] = query[d],
                Bound::Intersects => set = SetTest { dim: d, free: 0, bits: query[d] },
            }
        }
        let mut search = Search {
            index: self,
            reach,
            set,
            lo,
            hi,
            want: n,
            found: Found::new(),
            bound: limit.saturating_add(1),
        };
        if search.passes_all(&self.root_best.entry.attrs) {
            // Nothing beats the index's best, and it passes.
            search.take(self.root_best.found());
            if search.single() {
                return search.found;
            }
        }
        search.node(0, 0);
        search.found
    }

    /// Every entry in priority order (for checks and snapshots; not fast).
    pub fn entries(&self) -> Vec<(Key, OrderId, [u32; DIMS])> {
        let mut out: Vec<_> =
            self.cells.iter().flat_map(|c| c.iter().map(|(k, e)| (k, e.id, e.attrs))).collect();
        out.sort_unstable_by_key(|e| e.0);
        out
    }

    /// Verifies every cached best and every entry's placement. For tests.
    pub fn check(&self) -> Result<(), String> {
        let mut entries = Vec::new();
        let best = self.check_node(0, 0, &mut entries)?;
        if best != self.root_best {
            return Err(format!("root caches best {:?}, the index's best is {best:?}", self.root_best));
        }
        if entries.len() != self.len {
            return Err(format!("index holds {} entries but counts {}", entries.len(), self.len));
        }
        Ok(())
    }

    /// Checks the subtree of node `n` at `level`, collecting its entries; returns its best key.
    fn check_node(&self, n: usize, level: usize, entries: &mut Vec<Entry>) -> Result<Best, String> {
        let node = &self.nodes[n];
        let mut best = NONE;
        if node.slot.iter().filter(|&&p| p != ABSENT).count() != node.children.len() {
            return Err(format!("node {n} has {} children but {} buckets", node.children.len(), node.slot.iter().filter(|&&p| p != ABSENT).count()));
        }
        let mut sorted: Vec<u8> = node.order.iter().map(|o| o.pos).collect();
        sorted.sort_unstable();
        if sorted != (0..node.children.len() as u8).collect::<Vec<_>>() {
            return Err(format!("node {n}'s order is not its children"));
        }
        if node.order.windows(2).any(|w| w[0].key > w[1].key) {
            return Err(format!("node {n}'s children are out of order"));
        }
        if node.order.iter().any(|o| o.key != node.children[o.pos as usize].best.key || o.bucket != node.children[o.pos as usize].bucket) {
            return Err(format!("node {n}'s order holds stale keys or buckets"));
        }
        for (pos, child) in node.children.iter().enumerate() {
            if node.position(child.bucket as usize) != Some(pos) {
                return Err(format!("node {n}: bucket {} out of place", child.bucket));
            }
            let start = entries.len();
            let k = if level + 1 < TREE {
                self.check_node(child.index as usize, level + 1, entries)?
            } else {
                let cell = &self.cells[child.index as usize];
                entries.extend(cell.iter().map(|(_, e)| *e));
                cell.best()
            };
            if entries[start..].iter().any(|e| self.bounds[level].bucket(e.attrs[level]) != child.bucket as usize) {
                return Err(format!("node {n}: an entry under bucket {} belongs elsewhere", child.bucket));
            }
            if k != child.best {
                return Err(format!("node {n} caches best {:?} for bucket {}, its subtree's is {k:?}", child.best, child.bucket));
            }
            if k.key < best.key {
                best = k;
            }
        }
        Ok(best)
    }
}

/// An entry's bit set at `dim` passes when `(set | free) & bits != 0`: `free` is 0
/// and `bits` the query's, or both all ones where the index has no bit set (one
/// test without a branch either way).
#[derive(Debug, Clone, Copy)]
struct SetTest {
    dim: usize,
    free: u32,
    bits: u32,
}

struct Search<'a> {
    index: &'a FilterIndex,
    /// Per tree level, the buckets that may hold a passing entry.
    reach: [Reach; TREE],
    /// The bit set's test (an index has at most one).
    set: SetTest,
    /// Per attribute, the range of values that pass (all of them for a bit set).
    lo: [u32; DIMS],
    hi: [u32; DIMS],
    /// How many entries are wanted (see `single`).
    want: usize,
    found: Found,
    /// Keys below this can still win: one past the limit, then (once `want` are found)
    /// the worst of those. (The reserved empty key never gets under it.)
    bound: Key,
}

impl Search<'_> {
    /// Whether just one entry is wanted: then a subtree whose best entry passes is
    /// answered by it (with more, it is walked for its next ones too).
    fn single(&self) -> bool {
        self.want == 1
    }

    /// Whether a subtree whose best key is `key` could still improve the answer.
    fn could_win(&self, key: Key) -> bool {
        key < self.bound
    }

    /// Keeps `found` (which beats `bound`) among the best `want`.
    fn take(&mut self, found: (Key, OrderId)) {
        if self.single() {
            // Most searches: the one entry found so far is simply replaced.
            self.found.clear();
            self.found.push(found);
            self.bound = found.0;
            return;
        }
        let at = self.found.partition_point(|f| f.0 < found.0);
        if self.found.get(at).is_some_and(|f| f.0 == found.0) {
            // Already taken as a subtree's cached best (keys are unique).
            return;
        }
        if self.found.len() == self.want {
            self.found.pop();
        }
        self.found.insert(at, found);
        if self.found.len() == self.want {
            self.bound = self.found[self.want - 1].0;
        }
    }

    /// Searches the subtree of node `n` (on tree level `level`), whose best entry
    /// the caller has tested already (it can win, and it fails, or it is taken).
    fn node(&mut self, n: usize, level: usize) {
        let node = &self.index.nodes[n];
        // Children best first. Those whose best entries pass give answers before any
        // walk, so that the bound they set prunes the walks of the others; with one
        // wanted, the first such child settles every child after it, and only the
        // children before it (set aside on the way) remain to be walked.
        let reach = self.reach[level];
        if self.single() {
            let mut before: ArrayVec<u8, FANOUT> = ArrayVec::new();
            for o in &node.order {
                if !self.could_win(o.key) {
                    break;
                }
                if !reach.reaches(o.bucket) {
                    continue;
                }
                let c = &node.children[o.pos as usize];
                if self.passes_all(&c.best.entry.attrs) {
                    self.take(c.best.found());
                    break;
                }
                before.push(o.pos);
            }
            // Then the children set aside are walked, best first, while they can still win.
            for &pos in &before {
                if !self.child(level, &node.children[pos as usize]) {
                    break;
                }
            }
        } else {
            // With several wanted, every reachable child that can still win is walked:
            // one whose best passed may hold the next ones.
            for o in &node.order {
                if !self.could_win(o.key) {
                    break;
                }
                let c = &node.children[o.pos as usize];
                if reach.reaches(o.bucket) && self.passes_all(&c.best.entry.attrs) {
                    self.take(c.best.found());
                }
            }
            for o in &node.order {
                if reach.reaches(o.bucket) && !self.child(level, &node.children[o.pos as usize]) {
                    break;
                }
            }
        }
    }

    /// Walks a child of a node on tree level `level`, if it can still win (returns
    /// whether it could: children come best first, so none after it can either).
    fn child(&mut self, level: usize, c: &Child) -> bool {
        if !self.could_win(c.best.key) {
            return false;
        }
        if level + 1 < TREE {
            self.node(c.index as usize, level + 1);
        } else {
            self.scan(&self.index.cells[c.index as usize]);
        }
        true
    }

    /// Takes the entries of a cell, in priority order, that pass while they still win.
    /// (The tree levels above have decided its bit sets.)
    fn scan(&mut self, cell: &Cell) {
        for (&primary, level) in cell.primaries.iter().zip(&cell.levels) {
            let (front, back) = level.queue.as_slices();
            if self.scan_run(primary, front) || self.scan_run(primary, back) {
                return;
            }
        }
    }

    /// Scans a run of one level's queue; returns whether the scan is over (an entry
    /// that cannot win, or the one wanted found).
    fn scan_run(&mut self, primary: u64, run: &[Queued]) -> bool {
        for q in run {
            let k = key(primary, q.seq);
            if !self.could_win(k) {
                return true;
            }
            if q.is_live() && self.passes(&q.entry.attrs) {
                self.take((k, q.entry.id));
                if self.single() {
                    return true;
                }
            }
        }
        false
    }

    /// Whether the numbers of `attrs` pass.
    fn passes(&self, attrs: &[u32; DIMS]) -> bool {
        (0..DIMS).fold(true, |ok, d| ok & (self.lo[d] <= attrs[d]) & (attrs[d] <= self.hi[d]))
    }

    /// Whether all of `attrs` pass, bit sets too.
    fn passes_all(&self, attrs: &[u32; DIMS]) -> bool {
        self.passes(attrs) & ((attrs[self.set.dim] | self.set.free) & self.set.bits != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const BOUNDS: [Bound; DIMS] = [Bound::Intersects, Bound::AtLeast, Bound::AtLeast, Bound::AtLeast, Bound::AtMost];

    /// An attribute or a query value: often 0 (no RAM or score asked, say) or small, so
    /// that entries and queries meet at the edges of buckets.
    fn attribute() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0u32), 0u32..8, 0u32..6000]
    }

    fn naive(entries: &[(Key, OrderId, [u32; DIMS])], q: [u32; DIMS], limit: Key) -> Option<(Key, OrderId)> {
        entries
            .iter()
            .filter(|(k, _, a)| *k <= limit && (0..DIMS).all(|d| BOUNDS[d].passes(a[d], q[d])))
            .map(|(k, id, _)| (*k, *id))
            .min()
    }

    #[test]
    fn bucket_ranges_cover_u32() {
        for v in 0..(1 << SUB_BITS) {
            assert_eq!(bucket(v), v as usize, "small values are exact");
        }
        assert!(bucket(u32::MAX) < FANOUT);
        let mut next = 0u64;
        for b in 0..=bucket(u32::MAX) {
            let (lo, hi) = bucket_range(b);
            assert_eq!(lo as u64, next, "buckets must tile the u32 range");
            next = hi as u64 + 1;
            let (lo, hi) = bucket_range(b);
            assert_eq!(bucket(lo), b);
            assert_eq!(bucket(hi), b);
        }
        assert_eq!(next, 1 << 32);
    }

    #[test]
    fn an_empty_index_finds_nothing_whatever_the_limit() {
        // No bit set, and a query that asks nothing: every entry passes, and the
        // limit is the largest key (the one that marks "empty").
        let mut ix = FilterIndex::new([Bound::AtLeast, Bound::AtLeast, Bound::AtLeast, Bound::AtLeast, Bound::AtMost]);
        let anything = [0, 0, 0, 0, u32::MAX];
        assert_eq!(ix.best(anything, Key::MAX), None);
        ix.insert(key(10, 1), OrderId(1), [1, 1, 512, 1000, 20]);
        assert_eq!(ix.best(anything, Key::MAX), Some((key(10, 1), OrderId(1))));
        assert!(ix.remove(key(10, 1), [1, 1, 512, 1000, 20]));
        assert_eq!(ix.best_n(anything, Key::MAX, 3).to_vec(), vec![]);
    }

    #[test]
    fn finds_cheapest_that_fits_not_cheapest_overall() {
        let mut ix = FilterIndex::new(BOUNDS);
        // cheap but small RAM
        ix.insert(key(10, 1), OrderId(1), [0b11, 1, 512, 1000, 20]);
        // dearer, enough RAM, too slow a link
        ix.insert(key(20, 2), OrderId(2), [0b11, 1, 8192, 1000, 400]);
        // dearest, fits
        ix.insert(key(30, 3), OrderId(3), [0b01, 1, 8192, 1000, 20]);
        let all = key(u64::MAX, u64::MAX - 1);
        assert_eq!(ix.best([0b01, 0, 4096, 0, 100], all), Some((key(30, 3), OrderId(3))));
        assert_eq!(ix.best([0b01, 0, 0, 0, u32::MAX], all), Some((key(10, 1), OrderId(1))));
        // the other kind: only the first two offer it
        assert_eq!(ix.best([0b10, 0, 4096, 0, u32::MAX], all), Some((key(20, 2), OrderId(2))));
        assert_eq!(ix.best([0b100, 0, 0, 0, u32::MAX], all), None);
        // price limit excludes the only fit
        assert_eq!(ix.best([0b01, 0, 4096, 0, 100], key(29, u64::MAX)), None);
        assert!(ix.remove(key(30, 3), [0b01, 1, 8192, 1000, 20]));
        assert!(!ix.remove(key(30, 3), [0b01, 1, 8192, 1000, 20]));
        assert_eq!(ix.best([0b01, 0, 4096, 0, 100], all), None);
        ix.check().unwrap();
    }

    #[test]
    fn a_subtree_s_best_is_taken_only_if_it_passes_every_attribute() {
        let mut ix = FilterIndex::new(BOUNDS);
        let all = key(u64::MAX, u64::MAX - 1);
        ix.insert(key(5, 1), OrderId(1), [0b011, 1, 512, 1000, 20]);
        ix.insert(key(9, 2), OrderId(2), [0b111, 1, 512, 1000, 20]);
        // The root's best (order 1) does not offer the kind: the search goes past it.
        assert_eq!(ix.best([0b100, 0, 0, 0, u32::MAX], all), Some((key(9, 2), OrderId(2))));
        assert_eq!(ix.best([0b001, 0, 0, 0, u32::MAX], all), Some((key(5, 1), OrderId(1))));
        assert!(ix.remove(key(5, 1), [0b011, 1, 512, 1000, 20]));
        assert_eq!(ix.best([0b100, 0, 0, 0, u32::MAX], all), Some((key(9, 2), OrderId(2))));
        // A cheaper entry that does not offer the kind must not be taken for it.
        ix.insert(key(1, 3), OrderId(3), [0b010, 1, 512, 1000, 20]);
        assert_eq!(ix.best([0b100, 0, 0, 0, u32::MAX], all), Some((key(9, 2), OrderId(2))));
        assert_eq!(ix.best([0b010, 0, 0, 0, u32::MAX], all), Some((key(1, 3), OrderId(3))));
        // Nor one that fails a scanned attribute (latency) or a number of the tree (RAM).
        ix.insert(key(0, 4), OrderId(4), [0b111, 1, 512, 1000, 400]);
        ix.insert(key(0, 5), OrderId(5), [0b111, 1, 256, 1000, 20]);
        assert_eq!(ix.best([0b100, 0, 512, 0, 100], all), Some((key(9, 2), OrderId(2))));
        assert_eq!(ix.best_n([0b100, 0, 0, 0, 100], all, 3).to_vec(), vec![(key(0, 5), OrderId(5)), (key(9, 2), OrderId(2))]);
    }

    proptest! {
        /// Finding a seq by interpolation agrees with a binary search, however the seqs
        /// are spread (clumped, sparse, with dead entries among them).
        #[test]
        fn a_level_finds_a_seq_where_a_binary_search_would(
            mut seqs in prop::collection::btree_set(0u64..1_000_000, 1..600),
            dead in prop::collection::vec(any::<bool>(), 600),
            clumped in any::<bool>(),
            probes in prop::collection::vec(0u64..1_000_100, 1..50),
        ) {
            if clumped {
                // Most seqs in a narrow band, a few far off: a poor guess for interpolation.
                seqs = seqs.into_iter().map(|s| if s % 7 == 0 { s } else { 500_000 + s % 1000 }).collect();
            }
            let queue: std::collections::VecDeque<Queued> = seqs
                .iter()
                .zip(&dead)
                .enumerate()
                .map(|(i, (&seq, &d))| {
                    let live = i == 0 || i == seqs.len() - 1 || !d;
                    Queued { seq, entry: Entry { id: if live { OrderId(seq + 1) } else { DEAD }, attrs: [0; DIMS] } }
                })
                .collect();
            let level = Level {
                first: queue.front().unwrap().seq,
                last: queue.back().unwrap().seq,
                dead: queue.iter().filter(|q| !q.is_live()).count() as u32,
                queue,
            };
            for probe in probes.into_iter().chain(seqs.iter().copied()) {
                prop_assert_eq!(level.position(probe), level.queue.binary_search_by_key(&probe, |q| q.seq), "seq {}", probe);
            }
        }
    }

    proptest! {
        /// A cell is an ordered map from key to entry, whatever order keys arrive in
        /// (a restored snapshot inserts in no particular order), with duplicates refused.
        #[test]
        fn a_cell_keeps_keys_in_order(ops in prop::collection::vec((any::<bool>(), 0u64..6, 0u64..40), 1..300)) {
            let mut cell = Cell::default();
            let mut model = std::collections::BTreeMap::new();
            for (insert, price, seq) in ops {
                let k = key(price, seq);
                let e = Entry { id: OrderId(seq), attrs: [price as u32; DIMS] };
                if insert {
                    prop_assert_eq!(cell.insert(k, e), model.insert(k, e).is_none());
                } else {
                    prop_assert_eq!(cell.remove(k), model.remove(&k).is_some());
                }
                let got: Vec<_> = cell.iter().map(|(k, e)| (k, *e)).collect();
                let want: Vec<_> = model.iter().map(|(k, e)| (*k, *e)).collect();
                prop_assert_eq!(got, want);
                prop_assert_eq!(cell.best(), model.iter().next().map_or(NONE, |(k, e)| Best { key: *k, entry: *e }));
                prop_assert!(cell.levels.iter().all(|l| l.live() > 0), "an empty level was kept");
                prop_assert!(cell.primaries.len() == cell.levels.len() && cell.primaries.is_sorted_by(|a, b| a < b), "a cell's primaries are not its levels'");
                prop_assert!(cell.levels.iter().all(|l| l.queue.back().map(|q| q.seq) == Some(l.last)), "a level's last seq is stale");
                prop_assert!(cell.levels.iter().all(|l| l.queue.front().map(|q| q.seq) == Some(l.first)), "a level's first seq is stale");
                prop_assert!(cell.levels.iter().all(|l| l.queue.front().unwrap().is_live() && l.queue.back().unwrap().is_live()), "a level ends in a dead entry");
                prop_assert!(cell.levels.iter().all(|l| l.queue.iter().filter(|q| !q.is_live()).count() == l.dead as usize), "a level miscounts its dead");
            }
        }
    }

    proptest! {
        #[test]
        fn agrees_with_a_linear_scan(
            ops in prop::collection::vec((any::<bool>(), 0u64..50, 0u32..16, prop::array::uniform4(attribute())), 1..200),
            queries in prop::collection::vec((1u32..16, prop::array::uniform4(attribute()), 0u64..60), 1..30),
        ) {
            let mut ix = FilterIndex::new(BOUNDS);
            let mut live: Vec<(Key, OrderId, [u32; DIMS])> = Vec::new();
            for (seq, (insert, price, kinds, [a, b, c, d])) in ops.into_iter().enumerate() {
                let attrs = [kinds, a, b, c, d];
                if insert || live.is_empty() {
                    let k = key(price, seq as u64);
                    ix.insert(k, OrderId(seq as u64), attrs);
                    live.push((k, OrderId(seq as u64), attrs));
                } else {
                    let victim = live.remove(price as usize % live.len());
                    prop_assert!(ix.remove(victim.0, victim.2));
                }
                ix.check().map_err(TestCaseError::fail)?;
            }
            for (kinds, [a, b, c, d], limit) in queries {
                let q = [kinds, a, b, c, if d > 5500 { u32::MAX } else { d }];
                let limit = key(limit, u64::MAX);
                prop_assert_eq!(ix.best(q, limit), naive(&live, q, limit));
                // n at once: the n best, in order (unconstrained queries too, where whole
                // subtrees pass and are walked rather than answered by their best).
                for q in [q, [kinds, 0, 0, 0, u32::MAX]] {
                    for n in [2, 3, MAX_N] {
                        let mut want: Vec<_> = live
                            .iter()
                            .filter(|(k, _, a)| *k <= limit && (0..DIMS).all(|d| BOUNDS[d].passes(a[d], q[d])))
                            .map(|(k, id, _)| (*k, *id))
                            .collect();
                        want.sort_unstable();
                        want.truncate(n);
                        prop_assert_eq!(ix.best_n(q, limit, n).to_vec(), want);
                    }
                }
            }
        }
    }
}
