//! Between the wire types and the market's, with every check a malformed
//! request needs to be refused precisely.

use cpushare_market::money::SECONDS_PER_HOUR;
use cpushare_market::{
    BuyRequest, EndReason, KindAsks, KindSet, Lease, LeaseState, MarketError, Requirements, SandboxKind, SlotAttributes,
};
use cpushare_proto::v1 as pb;
use tonic::Status;

pub fn kind_from(k: i32) -> Result<SandboxKind, Status> {
    match pb::SandboxKind::try_from(k) {
        Ok(pb::SandboxKind::SeccompStrict) => Ok(SandboxKind::SeccompStrict),
        Ok(pb::SandboxKind::SeccompEmulated) => Ok(SandboxKind::SeccompEmulated),
        Ok(pb::SandboxKind::VmKvm) => Ok(SandboxKind::VmKvm),
        Ok(pb::SandboxKind::VmTcg) => Ok(SandboxKind::VmTcg),
        Ok(pb::SandboxKind::Unspecified) => Err(Status::invalid_argument(
            "no sandbox kind given: use seccomp-strict, seccomp-emulated, vm-kvm or vm-tcg",
        )),
        Err(_) => Err(Status::invalid_argument(format!("unknown sandbox kind {k}"))),
    }
}

pub fn kind_to(k: SandboxKind) -> pb::SandboxKind {
    match k {
        SandboxKind::SeccompStrict => pb::SandboxKind::SeccompStrict,
        SandboxKind::SeccompEmulated => pb::SandboxKind::SeccompEmulated,
        SandboxKind::VmKvm => pb::SandboxKind::VmKvm,
        SandboxKind::VmTcg => pb::SandboxKind::VmTcg,
    }
}

pub fn kinds_to(k: KindSet) -> Vec<i32> {
    k.iter().map(|k| kind_to(k) as i32).collect()
}

pub fn requirements_from(r: Option<pb::Requirements>) -> Result<Requirements, Status> {
    let r = r.ok_or_else(|| Status::invalid_argument("requirements are missing (at least the sandbox kind)"))?;
    Ok(Requirements {
        kind: kind_from(r.kind)?,
        min_score: r.min_score,
        min_ram_mib: r.min_ram_mib,
        max_latency_ms: if r.max_latency_ms == 0 { u32::MAX } else { r.max_latency_ms },
        inbound_udp_only: r.inbound_udp_only,
    })
}

pub fn requirements_to(r: &Requirements) -> pb::Requirements {
    pb::Requirements {
        kind: kind_to(r.kind) as i32,
        min_score: r.min_score,
        min_ram_mib: r.min_ram_mib,
        max_latency_ms: if r.max_latency_ms == u32::MAX { 0 } else { r.max_latency_ms },
        inbound_udp_only: r.inbound_udp_only,
    }
}

pub fn buy_from(r: pb::PlaceBuyRequest) -> Result<BuyRequest, Status> {
    Ok(BuyRequest {
        cpus: r.cpus,
        max_price: r.max_price,
        requirements: requirements_from(r.requirements)?,
        period: if r.period_secs == 0 { SECONDS_PER_HOUR } else { r.period_secs },
        periods: (r.periods > 0).then_some(r.periods),
        attended: r.attended,
    })
}

pub fn slot_from(s: Option<pb::SlotAttributes>) -> Result<SlotAttributes, Status> {
    let s = s.ok_or_else(|| Status::invalid_argument("the slot's attributes are missing"))?;
    let kinds = s.kinds.iter().map(|k| kind_from(*k)).collect::<Result<Vec<_>, _>>()?;
    Ok(SlotAttributes {
        score: s.score,
        ram_mib: s.ram_mib,
        kinds: KindSet::of(&kinds),
        inbound_udp: s.inbound_udp,
        latency_ms: s.latency_ms,
    })
}

/// A slot's own asks for some kinds; at most one per kind.
pub fn kind_asks_from(asks: &[pb::KindAsk]) -> Result<KindAsks, Status> {
    let mut out = KindAsks::default();
    for a in asks {
        let kind = kind_from(a.kind)?;
        if out.get(kind).is_some() {
            return Err(Status::invalid_argument(format!("two asks for {kind}")));
        }
        if a.ask == 0 {
            return Err(Status::invalid_argument(format!("the {kind} ask must be at least 1 cent per CPU-hour")));
        }
        out = out.with(kind, a.ask);
    }
    Ok(out)
}

