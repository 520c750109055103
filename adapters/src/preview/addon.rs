//! The database add-on: a Postgres database per environment.
//!
//! - Each environment gets a database and a role of the same name (`us_env_{environment}`). The
//!   role owns its database and nothing else; `CONNECT` on the database is revoked from `PUBLIC`,
//!   so no other environment's role can open it. The password is derived from the installation's
//!   signing key and the environment id: it is never stored, and every worker derives the same.
//! - A sandbox has no network. The worker forwards one unix socket per deployment to the add-on's
//!   server, and a reversed bridge inside the sandbox listens on its own `127.0.0.1:5432`:
//!   `DATABASE_URL=postgres://us_env_…:…@127.0.0.1:5432/us_env_…` works unchanged in the app,
//!   its build, its tests and its jobs, and reaches that one server only.
//! - The seed command runs once, after the first build that finds the database unseeded; the
//!   database remembers it was seeded (a comment on it).
//! - The scheduler drops the databases of terminated environments.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use tokio::net::{TcpStream, UnixListener};
use understudy_domain::ids::EnvironmentId;
use uuid::Uuid;

/// Where the reversed bridge listens inside a sandbox.
pub const SANDBOX_PORT: u16 = 5432;
/// Where the deployment's socket directory is mounted inside a sandbox.
pub const SANDBOX_DIR: &str = "/run/db";
const SEEDED: &str = "understudy:seeded";

/// The add-on's Postgres server, as its administrator.
#[derive(Clone)]
pub struct AddonServer {
    admin: PgPool,
    host: String,
    port: u16,
}

impl std::fmt::Debug for AddonServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AddonServer({}:{})", self.host, self.port)
    }
}

/// The database (and role) name of an environment's add-on database.
pub fn database_name(environment: EnvironmentId) -> String {
    format!("us_env_{}", environment.0.simple())
}

/// The role's password: derived, never stored.
pub fn password(signer: &super::token::PreviewSigner, environment: EnvironmentId) -> String {
    hex::encode(signer.derive_mac_key(&format!("addon-database:{}", environment.0)))
}

/// `DATABASE_URL` as a sandbox sees it.
pub fn sandbox_url(name: &str, password: &str) -> String {
    format!("postgres://{name}:{password}@127.0.0.1:{SANDBOX_PORT}/{name}")
}

impl AddonServer {
    /// The server of an administrator's URL (which must reach it over TCP).
    pub fn new(admin_url: &str) -> anyhow::Result<Self> {
        let options = PgConnectOptions::from_str(admin_url)?;
        let (host, port) = (options.get_host().to_string(), options.get_port());
        anyhow::ensure!(!host.starts_with('/'), "the database add-on needs a server reached over TCP, not {host}");
        let admin = PgPoolOptions::new().max_connections(2).connect_lazy_with(options);
        Ok(Self { admin, host, port })
    }

    /// Creates the environment's role and database when missing (and sets the role's password);
    /// whether the database still wants its seed.
    pub async fn ensure(&self, name: &str, password: &str) -> sqlx::Result<bool> {
        debug_assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') && password.bytes().all(|b| b.is_ascii_hexdigit()));
        let role_exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = $1)").bind(name).fetch_one(&self.admin).await?;
        let role = if role_exists { "ALTER" } else { "CREATE" };
        tolerate_duplicates(sqlx::query(&format!("{role} ROLE \"{name}\" LOGIN PASSWORD '{password}'")).execute(&self.admin).await)?;
        let exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_database WHERE datname = $1)").bind(name).fetch_one(&self.admin).await?;
        if !exists {
            tolerate_duplicates(sqlx::query(&format!("CREATE DATABASE \"{name}\" OWNER \"{name}\"")).execute(&self.admin).await)?;
        }
        sqlx::query(&format!("REVOKE CONNECT, TEMPORARY ON DATABASE \"{name}\" FROM PUBLIC")).execute(&self.admin).await?;
        sqlx::query(&format!("GRANT CONNECT ON DATABASE \"{name}\" TO \"{name}\"")).execute(&self.admin).await?;
        let comment: Option<String> =
            sqlx::query_scalar("SELECT shobj_description(oid, 'pg_database') FROM pg_database WHERE datname = $1")
                .bind(name)
                .fetch_one(&self.admin)
                .await?;
        Ok(comment.as_deref() != Some(SEEDED))
    }

    pub async fn mark_seeded(&self, name: &str) -> sqlx::Result<()> {
        sqlx::query(&format!("COMMENT ON DATABASE \"{name}\" IS '{SEEDED}'")).execute(&self.admin).await?;
        Ok(())
    }

    /// Drops the add-on databases (and roles) of environments the control plane says are
    /// terminated; how many.
    pub async fn drop_terminated(&self, control: &PgPool) -> sqlx::Result<usize> {
        let names: Vec<String> =
            sqlx::query_scalar("SELECT datname FROM pg_database WHERE datname LIKE 'us\\_env\\_%'").fetch_all(&self.admin).await?;
        let mut dropped = 0;
        for name in names {
            let Ok(environment) = Uuid::parse_str(name.trim_start_matches("us_env_")) else { continue };
            let terminated: Option<bool> = sqlx::query_scalar("SELECT status = 'Terminated' FROM environments WHERE environment_id = $1")
                .bind(environment)
                .fetch_optional(control)
                .await?;
            if terminated == Some(true) {
                sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")).execute(&self.admin).await?;
                sqlx::query(&format!("DROP ROLE IF EXISTS \"{name}\"")).execute(&self.admin).await?;
                dropped += 1;
            }
        }
        Ok(dropped)
    }

    /// Forwards every connection to `socket` to the server, until the returned guard drops.
    pub fn forward(&self, socket: &Path) -> std::io::Result<Forward> {
        if let Some(dir) = socket.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        let (host, port) = (self.host.clone(), self.port);
        let task = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let (host, port) = (host.clone(), port);
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect((host.as_str(), port)).await {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        });
        Ok(Forward { task, socket: socket.to_path_buf() })
    }
}

/// A running forwarder; dropping it stops it.
pub struct Forward {
    task: tokio::task::JoinHandle<()>,
    socket: PathBuf,
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Two workers creating one environment's role or database at once: the loser's "already
/// exists" is no failure.
fn tolerate_duplicates(result: sqlx::Result<sqlx::postgres::PgQueryResult>) -> sqlx::Result<()> {
    match result {
        Ok(_) => Ok(()),
        Err(sqlx::Error::Database(error)) if matches!(error.code().as_deref(), Some("42710" | "42P04" | "23505")) => Ok(()),
        Err(error) => Err(error),
    }
}
