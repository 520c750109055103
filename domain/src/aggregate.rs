//! The shape every aggregate has: a state built by folding events, and a pure decision function.

use crate::{DomainError, DomainEvent};

/// An event-sourced aggregate: `decide` turns a command into events against the current state,
/// `apply` folds one event into the state. Both are pure; neither may panic.
pub trait Aggregate: Send + Sync + 'static {
    /// The aggregate type's name: it names its event table and its NATS subjects.
    const NAME: &'static str;
    type State: Default + Clone + std::fmt::Debug + PartialEq + Send + Sync + serde::Serialize + serde::de::DeserializeOwned;
    type Command: Clone + std::fmt::Debug + Send + Sync;
    type Event: DomainEvent;

    fn decide(state: &Self::State, command: Self::Command) -> Result<Vec<Self::Event>, DomainError>;
    fn apply(state: Self::State, event: &Self::Event) -> Self::State;

    /// Folds a whole history, oldest first.
    fn replay<'a>(events: impl IntoIterator<Item = &'a Self::Event>) -> Self::State {
        events.into_iter().fold(Self::State::default(), Self::apply)
    }
}
