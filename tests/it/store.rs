//! The command path and the global log: optimistic concurrency and gap-free order.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use understudy_adapters::{global_log, relay, CommandError};
use understudy_domain::environment::{EnvironmentCommand, EnvironmentStatus, TestOutcome};
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_domain::DomainError;
use understudy_tests::fixtures::{self, meta};
use understudy_tests::TestEnv;
use uuid::Uuid;

async fn count(pool: &sqlx::PgPool, sql: &str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.expect(sql)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixteen_writers_on_distinct_and_shared_aggregates_give_a_gap_free_order() {
    let env = TestEnv::new().await;
    let store = env.runtime.store.environments.clone();
    let project = ProjectId(Uuid::new_v4());
    // Two shared environments that 8 writers fight over, and 8 writers with their own.
    let shared: Vec<_> = (0..2).map(|i| fixtures::spec(project, 1000 + i, "main.w")).collect();
    for spec in &shared {
        let deployment = DeploymentId(Uuid::new_v4());
        store.execute(fixtures::env_id(spec).0, fixtures::request(spec, deployment, 1), meta()).await.expect("request");
        for command in fixtures::to_ready(deployment) {
            store.execute(fixtures::env_id(spec).0, command, meta()).await.expect("to ready");
        }
    }
    let setup_events = count(env.pool(), "SELECT count(*) FROM event_log").await;

    // A reader that follows the log while it is written and checks it never finds a hole.
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (pool, done) = (env.pool().clone(), done.clone());
        tokio::spawn(async move {
            let mut seen = 0i64;
            loop {
                let finished = done.load(Ordering::SeqCst);
                relay::sequence(&pool, 200).await.expect("sequence");
                let batch = global_log::read_after(&pool, seen, 1000).await.expect("read");
                for event in &batch {
                    assert_eq!(event.position, seen + 1, "the reader found a hole after position {seen}");
                    seen = event.position;
                }
                if finished && batch.is_empty() && global_log::read_after(&pool, seen, 1).await.expect("read").is_empty() {
                    let unnumbered: i64 =
                        sqlx::query_scalar("SELECT count(*) FROM event_log WHERE position IS NULL").fetch_one(&pool).await.expect("count");
                    if unnumbered == 0 {
                        return seen;
                    }
                }
            }
        })
    };

    // A second numberer racing the reader's (a relay and a standby): the cursor's lock keeps
    // them from numbering anything twice.
    let second = {
        let (pool, done) = (env.pool().clone(), done.clone());
        tokio::spawn(async move {
            while !done.load(Ordering::SeqCst) {
                relay::sequence(&pool, 50).await.expect("second numberer");
            }
        })
    };

    const PER_WRITER: usize = 25;
    let mut writers = Vec::new();
    for w in 0..16u64 {
        let store = store.clone();
        let shared = shared.clone();
        writers.push(tokio::spawn(async move {
            let mut events = 0usize;
            if w < 8 {
                // Own aggregate: a new commit each time, each one a deployment.
                let spec = fixtures::spec(project, w, "main.w");
                for i in 0..PER_WRITER {
                    let done = store
                        .execute(fixtures::env_id(&spec).0, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), i as u64 + 1), meta())
                        .await
                        .expect("own aggregate");
                    events += done.events.len();
                }
            } else {
                // Shared aggregate: every writer records its own tests on the same deployment.
                let spec = &shared[(w % 2) as usize];
                let state = store.load(fixtures::env_id(spec).0).await.expect("load");
                let deployment = state.inner().current().expect("deployed").id;
                for i in 0..PER_WRITER {
                    let command = EnvironmentCommand::RecordTestResult {
                        deployment_id: deployment,
                        test: format!("writer-{w}-test-{i}"),
                        outcome: TestOutcome::Passed,
                        duration_ms: None,
                        at: chrono::Utc::now(),
                    };
                    events += store.execute(fixtures::env_id(spec).0, command, meta()).await.expect("shared aggregate").events.len();
                }
            }
            events
        }));
    }
    let mut written = 0usize;
    for writer in writers {
        written += writer.await.expect("writer");
    }
    done.store(true, Ordering::SeqCst);
    let seen = reader.await.expect("reader");
    second.await.expect("second numberer");

    let total = setup_events + written as i64;
    assert_eq!(seen, total, "the reader saw every event once, in one gap-free order");
    assert_eq!(count(env.pool(), "SELECT count(*) FROM event_log").await, total);
    assert_eq!(count(env.pool(), "SELECT count(*) FROM environment_events").await, total, "aggregate table and log agree");
    assert_eq!(count(env.pool(), "SELECT max(position) FROM event_log").await, total);
    assert_eq!(count(env.pool(), "SELECT count(DISTINCT position) FROM event_log").await, total, "no position given twice");
    // No lost update on the shared aggregates: every writer's every test is there.
    for spec in &shared {
        let state = store.load(fixtures::env_id(spec).0).await.expect("load").into_inner();
        assert_eq!(state.current().expect("deployed").tests.len(), 4 * PER_WRITER);
        assert_eq!(state.status(), Some(EnvironmentStatus::Ready));
    }
}

