//! Chaos, short form: real processes killed with SIGKILL while events flow. The relay and the
//! projectors run as `understudy` child processes; NATS is a private nats-server that is killed
//! and restarted too. Afterwards every event is projected exactly once and every read model
//! equals a fresh replay.
//!
//! The sleeps here pace the faults (when to kill, how long an outage lasts) and a retry's backoff;
//! every wait for a result polls a condition with a deadline.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use understudy_domain::ids::ProjectId;
use understudy_tests::fixtures;
use understudy_tests::{eventually, graphql_ws, understudy_bin, TestEnv};
use uuid::Uuid;

fn nats_server() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/nats-server");
    assert!(path.exists(), "{} is missing: run scripts/setup", path.display());
    path
}

struct Nats {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl Nats {
    fn start(dir: PathBuf) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
        let mut nats = Self { port, dir, child: None };
        nats.spawn();
        nats
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let config = self.dir.join("nats.conf");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n",
                self.port,
                self.dir.join("js").display()
            ),
        )
        .expect("config");
        let log = std::fs::File::create(self.dir.join("nats.log")).expect("log");
        self.child =
            Some(Command::new(nats_server()).arg("-c").arg(&config).stdout(Stdio::null()).stderr(log).spawn().expect("nats-server"));
        // The roles started next connect at once, and the relay and projectors exit when no NATS
        // server answers at start: return once it listens.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server did not listen on {} within 20 s", self.port);
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One `understudy <role>` child, restarted by `ensure_running` whenever it is not running.
pub(crate) struct Role {
    pub(crate) args: Vec<&'static str>,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) log: PathBuf,
    pub(crate) child: Option<Child>,
    pub(crate) starts: usize,
}

