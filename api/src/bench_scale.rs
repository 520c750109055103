//! `understudy bench scale`: the binary run as separate roles against a three-node NATS
//! JetStream cluster, first healthy, then with one process of every role and one NATS node
//! killed mid-load.
//!
//! The topology is the one `docs/operating.md` describes for more than one machine, on loopback:
//! 2× `api`, 2× `projector`, 2× `worker`, one `relay`, one `scheduler`, each its own process of
//! this binary, one Postgres, and three nats-servers in a cluster holding the event stream in
//! three copies (R3). The load is the latency bench's (test results recorded on 200 environments
//! at a fixed rate, timed from commit to a graphql-ws subscriber of each API node), plus git
//! branches pushed to a repository on disk, which the scheduler polls and the workers build and
//! serve. The healthy run is the baseline; the faulted run kills (SIGKILL) the stream leader's
//! nats-server, the relay, a projector, an API node, a worker and the scheduler one after
//! another, restarting each as a supervisor would.
//!
//! Afterwards it checks what must hold whatever was killed, and fails if any does not: every
//! event projected exactly once, every test result in the read model once, each subscriber saw
//! every result, one deployment per environment × commit, every branch Ready at its commit, and
//! every read model equal to a fresh replay of the log.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::StreamExt;
use tokio::process::{Child, Command};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use understudy_adapters::nats::Topology;
use understudy_adapters::preview::local_git;
use understudy_domain::ids::ProjectId;
use uuid::Uuid;

use crate::bench::{follow_environments, ready_environments, record_results, sh, summary, Committed, Scratch};

/// What `bench scale` is asked to do.
#[derive(Debug, Clone)]
pub struct Scale {
    /// Test results recorded per second, in each run.
    pub rate: u64,
    /// Length of each run.
    pub seconds: u64,
    /// How long a killed process stays down before it is started again.
    pub restart_after: Duration,
    /// How long the killed nats-server stays down.
    pub nats_down: Duration,
    /// The app pushed to the branches the workers build.
    pub app: PathBuf,
    /// Branches pushed in each run.
    pub branches: usize,
}

const ENVIRONMENTS: u64 = 200;

/// One process of this binary or of nats-server, started again after it is killed.
struct Proc {
    name: String,
    program: PathBuf,
    args: Vec<String>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl Proc {
    fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let mut command = Command::new(&self.program);
        command.args(&self.args).envs(self.env.iter().cloned()).stdin(std::process::Stdio::null());
        command.stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
        self.child = Some(command.spawn().with_context(|| format!("starting {}", self.name))?);
        Ok(())
    }

    /// SIGKILL, and reap.
    async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
    }

    /// Whether it ended by itself (a role ends on an error it cannot retry).
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Three nats-servers in one cluster on loopback, JetStream on each. Their configuration needs
/// nats-server 2.10 or later (`sync_interval`); an older one is refused before it starts.
async fn nats_cluster(dir: &Path) -> anyhow::Result<(Vec<Proc>, Vec<u16>)> {
    let program = understudy_adapters::embedded::locate_nats_server()?;
    if let Some(version @ (major, minor)) = understudy_adapters::embedded::nats_server_version(&program).await? {
        anyhow::ensure!(
            version >= (2, 10),
            "{} is nats-server {major}.{minor}; the cluster needs 2.10 or later: run scripts/setup (it puts one in .venv/), \
             run this from the repository, or set UNDERSTUDY_NATS_SERVER",
            program.display()
        );
    }
    let client: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let cluster: Vec<u16> = (0..3).map(|_| free_port()).collect::<anyhow::Result<_>>()?;
    let mut nodes = Vec::new();
    for i in 0..3 {
        let node = dir.join(format!("nats-{i}"));
        std::fs::create_dir_all(&node)?;
        let routes: Vec<String> = (0..3).filter(|j| *j != i).map(|j| format!("nats-route://127.0.0.1:{}", cluster[j])).collect();
        let config = format!(
            "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{\n  store_dir: \"{}\"\n  sync_interval: always\n}}\n\
             cluster {{\n  name: understudy\n  listen: 127.0.0.1:{}\n  routes: [{}]\n}}\n",
            client[i],
            node.join("js").display(),
            cluster[i],
            routes.join(", ")
        );
        std::fs::write(node.join("nats.conf"), config)?;
        nodes.push(Proc {
            name: format!("nats n{i}"),
            program: program.clone(),
            args: vec!["-c".into(), node.join("nats.conf").display().to_string()],
            env: vec![],
            log: node.join("nats.log"),
            child: None,
        });
    }
    Ok((nodes, client))
}

