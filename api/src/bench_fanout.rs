//! `understudy bench fanout`: how many graphql-ws subscribers one API node holds, how long one
//! change takes to reach all of them, and how fast the environments of a big project list.
//!
//! The subscribers run in a child process (`bench fanout-clients`), so the node under test and
//! its clients do not share one process's file descriptors. Both sides stamp times with the wall
//! clock of this one machine.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use chrono::Utc;
use futures::StreamExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use understudy_domain::environment::{EnvironmentCommand, TestOutcome};
use understudy_domain::ids::{EnvironmentId, ProjectId};
use uuid::Uuid;

use crate::bench::{cycle, follow_environments, meta, spec, summary};
use crate::runtime::Runtime;

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// Raises this process's open-file limit to its hard limit.
fn raise_file_limit() -> u64 {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
    limit.rlim_cur
}

/// Resident memory of this process, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// CPU time a process has used (user + system), from `/proc/{pid}/stat`.
fn cpu_time(pid: &str) -> Duration {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let fields: Vec<u64> = stat.rsplit_once(')')?.1.split_whitespace().skip(11).take(2).filter_map(|f| f.parse().ok()).collect();
            Some(fields.iter().sum::<u64>())
        })
        .unwrap_or(0);
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

pub async fn fanout(runtime: &Runtime, subscribers: usize, changes: usize, environments: usize) -> anyhow::Result<()> {
    let files = raise_file_limit();
    anyhow::ensure!(
        files as usize > subscribers + 512,
        "this process may open {files} files; {subscribers} subscribers need more (raise `ulimit -Hn`)"
    );
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    runtime.spawn_relay(cancel.clone(), &mut tasks);
    runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
    let addr = runtime.serve_api("127.0.0.1:0".parse()?, cancel.clone(), &mut tasks).await?;

    // A project with `environments` environments, all Ready.
    let project = ProjectId(Uuid::new_v4());
    let store = runtime.store.environments.clone();
    let mut writers = JoinSet::new();
    let mut target = None;
    for n in 0..environments as u64 {
        let s = spec(project, n);
        let id = EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint).0;
        let commands: Vec<EnvironmentCommand> = cycle(&s).into_iter().take(4).collect();
        if let EnvironmentCommand::RequestDeployment { deployment_id, .. } = &commands[0] {
            target.get_or_insert((id, *deployment_id));
        }
        let store = store.clone();
        writers.spawn(async move {
            for command in commands {
                store.execute(id, command, meta()).await?;
            }
            anyhow::Ok(())
        });
        while writers.len() >= 16 {
            writers.join_next().await.context("writer")???;
        }
    }
    while let Some(done) = writers.join_next().await {
        done??;
    }
    let (environment, deployment) = target.context("at least one environment")?;
    let pool = runtime.pool.clone();
    let started = Instant::now();
    loop {
        let projected: i64 = sqlx::query_scalar("SELECT count(*) FROM environments WHERE project_id = $1 AND status = 'Ready'")
            .bind(project.0)
            .fetch_one(&pool)
            .await?;
        if projected as usize == environments {
            break;
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "the environments were not projected within 2 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The environments query of a big project: GraphQL over HTTP vs the same SQL.
    let http = PostClient;
    let query = serde_json::json!({
        "query": "query($p: UUID) { environments(projectId: $p, first: 500) { id status branch latestCommit tests { name } } }",
        "variables": { "p": project.to_string() }
    });
    let mut api = Vec::new();
    let mut raw = Vec::new();
    for _ in 0..60 {
        let at = Instant::now();
        let rows: Vec<(Uuid, String)> = sqlx::query_as(
            "SELECT environment_id, status FROM environments WHERE project_id = $1 ORDER BY updated_at DESC, environment_id LIMIT 500",
        )
        .bind(project.0)
        .fetch_all(&pool)
        .await?;
        raw.push(at.elapsed());
        anyhow::ensure!(rows.len() == environments.min(500), "the SQL found {} environments", rows.len());
        let at = Instant::now();
        let body = http.post(format!("http://{addr}/graphql"), &query).await?;
        api.push(at.elapsed());
        let listed = body["data"]["environments"].as_array().map(Vec::len).unwrap_or(0);
        anyhow::ensure!(listed == environments.min(500), "the API listed {listed} environments: {body}");
    }
    println!("bench fanout: environments of a project with {environments} environments (pages of 500), 60 queries");
    let (_, raw_p99) = summary("SQL of the same page (baseline)", raw, 60);
    let (_, api_p99) = summary("environments query over GraphQL/HTTP", api, 60);
    println!("p99 ratio to baseline {:.1}×", api_p99.as_secs_f64() / raw_p99.as_secs_f64().max(1e-9));

    // Baseline fan-out: core NATS delivering one message to as many subscriptions.
    let subject = format!("{}.bench.fanout", runtime.topology.prefix);
    let mut subscriptions = Vec::with_capacity(subscribers);
    for _ in 0..subscribers {
        subscriptions.push(runtime.nats.subscribe(subject.clone()).await?);
    }
    runtime.nats.flush().await?;
    let mut nats_all = Vec::new();
    let mut nats_each = Vec::new();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(usize, u128)>();
    let mut listeners = JoinSet::new();
    for mut subscription in subscriptions {
        let sender = sender.clone();
        listeners.spawn(async move {
            while let Some(message) = subscription.next().await {
                let round: usize = std::str::from_utf8(&message.payload).ok().and_then(|s| s.parse().ok()).unwrap_or(0);
                let _ = sender.send((round, unix_nanos()));
            }
        });
    }
    drop(sender);
    for round in 0..changes {
        let sent = unix_nanos();
        runtime.nats.publish(subject.clone(), round.to_string().into()).await?;
        let mut last = sent;
        for _ in 0..subscribers {
            let (got_round, at) = tokio::time::timeout(Duration::from_secs(30), receiver.recv()).await?.context("listeners gone")?;
            anyhow::ensure!(got_round == round, "core NATS delivered round {got_round} during round {round}");
            nats_each.push(Duration::from_nanos(at.saturating_sub(sent) as u64));
            last = last.max(at);
        }
        nats_all.push(Duration::from_nanos(last.saturating_sub(sent) as u64));
    }
    listeners.abort_all();

    // The real thing: graphql-ws subscribers in another process.
    let rss_before = rss_kib();
    let exe = std::env::current_exe()?;
    let mut child = tokio::process::Command::new(exe)
        .args(["bench", "fanout-clients", "--addr", &addr.to_string(), "--project", &project.to_string(), "--subscribers"])
        .arg(subscribers.to_string())
        .env("DATABASE_URL", "postgres://unused/unused")
        .env("NATS_URL", "nats://unused")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting the subscribers' process")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let ready = tokio::time::timeout(Duration::from_secs(300), lines.next_line()).await.context("subscribers took over 5 minutes")??;
    let ready = ready.context("the subscribers' process ended")?;
    anyhow::ensure!(ready.starts_with("READY"), "the subscribers' process said {ready:?}");
    let connect_seconds: f64 = ready.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0.0);
    tokio::time::sleep(Duration::from_secs(2)).await; // each subscription starts when the server first polls it
    let held = understudy_adapters::metrics::METRICS.active_subscriptions.load(std::sync::atomic::Ordering::Relaxed);
    let rss_after = rss_kib();

    let child_pid = child.id().context("the subscribers' process id")?.to_string();
    let (node_cpu, clients_cpu) = (cpu_time("self"), cpu_time(&child_pid));
    let mut committed = Vec::with_capacity(changes);
    for round in 0..changes {
        let command = EnvironmentCommand::RecordTestResult {
            deployment_id: deployment,
            test: format!("fanout-{round}"),
            outcome: TestOutcome::Passed,
            duration_ms: None,
            at: Utc::now(),
        };
        store.execute(environment, command, meta()).await?;
        committed.push(unix_nanos());
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let per_change = |pid: &str, before: Duration| cpu_time(pid).saturating_sub(before).as_secs_f64() * 1000.0 / changes.max(1) as f64;
    let (node_cpu, clients_cpu) = (per_change("self", node_cpu), per_change(&child_pid, clients_cpu));
    stdin.write_all(b"DONE\n").await?;
    let mut received: HashMap<usize, Vec<u128>> = HashMap::new();
    while let Some(line) = tokio::time::timeout(Duration::from_secs(60), lines.next_line()).await?? {
        let mut parts = line.split_whitespace();
        if let (Some(round), Some(at)) = (parts.next().and_then(|r| r.parse().ok()), parts.next().and_then(|a| a.parse().ok())) {
            received.entry(round).or_default().push(at);
        }
    }
    let _ = child.wait().await;
    cancel.cancel();
    while tasks.join_next().await.is_some() {}

    let mut each = Vec::new();
    let mut all = Vec::new();
    let mut delivered = 0;
    for (round, at) in committed.iter().enumerate() {
        let got = received.get(&round).cloned().unwrap_or_default();
        delivered += got.len();
        each.extend(got.iter().map(|g| Duration::from_nanos(g.saturating_sub(*at) as u64)));
        if got.len() == subscribers {
            all.push(Duration::from_nanos(got.iter().max().copied().unwrap_or(*at).saturating_sub(*at) as u64));
        }
    }
    println!(
        "bench fanout: {subscribers} graphql-ws connections opened in {connect_seconds:.1} s; the node holds {held} subscriptions; \
         its memory grew {:.0} MiB ({:.1} KiB per subscriber)",
        (rss_after.saturating_sub(rss_before)) as f64 / 1024.0,
        (rss_after.saturating_sub(rss_before)) as f64 / subscribers.max(1) as f64
    );
    println!("{changes} changes, one at a time; {delivered} of {} deliveries arrived", changes * subscribers);
    println!("CPU per change: {node_cpu:.0} ms in this process (node, relay, projectors), {clients_cpu:.0} ms in the subscribers' process");
    summary("core NATS: one publish → each subscription", nats_each, changes * subscribers);
    let (_, nats_p99) = summary("core NATS: one publish → all subscriptions", nats_all, changes);
    summary("committed change → each graphql-ws subscriber", each, changes * subscribers);
    let (_, p99) = summary("committed change → all graphql-ws subscribers", all.clone(), changes);
    println!(
        "fan-out p99 ratio to baseline {:.1}×; target: 10k subscribers, p99 ≤ 200 ms to all ({} of {changes} changes reached all)",
        p99.as_secs_f64() / nats_p99.as_secs_f64().max(1e-9),
        all.len()
    );
    Ok(())
}

/// The part of a `next` message the subscribers read: the names of the environment's tests.
/// Parsed into borrowed strings, so that the clients, which share this machine's cores with the
/// node under test, take as little of them as a client can.
#[derive(serde::Deserialize)]
struct Next<'a> {
    #[serde(borrow)]
    payload: NextPayload<'a>,
}