#[tokio::test]
async fn a_slow_writer_neither_holds_numbering_back_nor_is_skipped() {
    let env = TestEnv::new().await;
    let store = env.runtime.store.environments.clone();
    let project = ProjectId(Uuid::new_v4());
    // A writer whose transaction is open while others commit after it: it holds a transaction id
    // older than theirs.
    let mut slow = env.pool().begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO event_log (event_id, aggregate_type, aggregate_id, aggregate_version, event_type, schema_version, payload,
             recorded_at, correlation_id, actor) VALUES ($1, 'probe', $1, 1, 'Probe', 1, '{}', now(), $1, 'system:test')",
    )
    .bind(Uuid::new_v4())
    .execute(&mut *slow)
    .await
    .expect("slow insert");
    let spec = fixtures::spec(project, 1, "main.w");
    let fast =
        store.execute(fixtures::env_id(&spec).0, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("fast");
    assert_eq!(fast.events.len(), 2);

    // What committed is numbered now, whatever is still running.
    let (numbered, head) = relay::sequence(env.pool(), 100).await.expect("sequence");
    assert_eq!((numbered, head), (2, 2), "the committed events are numbered while an older transaction runs");
    slow.commit().await.expect("commit slow");
    assert_eq!(understudy_tests::sequence_all(env.pool()).await, 3);
    let order: Vec<(i64, String)> =
        global_log::read_after(env.pool(), 0, 10).await.expect("read").into_iter().map(|e| (e.position, e.event_type)).collect();
    let expected = [(1, "EnvironmentCreated"), (2, "DeploymentRequested"), (3, "Probe")].map(|(p, t)| (p, t.to_string()));
    assert_eq!(order, expected, "the late commit comes after, at the next position: nothing skipped, nothing renumbered");
}

