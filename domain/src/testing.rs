//! Given/when/then for aggregates: given past events, when a command, then events or an error.

use crate::{Aggregate, DomainError};

pub struct Given<A: Aggregate> {
    state: A::State,
}

pub fn given<A: Aggregate>(events: &[A::Event]) -> Given<A> {
    Given { state: A::replay(events) }
}

impl<A: Aggregate> Given<A> {
    pub fn when(self, command: A::Command) -> Then<A> {
        let result = A::decide(&self.state, command.clone());
        Then { state: self.state, command, result }
    }
}

pub struct Then<A: Aggregate> {
    state: A::State,
    command: A::Command,
    result: Result<Vec<A::Event>, DomainError>,
}

impl<A: Aggregate> Then<A> {
    #[track_caller]
    pub fn then(self, expected: &[A::Event]) -> A::State {
        match self.result {
            Ok(events) => {
                assert_eq!(events, expected, "command {:?}", self.command);
                events.iter().fold(self.state, A::apply)
            }
            Err(error) => panic!("command {:?} was refused: {error}", self.command),
        }
    }

    #[track_caller]
    pub fn then_error(self, matches: impl Fn(&DomainError) -> bool) {
        match self.result {
            Ok(events) => panic!("command {:?} was accepted with {events:?}", self.command),
            Err(error) => assert!(matches(&error), "command {:?}: unexpected error {error:?}", self.command),
        }
    }
}
