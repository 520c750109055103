//! `understudy bench`: throughput and latency, each printed beside a baseline measured in the
//! same run on the same servers, as a ratio. Each bench runs in a database and NATS prefix of its
//! own, created for the run and dropped after it, so it never touches real data.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::Utc;
use clap::Subcommand;
use futures::{SinkExt, StreamExt};
use sqlx::PgPool;
use tokio::sync::Mutex;
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use understudy_adapters::nats::Topology;
use understudy_adapters::AggregateStore;
use understudy_domain::environment::{EnvironmentAggregate, EnvironmentCommand, EnvironmentSpec, TestOutcome};
use understudy_domain::ids::{DeploymentId, EnvironmentId, ProjectId};
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, Target};
use understudy_domain::Metadata;
use uuid::Uuid;

use crate::runtime::Runtime;

#[derive(Subcommand, Clone, Debug)]
pub enum Bench {
    /// Events/s through the full command path vs raw INSERTs of the same payloads.
    Append {
        #[arg(long, default_value_t = 16)]
        writers: usize,
        /// Deployment cycles per writer (6 commands, 7 events each).
        #[arg(long, default_value_t = 40)]
        cycles: usize,
    },
    /// Signed webhook deliveries accepted per second and time to 2xx, vs a raw HMAC-verify loop.
    Webhooks {
        #[arg(long, default_value_t = 5000)]
        deliveries: usize,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
    },
    /// Deployment requested → preview Ready (fetch, build, sandbox, health check) for an example
    /// app, cold and warm, vs the raw toolchain compiling and serving the same app unsandboxed.
    Preview {
        /// A directory holding the app (it becomes a git repository's only commit).
        #[arg(long, default_value = "examples/wing-hello")]
        app: std::path::PathBuf,
        /// Entrypoint to deploy (`main.w`, or `.` for a Node/Procfile app).
        #[arg(long, default_value = "main.w")]
        entrypoint: String,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The Wing toolchain's directory.
        #[arg(long, default_value = "toolchain/wing")]
        wing_toolchain: std::path::PathBuf,
    },
    /// graphql-ws subscribers held by one API node, and how long one environment change takes to
    /// reach all of them, vs core NATS fanning one message out to as many subscriptions. Also the
    /// latency of the environments query of a project with `environments` environments, vs the
    /// same SQL run directly.
    Fanout {
        #[arg(long, default_value_t = 10_000)]
        subscribers: usize,
        /// Changes fanned out, one at a time.
        #[arg(long, default_value_t = 10)]
        changes: usize,
        #[arg(long, default_value_t = 1000)]
        environments: usize,
    },
    /// The subscribers of `fanout`, in a process of their own (file descriptors are per process).
    #[command(hide = true)]
    FanoutClients {
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long)]
        project: Uuid,
        #[arg(long)]
        subscribers: usize,
    },
    /// The binary as separate roles (2× api, 2× projector, 2× worker, relay, scheduler) on a
    /// three-node NATS cluster (event stream R3): a healthy run, then the same load while the
    /// stream leader's nats-server and one process of each role are killed (SIGKILL) and started
    /// again. Prints both runs' latency; fails if anything was lost or doubled. Starts its own
    /// nats-servers (NATS_URL is not used).
    Scale {
        /// Test results recorded per second in each run.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        /// Length of each run.
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// How long a killed role stays down before it is started again.
        #[arg(long, default_value_t = 250)]
        restart_ms: u64,
        /// How long the killed nats-server stays down.
        #[arg(long, default_value_t = 3000)]
        nats_down_ms: u64,
        /// The app pushed to the branches the workers build.
        #[arg(long, default_value = "examples/node-hello")]
        app: std::path::PathBuf,
        /// Branches pushed (and built) per run.
        #[arg(long, default_value_t = 2)]
        branches: usize,
    },
    /// Rebuilding the environments read model from a log grown to each size (real events of the
    /// command path, copied), vs a raw sequential read of the same log; with the log's size on
    /// disk and a page query at each size.
    Replay {
        /// Log sizes, in events, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10000,100000,1000000")]
        sizes: Vec<u64>,
    },
    /// The reads by position of `environmentUpdated` subscriptions (a resume's page, the rows
    /// between two notices, the newest page), for one project and for every project, on a read
    /// model of `environments` environments; vs the same reads without the position indexes.
    Reads {
        #[arg(long, default_value_t = 200_000)]
        environments: u64,
        #[arg(long, default_value_t = 1000)]
        projects: u64,
        #[arg(long, default_value_t = 50)]
        runs: usize,
    },
    /// Event appended → GraphQL subscriber received, at a fixed rate, vs core NATS pub→sub.
    Latency {
        #[arg(long, default_value_t = 500)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// A database and NATS prefix that exist only for one bench run.
pub(crate) struct Scratch {
    admin: PgPool,
    database: String,
    database_url: String,
    pub(crate) runtime: Runtime,
}

impl Scratch {
    async fn new(database_url: &str, nats_url: &str) -> anyhow::Result<Self> {
        let prefix = format!("bench{}", &Uuid::new_v4().simple().to_string()[..8]);
        Self::with_topology(database_url, nats_url, Topology::new(prefix)?).await
    }

    pub(crate) async fn with_topology(database_url: &str, nats_url: &str, topology: Topology) -> anyhow::Result<Self> {
        let admin = understudy_adapters::db::connect(database_url, 2).await?;
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("understudy_bench_{}", &id[..12]);
        sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await.context("creating the bench database")?;
        let mut url: url_lite::Url = url_lite::Url::parse(database_url)?;
        url.set_database(&database);
        let database_url = url.to_string();
        let runtime = Runtime::connect(&database_url, nats_url, topology).await?;
        Ok(Self { admin, database, database_url, runtime })
    }

    /// The URL of the bench's own database.
    pub(crate) fn database_url(&self) -> String {
        self.database_url.clone()
    }

    pub(crate) async fn drop_all(self) -> anyhow::Result<()> {
        let _ = async_nats::jetstream::new(self.runtime.nats.clone()).delete_stream(self.runtime.topology.stream_name()).await;
        self.runtime.pool.close().await;
        sqlx::query(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database)).execute(&self.admin).await?;
        Ok(())
    }
}