#[tokio::test]
async fn refused_commands_append_nothing_and_say_why() {
    let env = TestEnv::new().await;
    let store = env.runtime.store.environments.clone();
    let deployment = DeploymentId(Uuid::new_v4());
    let spec = fixtures::spec(ProjectId(Uuid::new_v4()), 5, "main.w");
    let id = fixtures::env_id(&spec).0;
    store.execute(id, fixtures::request(&spec, deployment, 1), meta()).await.expect("request");
    let error = store
        .execute(id, EnvironmentCommand::MarkReady { deployment_id: deployment, url: "http://x".into(), at: chrono::Utc::now() }, meta())
        .await
        .expect_err("not started");
    assert!(matches!(error, CommandError::Domain(DomainError::IllegalTransition { status: "Requested", .. })), "{error:?}");
    assert!(error.to_string().contains("needs it to be Starting"), "{error}");
    // A redelivered request is a no-op.
    let again = store.execute(id, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("again");
    assert!(again.events.is_empty());
    assert_eq!(count(env.pool(), "SELECT count(*) FROM event_log").await, 2);
    let ids: HashSet<Uuid> =
        sqlx::query_scalar("SELECT event_id FROM event_log").fetch_all(env.pool()).await.expect("ids").into_iter().collect();
    assert_eq!(ids.len(), 2);
}

/// Two processes, two caches of aggregate states. Whatever one process kept, a command it runs
/// is decided on the state the other process left: a stale state is never acted on.
#[tokio::test]
async fn a_state_kept_by_one_process_and_changed_by_another_is_never_acted_on() {
    use understudy_adapters::event_store::AggregateStore;
    use understudy_domain::environment::{DeploymentStatus, EnvironmentAggregate};

    let env = TestEnv::new().await;
    let here: AggregateStore<EnvironmentAggregate> = AggregateStore::new(env.pool().clone()).await.expect("store");
    let there: AggregateStore<EnvironmentAggregate> = AggregateStore::new(env.pool().clone()).await.expect("store");
    let spec = fixtures::spec(ProjectId(Uuid::new_v4()), 6, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(Uuid::new_v4());
    let [start, complete, ready] = <[EnvironmentCommand; 3]>::try_from(fixtures::to_ready(deployment)).expect("three steps");

    // `here` keeps the state at Requested; `there` moves it on to Starting.
    here.execute(id, fixtures::request(&spec, deployment, 1), meta()).await.expect("request");
    assert_eq!(here.load(id).await.expect("load").version(), 2);
    there.execute(id, start, meta()).await.expect("start");
    there.execute(id, complete, meta()).await.expect("complete");

    // On its kept state `here` would refuse (Requested cannot become Ready): it reads again and
    // accepts, at the version after the other process's events.
    let done = here.execute(id, ready.clone(), meta()).await.expect("ready on the fresh state");
    assert_eq!(done.events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), [5]);
    assert_eq!(done.state.current().map(|d| d.status), Some(DeploymentStatus::Ready));

    // `there` kept Starting; the same command there is refused by its own append losing to the
    // version `here` took, then decided afresh: already Ready, so refused or a no-op, never a
    // second event.
    let again = there.execute(id, ready, meta()).await;
    assert!(again.as_ref().map_or(true, |done| done.events.is_empty()), "{again:?}");
    // A load catches up from the kept version.
    let loaded = there.load(id).await.expect("load");
    assert_eq!((loaded.version(), loaded.inner().current().map(|d| d.status)), (5, Some(DeploymentStatus::Ready)));

    let versions: Vec<i64> = sqlx::query_scalar("SELECT aggregate_version FROM event_log WHERE aggregate_id = $1 ORDER BY id")
        .bind(id)
        .fetch_all(env.pool())
        .await
        .expect("versions");
    assert_eq!(versions, [1, 2, 3, 4, 5], "one event per version, none doubled");
    let stored: i64 = count(env.pool(), "SELECT count(*) FROM environment_events").await;
    assert_eq!(stored, 5, "the esrs table and the global log hold the same events");
}

/// Before migration 12 each event was written twice, to its esrs table and to the global log; from
/// it on, the log alone holds it and the esrs table is a view. A database written the old way
/// reads the same afterwards, and commands go on from where its aggregates were.
#[tokio::test]
async fn events_stored_twice_before_migration_12_read_the_same_from_the_log_after_it() {
    use understudy_domain::environment::{EnvironmentAggregate, EnvironmentEvent};
    use understudy_domain::{Aggregate, DomainEvent, Recorded};
    let (database, database_url, prefix) = TestEnv::create_database().await;
    let pool = understudy_adapters::db::connect(&database_url, 2).await.expect("connect");
    let mut migrator = sqlx::migrate!("../migrations");
    migrator.migrations = migrator.migrations.iter().filter(|m| m.version <= 11).cloned().collect::<Vec<_>>().into();
    migrator.run(&pool).await.expect("migrations up to 11");

    // One environment requested and building, stored as migration 11 left the store: each event
    // in the esrs table and in the log, written by one statement.
    let spec = fixtures::spec(ProjectId(Uuid::new_v4()), 1, "main.w");
    let (environment, deployment) = (fixtures::env_id(&spec).0, DeploymentId(Uuid::new_v4()));
    let mut state = Default::default();
    let mut recorded = Vec::new();
    for command in
        [fixtures::request(&spec, deployment, 1), EnvironmentCommand::StartBuild { deployment_id: deployment, at: chrono::Utc::now() }]
    {
        for event in EnvironmentAggregate::decide(&state, command).expect("decide") {
            state = EnvironmentAggregate::apply(state, &event);
            recorded.push(Recorded { meta: meta(), event });
        }
    }
    for (version, event) in (1..).zip(&recorded) {
        sqlx::query(
            "WITH stored AS (
                 INSERT INTO environment_events (id, aggregate_id, payload, occurred_on, sequence_number) VALUES ($1, $2, $3, now(), $4)
             )
             INSERT INTO event_log (event_id, aggregate_type, aggregate_id, aggregate_version, event_type, schema_version, payload,
                 recorded_at, correlation_id, actor)
             VALUES ($1, 'environment', $2, $4, $5, 1, $3->'event', now(), $6, $7)",
        )
        .bind(Uuid::now_v7())
        .bind(environment)
        .bind(event.to_json())
        .bind(version)
        .bind(event.event.event_type())
        .bind(event.meta.correlation_id)
        .bind(&event.meta.actor)
        .execute(&pool)
        .await
        .expect("store as migration 11 did");
    }
    pool.close().await;

    let env = TestEnv::connect(database, database_url, prefix).await;
    assert_eq!(count(env.pool(), "SELECT count(*) FROM event_log").await, recorded.len() as i64, "no event lost or doubled");
    let payloads: Vec<serde_json::Value> =
        sqlx::query_scalar("SELECT payload FROM environment_events WHERE aggregate_id = $1 ORDER BY sequence_number")
            .bind(environment)
            .fetch_all(env.pool())
            .await
            .expect("the esrs view");
    let read: Vec<Recorded<EnvironmentEvent>> = payloads.into_iter().map(|p| Recorded::from_json(p).expect("a stored event")).collect();
    assert_eq!(read, recorded, "the esrs view gives each event back as it was recorded");

    let store = env.runtime.store.environments.clone();
    assert_eq!(store.load(environment).await.expect("load").version(), recorded.len() as i32);
    let built = store
        .execute(environment, EnvironmentCommand::CompleteBuild { deployment_id: deployment, at: chrono::Utc::now() }, meta())
        .await
        .expect("the build completes: the aggregate was read as it stood");
    assert_eq!(built.events.iter().map(|e| e.sequence_number).collect::<Vec<_>>(), vec![recorded.len() as i32 + 1]);
    assert_eq!(count(env.pool(), "SELECT count(*) FROM environment_events").await, recorded.len() as i64 + 1);
}

