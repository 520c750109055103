//! Projects whose repository is not on GitHub: a repository on disk, a bare repository, or any
//! git URL. `understudy project add --git …` creates one; the poller then watches its branches
//! and deploys each new head through the same pipeline as a pull request's commits: every branch
//! gets an environment per entrypoint, a deleted branch's environments are terminated.
//!
//! Polling (`git ls-remote`, every few seconds) needs nothing on the repository's side; a
//! post-receive hook that runs `understudy project poll` makes a push show up at once.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use tokio::process::Command;
use tokio_util::sync::CancellationToken;
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::ids::{AccountId, ProjectId};
use understudy_domain::project::{EntrypointRule, Project, ProjectCommand};
use understudy_domain::tier::TierSource;
use understudy_domain::values::{BranchName, CommitSha, ProjectName, RepoFullName, Target};
use understudy_domain::{DomainError, Metadata};
use uuid::Uuid;

use crate::{CommandError, EventStore};

/// The project id of a repository at `url`: the same URL is always the same project.
pub fn project_id(url: &str) -> ProjectId {
    ProjectId(Uuid::new_v5(&Uuid::NAMESPACE_URL, format!("understudy:git:{url}").as_bytes()))
}

/// A path is made absolute, so the project does not depend on the directory it was added from.
pub fn normalize(url_or_path: &str) -> anyhow::Result<String> {
    if url_or_path.contains("://") || (url_or_path.contains('@') && url_or_path.contains(':')) {
        return Ok(url_or_path.to_string());
    }
    let path = std::fs::canonicalize(url_or_path).map_err(|e| anyhow::anyhow!("{url_or_path}: {e}"))?;
    Ok(path.display().to_string())
}

/// Creates (or finds) the project of the repository at `url`, with `branch` as its production
/// branch. Repeating it changes nothing.
pub async fn add_project(store: &EventStore, url: &str, branch: &str, name: Option<&str>) -> anyhow::Result<Project> {
    let url = normalize(url)?;
    let id = project_id(&url);
    let default_name = Path::new(url.trim_end_matches('/')).file_name().and_then(|n| n.to_str()).unwrap_or("repository");
    let name = name.unwrap_or_else(|| default_name.trim_end_matches(".git"));
    let name = ProjectName::parse(sanitize(name))?;
    let meta = Metadata::new(Uuid::new_v4(), "system:cli");
    let create = ProjectCommand::Create {
        project_id: id,
        // A project of its own account until accounts and teams can own local repositories.
        account_id: AccountId(Uuid::new_v5(&id.0, b"account")),
        repository: RepoFullName::parse(format!("local/{name}"))?,
        name,
        production_branch: BranchName::parse(branch)?,
        entrypoints: EntrypointRule::Detect,
        at: Utc::now(),
    };
    match store.projects.execute(id.0, create, meta.clone()).await {
        Ok(_) | Err(CommandError::Domain(DomainError::AlreadyExists { .. })) => {}
        Err(error) => return Err(error.into()),
    }
    Ok(store.projects.execute(id.0, ProjectCommand::UseGitRemote { url, at: Utc::now() }, meta).await?.state)
}

fn sanitize(name: &str) -> String {
    let clean: String = name.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '-' }).collect();
    clean.trim_start_matches('.').to_string()
}

/// Watches every project with a git remote.
pub struct Poller {
    pub store: EventStore,
    /// Mirrors of the watched repositories, to list the files of new heads.
    pub mirrors: PathBuf,
    pub every: Duration,
}

impl Poller {
    pub async fn run(self, cancel: CancellationToken) {
        crate::worker::every("polling git remotes", self.every, cancel, || self.poll_all()).await
    }

    /// One pass over every project with a git remote; returns the deployments requested.
    pub async fn poll_all(&self) -> anyhow::Result<usize> {
        let projects: Vec<Uuid> = sqlx::query_scalar(
            "SELECT DISTINCT aggregate_id FROM event_log WHERE aggregate_type = 'project' AND event_type = 'GitRemoteSet'",
        )
        .fetch_all(&self.store.pool)
        .await?;
        let mut requested = 0;
        for project in projects {
            match self.poll(ProjectId(project)).await {
                Ok(n) => requested += n,
                Err(error) => tracing::warn!(%project, %error, "polling a git remote failed"),
            }
        }
        Ok(requested)
    }

