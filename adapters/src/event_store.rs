//! The command path: load an aggregate from its esrs table, decide, append with an optimistic
//! version check, and retry on fresh state when another writer got there first.

use std::marker::PhantomData;
use std::time::Duration;

use esrs::store::postgres::{PgStore, PgStoreBuilder, PgStoreError};
use esrs::store::{EventStore as _, StoreEvent};
use esrs::AggregateState;
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

use crate::global_log::GlobalLog;
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

/// The event store of one aggregate type.
pub struct AggregateStore<A: Aggregate> {
    store: PgStore<Es<A>>,
}

impl<A: Aggregate> Clone for AggregateStore<A> {
    fn clone(&self) -> Self {
        Self { store: self.store.clone() }
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
        let store = PgStoreBuilder::<Es<A>>::new(pool)
            .without_running_migrations()
            .add_transactional_event_handler(GlobalLog::<A>::default())
            .add_transactional_event_handler(crate::access_index::AccessIndex::<A>::default())
            .try_build()
            .await?;
        Ok(Self { store })
    }

    /// The current state of `id` (the default state when it has no events yet).
    pub async fn load(&self, id: Uuid) -> Result<AggregateState<A::State>, PgStoreError> {
        let events = self.store.by_aggregate_id(id).await?;
        Ok(AggregateState::with_id(id).apply_store_events(events, <Es<A> as esrs::Aggregate>::apply_event))
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

    async fn execute_with_retries(&self, id: Uuid, command: A::Command, meta: Metadata) -> Result<Executed<A>, CommandError> {
        for attempt in 1..=MAX_ATTEMPTS {
            let mut state = self.load(id).await?;
            let events =
                <Es<A> as esrs::Aggregate>::handle_command(state.inner(), Envelope { meta: meta.clone(), command: command.clone() })?;
            if events.is_empty() {
                return Ok(Executed { state: state.into_inner(), events: vec![] });
            }
            match self.store.persist(&mut state, events).await {
                Ok(stored) => {
                    let state = stored.iter().fold(state.into_inner(), |state, e| A::apply(state, &e.payload.event));
                    return Ok(Executed { state, events: stored });
                }
                Err(error) if is_conflict(&error) => {
                    METRICS.append_conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::debug!(aggregate = A::NAME, %id, attempt, "append conflict; retrying on fresh state");
                    tokio::time::sleep(backoff(attempt)).await;
                }
                Err(error) => return Err(error.into()),
            }
        }
        Err(CommandError::Conflict { aggregate_id: id, attempts: MAX_ATTEMPTS })
    }
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
        Ok(Self {
            accounts: AggregateStore::new(pool.clone()).await?,
            projects: AggregateStore::new(pool.clone()).await?,
            environments: AggregateStore::new(pool.clone()).await?,
            pull_requests: AggregateStore::new(pool.clone()).await?,
            users: AggregateStore::new(pool.clone()).await?,
            pool,
        })
    }
}