mod url_lite {
    //! Just enough URL handling to point a Postgres URL at another database.
    pub struct Url {
        base: String,
        query: String,
    }

    impl Url {
        pub fn parse(url: &str) -> anyhow::Result<Self> {
            let (without_query, query) = url.split_once('?').map_or((url, String::new()), |(a, q)| (a, format!("?{q}")));
            let scheme_end = without_query.find("://").map(|i| i + 3).ok_or_else(|| anyhow::anyhow!("DATABASE_URL has no scheme"))?;
            let base = match without_query[scheme_end..].find('/') {
                Some(slash) => without_query[..scheme_end + slash].to_string(),
                None => without_query.to_string(),
            };
            Ok(Self { base, query })
        }

        pub fn set_database(&mut self, database: &str) {
            self.base = format!("{}/{database}", self.base);
        }
    }

    impl std::fmt::Display for Url {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "{}{}", self.base, self.query)
        }
    }
}

pub async fn run(database_url: &str, nats_url: &str, what: Bench) -> anyhow::Result<()> {
    match what {
        Bench::FanoutClients { addr, project, subscribers } => return crate::bench_fanout::clients(addr, project, subscribers).await,
        Bench::Scale { rate, seconds, restart_ms, nats_down_ms, app, branches } => {
            let options = crate::bench_scale::Scale {
                rate,
                seconds,
                restart_after: Duration::from_millis(restart_ms),
                nats_down: Duration::from_millis(nats_down_ms),
                app,
                branches,
            };
            return crate::bench_scale::scale(database_url, options).await;
        }
        _ => {}
    }
    let scratch = Scratch::new(database_url, nats_url).await?;
    let result = match what {
        Bench::Append { writers, cycles } => append(&scratch.runtime, writers, cycles).await,
        Bench::Latency { rate, seconds } => latency(&scratch.runtime, rate, seconds).await,
        Bench::Reads { environments, projects, runs } => crate::bench_reads::reads(&scratch.runtime, environments, projects, runs).await,
        Bench::Replay { sizes } => crate::bench_replay::replay(&scratch.runtime, &scratch.database_url(), nats_url, &sizes).await,
        Bench::Fanout { subscribers, changes, environments } => {
            crate::bench_fanout::fanout(&scratch.runtime, subscribers, changes, environments).await
        }
        Bench::FanoutClients { .. } | Bench::Scale { .. } => unreachable!("run above without a scratch database"),
        Bench::Webhooks { deliveries, concurrency } => webhooks(scratch.runtime.clone(), deliveries, concurrency).await,
        Bench::Preview { app, entrypoint, runs, wing_toolchain } => {
            preview(scratch.runtime.clone(), &app, &entrypoint, runs, &wing_toolchain).await
        }
    };
    scratch.drop_all().await?;
    result
}

pub(crate) fn spec(project: ProjectId, n: u64) -> EnvironmentSpec {
    EnvironmentSpec {
        project_id: project,
        target: Target::PullRequest { number: n, head_branch: BranchName::parse(format!("bench-{n}")).expect("valid branch") },
        entrypoint: Entrypoint::parse("main.w").expect("valid entrypoint"),
    }
}