/// Group commit: commands appended while others are on their way go as one statement. A
/// statement is all or nothing, so when one command of a group cannot be stored (a stale
/// version, a payload Postgres refuses), the rest must still commit and only that command may
/// hear of it.
#[tokio::test]
async fn commands_appended_together_commit_together_and_a_bad_one_fails_alone() {
    use understudy_adapters::event_store::AggregateStore;
    use understudy_domain::environment::EnvironmentAggregate;

    const COMMANDS: u64 = 24;
    let env = TestEnv::new().await;
    let store = env.runtime.store.environments.clone();
    let project = ProjectId(Uuid::new_v4());
    let (ids, deployments) = deployed(&store, project, COMMANDS).await;
    let result = |i: usize, test: &str| passed(deployments[i], test);
    // The transactions that wrote a test's results: one per statement.
    let transactions = |test: &'static str| {
        let pool = env.pool().clone();
        async move {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(DISTINCT transaction_id) FROM event_log WHERE event_type = 'TestPassed' AND payload->>'test' = $1",
            )
            .bind(test)
            .fetch_one(&pool)
            .await
            .expect("count")
        }
    };

    // Every state is kept, so each command reaches the queue without a read: all of them queue
    // before the first statement goes, and go as one.
    let together = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| store.execute(*id, result(i, "first"), meta()))).await;
    assert!(together.iter().all(Result::is_ok), "{together:?}");
    assert_eq!(transactions("first").await, 1, "{COMMANDS} commands, one statement");
    assert_eq!(count(env.pool(), "SELECT count(*) FROM event_log WHERE payload->>'test' = 'first'").await, COMMANDS as i64);

    // Another process moves environment 0 on, so this process's command there names a version
    // already taken: the group's statement fails, and only that command may hear of it. And
    // environment 1's command carries a NUL, which Postgres cannot store: it is refused, alone,
    // with a clear reason.
    let there: AggregateStore<EnvironmentAggregate> = AggregateStore::new(env.pool().clone()).await.expect("store");
    there.execute(ids[0], result(0, "elsewhere"), meta()).await.expect("the other process");
    let outcomes = futures::future::join_all(
        ids.iter().enumerate().map(|(i, id)| store.execute(*id, result(i, if i == 1 { "sec\0ond" } else { "second" }), meta())),
    )
    .await;
    for (i, outcome) in outcomes.iter().enumerate() {
        match i {
            1 => assert!(
                matches!(outcome, Err(CommandError::Domain(DomainError::Invalid { reason, .. })) if reason.contains("NUL character")),
                "the NUL is refused, to its own command: {outcome:?}"
            ),
            _ => assert_eq!(outcome.as_ref().map(|done| done.events.len()).ok(), Some(1), "command {i} commits: {outcome:?}"),
        }
    }
    assert_eq!(count(env.pool(), "SELECT count(*) FROM event_log WHERE payload->>'test' = 'second'").await, COMMANDS as i64 - 1);
    // Environment 0's command lost the race, read afresh and went after the other process's.
    let zero = store.load(ids[0]).await.expect("load").into_inner();
    let tests: Vec<&str> = zero.current().expect("deployed").tests.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(tests, ["first", "elsewhere", "second"]);
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT aggregate_version FROM event_log WHERE aggregate_id = $1 ORDER BY aggregate_version")
            .bind(ids[0])
            .fetch_all(env.pool())
            .await
            .expect("versions");
    assert_eq!(versions, (1..=8).collect::<Vec<i64>>(), "one event per version, none doubled");
}

