//! Project secrets, sealed: XChaCha20-Poly1305 (RustCrypto's `chacha20poly1305`) with a random
//! 192-bit nonce per value, and the project id and secret name as associated data, so a sealed
//! value cannot be moved to another project or name. The event log only ever holds the sealed
//! form; the plain value exists in memory while it is set and while a worker injects it.
//!
//! The key: `UNDERSTUDY_SECRET_KEY` (32 bytes, base64), or the file `UNDERSTUDY_SECRET_KEY_FILE`
//! names; `understudy up` creates `{data dir}/secret.key` on first start. Each sealed value
//! records the id of the key that sealed it (the first 8 bytes of the key's SHA-256, in hex).
//!
//! Rotation: the keys that sealed values before (`UNDERSTUDY_PREVIOUS_SECRET_KEYS`, comma
//! separated, or one per line in `{key file}.previous`) still open them; `understudy secret
//! rotate` seals every value again under the current key, after which the old keys can go.

use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::Digest;
use understudy_domain::ids::ProjectId;
use understudy_domain::project::SealedValue;

/// The largest secret value accepted.
pub const MAX_VALUE: usize = 32 * 1024;

#[derive(Clone)]
pub struct SecretKey {
    id: String,
    cipher: XChaCha20Poly1305,
    /// Older keys, by id: they open what they sealed, and seal nothing new.
    previous: Vec<(String, XChaCha20Poly1305)>,
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretKey").field("id", &self.id).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("the secret key must be 32 bytes, base64-encoded ({0})")]
    BadKey(String),
    #[error("secret {name} was sealed with key {sealed_with}, but this process has key {have}: set the key that sealed it")]
    WrongKey { name: String, sealed_with: String, have: String },
    #[error("secret {0} does not open: it was altered, or sealed for another project or name")]
    Tampered(String),
    #[error("a secret value must be 1 to {MAX_VALUE} bytes of UTF-8")]
    BadValue,
}

impl SecretKey {
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SecretError> {
        if bytes.len() != 32 {
            return Err(SecretError::BadKey(format!("got {} bytes", bytes.len())));
        }
        let digest = sha2::Sha256::digest(bytes);
        let cipher = XChaCha20Poly1305::new_from_slice(bytes).map_err(|e| SecretError::BadKey(e.to_string()))?;
        Ok(Self { id: hex::encode(&digest[..8]), cipher, previous: Vec::new() })
    }

    pub fn from_base64(text: &str) -> Result<Self, SecretError> {
        let bytes = BASE64.decode(text.trim()).map_err(|e| SecretError::BadKey(e.to_string()))?;
        Self::from_bytes(&bytes)
    }

