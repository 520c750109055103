//! One preview app instance, whatever runs it: the [`PreviewRuntime`] trait, and its
//! implementation over the bubblewrap sandbox ([`SandboxRuntime`]). The other implementation,
//! one Pod and Service per instance on a cluster, is in `kubernetes.rs`.
//!
//! The worker does not go through this trait yet: it builds, tests and starts apps with
//! `SandboxSpec` directly (`worker.rs`), because every step of its pipeline shares one checkout
//! and one bridge on the machine. The trait covers the app alone, the part a cluster can take over.
//!
//! An instance's secrets are kept apart from its other variables ([`InstanceSpec::secrets`]):
//! runtimes hand them to the app, and never put them in a log line, an error, a `Debug` output,
//! an object spec or the text [`PreviewRuntime::logs`] returns.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::Mutex;
use understudy_domain::ids::{DeploymentId, EnvironmentId};

use super::logs::Redactor;
use super::sandbox::{Limits, SandboxSpec, Sandboxed};
use super::unix_http;

/// What one app instance is: enough for any runtime to start it.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    /// What the instance is called. Runtimes use [`dns_label`] of it, so any text will do; it
    /// must be unique per deployment and role (`{deployment}-app`), since a start under a name
    /// that is taken returns the instance already there.
    pub name: String,
    pub environment: EnvironmentId,
    pub deployment: DeploymentId,
    /// The image to run (Kubernetes); none: the runtime's default. The sandbox runs the
    /// machine's own programs and ignores it.
    pub image: Option<String>,
    /// The command and its arguments; empty: the image's own entrypoint (the sandbox needs one).
    pub command: Vec<String>,
    /// Plain variables, besides `PORT`, `UNDERSTUDY`, `UNDERSTUDY_ENVIRONMENT_ID`,
    /// `UNDERSTUDY_DEPLOYMENT_ID` and `HOME` (`/tmp` unless given here), which every runtime sets.
    pub env: Vec<(String, String)>,
    /// Secret variables (the project's secrets): given to the app, shown nowhere else.
    pub secrets: Vec<(String, SecretString)>,
    /// The port the app listens on (`$PORT`).
    pub port: u16,
    /// Ready once `GET` of this answers 2xx or 3xx; none: once the port takes connections.
    pub health_path: Option<String>,
    pub limits: Limits,
    /// Where the command starts inside the instance: `/app`, or the app's directory below it.
    pub workdir: String,
}

impl InstanceSpec {
    /// Checks what no runtime could run, before anything is started.
    pub fn check(&self) -> Result<(), RuntimeError> {
        let invalid = |what: String| Err(RuntimeError::Invalid(format!("instance {:?}: {what}", self.name)));
        if self.port == 0 {
            return invalid("the port must be between 1 and 65535".into());
        }
        if !self.workdir.starts_with('/') {
            return invalid(format!("the working directory {:?} must be an absolute path", self.workdir));
        }
        if let Some(path) = self.health_path.as_deref().filter(|p| !p.starts_with('/')) {
            return invalid(format!("the health path {path:?} must start with /"));
        }
        let mut seen = std::collections::HashSet::new();
        for name in self.env.iter().map(|(k, _)| k).chain(self.secrets.iter().map(|(k, _)| k)) {
            // A Kubernetes Secret's keys allow only these, and they are the variable's name.
            let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
            if !valid {
                return invalid(format!("the variable name {name:?} may hold only letters, digits, '-', '.' and '_'"));
            }
            if !seen.insert(name.as_str()) {
                return invalid(format!("the variable {name} is given twice (as a variable and a secret, or twice)"));
            }
        }
        Ok(())
    }

