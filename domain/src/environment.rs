//! The Environment aggregate: project × branch or PR × entrypoint, with one deployment per
//! commit and the test results of each deployment.
//!
//! Lifecycle of a deployment: `Requested → Building → Starting → Ready | Failed`; a newer commit
//! supersedes a deployment still in flight. The environment itself can be deactivated (`Stale`,
//! woken by the next commit or visit) and `Terminated` (PR closed, branch deleted).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::{DeploymentId, EnvironmentId, ProjectId};
use crate::values::{CommitSha, Entrypoint, Target};
use crate::{Aggregate, DomainError, DomainEvent};

/// Namespace of the deterministic environment ids (UUID v5).
const ENVIRONMENT_NAMESPACE: Uuid = Uuid::from_u128(0x5d2b_8c1e_7a43_4f0b_9e6d_2c71_a8f0_3b19);

impl EnvironmentId {
    /// The one id of an environment: the same project, target and entrypoint always give the
    /// same environment, so a redelivered webhook finds the environment it already made.
    pub fn derive(project: ProjectId, target: &Target, entrypoint: &Entrypoint) -> Self {
        let name = format!("{}|{}|{}", project, target.key(), entrypoint);
        Self(Uuid::new_v5(&ENVIRONMENT_NAMESPACE, name.as_bytes()))
    }
}

/// Where one deployment is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeploymentStatus {
    Requested,
    /// A pull request from a fork: nothing is built until a maintainer approves the commit.
    AwaitingApproval,
    Building,
    Starting,
    Ready,
    Failed,
    /// A newer commit arrived before this one finished.
    Superseded,
}

impl DeploymentStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "Requested",
            Self::AwaitingApproval => "AwaitingApproval",
            Self::Building => "Building",
            Self::Starting => "Starting",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
            Self::Superseded => "Superseded",
        }
    }

    pub fn in_flight(self) -> bool {
        matches!(self, Self::Requested | Self::AwaitingApproval | Self::Building | Self::Starting)
    }
}

/// What users see of an environment: its current deployment's status, unless the environment
/// itself is deactivated or gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnvironmentStatus {
    Requested,
    /// Its commit waits for a maintainer's approval (a pull request from a fork).
    AwaitingApproval,
    Building,
    Starting,
    Ready,
    Failed,
    Stale,
    Terminated,
}

impl EnvironmentStatus {
    pub const ALL: [EnvironmentStatus; 8] =
        [Self::Requested, Self::AwaitingApproval, Self::Building, Self::Starting, Self::Ready, Self::Failed, Self::Stale, Self::Terminated];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requested => "Requested",
            Self::AwaitingApproval => "AwaitingApproval",
            Self::Building => "Building",
            Self::Starting => "Starting",
            Self::Ready => "Ready",
            Self::Failed => "Failed",
            Self::Stale => "Stale",
            Self::Terminated => "Terminated",
        }
    }

    /// The inverse of [`Self::as_str`], for read models that store the name.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailedStage {
    Build,
    Start,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestOutcome {
    Passed,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestResult {
    pub name: String,
    pub outcome: TestOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    pub at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub id: DeploymentId,
    pub commit: CommitSha,
    pub status: DeploymentStatus,
    pub requested_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub url: Option<String>,
    pub failure: Option<String>,
    /// Latest result per test name, in the order tests first reported.
    pub tests: Vec<TestResult>,
    /// Why its health check fails, while it does (a serving deployment only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unhealthy: Option<String>,
    /// The latest test run asked for on demand, until a worker runs it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_run_requested: Option<Uuid>,
    /// A restart of its app asked for, until the serving worker does it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_requested: Option<Uuid>,
    /// Its tests have all reported (the latest run's, for a deployment tested again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tests_completed: bool,
    /// The deployment of another tier it was promoted from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_from: Option<DeploymentId>,
    /// The earlier deployment of this environment it rolled back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back_to: Option<DeploymentId>,
    /// The branch its commit was pushed to once it passed (its tier's `push_to`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pushed_to: Option<String>,
}

impl Deployment {
    /// Ready, every test reported, none failed: what promotion asks of a commit.
    pub fn passed(&self) -> bool {
        self.status == DeploymentStatus::Ready
            && self.tests_completed
            && self.unhealthy.is_none()
            && self.tests.iter().all(|t| t.outcome == TestOutcome::Passed)
    }
}

/// The spec of an environment as it was created.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvironmentSpec {
    pub project_id: ProjectId,
    pub target: Target,
    pub entrypoint: Entrypoint,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub id: Option<EnvironmentId>,
    pub spec: Option<EnvironmentSpec>,
    pub deactivated: bool,
    pub terminated: bool,
    /// Every deployment, oldest first; the last one is the current one.
    pub deployments: Vec<Deployment>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Its tier's scheduled jobs, by name: where each one's schedule has got to.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub jobs: std::collections::BTreeMap<String, JobState>,
    /// Debug sessions open now, by id (closed ones live on in the history only).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub debug_sessions: std::collections::BTreeMap<Uuid, DebugSession>,
}

/// A debug session: a fresh instance of a failed deployment, reached through a tunnel that
/// only the holder of its token passes, until it expires or is closed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugSession {
    pub deployment_id: DeploymentId,
    /// SHA-256 (hex) of the tunnel's token; the token itself is shown once and kept nowhere.
    pub token_sha256: String,
    pub expires_at: DateTime<Utc>,
    pub by: String,
    pub opened_at: DateTime<Utc>,
}

/// Debug sessions one environment may have open at once.
pub const MAX_DEBUG_SESSIONS: usize = 3;
/// The longest a debug session may be opened for.
pub const MAX_DEBUG_MINUTES: i64 = 240;

/// One scheduled job in one environment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// The latest schedule slot dealt with (run or skipped).
    pub last_slot: Option<DateTime<Utc>>,
    /// A run asked for, until the serving worker starts it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<Uuid>,
    /// The run going now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<Uuid>,
}

impl Environment {
    pub fn current(&self) -> Option<&Deployment> {
        self.deployments.last()
    }

    pub fn deployment(&self, id: DeploymentId) -> Option<&Deployment> {
        self.deployments.iter().find(|d| d.id == id)
    }

    /// `None` before the environment exists.
    pub fn status(&self) -> Option<EnvironmentStatus> {
        self.spec.as_ref()?;
        if self.terminated {
            return Some(EnvironmentStatus::Terminated);
        }
        if self.deactivated {
            return Some(EnvironmentStatus::Stale);
        }
        let Some(current) = self.current() else {
            return Some(EnvironmentStatus::Requested);
        };
        Some(match current.status {
            DeploymentStatus::Requested | DeploymentStatus::Superseded => EnvironmentStatus::Requested,
            DeploymentStatus::AwaitingApproval => EnvironmentStatus::AwaitingApproval,
            DeploymentStatus::Building => EnvironmentStatus::Building,
            DeploymentStatus::Starting => EnvironmentStatus::Starting,
            DeploymentStatus::Ready => EnvironmentStatus::Ready,
            DeploymentStatus::Failed => EnvironmentStatus::Failed,
        })
    }

