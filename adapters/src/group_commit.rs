//! Group commit for the command path. Appends that arrive while earlier ones are still on their
//! way to Postgres go together as one INSERT: one statement, one transaction, one WAL flush for
//! many commands, instead of one each. Nothing waits on purpose: a lone append goes at once, and
//! appends only queue while every slot has a statement in flight.
//!
//! A statement is all or nothing, so one command's conflict would refuse the others in its group.
//! When a group fails, each of its commands is tried again on its own, and each caller gets the
//! outcome of its own statement: a conflict only to the command that lost the race, never to a
//! bystander. A group never holds two commands of one aggregate (the second would name the
//! version the first takes); the second goes on its own after the group.

use esrs::store::postgres::PgStoreError;
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot, Semaphore};
use uuid::Uuid;

use crate::metrics::METRICS;

/// One command's events, as rows of the global log.
#[derive(Debug, Clone)]
pub(crate) struct Rows {
    pub aggregate_type: &'static str,
    pub aggregate_id: Uuid,
    pub schema_version: i32,
    pub recorded_at: chrono::DateTime<chrono::Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub actor: String,
    pub traceparent: Option<String>,
    /// Per event, in version order.
    pub events: Vec<Row>,
}

#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub event_id: Uuid,
    pub version: i32,
    pub event_type: &'static str,
    pub payload: serde_json::Value,
}

/// The commands one statement carries at most.
const MAX_COMMANDS: usize = 64;

/// Statements in flight at once. More slots mean smaller groups; fewer mean longer queues.
const SLOTS: usize = 4;

/// The rows of `commands`, in order, as one statement. Each event's row carries its command's
/// metadata; `ORDER BY n` keeps the rows in the order given, so `id` follows it.
const INSERT: &str = "INSERT INTO event_log (event_id, aggregate_type, aggregate_id, aggregate_version, event_type, \
     schema_version, payload, recorded_at, correlation_id, causation_id, actor, traceparent)
     SELECT id, t, a, v, et, sv, p, at, c, ca, ac, tp
     FROM UNNEST($1::uuid[], $2::text[], $3::uuid[], $4::int[], $5::text[], $6::int[], $7::jsonb[], $8::timestamptz[],
                 $9::uuid[], $10::uuid[], $11::text[], $12::text[])
          WITH ORDINALITY AS e(id, t, a, v, et, sv, p, at, c, ca, ac, tp, n)
     ORDER BY n";

/// Inserts the rows of `commands` in one statement on `connection`.
pub(crate) async fn insert<'c>(
    connection: impl sqlx::PgExecutor<'c>,
    commands: impl IntoIterator<Item = &Rows>,
) -> Result<(), sqlx::Error> {
    let mut ids = Vec::new();
    let mut types = Vec::new();
    let mut aggregates = Vec::new();
    let mut versions = Vec::new();
    let mut event_types = Vec::new();
    let mut schema_versions = Vec::new();
    let mut payloads = Vec::new();
    let mut recorded = Vec::new();
    let mut correlations = Vec::new();
    let mut causations = Vec::new();
    let mut actors = Vec::new();
    let mut traceparents = Vec::new();
    for command in commands {
        for row in &command.events {
            ids.push(row.event_id);
            types.push(command.aggregate_type);
            aggregates.push(command.aggregate_id);
            versions.push(row.version);
            event_types.push(row.event_type);
            schema_versions.push(command.schema_version);
            payloads.push(&row.payload);
            recorded.push(command.recorded_at);
            correlations.push(command.correlation_id);
            causations.push(command.causation_id);
            actors.push(command.actor.as_str());
            traceparents.push(command.traceparent.as_deref());
        }
    }
    sqlx::query(INSERT)
        .bind(ids)
        .bind(types)
        .bind(aggregates)
        .bind(versions)
        .bind(event_types)
        .bind(schema_versions)
        .bind(payloads)
        .bind(recorded)
        .bind(correlations)
        .bind(causations)
        .bind(actors)
        .bind(traceparents)
        .execute(connection)
        .await?;
    Ok(())
}

