//! The `preview_usage` read model: per project and UTC day, how many environments and deployments
//! there were, how they ended, how long they took to become Ready, and how their tests went.
//! Counts and durations only: never code, logs or secrets.

use async_trait::async_trait;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgConnection;
use understudy_adapters::LoggedEvent;
use understudy_domain::environment::EnvironmentEvent;
use uuid::Uuid;

use crate::projector::RunApplied;
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

    /// Events that only count (a test's result, a failed deployment, a terminated environment)
    /// are summed in memory per environment and day and added in one statement; every other
    /// event is applied alone, in its place in the run. Counts are integers, so the sums are the
    /// same however the log is cut.
    async fn apply_run(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        run: &[(&LoggedEvent, AnyEvent)],
    ) -> Result<RunApplied, ProjectionError> {
        use EnvironmentEvent as E;
        let (mut counts, mut changes) = (Counts::default(), Vec::new());
        for (event, decoded) in run {
            let counted = match decoded {
                AnyEvent::Environment(E::TestPassed { at, .. }) => Some((at, 0)),
                AnyEvent::Environment(E::TestFailed { at, .. }) => Some((at, 1)),
                AnyEvent::Environment(E::DeploymentFailed { at, .. }) => Some((at, 2)),
                AnyEvent::Environment(E::EnvironmentTerminated { at, .. }) => Some((at, 3)),
                _ => None,
            };
            match counted {
                Some((at, column)) => counts.add(event.aggregate_id, at.date_naive(), column),
                None => {
                    counts.flush(conn, tables).await?;
                    changes.extend(self.apply(conn, tables, event, decoded).await?);
                }
            }
        }
        counts.flush(conn, tables).await?;
        Ok(RunApplied { changes, applied: run.len(), stopped: None })
    }
}

/// Counters summed per environment and day, in the order of [`Counts::COLUMNS`].
#[derive(Default)]
struct Counts(std::collections::HashMap<(Uuid, NaiveDate), [i32; 4]>);

impl Counts {
    const COLUMNS: [&'static str; 4] = ["tests_passed", "tests_failed", "deployments_failed", "environments_terminated"];

    fn add(&mut self, environment: Uuid, day: NaiveDate, column: usize) {
        self.0.entry((environment, day)).or_default()[column] += 1;
    }

    async fn flush(&mut self, conn: &mut PgConnection, tables: &Tables) -> Result<(), ProjectionError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let table = tables.name("preview_usage");
        let [a, b, c, d] = Self::COLUMNS;
        let column = |i: usize| self.0.values().map(|counts| counts[i]).collect::<Vec<i32>>();
        sqlx::query(&format!(
            "INSERT INTO {table} (project_id, day, {a}, {b}, {c}, {d})
             SELECT u.project_id, n.day, sum(n.a), sum(n.b), sum(n.c), sum(n.d)
             FROM UNNEST($1::uuid[], $2::date[], $3::int[], $4::int[], $5::int[], $6::int[]) AS n (environment_id, day, a, b, c, d)
             JOIN {environments} u ON u.environment_id = n.environment_id
             GROUP BY u.project_id, n.day
             ON CONFLICT (project_id, day) DO UPDATE SET
                 {a} = {table}.{a} + EXCLUDED.{a}, {b} = {table}.{b} + EXCLUDED.{b},
                 {c} = {table}.{c} + EXCLUDED.{c}, {d} = {table}.{d} + EXCLUDED.{d}",
            environments = tables.name("usage_environments")
        ))
        .bind(self.0.keys().map(|(environment, _)| *environment).collect::<Vec<_>>())
        .bind(self.0.keys().map(|(_, day)| *day).collect::<Vec<_>>())
        .bind(column(0))
        .bind(column(1))
        .bind(column(2))
        .bind(column(3))
        .execute(&mut *conn)
        .await?;
        self.0.clear();
        Ok(())
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
