//! Connecting to Postgres and migrating it.

use std::time::Duration;

use anyhow::Context;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

static APPLICATION_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Names this process's connections (Postgres's `application_name`, seen in
/// `pg_stat_activity`); `understudy` unless set, first call wins.
pub fn name_connections(name: &str) {
    let _ = APPLICATION_NAME.set(name.trim().to_string());
}

/// How long a pooled connection may sit unused before it is checked on its way out.
const IDLE_BEFORE_PING: Duration = Duration::from_secs(1);

/// Connects a pool, failing fast with a message that names the URL and what to check.
pub async fn connect(url: &str, max_connections: u32) -> anyhow::Result<PgPool> {
    let options: PgConnectOptions = url.parse().with_context(|| format!("DATABASE_URL {} is not a valid Postgres URL", redact_url(url)))?;
    let options = options.application_name(APPLICATION_NAME.get().map_or("understudy", String::as_str));
    PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(10))
        // sqlx pings every connection it hands out, a round trip per statement run on the pool.
        // A connection in use within the last second is known to work: ping only the others,
        // which is where a Postgres restart leaves dead ones.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for > IDLE_BEFORE_PING {
                    use sqlx::Connection;
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
        .connect_with(options)
        .await
        .with_context(|| {
            format!(
                "cannot connect to Postgres at {}: check that it is running and that DATABASE_URL is right \
                 (or unset DATABASE_URL and let `understudy up` start its own)",
                redact_url(url)
            )
        })
}

/// Claiming one row of a work queue (webhook deliveries, the GitHub outbox) for as long as a
/// transaction stays open, while the work itself calls out to GitHub.
///
/// The claim is a transaction-scoped advisory lock, `pg_try_advisory_xact_lock(class,
/// hashtext(key))`, not a row lock. A row lock (`FOR UPDATE`) gives its transaction an id, and a
/// transaction id held across a call to GitHub holds vacuum back on every database of the
/// Postgres cluster for as long as GitHub takes to answer. An advisory lock takes no transaction
/// id, and ends with its transaction, so a worker that crashes or is cancelled lets go of its
/// row at once.
///
/// Two rules make it a claim:
/// - Lock candidates from a subquery with a `LIMIT`, so that Postgres stops at the first one it
///   can lock instead of locking every candidate the outer query would otherwise filter.
/// - After locking, read the row again in a new statement, and go on only if it is still due. The
///   candidates' snapshot may predate another worker's commit that finished it just before
///   releasing its lock.
pub mod claim {
    /// The advisory lock class (first key) of `webhook_deliveries` rows.
    pub const WEBHOOK_DELIVERY: i32 = 0x5553_0001;
    /// The advisory lock class (first key) of `github_outbox` entries.
    pub const GITHUB_OUTBOX: i32 = 0x5553_0002;
    /// How many of the most overdue rows a claim tries to lock.
    pub const CANDIDATES: i64 = 16;
}

/// Applies every migration in `migrations/` that has not been applied yet.
pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    sqlx::migrate!("../migrations").run(pool).await.context("applying database migrations")?;
    // Logs older than the access index: build it once from what they hold.
    if crate::access_index::missing(pool).await? {
        let events = crate::access_index::rebuild(pool).await.context("building the access index from the log")?;
        tracing::info!(events, "access index built from the log");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(super::redact_url("postgres://u:pw@h:5432/db"), "postgres://u:***@h:5432/db");
        assert_eq!(super::redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact_url("nonsense"), "nonsense");
    }
}
