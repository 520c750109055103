//! Tiers end to end, on a repository on disk: each tier's branches deploy with the tier's
//! variables, only commits that passed staging reach production (automatically, or by a
//! person's `promote`), production serves its old deployment until the new one is Ready, a
//! rollback stays rolled back, and a freeze holds until it is lifted.

use std::time::Duration;

use serde_json::{json, Value};
use understudy_adapters::preview::local_git;
use understudy_domain::ids::EnvironmentId;
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, Target, TierName};
use understudy_tests::eventually;
use understudy_tests::repos;

use crate::preview::Previews;

/// An app that says which tier it runs in, its `CACHE` variable and its version.
fn server(version: &str) -> String {
    format!(
        r#"const http = require("http");
http.createServer((req, res) => {{
  res.writeHead(200, {{ "content-type": "text/plain" }});
  res.end(`${{process.env.UNDERSTUDY_TIER || "-"}}:${{process.env.CACHE || "-"}}:{version}\n`);
}}).listen(Number(process.env.PORT), "127.0.0.1");
"#
    )
}
const PASSING: &str = "console.log('all good');\n";
const FAILING: &str = "console.error('a real failure'); process.exit(1);\n";

impl Previews {
    async fn graphql(&self, query: &str, variables: Value) -> Value {
        let body = json!({ "query": query, "variables": variables });
        let response = self.http.post(format!("http://{}/graphql", self.addr)).json(&body).send().await.expect("post");
        response.json().await.expect("a JSON answer")
    }

    /// What the environment's preview answers, if it answers 200.
    async fn body(&self, environment: EnvironmentId) -> Option<String> {
        let response = self.preview(environment, "/").send().await.ok()?;
        if response.status() != 200 {
            return None;
        }
        response.text().await.ok()
    }

    /// Waits until the environment's current deployment of `commit` is Ready with its tests
    /// completed; whether they all passed.
    async fn tested_at(&self, environment: EnvironmentId, commit: &CommitSha) -> bool {
        eventually(Duration::from_secs(180), "the deployment's tests to complete", || async {
            let state = self.env.runtime.store.environments.load(environment.0).await.ok()?.into_inner();
            let current = state.current()?;
            assert_ne!(current.status.as_str(), "Failed", "the deployment failed: {:?}", current.failure);
            (current.commit == *commit && current.tests_completed).then(|| current.passed())
        })
        .await
    }

    /// Whether the environment exists in the read model.
    async fn exists(&self, environment: EnvironmentId) -> bool {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM environments WHERE environment_id = $1")
            .bind(environment.0)
            .fetch_one(self.env.pool())
            .await
            .expect("count")
            > 0
    }
}

fn code(answer: &Value) -> &str {
    answer["errors"][0]["extensions"]["code"].as_str().unwrap_or_else(|| panic!("an error was expected: {answer}"))
}

const SET_TIER: &str =
    "mutation($p: UUID!, $t: TierInput!) { setTier(projectId: $p, tier: $t) { name branches promotedFrom automatic env { name value } } }";
