//! `understudy tier …`: tiers, promotion and rollback from the command line, for operators and
//! scripts. The same commands and the same [`Promoter`] as the GraphQL mutations.

use std::collections::BTreeMap;

use anyhow::Context as _;
use chrono::Utc;
use clap::Subcommand;
use understudy_adapters::promoter::Promoter;
use understudy_adapters::EventStore;
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_domain::project::ProjectCommand;
use understudy_domain::tier::{ScheduledJob, TierSource, TierSpec};
use understudy_domain::values::{BranchPattern, CommitSha, TierName};
use understudy_domain::Metadata;
use uuid::Uuid;

/// Who the log names for these commands.
const ACTOR: &str = "system:cli";

#[derive(Subcommand)]
pub enum TierCommand {
    /// List a project's tiers: where their commits come from, their variables, any freeze.
    List {
        #[arg(long)]
        project: Uuid,
    },
    /// Declare a tier or change one: fed by pushes to `--branches PATTERN` (`*` for any
    /// characters), or by promotion `--from TIER` (automatic unless `--manual`).
    Set {
        #[arg(long)]
        project: Uuid,
        name: String,
        #[arg(long, conflicts_with_all = ["from", "tags"])]
        branches: Option<String>,
        /// Fed by new tags the pattern names (`v*`: releases), at the tagged commit.
        #[arg(long, conflicts_with = "from")]
        tags: Option<String>,
        #[arg(long, required_unless_present_any = ["branches", "tags"])]
        from: Option<String>,
        /// Promote only when someone runs `understudy tier promote` (or the `promote` mutation).
        #[arg(long, requires = "from")]
        manual: bool,
        /// `NAME=value`, given to the tier's environments; repeat for more.
        #[arg(long = "env", value_name = "NAME=VALUE")]
        env: Vec<String>,
        /// A smoke test run against each new deployment after its tests (a shell line; it
        /// reaches the app at $UNDERSTUDY_TARGET_URL and keeps files in $UNDERSTUDY_ARTIFACTS).
        #[arg(long)]
        smoke: Option<String>,
        /// Push each commit that passed here (tests and smoke test) to this branch.
        #[arg(long)]
        push_to: Option<String>,
        /// A scheduled job, `NAME|SCHEDULE|COMMAND` (cron, UTC: `nightly|0 3 * * *|node cleanup.js`);
        /// repeat for more. Without any, the tier keeps the jobs it has.
        #[arg(long = "job", value_name = "NAME|SCHEDULE|COMMAND")]
        jobs: Vec<String>,
    },
    /// Remove a tier; its environments stay until their branches go.
    Rm {
        #[arg(long)]
        project: Uuid,
        name: String,
    },
    /// A code freeze: no automatic deploys or promotions into the tier until it is unfrozen.
    Freeze {
        #[arg(long)]
        project: Uuid,
        name: String,
        #[arg(long)]
        reason: String,
    },
    Unfreeze {
        #[arg(long)]
        project: Uuid,
        name: String,
    },
    /// Promote into a tier the newest commit that passed in the tier it is promoted from, or
    /// `--commit`.
    Promote {
        #[arg(long)]
        project: Uuid,
        name: String,
        #[arg(long)]
        commit: Option<String>,
    },
    /// Deploy again the commit of an earlier deployment of an environment that was Ready.
    Rollback {
        #[arg(long)]
        environment: Uuid,
        #[arg(long)]
        to: Uuid,
    },
}