/// Waits until the cluster has a JetStream meta leader and holds the event stream in 3 copies.
/// If it does not, the error says which nodes ended and how their logs end.
async fn stream_ready(url: &str, topology: &Topology, nodes: &mut [Proc]) -> anyhow::Result<()> {
    let client = understudy_adapters::nats::connect_in_background(url).await?;
    let js = async_nats::jetstream::new(client);
    let Err(error) = understudy_adapters::nats::wait_for_stream(&js, topology, Some(Duration::from_secs(60))).await else {
        return Ok(());
    };
    let mut why = format!("the NATS cluster did not come up in 60 s: {error:#}");
    for node in nodes {
        if let Some(status) = node.exited() {
            let log = std::fs::read_to_string(&node.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(3).collect();
            why += &format!("\n{} ended ({status}): {}", node.name, tail.into_iter().rev().collect::<Vec<_>>().join(" | "));
        }
    }
    Err(anyhow::anyhow!(why))
}

/// The node (`n0`..`n2`) leading the event stream's replicas.
async fn stream_leader(client: &async_nats::Client, topology: &Topology) -> Option<usize> {
    let js = async_nats::jetstream::new(client.clone());
    let mut stream = js.get_stream(topology.stream_name()).await.ok()?;
    let leader = stream.info().await.ok()?.cluster.as_ref()?.leader.clone()?;
    leader.strip_prefix('n')?.parse().ok()
}

/// What every role process is given.
struct Roles {
    procs: Vec<Proc>,
    api: Vec<SocketAddr>,
}

fn roles(dir: &Path, database_url: &str, nats_url: &str, topology: &Topology) -> anyhow::Result<Roles> {
    let program = std::env::current_exe()?;
    let common = vec![
        ("DATABASE_URL".to_string(), database_url.to_string()),
        ("NATS_URL".to_string(), nats_url.to_string()),
        ("UNDERSTUDY_NATS_PREFIX".to_string(), topology.prefix.clone()),
        ("UNDERSTUDY_NATS_REPLICAS".to_string(), topology.replicas.to_string()),
        ("UNDERSTUDY_GIT_POLL_SECONDS".to_string(), "1".to_string()),
        ("UNDERSTUDY_LEASE_SECONDS".to_string(), "5".to_string()),
        ("RUST_LOG".to_string(), std::env::var("UNDERSTUDY_BENCH_LOG").unwrap_or_else(|_| "warn".into())),
    ];
    let mut procs = Vec::new();
    let mut api = Vec::new();
    let mut role = |name: String, role: &str, extra: Vec<(String, String)>| {
        let data = dir.join(&name);
        std::fs::create_dir_all(&data)?;
        let mut env = common.clone();
        env.push(("UNDERSTUDY_DATA_DIR".into(), data.display().to_string()));
        env.extend(extra);
        procs.push(Proc { log: data.join("log"), name, program: program.clone(), args: vec![role.into()], env, child: None });
        anyhow::Ok(())
    };
    for i in 0..2 {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        api.push(addr);
        role(format!("api-{i}"), "api", vec![("UNDERSTUDY_LISTEN".into(), addr.to_string())])?;
    }
    for i in 0..2 {
        role(format!("projector-{i}"), "projector", vec![])?;
    }
    for i in 0..2 {
        role(format!("worker-{i}"), "worker", vec![])?;
    }
    role("relay".into(), "relay", vec![])?;
    role("scheduler".into(), "scheduler", vec![])?;
    Ok(Roles { procs, api })
}

/// First time each test result was seen by one subscriber.
type Seen = Committed;

/// What each subscriber's connections did: when (from the bench's start), to which node, after
/// which position, and why each ended; printed when results go missing.
type Connections = Arc<std::sync::Mutex<Vec<String>>>;

/// A subscriber of one API node that, when its connection drops (its node was killed), connects
/// again to whichever node answers, resuming after the last position it saw.
async fn subscriber(
    nodes: Vec<SocketAddr>,
    project: Uuid,
    seen: Seen,
    (reconnects, connections, started): (Arc<std::sync::atomic::AtomicUsize>, Connections, Instant),
    stop: tokio_util::sync::CancellationToken,
) {
    let mut last: Option<i64> = None;
    let mut node = 0;
    let note = |what: String| {
        connections.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{:.1} s: {what}", started.elapsed().as_secs_f64()));
    };
    while !stop.is_cancelled() {
        let addr = nodes[node % nodes.len()];
        let connected = follow_environments(addr, project, "position tests { name }", last).await;
        note(format!("to {addr} after {last:?}: {}", if connected.is_ok() { "connected" } else { "refused" }));
        let Ok(mut ws) = connected else {
            node += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return,
                next = ws.next() => next,
            };
            let Some(Ok(Message::Text(text))) = next else {
                note(format!("from {addr} at {last:?}: ended by {next:?}"));
                break;
            };
            let now = Instant::now();
            let Ok(value) = serde_json::from_str::<serde_json::Value>(text.as_str()) else { continue };
            let environment = &value["payload"]["data"]["environmentUpdated"];
            if let Some(position) = environment["position"].as_i64() {
                last = Some(last.map_or(position, |l| l.max(position)));
            }
            let mut seen = seen.lock().await;
            for test in environment["tests"].as_array().into_iter().flatten() {
                if let Some(name) = test["name"].as_str() {
                    seen.entry(name.to_string()).or_insert(now);
                }
            }
        }
        reconnects.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        node += 1;
    }
}

