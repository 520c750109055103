//! GraphQL for people: the viewer, accounts and teams with their members, invitations and
//! billing, projects' settings and secrets, and API tokens. Every resolver checks the role
//! matrix (`understudy_domain::permissions`) through [`Auth`]; every mutation appends events.

use async_graphql::{Context, ErrorExtensions, Object, Result, SimpleObject};
use chrono::{DateTime, Utc};
use understudy_adapters::CommandError;
use understudy_domain::account::{AccountCommand, AccountKind, Billing};
use understudy_domain::ids::{AccountId, ProjectId, UserId};
use understudy_domain::permissions::{Permission, Role};
use understudy_domain::project::{ProjectCommand, SecretScope};
use understudy_domain::user::UserCommand;
use understudy_domain::values::{BranchName, ProjectName};
use understudy_domain::{DomainError, Metadata};
use uuid::Uuid;

use crate::auth::{Auth, Denied, Viewer};

/// The viewer of this request (nobody when the request carried none).
pub fn viewer(ctx: &Context<'_>) -> Viewer {
    ctx.data_opt::<Viewer>().cloned().unwrap_or(Viewer::Anonymous)
}

pub fn auth<'a>(ctx: &Context<'a>) -> Result<&'a Auth> {
    ctx.data::<Auth>()
}

/// A refusal as a GraphQL error with `extensions.code`.
pub fn denied(denied: Denied) -> async_graphql::Error {
    let code = denied.code();
    async_graphql::Error::new(denied.to_string()).extend_with(|_, e| e.set("code", code))
}

/// A command's failure as a GraphQL error: the domain's refusals are the caller's to fix.
pub fn command_error(error: CommandError) -> async_graphql::Error {
    let code = match &error {
        CommandError::Domain(DomainError::NotFound { .. }) => "NOT_FOUND",
        CommandError::Domain(DomainError::AlreadyExists { .. }) => "ALREADY_EXISTS",
        CommandError::Domain(DomainError::LastOwner { .. }) => "LAST_OWNER",
        CommandError::Domain(_) => "BAD_USER_INPUT",
        CommandError::Conflict { .. } => "CONFLICT",
        CommandError::Store(_) => "INTERNAL",
    };
    async_graphql::Error::new(error.to_string()).extend_with(|_, e| e.set("code", code))
}

pub fn bad_input(message: impl Into<String>) -> async_graphql::Error {
    async_graphql::Error::new(message.into()).extend_with(|_, e| e.set("code", "BAD_USER_INPUT"))
}

fn meta(viewer: &Viewer) -> Metadata {
    Metadata::new(Uuid::new_v4(), viewer.actor())
}

/// The signed-in user, or an UNAUTHENTICATED error (the operator of an open node is no user).
fn signed_in(viewer: &Viewer) -> Result<(UserId, String)> {
    match viewer {
        Viewer::User { user_id, login, .. } => Ok((*user_id, login.clone())),
        _ => Err(denied(Denied::Unauthenticated)),
    }
}

pub async fn require_account(ctx: &Context<'_>, account: Uuid, permission: Permission) -> Result<Option<Role>> {
    auth(ctx)?.require_account(&viewer(ctx), AccountId(account), permission).await.map_err(denied)
}

pub async fn require_project(ctx: &Context<'_>, project: Uuid, permission: Permission) -> Result<()> {
    auth(ctx)?.require_project(&viewer(ctx), ProjectId(project), permission).await.map_err(denied)
}

#[derive(SimpleObject, Clone, Debug)]
pub struct User {
    pub id: Uuid,
    pub login: String,
    pub name: Option<String>,
}