pub fn kind_asks_to(asks: &KindAsks) -> Vec<pb::KindAsk> {
    SandboxKind::ALL.into_iter().filter_map(|k| asks.get(k).map(|ask| pb::KindAsk { kind: kind_to(k) as i32, ask })).collect()
}

pub fn slot_to(s: &SlotAttributes) -> pb::SlotAttributes {
    pb::SlotAttributes {
        score: s.score,
        ram_mib: s.ram_mib,
        kinds: kinds_to(s.kinds),
        inbound_udp: s.inbound_udp,
        latency_ms: s.latency_ms,
    }
}

pub fn lease_to(l: &Lease, role: &str) -> pb::Lease {
    pb::Lease {
        id: l.id.0,
        buy_order: l.buy.0,
        sell_order: l.sell.0,
        role: role.into(),
        price: l.price,
        period_secs: l.period,
        opened_at: l.opened_at,
        state: match l.state {
            LeaseState::AwaitingReady => "awaiting-ready",
            LeaseState::Running { .. } => "running",
        }
        .into(),
        delivered_secs: l.delivered,
        charged_cents: l.charged,
        deadline: l.deadline,
        seller_node: l.node.0,
        seller_account: l.seller.0,
    }
}

pub fn reason_to(r: EndReason) -> String {
    r.name().to_string()
}

/// A market refusal as a gRPC status. Someone else's order or lease reads as
/// "not found", so that accounts cannot probe each other's ids.
pub fn market_error(e: MarketError) -> Status {
    use MarketError::*;
    match e {
        UnknownAccount(_) | UnknownOrder(_) | UnknownLease(_) => Status::not_found(e.to_string()),
        NotYourOrder { order } => Status::not_found(format!("{order} is not one of your orders")),
        NotYourLease { lease } => Status::not_found(format!("{lease} is not one of your leases")),
        InvalidAmount { .. } | InvalidOrder(_) | Overflow => Status::invalid_argument(e.to_string()),
        InsufficientFunds { .. } | NotAwaitingReady { .. } | ReadyTooLate { .. } | AlreadyWithdrawn { .. } | Halted
        | NotHalted => Status::failed_precondition(e.to_string()),
        AccountExists(_) => Status::already_exists(e.to_string()),
        TimeWentBackwards { .. } => Status::internal(e.to_string()),
    }
}

/// Parses a money amount typed by a person: euros with at most two decimals
/// ("12", "12.5", "12.50"), exactly, into cents.
pub fn parse_euros(s: &str) -> Result<i64, String> {
    let bad = || format!("{s:?} is not an amount in euros (write 12 or 12.50)");
    let (whole, frac) = s.trim().split_once('.').unwrap_or((s.trim(), ""));
    if whole.is_empty() || !whole.chars().all(|c| c.is_ascii_digit()) || frac.len() > 2 || !frac.chars().all(|c| c.is_ascii_digit()) {
        return Err(bad());
    }
    let euros: i64 = whole.parse().map_err(|_| bad())?;
    let cents: i64 = format!("{frac:0<2}").parse().map_err(|_| bad())?;
    euros.checked_mul(100).and_then(|c| c.checked_add(cents)).ok_or_else(bad)
}

/// Cents as euros, for people.
pub fn euros(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", cents.unsigned_abs() / 100, cents.unsigned_abs() % 100)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn euros_parse_exactly() {
        assert_eq!(parse_euros("12"), Ok(1200));
        assert_eq!(parse_euros("12.5"), Ok(1250));
        assert_eq!(parse_euros("0.07"), Ok(7));
        for bad in ["", "1.234", "-3", "1e3", "12,50", "abc", "99999999999999999999"] {
            assert!(parse_euros(bad).is_err(), "{bad}");
        }
        assert_eq!(euros(1250), "12.50");
        assert_eq!(euros(-7), "-0.07");
    }

    #[test]
    fn an_unspecified_kind_is_refused_clearly() {
        let e = kind_from(0).unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("seccomp-strict"));
        assert!(kind_from(99).is_err());
    }
}
