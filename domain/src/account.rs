//! The Account aggregate: a person's own account or a team, its members and their roles, and
//! the GitHub App installation linked to it. A team always keeps at least one Owner.

use std::collections::BTreeMap;

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
    /// Invitations not yet accepted, by lowercased GitHub login.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub invitations: BTreeMap<String, Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub billing: Option<Billing>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
}

/// Billing details as they are kept: already mangled. A card number never enters the domain;
/// the API keeps its last four digits and drops the rest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Billing {
    pub holder: String,
    pub card_last4: String,
    pub email: String,
}

impl Billing {
    pub fn new(holder: &str, card_last4: &str, email: &str) -> Result<Self, DomainError> {
        let holder = holder.trim();
        if holder.is_empty() || holder.chars().count() > 200 {
            return Err(DomainError::invalid("holder", "the card holder's name is 1 to 200 characters"));
        }
        if card_last4.len() != 4 || !card_last4.chars().all(|c| c.is_ascii_digit()) {
            return Err(DomainError::invalid("card", "only the last four digits of a card are kept"));
        }
        let email = email.trim();
        if email.len() > 254 || !email.split_once('@').is_some_and(|(user, host)| !user.is_empty() && host.contains('.')) {
            return Err(DomainError::invalid("email", format!("{email:?} is not an email address")));
        }
        Ok(Self { holder: holder.to_string(), card_last4: card_last4.to_string(), email: email.to_string() })
    }

