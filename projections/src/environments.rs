//! The `environments` read model: the current status of every environment (project × branch or
//! PR × entrypoint), its latest deployment and its test summary.
//!
//! The row keeps the aggregate state folded by the domain's own `apply`, and every column is
//! derived from it, so the read model follows exactly the rules the command side enforces.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::PgConnection;
use understudy_adapters::LoggedEvent;
use understudy_domain::environment::{Environment, EnvironmentAggregate, TestOutcome};
use understudy_domain::Aggregate;
use uuid::Uuid;

use crate::projector::RunApplied;
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
        self.apply_run(conn, tables, &[(event, decoded.clone())]).await?.into_result()
    }

    /// Folds the run in memory, environment by environment, and writes each environment it
    /// touched once, in one statement: a replay's batch of thousands of events is one read and
    /// one write instead of two round trips per event.
    async fn apply_run(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        run: &[(&LoggedEvent, AnyEvent)],
    ) -> Result<RunApplied, ProjectionError> {
        let table = tables.name("environments");
        let ids: Vec<Uuid> = run.iter().filter(|(_, d)| matches!(d, AnyEvent::Environment(_))).map(|(e, _)| e.aggregate_id).collect();
        let mut done = RunApplied::default();
        if ids.is_empty() {
            done.applied = run.len();
            return Ok(done);
        }
        let stored: Vec<(Uuid, Json<Environment>)> =
            sqlx::query_as(&format!("SELECT environment_id, state FROM {table} WHERE environment_id = ANY($1)"))
                .bind(&ids)
                .fetch_all(&mut *conn)
                .await?;
        let mut states: HashMap<Uuid, Environment> = stored.into_iter().map(|(id, state)| (id, state.0)).collect();
        // A row's `created_at` is fixed by the event that inserts it, as if applied alone, so the
        // row is the same however the log is cut into batches.
        let mut created: HashMap<Uuid, DateTime<Utc>> = HashMap::new();
        // Each touched environment with the event that last changed it, in first-touched order.
        let mut touched: Vec<(Uuid, &LoggedEvent)> = Vec::new();
        let mut slot: HashMap<Uuid, usize> = HashMap::new();
        for (event, decoded) in run {
            if let AnyEvent::Environment(domain_event) = decoded {
                let new_row = !states.contains_key(&event.aggregate_id);
                let state = EnvironmentAggregate::apply(states.remove(&event.aggregate_id).unwrap_or_default(), domain_event);
                if state.spec.is_none() || state.status().is_none() {
                    // Only creation brings an environment into existence; anything before it is
                    // a history this build cannot read.
                    done.stopped = Some(ProjectionError::undecodable(event, "event for an environment that was never created"));
                    break;
                }
                if new_row {
                    created.insert(event.aggregate_id, state.deployments.first().map_or(event.recorded_at, |d| d.requested_at));
                }
                states.insert(event.aggregate_id, state);
                match slot.get(&event.aggregate_id) {
                    Some(&i) => touched[i].1 = event,
                    None => {
                        slot.insert(event.aggregate_id, touched.len());
                        touched.push((event.aggregate_id, event));
                    }
                }
            }
            done.applied += 1;
        }
        let mut rows = Rows::default();
        for (id, event) in &touched {
            let state = &states[id];
            // Rows that exist keep their `created_at` (the upsert does not change it).
            rows.push(*id, state, event, created.get(id).copied().unwrap_or(event.recorded_at));
            done.changes.push(Change {
                read_model: READ_MODEL.into(),
                key: state.spec.as_ref().map(|spec| spec.project_id.to_string()).unwrap_or_default(),
                id: *id,
                position: event.position,
            });
        }
        rows.upsert(conn, &table).await?;
        Ok(done)
    }
}

