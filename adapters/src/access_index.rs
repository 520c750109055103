//! The access index: users, their sessions and API tokens, accounts and their members and
//! invitations, and projects, as tables the API checks on every request.
//!
//! It is written by the event store in the same transaction as the events that change it: a
//! session that was ended or a member who was removed loses access with the commit, not when a
//! projector catches up. The same [`apply`] rebuilds
//! it from the global log ([`rebuild`]), so it is a read model like the others.

use sqlx::{PgConnection, PgPool};
use understudy_domain::account::{AccountEvent, AccountKind};
use understudy_domain::project::ProjectEvent;
use understudy_domain::user::UserEvent;
use uuid::Uuid;

/// The tables of the index, emptied by [`rebuild`].
pub const TABLES: &[&str] = &["users", "user_sessions", "api_tokens", "accounts", "account_members", "account_invitations", "projects"];

/// Whether events of this aggregate type change the index.
pub fn indexes(aggregate_type: &str) -> bool {
    matches!(aggregate_type, "user" | "account" | "project")
}

/// Applies one event of `aggregate_type` (its bare JSON payload) to the index.
pub async fn apply(
    connection: &mut PgConnection,
    aggregate_type: &str,
    aggregate_id: Uuid,
    payload: &serde_json::Value,
) -> sqlx::Result<()> {
    let decode_error = |e: serde_json::Error| sqlx::Error::Decode(Box::new(e));
    match aggregate_type {
        "user" => apply_user(connection, aggregate_id, serde_json::from_value(payload.clone()).map_err(decode_error)?).await,
        "account" => apply_account(connection, aggregate_id, serde_json::from_value(payload.clone()).map_err(decode_error)?).await,
        "project" => apply_project(connection, aggregate_id, serde_json::from_value(payload.clone()).map_err(decode_error)?).await,
        _ => Ok(()),
    }
}

async fn apply_user(c: &mut PgConnection, user_id: Uuid, event: UserEvent) -> sqlx::Result<()> {
    match event {
        UserEvent::UserSignedUp { github_id, login, name, at, .. } => {
            sqlx::query(
                "INSERT INTO users (user_id, github_id, login, name, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (user_id) DO UPDATE SET login = EXCLUDED.login, name = EXCLUDED.name",
            )
            .bind(user_id)
            .bind(github_id as i64)
            .bind(login)
            .bind(name)
            .bind(at)
            .execute(c)
            .await?;
        }
        UserEvent::UserLoginChanged { login, .. } => {
            sqlx::query("UPDATE users SET login = $2 WHERE user_id = $1").bind(user_id).bind(login).execute(c).await?;
        }
        UserEvent::SessionStarted { session_id, github_token, expires_at, at } => {
            sqlx::query(
                "INSERT INTO user_sessions (session_id, user_id, github_token, started_at, expires_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (session_id) DO NOTHING",
            )
            .bind(session_id)
            .bind(user_id)
            .bind(sqlx::types::Json(github_token))
            .bind(at)
            .bind(expires_at)
            .execute(&mut *c)
            .await?;
            // Expired sessions are of no use to anyone: they go when their user signs in again.
            sqlx::query("DELETE FROM user_sessions WHERE user_id = $1 AND expires_at < $2").bind(user_id).bind(at).execute(c).await?;
        }
        UserEvent::SessionEnded { session_id, at } => {
            sqlx::query("UPDATE user_sessions SET ended_at = $2 WHERE session_id = $1 AND ended_at IS NULL")
                .bind(session_id)
                .bind(at)
                .execute(c)
                .await?;
        }
        UserEvent::SessionTokenResealed { session_id, github_token, .. } => {
            sqlx::query("UPDATE user_sessions SET github_token = $2 WHERE session_id = $1")
                .bind(session_id)
                .bind(sqlx::types::Json(github_token))
                .execute(c)
                .await?;
        }
        UserEvent::ApiTokenCreated { token_id, name, hash, at } => {
            sqlx::query(
                "INSERT INTO api_tokens (token_id, user_id, name, hash, created_at) VALUES ($1, $2, $3, $4, $5)
                 ON CONFLICT (token_id) DO NOTHING",
            )
            .bind(token_id)
            .bind(user_id)
            .bind(name)
            .bind(hash)
            .bind(at)
            .execute(c)
            .await?;
        }
        UserEvent::ApiTokenRevoked { token_id, at } => {
            sqlx::query("UPDATE api_tokens SET revoked_at = $2 WHERE token_id = $1 AND revoked_at IS NULL")
                .bind(token_id)
                .bind(at)
                .execute(c)
                .await?;
        }
    }
    Ok(())
}

