//! The projector framework.
//!
//! A [`Projector`] is a durable JetStream pull consumer over every event subject. For each batch
//! it opens one Postgres transaction, locks its checkpoint row, applies the events above the
//! checkpoint in position order (filling any hole from the Postgres log first: NATS is the fast
//! path, Postgres the truth), writes the new checkpoint, commits, and only then acks. A crash at
//! any point leaves either the old checkpoint and old rows, or both new: redelivered events are
//! skipped by position, so each event is applied exactly once.
//!
//! JetStream is read by a task of its own; the projector's loop also looks at the log's head
//! every [`WATCH`] and reads the log itself when JetStream has not delivered what was numbered
//! by its last look, so nothing NATS does (an outage, a leader election, a hanging request)
//! holds the read models back for longer than that.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_trait::async_trait;
use futures::StreamExt;
use sqlx::{PgConnection, PgPool};
use thiserror::Error;
use tokio_util::sync::CancellationToken;
use understudy_adapters::global_log;
use understudy_adapters::nats::Topology;
use understudy_adapters::relay::POSITION_HEADER;
use understudy_adapters::LoggedEvent;

use crate::AnyEvent;

#[derive(Debug, Error)]
pub enum ProjectionError {
    #[error(
        "cannot decode the event at position {position} ({aggregate_type} {event_type} v{schema_version}): {reason}. \
         The projector stops here rather than skip it; upgrade Understudy or add an upcaster"
    )]
    Undecodable { position: i64, aggregate_type: String, event_type: String, schema_version: i32, reason: String },
    #[error("the message at stream sequence {stream_sequence} is not an Understudy event: {reason}")]
    BadMessage { stream_sequence: u64, reason: String },
    #[error("the global log has no event at position {0}, which it must have: was the log edited?")]
    MissingPosition(i64),
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

impl ProjectionError {
    /// The event at `event.position` cannot be understood by this build, for `reason`.
    pub fn undecodable(event: &LoggedEvent, reason: impl Into<String>) -> Self {
        Self::Undecodable {
            position: event.position,
            aggregate_type: event.aggregate_type.clone(),
            event_type: event.event_type.clone(),
            schema_version: event.schema_version,
            reason: reason.into(),
        }
    }
}

/// The physical names of a projection's tables: the live ones, or the ones a replay builds beside them.
#[derive(Debug, Clone)]
pub struct Tables {
    suffix: &'static str,
}

impl Tables {
    pub const LIVE: Tables = Tables { suffix: "" };
    pub const REBUILD: Tables = Tables { suffix: "__rebuild" };
    pub const VERIFY: Tables = Tables { suffix: "__verify" };

    pub fn name(&self, base: &str) -> String {
        format!("{base}{}", self.suffix)
    }
}

/// A row of a read model changed: published on `{prefix}.changes.{read_model}.{key}` after commit.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub read_model: String,
    pub key: String,
    pub id: uuid::Uuid,
    pub position: i64,
}

/// A read model built from the global log.
#[async_trait]
pub trait Projection: Send + Sync + 'static {
    /// Its name: its checkpoint row, its consumer, `understudy replay --projection NAME`.
    fn name(&self) -> &'static str;
    /// The tables it owns, rebuilt and swapped together by a replay.
    fn tables(&self) -> &'static [&'static str];
    /// The columns of `table` that this projection alone writes, compared by `understudy verify`
    /// (a reactor may keep its own bookkeeping in other columns).
    fn compared_columns(&self, _table: &str) -> &'static str {
        "*"
    }
    /// How long its projector's batch waits for more events ([`Projector::linger`]). What
    /// someone watches live keeps [`LINGER`]; a read model nobody awaits event by event waits
    /// [`BACKGROUND_LINGER`] and so commits a fraction of the transactions.
    fn linger(&self) -> Duration {
        LINGER
    }
    /// Applies one event inside the caller's transaction; returns the rows it changed.
    async fn apply(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        event: &LoggedEvent,
        decoded: &AnyEvent,
    ) -> Result<Vec<Change>, ProjectionError>;

    /// Applies consecutive events inside the caller's transaction. One by one unless the
    /// projection folds a run in memory and writes each row once (a replay's batches are
    /// thousands of events). An event it cannot apply stops the run there, with those before it
    /// applied.
    async fn apply_run(
        &self,
        conn: &mut PgConnection,
        tables: &Tables,
        run: &[(&LoggedEvent, AnyEvent)],
    ) -> Result<RunApplied, ProjectionError> {
        let mut done = RunApplied::default();
        for (event, decoded) in run {
            match self.apply(conn, tables, event, decoded).await {
                Ok(changed) => done.changes.extend(changed),
                Err(stop @ ProjectionError::Undecodable { .. }) => {
                    done.stopped = Some(stop);
                    return Ok(done);
                }
                Err(error) => return Err(error),
            }
            done.applied += 1;
        }
        Ok(done)
    }
}

