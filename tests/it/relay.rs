//! The relay: every numbered event reaches JetStream, a crash republishes and nothing doubles.

use understudy_adapters::relay;
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_tests::fixtures::{self, meta};
use understudy_tests::TestEnv;
use uuid::Uuid;

#[tokio::test]
async fn relays_every_event_once_and_resumes_after_a_crash() {
    let env = TestEnv::new().await;
    // This test numbers and publishes by hand.
    env.runtime.store.appends.stand_down();
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
    // The relay alone: the appending process does not stand in for it while it is down.
    env.runtime.store.appends.stand_down();
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
    // Every append the writer was told had committed is in the log, whatever the kills cancelled
    // on the connections it shares with the relay.
    let appended: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log").fetch_one(env.pool()).await.expect("count");
    assert_eq!(appended, 400, "appends acknowledged to the writer are missing from the log");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_relay_running_the_appending_process_numbers_publishes_and_says_so() {
    use futures::StreamExt;
    let env = TestEnv::new().await;
    let mut hints = env.runtime.nats.subscribe(env.topology().numbered_subject()).await.expect("subscribe");
    env.runtime.nats.flush().await.expect("flush");
    // No relay anywhere: only this process's standby can number and publish what it appends.
    let project = ProjectId(Uuid::new_v4());
    fixtures::deploy_prs(&env.runtime.store.environments, project, 0..10).await;
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log").fetch_one(env.pool()).await.expect("count");
    let cursors = understudy_tests::eventually(std::time::Duration::from_secs(30), "the standby to number and publish the log", || async {
        let (sequenced, published): (i64, i64) = sqlx::query_as(
            "SELECT (SELECT position FROM log_cursors WHERE name = 'sequenced'), (SELECT position FROM log_cursors WHERE name = 'published')",
        )
        .fetch_one(env.pool())
        .await
        .ok()?;
        (published == total).then_some((sequenced, published))
    })
    .await;
    assert_eq!(cursors, (total, total));
    let info = env.jetstream().get_stream(env.topology().stream_name()).await.expect("stream").info().await.expect("info").clone();
    assert_eq!(info.state.messages, total as u64, "every event once in the stream");
    // Each numbering was announced for the projectors: the last announcement is the head.
    let mut heard = 0;
    while heard < total {
        let hint = tokio::time::timeout(std::time::Duration::from_secs(10), hints.next()).await.expect("a hint").expect("subscribed");
        heard = std::str::from_utf8(&hint.payload).expect("text").parse().expect("a position");
    }
    assert_eq!(heard, total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_stood_down_leaves_the_log_to_the_relay() {
    let env = TestEnv::new().await;
    env.runtime.store.appends.stand_down();
    let project = ProjectId(Uuid::new_v4());
    fixtures::deploy_prs(&env.runtime.store.environments, project, 0..3).await;
    // Well past the standby's grace: nothing numbered, since no relay runs.
    tokio::time::sleep(relay::STANDBY_GRACE * 10).await;
    let unnumbered: i64 =
        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE position IS NULL").fetch_one(env.pool()).await.expect("count");
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM event_log").fetch_one(env.pool()).await.expect("count");
    assert!(total > 0 && unnumbered == total, "{unnumbered} of {total} events left unnumbered");
}
