//! The `environments` read model: the current status of every environment (project × branch or
//! PR × entrypoint), its latest deployment and its test summary.
//!
//! The row keeps the aggregate state folded by the domain's own `apply`, and every column is
//! derived from it, so the read model follows exactly the rules the command side enforces.

use async_trait::async_trait;
use sqlx::types::Json;
use sqlx::PgConnection;
use understudy_adapters::LoggedEvent;
use understudy_domain::environment::{Environment, EnvironmentAggregate, TestOutcome};
use understudy_domain::Aggregate;

use crate::{AnyEvent, Change, Projection, ProjectionError, Tables};

pub struct Environments;

pub const READ_MODEL: &str = "environment";

#[async_trait]
impl Projection for Environments {
    fn name(&self) -> &'static str {
        "environments"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["environments"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        event: &LoggedEvent,
        decoded: &AnyEvent,
    ) -> Result<Vec<Change>, ProjectionError> {
        let AnyEvent::Environment(domain_event) = decoded else {
            return Ok(vec![]);
        };
        let table = tables.name("environments");
        let stored: Option<Json<Environment>> = sqlx::query_scalar(&format!("SELECT state FROM {table} WHERE environment_id = $1"))
            .bind(event.aggregate_id)
            .fetch_optional(&mut *conn)
            .await?;
        let state = EnvironmentAggregate::apply(stored.map(|s| s.0).unwrap_or_default(), domain_event);
        let (Some(spec), Some(status)) = (state.spec.clone(), state.status()) else {
            // Only creation brings an environment into existence; anything before it is a
            // history this build cannot read.
            return Err(ProjectionError::undecodable(event, "event for an environment that was never created"));
        };
        let current = state.current();
        let tests = current.map(|d| d.tests.clone()).unwrap_or_default();
        let count = |outcome: TestOutcome| tests.iter().filter(|t| t.outcome == outcome).count() as i32;
        let created_at = state.deployments.first().map(|d| d.requested_at).unwrap_or(event.recorded_at);
        let (target_kind, pull_request) = (spec.target.kind(), spec.target.pull_request().map(|n| n as i64));
        sqlx::query(&format!(
            "INSERT INTO {table} (environment_id, project_id, target_kind, branch, pull_request, entrypoint, status,
                 latest_deployment_id, latest_commit, latest_deployment_status, preview_url, failure,
                 tests_passed, tests_failed, tests, created_at, updated_at, state, position)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19)
             ON CONFLICT (environment_id) DO UPDATE SET
                 status = EXCLUDED.status, latest_deployment_id = EXCLUDED.latest_deployment_id,
                 latest_commit = EXCLUDED.latest_commit, latest_deployment_status = EXCLUDED.latest_deployment_status,
                 preview_url = EXCLUDED.preview_url, failure = EXCLUDED.failure,
                 tests_passed = EXCLUDED.tests_passed, tests_failed = EXCLUDED.tests_failed, tests = EXCLUDED.tests,
                 updated_at = EXCLUDED.updated_at, state = EXCLUDED.state, position = EXCLUDED.position"
        ))
        .bind(event.aggregate_id)
        .bind(spec.project_id.0)
        .bind(target_kind)
        .bind(spec.target.label())
        .bind(pull_request)
        .bind(spec.entrypoint.as_str())
        .bind(status.as_str())
        .bind(current.map(|d| d.id.0))
        .bind(current.map(|d| d.commit.as_str().to_string()))
        .bind(current.map(|d| d.status.as_str()))
        .bind(current.and_then(|d| d.url.clone()))
        .bind(current.and_then(|d| d.failure.clone()))
        .bind(count(TestOutcome::Passed))
        .bind(count(TestOutcome::Failed))
        .bind(Json(&tests))
        .bind(created_at)
        .bind(state.updated_at.unwrap_or(event.recorded_at))
        .bind(Json(&state))
        .bind(event.position)
        .execute(&mut *conn)
        .await?;
        Ok(vec![Change {
            read_model: READ_MODEL.into(),
            key: spec.project_id.to_string(),
            id: event.aggregate_id,
            position: event.position,
        }])
    }
}
