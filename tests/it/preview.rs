//! The preview runtime end to end: example repositories fetched over git, built and served in
//! real bubblewrap sandboxes with the real Wing toolchain, reached through the proxy, tested,
//! logged; and the sandbox's isolation claims, tested by trying to break them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_adapters::preview::local_git;
use understudy_adapters::preview::sandbox::{Limits, SandboxSpec};
use understudy_adapters::preview::sweep::Sweeper;
use understudy_adapters::preview::PreviewConfig;
use understudy_domain::environment::EnvironmentCommand;
use understudy_domain::ids::{AccountId, DeploymentId, EnvironmentId, ProjectId};
use understudy_domain::project::{EntrypointRule, ProjectCommand};
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, ProjectName, RepoFullName, Target};
use understudy_tests::fixtures::{env_id, meta, spec};
use understudy_tests::graphql_ws;
use understudy_tests::repos::{self, root};
use understudy_tests::{eventually, metric, understudy_bin, TestEnv};
use uuid::Uuid;

pub(crate) const DOMAIN: &str = "preview.localhost";

/// One test's preview world: the spine, a worker, the API with its proxy, and git repositories
/// on disk standing in for GitHub's.
pub(crate) struct Previews {
    pub(crate) env: TestEnv,
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) addr: std::net::SocketAddr,
    pub(crate) cancel: CancellationToken,
    pub(crate) tasks: JoinSet<anyhow::Result<()>>,
    pub(crate) http: reqwest::Client,
}

impl Previews {
    pub(crate) async fn start() -> Previews {
        Self::start_with(true).await
    }

    pub(crate) async fn start_with(worker: bool) -> Previews {
        Self::start_sealing(worker, None).await
    }

    /// With `key` sealing and opening secrets in the API, the worker and the scheduler's roles.
    pub(crate) async fn start_sealing(worker: bool, key: Option<understudy_adapters::secrets::SecretKey>) -> Previews {
        let tmp = tempfile::tempdir().expect("temp dir");
        let mut env = TestEnv::new().await;
        let mut config = PreviewConfig::new(tmp.path().join("previews"), DOMAIN.into());
        config.git_base = repos::git_url(tmp.path());
        config.wing_toolchain = Some(root().join("toolchain/wing"));
        config.rust_toolchain = understudy_adapters::preview::detect_rust_toolchain();
        config.bridge_bin = understudy_bin();
        config.lease_ttl = Duration::from_secs(3);
        config.signer = Some(Arc::new(understudy_adapters::preview::token::PreviewSigner::generate("http://understudy.test")));
        config.start_timeout = Duration::from_secs(60);
        config.limits = Limits { memory_bytes: 1 << 30, pids: 512, cpu_millicores: 2000, cpu_cap_millicores: None };
        config.secret_key = key;
        config.addon_database = Some(
            understudy_adapters::preview::addon::AddonServer::new(&understudy_tests::admin_database_url()).expect("the add-on server"),
        );
        env.runtime.preview = Arc::new(config);
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        env.runtime.spawn_relay(cancel.clone(), &mut tasks);
        env.runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
        let addr = env.runtime.serve_api("127.0.0.1:0".parse().expect("addr"), cancel.clone(), &mut tasks).await.expect("serve");
        let mut previews = Previews { env, tmp, addr, cancel, tasks, http: reqwest::Client::new() };
        if worker {
            previews.spawn_worker("worker-a");
        }
        previews
    }

    /// With a worker whose configuration `change` adjusted.
    pub(crate) async fn start_configured(change: impl FnOnce(&mut PreviewConfig)) -> Previews {
        let mut previews = Self::start_with(false).await;
        let mut config = (*previews.env.runtime.preview).clone();
        change(&mut config);
        previews.env.runtime.preview = Arc::new(config);
        previews.spawn_worker("worker-configured");
        previews
    }

    pub(crate) fn spawn_worker(&mut self, id: &str) {
        self.env.runtime.spawn_worker(id.into(), self.cancel.clone(), &mut self.tasks);
    }

    /// Pushes `example` as the only commit of repository `full_name`; returns the commit.
    pub(crate) fn push(&self, example: &str, full_name: &str) -> CommitSha {
        repos::push_example(self.tmp.path(), example, full_name)
    }

    /// Commits `files` on top of `full_name`'s main branch; returns the new commit.
    pub(crate) fn push_change(&self, full_name: &str, files: &[(&str, &str)]) -> CommitSha {
        repos::push_change(self.tmp.path(), full_name, files)
    }

    /// A new deployment of `commit` for an existing environment.
    pub(crate) async fn redeploy(&self, environment: EnvironmentId, commit: CommitSha) -> DeploymentId {
        let state = self.env.runtime.store.environments.load(environment.0).await.expect("load").into_inner();
        let deployment = DeploymentId(Uuid::new_v4());
        let command = EnvironmentCommand::RequestDeployment {
            awaiting_approval: false,
            environment_id: environment,
            spec: state.spec.expect("created"),
            deployment_id: deployment,
            commit,
            at: Utc::now(),
        };
        self.env.runtime.store.environments.execute(environment.0, command, meta()).await.expect("request");
        deployment
    }

    /// A repository of node-hello plus `files` (an app of the test's own, started as
    /// `understudy.toml` says), deployed as pull request 1; waits until it is Ready.
    pub(crate) async fn deploy_app(&self, full_name: &str, files: &[(&str, &str)]) -> (EnvironmentId, ProjectId) {
        let (environment, project) = self.request_app(full_name, files).await;
        let row = self.settled(environment, &["Ready", "Failed"]).await;
        assert_eq!(row.0, "Ready", "failure: {:?}", row.2);
        (environment, project)
    }

    /// [`Self::deploy_app`] without waiting for the outcome.
    pub(crate) async fn request_app(&self, full_name: &str, files: &[(&str, &str)]) -> (EnvironmentId, ProjectId) {
        self.push("node-hello", full_name);
        let commit = self.push_change(full_name, files);
        let project = self.project(full_name).await;
        let spec = spec(project, 1, ".");
        let environment = env_id(&spec);
        let deployment_id = DeploymentId(Uuid::new_v4());
        let request = EnvironmentCommand::RequestDeployment {
            awaiting_approval: false,
            environment_id: environment,
            spec,
            deployment_id,
            commit,
            at: Utc::now(),
        };
        self.env.runtime.store.environments.execute(environment.0, request, meta()).await.expect("request");
        (environment, project)
    }

    pub(crate) fn work_dir(&self, environment: EnvironmentId, deployment: DeploymentId) -> PathBuf {
        self.tmp.path().join("previews").join(environment.0.simple().to_string()).join(deployment.0.simple().to_string())
    }

