//! The operator commands that print: `events`, `status`, `replay`.

use std::io::Write;

use sqlx::PgPool;
use uuid::Uuid;

/// Prints an entity's history from the global log, as a table or as JSON lines.
pub async fn events(pool: &PgPool, id: Uuid, json: bool, out: &mut impl Write) -> anyhow::Result<()> {
    let events = understudy_adapters::global_log::history(pool, id).await?;
    if events.is_empty() {
        anyhow::bail!("no events for {id}: check the id (an account, project or environment id)");
    }
    if json {
        for event in &events {
            writeln!(out, "{}", serde_json::to_string(event)?)?;
        }
        return Ok(());
    }
    writeln!(out, "{:>8}  {:>3}  {:<24}  {:<25}  {:<28}  correlation", "position", "v", "recorded (UTC)", "event", "actor")?;
    for e in &events {
        writeln!(
            out,
            "{:>8}  {:>3}  {:<24}  {:<25}  {:<28}  {}",
            e.position,
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

pub async fn replay(pool: &PgPool, which: &str) -> anyhow::Result<()> {
    let projections = if which == "all" { understudy_projections::all() } else { vec![understudy_projections::by_name(which)?] };
    for projection in projections {
        let report = understudy_projections::replay::replay(pool, projection.as_ref(), |done, head| {
            eprint!("\r{}: {done} events replayed (log head {head})   ", projection.name());
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
