//! Deployment logs over HTTP, page by page:
//!
//! - `GET /deployments/{id}/logs/{build|run|tests}` and `/deployments/{id}/logs/tests/{test}`
//! - `GET /deployments/{id}/logs/jobs/{job}`: a tier's scheduled job's runs
//! - `GET /environments/{id}/logs/…`: the same for the environment's latest deployment
//!
//! `?from=<unix nanos>` returns the lines after `from` (at most `limit`, default 1000) and the
//! header `X-Last-Log-Nano`, the `from` of the next page: a poller never sees a line twice.
//! `?download=1` returns the whole log as a file.
//!
//! A smoke test's artifacts (screenshots, logs) are under the same guard:
//! `GET /deployments/{id}/artifacts` lists them (JSON), `…/artifacts/{name}` serves one.

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use sqlx::PgPool;
use understudy_adapters::preview::logs::{read_after, LogLine};
use uuid::Uuid;

const PAGE: i64 = 1000;
const MAX_PAGE: i64 = 10_000;

#[derive(Deserialize, Default)]
pub struct LogQuery {
    #[serde(default)]
    from: i64,
    limit: Option<i64>,
    #[serde(default)]
    download: Option<String>,
    /// `json` for JSON lines of `{stream, nano, line}`; plain text otherwise.
    format: Option<String>,
}

pub fn router(pool: PgPool, auth: crate::auth::Auth) -> Router {
    Router::new()
        .route("/deployments/{id}/logs/{kind}", get(deployment_log))
        .route("/deployments/{id}/logs/tests/{test}", get(deployment_test_log))
        .route("/environments/{id}/logs/{kind}", get(environment_log))
        .route("/environments/{id}/logs/tests/{test}", get(environment_test_log))
        .route("/deployments/{id}/logs/jobs/{job}", get(deployment_job_log))
        .route("/environments/{id}/logs/jobs/{job}", get(environment_job_log))
        .route("/deployments/{id}/artifacts", get(artifacts))
        .route("/deployments/{id}/artifacts/{name}", get(artifact))
        .route_layer(axum::middleware::from_fn_with_state(auth, guard))
        .with_state(pool)
}

/// Only someone who may see the project's previews reads its logs.
pub(crate) async fn guard(
    State(auth): State<crate::auth::Auth>,
    Path(params): Path<Vec<(String, String)>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let viewer = request.extensions().get::<crate::auth::Viewer>().cloned().unwrap_or(crate::auth::Viewer::Anonymous);
    let id = params.iter().find(|(k, _)| k == "id").and_then(|(_, v)| Uuid::parse_str(v).ok());
    let Some(id) = id else { return not_found("id") };
    let project = if request.uri().path().starts_with("/deployments/") {
        auth.project_of_deployment(id).await
    } else {
        auth.project_of_environment(id).await
    };
    let denied = match project {
        Err(error) => return unavailable(error),
        Ok(None) if viewer == crate::auth::Viewer::Anonymous => crate::auth::Denied::Unauthenticated,
        Ok(None) => crate::auth::Denied::NotFound(format!("no logs of {id} that you can see")),
        Ok(Some(project)) => {
            match auth.require_project(&viewer, project, understudy_domain::permissions::Permission::ViewPreviewEnvironments).await {
                Ok(()) => return next.run(request).await,
                Err(denied) => denied,
            }
        }
    };
    crate::auth::denied_response(&denied)
}

/// The stored stream name of a log kind in a URL.
fn stream_of(kind: &str) -> Option<String> {
    match kind {
        "build" | "run" | "debug" => Some(kind.to_string()),
        "tests" => Some("test*".to_string()),
        _ => None,
    }
}

async fn deployment_log(State(pool): State<PgPool>, Path((id, kind)): Path<(Uuid, String)>, Query(q): Query<LogQuery>) -> Response {
    match stream_of(&kind) {
        Some(stream) => serve(&pool, id, &stream, q).await,
        None => not_found(&kind),
    }
}