pub(crate) fn meta() -> Metadata {
    Metadata::new(Uuid::new_v4(), "system:bench")
}

/// One deployment cycle: 6 commands, 7 events (the request also creates the environment).
pub(crate) fn cycle(spec: &EnvironmentSpec) -> Vec<EnvironmentCommand> {
    let deployment = DeploymentId(Uuid::new_v4());
    let at = Utc::now();
    let sha = CommitSha::parse(format!("{:040x}", Uuid::new_v4().as_u128())).expect("40 hex digits");
    let test = |name: &str| EnvironmentCommand::RecordTestResult {
        deployment_id: deployment,
        test: name.into(),
        outcome: TestOutcome::Passed,
        duration_ms: None,
        at,
    };
    vec![
        EnvironmentCommand::RequestDeployment {
            awaiting_approval: false,
            environment_id: EnvironmentId::derive(spec.project_id, &spec.target, &spec.entrypoint),
            spec: spec.clone(),
            deployment_id: deployment,
            commit: sha,
            at,
        },
        EnvironmentCommand::StartBuild { deployment_id: deployment, at },
        EnvironmentCommand::CompleteBuild { deployment_id: deployment, at },
        EnvironmentCommand::MarkReady { deployment_id: deployment, url: format!("http://preview/{deployment}"), at },
        test("sanity"),
        test("e2e"),
    ]
}

