//! The `understudy` binary as an operator uses it.

use std::process::{Command, Stdio};
use std::time::Duration;

use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_tests::fixtures::{self, meta};
use understudy_tests::{eventually, understudy_bin, TestEnv};
use uuid::Uuid;

#[test]
fn every_subcommand_has_help() {
    for args in [
        vec!["--help"],
        vec!["up", "--help"],
        vec!["api", "--help"],
        vec!["relay", "--help"],
        vec!["projector", "--help"],
        vec!["migrate", "--help"],
        vec!["replay", "--help"],
        vec!["events", "--help"],
        vec!["status", "--help"],
        vec!["usage", "--help"],
        vec!["trace", "--help"],
        vec!["state", "--help"],
        vec!["verify", "--help"],
        vec!["project", "create", "--help"],
        vec!["bench", "--help"],
        vec!["bench", "append", "--help"],
        vec!["bench", "latency", "--help"],
        vec!["bench", "webhooks", "--help"],
        vec!["github", "app-manifest", "--help"],
        vec!["tier", "set", "--help"],
        vec!["tier", "promote", "--help"],
        vec!["tier", "rollback", "--help"],
    ] {
        let output = Command::new(understudy_bin()).args(&args).output().expect("run");
        assert!(output.status.success(), "{args:?}: {}", String::from_utf8_lossy(&output.stderr));
        assert!(String::from_utf8_lossy(&output.stdout).contains("Usage:"), "{args:?}");
    }
}

#[test]
fn an_unreachable_postgres_gets_one_clear_line_and_a_failure_code() {
    let output = Command::new(understudy_bin())
        .arg("relay")
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/understudy")
        .env("NATS_URL", understudy_tests::nats_url())
        .env("UNDERSTUDY_NATS_PREFIX", format!("t{}", &Uuid::new_v4().simple().to_string()[..12]))
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("cannot connect to Postgres at postgres://postgres@127.0.0.1:1/understudy"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// The relay and the projectors work from Postgres alone while NATS is away: started without
/// it, each says so in a clear line and keeps running (and numbering or projecting the log)
/// instead of exiting until NATS is back. A NATS_URL that is not a URL is still an error.
#[test]
fn the_relay_and_projectors_start_without_nats_and_say_so() {
    use std::io::BufRead;
    let env = tokio::runtime::Runtime::new().expect("runtime").block_on(TestEnv::new());
    for role in ["relay", "projector"] {
        let mut child = Command::new(understudy_bin())
            .arg(role)
            .env("DATABASE_URL", &env.database_url)
            .env("NATS_URL", "nats://127.0.0.1:1")
            .env("UNDERSTUDY_NATS_PREFIX", &env.prefix)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .spawn()
            .expect("run");
        let stderr = child.stderr.take().expect("stderr");
        let (lines, said) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = lines.send(line);
            }
        });
        let line = loop {
            let line = said.recv_timeout(Duration::from_secs(20)).unwrap_or_else(|_| panic!("{role} said nothing about NATS in 20 s"));
            if line.contains("NATS") {
                break line;
            }
        };
        assert!(line.contains("cannot connect to NATS at nats://127.0.0.1:1"), "{role}: {line}");
        std::thread::sleep(Duration::from_millis(500));
        assert!(child.try_wait().expect("try_wait").is_none(), "{role} exited without NATS");
        child.kill().expect("kill");
        child.wait().expect("wait");
    }
    let output = Command::new(understudy_bin())
        .arg("relay")
        .env("DATABASE_URL", &env.database_url)
        .env("NATS_URL", "http://[::1")
        .env("UNDERSTUDY_NATS_PREFIX", &env.prefix)
        .output()
        .expect("run");
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("is not a NATS URL"), "{}", String::from_utf8_lossy(&output.stderr));
}

/// A relay, worker, projector or scheduler process serves its own `/metrics` when asked: its
/// counters live in that process, where no API node can read them.
#[tokio::test]
async fn roles_other_than_the_api_serve_their_metrics_when_asked() {
    use tokio::io::AsyncBufReadExt;
    let env = TestEnv::new().await;
    for role in ["relay", "worker"] {
        let mut child = tokio::process::Command::new(understudy_bin())
            .args([role, "--metrics-listen", "127.0.0.1:0"])
            .env("DATABASE_URL", &env.database_url)
            .env("NATS_URL", understudy_tests::nats_url())
            .env("UNDERSTUDY_NATS_PREFIX", &env.prefix)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("run");
        let mut lines = tokio::io::BufReader::new(child.stderr.take().expect("stderr")).lines();
        let url = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.next_line().await.expect("stderr") {
                if let Some(url) = line.strip_prefix("understudy metrics on ") {
                    return url.to_string();
                }
            }
            panic!("{role} ended without saying where its metrics are");
        })
        .await
        .unwrap_or_else(|_| panic!("{role} said nothing about its metrics in 30 s"));
        let metrics = reqwest::get(&url).await.expect("metrics").text().await.expect("text");
        // This process's own counters, and what Postgres knows (of a log nothing was appended to).
        assert!(metrics.contains("\nunderstudy_sandboxes_running 0\n"), "{role}: {metrics}");
        assert!(metrics.contains("\nunderstudy_relay_standby_rounds_total 0\n"), "{role}: {metrics}");
        assert!(metrics.contains("\nunderstudy_log_head 0\n"), "{role}: {metrics}");
        let health = reqwest::get(url.replace("/metrics", "/healthz")).await.expect("healthz");
        assert!(health.status().is_success(), "{role}: {}", health.status());
        child.kill().await.expect("kill");
    }
}