/// Per second of a run (from its first commit): the results committed in it, and the slowest of
/// them to reach a subscriber. Where the faulted run's tail comes from, beside the kill times.
async fn by_second(run: &str, committed: &Seen, subscribers: &[Seen]) -> Vec<(usize, Duration)> {
    let committed = committed.lock().await;
    let ours: Vec<(&String, &Instant)> = committed.iter().filter(|(name, _)| name.starts_with(&format!("{run}-"))).collect();
    let Some(first) = ours.iter().map(|(_, at)| **at).min() else { return Vec::new() };
    let mut seconds: Vec<(usize, Duration)> = Vec::new();
    for seen in subscribers {
        let seen = seen.lock().await;
        for (name, at) in &ours {
            let second = at.duration_since(first).as_secs() as usize;
            if seconds.len() <= second {
                seconds.resize(second + 1, (0, Duration::ZERO));
            }
            seconds[second].0 += 1;
            if let Some(got) = seen.get(*name) {
                seconds[second].1 = seconds[second].1.max(got.saturating_duration_since(**at));
            }
        }
    }
    seconds
}

/// The log's cursors over time, sampled every 5 ms: when it was numbered, published to
/// JetStream and projected (the environments read model, which the subscribers read) up to
/// each position.
#[derive(Default)]
struct Cursors {
    /// (when, [sequenced, published, projected]), in time order; each cursor only moves on.
    samples: Vec<(Instant, [i64; 3])>,
}

