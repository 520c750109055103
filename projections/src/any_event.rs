//! Any event of the log, decoded by its aggregate type. An event this build cannot decode is an
//! error naming its position: projectors stop on it, they never skip it.

use understudy_adapters::LoggedEvent;
use understudy_domain::account::{AccountAggregate, AccountEvent};
use understudy_domain::environment::{EnvironmentAggregate, EnvironmentEvent};
use understudy_domain::project::{ProjectAggregate, ProjectEvent};
use understudy_domain::pull_request::{PullRequestAggregate, PullRequestEvent};
use understudy_domain::user::{UserAggregate, UserEvent};
use understudy_domain::Aggregate;

use crate::ProjectionError;

#[derive(Debug, Clone, PartialEq)]
pub enum AnyEvent {
    Account(AccountEvent),
    Project(ProjectEvent),
    Environment(EnvironmentEvent),
    PullRequest(PullRequestEvent),
    User(UserEvent),
}

impl AnyEvent {
    pub fn decode(logged: &LoggedEvent) -> Result<Self, ProjectionError> {
        match logged.aggregate_type.as_str() {
            AccountAggregate::NAME => logged.decode().map(Self::Account),
            ProjectAggregate::NAME => logged.decode().map(Self::Project),
            EnvironmentAggregate::NAME => logged.decode().map(Self::Environment),
            PullRequestAggregate::NAME => logged.decode().map(Self::PullRequest),
            UserAggregate::NAME => logged.decode().map(Self::User),
            other => return Err(ProjectionError::undecodable(logged, format!("unknown aggregate type {other:?}"))),
        }
        .map_err(|e| ProjectionError::undecodable(logged, e.to_string()))
    }
}
