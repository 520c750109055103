//! Notifications: outgoing webhooks about a project's long-lived environments (its tiers and its
//! production branch; pull requests have their comment). A deployment that failed, one that
//! passed after a failure, a promotion, a rollback.
//!
//! Two halves, both in the scheduler role:
//! - **Enqueue.** The notifier reads the global log from its cursor, in position order, and
//!   inserts one delivery per event and subscribed target in the transaction that moves the
//!   cursor. Delivery ids derive from the event and the target, so nothing is enqueued twice
//!   and nothing is skipped, whatever crashes when.
//! - **Send.** Due deliveries are claimed by pushing their next attempt a minute ahead, then
//!   POSTed with a timeout. 2xx delivers; anything else is retried with exponential backoff (or
//!   after `Retry-After`), [`MAX_ATTEMPTS`] times at most. A slow or dead endpoint delays only its
//!   own deliveries: the pipeline never waits for it.
//!
//! Each request carries `X-Understudy-Event` (the kind), `X-Understudy-Delivery` (the id; the
//! same on retries) and `X-Understudy-Signature-256: sha256=<HMAC-SHA256 of the body>` under the
//! target's secret.
//!
//! A `mailto:` target gets the same news by email, through the installation's SMTP server
//! ([`Mailer`], `UNDERSTUDY_SMTP_URL`): a plain-text message whose `Message-ID` derives from the
//! delivery, so a retry after a lost answer is recognisably the same message. A 4xx answer or a
//! lost connection is retried like an HTTP failure; a 5xx (no such mailbox) is given up at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, Mac};
use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use serde_json::{json, Value};
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use understudy_domain::environment::{Deployment, DeploymentStatus, Environment, EnvironmentEvent, TestOutcome};
use understudy_domain::event::decode_event;
use understudy_domain::ids::ProjectId;
use understudy_domain::project::{NotificationKind, Project};
use uuid::Uuid;

use crate::secrets::SecretKey;
use crate::{CommandError, EventStore};

/// Attempts before a delivery is given up.
pub const MAX_ATTEMPTS: i32 = 8;
/// Events the notifier reads per transaction.
const BATCH: i64 = 500;

pub struct Notifier {
    pub store: EventStore,
    /// Opens the targets' signing secrets; without it nothing is sent (and deliveries wait).
    pub key: Option<Arc<SecretKey>>,
    /// Links in the payloads point here.
    pub public_url: String,
    pub every: Duration,
    /// The first retry's delay; each next one doubles, up to an hour.
    pub retry_base: Duration,
    pub http: reqwest::Client,
    /// Sends `mailto:` targets' messages; without it they wait (and retry) with a clear error.
    pub mailer: Option<Arc<Mailer>>,
}

/// The installation's SMTP server and the address its messages come from.
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// `url` as `smtps://user:pass@host:465`, `smtp://host:587?tls=required` or, on a trusted
    /// network only, `smtp://host:25`; `from` as `Understudy <understudy@example.com>`.
    pub fn new(url: &str, from: &str) -> anyhow::Result<Self> {
        let transport = AsyncSmtpTransport::<Tokio1Executor>::from_url(url)
            .map_err(|e| anyhow::anyhow!("UNDERSTUDY_SMTP_URL: {e}"))?
            .timeout(Some(Duration::from_secs(20)))
            .build();
        let from = from.parse().map_err(|e| anyhow::anyhow!("UNDERSTUDY_SMTP_FROM {from:?}: {e}"))?;
        Ok(Self { transport, from })
    }

    /// From `UNDERSTUDY_SMTP_URL` and `UNDERSTUDY_SMTP_FROM` (default `Understudy
    /// <understudy@localhost>`); none without a URL.
    pub fn from_env() -> anyhow::Result<Option<Self>> {
        let Some(url) = std::env::var("UNDERSTUDY_SMTP_URL").ok().filter(|u| !u.trim().is_empty()) else { return Ok(None) };
        let from = std::env::var("UNDERSTUDY_SMTP_FROM").unwrap_or_else(|_| "Understudy <understudy@localhost>".into());
        Self::new(url.trim(), &from).map(Some)
    }

    /// One message about `payload` to `to`: `Err((worth retrying, why))` unless the server took it.
    async fn send(&self, to: &str, delivery: Uuid, kind: &str, payload: &Value) -> Result<(), (bool, String)> {
        let to: Mailbox = to.parse().map_err(|e| (false, format!("mailto:{to}: {e}")))?;
        let (subject, text) = email_text(kind, payload);
        let message = Message::builder()
            .from(self.from.clone())
            .to(to.clone())
            .subject(subject)
            .message_id(Some(format!("<{delivery}@understudy>")))
            .header(ContentType::TEXT_PLAIN)
            .body(text)
            .map_err(|e| (false, format!("the message to {to}: {e}")))?;
        match self.transport.send(message).await {
            Ok(_) => Ok(()),
            Err(error) => Err((!error.is_permanent(), format!("SMTP, to {to}: {error}"))),
        }
    }
}