#[tokio::test]
async fn events_prints_an_entity_history_as_a_table_and_as_json() {
    let env = TestEnv::new().await;
    let spec = fixtures::spec(ProjectId(Uuid::new_v4()), 3, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(Uuid::new_v4());
    env.runtime.store.environments.execute(id, fixtures::request(&spec, deployment, 1), meta()).await.expect("request");
    for command in fixtures::to_ready(deployment) {
        env.runtime.store.environments.execute(id, command, meta()).await.expect("to ready");
    }
    understudy_tests::sequence_all(env.pool()).await;
    let run = |json: bool| {
        let mut command = Command::new(understudy_bin());
        command.args(["events", &id.to_string()]).env("DATABASE_URL", &env.database_url);
        if json {
            command.arg("--json");
        }
        command.output().expect("run")
    };
    let table = run(false);
    assert!(table.status.success(), "{}", String::from_utf8_lossy(&table.stderr));
    let table = String::from_utf8_lossy(&table.stdout).to_string();
    assert_eq!(table.lines().count(), 6, "{table}");
    assert!(table.lines().nth(5).unwrap_or_default().contains("DeploymentReady"), "{table}");
    let json = run(true);
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&json.stdout).lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 5);
    assert_eq!(lines[0]["event_type"], "EnvironmentCreated");
    assert_eq!(lines[4]["aggregate_version"], 5);
    // State now and at a moment before the environment existed; trace by correlation id; verify.
    let run_args = |args: &[&str]| Command::new(understudy_bin()).args(args).env("DATABASE_URL", &env.database_url).output().expect("run");
    let state = run_args(&["state", &id.to_string()]);
    let state: serde_json::Value = serde_json::from_slice(&state.stdout).expect("state JSON");
    assert_eq!(state["aggregate_type"], "environment");
    assert_eq!(state["events"], 5);
    assert_eq!(state["state"]["deployments"][0]["status"], "Ready");
    let early = run_args(&["state", &id.to_string(), "--at", "2000-01-01T00:00:00Z"]);
    assert!(!early.status.success());
    assert!(String::from_utf8_lossy(&early.stderr).contains("had no events by 2000-01-01"));
    let correlation = lines[2]["correlation_id"].as_str().expect("correlation").to_string();
    let trace = run_args(&["trace", &correlation, "--json"]);
    assert_eq!(String::from_utf8_lossy(&trace.stdout).lines().count(), 1, "one command, one event");
    env.project(vec![
        std::sync::Arc::new(understudy_projections::environments::Environments),
        std::sync::Arc::new(understudy_projections::usage::Usage),
    ])
    .await;
    let usage = run_args(&["usage", "--format", "csv"]);
    let usage = String::from_utf8_lossy(&usage.stdout).to_string();
    let lines: Vec<&str> = usage.lines().collect();
    assert_eq!(lines.len(), 2, "{usage}");
    assert!(lines[0].starts_with("project_id,day,environments_created"), "{usage}");
    assert!(lines[1].contains(",1,1,1,0,"), "one environment, one deployment requested and ready, none failed: {usage}");
    let verify = run_args(&["verify"]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    assert!(String::from_utf8_lossy(&verify.stdout).contains("environments: live equals replay at position 5"));
    // A read model edited behind the log's back is caught.
    sqlx::query("UPDATE environments SET status = 'Failed'").execute(env.pool()).await.expect("tamper");
    let verify = run_args(&["verify", "--projection", "environments"]);
    assert!(!verify.status.success());
    assert!(
        String::from_utf8_lossy(&verify.stdout).contains("1 rows only live, 1 only in the replay"),
        "{}",
        String::from_utf8_lossy(&verify.stdout)
    );

    // An id with no history is a clear error.
    let missing = Command::new(understudy_bin())
        .args(["events", &Uuid::new_v4().to_string()])
        .env("DATABASE_URL", &env.database_url)
        .output()
        .expect("run");
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no events for"));
}