/// What [`Projection::apply_run`] did: the first `applied` events of the run, and the event it
/// stopped at, if any.
#[derive(Debug, Default)]
pub struct RunApplied {
    pub changes: Vec<Change>,
    pub applied: usize,
    pub stopped: Option<ProjectionError>,
}

impl RunApplied {
    /// A run of one event as [`Projection::apply`] answers it: its changes, or why it stopped.
    pub fn into_result(self) -> Result<Vec<Change>, ProjectionError> {
        self.stopped.map_or(Ok(self.changes), Err)
    }
}

/// How far a batch got: the new checkpoint, and the event it stopped at, if any.
pub(crate) struct Progress {
    pub checkpoint: i64,
    pub stopped: Option<ProjectionError>,
}

/// Applies `events` (in position order) above `checkpoint`. An event that cannot be decoded stops
/// the batch there, with everything before it applied: the caller commits that, then stops.
pub(crate) async fn apply_all(
    projection: &dyn Projection,
    conn: &mut PgConnection,
    tables: &Tables,
    mut checkpoint: i64,
    events: &[LoggedEvent],
    changes: &mut Vec<Change>,
) -> Result<Progress, ProjectionError> {
    // Decode the contiguous run above the checkpoint first; a hole is an error, an event this
    // build cannot decode ends the run.
    let mut run = Vec::with_capacity(events.len());
    let mut undecodable = None;
    let mut expected = checkpoint + 1;
    for event in events {
        if event.position < expected {
            continue;
        }
        if event.position != expected {
            return Err(ProjectionError::MissingPosition(expected));
        }
        match AnyEvent::decode(event) {
            Ok(decoded) => run.push((event, decoded)),
            Err(stop @ ProjectionError::Undecodable { .. }) => {
                undecodable = Some(stop);
                break;
            }
            Err(error) => return Err(error),
        }
        expected += 1;
    }
    // Each live event's trace shows the run that applied it: a `projector.apply` span per event,
    // open while the run is applied (a projection may fold the run and write each row once). A
    // rebuild's millions of events are no one's request, and get none.
    let spans: Vec<tracing::Span> = match tables.suffix {
        "" => run
            .iter()
            .map(|(event, _)| understudy_adapters::telemetry::span_from("projector.apply", event.traceparent.as_deref()))
            .collect(),
        _ => Vec::new(),
    };
    let done = projection.apply_run(conn, tables, &run).await?;
    drop(spans);
    changes.extend(done.changes);
    if done.applied > 0 {
        checkpoint = run[done.applied - 1].0.position;
    }
    if let Some(stop) = done.stopped.or(undecodable) {
        return Ok(Progress { checkpoint, stopped: Some(stop) });
    }
    Ok(Progress { checkpoint, stopped: None })
}

pub async fn checkpoint(executor: impl sqlx::PgExecutor<'_>, projection: &str) -> sqlx::Result<i64> {
    Ok(sqlx::query_scalar("SELECT position FROM projector_checkpoints WHERE projection = $1")
        .bind(projection)
        .fetch_optional(executor)
        .await?
        .unwrap_or(0))
}

/// Locks the checkpoint row for this transaction (creating it at 0 the first time): one
/// statement once the row exists, as it does after the first batch.
pub(crate) async fn lock_checkpoint(conn: &mut PgConnection, projection: &str) -> sqlx::Result<i64> {
    const LOCK: &str = "SELECT position FROM projector_checkpoints WHERE projection = $1 FOR UPDATE";
    if let Some(position) = sqlx::query_scalar(LOCK).bind(projection).fetch_optional(&mut *conn).await? {
        return Ok(position);
    }
    sqlx::query("INSERT INTO projector_checkpoints (projection) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(projection)
        .execute(&mut *conn)
        .await?;
    sqlx::query_scalar(LOCK).bind(projection).fetch_one(&mut *conn).await
}

pub(crate) async fn store_checkpoint(conn: &mut PgConnection, projection: &str, position: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE projector_checkpoints SET position = $2, updated_at = now() WHERE projection = $1")
        .bind(projection)
        .bind(position)
        .execute(conn)
        .await?;
    Ok(())
}

/// How far behind the head of the log a projection is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Lag {
    pub projection: String,
    pub checkpoint: i64,
    pub head: i64,
    pub lag: i64,
}

