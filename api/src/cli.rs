//! The operator commands that print: `events`, `status`, `replay`.

use std::io::Write;

use sqlx::PgPool;
use uuid::Uuid;

/// Prints an entity's history from the global log, as a table or as JSON lines.
pub async fn events(pool: &PgPool, id: Uuid, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let events = understudy_adapters::global_log::history(pool, id).await?;
    if events.is_empty() {
        anyhow::bail!("no events for {id}: check the id (an account, project, pull request or environment id)");
    }
    print_events(&events, json, out)
}

/// Prints everything one request caused (a webhook delivery, a command), in log order.
pub async fn trace(pool: &PgPool, correlation: Uuid, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let events = understudy_adapters::global_log::caused_by(pool, correlation).await?;
    if events.is_empty() {
        anyhow::bail!("no events with correlation id {correlation}");
    }
    print_events(&events, json, out)
}

fn print_events(events: &[understudy_adapters::LoggedEvent], json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    if json {
        for event in events {
            writeln!(out, "{}", serde_json::to_string(event)?)?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:>8}  {:<36}  {:>3}  {:<24}  {:<25}  {:<28}  correlation",
        "position", "entity", "v", "recorded (UTC)", "event", "actor"
    )?;
    for e in events {
        writeln!(
            out,
            "{:>8}  {:<36}  {:>3}  {:<24}  {:<25}  {:<28}  {}",
            e.position,
            e.aggregate_id,
            e.aggregate_version,
            e.recorded_at.format("%Y-%m-%d %H:%M:%S%.3f"),
            e.event_type,
            e.actor,
            e.correlation_id
        )?;
    }
    Ok(())
}

pub async fn status(pool: &PgPool, out: &mut impl Write) -> anyhow::Result<()> {
    writeln!(out, "{:<20} {:>12} {:>12} {:>8}", "projection", "checkpoint", "head", "lag")?;
    for lag in understudy_projections::projector::lag(pool).await? {
        writeln!(out, "{:<20} {:>12} {:>12} {:>8}", lag.projection, lag.checkpoint, lag.head, lag.lag)?;
    }
    Ok(())
}

/// What `understudy secret rotate` sealed again.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Resealed {
    pub secrets: usize,
    pub sessions: usize,
    /// Notification targets' signing secrets.
    pub notifications: usize,
}

/// Seals every project secret and every open session's GitHub token that another key sealed
/// again under `key`'s current key (as `SecretResealed` and `SessionTokenResealed` events). A
/// value no key of the ring opens is reported, never dropped.
pub async fn reseal_all(
    store: &understudy_adapters::EventStore,
    key: &understudy_adapters::secrets::SecretKey,
) -> anyhow::Result<Resealed> {
    use understudy_domain::ids::ProjectId;
    use understudy_domain::project::{ProjectCommand, SealedValue};
    use understudy_domain::user::UserCommand;
    let meta = understudy_domain::Metadata::new(uuid::Uuid::new_v4(), "operator:secret-rotate");
    let mut done = Resealed::default();
    let mut unopened = Vec::new();
    let projects: Vec<uuid::Uuid> =
        sqlx::query_scalar("SELECT project_id FROM projects ORDER BY project_id").fetch_all(&store.pool).await?;
    for project in projects {
        let state = store.projects.load(project).await?.into_inner();
        for (name, secret) in state.secrets.iter().filter(|(_, s)| s.sealed.key_id != key.id()) {
            match key.open(ProjectId(project), name, &secret.sealed) {
                Ok(value) => {
                    let sealed = key.seal(ProjectId(project), name, &value)?;
                    let command = ProjectCommand::ResealSecret { name: name.clone(), sealed, at: chrono::Utc::now() };
                    store.projects.execute(project, command, meta.clone()).await?;
                    done.secrets += 1;
                }
                Err(error) => unopened.push(format!("project {project} secret {name}: {error}")),
            }
        }
        for (target, notification) in state.notifications.iter().filter(|(_, t)| t.secret.key_id != key.id()) {
            let name = understudy_adapters::notify::secret_name(*target);
            match key.open(ProjectId(project), &name, &notification.secret) {
                Ok(value) => {
                    let secret = key.seal(ProjectId(project), &name, &value)?;
                    let command = ProjectCommand::ResealNotificationSecret { target_id: *target, secret, at: chrono::Utc::now() };
                    store.projects.execute(project, command, meta.clone()).await?;
                    done.notifications += 1;
                }
                Err(error) => unopened.push(format!("project {project} notification target {target}: {error}")),
            }
        }
    }
    let sessions: Vec<(uuid::Uuid, uuid::Uuid, sqlx::types::Json<SealedValue>)> = sqlx::query_as(
        "SELECT user_id, session_id, github_token FROM user_sessions
         WHERE ended_at IS NULL AND expires_at > now() AND github_token->>'key_id' <> $1",
    )
    .bind(key.id())
    .fetch_all(&store.pool)
    .await?;
    for (user, session, sealed) in sessions {
        let context = crate::auth::github_token_context(understudy_domain::ids::UserId(user), session);
        match key.open_for(&context, "GitHub token", &sealed.0) {
            Ok(token) => {
                let github_token = key.seal_for(&context, &token)?;
                let command = UserCommand::ResealGitHubToken { session_id: session, github_token, at: chrono::Utc::now() };
                store.users.execute(user, command, meta.clone()).await?;
                done.sessions += 1;
            }
            Err(error) => unopened.push(format!("session {session} of user {user}: {error}")),
        }
    }
    if !unopened.is_empty() {
        anyhow::bail!(
            "sealed again: {} secrets and {} sessions; these did not open with any key given (add the key that sealed them to \
             UNDERSTUDY_PREVIOUS_SECRET_KEYS):\n{}",
            done.secrets,
            done.sessions,
            unopened.join("\n")
        );
    }
    Ok(done)
}

