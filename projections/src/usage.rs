//! The `preview_usage` read model: per project and UTC day, how many environments and deployments
//! there were, how they ended, how long they took to become Ready, and how their tests went.
//! Counts and durations only: never code, logs or secrets.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use understudy_adapters::LoggedEvent;
use understudy_domain::environment::EnvironmentEvent;
use uuid::Uuid;

use crate::{AnyEvent, Change, Projection, ProjectionError, Tables};

pub struct Usage;

/// Adds to the day's counters of the environment's project (nothing for an environment this
/// projection never saw created). One statement: it runs for most events.
async fn add(
    conn: &mut PgConnection,
    tables: &Tables,
    environment: Uuid,
    at: DateTime<Utc>,
    column: &str,
    amount: f64,
) -> Result<(), ProjectionError> {
    let table = tables.name("preview_usage");
    // `column` is one of this module's literals, never input.
    let cast = if column == "seconds_to_ready_sum" { "" } else { "::int" };
    sqlx::query(&format!(
        "INSERT INTO {table} (project_id, day, {column})
         SELECT project_id, $2, $3{cast} FROM {environments} WHERE environment_id = $1
         ON CONFLICT (project_id, day) DO UPDATE SET {column} = {table}.{column} + EXCLUDED.{column}",
        environments = tables.name("usage_environments")
    ))
    .bind(environment)
    .bind(at.date_naive())
    .bind(amount)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl Projection for Usage {
    fn name(&self) -> &'static str {
        "usage"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["preview_usage", "usage_deployments", "usage_environments"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        event: &LoggedEvent,
        decoded: &AnyEvent,
    ) -> Result<Vec<Change>, ProjectionError> {
        let AnyEvent::Environment(environment_event) = decoded else {
            return Ok(vec![]);
        };
        let environment = event.aggregate_id;
        use EnvironmentEvent as E;
        match environment_event {
            E::EnvironmentCreated { spec, at, .. } => {
                sqlx::query(&format!("INSERT INTO {} (environment_id, project_id) VALUES ($1, $2)", tables.name("usage_environments")))
                    .bind(environment)
                    .bind(spec.project_id.0)
                    .execute(&mut *conn)
                    .await?;
                add(conn, tables, environment, *at, "environments_created", 1.0).await?;
            }
            E::DeploymentRequested { deployment_id, at, .. } => {
                sqlx::query(&format!(
                    "INSERT INTO {} (deployment_id, environment_id, requested_at) VALUES ($1, $2, $3)",
                    tables.name("usage_deployments")
                ))
                .bind(deployment_id.0)
                .bind(environment)
                .bind(at)
                .execute(&mut *conn)
                .await?;
                add(conn, tables, environment, *at, "deployments_requested", 1.0).await?;
            }
            E::DeploymentReady { deployment_id, at, .. } => {
                let requested: Option<DateTime<Utc>> =
                    sqlx::query_scalar(&format!("SELECT requested_at FROM {} WHERE deployment_id = $1", tables.name("usage_deployments")))
                        .bind(deployment_id.0)
                        .fetch_optional(&mut *conn)
                        .await?;
                add(conn, tables, environment, *at, "deployments_ready", 1.0).await?;
                if let Some(requested) = requested {
                    let seconds = (*at - requested).num_milliseconds().max(0) as f64 / 1000.0;
                    add(conn, tables, environment, *at, "seconds_to_ready_sum", seconds).await?;
                }
            }
            E::DeploymentFailed { at, .. } => add(conn, tables, environment, *at, "deployments_failed", 1.0).await?,
            E::TestPassed { at, .. } => add(conn, tables, environment, *at, "tests_passed", 1.0).await?,
            E::TestFailed { at, .. } => add(conn, tables, environment, *at, "tests_failed", 1.0).await?,
            E::EnvironmentTerminated { at, .. } => add(conn, tables, environment, *at, "environments_terminated", 1.0).await?,
            E::DeploymentSuperseded { .. }
            | E::DeploymentApproved { .. }
            | E::DeploymentPromoted { .. }
            | E::RolledBack { .. }
            | E::TestsCompleted { .. }
            | E::CommitPushed { .. }
            | E::JobRunRequested { .. }
            | E::DebugSessionOpened { .. }
            | E::DebugSessionClosed { .. }
            | E::DebugAccessed { .. }
            | E::JobRunSkipped { .. }
            | E::JobRunStarted { .. }
            | E::JobRunFinished { .. }
            | E::RestartRequested { .. }
            | E::RestartStarted { .. }
            | E::BuildStarted { .. }
            | E::BuildSucceeded { .. }
            | E::DeploymentUnhealthy { .. }
            | E::DeploymentHealthy { .. }
            | E::TestRunRequested { .. }
            | E::TestRunStarted { .. }
            | E::EnvironmentDeactivated { .. }
            | E::EnvironmentReactivated { .. } => {}
        }
        Ok(vec![])
    }
}

/// One project's usage on one day.
#[derive(Debug, Clone, PartialEq, serde::Serialize, sqlx::FromRow)]
pub struct UsageDay {
    pub project_id: Uuid,
    pub day: NaiveDate,
    pub environments_created: i32,
    pub deployments_requested: i32,
    pub deployments_ready: i32,
    pub deployments_failed: i32,
    /// Mean time from a deployment's request to Ready, over the day's Ready deployments.
    pub mean_seconds_to_ready: Option<f64>,
    pub tests_passed: i32,
    pub tests_failed: i32,
    pub environments_terminated: i32,
}

/// Usage rows, oldest day first, of one project or all, within `[from, to]` when given.
pub async fn usage(
    pool: &sqlx::PgPool,
    project: Option<Uuid>,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
) -> sqlx::Result<Vec<UsageDay>> {
    sqlx::query_as(
        "SELECT project_id, day, environments_created, deployments_requested, deployments_ready, deployments_failed,
                CASE WHEN deployments_ready > 0 THEN seconds_to_ready_sum / deployments_ready END AS mean_seconds_to_ready,
                tests_passed, tests_failed, environments_terminated
         FROM preview_usage
         WHERE ($1::uuid IS NULL OR project_id = $1) AND ($2::date IS NULL OR day >= $2) AND ($3::date IS NULL OR day <= $3)
         ORDER BY day, project_id",
    )
    .bind(project)
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await
}
