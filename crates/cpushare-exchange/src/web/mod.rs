//! The exchange's web dashboard, served by the exchange process (axum): the
//! live market for everyone (order book per market as a depth chart and a
//! table, recent trades, price per hour, sellers online and idle MFLOPS),
//! and, for an account signed in with a token from `cpushare web-token`,
//! its balance, open orders (cancelled from the page), leases, statement and
//! monthly invoices (HTML and PDF). Pages are rendered here; a little script
//! refetches their live part when the exchange's event stream says so. The
//! JSON endpoints behind the pages are described in `/api/openapi.json`.

mod history;
mod invoice;
mod page;
mod view;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use cpushare_market::{AccountId, OrderId, SandboxKind};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::broadcast;

use crate::engine::{Engine, Notice};
use history::History;

/// The session cookie: the sign-in token itself (only its hash is kept here).
const COOKIE: &str = "cpushare_session";
/// The largest form or body the dashboard takes.
const MAX_BODY: usize = 4096;

struct Web {
    engine: Engine,
    history: Mutex<History>,
}

type Shared = Arc<Web>;

/// A running dashboard.
pub struct WebListening {
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebListening {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the dashboard for `engine` on `listen` (port 0 picks one).
pub async fn serve(engine: Engine, listen: SocketAddr) -> anyhow::Result<WebListening> {
    let web = Arc::new(Web { engine: engine.clone(), history: Mutex::new(History::default()) });
    // The tape from now on; before that, the trades in the log's last records.
    // (A trade both heard and read is kept once.)
    let mut notices = engine.shared.notices.subscribe();
    for (lease, price, at, market) in past_trades(&engine).await? {
        web.history.lock().unwrap().record(lease, price, at, market);
    }
    let weak = Arc::downgrade(&web);
    tokio::spawn(async move {
        loop {
            match notices.recv().await {
                Ok(n) => {
                    let Some(web) = weak.upgrade() else { break };
                    if let Notice::Trade { lease, price, at, market, .. } = *n {
                        web.history.lock().unwrap().record(lease.0, price, at, market);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break,
            }
        }
    });
    let app = router(web);
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {listen} for the dashboard: {e}"))?;
    let addr = listener.local_addr()?;
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!("the dashboard stopped: {e}");
        }
    });
    tracing::info!(%addr, "dashboard listening");
    Ok(WebListening { addr, task })
}

/// How far back the tape is read from the log at start.
const PAST_RECORDS: u64 = 2_000_000;

/// Trades (lease, price, time, market) in the log's last [`PAST_RECORDS`] records.
async fn past_trades(engine: &Engine) -> anyhow::Result<Vec<(u64, u64, u64, Option<SandboxKind>)>> {
    use crate::state::Record;
    use cpushare_market::Event;
    let store = &engine.shared.store;
    let from = store.last_seq().await?.saturating_sub(PAST_RECORDS);
    let mut kinds = std::collections::HashMap::new();
    let mut trades = Vec::new();
    store
        .for_each_record(from, |_, body| {
            // Only the two kinds of record that matter are parsed.
            if !body.contains("\"buy-placed\"") && !body.contains("\"lease-opened\"") {
                return Ok(());
            }
            match serde_json::from_str::<Record>(body) {
                Ok(Record::Market(Event::BuyPlaced { order, request, .. })) => {
                    kinds.insert(order, request.requirements.kind);
                }
                Ok(Record::Market(Event::LeaseOpened { lease, buy, price, at, .. })) => trades.push((lease.0, price, at, kinds.get(&buy).copied())),
                _ => {}
            }
            Ok(())
        })
        .await?;
    Ok(trades)
}

fn router(web: Shared) -> Router {
    Router::new()
        .route("/", get(market_page))
        .route("/fragment/market", get(market_fragment))
        .route("/events", get(public_events))
        .route("/signin", get(signin_page).post(signin))
        .route("/signout", post(signout))
        .route("/account", get(account_page))
        .route("/fragment/account", get(account_fragment))
        .route("/account/events", get(account_events))
        .route("/account/orders/{id}/cancel", post(cancel_order))
        .route("/account/invoice/{month}", get(invoice_page))
        .route("/api/openapi.json", get(openapi))
        .route("/api/book", get(api_book))
        .route("/api/trades", get(api_trades))
        .route("/api/history", get(api_history))
        .route("/api/capacity", get(api_capacity))
        .route("/api/account", get(api_account))
        .route("/api/account/orders", get(api_orders))
        .route("/api/account/leases", get(api_leases))
        .route("/api/account/statement", get(api_statement))
        .route("/api/account/invoice/{month}", get(api_invoice))
        .route("/app.js", get(|| async { ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("app.js")) }))
        .route("/app.css", get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("app.css")) }))
        .fallback(|| async { Failure::NotFound("There is no such page here.".into()).page() })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::map_response(secure))
        .with_state(web)
}