/// A notification as an email: its subject line and plain-text body.
fn email_text(kind: &str, payload: &Value) -> (String, String) {
    let text = |v: &Value| v.as_str().unwrap_or("-").to_string();
    let project = payload["project"]["name"].as_str().or(payload["project"]["repository"].as_str()).unwrap_or("a project").to_string();
    let environment = &payload["environment"];
    let place = match environment["tier"].as_str() {
        Some(tier) => format!("tier {tier}"),
        None => format!("{} {}", text(&environment["kind"]), text(&environment["branch"])),
    };
    let deployment = &payload["deployment"];
    let commit: String = text(&deployment["commit"]).chars().take(12).collect();
    let what = match kind {
        "failed" => "failed",
        "recovered" => "passed again",
        "promoted" => "was promoted",
        "rolled_back" => "was rolled back",
        other => other,
    };
    let subject = format!("[Understudy] {project}: {place} {what} at {commit}");
    let entrypoint = environment["entrypoint"].as_str().filter(|e| *e != ".").map(|e| format!(" ({e})")).unwrap_or_default();
    let mut body = format!(
        "{project}, {place}{entrypoint}\nThe deployment of {commit} {what}.\n\nStatus: {status}\nTests: {passed} passed, {failed} failed\n",
        status = text(&deployment["status"]),
        passed = deployment["testsPassed"].as_u64().unwrap_or(0),
        failed = deployment["testsFailed"].as_u64().unwrap_or(0),
    );
    if let Some(failure) = deployment["failure"].as_str() {
        body.push_str(&format!("Why: {failure}\n"));
    }
    body.push_str(&format!("By: {}\nAt: {}\n\nBuild log: {}\n", text(&payload["by"]), text(&payload["at"]), text(&environment["url"])));
    (subject, body)
}

