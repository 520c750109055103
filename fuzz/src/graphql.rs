//! Any GraphQL request against the served schema, with its limits, as the operator: parsing,
//! validation, the depth, complexity and recursion limits, input coercion and the resolvers'
//! own argument checks answer with errors, never a panic, and each request finishes within
//! two seconds.
//!
//! Input: the query text, then a NUL byte, then the variables as JSON (ignored unless valid).
//! An operation that names a subscription is also run as a stream, up to its first item.
//!
//! There is no database and no NATS: the pool points at a closed port, so a resolver that reaches
//! Postgres gets an error after at most the pool's 20 ms acquire timeout, and the subscriptions,
//! which need a NATS client, report that it is missing. What reaches SQL or NATS is therefore not
//! fuzzed past the point where it asks them.
use std::sync::OnceLock;
use std::time::Duration;

use async_graphql::{Request, Schema, Variables};
use futures::StreamExt;
use understudy_api::graphql::{with_limits, AppSchema, MutationRoot, QueryRoot, SharedReads, Subscription};

pub(crate) struct Fixture {
    pub(crate) runtime: tokio::runtime::Runtime,
    pub(crate) schema: AppSchema,
}

/// The served schema with its limits over the unreachable database, and the runtime it runs on
/// (the WebSocket target's too).
pub(crate) fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a current-thread runtime");
        let schema = runtime.block_on(async {
            let (pool, auth) = super::unreachable_database().await;
            let topology = understudy_adapters::nats::Topology::new("fuzz").expect("a valid prefix");
            let builder = Schema::build(QueryRoot::default(), MutationRoot::default(), Subscription)
                .data(auth)
                .data(SharedReads::default())
                .data(pool)
                .data(topology);
            with_limits(builder).finish()
        });
        Fixture { runtime, schema }
    })
}

fn request(query: &str, variables: Option<&serde_json::Value>) -> Request {
    let request = Request::new(query).data(understudy_api::auth::Viewer::Operator);
    match variables {
        Some(variables) => request.variables(Variables::from_json(variables.clone())),
        None => request,
    }
}

/// One input, each request given [`super::DEADLINE`].
pub fn run(data: &[u8]) {
    run_within(data, super::DEADLINE);
}

/// One input, each request given `deadline` (the corpus replay allows more on a busy machine).
pub fn run_within(data: &[u8], deadline: Duration) {
    let (query, variables) = match data.iter().position(|&b| b == 0) {
        Some(nul) => (&data[..nul], serde_json::from_slice::<serde_json::Value>(&data[nul + 1..]).ok()),
        None => (data, None),
    };
    let query = String::from_utf8_lossy(query);
    let Fixture { runtime, schema } = fixture();
    runtime.block_on(async {
        let response = tokio::time::timeout(deadline, schema.execute(request(&query, variables.as_ref()))).await;
        assert!(response.is_ok(), "the request did not finish within {deadline:?}: {query:?}");
        if query.contains("subscription") {
            let mut stream = schema.execute_stream(request(&query, variables.as_ref()));
            let first = tokio::time::timeout(deadline, stream.next()).await;
            // No NATS: a subscription's stream must end or fail at once, not wait.
            assert!(first.is_ok(), "the subscription neither answered nor ended within {deadline:?}: {query:?}");
        }
    });
}