#[tokio::test]
async fn up_starts_a_private_postgres_and_nats_and_stops_cleanly_on_ctrl_c() {
    let dir = std::env::temp_dir().join(format!("understudy-up-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("data dir");
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
    for round in 0..2 {
        let child = Command::new(understudy_bin())
            .arg("up")
            .env_remove("DATABASE_URL")
            .env_remove("NATS_URL")
            .env("UNDERSTUDY_DATA_DIR", &dir)
            .env("UNDERSTUDY_LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn up");
        let body = eventually(Duration::from_secs(90), "understudy up to answer GraphQL", || async {
            let response = reqwest::Client::new()
                .post(format!("http://127.0.0.1:{port}/graphql"))
                .json(&serde_json::json!({ "query": "{ environments { id } }" }))
                .send()
                .await
                .ok()?;
            response.json::<serde_json::Value>().await.ok()
        })
        .await;
        assert!(body["data"]["environments"].is_array(), "round {round}: {body}");
        // Ctrl-C: everything stops, the private servers included, and the process exits 0.
        let pid = child.id().to_string();
        assert!(Command::new("kill").args(["-INT", &pid]).status().expect("kill").success());
        let status = tokio::task::spawn_blocking(move || child.wait_with_output()).await.expect("join").expect("wait");
        let stderr = String::from_utf8_lossy(&status.stderr);
        assert!(status.status.success(), "round {round}: {stderr}");
        // Its connections closed before its servers stopped: no client saw one go away.
        assert!(!stderr.contains("IO error") && !stderr.contains("disconnected"), "round {round}: {stderr}");
    }
    assert!(dir.join("postgres").join("PG_VERSION").exists(), "the data dir was kept across restarts");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_app_manifest_names_our_webhook_and_permissions() {
    let output = Command::new(understudy_bin())
        .args(["github", "app-manifest"])
        .env("UNDERSTUDY_PUBLIC_URL", "https://previews.example.com/")
        .output()
        .expect("run");
    assert!(output.status.success());
    let manifest: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON");
    assert_eq!(manifest["hook_attributes"]["url"], "https://previews.example.com/webhooks/github");
    assert_eq!(manifest["default_permissions"]["pull_requests"], "write");
    // A tier's pushTo writes to the repository.
    assert_eq!(manifest["default_permissions"]["contents"], "write");
    assert!(manifest["default_events"].as_array().expect("events").iter().any(|e| e == "pull_request"));
}

#[tokio::test]
async fn tiers_are_declared_listed_frozen_and_refused_with_reasons_from_the_command_line() {
    use understudy_domain::project::{EntrypointRule, ProjectCommand};
    use understudy_domain::values::{BranchName, ProjectName, RepoFullName};

    let env = TestEnv::new().await;
    let project = ProjectId(Uuid::new_v4());
    let create = ProjectCommand::Create {
        project_id: project,
        account_id: understudy_domain::ids::AccountId(Uuid::new_v4()),
        name: ProjectName::parse("app").expect("name"),
        repository: RepoFullName::parse("octo/app").expect("repo"),
        production_branch: BranchName::parse("main").expect("branch"),
        entrypoints: EntrypointRule::Detect,
        at: chrono::Utc::now(),
    };
    env.runtime.store.projects.execute(project.0, create, meta()).await.expect("project");
    let id = project.0.to_string();
    let run = |args: &[&str]| {
        let output = Command::new(understudy_bin()).arg("tier").args(args).env("DATABASE_URL", &env.database_url).output().expect("run");
        (output.status.success(), String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr))
    };
    for args in [
        vec!["set", "--project", &id, "staging", "--branches", "main", "--env", "CACHE=on"],
        vec!["set", "--project", &id, "production", "--from", "staging", "--manual"],
        vec!["freeze", "--project", &id, "production", "--reason", "release week"],
    ] {
        let (ok, out) = run(&args);
        assert!(ok, "{args:?}: {out}");
    }
    let (ok, listed) = run(&["list", "--project", &id]);
    assert!(ok, "{listed}");
    let lines: Vec<&str> = listed.lines().collect();
    assert!(lines[0].starts_with("production") && lines[0].contains("promoted from staging, by hand"), "{listed}");
    assert!(lines[0].contains("FROZEN by operator") && lines[0].contains("release week"), "{listed}");
    assert!(lines[1].starts_with("staging") && lines[1].contains("branches main") && lines[1].contains("[CACHE=on]"), "{listed}");

    // Refusals say why, and change nothing.
    for (args, reason) in [
        (vec!["set", "--project", &id, "qa", "--from", "nowhere"], "no tier \"nowhere\""),
        (vec!["set", "--project", &id, "staging", "--from", "production"], "circle"),
        (vec!["set", "--project", &id, "qa", "--branches", "a b"], "branch name"),
        (vec!["set", "--project", &id, "qa", "--branches", "qa", "--env", "NOEQUALS"], "NAME=value"),
        (vec!["promote", "--project", &id, "production"], "frozen by operator: release week"),
        (vec!["promote", "--project", &id, "staging"], "fed by pushes"),
    ] {
        let (ok, out) = run(&args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(out.contains(reason), "{args:?}: {out}");
    }
    let (_, again) = run(&["list", "--project", &id]);
    assert_eq!(again, listed);
}
