//! `understudy bench replay`: rebuilding the `environments` read model from a log of 10k, 100k and
//! 1M events, against a raw sequential read of the same log, and how the other costs grow with it.
//!
//! The log is grown by copying one environment's real life (created, deployed, built, Ready,
//! tested, as the command path wrote it) under new environment and event ids, so every event is
//! one the domain wrote and the projection must fold.

use std::time::{Duration, Instant};

use understudy_adapters::global_log;
use understudy_domain::environment::{EnvironmentCommand, TestOutcome};
use understudy_domain::ids::{EnvironmentId, ProjectId};
use understudy_projections::environments::Environments;
use uuid::Uuid;

use crate::bench::{cycle, meta, spec};
use crate::runtime::Runtime;

/// Events a raw read or a replay takes per round trip (the replay's own batch).
const BATCH: i64 = 5000;

pub async fn replay(runtime: &Runtime, database_url: &str, nats_url: &str, sizes: &[u64]) -> anyhow::Result<()> {
    let pool = &runtime.pool;
    // The template: one environment's life through the command path, with 5 more test results.
    let project = ProjectId(Uuid::new_v4());
    let s = spec(project, 1);
    let id = EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint);
    let mut commands = cycle(&s);
    let deployment = match &commands[0] {
        EnvironmentCommand::RequestDeployment { deployment_id, .. } => *deployment_id,
        _ => unreachable!("a cycle starts with its request"),
    };
    for n in 0..5 {
        commands.push(EnvironmentCommand::RecordTestResult {
            deployment_id: deployment,
            test: format!("more-{n}"),
            outcome: TestOutcome::Passed,
            duration_ms: Some(12),
            at: chrono::Utc::now(),
        });
    }
    for command in commands {
        runtime.store.environments.execute(id.0, command, meta()).await?;
    }
    understudy_adapters::relay::sequence(pool, 1000).await?;
    sqlx::query(
        "CREATE TABLE bench_template AS
         SELECT row_number() OVER (ORDER BY position) AS ord, aggregate_type, aggregate_version, event_type,
                schema_version, payload, recorded_at, correlation_id, causation_id, actor
         FROM event_log WHERE aggregate_id = $1",
    )
    .bind(id.0)
    .execute(pool)
    .await?;
    let per_environment: i64 = sqlx::query_scalar("SELECT count(*) FROM bench_template").fetch_one(pool).await?;

    println!("bench replay: the environments read model rebuilt from the log, {per_environment} events per environment");
    println!(
        "{:>9}  {:>13}  {:>13}  {:>6}  {:>10}  {:>12}  {:>11}  {:>13}",
        "events", "raw read /s", "replay /s", "ratio", "replay s", "log on disk", "page query", "idle `up` RSS"
    );
    for &size in sizes {
        let head = grow(pool, size as i64, per_environment).await?;
        let (raw, _) = raw_read(pool, head).await?;
        let started = Instant::now();
        let report = understudy_projections::replay::replay(pool, &Environments, |_, _| {}).await?;
        let seconds = started.elapsed().as_secs_f64();
        anyhow::ensure!(report.position == head, "the replay reached {} of {head}", report.position);
        let replayed = report.events as f64 / seconds;
        let on_disk: i64 = sqlx::query_scalar("SELECT pg_total_relation_size('event_log')").fetch_one(pool).await?;
        let page = page_query(pool).await?;
        let rss = idle_rss(pool, database_url, nats_url, &runtime.topology.prefix, head).await?;
        println!(
            "{head:>9}  {raw:>13.0}  {replayed:>13.0}  {:>5.2}×  {seconds:>10.2}  {:>9.0} MB  {:>8.2} ms  {:>10.1} MB",
            replayed / raw,
            on_disk as f64 / 1e6,
            page.as_secs_f64() * 1e3,
            rss as f64 / (1 << 20) as f64
        );
    }
    println!("targets: replay ≥ 50,000 events/s at 1M events; idle `understudy up` ≤ 100 MB RSS");
    Ok(())
}

