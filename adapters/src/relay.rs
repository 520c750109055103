//! The sequencer and the relay: number the global log gap-free, then carry it to JetStream.
//!
//! **Sequencing.** Writers insert into `event_log` without a position; `id` comes from a sequence
//! and commits out of order. The sequencer numbers the committed rows that have no position yet,
//! in `(transaction_id, id)` order, from the head on, under a row lock on its cursor, so one
//! numbering commits before the next begins: positions are dense, and a reader by position never
//! finds a hole that fills later. A row that commits late is numbered late, after rows that
//! committed before it: nothing is ever skipped, nothing waits on a timer or on transactions
//! that do not write the log, and an event is numbered after every event its writer could have
//! seen. Writers never contend on a shared lock, so their commits group (docs/adr/0001-sequencer.md).
//!
//! **Relaying.** Numbered events after the `published` cursor are published with
//! `Nats-Msg-Id` = event id and their position in a header; the cursor moves after JetStream
//! acknowledged them all. A crash in between republishes, and JetStream's duplicate window and
//! the projectors' checkpoints absorb the repeats.
//!
//! **Waking.** An append wakes the relay: in this process through [`Appends::committed`], in others
//! through a core NATS hint on [`Topology::appended_subject`] ([`announce_appends`]), and the
//! sequencer wakes the publisher when it numbered something. Both loops still poll: every 10 ms at
//! most within a second of their last work or wake-up, and every 250 ms after that, as a net for a lost hint. An
//! idle relay costs Postgres a few queries a second, not two hundred.
//!
//! **Standing by.** One relay process is a single point of delay, not of loss: while it is down
//! nothing is numbered or published. So every other process that appends stands by for it
//! ([`stand_by`]): it keeps the id of each command's last event it committed, and
//! [`STANDBY_GRACE`] after the commit asks whether that event has been numbered. If not, it
//! numbers the log itself, says so on [`Topology::numbered_subject`] and publishes what is
//! pending, round after round, until its events are numbered. A live relay numbers within a few
//! milliseconds, so a standby rarely acts unless the relay is gone; and it leaves a JetStream that
//! does not acknowledge (a stream electing its leader) to the relay, since publishing from more
//! places would not help. Numbering and publishing from several processes at once is safe by
//! construction (the cursor's row lock, `Nats-Msg-Id`), only wasteful, which is why it waits.
//!
//! **Hints.** Each round that numbered events says so on [`Topology::numbered_subject`], a core
//! NATS subject that does not wait for a stream leader: projectors that JetStream has not brought
//! that far soon after read the log instead (`projections::projector::HINT_GRACE`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use async_nats::HeaderMap;
use futures::stream::BoxStream;
use futures::{FutureExt, StreamExt};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use uuid::Uuid;

use crate::global_log::{self, LoggedEvent};
use crate::nats::{changes, Topology};

/// Header carrying an event's global position.
pub const POSITION_HEADER: &str = "Understudy-Position";

/// Counts the appends committed by this process.
static APPENDED: LazyLock<watch::Sender<u64>> = LazyLock::new(|| watch::Sender::new(0));

/// Events were appended and committed by this process: wakes its relay, and (through
/// [`announce_appends`]) every other.
fn note_appended() {
    APPENDED.send_modify(|n| *n = n.wrapping_add(1));
}

