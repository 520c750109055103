//! The preview token: every request the proxy passes to a preview carries a short-lived JWT in
//! `X-Understudy-Token`, signed with Ed25519 (`alg: EdDSA`), holding the environment and project
//! it is for. The app can trust that a request came through Understudy's proxy by checking it
//! against the public key at `/.well-known/jwks.json`. It names no user and carries no secret.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, SigningKey};
use serde::{Deserialize, Serialize};
use sha2::Digest;
use understudy_domain::ids::{EnvironmentId, ProjectId};

/// The header the proxy sets (and strips from what clients send).
pub const HEADER: &str = "x-understudy-token";
/// How long a token is valid.
pub const LIFETIME_SECONDS: i64 = 300;
/// The `aud` of every preview token.
pub const AUDIENCE: &str = "understudy-preview";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// The environment.
    pub sub: String,
    pub project: String,
    pub iat: i64,
    pub exp: i64,
}

pub struct PreviewSigner {
    key: SigningKey,
    kid: String,
    issuer: String,
}

impl std::fmt::Debug for PreviewSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreviewSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl PreviewSigner {
    pub fn new(key: SigningKey, issuer: impl Into<String>) -> Self {
        let kid = hex::encode(&sha2::Sha256::digest(key.verifying_key().as_bytes())[..8]);
        Self { key, kid, issuer: issuer.into() }
    }

    /// A fresh key (for tests and for a first start).
    pub fn generate(issuer: impl Into<String>) -> Self {
        Self::new(SigningKey::generate(&mut rand_core::OsRng), issuer)
    }

    /// The key in `path` (PKCS#8 PEM), created readable by its owner only when missing.
    pub fn load_or_create(path: &Path, issuer: impl Into<String>) -> anyhow::Result<Self> {
        if !path.exists() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let pem = SigningKey::generate(&mut rand_core::OsRng)
                .to_pkcs8_pem(ed25519_dalek::pkcs8::spki::der::pem::LineEnding::LF)
                .map_err(|e| anyhow::anyhow!("encoding the preview signing key: {e}"))?;
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?.write_all(pem.as_bytes())?;
        }
        let pem = std::fs::read_to_string(path)?;
        let key =
            SigningKey::from_pkcs8_pem(&pem).map_err(|e| anyhow::anyhow!("{}: not an Ed25519 key in PKCS#8 PEM: {e}", path.display()))?;
        Ok(Self::new(key, issuer))
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A token for a request to `environment` of `project`, valid from `now` (unix seconds).
    pub fn token(&self, environment: EnvironmentId, project: ProjectId, now: i64) -> String {
        self.sign(&Claims {
            iss: self.issuer.clone(),
            aud: AUDIENCE.into(),
            sub: environment.to_string(),
            project: project.to_string(),
            iat: now,
            exp: now + LIFETIME_SECONDS,
        })
    }

    /// Any claims as a JWT signed with this key (sessions use it too, with their own `aud`).
    pub fn sign(&self, claims: &impl Serialize) -> String {
        let header = serde_json::json!({ "alg": "EdDSA", "typ": "JWT", "kid": self.kid });
        let signing_input =
            format!("{}.{}", B64URL.encode(header.to_string()), B64URL.encode(serde_json::to_vec(claims).unwrap_or_default()));
        let signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", B64URL.encode(signature.to_bytes()))
    }

    /// The claims of a JWT this key signed; the caller checks audience and expiry.
    pub fn verify_own<C: serde::de::DeserializeOwned>(&self, token: &str) -> Result<C, String> {
        let payload = verify_signature(token, &self.jwks())?;
        serde_json::from_slice(&payload).map_err(|e| format!("claims: {e}"))
    }

    /// A key for MACs (CSRF tokens), derived from the signing key and `purpose`.
    pub fn derive_mac_key(&self, purpose: &str) -> [u8; 32] {
        let mut hasher = sha2::Sha256::new();
        hasher.update(b"understudy:mac:");
        hasher.update(purpose.as_bytes());
        hasher.update(b":");
        hasher.update(self.key.to_bytes());
        hasher.finalize().into()
    }

