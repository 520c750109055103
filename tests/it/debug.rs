//! Debug access to a failed environment: a session starts a fresh instance of the failed
//! deployment, its tunnel lets in only the session's token (and never hands it to the app), its
//! files and log are readable, every step is an event, and closing or terminating ends it all.

use std::time::Duration;

use serde_json::{json, Value};
use understudy_domain::environment::EnvironmentCommand;
use understudy_tests::eventually;

use crate::preview::{Previews, DOMAIN};

/// Answers 500 to everything (so its health check never passes and it fails to start), with
/// the request's headers, so the test sees what reached it.
const BROKEN: &str = r#"const http = require("http");
console.log("broken app listening");
http.createServer((req, res) => {
  res.writeHead(500, { "content-type": "application/json" });
  res.end(JSON.stringify({ broken: true, headers: req.headers }));
}).listen(Number(process.env.PORT), "127.0.0.1");
"#;

async fn graphql(previews: &Previews, query: &str, variables: Value) -> Value {
    let body = json!({ "query": query, "variables": variables });
    previews.http.post(format!("http://{}/graphql", previews.addr)).json(&body).send().await.expect("post").json().await.expect("JSON")
}

const OPEN: &str = "mutation($e: UUID!, $m: Int) { openDebugSession(environmentId: $e, minutes: $m) {
    token browserUrl session { id url filesUrl logsUrl state expiresAt by } } }";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_debug_session_tunnels_to_a_fresh_instance_of_a_failed_deployment_for_its_token_only() {
    let previews = Previews::start_configured(|config| config.start_timeout = Duration::from_secs(2)).await;
    let (environment, _) = previews.request_app("local/broken", &[("server.js", BROKEN)]).await;
    let row = previews.settled(environment, &["Ready", "Failed"]).await;
    assert_eq!(row.0, "Failed", "{row:?}");
    let e = json!(environment.0.to_string());

    // Bad input is refused with a reason.
    let answer = graphql(&previews, OPEN, json!({ "e": e, "m": 0 })).await;
    assert_eq!(answer["errors"][0]["extensions"]["code"], "BAD_USER_INPUT", "{answer}");

    let answer = graphql(&previews, OPEN, json!({ "e": e, "m": 10 })).await;
    let opened = answer["data"]["openDebugSession"].clone();
    let token = opened["token"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
    let session = opened["session"]["id"].as_str().expect("id").to_string();
    assert!(token.starts_with("usd_"), "{token}");
    let host = format!("debug-{}.{DOMAIN}", session.replace('-', ""));
    assert_eq!(opened["session"]["url"], format!("http://{host}/"));
    assert!(opened["browserUrl"].as_str().expect("url").ends_with(&format!("/.understudy/debug?token={token}")));

    // The tunnel: only the token passes; the app answers (its own 500) once the instance runs.
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().expect("client");
    let tunnel = |path: &str| client.get(format!("http://{}{path}", previews.addr)).header("host", &host);
    let seen: Value = eventually(Duration::from_secs(120), "the debug instance to answer", || async {
        let response = tunnel("/anything").header("x-understudy-debug-token", &token).send().await.ok()?;
        if response.status() != 500 {
            return None;
        }
        response.json::<Value>().await.ok().filter(|body| body["broken"] == true)
    })
    .await;
    let headers = &seen["headers"];
    assert!(headers.get("x-understudy-debug-token").is_none(), "the token never reaches the app: {headers}");
    assert!(headers["x-understudy-token"].is_string(), "the app gets its preview token as always: {headers}");
    for wrong in [None, Some("usd_0000"), Some("")] {
        let mut request = tunnel("/");
        if let Some(wrong) = wrong {
            request = request.header("x-understudy-debug-token", wrong);
        }
        assert_eq!(request.send().await.expect("tunnel").status(), 401, "{wrong:?}");
    }
    // A browser trades the token for a host-only cookie; the cookie is not forwarded either.
    let handoff = tunnel("/.understudy/debug?token=usd_wrong").send().await.expect("handoff");
    assert_eq!(handoff.status(), 403);
    let handoff = tunnel(&format!("/.understudy/debug?token={token}")).send().await.expect("handoff");
    assert!(handoff.status().is_redirection(), "{}", handoff.status());
    let cookie = handoff.headers()["set-cookie"].to_str().expect("cookie").to_string();
    assert!(cookie.starts_with("understudy_debug=") && cookie.contains("HttpOnly") && !cookie.contains("Domain="), "{cookie}");
    let pair = cookie.split(';').next().expect("pair").to_string();
    let response = tunnel("/").header("cookie", format!("theme=dark; {pair}")).send().await.expect("tunnel");
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["headers"]["cookie"], "theme=dark", "{body}");

    // Its files and its log, each read an event.
    let base = format!("http://{}/environments/{}/debug/{session}", previews.addr, environment.0);
    let files: Value = previews.http.get(format!("{base}/files")).send().await.expect("files").json().await.expect("JSON");
    assert_eq!(files["state"], "running", "{files}");
    let paths: Vec<&str> = files["files"].as_array().expect("files").iter().filter_map(|f| f["path"].as_str()).collect();
    assert!(paths.contains(&"server.js") && paths.contains(&"package.json"), "{paths:?}");
    let log = previews.http.get(format!("{base}/logs")).send().await.expect("logs").text().await.expect("text");
    assert!(log.contains(&format!("debug session {session}")) && log.contains("broken app listening"), "{log}");
    let answer = graphql(&previews, "query($e: UUID!) { environment(id: $e) { debugSessions { id state by } } }", json!({ "e": e })).await;
    assert_eq!(answer["data"]["environment"]["debugSessions"], json!([{ "id": session, "state": "running", "by": "operator:open" }]));

    // Closing ends the tunnel, the instance and its work dir; the history tells it all.
    let close = "mutation($e: UUID!, $s: UUID!) { closeDebugSession(environmentId: $e, sessionId: $s) }";
    let answer = graphql(&previews, close, json!({ "e": e, "s": session })).await;
    assert_eq!(answer["data"]["closeDebugSession"], true, "{answer}");
    assert_eq!(previews.http.get(format!("{base}/files")).send().await.expect("files").status(), 410);
    eventually(Duration::from_secs(30), "the tunnel to close (once the read model has the news)", || async {
        let status = tunnel("/").header("x-understudy-debug-token", &token).send().await.ok()?.status();
        (status == 404).then_some(())
    })
    .await;
    let work_dir =
        previews.tmp.path().join("previews").join(environment.0.simple().to_string()).join(format!("debug-{}", session.replace('-', "")));
    let pool = &previews.env.runtime.pool;
    eventually(Duration::from_secs(30), "the instance to stop", || async {
        let done: bool =
            sqlx::query_scalar("SELECT done FROM debug_instances WHERE session_id = $1::uuid").bind(&session).fetch_one(pool).await.ok()?;
        (done && !work_dir.exists()).then_some(())
    })
    .await;
    let events: Vec<(String, Value, String)> = sqlx::query_as(
        "SELECT event_type, payload, actor FROM event_log WHERE aggregate_id = $1 AND event_type LIKE 'Debug%' ORDER BY position",
    )
    .bind(environment.0)
    .fetch_all(pool)
    .await
    .expect("history");
    let kinds: Vec<(&str, &str)> =
        events.iter().map(|(kind, payload, _)| (kind.as_str(), payload["what"].as_str().unwrap_or("-"))).collect();
    assert_eq!(
        kinds,
        [("DebugSessionOpened", "-"), ("DebugAccessed", "files"), ("DebugAccessed", "logs"), ("DebugSessionClosed", "-")],
        "{events:?}"
    );
    assert!(!events.iter().any(|(_, payload, _)| payload.to_string().contains(&token)), "only the token's hash is kept");

    // A session on an environment that is then terminated is closed by the scheduler's pass.
    let answer = graphql(&previews, OPEN, json!({ "e": e })).await;
    let second = answer["data"]["openDebugSession"]["session"]["id"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string();
    let store = &previews.env.runtime.store;
    let terminate = EnvironmentCommand::Terminate { reason: "PR closed".into(), at: chrono::Utc::now() };
    store.environments.execute(environment.0, terminate, understudy_tests::fixtures::meta()).await.expect("terminate");
    eventually(Duration::from_secs(30), "the projection of the termination", || async {
        let status: String = sqlx::query_scalar("SELECT status FROM environments WHERE environment_id = $1")
            .bind(environment.0)
            .fetch_one(pool)
            .await
            .ok()?;
        (status == "Terminated").then_some(())
    })
    .await;
    assert_eq!(understudy_adapters::preview::sweep::close_ended_debug_sessions(store).await.expect("pass"), 1);
    let reason: String = sqlx::query_scalar(
        "SELECT payload->>'reason' FROM event_log WHERE aggregate_id = $1 AND event_type = 'DebugSessionClosed' ORDER BY position DESC LIMIT 1",
    )
    .bind(environment.0)
    .fetch_one(pool)
    .await
    .expect("closed");
    assert_eq!(reason, "its environment was terminated", "session {second}");
}
