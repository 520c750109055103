//! A fake GitHub REST API for tests: an axum server on 127.0.0.1 that answers the calls
//! Understudy makes, at GitHub's real paths and with GitHub's JSON shapes (checked against
//! octocrab 0.54's models), records every request, and can be told to fail or to be slow.
//!
//! Routes served (anything else is a recorded GitHub-style 404):
//! - `GET /app`
//! - `POST /app/installations/{installation_id}/access_tokens` (any installation id is accepted)
//! - `GET /repos/{owner}/{repo}`
//! - `GET /repos/{owner}/{repo}/contents` and `.../contents/` (query `ref`, default branch otherwise)
//! - `GET|POST /repos/{owner}/{repo}/issues/{number}/comments` (`per_page`, `page`, `Link` header)
//! - `GET|PATCH|DELETE /repos/{owner}/{repo}/issues/comments/{comment_id}` (POST is accepted as
//!   PATCH, as GitHub does: octocrab 0.54's `update_comment` sends POST)
//! - `GET|POST /repos/{owner}/{repo}/deployments` (GET filtered by `sha`, `ref`, `task`,
//!   `environment`; `per_page`, `page`, `Link`), `GET|POST .../deployments/{id}/statuses`
//! - `POST /repos/{owner}/{repo}/check-runs`, `GET|PATCH .../check-runs/{id}`,
//!   `GET /repos/{owner}/{repo}/commits/{sha}/check-runs` (`check_name`)
//! - Signing in (the GitHub App's OAuth web flow): `GET /login/oauth/authorize` (answers at once
//!   with the 302 back to `redirect_uri?code&state`, as the person [`FakeGitHub::add_person`]
//!   registered, chosen by GitHub's own `login` parameter), `POST /login/oauth/access_token`
//!   (JSON or form; 200 with `error` for a bad code, as GitHub does) and `GET /user`. With a user
//!   token (`gho_…`), repository routes answer 404 unless [`FakeGitHub::grant`] gave the person
//!   the repository, and `GET /repos/{owner}/{repo}` carries their `permissions`.
//! - `GET /user/repos` (user token; `sort=updated`, `per_page`, `page`, `Link`): the repositories
//!   granted to that person, most recently updated first; `GET /repos/{owner}/{repo}/installation`
//!   (the App's JWT): one installation sees every declared repository; `GET
//!   /repos/{owner}/{repo}/branches/{branch}`: the default branch, and any other whose files were set.
//! - `/repositories/{repo_id}/...` is an alias of `/repos/{owner}/{repo}/...` (GitHub's `Link`
//!   headers use that form).
//!
//! Every repository-scoped route answers 404 until the test declares the repository with
//! [`FakeGitHub::set_repo`], as GitHub does for a repository the installation cannot see.

// Handlers answer GitHub-style error responses through `Result<_, Response>`.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use chrono::{SecondsFormat, Utc};
use serde_json::{json, Map, Value};

pub const APP_ID: u64 = 4242;
pub const APP_SLUG: &str = "understudy";

/// The login of the App's bot user, the author of every comment the App writes.
pub const BOT_LOGIN: &str = "understudy[bot]";
/// The bot user's id (GitHub gives each App's bot user its own user id).
pub const BOT_USER_ID: u64 = 190_004_242;

const DOCS: &str = "https://docs.github.com/rest";
/// The blob sha of an empty file: every declared root file is served as an empty file.
const EMPTY_BLOB_SHA: &str = "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391";
/// GitHub's limit on a comment body, in characters.
const MAX_COMMENT_CHARS: usize = 65_536;

#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// The path, with `?query` if there was one.
    pub path: String,
    /// The JSON body; a body that is not JSON is kept as a JSON string.
    pub body: Option<Value>,
    /// The `Authorization` header as sent (`Bearer <jwt>`, `Bearer ghs_…`, `token …`).
    pub authorization: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FakeComment {
    pub id: u64,
    /// `owner/name`, spelled as in [`FakeGitHub::set_repo`].
    pub repo: String,
    pub issue: u64,
    pub body: String,
    pub login: String,
    pub by_app: bool,
}

struct StoredComment {
    comment: FakeComment,
    user_id: u64,
    created_at: String,
    updated_at: String,
    deleted: bool,
}

struct Repo {
    full_name: String,
    id: u64,
    default_branch: String,
    root_files: Vec<String>,
    root_files_at: HashMap<String, Vec<String>>,
    /// File texts by (ref, path).
    files: HashMap<(String, String), String>,
    /// When it last changed (`updated_at`): each `set_repo` is later than the one before.
    updated_at: String,
}

struct Failure {
    method: String,
    path_prefix: String,
    status: u16,
    retry_after: Option<u64>,
    remaining: usize,
}

struct Inner {
    base_url: String,
    requests: Vec<RecordedRequest>,
    /// Keyed by the lowercased full name: GitHub's names are case-insensitive.
    repos: HashMap<String, Repo>,
    comments: Vec<StoredComment>,
    next_comment_id: u64,
    users: HashMap<String, u64>,
    failures: Vec<Failure>,
    delay: Duration,
    /// Time between doing what a request asks and answering it.
    answer_delay: Duration,
    next_token: u64,
    deployments: Vec<Value>,
    deployment_statuses: Vec<Value>,
    check_runs: Vec<Value>,
    next_deployment_id: u64,
    next_deployment_status_id: u64,
    next_check_run_id: u64,
    oauth: OAuth,
}

/// The OAuth side: the App's client, the people who can sign in, codes and user tokens.
#[derive(Default)]
struct OAuth {
    /// login (lowercased) → (id, login as spelled, name)
    people: HashMap<String, (u64, String, Option<String>)>,
    /// code → login
    codes: HashMap<String, String>,
    /// user token → login
    tokens: HashMap<String, String>,
    /// login → lowercased repository full names they can read
    grants: HashMap<String, std::collections::HashSet<String>>,
    /// (login, repository), both lowercased: they administer it, beyond reading it
    admins: std::collections::HashSet<(String, String)>,
    next: u64,
}

/// A real GitHub webhook payload from `tests/fixtures/github/{name}.json` (e.g. `pull_request.opened`).
pub fn webhook_fixture(name: &str) -> Value {
    let path = format!("{}/fixtures/github/{name}.json", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&path).expect(&path)).expect("fixture JSON")
}

pub const OAUTH_CLIENT_ID: &str = "Iv23liUnderstudyFake";
pub const OAUTH_CLIENT_SECRET: &str = "fake-client-secret-0123456789abcdef";

type Shared = Arc<Mutex<Inner>>;

