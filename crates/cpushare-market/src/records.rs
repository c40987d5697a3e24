//! How the market keeps its slots, buy orders, leases and seller nodes: records
//! laid out for the cache, in tables of our own.
//!
//! Why not maps from ids to the public structs: on an exchange of a few hundred
//! thousand slots and leases these tables are far larger than the CPU's caches,
//! so every record an operation touches is a trip to memory for each cache line
//! it reads. A public `Lease` (152 bytes behind an 8-byte key, at any offset)
//! spans three lines; ending a lease read three of them for the lease, the buy
//! order and the slot alike. Here each record is aligned to a line and what the
//! hot paths (matching, ending a lease) read sits in its first line, in integer
//! widths that fit what the market accepts (prices and periods are validated to
//! fit 32 bits); the rest (times for the record, the metering totals) sits in a
//! second line. The public structs are built from these records when asked for.

use std::hash::{BuildHasher, Hash};

use allocator_api2::vec::Vec;
use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;

use crate::pages::LargePages;
use crate::types::Tiers;
use crate::{
    AccountId, BuyOrder, BuyRequest, Cents, KindAsks, Lease, LeaseId, LeaseState, NodeId, OrderId, PriceSide,
    Requirements, SandboxKind, SellOrder, SlotAttributes, Time,
};

/// A record kept in a [`Table`], found by its own id.
pub(crate) trait Record: Clone {
    type Id: Copy + Eq + Hash + std::fmt::Debug;
    /// The id no record has (ids are issued from 1): it marks a free place.
    const NO_ID: Self::Id;
    fn id(&self) -> Self::Id;
    /// A record with `NO_ID`, to fill free places with.
    fn vacant() -> Self;
}

/// Records by id: one array of records, each at the place its id hashes to or
/// the first free one after it (linear probing), kept at most half full.
///
/// Why not `hashbrown`: a SwissTable finds a record through a separate array
/// of control bytes, so a lookup is two trips to memory one after the other
/// (the control bytes of three tables of some 200,000 records each outgrow
/// the cache), and where a record is cannot be known before the first trip
/// returns. Here the id is in the record and the place follows from the id
/// alone: a lookup is one trip (the next record, when the first is another's,
/// is the adjacent line), and the records an operation will need can be
/// prefetched all at once before it reads any (`prefetch`). Removal shifts the
/// records after it back into the gap (no tombstones), so a table never needs
/// cleaning. The array lives in huge pages where the kernel has them (`pages`).
#[derive(Debug, Clone)]
pub(crate) struct Table<T> {
    places: Vec<T, LargePages>,
    /// `places.len() - 1` (the length is a power of two).
    mask: usize,
    /// The hash's top bits index the places: `64 - log2(places.len())`.
    shift: u32,
    len: usize,
}

impl<T: Record> Default for Table<T> {
    fn default() -> Self {
        Table::with_places(16)
    }
}

fn hash<I: Hash>(id: I) -> u64 {
    FxBuildHasher.hash_one(id)
}

impl<T: Record> Table<T> {
    fn with_places(n: usize) -> Self {
        debug_assert!(n.is_power_of_two());
        let mut places = Vec::with_capacity_in(n, LargePages);
        places.resize(n, T::vacant());
        Table { places, mask: n - 1, shift: 64 - n.trailing_zeros(), len: 0 }
    }

    /// Where a record with this id belongs, if that place is free.
    fn home(&self, id: T::Id) -> usize {
        // FxHash multiplies; its top bits are the well-mixed ones.
        (hash(id) >> self.shift) as usize
    }

    fn is_free(&self, at: usize) -> bool {
        self.places[at].id() == T::NO_ID
    }

    fn find(&self, id: T::Id) -> Option<usize> {
        let mut at = self.home(id);
        loop {
            let here = self.places[at].id();
            if here == id {
                return Some(at);
            }
            if here == T::NO_ID {
                return None;
            }
            at = (at + 1) & self.mask;
        }
    }

