//! Property tests: any sequence of commands, legal or not, keeps each aggregate's invariants, and
//! decide never panics. Refused commands change nothing.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use uuid::Uuid;

use crate::account::{AccountAggregate, AccountCommand, AccountKind};
use crate::environment::{DeploymentStatus, EnvironmentAggregate, EnvironmentCommand, EnvironmentSpec, FailedStage, TestOutcome};
use crate::ids::{AccountId, DeploymentId, EnvironmentId, ProjectId, UserId};
use crate::permissions::Role;
use crate::values::{BranchName, CommitSha, Entrypoint, Target};
use crate::Aggregate;

fn at(n: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).single().expect("valid date") + chrono::Duration::seconds(i64::from(n))
}

fn spec() -> EnvironmentSpec {
    EnvironmentSpec {
        project_id: ProjectId(Uuid::from_u128(1)),
        target: Target::PullRequest { number: 1, head_branch: BranchName::parse("f").expect("valid") },
        entrypoint: Entrypoint::parse("main.w").expect("valid"),
    }
}

/// A command over a small space of deployments and commits, so that sequences collide often.
fn environment_command() -> impl Strategy<Value = (u8, u8, u8)> {
    (0u8..19, 0u8..4, 0u8..3)
}

fn to_command(kind: u8, deployment: u8, commit: u8, n: u32) -> EnvironmentCommand {
    let d = DeploymentId(Uuid::from_u128(u128::from(deployment) + 100));
    let s = spec();
    match kind {
        0 | 1 => EnvironmentCommand::RequestDeployment {
            awaiting_approval: false,
            environment_id: EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint),
            spec: s,
            deployment_id: d,
            commit: CommitSha::parse(format!("{commit:040x}")).expect("valid"),
            at: at(n),
        },
        2 => EnvironmentCommand::StartBuild { deployment_id: d, at: at(n) },
        3 => EnvironmentCommand::CompleteBuild { deployment_id: d, at: at(n) },
        4 => EnvironmentCommand::MarkReady { deployment_id: d, url: "http://p".into(), at: at(n) },
        5 => EnvironmentCommand::MarkFailed {
            deployment_id: d,
            stage: if commit == 0 { FailedStage::Build } else { FailedStage::Start },
            reason: "x".into(),
            at: at(n),
        },
        6 => EnvironmentCommand::RecordTestResult {
            deployment_id: d,
            test: format!("t{commit}"),
            outcome: if commit == 1 { TestOutcome::Failed } else { TestOutcome::Passed },
            duration_ms: None,
            at: at(n),
        },
        7 => EnvironmentCommand::Deactivate { at: at(n) },
        8 => EnvironmentCommand::Wake { deployment_id: d, at: at(n) },
        9 => EnvironmentCommand::Promote {
            environment_id: EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint),
            spec: s,
            deployment_id: d,
            commit: CommitSha::parse(format!("{commit:040x}")).expect("valid"),
            from_environment: EnvironmentId(Uuid::from_u128(7)),
            from_deployment: DeploymentId(Uuid::from_u128(u128::from(commit) + 200)),
            by: "someone".into(),
            at: at(n),
        },
        10 => EnvironmentCommand::Rollback {
            deployment_id: d,
            to: DeploymentId(Uuid::from_u128(u128::from(commit) + 100)),
            by: "someone".into(),
            at: at(n),
        },
        11 => EnvironmentCommand::CompleteTests { deployment_id: d, at: at(n) },
        12 => EnvironmentCommand::RequestJobRun {
            job: "j".into(),
            slot: at(u32::from(commit) * 10 + n / 4),
            run_id: Uuid::from_u128(u128::from(deployment) + 300),
            at: at(n),
        },
        13 => EnvironmentCommand::StartJobRun { job: "j".into(), run_id: Uuid::from_u128(u128::from(deployment) + 300), at: at(n) },
        14 => EnvironmentCommand::FinishJobRun {
            job: "j".into(),
            run_id: Uuid::from_u128(u128::from(deployment) + 300),
            succeeded: commit == 0,
            detail: String::new(),
            at: at(n),
        },
        15 => EnvironmentCommand::OpenDebugSession {
            session_id: Uuid::from_u128(u128::from(deployment) + 400),
            token_sha256: "ab".repeat(32),
            expires_at: at(n + u32::from(commit) * 5 + 1),
            by: "someone".into(),
            at: at(n),
        },
        16 => EnvironmentCommand::CloseDebugSession {
            session_id: Uuid::from_u128(u128::from(deployment) + 400),
            reason: "done".into(),
            by: "someone".into(),
            at: at(n),
        },
        17 => EnvironmentCommand::RecordDebugAccess {
            session_id: Uuid::from_u128(u128::from(deployment) + 400),
            what: "files".into(),
            by: "someone".into(),
            at: at(n),
        },
        _ => EnvironmentCommand::Terminate { reason: "closed".into(), at: at(n) },
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn environments_keep_their_invariants(commands in proptest::collection::vec(environment_command(), 0..60)) {
        let mut state = <EnvironmentAggregate as Aggregate>::State::default();
        for (n, (kind, deployment, commit)) in commands.into_iter().enumerate() {
            let before = state.clone();
            match EnvironmentAggregate::decide(&state, to_command(kind, deployment, commit, n as u32)) {
                Ok(events) => state = events.iter().fold(state, EnvironmentAggregate::apply),
                Err(_) => prop_assert_eq!(&state, &before),
            }
            // At most one deployment in flight, and only the newest one.
            let in_flight: Vec<_> = state.deployments.iter().filter(|d| d.status.in_flight()).collect();
            prop_assert!(in_flight.len() <= 1, "{:?}", state.deployments);
            if let Some(d) = in_flight.first() {
                prop_assert_eq!(Some(d.id), state.current().map(|c| c.id));
            }
            // Deployment ids are unique, and a superseded deployment is never the current one.
            let mut ids: Vec<_> = state.deployments.iter().map(|d| d.id).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), state.deployments.len());
            if let Some(current) = state.current() {
                prop_assert_ne!(current.status, DeploymentStatus::Superseded);
            }
            // Tests are only ever recorded on deployments that became Ready, once per name.
            for d in &state.deployments {
                let mut names: Vec<_> = d.tests.iter().map(|t| &t.name).collect();
                names.sort();
                names.dedup();
                prop_assert_eq!(names.len(), d.tests.len());
                prop_assert!(d.tests.is_empty() || d.url.is_some(), "{:?}", d);
            }
            // Only a Ready deployment has its tests completed; a rollback names an earlier deployment.
            for (i, d) in state.deployments.iter().enumerate() {
                prop_assert!(!d.tests_completed || d.url.is_some(), "{:?}", d);
                if let Some(to) = d.rolled_back_to {
                    prop_assert!(state.deployments[..i].iter().any(|e| e.id == to), "{:?}", state.deployments);
                }
            }
            // A job has one run at most, waiting or going; its slots only move forward.
            for job in state.jobs.values() {
                prop_assert!(job.requested.is_none() || job.running.is_none(), "{:?}", job);
            }
            if let (Some(b), Some(a)) = (before.jobs.get("j").and_then(|j| j.last_slot), state.jobs.get("j").and_then(|j| j.last_slot)) {
                prop_assert!(a >= b);
            }
            // Debug sessions are of recorded deployments, never more open at once than allowed.
            for session in state.debug_sessions.values() {
                prop_assert!(state.deployment(session.deployment_id).is_some(), "{:?}", session);
            }
            let open = state.debug_sessions.values().filter(|s| s.expires_at > at(n as u32)).count();
            prop_assert!(open <= crate::environment::MAX_DEBUG_SESSIONS, "{:?}", state.debug_sessions);
            // Status is defined exactly when the environment exists.
            prop_assert_eq!(state.status().is_some(), state.spec.is_some());
        }
    }

    #[test]
    fn a_team_never_loses_its_last_owner(commands in proptest::collection::vec((0u8..4, 0u8..4, 0u8..4), 0..60)) {
        let user = |n: u8| UserId(Uuid::from_u128(u128::from(n) + 1));
        let role = |n: u8| [Role::Owner, Role::Admin, Role::Member, Role::Billing][usize::from(n % 4)];
        let mut state = AccountAggregate::replay(&[]);
        let created = AccountAggregate::decide(&state, AccountCommand::Create {
            account_id: AccountId(Uuid::from_u128(9)),
            kind: AccountKind::Team { name: "team".into() },
            creator: user(0),
            at: at(0),
        }).expect("create");
        state = created.iter().fold(state, AccountAggregate::apply);
        for (n, (kind, who, r)) in commands.into_iter().enumerate() {
            let command = match kind {
                0 => AccountCommand::AddMember { user_id: user(who), role: role(r), at: at(n as u32) },
                1 => AccountCommand::ChangeRole { user_id: user(who), role: role(r), at: at(n as u32) },
                2 => AccountCommand::RemoveMember { user_id: user(who), at: at(n as u32) },
                _ => AccountCommand::LinkInstallation { installation_id: u64::from(r), at: at(n as u32) },
            };
            let before = state.clone();
            match AccountAggregate::decide(&state, command) {
                Ok(events) => state = events.iter().fold(state, AccountAggregate::apply),
                Err(_) => prop_assert_eq!(&state, &before),
            }
            prop_assert!(state.members.iter().any(|m| m.role == Role::Owner), "{:?}", state.members);
            let mut ids: Vec<_> = state.members.iter().map(|m| m.user_id).collect();
            ids.sort();
            ids.dedup();
            prop_assert_eq!(ids.len(), state.members.len(), "one membership per user");
        }
    }
}