/// The one asking.
#[derive(Clone, Debug)]
pub struct Me {
    user: Option<(UserId, String)>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Membership {
    pub account: Account,
    pub role: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Invitation {
    pub account_id: Uuid,
    pub account_name: String,
    pub login: String,
    pub role: String,
    pub invited_at: DateTime<Utc>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct ApiToken {
    pub id: Uuid,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct CreatedApiToken {
    /// The token itself: shown this once, kept nowhere. Send it as `Authorization: Bearer …`.
    pub token: String,
    pub api_token: ApiToken,
}

#[Object]
impl Me {
    /// Whether this is the operator of an open node (no sign-in configured, loopback only).
    async fn operator(&self) -> bool {
        self.user.is_none()
    }

    async fn user(&self, ctx: &Context<'_>) -> Result<Option<User>> {
        let Some((user_id, _)) = &self.user else { return Ok(None) };
        let row: Option<(Uuid, String, Option<String>)> = sqlx::query_as("SELECT user_id, login, name FROM users WHERE user_id = $1")
            .bind(user_id.0)
            .fetch_optional(&auth(ctx)?.store.pool)
            .await?;
        Ok(row.map(|(id, login, name)| User { id, login, name }))
    }

    /// The accounts (personal and teams) the viewer belongs to, and their role in each.
    async fn memberships(&self, ctx: &Context<'_>) -> Result<Vec<Membership>> {
        let pool = &auth(ctx)?.store.pool;
        let rows: Vec<(Uuid, String, String, String)> = match &self.user {
            Some((user_id, _)) => {
                sqlx::query_as(
                    "SELECT a.account_id, a.kind, a.name, m.role FROM account_members m JOIN accounts a USING (account_id)
                     WHERE m.user_id = $1 AND NOT a.deleted ORDER BY a.kind, lower(a.name)",
                )
                .bind(user_id.0)
                .fetch_all(pool)
                .await?
            }
            None => {
                sqlx::query_as("SELECT account_id, kind, name, 'Owner' FROM accounts WHERE NOT deleted ORDER BY kind, lower(name)")
                    .fetch_all(pool)
                    .await?
            }
        };
        Ok(rows.into_iter().map(|(id, kind, name, role)| Membership { account: Account { id, kind, name }, role }).collect())
    }

    /// Invitations waiting for the viewer's GitHub login.
    async fn invitations(&self, ctx: &Context<'_>) -> Result<Vec<Invitation>> {
        let Some((_, login)) = &self.user else { return Ok(vec![]) };
        invitations(&auth(ctx)?.store.pool, None, Some(&login.to_ascii_lowercase())).await
    }

    /// The viewer's API tokens (never the tokens themselves).
    async fn api_tokens(&self, ctx: &Context<'_>) -> Result<Vec<ApiToken>> {
        let Some((user_id, _)) = &self.user else { return Ok(vec![]) };
        let rows: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT token_id, name, created_at FROM api_tokens WHERE user_id = $1 AND revoked_at IS NULL ORDER BY created_at",
        )
        .bind(user_id.0)
        .fetch_all(&auth(ctx)?.store.pool)
        .await?;
        Ok(rows.into_iter().map(|(id, name, created_at)| ApiToken { id, name, created_at }).collect())
    }
}

async fn invitations(pool: &sqlx::PgPool, account: Option<Uuid>, login: Option<&str>) -> Result<Vec<Invitation>> {
    let rows: Vec<(Uuid, String, String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT i.account_id, a.name, i.login, i.role, i.invited_at FROM account_invitations i JOIN accounts a USING (account_id)
         WHERE ($1::uuid IS NULL OR i.account_id = $1) AND ($2::text IS NULL OR i.login = $2) AND NOT a.deleted
         ORDER BY i.invited_at",
    )
    .bind(account)
    .bind(login)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(account_id, account_name, login, role, invited_at)| Invitation { account_id, account_name, login, role, invited_at })
        .collect())
}

/// A personal account or a team.
#[derive(Clone, Debug)]
pub struct Account {
    pub id: Uuid,
    /// `personal` or `team`.
    pub kind: String,
    pub name: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct Member {
    pub user_id: Uuid,
    pub login: Option<String>,
    pub role: String,
}

/// Billing details, as every member sees them: the card is only ever its last four digits.
#[derive(SimpleObject, Clone, Debug)]
pub struct BillingDetails {
    pub holder: String,
    /// `•••• •••• •••• 4242`
    pub card: String,
    pub email: String,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct ProjectSummary {
    pub id: Uuid,
    pub name: String,
    pub repository: String,
    pub production_branch: String,
    pub active: bool,
    /// Whether its previews are open to anyone with the link.
    pub public_previews: bool,
}

#[Object]
impl Account {
    async fn id(&self) -> Uuid {
        self.id
    }
    async fn kind(&self) -> &str {
        &self.kind
    }
    async fn name(&self) -> &str {
        &self.name
    }

