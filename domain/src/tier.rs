//! Tiers: a project's long-lived environments (`dev`, `staging`, `production`). A tier is fed
//! either by pushes to the branches its pattern names (one environment per branch and entrypoint)
//! or by promotion of commits that passed another tier (one environment per entrypoint). Tiers
//! belong to the Project aggregate; the commands and events are [`crate::project`]'s.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::values::{BranchName, BranchPattern, TierName};
use crate::DomainError;

/// How many tiers one project may declare.
pub const MAX_TIERS: usize = 20;
/// How many configuration variables one tier may set.
pub const MAX_TIER_VARS: usize = 100;

/// Where a tier's commits come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TierSource {
    /// Every push to a branch the pattern names deploys that branch's environments.
    Branches { pattern: BranchPattern },
    /// A new tag the pattern names (`v*`: a release) deploys its commit to the tier's
    /// environments (one per entrypoint, whatever the tag).
    Tags { pattern: BranchPattern },
    /// Commits whose deployments in tier `from` are Ready with every test passed are promoted
    /// here: by the promoter when `automatic`, otherwise by someone's `promote`.
    Promotion { from: TierName, automatic: bool },
}

/// A tier as declared (through the API, the CLI or the repository file).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierSpec {
    pub name: TierName,
    pub source: TierSource,
    /// Plain configuration its environments get as environment variables (`CACHE=off` in dev).
    /// Never secrets: those are sealed, per project.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// A smoke test: a shell line run, after the tests, against each new deployment of the tier
    /// (at `$UNDERSTUDY_TARGET_URL`, from a sandbox that only reaches that app). Its result is
    /// the deployment's test `smoke`, so a failed smoke test holds the commit back from
    /// promotion; what it writes to `$UNDERSTUDY_ARTIFACTS` (screenshots, logs) is kept with
    /// the deployment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smoke: Option<String>,
    /// Commands run on a schedule in each of the tier's Ready environments.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jobs: Vec<ScheduledJob>,
    /// Where a commit that passed here (every test and the smoke test) is pushed: a branch of
    /// the repository that another tier (or another system) takes from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_to: Option<BranchName>,
    /// Declared by the repository file (`[tiers.NAME]` in `understudy.toml` on the production
    /// branch), which then manages it: it goes when the file stops declaring it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_file: bool,
}

/// How many scheduled jobs one tier may have.
pub const MAX_JOBS: usize = 10;

/// A command run on a cron schedule in a tier's environments: a fresh sandbox with the
/// environment's checkout, variables and secrets, reaching its app at `$UNDERSTUDY_TARGET_URL`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduledJob {
    /// Lowercase letters, digits and '-'.
    pub name: String,
    /// Cron: five fields (minute hour day month weekday), or six with seconds first; UTC.
    pub schedule: String,
    pub command: String,
}

impl ScheduledJob {
    fn cron(&self) -> Result<croner::Cron, DomainError> {
        croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(&self.schedule)
            .map_err(|e| DomainError::invalid("schedule", format!("{}: {:?}: {e}", self.name, self.schedule)))
    }

    /// The latest moment the schedule names in `(after, now]`: the one run owed now, however
    /// many were missed (a scheduler that was down catches up once, not once per missed slot).
    pub fn due(&self, after: DateTime<Utc>, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let slot = self.cron().ok()?.find_previous_occurrence(&now, true).ok()?;
        (slot > after).then_some(slot)
    }
}

impl TierSpec {
    /// Its branch pattern or the tier it is promoted from, as written.
    pub fn source_name(&self) -> &str {
        match &self.source {
            TierSource::Branches { pattern } | TierSource::Tags { pattern } => pattern.as_str(),
            TierSource::Promotion { from, .. } => from.as_str(),
        }
    }
}

/// A code freeze: no automatic deploys or promotions until it is lifted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Freeze {
    pub by: String,
    pub reason: String,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tier {
    pub spec: TierSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frozen: Option<Freeze>,
}

impl Tier {
    pub fn name(&self) -> &TierName {
        &self.spec.name
    }