async fn append(runtime: &Runtime, writers: usize, cycles: usize) -> anyhow::Result<()> {
    let pool = &runtime.pool;
    // The payloads the command path stores, captured once, replayed as raw INSERTs.
    let project = ProjectId(Uuid::new_v4());
    let sample: Vec<serde_json::Value> = {
        let s = spec(project, 0);
        let mut state = Default::default();
        let mut payloads = Vec::new();
        for command in cycle(&s) {
            let events = <EnvironmentAggregate as understudy_domain::Aggregate>::decide(&state, command)?;
            for event in &events {
                state = <EnvironmentAggregate as understudy_domain::Aggregate>::apply(state, event);
            }
            payloads.push(serde_json::to_value(
                events.iter().map(|e| understudy_domain::Recorded { meta: meta(), event: e.clone() }).collect::<Vec<_>>(),
            )?);
        }
        payloads
    };
    sqlx::query("CREATE TABLE bench_raw (id uuid PRIMARY KEY, aggregate_id uuid NOT NULL, payload jsonb NOT NULL, occurred_on timestamptz NOT NULL, sequence_number int NOT NULL)")
        .execute(pool)
        .await?;

    let raw = |pool: PgPool, sample: Vec<serde_json::Value>| async move {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for _ in 0..writers {
            let (pool, sample) = (pool.clone(), sample.clone());
            tasks.spawn(async move {
                let mut events = 0u64;
                for _ in 0..cycles {
                    let aggregate = Uuid::new_v4();
                    let mut sequence = 0;
                    for command_events in &sample {
                        let list = command_events.as_array().cloned().unwrap_or_default();
                        let mut builder =
                            sqlx::QueryBuilder::new("INSERT INTO bench_raw (id, aggregate_id, payload, occurred_on, sequence_number) ");
                        builder.push_values(list, |mut row, payload| {
                            sequence += 1;
                            row.push_bind(Uuid::new_v4()).push_bind(aggregate).push_bind(payload).push_bind(Utc::now()).push_bind(sequence);
                        });
                        events += builder.build().execute(&pool).await?.rows_affected();
                    }
                }
                anyhow::Ok(events)
            });
        }
        let mut events = 0;
        while let Some(done) = tasks.join_next().await {
            events += done??;
        }
        anyhow::Ok(events as f64 / started.elapsed().as_secs_f64())
    };

    let full = |store: AggregateStore<EnvironmentAggregate>, offset: u64| async move {
        let started = Instant::now();
        let mut tasks = JoinSet::new();
        for w in 0..writers as u64 {
            let store = store.clone();
            tasks.spawn(async move {
                let mut events = 0u64;
                for c in 0..cycles as u64 {
                    let s = spec(project, offset + w * 1_000_000 + c);
                    let id = EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint).0;
                    for command in cycle(&s) {
                        events += store.execute(id, command, meta()).await?.events.len() as u64;
                    }
                }
                anyhow::Ok(events)
            });
        }
        let mut events = 0;
        while let Some(done) = tasks.join_next().await {
            events += done??;
        }
        anyhow::Ok(events as f64 / started.elapsed().as_secs_f64())
    };

    println!("bench append: {writers} writers × {cycles} cycles × 7 events; each figure is events/s");
    // Alternate the two so drift on a shared machine hits both alike; report the medians.
    let mut raws = Vec::new();
    let mut fulls = Vec::new();
    for round in 0..3u64 {
        raws.push(raw(pool.clone(), sample.clone()).await?);
        fulls.push(full(runtime.store.environments.clone(), round * 100_000_000).await?);
        println!("  round {}: raw INSERT {:>8.0}/s   command path {:>8.0}/s", round + 1, raws[round as usize], fulls[round as usize]);
    }
    let (raw, full) = (median(&mut raws), median(&mut fulls));
    println!("raw INSERT (baseline)   {raw:>8.0} events/s");
    println!("full command path       {full:>8.0} events/s   ratio {:.2}× (target ≥ 0.8×)", full / raw);
    Ok(())
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// A graphql-transport-ws connection to the API at `addr`, acknowledged, and subscribed (as
/// `1`) to `environmentUpdated` of `project` with `fields`, resuming `after` a log position.
pub(crate) async fn follow_environments(
    addr: std::net::SocketAddr,
    project: Uuid,
    fields: &str,
    after: Option<i64>,
) -> anyhow::Result<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>> {
    let mut request = format!("ws://{addr}/graphql").into_client_request()?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    // A small read buffer: tungstenite zero-fills the free part of its buffer before each read,
    // and at the default 128 KiB that was most of a bench client's CPU per message.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4 * 1024);
    let (mut ws, _) = tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
    ws.send(Message::text(r#"{"type":"connection_init"}"#)).await?;
    ws.next().await.context("no connection_ack")??;
    let subscribe = serde_json::json!({"id": "1", "type": "subscribe", "payload": {
        "query": format!("subscription($p: UUID, $a: Int) {{ environmentUpdated(projectId: $p, after: $a) {{ {fields} }} }}"),
        "variables": {"p": project.to_string(), "a": after}}});
    ws.send(Message::text(subscribe.to_string())).await?;
    Ok(ws)
}

/// `count` environments of `project`, each with a Ready deployment and no test results yet.
pub(crate) async fn ready_environments(
    store: &AggregateStore<EnvironmentAggregate>,
    project: ProjectId,
    count: u64,
) -> anyhow::Result<Vec<(Uuid, DeploymentId)>> {
    let mut deployments = Vec::new();
    for n in 0..count {
        let s = spec(project, n);
        let id = EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint).0;
        let commands = cycle(&s);
        let deployment = match &commands[0] {
            EnvironmentCommand::RequestDeployment { deployment_id, .. } => *deployment_id,
            _ => unreachable!("a cycle starts with its request"),
        };
        for command in commands.into_iter().take(4) {
            store.execute(id, command, meta()).await?;
        }
        deployments.push((id, deployment));
    }
    Ok(deployments)
}

/// When each test result named in a bench was committed (or seen, by a subscriber).
pub(crate) type Committed = Arc<Mutex<HashMap<String, Instant>>>;

/// Records `total` test results at `rate` per second, round robin over `deployments`, named
/// `{prefix}-{n}`; notes when each committed.
pub(crate) async fn record_results(
    store: &AggregateStore<EnvironmentAggregate>,
    deployments: &[(Uuid, DeploymentId)],
    prefix: &str,
    rate: u64,
    total: usize,
    committed: &Committed,
) -> anyhow::Result<()> {
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut writers = JoinSet::new();
    for n in 0..total {
        ticker.tick().await;
        let (id, deployment) = deployments[n % deployments.len()];
        let (store, committed, name) = (store.clone(), committed.clone(), format!("{prefix}-{n}"));
        writers.spawn(async move {
            let command = EnvironmentCommand::RecordTestResult {
                deployment_id: deployment,
                test: name.clone(),
                outcome: TestOutcome::Passed,
                duration_ms: None,
                at: Utc::now(),
            };
            store.execute(id, command, meta()).await?;
            committed.lock().await.insert(name, Instant::now());
            anyhow::Ok(())
        });
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    Ok(())
}

pub(crate) fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn summary(name: &str, mut samples: Vec<Duration>, sent: usize) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.50), percentile(&samples, 0.99));
    println!(
        "{name:<42} p50 {:>7.2} ms   p99 {:>7.2} ms   max {:>7.2} ms   ({} of {sent} measured)",
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        samples.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        samples.len()
    );
    (p50, p99)
}

