//! NATS JetStream: connecting, and the one stream that carries the global log.
//!
//! Subjects: `{prefix}.events.{aggregate_type}.{aggregate_id}` for events (JetStream, durable),
//! `{prefix}.changes.{read_model}.{key}` for "this row changed" notices (core NATS, a wake-up for
//! live subscriptions, never the data). The prefix isolates installations and tests.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};

/// Names derived from one prefix.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> anyhow::Result<Self> {
        let prefix = prefix.into();
        anyhow::ensure!(
            !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "UNDERSTUDY_NATS_PREFIX {prefix:?} must be letters, digits, '_' or '-'"
        );
        Ok(Self { prefix })
    }

    pub fn stream_name(&self) -> String {
        format!("{}_EVENTS", self.prefix.to_ascii_uppercase().replace('-', "_"))
    }

    pub fn all_events(&self) -> String {
        format!("{}.events.>", self.prefix)
    }

    pub fn event_subject(&self, aggregate_type: &str, aggregate_id: uuid::Uuid) -> String {
        format!("{}.events.{aggregate_type}.{aggregate_id}", self.prefix)
    }

    pub fn changes_subject(&self, read_model: &str, key: &str) -> String {
        format!("{}.changes.{read_model}.{key}", self.prefix)
    }

    /// Core NATS wake-up for readers of a deployment's logs (never the lines themselves).
    pub fn log_subject(&self, deployment: uuid::Uuid) -> String {
        format!("{}.logs.{deployment}", self.prefix)
    }

    pub fn consumer_name(&self, projection: &str) -> String {
        format!("{}_projector_{projection}", self.prefix.replace('-', "_"))
    }
}

/// Connects to NATS in the background: returns at once, and the client connects (and reconnects)
/// when the server is there. For roles that can serve without NATS for a while (the API answers
/// queries and records webhooks from Postgres alone).
pub async fn connect_in_background(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .retry_on_initial_connect()
        .name("understudy")
        .connect(url)
        .await
        .with_context(|| format!("NATS_URL {url} is not a NATS URL"))
}

/// Connects to NATS, failing with a message that names the URL and what to check.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .max_reconnects(None)
        .name("understudy")
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}: check that nats-server runs with JetStream (-js) and NATS_URL is right"))
}

/// Creates the event stream if it does not exist.
pub async fn ensure_stream(js: &jetstream::Context, topology: &Topology) -> anyhow::Result<stream::Stream> {
    js.get_or_create_stream(stream::Config {
        name: topology.stream_name(),
        subjects: vec![topology.all_events()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
    .with_context(|| format!("creating JetStream stream {} (is JetStream enabled on the server?)", topology.stream_name()))
}