    /// The variables every runtime sets, then the spec's own (which win over the defaults).
    pub fn plain_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("PORT".to_string(), self.port.to_string()),
            ("HOME".into(), "/tmp".into()),
            ("UNDERSTUDY".into(), "1".into()),
            ("UNDERSTUDY_ENVIRONMENT_ID".into(), self.environment.to_string()),
            ("UNDERSTUDY_DEPLOYMENT_ID".into(), self.deployment.to_string()),
        ];
        env.retain(|(key, _)| !self.env.iter().any(|(k, _)| k == key));
        env.extend(self.env.iter().cloned());
        env
    }

    /// A redactor for the instance's secret values.
    pub fn redactor(&self) -> Redactor {
        Redactor::new(self.secrets.iter().map(|(_, v)| v.expose_secret().to_string()))
    }
}

/// Which instance: what [`PreviewRuntime::start`] returned. Plain data, so it can be stored; a
/// Kubernetes runtime can find its instance from any process, the sandbox only from the one that
/// started it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceHandle {
    /// The instance's name as the runtime knows it (a DNS-1123 label).
    pub name: String,
    pub port: u16,
}

/// Where an instance stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceStatus {
    /// Accepted, not running yet (scheduling, pulling the image).
    Pending,
    /// Running, not answering its health check yet.
    Running,
    /// Running and answering: the proxy may send it requests.
    Ready,
    /// The app ended by itself with this code (128 + n when killed by signal n).
    Exited(i32),
    /// It cannot run, or no longer exists: the reason, for the person reading the log.
    Failed(String),
}

impl InstanceStatus {
    /// Whether the instance will not become Ready any more without a new start.
    pub fn is_over(&self) -> bool {
        matches!(self, InstanceStatus::Exited(_) | InstanceStatus::Failed(_))
    }
}

/// How the proxy reaches an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Address {
    /// A unix socket on this machine (the sandbox's bridge).
    Unix(PathBuf),
    /// `host:port` (a cluster Service's DNS name).
    Tcp(String),
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(path) => write!(f, "unix:{}", path.display()),
            Address::Tcp(host_port) => f.write_str(host_port),
        }
    }
}

/// Why a runtime call failed, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The spec or the runtime's configuration cannot work as given (a bad port, a namespace
    /// that does not exist, an object the cluster rejects): fix it; retrying will not help.
    #[error("{0}")]
    Invalid(String),
    /// The runtime's credentials may not do this (Kubernetes 401/403): an operator must grant it.
    #[error("{0}")]
    Forbidden(String),
    /// Another instance holds this name with a different spec: stop it first, or use a new name.
    #[error("{0}")]
    Conflict(String),
    /// The runtime failed or could not be reached (5xx, 429, network): retry with backoff.
    #[error("{0}")]
    Unavailable(String),
}

/// Runs preview app instances: one implementation per place apps can run.
#[async_trait::async_trait]
pub trait PreviewRuntime: Send + Sync {
    /// Starts the instance, or finds it started: a start repeated with the same spec (a retry
    /// after a crash or a timeout) returns the same handle and starts nothing twice.
    async fn start(&self, spec: &InstanceSpec) -> Result<InstanceHandle, RuntimeError>;
    /// Where the instance stands now.
    async fn status(&self, handle: &InstanceHandle) -> Result<InstanceStatus, RuntimeError>;
    /// How the proxy reaches it (known without asking the runtime).
    fn address(&self, handle: &InstanceHandle) -> Address;
    /// Stops it and removes what it held. Stopping what is already gone succeeds.
    async fn stop(&self, handle: &InstanceHandle) -> Result<(), RuntimeError>;
    /// The last `lines` lines of its output, its secrets redacted.
    async fn logs(&self, handle: &InstanceHandle, lines: usize) -> Result<String, RuntimeError>;
}

/// The most characters of a DNS-1123 label.
const MAX_LABEL: usize = 63;