    pub(crate) async fn project(&self, full_name: &str) -> ProjectId {
        let project = ProjectId(Uuid::new_v4());
        let command = ProjectCommand::Create {
            project_id: project,
            account_id: AccountId(Uuid::new_v4()),
            name: ProjectName::parse(full_name.split('/').nth(1).expect("owner/name")).expect("name"),
            repository: RepoFullName::parse(full_name).expect("repo"),
            production_branch: BranchName::parse("main").expect("branch"),
            entrypoints: EntrypointRule::Detect,
            at: Utc::now(),
        };
        self.env.runtime.store.projects.execute(project.0, command, meta()).await.expect("project");
        project
    }

    /// Pushes `example` and asks for a deployment of `entrypoint` of pull request 1.
    pub(crate) async fn deploy(&self, example: &str, entrypoint: &str) -> (EnvironmentId, DeploymentId) {
        let full_name = format!("octo/{example}");
        let commit = self.push(example, &full_name);
        let project = self.project(&full_name).await;
        let spec = spec(project, 1, entrypoint);
        let environment = env_id(&spec);
        let deployment = DeploymentId(Uuid::new_v4());
        let command = EnvironmentCommand::RequestDeployment {
            awaiting_approval: false,
            environment_id: environment,
            spec,
            deployment_id: deployment,
            commit,
            at: Utc::now(),
        };
        self.env.runtime.store.environments.execute(environment.0, command, meta()).await.expect("request");
        (environment, deployment)
    }

