//! Tiers declared in the repository: `[tiers.NAME]` tables of `understudy.toml` on the production
//! branch. Each push to that branch brings the project's file-declared tiers in line with the
//! file: declared ones are set (a tier of the same name set through the API is taken over),
//! ones the file no longer declares are removed. Tiers set through the API and never declared
//! by the file are left alone. A file whose tiers do not hold together changes nothing here;
//! its builds fail with the line and the reason.

use understudy_domain::ids::ProjectId;
use understudy_domain::project::ProjectCommand;
use understudy_domain::tier::Tier;
use understudy_domain::Metadata;

use crate::preview::stack::configured_tiers;
use crate::{CommandError, EventStore};

/// Applies the production branch's repository file (`None`: there is none); how many tiers
/// changed.
pub async fn apply(store: &EventStore, project: ProjectId, file: Option<&str>, meta: &Metadata) -> Result<usize, CommandError> {
    let declared = match file.map(configured_tiers).transpose() {
        Ok(declared) => declared.flatten().unwrap_or_default(),
        Err(error) => {
            tracing::warn!(%project, %error, "the repository file's tiers are not applied");
            return Ok(0);
        }
    };
    let before = store.projects.load(project.0).await?.into_inner();
    let mut changed = 0;
    for spec in declared.iter().cloned() {
        let done = store.projects.execute(project.0, ProjectCommand::SetTier { tier: spec, at: chrono::Utc::now() }, meta.clone()).await?;
        changed += usize::from(!done.events.is_empty());
    }
    // What the file declared before and no longer does; tiers promoted from another go first.
    let mut stale: Vec<&Tier> =
        before.tiers.values().filter(|t| t.spec.from_file && !declared.iter().any(|d| d.name == t.spec.name)).collect();
    stale.sort_by_key(|t| t.promoted_from().is_none());
    for tier in stale {
        let command = ProjectCommand::RemoveTier { name: tier.name().clone(), at: chrono::Utc::now() };
        match store.projects.execute(project.0, command, meta.clone()).await {
            Ok(_) => changed += 1,
            Err(CommandError::Domain(error)) => tracing::warn!(%project, tier = %tier.name(), %error, "a tier the file dropped stays"),
            Err(error) => return Err(error),
        }
    }
    Ok(changed)
}
