//! Rebuild triggers: `POST /hooks/{project}/{tier}/rebuild` redeploys a tier's environments at
//! their current commits, for something outside git that changed (a CMS's content, a database).
//!
//! - The caller proves itself with the trigger's token, in `X-Trigger-Token` or `?token=` (for
//!   senders that can only be given a URL). Only the token's SHA-256 is kept; it is compared in
//!   constant time, and an unknown project, tier or token all get the same 401.
//! - `Idempotency-Key` makes a retried request a no-op: the deployment ids derive from the
//!   trigger and the key, so the second request finds its deployments already there.
//! - A frozen tier refuses (409): a trigger is an automatic deploy.

use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Utc;
use serde::Deserialize;
use serde_json::json;
use understudy_adapters::{CommandError, EventStore};
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_domain::values::TierName;
use understudy_domain::{DomainError, Metadata};
use uuid::Uuid;

/// Trigger tokens start with this, to tell them apart from API tokens (`us_`).
pub const TRIGGER_TOKEN_PREFIX: &str = "ust_";
/// The header that carries a trigger's token.
pub const TOKEN_HEADER: &str = "x-trigger-token";
/// Longest idempotency key kept.
const MAX_KEY: usize = 200;

pub fn router(store: EventStore) -> Router {
    Router::new().route("/hooks/{project}/{tier}/rebuild", post(rebuild).layer(DefaultBodyLimit::max(16 * 1024))).with_state(store)
}

/// A new trigger token: `ust_` and 32 random bytes in hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
    format!("{TRIGGER_TOKEN_PREFIX}{}", hex::encode(bytes))
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

fn refuse(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into(), "code": code }))).into_response()
}

async fn rebuild(
    State(store): State<EventStore>,
    Path((project, tier)): Path<(String, String)>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
) -> Response {
    let unauthorized = || refuse(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", "unknown trigger, or a wrong token");
    let token = headers.get(TOKEN_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string).or(query.token);
    let Some(token) = token.filter(|t| t.starts_with(TRIGGER_TOKEN_PREFIX) && t.len() < 200) else {
        return refuse(StatusCode::UNAUTHORIZED, "UNAUTHENTICATED", format!("send the trigger's token in {TOKEN_HEADER} or ?token="));
    };
    let (Ok(project_id), Ok(tier)) = (Uuid::parse_str(&project), TierName::parse(tier)) else {
        return unauthorized();
    };
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => Uuid::new_v4().to_string(),
        Some(Ok(key)) if !key.is_empty() && key.len() <= MAX_KEY => key.to_string(),
        Some(_) => return refuse(StatusCode::BAD_REQUEST, "BAD_USER_INPUT", format!("Idempotency-Key: 1 to {MAX_KEY} visible characters")),
    };
    let project = match store.projects.load(project_id).await {
        Ok(state) => state.into_inner(),
        Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "INTERNAL", format!("loading the project: {error}")),
    };
    let hash = crate::auth::hash_token(&token);
    let trigger = project
        .triggers
        .iter()
        .find(|(_, t)| t.tier == tier && crate::auth::constant_time_eq(t.token_sha256.as_bytes(), hash.as_bytes()))
        .map(|(id, _)| *id);
    let (Some(trigger), Some(tier_state)) = (trigger, project.tiers.get(&tier)) else {
        return unauthorized();
    };
    if !project.active {
        return refuse(StatusCode::CONFLICT, "INACTIVE", "the project is deactivated");
    }
    if let Some(freeze) = &tier_state.frozen {
        return refuse(StatusCode::CONFLICT, "FROZEN", format!("tier {tier} is frozen by {}: {}", freeze.by, freeze.reason));
    }
    let environments =
        match understudy_adapters::promoter::tier_environments(&store.pool, ProjectId(project_id), &project, tier_state).await {
            Ok(environments) => environments,
            Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "INTERNAL", format!("listing the tier's environments: {error}")),
        };
    let meta = Metadata::new(Uuid::new_v4(), format!("trigger:{trigger}"));
    let mut deployments = Vec::new();
    for (environment, branch, entrypoint) in environments {
        let deployment = DeploymentId(Uuid::new_v5(&environment, format!("trigger:{trigger}:{key}").as_bytes()));
        let command = EnvironmentCommand::Redeploy { deployment_id: deployment, at: Utc::now() };
        let duplicate = match store.environments.execute(environment, command, meta.clone()).await {
            Ok(_) => false,
            Err(CommandError::Domain(DomainError::AlreadyExists { .. })) => true,
            Err(CommandError::Domain(error)) => {
                return refuse(StatusCode::CONFLICT, "BAD_USER_INPUT", format!("environment {environment}: {error}"));
            }
            Err(error) => return refuse(StatusCode::SERVICE_UNAVAILABLE, "INTERNAL", error.to_string()),
        };
        deployments.push(json!({
            "environment": environment, "branch": branch, "entrypoint": entrypoint,
            "deployment": deployment.0, "duplicate": duplicate,
        }));
    }
    let body = json!({ "tier": tier.as_str(), "idempotencyKey": key, "deployments": deployments });
    (StatusCode::ACCEPTED, Json(body)).into_response()
}
