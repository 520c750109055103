//! Helpers for the end-to-end tests: each test gets its own Postgres database and its own NATS
//! prefix on the machine's real servers, and cleans both up when dropped.

use std::time::{Duration, Instant};

use understudy_adapters::nats::Topology;
use understudy_api::runtime::Runtime;
use uuid::Uuid;

pub fn admin_database_url() -> String {
    // No TLS to the loopback server: it only costs CPU the tests share (docs/operating.md).
    std::env::var("TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable".into())
}

pub fn nats_url() -> String {
    std::env::var("TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// One test's private world: a fresh database and a unique NATS prefix.
pub struct TestEnv {
    pub runtime: Runtime,
    pub database: String,
    pub database_url: String,
    pub prefix: String,
}

impl TestEnv {
    pub async fn new() -> Self {
        let (database, database_url, prefix) = Self::create_database().await;
        Self::connect(database, database_url, prefix).await
    }

    /// A fresh, empty database (no migrations applied) and a unique NATS prefix, for a test that
    /// prepares the database before [`TestEnv::connect`] migrates it: its name, URL and prefix.
    pub async fn create_database() -> (String, String, String) {
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("understudy_test_{}", &id[..16]);
        let prefix = format!("t{}", &id[..12]);
        let admin =
            understudy_adapters::db::connect(&admin_database_url(), 1).await.expect("the test Postgres must be up (scripts/services)");
        sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await.expect("create test database");
        admin.close().await;
        let admin = admin_database_url();
        let (base, query) = admin.split_once('?').map_or((admin.as_str(), None), |(base, query)| (base, Some(query)));
        let server = &base[..base.rfind('/').expect("URL has a path")];
        let database_url = match query {
            Some(query) => format!("{server}/{database}?{query}"),
            None => format!("{server}/{database}"),
        };
        (database, database_url, prefix)
    }

    /// The runtime over a database from [`TestEnv::create_database`], migrated to the latest.
    pub async fn connect(database: String, database_url: String, prefix: String) -> Self {
        let runtime =
            Runtime::connect(&database_url, &nats_url(), Topology::new(&prefix).expect("prefix")).await.expect("connect the test runtime");
        Self { runtime, database, database_url, prefix }
    }

    pub fn pool(&self) -> &sqlx::PgPool {
        &self.runtime.pool
    }

    pub fn topology(&self) -> &Topology {
        &self.runtime.topology
    }

    /// Applies everything the log has to `projections`, without NATS.
    pub async fn project(&self, projections: Vec<std::sync::Arc<dyn understudy_projections::Projection>>) {
        for projection in projections {
            understudy_projections::Projector::new(
                self.runtime.pool.clone(),
                self.runtime.nats.clone(),
                self.runtime.topology.clone(),
                projection,
            )
            .catch_up_from_log()
            .await
            .expect("projecting from the log");
        }
    }

    pub fn jetstream(&self) -> async_nats::jetstream::Context {
        async_nats::jetstream::new(self.runtime.nats.clone())
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let (database, stream) = (self.database.clone(), self.runtime.topology.stream_name());
        // Clean up on a thread with its own runtime and its own connections: Drop cannot await,
        // and the test's runtime, which drives the test's connections, is blocked in this drop.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                if let Ok(nats) = async_nats::connect(nats_url()).await {
                    let _ = async_nats::jetstream::new(nats).delete_stream(&stream).await;
                }
                if let Ok(admin) = understudy_adapters::db::connect(&admin_database_url(), 1).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {database} WITH (FORCE)")).execute(&admin).await;
                }
            });
        })
        .join();
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(5);
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(100));
    }
}

/// A gauge or counter of a node's `/metrics`.
pub async fn metric(addr: std::net::SocketAddr, name: &str) -> i64 {
    let metrics = reqwest::get(format!("http://{addr}/metrics")).await.expect("metrics").text().await.expect("text");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("{name} in /metrics"))
}

/// Numbers every event appended so far: the ones whose transactions have committed, so poll
/// until none is left unnumbered.
pub async fn sequence_all(pool: &sqlx::PgPool) -> i64 {
    eventually(Duration::from_secs(30), "every appended event to be numbered", || async {
        let (_, head) = understudy_adapters::relay::sequence(pool, 100_000).await.expect("sequence");
        let unnumbered: i64 =
            sqlx::query_scalar("SELECT count(*) FROM event_log WHERE position IS NULL").fetch_one(pool).await.expect("count");
        (unnumbered == 0).then_some(head)
    })
    .await
}

/// The `understudy` binary next to this test binary (built by `scripts/test`).
pub fn understudy_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps");
    let bin = dir.join("understudy");
    assert!(bin.exists(), "{} is missing: build it with `cargo build -p understudy-api --bin understudy`", bin.display());
    bin
}

