//! The stale sweep: environments with neither a commit nor a visit for the idle period are
//! deactivated (their preview stops; the PR comment says Stale). The next commit or visit wakes
//! them. Branch environments (the production branch and promotion tiers) are never swept: the
//! production branch always has an environment.

use std::time::Duration;

use chrono::Utc;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::Metadata;
use uuid::Uuid;

use crate::EventStore;

pub struct Sweeper {
    pub store: EventStore,
    /// Idle longer than this: deactivate (10 days unless configured).
    pub idle: Duration,
    /// How often to look.
    pub every: Duration,
}

impl Sweeper {
    fn pool(&self) -> &PgPool {
        &self.store.pool
    }

    /// One pass: deactivates every idle environment; returns how many.
    pub async fn sweep_once(&self) -> anyhow::Result<usize> {
        let idle: Vec<Uuid> = sqlx::query_scalar(
            "SELECT e.environment_id FROM environments e LEFT JOIN preview_visits v USING (environment_id)
             WHERE e.target_kind = 'pull_request' AND e.status IN ('Ready', 'Failed')
               AND e.updated_at < now() - make_interval(secs => $1)
               AND coalesce(v.visited_at, '-infinity') < now() - make_interval(secs => $1)
             ORDER BY e.updated_at LIMIT 500",
        )
        .bind(self.idle.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        let meta = Metadata::new(Uuid::new_v4(), "system:stale-sweep");
        let mut deactivated = 0;
        for environment in idle {
            match self.store.environments.execute(environment, EnvironmentCommand::Deactivate { at: Utc::now() }, meta.clone()).await {
                Ok(done) if !done.events.is_empty() => deactivated += 1,
                Ok(_) => {}
                // It moved on since the read (a commit arrived): nothing to do.
                Err(error) => tracing::debug!(%environment, %error, "not deactivated"),
            }
        }
        if deactivated > 0 {
            tracing::info!(deactivated, "stale sweep");
        }
        Ok(deactivated)
    }

    pub async fn run(self, cancel: CancellationToken) {
        crate::worker::every("stale sweep", self.every, cancel, || self.sweep_once()).await
    }
}

/// Closes the debug sessions that expired, or whose environment was terminated (their
/// instances stop once the session is closed); returns how many.
pub async fn close_ended_debug_sessions(store: &EventStore) -> anyhow::Result<usize> {
    let ended: Vec<(Uuid, Uuid, bool)> = sqlx::query_as(
        "SELECT e.environment_id, s.key::uuid, e.status = 'Terminated'
         FROM environments e CROSS JOIN LATERAL jsonb_each(e.state->'debug_sessions') s
         WHERE e.state ? 'debug_sessions'
           AND (e.status = 'Terminated' OR (s.value->>'expires_at')::timestamptz <= now())
         LIMIT 500",
    )
    .fetch_all(&store.pool)
    .await?;
    let meta = Metadata::new(Uuid::new_v4(), "system:debug-sessions");
    let mut closed = 0;
    for (environment, session_id, terminated) in ended {
        let reason = if terminated { "its environment was terminated" } else { "expired" }.to_string();
        let command = EnvironmentCommand::CloseDebugSession { session_id, reason, by: "system:debug-sessions".into(), at: Utc::now() };
        match store.environments.execute(environment, command, meta.clone()).await {
            Ok(done) => closed += done.events.len(),
            Err(error) => tracing::debug!(%environment, %error, "debug session not closed"),
        }
    }
    Ok(closed)
}
