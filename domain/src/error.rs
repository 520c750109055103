//! Why a command was refused. Every variant is the caller's to fix (a 4xx), never a retry.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DomainError {
    #[error("{entity} {id} does not exist")]
    NotFound { entity: &'static str, id: String },
    #[error("{entity} {id} already exists")]
    AlreadyExists { entity: &'static str, id: String },
    #[error("deployment {deployment} is {status}; {action} needs it to be {expected}")]
    IllegalTransition { deployment: String, status: &'static str, action: &'static str, expected: &'static str },
    #[error("environment is {status}; {action} needs it to be {expected}")]
    IllegalEnvironmentTransition { status: &'static str, action: &'static str, expected: &'static str },
    #[error("deployment {deployment} was superseded by a newer commit; stop working on it")]
    Superseded { deployment: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("the {entity} would be left without an Owner; make someone else Owner first")]
    LastOwner { entity: &'static str },
    #[error("{0}")]
    Refused(String),
}

impl DomainError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }
}
