//! `understudy bench reads`: the reads by position that `environmentUpdated` subscriptions make
//! (a resume's page, the rows changed between two notices, the newest page after a reconnect),
//! and the environments list the dashboard shows, for one project and for every project, on a read
//! model of many environments; against the same reads in the same run without the indexes of
//! migrations 0014 and 0015.
//!
//! The read model is grown by copying one environment's row, as the projection wrote it from the
//! command path's events, under new ids, spread over the projects, at shuffled positions and
//! update times.

use std::time::{Duration, Instant};

use understudy_domain::ids::{EnvironmentId, ProjectId};
use understudy_projections::environments::Environments;
use uuid::Uuid;

use crate::bench::{cycle, meta, percentile, spec};
use crate::graphql::{latest_environments, page_after, EnvironmentRow, ListFilter, SharedReads, MAX_PAGE};
use crate::runtime::Runtime;

pub async fn reads(runtime: &Runtime, environments: u64, projects: u64, runs: usize) -> anyhow::Result<()> {
    anyhow::ensure!(environments >= projects && projects > 0 && runs > 0, "need environments ≥ projects > 0 and runs > 0");
    let pool = &runtime.pool;
    let template = ProjectId(Uuid::new_v4());
    let s = spec(template, 1);
    let id = EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint);
    for command in cycle(&s) {
        runtime.store.environments.execute(id.0, command, meta()).await?;
    }
    understudy_adapters::relay::sequence(pool, 1000).await?;
    understudy_projections::replay::replay(pool, &Environments, |_, _| {}).await?;
    let grown = Instant::now();
    sqlx::query("CREATE TABLE bench_projects AS SELECT gen_random_uuid() AS id, n FROM generate_series(1, $1) AS n")
        .bind(projects as i64)
        .execute(pool)
        .await?;
    let per_project = environments.div_ceil(projects) as i64;
    sqlx::query(
        "INSERT INTO environments
         SELECT gen_random_uuid(), p.id, t.target_kind, t.branch || '-' || e, e, t.entrypoint, t.status,
                t.latest_deployment_id, t.latest_commit, t.latest_deployment_status, t.preview_url, t.failure,
                t.tests_passed, t.tests_failed, t.tests, t.created_at, t.updated_at, t.state, 0
         FROM environments t, bench_projects p, generate_series(1, $2) AS e
         WHERE t.environment_id = $1",
    )
    .bind(id.0)
    .bind(per_project)
    .execute(pool)
    .await?;
    sqlx::query("DELETE FROM environments WHERE environment_id = $1").bind(id.0).execute(pool).await?;
    sqlx::query(
        "UPDATE environments SET position = shuffled.position, updated_at = now() - random() * interval '30 days'
         FROM (SELECT environment_id, row_number() OVER (ORDER BY random()) AS position FROM environments) AS shuffled
         WHERE shuffled.environment_id = environments.environment_id",
    )
    .execute(pool)
    .await?;
    sqlx::query("VACUUM ANALYZE environments").execute(pool).await?;
    let (count, head): (i64, i64) = sqlx::query_as("SELECT count(*), max(position) FROM environments").fetch_one(pool).await?;
    let project: Uuid =
        sqlx::query_scalar("SELECT id FROM bench_projects WHERE n = ($1 + 1) / 2").bind(projects as i64).fetch_one(pool).await?;

    println!(
        "bench reads: {count} environments in {projects} projects (grown in {:.1} s), {runs} runs of each read, \
         p50 / p99 in ms",
        grown.elapsed().as_secs_f64()
    );
    let with = measure(pool, project, head, runs).await?;
    // The baseline: without the indexes of migrations 0014 and 0015, as the migrations made them.
    let indexes: Vec<String> = sqlx::query_scalar(
        "SELECT indexdef FROM pg_indexes WHERE schemaname = current_schema()
         AND indexname IN ('environments_project_position', 'environments_position', 'environments_recent')",
    )
    .fetch_all(pool)
    .await?;
    anyhow::ensure!(indexes.len() == 3, "the indexes of migrations 0014 and 0015 are there: {indexes:?}");
    sqlx::query("DROP INDEX environments_project_position, environments_position, environments_recent").execute(pool).await?;
    sqlx::query("ANALYZE environments").execute(pool).await?;
    let without = measure(pool, project, head, runs).await;
    // Put them back, whatever the baseline did.
    for index in &indexes {
        sqlx::query(index).execute(pool).await?;
    }
    let without = without?;
    println!("{:<62} {:>17}  {:>17}  {:>8}", "read", "with the indexes", "without (baseline)", "p50 ratio");
    for ((name, indexed), (_, baseline)) in with.iter().zip(&without) {
        let (p50, p99) = (percentile(indexed, 0.5), percentile(indexed, 0.99));
        let (base50, base99) = (percentile(baseline, 0.5), percentile(baseline, 0.99));
        println!(
            "{name:<62} {:>7.2} / {:>7.2}  {:>7.2} / {:>7.2}  {:>7.3}×",
            ms(p50),
            ms(p99),
            ms(base50),
            ms(base99),
            p50.as_secs_f64() / base50.as_secs_f64()
        );
    }
    Ok(())
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e3
}

/// Each read `runs` times: its name and sorted durations. A resume starts a page behind the head,
/// the notices' in-between read spans 100 positions, a reconnect reads the newest page.
async fn measure(pool: &sqlx::PgPool, project: Uuid, head: i64, runs: usize) -> anyhow::Result<Vec<(String, Vec<Duration>)>> {
    let mut results = Vec::new();
    for (scope, key) in [("one project", Some(project)), ("every project", None)] {
        let mut resume = Vec::with_capacity(runs);
        let mut between = Vec::with_capacity(runs);
        let mut latest = Vec::with_capacity(runs);
        let mut list = Vec::with_capacity(runs);
        // One untimed round first: plans prepared and pages cached, as on a node that has run.
        page_after(pool, key, head - MAX_PAGE).await.map_err(|e| anyhow::anyhow!(e.message))?;
        latest_environments(pool, key).await;
        for run in 0..runs as i64 {
            let started = Instant::now();
            let (page, _) = page_after(pool, key, head - MAX_PAGE - run).await.map_err(|e| anyhow::anyhow!(e.message))?;
            resume.push(started.elapsed());
            anyhow::ensure!(key.is_some() || page.len() as i64 == MAX_PAGE, "a page of every project's environments is full");
            let started = Instant::now();
            // A fresh cache each time: the read, not the cache, is measured.
            SharedReads::default().between(pool, key, head - 100 - run, head - run).await.map_err(|e| anyhow::anyhow!(e.message))?;
            between.push(started.elapsed());
            let started = Instant::now();
            let newest = latest_environments(pool, key).await;
            latest.push(started.elapsed());
            anyhow::ensure!(!newest.is_empty(), "the newest environments were read");
            let started = Instant::now();
            let filter = ListFilter { projects: key.map(|p| vec![p]), status: None, branch: None, pull_request: None, before: None };
            let page: Vec<EnvironmentRow> = filter.query(100).build_query_as().fetch_all(pool).await?;
            list.push(started.elapsed());
            anyhow::ensure!(!page.is_empty(), "the list has environments");
        }
        for (read, mut samples) in [
            ("a resume's page after a position", resume),
            ("the rows between two notices (100 positions)", between),
            ("the newest page, after a reconnect", latest),
            ("the list's first 100, most recently updated first", list),
        ] {
            samples.sort();
            results.push((format!("{read}, {scope}"), samples));
        }
    }
    Ok(results)
}