pub async fn lag(pool: &PgPool) -> sqlx::Result<Vec<Lag>> {
    let head = global_log::head(pool).await?;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT projection, position FROM projector_checkpoints ORDER BY projection").fetch_all(pool).await?;
    Ok(rows.into_iter().map(|(projection, checkpoint)| Lag { projection, checkpoint, head, lag: (head - checkpoint).max(0) }).collect())
}

/// The projector's default [`Projector::linger`]. 1 ms: at 500 events/s, 3 ms cost every event
/// about 3.5 ms more at p50 for no CPU the benches could see (docs/benchmarks.md, 2026-12-04).
pub const LINGER: Duration = Duration::from_millis(1);

/// The linger of projections no subscriber waits on (history, usage, the GitHub outbox, whose
/// writer polls every 200 ms and debounces a second). At 500 events/s each of their batches
/// holds about 25 events instead of a handful, and their BEGIN, checkpoint and COMMIT no longer
/// compete for the CPU with the projection subscribers wait on (docs/benchmarks.md, 2026-12-05).
pub const BACKGROUND_LINGER: Duration = Duration::from_millis(50);

/// Runs one projection as a durable JetStream consumer.
pub struct Projector {
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub topology: Topology,
    pub projection: Arc<dyn Projection>,
    /// Events per transaction.
    pub batch: usize,
    /// How long a batch that is not full waits for more events before it is applied. Each
    /// transaction costs its BEGIN, checkpoint update and COMMIT whatever its
    /// size: at hundreds of events a second, a short wait folds several events into one
    /// transaction.
    pub linger: Duration,
    /// The checkpoint this process last committed or read under the row's lock; -1 until then.
    /// A batch that finds it unchanged locks and moves the row in one statement.
    known: std::sync::atomic::AtomicI64,
}

impl Projector {
    pub fn new(pool: PgPool, nats: async_nats::Client, topology: Topology, projection: Arc<dyn Projection>) -> Self {
        let linger = projection.linger();
        Self { pool, nats, topology, projection, batch: 500, linger, known: std::sync::atomic::AtomicI64::new(-1) }
    }

