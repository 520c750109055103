//! The Project aggregate: one repository of one account, its production branch and entrypoint rule.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, ProjectId};
use crate::tier::{Freeze, Tier, TierSpec};
use crate::values::{BranchName, ProjectName, RepoFullName, Target, TierName};
use crate::{Aggregate, DomainError, DomainEvent};

/// Which entrypoints a commit gets environments for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EntrypointRule {
    /// `main.w` and `*.main.w` at the repository root, or what stack detection finds.
    Detect,
    /// Exactly these paths.
    Listed { entrypoints: Vec<crate::values::Entrypoint> },
}

/// Root files that make a repository without `main.w` one app of a detected stack (entrypoint `.`).
pub const APP_MARKERS: &[&str] = &["understudy.toml", "package.json", "Procfile", "Cargo.toml", "pyproject.toml", "requirements.txt"];

impl EntrypointRule {
    /// The entrypoints of a commit whose root holds `root_files`: every `main.w` and `*.main.w`
    /// for detection, or the listed ones.
    pub fn select(&self, root_files: &[String]) -> Vec<crate::values::Entrypoint> {
        match self {
            EntrypointRule::Listed { entrypoints } => entrypoints.clone(),
            EntrypointRule::Detect => {
                let mut found: Vec<_> = root_files
                    .iter()
                    .filter(|name| *name == "main.w" || (name.ends_with(".main.w") && name.len() > ".main.w".len()))
                    .filter_map(|name| crate::values::Entrypoint::parse(name.as_str()).ok())
                    .collect();
                found.sort();
                if found.is_empty() && root_files.iter().any(|name| APP_MARKERS.contains(&name.as_str())) {
                    // No Wing entrypoint: the repository root is one app, found by stack detection.
                    found.extend(crate::values::Entrypoint::parse(".").ok());
                }
                found
            }
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Project {
    pub id: Option<ProjectId>,
    pub account_id: Option<AccountId>,
    pub name: Option<ProjectName>,
    pub repository: Option<RepoFullName>,
    pub production_branch: Option<BranchName>,
    pub entrypoints: Option<EntrypointRule>,
    pub active: bool,
    /// Where its repository is fetched from when it is not on GitHub (a path or a git URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_url: Option<String>,
    /// Whether its previews are open to anyone who has the link (signed in or not).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub public_previews: bool,
    /// Secrets by name, sealed: the domain never sees a plain value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, ProjectSecret>,
    /// Its long-lived tiers by name (none: only the production branch deploys on push).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tiers: BTreeMap<TierName, Tier>,
    /// Rebuild triggers by id: a secret URL token that redeploys one tier (a CMS, a database).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub triggers: BTreeMap<uuid::Uuid, Trigger>,
    /// Where news of its long-lived environments goes (outgoing webhooks), by id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub notifications: BTreeMap<uuid::Uuid, NotificationTarget>,
    /// The database add-on: each environment gets a Postgres database of its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<DatabaseAddon>,
}

/// A Postgres database per environment, reachable only by that environment (as
/// `$DATABASE_URL`), created on its first deployment and dropped when it is terminated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatabaseAddon {
    /// Run once, after the first build that finds the database new (or never seeded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<String>,
}

/// What a notification is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NotificationKind {
    /// A deployment failed: to build, to start, or its tests.
    Failed,
    /// A deployment passed after the one before it failed.
    Recovered,
    Promoted,
    RolledBack,
}

impl NotificationKind {
    pub const ALL: [NotificationKind; 4] = [Self::Failed, Self::Recovered, Self::Promoted, Self::RolledBack];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Recovered => "recovered",
            Self::Promoted => "promoted",
            Self::RolledBack => "rolled_back",
        }
    }

    pub fn parse(text: &str) -> Result<Self, DomainError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| DomainError::invalid("events", format!("{text:?}: one of failed, recovered, promoted, rolled_back")))
    }
}

/// An outgoing webhook: JSON POSTed to `url`, signed with HMAC-SHA256 under a secret that is
/// kept sealed (it must be opened to sign). A `mailto:` URL is an email address instead: the
/// same news as a plain-text message through the installation's SMTP server (its secret is
/// kept for symmetry and signs nothing).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotificationTarget {
    pub url: String,
    pub secret: SealedValue,
    pub events: Vec<NotificationKind>,
    pub by: String,
    pub created_at: DateTime<Utc>,
}

/// One plain address (`name@host.example`): no display name, no list, nothing to inject.
fn is_email_address(address: &str) -> bool {
    let Some((local, host)) = address.split_once('@') else { return false };
    let fine = |c: char| c.is_ascii_alphanumeric() || "._+-".contains(c);
    !local.is_empty()
        && local.len() <= 64
        && local.chars().all(|c| fine(c) || "!#$%&'*/=?^`{|}~".contains(c))
        && host.contains('.')
        && host.len() <= 253
        && host.split('.').all(|label| !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
}

/// How many notification targets one project may have.
pub const MAX_NOTIFICATION_TARGETS: usize = 10;

/// A rebuild trigger: whoever holds its token may redeploy its tier. Only the token's SHA-256
/// is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub tier: TierName,
    pub token_sha256: String,
    pub by: String,
    pub created_at: DateTime<Utc>,
}

/// How many rebuild triggers one project may have.
pub const MAX_TRIGGERS: usize = 50;

impl Project {
    /// The tier an environment of `target` belongs to: its branch's tier, or the promoted tier.
    pub fn tier_of(&self, target: &Target) -> Option<&Tier> {
        match target {
            Target::Branch { branch } => crate::tier::tier_for_branch(&self.tiers, branch),
            Target::Tier { tier } => self.tiers.get(tier),
            Target::PullRequest { .. } => None,
        }
    }

