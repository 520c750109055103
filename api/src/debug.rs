//! Debug access to a failed environment: a session (Manage Projects) starts a fresh instance of
//! the failed deployment, reachable through an expiring tunnel at `debug-{session}.{preview
//! domain}` that only the holder of the session's token passes; its files' listing and its log
//! are read over HTTP by anyone who may see the environment, each read recorded as an event.
//!
//! - `openDebugSession(environmentId, minutes)` → the tunnel's URL with its token (shown once)
//! - `closeDebugSession(environmentId, sessionId)`
//! - `GET /environments/{id}/debug/{session}/files` (JSON) and `…/logs` (the `debug` log)

use async_graphql::{Context, Object, Result, SimpleObject};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use chrono::{DateTime, Utc};
use understudy_adapters::EventStore;
use understudy_domain::environment::{EnvironmentCommand, MAX_DEBUG_MINUTES};
use understudy_domain::permissions::Permission;
use understudy_domain::Metadata;
use uuid::Uuid;

use crate::accounts::{auth, bad_input};
use crate::auth::Viewer;
use crate::operations::OperationsMutation;

/// The prefix of a debug session's token.
pub const DEBUG_TOKEN_PREFIX: &str = "usd_";
/// The path on a debug host that trades `?token=` for the tunnel's cookie.
pub const DEBUG_HANDOFF_PATH: &str = "/.understudy/debug";
/// The tunnel's cookie (host-only: one per debug host) and header.
pub const DEBUG_COOKIE: &str = "understudy_debug";
pub const DEBUG_HEADER: &str = "x-understudy-debug-token";

/// A debug session as the API shows it (never its token).
#[derive(SimpleObject, Clone, Debug)]
pub struct DebugSession {
    pub id: Uuid,
    /// The failed deployment it is an instance of.
    pub deployment_id: Uuid,
    pub by: String,
    pub opened_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// What its instance reached: `waiting` (for a worker), `building`, `running`, `build
    /// failed: …`, `the app exited with …`.
    pub state: String,
    /// Where the tunnel is (it needs the token).
    pub url: String,
    pub files_url: String,
    pub logs_url: String,
}

/// The answer to `openDebugSession`: the session, and its token, shown this once.
#[derive(SimpleObject)]
pub struct OpenedDebugSession {
    pub session: DebugSession,
    pub token: String,
    /// The tunnel's URL with the token, for a browser: it trades the token for a cookie.
    pub browser_url: String,
}

/// The environment's open debug sessions.
pub async fn sessions_of(ctx: &Context<'_>, environment: Uuid) -> Result<Vec<DebugSession>> {
    let auth = auth(ctx)?;
    let state = auth.store.environments.load(environment).await?.into_inner();
    let ids: Vec<Uuid> = state.debug_sessions.keys().copied().collect();
    let instances: Vec<(Uuid, String)> = sqlx::query_as("SELECT session_id, state FROM debug_instances WHERE session_id = ANY($1)")
        .bind(&ids)
        .fetch_all(&auth.store.pool)
        .await?;
    Ok(state
        .debug_sessions
        .iter()
        .map(|(id, session)| {
            let instance = instances.iter().find(|(i, _)| i == id).map(|(_, s)| s.clone());
            view(auth, environment, *id, session, instance.unwrap_or_else(|| "waiting".into()))
        })
        .collect())
}

fn view(
    auth: &crate::auth::Auth,
    environment: Uuid,
    id: Uuid,
    session: &understudy_domain::environment::DebugSession,
    state: String,
) -> DebugSession {
    let api = auth.public_url.trim_end_matches('/');
    DebugSession {
        id,
        deployment_id: session.deployment_id.0,
        by: session.by.clone(),
        opened_at: session.opened_at,
        expires_at: session.expires_at,
        state,
        url: format!("{}://{}/", auth.preview_scheme, understudy_adapters::preview::debug_host(id, &auth.preview_domain)),
        files_url: format!("{api}/environments/{environment}/debug/{id}/files"),
        logs_url: format!("{api}/environments/{environment}/debug/{id}/logs"),
    }
}

#[derive(Default)]
pub struct DebugMutation;

