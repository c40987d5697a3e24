//! Everything the exchange knows, rebuilt from one log of records: the market
//! (orders, leases, money) and the registry (accounts, enrollment tokens, nodes,
//! policy). The log is the truth; this is its fold.

use std::collections::{BTreeMap, HashMap};

use cpushare_market::{AccountId, Event, Market, MarketConfig, NodeId, Snapshot, Time};
use serde::{Deserialize, Serialize};

/// One durable fact. Records are numbered from 1 in the store; applying them
/// in order from an empty state (or from a snapshot) gives the same state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "kebab-case")]
pub enum Record {
    Market(Event),
    AccountCreated { account: AccountId, name: String, at: Time },
    /// A one-time enrollment token for `account`; only its SHA-256 is kept.
    TokenIssued { token_hash: String, account: AccountId, at: Time },
    /// A node enrolled with a token (none for the operator's own node at init).
    NodeEnrolled {
        node: NodeId,
        account: AccountId,
        name: String,
        fingerprint: String,
        admin: bool,
        token_hash: Option<String>,
        at: Time,
    },
    NodeRevoked { node: NodeId, at: Time },
    /// Kernel version prefixes whose sellers are refused.
    RefusedKernels { prefixes: Vec<String>, at: Time },
    /// A web dashboard sign-in token for `account`, asked for by `node` (it
    /// dies with the node's certificate); only its SHA-256 is kept.
    WebTokenIssued { token_hash: String, account: AccountId, node: NodeId, at: Time },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountInfo {
    pub name: String,
    pub created_at: Time,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub account: AccountId,
    pub name: String,
    pub fingerprint: String,
    pub admin: bool,
    pub revoked: bool,
    pub enrolled_at: Time,
}

/// Accounts, tokens, nodes and policy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registry {
    pub accounts: BTreeMap<AccountId, AccountInfo>,
    /// Unredeemed enrollment tokens (SHA-256 hex) and their accounts.
    pub tokens: BTreeMap<String, AccountId>,
    pub nodes: BTreeMap<NodeId, NodeInfo>,
    pub refused_kernels: Vec<String>,
    /// Web sign-in tokens (SHA-256 hex): their accounts and the nodes that asked for them.
    #[serde(default)]
    pub web_tokens: BTreeMap<String, (AccountId, NodeId)>,
}

impl Registry {
    pub fn account_named(&self, name: &str) -> Option<AccountId> {
        self.accounts.iter().find(|(_, a)| a.name == name).map(|(id, _)| *id)
    }

    pub fn next_account(&self) -> AccountId {
        AccountId(self.accounts.keys().next_back().map_or(1, |a| a.0 + 1))
    }

    pub fn next_node(&self) -> NodeId {
        NodeId(self.nodes.keys().next_back().map_or(1, |n| n.0 + 1))
    }

    /// Whether a seller running `kernel` is refused.
    pub fn refuses_kernel(&self, kernel: &str) -> Option<&str> {
        self.refused_kernels.iter().find(|p| kernel.starts_with(p.as_str())).map(|p| p.as_str())
    }

    /// Fingerprint -> node, for authenticating connections.
    pub fn trusted(&self) -> HashMap<String, (NodeId, NodeInfo)> {
        self.nodes
            .iter()
            .filter(|(_, n)| !n.revoked)
            .map(|(id, n)| (n.fingerprint.clone(), (*id, n.clone())))
            .collect()
    }
}

/// The whole state and the sequence number of the last record folded into it.
pub struct State {
    pub market: Market,
    pub registry: Registry,
    pub seq: u64,
}

/// What a snapshot holds: enough to resume without replaying the log before `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnapshot {
    pub seq: u64,
    pub market: Snapshot,
    pub registry: Registry,
}

impl State {
    pub fn new(config: MarketConfig) -> State {
        State { market: Market::new(config), registry: Registry::default(), seq: 0 }
    }

    pub fn restore(config: MarketConfig, s: StateSnapshot) -> State {
        State { market: Market::restore(config, s.market), registry: s.registry, seq: s.seq }
    }

    pub fn snapshot(&self) -> StateSnapshot {
        StateSnapshot { seq: self.seq, market: self.market.snapshot(), registry: self.registry.clone() }
    }

    /// Folds one record in. Market records are applied to the market; the others
    /// change the registry.
    pub fn apply(&mut self, seq: u64, record: &Record) {
        assert_eq!(seq, self.seq + 1, "records must be applied in order");
        self.seq = seq;
        match record {
            Record::Market(e) => self.market.apply(e),
            other => apply_registry(&mut self.registry, other),
        }
    }
}

/// The registry's half of [`State::apply`] (the engine applies registry records
/// as it makes them; market events are applied by the market itself).
pub fn apply_registry(r: &mut Registry, record: &Record) {
    match record {
        Record::Market(_) => unreachable!("market events are applied by the market"),
        Record::AccountCreated { account, name, at } => {
            r.accounts.insert(*account, AccountInfo { name: name.clone(), created_at: *at });
        }
        Record::TokenIssued { token_hash, account, .. } => {
            r.tokens.insert(token_hash.clone(), *account);
        }
        Record::NodeEnrolled { node, account, name, fingerprint, admin, token_hash, at } => {
            if let Some(t) = token_hash {
                r.tokens.remove(t);
            }
            r.nodes.insert(
                *node,
                NodeInfo {
                    account: *account,
                    name: name.clone(),
                    fingerprint: fingerprint.clone(),
                    admin: *admin,
                    revoked: false,
                    enrolled_at: *at,
                },
            );
        }
        Record::NodeRevoked { node, .. } => {
            if let Some(n) = r.nodes.get_mut(node) {
                n.revoked = true;
            }
            // Its dashboard sessions end with it.
            r.web_tokens.retain(|_, (_, by)| by != node);
        }
        Record::RefusedKernels { prefixes, .. } => r.refused_kernels = prefixes.clone(),
        Record::WebTokenIssued { token_hash, account, node, .. } => {
            r.web_tokens.insert(token_hash.clone(), (*account, *node));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_json() {
        let records = vec![
            Record::AccountCreated { account: AccountId(1), name: "ops".into(), at: 5 },
            Record::Market(Event::AccountOpened { account: AccountId(1), at: 5 }),
            Record::TokenIssued { token_hash: "ab".into(), account: AccountId(1), at: 6 },
            Record::NodeEnrolled {
                node: NodeId(1),
                account: AccountId(1),
                name: "n".into(),
                fingerprint: "F".into(),
                admin: true,
                token_hash: Some("ab".into()),
                at: 7,
            },
            Record::NodeRevoked { node: NodeId(1), at: 8 },
            Record::RefusedKernels { prefixes: vec!["4.".into()], at: 9 },
        ];
        for r in &records {
            let json = serde_json::to_string(r).unwrap();
            assert_eq!(&serde_json::from_str::<Record>(&json).unwrap(), r, "{json}");
        }
        let mut s = State::new(MarketConfig::default());
        for (i, r) in records.iter().enumerate() {
            s.apply(i as u64 + 1, r);
        }
        assert!(s.registry.tokens.is_empty(), "an enrollment redeems its token");
        assert!(s.registry.nodes[&NodeId(1)].revoked);
        assert!(s.registry.trusted().is_empty());
        assert_eq!(s.registry.refuses_kernel("4.19.0"), Some("4."));
        assert_eq!(s.registry.next_account(), AccountId(2));
        let snap = s.snapshot();
        let back = State::restore(MarketConfig::default(), serde_json::from_str(&serde_json::to_string(&snap).unwrap()).unwrap());
        assert_eq!(back.snapshot(), snap);
    }
}