/// Two processes whose groups hold the same aggregates, queued in opposite orders, wait on each
/// other instead of deadlocking: every group takes the log's unique index entries sorted by
/// aggregate, so whichever statement is first takes them all first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_groups_over_the_same_aggregates_never_deadlock() {
    use understudy_adapters::event_store::AggregateStore;
    use understudy_adapters::metrics::METRICS;
    use understudy_domain::environment::EnvironmentAggregate;

    const COMMANDS: u64 = 16;
    let env = TestEnv::new().await;
    let here = env.runtime.store.environments.clone();
    let there: AggregateStore<EnvironmentAggregate> = AggregateStore::new(env.pool().clone()).await.expect("store");
    let project = ProjectId(Uuid::new_v4());
    let (ids, deployments) = deployed(&here, project, COMMANDS).await;
    for id in &ids {
        there.load(*id).await.expect("load");
    }
    let result = |i: usize, test: &str| passed(deployments[i], test);
    // Each row now takes 20 ms to insert, so both groups' statements are in flight together, and
    // taken in the order queued they would each hold what the other wants next.
    for statement in [
        "CREATE FUNCTION slow_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.02); RETURN NEW; END $$",
        "CREATE TRIGGER slow_row BEFORE INSERT ON event_log FOR EACH ROW EXECUTE FUNCTION slow_row()",
    ] {
        sqlx::query(statement).execute(env.pool()).await.expect("the slow trigger");
    }
    let (deadlocks, conflicts) = (METRICS.append_group_failures.get("deadlock"), METRICS.append_group_failures.get("conflict"));

    let forward = futures::future::join_all(ids.iter().enumerate().map(|(i, id)| here.execute(*id, result(i, "here"), meta())));
    let backward = futures::future::join_all(ids.iter().enumerate().rev().map(|(i, id)| there.execute(*id, result(i, "there"), meta())));
    let (forward, backward) = tokio::join!(forward, backward);
    assert!(forward.iter().chain(&backward).all(Result::is_ok), "every command lands: {forward:?} {backward:?}");

    assert_eq!(METRICS.append_group_failures.get("deadlock") - deadlocks, 0, "no group deadlocked");
    assert!(METRICS.append_group_failures.get("conflict") > conflicts, "one group lost the race to the other");
    let doubled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT aggregate_id FROM event_log WHERE event_type = 'TestPassed'
         GROUP BY aggregate_id HAVING count(*) <> 2) AS wrong",
    )
    .fetch_one(env.pool())
    .await
    .expect("count");
    assert_eq!(doubled, 0, "each environment has one result from each process");
}

