//! What Understudy writes to GitHub: the sticky PR comment, and a deployment (with statuses)
//! and a check run for each of our deployments.
//!
//! [`GitHubOutbox`] is a projection: each event that changes what GitHub should show marks an
//! entry of `github_outbox` dirty, in the projector's transaction: kind `comment` for a pull
//! request's comment, kind `status` for an environment's deployments and check runs.
//! [`OutboxWriter`] is the reactor: it takes one due entry at a time (claimed by an advisory
//! lock, so two writers never race on one), reads the state once the `environments` read model
//! has caught up, and writes it. Everything it creates on GitHub is found again before it is created (the comment by
//! its marker on a comment of our own App, a deployment by our id in its payload, a check run by
//! its external id), so a crash after GitHub answered never makes a second one. After a write
//! the entry rests (`debounce`): at most one write per entry per second, the last state wins.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use understudy_adapters::github::client::{GitHub, GitHubError};
use understudy_adapters::{EventStore, LoggedEvent};
use understudy_domain::account::AccountKind;
use understudy_domain::environment::{Deployment, DeploymentStatus, Environment, EnvironmentEvent, EnvironmentStatus, TestOutcome};
use understudy_domain::ids::{EnvironmentId, ProjectId};
use understudy_domain::pr_comment::{self, CommentContext, CommentRow, EnvironmentLinks};
use understudy_domain::project::{Project, ProjectCommand};
use understudy_domain::pull_request::PullRequestEvent;
use understudy_domain::values::Target;
use understudy_domain::Metadata;
use uuid::Uuid;

use crate::projector::RunApplied;
use crate::{AnyEvent, Change, Projection, ProjectionError, Tables};

/// Hex SHA-256, to tell whether what we would write changed since the last write.
fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}

pub struct GitHubOutbox;

/// After this many failed attempts in a row, a failing write is recorded in the project's history.
pub const FAILURES_BEFORE_RECORDING: i32 = 5;

/// How an outbox entry already there is marked dirty again: the newest event's position and trace.
const MARK_AGAIN: &str =
    "ON CONFLICT (kind, key) DO UPDATE SET dirty_position = EXCLUDED.dirty_position, traceparent = EXCLUDED.traceparent";

async fn mark_dirty(conn: &mut PgConnection, tables: &Tables, kind: &str, key: &str, event: &LoggedEvent) -> sqlx::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {} (kind, key, dirty_position, traceparent) VALUES ($1, $2, $3, $4) {MARK_AGAIN}",
        tables.name("github_outbox")
    ))
    .bind(kind)
    .bind(key)
    .bind(event.position)
    .bind(&event.traceparent)
    .execute(conn)
    .await?;
    Ok(())
}

