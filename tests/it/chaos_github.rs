//! Chaos with GitHub in the loop: the API (which takes webhooks and writes to GitHub), a worker
//! (which builds, serves and tests real apps), the relay and the projector run as `understudy`
//! processes and are killed with SIGKILL at random moments while pull requests are opened and
//! pushed to and a load of deployments and test results streams in. The fake GitHub acts on each
//! request before it answers, so a kill often lands after GitHub changed and before Understudy
//! heard. Afterwards GitHub holds exactly one sticky comment per pull request and one deployment
//! and check run per environment × commit, the comments show the last state, and every read model
//! equals a fresh replay.
//!
//! Short form in CI; `UNDERSTUDY_CHAOS_EVENTS=10000` is the long form (`docs/operating.md`), and
//! `UNDERSTUDY_CHAOS_SEED` replays a run's kill schedule.
//!
//! The sleeps here pace the kills and the pushes, and space a redelivery's attempts; every wait
//! for a result polls a condition with a deadline.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use chrono::Utc;
use serde_json::Value;
use understudy_adapters::github::webhook::sign;
use understudy_domain::environment::{DeploymentStatus, EnvironmentCommand, EnvironmentSpec, TestOutcome};
use understudy_domain::ids::{DeploymentId, EnvironmentId};
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, Target};
use understudy_tests::fake_github::{webhook_fixture as fixture, FakeGitHub, APP_ID};
use understudy_tests::{eventually, fixtures, repos, TestEnv};
use uuid::Uuid;

use crate::chaos::{projected_exactly_once, Role};

const SECRET: &str = "chaos-webhook-secret";
/// Real pull requests: built, served and tested by the worker, two commits each.
const PULL_REQUESTS: u64 = 3;
/// Environments of the synthetic load (pull requests 1000…): deployments cycle through them.
const LOAD_ENVIRONMENTS: u64 = 20;
/// Test results per synthetic deployment.
const TESTS_PER_DEPLOYMENT: usize = 4;
/// How long the load (and the killing) lasts.
const LOAD_SECONDS: f64 = 20.0;

/// A small xorshift: the kill schedule is random, and replayable from its seed.
struct Dice(u64);

impl Dice {
    fn roll(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % below
    }
}

