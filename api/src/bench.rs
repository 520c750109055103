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
    /// Event appended → GraphQL subscriber received, at a fixed rate, vs core NATS pub→sub.
    Latency {
        #[arg(long, default_value_t = 500)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
}

/// A database and NATS prefix that exist only for one bench run.
struct Scratch {
    admin: PgPool,
    database: String,
    runtime: Runtime,
}

impl Scratch {
    async fn new(database_url: &str, nats_url: &str) -> anyhow::Result<Self> {
        let admin = understudy_adapters::db::connect(database_url, 2).await?;
        let id = Uuid::new_v4().simple().to_string();
        let database = format!("understudy_bench_{}", &id[..12]);
        sqlx::query(&format!("CREATE DATABASE {database}")).execute(&admin).await.context("creating the bench database")?;
        let mut url: url_lite::Url = url_lite::Url::parse(database_url)?;
        url.set_database(&database);
        let runtime = Runtime::connect(&url.to_string(), nats_url, &format!("bench{}", &id[..8])).await?;
        Ok(Self { admin, database, runtime })
    }

    async fn drop_all(self) -> anyhow::Result<()> {
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
    let scratch = Scratch::new(database_url, nats_url).await?;
    let result = match what {
        Bench::Append { writers, cycles } => append(&scratch.runtime, writers, cycles).await,
        Bench::Latency { rate, seconds } => latency(&scratch.runtime, rate, seconds).await,
        Bench::Webhooks { deliveries, concurrency } => webhooks(scratch.runtime.clone(), deliveries, concurrency).await,
    };
    scratch.drop_all().await?;
    result
}

fn spec(project: ProjectId, n: u64) -> EnvironmentSpec {
    EnvironmentSpec {
        project_id: project,
        target: Target::PullRequest { number: n, head_branch: BranchName::parse(format!("bench-{n}")).expect("valid branch") },
        entrypoint: Entrypoint::parse("main.w").expect("valid entrypoint"),
    }
}

fn meta() -> Metadata {
    Metadata::new(Uuid::new_v4(), "system:bench")
}

/// One deployment cycle: 6 commands, 7 events (the request also creates the environment).
fn cycle(spec: &EnvironmentSpec) -> Vec<EnvironmentCommand> {
    let deployment = DeploymentId(Uuid::new_v4());
    let at = Utc::now();
    let sha = CommitSha::parse(format!("{:040x}", Uuid::new_v4().as_u128())).expect("40 hex digits");
    let test = |name: &str| EnvironmentCommand::RecordTestResult {
        deployment_id: deployment,
        test: name.into(),
        outcome: TestOutcome::Passed,
        at,
    };
    vec![
        EnvironmentCommand::RequestDeployment {
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(name: &str, mut samples: Vec<Duration>, sent: usize) -> (Duration, Duration) {
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
    let mut deployments = Vec::new();
    for n in 0..ENVIRONMENTS {
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

    let mut request = format!("ws://{addr}/graphql").into_client_request()?;
    request.headers_mut().insert("Sec-WebSocket-Protocol", "graphql-transport-ws".parse()?);
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await?;
    ws.send(Message::text(r#"{"type":"connection_init"}"#)).await?;
    ws.next().await.context("no connection_ack")??;
    let subscribe = serde_json::json!({"id": "1", "type": "subscribe", "payload": {
        "query": "subscription($p: UUID) { environmentUpdated(projectId: $p) { id tests { name } } }",
        "variables": {"p": project.to_string()}}});
    ws.send(Message::text(subscribe.to_string())).await?;
    tokio::time::sleep(Duration::from_millis(500)).await; // the server subscribes when it first polls

    let received: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
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
    let committed: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut ticker = tokio::time::interval(interval);
    let mut writers = JoinSet::new();
    for n in 0..total {
        ticker.tick().await;
        let (id, deployment) = deployments[n % deployments.len()];
        let (store, committed) = (store.clone(), committed.clone());
        writers.spawn(async move {
            let name = format!("b{n}");
            let command = EnvironmentCommand::RecordTestResult {
                deployment_id: deployment,
                test: name.clone(),
                outcome: TestOutcome::Passed,
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
    reader.await?;
    cancel.cancel();
    while tasks.join_next().await.is_some() {}

    let (committed, received) = (committed.lock().await, received.lock().await);
    let samples: Vec<Duration> =
        committed.iter().filter_map(|(name, at)| received.get(name).map(|got| got.saturating_duration_since(*at))).collect();
    println!("bench latency: {rate} events/s for {seconds} s over {ENVIRONMENTS} environments");
    let (_, base_p99) = summary("core NATS publish → subscribe (baseline)", baseline, total);
    let (_, p99) = summary("appended → GraphQL subscriber received", samples, total);
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
