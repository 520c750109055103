//! One execution per distinct live subscription, shared by every socket that asked for it.
//!
//! Ten thousand dashboards following one project's environments all ask the same question.
//! Resolved one by one, each change costs ten thousand GraphQL executions and as many
//! serializations; shared, it costs one of each, and each socket only writes the result
//! ([`crate::graphql_ws`] puts it in the socket's own envelope).
//!
//! - Only subscriptions whose messages do not depend on when one joined are shared: today
//!   `environmentUpdated` without `after` (with `after`, each subscriber first gets its own
//!   replay). Everything else runs on its own, as before.
//! - Each subscriber is still checked on its own: its request first runs as a [`Probe`], which
//!   does the resolver's checks (who is asking, may they see this project) and ends.
//! - The shared execution ([`SharedExecution`]) resolves as an anonymous viewer, so a field that
//!   depends on who is asking fails rather than showing every subscriber one viewer's view.
//! - A subscriber that falls [`BACKLOG`] messages behind gets an error and is ended; it resumes
//!   with `after` (the last `position` it saw), which replays what it missed.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};

use async_graphql::parser::types::{DocumentOperations, ExecutableDocument, OperationDefinition, OperationType, Selection};
use async_graphql::{Data, Executor, Name, Request, Response, ServerError, Value};
use futures::stream::BoxStream;
use futures::StreamExt;
use serde_json::value::RawValue;
use tokio::sync::broadcast;
use tokio_util::sync::{CancellationToken, DropGuard};
use understudy_adapters::metrics::METRICS;

use crate::auth::Viewer;
use crate::graphql::{AppSchema, OpenSubscription};

/// Set on a subscription request that only checks whether its subscriber may subscribe: the
/// resolver does its checks, then returns an empty stream.
pub struct Probe;

/// Set on the one execution whose results are shared: the resolver skips the per-viewer checks,
/// which each subscriber passed as a [`Probe`], and does not count itself as a subscriber.
pub struct SharedExecution;

/// How many messages a shared subscriber may fall behind before it is ended: a few seconds of a
/// busy project's changes. The messages are shared, so this bounds memory per execution, not per
/// subscriber.
pub const BACKLOG: usize = 4096;

/// One result of a subscription, for its socket to send.
pub enum Next {
    /// A result of this subscriber's own execution.
    Response(Box<Response>),
    /// A result of a shared execution, serialized once for every subscriber.
    Json(Arc<RawValue>),
}

impl Next {
    fn own(response: Response) -> Self {
        Self::Response(Box::new(response))
    }
}

/// The GraphQL executor of the WebSocket endpoint: the schema, with shareable subscriptions shared.
#[derive(Clone)]
pub struct SharedSubscriptions {
    schema: AppSchema,
    streams: Arc<Mutex<HashMap<Key, Weak<Shared>>>>,
}

/// A subscription's query text, operation name and variables (as JSON).
type Key = (String, Option<String>, String);

/// One shared execution, alive while a subscriber holds it.
struct Shared {
    sender: broadcast::WeakSender<Arc<RawValue>>,
    _stop: DropGuard,
}

impl SharedSubscriptions {
    pub fn new(schema: AppSchema) -> Self {
        Self { schema, streams: Arc::default() }
    }

