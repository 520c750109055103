//! GraphQL over WebSocket: any sequence of client messages through one socket's side of the
//! protocol (`understudy_api::graphql_ws::Connection`, what the served loop runs), in either
//! protocol. Every answer is a server message of the protocol, in JSON, or a close frame whose
//! reason fits its frame; a socket never runs more than `MAX_SUBSCRIPTIONS` subscriptions; nothing
//! panics, and each input is answered within two seconds.
//!
//! Input: the first byte picks the protocol (even: `graphql-transport-ws`, odd: `graphql-ws`);
//! the rest is the client's messages, separated by NUL bytes. After each message, what the
//! running subscriptions have ready is taken, as the loop would send it. A close frame ends the
//! input, as it ends the socket.
//!
//! The subscriptions run against the schema of the GraphQL target (`graphql.rs`): no database and
//! no NATS, so each ends with an error at once. What they would stream from NATS is not fuzzed.
use std::time::Duration;

use async_graphql::http::WebSocketProtocols;
use axum::extract::ws::Message;
use futures::FutureExt;
use understudy_api::graphql_ws::{Connection, MAX_SUBSCRIPTIONS};
use understudy_api::shared_subscriptions::SharedSubscriptions;

/// What the server may send, by the protocol's message type.
const SERVER_TYPES: &[&str] = &["connection_ack", "next", "data", "complete", "error", "pong", "ka"];

/// One input, given [`super::DEADLINE`].
pub fn run(data: &[u8]) {
    run_within(data, super::DEADLINE);
}

/// One input, given `deadline` (the corpus replay allows more on a busy machine).
pub fn run_within(data: &[u8], deadline: Duration) {
    let Some((&first, messages)) = data.split_first() else { return };
    let protocol = if first % 2 == 0 { WebSocketProtocols::GraphQLWS } else { WebSocketProtocols::SubscriptionsTransportWS };
    let super::graphql::Fixture { runtime, schema } = super::graphql::fixture();
    runtime.block_on(async {
        let mut data = async_graphql::Data::default();
        data.insert(understudy_api::auth::Viewer::Operator);
        let mut connection = Connection::new(SharedSubscriptions::new(schema.clone()), protocol, data);
        let answered = tokio::time::timeout(deadline, async {
            for message in messages.split(|&b| b == 0) {
                let mut closed = connection.receive(message).is_some_and(|answer| check(&answer));
                // The subscriptions' executions are tasks of this runtime: let them run, then take
                // whatever they have ready.
                for _ in 0..8 {
                    tokio::task::yield_now().await;
                    while let Some(Some(answer)) = connection.next().now_or_never() {
                        closed |= check(&answer);
                    }
                }
                assert!(connection.running() <= MAX_SUBSCRIPTIONS, "{} subscriptions on one socket", connection.running());
                if closed {
                    return;
                }
            }
        })
        .await;
        assert!(answered.is_ok(), "the messages were not answered within {deadline:?}: {messages:?}");
    });
}

/// Checks one answer; true if it closes the socket.
fn check(answer: &Message) -> bool {
    match answer {
        Message::Text(text) => {
            let json: serde_json::Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("an answer that is not JSON ({e}): {text}"));
            let kind = json["type"].as_str().unwrap_or_default();
            assert!(SERVER_TYPES.contains(&kind), "an answer of no server type: {text}");
            false
        }
        Message::Close(Some(frame)) => {
            assert!(frame.reason.len() <= 123, "a close reason longer than its frame allows: {} bytes", frame.reason.len());
            true
        }
        other => panic!("an answer the protocol does not send: {other:?}"),
    }
}
