//! The relay: every numbered event reaches JetStream, a crash republishes and nothing doubles.

use understudy_adapters::relay;
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_tests::fixtures::{self, meta};
use understudy_tests::TestEnv;
use uuid::Uuid;

#[tokio::test]
async fn relays_every_event_once_and_resumes_after_a_crash() {
    let env = TestEnv::new().await;
    let store = env.runtime.store.environments.clone();
    let project = ProjectId(Uuid::new_v4());
    for pr in 0..10 {
        let spec = fixtures::spec(project, pr, "main.w");
        store.execute(fixtures::env_id(&spec).0, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("append");
    }
    understudy_tests::sequence_all(env.pool()).await;
    let js = env.jetstream();
    // Publish part of the log, then "crash" after publishing the rest but before the cursor moved.
    assert_eq!(relay::publish_pending(env.pool(), &js, env.topology(), 7).await.expect("publish"), 7);
    assert_eq!(relay::publish_pending(env.pool(), &js, env.topology(), 100).await.expect("publish"), 13);
    sqlx::query("UPDATE log_cursors SET position = 7 WHERE name = 'published'").execute(env.pool()).await.expect("rewind");
    assert_eq!(relay::publish_pending(env.pool(), &js, env.topology(), 100).await.expect("republish"), 13);

    let mut stream = js.get_stream(env.topology().stream_name()).await.expect("stream");
    let info = stream.info().await.expect("info");
    assert_eq!(info.state.messages, 20, "JetStream dropped the republished events as duplicates");
    let published: i64 =
        sqlx::query_scalar("SELECT position FROM log_cursors WHERE name = 'published'").fetch_one(env.pool()).await.expect("cursor");
    assert_eq!(published, 20);
    // Subjects are per aggregate type and id.
    let first = stream.get_raw_message(1).await.expect("first message");
    assert!(first.subject.as_str().starts_with(&format!("{}.events.environment.", env.prefix)), "{}", first.subject);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_at_any_moment_loses_nothing_and_publishes_nothing_twice() {
    let env = TestEnv::new().await;
    let project = ProjectId(Uuid::new_v4());
    let writer = {
        let store = env.runtime.store.environments.clone();
        tokio::spawn(async move { fixtures::deploy_prs(&store, project, 0..80).await })
    };
    // Drop the relay task mid-batch, again and again, while events are appended; the sleep picks
    // the moment of the kill, the result is awaited with a deadline below.
    for round in 0..15u64 {
        let task = tokio::spawn(relay::run(
            env.pool().clone(),
            env.jetstream(),
            env.topology().clone(),
            tokio_util::sync::CancellationToken::new(),
        ));
        tokio::time::sleep(std::time::Duration::from_millis(10 + (round * 29) % 70)).await;
        task.abort();
        let _ = task.await;
    }
    writer.await.expect("writer");
    let cancel = tokio_util::sync::CancellationToken::new();
    let last = tokio::spawn(relay::run(env.pool().clone(), env.jetstream(), env.topology().clone(), cancel.clone()));
    let published = understudy_tests::eventually(std::time::Duration::from_secs(30), "the relay to publish all 400 events", || async {
        let p: i64 = sqlx::query_scalar("SELECT position FROM log_cursors WHERE name = 'published'").fetch_one(env.pool()).await.ok()?;
        (p == 400).then_some(p)
    })
    .await;
    cancel.cancel();
    last.await.expect("relay");
    assert_eq!(published, 400);
    let info = env.jetstream().get_stream(env.topology().stream_name()).await.expect("stream").info().await.expect("info").clone();
    assert_eq!(info.state.messages, 400, "every event exactly once in the stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_append_announces_itself_so_that_relays_in_other_processes_wake() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    let mut hints = env.runtime.nats.subscribe(env.topology().appended_subject()).await.expect("subscribe");
    env.runtime.nats.flush().await.expect("flush");
    let spec = fixtures::spec(ProjectId(Uuid::new_v4()), 1, "main.w");
    let store = &env.runtime.store.environments;
    store.execute(fixtures::env_id(&spec).0, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("append");
    let hint = tokio::time::timeout(std::time::Duration::from_secs(10), hints.next()).await.expect("a hint").expect("subscribed");
    assert!(hint.payload.is_empty(), "a hint carries no event");
}
