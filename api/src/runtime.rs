//! Wiring: connect to Postgres and NATS, and run the roles (api, relay, projectors) until told to stop.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use futures::FutureExt;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_adapters::github::client::{GitHub, GitHubConfig};
use understudy_adapters::github::ingest::{Ingest, Recorder};
use understudy_adapters::nats::Topology;
use understudy_adapters::preview::local_git::Poller;
use understudy_adapters::preview::logs::LogSink;
use understudy_adapters::preview::sweep::Sweeper;
use understudy_adapters::preview::worker::Worker;
use understudy_adapters::preview::PreviewConfig;
use understudy_adapters::{db, nats, relay, EventStore};
use understudy_projections::github::OutboxWriter;
use understudy_projections::{Projection, Projector};

use crate::webhooks::WebhookState;

/// Connections shared by every role of one process.
#[derive(Clone)]
pub struct Runtime {
    pub pool: PgPool,
    pub nats: async_nats::Client,
    pub topology: Topology,
    pub store: EventStore,
    pub github: GitHubSettings,
    /// Wakes the webhook processor when a delivery is recorded.
    pub deliveries: Arc<Notify>,
    /// How previews are built, run and served (worker and proxy).
    pub preview: Arc<PreviewConfig>,
    /// Sign-in with GitHub (`GITHUB_CLIENT_ID`, `GITHUB_CLIENT_SECRET`): without it, an API on
    /// loopback is open to whoever reaches it, and any other refuses all but API tokens.
    pub oauth: Option<understudy_adapters::github::oauth::OAuthApp>,
    /// How long GitHub's "this user can read this repository" is trusted before asking again.
    pub access_ttl: std::time::Duration,
    /// How often GraphQL WebSockets are pinged; one that does not answer within as long is closed.
    pub ws_keepalive: std::time::Duration,
    /// The SMTP server for email notifications (`UNDERSTUDY_SMTP_URL`, `UNDERSTUDY_SMTP_FROM`).
    pub mailer: Option<Arc<understudy_adapters::notify::Mailer>>,
}

/// How this process talks to GitHub.
#[derive(Clone, Default)]
pub struct GitHubSettings {
    /// `GITHUB_WEBHOOK_SECRET`: without it, webhooks are refused.
    pub webhook_secret: Option<Arc<[u8]>>,
    /// The App (`GITHUB_APP_ID`, `GITHUB_APP_PRIVATE_KEY`, `GITHUB_API_URL`): without it, no
    /// comments are written and entrypoints default to `main.w`.
    pub app: Option<GitHub>,
    /// `UNDERSTUDY_PUBLIC_URL`, for links in comments.
    pub public_url: String,
}

impl GitHubSettings {
    pub fn from_env(public_url: String) -> anyhow::Result<Self> {
        let webhook_secret = std::env::var("GITHUB_WEBHOOK_SECRET").ok().filter(|s| !s.is_empty()).map(|s| Arc::from(s.into_bytes()));
        let app = GitHubConfig::from_env()?.map(|config| GitHub::new(&config)).transpose()?;
        Ok(Self { webhook_secret, app, public_url })
    }
}

/// How many Postgres connections one process may hold: `UNDERSTUDY_DB_POOL`, 32 unless set.
/// Every process of every role has a pool of its own, so with many processes on one Postgres
/// this is how they stay within its `max_connections`.
pub fn pool_size() -> anyhow::Result<u32> {
    match std::env::var("UNDERSTUDY_DB_POOL") {
        Err(_) => Ok(32),
        Ok(value) => match value.trim().parse::<u32>() {
            Ok(size @ 2..=1000) => Ok(size),
            _ => anyhow::bail!("UNDERSTUDY_DB_POOL {value:?} is not a number of connections from 2 to 1000"),
        },
    }
}

/// Previews under `./.understudy/previews`, served at `*.preview.localhost:8080`, until the
/// binary's configuration says otherwise.
fn default_preview() -> anyhow::Result<Arc<PreviewConfig>> {
    let data_dir = std::env::current_dir()?.join(".understudy/previews");
    Ok(Arc::new(PreviewConfig::new(data_dir, "preview.localhost:8080".into())))
}

impl Runtime {
    /// Connects, migrates and makes sure the event stream exists.
    pub async fn connect(database_url: &str, nats_url: &str, topology: Topology) -> anyhow::Result<Self> {
        // Both connections first, so an unreachable server is reported before anything changes.
        let pool = db::connect(database_url, pool_size()?).await?;
        let nats = nats::connect(nats_url).await?;
        db::migrate(&pool).await?;
        // A cluster electing a new leader (a node was just lost) answers JetStream requests
        // again within seconds: wait for it rather than exit.
        nats::wait_for_stream(&async_nats::jetstream::new(nats.clone()), &topology, Some(std::time::Duration::from_secs(60))).await?;
        Self::assemble(pool, nats, topology).await
    }