    /// A receiver of the shared execution for `key`, started if none is running.
    fn join(&self, key: &Key) -> (Arc<Shared>, broadcast::Receiver<Arc<RawValue>>) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(shared) = streams.get(key).and_then(Weak::upgrade) {
            if let Some(sender) = shared.sender.upgrade() {
                return (shared, sender.subscribe());
            }
        }
        streams.retain(|_, shared| shared.strong_count() > 0);
        let (sender, receiver) = broadcast::channel(BACKLOG);
        let stop = CancellationToken::new();
        let shared = Arc::new(Shared { sender: sender.downgrade(), _stop: stop.clone().drop_guard() });
        streams.insert(key.clone(), Arc::downgrade(&shared));
        let mut data = Data::default();
        data.insert(Viewer::Anonymous);
        let mut execution = Executor::execute_stream(&self.schema, request(key).data(SharedExecution), Some(Arc::new(data)));
        tokio::spawn(async move {
            let _running = Running::new();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    next = execution.next() => match next {
                        // No receiver left is not an error: the last subscriber is leaving and
                        // `stop` fires when it is gone.
                        Some(response) => match serde_json::value::to_raw_value(&response) {
                            Ok(json) => drop(sender.send(Arc::from(json))),
                            Err(error) => tracing::error!(%error, "a shared subscription's result did not serialize"),
                        },
                        None => return,
                    },
                }
            }
        });
        (shared, receiver)
    }

    /// The results of a subscription `request` made with `session_data` (who is asking): shared
    /// with identical subscriptions when [`shareable`], its own execution otherwise.
    pub fn subscribe(&self, request: Request, session_data: Arc<Data>) -> BoxStream<'static, Next> {
        let Some(key) = shareable(&request) else {
            return Executor::execute_stream(&self.schema, request, Some(session_data)).map(Next::own).boxed();
        };
        let this = self.clone();
        futures::stream::once(async move {
            let refused: Vec<Response> = Executor::execute_stream(&this.schema, request.data(Probe), Some(session_data)).collect().await;
            if !refused.is_empty() {
                return futures::stream::iter(refused).map(Next::own).boxed();
            }
            let (shared, receiver) = this.join(&key);
            follow(shared, receiver)
        })
        .flatten()
        .boxed()
    }
}

/// One subscriber's copy of a shared execution's messages.
fn follow(shared: Arc<Shared>, receiver: broadcast::Receiver<Arc<RawValue>>) -> BoxStream<'static, Next> {
    let open = OpenSubscription::new();
    futures::stream::unfold(Some((receiver, shared, open)), |state| async move {
        let (mut receiver, shared, open) = state?;
        match receiver.recv().await {
            Ok(json) => Some((Next::Json(json), Some((receiver, shared, open)))),
            Err(broadcast::error::RecvError::Closed) => None,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                let message = format!(
                    "this subscriber fell {missed} updates behind and was ended; subscribe again with `after` set to the last `position` you saw"
                );
                Some((Next::own(Response::from_errors(vec![ServerError::new(message, None)])), None))
            }
        }
    })
    .boxed()
}

/// Counts a shared execution in `understudy_shared_subscription_executions` while it runs.
struct Running;

impl Running {
    fn new() -> Self {
        METRICS.shared_subscription_executions.fetch_add(1, Ordering::Relaxed);
        Self
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        METRICS.shared_subscription_executions.fetch_sub(1, Ordering::Relaxed);
    }
}

fn request((query, operation, variables): &Key) -> Request {
    let mut request = Request::new(query.clone());
    request.operation_name = operation.clone();
    request.variables = serde_json::from_str(variables).unwrap_or_default();
    request
}

/// The key of a request that may share an execution: a subscription whose one root field is
/// `environmentUpdated` without `after`. Anything else, including a query that does not parse, is
/// left to the schema (which reports the parse error).
fn shareable(request: &Request) -> Option<Key> {
    let document = async_graphql::parser::parse_query(&request.query).ok()?;
    let operation = operation(&document, request.operation_name.as_deref())?;
    if operation.ty != OperationType::Subscription || operation.selection_set.node.items.len() != 1 {
        return None;
    }
    let Selection::Field(field) = &operation.selection_set.node.items[0].node else { return None };
    let field = &field.node;
    if field.name.node != "environmentUpdated" || !field.directives.is_empty() {
        return None;
    }
    // `after` must be null: written so, or a variable given as null, or not given and without a default.
    if let Some(after) = field.get_argument("after") {
        let variable = |name: Name| -> Result<Value, std::convert::Infallible> {
            Ok(match request.variables.get(&name) {
                Some(given) => given.clone(),
                None => operation
                    .variable_definitions
                    .iter()
                    .find(|definition| definition.node.name.node == name)
                    .and_then(|definition| definition.node.default_value.as_ref())
                    .map_or(Value::Null, |default| default.node.clone()),
            })
        };
        if after.node.clone().into_const_with(variable) != Ok(Value::Null) {
            return None;
        }
    }
    let variables = serde_json::to_string(&request.variables).ok()?;
    Some((request.query.clone(), request.operation_name.clone(), variables))
}

