//! Understudy's domain: aggregates, their commands and versioned events, and the pure rules that
//! turn one into the other. Nothing here does I/O or reads a clock: time and ids come in as
//! arguments, so every rule is a plain unit test.

pub mod account;
pub mod aggregate;
pub mod environment;
pub mod error;
pub mod event;
pub mod ids;
pub mod permissions;
pub mod pr_comment;
pub mod project;
pub mod pull_request;
pub mod tier;
pub mod user;
pub mod values;

#[cfg(test)]
mod invariants;
#[cfg(test)]
pub(crate) mod testing;

pub use aggregate::Aggregate;
pub use error::DomainError;
pub use event::{DomainEvent, EventDecodeError, Metadata, Recorded};
