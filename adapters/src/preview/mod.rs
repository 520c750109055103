//! The preview runtime: workers that fetch a deployment's commit, build it, run it in a
//! bubblewrap sandbox, check its health, run its tests and keep it serving, reporting every step
//! as a command on the environment aggregate (so the PR comment, the API and the dashboard follow).

pub mod addon;
pub mod bridge;
pub mod git;
pub mod kubernetes;
pub mod local_git;
pub mod logs;
pub mod runtime;
pub mod sandbox;
pub mod stack;
pub mod sweep;
pub mod token;
pub mod unix_http;
pub mod worker;

use std::path::PathBuf;
use std::time::Duration;

use understudy_domain::ids::EnvironmentId;

pub use sandbox::Limits;

/// How this machine's workers build and run previews.
#[derive(Debug, Clone)]
pub struct PreviewConfig {
    /// Work dirs, caches and sockets: `{data_dir}/{environment}/{deployment}/…`.
    pub data_dir: PathBuf,
    /// `GITHUB_GIT_URL`: where repositories are fetched from (`{base}/{owner}/{name}.git`).
    pub git_base: String,
    /// `UNDERSTUDY_PREVIEW_DOMAIN`: previews are served at `{environment}.{domain}` (host[:port]).
    pub preview_domain: String,
    /// Serve previews to anyone who reaches the proxy. Until sign-in exists this is the only
    /// access rule: off, the proxy refuses every preview.
    pub public: bool,
    /// Signs the token the proxy hands every preview request (`token.rs`); none: no token.
    pub signer: Option<std::sync::Arc<token::PreviewSigner>>,
    /// Opens the projects' secrets to inject them; none: a project with secrets fails to build.
    pub secret_key: Option<crate::secrets::SecretKey>,
    /// The database add-on's server (`UNDERSTUDY_ADDON_DATABASE_URL`, by default the control
    /// plane's Postgres); without it, projects asking for the add-on fail their builds.
    pub addon_database: Option<addon::AddonServer>,
    /// `http` or `https`, for the URLs handed out.
    pub preview_scheme: String,
    /// The directory holding the Wing toolchain (`node_modules/.bin/wing`), shown read-only at
    /// `/opt/wing` in every sandbox.
    pub wing_toolchain: Option<PathBuf>,
    /// A Rust toolchain's sysroot (holding `bin/cargo` and `bin/rustc`), shown read-only at
    /// `/opt/rust` for Rust apps.
    pub rust_toolchain: Option<PathBuf>,
    /// The `understudy` binary, shown read-only in the sandbox to run the bridge.
    pub bridge_bin: PathBuf,
    pub limits: Limits,
    pub fetch_timeout: Duration,
    pub build_timeout: Duration,
    pub start_timeout: Duration,
    pub test_timeout: Duration,
    /// While a preview serves, its health check runs this often…
    pub health_interval: Duration,
    /// …with this timeout, and this many failures in a row restart the app.
    pub health_timeout: Duration,
    pub health_failures: u32,
    /// A worker that stops heartbeating loses its deployments after this long.
    pub lease_ttl: Duration,
    /// Deployments one worker builds or serves at once.
    pub max_parallel: usize,
    /// Claims of one deployment before an infrastructure fault fails it.
    pub max_attempts: i32,
}

impl PreviewConfig {
    /// Defaults for one machine; `data_dir` is the worker's own.
    pub fn new(data_dir: PathBuf, preview_domain: String) -> Self {
        Self {
            data_dir,
            git_base: "https://github.com".into(),
            preview_domain,
            public: true,
            secret_key: None,
            addon_database: None,
            signer: None,
            preview_scheme: "http".into(),
            wing_toolchain: None,
            rust_toolchain: None,
            bridge_bin: std::env::current_exe().unwrap_or_else(|_| PathBuf::from("understudy")),
            limits: Limits::default(),
            fetch_timeout: Duration::from_secs(120),
            build_timeout: Duration::from_secs(600),
            start_timeout: Duration::from_secs(120),
            test_timeout: Duration::from_secs(600),
            health_interval: Duration::from_secs(10),
            health_timeout: Duration::from_secs(5),
            health_failures: 3,
            lease_ttl: Duration::from_secs(30),
            max_parallel: 4,
            max_attempts: 3,
        }
    }

