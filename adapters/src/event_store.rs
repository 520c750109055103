//! The command path: load an aggregate from its esrs table, decide, append with an optimistic
//! version check, and retry on fresh state when another writer got there first.

use std::marker::PhantomData;
use std::time::Duration;

use esrs::store::postgres::PgStoreError;
use esrs::store::StoreEvent;
use sqlx::PgPool;
use thiserror::Error;
use understudy_domain::account::AccountAggregate;
use understudy_domain::environment::{EnvironmentAggregate, EnvironmentCommand, EnvironmentSpec};
use understudy_domain::ids::{DeploymentId, EnvironmentId, ProjectId};
use understudy_domain::project::ProjectAggregate;
use understudy_domain::pull_request::PullRequestAggregate;
use understudy_domain::user::UserAggregate;
use understudy_domain::values::{CommitSha, Entrypoint, Target};
use understudy_domain::{Aggregate, DomainError, Metadata, Recorded};
use uuid::Uuid;

use tracing::Instrument;

use crate::group_commit::{self, GroupCommit, Row, Rows};
use crate::metrics::METRICS;
use understudy_domain::DomainEvent;

/// A command with who sent it and why; its metadata goes onto every event it causes.
#[derive(Debug, Clone)]
pub struct Envelope<C> {
    pub meta: Metadata,
    pub command: C,
}

/// Adapts a domain aggregate to esrs: events are stored as [`Recorded`] (event + metadata).
pub struct Es<A>(PhantomData<A>);

impl<A: Aggregate> esrs::Aggregate for Es<A> {
    const NAME: &'static str = A::NAME;
    type State = A::State;
    type Command = Envelope<A::Command>;
    type Event = Recorded<A::Event>;
    type Error = DomainError;

    fn handle_command(state: &A::State, envelope: Envelope<A::Command>) -> Result<Vec<Recorded<A::Event>>, DomainError> {
        let Envelope { meta, command } = envelope;
        Ok(A::decide(state, command)?.into_iter().map(|event| Recorded { meta: meta.clone(), event }).collect())
    }

    fn apply_event(state: A::State, recorded: Recorded<A::Event>) -> A::State {
        A::apply(state, &recorded.event)
    }
}

/// What went wrong with a command, and so what the caller should do.
#[derive(Debug, Error)]
pub enum CommandError {
    /// The command was refused by the domain: the caller's to fix (4xx).
    #[error(transparent)]
    Domain(#[from] DomainError),
    /// Other writers kept winning the race for this aggregate; retrying later may succeed.
    #[error("aggregate {aggregate_id} kept changing under {attempts} attempts; try again")]
    Conflict { aggregate_id: Uuid, attempts: u32 },
    /// The store failed (connection, stored data that does not decode): a 5xx.
    #[error("event store: {0}")]
    Store(#[from] PgStoreError),
}

/// Postgres SQLSTATE 23505 (unique violation) on an append is another writer's event at the same
/// sequence number: a concurrency conflict.
fn is_conflict(error: &PgStoreError) -> bool {
    matches!(error, PgStoreError::Sqlx(sqlx::Error::Database(db)) if db.code().as_deref() == Some("23505"))
}

/// The result of a command that was accepted.
pub struct Executed<A: Aggregate> {
    pub state: A::State,
    pub events: Vec<StoreEvent<Recorded<A::Event>>>,
}

impl<A: Aggregate> std::fmt::Debug for Executed<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executed").field("state", &self.state).field("events", &self.events).finish()
    }
}

/// An aggregate's state as of its `version` (the sequence number of its last event; 0 for none).
#[derive(Debug, Clone)]
pub struct Loaded<S> {
    id: Uuid,
    version: i32,
    state: S,
}

impl<S> Loaded<S> {
    pub fn version(&self) -> i32 {
        self.version
    }

    pub fn inner(&self) -> &S {
        &self.state
    }

    pub fn into_inner(self) -> S {
        self.state
    }
}

/// Recently used aggregate states, so that a command reads only the events its aggregate gained
/// since (usually none) instead of its whole history. An entry is a state some writer once read
/// or wrote; it may be stale, because other processes append too. Every use is safe with that:
/// a load catches up from the entry's version, and an append decided on an entry names the next
/// version, which the unique `(aggregate_id, sequence_number)` index refuses if someone else
/// took it first.
struct StateCache<S> {
    entries: std::sync::Mutex<CacheEntries<S>>,
}

