//! The GraphQL schema: queries over the read models and live subscriptions.

use async_graphql::{Context, Enum, MergedObject, Object, Result, Schema, SchemaBuilder, SimpleObject, Subscription, ID};
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt};
use sqlx::PgPool;
use understudy_adapters::nats::Topology;
use understudy_domain::environment::EnvironmentStatus as DomainStatus;
use understudy_projections::environments::READ_MODEL;
use understudy_projections::Change;
use uuid::Uuid;

use crate::accounts::{denied, require_project, viewer, AccountQuery, Mutation};
use crate::auth::{Auth, Denied, Viewer};
use crate::operations::{OperationsMutation, OperationsQuery};
use crate::shared_subscriptions::{Probe, SharedExecution};
use understudy_domain::ids::ProjectId;
use understudy_domain::permissions::Permission;

pub type AppSchema = Schema<QueryRoot, MutationRoot, Subscription>;

/// Every mutation: people and settings ([`Mutation`]), environments ([`OperationsMutation`]) and
/// tiers ([`crate::tiers::TiersMutation`]).
#[derive(MergedObject, Default)]
pub struct MutationRoot(Mutation, OperationsMutation, crate::tiers::TiersMutation, crate::debug::DebugMutation);

/// Every query: environments, logs and history ([`Query`]) and people and settings
/// ([`AccountQuery`]).
#[derive(MergedObject, Default)]
pub struct QueryRoot(Query, AccountQuery, OperationsQuery);

/// Largest page any list returns.
pub const MAX_PAGE: i64 = 500;

/// The schema in SDL, without any connection (for `schema.graphql`).
pub fn sdl() -> String {
    Schema::build(QueryRoot::default(), MutationRoot::default(), Subscription).finish().sdl()
}

pub fn schema(pool: PgPool, nats: async_nats::Client, topology: Topology, auth: Auth) -> AppSchema {
    let builder = Schema::build(QueryRoot::default(), MutationRoot::default(), Subscription)
        .data(auth)
        .data(SharedReads::default())
        .data(pool)
        .data(nats)
        .data(topology);
    with_limits(builder).finish()
}

/// The limits every served schema enforces on a request: how deep, how costly and how
/// recursive it may be. The fuzz target applies the same ones.
pub fn with_limits(builder: SchemaBuilder<QueryRoot, MutationRoot, Subscription>) -> SchemaBuilder<QueryRoot, MutationRoot, Subscription> {
    builder.limit_depth(12).limit_complexity(2000).limit_recursive_depth(32)
}

/// The domain's environment status, as GraphQL shows it.
#[derive(Enum, Copy, Clone, Eq, PartialEq, Debug)]
#[graphql(remote = "understudy_domain::environment::EnvironmentStatus")]
pub enum EnvironmentStatus {
    Requested,
    AwaitingApproval,
    Building,
    Starting,
    Ready,
    Failed,
    Stale,
    Terminated,
}

fn parse_status(name: &str) -> Result<EnvironmentStatus> {
    DomainStatus::parse(name)
        .map(EnvironmentStatus::from)
        .ok_or_else(|| format!("unknown environment status {name:?} in the read model").into())
}

#[derive(SimpleObject, Clone, Debug, serde::Deserialize)]
pub struct TestResult {
    pub name: String,
    /// `Passed` or `Failed`.
    pub outcome: String,
    /// How long it ran, when its runner reports it (`npm test` and other commands do; `wing test`
    /// reports no time per test).
    #[serde(default)]
    pub duration_ms: Option<u64>,
    pub at: DateTime<Utc>,
}

/// One environment: project × branch or PR × entrypoint, as of `position` in the global log.
#[derive(SimpleObject, Clone, Debug)]
#[graphql(complex)]
pub struct Environment {
    pub id: Uuid,
    pub project_id: Uuid,
    /// `branch` or `pull_request`.
    pub target_kind: String,
    pub branch: String,
    pub pull_request: Option<i64>,
    pub entrypoint: String,
    pub status: EnvironmentStatus,
    pub latest_deployment_id: Option<Uuid>,
    pub latest_commit: Option<String>,
    pub latest_deployment_status: Option<String>,
    pub preview_url: Option<String>,
    pub failure: Option<String>,
    pub tests_passed: i32,
    pub tests_failed: i32,
    pub tests: Vec<TestResult>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The global log position this row reflects: order and de-duplicate updates by it.
    pub position: i64,
}

#[derive(sqlx::FromRow)]
pub(crate) struct EnvironmentRow {
    environment_id: Uuid,
    project_id: Uuid,
    target_kind: String,
    branch: String,
    pull_request: Option<i64>,
    entrypoint: String,
    status: String,
    latest_deployment_id: Option<Uuid>,
    latest_commit: Option<String>,
    latest_deployment_status: Option<String>,
    preview_url: Option<String>,
    failure: Option<String>,
    tests_passed: i32,
    tests_failed: i32,
    tests: sqlx::types::Json<Vec<TestResult>>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    position: i64,
}

impl TryFrom<EnvironmentRow> for Environment {
    type Error = async_graphql::Error;
    fn try_from(r: EnvironmentRow) -> Result<Self> {
        Ok(Self {
            id: r.environment_id,
            project_id: r.project_id,
            target_kind: r.target_kind,
            branch: r.branch,
            pull_request: r.pull_request,
            entrypoint: r.entrypoint,
            status: parse_status(&r.status)?,
            latest_deployment_id: r.latest_deployment_id,
            latest_commit: r.latest_commit,
            latest_deployment_status: r.latest_deployment_status,
            preview_url: r.preview_url,
            failure: r.failure,
            tests_passed: r.tests_passed,
            tests_failed: r.tests_failed,
            tests: r.tests.0,
            created_at: r.created_at,
            updated_at: r.updated_at,
            position: r.position,
        })
    }
}