/// The columns of the environments rows to write, one array per column.
#[derive(Default)]
struct Rows {
    environment_id: Vec<Uuid>,
    project_id: Vec<Uuid>,
    target_kind: Vec<&'static str>,
    branch: Vec<String>,
    pull_request: Vec<Option<i64>>,
    entrypoint: Vec<String>,
    status: Vec<&'static str>,
    latest_deployment_id: Vec<Option<Uuid>>,
    latest_commit: Vec<Option<String>>,
    latest_deployment_status: Vec<Option<&'static str>>,
    preview_url: Vec<Option<String>>,
    failure: Vec<Option<String>>,
    tests_passed: Vec<i32>,
    tests_failed: Vec<i32>,
    tests: Vec<serde_json::Value>,
    created_at: Vec<DateTime<Utc>>,
    updated_at: Vec<DateTime<Utc>>,
    state: Vec<serde_json::Value>,
    position: Vec<i64>,
}

impl Rows {
    /// Adds the row of `state`, as of `event` (the last event applied to it).
    fn push(&mut self, id: Uuid, state: &Environment, event: &LoggedEvent, created_at: DateTime<Utc>) {
        let (Some(spec), Some(status)) = (state.spec.as_ref(), state.status()) else { return };
        let current = state.current();
        let tests = current.map(|d| d.tests.clone()).unwrap_or_default();
        let count = |outcome: TestOutcome| tests.iter().filter(|t| t.outcome == outcome).count() as i32;
        self.environment_id.push(id);
        self.project_id.push(spec.project_id.0);
        self.target_kind.push(spec.target.kind());
        self.branch.push(spec.target.label().to_string());
        self.pull_request.push(spec.target.pull_request().map(|n| n as i64));
        self.entrypoint.push(spec.entrypoint.as_str().to_string());
        self.status.push(status.as_str());
        self.latest_deployment_id.push(current.map(|d| d.id.0));
        self.latest_commit.push(current.map(|d| d.commit.as_str().to_string()));
        self.latest_deployment_status.push(current.map(|d| d.status.as_str()));
        self.preview_url.push(current.and_then(|d| d.url.clone()));
        self.failure.push(current.and_then(|d| d.failure.clone()));
        self.tests_passed.push(count(TestOutcome::Passed));
        self.tests_failed.push(count(TestOutcome::Failed));
        self.created_at.push(created_at);
        self.tests.push(serde_json::to_value(&tests).unwrap_or_default());
        self.updated_at.push(state.updated_at.unwrap_or(event.recorded_at));
        self.state.push(serde_json::to_value(state).unwrap_or_default());
        self.position.push(event.position);
    }

    async fn upsert(self, conn: &mut PgConnection, table: &str) -> Result<(), ProjectionError> {
        if self.environment_id.is_empty() {
            return Ok(());
        }
        sqlx::query(&format!(
            "INSERT INTO {table} (environment_id, project_id, target_kind, branch, pull_request, entrypoint, status,
                 latest_deployment_id, latest_commit, latest_deployment_status, preview_url, failure,
                 tests_passed, tests_failed, tests, created_at, updated_at, state, position)
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::bigint[], $6::text[], $7::text[],
                 $8::uuid[], $9::text[], $10::text[], $11::text[], $12::text[],
                 $13::int[], $14::int[], $15::jsonb[], $16::timestamptz[], $17::timestamptz[], $18::jsonb[], $19::bigint[])
             ON CONFLICT (environment_id) DO UPDATE SET
                 status = EXCLUDED.status, latest_deployment_id = EXCLUDED.latest_deployment_id,
                 latest_commit = EXCLUDED.latest_commit, latest_deployment_status = EXCLUDED.latest_deployment_status,
                 preview_url = EXCLUDED.preview_url, failure = EXCLUDED.failure,
                 tests_passed = EXCLUDED.tests_passed, tests_failed = EXCLUDED.tests_failed, tests = EXCLUDED.tests,
                 updated_at = EXCLUDED.updated_at, state = EXCLUDED.state, position = EXCLUDED.position"
        ))
        .bind(self.environment_id)
        .bind(self.project_id)
        .bind(self.target_kind)
        .bind(self.branch)
        .bind(self.pull_request)
        .bind(self.entrypoint)
        .bind(self.status)
        .bind(self.latest_deployment_id)
        .bind(self.latest_commit)
        .bind(self.latest_deployment_status)
        .bind(self.preview_url)
        .bind(self.failure)
        .bind(self.tests_passed)
        .bind(self.tests_failed)
        .bind(self.tests)
        .bind(self.created_at)
        .bind(self.updated_at)
        .bind(self.state)
        .bind(self.position)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}