#[Object]
impl DebugMutation {
    /// Opens a debug session on the environment's failed deployment (Manage Projects): a fresh
    /// instance of it, with what it had (secrets, configuration, database), and a tunnel to its
    /// port for `minutes` (30 by default, at most 240). The token is shown this once.
    async fn open_debug_session(&self, ctx: &Context<'_>, environment_id: Uuid, minutes: Option<i32>) -> Result<OpenedDebugSession> {
        let minutes = minutes.unwrap_or(30);
        OperationsMutation::environment(ctx, environment_id, Permission::ManageProjects).await?;
        if !(1..=MAX_DEBUG_MINUTES as i32).contains(&minutes) {
            return Err(bad_input(format!("a debug session lasts 1 to {MAX_DEBUG_MINUTES} minutes")));
        }
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        let token = format!("{DEBUG_TOKEN_PREFIX}{}", hex::encode(bytes));
        let (id, at) = (Uuid::new_v4(), Utc::now());
        let command = EnvironmentCommand::OpenDebugSession {
            session_id: id,
            token_sha256: crate::auth::hash_token(&token),
            expires_at: at + chrono::Duration::minutes(minutes.into()),
            by: crate::accounts::viewer(ctx).actor(),
            at,
        };
        let state = OperationsMutation::execute(ctx, environment_id, command).await?;
        let session = state.debug_sessions.get(&id).ok_or_else(|| async_graphql::Error::new("the session was not recorded"))?;
        let session = view(auth(ctx)?, environment_id, id, session, "waiting".into());
        let browser_url = format!("{}{}?token={token}", session.url.trim_end_matches('/'), DEBUG_HANDOFF_PATH);
        Ok(OpenedDebugSession { session, token, browser_url })
    }

    /// Closes a debug session now (Manage Projects): its instance stops and its tunnel closes.
    async fn close_debug_session(&self, ctx: &Context<'_>, environment_id: Uuid, session_id: Uuid) -> Result<bool> {
        OperationsMutation::environment(ctx, environment_id, Permission::ManageProjects).await?;
        let by = crate::accounts::viewer(ctx).actor();
        let command = EnvironmentCommand::CloseDebugSession { session_id, reason: format!("closed by {by}"), by, at: Utc::now() };
        let state = OperationsMutation::execute(ctx, environment_id, command).await?;
        Ok(!state.debug_sessions.contains_key(&session_id))
    }
}

/// `/environments/{id}/debug/{session}/…`, behind the logs' guard (View Preview Environments).
pub fn router(store: EventStore, auth: crate::auth::Auth) -> Router {
    Router::new()
        .route("/environments/{id}/debug/{session}/files", get(files))
        .route("/environments/{id}/debug/{session}/logs", get(logs))
        .route_layer(axum::middleware::from_fn_with_state(auth, crate::logs::guard))
        .with_state(store)
}

/// Records that `viewer` read `what` of the session; refused once it is closed or expired.
/// Answers with the session as the environment has it after the access.
async fn record(
    store: &EventStore,
    environment: Uuid,
    session: Uuid,
    what: &str,
    viewer: &Viewer,
) -> Result<understudy_domain::environment::DebugSession, Response> {
    let command = EnvironmentCommand::RecordDebugAccess { session_id: session, what: what.into(), by: viewer.actor(), at: Utc::now() };
    match store.environments.execute(environment, command, Metadata::new(Uuid::new_v4(), viewer.actor())).await {
        Ok(done) => done
            .state
            .debug_sessions
            .get(&session)
            .cloned()
            .ok_or_else(|| (StatusCode::GONE, format!("debug session {session} is over\n")).into_response()),
        Err(understudy_adapters::CommandError::Domain(error)) => {
            Err((StatusCode::GONE, format!("debug session {session}: {error}\n")).into_response())
        }
        Err(error) => {
            tracing::warn!(%error, "recording a debug access failed");
            Err((StatusCode::SERVICE_UNAVAILABLE, "try again\n").into_response())
        }
    }
}

fn viewer_of(request: &axum::http::Extensions) -> Viewer {
    request.get::<Viewer>().cloned().unwrap_or(Viewer::Anonymous)
}

/// The instance's files: `{state, truncated, files: [{path, kind, size}]}`.
async fn files(
    State(store): State<EventStore>,
    Path((environment, session)): Path<(Uuid, Uuid)>,
    extensions: axum::http::Extensions,
) -> Response {
    if let Err(response) = record(&store, environment, session, "files", &viewer_of(&extensions)).await {
        return response;
    }
    let row: Result<Option<(String, serde_json::Value, bool)>, sqlx::Error> =
        sqlx::query_as("SELECT state, files, files_truncated FROM debug_instances WHERE session_id = $1 AND environment_id = $2")
            .bind(session)
            .bind(environment)
            .fetch_optional(&store.pool)
            .await;
    let body = match row {
        Ok(Some((state, files, truncated))) => serde_json::json!({ "state": state, "truncated": truncated, "files": files }),
        Ok(None) => serde_json::json!({ "state": "waiting", "truncated": false, "files": [] }),
        Err(error) => {
            tracing::warn!(%error, "reading a debug listing failed");
            return (StatusCode::SERVICE_UNAVAILABLE, "try again\n").into_response();
        }
    };
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// The instance's log (the deployment's `debug` stream), paged like every log.
async fn logs(
    State(store): State<EventStore>,
    Path((environment, session)): Path<(Uuid, Uuid)>,
    Query(query): Query<crate::logs::LogQuery>,
    extensions: axum::http::Extensions,
) -> Response {
    match record(&store, environment, session, "logs", &viewer_of(&extensions)).await {
        Ok(open) => crate::logs::serve(&store.pool, open.deployment_id.0, "debug", query).await,
        Err(response) => response,
    }
}