#[async_graphql::ComplexObject]
impl Environment {
    /// Its deployments, newest first (each commit built once; redeploys are deployments too).
    async fn deployments(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 20, validator(minimum = 1, maximum = 100))] first: usize,
    ) -> Result<Vec<crate::operations::Deployment>> {
        let state = ctx.data::<Auth>()?.store.environments.load(self.id).await?.into_inner();
        Ok(state.deployments.iter().rev().take(first).map(crate::operations::Deployment::from).collect())
    }

    /// Its open debug sessions (see `openDebugSession`).
    async fn debug_sessions(&self, ctx: &Context<'_>) -> Result<Vec<crate::debug::DebugSession>> {
        crate::debug::sessions_of(ctx, self.id).await
    }
}

const ENVIRONMENT_COLUMNS: &str = "environment_id, project_id, target_kind, branch, pull_request, entrypoint, status, \
     latest_deployment_id, latest_commit, latest_deployment_status, preview_url, failure, tests_passed, tests_failed, tests, \
     created_at, updated_at, position";

/// A cursor is `{updated_at in microseconds}_{environment id}`: the row's place in the order.
fn decode_cursor(cursor: &str) -> Result<(DateTime<Utc>, Uuid)> {
    let bad = || async_graphql::Error::new(format!("cursor {cursor:?} is not one this API gave out; use a page's endCursor"));
    let (micros, id) = cursor.split_once('_').ok_or_else(bad)?;
    let micros: i64 = micros.parse().map_err(|_| bad())?;
    let time = DateTime::<Utc>::from_timestamp_micros(micros).ok_or_else(bad)?;
    Ok((time, Uuid::parse_str(id).map_err(|_| bad())?))
}

/// One read of a changed environment shared by every subscriber of this process: a change that
/// reaches ten thousand subscribers is read from Postgres once, not ten thousand times.
#[derive(Clone, Default)]
pub struct SharedReads {
    reads: SharedCells<(Uuid, i64), Option<Environment>>,
    between: SharedCells<(Option<Uuid>, i64, i64), Vec<Environment>>,
}

/// Reads by key, each done by whichever subscriber gets there first; forgotten past 4,096 keys.
type SharedCells<K, V> = std::sync::Arc<std::sync::Mutex<std::collections::HashMap<K, std::sync::Arc<tokio::sync::OnceCell<V>>>>>;

/// The cell of `key` in `cells`.
fn shared_cell<K: std::hash::Hash + Eq, V>(cells: &SharedCells<K, V>, key: K) -> std::sync::Arc<tokio::sync::OnceCell<V>> {
    let mut cells = cells.lock().unwrap_or_else(|p| p.into_inner());
    if cells.len() > 4096 {
        cells.clear();
    }
    cells.entry(key).or_default().clone()
}

/// The (test, recorded at) pairs a subscription has sent.
type SentTests = std::sync::Arc<std::sync::Mutex<std::collections::HashSet<(String, DateTime<Utc>)>>>;

impl SharedReads {
    /// The environment as of (at least) `position`, read once per (environment, position).
    pub async fn environment(&self, pool: &PgPool, id: Uuid, position: i64) -> Result<Option<Environment>> {
        shared_cell(&self.reads, (id, position)).get_or_try_init(|| environment_by_id(pool, id)).await.cloned()
    }

    /// The environments of `project` (of every project: none) whose rows are at a position
    /// strictly between `from` and `to`, in position order, read once per (project, from, to).
    pub async fn between(&self, pool: &PgPool, project: Option<Uuid>, from: i64, to: i64) -> Result<Vec<Environment>> {
        let read = || async {
            let rows: Vec<EnvironmentRow> = sqlx::query_as(&format!(
                "SELECT {ENVIRONMENT_COLUMNS} FROM environments
                 WHERE {} AND position > $2 AND position < $3 ORDER BY position",
                of_project(project)
            ))
            .bind(project)
            .bind(from)
            .bind(to)
            .fetch_all(pool)
            .await?;
            rows.into_iter().map(Environment::try_from).collect::<Result<Vec<_>>>()
        };
        shared_cell(&self.between, (project, from, to)).get_or_try_init(read).await.cloned()
    }
}

/// How far back a heal reaches: further than a resync or a reconnect can lag behind the notices
/// that follow it (its own NATS subscription and a task of its own, milliseconds apart).
pub const HEAL_LOOKBACK: std::time::Duration = std::time::Duration::from_secs(1);

/// How long after it starts a resumed subscription heals once more (see `environment_updated`):
/// far longer than a NATS cluster takes to spread a subscription's interest.
pub const SETTLE: std::time::Duration = std::time::Duration::from_secs(1);

/// The highest position a subscription has sent, and what it was a [`HEAL_LOOKBACK`] ago. A heal
/// starts from the latter: the notices the new leader (or the reconnected client) sends after a
/// resync can reach the subscription before the resync does, and carry the highest position past
/// changes that nobody announced.
struct HighWater {
    start: i64,
    /// (when, the highest position from then on): one mark per 50 ms at most, the oldest the
    /// newest one that is a lookback old.
    marks: std::sync::Mutex<std::collections::VecDeque<(std::time::Instant, i64)>>,
}