    pub fn get(&self, id: T::Id) -> Option<&T> {
        self.find(id).map(|at| &self.places[at])
    }

    pub fn get_mut(&mut self, id: T::Id) -> Option<&mut T> {
        self.find(id).map(|at| &mut self.places[at])
    }

    /// The record, which the market's own state says exists (a missing one is a bug
    /// or a corrupt log).
    #[track_caller]
    pub fn at(&self, id: T::Id) -> &T {
        self.get(id).unwrap_or_else(|| panic!("{id:?}: a record the market refers to exists"))
    }

    #[track_caller]
    pub fn at_mut(&mut self, id: T::Id) -> &mut T {
        self.get_mut(id).unwrap_or_else(|| panic!("{id:?}: a record the market refers to exists"))
    }

    /// Adds a record whose id is not in the table yet.
    #[track_caller]
    pub fn insert(&mut self, record: T) {
        let id = record.id();
        assert!(id != T::NO_ID, "{id:?} is not an id the market issues");
        debug_assert!(self.find(id).is_none(), "{id:?} is inserted once");
        if 2 * (self.len + 1) > self.places.len() {
            self.grow(2 * self.places.len());
        }
        self.put(record);
        self.len += 1;
    }

    /// Puts a record in the first free place from its home (there is one: the
    /// table is at most half full).
    fn put(&mut self, record: T) {
        let mut at = self.home(record.id());
        while !self.is_free(at) {
            at = (at + 1) & self.mask;
        }
        self.places[at] = record;
    }

    pub fn remove(&mut self, id: T::Id) -> Option<T> {
        let mut gap = self.find(id)?;
        let removed = std::mem::replace(&mut self.places[gap], T::vacant());
        self.len -= 1;
        // Shift back each following record that may sit in the gap (one whose home
        // is not between the gap and where it is), until a free place ends the run.
        let mut at = gap;
        loop {
            at = (at + 1) & self.mask;
            if self.is_free(at) {
                return Some(removed);
            }
            let home = self.home(self.places[at].id());
            if (at.wrapping_sub(home) & self.mask) >= (at.wrapping_sub(gap) & self.mask) {
                self.places.swap(gap, at);
                gap = at;
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.places.iter().filter(|r| r.id() != T::NO_ID)
    }

    /// Makes room for `additional` more records, so that growing to that size moves
    /// nothing.
    pub fn reserve(&mut self, additional: usize) {
        let places = (2 * (self.len + additional)).next_power_of_two();
        if places > self.places.len() {
            self.grow(places);
        }
    }

    fn grow(&mut self, places: usize) {
        let old = std::mem::replace(self, Table::with_places(places));
        self.len = old.len;
        for record in old.places.into_iter().filter(|r| r.id() != T::NO_ID) {
            self.put(record);
        }
    }

    /// Asks the CPU to start bringing in the record of `id` (where it most likely
    /// is: its home place), without waiting. Several prefetches in a row make their
    /// trips to memory at the same time, where lookups one after the other would
    /// make them in turn.
    pub fn prefetch(&self, id: T::Id) {
        prefetch(&self.places[self.home(id)]);
    }
}

/// A seller's node and its slots (placed in that order), found by the node: what a
/// lost node takes off the market.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct NodeRec {
    /// The node's id plus one (0 marks a free place; see `NodeKey`).
    pub key: NodeKey,
    pub slots: SmallVec<[OrderId; 5]>,
}

/// A node's id plus one, so that every node id but the largest has a key and 0 is free.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct NodeKey(u64);

impl From<NodeId> for NodeKey {
    #[track_caller]
    fn from(node: NodeId) -> Self {
        NodeKey(node.0.checked_add(1).expect("node ids are validated below u64::MAX"))
    }
}

impl NodeKey {
    /// The key of a node that may have slots (`None` for the one id no slot is placed with).
    pub fn of(node: NodeId) -> Option<NodeKey> {
        node.0.checked_add(1).map(NodeKey)
    }