    /// Members and their roles (View Users).
    async fn members(&self, ctx: &Context<'_>) -> Result<Vec<Member>> {
        require_account(ctx, self.id, Permission::ViewUsers).await?;
        let rows: Vec<(Uuid, Option<String>, String)> = sqlx::query_as(
            "SELECT m.user_id, u.login, m.role FROM account_members m LEFT JOIN users u USING (user_id)
             WHERE m.account_id = $1 ORDER BY m.role, u.login",
        )
        .bind(self.id)
        .fetch_all(&auth(ctx)?.store.pool)
        .await?;
        Ok(rows.into_iter().map(|(user_id, login, role)| Member { user_id, login, role }).collect())
    }

    /// Invitations not yet accepted (View Users).
    async fn invitations(&self, ctx: &Context<'_>) -> Result<Vec<Invitation>> {
        require_account(ctx, self.id, Permission::ViewUsers).await?;
        invitations(&auth(ctx)?.store.pool, Some(self.id), None).await
    }

    /// Billing details, mangled (View Billing).
    async fn billing(&self, ctx: &Context<'_>) -> Result<Option<BillingDetails>> {
        require_account(ctx, self.id, Permission::ViewBilling).await?;
        let state = auth(ctx)?.store.accounts.load(self.id).await?.into_inner();
        Ok(state.billing.map(|b| BillingDetails { card: b.card_display(), holder: b.holder, email: b.email }))
    }

    /// The account's projects (View Projects).
    async fn projects(&self, ctx: &Context<'_>) -> Result<Vec<ProjectSummary>> {
        require_account(ctx, self.id, Permission::ViewProjects).await?;
        let rows: Vec<(Uuid, String, String, String, bool, bool)> = sqlx::query_as(
            "SELECT project_id, name, repository, production_branch, active, public_previews FROM projects WHERE account_id = $1 ORDER BY lower(name)",
        )
        .bind(self.id)
        .fetch_all(&auth(ctx)?.store.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(id, name, repository, production_branch, active, public_previews)| ProjectSummary {
                id,
                name,
                repository,
                production_branch,
                active,
                public_previews,
            })
            .collect())
    }
}

/// A project's settings.
#[derive(Clone, Debug)]
pub struct ProjectSettings {
    pub id: Uuid,
}

#[derive(SimpleObject, Clone, Debug)]
pub struct SecretName {
    pub name: String,
    /// `all`, `production` or `preview`.
    pub scope: String,
    pub updated_at: DateTime<Utc>,
}

#[Object]
impl ProjectSettings {
    async fn id(&self) -> Uuid {
        self.id
    }

    async fn summary(&self, ctx: &Context<'_>) -> Result<Option<ProjectSummary>> {
        let row: Option<(Uuid, String, String, String, bool, bool)> = sqlx::query_as(
            "SELECT project_id, name, repository, production_branch, active, public_previews FROM projects WHERE project_id = $1",
        )
        .bind(self.id)
        .fetch_optional(&auth(ctx)?.store.pool)
        .await?;
        Ok(row.map(|(id, name, repository, production_branch, active, public_previews)| ProjectSummary {
            id,
            name,
            repository,
            production_branch,
            active,
            public_previews,
        }))
    }

    /// Where its notifications go (View Settings).
    async fn notification_targets(&self, ctx: &Context<'_>) -> Result<Vec<crate::tiers::NotificationTarget>> {
        require_project(ctx, self.id, Permission::ViewSettings).await?;
        crate::tiers::notification_targets(ctx, self.id).await
    }

    /// Its latest notifications and how their delivery went, newest first (View Settings).
    async fn notification_deliveries(
        &self,
        ctx: &Context<'_>,
        #[graphql(default = 50)] first: i32,
    ) -> Result<Vec<crate::tiers::NotificationDelivery>> {
        require_project(ctx, self.id, Permission::ViewSettings).await?;
        crate::tiers::notification_deliveries(ctx, self.id, first).await
    }

