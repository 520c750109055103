//! End-to-end tests of the spine against the machine's real Postgres and NATS JetStream.

mod auth;
mod chaos;
mod chaos_github;
mod cli;
mod dashboard;
mod debug;
mod docs;
mod fuzz_corpora;
mod github;
mod graphql;
mod preview;
mod projector;
mod relay;
mod replay;
mod scale;
mod store;
mod tiers;