    pub fn node(self) -> NodeId {
        NodeId(self.0 - 1)
    }
}

impl Record for NodeRec {
    type Id = NodeKey;
    const NO_ID: NodeKey = NodeKey(0);
    fn id(&self) -> NodeKey {
        self.key
    }
    fn vacant() -> Self {
        NodeRec { key: NodeKey(0), slots: SmallVec::new() }
    }
}

/// Asks the CPU to bring every cache line of `record` in, without waiting for them.
#[inline]
pub(crate) fn prefetch<T>(record: &T) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let start = record as *const T as *const i8;
        for offset in (0..std::mem::size_of::<T>()).step_by(64) {
            // SAFETY: a prefetch is only a hint; it never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(offset)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = record;
}

/// Narrows a price or period the market validated (`MAX_PRICE`, `MAX_PERIOD`) to
/// the 32 bits its records keep.
#[track_caller]
fn narrow(v: u64) -> u32 {
    u32::try_from(v).expect("prices and periods are validated to fit 32 bits")
}

/// A slot on the market (a sell order).
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct SlotRec {
    // What matching and the end of a lease read: the first cache line.
    pub id: OrderId,
    pub seq: u64,
    /// The lease the slot is in (`LeaseId(0)`, never issued, for none).
    pub lease: LeaseId,
    pub account: AccountId,
    pub node: NodeId,
    pub slot: SlotAttributes,
    pub ask: u32,
    pub withdrawn: bool,
    /// Whether `kind_asks` holds any (most slots have one ask for every kind).
    pub own_kind_asks: bool,
    // The second line.
    pub placed_at: Time,
    pub kind_asks: KindAsks,
}

const NO_LEASE: LeaseId = LeaseId(0);

impl Record for SlotRec {
    type Id = OrderId;
    const NO_ID: OrderId = OrderId(0);
    fn id(&self) -> OrderId {
        self.id
    }
    fn vacant() -> Self {
        SlotRec {
            id: OrderId(0),
            seq: 0,
            lease: NO_LEASE,
            account: AccountId(0),
            node: NodeId(0),
            slot: SlotAttributes { score: 0, ram_mib: 0, kinds: crate::KindSet::default(), inbound_udp: false, latency_ms: 0 },
            ask: 0,
            withdrawn: false,
            own_kind_asks: false,
            placed_at: 0,
            kind_asks: KindAsks::default(),
        }
    }
}

impl SlotRec {
    pub fn new(o: &SellOrder) -> Self {
        SlotRec {
            id: o.id,
            seq: o.seq,
            lease: o.lease.unwrap_or(NO_LEASE),
            account: o.account,
            node: o.node,
            slot: o.slot,
            ask: narrow(o.ask),
            withdrawn: o.withdrawn,
            own_kind_asks: !o.kind_asks.is_empty(),
            placed_at: o.placed_at,
            kind_asks: o.kind_asks,
        }
    }

    pub fn view(&self) -> SellOrder {
        SellOrder {
            id: self.id,
            account: self.account,
            node: self.node,
            slot: self.slot,
            ask: self.ask as u64,
            kind_asks: self.kind_asks,
            placed_at: self.placed_at,
            seq: self.seq,
            lease: self.lease(),
            withdrawn: self.withdrawn,
        }
    }

    pub fn lease(&self) -> Option<LeaseId> {
        (self.lease != NO_LEASE).then_some(self.lease)
    }

    pub fn set_lease(&mut self, lease: Option<LeaseId>) {
        self.lease = lease.unwrap_or(NO_LEASE);
    }

    pub fn is_resting(&self) -> bool {
        self.lease == NO_LEASE
    }

    pub fn ask(&self) -> u64 {
        self.ask as u64
    }

    pub fn set_ask(&mut self, ask: u64) {
        self.ask = narrow(ask);
    }

    /// What a lease of this slot for `kind` costs per CPU-hour.
    pub fn ask_for(&self, kind: SandboxKind) -> u64 {
        if self.own_kind_asks {
            self.kind_asks.get(kind).unwrap_or(self.ask())
        } else {
            self.ask()
        }
    }

