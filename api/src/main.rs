//! `understudy`: the whole product in one binary. `understudy up` runs every role; each role can
//! also run alone over a shared Postgres and NATS.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use understudy_adapters::preview::token::PreviewSigner;
use understudy_adapters::preview::PreviewConfig;
use understudy_adapters::secrets::SecretKey;
use understudy_api::runtime::{supervise, GitHubSettings, Runtime};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "understudy", version, about = "Preview environments for every pull request, with tests, on your own machines.")]
struct Cli {
    #[command(flatten)]
    config: Config,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct Config {
    /// Postgres URL. Unset with `up`: a private Postgres is started under the data dir.
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true)]
    database_url: Option<String>,
    /// NATS URL (JetStream enabled). Unset with `up`: a private nats-server is started.
    #[arg(long, env = "NATS_URL", global = true)]
    nats_url: Option<String>,
    /// Where `up` keeps its private Postgres and NATS data.
    #[arg(long, env = "UNDERSTUDY_DATA_DIR", default_value = ".understudy", global = true)]
    data_dir: PathBuf,
    /// Address the API listens on.
    #[arg(long, env = "UNDERSTUDY_LISTEN", default_value = "127.0.0.1:8080", global = true)]
    listen: SocketAddr,
    /// Where a relay, projector, worker or scheduler process serves its `/metrics` and
    /// `/healthz` (the API serves them at its own address). Unset: they are not served.
    #[arg(long, env = "UNDERSTUDY_METRICS_LISTEN", global = true)]
    metrics_listen: Option<SocketAddr>,
    /// The URL users reach the API at (links in PR comments); defaults to http://LISTEN.
    #[arg(long, env = "UNDERSTUDY_PUBLIC_URL", global = true)]
    public_url: Option<String>,
    /// Prefix of every NATS subject, stream and consumer (isolates installations sharing a NATS).
    #[arg(long, env = "UNDERSTUDY_NATS_PREFIX", default_value = "understudy", global = true)]
    nats_prefix: String,
    /// Copies of the event stream: 1 on one nats-server, 3 on a three-node cluster (NATS_URL
    /// then lists the nodes, comma-separated).
    #[arg(long, env = "UNDERSTUDY_NATS_REPLICAS", default_value_t = 1, global = true)]
    nats_replicas: usize,
    /// Previews are served at `{environment}.{domain}`; defaults to preview.localhost:PORT
    /// (`*.localhost` resolves to this machine in browsers and curl).
    #[arg(long, env = "UNDERSTUDY_PREVIEW_DOMAIN", global = true)]
    preview_domain: Option<String>,
    /// Serve previews to anyone who reaches the proxy, signed in or not. Unset: no when sign-in
    /// with GitHub is configured (GITHUB_CLIENT_ID); otherwise yes when the API listens on a
    /// loopback address only.
    #[arg(long, env = "UNDERSTUDY_PUBLIC_PREVIEWS", global = true)]
    public_previews: Option<bool>,
    /// Where repositories are fetched from: `{base}/{owner}/{name}.git`.
    #[arg(long, env = "GITHUB_GIT_URL", default_value = "https://github.com", global = true)]
    git_url: String,
    /// The Wing toolchain's directory (holding node_modules/.bin/wing); scripts/setup installs
    /// it at toolchain/wing.
    #[arg(long, env = "UNDERSTUDY_WING_TOOLCHAIN", default_value = "toolchain/wing", global = true)]
    wing_toolchain: PathBuf,
    /// A Rust toolchain's sysroot for Rust apps; the one of `rustc` on PATH when unset.
    #[arg(long, env = "UNDERSTUDY_RUST_TOOLCHAIN", global = true)]
    rust_toolchain: Option<PathBuf>,
    /// Deployments one worker builds or serves at once.
    #[arg(long, env = "UNDERSTUDY_WORKER_PARALLEL", default_value_t = 4, global = true)]
    worker_parallel: usize,
    /// Pull request environments with no commit and no visit for this many hours are
    /// deactivated (the next commit or visit wakes them).
    #[arg(long, env = "UNDERSTUDY_STALE_AFTER_HOURS", default_value_t = 240, global = true)]
    stale_after_hours: u64,
    /// How often projects with a git remote are polled for new commits, in seconds.
    #[arg(long, env = "UNDERSTUDY_GIT_POLL_SECONDS", default_value_t = 10, global = true)]
    git_poll_seconds: u64,
    /// A worker that stops heartbeating loses its deployments to another after this many seconds.
    #[arg(long, env = "UNDERSTUDY_LEASE_SECONDS", default_value_t = 30, global = true)]
    lease_seconds: u64,
    /// Memory limit of each sandbox, in MiB.
    #[arg(long, env = "UNDERSTUDY_SANDBOX_MEMORY_MB", default_value_t = 1024, global = true)]
    sandbox_memory_mb: u64,
    /// CPU each sandbox is sure of when sandboxes compete, in thousandths of a core; idle cores
    /// it may use beyond that.
    #[arg(long, env = "UNDERSTUDY_SANDBOX_CPU_MILLICORES", default_value_t = 1000, global = true)]
    sandbox_cpu_millicores: u64,
    /// The most CPU a sandbox may use even when cores are idle, in thousandths of a core (0: no cap).
    #[arg(long, env = "UNDERSTUDY_SANDBOX_CPU_CAP_MILLICORES", default_value_t = 0, global = true)]
    sandbox_cpu_cap_millicores: u64,
}