    /// Whether a push to `branch` deploys it: the production branch and every tier's branches.
    pub fn deploys_branch(&self, branch: &BranchName) -> bool {
        self.production_branch.as_ref() == Some(branch) || crate::tier::tier_for_branch(&self.tiers, branch).is_some()
    }

    /// The tiers whose commits come from `tier` by promotion.
    pub fn promoted_from<'a>(&'a self, tier: &'a TierName) -> impl Iterator<Item = &'a Tier> + 'a {
        self.tiers.values().filter(move |t| t.promoted_from() == Some(tier))
    }
}

/// Which environments a secret is given to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecretScope {
    /// Every environment (never a pull request from a fork).
    #[default]
    All,
    /// Only the production branch's environments.
    Production,
    /// Only previews: pull requests and branches other than production.
    Preview,
}

impl SecretScope {
    pub fn parse(text: &str) -> Result<Self, DomainError> {
        match text {
            "all" => Ok(Self::All),
            "production" => Ok(Self::Production),
            "preview" => Ok(Self::Preview),
            _ => Err(DomainError::invalid("scope", "must be all, production or preview")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::All => "all",
            Self::Production => "production",
            Self::Preview => "preview",
        }
    }

    /// Whether an environment of `target` gets the secret, given the production branch. The
    /// tier named `production` is production too.
    pub fn covers(self, target: &crate::values::Target, production_branch: Option<&BranchName>) -> bool {
        let production = match target {
            crate::values::Target::Branch { branch } => Some(branch) == production_branch,
            crate::values::Target::Tier { tier } => tier.as_str() == "production",
            crate::values::Target::PullRequest { .. } => false,
        };
        match self {
            Self::All => true,
            Self::Production => production,
            Self::Preview => !production,
        }
    }
}

/// A secret value as the event log keeps it: encrypted with an AEAD under the key `key_id`
/// names, bound to its project and name. Encryption happens in `adapters::secrets`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedValue {
    pub key_id: String,
    /// Base64.
    pub nonce: String,
    /// Base64.
    pub ciphertext: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectSecret {
    pub sealed: SealedValue,
    pub scope: SecretScope,
    pub updated_at: DateTime<Utc>,
}

/// `API_TOKEN`-style: letters, digits and `_`, not starting with a digit, at most 128 characters,
/// and not one Understudy sets itself.
pub fn validate_secret_name(name: &str) -> Result<(), DomainError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit());
    if !ok {
        return Err(DomainError::invalid("name", "a secret's name holds letters, digits and '_', and does not start with a digit"));
    }
    const RESERVED: &[&str] = &["PATH", "HOME", "PORT"];
    if RESERVED.contains(&name) || name.starts_with("UNDERSTUDY") {
        return Err(DomainError::invalid("name", "PATH, HOME, PORT and UNDERSTUDY* are set by Understudy"));
    }
    Ok(())
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProjectCommand {
    Create {
        project_id: ProjectId,
        account_id: AccountId,
        name: ProjectName,
        repository: RepoFullName,
        production_branch: BranchName,
        entrypoints: EntrypointRule,
        at: DateTime<Utc>,
    },
    ChangeProductionBranch {
        branch: BranchName,
        at: DateTime<Utc>,
    },
    ChangeEntrypoints {
        entrypoints: EntrypointRule,
        at: DateTime<Utc>,
    },
    Rename {
        name: ProjectName,
        at: DateTime<Utc>,
    },
    /// The repository was removed from the installation, or the App uninstalled; history is kept.
    Deactivate {
        reason: String,
        at: DateTime<Utc>,
    },
    Reactivate {
        at: DateTime<Utc>,
    },
    /// Opens its previews to anyone with the link, or closes them to those who can read the
    /// repository (the default).
    SetVisibility {
        public_previews: bool,
        at: DateTime<Utc>,
    },
    /// Set (or replace) a secret, already sealed.
    SetSecret {
        name: String,
        sealed: SealedValue,
        scope: SecretScope,
        at: DateTime<Utc>,
    },
    RemoveSecret {
        name: String,
        at: DateTime<Utc>,
    },
    /// The same value sealed again under another key (key rotation); its scope and
    /// last-updated time stay.
    ResealSecret {
        name: String,
        sealed: SealedValue,
        at: DateTime<Utc>,
    },
    /// Fetch the repository from this git URL or path instead of GitHub; its branches are then
    /// polled for new commits.
    UseGitRemote {
        url: String,
        at: DateTime<Utc>,
    },
    /// A write to GitHub keeps failing: record it where operators and users see it. The writer
    /// keeps trying; this is a record, not a give-up.
    RecordGitHubFailure {
        what: String,
        error: String,
        attempts: u32,
        at: DateTime<Utc>,
    },
    /// Declare a tier, or change one (its freeze stays as it is).
    SetTier {
        tier: TierSpec,
        at: DateTime<Utc>,
    },
    RemoveTier {
        name: TierName,
        at: DateTime<Utc>,
    },
    /// A code freeze: no automatic deploys or promotions into the tier until it is unfrozen.
    FreezeTier {
        name: TierName,
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    UnfreezeTier {
        name: TierName,
        by: String,
        at: DateTime<Utc>,
    },
    /// A rebuild trigger for `tier`; the token itself never reaches the log.
    CreateTrigger {
        trigger_id: uuid::Uuid,
        tier: TierName,
        token_sha256: String,
        by: String,
        at: DateTime<Utc>,
    },
    RevokeTrigger {
        trigger_id: uuid::Uuid,
        at: DateTime<Utc>,
    },
    AddNotificationTarget {
        target_id: uuid::Uuid,
        url: String,
        secret: SealedValue,
        events: Vec<NotificationKind>,
        by: String,
        at: DateTime<Utc>,
    },
    RemoveNotificationTarget {
        target_id: uuid::Uuid,
        at: DateTime<Utc>,
    },
    /// A notification target's signing secret sealed again under another key (key rotation).
    ResealNotificationSecret {
        target_id: uuid::Uuid,
        secret: SealedValue,
        at: DateTime<Utc>,
    },
    /// Turn the database add-on on (with its seed command) or off (`None`).
    SetDatabaseAddon {
        database: Option<DatabaseAddon>,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ProjectEvent {
    ProjectCreated {
        project_id: ProjectId,
        account_id: AccountId,
        name: ProjectName,
        repository: RepoFullName,
        production_branch: BranchName,
        entrypoints: EntrypointRule,
        at: DateTime<Utc>,
    },
    ProductionBranchChanged {
        branch: BranchName,
        at: DateTime<Utc>,
    },
    EntrypointsChanged {
        entrypoints: EntrypointRule,
        at: DateTime<Utc>,
    },
    ProjectRenamed {
        name: ProjectName,
        at: DateTime<Utc>,
    },
    ProjectDeactivated {
        reason: String,
        at: DateTime<Utc>,
    },
    ProjectReactivated {
        at: DateTime<Utc>,
    },
    VisibilityChanged {
        public_previews: bool,
        at: DateTime<Utc>,
    },
    GitRemoteSet {
        url: String,
        at: DateTime<Utc>,
    },
    /// Only the sealed value is recorded, never the plain one.
    SecretSet {
        name: String,
        sealed: SealedValue,
        scope: SecretScope,
        at: DateTime<Utc>,
    },
    SecretRemoved {
        name: String,
        at: DateTime<Utc>,
    },
    SecretResealed {
        name: String,
        sealed: SealedValue,
        at: DateTime<Utc>,
    },
    GitHubWriteFailing {
        what: String,
        error: String,
        attempts: u32,
        at: DateTime<Utc>,
    },
    TierSet {
        tier: TierSpec,
        at: DateTime<Utc>,
    },
    TierRemoved {
        name: TierName,
        at: DateTime<Utc>,
    },
    TierFrozen {
        name: TierName,
        by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    TierUnfrozen {
        name: TierName,
        by: String,
        at: DateTime<Utc>,
    },
    TriggerCreated {
        trigger_id: uuid::Uuid,
        tier: TierName,
        token_sha256: String,
        by: String,
        at: DateTime<Utc>,
    },
    TriggerRevoked {
        trigger_id: uuid::Uuid,
        at: DateTime<Utc>,
    },
    NotificationTargetAdded {
        target_id: uuid::Uuid,
        url: String,
        secret: SealedValue,
        events: Vec<NotificationKind>,
        by: String,
        at: DateTime<Utc>,
    },
    NotificationTargetRemoved {
        target_id: uuid::Uuid,
        at: DateTime<Utc>,
    },
    DatabaseAddonSet {
        database: Option<DatabaseAddon>,
        at: DateTime<Utc>,
    },
    NotificationSecretResealed {
        target_id: uuid::Uuid,
        secret: SealedValue,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for ProjectEvent {
    const SCHEMA_VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        match self {
            Self::ProjectCreated { .. } => "ProjectCreated",
            Self::ProductionBranchChanged { .. } => "ProductionBranchChanged",
            Self::EntrypointsChanged { .. } => "EntrypointsChanged",
            Self::ProjectRenamed { .. } => "ProjectRenamed",
            Self::ProjectDeactivated { .. } => "ProjectDeactivated",
            Self::ProjectReactivated { .. } => "ProjectReactivated",
            Self::VisibilityChanged { .. } => "VisibilityChanged",
            Self::GitRemoteSet { .. } => "GitRemoteSet",
            Self::SecretSet { .. } => "SecretSet",
            Self::SecretRemoved { .. } => "SecretRemoved",
            Self::SecretResealed { .. } => "SecretResealed",
            Self::GitHubWriteFailing { .. } => "GitHubWriteFailing",
            Self::TierSet { .. } => "TierSet",
            Self::TierRemoved { .. } => "TierRemoved",
            Self::TierFrozen { .. } => "TierFrozen",
            Self::TierUnfrozen { .. } => "TierUnfrozen",
            Self::TriggerCreated { .. } => "TriggerCreated",
            Self::TriggerRevoked { .. } => "TriggerRevoked",
            Self::NotificationTargetAdded { .. } => "NotificationTargetAdded",
            Self::NotificationTargetRemoved { .. } => "NotificationTargetRemoved",
            Self::DatabaseAddonSet { .. } => "DatabaseAddonSet",
            Self::NotificationSecretResealed { .. } => "NotificationSecretResealed",
        }
    }
}

pub struct ProjectAggregate;

impl Aggregate for ProjectAggregate {
    const NAME: &'static str = "project";
    type State = Project;
    type Command = ProjectCommand;
    type Event = ProjectEvent;

    fn decide(state: &Project, command: ProjectCommand) -> Result<Vec<ProjectEvent>, DomainError> {
        use ProjectCommand as C;
        use ProjectEvent as E;
        if let C::Create { project_id, account_id, name, repository, production_branch, entrypoints, at } = command {
            if state.id.is_some() {
                return Err(DomainError::AlreadyExists { entity: "project", id: project_id.to_string() });
            }
            return Ok(vec![E::ProjectCreated { project_id, account_id, name, repository, production_branch, entrypoints, at }]);
        }
        let Some(id) = state.id else {
            return Err(DomainError::NotFound { entity: "project", id: "(not created)".into() });
        };
        // Setting what is already set records nothing: callers may repeat themselves.
        let unless_already = |already: bool, event: E| Ok(if already { vec![] } else { vec![event] });
        match command {
            C::Create { .. } => Err(DomainError::AlreadyExists { entity: "project", id: id.to_string() }),
            C::ChangeProductionBranch { branch, at } => {
                unless_already(state.production_branch.as_ref() == Some(&branch), E::ProductionBranchChanged { branch, at })
            }
            C::ChangeEntrypoints { entrypoints, at } => {
                if let EntrypointRule::Listed { entrypoints: list } = &entrypoints {
                    if list.is_empty() {
                        return Err(DomainError::invalid("entrypoints", "list at least one entrypoint, or use detection"));
                    }
                }
                unless_already(state.entrypoints.as_ref() == Some(&entrypoints), E::EntrypointsChanged { entrypoints, at })
            }
            C::Rename { name, at } => unless_already(state.name.as_ref() == Some(&name), E::ProjectRenamed { name, at }),
            C::Deactivate { reason, at } => unless_already(!state.active, E::ProjectDeactivated { reason, at }),
            C::Reactivate { at } => unless_already(state.active, E::ProjectReactivated { at }),
            C::SetVisibility { public_previews, at } => {
                unless_already(state.public_previews == public_previews, E::VisibilityChanged { public_previews, at })
            }
            C::UseGitRemote { url, at } => {
                let url = url.trim().to_string();
                let looks_like_git = url.starts_with('/') || url.contains("://") || (url.contains('@') && url.contains(':'));
                if url.is_empty() || url.len() > 2048 || url.chars().any(char::is_control) || !looks_like_git {
                    return Err(DomainError::invalid(
                        "git_url",
                        "must be an absolute path or a git URL (file://, https://, ssh://, user@host:path)",
                    ));
                }
                unless_already(state.git_url.as_deref() == Some(url.as_str()), E::GitRemoteSet { url, at })
            }
            C::SetSecret { name, sealed, scope, at } => {
                validate_secret_name(&name)?;
                if sealed.ciphertext.is_empty() || sealed.nonce.is_empty() || sealed.key_id.is_empty() {
                    return Err(DomainError::invalid("sealed", "a secret is stored sealed: key id, nonce and ciphertext"));
                }
                let same = state.secrets.get(&name).is_some_and(|s| s.sealed == sealed && s.scope == scope);
                unless_already(same, E::SecretSet { name, sealed, scope, at })
            }
            C::RemoveSecret { name, at } => {
                if !state.secrets.contains_key(&name) {
                    return Err(DomainError::NotFound { entity: "secret", id: name });
                }
                Ok(vec![E::SecretRemoved { name, at }])
            }
            C::ResealSecret { name, sealed, at } => {
                let Some(existing) = state.secrets.get(&name) else {
                    return Err(DomainError::NotFound { entity: "secret", id: name });
                };
                if sealed.ciphertext.is_empty() || sealed.nonce.is_empty() || sealed.key_id.is_empty() {
                    return Err(DomainError::invalid("sealed", "a secret is stored sealed: key id, nonce and ciphertext"));
                }
                unless_already(existing.sealed == sealed, E::SecretResealed { name, sealed, at })
            }
            C::RecordGitHubFailure { what, error, attempts, at } => Ok(vec![E::GitHubWriteFailing { what, error, attempts, at }]),
            C::SetTier { tier, at } => {
                crate::tier::validate(&state.tiers, &tier)?;
                unless_already(state.tiers.get(&tier.name).is_some_and(|t| t.spec == tier), E::TierSet { tier, at })
            }
            C::RemoveTier { name, at } => {
                crate::tier::validate_removal(&state.tiers, &name)?;
                Ok(vec![E::TierRemoved { name, at }])
            }
            C::FreezeTier { name, by, reason, at } => {
                let tier = state.tiers.get(&name).ok_or_else(|| DomainError::NotFound { entity: "tier", id: name.to_string() })?;
                if reason.len() > 1000 || reason.chars().any(char::is_control) {
                    return Err(DomainError::invalid("reason", "at most 1000 characters on one line"));
                }
                unless_already(tier.frozen.is_some(), E::TierFrozen { name, by, reason, at })
            }
            C::CreateTrigger { trigger_id, tier, token_sha256, by, at } => {
                if !state.tiers.contains_key(&tier) {
                    return Err(DomainError::NotFound { entity: "tier", id: tier.to_string() });
                }
                if token_sha256.len() != 64 || !token_sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
                    return Err(DomainError::invalid("token_sha256", "a trigger keeps its token's SHA-256, in lowercase hex"));
                }
                if state.triggers.contains_key(&trigger_id) {
                    return Err(DomainError::AlreadyExists { entity: "trigger", id: trigger_id.to_string() });
                }
                if state.triggers.len() >= MAX_TRIGGERS {
                    return Err(DomainError::invalid("triggers", format!("a project has at most {MAX_TRIGGERS} triggers")));
                }
                Ok(vec![E::TriggerCreated { trigger_id, tier, token_sha256, by, at }])
            }
            C::AddNotificationTarget { target_id, url, secret, mut events, by, at } => {
                let url = url.trim().to_string();
                let web = url.starts_with("https://") || url.starts_with("http://");
                let mail = url.strip_prefix("mailto:").is_some_and(is_email_address);
                if !(web || mail) || url.len() > 2048 || url.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(DomainError::invalid(
                        "url",
                        "an http:// or https:// URL of at most 2048 characters, or mailto: and one email address",
                    ));
                }
                if secret.ciphertext.is_empty() || secret.nonce.is_empty() || secret.key_id.is_empty() {
                    return Err(DomainError::invalid("secret", "a notification's signing secret is stored sealed"));
                }
                events.sort();
                events.dedup();
                if events.is_empty() {
                    events = NotificationKind::ALL.to_vec();
                }
                if state.notifications.contains_key(&target_id) {
                    return Err(DomainError::AlreadyExists { entity: "notification target", id: target_id.to_string() });
                }
                if state.notifications.len() >= MAX_NOTIFICATION_TARGETS {
                    return Err(DomainError::invalid(
                        "url",
                        format!("a project has at most {MAX_NOTIFICATION_TARGETS} notification targets"),
                    ));
                }
                Ok(vec![E::NotificationTargetAdded { target_id, url, secret, events, by, at }])
            }
            C::ResealNotificationSecret { target_id, secret, at } => {
                let Some(existing) = state.notifications.get(&target_id) else {
                    return Err(DomainError::NotFound { entity: "notification target", id: target_id.to_string() });
                };
                if secret.ciphertext.is_empty() || secret.nonce.is_empty() || secret.key_id.is_empty() {
                    return Err(DomainError::invalid("secret", "a notification's signing secret is stored sealed"));
                }
                unless_already(existing.secret == secret, E::NotificationSecretResealed { target_id, secret, at })
            }
            C::SetDatabaseAddon { database, at } => {
                if let Some(seed) = database.as_ref().and_then(|d| d.seed.as_ref()) {
                    if seed.trim().is_empty() || seed.len() > 4096 || seed.contains('\0') {
                        return Err(DomainError::invalid("seed", "a seed command is one shell line of at most 4096 bytes"));
                    }
                }
                unless_already(state.database == database, E::DatabaseAddonSet { database, at })
            }
            C::RemoveNotificationTarget { target_id, at } => {
                if !state.notifications.contains_key(&target_id) {
                    return Err(DomainError::NotFound { entity: "notification target", id: target_id.to_string() });
                }
                Ok(vec![E::NotificationTargetRemoved { target_id, at }])
            }
            C::RevokeTrigger { trigger_id, at } => {
                if !state.triggers.contains_key(&trigger_id) {
                    return Err(DomainError::NotFound { entity: "trigger", id: trigger_id.to_string() });
                }
                Ok(vec![E::TriggerRevoked { trigger_id, at }])
            }
            C::UnfreezeTier { name, by, at } => {
                let tier = state.tiers.get(&name).ok_or_else(|| DomainError::NotFound { entity: "tier", id: name.to_string() })?;
                unless_already(tier.frozen.is_none(), E::TierUnfrozen { name, by, at })
            }
        }
    }

    fn apply(mut state: Project, event: &ProjectEvent) -> Project {
        use ProjectEvent as E;
        match event {
            E::ProjectCreated { project_id, account_id, name, repository, production_branch, entrypoints, .. } => {
                state.id = Some(*project_id);
                state.account_id = Some(*account_id);
                state.name = Some(name.clone());
                state.repository = Some(repository.clone());
                state.production_branch = Some(production_branch.clone());
                state.entrypoints = Some(entrypoints.clone());
                state.active = true;
            }
            E::ProductionBranchChanged { branch, .. } => state.production_branch = Some(branch.clone()),
            E::EntrypointsChanged { entrypoints, .. } => state.entrypoints = Some(entrypoints.clone()),
            E::ProjectRenamed { name, .. } => state.name = Some(name.clone()),
            E::ProjectDeactivated { .. } => state.active = false,
            E::ProjectReactivated { .. } => state.active = true,
            E::VisibilityChanged { public_previews, .. } => state.public_previews = *public_previews,
            E::GitRemoteSet { url, .. } => state.git_url = Some(url.clone()),
            E::SecretSet { name, sealed, scope, at } => {
                state.secrets.insert(name.clone(), ProjectSecret { sealed: sealed.clone(), scope: *scope, updated_at: *at });
            }
            E::SecretRemoved { name, .. } => {
                state.secrets.remove(name);
            }
            E::SecretResealed { name, sealed, .. } => {
                if let Some(secret) = state.secrets.get_mut(name) {
                    secret.sealed = sealed.clone();
                }
            }
            E::GitHubWriteFailing { .. } => {}
            E::TierSet { tier, .. } => {
                let frozen = state.tiers.remove(&tier.name).and_then(|t| t.frozen);
                state.tiers.insert(tier.name.clone(), Tier { spec: tier.clone(), frozen });
            }
            E::TierRemoved { name, .. } => {
                state.tiers.remove(name);
                // A removed tier's triggers go with it.
                state.triggers.retain(|_, trigger| trigger.tier != *name);
            }
            E::TriggerCreated { trigger_id, tier, token_sha256, by, at } => {
                let trigger = Trigger { tier: tier.clone(), token_sha256: token_sha256.clone(), by: by.clone(), created_at: *at };
                state.triggers.insert(*trigger_id, trigger);
            }
            E::TriggerRevoked { trigger_id, .. } => {
                state.triggers.remove(trigger_id);
            }
            E::NotificationTargetAdded { target_id, url, secret, events, by, at } => {
                let target = NotificationTarget {
                    url: url.clone(),
                    secret: secret.clone(),
                    events: events.clone(),
                    by: by.clone(),
                    created_at: *at,
                };
                state.notifications.insert(*target_id, target);
            }
            E::NotificationTargetRemoved { target_id, .. } => {
                state.notifications.remove(target_id);
            }
            E::DatabaseAddonSet { database, .. } => state.database = database.clone(),
            E::NotificationSecretResealed { target_id, secret, .. } => {
                if let Some(target) = state.notifications.get_mut(target_id) {
                    target.secret = secret.clone();
                }
            }
            E::TierFrozen { name, by, reason, at } => {
                if let Some(tier) = state.tiers.get_mut(name) {
                    tier.frozen = Some(Freeze { by: by.clone(), reason: reason.clone(), at: *at });
                }
            }
            E::TierUnfrozen { name, .. } => {
                if let Some(tier) = state.tiers.get_mut(name) {
                    tier.frozen = None;
                }
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use chrono::TimeZone;
    use uuid::Uuid;
    use ProjectCommand as C;
    use ProjectEvent as E;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).single().expect("valid date")
    }
    fn created() -> E {
        E::ProjectCreated {
            project_id: ProjectId(Uuid::from_u128(1)),
            account_id: AccountId(Uuid::from_u128(2)),
            name: ProjectName::parse("hello").expect("valid"),
            repository: RepoFullName::parse("octo/hello").expect("valid"),
            production_branch: BranchName::parse("main").expect("valid"),
            entrypoints: EntrypointRule::Detect,
            at: at(),
        }
    }
    fn create() -> C {
        let E::ProjectCreated { project_id, account_id, name, repository, production_branch, entrypoints, at } = created() else {
            unreachable!("created() builds ProjectCreated")
        };
        C::Create { project_id, account_id, name, repository, production_branch, entrypoints, at }
    }

    #[test]
    fn notification_targets_are_web_urls_or_one_plain_email_address() {
        let sealed = SealedValue { key_id: "k".into(), nonce: "n".into(), ciphertext: "c".into() };
        let add = |url: &str| C::AddNotificationTarget {
            target_id: Uuid::from_u128(7),
            url: url.into(),
            secret: sealed.clone(),
            events: vec![],
            by: "user:1".into(),
            at: at(),
        };
        let state = <ProjectAggregate as crate::Aggregate>::replay(&[created()]);
        for ok in ["https://hooks.example.com/x", "http://127.0.0.1:9/h", "mailto:ops@example.com", "mailto:a.b+c@mail.example.co"] {
            assert!(<ProjectAggregate as crate::Aggregate>::decide(&state, add(ok)).is_ok(), "{ok}");
        }
        for bad in [
            "mailto:",
            "mailto:ops",
            "mailto:ops@localhost",
            "mailto:a@b.com,c@d.com",
            "mailto:Ops <ops@example.com>",
            "mailto:ops@example.com%0d%0aBcc:x@evil.com",
            "mailto:ops@exa_mple.com",
            "ftp://example.com",
        ] {
            given::<ProjectAggregate>(&[created()]).when(add(bad)).then_error(|e| matches!(e, DomainError::Invalid { field: "url", .. }));
        }
    }

    fn tier(name: &str, source: crate::tier::TierSource) -> TierSpec {
        TierSpec {
            name: TierName::parse(name).expect("name"),
            source,
            env: BTreeMap::new(),
            smoke: None,
            jobs: vec![],
            push_to: None,
            from_file: false,
        }
    }
    fn branches(pattern: &str) -> crate::tier::TierSource {
        crate::tier::TierSource::Branches { pattern: crate::values::BranchPattern::parse(pattern).expect("pattern") }
    }
    fn promoted(from: &str) -> crate::tier::TierSource {
        crate::tier::TierSource::Promotion { from: TierName::parse(from).expect("name"), automatic: true }
    }

    #[test]
    fn tiers_route_branches_and_promotions_without_cycles() {
        let mut state = ProjectAggregate::replay(&[created()]);
        for spec in [tier("dev", branches("dev-*")), tier("staging", branches("main")), tier("production", promoted("staging"))] {
            let events = ProjectAggregate::decide(&state, C::SetTier { tier: spec.clone(), at: at() }).expect("valid tier");
            assert_eq!(events, vec![E::TierSet { tier: spec, at: at() }]);
            state = events.iter().fold(state, ProjectAggregate::apply);
        }
        let branch = |b: &str| BranchName::parse(b).expect("branch");
        let name_of = |target: Target| state.tier_of(&target).map(|t| t.name().to_string());
        assert_eq!(name_of(Target::Branch { branch: branch("dev-alice") }).as_deref(), Some("dev"));
        assert_eq!(name_of(Target::Branch { branch: branch("main") }).as_deref(), Some("staging"));
        assert_eq!(name_of(Target::Branch { branch: branch("feature") }), None);
        assert_eq!(name_of(Target::Tier { tier: TierName::parse("production").expect("name") }).as_deref(), Some("production"));
        assert!(state.deploys_branch(&branch("dev-x")) && state.deploys_branch(&branch("main")) && !state.deploys_branch(&branch("x")));
        let staging = TierName::parse("staging").expect("name");
        assert_eq!(state.promoted_from(&staging).map(|t| t.name().to_string()).collect::<Vec<_>>(), ["production"]);

        // Setting the same tier again records nothing; a cycle or a missing source is refused.
        assert!(ProjectAggregate::decide(&state, C::SetTier { tier: tier("dev", branches("dev-*")), at: at() }).expect("same").is_empty());
        let cycle = ProjectAggregate::decide(&state, C::SetTier { tier: tier("staging", promoted("production")), at: at() });
        assert!(matches!(cycle, Err(DomainError::Invalid { field: "from", .. })), "{cycle:?}");
        let itself = ProjectAggregate::decide(&state, C::SetTier { tier: tier("qa", promoted("qa")), at: at() });
        assert!(matches!(itself, Err(DomainError::Invalid { field: "from", .. })), "{itself:?}");
        let missing = ProjectAggregate::decide(&state, C::SetTier { tier: tier("qa", promoted("nope")), at: at() });
        assert!(matches!(missing, Err(DomainError::Invalid { field: "from", .. })), "{missing:?}");
        let mut bad_env = tier("qa", branches("qa"));
        bad_env.env.insert("PATH".into(), "/evil".into());
        assert!(ProjectAggregate::decide(&state, C::SetTier { tier: bad_env, at: at() }).is_err(), "PATH is Understudy's");
        // A tier another is promoted from stays until that one changes.
        let remove = ProjectAggregate::decide(&state, C::RemoveTier { name: staging.clone(), at: at() });
        assert!(matches!(remove, Err(DomainError::Invalid { field: "tier", .. })), "{remove:?}");

        // A freeze is recorded with who and why, survives a change of the tier, and lifts.
        let production = TierName::parse("production").expect("name");
        let freeze = C::FreezeTier { name: production.clone(), by: "alice".into(), reason: "release week".into(), at: at() };
        let events = ProjectAggregate::decide(&state, freeze.clone()).expect("freeze");
        state = events.iter().fold(state, ProjectAggregate::apply);
        assert!(ProjectAggregate::decide(&state, freeze).expect("again").is_empty(), "freezing twice records once");
        assert!(!state.tiers[&production].promotes_automatically(), "a frozen tier is not promoted into by itself");
        let mut manual = tier("production", promoted("staging"));
        manual.env.insert("CACHE".into(), "on".into());
        let events = ProjectAggregate::decide(&state, C::SetTier { tier: manual, at: at() }).expect("change");
        state = events.iter().fold(state, ProjectAggregate::apply);
        assert!(state.tiers[&production].frozen.is_some(), "changing a tier keeps its freeze");
        let events =
            ProjectAggregate::decide(&state, C::UnfreezeTier { name: production.clone(), by: "alice".into(), at: at() }).expect("unfreeze");
        state = events.iter().fold(state, ProjectAggregate::apply);
        assert!(state.tiers[&production].promotes_automatically());
        let events = ProjectAggregate::decide(&state, C::RemoveTier { name: production.clone(), at: at() }).expect("remove");
        state = events.iter().fold(state, ProjectAggregate::apply);
        assert!(!state.tiers.contains_key(&production));
    }

    #[test]
    fn triggers_name_an_existing_tier_keep_only_a_hash_and_go_with_their_tier() {
        let mut state = ProjectAggregate::replay(&[created()]);
        let events = ProjectAggregate::decide(&state, C::SetTier { tier: tier("staging", branches("main")), at: at() }).expect("tier");
        state = events.iter().fold(state, ProjectAggregate::apply);
        let create = |tier: &str, hash: &str| C::CreateTrigger {
            trigger_id: Uuid::from_u128(5),
            tier: TierName::parse(tier).expect("name"),
            token_sha256: hash.into(),
            by: "alice".into(),
            at: at(),
        };
        let hash = "ab".repeat(32);
        assert!(matches!(ProjectAggregate::decide(&state, create("nope", &hash)), Err(DomainError::NotFound { .. })));
        assert!(matches!(ProjectAggregate::decide(&state, create("staging", "not-a-hash")), Err(DomainError::Invalid { .. })));
        let events = ProjectAggregate::decide(&state, create("staging", &hash)).expect("trigger");
        state = events.iter().fold(state, ProjectAggregate::apply);
        assert_eq!(state.triggers[&Uuid::from_u128(5)].token_sha256, hash);
        assert!(matches!(ProjectAggregate::decide(&state, create("staging", &hash)), Err(DomainError::AlreadyExists { .. })));
        let events =
            ProjectAggregate::decide(&state, C::RemoveTier { name: TierName::parse("staging").expect("name"), at: at() }).expect("remove");
        state = events.iter().fold(state, ProjectAggregate::apply);
        assert!(state.triggers.is_empty(), "a removed tier's triggers go with it");
        let revoke = C::RevokeTrigger { trigger_id: Uuid::from_u128(5), at: at() };
        assert!(matches!(ProjectAggregate::decide(&state, revoke), Err(DomainError::NotFound { .. })));
    }

    #[test]
    fn an_exact_branch_beats_a_pattern_and_a_longer_pattern_a_shorter_one() {
        let mut state = ProjectAggregate::replay(&[created()]);
        for spec in [tier("all", branches("*")), tier("releases", branches("release-*")), tier("hotfix", branches("release-hotfix"))] {
            let events = ProjectAggregate::decide(&state, C::SetTier { tier: spec, at: at() }).expect("valid");
            state = events.iter().fold(state, ProjectAggregate::apply);
        }
        let of = |b: &str| state.tier_of(&Target::Branch { branch: BranchName::parse(b).expect("branch") }).map(|t| t.name().to_string());
        assert_eq!(of("release-hotfix").as_deref(), Some("hotfix"));
        assert_eq!(of("release-2").as_deref(), Some("releases"));
        assert_eq!(of("feature").as_deref(), Some("all"));
    }

    #[test]
    fn wing_entrypoints_are_detected_at_the_root() {
        let files: Vec<String> =
            ["README.md", "main.w", "api.main.w", ".main.w", "main.wx", "lib.w"].iter().map(|s| s.to_string()).collect();
        let found: Vec<String> = EntrypointRule::Detect.select(&files).into_iter().map(String::from).collect();
        assert_eq!(found, ["api.main.w", "main.w"]);
    }

    #[test]
    fn a_git_remote_must_look_like_one_and_setting_it_twice_records_once() {
        let set = |url: &str| C::UseGitRemote { url: url.into(), at: at() };
        let state = ProjectAggregate::replay(&[created()]);
        assert_eq!(
            ProjectAggregate::decide(&state, set("/srv/git/app.git")).expect("valid"),
            vec![E::GitRemoteSet { url: "/srv/git/app.git".into(), at: at() }]
        );
        for ok in ["file:///srv/app.git", "https://git.example.com/app.git", "git@example.com:team/app.git"] {
            assert!(ProjectAggregate::decide(&state, set(ok)).is_ok(), "{ok}");
        }
        for bad in ["", "relative/path", "https://x/\napp"] {
            assert!(ProjectAggregate::decide(&state, set(bad)).is_err(), "{bad:?}");
        }
        let with = ProjectAggregate::replay(&[created(), E::GitRemoteSet { url: "/srv/git/app.git".into(), at: at() }]);
        assert_eq!(with.git_url.as_deref(), Some("/srv/git/app.git"));
        assert!(ProjectAggregate::decide(&with, set("/srv/git/app.git")).expect("same").is_empty());
    }

    #[test]
    fn secrets_are_kept_sealed_by_name_and_scope() {
        let sealed = SealedValue { key_id: "k1".into(), nonce: "bm9uY2U=".into(), ciphertext: "c2VhbGVk".into() };
        let set = |name: &str| C::SetSecret { name: name.into(), sealed: sealed.clone(), scope: SecretScope::Preview, at: at() };
        let state = ProjectAggregate::replay(&[created()]);
        let events = ProjectAggregate::decide(&state, set("API_TOKEN")).expect("valid");
        let state = events.iter().fold(state, ProjectAggregate::apply);
        assert_eq!(state.secrets["API_TOKEN"].scope, SecretScope::Preview);
        assert!(ProjectAggregate::decide(&state, set("API_TOKEN")).expect("same").is_empty(), "setting the same sealed value again");
        for bad in ["", "1ABC", "WITH-DASH", "PATH", "UNDERSTUDY_X", "spaced name"] {
            assert!(ProjectAggregate::decide(&state, set(bad)).is_err(), "{bad:?}");
        }
        let unsealed = C::SetSecret {
            name: "X".into(),
            sealed: SealedValue { key_id: "".into(), ..sealed.clone() },
            scope: SecretScope::All,
            at: at(),
        };
        assert!(ProjectAggregate::decide(&state, unsealed).is_err());
        let removed = ProjectAggregate::decide(&state, C::RemoveSecret { name: "API_TOKEN".into(), at: at() }).expect("remove");
        let state = removed.iter().fold(state, ProjectAggregate::apply);
        assert!(state.secrets.is_empty());
        assert!(ProjectAggregate::decide(&state, C::RemoveSecret { name: "API_TOKEN".into(), at: at() }).is_err());
    }

    #[test]
    fn secret_scopes_split_production_from_previews() {
        use crate::values::Target;
        let main = BranchName::parse("main").expect("branch");
        let production = Target::Branch { branch: main.clone() };
        let feature = Target::Branch { branch: BranchName::parse("feature").expect("branch") };
        let pr = Target::PullRequest { number: 1, head_branch: BranchName::parse("feature").expect("branch") };
        assert!(SecretScope::Production.covers(&production, Some(&main)));
        assert!(!SecretScope::Production.covers(&pr, Some(&main)));
        assert!(SecretScope::Preview.covers(&pr, Some(&main)) && SecretScope::Preview.covers(&feature, Some(&main)));
        assert!(!SecretScope::Preview.covers(&production, Some(&main)));
        assert!(SecretScope::All.covers(&production, Some(&main)) && SecretScope::All.covers(&pr, Some(&main)));
    }

    #[test]
    fn a_repository_without_wing_entrypoints_is_one_app_when_its_stack_is_known() {
        let select = |files: &[&str]| -> Vec<String> {
            let files: Vec<String> = files.iter().map(|s| s.to_string()).collect();
            EntrypointRule::Detect.select(&files).into_iter().map(String::from).collect()
        };
        assert_eq!(select(&["package.json", "index.js"]), ["."]);
        assert_eq!(select(&["Procfile"]), ["."]);
        assert_eq!(select(&["main.w", "package.json"]), ["main.w"], "Wing entrypoints win");
        assert!(select(&["README.md"]).is_empty(), "nothing to run");
    }

    #[test]
    fn transitions() {
        let main = BranchName::parse("main").expect("valid");
        let trunk = BranchName::parse("trunk").expect("valid");
        let deactivated = E::ProjectDeactivated { reason: "uninstalled".into(), at: at() };
        // (history, command, expected events or None for an error)
        let table: Vec<(Vec<E>, C, Option<Vec<E>>)> = vec![
            (vec![], create(), Some(vec![created()])),
            (vec![created()], create(), None),
            (vec![], C::ChangeProductionBranch { branch: trunk.clone(), at: at() }, None),
            (
                vec![created()],
                C::ChangeProductionBranch { branch: trunk.clone(), at: at() },
                Some(vec![E::ProductionBranchChanged { branch: trunk, at: at() }]),
            ),
            (vec![created()], C::ChangeProductionBranch { branch: main, at: at() }, Some(vec![])),
            (vec![created()], C::ChangeEntrypoints { entrypoints: EntrypointRule::Listed { entrypoints: vec![] }, at: at() }, None),
            (vec![created()], C::Deactivate { reason: "uninstalled".into(), at: at() }, Some(vec![deactivated.clone()])),
            (vec![created(), deactivated.clone()], C::Deactivate { reason: "again".into(), at: at() }, Some(vec![])),
            (vec![created(), deactivated], C::Reactivate { at: at() }, Some(vec![E::ProjectReactivated { at: at() }])),
            (vec![created()], C::Reactivate { at: at() }, Some(vec![])),
            (
                vec![created()],
                C::RecordGitHubFailure { what: "comment".into(), error: "403".into(), attempts: 5, at: at() },
                Some(vec![E::GitHubWriteFailing { what: "comment".into(), error: "403".into(), attempts: 5, at: at() }]),
            ),
            (vec![], C::RecordGitHubFailure { what: "comment".into(), error: "403".into(), attempts: 5, at: at() }, None),
        ];
        for (history, command, expected) in table {
            match expected {
                Some(events) => {
                    given::<ProjectAggregate>(&history).when(command).then(&events);
                }
                None => given::<ProjectAggregate>(&history).when(command).then_error(|_| true),
            }
        }
    }
}