struct Pending {
    rows: Rows,
    done: oneshot::Sender<Result<(), PgStoreError>>,
}

/// The queue of appends waiting for a slot, and the task that groups them.
#[derive(Clone)]
pub(crate) struct GroupCommit {
    pool: PgPool,
    queue: mpsc::UnboundedSender<Pending>,
}

impl GroupCommit {
    /// Starts the grouping task on the current Tokio runtime. It ends when the last handle is
    /// dropped.
    pub(crate) fn start(pool: PgPool) -> Self {
        let (queue, pending) = mpsc::unbounded_channel();
        tokio::spawn(group(pool.clone(), pending));
        Self { pool, queue }
    }

    /// Appends `rows` (one command's events), alone or in a group; `Ok` once committed.
    pub(crate) async fn append(&self, rows: Rows) -> Result<(), PgStoreError> {
        let (done, outcome) = oneshot::channel();
        if let Err(mpsc::error::SendError(pending)) = self.queue.send(Pending { rows, done }) {
            // The grouping task is gone with the runtime that started it: append directly.
            return Ok(insert(&self.pool, [&pending.rows]).await?);
        }
        outcome
            .await
            .unwrap_or_else(|_| Err(PgStoreError::Custom("the group commit stopped before this append's outcome was known".into())))
    }
}

async fn group(pool: PgPool, mut pending: mpsc::UnboundedReceiver<Pending>) {
    let slots = std::sync::Arc::new(Semaphore::new(SLOTS));
    while let Some(first) = pending.recv().await {
        // Waiting here for a slot is what lets the queue fill into a group.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        while batch.len() < MAX_COMMANDS {
            match pending.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let pool = pool.clone();
        tokio::spawn(async move {
            commit(&pool, batch).await;
            drop(slot);
        });
    }
}

/// Commits `batch` as one statement, or, if that fails, each command alone.
async fn commit(pool: &PgPool, batch: Vec<Pending>) {
    let mut group = Vec::with_capacity(batch.len());
    let mut repeats = Vec::new();
    let mut aggregates = std::collections::HashSet::with_capacity(batch.len());
    for pending in batch {
        if aggregates.insert((pending.rows.aggregate_type, pending.rows.aggregate_id)) {
            group.push(pending);
        } else {
            repeats.push(pending);
        }
    }
    // Concurrent groups take the unique index's entries in one order, so two of them racing for
    // the same aggregates wait on each other instead of deadlocking. Sorting is stable: each
    // command's rows stay together and in version order.
    group.sort_by_key(|pending| (pending.rows.aggregate_type, pending.rows.aggregate_id));
    METRICS.append_statements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    match insert(pool, group.iter().map(|p| &p.rows)).await {
        Ok(()) => {
            for pending in group {
                let _ = pending.done.send(Ok(()));
            }
        }
        Err(error) if group.len() == 1 => {
            let _ = group.pop().expect("one").done.send(Err(error.into()));
        }
        Err(error) => {
            METRICS.append_group_failures.inc(cause(&error));
            // Which command spoiled the group is not said; each learns its own outcome alone, a
            // few at a time so that a failed group does not take the whole pool.
            use futures::StreamExt;
            futures::stream::iter(group).for_each_concurrent(SLOTS, |pending| alone(pool, pending)).await;
        }
    }
    for pending in repeats {
        alone(pool, pending).await;
    }
}

/// Why a group's statement failed, as the metric counts it: `conflict` (a version another writer
/// took), `deadlock` (which the sort above rules out between groups), or `other`.
fn cause(error: &sqlx::Error) -> &'static str {
    match error.as_database_error().and_then(|e| e.code()).as_deref() {
        Some("23505") => "conflict",
        Some("40P01") => "deadlock",
        _ => "other",
    }
}

async fn alone(pool: &PgPool, pending: Pending) {
    METRICS.append_statements.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let outcome = insert(pool, [&pending.rows]).await.map_err(PgStoreError::from);
    let _ = pending.done.send(outcome);
}