impl HighWater {
    fn new(start: i64) -> Self {
        Self { start, marks: Default::default() }
    }

    fn raise(&self, position: i64) {
        let now = std::time::Instant::now();
        let mut marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        if position <= marks.back().map_or(self.start, |(_, high)| *high) {
            return;
        }
        match marks.back_mut() {
            Some((at, high)) if now.duration_since(*at) < std::time::Duration::from_millis(50) => *high = position,
            _ => marks.push_back((now, position)),
        }
        while marks.len() > 1 && now.duration_since(marks[1].0) >= HEAL_LOOKBACK {
            marks.pop_front();
        }
    }

    /// The highest position sent a lookback ago (within 50 ms), or the start.
    fn a_moment_ago(&self) -> i64 {
        let now = std::time::Instant::now();
        let marks = self.marks.lock().unwrap_or_else(|p| p.into_inner());
        marks.iter().rev().find(|(at, _)| now.duration_since(*at) >= HEAL_LOOKBACK).map_or(self.start, |(_, high)| *high)
    }
}

/// What a list of environments (most recently updated first) is narrowed to.
pub(crate) struct ListFilter {
    /// The projects whose environments may be listed; none: every project's.
    pub(crate) projects: Option<Vec<Uuid>>,
    pub(crate) status: Option<&'static str>,
    pub(crate) branch: Option<String>,
    pub(crate) pull_request: Option<i64>,
    /// Only those listed after this (updated_at, environment_id): the next page.
    pub(crate) before: Option<(DateTime<Utc>, Uuid)>,
}

impl ListFilter {
    /// The list's statement, up to `limit` rows. It holds only the conditions given, rather than
    /// `($n IS NULL OR …)` for each: a prepared statement's generic plan cannot drop those, and
    /// would walk every project's environments by recency to list one project's
    /// (docs/benchmarks.md).
    pub(crate) fn query(self, limit: i64) -> sqlx::QueryBuilder<'static, sqlx::Postgres> {
        let mut query = sqlx::QueryBuilder::new(format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE true"));
        match self.projects {
            Some(projects) if projects.len() == 1 => query.push(" AND project_id = ").push_bind(projects[0]),
            Some(projects) => query.push(" AND project_id = ANY(").push_bind(projects).push(")"),
            None => &mut query,
        };
        if let Some(status) = self.status {
            query.push(" AND status = ").push_bind(status);
        }
        if let Some(branch) = self.branch {
            query.push(" AND branch = ").push_bind(branch);
        }
        if let Some(pull_request) = self.pull_request {
            query.push(" AND pull_request = ").push_bind(pull_request);
        }
        if let Some((time, id)) = self.before {
            query.push(" AND (updated_at, environment_id) < (").push_bind(time).push(", ").push_bind(id).push(")");
        }
        query.push(" ORDER BY updated_at DESC, environment_id DESC LIMIT ").push_bind(limit);
        query
    }
}

/// Which environments a read by position covers: those of the project bound as `$1`, or, with
/// `$1` NULL, every project's. Two statements rather than `($1 IS NULL OR project_id = $1)`: a
/// prepared statement's generic plan cannot tell the cases apart, and would read one project's
/// newest environments by scanning every project's (migration 0014, docs/benchmarks.md).
fn of_project(project: Option<Uuid>) -> &'static str {
    if project.is_some() {
        "project_id = $1"
    } else {
        "$1::uuid IS NULL"
    }
}

/// One page of the environments of `project` (of every project: none) that changed after
/// `from`, in position order, and where the next page starts (none: this was the last).
pub(crate) async fn page_after(pool: &PgPool, project: Option<Uuid>, from: i64) -> Result<(Vec<Environment>, Option<i64>)> {
    let rows: Vec<EnvironmentRow> = sqlx::query_as(&format!(
        "SELECT {ENVIRONMENT_COLUMNS} FROM environments
         WHERE {} AND position > $2 ORDER BY position LIMIT {MAX_PAGE}",
        of_project(project)
    ))
    .bind(project)
    .bind(from)
    .fetch_all(pool)
    .await?;
    let next = (rows.len() as i64 == MAX_PAGE).then(|| rows.last().map(|row| row.position)).flatten();
    Ok((rows.into_iter().map(Environment::try_from).collect::<Result<_>>()?, next))
}

/// Every environment of `project` that changed after `from`, in position order, a page at a
/// time as the stream is read. A page that cannot be read ends it (and is logged).
fn changed_after(pool: PgPool, project: Option<Uuid>, from: i64) -> futures::stream::BoxStream<'static, Environment> {
    futures::stream::unfold(Some(from), move |from| {
        let pool = pool.clone();
        async move {
            let (page, next) = page_after(&pool, project, from?)
                .await
                .inspect_err(|error| tracing::warn!(error = ?error, "reading the environments a subscription missed failed"))
                .ok()?;
            (!page.is_empty()).then(|| (futures::stream::iter(page), next))
        }
    })
    .flatten()
    .boxed()
}

/// The [`MAX_PAGE`] most recently changed environments of `project`, oldest first.
pub(crate) async fn latest_environments(pool: &PgPool, project: Option<Uuid>) -> Vec<Environment> {
    let rows: Vec<EnvironmentRow> = sqlx::query_as(&format!(
        "SELECT {ENVIRONMENT_COLUMNS} FROM environments
         WHERE {} ORDER BY position DESC LIMIT {MAX_PAGE}",
        of_project(project)
    ))
    .bind(project)
    .fetch_all(pool)
    .await
    .unwrap_or_else(|error| {
        tracing::warn!(error = %error, "re-reading environments after a NATS reconnect failed");
        Vec::new()
    });
    rows.into_iter().rev().filter_map(|row| Environment::try_from(row).ok()).collect()
}