#[tokio::test]
async fn a_transaction_cancelled_while_it_begins_leaves_its_connection_outside_any_transaction() {
    use sqlx::Connection;
    let env = TestEnv::new().await;
    // One connection, so that whatever a cancelled BEGIN leaves on it, the next borrower gets;
    // through a proxy that holds Postgres's answers back, so that BEGIN's answer cannot be in
    // before its first poll looks for it (on a loaded machine it often would be).
    let options: sqlx::postgres::PgConnectOptions = env.database_url.parse().expect("URL");
    let server = format!("{}:{}", options.get_host(), options.get_port());
    let proxy = answers_held_back(&server, std::time::Duration::from_millis(5)).await;
    let pool = understudy_adapters::db::connect(&env.database_url.replacen(&server, &proxy.to_string(), 1), 1).await.expect("pool");
    sqlx::query("CREATE TABLE after_cancelled_begins (n int)").execute(&pool).await.expect("table");
    for n in 0..20 {
        // A task aborted, a client gone, a timeout: BEGIN is on the wire, its answer not yet in.
        let mut connection = pool.acquire().await.expect("acquire");
        let mut begin = connection.begin();
        assert!(futures::poll!(&mut begin).is_pending(), "BEGIN was answered at once: the test proves nothing");
        drop(begin);
        drop(connection);
        // A write without a transaction right after is committed: another connection sees it.
        sqlx::query("INSERT INTO after_cancelled_begins VALUES ($1)").bind(n).execute(&pool).await.expect("insert");
        let seen: i64 = sqlx::query_scalar("SELECT count(*) FROM after_cancelled_begins WHERE n = $1")
            .bind(n)
            .fetch_one(env.pool())
            .await
            .expect("count");
        assert_eq!(seen, 1, "a write after a cancelled BEGIN ran inside the transaction it left open");
    }
}

/// A TCP proxy to `server` that passes requests on at once and each answer `delay` late; its
/// address. It runs until the test's runtime ends.
async fn answers_held_back(server: &str, delay: std::time::Duration) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = server.to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(upstream) = tokio::net::TcpStream::connect(&server).await else { continue };
            let (mut client_read, mut client_write) = client.into_split();
            let (mut upstream_read, mut upstream_write) = upstream.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut client_read, &mut upstream_write).await });
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 64 * 1024];
                while let Ok(read) = upstream_read.read(&mut buffer).await {
                    tokio::time::sleep(delay).await;
                    if read == 0 || client_write.write_all(&buffer[..read]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// `count` pull requests of `project` deployed: their environments' ids and current deployments.
async fn deployed(
    store: &understudy_adapters::event_store::AggregateStore<understudy_domain::environment::EnvironmentAggregate>,
    project: ProjectId,
    count: u64,
) -> (Vec<Uuid>, Vec<DeploymentId>) {
    fixtures::deploy_prs(store, project, 0..count).await;
    let ids: Vec<Uuid> = (0..count).map(|pr| fixtures::env_id(&fixtures::spec(project, pr, "main.w")).0).collect();
    let mut deployments = Vec::new();
    for id in &ids {
        deployments.push(store.load(*id).await.expect("load").inner().current().expect("deployed").id);
    }
    (ids, deployments)
}

/// A passed result of `test` for `deployment`.
fn passed(deployment: DeploymentId, test: &str) -> EnvironmentCommand {
    EnvironmentCommand::RecordTestResult {
        deployment_id: deployment,
        test: test.into(),
        outcome: TestOutcome::Passed,
        duration_ms: None,
        at: chrono::Utc::now(),
    }
}