impl Notifier {
    pub fn new(store: EventStore, key: Option<Arc<SecretKey>>, public_url: String) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("Understudy-Notifications")
            .build()
            .unwrap_or_default();
        Self { store, key, public_url, every: Duration::from_secs(1), retry_base: Duration::from_secs(2), http, mailer: None }
    }

    pub async fn run(self, cancel: CancellationToken) {
        crate::worker::every("notifications pass", self.every, cancel, || self.pass()).await
    }

    /// Enqueues what the log has news of, then sends what is due: `(enqueued, delivered)`.
    pub async fn pass(&self) -> anyhow::Result<(usize, usize)> {
        let mut enqueued = 0;
        loop {
            let (read, added) = self.enqueue().await?;
            enqueued += added;
            if read < BATCH as usize {
                break;
            }
        }
        Ok((enqueued, self.send_due().await?))
    }

    /// One batch of the log after the cursor: `(events read, deliveries enqueued)`.
    async fn enqueue(&self) -> anyhow::Result<(usize, usize)> {
        let mut tx = self.store.pool.begin().await?;
        let cursor: i64 =
            sqlx::query_scalar("SELECT position FROM notification_cursor WHERE name = 'notifier' FOR UPDATE").fetch_one(&mut *tx).await?;
        type Row = (i64, Uuid, Uuid, String, i32, Value, String);
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT position, event_id, aggregate_id, aggregate_type, schema_version, payload, actor FROM event_log
             WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(cursor)
        .bind(BATCH)
        .fetch_all(&mut *tx)
        .await?;
        let mut projects: HashMap<ProjectId, Project> = HashMap::new();
        let mut added = 0;
        for (_, event_id, aggregate_id, aggregate_type, version, payload, actor) in &rows {
            if aggregate_type != "environment" {
                continue;
            }
            let Ok(event) = decode_event::<EnvironmentEvent>(*version as u32, payload.clone()) else { continue };
            if !matches!(
                event,
                EnvironmentEvent::DeploymentFailed { .. }
                    | EnvironmentEvent::TestsCompleted { .. }
                    | EnvironmentEvent::DeploymentPromoted { .. }
                    | EnvironmentEvent::RolledBack { .. }
            ) {
                continue;
            }
            let environment = self.store.environments.load(*aggregate_id).await.map_err(CommandError::from)?.into_inner();
            let Some(spec) = environment.spec.clone() else { continue };
            if spec.target.pull_request().is_some() {
                continue;
            }
            let Some((kind, deployment)) = news(&event, &environment) else { continue };
            if let std::collections::hash_map::Entry::Vacant(entry) = projects.entry(spec.project_id) {
                entry.insert(self.store.projects.load(spec.project_id.0).await.map_err(CommandError::from)?.into_inner());
            }
            let project = &projects[&spec.project_id];
            let tier = project.tier_of(&spec.target).map(|t| t.name().to_string());
            for target_id in project.notifications.iter().filter(|(_, t)| t.events.contains(&kind)).map(|(id, _)| id) {
                let body = json!({
                    "kind": kind.as_str(),
                    "project": { "id": spec.project_id.0, "name": project.name.as_ref().map(|n| n.to_string()), "repository": project.repository.as_ref().map(|r| r.to_string()) },
                    "environment": {
                        "id": aggregate_id, "kind": spec.target.kind(), "branch": spec.target.label(),
                        "tier": tier, "entrypoint": spec.entrypoint.as_str(),
                        "url": format!("{}/environments/{aggregate_id}/logs/build", self.public_url.trim_end_matches('/')),
                    },
                    "deployment": {
                        "id": deployment.id.0, "commit": deployment.commit.as_str(), "status": deployment.status.as_str(),
                        "failure": deployment.failure,
                        "testsPassed": deployment.tests.iter().filter(|t| t.outcome == TestOutcome::Passed).count(),
                        "testsFailed": deployment.tests.iter().filter(|t| t.outcome == TestOutcome::Failed).count(),
                        "promotedFrom": deployment.promoted_from.map(|d| d.0),
                        "rolledBackTo": deployment.rolled_back_to.map(|d| d.0),
                    },
                    "by": actor,
                    "at": event.at(),
                });
                let delivery = Uuid::new_v5(event_id, target_id.as_bytes());
                let inserted = sqlx::query(
                    "INSERT INTO notification_deliveries (delivery_id, project_id, target_id, kind, payload)
                     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (delivery_id) DO NOTHING",
                )
                .bind(delivery)
                .bind(spec.project_id.0)
                .bind(target_id)
                .bind(kind.as_str())
                .bind(&body)
                .execute(&mut *tx)
                .await?;
                added += inserted.rows_affected() as usize;
            }
        }
        if let Some((last, ..)) = rows.last() {
            sqlx::query("UPDATE notification_cursor SET position = $1 WHERE name = 'notifier'").bind(last).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok((rows.len(), added))
    }

    /// Claims and sends every due delivery, at most 8 at once; how many were delivered.
    async fn send_due(&self) -> anyhow::Result<usize> {
        if self.key.is_none() && self.mailer.is_none() {
            return Ok(0);
        }
        type Row = (Uuid, Uuid, Uuid, String, Value, i32);
        let due: Vec<Row> = sqlx::query_as(
            "UPDATE notification_deliveries SET next_attempt_at = now() + interval '1 minute'
             WHERE delivery_id IN (SELECT delivery_id FROM notification_deliveries
                                   WHERE state = 'pending' AND next_attempt_at <= now()
                                   ORDER BY next_attempt_at LIMIT 50 FOR UPDATE SKIP LOCKED)
             RETURNING delivery_id, project_id, target_id, kind, payload, attempts",
        )
        .fetch_all(&self.store.pool)
        .await?;
        let mut projects: HashMap<Uuid, Project> = HashMap::new();
        for (_, project, ..) in &due {
            if let std::collections::hash_map::Entry::Vacant(entry) = projects.entry(*project) {
                entry.insert(self.store.projects.load(*project).await.map_err(CommandError::from)?.into_inner());
            }
        }
        let sends = due.into_iter().map(|(delivery, project, target, kind, payload, attempts)| {
            let target_state = projects.get(&project).and_then(|p| p.notifications.get(&target)).cloned();
            async move {
                let outcome = match target_state {
                    None => Err((false, "the target was removed".to_string(), None)),
                    Some(state) => match state.url.strip_prefix("mailto:") {
                        Some(to) => match &self.mailer {
                            None => Err((true, "no SMTP server is configured (UNDERSTUDY_SMTP_URL)".to_string(), None)),
                            Some(mailer) => mailer.send(to, delivery, &kind, &payload).await.map_err(|(retry, why)| (retry, why, None)),
                        },
                        None => match self.key.as_ref().map(|key| key.open(ProjectId(project), &secret_name(target), &state.secret)) {
                            None => Err((true, "this node has no secret key to sign with (UNDERSTUDY_SECRET_KEY)".to_string(), None)),
                            Some(Err(error)) => Err((true, format!("cannot open the signing secret: {error}"), None)),
                            Some(Ok(secret)) => self.post(&state.url, &secret, delivery, &kind, &payload).await,
                        },
                    },
                };
                (delivery, attempts, outcome)
            }
        });
        let mut delivered = 0;
        for (delivery, attempts, outcome) in futures::future::join_all(sends).await {
            let attempts = attempts + 1;
            match outcome {
                Ok(()) => {
                    delivered += 1;
                    sqlx::query(
                        "UPDATE notification_deliveries SET state = 'delivered', attempts = $2, delivered_at = now(), last_error = NULL
                         WHERE delivery_id = $1",
                    )
                    .bind(delivery)
                    .bind(attempts)
                    .execute(&self.store.pool)
                    .await?;
                }
                Err((retry, error, after)) => {
                    let give_up = !retry || attempts >= MAX_ATTEMPTS;
                    let backoff = after
                        .unwrap_or_else(|| self.retry_base * 2u32.pow((attempts - 1).clamp(0, 12) as u32))
                        .min(Duration::from_secs(3600));
                    sqlx::query(
                        "UPDATE notification_deliveries SET attempts = $2, last_error = $3,
                             state = CASE WHEN $4 THEN 'failed' ELSE 'pending' END,
                             next_attempt_at = now() + make_interval(secs => $5)
                         WHERE delivery_id = $1",
                    )
                    .bind(delivery)
                    .bind(attempts)
                    .bind(&error)
                    .bind(give_up)
                    .bind(backoff.as_secs_f64())
                    .execute(&self.store.pool)
                    .await?;
                }
            }
        }
        Ok(delivered)
    }

    /// One signed POST: `Err((worth retrying, why, Retry-After))` unless the answer is 2xx.
    async fn post(
        &self,
        url: &str,
        secret: &str,
        delivery: Uuid,
        kind: &str,
        payload: &Value,
    ) -> Result<(), (bool, String, Option<Duration>)> {
        let body = serde_json::to_vec(payload).unwrap_or_default();
        let response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .header("x-understudy-event", kind)
            .header("x-understudy-delivery", delivery.to_string())
            .header("x-understudy-signature-256", signature(secret, &body))
            .body(body)
            .send()
            .await
            .map_err(|e| (true, format!("{url}: {e}"), None))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let after = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Duration::from_secs);
        Err((true, format!("{url} answered {status}"), after))
    }
}

