//! Webhook deliveries: recorded when they arrive (so GitHub gets its 2xx at once), then turned
//! into domain commands by one processor, in arrival order.
//!
//! Processing is safe to repeat: ids are derived from GitHub's (same repository → same project,
//! same PR → same pull request and environments, same commit → same deployment), a pull
//! request observation older than the last one changes nothing, and environments are reconciled
//! with the pull request's state rather than driven by the delivery's action. A crash anywhere
//! leaves the delivery pending; it is processed again and appends nothing twice.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use thiserror::Error;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use understudy_domain::account::{AccountCommand, AccountKind};
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::ids::{EnvironmentId, ProjectId, PullRequestId};
use understudy_domain::project::{EntrypointRule, Project, ProjectCommand};
use understudy_domain::pull_request::{Observation, PullRequest, PullRequestCommand};
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, ProjectName, RepoFullName, Target};
use understudy_domain::{DomainError, Metadata};
use uuid::Uuid;

use super::client::{GitHub, GitHubError};
use super::webhook::{self, Repository, Webhook};
use crate::event_store::{CommandError, EventStore};
use crate::preview::stack::{select_entrypoints, CONFIG_FILE};

#[derive(Debug, Error)]
pub enum IngestError {
    #[error(transparent)]
    GitHub(#[from] GitHubError),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("payload field {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl IngestError {
    fn retryable(&self) -> bool {
        match self {
            Self::GitHub(e) => e.retryable(),
            Self::Command(CommandError::Domain(_)) | Self::Invalid { .. } => false,
            Self::Command(_) | Self::Database(_) => true,
        }
    }
}

impl From<DomainError> for IngestError {
    fn from(error: DomainError) -> Self {
        Self::Command(CommandError::Domain(error))
    }
}

/// What processing a delivery did.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Applied(String),
    Ignored(String),
}

/// A delivery to record.
pub struct Delivery {
    pub delivery_id: String,
    pub event: String,
    pub action: Option<String>,
    /// The body exactly as received: the bytes its signature covers.
    pub body: bytes::Bytes,
    pub traceparent: Option<String>,
}

/// Records deliveries. Deliveries that arrive together are written in one INSERT and one commit
/// (each caller still answers only after its delivery is committed), so a burst of webhooks costs
/// a few commits rather than one each.
#[derive(Clone)]
pub struct Recorder {
    queue: tokio::sync::mpsc::Sender<Queued>,
}

/// A delivery waiting for the writer, with where to send whether it was new.
type Queued = (Delivery, tokio::sync::oneshot::Sender<sqlx::Result<bool>>);

/// Most deliveries written by one INSERT.
const RECORD_BATCH: usize = 256;

impl Recorder {
    /// Starts the writer task; it ends when the last `Recorder` clone is dropped.
    pub fn spawn(pool: PgPool) -> Self {
        let (queue, mut incoming) = tokio::sync::mpsc::channel::<Queued>(4096);
        tokio::spawn(async move {
            while let Some(first) = incoming.recv().await {
                let mut batch = vec![first];
                while batch.len() < RECORD_BATCH {
                    match incoming.try_recv() {
                        Ok(next) => batch.push(next),
                        Err(_) => break,
                    }
                }
                let deliveries: Vec<&Delivery> = batch.iter().map(|(d, _)| d).collect();
                match insert(&pool, &deliveries).await {
                    Ok(inserted) => {
                        for ((_, reply), new) in batch.into_iter().zip(inserted) {
                            let _ = reply.send(Ok(new));
                        }
                    }
                    Err(error) => {
                        let message = error.to_string();
                        for (_, reply) in batch {
                            let _ = reply.send(Err(sqlx::Error::Protocol(message.clone())));
                        }
                    }
                }
            }
        });
        Self { queue }
    }