async fn deployment_test_log(State(pool): State<PgPool>, Path((id, test)): Path<(Uuid, String)>, Query(q): Query<LogQuery>) -> Response {
    serve(&pool, id, &format!("test:{test}"), q).await
}

async fn deployment_job_log(State(pool): State<PgPool>, Path((id, job)): Path<(Uuid, String)>, Query(q): Query<LogQuery>) -> Response {
    serve(&pool, id, &format!("job:{job}"), q).await
}

/// A scheduled job's runs in the environment's latest deployment.
async fn environment_job_log(State(pool): State<PgPool>, Path((id, job)): Path<(Uuid, String)>, Query(q): Query<LogQuery>) -> Response {
    match latest_deployment(&pool, id).await {
        Ok(Some(deployment)) => serve(&pool, deployment, &format!("job:{job}"), q).await,
        Ok(None) => (StatusCode::NOT_FOUND, "no such environment, or it has no deployment yet\n").into_response(),
        Err(response) => response,
    }
}

async fn environment_log(State(pool): State<PgPool>, Path((id, kind)): Path<(Uuid, String)>, Query(q): Query<LogQuery>) -> Response {
    let Some(stream) = stream_of(&kind) else { return not_found(&kind) };
    match latest_deployment(&pool, id).await {
        Ok(Some(deployment)) => serve(&pool, deployment, &stream, q).await,
        Ok(None) => (StatusCode::NOT_FOUND, "no such environment, or it has no deployment yet\n").into_response(),
        Err(response) => response,
    }
}

async fn environment_test_log(State(pool): State<PgPool>, Path((id, test)): Path<(Uuid, String)>, Query(q): Query<LogQuery>) -> Response {
    match latest_deployment(&pool, id).await {
        Ok(Some(deployment)) => serve(&pool, deployment, &format!("test:{test}"), q).await,
        Ok(None) => (StatusCode::NOT_FOUND, "no such environment, or it has no deployment yet\n").into_response(),
        Err(response) => response,
    }
}

async fn latest_deployment(pool: &PgPool, environment: Uuid) -> Result<Option<Uuid>, Response> {
    sqlx::query_scalar::<_, Option<Uuid>>("SELECT latest_deployment_id FROM environments WHERE environment_id = $1")
        .bind(environment)
        .fetch_optional(pool)
        .await
        .map(Option::flatten)
        .map_err(unavailable)
}

async fn artifacts(State(pool): State<PgPool>, Path(id): Path<Uuid>) -> Response {
    let rows: Result<Vec<(String, i32, chrono::DateTime<chrono::Utc>)>, _> =
        sqlx::query_as("SELECT name, length(content), created_at FROM deployment_artifacts WHERE deployment_id = $1 ORDER BY name")
            .bind(id)
            .fetch_all(&pool)
            .await;
    match rows {
        Ok(rows) => {
            let list: Vec<serde_json::Value> = rows
                .into_iter()
                .map(|(name, size, at)| serde_json::json!({ "name": name, "size": size, "createdAt": at, "url": format!("/deployments/{id}/artifacts/{name}") }))
                .collect();
            axum::Json(list).into_response()
        }
        Err(error) => unavailable(error),
    }
}

