//! The pages, rendered on the server: HTML with SVG charts. The live parts
//! are fragments the page's script fetches again when the exchange says
//! something changed.

use std::fmt::Write;

use cpushare_market::SandboxKind;

use super::history::{Hour, Trade};
use super::invoice::{cents, Invoice};
use super::view::{Account, Book, Capacity, Lease, Order};
use crate::store::LedgerRow;

/// Escapes text for HTML (element content and quoted attributes).
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn time(at: u64) -> String {
    chrono::DateTime::from_timestamp(at as i64, 0).map_or_else(|| at.to_string(), |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string())
}

/// A whole page: `live` names the fragment the script keeps fresh, if any.
pub fn layout(title: &str, signed_in: Option<&str>, live: Option<&str>, body: &str) -> String {
    let who = match signed_in {
        Some(name) => format!(r#"<a href="/account">{}</a> <form method="post" action="/signout" class="inline"><button>Sign out</button></form>"#, esc(name)),
        None => r#"<a href="/signin">Sign in</a>"#.into(),
    };
    let live = live.map_or(String::new(), |l| format!(r#" data-live="{}""#, esc(l)));
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title} · cpushare</title>
<link rel="stylesheet" href="/app.css"><script src="/app.js" defer></script></head>
<body{live}><header><a href="/" class="brand">cpushare</a> <nav><a href="/">Market</a> <a href="/api/openapi.json">API</a> {who}</nav></header>
<main>{body}</main></body></html>"#,
        title = esc(title)
    )
}

pub fn market_tabs(current: SandboxKind) -> String {
    let mut s = String::from(r#"<nav class="tabs">"#);
    for k in SandboxKind::ALL {
        let class = if k == current { r#" class="current""# } else { "" };
        let _ = write!(s, r#"<a href="/?market={0}"{class}>{0}</a> "#, k.name());
    }
    s.push_str("</nav>");
    s
}

/// The live part of the market page.
pub fn market(book: &Book, trades: &[Trade], hours: &[Hour], cap: &Capacity) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<section class="capacity"><p><b id="sellers-online">{}</b> sellers online · <b id="idle-slots">{}</b> idle CPUs · <b id="idle-mflops">{}</b> idle MFLOPS</p></section>"#,
        cap.sellers_online, cap.idle_slots, cap.idle_mflops
    );
    let _ = write!(s, r#"<section><h2>Order book: {}</h2>{}"#, esc(&book.market), depth_chart(book));
    s.push_str(r#"<div class="sides"><table id="asks"><caption>Asks (sellers)</caption><tr><th>cents/CPU-hour</th><th>CPUs</th></tr>"#);
    for l in &book.asks {
        let _ = write!(s, r#"<tr class="ask"><td>{}</td><td>{}</td></tr>"#, l.price, l.cpus);
    }
    if book.asks.is_empty() {
        s.push_str(r#"<tr><td colspan="2">none</td></tr>"#);
    }
    s.push_str(r#"</table><table id="bids"><caption>Bids (buyers)</caption><tr><th>cents/CPU-hour</th><th>CPUs</th></tr>"#);
    for l in &book.bids {
        let _ = write!(s, r#"<tr class="bid"><td>{}</td><td>{}</td></tr>"#, l.price, l.cpus);
    }
    if book.bids.is_empty() {
        s.push_str(r#"<tr><td colspan="2">none</td></tr>"#);
    }
    s.push_str("</table></div></section>");
    let _ = write!(s, r#"<section><h2>Price per hour</h2>{}</section>"#, history_chart(hours));
    s.push_str(r#"<section><h2>Recent trades</h2><table id="trades"><tr><th>time</th><th>market</th><th>lease</th><th>cents/CPU-hour</th></tr>"#);
    for t in trades {
        let _ = write!(s, r#"<tr class="trade" data-lease="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>"#, t.lease, time(t.at), esc(&t.market), t.lease, t.price);
    }
    if trades.is_empty() {
        s.push_str(r#"<tr><td colspan="4">no trades yet</td></tr>"#);
    }
    s.push_str("</table></section>");
    s
}

/// Cumulative CPUs against price: bids stepping down to the left of the
/// spread, asks stepping up to its right.
pub fn depth_chart(book: &Book) -> String {
    let (w, h, pad) = (600.0f64, 220.0f64, 30.0f64);
    let prices: Vec<u64> = book.asks.iter().chain(&book.bids).map(|l| l.price).collect();
    if prices.is_empty() {
        return r#"<svg class="chart" width="600" height="60" role="img" aria-label="empty book"><text x="10" y="35">The book is empty.</text></svg>"#.into();
    }
    // A tenth of the range (or of the price, for one level) either side, so that every step shows.
    let (min, max) = (*prices.iter().min().unwrap() as f64, *prices.iter().max().unwrap() as f64);
    let margin = ((max - min) / 10.0).max(min / 10.0).max(1.0);
    let (lo, hi) = ((min - margin).max(0.0), max + margin);
    let span = hi - lo;
    let total = |side: &[super::view::Level]| side.iter().map(|l| l.cpus as u64).sum::<u64>();
    let most = total(&book.asks).max(total(&book.bids)).max(1) as f64;
    let x = |p: u64| pad + (p as f64 - lo) / span * (w - 2.0 * pad);
    let y = |c: u64| h - pad - c as f64 / most * (h - 2.0 * pad);
    // Each side runs out to its edge of the chart at its whole depth.
    let steps = |side: &[super::view::Level], edge: f64| {
        let mut pts = String::new();
        let mut cum = 0u64;
        for l in side {
            let _ = write!(pts, "{:.1},{:.1} ", x(l.price), y(cum));
            cum += l.cpus as u64;
            let _ = write!(pts, "{:.1},{:.1} ", x(l.price), y(cum));
        }
        if cum > 0 {
            let _ = write!(pts, "{edge:.1},{:.1}", y(cum));
        }
        pts
    };
    format!(
        r#"<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="depth chart">
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" class="axis"/><text x="{pad}" y="{t}" class="label">{lo} ¢</text><text x="{r}" y="{t}" class="label" text-anchor="end">{hi} ¢</text>
<polyline points="{bids}" class="bids"/><polyline points="{asks}" class="asks"/><text x="{pad}" y="16" class="label">{most} CPUs</text></svg>"#,
        b = h - pad,
        r = w - pad,
        t = h - 8.0,
        lo = lo.round() as u64,
        hi = hi.round() as u64,
        most = most as u64,
        bids = steps(&book.bids, pad),
        asks = steps(&book.asks, w - pad),
    )
}

/// The hourly mean price as a line, with each hour's low-high as a bar.
pub fn history_chart(hours: &[Hour]) -> String {
    if hours.is_empty() {
        return r#"<svg class="chart" width="600" height="60" role="img" aria-label="no price history"><text x="10" y="35">No trades yet.</text></svg>"#.into();
    }
    let (w, h, pad) = (600.0f64, 200.0f64, 30.0f64);
    let (min, max) = (hours.iter().map(|x| x.low).min().unwrap() as f64, hours.iter().map(|x| x.high).max().unwrap() as f64);
    let margin = ((max - min) / 10.0).max(min / 10.0).max(1.0);
    let (lo, hi) = ((min - margin).max(0.0), max + margin);
    let span = hi - lo;
    // One hour sits in the middle.
    let n = hours.len().max(2) as f64 - 1.0;
    let single = hours.len() == 1;
    let x = |i: usize| if single { w / 2.0 } else { pad + i as f64 / n * (w - 2.0 * pad) };
    let y = |p: u64| h - pad - (p as f64 - lo) / span * (h - 2.0 * pad);
    let mut bars = String::new();
    let mut line = String::new();
    for (i, hr) in hours.iter().enumerate() {
        let _ = write!(bars, r#"<line x1="{0:.1}" y1="{1:.1}" x2="{0:.1}" y2="{2:.1}" class="range"/>"#, x(i), y(hr.low), y(hr.high));
        let _ = write!(line, "{:.1},{:.1} ", x(i), y(hr.average));
        let _ = write!(bars, r#"<circle cx="{:.1}" cy="{:.1}" r="3" class="point"><title>{} ¢ mean, {} trades</title></circle>"#, x(i), y(hr.average), hr.average, hr.trades);
    }
    format!(
        r#"<svg class="chart" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img" aria-label="price per hour">{bars}<polyline points="{line}" class="price"/>
<text x="{pad}" y="16" class="label">{hi} ¢</text><text x="{pad}" y="{t}" class="label">{lo} ¢ · {first} to {last}</text></svg>"#,
        t = h - 8.0,
        hi = hi.round() as u64,
        lo = lo.round() as u64,
        first = time(hours[0].hour),
        last = time(hours[hours.len() - 1].hour),
    )
}

pub fn signin(error: Option<&str>) -> String {
    let error = error.map_or(String::new(), |e| format!(r#"<p class="error" id="error">{}</p>"#, esc(e)));
    format!(
        r#"<h1>Sign in</h1>{error}<p>Make a token on any node of your account with <code>cpushare web-token</code>, and paste it here.</p>
<form method="post" action="/signin"><input name="token" id="token" size="70" autocomplete="off" required> <button id="signin">Sign in</button></form>"#
    )
}

/// The live part of the account page.
pub fn account(a: &Account, orders: &[Order], leases: &[Lease], statement: &[LedgerRow], months: &[String]) -> String {
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<section><h2>Balance</h2><p>Available <b id="available">{}</b> EUR · in escrow <b id="escrow">{}</b> EUR</p></section>"#,
        cents(a.available_cents),
        cents(a.escrow_cents)
    );
    s.push_str(r#"<section><h2>Open orders</h2><table id="orders"><tr><th>order</th><th>side</th><th>market</th><th>cents/CPU-hour</th><th>open</th><th>leased</th><th></th></tr>"#);
    for o in orders {
        let _ = write!(
            s,
            r#"<tr class="order" data-order="{id}"><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><form method="post" action="/account/orders/{id}/cancel"><button class="cancel" id="cancel-{id}">Cancel</button></form></td></tr>"#,
            esc(&o.side),
            esc(&o.market),
            o.price,
            o.open,
            o.leased,
            id = o.id
        );
    }
    if orders.is_empty() {
        s.push_str(r#"<tr><td colspan="7">no open orders</td></tr>"#);
    }
    s.push_str("</table></section>");
    s.push_str(r#"<section><h2>Leases</h2><table id="leases"><tr><th>lease</th><th>role</th><th>with</th><th>state</th><th>cents/CPU-hour</th><th>delivered</th><th>charged so far</th></tr>"#);
    for l in leases {
        let _ = write!(
            s,
            r#"<tr class="lease" data-lease="{}"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} s</td><td>{} EUR</td></tr>"#,
            l.id,
            l.id,
            esc(&l.role),
            esc(&l.with),
            esc(&l.state),
            l.price,
            l.delivered_secs,
            cents(l.charged_cents)
        );
    }
    if leases.is_empty() {
        s.push_str(r#"<tr><td colspan="7">no leases</td></tr>"#);
    }
    s.push_str("</table></section>");
    s.push_str(r#"<section><h2>Invoices</h2><ul id="invoices">"#);
    for m in months {
        let _ = write!(s, r#"<li><a href="/account/invoice/{0}">{0}</a> (<a href="/account/invoice/{0}.pdf">PDF</a>)</li>"#, esc(m));
    }
    s.push_str("</ul></section>");
    s.push_str(r#"<section><h2>Statement</h2><table id="statement"><tr><th>#</th><th>time</th><th>balance</th><th>EUR</th><th>what</th></tr>"#);
    for e in statement {
        let _ = write!(s, "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", e.seq, time(e.at), esc(&e.bucket), cents(e.amount), esc(&e.reason));
    }
    s.push_str("</table></section>");
    s
}

pub fn invoice(inv: &Invoice) -> String {
    let mut s = format!(
        r#"<article class="invoice"><h1>Invoice {month}</h1><p>Account <b>{name}</b> ({account}) · <a href="/account/invoice/{month}.pdf">PDF</a></p>
<table id="invoice"><tr><th>lease</th><th>role</th><th>seconds</th><th>EUR</th></tr>"#,
        month = esc(&inv.month),
        name = esc(&inv.name),
        account = inv.account
    );
    for l in &inv.lines {
        let _ = write!(s, r#"<tr class="line"><td>{}</td><td>{}</td><td>{}</td><td class="amount">{}</td></tr>"#, l.lease, esc(&l.role), l.seconds, cents(l.amount_cents));
    }
    let _ = write!(s, r#"<tr class="total"><td colspan="3">Total</td><td id="total" data-cents="{}">{}</td></tr></table></article>"#, inv.total_cents, cents(inv.total_cents));
    s
}

pub fn message(title: &str, text: &str) -> String {
    format!(r#"<h1>{}</h1><p class="error" id="error">{}</p><p><a href="/">Back to the market</a></p>"#, esc(title), esc(text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped() {
        assert_eq!(esc(r#"<script>alert("x")</script> & 'y'"#), "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;");
        let page = message("<b>", "\"><img src=x>");
        assert!(!page.contains("<img") && !page.contains("<b>"));
    }

    #[test]
    fn charts_draw_what_they_are_given() {
        let book = Book { market: "seccomp-strict".into(), asks: vec![super::super::view::Level { price: 100, cpus: 2 }], bids: vec![super::super::view::Level { price: 80, cpus: 1 }] };
        let svg = depth_chart(&book);
        // The axis runs a tenth of the lowest price beyond both ends (80 - 8, 100 + 8).
        assert!(svg.contains("<svg") && svg.contains(r#"class="asks""#) && svg.contains("72 ¢") && svg.contains("108 ¢") && svg.contains("2 CPUs"), "{svg}");
        assert!(depth_chart(&Book { market: "x".into(), asks: vec![], bids: vec![] }).contains("empty"));
    }
}