    /// The public key as a JSON Web Key Set (RFC 8037 `OKP` / `Ed25519`).
    pub fn jwks(&self) -> serde_json::Value {
        serde_json::json!({ "keys": [{
            "kty": "OKP",
            "crv": "Ed25519",
            "x": B64URL.encode(self.key.verifying_key().as_bytes()),
            "kid": self.kid,
            "alg": "EdDSA",
            "use": "sig",
        }]})
    }
}

/// Checks a token against a JWKS as a preview app would: signature, audience and expiry.
pub fn verify(token: &str, jwks: &serde_json::Value, now: i64) -> Result<Claims, String> {
    let payload = verify_signature(token, jwks)?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|e| e.to_string())?;
    if claims.aud != AUDIENCE {
        return Err("wrong audience".into());
    }
    if claims.exp <= now {
        return Err("expired".into());
    }
    Ok(claims)
}

/// Checks a JWT's EdDSA signature against the key of its `kid` in `jwks`; its payload's bytes.
pub fn verify_signature(token: &str, jwks: &serde_json::Value) -> Result<Vec<u8>, String> {
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err("not a JWT".into());
    };
    let header: serde_json::Value =
        serde_json::from_slice(&B64URL.decode(header).map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
    if header["alg"] != "EdDSA" {
        return Err(format!("unexpected alg {}", header["alg"]));
    }
    let key = jwks["keys"].as_array().and_then(|keys| keys.iter().find(|k| k["kid"] == header["kid"])).ok_or("no key with this kid")?;
    let x: [u8; 32] = B64URL.decode(key["x"].as_str().unwrap_or_default()).map_err(|e| e.to_string())?.try_into().map_err(|_| "bad key")?;
    let verifying = ed25519_dalek::VerifyingKey::from_bytes(&x).map_err(|e| e.to_string())?;
    let signature: [u8; 64] = B64URL.decode(signature).map_err(|e| e.to_string())?.try_into().map_err(|_| "bad signature length")?;
    verifying
        .verify_strict(
            format!("{}.{payload}", token.split('.').next().unwrap_or_default()).as_bytes(),
            &ed25519_dalek::Signature::from_bytes(&signature),
        )
        .map_err(|_| "bad signature")?;
    B64URL.decode(payload).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn tokens_verify_against_the_jwks_and_forgeries_do_not() {
        let signer = PreviewSigner::generate("http://understudy.test");
        let (environment, project) = (EnvironmentId(Uuid::new_v4()), ProjectId(Uuid::new_v4()));
        let token = signer.token(environment, project, 1_000);
        let claims = verify(&token, &signer.jwks(), 1_010).expect("valid");
        assert_eq!((claims.sub, claims.project), (environment.to_string(), project.to_string()));
        assert_eq!(claims.exp, 1_000 + LIFETIME_SECONDS);
        assert_eq!(verify(&token, &signer.jwks(), 1_000 + LIFETIME_SECONDS).unwrap_err(), "expired");

        let other = PreviewSigner::generate("http://understudy.test");
        assert!(verify(&token, &other.jwks(), 1_010).is_err(), "another key's JWKS");
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged = B64URL.encode(br#"{"iss":"x","aud":"understudy-preview","sub":"s","project":"p","iat":0,"exp":9999999999}"#);
        parts[1] = &forged;
        assert_eq!(verify(&parts.join("."), &signer.jwks(), 1_010).unwrap_err(), "bad signature");
    }

    #[test]
    fn the_signing_key_file_is_created_once_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("preview-signing.pem");
        let first = PreviewSigner::load_or_create(&path, "i").expect("create");
        let again = PreviewSigner::load_or_create(&path, "i").expect("load");
        assert_eq!(first.kid(), again.kid());
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
    }
}
