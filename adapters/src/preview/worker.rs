//! The worker: claims deployments, builds and runs them, reports every step as a command.
//!
//! Claiming is a lease in `deployment_leases`, kept alive by a heartbeat. A worker that dies
//! stops heartbeating; when its lease expires another worker (or this one, restarted) claims the
//! deployment again and carries on from the state the events say it reached, so no deployment
//! stays Building forever. Each claim counts as an attempt: infrastructure faults (git timeout,
//! sandbox set-up) are retried with backoff up to `max_attempts`; user faults (build error,
//! crash, failed health check) fail the deployment at once, with the reason.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use sqlx::PgPool;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_domain::environment::{DeploymentStatus, EnvironmentCommand, FailedStage, TestOutcome};
use understudy_domain::ids::{DeploymentId, EnvironmentId};
use understudy_domain::{DomainError, Metadata};
use uuid::Uuid;

mod debug;

use super::git::{self, FetchError};
use super::logs::{LogSink, LogStream, Redactor};
use super::sandbox::{SandboxSpec, Sandboxed};
use super::stack::{self, Plan, Readiness, Tests};
use super::{unix_http, PreviewConfig};
use crate::metrics::METRICS;
use crate::{CommandError, EventStore};

/// The port every app listens on inside its sandbox (each sandbox has its own loopback).
const APP_PORT: u16 = 8080;
const SOCKET: &str = "http.sock";
/// Where a smoke test reaches the app, on its own sandbox's loopback.
const SMOKE_PORT: u16 = 8079;
/// What a smoke test may keep: this many files, each at most this big.
const MAX_ARTIFACTS: usize = 20;
const MAX_ARTIFACT_BYTES: u64 = 5 << 20;

pub struct Worker {
    /// Unique per process: leases and routes name it.
    pub id: String,
    pub store: EventStore,
    pub config: Arc<PreviewConfig>,
    pub logs: LogSink,
    /// The GitHub App, for installation tokens to fetch private repositories over HTTPS.
    pub github: Option<crate::github::client::GitHub>,
    /// For change notices (wake-ups to claim).
    pub nats: async_nats::Client,
    pub topology: crate::nats::Topology,
}

/// One claimed deployment.
#[derive(Clone)] // no Debug: it holds secret values
struct Job {
    environment: EnvironmentId,
    deployment: DeploymentId,
    project: Uuid,
    commit: String,
    entrypoint: String,
    attempts: i32,
    /// Hides the deployment's secret values in every log line (set once they are known).
    redactor: Redactor,
    /// The project's secrets this deployment gets, as environment variables.
    secrets: Vec<(String, String)>,
    /// Its tier's configuration (and `UNDERSTUDY_TIER`), when its environment belongs to one.
    tier_env: Vec<(String, String)>,
    /// Its tier's smoke test.
    smoke: Option<String>,
    /// Its tier's `push_to`: where the commit goes once it passed.
    push_to: Option<String>,
    /// Its add-on database's name and password, when the project asks for one.
    database: Option<(String, String)>,
    /// The seed command, when the add-on database still wants it.
    seed: Option<String>,
    /// Its work dir's and sandboxes' name: the deployment's id, or a debug session's.
    work_name: String,
}

impl Job {
    /// A job as claimed: what it runs, before [`Worker::equip`] adds what its deployment gets.
    fn claimed(environment: Uuid, deployment: Uuid, project: Uuid, commit: String, entrypoint: String, work_name: String) -> Self {
        Job {
            environment: EnvironmentId(environment),
            deployment: DeploymentId(deployment),
            project,
            commit,
            entrypoint,
            attempts: 1,
            redactor: Redactor::default(),
            secrets: Vec::new(),
            tier_env: Vec::new(),
            smoke: None,
            push_to: None,
            database: None,
            seed: None,
            work_name,
        }
    }
}

