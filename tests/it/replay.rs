//! Replay from the Postgres log equals the live projection, for random histories.

use proptest::prelude::*;
use understudy_domain::environment::{EnvironmentCommand, FailedStage, TestOutcome};
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_tests::fixtures::{self, meta};
use understudy_tests::TestEnv;
use uuid::Uuid;

/// One step of a random history: which environment, and what happens to it.
#[derive(Debug, Clone)]
enum Step {
    Commit,
    Advance,
    Fail,
    Test(bool),
    Deactivate,
    Wake,
    Terminate,
}

fn step() -> impl Strategy<Value = (usize, Step)> {
    let kind = prop_oneof![
        3 => Just(Step::Commit),
        6 => Just(Step::Advance),
        1 => Just(Step::Fail),
        3 => any::<bool>().prop_map(Step::Test),
        1 => Just(Step::Deactivate),
        1 => Just(Step::Wake),
        1 => Just(Step::Terminate),
    ];
    (0..4usize, kind)
}

async fn table(pool: &sqlx::PgPool, sql: &str) -> Vec<serde_json::Value> {
    sqlx::query_scalar(sql).fetch_all(pool).await.expect(sql)
}

async fn run_history(steps: Vec<(usize, Step)>) {
    let env = TestEnv::new().await;
    let store = env.runtime.store.environments.clone();
    let project = ProjectId(Uuid::new_v4());
    let specs: Vec<_> = (0..4).map(|i| fixtures::spec(project, i, if i % 2 == 0 { "main.w" } else { "api.main.w" })).collect();
    let mut commit = 0u64;
    for (which, step) in steps {
        let spec = &specs[which];
        let id = fixtures::env_id(spec).0;
        let state = store.load(id).await.expect("load").into_inner();
        let current = state.current().map(|d| (d.id, d.status));
        let now = chrono::Utc::now();
        let command = match (step, current) {
            (Step::Commit, _) | (_, None) => {
                commit += 1;
                fixtures::request(spec, DeploymentId(Uuid::new_v4()), commit)
            }
            (Step::Advance, Some((d, status))) => match status.as_str() {
                "Requested" => EnvironmentCommand::StartBuild { deployment_id: d, at: now },
                "Building" => EnvironmentCommand::CompleteBuild { deployment_id: d, at: now },
                _ => EnvironmentCommand::MarkReady { deployment_id: d, url: format!("http://p/{d}"), at: now },
            },
            (Step::Fail, Some((d, _))) => {
                EnvironmentCommand::MarkFailed { deployment_id: d, stage: FailedStage::Build, reason: "broken".into(), at: now }
            }
            (Step::Test(passed), Some((d, _))) => EnvironmentCommand::RecordTestResult {
                deployment_id: d,
                test: format!("t{}", commit % 3),
                outcome: if passed { TestOutcome::Passed } else { TestOutcome::Failed },
                duration_ms: None,
                at: now,
            },
            (Step::Deactivate, _) => EnvironmentCommand::Deactivate { at: now },
            (Step::Wake, _) => EnvironmentCommand::Wake { deployment_id: DeploymentId(Uuid::new_v4()), at: now },
            (Step::Terminate, _) => EnvironmentCommand::Terminate { reason: "closed".into(), at: now },
        };
        // Illegal moves are part of a random history: they are refused and append nothing.
        let _ = store.execute(id, command, meta()).await;
    }
    understudy_tests::sequence_all(env.pool()).await;
    env.project(understudy_projections::all()).await;
    let environments = "SELECT to_jsonb(e) FROM environments e ORDER BY environment_id";
    let history = "SELECT to_jsonb(h) FROM entity_history h ORDER BY position";
    let (live_env, live_history) = (table(env.pool(), environments).await, table(env.pool(), history).await);
    for projection in understudy_projections::all() {
        understudy_projections::replay::replay(env.pool(), projection.as_ref(), |_, _| {}).await.expect("replay");
    }
    assert_eq!(table(env.pool(), environments).await, live_env, "environments: replay == live");
    assert_eq!(table(env.pool(), history).await, live_history, "entity_history: replay == live");
    // The replayed tables are live again: the projector goes on from the swapped-in checkpoint.
    let head = understudy_adapters::global_log::head(env.pool()).await.expect("head");
    for lag in understudy_projections::projector::lag(env.pool()).await.expect("lag") {
        assert_eq!(lag.checkpoint, head, "{lag:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn replay_equals_live(steps in proptest::collection::vec(step(), 1..60)) {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(run_history(steps));
    }
}

#[tokio::test]
async fn a_replayed_read_model_keeps_its_index_names_for_the_migrations_that_name_them() {
    let env = TestEnv::new().await;
    fixtures::deploy_prs(&env.runtime.store.environments, ProjectId(Uuid::new_v4()), 0..3).await;
    understudy_tests::sequence_all(env.pool()).await;
    env.project(understudy_projections::all()).await;
    let tables: Vec<String> =
        understudy_projections::all().iter().flat_map(|projection| projection.tables().iter().map(|t| t.to_string())).collect();
    let indexes = || async {
        let rows: Vec<(String, String, String)> = sqlx::query_as(
            "SELECT tablename::text, indexname::text, indexdef FROM pg_indexes
             WHERE schemaname = current_schema() AND tablename = ANY($1) ORDER BY 1, 2",
        )
        .bind(&tables)
        .fetch_all(env.pool())
        .await
        .expect("indexes");
        rows
    };
    let before = indexes().await;
    assert!(before.iter().any(|(_, name, _)| name == "environments_project_position"), "{before:?}");
    // Twice: a replay of a replayed table too.
    for _ in 0..2 {
        for projection in understudy_projections::all() {
            understudy_projections::replay::replay(env.pool(), projection.as_ref(), |_, _| {}).await.expect("replay");
        }
        assert_eq!(indexes().await, before, "the same indexes, under the same names");
    }
}