async fn latency(runtime: &Runtime, rate: u64, seconds: u64) -> anyhow::Result<()> {
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);

    // Baseline: core NATS publish → subscriber, same rate, same machine.
    let mut subscriber = runtime.nats.subscribe(format!("{}.bench.ping", runtime.topology.prefix)).await?;
    runtime.nats.flush().await?;
    let receiver = tokio::spawn(async move {
        let mut samples = Vec::new();
        while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(2), subscriber.next()).await {
            let sent: u128 = std::str::from_utf8(&message.payload).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
            let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
            samples.push(Duration::from_nanos(now.saturating_sub(sent) as u64));
        }
        samples
    });
    let mut ticker = tokio::time::interval(interval);
    for _ in 0..total {
        ticker.tick().await;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
        runtime.nats.publish(format!("{}.bench.ping", runtime.topology.prefix), now.to_string().into()).await?;
    }
    let baseline = receiver.await?;

    // The real path: command → Postgres → sequencer/relay → JetStream → projector → notice → GraphQL ws.
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    runtime.spawn_relay(cancel.clone(), &mut tasks);
    runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
    let addr = runtime.serve_api("127.0.0.1:0".parse()?, cancel.clone(), &mut tasks).await?;
    let store = runtime.store.environments.clone();
    let project = ProjectId(Uuid::new_v4());
    const ENVIRONMENTS: u64 = 200;
    let deployments = ready_environments(&store, project, ENVIRONMENTS).await?;

    let mut ws = follow_environments(addr, project.0, "id tests { name }", None).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // the server subscribes when it first polls

    let received = Committed::default();
    let reader = {
        let received = received.clone();
        tokio::spawn(async move {
            while let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(Duration::from_secs(3), ws.next()).await {
                let now = Instant::now();
                let Ok(value) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { continue };
                let tests = value["payload"]["data"]["environmentUpdated"]["tests"].as_array().cloned().unwrap_or_default();
                let mut received = received.lock().await;
                for test in tests {
                    if let Some(name) = test["name"].as_str() {
                        received.entry(name.to_string()).or_insert(now);
                    }
                }
            }
        })
    };
    // Where the time goes: when each result reached the event stream (a core subscription to the
    // stream's subjects sees what the relay publishes).
    let published = Committed::default();
    let mut on_stream = runtime.nats.subscribe(runtime.topology.all_events()).await?;
    runtime.nats.flush().await?;
    let stream_reader = {
        let published = published.clone();
        tokio::spawn(async move {
            while let Ok(Some(message)) = tokio::time::timeout(Duration::from_secs(3), on_stream.next()).await {
                let now = Instant::now();
                let Ok(value) = serde_json::from_slice::<serde_json::Value>(&message.payload) else { continue };
                if let Some(name) = value["payload"]["test"].as_str() {
                    published.lock().await.entry(name.to_string()).or_insert(now);
                }
            }
        })
    };
    let committed = Committed::default();
    record_results(&store, &deployments, "b", rate, total, &committed).await?;
    reader.await?;
    stream_reader.await?;
    cancel.cancel();
    while tasks.join_next().await.is_some() {}

    let (committed, published, received) = (committed.lock().await, published.lock().await, received.lock().await);
    let between = |from: &HashMap<String, Instant>, to: &HashMap<String, Instant>| -> Vec<Duration> {
        from.iter().filter_map(|(name, at)| to.get(name).map(|got| got.saturating_duration_since(*at))).collect()
    };
    println!("bench latency: {rate} events/s for {seconds} s over {ENVIRONMENTS} environments");
    let (_, base_p99) = summary("core NATS publish → subscribe (baseline)", baseline, total);
    let (_, p99) = summary("appended → GraphQL subscriber received", between(&committed, &received), total);
    println!("  of which:");
    summary("  appended → on the event stream", between(&committed, &published), total);
    summary("  on the event stream → subscriber", between(&published, &received), total);
    println!("p99 ratio to baseline {:.1}×; target p99 ≤ 50 ms", p99.as_secs_f64() / base_p99.as_secs_f64().max(1e-9));
    Ok(())
}