    /// The pattern of a push-fed tier.
    pub fn pattern(&self) -> Option<&BranchPattern> {
        match &self.spec.source {
            TierSource::Branches { pattern } => Some(pattern),
            TierSource::Tags { .. } | TierSource::Promotion { .. } => None,
        }
    }

    /// The tier a promotion-fed tier takes its commits from.
    pub fn promoted_from(&self) -> Option<&TierName> {
        match &self.spec.source {
            TierSource::Branches { .. } | TierSource::Tags { .. } => None,
            TierSource::Promotion { from, .. } => Some(from),
        }
    }

    /// Whether the promoter promotes into it by itself (not while frozen).
    pub fn promotes_automatically(&self) -> bool {
        matches!(self.spec.source, TierSource::Promotion { automatic: true, .. }) && self.frozen.is_none()
    }
}

/// The tier whose pattern names `branch`: an exact name beats a pattern, a longer pattern a
/// shorter one, and the first name in order breaks a tie.
pub fn tier_for_branch<'a>(tiers: &'a BTreeMap<TierName, Tier>, branch: &BranchName) -> Option<&'a Tier> {
    tiers
        .values()
        .filter_map(|tier| tier.pattern().filter(|p| p.matches(branch)).map(|p| (tier, p)))
        .min_by_key(|(tier, pattern)| (!pattern.is_exact(), std::cmp::Reverse(pattern.as_str().len()), tier.name().clone()))
        .map(|(tier, _)| tier)
}

/// The tier a new tag `tag` deploys, by the same rules as [`tier_for_branch`].
pub fn tier_for_tag<'a>(tiers: &'a BTreeMap<TierName, Tier>, tag: &BranchName) -> Option<&'a Tier> {
    tiers
        .values()
        .filter_map(|tier| match &tier.spec.source {
            TierSource::Tags { pattern } if pattern.matches(tag) => Some((tier, pattern)),
            _ => None,
        })
        .min_by_key(|(tier, pattern)| (!pattern.is_exact(), std::cmp::Reverse(pattern.as_str().len()), tier.name().clone()))
        .map(|(tier, _)| tier)
}

/// Checks `spec` against the other tiers of its project: a promotion source must exist and not
/// lead back to the tier itself, and the variables must be names an app can read.
pub fn validate(tiers: &BTreeMap<TierName, Tier>, spec: &TierSpec) -> Result<(), DomainError> {
    if !tiers.contains_key(&spec.name) && tiers.len() >= MAX_TIERS {
        return Err(DomainError::invalid("tiers", format!("a project has at most {MAX_TIERS} tiers")));
    }
    if let TierSource::Promotion { from, .. } = &spec.source {
        let mut seen = vec![spec.name.clone()];
        let mut next = Some(from.clone());
        while let Some(source) = next {
            if seen.contains(&source) {
                return Err(DomainError::invalid("from", format!("promoting {} from {from} would go round in a circle", spec.name)));
            }
            let Some(tier) = tiers.get(&source) else {
                return Err(DomainError::invalid("from", format!("there is no tier \"{source}\" to promote from")));
            };
            seen.push(source);
            next = tier.promoted_from().cloned();
        }
    }
    if let Some(smoke) = &spec.smoke {
        if smoke.trim().is_empty() || smoke.len() > 4096 || smoke.contains('\0') {
            return Err(DomainError::invalid("smoke", "a smoke test is one shell line of at most 4096 bytes"));
        }
    }
    if let (Some(target), TierSource::Branches { pattern }) = (&spec.push_to, &spec.source) {
        if pattern.matches(target) {
            return Err(DomainError::invalid("push_to", format!("{target} feeds {} itself: pushing there would go round", spec.name)));
        }
    }
    if spec.jobs.len() > MAX_JOBS {
        return Err(DomainError::invalid("jobs", format!("a tier has at most {MAX_JOBS} scheduled jobs")));
    }
    for (i, job) in spec.jobs.iter().enumerate() {
        let ok_name = !job.name.is_empty()
            && job.name.len() <= 40
            && job.name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok_name {
            return Err(DomainError::invalid("jobs", format!("{:?}: a job's name is 1 to 40 lowercase letters, digits or '-'", job.name)));
        }
        if spec.jobs[..i].iter().any(|other| other.name == job.name) {
            return Err(DomainError::invalid("jobs", format!("two jobs are named {}", job.name)));
        }
        if job.command.trim().is_empty() || job.command.len() > 4096 || job.command.contains('\0') {
            return Err(DomainError::invalid("jobs", format!("{}: the command is one shell line of at most 4096 bytes", job.name)));
        }
        job.cron()?;
    }
    if spec.env.len() > MAX_TIER_VARS {
        return Err(DomainError::invalid("env", format!("a tier sets at most {MAX_TIER_VARS} variables")));
    }
    for (name, value) in &spec.env {
        crate::project::validate_secret_name(name)?;
        if value.len() > 4096 || value.contains('\0') {
            return Err(DomainError::invalid("env", format!("{name}: a value is at most 4096 bytes, without NUL")));
        }
    }
    Ok(())
}

