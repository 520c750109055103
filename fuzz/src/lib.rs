//! The fuzz targets' bodies. cargo-fuzz runs them (`fuzz_targets/`, `scripts/fuzz`), and the test
//! suite runs them over every input kept in `fuzz/corpus/` (`tests/it/fuzz_corpora.rs`), so an
//! input that once found a bug stays checked on every run, without a nightly compiler.

pub mod graphql;
pub mod graphql_ws;
pub mod logs;
pub mod repository_file;
pub mod signature;
pub mod values;
pub mod webhook;

use std::time::Duration;

/// Longer than any request may take: a request still running then is a hang.
pub const DEADLINE: Duration = Duration::from_secs(2);

/// What the GraphQL and log targets run against: a pool pointing at a closed port (each
/// statement fails within its 20 ms acquire timeout) and the authorization built on it.
async fn unreachable_database() -> (sqlx::PgPool, understudy_api::auth::Auth) {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .acquire_timeout(Duration::from_millis(20))
        .connect_lazy("postgres://fuzz@127.0.0.1:9/fuzz")
        .expect("the URL is well formed");
    let store = understudy_adapters::event_store::EventStore::new(pool.clone()).await.expect("building the store runs no SQL");
    let auth = understudy_api::auth::Auth::new(store, None, None, None, "http://127.0.0.1:9", true, "preview.localhost");
    (pool, auth)
}