async fn apply_account(c: &mut PgConnection, account_id: Uuid, event: AccountEvent) -> sqlx::Result<()> {
    match event {
        AccountEvent::AccountCreated { kind, at, .. } => {
            let (kind, name) = match kind {
                AccountKind::Personal { github_login, .. } => ("personal", github_login),
                AccountKind::Team { name } => ("team", name),
            };
            sqlx::query(
                "INSERT INTO accounts (account_id, kind, name, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (account_id) DO NOTHING",
            )
            .bind(account_id)
            .bind(kind)
            .bind(name)
            .bind(at)
            .execute(c)
            .await?;
        }
        AccountEvent::MemberAdded { user_id, role, .. } | AccountEvent::MemberRoleChanged { user_id, role, .. } => {
            sqlx::query(
                "INSERT INTO account_members (account_id, user_id, role) VALUES ($1, $2, $3)
                 ON CONFLICT (account_id, user_id) DO UPDATE SET role = EXCLUDED.role",
            )
            .bind(account_id)
            .bind(user_id.0)
            .bind(role.as_str())
            .execute(c)
            .await?;
        }
        AccountEvent::MemberRemoved { user_id, .. } => {
            sqlx::query("DELETE FROM account_members WHERE account_id = $1 AND user_id = $2")
                .bind(account_id)
                .bind(user_id.0)
                .execute(c)
                .await?;
        }
        AccountEvent::MemberInvited { login, role, at } => {
            sqlx::query(
                "INSERT INTO account_invitations (account_id, login, role, invited_at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (account_id, login) DO UPDATE SET role = EXCLUDED.role, invited_at = EXCLUDED.invited_at",
            )
            .bind(account_id)
            .bind(login)
            .bind(role.as_str())
            .bind(at)
            .execute(c)
            .await?;
        }
        AccountEvent::InvitationRevoked { login, .. } | AccountEvent::InvitationAccepted { login, .. } => {
            sqlx::query("DELETE FROM account_invitations WHERE account_id = $1 AND login = $2")
                .bind(account_id)
                .bind(login)
                .execute(c)
                .await?;
        }
        AccountEvent::AccountDeleted { .. } => {
            sqlx::query("UPDATE accounts SET deleted = true WHERE account_id = $1").bind(account_id).execute(&mut *c).await?;
            sqlx::query("DELETE FROM account_members WHERE account_id = $1").bind(account_id).execute(&mut *c).await?;
            sqlx::query("DELETE FROM account_invitations WHERE account_id = $1").bind(account_id).execute(c).await?;
        }
        AccountEvent::InstallationLinked { .. } | AccountEvent::InstallationUnlinked { .. } | AccountEvent::BillingDetailsSet { .. } => {}
    }
    Ok(())
}

async fn apply_project(c: &mut PgConnection, project_id: Uuid, event: ProjectEvent) -> sqlx::Result<()> {
    match event {
        ProjectEvent::ProjectCreated { account_id, name, repository, production_branch, at, .. } => {
            sqlx::query(
                "INSERT INTO projects (project_id, account_id, name, repository, production_branch, active, created_at)
                 VALUES ($1, $2, $3, $4, $5, true, $6) ON CONFLICT (project_id) DO NOTHING",
            )
            .bind(project_id)
            .bind(account_id.0)
            .bind(name.as_str())
            .bind(repository.as_str())
            .bind(production_branch.as_str())
            .bind(at)
            .execute(c)
            .await?;
        }
        ProjectEvent::ProductionBranchChanged { branch, .. } => {
            sqlx::query("UPDATE projects SET production_branch = $2 WHERE project_id = $1")
                .bind(project_id)
                .bind(branch.as_str())
                .execute(c)
                .await?;
        }
        ProjectEvent::ProjectRenamed { name, .. } => {
            sqlx::query("UPDATE projects SET name = $2 WHERE project_id = $1").bind(project_id).bind(name.as_str()).execute(c).await?;
        }
        ProjectEvent::ProjectDeactivated { .. } => {
            sqlx::query("UPDATE projects SET active = false WHERE project_id = $1").bind(project_id).execute(c).await?;
        }
        ProjectEvent::VisibilityChanged { public_previews, .. } => {
            sqlx::query("UPDATE projects SET public_previews = $2 WHERE project_id = $1")
                .bind(project_id)
                .bind(public_previews)
                .execute(c)
                .await?;
        }
        ProjectEvent::GitRemoteSet { url, .. } => {
            sqlx::query("UPDATE projects SET git_url = $2 WHERE project_id = $1").bind(project_id).bind(url).execute(c).await?;
        }
        ProjectEvent::ProjectReactivated { .. } => {
            sqlx::query("UPDATE projects SET active = true WHERE project_id = $1").bind(project_id).execute(c).await?;
        }
        // Tiers as the aggregate keeps them ({name: {spec, frozen?}}): the promoter finds the
        // projects it has work in, and the API lists them, without loading every project.
        ProjectEvent::TierSet { tier, .. } => {
            let spec = serde_json::to_value(&tier).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            sqlx::query(
                "UPDATE projects SET tiers = tiers || jsonb_build_object($2::text,
                     jsonb_strip_nulls(jsonb_build_object('spec', $3::jsonb, 'frozen', tiers->$2->'frozen')))
                 WHERE project_id = $1",
            )
            .bind(project_id)
            .bind(tier.name.as_str())
            .bind(spec)
            .execute(c)
            .await?;
        }
        ProjectEvent::TierRemoved { name, .. } => {
            sqlx::query("UPDATE projects SET tiers = tiers - $2::text WHERE project_id = $1")
                .bind(project_id)
                .bind(name.as_str())
                .execute(c)
                .await?;
        }
        ProjectEvent::TierFrozen { name, by, reason, at } => {
            let freeze =
                serde_json::to_value(understudy_domain::tier::Freeze { by, reason, at }).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
            sqlx::query(
                "UPDATE projects SET tiers = jsonb_set(tiers, ARRAY[$2::text, 'frozen'], $3::jsonb)
                 WHERE project_id = $1 AND tiers ? $2::text",
            )
            .bind(project_id)
            .bind(name.as_str())
            .bind(freeze)
            .execute(c)
            .await?;
        }
        ProjectEvent::TierUnfrozen { name, .. } => {
            sqlx::query("UPDATE projects SET tiers = tiers #- ARRAY[$2::text, 'frozen'] WHERE project_id = $1")
                .bind(project_id)
                .bind(name.as_str())
                .execute(c)
                .await?;
        }
        _ => {}
    }
    Ok(())
}