fn lock(shared: &Shared) -> MutexGuard<'_, Inner> {
    shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub struct FakeGitHub {
    shared: Shared,
    base_url: String,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitHub {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl FakeGitHub {
    /// Binds 127.0.0.1:0 and serves in a background task of the current tokio runtime.
    pub async fn start() -> FakeGitHub {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("binding the fake GitHub to 127.0.0.1:0");
        let addr = listener.local_addr().expect("the fake GitHub's address");
        let base_url = format!("http://{addr}");
        let shared: Shared = Arc::new(Mutex::new(Inner {
            base_url: base_url.clone(),
            requests: Vec::new(),
            repos: HashMap::new(),
            comments: Vec::new(),
            next_comment_id: 1000,
            users: HashMap::new(),
            failures: Vec::new(),
            delay: Duration::ZERO,
            answer_delay: Duration::ZERO,
            next_token: 1,
            deployments: Vec::new(),
            deployment_statuses: Vec::new(),
            check_runs: Vec::new(),
            next_deployment_id: 1_000_001,
            next_deployment_status_id: 2_000_001,
            next_check_run_id: 3_000_001,
            oauth: OAuth::default(),
        }));
        let app = Router::new().fallback(handle).with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeGitHub { shared, base_url, server }
    }

    /// Someone who can sign in with GitHub (`id` is their GitHub user id).
    pub fn add_person(&self, login: &str, id: u64, name: Option<&str>) {
        lock(&self.shared).oauth.people.insert(login.to_lowercase(), (id, login.to_string(), name.map(str::to_string)));
    }

    /// Lets `login` read `full_name` (as a collaborator would).
    pub fn grant(&self, login: &str, full_name: &str) {
        lock(&self.shared).oauth.grants.entry(login.to_lowercase()).or_default().insert(full_name.to_lowercase());
    }

    /// Lets `login` administer `full_name` (and so read it).
    pub fn grant_admin(&self, login: &str, full_name: &str) {
        self.grant(login, full_name);
        lock(&self.shared).oauth.admins.insert((login.to_lowercase(), full_name.to_lowercase()));
    }

    /// Takes `full_name` away from `login`.
    pub fn revoke(&self, login: &str, full_name: &str) {
        if let Some(repos) = lock(&self.shared).oauth.grants.get_mut(&login.to_lowercase()) {
            repos.remove(&full_name.to_lowercase());
        }
    }

    /// e.g. "http://127.0.0.1:PORT" (no trailing slash): the API base URL.
    pub fn base_url(&self) -> String {
        self.base_url.clone()
    }

    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared).requests.clone()
    }

    /// How many recorded requests match method and a path prefix.
    pub fn count(&self, method: &str, path_prefix: &str) -> usize {
        lock(&self.shared).requests.iter().filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.starts_with(path_prefix)).count()
    }

    /// Declares a repository: its default branch and the file names at its root (for every ref
    /// unless overridden). A name ending in `/` is listed as a directory.
    pub fn set_repo(&self, full_name: &str, id: u64, default_branch: &str, root_files: &[&str]) {
        let mut inner = lock(&self.shared);
        let (root_files_at, files) = inner.repos.remove(&full_name.to_lowercase()).map(|r| (r.root_files_at, r.files)).unwrap_or_default();
        let updated_at =
            (Utc::now() + chrono::Duration::microseconds(inner.repos.len() as i64)).to_rfc3339_opts(SecondsFormat::Micros, true);
        inner.repos.insert(
            full_name.to_lowercase(),
            Repo {
                full_name: full_name.to_string(),
                id,
                default_branch: default_branch.to_string(),
                root_files: root_files.iter().map(|s| s.to_string()).collect(),
                root_files_at,
                files,
                updated_at,
            },
        );
    }

    /// Overrides the root listing at one commit sha (or any other ref name).
    /// Serves `text` as the file `path` at `sha` (`GET …/contents/{path}?ref={sha}`).
    pub fn set_file_at(&self, full_name: &str, sha: &str, path: &str, text: &str) {
        let mut inner = lock(&self.shared);
        let repo = inner.repos.get_mut(&full_name.to_lowercase()).expect("set_repo first");
        repo.files.insert((sha.to_string(), path.to_string()), text.to_string());
    }

    pub fn set_root_files_at(&self, full_name: &str, sha: &str, root_files: &[&str]) {
        let mut inner = lock(&self.shared);
        let repo = inner.repos.get_mut(&full_name.to_lowercase()).unwrap_or_else(|| panic!("set_repo({full_name:?}, …) first"));
        repo.root_files_at.insert(sha.to_string(), root_files.iter().map(|s| s.to_string()).collect());
    }

    /// The comments on one issue or pull request that have not been deleted, oldest first.
    pub fn comments(&self, full_name: &str, issue: u64) -> Vec<FakeComment> {
        lock(&self.shared)
            .comments
            .iter()
            .filter(|c| !c.deleted && c.comment.issue == issue && c.comment.repo.eq_ignore_ascii_case(full_name))
            .map(|c| c.comment.clone())
            .collect()
    }

    /// A comment written by a person (not the app), e.g. one that copies our hidden marker.
    pub fn add_user_comment(&self, full_name: &str, issue: u64, login: &str, body: &str) -> u64 {
        let mut inner = lock(&self.shared);
        let repo = inner.repos.get(&full_name.to_lowercase()).map(|r| r.full_name.clone()).unwrap_or_else(|| full_name.to_string());
        let user_id = inner.user_id(login);
        inner.store_comment(&repo, issue, body, login, user_id, false)
    }

    /// Deletes a comment as a user would (later PATCHes of it get 404).
    pub fn delete_comment(&self, id: u64) {
        let mut inner = lock(&self.shared);
        if let Some(c) = inner.comments.iter_mut().find(|c| c.comment.id == id) {
            c.deleted = true;
        }
    }

    /// The next `times` requests whose method matches and whose path starts with `path_prefix`
    /// get `status` (e.g. 500, 502, 429 or 403) with GitHub's error JSON; with `retry_after`, a
    /// `retry-after` header (seconds), and for 403 also `x-ratelimit-remaining: 0` and
    /// `x-ratelimit-reset`. A 403 without `retry_after` is a plain "Resource not accessible by
    /// integration" refusal without rate-limit exhaustion. The prefix is matched against the path
    /// with its query, exactly as recorded.
    pub fn fail_next(&self, method: &str, path_prefix: &str, status: u16, retry_after: Option<u64>, times: usize) {
        if times == 0 {
            return;
        }
        lock(&self.shared).failures.push(Failure {
            method: method.to_ascii_uppercase(),
            path_prefix: path_prefix.to_string(),
            status,
            retry_after,
            remaining: times,
        });
    }

    /// Delays every response by `delay` (slow GitHub).
    pub fn set_delay(&self, delay: Duration) {
        lock(&self.shared).delay = delay;
    }

    /// Answers every request `delay` after doing what it asks: a caller that dies meanwhile has
    /// changed GitHub without hearing so, as when a connection drops after GitHub acted.
    pub fn set_answer_delay(&self, delay: Duration) {
        lock(&self.shared).answer_delay = delay;
    }

    /// Every deployment created, in order of creation.
    pub fn deployments(&self) -> Vec<Value> {
        lock(&self.shared).deployments.clone()
    }

    /// Every deployment status created, in order of creation.
    pub fn deployment_statuses(&self) -> Vec<Value> {
        lock(&self.shared).deployment_statuses.clone()
    }

    /// Every check run created, as it stands after later updates, in order of creation.
    pub fn check_runs(&self) -> Vec<Value> {
        lock(&self.shared).check_runs.clone()
    }
}

// ---------------------------------------------------------------------------------------------
// The server.

/// A list request's `per_page` (30 unless given, at most 100) and `page` (from 1).
fn page_of(query: &HashMap<String, String>) -> (usize, usize) {
    let per_page = query.get("per_page").and_then(|s| s.parse::<usize>().ok()).unwrap_or(30).clamp(1, 100);
    let page = query.get("page").and_then(|s| s.parse::<usize>().ok()).unwrap_or(1).max(1);
    (per_page, page)
}

