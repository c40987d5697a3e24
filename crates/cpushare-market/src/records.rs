//! How the market keeps its slots, buy orders and leases: each in a hash table
//! of records laid out for the cache.
//!
//! Why not a map from id to the public structs: on an exchange of a few hundred
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

use hashbrown::HashTable;
use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;

use crate::pages::LargePages;
use crate::types::Tiers;
use crate::{
    AccountId, BuyOrder, BuyRequest, Cents, KindAsks, Lease, LeaseId, LeaseState, NodeId, OrderId, PriceSide,
    Requirements, SandboxKind, SellOrder, SlotAttributes, Time,
};

/// A record kept in a [`Table`], found by its own id.
pub(crate) trait Record {
    type Id: Copy + Eq + Hash;
    fn id(&self) -> Self::Id;
}

/// Records by id (`hashbrown`'s table, the id inside the record, so that a
/// record is one aligned bucket with no key beside it), in huge pages where the
/// kernel has them (`pages`).
#[derive(Debug, Clone)]
pub(crate) struct Table<T> {
    table: HashTable<T, LargePages>,
}

impl<T> Default for Table<T> {
    fn default() -> Self {
        Table { table: HashTable::new_in(LargePages) }
    }
}

fn hash<I: Hash>(id: I) -> u64 {
    FxBuildHasher.hash_one(id)
}

impl<T: Record> Table<T> {
    pub fn get(&self, id: T::Id) -> Option<&T> {
        self.table.find(hash(id), |r| r.id() == id)
    }

    pub fn get_mut(&mut self, id: T::Id) -> Option<&mut T> {
        self.table.find_mut(hash(id), |r| r.id() == id)
    }

    /// The record, which the market's own state says exists (a missing one is a bug
    /// or a corrupt log).
    #[track_caller]
    pub fn at(&self, id: T::Id) -> &T {
        self.get(id).expect("a record the market refers to exists")
    }

    #[track_caller]
    pub fn at_mut(&mut self, id: T::Id) -> &mut T {
        self.get_mut(id).expect("a record the market refers to exists")
    }

    /// Adds a record whose id is not in the table yet.
    pub fn insert(&mut self, record: T) {
        let id = record.id();
        debug_assert!(self.get(id).is_none(), "a record is inserted once");
        self.table.insert_unique(hash(id), record, |r| hash(r.id()));
    }

    pub fn remove(&mut self, id: T::Id) -> Option<T> {
        self.table.find_entry(hash(id), |r| r.id() == id).ok().map(|e| e.remove().0)
    }

    pub fn len(&self) -> usize {
        self.table.len()
    }

    /// Makes room for `additional` more records, so that growing to that size moves
    /// nothing.
    pub fn reserve(&mut self, additional: usize) {
        self.table.reserve(additional, |r| hash(r.id()));
    }

    /// Asks the CPU to start bringing in the record of `id` (both of its lines),
    /// without waiting: its bucket is found from the table's control bytes alone,
    /// which stay in cache far more than the records do. Several prefetches in a
    /// row make their trips to memory at the same time, where lookups one after
    /// the other would make them in turn.
    pub fn prefetch(&self, id: T::Id) {
        if let Some(record) = self.table.iter_hash_buckets(hash(id)).next().and_then(|i| self.table.get_bucket(i)) {
            prefetch(record);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.table.iter()
    }
}

/// Asks the CPU to bring every cache line of `record` in, without waiting for them.
#[inline]
fn prefetch<T>(record: &T) {
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
    fn id(&self) -> OrderId {
        self.id
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
    fn id(&self) -> OrderId {
        self.id
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

    /// Escrow held for one CPU still wanted: its first period at the full bid.
    pub fn escrow_per_cpu(&self) -> Cents {
        crate::money::period_ceiling(self.max_price(), self.period())
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
    fn id(&self) -> LeaseId {
        self.id
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

    #[test]
    fn records_are_two_aligned_cache_lines() {
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