    /// A runtime over these connections, with the defaults until the binary's configuration says
    /// otherwise.
    async fn assemble(pool: PgPool, nats: async_nats::Client, topology: Topology) -> anyhow::Result<Self> {
        let store = EventStore::new(pool.clone()).await.context("opening the event store")?;
        // For the life of the process: relays elsewhere wake on what this process appends, and
        // this process publishes what it appended itself if no relay does.
        tokio::spawn(relay::announce_appends(nats.clone(), topology.clone()));
        let js = async_nats::jetstream::new(nats.clone());
        tokio::spawn(relay::stand_by(pool.clone(), js, topology.clone(), store.appends.clone()));
        Ok(Self {
            pool,
            nats,
            topology,
            store,
            github: GitHubSettings::default(),
            deliveries: Arc::default(),
            preview: default_preview()?,
            oauth: None,
            access_ttl: std::time::Duration::from_secs(60),
            ws_keepalive: crate::graphql_ws::KEEPALIVE,
            mailer: None,
        })
    }

    /// Like [`Runtime::connect`], for the API: Postgres must answer, NATS may come later. The
    /// API serves queries and records webhooks meanwhile, `/readyz` says NATS is missing, and
    /// the event stream is made sure of once NATS is there.
    pub async fn connect_for_api(database_url: &str, nats_url: &str, topology: Topology) -> anyhow::Result<Self> {
        let pool = db::connect(database_url, pool_size()?).await?;
        let nats = nats::connect_in_background(nats_url).await?;
        db::migrate(&pool).await?;
        Self::stream_in_background(&nats, &topology);
        Self::assemble(pool, nats, topology).await
    }

    /// Like [`Runtime::connect`], for the relay and the projectors, whose work needs Postgres
    /// alone (the relay numbers the log, the projectors project it from there; NATS is their
    /// fast path): a NATS server that does not answer at start is reported in one warning line
    /// and connected to whenever it answers, and the stream is made once JetStream does. So one
    /// restarted during a NATS outage carries on instead of exiting until the outage ends.
    pub async fn connect_stream_later(database_url: &str, nats_url: &str, topology: Topology) -> anyhow::Result<Self> {
        let pool = db::connect(database_url, pool_size()?).await?;
        // A URL that is not one is an error at once, not an outage.
        nats::servers(nats_url)?;
        let nats = match nats::connect(nats_url).await {
            Ok(nats) => nats,
            Err(error) => {
                tracing::warn!(error = format!("{error:#}"), "working from Postgres alone until NATS answers");
                nats::connect_in_background(nats_url).await?
            }
        };
        db::migrate(&pool).await?;
        Self::stream_in_background(&nats, &topology);
        Self::assemble(pool, nats, topology).await
    }

    /// Makes sure of the event stream, retrying until JetStream answers.
    fn stream_in_background(nats: &async_nats::Client, topology: &Topology) {
        let (js, topology) = (async_nats::jetstream::new(nats.clone()), topology.clone());
        tokio::spawn(async move { nats::wait_for_stream(&js, &topology, None).await });
    }

    pub fn schema(&self, auth: crate::auth::Auth) -> crate::graphql::AppSchema {
        crate::graphql::schema(self.pool.clone(), self.nats.clone(), self.topology.clone(), auth)
    }

    /// Who may see and do what, for an API bound to `addr`. Its public URL is
    /// `UNDERSTUDY_PUBLIC_URL`, or `http://{addr}` when none is set.
    pub fn auth(&self, addr: SocketAddr) -> crate::auth::Auth {
        let open = self.oauth.is_none() && addr.ip().is_loopback();
        let public_url = if self.github.public_url.is_empty() { format!("http://{addr}") } else { self.github.public_url.clone() };
        let mut auth = crate::auth::Auth::new(
            self.store.clone(),
            self.oauth.clone(),
            self.preview.signer.clone(),
            self.preview.secret_key.clone(),
            &public_url,
            open,
            &self.preview.preview_domain,
        );
        auth.access_ttl = self.access_ttl;
        auth.github = self.github.app.clone();
        auth
    }