    /// Waits until the environment's status is one of `statuses`; returns its read-model row.
    /// On timeout, prints every log line the deployment wrote, to show where it stuck.
    pub(crate) async fn settled(&self, environment: EnvironmentId, statuses: &[&str]) -> Row {
        let deadline = std::time::Instant::now() + Duration::from_secs(180);
        loop {
            let row: Option<Row> = sqlx::query_as(
                "SELECT status, preview_url, failure, tests_passed, tests_failed FROM environments WHERE environment_id = $1",
            )
            .bind(environment.0)
            .fetch_optional(self.env.pool())
            .await
            .expect("read");
            if let Some(row) = row.clone().filter(|r| statuses.contains(&r.0.as_str())) {
                return row;
            }
            if std::time::Instant::now() > deadline {
                let lines: Vec<(String, String)> = sqlx::query_as("SELECT stream, line FROM deployment_logs ORDER BY nano")
                    .fetch_all(self.env.pool())
                    .await
                    .expect("logs");
                for (stream, line) in lines {
                    eprintln!("[{stream}] {line}");
                }
                panic!("the environment did not reach {statuses:?}: {row:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits for `count` test results.
    pub(crate) async fn tested(&self, environment: EnvironmentId, count: i32) -> Row {
        eventually(Duration::from_secs(180), "the test results", || async {
            let row: Row = sqlx::query_as(
                "SELECT status, preview_url, failure, tests_passed, tests_failed FROM environments WHERE environment_id = $1",
            )
            .bind(environment.0)
            .fetch_one(self.env.pool())
            .await
            .expect("read");
            (row.3 + row.4 >= count).then_some(row)
        })
        .await
    }

    pub(crate) fn preview(&self, environment: EnvironmentId, path: &str) -> reqwest::RequestBuilder {
        let host = format!("{}.{DOMAIN}", environment.0.simple());
        self.http.get(format!("http://{}{path}", self.addr)).header("host", host)
    }

    pub(crate) async fn log(&self, environment: EnvironmentId, kind: &str, from: i64) -> (String, i64) {
        let response = self
            .http
            .get(format!("http://{}/environments/{}/logs/{kind}?from={from}", self.addr, environment.0))
            .send()
            .await
            .expect("logs");
        assert_eq!(response.status(), 200, "logs of {kind}");
        let last = response.headers()["x-last-log-nano"].to_str().expect("header").parse().expect("nanos");
        (response.text().await.expect("body"), last)
    }
}

impl Drop for Previews {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

pub(crate) type Row = (String, Option<String>, Option<String>, i32, i32);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wing_app_goes_live_behind_the_proxy_with_its_tests_and_logs() {
    let previews = Previews::start().await;
    let (environment, deployment) = previews.deploy("wing-hello", "main.w").await;
    let row = previews.settled(environment, &["Ready", "Failed"]).await;
    assert_eq!(row.0, "Ready", "failure: {:?}", row.2);
    assert_eq!(row.1.as_deref(), Some(format!("http://{}.{DOMAIN}/", environment.0.simple()).as_str()));

    // The Wing Console, through the proxy.
    let response = previews.preview(environment, "/").send().await.expect("preview");
    assert_eq!(response.status(), 200);
    let page = response.text().await.expect("page");
    assert!(page.contains("<html") || page.contains("<!DOCTYPE"), "the Wing Console's page: {}", &page[..page.len().min(300)]);

    // Both tests ran, each with its own log.
    let row = previews.tested(environment, 2).await;
    assert_eq!((row.3, row.4), (2, 0), "two passed, none failed");
    let metrics = previews.http.get(format!("http://{}/metrics", previews.addr)).send().await.expect("metrics").text().await.expect("text");
    for line in ["understudy_preview_build_seconds_count 1", "understudy_preview_start_seconds_count 1", "understudy_sandboxes_running 1"] {
        assert!(metrics.contains(line), "{line} in /metrics");
    }
    let (test_log, _) = previews.log(environment, "tests/hello%20answers", 0).await;
    assert!(test_log.contains("GET /hello - 200"), "the test's own trace: {test_log}");

    // The build log pages without repeats: from the last nano there is nothing new.
    let (build, last) = previews.log(environment, "build", 0).await;
    assert!(build.contains("understudy: stack wing"), "{build}");
    let (run_log, _) = previews.log(environment, "run", 0).await;
    assert!(run_log.contains("wing it main.w") && run_log.contains("the Wing Console has compiled the app"), "{run_log}");
    let (again, same) = previews.log(environment, "build", last).await;
    assert!(again.is_empty(), "a poller sees nothing twice: {again}");
    assert_eq!(same, last);
    let deployment_log = previews
        .http
        .get(format!("http://{}/deployments/{}/logs/build?download=1", previews.addr, deployment.0))
        .send()
        .await
        .expect("download");
    assert!(deployment_log.headers()["content-disposition"].to_str().expect("header").contains("attachment"));
    assert_eq!(deployment_log.text().await.expect("body"), build);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_tests_and_broken_builds_are_reported_with_their_reasons() {
    let previews = Previews::start().await;
    let (red, _) = previews.deploy("wing-failing-test", "main.w").await;
    let (broken, _) = previews.deploy("wing-broken", "main.w").await;

    let row = previews.settled(broken, &["Ready", "Failed"]).await;
    assert_eq!(row.0, "Failed");
    let failure = row.2.expect("a reason");
    assert!(failure.contains("build failed: the app does not compile: error: Unknown symbol"), "{failure}");
    let (build, _) = previews.log(broken, "build", 0).await;
    assert!(build.contains("Unknown symbol \"nothing\""), "the compiler's own error in the log: {build}");
    let response = previews.preview(broken, "/").send().await.expect("preview");
    assert_eq!(response.status(), 502, "a failed preview says so");

    let row = previews.settled(red, &["Ready", "Failed"]).await;
    assert_eq!(row.0, "Ready", "a failing test does not stop the preview: {:?}", row.2);
    let row = previews.tested(red, 2).await;
    assert_eq!((row.3, row.4), (1, 1), "one passed, one failed");
    let (log, _) = previews.log(red, "tests/arithmetic%20is%20broken", 0).await;
    assert!(log.contains("4 !== 5"), "the assertion in the failing test's log: {log}");
    // Only the red app runs on: the broken one's start was stopped with its build.
    eventually(Duration::from_secs(10), "one sandbox left running", || async {
        (metric(previews.addr, "understudy_sandboxes_running").await == 1).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_wing_app_that_is_never_up_fails_while_its_build_is_open() {
    // No time at all to start: the Wing Console cannot answer, three times over.
    let previews = Previews::start_configured(|config| config.start_timeout = Duration::ZERO).await;
    let (environment, _) = previews.deploy("wing-hello", "main.w").await;
    let row = previews.settled(environment, &["Failed"]).await;
    let failure = row.2.expect("a reason");
    assert!(failure.contains("the app was not up within 0s"), "{failure}");
    let (build, _) = previews.log(environment, "build", 0).await;
    assert!(build.contains("start attempt 3 of 3 failed"), "{build}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_app_serves_http_and_upgrades_until_its_environment_is_terminated() {
    let previews = Previews::start().await;
    let (environment, deployment) = previews.deploy("node-hello", ".").await;
    let row = previews.settled(environment, &["Ready", "Failed"]).await;
    assert_eq!(row.0, "Ready", "failure: {:?}", row.2);
    let body = previews.preview(environment, "/some/path?q=1").send().await.expect("preview").text().await.expect("body");
    assert_eq!(body, "hello from node at /some/path?q=1\n");
    let row = previews.tested(environment, 1).await;
    assert_eq!((row.3, row.4), (1, 0), "npm test passed");
    let tests: serde_json::Value = sqlx::query_scalar("SELECT tests FROM environments WHERE environment_id = $1")
        .bind(environment.0)
        .fetch_one(previews.env.pool())
        .await
        .expect("tests");
    assert_eq!(tests[0]["name"], "npm test");
    assert!(tests[0]["duration_ms"].as_u64().is_some_and(|ms| ms > 0), "a command's test has its duration: {tests}");

    // Tests again, on demand: a fresh run whose results replace the last.
    let cli = std::process::Command::new(understudy_bin())
        .args(["test", "run", "--environment", &environment.0.to_string()])
        .env("DATABASE_URL", &previews.env.database_url)
        .output()
        .expect("understudy test run");
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    eventually(Duration::from_secs(60), "the second test run's result", || async {
        let passed: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE aggregate_id = $1 AND event_type = 'TestPassed'")
            .bind(environment.0)
            .fetch_one(previews.env.pool())
            .await
            .expect("count");
        (passed == 2).then_some(())
    })
    .await;
    let started: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE aggregate_id = $1 AND event_type = 'TestRunStarted'")
        .bind(environment.0)
        .fetch_one(previews.env.pool())
        .await
        .expect("count");
    assert_eq!(started, 1);
    assert_eq!(previews.tested(environment, 1).await.3, 1, "one test, its latest result");

    // A restart on request (the GraphQL mutation): the same build in a fresh process, serving again.
    let restart = serde_json::json!({
        "query": "mutation($e: UUID!) { restartEnvironment(environmentId: $e) { status } }",
        "variables": { "e": environment.0.to_string() }
    });
    let answer: serde_json::Value = previews
        .http
        .post(format!("http://{}/graphql", previews.addr))
        .json(&restart)
        .send()
        .await
        .expect("post")
        .json()
        .await
        .expect("json");
    assert_eq!(answer["data"]["restartEnvironment"]["status"], "Ready", "{answer}");
    eventually(Duration::from_secs(60), "the restart to be done and the app to answer", || async {
        let restarted: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE aggregate_id = $1 AND event_type = 'RestartStarted'")
            .bind(environment.0)
            .fetch_one(previews.env.pool())
            .await
            .expect("count");
        let (run, _) = previews.log(environment, "run", 0).await;
        let answers = previews.preview(environment, "/again").send().await.ok()?.text().await.ok()? == "hello from node at /again\n";
        (restarted == 1 && run.contains("restart requested") && answers).then_some(())
    })
    .await;

    // An upgraded connection is spliced through both ways.
    let mut stream = tokio::net::TcpStream::connect(previews.addr).await.expect("connect");
    let host = format!("{}.{DOMAIN}", environment.0.simple());
    let request = format!("GET /echo HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut head = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut head)).await.expect("an answer").expect("read");
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    stream.write_all(b"ping through the proxy").await.expect("write");
    let mut echoed = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut echoed)).await.expect("echo").expect("read");
    assert_eq!(&echoed[..n], b"ping through the proxy");

    // Terminated: processes gone, work dir gone, the URL answers 410.
    let work_dir = previews.tmp.path().join("previews").join(environment.0.simple().to_string()).join(deployment.0.simple().to_string());
    assert!(work_dir.exists(), "the checkout is there while it runs");
    let command = EnvironmentCommand::Terminate { reason: "pull request closed".into(), at: Utc::now() };
    previews.env.runtime.store.environments.execute(environment.0, command, meta()).await.expect("terminate");
    eventually(Duration::from_secs(30), "the preview to be torn down", || async {
        let gone = previews.preview(environment, "/").send().await.expect("preview").status() == 410;
        (gone && !work_dir.exists()).then_some(())
    })
    .await;
    let routes: i64 = sqlx::query_scalar("SELECT count(*) FROM preview_routes").fetch_one(previews.env.pool()).await.expect("count");
    assert_eq!(routes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_and_rust_apps_are_detected_built_served_and_tested() {
    let previews = Previews::start().await;
    let (python, _) = previews.deploy("python-hello", ".").await;
    let (rust, _) = previews.deploy("rust-hello", ".").await;
    for (environment, greeting) in [(python, "hello from python at /x\n"), (rust, "hello from rust at /x\n")] {
        let row = previews.settled(environment, &["Ready", "Failed"]).await;
        assert_eq!(row.0, "Ready", "failure: {:?}", row.2);
        let body = previews.preview(environment, "/x").send().await.expect("preview").text().await.expect("body");
        assert_eq!(body, greeting);
        let row = previews.tested(environment, 1).await;
        assert_eq!((row.3, row.4), (1, 0), "{greeting}: its test passed");
    }
    let (build, _) = previews.log(rust, "build", 0).await;
    assert!(build.contains("$ cargo build --release --offline"), "{build}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_commit_cancels_the_build_in_flight_and_the_old_preview_serves_until_the_new_one_is_ready() {
    let previews = Previews::start().await;
    let (environment, first) = previews.deploy("node-hello", ".").await;
    assert_eq!(previews.settled(environment, &["Ready", "Failed"]).await.0, "Ready");

    // A commit whose build hangs: the first preview keeps serving meanwhile.
    let slow = previews.push_change("octo/node-hello", &[("understudy.toml", "build = \"sleep 600\"\n")]);
    let second = previews.redeploy(environment, slow).await;
    eventually(Duration::from_secs(30), "the slow build to start", || async {
        let (log, _) = previews.log(environment, "build", 0).await;
        log.contains("$ sleep 600").then_some(())
    })
    .await;
    let body = previews.preview(environment, "/").send().await.expect("preview").text().await.expect("body");
    assert_eq!(body, "hello from node at /\n", "the old preview serves while the new one builds");

    // A third commit supersedes the hanging build, which is stopped (not waited for).
    let fixed = previews.push_change(
        "octo/node-hello",
        &[
            ("understudy.toml", "build = \"true\"\n"),
            (
                "server.js",
                &std::fs::read_to_string(root().join("examples/node-hello/server.js"))
                    .expect("read")
                    .replace("hello from node", "hello from v3"),
            ),
        ],
    );
    let third = previews.redeploy(environment, fixed).await;
    eventually(Duration::from_secs(60), "the third commit to serve", || async {
        let body = previews.preview(environment, "/").send().await.ok()?.text().await.ok()?;
        (body == "hello from v3 at /\n").then_some(())
    })
    .await;
    eventually(Duration::from_secs(30), "the old deployments to be cleaned up", || async {
        (!previews.work_dir(environment, first).exists() && !previews.work_dir(environment, second).exists()).then_some(())
    })
    .await;
    assert!(previews.work_dir(environment, third).exists());
    // A worker removes a finished deployment's files before it releases its lease: wait for both.
    eventually(Duration::from_secs(30), "only the serving deployment to hold its lease", || async {
        let leases: Vec<(Uuid, bool)> = sqlx::query_as("SELECT deployment_id, released FROM deployment_leases ORDER BY deployment_id")
            .fetch_all(previews.env.pool())
            .await
            .expect("leases");
        leases.iter().all(|(deployment, released)| *released == (*deployment != third.0)).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_preview_goes_stale_and_a_visit_wakes_it() {
    let previews = Previews::start().await;
    let (environment, first) = previews.deploy("node-hello", ".").await;
    assert_eq!(previews.settled(environment, &["Ready", "Failed"]).await.0, "Ready");
    assert_eq!(previews.preview(environment, "/").send().await.expect("visit").status(), 200);
    // The sweep compares with now() strictly: let the clock pass the visit just made.
    tokio::time::sleep(Duration::from_millis(50)).await;

    let sweeper = Sweeper { store: previews.env.runtime.store.clone(), idle: Duration::ZERO, every: Duration::from_secs(60) };
    assert_eq!(sweeper.sweep_once().await.expect("sweep"), 1);
    assert_eq!(previews.settled(environment, &["Stale"]).await.0, "Stale");
    eventually(Duration::from_secs(30), "the stale preview to stop", || async {
        (!previews.work_dir(environment, first).exists()).then_some(())
    })
    .await;
    assert_eq!(sweeper.sweep_once().await.expect("sweep"), 0, "a stale environment is not swept again");

    // The visit wakes it: a page that says so, then the preview again.
    let response = previews.preview(environment, "/").send().await.expect("visit");
    assert_eq!(response.status(), 503);
    assert!(response.text().await.expect("page").contains("Waking"));
    eventually(Duration::from_secs(60), "the woken preview to serve", || async {
        let body = previews.preview(environment, "/").send().await.ok()?.text().await.ok()?;
        (body == "hello from node at /\n").then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_repository_on_disk_is_a_project_whose_branches_deploy_when_pushed() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/app");
    let bare = previews.tmp.path().join("git/local/app.git");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add");
    let again = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add again");
    assert_eq!(project.id, again.id, "adding the same repository twice is one project");
    let project = project.id.expect("id");
    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    let environment = |branch: &str| {
        EnvironmentId::derive(
            project,
            &Target::Branch { branch: BranchName::parse(branch).expect("branch") },
            &Entrypoint::parse(".").expect("entrypoint"),
        )
    };

    assert_eq!(poller.poll_all().await.expect("poll"), 1, "main's head is deployed");
    assert_eq!(poller.poll_all().await.expect("poll"), 0, "and only once");
    let main = environment("main");
    assert_eq!(previews.settled(main, &["Ready", "Failed"]).await.0, "Ready");
    assert_eq!(previews.preview(main, "/").send().await.expect("preview").text().await.expect("body"), "hello from node at /\n");

    // A push to main: the next poll deploys it.
    let server = std::fs::read_to_string(root().join("examples/node-hello/server.js")).expect("read");
    previews.push_change("local/app", &[("server.js", &server.replace("hello from node", "hello from the second push"))]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    eventually(Duration::from_secs(60), "the pushed commit to serve", || async {
        let body = previews.preview(main, "/").send().await.ok()?.text().await.ok()?;
        (body == "hello from the second push at /\n").then_some(())
    })
    .await;

    // Going back to the first commit (a revert, a force-push) deploys it again.
    let work = previews.tmp.path().join("work/local/app");
    repos::git(&work, &["push", "--quiet", "--force", bare.to_str().expect("utf-8"), "HEAD~1:refs/heads/main"]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1, "the earlier commit is current again");
    eventually(Duration::from_secs(60), "the earlier commit to serve again", || async {
        let body = previews.preview(main, "/").send().await.ok()?.text().await.ok()?;
        (body == "hello from node at /\n").then_some(())
    })
    .await;
    assert_eq!(poller.poll_all().await.expect("poll"), 0, "and only once");

    // A new branch gets its own environment; deleting it terminates that environment.
    repos::git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), "HEAD:refs/heads/feature"]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    let feature = environment("feature");
    assert_eq!(previews.settled(feature, &["Ready", "Failed"]).await.0, "Ready");
    repos::git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), ":refs/heads/feature"]);
    assert_eq!(poller.poll_all().await.expect("poll"), 0);
    assert_eq!(previews.settled(feature, &["Terminated"]).await.0, "Terminated");
    assert_eq!(previews.settled(main, &["Ready"]).await.0, "Ready", "main is untouched");
}

/// An `understudy worker` process of this test's world.
fn worker_process(previews: &Previews) -> tokio::process::Child {
    tokio::process::Command::new(understudy_bin())
        .arg("worker")
        .env("DATABASE_URL", &previews.env.database_url)
        .env("NATS_URL", understudy_tests::nats_url())
        .env("UNDERSTUDY_NATS_PREFIX", &previews.env.prefix)
        .env("UNDERSTUDY_DATA_DIR", previews.tmp.path())
        .env("UNDERSTUDY_PREVIEW_DOMAIN", DOMAIN)
        .env("GITHUB_GIT_URL", repos::git_url(previews.tmp.path()))
        .env("UNDERSTUDY_WING_TOOLCHAIN", root().join("toolchain/wing"))
        .env("UNDERSTUDY_LEASE_SECONDS", "3")
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start a worker process")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_worker_process_takes_its_previews_down_and_the_next_worker_brings_them_back() {
    let previews = Previews::start_with(false).await;
    let (environment, deployment) = previews.deploy("node-hello", ".").await;
    let mut first = worker_process(&previews);
    assert_eq!(previews.settled(environment, &["Ready", "Failed"]).await.0, "Ready");
    assert_eq!(previews.preview(environment, "/").send().await.expect("preview").status(), 200);

    // SIGKILL: no clean-up runs; the sandbox dies with its parent.
    first.kill().await.expect("kill");
    eventually(Duration::from_secs(10), "the preview to stop answering", || async {
        (previews.preview(environment, "/").send().await.ok()?.status() != 200).then_some(())
    })
    .await;

    // The next worker claims the expired lease and restarts the same deployment.
    let _second = worker_process(&previews);
    eventually(Duration::from_secs(60), "the preview to answer again", || async {
        let body = previews.preview(environment, "/").send().await.ok()?.text().await.ok()?;
        (body == "hello from node at /\n").then_some(())
    })
    .await;
    let ready: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE aggregate_id = $1 AND event_type = 'DeploymentReady'")
        .bind(environment.0)
        .fetch_one(previews.env.pool())
        .await
        .expect("count");
    assert_eq!(ready, 1, "a restart is not a new deployment");
    let (route,): (Uuid,) = sqlx::query_as("SELECT deployment_id FROM preview_routes WHERE environment_id = $1")
        .bind(environment.0)
        .fetch_one(previews.env.pool())
        .await
        .expect("route");
    assert_eq!(route, deployment.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn secrets_reach_the_app_but_never_a_log_the_database_or_a_fork() {
    const CANARY: &str = "canary-7f3a9c1e-never-print-me";
    let key = understudy_adapters::secrets::SecretKey::generate();
    let sealing = understudy_adapters::secrets::SecretKey::from_base64(&key).expect("key");
    let previews = Previews::start_configured(|config| config.secret_key = Some(sealing)).await;

    previews.push("node-hello", "local/secretive");
    let app =
        "require('http').createServer((q, r) => r.end(`token=${process.env.API_TOKEN || ''}\\n`)).listen(process.env.PORT, '127.0.0.1');\n";
    let commit = previews.push_change(
        "local/secretive",
        &[("secret.js", app), ("understudy.toml", "build = \"echo building with $API_TOKEN\"\nstart = \"node secret.js\"\n")],
    );
    let bare = previews.tmp.path().join("git/local/secretive.git");
    let project = local_git::add_project(&previews.env.runtime.store, bare.to_str().expect("utf-8"), "main", None).await.expect("add");
    let project = project.id.expect("id");

    // Set through the CLI, the value on standard input, as an operator would.
    let mut cli = tokio::process::Command::new(understudy_bin())
        .args(["secret", "set", "--project", &project.to_string(), "API_TOKEN"])
        .env("DATABASE_URL", &previews.env.database_url)
        .env("UNDERSTUDY_SECRET_KEY", &key)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("understudy secret set");
    cli.stdin.take().expect("stdin").write_all(format!("{CANARY}\n").as_bytes()).await.expect("write");
    let output = cli.wait_with_output().await.expect("wait");
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stdout));
    let listed = std::process::Command::new(understudy_bin())
        .args(["secret", "list", "--project", &project.to_string()])
        .env("DATABASE_URL", &previews.env.database_url)
        .output()
        .expect("list");
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    assert!(listed.starts_with("API_TOKEN\tall\t") && !listed.contains(CANARY), "names only: {listed}");

    // The production branch gets it: the app sees it, the build log shows it redacted.
    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    let main = EnvironmentId::derive(
        project,
        &Target::Branch { branch: BranchName::parse("main").expect("branch") },
        &Entrypoint::parse(".").expect("entrypoint"),
    );
    assert_eq!(previews.settled(main, &["Ready", "Failed"]).await.0, "Ready");
    let body = previews.preview(main, "/").send().await.expect("preview").text().await.expect("body");
    assert_eq!(body, format!("token={CANARY}\n"), "the app got the secret");
    let (build, _) = previews.log(main, "build", 0).await;
    assert!(build.contains("building with [redacted]") && build.contains("secrets given: API_TOKEN"), "{build}");

    // A pull request from a fork builds without it.
    let spec = spec(project, 7, ".");
    let pull_request = understudy_domain::ids::PullRequestId::derive(project, 7);
    let observe = understudy_domain::pull_request::Observation {
        pull_request_id: pull_request,
        project_id: project,
        number: 7,
        head_branch: BranchName::parse("feature-7").expect("branch"),
        base_branch: BranchName::parse("main").expect("branch"),
        head_sha: commit.clone(),
        entrypoints: vec![Entrypoint::parse(".").expect("entrypoint")],
        open: true,
        merged: false,
        from_fork: true,
        updated_at: Utc::now(),
    };
    let store = &previews.env.runtime.store;
    store
        .pull_requests
        .execute(pull_request.0, understudy_domain::pull_request::PullRequestCommand::Observe(observe), meta())
        .await
        .expect("observe");
    let fork = env_id(&spec);
    let request = EnvironmentCommand::RequestDeployment {
        awaiting_approval: false,
        environment_id: fork,
        spec,
        deployment_id: DeploymentId(Uuid::new_v4()),
        commit,
        at: Utc::now(),
    };
    store.environments.execute(fork.0, request, meta()).await.expect("request");
    assert_eq!(previews.settled(fork, &["Ready", "Failed"]).await.0, "Ready");
    let body = previews.preview(fork, "/").send().await.expect("preview").text().await.expect("body");
    assert_eq!(body, "token=\n", "a fork's preview has no secrets");
    let (build, _) = previews.log(fork, "build", 0).await;
    assert!(build.contains("comes from a fork: built without the project's secrets"), "{build}");

    // Nowhere in the database: not in the event log, the read models or the logs.
    let dump = std::process::Command::new("pg_dump").args(["--data-only", &previews.env.database_url]).output().expect("pg_dump");
    assert!(dump.status.success(), "{}", String::from_utf8_lossy(&dump.stderr));
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("SecretSet"), "the dump holds the sealed secret's event");
    assert!(!dump.contains(CANARY), "the plain value is nowhere in the database");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_app_that_stops_answering_is_restarted_by_the_watchdog() {
    let previews = Previews::start_configured(|config| {
        config.health_interval = Duration::from_secs(1);
        config.health_timeout = Duration::from_secs(1);
        config.health_failures = 2;
    })
    .await;
    // Each process of this app answers one request, then never again.
    let hang = "let served = 0;\nrequire('http').createServer((q, r) => { if (served++ === 0) r.end('ok\\n'); }).listen(process.env.PORT, '127.0.0.1');\n";
    let (environment, _) = previews.deploy_app("octo/hangs", &[("hang.js", hang), ("understudy.toml", "start = \"node hang.js\"\n")]).await;

    let run_log = eventually(Duration::from_secs(60), "the watchdog to restart the app", || async {
        let (log, _) = previews.log(environment, "run", 0).await;
        (log.matches("health check GET / answered 200").count() >= 2).then_some(log)
    })
    .await;
    assert!(
        run_log.contains("health check GET / failed (2 of 2)") && run_log.contains("the app stopped answering; restarting it"),
        "{run_log}"
    );
    let row = previews.settled(environment, &["Ready", "Failed"]).await;
    assert_eq!(row.0, "Ready", "a restart that works does not fail the preview: {:?}", row.2);
    // Health changes are events; the checks that found nothing new are not.
    let health: Vec<String> = eventually(Duration::from_secs(30), "the health to be back", || async {
        let health: Vec<String> = sqlx::query_scalar(
            "SELECT event_type FROM event_log WHERE aggregate_id = $1 AND event_type IN ('DeploymentUnhealthy', 'DeploymentHealthy') ORDER BY id",
        )
        .bind(environment.0)
        .fetch_all(previews.env.pool())
        .await
        .expect("events");
        (health.len() >= 2).then_some(health)
    })
    .await;
    assert_eq!(health[..2], ["DeploymentUnhealthy", "DeploymentHealthy"]);
    assert!(health.windows(2).all(|w| w[0] != w[1]), "only changes are recorded: {health:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_proxied_request_carries_a_token_the_app_can_verify_and_clients_cannot_forge() {
    use understudy_adapters::preview::token;
    let previews = Previews::start().await;
    let echo =
        "require('http').createServer((q, r) => r.end(q.headers['x-understudy-token'] || 'none')).listen(process.env.PORT, '127.0.0.1');\n";
    let (environment, project) =
        previews.deploy_app("octo/tokens", &[("echo.js", echo), ("understudy.toml", "start = \"node echo.js\"\n")]).await;

    let received = previews
        .preview(environment, "/")
        .header("x-understudy-token", "forged")
        .send()
        .await
        .expect("preview")
        .text()
        .await
        .expect("body");
    assert_ne!(received, "forged", "a client's token never reaches the app");
    let jwks: serde_json::Value = previews
        .http
        .get(format!("http://{}/.well-known/jwks.json", previews.addr))
        .send()
        .await
        .expect("jwks")
        .json()
        .await
        .expect("json");
    let claims = token::verify(&received, &jwks, Utc::now().timestamp()).expect("the app can verify it");
    assert_eq!(claims.sub, environment.to_string());
    assert_eq!(claims.project, project.to_string());
    assert!(claims.exp - Utc::now().timestamp() <= token::LIFETIME_SECONDS, "short-lived");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_repository_file_can_make_each_directory_an_app_of_its_own() {
    let previews = Previews::start().await;
    let app = |name: &str| format!("require('http').createServer((q, r) => r.end('{name}\\n')).listen(process.env.PORT, '127.0.0.1');\n");
    let package = r#"{"scripts":{"start":"node server.js"}}"#;
    previews.push("node-hello", "local/mono");
    let work = previews.tmp.path().join("work/local/mono");
    for dir in ["api", "web"] {
        std::fs::create_dir_all(work.join(dir)).expect("mkdir");
    }
    let (api, web) = (app("the api"), app("the web app"));
    previews.push_change(
        "local/mono",
        &[
            ("understudy.toml", "entrypoints = [\"api\", \"web\"]\n"),
            ("api/package.json", package),
            ("api/server.js", &api),
            ("web/package.json", package),
            ("web/server.js", &web),
        ],
    );
    let bare = previews.tmp.path().join("git/local/mono.git");
    let project = local_git::add_project(&previews.env.runtime.store, bare.to_str().expect("utf-8"), "main", None).await.expect("add");
    let project = project.id.expect("id");
    assert_eq!(
        previews.env.runtime.git_poller(Duration::from_secs(60)).poll_all().await.expect("poll"),
        2,
        "one environment per listed app"
    );
    for (dir, body) in [("api", "the api\n"), ("web", "the web app\n")] {
        let target = Target::Branch { branch: BranchName::parse("main").expect("branch") };
        let environment = EnvironmentId::derive(project, &target, &Entrypoint::parse(dir).expect("entrypoint"));
        let row = previews.settled(environment, &["Ready", "Failed"]).await;
        assert_eq!(row.0, "Ready", "{dir}: {:?}", row.2);
        assert_eq!(previews.preview(environment, "/").send().await.expect("preview").text().await.expect("body"), body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deployment_whose_worker_died_is_taken_over_when_its_lease_expires() {
    let mut previews = Previews::start_with(false).await;
    let (environment, deployment) = previews.deploy("node-hello", ".").await;
    // A worker claimed it, started the build, and died.
    let command = EnvironmentCommand::StartBuild { deployment_id: deployment, at: Utc::now() };
    previews.env.runtime.store.environments.execute(environment.0, command, meta()).await.expect("start build");
    sqlx::query(
        "INSERT INTO deployment_leases (deployment_id, environment_id, worker, expires_at) VALUES ($1, $2, 'dead-worker', now() + interval '2 seconds')",
    )
    .bind(deployment.0)
    .bind(environment.0)
    .execute(previews.env.pool())
    .await
    .expect("lease");
    // Its build log, live over GraphQL, from before the new worker starts writing it.
    let mut ws = graphql_ws::connect(previews.addr).await;
    let query = "subscription($d: UUID!) { deploymentLogs(deploymentId: $d, stream: \"build\") { stream nano line } }";
    // No wait needed before the worker starts: the subscription first reads what is stored.
    graphql_ws::subscribe(&mut ws, "logs", query, serde_json::json!({ "d": deployment.0 })).await;
    previews.spawn_worker("worker-b");
    let mut lines = Vec::new();
    while !lines.iter().any(|(_, line): &(u128, String)| line == "understudy: ready") {
        let message = tokio::time::timeout(Duration::from_secs(60), graphql_ws::next_json(&mut ws)).await.expect("a log line");
        assert_eq!(message["type"], "next", "{message}");
        let line = &message["payload"]["data"]["deploymentLogs"];
        lines.push((line["nano"].as_str().expect("nano").parse().expect("nanos"), line["line"].as_str().expect("line").to_string()));
    }
    assert!(lines.windows(2).all(|w| w[0].0 < w[1].0), "in order, none twice: {lines:?}");
    assert!(lines.iter().any(|(_, l)| l.starts_with("$ git fetch")), "{lines:?}");
    let row = previews.settled(environment, &["Ready", "Failed"]).await;
    assert_eq!(row.0, "Ready", "failure: {:?}", row.2);
    let (worker, attempts): (String, i32) = sqlx::query_as("SELECT worker, attempts FROM deployment_leases WHERE deployment_id = $1")
        .bind(deployment.0)
        .fetch_one(previews.env.pool())
        .await
        .expect("lease");
    assert_eq!(worker, "worker-b");
    assert_eq!(attempts, 0, "reset once Ready");
    let builds: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE aggregate_id = $1 AND event_type = 'BuildStarted'")
        .bind(environment.0)
        .fetch_one(previews.env.pool())
        .await
        .expect("count");
    assert_eq!(builds, 1, "the takeover carries on from Building; it does not start the build twice");
}

#[tokio::test]
async fn previews_are_refused_unless_they_are_public() {
    let mut env = TestEnv::new().await;
    let mut config = PreviewConfig::new(std::env::temp_dir().join("unused"), DOMAIN.into());
    config.public = false;
    env.runtime.preview = Arc::new(config);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let addr = env.runtime.serve_api("127.0.0.1:0".parse().expect("addr"), cancel.clone(), &mut tasks).await.expect("serve");
    let host = format!("{}.{DOMAIN}", Uuid::new_v4().simple());
    let response = reqwest::Client::new().get(format!("http://{addr}/")).header("host", host).send().await.expect("preview");
    assert_eq!(response.status(), 403);
    assert!(response.text().await.expect("page").contains("UNDERSTUDY_PUBLIC_PREVIEWS"));
    let api = reqwest::get(format!("http://{addr}/healthz")).await.expect("healthz");
    assert_eq!(api.status(), 200, "the API itself is not behind the preview rule");
    cancel.cancel();
}

// --- the sandbox, attacked directly ------------------------------------------------------------

fn sandbox(tmp: &Path, name: &str, limits: Limits) -> SandboxSpec {
    SandboxSpec {
        name: format!("test-{}-{name}", Uuid::new_v4().simple()),
        app_dir: tmp.join(name).join("app"),
        cache_dir: tmp.join(name).join("cache"),
        run_dir: tmp.join(name).join("run"),
        workdir: "/app".into(),
        read_only: vec![],
        env: vec![("PATH".into(), "/usr/bin:/bin".into()), ("HOME".into(), "/tmp".into())],
        network: false,
        limits,
        wrap: vec![],
    }
}

async fn run(spec: &SandboxSpec, script: &str) -> (Option<i32>, String, bool) {
    let mut sandboxed = spec.spawn(&["/bin/sh".into(), "-c".into(), script.into()]).expect("spawn");
    assert!(sandboxed.limited(), "this machine lets root create cgroups; without them the limits are not enforced");
    let mut out = String::new();
    let mut stdout = sandboxed.child.stdout.take().expect("stdout");
    let mut stderr = sandboxed.child.stderr.take().expect("stderr");
    let (mut a, mut b) = (String::new(), String::new());
    let status = tokio::time::timeout(Duration::from_secs(60), async {
        let (_, _, status) = tokio::join!(stdout.read_to_string(&mut a), stderr.read_to_string(&mut b), sandboxed.child.wait());
        status
    })
    .await
    .expect("the sandbox ends within a minute")
    .expect("wait");
    out.push_str(&a);
    out.push_str(&b);
    let oom = sandboxed.out_of_memory();
    sandboxed.kill().await;
    (status.code(), out, oom)
}

#[tokio::test]
async fn a_sandbox_sees_no_other_environment_no_control_plane_and_no_host_network() {
    let tmp = tempfile::tempdir().expect("tmp");
    let other = sandbox(tmp.path(), "other", Limits::default());
    std::fs::create_dir_all(&other.app_dir).expect("mkdir");
    std::fs::write(other.app_dir.join("secret.txt"), "the other environment's secret").expect("write");
    let mine = sandbox(tmp.path(), "mine", Limits::default());

    let probe = format!(
        "cat {} 2>&1; ls {} 2>&1; ls /app /cache; ls /work 2>&1; ls /var/lib/postgresql 2>&1; cat /proc/1/environ | tr '\\0' '\\n'; \
         echo processes: $(ls /proc | grep -c '^[0-9]')",
        other.app_dir.join("secret.txt").display(),
        tmp.path().display()
    );
    let (code, out, _) = run(&mine, &probe).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(!out.contains("the other environment's secret"), "{out}");
    assert!(out.contains("No such file or directory"), "other paths do not exist inside: {out}");
    assert!(!out.contains("DATABASE_URL") && !out.contains("CARGO") && !out.contains("PWD=/work"), "no host environment inside: {out}");
    let processes: usize = out.rsplit("processes: ").next().and_then(|n| n.trim().parse().ok()).expect("a count");
    assert!(processes < 10, "only the sandbox's own processes are visible, saw {processes}: {out}");

    // The machine's Postgres and NATS listen on the host's loopback; the sandbox has its own.
    for port in [5432, 4222] {
        let script = format!(
            "node -e \"require('net').connect({port}, '127.0.0.1').on('connect', () => {{ console.log('CONNECTED'); process.exit(0) }}).on('error', e => {{ console.log(e.code); process.exit(3) }})\""
        );
        let (code, out, _) = run(&mine, &script).await;
        assert_eq!(code, Some(3), "port {port}: {out}");
        assert!(out.contains("ECONNREFUSED") || out.contains("ENETUNREACH"), "port {port}: {out}");
    }
}

#[tokio::test]
async fn a_sandbox_s_variables_reach_the_app_and_no_command_line() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut spec = sandbox(tmp.path(), "secretive", Limits::default());
    let secret = format!("s3cret-{}", Uuid::new_v4().simple());
    spec.env.push(("API_TOKEN".into(), secret.clone()));
    spec.env.push(("SPACED".into(), "two words; and a 'quote'".into()));
    let mut sandboxed = spec
        .spawn(&[
            "/bin/sh".into(),
            "-c".into(),
            "env | sort; if [ -e /proc/self/fd/3 ]; then echo fd3: open; else echo fd3: closed; fi; sleep 30".into(),
        ])
        .expect("spawn");
    let mut lines = tokio::io::BufReader::new(sandboxed.child.stdout.take().expect("stdout")).lines();
    let mut inside = Vec::new();
    while let Ok(Ok(Some(line))) = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await {
        let done = line.starts_with("fd3:");
        inside.push(line);
        if done {
            break;
        }
    }
    // While it runs: no process of the machine shows the value in its command line.
    let mut seen_in = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc") {
        let path = entry.expect("entry").path().join("cmdline");
        if let Ok(cmdline) = std::fs::read(&path) {
            if String::from_utf8_lossy(&cmdline).contains(&secret) {
                seen_in.push(String::from_utf8_lossy(&cmdline).replace('\0', " "));
            }
        }
    }
    sandboxed.kill().await;
    assert!(seen_in.is_empty(), "a secret on a command line anyone can read: {seen_in:?}");
    assert!(inside.contains(&format!("API_TOKEN={secret}")), "the app sees its variable: {inside:?}");
    assert!(inside.contains(&"SPACED=two words; and a 'quote'".to_string()), "{inside:?}");
    let names: Vec<&str> = inside.iter().filter_map(|line| line.split_once('=').map(|(k, _)| k)).collect();
    assert_eq!(names, ["API_TOKEN", "HOME", "PATH", "PWD", "SPACED"], "only the sandbox's own variables: {inside:?}");
    assert_eq!(inside.last().map(String::as_str), Some("fd3: closed"), "bwrap's `--args` descriptor is not left open: {inside:?}");

    // A NUL would end a value early and turn the rest into bwrap options: refused before spawning.
    let mut injected = sandbox(tmp.path(), "injected", Limits::default());
    injected.env.push(("X".into(), "a\0--bind\0/\0/host".into()));
    let refused = injected.spawn(&["/bin/true".into()]).err().expect("a NUL is refused");
    assert!(refused.to_string().contains("NUL"), "{refused}");
}

/// A sandbox's CPU is a share (its weight against other sandboxes), so an idle worker's cores go
/// to whichever preview needs them; an operator's cap, when set, is a hard quota on top.
#[tokio::test]
async fn a_sandbox_s_cpu_is_a_share_and_a_cap_only_when_one_is_set() {
    let tmp = tempfile::tempdir().expect("tmp");
    let read = |sandboxed: &understudy_adapters::preview::sandbox::Sandboxed, file: &str| {
        sandboxed.cgroup_dirs().iter().find_map(|dir| std::fs::read_to_string(Path::new(dir).join(file)).ok()).map(|s| s.trim().to_string())
    };
    for (name, cap, quota_v1, max_v2) in [("shared", None, "-1", "max 100000"), ("capped", Some(1500), "150000", "150000 100000")] {
        let limits = Limits { memory_bytes: 256 << 20, pids: 64, cpu_millicores: 500, cpu_cap_millicores: cap };
        let mut sandboxed = sandbox(tmp.path(), name, limits).spawn(&["/bin/sleep".into(), "30".into()]).expect("spawn");
        assert!(sandboxed.limited(), "this machine lets root create cgroups; without them the limits are not enforced");
        match read(&sandboxed, "cpu.weight") {
            Some(weight) => {
                assert_eq!(weight, "50", "{name}: half the default weight of one core");
                assert_eq!(read(&sandboxed, "cpu.max").as_deref(), Some(max_v2), "{name}");
            }
            None => {
                assert_eq!(read(&sandboxed, "cpu.shares").as_deref(), Some("512"), "{name}: half the 1024 shares of one core");
                assert_eq!(read(&sandboxed, "cpu.cfs_quota_us").as_deref(), Some(quota_v1), "{name}");
            }
        }
        sandboxed.kill().await;
    }
}

#[tokio::test]
async fn a_sandbox_cannot_outgrow_its_memory_or_process_limits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let limits = Limits { memory_bytes: 128 << 20, pids: 64, cpu_millicores: 1000, cpu_cap_millicores: None };
    let spec = sandbox(tmp.path(), "greedy", limits);
    let (code, out, oom) = run(&spec, "node -e \"const a = []; for (;;) a.push(Buffer.alloc(16 << 20, 1))\"").await;
    assert_ne!(code, Some(0), "{out}");
    assert!(oom, "the memory limit killed it: code {code:?}, {out}");
    eprintln!("memory hog: code {code:?}, output {out}");

    // A fork bomb, bounded so that it is harmless even if the limit were missing.
    let spec = sandbox(tmp.path(), "forky", limits);
    let (_, out, _) =
        run(&spec, "i=0; while [ $i -lt 300 ]; do sleep 20 & i=$((i+1)); done 2>&1; echo spawned; kill $(jobs -p) 2>/dev/null; true").await;
    assert!(out.contains("fork") || out.contains("Resource temporarily unavailable"), "forks were refused: {out}");
}

/// A worker killed outright (SIGKILL, a crash) cannot stop its sandboxes, and bubblewrap's
/// `--die-with-parent` misses one whose worker died while starting it: the app would run on,
/// unseen, for as long as the machine does. Every sandbox's cgroup is named for its owner (pid and start
/// time); the sweep each worker runs at start and every minute kills the sandboxes of owners
/// that are gone and removes their groups, and leaves a live owner's alone.
#[tokio::test]
async fn sandboxes_a_dead_worker_left_running_are_killed_and_a_live_ones_are_not() {
    use std::process::Command;
    let root = Path::new("/sys/fs/cgroup");
    let v2 = root.join("cgroup.controllers").exists();
    let start_time = |pid: u32| -> String {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        stat.rsplit_once(')').expect("comm").1.split_whitespace().nth(19).expect("starttime").to_string()
    };
    // A "worker" that is about to die, with a sandbox (a process in a group of its name).
    let mut worker = Command::new("sleep").arg("600").spawn().expect("worker");
    let group = format!("o{}t{}-test-{}", worker.id(), start_time(worker.id()), Uuid::new_v4().simple());
    let dirs: Vec<PathBuf> = if v2 {
        vec![root.join("understudy").join(&group)]
    } else {
        ["memory", "pids", "cpu"].iter().map(|c| root.join(c).join("understudy").join(&group)).collect()
    };
    for dir in &dirs {
        std::fs::create_dir_all(dir).expect("this machine lets root create cgroups");
    }
    let mut app = Command::new("sleep").arg("600").spawn().expect("app");
    for dir in &dirs {
        std::fs::write(dir.join("cgroup.procs"), app.id().to_string()).expect("move the app into its group");
    }
    // A live worker's sandbox: this test process's own, started the way every worker starts one.
    let tmp = tempfile::tempdir().expect("tmp");
    let live = sandbox(tmp.path(), "live", Limits::default());
    let mut running = live.spawn(&["/bin/sh".into(), "-c".into(), "sleep 600".into()]).expect("spawn");
    assert!(running.limited(), "this machine lets root create cgroups");

    // The owner still lives: nothing is touched.
    understudy_adapters::preview::sandbox::reap_abandoned_sandboxes();
    assert!(app.try_wait().expect("app").is_none(), "a live worker's sandbox was killed");
    worker.kill().expect("kill the worker");
    worker.wait().expect("reap the worker");

    // (A worker starting in another test may sweep it first: what counts is that it is gone.)
    understudy_adapters::preview::sandbox::reap_abandoned_sandboxes();
    let status = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(status) = app.try_wait().expect("app") {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the dead worker's app is killed");
    assert!(!status.success());
    eventually(Duration::from_secs(10), "the dead worker's group to be removed", || async {
        dirs.iter().all(|d| !d.exists()).then_some(())
    })
    .await;
    assert!(running.child.try_wait().expect("live").is_none(), "this process's own sandbox was killed");
    drop(running);
}
