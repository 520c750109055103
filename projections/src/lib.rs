//! Understudy's read side: the projector framework (durable JetStream consumers that apply each
//! event exactly once, with their checkpoint in the same Postgres transaction as the read-model
//! change), replay from the Postgres log, and the read models themselves.

pub mod any_event;
pub mod entity_history;
pub mod environments;
pub mod github;
pub mod projector;
pub mod replay;
pub mod time_travel;
pub mod usage;

pub use any_event::AnyEvent;
pub use projector::{Change, Projection, ProjectionError, Projector, Tables};

/// Every projection this build has, by name.
pub fn all() -> Vec<std::sync::Arc<dyn Projection>> {
    vec![
        std::sync::Arc::new(environments::Environments),
        std::sync::Arc::new(entity_history::EntityHistory),
        std::sync::Arc::new(github::GitHubOutbox),
        std::sync::Arc::new(usage::Usage),
    ]
}

/// Every projection for `all`, otherwise the one called `name`.
pub fn selected(name: &str) -> anyhow::Result<Vec<std::sync::Arc<dyn Projection>>> {
    if name == "all" {
        Ok(all())
    } else {
        Ok(vec![by_name(name)?])
    }
}

/// The projection called `name`, or an error listing the ones there are.
pub fn by_name(name: &str) -> anyhow::Result<std::sync::Arc<dyn Projection>> {
    all().into_iter().find(|p| p.name() == name).ok_or_else(|| {
        let names: Vec<_> = all().iter().map(|p| p.name()).collect();
        anyhow::anyhow!("no projection called {name:?}; there are: {}", names.join(", "))
    })
}
