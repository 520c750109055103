//! The PullRequest aggregate: what GitHub last told us about one pull request, and which
//! entrypoints its head commit has. Deliveries may arrive late, twice or out of order: an
//! observation older than the last one applied changes nothing.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{ProjectId, PullRequestId};
use crate::values::{BranchName, CommitSha, Entrypoint};
use crate::{Aggregate, DomainError, DomainEvent};

const PULL_REQUEST_NAMESPACE: Uuid = Uuid::from_u128(0x1c9e_44a0_0b7d_4e58_8a8e_5f3f_6b2d_91c4);

impl PullRequestId {
    /// The one id of pull request `number` of `project`.
    pub fn derive(project: ProjectId, number: u64) -> Self {
        Self(Uuid::new_v5(&PULL_REQUEST_NAMESPACE, format!("{project}|{number}").as_bytes()))
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    pub id: Option<PullRequestId>,
    pub project_id: Option<ProjectId>,
    pub number: u64,
    pub head_branch: Option<BranchName>,
    pub base_branch: Option<BranchName>,
    pub head_sha: Option<CommitSha>,
    pub entrypoints: Vec<Entrypoint>,
    pub open: bool,
    pub merged: bool,
    /// Its head lives in a fork: its previews get no secrets.
    #[serde(default)]
    pub from_fork: bool,
    /// GitHub's `updated_at` of the newest observation applied.
    pub updated_at: Option<DateTime<Utc>>,
}

/// What a webhook says the pull request looks like now.
#[derive(Debug, Clone, PartialEq)]
pub struct Observation {
    pub pull_request_id: PullRequestId,
    pub project_id: ProjectId,
    pub number: u64,
    pub head_branch: BranchName,
    pub base_branch: BranchName,
    pub head_sha: CommitSha,
    /// The entrypoints found at `head_sha`.
    pub entrypoints: Vec<Entrypoint>,
    pub open: bool,
    pub merged: bool,
    /// The head repository is not the base repository.
    pub from_fork: bool,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum PullRequestCommand {
    Observe(Observation),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum PullRequestEvent {
    PullRequestOpened {
        pull_request_id: PullRequestId,
        project_id: ProjectId,
        number: u64,
        head_branch: BranchName,
        base_branch: BranchName,
        head_sha: CommitSha,
        entrypoints: Vec<Entrypoint>,
        /// Added after the first release; absent means not from a fork.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        from_fork: bool,
        updated_at: DateTime<Utc>,
    },
    PullRequestSynchronized {
        head_sha: CommitSha,
        entrypoints: Vec<Entrypoint>,
        updated_at: DateTime<Utc>,
    },
    PullRequestRetargeted {
        base_branch: BranchName,
        updated_at: DateTime<Utc>,
    },
    PullRequestClosed {
        merged: bool,
        updated_at: DateTime<Utc>,
    },
    PullRequestReopened {
        updated_at: DateTime<Utc>,
    },
}

impl DomainEvent for PullRequestEvent {
    const SCHEMA_VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        match self {
            Self::PullRequestOpened { .. } => "PullRequestOpened",
            Self::PullRequestSynchronized { .. } => "PullRequestSynchronized",
            Self::PullRequestRetargeted { .. } => "PullRequestRetargeted",
            Self::PullRequestClosed { .. } => "PullRequestClosed",
            Self::PullRequestReopened { .. } => "PullRequestReopened",
        }
    }
}

pub struct PullRequestAggregate;

impl Aggregate for PullRequestAggregate {
    const NAME: &'static str = "pull_request";
    type State = PullRequest;
    type Command = PullRequestCommand;
    type Event = PullRequestEvent;

    fn decide(state: &PullRequest, command: PullRequestCommand) -> Result<Vec<PullRequestEvent>, DomainError> {
        use PullRequestEvent as E;
        let PullRequestCommand::Observe(seen) = command;
        if seen.pull_request_id != PullRequestId::derive(seen.project_id, seen.number) {
            return Err(DomainError::invalid("pull_request_id", "does not belong to this project and number"));
        }
        let Some(last) = state.updated_at else {
            let mut events = vec![E::PullRequestOpened {
                pull_request_id: seen.pull_request_id,
                project_id: seen.project_id,
                number: seen.number,
                head_branch: seen.head_branch,
                base_branch: seen.base_branch,
                head_sha: seen.head_sha,
                entrypoints: seen.entrypoints,
                from_fork: seen.from_fork,
                updated_at: seen.updated_at,
            }];
            if !seen.open {
                events.push(E::PullRequestClosed { merged: seen.merged, updated_at: seen.updated_at });
            }
            return Ok(events);
        };
        if seen.updated_at < last {
            // A late delivery: what it says is already superseded.
            return Ok(vec![]);
        }
        let mut events = Vec::new();
        if seen.open && !state.open {
            events.push(E::PullRequestReopened { updated_at: seen.updated_at });
        }
        if state.head_sha.as_ref() != Some(&seen.head_sha) || state.entrypoints != seen.entrypoints {
            events.push(E::PullRequestSynchronized { head_sha: seen.head_sha, entrypoints: seen.entrypoints, updated_at: seen.updated_at });
        }
        if state.base_branch.as_ref() != Some(&seen.base_branch) {
            events.push(E::PullRequestRetargeted { base_branch: seen.base_branch, updated_at: seen.updated_at });
        }
        if !seen.open && state.open {
            events.push(E::PullRequestClosed { merged: seen.merged, updated_at: seen.updated_at });
        }
        Ok(events)
    }

