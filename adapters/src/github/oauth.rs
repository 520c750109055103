//! Signing in with GitHub: the GitHub App's OAuth flow (the web flow of "user-to-server"
//! tokens), the signed-in user, and whether they can read a repository.
//!
//! - `GET {web}/login/oauth/authorize?client_id&redirect_uri&state[&login]` sends the browser
//!   to GitHub; GitHub sends it back to `redirect_uri?code&state`.
//! - `POST {web}/login/oauth/access_token` trades the code for the user's token. GitHub answers
//!   200 even when it refuses (`{"error": "bad_verification_code", ...}`), and form-encoded
//!   unless asked for JSON: both are read.
//! - `GET {api}/user` and `GET {api}/repos/{owner}/{repo}` with the user's token: a repository
//!   the user cannot read is a 404, as for anyone else.

use std::time::Duration;

use http::header::ACCEPT;
use octocrab::Octocrab;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::Value;

use super::client::{classify, GitHubError, DEFAULT_API_URL};

pub const DEFAULT_WEB_URL: &str = "https://github.com";

/// The GitHub App's OAuth client.
#[derive(Clone)]
pub struct OAuthApp {
    pub client_id: String,
    client_secret: SecretString,
    /// `GITHUB_WEB_URL`: where browsers sign in (`https://github.com`).
    pub web_url: String,
    /// `GITHUB_API_URL`.
    pub api_url: String,
}

impl std::fmt::Debug for OAuthApp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OAuthApp").field("client_id", &self.client_id).field("web_url", &self.web_url).finish_non_exhaustive()
    }
}