impl Cursors {
    async fn sample(pool: sqlx::PgPool, stop: tokio_util::sync::CancellationToken) -> Self {
        let mut cursors = Self::default();
        let mut tick = tokio::time::interval(Duration::from_millis(5));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while !stop.is_cancelled() {
            tick.tick().await;
            let row: sqlx::Result<(i64, i64, i64)> = sqlx::query_as(
                "SELECT (SELECT position FROM log_cursors WHERE name = 'sequenced'), (SELECT position FROM log_cursors WHERE name = 'published'),
                        COALESCE((SELECT position FROM projector_checkpoints WHERE projection = 'environments'), 0)",
            )
            .fetch_one(&pool)
            .await;
            // A sample that failed is a gap in the series, which only blurs the stages.
            if let Ok((sequenced, published, projected)) = row {
                cursors.samples.push((Instant::now(), [sequenced, published, projected]));
            }
        }
        cursors
    }

    /// When the cursor `stage` first reached `position`, as sampled.
    fn reached(&self, stage: usize, position: i64) -> Option<Instant> {
        let first = self.samples.partition_point(|(_, at)| at[stage] < position);
        self.samples.get(first).map(|(when, _)| *when)
    }
}

/// Where a run's slowest deliveries spent their time: for each second of the run with
/// deliveries slower than `slow`, how many, and the median and slowest time from commit until
/// the log was numbered, published and projected past their event, and until the subscriber got it.
async fn stages(
    pool: &sqlx::PgPool,
    run: &str,
    committed: &Seen,
    subscribers: &[Seen],
    cursors: &Cursors,
    slow: Duration,
) -> anyhow::Result<Vec<String>> {
    let committed = committed.lock().await;
    let ours: Vec<(&String, &Instant)> = committed.iter().filter(|(name, _)| name.starts_with(&format!("{run}-"))).collect();
    let Some(first) = ours.iter().map(|(_, at)| **at).min() else { return Ok(Vec::new()) };
    let mut tail: Vec<(String, Instant, Instant)> = Vec::new();
    for seen in subscribers {
        let seen = seen.lock().await;
        for (name, at) in &ours {
            if let Some(got) = seen.get(*name).filter(|got| got.saturating_duration_since(**at) > slow) {
                tail.push(((*name).clone(), **at, *got));
            }
        }
    }
    let names: Vec<String> = tail.iter().map(|(name, _, _)| name.clone()).collect();
    let positions: std::collections::HashMap<String, i64> =
        sqlx::query_as("SELECT payload->>'test', position FROM event_log WHERE event_type = 'TestPassed' AND payload->>'test' = ANY($1)")
            .bind(&names)
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    // Per second: per stage (numbered, published, projected, delivered), the times after commit.
    let mut seconds: std::collections::BTreeMap<u64, [Vec<Duration>; 4]> = Default::default();
    for (name, at, got) in &tail {
        let Some(position) = positions.get(name) else { continue };
        let entry = seconds.entry(at.duration_since(first).as_secs()).or_default();
        for (stage, times) in entry.iter_mut().take(3).enumerate() {
            // Not reached while sampled (the sampler stopped first): counted as when delivered.
            let reached = cursors.reached(stage, *position).unwrap_or(*got);
            times.push(reached.saturating_duration_since(*at));
        }
        entry[3].push(got.saturating_duration_since(*at));
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    Ok(seconds
        .into_iter()
        .map(|(second, mut stages)| {
            let count = stages[3].len();
            let shown: Vec<String> = ["numbered", "published", "projected", "delivered"]
                .iter()
                .zip(stages.iter_mut())
                .map(|(stage, times)| {
                    times.sort();
                    format!("{stage} {:.0}/{:.0}", ms(crate::bench::percentile(times, 0.5)), ms(*times.last().unwrap_or(&Duration::ZERO)))
                })
                .collect();
            format!("{second}s ×{count}: {}", shown.join(", "))
        })
        .collect())
}

/// The commit-to-subscriber latencies of one run's results, over both subscribers.
async fn samples(run: &str, committed: &Seen, subscribers: &[Seen]) -> (Vec<Duration>, usize) {
    let committed = committed.lock().await;
    let mut samples = Vec::new();
    let mut expected = 0;
    for seen in subscribers {
        let seen = seen.lock().await;
        for (name, at) in committed.iter().filter(|(name, _)| name.starts_with(&format!("{run}-"))) {
            expected += 1;
            if let Some(got) = seen.get(name) {
                samples.push(got.saturating_duration_since(*at));
            }
        }
    }
    (samples, expected)
}

/// Which results a subscriber lacks (the first few, with the positions of their events and of
/// their environments now), and what its connections did: for a run where results went missing.
async fn missing(pool: &sqlx::PgPool, committed: &Seen, subscribers: &[Seen], connections: &[Connections]) {
    let committed = committed.lock().await;
    for (i, seen) in subscribers.iter().enumerate() {
        let seen = seen.lock().await;
        let mut lacking: Vec<String> = committed.keys().filter(|name| !seen.contains_key(*name)).cloned().collect();
        lacking.sort();
        println!("subscriber {i} lacks {} results", lacking.len());
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT l.payload->>'test', l.position, e.position FROM event_log l JOIN environments e ON e.environment_id = l.aggregate_id
             WHERE l.event_type = 'TestPassed' AND l.payload->>'test' = ANY($1) ORDER BY l.position LIMIT 10",
        )
        .bind(&lacking)
        .fetch_all(pool)
        .await
        .unwrap_or_default();
        for (name, position, now) in rows {
            println!("  {name}: event at {position}, its environment now at {now}");
        }
        for line in connections[i].lock().unwrap_or_else(|p| p.into_inner()).iter() {
            println!("  {line}");
        }
    }
}

