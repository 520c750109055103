//! Who is asking: sign-in with GitHub, sessions, CSRF, API tokens, and the access checks every
//! resolver, log endpoint and preview makes.
//!
//! - Browsers sign in at `/auth/github/login?return_to=/path` → GitHub → `/auth/github/callback`.
//!   The first sign-in creates the user. The session is our own EdDSA JWT in the `HttpOnly;
//!   Secure; SameSite=Lax` cookie `understudy_session`, naming a session the event log opened
//!   (`SessionStarted`); `POST /auth/signout` ends it (`SessionEnded`) and it stops working at once.
//! - A request authenticated by that cookie that changes state (any method but GET, HEAD and
//!   OPTIONS, GraphQL over HTTP included) must carry `X-CSRF-Token`: an HMAC of the session, also
//!   readable by the page in the `understudy_csrf` cookie and at `/auth/session`.
//! - Tools send `Authorization: Bearer us_…`, a personal API token (kept only as its SHA-256).
//! - Without `GITHUB_CLIENT_ID` there is no sign-in: an API that listens on loopback only treats
//!   every request as the operator's ("open" mode, for one person on their own machine); any
//!   other API refuses everyone but API tokens.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::Router;
use chrono::Utc;
use hmac::Mac;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use understudy_adapters::github::oauth::{encode_component, OAuthApp};
use understudy_adapters::preview::token::PreviewSigner;
use understudy_adapters::secrets::SecretKey;
use understudy_adapters::EventStore;
use understudy_domain::ids::{AccountId, EnvironmentId, ProjectId, UserId};
use understudy_domain::permissions::{Permission, Role};
use understudy_domain::project::SealedValue;
use understudy_domain::user::UserCommand;
use understudy_domain::Metadata;
use uuid::Uuid;

pub const SESSION_COOKIE: &str = "understudy_session";
pub const CSRF_COOKIE: &str = "understudy_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";
const OAUTH_COOKIE: &str = "understudy_oauth";
/// The cookie a preview host keeps its visitor's access in (host-only: each preview its own).
pub const PREVIEW_COOKIE: &str = "understudy_preview";
/// The path on a preview host that takes a hand-off token and sets [`PREVIEW_COOKIE`].
pub const PREVIEW_HANDOFF_PATH: &str = "/.understudy/auth";
pub const API_TOKEN_PREFIX: &str = "us_";

const SESSION_AUDIENCE: &str = "understudy-session";
const OAUTH_AUDIENCE: &str = "understudy-oauth";
const HANDOFF_AUDIENCE: &str = "understudy-preview-handoff";
const PREVIEW_AUDIENCE: &str = "understudy-preview-access";

/// Who is asking.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Viewer {
    /// Nobody signed in.
    Anonymous,
    /// Open mode: the one person running Understudy on their own machine.
    Operator,
    User {
        user_id: UserId,
        login: String,
        /// The session behind a cookie; `None` for an API token.
        session_id: Option<Uuid>,
    },
}

impl Viewer {
    pub fn user_id(&self) -> Option<UserId> {
        match self {
            Viewer::User { user_id, .. } => Some(*user_id),
            _ => None,
        }
    }

    /// The actor events caused by this viewer record.
    pub fn actor(&self) -> String {
        match self {
            Viewer::Anonymous => "anonymous".into(),
            Viewer::Operator => "operator:open".into(),
            Viewer::User { user_id, login, .. } => format!("user:{user_id}:{login}"),
        }
    }
}

/// Why a request may not go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("sign in first: this needs a signed-in user (a session cookie or `Authorization: Bearer <API token>`)")]
    Unauthenticated,
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
}

