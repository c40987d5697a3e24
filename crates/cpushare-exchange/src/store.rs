//! The durable store: the record log, snapshots and the per-account ledger,
//! on SQLite (the default, a file in the data directory, WAL) or PostgreSQL.
//!
//! One implementation serves both through sqlx's `Any` driver: the schema uses
//! only types both share, and every statement uses `$n` placeholders, which
//! SQLite also accepts. The engine is the only writer; each of its batches is
//! one transaction (group commit), so a batch of a thousand orders costs one
//! sync to disk.

use anyhow::{bail, Context};
use futures::TryStreamExt;
use sqlx::any::{AnyPoolOptions, AnyRow};
use sqlx::{AnyPool, Executor, Row};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// One line of an account's statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerRow {
    pub seq: u64,
    pub account: u64,
    pub bucket: String,
    pub amount: i64,
    pub reason: String,
    pub at: u64,
}

pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &[&str] = &[
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS records (seq BIGINT PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS snapshots (seq BIGINT PRIMARY KEY, body TEXT NOT NULL)",
    "CREATE TABLE IF NOT EXISTS ledger (seq BIGINT NOT NULL, account BIGINT NOT NULL, bucket TEXT NOT NULL, \
     amount BIGINT NOT NULL, reason TEXT NOT NULL, at BIGINT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS ledger_by_account ON ledger (account, seq)",
];

/// Rows per multi-row INSERT on PostgreSQL (well under its parameter limit).
const CHUNK: usize = 400;
/// Rows per multi-row INSERT on SQLite.
const SQLITE_ROWS: usize = 64;

impl Store {
    /// Opens (creating if needed) the store at `url`: `sqlite:///path/to/file.db`
    /// or `postgres://...`.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        sqlx::any::install_default_drivers();
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Backend::Postgres
        } else {
            bail!("unsupported database URL {url:?}: use sqlite:///path/to/file.db or postgres://...");
        };
        let mut options = AnyPoolOptions::new().max_connections(match backend {
            Backend::Sqlite => 4,
            Backend::Postgres => 8,
        });
        if backend == Backend::Sqlite {
            options = options.after_connect(|conn, _| {
                Box::pin(async move {
                    // WAL lets readers run beside the writer; FULL makes a commit survive
                    // power loss, not only a crash of the process.
                    for pragma in ["PRAGMA journal_mode = WAL", "PRAGMA synchronous = FULL", "PRAGMA busy_timeout = 10000"] {
                        conn.execute(pragma).await?;
                    }
                    Ok(())
                })
            });
        }
        let url = match backend {
            Backend::Sqlite if !url.contains("mode=") => format!("{url}{}mode=rwc", if url.contains('?') { '&' } else { '?' }),
            _ => url.to_string(),
        };
        let pool = options.connect(&url).await.with_context(|| format!("opening the store at {url}"))?;
        let store = Store { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    async fn migrate(&self) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for ddl in SCHEMA {
            tx.execute(*ddl).await.with_context(|| format!("creating the schema: {ddl}"))?;
        }
        let version: Option<String> = sqlx::query("SELECT value FROM meta WHERE key = 'schema'")
            .fetch_optional(&mut *tx)
            .await?
            .map(|r: AnyRow| r.get(0));
        match version.as_deref() {
            None => {
                sqlx::query("INSERT INTO meta (key, value) VALUES ('schema', $1)")
                    .bind(SCHEMA_VERSION.to_string())
                    .execute(&mut *tx)
                    .await?;
            }
            Some(v) if v == SCHEMA_VERSION.to_string() => {}
            Some(v) => bail!("the store has schema version {v}, this build knows {SCHEMA_VERSION}: upgrade cpushare"),
        }
        tx.commit().await?;
        Ok(())
    }

    /// Appends records (sequence number, JSON) and ledger rows in one transaction.
    /// Returns only once they are durable.
    pub async fn append(&self, records: &[(u64, String)], ledger: &[LedgerRow]) -> anyhow::Result<()> {
        if records.is_empty() && ledger.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        // SQLite runs on sqlx's worker thread, so every statement is a hand-off to
        // it: insert many rows per statement, in chunks of one size (the prepared
        // statement is cached), with positional `?` (no parameter names to look up).
        // PostgreSQL is across a socket: few statements, many rows each.
        let (rows, sql): (usize, fn(&str, usize, usize) -> String) = match self.backend {
            Backend::Sqlite => (SQLITE_ROWS, insert_sql_positional),
            Backend::Postgres => (CHUNK, insert_sql),
        };
        for chunk in records.chunks(rows) {
            let sql = sql("records (seq, body)", 2, chunk.len());
            let mut q = sqlx::query(&sql);
            for (seq, body) in chunk {
                q = q.bind(*seq as i64).bind(body.as_str());
            }
            q.execute(&mut *tx).await.context("appending records")?;
        }
        for chunk in ledger.chunks(rows) {
            let sql = sql("ledger (seq, account, bucket, amount, reason, at)", 6, chunk.len());
            let mut q = sqlx::query(&sql);
            for r in chunk {
                q = q
                    .bind(r.seq as i64)
                    .bind(r.account as i64)
                    .bind(r.bucket.as_str())
                    .bind(r.amount)
                    .bind(r.reason.as_str())
                    .bind(r.at as i64);
            }
            q.execute(&mut *tx).await.context("appending ledger rows")?;
        }
        tx.commit().await.context("committing")?;
        Ok(())
    }

    /// The newest snapshot, if any: (sequence number, JSON).
    pub async fn latest_snapshot(&self) -> anyhow::Result<Option<(u64, String)>> {
        let row = sqlx::query("SELECT seq, body FROM snapshots ORDER BY seq DESC LIMIT 1").fetch_optional(&self.pool).await?;
        Ok(row.map(|r| (r.get::<i64, _>(0) as u64, r.get(1))))
    }

    /// Keeps a snapshot taken at `seq` and drops all but the two newest.
    pub async fn save_snapshot(&self, seq: u64, body: &str) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("INSERT INTO snapshots (seq, body) VALUES ($1, $2) ON CONFLICT (seq) DO NOTHING")
            .bind(seq as i64)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        sqlx::query(
            "DELETE FROM snapshots WHERE seq < (SELECT MIN(seq) FROM (SELECT seq FROM snapshots ORDER BY seq DESC LIMIT 2) AS newest)",
        )
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// Calls `f` with every record after `after`, in order.
    pub async fn for_each_record(&self, after: u64, mut f: impl FnMut(u64, &str) -> anyhow::Result<()>) -> anyhow::Result<()> {
        let mut rows = sqlx::query("SELECT seq, body FROM records WHERE seq > $1 ORDER BY seq").bind(after as i64).fetch(&self.pool);
        while let Some(row) = rows.try_next().await? {
            let seq: i64 = row.get(0);
            let body: String = row.get(1);
            f(seq as u64, &body)?;
        }
        Ok(())
    }

    pub async fn last_seq(&self) -> anyhow::Result<u64> {
        let row = sqlx::query("SELECT MAX(seq) FROM records").fetch_one(&self.pool).await?;
        Ok(row.try_get::<Option<i64>, _>(0)?.unwrap_or(0) as u64)
    }

    /// An account's ledger rows, newest first, before `before` (0: from the newest).
    pub async fn statement(&self, account: u64, before: u64, limit: u32) -> anyhow::Result<Vec<LedgerRow>> {
        let before = if before == 0 { i64::MAX } else { before as i64 };
        let rows = sqlx::query(
            "SELECT seq, account, bucket, amount, reason, at FROM ledger WHERE account = $1 AND seq < $2 \
             ORDER BY seq DESC LIMIT $3",
        )
        .bind(account as i64)
        .bind(before)
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|r| LedgerRow {
                seq: r.get::<i64, _>(0) as u64,
                account: r.get::<i64, _>(1) as u64,
                bucket: r.get(2),
                amount: r.get(3),
                reason: r.get(4),
                at: r.get::<i64, _>(5) as u64,
            })
            .collect())
    }

    pub async fn close(self) {
        self.pool.close().await;
    }
}

fn insert_sql(table: &str, columns: usize, rows: usize) -> String {
    let mut sql = format!("INSERT INTO {table} VALUES ");
    let mut n = 1;
    for row in 0..rows {
        if row > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..columns {
            if c > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("${n}"));
            n += 1;
        }
        sql.push(')');
    }
    sql
}

fn insert_sql_positional(table: &str, columns: usize, rows: usize) -> String {
    let row = format!("({})", vec!["?"; columns].join(","));
    format!("INSERT INTO {table} VALUES {}", vec![row; rows].join(","))
}

/// The SQLite URL for a file.
pub fn sqlite_url(path: &std::path::Path) -> String {
    format!("sqlite://{}", path.display())
}