    fn deployment_mut(&mut self, id: DeploymentId) -> Option<&mut Deployment> {
        self.deployments.iter_mut().find(|d| d.id == id)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum EnvironmentCommand {
    /// Deploy `commit`: creates the environment on first use, supersedes a deployment in flight,
    /// wakes a stale or terminated environment. Asking again for the commit already current is a
    /// no-op (webhooks are redelivered).
    RequestDeployment {
        environment_id: EnvironmentId,
        spec: EnvironmentSpec,
        deployment_id: DeploymentId,
        commit: CommitSha,
        /// Build nothing until a maintainer approves (a pull request from a fork).
        awaiting_approval: bool,
        at: DateTime<Utc>,
    },
    /// Deploy to a promoted tier's environment a commit whose deployment passed in the tier it
    /// is promoted from. Promoting the commit already current changes nothing.
    Promote {
        environment_id: EnvironmentId,
        spec: EnvironmentSpec,
        deployment_id: DeploymentId,
        commit: CommitSha,
        from_environment: EnvironmentId,
        from_deployment: DeploymentId,
        /// Who promoted: a person, or `system:promoter` for an automatic promotion.
        by: String,
        at: DateTime<Utc>,
    },
    /// Deploy again the commit of an earlier deployment that was Ready.
    Rollback {
        deployment_id: DeploymentId,
        to: DeploymentId,
        by: String,
        at: DateTime<Utc>,
    },
    /// Opens a debug session on the current deployment, which failed (to build, to start, or a
    /// test): a fresh instance of it and a tunnel to its port until `expires_at`.
    OpenDebugSession {
        session_id: Uuid,
        token_sha256: String,
        expires_at: DateTime<Utc>,
        by: String,
        at: DateTime<Utc>,
    },
    /// Ends a debug session: closed by someone, expired, or its environment is gone. Closing one
    /// already closed changes nothing.
    CloseDebugSession {
        session_id: Uuid,
        reason: String,
        by: String,
        at: DateTime<Utc>,
    },
    /// Someone read a debug session's file listing or logs (`what`), for the audit trail.
    RecordDebugAccess {
        session_id: Uuid,
        what: String,
        by: String,
        at: DateTime<Utc>,
    },
    /// The schedule of job `job` reached `slot`: run it, unless its last run is still going (then
    /// the slot is skipped: two runs of one job never overlap). A slot dealt with changes nothing.
    RequestJobRun {
        job: String,
        slot: DateTime<Utc>,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    /// The serving worker started the requested run.
    StartJobRun {
        job: String,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    /// The run ended: `succeeded`, or why not.
    FinishJobRun {
        job: String,
        run_id: Uuid,
        succeeded: bool,
        detail: String,
        at: DateTime<Utc>,
    },
    /// The deployment passed and its commit was pushed to `branch` (its tier's `push_to`).
    RecordPush {
        deployment_id: DeploymentId,
        branch: String,
        at: DateTime<Utc>,
    },
    /// Every test of the deployment (or of its latest test run) has reported.
    CompleteTests {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    /// A maintainer lets a deployment that awaits approval be built.
    ApproveDeployment {
        deployment_id: DeploymentId,
        /// Who approved, for the audit trail.
        by: String,
        at: DateTime<Utc>,
    },
    StartBuild {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    /// A worker took the requested test run.
    StartTestRun {
        deployment_id: DeploymentId,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    /// The build finished; the app is starting.
    CompleteBuild {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    MarkReady {
        deployment_id: DeploymentId,
        url: String,
        at: DateTime<Utc>,
    },
    MarkFailed {
        deployment_id: DeploymentId,
        stage: FailedStage,
        reason: String,
        at: DateTime<Utc>,
    },
    RecordTestResult {
        deployment_id: DeploymentId,
        test: String,
        outcome: TestOutcome,
        /// How long the test ran, when the runner says.
        duration_ms: Option<u64>,
        at: DateTime<Utc>,
    },
    /// What the health check of a serving deployment says now; only a change is recorded.
    ReportHealth {
        deployment_id: DeploymentId,
        healthy: bool,
        detail: String,
        at: DateTime<Utc>,
    },
    /// Run the tests of a Ready deployment again, in fresh instances (`run_id` names the run).
    RequestTestRun {
        deployment_id: DeploymentId,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    /// Restart the app of a Ready deployment (same build, a fresh process).
    RequestRestart {
        deployment_id: DeploymentId,
        restart_id: Uuid,
        at: DateTime<Utc>,
    },
    /// The serving worker took the requested restart.
    StartRestart {
        deployment_id: DeploymentId,
        restart_id: Uuid,
        at: DateTime<Utc>,
    },
    /// Idle too long: stop it; the next commit or visit brings it back.
    Deactivate {
        at: DateTime<Utc>,
    },
    /// Someone asks for the current commit to be built and started again (a redeploy): a new
    /// deployment of it, superseding one in flight, waking a stale environment. A commit still
    /// awaiting approval keeps waiting.
    Redeploy {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    /// A visit to a stale environment: redeploy its latest commit.
    Wake {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    Terminate {
        reason: String,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum EnvironmentEvent {
    EnvironmentCreated {
        environment_id: EnvironmentId,
        spec: EnvironmentSpec,
        at: DateTime<Utc>,
    },
    DeploymentRequested {
        deployment_id: DeploymentId,
        commit: CommitSha,
        /// Added without a schema version: older events lack it and mean `false`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        awaiting_approval: bool,
        at: DateTime<Utc>,
    },
    DeploymentApproved {
        deployment_id: DeploymentId,
        by: String,
        at: DateTime<Utc>,
    },
    /// Recorded right after the `DeploymentRequested` it explains.
    DeploymentPromoted {
        deployment_id: DeploymentId,
        from_environment: EnvironmentId,
        from_deployment: DeploymentId,
        by: String,
        at: DateTime<Utc>,
    },
    /// Recorded right after the `DeploymentRequested` it explains.
    RolledBack {
        deployment_id: DeploymentId,
        to: DeploymentId,
        by: String,
        at: DateTime<Utc>,
    },
    TestsCompleted {
        deployment_id: DeploymentId,
        passed: u32,
        failed: u32,
        at: DateTime<Utc>,
    },
    CommitPushed {
        deployment_id: DeploymentId,
        branch: String,
        at: DateTime<Utc>,
    },
    JobRunRequested {
        job: String,
        slot: DateTime<Utc>,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    DebugSessionOpened {
        session_id: Uuid,
        deployment_id: DeploymentId,
        token_sha256: String,
        expires_at: DateTime<Utc>,
        by: String,
        at: DateTime<Utc>,
    },
    DebugSessionClosed {
        session_id: Uuid,
        reason: String,
        by: String,
        at: DateTime<Utc>,
    },
    DebugAccessed {
        session_id: Uuid,
        what: String,
        by: String,
        at: DateTime<Utc>,
    },
    JobRunSkipped {
        job: String,
        slot: DateTime<Utc>,
        reason: String,
        at: DateTime<Utc>,
    },
    JobRunStarted {
        job: String,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    JobRunFinished {
        job: String,
        run_id: Uuid,
        succeeded: bool,
        detail: String,
        at: DateTime<Utc>,
    },
    DeploymentSuperseded {
        deployment_id: DeploymentId,
        by: DeploymentId,
        at: DateTime<Utc>,
    },
    BuildStarted {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    BuildSucceeded {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    DeploymentReady {
        deployment_id: DeploymentId,
        url: String,
        at: DateTime<Utc>,
    },
    DeploymentFailed {
        deployment_id: DeploymentId,
        stage: FailedStage,
        reason: String,
        at: DateTime<Utc>,
    },
    TestPassed {
        deployment_id: DeploymentId,
        test: String,
        /// Added after the first release: events recorded before it have none (no upcast needed).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        at: DateTime<Utc>,
    },
    TestFailed {
        deployment_id: DeploymentId,
        test: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        duration_ms: Option<u64>,
        at: DateTime<Utc>,
    },
    DeploymentUnhealthy {
        deployment_id: DeploymentId,
        reason: String,
        at: DateTime<Utc>,
    },
    DeploymentHealthy {
        deployment_id: DeploymentId,
        at: DateTime<Utc>,
    },
    TestRunRequested {
        deployment_id: DeploymentId,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    TestRunStarted {
        deployment_id: DeploymentId,
        run_id: Uuid,
        at: DateTime<Utc>,
    },
    RestartRequested {
        deployment_id: DeploymentId,
        restart_id: Uuid,
        at: DateTime<Utc>,
    },
    RestartStarted {
        deployment_id: DeploymentId,
        restart_id: Uuid,
        at: DateTime<Utc>,
    },
    EnvironmentDeactivated {
        at: DateTime<Utc>,
    },
    EnvironmentReactivated {
        at: DateTime<Utc>,
    },
    EnvironmentTerminated {
        reason: String,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for EnvironmentEvent {
    const SCHEMA_VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        match self {
            Self::EnvironmentCreated { .. } => "EnvironmentCreated",
            Self::DeploymentRequested { .. } => "DeploymentRequested",
            Self::DeploymentApproved { .. } => "DeploymentApproved",
            Self::DeploymentPromoted { .. } => "DeploymentPromoted",
            Self::RolledBack { .. } => "RolledBack",
            Self::TestsCompleted { .. } => "TestsCompleted",
            Self::CommitPushed { .. } => "CommitPushed",
            Self::JobRunRequested { .. } => "JobRunRequested",
            Self::DebugSessionOpened { .. } => "DebugSessionOpened",
            Self::DebugSessionClosed { .. } => "DebugSessionClosed",
            Self::DebugAccessed { .. } => "DebugAccessed",
            Self::JobRunSkipped { .. } => "JobRunSkipped",
            Self::JobRunStarted { .. } => "JobRunStarted",
            Self::JobRunFinished { .. } => "JobRunFinished",
            Self::DeploymentSuperseded { .. } => "DeploymentSuperseded",
            Self::BuildStarted { .. } => "BuildStarted",
            Self::BuildSucceeded { .. } => "BuildSucceeded",
            Self::DeploymentReady { .. } => "DeploymentReady",
            Self::DeploymentFailed { .. } => "DeploymentFailed",
            Self::TestPassed { .. } => "TestPassed",
            Self::TestFailed { .. } => "TestFailed",
            Self::DeploymentUnhealthy { .. } => "DeploymentUnhealthy",
            Self::DeploymentHealthy { .. } => "DeploymentHealthy",
            Self::TestRunRequested { .. } => "TestRunRequested",
            Self::TestRunStarted { .. } => "TestRunStarted",
            Self::RestartRequested { .. } => "RestartRequested",
            Self::RestartStarted { .. } => "RestartStarted",
            Self::EnvironmentDeactivated { .. } => "EnvironmentDeactivated",
            Self::EnvironmentReactivated { .. } => "EnvironmentReactivated",
            Self::EnvironmentTerminated { .. } => "EnvironmentTerminated",
        }
    }
}

impl EnvironmentEvent {
    pub fn at(&self) -> DateTime<Utc> {
        match self {
            Self::EnvironmentCreated { at, .. }
            | Self::DeploymentRequested { at, .. }
            | Self::DeploymentApproved { at, .. }
            | Self::DeploymentPromoted { at, .. }
            | Self::RolledBack { at, .. }
            | Self::TestsCompleted { at, .. }
            | Self::CommitPushed { at, .. }
            | Self::JobRunRequested { at, .. }
            | Self::DebugSessionOpened { at, .. }
            | Self::DebugSessionClosed { at, .. }
            | Self::DebugAccessed { at, .. }
            | Self::JobRunSkipped { at, .. }
            | Self::JobRunStarted { at, .. }
            | Self::JobRunFinished { at, .. }
            | Self::DeploymentSuperseded { at, .. }
            | Self::BuildStarted { at, .. }
            | Self::BuildSucceeded { at, .. }
            | Self::DeploymentReady { at, .. }
            | Self::DeploymentFailed { at, .. }
            | Self::TestPassed { at, .. }
            | Self::TestFailed { at, .. }
            | Self::DeploymentUnhealthy { at, .. }
            | Self::DeploymentHealthy { at, .. }
            | Self::TestRunRequested { at, .. }
            | Self::TestRunStarted { at, .. }
            | Self::RestartRequested { at, .. }
            | Self::RestartStarted { at, .. }
            | Self::EnvironmentDeactivated { at }
            | Self::EnvironmentReactivated { at }
            | Self::EnvironmentTerminated { at, .. } => *at,
        }
    }
}

pub struct EnvironmentAggregate;

/// The app went away: no job run of it is waiting or going any more.
fn end_job_runs(state: &mut Environment) {
    for job in state.jobs.values_mut() {
        job.requested = None;
        job.running = None;
    }
}

/// The events of asking for `commit` to be deployed (see [`EnvironmentCommand::RequestDeployment`]).
fn request(
    state: &Environment,
    environment_id: EnvironmentId,
    spec: EnvironmentSpec,
    deployment_id: DeploymentId,
    commit: CommitSha,
    awaiting_approval: bool,
    at: DateTime<Utc>,
) -> Result<Vec<EnvironmentEvent>, DomainError> {
    use EnvironmentEvent as E;
    let mut events = Vec::new();
    match &state.spec {
        None => events.push(E::EnvironmentCreated { environment_id, spec, at }),
        Some(existing) if *existing != spec || state.id != Some(environment_id) => {
            return Err(DomainError::invalid("environment", "this id belongs to another project, target or entrypoint"));
        }
        Some(_) => {}
    }
    if state.deployment(deployment_id).is_some() {
        return Err(DomainError::AlreadyExists { entity: "deployment", id: deployment_id.to_string() });
    }
    let asleep = state.deactivated || state.terminated;
    if let Some(current) = state.current() {
        let same_commit = current.commit == commit && current.status != DeploymentStatus::Failed;
        if same_commit && !asleep {
            return Ok(vec![]);
        }
        if current.status.in_flight() {
            events.push(E::DeploymentSuperseded { deployment_id: current.id, by: deployment_id, at });
        }
    }
    if asleep {
        events.push(E::EnvironmentReactivated { at });
    }
    events.push(E::DeploymentRequested { awaiting_approval, deployment_id, commit, at });
    Ok(events)
}

fn not_found(id: impl std::fmt::Display) -> DomainError {
    DomainError::NotFound { entity: "deployment", id: id.to_string() }
}

/// Looks up a deployment a worker reports on, refusing reports on superseded or gone ones.
fn reported(state: &Environment, id: DeploymentId) -> Result<&Deployment, DomainError> {
    let deployment = state.deployment(id).ok_or_else(|| not_found(id))?;
    if deployment.status == DeploymentStatus::Superseded {
        return Err(DomainError::Superseded { deployment: id.to_string() });
    }
    if state.terminated {
        return Err(DomainError::IllegalEnvironmentTransition { status: "Terminated", action: "a worker report", expected: "active" });
    }
    Ok(deployment)
}

fn expect_status(deployment: &Deployment, expected: DeploymentStatus, action: &'static str) -> Result<(), DomainError> {
    if deployment.status == expected {
        Ok(())
    } else {
        Err(DomainError::IllegalTransition {
            deployment: deployment.id.to_string(),
            status: deployment.status.as_str(),
            action,
            expected: expected.as_str(),
        })
    }
}

fn existing(state: &Environment) -> Result<(), DomainError> {
    if state.spec.is_none() {
        return Err(DomainError::NotFound { entity: "environment", id: "(not created)".into() });
    }
    Ok(())
}

impl Aggregate for EnvironmentAggregate {
    const NAME: &'static str = "environment";
    type State = Environment;
    type Command = EnvironmentCommand;
    type Event = EnvironmentEvent;

    fn decide(state: &Environment, command: EnvironmentCommand) -> Result<Vec<EnvironmentEvent>, DomainError> {
        use EnvironmentCommand as C;
        use EnvironmentEvent as E;
        match command {
            C::RequestDeployment { environment_id, spec, deployment_id, commit, awaiting_approval, at } => {
                request(state, environment_id, spec, deployment_id, commit, awaiting_approval, at)
            }
            C::Promote { environment_id, spec, deployment_id, commit, from_environment, from_deployment, by, at } => {
                if from_environment == environment_id {
                    return Err(DomainError::invalid("from", "a deployment is promoted from another tier's environment"));
                }
                let mut events = request(state, environment_id, spec, deployment_id, commit, false, at)?;
                if !events.is_empty() {
                    events.push(E::DeploymentPromoted { deployment_id, from_environment, from_deployment, by, at });
                }
                Ok(events)
            }
            C::Rollback { deployment_id, to, by, at } => {
                existing(state)?;
                if state.terminated {
                    return Err(DomainError::IllegalEnvironmentTransition {
                        status: "Terminated",
                        action: "rolling back",
                        expected: "not Terminated",
                    });
                }
                let target = state.deployment(to).ok_or_else(|| not_found(to))?;
                if target.status != DeploymentStatus::Ready {
                    return Err(DomainError::invalid("to", "roll back to a deployment that was Ready"));
                }
                if state.current().map(|d| d.id) == Some(to) {
                    return Err(DomainError::invalid("to", "that deployment is the current one"));
                }
                let (environment_id, spec) =
                    (state.id.ok_or_else(|| not_found("(none)"))?, state.spec.clone().ok_or_else(|| not_found("(none)"))?);
                let mut events = request(state, environment_id, spec, deployment_id, target.commit.clone(), false, at)?;
                if events.is_empty() {
                    return Err(DomainError::invalid("to", "its commit is the one deployed now"));
                }
                events.push(E::RolledBack { deployment_id, to, by, at });
                Ok(events)
            }
            C::RecordPush { deployment_id, branch, at } => {
                let deployment = reported(state, deployment_id)?;
                if !deployment.passed() {
                    return Err(DomainError::invalid("deployment", "only a deployment that passed is pushed on"));
                }
                if deployment.pushed_to.as_deref() == Some(branch.as_str()) {
                    return Ok(vec![]);
                }
                Ok(vec![E::CommitPushed { deployment_id, branch, at }])
            }
            C::OpenDebugSession { session_id, token_sha256, expires_at, by, at } => {
                existing(state)?;
                if state.terminated {
                    return Err(DomainError::IllegalEnvironmentTransition {
                        status: "Terminated",
                        action: "debugging",
                        expected: "not Terminated",
                    });
                }
                let current = state.current().ok_or_else(|| not_found("(none)"))?;
                let failed_test =
                    current.status == DeploymentStatus::Ready && current.tests.iter().any(|t| t.outcome == TestOutcome::Failed);
                if current.status != DeploymentStatus::Failed && !failed_test {
                    return Err(DomainError::invalid(
                        "environment",
                        "only a failed deployment (its build, its start or a test) is debugged",
                    ));
                }
                if expires_at <= at || expires_at > at + chrono::Duration::minutes(MAX_DEBUG_MINUTES) {
                    return Err(DomainError::invalid("minutes", format!("a debug session lasts 1 to {MAX_DEBUG_MINUTES} minutes")));
                }
                if token_sha256.len() != 64 || !token_sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(DomainError::invalid("token", "only a token's SHA-256 is kept"));
                }
                if state.debug_sessions.contains_key(&session_id) {
                    return Err(DomainError::AlreadyExists { entity: "debug session", id: session_id.to_string() });
                }
                if state.debug_sessions.values().filter(|s| s.expires_at > at).count() >= MAX_DEBUG_SESSIONS {
                    return Err(DomainError::invalid(
                        "environment",
                        format!("an environment has at most {MAX_DEBUG_SESSIONS} debug sessions open; close one first"),
                    ));
                }
                Ok(vec![E::DebugSessionOpened { session_id, deployment_id: current.id, token_sha256, expires_at, by, at }])
            }
            C::CloseDebugSession { session_id, reason, by, at } => {
                existing(state)?;
                if !state.debug_sessions.contains_key(&session_id) {
                    return Ok(vec![]);
                }
                Ok(vec![E::DebugSessionClosed { session_id, reason, by, at }])
            }
            C::RecordDebugAccess { session_id, what, by, at } => {
                let session = state
                    .debug_sessions
                    .get(&session_id)
                    .ok_or_else(|| DomainError::NotFound { entity: "debug session", id: session_id.to_string() })?;
                if session.expires_at <= at {
                    return Err(DomainError::invalid("session", "this debug session has expired"));
                }
                Ok(vec![E::DebugAccessed { session_id, what, by, at }])
            }
            C::RequestJobRun { job, slot, run_id, at } => {
                existing(state)?;
                if state.status() != Some(EnvironmentStatus::Ready) {
                    let status = state.status().map_or("unknown", EnvironmentStatus::as_str);
                    return Err(DomainError::IllegalEnvironmentTransition { status, action: "running a scheduled job", expected: "Ready" });
                }
                let current = state.jobs.get(&job).cloned().unwrap_or_default();
                if current.last_slot.is_some_and(|last| slot <= last) {
                    return Ok(vec![]);
                }
                if current.requested.is_some() || current.running.is_some() {
                    let reason = "the previous run is still going".to_string();
                    return Ok(vec![E::JobRunSkipped { job, slot, reason, at }]);
                }
                Ok(vec![E::JobRunRequested { job, slot, run_id, at }])
            }
            C::StartJobRun { job, run_id, at } => {
                if state.jobs.get(&job).and_then(|j| j.requested) != Some(run_id) {
                    return Err(DomainError::NotFound { entity: "job run", id: run_id.to_string() });
                }
                Ok(vec![E::JobRunStarted { job, run_id, at }])
            }
            C::FinishJobRun { job, run_id, succeeded, detail, at } => {
                let current = state.jobs.get(&job);
                if current.and_then(|j| j.running.or(j.requested)) != Some(run_id) {
                    return Err(DomainError::NotFound { entity: "job run", id: run_id.to_string() });
                }
                Ok(vec![E::JobRunFinished { job, run_id, succeeded, detail, at }])
            }
            C::CompleteTests { deployment_id, at } => {
                let deployment = reported(state, deployment_id)?;
                expect_status(deployment, DeploymentStatus::Ready, "completing its tests")?;
                let count = |outcome: TestOutcome| deployment.tests.iter().filter(|t| t.outcome == outcome).count() as u32;
                Ok(vec![E::TestsCompleted { deployment_id, passed: count(TestOutcome::Passed), failed: count(TestOutcome::Failed), at }])
            }
            C::ApproveDeployment { deployment_id, by, at } => {
                let deployment = reported(state, deployment_id)?;
                match deployment.status {
                    DeploymentStatus::AwaitingApproval => Ok(vec![E::DeploymentApproved { deployment_id, by, at }]),
                    // Approving twice, or a deployment that never needed it, changes nothing.
                    DeploymentStatus::Requested | DeploymentStatus::Building | DeploymentStatus::Starting | DeploymentStatus::Ready => {
                        Ok(vec![])
                    }
                    _ => expect_status(deployment, DeploymentStatus::AwaitingApproval, "approving").map(|_| vec![]),
                }
            }
            C::StartBuild { deployment_id, at } => {
                expect_status(reported(state, deployment_id)?, DeploymentStatus::Requested, "starting a build")?;
                Ok(vec![E::BuildStarted { deployment_id, at }])
            }
            C::CompleteBuild { deployment_id, at } => {
                expect_status(reported(state, deployment_id)?, DeploymentStatus::Building, "completing a build")?;
                Ok(vec![E::BuildSucceeded { deployment_id, at }])
            }
            C::MarkReady { deployment_id, url, at } => {
                expect_status(reported(state, deployment_id)?, DeploymentStatus::Starting, "marking ready")?;
                if url.trim().is_empty() {
                    return Err(DomainError::invalid("url", "a ready deployment needs its preview URL"));
                }
                Ok(vec![E::DeploymentReady { deployment_id, url, at }])
            }
            C::MarkFailed { deployment_id, stage, reason, at } => {
                let deployment = reported(state, deployment_id)?;
                let expected = match stage {
                    FailedStage::Build => [DeploymentStatus::Requested, DeploymentStatus::Building],
                    FailedStage::Start => [DeploymentStatus::Starting, DeploymentStatus::Ready],
                };
                if !expected.contains(&deployment.status) {
                    return Err(DomainError::IllegalTransition {
                        deployment: deployment_id.to_string(),
                        status: deployment.status.as_str(),
                        action: "marking failed",
                        expected: match stage {
                            FailedStage::Build => "Requested or Building",
                            FailedStage::Start => "Starting or Ready",
                        },
                    });
                }
                Ok(vec![E::DeploymentFailed { deployment_id, stage, reason, at }])
            }
            C::RecordTestResult { deployment_id, test, outcome, duration_ms, at } => {
                expect_status(reported(state, deployment_id)?, DeploymentStatus::Ready, "recording a test result")?;
                if test.trim().is_empty() {
                    return Err(DomainError::invalid("test", "a test result needs the test's name"));
                }
                Ok(vec![match outcome {
                    TestOutcome::Passed => E::TestPassed { deployment_id, test, duration_ms, at },
                    TestOutcome::Failed => E::TestFailed { deployment_id, test, duration_ms, at },
                }])
            }
            C::ReportHealth { deployment_id, healthy, detail, at } => {
                let deployment = reported(state, deployment_id)?;
                expect_status(deployment, DeploymentStatus::Ready, "reporting its health")?;
                Ok(match (healthy, &deployment.unhealthy) {
                    (true, Some(_)) => vec![E::DeploymentHealthy { deployment_id, at }],
                    (false, None) => vec![E::DeploymentUnhealthy { deployment_id, reason: detail, at }],
                    // No change: a ping is not an event.
                    _ => vec![],
                })
            }
            C::RequestTestRun { deployment_id, run_id, at } => {
                let deployment = reported(state, deployment_id)?;
                expect_status(deployment, DeploymentStatus::Ready, "running its tests")?;
                if state.deactivated {
                    return Err(DomainError::IllegalEnvironmentTransition { status: "Stale", action: "running tests", expected: "Ready" });
                }
                if deployment.test_run_requested.is_some() {
                    // One is waiting already: it will run these tests too.
                    return Ok(vec![]);
                }
                Ok(vec![E::TestRunRequested { deployment_id, run_id, at }])
            }
            C::RequestRestart { deployment_id, restart_id, at } => {
                let deployment = reported(state, deployment_id)?;
                expect_status(deployment, DeploymentStatus::Ready, "restarting its app")?;
                if state.deactivated {
                    return Err(DomainError::IllegalEnvironmentTransition { status: "Stale", action: "restarting", expected: "Ready" });
                }
                if deployment.restart_requested.is_some() {
                    return Ok(vec![]); // one is waiting already
                }
                Ok(vec![E::RestartRequested { deployment_id, restart_id, at }])
            }
            C::StartRestart { deployment_id, restart_id, at } => {
                let deployment = reported(state, deployment_id)?;
                if deployment.restart_requested != Some(restart_id) {
                    return Err(DomainError::NotFound { entity: "restart", id: restart_id.to_string() });
                }
                Ok(vec![E::RestartStarted { deployment_id, restart_id, at }])
            }
            C::StartTestRun { deployment_id, run_id, at } => {
                let deployment = reported(state, deployment_id)?;
                if deployment.test_run_requested != Some(run_id) {
                    return Err(DomainError::NotFound { entity: "test run", id: run_id.to_string() });
                }
                Ok(vec![E::TestRunStarted { deployment_id, run_id, at }])
            }
            C::Deactivate { at } => {
                existing(state)?;
                match state.status() {
                    Some(EnvironmentStatus::Stale) => Ok(vec![]),
                    Some(EnvironmentStatus::Ready | EnvironmentStatus::Failed) => Ok(vec![E::EnvironmentDeactivated { at }]),
                    Some(other) => Err(DomainError::IllegalEnvironmentTransition {
                        status: other.as_str(),
                        action: "deactivating",
                        expected: "Ready or Failed",
                    }),
                    None => Err(DomainError::NotFound { entity: "environment", id: "(not created)".into() }),
                }
            }
            C::Redeploy { deployment_id, at } => {
                existing(state)?;
                if state.terminated {
                    return Err(DomainError::IllegalEnvironmentTransition {
                        status: "Terminated",
                        action: "redeploying",
                        expected: "not Terminated",
                    });
                }
                let current = state.current().ok_or_else(|| not_found("(none)"))?;
                if state.deployment(deployment_id).is_some() {
                    return Err(DomainError::AlreadyExists { entity: "deployment", id: deployment_id.to_string() });
                }
                let mut events = Vec::new();
                let awaiting_approval = current.status == DeploymentStatus::AwaitingApproval;
                if current.status.in_flight() {
                    events.push(E::DeploymentSuperseded { deployment_id: current.id, by: deployment_id, at });
                }
                if state.deactivated {
                    events.push(E::EnvironmentReactivated { at });
                }
                events.push(E::DeploymentRequested { deployment_id, commit: current.commit.clone(), awaiting_approval, at });
                Ok(events)
            }
            C::Wake { deployment_id, at } => {
                existing(state)?;
                if !state.deactivated || state.terminated {
                    let status = state.status().map_or("unknown", EnvironmentStatus::as_str);
                    return Err(DomainError::IllegalEnvironmentTransition { status, action: "waking", expected: "Stale" });
                }
                let commit = state.current().map(|d| d.commit.clone()).ok_or_else(|| not_found("(none)"))?;
                if state.deployment(deployment_id).is_some() {
                    return Err(DomainError::AlreadyExists { entity: "deployment", id: deployment_id.to_string() });
                }
                Ok(vec![E::EnvironmentReactivated { at }, E::DeploymentRequested { awaiting_approval: false, deployment_id, commit, at }])
            }
            C::Terminate { reason, at } => {
                existing(state)?;
                if state.terminated {
                    return Ok(vec![]);
                }
                let mut events = Vec::new();
                if let Some(current) = state.current().filter(|d| d.status.in_flight()) {
                    // Nothing supersedes it, but its worker must stop: record why.
                    events.push(E::DeploymentFailed {
                        deployment_id: current.id,
                        stage: FailedStage::Build,
                        reason: format!("environment terminated: {reason}"),
                        at,
                    });
                }
                events.push(E::EnvironmentTerminated { reason, at });
                Ok(events)
            }
        }
    }

    fn apply(mut state: Environment, event: &EnvironmentEvent) -> Environment {
        use EnvironmentEvent as E;
        state.updated_at = Some(event.at());
        let set = |state: &mut Environment, id: DeploymentId, status: DeploymentStatus, at: DateTime<Utc>| {
            if let Some(d) = state.deployment_mut(id) {
                d.status = status;
                d.updated_at = at;
            }
        };
        match event {
            E::EnvironmentCreated { environment_id, spec, .. } => {
                state.id = Some(*environment_id);
                state.spec = Some(spec.clone());
            }
            E::DeploymentRequested { deployment_id, commit, awaiting_approval, at } => state.deployments.push(Deployment {
                id: *deployment_id,
                commit: commit.clone(),
                status: if *awaiting_approval { DeploymentStatus::AwaitingApproval } else { DeploymentStatus::Requested },
                requested_at: *at,
                updated_at: *at,
                url: None,
                failure: None,
                tests: Vec::new(),
                unhealthy: None,
                test_run_requested: None,
                restart_requested: None,
                tests_completed: false,
                promoted_from: None,
                rolled_back_to: None,
                pushed_to: None,
            }),
            E::CommitPushed { deployment_id, branch, .. } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.pushed_to = Some(branch.clone());
                }
            }
            E::DeploymentPromoted { deployment_id, from_deployment, .. } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.promoted_from = Some(*from_deployment);
                }
            }
            E::RolledBack { deployment_id, to, .. } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.rolled_back_to = Some(*to);
                }
            }
            E::JobRunRequested { job, slot, run_id, .. } => {
                let state = state.jobs.entry(job.clone()).or_default();
                state.last_slot = Some(*slot);
                state.requested = Some(*run_id);
            }
            E::DebugSessionOpened { session_id, deployment_id, token_sha256, expires_at, by, at } => {
                let session = DebugSession {
                    deployment_id: *deployment_id,
                    token_sha256: token_sha256.clone(),
                    expires_at: *expires_at,
                    by: by.clone(),
                    opened_at: *at,
                };
                state.debug_sessions.insert(*session_id, session);
            }
            E::DebugSessionClosed { session_id, .. } => {
                state.debug_sessions.remove(session_id);
            }
            E::DebugAccessed { .. } => {}
            E::JobRunSkipped { job, slot, .. } => state.jobs.entry(job.clone()).or_default().last_slot = Some(*slot),
            E::JobRunStarted { job, run_id, .. } => {
                let state = state.jobs.entry(job.clone()).or_default();
                state.requested = None;
                state.running = Some(*run_id);
            }
            E::JobRunFinished { job, .. } => {
                let state = state.jobs.entry(job.clone()).or_default();
                state.requested = None;
                state.running = None;
            }
            E::TestsCompleted { deployment_id, at, .. } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.tests_completed = true;
                    d.updated_at = *at;
                }
            }
            E::DeploymentSuperseded { deployment_id, at, .. } => set(&mut state, *deployment_id, DeploymentStatus::Superseded, *at),
            E::DeploymentApproved { deployment_id, at, .. } => set(&mut state, *deployment_id, DeploymentStatus::Requested, *at),
            E::BuildStarted { deployment_id, at } => set(&mut state, *deployment_id, DeploymentStatus::Building, *at),
            E::BuildSucceeded { deployment_id, at } => set(&mut state, *deployment_id, DeploymentStatus::Starting, *at),
            E::DeploymentReady { deployment_id, url, at } => {
                set(&mut state, *deployment_id, DeploymentStatus::Ready, *at);
                // The worker of the deployment it replaces stops, and its job runs with it.
                end_job_runs(&mut state);
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.url = Some(url.clone());
                }
            }
            E::DeploymentFailed { deployment_id, reason, at, .. } => {
                set(&mut state, *deployment_id, DeploymentStatus::Failed, *at);
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.failure = Some(reason.clone());
                }
            }
            E::TestPassed { deployment_id, test, duration_ms, at } | E::TestFailed { deployment_id, test, duration_ms, at } => {
                let outcome = if matches!(event, E::TestPassed { .. }) { TestOutcome::Passed } else { TestOutcome::Failed };
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.updated_at = *at;
                    match d.tests.iter_mut().find(|t| t.name == *test) {
                        Some(existing) => {
                            existing.outcome = outcome;
                            existing.duration_ms = *duration_ms;
                            existing.at = *at;
                        }
                        None => d.tests.push(TestResult { name: test.clone(), outcome, duration_ms: *duration_ms, at: *at }),
                    }
                }
            }
            E::DeploymentUnhealthy { deployment_id, reason, at } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.unhealthy = Some(reason.clone());
                    d.updated_at = *at;
                }
            }
            E::DeploymentHealthy { deployment_id, at } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.unhealthy = None;
                    d.updated_at = *at;
                }
            }
            E::TestRunRequested { deployment_id, run_id, at } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.test_run_requested = Some(*run_id);
                    d.updated_at = *at;
                }
            }
            E::TestRunStarted { deployment_id, at, .. } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.test_run_requested = None;
                    d.tests_completed = false;
                    d.updated_at = *at;
                }
            }
            E::RestartRequested { deployment_id, restart_id, at } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.restart_requested = Some(*restart_id);
                    d.updated_at = *at;
                }
            }
            E::RestartStarted { deployment_id, at, .. } => {
                if let Some(d) = state.deployment_mut(*deployment_id) {
                    d.restart_requested = None;
                    d.updated_at = *at;
                }
            }
            E::EnvironmentDeactivated { .. } => {
                state.deactivated = true;
                end_job_runs(&mut state);
            }
            E::EnvironmentReactivated { .. } => {
                state.deactivated = false;
                state.terminated = false;
            }
            E::EnvironmentTerminated { .. } => {
                state.terminated = true;
                end_job_runs(&mut state);
            }
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use crate::values::BranchName;
    use chrono::TimeZone;
    use DeploymentStatus as S;
    use EnvironmentCommand as C;
    use EnvironmentEvent as E;

    fn at(minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 12, minute, 0).single().expect("valid date")
    }
    fn dep(n: u128) -> DeploymentId {
        DeploymentId(Uuid::from_u128(n))
    }
    fn sha(c: char) -> CommitSha {
        CommitSha::parse(c.to_string().repeat(40)).expect("valid sha")
    }
    fn spec() -> EnvironmentSpec {
        EnvironmentSpec {
            project_id: ProjectId(Uuid::from_u128(7)),
            target: Target::PullRequest { number: 42, head_branch: BranchName::parse("feature").expect("valid") },
            entrypoint: Entrypoint::parse("main.w").expect("valid"),
        }
    }
    fn env_id() -> EnvironmentId {
        let s = spec();
        EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint)
    }
    fn request(d: u128, c: char, minute: u32) -> C {
        C::RequestDeployment {
            awaiting_approval: false,
            environment_id: env_id(),
            spec: spec(),
            deployment_id: dep(d),
            commit: sha(c),
            at: at(minute),
        }
    }
    fn created() -> E {
        E::EnvironmentCreated { environment_id: env_id(), spec: spec(), at: at(0) }
    }
    fn requested(d: u128, c: char, minute: u32) -> E {
        E::DeploymentRequested { awaiting_approval: false, deployment_id: dep(d), commit: sha(c), at: at(minute) }
    }
    /// History that brings deployment 1 (commit a) to `status`.
    fn history_to(status: DeploymentStatus) -> Vec<E> {
        let mut h = vec![created(), requested(1, 'a', 0)];
        let steps = [
            (S::Building, E::BuildStarted { deployment_id: dep(1), at: at(1) }),
            (S::Starting, E::BuildSucceeded { deployment_id: dep(1), at: at(2) }),
            (S::Ready, E::DeploymentReady { deployment_id: dep(1), url: "http://p/1".into(), at: at(3) }),
        ];
        if status == S::Failed {
            h.push(E::DeploymentFailed { deployment_id: dep(1), stage: FailedStage::Build, reason: "boom".into(), at: at(1) });
            return h;
        }
        for (reached, event) in steps {
            if status == S::Requested {
                break;
            }
            h.push(event);
            if reached == status {
                break;
            }
        }
        h
    }

    #[test]
    fn debug_sessions_open_on_failed_deployments_only_expire_and_close_once() {
        let token = "ab".repeat(32);
        let open = |n: u128, minutes: i64| C::OpenDebugSession {
            session_id: Uuid::from_u128(n),
            token_sha256: token.clone(),
            expires_at: at(10) + chrono::Duration::minutes(minutes),
            by: "user:1".into(),
            at: at(10),
        };
        let opened = |n: u128, minutes: i64| E::DebugSessionOpened {
            session_id: Uuid::from_u128(n),
            deployment_id: dep(1),
            token_sha256: token.clone(),
            expires_at: at(10) + chrono::Duration::minutes(minutes),
            by: "user:1".into(),
            at: at(10),
        };
        // A deployment that is fine, or still building, is not debugged.
        for status in [S::Ready, S::Building] {
            given::<EnvironmentAggregate>(&history_to(status))
                .when(open(1, 30))
                .then_error(|e| matches!(e, DomainError::Invalid { field: "environment", .. }));
        }
        // A failed build is; so is a Ready deployment with a failed test.
        let mut h = history_to(S::Failed);
        let state = given::<EnvironmentAggregate>(&h).when(open(1, 30)).then(&[opened(1, 30)]);
        assert_eq!(state.debug_sessions[&Uuid::from_u128(1)].deployment_id, dep(1));
        let mut red = history_to(S::Ready);
        red.push(E::TestFailed { deployment_id: dep(1), test: "t".into(), duration_ms: None, at: at(4) });
        given::<EnvironmentAggregate>(&red).when(open(1, 30)).then(&[opened(1, 30)]);
        // Bounded in time, in number, and only a hash is kept.
        for minutes in [0, MAX_DEBUG_MINUTES + 1] {
            given::<EnvironmentAggregate>(&h)
                .when(open(1, minutes))
                .then_error(|e| matches!(e, DomainError::Invalid { field: "minutes", .. }));
        }
        let raw = C::OpenDebugSession {
            session_id: Uuid::from_u128(1),
            token_sha256: "usd_plain".into(),
            expires_at: at(20),
            by: "u".into(),
            at: at(10),
        };
        given::<EnvironmentAggregate>(&h).when(raw).then_error(|e| matches!(e, DomainError::Invalid { field: "token", .. }));
        h.extend((1..=MAX_DEBUG_SESSIONS as u128).map(|n| opened(n, 30)));
        given::<EnvironmentAggregate>(&h).when(open(9, 30)).then_error(|e| matches!(e, DomainError::Invalid { .. }));
        // Access is recorded while open; closing ends it, once.
        let access =
            |when: u32| C::RecordDebugAccess { session_id: Uuid::from_u128(1), what: "files".into(), by: "user:1".into(), at: at(when) };
        given::<EnvironmentAggregate>(&h).when(access(11)).then(&[E::DebugAccessed {
            session_id: Uuid::from_u128(1),
            what: "files".into(),
            by: "user:1".into(),
            at: at(11),
        }]);
        given::<EnvironmentAggregate>(&h).when(access(41)).then_error(|e| matches!(e, DomainError::Invalid { field: "session", .. }));
        let close = C::CloseDebugSession { session_id: Uuid::from_u128(1), reason: "expired".into(), by: "system".into(), at: at(41) };
        let closed = E::DebugSessionClosed { session_id: Uuid::from_u128(1), reason: "expired".into(), by: "system".into(), at: at(41) };
        let state = given::<EnvironmentAggregate>(&h).when(close.clone()).then(std::slice::from_ref(&closed));
        assert!(!state.debug_sessions.contains_key(&Uuid::from_u128(1)));
        h.push(closed);
        given::<EnvironmentAggregate>(&h).when(close).then(&[]);
        given::<EnvironmentAggregate>(&h).when(access(12)).then_error(|e| matches!(e, DomainError::NotFound { .. }));
    }

    #[test]
    fn completed_tests_that_all_passed_make_a_deployment_pass() {
        let mut h = history_to(S::Ready);
        h.push(E::TestPassed { deployment_id: dep(1), test: "a".into(), duration_ms: None, at: at(4) });
        let state = given::<EnvironmentAggregate>(&h)
            .when(C::CompleteTests { deployment_id: dep(1), at: at(5) })
            .then(&[E::TestsCompleted { deployment_id: dep(1), passed: 1, failed: 0, at: at(5) }]);
        assert!(state.current().expect("deployment").passed());
        h.push(E::TestFailed { deployment_id: dep(1), test: "b".into(), duration_ms: None, at: at(4) });
        let state = given::<EnvironmentAggregate>(&h)
            .when(C::CompleteTests { deployment_id: dep(1), at: at(5) })
            .then(&[E::TestsCompleted { deployment_id: dep(1), passed: 1, failed: 1, at: at(5) }]);
        assert!(!state.current().expect("deployment").passed(), "a failed test fails the gate");
        let running = given::<EnvironmentAggregate>(&history_to(S::Ready)).when(C::CompleteTests { deployment_id: dep(1), at: at(5) });
        assert!(!running.then(&[E::TestsCompleted { deployment_id: dep(1), passed: 0, failed: 0, at: at(5) }]).deployments.is_empty());
        given::<EnvironmentAggregate>(&history_to(S::Building))
            .when(C::CompleteTests { deployment_id: dep(1), at: at(5) })
            .then_error(|e| matches!(e, DomainError::IllegalTransition { .. }));
        // A new test run opens the gate again until it completes.
        let mut rerun = h.clone();
        rerun.push(E::TestsCompleted { deployment_id: dep(1), passed: 1, failed: 1, at: at(5) });
        rerun.push(E::TestRunStarted { deployment_id: dep(1), run_id: Uuid::from_u128(9), at: at(6) });
        assert!(!EnvironmentAggregate::replay(&rerun).current().expect("deployment").tests_completed);
    }

    #[test]
    fn a_promotion_records_where_the_commit_came_from_and_is_not_repeated() {
        let promote = |d: u128, c: char| C::Promote {
            environment_id: env_id(),
            spec: spec(),
            deployment_id: dep(d),
            commit: sha(c),
            from_environment: EnvironmentId(Uuid::from_u128(99)),
            from_deployment: dep(50),
            by: "alice".into(),
            at: at(1),
        };
        let state = given::<EnvironmentAggregate>(&[]).when(promote(1, 'a')).then(&[
            E::EnvironmentCreated { environment_id: env_id(), spec: spec(), at: at(1) },
            E::DeploymentRequested { awaiting_approval: false, deployment_id: dep(1), commit: sha('a'), at: at(1) },
            E::DeploymentPromoted {
                deployment_id: dep(1),
                from_environment: EnvironmentId(Uuid::from_u128(99)),
                from_deployment: dep(50),
                by: "alice".into(),
                at: at(1),
            },
        ]);
        assert_eq!(state.current().expect("deployment").promoted_from, Some(dep(50)));
        // The commit already current: nothing.
        let events = EnvironmentAggregate::decide(&state, promote(2, 'a')).expect("no-op");
        assert!(events.is_empty());
        // From itself: refused.
        let mut own = promote(3, 'b');
        if let C::Promote { from_environment, .. } = &mut own {
            *from_environment = env_id();
        }
        given::<EnvironmentAggregate>(&[]).when(own).then_error(|e| matches!(e, DomainError::Invalid { field: "from", .. }));
    }

    #[test]
    fn scheduled_runs_never_overlap_and_a_slot_is_dealt_with_once() {
        let run = |n: u128| Uuid::from_u128(n);
        let request = |slot: u32, n: u128| C::RequestJobRun { job: "report".into(), slot: at(slot), run_id: run(n), at: at(slot) };
        let ready = history_to(S::Ready);
        given::<EnvironmentAggregate>(&history_to(S::Building))
            .when(request(10, 1))
            .then_error(|e| matches!(e, DomainError::IllegalEnvironmentTransition { .. }));
        let state = given::<EnvironmentAggregate>(&ready).when(request(10, 1)).then(&[E::JobRunRequested {
            job: "report".into(),
            slot: at(10),
            run_id: run(1),
            at: at(10),
        }]);
        assert!(EnvironmentAggregate::decide(&state, request(10, 9)).expect("same slot").is_empty(), "a slot is dealt with once");
        let mut h = ready.clone();
        h.push(E::JobRunRequested { job: "report".into(), slot: at(10), run_id: run(1), at: at(10) });
        h.push(E::JobRunStarted { job: "report".into(), run_id: run(1), at: at(11) });
        let running = given::<EnvironmentAggregate>(&h).when(request(20, 2)).then(&[E::JobRunSkipped {
            job: "report".into(),
            slot: at(20),
            reason: "the previous run is still going".into(),
            at: at(20),
        }]);
        assert_eq!(running.jobs["report"].running, Some(run(1)));
        let finish = |n: u128| C::FinishJobRun { job: "report".into(), run_id: run(n), succeeded: true, detail: "ok".into(), at: at(30) };
        given::<EnvironmentAggregate>(&h).when(finish(2)).then_error(|e| matches!(e, DomainError::NotFound { .. }));
        let done = given::<EnvironmentAggregate>(&h).when(finish(1)).then(&[E::JobRunFinished {
            job: "report".into(),
            run_id: run(1),
            succeeded: true,
            detail: "ok".into(),
            at: at(30),
        }]);
        assert_eq!((done.jobs["report"].running, done.jobs["report"].last_slot), (None, Some(at(10))));
        // A new deployment going Ready ends the old one's run.
        h.push(requested(2, 'b', 40));
        h.push(E::BuildStarted { deployment_id: dep(2), at: at(41) });
        h.push(E::BuildSucceeded { deployment_id: dep(2), at: at(42) });
        h.push(E::DeploymentReady { deployment_id: dep(2), url: "http://p/2".into(), at: at(43) });
        assert_eq!(EnvironmentAggregate::replay(&h).jobs["report"].running, None);
    }

    #[test]
    fn a_rollback_deploys_an_earlier_ready_commit_again() {
        let mut h = history_to(S::Ready);
        h.push(requested(2, 'b', 10));
        h.push(E::BuildStarted { deployment_id: dep(2), at: at(11) });
        let rollback = |to: u128| C::Rollback { deployment_id: dep(3), to: dep(to), by: "bob".into(), at: at(12) };
        let state = given::<EnvironmentAggregate>(&h).when(rollback(1)).then(&[
            E::DeploymentSuperseded { deployment_id: dep(2), by: dep(3), at: at(12) },
            E::DeploymentRequested { awaiting_approval: false, deployment_id: dep(3), commit: sha('a'), at: at(12) },
            E::RolledBack { deployment_id: dep(3), to: dep(1), by: "bob".into(), at: at(12) },
        ]);
        assert_eq!(state.current().expect("current").rolled_back_to, Some(dep(1)));
        // Only to a deployment that was Ready, and not to the current one.
        given::<EnvironmentAggregate>(&h).when(rollback(2)).then_error(|e| matches!(e, DomainError::Invalid { field: "to", .. }));
        given::<EnvironmentAggregate>(&history_to(S::Ready))
            .when(rollback(1))
            .then_error(|e| matches!(e, DomainError::Invalid { field: "to", .. }));
        given::<EnvironmentAggregate>(&h).when(rollback(77)).then_error(|e| matches!(e, DomainError::NotFound { .. }));
    }

    #[test]
    fn environment_ids_are_deterministic() {
        let s = spec();
        assert_eq!(EnvironmentId::derive(s.project_id, &s.target, &s.entrypoint), env_id());
        let other = EnvironmentId::derive(s.project_id, &s.target, &Entrypoint::parse("api.main.w").expect("valid"));
        assert_ne!(other, env_id());
    }

    #[test]
    fn first_request_creates_the_environment() {
        let state = given::<EnvironmentAggregate>(&[]).when(request(1, 'a', 0)).then(&[created(), requested(1, 'a', 0)]);
        assert_eq!(state.status(), Some(EnvironmentStatus::Requested));
        assert_eq!(state.id, Some(env_id()));
    }

    #[test]
    fn the_happy_path_reaches_ready_with_tests() {
        let steps: Vec<(C, E, EnvironmentStatus)> = vec![
            (
                C::StartBuild { deployment_id: dep(1), at: at(1) },
                E::BuildStarted { deployment_id: dep(1), at: at(1) },
                EnvironmentStatus::Building,
            ),
            (
                C::CompleteBuild { deployment_id: dep(1), at: at(2) },
                E::BuildSucceeded { deployment_id: dep(1), at: at(2) },
                EnvironmentStatus::Starting,
            ),
            (
                C::MarkReady { deployment_id: dep(1), url: "http://p/1".into(), at: at(3) },
                E::DeploymentReady { deployment_id: dep(1), url: "http://p/1".into(), at: at(3) },
                EnvironmentStatus::Ready,
            ),
            (
                C::RecordTestResult {
                    deployment_id: dep(1),
                    test: "sanity".into(),
                    outcome: TestOutcome::Passed,
                    duration_ms: None,
                    at: at(4),
                },
                E::TestPassed { deployment_id: dep(1), test: "sanity".into(), duration_ms: None, at: at(4) },
                EnvironmentStatus::Ready,
            ),
            (
                C::RecordTestResult {
                    deployment_id: dep(1),
                    test: "e2e".into(),
                    outcome: TestOutcome::Failed,
                    duration_ms: None,
                    at: at(5),
                },
                E::TestFailed { deployment_id: dep(1), test: "e2e".into(), duration_ms: None, at: at(5) },
                EnvironmentStatus::Ready,
            ),
        ];
        let mut history = history_to(S::Requested);
        for (command, event, status) in steps {
            let state = given::<EnvironmentAggregate>(&history).when(command).then(std::slice::from_ref(&event));
            assert_eq!(state.status(), Some(status));
            history.push(event);
        }
        let state = EnvironmentAggregate::replay(&history);
        let tests: Vec<_> = state.current().expect("deployed").tests.iter().map(|t| (t.name.as_str(), t.outcome)).collect();
        assert_eq!(tests, vec![("sanity", TestOutcome::Passed), ("e2e", TestOutcome::Failed)]);
    }

    #[test]
    fn illegal_worker_reports_are_refused_in_every_status() {
        // (status the deployment is in, command, accepted?)
        let start = |_: ()| C::StartBuild { deployment_id: dep(1), at: at(9) };
        let complete = |_: ()| C::CompleteBuild { deployment_id: dep(1), at: at(9) };
        let ready = |_: ()| C::MarkReady { deployment_id: dep(1), url: "http://p".into(), at: at(9) };
        let fail_build = |_: ()| C::MarkFailed { deployment_id: dep(1), stage: FailedStage::Build, reason: "x".into(), at: at(9) };
        let fail_start = |_: ()| C::MarkFailed { deployment_id: dep(1), stage: FailedStage::Start, reason: "x".into(), at: at(9) };
        let test = |_: ()| C::RecordTestResult {
            deployment_id: dep(1),
            test: "t".into(),
            outcome: TestOutcome::Passed,
            duration_ms: None,
            at: at(9),
        };
        type Make = fn(()) -> C;
        let commands: [(&str, Make); 6] = [
            ("start", start),
            ("complete", complete),
            ("ready", ready),
            ("fail_build", fail_build),
            ("fail_start", fail_start),
            ("test", test),
        ];
        let table: [(S, [bool; 6]); 5] = [
            //               start  complete ready  fail_b fail_s test
            (S::Requested, [true, false, false, true, false, false]),
            (S::Building, [false, true, false, true, false, false]),
            (S::Starting, [false, false, true, false, true, false]),
            (S::Ready, [false, false, false, false, true, true]),
            (S::Failed, [false, false, false, false, false, false]),
        ];
        for (status, allowed) in table {
            let history = history_to(status);
            assert_eq!(EnvironmentAggregate::replay(&history).current().expect("deployed").status, status);
            for ((name, make), ok) in commands.iter().zip(allowed) {
                let result = EnvironmentAggregate::decide(&EnvironmentAggregate::replay(&history), make(()));
                match (ok, result) {
                    (true, Ok(events)) => assert_eq!(events.len(), 1, "{name} in {status:?}"),
                    (false, Err(DomainError::IllegalTransition { status: s, .. })) => assert_eq!(s, status.as_str(), "{name}"),
                    (ok, other) => panic!("{name} in {status:?}: expected allowed={ok}, got {other:?}"),
                }
            }
        }
    }

    #[test]
    fn a_newer_commit_supersedes_a_deployment_in_flight() {
        for status in [S::Requested, S::Building, S::Starting] {
            let state = given::<EnvironmentAggregate>(&history_to(status))
                .when(request(2, 'b', 10))
                .then(&[E::DeploymentSuperseded { deployment_id: dep(1), by: dep(2), at: at(10) }, requested(2, 'b', 10)]);
            assert_eq!(state.deployment(dep(1)).expect("kept").status, S::Superseded);
            assert_eq!(state.current().expect("new").id, dep(2));
            // The old worker's reports are refused from now on.
            let late = EnvironmentAggregate::decide(&state, C::StartBuild { deployment_id: dep(1), at: at(11) });
            assert_eq!(late, Err(DomainError::Superseded { deployment: dep(1).to_string() }));
        }
        // A finished deployment is not superseded, just followed.
        given::<EnvironmentAggregate>(&history_to(S::Ready)).when(request(2, 'b', 10)).then(&[requested(2, 'b', 10)]);
    }

    #[test]
    fn redelivered_requests_are_no_ops_but_a_failed_commit_can_be_retried() {
        given::<EnvironmentAggregate>(&history_to(S::Building)).when(request(2, 'a', 10)).then(&[]);
        given::<EnvironmentAggregate>(&history_to(S::Failed)).when(request(2, 'a', 10)).then(&[requested(2, 'a', 10)]);
        given::<EnvironmentAggregate>(&history_to(S::Ready))
            .when(request(1, 'b', 10))
            .then_error(|e| matches!(e, DomainError::AlreadyExists { .. }));
    }

    #[test]
    fn an_id_cannot_be_reused_for_another_spec() {
        let mut other = spec();
        other.entrypoint = Entrypoint::parse("other.main.w").expect("valid");
        given::<EnvironmentAggregate>(&history_to(S::Ready))
            .when(C::RequestDeployment {
                awaiting_approval: false,
                environment_id: env_id(),
                spec: other,
                deployment_id: dep(2),
                commit: sha('b'),
                at: at(10),
            })
            .then_error(|e| matches!(e, DomainError::Invalid { field: "environment", .. }));
    }

    #[test]
    fn idle_environments_go_stale_and_wake_on_a_visit_or_a_commit() {
        given::<EnvironmentAggregate>(&history_to(S::Building))
            .when(C::Deactivate { at: at(20) })
            .then_error(|e| matches!(e, DomainError::IllegalEnvironmentTransition { status: "Building", .. }));
        let mut history = history_to(S::Ready);
        let stale =
            given::<EnvironmentAggregate>(&history).when(C::Deactivate { at: at(20) }).then(&[E::EnvironmentDeactivated { at: at(20) }]);
        assert_eq!(stale.status(), Some(EnvironmentStatus::Stale));
        history.push(E::EnvironmentDeactivated { at: at(20) });
        given::<EnvironmentAggregate>(&history).when(C::Deactivate { at: at(21) }).then(&[]);
        // A visit redeploys the latest commit.
        let woken = given::<EnvironmentAggregate>(&history)
            .when(C::Wake { deployment_id: dep(2), at: at(30) })
            .then(&[E::EnvironmentReactivated { at: at(30) }, requested(2, 'a', 30)]);
        assert_eq!(woken.status(), Some(EnvironmentStatus::Requested));
        // A commit of the same sha also wakes it.
        given::<EnvironmentAggregate>(&history)
            .when(request(2, 'a', 30))
            .then(&[E::EnvironmentReactivated { at: at(30) }, requested(2, 'a', 30)]);
        given::<EnvironmentAggregate>(&history_to(S::Ready))
            .when(C::Wake { deployment_id: dep(2), at: at(30) })
            .then_error(|e| matches!(e, DomainError::IllegalEnvironmentTransition { status: "Ready", .. }));
    }

    #[test]
    fn terminating_stops_work_in_flight_and_is_idempotent() {
        let mut history = history_to(S::Building);
        let events = [
            E::DeploymentFailed {
                deployment_id: dep(1),
                stage: FailedStage::Build,
                reason: "environment terminated: PR closed".into(),
                at: at(40),
            },
            E::EnvironmentTerminated { reason: "PR closed".into(), at: at(40) },
        ];
        let state = given::<EnvironmentAggregate>(&history).when(C::Terminate { reason: "PR closed".into(), at: at(40) }).then(&events);
        assert_eq!(state.status(), Some(EnvironmentStatus::Terminated));
        history.extend(events);
        given::<EnvironmentAggregate>(&history).when(C::Terminate { reason: "again".into(), at: at(41) }).then(&[]);
        given::<EnvironmentAggregate>(&history)
            .when(C::StartBuild { deployment_id: dep(1), at: at(42) })
            .then_error(|e| matches!(e, DomainError::IllegalEnvironmentTransition { status: "Terminated", .. }));
        // Reopening the PR brings it back with a new deployment.
        given::<EnvironmentAggregate>(&history)
            .when(request(2, 'b', 50))
            .then(&[E::EnvironmentReactivated { at: at(50) }, requested(2, 'b', 50)]);
    }

    #[test]
    fn commands_on_a_missing_environment_are_refused() {
        for command in [
            C::StartBuild { deployment_id: dep(1), at: at(0) },
            C::Deactivate { at: at(0) },
            C::Wake { deployment_id: dep(1), at: at(0) },
            C::Terminate { reason: "x".into(), at: at(0) },
        ] {
            given::<EnvironmentAggregate>(&[]).when(command).then_error(|e| matches!(e, DomainError::NotFound { .. }));
        }
    }

    #[test]
    fn events_round_trip_through_the_stored_form_and_unknown_versions_are_errors() {
        use crate::{Metadata, Recorded};
        let recorded = Recorded { meta: Metadata::new(Uuid::from_u128(1), "system:test"), event: requested(1, 'a', 0) };
        let json = recorded.to_json();
        assert_eq!(json["event"]["type"], "DeploymentRequested");
        assert_eq!(Recorded::<EnvironmentEvent>::from_json(json.clone()), Ok(recorded));
        let mut future = json.clone();
        future["schema_version"] = 99.into();
        assert!(matches!(
            Recorded::<EnvironmentEvent>::from_json(future),
            Err(crate::EventDecodeError::UnknownVersion { version: 99, .. })
        ));
        let mut unknown = json;
        unknown["event"]["type"] = "SomethingNew".into();
        assert!(matches!(Recorded::<EnvironmentEvent>::from_json(unknown), Err(crate::EventDecodeError::Malformed(_))));
    }

    #[test]
    fn tests_run_again_on_demand_only_on_a_ready_deployment_and_once_per_request() {
        let run = Uuid::from_u128(99);
        let request = C::RequestTestRun { deployment_id: dep(1), run_id: run, at: at(9) };
        given::<EnvironmentAggregate>(&history_to(S::Building))
            .when(request.clone())
            .then_error(|e| matches!(e, DomainError::IllegalTransition { .. }));
        let ready = history_to(S::Ready);
        let requested = E::TestRunRequested { deployment_id: dep(1), run_id: run, at: at(9) };
        let state = given::<EnvironmentAggregate>(&ready).when(request.clone()).then(std::slice::from_ref(&requested));
        assert_eq!(state.current().and_then(|d| d.test_run_requested), Some(run));
        let mut waiting = ready.clone();
        waiting.push(requested);
        let again = C::RequestTestRun { deployment_id: dep(1), run_id: Uuid::from_u128(100), at: at(10) };
        given::<EnvironmentAggregate>(&waiting).when(again).then(&[]);
        let start = C::StartTestRun { deployment_id: dep(1), run_id: run, at: at(11) };
        let state = given::<EnvironmentAggregate>(&waiting).when(start).then(&[E::TestRunStarted {
            deployment_id: dep(1),
            run_id: run,
            at: at(11),
        }]);
        assert_eq!(state.current().and_then(|d| d.test_run_requested), None);
        let wrong = C::StartTestRun { deployment_id: dep(1), run_id: Uuid::from_u128(5), at: at(11) };
        given::<EnvironmentAggregate>(&waiting).when(wrong).then_error(|e| matches!(e, DomainError::NotFound { .. }));
    }

    #[test]
    fn health_is_recorded_only_when_it_changes() {
        let ready = history_to(S::Ready);
        let report = |healthy: bool| C::ReportHealth { deployment_id: dep(1), healthy, detail: "timed out".into(), at: at(12) };
        given::<EnvironmentAggregate>(&ready).when(report(true)).then(&[]);
        let unhealthy = E::DeploymentUnhealthy { deployment_id: dep(1), reason: "timed out".into(), at: at(12) };
        let state = given::<EnvironmentAggregate>(&ready).when(report(false)).then(std::slice::from_ref(&unhealthy));
        assert_eq!(state.current().and_then(|d| d.unhealthy.clone()).as_deref(), Some("timed out"));
        let mut sick = ready.clone();
        sick.push(unhealthy);
        given::<EnvironmentAggregate>(&sick).when(report(false)).then(&[]);
        given::<EnvironmentAggregate>(&sick).when(report(true)).then(&[E::DeploymentHealthy { deployment_id: dep(1), at: at(12) }]);
        given::<EnvironmentAggregate>(&history_to(S::Starting))
            .when(report(false))
            .then_error(|e| matches!(e, DomainError::IllegalTransition { .. }));
    }

    #[test]
    fn a_fork_commit_waits_for_approval_before_anything_is_built() {
        let awaiting = C::RequestDeployment {
            awaiting_approval: true,
            environment_id: env_id(),
            spec: spec(),
            deployment_id: dep(1),
            commit: sha('a'),
            at: at(1),
        };
        let history = vec![
            E::EnvironmentCreated { environment_id: env_id(), spec: spec(), at: at(1) },
            E::DeploymentRequested { awaiting_approval: true, deployment_id: dep(1), commit: sha('a'), at: at(1) },
        ];
        let state = given::<EnvironmentAggregate>(&[]).when(awaiting).then(&history);
        assert_eq!(state.status(), Some(EnvironmentStatus::AwaitingApproval));
        given::<EnvironmentAggregate>(&history)
            .when(C::StartBuild { deployment_id: dep(1), at: at(2) })
            .then_error(|e| matches!(e, DomainError::IllegalTransition { status: "AwaitingApproval", .. }));
        let approved = given::<EnvironmentAggregate>(&history)
            .when(C::ApproveDeployment { deployment_id: dep(1), by: "user:maintainer".into(), at: at(3) })
            .then(&[E::DeploymentApproved { deployment_id: dep(1), by: "user:maintainer".into(), at: at(3) }]);
        assert_eq!(approved.status(), Some(EnvironmentStatus::Requested));
        let mut after = history.clone();
        after.push(E::DeploymentApproved { deployment_id: dep(1), by: "user:maintainer".into(), at: at(3) });
        given::<EnvironmentAggregate>(&after)
            .when(C::ApproveDeployment { deployment_id: dep(1), by: "user:other".into(), at: at(4) })
            .then(&[]);
        given::<EnvironmentAggregate>(&after)
            .when(C::StartBuild { deployment_id: dep(1), at: at(4) })
            .then(&[E::BuildStarted { deployment_id: dep(1), at: at(4) }]);
        // A new commit supersedes one still waiting, and waits in its turn.
        given::<EnvironmentAggregate>(&history)
            .when(C::RequestDeployment {
                awaiting_approval: true,
                environment_id: env_id(),
                spec: spec(),
                deployment_id: dep(2),
                commit: sha('b'),
                at: at(5),
            })
            .then(&[
                E::DeploymentSuperseded { deployment_id: dep(1), by: dep(2), at: at(5) },
                E::DeploymentRequested { awaiting_approval: true, deployment_id: dep(2), commit: sha('b'), at: at(5) },
            ]);
    }

    #[test]
    fn a_redeploy_builds_the_current_commit_again() {
        let ready = history_to(S::Ready);
        let commit = EnvironmentAggregate::replay(&ready).current().expect("current").commit.clone();
        given::<EnvironmentAggregate>(&ready).when(C::Redeploy { deployment_id: dep(9), at: at(40) }).then(&[E::DeploymentRequested {
            awaiting_approval: false,
            deployment_id: dep(9),
            commit: commit.clone(),
            at: at(40),
        }]);
        given::<EnvironmentAggregate>(&history_to(S::Building)).when(C::Redeploy { deployment_id: dep(9), at: at(40) }).then(&[
            E::DeploymentSuperseded { deployment_id: dep(1), by: dep(9), at: at(40) },
            E::DeploymentRequested { awaiting_approval: false, deployment_id: dep(9), commit: commit.clone(), at: at(40) },
        ]);
        given::<EnvironmentAggregate>(&ready)
            .when(C::Redeploy { deployment_id: dep(1), at: at(40) })
            .then_error(|e| matches!(e, DomainError::AlreadyExists { .. }));
        given::<EnvironmentAggregate>(&[])
            .when(C::Redeploy { deployment_id: dep(9), at: at(40) })
            .then_error(|e| matches!(e, DomainError::NotFound { .. }));
    }

    #[test]
    fn a_ready_app_restarts_once_per_request() {
        let restart = Uuid::from_u128(77);
        let request = C::RequestRestart { deployment_id: dep(1), restart_id: restart, at: at(50) };
        given::<EnvironmentAggregate>(&history_to(S::Building))
            .when(request.clone())
            .then_error(|e| matches!(e, DomainError::IllegalTransition { .. }));
        let requested = E::RestartRequested { deployment_id: dep(1), restart_id: restart, at: at(50) };
        let state = given::<EnvironmentAggregate>(&history_to(S::Ready)).when(request.clone()).then(std::slice::from_ref(&requested));
        assert_eq!(state.current().and_then(|d| d.restart_requested), Some(restart));
        let mut history = history_to(S::Ready);
        history.push(requested);
        given::<EnvironmentAggregate>(&history)
            .when(C::RequestRestart { deployment_id: dep(1), restart_id: Uuid::from_u128(78), at: at(51) })
            .then(&[]);
        let started = given::<EnvironmentAggregate>(&history)
            .when(C::StartRestart { deployment_id: dep(1), restart_id: restart, at: at(52) })
            .then(&[E::RestartStarted { deployment_id: dep(1), restart_id: restart, at: at(52) }]);
        assert_eq!(started.current().and_then(|d| d.restart_requested), None);
        given::<EnvironmentAggregate>(&history_to(S::Ready))
            .when(C::StartRestart { deployment_id: dep(1), restart_id: restart, at: at(52) })
            .then_error(|e| matches!(e, DomainError::NotFound { .. }));
    }
}
