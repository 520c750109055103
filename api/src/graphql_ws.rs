//! GraphQL over WebSocket: `graphql-transport-ws`, and the older `graphql-ws`
//! (subscriptions-transport-ws), served by our own loop.
//!
//! async-graphql's loop serializes every message of every socket itself. A shared subscription
//! ([`crate::shared_subscriptions`]) sends one message to thousands of sockets, so here its payload
//! arrives already in JSON, serialized once per node, and each socket only writes it inside its own
//! envelope (`{"type":"next","id":…,"payload":…}`).
//!
//! What the loop does, per the two protocols:
//! - `connection_init` is answered with `connection_ack`; a second one closes the socket (4429),
//!   and so does none within [`INIT_TIMEOUT`] (4408);
//! - `subscribe` (`start`) before the acknowledgement closes the socket (4401), and with an id
//!   already running closes it too (4409); beyond [`MAX_SUBSCRIPTIONS`] running on the socket it
//!   is refused with an `error` message; otherwise each result is a `next` (`data`) message, and
//!   the end of the stream a `complete`;
//! - `complete` (`stop`) from the client ends that subscription and is answered with `complete`;
//! - `ping` is answered with `pong`; a message that is not one of these closes the socket (4400).
//!
//! And, for sockets that go quiet behind proxies and NATs: every keepalive interval the server
//! sends a WebSocket Ping frame (and the older protocol's `ka` message, which its clients watch
//! for). A client that has sent nothing since the previous Ping, not even the Pong every browser
//! and WebSocket library answers with by itself, is gone: its socket is closed (1001), and so is
//! one that has not taken a message off the wire for a whole interval. A dead or stuck client
//! thus holds its subscriptions for at most two intervals.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use async_graphql::http::{ClientMessage, WebSocketProtocols};
use async_graphql::{Data, Response};
use axum::extract::ws::{CloseFrame, Message, WebSocket};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use futures::stream::BoxStream;
use futures::Stream;
use serde::Serialize;
use serde_json::value::RawValue;

use crate::shared_subscriptions::{Next, SharedSubscriptions};

/// How long a new socket may take to send `connection_init`.
pub const INIT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// How often a socket is pinged unless the server is told otherwise: within the minute after
/// which common proxies (nginx, load balancers) close a quiet connection.
pub const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(15);

/// How many subscriptions one socket may run at once.
pub const MAX_SUBSCRIPTIONS: usize = 100;

/// The protocol a WebSocket handshake asks for in `Sec-WebSocket-Protocol`: the first of its
/// list that we speak.
pub struct Protocol(pub WebSocketProtocols);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Protocol {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .headers
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|value| value.to_str().ok())
            .and_then(|protocols| protocols.split(',').find_map(|p| p.trim().parse().ok()))
            .map(Self)
            .ok_or((StatusCode::BAD_REQUEST, "Sec-WebSocket-Protocol must offer graphql-transport-ws or graphql-ws"))
    }
}

/// Serves one socket until the client leaves, closes it, breaks the protocol, or stops answering
/// the Ping sent every `keepalive`.
pub async fn serve(
    mut socket: WebSocket,
    executor: SharedSubscriptions,
    protocol: WebSocketProtocols,
    connection_data: Data,
    keepalive: std::time::Duration,
) {
    let mut connection = Connection::new(executor, protocol, connection_data);
    let init_deadline = tokio::time::sleep(INIT_TIMEOUT);
    tokio::pin!(init_deadline);
    let mut beat = tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Whether the client has sent anything since the last Ping.
    let mut answered = true;
    loop {
        let outgoing = tokio::select! {
            () = &mut init_deadline, if connection.data.is_none() => Some(close(4408, "Connection initialisation timeout")),
            _ = beat.tick() => {
                if !answered {
                    let _ = send(&mut socket, close(1001, format!("no answer to a ping within {} s", keepalive.as_secs_f32())), keepalive).await;
                    return;
                }
                answered = false;
                if !send(&mut socket, Message::Ping(Default::default()), keepalive).await {
                    return;
                }
                // The older protocol's clients time the server out on `ka` messages, not on Pings.
                match (connection.protocol, &connection.data) {
                    (WebSocketProtocols::SubscriptionsTransportWS, Some(_)) => Some(text::<()>("ka", None, None)),
                    _ => None,
                }
            },
            incoming = socket.recv() => {
                answered = true;
                match incoming {
                    Some(Ok(Message::Text(text))) => connection.receive(text.as_bytes()),
                    Some(Ok(Message::Binary(bytes))) => connection.receive(&bytes),
                    // Ping frames, and a close frame, are answered by the socket itself: after a
                    // close, the next read sends the answer and ends the stream.
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Close(_))) => continue,
                    Some(Err(_)) | None => return,
                }
            },
            outgoing = connection.next() => outgoing,
        };
        let close = matches!(outgoing, Some(Message::Close(_)));
        if let Some(message) = outgoing {
            if !send(&mut socket, message, keepalive).await || close {
                return;
            }
        }
    }
}

/// Sends one message; false when the socket is gone, or the client has not read for `within`
/// (its buffers full, the send would wait for it forever).
async fn send(socket: &mut WebSocket, message: Message, within: std::time::Duration) -> bool {
    matches!(tokio::time::timeout(within, socket.send(message)).await, Ok(Ok(())))
}

