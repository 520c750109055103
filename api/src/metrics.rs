//! `GET /metrics`: Prometheus text format. This process's counters, plus what Postgres knows
//! (log head, relay and projector lag, environments and deployments by status, backlogs).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use sqlx::PgPool;
use understudy_adapters::metrics::{escape, METRICS};

fn gauge(out: &mut String, name: &str, help: &str, rows: &[(Option<(&str, String)>, i64)]) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} gauge\n"));
    for (label, value) in rows {
        match label {
            Some((key, label)) => out.push_str(&format!("{name}{{{key}=\"{}\"}} {value}\n", escape(label))),
            None => out.push_str(&format!("{name} {value}\n")),
        }
    }
}

async fn labeled(pool: &PgPool, sql: &str, key: &'static str) -> sqlx::Result<Vec<(Option<(&'static str, String)>, i64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(label, value)| (Some((key, label)), value)).collect())
}

async fn render(pool: &PgPool) -> sqlx::Result<String> {
    let mut out = String::new();
    METRICS.render(&mut out);
    let lags = understudy_projections::projector::lag(pool).await?;
    let checkpoints: Vec<_> = lags.iter().map(|l| (Some(("projection", l.projection.clone())), l.checkpoint)).collect();
    gauge(&mut out, "understudy_projector_checkpoint", "Last global position each projection applied.", &checkpoints);
    let behind: Vec<_> = lags.iter().map(|l| (Some(("projection", l.projection.clone())), l.lag)).collect();
    gauge(&mut out, "understudy_projector_lag_events", "Events between the log's head and each projection's checkpoint.", &behind);
    let (sequenced, published): (i64, i64) = sqlx::query_as(
        "SELECT max(position) FILTER (WHERE name = 'sequenced'), max(position) FILTER (WHERE name = 'published') FROM log_cursors",
    )
    .fetch_one(pool)
    .await?;
    gauge(&mut out, "understudy_log_head", "Highest global position numbered.", &[(None, sequenced)]);
    gauge(&mut out, "understudy_relay_lag_events", "Numbered events not yet published to JetStream.", &[(None, sequenced - published)]);
    let unsequenced: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log WHERE position IS NULL").fetch_one(pool).await?;
    gauge(&mut out, "understudy_log_unsequenced_events", "Committed or in-flight events not yet numbered.", &[(None, unsequenced)]);
    let environments = labeled(pool, "SELECT status, count(*) FROM environments GROUP BY status ORDER BY status", "status").await?;
    gauge(&mut out, "understudy_environments", "Environments by status.", &environments);
    let deployments = labeled(
        pool,
        "SELECT latest_deployment_status, count(*) FROM environments WHERE latest_deployment_status IS NOT NULL GROUP BY 1 ORDER BY 1",
        "status",
    )
    .await?;
    gauge(&mut out, "understudy_latest_deployments", "Each environment's latest deployment, by status.", &deployments);
    let deliveries = labeled(pool, "SELECT state, count(*) FROM webhook_deliveries GROUP BY state ORDER BY state", "state").await?;
    gauge(&mut out, "understudy_webhook_deliveries", "Recorded webhook deliveries by processing state.", &deliveries);
    let outbox = labeled(
        pool,
        "SELECT kind, count(*) FROM github_outbox WHERE dirty_position > written_position GROUP BY kind ORDER BY kind",
        "kind",
    )
    .await?;
    gauge(&mut out, "understudy_github_outbox_pending", "GitHub writes waiting (comments, statuses).", &outbox);
    Ok(out)
}

pub async fn metrics(State(pool): State<PgPool>) -> Response {
    match render(&pool).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response(),
        Err(error) => (StatusCode::SERVICE_UNAVAILABLE, format!("metrics unavailable: {error}")).into_response(),
    }
}