    /// The durable consumer this projection reads JetStream through.
    async fn consumer(
        nats: &async_nats::Client,
        topology: &Topology,
        projection: &str,
    ) -> anyhow::Result<consumer::Consumer<consumer::pull::Config>> {
        let js = jetstream::new(nats.clone());
        let stream = understudy_adapters::nats::ensure_stream(&js, topology).await?;
        let name = topology.consumer_name(projection);
        stream
            .get_or_create_consumer(
                &name,
                consumer::pull::Config {
                    durable_name: Some(name.clone()),
                    ack_policy: consumer::AckPolicy::Explicit,
                    deliver_policy: consumer::DeliverPolicy::All,
                    filter_subject: topology.all_events(),
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 20_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| anyhow::anyhow!("creating JetStream consumer {name}: {e}"))
    }

    /// Projects until cancelled. Returns an error only for what must stop the projector (an
    /// event it cannot decode); transport and database errors are retried with backoff.
    ///
    /// Two sources feed one loop, which applies one batch at a time: what JetStream delivers
    /// (read by a task of its own, which reconnects and recreates its consumer as often as it
    /// must), and the Postgres log, read when an event numbered a [`WATCH`] ago is still not
    /// applied, or one numbered since is not and JetStream has been silent. JetStream away, a
    /// stream leader being elected, a request hanging to its timeout: none of it holds the
    /// loop, so the read models keep up from the log within about [`WATCH`] whatever NATS does.
    pub async fn run(self, cancel: CancellationToken) -> anyhow::Result<()> {
        let name = self.projection.name();
        // One process at a time consumes each projection; others wait as standbys and take over
        // the moment its session ends (a crash closes it). Correctness does not rest on this —
        // the checkpoint row lock makes two consumers safe — but two would share the messages
        // and each fill the other's share from the log: twice the work for the same result.
        let _leadership = loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                lead = self.lead() => match lead {
                    Ok((connection, took_over)) => {
                        if took_over {
                            self.resync().await;
                        }
                        break connection;
                    }
                    Err(error) => {
                        tracing::warn!(projection = name, error = format!("{error:#}"), "cannot take the projection's lead; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return Ok(()),
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                },
            }
        };
        tracing::info!(projection = name, "projecting");
        // The feeding task ends with this loop, however it ends (a projector task aborted too).
        let feeding = cancel.child_token();
        let _stop_feeding = feeding.clone().drop_guard();
        // Two chunks in hand at most: beyond that JetStream holds them, up to `max_ack_pending`.
        let (chunks, mut delivered) = tokio::sync::mpsc::channel(2);
        let feeder =
            Feeder { nats: self.nats.clone(), topology: self.topology.clone(), projection: name, batch: self.batch, linger: self.linger };
        tokio::spawn(feeder.run(chunks, feeding.clone()));
        let mut numbered = hear_numbered(self.nats.clone(), self.topology.numbered_subject(), feeding);
        let mut hints = Hints::new(self.linger);
        let mut log = LogWatch::default();
        let mut failures = 0u32;
        loop {
            let step = tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                Some(chunk) = delivered.recv() => {
                    log.active = tokio::time::Instant::now();
                    log.delivered = true;
                    self.apply_delivered(chunk).await
                }
                Ok(()) = numbered.changed() => {
                    hints.heard(*numbered.borrow_and_update());
                    Ok(())
                }
                Some(head) = hints.due() => self.check_hint(head).await.map(|lagging| hints.lagging = lagging),
                _ = tokio::time::sleep_until(log.due()) => self.watch_log(&mut log).await,
            };
            match step {
                Ok(()) => failures = 0,
                Err(error) if is_fatal(&error) => {
                    tracing::error!(projection = name, error = format!("{error:#}"), "projector stopped");
                    return Err(error);
                }
                Err(error) => {
                    failures += 1;
                    let backoff = backoff(failures);
                    tracing::warn!(projection = name, error = format!("{error:#}"), ?backoff, "projecting failed; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                }
            }
        }
    }

    /// Waits until this process leads the projection: a session advisory lock on a connection
    /// of its own, held for as long as the returned connection lives. True if it had to wait:
    /// it takes over from a leader that just stopped.
    async fn lead(&self) -> anyhow::Result<(PgConnection, bool)> {
        use sqlx::Connection;
        let mut connection = PgConnection::connect_with(&self.pool.connect_options()).await?;
        let key = format!("understudy projector {}", self.projection.name());
        let free: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))").bind(&key).fetch_one(&mut connection).await?;
        if !free {
            sqlx::query("SELECT pg_advisory_lock(hashtext($1))").bind(&key).execute(&mut connection).await?;
        }
        Ok((connection, !free))
    }

    /// Tells every reader to re-read what changed lately. A leader killed between committing a
    /// batch and announcing its changes leaves readers with nothing to wake them; the standby
    /// that takes over says so at once, not when the killed process is started again.
    async fn resync(&self) {
        if let Err(error) = self.nats.publish(self.topology.resync_subject(), Default::default()).await {
            tracing::debug!(error = %error, "the resync notice was not sent; readers re-read on their next one");
        }
    }

    /// The log was said to be numbered up to `head` a grace ago ([`HINT_GRACE`]): reads the log
    /// if JetStream has not brought this projection that far meanwhile. Whether it had not.
    async fn check_hint(&self, head: i64) -> anyhow::Result<bool> {
        if self.known.load(std::sync::atomic::Ordering::Relaxed) >= head {
            return Ok(false);
        }
        let applied = self.catch_up_from_log().await?;
        if applied > 0 {
            tracing::debug!(projection = self.projection.name(), applied, "JetStream is behind the numbered log; applied from the log");
        }
        Ok(true)
    }

