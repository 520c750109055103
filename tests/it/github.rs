//! GitHub end to end: real webhook payloads in (signed), the fake GitHub's REST API out.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_adapters::github::client::{GitHub, GitHubConfig};
use understudy_adapters::github::webhook::sign;
use understudy_api::runtime::GitHubSettings;
use understudy_domain::environment::{EnvironmentCommand, TestOutcome};
use understudy_domain::ids::EnvironmentId;
use understudy_domain::values::{BranchName, Entrypoint, Target};
use understudy_tests::fake_github::{webhook_fixture as fixture, FakeGitHub, APP_ID};
use understudy_tests::fixtures::meta;
use understudy_tests::repos;
use understudy_tests::{eventually, TestEnv};
use uuid::Uuid;

const SECRET: &[u8] = b"it's a secret to everybody";

struct App {
    env: TestEnv,
    github: FakeGitHub,
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
    _tasks: JoinSet<anyhow::Result<()>>,
}

impl App {
    async fn start() -> App {
        Self::start_with(None).await
    }

    /// With `preview`, a worker builds and runs the previews for real.
    async fn start_with(preview: Option<understudy_adapters::preview::PreviewConfig>) -> App {
        let github = FakeGitHub::start().await;
        let mut env = TestEnv::new().await;
        let key = std::fs::read_to_string(format!("{}/fixtures/github-app-test-key.pem", env!("CARGO_MANIFEST_DIR"))).expect("test key");
        let config = GitHubConfig { api_url: github.base_url(), app_id: APP_ID, private_key_pem: key };
        env.runtime.github = GitHubSettings {
            webhook_secret: Some(Arc::from(SECRET.to_vec())),
            app: Some(GitHub::new(&config).expect("GitHub client")),
            public_url: "https://understudy.test".into(),
        };
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        env.runtime.spawn_relay(cancel.clone(), &mut tasks);
        env.runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
        env.runtime.spawn_github(cancel.clone(), &mut tasks);
        if let Some(preview) = preview {
            env.runtime.preview = Arc::new(preview);
            env.runtime.spawn_worker("worker-gh".into(), cancel.clone(), &mut tasks);
        }
        let addr = env.runtime.serve_api("127.0.0.1:0".parse().expect("addr"), cancel.clone(), &mut tasks).await.expect("serve");
        App { env, github, addr, cancel, _tasks: tasks }
    }

    /// Delivers `payload` as GitHub would: signed, with an event name and a delivery id.
    async fn deliver(&self, event: &str, delivery: &str, payload: &Value) -> (u16, Value) {
        let body = serde_json::to_vec(payload).expect("json");
        self.deliver_raw(event, delivery, body.clone(), Some(sign(SECRET, &body))).await
    }

    async fn deliver_raw(&self, event: &str, delivery: &str, body: Vec<u8>, signature: Option<String>) -> (u16, Value) {
        let mut request = reqwest::Client::new()
            .post(format!("http://{}/webhooks/github", self.addr))
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", delivery)
            .header("Content-Type", "application/json")
            .body(body);
        if let Some(signature) = signature {
            request = request.header("X-Hub-Signature-256", signature);
        }
        let response = request.send().await.expect("deliver");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    async fn processed(&self, delivery: &str) -> String {
        eventually(Duration::from_secs(60), "the delivery to be processed", || async {
            let state: Option<String> =
                sqlx::query_scalar("SELECT state FROM webhook_deliveries WHERE delivery_id = $1 AND state <> 'pending'")
                    .bind(delivery)
                    .fetch_optional(self.env.pool())
                    .await
                    .expect("query");
            state
        })
        .await
    }

    async fn events(&self) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM event_log").fetch_one(self.env.pool()).await.expect("count")
    }
}

fn repo_of(payload: &Value) -> (String, u64) {
    (payload["repository"]["full_name"].as_str().expect("full_name").to_string(), payload["repository"]["id"].as_u64().expect("id"))
}

