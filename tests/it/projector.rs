//! Projectors: exactly-once application through crashes, hole filling, and stopping on the unknown.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_domain::ids::ProjectId;
use understudy_projections::entity_history::EntityHistory;
use understudy_projections::environments::Environments;
use understudy_projections::{projector, Projector};
use understudy_tests::fixtures;
use understudy_tests::{eventually, TestEnv};
use uuid::Uuid;

async fn scalar(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

async fn deploy_prs(env: &TestEnv, project: ProjectId, prs: std::ops::Range<u64>) {
    fixtures::deploy_prs(&env.runtime.store.environments, project, prs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_from_the_log_through_nats_into_the_read_models() {
    let env = TestEnv::new().await;
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    env.runtime.spawn_relay(cancel.clone(), &mut tasks);
    env.runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
    let project = ProjectId(Uuid::new_v4());
    deploy_prs(&env, project, 0..5).await;
    let ready = eventually(Duration::from_secs(20), "five Ready environments", || async {
        let n = scalar(env.pool(), "SELECT count(*) FROM environments WHERE status = 'Ready'").await;
        (n == 5).then_some(n)
    })
    .await;
    assert_eq!(ready, 5);
    eventually(Duration::from_secs(20), "the history to hold every event", || async {
        (scalar(env.pool(), "SELECT count(*) FROM entity_history").await == 25).then_some(())
    })
    .await;
    let lags = eventually(Duration::from_secs(20), "every projection to reach the head", || async {
        let lags = projector::lag(env.pool()).await.expect("lag");
        lags.iter().all(|l| l.lag == 0).then_some(lags)
    })
    .await;
    assert_eq!(lags.len(), understudy_projections::all().len());
    assert!(lags.iter().all(|l| l.head == 25), "{lags:?}");
    cancel.cancel();
    while let Some(result) = tasks.join_next().await {
        result.expect("task").expect("role");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_killed_at_any_moment_applies_every_event_exactly_once() {
    let env = TestEnv::new().await;
    let cancel = CancellationToken::new();
    let mut relay = JoinSet::new();
    env.runtime.spawn_relay(cancel.clone(), &mut relay);
    let project = ProjectId(Uuid::new_v4());
    let writer = {
        let store = env.runtime.store.environments.clone();
        tokio::spawn(async move { fixtures::deploy_prs(&store, project, 0..60).await })
    };
    // Kill the projector (drop its task mid-batch) again and again while events flow; the sleep
    // picks the moment of the kill, the result is awaited with a deadline below.
    for round in 0..12u64 {
        let projector =
            Projector::new(env.pool().clone(), env.runtime.nats.clone(), env.topology().clone(), std::sync::Arc::new(EntityHistory));
        let task = tokio::spawn(projector.run(CancellationToken::new()));
        tokio::time::sleep(Duration::from_millis(20 + (round * 37) % 90)).await;
        task.abort();
        let _ = task.await;
    }
    writer.await.expect("writer");
    // A final projector that is allowed to finish.
    let projector =
        Projector::new(env.pool().clone(), env.runtime.nats.clone(), env.topology().clone(), std::sync::Arc::new(EntityHistory));
    let stop = CancellationToken::new();
    let last = tokio::spawn(projector.run(stop.clone()));
    eventually(Duration::from_secs(30), "the history to catch up", || async {
        (scalar(env.pool(), "SELECT count(*) FROM entity_history").await == 300).then_some(())
    })
    .await;
    stop.cancel();
    last.await.expect("join").expect("projector");
    // The position is the primary key: a second application would have failed the insert.
    assert_eq!(scalar(env.pool(), "SELECT count(DISTINCT event_id) FROM entity_history").await, 300);
    assert_eq!(scalar(env.pool(), "SELECT position FROM projector_checkpoints WHERE projection = 'entity_history'").await, 300);
    cancel.cancel();
    while relay.join_next().await.is_some() {}
}

#[tokio::test]
async fn holes_in_what_nats_delivers_are_filled_from_postgres() {
    let env = TestEnv::new().await;
    deploy_prs(&env, ProjectId(Uuid::new_v4()), 0..3).await;
    understudy_tests::sequence_all(env.pool()).await;
    let all = understudy_adapters::global_log::read_after(env.pool(), 0, 100).await.expect("read");
    assert_eq!(all.len(), 15);
    let projector = Projector::new(env.pool().clone(), env.runtime.nats.clone(), env.topology().clone(), std::sync::Arc::new(Environments));
    // NATS "lost" everything but positions 3 and 15, and delivered 3 twice.
    projector.apply_batch(vec![all[14].clone(), all[2].clone(), all[2].clone()]).await.expect("apply");
    assert_eq!(scalar(env.pool(), "SELECT position FROM projector_checkpoints WHERE projection = 'environments'").await, 15);
    assert_eq!(scalar(env.pool(), "SELECT count(*) FROM environments WHERE status = 'Ready'").await, 3);
    // Redelivery of everything changes nothing.
    projector.apply_batch(all).await.expect("redelivery");
    assert_eq!(scalar(env.pool(), "SELECT max(position) FROM environments").await, 15);
}

#[tokio::test]
async fn an_unknown_event_stops_the_projector_at_its_position() {
    let env = TestEnv::new().await;
    deploy_prs(&env, ProjectId(Uuid::new_v4()), 0..1).await;
    sqlx::query(
        "INSERT INTO event_log (event_id, aggregate_type, aggregate_id, aggregate_version, event_type, schema_version, payload,
             recorded_at, correlation_id, actor) VALUES ($1, 'environment', $1, 1, 'EnvironmentTeleported', 1,
             '{\"type\": \"EnvironmentTeleported\"}', now(), $1, 'system:test')",
    )
    .bind(Uuid::new_v4())
    .execute(env.pool())
    .await
    .expect("insert");
    deploy_prs(&env, ProjectId(Uuid::new_v4()), 1..2).await;
    understudy_tests::sequence_all(env.pool()).await;
    let projector = Projector::new(env.pool().clone(), env.runtime.nats.clone(), env.topology().clone(), std::sync::Arc::new(Environments));
    let error = projector.run(CancellationToken::new()).await.expect_err("must stop");
    let message = format!("{error:#}");
    assert!(message.contains("position 6") && message.contains("EnvironmentTeleported"), "{message}");
    assert_eq!(
        scalar(env.pool(), "SELECT position FROM projector_checkpoints WHERE projection = 'environments'").await,
        5,
        "stopped before it"
    );
}

/// The environments projection folds a batch in memory and writes each row once; the rows must
/// be the ones it writes applying the same events one at a time (as a live projector does when
/// events trickle in), so a replay in batches of thousands equals the live read model.
#[tokio::test]
async fn a_read_model_is_the_same_however_the_log_is_cut_into_batches() {
    let env = TestEnv::new().await;
    // Two pull requests with two entrypoints each, their environments' events interleaved: a
    // projection that folds a run must keep each row at its newest event, per environment and
    // per pull request.
    let project = ProjectId(Uuid::new_v4());
    let mut lanes = Vec::new();
    for pr in [7, 8] {
        for entrypoint in ["main.w", "api.main.w"] {
            let spec = fixtures::spec(project, pr, entrypoint);
            let commands = fixtures::deploy_and_test(&spec, understudy_domain::ids::DeploymentId(Uuid::new_v4()), 3);
            lanes.push((fixtures::env_id(&spec).0, commands.into_iter()));
        }
    }
    let store = &env.runtime.store.environments;
    loop {
        let mut any = false;
        for (id, commands) in &mut lanes {
            if let Some(command) = commands.next() {
                store.execute(*id, command, fixtures::meta()).await.expect("command");
                any = true;
            }
        }
        if !any {
            break;
        }
    }
    understudy_tests::sequence_all(env.pool()).await;
    let all = understudy_adapters::global_log::read_after(env.pool(), 0, 100).await.expect("read");
    assert_eq!(all.len(), 4 * 8, "created, requested, three to Ready, three tests");
    for projection in understudy_projections::all() {
        let projector = Projector::new(env.pool().clone(), env.runtime.nats.clone(), env.topology().clone(), projection.clone());
        for event in &all {
            projector.apply_batch(vec![event.clone()]).await.expect("apply one event");
        }
        // `verify` replays the whole log as one run beside the live tables.
        let report = understudy_projections::replay::verify(env.pool(), projection.as_ref()).await.expect("verify");
        assert!(report.differences.is_empty(), "{}: one at a time vs one batch: {report:#?}", projection.name());
    }
    // The comment entry of each pull request is dirty at its newest event.
    let newest: i64 = all.iter().map(|e| e.position).max().unwrap_or_default();
    let comments: Vec<i64> = sqlx::query_scalar("SELECT dirty_position FROM github_outbox WHERE kind = 'comment' ORDER BY dirty_position")
        .fetch_all(env.pool())
        .await
        .expect("outbox");
    assert_eq!(comments.len(), 2, "{comments:?}");
    assert_eq!(comments[1], newest);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_moved_behind_the_projectors_back_is_read_again_not_overwritten() {
    let env = TestEnv::new().await;
    let project = ProjectId(Uuid::new_v4());
    deploy_prs(&env, project, 0..2).await;
    understudy_tests::sequence_all(env.pool()).await;
    let all = understudy_adapters::global_log::read_after(env.pool(), 0, 100).await.expect("read");
    let projector =
        Projector::new(env.pool().clone(), env.runtime.nats.clone(), env.topology().clone(), std::sync::Arc::new(EntityHistory));
    projector.apply_batch(all[..3].to_vec()).await.expect("first batch");
    // A replay rebuilds the history and moves the checkpoint past what this projector knows.
    understudy_projections::replay::replay(env.pool(), &EntityHistory, |_, _| {}).await.expect("replay");
    assert_eq!(projector::checkpoint(env.pool(), "entity_history").await.expect("checkpoint"), all.len() as i64);
    // The rest arrives late, over NATS: already applied by the replay, so skipped.
    projector.apply_batch(all[3..].to_vec()).await.expect("late batch");
    deploy_prs(&env, project, 2..3).await;
    understudy_tests::sequence_all(env.pool()).await;
    let more = understudy_adapters::global_log::read_after(env.pool(), all.len() as i64, 100).await.expect("read");
    projector.apply_batch(more.clone()).await.expect("next batch");
    assert_eq!(scalar(env.pool(), "SELECT count(*) FROM entity_history").await, (all.len() + more.len()) as i64);
    let report = understudy_projections::replay::verify(env.pool(), &EntityHistory).await.expect("verify");
    assert!(report.differences.is_empty(), "{report:#?}");
}

/// An operator who resets a projection by hand (its rows emptied, its checkpoint set back to 0)
/// while nothing is being appended gets it rebuilt by the running projector from the log: no
/// new event has to come along first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_set_back_while_idle_is_projected_again_from_the_log() {
    let env = TestEnv::new().await;
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    env.runtime.spawn_relay(cancel.clone(), &mut tasks);
    let projector =
        Projector::new(env.pool().clone(), env.runtime.nats.clone(), env.topology().clone(), std::sync::Arc::new(EntityHistory));
    tasks.spawn(projector.run(cancel.clone()));
    deploy_prs(&env, ProjectId(Uuid::new_v4()), 0..4).await;
    eventually(Duration::from_secs(30), "the history to follow", || async {
        (scalar(env.pool(), "SELECT count(*) FROM entity_history").await == 20).then_some(())
    })
    .await;
    let mut tx = env.pool().begin().await.expect("begin");
    sqlx::query("DELETE FROM entity_history").execute(&mut *tx).await.expect("empty");
    sqlx::query("UPDATE projector_checkpoints SET position = 0 WHERE projection = 'entity_history'")
        .execute(&mut *tx)
        .await
        .expect("reset");
    tx.commit().await.expect("commit");
    eventually(Duration::from_secs(30), "the history to be projected again", || async {
        (scalar(env.pool(), "SELECT count(*) FROM entity_history").await == 20).then_some(())
    })
    .await;
    assert_eq!(scalar(env.pool(), "SELECT position FROM projector_checkpoints WHERE projection = 'entity_history'").await, 20);
    cancel.cancel();
    while let Some(result) = tasks.join_next().await {
        result.expect("join").expect("task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_notices_go_out_in_position_order() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    let project = ProjectId(Uuid::new_v4());
    let store = &env.runtime.store.environments;
    let (a, b) = (fixtures::spec(project, 1, "main.w"), fixtures::spec(project, 2, "main.w"));
    let (a_id, b_id) = (fixtures::env_id(&a).0, fixtures::env_id(&b).0);
    let deployment = understudy_domain::ids::DeploymentId(Uuid::new_v4());
    // One run touches A first, then B, then A again: A's row ends at the newest position.
    let meta = fixtures::meta;
    store.execute(a_id, fixtures::request(&a, deployment, 1), meta()).await.expect("request A");
    store.execute(b_id, fixtures::request(&b, understudy_domain::ids::DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("request B");
    store.execute(a_id, fixtures::to_ready(deployment).remove(0), meta()).await.expect("build A");
    understudy_tests::sequence_all(env.pool()).await;
    let subject = env.topology().changes_subject(understudy_projections::environments::READ_MODEL, &project.to_string());
    let mut notices = env.runtime.nats.subscribe(subject).await.expect("subscribe");
    env.runtime.nats.flush().await.expect("flush");
    env.project(vec![std::sync::Arc::new(Environments)]).await;
    let mut heard = Vec::new();
    while heard.len() < 2 {
        let message = tokio::time::timeout(Duration::from_secs(5), notices.next()).await.expect("a notice").expect("open");
        let change: understudy_projections::Change = serde_json::from_slice(&message.payload).expect("a change");
        heard.push((change.id, change.position));
    }
    assert_eq!(heard.iter().map(|(id, _)| *id).collect::<Vec<_>>(), vec![b_id, a_id], "{heard:?}");
    assert!(heard[0].1 < heard[1].1, "{heard:?}");
}