#[derive(serde::Deserialize)]
struct NextPayload<'a> {
    #[serde(borrow)]
    data: NextData<'a>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct NextData<'a> {
    #[serde(borrow)]
    environment_updated: NextTests<'a>,
}

#[derive(serde::Deserialize)]
struct NextTests<'a> {
    #[serde(borrow)]
    tests: Vec<NextTest<'a>>,
}

#[derive(serde::Deserialize)]
struct NextTest<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
}

/// The subscribers: `subscribers` graphql-ws connections, each following the project's
/// environments; prints `READY seconds` once all are subscribed, then `round unix_nanos` for each
/// change each one receives, until `DONE` arrives on stdin.
pub async fn clients(addr: std::net::SocketAddr, project: Uuid, subscribers: usize) -> anyhow::Result<()> {
    raise_file_limit();
    let started = Instant::now();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(usize, u128)>();
    let stop = CancellationToken::new();
    let mut connections = JoinSet::new();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(128));
    let (opened_tx, mut opened_rx) = tokio::sync::mpsc::unbounded_channel::<anyhow::Result<()>>();
    for _ in 0..subscribers {
        let (sender, stop, gate, opened) = (sender.clone(), stop.clone(), gate.clone(), opened_tx.clone());
        connections.spawn(async move {
            let permit = gate.acquire_owned().await;
            let connected = follow_environments(addr, project, "tests { name }", None).await;
            drop(permit);
            let mut ws = match connected {
                Ok(ws) => {
                    let _ = opened.send(Ok(()));
                    ws
                }
                Err(error) => {
                    let _ = opened.send(Err(error));
                    return;
                }
            };
            let mut seen = 0usize;
            // One wait for the end, registered once: a new one per message would take the
            // token's lock, shared by every connection, twice per message.
            let stopped = stop.cancelled_owned();
            tokio::pin!(stopped);
            loop {
                tokio::select! {
                    _ = &mut stopped => return,
                    frame = ws.next() => match frame {
                        Some(Ok(Message::Text(text))) => {
                            let at = unix_nanos();
                            let Ok(next) = serde_json::from_str::<Next>(text.as_str()) else { continue };
                            let tests = next.payload.data.environment_updated.tests;
                            for test in tests.iter().skip(seen) {
                                if let Some(round) = test.name.strip_prefix("fanout-").and_then(|r| r.parse().ok()) {
                                    let _ = sender.send((round, at));
                                }
                            }
                            seen = seen.max(tests.len());
                        }
                        Some(Ok(_)) => {}
                        _ => return,
                    }
                }
            }
        });
    }
    drop(sender);
    drop(opened_tx);
    for _ in 0..subscribers {
        opened_rx.recv().await.context("a connection task ended")??;
    }
    let mut out = tokio::io::stdout();
    out.write_all(format!("READY {:.2}\n", started.elapsed().as_secs_f64()).as_bytes()).await?;
    out.flush().await?;
    let mut stdin = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut buffer = String::new();
    loop {
        tokio::select! {
            line = stdin.next_line() => {
                if line?.is_none_or(|l| l == "DONE") {
                    break;
                }
            }
            Some((round, at)) = receiver.recv() => buffer.push_str(&format!("{round} {at}\n")),
        }
    }
    while let Ok((round, at)) = receiver.try_recv() {
        buffer.push_str(&format!("{round} {at}\n"));
    }
    stop.cancel();
    out.write_all(buffer.as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

/// A minimal HTTP/1.1 JSON POST client over hyper (no TLS needed on loopback).
struct PostClient;

impl PostClient {
    async fn post(&self, url: String, body: &serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let uri: hyper::Uri = url.parse()?;
        let host = uri.authority().context("a host")?.to_string();
        let stream = tokio::net::TcpStream::connect(&host).await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let request = hyper::Request::post(uri.path())
            .header("host", host)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.to_string())))?;
        let response = sender.send_request(request).await?;
        let bytes = http_body_util::BodyExt::collect(response.into_body()).await?.to_bytes();
        Ok(serde_json::from_slice(&bytes)?)
    }
}