pub async fn environment_by_id(pool: &PgPool, id: Uuid) -> Result<Option<Environment>> {
    let row: Option<EnvironmentRow> = sqlx::query_as(&format!("SELECT {ENVIRONMENT_COLUMNS} FROM environments WHERE environment_id = $1"))
        .bind(id)
        .fetch_optional(pool)
        .await?;
    row.map(Environment::try_from).transpose()
}

/// One event of an entity's history.
#[derive(SimpleObject, Clone, Debug)]
pub struct HistoryEvent {
    pub position: i64,
    pub event_id: Uuid,
    pub aggregate_type: String,
    pub aggregate_id: Uuid,
    pub aggregate_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: async_graphql::Json<serde_json::Value>,
    pub recorded_at: DateTime<Utc>,
    pub correlation_id: Uuid,
    pub causation_id: Option<Uuid>,
    pub actor: String,
}

/// One project's preview usage on one UTC day.
#[derive(SimpleObject, Clone, Debug)]
pub struct UsageDay {
    pub project_id: Uuid,
    pub day: chrono::NaiveDate,
    pub environments_created: i32,
    pub deployments_requested: i32,
    pub deployments_ready: i32,
    pub deployments_failed: i32,
    /// Mean seconds from a deployment's request to Ready, over the day's Ready deployments.
    pub mean_seconds_to_ready: Option<f64>,
    pub tests_passed: i32,
    pub tests_failed: i32,
    pub environments_terminated: i32,
}

/// An entity's state at a moment.
#[derive(SimpleObject, Clone, Debug)]
pub struct EntityState {
    pub id: Uuid,
    pub aggregate_type: String,
    /// How many of its events were recorded by then.
    pub events: i64,
    /// The global position of the last of them.
    pub position: Option<i64>,
    pub state: async_graphql::Json<serde_json::Value>,
}

#[derive(Default)]
pub struct Query;

/// The projects whose environments the viewer may list: every project (`None`), or these.
/// Naming a project checks it; otherwise a user sees the projects of their accounts.
async fn visible_projects(ctx: &Context<'_>, project_id: Option<Uuid>) -> Result<Option<Vec<Uuid>>> {
    match (viewer(ctx), project_id) {
        (Viewer::Anonymous, _) => Err(denied(Denied::Unauthenticated)),
        (Viewer::Operator, project) => Ok(project.map(|p| vec![p])),
        (_, Some(project)) => {
            require_project(ctx, project, Permission::ViewPreviewEnvironments).await?;
            Ok(Some(vec![project]))
        }
        (Viewer::User { user_id, .. }, None) => {
            let member_of: Vec<Uuid> = sqlx::query_scalar(
                "SELECT p.project_id FROM projects p JOIN account_members m USING (account_id) JOIN accounts a USING (account_id)
                 WHERE m.user_id = $1 AND NOT a.deleted",
            )
            .bind(user_id.0)
            .fetch_all(ctx.data::<PgPool>()?)
            .await?;
            let auth = ctx.data::<Auth>()?;
            let mut visible = Vec::with_capacity(member_of.len());
            for project in member_of {
                if auth.require_project(&viewer(ctx), ProjectId(project), Permission::ViewPreviewEnvironments).await.is_ok() {
                    visible.push(project);
                }
            }
            Ok(Some(visible))
        }
    }
}

/// Allows the viewer to see entity `id` (an account, project, environment, pull request or
/// their own user), or says why not.
async fn require_entity(ctx: &Context<'_>, id: Uuid) -> Result<()> {
    let viewer = viewer(ctx);
    match &viewer {
        Viewer::Anonymous => return Err(denied(Denied::Unauthenticated)),
        Viewer::Operator => return Ok(()),
        Viewer::User { user_id, .. } if user_id.0 == id => return Ok(()),
        Viewer::User { .. } => {}
    }
    let pool = ctx.data::<PgPool>()?;
    let first: Option<(String, serde_json::Value)> =
        sqlx::query_as("SELECT aggregate_type, payload FROM event_log WHERE aggregate_id = $1 ORDER BY aggregate_version LIMIT 1")
            .bind(id)
            .fetch_optional(pool)
            .await?;
    let not_found = || denied(Denied::NotFound(format!("no entity {id} that you can see")));
    let project = match first.as_ref().map(|(t, p)| (t.as_str(), p)) {
        Some(("account", _)) => {
            crate::accounts::require_account(ctx, id, Permission::ViewProjects).await?;
            return Ok(());
        }
        Some(("project", _)) => Some(id),
        Some(("environment", payload)) | Some(("pull_request", payload)) => payload
            .get("spec")
            .and_then(|s| s.get("project_id"))
            .or_else(|| payload.get("project_id"))
            .and_then(|p| p.as_str())
            .and_then(|p| Uuid::parse_str(p).ok()),
        _ => None,
    };
    match project {
        Some(project) => require_project(ctx, project, Permission::ViewProjects).await,
        None => Err(not_found()),
    }
}