pub async fn run(store: &EventStore, what: TierCommand, out: &mut impl std::io::Write) -> anyhow::Result<()> {
    let meta = Metadata::new(Uuid::new_v4(), ACTOR);
    let project_of = |id: Uuid| async move {
        let state = store.projects.load(id).await?.into_inner();
        anyhow::ensure!(state.id.is_some(), "no project {id}");
        Ok::<_, anyhow::Error>(state)
    };
    match what {
        TierCommand::List { project } => {
            let state = project_of(project).await?;
            if state.tiers.is_empty() {
                writeln!(
                    out,
                    "no tiers: pushes to the production branch ({}) deploy it",
                    state.production_branch.map(|b| b.to_string()).unwrap_or_default()
                )?;
            }
            for tier in state.tiers.values() {
                let source = match &tier.spec.source {
                    TierSource::Branches { pattern } => format!("branches {pattern}"),
                    TierSource::Tags { pattern } => format!("tags {pattern}"),
                    TierSource::Promotion { from, automatic: true } => format!("promoted from {from}, automatically"),
                    TierSource::Promotion { from, automatic: false } => format!("promoted from {from}, by hand"),
                };
                let mut vars: Vec<String> = tier.spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
                vars.extend(tier.spec.smoke.as_ref().map(|s| format!("smoke: {s}")));
                vars.extend(tier.spec.jobs.iter().map(|j| format!("job {}: {} {}", j.name, j.schedule, j.command)));
                let frozen =
                    tier.frozen.as_ref().map(|f| format!("  FROZEN by {} since {}: {}", f.by, f.at.format("%Y-%m-%d %H:%M UTC"), f.reason));
                writeln!(
                    out,
                    "{:<12} {source}{}{}",
                    tier.name().as_str(),
                    if vars.is_empty() { String::new() } else { format!("  [{}]", vars.join(" ")) },
                    frozen.unwrap_or_default()
                )?;
            }
        }
        TierCommand::Set { project, name, branches, tags, from, manual, env, smoke, push_to, jobs } => {
            let state = project_of(project).await?;
            let existing_jobs = if jobs.is_empty() {
                TierName::parse(name.as_str()).ok().and_then(|n| state.tiers.get(&n)).map(|t| t.spec.jobs.clone()).unwrap_or_default()
            } else {
                let mut parsed = Vec::new();
                for job in jobs {
                    let mut parts = job.splitn(3, '|');
                    let (Some(name), Some(schedule), Some(command)) = (parts.next(), parts.next(), parts.next()) else {
                        anyhow::bail!("--job {job:?}: expected NAME|SCHEDULE|COMMAND");
                    };
                    parsed.push(ScheduledJob {
                        name: name.trim().into(),
                        schedule: schedule.trim().into(),
                        command: command.trim().into(),
                    });
                }
                parsed
            };
            let source = match (branches, tags, from) {
                (Some(pattern), None, None) => TierSource::Branches { pattern: BranchPattern::parse(pattern)? },
                (None, Some(pattern), None) => TierSource::Tags { pattern: BranchPattern::parse(pattern)? },
                (None, None, Some(from)) => TierSource::Promotion { from: TierName::parse(from)?, automatic: !manual },
                _ => anyhow::bail!("give one of --branches, --tags or --from"),
            };
            let mut vars = BTreeMap::new();
            for pair in env {
                let (k, v) = pair.split_once('=').with_context(|| format!("--env {pair:?}: expected NAME=value"))?;
                vars.insert(k.to_string(), v.to_string());
            }
            let tier = TierSpec {
                name: TierName::parse(name)?,
                source,
                env: vars,
                smoke,
                jobs: existing_jobs,
                push_to: push_to.map(understudy_domain::values::BranchName::parse).transpose()?,
                from_file: false,
            };
            let done = store.projects.execute(project, ProjectCommand::SetTier { tier: tier.clone(), at: Utc::now() }, meta).await?;
            writeln!(out, "tier {} {}", tier.name, if done.events.is_empty() { "unchanged" } else { "set" })?;
        }
        TierCommand::Rm { project, name } => {
            store
                .projects
                .execute(project, ProjectCommand::RemoveTier { name: TierName::parse(name.as_str())?, at: Utc::now() }, meta)
                .await?;
            writeln!(out, "tier {name} removed")?;
        }
        TierCommand::Freeze { project, name, reason } => {
            let command =
                ProjectCommand::FreezeTier { name: TierName::parse(name.as_str())?, by: "operator".into(), reason, at: Utc::now() };
            store.projects.execute(project, command, meta).await?;
            writeln!(out, "tier {name} frozen")?;
        }
        TierCommand::Unfreeze { project, name } => {
            let command = ProjectCommand::UnfreezeTier { name: TierName::parse(name.as_str())?, by: "operator".into(), at: Utc::now() };
            store.projects.execute(project, command, meta).await?;
            writeln!(out, "tier {name} unfrozen")?;
        }
        TierCommand::Promote { project, name, commit } => {
            let promoter = Promoter { store: store.clone(), every: std::time::Duration::from_secs(1) };
            let commit = commit.map(CommitSha::parse).transpose()?;
            let promotion = promoter.promote(ProjectId(project), &TierName::parse(name)?, commit.as_ref(), "operator", &meta).await?;
            writeln!(
                out,
                "{} at {}: {} deployment(s) requested, {} environment(s)",
                promotion.tier,
                promotion.commit,
                promotion.requested,
                promotion.environments.len()
            )?;
        }
        TierCommand::Rollback { environment, to } => {
            let deployment_id = DeploymentId(Uuid::new_v4());
            let command = EnvironmentCommand::Rollback { deployment_id, to: DeploymentId(to), by: "operator".into(), at: Utc::now() };
            store.environments.execute(environment, command, meta).await?;
            writeln!(out, "deployment {deployment_id} requested: the commit of {to} again")?;
        }
    }
    Ok(())
}
