//! A month's invoice for one account: a line per lease, summed from the
//! account's own ledger entries for metered time in that month, so that it
//! adds up to the ledger by construction, to the cent. Also as a PDF.

use chrono::{Datelike, NaiveDate};
use cpushare_market::AccountId;
use serde::Serialize;

use crate::engine::Engine;

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Line {
    pub lease: u64,
    /// "bought" (this account paid) or "sold" (it earned).
    pub role: String,
    /// Metered seconds settled in the month.
    pub seconds: u64,
    /// What moved on this account: negative when paid, positive when earned (after the fee).
    pub amount_cents: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Invoice {
    pub account: u64,
    pub name: String,
    /// YYYY-MM.
    pub month: String,
    pub lines: Vec<Line>,
    /// The lines summed.
    pub total_cents: i64,
}

/// The first second of `month` (YYYY-MM) and of the month after, in Unix seconds.
pub fn month_bounds(month: &str) -> Option<(u64, u64)> {
    let (y, m) = month.split_once('-')?;
    if y.len() != 4 || m.len() != 2 {
        return None;
    }
    let start = NaiveDate::from_ymd_opt(y.parse().ok()?, m.parse().ok()?, 1)?;
    let next = if start.month() == 12 { NaiveDate::from_ymd_opt(start.year() + 1, 1, 1)? } else { NaiveDate::from_ymd_opt(start.year(), start.month() + 1, 1)? };
    let secs = |d: NaiveDate| d.and_hms_opt(0, 0, 0).map(|t| t.and_utc().timestamp()).filter(|&s| s >= 0).map(|s| s as u64);
    Some((secs(start)?, secs(next)?))
}

/// The month (YYYY-MM) a Unix time falls in.
pub fn month_of(at: u64) -> String {
    chrono::DateTime::from_timestamp(at as i64, 0).map_or_else(|| "1970-01".into(), |t| t.format("%Y-%m").to_string())
}

/// `lease-N: S s metered` (the ledger's words for a settlement): N and S.
fn metered(reason: &str) -> Option<(u64, u64)> {
    let rest = reason.strip_prefix("lease-")?;
    let (lease, rest) = rest.split_once(": ")?;
    let seconds = rest.strip_suffix(" s metered")?;
    Some((lease.parse().ok()?, seconds.parse().ok()?))
}

pub async fn invoice(engine: &Engine, account: AccountId, name: String, month: &str) -> anyhow::Result<Invoice> {
    let (start, end) = month_bounds(month).ok_or_else(|| anyhow::anyhow!("{month:?} is not a month: use YYYY-MM"))?;
    let mut by_lease: std::collections::BTreeMap<u64, Line> = Default::default();
    let mut before = 0;
    // Newest first, a page at a time, until the month is behind.
    'pages: loop {
        let rows = engine.shared.store.statement(account.0, before, 1000).await?;
        let Some(last) = rows.last() else { break };
        before = last.seq;
        for r in &rows {
            if r.at < start {
                break 'pages;
            }
            if r.at >= end {
                continue;
            }
            if let Some((lease, seconds)) = metered(&r.reason) {
                let line = by_lease.entry(lease).or_insert(Line { lease, role: String::new(), seconds: 0, amount_cents: 0 });
                line.seconds += seconds;
                line.amount_cents += r.amount;
            }
        }
        if rows.len() < 1000 {
            break;
        }
    }
    let mut lines: Vec<Line> = by_lease.into_values().collect();
    for l in &mut lines {
        l.role = if l.amount_cents < 0 { "bought" } else { "sold" }.into();
    }
    let total_cents = lines.iter().map(|l| l.amount_cents).sum();
    Ok(Invoice { account: account.0, name, month: month.into(), lines, total_cents })
}

pub fn cents(c: i64) -> String {
    let sign = if c < 0 { "-" } else { "" };
    format!("{sign}{}.{:02}", c.unsigned_abs() / 100, c.unsigned_abs() % 100)
}

