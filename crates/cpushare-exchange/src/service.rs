//! The gRPC API: who is calling (from the client certificate), what they may
//! do, and the translation to engine jobs.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use cpushare_market::{AccountId, LeaseId, NodeId, OrderId, SellRequest};
use cpushare_proto::v1::{self as pb, admin_server::Admin, exchange_server::Exchange};
use futures::Stream;
use rustc_hash::FxHashMap;
use sha2::{Digest, Sha256};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert::*;
use crate::engine::{Caller, Core, Engine, Notice, ToSeller};
use crate::pki::{fingerprint, Authority};
use crate::networks::{resolve_endpoint, view, Leave, Networks, VNET_KEY_STATEMENT};
use crate::relay::Relays;
use crate::state::Record;

/// Limits an operator sets.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Orders (placed or cancelled) per second per account, sustained.
    pub orders_per_sec: f64,
    /// And in a burst.
    pub order_burst: f64,
    /// Largest request message, bytes.
    pub max_message: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { orders_per_sec: 100.0, order_burst: 200.0, max_message: crate::MAX_MESSAGE }
    }
}

pub struct Api {
    engine: Engine,
    authority: Arc<Authority>,
    limits: Limits,
    buckets: Mutex<FxHashMap<AccountId, (f64, Instant)>>,
    relays: Arc<Relays>,
    networks: Arc<Networks>,
    sessions: AtomicU64,
}

type Stream_<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;
pub(crate) type OrderAcks = Stream_<pb::OrderAck>;

/// What tonic serves: the API behind a shared pointer.
#[derive(Clone)]
pub struct Handler(pub Arc<Api>);

impl std::ops::Deref for Handler {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.0
    }
}

