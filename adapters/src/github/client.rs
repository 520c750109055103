//! The GitHub REST API, as a GitHub App (octocrab with app auth and cached installation tokens).
//!
//! octocrab is built without its `retry` feature (see the workspace Cargo.toml): its retry would
//! repeat a POST that GitHub may already have applied (a duplicate comment). Callers retry idempotently instead; this module reports what kind of
//! failure happened and, for rate limits, how long GitHub asked us to wait.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use http::{HeaderMap, StatusCode};
use octocrab::models::{AppId, InstallationId};
use octocrab::Octocrab;
use serde_json::Value;
use thiserror::Error;

/// How to reach GitHub as our App.
#[derive(Clone)]
pub struct GitHubConfig {
    /// `GITHUB_API_URL`, GitHub's public API by default.
    pub api_url: String,
    pub app_id: u64,
    /// PEM text of the App's private key.
    pub private_key_pem: String,
}

impl std::fmt::Debug for GitHubConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GitHubConfig").field("api_url", &self.api_url).field("app_id", &self.app_id).finish_non_exhaustive()
    }
}

pub const DEFAULT_API_URL: &str = "https://api.github.com";

/// The most pages of 100 a lookup reads before it takes the item for missing.
const MAX_PAGES: u32 = 50;

impl GitHubConfig {
    /// From `GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY` (PEM text or a file path) and
    /// `GITHUB_API_URL`; `None` when no App is configured.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let Ok(app_id) = std::env::var("GITHUB_APP_ID") else { return Ok(None) };
        let app_id = app_id.trim().parse().with_context(|| format!("GITHUB_APP_ID {app_id:?} is not a number"))?;
        let key = std::env::var("GITHUB_APP_PRIVATE_KEY").context("GITHUB_APP_ID is set but GITHUB_APP_PRIVATE_KEY is not")?;
        let private_key_pem = if key.contains("-----BEGIN") {
            key
        } else {
            std::fs::read_to_string(&key).with_context(|| format!("reading GITHUB_APP_PRIVATE_KEY from the file {key:?}"))?
        };
        let api_url = std::env::var("GITHUB_API_URL").unwrap_or_else(|_| DEFAULT_API_URL.into());
        Ok(Some(Self { api_url, app_id, private_key_pem }))
    }
}

#[derive(Debug, Error)]
pub enum GitHubError {
    #[error("GitHub answered 404 Not Found for {0}")]
    NotFound(String),
    /// 429, or 403 with the rate-limit headers: wait, then retry.
    #[error("GitHub rate limit; retry after {retry_after:?}")]
    RateLimited { retry_after: Duration },
    /// 5xx or a transport failure: retry with backoff.
    #[error("GitHub is failing ({0}); will retry")]
    Unavailable(String),
    /// Anything else (401, 403 without rate-limit headers, 422, …): retrying will not help.
    #[error("GitHub refused the request: {0}")]
    Refused(String),
}

impl GitHubError {
    pub fn retryable(&self) -> bool {
        matches!(self, Self::RateLimited { .. } | Self::Unavailable(_))
    }
}

/// Our GitHub App.
#[derive(Clone)]
pub struct GitHub {
    app: Octocrab,
    app_id: u64,
    /// One client per installation, shared: cloning an `Octocrab` would copy its token cache
    /// empty, and every call would mint a new installation token.
    installations: Arc<Mutex<HashMap<u64, Arc<Octocrab>>>>,
}

impl GitHub {
    pub fn new(config: &GitHubConfig) -> anyhow::Result<Self> {
        let key = jsonwebtoken::EncodingKey::from_rsa_pem(config.private_key_pem.as_bytes())
            .context("GITHUB_APP_PRIVATE_KEY is not an RSA private key in PEM form")?;
        let app = Octocrab::builder()
            .base_uri(config.api_url.as_str())
            .with_context(|| format!("GITHUB_API_URL {:?} is not a URL", config.api_url))?
            .app(AppId(config.app_id), key)
            .set_connect_timeout(Some(Duration::from_secs(5)))
            .set_read_timeout(Some(Duration::from_secs(15)))
            .build()
            .context("building the GitHub client")?;
        Ok(Self { app, app_id: config.app_id, installations: Arc::default() })
    }

    pub fn app_id(&self) -> u64 {
        self.app_id
    }