/// Announces this process's appends on [`Topology::appended_subject`], for the life of the
/// process, so that a relay in another process wakes up. Appends in quick succession make one
/// announcement.
pub async fn announce_appends(nats: async_nats::Client, topology: Topology) {
    let mut appended = APPENDED.subscribe();
    let subject = topology.appended_subject();
    while appended.changed().await.is_ok() {
        // A lost hint only delays the relay until it polls again.
        let _ = nats.publish(subject.clone(), bytes::Bytes::new()).await;
        // At most one hint per 2 ms: under load the relays are busy anyway.
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Says on [`Topology::numbered_subject`] that the log is numbered up to `head`. Skipped while
/// NATS is away (publishing would queue in the client); projectors then read the log on their
/// own schedule.
pub async fn announce_numbered(nats: &async_nats::Client, topology: &Topology, head: i64) {
    if nats.connection_state() == async_nats::connection::State::Connected {
        // A lost hint only leaves the projectors to their next look at the log.
        let _ = nats.publish(topology.numbered_subject(), head.to_string().into()).await;
    }
}

/// How long after a commit a standby waits for the relay to number it before it numbers and
/// publishes the log itself. A live relay numbers within a few milliseconds of the hint.
pub const STANDBY_GRACE: Duration = Duration::from_millis(50);

/// Commands whose last events a standby keeps at most; beyond that it drops new ones, and the
/// rounds the older ones start publish those too.
const MAX_UNCONFIRMED: usize = 10_000;

const UNWATCHED: u8 = 0;
const WATCHED: u8 = 1;
const OFF: u8 = 2;

/// What one event store committed and has not yet seen numbered: the to-do list of its
/// [`stand_by`] task. Kept only while a standby watches it.
#[derive(Default)]
pub struct Appends {
    state: AtomicU8,
    /// The last event id of each command committed, and when, oldest first.
    unconfirmed: std::sync::Mutex<VecDeque<(Uuid, Instant)>>,
    added: tokio::sync::Notify,
}

impl Appends {
    /// A command's events were committed; `last` is its last event's id. Wakes the relay.
    pub fn committed(&self, last: Uuid) {
        if self.state.load(Ordering::Relaxed) == WATCHED {
            let mut unconfirmed = self.queue();
            if unconfirmed.len() < MAX_UNCONFIRMED {
                unconfirmed.push_back((last, Instant::now()));
            }
            drop(unconfirmed);
            self.added.notify_one();
        }
        note_appended();
    }

    /// No standby for this store, for good: a relay runs beside it (or a test numbers and
    /// publishes the log by hand).
    pub fn stand_down(&self) {
        self.state.store(OFF, Ordering::Relaxed);
        self.queue().clear();
        self.added.notify_one();
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<(Uuid, Instant)>> {
        // A panic while holding it leaves a queue of plain values, still usable.
        self.unconfirmed.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The events committed at least `grace` ago, oldest first, at most `limit`; or when the
    /// oldest will be, if none is yet; or neither, if nothing is waiting.
    fn due(&self, grace: Duration, limit: usize) -> Result<Vec<Uuid>, Option<Instant>> {
        let unconfirmed = self.queue();
        let due: Vec<Uuid> = unconfirmed.iter().take_while(|(_, at)| at.elapsed() >= grace).take(limit).map(|(id, _)| *id).collect();
        match unconfirmed.front() {
            _ if !due.is_empty() => Ok(due),
            Some((_, at)) => Err(Some(*at + grace)),
            None => Err(None),
        }
    }

    /// The oldest `count` were numbered.
    fn confirm(&self, count: usize) {
        let mut unconfirmed = self.queue();
        let count = count.min(unconfirmed.len());
        unconfirmed.drain(..count);
    }
}

/// How many of `events` are not numbered yet. An id the log does not hold counts as numbered.
async fn unnumbered(pool: &PgPool, events: &[Uuid]) -> sqlx::Result<i64> {
    sqlx::query_scalar("SELECT count(*) FROM event_log WHERE event_id = ANY($1) AND position IS NULL").bind(events).fetch_one(pool).await
}

/// Stands by for the relay, for the life of the process (see the module's documentation):
/// [`STANDBY_GRACE`] after each of `appends` commits, numbers and publishes the log from here if
/// no relay has numbered it. Ends once the store stands down ([`Appends::stand_down`]).
pub async fn stand_by(pool: PgPool, js: jetstream::Context, topology: Topology, appends: Arc<Appends>) {
    const BATCH: i64 = 1000;
    if appends.state.compare_exchange(UNWATCHED, WATCHED, Ordering::Relaxed, Ordering::Relaxed).is_err() {
        return;
    }
    const SAY_AGAIN: Duration = Duration::from_secs(60);
    // When it last said it stands in for the relay, and the rounds failed since the last success.
    let mut said: Option<Instant> = None;
    let (mut failures, mut waits) = (0u32, 0u32);
    let nats = js.client();
    let publishing = Arc::new(tokio::sync::Mutex::new(()));
    loop {
        if appends.state.load(Ordering::Relaxed) == OFF {
            return;
        }
        let due = match appends.due(STANDBY_GRACE, BATCH as usize) {
            Ok(due) => due,
            Err(Some(at)) => {
                tokio::time::sleep_until(at).await;
                continue;
            }
            Err(None) => {
                appends.added.notified().await;
                continue;
            }
        };
        let step = async {
            // Numbered: the relay is alive (if JetStream is not, publishing from here would not
            // help, and projectors read the log when it falls behind).
            if unnumbered(&pool, &due).await? == 0 {
                appends.confirm(due.len());
                return anyhow::Ok(None);
            }
            crate::metrics::METRICS.relay_standby_rounds.fetch_add(1, Ordering::Relaxed);
            let (numbered, head) = sequence(&pool, BATCH).await?;
            if numbered > 0 {
                announce_numbered(&nats, &topology, head).await;
            }
            // Publishing hangs while the stream elects a leader: it goes on in the background,
            // one round at a time, and numbering goes on meanwhile.
            if let Ok(round) = publishing.clone().try_lock_owned() {
                let (pool, js, topology) = (pool.clone(), js.clone(), topology.clone());
                tokio::spawn(async move {
                    if let Err(error) = publish_pending(&pool, &js, &topology, BATCH).await {
                        tracing::debug!(error = format!("{error:#}"), "the standby's publishing failed; the next round tries again");
                    }
                    drop(round);
                });
            }
            Ok(Some(numbered))
        };
        let pause = match step.await {
            Ok(None) => {
                (failures, waits) = (0, 0);
                Duration::ZERO
            }
            Ok(Some(moved)) => {
                if said.is_none_or(|at| at.elapsed() >= SAY_AGAIN) {
                    said = Some(Instant::now());
                    tracing::warn!(
                        "events this process appended were not numbered within {} ms: numbering and publishing the log \
                         from here until they are (is the relay running?); said at most once a minute",
                        STANDBY_GRACE.as_millis()
                    );
                }
                failures = 0;
                // Nothing to number: another numberer (the relay, back) got there first, which
                // the next look confirms. Look again soon, less often the longer that lasts.
                waits = if moved == 0 { waits + 1 } else { 0 };
                Duration::from_millis(5 * u64::from(waits.min(10)))
            }
            Err(error) => {
                failures += 1;
                if failures == 1 {
                    tracing::warn!(error = format!("{error:#}"), "standing by for the relay failed; retrying");
                }
                Duration::from_millis(100 * u64::from(failures.min(10)))
            }
        };
        tokio::time::sleep(pause).await;
    }
}

/// Numbers up to `limit` committed events; returns how many and the new head position (0 if the
/// log is empty). Four statements: BEGIN, lock, number, COMMIT.
pub async fn sequence(pool: &PgPool, limit: i64) -> sqlx::Result<(usize, i64)> {
    let mut tx = pool.begin().await?;
    let head: i64 = sqlx::query_scalar("SELECT position FROM log_cursors WHERE name = 'sequenced' FOR UPDATE").fetch_one(&mut *tx).await?;
    // A statement of its own, so that its snapshot, taken once the lock is held, sees what an
    // earlier holder of the lock numbered: one statement's snapshot would predate that commit
    // and number those rows again.
    let (numbered, new_head): (i64, i64) = sqlx::query_as(
        "WITH next AS (
             SELECT id, $1 + row_number() OVER (ORDER BY transaction_id, id) AS position
             FROM event_log
             WHERE position IS NULL
             ORDER BY transaction_id, id
             LIMIT $2
         ), numbered AS (
             UPDATE event_log e SET position = next.position FROM next WHERE e.id = next.id
             RETURNING e.position
         ), moved AS (
             UPDATE log_cursors SET position = (SELECT max(position) FROM numbered)
             WHERE name = 'sequenced' AND EXISTS (SELECT 1 FROM numbered)
         )
         SELECT count(*), COALESCE(max(position), $1) FROM numbered",
    )
    .bind(head)
    .bind(limit)
    .fetch_one(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok((numbered as usize, new_head))
}

/// Publishes up to `limit` numbered events after the `published` cursor; returns how many.
pub async fn publish_pending(pool: &PgPool, js: &jetstream::Context, topology: &Topology, limit: i64) -> anyhow::Result<usize> {
    let events = global_log::read_unpublished(pool, limit).await?;
    let Some(last) = events.last().map(|e| e.position) else {
        return Ok(0);
    };
    // Pipeline the publishes, then wait for every acknowledgement before moving the cursor.
    let mut acks = Vec::with_capacity(events.len());
    for event in &events {
        let span = crate::telemetry::span_from("relay.publish", event.traceparent.as_deref());
        acks.push(publish_one(js, topology, event).instrument(span).await?);
    }
    for ack in acks {
        match ack.await {
            Ok(_) => {}
            // Another publisher (the relay and a standby, or two relays) sent the same event a
            // moment earlier and the stream is storing it. Should that fail, the projectors read
            // the event from the log, as they read any JetStream did not deliver.
            Err(error) if publishing_elsewhere(&error) => {}
            Err(error) => return Err(anyhow::anyhow!("{error}")).context("JetStream did not acknowledge a published event"),
        }
    }
    sqlx::query("UPDATE log_cursors SET position = GREATEST(position, $1) WHERE name = 'published'").bind(last).execute(pool).await?;
    Ok(events.len())
}

/// JetStream's answer when a message with the same `Nats-Msg-Id` is being stored right now.
fn publishing_elsewhere(error: &jetstream::context::PublishError) -> bool {
    std::error::Error::source(error)
        .and_then(|source| source.downcast_ref::<jetstream::Error>())
        .is_some_and(|error| error.error_code() == jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT)
}

async fn publish_one(
    js: &jetstream::Context,
    topology: &Topology,
    event: &LoggedEvent,
) -> anyhow::Result<jetstream::context::PublishAckFuture> {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.event_id.to_string().as_str());
    headers.insert(POSITION_HEADER, event.position.to_string().as_str());
    if let Some(traceparent) = crate::telemetry::current_traceparent() {
        headers.insert("traceparent", traceparent.as_str());
    }
    let payload = serde_json::to_vec(event)?;
    js.publish_with_headers(topology.event_subject(&event.aggregate_type, event.aggregate_id), headers, payload.into())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("publishing an event to JetStream")
}

/// Sequences and relays until cancelled. Errors are logged and retried with backoff: the log in
/// Postgres is the truth, so nothing is lost while NATS or Postgres is away.
///
/// Numbering and publishing are two loops: while NATS is away (a cluster electing a new stream
/// leader, a server restarting) the log is still numbered, so projectors, which read the
/// Postgres log whenever JetStream falls behind it, keep up without NATS.
pub async fn run(pool: PgPool, js: jetstream::Context, topology: Topology, cancel: CancellationToken) {
    const BATCH: i64 = 1000;
    let numbered = watch::Sender::new(0u64);
    let appended = match js.client().subscribe(topology.appended_subject()).await {
        Ok(hints) => futures::stream::select(changes(APPENDED.subscribe()), hints.map(|_| ())).boxed(),
        Err(error) => {
            tracing::warn!(error = %error, "not hearing other processes' appends; the relay polls for them");
            changes(APPENDED.subscribe())
        }
    };
    let nats = js.client();
    let sequencer = repeat("sequencing the global log", &cancel, appended, Wakes::WhenIdle, || async {
        let (count, head) = sequence(&pool, BATCH).await.context("sequencing the global log")?;
        if count > 0 {
            numbered.send_modify(|n| *n = n.wrapping_add(1));
            announce_numbered(&nats, &topology, head).await;
        }
        Ok(count)
    });
    // The publisher's wake-ups are the sequencer's rounds, at most one per transaction: each may
    // run it at once, even under load, which takes a poll's pause off every event's way.
    let publisher = repeat("relaying the global log to JetStream", &cancel, changes(numbered.subscribe()), Wakes::Always, || {
        publish_pending(&pool, &js, &topology, BATCH)
    });
    tokio::join!(sequencer, publisher);
}

/// How long after its last work or wake-up a loop still polls every 10 ms at most.
const BUSY: Duration = Duration::from_secs(1);

/// How often a loop polls once it has been idle for [`BUSY`].
const IDLE: Duration = Duration::from_millis(250);

/// Which pauses of [`repeat`] a wake-up cuts short.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wakes {
    /// Only [`IDLE`] pauses. For wake-ups that come with every append: under load, letting each
    /// run the step again at once would run a round per append instead of one per batch; those
    /// that came meanwhile only keep the loop busy.
    WhenIdle,
    /// Every pause, and one that came during the step runs it again at once. For wake-ups that
    /// each mean new work, such as the sequencer's rounds for the publisher.
    Always,
}

/// Runs `step` until cancelled: again at once after it did some work; while idle, after a pause
/// growing to 10 ms within [`BUSY`] of its last work or wake-up, and after [`IDLE`] beyond that,
/// pauses that `wake` cuts short as [`Wakes`] says; while it fails, after a backoff growing to 1 s.
async fn repeat<F, Fut>(what: &str, cancel: &CancellationToken, mut wake: BoxStream<'static, ()>, wakes_cut: Wakes, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<usize>>,
{
    let mut idle = Duration::from_millis(1);
    let mut active = Instant::now();
    let mut failures = 0u32;
    loop {
        let (pause, wakes) = match step().await {
            Ok(0) => {
                failures = 0;
                let mut woken = false;
                while let Some(Some(())) = wake.next().now_or_never() {
                    active = Instant::now();
                    woken = true;
                }
                if woken && wakes_cut == Wakes::Always {
                    idle = Duration::from_millis(1);
                    (Duration::ZERO, false)
                } else if active.elapsed() < BUSY {
                    idle = (idle * 2).min(Duration::from_millis(10));
                    (idle, wakes_cut == Wakes::Always)
                } else {
                    (IDLE, true)
                }
            }
            Ok(_) => {
                failures = 0;
                idle = Duration::from_millis(1);
                active = Instant::now();
                (Duration::ZERO, false)
            }
            Err(error) => {
                failures += 1;
                let backoff = Duration::from_millis(100 * u64::from(failures.min(10)));
                tracing::warn!(error = format!("{error:#}"), ?backoff, "{what} failed; retrying");
                // A failing step waits out its backoff: wake-ups would only make it fail faster.
                (backoff, false)
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            Some(()) = wake.next(), if wakes => {
                idle = Duration::from_millis(1);
                active = Instant::now();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use super::*;

    /// A [`repeat`] loop whose step finds nothing to do: how many steps it ran, its wake-up
    /// sender, and what stops it.
    struct IdleLoop {
        steps: Arc<AtomicUsize>,
        wake: watch::Sender<u64>,
        cancel: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl IdleLoop {
        fn start(wakes_cut: Wakes) -> Self {
            let steps = Arc::new(AtomicUsize::new(0));
            let wake = watch::Sender::new(0u64);
            let cancel = CancellationToken::new();
            let (counted, stop, wakes) = (steps.clone(), cancel.clone(), changes(wake.subscribe()));
            let task = tokio::spawn(async move {
                repeat("test", &stop, wakes, wakes_cut, move || {
                    counted.fetch_add(1, Ordering::SeqCst);
                    async { Ok(0) }
                })
                .await
            });
            Self { steps, wake, cancel, task }
        }

        fn steps(&self) -> usize {
            self.steps.load(Ordering::SeqCst)
        }

        /// Whether a wake-up now runs the step within a millisecond.
        async fn woken_at_once(&self) -> bool {
            let before = self.steps();
            self.wake.send_modify(|n| *n += 1);
            tokio::time::sleep(Duration::from_millis(1)).await;
            self.steps() > before
        }

        async fn stop(self) {
            self.cancel.cancel();
            self.task.await.expect("loop");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_loop_polls_rarely_and_a_wake_up_runs_it_at_once() {
        let idle = IdleLoop::start(Wakes::WhenIdle);
        // Ten idle seconds: every 10 ms for the first second (about 100 polls), then every 250 ms
        // (36). Polling every 10 ms throughout would be 1,000.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let polls = idle.steps();
        assert!((100..=160).contains(&polls), "{polls} polls in 10 idle seconds");
        // Deep in a 250 ms pause, a wake-up runs the step within the next millisecond.
        tokio::time::sleep(Duration::from_millis(1)).await;
        assert!(idle.woken_at_once().await, "the wake-up ran the step");
        idle.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_loop_woken_always_runs_at_once_even_between_busy_polls() {
        for (wakes_cut, at_once) in [(Wakes::Always, true), (Wakes::WhenIdle, false)] {
            let busy = IdleLoop::start(wakes_cut);
            // Busy polls at 0, 2, 6, 14, then every 10 ms: 94, 104. At 95 the loop is mid-pause.
            tokio::time::sleep(Duration::from_millis(95)).await;
            let ran = busy.woken_at_once().await;
            assert_eq!(ran, at_once, "{wakes_cut:?}: a wake-up between busy polls ran the step: {ran}");
            busy.stop().await;
        }
    }
}