/// The invoice as a PDF: A4, Helvetica, a line per lease, pages as needed.
pub fn pdf(inv: &Invoice) -> Vec<u8> {
    use pdf_writer::{Content, Name, Pdf, Rect, Ref, Str};
    let mut text: Vec<(f32, String)> = vec![
        (16.0, format!("cpushare invoice {}", inv.month)),
        (11.0, format!("Account {} ({})", inv.name, inv.account)),
        (11.0, String::new()),
        (11.0, format!("{:<10} {:<8} {:>14} {:>14}", "lease", "role", "seconds", "amount (EUR)")),
    ];
    for l in &inv.lines {
        text.push((11.0, format!("{:<10} {:<8} {:>14} {:>14}", l.lease, l.role, l.seconds, cents(l.amount_cents))));
    }
    text.push((11.0, String::new()));
    text.push((12.0, format!("Total: {} EUR over {} leases", cents(inv.total_cents), inv.lines.len())));
    let per_page = 48;
    let pages: Vec<&[(f32, String)]> = text.chunks(per_page).collect();
    let mut pdf = Pdf::new();
    let (catalog, tree, font) = (Ref::new(1), Ref::new(2), Ref::new(3));
    let page_ids: Vec<Ref> = (0..pages.len()).map(|i| Ref::new(10 + 2 * i as i32)).collect();
    pdf.catalog(catalog).pages(tree);
    pdf.pages(tree).kids(page_ids.iter().copied()).count(pages.len() as i32);
    pdf.type1_font(font).base_font(Name(b"Courier"));
    for (i, lines) in pages.iter().enumerate() {
        let (page_id, content_id) = (page_ids[i], Ref::new(11 + 2 * i as i32));
        let mut page = pdf.page(page_id);
        page.media_box(Rect::new(0.0, 0.0, 595.0, 842.0));
        page.parent(tree);
        page.contents(content_id);
        page.resources().fonts().pair(Name(b"F1"), font);
        drop(page);
        let mut c = Content::new();
        c.begin_text();
        c.next_line(50.0, 790.0);
        for (size, line) in lines.iter() {
            c.set_font(Name(b"F1"), *size);
            // Printable ASCII only (names and reasons are ASCII already).
            let ascii: String = line.chars().map(|ch| if ch.is_ascii_graphic() || ch == ' ' { ch } else { '?' }).collect();
            c.show(Str(ascii.as_bytes()));
            c.next_line(0.0, -size * 1.4);
        }
        c.end_text();
        pdf.stream(content_id, &c.finish());
    }
    pdf.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_and_ledger_words() {
        assert_eq!(month_bounds("2026-12"), Some((1_796_083_200, 1_798_761_600)));
        assert_eq!(month_bounds("2026-02").map(|(a, b)| (b - a) / 86_400), Some(28));
        assert_eq!(month_bounds("2026-13"), None);
        assert_eq!(month_bounds("26-1"), None);
        assert_eq!(month_bounds("../etc"), None);
        assert_eq!(month_of(1_796_083_200), "2026-12");
        assert_eq!(month_of(1_796_083_199), "2026-11");
        assert_eq!(metered("lease-12: 30 s metered"), Some((12, 30)));
        assert_eq!(metered("lease-12 opened"), None);
        assert_eq!(cents(-1234), "-12.34");
        assert_eq!(cents(5), "0.05");
    }

    #[test]
    fn the_pdf_is_a_pdf_with_every_line() {
        let inv = Invoice {
            account: 3,
            name: "alice".into(),
            month: "2026-12".into(),
            lines: (1..=120).map(|i| Line { lease: i, role: "bought".into(), seconds: 60, amount_cents: -(i as i64) }).collect(),
            total_cents: -7260,
        };
        let bytes = pdf(&inv);
        assert!(bytes.starts_with(b"%PDF-"));
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("/Count 3"), "120 lines make three pages");
        assert!(text.contains("Total: -72.60 EUR over 120 leases"));
    }
}