#[Object]
impl Query {
    /// Environments, most recently updated first, optionally of one project and in one status.
    async fn environments(
        &self,
        ctx: &Context<'_>,
        project_id: Option<Uuid>,
        status: Option<EnvironmentStatus>,
        #[graphql(desc = "Only environments of this branch (a pull request's head branch included).")] branch: Option<String>,
        #[graphql(desc = "Only environments of this pull request.")] pull_request: Option<i64>,
        #[graphql(default = 100, validator(minimum = 1, maximum = 500))] first: i64,
    ) -> Result<Vec<Environment>> {
        let pool = ctx.data::<PgPool>()?;
        let projects = visible_projects(ctx, project_id).await?;
        let filter = ListFilter { projects, status: status.map(|s| DomainStatus::from(s).as_str()), branch, pull_request, before: None };
        let rows: Vec<EnvironmentRow> = filter.query(first.min(MAX_PAGE)).build_query_as().fetch_all(pool).await?;
        rows.into_iter().map(Environment::try_from).collect()
    }

    /// Environments page by page (Relay cursor connection), most recently updated first. `after` is
    /// the `endCursor` of the previous page; pages hold at most 500.
    async fn environments_connection(
        &self,
        ctx: &Context<'_>,
        project_id: Option<Uuid>,
        status: Option<EnvironmentStatus>,
        after: Option<String>,
        #[graphql(default = 100, validator(minimum = 1, maximum = 500))] first: i64,
    ) -> Result<async_graphql::connection::Connection<String, Environment>> {
        let (before_time, before_id) = match after.as_deref().map(decode_cursor).transpose()? {
            Some((time, id)) => (Some(time), Some(id)),
            None => (None, None),
        };
        let projects = visible_projects(ctx, project_id).await?;
        let before = before_time.zip(before_id);
        let filter =
            ListFilter { projects, status: status.map(|s| DomainStatus::from(s).as_str()), branch: None, pull_request: None, before };
        let rows: Vec<EnvironmentRow> = filter.query(first + 1).build_query_as().fetch_all(ctx.data::<PgPool>()?).await?;
        let has_next = rows.len() as i64 > first;
        let mut connection = async_graphql::connection::Connection::new(after.is_some(), has_next);
        for row in rows.into_iter().take(first as usize) {
            let cursor = format!("{}_{}", row.updated_at.timestamp_micros(), row.environment_id);
            connection.edges.push(async_graphql::connection::Edge::new(cursor, Environment::try_from(row)?));
        }
        Ok(connection)
    }

    async fn environment(&self, ctx: &Context<'_>, id: Uuid) -> Result<Option<Environment>> {
        let Some(environment) = environment_by_id(ctx.data::<PgPool>()?, id).await? else {
            return match viewer(ctx) {
                Viewer::Anonymous => Err(denied(Denied::Unauthenticated)),
                _ => Ok(None),
            };
        };
        require_project(ctx, environment.project_id, Permission::ViewPreviewEnvironments).await?;
        Ok(Some(environment))
    }

    /// An entity's state (account, project, pull request or environment) as of a moment, rebuilt
    /// from the log with the domain's rules; now when `asOf` is omitted. Null if it had no events by then.
    async fn entity_state(&self, ctx: &Context<'_>, id: Uuid, as_of: Option<DateTime<Utc>>) -> Result<Option<EntityState>> {
        require_entity(ctx, id).await?;
        let state = understudy_projections::time_travel::state_at(ctx.data::<PgPool>()?, id, as_of).await?;
        Ok(state.map(|s| EntityState {
            id: s.id,
            aggregate_type: s.aggregate_type,
            events: s.events as i64,
            position: s.position,
            state: async_graphql::Json(s.state),
        }))
    }

    /// Preview usage per project and UTC day (counts and durations only), oldest day first.
    async fn usage(
        &self,
        ctx: &Context<'_>,
        project_id: Option<Uuid>,
        from: Option<chrono::NaiveDate>,
        to: Option<chrono::NaiveDate>,
    ) -> Result<Vec<UsageDay>> {
        match (viewer(ctx), project_id) {
            (Viewer::Operator, _) => {}
            (Viewer::Anonymous, _) => return Err(denied(Denied::Unauthenticated)),
            (_, Some(project)) => require_project(ctx, project, Permission::ViewProjects).await?,
            (_, None) => return Err(crate::accounts::bad_input("projectId: name the project whose usage you want")),
        }
        let rows = understudy_projections::usage::usage(ctx.data::<PgPool>()?, project_id, from, to).await?;
        Ok(rows
            .into_iter()
            .map(|r| UsageDay {
                project_id: r.project_id,
                day: r.day,
                environments_created: r.environments_created,
                deployments_requested: r.deployments_requested,
                deployments_ready: r.deployments_ready,
                deployments_failed: r.deployments_failed,
                mean_seconds_to_ready: r.mean_seconds_to_ready,
                tests_passed: r.tests_passed,
                tests_failed: r.tests_failed,
                environments_terminated: r.environments_terminated,
            })
            .collect())
    }

    /// Every event of one entity (an account, project or environment), oldest first.
    async fn history(&self, ctx: &Context<'_>, id: ID) -> Result<Vec<HistoryEvent>> {
        let id = Uuid::parse_str(&id).map_err(|_| async_graphql::Error::new(format!("id {:?} is not a UUID", id.as_str())))?;
        require_entity(ctx, id).await?;
        let events = understudy_projections::entity_history::of(ctx.data::<PgPool>()?, id).await?;
        Ok(events
            .into_iter()
            .map(|e| HistoryEvent {
                position: e.position,
                event_id: e.event_id,
                aggregate_type: e.aggregate_type,
                aggregate_id: e.aggregate_id,
                aggregate_version: e.aggregate_version,
                event_type: e.event_type,
                schema_version: e.schema_version,
                payload: async_graphql::Json(e.payload),
                recorded_at: e.recorded_at,
                correlation_id: e.correlation_id,
                causation_id: e.causation_id,
                actor: e.actor,
            })
            .collect())
    }
}