const PROMOTE: &str = "mutation($p: UUID!, $t: String!) { promote(projectId: $p, tier: $t) { tier commit requested environments { environmentId deployment { commit promotedFrom } } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tiers_deploy_their_branches_promote_what_passed_roll_back_and_freeze() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/app");
    let v1 = previews.push_change("local/app", &[("server.js", &server("v1")), ("test.js", PASSING)]);
    let bare = previews.tmp.path().join("git/local/app.git");
    let work = previews.tmp.path().join("work/local/app");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add").id.expect("id");
    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    let promoter = previews.env.runtime.promoter();
    let p = json!(project.to_string());
    let branch_env = |b: &str| on_branch(project, b);
    let tier_env = |t: &str| of_tier(project, t);

    // Declaring the tiers: dev per `dev-*` branch, staging on main, production by promotion.
    let dev = json!({ "name": "dev", "branches": "dev-*", "env": [{ "name": "CACHE", "value": "off" }] });
    let staging = json!({ "name": "staging", "branches": "main", "env": [{ "name": "CACHE", "value": "on" }] });
    let production = json!({ "name": "production", "promotedFrom": "staging" });
    for tier in [&dev, &staging, &production] {
        let answer = previews.graphql(SET_TIER, json!({ "p": p, "t": tier })).await;
        assert_eq!(answer["data"]["setTier"]["name"], tier["name"], "{answer}");
    }
    let answer =
        previews.graphql("query($p: UUID!) { project(id: $p) { tiers { name promotedFrom automatic } } }", json!({ "p": p })).await;
    assert_eq!(
        answer["data"]["project"]["tiers"],
        json!([
            { "name": "dev", "promotedFrom": null, "automatic": false },
            { "name": "production", "promotedFrom": "staging", "automatic": true },
            { "name": "staging", "promotedFrom": null, "automatic": false },
        ])
    );
    // Bad declarations are refused with a reason, and change nothing.
    for bad in [
        json!({ "name": "qa", "promotedFrom": "nowhere" }),
        json!({ "name": "qa", "branches": "qa", "promotedFrom": "staging" }),
        json!({ "name": "staging", "promotedFrom": "production" }),
        json!({ "name": "Bad Name", "branches": "x" }),
        json!({ "name": "qa", "branches": "has space" }),
        json!({ "name": "qa", "branches": "qa", "env": [{ "name": "PORT", "value": "1" }] }),
    ] {
        let answer = previews.graphql(SET_TIER, json!({ "p": p, "t": bad })).await;
        assert_eq!(code(&answer), "BAD_USER_INPUT", "{bad}: {answer}");
    }

    // Main deploys staging with staging's variables; its commit passed, so production gets it.
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    assert!(previews.tested_at(branch_env("main"), &v1).await, "v1's tests pass");
    assert_eq!(previews.body(branch_env("main")).await.as_deref(), Some("staging:on:v1\n"));
    // Two schedulers' promoters at once promote it once.
    let other = previews.env.runtime.promoter();
    let (a, b) = tokio::join!(promoter.pass(), other.pass());
    assert_eq!(a.expect("pass") + b.expect("pass"), 1, "v1 is promoted to production, once");
    assert_eq!(promoter.pass().await.expect("pass"), 0, "and only once");
    let production_env = tier_env("production");
    assert_eq!(previews.settled(production_env, &["Ready", "Failed"]).await.0, "Ready");
    assert_eq!(previews.body(production_env).await.as_deref(), Some("production:-:v1\n"), "production runs v1 with its own variables");

    // A dev branch gets an environment of its own, with dev's variables; nothing is promoted
    // from dev.
    repos::git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), "HEAD:refs/heads/dev-alice"]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    assert_eq!(previews.settled(branch_env("dev-alice"), &["Ready", "Failed"]).await.0, "Ready");
    assert_eq!(previews.body(branch_env("dev-alice")).await.as_deref(), Some("dev:off:v1\n"));

    // A commit whose tests fail stays in staging, and nobody can promote it.
    let v2 = previews.push_change("local/app", &[("server.js", &server("v2")), ("test.js", FAILING)]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    assert!(!previews.tested_at(branch_env("main"), &v2).await, "v2's test fails");
    assert_eq!(promoter.pass().await.expect("pass"), 0, "a failed test holds the commit back");
    let answer = previews.graphql(PROMOTE, json!({ "p": p, "t": "production" })).await;
    assert_eq!(code(&answer), "BAD_USER_INPUT", "{answer}");
    assert!(answer["errors"][0]["message"].as_str().expect("message").contains("no commit has passed in staging"), "{answer}");
    assert_eq!(previews.body(production_env).await.as_deref(), Some("production:-:v1\n"));

    // The fix passes and is promoted; production serves v1 until v3 is Ready, without a gap.
    let v3 = previews.push_change("local/app", &[("server.js", &server("v3")), ("test.js", PASSING)]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    assert!(previews.tested_at(branch_env("main"), &v3).await);
    assert_eq!(promoter.pass().await.expect("pass"), 1);
    let mut served = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    while served.last().is_none_or(|b: &Option<String>| b.as_deref() != Some("production:-:v3\n")) {
        assert!(std::time::Instant::now() < deadline, "production never served v3: {served:?}");
        served.push(previews.body(production_env).await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        served.iter().all(|b| matches!(b.as_deref(), Some("production:-:v1\n" | "production:-:v3\n"))),
        "production answered something else during the promotion: {served:?}"
    );

    // Rolling production back to v1 is one step, and the promoter leaves it there.
    let state = store.environments.load(production_env.0).await.expect("load").into_inner();
    let first = state.deployments.first().expect("v1's deployment").id;
    let answer = previews
        .graphql(
            "mutation($e: UUID!, $d: UUID!) { rollback(environmentId: $e, deploymentId: $d) { deployment { commit rolledBackTo } } }",
            json!({ "e": production_env.0.to_string(), "d": first.0.to_string() }),
        )
        .await;
    assert_eq!(answer["data"]["rollback"]["deployment"]["commit"], json!(v1.to_string()), "{answer}");
    assert_eq!(answer["data"]["rollback"]["deployment"]["rolledBackTo"], json!(first.0.to_string()));
    eventually(Duration::from_secs(180), "production to serve v1 again", || async {
        (previews.body(production_env).await.as_deref() == Some("production:-:v1\n")).then_some(())
    })
    .await;
    assert_eq!(promoter.pass().await.expect("pass"), 0, "a rollback stays rolled back");

    // A freeze holds automatic promotion and refuses a person's; lifting it lets v4 through.
    let answer = previews
        .graphql(
            "mutation($p: UUID!) { freezeTier(projectId: $p, name: \"production\", reason: \"release week\") { frozen { by reason } } }",
            json!({ "p": p }),
        )
        .await;
    assert_eq!(answer["data"]["freezeTier"]["frozen"], json!({ "by": "operator", "reason": "release week" }), "{answer}");
    let v4 = previews.push_change("local/app", &[("server.js", &server("v4"))]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1, "staging is not frozen");
    assert!(previews.tested_at(branch_env("main"), &v4).await);
    assert_eq!(promoter.pass().await.expect("pass"), 0, "frozen");
    let answer = previews.graphql(PROMOTE, json!({ "p": p, "t": "production" })).await;
    assert_eq!(code(&answer), "FROZEN", "{answer}");
    previews.graphql("mutation($p: UUID!) { unfreezeTier(projectId: $p, name: \"production\") { name } }", json!({ "p": p })).await;
    assert_eq!(promoter.pass().await.expect("pass"), 1, "thawed: v4 goes through");
    eventually(Duration::from_secs(180), "production to serve v4", || async {
        (previews.body(production_env).await.as_deref() == Some("production:-:v4\n")).then_some(())
    })
    .await;

    // A person can promote a commit that passed even after a rollback: v4 again is a no-op.
    let answer = previews.graphql(PROMOTE, json!({ "p": p, "t": "production" })).await;
    assert_eq!(answer["data"]["promote"]["commit"], json!(v4.to_string()), "{answer}");
    assert_eq!(answer["data"]["promote"]["requested"], 0, "v4 is already there");

    // A frozen dev tier deploys no new branch; a branch deleted still goes.
    previews.graphql("mutation($p: UUID!) { freezeTier(projectId: $p, name: \"dev\", reason: \"x\") { name } }", json!({ "p": p })).await;
    repos::git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), "HEAD:refs/heads/dev-bob"]);
    repos::git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), ":refs/heads/dev-alice"]);
    assert_eq!(poller.poll_all().await.expect("poll"), 0);
    assert!(!previews.exists(branch_env("dev-bob")).await, "a frozen tier gets no new environment");
    assert_eq!(previews.settled(branch_env("dev-alice"), &["Terminated"]).await.0, "Terminated");

    // The log says who promoted, from where, and who rolled back.
    let events: Vec<(String, String, Value)> =
        sqlx::query_as("SELECT event_type, actor, payload FROM event_log WHERE aggregate_id = $1 ORDER BY aggregate_version")
            .bind(production_env.0)
            .fetch_all(previews.env.pool())
            .await
            .expect("history");
    let promoted: Vec<&Value> = events.iter().filter(|(t, ..)| t == "DeploymentPromoted").map(|(_, _, p)| p).collect();
    assert_eq!(promoted.len(), 3, "v1, v3 and v4: {events:?}");
    assert!(promoted.iter().all(|p| p["by"] == "system:promoter"), "{promoted:?}");
    assert!(promoted.iter().all(|p| p["from_environment"] == json!(branch_env("main").0.to_string())));
    let rolled: Vec<&(String, String, Value)> = events.iter().filter(|(t, ..)| t == "RolledBack").collect();
    assert_eq!(rolled.len(), 1);
    assert_eq!(rolled[0].2["by"], "operator");
    assert_eq!(rolled[0].1, "operator:open");

    // The tiers in the project index, and every read model, equal a fresh replay of the log.
    let tiers: Value = sqlx::query_scalar("SELECT tiers FROM projects WHERE project_id = $1")
        .bind(project.0)
        .fetch_one(previews.env.pool())
        .await
        .expect("tiers");
    assert_eq!(tiers["dev"]["frozen"]["reason"], "x", "{tiers}");
    assert_eq!(tiers["production"].get("frozen"), None, "thawed: {tiers}");
    assert_eq!(tiers["production"]["spec"]["source"], json!({ "kind": "promotion", "from": "staging", "automatic": true }));
    assert_eq!(understudy_adapters::access_index::verify(previews.env.pool()).await.expect("verify"), vec![]);
    for projection in understudy_projections::all() {
        let report = understudy_projections::replay::verify(previews.env.pool(), projection.as_ref()).await.expect("verify");
        assert!(report.differences.is_empty(), "{report:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_trigger_redeploys_its_tier_once_per_idempotency_key_and_only_for_its_token() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/cms");
    let bare = previews.tmp.path().join("git/local/cms.git");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add").id.expect("id");
    let p = json!(project.to_string());
    for tier in [json!({ "name": "staging", "branches": "main" }), json!({ "name": "dev", "branches": "dev-*" })] {
        let answer = previews.graphql(SET_TIER, json!({ "p": p, "t": tier })).await;
        assert!(answer["errors"].is_null(), "{answer}");
    }
    assert_eq!(previews.env.runtime.git_poller(Duration::from_secs(60)).poll_all().await.expect("poll"), 1);
    let staging = on_branch(project, "main");
    assert_eq!(previews.settled(staging, &["Ready", "Failed"]).await.0, "Ready");

    let create = "mutation($p: UUID!, $t: String!) { createTrigger(projectId: $p, tier: $t) { id tier token url } }";
    let answer = previews.graphql(create, json!({ "p": p, "t": "staging" })).await;
    let trigger = &answer["data"]["createTrigger"];
    let token = trigger["token"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
    let url = trigger["url"].as_str().expect("url").to_string();
    assert!(url.ends_with(&format!("/hooks/{project}/staging/rebuild")), "{url}");
    let dev_token = previews.graphql(create, json!({ "p": p, "t": "dev" })).await["data"]["createTrigger"]["token"]
        .as_str()
        .expect("token")
        .to_string();
    let answer = previews.graphql(create, json!({ "p": p, "t": "nowhere" })).await;
    assert_eq!(code(&answer), "NOT_FOUND", "{answer}");

    let hook = |project: String, tier: &str| format!("http://{}/hooks/{project}/{tier}/rebuild", previews.addr);
    let post = |url: String, token: Option<&str>, key: Option<&str>| {
        let mut request = previews.http.post(url);
        if let Some(token) = token {
            request = request.header("x-trigger-token", token);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        async move {
            let response = request.send().await.expect("post");
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let deployments = || async { store.environments.load(staging.0).await.expect("load").into_inner().deployments.len() };
    let before = deployments().await;

    // Without the right token, for this tier and project, nothing happens, and nothing tells
    // which part was wrong.
    let other_project = uuid::Uuid::new_v4().to_string();
    for (url, token) in [
        (hook(project.to_string(), "staging"), None),
        (hook(project.to_string(), "staging"), Some("ust_0000")),
        (hook(project.to_string(), "staging"), Some(dev_token.as_str())),
        (hook(project.to_string(), "nowhere"), Some(token.as_str())),
        (hook(other_project, "staging"), Some(token.as_str())),
        (hook("not-a-uuid".into(), "staging"), Some(token.as_str())),
    ] {
        let (status, body) = post(url.clone(), token, Some("k0")).await;
        assert_eq!(status, 401, "{url} {token:?}: {body}");
    }
    assert_eq!(deployments().await, before);
    let (status, _) = post(hook(project.to_string(), "staging"), Some(&token), Some(&"k".repeat(201))).await;
    assert_eq!(status, 400, "an oversized idempotency key");

    // The right token redeploys the tier's environment once per idempotency key.
    let (status, body) = post(hook(project.to_string(), "staging"), Some(&token), Some("cms-publish-1")).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["deployments"][0]["duplicate"], false, "{body}");
    assert_eq!(body["deployments"][0]["environment"], json!(staging.0.to_string()));
    let (status, again) = post(hook(project.to_string(), "staging"), Some(&token), Some("cms-publish-1")).await;
    assert_eq!(status, 202);
    assert_eq!(again["deployments"][0]["duplicate"], true, "a retry is a no-op: {again}");
    assert_eq!(again["deployments"][0]["deployment"], body["deployments"][0]["deployment"]);
    assert_eq!(deployments().await, before + 1);
    let query = format!("{}?token={token}", hook(project.to_string(), "staging"));
    let (status, body) = post(query, None, Some("cms-publish-2")).await;
    assert_eq!(status, 202, "the token may come in the URL: {body}");
    assert_eq!(deployments().await, before + 2);
    assert_eq!(previews.settled(staging, &["Ready", "Failed"]).await.0, "Ready");

    // A frozen tier refuses; a revoked trigger is unknown.
    previews
        .graphql("mutation($p: UUID!) { freezeTier(projectId: $p, name: \"staging\", reason: \"launch\") { name } }", json!({ "p": p }))
        .await;
    let (status, body) = post(hook(project.to_string(), "staging"), Some(&token), Some("k3")).await;
    assert_eq!((status, body["code"].as_str()), (409, Some("FROZEN")), "{body}");
    previews.graphql("mutation($p: UUID!) { unfreezeTier(projectId: $p, name: \"staging\") { name } }", json!({ "p": p })).await;
    let id = trigger["id"].as_str().expect("id");
    let answer =
        previews.graphql("mutation($p: UUID!, $id: UUID!) { revokeTrigger(projectId: $p, id: $id) }", json!({ "p": p, "id": id })).await;
    assert_eq!(answer["data"]["revokeTrigger"], true, "{answer}");
    let (status, _) = post(hook(project.to_string(), "staging"), Some(&token), Some("k4")).await;
    assert_eq!(status, 401);
    assert_eq!(deployments().await, before + 2);

    // The log names the trigger as the actor and never holds its token.
    let actors: Vec<String> = sqlx::query_scalar(
        "SELECT actor FROM event_log WHERE aggregate_id = $1 AND event_type = 'DeploymentRequested' ORDER BY aggregate_version",
    )
    .bind(staging.0)
    .fetch_all(previews.env.pool())
    .await
    .expect("actors");
    assert_eq!(actors[1..], [format!("trigger:{id}"), format!("trigger:{id}")], "{actors:?}");
    let leaks: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE payload::text LIKE '%' || $1 || '%'")
        .bind(&token[4..])
        .fetch_one(previews.env.pool())
        .await
        .expect("scan");
    assert_eq!(leaks, 0, "the token is never in the log");
}

/// A smoke test: fetches the app through `$UNDERSTUDY_TARGET_URL`, keeps the page, checks that
/// the control plane's Postgres is out of reach, and fails unless the page says it may ship.
const SMOKE: &str = r#"const fs = require("fs");
const http = require("http");
const net = require("net");
const out = process.env.UNDERSTUDY_ARTIFACTS;
const probe = net.connect(5432, "127.0.0.1");
probe.on("connect", () => { fs.writeFileSync(out + "/isolation.txt", "reached postgres"); probe.destroy(); });
probe.on("error", (e) => fs.writeFileSync(out + "/isolation.txt", "no route: " + e.code));
http.get(process.env.UNDERSTUDY_TARGET_URL + "/", (res) => {
  let body = "";
  res.on("data", (c) => (body += c));
  res.on("end", () => {
    fs.writeFileSync(out + "/page.txt", body);
    setTimeout(() => process.exit(body.includes("ok-to-ship") ? 0 : 1), 200);
  });
}).on("error", (e) => { console.error("smoke: " + e.message); process.exit(2); });
"#;

/// The smoke script, then a real headless browser's screenshot of the page, pass or fail.
const SMOKE_LINE: &str = "node smoke.js; code=$?; chromium --headless --no-sandbox --disable-gpu --no-zygote --window-size=800,600 \
     --screenshot=$UNDERSTUDY_ARTIFACTS/screenshot.png $UNDERSTUDY_TARGET_URL/ >/dev/null 2>&1; exit $code";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_smoke_test_keeps_its_artifacts_and_holds_the_commit_back() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/smoked");
    let v1 = previews.push_change("local/smoked", &[("server.js", &server("ok-to-ship v1")), ("test.js", PASSING), ("smoke.js", SMOKE)]);
    let bare = previews.tmp.path().join("git/local/smoked.git");
    let project = local_git::add_project(&previews.env.runtime.store, bare.to_str().expect("utf-8"), "main", None)
        .await
        .expect("add")
        .id
        .expect("id");
    let p = json!(project.to_string());
    for tier in [
        json!({ "name": "staging", "branches": "main", "smoke": SMOKE_LINE, "pushTo": "verified" }),
        json!({ "name": "production", "promotedFrom": "staging" }),
    ] {
        let answer = previews.graphql(SET_TIER, json!({ "p": p, "t": tier })).await;
        assert!(answer["errors"].is_null(), "{answer}");
    }
    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    let promoter = previews.env.runtime.promoter();
    let staging = on_branch(project, "main");
    let previews = &previews;
    let artifact = |deployment: uuid::Uuid, name: &'static str| {
        let url = format!("http://{}/deployments/{deployment}/artifacts/{name}", previews.addr);
        async move {
            let response = previews.http.get(url).send().await.expect("artifact");
            assert_eq!(response.status(), 200, "{name}");
            assert_eq!(response.headers()["x-content-type-options"], "nosniff");
            response.text().await.expect("text")
        }
    };
    let current = || async {
        previews.env.runtime.store.environments.load(staging.0).await.expect("load").into_inner().current().cloned().expect("current")
    };

    // v1 passes its tests and its smoke test: promoted.
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    assert!(previews.tested_at(staging, &v1).await, "v1 passes: {:?}", current().await.tests);
    let tests: Vec<(String, String)> = current().await.tests.iter().map(|t| (t.name.clone(), format!("{:?}", t.outcome))).collect();
    assert_eq!(tests, [("npm test".to_string(), "Passed".to_string()), ("smoke".to_string(), "Passed".to_string())]);
    let first = current().await.id.0;
    assert_eq!(artifact(first, "page.txt").await, "staging:-:ok-to-ship v1\n");
    assert!(artifact(first, "isolation.txt").await.starts_with("no route"), "the smoke test reached the host's Postgres");
    assert_eq!(promoter.pass().await.expect("pass"), 1);
    // What passed is pushed to the tier's `pushTo` branch, once.
    // The branch, once the push has made it (until then `rev-parse --verify` fails).
    let verified = || {
        let output = std::process::Command::new("git")
            .args(["rev-parse", "--verify", "--quiet", "refs/heads/verified"])
            .current_dir(&bare)
            .output()
            .expect("git runs");
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    eventually(Duration::from_secs(60), "v1 pushed to verified", || async { (verified().as_deref() == Some(v1.as_str())).then_some(()) })
        .await;
    // The push is recorded on the deployment after git has it.
    eventually(Duration::from_secs(10), "the push recorded", || async {
        (current().await.pushed_to.as_deref() == Some("verified")).then_some(())
    })
    .await;

    // v2's unit tests pass but its smoke test fails: it keeps what it saw, and stays in staging.
    let v2 = previews.push_change("local/smoked", &[("server.js", &server("broken v2"))]);
    // main at v2, and the pushed `verified` branch (a repository on disk deploys every branch).
    assert_eq!(poller.poll_all().await.expect("poll"), 2);
    assert!(!previews.tested_at(staging, &v2).await, "v2's smoke test fails");
    let deployment = current().await;
    let outcome = |name: &str| deployment.tests.iter().find(|t| t.name == name).map(|t| format!("{:?}", t.outcome));
    assert_eq!((outcome("npm test").as_deref(), outcome("smoke").as_deref()), (Some("Passed"), Some("Failed")));
    assert_eq!(artifact(deployment.id.0, "page.txt").await, "staging:-:broken v2\n", "the failed smoke test's page is kept");
    let listed: Value = previews
        .http
        .get(format!("http://{}/deployments/{}/artifacts", previews.addr, deployment.id.0))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let names: Vec<&str> = listed.as_array().expect("list").iter().filter_map(|a| a["name"].as_str()).collect();
    assert_eq!(names, ["isolation.txt", "page.txt", "screenshot.png"]);
    let screenshot = previews
        .http
        .get(format!("http://{}/deployments/{}/artifacts/screenshot.png", previews.addr, deployment.id.0))
        .send()
        .await
        .expect("screenshot");
    assert_eq!(screenshot.headers()["content-type"], "image/png");
    let png = screenshot.bytes().await.expect("bytes");
    assert!(png.starts_with(b"\x89PNG") && png.len() > 1000, "a real screenshot: {} bytes", png.len());
    let (log, _) = previews.log(staging, "tests/smoke", 0).await;
    assert!(log.contains("$ node smoke.js") && log.contains("exited with"), "{log}");
    assert_eq!(promoter.pass().await.expect("pass"), 0, "a failed smoke test holds the commit back");
    assert_eq!(verified().as_deref(), Some(v1.as_str()), "and is not pushed");
    let production = of_tier(project, "production");
    assert_eq!(previews.settled(production, &["Ready"]).await.0, "Ready");
    assert_eq!(previews.body(production).await.as_deref(), Some("production:-:ok-to-ship v1\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scheduled_jobs_run_beside_the_app_never_overlap_and_catch_up_once() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/jobs");
    let bare = previews.tmp.path().join("git/local/jobs.git");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add").id.expect("id");
    let p = json!(project.to_string());
    let bad =
        json!({ "name": "staging", "branches": "main", "jobs": [{ "name": "report", "schedule": "every tuesday", "command": "true" }] });
    let answer = previews.graphql(SET_TIER, json!({ "p": p, "t": bad })).await;
    assert_eq!(code(&answer), "BAD_USER_INPUT", "{answer}");
    let command = "echo \"report in $UNDERSTUDY_TIER\"; node -e \"require('http').get(process.env.UNDERSTUDY_TARGET_URL, r => r.pipe(process.stdout))\"; sleep 3";
    let tier =
        json!({ "name": "staging", "branches": "main", "jobs": [{ "name": "report", "schedule": "*/10 * * * * *", "command": command }] });
    let answer = previews.graphql(SET_TIER, json!({ "p": p, "t": tier })).await;
    assert!(answer["errors"].is_null(), "{answer}");
    assert_eq!(previews.env.runtime.git_poller(Duration::from_secs(60)).poll_all().await.expect("poll"), 1);
    let staging = on_branch(project, "main");
    assert_eq!(previews.settled(staging, &["Ready", "Failed"]).await.0, "Ready");
    let state = || async { store.environments.load(staging.0).await.expect("load").into_inner() };
    let created = state().await.deployments[0].requested_at;
    let pool = previews.env.pool();
    let scheduler = previews.env.runtime.job_scheduler();

    // The first slot after the environment came up: one run, asked for once.
    let t = created + chrono::Duration::seconds(10);
    assert_eq!(scheduler.pass(t).await.expect("pass"), 1);
    assert_eq!(scheduler.pass(t).await.expect("pass"), 0, "a slot is run once");
    eventually(Duration::from_secs(60), "the run to start", || async {
        (!events(pool, staging, "JobRunStarted").await.is_empty()).then_some(())
    })
    .await;

    // The next slot comes while it runs (it sleeps 3 s): skipped, not run beside it.
    assert_eq!(scheduler.pass(t + chrono::Duration::seconds(10)).await.expect("pass"), 0);
    assert_eq!(events(pool, staging, "JobRunSkipped").await.len(), 1);
    assert_eq!(events(pool, staging, "JobRunSkipped").await[0]["reason"], "the previous run is still going");
    eventually(Duration::from_secs(60), "the first run to finish", || async {
        (events(pool, staging, "JobRunFinished").await.len() == 1).then_some(())
    })
    .await;
    assert_eq!(events(pool, staging, "JobRunFinished").await[0]["succeeded"], true, "{:?}", events(pool, staging, "JobRunFinished").await);

    // Down for a minute (five slots missed): one run catches up, not five.
    assert_eq!(scheduler.pass(t + chrono::Duration::seconds(70)).await.expect("pass"), 1);
    assert_eq!(scheduler.pass(t + chrono::Duration::seconds(75)).await.expect("pass"), 0);
    eventually(Duration::from_secs(60), "the catch-up run to finish", || async {
        (events(pool, staging, "JobRunFinished").await.len() == 2).then_some(())
    })
    .await;
    assert_eq!(events(pool, staging, "JobRunRequested").await.len(), 2);

    // Each run's output is its log: the tier's variables, and the app it ran beside.
    let (log, _) = previews.log(staging, "jobs/report", 0).await;
    assert_eq!(log.matches("report in staging").count(), 2, "{log}");
    assert_eq!(log.matches("hello from node at /").count(), 2, "{log}");
}

/// The payloads of an environment's events of one type, in order.
async fn events(pool: &sqlx::PgPool, environment: EnvironmentId, kind: &str) -> Vec<Value> {
    sqlx::query_scalar("SELECT payload FROM event_log WHERE aggregate_id = $1 AND event_type = $2 ORDER BY aggregate_version")
        .bind(environment.0)
        .bind(kind)
        .fetch_all(pool)
        .await
        .expect("events")
}

/// A receiver of notifications: answers 500 to its first `fail_first` requests, 200 after;
/// keeps what it accepted: (kind, delivery id, signature, body).
async fn receiver(fail_first: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, String, String, Vec<u8>)>>>) {
    use axum::http::{HeaderMap, StatusCode};
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (kept, count) = (accepted.clone(), seen.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
            let (kept, count) = (kept.clone(), count.clone());
            async move {
                if count.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < fail_first {
                    return StatusCode::INTERNAL_SERVER_ERROR;
                }
                let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
                kept.lock().expect("lock").push((
                    header("x-understudy-event"),
                    header("x-understudy-delivery"),
                    header("x-understudy-signature-256"),
                    body.to_vec(),
                ));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/hook"), accepted)
}

/// An SMTP server that speaks just enough of RFC 5321 for one message per connection: it
/// answers `550` to any recipient named `nobody@…` and `451` to the first `busy_first` other
/// recipients, and keeps each message it accepts as (recipient, data).
async fn smtp_server(busy_first: usize) -> (String, std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let accepted = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(busy_first));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let kept = accepted.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (kept, busy) = (kept.clone(), busy.clone());
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = BufReader::new(read).lines();
                let _ = write.write_all(b"220 mail.example.com ESMTP ready\r\n").await;
                let mut recipient = String::new();
                while let Ok(Some(line)) = lines.next_line().await {
                    let verb = line.split([' ', ':']).next().unwrap_or_default().to_ascii_uppercase();
                    let answer = match verb.as_str() {
                        "EHLO" | "HELO" => "250 mail.example.com".to_string(),
                        "MAIL" | "RSET" | "NOOP" => "250 2.0.0 OK".into(),
                        "RCPT" if line.contains("nobody@") => "550 5.1.1 no such mailbox".into(),
                        "RCPT" if busy.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() => "451 4.3.2 try again later".into(),
                        "RCPT" => {
                            recipient = line.clone();
                            "250 2.1.5 OK".into()
                        }
                        "DATA" => {
                            let _ = write.write_all(b"354 go ahead\r\n").await;
                            let mut data = String::new();
                            while let Ok(Some(line)) = lines.next_line().await {
                                if line == "." {
                                    break;
                                }
                                data.push_str(&line);
                                data.push('\n');
                            }
                            kept.lock().expect("lock").push((recipient.clone(), data));
                            "250 2.0.0 queued".into()
                        }
                        "QUIT" => {
                            let _ = write.write_all(b"221 2.0.0 bye\r\n").await;
                            break;
                        }
                        _ => "502 5.5.2 not implemented".into(),
                    };
                    if write.write_all(format!("{answer}\r\n").as_bytes()).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (format!("smtp://{addr}"), accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_are_signed_retried_sent_once_each_and_a_dead_endpoint_blocks_nothing() {
    let key = understudy_adapters::secrets::SecretKey::from_base64(&understudy_adapters::secrets::SecretKey::generate()).expect("key");
    let previews = Previews::start_sealing(true, Some(key)).await;
    previews.push("node-hello", "local/notified");
    let v1 = previews.push_change("local/notified", &[("server.js", &server("v1")), ("test.js", PASSING)]);
    let bare = previews.tmp.path().join("git/local/notified.git");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add").id.expect("id");
    let p = json!(project.to_string());
    for tier in [json!({ "name": "staging", "branches": "main" }), json!({ "name": "production", "promotedFrom": "staging" })] {
        assert!(previews.graphql(SET_TIER, json!({ "p": p, "t": tier })).await["errors"].is_null());
    }
    let (url, accepted) = receiver(2).await;
    let add = "mutation($p: UUID!, $u: String!, $e: [String!]) { addNotificationTarget(projectId: $p, url: $u, events: $e) { secret target { id events } } }";
    let answer = previews.graphql(add, json!({ "p": p, "u": url, "e": [] })).await;
    let secret = answer["data"]["addNotificationTarget"]["secret"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
    assert_eq!(answer["data"]["addNotificationTarget"]["target"]["events"], json!(["failed", "recovered", "promoted", "rolled_back"]));
    let dead = previews.graphql(add, json!({ "p": p, "u": "http://127.0.0.1:1/never", "e": ["failed"] })).await;
    assert!(dead["errors"].is_null(), "{dead}");
    // By email too: one address that takes the failure and the rollback, one the server refuses.
    for (address, events) in
        [("mailto:ops@example.com", json!(["failed", "rolled_back"])), ("mailto:nobody@example.com", json!(["failed"]))]
    {
        let answer = previews.graphql(add, json!({ "p": p, "u": address, "e": events })).await;
        assert!(answer["errors"].is_null(), "{answer}");
    }
    let (smtp, mailbox) = smtp_server(1).await;
    let refused = previews.graphql(add, json!({ "p": p, "u": "mailto:ops@example.com,boss@example.com", "e": [] })).await;
    assert_eq!(code(&refused), "BAD_USER_INPUT", "{refused}");
    let refused = previews.graphql(add, json!({ "p": p, "u": "ftp://example.com/x", "e": [] })).await;
    assert_eq!(code(&refused), "BAD_USER_INPUT", "{refused}");
    let refused = previews.graphql(add, json!({ "p": p, "u": url, "e": ["everything"] })).await;
    assert_eq!(code(&refused), "BAD_USER_INPUT", "{refused}");

    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    let promoter = previews.env.runtime.promoter();
    let mut notifier = previews.env.runtime.notifier();
    notifier.retry_base = Duration::from_millis(50);
    let mailer = understudy_adapters::notify::Mailer::new(&smtp, "Understudy <understudy@example.com>").expect("mailer");
    notifier.mailer = Some(std::sync::Arc::new(mailer));
    let main = on_branch(project, "main");
    let production = of_tier(project, "production");

    // v1 passes and is promoted; v2 fails its tests; v3 recovers and is promoted; production
    // is rolled back to v1.
    assert_eq!(poller.poll_all().await.expect("poll"), 1);
    assert!(previews.tested_at(main, &v1).await);
    assert_eq!(promoter.pass().await.expect("pass"), 1);
    assert_eq!(previews.settled(production, &["Ready", "Failed"]).await.0, "Ready");
    let v2 = previews.push_change("local/notified", &[("test.js", FAILING)]);
    poller.poll_all().await.expect("poll");
    assert!(!previews.tested_at(main, &v2).await);
    let v3 = previews.push_change("local/notified", &[("server.js", &server("v3")), ("test.js", PASSING)]);
    poller.poll_all().await.expect("poll");
    assert!(previews.tested_at(main, &v3).await);
    assert_eq!(promoter.pass().await.expect("pass"), 1);
    eventually(Duration::from_secs(120), "production at v3", || async {
        (previews.body(production).await.as_deref() == Some("production:-:v3\n")).then_some(())
    })
    .await;
    let first = store.environments.load(production.0).await.expect("load").into_inner().deployments[0].id;
    let answer = previews
        .graphql(
            "mutation($e: UUID!, $d: UUID!) { rollback(environmentId: $e, deploymentId: $d) { status } }",
            json!({ "e": production.0.to_string(), "d": first.0.to_string() }),
        )
        .await;
    assert!(answer["errors"].is_null(), "{answer}");

    // The notifier, pass after pass, as the scheduler runs it.
    let expected = ["failed", "promoted", "promoted", "recovered", "rolled_back"];
    eventually(Duration::from_secs(60), "every notification to arrive", || async {
        notifier.pass().await.expect("pass");
        let mut kinds: Vec<String> = accepted.lock().expect("lock").iter().map(|(kind, ..)| kind.clone()).collect();
        kinds.sort();
        let mails = mailbox.lock().expect("lock").len();
        (kinds == expected && mails == 2).then_some(())
    })
    .await;
    for _ in 0..5 {
        notifier.pass().await.expect("pass");
    }
    let accepted = accepted.lock().expect("lock").clone();
    assert_eq!(accepted.len(), expected.len(), "each notification once: {:?}", accepted.iter().map(|a| &a.0).collect::<Vec<_>>());
    let mut ids: Vec<&String> = accepted.iter().map(|(_, id, ..)| id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), expected.len(), "one delivery id per notification");
    for (kind, _, signature, body) in &accepted {
        assert_eq!(signature, &understudy_adapters::notify::signature(&secret, body), "{kind} is signed with the target's secret");
        let body: Value = serde_json::from_slice(body).expect("JSON");
        assert_eq!(body["kind"], json!(kind));
        assert_eq!(body["project"]["id"], json!(project.0.to_string()));
    }
    let failed = accepted.iter().find(|(kind, ..)| kind == "failed").expect("failed");
    let failed: Value = serde_json::from_slice(&failed.3).expect("JSON");
    assert_eq!((failed["deployment"]["commit"].as_str(), failed["environment"]["tier"].as_str()), (Some(v2.as_str()), Some("staging")));
    assert_eq!(failed["deployment"]["testsFailed"], 1);
    let rolled = accepted.iter().find(|(kind, ..)| kind == "rolled_back").expect("rolled back");
    let rolled: Value = serde_json::from_slice(&rolled.3).expect("JSON");
    assert_eq!((rolled["deployment"]["commit"].as_str(), rolled["by"].as_str()), (Some(v1.as_str()), Some("operator:open")));

    // The emails: each once, to its address, saying what happened where.
    // (Headers unfolded: a long subject is folded onto two lines.)
    let mails: Vec<(String, String)> =
        mailbox.lock().expect("lock").iter().map(|(to, data)| (to.clone(), data.replace("\n ", " "))).collect();
    assert_eq!(mails.len(), 2, "{mails:?}");
    assert!(mails.iter().all(|(to, _)| to.contains("ops@example.com")), "{mails:?}");
    let failed_mail = mails.iter().map(|(_, data)| data).find(|d| d.contains(" failed at ")).unwrap_or_else(|| panic!("{mails:?}"));
    assert!(
        failed_mail.contains(&format!("Subject: [Understudy] notified: tier staging failed at {}", &v2.as_str()[..12])),
        "{failed_mail}"
    );
    assert!(failed_mail.contains("Tests: 0 passed, 1 failed"), "{failed_mail}");
    assert!(failed_mail.contains("From: Understudy <understudy@example.com>"), "{failed_mail}");
    assert!(mails.iter().any(|(_, d)| d.contains(&format!("tier production was rolled back at {}", &v1.as_str()[..12]))), "{mails:?}");

    // The receiver's two 500s and the mail server's 451 were retried; the refused address was
    // given up at once; the dead endpoint keeps failing on its own.
    let deliveries = previews
        .graphql(
            "query($p: UUID!) { project(id: $p) { notificationDeliveries(first: 50) { kind state attempts lastError } } }",
            json!({ "p": p }),
        )
        .await;
    let rows = deliveries["data"]["project"]["notificationDeliveries"].as_array().unwrap_or_else(|| panic!("{deliveries}")).clone();
    assert_eq!(rows.len(), expected.len() + 4, "five to the receiver, a failure to the dead endpoint, three emails: {rows:?}");
    let retried: i64 = rows.iter().filter(|r| r["state"] == "delivered").map(|r| r["attempts"].as_i64().unwrap_or(0) - 1).sum();
    assert_eq!(retried, 3, "two answers of 500 and one 451, each retried: {rows:?}");
    let refused = rows.iter().find(|r| r["state"] == "failed").unwrap_or_else(|| panic!("{rows:?}"));
    assert_eq!(refused["attempts"], 1, "{refused}");
    assert!(refused["lastError"].as_str().unwrap_or_default().contains("no such mailbox"), "{refused}");
    let dead_row = rows.iter().find(|r| r["state"] == "pending").unwrap_or_else(|| panic!("{rows:?}"));
    assert!(dead_row["attempts"].as_i64().unwrap_or(0) >= 1, "{dead_row}");
    assert!(dead_row["lastError"].as_str().unwrap_or_default().contains("127.0.0.1:1"), "{dead_row}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_repository_file_declares_tiers_and_manages_only_its_own() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/declared");
    let file = |production: &str| {
        format!(
            "[tiers.dev]\nbranches = \"dev-*\"\nenv = {{ CACHE = \"off\" }}\n\n[tiers.staging]\nbranches = \"main\"\n\n[tiers.production]\n{production}\n"
        )
    };
    previews.push_change("local/declared", &[("understudy.toml", &file("from = \"staging\""))]);
    let bare = previews.tmp.path().join("git/local/declared.git");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add").id.expect("id");
    let p = json!(project.to_string());
    assert!(previews.graphql(SET_TIER, json!({ "p": p, "t": { "name": "qa", "branches": "qa" } })).await["errors"].is_null());
    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    let tiers = || async {
        let state = store.projects.load(project.0).await.expect("load").into_inner();
        state.tiers.values().map(|t| (t.name().to_string(), t.spec.from_file, t.promotes_automatically())).collect::<Vec<_>>()
    };

    poller.poll_all().await.expect("poll");
    let s = |n: &str| n.to_string();
    assert_eq!(
        tiers().await,
        [(s("dev"), true, false), (s("production"), true, true), (s("qa"), false, false), (s("staging"), true, false)]
    );
    let main = on_branch(project, "main");
    assert_eq!(previews.settled(main, &["Ready", "Failed"]).await.0, "Ready");

    // The file drops dev and makes production manual: so does the project; qa stays.
    previews.push_change(
        "local/declared",
        &[(
            "understudy.toml",
            &file("from = \"staging\"\nautomatic = false").replace("[tiers.dev]\nbranches = \"dev-*\"\nenv = { CACHE = \"off\" }\n\n", ""),
        )],
    );
    poller.poll_all().await.expect("poll");
    assert_eq!(tiers().await, [(s("production"), true, false), (s("qa"), false, false), (s("staging"), true, false)]);

    // Tiers that do not hold together change nothing, and the build says why, with the line.
    previews.push_change("local/declared", &[("understudy.toml", &file("from = \"nowhere\""))]);
    poller.poll_all().await.expect("poll");
    assert_eq!(tiers().await, [(s("production"), true, false), (s("qa"), false, false), (s("staging"), true, false)]);
    let row = previews.settled(main, &["Failed"]).await;
    let failure = row.2.expect("a reason");
    assert!(failure.contains("understudy.toml, line") && failure.contains("nowhere"), "{failure}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tier_fed_by_tags_runs_the_newest_release() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/released");
    let v1 = previews.push_change("local/released", &[("server.js", &server("v1"))]);
    let bare = previews.tmp.path().join("git/local/released.git");
    let work = previews.tmp.path().join("work/local/released");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add").id.expect("id");
    let p = json!(project.to_string());
    let answer = previews.graphql(SET_TIER, json!({ "p": p, "t": { "name": "release", "tags": "v*" } })).await;
    assert_eq!(answer["data"]["setTier"]["name"], "release", "{answer}");
    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    let release = of_tier(project, "release");
    let push_tag = |args: &[&str]| {
        repos::git(&work, args);
        repos::git(&work, &["push", "--quiet", "--tags", bare.to_str().expect("utf-8")]);
    };
    poller.poll_all().await.expect("poll");
    assert!(!previews.exists(release).await, "no release yet");

    // An annotated tag deploys the commit it points at.
    push_tag(&["tag", "-a", "v1.0", "-m", "the first release"]);
    poller.poll_all().await.expect("poll");
    assert_eq!(previews.settled(release, &["Ready", "Failed"]).await.0, "Ready");
    let current = || async { store.environments.load(release.0).await.expect("load").into_inner().current().map(|d| d.commit.clone()) };
    assert_eq!(current().await, Some(v1));
    assert_eq!(previews.body(release).await.as_deref(), Some("release:-:v1\n"));

    // A newer tag (lightweight) moves the release; a tag no tier takes does not.
    std::thread::sleep(std::time::Duration::from_millis(1100)); // tags sort by creation, to the second
    let v2 = previews.push_change("local/released", &[("server.js", &server("v2"))]);
    push_tag(&["tag", "v1.1"]);
    poller.poll_all().await.expect("poll");
    assert_eq!(current().await, Some(v2.clone()));
    std::thread::sleep(std::time::Duration::from_millis(1100)); // the same: creation dates have whole seconds
    previews.push_change("local/released", &[("server.js", &server("v3"))]);
    push_tag(&["tag", "nightly"]);
    assert_eq!(poller.poll_all().await.expect("poll"), 1, "main's head only: the tag is no release");
    assert_eq!(current().await, Some(v2));
}

/// An app that answers with what its own database holds, or what opening another one says.
const DATABASE_APP: &str = r#"const http = require("http");
const { execFileSync } = require("child_process");
const sql = (url, query) => {
  try {
    return execFileSync("psql", [url, "-Atc", query], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] }).trim();
  } catch (e) {
    return "error: " + String(e.stderr || e.message).trim();
  }
};
http.createServer((req, res) => {
  const u = new URL(req.url, "http://app");
  let body = "ok";
  if (u.pathname === "/notes") body = sql(process.env.DATABASE_URL, "select string_agg(note, ',' order by note) from notes");
  if (u.pathname === "/other") {
    const other = new URL(process.env.DATABASE_URL);
    other.pathname = "/" + u.searchParams.get("db");
    body = sql(other.toString(), "select 1");
  }
  res.end(body + "\n");
}).listen(Number(process.env.PORT), "127.0.0.1");
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_environment_gets_its_own_database_seeded_once_that_no_other_can_open() {
    let previews = Previews::start().await;
    previews.push("node-hello", "local/db");
    let seed = "psql \"$DATABASE_URL\" -c \"create table notes (note text); insert into notes values ('seeded')\"";
    previews.push_change("local/db", &[("server.js", DATABASE_APP)]);
    let bare = previews.tmp.path().join("git/local/db.git");
    let work = previews.tmp.path().join("work/local/db");
    let store = &previews.env.runtime.store;
    let project = local_git::add_project(store, bare.to_str().expect("utf-8"), "main", None).await.expect("add").id.expect("id");
    let answer = previews
        .graphql(
            "mutation($p: UUID!, $s: String) { setDatabaseAddon(projectId: $p, enabled: true, seed: $s) }",
            json!({ "p": project.to_string(), "s": seed }),
        )
        .await;
    assert_eq!(answer["data"]["setDatabaseAddon"], true, "{answer}");
    repos::git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), "HEAD:refs/heads/feature"]);
    let poller = previews.env.runtime.git_poller(Duration::from_secs(60));
    assert_eq!(poller.poll_all().await.expect("poll"), 2);
    let environment = |b: &str| on_branch(project, b);
    let (main, feature) = (environment("main"), environment("feature"));
    for env in [main, feature] {
        let row = previews.settled(env, &["Ready", "Failed"]).await;
        assert_eq!(row.0, "Ready", "{row:?}");
    }
    let previews = &previews;
    let get = |env: EnvironmentId, path: String| async move {
        previews.preview(env, &path).send().await.expect("preview").text().await.expect("text").trim().to_string()
    };
    // /metrics shows what the running sandboxes use.
    let metrics = previews.http.get(format!("http://{}/metrics", previews.addr)).send().await.expect("metrics").text().await.expect("text");
    let gauge = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap_or_else(|| panic!("no {name} in /metrics"));
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
    };
    assert!(gauge("understudy_sandbox_memory_bytes") > 1e6, "two apps run in sandboxes");
    assert!(gauge("understudy_sandbox_cpu_seconds") > 0.0);

    // Each environment's app reads its own database, seeded on its first deployment.
    assert_eq!(get(main, "/notes".into()).await, "seeded");
    assert_eq!(get(feature, "/notes".into()).await, "seeded");

    // A new commit keeps the data: the seed ran once.
    previews.push_change("local/db", &[("README.md", "a change\n")]);
    let v2 = CommitSha::parse(repos::git(&work, &["rev-parse", "HEAD"])).expect("sha");
    poller.poll_all().await.expect("poll");
    eventually(Duration::from_secs(120), "main at the second commit", || async {
        let state = store.environments.load(main.0).await.ok()?.into_inner();
        state.current().filter(|d| d.commit == v2 && d.status.as_str() == "Ready").map(|_| ())
    })
    .await;
    assert_eq!(get(main, "/notes".into()).await, "seeded", "seeded once, not twice");

    // With its own credentials, main cannot open feature's database.
    let other = understudy_adapters::preview::addon::database_name(feature);
    let refused = get(main, format!("/other?db={other}")).await;
    assert!(refused.contains("permission denied for database"), "{refused}");

    // The password is in no log, and a terminated environment's database is dropped.
    let password = understudy_adapters::preview::addon::password(previews.env.runtime.preview.signer.as_ref().expect("signer"), main);
    let leaks: i64 = sqlx::query_scalar("SELECT count(*) FROM deployment_logs WHERE line LIKE '%' || $1 || '%'")
        .bind(&password)
        .fetch_one(previews.env.pool())
        .await
        .expect("scan");
    assert_eq!(leaks, 0);
    repos::git(&work, &["push", "--quiet", bare.to_str().expect("utf-8"), ":refs/heads/feature"]);
    poller.poll_all().await.expect("poll");
    assert_eq!(previews.settled(feature, &["Terminated"]).await.0, "Terminated");
    let server = previews.env.runtime.preview.addon_database.clone().expect("server");
    assert!(server.drop_terminated(previews.env.pool()).await.expect("drop") >= 1);
    let admin = sqlx::PgPool::connect(&understudy_tests::admin_database_url()).await.expect("admin");
    let left: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1").bind(&other).fetch_one(&admin).await.expect("count");
    assert_eq!(left, 0, "feature's database is gone");
    let main_db = understudy_adapters::preview::addon::database_name(main);
    let kept: i64 =
        sqlx::query_scalar("SELECT count(*) FROM pg_database WHERE datname = $1").bind(&main_db).fetch_one(&admin).await.expect("count");
    assert_eq!(kept, 1, "main's stays");
    // This test's own databases go with it.
    sqlx::query(&format!("DROP DATABASE IF EXISTS \"{main_db}\" WITH (FORCE)")).execute(&admin).await.expect("drop");
    sqlx::query(&format!("DROP ROLE IF EXISTS \"{main_db}\"")).execute(&admin).await.expect("drop role");
}

/// The environment of `branch` of a project whose root is its one app.
fn on_branch(project: understudy_domain::ids::ProjectId, branch: &str) -> EnvironmentId {
    let target = Target::Branch { branch: BranchName::parse(branch).expect("branch") };
    EnvironmentId::derive(project, &target, &Entrypoint::parse(".").expect("entrypoint"))
}

/// The environment of a promoted or tag-fed tier of a project whose root is its one app.
fn of_tier(project: understudy_domain::ids::ProjectId, tier: &str) -> EnvironmentId {
    EnvironmentId::derive(
        project,
        &Target::Tier { tier: TierName::parse(tier).expect("tier") },
        &Entrypoint::parse(".").expect("entrypoint"),
    )
}