pub mod fake_github;

pub mod graphql_ws {
    //! A `graphql-transport-ws` client, as thin as the protocol.
    use futures::{SinkExt, StreamExt};
    use serde_json::{json, Value};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    pub type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

    /// Connects to `/graphql` and completes `connection_init`.
    pub async fn connect(addr: std::net::SocketAddr) -> Socket {
        connect_with(addr, &[]).await.expect("connect")
    }

    /// Like [`connect`], with extra handshake headers (`Cookie`, `Origin`, `Authorization`); the
    /// HTTP status when the server refuses the upgrade.
    pub async fn connect_with(addr: std::net::SocketAddr, headers: &[(&str, &str)]) -> Result<Socket, u16> {
        let mut ws = open(addr, "graphql-transport-ws", headers).await?;
        send(&mut ws, json!({ "type": "connection_init" })).await;
        assert_eq!(next_json(&mut ws).await["type"], "connection_ack");
        Ok(ws)
    }

    /// Opens a socket offering `protocols` (as `Sec-WebSocket-Protocol`), with extra handshake
    /// headers, and checks that the server chose the first; the HTTP status when it refuses.
    pub async fn open(addr: std::net::SocketAddr, protocols: &str, headers: &[(&str, &str)]) -> Result<Socket, u16> {
        let mut request = format!("ws://{addr}/graphql").into_client_request().expect("request");
        request.headers_mut().insert("Sec-WebSocket-Protocol", protocols.parse().expect("header"));
        for (name, value) in headers {
            let name = tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()).expect("header name");
            request.headers_mut().insert(name, value.parse().expect("header"));
        }
        let (ws, response) = match tokio_tungstenite::connect_async(request).await {
            Ok(connected) => connected,
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => return Err(response.status().as_u16()),
            Err(error) => panic!("connect: {error}"),
        };
        let first = protocols.split(',').next().unwrap_or_default().trim();
        assert_eq!(response.headers().get("sec-websocket-protocol").and_then(|v| v.to_str().ok()), Some(first));
        Ok(ws)
    }

    /// The close frame the server ends the socket with: its code and reason.
    pub async fn closed(ws: &mut Socket) -> (u16, String) {
        loop {
            match ws.next().await.expect("a close frame before the end").expect("frame") {
                Message::Close(Some(frame)) => return (frame.code.into(), frame.reason.to_string()),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Sends `message` as a text frame.
    pub async fn send(ws: &mut Socket, message: Value) {
        ws.send(Message::text(message.to_string())).await.expect("send");
    }

    /// Starts subscription `id`.
    pub async fn subscribe(ws: &mut Socket, id: &str, query: &str, variables: Value) {
        send(ws, json!({ "id": id, "type": "subscribe", "payload": { "query": query, "variables": variables } })).await;
    }

    /// The next JSON message (pings skipped).
    pub async fn next_json<S>(ws: &mut S) -> Value
    where
        S: futures::Stream<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin,
    {
        loop {
            match ws.next().await.expect("socket open").expect("frame") {
                Message::Text(text) => return serde_json::from_str(text.as_str()).expect("json"),
                Message::Ping(_) | Message::Pong(_) => continue,
                other => panic!("unexpected frame {other:?}"),
            }
        }
    }
}

pub mod repos {
    //! Git repositories on disk standing in for GitHub's: `{base}/git/{owner}/{name}.git`, served
    //! to workers through `GITHUB_GIT_URL=file://{base}/git`, with a work tree at
    //! `{base}/work/{owner}/{name}` to commit from.
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use understudy_domain::values::CommitSha;

    /// The workspace root (examples/, toolchain/).
    pub fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
    }

    /// The `GITHUB_GIT_URL` that serves the repositories under `base`.
    pub fn git_url(base: &Path) -> String {
        format!("file://{}", base.join("git").display())
    }

    pub fn git(dir: &Path, args: &[&str]) -> String {
        let output = Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_AUTHOR_NAME", "Understudy Test")
            .env("GIT_AUTHOR_EMAIL", "test@understudy.invalid")
            .env("GIT_COMMITTER_NAME", "Understudy Test")
            .env("GIT_COMMITTER_EMAIL", "test@understudy.invalid")
            .output()
            .expect("git runs");
        assert!(output.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim().to_string()
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).expect("mkdir");
        for entry in std::fs::read_dir(from).expect("read example") {
            let entry = entry.expect("entry");
            let target = to.join(entry.file_name());
            if entry.file_type().expect("type").is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).expect("copy");
            }
        }
    }

    /// Makes `examples/{example}` the first commit of `full_name`'s main branch.
    pub fn push_example(base: &Path, example: &str, full_name: &str) -> CommitSha {
        let bare = base.join("git").join(format!("{full_name}.git"));
        std::fs::create_dir_all(&bare).expect("mkdir");
        git(&bare, &["init", "--quiet", "--bare"]);
        let work = base.join("work").join(full_name);
        copy_dir(&root().join("examples").join(example), &work);
        git(&work, &["init", "--quiet"]);
        push(base, full_name, example)
    }

    /// Commits `files` on top of `full_name`'s main branch.
    pub fn push_change(base: &Path, full_name: &str, files: &[(&str, &str)]) -> CommitSha {
        let work = base.join("work").join(full_name);
        for (name, text) in files {
            std::fs::write(work.join(name), text).expect("write");
        }
        push(base, full_name, "change")
    }

    fn push(base: &Path, full_name: &str, message: &str) -> CommitSha {
        let bare = base.join("git").join(format!("{full_name}.git"));
        let work = base.join("work").join(full_name);
        git(&work, &["add", "-A"]);
        git(&work, &["commit", "--quiet", "-m", message]);
        git(&work, &["push", "--quiet", bare.to_str().expect("utf-8 path"), "HEAD:refs/heads/main"]);
        CommitSha::parse(git(&work, &["rev-parse", "HEAD"])).expect("sha")
    }
}