pub struct Subscription;

/// Counts an open subscription in `understudy_active_subscriptions` for as long as it lives.
pub(crate) struct OpenSubscription;

impl OpenSubscription {
    pub(crate) fn new() -> Self {
        understudy_adapters::metrics::METRICS.active_subscriptions.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self
    }
}

impl Drop for OpenSubscription {
    fn drop(&mut self) {
        understudy_adapters::metrics::METRICS.active_subscriptions.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[Subscription]
impl Subscription {
    /// An environment's new state each time the `environments` read model commits a change to it
    /// (of one project, or of every project). Carries `position`: drop updates at or below one you have.
    /// Updates come in the order of their positions, and once one at position P has come, every
    /// change at or below P has come too: resuming `after` the highest position you saw misses
    /// nothing.
    async fn environment_updated(
        &self,
        ctx: &Context<'_>,
        project_id: Option<Uuid>,
        #[graphql(desc = "Resume: first send every environment changed after this log position (the last `position` you saw).")]
        after: Option<i64>,
    ) -> Result<futures::stream::BoxStream<'static, Environment>> {
        // A shared execution serves subscribers that each passed these checks as a probe.
        let shared = ctx.data_opt::<SharedExecution>().is_some();
        if !shared {
            match (viewer(ctx), project_id) {
                (Viewer::Operator, _) => {}
                (Viewer::Anonymous, _) => return Err(denied(Denied::Unauthenticated)),
                (_, Some(project)) => require_project(ctx, project, Permission::ViewPreviewEnvironments).await?,
                (_, None) => return Err(crate::accounts::bad_input("projectId: name the project whose environments you follow")),
            }
        }
        if ctx.data_opt::<Probe>().is_some() {
            return Ok(futures::stream::empty().boxed());
        }
        let pool = ctx.data::<PgPool>()?.clone();
        let nats = ctx.data::<async_nats::Client>()?;
        let topology = ctx.data::<Topology>()?;
        let key = project_id.map_or_else(|| "*".to_string(), |id| id.to_string());
        // Listen first, then read: a change committed in between is in one or the other.
        let notices = nats.subscribe(topology.changes_subject(READ_MODEL, &key)).await?;
        // What changed after `after`: its first page now, so that a resume that cannot be read
        // fails as a whole; the rest as the stream is read.
        let missed = match after {
            Some(after) => {
                let (first, next) = page_after(&pool, project_id, after).await?;
                let rest = match next {
                    Some(next) => changed_after(pool.clone(), project_id, next),
                    None => futures::stream::empty().boxed(),
                };
                futures::stream::iter(first).chain(rest).boxed()
            }
            None => futures::stream::empty().boxed(),
        };
        // Each environment is sent only when it has moved past what this subscriber already got;
        // `high` is the highest position sent (or `after`): every change up to it has been sent.
        let sent = std::sync::Arc::new(std::sync::Mutex::new(std::collections::HashMap::<Uuid, i64>::new()));
        let high = std::sync::Arc::new(HighWater::new(after.unwrap_or(i64::MIN)));
        let fresh = {
            let (sent, high) = (sent.clone(), high.clone());
            move |environment: &Environment| {
                let mut sent = sent.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                let last = sent.entry(environment.id).or_insert(i64::MIN);
                let is_new = environment.position > *last;
                *last = (*last).max(environment.position);
                high.raise(environment.position);
                is_new
            }
        };
        // The highest position the resume sent: what a change whose notice was lost after the
        // resume's reads must be above.
        let replayed_high = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(after.unwrap_or(i64::MIN)));
        let replayed_fresh = {
            let (fresh, replayed_high) = (fresh.clone(), replayed_high.clone());
            move |environment: &Environment| {
                replayed_high.fetch_max(environment.position, std::sync::atomic::Ordering::Relaxed);
                fresh(environment)
            }
        };
        // The subscribers of a shared execution are counted where they join it.
        let open = (!shared).then(OpenSubscription::new);
        let reads = ctx.data::<SharedReads>()?.clone();
        // After this process or a projector reconnects to NATS, notices may have been missed. A
        // heal is handled in turn with the notices, so that no update past it goes out first.
        enum Wake {
            Notice(Change),
            Heal,
            Settled,
        }
        use understudy_adapters::nats::{changes, reconnects, resyncs};
        // A resumed subscription heals once more when it has settled: in a NATS cluster its
        // interest reaches the other servers a moment after this one, and a notice published on
        // one of those in that moment is lost. Those changes are all above what the resume sent.
        let settled = match after {
            Some(_) => futures::stream::once(tokio::time::sleep(SETTLE)).map(|()| Wake::Settled).boxed(),
            None => futures::stream::empty().boxed(),
        };
        let wakes = futures::stream::select(
            notices.filter_map(|message| std::future::ready(serde_json::from_slice(&message.payload).ok().map(Wake::Notice))),
            futures::stream::select(futures::stream::select(changes(reconnects()), changes(resyncs())).map(|()| Wake::Heal), settled),
        );
        // Notices come in position order. An environment read for one may have moved on past
        // changes to others whose notices are still on the way: those go first, so that nothing at
        // or below a position sent is still to come. A heal sends everything that changed after
        // the highest position sent a moment before it (before anything was sent: the latest page).
        let live = wakes
            .then(move |wake| {
                let _counted = &open;
                let (pool, reads, high) = (pool.clone(), reads.clone(), high.clone());
                let replayed = replayed_high.load(std::sync::atomic::Ordering::Relaxed);
                async move {
                    let change = match wake {
                        Wake::Notice(change) => change,
                        Wake::Settled => return changed_after(pool, project_id, replayed).boxed(),
                        Wake::Heal => {
                            let from = high.a_moment_ago();
                            return if from > i64::MIN {
                                changed_after(pool, project_id, from).boxed()
                            } else {
                                futures::stream::iter(latest_environments(&pool, project_id).await).boxed()
                            };
                        }
                    };
                    let read = async {
                        let Some(environment) = reads.environment(&pool, change.id, change.position).await? else {
                            return Ok(Vec::new());
                        };
                        let mut send = if environment.position > change.position {
                            reads.between(&pool, project_id, change.position, environment.position).await?
                        } else {
                            Vec::new()
                        };
                        send.push(environment);
                        Ok::<_, async_graphql::Error>(send)
                    };
                    let send = read.await.unwrap_or_else(|error| {
                        tracing::warn!(error = ?error, "reading a changed environment failed");
                        Vec::new()
                    });
                    futures::stream::iter(send).boxed()
                }
            })
            .flatten()
            .filter(move |e| std::future::ready(fresh(e)));
        let replayed = missed.filter(move |e| std::future::ready(replayed_fresh(e)));
        Ok(replayed.chain(live).boxed())
    }

