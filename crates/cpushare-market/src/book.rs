//! The two sides of the book, one filter index per sandbox kind, and the depth
//! (CPUs per price level) that the exchange publishes.

use std::collections::BTreeMap;

use crate::index::{Bound, FilterIndex, Key};
use crate::{BuyOrder, OrderId, Requirements, SandboxKind, SellOrder, SlotAttributes};

/// Asks, best first: lowest price, then earliest. A slot offering several
/// kinds rests in each kind's index.
#[derive(Debug, Clone)]
pub struct AskBook {
    by_kind: [FilterIndex; 4],
    depth: [BTreeMap<u64, u32>; 4],
}

/// Index attributes: [inbound UDP, RAM, score, latency].
fn slot_attrs(s: &SlotAttributes) -> [u32; 4] {
    [s.inbound_udp as u32, s.ram_mib, s.score, s.latency_ms]
}

fn requirement_attrs(r: &Requirements) -> [u32; 4] {
    [r.inbound_udp_only as u32, r.min_ram_mib, r.min_score, r.max_latency_ms]
}

impl Default for AskBook {
    fn default() -> Self {
        let bounds = [Bound::AtLeast, Bound::AtLeast, Bound::AtLeast, Bound::AtMost];
        AskBook { by_kind: std::array::from_fn(|_| FilterIndex::new(bounds)), depth: Default::default() }
    }
}

impl AskBook {
    fn key(o: &SellOrder) -> Key {
        (o.ask, o.seq)
    }

    pub fn insert(&mut self, o: &SellOrder) {
        for kind in o.slot.kinds.iter() {
            self.by_kind[kind.index()].insert(Self::key(o), o.id, slot_attrs(&o.slot));
            *self.depth[kind.index()].entry(o.ask).or_default() += 1;
        }
    }

    pub fn remove(&mut self, o: &SellOrder) {
        for kind in o.slot.kinds.iter() {
            let removed = self.by_kind[kind.index()].remove(Self::key(o), slot_attrs(&o.slot));
            debug_assert!(removed, "{} was not in the {kind} book", o.id);
            decrement(&mut self.depth[kind.index()], o.ask, 1);
        }
    }

    /// The best ask at or under `max_price` that meets `req`.
    pub fn best(&self, req: &Requirements, max_price: u64) -> Option<OrderId> {
        self.by_kind[req.kind.index()].best(requirement_attrs(req), (max_price, u64::MAX)).map(|(_, id)| id)
    }

    /// (price, slots) from the best ask up.
    pub fn depth(&self, kind: SandboxKind) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.depth[kind.index()].iter().map(|(p, n)| (*p, *n))
    }

    pub fn len(&self, kind: SandboxKind) -> usize {
        self.by_kind[kind.index()].len()
    }

    pub(crate) fn entries(&self, kind: SandboxKind) -> Vec<OrderId> {
        self.by_kind[kind.index()].entries().into_iter().map(|e| e.1).collect()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        self.by_kind.iter().try_for_each(|ix| ix.check())
    }
}

/// Bids, best first: highest price, then earliest. A bid rests in its one kind's index.
#[derive(Debug, Clone)]
pub struct BidBook {
    by_kind: [FilterIndex; 4],
    depth: [BTreeMap<u64, u32>; 4],
}

impl Default for BidBook {
    fn default() -> Self {
        let bounds = [Bound::AtMost, Bound::AtMost, Bound::AtMost, Bound::AtLeast];
        BidBook { by_kind: std::array::from_fn(|_| FilterIndex::new(bounds)), depth: Default::default() }
    }
}

impl BidBook {
    fn key(o: &BuyOrder) -> Key {
        (u64::MAX - o.max_price(), o.seq)
    }

    /// Rests the order with all of its open CPUs.
    pub fn insert(&mut self, o: &BuyOrder) {
        let kind = o.request.requirements.kind.index();
        self.by_kind[kind].insert(Self::key(o), o.id, requirement_attrs(&o.request.requirements));
        *self.depth[kind].entry(o.max_price()).or_default() += o.open;
    }

    /// Takes the order out of the book with all of its open CPUs.
    pub fn remove(&mut self, o: &BuyOrder) {
        let kind = o.request.requirements.kind.index();
        let removed = self.by_kind[kind].remove(Self::key(o), requirement_attrs(&o.request.requirements));
        debug_assert!(removed, "{} was not in the bid book", o.id);
        decrement(&mut self.depth[kind], o.max_price(), o.open);
    }

    /// Adjusts the depth when a resting order's open count changes by `delta`.
    pub fn resize(&mut self, o: &BuyOrder, delta: i64) {
        let level = self.depth[o.request.requirements.kind.index()].entry(o.max_price()).or_default();
        *level = (*level as i64 + delta) as u32;
        if *level == 0 {
            self.depth[o.request.requirements.kind.index()].remove(&o.max_price());
        }
    }

    /// The best bid at or over `min_price` that `slot` satisfies, in any kind the slot offers.
    pub fn best(&self, slot: &SlotAttributes, min_price: u64) -> Option<OrderId> {
        let query = slot_attrs(slot);
        slot.kinds
            .iter()
            .filter_map(|k| self.by_kind[k.index()].best(query, (u64::MAX - min_price, u64::MAX)))
            .min()
            .map(|(_, id)| id)
    }

    /// (price, CPUs) from the best bid down.
    pub fn depth(&self, kind: SandboxKind) -> impl Iterator<Item = (u64, u32)> + '_ {
        self.depth[kind.index()].iter().rev().map(|(p, n)| (*p, *n))
    }

    pub fn len(&self, kind: SandboxKind) -> usize {
        self.by_kind[kind.index()].len()
    }

    pub(crate) fn entries(&self, kind: SandboxKind) -> Vec<OrderId> {
        self.by_kind[kind.index()].entries().into_iter().map(|e| e.1).collect()
    }

    pub(crate) fn check(&self) -> Result<(), String> {
        self.by_kind.iter().try_for_each(|ix| ix.check())
    }
}

fn decrement(depth: &mut BTreeMap<u64, u32>, price: u64, n: u32) {
    if n == 0 {
        return;
    }
    let level = depth.get_mut(&price).expect("depth level of a resting order");
    *level -= n;
    if *level == 0 {
        depth.remove(&price);
    }
}