impl Denied {
    pub fn code(&self) -> &'static str {
        match self {
            Denied::Unauthenticated => "UNAUTHENTICATED",
            Denied::Forbidden(_) => "FORBIDDEN",
            Denied::NotFound(_) => "NOT_FOUND",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Denied::Unauthenticated => StatusCode::UNAUTHORIZED,
            Denied::Forbidden(_) => StatusCode::FORBIDDEN,
            Denied::NotFound(_) => StatusCode::NOT_FOUND,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct SessionClaims {
    iss: String,
    aud: String,
    sub: Uuid,
    sid: Uuid,
    iat: i64,
    exp: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct OAuthClaims {
    aud: String,
    state: String,
    return_to: String,
    exp: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct PreviewClaims {
    aud: String,
    sub: Uuid,
    sid: Uuid,
    env: Uuid,
    /// Where to go once the cookie is set (hand-off tokens only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    exp: i64,
}

/// Everything the API needs to know who is asking and what they may see.
#[derive(Clone)]
pub struct Auth {
    pub store: EventStore,
    pub oauth: Option<OAuthApp>,
    /// The GitHub App, for what only it can answer (which installation sees a repository).
    pub github: Option<understudy_adapters::github::client::GitHub>,
    pub signer: Option<Arc<PreviewSigner>>,
    /// Seals users' GitHub tokens in the event log.
    pub key: Option<SecretKey>,
    /// `UNDERSTUDY_PUBLIC_URL`, without a trailing slash.
    pub public_url: String,
    /// No sign-in, loopback only: everyone is the operator.
    pub open: bool,
    pub session_lifetime: Duration,
    /// How long GitHub's answer to "can this user read this repository" is trusted.
    pub access_ttl: Duration,
    /// `{scheme}://` of preview links.
    pub preview_scheme: String,
    pub preview_domain: String,
    access_cache: Arc<Mutex<AccessCache>>,
}

/// GitHub's answers by (user, lowercased repository): readable or not, and when asked.
type AccessCache = HashMap<(Uuid, String), (bool, Instant)>;

impl Auth {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: EventStore,
        oauth: Option<OAuthApp>,
        signer: Option<Arc<PreviewSigner>>,
        key: Option<SecretKey>,
        public_url: &str,
        open: bool,
        preview_domain: &str,
    ) -> Self {
        let public_url = public_url.trim_end_matches('/').to_string();
        let preview_scheme = if public_url.starts_with("https://") { "https" } else { "http" }.to_string();
        Self {
            store,
            oauth,
            github: None,
            signer,
            key,
            public_url,
            open,
            session_lifetime: Duration::from_secs(7 * 24 * 3600),
            access_ttl: Duration::from_secs(60),
            preview_scheme,
            preview_domain: preview_domain.to_string(),
            access_cache: Arc::default(),
        }
    }

    fn pool(&self) -> &sqlx::PgPool {
        &self.store.pool
    }

    /// The CSRF token of a session: an HMAC of its id under a key derived from the signing key.
    pub fn csrf_token(&self, session_id: Uuid) -> String {
        let key = self.signer.as_ref().map(|s| s.derive_mac_key("csrf")).unwrap_or_default();
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(session_id.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Who sent these headers. A bad API token is an error; a bad or ended session cookie is
    /// nobody (the browser then signs in again).
    pub async fn viewer(&self, headers: &HeaderMap) -> Result<Viewer, Denied> {
        if let Some(token) = bearer(headers) {
            return self.api_token_viewer(token).await;
        }
        if let Some(viewer) = self.session_viewer(headers).await {
            return Ok(viewer);
        }
        Ok(if self.open { Viewer::Operator } else { Viewer::Anonymous })
    }

    async fn api_token_viewer(&self, token: &str) -> Result<Viewer, Denied> {
        let invalid = || Denied::Forbidden("this API token is not valid: it was revoked or never existed; create another".into());
        if !token.starts_with(API_TOKEN_PREFIX) {
            return Err(invalid());
        }
        let row: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT u.user_id, u.login FROM api_tokens t JOIN users u USING (user_id) WHERE t.hash = $1 AND t.revoked_at IS NULL",
        )
        .bind(hash_token(token))
        .fetch_optional(self.pool())
        .await
        .map_err(|e| Denied::Forbidden(format!("checking the token failed: {e}")))?;
        let (user_id, login) = row.ok_or_else(invalid)?;
        Ok(Viewer::User { user_id: UserId(user_id), login, session_id: None })
    }

    async fn session_viewer(&self, headers: &HeaderMap) -> Option<Viewer> {
        let token = cookie(headers, SESSION_COOKIE)?;
        let claims: SessionClaims = self.signer.as_ref()?.verify_own(&token).ok()?;
        if claims.aud != SESSION_AUDIENCE || claims.exp <= Utc::now().timestamp() {
            return None;
        }
        self.live_session(claims.sid, claims.sub).await
    }

    /// The viewer of a session that is open, not expired, and belongs to `user`.
    async fn live_session(&self, session_id: Uuid, user: Uuid) -> Option<Viewer> {
        let row: Option<(Uuid, String)> = sqlx::query_as(
            "SELECT u.user_id, u.login FROM user_sessions s JOIN users u USING (user_id)
             WHERE s.session_id = $1 AND s.user_id = $2 AND s.ended_at IS NULL AND s.expires_at > now()",
        )
        .bind(session_id)
        .bind(user)
        .fetch_optional(self.pool())
        .await
        .ok()?;
        row.map(|(user_id, login)| Viewer::User { user_id: UserId(user_id), login, session_id: Some(session_id) })
    }

    /// The viewer's role in an account (`None`: not a member, or the account was deleted).
    pub async fn role_in(&self, user: UserId, account: AccountId) -> Result<Option<Role>, sqlx::Error> {
        let role: Option<String> = sqlx::query_scalar(
            "SELECT m.role FROM account_members m JOIN accounts a USING (account_id)
             WHERE m.account_id = $1 AND m.user_id = $2 AND NOT a.deleted",
        )
        .bind(account.0)
        .bind(user.0)
        .fetch_optional(self.pool())
        .await?;
        Ok(role.as_deref().and_then(Role::parse))
    }

    /// Allows `permission` on `account` by the role matrix, or says why not.
    pub async fn require_account(&self, viewer: &Viewer, account: AccountId, permission: Permission) -> Result<Option<Role>, Denied> {
        match viewer {
            Viewer::Anonymous => Err(Denied::Unauthenticated),
            Viewer::Operator => Ok(None),
            Viewer::User { user_id, .. } => {
                let role = self.role_in(*user_id, account).await.map_err(|e| Denied::Forbidden(format!("checking roles failed: {e}")))?;
                match role {
                    Some(role) if role.allows(permission) => Ok(Some(role)),
                    Some(role) => {
                        Err(Denied::Forbidden(format!("your role {} does not allow {permission:?} in this account", role.as_str())))
                    }
                    None => Err(Denied::NotFound(format!("no account {account} that you are a member of"))),
                }
            }
        }
    }

    /// The account and repository of a project, whether it is on GitHub, and whether its
    /// previews are public.
    pub async fn project_owner(&self, project: ProjectId) -> Result<Option<ProjectOwner>, sqlx::Error> {
        let row: Option<(Uuid, String, Option<String>, bool)> =
            sqlx::query_as("SELECT account_id, repository, git_url, public_previews FROM projects WHERE project_id = $1")
                .bind(project.0)
                .fetch_optional(self.pool())
                .await?;
        Ok(row.map(|(account, repository, git_url, public_previews)| ProjectOwner {
            account: AccountId(account),
            repository,
            on_github: git_url.is_none(),
            public_previews,
        }))
    }

    /// The project of an environment.
    pub async fn project_of_environment(&self, environment: Uuid) -> Result<Option<ProjectId>, sqlx::Error> {
        let project: Option<Uuid> = sqlx::query_scalar("SELECT project_id FROM environments WHERE environment_id = $1")
            .bind(environment)
            .fetch_optional(self.pool())
            .await?;
        Ok(project.map(ProjectId))
    }

    /// The environment of a deployment, from the event that asked for it.
    pub async fn environment_of_deployment(&self, deployment: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
        sqlx::query_scalar(
            "SELECT aggregate_id FROM event_log WHERE event_type = 'DeploymentRequested' AND payload->>'deployment_id' = $1 LIMIT 1",
        )
        .bind(deployment.to_string())
        .fetch_optional(self.pool())
        .await
    }

    /// The project of a deployment.
    pub async fn project_of_deployment(&self, deployment: Uuid) -> Result<Option<ProjectId>, sqlx::Error> {
        match self.environment_of_deployment(deployment).await? {
            Some(environment) => self.project_of_environment(environment).await,
            None => Ok(None),
        }
    }

    /// Allows `permission` on a project. A project on GitHub shows its previews to exactly those
    /// signed-in people GitHub says can read its repository; its other view permissions go to
    /// them and to the members of its account; everything else follows the role matrix in the
    /// project's account. A project not on GitHub follows the role matrix alone.
    pub async fn require_project(&self, viewer: &Viewer, project: ProjectId, permission: Permission) -> Result<(), Denied> {
        if *viewer == Viewer::Operator {
            return Ok(());
        }
        let owner = self.project_owner(project).await.map_err(|e| Denied::Forbidden(format!("looking the project up failed: {e}")))?;
        self.allow_project(viewer, project, owner.as_ref(), permission).await
    }

    /// [`Auth::require_project`] for a project already looked up (`None`: there is no such
    /// project).
    async fn allow_project(
        &self,
        viewer: &Viewer,
        project: ProjectId,
        owner: Option<&ProjectOwner>,
        permission: Permission,
    ) -> Result<(), Denied> {
        let not_found = || Denied::NotFound(format!("no project {project} that you can see"));
        let Some(owner) = owner else {
            return match viewer {
                Viewer::Anonymous => Err(Denied::Unauthenticated),
                Viewer::Operator => Ok(()),
                Viewer::User { .. } => Err(not_found()),
            };
        };
        if *viewer == Viewer::Operator || (owner.public_previews && permission == Permission::ViewPreviewEnvironments) {
            return Ok(());
        }
        let reads_on_github = || async {
            match viewer {
                Viewer::User { user_id, .. } if self.can_read_repository(*user_id, &owner.repository).await => Ok(()),
                _ => Err(not_found()),
            }
        };
        if permission == Permission::ViewPreviewEnvironments && owner.on_github && matches!(viewer, Viewer::User { .. }) {
            return reads_on_github().await;
        }
        let viewing = matches!(
            permission,
            Permission::ViewProjects | Permission::ViewSettings | Permission::ViewPreviewEnvironments | Permission::ViewUsers
        );
        match self.require_account(viewer, owner.account, permission).await {
            Ok(_) => Ok(()),
            Err(Denied::NotFound(_)) if viewing && owner.on_github => reads_on_github().await,
            Err(Denied::NotFound(_)) => Err(not_found()),
            Err(other) => Err(other),
        }
    }

    /// Whether GitHub says `user` can read `repository`, asked with the token of their latest
    /// open session and trusted for `access_ttl`. No session, no key or no answer: no.
    pub async fn can_read_repository(&self, user: UserId, repository: &str) -> bool {
        let key = (user.0, repository.to_ascii_lowercase());
        if let Some((answer, at)) = self.access_cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key).copied() {
            if at.elapsed() < self.access_ttl {
                return answer;
            }
        }
        let answer = self.ask_github(user, repository).await;
        if let Some(answer) = answer {
            let mut cache = self.access_cache.lock().unwrap_or_else(|p| p.into_inner());
            if cache.len() > 100_000 {
                cache.clear();
            }
            cache.insert(key, (answer, Instant::now()));
        }
        answer.unwrap_or(false)
    }

    /// Forgets every cached answer (tests and a user's sign-out).
    pub fn forget_access(&self, user: UserId) {
        self.access_cache.lock().unwrap_or_else(|p| p.into_inner()).retain(|(u, _), _| *u != user.0);
    }

    async fn ask_github(&self, user: UserId, repository: &str) -> Option<bool> {
        let oauth = self.oauth.as_ref()?;
        let Some(token) = self.github_token(user).await else { return Some(false) };
        match oauth.can_read(&token, repository).await {
            Ok(answer) => Some(answer),
            Err(error) => {
                tracing::warn!(%error, %user, repository, "GitHub did not say whether the user can read the repository");
                None
            }
        }
    }

    /// The GitHub token of the user's latest open session, to ask GitHub on their behalf.
    pub async fn github_token(&self, user: UserId) -> Option<SecretString> {
        let key = self.key.as_ref()?;
        let row: Option<(Uuid, sqlx::types::Json<SealedValue>)> = sqlx::query_as(
            "SELECT session_id, github_token FROM user_sessions WHERE user_id = $1 AND ended_at IS NULL AND expires_at > now()
             ORDER BY started_at DESC LIMIT 1",
        )
        .bind(user.0)
        .fetch_optional(self.pool())
        .await
        .ok()?;
        let (session_id, sealed) = row?;
        match key.open_for(&github_token_context(user, session_id), "GitHub token", &sealed.0) {
            Ok(token) => Some(SecretString::from(token)),
            Err(error) => {
                tracing::warn!(%error, %user, "a session's GitHub token does not open");
                None
            }
        }
    }

    pub(crate) fn cookie_header(&self, name: &str, value: &str, max_age: i64, http_only: bool) -> HeaderValue {
        let http_only = if http_only { "; HttpOnly" } else { "" };
        HeaderValue::from_str(&format!("{name}={value}; Path=/; Max-Age={max_age}; Secure; SameSite=Lax{http_only}"))
            .unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

/// Who owns a project and who may see its previews.
#[derive(Debug, Clone)]
pub struct ProjectOwner {
    pub account: AccountId,
    pub repository: String,
    pub on_github: bool,
    pub public_previews: bool,
}

/// The associated data a user's GitHub token is sealed with.
pub fn github_token_context(user: UserId, session: Uuid) -> String {
    format!("understudy:github-token:{user}:{session}")
}

/// Hex SHA-256 of an API token: how it is kept and looked up.
pub fn hash_token(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

/// A new API token: `us_` and 32 random bytes in hex.
pub fn new_api_token() -> String {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    format!("{API_TOKEN_PREFIX}{}", hex::encode(bytes))
}

fn random_hex(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    hex::encode(bytes)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// The value of cookie `name` in the request's `Cookie` headers.
pub fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

/// Removes cookie `name` from the request (what a preview app must not see).
pub fn strip_cookie(headers: &mut HeaderMap, name: &str) {
    let kept: Vec<String> = headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|pair| !pair.is_empty() && pair.split_once('=').is_none_or(|(k, _)| k != name))
        .map(str::to_string)
        .collect();
    headers.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            headers.insert(header::COOKIE, value);
        }
    }
}

/// A `return_to` that stays on our origin: a path starting with one `/`, or our own absolute
/// URL. Anything else (another host, `//host`, `/\host`, a scheme) becomes `/dashboard`.
pub fn safe_return_to(return_to: Option<&str>, public_url: &str) -> String {
    const FALLBACK: &str = "/dashboard";
    let Some(target) = return_to.map(str::trim).filter(|t| !t.is_empty()) else { return FALLBACK.into() };
    let path = match target.strip_prefix(public_url.trim_end_matches('/')) {
        Some(rest) if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') => {
            if rest.is_empty() {
                "/".to_string()
            } else if rest.starts_with('?') {
                format!("/{rest}")
            } else {
                rest.to_string()
            }
        }
        _ => target.to_string(),
    };
    let bytes = path.as_bytes();
    let safe = bytes.first() == Some(&b'/')
        && !matches!(bytes.get(1), Some(b'/') | Some(b'\\'))
        && !path.chars().any(|c| c.is_control() || c == '\\');
    if safe {
        path
    } else {
        FALLBACK.into()
    }
}

/// Middleware: finds who is asking, refuses a cookie-authenticated state change without the
/// session's CSRF token, and hands the [`Viewer`] to the handlers as a request extension.
pub async fn identify(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let viewer = match auth.viewer(request.headers()).await {
        Ok(viewer) => viewer,
        Err(denied) => return denied_response(&denied),
    };
    if let Viewer::User { session_id: Some(session_id), .. } = &viewer {
        let changes_state = !matches!(*request.method(), Method::GET | Method::HEAD | Method::OPTIONS);
        if changes_state {
            let sent = request.headers().get(CSRF_HEADER).and_then(|v| v.to_str().ok()).unwrap_or_default();
            let expected = auth.csrf_token(*session_id);
            if !constant_time_eq(sent.as_bytes(), expected.as_bytes()) {
                return (
                    StatusCode::FORBIDDEN,
                    axum::Json(serde_json::json!({
                        "errors": [{ "message": "missing or wrong X-CSRF-Token: send the token of your session (GET /auth/session, or the understudy_csrf cookie)",
                                     "extensions": { "code": "CSRF" } }]
                    })),
                )
                    .into_response();
            }
        }
    }
    request.extensions_mut().insert(viewer);
    next.run(request).await
}

pub fn denied_response(denied: &Denied) -> Response {
    (
        denied.status(),
        axum::Json(serde_json::json!({ "errors": [{ "message": denied.to_string(), "extensions": { "code": denied.code() } }] })),
    )
        .into_response()
}

pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `/auth/...`
pub fn router(auth: Auth) -> Router {
    Router::new()
        .route("/auth/github/login", get(login))
        .route("/auth/github/callback", get(callback))
        .route("/auth/signout", post(sign_out))
        .route("/auth/session", get(session))
        .route("/auth/preview", get(preview_handoff))
        .with_state(auth)
}

fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;");
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font:16px system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}}</style></head>\
         <body><main><h1>{title}</h1><p>{text}</p><p><a href=\"/auth/github/login\">Sign in again</a></p></main></body></html>",
        title = escape(title),
        text = escape(text)
    );
    (status, Html(html)).into_response()
}