    /// Its tiers (dev, staging, production…), in name order.
    async fn tiers(&self, ctx: &Context<'_>) -> Result<Vec<crate::tiers::Tier>> {
        crate::tiers::tiers_of(ctx, self.id).await
    }

    /// Secrets' names, scopes and when they were set; never their values (View Settings).
    async fn secrets(&self, ctx: &Context<'_>) -> Result<Vec<SecretName>> {
        require_project(ctx, self.id, Permission::ViewSettings).await?;
        let state = auth(ctx)?.store.projects.load(self.id).await?.into_inner();
        Ok(state
            .secrets
            .iter()
            .map(|(name, s)| SecretName { name: name.clone(), scope: s.scope.as_str().to_string(), updated_at: s.updated_at })
            .collect())
    }
}

#[derive(Default)]
pub struct AccountQuery;

#[Object]
impl AccountQuery {
    /// Who is asking. Null when nobody signed in.
    async fn viewer(&self, ctx: &Context<'_>) -> Option<Me> {
        match viewer(ctx) {
            Viewer::Anonymous => None,
            Viewer::Operator => Some(Me { user: None }),
            Viewer::User { user_id, login, .. } => Some(Me { user: Some((user_id, login)) }),
        }
    }

    /// An account the viewer belongs to.
    async fn account(&self, ctx: &Context<'_>, id: Uuid) -> Result<Account> {
        require_account(ctx, id, Permission::ViewProjects).await?;
        let row: Option<(Uuid, String, String)> =
            sqlx::query_as("SELECT account_id, kind, name FROM accounts WHERE account_id = $1 AND NOT deleted")
                .bind(id)
                .fetch_optional(&auth(ctx)?.store.pool)
                .await?;
        let (id, kind, name) = row.ok_or_else(|| denied(Denied::NotFound(format!("no account {id}"))))?;
        Ok(Account { id, kind, name })
    }

    /// A project's settings (View Projects).
    async fn project(&self, ctx: &Context<'_>, id: Uuid) -> Result<ProjectSettings> {
        require_project(ctx, id, Permission::ViewProjects).await?;
        Ok(ProjectSettings { id })
    }
}

/// The Luhn check of a card number (digits and spaces); its last four digits when it passes.
pub fn card_last4(number: &str) -> Option<String> {
    let digits: Vec<u32> = number.chars().filter(|c| !c.is_whitespace() && *c != '-').map(|c| c.to_digit(10)).collect::<Option<_>>()?;
    if !(12..=19).contains(&digits.len()) {
        return None;
    }
    let sum: u32 = digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, &d)| {
            if i % 2 == 1 {
                if d * 2 > 9 {
                    d * 2 - 9
                } else {
                    d * 2
                }
            } else {
                d
            }
        })
        .sum();
    sum.is_multiple_of(10).then(|| digits[digits.len() - 4..].iter().map(|d| char::from_digit(*d, 10).unwrap_or('0')).collect())
}

fn parse_role(role: &str) -> Result<Role> {
    Role::parse(role).ok_or_else(|| bad_input(format!("role {role:?} is not one of Owner, Admin, Member, Billing")))
}

#[derive(SimpleObject, Clone, Debug)]
pub struct DeploymentApproval {
    pub deployment_id: Uuid,
    pub environment_id: Uuid,
    /// The deployment's status after the approval (`Requested`: a worker builds it next).
    pub status: String,
}

#[derive(Default)]
pub struct Mutation;

#[Object]
impl Mutation {
    /// Creates a team; the viewer becomes its Owner.
    async fn create_team(&self, ctx: &Context<'_>, name: String) -> Result<Account> {
        let viewer = viewer(ctx);
        let (user_id, _) = signed_in(&viewer)?;
        let id = AccountId(Uuid::new_v4());
        let command = AccountCommand::Create {
            account_id: id,
            kind: AccountKind::Team { name: name.trim().to_string() },
            creator: user_id,
            at: Utc::now(),
        };
        auth(ctx)?.store.accounts.execute(id.0, command, meta(&viewer)).await.map_err(command_error)?;
        Ok(Account { id: id.0, kind: "team".into(), name: name.trim().to_string() })
    }