    /// The slot's kinds grouped by price: its entries in the ask book (the second
    /// cache line is read only for a slot with asks of its own per kind).
    pub fn tiers(&self) -> Tiers {
        if self.own_kind_asks {
            self.kind_asks.tiers(self.slot.kinds, self.ask())
        } else {
            KindAsks::default().tiers(self.slot.kinds, self.ask())
        }
    }
}

/// A buy order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct BuyRec {
    // What matching and the end of a lease read: the first cache line.
    pub id: OrderId,
    pub account: AccountId,
    pub seq: u64,
    pub requirements: Requirements,
    pub cpus: u32,
    pub max_price: u32,
    pub period: u32,
    /// Periods each lease runs (0: until cancelled; the market refuses 0 periods).
    pub periods: u32,
    pub open: u32,
    pub resting: bool,
    pub attended: bool,
    // The second line.
    pub placed_at: Time,
    pub leases: SmallVec<[LeaseId; 4]>,
}

impl Record for BuyRec {
    type Id = OrderId;
    const NO_ID: OrderId = OrderId(0);
    fn id(&self) -> OrderId {
        self.id
    }
    fn vacant() -> Self {
        BuyRec {
            id: OrderId(0),
            account: AccountId(0),
            seq: 0,
            requirements: Requirements::any(SandboxKind::SeccompStrict),
            cpus: 0,
            max_price: 0,
            period: 0,
            periods: 0,
            open: 0,
            resting: false,
            attended: false,
            placed_at: 0,
            leases: SmallVec::new(),
        }
    }
}

impl BuyRec {
    pub fn new(o: &BuyOrder) -> Self {
        let r = &o.request;
        BuyRec {
            id: o.id,
            account: o.account,
            seq: o.seq,
            requirements: r.requirements,
            cpus: r.cpus,
            max_price: narrow(r.max_price),
            period: narrow(r.period),
            periods: r.periods.unwrap_or(0),
            open: o.open,
            resting: o.resting,
            attended: r.attended,
            placed_at: o.placed_at,
            leases: o.leases.clone(),
        }
    }

    pub fn view(&self) -> BuyOrder {
        BuyOrder {
            id: self.id,
            account: self.account,
            request: self.request(),
            placed_at: self.placed_at,
            seq: self.seq,
            open: self.open,
            resting: self.resting,
            leases: self.leases.clone(),
        }
    }

    pub fn request(&self) -> BuyRequest {
        BuyRequest {
            cpus: self.cpus,
            max_price: self.max_price(),
            requirements: self.requirements,
            period: self.period(),
            periods: (self.periods != 0).then_some(self.periods),
            attended: self.attended,
        }
    }

    pub fn max_price(&self) -> u64 {
        self.max_price as u64
    }

    pub fn period(&self) -> u64 {
        self.period as u64
    }

    pub fn kind(&self) -> SandboxKind {
        self.requirements.kind
    }

    /// Escrow held for one CPU still wanted (the request's rule).
    pub fn escrow_per_cpu(&self) -> Cents {
        self.request().escrow_per_cpu()
    }

    /// Escrow this order holds for its open CPUs.
    pub fn escrow(&self) -> Cents {
        self.open as Cents * self.escrow_per_cpu()
    }
}

/// A lease.
#[derive(Debug, Clone, PartialEq, Eq)]
#[repr(C, align(64))]
pub(crate) struct LeaseRec {
    // What opening, ending and renewing read: the first cache line.
    pub id: LeaseId,
    pub buy: OrderId,
    pub sell: OrderId,
    pub buyer: AccountId,
    pub escrow: Cents,
    pub deadline: Time,
    /// While running: metered up to here.
    pub metered_until: Time,
    pub renewals: u32,
    /// Metering remainder in cent-seconds per hour (< 3600).
    pub carry: u16,
    pub running: bool,
    pub side: PriceSide,
    // The second line: metering totals and what is kept for the record.
    pub seller: AccountId,
    pub node: NodeId,
    pub opened_at: Time,
    /// While running: the current period's start.
    pub period_start: Time,
    pub delivered: u64,
    pub charged: Cents,
    pub fee: Cents,
    pub price: u32,
    pub period: u32,
}

