//! The preview proxy: requests for `{environment}.{preview domain}` go to that environment's
//! running app, through the unix socket its sandbox bridges to the app's port. HTTP and
//! WebSocket (the Wing Console needs both).
//!
//! A preview that is not running gets a page that says why: building (refreshes itself),
//! stale (the visit wakes it: the next commit or visit brings it back), gone (410).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use chrono::Utc;
use hyper_util::rt::TokioIo;
use understudy_adapters::preview::token::{self, PreviewSigner};
use understudy_adapters::preview::{debug_session_of_host, environment_of_host, unix_http};
use understudy_adapters::EventStore;
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::ids::{DeploymentId, EnvironmentId, ProjectId};
use understudy_domain::Metadata;
use uuid::Uuid;

#[derive(Clone)]
pub struct PreviewProxy {
    pub store: EventStore,
    /// `UNDERSTUDY_PREVIEW_DOMAIN`: previews are `{environment}.{domain}`.
    pub domain: Arc<str>,
    /// Whether previews are served at all (see `PreviewConfig::public`).
    pub public: bool,
    /// Signs the `X-Understudy-Token` every proxied request carries.
    pub signer: Option<Arc<PreviewSigner>>,
    /// Who may see a preview that is not public.
    pub auth: crate::auth::Auth,
}

/// Middleware in front of the whole router: preview hosts are proxied, anything else goes on.
pub async fn route(State(proxy): State<PreviewProxy>, request: Request, next: Next) -> Response {
    let host = request
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| request.uri().authority().map(|a| a.as_str()))
        .unwrap_or_default()
        .to_string();
    if let Some(session) = debug_session_of_host(&host, &proxy.domain) {
        return proxy.debug(session, request).await;
    }
    match environment_of_host(&host, &proxy.domain) {
        Some(environment) => proxy.serve(environment, request).await,
        None => next.run(request).await,
    }
}

impl PreviewProxy {
    async fn serve(&self, environment: EnvironmentId, request: Request) -> Response {
        if !self.public && self.auth.oauth.is_none() {
            return page(
                StatusCode::FORBIDDEN,
                "Previews are not public here",
                "Sign-in with GitHub is not set up (GITHUB_CLIENT_ID, GITHUB_CLIENT_SECRET), so nobody can be let in. An operator \
                 can serve previews to everyone who reaches this address with UNDERSTUDY_PUBLIC_PREVIEWS=true.",
            );
        }
        let row: Result<Option<(String, Uuid, Option<String>)>, sqlx::Error> = sqlx::query_as(
            "SELECT e.status, e.project_id, r.socket FROM environments e LEFT JOIN preview_routes r USING (environment_id)
             WHERE e.environment_id = $1",
        )
        .bind(environment.0)
        .fetch_optional(&self.store.pool)
        .await;
        let (status, project, socket) = match row {
            Ok(Some(row)) => row,
            Ok(None) => return page(StatusCode::NOT_FOUND, "No such preview", "There is no preview environment at this address."),
            Err(error) => {
                tracing::warn!(%error, "preview lookup failed");
                return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The preview could not be looked up just now.");
            }
        };
        if !self.public {
            match self.auth.preview_access(environment, ProjectId(project), request.method(), request.uri(), request.headers()).await {
                crate::auth::PreviewAccess::Allowed => {}
                crate::auth::PreviewAccess::Answer(response) => return response,
            }
        }
        match (status.as_str(), socket) {
            ("Terminated", _) => page(
                StatusCode::GONE,
                "This preview is gone",
                "Its pull request was closed or its branch deleted, and the environment was torn down.",
            ),
            ("Stale", _) => self.wake(environment).await,
            (_, Some(socket)) => {
                self.visited(environment).await;
                let mut request = request;
                // Only the proxy speaks for Understudy: whatever a client sent in its name goes.
                request.headers_mut().remove(token::HEADER);
                // Our access cookie is for the proxy, not for the app.
                crate::auth::strip_cookie(request.headers_mut(), crate::auth::PREVIEW_COOKIE);
                if let Some(signer) = &self.signer {
                    let token = signer.token(environment, ProjectId(project), Utc::now().timestamp());
                    if let Ok(value) = HeaderValue::from_str(&token) {
                        request.headers_mut().insert(token::HEADER, value);
                    }
                }
                forward(std::path::Path::new(&socket), request).await
            }
            ("Failed", None) => page(StatusCode::BAD_GATEWAY, "This preview failed", "Its build or start failed; see the build log."),
            (status, None) => {
                let mut response = page(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "This preview is on its way",
                    &format!("Status: {status}. This page reloads by itself."),
                );
                response.headers_mut().insert(header::REFRESH, HeaderValue::from_static("3"));
                response.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
                response
            }
        }
    }