/// `name` as a DNS-1123 label that also starts with a letter (what Kubernetes asks of Service
/// names): lowercase letters, digits and `-`, at most 63 characters. A name that is one already
/// stays as it is; any other is normalised and gets 8 hex digits of its SHA-256, so two names that
/// normalise alike (`My_App`, `my.app`) still differ, and the same name always gives the same label.
pub fn dns_label(name: &str) -> String {
    let mut label = String::with_capacity(name.len());
    for c in name.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            label.push(c);
        } else if !label.ends_with('-') {
            label.push('-');
        }
    }
    let mut label = label.trim_matches('-').to_string();
    if !label.starts_with(|c: char| c.is_ascii_lowercase()) {
        label.insert_str(0, if label.is_empty() { "i" } else { "i-" });
    }
    if label == name && label.len() <= MAX_LABEL {
        return label;
    }
    let hash = hex::encode(&Sha256::digest(name.as_bytes())[..4]);
    label.truncate(MAX_LABEL - hash.len() - 1);
    format!("{}-{hash}", label.trim_end_matches('-'))
}

/// The socket the bridge listens on, in the instance's run dir.
const SOCKET: &str = "http.sock";
/// Lines of output kept per sandbox instance for [`PreviewRuntime::logs`].
const KEPT_LINES: usize = 1000;
/// Longest line kept; the rest of a longer one is cut.
const MAX_LINE: usize = 8 * 1024;

/// The bubblewrap sandbox as a [`PreviewRuntime`]: each instance is one `SandboxSpec` under
/// `{data_dir}/{label}/` (its checkout in `src`, which the caller fills before starting, its
/// cache in `cache`, the bridge's socket in `run`), started behind `understudy sandbox-bridge`
/// as the worker starts apps. Instances live in this process: dropping the runtime kills them.
pub struct SandboxRuntime {
    data_dir: PathBuf,
    /// The `understudy` binary, shown at `/opt/understudy/understudy` to run the bridge.
    bridge_bin: PathBuf,
    /// Toolchains and the like: host paths shown read-only at the given sandbox paths.
    read_only: Vec<(PathBuf, String)>,
    instances: Mutex<HashMap<String, SandboxInstance>>,
}

struct SandboxInstance {
    app: Sandboxed,
    /// The spec it was started with, without secret values: a repeated start compares it.
    fingerprint: String,
    health_path: Option<String>,
    memory_bytes: u64,
    output: Arc<std::sync::Mutex<VecDeque<String>>>,
    redactor: Redactor,
    pipes: Vec<tokio::task::JoinHandle<()>>,
}

impl SandboxRuntime {
    pub fn new(data_dir: PathBuf, bridge_bin: PathBuf, read_only: Vec<(PathBuf, String)>) -> Self {
        Self { data_dir, bridge_bin, read_only, instances: Mutex::new(HashMap::new()) }
    }

    /// The instance's directory: its checkout is `src` below it.
    pub fn instance_dir(&self, spec: &InstanceSpec) -> PathBuf {
        self.data_dir.join(dns_label(&spec.name))
    }

    fn sandbox_spec(&self, label: &str, spec: &InstanceSpec) -> SandboxSpec {
        let dir = self.data_dir.join(label);
        let mut read_only = vec![(self.bridge_bin.clone(), "/opt/understudy/understudy".to_string())];
        read_only.extend(self.read_only.iter().cloned());
        let mut env = vec![("PATH".to_string(), "/usr/local/bin:/usr/bin:/bin".to_string())];
        env.retain(|(key, _)| !spec.env.iter().any(|(k, _)| k == key));
        env.extend(spec.plain_env());
        env.extend(spec.secrets.iter().map(|(k, v)| (k.clone(), v.expose_secret().to_string())));
        SandboxSpec {
            name: label.to_string(),
            app_dir: dir.join("src"),
            cache_dir: dir.join("cache"),
            run_dir: dir.join("run"),
            workdir: spec.workdir.clone(),
            read_only,
            env,
            network: false,
            limits: spec.limits,
            wrap: Vec::new(),
        }
    }
}

