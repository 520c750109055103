//! The `entity_history` read model: every event of every entity, for audit
//! (`understudy events <id>`, GraphQL `history(id)`).

use async_trait::async_trait;
use sqlx::PgConnection;
use understudy_adapters::LoggedEvent;

use crate::projector::RunApplied;
use crate::{AnyEvent, Change, Projection, ProjectionError, Tables};

pub struct EntityHistory;

#[async_trait]
impl Projection for EntityHistory {
    fn name(&self) -> &'static str {
        "entity_history"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["entity_history"]
    }

    fn linger(&self) -> std::time::Duration {
        crate::projector::BACKGROUND_LINGER
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        event: &LoggedEvent,
        decoded: &AnyEvent,
    ) -> Result<Vec<Change>, ProjectionError> {
        self.apply_run(conn, tables, &[(event, decoded.clone())]).await?.into_result()
    }

    /// The whole run in one INSERT. On the position key, so applying an event twice fails loudly.
    async fn apply_run(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        run: &[(&LoggedEvent, AnyEvent)],
    ) -> Result<RunApplied, ProjectionError> {
        if !run.is_empty() {
            sqlx::query(&format!(
                "INSERT INTO {} (position, event_id, aggregate_type, aggregate_id, aggregate_version, event_type, schema_version,
                     payload, recorded_at, correlation_id, causation_id, actor)
                 SELECT * FROM UNNEST($1::bigint[], $2::uuid[], $3::text[], $4::uuid[], $5::bigint[], $6::text[], $7::int[],
                     $8::jsonb[], $9::timestamptz[], $10::uuid[], $11::uuid[], $12::text[])",
                tables.name("entity_history")
            ))
            .bind(run.iter().map(|(e, _)| e.position).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.event_id).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.aggregate_type.as_str()).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.aggregate_id).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.aggregate_version).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.event_type.as_str()).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.schema_version).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| &e.payload).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.recorded_at).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.correlation_id).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.causation_id).collect::<Vec<_>>())
            .bind(run.iter().map(|(e, _)| e.actor.as_str()).collect::<Vec<_>>())
            .execute(conn)
            .await?;
        }
        Ok(RunApplied { changes: vec![], applied: run.len(), stopped: None })
    }
}

/// One entity's history from the read model, oldest first.
pub async fn of(pool: &sqlx::PgPool, aggregate_id: uuid::Uuid) -> sqlx::Result<Vec<LoggedEvent>> {
    sqlx::query_as::<_, LoggedEvent>(
        "SELECT position, event_id, aggregate_type, aggregate_id, aggregate_version, event_type, schema_version, payload,
                recorded_at, correlation_id, causation_id, actor, NULL::text AS traceparent
         FROM entity_history WHERE aggregate_id = $1 ORDER BY position",
    )
    .bind(aggregate_id)
    .fetch_all(pool)
    .await
}