    /// Records `delivery`; `false` when its delivery id was already recorded.
    pub async fn record(&self, delivery: Delivery) -> sqlx::Result<bool> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.queue.send((delivery, reply)).await.map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

/// Inserts the batch in arrival order; for each delivery, whether it was new. A delivery id seen
/// twice in one batch is new only the first time.
async fn insert(pool: &PgPool, batch: &[&Delivery]) -> sqlx::Result<Vec<bool>> {
    let mut first_seen = std::collections::HashSet::new();
    let unique: Vec<&Delivery> = batch.iter().copied().filter(|d| first_seen.insert(d.delivery_id.as_str())).collect();
    let mut query = sqlx::QueryBuilder::new("INSERT INTO webhook_deliveries (delivery_id, event, action, payload, traceparent) ");
    query.push_values(&unique, |mut row, d| {
        row.push_bind(&d.delivery_id).push_bind(&d.event).push_bind(&d.action).push_bind(d.body.as_ref()).push_bind(&d.traceparent);
    });
    query.push(" ON CONFLICT (delivery_id) DO NOTHING RETURNING delivery_id");
    let inserted: std::collections::HashSet<String> = query.build_query_scalar::<String>().fetch_all(pool).await?.into_iter().collect();
    let mut claimed = std::collections::HashSet::new();
    Ok(batch.iter().map(|d| inserted.contains(&d.delivery_id) && claimed.insert(d.delivery_id.as_str())).collect())
}

#[derive(Clone)]
pub struct Ingest {
    pub store: EventStore,
    pub github: Option<GitHub>,
}

const MAX_ATTEMPTS: i32 = 20;

/// A due delivery as stored: event, body, attempts so far, trace context.
type PendingDelivery = (String, Vec<u8>, i32, Option<String>);

impl Ingest {
    /// Processes pending deliveries in arrival order until cancelled; `wake` is poked by the
    /// webhook handler so a new delivery is processed at once rather than at the next poll.
    pub async fn run(self, wake: Arc<Notify>, cancel: CancellationToken) {
        crate::worker::drain("webhook processing", Duration::from_millis(500), wake, cancel, || self.process_next()).await
    }