    /// One environment's deployments as they change: its current deployment each time the
    /// environment changes (a new commit is a new deployment id). Starts with the current one.
    async fn deployment_updated(
        &self,
        ctx: &Context<'_>,
        environment_id: Uuid,
    ) -> Result<impl Stream<Item = crate::operations::Deployment>> {
        let auth = ctx.data::<Auth>()?.clone();
        let project = auth.project_of_environment(environment_id).await?;
        match (viewer(ctx), project) {
            (Viewer::Operator, _) => {}
            (Viewer::Anonymous, _) => return Err(denied(Denied::Unauthenticated)),
            (_, Some(project)) => require_project(ctx, project.0, Permission::ViewPreviewEnvironments).await?,
            (_, None) => return Err(denied(Denied::NotFound(format!("no environment {environment_id} that you can see")))),
        }
        let key = project.map_or_else(|| "*".to_string(), |p| p.to_string());
        let notices = ctx.data::<async_nats::Client>()?.subscribe(ctx.data::<Topology>()?.changes_subject(READ_MODEL, &key)).await?;
        let open = OpenSubscription::new();
        let last = std::sync::Arc::new(std::sync::Mutex::new(None::<(Uuid, String, usize)>));
        let current = {
            let (auth, last) = (auth.clone(), last.clone());
            async move { latest_deployment(&auth, environment_id, &last).await }
        };
        let live = notices.filter_map(move |message| {
            let _counted = &open;
            let (auth, last) = (auth.clone(), last.clone());
            async move {
                let change: Change = serde_json::from_slice(&message.payload).ok()?;
                if change.id != environment_id {
                    return None;
                }
                latest_deployment(&auth, environment_id, &last).await
            }
        });
        Ok(futures::stream::once(current).filter_map(futures::future::ready).chain(live))
    }

    /// A deployment's test results as they are recorded: each result once (a re-run's results
    /// come again), starting with those already there.
    async fn test_results(&self, ctx: &Context<'_>, deployment_id: Uuid) -> Result<impl Stream<Item = TestResult>> {
        let auth = ctx.data::<Auth>()?.clone();
        let environment = auth.environment_of_deployment(deployment_id).await?;
        let project = match environment {
            Some(environment) => auth.project_of_environment(environment).await?,
            None => None,
        };
        match (viewer(ctx), project, environment) {
            (Viewer::Anonymous, _, _) => return Err(denied(Denied::Unauthenticated)),
            (_, _, None) => return Err(denied(Denied::NotFound(format!("no deployment {deployment_id} that you can see")))),
            (Viewer::Operator, _, _) => {}
            (_, Some(project), _) => require_project(ctx, project.0, Permission::ViewPreviewEnvironments).await?,
            (_, None, _) => return Err(denied(Denied::NotFound(format!("no deployment {deployment_id} that you can see")))),
        }
        let environment = environment.unwrap_or_default();
        let key = project.map_or_else(|| "*".to_string(), |p| p.to_string());
        let notices = ctx.data::<async_nats::Client>()?.subscribe(ctx.data::<Topology>()?.changes_subject(READ_MODEL, &key)).await?;
        let open = OpenSubscription::new();
        let seen = SentTests::default();
        let read = move |auth: Auth, seen: SentTests| async move {
            let state = auth.store.environments.load(environment).await.ok()?.into_inner();
            let deployment = state.deployments.into_iter().find(|d| d.id.0 == deployment_id)?;
            let fresh: Vec<TestResult> = crate::operations::Deployment::from(&deployment)
                .tests
                .into_iter()
                .filter(|t| seen.lock().unwrap_or_else(|p| p.into_inner()).insert((t.name.clone(), t.at)))
                .collect();
            Some(futures::stream::iter(fresh))
        };
        let first = read(auth.clone(), seen.clone());
        let live = notices
            .filter_map(move |message| {
                let _counted = &open;
                let (auth, seen) = (auth.clone(), seen.clone());
                async move {
                    let change: Change = serde_json::from_slice(&message.payload).ok()?;
                    if change.id != environment {
                        return None;
                    }
                    read(auth, seen).await
                }
            })
            .flatten();
        Ok(futures::stream::once(first).filter_map(futures::future::ready).flatten().chain(live))
    }

