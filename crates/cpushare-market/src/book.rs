//! The two sides of the book, each one filter index over all sandbox kinds,
//! and the depth (CPUs per price level) that the exchange publishes.

use rustc_hash::FxHashMap;

use arrayvec::ArrayVec;

use crate::index::{key, Bound, FilterIndex, Key, DIMS, MAX_N};
use crate::records::{BuyRec, SlotRec};
use crate::types::Tiers;
use crate::{KindSet, OrderId, Requirements, SandboxKind, SellOrder, SlotAttributes};

/// What the ask book reads of a slot: the public [`SellOrder`], or the market's own record.
pub trait Ask {
    fn order(&self) -> OrderId;
    /// Time priority: renewed whenever the slot (re-)enters the book.
    fn seq(&self) -> u64;
    fn attributes(&self) -> &SlotAttributes;
    /// Its kinds grouped by price: one entry of the book each.
    fn tiers(&self) -> Tiers;
}

impl Ask for SellOrder {
    fn order(&self) -> OrderId {
        self.id
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn attributes(&self) -> &SlotAttributes {
        &self.slot
    }
    fn tiers(&self) -> Tiers {
        SellOrder::tiers(self)
    }
}

impl Ask for SlotRec {
    fn order(&self) -> OrderId {
        self.id
    }
    fn seq(&self) -> u64 {
        self.seq
    }
    fn attributes(&self) -> &SlotAttributes {
        &self.slot
    }
    fn tiers(&self) -> Tiers {
        SlotRec::tiers(self)
    }
}

/// The index's levels, top first, as positions in [kinds, inbound UDP, RAM, score, latency]:
/// RAM, score and kinds are the tree (kinds last: a market has few sets of kinds, and
/// below RAM and score they split cells where a kind filter would otherwise repeat
/// the walk of each set's subtree; 2.4 % fewer instructions than kinds first).
const LEVELS: [usize; DIMS] = [2, 3, 0, 4, 1];

fn ordered<T: Copy>(v: [T; DIMS]) -> [T; DIMS] {
    LEVELS.map(|i| v[i])
}

/// What a slot offers, as index attributes.
fn slot_attrs(s: &SlotAttributes) -> [u32; DIMS] {
    ordered([s.kinds.bits() as u32, s.inbound_udp as u32, s.ram_mib, s.score, s.latency_ms])
}

/// The attributes of a slot's entry for some of its kinds.
fn tier_attrs(s: &SlotAttributes, kinds: KindSet) -> [u32; DIMS] {
    slot_attrs(&SlotAttributes { kinds, ..*s })
}

/// What a buy order requires, in the same order.
fn requirement_attrs(r: &Requirements) -> [u32; DIMS] {
    ordered([1 << r.kind.index(), r.inbound_udp_only as u32, r.min_ram_mib, r.min_score, r.max_latency_ms])
}

/// CPUs per (set of kinds, price): one counter per order, however many kinds it
/// offers; a kind's depth sums the sets that contain it when asked.
#[derive(Debug, Clone, Default)]
struct Depth(FxHashMap<(KindSet, u64), u32>);

impl Depth {
    fn add(&mut self, kinds: KindSet, price: u64, n: i64) {
        let level = self.0.entry((kinds, price)).or_default();
        *level = u32::try_from(*level as i64 + n).expect("depth level stays in range");
        if *level == 0 {
            self.0.remove(&(kinds, price));
        }
    }

    fn levels(&self, kind: SandboxKind) -> Vec<(u64, u32)> {
        let mut by_price = std::collections::BTreeMap::new();
        for ((kinds, price), n) in &self.0 {
            if kinds.contains(kind) {
                *by_price.entry(*price).or_insert(0) += n;
            }
        }
        by_price.into_iter().collect()
    }
}

/// Asks, best first: lowest price, then earliest. A slot offering several
/// kinds at one price is one entry, found by a buyer of any of them; a slot
/// with its own ask for some kinds has one entry per price (`SellOrder::tiers`).
#[derive(Debug, Clone)]
pub struct AskBook {
    index: FilterIndex,
    depth: Depth,
    slots: [usize; 4],
}

impl Default for AskBook {
    fn default() -> Self {
        let bounds = ordered([Bound::Intersects, Bound::AtLeast, Bound::AtLeast, Bound::AtLeast, Bound::AtMost]);
        AskBook { index: FilterIndex::new(bounds), depth: Depth::default(), slots: [0; 4] }
    }
}

impl AskBook {
    pub fn insert(&mut self, o: &impl Ask) {
        let slot = o.attributes();
        for (kinds, price) in o.tiers() {
            self.index.insert(key(price, o.seq()), o.order(), tier_attrs(slot, kinds));
            self.depth.add(kinds, price, 1);
        }
        for kind in slot.kinds.iter() {
            self.slots[kind.index()] += 1;
        }
    }