/// One page of a list of `total` items, with GitHub's `Link` header: next and last unless on the
/// last page, prev and first unless on the first. `base` is the list's URL with its query; `body`
/// is the page's items, or the object that holds them.
fn paged(body: Value, base: &str, per_page: usize, page: usize, total: usize) -> Response {
    let last = total.div_ceil(per_page).max(1);
    let link_to = |p: usize| format!("<{base}&page={p}>");
    let mut links = Vec::new();
    if page > 1 {
        links.push(format!("{}; rel=\"prev\"", link_to((page - 1).min(last))));
    }
    if page < last {
        links.push(format!("{}; rel=\"next\"", link_to(page + 1)));
        links.push(format!("{}; rel=\"last\"", link_to(last)));
    }
    if page > 1 {
        links.push(format!("{}; rel=\"first\"", link_to(1)));
    }
    let mut response = json_response(StatusCode::OK, body);
    if !links.is_empty() {
        response.headers_mut().insert("link", HeaderValue::from_str(&links.join(", ")).expect("a Link header"));
    }
    response
}

async fn handle(State(shared): State<Shared>, method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    let path_and_query = uri.path_and_query().map(|pq| pq.as_str().to_string()).unwrap_or_else(|| uri.path().to_string());
    let body_json = if body.is_empty() {
        None
    } else {
        Some(serde_json::from_slice::<Value>(&body).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())))
    };
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok()).map(str::to_string);

    let (delay, failure) = {
        let mut inner = lock(&shared);
        inner.requests.push(RecordedRequest {
            method: method.as_str().to_string(),
            path: path_and_query.clone(),
            body: body_json.clone(),
            authorization,
        });
        let failure = inner
            .failures
            .iter_mut()
            .find(|f| f.remaining > 0 && f.method.eq_ignore_ascii_case(method.as_str()) && path_and_query.starts_with(&f.path_prefix))
            .map(|f| {
                f.remaining -= 1;
                (f.status, f.retry_after)
            });
        inner.failures.retain(|f| f.remaining > 0);
        (inner.delay, failure)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if let Some((status, retry_after)) = failure {
        return injected_failure(status, retry_after);
    }
    let query = parse_query(uri.query().unwrap_or(""));
    let (response, answer_delay) = {
        let mut inner = lock(&shared);
        let user_token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .map(|(_, token)| token.trim().to_string())
            .filter(|token| token.starts_with("gho_"));
        let response = match oauth_route(&mut inner, &method, uri.path(), &query, &headers, &body, user_token.as_deref()) {
            Some(response) => response,
            None => route(&mut inner, &method, uri.path(), &query, body_json),
        };
        (response, inner.answer_delay)
    };
    if !answer_delay.is_zero() {
        tokio::time::sleep(answer_delay).await;
    }
    response
}

