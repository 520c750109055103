//! The global log: every event of every aggregate in one table with a gap-free position.
//!
//! The event store writes each event into `event_log` in the same statement that writes its
//! aggregate's esrs table (`event_store.rs`), so an event is in both places or in neither.
//! Positions are assigned later by the sequencer (`relay.rs`); readers here see only numbered
//! events.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use understudy_domain::{DomainEvent, EventDecodeError};
use uuid::Uuid;

/// One event as the global log holds it, and as the relay publishes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, sqlx::FromRow)]
pub struct LoggedEvent {
    pub position: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub aggregate_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: serde_json::Value,
    pub recorded_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub actor: String,
    /// The W3C `traceparent` of the span that appended it.
    #[serde(default)]
    pub traceparent: Option<String>,
}

impl LoggedEvent {
    /// Decodes the payload as an event of `E`, upcasting older schema versions.
    pub fn decode<E: DomainEvent>(&self) -> Result<E, EventDecodeError> {
        let version = u32::try_from(self.schema_version)
            .map_err(|_| EventDecodeError::Malformed(format!("negative schema version {}", self.schema_version)))?;
        understudy_domain::event::decode_event(version, self.payload.clone())
    }
}

pub(crate) const COLUMNS: &str = "position, event_id, aggregate_type, aggregate_id, aggregate_version, event_type, \
     schema_version, payload, recorded_at, correlation_id, causation_id, actor, traceparent";

/// Numbered events after `after`, in order, at most `limit`.
pub async fn read_after(pool: &PgPool, after: i64, limit: i64) -> sqlx::Result<Vec<LoggedEvent>> {
    read_range(pool, after, i64::MAX, limit).await
}

/// Numbered events after the relay's `published` cursor, in order, at most `limit`.
pub async fn read_unpublished(pool: &PgPool, limit: i64) -> sqlx::Result<Vec<LoggedEvent>> {
    sqlx::query_as::<_, LoggedEvent>(&format!(
        "SELECT {COLUMNS} FROM event_log
         WHERE position > (SELECT position FROM log_cursors WHERE name = 'published') ORDER BY position LIMIT $1"
    ))
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// Numbered events with `after < position <= up_to`, in order, at most `limit`.
pub async fn read_range(executor: impl sqlx::PgExecutor<'_>, after: i64, up_to: i64, limit: i64) -> sqlx::Result<Vec<LoggedEvent>> {
    sqlx::query_as::<_, LoggedEvent>(&format!(
        "SELECT {COLUMNS} FROM event_log WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
    ))
    .bind(after)
    .bind(up_to)
    .bind(limit)
    .fetch_all(executor)
    .await
}

/// Every numbered event of one aggregate, oldest first.
pub async fn history(pool: &PgPool, aggregate_id: Uuid) -> sqlx::Result<Vec<LoggedEvent>> {
    numbered_where(pool, "aggregate_id", aggregate_id).await
}

/// Every numbered event one request caused (same correlation id), in log order.
pub async fn caused_by(pool: &PgPool, correlation_id: Uuid) -> sqlx::Result<Vec<LoggedEvent>> {
    numbered_where(pool, "correlation_id", correlation_id).await
}

/// Numbered events whose indexed uuid `column` (one of this module's literals) equals `id`.
async fn numbered_where(pool: &PgPool, column: &str, id: Uuid) -> sqlx::Result<Vec<LoggedEvent>> {
    sqlx::query_as::<_, LoggedEvent>(&format!(
        "SELECT {COLUMNS} FROM event_log WHERE {column} = $1 AND position IS NOT NULL ORDER BY position"
    ))
    .bind(id)
    .fetch_all(pool)
    .await
}

/// The highest position numbered so far (0 when the log is empty).
pub async fn head(executor: impl sqlx::PgExecutor<'_>) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT position FROM log_cursors WHERE name = 'sequenced'").fetch_one(executor).await
}