#[derive(Deserialize)]
struct LoginQuery {
    return_to: Option<String>,
    /// Suggests the GitHub account to sign in with (GitHub's own `login` parameter).
    login: Option<String>,
}

async fn login(State(auth): State<Auth>, Query(q): Query<LoginQuery>) -> Response {
    let (Some(oauth), Some(signer)) = (&auth.oauth, &auth.signer) else {
        return page(
            StatusCode::NOT_FOUND,
            "Sign-in is not set up",
            "This Understudy has no GitHub OAuth client: an operator sets GITHUB_CLIENT_ID and GITHUB_CLIENT_SECRET.",
        );
    };
    let state = random_hex(32);
    let return_to = safe_return_to(q.return_to.as_deref(), &auth.public_url);
    let claims = OAuthClaims { aud: OAUTH_AUDIENCE.into(), state: state.clone(), return_to, exp: Utc::now().timestamp() + 600 };
    let redirect_uri = format!("{}/auth/github/callback", auth.public_url);
    let login = q.login.as_deref().filter(|l| understudy_domain::user::validate_login(l).is_ok());
    let mut response = Redirect::to(&oauth.authorize_url(&redirect_uri, &state, login)).into_response();
    response.headers_mut().append(header::SET_COOKIE, auth.cookie_header(OAUTH_COOKIE, &signer.sign(&claims), 600, true));
    response
}

