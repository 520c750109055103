//! Rebuilding a projection from the Postgres log alone, beside the live tables, then swapping.
//!
//! The rebuild fills `{table}__rebuild` in batches without blocking anything; the swap takes the
//! projection's checkpoint row lock (so the live projector waits), applies the last events,
//! replaces the live tables and sets the checkpoint to what the rebuilt tables hold. The live
//! projector then carries on from there and skips what the rebuild already applied.

use std::time::Instant;

use sqlx::PgPool;
use understudy_adapters::global_log;

use crate::projector::{apply_all, lock_checkpoint, store_checkpoint, Progress};
use crate::{Projection, Tables};

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ReplayReport {
    pub projection: String,
    pub events: u64,
    pub position: i64,
    pub seconds: f64,
}

const BATCH: i64 = 5000;

/// Creates `tables`' copies of the projection's tables, empty, and fills them from the log up to
/// position `up_to`, in batches that block nothing. Returns the position reached and the events read.
async fn build_beside(
    pool: &PgPool,
    projection: &dyn Projection,
    tables: &Tables,
    up_to: i64,
    mut progress: impl FnMut(u64, i64),
) -> anyhow::Result<(i64, u64)> {
    let mut conn = pool.acquire().await?;
    for table in projection.tables() {
        let copy = tables.name(table);
        sqlx::query(&format!("DROP TABLE IF EXISTS {copy}")).execute(&mut *conn).await?;
        sqlx::query(&format!("CREATE TABLE {copy} (LIKE {table} INCLUDING ALL)")).execute(&mut *conn).await?;
    }
    drop(conn);
    let (mut position, mut events) = (0, 0u64);
    let mut ignored = Vec::new();
    // The next batch is read while this one is applied: reading and decoding the log is about
    // half of a replay's work, and it needs nothing from the apply.
    let read = |after: i64| {
        let pool = pool.clone();
        tokio::spawn(async move { global_log::read_range(&pool, after, up_to, BATCH).await })
    };
    let mut next = read(0);
    loop {
        let batch = next.await??;
        if batch.is_empty() {
            return Ok((position, events));
        }
        next = read(batch.last().map_or(position, |e| e.position));
        let mut tx = pool.begin().await?;
        position = applied(apply_all(projection, &mut tx, tables, position, &batch, &mut ignored).await?)?;
        tx.commit().await?;
        events += batch.len() as u64;
        ignored.clear();
        // The copies start empty, so the planner's statistics say so: refresh them as they grow
        // (after 1, 2, 4, 8, … batches), or reading the rows a batch folds turns into scans.
        let batches = events.div_ceil(BATCH as u64);
        if batches.is_power_of_two() {
            for table in projection.tables() {
                sqlx::query(&format!("ANALYZE {}", tables.name(table))).execute(pool).await?;
            }
        }
        progress(events, global_log::head(pool).await?);
    }
}

/// Applies the log's events in `(position, up_to]` to `tables` inside `tx`.
async fn catch_up(
    tx: &mut sqlx::PgConnection,
    projection: &dyn Projection,
    tables: &Tables,
    mut position: i64,
    up_to: i64,
) -> anyhow::Result<(i64, u64)> {
    let (mut events, mut ignored) = (0u64, Vec::new());
    loop {
        let batch = global_log::read_range(&mut *tx, position, up_to, BATCH).await?;
        if batch.is_empty() {
            return Ok((position, events));
        }
        position = applied(apply_all(projection, tx, tables, position, &batch, &mut ignored).await?)?;
        events += batch.len() as u64;
    }
}

/// Rebuilds `projection` and swaps it in. `progress(events_done, head)` is called per batch.
pub async fn replay(pool: &PgPool, projection: &dyn Projection, progress: impl FnMut(u64, i64)) -> anyhow::Result<ReplayReport> {
    let started = Instant::now();
    let (position, mut events) = build_beside(pool, projection, &Tables::REBUILD, i64::MAX, progress).await?;
    // Swapped in with statistics of what it holds, so its first queries are planned for it.
    for table in projection.tables() {
        sqlx::query(&format!("ANALYZE {}", Tables::REBUILD.name(table))).execute(pool).await?;
    }
    let mut tx = pool.begin().await?;
    lock_checkpoint(&mut tx, projection.name()).await?;
    let (position, more) = catch_up(&mut tx, projection, &Tables::REBUILD, position, i64::MAX).await?;
    events += more;
    for table in projection.tables() {
        let copy = Tables::REBUILD.name(table);
        let names = index_names(&mut tx, table, &copy).await?;
        sqlx::query(&format!("DROP TABLE {table}")).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE {copy} RENAME TO {table}")).execute(&mut *tx).await?;
        for (generated, original) in names {
            sqlx::query(&format!("ALTER INDEX \"{generated}\" RENAME TO \"{original}\"")).execute(&mut *tx).await?;
        }
    }
    store_checkpoint(&mut tx, projection.name(), position).await?;
    tx.commit().await?;
    Ok(ReplayReport { projection: projection.name().into(), events, position, seconds: started.elapsed().as_secs_f64() })
}

