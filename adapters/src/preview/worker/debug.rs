//! Debug sessions: a fresh instance of a failed deployment, for whoever opened the session.
//!
//! A session is an event on the environment (`DebugSessionOpened`); the worker that claims it
//! (a lease in `debug_instances`, kept by the loop below) fetches and builds the deployment's
//! commit again in a work dir of its own, with everything the deployment had (secrets, its tier's
//! configuration, its add-on database; no seed), records the listing of its files, and, when the
//! build passes, starts the app without waiting for its health check: the tunnel reaches it
//! whatever state it is in. Its output goes to the deployment's `debug` log. The instance lives
//! until the session is closed or expires, or its environment goes; a worker that dies loses the
//! lease and the next claims the session again, with a fresh build.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::{describe, remove_dir, Job, Stop, Worker, SOCKET};

/// How many entries a listing keeps (breadth first: the top of the tree comes first).
pub const MAX_LISTED: usize = 5000;

impl Worker {
    /// Claims up to `limit` open debug sessions that no live worker holds.
    pub(super) async fn claim_debug(&self, limit: usize) -> sqlx::Result<Vec<(Job, Uuid)>> {
        type Row = (Uuid, Uuid, Uuid, Uuid, String, String);
        let candidates: Vec<Row> = sqlx::query_as(
            "SELECT e.environment_id, e.project_id, s.key::uuid, (s.value->>'deployment_id')::uuid, d->>'commit', e.entrypoint
             FROM environments e
             CROSS JOIN LATERAL jsonb_each(e.state->'debug_sessions') s
             CROSS JOIN LATERAL jsonb_array_elements(e.state->'deployments') d
             WHERE e.state ? 'debug_sessions' AND e.status <> 'Terminated'
               AND d->>'id' = s.value->>'deployment_id'
               AND (s.value->>'expires_at')::timestamptz > now()
               AND NOT EXISTS (SELECT 1 FROM debug_instances i
                               WHERE i.session_id = s.key::uuid AND (i.done OR i.expires_at > now()))
             LIMIT $1",
        )
        .bind(limit as i64)
        .fetch_all(self.pool())
        .await?;
        let mut claimed = Vec::new();
        for (environment, project, session, deployment, commit, entrypoint) in candidates {
            let won: Option<Uuid> = sqlx::query_scalar(
                "INSERT INTO debug_instances (session_id, environment_id, deployment_id, worker, expires_at)
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))
                 ON CONFLICT (session_id) DO UPDATE
                   SET worker = EXCLUDED.worker, expires_at = EXCLUDED.expires_at, socket = NULL, state = 'building',
                       updated_at = now()
                   WHERE NOT debug_instances.done AND debug_instances.expires_at <= now()
                 RETURNING session_id",
            )
            .bind(session)
            .bind(environment)
            .bind(deployment)
            .bind(&self.id)
            .bind(self.config.lease_ttl.as_secs_f64())
            .fetch_optional(self.pool())
            .await?;
            if won.is_some() {
                let job = Job::claimed(environment, deployment, project, commit, entrypoint, format!("debug-{}", session.simple()));
                claimed.push((job, session));
            }
        }
        Ok(claimed)
    }

    /// Runs one debug session's instance until the session ends or the worker stops.
    pub(super) async fn debug(self: Arc<Self>, job: Job, session: Uuid, stop: CancellationToken) {
        let span = tracing::info_span!("debug session", %session, deployment = %job.deployment);
        let _entered = span.enter();
        let ending = match self.run_debug(&job, session, &stop).await {
            Ok(()) => "ended",
            Err(Stop::Quiet(why)) => why,
            Err(Stop::User(_, reason) | Stop::Infra(reason)) => {
                tracing::warn!(%reason, "debug session instance stopped");
                self.logs
                    .stream(job.deployment.0, "debug", job.redactor.clone())
                    .line(format!("understudy: debug instance stopped: {reason}"));
                "failed"
            }
        };
        let (work_dir, _) = self.dirs(&job);
        if work_dir.exists() {
            let _ = remove_dir(&work_dir).await;
        }
        // A worker that stops hands the session back (another claims it at once); otherwise
        // the session is over.
        let handed_back = stop.is_cancelled();
        let _ = sqlx::query(
            "UPDATE debug_instances SET socket = NULL, updated_at = now(),
                 done = NOT $3, expires_at = CASE WHEN $3 THEN now() ELSE expires_at END,
                 state = CASE WHEN $3 THEN state ELSE $4 END
             WHERE session_id = $1 AND worker = $2",
        )
        .bind(session)
        .bind(&self.id)
        .bind(handed_back)
        .bind(ending)
        .execute(self.pool())
        .await;
    }

    async fn run_debug(&self, job: &Job, session: Uuid, stop: &CancellationToken) -> Result<(), Stop> {
        let state = self.store.environments.load(job.environment.0).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let project = self.store.projects.load(job.project).await.map_err(|e| Stop::Infra(e.to_string()))?.into_inner();
        let Some(repository) = project.repository.clone() else { return Err(Stop::Quiet("the project has no repository")) };
        let (equipped, _, _forward) = self.equip(job, &state, &project).await?;
        // The seed ran (or failed) with the deployment; a debug instance never seeds.
        let job = &Job { seed: None, ..equipped };
        let log = self.logs.stream(job.deployment.0, "debug", job.redactor.clone());
        log.line(format!(
            "understudy: debug session {session}: building {} at {} again on worker {}",
            job.entrypoint,
            &job.commit[..12.min(job.commit.len())],
            self.id
        ));
        let mut app = None;
        let (state, socket) = match self.prepare(job, &repository, project.git_url.as_deref(), &log, stop).await {
            Ok((plan, plan_env)) => {
                let spec = self.sandbox(job, "app", false, &plan_env);
                app = Some(self.spawn_app(&spec, &plan, &log)?);
                ("running".to_string(), Some(spec.run_dir.join(SOCKET)))
            }
            Err(Stop::User(_, reason)) => {
                log.line(format!("understudy: {reason}; the files are listed as the build left them"));
                (format!("build failed: {reason}"), None)
            }
            Err(other) => return Err(other),
        };
        self.instance(session, &state, socket.as_deref()).await?;
        self.list_files(job, session).await?;
        log.line(format!("understudy: debug instance {state}"));
        loop {
            tokio::select! {
                _ = stop.cancelled() => {
                    if let Some(app) = app.as_mut() {
                        app.kill().await;
                    }
                    return Err(Stop::Quiet("stopped"));
                }
                status = async { app.as_mut().expect("waited on only while running").child.wait().await }, if app.is_some() => {
                    let exited = match status {
                        Ok(status) => format!("the app exited with {}", describe(status)),
                        Err(error) => format!("the app could not be waited on: {error}"),
                    };
                    log.line(format!("understudy: {exited}; the files stay listed until the session ends"));
                    app = None;
                    self.instance(session, &exited, None::<&Path>).await?;
                    sqlx::query("UPDATE debug_instances SET socket = NULL WHERE session_id = $1").bind(session).execute(self.pool()).await?;
                }
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    if !self.debug_open(job, session).await? {
                        if let Some(app) = app.as_mut() {
                            app.kill().await;
                        }
                        log.line("understudy: debug session over; instance stopped");
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Whether the session is still open (and keeps this worker's hold on it).
    async fn debug_open(&self, job: &Job, session: Uuid) -> Result<bool, Stop> {
        let open: Option<Option<bool>> = sqlx::query_scalar(
            "SELECT e.status <> 'Terminated' AND (e.state->'debug_sessions'->$2->>'expires_at')::timestamptz > now()
             FROM environments e WHERE e.environment_id = $1",
        )
        .bind(job.environment.0)
        .bind(session.to_string())
        .fetch_optional(self.pool())
        .await?;
        let held = sqlx::query(
            "UPDATE debug_instances SET expires_at = now() + make_interval(secs => $3)
             WHERE session_id = $1 AND worker = $2 AND NOT done",
        )
        .bind(session)
        .bind(&self.id)
        .bind(self.config.lease_ttl.as_secs_f64())
        .execute(self.pool())
        .await?;
        if held.rows_affected() == 0 {
            return Err(Stop::Quiet("lost the debug session to another worker"));
        }
        Ok(open.flatten().unwrap_or(false))
    }

    /// Records what the instance reached, and its tunnel's socket when `socket` is given.
    async fn instance(&self, session: Uuid, state: &str, socket: Option<&Path>) -> Result<(), Stop> {
        sqlx::query(
            "UPDATE debug_instances SET state = $3, socket = COALESCE($4, socket), updated_at = now()
             WHERE session_id = $1 AND worker = $2",
        )
        .bind(session)
        .bind(&self.id)
        .bind(state)
        .bind(socket.map(|s| s.display().to_string()))
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Stores the listing of the instance's checkout (and what its build made there).
    async fn list_files(&self, job: &Job, session: Uuid) -> Result<(), Stop> {
        let (work_dir, _) = self.dirs(job);
        let root = work_dir.join("src");
        let (files, truncated) =
            tokio::task::spawn_blocking(move || listing(&root, MAX_LISTED)).await.map_err(|e| Stop::Infra(e.to_string()))?;
        sqlx::query("UPDATE debug_instances SET files = $3, files_truncated = $4 WHERE session_id = $1 AND worker = $2")
            .bind(session)
            .bind(&self.id)
            .bind(Value::Array(files))
            .bind(truncated)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}

/// The tree under `root`, breadth first, at most `max` entries: `{path, kind, size}` with paths
/// relative to `root` (as the app sees them under `/app`). Symbolic links are listed, never
/// followed. Whether entries were left out.
pub fn listing(root: &Path, max: usize) -> (Vec<Value>, bool) {
    let mut entries = Vec::new();
    let mut queue = std::collections::VecDeque::from([root.to_path_buf()]);
    while let Some(dir) = queue.pop_front() {
        let Ok(read) = std::fs::read_dir(&dir) else { continue };
        let mut children: Vec<_> = read.flatten().collect();
        children.sort_by_key(|entry| entry.file_name());
        for entry in children {
            if entries.len() >= max {
                return (entries, true);
            }
            let Ok(meta) = entry.path().symlink_metadata() else { continue };
            let path = entry.path();
            let relative = path.strip_prefix(root).unwrap_or(&path).to_string_lossy().into_owned();
            let kind = if meta.is_dir() {
                queue.push_back(path.clone());
                "dir"
            } else if meta.file_type().is_symlink() {
                "link"
            } else {
                "file"
            };
            entries.push(json!({ "path": relative, "kind": kind, "size": meta.len() }));
        }
    }
    (entries, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listings_go_breadth_first_never_follow_links_and_stop_at_the_cap() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(dir.path().join("a/deep")).expect("mkdir");
        std::fs::write(dir.path().join("z.txt"), "hello").expect("write");
        std::fs::write(dir.path().join("a/deep/x"), "").expect("write");
        std::os::unix::fs::symlink("/etc", dir.path().join("etc")).expect("link");
        let (files, truncated) = listing(dir.path(), 100);
        let paths: Vec<(&str, &str)> = files.iter().map(|f| (f["path"].as_str().unwrap_or(""), f["kind"].as_str().unwrap_or(""))).collect();
        assert_eq!(paths, [("a", "dir"), ("etc", "link"), ("z.txt", "file"), ("a/deep", "dir"), ("a/deep/x", "file")]);
        assert_eq!(files[2]["size"], 5);
        assert!(!truncated);
        let (files, truncated) = listing(dir.path(), 2);
        assert_eq!((files.len(), truncated), (2, true));
    }
}