#[derive(Deserialize)]
struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn callback(State(auth): State<Auth>, headers: HeaderMap, Query(q): Query<CallbackQuery>) -> Response {
    let (Some(oauth), Some(signer), Some(key)) = (&auth.oauth, &auth.signer, &auth.key) else {
        return page(
            StatusCode::NOT_FOUND,
            "Sign-in is not set up",
            "An operator sets GITHUB_CLIENT_ID, GITHUB_CLIENT_SECRET and a secret key.",
        );
    };
    if let Some(error) = &q.error {
        let description = q.error_description.as_deref().unwrap_or("GitHub did not sign you in");
        return page(StatusCode::UNAUTHORIZED, "Not signed in", &format!("{description} ({error})."));
    }
    let started: Option<OAuthClaims> = cookie(&headers, OAUTH_COOKIE).and_then(|c| signer.verify_own(&c).ok());
    let started = started.filter(|c| c.aud == OAUTH_AUDIENCE && c.exp > Utc::now().timestamp());
    let (Some(started), Some(state), Some(code)) = (started, q.state.as_deref(), q.code.as_deref()) else {
        return page(
            StatusCode::BAD_REQUEST,
            "Sign-in expired",
            "This sign-in was not started here, or took more than ten minutes. Start again.",
        );
    };
    if !constant_time_eq(started.state.as_bytes(), state.as_bytes()) {
        return page(
            StatusCode::BAD_REQUEST,
            "Sign-in refused",
            "The sign-in's state does not match the one this browser started with. Start again.",
        );
    }
    let redirect_uri = format!("{}/auth/github/callback", auth.public_url);
    let token = match oauth.exchange(code, &redirect_uri).await {
        Ok(token) => token,
        Err(error) => return page(StatusCode::BAD_GATEWAY, "Sign-in failed", &error.to_string()),
    };
    let user = match oauth.user(&token).await {
        Ok(user) => user,
        Err(error) => return page(StatusCode::BAD_GATEWAY, "Sign-in failed", &format!("GitHub did not say who you are: {error}")),
    };
    let user_id = understudy_adapters::github::user_id(user.id);
    let session_id = Uuid::new_v4();
    let sealed = match key.seal_for(&github_token_context(user_id, session_id), token.expose_secret()) {
        Ok(sealed) => sealed,
        Err(error) => return page(StatusCode::INTERNAL_SERVER_ERROR, "Sign-in failed", &error.to_string()),
    };
    let now = Utc::now();
    let expires_at = now + chrono::Duration::from_std(auth.session_lifetime).unwrap_or(chrono::Duration::days(7));
    let command = UserCommand::SignIn {
        user_id,
        github_id: user.id,
        login: user.login.clone(),
        name: user.name.clone(),
        session_id,
        github_token: sealed,
        expires_at,
        at: now,
    };
    let meta = Metadata::new(Uuid::new_v4(), format!("user:{user_id}:{}", user.login));
    if let Err(error) = auth.store.users.execute(user_id.0, command, meta).await {
        return page(StatusCode::INTERNAL_SERVER_ERROR, "Sign-in failed", &error.to_string());
    }
    auth.forget_access(user_id);
    let claims = SessionClaims {
        iss: auth.public_url.clone(),
        aud: SESSION_AUDIENCE.into(),
        sub: user_id.0,
        sid: session_id,
        iat: now.timestamp(),
        exp: expires_at.timestamp(),
    };
    let max_age = auth.session_lifetime.as_secs() as i64;
    let mut response = Redirect::to(&started.return_to).into_response();
    let cookies = response.headers_mut();
    cookies.append(header::SET_COOKIE, auth.cookie_header(SESSION_COOKIE, &signer.sign(&claims), max_age, true));
    cookies.append(header::SET_COOKIE, auth.cookie_header(CSRF_COOKIE, &auth.csrf_token(session_id), max_age, false));
    cookies.append(header::SET_COOKIE, auth.cookie_header(OAUTH_COOKIE, "", 0, true));
    response
}