/// One artifact. It is the app's own output, so it is never rendered as a page of ours:
/// images as images, everything else as plain text or a download, under a sandboxing CSP.
async fn artifact(State(pool): State<PgPool>, Path((id, name)): Path<(Uuid, String)>) -> Response {
    let content: Option<Vec<u8>> =
        match sqlx::query_scalar("SELECT content FROM deployment_artifacts WHERE deployment_id = $1 AND name = $2")
            .bind(id)
            .bind(&name)
            .fetch_optional(&pool)
            .await
        {
            Ok(content) => content,
            Err(error) => return unavailable(error),
        };
    let Some(content) = content else {
        return (StatusCode::NOT_FOUND, format!("no artifact {name:?} of deployment {id}\n")).into_response();
    };
    let lower = name.to_ascii_lowercase();
    let content_type = if lower.ends_with(".png") {
        "image/png"
    } else if lower.ends_with(".jpg") || lower.ends_with(".jpeg") {
        "image/jpeg"
    } else if std::str::from_utf8(&content).is_ok() {
        "text/plain; charset=utf-8"
    } else {
        "application/octet-stream"
    };
    let mut response = (StatusCode::OK, content).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox; default-src 'none'"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

fn not_found(kind: &str) -> Response {
    (StatusCode::NOT_FOUND, format!("no log kind {kind:?}: use build, run or tests\n")).into_response()
}

fn unavailable(error: sqlx::Error) -> Response {
    tracing::warn!(%error, "reading logs failed");
    (StatusCode::SERVICE_UNAVAILABLE, "logs are unavailable just now; try again\n").into_response()
}

pub(crate) async fn serve(pool: &PgPool, deployment: Uuid, stream: &str, q: LogQuery) -> Response {
    let limit = match page_size(&q) {
        Ok(limit) => limit,
        Err(response) => return *response,
    };
    let lines = match read_after(pool, deployment, stream, q.from, limit).await {
        Ok(lines) => lines,
        Err(error) => return unavailable(error),
    };
    page(deployment, stream, &q, &lines)
}

/// How many lines to read for `q`, or the response that refuses it.
fn page_size(q: &LogQuery) -> Result<i64, Box<Response>> {
    if q.from < 0 {
        return Err(Box::new((StatusCode::BAD_REQUEST, "from must be unix nanoseconds (>= 0)\n").into_response()));
    }
    Ok(if q.download.is_some() { i64::MAX } else { q.limit.unwrap_or(PAGE).clamp(1, MAX_PAGE) })
}

/// The response carrying `lines`, the lines of `stream` that the database returned for `q`.
fn page(deployment: Uuid, stream: &str, q: &LogQuery, lines: &[LogLine]) -> Response {
    let last = lines.last().map_or(q.from, |l| l.nano);
    let json = q.format.as_deref() == Some("json");
    let body = render(lines, json, stream.ends_with('*'));
    let mut response = (StatusCode::OK, body).into_response();
    let headers = response.headers_mut();
    headers.insert("x-last-log-nano", HeaderValue::from(last));
    let content_type = if json { "application/x-ndjson" } else { "text/plain; charset=utf-8" };
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if q.download.is_some() {
        let name = format!("attachment; filename=\"{deployment}-{}.log\"", stream.trim_end_matches('*').replace([':', '/', '"'], "_"));
        if let Ok(value) = HeaderValue::from_str(&name) {
            headers.insert(header::CONTENT_DISPOSITION, value);
        }
    }
    response
}

fn render(lines: &[LogLine], json: bool, several_streams: bool) -> String {
    let mut out = String::new();
    for line in lines {
        if json {
            out.push_str(&serde_json::to_string(line).unwrap_or_default());
        } else if several_streams {
            out.push_str(&format!("[{}] {}", line.stream, line.line));
        } else {
            out.push_str(&line.line);
        }
        out.push('\n');
    }
    out
}

/// The parts of serving a log that need no database, for the `logs` fuzz target.
#[doc(hidden)]
pub mod fuzzing {
    use super::{LogQuery, Response, Uuid};
    pub use understudy_adapters::preview::logs::LogLine;

    /// The stored stream name of a log kind in a URL.
    pub fn stream_of(kind: &str) -> Option<String> {
        super::stream_of(kind)
    }

    /// The `from` of `q`: the returned lines must come after it.
    pub fn from(q: &LogQuery) -> i64 {
        q.from
    }

    /// How many lines to read for `q`, or the response that refuses it.
    pub fn page_size(q: &LogQuery) -> Result<i64, Box<Response>> {
        super::page_size(q)
    }

    /// The response carrying `lines` of `stream` for `q`.
    pub fn page(deployment: Uuid, stream: &str, q: &LogQuery, lines: &[LogLine]) -> Response {
        super::page(deployment, stream, q, lines)
    }
}