/// Every answer: no framing by other sites, scripts and styles from here only.
async fn secure(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static("default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("same-origin"));
    // An oversized body (DefaultBodyLimit) is told as much, in words.
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        return (StatusCode::PAYLOAD_TOO_LARGE, Html(page::layout("Too large", None, None, &page::message("Too large", &format!("This exchange takes at most {MAX_BODY} bytes in a form or request body; nothing was changed."))))).into_response();
    }
    r
}

/// What went wrong, as a page or as JSON.
enum Failure {
    /// No valid sign-in.
    SignIn(String),
    NotFound(String),
    BadRequest(String),
    Forbidden(String),
    Unavailable,
}

impl Failure {
    fn parts(&self) -> (StatusCode, &str, String) {
        match self {
            Failure::SignIn(m) => (StatusCode::UNAUTHORIZED, "Sign in", m.clone()),
            Failure::NotFound(m) => (StatusCode::NOT_FOUND, "Not found", m.clone()),
            Failure::BadRequest(m) => (StatusCode::BAD_REQUEST, "Bad request", m.clone()),
            Failure::Forbidden(m) => (StatusCode::FORBIDDEN, "Refused", m.clone()),
            Failure::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "Unavailable", "The exchange is stopping; try again in a moment.".into()),
        }
    }

    fn page(self) -> Response {
        let (code, title, text) = self.parts();
        (code, Html(page::layout(title, None, None, &page::message(title, &text)))).into_response()
    }

    fn json(self) -> Response {
        let (code, _, text) = self.parts();
        (code, Json(serde_json::json!({ "error": text }))).into_response()
    }
}

impl From<crate::engine::Stopped> for Failure {
    fn from(_: crate::engine::Stopped) -> Failure {
        Failure::Unavailable
    }
}

/// The sign-in token a request carries: its cookie, or `Authorization: Bearer`.
fn token(headers: &HeaderMap) -> Option<String> {
    if let Some(b) = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) {
        return Some(b.trim().to_string());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(&format!("{COOKIE}=")).map(str::to_string))
}

async fn who(web: &Web, headers: &HeaderMap) -> Result<AccountId, Failure> {
    let t = token(headers).ok_or_else(|| Failure::SignIn("Sign in first: this page is an account's.".into()))?;
    // Tokens are 64 hex digits; anything else is not looked up.
    if t.len() != 64 || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure::SignIn("That is not a sign-in token (64 hex digits from `cpushare web-token`).".into()));
    }
    view::signed_in(&web.engine, &t).await?.ok_or_else(|| Failure::SignIn("That token does not sign in to any account here: make a new one with `cpushare web-token`.".into()))
}

#[derive(Deserialize)]
struct MarketQuery {
    market: Option<String>,
}

fn market_of(q: &MarketQuery) -> Result<SandboxKind, Failure> {
    match q.market.as_deref() {
        None | Some("") => Ok(SandboxKind::SeccompStrict),
        Some(m) => view::market_named(m).ok_or_else(|| Failure::BadRequest(format!("{m:?} is not a market: seccomp-strict, seccomp-emulated, vm-kvm or vm-tcg"))),
    }
}

async fn market_html(web: &Web, market: SandboxKind) -> Result<String, Failure> {
    let book = view::book(&web.engine, market).await?;
    let cap = view::capacity(&web.engine).await?;
    let (trades, hours) = {
        let h = web.history.lock().unwrap();
        (h.recent(30), h.hours(market))
    };
    Ok(page::market(&book, &trades, &hours, &cap))
}

async fn signed_in_name(web: &Web, headers: &HeaderMap) -> Option<String> {
    let account = who(web, headers).await.ok()?;
    view::account(&web.engine, account).await.ok().map(|a| a.name)
}