    /// Invites a GitHub login to a team with a role (Manage Users; only an Owner invites Owners).
    async fn invite_member(&self, ctx: &Context<'_>, account_id: Uuid, login: String, role: String) -> Result<Vec<Invitation>> {
        let role = parse_role(&role)?;
        let mine = require_account(ctx, account_id, Permission::ManageUsers).await?;
        if mine.is_some_and(|mine| !mine.may_assign(None, Some(role))) {
            return Err(denied(Denied::Forbidden("only an Owner can make someone an Owner".into())));
        }
        let pool = &auth(ctx)?.store.pool;
        let already: Option<String> = sqlx::query_scalar(
            "SELECT m.role FROM account_members m JOIN users u USING (user_id) WHERE m.account_id = $1 AND lower(u.login) = lower($2)",
        )
        .bind(account_id)
        .bind(&login)
        .fetch_optional(pool)
        .await?;
        if let Some(current) = already {
            return Err(bad_input(format!("{login} is already a member ({current}); change their role instead")));
        }
        let command = AccountCommand::Invite { login, role, at: Utc::now() };
        auth(ctx)?.store.accounts.execute(account_id, command, meta(&viewer(ctx))).await.map_err(command_error)?;
        invitations(pool, Some(account_id), None).await
    }

    async fn revoke_invitation(&self, ctx: &Context<'_>, account_id: Uuid, login: String) -> Result<bool> {
        require_account(ctx, account_id, Permission::ManageUsers).await?;
        let command = AccountCommand::RevokeInvitation { login, at: Utc::now() };
        auth(ctx)?.store.accounts.execute(account_id, command, meta(&viewer(ctx))).await.map_err(command_error)?;
        Ok(true)
    }

    /// Accepts the invitation to the viewer's GitHub login.
    async fn accept_invitation(&self, ctx: &Context<'_>, account_id: Uuid) -> Result<Membership> {
        let viewer = viewer(ctx);
        let (user_id, login) = signed_in(&viewer)?;
        let command = AccountCommand::AcceptInvitation { user_id, login, at: Utc::now() };
        let done = auth(ctx)?.store.accounts.execute(account_id, command, meta(&viewer)).await.map_err(command_error)?;
        let role = done.state.role_of(user_id).map(Role::as_str).unwrap_or("Member").to_string();
        let name = match done.state.kind {
            Some(AccountKind::Team { name }) => name,
            Some(AccountKind::Personal { github_login, .. }) => github_login,
            None => String::new(),
        };
        Ok(Membership { account: Account { id: account_id, kind: "team".into(), name }, role })
    }

    /// Changes a member's role (Manage Users; only an Owner makes or unmakes an Owner; a team
    /// keeps at least one Owner).
    async fn change_role(&self, ctx: &Context<'_>, account_id: Uuid, user_id: Uuid, role: String) -> Result<Member> {
        let role = parse_role(&role)?;
        let mine = require_account(ctx, account_id, Permission::ManageUsers).await?;
        let auth = auth(ctx)?;
        let current = auth.role_in(UserId(user_id), AccountId(account_id)).await?;
        let Some(current) = current else { return Err(denied(Denied::NotFound(format!("{user_id} is not a member")))) };
        if mine.is_some_and(|mine| !mine.may_assign(Some(current), Some(role))) {
            return Err(denied(Denied::Forbidden("only an Owner can make or unmake an Owner".into())));
        }
        let command = AccountCommand::ChangeRole { user_id: UserId(user_id), role, at: Utc::now() };
        auth.store.accounts.execute(account_id, command, meta(&viewer(ctx))).await.map_err(command_error)?;
        let login: Option<String> =
            sqlx::query_scalar("SELECT login FROM users WHERE user_id = $1").bind(user_id).fetch_optional(&auth.store.pool).await?;
        Ok(Member { user_id, login, role: role.as_str().to_string() })
    }