/// Marks dirty the statuses of the environments of `events` (in log order) and the comments of
/// their pull requests, each entry at the newest of its events: one statement for the lot, the
/// same rows as marking them event by event. The comment's key is `comment_key` spelled in SQL.
async fn mark_environments_dirty(conn: &mut PgConnection, tables: &Tables, events: &[&LoggedEvent]) -> sqlx::Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    // The newest event of each environment: one statement cannot update a row twice.
    let mut seen = std::collections::HashSet::with_capacity(events.len());
    let newest: Vec<&LoggedEvent> = events.iter().rev().filter(|e| seen.insert(e.aggregate_id)).copied().collect();
    sqlx::query(&format!(
        "WITH e AS (SELECT * FROM UNNEST($1::uuid[], $2::bigint[], $3::text[]) AS e (id, position, traceparent))
         INSERT INTO {outbox} (kind, key, dirty_position, traceparent)
         SELECT 'status', id::text, position, traceparent FROM e
         UNION ALL
         (SELECT DISTINCT ON (p.project_id, p.pr_number) 'comment', p.project_id::text || ':' || p.pr_number::text, e.position, e.traceparent
          FROM e JOIN {prs} p ON p.environment_id = e.id
          ORDER BY p.project_id, p.pr_number, e.position DESC)
         {MARK_AGAIN}",
        outbox = tables.name("github_outbox"),
        prs = tables.name("pr_environments")
    ))
    .bind(newest.iter().map(|e| e.aggregate_id).collect::<Vec<_>>())
    .bind(newest.iter().map(|e| e.position).collect::<Vec<_>>())
    .bind(newest.iter().map(|e| e.traceparent.as_deref()).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

fn comment_key(project: Uuid, number: i64) -> String {
    format!("{project}:{number}")
}

#[async_trait]
impl Projection for GitHubOutbox {
    fn name(&self) -> &'static str {
        "github_outbox"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["github_outbox", "pr_environments"]
    }

    fn compared_columns(&self, table: &str) -> &'static str {
        match table {
            // The rest of the row is the writer's bookkeeping.
            "github_outbox" => "kind, key, dirty_position",
            _ => "*",
        }
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
        match decoded {
            AnyEvent::PullRequest(PullRequestEvent::PullRequestOpened { project_id, number, .. }) => {
                mark_dirty(conn, tables, "comment", &comment_key(project_id.0, *number as i64), event).await?;
            }
            AnyEvent::PullRequest(_) => {
                // The aggregate's first event named its project and number.
                let opened: Option<(Uuid, i64)> = sqlx::query_as(
                    "SELECT (payload->>'project_id')::uuid, (payload->>'number')::bigint FROM event_log
                     WHERE aggregate_id = $1 AND aggregate_version = 1",
                )
                .bind(event.aggregate_id)
                .fetch_optional(&mut *conn)
                .await?;
                if let Some((project, number)) = opened {
                    mark_dirty(conn, tables, "comment", &comment_key(project, number), event).await?;
                }
            }
            AnyEvent::Environment(environment_event) => {
                if let EnvironmentEvent::EnvironmentCreated { spec, .. } = environment_event {
                    if let Target::PullRequest { number, .. } = spec.target {
                        sqlx::query(&format!(
                            "INSERT INTO {} (environment_id, project_id, pr_number) VALUES ($1, $2, $3)",
                            tables.name("pr_environments")
                        ))
                        .bind(event.aggregate_id)
                        .bind(spec.project_id.0)
                        .bind(number as i64)
                        .execute(&mut *conn)
                        .await?;
                    }
                }
                mark_environments_dirty(conn, tables, &[event]).await?;
            }
            AnyEvent::Account(_) | AnyEvent::Project(_) | AnyEvent::User(_) => {}
        }
        Ok(vec![])
    }

    /// Environment events other than a creation only mark entries dirty: a run of them is one
    /// statement. Every other event is applied alone, in its place in the run.
    async fn apply_run(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        run: &[(&LoggedEvent, AnyEvent)],
    ) -> Result<RunApplied, ProjectionError> {
        let (mut pending, mut changes): (Vec<&LoggedEvent>, Vec<Change>) = (Vec::new(), Vec::new());
        for (event, decoded) in run {
            match decoded {
                AnyEvent::Environment(environment_event) if !matches!(environment_event, EnvironmentEvent::EnvironmentCreated { .. }) => {
                    pending.push(event);
                }
                _ => {
                    mark_environments_dirty(conn, tables, &pending).await?;
                    pending.clear();
                    changes.extend(self.apply(conn, tables, event, decoded).await?);
                }
            }
        }
        mark_environments_dirty(conn, tables, &pending).await?;
        Ok(RunApplied { changes, applied: run.len(), stopped: None })
    }
}

/// Writes due outbox entries to GitHub.
pub struct OutboxWriter {
    pub store: EventStore,
    pub github: GitHub,
    /// Understudy's public URL, for links.
    pub public_url: String,
    /// Rest between two writes of one entry.
    pub debounce: Duration,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    GitHub(#[from] GitHubError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Unwritable(String),
    /// The project's repository is not on GitHub (a git remote of its own).
    #[error("the project's repository is not on GitHub")]
    NotOnGitHub,
}

/// A project as GitHub calls go: which installation, which repository, and the names for links.
struct Repo {
    installation: u64,
    repository: String,
    account: String,
    project: String,
    production_branch: Option<String>,
}

impl OutboxWriter {
    pub async fn run(self, wake: Arc<Notify>, cancel: CancellationToken) {
        understudy_adapters::worker::drain("GitHub writer", Duration::from_millis(200), wake, cancel, || self.write_next()).await
    }