    /// Binds `listen` and serves the API until `cancel`; returns the bound address and the task.
    pub async fn serve_api(
        &self,
        listen: SocketAddr,
        cancel: CancellationToken,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<SocketAddr> {
        let (listener, addr) = bind(listen, "listen").await?;
        let webhooks = WebhookState {
            recorder: Recorder::spawn(self.pool.clone()),
            secret: self.github.webhook_secret.clone(),
            wake: self.deliveries.clone(),
        };
        let readiness = crate::http::Readiness { pool: self.pool.clone(), nats: self.nats.clone(), max_lag: 10_000 };
        let auth = self.auth(addr);
        let proxy = crate::proxy::PreviewProxy {
            store: self.store.clone(),
            domain: Arc::from(self.preview.preview_domain.as_str()),
            public: self.preview.public,
            signer: self.preview.signer.clone(),
            auth: auth.clone(),
        };
        let app = crate::http::router(self.schema(auth.clone()), auth, webhooks, readiness, proxy, self.ws_keepalive);
        // A projector that reconnected may have skipped change notices: live subscriptions re-read.
        let (nats, subject, stop) = (self.nats.clone(), self.topology.resync_subject(), cancel.clone());
        tasks.spawn(async move {
            let mut resyncs = nats.subscribe(subject).await?;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    next = futures::StreamExt::next(&mut resyncs) => match next {
                        Some(_) => nats::note_resync(),
                        None => return Ok(()),
                    },
                }
            }
        });
        serve(listener, app, cancel, tasks, "serving HTTP");
        Ok(addr)
    }

    /// Binds `listen` and serves this process's `/metrics` and `/healthz` until `cancel`: for
    /// the roles other than the API, whose counters (a worker's builds and sandboxes, a relay's
    /// standby rounds) no API process can see. Returns the bound address.
    pub async fn serve_metrics(
        &self,
        listen: SocketAddr,
        cancel: CancellationToken,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) -> anyhow::Result<SocketAddr> {
        let (listener, addr) = bind(listen, "serve metrics").await?;
        serve(listener, crate::http::metrics_router(self.pool.clone()), cancel, tasks, "serving metrics");
        Ok(addr)
    }

    pub fn spawn_relay(&self, cancel: CancellationToken, tasks: &mut JoinSet<anyhow::Result<()>>) {
        // The relay is here: no standby for it (the one `assemble` started ends).
        self.store.appends.stand_down();
        let js = async_nats::jetstream::new(self.nats.clone());
        let (pool, topology) = (self.pool.clone(), self.topology.clone());
        tasks.spawn(async move {
            relay::run(pool, js, topology, cancel).await;
            Ok(())
        });
    }

    pub fn spawn_projectors(
        &self,
        projections: Vec<Arc<dyn Projection>>,
        cancel: CancellationToken,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) {
        for projection in projections {
            let projector = Projector::new(self.pool.clone(), self.nats.clone(), self.topology.clone(), projection);
            let cancel = cancel.clone();
            tasks.spawn(async move { projector.run(cancel).await });
        }
        // Notices skipped while NATS was away: tell every reader to re-read, once reconnected.
        let (nats, subject) = (self.nats.clone(), self.topology.resync_subject());
        let mut reconnects = nats::reconnects();
        tasks.spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return Ok(()),
                    changed = reconnects.changed() => changed?,
                }
                if let Err(error) = nats.publish(subject.clone(), bytes::Bytes::new()).await {
                    tracing::warn!(error = %error, "the resync notice was not sent");
                }
            }
        });
    }
}

impl Runtime {
    /// Builds, runs and tests previews. `id` names this worker in leases and logs.
    pub fn spawn_worker(&self, id: String, cancel: CancellationToken, tasks: &mut JoinSet<anyhow::Result<()>>) {
        let worker = Arc::new(Worker {
            id,
            store: self.store.clone(),
            config: self.preview.clone(),
            logs: LogSink::spawn(self.pool.clone(), self.nats.clone(), self.topology.clone()),
            github: self.github.app.clone(),
            nats: self.nats.clone(),
            topology: self.topology.clone(),
        });
        tasks.spawn(async move {
            worker.run(cancel).await;
            Ok(())
        });
    }

    /// The scheduler: the stale sweep every minute; the promoter, the tiers' scheduled jobs and
    /// notifications every second; the git poller of projects with a git remote every `poll`.
    pub fn spawn_scheduler(
        &self,
        idle: std::time::Duration,
        poll: std::time::Duration,
        cancel: CancellationToken,
        tasks: &mut JoinSet<anyhow::Result<()>>,
    ) {
        let sweeper = Sweeper { store: self.store.clone(), idle, every: std::time::Duration::from_secs(60) };
        let stop = cancel.clone();
        tasks.spawn(async move {
            sweeper.run(stop).await;
            Ok(())
        });
        tasks.spawn(self.promoter().run(cancel.clone()).map(Ok));
        tasks.spawn(self.job_scheduler().run(cancel.clone()).map(Ok));
        tasks.spawn(self.notifier().run(cancel.clone()).map(Ok));
        // Debug sessions that expired (or whose environment went) are closed; their instances stop.
        let (store, stop) = (self.store.clone(), cancel.clone());
        let close = move || {
            let store = store.clone();
            async move { understudy_adapters::preview::sweep::close_ended_debug_sessions(&store).await }
        };
        let period = std::time::Duration::from_secs(5);
        tasks.spawn(understudy_adapters::worker::every("closing ended debug sessions", period, stop, close).map(Ok));
        if let Some(server) = self.preview.addon_database.clone() {
            // Terminated environments' add-on databases go.
            let (pool, stop) = (self.pool.clone(), cancel.clone());
            let janitor = move || {
                let (server, pool) = (server.clone(), pool.clone());
                async move {
                    let dropped = server.drop_terminated(&pool).await?;
                    if dropped > 0 {
                        tracing::info!(dropped, "add-on databases of terminated environments dropped");
                    }
                    Ok::<_, sqlx::Error>(())
                }
            };
            let period = std::time::Duration::from_secs(10);
            tasks.spawn(understudy_adapters::worker::every("dropping add-on databases", period, stop, janitor).map(Ok));
        }
        tasks.spawn(self.git_poller(poll).run(cancel).map(Ok));
    }