/// The signed-in person, as GitHub says.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct GitHubUser {
    pub id: u64,
    pub login: String,
    #[serde(default)]
    pub name: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum OAuthError {
    /// GitHub refused the code (expired, used twice, wrong redirect): sign in again.
    #[error("GitHub refused the sign-in: {0}")]
    Refused(String),
    #[error(transparent)]
    GitHub(#[from] GitHubError),
}

impl OAuthApp {
    pub fn new(client_id: String, client_secret: String, web_url: String, api_url: String) -> Self {
        Self {
            client_id,
            client_secret: client_secret.into(),
            web_url: web_url.trim_end_matches('/').to_string(),
            api_url: api_url.trim_end_matches('/').to_string(),
        }
    }

    /// From `GITHUB_CLIENT_ID` and `GITHUB_CLIENT_SECRET` (the App's OAuth credentials),
    /// `GITHUB_WEB_URL` and `GITHUB_API_URL`; `None` when no client id is set.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let Some(client_id) = std::env::var("GITHUB_CLIENT_ID").ok().filter(|s| !s.trim().is_empty()) else { return Ok(None) };
        let client_secret = std::env::var("GITHUB_CLIENT_SECRET")
            .ok()
            .filter(|s| !s.is_empty())
            .ok_or_else(|| anyhow::anyhow!("GITHUB_CLIENT_ID is set but GITHUB_CLIENT_SECRET is not"))?;
        let web_url = std::env::var("GITHUB_WEB_URL").unwrap_or_else(|_| DEFAULT_WEB_URL.into());
        let api_url = std::env::var("GITHUB_API_URL").unwrap_or_else(|_| DEFAULT_API_URL.into());
        Ok(Some(Self::new(client_id.trim().to_string(), client_secret, web_url, api_url)))
    }

    /// Where to send the browser to sign in. `login` suggests the account to sign in with.
    pub fn authorize_url(&self, redirect_uri: &str, state: &str, login: Option<&str>) -> String {
        let mut url = format!(
            "{}/login/oauth/authorize?client_id={}&redirect_uri={}&state={}",
            self.web_url,
            encode(&self.client_id),
            encode(redirect_uri),
            encode(state)
        );
        if let Some(login) = login {
            url.push_str(&format!("&login={}", encode(login)));
        }
        url
    }

    fn client(base: &str, token: Option<&str>) -> Result<Octocrab, GitHubError> {
        let mut builder = Octocrab::builder()
            .base_uri(base)
            .map_err(|e| GitHubError::Refused(format!("{base:?} is not a URL: {e}")))?
            .add_header(ACCEPT, "application/json".to_string())
            .set_connect_timeout(Some(Duration::from_secs(5)))
            .set_read_timeout(Some(Duration::from_secs(15)));
        if let Some(token) = token {
            builder = builder.user_access_token(token.to_string());
        }
        builder.build().map_err(|e| GitHubError::Refused(format!("building a GitHub client: {e}")))
    }

    async fn answer(
        client: &Octocrab,
        what: &str,
        response: octocrab::Result<http::Response<http_body_util::combinators::BoxBody<bytes::Bytes, octocrab::Error>>>,
    ) -> Result<(http::StatusCode, String), GitHubError> {
        let response = response.map_err(|e| GitHubError::Unavailable(format!("{what}: {e}")))?;
        let status = response.status();
        let headers = response.headers().clone();
        let text = client.body_to_string(response).await.map_err(|e| GitHubError::Unavailable(format!("{what}: {e}")))?;
        if status.is_success() {
            Ok((status, text))
        } else {
            Err(classify(status, &headers, what, &text))
        }
    }

    /// Trades the code GitHub gave the browser for the user's token.
    pub async fn exchange(&self, code: &str, redirect_uri: &str) -> Result<SecretString, OAuthError> {
        let client = Self::client(&self.web_url, None)?;
        let body = serde_json::json!({
            "client_id": self.client_id,
            "client_secret": self.client_secret.expose_secret(),
            "code": code,
            "redirect_uri": redirect_uri,
        });
        let what = "POST /login/oauth/access_token";
        let (_, text) = Self::answer(&client, what, client._post("/login/oauth/access_token", Some(&body)).await).await?;
        let fields: Value = serde_json::from_str(&text).unwrap_or_else(|_| {
            // The form-encoded answer: access_token=...&scope=...&token_type=bearer
            Value::Object(
                text.split('&').filter_map(|pair| pair.split_once('=')).map(|(k, v)| (k.to_string(), Value::String(decode(v)))).collect(),
            )
        });
        if let Some(error) = fields["error"].as_str() {
            let description = fields["error_description"].as_str().unwrap_or_default();
            return Err(OAuthError::Refused(format!("{error}: {description}")));
        }
        match fields["access_token"].as_str() {
            Some(token) if !token.is_empty() => Ok(SecretString::from(token.to_string())),
            _ => Err(OAuthError::Refused("GitHub's answer held no access token".into())),
        }
    }

    /// The person the token belongs to.
    pub async fn user(&self, token: &SecretString) -> Result<GitHubUser, GitHubError> {
        let client = Self::client(&self.api_url, Some(token.expose_secret()))?;
        let (_, text) = Self::answer(&client, "GET /user", client._get("/user").await).await?;
        serde_json::from_str(&text).map_err(|e| GitHubError::Unavailable(format!("unreadable answer to GET /user: {e}")))
    }

    /// The repository as its owner's token sees it (with `permissions`), or `None` when GitHub
    /// shows them no such repository.
    pub async fn repository(&self, token: &SecretString, full_name: &str) -> Result<Option<Value>, GitHubError> {
        let client = Self::client(&self.api_url, Some(token.expose_secret()))?;
        let path = format!("/repos/{full_name}");
        match Self::answer(&client, &format!("GET {path}"), client._get(path.as_str()).await).await {
            Ok((_, text)) => {
                Ok(Some(serde_json::from_str(&text).map_err(|e| GitHubError::Unavailable(format!("unreadable repository: {e}")))?))
            }
            Err(GitHubError::NotFound(_)) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// One page (from 1) of the repositories the token's owner can reach, most recently updated
    /// first, and whether there is another page.
    pub async fn repositories(&self, token: &SecretString, page: u32, per_page: u32) -> Result<(Vec<Value>, bool), GitHubError> {
        let client = Self::client(&self.api_url, Some(token.expose_secret()))?;
        let path = format!("/user/repos?sort=updated&direction=desc&per_page={per_page}&page={page}");
        let response = client._get(path.as_str()).await.map_err(|e| GitHubError::Unavailable(format!("GET /user/repos: {e}")))?;
        let more = response.headers().get("link").and_then(|v| v.to_str().ok()).is_some_and(|link| link.contains("rel=\"next\""));
        let status = response.status();
        let headers = response.headers().clone();
        let text = client.body_to_string(response).await.map_err(|e| GitHubError::Unavailable(format!("GET /user/repos: {e}")))?;
        if !status.is_success() {
            return Err(classify(status, &headers, "GET /user/repos", &text));
        }
        let repos: Vec<Value> =
            serde_json::from_str(&text).map_err(|e| GitHubError::Unavailable(format!("unreadable repositories: {e}")))?;
        Ok((repos, more))
    }

    /// Whether the token's owner can read `full_name` (`owner/name`): GitHub answers 404 for a
    /// repository they cannot see, and says `permissions.pull` for one they can.
    pub async fn can_read(&self, token: &SecretString, full_name: &str) -> Result<bool, GitHubError> {
        let client = Self::client(&self.api_url, Some(token.expose_secret()))?;
        let path = format!("/repos/{full_name}");
        match Self::answer(&client, &format!("GET {path}"), client._get(path.as_str()).await).await {
            Ok((_, text)) => {
                let repo: Value =
                    serde_json::from_str(&text).map_err(|e| GitHubError::Unavailable(format!("unreadable repository: {e}")))?;
                // No `permissions` at all: GitHub shows the repository, so it is readable (public).
                Ok(repo["permissions"]["pull"].as_bool().unwrap_or(true))
            }
            Err(GitHubError::NotFound(_)) => Ok(false),
            Err(GitHubError::Refused(reason)) if reason.starts_with("403") => Ok(false),
            Err(error) => Err(error),
        }
    }
}

fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(byte as char),
            _ => out.push_str(&format!("%{byte:02X}")),
        }
    }
    out
}

/// Percent-decoding of one form value (`+` is a space).
pub fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                Ok(byte) => {
                    out.push(byte);
                    i += 2;
                }
                Err(_) => out.push(b'%'),
            },
            byte => out.push(byte),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encoding for a query value.
pub fn encode_component(text: &str) -> String {
    encode(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_round_trip() {
        for text in ["plain", "a b&c=d", "/dashboard?x=1#y", "ünïcode", "%", "100%25", "+"] {
            assert_eq!(decode(&encode(text)), text);
        }
        assert_eq!(decode("a+b%2Fc"), "a b/c");
        assert_eq!(decode("bad%zz"), "bad%zz");
        assert_eq!(decode("end%4"), "end%4");
    }
}
