//! The tape: recent trades and each market's price per hour, kept from the
//! trades the engine announces (and, at start, the leases open then).

use std::collections::{BTreeMap, VecDeque};

use cpushare_market::SandboxKind;
use serde::Serialize;

/// Trades kept for the tape.
const RECENT: usize = 200;
/// Hours kept per market.
const HOURS: usize = 24 * 14;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Trade {
    pub lease: u64,
    /// Cents per CPU-hour.
    pub price: u64,
    /// Unix seconds.
    pub at: u64,
    /// The market (sandbox kind) it traded in.
    pub market: String,
}

/// One hour of one market.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Hour {
    /// Unix seconds at the hour's start.
    pub hour: u64,
    pub trades: u32,
    pub low: u64,
    pub high: u64,
    /// Mean price, rounded down (cents per CPU-hour).
    pub average: u64,
    #[serde(skip)]
    sum: u128,
}

#[derive(Default)]
pub struct History {
    recent: VecDeque<Trade>,
    hours: BTreeMap<String, BTreeMap<u64, Hour>>,
}

impl History {
    pub fn record(&mut self, lease: u64, price: u64, at: u64, market: Option<SandboxKind>) {
        let market = market.map_or("unknown", |k| k.name()).to_string();
        if self.recent.iter().any(|t| t.lease == lease && t.at == at) {
            return;
        }
        self.recent.push_front(Trade { lease, price, at, market: market.clone() });
        self.recent.truncate(RECENT);
        let hours = self.hours.entry(market).or_default();
        let start = at - at % 3600;
        let h = hours.entry(start).or_insert(Hour { hour: start, trades: 0, low: price, high: price, average: price, sum: 0 });
        h.trades += 1;
        h.low = h.low.min(price);
        h.high = h.high.max(price);
        h.sum += price as u128;
        h.average = (h.sum / h.trades as u128) as u64;
        while hours.len() > HOURS {
            hours.pop_first();
        }
    }

    /// The newest trades first, at most `n`.
    pub fn recent(&self, n: usize) -> Vec<Trade> {
        self.recent.iter().take(n).cloned().collect()
    }

    /// The market's hours, oldest first.
    pub fn hours(&self, market: SandboxKind) -> Vec<Hour> {
        self.hours.get(market.name()).map(|h| h.values().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_gather_a_market_s_trades() {
        let mut h = History::default();
        let k = SandboxKind::SeccompStrict;
        h.record(1, 100, 7200 + 5, Some(k));
        h.record(2, 300, 7200 + 3599, Some(k));
        h.record(3, 50, 10_800, Some(k));
        h.record(4, 999, 10_801, Some(SandboxKind::VmTcg));
        h.record(4, 999, 10_801, Some(SandboxKind::VmTcg));
        let hours = h.hours(k);
        assert_eq!(hours.len(), 2);
        assert_eq!((hours[0].hour, hours[0].trades, hours[0].low, hours[0].high, hours[0].average), (7200, 2, 100, 300, 200));
        assert_eq!((hours[1].trades, hours[1].average), (1, 50));
        assert_eq!(h.recent(10).iter().map(|t| t.lease).collect::<Vec<_>>(), [4, 3, 2, 1], "newest first, each once");
        assert_eq!(h.hours(SandboxKind::VmTcg)[0].trades, 1);
    }
}
