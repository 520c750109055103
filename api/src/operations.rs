//! GraphQL for working with environments: finding a project by its names, a deployment's log
//! page by page, and the mutations that redeploy, stop, wake and re-test an environment. Each
//! checks the role matrix and appends an event; each answers with the environment's state as
//! the event store has it right after the append.

use async_graphql::{Context, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use understudy_domain::environment::{Environment as EnvironmentState, EnvironmentCommand};
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_domain::permissions::Permission;
use understudy_domain::Metadata;
use uuid::Uuid;

use crate::accounts::{auth, bad_input, command_error, denied, require_project, viewer, ProjectSettings};
use crate::auth::Denied;
use crate::graphql::LogLine;

/// Most lines one page of a log holds.
pub const MAX_LOG_PAGE: i64 = 5000;

/// One deployment of an environment: one commit built once.
#[derive(SimpleObject, Clone, Debug)]
pub struct Deployment {
    pub id: Uuid,
    pub commit: String,
    /// `Requested`, `AwaitingApproval`, `Building`, `Starting`, `Ready`, `Failed` or `Superseded`.
    pub status: String,
    pub requested_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub url: Option<String>,
    pub failure: Option<String>,
    pub tests: Vec<crate::graphql::TestResult>,
}

impl From<&understudy_domain::environment::Deployment> for Deployment {
    fn from(d: &understudy_domain::environment::Deployment) -> Self {
        Self {
            id: d.id.0,
            commit: d.commit.to_string(),
            status: d.status.as_str().to_string(),
            requested_at: d.requested_at,
            updated_at: d.updated_at,
            url: d.url.clone(),
            failure: d.failure.clone(),
            tests: d
                .tests
                .iter()
                .map(|t| crate::graphql::TestResult {
                    name: t.name.clone(),
                    outcome: match t.outcome {
                        understudy_domain::environment::TestOutcome::Passed => "Passed".into(),
                        understudy_domain::environment::TestOutcome::Failed => "Failed".into(),
                    },
                    duration_ms: t.duration_ms,
                    at: t.at,
                })
                .collect(),
        }
    }
}

/// A page of a deployment's log.
#[derive(SimpleObject, Clone, Debug)]
pub struct LogPage {
    pub lines: Vec<LogLine>,
    /// Pass as `after` for the next page (unix nanoseconds, as a string); the same as `after`
    /// when there is nothing newer yet.
    pub next: String,
    pub has_more: bool,
}

/// An environment's state right after a mutation.
#[derive(SimpleObject, Clone, Debug)]
pub struct EnvironmentChange {
    pub environment_id: Uuid,
    /// The environment's status (`Requested`, `Building`, … `Stale`, `Terminated`).
    pub status: String,
    /// The deployment the change concerns, when there is one.
    pub deployment: Option<Deployment>,
}

fn change(environment_id: Uuid, state: &EnvironmentState, deployment: Option<DeploymentId>) -> EnvironmentChange {
    let deployment = match deployment {
        Some(id) => state.deployments.iter().find(|d| d.id == id),
        None => state.current(),
    };
    EnvironmentChange {
        environment_id,
        status: state.status().map(|s| s.as_str().to_string()).unwrap_or_default(),
        deployment: deployment.map(Deployment::from),
    }
}

#[derive(Default)]
pub struct OperationsQuery;

#[Object]
impl OperationsQuery {
    /// A project by its account's name and its own (as in dashboard URLs).
    async fn project_by_name(&self, ctx: &Context<'_>, account: String, name: String) -> Result<ProjectSettings> {
        let id: Option<Uuid> = sqlx::query_scalar(
            "SELECT p.project_id FROM projects p JOIN accounts a USING (account_id)
             WHERE lower(a.name) = lower($1) AND lower(p.name) = lower($2) AND NOT a.deleted",
        )
        .bind(&account)
        .bind(&name)
        .fetch_optional(&auth(ctx)?.store.pool)
        .await?;
        let not_found = || denied(Denied::NotFound(format!("no project {account}/{name} that you can see")));
        let id = id.ok_or_else(not_found)?;
        require_project(ctx, id, Permission::ViewProjects).await.map_err(|_| not_found())?;
        Ok(ProjectSettings { id })
    }

    /// A page of a deployment's log: lines after `after` (unix nanoseconds as a string, `0` from
    /// the start), at most `first`. `stream` is `build`, `run`, `tests` or `test:<name>`.
    async fn logs(
        &self,
        ctx: &Context<'_>,
        deployment_id: Uuid,
        #[graphql(default_with = "\"build\".to_string()")] stream: String,
        #[graphql(default_with = "\"0\".to_string()")] after: String,
        #[graphql(default = 1000, validator(minimum = 1, maximum = 5000))] first: i64,
    ) -> Result<LogPage> {
        let auth = auth(ctx)?;
        if viewer(ctx) != crate::auth::Viewer::Operator {
            let project = auth.project_of_deployment(deployment_id).await?;
            match project {
                Some(project) => require_project(ctx, project.0, Permission::ViewPreviewEnvironments).await?,
                None => return Err(denied(Denied::NotFound(format!("no deployment {deployment_id} that you can see")))),
            }
        }
        let stored = match stream.as_str() {
            "build" | "run" => stream.clone(),
            "tests" => "test*".into(),
            test if test.starts_with("test:") && !test.ends_with('*') => stream.clone(),
            other => return Err(bad_input(format!("unknown log stream {other:?}: use build, run, tests or test:<name>"))),
        };
        let from: i64 = after.parse().map_err(|_| bad_input(format!("after must be unix nanoseconds, not {after:?}")))?;
        let first = first.min(MAX_LOG_PAGE);
        let lines = understudy_adapters::preview::logs::read_after(&auth.store.pool, deployment_id, &stored, from, first).await?;
        let has_more = lines.len() as i64 == first;
        let next = lines.last().map_or(from, |l| l.nano).to_string();
        Ok(LogPage { lines: lines.into_iter().map(LogLine::from).collect(), next, has_more })
    }
}

#[derive(Default)]
pub struct OperationsMutation;

impl OperationsMutation {
    /// Checks `permission` on the environment's project; its current state.
    async fn environment(ctx: &Context<'_>, environment_id: Uuid, permission: Permission) -> Result<EnvironmentState> {
        let auth = auth(ctx)?;
        let state = auth.store.environments.load(environment_id).await?.into_inner();
        let not_found = || denied(Denied::NotFound(format!("no environment {environment_id} that you can see")));
        let spec = state.spec.as_ref().ok_or_else(not_found)?;
        let project: ProjectId = spec.project_id;
        match auth.require_project(&viewer(ctx), project, permission).await {
            Ok(()) => Ok(state),
            Err(Denied::NotFound(_)) => Err(not_found()),
            Err(other) => Err(denied(other)),
        }
    }

    async fn execute(ctx: &Context<'_>, environment_id: Uuid, command: EnvironmentCommand) -> Result<EnvironmentState> {
        let meta = Metadata::new(Uuid::new_v4(), viewer(ctx).actor());
        let done = auth(ctx)?.store.environments.execute(environment_id, command, meta).await.map_err(command_error)?;
        Ok(done.state)
    }
}

#[Object]
impl OperationsMutation {
    /// Builds and starts the environment's current commit again, as a new deployment (Manage
    /// Projects). A stale environment wakes; a build in flight is superseded.
    async fn redeploy(&self, ctx: &Context<'_>, environment_id: Uuid) -> Result<EnvironmentChange> {
        Self::environment(ctx, environment_id, Permission::ManageProjects).await?;
        let deployment_id = DeploymentId(Uuid::new_v4());
        let state = Self::execute(ctx, environment_id, EnvironmentCommand::Redeploy { deployment_id, at: Utc::now() }).await?;
        Ok(change(environment_id, &state, Some(deployment_id)))
    }

    /// Stops a Ready or Failed environment now, as the idle sweep would (Manage Projects); the
    /// next commit or visit brings it back.
    async fn stop_environment(&self, ctx: &Context<'_>, environment_id: Uuid) -> Result<EnvironmentChange> {
        Self::environment(ctx, environment_id, Permission::ManageProjects).await?;
        let state = Self::execute(ctx, environment_id, EnvironmentCommand::Deactivate { at: Utc::now() }).await?;
        Ok(change(environment_id, &state, None))
    }

    /// Wakes a stale environment (anyone who may see it: a visit does the same).
    async fn wake_environment(&self, ctx: &Context<'_>, environment_id: Uuid) -> Result<EnvironmentChange> {
        let state = Self::environment(ctx, environment_id, Permission::ViewPreviewEnvironments).await?;
        if state.status() != Some(understudy_domain::environment::EnvironmentStatus::Stale) {
            return Ok(change(environment_id, &state, None));
        }
        let deployment_id = DeploymentId(Uuid::new_v4());
        let state = Self::execute(ctx, environment_id, EnvironmentCommand::Wake { deployment_id, at: Utc::now() }).await?;
        Ok(change(environment_id, &state, Some(deployment_id)))
    }

    /// Runs the tests of the environment's Ready deployment again, each in a fresh instance
    /// (anyone who may see it). A run already waiting is joined.
    async fn run_tests(&self, ctx: &Context<'_>, environment_id: Uuid) -> Result<EnvironmentChange> {
        let state = Self::environment(ctx, environment_id, Permission::ViewPreviewEnvironments).await?;
        let deployment = state.current().map(|d| d.id).ok_or_else(|| bad_input("this environment has no deployment yet"))?;
        let command = EnvironmentCommand::RequestTestRun { deployment_id: deployment, run_id: Uuid::new_v4(), at: Utc::now() };
        let state = Self::execute(ctx, environment_id, command).await?;
        Ok(change(environment_id, &state, Some(deployment)))
    }
}