/// A hash of everything a start depends on except secret values (their names count).
fn sandbox_fingerprint(spec: &InstanceSpec) -> String {
    let secret_names: Vec<&String> = spec.secrets.iter().map(|(k, _)| k).collect();
    let text = format!("{:?}", (&spec.command, spec.plain_env(), secret_names, spec.port, &spec.health_path, spec.limits, &spec.workdir));
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// Keeps the last [`KEPT_LINES`] lines of `stream` in `output`.
async fn keep_lines(stream: impl AsyncRead + Unpin, output: Arc<std::sync::Mutex<VecDeque<String>>>) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(mut line)) = lines.next_line().await {
        if line.len() > MAX_LINE {
            let mut end = MAX_LINE;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
        }
        let mut output = output.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if output.len() == KEPT_LINES {
            output.pop_front();
        }
        output.push_back(line);
    }
}

#[async_trait::async_trait]
impl PreviewRuntime for SandboxRuntime {
    async fn start(&self, spec: &InstanceSpec) -> Result<InstanceHandle, RuntimeError> {
        spec.check()?;
        if spec.command.is_empty() {
            return Err(RuntimeError::Invalid(format!("instance {:?}: the sandbox needs a command to run", spec.name)));
        }
        let label = dns_label(&spec.name);
        let handle = InstanceHandle { name: label.clone(), port: spec.port };
        let fingerprint = sandbox_fingerprint(spec);
        let mut instances = self.instances.lock().await;
        if let Some(existing) = instances.get(&label) {
            return if existing.fingerprint == fingerprint {
                Ok(handle)
            } else {
                Err(RuntimeError::Conflict(format!(
                    "a different instance named {label} runs in the sandbox already: stop it first, or start this one under another name"
                )))
            };
        }
        let sandbox = self.sandbox_spec(&label, spec);
        let mut argv: Vec<String> =
            ["/opt/understudy/understudy", "sandbox-bridge", "--socket", &format!("/run/understudy/{SOCKET}")].map(String::from).to_vec();
        argv.extend(["--port".into(), spec.port.to_string(), "--".into()]);
        argv.extend(spec.command.iter().cloned());
        let mut app = sandbox
            .spawn(&argv)
            .map_err(|e| RuntimeError::Unavailable(format!("could not start the sandbox for instance {label}: {e}")))?;
        let output = Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let mut pipes = Vec::new();
        if let Some(out) = app.child.stdout.take() {
            pipes.push(tokio::spawn(keep_lines(out, output.clone())));
        }
        if let Some(err) = app.child.stderr.take() {
            pipes.push(tokio::spawn(keep_lines(err, output.clone())));
        }
        tracing::info!(instance = %label, deployment = %spec.deployment, "started a preview instance in the sandbox");
        instances.insert(
            label,
            SandboxInstance {
                app,
                fingerprint,
                health_path: spec.health_path.clone(),
                memory_bytes: spec.limits.memory_bytes,
                output,
                redactor: spec.redactor(),
                pipes,
            },
        );
        Ok(handle)
    }

    async fn status(&self, handle: &InstanceHandle) -> Result<InstanceStatus, RuntimeError> {
        let socket = self.data_dir.join(&handle.name).join("run").join(SOCKET);
        let health_path = {
            let mut instances = self.instances.lock().await;
            let Some(instance) = instances.get_mut(&handle.name) else {
                return Ok(InstanceStatus::Failed(format!(
                    "no instance {} runs in this process's sandboxes (stopped, or started by another process)",
                    handle.name
                )));
            };
            match instance.app.child.try_wait() {
                Ok(None) => {}
                Ok(Some(status)) => return Ok(sandbox_exit(instance, status)),
                Err(e) => return Err(RuntimeError::Unavailable(format!("could not check instance {}: {e}", handle.name))),
            }
            instance.health_path.clone()
        };
        if !socket.exists() {
            return Ok(InstanceStatus::Running);
        }
        let answers = match health_path {
            Some(path) => matches!(unix_http::probe(&socket, &path, Duration::from_secs(5)).await, Ok(code) if (200..400).contains(&code)),
            None => unix_http::connect_socket(&socket).await.is_ok(),
        };
        Ok(if answers { InstanceStatus::Ready } else { InstanceStatus::Running })
    }

    fn address(&self, handle: &InstanceHandle) -> Address {
        Address::Unix(self.data_dir.join(&handle.name).join("run").join(SOCKET))
    }

