//! The sticky PR comment.
//!
//! [`PrComments`] is a projection: each event that changes what a pull request's comment shows
//! marks the pull request dirty in `pr_comment_outbox`, in the projector's transaction.
//! [`CommentWriter`] is the reactor: it takes one dirty pull request at a time (row-locked, so
//! two writers never race on one), renders the comment from the `environments` read model once
//! that has caught up, and creates or edits the one comment on GitHub. The comment is found again
//! by its marker on a comment of our own App, so a crash after GitHub answered never makes a
//! second one. After a write the pull request rests a second: at most one write per pull request
//! per second, and the last state always wins.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sha2_hash::sha256_hex;
use sqlx::PgConnection;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use understudy_adapters::github::client::{GitHub, GitHubError};
use understudy_adapters::{EventStore, LoggedEvent};
use understudy_domain::account::AccountKind;
use understudy_domain::environment::{EnvironmentEvent, EnvironmentStatus, TestOutcome};
use understudy_domain::ids::ProjectId;
use understudy_domain::pr_comment::{self, CommentContext, CommentRow};
use understudy_domain::pull_request::PullRequestEvent;
use understudy_domain::values::Target;
use uuid::Uuid;

use crate::{AnyEvent, Change, Projection, ProjectionError, Tables};

mod sha2_hash {
    /// Hex SHA-256, to tell whether a rendered body changed since the last write.
    pub fn sha256_hex(text: &str) -> String {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(text.as_bytes()))
    }
}

pub struct PrComments;

async fn mark_dirty(conn: &mut PgConnection, tables: &Tables, project: Uuid, number: i64, position: i64) -> sqlx::Result<()> {
    sqlx::query(&format!(
        "INSERT INTO {} (project_id, pr_number, dirty_position) VALUES ($1, $2, $3)
         ON CONFLICT (project_id, pr_number) DO UPDATE SET dirty_position = EXCLUDED.dirty_position",
        tables.name("pr_comment_outbox")
    ))
    .bind(project)
    .bind(number)
    .bind(position)
    .execute(conn)
    .await?;
    Ok(())
}

#[async_trait]
impl Projection for PrComments {
    fn name(&self) -> &'static str {
        "pr_comments"
    }

    fn tables(&self) -> &'static [&'static str] {
        &["pr_comment_outbox", "pr_comment_environments"]
    }

    async fn apply(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        event: &LoggedEvent,
        decoded: &AnyEvent,
    ) -> Result<Vec<Change>, ProjectionError> {
        match decoded {
            AnyEvent::PullRequest(PullRequestEvent::PullRequestOpened { project_id, number, .. }) => {
                mark_dirty(conn, tables, project_id.0, *number as i64, event.position).await?;
            }
            AnyEvent::PullRequest(_) => {
                // Which project and number: the aggregate's first event said; the outbox row has it.
                sqlx::query(&format!(
                    "UPDATE {} o SET dirty_position = $2 FROM event_log e
                     WHERE e.aggregate_id = $1 AND e.aggregate_version = 1
                       AND o.project_id = (e.payload->>'project_id')::uuid AND o.pr_number = (e.payload->>'number')::bigint",
                    tables.name("pr_comment_outbox")
                ))
                .bind(event.aggregate_id)
                .bind(event.position)
                .execute(&mut *conn)
                .await?;
            }
            AnyEvent::Environment(EnvironmentEvent::EnvironmentCreated { spec, .. }) => {
                if let Target::PullRequest { number, .. } = spec.target {
                    sqlx::query(&format!(
                        "INSERT INTO {} (environment_id, project_id, pr_number) VALUES ($1, $2, $3)",
                        tables.name("pr_comment_environments")
                    ))
                    .bind(event.aggregate_id)
                    .bind(spec.project_id.0)
                    .bind(number as i64)
                    .execute(&mut *conn)
                    .await?;
                    mark_dirty(conn, tables, spec.project_id.0, number as i64, event.position).await?;
                }
            }
            AnyEvent::Environment(_) => {
                let pr: Option<(Uuid, i64)> = sqlx::query_as(&format!(
                    "SELECT project_id, pr_number FROM {} WHERE environment_id = $1",
                    tables.name("pr_comment_environments")
                ))
                .bind(event.aggregate_id)
                .fetch_optional(&mut *conn)
                .await?;
                if let Some((project, number)) = pr {
                    mark_dirty(conn, tables, project, number, event.position).await?;
                }
            }
            AnyEvent::Account(_) | AnyEvent::Project(_) => {}
        }
        Ok(vec![])
    }
}

/// Writes dirty pull requests' comments to GitHub.
pub struct CommentWriter {
    pub store: EventStore,
    pub github: GitHub,
    /// Understudy's public URL, for the comment's links.
    pub public_url: String,
    /// Rest between two writes of one pull request's comment.
    pub debounce: Duration,
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    GitHub(#[from] GitHubError),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error("{0}")]
    Unwritable(String),
}

impl CommentWriter {
    pub async fn run(self, wake: Arc<Notify>, cancel: CancellationToken) {
        loop {
            let wrote = match self.write_next().await {
                Ok(wrote) => wrote,
                Err(error) => {
                    tracing::warn!(error = %error, "comment writer failed; retrying");
                    false
                }
            };
            if !wrote {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
            } else if cancel.is_cancelled() {
                return;
            }
        }
    }