    /// A new random key, base64-encoded.
    pub fn generate() -> String {
        let mut bytes = [0u8; 32];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut bytes);
        BASE64.encode(bytes)
    }

    /// Adds older keys that open what they sealed (the current key is never among them).
    pub fn with_previous(mut self, keys: impl IntoIterator<Item = SecretKey>) -> Self {
        for key in keys {
            if key.id != self.id && !self.previous.iter().any(|(id, _)| *id == key.id) {
                self.previous.push((key.id, key.cipher));
            }
        }
        self
    }

    /// The ids of the older keys this key ring still opens with.
    pub fn previous_ids(&self) -> Vec<String> {
        self.previous.iter().map(|(id, _)| id.clone()).collect()
    }

    /// Keys in `text`, separated by commas or lines.
    fn parse_list(text: &str) -> Result<Vec<SecretKey>, SecretError> {
        text.split([',', '\n']).map(str::trim).filter(|k| !k.is_empty()).map(Self::from_base64).collect()
    }

    /// The key from `UNDERSTUDY_SECRET_KEY` or `UNDERSTUDY_SECRET_KEY_FILE`, with the previous
    /// keys of `UNDERSTUDY_PREVIOUS_SECRET_KEYS` and of `{key file}.previous`; `None` when no
    /// key is set.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let from_env = std::env::var("UNDERSTUDY_PREVIOUS_SECRET_KEYS").map(|t| Self::parse_list(&t)).unwrap_or(Ok(vec![]))?;
        if let Ok(text) = std::env::var("UNDERSTUDY_SECRET_KEY") {
            return Ok(Some(Self::from_base64(&text)?.with_previous(from_env)));
        }
        if let Ok(path) = std::env::var("UNDERSTUDY_SECRET_KEY_FILE") {
            let text = std::fs::read_to_string(&path).map_err(|e| anyhow::anyhow!("UNDERSTUDY_SECRET_KEY_FILE {path}: {e}"))?;
            let key = Self::from_base64(&text)?.with_previous(Self::previous_in(Path::new(&path))?);
            return Ok(Some(key.with_previous(from_env)));
        }
        Ok(None)
    }

    /// The keys listed in `{path}.previous`, if that file exists.
    fn previous_in(path: &Path) -> anyhow::Result<Vec<SecretKey>> {
        let file = Self::previous_file(path);
        if !file.exists() {
            return Ok(vec![]);
        }
        Ok(Self::parse_list(&std::fs::read_to_string(&file)?)?)
    }

    fn previous_file(path: &Path) -> std::path::PathBuf {
        let mut name = path.as_os_str().to_owned();
        name.push(".previous");
        std::path::PathBuf::from(name)
    }

    /// Replaces the key in `path` with a new one, keeping the old one in `{path}.previous` so
    /// values it sealed still open until they are sealed again. The new key ring.
    pub fn rotate_file(path: &Path) -> anyhow::Result<Self> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let old = std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Self::from_base64(&old)?;
        let mut previous = std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(Self::previous_file(path))?;
        previous.write_all(format!("{}\n", old.trim()).as_bytes())?;
        previous.sync_all()?;
        let fresh = path.with_extension("new");
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&fresh)?;
        file.write_all(Self::generate().as_bytes())?;
        file.sync_all()?;
        std::fs::rename(&fresh, path)?;
        Self::load_or_create(path)
    }

    /// The key in `path`, created (readable by its owner only) when missing.
    pub fn load_or_create(path: &Path) -> anyhow::Result<Self> {
        if !path.exists() {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            file.write_all(Self::generate().as_bytes())?;
        }
        Ok(Self::from_base64(&std::fs::read_to_string(path)?)?.with_previous(Self::previous_in(path)?))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn associated_data(project: ProjectId, name: &str) -> String {
        format!("understudy:secret:{project}:{name}")
    }

    pub fn seal(&self, project: ProjectId, name: &str, value: &str) -> Result<SealedValue, SecretError> {
        self.seal_for(&Self::associated_data(project, name), value)
    }

    pub fn open(&self, project: ProjectId, name: &str, sealed: &SealedValue) -> Result<String, SecretError> {
        self.open_for(&Self::associated_data(project, name), name, sealed)
    }

    /// Seals `value` bound to `context` (the associated data): it opens only with the same
    /// context, so a sealed value cannot be moved to another owner or name.
    pub fn seal_for(&self, context: &str, value: &str) -> Result<SealedValue, SecretError> {
        if value.is_empty() || value.len() > MAX_VALUE {
            return Err(SecretError::BadValue);
        }
        let mut nonce = [0u8; 24];
        rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut nonce);
        let aad = context.as_bytes();
        let ciphertext =
            self.cipher.encrypt(XNonce::from_slice(&nonce), Payload { msg: value.as_bytes(), aad }).map_err(|_| SecretError::BadValue)?;
        Ok(SealedValue { key_id: self.id.clone(), nonce: BASE64.encode(nonce), ciphertext: BASE64.encode(ciphertext) })
    }

    /// Opens a value sealed with [`SecretKey::seal_for`] and the same `context`; `name` is for errors.
    pub fn open_for(&self, context: &str, name: &str, sealed: &SealedValue) -> Result<String, SecretError> {
        let cipher = if sealed.key_id == self.id {
            &self.cipher
        } else {
            match self.previous.iter().find(|(id, _)| *id == sealed.key_id) {
                Some((_, cipher)) => cipher,
                None => return Err(SecretError::WrongKey { name: name.into(), sealed_with: sealed.key_id.clone(), have: self.id.clone() }),
            }
        };
        let tampered = || SecretError::Tampered(name.to_string());
        let nonce = BASE64.decode(&sealed.nonce).map_err(|_| tampered())?;
        let ciphertext = BASE64.decode(&sealed.ciphertext).map_err(|_| tampered())?;
        if nonce.len() != 24 {
            return Err(tampered());
        }
        let aad = context.as_bytes();
        let plain = cipher.decrypt(XNonce::from_slice(&nonce), Payload { msg: &ciphertext, aad }).map_err(|_| tampered())?;
        String::from_utf8(plain).map_err(|_| tampered())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[test]
    fn sealed_values_open_only_with_their_key_project_and_name() {
        let key = SecretKey::from_base64(&SecretKey::generate()).expect("key");
        let project = ProjectId(Uuid::new_v4());
        let sealed = key.seal(project, "API_TOKEN", "canary-1234").expect("seal");
        assert!(!sealed.ciphertext.contains("canary"), "the ciphertext is not the value");
        assert_eq!(key.open(project, "API_TOKEN", &sealed).expect("open"), "canary-1234");
        assert_ne!(key.seal(project, "API_TOKEN", "canary-1234").expect("seal").nonce, sealed.nonce, "a fresh nonce each time");

        assert!(matches!(key.open(ProjectId(Uuid::new_v4()), "API_TOKEN", &sealed), Err(SecretError::Tampered(_))));
        assert!(matches!(key.open(project, "OTHER", &sealed), Err(SecretError::Tampered(_))));
        let mut altered = sealed.clone();
        altered.ciphertext = BASE64.encode(b"not the ciphertext at all, really");
        assert!(matches!(key.open(project, "API_TOKEN", &altered), Err(SecretError::Tampered(_))));
        let other = SecretKey::from_base64(&SecretKey::generate()).expect("key");
        assert!(matches!(other.open(project, "API_TOKEN", &sealed), Err(SecretError::WrongKey { .. })));

        assert!(matches!(key.seal(project, "X", ""), Err(SecretError::BadValue)));
        assert!(SecretKey::from_base64("c2hvcnQ=").is_err(), "a short key is refused");
    }

    #[test]
    fn a_rotated_key_file_keeps_opening_what_the_old_key_sealed() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("secret.key");
        let old = SecretKey::load_or_create(&path).expect("create");
        let project = ProjectId(Uuid::new_v4());
        let sealed = old.seal(project, "API_TOKEN", "canary-5678").expect("seal");
        let new = SecretKey::rotate_file(&path).expect("rotate");
        assert_ne!(new.id(), old.id());
        assert_eq!(new.previous_ids(), vec![old.id().to_string()]);
        assert_eq!(new.open(project, "API_TOKEN", &sealed).expect("old values still open"), "canary-5678");
        let resealed = new.seal(project, "API_TOKEN", "canary-5678").expect("seal");
        assert_eq!(resealed.key_id, new.id(), "new values are sealed with the new key");
        let reloaded = SecretKey::load_or_create(&path).expect("load");
        assert_eq!((reloaded.id(), reloaded.previous_ids()), (new.id(), vec![old.id().to_string()]));
        // Without the old key, its values do not open, and say which key they need.
        let bare = SecretKey::from_base64(&std::fs::read_to_string(&path).expect("read")).expect("key");
        assert!(matches!(bare.open(project, "API_TOKEN", &sealed), Err(SecretError::WrongKey { .. })));
    }

    #[test]
    fn a_key_file_is_created_once_for_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("secret.key");
        let first = SecretKey::load_or_create(&path).expect("create");
        let again = SecretKey::load_or_create(&path).expect("load");
        assert_eq!(first.id(), again.id());
        assert_eq!(std::fs::metadata(&path).expect("meta").permissions().mode() & 0o777, 0o600);
    }
}