async fn market_page(State(web): State<Shared>, headers: HeaderMap, Query(q): Query<MarketQuery>) -> Response {
    let market = match market_of(&q) {
        Ok(m) => m,
        Err(e) => return e.page(),
    };
    match market_html(&web, market).await {
        Ok(live) => {
            let body = format!(r#"<h1>The market</h1>{}<div id="live" data-src="/fragment/market?market={}">{live}</div>"#, page::market_tabs(market), market.name());
            Html(page::layout("Market", signed_in_name(&web, &headers).await.as_deref(), Some("/events"), &body)).into_response()
        }
        Err(e) => e.page(),
    }
}

async fn market_fragment(State(web): State<Shared>, Query(q): Query<MarketQuery>) -> Response {
    match market_of(&q) {
        Ok(m) => match market_html(&web, m).await {
            Ok(h) => Html(h).into_response(),
            Err(e) => e.page(),
        },
        Err(e) => e.page(),
    }
}

/// Server-sent events: `trade` (JSON of the trade) whenever one happens; for
/// an account's stream, `lease` for each of its leases' events.
fn events(web: &Web, account: Option<AccountId>) -> Sse<impl futures::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let rx = web.engine.shared.notices.subscribe();
    let stream = tokio_stream::wrappers::BroadcastStream::new(rx).filter_map(move |n| async move {
        let n = n.ok()?;
        match (&*n, account) {
            (Notice::Trade { lease, price, at, market, .. }, None) => {
                let data = serde_json::json!({ "lease": lease.0, "price": price, "at": at, "market": market.map(|k| k.name()) });
                Some(Ok(SseEvent::default().event("trade").data(data.to_string())))
            }
            (Notice::Lease { parties, lease, kind, at, .. }, Some(a)) if parties.buyer == a || parties.seller == a => {
                let data = serde_json::json!({ "lease": lease.0, "kind": kind, "at": at });
                Some(Ok(SseEvent::default().event("lease").data(data.to_string())))
            }
            _ => None,
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

async fn public_events(State(web): State<Shared>) -> impl IntoResponse {
    events(&web, None)
}

async fn account_events(State(web): State<Shared>, headers: HeaderMap) -> Response {
    match who(&web, &headers).await {
        Ok(a) => events(&web, Some(a)).into_response(),
        Err(e) => e.json(),
    }
}

async fn signin_page() -> Html<String> {
    Html(page::layout("Sign in", None, None, &page::signin(None)))
}

#[derive(Deserialize)]
struct SignIn {
    token: String,
}

async fn signin(State(web): State<Shared>, Form(f): Form<SignIn>) -> Response {
    let t = f.token.trim().to_string();
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&format!("Bearer {t}")) {
        headers.insert(header::AUTHORIZATION, v);
    }
    match who(&web, &headers).await {
        Ok(_) => {
            let cookie = format!("{COOKIE}={t}; Path=/; HttpOnly; SameSite=Strict; Max-Age=2592000");
            ([(header::SET_COOKIE, cookie)], Redirect::to("/account")).into_response()
        }
        Err(Failure::SignIn(m)) => (StatusCode::UNAUTHORIZED, Html(page::layout("Sign in", None, None, &page::signin(Some(&m))))).into_response(),
        Err(e) => e.page(),
    }
}

async fn signout() -> Response {
    ([(header::SET_COOKIE, format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"))], Redirect::to("/")).into_response()
}

async fn account_html(web: &Web, account: AccountId) -> Result<(String, String), Failure> {
    let a = view::account(&web.engine, account).await?;
    let orders = view::orders(&web.engine, account).await?;
    let leases = view::leases(&web.engine, account).await?;
    let statement = web.engine.shared.store.statement(account.0, 0, 50).await.map_err(|_| Failure::Unavailable)?;
    let mut months: Vec<String> = statement.iter().map(|r| invoice::month_of(r.at)).collect();
    months.dedup();
    let now = invoice::month_of(crate::engine::now_secs());
    if !months.contains(&now) {
        months.insert(0, now);
    }
    Ok((a.name.clone(), page::account(&a, &orders, &leases, &statement, &months)))
}

async fn account_page(State(web): State<Shared>, headers: HeaderMap) -> Response {
    let account = match who(&web, &headers).await {
        Ok(a) => a,
        Err(Failure::SignIn(_)) => return Redirect::to("/signin").into_response(),
        Err(e) => return e.page(),
    };
    match account_html(&web, account).await {
        Ok((name, live)) => {
            let body = format!(r#"<h1>Account {}</h1><div id="live" data-src="/fragment/account">{live}</div>"#, page::esc(&name));
            Html(page::layout("Account", Some(&name), Some("/account/events"), &body)).into_response()
        }
        Err(e) => e.page(),
    }
}

async fn account_fragment(State(web): State<Shared>, headers: HeaderMap) -> Response {
    match who(&web, &headers).await {
        Ok(a) => match account_html(&web, a).await {
            Ok((_, live)) => Html(live).into_response(),
            Err(e) => e.page(),
        },
        Err(e) => e.page(),
    }
}

/// A form posted from another site carries its own Origin: refused.
fn same_origin(headers: &HeaderMap) -> bool {
    let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else { return true };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
    origin.split_once("://").is_some_and(|(_, h)| h == host)
}

async fn cancel_order(State(web): State<Shared>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    if !same_origin(&headers) {
        return Failure::Forbidden("This form was sent from another site; nothing was changed.".into()).page();
    }
    let account = match who(&web, &headers).await {
        Ok(a) => a,
        Err(e) => return e.page(),
    };
    let Ok(order) = id.parse::<u64>() else {
        return Failure::BadRequest(format!("{id:?} is not an order number; nothing was changed.")).page();
    };
    match view::cancel(&web.engine, account, OrderId(order)).await {
        Ok(()) => Redirect::to("/account").into_response(),
        Err(view::CancelRefused::NotYours) => Failure::NotFound(format!("You have no order {order}; nothing was changed.")).page(),
        Err(view::CancelRefused::Other(m)) => Failure::BadRequest(format!("Order {order} was not cancelled: {m}")).page(),
        Err(view::CancelRefused::Stopped) => Failure::Unavailable.page(),
    }
}

async fn invoice_for(web: &Web, headers: &HeaderMap, month: &str) -> Result<invoice::Invoice, Failure> {
    let account = who(web, headers).await?;
    let name = view::account(&web.engine, account).await?.name;
    if invoice::month_bounds(month).is_none() {
        return Err(Failure::BadRequest(format!("{month:?} is not a month: use YYYY-MM, like 2026-12")));
    }
    invoice::invoice(&web.engine, account, name, month).await.map_err(|_| Failure::Unavailable)
}

async fn invoice_page(State(web): State<Shared>, headers: HeaderMap, Path(month): Path<String>) -> Response {
    let (month, pdf) = match month.strip_suffix(".pdf") {
        Some(m) => (m.to_string(), true),
        None => (month, false),
    };
    match invoice_for(&web, &headers, &month).await {
        Ok(inv) if pdf => {
            let name = format!("attachment; filename=\"cpushare-invoice-{}.pdf\"", inv.month);
            ([(header::CONTENT_TYPE, "application/pdf".to_string()), (header::CONTENT_DISPOSITION, name)], invoice::pdf(&inv)).into_response()
        }
        Ok(inv) => Html(page::layout(&format!("Invoice {}", inv.month), Some(&inv.name), None, &page::invoice(&inv))).into_response(),
        Err(Failure::SignIn(_)) => Redirect::to("/signin").into_response(),
        Err(e) => e.page(),
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}

fn json_or<T: serde::Serialize>(r: Result<T, Failure>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.json(),
    }
}

async fn api_book(State(web): State<Shared>, Query(q): Query<MarketQuery>) -> Response {
    let r = async { Ok(view::book(&web.engine, market_of(&q)?).await?) }.await;
    json_or(r)
}

async fn api_trades(State(web): State<Shared>) -> Response {
    Json(web.history.lock().unwrap().recent(200)).into_response()
}

async fn api_history(State(web): State<Shared>, Query(q): Query<MarketQuery>) -> Response {
    json_or(market_of(&q).map(|m| web.history.lock().unwrap().hours(m)))
}

async fn api_capacity(State(web): State<Shared>) -> Response {
    json_or(view::capacity(&web.engine).await.map_err(Failure::from))
}

async fn api_account(State(web): State<Shared>, headers: HeaderMap) -> Response {
    let r = async { Ok(view::account(&web.engine, who(&web, &headers).await?).await?) }.await;
    json_or(r)
}

async fn api_orders(State(web): State<Shared>, headers: HeaderMap) -> Response {
    let r = async { Ok(view::orders(&web.engine, who(&web, &headers).await?).await?) }.await;
    json_or(r)
}

async fn api_leases(State(web): State<Shared>, headers: HeaderMap) -> Response {
    let r = async { Ok(view::leases(&web.engine, who(&web, &headers).await?).await?) }.await;
    json_or(r)
}

#[derive(Deserialize)]
struct Page {
    /// Entries before this sequence number (0: the newest).
    before: Option<u64>,
    limit: Option<u32>,
}

async fn api_statement(State(web): State<Shared>, headers: HeaderMap, Query(p): Query<Page>) -> Response {
    let r = async {
        let account = who(&web, &headers).await?;
        let limit = p.limit.unwrap_or(100);
        if limit == 0 || limit > 10_000 {
            return Err(Failure::BadRequest("limit is 1 to 10,000 entries".into()));
        }
        let rows = web.engine.shared.store.statement(account.0, p.before.unwrap_or(0), limit).await.map_err(|_| Failure::Unavailable)?;
        Ok(rows
            .into_iter()
            .map(|r| serde_json::json!({ "seq": r.seq, "at": r.at, "bucket": r.bucket, "amount_cents": r.amount, "reason": r.reason }))
            .collect::<Vec<_>>())
    }
    .await;
    json_or(r)
}

async fn api_invoice(State(web): State<Shared>, headers: HeaderMap, Path(month): Path<String>) -> Response {
    json_or(invoice_for(&web, &headers, &month).await)
}