    async fn stop(&self, handle: &InstanceHandle) -> Result<(), RuntimeError> {
        let removed = self.instances.lock().await.remove(&handle.name);
        if let Some(mut instance) = removed {
            instance.app.kill().await;
            for pipe in instance.pipes {
                pipe.abort();
            }
            tracing::info!(instance = %handle.name, "stopped a preview instance in the sandbox");
        }
        Ok(())
    }

    async fn logs(&self, handle: &InstanceHandle, lines: usize) -> Result<String, RuntimeError> {
        let instances = self.instances.lock().await;
        let Some(instance) = instances.get(&handle.name) else {
            return Ok(String::new());
        };
        let output = instance.output.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let skip = output.len().saturating_sub(lines);
        Ok(output.iter().skip(skip).map(|line| instance.redactor.redact(line) + "\n").collect())
    }
}

/// What an ended sandbox's exit status means.
fn sandbox_exit(instance: &SandboxInstance, status: std::process::ExitStatus) -> InstanceStatus {
    use std::os::unix::process::ExitStatusExt;
    if instance.app.out_of_memory() {
        return InstanceStatus::Failed(format!("the app ran out of memory ({} MiB limit)", instance.memory_bytes >> 20));
    }
    match (status.code(), status.signal()) {
        // The sandbox's own set-up (moving into its cgroup) failed before bwrap ran.
        (Some(125), _) => InstanceStatus::Failed("the sandbox could not be set up".into()),
        (Some(code), _) => InstanceStatus::Exited(code),
        (None, Some(signal)) => InstanceStatus::Exited(128 + signal),
        (None, None) => InstanceStatus::Failed("the sandbox ended without an exit status".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_dns_1123_stable_and_distinct() {
        assert_eq!(dns_label("app-1"), "app-1", "a valid label stays as it is");
        let normalised = dns_label("My_App.Preview");
        assert!(normalised.starts_with("my-app-preview-"), "{normalised}");
        assert_eq!(normalised, dns_label("My_App.Preview"), "the same name gives the same label");
        assert_ne!(dns_label("My_App"), dns_label("my.app"), "names that normalise alike still differ");
        let uuid = "0190c4f2-7b1e-7c3d-9a5e-1f2e3d4c5b6a-app";
        assert!(dns_label(uuid).starts_with("i-0190c4f2-"), "a label starts with a letter: {}", dns_label(uuid));
        let long = dns_label(&"x".repeat(200));
        assert_eq!(long.len(), 63);
        for name in ["", "---", "Ünïcode names", &"A".repeat(64), "a--b", "-a-", "9"] {
            let label = dns_label(name);
            assert!(label.len() <= 63 && !label.is_empty(), "{name:?} → {label:?}");
            assert!(label.starts_with(|c: char| c.is_ascii_lowercase()), "{name:?} → {label:?}");
            assert!(!label.ends_with('-') && !label.contains("--"), "{name:?} → {label:?}");
            assert!(label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'), "{name:?} → {label:?}");
        }
    }

    #[test]
    fn a_spec_with_a_bad_port_variable_or_path_is_refused() {
        let good = spec("app", vec!["true".into()]);
        assert!(good.check().is_ok());
        let mut bad = good.clone();
        bad.port = 0;
        assert!(matches!(bad.check(), Err(RuntimeError::Invalid(m)) if m.contains("port")));
        let mut bad = good.clone();
        bad.env.push(("A=B".into(), "x".into()));
        assert!(matches!(bad.check(), Err(RuntimeError::Invalid(m)) if m.contains("A=B")));
        let mut bad = good.clone();
        bad.env.push(("TOKEN".into(), "x".into()));
        bad.secrets.push(("TOKEN".into(), SecretString::from("s3cret-value")));
        assert!(matches!(bad.check(), Err(RuntimeError::Invalid(m)) if m.contains("twice") && !m.contains("s3cret")));
        let mut bad = good;
        bad.workdir = "app".into();
        assert!(bad.check().is_err());
    }

    fn spec(name: &str, command: Vec<String>) -> InstanceSpec {
        InstanceSpec {
            name: name.into(),
            environment: EnvironmentId(uuid::Uuid::from_u128(1)),
            deployment: DeploymentId(uuid::Uuid::from_u128(2)),
            image: None,
            command,
            env: vec![("GREETING".into(), "hello".into())],
            secrets: vec![("API_TOKEN".into(), SecretString::from("tok-0123456789"))],
            port: 8080,
            health_path: None,
            limits: Limits::default(),
            workdir: "/app".into(),
        }
    }

    /// Stands in for `understudy sandbox-bridge`: runs what follows `--` (the app itself makes
    /// the socket in these tests), so the test needs no build of the binary.
    fn fake_bridge(dir: &std::path::Path) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join("bridge");
        std::fs::write(&path, "#!/bin/sh\nwhile [ \"$1\" != -- ]; do shift; done\nshift\nexec \"$@\"\n").expect("writing the fake bridge");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("making the fake bridge executable");
        path
    }

    async fn wait_for(runtime: &SandboxRuntime, handle: &InstanceHandle, want: impl Fn(&InstanceStatus) -> bool) -> InstanceStatus {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = runtime.status(handle).await.expect("status");
            if want(&status) || std::time::Instant::now() > deadline {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn the_sandbox_runtime_starts_reports_and_stops_an_instance() {
        if let Err(reason) = super::super::sandbox::available() {
            println!("skipped: {reason}");
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let runtime = SandboxRuntime::new(dir.path().join("instances"), fake_bridge(dir.path()), Vec::new());

        // An app that prints (its secret among the rest) and exits with a code of its own.
        let exits = spec("Exits Soon", vec!["/bin/sh".into(), "-c".into(), "echo \"$GREETING on $PORT with $API_TOKEN\"; exit 3".into()]);
        let handle = runtime.start(&exits).await.expect("start");
        assert_eq!(handle.name, dns_label("Exits Soon"));
        assert_eq!(wait_for(&runtime, &handle, InstanceStatus::is_over).await, InstanceStatus::Exited(3));
        let logs = runtime.logs(&handle, 10).await.expect("logs");
        assert!(logs.contains("hello on 8080 with [redacted]"), "the app saw its variables, the log hides the secret: {logs:?}");
        assert!(!logs.contains("tok-0123456789"));
        assert_eq!(runtime.start(&exits).await.expect("a repeated start"), handle, "a repeated start finds the same instance");
        let mut changed = exits.clone();
        changed.command.push("more".into());
        assert!(matches!(runtime.start(&changed).await, Err(RuntimeError::Conflict(_))));

        // An app that keeps running: Running until its socket answers, then Ready; stop ends it.
        let serves = if std::path::Path::new("/usr/bin/python3").exists() {
            let listen =
                "import socket,time; s=socket.socket(socket.AF_UNIX); s.bind('/run/understudy/http.sock'); s.listen(); time.sleep(60)";
            spec("serves", vec!["/bin/sh".into(), "-c".into(), format!("sleep 1; exec /usr/bin/python3 -c \"{listen}\"")])
        } else {
            println!("python3 is not installed: the Ready check of the sandbox runtime is skipped");
            spec("serves", vec!["/bin/sleep".into(), "60".into()])
        };
        let handle = runtime.start(&serves).await.expect("start");
        assert_eq!(runtime.status(&handle).await.expect("status"), InstanceStatus::Running);
        assert_eq!(runtime.address(&handle), Address::Unix(dir.path().join("instances/serves/run/http.sock")));
        if std::path::Path::new("/usr/bin/python3").exists() {
            assert_eq!(wait_for(&runtime, &handle, |s| *s == InstanceStatus::Ready).await, InstanceStatus::Ready);
        }
        runtime.stop(&handle).await.expect("stop");
        assert!(matches!(runtime.status(&handle).await.expect("status"), InstanceStatus::Failed(_)));
        runtime.stop(&handle).await.expect("a second stop succeeds");
    }
}