/// Checks a whole set of tiers as one (the repository file's): each against the others, in an
/// order where every promotion source comes before the tiers promoted from it. That order.
pub fn validate_all(specs: Vec<TierSpec>) -> Result<Vec<TierSpec>, DomainError> {
    let mut ordered: Vec<TierSpec> = Vec::new();
    let mut rest = specs;
    let mut known: BTreeMap<TierName, Tier> = BTreeMap::new();
    while !rest.is_empty() {
        let ready = rest.iter().position(|spec| match &spec.source {
            TierSource::Branches { .. } | TierSource::Tags { .. } => true,
            TierSource::Promotion { from, .. } => known.contains_key(from),
        });
        let Some(index) = ready else {
            let names: Vec<String> = rest.iter().map(|s| format!("{} (from {})", s.name, s.source_name())).collect();
            return Err(DomainError::invalid(
                "from",
                format!("{}: promoted from a tier that is not declared, or round in a circle", names.join(", ")),
            ));
        };
        let spec = rest.remove(index);
        validate(&known, &spec)?;
        known.insert(spec.name.clone(), Tier { spec: spec.clone(), frozen: None });
        ordered.push(spec);
    }
    Ok(ordered)
}

/// Refuses to remove a tier another one is promoted from.
pub fn validate_removal(tiers: &BTreeMap<TierName, Tier>, name: &TierName) -> Result<(), DomainError> {
    if !tiers.contains_key(name) {
        return Err(DomainError::NotFound { entity: "tier", id: name.to_string() });
    }
    if let Some(fed) = tiers.values().find(|t| t.promoted_from() == Some(name)) {
        return Err(DomainError::invalid("tier", format!("{} is promoted from {name}: change or remove it first", fed.name())));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_job_is_due_once_for_the_latest_slot_however_many_were_missed() {
        let at = |h: u32, m: u32| Utc.with_ymd_and_hms(2026, 12, 2, h, m, 0).single().expect("valid");
        let job = ScheduledJob { name: "report".into(), schedule: "*/5 * * * *".into(), command: "true".into() };
        assert_eq!(job.due(at(10, 0), at(10, 4)), None, "nothing since 10:00");
        assert_eq!(job.due(at(10, 0), at(10, 5)), Some(at(10, 5)));
        assert_eq!(job.due(at(10, 0), at(12, 33)), Some(at(12, 30)), "down for hours: the latest slot only");
        let seconds = ScheduledJob { schedule: "*/10 * * * * *".into(), ..job.clone() };
        assert_eq!(seconds.due(at(10, 0), at(10, 0) + chrono::Duration::seconds(25)), Some(at(10, 0) + chrono::Duration::seconds(20)));
        let spec = |schedule: &str| TierSpec {
            name: TierName::parse("staging").expect("name"),
            source: TierSource::Branches { pattern: BranchPattern::parse("main").expect("pattern") },
            env: BTreeMap::new(),
            smoke: None,
            jobs: vec![ScheduledJob { schedule: schedule.into(), ..job.clone() }],
            push_to: None,
            from_file: false,
        };
        assert!(validate(&BTreeMap::new(), &spec("0 3 * * *")).is_ok());
        for bad in ["every tuesday", "61 * * * *", "* * *", ""] {
            assert!(validate(&BTreeMap::new(), &spec(bad)).is_err(), "{bad:?}");
        }
    }
}