    fn apply(mut state: PullRequest, event: &PullRequestEvent) -> PullRequest {
        use PullRequestEvent as E;
        match event {
            E::PullRequestOpened {
                pull_request_id,
                project_id,
                number,
                head_branch,
                base_branch,
                head_sha,
                entrypoints,
                from_fork,
                updated_at,
            } => {
                state.from_fork = *from_fork;
                state.id = Some(*pull_request_id);
                state.project_id = Some(*project_id);
                state.number = *number;
                state.head_branch = Some(head_branch.clone());
                state.base_branch = Some(base_branch.clone());
                state.head_sha = Some(head_sha.clone());
                state.entrypoints = entrypoints.clone();
                state.open = true;
                state.updated_at = Some(*updated_at);
            }
            E::PullRequestSynchronized { head_sha, entrypoints, updated_at } => {
                state.head_sha = Some(head_sha.clone());
                state.entrypoints = entrypoints.clone();
                state.updated_at = Some(*updated_at);
            }
            E::PullRequestRetargeted { base_branch, updated_at } => {
                state.base_branch = Some(base_branch.clone());
                state.updated_at = Some(*updated_at);
            }
            E::PullRequestClosed { merged, updated_at } => {
                state.open = false;
                state.merged = *merged;
                state.updated_at = Some(*updated_at);
            }
            E::PullRequestReopened { updated_at } => {
                state.open = true;
                state.merged = false;
                state.updated_at = Some(*updated_at);
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use chrono::TimeZone;
    use PullRequestEvent as E;

    fn t(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 12, minute, 0).single().expect("valid date")
    }
    fn project() -> ProjectId {
        ProjectId(Uuid::from_u128(3))
    }
    fn sha(c: char) -> CommitSha {
        CommitSha::parse(c.to_string().repeat(40)).expect("valid")
    }
    fn main_w() -> Vec<Entrypoint> {
        vec![Entrypoint::parse("main.w").expect("valid")]
    }
    fn seen(c: char, open: bool, minute: u32) -> PullRequestCommand {
        PullRequestCommand::Observe(Observation {
            pull_request_id: PullRequestId::derive(project(), 2),
            project_id: project(),
            number: 2,
            head_branch: BranchName::parse("feature").expect("valid"),
            base_branch: BranchName::parse("main").expect("valid"),
            head_sha: sha(c),
            entrypoints: main_w(),
            open,
            merged: false,
            from_fork: false,
            updated_at: t(minute),
        })
    }
    fn opened(c: char, minute: u32) -> E {
        E::PullRequestOpened {
            pull_request_id: PullRequestId::derive(project(), 2),
            project_id: project(),
            number: 2,
            head_branch: BranchName::parse("feature").expect("valid"),
            base_branch: BranchName::parse("main").expect("valid"),
            head_sha: sha(c),
            entrypoints: main_w(),
            from_fork: false,
            updated_at: t(minute),
        }
    }

    #[test]
    fn observations_in_order() {
        given::<PullRequestAggregate>(&[]).when(seen('a', true, 1)).then(&[opened('a', 1)]);
        given::<PullRequestAggregate>(&[opened('a', 1)]).when(seen('b', true, 2)).then(&[E::PullRequestSynchronized {
            head_sha: sha('b'),
            entrypoints: main_w(),
            updated_at: t(2),
        }]);
        let closed = E::PullRequestClosed { merged: false, updated_at: t(3) };
        given::<PullRequestAggregate>(&[opened('a', 1)]).when(seen('a', false, 3)).then(std::slice::from_ref(&closed));
        let state = given::<PullRequestAggregate>(&[opened('a', 1), closed])
            .when(seen('a', true, 4))
            .then(&[E::PullRequestReopened { updated_at: t(4) }]);
        assert!(state.open);
    }

    #[test]
    fn late_and_repeated_deliveries_change_nothing() {
        let history = [opened('a', 1), E::PullRequestSynchronized { head_sha: sha('b'), entrypoints: main_w(), updated_at: t(5) }];
        given::<PullRequestAggregate>(&history).when(seen('a', true, 1)).then(&[]);
        given::<PullRequestAggregate>(&history).when(seen('b', true, 5)).then(&[]);
        given::<PullRequestAggregate>(&history).when(seen('c', false, 4)).then(&[]);
    }

    #[test]
    fn a_first_sight_of_a_closed_pull_request_records_both() {
        given::<PullRequestAggregate>(&[])
            .when(seen('a', false, 9))
            .then(&[opened('a', 9), E::PullRequestClosed { merged: false, updated_at: t(9) }]);
    }

    #[test]
    fn a_foreign_id_is_refused() {
        let PullRequestCommand::Observe(mut o) = seen('a', true, 1);
        o.pull_request_id = PullRequestId(Uuid::nil());
        given::<PullRequestAggregate>(&[]).when(PullRequestCommand::Observe(o)).then_error(|e| matches!(e, DomainError::Invalid { .. }));
    }
}
