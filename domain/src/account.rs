//! The Account aggregate: a person's own account or a team, its members and their roles, and
//! the GitHub App installation linked to it. A team always keeps at least one Owner.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::ids::{AccountId, UserId};
use crate::permissions::Role;
use crate::{Aggregate, DomainError, DomainEvent};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AccountKind {
    /// A person's own account; its owner is the person.
    Personal {
        user_id: UserId,
        github_login: String,
    },
    Team {
        name: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub user_id: UserId,
    pub role: Role,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Account {
    pub id: Option<AccountId>,
    pub kind: Option<AccountKind>,
    pub members: Vec<Member>,
    pub installation_id: Option<u64>,
}

impl Account {
    pub fn role_of(&self, user: UserId) -> Option<Role> {
        self.members.iter().find(|m| m.user_id == user).map(|m| m.role)
    }

    fn owners(&self) -> usize {
        self.members.iter().filter(|m| m.role == Role::Owner).count()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum AccountCommand {
    /// `creator` becomes the first Owner.
    Create {
        account_id: AccountId,
        kind: AccountKind,
        creator: UserId,
        at: DateTime<Utc>,
    },
    AddMember {
        user_id: UserId,
        role: Role,
        at: DateTime<Utc>,
    },
    ChangeRole {
        user_id: UserId,
        role: Role,
        at: DateTime<Utc>,
    },
    RemoveMember {
        user_id: UserId,
        at: DateTime<Utc>,
    },
    LinkInstallation {
        installation_id: u64,
        at: DateTime<Utc>,
    },
    UnlinkInstallation {
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum AccountEvent {
    AccountCreated { account_id: AccountId, kind: AccountKind, at: DateTime<Utc> },
    MemberAdded { user_id: UserId, role: Role, at: DateTime<Utc> },
    MemberRoleChanged { user_id: UserId, role: Role, at: DateTime<Utc> },
    MemberRemoved { user_id: UserId, at: DateTime<Utc> },
    InstallationLinked { installation_id: u64, at: DateTime<Utc> },
    InstallationUnlinked { installation_id: u64, at: DateTime<Utc> },
}

impl DomainEvent for AccountEvent {
    const SCHEMA_VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        match self {
            Self::AccountCreated { .. } => "AccountCreated",
            Self::MemberAdded { .. } => "MemberAdded",
            Self::MemberRoleChanged { .. } => "MemberRoleChanged",
            Self::MemberRemoved { .. } => "MemberRemoved",
            Self::InstallationLinked { .. } => "InstallationLinked",
            Self::InstallationUnlinked { .. } => "InstallationUnlinked",
        }
    }
}

pub struct AccountAggregate;

impl Aggregate for AccountAggregate {
    const NAME: &'static str = "account";
    type State = Account;
    type Command = AccountCommand;
    type Event = AccountEvent;

    fn decide(state: &Account, command: AccountCommand) -> Result<Vec<AccountEvent>, DomainError> {
        use AccountCommand as C;
        use AccountEvent as E;
        if let C::Create { account_id, kind, creator, at } = command {
            if state.id.is_some() {
                return Err(DomainError::AlreadyExists { entity: "account", id: account_id.to_string() });
            }
            if let AccountKind::Team { name } = &kind {
                if name.trim().is_empty() || name.len() > 100 {
                    return Err(DomainError::invalid("name", "a team name is 1 to 100 characters"));
                }
            }
            return Ok(vec![E::AccountCreated { account_id, kind, at }, E::MemberAdded { user_id: creator, role: Role::Owner, at }]);
        }
        if state.id.is_none() {
            return Err(DomainError::NotFound { entity: "account", id: "(not created)".into() });
        }
        let personal = matches!(state.kind, Some(AccountKind::Personal { .. }));
        let member = |user_id: UserId| state.role_of(user_id).ok_or(DomainError::NotFound { entity: "member", id: user_id.to_string() });
        match command {
            C::Create { .. } => unreachable!("handled above"),
            C::AddMember { user_id, role, at } => {
                if personal {
                    return Err(DomainError::Refused("a personal account has no other members; create a team".into()));
                }
                if state.role_of(user_id).is_some() {
                    return Err(DomainError::AlreadyExists { entity: "member", id: user_id.to_string() });
                }
                Ok(vec![E::MemberAdded { user_id, role, at }])
            }
            C::ChangeRole { user_id, role, at } => {
                let current = member(user_id)?;
                if current == role {
                    return Ok(vec![]);
                }
                if current == Role::Owner && state.owners() == 1 {
                    return Err(DomainError::LastOwner { entity: "account" });
                }
                Ok(vec![E::MemberRoleChanged { user_id, role, at }])
            }
            C::RemoveMember { user_id, at } => {
                if member(user_id)? == Role::Owner && state.owners() == 1 {
                    return Err(DomainError::LastOwner { entity: "account" });
                }
                Ok(vec![E::MemberRemoved { user_id, at }])
            }
            C::LinkInstallation { installation_id, at } => Ok(match state.installation_id {
                Some(existing) if existing == installation_id => vec![],
                _ => vec![E::InstallationLinked { installation_id, at }],
            }),
            C::UnlinkInstallation { at } => {
                Ok(state.installation_id.map(|installation_id| E::InstallationUnlinked { installation_id, at }).into_iter().collect())
            }
        }
    }

    fn apply(mut state: Account, event: &AccountEvent) -> Account {
        use AccountEvent as E;
        match event {
            E::AccountCreated { account_id, kind, .. } => {
                state.id = Some(*account_id);
                state.kind = Some(kind.clone());
            }
            E::MemberAdded { user_id, role, .. } => state.members.push(Member { user_id: *user_id, role: *role }),
            E::MemberRoleChanged { user_id, role, .. } => {
                if let Some(m) = state.members.iter_mut().find(|m| m.user_id == *user_id) {
                    m.role = *role;
                }
            }
            E::MemberRemoved { user_id, .. } => state.members.retain(|m| m.user_id != *user_id),
            E::InstallationLinked { installation_id, .. } => state.installation_id = Some(*installation_id),
            E::InstallationUnlinked { .. } => state.installation_id = None,
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use chrono::TimeZone;
    use uuid::Uuid;
    use AccountCommand as C;
    use AccountEvent as E;

    fn at() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 24, 12, 0, 0).single().expect("valid date")
    }
    fn user(n: u128) -> UserId {
        UserId(Uuid::from_u128(n))
    }
    fn team() -> Vec<E> {
        vec![
            E::AccountCreated { account_id: AccountId(Uuid::from_u128(100)), kind: AccountKind::Team { name: "core".into() }, at: at() },
            E::MemberAdded { user_id: user(1), role: Role::Owner, at: at() },
        ]
    }

    #[test]
    fn creating_makes_the_creator_owner() {
        let state = given::<AccountAggregate>(&[])
            .when(C::Create {
                account_id: AccountId(Uuid::from_u128(100)),
                kind: AccountKind::Team { name: "core".into() },
                creator: user(1),
                at: at(),
            })
            .then(&team());
        assert_eq!(state.role_of(user(1)), Some(Role::Owner));
    }

    #[test]
    fn a_team_always_keeps_an_owner() {
        given::<AccountAggregate>(&team())
            .when(C::RemoveMember { user_id: user(1), at: at() })
            .then_error(|e| matches!(e, DomainError::LastOwner { .. }));
        given::<AccountAggregate>(&team())
            .when(C::ChangeRole { user_id: user(1), role: Role::Admin, at: at() })
            .then_error(|e| matches!(e, DomainError::LastOwner { .. }));
        let mut two = team();
        two.push(E::MemberAdded { user_id: user(2), role: Role::Owner, at: at() });
        given::<AccountAggregate>(&two)
            .when(C::RemoveMember { user_id: user(1), at: at() })
            .then(&[E::MemberRemoved { user_id: user(1), at: at() }]);
    }

    #[test]
    fn membership_transitions() {
        given::<AccountAggregate>(&team()).when(C::AddMember { user_id: user(2), role: Role::Billing, at: at() }).then(&[E::MemberAdded {
            user_id: user(2),
            role: Role::Billing,
            at: at(),
        }]);
        given::<AccountAggregate>(&team())
            .when(C::AddMember { user_id: user(1), role: Role::Member, at: at() })
            .then_error(|e| matches!(e, DomainError::AlreadyExists { .. }));
        given::<AccountAggregate>(&team())
            .when(C::ChangeRole { user_id: user(9), role: Role::Member, at: at() })
            .then_error(|e| matches!(e, DomainError::NotFound { .. }));
        given::<AccountAggregate>(&team()).when(C::ChangeRole { user_id: user(1), role: Role::Owner, at: at() }).then(&[]);
        given::<AccountAggregate>(&[])
            .when(C::AddMember { user_id: user(2), role: Role::Member, at: at() })
            .then_error(|e| matches!(e, DomainError::NotFound { .. }));
        let personal = vec![
            E::AccountCreated {
                account_id: AccountId(Uuid::from_u128(5)),
                kind: AccountKind::Personal { user_id: user(5), github_login: "octo".into() },
                at: at(),
            },
            E::MemberAdded { user_id: user(5), role: Role::Owner, at: at() },
        ];
        given::<AccountAggregate>(&personal)
            .when(C::AddMember { user_id: user(2), role: Role::Member, at: at() })
            .then_error(|e| matches!(e, DomainError::Refused(_)));
    }

    #[test]
    fn installations_link_once() {
        let linked = E::InstallationLinked { installation_id: 9, at: at() };
        given::<AccountAggregate>(&team()).when(C::LinkInstallation { installation_id: 9, at: at() }).then(std::slice::from_ref(&linked));
        let mut history = team();
        history.push(linked);
        given::<AccountAggregate>(&history).when(C::LinkInstallation { installation_id: 9, at: at() }).then(&[]);
        given::<AccountAggregate>(&history)
            .when(C::UnlinkInstallation { at: at() })
            .then(&[E::InstallationUnlinked { installation_id: 9, at: at() }]);
        given::<AccountAggregate>(&team()).when(C::UnlinkInstallation { at: at() }).then(&[]);
    }
}