    /// A debug session's tunnel: to its instance's port, for whoever holds the session's token
    /// (a browser trades `?token=` at [`crate::debug::DEBUG_HANDOFF_PATH`] for a host-only
    /// cookie; other clients send `X-Understudy-Debug-Token`). Neither reaches the app.
    async fn debug(&self, session: Uuid, request: Request) -> Response {
        use crate::debug::{DEBUG_COOKIE, DEBUG_HANDOFF_PATH, DEBUG_HEADER};
        type Row = (Uuid, Uuid, String, bool, i64, Option<String>, Option<String>);
        let key = session.to_string();
        let row: Result<Option<Row>, sqlx::Error> = sqlx::query_as(
            "SELECT e.environment_id, e.project_id, s->>'token_sha256', (s->>'expires_at')::timestamptz > now(),
                    GREATEST(0, EXTRACT(EPOCH FROM (s->>'expires_at')::timestamptz - now()))::bigint, i.socket, i.state
             FROM environments e
             CROSS JOIN LATERAL (SELECT e.state->'debug_sessions'->$1 AS s) session
             LEFT JOIN debug_instances i ON i.session_id = $2
             WHERE e.state ? 'debug_sessions' AND e.state->'debug_sessions' ? $1",
        )
        .bind(&key)
        .bind(session)
        .fetch_optional(&self.store.pool)
        .await;
        let (environment, project, token_sha256, open, seconds_left, socket, state) = match row {
            Ok(Some(row)) => row,
            Ok(None) => return page(StatusCode::NOT_FOUND, "No debug session here", "It was closed, it expired, or it never was."),
            Err(error) => {
                tracing::warn!(%error, "debug session lookup failed");
                return page(StatusCode::SERVICE_UNAVAILABLE, "Try again", "The debug session could not be looked up just now.");
            }
        };
        let matches = |token: &str| crate::auth::constant_time_eq(crate::auth::hash_token(token).as_bytes(), token_sha256.as_bytes());
        if request.uri().path() == DEBUG_HANDOFF_PATH {
            let token = request.uri().query().unwrap_or_default().split('&').find_map(|p| p.strip_prefix("token=")).unwrap_or_default();
            if !matches(token) {
                return page(StatusCode::FORBIDDEN, "Wrong token", "This link does not open this debug session.");
            }
            let mut response = axum::response::Redirect::to("/").into_response();
            let cookie = self.auth.cookie_header(DEBUG_COOKIE, token, seconds_left, true);
            response.headers_mut().append(header::SET_COOKIE, cookie);
            return response;
        }
        let header_token = request.headers().get(DEBUG_HEADER).and_then(|v| v.to_str().ok()).map(str::to_string);
        let presented = header_token.or_else(|| crate::auth::cookie(request.headers(), DEBUG_COOKIE));
        if !presented.as_deref().is_some_and(matches) {
            return page(
                StatusCode::UNAUTHORIZED,
                "This debug tunnel needs its token",
                "Open the link openDebugSession gave, or send the token in X-Understudy-Debug-Token.",
            );
        }
        if !open {
            return page(StatusCode::GONE, "This debug session is over", "It expired; open a new one.");
        }
        let Some(socket) = socket else {
            let state = state.unwrap_or_else(|| "waiting for a worker".into());
            let mut response = page(StatusCode::SERVICE_UNAVAILABLE, "The debug instance is not serving", &format!("It is {state}."));
            if state == "waiting for a worker" || state == "building" {
                response.headers_mut().insert(header::REFRESH, HeaderValue::from_static("3"));
            }
            return response;
        };
        let mut request = request;
        request.headers_mut().remove(DEBUG_HEADER);
        request.headers_mut().remove(token::HEADER);
        crate::auth::strip_cookie(request.headers_mut(), DEBUG_COOKIE);
        if let Some(signer) = &self.signer {
            let token = signer.token(EnvironmentId(environment), ProjectId(project), Utc::now().timestamp());
            if let Ok(value) = HeaderValue::from_str(&token) {
                request.headers_mut().insert(token::HEADER, value);
            }
        }
        forward(std::path::Path::new(&socket), request).await
    }