    /// Writes the comment of the most overdue dirty pull request; `false` when none is due.
    pub async fn write_next(&self) -> sqlx::Result<bool> {
        let mut tx = self.store.pool.begin().await?;
        let due: Option<(Uuid, i64, i64, i32)> = sqlx::query_as(
            "SELECT project_id, pr_number, dirty_position, attempts FROM pr_comment_outbox
             WHERE dirty_position > written_position AND next_attempt_at <= now()
               AND dirty_position <= (SELECT position FROM projector_checkpoints WHERE projection = 'environments')
             ORDER BY next_attempt_at LIMIT 1 FOR UPDATE SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some((project, number, dirty, attempts)) = due else {
            return Ok(false);
        };
        match self.write(&mut tx, ProjectId(project), number).await {
            Ok(()) => {
                sqlx::query(
                    "UPDATE pr_comment_outbox SET written_position = $3, attempts = 0, last_error = NULL,
                         next_attempt_at = now() + make_interval(secs => $4)
                     WHERE project_id = $1 AND pr_number = $2",
                )
                .bind(project)
                .bind(number)
                .bind(dirty)
                .bind(self.debounce.as_secs_f64())
                .execute(&mut *tx)
                .await?;
            }
            Err(error) => {
                let wait = match &error {
                    WriteError::GitHub(GitHubError::RateLimited { retry_after }) => *retry_after,
                    _ => Duration::from_millis(500 * 2u64.pow((attempts as u32).min(7))),
                };
                tracing::warn!(project = %project, pr = number, error = %error, ?wait, "PR comment not written; will retry");
                sqlx::query(
                    "UPDATE pr_comment_outbox SET attempts = attempts + 1, last_error = $3, next_attempt_at = now() + make_interval(secs => $4)
                     WHERE project_id = $1 AND pr_number = $2",
                )
                .bind(project)
                .bind(number)
                .bind(error.to_string())
                .bind(wait.as_secs_f64())
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await?;
        Ok(true)
    }

    async fn write(&self, tx: &mut PgConnection, project_id: ProjectId, number: i64) -> Result<(), WriteError> {
        let load_error = |e: esrs::store::postgres::PgStoreError| WriteError::Unwritable(format!("loading: {e}"));
        let project = self.store.projects.load(project_id.0).await.map_err(load_error)?.into_inner();
        let (Some(account_id), Some(name), Some(repository)) = (project.account_id, project.name, project.repository) else {
            return Err(WriteError::Unwritable(format!("project {project_id} does not exist")));
        };
        let account = self.store.accounts.load(account_id.0).await.map_err(load_error)?.into_inner();
        let Some(installation) = account.installation_id else {
            return Err(WriteError::Unwritable(format!("account {account_id} has no GitHub App installation")));
        };
        let account_name = match account.kind {
            Some(AccountKind::Personal { github_login, .. }) => github_login,
            Some(AccountKind::Team { name }) => name,
            None => return Err(WriteError::Unwritable(format!("account {account_id} does not exist"))),
        };
        let rows: Vec<(String, String, String, sqlx::types::Json<Vec<TestRow>>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
            "SELECT entrypoint, branch, status, tests, updated_at FROM environments WHERE project_id = $1 AND pull_request = $2",
        )
        .bind(project_id.0)
        .bind(number)
        .fetch_all(&mut *tx)
        .await?;
        let rows: Vec<CommentRow> = rows
            .into_iter()
            .map(|(entrypoint, branch, status, tests, updated_at)| CommentRow {
                entrypoint,
                branch,
                status: EnvironmentStatus::parse(&status).unwrap_or(EnvironmentStatus::Requested),
                tests: tests.0.into_iter().map(|t| (t.name, t.outcome)).collect(),
                updated_at,
            })
            .collect();
        let context = CommentContext {
            public_url: self.public_url.trim_end_matches('/').to_string(),
            account: account_name,
            project: name.to_string(),
            project_id,
            number: number as u64,
        };
        let body = pr_comment::render(&context, &rows);
        let hash = sha256_hex(&body);
        let repository = repository.to_string();
        let known: Option<(i64, Option<String>)> =
            sqlx::query_as("SELECT comment_id, body_sha256 FROM github_comments WHERE project_id = $1 AND pr_number = $2")
                .bind(project_id.0)
                .bind(number)
                .fetch_optional(&mut *tx)
                .await?;
        let issue = number as u64;
        let comment_id = match known {
            Some((_, Some(written))) if written == hash => return Ok(()),
            Some((id, _)) => match self.github.update_comment(installation, &repository, id as u64, &body).await {
                Ok(()) => id as u64,
                // Someone deleted it: make it again.
                Err(GitHubError::NotFound(_)) => self.github.create_comment(installation, &repository, issue, &body).await?,
                Err(error) => return Err(error.into()),
            },
            None => match self.github.find_comment(installation, &repository, issue, &pr_comment::marker(project_id, issue)).await? {
                Some(id) => {
                    self.github.update_comment(installation, &repository, id, &body).await?;
                    id
                }
                None => self.github.create_comment(installation, &repository, issue, &body).await?,
            },
        };
        sqlx::query(
            "INSERT INTO github_comments (project_id, pr_number, comment_id, body_sha256) VALUES ($1, $2, $3, $4)
             ON CONFLICT (project_id, pr_number) DO UPDATE SET comment_id = EXCLUDED.comment_id, body_sha256 = EXCLUDED.body_sha256",
        )
        .bind(project_id.0)
        .bind(number)
        .bind(comment_id as i64)
        .bind(hash)
        .execute(&mut *tx)
        .await?;
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct TestRow {
    name: String,
    outcome: TestOutcome,
}