/// Pushes `count` new branches of the app; returns each branch's commit.
fn push_branches(work: &Path, bare: &Path, run: &str, count: usize) -> anyhow::Result<Vec<(String, String)>> {
    let mut pushed = Vec::new();
    for n in 0..count {
        let branch = format!("{run}-{n}");
        sh(work, &format!("git checkout --quiet -B '{branch}' main"))?;
        std::fs::write(work.join("BRANCH"), &branch)?;
        let sha = sh(
            work,
            &format!(
                "git add -A && git commit --quiet -m '{branch}' && git push --quiet '{}' HEAD:refs/heads/{branch} && git rev-parse HEAD",
                bare.display()
            ),
        )?;
        pushed.push((branch, sha.lines().last().unwrap_or_default().to_string()));
    }
    Ok(pushed)
}

/// Polls `check` every 200 ms until it is true, for at most `limit`.
async fn until<F, Fut>(limit: Duration, what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "after {} s: {what}", limit.as_secs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn scale(database_url: &str, options: Scale) -> anyhow::Result<()> {
    understudy_adapters::preview::sandbox::available().map_err(|e| anyhow::anyhow!("the workers need bubblewrap: {e}"))?;
    let dir = std::env::temp_dir().join(format!("understudy-scale-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir)?;
    let (mut nats, ports) = nats_cluster(&dir).await?;
    for node in &mut nats {
        node.start()?;
    }
    let nats_url = ports.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
    let topology = Topology::new(format!("scale{}", &Uuid::new_v4().simple().to_string()[..8]))?.with_replicas(3)?;
    stream_ready(&nats_url, &topology, &mut nats).await?;
    let scratch = Scratch::with_topology(database_url, &nats_url, topology.clone()).await?;
    let result = scaled(&scratch, &dir, &nats_url, &mut nats, &options).await;
    for node in &mut nats {
        node.kill().await;
    }
    match &result {
        Ok(()) if std::env::var_os("UNDERSTUDY_BENCH_KEEP").is_some() => {
            scratch.drop_all().await?;
            eprintln!("bench scale: UNDERSTUDY_BENCH_KEEP is set: the processes' logs are in {}", dir.display());
        }
        Ok(()) => {
            scratch.drop_all().await?;
            let _ = std::fs::remove_dir_all(&dir);
        }
        Err(_) => {
            eprintln!("bench scale: kept for a look: the processes' logs in {}, the database at {}", dir.display(), scratch.database_url())
        }
    }
    result
}

async fn scaled(scratch: &Scratch, dir: &Path, nats_url: &str, nats: &mut [Proc], options: &Scale) -> anyhow::Result<()> {
    let runtime = &scratch.runtime;
    let database_url = scratch.database_url();
    // The load's environments, Ready. Their deployments have no app: they hold a lease that never
    // expires, as if served by workers outside this bench, so this bench's workers leave them alone.
    let project = ProjectId(Uuid::new_v4());
    let store = runtime.store.environments.clone();
    let deployments = ready_environments(&store, project, ENVIRONMENTS).await?;
    for (id, deployment) in &deployments {
        sqlx::query("INSERT INTO deployment_leases (deployment_id, environment_id, worker, expires_at) VALUES ($1, $2, 'bench:load', now() + interval '1 day')")
            .bind(deployment.0)
            .bind(id)
            .execute(&runtime.pool)
            .await?;
    }
    let mut roles = roles(dir, &database_url, nats_url, &runtime.topology)?;
    for proc in &mut roles.procs {
        proc.start()?;
    }

    // A repository on disk, watched by the scheduler: each pushed branch is deployed.
    let (bare, work) = (dir.join("repo.git"), dir.join("work"));
    std::fs::create_dir_all(&bare)?;
    sh(&bare, "git init --quiet --bare")?;
    sh(dir, &format!("cp -r '{}' '{}'", std::env::current_dir()?.join(&options.app).display(), work.display()))?;
    sh(
        &work,
        &format!(
            "rm -rf .git && git init --quiet -b main && git add -A && git commit --quiet -m app && git push --quiet '{}' main",
            bare.display()
        ),
    )?;
    let app = local_git::add_project(&runtime.store, &bare.display().to_string(), "main", Some("scale")).await?;
    let app_project = app.id.context("the project was not created")?;

    // One subscriber per API node.
    let api = roles.api.clone();
    for addr in &api {
        until(Duration::from_secs(30), &format!("the API at {addr} did not answer"), || async move {
            Ok(tokio::net::TcpStream::connect(addr).await.is_ok())
        })
        .await?;
    }
    let stop = tokio_util::sync::CancellationToken::new();
    let reconnects = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let connections: Vec<Connections> = vec![Connections::default(), Connections::default()];
    let started = Instant::now();
    let subscribers: Vec<Seen> = vec![Seen::default(), Seen::default()];
    let mut tasks = JoinSet::new();
    for (i, seen) in subscribers.iter().enumerate() {
        let nodes = vec![api[i], api[1 - i]];
        tasks.spawn(subscriber(nodes, project.0, seen.clone(), (reconnects.clone(), connections[i].clone(), started), stop.clone()));
    }
    // Everything is up once a change reaches both subscribers.
    let committed = Seen::default();
    record_results(&store, &deployments, "warmup", 20, 20, &committed).await?;
    until(Duration::from_secs(60), "the warm-up results did not reach both subscribers", || async {
        let (got, expected) = samples("warmup", &committed, &subscribers).await;
        Ok(got.len() == expected)
    })
    .await?;

    println!(
        "bench scale: 2× api, 2× projector, 2× worker, relay, scheduler; 3 nats-servers in a cluster, event stream R3; \
         {} results/s for {} s per run over {ENVIRONMENTS} environments, {} branches built per run",
        options.rate, options.seconds, options.branches
    );

    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = tokio::spawn(Cursors::sample(runtime.pool.clone(), sampling.clone()));
    // Healthy run: the baseline. This process appends the load, so its standby's rounds show how
    // often the relay was late (healthy) or gone (faulted).
    let rounds = || understudy_adapters::metrics::METRICS.relay_standby_rounds.load(std::sync::atomic::Ordering::Relaxed);
    let rounds_before = rounds();
    let mut pushed = push_branches(&work, &bare, "healthy", options.branches)?;
    record_results(&store, &deployments, "healthy", options.rate, (options.rate * options.seconds) as usize, &committed).await?;

    let healthy_rounds = rounds() - rounds_before;
    // Faulted run: the same load while one of each is killed and started again.
    pushed.extend(push_branches(&work, &bare, "faulted", options.branches)?);
    let leader = stream_leader(&runtime.nats, &runtime.topology).await.unwrap_or(2);
    let victims = ["relay", "projector-0", "api-0", "worker-0", "scheduler"];
    let steps = victims.len() as u32 + 2;
    let pace = Duration::from_secs(options.seconds) / steps;
    let faults = async {
        let mut done = Vec::new();
        let started = Instant::now();
        tokio::time::sleep(pace).await;
        nats[leader].kill().await;
        done.push(format!(
            "nats n{leader} (stream leader) at {:.1} s, down {} ms",
            started.elapsed().as_secs_f64(),
            options.nats_down.as_millis()
        ));
        let nats_back = started.elapsed() + options.nats_down;
        let mut nats_restarted = false;
        for name in victims {
            tokio::time::sleep(pace).await;
            if !nats_restarted && started.elapsed() >= nats_back {
                nats[leader].start()?;
                nats_restarted = true;
            }
            let proc = roles.procs.iter_mut().find(|p| p.name == name).context("no such role")?;
            let at = started.elapsed();
            proc.kill().await;
            tokio::time::sleep(options.restart_after).await;
            proc.start()?;
            done.push(format!("{name} at {:.1} s, down {} ms", at.as_secs_f64(), options.restart_after.as_millis()));
        }
        if !nats_restarted {
            tokio::time::sleep(nats_back.saturating_sub(started.elapsed())).await;
            nats[leader].start()?;
        }
        anyhow::Ok(done)
    };
    let (loaded, faults) = tokio::join!(
        record_results(&store, &deployments, "faulted", options.rate, (options.rate * options.seconds) as usize, &committed),
        faults
    );
    loaded?;
    let faults = faults?;
    let faulted_rounds = rounds() - rounds_before - healthy_rounds;

    // Caught up: every result at both subscribers, every projection at the head, every branch Ready.
    let caught_up = until(Duration::from_secs(120), "not every result reached both subscribers", || async {
        let (healthy, expected_h) = samples("healthy", &committed, &subscribers).await;
        let (faulted, expected_f) = samples("faulted", &committed, &subscribers).await;
        Ok(healthy.len() == expected_h && faulted.len() == expected_f)
    })
    .await;
    if caught_up.is_err() {
        missing(&runtime.pool, &committed, &subscribers, &connections).await;
    }
    caught_up?;
    let pool = &runtime.pool;
    // Positions are gap-free from 1, so the head is the number of events appended.
    let head: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log").fetch_one(pool).await?;
    until(Duration::from_secs(120), "the projections did not reach the head of the log", || async {
        let lags = understudy_projections::projector::lag(pool).await?;
        Ok(lags.iter().all(|l| l.checkpoint >= head))
    })
    .await?;
    until(Duration::from_secs(180), "not every pushed branch is Ready at its commit", || async {
        let ready: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM environments e JOIN unnest($2::text[], $3::text[]) AS p(branch, sha)
               ON e.branch = p.branch AND e.latest_commit = p.sha
             WHERE e.project_id = $1 AND e.status = 'Ready'",
        )
        .bind(app_project.0)
        .bind(pushed.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>())
        .bind(pushed.iter().map(|(_, s)| s.clone()).collect::<Vec<_>>())
        .fetch_one(pool)
        .await?;
        Ok(ready as usize == pushed.len())
    })
    .await?;
    sampling.cancel();
    let cursors = sampler.await?;
    stop.cancel();
    while tasks.join_next().await.is_some() {}

    let (healthy, expected_h) = samples("healthy", &committed, &subscribers).await;
    let (faulted, expected_f) = samples("faulted", &committed, &subscribers).await;
    let (_, base_p99) = summary("healthy: appended → each subscriber", healthy, expected_h);
    let (_, p99) = summary("faulted: appended → each subscriber", faulted, expected_f);
    println!("p99 ratio faulted / healthy {:.2}× (target ≤ 2×)", p99.as_secs_f64() / base_p99.as_secs_f64().max(1e-9));
    for fault in &faults {
        println!("killed {fault}");
    }
    let slowest: Vec<String> = by_second("faulted", &committed, &subscribers)
        .await
        .iter()
        .enumerate()
        .map(|(second, (_, max))| format!("{second}s {:.0}", max.as_secs_f64() * 1000.0))
        .collect();
    println!("faulted run, slowest delivery (ms) of the results committed in each second: {}", slowest.join(", "));
    // The healthy run's slowest percent, and what in the faulted run was slower than twice that.
    for (run, slow, what) in [("healthy", base_p99, "its p99"), ("faulted", base_p99 * 2, "2× the healthy p99")] {
        println!(
            "{run} run, deliveries slower than {what} ({:.0} ms) by second: ms after commit until numbered, published, projected, delivered (median/max)",
            slow.as_secs_f64() * 1000.0
        );
        for line in stages(pool, run, &committed, &subscribers, &cursors, slow).await? {
            println!("  {line}");
        }
    }
    println!("subscribers reconnected {} times", reconnects.load(std::sync::atomic::Ordering::Relaxed));
    println!("the load's standby relayed its own events in {healthy_rounds} rounds healthy, {faulted_rounds} faulted");
    for proc in roles.procs.iter_mut() {
        if let Some(status) = proc.exited() {
            anyhow::bail!("{} exited by itself ({status}); see {}", proc.name, proc.log.display());
        }
    }

    // What must hold whatever was killed.
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log").fetch_one(pool).await?;
    let history: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM entity_history").fetch_one(pool).await?;
    let history_rows: i64 = sqlx::query_scalar("SELECT count(*) FROM entity_history").fetch_one(pool).await?;
    anyhow::ensure!(history == total && history_rows == total, "{total} events, {history_rows} history rows of {history} events");
    let results: i64 = sqlx::query_scalar("SELECT count(*) FROM environments, jsonb_array_elements(tests) t WHERE project_id = $1")
        .bind(project.0)
        .fetch_one(pool)
        .await?;
    let distinct: i64 =
        sqlx::query_scalar("SELECT count(DISTINCT t->>'name') FROM environments, jsonb_array_elements(tests) t WHERE project_id = $1")
            .bind(project.0)
            .fetch_one(pool)
            .await?;
    let recorded = committed.lock().await.len() as i64;
    anyhow::ensure!(
        results == recorded && distinct == recorded,
        "{recorded} test results recorded, {results} in the read model ({distinct} distinct)"
    );
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT 1 FROM event_log WHERE event_type = 'DeploymentRequested'
           GROUP BY aggregate_id, payload->>'commit' HAVING count(*) > 1) d",
    )
    .fetch_one(pool)
    .await?;
    anyhow::ensure!(doubled == 0, "{doubled} environment × commit pairs were deployed more than once");
    for projection in understudy_projections::all() {
        let report = understudy_projections::replay::verify(pool, projection.as_ref()).await?;
        anyhow::ensure!(report.differences.is_empty(), "{} differs from a fresh replay: {report:?}", projection.name());
    }
    println!(
        "nothing lost, nothing doubled: {total} events each projected once, {recorded} results each in the read model once, \
         {} branches Ready at their commits with one deployment each, every read model equal to a fresh replay",
        pushed.len()
    );
    for proc in &mut roles.procs {
        proc.kill().await;
    }
    Ok(())
}
