//! The GraphQL endpoint over HTTP and graphql-transport-ws, end to end.

use std::time::Duration;

use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_domain::ids::{DeploymentId, ProjectId};
use understudy_projections::environments::Environments;
use understudy_projections::Projector;
use understudy_tests::fixtures::{self, meta};
use understudy_tests::graphql_ws::{self, next_json};
use understudy_tests::{eventually, metric, TestEnv};
use uuid::Uuid;

struct Running {
    env: TestEnv,
    addr: std::net::SocketAddr,
    cancel: CancellationToken,
    _tasks: JoinSet<anyhow::Result<()>>,
}

async fn start() -> Running {
    let env = TestEnv::new().await;
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    env.runtime.spawn_relay(cancel.clone(), &mut tasks);
    env.runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
    let addr = env.runtime.serve_api("127.0.0.1:0".parse().expect("addr"), cancel.clone(), &mut tasks).await.expect("serve");
    Running { env, addr, cancel, _tasks: tasks }
}

/// A pull request environment (PR `number` of a new project) whose first deployment is Ready.
async fn ready_environment(app: &Running, number: u64) -> (ProjectId, understudy_domain::environment::EnvironmentSpec, Uuid, DeploymentId) {
    let project = ProjectId(Uuid::new_v4());
    let spec = fixtures::spec(project, number, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(Uuid::new_v4());
    let store = &app.env.runtime.store.environments;
    store.execute(id, fixtures::request(&spec, deployment, 1), meta()).await.expect("request");
    for command in fixtures::to_ready(deployment) {
        store.execute(id, command, meta()).await.expect("to ready");
    }
    (project, spec, id, deployment)
}

async fn post(addr: std::net::SocketAddr, body: Value) -> (u16, Value) {
    let response = reqwest::Client::new().post(format!("http://{addr}/graphql")).json(&body).send().await.expect("post");
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_serve_environments_and_history() {
    let app = start().await;
    let (project, _, id, _) = ready_environment(&app, 7).await;
    let query = json!({
        "query": "query($p: UUID) { environments(projectId: $p) { id status pullRequest entrypoint latestCommit previewUrl position } }",
        "variables": { "p": project.to_string() }
    });
    let environments = eventually(Duration::from_secs(20), "the environment to be Ready over GraphQL", || async {
        let (_, body) = post(app.addr, query.clone()).await;
        let list = body["data"]["environments"].as_array().cloned()?;
        (list.len() == 1 && list[0]["status"] == "READY").then_some(list)
    })
    .await;
    assert_eq!(environments[0]["id"], id.to_string());
    assert_eq!(environments[0]["pullRequest"], 7);
    assert_eq!(environments[0]["latestCommit"], fixtures::sha(1).to_string());

    let history = json!({ "query": format!("{{ history(id: \"{id}\") {{ position eventType actor aggregateVersion recordedAt }} }}") });
    let events = eventually(Duration::from_secs(20), "the history", || async {
        let (_, body) = post(app.addr, history.clone()).await;
        let list = body["data"]["history"].as_array().cloned()?;
        (list.len() == 5).then_some(list)
    })
    .await;
    let types: Vec<_> = events.iter().map(|e| e["eventType"].as_str().unwrap_or_default().to_string()).collect();
    assert_eq!(types, ["EnvironmentCreated", "DeploymentRequested", "BuildStarted", "BuildSucceeded", "DeploymentReady"]);
    assert!(events.iter().all(|e| e["actor"] == "system:test"));

    // Time travel: the environment as it was when it was only requested, and as it is now.
    let requested_at = events[1]["recordedAt"].as_str().expect("recordedAt").to_string();
    let state_query = |as_of: Option<&str>| {
        json!({
            "query": "query($id: UUID!, $at: DateTime) { entityState(id: $id, asOf: $at) { aggregateType events state } }",
            "variables": { "id": id.to_string(), "at": as_of }
        })
    };
    let (_, then) = post(app.addr, state_query(Some(&requested_at))).await;
    let then = &then["data"]["entityState"];
    assert_eq!(then["aggregateType"], "environment");
    assert_eq!(then["events"], 2, "{then}");
    assert_eq!(then["state"]["deployments"][0]["status"], "Requested");
    let (_, now) = post(app.addr, state_query(None)).await;
    assert_eq!(now["data"]["entityState"]["state"]["deployments"][0]["status"], "Ready");
    let (_, before) = post(app.addr, state_query(Some("2000-01-01T00:00:00Z"))).await;
    assert!(before["data"]["entityState"].is_null(), "{before}");

    // Usage analytics: counts and durations per project and day.
    let usage = eventually(Duration::from_secs(20), "usage", || async {
        let query = json!({
            "query": "query($p: UUID) { usage(projectId: $p) { day environmentsCreated deploymentsRequested deploymentsReady meanSecondsToReady } }",
            "variables": { "p": project.to_string() }
        });
        let (_, body) = post(app.addr, query).await;
        let rows = body["data"]["usage"].as_array().cloned()?;
        (rows.len() == 1 && rows[0]["deploymentsReady"] == 1).then(|| rows[0].clone())
    })
    .await;
    assert_eq!((usage["environmentsCreated"].as_i64(), usage["deploymentsRequested"].as_i64()), (Some(1), Some(1)));
    assert!(usage["meanSecondsToReady"].as_f64().is_some_and(|s| s >= 0.0), "{usage}");

    // Bad input gets a clear error, never a 5xx.
    let (status, body) = post(app.addr, json!({ "query": "{ history(id: \"not-a-uuid\") { position } }" })).await;
    assert_eq!(status, 200);
    assert!(body["errors"][0]["message"].as_str().unwrap_or_default().contains("not a UUID"), "{body}");
    let deep = format!("{{ __schema {{ types {{ {}name{} }} }} }}", "fields { type { ofType { ".repeat(5), " } } }".repeat(5));
    let (_, body) = post(app.addr, json!({ "query": deep })).await;
    assert!(body["errors"][0]["message"].as_str().unwrap_or_default().contains("nested too deep"), "{body}");
    let (_, body) = post(app.addr, json!({ "query": "{ environments(first: 100000) { id } }" })).await;
    assert!(body["errors"][0]["message"].as_str().unwrap_or_default().contains("less than or equal to 500"), "{body}");
    // Health and readiness for load balancers.
    let health = reqwest::get(format!("http://{}/healthz", app.addr)).await.expect("healthz");
    assert_eq!(health.status().as_u16(), 200);
    let ready = eventually(Duration::from_secs(20), "readiness", || async {
        let response = reqwest::get(format!("http://{}/readyz", app.addr)).await.ok()?;
        (response.status().as_u16() == 200).then_some(())?;
        response.json::<Value>().await.ok()
    })
    .await;
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["projections"].as_array().map(Vec::len), Some(understudy_projections::all().len()));
    // A projection far behind makes the node unready, and says which.
    sqlx::query("INSERT INTO projector_checkpoints (projection, position) VALUES ('lagging_probe', -1000000)")
        .execute(app.env.pool())
        .await
        .expect("a lagging projection");
    let response = reqwest::get(format!("http://{}/readyz", app.addr)).await.expect("readyz");
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = response.json().await.expect("json");
    assert!(body["problems"][0].as_str().unwrap_or_default().contains("projection lagging_probe is"), "{body}");

    // Prometheus metrics: this node's counters and what Postgres knows.
    let metrics = reqwest::get(format!("http://{}/metrics", app.addr)).await.expect("metrics");
    assert_eq!(metrics.status().as_u16(), 200);
    let text = metrics.text().await.expect("text");
    for line in [
        "understudy_events_appended_total{type=\"DeploymentReady\"}",
        "understudy_projector_lag_events{projection=\"environments\"} 0",
        "understudy_environments{status=\"Ready\"} 1",
        "understudy_log_head 5",
        "understudy_append_seconds_count",
    ] {
        assert!(text.contains(line), "{line} missing from:\n{text}");
    }

    let huge = "x".repeat(200 * 1024);
    let (status, _) = post(app.addr, json!({ "query": huge })).await;
    assert_eq!(status, 413, "an oversized query is refused");
    // Relay-style pages: three more environments, read two at a time.
    let store = &app.env.runtime.store.environments;
    for pr in 8..11 {
        let spec = fixtures::spec(project, pr, "main.w");
        store.execute(fixtures::env_id(&spec).0, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("request");
    }
    let page = |after: Option<String>| {
        json!({
            "query": "query($p: UUID, $after: String) { environmentsConnection(projectId: $p, first: 2, after: $after) { edges { cursor node { pullRequest } } pageInfo { hasNextPage endCursor } } }",
            "variables": { "p": project.to_string(), "after": after }
        })
    };
    let first_page = eventually(Duration::from_secs(20), "four environments", || async {
        let (_, body) = post(
            app.addr,
            json!({ "query": "query($p: UUID) { environments(projectId: $p) { id } }", "variables": { "p": project.to_string() } }),
        )
        .await;
        (body["data"]["environments"].as_array().map(Vec::len) == Some(4)).then_some(())?;
        let (_, body) = post(app.addr, page(None)).await;
        Some(body["data"]["environmentsConnection"].clone())
    })
    .await;
    assert_eq!(first_page["edges"].as_array().map(Vec::len), Some(2));
    assert_eq!(first_page["pageInfo"]["hasNextPage"], true);
    let (_, second) = post(app.addr, page(first_page["pageInfo"]["endCursor"].as_str().map(String::from))).await;
    let second = &second["data"]["environmentsConnection"];
    assert_eq!(second["edges"].as_array().map(Vec::len), Some(2));
    assert_eq!(second["pageInfo"]["hasNextPage"], false);
    let mut seen: Vec<i64> = first_page["edges"]
        .as_array()
        .into_iter()
        .chain(second["edges"].as_array())
        .flatten()
        .map(|e| e["node"]["pullRequest"].as_i64().unwrap_or(0))
        .collect();
    seen.sort();
    assert_eq!(seen, [7, 8, 9, 10], "every environment once across the pages");
    let (_, bad) = post(app.addr, page(Some("nonsense".into()))).await;
    assert!(bad["errors"][0]["message"].as_str().unwrap_or_default().contains("endCursor"), "{bad}");

    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_over_graphql_transport_ws_see_each_committed_change() {
    let app = start().await;
    let project = ProjectId(Uuid::new_v4());
    let mut ws = graphql_ws::connect(app.addr).await;
    let query = "subscription($p: UUID) { environmentUpdated(projectId: $p) { id status position } }";
    graphql_ws::subscribe(&mut ws, "1", query, json!({ "p": project.to_string() })).await;
    let spec = fixtures::spec(project, 1, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(Uuid::new_v4());
    let store = &app.env.runtime.store.environments;
    // Another project's change must never reach this subscriber.
    let other = fixtures::spec(ProjectId(Uuid::new_v4()), 1, "main.w");
    store.execute(fixtures::env_id(&other).0, fixtures::request(&other, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("other");
    // The server subscribes when it first polls the stream, which the client cannot observe: keep
    // changing the environment (deploy it, then record tests) until a Ready update arrives.
    let commands = fixtures::deploy_and_test(&spec, deployment, 40);
    let mut last_position = 0;
    let mut ready = false;
    for command in commands {
        store.execute(id, command, meta()).await.expect("command");
        while let Ok(message) = tokio::time::timeout(Duration::from_millis(500), next_json(&mut ws)).await {
            assert_eq!(message["type"], "next", "{message}");
            let environment = &message["payload"]["data"]["environmentUpdated"];
            assert_eq!(environment["id"], id.to_string(), "only this project's environments");
            let position = environment["position"].as_i64().expect("position");
            assert!(position >= last_position, "updates arrive in order");
            last_position = position;
            ready |= environment["status"] == "READY";
        }
        if ready {
            break;
        }
    }
    assert!(ready, "a subscriber saw the environment become Ready");

    // A client that reconnects with the last position it saw first gets what changed since.
    let mut again = graphql_ws::connect(app.addr).await;
    let query = "subscription($p: UUID, $after: Int) { environmentUpdated(projectId: $p, after: $after) { id status position } }";
    graphql_ws::subscribe(&mut again, "2", query, json!({ "p": project.to_string(), "after": 0 })).await;
    let resumed = tokio::time::timeout(Duration::from_secs(10), next_json(&mut again)).await.expect("the missed change at once");
    let environment = &resumed["payload"]["data"]["environmentUpdated"];
    assert_eq!(environment["id"], id.to_string());
    assert!(environment["position"].as_i64() >= Some(last_position), "{resumed}");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_live_subscriptions_share_one_execution_and_each_gets_every_change() {
    let app = start().await;
    let project = ProjectId(Uuid::new_v4());
    let query = "subscription($p: UUID) { environmentUpdated(projectId: $p) { id status position } }";
    let mut same = Vec::new();
    for _ in 0..3 {
        let mut ws = graphql_ws::connect(app.addr).await;
        graphql_ws::subscribe(&mut ws, "1", query, json!({ "p": project.to_string() })).await;
        same.push(ws);
    }
    // Another selection, and a resume with `after`, each run on their own.
    let mut narrower = graphql_ws::connect(app.addr).await;
    let narrow = "subscription($p: UUID) { environmentUpdated(projectId: $p) { id position } }";
    graphql_ws::subscribe(&mut narrower, "1", narrow, json!({ "p": project.to_string() })).await;
    let mut resumed = graphql_ws::connect(app.addr).await;
    let resume = "subscription($p: UUID) { environmentUpdated(projectId: $p, after: 0) { id status position } }";
    graphql_ws::subscribe(&mut resumed, "1", resume, json!({ "p": project.to_string() })).await;
    let store = &app.env.runtime.store.environments;
    // A subscription starts listening when the server first polls it, which a client cannot see:
    // change another environment until every socket has heard of it.
    let warm = fixtures::spec(project, 2, "main.w");
    let warm_id = fixtures::env_id(&warm).0;
    let warm_deployment = DeploymentId(Uuid::new_v4());
    let warming = fixtures::deploy_and_test(&warm, warm_deployment, 40);
    let mut heard = [false; 5];
    for command in warming {
        store.execute(warm_id, command, meta()).await.expect("warm-up");
        for (n, ws) in same.iter_mut().chain([&mut narrower, &mut resumed]).enumerate() {
            while let Ok(message) = tokio::time::timeout(Duration::from_millis(300), next_json(ws)).await {
                heard[n] |= message["payload"]["data"]["environmentUpdated"]["id"] == warm_id.to_string();
            }
        }
        if heard.iter().all(|h| *h) {
            break;
        }
    }
    assert!(heard.iter().all(|h| *h), "every socket hears a change: {heard:?}");
    assert_eq!(metric(app.addr, "understudy_active_subscriptions").await, 5);
    assert_eq!(metric(app.addr, "understudy_shared_subscription_executions").await, 2, "one per distinct shareable subscription");

    // Every change reaches every socket of the shared execution, in order.
    let spec = fixtures::spec(project, 1, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(Uuid::new_v4());
    let mut commands = vec![fixtures::request(&spec, deployment, 1)];
    commands.extend(fixtures::to_ready(deployment));
    let mut last = 0;
    for command in commands {
        store.execute(id, command, meta()).await.expect("command");
        let mut positions = Vec::new();
        for ws in same.iter_mut().chain([&mut narrower, &mut resumed]) {
            let message = tokio::time::timeout(Duration::from_secs(10), next_json(ws)).await.expect("each change reaches each socket");
            assert_eq!(message["type"], "next", "{message}");
            let environment = &message["payload"]["data"]["environmentUpdated"];
            assert_eq!(environment["id"], id.to_string(), "{message}");
            positions.push(environment["position"].as_i64().expect("position"));
        }
        assert!(positions.iter().all(|p| *p == positions[0] && *p > last), "one change, the same position everywhere: {positions:?}");
        last = positions[0];
    }

    // The shared execution ends with its last subscriber.
    drop(same);
    drop(narrower);
    eventually(Duration::from_secs(10), "the shared executions end", || async {
        (metric(app.addr, "understudy_shared_subscription_executions").await == 0).then_some(())
    })
    .await;
    assert_eq!(metric(app.addr, "understudy_active_subscriptions").await, 1, "the resumed one stays");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_websocket_protocols_answer_each_message_and_close_on_misuse() {
    let app = start().await;
    let live = "subscription($p: UUID) { environmentUpdated(projectId: $p) { id } }";
    let project = json!({ "p": Uuid::new_v4().to_string() });

    // Without a protocol we speak, no socket; without `connection_init`, not for long.
    assert_eq!(graphql_ws::open(app.addr, "mqtt", &[]).await.err(), Some(400));
    let mut silent = graphql_ws::open(app.addr, "graphql-transport-ws", &[]).await.expect("open");

    // graphql-transport-ws: ping, a subscription that fails at once, a stop, a repeated id.
    let mut ws = graphql_ws::connect(app.addr).await;
    graphql_ws::send(&mut ws, json!({ "type": "ping" })).await;
    assert_eq!(next_json(&mut ws).await, json!({ "type": "pong" }));
    graphql_ws::subscribe(&mut ws, "bad", "subscription { noSuchField }", json!({})).await;
    let failed = next_json(&mut ws).await;
    assert_eq!((&failed["type"], &failed["id"]), (&json!("next"), &json!("bad")), "{failed}");
    assert!(failed["payload"]["errors"][0]["message"].as_str().unwrap_or_default().contains("noSuchField"), "{failed}");
    assert_eq!(next_json(&mut ws).await, json!({ "type": "complete", "id": "bad" }));
    graphql_ws::subscribe(&mut ws, "live", live, project.clone()).await;
    graphql_ws::send(&mut ws, json!({ "type": "complete", "id": "live" })).await;
    assert_eq!(next_json(&mut ws).await, json!({ "type": "complete", "id": "live" }));
    // One socket runs at most so many subscriptions; the next is refused, the others run on.
    for n in 0..understudy_api::graphql_ws::MAX_SUBSCRIPTIONS {
        graphql_ws::subscribe(&mut ws, &format!("live-{n}"), live, project.clone()).await;
    }
    graphql_ws::subscribe(&mut ws, "one-too-many", live, project.clone()).await;
    let refused = next_json(&mut ws).await;
    assert_eq!((&refused["type"], &refused["id"]), (&json!("error"), &json!("one-too-many")), "{refused}");
    assert!(refused["payload"][0]["message"].as_str().unwrap_or_default().contains("already runs 100"), "{refused}");
    graphql_ws::send(&mut ws, json!({ "type": "complete", "id": "live-0" })).await;
    assert_eq!(next_json(&mut ws).await, json!({ "type": "complete", "id": "live-0" }));
    graphql_ws::subscribe(&mut ws, "live", live, project.clone()).await;
    graphql_ws::subscribe(&mut ws, "live", live, project.clone()).await;
    assert_eq!(graphql_ws::closed(&mut ws).await, (4409, "Subscriber for live already exists".to_string()));

    // A subscription before `connection_init`, a second `connection_init`, and what is not JSON
    // each close the socket with the protocol's code.
    let mut early = graphql_ws::open(app.addr, "graphql-transport-ws", &[]).await.expect("open");
    graphql_ws::subscribe(&mut early, "1", live, project.clone()).await;
    assert_eq!(graphql_ws::closed(&mut early).await.0, 4401);
    let mut twice = graphql_ws::connect(app.addr).await;
    graphql_ws::send(&mut twice, json!({ "type": "connection_init" })).await;
    assert_eq!(graphql_ws::closed(&mut twice).await.0, 4429);
    let mut garbled = graphql_ws::connect(app.addr).await;
    graphql_ws::send(&mut garbled, json!({ "type": "subscribe" })).await;
    let (code, reason) = graphql_ws::closed(&mut garbled).await;
    assert_eq!(code, 4400, "{reason}");
    // A reason that quotes the client is cut to fit its frame, so the client still reads the code.
    let mut long = graphql_ws::connect(app.addr).await;
    graphql_ws::send(&mut long, json!({ "type": "é".repeat(200) })).await;
    let (code, reason) = graphql_ws::closed(&mut long).await;
    assert_eq!(code, 4400, "{reason}");
    assert!(reason.len() <= 123 && reason.contains("unknown variant"), "{reason}");

    // The older graphql-ws protocol: `start`, and results as `data`.
    let mut legacy = graphql_ws::open(app.addr, "graphql-ws, graphql-transport-ws", &[]).await.expect("open");
    graphql_ws::send(&mut legacy, json!({ "type": "connection_init" })).await;
    assert_eq!(next_json(&mut legacy).await["type"], "connection_ack");
    graphql_ws::send(&mut legacy, json!({ "type": "start", "id": "7", "payload": { "query": "subscription { noSuchField }" } })).await;
    let data = next_json(&mut legacy).await;
    assert_eq!((&data["type"], &data["id"]), (&json!("data"), &json!("7")), "{data}");
    assert_eq!(next_json(&mut legacy).await, json!({ "type": "complete", "id": "7" }));

    let (code, _) =
        tokio::time::timeout(understudy_api::graphql_ws::INIT_TIMEOUT * 2, graphql_ws::closed(&mut silent)).await.expect("closed");
    assert_eq!(code, 4408);
    app.cancel.cancel();
}

/// How many Pings `ws` receives in `window`, reading (and so answering) all along; any other
/// frame fails the test.
async fn pings_within(ws: &mut graphql_ws::Socket, window: Duration) -> usize {
    use futures::StreamExt;
    let (mut pings, until) = (0, tokio::time::Instant::now() + window);
    while let Ok(frame) = tokio::time::timeout_at(until, ws.next()).await {
        match frame {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Ping(_))) => pings += 1,
            other => panic!("a quiet socket should only be pinged, got {other:?}"),
        }
    }
    pings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_sockets_are_pinged_and_those_that_never_answer_are_closed() {
    let keepalive = Duration::from_millis(500);
    let mut env = TestEnv::new().await;
    env.runtime.ws_keepalive = keepalive;
    let (cancel, mut tasks) = (CancellationToken::new(), JoinSet::new());
    let addr = env.runtime.serve_api("127.0.0.1:0".parse().expect("addr"), cancel.clone(), &mut tasks).await.expect("serve");

    // A client that reads answers each Ping by itself (as browsers do) and stays.
    let mut alive = graphql_ws::connect(addr).await;
    let pings = pings_within(&mut alive, keepalive * 6).await;
    assert!(pings >= 4, "{pings} pings in six intervals");
    graphql_ws::send(&mut alive, json!({ "type": "ping" })).await;
    assert_eq!(next_json(&mut alive).await, json!({ "type": "pong" }));

    // A client that reads nothing answers no Ping: its socket is closed within two intervals,
    // while the one that reads lives on.
    let mut gone = graphql_ws::connect(addr).await;
    pings_within(&mut alive, keepalive * 4).await;
    let (code, reason) = tokio::time::timeout(keepalive, graphql_ws::closed(&mut gone)).await.expect("already closed");
    assert_eq!(code, 1001, "{reason}");
    assert!(reason.contains("no answer to a ping"), "{reason}");
    graphql_ws::send(&mut alive, json!({ "type": "ping" })).await;
    assert_eq!(next_json(&mut alive).await, json!({ "type": "pong" }));

    // The older protocol's clients watch for `ka` messages.
    let mut legacy = graphql_ws::open(addr, "graphql-ws", &[]).await.expect("open");
    graphql_ws::send(&mut legacy, json!({ "type": "connection_init" })).await;
    assert_eq!(next_json(&mut legacy).await["type"], "connection_ack");
    assert_eq!(next_json(&mut legacy).await, json!({ "type": "ka" }));
    cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graphql_ws_npm_client_subscribes_too() {
    use tokio::io::{AsyncBufReadExt, BufReader};
    let app = start().await;
    let project = ProjectId(Uuid::new_v4());
    let script = format!("{}/js/subscribe.mjs", env!("CARGO_MANIFEST_DIR"));
    let mut node = tokio::process::Command::new("node")
        .args([script.as_str(), &format!("ws://{}/graphql", app.addr), &project.to_string(), "1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("node (scripts/setup installs the graphql-ws client)");
    let mut lines = BufReader::new(node.stdout.take().expect("stdout")).lines();
    let connected = tokio::time::timeout(Duration::from_secs(20), lines.next_line()).await.expect("connects").expect("read");
    assert_eq!(connected.as_deref(), Some(r#"{"connected":true}"#));
    // Keep changing the environment until the client has its update (it subscribes just after connecting).
    let spec = fixtures::spec(project, 1, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(Uuid::new_v4());
    let store = &app.env.runtime.store.environments;
    store.execute(id, fixtures::request(&spec, deployment, 1), meta()).await.expect("request");
    let mut commands = fixtures::to_ready(deployment).into_iter();
    let update = loop {
        match tokio::time::timeout(Duration::from_millis(500), lines.next_line()).await {
            Ok(line) => break line.expect("read").expect("an update line"),
            Err(_) => {
                let command = commands.next().expect("the client got nothing after every change");
                store.execute(id, command, meta()).await.expect("command");
            }
        }
    };
    let update: Value = serde_json::from_str(&update).expect("JSON");
    assert_eq!(update["data"]["environmentUpdated"]["id"], id.to_string(), "{update}");
    let status = tokio::time::timeout(Duration::from_secs(20), node.wait()).await.expect("exits").expect("status");
    assert!(status.success());
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn environments_are_redeployed_stopped_woken_and_retested_through_mutations() {
    let app = start().await;
    let (project, spec, id, deployment) = ready_environment(&app, 9).await;
    let mutate = |query: &str| json!({ "query": query, "variables": { "e": id.to_string() } });

    let (_, body) = post(app.addr, mutate("mutation($e: UUID!) { runTests(environmentId: $e) { status deployment { id status } } }")).await;
    assert_eq!(body["data"]["runTests"]["deployment"]["id"], deployment.to_string(), "{body}");
    let (_, body) = post(app.addr, mutate("mutation($e: UUID!) { stopEnvironment(environmentId: $e) { status } }")).await;
    assert_eq!(body["data"]["stopEnvironment"]["status"], "Stale", "{body}");
    let (_, body) =
        post(app.addr, mutate("mutation($e: UUID!) { wakeEnvironment(environmentId: $e) { status deployment { status commit } } }")).await;
    assert_eq!(body["data"]["wakeEnvironment"]["status"], "Requested", "{body}");
    assert_eq!(body["data"]["wakeEnvironment"]["deployment"]["commit"], fixtures::sha(1).to_string());
    let (_, body) = post(app.addr, mutate("mutation($e: UUID!) { redeploy(environmentId: $e) { status deployment { id status } } }")).await;
    let redeployed = body["data"]["redeploy"]["deployment"]["id"].as_str().expect("a new deployment").to_string();
    assert_eq!(body["data"]["redeploy"]["deployment"]["status"], "Requested", "{body}");
    let (_, body) = post(app.addr, mutate("mutation($e: UUID!) { stopEnvironment(environmentId: $e) { status } }")).await;
    assert_eq!(body["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "only a Ready or Failed environment stops: {body}");

    // The environment lists its deployments, newest first, and filters find it.
    let query = json!({
        "query": "query($p: UUID, $b: String) { environments(projectId: $p, branch: $b, pullRequest: 9) { id deployments { id status } } }",
        "variables": { "p": project.to_string(), "b": spec_branch(&spec) }
    });
    let deployments = eventually(Duration::from_secs(20), "the redeploy in the read model", || async {
        let (_, body) = post(app.addr, query.clone()).await;
        let list = body["data"]["environments"][0]["deployments"].as_array().cloned()?;
        (list.len() == 3).then_some(list)
    })
    .await;
    assert_eq!(deployments[0]["id"], redeployed);
    assert_eq!(deployments[2]["id"], deployment.to_string());
    let other_branch = json!({ "query": "query($p: UUID) { environments(projectId: $p, branch: \"nope\") { id } }", "variables": { "p": project.to_string() } });
    assert_eq!(post(app.addr, other_branch).await.1["data"]["environments"], json!([]));
    let history: Vec<String> = sqlx::query_scalar("SELECT event_type FROM event_log WHERE aggregate_id = $1 ORDER BY aggregate_version")
        .bind(id)
        .fetch_all(app.env.pool())
        .await
        .expect("history");
    for event in ["TestRunRequested", "EnvironmentDeactivated", "EnvironmentReactivated", "DeploymentSuperseded"] {
        assert!(history.iter().any(|e| e == event), "{event} missing from {history:?}");
    }
    app.cancel.cancel();
}

fn spec_branch(spec: &understudy_domain::environment::EnvironmentSpec) -> String {
    spec.target.label().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deployments_and_test_results_stream_as_they_change() {
    let app = start().await;
    let project = ProjectId(Uuid::new_v4());
    let spec = fixtures::spec(project, 11, "main.w");
    let id = fixtures::env_id(&spec).0;
    let deployment = DeploymentId(Uuid::new_v4());
    let store = &app.env.runtime.store.environments;
    store.execute(id, fixtures::request(&spec, deployment, 1), meta()).await.expect("request");
    // The read model knows the environment before anyone subscribes to it.
    eventually(Duration::from_secs(20), "the environment in the read model", || async {
        sqlx::query_scalar::<_, Uuid>("SELECT environment_id FROM environments WHERE environment_id = $1")
            .bind(id)
            .fetch_optional(app.env.pool())
            .await
            .ok()
            .flatten()
    })
    .await;
    let mut deployments = graphql_ws::connect(app.addr).await;
    graphql_ws::subscribe(
        &mut deployments,
        "d",
        "subscription($e: UUID!) { deploymentUpdated(environmentId: $e) { id status } }",
        json!({ "e": id.to_string() }),
    )
    .await;
    let first = tokio::time::timeout(Duration::from_secs(10), next_json(&mut deployments)).await.expect("the current deployment");
    assert_eq!(first["payload"]["data"]["deploymentUpdated"]["status"], "Requested", "{first}");
    let mut tests = graphql_ws::connect(app.addr).await;
    graphql_ws::subscribe(
        &mut tests,
        "t",
        "subscription($d: UUID!) { testResults(deploymentId: $d) { name outcome } }",
        json!({ "d": deployment.to_string() }),
    )
    .await;

    for command in fixtures::to_ready(deployment) {
        store.execute(id, command, meta()).await.expect("to ready");
    }
    let command = understudy_domain::environment::EnvironmentCommand::RecordTestResult {
        deployment_id: deployment,
        test: "smoke".into(),
        outcome: understudy_domain::environment::TestOutcome::Failed,
        duration_ms: Some(3),
        at: chrono::Utc::now(),
    };
    store.execute(id, command, meta()).await.expect("test");
    let result = tokio::time::timeout(Duration::from_secs(20), next_json(&mut tests)).await.expect("a test result");
    assert_eq!(result["payload"]["data"]["testResults"], json!({ "name": "smoke", "outcome": "Failed" }), "{result}");
    let ready = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let message = next_json(&mut deployments).await;
            if message["payload"]["data"]["deploymentUpdated"]["status"] == "Ready" {
                return message;
            }
        }
    })
    .await
    .expect("the deployment to become Ready on the stream");
    assert_eq!(ready["payload"]["data"]["deploymentUpdated"]["id"], deployment.to_string());
    app.cancel.cancel();
}

/// The API alone (no projector runs): the test projects the log itself and sends the notices.
async fn api_alone() -> Running {
    let env = TestEnv::new().await;
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let addr = env.runtime.serve_api("127.0.0.1:0".parse().expect("addr"), cancel.clone(), &mut tasks).await.expect("serve");
    Running { env, addr, cancel, _tasks: tasks }
}

/// A new environment of `project` (PR `pr`), with one event; its id.
async fn new_environment(app: &Running, project: ProjectId, pr: u64) -> Uuid {
    let spec = fixtures::spec(project, pr, "main.w");
    let id = fixtures::env_id(&spec).0;
    let store = &app.env.runtime.store.environments;
    store.execute(id, fixtures::request(&spec, DeploymentId(Uuid::new_v4()), 1), meta()).await.expect("request");
    id
}

/// `count` new environments of `project`, PRs from `first` on.
async fn new_environments(app: &Running, project: ProjectId, first: u64, count: u64) {
    use futures::StreamExt;
    futures::stream::iter(first..first + count)
        .for_each_concurrent(16, |pr| async move {
            new_environment(app, project, pr).await;
        })
        .await;
}

/// Numbers the log and projects it; `announced`: with change notices to this API, as a live
/// projector sends them, or else to another prefix (as when they are lost).
async fn project_log(app: &Running, announced: bool) {
    understudy_tests::sequence_all(app.env.pool()).await;
    if announced {
        app.env.project(understudy_projections::all()).await;
        return;
    }
    let elsewhere = understudy_adapters::nats::Topology::new(format!("{}x", app.env.prefix)).expect("topology");
    Projector::new(app.env.pool().clone(), app.env.runtime.nats.clone(), elsewhere, std::sync::Arc::new(Environments))
        .catch_up_from_log()
        .await
        .expect("projecting");
}

/// The position of an environment's first event.
async fn first_position(app: &Running, id: Uuid) -> i64 {
    sqlx::query_scalar("SELECT min(position) FROM event_log WHERE aggregate_id = $1")
        .bind(id)
        .fetch_one(app.env.pool())
        .await
        .expect("the first event's position")
}

/// Sends the change notice a projector would send for `id` at `position`.
async fn notice(app: &Running, project: ProjectId, id: Uuid, position: i64) {
    let read_model = understudy_projections::environments::READ_MODEL;
    let change = understudy_projections::Change { read_model: read_model.into(), key: project.to_string(), id, position };
    let subject = app.env.topology().changes_subject(read_model, &project.to_string());
    app.env.runtime.nats.publish(subject, serde_json::to_vec(&change).expect("notice").into()).await.expect("publish");
}

/// Subscribes to `project`'s environments `after` a position (none: live only).
async fn follow(app: &Running, project: ProjectId, after: Option<i64>) -> graphql_ws::Socket {
    let mut ws = graphql_ws::connect(app.addr).await;
    let query = "subscription($p: UUID, $a: Int) { environmentUpdated(projectId: $p, after: $a) { id position } }";
    graphql_ws::subscribe(&mut ws, "1", query, json!({ "p": project.to_string(), "a": after })).await;
    ws
}

/// A project with one environment, and a subscription to it resumed after 0 that has received
/// that environment: the project, the socket and the environment's position.
async fn resumed_after_one(app: &Running) -> (ProjectId, graphql_ws::Socket, i64) {
    let project = ProjectId(Uuid::new_v4());
    new_environment(app, project, 1).await;
    project_log(app, true).await;
    let mut ws = follow(app, project, Some(0)).await;
    let (_, position) = next_update(&mut ws, Duration::from_secs(5)).await.expect("the first environment, from the resume's page");
    (project, ws, position)
}

/// The next update's (environment id, position), within `wait`.
async fn next_update(ws: &mut graphql_ws::Socket, wait: Duration) -> Option<(String, i64)> {
    let message = tokio::time::timeout(wait, next_json(ws)).await.ok()?;
    let environment = &message["payload"]["data"]["environmentUpdated"];
    Some((environment["id"].as_str().expect("id").to_string(), environment["position"].as_i64().expect("position")))
}

/// Reads updates until `count` environments came, each past the one before it (from `last`);
/// how many came.
async fn in_order(ws: &mut graphql_ws::Socket, count: u64, mut last: i64) -> u64 {
    let mut seen = std::collections::HashSet::new();
    while let Some((id, position)) = next_update(ws, Duration::from_secs(5)).await {
        assert!(position > last, "in position order: {position} after {last}");
        last = position;
        seen.insert(id);
        if seen.len() as u64 == count {
            break;
        }
    }
    seen.len() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_comes_only_after_every_change_at_or_below_its_position() {
    let app = api_alone().await;
    let project = ProjectId(Uuid::new_v4());
    // A changes, then B, then A again: A's row ends past B's change.
    let spec = fixtures::spec(project, 1, "main.w");
    let (a, deployment) = (fixtures::env_id(&spec).0, DeploymentId(Uuid::new_v4()));
    let store = &app.env.runtime.store.environments;
    store.execute(a, fixtures::request(&spec, deployment, 1), meta()).await.expect("request A");
    let b = new_environment(&app, project, 2).await;
    store.execute(a, fixtures::to_ready(deployment).remove(0), meta()).await.expect("build A");
    project_log(&app, false).await;

    // A subscriber hears of A's first change while the notice of B's is still on the way: it
    // reads A as it is now, past B's change, so B must come first or a resume after A's
    // position would never send it.
    let mut ws = follow(&app, project, None).await;
    let a_first = first_position(&app, a).await;
    // The server subscribes when it first polls the stream: send the notice until it is heard.
    let first = loop {
        notice(&app, project, a, a_first).await;
        if let Some(update) = next_update(&mut ws, Duration::from_millis(300)).await {
            break update;
        }
    };
    let second = next_update(&mut ws, Duration::from_secs(5)).await.expect("a second update");
    assert_eq!(first.0, b.to_string(), "B's change, below A's position, comes first: {first:?} {second:?}");
    assert_eq!(second.0, a.to_string(), "{second:?}");
    assert!(first.1 < second.1, "in position order: {first:?} {second:?}");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_subscription_gets_every_change_it_missed_past_one_page() {
    let app = api_alone().await;
    let (project, other) = (ProjectId(Uuid::new_v4()), ProjectId(Uuid::new_v4()));
    let count = understudy_api::graphql::MAX_PAGE as u64 + 100;
    new_environments(&app, project, 1, count).await;
    new_environments(&app, other, 1, 50).await;
    project_log(&app, true).await;
    let mut ws = follow(&app, project, Some(0)).await;
    assert_eq!(in_order(&mut ws, count, 0).await, count, "every environment that changed after 0, not one page of them");
    assert_eq!(next_update(&mut ws, Duration::from_millis(300)).await, None, "only the project's own environments");
    // An operator's subscription, to every project's environments.
    let mut all = graphql_ws::connect(app.addr).await;
    graphql_ws::subscribe(&mut all, "1", "subscription { environmentUpdated(after: 0) { id position } }", json!({})).await;
    assert_eq!(in_order(&mut all, count + 50, 0).await, count + 50, "every project's environments");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_resync_a_subscription_gets_every_change_since_the_last_it_sent() {
    let app = api_alone().await;
    let (project, mut ws, last) = resumed_after_one(&app).await;
    // Past the resumed subscription's settling heal, which would make these good too.
    tokio::time::sleep(understudy_api::graphql::SETTLE + Duration::from_millis(200)).await;

    // More than a page of changes whose notices never reach this API (as while a projector's
    // connection to NATS was down).
    let count = understudy_api::graphql::MAX_PAGE as u64 + 100;
    new_environments(&app, project, 2, count).await;
    project_log(&app, false).await;
    assert!(next_update(&mut ws, Duration::from_millis(500)).await.is_none(), "no notice reached the API");

    // The projector, back, asks every reader to re-read.
    app.env.runtime.nats.publish(app.env.topology().resync_subject(), Vec::new().into()).await.expect("resync");
    assert_eq!(in_order(&mut ws, count, last).await, count, "every environment that changed since the last one sent");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_that_overtakes_a_resync_does_not_hide_what_the_resync_is_for() {
    let app = api_alone().await;
    let (project, mut ws, _) = resumed_after_one(&app).await;
    // A heal reaches back to what was sent a lookback before it, by the clock: let that be the
    // first environment, not B.
    tokio::time::sleep(understudy_api::graphql::HEAL_LOOKBACK + Duration::from_millis(200)).await;

    // A leader dies having committed A and B without announcing them; its successor says so
    // (the resync), then announces B, and B's notice reaches the API before the resync does.
    let a = new_environment(&app, project, 2).await;
    let b = new_environment(&app, project, 3).await;
    project_log(&app, false).await;
    notice(&app, project, b, first_position(&app, b).await).await;
    let got = next_update(&mut ws, Duration::from_secs(5)).await.expect("B");
    assert_eq!(got.0, b.to_string(), "{got:?}");
    app.env.runtime.nats.publish(app.env.topology().resync_subject(), Vec::new().into()).await.expect("resync");
    let got = next_update(&mut ws, Duration::from_secs(5)).await.expect("A, after the resync");
    assert_eq!(got.0, a.to_string(), "{got:?}");
    app.cancel.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notice_lost_just_after_a_resume_is_made_good_once_the_subscription_settles() {
    let app = api_alone().await;
    let (project, mut ws, last) = resumed_after_one(&app).await;
    // Right after the resume read its page, a change whose notice never reaches this API (as one
    // published on a NATS server that the subscription's interest had not reached yet).
    let second = new_environment(&app, project, 2).await;
    project_log(&app, false).await;
    let (id, position) =
        next_update(&mut ws, understudy_api::graphql::SETTLE * 5).await.expect("the change, once the subscription settled");
    assert_eq!((id, position > last), (second.to_string(), true));
    app.cancel.cancel();
}