    /// Applies a chunk JetStream delivered, then acks it.
    async fn apply_delivered(&self, chunk: Vec<jetstream::Message>) -> anyhow::Result<()> {
        let mut events = Vec::with_capacity(chunk.len());
        for message in &chunk {
            events.push(decode_message(message)?);
        }
        // All applied already (read from the log while JetStream was behind, or redelivered):
        // nothing to lock or write, only to ack.
        let known = self.known.load(std::sync::atomic::Ordering::Relaxed);
        if known < 0 || events.iter().any(|event| event.position > known) {
            self.apply_batch(events).await?;
        }
        for message in &chunk {
            // A lost ack only means a redelivery, which the checkpoint skips.
            if let Err(error) = message.ack().await {
                tracing::debug!(error = %error, "ack failed; the event will be redelivered and skipped");
            }
        }
        Ok(())
    }

    /// One look at the log. Reads it if an event numbered at the last look is still not applied,
    /// or one numbered since is not while JetStream delivered nothing since the last look (a
    /// silent stream under load is a stalled one), or at the first look (the stream may be
    /// younger than the log), or if the checkpoint was moved back behind this process's back.
    async fn watch_log(&self, log: &mut LogWatch) -> anyhow::Result<()> {
        let now = tokio::time::Instant::now();
        log.last = now;
        let (head, checkpoint): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT position FROM log_cursors WHERE name = 'sequenced'),
                    COALESCE((SELECT position FROM projector_checkpoints WHERE projection = $1), -1)",
        )
        .bind(self.projection.name())
        .fetch_one(&self.pool)
        .await?;
        let known = self.known.load(std::sync::atomic::Ordering::Relaxed);
        let silent = !std::mem::take(&mut log.delivered);
        log.lagging = false;
        if log.head.is_none_or(|numbered| numbered > checkpoint) || (silent && head > checkpoint) || checkpoint < known {
            let applied = self.catch_up_from_log().await?;
            // Found what the stream had not delivered: look again soon, while that lasts.
            log.lagging = applied > 0 && log.head.is_some();
            if applied > 0 {
                log.active = now;
                if log.head.is_some() {
                    tracing::debug!(projection = self.projection.name(), applied, "JetStream is behind; applied from the log");
                }
            }
        }
        if log.head != Some(head) {
            log.active = now;
        }
        log.head = Some(head);
        Ok(())
    }

    /// Applies events that arrived over NATS, in one transaction, filling holes from the log.
    pub async fn apply_batch(&self, mut events: Vec<LoggedEvent>) -> anyhow::Result<()> {
        events.sort_by_key(|e| e.position);
        let name = self.projection.name();
        let mut tx = self.pool.begin().await?;
        let last = events.last().map_or(0, |e| e.position);
        let (start, moved) = self.take_checkpoint(&mut tx, last).await?;
        // One contiguous run above the checkpoint, its holes filled from the log, applied in one
        // call: a projection that folds a run writes each row once per batch, not once per event.
        let mut run = Vec::with_capacity(events.len());
        let mut next = start + 1;
        for event in events {
            if event.position < next {
                continue;
            }
            if event.position > next {
                run.extend(global_log::read_range(&mut *tx, next - 1, event.position - 1, i64::MAX).await?);
            }
            next = event.position + 1;
            run.push(event);
        }
        let mut changes = Vec::new();
        let progress = apply_all(self.projection.as_ref(), &mut tx, &Tables::LIVE, start, &run, &mut changes).await?;
        let (at, stopped) = (progress.checkpoint, progress.stopped);
        // Moved ahead to `last` but stopped short of it: set it back to what was applied.
        if (moved && at != last) || (!moved && at > start) {
            store_checkpoint(&mut tx, name, at).await?;
        }
        tx.commit().await?;
        self.known.store(at, std::sync::atomic::Ordering::Relaxed);
        self.announce(changes).await;
        stopped.map_or(Ok(()), |stop| Err(stop.into()))
    }

    /// Takes the checkpoint row for a batch that ends at `last`, returning where the batch starts
    /// and whether the row was already moved to `last`. While the row still holds what this
    /// process last knew, one statement locks it, checks it and moves it (the batch's run from
    /// there to `last` is contiguous, or fails and rolls back). Otherwise (another process moved
    /// it, a replay swapped the tables, a redelivery) it is locked and read as it is.
    async fn take_checkpoint(&self, conn: &mut PgConnection, last: i64) -> sqlx::Result<(i64, bool)> {
        let name = self.projection.name();
        let known = self.known.load(std::sync::atomic::Ordering::Relaxed);
        if known >= 0 && last > known {
            let moved =
                sqlx::query("UPDATE projector_checkpoints SET position = $3, updated_at = now() WHERE projection = $1 AND position = $2")
                    .bind(name)
                    .bind(known)
                    .bind(last)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                    == 1;
            if moved {
                return Ok((known, true));
            }
        }
        let start = lock_checkpoint(conn, name).await?;
        Ok((start, false))
    }

    /// Applies whatever the Postgres log has beyond the checkpoint; returns how many events.
    pub async fn catch_up_from_log(&self) -> anyhow::Result<usize> {
        let name = self.projection.name();
        let mut applied = 0;
        loop {
            let mut tx = self.pool.begin().await?;
            let start = lock_checkpoint(&mut tx, name).await?;
            let events = global_log::read_range(&mut *tx, start, i64::MAX, self.batch as i64).await?;
            if events.is_empty() {
                // End the transaction now: a dropped one holds the checkpoint lock until its
                // connection is next used.
                tx.rollback().await?;
                self.known.store(start, std::sync::atomic::Ordering::Relaxed);
                return Ok(applied);
            }
            applied += events.len();
            let mut changes = Vec::new();
            let progress = apply_all(self.projection.as_ref(), &mut tx, &Tables::LIVE, start, &events, &mut changes).await?;
            store_checkpoint(&mut tx, name, progress.checkpoint).await?;
            tx.commit().await?;
            self.known.store(progress.checkpoint, std::sync::atomic::Ordering::Relaxed);
            self.announce(changes).await;
            if let Some(stop) = progress.stopped {
                return Err(stop.into());
            }
        }
    }

    /// Publishes `changes` in position order: a subscriber that has a change's notice has had
    /// those of every earlier change this process announced (a run lists its rows in the order it
    /// first touched them, each at its newest position).
    async fn announce(&self, mut changes: Vec<Change>) {
        // Not connected: publishing would queue in the client and, once its buffer is full,
        // block projecting until NATS is back. Readers re-read on the resync this process sends
        // when it reconnects (`Runtime::spawn_projectors`).
        if self.nats.connection_state() != async_nats::connection::State::Connected {
            if !changes.is_empty() {
                tracing::debug!(changes = changes.len(), "NATS is away; change notices skipped until the resync");
            }
            return;
        }
        changes.sort_by_key(|change| change.position);
        for change in changes {
            let subject = self.topology.changes_subject(&change.read_model, &change.key);
            match serde_json::to_vec(&change) {
                Ok(payload) => {
                    if let Err(error) = self.nats.publish(subject, payload.into()).await {
                        tracing::debug!(error = %error, "change notice not sent; live subscribers catch up on their next query");
                    }
                }
                Err(error) => tracing::warn!(error = %error, "change notice not encodable"),
            }
        }
    }
}

