//! What the pages and the JSON endpoints show, read from the engine's state
//! (and, for ledgers, its store) in one job each.

use cpushare_market::{AccountId, OrderId, SandboxKind};
use serde::Serialize;

use crate::engine::{now_secs, Core, Engine, Stopped};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Level {
    /// Cents per CPU-hour.
    pub price: u64,
    pub cpus: u32,
}

#[derive(Debug, Clone, Serialize)]
pub struct Book {
    pub market: String,
    /// Lowest first.
    pub asks: Vec<Level>,
    /// Highest first.
    pub bids: Vec<Level>,
}

#[derive(Debug, Clone, Serialize)]
pub struct MarketCapacity {
    pub market: String,
    pub idle_slots: usize,
    pub idle_mflops: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Capacity {
    /// Seller nodes heard from within the heartbeat timeout.
    pub sellers_online: usize,
    /// Slots resting in the book (offered, not leased).
    pub idle_slots: usize,
    /// Their benchmark scores summed: the exchange's idle MFLOPS.
    pub idle_mflops: u64,
    pub markets: Vec<MarketCapacity>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Account {
    pub account: u64,
    pub name: String,
    pub available_cents: i64,
    pub escrow_cents: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Order {
    pub id: u64,
    /// "buy" or "sell".
    pub side: String,
    /// The bid's maximum, or the ask, in cents per CPU-hour.
    pub price: u64,
    /// Buy: CPUs still wanted; sell: 1 while the slot rests.
    pub open: u32,
    pub leased: u32,
    /// The buy's market, or the kinds a slot offers.
    pub market: String,
    pub placed_at: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    pub id: u64,
    /// "buyer" or "seller": what this account is in it.
    pub role: String,
    pub price: u64,
    /// "awaiting-ready" or "running".
    pub state: String,
    pub delivered_secs: u64,
    /// Settled so far, in cents (what the buyer paid, before the fee).
    pub charged_cents: i64,
    pub opened_at: u64,
    /// The other party's account name.
    pub with: String,
    pub seller_node: u64,
}

pub fn market_named(name: &str) -> Option<SandboxKind> {
    SandboxKind::ALL.into_iter().find(|k| k.name() == name)
}

pub async fn book(engine: &Engine, market: SandboxKind) -> Result<Book, Stopped> {
    let (asks, bids) = engine.call(move |core| (core.state.market.asks().depth(market), core.state.market.bids().depth(market))).await?;
    let level = |(price, cpus)| Level { price, cpus };
    Ok(Book { market: market.name().into(), asks: asks.into_iter().map(level).collect(), bids: bids.into_iter().map(level).collect() })
}

pub async fn capacity(engine: &Engine) -> Result<Capacity, Stopped> {
    let timeout = engine.shared.config.heartbeat_timeout.as_secs();
    let now = now_secs();
    let sellers_online = engine.shared.last_seen.lock().unwrap().values().filter(|&&t| now.saturating_sub(t) <= timeout).count();
    engine
        .call(move |core| {
            let idle: Vec<_> = core.state.market.sell_orders().filter(|o| o.is_resting()).map(|o| (o.slot.kinds, o.slot.score as u64)).collect();
            let markets = SandboxKind::ALL
                .into_iter()
                .map(|k| {
                    let of: Vec<u64> = idle.iter().filter(|(kinds, _)| kinds.contains(k)).map(|(_, s)| *s).collect();
                    MarketCapacity { market: k.name().into(), idle_slots: of.len(), idle_mflops: of.iter().sum() }
                })
                .collect();
            Capacity { sellers_online, idle_slots: idle.len(), idle_mflops: idle.iter().map(|(_, s)| s).sum(), markets }
        })
        .await
}

/// The account a web sign-in token stands for.
pub async fn signed_in(engine: &Engine, token: &str) -> Result<Option<AccountId>, Stopped> {
    let hash = crate::service::hash_token(token);
    engine.call(move |core| core.state.registry.web_tokens.get(&hash).map(|(account, _)| *account)).await
}

fn name_of(core: &Core, a: AccountId) -> String {
    core.state.registry.accounts.get(&a).map_or_else(|| a.to_string(), |i| i.name.clone())
}

pub async fn account(engine: &Engine, account: AccountId) -> Result<Account, Stopped> {
    engine
        .call(move |core| {
            let b = core.state.market.balance(account).unwrap_or_default();
            Account { account: account.0, name: name_of(core, account), available_cents: b.available, escrow_cents: b.escrow }
        })
        .await
}

pub async fn orders(engine: &Engine, account: AccountId) -> Result<Vec<Order>, Stopped> {
    let mut orders = engine
        .call(move |core| {
            let m = &core.state.market;
            let buys = m.buy_orders().filter(|o| o.account == account).map(|o| Order {
                id: o.id.0,
                side: "buy".into(),
                price: o.max_price(),
                open: o.open,
                leased: o.leases.len() as u32,
                market: o.request.requirements.kind.name().into(),
                placed_at: o.placed_at,
            });
            let sells = m.sell_orders().filter(|o| o.account == account).map(|o| Order {
                id: o.id.0,
                side: "sell".into(),
                price: o.ask,
                open: o.is_resting() as u32,
                leased: o.lease.is_some() as u32,
                market: o.slot.kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(" "),
                placed_at: o.placed_at,
            });
            buys.chain(sells).collect::<Vec<_>>()
        })
        .await?;
    orders.sort_by_key(|o| o.id);
    Ok(orders)
}

pub async fn leases(engine: &Engine, account: AccountId) -> Result<Vec<Lease>, Stopped> {
    let mut leases = engine
        .call(move |core| {
            core.state
                .market
                .leases()
                .filter(|l| l.buyer == account || l.seller == account)
                .map(|l| {
                    let buyer = l.buyer == account;
                    // The API's view of it, and the other party's name.
                    let p = crate::convert::lease_to(&l, if buyer { "buyer" } else { "seller" });
                    Lease {
                        id: p.id,
                        role: p.role,
                        price: p.price,
                        state: p.state,
                        delivered_secs: p.delivered_secs,
                        charged_cents: p.charged_cents,
                        opened_at: p.opened_at,
                        with: name_of(core, if buyer { l.seller } else { l.buyer }),
                        seller_node: p.seller_node,
                    }
                })
                .collect::<Vec<_>>()
        })
        .await?;
    leases.sort_by_key(|l| l.id);
    Ok(leases)
}

/// Why a cancel from the page was refused.
#[derive(Debug)]
pub enum CancelRefused {
    /// Not an order of this account (or none at all): nothing said about others' ids.
    NotYours,
    Other(String),
    Stopped,
}

pub async fn cancel(engine: &Engine, account: AccountId, order: OrderId) -> Result<(), CancelRefused> {
    engine
        .call(move |core| {
            core.cancel_order(account, order).map_err(|e| match e {
                cpushare_market::MarketError::UnknownOrder(_) | cpushare_market::MarketError::NotYourOrder { .. } => CancelRefused::NotYours,
                other => CancelRefused::Other(other.to_string()),
            })
        })
        .await
        .map_err(|_| CancelRefused::Stopped)?
}