    /// Removes a member (Manage Users, or anyone leaving by themselves; a team keeps an Owner).
    async fn remove_member(&self, ctx: &Context<'_>, account_id: Uuid, user_id: Uuid) -> Result<bool> {
        let viewer = viewer(ctx);
        let auth = auth(ctx)?;
        let leaving = viewer.user_id() == Some(UserId(user_id));
        if !leaving {
            let mine = require_account(ctx, account_id, Permission::ManageUsers).await?;
            let current = auth.role_in(UserId(user_id), AccountId(account_id)).await?;
            let Some(current) = current else { return Err(denied(Denied::NotFound(format!("{user_id} is not a member")))) };
            if mine.is_some_and(|mine| !mine.may_assign(Some(current), None)) {
                return Err(denied(Denied::Forbidden("only an Owner can remove an Owner".into())));
            }
        } else {
            require_account(ctx, account_id, Permission::ViewUsers).await?;
        }
        let command = AccountCommand::RemoveMember { user_id: UserId(user_id), at: Utc::now() };
        auth.store.accounts.execute(account_id, command, meta(&viewer)).await.map_err(command_error)?;
        Ok(true)
    }

    /// Deletes a team (its Owners only).
    async fn delete_team(&self, ctx: &Context<'_>, account_id: Uuid) -> Result<bool> {
        let viewer = viewer(ctx);
        let (user_id, _) = signed_in(&viewer)?;
        require_account(ctx, account_id, Permission::ViewProjects).await?;
        let command = AccountCommand::Delete { by: user_id, at: Utc::now() };
        auth(ctx)?.store.accounts.execute(account_id, command, meta(&viewer)).await.map_err(command_error)?;
        Ok(true)
    }

    /// Sets billing details (Manage Billing). Only the card's last four digits are kept.
    async fn set_billing(
        &self,
        ctx: &Context<'_>,
        account_id: Uuid,
        holder: String,
        card_number: String,
        email: String,
    ) -> Result<BillingDetails> {
        require_account(ctx, account_id, Permission::ManageBilling).await?;
        let last4 = card_last4(&card_number).ok_or_else(|| bad_input("cardNumber is not a valid card number (12 to 19 digits, Luhn)"))?;
        let billing = Billing::new(&holder, &last4, &email).map_err(|e| bad_input(e.to_string()))?;
        let command = AccountCommand::SetBilling { billing: billing.clone(), at: Utc::now() };
        auth(ctx)?.store.accounts.execute(account_id, command, meta(&viewer(ctx))).await.map_err(command_error)?;
        Ok(BillingDetails { card: billing.card_display(), holder: billing.holder, email: billing.email })
    }

    /// Changes a project's production branch, name, and whether its previews are open to anyone
    /// with the link (Manage Projects).
    async fn update_project(
        &self,
        ctx: &Context<'_>,
        project_id: Uuid,
        production_branch: Option<String>,
        name: Option<String>,
        public_previews: Option<bool>,
    ) -> Result<ProjectSettings> {
        require_project(ctx, project_id, Permission::ManageProjects).await?;
        let store = &auth(ctx)?.store;
        let meta = meta(&viewer(ctx));
        if let Some(branch) = production_branch {
            let branch = BranchName::parse(branch).map_err(|e| bad_input(e.to_string()))?;
            let command = ProjectCommand::ChangeProductionBranch { branch, at: Utc::now() };
            store.projects.execute(project_id, command, meta.clone()).await.map_err(command_error)?;
        }
        if let Some(name) = name {
            let name = ProjectName::parse(name).map_err(|e| bad_input(e.to_string()))?;
            store
                .projects
                .execute(project_id, ProjectCommand::Rename { name, at: Utc::now() }, meta.clone())
                .await
                .map_err(command_error)?;
        }
        if let Some(public_previews) = public_previews {
            let command = ProjectCommand::SetVisibility { public_previews, at: Utc::now() };
            store.projects.execute(project_id, command, meta).await.map_err(command_error)?;
        }
        Ok(ProjectSettings { id: project_id })
    }

