//! Time travel: any entity's state at any past moment, rebuilt from the global log with the
//! domain's own `apply`.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use understudy_adapters::LoggedEvent;
use understudy_domain::account::AccountAggregate;
use understudy_domain::environment::EnvironmentAggregate;
use understudy_domain::project::ProjectAggregate;
use understudy_domain::pull_request::PullRequestAggregate;
use understudy_domain::user::UserAggregate;
use understudy_domain::Aggregate;
use uuid::Uuid;

use crate::AnyEvent;

/// An entity's state as of a moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StateAt {
    pub id: Uuid,
    pub aggregate_type: String,
    /// How many of its events were recorded by then, and the last one's position.
    pub events: usize,
    pub position: Option<i64>,
    pub state: serde_json::Value,
}

fn fold<A: Aggregate>(events: impl Iterator<Item = A::Event>) -> anyhow::Result<serde_json::Value> {
    let state = events.fold(A::State::default(), |state, event| A::apply(state, &event));
    Ok(serde_json::to_value(state)?)
}

/// The state of `id` from its events recorded at or before `at` (all of them when `at` is `None`).
/// `None` when the entity had no events by then.
pub async fn state_at(pool: &PgPool, id: Uuid, at: Option<DateTime<Utc>>) -> anyhow::Result<Option<StateAt>> {
    let events: Vec<LoggedEvent> =
        understudy_adapters::global_log::history(pool, id).await?.into_iter().filter(|e| at.is_none_or(|at| e.recorded_at <= at)).collect();
    let Some(last) = events.last() else {
        return Ok(None);
    };
    let decoded = events.iter().map(AnyEvent::decode).collect::<Result<Vec<_>, _>>()?;
    macro_rules! only {
        ($variant:ident) => {
            decoded.into_iter().filter_map(|e| if let AnyEvent::$variant(e) = e { Some(e) } else { None })
        };
    }
    let state = match last.aggregate_type.as_str() {
        AccountAggregate::NAME => fold::<AccountAggregate>(only!(Account))?,
        ProjectAggregate::NAME => fold::<ProjectAggregate>(only!(Project))?,
        EnvironmentAggregate::NAME => fold::<EnvironmentAggregate>(only!(Environment))?,
        PullRequestAggregate::NAME => fold::<PullRequestAggregate>(only!(PullRequest))?,
        UserAggregate::NAME => fold::<UserAggregate>(only!(User))?,
        other => anyhow::bail!("unknown aggregate type {other:?}"),
    };
    Ok(Some(StateAt { id, aggregate_type: last.aggregate_type.clone(), events: events.len(), position: Some(last.position), state }))
}