    /// How every member sees the card: `•••• •••• •••• 4242`.
    pub fn card_display(&self) -> String {
        format!("•••• •••• •••• {}", self.card_last4)
    }
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
    /// Invites a GitHub login to a team; inviting again changes the offered role.
    Invite {
        login: String,
        role: Role,
        at: DateTime<Utc>,
    },
    RevokeInvitation {
        login: String,
        at: DateTime<Utc>,
    },
    /// The invited person, signed in as `login`, joins with the offered role.
    AcceptInvitation {
        user_id: UserId,
        login: String,
        at: DateTime<Utc>,
    },
    SetBilling {
        billing: Billing,
        at: DateTime<Utc>,
    },
    /// Deletes a team; only one of its Owners may.
    Delete {
        by: UserId,
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
    MemberInvited { login: String, role: Role, at: DateTime<Utc> },
    InvitationRevoked { login: String, at: DateTime<Utc> },
    InvitationAccepted { login: String, user_id: UserId, at: DateTime<Utc> },
    BillingDetailsSet { billing: Billing, at: DateTime<Utc> },
    AccountDeleted { by: UserId, at: DateTime<Utc> },
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
            Self::MemberInvited { .. } => "MemberInvited",
            Self::InvitationRevoked { .. } => "InvitationRevoked",
            Self::InvitationAccepted { .. } => "InvitationAccepted",
            Self::BillingDetailsSet { .. } => "BillingDetailsSet",
            Self::AccountDeleted { .. } => "AccountDeleted",
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
        if state.deleted {
            return Err(DomainError::Refused("this team was deleted".into()));
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
            C::Invite { login, role, at } => {
                if personal {
                    return Err(DomainError::Refused("a personal account has no other members; create a team".into()));
                }
                crate::user::validate_login(&login)?;
                let login = login.to_ascii_lowercase();
                if state.invitations.get(&login) == Some(&role) {
                    return Ok(vec![]);
                }
                Ok(vec![E::MemberInvited { login, role, at }])
            }
            C::RevokeInvitation { login, at } => {
                let login = login.to_ascii_lowercase();
                if !state.invitations.contains_key(&login) {
                    return Err(DomainError::NotFound { entity: "invitation", id: login });
                }
                Ok(vec![E::InvitationRevoked { login, at }])
            }
            C::AcceptInvitation { user_id, login, at } => {
                let login = login.to_ascii_lowercase();
                let Some(role) = state.invitations.get(&login).copied() else {
                    return Err(DomainError::NotFound { entity: "invitation", id: login });
                };
                let mut events = vec![E::InvitationAccepted { login, user_id, at }];
                if state.role_of(user_id).is_none() {
                    events.push(E::MemberAdded { user_id, role, at });
                }
                Ok(events)
            }
            C::SetBilling { billing, at } => {
                if state.billing.as_ref() == Some(&billing) {
                    return Ok(vec![]);
                }
                Ok(vec![E::BillingDetailsSet { billing, at }])
            }
            C::Delete { by, at } => {
                if personal {
                    return Err(DomainError::Refused("a personal account cannot be deleted here".into()));
                }
                if state.role_of(by) != Some(Role::Owner) {
                    return Err(DomainError::Refused("only an Owner can delete a team".into()));
                }
                Ok(vec![E::AccountDeleted { by, at }])
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
            E::MemberInvited { login, role, .. } => {
                state.invitations.insert(login.clone(), *role);
            }
            E::InvitationRevoked { login, .. } | E::InvitationAccepted { login, .. } => {
                state.invitations.remove(login);
            }
            E::BillingDetailsSet { billing, .. } => state.billing = Some(billing.clone()),
            E::AccountDeleted { .. } => state.deleted = true,
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
    fn invitations_are_accepted_once_with_the_offered_role() {
        let invite = C::Invite { login: "Hubot".into(), role: Role::Billing, at: at() };
        let invited = E::MemberInvited { login: "hubot".into(), role: Role::Billing, at: at() };
        given::<AccountAggregate>(&team()).when(invite.clone()).then(std::slice::from_ref(&invited));
        let mut history = team();
        history.push(invited);
        given::<AccountAggregate>(&history).when(invite).then(&[]);
        given::<AccountAggregate>(&history).when(C::AcceptInvitation { user_id: user(3), login: "hubot".into(), at: at() }).then(&[
            E::InvitationAccepted { login: "hubot".into(), user_id: user(3), at: at() },
            E::MemberAdded { user_id: user(3), role: Role::Billing, at: at() },
        ]);
        given::<AccountAggregate>(&team())
            .when(C::AcceptInvitation { user_id: user(3), login: "hubot".into(), at: at() })
            .then_error(|e| matches!(e, DomainError::NotFound { .. }));
        given::<AccountAggregate>(&history)
            .when(C::RevokeInvitation { login: "HUBOT".into(), at: at() })
            .then(&[E::InvitationRevoked { login: "hubot".into(), at: at() }]);
        given::<AccountAggregate>(&team())
            .when(C::Invite { login: "not a login".into(), role: Role::Member, at: at() })
            .then_error(|e| matches!(e, DomainError::Invalid { .. }));
    }

    #[test]
    fn only_an_owner_deletes_a_team_and_then_it_refuses_everything() {
        let mut history = team();
        history.push(E::MemberAdded { user_id: user(2), role: Role::Admin, at: at() });
        given::<AccountAggregate>(&history).when(C::Delete { by: user(2), at: at() }).then_error(|e| matches!(e, DomainError::Refused(_)));
        given::<AccountAggregate>(&history).when(C::Delete { by: user(1), at: at() }).then(&[E::AccountDeleted { by: user(1), at: at() }]);
        history.push(E::AccountDeleted { by: user(1), at: at() });
        given::<AccountAggregate>(&history)
            .when(C::AddMember { user_id: user(4), role: Role::Member, at: at() })
            .then_error(|e| matches!(e, DomainError::Refused(_)));
    }

    #[test]
    fn billing_keeps_only_the_last_four_digits() {
        assert!(Billing::new("Ada", "4242", "ada@example.com").is_ok());
        assert!(Billing::new("Ada", "4242424242424242", "ada@example.com").is_err());
        assert!(Billing::new("", "4242", "ada@example.com").is_err());
        assert!(Billing::new("Ada", "4242", "nobody").is_err());
        let billing = Billing::new("Ada", "4242", "ada@example.com").expect("valid");
        assert_eq!(billing.card_display(), "•••• •••• •••• 4242");
        given::<AccountAggregate>(&team())
            .when(C::SetBilling { billing: billing.clone(), at: at() })
            .then(&[E::BillingDetailsSet { billing, at: at() }]);
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
