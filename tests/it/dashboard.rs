//! The dashboard in a real browser: headless Chromium (Debian's), driven by playwright-core from
//! `tests/js/dashboard.mjs`, signs in through the fake GitHub and watches a deployment go live.
//! This side plays the worker: at each step the script announces, it records the events (and
//! log lines) a worker would, then lets the script go on. Screenshots of the main pages land in
//! `target/dashboard-screenshots/`.

use std::process::Stdio;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use understudy_adapters::preview::logs::{LogSink, Redactor};
use understudy_domain::environment::{EnvironmentCommand, TestOutcome};
use understudy_domain::ids::{DeploymentId, EnvironmentId, ProjectId};
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, Target};
use understudy_tests::fixtures::meta;

use crate::auth::{start, App, REPO};

struct Worker<'a> {
    app: &'a App,
    project: ProjectId,
    logs: LogSink,
}

impl Worker<'_> {
    fn environment(&self, branch: &str) -> EnvironmentId {
        let target = Target::Branch { branch: BranchName::parse(branch).expect("branch") };
        EnvironmentId::derive(self.project, &target, &Entrypoint::parse("main.w").expect("entrypoint"))
    }

    async fn push(&self, branch: &str, sha: &CommitSha) -> DeploymentId {
        let target = Target::Branch { branch: BranchName::parse(branch).expect("branch") };
        let store = &self.app.env.runtime.store;
        store.deploy_commit(self.project, &target, &Entrypoint::parse("main.w").expect("e"), sha, &meta()).await.expect("deploy");
        store.environments.load(self.environment(branch).0).await.expect("load").into_inner().current().expect("deployment").id
    }

    async fn run(&self, branch: &str, command: EnvironmentCommand) {
        self.app.env.runtime.store.environments.execute(self.environment(branch).0, command, meta()).await.expect("command");
    }

    fn log(&self, deployment: DeploymentId, stream: &str, line: &str) {
        self.logs.stream(deployment.0, stream, Redactor::default()).line(line);
    }

    async fn build(&self, branch: &str, deployment: DeploymentId, line: &str) {
        self.run(branch, EnvironmentCommand::StartBuild { deployment_id: deployment, at: chrono::Utc::now() }).await;
        self.log(deployment, "build", line);
    }

    async fn ready(&self, branch: &str, deployment: DeploymentId) {
        self.run(branch, EnvironmentCommand::CompleteBuild { deployment_id: deployment, at: chrono::Utc::now() }).await;
        self.log(deployment, "build", "listening on 3000");
        let url = format!("http://{}.preview.test/", self.environment(branch).0.simple());
        self.run(branch, EnvironmentCommand::MarkReady { deployment_id: deployment, url, at: chrono::Utc::now() }).await;
        self.log(deployment, "test:renders the greeting", "greeting ok");
        let test = EnvironmentCommand::RecordTestResult {
            deployment_id: deployment,
            test: "renders the greeting".into(),
            outcome: TestOutcome::Passed,
            duration_ms: Some(42),
            at: chrono::Utc::now(),
        };
        self.run(branch, test).await;
        self.run(branch, EnvironmentCommand::CompleteTests { deployment_id: deployment, at: chrono::Utc::now() }).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_person_signs_in_and_watches_a_deployment_go_live_in_the_dashboard() {
    let app = start().await;
    app.github.add_person("ada", 1201, Some("Ada Lovelace"));
    app.github.grant("ada", REPO);
    let (_, project) = app.team_with_project(1201).await;
    let worker = Worker {
        app: &app,
        project,
        logs: LogSink::spawn(app.env.pool().clone(), app.env.runtime.nats.clone(), app.env.runtime.topology.clone()),
    };
    // Staging on main, production promoted from it by hand.
    for tier in
        [json!({ "name": "staging", "branches": "main" }), json!({ "name": "production", "promotedFrom": "staging", "automatic": false })]
    {
        let spec = understudy_domain::tier::TierSpec {
            name: understudy_domain::values::TierName::parse(tier["name"].as_str().expect("name")).expect("tier"),
            source: match tier["branches"].as_str() {
                Some(pattern) => understudy_domain::tier::TierSource::Branches {
                    pattern: understudy_domain::values::BranchPattern::parse(pattern).expect("pattern"),
                },
                None => understudy_domain::tier::TierSource::Promotion {
                    from: understudy_domain::values::TierName::parse("staging").expect("tier"),
                    automatic: false,
                },
            },
            env: Default::default(),
            smoke: None,
            jobs: vec![],
            push_to: None,
            from_file: false,
        };
        let command = understudy_domain::project::ProjectCommand::SetTier { tier: spec, at: chrono::Utc::now() };
        app.env.runtime.store.projects.execute(project.0, command, meta()).await.expect("tier");
    }
    // Production is already live.
    let production = worker.push("main", &CommitSha::parse("1".repeat(40)).expect("sha")).await;
    worker.build("main", production, "compiling main.w").await;
    worker.ready("main", production).await;

    let shots = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/dashboard-screenshots");
    std::fs::create_dir_all(&shots).expect("screenshot dir");
    let (first, newer) = (CommitSha::parse("a".repeat(40)).expect("sha"), CommitSha::parse("b".repeat(40)).expect("sha"));
    let context = json!({
        "login": "ada", "account": "acme", "project": "web", "branch": "feature",
        "first": first.to_string(), "newer": newer.to_string(), "secret": format!("canary-{}", uuid::Uuid::new_v4().simple()),
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("js/dashboard.mjs");
    let mut child = tokio::process::Command::new("node")
        .arg(&script)
        .arg(app.url(""))
        .arg(&shots)
        .arg(context.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node (scripts/setup installs the test clients)");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut out = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut stderr = child.stderr.take().expect("stderr");
    let mut deployment = None;
    let mut done = false;
    let driven = tokio::time::timeout(Duration::from_secs(240), async {
        while let Some(line) = out.next_line().await.expect("read") {
            println!("browser: {line}");
            match line.strip_prefix("STEP ") {
                Some("push") => deployment = Some(worker.push("feature", &first).await),
                Some("build") => worker.build("feature", deployment.expect("pushed"), "compiling main.w").await,
                Some("ready") => worker.ready("feature", deployment.expect("pushed")).await,
                Some("newer") => {
                    let second = worker.push("feature", &newer).await;
                    worker.build("feature", second, "second build").await;
                    worker.ready("feature", second).await;
                }
                Some(other) => panic!("unknown step {other}"),
                None => {
                    done |= line == "DONE";
                    continue;
                }
            }
            stdin.write_all(b"go\n").await.expect("answer the script");
        }
    })
    .await;
    if driven.is_err() {
        let _ = child.kill().await;
    }
    let status = child.wait().await.expect("wait");
    let mut errors = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut errors).await.expect("stderr");
    assert!(driven.is_ok(), "the browser test took more than 240 s:\n{errors}");
    assert!(status.success() && done, "the browser test failed:\n{errors}");
    for page in [
        "sign-in",
        "overview",
        "project",
        "environment-building",
        "environment-refresh-notice",
        "build-log",
        "settings",
        "tiers",
        "account",
        "new-project",
    ] {
        assert!(shots.join(format!("{page}.png")).exists(), "no screenshot of {page}");
    }
    println!("screenshots: {}", shots.display());
    // The secret set through the form is sealed: its value is nowhere in the database.
    let secret = context["secret"].as_str().expect("secret");
    let leaked: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE payload::text LIKE '%' || $1 || '%'")
        .bind(secret)
        .fetch_one(app.env.pool())
        .await
        .expect("scan");
    assert_eq!(leaked, 0);
    let set: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE event_type = 'SecretSet'").fetch_one(app.env.pool()).await.expect("count");
    assert_eq!(set, 1, "the form set the secret");
}