    /// Processes the oldest due delivery; `false` when there was none.
    ///
    /// The delivery is claimed for the transaction by an advisory lock ([`crate::db::claim`]):
    /// handling it may wait on GitHub, and a row lock would hold a transaction id for that long.
    pub async fn process_next(&self) -> sqlx::Result<bool> {
        use crate::db::claim;
        const DUE: &str = "state = 'pending' AND next_attempt_at <= now()";
        let pool = &self.store.pool;
        let mut tx = pool.begin().await?;
        let claimed: Option<String> = sqlx::query_scalar(&format!(
            "SELECT delivery_id FROM (SELECT delivery_id FROM webhook_deliveries WHERE {DUE} ORDER BY seq LIMIT $2) due
             WHERE pg_try_advisory_xact_lock($1, hashtext(delivery_id)) LIMIT 1"
        ))
        .bind(claim::WEBHOOK_DELIVERY)
        .bind(claim::CANDIDATES)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(delivery_id) = claimed else {
            tx.rollback().await?;
            return Ok(false);
        };
        let row: Option<PendingDelivery> = sqlx::query_as(&format!(
            "SELECT event, payload, attempts, traceparent FROM webhook_deliveries WHERE delivery_id = $1 AND {DUE}"
        ))
        .bind(&delivery_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((event, payload, attempts, traceparent)) = row else {
            // Another worker processed it between our look at the candidates and our lock.
            tx.rollback().await?;
            return Ok(true);
        };
        let span = crate::telemetry::span_from("webhook.process", traceparent.as_deref());
        let result = match webhook::parse(&event, &payload) {
            Ok((parsed, _)) => self.handle(&delivery_id, parsed).instrument(span).await,
            Err(error) => Err(IngestError::Invalid { field: "payload", reason: error.to_string() }),
        };
        let (state, outcome, retry_in) = match result {
            Ok(Outcome::Applied(what)) => ("done", what, None),
            Ok(Outcome::Ignored(why)) => ("ignored", why, None),
            Err(error) if error.retryable() && attempts + 1 < MAX_ATTEMPTS => {
                let wait = match &error {
                    IngestError::GitHub(GitHubError::RateLimited { retry_after }) => *retry_after,
                    _ => Duration::from_millis(250 * 2u64.pow((attempts as u32).min(8))),
                };
                ("pending", error.to_string(), Some(wait))
            }
            Err(error) => ("failed", error.to_string(), None),
        };
        tracing::info!(delivery = %delivery_id, event = %event, state, outcome = %outcome, "webhook processed");
        sqlx::query(
            "UPDATE webhook_deliveries SET state = $2, outcome = $3, attempts = attempts + 1,
                 next_attempt_at = now() + make_interval(secs => $4), processed_at = CASE WHEN $2 = 'pending' THEN NULL ELSE now() END
             WHERE delivery_id = $1",
        )
        .bind(&delivery_id)
        .bind(state)
        .bind(&outcome)
        .bind(retry_in.map_or(0.0, |d| d.as_secs_f64()))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Turns one delivery into commands.
    pub async fn handle(&self, delivery_id: &str, webhook: Webhook) -> Result<Outcome, IngestError> {
        let correlation = Uuid::parse_str(delivery_id).unwrap_or_else(|_| Uuid::new_v5(&Uuid::NAMESPACE_URL, delivery_id.as_bytes()));
        let meta = |login: &str| Metadata::new(correlation, format!("github:{login}")).caused_by(correlation);
        match webhook {
            Webhook::Ignored { event, action } => {
                Ok(Outcome::Ignored(format!("{event}{} is not acted on", action.map(|a| format!(".{a}")).unwrap_or_default())))
            }
            Webhook::Installation(p) => {
                let meta = meta(&p.sender.login);
                let installation = p.installation.id;
                let account = self.ensure_account(&p.installation.account, p.sender.id, installation, &meta).await?;
                let mut done = Vec::new();
                for repo in &p.repositories {
                    let project = super::project_id(repo.id);
                    if p.action == "deleted" {
                        self.deactivate(project, "the GitHub App was uninstalled", &meta).await?;
                    } else {
                        self.ensure_project(account, installation, repo.id, &repo.name, &repo.full_name, None, &meta).await?;
                    }
                    done.push(repo.full_name.clone());
                }
                if p.action == "deleted" {
                    self.store.accounts.execute(account.0, AccountCommand::UnlinkInstallation { at: Utc::now() }, meta.clone()).await?;
                }
                Ok(Outcome::Applied(format!("installation {} {}: {}", installation, p.action, done.join(", "))))
            }
            Webhook::InstallationRepositories(p) => {
                let meta = meta(&p.sender.login);
                let installation = p.installation.id;
                let account = self.ensure_account(&p.installation.account, p.sender.id, installation, &meta).await?;
                for repo in &p.repositories_added {
                    self.ensure_project(account, installation, repo.id, &repo.name, &repo.full_name, None, &meta).await?;
                }
                for repo in &p.repositories_removed {
                    self.deactivate(super::project_id(repo.id), "the repository was removed from the GitHub App", &meta).await?;
                }
                Ok(Outcome::Applied(format!("{} added, {} removed", p.repositories_added.len(), p.repositories_removed.len())))
            }
            Webhook::PullRequest(p) => {
                let meta = meta(&p.sender.login);
                let Some(installation) = p.installation.as_ref().map(|i| i.id) else {
                    return Ok(Outcome::Ignored("no installation in the payload: not sent to our GitHub App".into()));
                };
                let Some(project) = self.project_for(&p.repository).await? else {
                    return Ok(Outcome::Ignored(format!("{} is not a project", p.repository.full_name)));
                };
                if !project.active {
                    return Ok(Outcome::Ignored(format!("{} is deactivated", p.repository.full_name)));
                }
                let project_id = super::project_id(p.repository.id);
                let pr = &p.pull_request;
                let head_sha = CommitSha::parse(pr.head.sha.as_str())?;
                let rule = project.entrypoints.clone().unwrap_or(EntrypointRule::Detect);
                let entrypoints = self.entrypoints(&rule, installation, &p.repository.full_name, head_sha.as_str()).await?;
                let id = PullRequestId::derive(project_id, pr.number);
                let before = self.store.pull_requests.load(id.0).await.map_err(CommandError::from)?.into_inner();
                let observation = Observation {
                    pull_request_id: id,
                    project_id,
                    number: pr.number,
                    head_branch: BranchName::parse(pr.head.branch.as_str())?,
                    base_branch: BranchName::parse(pr.base.branch.as_str())?,
                    head_sha,
                    entrypoints,
                    open: pr.state == "open",
                    merged: pr.merged.unwrap_or(false),
                    // A head in another repository (or in a fork since deleted) is a fork's.
                    from_fork: pr.head.repo.as_ref().is_none_or(|head| head.id != p.repository.id),
                    updated_at: pr.updated_at,
                };
                let after = self.store.pull_requests.execute(id.0, PullRequestCommand::Observe(observation), meta.clone()).await?.state;
                let summary = self.reconcile_pull_request(project_id, &before, &after, &meta).await?;
                Ok(Outcome::Applied(format!("pull request #{} {}: {summary}", pr.number, p.action)))
            }
            Webhook::Push(p) => {
                let meta = meta(&p.sender.login);
                let Some(installation) = p.installation.as_ref().map(|i| i.id) else {
                    return Ok(Outcome::Ignored("no installation in the payload".into()));
                };
                let Some(project) = self.project_for(&p.repository).await? else {
                    return Ok(Outcome::Ignored(format!("{} is not a project", p.repository.full_name)));
                };
                if let Some(tag) = p.git_ref.strip_prefix("refs/tags/") {
                    return self.tag_pushed(&project, installation, &p, tag, &meta).await;
                }
                let Some(branch) = p.git_ref.strip_prefix("refs/heads/") else {
                    return Ok(Outcome::Ignored(format!("{} is not a branch", p.git_ref)));
                };
                let branch = BranchName::parse(branch)?;
                let project_id = super::project_id(p.repository.id);
                let mut project = project;
                if project.active && project.production_branch.as_ref() == Some(&branch) && !p.deleted {
                    // The production branch's repository file declares tiers: apply it first.
                    if let Some(github) = &self.github {
                        let file = github.file_at(installation, &p.repository.full_name, p.after.as_str(), CONFIG_FILE).await?;
                        if crate::repo_tiers::apply(&self.store, project_id, file.as_deref(), &meta).await? > 0 {
                            project = self.store.projects.load(project_id.0).await.map_err(CommandError::from)?.into_inner();
                        }
                    }
                }
                if !project.active || !project.deploys_branch(&branch) {
                    return Ok(Outcome::Ignored(format!(
                        "{branch} is neither the production branch nor a tier's branch of an active project"
                    )));
                }
                if p.deleted {
                    let n = self.terminate_branch(project_id, &branch, "the branch was deleted", &meta).await?;
                    return Ok(Outcome::Applied(format!("{branch} deleted: {n} environments terminated")));
                }
                let sha = CommitSha::parse(p.after.as_str())?;
                let target = Target::Branch { branch: branch.clone() };
                if let Some(tier) = project.tier_of(&target).filter(|tier| tier.frozen.is_some()) {
                    return Ok(Outcome::Ignored(format!("tier {} is frozen: {branch} at {sha} is not deployed", tier.name())));
                }
                let rule = project.entrypoints.clone().unwrap_or(EntrypointRule::Detect);
                let entrypoints = self.entrypoints(&rule, installation, &p.repository.full_name, sha.as_str()).await?;
                for entrypoint in &entrypoints {
                    self.store.deploy_commit(project_id, &target, entrypoint, &sha, &meta).await?;
                }
                Ok(Outcome::Applied(format!("{branch} at {sha}: {} environments deployed", entrypoints.len())))
            }
            Webhook::Delete(p) => {
                let meta = meta(&p.sender.login);
                if p.ref_type != "branch" {
                    return Ok(Outcome::Ignored(format!("a {} was deleted", p.ref_type)));
                }
                let branch = BranchName::parse(p.git_ref.as_str())?;
                let n = self.terminate_branch(super::project_id(p.repository.id), &branch, "the branch was deleted", &meta).await?;
                Ok(Outcome::Applied(format!("{branch} deleted: {n} environments terminated")))
            }
        }
    }

    /// Makes `full_name` a project explicitly (an operator's `understudy project create`): the
    /// repository must be visible to `installation`; its owner becomes the project's account.
    pub async fn create_project(&self, installation: u64, full_name: &str, branch: Option<&str>) -> Result<Project, IngestError> {
        let Some(github) = &self.github else {
            return Err(IngestError::Invalid {
                field: "GITHUB_APP_ID",
                reason: "creating a project needs the GitHub App configured".into(),
            });
        };
        RepoFullName::parse(full_name)?;
        let repository = match github.repository(installation, full_name).await {
            Ok(repository) => repository,
            Err(GitHubError::NotFound(_)) => {
                return Err(IngestError::Invalid {
                    field: "repository",
                    reason: format!("{full_name} does not exist or installation {installation} cannot see it"),
                })
            }
            Err(error) => return Err(error.into()),
        };
        let parsed: Result<(webhook::Account, Repository), serde_json::Error> =
            serde_json::from_value(repository["owner"].clone()).and_then(|owner| Ok((owner, serde_json::from_value(repository.clone())?)));
        let (owner, repo) = parsed.map_err(|e| IngestError::Invalid { field: "repository", reason: format!("GitHub's answer: {e}") })?;
        let meta = Metadata::new(Uuid::new_v4(), "operator:cli");
        let account = self.ensure_account(&owner, owner.id, installation, &meta).await?;
        let default_branch = branch.map(str::to_string).or(repo.default_branch.clone());
        let mut project =
            self.ensure_project(account, installation, repo.id, &repo.name, &repo.full_name, default_branch.as_deref(), &meta).await?;
        if let Some(branch) = branch {
            let command = ProjectCommand::ChangeProductionBranch { branch: BranchName::parse(branch)?, at: Utc::now() };
            project = self.store.projects.execute(super::project_id(repo.id).0, command, meta).await?.state;
        }
        Ok(project)
    }

    async fn ensure_account(
        &self,
        account: &webhook::Account,
        sender: u64,
        installation: u64,
        meta: &Metadata,
    ) -> Result<understudy_domain::ids::AccountId, IngestError> {
        let id = super::account_id(account.id);
        let kind = if account.kind == "User" {
            AccountKind::Personal { user_id: super::user_id(account.id), github_login: account.login.clone() }
        } else {
            AccountKind::Team { name: account.login.clone() }
        };
        let creator = if account.kind == "User" { super::user_id(account.id) } else { super::user_id(sender) };
        match self
            .store
            .accounts
            .execute(id.0, AccountCommand::Create { account_id: id, kind, creator, at: Utc::now() }, meta.clone())
            .await
        {
            Ok(_) | Err(CommandError::Domain(DomainError::AlreadyExists { .. })) => {}
            Err(error) => return Err(error.into()),
        }
        self.store
            .accounts
            .execute(id.0, AccountCommand::LinkInstallation { installation_id: installation, at: Utc::now() }, meta.clone())
            .await?;
        Ok(id)
    }

    /// Creates (or reactivates) the project of a repository; its production branch is the
    /// repository's default branch, asked of GitHub when the payload does not say.
    #[allow(clippy::too_many_arguments)]
    async fn ensure_project(
        &self,
        account: understudy_domain::ids::AccountId,
        installation: u64,
        repository_id: u64,
        name: &str,
        full_name: &str,
        default_branch: Option<&str>,
        meta: &Metadata,
    ) -> Result<Project, IngestError> {
        let id = super::project_id(repository_id);
        let existing = self.store.projects.load(id.0).await.map_err(CommandError::from)?.into_inner();
        if existing.id.is_some() {
            if existing.active {
                return Ok(existing);
            }
            return Ok(self.store.projects.execute(id.0, ProjectCommand::Reactivate { at: Utc::now() }, meta.clone()).await?.state);
        }
        let default_branch = match (default_branch, &self.github) {
            (Some(branch), _) => branch.to_string(),
            (None, Some(github)) => github.default_branch(installation, full_name).await?,
            (None, None) => "main".to_string(),
        };
        let command = ProjectCommand::Create {
            project_id: id,
            account_id: account,
            name: ProjectName::parse(name)?,
            repository: RepoFullName::parse(full_name)?,
            production_branch: BranchName::parse(default_branch)?,
            entrypoints: EntrypointRule::Detect,
            at: Utc::now(),
        };
        match self.store.projects.execute(id.0, command, meta.clone()).await {
            Ok(done) => Ok(done.state),
            Err(CommandError::Domain(DomainError::AlreadyExists { .. })) => {
                Ok(self.store.projects.load(id.0).await.map_err(CommandError::from)?.into_inner())
            }
            Err(error) => Err(error.into()),
        }
    }

    /// The project of a repository, if the repository was installed.
    async fn project_for(&self, repo: &Repository) -> Result<Option<Project>, IngestError> {
        let project = self.store.projects.load(super::project_id(repo.id).0).await.map_err(CommandError::from)?.into_inner();
        Ok(project.id.is_some().then_some(project))
    }

    async fn deactivate(&self, project: ProjectId, reason: &str, meta: &Metadata) -> Result<(), IngestError> {
        match self
            .store
            .projects
            .execute(project.0, ProjectCommand::Deactivate { reason: reason.into(), at: Utc::now() }, meta.clone())
            .await
        {
            Ok(_) | Err(CommandError::Domain(DomainError::NotFound { .. })) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    async fn entrypoints(
        &self,
        rule: &EntrypointRule,
        installation: u64,
        full_name: &str,
        sha: &str,
    ) -> Result<Vec<Entrypoint>, IngestError> {
        match (rule, &self.github) {
            (EntrypointRule::Listed { entrypoints }, _) => Ok(entrypoints.clone()),
            (EntrypointRule::Detect, Some(github)) => {
                let files = github.root_files(installation, full_name, sha).await?;
                let config = if files.iter().any(|f| f == CONFIG_FILE) {
                    github.file_at(installation, full_name, sha, CONFIG_FILE).await?
                } else {
                    None
                };
                Ok(select_entrypoints(rule, &files, config.as_deref()))
            }
            (EntrypointRule::Detect, None) => Ok(vec![Entrypoint::parse("main.w")?]),
        }
    }

    async fn terminate(&self, environment: EnvironmentId, reason: &str, meta: &Metadata) -> Result<(), IngestError> {
        let command = EnvironmentCommand::Terminate { reason: reason.into(), at: Utc::now() };
        match self.store.environments.execute(environment.0, command, meta.clone()).await {
            Ok(_) | Err(CommandError::Domain(DomainError::NotFound { .. })) => Ok(()),
            Err(error) => Err(error.into()),
        }
    }

    /// Brings the pull request's environments in line with its state: deployed at the head when
    /// open, terminated when closed or when their entrypoint is gone.
    async fn reconcile_pull_request(
        &self,
        project: ProjectId,
        before: &PullRequest,
        after: &PullRequest,
        meta: &Metadata,
    ) -> Result<String, IngestError> {
        let (Some(head_branch), Some(sha)) = (&after.head_branch, &after.head_sha) else {
            return Ok("nothing known yet".into());
        };
        let target = Target::PullRequest { number: after.number, head_branch: head_branch.clone() };
        let mut gone: Vec<&Entrypoint> = before.entrypoints.iter().filter(|e| !after.entrypoints.contains(e)).collect();
        if !after.open {
            gone.extend(after.entrypoints.iter());
        }
        for entrypoint in &gone {
            let reason = if after.open {
                "the entrypoint is gone"
            } else if after.merged {
                "pull request merged"
            } else {
                "pull request closed"
            };
            self.terminate(EnvironmentId::derive(project, &target, entrypoint), reason, meta).await?;
        }
        if !after.open {
            return Ok(format!("closed: {} environments terminated", gone.len()));
        }
        // A fork's commits run code nobody on the project wrote: they wait for a maintainer.
        for entrypoint in &after.entrypoints {
            self.store.deploy(project, &target, entrypoint, sha, after.from_fork, meta).await?;
        }
        Ok(format!("{} environments at {sha}", after.entrypoints.len()))
    }

    /// A tag was pushed: a tier fed by tags it matches deploys the tagged commit. A deleted tag
    /// changes nothing (the release keeps running until the next one).
    async fn tag_pushed(
        &self,
        project: &Project,
        installation: u64,
        p: &super::webhook::PushPayload,
        tag: &str,
        meta: &Metadata,
    ) -> Result<Outcome, IngestError> {
        let Ok(name) = BranchName::parse(tag) else {
            return Ok(Outcome::Ignored(format!("tag {tag:?} is not a name a tier can match")));
        };
        let Some(tier) = understudy_domain::tier::tier_for_tag(&project.tiers, &name).filter(|_| project.active && !p.deleted) else {
            return Ok(Outcome::Ignored(format!("no tier of an active project takes tag {tag}")));
        };
        if tier.frozen.is_some() {
            return Ok(Outcome::Ignored(format!("tier {} is frozen: tag {tag} is not deployed", tier.name())));
        }
        let sha = CommitSha::parse(p.head_commit.as_ref().map_or(p.after.as_str(), |c| c.id.as_str()))?;
        let project_id = super::project_id(p.repository.id);
        let rule = project.entrypoints.clone().unwrap_or(EntrypointRule::Detect);
        let entrypoints = self.entrypoints(&rule, installation, &p.repository.full_name, sha.as_str()).await?;
        let target = Target::Tier { tier: tier.name().clone() };
        for entrypoint in &entrypoints {
            self.store.deploy_commit(project_id, &target, entrypoint, &sha, meta).await?;
        }
        Ok(Outcome::Applied(format!("tag {tag} at {sha}: tier {}, {} environments deployed", tier.name(), entrypoints.len())))
    }

    /// Terminates every environment that follows `branch` (as the read model knows them).
    async fn terminate_branch(&self, project: ProjectId, branch: &BranchName, reason: &str, meta: &Metadata) -> Result<usize, IngestError> {
        let ids: Vec<Uuid> =
            sqlx::query_scalar("SELECT environment_id FROM environments WHERE project_id = $1 AND target_kind = 'branch' AND branch = $2")
                .bind(project.0)
                .bind(branch.as_str())
                .fetch_all(&self.store.pool)
                .await?;
        for id in &ids {
            self.terminate(EnvironmentId(*id), reason, meta).await?;
        }
        Ok(ids.len())
    }
}
