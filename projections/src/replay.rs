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

/// Rebuilds `projection` and swaps it in. `progress(events_done, head)` is called per batch.
pub async fn replay(pool: &PgPool, projection: &dyn Projection, mut progress: impl FnMut(u64, i64)) -> anyhow::Result<ReplayReport> {
    const BATCH: i64 = 5000;
    let started = Instant::now();
    let mut conn = pool.acquire().await?;
    for table in projection.tables() {
        let rebuild = Tables::REBUILD.name(table);
        sqlx::query(&format!("DROP TABLE IF EXISTS {rebuild}")).execute(&mut *conn).await?;
        sqlx::query(&format!("CREATE TABLE {rebuild} (LIKE {table} INCLUDING ALL)")).execute(&mut *conn).await?;
    }
    drop(conn);

    let mut position = 0;
    let mut events = 0u64;
    let mut ignored = Vec::new();
    loop {
        let batch = global_log::read_after(pool, position, BATCH).await?;
        if batch.is_empty() {
            break;
        }
        let mut tx = pool.begin().await?;
        position = applied(apply_all(projection, &mut tx, &Tables::REBUILD, position, &batch, &mut ignored).await?)?;
        tx.commit().await?;
        events += batch.len() as u64;
        ignored.clear();
        progress(events, global_log::head(pool).await?);
    }

    let mut tx = pool.begin().await?;
    lock_checkpoint(&mut tx, projection.name()).await?;
    loop {
        let batch = global_log::read_range(&mut *tx, position, i64::MAX, BATCH).await?;
        if batch.is_empty() {
            break;
        }
        position = applied(apply_all(projection, &mut tx, &Tables::REBUILD, position, &batch, &mut ignored).await?)?;
        events += batch.len() as u64;
    }
    for table in projection.tables() {
        sqlx::query(&format!("DROP TABLE {table}")).execute(&mut *tx).await?;
        sqlx::query(&format!("ALTER TABLE {} RENAME TO {table}", Tables::REBUILD.name(table))).execute(&mut *tx).await?;
    }
    store_checkpoint(&mut tx, projection.name(), position).await?;
    tx.commit().await?;
    Ok(ReplayReport { projection: projection.name().into(), events, position, seconds: started.elapsed().as_secs_f64() })
}

/// A replay stops at an event it cannot decode, without swapping anything in.
fn applied(progress: Progress) -> anyhow::Result<i64> {
    match progress.stopped {
        Some(stop) => Err(stop.into()),
        None => Ok(progress.checkpoint),
    }
}