async fn webhooks(mut runtime: Runtime, deliveries: usize, concurrency: usize) -> anyhow::Result<()> {
    use understudy_adapters::github::webhook::{sign, verify_signature};
    const SECRET: &[u8] = b"bench secret";
    // A real-sized payload: GitHub's pull_request.opened example is about 30 KB.
    let payload = serde_json::json!({
        "zen": "Keep it logically awesome.",
        "hook_id": 1,
        "padding": "x".repeat(30_000),
    });
    let body = serde_json::to_vec(&payload)?;
    let signature = sign(SECRET, &body);

    // Baseline: the HMAC check alone, in a loop.
    let started = Instant::now();
    for _ in 0..deliveries {
        verify_signature(SECRET, &body, Some(&signature)).map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let hmac_rate = deliveries as f64 / started.elapsed().as_secs_f64();

    runtime.github.webhook_secret = Some(Arc::from(SECRET.to_vec()));
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let addr = runtime.serve_api("127.0.0.1:0".parse()?, cancel.clone(), &mut tasks).await?;
    let started = Instant::now();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = JoinSet::new();
    for _ in 0..concurrency {
        // One keep-alive connection per worker, like GitHub's own senders.
        let client = reqwest_lite::Client::new(addr);
        let (next, body, signature) = (next.clone(), body.clone(), signature.clone());
        workers.spawn(async move {
            let mut client = client;
            let mut samples = Vec::new();
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= deliveries {
                    return anyhow::Ok(samples);
                }
                let sent = Instant::now();
                let status = client.deliver(&format!("bench-{n}"), &body, &signature).await?;
                anyhow::ensure!((200..300).contains(&status), "delivery answered {status}");
                samples.push(sent.elapsed());
            }
        });
    }
    let mut samples = Vec::new();
    while let Some(done) = workers.join_next().await {
        samples.extend(done??);
    }
    let rate = deliveries as f64 / started.elapsed().as_secs_f64();
    cancel.cancel();
    while tasks.join_next().await.is_some() {}
    println!(
        "bench webhooks: {deliveries} signed deliveries of {} KB, {concurrency} concurrent, over loopback HTTP/1.1",
        body.len() / 1024
    );
    println!("HMAC-SHA256 verify alone (baseline)      {hmac_rate:>9.0}/s");
    println!("verified, parsed, recorded, answered      {rate:>9.0}/s   ratio {:.3}× of the baseline (target ≥ 2000/s)", rate / hmac_rate);
    summary("time to 2xx", samples, deliveries);
    Ok(())
}

mod reqwest_lite {
    //! A minimal HTTP/1.1 client over one keep-alive connection, so the bench measures the
    //! server and not a client library.
    use std::net::SocketAddr;

    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    use tokio::net::TcpStream;

    pub struct Client {
        addr: SocketAddr,
        connection: Option<BufReader<TcpStream>>,
    }

    impl Client {
        pub fn new(addr: SocketAddr) -> Self {
            Self { addr, connection: None }
        }

        pub async fn deliver(&mut self, delivery: &str, body: &[u8], signature: &str) -> anyhow::Result<u16> {
            if self.connection.is_none() {
                let stream = TcpStream::connect(self.addr).await?;
                stream.set_nodelay(true)?;
                self.connection = Some(BufReader::new(stream));
            }
            let stream = self.connection.as_mut().expect("connected just above");
            let head = format!(
                "POST /webhooks/github HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nX-GitHub-Event: ping\r\n\
                 X-GitHub-Delivery: {delivery}\r\nX-Hub-Signature-256: {signature}\r\nContent-Length: {}\r\n\r\n",
                self.addr,
                body.len()
            );
            // One write: a head and a body sent apart would wait on delayed ACKs.
            let mut request = head.into_bytes();
            request.extend_from_slice(body);
            stream.get_mut().write_all(&request).await?;
            let mut status_line = String::new();
            stream.read_line(&mut status_line).await?;
            let status: u16 = status_line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                stream.read_line(&mut line).await?;
                if line == "\r\n" || line.is_empty() {
                    break;
                }
                if let Some(value) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut discard = vec![0; length];
            stream.read_exact(&mut discard).await?;
            Ok(status)
        }
    }
}

/// Runs `script` with `sh -c` in `dir`; fails with its stderr.
pub(crate) fn sh(dir: &std::path::Path, script: &str) -> anyhow::Result<String> {
    let output = std::process::Command::new("sh")
        .args(["-c", script])
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "bench")
        .env("GIT_AUTHOR_EMAIL", "bench@understudy.invalid")
        .env("GIT_COMMITTER_NAME", "bench")
        .env("GIT_COMMITTER_EMAIL", "bench@understudy.invalid")
        .output()?;
    anyhow::ensure!(output.status.success(), "`{script}` failed: {}", String::from_utf8_lossy(&output.stderr));
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