/// How long after an event is numbered a projector that has not had it from JetStream reads it
/// from the Postgres log: its look at the log's head, while events flow. One indexed read of one
/// row per projection per look; a healthy stream delivers well within it (p99 tens of ms at
/// 500 events/s, docs/benchmarks.md), so the log is read only when the stream stalls.
pub const WATCH: Duration = Duration::from_millis(200);

/// The look at the log's head while the last look found events JetStream had not delivered.
pub const WATCH_LAGGING: Duration = Duration::from_millis(50);

/// The look at the log's head when nothing has moved for [`BUSY`].
pub const WATCH_IDLE: Duration = Duration::from_secs(1);

/// How long after the last event a projector still looks at the log every [`WATCH`].
const BUSY: Duration = Duration::from_secs(5);

/// How long after the log was said to be numbered up to a position ([`Topology::numbered_subject`])
/// a projector that JetStream has not brought that far reads the log instead. A healthy stream
/// delivers well within it (docs/benchmarks.md); a stream electing a new leader takes seconds.
pub const HINT_GRACE: Duration = Duration::from_millis(50);

/// [`HINT_GRACE`] while the last check found JetStream behind: it is not worth waiting for. At
/// least the projection's [`Projector::linger`], as long as it would wait for JetStream anyway.
pub const HINT_GRACE_LAGGING: Duration = Duration::from_millis(5);

/// The heads the log was said to be numbered up to, each checked a grace after it was heard;
/// those due together are checked as one.
struct Hints {
    /// Heads heard and not yet checked, rising, with when each was heard.
    heard: std::collections::VecDeque<(i64, tokio::time::Instant)>,
    /// Whether the last check read events from the log that JetStream had not delivered.
    lagging: bool,
    /// The projector's linger: the least grace while lagging.
    linger: Duration,
}