    /// Brings one project's branch environments in line with its remote's branches.
    pub async fn poll(&self, id: ProjectId) -> anyhow::Result<usize> {
        let project = self.store.projects.load(id.0).await?.into_inner();
        let (Some(url), true) = (project.git_url.clone(), project.active) else { return Ok(0) };
        let rule = project.entrypoints.clone().unwrap_or(EntrypointRule::Detect);
        let heads = self.fetch(id, &url).await?;
        let meta = Metadata::new(Uuid::new_v4(), "system:git-poll");
        // The production branch's repository file declares tiers: before anything is routed.
        let production = project.production_branch.as_ref().and_then(|b| heads.get(b.as_str()));
        let project = match production {
            Some(sha) => {
                let files = self.root_files(id, sha).await?;
                let file = self.repository_file(id, sha, &files).await?;
                if crate::repo_tiers::apply(&self.store, id, file.as_deref(), &meta).await? > 0 {
                    self.store.projects.load(id.0).await?.into_inner()
                } else {
                    project
                }
            }
            None => project,
        };
        let mut requested = 0;
        for (branch, sha) in &heads {
            let Ok(branch) = BranchName::parse(branch.as_str()) else { continue };
            let target = Target::Branch { branch };
            if project.tier_of(&target).is_some_and(|tier| tier.frozen.is_some()) {
                // A code freeze: the branch keeps what it runs; the poll after the thaw deploys.
                continue;
            }
            requested += self.deploy_at(id, &rule, &target, sha, &meta).await?;
        }
        // Tiers fed by tags: the newest tag each one takes deploys its commit.
        let tags = git(
            &self.mirror(id),
            &["for-each-ref", "--sort=-creatordate", "--format=%(refname:short) %(objectname) %(*objectname)", "refs/tags"],
        )
        .await?;
        for tier in project.tiers.values().filter(|t| matches!(t.spec.source, TierSource::Tags { .. }) && t.frozen.is_none()) {
            let newest = tags.lines().find_map(|line| {
                let mut parts = line.split(' ');
                let (name, object, peeled) = (parts.next()?, parts.next()?, parts.next().unwrap_or_default());
                let name = BranchName::parse(name).ok()?;
                let takes = understudy_domain::tier::tier_for_tag(&project.tiers, &name).is_some_and(|t| t.name() == tier.name());
                takes.then(|| CommitSha::parse(if peeled.is_empty() { object } else { peeled }).ok()).flatten()
            });
            let Some(sha) = newest else { continue };
            requested += self.deploy_at(id, &rule, &Target::Tier { tier: tier.name().clone() }, &sha, &meta).await?;
        }
        // Branches that are gone: their environments end.
        let live: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT environment_id, branch FROM environments WHERE project_id = $1 AND target_kind = 'branch' AND status <> 'Terminated'",
        )
        .bind(id.0)
        .fetch_all(&self.store.pool)
        .await?;
        for (environment, branch) in live {
            if !heads.contains_key(&branch) {
                let command = EnvironmentCommand::Terminate { reason: "branch deleted".into(), at: Utc::now() };
                match self.store.environments.execute(environment, command, meta.clone()).await {
                    Ok(_) | Err(CommandError::Domain(DomainError::NotFound { .. })) => {}
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(requested)
    }

    /// Deploys `sha` to `target`'s environments, one per entrypoint of the commit; how many new
    /// deployments that asked for. A repository file that cannot be read leaves detection to it.
    async fn deploy_at(
        &self,
        id: ProjectId,
        rule: &EntrypointRule,
        target: &Target,
        sha: &CommitSha,
        meta: &Metadata,
    ) -> anyhow::Result<usize> {
        let files = self.root_files(id, sha).await?;
        let config = self.repository_file(id, sha, &files).await.ok().flatten();
        let mut requested = 0;
        for entrypoint in super::stack::select_entrypoints(rule, &files, config.as_deref()) {
            requested += usize::from(self.store.deploy_commit(id, target, &entrypoint, sha, meta).await?);
        }
        Ok(requested)
    }

    /// The repository file (`understudy.toml`) of `sha`, when its root (`files`) has one.
    async fn repository_file(&self, id: ProjectId, sha: &CommitSha, files: &[String]) -> anyhow::Result<Option<String>> {
        if !files.iter().any(|f| f == super::stack::CONFIG_FILE) {
            return Ok(None);
        }
        Ok(Some(git(&self.mirror(id), &["show", &format!("{}:{}", sha.as_str(), super::stack::CONFIG_FILE)]).await?))
    }

    fn mirror(&self, project: ProjectId) -> PathBuf {
        self.mirrors.join(format!("{}.git", project.0.simple()))
    }

    /// Updates the project's mirror; returns each branch's head.
    async fn fetch(&self, project: ProjectId, url: &str) -> anyhow::Result<BTreeMap<String, CommitSha>> {
        let mirror = self.mirror(project);
        if !mirror.join("HEAD").exists() {
            std::fs::create_dir_all(&mirror)?;
            git(&mirror, &["init", "--quiet", "--bare"]).await?;
        }
        git(&mirror, &["fetch", "--quiet", "--prune", "--no-tags", url, "+refs/heads/*:refs/heads/*", "+refs/tags/*:refs/tags/*"]).await?;
        let listing = git(&mirror, &["for-each-ref", "--format=%(refname:short) %(objectname)", "refs/heads"]).await?;
        let mut heads = BTreeMap::new();
        for line in listing.lines() {
            if let Some((branch, sha)) = line.split_once(' ') {
                if let Ok(sha) = CommitSha::parse(sha) {
                    heads.insert(branch.to_string(), sha);
                }
            }
        }
        Ok(heads)
    }

    async fn root_files(&self, project: ProjectId, sha: &CommitSha) -> anyhow::Result<Vec<String>> {
        let listing = git(&self.mirror(project), &["ls-tree", "--name-only", sha.as_str()]).await?;
        Ok(listing.lines().map(str::to_string).collect())
    }
}

async fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let output = tokio::time::timeout(
        Duration::from_secs(120),
        Command::new("git").args(args).current_dir(dir).env("GIT_TERMINAL_PROMPT", "0").kill_on_drop(true).output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("git {} timed out", args[0]))??;
    anyhow::ensure!(output.status.success(), "git {}: {}", args[0], String::from_utf8_lossy(&output.stderr).trim());
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