    /// A visit to a stale preview: redeploy its latest commit.
    async fn wake(&self, environment: EnvironmentId) -> Response {
        let meta = Metadata::new(Uuid::new_v4(), "system:proxy");
        let command = EnvironmentCommand::Wake { deployment_id: DeploymentId(Uuid::new_v4()), at: Utc::now() };
        if let Err(error) = self.store.environments.execute(environment.0, command, meta).await {
            // Another visit woke it first: fine.
            tracing::debug!(%error, "wake refused");
        }
        let mut response = page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Waking this preview up",
            "Nobody had visited or pushed for a while, so it was put to sleep. It is being rebuilt; this page reloads by itself.",
        );
        response.headers_mut().insert(header::REFRESH, HeaderValue::from_static("5"));
        response
    }

    /// Remembers the visit for the stale sweep, at most once a minute per environment.
    async fn visited(&self, environment: EnvironmentId) {
        let _ = sqlx::query(
            "INSERT INTO preview_visits (environment_id, visited_at) VALUES ($1, now())
             ON CONFLICT (environment_id) DO UPDATE SET visited_at = now()
             WHERE preview_visits.visited_at < now() - interval '1 minute'",
        )
        .bind(environment.0)
        .execute(&self.store.pool)
        .await;
    }
}

/// `/.well-known/jwks.json`: the public key preview apps verify `X-Understudy-Token` with.
pub async fn jwks(State(proxy): State<PreviewProxy>) -> Response {
    match &proxy.signer {
        Some(signer) => {
            let mut response = axum::Json(signer.jwks()).into_response();
            response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("public, max-age=300"));
            response
        }
        None => (StatusCode::NOT_FOUND, "preview tokens are not signed on this node\n").into_response(),
    }
}

/// Sends `request` to the app behind `socket`, and its answer back; upgrades (WebSocket) are
/// spliced through once both sides agree.
async fn forward(socket: &std::path::Path, mut request: Request) -> Response {
    let mut sender = match unix_http::connect::<Body>(socket).await {
        Ok(sender) => sender,
        Err(error) => {
            tracing::debug!(%error, socket = %socket.display(), "preview not reachable");
            let mut response =
                page(StatusCode::BAD_GATEWAY, "This preview is not answering", "Its app may be restarting; this page reloads by itself.");
            response.headers_mut().insert(header::REFRESH, HeaderValue::from_static("3"));
            return response;
        }
    };
    let wants_upgrade = request.headers().contains_key(header::UPGRADE);
    let client_upgrade = wants_upgrade.then(|| hyper::upgrade::on(&mut request));
    let host = request.headers().get(header::HOST).cloned();
    if let Some(host) = host {
        request.headers_mut().insert("x-forwarded-host", host);
    }
    // The path and query alone: the app sees an origin-form request as from any client.
    let path = request.uri().path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    *request.uri_mut() = path.parse().unwrap_or_default();
    let mut response = match sender.send_request(request).await {
        Ok(response) => response,
        Err(error) => return page(StatusCode::BAD_GATEWAY, "This preview did not answer", &error.to_string()),
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client_upgrade) = client_upgrade {
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                if let (Ok(client), Ok(upstream)) = tokio::join!(client_upgrade, upstream_upgrade) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
                }
            });
        }
    }
    response.map(Body::new)
}

/// A small HTML page for a preview that cannot be shown.
fn page(status: StatusCode, title: &str, text: &str) -> Response {
    let escape = |s: &str| s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;");
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{title}</title>\
         <style>body{{font:16px system-ui,sans-serif;max-width:36rem;margin:4rem auto;padding:0 1rem;color:#222}}</style></head>\
         <body><h1>{title}</h1><p>{text}</p><p><small>Understudy preview</small></p></body></html>",
        title = escape(title),
        text = escape(text)
    );
    (status, Html(html)).into_response()
}