pub async fn replay(pool: &PgPool, which: &str) -> anyhow::Result<()> {
    if which == "access" || which == "all" {
        let started = std::time::Instant::now();
        let events = understudy_adapters::access_index::rebuild(pool).await?;
        println!("access: rebuilt from {events} events in {:.2}s and swapped in", started.elapsed().as_secs_f64());
        if which == "access" {
            return Ok(());
        }
    }
    let projections = understudy_projections::selected(which)?;
    for projection in projections {
        let started = std::time::Instant::now();
        let report = understudy_projections::replay::replay(pool, projection.as_ref(), |done, head| {
            let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-3);
            let left = (head as f64 - done as f64).max(0.0) / rate.max(1.0);
            let width = 30usize;
            let filled = if head > 0 { (done as f64 / head as f64 * width as f64).min(width as f64) as usize } else { width };
            eprint!(
                "\r{}: [{}{}] {done}/{head} events, {rate:.0}/s, ETA {left:.0}s   ",
                projection.name(),
                "#".repeat(filled),
                " ".repeat(width - filled)
            );
        })
        .await?;
        eprintln!();
        println!(
            "{}: rebuilt from {} events up to position {} in {:.2}s ({:.0} events/s) and swapped in",
            report.projection,
            report.events,
            report.position,
            report.seconds,
            report.events as f64 / report.seconds.max(1e-9)
        );
    }
    Ok(())
}

/// Prints an entity's state at a moment (now when `at` is `None`) as JSON.
pub async fn state(pool: &PgPool, id: Uuid, at: Option<chrono::DateTime<chrono::Utc>>, out: &mut impl Write) -> anyhow::Result<()> {
    match understudy_projections::time_travel::state_at(pool, id, at).await? {
        Some(state) => writeln!(out, "{}", serde_json::to_string_pretty(&state)?)?,
        None => anyhow::bail!("{id} had no events by {}", at.map_or("now".to_string(), |at| at.to_rfc3339())),
    }
    Ok(())
}

/// Compares each live read model with a fresh replay; an error when any differs.
pub async fn verify(pool: &PgPool, which: &str, out: &mut impl Write) -> anyhow::Result<()> {
    let mut differing = Vec::new();
    if which == "access" || which == "all" {
        let differences = understudy_adapters::access_index::verify(pool).await?;
        if differences.is_empty() {
            writeln!(out, "access: live equals a rebuild from the log")?;
        }
        for d in &differences {
            writeln!(
                out,
                "access: {} differs: {} rows only live, {} only in the rebuild",
                d.table,
                d.only_live.len(),
                d.only_replayed.len()
            )?;
            for row in &d.only_live {
                writeln!(out, "  live:     {row}")?;
            }
            for row in &d.only_replayed {
                writeln!(out, "  replayed: {row}")?;
            }
        }
        if !differences.is_empty() {
            differing.push("access".to_string());
        }
        if which == "access" {
            return if differing.is_empty() { Ok(()) } else { anyhow::bail!("the access index differs from a rebuild from the log") };
        }
    }
    let projections = understudy_projections::selected(which)?;
    for projection in projections {
        let report = understudy_projections::replay::verify(pool, projection.as_ref()).await?;
        if report.differences.is_empty() {
            writeln!(out, "{}: live equals replay at position {}", report.projection, report.position)?;
        } else {
            for d in &report.differences {
                writeln!(
                    out,
                    "{}: {} differs at position {}: {} rows only live, {} only in the replay",
                    report.projection, d.table, report.position, d.only_live_count, d.only_replayed_count
                )?;
                for row in &d.only_live {
                    writeln!(out, "  live:     {row}")?;
                }
                for row in &d.only_replayed {
                    writeln!(out, "  replayed: {row}")?;
                }
            }
            differing.push(report.projection);
        }
    }
    if !differing.is_empty() {
        anyhow::bail!("read models differ from a replay of the log: {}", differing.join(", "));
    }
    Ok(())
}

/// Exports usage rows as CSV (with a header) or JSON lines.
pub async fn usage(
    pool: &PgPool,
    project: Option<Uuid>,
    from: Option<chrono::NaiveDate>,
    to: Option<chrono::NaiveDate>,
    format: &str,
    out: &mut impl Write,
) -> anyhow::Result<()> {
    let rows = understudy_projections::usage::usage(pool, project, from, to).await?;
    match format {
        "json" => {
            for row in &rows {
                writeln!(out, "{}", serde_json::to_string(row)?)?;
            }
        }
        "csv" => {
            writeln!(
                out,
                "project_id,day,environments_created,deployments_requested,deployments_ready,deployments_failed,mean_seconds_to_ready,tests_passed,tests_failed,environments_terminated"
            )?;
            for r in &rows {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{},{},{}",
                    r.project_id,
                    r.day,
                    r.environments_created,
                    r.deployments_requested,
                    r.deployments_ready,
                    r.deployments_failed,
                    r.mean_seconds_to_ready.map(|s| format!("{s:.3}")).unwrap_or_default(),
                    r.tests_passed,
                    r.tests_failed,
                    r.environments_terminated
                )?;
            }
        }
        other => anyhow::bail!("--format {other:?}: use csv or json"),
    }
    Ok(())
}
