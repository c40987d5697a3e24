//! The store suite, run against every backend.

mod common;

use cpushare_exchange::store::{LedgerRow, Store};

fn row(seq: u64, account: u64, amount: i64) -> LedgerRow {
    LedgerRow { seq, account, bucket: "available".into(), amount, reason: format!("r{seq}"), at: seq * 10 }
}

#[tokio::test]
async fn records_come_back_in_order_after_a_reopen() {
    for db in common::backends().await {
        let store = Store::open(&db.url).await.unwrap();
        assert_eq!(store.last_seq().await.unwrap(), 0, "{}", db.name);
        let batch: Vec<(u64, String)> = (1..=2500).map(|s| (s, format!("{{\"n\":{s}}}"))).collect();
        store.append(&batch[..1000], &[]).await.unwrap();
        store.append(&batch[1000..], &[row(1, 7, 5)]).await.unwrap();
        store.close().await;

        let store = Store::open(&db.url).await.unwrap();
        assert_eq!(store.last_seq().await.unwrap(), 2500, "{}", db.name);
        let mut seen = Vec::new();
        store
            .for_each_record(2000, |seq, body| {
                seen.push((seq, body.to_string()));
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(seen, batch[2000..].to_vec(), "{}", db.name);
    }
}

#[tokio::test]
async fn a_duplicate_sequence_number_is_refused_and_nothing_of_the_batch_lands() {
    for db in common::backends().await {
        let store = Store::open(&db.url).await.unwrap();
        store.append(&[(1, "a".into())], &[]).await.unwrap();
        let err = store.append(&[(2, "b".into()), (1, "again".into())], &[row(2, 1, 1)]).await;
        assert!(err.is_err(), "{}", db.name);
        assert_eq!(store.last_seq().await.unwrap(), 1, "{}: the whole batch is one transaction", db.name);
        assert!(store.statement(1, 0, 10).await.unwrap().is_empty(), "{}", db.name);
    }
}

#[tokio::test]
async fn snapshots_keep_the_two_newest() {
    for db in common::backends().await {
        let store = Store::open(&db.url).await.unwrap();
        assert_eq!(store.latest_snapshot().await.unwrap(), None);
        for seq in [10, 20, 30] {
            store.save_snapshot(seq, &format!("s{seq}")).await.unwrap();
        }
        assert_eq!(store.latest_snapshot().await.unwrap(), Some((30, "s30".to_string())), "{}", db.name);
    }
}

#[tokio::test]
async fn statements_page_through_one_account() {
    for db in common::backends().await {
        let store = Store::open(&db.url).await.unwrap();
        let rows: Vec<LedgerRow> = (1..=50).map(|s| row(s, if s % 2 == 0 { 1 } else { 2 }, s as i64)).collect();
        store.append(&[], &rows).await.unwrap();
        let page = store.statement(1, 0, 10).await.unwrap();
        assert_eq!(page.iter().map(|r| r.seq).collect::<Vec<_>>(), (32..=50).rev().step_by(2).collect::<Vec<_>>(), "{}", db.name);
        let next = store.statement(1, page.last().unwrap().seq, 100).await.unwrap();
        assert_eq!(next.len(), 15, "{}", db.name);
        assert!(next.iter().all(|r| r.account == 1 && r.seq < 32));
        assert_eq!(next[0], row(30, 1, 30));
    }
}

#[tokio::test]
async fn a_bad_url_says_what_is_supported() {
    let err = Store::open("mysql://x").await.err().unwrap().to_string();
    assert!(err.contains("sqlite:///path") && err.contains("postgres://"), "{err}");
}
