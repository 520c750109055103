//! The log reader's HTTP parameters. The first byte picks one of two modes:
//!
//! - even: the rest is a request target (path and query string, wherever `http::Uri` accepts
//!   it), sent as a GET through the real router of `/deployments/…/logs/…`,
//!   `/environments/…/logs/…` and `…/artifacts…` in process, with the guard in front and the
//!   operator as viewer. The answer is never a 5xx other than the 503 of the unreachable
//!   database, and comes within two seconds. This reaches routing, the percent-decoding of the
//!   path, the guard's reading of the id, and the guard's question to Postgres. It does not reach
//!   the handlers: the guard must look up the project before anyone reads a log, and with no
//!   database it answers 503 first. So neither the handlers' extractors nor the SQL of
//!   `read_after` and the artifact queries are exercised here.
//! - odd: what a handler does past the guard, minus the database. The rest is
//!   `query string NUL kind NUL lines`: the query string goes through axum's `Query<LogQuery>`
//!   extractor, `kind` becomes a stream as the handlers make one (its first byte modulo 3 picks a
//!   URL kind through `stream_of`, a test's name or a job's name), and the lines stand for what
//!   Postgres returned
//!   (each after `from`, at most the page size). Then the page is built as `serve` builds it:
//!   refused with 400 or answered with 200, `X-Last-Log-Nano` the last line's or `from`, one
//!   body line per log line (each a JSON object with `format=json`), and a download's
//!   `Content-Disposition` file name that cannot end its quoted string early.
use std::sync::OnceLock;
use std::time::Duration;

use axum::body::Body;
use axum::extract::Query;
use axum::http::{header, Request, StatusCode, Uri};
use tower::ServiceExt;
use understudy_api::logs::fuzzing::{self, LogLine};
use understudy_api::logs::LogQuery;

struct Fixture {
    runtime: tokio::runtime::Runtime,
    router: axum::Router,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime");
        let router = runtime.block_on(async {
            let (pool, auth) = super::unreachable_database().await;
            understudy_api::logs::router(pool, auth)
        });
        Fixture { runtime, router }
    })
}

fn through_router(target: &[u8], deadline: Duration) {
    let Ok(uri) = Uri::try_from(target) else { return };
    let request = Request::get(uri.clone())
        .extension(understudy_api::auth::Viewer::Operator)
        .body(Body::empty())
        .expect("a GET with a parsed URI is a valid request");
    let Fixture { runtime, router } = fixture();
    let response = runtime.block_on(async { tokio::time::timeout(deadline, router.clone().oneshot(request)).await });
    let response = response.unwrap_or_else(|_| panic!("GET {uri} did not finish within {deadline:?}"));
    let status = response.expect("a router never fails").status();
    assert!(!status.is_server_error() || status == StatusCode::SERVICE_UNAVAILABLE, "GET {uri} answered {status}");
}

fn page(data: &[u8]) {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (query, kind, lines) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    let Some((&how, kind)) = kind.split_first() else { return };
    let mut target = b"/deployments/00000000-0000-0000-0000-000000000000/logs/build?".to_vec();
    target.extend_from_slice(query);
    let Ok(uri) = Uri::try_from(target) else { return };
    let Ok(Query(q)) = Query::<LogQuery>::try_from_uri(&uri) else { return };
    let kind = String::from_utf8_lossy(kind);
    let stream = match how % 3 {
        0 => match fuzzing::stream_of(&kind) {
            Some(stream) => stream,
            None => return,
        },
        1 => format!("test:{kind}"),
        _ => format!("job:{kind}"),
    };
    let deployment = uuid::Uuid::nil();
    let limit = match fuzzing::page_size(&q) {
        Ok(limit) => limit,
        Err(refused) => {
            assert_eq!(refused.status(), StatusCode::BAD_REQUEST, "{uri} refused with {}", refused.status());
            return;
        }
    };
    assert!(limit >= 1, "{uri} asks for {limit} lines");
    let from = fuzzing::from(&q);
    let several = stream.ends_with('*');
    let lines: Vec<LogLine> = String::from_utf8_lossy(lines)
        .split('\n')
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .enumerate()
        .map_while(|(i, line)| {
            let nano = from.checked_add(i64::try_from(i).ok()?.checked_add(1)?)?;
            let stream = if several { format!("{}{i}", stream.trim_end_matches('*')) } else { stream.clone() };
            Some(LogLine { stream, nano, line: line.to_string() })
        })
        .collect();

    let response = fuzzing::page(deployment, &stream, &q, &lines);
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    let last = headers.get("x-last-log-nano").expect("every page says where the next starts");
    let expected = lines.last().map_or(from, |l| l.nano);
    assert_eq!(last.to_str().ok(), Some(expected.to_string().as_str()));
    if let Some(disposition) = headers.get(header::CONTENT_DISPOSITION) {
        // Bytes, not `to_str`: a test's name may be any UTF-8, which a header value carries as is.
        let quotes = disposition.as_bytes().iter().filter(|&&b| b == b'"').count();
        assert_eq!(quotes, 2, "file name breaks out of its quotes: {disposition:?}");
    }
    let json = headers.get(header::CONTENT_TYPE).is_some_and(|t| t == "application/x-ndjson");
    let body = fixture().runtime.block_on(axum::body::to_bytes(response.into_body(), usize::MAX)).expect("a string body reads");
    let body = std::str::from_utf8(&body).expect("the body is the lines, as text");
    // A plain page of several streams names each line's stream, and a stream's name may hold a
    // newline (it is a test's or a job's name).
    let in_names: usize = if json || !several { 0 } else { lines.iter().map(|l| l.stream.matches('\n').count()).sum() };
    assert_eq!(body.matches('\n').count(), lines.len() + in_names, "one body line per log line");
    if json {
        for (text, line) in body.lines().zip(&lines) {
            let value: serde_json::Value = serde_json::from_str(text).expect("each line of a JSON page is JSON");
            assert_eq!(value["line"].as_str(), Some(line.line.as_str()));
            assert_eq!(value["nano"].as_i64(), Some(line.nano));
        }
    }
}

/// One input, each request given [`super::DEADLINE`].
pub fn run(data: &[u8]) {
    run_within(data, super::DEADLINE);
}

/// One input, each request given `deadline` (the corpus replay allows more on a busy machine).
pub fn run_within(data: &[u8], deadline: Duration) {
    let Some((&mode, rest)) = data.split_first() else { return };
    if mode % 2 == 0 {
        through_router(rest, deadline);
    } else {
        page(rest);
    }
}
