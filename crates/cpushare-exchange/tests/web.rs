//! The web dashboard in a real browser: Debian's chromium, headless, driven
//! through chromedriver. Orders placed through the API show in the book, a
//! trade appears on the open page without a reload, an order cancelled from
//! the account page is gone, the invoice adds up to the ledger; bad input
//! (a wrong token, another account's order, an oversized form, a form from
//! another site) gets a clear answer and changes nothing. Each step saves a
//! screenshot under target/screenshots/.

mod common;

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{buy, Exchange};
use cpushare_proto::v1 as pb;
use fantoccini::{Client, ClientBuilder, Locator};
use tokio_stream::StreamExt;

fn screenshots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

async fn shot(browser: &Client, name: &str) {
    let png = browser.screenshot().await.unwrap();
    std::fs::write(screenshots().join(format!("web-{name}.png")), png).unwrap();
}

/// chromedriver on a free port, or None (said aloud) outside CI when chromium is missing.
fn chromedriver() -> Option<(std::process::Child, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    match std::process::Command::new("chromedriver").arg(format!("--port={port}")).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn() {
        Ok(child) if std::path::Path::new("/usr/bin/chromium").exists() => Some((child, port)),
        Ok(mut child) => {
            let _ = child.kill();
            assert!(std::env::var("CI").as_deref() != Ok("true"), "chromium is needed under CI (scripts/test installs it)");
            eprintln!("skipped: no chromium (scripts/test installs chromium and chromium-driver)");
            None
        }
        Err(e) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "chromedriver is needed under CI: {e}");
            eprintln!("skipped: no chromedriver ({e}); scripts/test installs chromium-driver");
            None
        }
    }
}

async fn browser(port: u16) -> Client {
    let mut caps = serde_json::Map::new();
    let args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1200,1600"];
    caps.insert("goog:chromeOptions".into(), serde_json::json!({ "binary": "/usr/bin/chromium", "args": args }));
    let url = format!("http://127.0.0.1:{port}");
    for _ in 0..50 {
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        if let Ok(c) = ClientBuilder::new(connector).capabilities(caps.clone()).connect(&url).await {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("chromedriver did not answer at {url}");
}

/// One plain HTTP/1.0 request: the status and the body as text.
fn http(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, String) {
    let (status, body) = http_bytes(addr, method, path, headers, body);
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// One plain HTTP/1.0 request: the status and the body.
fn http_bytes(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, String)], body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut req = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Length: {}\r\n", body.len());
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let split = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or(out.len());
    let status = String::from_utf8_lossy(&out[..split]).split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.get(split + 4..).unwrap_or_default().to_vec())
}