/// Delivers a webhook as GitHub would (signed, with a delivery id), again with the same id until
/// the API takes it: GitHub's redelivery of a delivery that met a dead API.
async fn deliver(addr: &str, event: &str, delivery: &str, payload: &Value) {
    let body = serde_json::to_vec(payload).expect("json");
    let signature = sign(SECRET.as_bytes(), &body);
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().expect("client");
    for _ in 0..600 {
        let sent = client
            .post(format!("http://{addr}/webhooks/github"))
            .header("X-GitHub-Event", event)
            .header("X-GitHub-Delivery", delivery)
            .header("X-Hub-Signature-256", &signature)
            .header("Content-Type", "application/json")
            .body(body.clone())
            .send()
            .await;
        match sent {
            Ok(response) if response.status().is_success() => return,
            Ok(response) if response.status().is_server_error() => {}
            Ok(response) => panic!("delivery {delivery} refused: {} {}", response.status(), response.text().await.unwrap_or_default()),
            Err(_) => {}
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("delivery {delivery} never taken");
}

/// A pull request event for PR `number` of the fixture's repository, its head at `sha`.
fn pull_request_event(action: &str, number: u64, sha: &CommitSha) -> Value {
    let mut payload = fixture(&format!("pull_request.{action}"));
    payload["number"] = number.into();
    payload["pull_request"]["number"] = number.into();
    payload["pull_request"]["id"] = (900_000 + number).into();
    payload["pull_request"]["head"]["ref"] = format!("feature-{number}").into();
    payload["pull_request"]["head"]["sha"] = sha.as_str().into();
    payload
}

/// One synthetic environment's deployments, each Ready with its test results. Each deployment
/// holds a lease that never expires before it is requested, as if a worker elsewhere served it,
/// so this test's worker leaves it alone.
async fn load(
    store: understudy_adapters::AggregateStore<understudy_domain::environment::EnvironmentAggregate>,
    pool: sqlx::PgPool,
    spec: EnvironmentSpec,
    deployments: u64,
    first_commit: u64,
    pace: Duration,
) {
    let id = fixtures::env_id(&spec);
    let mut ticker = tokio::time::interval(pace);
    for n in 0..deployments {
        ticker.tick().await;
        let deployment = DeploymentId(Uuid::new_v4());
        sqlx::query(
            "INSERT INTO deployment_leases (deployment_id, environment_id, worker, expires_at)
             VALUES ($1, $2, 'test:load', now() + interval '1 day')",
        )
        .bind(deployment.0)
        .bind(id.0)
        .execute(&pool)
        .await
        .expect("lease");
        let mut commands = vec![fixtures::request(&spec, deployment, first_commit + n)];
        commands.extend(fixtures::to_ready(deployment));
        commands.extend((0..TESTS_PER_DEPLOYMENT).map(|t| EnvironmentCommand::RecordTestResult {
            deployment_id: deployment,
            test: format!("load test {t}"),
            outcome: if (n + t as u64).is_multiple_of(7) { TestOutcome::Failed } else { TestOutcome::Passed },
            duration_ms: Some(5),
            at: Utc::now(),
        }));
        for command in commands {
            store.execute(id.0, command, fixtures::meta()).await.expect("load command");
        }
    }
}

/// The log's head once the real pull requests are Ready and tested at their heads and nothing is
/// left to number, project or write to GitHub; otherwise what is still awaited.
async fn settled(env: &TestEnv, real: &[(EnvironmentId, CommitSha)]) -> Result<i64, String> {
    for (id, sha) in real {
        let environment = env.runtime.store.environments.load(id.0).await.map_err(|e| e.to_string())?.into_inner();
        let current = environment.current().ok_or_else(|| format!("{id}: no deployment"))?;
        if current.commit != *sha || current.status != DeploymentStatus::Ready || !current.tests_completed {
            return Err(format!("{id}: {:?} at {} (tests completed: {})", current.status, current.commit, current.tests_completed));
        }
    }
    let count = |sql: &'static str| async move { sqlx::query_scalar::<_, i64>(sql).fetch_one(env.pool()).await.map_err(|e| e.to_string()) };
    let unnumbered = count("SELECT count(*) FROM event_log WHERE position IS NULL").await?;
    let unwritten = count("SELECT count(*) FROM github_outbox WHERE dirty_position > written_position").await?;
    let lags = understudy_projections::projector::lag(env.pool()).await.map_err(|e| e.to_string())?;
    let behind: Vec<_> = lags.iter().filter(|l| l.lag > 0).map(|l| format!("{} {} behind", l.projection, l.lag)).collect();
    if unnumbered > 0 || unwritten > 0 || !behind.is_empty() {
        // What is due, and what this database's sessions are doing: enough to tell a slow
        // writer from a stuck one.
        let rows =
            |sql: &'static str| async move { sqlx::query_scalar::<_, String>(sql).fetch_all(env.pool()).await.map_err(|e| e.to_string()) };
        let due = rows(
            "SELECT format('%s %s: dirty at %s, written at %s, %s attempts, due %ss ago, %s', kind, key, dirty_position,
                    written_position, attempts, round(extract(epoch FROM now() - next_attempt_at)), last_error)
             FROM github_outbox WHERE dirty_position > written_position LIMIT 5",
        )
        .await?;
        let sessions = rows(
            "SELECT format('%s (%s): %s', state, wait_event, left(query, 100)) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid() AND state <> 'idle'",
        )
        .await?;
        return Err(format!(
            "{unnumbered} events unnumbered, {unwritten} GitHub writes due {due:?}, projections: {behind:?}, sessions {sessions:?}"
        ));
    }
    lags.first().map(|l| l.head).ok_or_else(|| "no projections".into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_every_role_under_load_leaves_one_comment_and_one_github_deployment_per_commit() {
    let target_events: u64 = std::env::var("UNDERSTUDY_CHAOS_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let seed: u64 = std::env::var("UNDERSTUDY_CHAOS_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| Utc::now().timestamp_nanos_opt().unwrap_or(1) as u64 | 1);
    eprintln!("chaos with GitHub: {target_events} load events, seed {seed} (UNDERSTUDY_CHAOS_SEED replays the kills)");
    let mut dice = Dice(seed);

    let env = TestEnv::new().await;
    let github = FakeGitHub::start().await;
    github.set_answer_delay(Duration::from_millis(20));
    // Kept when the test fails, for the roles' logs; removed at the end otherwise.
    let kept = tempfile::tempdir().expect("tmp").keep();
    let dir = kept.as_path();

    // The repository, on disk for the worker and on the fake GitHub for the API.
    let installed = fixture("installation.created");
    let opened = fixture("pull_request.opened");
    let full_name = opened["repository"]["full_name"].as_str().expect("full_name").to_string();
    let repo_id = opened["repository"]["id"].as_u64().expect("id");
    let project = understudy_adapters::github::project_id(repo_id);
    github.set_repo(&full_name, repo_id, "main", &["package.json"]);
    repos::push_example(dir, "node-hello", &full_name);
    let work = dir.join("work").join(&full_name);
    let bare = dir.join("git").join(format!("{full_name}.git"));
    // Each pull request's two commits, on its own branch.
    let mut heads: Vec<(u64, CommitSha, CommitSha)> = Vec::new();
    for number in 1..=PULL_REQUESTS {
        let commit = |text: &str| {
            std::fs::write(work.join("NOTE"), text).expect("write");
            repos::git(&work, &["add", "-A"]);
            repos::git(&work, &["commit", "--quiet", "-m", text]);
            repos::git(&work, &["push", "--quiet", "--force", bare.to_str().expect("utf-8"), &format!("HEAD:refs/heads/feature-{number}")]);
            let sha = CommitSha::parse(repos::git(&work, &["rev-parse", "HEAD"])).expect("sha");
            github.set_root_files_at(&full_name, sha.as_str(), &["package.json", "server.js", "test.js"]);
            sha
        };
        let first = commit(&format!("pull request {number}, first commit"));
        let second = commit(&format!("pull request {number}, second commit"));
        heads.push((number, first, second));
    }

    // The roles, as processes.
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let addr = format!("127.0.0.1:{port}");
    let key = format!("{}/fixtures/github-app-test-key.pem", env!("CARGO_MANIFEST_DIR"));
    let vars: Vec<(String, String)> = [
        ("DATABASE_URL", env.database_url.clone()),
        ("NATS_URL", understudy_tests::nats_url()),
        ("UNDERSTUDY_NATS_PREFIX", env.prefix.clone()),
        ("UNDERSTUDY_LISTEN", addr.clone()),
        ("UNDERSTUDY_PUBLIC_URL", "https://understudy.test".into()),
        ("UNDERSTUDY_DATA_DIR", dir.join("data").display().to_string()),
        ("UNDERSTUDY_PREVIEW_DOMAIN", "preview.localhost".into()),
        ("GITHUB_GIT_URL", repos::git_url(dir)),
        ("UNDERSTUDY_WING_TOOLCHAIN", repos::root().join("toolchain/wing").display().to_string()),
        ("UNDERSTUDY_LEASE_SECONDS", "3".into()),
        ("GITHUB_WEBHOOK_SECRET", SECRET.into()),
        ("GITHUB_APP_ID", APP_ID.to_string()),
        ("GITHUB_APP_PRIVATE_KEY", key),
        ("GITHUB_API_URL", github.base_url()),
        ("RUST_LOG", "warn".into()),
        ("UNDERSTUDY_DB_POOL", "8".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let role =
        |name: &'static str| Role { args: vec![name], env: vars.clone(), log: dir.join(format!("{name}.log")), child: None, starts: 0 };
    let mut roles = [role("api"), role("worker"), role("relay"), role("projector")];
    for role in &mut roles {
        role.ensure_running();
    }
    deliver(&addr, "installation", "chaos-install", &installed).await;
    eventually(Duration::from_secs(30), "the installation to be processed", || async {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM webhook_deliveries WHERE delivery_id = 'chaos-install'")
            .fetch_optional(env.pool())
            .await
            .ok()?;
        (state.as_deref() == Some("done")).then_some(())
    })
    .await;

    // The load: deployments cycling through the synthetic environments, paced to last
    // LOAD_SECONDS; the real pull requests opened at once and pushed to halfway through.
    let per_deployment = 4 + TESTS_PER_DEPLOYMENT as u64;
    let deployments_each = (target_events / per_deployment / LOAD_ENVIRONMENTS).max(1);
    let pace = Duration::from_secs_f64(LOAD_SECONDS / deployments_each as f64);
    let mut writers = tokio::task::JoinSet::new();
    let mut load_numbers = Vec::new();
    for n in 0..LOAD_ENVIRONMENTS {
        let number = 1000 + n;
        let spec = EnvironmentSpec {
            project_id: project,
            target: Target::PullRequest { number, head_branch: BranchName::parse(format!("load-{number}")).expect("branch") },
            entrypoint: Entrypoint::parse("main.w").expect("entrypoint"),
        };
        load_numbers.push(number);
        let first_commit = 1_000_000 + n * 100_000;
        writers.spawn(load(env.runtime.store.environments.clone(), env.pool().clone(), spec, deployments_each, first_commit, pace));
    }
    let pushes = {
        let (addr, heads) = (addr.clone(), heads.clone());
        tokio::spawn(async move {
            for (number, first, _) in &heads {
                deliver(&addr, "pull_request", &format!("chaos-open-{number}"), &pull_request_event("opened", *number, first)).await;
            }
            tokio::time::sleep(Duration::from_secs_f64(LOAD_SECONDS / 2.0)).await;
            for (number, first, second) in &heads {
                let mut payload = pull_request_event("synchronize", *number, second);
                payload["before"] = first.as_str().into();
                payload["after"] = second.as_str().into();
                deliver(&addr, "pull_request", &format!("chaos-sync-{number}"), &payload).await;
            }
        })
    };

    // Kill one role at a random moment, again and again, while the load runs: each round kills
    // every role once, in a random order, so that none is spared by chance.
    let mut kills: HashMap<&'static str, usize> = HashMap::new();
    let mut round: Vec<usize> = Vec::new();
    while !writers.is_empty() {
        tokio::time::sleep(Duration::from_millis(250 + dice.roll(750))).await;
        if round.is_empty() {
            round = (0..roles.len()).collect();
        }
        let next = round.swap_remove(dice.roll(round.len() as u64) as usize);
        let victim = &mut roles[next];
        victim.kill();
        *kills.entry(victim.args[0]).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(dice.roll(300))).await;
        for role in &mut roles {
            role.ensure_running();
        }
        while let Some(done) = writers.try_join_next() {
            done.expect("load writer");
        }
    }
    pushes.await.expect("pushes");
    eprintln!("chaos with GitHub: kills {kills:?}");
    for name in ["api", "worker", "relay", "projector"] {
        assert!(kills.get(name).copied().unwrap_or(0) >= 2, "{name} was killed fewer than twice: {kills:?} (seed {seed})");
    }

    // Undisturbed now: everything settles by itself.
    let real: Vec<(EnvironmentId, CommitSha)> = heads
        .iter()
        .map(|(number, _, second)| {
            let target =
                Target::PullRequest { number: *number, head_branch: BranchName::parse(format!("feature-{number}")).expect("branch") };
            (EnvironmentId::derive(project, &target, &Entrypoint::parse(".").expect("entrypoint")), second.clone())
        })
        .collect();
    let (deadline, mut last_head, mut waiting) = (std::time::Instant::now() + Duration::from_secs(300), -1, String::new());
    let total = loop {
        assert!(std::time::Instant::now() < deadline, "not settled after the chaos (seed {seed}): {waiting}; logs in {}", dir.display());
        tokio::time::sleep(Duration::from_millis(500)).await;
        for role in &mut roles {
            role.ensure_running();
        }
        match settled(&env, &real).await {
            Err(why) => waiting = why,
            // Quiet, and still at the same head as at the last look.
            Ok(head) if head == last_head => break head,
            Ok(head) => last_head = head,
        }
    };

    // Nothing lost or doubled in the read models.
    let lags = understudy_projections::projector::lag(env.pool()).await.expect("lag");
    projected_exactly_once(env.pool(), &lags, total).await;

    // One sticky comment per pull request, showing what was last written.
    let numbers: Vec<u64> = heads.iter().map(|h| h.0).chain(load_numbers).collect();
    for number in &numbers {
        let ours: Vec<_> = github.comments(&full_name, *number).into_iter().filter(|c| c.by_app).collect();
        assert_eq!(ours.len(), 1, "PR #{number}: {} comments of ours (seed {seed})", ours.len());
        let written: String = sqlx::query_scalar("SELECT body_sha256 FROM github_comments WHERE project_id = $1 AND pr_number = $2")
            .bind(project.0)
            .bind(*number as i64)
            .fetch_one(env.pool())
            .await
            .expect("written comment");
        use sha2::Digest;
        assert_eq!(hex::encode(sha2::Sha256::digest(ours[0].body.as_bytes())), written, "PR #{number}'s comment is the last written");
    }
    let real_comment = &github.comments(&full_name, 1).into_iter().find(|c| c.by_app).expect("comment").body;
    assert!(real_comment.contains("✅ Ready"), "{real_comment}");

    // One GitHub deployment and one check run per environment × commit, for every deployment.
    let ours: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT payload->>'deployment_id' FROM event_log WHERE event_type = 'DeploymentRequested' AND payload->>'deployment_id' IS NOT NULL",
    )
    .fetch_all(env.pool())
    .await
    .expect("deployments");
    let ours: BTreeSet<String> = ours.into_iter().collect();
    let made = github.deployments();
    let mut per_commit: HashMap<(String, String), usize> = HashMap::new();
    for deployment in &made {
        let key = (deployment["environment"].as_str().unwrap_or("").to_string(), deployment["sha"].as_str().unwrap_or("").to_string());
        *per_commit.entry(key).or_default() += 1;
    }
    let doubled: Vec<_> = per_commit.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "GitHub deployments made twice (seed {seed}): {doubled:?}");
    let made_for: BTreeSet<String> =
        made.iter().map(|d| d["payload"]["understudy_deployment"].as_str().unwrap_or("").to_string()).collect();
    assert_eq!(made_for, ours, "a GitHub deployment for each of ours, and no other");
    let deployments_path = format!("/repos/{full_name}/deployments");
    let posted = github.requests().iter().filter(|r| r.method == "POST" && r.path == deployments_path).count();
    assert_eq!(posted, made.len(), "every deployment POST made one deployment: none was asked for twice");
    let mut runs: HashMap<String, usize> = HashMap::new();
    for run in github.check_runs() {
        *runs.entry(format!("{} {}", run["name"].as_str().unwrap_or(""), run["head_sha"].as_str().unwrap_or(""))).or_default() += 1;
    }
    let doubled: Vec<_> = runs.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "check runs made twice (seed {seed}): {doubled:?}");
    assert_eq!(runs.len(), ours.len(), "a check run for each deployment");
    eprintln!(
        "chaos with GitHub: {total} events, {} deployments, {} comments, {} GitHub requests; starts {:?}",
        ours.len(),
        numbers.len(),
        github.requests().len(),
        roles.iter().map(|r| (r.args[0], r.starts)).collect::<Vec<_>>()
    );
    for role in &mut roles {
        role.kill();
    }
    let _ = std::fs::remove_dir_all(&kept);
}