/// Copies the template until the log holds about `size` events; returns the head position.
async fn grow(pool: &sqlx::PgPool, size: i64, per_environment: i64) -> anyhow::Result<i64> {
    let head = global_log::head(pool).await?;
    let copies = (size - head) / per_environment;
    // In slices, so no one transaction holds hundreds of megabytes.
    let mut done = 0;
    while done < copies {
        let slice = (copies - done).min(20_000);
        let base = head + done * per_environment;
        sqlx::query(
            "INSERT INTO event_log (position, event_id, aggregate_type, aggregate_id, aggregate_version, event_type,
                 schema_version, payload, recorded_at, correlation_id, causation_id, actor)
             SELECT $1 + (c.n - 1) * $2 + t.ord, gen_random_uuid(), t.aggregate_type, c.id, t.aggregate_version, t.event_type,
                 t.schema_version,
                 -- Each copy a millisecond after the one before, and its own id where the payload names it.
                 jsonb_set(
                     CASE WHEN t.payload ? 'environment_id' THEN jsonb_set(t.payload, '{environment_id}', to_jsonb(c.id::text)) ELSE t.payload END,
                     '{at}', to_jsonb(t.recorded_at + ($1 + c.n) * interval '1 millisecond')),
                 t.recorded_at + ($1 + c.n) * interval '1 millisecond', t.correlation_id, t.causation_id, t.actor
             FROM (SELECT n, gen_random_uuid() AS id FROM generate_series(1, $3::bigint) n) c CROSS JOIN bench_template t",
        )
        .bind(base)
        .bind(per_environment)
        .bind(slice)
        .execute(pool)
        .await?;
        done += slice;
    }
    let head = head + copies * per_environment;
    sqlx::query("UPDATE log_cursors SET position = $1 WHERE name IN ('sequenced', 'published')").bind(head).execute(pool).await?;
    sqlx::query("ANALYZE event_log").execute(pool).await?;
    Ok(head)
}

/// The baseline: every event read in position order, in the replay's batches, decoded as the
/// replay decodes them (JSON payload included), and nothing done with them.
async fn raw_read(pool: &sqlx::PgPool, head: i64) -> anyhow::Result<(f64, u64)> {
    let started = Instant::now();
    let (mut position, mut events) = (0, 0u64);
    loop {
        let batch = global_log::read_range(pool, position, head, BATCH).await?;
        let Some(last) = batch.last() else { break };
        position = last.position;
        events += batch.len() as u64;
    }
    Ok((events as f64 / started.elapsed().as_secs_f64(), events))
}

/// Median time of the dashboard's first page of one project's environments (the newest 100).
async fn page_query(pool: &sqlx::PgPool) -> anyhow::Result<Duration> {
    let project: Uuid = sqlx::query_scalar("SELECT project_id FROM environments LIMIT 1").fetch_one(pool).await?;
    let mut samples = Vec::new();
    for _ in 0..21 {
        let started = Instant::now();
        let rows: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT environment_id FROM environments WHERE project_id = $1 ORDER BY updated_at DESC, environment_id LIMIT 100",
        )
        .bind(project)
        .fetch_all(pool)
        .await?;
        anyhow::ensure!(!rows.is_empty(), "the project has no environments");
        samples.push(started.elapsed());
    }
    samples.sort();
    Ok(samples[samples.len() / 2])
}

/// The resident memory of an `understudy up` (every role in one process) over this log, idle:
/// started with every projection at the head (the others than `environments` are marked caught
/// up, so it starts with nothing to do), ready, then left alone for 5 s.
async fn idle_rss(pool: &sqlx::PgPool, database_url: &str, nats_url: &str, prefix: &str, head: i64) -> anyhow::Result<u64> {
    sqlx::query("UPDATE projector_checkpoints SET position = $1").bind(head).execute(pool).await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let data = std::env::temp_dir().join(format!("understudy-bench-up-{}", Uuid::new_v4().simple()));
    std::fs::create_dir_all(&data)?;
    let mut up = tokio::process::Command::new(std::env::current_exe()?)
        .arg("up")
        .env("DATABASE_URL", database_url)
        .env("NATS_URL", nats_url)
        .env("UNDERSTUDY_NATS_PREFIX", prefix)
        .env("UNDERSTUDY_LISTEN", format!("127.0.0.1:{port}"))
        .env("UNDERSTUDY_DATA_DIR", &data)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let pid = up.id().unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        anyhow::ensure!(up.try_wait()?.is_none(), "`understudy up` exited before it was ready");
        if readyz(port).await {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "`understudy up` was not ready in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let _ = up.start_kill();
    let _ = up.wait().await;
    let _ = std::fs::remove_dir_all(&data);
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// Whether `GET /readyz` answers 200.
async fn readyz(port: u16) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    if stream.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.is_err() {
        return false;
    }
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response).await;
    response.starts_with(b"HTTP/1.1 200")
}
