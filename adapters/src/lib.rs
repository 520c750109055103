//! Understudy's ports to the outside world: the Postgres event store and its global log, the
//! sequencer and relay that carry the log to NATS JetStream, and the embedded Postgres/NATS
//! supervisor behind `understudy up`.

pub mod access_index;
pub mod db;
pub mod embedded;
pub mod event_store;
pub mod github;
pub mod global_log;
mod group_commit;
pub mod metrics;
pub mod nats;
pub mod notify;
pub mod preview;
pub mod promoter;
pub mod relay;
pub mod repo_tiers;
pub mod schedules;
pub mod secrets;
pub mod telemetry;
pub mod worker;

pub use event_store::{AggregateStore, CommandError, EventStore};
pub use global_log::LoggedEvent;