    /// Writes the most overdue due entry; `false` when none is due.
    ///
    /// The entry is claimed for the transaction by an advisory lock
    /// ([`understudy_adapters::db::claim`]), so nothing here holds a transaction id while GitHub
    /// answers: what the write learns (comment and deployment ids) is stored on the pool as
    /// soon as GitHub has acted, and the entry's own update is the transaction's one write.
    pub async fn write_next(&self) -> sqlx::Result<bool> {
        use understudy_adapters::db::claim;
        const DUE: &str = "dirty_position > written_position AND next_attempt_at <= now()
            AND dirty_position <= (SELECT position FROM projector_checkpoints WHERE projection = 'environments')";
        let mut tx = self.store.pool.begin().await?;
        let claimed: Option<(String, String)> = sqlx::query_as(&format!(
            "SELECT kind, key FROM (SELECT kind, key FROM github_outbox WHERE {DUE} ORDER BY next_attempt_at LIMIT $2) due
             WHERE pg_try_advisory_xact_lock($1, hashtext(kind || ':' || key)) LIMIT 1"
        ))
        .bind(claim::GITHUB_OUTBOX)
        .bind(claim::CANDIDATES)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((kind, key)) = claimed else {
            tx.rollback().await?;
            return Ok(false);
        };
        let due: Option<(i64, i32, Option<String>)> = sqlx::query_as(&format!(
            "SELECT dirty_position, attempts, traceparent FROM github_outbox WHERE kind = $1 AND key = $2 AND {DUE}"
        ))
        .bind(&kind)
        .bind(&key)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((dirty, attempts, traceparent)) = due else {
            // Another writer wrote it between our look at the candidates and our lock.
            tx.rollback().await?;
            return Ok(true);
        };
        let span = understudy_adapters::telemetry::span_from("github.write", traceparent.as_deref());
        let result = async {
            match kind.as_str() {
                "comment" => self.write_comment(&key).await,
                _ => self.write_statuses(&key).await,
            }
        }
        .instrument(span)
        .await;
        // A project whose repository is not on GitHub has nothing to write there.
        let result = match result {
            Err(WriteError::NotOnGitHub) => Ok(()),
            other => other,
        };
        match result {
            Ok(()) => {
                sqlx::query(
                    "UPDATE github_outbox SET written_position = $3, attempts = 0, last_error = NULL,
                         next_attempt_at = now() + make_interval(secs => $4)
                     WHERE kind = $1 AND key = $2",
                )
                .bind(&kind)
                .bind(&key)
                .bind(dirty)
                .bind(self.debounce.as_secs_f64())
                .execute(&mut *tx)
                .await?;
            }
            Err(error) => {
                let wait = match &error {
                    WriteError::GitHub(GitHubError::RateLimited { retry_after }) => *retry_after,
                    _ => Duration::from_millis(500 * 2u64.pow((attempts as u32).min(7))),
                };
                tracing::warn!(kind, key, error = %error, ?wait, "GitHub write failed; will retry");
                if attempts + 1 == FAILURES_BEFORE_RECORDING {
                    self.record_failure(&kind, &key, &error, attempts + 1).await;
                }
                sqlx::query(
                    "UPDATE github_outbox SET attempts = attempts + 1, last_error = $3, next_attempt_at = now() + make_interval(secs => $4)
                     WHERE kind = $1 AND key = $2",
                )
                .bind(&kind)
                .bind(&key)
                .bind(error.to_string())
                .bind(wait.as_secs_f64())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    /// Appends `GitHubWriteFailing` to the project's history, so a write that keeps failing is
    /// seen (audit, `understudy events`), never a silent loss. Best effort: the retry goes on.
    async fn record_failure(&self, kind: &str, key: &str, error: &WriteError, attempts: i32) {
        let project = match kind {
            "comment" => key.split_once(':').and_then(|(p, _)| Uuid::parse_str(p).ok()),
            _ => match Uuid::parse_str(key) {
                Ok(environment) => {
                    self.store.environments.load(environment).await.ok().and_then(|e| e.into_inner().spec.map(|s| s.project_id.0))
                }
                Err(_) => None,
            },
        };
        let Some(project) = project else { return };
        let command = ProjectCommand::RecordGitHubFailure {
            what: format!("{kind} {key}"),
            error: error.to_string(),
            attempts: attempts as u32,
            at: chrono::Utc::now(),
        };
        let meta = Metadata::new(Uuid::new_v4(), "system:github-writer");
        if let Err(error) = self.store.projects.execute(project, command, meta).await {
            tracing::error!(error = %error, "could not record a failing GitHub write");
        }
    }

    async fn is_from_a_fork(&self, project: ProjectId, number: u64) -> Result<bool, WriteError> {
        let id = understudy_domain::ids::PullRequestId::derive(project, number);
        let pull_request = self.store.pull_requests.load(id.0).await.map_err(|e| WriteError::Unwritable(format!("loading: {e}")))?;
        Ok(pull_request.inner().from_fork)
    }

    async fn repo(&self, project_id: ProjectId) -> Result<(Project, Repo), WriteError> {
        let load_error = |e: esrs::store::postgres::PgStoreError| WriteError::Unwritable(format!("loading: {e}"));
        let project = self.store.projects.load(project_id.0).await.map_err(load_error)?.into_inner();
        if project.git_url.is_some() {
            return Err(WriteError::NotOnGitHub);
        }
        let (Some(account_id), Some(name), Some(repository)) = (project.account_id, project.name.clone(), project.repository.clone())
        else {
            return Err(WriteError::Unwritable(format!("project {project_id} does not exist")));
        };
        let account = self.store.accounts.load(account_id.0).await.map_err(load_error)?.into_inner();
        let Some(installation) = account.installation_id else {
            return Err(WriteError::Unwritable(format!("account {account_id} has no GitHub App installation")));
        };
        let account_name = match account.kind {
            Some(AccountKind::Personal { github_login, .. }) => github_login,
            Some(AccountKind::Team { name }) => name,
            None => return Err(WriteError::Unwritable(format!("account {account_id} does not exist"))),
        };
        let production_branch = project.production_branch.as_ref().map(|b| b.to_string());
        Ok((
            project,
            Repo { installation, repository: repository.to_string(), account: account_name, project: name.to_string(), production_branch },
        ))
    }

    async fn write_comment(&self, key: &str) -> Result<(), WriteError> {
        let parsed = key.split_once(':').and_then(|(p, n)| Some((Uuid::parse_str(p).ok()?, n.parse::<i64>().ok()?)));
        let Some((project, number)) = parsed else {
            return Err(WriteError::Unwritable(format!("bad comment key {key:?}")));
        };
        let project_id = ProjectId(project);
        let (project_state, repo) = self.repo(project_id).await?;
        let rows: Vec<EnvironmentRow> = sqlx::query_as(
            "SELECT entrypoint, branch, status, tests, updated_at FROM environments WHERE project_id = $1 AND pull_request = $2",
        )
        .bind(project)
        .bind(number)
        .fetch_all(&self.store.pool)
        .await?;
        let rows: Vec<CommentRow> = rows
            .into_iter()
            .map(|(entrypoint, branch, status, tests, updated_at)| CommentRow {
                entrypoint,
                branch,
                status: EnvironmentStatus::parse(&status).unwrap_or(EnvironmentStatus::Requested),
                tests: tests.0.into_iter().map(|t| (t.name, t.outcome)).collect(),
                updated_at,
            })
            .collect();
        let context = CommentContext {
            public_url: self.public_url.trim_end_matches('/').to_string(),
            account: repo.account.clone(),
            project: repo.project.clone(),
            project_id,
            number: number as u64,
            without_secrets: !project_state.secrets.is_empty() && self.is_from_a_fork(project_id, number as u64).await?,
        };
        let body = pr_comment::render(&context, &rows);
        let hash = sha256_hex(&body);
        let known: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT comment_id, body_sha256 FROM github_comments WHERE project_id = $1 AND pr_number = $2")
                .bind(project)
                .bind(number)
                .fetch_optional(&self.store.pool)
                .await?;
        let (installation, repository, issue) = (repo.installation, repo.repository.as_str(), number as u64);
        let comment_id = match known {
            Some((_, Some(written))) if written == hash => return Ok(()),
            Some((id, _)) => match self.github.update_comment(installation, repository, id as u64, &body).await {
                Ok(()) => id as u64,
                // Someone deleted it: make it again.
                Err(GitHubError::NotFound(_)) => self.github.create_comment(installation, repository, issue, &body).await?,
                Err(error) => return Err(error.into()),
            },
            None => match self.github.find_comment(installation, repository, issue, &pr_comment::marker(project_id, issue)).await? {
                Some(id) => {
                    self.github.update_comment(installation, repository, id, &body).await?;
                    id
                }
                None => self.github.create_comment(installation, repository, issue, &body).await?,
            },
        };
        sqlx::query(
            "INSERT INTO github_comments (project_id, pr_number, comment_id, body_sha256) VALUES ($1, $2, $3, $4)
             ON CONFLICT (project_id, pr_number) DO UPDATE SET comment_id = EXCLUDED.comment_id, body_sha256 = EXCLUDED.body_sha256",
        )
        .bind(project)
        .bind(number)
        .bind(comment_id as i64)
        .bind(hash)
        .execute(&self.store.pool)
        .await?;
        Ok(())
    }

    /// Brings every deployment of one environment up to date on GitHub: its deployment, the
    /// deployment's status, and its check run with the test results.
    async fn write_statuses(&self, key: &str) -> Result<(), WriteError> {
        let id = Uuid::parse_str(key).map(EnvironmentId).map_err(|_| WriteError::Unwritable(format!("bad environment key {key:?}")))?;
        let environment =
            self.store.environments.load(id.0).await.map_err(|e| WriteError::Unwritable(format!("loading: {e}")))?.into_inner();
        let Some(spec) = environment.spec.clone() else {
            return Err(WriteError::Unwritable(format!("environment {id} does not exist")));
        };
        let (_, repo) = self.repo(spec.project_id).await?;
        let branch = spec.target.label().to_string();
        let production = spec.target.kind() == "branch" && repo.production_branch.as_deref() == Some(branch.as_str());
        let github_environment = match &spec.target {
            Target::PullRequest { .. } => format!("preview/{}", spec.entrypoint),
            Target::Branch { .. } if production => format!("production/{}", spec.entrypoint),
            Target::Branch { branch } => format!("{branch}/{}", spec.entrypoint),
            Target::Tier { tier } => format!("{tier}/{}", spec.entrypoint),
        };
        let links = EnvironmentLinks::new(&self.public_url, &repo.account, &repo.project, &branch, spec.entrypoint.as_str());
        // A promoted commit already carries its source tier's check run: a tier's has its own name.
        let check_name = match &spec.target {
            Target::Tier { tier } => format!("Understudy: {} ({tier})", spec.entrypoint),
            _ => format!("Understudy: {}", spec.entrypoint),
        };
        // What was written for every deployment of the environment, in one read.
        let ids: Vec<Uuid> = environment.deployments.iter().map(|d| d.id.0).collect();
        let mut written: HashMap<Uuid, WrittenDeployment> = sqlx::query_as::<_, (Uuid, i64, Option<String>, Option<i64>, Option<String>)>(
            "SELECT deployment_id, github_deployment_id, deployment_state, check_run_id, check_sha256
             FROM github_deployments WHERE deployment_id = ANY($1)",
        )
        .bind(&ids)
        .fetch_all(&self.store.pool)
        .await?
        .into_iter()
        .map(|(id, github, state, check, hash)| (id, (github, state, check, hash)))
        .collect();
        for deployment in &environment.deployments {
            let known = written.remove(&deployment.id.0);
            let is_current = environment.current().map(|d| d.id) == Some(deployment.id);
            let state = deployment_state(&environment, deployment, is_current);
            let check = check_run(&check_name, deployment, &environment, is_current, &links);
            let check_hash = sha256_hex(&check.to_string());
            if let Some((_, Some(written_state), _, Some(written_check))) = &known {
                if *written_state == state && *written_check == check_hash {
                    continue;
                }
            }
            let (installation, repository, sha, ours) =
                (repo.installation, repo.repository.as_str(), deployment.commit.as_str(), deployment.id.to_string());
            let github_deployment = match &known {
                Some((id, ..)) => *id as u64,
                None => match self.github.find_deployment(installation, repository, sha, &github_environment, &ours).await? {
                    Some(id) => id,
                    None => self.github.create_deployment(installation, repository, sha, &github_environment, &ours, production).await?,
                },
            };
            if known.as_ref().and_then(|k| k.1.as_deref()) != Some(state) {
                let url = if state == "success" { links.preview() } else { String::new() };
                self.github.create_deployment_status(installation, repository, github_deployment, state, &url, &links.build_log()).await?;
            }
            let check_run_id = match known.as_ref().and_then(|k| k.2) {
                Some(id) => {
                    if known.as_ref().and_then(|k| k.3.as_deref()) != Some(check_hash.as_str()) {
                        self.github.update_check_run(installation, repository, id as u64, &check).await?;
                    }
                    id as u64
                }
                None => match self.github.find_check_run(installation, repository, sha, &check_name, &ours).await? {
                    Some(id) => {
                        self.github.update_check_run(installation, repository, id, &check).await?;
                        id
                    }
                    None => self.github.create_check_run(installation, repository, &check).await?,
                },
            };
            sqlx::query(
                "INSERT INTO github_deployments (deployment_id, environment_id, github_deployment_id, deployment_state, check_run_id, check_sha256)
                 VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (deployment_id) DO UPDATE SET deployment_state = EXCLUDED.deployment_state,
                     check_run_id = EXCLUDED.check_run_id, check_sha256 = EXCLUDED.check_sha256",
            )
            .bind(deployment.id.0)
            .bind(id.0)
            .bind(github_deployment as i64)
            .bind(state)
            .bind(check_run_id as i64)
            .bind(&check_hash)
            .execute(&self.store.pool)
            .await?;
        }
        Ok(())
    }
}

/// GitHub's deployment state for one of our deployments.
fn deployment_state(environment: &Environment, deployment: &Deployment, is_current: bool) -> &'static str {
    if is_current && (environment.terminated || environment.deactivated) {
        return "inactive";
    }
    match deployment.status {
        DeploymentStatus::Requested | DeploymentStatus::AwaitingApproval => "queued",
        DeploymentStatus::Building | DeploymentStatus::Starting => "in_progress",
        DeploymentStatus::Ready if is_current => "success",
        DeploymentStatus::Ready | DeploymentStatus::Superseded => "inactive",
        DeploymentStatus::Failed => "failure",
    }
}

/// The check run of one deployment: in progress while it builds, then its test results.
fn check_run(
    name: &str,
    deployment: &Deployment,
    environment: &Environment,
    is_current: bool,
    links: &EnvironmentLinks,
) -> serde_json::Value {
    let tests: Vec<String> =
        deployment.tests.iter().map(|t| format!("- {} {}", if t.outcome == TestOutcome::Passed { "✅" } else { "❌" }, t.name)).collect();
    let failed = deployment.tests.iter().filter(|t| t.outcome == TestOutcome::Failed).count();
    let (status, conclusion, title) = match deployment.status {
        DeploymentStatus::Requested => ("queued", None, "Queued".to_string()),
        DeploymentStatus::AwaitingApproval => ("queued", None, "Waiting for a maintainer's approval".to_string()),
        DeploymentStatus::Building | DeploymentStatus::Starting => ("in_progress", None, "Building".to_string()),
        DeploymentStatus::Ready if failed > 0 => {
            ("completed", Some("failure"), format!("{failed} of {} tests failed", deployment.tests.len()))
        }
        DeploymentStatus::Ready => ("completed", Some("success"), format!("Ready; {} tests passed", deployment.tests.len())),
        DeploymentStatus::Failed => ("completed", Some("failure"), "The deployment failed".to_string()),
        DeploymentStatus::Superseded => ("completed", Some("cancelled"), "Superseded by a newer commit".to_string()),
    };
    let (status, conclusion) =
        if is_current && environment.terminated && status != "completed" { ("completed", Some("cancelled")) } else { (status, conclusion) };
    let mut summary = match &deployment.failure {
        Some(reason) => format!("{reason}\n\n"),
        None => String::new(),
    };
    summary.push_str(&if tests.is_empty() { "No test results yet.".to_string() } else { tests.join("\n") });
    let mut body = serde_json::json!({
        "name": name,
        "head_sha": deployment.commit.as_str(),
        "external_id": deployment.id.to_string(),
        "details_url": links.build_log(),
        "status": status,
        "output": { "title": title, "summary": summary },
    });
    if let Some(conclusion) = conclusion {
        body["conclusion"] = conclusion.into();
    }
    body
}

/// An environment row as the comment shows it: entrypoint, branch, status, tests, updated.
type EnvironmentRow = (String, String, String, sqlx::types::Json<Vec<TestRow>>, chrono::DateTime<chrono::Utc>);

/// What was last written to GitHub for a deployment: its GitHub id and state, its check run and body hash.
type WrittenDeployment = (i64, Option<String>, Option<i64>, Option<String>);

#[derive(serde::Deserialize)]
struct TestRow {
    name: String,
    outcome: TestOutcome,
}
