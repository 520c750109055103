//! The `entity_history` read model: every event of every entity, for audit
//! (`understudy events <id>`, GraphQL `history(id)`).

use async_trait::async_trait;
use sqlx::PgConnection;
use understudy_adapters::LoggedEvent;

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

    async fn apply(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        event: &LoggedEvent,
        _: &AnyEvent,
    ) -> Result<Vec<Change>, ProjectionError> {
        // A plain INSERT on the position key: applying an event twice would fail loudly here.
        sqlx::query(&format!(
            "INSERT INTO {} (position, event_id, aggregate_type, aggregate_id, aggregate_version, event_type, schema_version,
                 payload, recorded_at, correlation_id, causation_id, actor)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            tables.name("entity_history")
        ))
        .bind(event.position)
        .bind(event.event_id)
        .bind(&event.aggregate_type)
        .bind(event.aggregate_id)
        .bind(event.aggregate_version)
        .bind(&event.event_type)
        .bind(event.schema_version)
        .bind(&event.payload)
        .bind(event.recorded_at)
        .bind(event.correlation_id)
        .bind(event.causation_id)
        .bind(&event.actor)
        .execute(conn)
        .await?;
        Ok(vec![])
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
