//! NATS JetStream: connecting, and the one stream that carries the global log.
//!
//! Subjects: `{prefix}.events.{aggregate_type}.{aggregate_id}` for events (JetStream, durable),
//! `{prefix}.changes.{read_model}.{key}` for "this row changed" notices (core NATS, a wake-up for
//! live subscriptions, never the data). The prefix isolates installations and tests.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::{self, stream};

/// Names derived from one prefix, and how many copies the event stream keeps.
#[derive(Debug, Clone)]
pub struct Topology {
    pub prefix: String,
    /// Copies of the event stream in a NATS cluster (`UNDERSTUDY_NATS_REPLICAS`): 1 on a single
    /// server, 3 on a three-node cluster so that losing one node loses nothing and stops nothing.
    pub replicas: usize,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> anyhow::Result<Self> {
        let prefix = prefix.into();
        anyhow::ensure!(
            !prefix.is_empty() && prefix.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'),
            "UNDERSTUDY_NATS_PREFIX {prefix:?} must be letters, digits, '_' or '-'"
        );
        Ok(Self { prefix, replicas: 1 })
    }

    /// The same names, with the event stream kept in `replicas` copies (1 to 5, as JetStream allows).
    pub fn with_replicas(mut self, replicas: usize) -> anyhow::Result<Self> {
        anyhow::ensure!((1..=5).contains(&replicas), "UNDERSTUDY_NATS_REPLICAS is {replicas}; JetStream keeps 1 to 5 copies of a stream");
        self.replicas = replicas;
        Ok(self)
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

    /// Core NATS hint that a process appended events: wakes the relay (never carries the events).
    pub fn appended_subject(&self) -> String {
        format!("{}.appended", self.prefix)
    }

    /// Core NATS hint that the log is numbered up to the position it carries (decimal text):
    /// projectors that JetStream has not brought that far soon after read the log instead.
    pub fn numbered_subject(&self) -> String {
        format!("{}.numbered", self.prefix)
    }

    /// Where a projector says it (re)connected and may not have sent every change notice.
    pub fn resync_subject(&self) -> String {
        format!("{}.changes.resync", self.prefix)
    }

    /// Core NATS wake-up for readers of a deployment's logs (never the lines themselves).
    pub fn log_subject(&self, deployment: uuid::Uuid) -> String {
        format!("{}.logs.{deployment}", self.prefix)
    }

    pub fn consumer_name(&self, projection: &str) -> String {
        format!("{}_projector_{projection}", self.prefix.replace('-', "_"))
    }
}

/// The servers of a `NATS_URL`: one URL, or a comma-separated list of a cluster's nodes. The
/// client also learns the other nodes of a cluster from the one it reaches, so one URL is enough
/// once connected; the list matters when the first node named is down at start.
pub fn servers(url: &str) -> anyhow::Result<Vec<async_nats::ServerAddr>> {
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<async_nats::ServerAddr>().with_context(|| format!("NATS_URL names {s:?}, which is not a NATS URL")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!servers.is_empty(), "NATS_URL is empty");
    Ok(servers)
}

/// Counts every (re)connection of this process's NATS clients. Core NATS keeps no message for a
/// client that is away, so change notices can be missed around a reconnection: a projector does
/// not send them while it is disconnected, and a reader does not get those sent while it is.
/// Readers that live on notices re-read what changed after either side reconnects: after their
/// own reconnection ([`reconnects`]), and after a projector's, which it announces on
/// [`Topology::resync_subject`] (noted here by [`note_resync`], seen by [`resyncs`]).
pub fn reconnects() -> tokio::sync::watch::Receiver<u64> {
    RECONNECTS.subscribe()
}

/// Counts the resync announcements this process received.
pub fn resyncs() -> tokio::sync::watch::Receiver<u64> {
    RESYNCS.subscribe()
}

/// Every change of a watch counter ([`reconnects`], [`resyncs`], the relay's appends), as a stream.
pub fn changes(receiver: tokio::sync::watch::Receiver<u64>) -> futures::stream::BoxStream<'static, ()> {
    use futures::StreamExt;
    futures::stream::unfold(receiver, |mut receiver| async move {
        receiver.changed().await.ok()?;
        Some(((), receiver))
    })
    .boxed()
}

/// A projector somewhere reconnected: notices may have been missed.
pub fn note_resync() {
    RESYNCS.send_modify(|n| *n += 1);
}

static RECONNECTS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> = std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));
static RESYNCS: std::sync::LazyLock<tokio::sync::watch::Sender<u64>> = std::sync::LazyLock::new(|| tokio::sync::watch::Sender::new(0));

fn options() -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new().connection_timeout(Duration::from_secs(5)).max_reconnects(None).name("understudy").event_callback(
        |event| async move {
            if matches!(event, async_nats::Event::Connected) {
                RECONNECTS.send_modify(|n| *n += 1);
            }
        },
    )
}

/// Connects to NATS in the background: returns at once, and the client connects (and reconnects)
/// when the server is there. For roles that can serve without NATS for a while (the API answers
/// queries and records webhooks from Postgres alone).
pub async fn connect_in_background(url: &str) -> anyhow::Result<async_nats::Client> {
    options().retry_on_initial_connect().connect(servers(url)?).await.with_context(|| format!("NATS_URL {url} is not a NATS URL"))
}

/// Connects to NATS, failing with a message that names the URL and what to check.
pub async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    options()
        .connect(servers(url)?)
        .await
        .with_context(|| format!("cannot connect to NATS at {url}: check that nats-server runs with JetStream (-js) and NATS_URL is right"))
}

/// Creates the event stream if it does not exist, and gives it the topology's number of copies
/// if it has another (JetStream adds or drops replicas of a live stream without a pause).
pub async fn ensure_stream(js: &jetstream::Context, topology: &Topology) -> anyhow::Result<stream::Stream> {
    let config = stream::Config {
        name: topology.stream_name(),
        subjects: vec![topology.all_events()],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        num_replicas: topology.replicas,
        ..Default::default()
    };
    let mut stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(|| format!("creating JetStream stream {} (is JetStream enabled on the server?)", topology.stream_name()))?;
    let existing = stream.info().await.map_err(|e| anyhow::anyhow!("{e}"))?.config.clone();
    if existing.num_replicas.max(1) != topology.replicas {
        js.update_stream(stream::Config { num_replicas: topology.replicas, ..existing })
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("giving JetStream stream {} {} replicas", topology.stream_name(), topology.replicas))?;
        stream = js.get_stream(topology.stream_name()).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(stream)
}

/// [`ensure_stream`] until JetStream answers: a server still starting, or a cluster electing a new
/// stream leader, answers within seconds. Retries after 500 ms, doubling to 10 s; gives up with
/// the last error after `limit`, or never without one.
pub async fn wait_for_stream(js: &jetstream::Context, topology: &Topology, limit: Option<Duration>) -> anyhow::Result<stream::Stream> {
    let deadline = limit.map(|limit| std::time::Instant::now() + limit);
    let mut wait = Duration::from_millis(500);
    loop {
        match ensure_stream(js, topology).await {
            Ok(stream) => return Ok(stream),
            Err(error) if deadline.is_some_and(|d| std::time::Instant::now() > d) => return Err(error),
            Err(error) => tracing::warn!(error = format!("{error:#}"), "JetStream is not answering yet; retrying"),
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(Duration::from_secs(10));
    }
}