    pub fn remove(&mut self, o: &impl Ask) {
        let slot = o.attributes();
        for (kinds, price) in o.tiers() {
            let removed = self.index.remove(key(price, o.seq()), tier_attrs(slot, kinds));
            assert!(removed, "{} was not in the ask book at {price}", o.order());
            self.depth.add(kinds, price, -1);
        }
        for kind in slot.kinds.iter() {
            self.slots[kind.index()] -= 1;
        }
    }

    /// The best ask at or under `max_price` that meets `req`.
    pub fn best(&self, req: &Requirements, max_price: u64) -> Option<OrderId> {
        self.best_n(req, max_price, 1).first().copied()
    }

    /// The `n` best such asks (at most [`MAX_N`]), best first: distinct slots, since a
    /// slot's entries (one per price) offer disjoint kinds and a buyer wants one.
    pub fn best_n(&self, req: &Requirements, max_price: u64, n: usize) -> ArrayVec<OrderId, MAX_N> {
        self.index.best_n(requirement_attrs(req), key(max_price, u64::MAX), n).iter().map(|f| f.1).collect()
    }

    /// (price, slots) from the best ask up.
    pub fn depth(&self, kind: SandboxKind) -> Vec<(u64, u32)> {
        self.depth.levels(kind)
    }

    /// Resting slots that offer `kind`.
    pub fn len(&self, kind: SandboxKind) -> usize {
        self.slots[kind.index()]
    }

    /// The slots in the book (each once, however many prices it has).
    pub(crate) fn entries(&self) -> Vec<OrderId> {
        let mut ids: Vec<OrderId> = self.index.entries().into_iter().map(|e| e.1).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        self.index.check()
    }
}

/// Bids, best first: highest price, then earliest.
#[derive(Debug, Clone)]
pub struct BidBook {
    index: FilterIndex,
    depth: Depth,
    orders: [usize; 4],
}

impl Default for BidBook {
    fn default() -> Self {
        let bounds = ordered([Bound::Intersects, Bound::AtMost, Bound::AtMost, Bound::AtMost, Bound::AtLeast]);
        BidBook { index: FilterIndex::new(bounds), depth: Depth::default(), orders: [0; 4] }
    }
}

impl BidBook {
    fn key(o: &BuyRec) -> Key {
        key(u64::MAX - o.max_price(), o.seq)
    }

    /// Rests the order with all of its open CPUs.
    pub(crate) fn insert(&mut self, o: &BuyRec) {
        let kind = o.kind();
        self.index.insert(Self::key(o), o.id, requirement_attrs(&o.requirements));
        self.depth.add(KindSet::of(&[kind]), o.max_price(), o.open as i64);
        self.orders[kind.index()] += 1;
    }

    /// Takes the order out of the book with all of its open CPUs.
    pub(crate) fn remove(&mut self, o: &BuyRec) {
        let kind = o.kind();
        let removed = self.index.remove(Self::key(o), requirement_attrs(&o.requirements));
        assert!(removed, "{} was not in the bid book", o.id);
        self.depth.add(KindSet::of(&[kind]), o.max_price(), -(o.open as i64));
        self.orders[kind.index()] -= 1;
    }

    /// Adjusts the depth when a resting order's open count changes by `delta`.
    pub(crate) fn resize(&mut self, o: &BuyRec, delta: i64) {
        self.depth.add(KindSet::of(&[o.kind()]), o.max_price(), delta);
    }

    /// The best bid at or over `min_price` that `slot` satisfies, in any kind the slot offers.
    pub fn best(&self, slot: &SlotAttributes, min_price: u64) -> Option<OrderId> {
        self.best_keyed(slot, min_price).map(|(_, id)| id)
    }

    /// The best bid for a slot (with its priority key: smaller is better),
    /// across the slot's prices: each price meets bids of its own kinds.
    pub fn best_for(&self, o: &impl Ask) -> Option<OrderId> {
        let slot = o.attributes();
        o.tiers().into_iter().filter_map(|(kinds, price)| self.best_keyed(&SlotAttributes { kinds, ..*slot }, price)).min().map(|(_, id)| id)
    }

    fn best_keyed(&self, slot: &SlotAttributes, min_price: u64) -> Option<(Key, OrderId)> {
        self.index.best(slot_attrs(slot), key(u64::MAX - min_price, u64::MAX))
    }

    /// (price, CPUs) from the best bid down.
    pub fn depth(&self, kind: SandboxKind) -> Vec<(u64, u32)> {
        let mut levels = self.depth.levels(kind);
        levels.reverse();
        levels
    }

    /// Resting buy orders for `kind`.
    pub fn len(&self, kind: SandboxKind) -> usize {
        self.orders[kind.index()]
    }

    /// Whether no buy order rests (most of the time on a market with slots to spare).
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub(crate) fn entries(&self) -> Vec<OrderId> {
        self.index.entries().into_iter().map(|e| e.1).collect()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        self.index.check()
    }
}