    /// The URL a preview of `environment` is served at.
    pub fn preview_url(&self, environment: EnvironmentId) -> String {
        format!("{}://{}/", self.preview_scheme, preview_host(environment, &self.preview_domain))
    }
}

/// The sysroot of the `rustc` on `PATH`, if there is one.
pub fn detect_rust_toolchain() -> Option<PathBuf> {
    let output = std::process::Command::new("rustc").args(["--print", "sysroot"]).output().ok()?;
    let sysroot = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    (output.status.success() && sysroot.join("bin/cargo").exists()).then_some(sysroot)
}

/// `{environment as 32 hex digits}.{domain}`: one DNS label per environment, so every preview is
/// its own origin (cookies and storage never shared between previews).
pub fn preview_host(environment: EnvironmentId, domain: &str) -> String {
    format!("{}.{domain}", environment.0.simple())
}

/// The environment a request's `Host` names, if it is a preview host under `domain`.
pub fn environment_of_host(host: &str, domain: &str) -> Option<EnvironmentId> {
    label_of_host(host, domain, "").map(EnvironmentId)
}

/// `debug-{session as 32 hex digits}.{domain}`: a debug session's tunnel, its own origin too.
pub fn debug_host(session: uuid::Uuid, domain: &str) -> String {
    format!("debug-{}.{domain}", session.simple())
}

/// The debug session a request's `Host` names, if it is a debug host under `domain`.
pub fn debug_session_of_host(host: &str, domain: &str) -> Option<uuid::Uuid> {
    label_of_host(host, domain, "debug-")
}

/// The id in `{prefix}{32 hex digits}.{domain}` (ports and case ignored).
fn label_of_host(host: &str, domain: &str, prefix: &str) -> Option<uuid::Uuid> {
    let strip_port = |h: &str| h.rsplit_once(':').filter(|(_, p)| p.chars().all(|c| c.is_ascii_digit())).map_or(h, |(h, _)| h).to_string();
    let (host, domain) = (strip_port(&host.to_ascii_lowercase()), strip_port(&domain.to_ascii_lowercase()));
    let label = host.strip_suffix(&domain)?.strip_suffix('.')?.strip_prefix(prefix)?;
    if label.len() != 32 || !label.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    uuid::Uuid::parse_str(label).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preview_hosts_round_trip_and_foreign_hosts_are_not_previews() {
        let env = EnvironmentId(uuid::Uuid::from_u128(0xabc));
        let host = preview_host(env, "preview.localhost:8080");
        assert_eq!(host, "00000000000000000000000000000abc.preview.localhost:8080");
        assert_eq!(environment_of_host(&host, "preview.localhost:8080"), Some(env));
        assert_eq!(environment_of_host("00000000000000000000000000000ABC.Preview.localhost", "preview.localhost:8080"), Some(env));
        assert_eq!(environment_of_host("preview.localhost:8080", "preview.localhost:8080"), None);
        assert_eq!(environment_of_host("evil.00000000000000000000000000000abc.preview.localhost", "preview.localhost"), None);
        assert_eq!(environment_of_host("00000000000000000000000000000abc.other.host", "preview.localhost"), None);
        assert_eq!(environment_of_host("127.0.0.1:8080", "preview.localhost:8080"), None);
        let session = uuid::Uuid::from_u128(0xdef);
        let debug = debug_host(session, "preview.localhost:8080");
        assert_eq!(debug, "debug-00000000000000000000000000000def.preview.localhost:8080");
        assert_eq!(debug_session_of_host(&debug, "preview.localhost:8080"), Some(session));
        assert_eq!(environment_of_host(&debug, "preview.localhost:8080"), None, "a debug host is no preview");
        assert_eq!(debug_session_of_host(&host, "preview.localhost:8080"), None, "a preview is no debug host");
    }
}
