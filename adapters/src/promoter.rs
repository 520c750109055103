//! Promotion between tiers. A commit *passed* in a tier when, in every entrypoint's environment of
//! one branch of that tier (or of the tier itself, for a promoted tier), its deployment is Ready,
//! healthy, and every test reported and passed. Such a commit is deployed to the tiers promoted
//! from that tier: by the promoter on its own for tiers with automatic promotion, by a person's
//! `promote` otherwise.
//!
//! The promoter is level-triggered: each pass looks at what the log and the read model say now.
//! A deployment's id derives from the deployment it was promoted from, and a commit promoted once
//! is never promoted again on the promoter's own (a rollback stays rolled back), so a pass
//! repeated after a crash promotes nothing twice.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use understudy_domain::environment::{Deployment, EnvironmentCommand, EnvironmentSpec};
use understudy_domain::ids::{DeploymentId, EnvironmentId, ProjectId};
use understudy_domain::project::Project;
use understudy_domain::tier::{Tier, TierSource};
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, Target, TierName};
use understudy_domain::{DomainError, Metadata};
use uuid::Uuid;

use crate::{CommandError, EventStore};

/// Who the log names for automatic promotions.
pub const ACTOR: &str = "system:promoter";

pub struct Promoter {
    pub store: EventStore,
    /// How often to look (environment changes do not wake it: a promotion a second late is fine).
    pub every: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum PromoteError {
    #[error("project {0} does not exist")]
    NoProject(ProjectId),
    #[error("the project has no tier {0:?}")]
    NoTier(String),
    #[error("tier {0} is fed by pushes to its branches, not by promotion")]
    NotPromoted(String),
    #[error("tier {tier} is frozen by {by}: {reason}")]
    Frozen { tier: String, by: String, reason: String },
    /// No commit (or not the one asked for) passed in the source tier.
    #[error("{0}")]
    NothingPassed(String),
    #[error(transparent)]
    Command(#[from] CommandError),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

impl From<esrs::store::postgres::PgStoreError> for PromoteError {
    fn from(error: esrs::store::postgres::PgStoreError) -> Self {
        Self::Command(CommandError::from(error))
    }
}

/// A commit that passed in a tier: one deployment per entrypoint.
#[derive(Debug, Clone)]
pub struct Passed {
    pub commit: CommitSha,
    /// The branch it passed on (the tier's name for a promoted tier).
    pub on: String,
    pub deployments: Vec<(Entrypoint, EnvironmentId, DeploymentId)>,
    /// When the last of them passed: of several branches, the newest wins.
    pub at: DateTime<Utc>,
}

/// What one promotion did.
#[derive(Debug, Clone)]
pub struct Promotion {
    pub tier: TierName,
    pub commit: CommitSha,
    /// The promoted tier's environments and the deployment each got (or already had).
    pub environments: Vec<(EnvironmentId, DeploymentId)>,
    /// How many deployments were requested (0: the commit was there already).
    pub requested: usize,
}

/// The live (not Terminated, not Stale) environments of a tier: `(environment, branch, entrypoint)`.
/// A branch tier's are the branch environments whose branch the tier takes (not another tier
/// with a better matching pattern); a promoted tier's are its own.
pub async fn tier_environments(
    pool: &sqlx::PgPool,
    project_id: ProjectId,
    project: &Project,
    tier: &Tier,
) -> Result<Vec<(Uuid, String, String)>, sqlx::Error> {
    let (kind, branch) = match &tier.spec.source {
        TierSource::Branches { .. } => ("branch", None),
        TierSource::Promotion { .. } | TierSource::Tags { .. } => ("tier", Some(tier.name().as_str())),
    };
    let rows: Vec<(Uuid, String, String)> = sqlx::query_as(
        "SELECT environment_id, branch, entrypoint FROM environments
         WHERE project_id = $1 AND target_kind = $2 AND ($3::text IS NULL OR branch = $3) AND status NOT IN ('Terminated', 'Stale')
         ORDER BY branch, entrypoint",
    )
    .bind(project_id.0)
    .bind(kind)
    .bind(branch)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter(|(_, branch, _)| match &tier.spec.source {
            TierSource::Branches { .. } => BranchName::parse(branch.as_str())
                .ok()
                .and_then(|b| project.tier_of(&Target::Branch { branch: b }))
                .is_some_and(|t| t.name() == tier.name()),
            TierSource::Promotion { .. } | TierSource::Tags { .. } => true,
        })
        .collect())
}

impl Promoter {
    pub async fn run(self, cancel: CancellationToken) {
        crate::worker::every("promotion pass", self.every, cancel, || self.pass()).await
    }

    /// One pass over every active project with a tier promoted into automatically; returns how
    /// many deployments it requested.
    pub async fn pass(&self) -> anyhow::Result<usize> {
        let projects: Vec<Uuid> = sqlx::query_scalar(
            "SELECT project_id FROM projects
             WHERE active AND jsonb_path_exists(tiers, '$.*.spec.source ? (@.kind == \"promotion\" && @.automatic == true)')",
        )
        .fetch_all(&self.store.pool)
        .await?;
        let mut requested = 0;
        for id in projects {
            let project = self.store.projects.load(id).await.map_err(CommandError::from)?.into_inner();
            for tier in project.tiers.values().filter(|t| t.promotes_automatically()) {
                let meta = Metadata::new(Uuid::new_v4(), ACTOR);
                match self.promote_into(ProjectId(id), &project, tier, None, ACTOR, true, &meta).await {
                    Ok(promotion) if promotion.requested > 0 => {
                        tracing::info!(project = %id, tier = %tier.name(), commit = %promotion.commit, "promoted");
                        requested += promotion.requested;
                    }
                    Ok(_) | Err(PromoteError::NothingPassed(_)) => {}
                    Err(error) => tracing::warn!(project = %id, tier = %tier.name(), %error, "promotion failed"),
                }
            }
        }
        Ok(requested)
    }

    /// A person promotes into `tier` the newest commit that passed in the tier it is promoted
    /// from, or `commit` when given (it must have passed there). A frozen tier refuses.
    pub async fn promote(
        &self,
        project_id: ProjectId,
        tier: &TierName,
        commit: Option<&CommitSha>,
        by: &str,
        meta: &Metadata,
    ) -> Result<Promotion, PromoteError> {
        let project = self.store.projects.load(project_id.0).await?.into_inner();
        if project.id.is_none() {
            return Err(PromoteError::NoProject(project_id));
        }
        let into = project.tiers.get(tier).ok_or_else(|| PromoteError::NoTier(tier.to_string()))?;
        self.promote_into(project_id, &project, into, commit, by, false, meta).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn promote_into(
        &self,
        project_id: ProjectId,
        project: &Project,
        into: &Tier,
        commit: Option<&CommitSha>,
        by: &str,
        automatic: bool,
        meta: &Metadata,
    ) -> Result<Promotion, PromoteError> {
        let name = into.name();
        let from = into.promoted_from().ok_or_else(|| PromoteError::NotPromoted(name.to_string()))?;
        if let Some(freeze) = &into.frozen {
            return Err(PromoteError::Frozen { tier: name.to_string(), by: freeze.by.clone(), reason: freeze.reason.clone() });
        }
        let source = project.tiers.get(from).ok_or_else(|| PromoteError::NoTier(from.to_string()))?;
        let Some(passed) = self.passed(project_id, project, source, commit).await? else {
            return Err(PromoteError::NothingPassed(match commit {
                Some(commit) => format!("commit {commit} has not passed in {from} (Ready, healthy, every test passed)"),
                None => format!("no commit has passed in {from} yet (Ready, healthy, every test passed)"),
            }));
        };
        let target = Target::Tier { tier: name.clone() };
        let mut promotion = Promotion { tier: name.clone(), commit: passed.commit.clone(), environments: vec![], requested: 0 };
        for (entrypoint, from_environment, from_deployment) in &passed.deployments {
            let environment_id = EnvironmentId::derive(project_id, &target, entrypoint);
            let state = self.store.environments.load(environment_id.0).await?.into_inner();
            let earlier = state.deployments.iter().filter(|d| d.promoted_from == Some(*from_deployment)).count();
            if automatic && earlier > 0 {
                // Promoted once already: a rollback since then stays rolled back.
                continue;
            }
            let deployment_id = DeploymentId(Uuid::new_v5(&environment_id.0, format!("promote:{from_deployment}#{earlier}").as_bytes()));
            let command = EnvironmentCommand::Promote {
                environment_id,
                spec: EnvironmentSpec { project_id, target: target.clone(), entrypoint: entrypoint.clone() },
                deployment_id,
                commit: passed.commit.clone(),
                from_environment: *from_environment,
                from_deployment: *from_deployment,
                by: by.to_string(),
                at: Utc::now(),
            };
            match self.store.environments.execute(environment_id.0, command, meta.clone()).await {
                Ok(done) => {
                    promotion.requested += usize::from(!done.events.is_empty());
                    promotion.environments.push((environment_id, done.state.current().map(|d| d.id).unwrap_or(deployment_id)));
                }
                // Another promoter (a second scheduler) promoted it a moment ago.
                Err(CommandError::Domain(DomainError::AlreadyExists { entity: "deployment", .. })) => {
                    promotion.environments.push((environment_id, deployment_id));
                }
                Err(error) => return Err(error.into()),
            }
        }
        Ok(promotion)
    }

    /// The newest commit that passed in `tier` (or `commit`, if it passed), over its branches.
    pub async fn passed(
        &self,
        project_id: ProjectId,
        project: &Project,
        tier: &Tier,
        commit: Option<&CommitSha>,
    ) -> Result<Option<Passed>, PromoteError> {
        // One group per branch of the tier: its environments, one per entrypoint.
        let mut groups: std::collections::BTreeMap<String, Vec<(Uuid, String)>> = Default::default();
        for (environment, branch, entrypoint) in tier_environments(&self.store.pool, project_id, project, tier).await? {
            groups.entry(branch).or_default().push((environment, entrypoint));
        }
        let mut best: Option<Passed> = None;
        'groups: for (on, environments) in groups {
            let mut group: Option<Passed> = None;
            for (environment, entrypoint) in environments {
                let state = self.store.environments.load(environment).await?.into_inner();
                let deployment: Option<&Deployment> = match (commit, &group) {
                    (Some(commit), _) => state.deployments.iter().rev().find(|d| d.commit == *commit && d.passed()),
                    (None, Some(so_far)) => state.current().filter(|d| d.commit == so_far.commit && d.passed()),
                    (None, None) => state.current().filter(|d| d.passed()),
                };
                let (Some(deployment), Ok(entrypoint)) = (deployment, Entrypoint::parse(entrypoint)) else {
                    continue 'groups;
                };
                let passed = group.get_or_insert_with(|| Passed {
                    commit: deployment.commit.clone(),
                    on: on.clone(),
                    deployments: vec![],
                    at: deployment.updated_at,
                });
                passed.at = passed.at.max(deployment.updated_at);
                passed.deployments.push((entrypoint, EnvironmentId(environment), deployment.id));
            }
            if let Some(group) = group {
                if best.as_ref().is_none_or(|b| group.at > b.at) {
                    best = Some(group);
                }
            }
        }
        Ok(best)
    }
}
