//! The HTTP router: GitHub webhooks, GraphQL over HTTP and graphql-transport-ws, deployment logs,
//! health, and the preview proxy in front of it all.

use async_graphql::http::{GraphiQLSource, MultipartOptions};
use async_graphql_axum::{GraphQLResponse, GraphQLSubscription};
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, get_service, post};
use axum::Router;

use crate::graphql::AppSchema;
use crate::webhooks::{self, WebhookState, MAX_WEBHOOK_BODY};

/// Largest GraphQL request body accepted (a query and its variables): larger ones get 413.
pub const MAX_GRAPHQL_BODY: usize = 64 * 1024;

/// What `/readyz` checks.
#[derive(Clone)]
pub struct Readiness {
    pub pool: sqlx::PgPool,
    pub nats: async_nats::Client,
    /// A projection further behind the log than this is not ready.
    pub max_lag: i64,
}

/// `/readyz`: 200 when Postgres answers, NATS is connected and every projection is within
/// `max_lag` events of the log's head; 503 with the reasons otherwise.
async fn readyz(State(readiness): State<Readiness>) -> Response {
    let mut problems = Vec::new();
    let lags = match tokio::time::timeout(std::time::Duration::from_secs(2), understudy_projections::projector::lag(&readiness.pool)).await
    {
        Ok(Ok(lags)) => lags,
        Ok(Err(error)) => {
            problems.push(format!("postgres: {error}"));
            vec![]
        }
        Err(_) => {
            problems.push("postgres: no answer within 2 s".to_string());
            vec![]
        }
    };
    if readiness.nats.connection_state() != async_nats::connection::State::Connected {
        problems.push(format!("nats: {}", readiness.nats.connection_state()));
    }
    for lag in &lags {
        if lag.lag > readiness.max_lag {
            problems.push(format!("projection {} is {} events behind", lag.projection, lag.lag));
        }
    }
    let body = serde_json::json!({ "ready": problems.is_empty(), "problems": problems, "projections": lags });
    let status = if problems.is_empty() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

pub fn router(schema: AppSchema, webhooks: WebhookState, readiness: Readiness, proxy: crate::proxy::PreviewProxy) -> Router {
    let graphql = Router::new()
        .route(
            "/graphql",
            get_service(GraphQLSubscription::new(schema.clone())).post(graphql).layer(DefaultBodyLimit::max(MAX_GRAPHQL_BODY)),
        )
        .with_state(schema);
    let github = Router::new()
        .route("/webhooks/github", post(webhooks::receive).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)))
        .with_state(webhooks);
    let metrics = Router::new().route("/metrics", get(crate::metrics::metrics)).with_state(readiness.pool.clone());
    let logs = crate::logs::router(readiness.pool.clone());
    let ready = Router::new().route("/readyz", get(readyz)).with_state(readiness);
    Router::new()
        .merge(logs)
        .merge(graphql)
        .merge(github)
        .merge(ready)
        .merge(metrics)
        .route("/graphiql", get(graphiql))
        .route("/healthz", get(|| async { "ok" }))
        .merge(Router::new().route("/.well-known/jwks.json", get(crate::proxy::jwks)).with_state(proxy.clone()))
        // Preview hosts are proxied before any route of ours is matched.
        .layer(axum::middleware::from_fn_with_state(proxy, crate::proxy::route))
}

/// GraphQL over HTTP. The body is read through axum's `Bytes` extractor so the size limit holds.
async fn graphql(State(schema): State<AppSchema>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match async_graphql::http::receive_body(content_type, body.as_ref(), MultipartOptions::default()).await {
        Ok(request) => GraphQLResponse::from(schema.execute(request).await).into_response(),
        Err(error) => (StatusCode::BAD_REQUEST, format!("not a GraphQL request: {error}")).into_response(),
    }
}

async fn graphiql() -> impl IntoResponse {
    Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish())
}
