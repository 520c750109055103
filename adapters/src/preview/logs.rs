//! Deployment logs: every line a build, an app or a test prints, redacted, numbered and stored
//! in Postgres (`deployment_logs`), then announced on NATS so live readers re-read.
//!
//! Why Postgres and not files: logs then share the event log's durability, backups and access
//! control, every API process can serve them without a shared disk, and paging by `nano` is an
//! index range scan. Preview logs are small (kilobytes to a few megabytes per deployment).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::nats::Topology;

/// The longest line kept; the rest is cut with a marker, so one runaway line cannot bloat the log.
const MAX_LINE: usize = 8 * 1024;
/// The most lines one INSERT carries.
const BATCH: usize = 500;

/// Replaces every secret value in `line` with `[redacted]`. Longest secrets first, so a secret
/// that contains another is hidden whole.
#[derive(Clone, Default)]
pub struct Redactor {
    secrets: Arc<Vec<String>>,
}

impl Redactor {
    pub fn new(secrets: impl IntoIterator<Item = String>) -> Self {
        // Very short values (a "1", a "true") would shred every line; they are not secrets anyone
        // can guess from output anyway, so only values of 4+ characters are redacted.
        let mut secrets: Vec<String> = secrets.into_iter().filter(|s| s.len() >= 4).collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        secrets.dedup();
        Self { secrets: Arc::new(secrets) }
    }

    pub fn redact(&self, line: &str) -> String {
        let mut out = line.to_string();
        for secret in self.secrets.iter() {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "[redacted]");
            }
        }
        out
    }
}

struct Line {
    deployment: Uuid,
    stream: String,
    text: String,
}

/// Writes log lines for the deployments of one worker. Cloning is cheap; lines are queued and
/// inserted in order by one task, which also numbers them.
#[derive(Clone)]
pub struct LogSink {
    tx: mpsc::UnboundedSender<Line>,
}

impl LogSink {
    /// Starts the writer task. It ends when every sink is dropped, after writing what is queued.
    pub fn spawn(pool: PgPool, nats: async_nats::Client, topology: Topology) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(write_loop(pool, nats, topology, rx));
        Self { tx }
    }

    /// A writer for one stream of one deployment.
    pub fn stream(&self, deployment: Uuid, stream: impl Into<String>, redactor: Redactor) -> LogStream {
        LogStream { sink: self.clone(), deployment, stream: stream.into(), redactor }
    }
}

/// One deployment's stream (`build`, `run`, `test:<name>`).
#[derive(Clone)]
pub struct LogStream {
    sink: LogSink,
    deployment: Uuid,
    stream: String,
    redactor: Redactor,
}

impl LogStream {
    /// A stream whose lines go nowhere (for callers without a deployment, and tests).
    pub fn discard() -> Self {
        let (tx, _) = mpsc::unbounded_channel();
        Self { sink: LogSink { tx }, deployment: Uuid::nil(), stream: String::new(), redactor: Redactor::default() }
    }

    pub fn line(&self, text: impl AsRef<str>) {
        for part in text.as_ref().split('\n') {
            let part = part.strip_suffix('\r').unwrap_or(part);
            let mut clean = self.redactor.redact(part);
            if clean.len() > MAX_LINE {
                let mut cut = MAX_LINE;
                while !clean.is_char_boundary(cut) {
                    cut -= 1;
                }
                clean.truncate(cut);
                clean.push_str(" …[line cut]");
            }
            // A send fails only when the writer task is gone (shutdown): nothing to do then.
            let _ = self.sink.tx.send(Line { deployment: self.deployment, stream: self.stream.clone(), text: clean });
        }
    }

    /// Copies `reader` into this stream line by line until it ends.
    pub async fn pipe(&self, reader: impl AsyncRead + Unpin) {
        let mut lines = BufReader::new(reader);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match lines.read_until(b'\n', &mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buffer);
                    self.line(text.trim_end_matches(['\n', '\r']));
                }
            }
        }
    }
}

fn now_nanos() -> i64 {
    chrono::Utc::now().timestamp_nanos_opt().unwrap_or(i64::MAX)
}

async fn write_loop(pool: PgPool, nats: async_nats::Client, topology: Topology, mut rx: mpsc::UnboundedReceiver<Line>) {
    // The last number given per (deployment, stream), so numbers strictly increase even when the
    // clock stands still or steps back.
    let mut last: HashMap<(Uuid, String), i64> = HashMap::new();
    let mut batch = Vec::with_capacity(BATCH);
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let (mut ids, mut streams, mut nanos, mut texts) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for line in batch.drain(..) {
            let key = (line.deployment, line.stream.clone());
            let previous = last.get(&key).copied().unwrap_or(0);
            let nano = now_nanos().max(previous + 1);
            last.insert(key, nano);
            ids.push(line.deployment);
            streams.push(line.stream);
            nanos.push(nano);
            texts.push(line.text);
        }
        let mut delay = Duration::from_millis(100);
        loop {
            let written = sqlx::query(
                "INSERT INTO deployment_logs (deployment_id, stream, nano, line)
                 SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[])
                 ON CONFLICT DO NOTHING",
            )
            .bind(&ids)
            .bind(&streams)
            .bind(&nanos)
            .bind(&texts)
            .execute(&pool)
            .await;
            match written {
                Ok(_) => break,
                Err(error) => {
                    tracing::warn!(%error, "writing deployment logs failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
        let mut announced: Vec<Uuid> = ids.clone();
        announced.dedup();
        for deployment in announced {
            // A wake-up for live readers, never the data: they re-read from their last nano.
            let _ = nats.publish(topology.log_subject(deployment), bytes::Bytes::new()).await;
        }
    }
}

/// A page of log lines, oldest first.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogLine {
    pub stream: String,
    pub nano: i64,
    pub line: String,
}

/// Lines of `deployment` after `from` (unix nanoseconds), in `stream` (a prefix match when it
/// ends with `*`, e.g. `test:*`), at most `limit`.
pub async fn read_after(pool: &PgPool, deployment: Uuid, stream: &str, from: i64, limit: i64) -> sqlx::Result<Vec<LogLine>> {
    let rows: Vec<(String, i64, String)> = if let Some(prefix) = stream.strip_suffix('*') {
        sqlx::query_as(
            "SELECT stream, nano, line FROM deployment_logs
             WHERE deployment_id = $1 AND starts_with(stream, $2) AND nano > $3 ORDER BY nano, stream LIMIT $4",
        )
        .bind(deployment)
        .bind(prefix)
        .bind(from)
        .bind(limit)
        .fetch_all(pool)
        .await?
    } else {
        sqlx::query_as(
            "SELECT stream, nano, line FROM deployment_logs
             WHERE deployment_id = $1 AND stream = $2 AND nano > $3 ORDER BY nano LIMIT $4",
        )
        .bind(deployment)
        .bind(stream)
        .bind(from)
        .bind(limit)
        .fetch_all(pool)
        .await?
    };
    Ok(rows.into_iter().map(|(stream, nano, line)| LogLine { stream, nano, line }).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_every_secret_longest_first() {
        let redactor = Redactor::new(["hunter2-long".to_string(), "hunter2".to_string(), "ab".to_string()]);
        assert_eq!(redactor.redact("pw=hunter2-long and hunter2, ab"), "pw=[redacted] and [redacted], ab");
        assert_eq!(Redactor::default().redact("nothing secret"), "nothing secret");
    }
}