#[derive(Subcommand)]
enum Command {
    /// Run every role in one process; starts a private Postgres and NATS when no URLs are given.
    Up,
    /// Serve the HTTP and GraphQL API (and the preview proxy).
    Api,
    /// Build, run and test previews in sandboxes.
    Worker,
    /// Run the schedules (the stale sweep).
    Scheduler,
    /// Inside a preview's sandbox: run the app and bridge a unix socket to its port.
    #[command(hide = true)]
    SandboxBridge {
        #[arg(long)]
        socket: PathBuf,
        #[arg(long)]
        port: u16,
        /// Listen on the port and connect to the socket (a smoke test's sandbox), instead of
        /// listening on the socket and connecting to the app's port.
        #[arg(long)]
        reverse: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Number the global log and relay it to NATS JetStream.
    Relay,
    /// Run projectors (all of them, or one).
    Projector {
        /// Only this projection.
        #[arg(long)]
        projection: Option<String>,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// Rebuild a projection from the Postgres log beside the live one, then swap it in.
    Replay {
        /// The projection to rebuild, or `all`.
        #[arg(long)]
        projection: String,
    },
    /// Print an entity's full history (every event, with who caused it).
    Events {
        /// The id of an account, project or environment.
        id: Uuid,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print everything one request caused (a webhook delivery's id, a command's correlation id).
    Trace {
        correlation_id: Uuid,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print an entity's state, now or at a past moment, rebuilt from the log.
    State {
        id: Uuid,
        /// An RFC 3339 moment, e.g. 2026-11-24T12:00:00Z.
        #[arg(long)]
        at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Compare every live read model with a fresh replay of the log; fails on any difference.
    Verify {
        /// One projection (`access` for the access index), or `all`.
        #[arg(long, default_value = "all")]
        projection: String,
    },
    /// Export preview usage (counts and durations per project and day; never code, logs or secrets).
    Usage {
        /// One project, or all.
        #[arg(long)]
        project: Option<Uuid>,
        /// First day (YYYY-MM-DD, UTC).
        #[arg(long)]
        from: Option<chrono::NaiveDate>,
        /// Last day (YYYY-MM-DD, UTC).
        #[arg(long)]
        to: Option<chrono::NaiveDate>,
        /// `csv` or `json` (JSON lines).
        #[arg(long, default_value = "csv")]
        format: String,
    },
    /// Print each projection's checkpoint and lag behind the log.
    Status,
    /// Projects.
    Project {
        #[command(subcommand)]
        what: ProjectCommand,
    },
    /// Run an environment's tests again, on its Ready deployment, each in a fresh instance.
    Test {
        #[command(subcommand)]
        what: TestCommand,
    },
    /// A project's tiers (dev → staging → production): declare, freeze, promote, roll back.
    Tier {
        #[command(subcommand)]
        what: understudy_api::tier_cli::TierCommand,
    },
    /// A project's secrets: encrypted at rest, injected into its previews, never shown again.
    Secret {
        #[command(subcommand)]
        what: SecretCommand,
    },
    /// GitHub App setup helpers.
    Github {
        #[command(subcommand)]
        what: GithubCommand,
    },
    /// Measure throughput and latency; prints ratios against baselines measured in the same run.
    Bench {
        #[command(subcommand)]
        what: understudy_api::bench::Bench,
    },
}

#[derive(Subcommand)]
enum ProjectCommand {
    /// Make a git repository that is not on GitHub a project (a path, a bare repository or a
    /// git URL). Its branches are polled; each new head is deployed like a pull request's.
    Add {
        /// The repository: a path or a git URL.
        #[arg(long)]
        git: String,
        /// The production branch.
        #[arg(long, default_value = "main")]
        branch: String,
        /// The project's name; the repository's directory name when omitted.
        #[arg(long)]
        name: Option<String>,
    },
    /// Look for new commits of every project with a git remote now (e.g. from a post-receive hook).
    Poll,
    /// Make a GitHub repository a project (installing the App does this by itself).
    Create {
        /// `owner/name`.
        #[arg(long)]
        repo: String,
        /// The GitHub App installation that can see the repository.
        #[arg(long)]
        installation: u64,
        /// The production branch; the repository's default branch when omitted.
        #[arg(long)]
        branch: Option<String>,
    },
}

#[derive(Subcommand)]
enum TestCommand {
    /// Ask the worker serving the environment to run its tests again; results update the PR comment.
    Run {
        #[arg(long)]
        environment: Uuid,
    },
}

#[derive(Subcommand)]
enum SecretCommand {
    /// Set a secret; its value is read from standard input (one trailing newline dropped).
    Set {
        #[arg(long)]
        project: Uuid,
        /// `API_TOKEN`-style name.
        name: String,
        /// Which environments get it: all, production or preview.
        #[arg(long, default_value = "all")]
        scope: String,
    },
    /// List a project's secrets: names, scopes and when they changed (never values).
    List {
        #[arg(long)]
        project: Uuid,
    },
    /// Seal every secret and session token again under the current key. With `--new-key`, first
    /// replace the key file's key with a new one (the old one moves to `{key file}.previous`);
    /// restart the other processes afterwards so they seal with the new key too.
    Rotate {
        #[arg(long)]
        new_key: bool,
    },
    /// Remove a secret.
    Rm {
        #[arg(long)]
        project: Uuid,
        name: String,
    },
}

#[derive(Subcommand)]
enum GithubCommand {
    /// Print a GitHub App manifest with the permissions and events Understudy needs; create the
    /// App from it in one step (see the README's GitHub section).
    AppManifest {
        /// The App's name on GitHub.
        #[arg(long, default_value = "Understudy")]
        name: String,
    },
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    // Each role's connections carry its name in pg_stat_activity: `understudy api`, …
    understudy_adapters::db::name_connections(&format!("understudy {}", matches.subcommand_name().unwrap_or("")));
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(error) => error.exit(),
    };
    let telemetry = match understudy_api::telemetry::init("info,sqlx=warn,esrs::store=off") {
        Ok(telemetry) => telemetry,
        Err(error) => {
            eprintln!("error: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(run(cli));
    telemetry.shutdown();
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn require(value: &Option<String>, name: &str) -> anyhow::Result<String> {
    value.clone().with_context(|| {
        format!("{name} is not set: set it, or start `understudy up` (its private servers are then found through the data dir)")
    })
}

/// Where a running `up` writes the URLs of its private Postgres and NATS, so that the other
/// commands, run from the same directory, reach them without configuration.
fn urls_file(config: &Config) -> PathBuf {
    config.data_dir.join("urls.env")
}

/// Fills unset URLs from a running `up`'s `urls.env`.
fn with_private_urls(mut config: Config) -> Config {
    if config.database_url.is_some() && config.nats_url.is_some() {
        return config;
    }
    let Ok(text) = std::fs::read_to_string(urls_file(&config)) else { return config };
    for line in text.lines() {
        match line.split_once('=') {
            Some(("DATABASE_URL", url)) if config.database_url.is_none() => config.database_url = Some(url.to_string()),
            Some(("NATS_URL", url)) if config.nats_url.is_none() => config.nats_url = Some(url.to_string()),
            _ => {}
        }
    }
    config
}

/// Postgres alone, for the commands that only read or rebuild data.
async fn connect_db(config: &Config, max_connections: u32) -> anyhow::Result<sqlx::PgPool> {
    understudy_adapters::db::connect(&require(&config.database_url, "DATABASE_URL")?, max_connections).await
}

async fn connect(config: &Config) -> anyhow::Result<Runtime> {
    let runtime =
        Runtime::connect(&require(&config.database_url, "DATABASE_URL")?, &require(&config.nats_url, "NATS_URL")?, topology(config)?)
            .await?;
    configure(config, runtime)
}

/// For the API: NATS may come later (see `Runtime::connect_for_api`).
async fn connect_api(config: &Config) -> anyhow::Result<Runtime> {
    let (database_url, nats_url) = (require(&config.database_url, "DATABASE_URL")?, require(&config.nats_url, "NATS_URL")?);
    let runtime = Runtime::connect_for_api(&database_url, &nats_url, topology(config)?).await?;
    with_preview_signer(config, configure(config, runtime)?)
}

/// For the relay and the projectors: JetStream may come later (see `Runtime::connect_stream_later`).
async fn connect_stream_later(config: &Config) -> anyhow::Result<Runtime> {
    let (database_url, nats_url) = (require(&config.database_url, "DATABASE_URL")?, require(&config.nats_url, "NATS_URL")?);
    configure(config, Runtime::connect_stream_later(&database_url, &nats_url, topology(config)?).await?)
}

/// Applies the binary's configuration: the GitHub App and how previews are built and served.
fn configure(config: &Config, mut runtime: Runtime) -> anyhow::Result<Runtime> {
    let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{}", config.listen));
    runtime.github = GitHubSettings::from_env(public_url)?;
    runtime.oauth = understudy_adapters::github::oauth::OAuthApp::from_env()?;
    runtime.mailer = understudy_adapters::notify::Mailer::from_env()?.map(std::sync::Arc::new);
    let mut preview = preview_config(config)?;
    // With sign-in, previews are for those who may see them; without, for whoever reaches a
    // loopback-only API.
    preview.public = config.public_previews.unwrap_or(runtime.oauth.is_none() && config.listen.ip().is_loopback());
    if runtime.oauth.is_some() && preview.secret_key.is_none() {
        // Users' GitHub tokens are sealed with it.
        preview.secret_key = secret_key(config, true)?;
    }
    runtime.preview = std::sync::Arc::new(preview);
    Ok(runtime)
}

fn preview_config(config: &Config) -> anyhow::Result<PreviewConfig> {
    let cwd = std::env::current_dir()?;
    let domain = config.preview_domain.clone().unwrap_or_else(|| format!("preview.localhost:{}", config.listen.port()));
    let mut preview = PreviewConfig::new(cwd.join(&config.data_dir).join("previews"), domain);
    preview.git_base = config.git_url.clone();
    let wing = cwd.join(&config.wing_toolchain);
    preview.wing_toolchain = wing.join("node_modules/.bin/wing").exists().then_some(wing);
    preview.rust_toolchain = match &config.rust_toolchain {
        Some(sysroot) => Some(cwd.join(sysroot)),
        None => understudy_adapters::preview::detect_rust_toolchain(),
    };
    preview.secret_key = secret_key(config, false)?;
    let addon = std::env::var("UNDERSTUDY_ADDON_DATABASE_URL").ok().filter(|u| !u.is_empty()).or_else(|| config.database_url.clone());
    preview.addon_database = addon.map(|url| understudy_adapters::preview::addon::AddonServer::new(&url)).transpose()?;
    preview.max_parallel = config.worker_parallel.max(1);
    preview.lease_ttl = std::time::Duration::from_secs(config.lease_seconds.max(3));
    preview.limits.memory_bytes = config.sandbox_memory_mb.max(64) << 20;
    preview.limits.cpu_millicores = config.sandbox_cpu_millicores.max(10);
    preview.limits.cpu_cap_millicores = (config.sandbox_cpu_cap_millicores > 0).then_some(config.sandbox_cpu_cap_millicores.max(10));
    Ok(preview)
}

fn topology(config: &Config) -> anyhow::Result<understudy_adapters::nats::Topology> {
    understudy_adapters::nats::Topology::new(&config.nats_prefix)?.with_replicas(config.nats_replicas)
}

fn git_poll(config: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(config.git_poll_seconds.max(1))
}

fn stale_after(config: &Config) -> std::time::Duration {
    std::time::Duration::from_secs(config.stale_after_hours.max(1) * 3600)
}

/// The key that seals project secrets: `UNDERSTUDY_SECRET_KEY`, `UNDERSTUDY_SECRET_KEY_FILE`, or
/// `{data dir}/secret.key` (created by `up` on first start).
fn secret_key(config: &Config, create: bool) -> anyhow::Result<Option<SecretKey>> {
    if let Some(key) = SecretKey::from_env()? {
        return Ok(Some(key));
    }
    let file = config.data_dir.join("secret.key");
    if create || file.exists() {
        return Ok(Some(SecretKey::load_or_create(&file)?));
    }
    Ok(None)
}

async fn secret(config: &Config, what: SecretCommand) -> anyhow::Result<()> {
    use understudy_domain::ids::ProjectId;
    use understudy_domain::project::{ProjectCommand as Command, SecretScope};
    let store = understudy_adapters::EventStore::new(connect_db(config, 2).await?).await?;
    let meta = understudy_domain::Metadata::new(Uuid::new_v4(), "system:cli");
    let exists = |project: &understudy_domain::project::Project, id: Uuid| {
        anyhow::ensure!(project.id.is_some(), "no project {id}");
        Ok(())
    };
    match what {
        SecretCommand::Set { project, name, scope } => {
            let state = store.projects.load(project).await?.into_inner();
            exists(&state, project)?;
            let key = secret_key(config, false)?
                .context("no secret key: set UNDERSTUDY_SECRET_KEY (32 bytes, base64) or run `understudy up` once to create one")?;
            let mut value = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut value)?;
            let value = value.strip_suffix('\n').map(|v| v.strip_suffix('\r').unwrap_or(v)).unwrap_or(&value);
            understudy_domain::project::validate_secret_name(&name)?;
            let sealed = key.seal(ProjectId(project), &name, value)?;
            let command = Command::SetSecret { name: name.clone(), sealed, scope: SecretScope::parse(&scope)?, at: chrono::Utc::now() };
            store.projects.execute(project, command, meta).await?;
            println!("secret {name} set ({scope}); it takes effect from the next deployment");
        }
        SecretCommand::List { project } => {
            let state = store.projects.load(project).await?.into_inner();
            exists(&state, project)?;
            for (name, secret) in &state.secrets {
                println!("{name}\t{}\t{}\tkey {}", secret.scope.as_str(), secret.updated_at.to_rfc3339(), secret.sealed.key_id);
            }
        }
        SecretCommand::Rotate { new_key } => {
            let key = if new_key {
                if std::env::var("UNDERSTUDY_SECRET_KEY").is_ok() {
                    anyhow::bail!(
                        "the key comes from UNDERSTUDY_SECRET_KEY: set a new one there (`openssl rand -base64 32`), move the old one \
                         to UNDERSTUDY_PREVIOUS_SECRET_KEYS, and run `understudy secret rotate` without --new-key"
                    );
                }
                let file =
                    std::env::var("UNDERSTUDY_SECRET_KEY_FILE").map(PathBuf::from).unwrap_or_else(|_| config.data_dir.join("secret.key"));
                SecretKey::rotate_file(&file)?
            } else {
                secret_key(config, false)?.context("no secret key: set UNDERSTUDY_SECRET_KEY or UNDERSTUDY_SECRET_KEY_FILE")?
            };
            let done = understudy_api::cli::reseal_all(&store, &key).await?;
            println!(
                "sealed again under key {}: {} secrets, {} session tokens, {} notification secrets; keys no longer needed once every \
                 process has restarted: {}",
                key.id(),
                done.secrets,
                done.sessions,
                done.notifications,
                key.previous_ids().join(", ")
            );
        }
        SecretCommand::Rm { project, name } => {
            store.projects.execute(project, Command::RemoveSecret { name: name.clone(), at: chrono::Utc::now() }, meta).await?;
            println!("secret {name} removed");
        }
    }
    Ok(())
}

/// The API's preview signer: the key in `UNDERSTUDY_PREVIEW_SIGNING_KEY_FILE`, or
/// `{data dir}/preview-signing.pem`, created on first start. Only processes that serve the proxy
/// need it, so only they create it.
fn with_preview_signer(config: &Config, mut runtime: Runtime) -> anyhow::Result<Runtime> {
    let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{}", config.listen));
    let path = match std::env::var("UNDERSTUDY_PREVIEW_SIGNING_KEY_FILE") {
        Ok(path) => PathBuf::from(path),
        Err(_) => config.data_dir.join("preview-signing.pem"),
    };
    let mut preview = (*runtime.preview).clone();
    preview.signer = Some(std::sync::Arc::new(PreviewSigner::load_or_create(&path, public_url)?));
    runtime.preview = std::sync::Arc::new(preview);
    Ok(runtime)
}

/// Serves this role's metrics if `--metrics-listen` asks for them, and says where.
async fn serve_metrics(
    config: &Config,
    runtime: &Runtime,
    cancel: &CancellationToken,
    tasks: &mut JoinSet<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    if let Some(listen) = config.metrics_listen {
        let addr = runtime.serve_metrics(listen, cancel.clone(), tasks).await?;
        eprintln!("understudy metrics on http://{addr}/metrics");
    }
    Ok(())
}

/// A worker's name: host and process, unique while it runs.
fn worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "localhost".into());
    format!("{host}-{}", std::process::id())
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = match cli.command {
        Command::Up => cli.config,
        _ => with_private_urls(cli.config),
    };
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();
    match cli.command {
        Command::Up => return up(config).await,
        Command::Api => {
            let runtime = connect_api(&config).await?;
            let addr = runtime.serve_api(config.listen, cancel.clone(), &mut tasks).await?;
            runtime.spawn_github(cancel.clone(), &mut tasks);
            eprintln!("understudy api listening on http://{addr}/graphql");
        }
        Command::Relay => {
            let runtime = connect_stream_later(&config).await?;
            runtime.spawn_relay(cancel.clone(), &mut tasks);
            serve_metrics(&config, &runtime, &cancel, &mut tasks).await?;
        }
        Command::Worker => {
            let runtime = connect(&config).await?;
            runtime.spawn_worker(worker_id(), cancel.clone(), &mut tasks);
            serve_metrics(&config, &runtime, &cancel, &mut tasks).await?;
        }
        Command::Scheduler => {
            let runtime = connect(&config).await?;
            runtime.spawn_scheduler(stale_after(&config), git_poll(&config), cancel.clone(), &mut tasks);
            serve_metrics(&config, &runtime, &cancel, &mut tasks).await?;
        }
        Command::SandboxBridge { socket, port, reverse, command } => {
            let code = if reverse {
                understudy_adapters::preview::bridge::run_reverse(&socket, port, &command).await?
            } else {
                understudy_adapters::preview::bridge::run(&socket, port, &command).await?
            };
            std::process::exit(code);
        }
        Command::Projector { projection } => {
            let projections = understudy_projections::selected(projection.as_deref().unwrap_or("all"))?;
            let runtime = connect_stream_later(&config).await?;
            runtime.spawn_projectors(projections, cancel.clone(), &mut tasks);
            serve_metrics(&config, &runtime, &cancel, &mut tasks).await?;
        }
        Command::Migrate => {
            let pool = connect_db(&config, 2).await?;
            understudy_adapters::db::migrate(&pool).await?;
            eprintln!("migrations applied");
            return Ok(());
        }
        Command::Replay { projection } => {
            let pool = connect_db(&config, 4).await?;
            understudy_adapters::db::migrate(&pool).await?;
            return understudy_api::cli::replay(&pool, &projection).await;
        }
        Command::Events { id, json } => {
            let pool = connect_db(&config, 2).await?;
            return understudy_api::cli::events(&pool, id, json, &mut std::io::stdout()).await;
        }
        Command::Trace { correlation_id, json } => {
            let pool = connect_db(&config, 2).await?;
            return understudy_api::cli::trace(&pool, correlation_id, json, &mut std::io::stdout()).await;
        }
        Command::State { id, at } => {
            let pool = connect_db(&config, 2).await?;
            return understudy_api::cli::state(&pool, id, at, &mut std::io::stdout()).await;
        }
        Command::Verify { projection } => {
            let pool = connect_db(&config, 4).await?;
            return understudy_api::cli::verify(&pool, &projection, &mut std::io::stdout()).await;
        }
        Command::Usage { project, from, to, format } => {
            let pool = connect_db(&config, 2).await?;
            return understudy_api::cli::usage(&pool, project, from, to, &format, &mut std::io::stdout()).await;
        }
        Command::Status => {
            let pool = connect_db(&config, 2).await?;
            return understudy_api::cli::status(&pool, &mut std::io::stdout()).await;
        }
        Command::Project { what: ProjectCommand::Add { git, branch, name } } => {
            let runtime = connect(&config).await?;
            let project = understudy_adapters::preview::local_git::add_project(&runtime.store, &git, &branch, name.as_deref()).await?;
            let id = project.id.map(|id| id.to_string()).unwrap_or_default();
            println!("project {id}: {}, production branch {branch}", project.git_url.unwrap_or_default());
            return Ok(());
        }
        Command::Project { what: ProjectCommand::Poll } => {
            let runtime = connect(&config).await?;
            let requested = runtime.git_poller(git_poll(&config)).poll_all().await?;
            println!("{requested} deployment(s) requested");
            return Ok(());
        }
        Command::Project { what: ProjectCommand::Create { repo, installation, branch } } => {
            let runtime = connect(&config).await?;
            let ingest = understudy_adapters::github::ingest::Ingest { store: runtime.store.clone(), github: runtime.github.app.clone() };
            let project = ingest.create_project(installation, &repo, branch.as_deref()).await?;
            let id = project.id.map(|id| id.to_string()).unwrap_or_default();
            let branch = project.production_branch.map(String::from).unwrap_or_default();
            println!("project {id}: {repo}, production branch {branch}");
            return Ok(());
        }
        Command::Secret { what } => return secret(&config, what).await,
        Command::Tier { what } => {
            let store = understudy_adapters::EventStore::new(connect_db(&config, 2).await?).await?;
            return understudy_api::tier_cli::run(&store, what, &mut std::io::stdout()).await;
        }
        Command::Test { what: TestCommand::Run { environment } } => {
            let store = understudy_adapters::EventStore::new(connect_db(&config, 2).await?).await?;
            let state = store.environments.load(environment).await?.into_inner();
            let deployment = state.current().with_context(|| format!("no environment {environment}, or it has no deployment"))?;
            let run_id = Uuid::new_v4();
            let command = understudy_domain::environment::EnvironmentCommand::RequestTestRun {
                deployment_id: deployment.id,
                run_id,
                at: chrono::Utc::now(),
            };
            let meta = understudy_domain::Metadata::new(Uuid::new_v4(), "system:cli");
            let done = store.environments.execute(environment, command, meta).await?;
            if done.events.is_empty() {
                println!("a test run of deployment {} is already waiting; it will run these tests", deployment.id);
            } else {
                println!("test run {run_id} requested for deployment {}", deployment.id);
            }
            return Ok(());
        }
        Command::Github { what: GithubCommand::AppManifest { name } } => {
            let public_url = config.public_url.clone().unwrap_or_else(|| format!("http://{}", config.listen));
            println!("{}", serde_json::to_string_pretty(&understudy_adapters::github::app_manifest(&name, &public_url))?);
            return Ok(());
        }
        Command::Bench { what } => {
            let database_url = require(&config.database_url, "DATABASE_URL")?;
            // `bench scale` starts a NATS cluster of its own.
            let nats_url = match what {
                understudy_api::bench::Bench::Scale { .. } => config.nats_url.clone().unwrap_or_default(),
                _ => require(&config.nats_url, "NATS_URL")?,
            };
            return understudy_api::bench::run(&database_url, &nats_url, what).await;
        }
    }
    supervise(tasks, cancel).await
}

/// Every role in one process, on a private Postgres and NATS unless URLs are given.
async fn up(mut config: Config) -> anyhow::Result<()> {
    let embedded = if config.database_url.is_none() || config.nats_url.is_none() {
        eprintln!("starting a private Postgres and NATS under {}", config.data_dir.display());
        let embedded = understudy_adapters::embedded::Embedded::start(&config.data_dir).await?;
        config.database_url.get_or_insert_with(|| embedded.database_url().to_string());
        config.nats_url.get_or_insert_with(|| embedded.nats_url().to_string());
        let urls = format!("DATABASE_URL={}\nNATS_URL={}\n", embedded.database_url(), embedded.nats_url());
        std::fs::write(urls_file(&config), urls).context("writing the private servers' URLs")?;
        eprintln!(
            "private Postgres at {}, NATS at {} (other understudy commands run here find them)",
            embedded.database_url(),
            embedded.nats_url()
        );
        Some(embedded)
    } else {
        None
    };
    let result = async {
        secret_key(&config, true)?;
        let runtime = with_preview_signer(&config, connect(&config).await?)?;
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        runtime.spawn_relay(cancel.clone(), &mut tasks);
        runtime.spawn_projectors(understudy_projections::all(), cancel.clone(), &mut tasks);
        runtime.spawn_github(cancel.clone(), &mut tasks);
        runtime.spawn_worker(worker_id(), cancel.clone(), &mut tasks);
        runtime.spawn_scheduler(stale_after(&config), git_poll(&config), cancel.clone(), &mut tasks);
        let addr = runtime.serve_api(config.listen, cancel.clone(), &mut tasks).await?;
        eprintln!("understudy is up: http://{addr}/graphql (GraphiQL at http://{addr}/graphiql); Ctrl-C stops it");
        let outcome = supervise(tasks, cancel).await;
        // Close the connection to NATS before its private server stops: clients held by tasks
        // that outlive the roles would otherwise see it drop, and say so, on the way out.
        if let Err(error) = runtime.nats.drain().await {
            tracing::debug!(error = %error, "draining the NATS connection failed");
        }
        outcome
    }
    .await;
    if let Some(embedded) = embedded {
        let _ = std::fs::remove_file(urls_file(&config));
        embedded.stop().await.context("stopping the private Postgres and NATS")?;
    }
    result
}
