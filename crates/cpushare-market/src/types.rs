//! The market's vocabulary: identifiers, time, sandbox kinds, slot attributes.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Seconds since an origin the caller chooses (the exchange uses the Unix epoch).
/// The market never reads a clock: every operation is told what time it is.
pub type Time = u64;

/// Whole euro cents. Signed because the outside world's balance is negative
/// (it is where deposits come from).
pub type Cents = i64;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $prefix:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub struct $name(pub u64);

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }
    };
}

id_type!(
    /// An account at the exchange: a person or organisation that buys, sells, or both.
    AccountId,
    "account-"
);
id_type!(
    /// A seller's machine. Losing it ends every lease on its slots.
    NodeId,
    "node-"
);
id_type!(
    /// A buy or a sell order; both draw from one sequence.
    OrderId,
    "order-"
);
id_type!(
    /// A lease: one CPU slot rented by one buy order.
    LeaseId,
    "lease-"
);

/// How a slot runs the buyer's work. Each kind is a separate market: a buyer
/// asks for exactly one, a seller may offer several.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SandboxKind {
    /// The buyer's static binary under `SECCOMP_MODE_STRICT`.
    SeccompStrict,
    /// An unmodified static binary with its system calls emulated by the supervisor.
    SeccompEmulated,
    /// The buyer's livecd in a QEMU VM with hardware virtualisation.
    VmKvm,
    /// The buyer's livecd in a QEMU VM under software emulation (slower, cheaper).
    VmTcg,
}

impl SandboxKind {
    pub const ALL: [SandboxKind; 4] =
        [SandboxKind::SeccompStrict, SandboxKind::SeccompEmulated, SandboxKind::VmKvm, SandboxKind::VmTcg];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn name(self) -> &'static str {
        match self {
            SandboxKind::SeccompStrict => "seccomp-strict",
            SandboxKind::SeccompEmulated => "seccomp-emulated",
            SandboxKind::VmKvm => "vm-kvm",
            SandboxKind::VmTcg => "vm-tcg",
        }
    }
}

impl fmt::Display for SandboxKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for SandboxKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SandboxKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            format!(
                "unknown sandbox kind {s:?}; expected one of {}",
                SandboxKind::ALL.map(|k| k.name()).join(", ")
            )
        })
    }
}

/// A set of sandbox kinds, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct KindSet(u8);

impl KindSet {
    pub fn of(kinds: &[SandboxKind]) -> Self {
        KindSet(kinds.iter().fold(0, |m, k| m | 1 << k.index()))
    }

    pub fn contains(self, kind: SandboxKind) -> bool {
        self.0 & (1 << kind.index()) != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn bits(self) -> u8 {
        self.0
    }

    pub fn iter(self) -> impl Iterator<Item = SandboxKind> {
        SandboxKind::ALL.into_iter().filter(move |k| self.contains(*k))
    }
}

/// A slot's own ask for some of the kinds it offers, where it differs from
/// the slot's ask (cents per CPU-hour; 0: the slot's ask). A seller asks less
/// for software-emulated VMs, which run CPU-bound work about five times
/// slower, than for the jail on the same CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct KindAsks(pub [u64; 4]);

impl KindAsks {
    pub fn with(mut self, kind: SandboxKind, ask: u64) -> Self {
        self.0[kind.index()] = ask;
        self
    }

    pub fn get(&self, kind: SandboxKind) -> Option<u64> {
        Some(self.0[kind.index()]).filter(|&a| a != 0)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().fold(0, |any, a| any | a) == 0
    }

    /// The kinds of `kinds` grouped by what they cost, `ask` where not set:
    /// each group is one entry of the ask book.
    #[inline]
    pub fn tiers(&self, kinds: KindSet, ask: u64) -> Tiers {
        let mut tiers = Tiers::new();
        if self.is_empty() && !kinds.is_empty() {
            // Most slots: one ask for every kind (asked on every book change of the slot).
            tiers.push((kinds, ask));
            return tiers;
        }
        for kind in kinds.iter() {
            let price = self.get(kind).unwrap_or(ask);
            match tiers.iter_mut().find(|t| t.1 == price) {
                Some(t) => t.0 = KindSet(t.0 .0 | 1 << kind.index()),
                None => tiers.push((KindSet::of(&[kind]), price)),
            }
        }
        tiers
    }
}

/// A slot's kinds grouped by price (at most one group per kind).
pub type Tiers = arrayvec::ArrayVec<(KindSet, u64), 4>;

/// What a seller measured about one CPU slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotAttributes {
    /// Benchmark score of this CPU (MFLOPS of the fixed benchmark).
    pub score: u32,
    /// RAM offered with this slot, in MiB.
    pub ram_mib: u32,
    /// Sandboxes that work on this node.
    pub kinds: KindSet,
    /// Whether the node accepts inbound UDP (for the direct virtual-network path).
    pub inbound_udp: bool,
    /// Round-trip latency from the node to the exchange, in milliseconds.
    pub latency_ms: u32,
}

/// A buy order's hard constraints on the slots it will take.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirements {
    pub kind: SandboxKind,
    pub min_score: u32,
    pub min_ram_mib: u32,
    /// `u32::MAX` for no limit.
    pub max_latency_ms: u32,
    pub inbound_udp_only: bool,
}

impl Requirements {
    /// Any slot of this kind will do.
    pub fn any(kind: SandboxKind) -> Self {
        Requirements { kind, min_score: 0, min_ram_mib: 0, max_latency_ms: u32::MAX, inbound_udp_only: false }
    }

    pub fn accepts(&self, slot: &SlotAttributes) -> bool {
        slot.kinds.contains(self.kind)
            && slot.score >= self.min_score
            && slot.ram_mib >= self.min_ram_mib
            && slot.latency_ms <= self.max_latency_ms
            && (slot.inbound_udp || !self.inbound_udp_only)
    }
}