impl Api {
    pub fn new(engine: Engine, authority: Arc<Authority>, limits: Limits) -> Arc<Api> {
        let relays = Arc::new(Relays::default());
        let networks = Arc::new(Networks::new(authority.derived_secret("vnet psk")).expect("a UDP socket for inbound probes"));
        // Sides still waiting when their lease ends are let go; so are network members.
        let mut notices = engine.shared.notices.subscribe();
        let weak = Arc::downgrade(&relays);
        let weak_networks = Arc::downgrade(&networks);
        tokio::spawn(async move {
            loop {
                match notices.recv().await {
                    Ok(n) => {
                        if let Notice::Lease { lease, kind: "ended", .. } = *n {
                            let Some(relays) = weak.upgrade() else { break };
                            relays.lease_ended(lease);
                            if let Some(n) = weak_networks.upgrade() {
                                n.lease_ended(lease.0);
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Arc::new(Api {
            engine,
            authority,
            limits,
            buckets: Mutex::new(FxHashMap::default()),
            relays,
            networks,
            sessions: AtomicU64::new(1),
        })
    }

    pub fn max_message(&self) -> usize {
        self.limits.max_message
    }

    fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        self.identify(req).map(|(c, _)| c)
    }

    /// The caller and its certificate's fingerprint.
    fn identify<T>(&self, req: &Request<T>) -> Result<(Caller, String), Status> {
        let certs = req
            .peer_certs()
            .ok_or_else(|| Status::unauthenticated("this call needs a node certificate: enroll first (cpushare enroll)"))?;
        let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate was presented"))?;
        let fp = fingerprint(leaf);
        Ok((self.trusted(&fp)?, fp))
    }

    fn admin<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        let c = self.caller(req)?;
        if !c.admin {
            return Err(Status::permission_denied("only the exchange operator's nodes may do this"));
        }
        Ok(c)
    }

    /// Token bucket per account for order traffic.
    fn rate_limit(&self, account: AccountId) -> Result<(), Status> {
        let mut buckets = self.buckets.lock().unwrap();
        let now = Instant::now();
        let (tokens, last) = buckets.entry(account).or_insert((self.limits.order_burst, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * self.limits.orders_per_sec).min(self.limits.order_burst);
        *last = now;
        if *tokens < 1.0 {
            return Err(Status::resource_exhausted(format!(
                "too many orders: this exchange allows {} per second per account (bursts of {}); slow down and retry",
                self.limits.orders_per_sec, self.limits.order_burst
            )));
        }
        *tokens -= 1.0;
        Ok(())
    }

    /// PlaceBuy for a caller already identified (by its call, or by the
    /// order-entry stream it sends on); PlaceSell and CancelOrder alike below.
    pub(crate) async fn place_buy_as(&self, c: Caller, r: pb::PlaceBuyRequest) -> Result<pb::OrderReply, Status> {
        self.rate_limit(c.account)?;
        let request = buy_from(r)?;
        self.call(move |core| {
            let now = core.now();
            let order = core.state.market.place_buy(c.account, request, now).map_err(market_error)?;
            let leases = core.state.market.buy_order(order).map(|o| o.leases.iter().map(|l| l.0).collect()).unwrap_or_default();
            Ok(pb::OrderReply { order: order.0, leases })
        })
        .await?
    }

    pub(crate) async fn place_sell_as(&self, c: Caller, r: pb::PlaceSellRequest) -> Result<pb::OrderReply, Status> {
        self.rate_limit(c.account)?;
        let request = SellRequest { node: c.node, slot: slot_from(r.slot)?, ask: r.ask, kind_asks: kind_asks_from(&r.kind_asks)? };
        self.call(move |core| {
            let now = core.now();
            let order = core.state.market.place_sell(c.account, request, now).map_err(market_error)?;
            let leases = core.state.market.sell_order(order).and_then(|o| o.lease).map(|l| vec![l.0]).unwrap_or_default();
            Ok(pb::OrderReply { order: order.0, leases })
        })
        .await?
    }

    pub(crate) async fn cancel_order_as(&self, c: Caller, order: OrderId) -> Result<(), Status> {
        self.rate_limit(c.account)?;
        self.call(move |core| core.cancel_order(c.account, order).map_err(market_error)).await?
    }

    /// The node whose certificate has this fingerprint, while it is trusted
    /// (a revoked node is refused from its next request on).
    pub(crate) fn trusted(&self, fingerprint: &str) -> Result<Caller, Status> {
        self.engine.shared.caller(fingerprint).ok_or_else(|| {
            Status::unauthenticated("this node's certificate is not trusted here (revoked, or from another exchange)")
        })
    }

    async fn call<T: Send + 'static>(&self, f: impl FnOnce(&mut Core) -> T + Send + 'static) -> Result<T, Status> {
        self.engine.call(f).await.map_err(|e| Status::unavailable(e.to_string()))
    }

    fn subscribe(&self) -> broadcast::Receiver<Arc<Notice>> {
        self.engine.shared.notices.subscribe()
    }
}

/// An open lease-events stream of `account`, counted in the engine's
/// watchers while it lives.
struct Watching {
    shared: Arc<crate::engine::Shared>,
    account: AccountId,
}

impl Watching {
    fn start(shared: Arc<crate::engine::Shared>, account: AccountId) -> Watching {
        shared.watchers.lock().unwrap().entry(account).or_insert((0, 0)).0 += 1;
        Watching { shared, account }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut w = self.shared.watchers.lock().unwrap();
        let e = w.entry(self.account).or_insert((1, 0));
        e.0 = e.0.saturating_sub(1);
        if e.0 == 0 {
            e.1 = crate::engine::now_secs();
        }
    }
}

/// Forwards broadcast notices through `f` until the client goes away; a client
/// that falls too far behind is told so and cut.
fn notice_stream<T: Send + 'static>(
    mut rx: broadcast::Receiver<Arc<Notice>>,
    f: impl Fn(&Notice) -> Option<T> + Send + 'static,
) -> Stream_<T> {
    let (tx, out) = mpsc::channel(256);
    tokio::spawn(async move {
        loop {
            // A client gone is seen at once, not at the next notice for it.
            let received = tokio::select! {
                r = rx.recv() => r,
                _ = tx.closed() => break,
            };
            let item = match received {
                Ok(n) => match f(&n) {
                    Some(item) => Ok(item),
                    None => continue,
                },
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    Err(Status::resource_exhausted(format!("this stream fell {n} messages behind; reconnect")))
                }
                Err(broadcast::error::RecvError::Closed) => break,
            };
            let stop = item.is_err();
            if tx.send(item).await.is_err() || stop {
                break;
            }
        }
    });
    Box::pin(ReceiverStream::new(out))
}

#[tonic::async_trait]
impl Exchange for Handler {
    async fn hello(&self, req: Request<pb::HelloRequest>) -> Result<Response<pb::HelloReply>, Status> {
        let caller = self.caller(&req).ok();
        let halted = self.call(|core| core.state.market.is_halted()).await?;
        Ok(Response::new(pb::HelloReply {
            protocol_min: crate::PROTOCOL_MIN,
            protocol_max: cpushare_proto::PROTOCOL_VERSION,
            exchange_version: env!("CARGO_PKG_VERSION").into(),
            ca_fingerprint: self.authority.fingerprint(),
            account: caller.map_or(0, |c| c.account.0),
            node: caller.map_or(0, |c| c.node.0),
            admin: caller.is_some_and(|c| c.admin),
            heartbeat_timeout_secs: self.engine.shared.config.heartbeat_timeout.as_secs() as u32,
            halted,
        }))
    }

    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollReply>, Status> {
        let r = req.into_inner();
        if r.node_name.len() > 128 {
            return Err(Status::invalid_argument("the node name is longer than 128 bytes"));
        }
        let token_hash = hash_token(&r.token);
        let authority = self.authority.clone();
        let reply = self
            .call(move |core| {
                let account = *core.state.registry.tokens.get(&token_hash).ok_or_else(|| {
                    Status::permission_denied("this enrollment token is unknown or already used; ask the operator for a new one")
                })?;
                let node = core.state.registry.next_node();
                let cert = authority.sign_node(&r.csr_der, node.0).map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
                let at = core.now();
                core.record(Record::NodeEnrolled {
                    node,
                    account,
                    name: r.node_name,
                    fingerprint: fingerprint(&cert),
                    admin: false,
                    token_hash: Some(token_hash),
                    at,
                });
                Ok::<_, Status>(pb::EnrollReply {
                    certificate_der: cert.to_vec(),
                    ca_certificate_der: authority.cert_der().to_vec(),
                    account: account.0,
                    node: node.0,
                })
            })
            .await??;
        Ok(Response::new(reply))
    }

    async fn balance(&self, req: Request<pb::BalanceRequest>) -> Result<Response<pb::BalanceReply>, Status> {
        let c = self.caller(&req)?;
        let b = self.call(move |core| core.state.market.balance(c.account).unwrap_or_default()).await?;
        Ok(Response::new(pb::BalanceReply { available_cents: b.available, escrow_cents: b.escrow }))
    }

    async fn withdraw(&self, req: Request<pb::WithdrawRequest>) -> Result<Response<pb::WithdrawReply>, Status> {
        let c = self.caller(&req)?;
        let amount = req.into_inner().amount_cents;
        let available = self
            .call(move |core| {
                let now = core.now();
                core.state.market.withdraw(c.account, amount, now).map_err(market_error)?;
                Ok::<_, Status>(core.state.market.balance(c.account).unwrap_or_default().available)
            })
            .await??;
        Ok(Response::new(pb::WithdrawReply { available_cents: available }))
    }

    async fn statement(&self, req: Request<pb::StatementRequest>) -> Result<Response<pb::StatementReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        let limit = match r.limit {
            0 => 100,
            n if n > 10_000 => return Err(Status::invalid_argument("a statement page holds at most 10,000 entries")),
            n => n,
        };
        let rows = self
            .engine
            .shared
            .store
            .statement(c.account.0, r.before_seq, limit)
            .await
            .map_err(|e| Status::internal(format!("reading the statement: {e:#}")))?;
        let entries = rows
            .into_iter()
            .map(|r| pb::LedgerEntry { seq: r.seq, at: r.at, bucket: r.bucket, amount_cents: r.amount, reason: r.reason })
            .collect();
        Ok(Response::new(pb::StatementReply { entries }))
    }

    async fn web_token(&self, req: Request<pb::WebTokenRequest>) -> Result<Response<pb::WebTokenReply>, Status> {
        let c = self.caller(&req)?;
        let token = new_token();
        let token_hash = hash_token(&token);
        self.call(move |core| {
            let at = core.now();
            core.record(Record::WebTokenIssued { token_hash, account: c.account, node: c.node, at });
        })
        .await?;
        Ok(Response::new(pb::WebTokenReply { token }))
    }

    async fn place_buy(&self, req: Request<pb::PlaceBuyRequest>) -> Result<Response<pb::OrderReply>, Status> {
        let c = self.caller(&req)?;
        Ok(Response::new(self.place_buy_as(c, req.into_inner()).await?))
    }

    async fn place_sell(&self, req: Request<pb::PlaceSellRequest>) -> Result<Response<pb::OrderReply>, Status> {
        let c = self.caller(&req)?;
        Ok(Response::new(self.place_sell_as(c, req.into_inner()).await?))
    }

    async fn cancel_order(&self, req: Request<pb::CancelOrderRequest>) -> Result<Response<pb::CancelReply>, Status> {
        let c = self.caller(&req)?;
        self.cancel_order_as(c, OrderId(req.into_inner().order)).await?;
        Ok(Response::new(pb::CancelReply {}))
    }

    type PlaceOrdersStream = OrderAcks;

    async fn place_orders(&self, req: Request<Streaming<pb::OrderEntry>>) -> Result<Response<Self::PlaceOrdersStream>, Status> {
        let (_, fingerprint) = self.identify(&req)?;
        Ok(Response::new(crate::order_entry::serve(self.0.clone(), fingerprint, req.into_inner())))
    }

    async fn list_orders(&self, req: Request<pb::ListOrdersRequest>) -> Result<Response<pb::ListOrdersReply>, Status> {
        let c = self.caller(&req)?;
        let mut orders = self
            .call(move |core| {
                let m = &core.state.market;
                let buys = m.buy_orders().filter(|o| o.account == c.account).map(|o| pb::Order {
                    id: o.id.0,
                    side: "buy".into(),
                    price: o.max_price(),
                    placed_at: o.placed_at,
                    open: o.open,
                    leased: o.leases.len() as u32,
                    requirements: Some(requirements_to(&o.request.requirements)),
                    slot: None,
                    withdrawn: false,
                    kind_asks: Vec::new(),
                });
                let sells = m.sell_orders().filter(|o| o.account == c.account).map(|o| pb::Order {
                    id: o.id.0,
                    side: "sell".into(),
                    price: o.ask,
                    placed_at: o.placed_at,
                    open: o.is_resting() as u32,
                    leased: o.lease.is_some() as u32,
                    requirements: None,
                    slot: Some(slot_to(&o.slot)),
                    withdrawn: o.withdrawn,
                    kind_asks: kind_asks_to(&o.kind_asks),
                });
                buys.chain(sells).collect::<Vec<_>>()
            })
            .await?;
        orders.sort_by_key(|o| o.id);
        Ok(Response::new(pb::ListOrdersReply { orders }))
    }

    async fn book_depth(&self, req: Request<pb::BookDepthRequest>) -> Result<Response<pb::BookDepthReply>, Status> {
        self.caller(&req)?;
        let kind = kind_from(req.into_inner().kind)?;
        let (asks, bids) = self.call(move |core| (core.state.market.asks().depth(kind), core.state.market.bids().depth(kind))).await?;
        let level = |(price, cpus): (u64, u32)| pb::PriceLevel { price, cpus };
        Ok(Response::new(pb::BookDepthReply {
            asks: asks.into_iter().map(level).collect(),
            bids: bids.into_iter().map(level).collect(),
        }))
    }

    type TradesStream = Stream_<pb::Trade>;

    async fn trades(&self, req: Request<pb::TradesRequest>) -> Result<Response<Self::TradesStream>, Status> {
        self.caller(&req)?;
        Ok(Response::new(notice_stream(self.subscribe(), |n| match *n {
            Notice::Trade { lease, price, at, kinds, .. } => Some(pb::Trade { lease: lease.0, price, at, kinds: kinds_to(kinds) }),
            _ => None,
        })))
    }

    async fn list_leases(&self, req: Request<pb::ListLeasesRequest>) -> Result<Response<pb::ListLeasesReply>, Status> {
        let c = self.caller(&req)?;
        let mut leases = self
            .call(move |core| {
                core.state
                    .market
                    .leases()
                    .filter_map(|l| {
                        if l.buyer == c.account {
                            Some(lease_to(&l, "buyer"))
                        } else if l.seller == c.account {
                            Some(lease_to(&l, "seller"))
                        } else {
                            None
                        }
                    })
                    .collect::<Vec<_>>()
            })
            .await?;
        leases.sort_by_key(|l| l.id);
        Ok(Response::new(pb::ListLeasesReply { leases }))
    }

    async fn cancel_lease(&self, req: Request<pb::CancelLeaseRequest>) -> Result<Response<pb::CancelReply>, Status> {
        let c = self.caller(&req)?;
        let lease = LeaseId(req.into_inner().lease);
        self.call(move |core| {
            let now = core.now();
            core.state.market.cancel_lease(c.account, lease, now).map_err(market_error)
        })
        .await??;
        Ok(Response::new(pb::CancelReply {}))
    }

    type LeaseEventsStream = Stream_<pb::LeaseEvent>;

    async fn lease_events(&self, req: Request<pb::LeaseEventsRequest>) -> Result<Response<Self::LeaseEventsStream>, Status> {
        let c = self.caller(&req)?;
        // While the stream is open the account's buyer is there (for its watched orders).
        let watching = Watching::start(self.engine.shared.clone(), c.account);
        Ok(Response::new(notice_stream(self.subscribe(), move |n| match *n {
            Notice::Lease { parties, lease, kind, at, reason, charged }
                if parties.buyer == c.account || parties.seller == c.account =>
            {
                let _ = &watching;
                Some(pb::LeaseEvent {
                    lease: lease.0,
                    kind: kind.into(),
                    at,
                    reason: reason.map(reason_to).unwrap_or_default(),
                    charged_cents: charged,
                })
            }
            _ => None,
        })))
    }

    async fn probe_inbound(&self, req: Request<pb::ProbeInboundRequest>) -> Result<Response<pb::ProbeInboundReply>, Status> {
        let c = self.caller(&req)?;
        let seen = req.remote_addr();
        let endpoint = resolve_endpoint(&req.into_inner().endpoint, seen)?;
        let probe = self.networks.probe(c.node, endpoint)?;
        Ok(Response::new(pb::ProbeInboundReply { probe, endpoint: endpoint.to_string() }))
    }

    async fn confirm_inbound(&self, req: Request<pb::ConfirmInboundRequest>) -> Result<Response<pb::ConfirmInboundReply>, Status> {
        let c = self.caller(&req)?;
        let r = req.into_inner();
        self.networks.confirm(c.node, r.probe, &r.token)?;
        Ok(Response::new(pb::ConfirmInboundReply {}))
    }

    type JoinNetworkStream = Stream_<pb::NetworkView>;

    async fn join_network(&self, req: Request<pb::JoinNetworkRequest>) -> Result<Response<Self::JoinNetworkStream>, Status> {
        use prost::Message;
        use tokio_stream::StreamExt;
        let c = self.caller(&req)?;
        let seen = req.remote_addr();
        let r = req.into_inner();
        let (order, lease) = (r.order, r.lease);
        let allowed = self
            .call(move |core| {
                let m = &core.state.market;
                if lease == 0 {
                    m.buy_order(OrderId(order)).is_some_and(|o| o.account == c.account)
                } else {
                    m.lease(LeaseId(lease)).is_some_and(|l| l.buy == OrderId(order) && l.node == c.node)
                }
            })
            .await?;
        if !allowed {
            return Err(Status::permission_denied(format!("only the buyer of order {order} and the sellers of its leases may join its network")));
        }
        let key = r.key.ok_or_else(|| Status::invalid_argument("the network key's signed statement is missing"))?;
        crate::pki::verify_statement(self.authority.cert_der(), &key.certificate, c.node.0, VNET_KEY_STATEMENT, &key.statement, &key.signature).map_err(Status::permission_denied)?;
        let stated = pb::VnetKey::decode(key.statement.as_slice()).map_err(|e| Status::invalid_argument(format!("the key statement is malformed: {e}")))?;
        if stated.order != order || stated.public != r.public || r.public.len() != 32 {
            return Err(Status::invalid_argument("the key statement is for another network or another key"));
        }
        let endpoint = resolve_endpoint(&r.endpoint, seen)?;
        let member = pb::NetworkMember { node: c.node.0, public: r.public, key: Some(key), endpoint: endpoint.to_string(), lease, ..Default::default() };
        let (id, views) = self.networks.join(order, member, r.probe, lease == 0, r.rejoin_as);
        let psk = self.networks.psk(order);
        let leave = Leave { networks: self.networks.clone(), order, id };
        let stream = tokio_stream::wrappers::WatchStream::new(views).map(move |members| {
            let _ = &leave;
            Ok(view(psk, id, members))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    type SellerSessionStream = Stream_<pb::SessionMessage>;

    async fn seller_session(
        &self,
        req: Request<Streaming<pb::SellerMessage>>,
    ) -> Result<Response<Self::SellerSessionStream>, Status> {
        let c = self.caller(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the session closed before registering"))?;
        let Some(pb::seller_message::Body::Register(register)) = first.body else {
            return Err(Status::invalid_argument("a seller session starts with Register"));
        };
        let mut offers = register
            .slots
            .iter()
            .map(|o| Ok(SellRequest { node: c.node, slot: slot_from(o.slot.clone())?, ask: o.ask, kind_asks: kind_asks_from(&o.kind_asks)? }))
            .collect::<Result<Vec<_>, Status>>()?;
        // Inbound UDP is what the exchange saw, not what a node says.
        let takes_inbound = self.networks.takes_inbound(c.node);
        for o in &mut offers {
            o.slot.inbound_udp &= takes_inbound;
        }
        if offers.len() > 1024 {
            return Err(Status::invalid_argument("a node offers at most 1,024 slots"));
        }
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let (mail_tx, mut mail_rx) = mpsc::channel(256);
        let kernel = register.kernel.clone();
        let registered = self
            .call(move |core| register_seller(core, c, session, mail_tx, &kernel, offers))
            .await??;
        self.engine.shared.heard_from(c.node);

        let (out, out_rx) = mpsc::channel::<Result<pb::SessionMessage, Status>>(64);
        let _ = out.send(Ok(message(pb::session_message::Body::Registered(registered)))).await;
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    msg = inbound.message() => {
                        let body = match msg {
                            Ok(Some(m)) => m.body,
                            _ => break,
                        };
                        api.engine.shared.heard_from(c.node);
                        if let Err(status) = api.seller_says(c, body).await {
                            let error = pb::SessionError { message: status.message().to_string() };
                            if out.send(Ok(message(pb::session_message::Body::Error(error)))).await.is_err() {
                                break;
                            }
                        }
                    }
                    mail = mail_rx.recv() => {
                        let Some(mail) = mail else {
                            // The engine let go of this session: revoked, replaced or lost.
                            let _ = out.send(Err(Status::aborted("session closed by the exchange; reconnect"))).await;
                            break;
                        };
                        if out.send(Ok(message(to_session(mail)))).await.is_err() {
                            break;
                        }
                    }
                }
            }
            api.engine.shared.close_session(c.node, session);
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }

    type RelayStream = Stream_<pb::RelayFrame>;

    async fn relay(&self, req: Request<Streaming<pb::RelayFrame>>) -> Result<Response<Self::RelayStream>, Status> {
        let (c, fp) = self.identify(&req)?;
        let mut inbound = req.into_inner();
        let first = inbound.message().await?.ok_or_else(|| Status::invalid_argument("the relay closed before naming a lease"))?;
        let lease = LeaseId(first.lease);
        let side = self
            .call(move |core| match core.state.market.lease(lease) {
                Some(l) if l.buyer == c.account => Some(crate::relay::Side::Buyer),
                Some(l) if l.node == c.node => Some(crate::relay::Side::Seller),
                _ => None,
            })
            .await?
            .ok_or_else(|| Status::not_found(format!("{lease} is not a live lease of yours")))?;
        let stream = self.relays.join(lease, side, first.data, inbound, self.engine.shared.clone(), fp);
        Ok(Response::new(stream))
    }
}

impl Api {
    /// A message from a seller's session, other than Register.
    async fn seller_says(&self, c: Caller, body: Option<pb::seller_message::Body>) -> Result<(), Status> {
        use pb::seller_message::Body;
        match body {
            Some(Body::Heartbeat(_)) => Ok(()),
            Some(Body::Ready(r)) => self
                .call(move |core| {
                    let now = core.now();
                    core.state.market.lease_ready(c.account, LeaseId(r.lease), now).map_err(market_error)
                })
                .await?,
            Some(Body::Ended(e)) => self
                .call(move |core| {
                    let now = core.now();
                    core.state.market.release_lease(c.account, LeaseId(e.lease), now).map_err(market_error)
                })
                .await?,
            Some(Body::Register(_)) => Err(Status::invalid_argument("already registered: to change slots, reconnect")),
            None => Err(Status::invalid_argument("an empty seller message")),
        }
    }
}

/// (Re)registers a seller node: its resting slots are replaced by the new offer,
/// its leases carry on, and the engine sends it their news from now on.
fn register_seller(
    core: &mut Core,
    c: Caller,
    session: u64,
    mailbox: mpsc::Sender<ToSeller>,
    kernel: &str,
    offers: Vec<SellRequest>,
) -> Result<pb::Registered, Status> {
    if let Some(prefix) = core.state.registry.refuses_kernel(kernel) {
        return Err(Status::failed_precondition(format!(
            "this exchange refuses sellers on kernel {kernel} (listed as vulnerable: {prefix}*); upgrade the kernel"
        )));
    }
    let now = core.now();
    let m = &mut core.state.market;
    let mut resting: Vec<OrderId> =
        m.sell_orders().filter(|o| o.node == c.node && o.is_resting()).map(|o| o.id).collect();
    resting.sort_unstable();
    for order in resting {
        m.cancel_sell(c.account, order, now).map_err(market_error)?;
    }
    let mut orders = Vec::new();
    for offer in offers {
        orders.push(m.place_sell(c.account, offer, now).map_err(market_error)?.0);
    }
    let mut leases: Vec<pb::LeaseAssigned> = m
        .leases()
        .filter(|l| l.node == c.node)
        .map(|l| pb::LeaseAssigned { lease: l.id.0, sell_order: l.sell.0, price: l.price, period_secs: l.period, ready_by: l.deadline, buyer_account: l.buyer.0 })
        .collect();
    leases.sort_by_key(|l| l.lease);
    core.open_session(c.node, session, mailbox);
    Ok(pb::Registered { orders, leases })
}

fn message(body: pb::session_message::Body) -> pb::SessionMessage {
    pb::SessionMessage { body: Some(body) }
}

fn to_session(m: ToSeller) -> pb::session_message::Body {
    match m {
        ToSeller::Assigned { lease, sell, price, period, ready_by, buyer } => pb::session_message::Body::LeaseAssigned(pb::LeaseAssigned {
            lease: lease.0,
            sell_order: sell.0,
            price,
            period_secs: period,
            ready_by,
            buyer_account: buyer,
        }),
        ToSeller::Closed { lease, reason } => {
            pb::session_message::Body::LeaseClosed(pb::LeaseClosed { lease: lease.0, reason: reason_to(reason) })
        }
    }
}

pub fn hash_token(token: &str) -> String {
    Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl Admin for Handler {
    async fn create_account(&self, req: Request<pb::CreateAccountRequest>) -> Result<Response<pb::CreateAccountReply>, Status> {
        self.admin(&req)?;
        let name = req.into_inner().name;
        if name.is_empty() || name.len() > 64 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-@".contains(c)) {
            return Err(Status::invalid_argument(format!(
                "{name:?} is not a valid account name: 1 to 64 letters, digits, '.', '_', '-' or '@'"
            )));
        }
        let token = new_token();
        let token_hash = hash_token(&token);
        let account = self
            .call(move |core| {
                if core.state.registry.account_named(&name).is_some() {
                    return Err(Status::already_exists(format!("an account named {name:?} already exists")));
                }
                let account = core.state.registry.next_account();
                let at = core.now();
                core.record(Record::AccountCreated { account, name, at });
                core.state.market.open_account(account, at).map_err(market_error)?;
                core.record(Record::TokenIssued { token_hash, account, at });
                Ok(account)
            })
            .await??;
        Ok(Response::new(pb::CreateAccountReply { account: account.0, token }))
    }

    async fn deposit(&self, req: Request<pb::DepositRequest>) -> Result<Response<pb::DepositReply>, Status> {
        self.admin(&req)?;
        let r = req.into_inner();
        let account = AccountId(r.account);
        let available = self
            .call(move |core| {
                let now = core.now();
                core.state.market.deposit(account, r.amount_cents, now).map_err(market_error)?;
                Ok::<_, Status>(core.state.market.balance(account).unwrap_or_default().available)
            })
            .await??;
        Ok(Response::new(pb::DepositReply { available_cents: available }))
    }

    async fn revoke_node(&self, req: Request<pb::RevokeNodeRequest>) -> Result<Response<pb::RevokeNodeReply>, Status> {
        let c = self.caller(&req)?;
        let node = NodeId(req.into_inner().node);
        self.call(move |core| {
            let info = core.state.registry.nodes.get(&node).filter(|n| c.admin || n.account == c.account);
            let Some(info) = info else {
                return Err(Status::not_found(format!("{node} is not a node of your account")));
            };
            if info.revoked {
                return Err(Status::failed_precondition(format!("{node} is already revoked")));
            }
            let at = core.now();
            core.record(Record::NodeRevoked { node, at });
            Ok(())
        })
        .await??;
        Ok(Response::new(pb::RevokeNodeReply {}))
    }

    async fn halt(&self, req: Request<pb::HaltRequest>) -> Result<Response<pb::HaltReply>, Status> {
        self.admin(&req)?;
        let ended = self
            .call(|core| {
                let now = core.now();
                core.state.market.halt(now).map_err(market_error)
            })
            .await??;
        tracing::warn!(leases = ended.len(), "the exchange is halted");
        Ok(Response::new(pb::HaltReply { leases_ended: ended.len() as u32 }))
    }

    async fn resume(&self, req: Request<pb::ResumeRequest>) -> Result<Response<pb::ResumeReply>, Status> {
        self.admin(&req)?;
        self.call(|core| {
            let now = core.now();
            core.state.market.resume(now).map_err(market_error)
        })
        .await??;
        tracing::warn!("the exchange resumed");
        Ok(Response::new(pb::ResumeReply {}))
    }

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<pb::AuditReply>, Status> {
        self.admin(&req)?;
        let reply = self
            .call(|core| {
                let m = &core.state.market;
                let problem = m.check_invariants().err();
                pb::AuditReply {
                    ok: problem.is_none(),
                    problem: problem.unwrap_or_default(),
                    world_cents: m.world(),
                    fees_cents: m.fees(),
                    accounts: m.accounts().count() as u64,
                    sell_orders: m.sell_orders().count() as u64,
                    buy_orders: m.buy_orders().count() as u64,
                    leases: m.leases().count() as u64,
                    events: core.state.seq,
                }
            })
            .await?;
        Ok(Response::new(reply))
    }

    async fn set_refused_kernels(
        &self,
        req: Request<pb::SetRefusedKernelsRequest>,
    ) -> Result<Response<pb::SetRefusedKernelsReply>, Status> {
        self.admin(&req)?;
        let prefixes = req.into_inner().prefixes;
        if prefixes.iter().any(|p| p.is_empty() || p.len() > 64) {
            return Err(Status::invalid_argument("kernel prefixes are 1 to 64 characters (an empty one would refuse every kernel)"));
        }
        self.call(move |core| {
            let at = core.now();
            core.record(Record::RefusedKernels { prefixes, at });
        })
        .await?;
        Ok(Response::new(pb::SetRefusedKernelsReply {}))
    }
}

/// 256 random bits in hex: safe to paste into a shell and never mistaken
/// for a flag (base64 tokens could begin with '-').
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
