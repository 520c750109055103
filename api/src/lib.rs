//! Understudy's API (axum + async-graphql) and the roles the `understudy` binary runs.

pub mod accounts;
pub mod auth;
pub mod bench;
pub mod bench_fanout;
pub mod bench_reads;
pub mod bench_replay;
pub mod bench_scale;
pub mod cli;
pub mod dashboard;
pub mod debug;
pub mod graphql;
pub mod graphql_ws;
pub mod http;
pub mod logs;
pub mod metrics;
pub mod operations;
pub mod proxy;
pub mod runtime;
pub mod shared_subscriptions;
pub mod telemetry;
pub mod tier_cli;
pub mod tiers;
pub mod triggers;
pub mod webhooks;