    /// A deployment's log lines as they are written: first every line after `from`, then each
    /// new one. Resume with the `nano` of the last line you got.
    async fn deployment_logs(
        &self,
        ctx: &Context<'_>,
        deployment_id: Uuid,
        #[graphql(desc = "`build`, `run`, `tests` (every test), or `test:<name>`.", default_with = "\"build\".to_string()")] stream: String,
        #[graphql(desc = "Unix nanoseconds, as a string: only lines after it.")] from: Option<String>,
    ) -> Result<impl Stream<Item = LogLine>> {
        follow_logs(ctx, deployment_id, stream, from).await
    }

    /// The same as `deploymentLogs`, under the name clients of other preview platforms look for.
    async fn log_lines(
        &self,
        ctx: &Context<'_>,
        deployment_id: Uuid,
        #[graphql(desc = "`build`, `run`, `tests` (every test), or `test:<name>`.", default_with = "\"build\".to_string()")] stream: String,
        #[graphql(desc = "Unix nanoseconds, as a string: only lines after it.")] from: Option<String>,
    ) -> Result<impl Stream<Item = LogLine>> {
        follow_logs(ctx, deployment_id, stream, from).await
    }
}

/// A deployment's log lines after `from`, then each new one as it is written.
async fn follow_logs(ctx: &Context<'_>, deployment_id: Uuid, stream: String, from: Option<String>) -> Result<impl Stream<Item = LogLine>> {
    let stream = match stream.as_str() {
        "build" | "run" => stream,
        "tests" => "test*".to_string(),
        test if test.starts_with("test:") && !test.ends_with('*') => stream,
        other => return Err(format!("unknown log stream {other:?}: use build, run, tests or test:<name>").into()),
    };
    let from: i64 = match from.as_deref() {
        None => 0,
        Some(text) => text.parse().map_err(|_| format!("from must be unix nanoseconds, not {text:?}"))?,
    };
    if viewer(ctx) != Viewer::Operator {
        let project = ctx.data::<Auth>()?.project_of_deployment(deployment_id).await?;
        match (viewer(ctx), project) {
            (Viewer::Anonymous, _) => return Err(denied(Denied::Unauthenticated)),
            (_, Some(project)) => require_project(ctx, project.0, Permission::ViewPreviewEnvironments).await?,
            (_, None) => return Err(denied(Denied::NotFound(format!("no deployment {deployment_id} that you can see")))),
        }
    }
    let pool = ctx.data::<PgPool>()?.clone();
    let nats = ctx.data::<async_nats::Client>()?;
    let topology = ctx.data::<Topology>()?;
    // Listen first, then read: a line written in between is in one or the other, and `nano`
    // only grows, so reading after the last one sent never repeats or skips a line.
    let notices = nats.subscribe(topology.log_subject(deployment_id)).await?;
    const PAGE: i64 = 1000;
    let state = (notices, from, true, OpenSubscription::new());
    let pages = futures::stream::unfold(state, move |(mut notices, from, mut read_now, open)| {
        let (pool, stream) = (pool.clone(), stream.clone());
        async move {
            loop {
                if !read_now {
                    notices.next().await?;
                }
                match understudy_adapters::preview::logs::read_after(&pool, deployment_id, &stream, from, PAGE).await {
                    Ok(lines) if !lines.is_empty() => {
                        let last = lines.last().map_or(from, |l| l.nano);
                        let more = lines.len() as i64 == PAGE;
                        let lines: Vec<LogLine> = lines.into_iter().map(LogLine::from).collect();
                        return Some((lines, (notices, last, more, open)));
                    }
                    Ok(_) => read_now = false,
                    Err(error) => {
                        tracing::warn!(%error, "reading deployment logs failed");
                        read_now = false;
                    }
                }
            }
        }
    });
    Ok(pages.flat_map(futures::stream::iter))
}

/// The environment's current deployment, when it differs from the last one sent (by id,
/// status and number of test results).
async fn latest_deployment(
    auth: &Auth,
    environment: Uuid,
    last: &std::sync::Mutex<Option<(Uuid, String, usize)>>,
) -> Option<crate::operations::Deployment> {
    let state = auth.store.environments.load(environment).await.ok()?.into_inner();
    let current = crate::operations::Deployment::from(state.current()?);
    let key = (current.id, format!("{}{:?}", current.status, current.failure), current.tests.len());
    let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
    if last.as_ref() == Some(&key) {
        return None;
    }
    *last = Some(key);
    Some(current)
}

/// One line a build, an app or a test printed.
#[derive(SimpleObject, Clone, Debug)]
pub struct LogLine {
    /// `build`, `run` or `test:<name>`.
    pub stream: String,
    /// When it was written, in unix nanoseconds (a string: it does not fit GraphQL's Int).
    pub nano: String,
    pub line: String,
}

impl From<understudy_adapters::preview::logs::LogLine> for LogLine {
    fn from(line: understudy_adapters::preview::logs::LogLine) -> Self {
        Self { stream: line.stream, nano: line.nano.to_string(), line: line.line }
    }
}