impl Record for LeaseRec {
    type Id = LeaseId;
    const NO_ID: LeaseId = LeaseId(0);
    fn id(&self) -> LeaseId {
        self.id
    }
    fn vacant() -> Self {
        LeaseRec {
            id: LeaseId(0),
            buy: OrderId(0),
            sell: OrderId(0),
            buyer: AccountId(0),
            escrow: 0,
            deadline: 0,
            metered_until: 0,
            renewals: 0,
            carry: 0,
            running: false,
            side: PriceSide::Ask,
            seller: AccountId(0),
            node: NodeId(0),
            opened_at: 0,
            period_start: 0,
            delivered: 0,
            charged: 0,
            fee: 0,
            price: 0,
            period: 0,
        }
    }
}

impl LeaseRec {
    pub fn new(l: &Lease) -> Self {
        let (running, period_start, metered_until) = match l.state {
            LeaseState::AwaitingReady => (false, 0, 0),
            LeaseState::Running { period_start, metered_until } => (true, period_start, metered_until),
        };
        LeaseRec {
            id: l.id,
            buy: l.buy,
            sell: l.sell,
            buyer: l.buyer,
            escrow: l.escrow,
            deadline: l.deadline,
            metered_until,
            renewals: l.renewals,
            carry: u16::try_from(l.carry).expect("a lease's carry stays under 3600"),
            running,
            side: l.side,
            seller: l.seller,
            node: l.node,
            opened_at: l.opened_at,
            period_start,
            delivered: l.delivered,
            charged: l.charged,
            fee: l.fee,
            price: narrow(l.price),
            period: narrow(l.period),
        }
    }

    pub fn view(&self) -> Lease {
        Lease {
            id: self.id,
            buy: self.buy,
            sell: self.sell,
            buyer: self.buyer,
            seller: self.seller,
            node: self.node,
            price: self.price(),
            side: self.side,
            period: self.period(),
            opened_at: self.opened_at,
            state: self.state(),
            deadline: self.deadline,
            renewals: self.renewals,
            escrow: self.escrow,
            carry: self.carry as u64,
            delivered: self.delivered,
            charged: self.charged,
            fee: self.fee,
        }
    }

    pub fn state(&self) -> LeaseState {
        if self.running {
            LeaseState::Running { period_start: self.period_start, metered_until: self.metered_until }
        } else {
            LeaseState::AwaitingReady
        }
    }

    pub fn price(&self) -> u64 {
        self.price as u64
    }

    pub fn set_price(&mut self, price: u64) {
        self.price = narrow(price);
    }

    pub fn period(&self) -> u64 {
        self.period as u64
    }