/// Why a pipeline step stopped.
#[derive(Debug)]
enum Stop {
    /// The user's code failed: the deployment fails with this reason.
    User(FailedStage, String),
    /// The machine failed: try again later (another claim).
    Infra(String),
    /// Superseded, terminated, lease lost or shutting down: stop quietly.
    Quiet(&'static str),
}

impl From<CommandError> for Stop {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Domain(DomainError::Superseded { .. }) => Stop::Quiet("superseded"),
            CommandError::Domain(DomainError::IllegalEnvironmentTransition { .. } | DomainError::IllegalTransition { .. }) => {
                Stop::Quiet("the deployment moved on")
            }
            other => Stop::Infra(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for Stop {
    fn from(error: sqlx::Error) -> Self {
        Stop::Infra(format!("database: {error}"))
    }
}

/// How often a worker looks for sandboxes that a dead worker on its machine left running.
const REAP_EVERY: Duration = Duration::from_secs(60);

/// [`super::sandbox::reap_abandoned_sandboxes`], off the async threads (it waits for killed processes).
async fn reap_abandoned_sandboxes() {
    match tokio::task::spawn_blocking(super::sandbox::reap_abandoned_sandboxes).await {
        Ok(0) => {}
        Ok(killed) => tracing::warn!(killed, "killed sandboxes that dead workers left running"),
        Err(error) => tracing::warn!(%error, "looking for abandoned sandboxes failed"),
    }
}

impl Worker {
    fn pool(&self) -> &PgPool {
        &self.store.pool
    }

    /// Claims and runs deployments until `cancel`; then stops its sandboxes and hands its
    /// deployments back (their leases expire at once, so another worker takes over).
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        if let Err(reason) = super::sandbox::available() {
            tracing::error!(%reason, "the worker cannot sandbox anything; deployments stay queued");
            cancel.cancelled().await;
            return;
        }
        let mut reaped = tokio::time::Instant::now();
        reap_abandoned_sandboxes().await;
        let mut running: JoinSet<()> = JoinSet::new();
        // Projectors announce every environment change on core NATS: a wake-up to claim at once
        // instead of at the next poll (the poll stays, for a missed notice).
        let mut changes = match self.nats.subscribe(self.topology.changes_subject("environment", ">")).await {
            Ok(subscriber) => Some(subscriber),
            Err(error) => {
                tracing::warn!(%error, "cannot subscribe to environment changes; polling only");
                None
            }
        };
        loop {
            while running.try_join_next().is_some() {}
            // Another worker on this machine may die too: its sandboxes go within a minute.
            if reaped.elapsed() >= REAP_EVERY {
                reaped = tokio::time::Instant::now();
                reap_abandoned_sandboxes().await;
            }
            if running.len() < self.config.max_parallel {
                match self.claim(self.config.max_parallel - running.len()).await {
                    Ok(jobs) => {
                        for job in jobs {
                            let worker = self.clone();
                            let stop = cancel.child_token();
                            running.spawn(async move { worker.deploy(job, stop).await });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming deployments failed; retrying"),
                }
            }
            if running.len() < self.config.max_parallel {
                match self.claim_debug(self.config.max_parallel - running.len()).await {
                    Ok(sessions) => {
                        for (job, session) in sessions {
                            let worker = self.clone();
                            let stop = cancel.child_token();
                            running.spawn(async move { worker.debug(job, session, stop).await });
                        }
                    }
                    Err(error) => tracing::warn!(%error, "claiming debug sessions failed; retrying"),
                }
            }
            let woken = async {
                match changes.as_mut() {
                    Some(changes) => {
                        futures::StreamExt::next(changes).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = woken => {}
                _ = running.join_next(), if !running.is_empty() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        while running.join_next().await.is_some() {}
    }

    /// Claims up to `limit` deployments that need a worker: the latest deployment of every live
    /// environment that is not Failed and whose lease is free or expired.
    async fn claim(&self, limit: usize) -> sqlx::Result<Vec<Job>> {
        type Row = (Uuid, Uuid, Uuid, String, String);
        let candidates: Vec<Row> = sqlx::query_as(
            "SELECT e.environment_id, e.latest_deployment_id, e.project_id, e.latest_commit, e.entrypoint
             FROM environments e
             WHERE e.latest_deployment_status IN ('Requested', 'Building', 'Starting', 'Ready')
               AND e.status NOT IN ('Stale', 'Terminated')
               AND NOT EXISTS (SELECT 1 FROM deployment_leases l
                               WHERE l.deployment_id = e.latest_deployment_id AND (l.released OR l.expires_at > now()))
             ORDER BY e.updated_at LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        let mut jobs = Vec::new();
        for (environment, deployment, project, commit, entrypoint) in candidates {
            let attempts: Option<i32> = sqlx::query_scalar(
                "INSERT INTO deployment_leases (deployment_id, environment_id, worker, expires_at)
                 VALUES ($1, $2, $3, now() + make_interval(secs => $4))
                 ON CONFLICT (deployment_id) DO UPDATE
                   SET worker = EXCLUDED.worker, expires_at = EXCLUDED.expires_at, attempts = deployment_leases.attempts + 1
                   WHERE NOT deployment_leases.released AND deployment_leases.expires_at <= now()
                 RETURNING attempts",
            )
            .bind(deployment)
            .bind(environment)
            .bind(&self.id)
            .bind(self.config.lease_ttl.as_secs_f64())
            .fetch_optional(self.pool())
            .await?;
            if let Some(attempts) = attempts {
                let job = Job::claimed(environment, deployment, project, commit, entrypoint, deployment.simple().to_string());
                jobs.push(Job { attempts, ..job });
            }
        }
        Ok(jobs)
    }

    /// Runs one claimed deployment to its end: failed, superseded, stopped, or (when Ready)
    /// serving until a newer deployment of its environment is Ready or the environment goes.
    async fn deploy(self: Arc<Self>, job: Job, stop: CancellationToken) {
        let span = tracing::info_span!("deployment", deployment = %job.deployment, environment = %job.environment);
        let _entered = span.enter();
        let heartbeat = tokio::spawn(self.clone().heartbeat(job.deployment, stop.clone()));
        let meta = self.metadata(&job).await;
        let outcome = self.pipeline(&job, &meta, &stop).await;
        heartbeat.abort();
        let build = self.logs.stream(job.deployment.0, "build", job.redactor.clone());
        METRICS.preview_deployments.inc(match &outcome {
            Ok(()) => "served",
            Err(Stop::Quiet(_)) => "stopped",
            Err(Stop::User(..)) => "failed",
            Err(Stop::Infra(_)) => "retried",
        });
        let ending = match outcome {
            Ok(()) => Lease::Release,
            Err(Stop::Quiet(why)) => {
                tracing::info!(why, "deployment stopped");
                // Shutting down or lease lost: somebody else carries on.
                if stop.is_cancelled() {
                    Lease::HandBack
                } else {
                    Lease::Release
                }
            }
            Err(Stop::User(stage, reason)) => {
                build.line(format!("understudy: deployment failed: {reason}"));
                // The failure belongs to the stage the deployment has reached: a Wing app starts
                // before its build is recorded complete, and a restarted deployment is past it.
                let stage = match self.stage_of(&job).await {
                    (reached, Some(_)) => reached,
                    (_, None) => stage,
                };
                let command = EnvironmentCommand::MarkFailed { deployment_id: job.deployment, stage, reason, at: Utc::now() };
                if let Err(error) = self.store.environments.execute(job.environment.0, command, meta.clone()).await {
                    tracing::info!(%error, "could not mark the deployment failed");
                }
                Lease::Release
            }
            Err(Stop::Infra(reason)) => {
                build
                    .line(format!("understudy: infrastructure fault (attempt {} of {}): {reason}", job.attempts, self.config.max_attempts));
                if job.attempts >= self.config.max_attempts {
                    let reason = format!("gave up after {} attempts: {reason}", job.attempts);
                    let (stage, status) = self.stage_of(&job).await;
                    if status.is_some() {
                        let command = EnvironmentCommand::MarkFailed { deployment_id: job.deployment, stage, reason, at: Utc::now() };
                        let _ = self.store.environments.execute(job.environment.0, command, meta.clone()).await;
                    }
                    Lease::Release
                } else {
                    let backoff = Duration::from_secs(2u64.pow(job.attempts.clamp(0, 6) as u32));
                    let _ = sqlx::query(
                        "UPDATE deployment_leases SET expires_at = now() + make_interval(secs => $2), last_error = $3
                         WHERE deployment_id = $1 AND worker = $4",
                    )
                    .bind(job.deployment.0)
                    .bind(backoff.as_secs_f64())
                    .bind(&reason)
                    .bind(&self.id)
                    .execute(self.pool())
                    .await;
                    Lease::Keep
                }
            }
        };
        self.clean_up(&job, ending).await;
    }

    /// Which stage a failure now belongs to, from the deployment's recorded status.
    async fn stage_of(&self, job: &Job) -> (FailedStage, Option<DeploymentStatus>) {
        let status =
            self.store.environments.load(job.environment.0).await.ok().and_then(|s| s.inner().deployment(job.deployment).map(|d| d.status));
        match status {
            Some(DeploymentStatus::Requested | DeploymentStatus::Building) => (FailedStage::Build, status),
            Some(DeploymentStatus::Starting | DeploymentStatus::Ready) => (FailedStage::Start, status),
            _ => (FailedStage::Build, None),
        }
    }

    /// The correlation of the request that asked for this deployment, so `understudy trace`
    /// shows the worker's events beside the webhook that caused them.
    async fn metadata(&self, job: &Job) -> Metadata {
        let origin: Option<(Uuid, Uuid)> = sqlx::query_as(
            "SELECT correlation_id, event_id FROM event_log
             WHERE aggregate_id = $1 AND event_type = 'DeploymentRequested' AND payload->>'deployment_id' = $2
             ORDER BY id DESC LIMIT 1",
        )
        .bind(job.environment.0)
        .bind(job.deployment.0.to_string())
        .fetch_optional(self.pool())
        .await
        .ok()
        .flatten();
        let actor = format!("system:worker:{}", self.id);
        match origin {
            Some((correlation, cause)) => Metadata::new(correlation, actor).caused_by(cause),
            None => Metadata::new(Uuid::new_v4(), actor),
        }
    }

    /// Keeps the lease alive; cancels the deployment if another worker took it over.
    async fn heartbeat(self: Arc<Self>, deployment: DeploymentId, stop: CancellationToken) {
        let every = self.config.lease_ttl / 3;
        loop {
            tokio::time::sleep(every).await;
            let kept = sqlx::query(
                "UPDATE deployment_leases SET expires_at = now() + make_interval(secs => $2)
                 WHERE deployment_id = $1 AND worker = $3 AND NOT released",
            )
            .bind(deployment.0)
            .bind(self.config.lease_ttl.as_secs_f64())
            .bind(&self.id)
            .execute(self.pool())
            .await;
            match kept {
                Ok(done) if done.rows_affected() == 0 => {
                    tracing::warn!(%deployment, "lease lost; stopping");
                    stop.cancel();
                    return;
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "heartbeat failed; retrying"),
            }
        }
    }

    fn dirs(&self, job: &Job) -> (PathBuf, PathBuf) {
        let environment = self.config.data_dir.join(job.environment.0.simple().to_string());
        (environment.join(&job.work_name), environment.join("cache"))
    }

    /// Where the worker forwards the deployment's add-on database (outside its work dir, which a
    /// new attempt empties).
    fn database_socket(&self, job: &Job) -> PathBuf {
        self.config.data_dir.join(job.environment.0.simple().to_string()).join(format!("db-{}", job.work_name)).join("db.sock")
    }

    fn sandbox(&self, job: &Job, name: &str, network: bool, plan_env: &[(String, String)]) -> SandboxSpec {
        let (deployment_dir, cache_dir) = self.dirs(job);
        let mut read_only = vec![(self.config.bridge_bin.clone(), "/opt/understudy/understudy".to_string())];
        // The add-on database, for every step without the host's network: a reversed bridge on
        // the sandbox's own 127.0.0.1:5432 to the worker's forwarder.
        let mut wrap = Vec::new();
        if job.database.is_some() && !network {
            let socket = self.database_socket(job);
            if let Some(dir) = socket.parent() {
                read_only.push((dir.to_path_buf(), super::addon::SANDBOX_DIR.to_string()));
            }
            wrap = [
                "/opt/understudy/understudy",
                "sandbox-bridge",
                "--reverse",
                "--socket",
                &format!("{}/db.sock", super::addon::SANDBOX_DIR),
                "--port",
                &super::addon::SANDBOX_PORT.to_string(),
                "--",
            ]
            .map(String::from)
            .to_vec();
        }
        // A Python app's virtualenv (in the cache) comes first, then the toolchains.
        let mut path = "/usr/local/bin:/usr/bin:/bin".to_string();
        if let Some(rust) = &self.config.rust_toolchain {
            read_only.push((rust.clone(), "/opt/rust".into()));
            path = format!("/opt/rust/bin:{path}");
        }
        if let Some(wing) = &self.config.wing_toolchain {
            read_only.push((wing.clone(), "/opt/wing".into()));
            path = format!("/opt/wing/node_modules/.bin:{path}");
        }
        path = format!("/cache/venv/bin:{path}");
        let mut env = vec![
            ("PATH".to_string(), path),
            ("HOME".into(), "/tmp".into()),
            ("PORT".into(), APP_PORT.to_string()),
            ("npm_config_cache".into(), "/cache/npm".into()),
            ("npm_config_update_notifier".into(), "false".into()),
            ("npm_config_prefer_offline".into(), "true".into()),
            ("CARGO_HOME".into(), "/cache/cargo".into()),
            ("CARGO_TARGET_DIR".into(), "/cache/target".into()),
            ("PIP_CACHE_DIR".into(), "/cache/pip".into()),
            ("WING_DISABLE_ANALYTICS".into(), "1".into()),
            ("UNDERSTUDY".into(), "1".into()),
            ("UNDERSTUDY_DEPLOYMENT_ID".into(), job.deployment.to_string()),
            ("UNDERSTUDY_ENVIRONMENT_ID".into(), job.environment.to_string()),
            ("UNDERSTUDY_COMMIT".into(), job.commit.clone()),
        ];
        env.extend(plan_env.iter().cloned());
        SandboxSpec {
            name: format!("{}-{name}", job.work_name),
            app_dir: deployment_dir.join("src"),
            cache_dir,
            run_dir: deployment_dir.join(format!("run-{name}")),
            workdir: match stack::app_dir(&job.entrypoint) {
                "." => "/app".to_string(),
                dir => format!("/app/{dir}"),
            },
            read_only,
            env,
            network,
            limits: self.config.limits,
            wrap,
        }
    }

    async fn pipeline(&self, job: &Job, meta: &Metadata, stop: &CancellationToken) -> Result<(), Stop> {
        let state = self.store.environments.load(job.environment.0).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let Some(deployment) = state.deployment(job.deployment).cloned() else {
            return Err(Stop::Quiet("the deployment is not in the log yet"));
        };
        if state.terminated || state.deactivated || !deployment.status.in_flight() && deployment.status != DeploymentStatus::Ready {
            return Err(Stop::Quiet("the deployment is over"));
        }
        let project = self.store.projects.load(job.project).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let Some(repository) = project.repository.clone() else {
            return Err(Stop::User(FailedStage::Build, "the project has no repository".into()));
        };
        let restart = deployment.status == DeploymentStatus::Ready;
        let (job, secrets_note, _forward) = self.equip(job, &state, &project).await?;
        let job = &job;
        if deployment.status == DeploymentStatus::Requested {
            self.command(job, meta, EnvironmentCommand::StartBuild { deployment_id: job.deployment, at: Utc::now() }).await?;
        }
        self.logs.stream(job.deployment.0, "build", job.redactor.clone()).line(format!(
            "understudy: {} {} of {repository} at {} (attempt {}) on worker {}",
            if restart { "restarting" } else { "building" },
            job.entrypoint,
            &job.commit[..12.min(job.commit.len())],
            job.attempts,
            self.id
        ));
        if let Some(note) = secrets_note {
            self.logs.stream(job.deployment.0, "build", job.redactor.clone()).line(format!("understudy: {note}"));
        }
        // Until it is Ready, a deployment stops as soon as a newer commit supersedes it or its
        // environment goes: `work` is cancelled then, and every step below watches it.
        let work = stop.child_token();
        let watcher = tokio::spawn(watch_for_newer(self.pool().clone(), job.environment, job.deployment, work.clone()));
        let result = self.build_and_start(job, meta, &repository, project.git_url.as_deref(), restart, &work).await;
        watcher.abort();
        let (mut app, plan, plan_env) = result?;
        if restart {
            // The worker that ran this deployment died: its job runs died with it.
            for (name, runs) in &state.jobs {
                if let Some(run) = runs.running.or(runs.requested) {
                    let detail = "interrupted: its worker stopped".to_string();
                    let command =
                        EnvironmentCommand::FinishJobRun { job: name.clone(), run_id: run, succeeded: false, detail, at: Utc::now() };
                    let _ = self.command(job, meta, command).await;
                }
            }
        }
        // A restart after a worker died mid-tests runs them again: promotion waits for them.
        if !deployment.tests_completed {
            let tests_started = Instant::now();
            self.run_tests(job, meta, &plan, &plan_env, stop).await?;
            if plan.tests != Tests::None {
                METRICS.preview_test_seconds.observe(tests_started.elapsed());
            }
        }
        // Serve until something says stop.
        self.serve(job, meta, &mut app, &plan, &plan_env, stop).await
    }

    /// The job with what its deployment gets: the project's secrets (and a note for the build
    /// log about them), its tier's configuration and smoke test, and the add-on database, whose
    /// forwarder serves as long as the returned guard lives.
    async fn equip(
        &self,
        job: &Job,
        state: &understudy_domain::environment::Environment,
        project: &understudy_domain::project::Project,
    ) -> Result<(Job, Option<String>, Option<super::addon::Forward>), Stop> {
        let (secrets, secrets_note) = self.secrets_for(job, project, state.spec.as_ref()).await?;
        let tier = state.spec.as_ref().and_then(|spec| project.tier_of(&spec.target));
        let tier_env = tier
            .map(|tier| {
                let mut vars = vec![("UNDERSTUDY_TIER".to_string(), tier.name().to_string())];
                vars.extend(tier.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
                vars
            })
            .unwrap_or_default();
        let smoke = tier.and_then(|tier| tier.spec.smoke.clone());
        let push_to = tier.and_then(|tier| tier.spec.push_to.as_ref().map(|b| b.to_string()));
        // The database add-on: the environment's own database, reached through a forwarder that
        // lives as long as the guard returned.
        let (database, seed, forward) = match &project.database {
            None => (None, None, None),
            Some(addon) => {
                let (Some(server), Some(signer)) = (&self.config.addon_database, &self.config.signer) else {
                    return Err(Stop::User(
                        FailedStage::Build,
                        "the project asks for a database, and this installation has no add-on server (UNDERSTUDY_ADDON_DATABASE_URL)"
                            .into(),
                    ));
                };
                let name = super::addon::database_name(job.environment);
                let password = super::addon::password(signer, job.environment);
                let unseeded = server.ensure(&name, &password).await.map_err(|e| Stop::Infra(format!("the add-on database: {e}")))?;
                let forward =
                    server.forward(&self.database_socket(job)).map_err(|e| Stop::Infra(format!("the add-on database's socket: {e}")))?;
                (Some((name, password)), addon.seed.clone().filter(|_| unseeded), Some(forward))
            }
        };
        // Secret values and the add-on database's password are hidden in every log line.
        let hidden = secrets.iter().map(|(_, value)| value.clone()).chain(database.iter().map(|(_, password)| password.clone()));
        let redactor = Redactor::new(hidden);
        Ok((Job { redactor, secrets, tier_env, smoke, push_to, database, seed, ..job.clone() }, secrets_note, forward))
    }

    /// The secrets this deployment gets (opened), and a note for its build log. A pull request
    /// from a fork gets none; a secret whose scope does not cover the target is left out.
    async fn secrets_for(
        &self,
        job: &Job,
        project: &understudy_domain::project::Project,
        spec: Option<&understudy_domain::environment::EnvironmentSpec>,
    ) -> Result<(Vec<(String, String)>, Option<String>), Stop> {
        if project.secrets.is_empty() {
            return Ok((vec![], None));
        }
        let Some(spec) = spec else { return Ok((vec![], None)) };
        if let understudy_domain::values::Target::PullRequest { number, .. } = &spec.target {
            if self.is_from_a_fork(job, *number).await {
                return Ok((vec![], Some(format!("pull request #{number} comes from a fork: built without the project's secrets"))));
            }
        }
        let Some(key) = &self.config.secret_key else {
            return Err(Stop::User(
                FailedStage::Build,
                "the project has secrets, but this worker has no secret key to open them (UNDERSTUDY_SECRET_KEY)".into(),
            ));
        };
        let mut opened = Vec::new();
        for (name, secret) in &project.secrets {
            if !secret.scope.covers(&spec.target, project.production_branch.as_ref()) {
                continue;
            }
            let value = key
                .open(understudy_domain::ids::ProjectId(job.project), name, &secret.sealed)
                .map_err(|e| Stop::User(FailedStage::Build, e.to_string()))?;
            opened.push((name.clone(), value));
        }
        let names: Vec<&str> = opened.iter().map(|(name, _)| name.as_str()).collect();
        let note = (!names.is_empty()).then(|| format!("secrets given: {}", names.join(", ")));
        Ok((opened, note))
    }

    /// Whether pull request `number` of the job's project comes from a fork (unknown: yes).
    async fn is_from_a_fork(&self, job: &Job, number: u64) -> bool {
        let id = understudy_domain::ids::PullRequestId::derive(understudy_domain::ids::ProjectId(job.project), number);
        match self.store.pull_requests.load(id.0).await {
            Ok(state) => state.inner().updated_at.is_none() || state.inner().from_fork,
            Err(_) => true,
        }
    }

    /// Fetch, detect, build, start, health check, route and report Ready.
    async fn build_and_start(
        &self,
        job: &Job,
        meta: &Metadata,
        repository: &understudy_domain::values::RepoFullName,
        git_url: Option<&str>,
        restart: bool,
        stop: &CancellationToken,
    ) -> Result<(Sandboxed, Plan, Vec<(String, String)>), Stop> {
        let build_started = Instant::now();
        let build_log = self.logs.stream(job.deployment.0, "build", job.redactor.clone());
        let (plan, plan_env) = self.prepare(job, repository, git_url, &build_log, stop).await?;
        METRICS.preview_build_seconds.observe(build_started.elapsed());
        // An app that compiles as it starts (the Wing Console) is built once it is up.
        let builds_while_starting = plan.ready == Readiness::WingConsole;
        if !builds_while_starting {
            self.complete_build(job, meta).await?;
        }

        let run_log = self.logs.stream(job.deployment.0, "run", job.redactor.clone());
        let spec = self.sandbox(job, "app", false, &plan_env);
        let start_started = Instant::now();
        let mut app = self.start_with_retries(&spec, &plan, &run_log, &build_log, stop).await?;
        METRICS.preview_start_seconds.observe(start_started.elapsed());
        if builds_while_starting {
            if let Err(failed) = self.complete_build(job, meta).await {
                app.kill().await;
                return Err(failed);
            }
        }
        let socket = spec.run_dir.join(SOCKET);

        // Ready: route to it, then say so.
        if !self.still_latest(job).await? {
            app.kill().await;
            return Err(Stop::Quiet("superseded"));
        }
        sqlx::query(
            "INSERT INTO preview_routes (environment_id, deployment_id, socket, worker) VALUES ($1, $2, $3, $4)
             ON CONFLICT (environment_id) DO UPDATE SET deployment_id = EXCLUDED.deployment_id, socket = EXCLUDED.socket,
                 worker = EXCLUDED.worker, updated_at = now()",
        )
        .bind(job.environment.0)
        .bind(job.deployment.0)
        .bind(socket.display().to_string())
        .bind(&self.id)
        .execute(self.pool())
        .await?;
        sqlx::query("UPDATE deployment_leases SET attempts = 0, last_error = NULL WHERE deployment_id = $1")
            .bind(job.deployment.0)
            .execute(self.pool())
            .await?;
        if !restart {
            let url = self.config.preview_url(job.environment);
            self.command(job, meta, EnvironmentCommand::MarkReady { deployment_id: job.deployment, url, at: Utc::now() }).await?;
            build_log.line("understudy: ready");
        }
        Ok((app, plan, plan_env))
    }

    /// Records the end of the build, unless a restart of a deployment past it.
    async fn complete_build(&self, job: &Job, meta: &Metadata) -> Result<(), Stop> {
        if self.status(job).await? == Some(DeploymentStatus::Building) {
            self.command(job, meta, EnvironmentCommand::CompleteBuild { deployment_id: job.deployment, at: Utc::now() }).await?;
        }
        Ok(())
    }

    /// Fetch into a clean work dir, detect the stack, install, build and (once) seed: the plan
    /// and the environment variables every step of the app gets.
    async fn prepare(
        &self,
        job: &Job,
        repository: &understudy_domain::values::RepoFullName,
        git_url: Option<&str>,
        build_log: &LogStream,
        stop: &CancellationToken,
    ) -> Result<(Plan, Vec<(String, String)>), Stop> {
        // Fetch.
        let (deployment_dir, _) = self.dirs(job);
        let checkout = deployment_dir.join("src");
        if deployment_dir.exists() {
            // A previous attempt's leftovers: start clean.
            std::fs::remove_dir_all(&deployment_dir).map_err(|e| Stop::Infra(format!("removing an old work dir: {e}")))?;
        }
        let remote = match git_url {
            Some(url) => git::Remote { url: url.to_string(), token: None },
            None => git::github_remote(&self.config.git_base, repository.as_str(), self.clone_token(job).await?),
        };
        let fetched = tokio::select! {
            _ = stop.cancelled() => return Err(self.why_stopped(stop)),
            fetched = git::fetch(&remote, &job.commit, &checkout, build_log, self.config.fetch_timeout) => fetched,
        };
        match fetched {
            Ok(()) => {}
            Err(FetchError::Infra(reason)) => return Err(Stop::Infra(reason)),
            Err(FetchError::Failed(reason)) => return Err(Stop::User(FailedStage::Build, reason)),
        }

        // Detect.
        let plan = match stack::plan(&checkout, &job.entrypoint) {
            Ok(plan) => plan,
            Err(error) => return Err(Stop::User(FailedStage::Build, error.to_string())),
        };
        build_log.line(format!("understudy: stack {}", plan.stack.as_str()));
        // The repository file's variables, then the tier's, then secrets: each may override the last.
        let mut plan_env: Vec<(String, String)> = plan.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        plan_env.extend(job.tier_env.iter().cloned());
        plan_env.extend(job.secrets.iter().cloned());
        // The environment's own database wins over any secret of that name.
        if let Some((name, password)) = &job.database {
            plan_env.push(("DATABASE_URL".into(), super::addon::sandbox_url(name, password)));
        }

        // Build (a restart too: its work dir was lost with the worker that ran it).
        if let Some(install) = &plan.install {
            let spec = self.sandbox(job, "install", true, &plan_env);
            self.step(&spec, install, build_log, self.config.build_timeout, stop).await.map_err(|e| e.during("install"))?;
        }
        if let Some(build) = &plan.build {
            let spec = self.sandbox(job, "build", false, &plan_env);
            self.step(&spec, build, build_log, self.config.build_timeout, stop).await.map_err(|e| e.during("build"))?;
        }
        if let (Some(seed), Some((name, _))) = (&job.seed, &job.database) {
            // The add-on database's seed: once, after the first build that finds it unseeded.
            let spec = self.sandbox(job, "seed", false, &plan_env);
            self.step(&spec, seed, build_log, self.config.build_timeout, stop).await.map_err(|e| e.during("seed"))?;
            if let Some(server) = &self.config.addon_database {
                server.mark_seeded(name).await.map_err(|e| Stop::Infra(format!("the add-on database: {e}")))?;
            }
        }
        Ok((plan, plan_env))
    }

    /// An installation token when the repository is fetched from GitHub over HTTPS and the App
    /// is configured; none otherwise (public repositories, repositories on disk).
    async fn clone_token(&self, job: &Job) -> Result<Option<String>, Stop> {
        let Some(github) = &self.github else { return Ok(None) };
        if !self.config.git_base.starts_with("https://") {
            return Ok(None);
        }
        let project = self.store.projects.load(job.project).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let Some(account) = project.account_id else { return Ok(None) };
        let account = self.store.accounts.load(account.0).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let Some(installation) = account.installation_id else { return Ok(None) };
        github.clone_token(installation).await.map(Some).map_err(|e| Stop::Infra(format!("an installation token to fetch with: {e}")))
    }

    async fn command(&self, job: &Job, meta: &Metadata, command: EnvironmentCommand) -> Result<(), Stop> {
        self.store.environments.execute(job.environment.0, command, meta.clone()).await?;
        Ok(())
    }

    async fn status(&self, job: &Job) -> Result<Option<DeploymentStatus>, Stop> {
        let state = self.store.environments.load(job.environment.0).await.map_err(|e| Stop::Infra(e.to_string()))?;
        Ok(state.inner().deployment(job.deployment).map(|d| d.status))
    }

    /// Whether this is still the environment's latest deployment and the environment is live.
    async fn still_latest(&self, job: &Job) -> Result<bool, Stop> {
        let state = self.store.environments.load(job.environment.0).await.map_err(|e| Stop::Infra(e.to_string()))?;
        let state = state.inner();
        Ok(!state.terminated && !state.deactivated && state.current().map(|d| d.id) == Some(job.deployment))
    }

    /// A step saw its token cancelled: the worker is stopping, the lease was lost, or a newer
    /// commit superseded the deployment (`deploy` tells these apart by its own token).
    fn why_stopped(&self, stop: &CancellationToken) -> Stop {
        debug_assert!(stop.is_cancelled());
        Stop::Quiet("stopped")
    }

    /// Runs one shell line to completion in a fresh sandbox, its output into `log`.
    async fn step(
        &self,
        spec: &SandboxSpec,
        line: &str,
        log: &LogStream,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<(), StepError> {
        self.step_with(spec, line, &["/bin/sh".into(), "-c".into(), line.into()], log, timeout, stop).await
    }

    /// [`Self::step`], running `argv` (which runs `line`).
    async fn step_with(
        &self,
        spec: &SandboxSpec,
        line: &str,
        argv: &[String],
        log: &LogStream,
        timeout: Duration,
        stop: &CancellationToken,
    ) -> Result<(), StepError> {
        log.line(format!("$ {line}"));
        let started = Instant::now();
        let mut sandboxed = spec.spawn(argv).map_err(|e| StepError::Infra(e.to_string()))?;
        let status = run_to_end(&mut sandboxed, log, timeout, stop).await?;
        log.line(format!("understudy: exited with {} after {:.1}s", describe(status), started.elapsed().as_secs_f64()));
        if status.success() {
            Ok(())
        } else if sandboxed.out_of_memory() {
            Err(StepError::Failed(format!("`{line}` ran out of memory ({} MiB limit)", spec.limits.memory_bytes >> 20)))
        } else if status.code() == Some(125) {
            Err(StepError::Infra("the sandbox could not be set up".into()))
        } else {
            Err(StepError::Failed(format!("`{line}` exited with {}", describe(status))))
        }
    }

    /// Starts the app behind the bridge (its port, as a unix socket in the run dir), its output
    /// into `log`.
    fn spawn_app(&self, spec: &SandboxSpec, plan: &Plan, log: &LogStream) -> Result<Sandboxed, Stop> {
        log.line(format!("$ {}", plan.start));
        let argv: Vec<String> = [
            "/opt/understudy/understudy",
            "sandbox-bridge",
            "--socket",
            &format!("/run/understudy/{SOCKET}"),
            "--port",
            &APP_PORT.to_string(),
            "--",
            "/bin/sh",
            "-c",
            &plan.start,
        ]
        .map(String::from)
        .to_vec();
        let mut app = spec.spawn(&argv).map_err(|e| Stop::Infra(format!("starting the sandbox: {e}")))?;
        pipe_output(&mut app, log);
        Ok(app)
    }

    /// [`Self::start`], up to three times: an app that does not compile is not tried again.
    /// Each failed attempt's reason goes to `log`, and the last one's is the failure.
    async fn start_with_retries(
        &self,
        spec: &SandboxSpec,
        plan: &Plan,
        run_log: &LogStream,
        log: &LogStream,
        stop: &CancellationToken,
    ) -> Result<Sandboxed, Stop> {
        let mut last = String::new();
        for attempt in 1..=3 {
            match self.start(spec, plan, run_log, log, stop).await {
                Ok(app) => return Ok(app),
                Err(Stop::User(FailedStage::Start, reason)) => {
                    log.line(format!("understudy: start attempt {attempt} of 3 failed: {reason}"));
                    last = reason;
                }
                Err(other) => return Err(other),
            }
        }
        Err(Stop::User(FailedStage::Start, last))
    }

    /// Starts the app behind the bridge and waits until it is up (`Plan::ready`). An app that
    /// compiles as it starts and does not compile is a build failure, its errors into `build_log`.
    async fn start(
        &self,
        spec: &SandboxSpec,
        plan: &Plan,
        log: &LogStream,
        build_log: &LogStream,
        stop: &CancellationToken,
    ) -> Result<Sandboxed, Stop> {
        let mut app = self.spawn_app(spec, plan, log)?;
        let socket = spec.run_dir.join(SOCKET);
        // Compiling may take the build timeout, counted from the spawn; what follows it, the
        // start timeout, counted from its end.
        let mut since = Instant::now();
        let mut compiling = false;
        let mut last = "no answer yet".to_string();
        let mut reported = String::new();
        loop {
            if let Ok(Some(status)) = app.child.try_wait() {
                let reason = if app.out_of_memory() {
                    format!("the app ran out of memory ({} MiB limit)", spec.limits.memory_bytes >> 20)
                } else if status.code() == Some(125) {
                    return Err(Stop::Infra("the sandbox could not be set up".into()));
                } else {
                    format!("the app exited with {} before it answered on $PORT", describe(status))
                };
                return Err(Stop::User(FailedStage::Start, reason));
            }
            let (limit, stage) =
                if compiling { (self.config.build_timeout, FailedStage::Build) } else { (self.config.start_timeout, FailedStage::Start) };
            if since.elapsed() >= limit {
                app.kill().await;
                let what = if compiling { "the app did not compile" } else { "the app was not up" };
                return Err(Stop::User(stage, format!("{what} within {}s: {last}", limit.as_secs())));
            }
            if socket.exists() {
                match look(&socket, plan).await {
                    Look::Up(how) => {
                        log.line(format!("understudy: {how}"));
                        return Ok(app);
                    }
                    Look::DoesNotCompile(errors) => {
                        app.kill().await;
                        build_log.line("understudy: the app does not compile:");
                        for line in errors.lines() {
                            build_log.line(line);
                        }
                        let summary = errors.lines().map(str::trim).filter(|l| !l.is_empty()).take(2).collect::<Vec<_>>().join(" ");
                        return Err(Stop::User(FailedStage::Build, format!("build failed: the app does not compile: {summary}")));
                    }
                    Look::NotYet { compiling: now, why } => {
                        if compiling && !now {
                            since = Instant::now();
                        }
                        compiling = now;
                        last = why;
                    }
                }
                if last != reported {
                    log.line(format!("understudy: {last}"));
                    reported = last.clone();
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {
                    app.kill().await;
                    return Err(self.why_stopped(stop));
                }
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// Runs the entrypoint's tests, each in a fresh sandbox of its own, and records the results.
    async fn run_tests(
        &self,
        job: &Job,
        meta: &Metadata,
        plan: &Plan,
        plan_env: &[(String, String)],
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        let results = match &plan.tests {
            Tests::None => vec![],
            Tests::Command(line) => {
                let log = self.logs.stream(job.deployment.0, format!("test:{line}"), job.redactor.clone());
                let spec = self.sandbox(job, "test", false, plan_env);
                let started = Instant::now();
                let outcome = match self.step(&spec, line, &log, self.config.test_timeout, stop).await {
                    Ok(()) => TestOutcome::Passed,
                    Err(StepError::Stopped) => return Err(self.why_stopped(stop)),
                    Err(StepError::Infra(reason)) => return Err(Stop::Infra(reason)),
                    Err(StepError::Failed(_)) => TestOutcome::Failed,
                };
                vec![(line.clone(), outcome, Some(started.elapsed()))]
            }
            Tests::Wing { entrypoint } => self.wing_tests(job, entrypoint, plan_env, stop).await?,
        };
        for (test, outcome, duration) in results {
            let duration_ms = duration.map(|d| d.as_millis() as u64);
            let command =
                EnvironmentCommand::RecordTestResult { deployment_id: job.deployment, test, outcome, duration_ms, at: Utc::now() };
            self.command(job, meta, command).await?;
        }
        if let Some(line) = &job.smoke {
            let started = Instant::now();
            let outcome = self.smoke(job, line, plan_env, stop).await?;
            let duration_ms = Some(started.elapsed().as_millis() as u64);
            let command = EnvironmentCommand::RecordTestResult {
                deployment_id: job.deployment,
                test: "smoke".into(),
                outcome,
                duration_ms,
                at: Utc::now(),
            };
            self.command(job, meta, command).await?;
        }
        self.command(job, meta, EnvironmentCommand::CompleteTests { deployment_id: job.deployment, at: Utc::now() }).await?;
        if let Some(branch) = &job.push_to {
            self.push_passed(job, meta, branch).await?;
        }
        Ok(())
    }

    /// Pushes the commit to the tier's `push_to` branch if the deployment passed, once. A push
    /// the remote refuses is written to the test log; it does not fail the deployment.
    async fn push_passed(&self, job: &Job, meta: &Metadata, branch: &str) -> Result<(), Stop> {
        let state = self.store.environments.load(job.environment.0).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let Some(deployment) = state.deployment(job.deployment) else { return Ok(()) };
        if !deployment.passed() || deployment.pushed_to.as_deref() == Some(branch) {
            return Ok(());
        }
        let log = self.logs.stream(job.deployment.0, "test:push", job.redactor.clone());
        let project = self.store.projects.load(job.project).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let Some(repository) = project.repository.clone() else { return Ok(()) };
        let remote = match project.git_url.as_deref() {
            Some(url) => git::Remote { url: url.to_string(), token: None },
            None => git::github_remote(&self.config.git_base, repository.as_str(), self.clone_token(job).await?),
        };
        let (deployment_dir, _) = self.dirs(job);
        match git::push(&remote, &job.commit, branch, &deployment_dir.join("src"), &log, self.config.fetch_timeout).await {
            Ok(()) => {
                log.line(format!("understudy: pushed {} to {branch}", &job.commit[..12.min(job.commit.len())]));
                let command = EnvironmentCommand::RecordPush { deployment_id: job.deployment, branch: branch.to_string(), at: Utc::now() };
                self.command(job, meta, command).await
            }
            Err(error) => {
                log.line(format!("understudy: not pushed to {branch}: {error}"));
                Ok(())
            }
        }
    }

    /// The tier's smoke test against the running app: a fresh sandbox whose only way out is a
    /// bridge from its own loopback to the app's socket. What it leaves in
    /// `$UNDERSTUDY_ARTIFACTS` is kept with the deployment, passed or not.
    async fn smoke(&self, job: &Job, line: &str, plan_env: &[(String, String)], stop: &CancellationToken) -> Result<TestOutcome, Stop> {
        let log = self.logs.stream(job.deployment.0, "test:smoke", job.redactor.clone());
        let spec = self.beside_the_app(job, "smoke", plan_env);
        let artifacts = spec.run_dir.join("artifacts");
        let _ = std::fs::remove_dir_all(&artifacts);
        std::fs::create_dir_all(&artifacts).map_err(|e| Stop::Infra(format!("the smoke test's artifacts dir: {e}")))?;
        let outcome = match self.step_with(&spec, line, &reaching_the_app(line), &log, self.config.test_timeout, stop).await {
            Ok(()) => TestOutcome::Passed,
            Err(StepError::Stopped) => return Err(self.why_stopped(stop)),
            Err(StepError::Infra(reason)) => return Err(Stop::Infra(reason)),
            Err(StepError::Failed(_)) => TestOutcome::Failed,
        };
        let kept = self.keep_artifacts(job, &artifacts).await?;
        if !kept.is_empty() {
            log.line(format!("understudy: kept {}", kept.join(", ")));
        }
        Ok(outcome)
    }

    /// A fresh sandbox whose one way out is `$UNDERSTUDY_TARGET_URL`, the running app (through
    /// [`reaching_the_app`]); `$UNDERSTUDY_ARTIFACTS` is a directory the host reads afterwards.
    fn beside_the_app(&self, job: &Job, name: &str, plan_env: &[(String, String)]) -> SandboxSpec {
        let mut spec = self.sandbox(job, name, false, plan_env);
        let (deployment_dir, _) = self.dirs(job);
        spec.read_only.push((deployment_dir.join("run-app"), "/run/target".into()));
        spec.env.push(("UNDERSTUDY_TARGET_URL".into(), format!("http://127.0.0.1:{SMOKE_PORT}")));
        spec.env.push(("UNDERSTUDY_ARTIFACTS".into(), "/run/understudy/artifacts".into()));
        spec
    }

    /// Runs the tier's scheduled job `name` (run `run`) beside the serving app, its output in the
    /// log `job:{name}`, and records how it ended.
    async fn run_scheduled_job(
        &self,
        job: &Job,
        meta: &Metadata,
        name: &str,
        run: Uuid,
        plan_env: &[(String, String)],
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        let started = EnvironmentCommand::StartJobRun { job: name.to_string(), run_id: run, at: Utc::now() };
        self.command(job, meta, started).await?;
        let log = self.logs.stream(job.deployment.0, format!("job:{name}"), job.redactor.clone());
        log.line(format!("understudy: scheduled run {run} of {name}"));
        let project = self.store.projects.load(job.project).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let environment = self.store.environments.load(job.environment.0).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let declared = environment
            .spec
            .as_ref()
            .and_then(|spec| project.tier_of(&spec.target))
            .and_then(|tier| tier.spec.jobs.iter().find(|j| j.name == name).cloned());
        let (succeeded, detail) = match declared {
            None => (false, "the job is no longer declared".to_string()),
            Some(declared) => {
                let spec = self.beside_the_app(job, &format!("job-{name}"), plan_env);
                let line = declared.command.as_str();
                match self.step_with(&spec, line, &reaching_the_app(line), &log, self.config.test_timeout, stop).await {
                    Ok(()) => (true, "exited with 0".to_string()),
                    Err(StepError::Stopped) => return Err(self.why_stopped(stop)),
                    Err(StepError::Infra(reason)) => (false, format!("infrastructure: {reason}")),
                    Err(StepError::Failed(reason)) => (false, reason),
                }
            }
        };
        let finished = EnvironmentCommand::FinishJobRun { job: name.to_string(), run_id: run, succeeded, detail, at: Utc::now() };
        self.command(job, meta, finished).await
    }

    /// A scheduled job run waiting for this environment's serving worker: `(job, run)`.
    async fn job_requested(&self, job: &Job) -> Result<Option<(String, Uuid)>, Stop> {
        let row: Option<(String, String)> = sqlx::query_as(
            "SELECT j.key, j.value->>'requested' FROM environments, jsonb_each(state->'jobs') j
             WHERE environment_id = $1 AND j.value->>'requested' IS NOT NULL ORDER BY j.key LIMIT 1",
        )
        .bind(job.environment.0)
        .fetch_optional(self.pool())
        .await?;
        Ok(row.and_then(|(name, run)| Some((name, Uuid::parse_str(&run).ok()?))))
    }

    /// Stores the files a smoke test left (the first [`MAX_ARTIFACTS`], each at most
    /// [`MAX_ARTIFACT_BYTES`]; subdirectories and links are skipped); their names.
    async fn keep_artifacts(&self, job: &Job, dir: &std::path::Path) -> Result<Vec<String>, Stop> {
        let mut files: Vec<(String, std::path::PathBuf)> = std::fs::read_dir(dir)
            .map(|entries| {
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
                    .filter(|e| e.metadata().is_ok_and(|m| m.len() <= MAX_ARTIFACT_BYTES))
                    .filter_map(|e| Some((e.file_name().into_string().ok()?, e.path())))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files.truncate(MAX_ARTIFACTS);
        let mut kept = Vec::new();
        for (name, path) in files {
            let Ok(content) = std::fs::read(&path) else { continue };
            sqlx::query(
                "INSERT INTO deployment_artifacts (deployment_id, name, content) VALUES ($1, $2, $3)
                 ON CONFLICT (deployment_id, name) DO UPDATE SET content = EXCLUDED.content, created_at = now()",
            )
            .bind(job.deployment.0)
            .bind(&name)
            .bind(content)
            .execute(self.pool())
            .await?;
            kept.push(name);
        }
        Ok(kept)
    }

    /// `wing test`: every test in a fresh simulator; results and per-test traces from its JSON.
    async fn wing_tests(
        &self,
        job: &Job,
        entrypoint: &str,
        plan_env: &[(String, String)],
        stop: &CancellationToken,
    ) -> Result<Vec<(String, TestOutcome, Option<Duration>)>, Stop> {
        let log = self.logs.stream(job.deployment.0, "test", job.redactor.clone());
        let spec = self.sandbox(job, "test", false, plan_env);
        let results_file = "/run/understudy/test-results.json";
        let line = format!("wing test {} -o {results_file}", stack::shell_quote(entrypoint));
        let started = Instant::now();
        let ran = self.step(&spec, &line, &log, self.config.test_timeout, stop).await;
        let elapsed = started.elapsed();
        match ran {
            Err(StepError::Stopped) => return Err(self.why_stopped(stop)),
            Err(StepError::Infra(reason)) => return Err(Stop::Infra(reason)),
            Ok(()) | Err(StepError::Failed(_)) => {}
        }
        // The app under test writes this file: read only a bounded amount of it.
        let path = spec.run_dir.join("test-results.json");
        let too_big = std::fs::metadata(&path).is_ok_and(|m| m.len() > MAX_RESULTS_BYTES);
        if too_big {
            log.line(format!("understudy: test-results.json is larger than {} MiB; not read", MAX_RESULTS_BYTES >> 20));
            return Ok(vec![("wing test".into(), TestOutcome::Failed, Some(elapsed))]);
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut parsed = parse_wing_results(&text, entrypoint);
        if parsed.len() > MAX_TESTS {
            let left_out = parsed.len() - MAX_TESTS;
            parsed.truncate(MAX_TESTS);
            log.line(format!("understudy: {left_out} more test results than the {MAX_TESTS} recorded per run; not recorded"));
            parsed.push(WingTest {
                name: format!("{left_out} more tests"),
                pass: false,
                error: Some(format!("only {MAX_TESTS} test results are recorded per run")),
                traces: vec![],
            });
        }
        if parsed.is_empty() {
            // No results at all (the tests did not compile, the runner crashed): one failure that
            // points at the log, never a silent pass.
            let outcome = if matches!(ran, Ok(())) { return Ok(vec![]) } else { TestOutcome::Failed };
            return Ok(vec![("wing test".into(), outcome, Some(elapsed))]);
        }
        let mut results = Vec::new();
        for test in parsed {
            let test_log = self.logs.stream(job.deployment.0, format!("test:{}", test.name), job.redactor.clone());
            for trace in &test.traces {
                test_log.line(trace);
            }
            if let Some(error) = &test.error {
                test_log.line(format!("error: {error}"));
            }
            test_log.line(if test.pass { "understudy: passed" } else { "understudy: failed" });
            // `wing test` reports no time per test (each runs in its own simulator, in one run).
            results.push((test.name, if test.pass { TestOutcome::Passed } else { TestOutcome::Failed }, None));
        }
        Ok(results)
    }

    /// Keeps the app running until a newer deployment of the environment serves, the
    /// environment is deactivated or terminated, the app dies, or the worker stops.
    async fn serve(
        &self,
        job: &Job,
        meta: &Metadata,
        app: &mut Sandboxed,
        plan: &Plan,
        plan_env: &[(String, String)],
        stop: &CancellationToken,
    ) -> Result<(), Stop> {
        // The watchdog: the health check keeps running while the preview serves; an app that
        // stops answering it `health_failures` times in a row is restarted (the same start,
        // three tries), and fails the deployment only if it does not come back.
        let spec = self.sandbox(job, "app", false, plan_env);
        let socket = spec.run_dir.join(SOCKET);
        let run_log = self.logs.stream(job.deployment.0, "run", job.redactor.clone());
        let mut failures = 0;
        let mut next_probe = Instant::now() + self.config.health_interval;
        loop {
            tokio::select! {
                status = app.child.wait() => {
                    let status = status.map_err(|e| Stop::Infra(e.to_string()))?;
                    if !self.still_latest(job).await? {
                        return Ok(());
                    }
                    let reason = if app.out_of_memory() { "the app ran out of memory".to_string() } else { format!("the app exited with {}", describe(status)) };
                    return Err(Stop::User(FailedStage::Start, reason));
                }
                _ = stop.cancelled() => {
                    app.kill().await;
                    return Err(self.why_stopped(stop));
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if !self.should_serve(job).await? {
                        app.kill().await;
                        return Ok(());
                    }
                    if let Some(restart) = self.requested(job, "restart_requested").await? {
                        // On demand (the `restartEnvironment` mutation): the same build, a fresh process.
                        let command = EnvironmentCommand::StartRestart { deployment_id: job.deployment, restart_id: restart, at: Utc::now() };
                        self.command(job, meta, command).await?;
                        run_log.line("understudy: restart requested; restarting the app");
                        app.kill().await;
                        *app = self.start(&spec, plan, &run_log, &run_log, stop).await?;
                        self.report_health(job, meta, true, "restarted on request").await?;
                        failures = 0;
                        next_probe = Instant::now() + self.config.health_interval;
                    }
                    if let Some(run) = self.requested(job, "test_run_requested").await? {
                        // On demand (`understudy test run`): the tests again, each in a fresh
                        // instance, their results replacing the last ones.
                        let command = EnvironmentCommand::StartTestRun { deployment_id: job.deployment, run_id: run, at: Utc::now() };
                        self.command(job, meta, command).await?;
                        self.logs.stream(job.deployment.0, "test", job.redactor.clone()).line(format!("understudy: test run {run} requested"));
                        let started = Instant::now();
                        self.run_tests(job, meta, plan, plan_env, stop).await?;
                        METRICS.preview_test_seconds.observe(started.elapsed());
                    }
                    if let Some((name, run)) = self.job_requested(job).await? {
                        // The tier's schedule: one run at a time, beside the app.
                        self.run_scheduled_job(job, meta, &name, run, plan_env, stop).await?;
                    }
                    if Instant::now() < next_probe {
                        continue;
                    }
                    next_probe = Instant::now() + self.config.health_interval;
                    match unix_http::probe(&socket, &plan.health_path, self.config.health_timeout).await {
                        Ok(code) if (200..400).contains(&code) => {
                            if failures > 0 {
                                self.report_health(job, meta, true, "answering again").await?;
                            }
                            failures = 0;
                        }
                        other => {
                            failures += 1;
                            let why = match other { Ok(code) => format!("answered {code}"), Err(error) => error };
                            run_log.line(format!(
                                "understudy: health check GET {} failed ({failures} of {}): {why}",
                                plan.health_path, self.config.health_failures
                            ));
                            self.report_health(job, meta, false, &format!("health check GET {}: {why}", plan.health_path)).await?;
                        }
                    }
                    if failures >= self.config.health_failures {
                        run_log.line("understudy: the app stopped answering; restarting it");
                        METRICS.preview_restarts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        app.kill().await;
                        *app = self.start_with_retries(&spec, plan, &run_log, &run_log, stop).await.map_err(|stopped| match stopped {
                            Stop::User(_, last) => Stop::User(
                                FailedStage::Start,
                                format!("the app stopped answering its health check and did not come back: {last}"),
                            ),
                            other => other,
                        })?;
                        self.report_health(job, meta, true, "restarted").await?;
                        failures = 0;
                        next_probe = Instant::now() + self.config.health_interval;
                    }
                }
            }
        }
    }

    /// Records the serving deployment's health; the domain records only changes, so a check
    /// every few seconds costs nothing in the log.
    async fn report_health(&self, job: &Job, meta: &Metadata, healthy: bool, detail: &str) -> Result<(), Stop> {
        let command =
            EnvironmentCommand::ReportHealth { deployment_id: job.deployment, healthy, detail: detail.to_string(), at: Utc::now() };
        self.command(job, meta, command).await
    }

    /// What waits for this deployment on demand: `test_run_requested` or `restart_requested`.
    async fn requested(&self, job: &Job, field: &str) -> Result<Option<Uuid>, Stop> {
        let run: Option<Option<String>> = sqlx::query_scalar(
            "SELECT d->>$3 FROM environments, jsonb_array_elements(state->'deployments') d
             WHERE environment_id = $1 AND d->>'id' = $2",
        )
        .bind(job.environment.0)
        .bind(job.deployment.0.to_string())
        .bind(field)
        .fetch_optional(self.pool())
        .await?;
        Ok(run.flatten().and_then(|id| Uuid::parse_str(&id).ok()))
    }

    /// False once another deployment holds the environment's route, or the environment is no
    /// longer live.
    async fn should_serve(&self, job: &Job) -> Result<bool, Stop> {
        let row: Option<(String, Option<Uuid>)> = sqlx::query_as(
            "SELECT e.status, r.deployment_id FROM environments e LEFT JOIN preview_routes r USING (environment_id)
             WHERE e.environment_id = $1",
        )
        .bind(job.environment.0)
        .fetch_optional(self.pool())
        .await?;
        Ok(match row {
            Some((status, route)) => status != "Stale" && status != "Terminated" && route == Some(job.deployment.0),
            None => true,
        })
    }

    /// Removes the deployment's route (if it still has it) and work dir, and ends the lease as
    /// `lease` says.
    async fn clean_up(&self, job: &Job, lease: Lease) {
        let _ = sqlx::query("DELETE FROM preview_routes WHERE environment_id = $1 AND deployment_id = $2")
            .bind(job.environment.0)
            .bind(job.deployment.0)
            .execute(self.pool())
            .await;
        let (deployment_dir, cache_dir) = self.dirs(job);
        if deployment_dir.exists() {
            if let Err(error) = remove_dir(&deployment_dir).await {
                tracing::warn!(%error, dir = %deployment_dir.display(), "could not remove a work dir");
            }
        }
        if lease == Lease::Release {
            let _ = sqlx::query("UPDATE deployment_leases SET released = true WHERE deployment_id = $1 AND worker = $2")
                .bind(job.deployment.0)
                .bind(&self.id)
                .execute(self.pool())
                .await;
            // A terminated environment's cache goes too.
            let terminated: Option<String> = sqlx::query_scalar("SELECT status FROM environments WHERE environment_id = $1")
                .bind(job.environment.0)
                .fetch_optional(self.pool())
                .await
                .ok()
                .flatten();
            if terminated.as_deref() == Some("Terminated") {
                let _ = remove_dir(&cache_dir).await;
                if let Some(environment_dir) = cache_dir.parent() {
                    let _ = std::fs::remove_dir(environment_dir);
                }
            }
        } else if lease == Lease::HandBack {
            let _ = sqlx::query("UPDATE deployment_leases SET expires_at = now() WHERE deployment_id = $1 AND worker = $2")
                .bind(job.deployment.0)
                .bind(&self.id)
                .execute(self.pool())
                .await;
        }
    }
}

/// How a deployment's lease ends when its task does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lease {
    /// The work is over (ready and replaced, failed, superseded): nobody claims it again.
    Release,
    /// This worker is stopping: the lease expires now, so the next worker need not wait.
    HandBack,
    /// An infrastructure fault: the lease stays until its backoff ends, then anyone retries.
    Keep,
}

/// What one look at a started app found.
enum Look {
    /// Up, and how that was seen.
    Up(String),
    /// Not up yet, whether it is still compiling, and why not.
    NotYet { compiling: bool, why: String },
    /// It compiles as it starts, and does not compile: the compiler's errors.
    DoesNotCompile(String),
}

/// One look at whether the app behind `socket` is up (`Plan::ready`).
async fn look(socket: &Path, plan: &Plan) -> Look {
    let path = &plan.health_path;
    let not_yet = |why: String| Look::NotYet { compiling: false, why };
    let code = match unix_http::probe(socket, path, Duration::from_secs(5)).await {
        Ok(code) if (200..400).contains(&code) => code,
        Ok(code) => return not_yet(format!("health check GET {path}: answered {code}")),
        Err(error) => return not_yet(format!("health check GET {path}: {error}")),
    };
    match plan.ready {
        Readiness::Answers => Look::Up(format!("health check GET {path} answered {code}")),
        Readiness::WingConsole => match wing_console(socket, "app.state").await.as_deref() {
            Ok("success") => Look::Up("the Wing Console has compiled the app and runs it in its simulator".into()),
            Ok("error") => Look::DoesNotCompile(
                wing_console(socket, "app.error").await.unwrap_or_else(|error| format!("(the Wing Console's error: {error})")),
            ),
            Ok(state) => Look::NotYet { compiling: state == "compiling", why: format!("the Wing Console's app: {state}") },
            Err(error) => not_yet(format!("the Wing Console's app state: {error}")),
        },
    }
}

/// A query of the Wing Console's own API (tRPC over HTTP, as its page uses it): `result.data`.
async fn wing_console(socket: &Path, procedure: &str) -> Result<String, String> {
    let path = format!("/trpc/{procedure}");
    let (status, body) = unix_http::get(socket, &path, Duration::from_secs(5), 1 << 20).await?;
    if status != 200 {
        return Err(format!("GET {path} answered {status}"));
    }
    let value: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("GET {path}: {e}"))?;
    value.pointer("/result/data").and_then(|data| data.as_str()).map(str::to_string).ok_or_else(|| format!("GET {path}: no result.data"))
}

/// Cancels `work` once `deployment` is no longer its environment's latest, or the environment
/// is stale or terminated (read from the `environments` read model once a second).
async fn watch_for_newer(pool: PgPool, environment: EnvironmentId, deployment: DeploymentId, work: CancellationToken) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let row: Result<Option<(Option<Uuid>, String)>, _> =
            sqlx::query_as("SELECT latest_deployment_id, status FROM environments WHERE environment_id = $1")
                .bind(environment.0)
                .fetch_optional(&pool)
                .await;
        if let Ok(Some((latest, status))) = row {
            if latest != Some(deployment.0) || status == "Stale" || status == "Terminated" {
                tracing::info!(%deployment, "superseded or gone; stopping its build");
                work.cancel();
                return;
            }
        }
    }
}

async fn remove_dir(dir: &Path) -> std::io::Result<()> {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await.map_err(std::io::Error::other)?
}

#[derive(Debug)]
enum StepError {
    Failed(String),
    Infra(String),
    Stopped,
}

impl StepError {
    fn during(self, step: &str) -> Stop {
        match self {
            StepError::Failed(reason) => Stop::User(FailedStage::Build, format!("{step} failed: {reason}")),
            StepError::Infra(reason) => Stop::Infra(format!("{step}: {reason}")),
            StepError::Stopped => Stop::Quiet("stopped"),
        }
    }
}

/// `line` run under the reversed bridge: `$UNDERSTUDY_TARGET_URL` reaches the app's socket.
fn reaching_the_app(line: &str) -> Vec<String> {
    [
        "/opt/understudy/understudy",
        "sandbox-bridge",
        "--reverse",
        "--socket",
        &format!("/run/target/{SOCKET}"),
        "--port",
        &SMOKE_PORT.to_string(),
        "--",
        "/bin/sh",
        "-c",
        line,
    ]
    .map(String::from)
    .to_vec()
}

fn pipe_output(sandboxed: &mut Sandboxed, log: &LogStream) {
    if let Some(out) = sandboxed.child.stdout.take() {
        let log = log.clone();
        tokio::spawn(async move { log.pipe(out).await });
    }
    if let Some(err) = sandboxed.child.stderr.take() {
        let log = log.clone();
        tokio::spawn(async move { log.pipe(err).await });
    }
}

async fn run_to_end(
    sandboxed: &mut Sandboxed,
    log: &LogStream,
    timeout: Duration,
    stop: &CancellationToken,
) -> Result<ExitStatus, StepError> {
    let (out, err) = (sandboxed.child.stdout.take(), sandboxed.child.stderr.take());
    let pipes = async {
        let out = async {
            if let Some(out) = out {
                log.pipe(out).await
            }
        };
        let err = async {
            if let Some(err) = err {
                log.pipe(err).await
            }
        };
        tokio::join!(out, err);
    };
    let finished = async {
        let (_, status) = tokio::join!(pipes, sandboxed.child.wait());
        status
    };
    let result = tokio::select! {
        _ = stop.cancelled() => Err(StepError::Stopped),
        outcome = tokio::time::timeout(timeout, finished) => match outcome {
            Err(_) => Err(StepError::Failed(format!("timed out after {}s", timeout.as_secs()))),
            Ok(Err(error)) => Err(StepError::Infra(error.to_string())),
            Ok(Ok(status)) => Ok(status),
        },
    };
    if result.is_err() {
        sandboxed.kill().await;
    }
    result
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("code {code}"),
        (None, Some(9)) => "SIGKILL".into(),
        (None, Some(signal)) => format!("signal {signal}"),
        _ => "an unknown status".into(),
    }
}

/// One test of `wing test -o results.json`.
#[derive(Debug, Clone, PartialEq)]
struct WingTest {
    name: String,
    pass: bool,
    error: Option<String>,
    traces: Vec<String>,
}

/// A results file larger than this is not read: the run is one failure.
const MAX_RESULTS_BYTES: u64 = 16 << 20;
/// Test results recorded per run at most; past it, one failed result says how many were left out.
const MAX_TESTS: usize = 1000;
/// A test's name is a cell of the PR comment's table: longer ones are cut, with `…`.
const TEST_NAME_CHARS: usize = 200;

/// A test's name as the app reported it, made fit to show and store: control characters (a NUL
/// cannot be stored at all) become U+FFFD, and the name is trimmed and cut to
/// [`TEST_NAME_CHARS`].
fn test_name(reported: &str) -> String {
    let shown: String = reported.chars().map(|c| if c.is_control() { '\u{FFFD}' } else { c }).collect();
    let shown = shown.trim();
    if shown.is_empty() {
        return "(unnamed test)".into();
    }
    match shown.char_indices().nth(TEST_NAME_CHARS) {
        Some((cut, _)) => format!("{}…", &shown[..cut]),
        None => shown.to_string(),
    }
}

/// Reads `wing test`'s JSON: `{"results": {"<entrypoint>": {"<test>": {"pass", "error", "traces"}}}}`.
fn parse_wing_results(text: &str, entrypoint: &str) -> Vec<WingTest> {
    let Ok(json) = serde_json::from_str::<serde_json::Value>(text) else { return vec![] };
    let Some(results) = json.get("results").and_then(|r| r.as_object()) else { return vec![] };
    let tests = results.get(entrypoint).or_else(|| results.values().next()).and_then(|t| t.as_object());
    let Some(tests) = tests else { return vec![] };
    tests
        .iter()
        .map(|(name, result)| WingTest {
            name: test_name(name),
            pass: result.get("pass").and_then(|p| p.as_bool()).unwrap_or(false),
            error: result.get("error").and_then(|e| e.as_str()).map(str::to_string),
            traces: result
                .get("traces")
                .and_then(|t| t.as_array())
                .map(|traces| {
                    traces
                        .iter()
                        .map(|trace| {
                            let at = trace.get("timestamp").and_then(|t| t.as_str()).unwrap_or("");
                            let message = trace.pointer("/data/message").and_then(|m| m.as_str()).unwrap_or("");
                            let source = trace.get("sourcePath").and_then(|s| s.as_str()).unwrap_or("");
                            format!("{at} {source} {message}").trim().to_string()
                        })
                        .collect()
                })
                .unwrap_or_default(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wing_results_give_one_result_per_test_with_its_traces() {
        let text = r#"{"duration":1308,"results":{"main.w":{
            "hello answers":{"path":"root/Default/test:hello answers","pass":true,
               "traces":[{"data":{"message":"GET /hello - 200."},"sourcePath":"root/Default/Api","timestamp":"2026-11-24T21:37:14.021Z"}]},
            "broken":{"pass":false,"error":"expected 5 to equal 4","traces":[]}}}}"#;
        let tests = parse_wing_results(text, "main.w");
        assert_eq!(tests.len(), 2);
        let hello = tests.iter().find(|t| t.name == "hello answers").expect("hello");
        assert!(hello.pass);
        assert_eq!(hello.traces, ["2026-11-24T21:37:14.021Z root/Default/Api GET /hello - 200."]);
        let broken = tests.iter().find(|t| t.name == "broken").expect("broken");
        assert!(!broken.pass);
        assert_eq!(broken.error.as_deref(), Some("expected 5 to equal 4"));
        assert!(parse_wing_results("not json", "main.w").is_empty());
        // Names are the app's to write: a NUL, other control characters, blanks and lengths
        // beyond a table cell are made fit to show and store.
        let hostile = format!(
            r#"{{"results":{{"main.w":{{"nul\u0000name":{{"pass":true}},"  ":{{"pass":true}},"{}":{{"pass":true}}}}}}}}"#,
            "x".repeat(500)
        );
        let mut names: Vec<String> = parse_wing_results(&hostile, "main.w").into_iter().map(|t| t.name).collect();
        names.sort();
        assert_eq!(names, ["(unnamed test)".to_string(), "nul\u{FFFD}name".to_string(), format!("{}…", "x".repeat(200))]);
        assert!(parse_wing_results("{}", "main.w").is_empty());
    }
}
