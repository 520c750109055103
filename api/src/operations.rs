//! GraphQL for working with environments: finding a project by its names, a deployment's log
//! page by page, and the mutations that redeploy, stop, wake and re-test an environment. Each
//! checks the role matrix and appends an event; each answers with the environment's state as
//! the event store has it right after the append.

use async_graphql::{Context, ErrorExtensions, Object, Result, SimpleObject};
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
    /// Every test has reported (what promotion waits for, with none failed).
    pub tests_completed: bool,
    /// The deployment of another tier it was promoted from.
    pub promoted_from: Option<Uuid>,
    /// The earlier deployment of this environment it rolled back to.
    pub rolled_back_to: Option<Uuid>,
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
            tests_completed: d.tests_completed,
            promoted_from: d.promoted_from.map(|id| id.0),
            rolled_back_to: d.rolled_back_to.map(|id| id.0),
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

pub(crate) fn change(environment_id: Uuid, state: &EnvironmentState, deployment: Option<DeploymentId>) -> EnvironmentChange {
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

/// A repository the viewer can reach on GitHub, for the new-project flow.
#[derive(SimpleObject, Clone, Debug)]
pub struct Repository {
    pub full_name: String,
    pub private: bool,
    pub default_branch: Option<String>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Whether the viewer may make it a project (admin or maintain on GitHub).
    pub can_manage: bool,
    /// Its project, when it already is one.
    pub project_id: Option<Uuid>,
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

    /// The repositories the signed-in user can reach on GitHub, most recently updated first,
    /// page by page (`after` is the previous page's `endCursor`).
    async fn repositories(
        &self,
        ctx: &Context<'_>,
        after: Option<String>,
        #[graphql(default = 30, validator(minimum = 1, maximum = 100))] first: i32,
    ) -> Result<async_graphql::connection::Connection<String, Repository>> {
        let auth = auth(ctx)?;
        let Some(user) = viewer(ctx).user_id() else { return Err(denied(Denied::Unauthenticated)) };
        let oauth = auth.oauth.as_ref().ok_or_else(|| bad_input("sign-in with GitHub is not configured here"))?;
        let token = auth.github_token(user).await.ok_or_else(|| denied(Denied::Unauthenticated))?;
        let page: u32 = match after.as_deref() {
            None => 1,
            Some(cursor) => cursor
                .strip_prefix("page:")
                .and_then(|p| p.parse::<u32>().ok())
                .map(|p| p + 1)
                .ok_or_else(|| bad_input(format!("cursor {cursor:?} is not one this API gave out")))?,
        };
        let (repos, more) = oauth.repositories(&token, page, first as u32).await.map_err(|e| bad_input(e.to_string()))?;
        let names: Vec<String> = repos.iter().filter_map(|r| r["full_name"].as_str().map(str::to_lowercase)).collect();
        let projects: Vec<(String, Uuid)> =
            sqlx::query_as("SELECT lower(repository), project_id FROM projects WHERE lower(repository) = ANY($1) AND active")
                .bind(&names)
                .fetch_all(&auth.store.pool)
                .await?;
        let mut connection = async_graphql::connection::Connection::new(page > 1, more);
        for repo in repos {
            let full_name = repo["full_name"].as_str().unwrap_or_default().to_string();
            let project_id = projects.iter().find(|(name, _)| *name == full_name.to_lowercase()).map(|(_, id)| *id);
            let node = Repository {
                private: repo["private"].as_bool().unwrap_or(false),
                default_branch: repo["default_branch"].as_str().map(str::to_string),
                updated_at: repo["updated_at"].as_str().and_then(|t| t.parse().ok()),
                can_manage: repo["permissions"]["admin"].as_bool().unwrap_or(false)
                    || repo["permissions"]["maintain"].as_bool().unwrap_or(false),
                project_id,
                full_name,
            };
            connection.edges.push(async_graphql::connection::Edge::new(format!("page:{page}"), node));
        }
        Ok(connection)
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
    pub(crate) async fn environment(ctx: &Context<'_>, environment_id: Uuid, permission: Permission) -> Result<EnvironmentState> {
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

    pub(crate) async fn execute(ctx: &Context<'_>, environment_id: Uuid, command: EnvironmentCommand) -> Result<EnvironmentState> {
        let meta = Metadata::new(Uuid::new_v4(), viewer(ctx).actor());
        let done = auth(ctx)?.store.environments.execute(environment_id, command, meta).await.map_err(command_error)?;
        Ok(done.state)
    }
}

#[Object]
impl OperationsMutation {
    /// Makes a GitHub repository a project, deploying `productionBranch` (its default branch
    /// when omitted). You need admin or maintain on the repository, the Understudy App must be
    /// installed for it, and the branch must exist.
    async fn create_project(&self, ctx: &Context<'_>, repository: String, production_branch: Option<String>) -> Result<ProjectSettings> {
        let auth = auth(ctx)?;
        let Some(user) = viewer(ctx).user_id() else { return Err(denied(Denied::Unauthenticated)) };
        understudy_domain::values::RepoFullName::parse(repository.as_str()).map_err(|e| bad_input(e.to_string()))?;
        let (Some(oauth), Some(github)) = (&auth.oauth, &auth.github) else {
            return Err(bad_input("creating projects needs the GitHub App and sign-in configured here"));
        };
        let token = auth.github_token(user).await.ok_or_else(|| denied(Denied::Unauthenticated))?;
        let repo = oauth.repository(&token, &repository).await.map_err(|e| bad_input(e.to_string()))?;
        let repo = repo.ok_or_else(|| denied(Denied::NotFound(format!("no repository {repository} that you can see on GitHub"))))?;
        let permissions = &repo["permissions"];
        if !(permissions["admin"].as_bool().unwrap_or(false) || permissions["maintain"].as_bool().unwrap_or(false)) {
            return Err(denied(Denied::Forbidden(format!("making {repository} a project needs admin or maintain on it in GitHub"))));
        }
        let existing: Option<bool> = sqlx::query_scalar("SELECT active FROM projects WHERE lower(repository) = lower($1)")
            .bind(&repository)
            .fetch_optional(&auth.store.pool)
            .await?;
        if existing == Some(true) {
            return Err(
                async_graphql::Error::new(format!("{repository} is already a project")).extend_with(|_, e| e.set("code", "ALREADY_EXISTS"))
            );
        }
        let installation = github.installation_of(&repository).await.map_err(|e| bad_input(e.to_string()))?;
        let installation = installation.ok_or_else(|| {
            let owner = repository.split('/').next().unwrap_or_default();
            bad_input(format!("the Understudy GitHub App is not installed for {repository}: install it on {owner} first"))
        })?;
        let branch = production_branch.or_else(|| repo["default_branch"].as_str().map(str::to_string)).unwrap_or_else(|| "main".into());
        if !github.branch_exists(installation, &repository, &branch).await.map_err(|e| bad_input(e.to_string()))? {
            return Err(bad_input(format!("{repository} has no branch {branch:?}")));
        }
        let ingest = understudy_adapters::github::ingest::Ingest { store: auth.store.clone(), github: Some(github.clone()) };
        let project = ingest.create_project(installation, &repository, Some(&branch)).await.map_err(|e| bad_input(e.to_string()))?;
        let id = project.id.ok_or_else(|| bad_input("the project was not created"))?;
        Ok(ProjectSettings { id: id.0 })
    }

    /// Deletes a project (Manage Projects): its environments are torn down and it stops
    /// deploying; its history stays in the log.
    async fn delete_project(&self, ctx: &Context<'_>, project_id: Uuid) -> Result<bool> {
        require_project(ctx, project_id, Permission::ManageProjects).await?;
        let auth = auth(ctx)?;
        let meta = Metadata::new(Uuid::new_v4(), viewer(ctx).actor());
        let reason = format!("deleted by {}", viewer(ctx).actor());
        let live: Vec<Uuid> =
            sqlx::query_scalar("SELECT environment_id FROM environments WHERE project_id = $1 AND status <> 'Terminated'")
                .bind(project_id)
                .fetch_all(&auth.store.pool)
                .await?;
        for environment in live {
            let command = EnvironmentCommand::Terminate { reason: reason.clone(), at: Utc::now() };
            auth.store.environments.execute(environment, command, meta.clone()).await.map_err(command_error)?;
        }
        let command = understudy_domain::project::ProjectCommand::Deactivate { reason, at: Utc::now() };
        auth.store.projects.execute(project_id, command, meta).await.map_err(command_error)?;
        Ok(true)
    }

    /// Which entrypoints get environments (Manage Projects): these paths, or detection when
    /// `entrypoints` is empty.
    async fn set_entrypoints(&self, ctx: &Context<'_>, project_id: Uuid, entrypoints: Vec<String>) -> Result<ProjectSettings> {
        require_project(ctx, project_id, Permission::ManageProjects).await?;
        let rule = if entrypoints.is_empty() {
            understudy_domain::project::EntrypointRule::Detect
        } else {
            let parsed = entrypoints
                .iter()
                .map(|e| understudy_domain::values::Entrypoint::parse(e.as_str()))
                .collect::<std::result::Result<Vec<_>, _>>()
                .map_err(|e| bad_input(e.to_string()))?;
            understudy_domain::project::EntrypointRule::Listed { entrypoints: parsed }
        };
        let meta = Metadata::new(Uuid::new_v4(), viewer(ctx).actor());
        let command = understudy_domain::project::ProjectCommand::ChangeEntrypoints { entrypoints: rule, at: Utc::now() };
        auth(ctx)?.store.projects.execute(project_id, command, meta).await.map_err(command_error)?;
        Ok(ProjectSettings { id: project_id })
    }

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

    /// Restarts the app of the environment's Ready deployment (Manage Projects): the same build,
    /// a fresh process, done by the worker serving it.
    async fn restart_environment(&self, ctx: &Context<'_>, environment_id: Uuid) -> Result<EnvironmentChange> {
        let state = Self::environment(ctx, environment_id, Permission::ManageProjects).await?;
        let deployment = state.current().map(|d| d.id).ok_or_else(|| bad_input("this environment has no deployment yet"))?;
        let command = EnvironmentCommand::RequestRestart { deployment_id: deployment, restart_id: Uuid::new_v4(), at: Utc::now() };
        let state = Self::execute(ctx, environment_id, command).await?;
        Ok(change(environment_id, &state, Some(deployment)))
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
