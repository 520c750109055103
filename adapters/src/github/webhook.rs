//! GitHub webhooks: signature check and the payload shapes we act on.
//!
//! Only the fields we use are parsed, so a payload GitHub enriches later still parses; a payload
//! missing one of them is refused with the field's path.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum SignatureError {
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    #[error("X-Hub-Signature-256 is not `sha256=<64 hex digits>`")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match the body: check GITHUB_WEBHOOK_SECRET")]
    Mismatch,
}

/// Checks `X-Hub-Signature-256` (HMAC-SHA256 of the raw body) in constant time.
pub fn verify_signature(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex_digest = header.strip_prefix("sha256=").ok_or(SignatureError::Malformed)?;
    let expected = hex::decode(hex_digest).map_err(|_| SignatureError::Malformed)?;
    if expected.len() != 32 {
        return Err(SignatureError::Malformed);
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| SignatureError::Mismatch)?;
    mac.update(body);
    mac.verify_slice(&expected).map_err(|_| SignatureError::Mismatch)
}

/// `sha256=<hex>` for `body`: what GitHub sends, and what tests sign with.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Account {
    pub id: u64,
    pub login: String,
    #[serde(rename = "type")]
    pub kind: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Repository {
    pub id: u64,
    pub name: String,
    pub full_name: String,
    #[serde(default)]
    pub default_branch: Option<String>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct InstallationRef {
    pub id: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Sender {
    pub id: u64,
    pub login: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct GitRef {
    #[serde(rename = "ref")]
    pub branch: String,
    pub sha: String,
    /// The repository the ref lives in; `null` when a fork was deleted.
    #[serde(default)]
    pub repo: Option<RefRepository>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct RefRepository {
    pub id: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PullRequestData {
    pub number: u64,
    pub state: String,
    #[serde(default)]
    pub merged: Option<bool>,
    pub updated_at: DateTime<Utc>,
    pub head: GitRef,
    pub base: GitRef,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PullRequestPayload {
    pub action: String,
    pub pull_request: PullRequestData,
    pub repository: Repository,
    pub installation: Option<InstallationRef>,
    pub sender: Sender,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct PushPayload {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub after: String,
    #[serde(default)]
    pub deleted: bool,
    /// For a tag, the commit it points at (`after` is the tag object of an annotated tag).
    #[serde(default)]
    pub head_commit: Option<HeadCommit>,
    pub repository: Repository,
    pub installation: Option<InstallationRef>,
    pub sender: Sender,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct HeadCommit {
    pub id: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct InstalledRepository {
    pub id: u64,
    pub name: String,
    pub full_name: String,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct Installation {
    pub id: u64,
    pub account: Account,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct InstallationPayload {
    pub action: String,
    pub installation: Installation,
    #[serde(default)]
    pub repositories: Vec<InstalledRepository>,
    pub sender: Sender,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct InstallationRepositoriesPayload {
    pub action: String,
    pub installation: Installation,
    #[serde(default)]
    pub repositories_added: Vec<InstalledRepository>,
    #[serde(default)]
    pub repositories_removed: Vec<InstalledRepository>,
    pub sender: Sender,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct DeletePayload {
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub ref_type: String,
    pub repository: Repository,
    pub installation: Option<InstallationRef>,
    pub sender: Sender,
}

/// A delivery we act on, or one we accept and ignore.
#[derive(Debug, Clone, PartialEq)]
pub enum Webhook {
    PullRequest(PullRequestPayload),
    Push(PushPayload),
    Installation(InstallationPayload),
    InstallationRepositories(InstallationRepositoriesPayload),
    Delete(DeletePayload),
    /// An event or action we do not act on (ping, issues, labeled, …): accepted, recorded, ignored.
    Ignored {
        event: String,
        action: Option<String>,
    },
}

#[derive(Debug, Error, PartialEq, Eq)]
#[error("malformed {event} payload: {reason}")]
pub struct PayloadError {
    pub event: String,
    /// serde's message, which names the missing or mistyped field and where.
    pub reason: String,
}

const PULL_REQUEST_ACTIONS: [&str; 5] = ["opened", "reopened", "synchronize", "closed", "edited"];

/// Parses a delivery of `event` (the `X-GitHub-Event` header); also returns its `action`.
pub fn parse(event: &str, body: &[u8]) -> Result<(Webhook, Option<String>), PayloadError> {
    let error = |e: serde_json::Error| PayloadError { event: event.to_string(), reason: e.to_string() };
    let value: serde_json::Value = serde_json::from_slice(body).map_err(error)?;
    let action = value.get("action").and_then(|a| a.as_str()).map(str::to_string);
    let ignored = || Ok(Webhook::Ignored { event: event.to_string(), action: action.clone() });
    let webhook = match event {
        "pull_request" if action.as_deref().is_some_and(|a| PULL_REQUEST_ACTIONS.contains(&a)) => {
            Ok(Webhook::PullRequest(serde_json::from_value(value).map_err(error)?))
        }
        "push" => Ok(Webhook::Push(serde_json::from_value(value).map_err(error)?)),
        "installation" if matches!(action.as_deref(), Some("created" | "deleted")) => {
            Ok(Webhook::Installation(serde_json::from_value(value).map_err(error)?))
        }
        "installation_repositories" => Ok(Webhook::InstallationRepositories(serde_json::from_value(value).map_err(error)?)),
        "delete" => Ok(Webhook::Delete(serde_json::from_value(value).map_err(error)?)),
        _ => ignored(),
    }?;
    Ok((webhook, action))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures() {
        let body = br#"{"zen":"Keep it logically awesome."}"#;
        let good = sign(b"secret", body);
        assert_eq!(verify_signature(b"secret", body, Some(&good)), Ok(()));
        assert_eq!(verify_signature(b"other", body, Some(&good)), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(b"secret", b"tampered", Some(&good)), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(b"secret", body, None), Err(SignatureError::Missing));
        assert_eq!(verify_signature(b"secret", body, Some("sha1=abc")), Err(SignatureError::Malformed));
        assert_eq!(verify_signature(b"secret", body, Some("sha256=zz")), Err(SignatureError::Malformed));
        assert_eq!(verify_signature(b"secret", body, Some("sha256=abcd")), Err(SignatureError::Malformed));
    }

    #[test]
    fn missing_fields_are_named() {
        let error = parse("pull_request", br#"{"action":"opened","pull_request":{"number":1}}"#).unwrap_err();
        assert!(error.reason.contains("missing field"), "{error}");
        assert!(parse("push", b"not json").is_err());
        assert_eq!(parse("ping", b"{}"), Ok((Webhook::Ignored { event: "ping".into(), action: None }, None)));
        assert_eq!(
            parse("pull_request", br#"{"action":"labeled"}"#),
            Ok((Webhook::Ignored { event: "pull_request".into(), action: Some("labeled".into()) }, Some("labeled".into())))
        );
    }
}
