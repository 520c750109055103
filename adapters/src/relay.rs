//! The sequencer and the relay: number the global log gap-free, then carry it to JetStream.
//!
//! **Sequencing.** Writers insert into `event_log` without a position; `id` comes from a sequence
//! and commits out of order. The sequencer numbers only rows written by transactions older than
//! every transaction still running (`transaction_id < pg_snapshot_xmin(pg_current_snapshot())`),
//! in `(transaction_id, id)` order, under a row lock on its cursor, so one numbering commits
//! before the next begins. A row that commits late is numbered late: nothing is ever skipped, and
//! nothing waits on a timer. Writers never contend on a shared lock, so their commits group.
//!
//! **Relaying.** Numbered events after the `published` cursor are published with
//! `Nats-Msg-Id` = event id and their position in a header; the cursor moves after JetStream
//! acknowledged them all. A crash in between republishes, and JetStream's duplicate window and
//! the projectors' checkpoints absorb the repeats.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_nats::HeaderMap;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::global_log::{self, LoggedEvent};
use crate::nats::Topology;

/// Header carrying an event's global position.
pub const POSITION_HEADER: &str = "Understudy-Position";

/// Numbers up to `limit` committed events; returns how many and the new head position (0 if the
/// log is empty). Four statements: BEGIN, lock, number, COMMIT.
pub async fn sequence(pool: &PgPool, limit: i64) -> sqlx::Result<(usize, i64)> {
    let mut tx = pool.begin().await?;
    // The horizon comes from this statement's snapshot, taken before the transaction holds an id
    // of its own (so its own id does not hold the horizon back) and before any wait for the lock
    // (so it may be older than the lock's holder's commit: an older horizon only numbers less).
    let (horizon, head): (String, i64) = sqlx::query_as(
        "SELECT pg_snapshot_xmin(pg_current_snapshot())::text, position FROM log_cursors WHERE name = 'sequenced' FOR UPDATE",
    )
    .fetch_one(&mut *tx)
    .await?;
    // A statement of its own, so that its snapshot sees what an earlier holder of the lock numbered.
    let (numbered, new_head): (i64, i64) = sqlx::query_as(
        "WITH next AS (
             SELECT id, $1 + row_number() OVER (ORDER BY transaction_id, id) AS position
             FROM event_log
             WHERE position IS NULL AND transaction_id < $2::text::xid8
             ORDER BY transaction_id, id
             LIMIT $3
         ), numbered AS (
             UPDATE event_log e SET position = next.position FROM next WHERE e.id = next.id
             RETURNING e.position
         ), moved AS (
             UPDATE log_cursors SET position = (SELECT max(position) FROM numbered)
             WHERE name = 'sequenced' AND EXISTS (SELECT 1 FROM numbered)
         )
         SELECT count(*), COALESCE(max(position), $1) FROM numbered",
    )
    .bind(head)
    .bind(&horizon)
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((numbered as usize, new_head))
}

/// Publishes up to `limit` numbered events after the `published` cursor; returns how many.
pub async fn publish_pending(pool: &PgPool, js: &jetstream::Context, topology: &Topology, limit: i64) -> anyhow::Result<usize> {
    let events = global_log::read_unpublished(pool, limit).await?;
    let Some(last) = events.last().map(|e| e.position) else {
        return Ok(0);
    };
    // Pipeline the publishes, then wait for every acknowledgement before moving the cursor.
    let mut acks = Vec::with_capacity(events.len());
    for event in &events {
        let span = crate::telemetry::span_from("relay.publish", event.traceparent.as_deref());
        acks.push(publish_one(js, topology, event).instrument(span).await?);
    }
    for ack in acks {
        ack.await.map_err(|e| anyhow::anyhow!("{e}")).context("JetStream did not acknowledge a published event")?;
    }
    sqlx::query("UPDATE log_cursors SET position = GREATEST(position, $1) WHERE name = 'published'").bind(last).execute(pool).await?;
    Ok(events.len())
}

async fn publish_one(
    js: &jetstream::Context,
    topology: &Topology,
    event: &LoggedEvent,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
    headers.insert(POSITION_HEADER, event.position.to_string().as_str());
    if let Some(traceparent) = crate::telemetry::current_traceparent() {
        headers.insert("traceparent", traceparent.as_str());
    }
    let payload = serde_json::to_vec(event)?;
    js.publish_with_headers(topology.event_subject(&event.aggregate_type, event.aggregate_id), headers, payload.into())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("publishing an event to JetStream")
}

/// Sequences and relays until cancelled. Errors are logged and retried with backoff: the log in
/// Postgres is the truth, so nothing is lost while NATS or Postgres is away.
///
/// Numbering and publishing are two loops: while NATS is away (a cluster electing a new stream
/// leader, a server restarting) the log is still numbered, so projectors, which read the
/// Postgres log whenever JetStream is quiet, keep up without NATS.
pub async fn run(pool: PgPool, js: jetstream::Context, topology: Topology, cancel: CancellationToken) {
    const BATCH: i64 = 1000;
    let sequencer =
        repeat("sequencing the global log", &cancel, || async { Ok(sequence(&pool, BATCH).await.context("sequencing the global log")?.0) });
    let publisher = repeat("relaying the global log to JetStream", &cancel, || publish_pending(&pool, &js, &topology, BATCH));
    tokio::join!(sequencer, publisher);
}

/// Runs `step` until cancelled: again at once after it did some work, after a pause growing to
/// 10 ms while idle, and after a backoff growing to 1 s while it fails.
async fn repeat<F, Fut>(what: &str, cancel: &CancellationToken, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let mut idle = Duration::from_millis(1);
    let mut failures = 0u32;
    loop {
        let pause = match step().await {
            Ok(0) => {
                failures = 0;
                idle = (idle * 2).min(Duration::from_millis(10));
                idle
            }
            Ok(_) => {
                failures = 0;
                idle = Duration::from_millis(1);
                Duration::ZERO
            }
            Err(error) => {
                failures += 1;
                let backoff = Duration::from_millis(100 * u64::from(failures.min(10)));
                tracing::warn!(error = format!("{error:#}"), ?backoff, "{what} failed; retrying");
                backoff
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}