fn operation<'a>(document: &'a ExecutableDocument, name: Option<&str>) -> Option<&'a OperationDefinition> {
    match (&document.operations, name) {
        (DocumentOperations::Single(operation), _) => Some(&operation.node),
        (DocumentOperations::Multiple(operations), Some(name)) => operations.get(&Name::new(name)).map(|o| &o.node),
        (DocumentOperations::Multiple(operations), None) if operations.len() == 1 => operations.values().next().map(|o| &o.node),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use async_graphql::Variables;

    use super::*;

    fn subscriber(capacity: usize) -> (broadcast::Sender<Arc<RawValue>>, BoxStream<'static, Next>) {
        let (sender, receiver) = broadcast::channel(capacity);
        let shared = Arc::new(Shared { sender: sender.downgrade(), _stop: CancellationToken::new().drop_guard() });
        (sender, follow(shared, receiver))
    }

    fn numbered(n: i32) -> Arc<RawValue> {
        Arc::from(serde_json::value::to_raw_value(&Response::new(Value::from(n))).expect("JSON"))
    }

    #[tokio::test]
    async fn a_subscriber_gets_each_message_in_order_and_ends_with_its_execution() {
        let (sender, mut stream) = subscriber(8);
        for n in 0..3 {
            sender.send(numbered(n)).expect("a subscriber");
        }
        drop(sender);
        let got: Vec<String> = (&mut stream)
            .map(|next| match next {
                Next::Json(json) => json.get().to_owned(),
                Next::Response(response) => panic!("not the shared message: {response:?}"),
            })
            .collect()
            .await;
        assert_eq!(got, [r#"{"data":0}"#, r#"{"data":1}"#, r#"{"data":2}"#]);
    }

    #[tokio::test]
    async fn a_subscriber_that_falls_behind_is_told_how_to_resume_and_ended() {
        let (sender, mut stream) = subscriber(2);
        for n in 0..5 {
            sender.send(numbered(n)).expect("a subscriber");
        }
        let Some(Next::Response(first)) = stream.next().await else { panic!("no error of its own") };
        assert_eq!(first.errors.len(), 1, "{first:?}");
        assert!(first.errors[0].message.contains("fell 3 updates behind") && first.errors[0].message.contains("`after`"), "{first:?}");
        assert!(stream.next().await.is_none(), "ended, though messages are still there");
    }

    #[test]
    fn only_live_environment_subscriptions_are_shared() {
        let shared = |query: &str, variables: serde_json::Value| {
            let mut request = Request::new(query);
            request.variables = Variables::from_json(variables);
            shareable(&request).is_some()
        };
        let live = "subscription($p: UUID, $a: Int) { environmentUpdated(projectId: $p, after: $a) { id } }";
        assert!(shared(live, serde_json::json!({ "p": "x" })));
        assert!(shared(live, serde_json::json!({ "p": "x", "a": null })));
        assert!(!shared(live, serde_json::json!({ "p": "x", "a": 5 })), "a resume replays on its own");
        assert!(!shared("subscription { environmentUpdated(after: 0) { id } }", serde_json::json!({})));
        assert!(!shared("subscription($a: Int = 3) { environmentUpdated(after: $a) { id } }", serde_json::json!({})), "a default counts");
        assert!(shared("subscription($a: Int = null) { environmentUpdated(after: $a) { id } }", serde_json::json!({})));
        assert!(!shared("subscription { deploymentUpdated(environmentId: \"x\") { id } }", serde_json::json!({})));
        assert!(!shared("query { environments { id } }", serde_json::json!({})));
        assert!(!shared(
            "subscription { environmentUpdated { id } environmentUpdated2: environmentUpdated { id } }",
            serde_json::json!({})
        ));
        assert!(!shared("subscription { ", serde_json::json!({})), "left to the schema to report");
    }
}