    /// Starts a period at `at` (the lease became ready, or renewed).
    pub fn run_from(&mut self, at: Time) {
        self.running = true;
        self.period_start = at;
        self.metered_until = at;
        self.deadline = at + self.period();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lease(id: u64, escrow: Cents) -> LeaseRec {
        LeaseRec { id: LeaseId(id), escrow, ..LeaseRec::vacant() }
    }

    proptest! {
        /// The table is a map from id to record, whatever ids come and go (runs of
        /// neighbours, removals from the middle of a run, the array wrapping round,
        /// growth).
        #[test]
        fn a_table_keeps_every_record_and_only_those(ops in prop::collection::vec((any::<bool>(), 1u64..200, any::<i64>()), 1..400)) {
            let mut table = Table::<LeaseRec>::default();
            let mut model = std::collections::HashMap::new();
            for (insert, id, escrow) in ops {
                if insert && !model.contains_key(&id) {
                    table.insert(lease(id, escrow));
                    model.insert(id, escrow);
                } else {
                    prop_assert_eq!(table.remove(LeaseId(id)).map(|l| l.escrow), model.remove(&id));
                }
                prop_assert_eq!(table.len(), model.len());
                for id in 1..200 {
                    prop_assert_eq!(table.get(LeaseId(id)).map(|l| l.escrow), model.get(&id).copied());
                }
                let mut ids: std::vec::Vec<u64> = table.iter().map(|l| l.id.0).collect();
                ids.sort_unstable();
                let mut want: std::vec::Vec<u64> = model.keys().copied().collect();
                want.sort_unstable();
                prop_assert_eq!(ids, want);
                prop_assert!(2 * table.len() <= table.places.len(), "more than half full");
            }
        }
    }

    #[test]
    #[should_panic(expected = "is not an id the market issues")]
    fn id_zero_is_refused() {
        Table::<LeaseRec>::default().insert(LeaseRec::vacant());
    }

    #[test]
    fn records_are_two_aligned_cache_lines() {
        assert_eq!((std::mem::size_of::<NodeRec>(), std::mem::align_of::<NodeRec>()), (64, 64), "the node record");
        for (name, size, align) in [
            ("slot", std::mem::size_of::<SlotRec>(), std::mem::align_of::<SlotRec>()),
            ("buy", std::mem::size_of::<BuyRec>(), std::mem::align_of::<BuyRec>()),
            ("lease", std::mem::size_of::<LeaseRec>(), std::mem::align_of::<LeaseRec>()),
        ] {
            assert_eq!((size, align), (128, 64), "the {name} record");
        }
        // What the hot paths read is in the first line.
        assert!(std::mem::offset_of!(SlotRec, own_kind_asks) < 64);
        assert!(std::mem::offset_of!(BuyRec, attended) < 64);
        assert!(std::mem::offset_of!(LeaseRec, side) < 64);
    }

    #[test]
    fn a_record_gives_back_the_public_struct_it_was_made_from() {
        let slot = SlotAttributes { score: 1234, ram_mib: 2048, kinds: crate::KindSet::of(&SandboxKind::ALL), inbound_udp: true, latency_ms: 17 };
        let sell = SellOrder {
            id: OrderId(7),
            account: AccountId(3),
            node: NodeId(9),
            slot,
            ask: 100_000_000,
            kind_asks: KindAsks::default().with(SandboxKind::VmTcg, 40),
            placed_at: 1_700_000_000,
            seq: 1 << 40,
            lease: Some(LeaseId(11)),
            withdrawn: true,
        };
        assert_eq!(SlotRec::new(&sell).view(), sell);
        assert_eq!(SlotRec::new(&SellOrder { lease: None, kind_asks: KindAsks::default(), ..sell.clone() }).view().lease, None);

        let mut request = BuyRequest::new(3, 99, SandboxKind::VmKvm);
        request.periods = Some(5);
        request.attended = true;
        let buy = BuyOrder {
            id: OrderId(8),
            account: AccountId(4),
            request,
            placed_at: 12,
            seq: 13,
            open: 2,
            resting: true,
            leases: [LeaseId(20)].into_iter().collect(),
        };
        assert_eq!(BuyRec::new(&buy).view(), buy);
        let forever = BuyOrder { request: BuyRequest { periods: None, ..request }, ..buy.clone() };
        assert_eq!(BuyRec::new(&forever).view(), forever);

        let lease = Lease {
            id: LeaseId(20),
            buy: OrderId(8),
            sell: OrderId(7),
            buyer: AccountId(4),
            seller: AccountId(3),
            node: NodeId(9),
            price: 77,
            side: PriceSide::Bid,
            period: 3600,
            opened_at: 100,
            state: LeaseState::Running { period_start: 200, metered_until: 250 },
            deadline: 3800,
            renewals: 2,
            escrow: 55,
            carry: 3599,
            delivered: 50,
            charged: 3,
            fee: 1,
        };
        assert_eq!(LeaseRec::new(&lease).view(), lease);
        let waiting = Lease { state: LeaseState::AwaitingReady, ..lease.clone() };
        assert_eq!(LeaseRec::new(&waiting).view(), waiting);
    }
}