impl Hints {
    /// Heads kept at most; beyond that the oldest go, and the later ones cover them.
    const KEPT: usize = 1000;

    fn heard(&mut self, head: i64) {
        if self.heard.back().is_none_or(|(last, _)| head > *last) {
            if self.heard.len() == Self::KEPT {
                self.heard.pop_front();
            }
            self.heard.push_back((head, tokio::time::Instant::now()));
        }
    }

    fn new(linger: Duration) -> Self {
        Self { heard: Default::default(), lagging: false, linger }
    }

    fn grace(&self) -> Duration {
        if self.lagging {
            HINT_GRACE_LAGGING.max(self.linger)
        } else {
            HINT_GRACE
        }
    }

    /// The highest head due to be checked, once the oldest is; never, while none is waiting.
    async fn due(&mut self) -> Option<i64> {
        let (_, heard) = *self.heard.front()?;
        tokio::time::sleep_until(heard + self.grace()).await;
        let due = tokio::time::Instant::now() - self.grace();
        let mut head = 0;
        while let Some((next, _)) = self.heard.front().filter(|(_, heard)| *heard <= due) {
            head = *next;
            self.heard.pop_front();
        }
        Some(head)
    }
}

/// The latest head said on `subject`, for as long as `cancel` is not: 0 until one is heard.
fn hear_numbered(nats: async_nats::Client, subject: String, cancel: CancellationToken) -> tokio::sync::watch::Receiver<i64> {
    let (heads, heard) = tokio::sync::watch::channel(0i64);
    tokio::spawn(async move {
        // A subscription outlives reconnects; only a client that is shut down ends it.
        let mut hints = match nats.subscribe(subject).await {
            Ok(hints) => hints,
            Err(error) => {
                tracing::warn!(error = %error, "not hearing the relay's hints; JetStream stalls are noticed by looking at the log");
                return;
            }
        };
        loop {
            let hint = tokio::select! {
                _ = cancel.cancelled() => return,
                hint = hints.next() => hint,
            };
            let Some(hint) = hint else { return };
            let Some(head) = std::str::from_utf8(&hint.payload).ok().and_then(|text| text.parse::<i64>().ok()) else { continue };
            heads.send_if_modified(|latest| std::mem::replace(latest, head.max(*latest)) < head);
        }
    });
    heard
}

/// What a projector saw at its last look at the log.
struct LogWatch {
    /// The log's head then; `None` before the first look.
    head: Option<i64>,
    /// When it looked.
    last: tokio::time::Instant,
    /// When it last saw anything move: the head, or events applied.
    active: tokio::time::Instant,
    /// Whether JetStream delivered anything since.
    delivered: bool,
    /// Whether it read events from the log that JetStream had not delivered.
    lagging: bool,
}

impl Default for LogWatch {
    fn default() -> Self {
        let long_ago = tokio::time::Instant::now() - BUSY;
        Self { head: None, last: long_ago, active: long_ago, delivered: false, lagging: false }
    }
}

impl LogWatch {
    /// When to look next.
    fn due(&self) -> tokio::time::Instant {
        match self.head {
            None => self.last,
            Some(_) if self.lagging => self.last + WATCH_LAGGING,
            Some(_) if self.active.elapsed() < BUSY => self.last + WATCH,
            Some(_) => self.last + WATCH_IDLE,
        }
    }
}

/// Reads a projection's durable JetStream consumer and hands what it delivers to the projector's
/// loop, in chunks of up to `batch`.
struct Feeder {
    nats: async_nats::Client,
    topology: Topology,
    projection: &'static str,
    batch: usize,
    linger: Duration,
}