impl Role {
    pub(crate) fn ensure_running(&mut self) {
        let exited = match self.child.as_mut() {
            None => true,
            Some(child) => child.try_wait().expect("try_wait").is_some(),
        };
        if exited {
            let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log");
            let mut command = Command::new(understudy_bin());
            command.args(&self.args).stdout(Stdio::null()).stderr(log);
            for (key, value) in &self.env {
                command.env(key, value);
            }
            self.child = Some(command.spawn().expect("spawn role"));
            self.starts += 1;
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A scratch directory, a private nats-server listening there, and relay and projector roles
/// pointed at it and at `env`'s database (not started yet).
fn relay_and_projector(env: &TestEnv, name: &str) -> (PathBuf, Nats, Role, Role) {
    let dir = std::env::temp_dir().join(format!("understudy-{name}-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let nats = Nats::start(dir.clone());
    let vars = vec![
        ("DATABASE_URL".to_string(), env.database_url.clone()),
        ("NATS_URL".to_string(), nats.url()),
        ("UNDERSTUDY_NATS_PREFIX".to_string(), env.prefix.clone()),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ];
    let relay = Role { args: vec!["relay"], env: vars.clone(), log: dir.join("relay.log"), child: None, starts: 0 };
    let projector = Role { args: vec!["projector"], env: vars, log: dir.join("projector.log"), child: None, starts: 0 };
    (dir, nats, relay, projector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_the_projector_and_nats_loses_and_doubles_nothing() {
    let env = TestEnv::new().await;
    let (dir, mut nats, mut relay, mut projector) = relay_and_projector(&env, "chaos");

    const PULL_REQUESTS: u64 = 1000;
    let writer = {
        let store = env.runtime.store.environments.clone();
        tokio::spawn(async move { fixtures::deploy_prs(&store, ProjectId(Uuid::new_v4()), 0..PULL_REQUESTS).await })
    };
    // Kill something every 100–400 ms while the writer runs: the relay, the projector, or NATS.
    let mut round = 0u64;
    while !writer.is_finished() {
        relay.ensure_running();
        projector.ensure_running();
        tokio::time::sleep(Duration::from_millis(100 + (round * 137) % 300)).await;
        match round % 5 {
            0 | 3 => relay.kill(),
            1 | 4 => projector.kill(),
            _ => {
                nats.kill();
                tokio::time::sleep(Duration::from_millis(300)).await;
                nats.spawn();
            }
        }
        round += 1;
    }
    writer.await.expect("writer");
    let total = (PULL_REQUESTS * 5) as i64;

    // Then let them run undisturbed and catch up.
    let lags = eventually(Duration::from_secs(90), "every projection to catch up after the chaos", || {
        relay.ensure_running();
        projector.ensure_running();
        at_head(env.pool().clone(), total)
    })
    .await;
    assert!(round >= 10, "the chaos loop ran only {round} rounds");
    projected_exactly_once(env.pool(), &lags, total).await;
    eprintln!("chaos: {round} kills; relay started {} times, projector {} times", relay.starts, projector.starts);
    // Kills are expected; a projector that stopped on its own (an event it could not place) is not.
    let log = std::fs::read_to_string(dir.join("projector.log")).unwrap_or_default();
    assert!(!log.contains("projector stopped"), "{log}");
    relay.kill();
    projector.kill();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every projection's checkpoint at the log's head, and the head at `total`: their lags then.
async fn at_head(pool: sqlx::PgPool, total: i64) -> Option<Vec<understudy_projections::projector::Lag>> {
    let lags = understudy_projections::projector::lag(&pool).await.ok()?;
    (!lags.is_empty() && lags.iter().all(|l| l.head == total && l.lag == 0)).then_some(lags)
}

/// After catching up: every checkpoint at `total`, every event in the history once, and every
/// read model equal to a fresh replay of the log.
pub(crate) async fn projected_exactly_once(pool: &sqlx::PgPool, lags: &[understudy_projections::projector::Lag], total: i64) {
    assert!(lags.iter().all(|l| l.checkpoint == total), "{lags:?}");
    let history: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM entity_history").fetch_one(pool).await.expect("count");
    assert_eq!(history, total, "every event projected exactly once");
    for projection in understudy_projections::all() {
        let report = understudy_projections::replay::verify(pool, projection.as_ref()).await.expect("verify");
        assert!(report.differences.is_empty(), "{report:#?}");
    }
}

/// Runs `command` until it is applied, through connection failures. After a failure the command
/// may have committed before the answer was lost; a later refusal then means it already applied.
async fn execute_through_outages(
    store: &understudy_adapters::AggregateStore<understudy_domain::environment::EnvironmentAggregate>,
    id: Uuid,
    command: understudy_domain::environment::EnvironmentCommand,
) {
    let mut failed_before = false;
    for _ in 0..600 {
        match store.execute(id, command.clone(), fixtures::meta()).await {
            Ok(_) => return,
            Err(understudy_adapters::CommandError::Domain(error)) => {
                assert!(failed_before, "refused without an outage: {error}");
                return;
            }
            Err(_) => {
                failed_before = true;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    panic!("the command never went through");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_postgres_and_nats_mid_load_loses_and_doubles_nothing() {
    let dir = std::env::temp_dir().join(format!("understudy-restart-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let embedded = understudy_adapters::embedded::Embedded::start(&dir).await.expect("private Postgres and NATS");
    let port = |url: &str| url.rsplit(':').next().and_then(|p| p.split('/').next()).and_then(|p| p.parse::<u16>().ok()).expect("port");
    let (database_url, nats_url) = (embedded.database_url().to_string(), embedded.nats_url().to_string());
    let ports = (port(&database_url), port(&nats_url));
    let runtime = understudy_api::runtime::Runtime::connect(
        &database_url,
        &nats_url,
        understudy_adapters::nats::Topology::new("restart").expect("prefix"),
    )
    .await
    .expect("connect");
    let vars = vec![
        ("DATABASE_URL".to_string(), database_url.clone()),
        ("NATS_URL".to_string(), nats_url.clone()),
        ("UNDERSTUDY_NATS_PREFIX".to_string(), "restart".to_string()),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ];
    let mut relay = Role { args: vec!["relay"], env: vars.clone(), log: dir.join("relay.log"), child: None, starts: 0 };
    let mut projector = Role { args: vec!["projector"], env: vars, log: dir.join("projector.log"), child: None, starts: 0 };
    relay.ensure_running();
    projector.ensure_running();

    const PULL_REQUESTS: u64 = 400;
    let writer = {
        let store = runtime.store.environments.clone();
        tokio::spawn(async move {
            let project = ProjectId(Uuid::new_v4());
            for pr in 0..PULL_REQUESTS {
                let spec = fixtures::spec(project, pr, "main.w");
                let id = fixtures::env_id(&spec).0;
                let deployment = understudy_domain::ids::DeploymentId(Uuid::new_v4());
                execute_through_outages(&store, id, fixtures::request(&spec, deployment, 1)).await;
                for command in fixtures::to_ready(deployment) {
                    execute_through_outages(&store, id, command).await;
                }
            }
        })
    };
    // Mid-load, stop Postgres and NATS together for two seconds, then bring them back on the same
    // ports with their data; twice.
    let mut embedded = Some(embedded);
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(!writer.is_finished(), "the outage must come while commands are being appended");
        if let Some(running) = embedded.take() {
            running.stop().await.expect("stop");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        embedded = Some(understudy_adapters::embedded::Embedded::start_on(&dir, Some(ports)).await.expect("restart"));
    }
    writer.await.expect("writer");
    let total = (PULL_REQUESTS * 5) as i64;
    let pool = runtime.pool.clone();
    eventually(Duration::from_secs(90), "every projection to catch up after the restarts", || {
        relay.ensure_running();
        projector.ensure_running();
        at_head(pool.clone(), total)
    })
    .await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log").fetch_one(&pool).await.expect("count");
    assert_eq!(events, total, "every command appended exactly once");
    let history: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM entity_history").fetch_one(&pool).await.expect("count");
    assert_eq!(history, total, "every event projected exactly once");
    for projection in understudy_projections::all() {
        let report = understudy_projections::replay::verify(&pool, projection.as_ref()).await.expect("verify");
        assert!(report.differences.is_empty(), "{report:#?}");
    }
    relay.kill();
    projector.kill();
    if let Some(running) = embedded {
        running.stop().await.expect("stop");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// NATS gone for 30 s under load: appends go on (Postgres is the truth), the projections keep up
/// from the Postgres log, the API keeps answering queries and says it is not ready, an API
/// process, the relay and the projector killed meanwhile start again without NATS and carry on,
/// the API's live subscriber gets what changed while NATS was away, and afterwards every event
/// is projected exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thirty_second_nats_outage_loses_nothing_and_projections_keep_up_from_postgres() {
    let env = TestEnv::new().await;
    let dir = std::env::temp_dir().join(format!("understudy-outage-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mut nats = Nats::start(dir.clone());
    let api_port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let vars = vec![
        ("DATABASE_URL".to_string(), env.database_url.clone()),
        ("NATS_URL".to_string(), nats.url()),
        ("UNDERSTUDY_NATS_PREFIX".to_string(), env.prefix.clone()),
        ("UNDERSTUDY_DATA_DIR".to_string(), dir.display().to_string()),
        ("UNDERSTUDY_LISTEN".to_string(), format!("127.0.0.1:{api_port}")),
        ("RUST_LOG".to_string(), "warn".to_string()),
    ];
    let role = |args: Vec<&'static str>, log: &str| Role { args, env: vars.clone(), log: dir.join(log), child: None, starts: 0 };
    let (mut relay, mut projector, mut api) =
        (role(vec!["relay"], "relay.log"), role(vec!["projector"], "projector.log"), role(vec!["api"], "api.log"));
    for role in [&mut relay, &mut projector, &mut api] {
        role.ensure_running();
    }
    let http = reqwest::Client::new();
    let graphql = |http: reqwest::Client| async move {
        let response = http
            .post(format!("http://127.0.0.1:{api_port}/graphql"))
            .json(&serde_json::json!({ "query": "{ environments { id status } }" }))
            .send()
            .await
            .ok()?;
        (response.status() == 200).then_some(response.json::<serde_json::Value>().await.ok()?)
    };
    eventually(Duration::from_secs(20), "the API to answer", || graphql(http.clone())).await;

    // Some events before the outage, the rest during it.
    const PULL_REQUESTS: u64 = 200;
    let project = ProjectId(Uuid::new_v4());
    fixtures::deploy_prs(&env.runtime.store.environments, project, 0..50).await;
    nats.kill();
    let outage = std::time::Instant::now();
    // During the outage: queries are answered from Postgres, readiness says why it is not ready.
    // Give the API's NATS client time to notice the server is gone (its reads must not care).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let data = graphql(http.clone()).await.expect("queries are answered while NATS is down");
    assert!(data["data"]["environments"].is_array(), "{data}");
    let ready = http.get(format!("http://127.0.0.1:{api_port}/readyz")).send().await.expect("readyz");
    assert_eq!(ready.status(), 503);
    assert!(ready.text().await.expect("body").contains("nats"), "readiness names NATS");
    // An API process killed during the outage starts again without NATS and serves from Postgres;
    // so do the relay and the projector, which go on numbering and projecting the log (below).
    for role in [&mut api, &mut relay, &mut projector] {
        role.kill();
        role.ensure_running();
    }
    // The rest of the events are appended after those restarts.
    let writer = {
        let store = env.runtime.store.environments.clone();
        tokio::spawn(async move { fixtures::deploy_prs(&store, project, 50..PULL_REQUESTS).await })
    };
    let data = eventually(Duration::from_secs(20), "an API started during the outage to answer", || graphql(http.clone())).await;
    assert!(data["data"]["environments"].is_array(), "{data}");
    // A live subscriber of that API, subscribed while NATS is down.
    let mut ws = graphql_ws::connect(format!("127.0.0.1:{api_port}").parse().expect("addr")).await;
    graphql_ws::subscribe(
        &mut ws,
        "1",
        "subscription($p: UUID) { environmentUpdated(projectId: $p) { pullRequest status position } }",
        serde_json::json!({ "p": project.0 }),
    )
    .await;
    // The projections keep up from the Postgres log while NATS is away.
    let total = (PULL_REQUESTS * 5) as i64;
    eventually(Duration::from_secs(25), "the projections to reach the head of the log without NATS", || at_head(env.pool().clone(), total))
        .await;
    // The outage itself is the point: hold it for its full 30 s.
    while outage.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(writer.is_finished(), "appends went on while NATS was down");
    writer.await.expect("the writer never needed NATS");
    nats.spawn();
    // Every change happened while NATS was away, so no notice of it will ever come: the API
    // re-reads what changed once it is connected, and the subscriber gets the last pull request.
    let last = PULL_REQUESTS - 1;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let message = graphql_ws::next_json(&mut ws).await;
            let environment = &message["payload"]["data"]["environmentUpdated"];
            assert_ne!(message["type"], "error", "{message}");
            if environment["pullRequest"] == last && environment["status"] == "READY" {
                break;
            }
        }
    })
    .await
    .expect("the subscriber gets the changes made while NATS was away");
    let lags = eventually(Duration::from_secs(90), "every projection to catch up after the outage", || {
        for role in [&mut relay, &mut projector, &mut api] {
            role.ensure_running();
        }
        at_head(env.pool().clone(), total)
    })
    .await;
    projected_exactly_once(env.pool(), &lags, total).await;
    eventually(Duration::from_secs(30), "the restarted API to answer", || graphql(http.clone())).await;
    for role in [&mut relay, &mut projector, &mut api] {
        role.kill();
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// NATS frozen under load (SIGSTOP: its connections stay open and nothing answers, as a server
/// stalled on its disk or behind a dead link looks to a client): no error tells the projector
/// anything is wrong, yet while it lasts every event reaches the read models from the Postgres log
/// within seconds of being numbered, and once NATS thaws every event is projected exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_nats_holds_no_projection_back() {
    let env = TestEnv::new().await;
    let (dir, nats, mut relay, mut projector) = relay_and_projector(&env, "frozen");
    relay.ensure_running();
    projector.ensure_running();
    let project = ProjectId(Uuid::new_v4());
    // Flowing through JetStream first, so the projector's consumer is live when NATS freezes.
    fixtures::deploy_prs(&env.runtime.store.environments, project, 0..10).await;
    eventually(Duration::from_secs(30), "the projections to follow through NATS", || at_head(env.pool().clone(), 50)).await;

    let pid = nats.child.as_ref().expect("nats runs").id().to_string();
    let signal = |name: &str| {
        let status = Command::new("kill").args([name, pid.as_str()]).status().expect("kill");
        assert!(status.success(), "kill {name} {pid}");
    };
    signal("-STOP");
    // One pull request every 250 ms for 40 s (long enough for the pull's missed heartbeats to end
    // it, after which every JetStream request waits for its timeout), while a sampler notes how
    // long the oldest event numbered but not yet applied by every projection has waited.
    const PULL_REQUESTS: u64 = 160;
    let writer = {
        let store = env.runtime.store.environments.clone();
        tokio::spawn(async move {
            for pr in 10..10 + PULL_REQUESTS {
                fixtures::deploy_prs(&store, project, pr..pr + 1).await;
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let mut waiting: std::collections::VecDeque<(i64, std::time::Instant)> = Default::default();
    let mut longest = Duration::ZERO;
    let total = ((10 + PULL_REQUESTS) * 5) as i64;
    loop {
        let lags = understudy_projections::projector::lag(env.pool()).await.expect("lag");
        let (head, applied) = (lags[0].head, lags.iter().map(|l| l.checkpoint).min().expect("projections"));
        let now = std::time::Instant::now();
        if waiting.back().is_none_or(|&(position, _)| head > position) {
            waiting.push_back((head, now));
        }
        while waiting.front().is_some_and(|&(position, _)| position <= applied) {
            waiting.pop_front();
        }
        if let Some(&(_, since)) = waiting.front() {
            longest = longest.max(now - since);
        }
        if writer.is_finished() && applied == total {
            break;
        }
        assert!(longest < Duration::from_secs(15), "the projections stopped following the log while NATS was frozen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    writer.await.expect("writer");
    eprintln!("while NATS was frozen, the longest an event waited for every projection: {longest:?}");
    // A healthy stream delivers in tens of milliseconds and the log is read within a fifth of a
    // second of a stall; seconds here would mean the projector waited on the frozen server.
    assert!(longest < Duration::from_secs(3), "an event waited {longest:?} for the projections while NATS was frozen");

    signal("-CONT");
    fixtures::deploy_prs(&env.runtime.store.environments, project, 10 + PULL_REQUESTS..20 + PULL_REQUESTS).await;
    let total = total + 50;
    let lags = eventually(Duration::from_secs(60), "every projection to follow after NATS thawed", || {
        relay.ensure_running();
        projector.ensure_running();
        at_head(env.pool().clone(), total)
    })
    .await;
    projected_exactly_once(env.pool(), &lags, total).await;
    relay.kill();
    projector.kill();
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);
}