    /// Sends projects' notifications (outgoing webhooks and emails) about their long-lived
    /// environments.
    pub fn notifier(&self) -> understudy_adapters::notify::Notifier {
        let key = self.preview.secret_key.clone().map(Arc::new);
        let mut notifier = understudy_adapters::notify::Notifier::new(self.store.clone(), key, self.github.public_url.clone());
        notifier.mailer = self.mailer.clone();
        notifier
    }

    /// Asks for the runs of tiers' scheduled jobs as they fall due.
    pub fn job_scheduler(&self) -> understudy_adapters::schedules::JobScheduler {
        understudy_adapters::schedules::JobScheduler { store: self.store.clone(), every: std::time::Duration::from_secs(1) }
    }

    /// Promotes commits that passed a tier into the tiers promoted from it automatically.
    pub fn promoter(&self) -> understudy_adapters::promoter::Promoter {
        understudy_adapters::promoter::Promoter { store: self.store.clone(), every: std::time::Duration::from_secs(1) }
    }

    /// The poller of projects with a git remote (mirrors under the preview data dir).
    pub fn git_poller(&self, every: std::time::Duration) -> Poller {
        Poller { store: self.store.clone(), mirrors: self.preview.data_dir.join("mirrors"), every }
    }

    /// Processes webhook deliveries, and writes PR comments when a GitHub App is configured.
    pub fn spawn_github(&self, cancel: CancellationToken, tasks: &mut JoinSet<anyhow::Result<()>>) {
        let ingest = Ingest { store: self.store.clone(), github: self.github.app.clone() };
        let (wake, stop) = (self.deliveries.clone(), cancel.clone());
        tasks.spawn(async move {
            ingest.run(wake, stop).await;
            Ok(())
        });
        if let Some(github) = self.github.app.clone() {
            let writer = OutboxWriter {
                store: self.store.clone(),
                github,
                public_url: self.github.public_url.clone(),
                debounce: std::time::Duration::from_secs(1),
            };
            tasks.spawn(async move {
                writer.run(Arc::new(Notify::new()), cancel).await;
                Ok(())
            });
        }
    }
}

/// Waits for every task; the first one to fail (or Ctrl-C) stops the others.
/// Binds `listen` to `what` on it ("cannot {what} on {listen}" if it cannot); and the address bound.
async fn bind(listen: SocketAddr, what: &str) -> anyhow::Result<(tokio::net::TcpListener, SocketAddr)> {
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot {what} on {listen}: is it in use?"))?;
    let addr = listener.local_addr()?;
    Ok((listener, addr))
}

/// Serves `app` on `listener` until `cancel`, as a task of `tasks`; its error says `doing`.
fn serve(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    cancel: CancellationToken,
    tasks: &mut JoinSet<anyhow::Result<()>>,
    doing: &'static str,
) {
    tasks.spawn(async move { axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await.context(doing) });
}

pub async fn supervise(mut tasks: JoinSet<anyhow::Result<()>>, cancel: CancellationToken) -> anyhow::Result<()> {
    let mut first_error = None;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c(), if !cancel.is_cancelled() => {
                tracing::info!("interrupted; stopping");
                cancel.cancel();
            }
            _ = terminate.recv(), if !cancel.is_cancelled() => {
                tracing::info!("terminated; stopping");
                cancel.cancel();
            }
            joined = tasks.join_next() => match joined {
                None => break,
                Some(result) => {
                    let outcome = result.map_err(anyhow::Error::from).and_then(|r| r);
                    if let Err(error) = outcome {
                        first_error.get_or_insert(error);
                    }
                    // Any role ending, cleanly or not, ends the process: a half-running node is worse than none.
                    cancel.cancel();
                }
            }
        }
    }
    first_error.map_or(Ok(()), Err)
}