async fn preview(
    mut runtime: Runtime,
    app: &std::path::Path,
    entrypoint: &str,
    runs: usize,
    wing_toolchain: &std::path::Path,
) -> anyhow::Result<()> {
    use understudy_adapters::preview::PreviewConfig;
    use understudy_domain::project::{EntrypointRule, ProjectCommand};
    use understudy_domain::values::{ProjectName, RepoFullName};

    let cwd = std::env::current_dir()?;
    let (app, wing_toolchain) = (cwd.join(app), cwd.join(wing_toolchain));
    let tmp = std::env::temp_dir().join(format!("understudy-bench-{}", Uuid::new_v4().simple()));
    let (bare, work) = (tmp.join("git/bench/app.git"), tmp.join("work"));
    std::fs::create_dir_all(&bare)?;
    sh(&bare, "git init --quiet --bare")?;
    sh(&tmp, &format!("cp -r '{}' '{}'", app.display(), work.display()))?;
    let commit = |n: usize| -> anyhow::Result<CommitSha> {
        std::fs::write(work.join(".bench-run"), n.to_string())?;
        let sha = sh(
            &work,
            &format!(
                "git add -A && git commit --quiet -m 'run {n}' && git push --quiet '{}' HEAD:refs/heads/main && git rev-parse HEAD",
                bare.display()
            ),
        )?;
        Ok(CommitSha::parse(sha.lines().last().unwrap_or_default())?)
    };
    sh(&work, "rm -rf .git target node_modules && git init --quiet")?;

    let mut config = PreviewConfig::new(tmp.join("previews"), "preview.localhost".into());
    config.git_base = format!("file://{}", tmp.join("git").display());
    config.wing_toolchain = wing_toolchain.join("node_modules/.bin/wing").exists().then(|| wing_toolchain.clone());
    runtime.preview = Arc::new(config);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    runtime.spawn_relay(cancel.clone(), &mut tasks);
    runtime.spawn_projectors(understudy_projections::selected("environments")?, cancel.clone(), &mut tasks);
    runtime.spawn_worker("bench".into(), cancel.clone(), &mut tasks);

    let project = ProjectId(Uuid::new_v4());
    let create = ProjectCommand::Create {
        project_id: project,
        account_id: understudy_domain::ids::AccountId(Uuid::new_v4()),
        name: ProjectName::parse("bench")?,
        repository: RepoFullName::parse("bench/app")?,
        production_branch: BranchName::parse("main")?,
        entrypoints: EntrypointRule::Detect,
        at: Utc::now(),
    };
    runtime.store.projects.execute(project.0, create, meta()).await?;

    // Understudy: each run a new environment (cold: empty cache), then a second commit to the
    // same environment (warm: its cache kept).
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    let mut commits = 0;
    for run in 0..runs {
        let spec = EnvironmentSpec {
            project_id: project,
            target: Target::PullRequest { number: run as u64 + 1, head_branch: BranchName::parse(format!("bench-{run}"))? },
            entrypoint: Entrypoint::parse(entrypoint)?,
        };
        let environment = EnvironmentId::derive(project, &spec.target, &spec.entrypoint);
        for samples in [&mut cold, &mut warm] {
            commits += 1;
            let sha = commit(commits)?;
            let deployment = DeploymentId(Uuid::new_v4());
            let started = Instant::now();
            let request = EnvironmentCommand::RequestDeployment {
                awaiting_approval: false,
                environment_id: environment,
                spec: spec.clone(),
                deployment_id: deployment,
                commit: sha,
                at: Utc::now(),
            };
            runtime.store.environments.execute(environment.0, request, meta()).await?;
            loop {
                let row: Option<(String, Option<Uuid>, Option<String>)> =
                    sqlx::query_as("SELECT status, latest_deployment_id, failure FROM environments WHERE environment_id = $1")
                        .bind(environment.0)
                        .fetch_optional(&runtime.pool)
                        .await?;
                match row {
                    Some((status, Some(latest), _)) if status == "Ready" && latest == deployment.0 => break,
                    Some((status, _, failure)) if status == "Failed" => anyhow::bail!("the bench app failed: {failure:?}"),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
                anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "no Ready within 5 minutes");
            }
            samples.push(started.elapsed());
            // The tests run right after Ready: let them finish, so the next sample is not
            // measured against them on the same cores.
            let tests_done = Instant::now();
            while tests_done.elapsed() < Duration::from_secs(60) {
                let done: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM deployment_logs WHERE deployment_id = $1 AND stream LIKE 'test%'
                                     AND line LIKE 'understudy: exited with%')",
                )
                .bind(deployment.0)
                .fetch_one(&runtime.pool)
                .await?;
                if done {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if run == 0 {
                // Where the time of one deployment went, from its own log lines.
                let lines: Vec<(String, i64, String)> = sqlx::query_as(
                    "SELECT stream, nano, line FROM deployment_logs WHERE deployment_id = $1 AND stream <> 'test' ORDER BY nano",
                )
                .bind(deployment.0)
                .fetch_all(&runtime.pool)
                .await?;
                let requested_at: chrono::DateTime<Utc> = sqlx::query_scalar(
                    "SELECT recorded_at FROM event_log WHERE aggregate_id = $1 AND event_type = 'DeploymentRequested' ORDER BY id DESC LIMIT 1",
                )
                .bind(environment.0)
                .fetch_one(&runtime.pool)
                .await?;
                let zero = requested_at.timestamp_nanos_opt().unwrap_or_default();
                for (stream, nano, line) in lines.iter().filter(|(_, _, l)| l.starts_with('$') || l.starts_with("understudy:")) {
                    eprintln!("  {:>6.0} ms [{stream}] {}", (nano - zero) as f64 / 1e6, line.chars().take(100).collect::<String>());
                }
            }
        }
        eprintln!("run {}: cold {:?}, warm {:?}", run + 1, cold[run], warm[run]);
        let terminate = EnvironmentCommand::Terminate { reason: "bench".into(), at: Utc::now() };
        runtime.store.environments.execute(environment.0, terminate, meta()).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    cancel.cancel();
    while tasks.join_next().await.is_some() {}

    // Baseline: the toolchain alone, unsandboxed, in a plain checkout: compile, start, first 2xx.
    // For Wing also `wing it` alone until its Console says the app runs, which is what a Wing
    // preview's Ready means (the Console answers before it has compiled the app).
    let (mut raw, mut start_only) = (Vec::new(), Vec::new());
    let wing = wing_toolchain.join("node_modules/.bin/wing");
    let is_wing = entrypoint.ends_with(".w");
    for run in 0..runs * if is_wing { 2 } else { 1 } {
        let dir = tmp.join(format!("raw-{run}"));
        sh(&tmp, &format!("cp -r '{}' '{}'", work.display(), dir.display()))?;
        let port = 20_000 + (std::process::id() % 20_000) as u16 + run as u16;
        let started = Instant::now();
        let alone = is_wing && run % 2 == 1;
        let (build, start) = if is_wing {
            (
                // As in the sandbox: no analytics.
                if alone { "true".to_string() } else { format!("WING_DISABLE_ANALYTICS=1 '{}' compile '{entrypoint}'", wing.display()) },
                format!("WING_DISABLE_ANALYTICS=1 exec '{}' it '{entrypoint}' --no-open -p {port}", wing.display()),
            )
        } else {
            let install = if dir.join("package-lock.json").exists() { "npm ci --no-audit --no-fund --silent" } else { "true" };
            (install.to_string(), format!("PORT={port} exec npm start"))
        };
        sh(&dir, &build)?;
        let mut child = tokio::process::Command::new("sh")
            .args(["-c", &start])
            .current_dir(&dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let (path, until) = if alone { ("/trpc/app.state", "\"success\"") } else { ("/", "") };
        loop {
            if answers(port, path, until).await {
                break;
            }
            anyhow::ensure!(started.elapsed() < Duration::from_secs(300), "the raw app never answered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if alone { &mut start_only } else { &mut raw }.push(started.elapsed());
        let _ = child.kill().await;
    }
    let _ = std::fs::remove_dir_all(&tmp);
    let ms = |samples: Vec<Duration>| Duration::from_secs_f64(median(&mut samples.iter().map(Duration::as_secs_f64).collect::<Vec<_>>()));
    println!("preview: {} ({entrypoint}), {runs} runs, medians", app.display());
    let start_only = is_wing.then(|| ms(start_only));
    if let Some(start_only) = start_only {
        println!("  raw `wing it` alone → its app runs:         {:>8.0} ms", start_only.as_secs_f64() * 1000.0);
    }
    let (cold, warm, raw) = (ms(cold), ms(warm), ms(raw));
    println!("  raw toolchain, build + start + first 2xx:   {:>8.0} ms", raw.as_secs_f64() * 1000.0);
    println!(
        "  requested → Ready, cold (new environment):  {:>8.0} ms  ({:.2}× raw)",
        cold.as_secs_f64() * 1000.0,
        cold.as_secs_f64() / raw.as_secs_f64()
    );
    println!(
        "  requested → Ready, warm (next commit):      {:>8.0} ms  ({:.2}× raw, {:.2}× cold)",
        warm.as_secs_f64() * 1000.0,
        warm.as_secs_f64() / raw.as_secs_f64(),
        warm.as_secs_f64() / cold.as_secs_f64()
    );
    if let Some(start_only) = start_only {
        println!("  cold against `wing it` alone:               {:>8.2}×", cold.as_secs_f64() / start_only.as_secs_f64());
    }
    Ok(())
}

/// Whether `GET path` on a local port answers 2xx or 3xx with a body that contains `until`.
async fn answers(port: u16, path: &str, until: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut answer = Vec::new();
        if until.is_empty() {
            answer.resize(12, 0);
            stream.read_exact(&mut answer).await.ok()?;
        } else {
            stream.read_to_end(&mut answer).await.ok()?;
        }
        let answer = String::from_utf8_lossy(&answer);
        Some((answer.starts_with("HTTP/1.1 2") || answer.starts_with("HTTP/1.1 3")) && answer.contains(until))
    };
    matches!(tokio::time::timeout(Duration::from_secs(5), attempt).await, Ok(Some(true)))
}
