//! Typed ids, so an environment id can never be passed where a project id is meant.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(pub Uuid);

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Uuid {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

id_type!(
    /// A user or a team.
    AccountId
);
id_type!(
    /// A person who signs in (their personal account has the same id).
    UserId
);
id_type!(
    /// A project: one repository of one account.
    ProjectId
);
id_type!(
    /// One environment: project × branch or PR × entrypoint.
    EnvironmentId
);
id_type!(
    /// One deployment: one commit of one environment.
    DeploymentId
);
id_type!(
    /// One pull request of one project.
    PullRequestId
);
