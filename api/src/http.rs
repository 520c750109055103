//! The HTTP router: GitHub webhooks, GraphQL over HTTP and graphql-transport-ws, deployment logs,
//! health, and the preview proxy in front of it all.

use async_graphql::http::{GraphiQLSource, MultipartOptions};
use async_graphql_axum::GraphQLResponse;
use axum::extract::ws::WebSocketUpgrade;
use axum::Extension;

use crate::auth::Viewer;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use crate::graphql::AppSchema;
use crate::shared_subscriptions::SharedSubscriptions;
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

/// `/metrics` and `/healthz` alone, for a process that serves no API (`--metrics-listen`).
pub fn metrics_router(pool: sqlx::PgPool) -> Router {
    Router::new().route("/metrics", get(crate::metrics::metrics)).with_state(pool).route("/healthz", get(|| async { "ok" }))
}

pub fn router(
    schema: AppSchema,
    auth: crate::auth::Auth,
    webhooks: WebhookState,
    readiness: Readiness,
    proxy: crate::proxy::PreviewProxy,
    ws_keepalive: std::time::Duration,
) -> Router {
    let graphql = Router::new()
        .route("/graphql", get(graphql_ws).post(graphql).layer(DefaultBodyLimit::max(MAX_GRAPHQL_BODY)))
        .with_state(GraphqlState { subscriptions: SharedSubscriptions::new(schema.clone()), schema, auth: auth.clone(), ws_keepalive });
    let github = Router::new()
        .route("/webhooks/github", post(webhooks::receive).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)))
        .with_state(webhooks);
    let metrics = metrics_router(readiness.pool.clone());
    let logs = crate::logs::router(readiness.pool.clone(), auth.clone());
    let triggers = crate::triggers::router(auth.store.clone());
    let debug = crate::debug::router(auth.store.clone(), auth.clone());
    let ready = Router::new().route("/readyz", get(readyz)).with_state(readiness);
    Router::new()
        .merge(logs)
        .merge(triggers)
        .merge(debug)
        .merge(graphql)
        .merge(github)
        .merge(ready)
        .merge(metrics)
        .merge(crate::auth::router(auth.clone()))
        .merge(crate::dashboard::router())
        .route("/graphiql", get(graphiql))
        .merge(Router::new().route("/.well-known/jwks.json", get(crate::proxy::jwks)).with_state(proxy.clone()))
        // Who is asking, for every route of ours (not for previews: the proxy checks those).
        .layer(axum::middleware::from_fn_with_state(auth, crate::auth::identify))
        // Preview hosts are proxied before any route of ours is matched.
        .layer(axum::middleware::from_fn_with_state(proxy, crate::proxy::route))
}

#[derive(Clone)]
struct GraphqlState {
    schema: AppSchema,
    /// The executor of GraphQL over WebSocket: the same schema, with identical live subscriptions
    /// resolved once per node.
    subscriptions: SharedSubscriptions,
    auth: crate::auth::Auth,
    /// How often each socket is pinged, and how long it has to answer.
    ws_keepalive: std::time::Duration,
}

/// GraphQL over HTTP. The body is read through axum's `Bytes` extractor so the size limit holds.
async fn graphql(State(state): State<GraphqlState>, Extension(viewer): Extension<Viewer>, headers: HeaderMap, body: Bytes) -> Response {
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(str::to_owned);
    match async_graphql::http::receive_body(content_type, body.as_ref(), MultipartOptions::default()).await {
        Ok(request) => GraphQLResponse::from(state.schema.execute(request.data(viewer)).await).into_response(),
        Err(error) => (StatusCode::BAD_REQUEST, format!("not a GraphQL request: {error}")).into_response(),
    }
}

/// GraphQL over WebSocket (`graphql-transport-ws`, and the older `graphql-ws`). Who is asking is
/// settled at the upgrade, from the cookie or the `Authorization` header. With a cookie, the
/// page must be ours: browsers send cookies on cross-site WebSocket handshakes too.
async fn graphql_ws(
    State(state): State<GraphqlState>,
    Extension(viewer): Extension<Viewer>,
    protocol: crate::graphql_ws::Protocol,
    upgrade: WebSocketUpgrade,
    headers: HeaderMap,
) -> Response {
    if matches!(viewer, Viewer::User { session_id: Some(_), .. }) {
        let origin = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()).unwrap_or_default();
        if origin.trim_end_matches('/') != state.auth.public_url {
            return crate::auth::denied_response(&crate::auth::Denied::Forbidden(format!(
                "a signed-in WebSocket must come from a page of {} (Origin was {origin:?})",
                state.auth.public_url
            )));
        }
    }
    let mut data = async_graphql::Data::default();
    data.insert(viewer);
    let (subscriptions, keepalive) = (state.subscriptions, state.ws_keepalive);
    // Small buffers: a subscriber mostly waits, and ten thousand of them must fit one node
    // (the defaults, 128 KiB to read per socket, made a subscriber cost ~150 KiB). Messages are
    // capped like GraphQL request bodies.
    upgrade
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .max_message_size(MAX_GRAPHQL_BODY)
        .max_frame_size(MAX_GRAPHQL_BODY)
        // The handshake's answer names the protocol the socket will speak: the first of the
        // client's list that we speak (offered all, axum would answer with the first of ours).
        .protocols([protocol.0.sec_websocket_protocol()])
        .on_upgrade(move |socket| crate::graphql_ws::serve(socket, subscriptions, protocol.0, data, keepalive))
}

async fn graphiql() -> impl IntoResponse {
    Html(GraphiQLSource::build().endpoint("/graphql").subscription_endpoint("/graphql").finish())
}