/// The OAuth web flow, `/user`, and what a user token may see; `None` for everything else.
fn oauth_route(
    inner: &mut Inner,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
    user_token: Option<&str>,
) -> Option<Response> {
    let oauth = &mut inner.oauth;
    match (method, path) {
        (&Method::GET, "/login/oauth/authorize") => {
            if query.get("client_id").map(String::as_str) != Some(OAUTH_CLIENT_ID) {
                return Some(json_response(StatusCode::NOT_FOUND, error_json(404, "Not Found", DOCS)));
            }
            let wanted = query.get("login").map(|l| l.to_lowercase());
            let person = match wanted {
                Some(login) => oauth.people.get(&login).map(|p| p.1.clone()),
                None if oauth.people.len() == 1 => oauth.people.values().next().map(|p| p.1.clone()),
                None => None,
            };
            let (Some(login), Some(redirect_uri)) = (person, query.get("redirect_uri")) else {
                return Some(json_response(StatusCode::BAD_REQUEST, error_json(400, "nobody to sign in as", DOCS)));
            };
            oauth.next += 1;
            let code = format!("code{:0>16}", oauth.next);
            oauth.codes.insert(code.clone(), login);
            let state = query.get("state").cloned().unwrap_or_default();
            let location = format!("{redirect_uri}?code={code}&state={}", percent_encode(&state));
            let mut response = empty_response(StatusCode::FOUND);
            response.headers_mut().insert("location", HeaderValue::from_str(&location).expect("a URL"));
            Some(response)
        }
        (&Method::POST, "/login/oauth/access_token") => {
            let fields: HashMap<String, String> = match serde_json::from_slice::<Value>(body) {
                Ok(Value::Object(map)) => map.into_iter().map(|(k, v)| (k, v.as_str().unwrap_or_default().to_string())).collect(),
                _ => parse_query(&String::from_utf8_lossy(body)),
            };
            let field = |name: &str| fields.get(name).map(String::as_str).unwrap_or_default();
            let answer = if field("client_id") != OAUTH_CLIENT_ID || field("client_secret") != OAUTH_CLIENT_SECRET {
                json!({"error": "incorrect_client_credentials", "error_description": "The client_id and/or client_secret passed are incorrect."})
            } else {
                match oauth.codes.remove(field("code")) {
                    Some(login) => {
                        oauth.next += 1;
                        let token = format!("gho_{:0>36}", oauth.next);
                        oauth.tokens.insert(token.clone(), login);
                        json!({"access_token": token, "token_type": "bearer", "scope": ""})
                    }
                    None => json!({"error": "bad_verification_code", "error_description": "The code passed is incorrect or expired."}),
                }
            };
            let wants_json = headers.get("accept").and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("json"));
            if wants_json {
                return Some(json_response(StatusCode::OK, answer));
            }
            let form: Vec<String> = answer
                .as_object()
                .into_iter()
                .flatten()
                .map(|(k, v)| format!("{k}={}", percent_encode(v.as_str().unwrap_or_default())))
                .collect();
            let mut response = Response::new(Body::from(form.join("&")));
            response.headers_mut().insert("content-type", HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"));
            Some(response)
        }
        (&Method::GET, "/user/repos") => {
            let Some(login) = user_token.and_then(|t| oauth.tokens.get(t)).cloned() else {
                return Some(json_response(StatusCode::UNAUTHORIZED, error_json(401, "Requires authentication", DOCS)));
            };
            let granted = oauth.grants.get(&login.to_lowercase()).cloned().unwrap_or_default();
            let mut keys: Vec<String> = inner.repos.keys().filter(|k| granted.contains(*k)).cloned().collect();
            keys.sort_by(|a, b| inner.repos[b].updated_at.cmp(&inner.repos[a].updated_at));
            let per_page = query.get("per_page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(30).clamp(1, 100);
            let page = query.get("page").and_then(|p| p.parse::<usize>().ok()).unwrap_or(1).max(1);
            let admin: Vec<bool> = keys.iter().map(|key| oauth.admins.contains(&(login.to_lowercase(), key.clone()))).collect();
            let items: Vec<Value> = keys
                .iter()
                .zip(admin)
                .skip((page - 1) * per_page)
                .take(per_page)
                .map(|(key, admin)| {
                    let mut repo = inner.repo_json(key);
                    repo["permissions"] = permissions(admin);
                    repo
                })
                .collect();
            let mut response = json_response(StatusCode::OK, Value::Array(items));
            if page * per_page < keys.len() {
                let next = format!("<{}/user/repos?sort=updated&per_page={per_page}&page={}>; rel=\"next\"", inner.base_url, page + 1);
                response.headers_mut().insert("link", HeaderValue::from_str(&next).expect("a header"));
            }
            Some(response)
        }
        (&Method::GET, "/user") => {
            let person = user_token.and_then(|t| oauth.tokens.get(t)).and_then(|login| oauth.people.get(&login.to_lowercase()));
            Some(match person {
                Some((id, login, name)) => {
                    let mut user = user_json(&inner.base_url, login, *id, "User");
                    user["name"] = json!(name);
                    json_response(StatusCode::OK, user)
                }
                None => json_response(StatusCode::UNAUTHORIZED, error_json(401, "Bad credentials", DOCS)),
            })
        }
        (_, path) if path.starts_with("/repos/") => {
            let token = user_token?;
            let Some(login) = oauth.tokens.get(token).cloned() else {
                return Some(json_response(StatusCode::UNAUTHORIZED, error_json(401, "Bad credentials", DOCS)));
            };
            let mut parts = path.trim_start_matches("/repos/").split('/');
            let full_name = format!("{}/{}", parts.next().unwrap_or_default(), parts.next().unwrap_or_default()).to_lowercase();
            let granted = oauth.grants.get(&login.to_lowercase()).is_some_and(|repos| repos.contains(&full_name));
            if !granted || !inner.repos.contains_key(&full_name) || *method != Method::GET || parts.next().is_some() {
                return Some(not_found());
            }
            let admin = oauth.admins.contains(&(login.to_lowercase(), full_name.clone()));
            let mut repo = inner.repo_json(&full_name);
            repo["permissions"] = permissions(admin);
            Some(json_response(StatusCode::OK, repo))
        }
        _ => None,
    }
}

/// A person's `permissions` on a repository they can read, as GitHub spells them.
fn permissions(admin: bool) -> Value {
    json!({"admin": admin, "maintain": admin, "push": admin, "triage": admin, "pull": true})
}

fn route(inner: &mut Inner, method: &Method, path: &str, query: &HashMap<String, String>, body: Option<Value>) -> Response {
    let mut segments: Vec<String> = path.trim_start_matches('/').split('/').map(str::to_string).collect();

    // GitHub's Link headers name repositories by id: /repositories/{id}/... == /repos/{owner}/{repo}/...
    if segments.len() >= 2 && segments[0] == "repositories" {
        let id = segments[1].parse::<u64>().ok();
        match inner.repos.values().find(|r| Some(r.id) == id) {
            Some(repo) => {
                let (owner, name) = repo.full_name.split_once('/').unwrap_or((&repo.full_name, ""));
                let mut rewritten = vec!["repos".to_string(), owner.to_string(), name.to_string()];
                rewritten.extend(segments.drain(2..));
                segments = rewritten;
            }
            None => return not_found(),
        }
    }
    let seg: Vec<&str> = segments.iter().map(String::as_str).collect();

    match (method, seg.as_slice()) {
        (&Method::GET, ["app"]) => json_response(StatusCode::OK, inner.app_json()),
        (&Method::POST, ["app", "installations", installation, "access_tokens"]) => match installation.parse::<u64>() {
            Ok(installation) => inner.access_token(installation),
            Err(_) => not_found(),
        },
        (_, ["repos", owner, name, rest @ ..]) => {
            let key = format!("{owner}/{name}").to_lowercase();
            if !inner.repos.contains_key(&key) {
                return not_found();
            }
            let rest: Vec<&str> = rest.iter().copied().filter(|s| !s.is_empty()).collect();
            repo_route(inner, method, &key, &rest, query, body)
        }
        _ => not_found(),
    }
}

fn repo_route(
    inner: &mut Inner,
    method: &Method,
    key: &str,
    rest: &[&str],
    query: &HashMap<String, String>,
    body: Option<Value>,
) -> Response {
    let full_name = inner.repos[key].full_name.clone();
    let update = |m: &Method| m == Method::PATCH || m == Method::POST;
    match (method, rest) {
        (&Method::GET, []) => json_response(StatusCode::OK, inner.repo_json(key)),
        (&Method::GET, ["installation"]) => {
            let owner = full_name.split('/').next().unwrap_or_default().to_string();
            json_response(
                StatusCode::OK,
                json!({
                    "id": 1,
                    "account": user_json(&inner.base_url, &owner, inner.owner_id(&owner), "User"),
                    "app_id": APP_ID,
                    "app_slug": APP_SLUG,
                    "target_type": "User",
                    "repository_selection": "all",
                    "permissions": app_permissions(),
                    "events": ["pull_request", "push", "delete"],
                    "created_at": "2024-01-01T00:00:00Z",
                    "updated_at": "2024-01-01T00:00:00Z"
                }),
            )
        }
        (&Method::GET, ["branches", branch]) => {
            let repo = &inner.repos[key];
            let known =
                repo.default_branch == *branch || repo.files.keys().any(|(r, _)| r == branch) || repo.root_files_at.contains_key(*branch);
            if known {
                json_response(
                    StatusCode::OK,
                    json!({"name": branch, "commit": {"sha": format!("{:0>40}", fnv(branch.as_bytes()) % 1_000_000)}, "protected": false}),
                )
            } else {
                json_response(StatusCode::NOT_FOUND, error_json(404, "Branch not found", DOCS))
            }
        }
        (&Method::GET, ["contents"]) => inner.contents(key, query),
        (&Method::GET, ["contents", path]) => inner.file(key, path, query),
        (&Method::GET, ["issues", number, "comments"]) => match number.parse::<u64>() {
            Ok(number) => inner.list_comments(&full_name, number, query),
            Err(_) => not_found(),
        },
        (&Method::POST, ["issues", number, "comments"]) => match number.parse::<u64>() {
            Ok(number) => match comment_body(&body) {
                Ok(text) => {
                    let id = inner.store_comment(&full_name, number, &text, BOT_LOGIN, BOT_USER_ID, true);
                    json_response(StatusCode::CREATED, inner.comment_json(id))
                }
                Err(response) => response,
            },
            Err(_) => not_found(),
        },
        (m, ["issues", "comments", id]) if m == Method::GET || update(m) || m == Method::DELETE => {
            let Some(index) = id.parse::<u64>().ok().and_then(|id| inner.live_comment(&full_name, id)) else {
                return not_found();
            };
            let id = inner.comments[index].comment.id;
            if m == Method::GET {
                json_response(StatusCode::OK, inner.comment_json(id))
            } else if m == Method::DELETE {
                inner.comments[index].deleted = true;
                empty_response(StatusCode::NO_CONTENT)
            } else {
                match comment_body(&body) {
                    Ok(text) => {
                        let stored = &mut inner.comments[index];
                        stored.comment.body = text;
                        stored.updated_at = now();
                        json_response(StatusCode::OK, inner.comment_json(id))
                    }
                    Err(response) => response,
                }
            }
        }
        (&Method::GET, ["deployments"]) => inner.list_deployments(&full_name, query),
        (&Method::POST, ["deployments"]) => inner.create_deployment(&full_name, body),
        (&Method::GET, ["deployments", id]) => match inner.find_deployment(&full_name, id) {
            Some(d) => json_response(StatusCode::OK, d),
            None => not_found(),
        },
        (&Method::GET, ["deployments", id, "statuses"]) => match inner.find_deployment(&full_name, id) {
            Some(d) => {
                let mut list: Vec<Value> = inner.deployment_statuses.iter().filter(|s| s["deployment_url"] == d["url"]).cloned().collect();
                list.reverse();
                json_response(StatusCode::OK, Value::Array(list))
            }
            None => not_found(),
        },
        (&Method::POST, ["deployments", id, "statuses"]) => match inner.find_deployment(&full_name, id) {
            Some(d) => inner.create_deployment_status(&full_name, &d, body),
            None => not_found(),
        },
        (&Method::POST, ["check-runs"]) => inner.create_check_run(&full_name, body),
        (&Method::GET, ["commits", sha, "check-runs"]) => inner.list_check_runs(&full_name, sha, query),
        (m, ["check-runs", id]) if m == Method::GET || m == Method::PATCH => {
            let url = format!("{}/repos/{full_name}/check-runs/{id}", inner.base_url);
            let Some(index) = inner.check_runs.iter().position(|c| c["url"] == url.as_str()) else {
                return not_found();
            };
            if m == Method::GET {
                json_response(StatusCode::OK, inner.check_runs[index].clone())
            } else {
                inner.update_check_run(index, body)
            }
        }
        _ => not_found(),
    }
}

impl Inner {
    fn user_id(&mut self, login: &str) -> u64 {
        let next = 5_000_001 + self.users.len() as u64;
        *self.users.entry(login.to_string()).or_insert(next)
    }

    fn store_comment(&mut self, repo: &str, issue: u64, body: &str, login: &str, user_id: u64, by_app: bool) -> u64 {
        let id = self.next_comment_id;
        self.next_comment_id += 1;
        let at = now();
        self.comments.push(StoredComment {
            comment: FakeComment { id, repo: repo.to_string(), issue, body: body.to_string(), login: login.to_string(), by_app },
            user_id,
            created_at: at.clone(),
            updated_at: at,
            deleted: false,
        });
        id
    }

    /// The index of a comment that exists, is not deleted and belongs to the repository.
    fn live_comment(&self, full_name: &str, id: u64) -> Option<usize> {
        self.comments.iter().position(|c| c.comment.id == id && !c.deleted && c.comment.repo.eq_ignore_ascii_case(full_name))
    }

    fn app_json(&self) -> Value {
        json!({
            "id": APP_ID,
            "slug": APP_SLUG,
            "node_id": "A_kwDOAAQ2QmFwcA",
            "client_id": "Iv23liUnderstudyFake",
            "owner": user_json(&self.base_url, "understudy-dev", 5_000_000, "Organization"),
            "name": "Understudy",
            "description": "Preview environments for every pull request.",
            "external_url": "https://understudy.example",
            "html_url": format!("https://github.com/apps/{APP_SLUG}"),
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "permissions": app_permissions(),
            "events": ["check_run", "delete", "deployment", "pull_request", "push"],
            "installations_count": 1
        })
    }

    fn access_token(&mut self, installation: u64) -> Response {
        let n = self.next_token;
        self.next_token += 1;
        let token = format!("ghs_{:0>36}", format!("fake{installation}x{n}"));
        let expires_at = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339_opts(SecondsFormat::Secs, true);
        json_response(
            StatusCode::CREATED,
            json!({
                "token": token,
                "expires_at": expires_at,
                "permissions": app_permissions(),
                "repository_selection": "all"
            }),
        )
    }

    /// A repository owner's GitHub id: a person's own when they were added, else a stable one.
    fn owner_id(&self, owner: &str) -> u64 {
        self.oauth
            .people
            .get(&owner.to_lowercase())
            .map(|p| p.0)
            .unwrap_or_else(|| 1_000_000 + (fnv(owner.to_lowercase().as_bytes()) % 100_000_000))
    }

    fn repo_json(&self, key: &str) -> Value {
        let repo = &self.repos[key];
        let full = &repo.full_name;
        let (owner, name) = full.split_once('/').unwrap_or((full, full));
        let api = format!("{}/repos/{full}", self.base_url);
        let html = format!("https://github.com/{full}");
        let owner_id = self.owner_id(owner);
        let mut value = json!({
            "id": repo.id,
            "node_id": format!("R_kgDO{}", repo.id),
            "name": name,
            "full_name": full,
            "private": false,
            "owner": user_json(&self.base_url, owner, owner_id, "User"),
            "html_url": html,
            "description": null,
            "fork": false,
            "url": api,
            "created_at": "2019-05-15T15:19:25Z",
            "updated_at": repo.updated_at,
            "pushed_at": "2019-05-15T15:20:57Z",
        });
        let more = json!({
            "git_url": format!("git://github.com/{full}.git"),
            "ssh_url": format!("git@github.com:{full}.git"),
            "clone_url": format!("{html}.git"),
            "svn_url": html,
            "homepage": null,
            "size": 0,
            "stargazers_count": 0,
            "watchers_count": 0,
            "language": null,
            "has_issues": true,
            "has_projects": true,
            "has_downloads": true,
            "has_wiki": true,
            "has_pages": false,
            "has_discussions": false,
            "forks_count": 0,
            "mirror_url": null,
            "archived": false,
            "disabled": false,
            "open_issues_count": 1,
            "license": null,
            "allow_forking": true,
            "is_template": false,
            "web_commit_signoff_required": false,
            "topics": [],
            "visibility": "public",
            "forks": 0,
            "open_issues": 1,
            "watchers": 0,
            "default_branch": repo.default_branch,
            "permissions": {"admin": false, "maintain": false, "push": false, "triage": false, "pull": true},
            "network_count": 0,
            "subscribers_count": 0
        });
        if let (Some(value), Value::Object(more)) = (value.as_object_mut(), more) {
            value.extend(more);
        }
        // The URL templates every repository object carries.
        let templates = [
            ("forks_url", "/forks"),
            ("keys_url", "/keys{/key_id}"),
            ("collaborators_url", "/collaborators{/collaborator}"),
            ("teams_url", "/teams"),
            ("hooks_url", "/hooks"),
            ("issue_events_url", "/issues/events{/number}"),
            ("events_url", "/events"),
            ("assignees_url", "/assignees{/user}"),
            ("branches_url", "/branches{/branch}"),
            ("tags_url", "/tags"),
            ("blobs_url", "/git/blobs{/sha}"),
            ("git_tags_url", "/git/tags{/sha}"),
            ("git_refs_url", "/git/refs{/sha}"),
            ("trees_url", "/git/trees{/sha}"),
            ("statuses_url", "/statuses/{sha}"),
            ("languages_url", "/languages"),
            ("stargazers_url", "/stargazers"),
            ("contributors_url", "/contributors"),
            ("subscribers_url", "/subscribers"),
            ("subscription_url", "/subscription"),
            ("commits_url", "/commits{/sha}"),
            ("git_commits_url", "/git/commits{/sha}"),
            ("comments_url", "/comments{/number}"),
            ("issue_comment_url", "/issues/comments{/number}"),
            ("contents_url", "/contents/{+path}"),
            ("compare_url", "/compare/{base}...{head}"),
            ("merges_url", "/merges"),
            ("archive_url", "/{archive_format}{/ref}"),
            ("downloads_url", "/downloads"),
            ("issues_url", "/issues{/number}"),
            ("pulls_url", "/pulls{/number}"),
            ("milestones_url", "/milestones{/number}"),
            ("notifications_url", "/notifications{?since,all,participating}"),
            ("labels_url", "/labels{/name}"),
            ("releases_url", "/releases{/id}"),
            ("deployments_url", "/deployments"),
        ];
        for (field, suffix) in templates {
            value[field] = json!(format!("{api}{suffix}"));
        }
        value
    }

    /// A file as GitHub's contents API returns it: JSON with the text in base64.
    fn file(&self, key: &str, path: &str, query: &HashMap<String, String>) -> Response {
        use base64::Engine;
        let repo = &self.repos[key];
        let git_ref = query.get("ref").cloned().unwrap_or_else(|| repo.default_branch.clone());
        match repo.files.get(&(git_ref, path.to_string())) {
            Some(text) => json_response(
                StatusCode::OK,
                json!({
                    "type": "file", "encoding": "base64", "name": path, "path": path, "size": text.len(),
                    "content": base64::engine::general_purpose::STANDARD.encode(text),
                }),
            ),
            None => not_found(),
        }
    }

    fn contents(&self, key: &str, query: &HashMap<String, String>) -> Response {
        let repo = &self.repos[key];
        let git_ref = query.get("ref").cloned().unwrap_or_else(|| repo.default_branch.clone());
        let files = repo.root_files_at.get(&git_ref).unwrap_or(&repo.root_files);
        let api = format!("{}/repos/{}", self.base_url, repo.full_name);
        let html = format!("https://github.com/{}", repo.full_name);
        let entries: Vec<Value> = files
            .iter()
            .map(|entry| {
                let (name, is_dir) = match entry.strip_suffix('/') {
                    Some(dir) => (dir, true),
                    None => (entry.as_str(), false),
                };
                let url = format!("{api}/contents/{name}?ref={git_ref}");
                if is_dir {
                    let sha = fake_sha(&[repo.full_name.as_bytes(), git_ref.as_bytes(), name.as_bytes()]);
                    let git_url = format!("{api}/git/trees/{sha}");
                    let html_url = format!("{html}/tree/{git_ref}/{name}");
                    json!({
                        "name": name, "path": name, "sha": sha, "size": 0, "url": url, "html_url": html_url,
                        "git_url": git_url, "download_url": null, "type": "dir",
                        "_links": {"self": url, "git": git_url, "html": html_url}
                    })
                } else {
                    let git_url = format!("{api}/git/blobs/{EMPTY_BLOB_SHA}");
                    let html_url = format!("{html}/blob/{git_ref}/{name}");
                    json!({
                        "name": name, "path": name, "sha": EMPTY_BLOB_SHA, "size": 0, "url": url, "html_url": html_url,
                        "git_url": git_url,
                        "download_url": format!("https://raw.githubusercontent.com/{}/{git_ref}/{name}", repo.full_name),
                        "type": "file",
                        "_links": {"self": url, "git": git_url, "html": html_url}
                    })
                }
            })
            .collect();
        json_response(StatusCode::OK, Value::Array(entries))
    }

    fn list_comments(&self, full_name: &str, issue: u64, query: &HashMap<String, String>) -> Response {
        let (per_page, page) = page_of(query);
        let ids: Vec<u64> = self
            .comments
            .iter()
            .filter(|c| !c.deleted && c.comment.issue == issue && c.comment.repo.eq_ignore_ascii_case(full_name))
            .map(|c| c.comment.id)
            .collect();
        let items: Vec<Value> = ids.iter().skip((page - 1) * per_page).take(per_page).map(|id| self.comment_json(*id)).collect();
        let repo_id = self.repos[&full_name.to_lowercase()].id;
        let base = format!("{}/repositories/{repo_id}/issues/{issue}/comments?per_page={per_page}", self.base_url);
        paged(Value::Array(items), &base, per_page, page, ids.len())
    }

    /// `GET /repos/{owner}/{repo}/deployments`: newest first, filtered by `sha`, `ref`, `task` and
    /// `environment` as GitHub does, `per_page` (30, at most 100) and `page`, with `Link`.
    fn list_deployments(&self, full_name: &str, query: &HashMap<String, String>) -> Response {
        let (per_page, page) = page_of(query);
        let prefix = format!("{}/repos/{full_name}/", self.base_url);
        let matching: Vec<&Value> = self
            .deployments
            .iter()
            .rev()
            .filter(|d| d["url"].as_str().is_some_and(|u| u.starts_with(&prefix)))
            .filter(|d| ["sha", "ref", "task", "environment"].iter().all(|f| query.get(*f).is_none_or(|v| d[*f] == v.as_str())))
            .collect();
        let items = matching.iter().skip((page - 1) * per_page).take(per_page).map(|d| (*d).clone()).collect();
        let repo_id = self.repos[&full_name.to_lowercase()].id;
        let filters: String = ["sha", "ref", "task", "environment"]
            .iter()
            .filter_map(|f| query.get(*f).map(|v| format!("&{f}={}", percent_encode(v))))
            .collect();
        let base = format!("{}/repositories/{repo_id}/deployments?per_page={per_page}{filters}", self.base_url);
        paged(Value::Array(items), &base, per_page, page, matching.len())
    }

    /// `GET /repos/{owner}/{repo}/commits/{sha}/check-runs`: newest first, filtered by
    /// `check_name`, `per_page` (30, at most 100) and `page`, with `Link`; the page's runs are in
    /// `check_runs`, beside `total_count` of all that match.
    fn list_check_runs(&self, full_name: &str, sha: &str, query: &HashMap<String, String>) -> Response {
        let (per_page, page) = page_of(query);
        let prefix = format!("{}/repos/{full_name}/check-runs/", self.base_url);
        let matching: Vec<&Value> = self
            .check_runs
            .iter()
            .rev()
            .filter(|c| c["url"].as_str().is_some_and(|u| u.starts_with(&prefix)) && c["head_sha"] == sha)
            .filter(|c| query.get("check_name").is_none_or(|name| c["name"] == name.as_str()))
            .collect();
        let runs: Vec<Value> = matching.iter().skip((page - 1) * per_page).take(per_page).map(|c| (*c).clone()).collect();
        let filter = query.get("check_name").map(|name| format!("&check_name={}", percent_encode(name))).unwrap_or_default();
        let base = format!("{}/repos/{full_name}/commits/{sha}/check-runs?per_page={per_page}{filter}", self.base_url);
        paged(json!({ "total_count": matching.len(), "check_runs": runs }), &base, per_page, page, matching.len())
    }

    fn comment_json(&self, id: u64) -> Value {
        let stored = self.comments.iter().find(|c| c.comment.id == id).expect("a stored comment");
        let c = &stored.comment;
        let api = format!("{}/repos/{}", self.base_url, c.repo);
        let (user, association, app) = if c.by_app {
            (bot_json(&self.base_url), "NONE", self.app_json())
        } else {
            let owner = c.repo.split('/').next().unwrap_or("");
            let association = if owner.eq_ignore_ascii_case(&c.login) { "OWNER" } else { "CONTRIBUTOR" };
            (user_json(&self.base_url, &c.login, stored.user_id, "User"), association, Value::Null)
        };
        json!({
            "url": format!("{api}/issues/comments/{id}"),
            "html_url": format!("https://github.com/{}/pull/{}#issuecomment-{id}", c.repo, c.issue),
            "issue_url": format!("{api}/issues/{}", c.issue),
            "id": id,
            "node_id": format!("IC_kwDOFake{id}"),
            "user": user,
            "created_at": stored.created_at,
            "updated_at": stored.updated_at,
            "author_association": association,
            "body": c.body,
            "reactions": {
                "url": format!("{api}/issues/comments/{id}/reactions"),
                "total_count": 0, "+1": 0, "-1": 0, "laugh": 0, "hooray": 0,
                "confused": 0, "heart": 0, "rocket": 0, "eyes": 0
            },
            "performed_via_github_app": app
        })
    }

    fn find_deployment(&self, full_name: &str, id: &str) -> Option<Value> {
        let url = format!("{}/repos/{full_name}/deployments/{id}", self.base_url);
        self.deployments.iter().find(|d| d["url"] == url.as_str()).cloned()
    }

    fn create_deployment(&mut self, full_name: &str, body: Option<Value>) -> Response {
        let body = match json_object(body) {
            Ok(body) => body,
            Err(response) => return response,
        };
        let Some(git_ref) = body.get("ref").and_then(Value::as_str).map(str::to_string) else {
            return validation_failed(
                "Deployment",
                "ref",
                "missing_field",
                "https://docs.github.com/rest/deployments/deployments#create-a-deployment",
            );
        };
        // GitHub resolves the ref to a commit; a ref that is a full sha is its own commit.
        let sha = if is_sha(&git_ref) { git_ref.clone() } else { fake_sha(&[full_name.as_bytes(), git_ref.as_bytes()]) };
        let environment = body.get("environment").and_then(Value::as_str).unwrap_or("production").to_string();
        let id = self.next_deployment_id;
        self.next_deployment_id += 1;
        let api = format!("{}/repos/{full_name}", self.base_url);
        let at = now();
        let deployment = json!({
            "url": format!("{api}/deployments/{id}"),
            "id": id,
            "node_id": format!("DE_kwDOFake{id}"),
            "sha": sha,
            "ref": git_ref,
            "task": body.get("task").and_then(Value::as_str).unwrap_or("deploy"),
            "payload": body.get("payload").cloned().unwrap_or_else(|| json!({})),
            "original_environment": environment,
            "environment": environment,
            "description": body.get("description").cloned().unwrap_or(Value::Null),
            "creator": bot_json(&self.base_url),
            "created_at": at,
            "updated_at": at,
            "statuses_url": format!("{api}/deployments/{id}/statuses"),
            "repository_url": api,
            "transient_environment": body.get("transient_environment").and_then(Value::as_bool).unwrap_or(false),
            "production_environment": body.get("production_environment").and_then(Value::as_bool).unwrap_or(environment == "production"),
            "performed_via_github_app": self.app_json()
        });
        self.deployments.push(deployment.clone());
        json_response(StatusCode::CREATED, deployment)
    }

    fn create_deployment_status(&mut self, full_name: &str, deployment: &Value, body: Option<Value>) -> Response {
        let body = match json_object(body) {
            Ok(body) => body,
            Err(response) => return response,
        };
        const STATES: [&str; 7] = ["error", "failure", "inactive", "in_progress", "queued", "pending", "success"];
        let docs = "https://docs.github.com/rest/deployments/statuses#create-a-deployment-status";
        let Some(state) = body.get("state").and_then(Value::as_str).map(str::to_string) else {
            return validation_failed("DeploymentStatus", "state", "missing_field", docs);
        };
        if !STATES.contains(&state.as_str()) {
            return validation_failed("DeploymentStatus", "state", "invalid", docs);
        }
        let id = self.next_deployment_status_id;
        self.next_deployment_status_id += 1;
        let api = format!("{}/repos/{full_name}", self.base_url);
        let deployment_url = deployment["url"].as_str().unwrap_or_default().to_string();
        let text = |field: &str| body.get(field).and_then(Value::as_str).unwrap_or("").to_string();
        let target_url = body.get("target_url").or_else(|| body.get("log_url")).and_then(Value::as_str).unwrap_or("").to_string();
        let at = now();
        let status = json!({
            "url": format!("{deployment_url}/statuses/{id}"),
            "id": id,
            "node_id": format!("DES_kwDOFake{id}"),
            "state": state,
            "creator": bot_json(&self.base_url),
            "description": text("description"),
            "environment": body.get("environment").and_then(Value::as_str).unwrap_or_else(|| deployment["environment"].as_str().unwrap_or("")),
            "target_url": target_url,
            "log_url": body.get("log_url").and_then(Value::as_str).unwrap_or(&target_url),
            "environment_url": text("environment_url"),
            "created_at": at,
            "updated_at": at,
            "deployment_url": deployment_url,
            "repository_url": api,
            "performed_via_github_app": self.app_json()
        });
        self.deployment_statuses.push(status.clone());
        json_response(StatusCode::CREATED, status)
    }

    fn create_check_run(&mut self, full_name: &str, body: Option<Value>) -> Response {
        let body = match json_object(body) {
            Ok(body) => body,
            Err(response) => return response,
        };
        let docs = "https://docs.github.com/rest/checks/runs#create-a-check-run";
        let Some(name) = body.get("name").and_then(Value::as_str).map(str::to_string) else {
            return validation_failed("CheckRun", "name", "missing_field", docs);
        };
        let Some(head_sha) = body.get("head_sha").and_then(Value::as_str).map(str::to_string) else {
            return validation_failed("CheckRun", "head_sha", "missing_field", docs);
        };
        let id = self.next_check_run_id;
        self.next_check_run_id += 1;
        let api = format!("{}/repos/{full_name}", self.base_url);
        let html_url = format!("https://github.com/{full_name}/runs/{id}");
        let mut run = json!({
            "id": id,
            "name": name,
            "node_id": format!("CR_kwDOFake{id}"),
            "head_sha": head_sha,
            "external_id": "",
            "url": format!("{api}/check-runs/{id}"),
            "html_url": html_url,
            "details_url": html_url,
            "status": "queued",
            "conclusion": null,
            "started_at": now(),
            "completed_at": null,
            "output": {
                "title": null, "summary": null, "text": null,
                "annotations_count": 0,
                "annotations_url": format!("{api}/check-runs/{id}/annotations")
            },
            "check_suite": {"id": 4_000_000 + id},
            "app": self.app_json(),
            "pull_requests": []
        });
        if let Err(response) = apply_check_run_fields(&mut run, &body) {
            return response;
        }
        self.check_runs.push(run.clone());
        json_response(StatusCode::CREATED, run)
    }

    fn update_check_run(&mut self, index: usize, body: Option<Value>) -> Response {
        let body = match json_object(body) {
            Ok(body) => body,
            Err(response) => return response,
        };
        let mut run = self.check_runs[index].clone();
        if let Some(name) = body.get("name").and_then(Value::as_str) {
            run["name"] = json!(name);
        }
        if let Err(response) = apply_check_run_fields(&mut run, &body) {
            return response;
        }
        self.check_runs[index] = run.clone();
        json_response(StatusCode::OK, run)
    }
}

/// Applies the optional fields of a create or update check-run request, as GitHub does: a
/// conclusion completes the run.
fn apply_check_run_fields(run: &mut Value, body: &Map<String, Value>) -> Result<(), Response> {
    let docs = "https://docs.github.com/rest/checks/runs#update-a-check-run";
    for field in ["details_url", "external_id", "started_at"] {
        if let Some(v) = body.get(field).filter(|v| v.is_string()) {
            run[field] = v.clone();
        }
    }
    if let Some(status) = body.get("status").and_then(Value::as_str) {
        if !["queued", "in_progress", "completed", "waiting", "requested", "pending"].contains(&status) {
            return Err(validation_failed("CheckRun", "status", "invalid", docs));
        }
        run["status"] = json!(status);
    }
    if let Some(conclusion) = body.get("conclusion").and_then(Value::as_str) {
        let valid = ["action_required", "cancelled", "failure", "neutral", "success", "skipped", "stale", "timed_out"];
        if !valid.contains(&conclusion) {
            return Err(validation_failed("CheckRun", "conclusion", "invalid", docs));
        }
        run["conclusion"] = json!(conclusion);
        run["status"] = json!("completed");
    }
    if run["status"] == "completed" {
        if run["conclusion"].is_null() {
            return Err(validation_failed("CheckRun", "conclusion", "missing_field", docs));
        }
        run["completed_at"] = body.get("completed_at").filter(|v| v.is_string()).cloned().unwrap_or_else(|| json!(now()));
    }
    if let Some(output) = body.get("output").and_then(Value::as_object) {
        for field in ["title", "summary", "text"] {
            if let Some(v) = output.get(field) {
                run["output"][field] = v.clone();
            }
        }
        if let Some(annotations) = output.get("annotations").and_then(Value::as_array) {
            let count = run["output"]["annotations_count"].as_u64().unwrap_or(0) + annotations.len() as u64;
            run["output"]["annotations_count"] = json!(count);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// JSON pieces.

fn user_json(base_url: &str, login: &str, id: u64, kind: &str) -> Value {
    let api = format!("{base_url}/users/{}", percent_encode(login));
    json!({
        "login": login,
        "id": id,
        "node_id": format!("U_kgDOFake{id}"),
        "avatar_url": format!("https://avatars.githubusercontent.com/u/{id}?v=4"),
        "gravatar_id": "",
        "url": api,
        "html_url": format!("https://github.com/{login}"),
        "followers_url": format!("{api}/followers"),
        "following_url": format!("{api}/following{{/other_user}}"),
        "gists_url": format!("{api}/gists{{/gist_id}}"),
        "starred_url": format!("{api}/starred{{/owner}}{{/repo}}"),
        "subscriptions_url": format!("{api}/subscriptions"),
        "organizations_url": format!("{api}/orgs"),
        "repos_url": format!("{api}/repos"),
        "events_url": format!("{api}/events{{/privacy}}"),
        "received_events_url": format!("{api}/received_events"),
        "type": kind,
        "user_view_type": "public",
        "site_admin": false
    })
}

/// The App's bot user, as GitHub shows it on what the App writes.
fn bot_json(base_url: &str) -> Value {
    let mut bot = user_json(base_url, BOT_LOGIN, BOT_USER_ID, "Bot");
    bot["avatar_url"] = json!(format!("https://avatars.githubusercontent.com/in/{APP_ID}?v=4"));
    bot["html_url"] = json!(format!("https://github.com/apps/{APP_SLUG}"));
    bot
}

fn app_permissions() -> Value {
    json!({
        "checks": "write",
        "contents": "read",
        "deployments": "write",
        "issues": "write",
        "metadata": "read",
        "pull_requests": "write",
        "statuses": "write"
    })
}

fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn fnv(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        hash ^= u64::from(*b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A stable 40-hex-digit stand-in for a git object id.
fn fake_sha(parts: &[&[u8]]) -> String {
    let mut joined = Vec::new();
    for part in parts {
        joined.extend_from_slice(part);
        joined.push(0);
    }
    let mut out = String::new();
    for seed in 0u8..3 {
        let mut bytes = vec![seed];
        bytes.extend_from_slice(&joined);
        out.push_str(&format!("{:016x}", fnv(&bytes)));
    }
    out.truncate(40);
    out
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|hex| u8::from_str_radix(hex, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_query(query: &str) -> HashMap<String, String> {
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Responses.

fn json_response(status: StatusCode, value: Value) -> Response {
    let mut response = Response::new(Body::from(serde_json::to_vec(&value).expect("serializable JSON")));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert("content-type", HeaderValue::from_static("application/json; charset=utf-8"));
    headers.insert("x-github-api-version-selected", HeaderValue::from_static("2022-11-28"));
    headers.insert("x-ratelimit-limit", HeaderValue::from_static("5000"));
    headers.insert("x-ratelimit-remaining", HeaderValue::from_static("4999"));
    headers.insert("x-ratelimit-used", HeaderValue::from_static("1"));
    headers.insert("x-ratelimit-resource", HeaderValue::from_static("core"));
    let reset = (Utc::now().timestamp() + 3600).to_string();
    headers.insert("x-ratelimit-reset", HeaderValue::from_str(&reset).expect("a number"));
    response
}

fn empty_response(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

fn error_json(status: u16, message: &str, documentation_url: &str) -> Value {
    json!({"message": message, "documentation_url": documentation_url, "status": status.to_string()})
}

fn not_found() -> Response {
    json_response(StatusCode::NOT_FOUND, error_json(404, "Not Found", DOCS))
}

fn validation_failed(resource: &str, field: &str, code: &str, documentation_url: &str) -> Response {
    let mut value = error_json(422, "Validation Failed", documentation_url);
    value["errors"] = json!([{"resource": resource, "field": field, "code": code}]);
    json_response(StatusCode::UNPROCESSABLE_ENTITY, value)
}

fn json_object(body: Option<Value>) -> Result<Map<String, Value>, Response> {
    match body {
        Some(Value::Object(map)) => Ok(map),
        None => Ok(Map::new()),
        Some(_) => Err(json_response(StatusCode::BAD_REQUEST, error_json(400, "Problems parsing JSON", DOCS))),
    }
}

/// The `body` of a create or update comment request, or GitHub's 422.
fn comment_body(body: &Option<Value>) -> Result<String, Response> {
    let docs = "https://docs.github.com/rest/issues/comments#create-an-issue-comment";
    let map = json_object(body.clone())?;
    let Some(text) = map.get("body").and_then(Value::as_str) else {
        return Err(validation_failed("IssueComment", "body", "missing_field", docs));
    };
    if text.chars().count() > MAX_COMMENT_CHARS {
        let mut value = error_json(422, "Validation Failed", docs);
        value["errors"] = json!([{
            "resource": "IssueComment", "code": "custom", "field": "body",
            "message": format!("body is too long (maximum is {MAX_COMMENT_CHARS} characters)")
        }]);
        return Err(json_response(StatusCode::UNPROCESSABLE_ENTITY, value));
    }
    Ok(text.to_string())
}

fn injected_failure(status: u16, retry_after: Option<u64>) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let rate_docs = "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api";
    let value = match status {
        429 => error_json(
            status,
            "You have exceeded a secondary rate limit. Please wait a few minutes before you try again.",
            "https://docs.github.com/rest/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits",
        ),
        403 if retry_after.is_some() => error_json(status, "API rate limit exceeded for installation.", rate_docs),
        403 => error_json(status, "Resource not accessible by integration", DOCS),
        404 => error_json(status, "Not Found", DOCS),
        422 => error_json(status, "Validation Failed", DOCS),
        500..=599 => error_json(status, "Server Error", DOCS),
        _ => error_json(status, code.canonical_reason().unwrap_or("Error"), DOCS),
    };
    let mut response = json_response(code, value);
    if let Some(seconds) = retry_after {
        let headers = response.headers_mut();
        headers.insert("retry-after", HeaderValue::from_str(&seconds.to_string()).expect("a number"));
        if status == 403 {
            let reset = (Utc::now().timestamp() + seconds as i64).to_string();
            headers.insert("x-ratelimit-remaining", HeaderValue::from_static("0"));
            headers.insert("x-ratelimit-used", HeaderValue::from_static("5000"));
            headers.insert("x-ratelimit-reset", HeaderValue::from_str(&reset).expect("a number"));
        }
    }
    response
}
