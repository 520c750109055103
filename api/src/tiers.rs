//! GraphQL for tiers: declaring them (Manage Settings), freezing them, promoting into them and
//! rolling an environment back (Manage Projects). Each appends events; promotion goes through
//! the same [`Promoter`] the scheduler runs, so a person's promotion and an automatic one obey
//! one rule.

use std::collections::BTreeMap;

use async_graphql::{Context, ErrorExtensions, InputObject, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use understudy_adapters::promoter::{PromoteError, Promoter};
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_domain::permissions::Permission;
use understudy_domain::project::ProjectCommand;
use understudy_domain::tier::{TierSource, TierSpec};
use understudy_domain::values::{BranchPattern, CommitSha, TierName};
use understudy_domain::Metadata;
use uuid::Uuid;

use crate::accounts::{auth, bad_input, command_error, denied, require_project, viewer};
use crate::auth::{Denied, Viewer};
use crate::operations::{change, EnvironmentChange};

/// A tier as the API shows it.
#[derive(SimpleObject, Clone, Debug)]
pub struct Tier {
    pub name: String,
    /// The branches whose pushes deploy it (`main`, `dev-*`); null for a promoted tier.
    pub branches: Option<String>,
    /// The tags whose creation deploys it (`v*`: releases).
    pub tags: Option<String>,
    /// The tier whose passed commits are promoted into it; null for a tier fed by pushes.
    pub promoted_from: Option<String>,
    /// Whether passed commits are promoted into it without anyone asking.
    pub automatic: bool,
    /// Configuration its environments get as environment variables.
    pub env: Vec<TierVariable>,
    pub frozen: Option<TierFreeze>,
    /// Its smoke test, if it has one.
    pub smoke: Option<String>,
    /// Where commits that passed here are pushed.
    pub push_to: Option<String>,
    pub jobs: Vec<ScheduledJob>,
    /// Its rebuild triggers (their tokens are shown once, when created).
    pub triggers: Vec<TriggerInfo>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct TriggerInfo {
    pub id: Uuid,
    pub by: String,
    pub created_at: DateTime<Utc>,
}

/// A trigger just created: the only time its token is shown.
#[derive(SimpleObject, Clone, Debug)]
pub struct CreatedTrigger {
    pub id: Uuid,
    pub tier: String,
    /// Send it in `X-Trigger-Token` (or as `?token=`); it is not kept, only its hash.
    pub token: String,
    /// `POST` here to redeploy the tier (with an `Idempotency-Key` to make retries safe).
    pub url: String,
}

#[derive(SimpleObject, InputObject, Clone, Debug)]
#[graphql(input_name = "TierVariableInput")]
pub struct TierVariable {
    pub name: String,
    pub value: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct TierFreeze {
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

/// A tier to declare: exactly one of `branches`, `tags` and `promotedFrom`.
#[derive(InputObject, Clone, Debug)]
pub struct TierInput {
    pub name: String,
    pub branches: Option<String>,
    pub tags: Option<String>,
    pub promoted_from: Option<String>,
    /// For a promoted tier: promote passed commits without anyone asking (default true).
    #[graphql(default = true)]
    pub automatic: bool,
    #[graphql(default)]
    pub env: Vec<TierVariable>,
    /// A smoke test run against each new deployment after its tests (one shell line): it
    /// reaches the app at `$UNDERSTUDY_TARGET_URL`, keeps files in `$UNDERSTUDY_ARTIFACTS`, and
    /// holds the commit back from promotion when it fails.
    pub smoke: Option<String>,
    /// Scheduled jobs (replacing the tier's).
    #[graphql(default)]
    pub jobs: Vec<ScheduledJob>,
    /// Push each commit that passed here (tests and smoke test) to this branch.
    pub push_to: Option<String>,
}

/// A command run on a cron schedule (UTC; five fields, or six with seconds first) in each of
/// the tier's Ready environments, never two runs of one job at once, a missed run once.
#[derive(SimpleObject, InputObject, Clone, Debug)]
#[graphql(input_name = "ScheduledJobInput")]
pub struct ScheduledJob {
    pub name: String,
    pub schedule: String,
    pub command: String,
}

/// Where a project's notifications go.
#[derive(SimpleObject, Clone, Debug)]
pub struct NotificationTarget {
    pub id: Uuid,
    pub url: String,
    /// `failed`, `recovered`, `promoted`, `rolled_back`.
    pub events: Vec<String>,
    pub by: String,
    pub created_at: DateTime<Utc>,
}

/// A target just added: the only time its signing secret is shown.
#[derive(SimpleObject, Clone, Debug)]
pub struct CreatedNotificationTarget {
    pub target: NotificationTarget,
    /// Check `X-Understudy-Signature-256` (`sha256=` HMAC-SHA256 of the body) with it.
    pub secret: String,
}

/// One notification and how its delivery went.
#[derive(SimpleObject, Clone, Debug, sqlx::FromRow)]
pub struct NotificationDelivery {
    pub delivery_id: Uuid,
    pub target_id: Uuid,
    pub kind: String,
    /// `pending`, `delivered` or `failed` (given up).
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub delivered_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
}

/// A project's notification targets (View Settings, checked by the caller).
pub async fn notification_targets(ctx: &Context<'_>, project: Uuid) -> Result<Vec<NotificationTarget>> {
    let state = auth(ctx)?.store.projects.load(project).await?.into_inner();
    Ok(state.notifications.iter().map(|(id, t)| target_view(*id, t)).collect())
}

/// The project's latest notifications, newest first (View Settings, checked by the caller).
pub async fn notification_deliveries(ctx: &Context<'_>, project: Uuid, first: i32) -> Result<Vec<NotificationDelivery>> {
    Ok(sqlx::query_as(
        "SELECT delivery_id, target_id, kind, state, attempts, last_error, delivered_at, created_at
         FROM notification_deliveries WHERE project_id = $1 ORDER BY created_at DESC, delivery_id LIMIT $2",
    )
    .bind(project)
    .bind(i64::from(first.clamp(1, 500)))
    .fetch_all(&auth(ctx)?.store.pool)
    .await?)
}

fn target_view(id: Uuid, target: &understudy_domain::project::NotificationTarget) -> NotificationTarget {
    NotificationTarget {
        id,
        url: target.url.clone(),
        events: target.events.iter().map(|k| k.as_str().to_string()).collect(),
        by: target.by.clone(),
        created_at: target.created_at,
    }
}

/// What a promotion did.
#[derive(SimpleObject, Clone, Debug)]
pub struct Promotion {
    pub tier: String,
    pub commit: String,
    /// How many deployments it asked for (0: the commit was there already).
    pub requested: i32,
    /// The promoted tier's environments, one per entrypoint.
    pub environments: Vec<EnvironmentChange>,
}

impl Tier {
    /// The tier as `project` has it, with its triggers.
    fn of(project: &understudy_domain::project::Project, tier: &understudy_domain::tier::Tier) -> Self {
        let mut view = Self::from(tier);
        view.triggers = project
            .triggers
            .iter()
            .filter(|(_, t)| t.tier == *tier.name())
            .map(|(id, t)| TriggerInfo { id: *id, by: t.by.clone(), created_at: t.created_at })
            .collect();
        view
    }
}

impl From<&understudy_domain::tier::Tier> for Tier {
    fn from(tier: &understudy_domain::tier::Tier) -> Self {
        let (branches, tags, promoted_from, automatic) = match &tier.spec.source {
            TierSource::Branches { pattern } => (Some(pattern.to_string()), None, None, false),
            TierSource::Tags { pattern } => (None, Some(pattern.to_string()), None, false),
            TierSource::Promotion { from, automatic } => (None, None, Some(from.to_string()), *automatic),
        };
        Self {
            name: tier.name().to_string(),
            branches,
            tags,
            promoted_from,
            automatic,
            env: tier.spec.env.iter().map(|(name, value)| TierVariable { name: name.clone(), value: value.clone() }).collect(),
            frozen: tier.frozen.as_ref().map(|f| TierFreeze { by: f.by.clone(), reason: f.reason.clone(), at: f.at }),
            smoke: tier.spec.smoke.clone(),
            push_to: tier.spec.push_to.as_ref().map(|b| b.to_string()),
            jobs: tier
                .spec
                .jobs
                .iter()
                .map(|j| ScheduledJob { name: j.name.clone(), schedule: j.schedule.clone(), command: j.command.clone() })
                .collect(),
            triggers: vec![],
        }
    }
}

impl TierInput {
    fn into_spec(self) -> Result<TierSpec> {
        let name = TierName::parse(self.name).map_err(|e| bad_input(e.to_string()))?;
        let source = match (self.branches, self.promoted_from, self.tags) {
            (Some(pattern), None, None) => {
                TierSource::Branches { pattern: BranchPattern::parse(pattern).map_err(|e| bad_input(e.to_string()))? }
            }
            (None, None, Some(pattern)) => {
                TierSource::Tags { pattern: BranchPattern::parse(pattern).map_err(|e| bad_input(e.to_string()))? }
            }
            (None, Some(from), None) => {
                TierSource::Promotion { from: TierName::parse(from).map_err(|e| bad_input(e.to_string()))?, automatic: self.automatic }
            }
            _ => return Err(bad_input("a tier is fed by one of `branches`, `tags` or promotion (`promotedFrom`)")),
        };
        let mut env = BTreeMap::new();
        for variable in self.env {
            if env.insert(variable.name.clone(), variable.value).is_some() {
                return Err(bad_input(format!("variable {} is set twice", variable.name)));
            }
        }
        let jobs = self
            .jobs
            .into_iter()
            .map(|j| understudy_domain::tier::ScheduledJob { name: j.name, schedule: j.schedule, command: j.command })
            .collect();
        let push_to = self
            .push_to
            .filter(|b| !b.trim().is_empty())
            .map(understudy_domain::values::BranchName::parse)
            .transpose()
            .map_err(|e| bad_input(e.to_string()))?;
        Ok(TierSpec { name, source, env, smoke: self.smoke.filter(|s| !s.trim().is_empty()), jobs, push_to, from_file: false })
    }
}

/// The project's tiers, from the index (View Projects, checked by the caller).
pub async fn tiers_of(ctx: &Context<'_>, project: Uuid) -> Result<Vec<Tier>> {
    let state = auth(ctx)?.store.projects.load(project).await?.into_inner();
    Ok(state.tiers.values().map(|tier| Tier::of(&state, tier)).collect())
}

/// How events name a person: their login, or `operator` on an open node.
fn who(viewer: &Viewer) -> String {
    match viewer {
        Viewer::User { login, .. } => login.clone(),
        Viewer::Operator => "operator".into(),
        Viewer::Anonymous => "anonymous".into(),
    }
}

fn tier_name(name: String) -> Result<TierName> {
    TierName::parse(name).map_err(|e| bad_input(e.to_string()))
}

fn promote_error(error: PromoteError) -> async_graphql::Error {
    let code = match error {
        PromoteError::Command(error) => return command_error(error),
        PromoteError::NoProject(_) | PromoteError::NoTier(_) => "NOT_FOUND",
        PromoteError::Frozen { .. } => "FROZEN",
        PromoteError::NotPromoted(_) | PromoteError::NothingPassed(_) => "BAD_USER_INPUT",
        PromoteError::Db(_) => "INTERNAL",
    };
    async_graphql::Error::new(error.to_string()).extend_with(|_, e| e.set("code", code))
}

#[derive(Default)]
pub struct TiersMutation;

#[Object]
impl TiersMutation {
    /// Declares a tier or changes one (Manage Settings). A tier fed by `branches` deploys every
    /// push to a branch the pattern names; a tier with `promotedFrom` gets the commits that passed
    /// there (Ready, healthy, every test passed), by itself when `automatic`.
    async fn set_tier(&self, ctx: &Context<'_>, project_id: Uuid, tier: TierInput) -> Result<Tier> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        let spec = tier.into_spec()?;
        let name = spec.name.clone();
        let command = ProjectCommand::SetTier { tier: spec, at: Utc::now() };
        let done = execute_project(ctx, project_id, command).await?;
        done.tiers.get(&name).map(|tier| Tier::of(&done, tier)).ok_or_else(|| bad_input("the tier was not kept"))
    }

    /// Removes a tier (Manage Settings); its environments stay until their branches go.
    async fn remove_tier(&self, ctx: &Context<'_>, project_id: Uuid, name: String) -> Result<bool> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        execute_project(ctx, project_id, ProjectCommand::RemoveTier { name: tier_name(name)?, at: Utc::now() }).await?;
        Ok(true)
    }

    /// A code freeze (Manage Projects): no automatic deploys or promotions into the tier, and
    /// no promotions by anyone, until it is unfrozen. Rollbacks stay possible.
    async fn freeze_tier(&self, ctx: &Context<'_>, project_id: Uuid, name: String, reason: String) -> Result<Tier> {
        require_project(ctx, project_id, Permission::ManageProjects).await?;
        let name = tier_name(name)?;
        let command = ProjectCommand::FreezeTier { name: name.clone(), by: who(&viewer(ctx)), reason, at: Utc::now() };
        let done = execute_project(ctx, project_id, command).await?;
        done.tiers.get(&name).map(|tier| Tier::of(&done, tier)).ok_or_else(|| bad_input("no such tier"))
    }

    async fn unfreeze_tier(&self, ctx: &Context<'_>, project_id: Uuid, name: String) -> Result<Tier> {
        require_project(ctx, project_id, Permission::ManageProjects).await?;
        let name = tier_name(name)?;
        let command = ProjectCommand::UnfreezeTier { name: name.clone(), by: who(&viewer(ctx)), at: Utc::now() };
        let done = execute_project(ctx, project_id, command).await?;
        done.tiers.get(&name).map(|tier| Tier::of(&done, tier)).ok_or_else(|| bad_input("no such tier"))
    }

    /// Promotes into `tier` the newest commit that passed in the tier it is promoted from, or
    /// `commit` (Manage Projects). The tier's running deployment serves until the new one is
    /// Ready. Recorded with who promoted.
    async fn promote(&self, ctx: &Context<'_>, project_id: Uuid, tier: String, commit: Option<String>) -> Result<Promotion> {
        require_project(ctx, project_id, Permission::ManageProjects).await?;
        let tier = tier_name(tier)?;
        let commit = commit.map(CommitSha::parse).transpose().map_err(|e| bad_input(e.to_string()))?;
        let auth = auth(ctx)?;
        let promoter = Promoter { store: auth.store.clone(), every: std::time::Duration::from_secs(1) };
        let viewer = viewer(ctx);
        let meta = Metadata::new(Uuid::new_v4(), viewer.actor());
        let promotion =
            promoter.promote(ProjectId(project_id), &tier, commit.as_ref(), &who(&viewer), &meta).await.map_err(promote_error)?;
        let mut environments = Vec::new();
        for (environment, deployment) in &promotion.environments {
            let state = auth.store.environments.load(environment.0).await?.into_inner();
            environments.push(change(environment.0, &state, Some(*deployment)));
        }
        Ok(Promotion {
            tier: promotion.tier.to_string(),
            commit: promotion.commit.to_string(),
            requested: promotion.requested as i32,
            environments,
        })
    }

    /// A rebuild trigger for a tier (Manage Settings): whoever holds its token may redeploy the
    /// tier's environments at their current commits with `POST /hooks/{project}/{tier}/rebuild`.
    async fn create_trigger(&self, ctx: &Context<'_>, project_id: Uuid, tier: String) -> Result<CreatedTrigger> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        let tier = tier_name(tier)?;
        let token = crate::triggers::new_token();
        let id = Uuid::new_v4();
        let command = ProjectCommand::CreateTrigger {
            trigger_id: id,
            tier: tier.clone(),
            token_sha256: crate::auth::hash_token(&token),
            by: who(&viewer(ctx)),
            at: Utc::now(),
        };
        execute_project(ctx, project_id, command).await?;
        let url = format!("{}/hooks/{project_id}/{tier}/rebuild", auth(ctx)?.public_url.trim_end_matches('/'));
        Ok(CreatedTrigger { id, tier: tier.to_string(), token, url })
    }

    /// Sends news of the project's long-lived environments to `url` (Manage Settings): JSON
    /// POSTs, signed, retried; or, for `mailto:` and one address, emails through the
    /// installation's SMTP server. `events` picks kinds (`failed`, `recovered`, `promoted`,
    /// `rolled_back`); all when empty.
    async fn add_notification_target(
        &self,
        ctx: &Context<'_>,
        project_id: Uuid,
        url: String,
        #[graphql(default)] events: Vec<String>,
    ) -> Result<CreatedNotificationTarget> {
        use understudy_domain::project::NotificationKind;
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        let events =
            events.iter().map(|e| NotificationKind::parse(e)).collect::<Result<Vec<_>, _>>().map_err(|e| bad_input(e.to_string()))?;
        let auth = auth(ctx)?;
        let key = auth
            .key
            .as_ref()
            .ok_or_else(|| bad_input("this node has no secret key to seal the signing secret with (UNDERSTUDY_SECRET_KEY)"))?;
        let id = Uuid::new_v4();
        let secret = format!("whsec_{}", crate::auth::new_api_token().trim_start_matches(crate::auth::API_TOKEN_PREFIX));
        let sealed = key
            .seal(ProjectId(project_id), &understudy_adapters::notify::secret_name(id), &secret)
            .map_err(|e| bad_input(e.to_string()))?;
        let command =
            ProjectCommand::AddNotificationTarget { target_id: id, url, secret: sealed, events, by: who(&viewer(ctx)), at: Utc::now() };
        let done = execute_project(ctx, project_id, command).await?;
        let target = done.notifications.get(&id).map(|t| target_view(id, t)).ok_or_else(|| bad_input("the target was not kept"))?;
        Ok(CreatedNotificationTarget { target, secret })
    }

    async fn remove_notification_target(&self, ctx: &Context<'_>, project_id: Uuid, id: Uuid) -> Result<bool> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        execute_project(ctx, project_id, ProjectCommand::RemoveNotificationTarget { target_id: id, at: Utc::now() }).await?;
        Ok(true)
    }

    /// The database add-on (Manage Settings): every environment of the project gets a Postgres
    /// database of its own as `$DATABASE_URL`, seeded once by `seed` when given, dropped when
    /// the environment is terminated. `enabled: false` stops creating them.
    async fn set_database_addon(&self, ctx: &Context<'_>, project_id: Uuid, enabled: bool, seed: Option<String>) -> Result<bool> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        let database = enabled.then(|| understudy_domain::project::DatabaseAddon { seed: seed.filter(|s| !s.trim().is_empty()) });
        execute_project(ctx, project_id, ProjectCommand::SetDatabaseAddon { database, at: Utc::now() }).await?;
        Ok(enabled)
    }

    async fn revoke_trigger(&self, ctx: &Context<'_>, project_id: Uuid, id: Uuid) -> Result<bool> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        execute_project(ctx, project_id, ProjectCommand::RevokeTrigger { trigger_id: id, at: Utc::now() }).await?;
        Ok(true)
    }

    /// Deploys again the commit of an earlier deployment of this environment that was Ready
    /// (Manage Projects), in one step; the running one serves until it is Ready.
    async fn rollback(&self, ctx: &Context<'_>, environment_id: Uuid, deployment_id: Uuid) -> Result<EnvironmentChange> {
        let auth = auth(ctx)?;
        let state = auth.store.environments.load(environment_id).await?.into_inner();
        let not_found = || denied(Denied::NotFound(format!("no environment {environment_id} that you can see")));
        let project = state.spec.as_ref().ok_or_else(not_found)?.project_id;
        match auth.require_project(&viewer(ctx), project, Permission::ManageProjects).await {
            Ok(()) => {}
            Err(Denied::NotFound(_)) => return Err(not_found()),
            Err(other) => return Err(denied(other)),
        }
        let viewer = viewer(ctx);
        let new = DeploymentId(Uuid::new_v4());
        let command =
            EnvironmentCommand::Rollback { deployment_id: new, to: DeploymentId(deployment_id), by: who(&viewer), at: Utc::now() };
        let meta = Metadata::new(Uuid::new_v4(), viewer.actor());
        let done = auth.store.environments.execute(environment_id, command, meta).await.map_err(command_error)?;
        Ok(change(environment_id, &done.state, Some(new)))
    }
}

async fn execute_project(ctx: &Context<'_>, project_id: Uuid, command: ProjectCommand) -> Result<understudy_domain::project::Project> {
    let meta = Metadata::new(Uuid::new_v4(), viewer(ctx).actor());
    let done = auth(ctx)?.store.projects.execute(project_id, command, meta).await.map_err(command_error)?;
    Ok(done.state)
}
