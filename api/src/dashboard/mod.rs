//! The dashboard, served by the API itself: one HTML shell for every `/dashboard/...` page, a
//! small ES module that draws the pages from the GraphQL API and follows its subscriptions, and a
//! stylesheet. No framework and no build step: the files are compiled into the binary.
//!
//! Pages (the module routes on the path):
//! - `/dashboard`: your accounts and their projects, and invitations waiting for you
//! - `/dashboard/{account}`: projects, members and roles, invitations, billing (mangled)
//! - `/dashboard/{account}/{project}`: its environments, live
//! - `/dashboard/{account}/{project}/-/settings`: production branch, secrets (names only)
//! - `/dashboard/{account}/{project}/{branch}[?entrypoint=…]`: one environment, live: status,
//!   preview link, tests, build log, actions, and a notice when a newer version is ready
//! - `…/{branch}/logs/build/` and `…/{branch}/logs/tests/{test}`: a log on its own page, live
//! - `/dashboard/-/tokens`: API tokens
//! - `/dashboard/-/new`: your repositories on GitHub, to make one a project

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;

const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");
const ICON: &str =
    "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 32 32\"><rect width=\"32\" height=\"32\" rx=\"7\" fill=\"#2456d6\"/>\
     <path d=\"M9 9v9a7 7 0 0 0 14 0V9\" fill=\"none\" stroke=\"#fff\" stroke-width=\"3.5\" stroke-linecap=\"round\"/></svg>";

/// Scripts, styles and connections only from our own origin; no framing.
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self' ws: wss:; \
     frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn router() -> Router {
    Router::new()
        .route("/", get(|| async { Redirect::to("/dashboard") }))
        .route("/dashboard", get(shell))
        .route("/dashboard/", get(shell))
        .route("/dashboard/{*page}", get(shell))
        .route("/assets/dashboard.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/assets/dashboard.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
        .route("/assets/icon.svg", get(|| async { asset(ICON, "image/svg+xml") }))
        .route("/favicon.ico", get(|| async { Redirect::permanent("/assets/icon.svg") }))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

async fn shell() -> Response {
    let html = "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
        <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
        <title>Understudy</title><link rel=\"icon\" href=\"/assets/icon.svg\" type=\"image/svg+xml\"><link rel=\"stylesheet\" href=\"/assets/dashboard.css\"></head>\
        <body><a class=\"sr-only\" href=\"#main\">Skip to content</a>\
        <header class=\"top\"><a class=\"brand\" href=\"/dashboard\">Understudy</a><nav id=\"who\" aria-label=\"Account\"></nav></header>\
        <main id=\"main\" tabindex=\"-1\"><p class=\"muted\">Loading…</p>\
        <noscript><p>The dashboard needs JavaScript. Everything it shows is also in the GraphQL API at /graphql.</p></noscript></main>\
        <script type=\"module\" src=\"/assets/dashboard.js\"></script></body></html>\n";
    let mut response = axum::response::Html(html).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}