/// Each index of `copy` (made `LIKE table INCLUDING ALL`, so with names Postgres made up) and
/// the name of `table`'s index with the same definition: the names the swapped-in table's
/// indexes take back, so that migrations, which name them, still find them after a replay.
async fn index_names(tx: &mut sqlx::PgConnection, table: &str, copy: &str) -> sqlx::Result<Vec<(String, String)>> {
    sqlx::query_as(
        "WITH defined AS (
             SELECT tablename, indexname,
                    regexp_replace(indexdef, '^(CREATE (UNIQUE )?INDEX) \\S+ ON \\S+', '\\1') AS definition
             FROM pg_indexes WHERE schemaname = current_schema() AND tablename IN ($1, $2)
         ), numbered AS (
             SELECT *, row_number() OVER (PARTITION BY tablename, definition ORDER BY indexname) AS n FROM defined
         )
         SELECT c.indexname, o.indexname
         FROM numbered o JOIN numbered c USING (definition, n)
         WHERE o.tablename = $1 AND c.tablename = $2 AND o.indexname <> c.indexname",
    )
    .bind(table)
    .bind(copy)
    .fetch_all(tx)
    .await
}

/// How one table of a live read model differs from a fresh replay of the log.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TableDifference {
    pub table: String,
    /// Rows the live table has that the replay does not (as JSON), at most a few.
    pub only_live: Vec<serde_json::Value>,
    pub only_live_count: i64,
    /// Rows the replay has that the live table does not.
    pub only_replayed: Vec<serde_json::Value>,
    pub only_replayed_count: i64,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VerifyReport {
    pub projection: String,
    /// The checkpoint both sides were compared at.
    pub position: i64,
    pub differences: Vec<TableDifference>,
}

/// Replays `projection` beside the live tables up to the live checkpoint and compares them, row
/// by row, over the columns the projection owns. Changes nothing live.
pub async fn verify(pool: &PgPool, projection: &dyn Projection) -> anyhow::Result<VerifyReport> {
    let live_now = crate::projector::checkpoint(pool, projection.name()).await?;
    let (position, _) = build_beside(pool, projection, &Tables::VERIFY, live_now, |_, _| {}).await?;
    let mut tx = pool.begin().await?;
    // Holding the checkpoint row keeps the live side still while both are read.
    let checkpoint = lock_checkpoint(&mut tx, projection.name()).await?;
    catch_up(&mut tx, projection, &Tables::VERIFY, position, checkpoint).await?;
    let mut differences = Vec::new();
    for table in projection.tables() {
        let columns = projection.compared_columns(table);
        let copy = Tables::VERIFY.name(table);
        let side = |a: &str, b: &str| format!("SELECT to_jsonb(d) FROM (SELECT {columns} FROM {a} EXCEPT ALL SELECT {columns} FROM {b}) d");
        let count = |a: &str, b: &str| format!("SELECT count(*) FROM (SELECT {columns} FROM {a} EXCEPT ALL SELECT {columns} FROM {b}) d");
        let only_live_count: i64 = sqlx::query_scalar(&count(table, &copy)).fetch_one(&mut *tx).await?;
        let only_replayed_count: i64 = sqlx::query_scalar(&count(&copy, table)).fetch_one(&mut *tx).await?;
        if only_live_count + only_replayed_count > 0 {
            let only_live = sqlx::query_scalar(&format!("{} LIMIT 3", side(table, &copy))).fetch_all(&mut *tx).await?;
            let only_replayed = sqlx::query_scalar(&format!("{} LIMIT 3", side(&copy, table))).fetch_all(&mut *tx).await?;
            differences.push(TableDifference { table: table.to_string(), only_live, only_live_count, only_replayed, only_replayed_count });
        }
        sqlx::query(&format!("DROP TABLE {copy}")).execute(&mut *tx).await?;
    }
    tx.commit().await?;
    Ok(VerifyReport { projection: projection.name().into(), position: checkpoint, differences })
}

/// A replay stops at an event it cannot decode, without swapping anything in.
fn applied(progress: Progress) -> anyhow::Result<i64> {
    match progress.stopped {
        Some(stop) => Err(stop.into()),
        None => Ok(progress.checkpoint),
    }
}