/// Waits up to `secs` for `css` to match on the page as it is (no reload).
async fn appears(browser: &Client, css: &str, secs: u64) -> bool {
    for _ in 0..secs * 10 {
        if browser.find(Locator::Css(css)).await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Waits up to `secs` for `css` to match nothing on the page.
async fn gone(browser: &Client, css: &str, secs: u64) -> bool {
    for _ in 0..secs * 10 {
        if browser.find(Locator::Css(css)).await.is_err() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}


#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dashboard_in_a_browser() {
    let Some((mut driver, driver_port)) = chromedriver() else { return };
    let mut ex = Exchange::start(|s| s.settle_every_secs = 1).await;
    let web = cpushare_exchange::web::serve(ex.running.engine.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let site = format!("http://{}", web.addr);
    let (_alice, mut a) = ex.member("alice", 10_000).await;
    let (bob, mut b) = ex.member("bob", 0).await;

    // Bob's node offers two slots at 36.00 EUR per CPU-hour (a cent a second).
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    let slot = pb::SlotAttributes { score: 2000, ram_mib: 2048, kinds: vec![pb::SandboxKind::SeccompStrict as i32], inbound_udp: false, latency_ms: 20 };
    let offers = (0..2).map(|_| pb::SlotOffer { slot: Some(slot.clone()), ask: 3600, kind_asks: vec![] }).collect();
    tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Register(pb::Register { kernel: "6.1.0".into(), seccomp_strict: true, slots: offers })) }).await.unwrap();
    let mut session = b.exchange.seller_session(tokio_stream::wrappers::ReceiverStream::new(rx)).await.unwrap().into_inner();
    let Some(pb::session_message::Body::Registered(_)) = session.next().await.unwrap().unwrap().body else { panic!("registered") };
    let heartbeat = tx.clone();
    let beats = tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            if heartbeat.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Heartbeat(pb::Heartbeat {})) }).await.is_err() {
                break;
            }
        }
    });

    let browser = browser(driver_port).await;
    // The public market: the book shows Bob's asks, the capacity his idle CPUs.
    browser.goto(&format!("{site}/?market=seccomp-strict")).await.unwrap();
    let asks = browser.find(Locator::Css("#asks")).await.unwrap().text().await.unwrap();
    assert!(asks.contains("3600") && asks.contains('2'), "{asks}");
    assert_eq!(browser.find(Locator::Css("#idle-slots")).await.unwrap().text().await.unwrap(), "2");
    assert_eq!(browser.find(Locator::Css("#idle-mflops")).await.unwrap().text().await.unwrap(), "4000");
    assert!(browser.find(Locator::Css("svg.chart polyline.asks")).await.is_ok(), "the depth chart draws the asks");
    shot(&browser, "1-book").await;

    // A trade, through the API: it shows on the open page, no reload.
    let placed = a.exchange.place_buy(buy(1, 4000)).await.unwrap().into_inner();
    let lease = placed.leases[0];
    assert!(appears(&browser, &format!("tr.trade[data-lease=\"{lease}\"]"), 10).await, "the trade did not show live");
    let asks = browser.find(Locator::Css("#asks")).await.unwrap().text().await.unwrap();
    assert!(asks.contains("3600 1"), "one slot left in the book: {asks}");
    shot(&browser, "2-trade-live").await;
    let Some(pb::session_message::Body::LeaseAssigned(_)) = session.next().await.unwrap().unwrap().body else { panic!("assigned") };
    tx.send(pb::SellerMessage { body: Some(pb::seller_message::Body::Ready(pb::Ready { lease })) }).await.unwrap();

    // Alice signs in with a token and sees her account.
    let token = a.exchange.web_token(pb::WebTokenRequest {}).await.unwrap().into_inner().token;
    browser.goto(&format!("{site}/signin")).await.unwrap();
    browser.find(Locator::Css("#token")).await.unwrap().send_keys("0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef").await.unwrap();
    browser.find(Locator::Css("#signin")).await.unwrap().click().await.unwrap();
    // (The answer is a new page: waited for, not raced.)
    assert!(appears(&browser, "#error", 10).await, "the wrong token's page");
    let error = browser.find(Locator::Css("#error")).await.unwrap().text().await.unwrap();
    assert!(error.contains("does not sign in"), "{error}");
    shot(&browser, "3-wrong-token").await;
    browser.find(Locator::Css("#token")).await.unwrap().send_keys(&token).await.unwrap();
    browser.find(Locator::Css("#signin")).await.unwrap().click().await.unwrap();
    assert!(appears(&browser, &format!("tr.lease[data-lease=\"{lease}\"]"), 5).await, "her lease on her account page");
    assert!(browser.find(Locator::Css(&format!("tr.order[data-order=\"{}\"]", placed.order))).await.is_ok());

    // An order that rests (nothing fits its price), then cancelled from the page.
    let resting = a.exchange.place_buy(buy(1, 100)).await.unwrap().into_inner().order;
    let row = format!("tr.order[data-order=\"{resting}\"]");
    assert!(appears(&browser, &row, 8).await, "the new order shows on the open page");
    shot(&browser, "4-account").await;
    // Bob may not cancel it: another account's order is "not yours", and stays.
    let bob_token = b.exchange.web_token(pb::WebTokenRequest {}).await.unwrap().into_inner().token;
    let bob_cookie = ("Cookie", format!("cpushare_session={bob_token}"));
    let (status, page) = http(web.addr, "POST", &format!("/account/orders/{resting}/cancel"), &[bob_cookie.clone()], b"");
    assert_eq!(status, 404, "{page}");
    assert!(page.contains(&format!("You have no order {resting}; nothing was changed.")), "{page}");
    // Nor may another site post the form for Alice.
    let alice_cookie = ("Cookie", format!("cpushare_session={token}"));
    let (status, _) = http(web.addr, "POST", &format!("/account/orders/{resting}/cancel"), &[alice_cookie.clone(), ("Origin", "http://evil.example".into())], b"");
    assert_eq!(status, 403);
    let orders = a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders;
    assert!(orders.iter().any(|o| o.id == resting), "still there after both refusals");
    browser.find(Locator::Css(&format!("#cancel-{resting}"))).await.unwrap().click().await.unwrap();
    assert!(gone(&browser, &row, 10).await, "the cancelled order is gone from the page");
    assert!(appears(&browser, "#orders", 5).await);
    let orders = a.exchange.list_orders(pb::ListOrdersRequest {}).await.unwrap().into_inner().orders;
    assert!(!orders.iter().any(|o| o.id == resting), "and from the exchange");
    shot(&browser, "5-cancelled").await;

    // A few metered seconds, then the lease ends; the invoice is the ledger's.
    tokio::time::sleep(Duration::from_secs(4)).await;
    a.exchange.cancel_order(pb::CancelOrderRequest { order: placed.order }).await.unwrap();
    let balance = a.exchange.balance(pb::BalanceRequest {}).await.unwrap().into_inner();
    assert_eq!(balance.escrow_cents, 0);
    let paid = 10_000 - balance.available_cents;
    assert!(paid > 0, "some seconds were metered");
    let statement = a.exchange.statement(pb::StatementRequest::default()).await.unwrap().into_inner().entries;
    let month = chrono::DateTime::from_timestamp(statement[0].at as i64, 0).unwrap().format("%Y-%m").to_string();
    browser.goto(&format!("{site}/account/invoice/{month}")).await.unwrap();
    let total = browser.find(Locator::Css("#total")).await.unwrap().attr("data-cents").await.unwrap().unwrap();
    assert_eq!(total.parse::<i64>().unwrap(), -paid, "the invoice adds up to what left her account");
    let lines = browser.find_all(Locator::Css("tr.line")).await.unwrap();
    assert_eq!(lines.len(), 1, "one line: her one lease");
    assert!(lines[0].text().await.unwrap().starts_with(&format!("{lease} bought")));
    shot(&browser, "6-invoice").await;
    let (status, pdf) = http_bytes(web.addr, "GET", &format!("/account/invoice/{month}.pdf"), &[alice_cookie.clone()], b"");
    assert_eq!(status, 200);
    assert!(pdf.starts_with(b"%PDF-"));
    let euros = format!("{}.{:02}", paid / 100, paid % 100);
    assert!(String::from_utf8_lossy(&pdf).contains(&format!("Total: -{euros} EUR over 1 leases")), "the PDF says the same total");

    // Bad input, by hand.
    let (status, page) = http(web.addr, "POST", "/signin", &[("Content-Type", "application/x-www-form-urlencoded".into())], format!("token={}", "x".repeat(10_000)).as_bytes());
    assert_eq!(status, 413);
    assert!(page.contains("at most 4096 bytes"), "{page}");
    let (status, body) = http(web.addr, "GET", "/api/account", &[], b"");
    assert_eq!(status, 401);
    assert!(body.contains("\"error\""), "{body}");
    let (status, body) = http(web.addr, "GET", "/api/account", &[("Authorization", format!("Bearer {}", "f".repeat(64)))], b"");
    assert_eq!(status, 401, "{body}");
    let (status, body) = http(web.addr, "GET", "/api/book?market=nope", &[], b"");
    assert_eq!(status, 400);
    assert!(body.contains("not a market"), "{body}");
    let (status, _) = http(web.addr, "GET", "/account/invoice/../../etc", &[alice_cookie.clone()], b"");
    assert!(status == 400 || status == 404, "{status}");
    let (status, _) = http(web.addr, "POST", "/account/orders/abc/cancel", &[alice_cookie.clone()], b"");
    assert_eq!(status, 400);
    // Every documented endpoint answers with JSON.
    let (_, spec) = http(web.addr, "GET", "/api/openapi.json", &[], b"");
    let spec: serde_json::Value = serde_json::from_str(&spec).unwrap();
    for path in spec["paths"].as_object().unwrap().keys() {
        let path = path.replace("{month}", &month);
        let (status, body) = http(web.addr, "GET", &path, &[("Authorization", format!("Bearer {token}"))], b"");
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    }
    let audit = ex.admin.admin.audit(pb::AuditRequest {}).await.unwrap().into_inner();
    assert!(audit.ok, "{}", audit.problem);
    // Revoking Bob's node ends the dashboard sessions it asked for.
    let (status, _) = http(web.addr, "GET", "/api/account", &[bob_cookie.clone()], b"");
    assert_eq!(status, 200);
    ex.admin.admin.revoke_node(pb::RevokeNodeRequest { node: bob.node }).await.unwrap();
    let (status, body) = http(web.addr, "GET", "/api/account", &[bob_cookie.clone()], b"");
    assert_eq!(status, 401, "a revoked node's token still signs in: {body}");
    // A dashboard started later reads the tape back from the exchange's log.
    let later = cpushare_exchange::web::serve(ex.running.engine.clone(), "127.0.0.1:0".parse().unwrap()).await.unwrap();
    let (_, tape) = http(later.addr, "GET", "/api/trades", &[], b"");
    let tape: serde_json::Value = serde_json::from_str(&tape).unwrap();
    assert_eq!(tape[0]["lease"], lease, "{tape}");
    assert_eq!((tape[0]["price"].as_u64(), tape[0]["market"].as_str()), (Some(3600), Some("seccomp-strict")));
    let (_, hours) = http(later.addr, "GET", "/api/history?market=seccomp-strict", &[], b"");
    assert!(hours.contains("\"trades\":1"), "{hours}");

    browser.close().await.unwrap();
    let _ = driver.kill();
    beats.abort();
    drop(web);
    ex.running.listening.shutdown().await;
}