/// `POST /auth/signout`: ends the session (an event) and clears the cookies. The CSRF check of
/// [`identify`] runs before it.
async fn sign_out(State(auth): State<Auth>, request: Request) -> Response {
    let viewer = request.extensions().get::<Viewer>().cloned().unwrap_or(Viewer::Anonymous);
    if let Viewer::User { user_id, login, session_id: Some(session_id) } = viewer {
        let meta = Metadata::new(Uuid::new_v4(), format!("user:{user_id}:{login}"));
        let command = UserCommand::SignOut { session_id, at: Utc::now() };
        if let Err(error) = auth.store.users.execute(user_id.0, command, meta).await {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("signing out failed: {error}; try again\n")).into_response();
        }
        auth.forget_access(user_id);
    }
    let mut response = Redirect::to("/").into_response();
    *response.status_mut() = StatusCode::SEE_OTHER;
    response.headers_mut().append(header::SET_COOKIE, auth.cookie_header(SESSION_COOKIE, "", 0, true));
    response.headers_mut().append(header::SET_COOKIE, auth.cookie_header(CSRF_COOKIE, "", 0, false));
    response
}

/// `GET /auth/session`: who is signed in, and the CSRF token to send with changes.
async fn session(State(auth): State<Auth>, request: Request) -> Response {
    let viewer = request.extensions().get::<Viewer>().cloned().unwrap_or(Viewer::Anonymous);
    let body = match &viewer {
        Viewer::User { user_id, login, session_id } => serde_json::json!({
            "signedIn": true,
            "user": { "id": user_id, "login": login },
            "csrfToken": session_id.map(|s| auth.csrf_token(s)),
        }),
        Viewer::Operator => serde_json::json!({ "signedIn": false, "operator": true }),
        Viewer::Anonymous => serde_json::json!({ "signedIn": false, "signInUrl": "/auth/github/login" }),
    };
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[derive(Deserialize)]
struct PreviewQuery {
    environment: String,
    path: Option<String>,
}

/// `GET /auth/preview?environment=HEX&path=/x`: the sign-in step of a preview. A signed-in user
/// who may see it is sent to the preview host with a one-minute hand-off token, which the proxy
/// turns into that host's own cookie; anyone else signs in first or is told why not.
async fn preview_handoff(State(auth): State<Auth>, Query(q): Query<PreviewQuery>, request: Request) -> Response {
    let viewer = request.extensions().get::<Viewer>().cloned().unwrap_or(Viewer::Anonymous);
    let Ok(environment) = Uuid::parse_str(&q.environment).map(EnvironmentId) else {
        return page(StatusCode::BAD_REQUEST, "No such preview", "The preview address is malformed.");
    };
    // Only a path on the preview host itself.
    let path = q.path.filter(|p| safe_return_to(Some(p), "") == *p).unwrap_or_else(|| "/".into());
    let (user_id, session_id) = match &viewer {
        Viewer::User { user_id, session_id: Some(session_id), .. } => (*user_id, *session_id),
        _ => {
            let here = format!("/auth/preview?environment={}&path={}", environment.0.simple(), encode_component(&path));
            return Redirect::to(&format!("/auth/github/login?return_to={}", encode_component(&here))).into_response();
        }
    };
    let Some(signer) = &auth.signer else {
        return page(StatusCode::NOT_FOUND, "Previews are not signed here", "This node has no signing key.");
    };
    let project: Option<Uuid> = match sqlx::query_scalar("SELECT project_id FROM environments WHERE environment_id = $1")
        .bind(environment.0)
        .fetch_optional(auth.pool())
        .await
    {
        Ok(project) => project,
        Err(error) => return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", &format!("The preview could not be looked up: {error}")),
    };
    let Some(project) = project else {
        return page(StatusCode::NOT_FOUND, "No such preview", "There is no preview environment at this address.");
    };
    if let Err(denied) = auth.require_project(&viewer, ProjectId(project), Permission::ViewPreviewEnvironments).await {
        tracing::info!(%user_id, %environment, reason = %denied, "preview refused");
        return page(
            StatusCode::FORBIDDEN,
            "You cannot see this preview",
            "Previews are visible to people who can read the project's repository on GitHub, and to the members of its account.",
        );
    }
    let claims = PreviewClaims {
        aud: HANDOFF_AUDIENCE.into(),
        sub: user_id.0,
        sid: session_id,
        env: environment.0,
        path: Some(path.clone()),
        exp: Utc::now().timestamp() + 60,
    };
    let host = understudy_adapters::preview::preview_host(environment, &auth.preview_domain);
    let target = format!("{}://{host}{PREVIEW_HANDOFF_PATH}?token={}", auth.preview_scheme, signer.sign(&claims));
    Redirect::to(&target).into_response()
}

/// What the proxy decides about one request to a preview.
pub enum PreviewAccess {
    /// Serve it.
    Allowed,
    /// Answer this instead (a redirect to sign in, a cookie being set, a refusal).
    Answer(Response),
}

impl Auth {
    /// Whether a request to `environment` of `project` may be served: it carries a preview
    /// cookie of a live session whose user may see the project, or it is the hand-off that sets
    /// one. Browsers without one go through sign-in; other clients get 401.
    pub async fn preview_access(
        &self,
        environment: EnvironmentId,
        project: ProjectId,
        method: &Method,
        uri: &axum::http::Uri,
        headers: &HeaderMap,
    ) -> PreviewAccess {
        // One lookup of the project serves every check of this request.
        let owner = self.project_owner(project).await.ok().flatten();
        let permission = Permission::ViewPreviewEnvironments;
        if owner.is_some() && self.allow_project(&Viewer::Anonymous, project, owner.as_ref(), permission).await.is_ok() {
            return PreviewAccess::Allowed; // public previews
        }
        let Some(signer) = &self.signer else {
            return PreviewAccess::Answer(page(StatusCode::FORBIDDEN, "Previews are not served here", "This node has no signing key."));
        };
        let now = Utc::now().timestamp();
        if uri.path() == PREVIEW_HANDOFF_PATH {
            let token = uri.query().unwrap_or_default().split('&').find_map(|p| p.strip_prefix("token=")).unwrap_or_default();
            let claims: Option<PreviewClaims> = signer.verify_own(token).ok();
            let Some(claims) = claims.filter(|c| c.aud == HANDOFF_AUDIENCE && c.env == environment.0 && c.exp > now) else {
                return PreviewAccess::Answer(page(StatusCode::FORBIDDEN, "Sign-in expired", "Open the preview link again."));
            };
            let path = safe_return_to(claims.path.as_deref(), "");
            let cookie_claims = PreviewClaims {
                aud: PREVIEW_AUDIENCE.into(),
                sub: claims.sub,
                sid: claims.sid,
                env: claims.env,
                path: None,
                exp: now + 12 * 3600,
            };
            let mut response = Redirect::to(&path).into_response();
            response
                .headers_mut()
                .append(header::SET_COOKIE, self.cookie_header(PREVIEW_COOKIE, &signer.sign(&cookie_claims), 12 * 3600, true));
            return PreviewAccess::Answer(response);
        }
        let claims: Option<PreviewClaims> = cookie(headers, PREVIEW_COOKIE).and_then(|c| signer.verify_own(&c).ok());
        if let Some(claims) = claims.filter(|c| c.aud == PREVIEW_AUDIENCE && c.env == environment.0 && c.exp > now) {
            if let Some(viewer) = self.live_session(claims.sid, claims.sub).await {
                if self.allow_project(&viewer, project, owner.as_ref(), permission).await.is_ok() {
                    return PreviewAccess::Allowed;
                }
                return PreviewAccess::Answer(page(
                    StatusCode::FORBIDDEN,
                    "You cannot see this preview",
                    "You no longer have access to this project's repository.",
                ));
            }
        }
        let browser = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|accept| accept.contains("text/html"))
            && *method == Method::GET;
        if browser {
            let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
            let target = format!("{}/auth/preview?environment={}&path={}", self.public_url, environment.0.simple(), encode_component(path));
            PreviewAccess::Answer(Redirect::to(&target).into_response())
        } else {
            PreviewAccess::Answer(denied_response(&Denied::Unauthenticated))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn return_to_stays_on_our_origin() {
        let ours = "https://understudy.example.com";
        for (given, expected) in [
            (Some("/dashboard/acme/web"), "/dashboard/acme/web"),
            (Some("/auth/preview?environment=ab&path=%2F"), "/auth/preview?environment=ab&path=%2F"),
            (Some("https://understudy.example.com/dashboard/x"), "/dashboard/x"),
            (Some("https://understudy.example.com"), "/"),
            (Some("https://understudy.example.com.evil.com/x"), "/dashboard"),
            (Some("https://evil.com/"), "/dashboard"),
            (Some("//evil.com/x"), "/dashboard"),
            (Some("/\\evil.com"), "/dashboard"),
            (Some("/ok\\..\\evil"), "/dashboard"),
            (Some("javascript:alert(1)"), "/dashboard"),
            (Some("/line\nbreak"), "/dashboard"),
            (Some(""), "/dashboard"),
            (None, "/dashboard"),
        ] {
            assert_eq!(safe_return_to(given, ours), expected, "{given:?}");
        }
    }

    #[test]
    fn cookies_are_read_and_stripped_by_name() {
        let mut headers = HeaderMap::new();
        headers.insert(header::COOKIE, HeaderValue::from_static("a=1; understudy_preview=secret; b=2"));
        assert_eq!(cookie(&headers, "understudy_preview").as_deref(), Some("secret"));
        assert_eq!(cookie(&headers, "understudy"), None);
        strip_cookie(&mut headers, PREVIEW_COOKIE);
        assert_eq!(headers.get(header::COOKIE).and_then(|v| v.to_str().ok()), Some("a=1; b=2"));
        let mut only = HeaderMap::new();
        only.insert(header::COOKIE, HeaderValue::from_static("understudy_preview=x"));
        strip_cookie(&mut only, PREVIEW_COOKIE);
        assert!(only.get(header::COOKIE).is_none());
    }

    #[test]
    fn api_tokens_are_random_and_hashed() {
        let (a, b) = (new_api_token(), new_api_token());
        assert_ne!(a, b);
        assert!(a.starts_with(API_TOKEN_PREFIX) && a.len() == 3 + 64);
        assert_eq!(hash_token(&a).len(), 64);
        assert_ne!(hash_token(&a), a);
    }
}