/// Waits until the PR's only comment satisfies `check`; returns its body.
async fn comment_where(app: &App, repo: &str, what: &str, check: impl Fn(&str) -> bool) -> String {
    eventually(Duration::from_secs(30), what, || async {
        let comments = app.github.comments(repo, 2);
        let ours: Vec<_> = comments.iter().filter(|c| c.by_app).collect();
        assert!(ours.len() <= 1, "more than one sticky comment: {ours:#?}");
        ours.first().filter(|c| check(&c.body)).map(|c| c.body.clone())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_gets_one_sticky_comment_that_follows_its_environments() {
    let app = App::start().await;
    // A second writer races the first for every entry (as a second node would).
    let second = understudy_projections::github::OutboxWriter {
        store: app.env.runtime.store.clone(),
        github: app.env.runtime.github.app.clone().expect("configured"),
        public_url: "https://understudy.test".into(),
        debounce: Duration::from_secs(1),
    };
    tokio::spawn(second.run(Arc::new(tokio::sync::Notify::new()), app.cancel.clone()));
    let opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    app.github.set_repo(&repo, repo_id, "main", &["README.md", "main.w", "api.main.w"]);

    // Installing the App makes the repository a project at once.
    let (status, _) = app.deliver("installation", "d-install", &fixture("installation.created")).await;
    assert_eq!(status, 202);
    assert_eq!(app.processed("d-install").await, "done");
    let project_id = understudy_adapters::github::project_id(repo_id);
    let project = app.env.runtime.store.projects.load(project_id.0).await.expect("load").into_inner();
    assert_eq!(project.repository.map(String::from).as_deref(), Some(repo.as_str()));
    assert_eq!(project.production_branch.map(String::from).as_deref(), Some("main"));

    // Opened: one row per entrypoint, building.
    let (status, body) = app.deliver("pull_request", "d-opened", &opened).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("accepted")));
    assert_eq!(app.processed("d-opened").await, "done");
    let body = comment_where(&app, &repo, "a comment with two building rows", |b| b.matches("🔄 Building").count() == 2).await;
    assert!(body.contains("| api.main.w |") && body.contains("| main.w |"), "{body}");

    // The worker (simulated) brings main.w to Ready with tests.
    let head_branch = BranchName::parse(opened["pull_request"]["head"]["ref"].as_str().expect("head ref")).expect("branch");
    let target = Target::PullRequest { number: 2, head_branch };
    let main_w = EnvironmentId::derive(project_id, &target, &Entrypoint::parse("main.w").expect("valid"));
    let store = &app.env.runtime.store.environments;
    let deployment = store.load(main_w.0).await.expect("load").into_inner().current().expect("deployment").id;
    for command in understudy_tests::fixtures::to_ready(deployment) {
        store.execute(main_w.0, command, meta()).await.expect("to ready");
    }
    for (test, outcome) in [("sanity", TestOutcome::Passed), ("e2e", TestOutcome::Failed)] {
        let command = EnvironmentCommand::RecordTestResult {
            deployment_id: deployment,
            test: test.into(),
            outcome,
            duration_ms: None,
            at: chrono::Utc::now(),
        };
        store.execute(main_w.0, command, meta()).await.expect("test");
    }
    let body = comment_where(&app, &repo, "main.w Ready with its tests", |b| b.contains("✅ Ready") && b.contains("❌ [e2e]")).await;
    assert!(body.contains("[Visit Preview](https://understudy.test/dashboard/"), "{body}");

    // Synchronize: the same comment is edited, the new commit builds.
    let synchronize = fixture("pull_request.synchronize");
    assert_eq!(app.deliver("pull_request", "d-sync", &synchronize).await.0, 202);
    assert_eq!(app.processed("d-sync").await, "done");
    comment_where(&app, &repo, "both rows building the new commit", |b| b.matches("🔄 Building").count() == 2).await;

    // Closed: every row says Terminated.
    assert_eq!(app.deliver("pull_request", "d-closed", &fixture("pull_request.closed")).await.0, 202);
    assert_eq!(app.processed("d-closed").await, "done");
    comment_where(&app, &repo, "both rows terminated", |b| b.matches("🛑 Terminated").count() == 2).await;

    // GitHub deployments and check runs: exactly one per environment × commit, each final.
    let first_sha = opened["pull_request"]["head"]["sha"].as_str().expect("sha").to_string();
    let (runs, deployments) = eventually(Duration::from_secs(30), "deployments and check runs to settle", || async {
        let runs = app.github.check_runs();
        let statuses = app.github.deployment_statuses();
        let settled = runs.len() == 4
            && runs.iter().all(|r| r["status"] == "completed")
            && statuses.iter().filter(|s| s["state"] == "inactive").count() >= 4;
        settled.then(|| (runs, app.github.deployments()))
    })
    .await;
    assert_eq!(deployments.len(), 4, "{deployments:#?}");
    let mut environments: Vec<_> = deployments
        .iter()
        .map(|d| format!("{} {}", d["environment"].as_str().unwrap_or(""), &d["sha"].as_str().unwrap_or("")[..7]))
        .collect();
    environments.sort();
    environments.dedup();
    assert_eq!(environments.len(), 4, "one deployment per environment × commit: {environments:?}");
    let main_first =
        runs.iter().find(|r| r["name"] == "Understudy: main.w" && r["head_sha"] == first_sha.as_str()).expect("main.w check run");
    assert_eq!(main_first["conclusion"], "failure", "{main_first:#}");
    assert!(main_first["output"]["summary"].as_str().unwrap_or_default().contains("❌ e2e"), "{main_first:#}");
    let statuses = app.github.deployment_statuses();
    assert!(
        statuses.iter().any(|s| s["state"] == "success" && s["environment_url"].as_str().unwrap_or_default().contains("/dashboard/")),
        "{statuses:#?}"
    );

    assert_eq!(app.github.count("POST", &format!("/repos/{repo}/issues/2/comments")), 1, "the comment was created once");
    assert_eq!(app.github.count("POST", "/app/installations/2311213/access_tokens"), 1, "one installation token, cached");

    // Every read model equals a fresh replay of the log.
    for projection in understudy_projections::all() {
        let report = understudy_projections::replay::verify(app.env.pool(), projection.as_ref()).await.expect("verify");
        assert!(report.differences.is_empty(), "{report:#?}");
    }
    // The pull request's events and its environments' events marked one and the same comment
    // entry, and one status entry per environment.
    let entries: Vec<(String, String)> =
        sqlx::query_as("SELECT kind, key FROM github_outbox ORDER BY kind, key").fetch_all(app.env.pool()).await.expect("outbox");
    let api_w = EnvironmentId::derive(project_id, &target, &Entrypoint::parse("api.main.w").expect("valid"));
    let mut expected = vec![("comment".to_string(), format!("{}:2", project_id.0))];
    let mut statuses: Vec<_> = [main_w, api_w].iter().map(|e| ("status".to_string(), e.0.to_string())).collect();
    statuses.sort();
    expected.extend(statuses);
    assert_eq!(entries, expected);
    // Everything the opened webhook caused, by its delivery's correlation id, and the pull
    // request's state before it was closed.
    let caused =
        understudy_adapters::global_log::caused_by(app.env.pool(), Uuid::new_v5(&Uuid::NAMESPACE_URL, b"d-opened")).await.expect("trace");
    let types: Vec<_> = caused.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types.iter().filter(|t| **t == "EnvironmentCreated").count(), 2, "{types:?}");
    assert!(types.contains(&"PullRequestOpened"), "{types:?}");
    let pr = understudy_domain::ids::PullRequestId::derive(project_id, 2);
    let closed_at = understudy_adapters::global_log::history(app.env.pool(), pr.0)
        .await
        .expect("history")
        .into_iter()
        .find(|e| e.event_type == "PullRequestClosed")
        .expect("closed")
        .recorded_at;
    let before = understudy_projections::time_travel::state_at(app.env.pool(), pr.0, Some(closed_at - chrono::Duration::microseconds(1)))
        .await
        .expect("state")
        .expect("existed");
    assert_eq!(before.state["open"], true);
    let now = understudy_projections::time_travel::state_at(app.env.pool(), pr.0, None).await.expect("state").expect("exists");
    assert_eq!(now.state["open"], false);
    assert!(app.github.count("PATCH", &format!("/repos/{repo}/issues/comments/")) >= 3, "and edited after");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_of_a_wing_app_is_built_tested_and_reported_for_real() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut preview = understudy_adapters::preview::PreviewConfig::new(tmp.path().join("previews"), "preview.localhost".into());
    preview.git_base = repos::git_url(tmp.path());
    preview.wing_toolchain = Some(repos::root().join("toolchain/wing"));
    preview.bridge_bin = understudy_tests::understudy_bin();
    let app = App::start_with(Some(preview)).await;

    // The pull request's head is a real commit of a real (on-disk) repository.
    let mut opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    let sha = repos::push_example(tmp.path(), "wing-failing-test", &repo);
    opened["pull_request"]["head"]["sha"] = Value::String(sha.to_string());
    app.github.set_repo(&repo, repo_id, "main", &["main.w"]);
    app.github.set_root_files_at(&repo, sha.as_str(), &["main.w"]);
    assert_eq!(app.deliver("installation", "d-install", &fixture("installation.created")).await.0, 202);
    assert_eq!(app.processed("d-install").await, "done");
    assert_eq!(app.deliver("pull_request", "d-opened", &opened).await.0, 202);
    assert_eq!(app.processed("d-opened").await, "done");

    // Built, served, tested: the comment shows it all, the check run fails on the red test.
    let body = comment_where(&app, &repo, "main.w Ready with both test results", |b| {
        b.contains("✅ Ready") && b.contains("counter starts at one") && b.contains("arithmetic is broken")
    })
    .await;
    assert!(body.contains("❌ [arithmetic is broken]"), "{body}");
    let run = eventually(Duration::from_secs(30), "the check run to complete", || async {
        app.github.check_runs().into_iter().find(|r| r["head_sha"] == sha.as_str() && r["status"] == "completed")
    })
    .await;
    assert_eq!(run["conclusion"], "failure", "{run:#}");
    // The worker's events share the webhook's correlation: one trace from delivery to results.
    let caused =
        understudy_adapters::global_log::caused_by(app.env.pool(), Uuid::new_v5(&Uuid::NAMESPACE_URL, b"d-opened")).await.expect("trace");
    let types: Vec<&str> = caused.iter().map(|e| e.event_type.as_str()).collect();
    for worker_event in ["BuildStarted", "DeploymentReady", "TestFailed"] {
        assert!(types.contains(&worker_event), "{worker_event} in the trace: {types:?}");
    }

    // The preview answers through the proxy; closing the pull request tears it down.
    let project = understudy_adapters::github::project_id(repo_id);
    let head_branch = BranchName::parse(opened["pull_request"]["head"]["ref"].as_str().expect("head ref")).expect("branch");
    let environment =
        EnvironmentId::derive(project, &Target::PullRequest { number: 2, head_branch }, &Entrypoint::parse("main.w").expect("valid"));
    let preview = || {
        reqwest::Client::new()
            .get(format!("http://{}/", app.addr))
            .header("host", format!("{}.preview.localhost", environment.0.simple()))
            .send()
    };
    assert_eq!(preview().await.expect("preview").status(), 200);
    let mut closed = fixture("pull_request.closed");
    closed["pull_request"]["head"]["sha"] = Value::String(sha.to_string());
    assert_eq!(app.deliver("pull_request", "d-closed", &closed).await.0, 202);
    comment_where(&app, &repo, "the row terminated", |b| b.contains("🛑 Terminated")).await;
    eventually(Duration::from_secs(30), "the preview to be gone", || async { (preview().await.ok()?.status() == 410).then_some(()) }).await;
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_repository_file_at_the_head_chooses_the_entrypoints() {
    let app = App::start().await;
    let opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    let sha = opened["pull_request"]["head"]["sha"].as_str().expect("sha").to_string();
    app.github.set_repo(&repo, repo_id, "main", &["main.w", "api.main.w", "understudy.toml"]);
    app.github.set_file_at(&repo, &sha, "understudy.toml", "entrypoints = [\"api.main.w\"]\n");
    assert_eq!(app.deliver("installation", "d-install", &fixture("installation.created")).await.0, 202);
    assert_eq!(app.processed("d-install").await, "done");
    assert_eq!(app.deliver("pull_request", "d-opened", &opened).await.0, 202);
    assert_eq!(app.processed("d-opened").await, "done");
    // The delivery is done: every environment it created is in the log.
    let entrypoints: Vec<String> =
        sqlx::query_scalar("SELECT payload->'spec'->>'entrypoint' FROM event_log WHERE event_type = 'EnvironmentCreated' ORDER BY 1")
            .fetch_all(app.env.pool())
            .await
            .expect("read");
    assert_eq!(entrypoints, ["api.main.w"], "the listed entrypoint only, not everything detected");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_deliveries_get_clear_errors_and_append_nothing() {
    let app = App::start().await;
    let opened = fixture("pull_request.opened");
    let body = serde_json::to_vec(&opened).expect("json");
    let before = app.events().await;

    let (status, answer) = app.deliver_raw("pull_request", "d-1", body.clone(), None).await;
    assert_eq!(status, 401, "{answer}");
    let (status, _) = app.deliver_raw("pull_request", "d-2", body.clone(), Some(sign(b"wrong secret", &body))).await;
    assert_eq!(status, 401);
    let mut tampered = body.clone();
    tampered[10] ^= 1;
    let (status, _) = app.deliver_raw("pull_request", "d-3", tampered, Some(sign(SECRET, &body))).await;
    assert_eq!(status, 401);

    let garbage = b"{not json".to_vec();
    let (status, answer) = app.deliver_raw("push", "d-4", garbage.clone(), Some(sign(SECRET, &garbage))).await;
    assert_eq!(status, 400, "{answer}");
    let mut missing = opened.clone();
    missing["pull_request"].as_object_mut().expect("object").remove("head");
    let (status, answer) = app.deliver("pull_request", "d-5", &missing).await;
    assert_eq!(status, 400);
    assert!(answer["error"].as_str().unwrap_or_default().contains("head"), "{answer}");

    let huge = vec![b' '; 26 * 1024 * 1024];
    let (status, _) = app.deliver_raw("push", "d-6", huge.clone(), Some(sign(SECRET, &huge))).await;
    assert_eq!(status, 413);

    // Unknown events are accepted and ignored.
    let (status, answer) = app.deliver("ping", "d-7", &fixture("ping")).await;
    assert_eq!((status, answer["status"].as_str()), (202, Some("ignored")));
    assert_eq!(app.processed("d-7").await, "ignored");
    // A repository that was never installed is ignored, with the reason recorded.
    assert_eq!(app.deliver("pull_request", "d-8", &opened).await.0, 202);
    assert_eq!(app.processed("d-8").await, "ignored");

    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM webhook_deliveries").fetch_one(app.env.pool()).await.expect("count");
    assert_eq!(recorded, 2, "only the two valid deliveries were recorded");
    assert_eq!(app.events().await, before, "nothing was appended");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeliveries_and_late_deliveries_change_nothing() {
    let app = App::start().await;
    let opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    app.github.set_repo(&repo, repo_id, "main", &["main.w"]);
    app.deliver("installation", "i-1", &fixture("installation.created")).await;
    app.processed("i-1").await;

    // The newer state arrives first, the older one after it.
    assert_eq!(app.deliver("pull_request", "s-1", &fixture("pull_request.synchronize")).await.0, 202);
    assert_eq!(app.processed("s-1").await, "done");
    let after_sync = app.events().await;
    assert_eq!(app.deliver("pull_request", "o-1", &opened).await.0, 202);
    assert_eq!(app.processed("o-1").await, "done");
    assert_eq!(app.events().await, after_sync, "a late delivery appends nothing");

    // A redelivery of the same delivery id is answered, not recorded again.
    let (status, answer) = app.deliver("pull_request", "s-1", &fixture("pull_request.synchronize")).await;
    assert_eq!((status, answer["status"].as_str()), (200, Some("duplicate")));
    // Ten concurrent deliveries of one new delivery id: recorded once, the rest are duplicates.
    let synchronize = fixture("pull_request.synchronize");
    let answers = futures::future::join_all((0..10).map(|_| app.deliver("pull_request", "s-burst", &synchronize))).await;
    assert_eq!(answers.iter().filter(|(status, _)| *status == 202).count(), 1, "{answers:?}");
    assert_eq!(answers.iter().filter(|(status, body)| *status == 200 && body["status"] == "duplicate").count(), 9, "{answers:?}");
    assert_eq!(app.processed("s-burst").await, "done");
    // The same content under a new delivery id (GitHub's "redeliver") appends nothing either.
    assert_eq!(app.deliver("pull_request", "s-2", &fixture("pull_request.synchronize")).await.0, 202);
    assert_eq!(app.processed("s-2").await, "done");
    assert_eq!(app.events().await, after_sync);
    let pr = app
        .env
        .runtime
        .store
        .pull_requests
        .load(understudy_domain::ids::PullRequestId::derive(understudy_adapters::github::project_id(repo_id), 2).0);
    let pr = pr.await.expect("load").into_inner();
    assert_eq!(
        pr.head_sha.map(String::from),
        fixture("pull_request.synchronize")["pull_request"]["head"]["sha"].as_str().map(String::from)
    );
    let _ = Uuid::nil();
    app.cancel.cancel();
}

/// Opens PR #2 on an installed repository with one entrypoint; returns the repository's name.
async fn open_pull_request(app: &App) -> String {
    let opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    app.github.set_repo(&repo, repo_id, "main", &["main.w"]);
    app.deliver("installation", "f-install", &fixture("installation.created")).await;
    assert_eq!(app.processed("f-install").await, "done");
    assert_eq!(app.deliver("pull_request", "f-opened", &opened).await.0, 202);
    assert_eq!(app.processed("f-opened").await, "done");
    repo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_comment_converges_through_github_failures_and_is_never_duplicated() {
    let app = App::start().await;
    let opened = fixture("pull_request.opened");
    let (repo, _) = repo_of(&opened);
    // GitHub fails the first comment calls: 502 twice, then a rate limit with retry-after.
    app.github.fail_next("GET", &format!("/repos/{repo}/issues/2/comments"), 502, None, 2);
    app.github.fail_next("POST", &format!("/repos/{repo}/issues/2/comments"), 429, Some(1), 1);
    // Someone pastes our marker into a comment of their own: it must not be taken for ours.
    let project_id = understudy_adapters::github::project_id(repo_of(&opened).1);
    let marker = understudy_domain::pr_comment::marker(project_id, 2);
    app.github.add_user_comment(&repo, 2, "mallory", &format!("{marker}\nnot yours"));
    let repo = open_pull_request(&app).await;
    comment_where(&app, &repo, "the comment despite failures", |b| b.contains("| main.w |")).await;
    assert_eq!(app.github.comments(&repo, 2).iter().find(|c| c.login == "mallory").map(|c| c.body.contains("not yours")), Some(true));
    // The failures really happened: two failed lists, then one that found no comment of ours,
    // and a rate-limited create that was tried again after the wait.
    assert!(app.github.count("GET", &format!("/repos/{repo}/issues/2/comments")) >= 3);
    assert_eq!(app.github.count("POST", &format!("/repos/{repo}/issues/2/comments")), 2);

    // A user deletes our comment: the next change makes it again, still only one of ours.
    let ours = app.github.comments(&repo, 2).into_iter().find(|c| c.by_app).expect("ours");
    app.github.delete_comment(ours.id);
    let head_branch = BranchName::parse(opened["pull_request"]["head"]["ref"].as_str().expect("head ref")).expect("branch");
    let main_w =
        EnvironmentId::derive(project_id, &Target::PullRequest { number: 2, head_branch }, &Entrypoint::parse("main.w").expect("valid"));
    let store = &app.env.runtime.store.environments;
    let deployment = store.load(main_w.0).await.expect("load").into_inner().current().expect("deployment").id;
    for command in understudy_tests::fixtures::to_ready(deployment) {
        store.execute(main_w.0, command, meta()).await.expect("to ready");
    }
    let again = comment_where(&app, &repo, "the comment made again", |b| b.contains("✅ Ready")).await;
    assert!(again.contains("| main.w |"), "{again}");
    let ours_now = app.github.comments(&repo, 2).into_iter().filter(|c| c.by_app).count();
    assert_eq!(ours_now, 1);
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_the_production_branch_deploy_it_and_uninstalling_deactivates() {
    let app = App::start().await;
    let push = fixture("push");
    let (repo, repo_id) = repo_of(&push);
    let branch = push["ref"].as_str().expect("ref").trim_start_matches("refs/heads/").to_string();
    app.github.set_repo(&repo, repo_id, &branch, &["main.w", "admin.main.w"]);
    app.deliver("installation", "p-install", &fixture("installation.created")).await;
    assert_eq!(app.processed("p-install").await, "done");
    assert_eq!(app.deliver("push", "p-push", &push).await.0, 202);
    assert_eq!(app.processed("p-push").await, "done");
    let project_id = understudy_adapters::github::project_id(repo_id);
    let target = Target::Branch { branch: BranchName::parse(branch.as_str()).expect("branch") };
    for entrypoint in ["main.w", "admin.main.w"] {
        let id = EnvironmentId::derive(project_id, &target, &Entrypoint::parse(entrypoint).expect("valid"));
        let state = app.env.runtime.store.environments.load(id.0).await.expect("load").into_inner();
        assert_eq!(state.current().map(|d| d.commit.to_string()), push["after"].as_str().map(String::from), "{entrypoint}");
    }
    // Uninstalling deactivates the project; its history stays.
    assert_eq!(app.deliver("installation", "p-uninstall", &fixture("installation.deleted")).await.0, 202);
    assert_eq!(app.processed("p-uninstall").await, "done");
    let project = app.env.runtime.store.projects.load(project_id.0).await.expect("load").into_inner();
    assert!(!project.active);
    // Pushes to a deactivated project are ignored.
    let mut later = push.clone();
    later["after"] = "f".repeat(40).into();
    assert_eq!(app.deliver("push", "p-push-2", &later).await.0, 202);
    assert_eq!(app.processed("p-push-2").await, "ignored");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_to_a_tiers_branches_deploy_them_unless_the_tier_is_frozen_and_deleting_one_tears_it_down() {
    use understudy_domain::project::ProjectCommand;
    use understudy_domain::values::TierName;

    let app = App::start().await;
    let push = fixture("push");
    let (repo, repo_id) = repo_of(&push);
    let production = push["ref"].as_str().expect("ref").trim_start_matches("refs/heads/").to_string();
    app.github.set_repo(&repo, repo_id, &production, &["main.w"]);
    app.deliver("installation", "t-install", &fixture("installation.created")).await;
    assert_eq!(app.processed("t-install").await, "done");
    let project = understudy_adapters::github::project_id(repo_id);
    let store = &app.env.runtime.store;
    let dev = TierName::parse("dev").expect("tier");

    // The production branch's repository file declares the dev tier, read through the
    // contents API when the production branch is pushed.
    let head = push["after"].as_str().expect("after");
    app.github.set_root_files_at(&repo, head, &["main.w", "understudy.toml"]);
    app.github.set_file_at(&repo, head, "understudy.toml", "[tiers.dev]\nbranches = \"dev-*\"\nenv = { CACHE = \"off\" }\n");
    assert_eq!(app.deliver("push", "t-production", &push).await.0, 202);
    assert_eq!(app.processed("t-production").await, "done");
    let state = store.projects.load(project.0).await.expect("load").into_inner();
    assert!(state.tiers.get(&dev).is_some_and(|t| t.spec.from_file && t.spec.env["CACHE"] == "off"), "{:?}", state.tiers);

    // The real push payload, to other branches and commits.
    let to = |branch: &str, after: char, deleted: bool| {
        let mut p = push.clone();
        p["ref"] = json!(format!("refs/heads/{branch}"));
        p["after"] = json!(after.to_string().repeat(40));
        p["deleted"] = json!(deleted);
        p
    };
    let environment = |branch: &str| {
        EnvironmentId::derive(
            project,
            &Target::Branch { branch: BranchName::parse(branch).expect("branch") },
            &Entrypoint::parse("main.w").expect("valid"),
        )
    };
    let commit_of = |branch: &'static str| async move {
        let state = store.environments.load(environment(branch).0).await.expect("load").into_inner();
        (state.current().map(|d| d.commit.to_string()), state.terminated)
    };
    assert_eq!(app.deliver("push", "t-feature", &to("feature-x", 'a', false)).await.0, 202);
    assert_eq!(app.processed("t-feature").await, "ignored", "no tier has feature-x, and pull requests cover it");
    assert_eq!(app.deliver("push", "t-dev-1", &to("dev-alice", 'a', false)).await.0, 202);
    assert_eq!(app.processed("t-dev-1").await, "done");
    assert_eq!(commit_of("dev-alice").await, (Some("a".repeat(40)), false));

    // Frozen: the push is acknowledged and not deployed; thawed, the next one is.
    let freeze = ProjectCommand::FreezeTier { name: dev.clone(), by: "alice".into(), reason: "demo day".into(), at: chrono::Utc::now() };
    store.projects.execute(project.0, freeze, meta()).await.expect("freeze");
    assert_eq!(app.deliver("push", "t-dev-2", &to("dev-alice", 'b', false)).await.0, 202);
    assert_eq!(app.processed("t-dev-2").await, "ignored");
    let outcome: String = sqlx::query_scalar("SELECT outcome FROM webhook_deliveries WHERE delivery_id = 't-dev-2'")
        .fetch_one(app.env.pool())
        .await
        .expect("outcome");
    assert!(outcome.contains("tier dev is frozen"), "{outcome}");
    assert_eq!(commit_of("dev-alice").await, (Some("a".repeat(40)), false));
    let thaw = ProjectCommand::UnfreezeTier { name: dev, by: "alice".into(), at: chrono::Utc::now() };
    store.projects.execute(project.0, thaw, meta()).await.expect("thaw");
    assert_eq!(app.deliver("push", "t-dev-3", &to("dev-alice", 'c', false)).await.0, 202);
    assert_eq!(app.processed("t-dev-3").await, "done");
    assert_eq!(commit_of("dev-alice").await, (Some("c".repeat(40)), false));

    // A release tier takes tags: an annotated tag's push names the tag object in `after` and
    // the commit in `head_commit`; the commit is what deploys.
    store
        .projects
        .execute(
            project.0,
            ProjectCommand::SetTier {
                tier: understudy_domain::tier::TierSpec {
                    name: TierName::parse("release").expect("tier"),
                    source: understudy_domain::tier::TierSource::Tags {
                        pattern: understudy_domain::values::BranchPattern::parse("v*").expect("pattern"),
                    },
                    env: Default::default(),
                    smoke: None,
                    jobs: vec![],
                    push_to: None,
                    from_file: false,
                },
                at: chrono::Utc::now(),
            },
            meta(),
        )
        .await
        .expect("release tier");
    let mut tag = to("unused", 'd', false);
    tag["ref"] = json!("refs/tags/v1.2.0");
    tag["head_commit"] = json!({ "id": "e".repeat(40) });
    assert_eq!(app.deliver("push", "t-tag", &tag).await.0, 202);
    assert_eq!(app.processed("t-tag").await, "done");
    let release = EnvironmentId::derive(
        project,
        &Target::Tier { tier: TierName::parse("release").expect("tier") },
        &Entrypoint::parse("main.w").expect("valid"),
    );
    let state = store.environments.load(release.0).await.expect("load").into_inner();
    assert_eq!(state.current().map(|d| d.commit.to_string()), Some("e".repeat(40)), "the tagged commit, not the tag object");
    tag["ref"] = json!("refs/tags/nightly");
    assert_eq!(app.deliver("push", "t-tag-2", &tag).await.0, 202);
    assert_eq!(app.processed("t-tag-2").await, "ignored", "no tier takes it");

    // Deleting the branch tears its environment down.
    eventually(Duration::from_secs(20), "the environment in the read model", || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM environments WHERE environment_id = $1")
            .bind(environment("dev-alice").0)
            .fetch_one(app.env.pool())
            .await
            .ok()
            .filter(|n| *n == 1)
    })
    .await;
    assert_eq!(app.deliver("push", "t-dev-4", &to("dev-alice", '0', true)).await.0, 202);
    assert_eq!(app.processed("t-dev-4").await, "done");
    assert!(commit_of("dev-alice").await.1, "terminated");
    app.cancel.cancel();
}

/// Waits until the fake GitHub has received, after its first `seen` requests, one whose path
/// `matches`: with a delay set, that call is now in flight.
async fn call_in_flight(app: &App, seen: usize, what: &str, matches: impl Fn(&str) -> bool) {
    eventually(Duration::from_secs(30), what, || async { app.github.requests().iter().skip(seen).any(|r| matches(&r.path)).then_some(()) })
        .await
}

/// Appends an event of an unrelated environment and waits for the sequencer to number it,
/// within half of `slow`: long before a call to GitHub that takes `slow` can have answered.
async fn numbered_while_github_answers(app: &App, slow: Duration) {
    use understudy_domain::ids::{DeploymentId, ProjectId};
    use understudy_tests::fixtures;
    let spec = fixtures::spec(ProjectId(Uuid::new_v4()), 1, "main.w");
    let id = fixtures::env_id(&spec).0;
    let store = &app.env.runtime.store.environments;
    store.execute(id, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("append");
    eventually(slow / 2, "the event to be numbered while a call to GitHub is in flight", || async {
        let unnumbered: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE aggregate_id = $1 AND position IS NULL")
            .bind(id)
            .fetch_one(app.env.pool())
            .await
            .expect("count");
        (unnumbered == 0).then_some(())
    })
    .await
}

/// A call to GitHub may take seconds, up to the client's timeout. Neither webhook processing nor
/// the outbox writer may hold the event log back while one is in flight: every event appended
/// meanwhile, anywhere on the cluster, is numbered and reaches the projectors at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_github_holds_no_event_back() {
    const SLOW: Duration = Duration::from_secs(6);
    let app = App::start().await;
    let repo = open_pull_request(&app).await;
    comment_where(&app, &repo, "the first comment", |b| b.contains("| main.w |")).await;
    app.github.set_delay(SLOW);

    // Processing a push to the pull request reads the files at the new head from GitHub.
    let seen = app.github.requests().len();
    assert_eq!(app.deliver("pull_request", "slow-sync", &fixture("pull_request.synchronize")).await.0, 202);
    call_in_flight(&app, seen, "webhook processing to read the new head", |path| path.contains("/contents")).await;
    numbered_while_github_answers(&app, SLOW).await;

    // The new head's deployment changes the comment: the outbox writer waits on GitHub too.
    assert_eq!(app.processed("slow-sync").await, "done");
    let read_head = app.github.requests().iter().rposition(|r| r.path.contains("/contents")).expect("the head was read");
    let writes = |path: &str| path.contains("/comments") || path.contains("/deployments") || path.contains("/check-runs");
    call_in_flight(&app, read_head + 1, "the outbox writer to call GitHub", writes).await;
    numbered_while_github_answers(&app, SLOW).await;
    app.cancel.cancel();
}

/// Four webhook workers and four GitHub writers at once, as four processes would run them: each
/// delivery is processed once, and each pull request gets one comment, made by one POST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_workers_process_each_delivery_once_and_write_each_comment_once() {
    const PULL_REQUESTS: u64 = 12;
    let mut app = App::start().await;
    for _ in 0..3 {
        app.env.runtime.spawn_github(app.cancel.clone(), &mut app._tasks);
    }
    // Slow enough answers that the workers overlap.
    app.github.set_delay(Duration::from_millis(30));
    let opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    app.github.set_repo(&repo, repo_id, "main", &["main.w"]);
    app.deliver("installation", "r-install", &fixture("installation.created")).await;
    assert_eq!(app.processed("r-install").await, "done");
    let deliveries: Vec<String> = (1..=PULL_REQUESTS).map(|n| format!("r-opened-{n}")).collect();
    for (n, delivery) in (1..=PULL_REQUESTS).zip(&deliveries) {
        let mut payload = opened.clone();
        payload["number"] = json!(n);
        payload["pull_request"]["number"] = json!(n);
        payload["pull_request"]["head"]["ref"] = json!(format!("feature-{n}"));
        assert_eq!(app.deliver("pull_request", delivery, &payload).await.0, 202);
    }
    for delivery in &deliveries {
        assert_eq!(app.processed(delivery).await, "done");
    }
    let attempts: Vec<i32> = sqlx::query_scalar("SELECT attempts FROM webhook_deliveries WHERE delivery_id LIKE 'r-opened-%'")
        .fetch_all(app.env.pool())
        .await
        .expect("attempts");
    assert_eq!(attempts, vec![1; PULL_REQUESTS as usize], "each delivery processed once");
    for n in 1..=PULL_REQUESTS {
        eventually(Duration::from_secs(30), &format!("pull request {n}'s comment"), || async {
            let ours = app.github.comments(&repo, n).into_iter().filter(|c| c.by_app).count();
            assert!(ours <= 1, "pull request {n} has {ours} comments of ours");
            (ours == 1).then_some(())
        })
        .await;
        assert_eq!(app.github.count("POST", &format!("/repos/{repo}/issues/{n}/comments")), 1, "one POST for pull request {n}");
    }
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_keeps_failing_is_recorded_in_the_project_history() {
    let app = App::start().await;
    let opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    // Every comment call is refused (a permission missing from the App): retrying will not help.
    app.github.fail_next("GET", &format!("/repos/{repo}/issues/2/comments"), 403, None, 1000);
    open_pull_request(&app).await;
    let project = understudy_adapters::github::project_id(repo_id);
    let events = eventually(Duration::from_secs(60), "the failure to be recorded", || async {
        let history = understudy_adapters::global_log::history(app.env.pool(), project.0).await.expect("history");
        history.iter().any(|e| e.event_type == "GitHubWriteFailing").then_some(history)
    })
    .await;
    let failing = events.iter().find(|e| e.event_type == "GitHubWriteFailing").expect("recorded");
    assert!(failing.payload["error"].as_str().unwrap_or_default().contains("403"), "{}", failing.payload);
    assert_eq!(failing.actor, "system:github-writer");
    assert!(app.github.comments(&repo, 2).is_empty());
    app.cancel.cancel();
}

/// A lookup that stopped at the first page would take an older deployment or check run of ours
/// for missing, and a retried write would then create a second one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_read_every_page_so_a_retried_write_finds_what_it_made() {
    let github = FakeGitHub::start().await;
    let (repo, sha) = ("octo-org/many-deploys", "a".repeat(40));
    github.set_repo(repo, 4242, "main", &["main.w"]);
    let key = std::fs::read_to_string(format!("{}/fixtures/github-app-test-key.pem", env!("CARGO_MANIFEST_DIR"))).expect("test key");
    let client = GitHub::new(&GitHubConfig { api_url: github.base_url(), app_id: APP_ID, private_key_pem: key }).expect("client");
    let installation = 7;
    // 150 deployments of one commit to one environment (a commit rebuilt many times); the fake,
    // as GitHub, lists them newest first, 100 a page, so the first is on page two.
    let mut deployments = Vec::new();
    for n in 0..150 {
        let made = client.create_deployment(installation, repo, &sha, "preview/main.w", &format!("ours-{n}"), false).await.expect("create");
        deployments.push(made);
    }
    for n in [0, 75, 149] {
        let found = client.find_deployment(installation, repo, &sha, "preview/main.w", &format!("ours-{n}")).await.expect("find");
        assert_eq!(found, Some(deployments[n]), "deployment ours-{n}");
    }
    assert_eq!(client.find_deployment(installation, repo, &sha, "preview/main.w", "never-made").await.expect("find"), None);
    let listed = github.count("GET", &format!("/repos/{repo}/deployments"));
    assert_eq!(listed, 2 + 1 + 1 + 2, "ours-0 and a missing one read both pages, the others only the first");

    let mut runs = Vec::new();
    for n in 0..150 {
        let body = json!({ "name": "Understudy: main.w", "head_sha": sha, "external_id": format!("ours-{n}") });
        runs.push(client.create_check_run(installation, repo, &body).await.expect("create"));
    }
    for n in [0, 149] {
        let found = client.find_check_run(installation, repo, &sha, "Understudy: main.w", &format!("ours-{n}")).await.expect("find");
        assert_eq!(found, Some(runs[n]), "check run ours-{n}");
    }
    assert_eq!(client.find_check_run(installation, repo, &sha, "Understudy: main.w", "never-made").await.expect("find"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_can_create_a_project_explicitly() {
    let app = App::start().await;
    let (repo, repo_id) = repo_of(&fixture("pull_request.opened"));
    app.github.set_repo(&repo, repo_id, "main", &["main.w"]);
    let key = format!("{}/fixtures/github-app-test-key.pem", env!("CARGO_MANIFEST_DIR"));
    let run = |args: &[&str]| {
        std::process::Command::new(understudy_tests::understudy_bin())
            .args(args)
            .env("DATABASE_URL", &app.env.database_url)
            .env("NATS_URL", understudy_tests::nats_url())
            .env("UNDERSTUDY_NATS_PREFIX", &app.env.prefix)
            .env("GITHUB_APP_ID", APP_ID.to_string())
            .env("GITHUB_APP_PRIVATE_KEY", &key)
            .env("GITHUB_API_URL", app.github.base_url())
            .output()
            .expect("run")
    };
    let created = run(&["project", "create", "--repo", &repo, "--installation", "2311213", "--branch", "develop"]);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let project = app.env.runtime.store.projects.load(understudy_adapters::github::project_id(repo_id).0).await.expect("load").into_inner();
    assert_eq!(project.production_branch.map(String::from).as_deref(), Some("develop"));
    assert!(project.active);
    // A repository the installation cannot see is a clear error, and nothing is created.
    let missing = run(&["project", "create", "--repo", "octo/nowhere", "--installation", "2311213"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("octo/nowhere does not exist or installation 2311213 cannot see it"));
    app.cancel.cancel();
}

/// Spans received by a minimal OTLP/HTTP JSON collector: (trace id, name).
type Spans = Arc<std::sync::Mutex<Vec<(String, String)>>>;

async fn otlp_collector() -> (std::net::SocketAddr, Spans) {
    use axum::routing::post;
    let spans: Spans = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let mut sink = sink.lock().expect("spans");
                for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                    for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                        for span in scope["spans"].as_array().into_iter().flatten() {
                            sink.push((
                                span["traceId"].as_str().unwrap_or("").to_string(),
                                span["name"].as_str().unwrap_or("").to_string(),
                            ));
                        }
                    }
                }
                axum::Json(serde_json::json!({}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, spans)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_follows_a_webhook_to_the_github_write() {
    let (collector, spans) = otlp_collector().await;
    std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{collector}"));
    std::env::set_var("OTEL_BSP_SCHEDULE_DELAY", "100");
    std::env::set_var("OTEL_SERVICE_NAME", "understudy-test");
    let telemetry = tokio::task::spawn_blocking(|| understudy_api::telemetry::init("warn")).await.expect("join").expect("telemetry");
    std::mem::forget(telemetry); // flushed by the schedule delay; shutting it down here would block the runtime
    let app = App::start().await;
    open_pull_request(&app).await;
    let expected =
        ["webhook.receive", "webhook.process", "command.append", "relay.publish", "projector.apply", "github.write", "github.call"];
    let names = eventually(Duration::from_secs(30), "one trace from the opened webhook to the GitHub write", || async {
        let spans = spans.lock().expect("spans").clone();
        // The trace of the pull request's webhook is the one whose receive span led to a GitHub write.
        let traces: std::collections::HashSet<&String> =
            spans.iter().filter(|(_, name)| name == "github.write").map(|(trace, _)| trace).collect();
        traces.into_iter().find_map(|trace| {
            let names: std::collections::HashSet<String> = spans.iter().filter(|(t, _)| t == trace).map(|(_, n)| n.clone()).collect();
            expected.iter().all(|e| names.contains(*e)).then_some(names)
        })
    })
    .await;
    assert!(names.len() >= expected.len(), "{names:?}");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_request_from_a_fork_waits_for_a_maintainers_approval() {
    let app = App::start().await;
    let mut opened = fixture("pull_request.opened");
    let (repo, repo_id) = repo_of(&opened);
    // The head lives in someone else's copy of the repository.
    opened["pull_request"]["head"]["repo"]["id"] = json!(repo_id + 77);
    opened["pull_request"]["head"]["repo"]["full_name"] = json!("stranger/fork");
    app.github.set_repo(&repo, repo_id, "main", &["main.w"]);
    assert_eq!(app.deliver("installation", "f-install", &fixture("installation.created")).await.0, 202);
    assert_eq!(app.processed("f-install").await, "done");
    assert_eq!(app.deliver("pull_request", "f-opened", &opened).await.0, 202);
    assert_eq!(app.processed("f-opened").await, "done");
    let body = comment_where(&app, &repo, "the row awaiting approval", |b| b.contains("🔒 Awaiting approval")).await;
    assert!(body.contains("built only after a maintainer approves the commit"), "{body}");

    // Nothing builds it: it is not Requested, so no worker claims it.
    let project_id = understudy_adapters::github::project_id(repo_id);
    let head_branch = BranchName::parse(opened["pull_request"]["head"]["ref"].as_str().expect("head ref")).expect("branch");
    let environment =
        EnvironmentId::derive(project_id, &Target::PullRequest { number: 2, head_branch }, &Entrypoint::parse("main.w").expect("valid"));
    let store = &app.env.runtime.store.environments;
    let deployment = store.load(environment.0).await.expect("load").into_inner().current().expect("deployment").id;
    let refused =
        store.execute(environment.0, EnvironmentCommand::StartBuild { deployment_id: deployment, at: chrono::Utc::now() }, meta()).await;
    assert!(refused.is_err(), "a build started without approval");

    // The operator of this open node approves it over GraphQL: it is an event, and it builds.
    let approve = json!({
        "query": "mutation($d: UUID!) { approveDeployment(deploymentId: $d) { status environmentId } }",
        "variables": { "d": deployment.to_string() }
    });
    let response = reqwest::Client::new().post(format!("http://{}/graphql", app.addr)).json(&approve).send().await.expect("post");
    let answer: Value = response.json().await.expect("json");
    assert_eq!(answer["data"]["approveDeployment"]["status"], "Requested", "{answer}");
    assert_eq!(answer["data"]["approveDeployment"]["environmentId"], environment.to_string());
    let approved: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE event_type = 'DeploymentApproved' AND actor = 'operator:open'")
            .fetch_one(app.env.pool())
            .await
            .expect("count");
    assert_eq!(approved, 1);
    comment_where(&app, &repo, "the row building once approved", |b| b.contains("🔄 Building") && !b.contains("Awaiting approval")).await;
}