struct CacheEntries<S> {
    map: std::collections::HashMap<Uuid, (std::sync::Arc<Loaded<S>>, u64)>,
    clock: u64,
}

/// States kept per aggregate type. Past it, the least recently used half is dropped.
const CACHED_STATES: usize = 4096;

impl<S> StateCache<S> {
    fn new() -> Self {
        Self { entries: std::sync::Mutex::new(CacheEntries { map: Default::default(), clock: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheEntries<S>> {
        // A panic elsewhere while holding the lock leaves only a cache behind: keep using it.
        self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn get(&self, id: Uuid) -> Option<std::sync::Arc<Loaded<S>>> {
        let mut entries = self.lock();
        entries.clock += 1;
        let now = entries.clock;
        entries.map.get_mut(&id).map(|(loaded, used)| {
            *used = now;
            loaded.clone()
        })
    }

    /// Keeps `loaded` unless a newer version of the same aggregate is already kept.
    fn put(&self, loaded: Loaded<S>) {
        let mut entries = self.lock();
        entries.clock += 1;
        let now = entries.clock;
        match entries.map.get(&loaded.id) {
            Some((kept, _)) if kept.version >= loaded.version => {}
            _ => {
                entries.map.insert(loaded.id, (std::sync::Arc::new(loaded), now));
            }
        }
        if entries.map.len() > CACHED_STATES {
            let mut used: Vec<u64> = entries.map.values().map(|(_, used)| *used).collect();
            used.sort_unstable();
            let cutoff = used[used.len() / 2];
            entries.map.retain(|_, (_, used)| *used > cutoff);
        }
    }

    fn forget(&self, id: Uuid) {
        self.lock().map.remove(&id);
    }
}

/// The event store of one aggregate type.
pub struct AggregateStore<A: Aggregate> {
    pool: PgPool,
    cache: std::sync::Arc<StateCache<A::State>>,
    statements: std::sync::Arc<Statements>,
    group_commit: GroupCommit,
    /// What this store committed, for the standby relay of its process.
    appends: std::sync::Arc<crate::relay::Appends>,
}

impl<A: Aggregate> Clone for AggregateStore<A> {
    fn clone(&self) -> Self {
        Self {
            pool: self.pool.clone(),
            cache: self.cache.clone(),
            statements: self.statements.clone(),
            group_commit: self.group_commit.clone(),
            appends: self.appends.clone(),
        }
    }
}

/// The SQL that reads one aggregate type's events. They are written once, to the global log
/// (see [`crate::group_commit`]); the type's esrs table (`{aggregate}_events`) is a view of the
/// log in the layout esrs reads (migrations 0012 and 0013), and the reads here are that view's
/// rows, asked of the log directly so the unique index on (aggregate_id, aggregate_type,
/// aggregate_version) bounds them. Both build the payload with the SQL function `esrs_payload`.
struct Statements {
    /// Events after a version, oldest first (all of them after 0).
    after: String,
}

impl Statements {
    fn of(aggregate: &str) -> Self {
        Self {
            after: format!(
                "SELECT l.event_id AS id, l.aggregate_id, esrs_payload(l) AS payload, l.recorded_at AS occurred_on,
                        l.aggregate_version::int AS sequence_number, NULL::int AS version
                 FROM event_log l WHERE l.aggregate_id = $1 AND l.aggregate_type = '{aggregate}' AND l.aggregate_version > $2
                 ORDER BY l.aggregate_version"
            ),
        }
    }
}

const MAX_ATTEMPTS: u32 = 32;

/// Exponential backoff with full jitter (1 ms doubling to 64 ms), so writers racing for one
/// aggregate spread out instead of colliding again in lockstep.
fn backoff(attempt: u32) -> Duration {
    let ceiling_us = 1000u64 << attempt.min(6);
    let random = Uuid::new_v4().as_u128() as u64;
    Duration::from_micros(ceiling_us / 2 + random % (ceiling_us / 2 + 1))
}

impl<A: Aggregate> AggregateStore<A> {
    pub async fn new(pool: PgPool) -> Result<Self, sqlx::Error> {
        Ok(Self {
            group_commit: GroupCommit::start(pool.clone()),
            pool,
            cache: std::sync::Arc::new(StateCache::new()),
            statements: std::sync::Arc::new(Statements::of(A::NAME)),
            appends: std::sync::Arc::default(),
        })
    }

    /// The same store, reporting its commits to `appends` (shared by a process's stores).
    fn reporting_to(mut self, appends: &std::sync::Arc<crate::relay::Appends>) -> Self {
        self.appends = appends.clone();
        self
    }

    /// The current state of `id` (the default state when it has no events yet): the kept state
    /// and the events after it, or every event.
    pub async fn load(&self, id: Uuid) -> Result<Loaded<A::State>, PgStoreError> {
        let kept = self.cache.get(id);
        let base = kept.as_deref().cloned().unwrap_or_else(|| Loaded { id, version: 0, state: A::State::default() });
        let newer = self.events_after(id, base.version).await?;
        if kept.is_some() && newer.is_empty() {
            return Ok(base);
        }
        let loaded = fold::<A>(base, &newer);
        self.cache.put(loaded.clone());
        Ok(loaded)
    }

    async fn events_after(&self, id: Uuid, version: i32) -> Result<Vec<StoreEvent<Recorded<A::Event>>>, PgStoreError> {
        let rows: Vec<esrs::sql::event::DbEvent> =
            sqlx::query_as(&self.statements.after).bind(id).bind(version).fetch_all(&self.pool).await?;
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            events.extend(row.try_into_store_event::<_, Recorded<A::Event>>()?);
        }
        Ok(events)
    }

    /// Decides `command` against the current state of `id` and appends the events, retrying on
    /// fresh state when a concurrent append wins. A command that decides no events appends nothing.
    pub async fn execute(&self, id: Uuid, command: A::Command, mut meta: Metadata) -> Result<Executed<A>, CommandError> {
        let span = tracing::info_span!("command.append", aggregate = A::NAME, %id);
        let started = std::time::Instant::now();
        let result = async {
            if meta.traceparent.is_none() {
                meta.traceparent = crate::telemetry::current_traceparent();
            }
            self.execute_with_retries(id, command, meta).await
        }
        .instrument(span)
        .await;
        if let Ok(executed) = &result {
            METRICS.append_seconds.observe(started.elapsed());
            for event in &executed.events {
                METRICS.events_appended.inc(event.payload.event.event_type());
            }
        }
        result
    }

    /// A kept state is tried first, unread: if it is stale, the append names a version someone
    /// else took and is refused. Only an outcome that appends nothing (no events, or the domain's
    /// refusal) could rest on a stale state unnoticed, so that is decided again on a fresh read.
    async fn execute_with_retries(&self, id: Uuid, command: A::Command, meta: Metadata) -> Result<Executed<A>, CommandError> {
        let (mut loaded, mut fresh) = match self.cache.get(id) {
            Some(kept) => (Loaded::clone(&kept), false),
            None => (self.load(id).await?, true),
        };
        let mut attempt = 0;
        loop {
            let decided =
                <Es<A> as esrs::Aggregate>::handle_command(&loaded.state, Envelope { meta: meta.clone(), command: command.clone() });
            let events = match decided {
                Ok(events) if !events.is_empty() => events,
                _ if !fresh => {
                    loaded = self.load(id).await?;
                    fresh = true;
                    continue;
                }
                Ok(_) => return Ok(Executed { state: loaded.state, events: vec![] }),
                Err(refused) => return Err(refused.into()),
            };
            attempt += 1;
            match self.append(&loaded, events, &meta).await {
                Ok(stored) => {
                    let loaded = fold::<A>(loaded, &stored);
                    self.cache.put(loaded.clone());
                    return Ok(Executed { state: loaded.state, events: stored });
                }
                Err(PgStoreError::Custom(error)) if error.is::<HoldsNul>() => {
                    return Err(DomainError::invalid("event", error.to_string()).into());
                }
                Err(error) if is_conflict(&error) => {
                    METRICS.append_conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(aggregate = A::NAME, %id, attempt, "append conflict; retrying on fresh state");
                    if attempt >= MAX_ATTEMPTS {
                        return Err(CommandError::Conflict { aggregate_id: id, attempts: MAX_ATTEMPTS });
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    loaded = self.load(id).await?;
                    fresh = true;
                }
                Err(error) => {
                    // Whether it committed is unknown (the connection may have dropped after
                    // COMMIT): read it afresh next time.
                    self.cache.forget(id);
                    return Err(error.into());
                }
            }
        }
    }

    /// Appends `events` after `loaded`: through group commit, or, for the aggregates the access
    /// index covers, in one transaction with the index, so the index changes with the commit.
    async fn append(
        &self,
        loaded: &Loaded<A::State>,
        events: Vec<Recorded<A::Event>>,
        meta: &Metadata,
    ) -> Result<Vec<StoreEvent<Recorded<A::Event>>>, PgStoreError> {
        let occurred_on = chrono::Utc::now();
        let stored: Vec<StoreEvent<Recorded<A::Event>>> = events
            .into_iter()
            .zip(loaded.version + 1..)
            .map(|(payload, sequence_number)| StoreEvent {
                id: Uuid::now_v7(),
                aggregate_id: loaded.id,
                payload,
                occurred_on,
                sequence_number,
                version: None,
            })
            .collect();
        let rows = Rows {
            aggregate_type: A::NAME,
            aggregate_id: loaded.id,
            schema_version: A::Event::SCHEMA_VERSION as i32,
            recorded_at: occurred_on,
            correlation_id: meta.correlation_id,
            causation_id: meta.causation_id,
            actor: meta.actor.clone(),
            traceparent: meta.traceparent.clone(),
            events: stored
                .iter()
                .map(|e| {
                    let payload = serde_json::to_value(&e.payload.event)?;
                    if holds_nul(&payload) {
                        return Err(PgStoreError::Custom(Box::new(HoldsNul)));
                    }
                    Ok(Row { event_id: e.id, version: e.sequence_number, event_type: e.payload.event.event_type(), payload })
                })
                .collect::<Result<_, PgStoreError>>()?,
        };
        if crate::access_index::indexes(A::NAME) {
            let mut tx = self.pool.begin().await?;
            group_commit::insert(&mut *tx, [&rows]).await?;
            for row in &rows.events {
                crate::access_index::apply(&mut tx, A::NAME, rows.aggregate_id, &row.payload).await?;
            }
            tx.commit().await?;
        } else {
            self.group_commit.append(rows).await?;
        }
        if let Some(last) = stored.last() {
            self.appends.committed(last.id);
        }
        Ok(stored)
    }
}

/// Postgres's `jsonb` cannot hold U+0000. An event whose text does (a test name a broken app
/// reported, say) is refused before it is sent, with this, rather than with Postgres's error.
#[derive(Debug, Error)]
#[error("text holding a NUL character (U+0000) cannot be stored")]
struct HoldsNul;

fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(fields) => fields.iter().any(|(key, value)| key.contains('\0') || holds_nul(value)),
        _ => false,
    }
}

/// `loaded` with `events` (the ones after its version, in order) applied.
fn fold<A: Aggregate>(loaded: Loaded<A::State>, events: &[StoreEvent<Recorded<A::Event>>]) -> Loaded<A::State> {
    events.iter().fold(loaded, |loaded, e| Loaded {
        id: loaded.id,
        version: e.sequence_number,
        state: A::apply(loaded.state, &e.payload.event),
    })
}

/// The event stores of every aggregate type, over one pool.
#[derive(Clone)]
pub struct EventStore {
    pub pool: PgPool,
    pub accounts: AggregateStore<AccountAggregate>,
    pub projects: AggregateStore<ProjectAggregate>,
    pub environments: AggregateStore<EnvironmentAggregate>,
    pub pull_requests: AggregateStore<PullRequestAggregate>,
    pub users: AggregateStore<UserAggregate>,
    /// What every store here committed, for the standby relay ([`crate::relay::stand_by`]).
    pub appends: std::sync::Arc<crate::relay::Appends>,
}

impl EventStore {
    /// Asks for `sha` to be deployed to the environment of `project` × `target` × `entrypoint`
    /// (created on first use). Repeating the request changes nothing. Whether a new deployment
    /// was requested.
    pub async fn deploy_commit(
        &self,
        project: ProjectId,
        target: &Target,
        entrypoint: &Entrypoint,
        sha: &CommitSha,
        meta: &Metadata,
    ) -> Result<bool, CommandError> {
        self.deploy(project, target, entrypoint, sha, false, meta).await
    }

    /// [`EventStore::deploy_commit`], for a commit that waits for a maintainer's approval before
    /// anything is built when `awaiting_approval` (a pull request from a fork).
    pub async fn deploy(
        &self,
        project: ProjectId,
        target: &Target,
        entrypoint: &Entrypoint,
        sha: &CommitSha,
        awaiting_approval: bool,
        meta: &Metadata,
    ) -> Result<bool, CommandError> {
        let environment_id = EnvironmentId::derive(project, target, entrypoint);
        // The id derives from the commit and how many deployments of it came before: a repeated
        // request names the same deployment (and the domain ignores the commit already current),
        // while a commit deployed again later (a revert) gets a new one.
        let state = self.environments.load(environment_id.0).await?;
        let earlier = state.inner().deployments.iter().filter(|d| d.commit == *sha).count();
        let current_is_it = state.inner().current().is_some_and(|d| d.commit == *sha);
        let occurrence = if current_is_it { earlier.saturating_sub(1) } else { earlier };
        let key = if occurrence == 0 { sha.as_str().to_string() } else { format!("{}#{occurrence}", sha.as_str()) };
        let deployment_id = DeploymentId(Uuid::new_v5(&environment_id.0, key.as_bytes()));
        let spec = EnvironmentSpec { project_id: project, target: target.clone(), entrypoint: entrypoint.clone() };
        let command = EnvironmentCommand::RequestDeployment {
            awaiting_approval,
            environment_id,
            spec,
            deployment_id,
            commit: sha.clone(),
            at: chrono::Utc::now(),
        };
        match self.environments.execute(environment_id.0, command, meta.clone()).await {
            Ok(done) => Ok(!done.events.is_empty()),
            Err(CommandError::Domain(DomainError::AlreadyExists { entity: "deployment", .. })) => Ok(false),
            Err(error) => Err(error),
        }
    }

    pub async fn new(pool: PgPool) -> Result<Self, sqlx::Error> {
        let appends = std::sync::Arc::default();
        Ok(Self {
            accounts: AggregateStore::new(pool.clone()).await?.reporting_to(&appends),
            projects: AggregateStore::new(pool.clone()).await?.reporting_to(&appends),
            environments: AggregateStore::new(pool.clone()).await?.reporting_to(&appends),
            pull_requests: AggregateStore::new(pool.clone()).await?.reporting_to(&appends),
            users: AggregateStore::new(pool.clone()).await?.reporting_to(&appends),
            appends,
            pool,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(n: u128, version: i32) -> Loaded<u32> {
        Loaded { id: Uuid::from_u128(n), version, state: version as u32 }
    }

    #[test]
    fn the_cache_never_goes_back_a_version() {
        let cache = StateCache::new();
        cache.put(loaded(1, 5));
        cache.put(loaded(1, 3));
        assert_eq!(cache.get(Uuid::from_u128(1)).map(|l| l.version), Some(5));
        cache.put(loaded(1, 6));
        assert_eq!(cache.get(Uuid::from_u128(1)).map(|l| l.version), Some(6));
        cache.forget(Uuid::from_u128(1));
        assert!(cache.get(Uuid::from_u128(1)).is_none());
    }

    #[test]
    fn the_cache_stays_bounded_and_keeps_what_was_used_last() {
        let cache = StateCache::new();
        for n in 0..CACHED_STATES as u128 {
            cache.put(loaded(n, 1));
        }
        // The first one is used again, so it is among the most recent when the cache overflows.
        assert!(cache.get(Uuid::from_u128(0)).is_some());
        cache.put(loaded(u128::MAX, 1));
        let kept = cache.lock().map.len();
        assert!(kept <= CACHED_STATES / 2 + 1, "{kept} kept");
        assert!(cache.get(Uuid::from_u128(0)).is_some(), "the state used last was dropped");
        assert!(cache.get(Uuid::from_u128(u128::MAX)).is_some(), "the state added last was dropped");
        assert!(cache.get(Uuid::from_u128(1)).is_none(), "the least recently used state was kept");
    }
}