pub mod fixtures {
    //! Commands a test sends, with fixed shapes and fresh ids.
    use chrono::Utc;
    use understudy_domain::environment::{EnvironmentCommand, EnvironmentSpec};
    use understudy_domain::ids::{DeploymentId, EnvironmentId, ProjectId};
    use understudy_domain::values::{BranchName, CommitSha, Entrypoint, Target};
    use understudy_domain::Metadata;
    use uuid::Uuid;

    pub fn meta() -> Metadata {
        Metadata::new(Uuid::new_v4(), "system:test")
    }

    pub fn sha(n: u64) -> CommitSha {
        CommitSha::parse(format!("{n:040x}")).expect("40 hex digits")
    }

    pub fn spec(project: ProjectId, pr: u64, entrypoint: &str) -> EnvironmentSpec {
        EnvironmentSpec {
            project_id: project,
            target: Target::PullRequest { number: pr, head_branch: BranchName::parse(format!("feature-{pr}")).expect("valid") },
            entrypoint: Entrypoint::parse(entrypoint).expect("valid"),
        }
    }

    pub fn env_id(spec: &EnvironmentSpec) -> EnvironmentId {
        EnvironmentId::derive(spec.project_id, &spec.target, &spec.entrypoint)
    }

    pub fn request(spec: &EnvironmentSpec, deployment: DeploymentId, commit: u64) -> EnvironmentCommand {
        EnvironmentCommand::RequestDeployment {
            awaiting_approval: false,
            environment_id: env_id(spec),
            spec: spec.clone(),
            deployment_id: deployment,
            commit: sha(commit),
            at: Utc::now(),
        }
    }

    /// Deploys one commit all the way to Ready for each pull request in `prs` (5 events each).
    pub async fn deploy_prs(
        store: &understudy_adapters::AggregateStore<understudy_domain::environment::EnvironmentAggregate>,
        project: ProjectId,
        prs: std::ops::Range<u64>,
    ) {
        for pr in prs {
            let spec = spec(project, pr, "main.w");
            let id = env_id(&spec).0;
            let deployment = DeploymentId(Uuid::new_v4());
            store.execute(id, request(&spec, deployment, pr + 1), meta()).await.expect("request");
            for command in to_ready(deployment) {
                store.execute(id, command, meta()).await.expect("to ready");
            }
        }
    }

    /// A fresh deployment requested, made Ready, then `tests` passing results (`t0`, `t1`, …):
    /// a run of changes to keep an environment changing.
    pub fn deploy_and_test(spec: &EnvironmentSpec, deployment: DeploymentId, tests: usize) -> Vec<EnvironmentCommand> {
        let mut commands = vec![request(spec, deployment, 1)];
        commands.extend(to_ready(deployment));
        commands.extend((0..tests).map(|i| EnvironmentCommand::RecordTestResult {
            deployment_id: deployment,
            test: format!("t{i}"),
            outcome: understudy_domain::environment::TestOutcome::Passed,
            duration_ms: None,
            at: Utc::now(),
        }));
        commands
    }

    /// The commands that take a fresh deployment from Requested to Ready.
    pub fn to_ready(deployment: DeploymentId) -> Vec<EnvironmentCommand> {
        vec![
            EnvironmentCommand::StartBuild { deployment_id: deployment, at: Utc::now() },
            EnvironmentCommand::CompleteBuild { deployment_id: deployment, at: Utc::now() },
            EnvironmentCommand::MarkReady { deployment_id: deployment, url: format!("http://preview.test/{deployment}"), at: Utc::now() },
        ]
    }
}