/// One socket's side of the protocol, apart from the socket: what [`serve`] runs, and what the
/// fuzz target (`fuzz/src/graphql_ws.rs`) drives with any messages.
pub struct Connection {
    executor: SharedSubscriptions,
    protocol: WebSocketProtocols,
    /// Who is asking, settled at the upgrade; taken by `connection_init`.
    connection_data: Option<Data>,
    /// Set by `connection_init`: the data every subscription of this socket runs with.
    data: Option<Arc<Data>>,
    streams: HashMap<String, BoxStream<'static, Next>>,
}

/// A message to the client, serialized with serde: `{"type":…,"id":…,"payload":…}`.
#[derive(Serialize)]
struct ServerMessage<'a, P: Serialize> {
    #[serde(rename = "type")]
    kind: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<P>,
}

fn text<P: Serialize>(kind: &str, id: Option<&str>, payload: Option<P>) -> Message {
    // Serializing these types cannot fail: every map key is a string.
    Message::Text(serde_json::to_string(&ServerMessage { kind, id, payload }).unwrap_or_default().into())
}

/// A close frame. Its reason is cut to the 123 bytes a control frame leaves it (RFC 6455, 5.5):
/// reasons may quote the client, and a longer one would break the frame for the client.
fn close(code: u16, reason: impl Into<String>) -> Message {
    let mut reason = reason.into();
    if reason.len() > MAX_CLOSE_REASON {
        let cut = (0..=MAX_CLOSE_REASON).rev().find(|at| reason.is_char_boundary(*at)).unwrap_or(0);
        reason.truncate(cut);
    }
    Message::Close(Some(CloseFrame { code, reason: reason.into() }))
}

/// A close frame's payload is at most 125 bytes, two of them the code.
const MAX_CLOSE_REASON: usize = 123;

impl Connection {
    /// A socket's state before its client has sent anything; `connection_data` says who it is.
    pub fn new(executor: SharedSubscriptions, protocol: WebSocketProtocols, connection_data: Data) -> Self {
        Self { executor, protocol, connection_data: Some(connection_data), data: None, streams: HashMap::new() }
    }

    /// How many subscriptions run on the socket.
    pub fn running(&self) -> usize {
        self.streams.len()
    }

    /// The next message of a running subscription: a result, or `complete` once one has ended.
    /// Pending while none has anything (and for ever with none running).
    pub async fn next(&mut self) -> Option<Message> {
        let (id, next) = futures::future::poll_fn(|cx| self.poll_streams(cx)).await;
        self.next_or_complete(id, next)
    }

    /// What to answer a client's message with, if anything.
    pub fn receive(&mut self, bytes: &[u8]) -> Option<Message> {
        let message = match ClientMessage::from_bytes(bytes) {
            Ok(message) => message,
            Err(error) => return Some(close(4400, format!("not a GraphQL over WebSocket message: {error}"))),
        };
        match message {
            ClientMessage::ConnectionInit { .. } => match self.connection_data.take() {
                Some(data) => {
                    self.data = Some(Arc::new(data));
                    Some(text::<()>("connection_ack", None, None))
                }
                None => Some(close(4429, "Too many initialisation requests")),
            },
            ClientMessage::Start { id, payload } => {
                let Some(data) = self.data.clone() else { return Some(close(4401, "Unauthorized: send connection_init first")) };
                if self.streams.contains_key(&id) {
                    return Some(close(4409, format!("Subscriber for {id} already exists")));
                }
                if self.streams.len() >= MAX_SUBSCRIPTIONS {
                    let error = async_graphql::ServerError::new(
                        format!("this socket already runs {MAX_SUBSCRIPTIONS} subscriptions; complete one, or open another socket"),
                        None,
                    );
                    return Some(match self.protocol {
                        WebSocketProtocols::GraphQLWS => text("error", Some(&id), Some([error])),
                        WebSocketProtocols::SubscriptionsTransportWS => text("error", Some(&id), Some(error)),
                    });
                }
                let stream = self.executor.subscribe(payload, data);
                self.streams.insert(id, stream);
                None
            }
            ClientMessage::Stop { id } => self.streams.remove(&id).map(|_| text::<()>("complete", Some(&id), None)),
            ClientMessage::ConnectionTerminate => Some(close(1000, "")),
            ClientMessage::Ping { .. } => Some(text::<()>("pong", None, None)),
            ClientMessage::Pong { .. } => None,
        }
    }

    /// The next message of any running subscription, or `None` for the end of one.
    fn poll_streams(&mut self, cx: &mut Context<'_>) -> Poll<(String, Option<Next>)> {
        for (id, stream) in &mut self.streams {
            if let Poll::Ready(next) = Pin::new(stream).poll_next(cx) {
                return Poll::Ready((id.clone(), next));
            }
        }
        Poll::Pending
    }

    fn next_or_complete(&mut self, id: String, next: Option<Next>) -> Option<Message> {
        let kind = match self.protocol {
            WebSocketProtocols::GraphQLWS => "next",
            WebSocketProtocols::SubscriptionsTransportWS => "data",
        };
        match next {
            Some(Next::Response(response)) => Some(text::<&Response>(kind, Some(&id), Some(&response))),
            Some(Next::Json(json)) => Some(text::<&RawValue>(kind, Some(&id), Some(&json))),
            None => {
                self.streams.remove(&id);
                Some(text::<()>("complete", Some(&id), None))
            }
        }
    }
}