/// Whether the log holds accounts or projects the index has never seen (a log older than the
/// index): then it must be built before anyone is let in.
pub async fn missing(pool: &PgPool) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM accounts) AND NOT EXISTS (SELECT 1 FROM projects)
            AND EXISTS (SELECT 1 FROM event_log WHERE aggregate_type IN ('account', 'project'))",
    )
    .fetch_one(pool)
    .await
}

/// Rebuilds the whole index from the global log, in one transaction: readers see the old index
/// until the new one is complete. Returns how many events were applied.
pub async fn rebuild(pool: &PgPool) -> sqlx::Result<u64> {
    let mut tx = pool.begin().await?;
    let applied = rebuild_in(&mut tx).await?;
    tx.commit().await?;
    Ok(applied)
}

/// The rebuild, inside the caller's transaction.
async fn rebuild_in(tx: &mut PgConnection) -> sqlx::Result<u64> {
    sqlx::query(&format!("TRUNCATE {}", TABLES.join(", "))).execute(&mut *tx).await?;
    // Every event of these aggregates, numbered or not yet: the TRUNCATE's lock holds back any
    // append that would change the index until this transaction commits, and those appends then
    // apply on top. Per aggregate, insertion order is its version order.
    let rows: Vec<(String, Uuid, serde_json::Value)> = sqlx::query_as(
        "SELECT aggregate_type, aggregate_id, payload FROM event_log
         WHERE aggregate_type IN ('user', 'account', 'project') ORDER BY aggregate_id, aggregate_version",
    )
    .fetch_all(&mut *tx)
    .await?;
    let mut applied = 0u64;
    for (aggregate_type, aggregate_id, payload) in rows {
        apply(&mut *tx, &aggregate_type, aggregate_id, &payload).await?;
        applied += 1;
    }
    Ok(applied)
}

/// Rows of one table of the index that a fresh rebuild does not have (`only_live`), or has
/// and the live index lacks (`only_replayed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub table: &'static str,
    pub only_live: Vec<String>,
    pub only_replayed: Vec<String>,
}

/// Compares the live index with a rebuild from the log, in a transaction that is rolled back:
/// the live index is untouched. Appends that change the index wait for the comparison (it
/// locks the index's tables), so both sides see the same log.
pub async fn verify(pool: &PgPool) -> sqlx::Result<Vec<Difference>> {
    let mut tx = pool.begin().await?;
    sqlx::query(&format!("LOCK TABLE {} IN EXCLUSIVE MODE", TABLES.join(", "))).execute(&mut *tx).await?;
    let live = snapshot(&mut tx).await?;
    rebuild_in(&mut tx).await?;
    let replayed = snapshot(&mut tx).await?;
    tx.rollback().await?;
    Ok(TABLES
        .iter()
        .zip(live.into_iter().zip(replayed))
        .filter(|(_, (live, replayed))| live != replayed)
        .map(|(table, (live, replayed))| Difference {
            table,
            only_live: live.difference(&replayed).cloned().collect(),
            only_replayed: replayed.difference(&live).cloned().collect(),
        })
        .collect())
}

/// Every row of every table of the index, as text, table by table.
async fn snapshot(tx: &mut PgConnection) -> sqlx::Result<Vec<std::collections::BTreeSet<String>>> {
    let mut tables = Vec::with_capacity(TABLES.len());
    for table in TABLES {
        let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT t::text FROM {table} t")).fetch_all(&mut *tx).await?;
        tables.push(rows.into_iter().collect());
    }
    Ok(tables)
}
