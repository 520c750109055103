//! The HTTP router: GitHub webhooks, GraphQL over HTTP and graphql-transport-ws, health.

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

pub fn router(schema: AppSchema, webhooks: WebhookState) -> Router {
    let graphql = Router::new()
        .route(
            "/graphql",
            get_service(GraphQLSubscription::new(schema.clone())).post(graphql).layer(DefaultBodyLimit::max(MAX_GRAPHQL_BODY)),
        )
        .with_state(schema);
    let github = Router::new()
        .route("/webhooks/github", post(webhooks::receive).layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY)))
        .with_state(webhooks);
    Router::new().merge(graphql).merge(github).route("/graphiql", get(graphiql)).route("/healthz", get(|| async { "ok" }))
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