impl Feeder {
    /// Feeds until cancelled or the projector's loop is gone, starting again with backoff after
    /// any error (the loop reads the log meanwhile).
    async fn run(self, chunks: tokio::sync::mpsc::Sender<Vec<jetstream::Message>>, cancel: CancellationToken) {
        let mut failures = 0u32;
        loop {
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                result = self.feed(&chunks, &mut failures) => result,
            };
            let Err(error) = result else { return };
            failures += 1;
            let backoff = backoff(failures);
            tracing::warn!(
                projection = self.projection,
                error = format!("{error:#}"),
                ?backoff,
                "reading JetStream failed; the log is read meanwhile"
            );
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// One consumer's life: Ok when the loop is gone, Err when JetStream failed.
    async fn feed(&self, chunks: &tokio::sync::mpsc::Sender<Vec<jetstream::Message>>, failures: &mut u32) -> anyhow::Result<()> {
        let consumer = Projector::consumer(&self.nats, &self.topology, self.projection).await?;
        // A continuous pull: each chunk is whatever has arrived, up to `batch`, so one event
        // alone is applied at once and a burst is applied in one transaction.
        let mut messages = consumer.messages().await.map_err(|e| anyhow::anyhow!("pulling from JetStream: {e}"))?.ready_chunks(self.batch);
        *failures = 0;
        loop {
            let Some(mut chunk) = messages.next().await else { anyhow::bail!("the JetStream message stream ended") };
            let deadline = tokio::time::Instant::now() + self.linger;
            while chunk.len() < self.batch {
                match tokio::time::timeout_at(deadline, messages.next()).await {
                    Ok(Some(more)) => chunk.extend(more),
                    // The stream's end is seen again on the next turn.
                    Ok(None) | Err(_) => break,
                }
            }
            let mut received = Vec::with_capacity(chunk.len());
            let mut failed = None;
            for message in chunk {
                match message {
                    Ok(message) => received.push(message),
                    Err(error) => failed = Some(error),
                }
            }
            if !received.is_empty() && chunks.send(received).await.is_err() {
                return Ok(());
            }
            if let Some(error) = failed {
                anyhow::bail!("receiving from JetStream: {error}");
            }
        }
    }
}

/// The pause after `failures` failures in a row, of the projector's loop or its feeder: 200 ms
/// more each time, at most 5 s.
fn backoff(failures: u32) -> Duration {
    Duration::from_millis(200 * u64::from(failures.min(25)))
}

fn is_fatal(error: &anyhow::Error) -> bool {
    matches!(
        error.downcast_ref::<ProjectionError>(),
        Some(ProjectionError::Undecodable { .. } | ProjectionError::BadMessage { .. } | ProjectionError::MissingPosition(_))
    )
}

fn decode_message(message: &jetstream::Message) -> Result<LoggedEvent, ProjectionError> {
    let stream_sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
    let event: LoggedEvent =
        serde_json::from_slice(&message.payload).map_err(|e| ProjectionError::BadMessage { stream_sequence, reason: e.to_string() })?;
    let header = message.headers.as_ref().and_then(|h| h.get(POSITION_HEADER)).map(|v| v.as_str().to_string());
    if header.as_deref() != Some(event.position.to_string().as_str()) {
        return Err(ProjectionError::BadMessage {
            stream_sequence,
            reason: format!("position header {header:?} does not match the payload"),
        });
    }
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// When `due` answers, and what, measured from now.
    async fn next(hints: &mut Hints) -> (Option<i64>, Duration) {
        let start = tokio::time::Instant::now();
        let head = hints.due().await;
        (head, start.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn each_hint_is_checked_a_grace_after_it_was_heard_and_those_due_together_as_one() {
        let ms = Duration::from_millis;
        let mut hints = Hints::new(ms(1));
        assert_eq!(next(&mut hints).await, (None, ms(0)), "nothing heard, nothing to check");
        hints.heard(10);
        tokio::time::advance(ms(20)).await;
        hints.heard(12);
        hints.heard(11);
        // 10 is due 50 ms after it was heard, 30 from now; 12 50 ms after it; 11 was behind.
        assert_eq!(next(&mut hints).await, (Some(10), ms(30)));
        assert_eq!(next(&mut hints).await, (Some(12), ms(20)));
        assert_eq!(next(&mut hints).await, (None, ms(0)));

        // Heard while the loop was busy: both due by now, checked as one, at the higher head.
        hints.heard(30);
        tokio::time::advance(ms(10)).await;
        hints.heard(31);
        tokio::time::advance(ms(100)).await;
        assert_eq!(next(&mut hints).await, (Some(31), ms(0)));

        // JetStream found behind: the next hint is not waited for as long.
        hints.lagging = true;
        hints.heard(40);
        assert_eq!(next(&mut hints).await, (Some(40), HINT_GRACE_LAGGING));
        // A background projection's batches wait out their linger anyway.
        let mut background = Hints::new(BACKGROUND_LINGER);
        background.lagging = true;
        background.heard(1);
        assert_eq!(next(&mut background).await, (Some(1), BACKGROUND_LINGER));
    }
}