    /// Sets a secret (Manage Settings). The value is sealed before it reaches the event log and
    /// is never returned; it takes effect from the next deployment.
    async fn set_secret(
        &self,
        ctx: &Context<'_>,
        project_id: Uuid,
        name: String,
        value: String,
        #[graphql(default_with = "\"all\".to_string()")] scope: String,
    ) -> Result<SecretName> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        let auth = auth(ctx)?;
        understudy_domain::project::validate_secret_name(&name).map_err(|e| bad_input(e.to_string()))?;
        let scope = SecretScope::parse(&scope).map_err(|e| bad_input(e.to_string()))?;
        let key = auth
            .key
            .as_ref()
            .ok_or_else(|| bad_input("this node has no secret key (UNDERSTUDY_SECRET_KEY or UNDERSTUDY_SECRET_KEY_FILE)"))?;
        let sealed = key.seal(ProjectId(project_id), &name, &value).map_err(|e| bad_input(e.to_string()))?;
        let at = Utc::now();
        let command = ProjectCommand::SetSecret { name: name.clone(), sealed, scope, at };
        auth.store.projects.execute(project_id, command, meta(&viewer(ctx))).await.map_err(command_error)?;
        Ok(SecretName { name, scope: scope.as_str().to_string(), updated_at: at })
    }

    async fn remove_secret(&self, ctx: &Context<'_>, project_id: Uuid, name: String) -> Result<bool> {
        require_project(ctx, project_id, Permission::ManageSettings).await?;
        let command = ProjectCommand::RemoveSecret { name, at: Utc::now() };
        auth(ctx)?.store.projects.execute(project_id, command, meta(&viewer(ctx))).await.map_err(command_error)?;
        Ok(true)
    }

    /// Lets a commit of a pull request from a fork be built and previewed (Manage Projects: a
    /// maintainer). Until then it waits, and the pull request's comment says so.
    async fn approve_deployment(&self, ctx: &Context<'_>, deployment_id: Uuid) -> Result<DeploymentApproval> {
        let auth = auth(ctx)?;
        let not_found = || denied(Denied::NotFound(format!("no deployment {deployment_id} that you can see")));
        let environment = auth.environment_of_deployment(deployment_id).await?.ok_or_else(not_found)?;
        let project = auth.project_of_environment(environment).await?.ok_or_else(not_found)?;
        require_project(ctx, project.0, Permission::ManageProjects).await?;
        let viewer = viewer(ctx);
        let command = understudy_domain::environment::EnvironmentCommand::ApproveDeployment {
            deployment_id: understudy_domain::ids::DeploymentId(deployment_id),
            by: viewer.actor(),
            at: Utc::now(),
        };
        let done = auth.store.environments.execute(environment, command, meta(&viewer)).await.map_err(command_error)?;
        let status = done.state.deployments.iter().find(|d| d.id.0 == deployment_id).map(|d| d.status.as_str()).unwrap_or("unknown");
        Ok(DeploymentApproval { deployment_id, environment_id: environment, status: status.to_string() })
    }

    /// Creates a personal API token. The token is in the answer and nowhere else.
    async fn create_api_token(&self, ctx: &Context<'_>, name: String) -> Result<CreatedApiToken> {
        let viewer = viewer(ctx);
        let (user_id, _) = signed_in(&viewer)?;
        let token = crate::auth::new_api_token();
        let token_id = Uuid::new_v4();
        let at = Utc::now();
        let command = UserCommand::CreateApiToken { token_id, name, hash: crate::auth::hash_token(&token), at };
        let done = auth(ctx)?.store.users.execute(user_id.0, command, meta(&viewer)).await.map_err(command_error)?;
        let name = done.state.api_tokens.get(&token_id).map(|t| t.name.clone()).unwrap_or_default();
        Ok(CreatedApiToken { token, api_token: ApiToken { id: token_id, name, created_at: at } })
    }

    async fn revoke_api_token(&self, ctx: &Context<'_>, id: Uuid) -> Result<bool> {
        let viewer = viewer(ctx);
        let (user_id, _) = signed_in(&viewer)?;
        let command = UserCommand::RevokeApiToken { token_id: id, at: Utc::now() };
        auth(ctx)?.store.users.execute(user_id.0, command, meta(&viewer)).await.map_err(command_error)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cards_are_luhn_checked_and_cut_to_four_digits() {
        assert_eq!(card_last4("4242 4242 4242 4242").as_deref(), Some("4242"));
        assert_eq!(card_last4("5555-5555-5555-4444").as_deref(), Some("4444"));
        assert_eq!(card_last4("4242 4242 4242 4241"), None);
        assert_eq!(card_last4("4242"), None);
        assert_eq!(card_last4("4242 4242 4242 424x"), None);
    }
}
