//! Everything that talks to GitHub: webhooks in ([`webhook`]), the REST API out ([`client`]),
//! and the translation of deliveries into domain commands ([`ingest`]).

pub mod client;
pub mod ingest;
pub mod oauth;
pub mod webhook;

use understudy_domain::ids::{AccountId, ProjectId, UserId};
use uuid::Uuid;

const GITHUB_NAMESPACE: Uuid = Uuid::from_u128(0x8b0f_2d6e_3c1a_4f7e_9d25_67a1_c4e3_0b58);

/// Our ids for GitHub's: stable, so the same repository is always the same project.
pub fn project_id(repository_id: u64) -> ProjectId {
    ProjectId(Uuid::new_v5(&GITHUB_NAMESPACE, format!("repository:{repository_id}").as_bytes()))
}

pub fn account_id(github_account_id: u64) -> AccountId {
    AccountId(Uuid::new_v5(&GITHUB_NAMESPACE, format!("account:{github_account_id}").as_bytes()))
}

pub fn user_id(github_user_id: u64) -> UserId {
    UserId(Uuid::new_v5(&GITHUB_NAMESPACE, format!("user:{github_user_id}").as_bytes()))
}

/// The GitHub App manifest (GitHub's "create an App from a manifest" flow): the permissions and
/// webhook events Understudy uses. GitHub sends `installation` events to every App unasked.
pub fn app_manifest(name: &str, public_url: &str) -> serde_json::Value {
    let public_url = public_url.trim_end_matches('/');
    serde_json::json!({
        "name": name,
        "url": public_url,
        "hook_attributes": { "url": format!("{public_url}/webhooks/github"), "active": true },
        "redirect_url": format!("{public_url}/setup/github/done"),
        "callback_urls": [format!("{public_url}/auth/github/callback")],
        "setup_url": format!("{public_url}/dashboard"),
        "public": false,
        "default_permissions": {
            "pull_requests": "write",
            "issues": "write",
            "deployments": "write",
            "checks": "write",
            "contents": "write",
            "metadata": "read"
        },
        "default_events": ["pull_request", "push", "delete"]
    })
}