/// What the sealed signing secret of a target is bound to.
pub fn secret_name(target: Uuid) -> String {
    format!("notification:{target}")
}

/// `sha256=` and the hex HMAC-SHA256 of `body` under `secret`, as receivers check it.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// The notification an event is, if any, with the deployment it is about.
fn news(event: &EnvironmentEvent, environment: &Environment) -> Option<(NotificationKind, Deployment)> {
    use EnvironmentEvent as E;
    let (kind, id) = match event {
        // Terminating an environment fails its build in flight: no news for anyone.
        E::DeploymentFailed { .. } if environment.terminated => return None,
        E::DeploymentFailed { deployment_id, .. } => (NotificationKind::Failed, *deployment_id),
        E::DeploymentPromoted { deployment_id, .. } => (NotificationKind::Promoted, *deployment_id),
        E::RolledBack { deployment_id, .. } => (NotificationKind::RolledBack, *deployment_id),
        E::TestsCompleted { deployment_id, failed, .. } => {
            if *failed > 0 {
                (NotificationKind::Failed, *deployment_id)
            } else {
                // Passed: news only if the deployment before it (that got as far) failed.
                let index = environment.deployments.iter().position(|d| d.id == *deployment_id)?;
                let before =
                    environment.deployments[..index].iter().rev().find(|d| d.status == DeploymentStatus::Failed || d.tests_completed)?;
                let failed_before =
                    before.status == DeploymentStatus::Failed || before.tests.iter().any(|t| t.outcome == TestOutcome::Failed);
                if !failed_before {
                    return None;
                }
                (NotificationKind::Recovered, *deployment_id)
            }
        }
        _ => return None,
    };
    Some((kind, environment.deployment(id)?.clone()))
}
