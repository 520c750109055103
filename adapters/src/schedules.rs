//! The job scheduler: each tier's scheduled jobs, run in each of the tier's Ready environments.
//!
//! Level-triggered like the promoter: each pass asks, per environment and job, for the latest
//! slot of the schedule since the last one dealt with. So a scheduler that was down catches up
//! with one run, not one per missed slot; a run id derives from the environment, job and slot, so
//! two schedulers at once ask once; and the environment refuses to start a run while the last
//! one is still going (the slot is recorded as skipped).

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use understudy_domain::environment::{EnvironmentCommand, EnvironmentEvent, EnvironmentStatus};
use understudy_domain::ids::ProjectId;
use understudy_domain::Metadata;
use uuid::Uuid;

use crate::{CommandError, EventStore};

/// Who the log names for scheduled runs.
pub const ACTOR: &str = "system:schedule";

pub struct JobScheduler {
    pub store: EventStore,
    pub every: Duration,
}

impl JobScheduler {
    pub async fn run(self, cancel: CancellationToken) {
        crate::worker::every("scheduled jobs pass", self.every, cancel, || self.pass(Utc::now())).await
    }

    /// One pass as of `now`: asks for every run that is due; returns how many it asked for.
    pub async fn pass(&self, now: DateTime<Utc>) -> anyhow::Result<usize> {
        let projects: Vec<Uuid> =
            sqlx::query_scalar("SELECT project_id FROM projects WHERE active AND jsonb_path_exists(tiers, '$.*.spec.jobs[*]')")
                .fetch_all(&self.store.pool)
                .await?;
        let mut requested = 0;
        for id in projects {
            let project = self.store.projects.load(id).await.map_err(CommandError::from)?.into_inner();
            for tier in project.tiers.values().filter(|t| !t.spec.jobs.is_empty()) {
                let environments = crate::promoter::tier_environments(&self.store.pool, ProjectId(id), &project, tier).await?;
                for (environment, ..) in environments {
                    let state = self.store.environments.load(environment).await.map_err(CommandError::from)?.into_inner();
                    if state.status() != Some(EnvironmentStatus::Ready) {
                        continue;
                    }
                    let Some(created) = state.deployments.first().map(|d| d.requested_at) else { continue };
                    for job in &tier.spec.jobs {
                        let after = state.jobs.get(&job.name).and_then(|j| j.last_slot).unwrap_or(created);
                        let Some(slot) = job.due(after, now) else { continue };
                        let run_id = Uuid::new_v5(&environment, format!("job:{}:{}", job.name, slot.to_rfc3339()).as_bytes());
                        let command = EnvironmentCommand::RequestJobRun { job: job.name.clone(), slot, run_id, at: now };
                        let meta = Metadata::new(Uuid::new_v4(), ACTOR);
                        match self.store.environments.execute(environment, command, meta).await {
                            Ok(done) => {
                                requested += done
                                    .events
                                    .iter()
                                    .filter(|e| matches!(e.payload.event, EnvironmentEvent::JobRunRequested { .. }))
                                    .count()
                            }
                            Err(error) => tracing::info!(%environment, job = %job.name, %error, "scheduled run not asked for"),
                        }
                    }
                }
            }
        }
        Ok(requested)
    }
}