    /// A client acting as one installation; its token is fetched and refreshed by octocrab.
    fn installation(&self, id: u64) -> Result<Arc<Octocrab>, GitHubError> {
        let mut cache = self.installations.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(client) = cache.get(&id) {
            return Ok(Arc::clone(client));
        }
        let client = Arc::new(self.app.installation(InstallationId(id)).map_err(|e| GitHubError::Refused(e.to_string()))?);
        cache.insert(id, Arc::clone(&client));
        Ok(client)
    }

    #[tracing::instrument(name = "github.call", skip(self, body), fields(%method, path))]
    async fn call(
        &self,
        installation: u64,
        method: http::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(HeaderMap, Value), GitHubError> {
        let client = self.installation(installation)?;
        let transport = |e: octocrab::Error| classify_transport(&e);
        let response = match (method.clone(), body) {
            (http::Method::GET, _) => client._get(path).await,
            (http::Method::POST, Some(body)) => client._post(path, Some(body)).await,
            (http::Method::PATCH, Some(body)) => client._patch(path, Some(body)).await,
            (other, _) => return Err(GitHubError::Refused(format!("unsupported call {other} {path}"))),
        }
        .map_err(|e| {
            crate::metrics::METRICS.github_calls.inc("transport");
            transport(e)
        })?;
        let status = response.status();
        let headers = response.headers().clone();
        let metrics = &crate::metrics::METRICS;
        metrics.github_calls.inc(if status.is_success() {
            "ok"
        } else if status.is_server_error() {
            "5xx"
        } else {
            status.as_str()
        });
        if let Some(remaining) = headers.get("x-ratelimit-remaining").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok()) {
            metrics.github_rate_limit_remaining.store(remaining, std::sync::atomic::Ordering::Relaxed);
        }
        let text = client.body_to_string(response).await.map_err(transport)?;
        if status.is_success() {
            let value = if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text).map_err(|e| GitHubError::Unavailable(format!("unreadable answer to {method} {path}: {e}")))?
            };
            return Ok((headers, value));
        }
        Err(classify(status, &headers, &format!("{method} {path}"), &text))
    }

    /// A fresh installation token, for `git fetch` over HTTPS (`x-access-token:<token>`). It is
    /// valid for an hour; a fetch needs it for seconds.
    pub async fn clone_token(&self, installation: u64) -> Result<String, GitHubError> {
        use secrecy::ExposeSecret;
        let (_, token) = self.app.installation_and_token(InstallationId(installation)).await.map_err(|e| classify_transport(&e))?;
        Ok(token.expose_secret().to_string())
    }

    /// The repository as GitHub describes it (id, name, full_name, owner, default_branch, …).
    pub async fn repository(&self, installation: u64, full_name: &str) -> Result<Value, GitHubError> {
        Ok(self.call(installation, http::Method::GET, &format!("/repos/{full_name}"), None).await?.1)
    }

    /// The App's installation that can see `full_name`, asked as the App itself; `None` when the
    /// App is not installed for it.
    pub async fn installation_of(&self, full_name: &str) -> Result<Option<u64>, GitHubError> {
        let path = format!("/repos/{full_name}/installation");
        let response = self.app._get(path.as_str()).await.map_err(|e| classify_transport(&e))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = self.app.body_to_string(response).await.map_err(|e| classify_transport(&e))?;
        if status == http::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !status.is_success() {
            return Err(classify(status, &headers, &format!("GET {path}"), &text));
        }
        let installation: Value =
            serde_json::from_str(&text).map_err(|e| GitHubError::Unavailable(format!("unreadable installation: {e}")))?;
        Ok(installation["id"].as_u64())
    }

    /// Whether `branch` exists in `full_name`.
    pub async fn branch_exists(&self, installation: u64, full_name: &str, branch: &str) -> Result<bool, GitHubError> {
        let path = format!("/repos/{full_name}/branches/{}", super::oauth::encode_component(branch));
        match self.call(installation, http::Method::GET, &path, None).await {
            Ok(_) => Ok(true),
            Err(GitHubError::NotFound(_)) => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The repository's default branch.
    pub async fn default_branch(&self, installation: u64, full_name: &str) -> Result<String, GitHubError> {
        let (_, repo) = self.call(installation, http::Method::GET, &format!("/repos/{full_name}"), None).await?;
        repo["default_branch"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| GitHubError::Refused(format!("{full_name} has no default_branch")))
    }

    /// The text of the file at `path` at `sha`; `None` when there is none.
    pub async fn file_at(&self, installation: u64, full_name: &str, sha: &str, path: &str) -> Result<Option<String>, GitHubError> {
        use base64::Engine;
        match self.call(installation, http::Method::GET, &format!("/repos/{full_name}/contents/{path}?ref={sha}"), None).await {
            Ok((_, file)) => {
                let encoded: String = file["content"].as_str().unwrap_or_default().split_whitespace().collect();
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(encoded)
                    .map_err(|e| GitHubError::Unavailable(format!("{path} at {sha}: unreadable content: {e}")))?;
                Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
            }
            Err(GitHubError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// The names of the files at the repository root at `sha`.
    pub async fn root_files(&self, installation: u64, full_name: &str, sha: &str) -> Result<Vec<String>, GitHubError> {
        let (_, listing) = self.call(installation, http::Method::GET, &format!("/repos/{full_name}/contents?ref={sha}"), None).await?;
        Ok(listing
            .as_array()
            .map(|entries| entries.iter().filter(|e| e["type"] == "file").filter_map(|e| e["name"].as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// Our App's comment on the issue whose body starts with `marker`, if there is one. A
    /// comment by anyone else is never taken for ours, whatever it says.
    pub async fn find_comment(&self, installation: u64, full_name: &str, issue: u64, marker: &str) -> Result<Option<u64>, GitHubError> {
        let path = format!("/repos/{full_name}/issues/{issue}/comments?per_page=100");
        self.find_in_pages(installation, &path, Value::as_array, |c| {
            let ours = c["performed_via_github_app"]["id"].as_u64() == Some(self.app_id)
                && c["body"].as_str().is_some_and(|b| b.starts_with(marker));
            ours.then(|| c["id"].as_u64()).flatten()
        })
        .await
    }

    /// The first item of a paginated list that `pick` takes, following GitHub's `Link: rel="next"`
    /// through at most [`MAX_PAGES`] pages. `path` has a query (`?per_page=100` at least);
    /// `items` finds the page's items in its answer (the answer itself, or a field of it).
    async fn find_in_pages(
        &self,
        installation: u64,
        path: &str,
        items: impl Fn(&Value) -> Option<&Vec<Value>>,
        pick: impl Fn(&Value) -> Option<u64>,
    ) -> Result<Option<u64>, GitHubError> {
        for page in 1..=MAX_PAGES {
            let (headers, answer) = self.call(installation, http::Method::GET, &format!("{path}&page={page}"), None).await?;
            let items = items(&answer).map(Vec::as_slice).unwrap_or_default();
            if let Some(found) = items.iter().find_map(&pick) {
                return Ok(Some(found));
            }
            let has_next = headers.get("link").and_then(|l| l.to_str().ok()).is_some_and(|l| l.contains("rel=\"next\""));
            if items.is_empty() || !has_next {
                break;
            }
        }
        Ok(None)
    }

    pub async fn create_comment(&self, installation: u64, full_name: &str, issue: u64, body: &str) -> Result<u64, GitHubError> {
        let payload = serde_json::json!({ "body": body });
        let (_, comment) =
            self.call(installation, http::Method::POST, &format!("/repos/{full_name}/issues/{issue}/comments"), Some(&payload)).await?;
        comment["id"].as_u64().ok_or_else(|| GitHubError::Unavailable("created comment has no id".into()))
    }

    pub async fn update_comment(&self, installation: u64, full_name: &str, comment_id: u64, body: &str) -> Result<(), GitHubError> {
        let payload = serde_json::json!({ "body": body });
        self.call(installation, http::Method::PATCH, &format!("/repos/{full_name}/issues/comments/{comment_id}"), Some(&payload)).await?;
        Ok(())
    }
}

impl GitHub {
    /// The GitHub deployment we made for our deployment `ours` (its id is in the payload), if any.
    pub async fn find_deployment(
        &self,
        installation: u64,
        full_name: &str,
        sha: &str,
        environment: &str,
        ours: &str,
    ) -> Result<Option<u64>, GitHubError> {
        let path = format!(
            "/repos/{full_name}/deployments?sha={sha}&environment={}&per_page=100",
            understudy_domain::pr_comment::segment(environment)
        );
        self.find_in_pages(installation, &path, Value::as_array, |d| {
            (d["payload"]["understudy_deployment"] == ours && d["sha"] == sha).then(|| d["id"].as_u64()).flatten()
        })
        .await
    }

    /// Creates a deployment of `sha` to `environment`, tagged with our deployment id.
    pub async fn create_deployment(
        &self,
        installation: u64,
        full_name: &str,
        sha: &str,
        environment: &str,
        ours: &str,
        production: bool,
    ) -> Result<u64, GitHubError> {
        let body = serde_json::json!({
            "ref": sha,
            "environment": environment,
            "auto_merge": false,
            "required_contexts": [],
            "transient_environment": !production,
            "production_environment": production,
            "description": "Understudy preview",
            "payload": { "understudy_deployment": ours },
        });
        let (_, deployment) = self.call(installation, http::Method::POST, &format!("/repos/{full_name}/deployments"), Some(&body)).await?;
        deployment["id"].as_u64().ok_or_else(|| GitHubError::Unavailable("created deployment has no id".into()))
    }

    /// Adds a status to a deployment. `auto_inactive` is off: Understudy says itself when a
    /// deployment stops, and previews of different pull requests share an environment name.
    pub async fn create_deployment_status(
        &self,
        installation: u64,
        full_name: &str,
        deployment: u64,
        state: &str,
        environment_url: &str,
        log_url: &str,
    ) -> Result<(), GitHubError> {
        let body = serde_json::json!({
            "state": state,
            "environment_url": environment_url,
            "log_url": log_url,
            "auto_inactive": false,
        });
        self.call(installation, http::Method::POST, &format!("/repos/{full_name}/deployments/{deployment}/statuses"), Some(&body)).await?;
        Ok(())
    }

    /// Our check run named `name` on `sha` for our deployment `external_id`, if any.
    pub async fn find_check_run(
        &self,
        installation: u64,
        full_name: &str,
        sha: &str,
        name: &str,
        external_id: &str,
    ) -> Result<Option<u64>, GitHubError> {
        let path =
            format!("/repos/{full_name}/commits/{sha}/check-runs?check_name={}&per_page=100", understudy_domain::pr_comment::segment(name));
        self.find_in_pages(
            installation,
            &path,
            |answer| answer["check_runs"].as_array(),
            |r| (r["external_id"] == external_id && r["app"]["id"].as_u64() == Some(self.app_id)).then(|| r["id"].as_u64()).flatten(),
        )
        .await
    }

    pub async fn create_check_run(&self, installation: u64, full_name: &str, body: &Value) -> Result<u64, GitHubError> {
        let (_, run) = self.call(installation, http::Method::POST, &format!("/repos/{full_name}/check-runs"), Some(body)).await?;
        run["id"].as_u64().ok_or_else(|| GitHubError::Unavailable("created check run has no id".into()))
    }

    pub async fn update_check_run(&self, installation: u64, full_name: &str, id: u64, body: &Value) -> Result<(), GitHubError> {
        self.call(installation, http::Method::PATCH, &format!("/repos/{full_name}/check-runs/{id}"), Some(body)).await?;
        Ok(())
    }
}

fn classify_transport(error: &octocrab::Error) -> GitHubError {
    GitHubError::Unavailable(error.to_string())
}

/// Maps a failed answer to what the caller should do, reading GitHub's rate-limit headers.
pub fn classify(status: StatusCode, headers: &HeaderMap, what: &str, body: &str) -> GitHubError {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    let retry_after = header("retry-after").and_then(|s| s.parse::<u64>().ok()).map(Duration::from_secs);
    let reset = header("x-ratelimit-reset").and_then(|s| s.parse::<i64>().ok()).map(|reset| {
        let wait = reset - chrono::Utc::now().timestamp();
        Duration::from_secs(wait.clamp(1, 3600) as u64)
    });
    let exhausted = header("x-ratelimit-remaining").as_deref() == Some("0");
    let message = format!("{status} for {what}: {}", body.chars().take(300).collect::<String>());
    match status.as_u16() {
        404 | 410 => GitHubError::NotFound(what.to_string()),
        429 => GitHubError::RateLimited { retry_after: retry_after.or(reset).unwrap_or(Duration::from_secs(60)) },
        403 if exhausted || retry_after.is_some() => {
            GitHubError::RateLimited { retry_after: retry_after.or(reset).unwrap_or(Duration::from_secs(60)) }
        }
        500..=599 => GitHubError::Unavailable(message),
        _ => GitHubError::Refused(message),
    }
}
