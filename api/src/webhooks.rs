//! `POST /webhooks/github`: verify, record, answer; processing happens after (see
//! `adapters::github::ingest`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use tokio::sync::Notify;
use understudy_adapters::github::ingest;
use understudy_adapters::github::webhook::{self, Webhook};
use understudy_adapters::metrics::METRICS;

/// GitHub's own cap on a webhook payload.
pub const MAX_WEBHOOK_BODY: usize = 25 * 1024 * 1024;

#[derive(Clone)]
pub struct WebhookState {
    pub recorder: ingest::Recorder,
    /// `GITHUB_WEBHOOK_SECRET`; without it every delivery is refused.
    pub secret: Option<Arc<[u8]>>,
    /// Wakes the delivery processor.
    pub wake: Arc<Notify>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    METRICS.webhook_deliveries.inc(status.as_str());
    (status, Json(json!({ "error": message.into() }))).into_response()
}

#[tracing::instrument(name = "webhook.receive", skip_all, fields(delivery = headers.get("x-github-delivery").and_then(|v| v.to_str().ok()).unwrap_or("")))]
pub async fn receive(State(state): State<WebhookState>, headers: HeaderMap, body: Bytes) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let Some(secret) = &state.secret else {
        return refuse(StatusCode::SERVICE_UNAVAILABLE, "webhooks are not configured: set GITHUB_WEBHOOK_SECRET");
    };
    // The signature is checked before anything else looks at the body.
    if let Err(error) = webhook::verify_signature(secret, &body, header("x-hub-signature-256")) {
        return refuse(StatusCode::UNAUTHORIZED, error.to_string());
    }
    let (Some(event), Some(delivery)) = (header("x-github-event"), header("x-github-delivery")) else {
        return refuse(StatusCode::BAD_REQUEST, "missing X-GitHub-Event or X-GitHub-Delivery header");
    };
    if delivery.is_empty() || delivery.len() > 100 {
        return refuse(StatusCode::BAD_REQUEST, "X-GitHub-Delivery must be 1 to 100 characters");
    }
    let (parsed, action) = match webhook::parse(event, &body) {
        Ok(parsed) => parsed,
        Err(error) => return refuse(StatusCode::BAD_REQUEST, error.to_string()),
    };
    let delivery_row = ingest::Delivery {
        delivery_id: delivery.to_string(),
        event: event.to_string(),
        action,
        body: body.clone(),
        traceparent: understudy_adapters::telemetry::current_traceparent(),
    };
    match state.recorder.record(delivery_row).await {
        Ok(true) => {
            state.wake.notify_one();
            let status = if matches!(parsed, Webhook::Ignored { .. }) { "ignored" } else { "accepted" };
            METRICS.webhook_deliveries.inc(status);
            (StatusCode::ACCEPTED, Json(json!({ "status": status, "delivery": delivery }))).into_response()
        }
        Ok(false) => {
            METRICS.webhook_deliveries.inc("duplicate");
            (StatusCode::OK, Json(json!({ "status": "duplicate", "delivery": delivery }))).into_response()
        }
        Err(error) => {
            tracing::error!(error = %error, "recording a webhook delivery failed");
            refuse(StatusCode::SERVICE_UNAVAILABLE, "could not record the delivery; GitHub will redeliver")
        }
    }
}
