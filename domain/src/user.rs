//! The User aggregate: a person who signs in with GitHub, their sessions and their API tokens.
//!
//! Signing up and signing in are one command: the first sign-in creates the user. A session
//! carries the user's GitHub token sealed (the event log never holds it in the clear); an API
//! token is kept only as a hash, so neither the log nor the database can hand one out again.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::ids::UserId;
use crate::project::SealedValue;
use crate::{Aggregate, DomainError, DomainEvent};

/// How many API tokens one user may hold at once.
pub const MAX_API_TOKENS: usize = 50;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Session {
    pub expires_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiToken {
    pub name: String,
    /// Hex SHA-256 of the token.
    pub hash: String,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: Option<UserId>,
    pub github_id: Option<u64>,
    pub login: Option<String>,
    pub name: Option<String>,
    /// Open sessions (ended ones are forgotten; expired ones are dropped at the next sign-in).
    pub sessions: BTreeMap<Uuid, Session>,
    /// Live API tokens (revoked ones are forgotten).
    pub api_tokens: BTreeMap<Uuid, ApiToken>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum UserCommand {
    /// A sign-in through GitHub: creates the user the first time, follows a renamed login, and
    /// opens a session.
    SignIn {
        user_id: UserId,
        github_id: u64,
        login: String,
        name: Option<String>,
        session_id: Uuid,
        github_token: SealedValue,
        expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    SignOut {
        session_id: Uuid,
        at: DateTime<Utc>,
    },
    CreateApiToken {
        token_id: Uuid,
        name: String,
        hash: String,
        at: DateTime<Utc>,
    },
    RevokeApiToken {
        token_id: Uuid,
        at: DateTime<Utc>,
    },
    /// The session's GitHub token sealed again under another key (key rotation).
    ResealGitHubToken {
        session_id: Uuid,
        github_token: SealedValue,
        at: DateTime<Utc>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum UserEvent {
    UserSignedUp {
        user_id: UserId,
        github_id: u64,
        login: String,
        name: Option<String>,
        at: DateTime<Utc>,
    },
    UserLoginChanged {
        login: String,
        at: DateTime<Utc>,
    },
    SessionStarted {
        session_id: Uuid,
        /// The user's GitHub token, sealed: used to ask GitHub which repositories they can read.
        github_token: SealedValue,
        expires_at: DateTime<Utc>,
        at: DateTime<Utc>,
    },
    SessionEnded {
        session_id: Uuid,
        at: DateTime<Utc>,
    },
    ApiTokenCreated {
        token_id: Uuid,
        name: String,
        hash: String,
        at: DateTime<Utc>,
    },
    ApiTokenRevoked {
        token_id: Uuid,
        at: DateTime<Utc>,
    },
    SessionTokenResealed {
        session_id: Uuid,
        github_token: SealedValue,
        at: DateTime<Utc>,
    },
}

impl DomainEvent for UserEvent {
    const SCHEMA_VERSION: u32 = 1;

    fn event_type(&self) -> &'static str {
        match self {
            Self::UserSignedUp { .. } => "UserSignedUp",
            Self::UserLoginChanged { .. } => "UserLoginChanged",
            Self::SessionStarted { .. } => "SessionStarted",
            Self::SessionEnded { .. } => "SessionEnded",
            Self::ApiTokenCreated { .. } => "ApiTokenCreated",
            Self::ApiTokenRevoked { .. } => "ApiTokenRevoked",
            Self::SessionTokenResealed { .. } => "SessionTokenResealed",
        }
    }
}

/// A GitHub login: 1 to 39 characters, letters, digits and single hyphens, not at either end.
pub fn validate_login(login: &str) -> Result<(), DomainError> {
    let ok = !login.is_empty()
        && login.len() <= 39
        && login.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        && !login.starts_with('-')
        && !login.ends_with('-')
        && !login.contains("--");
    if ok {
        Ok(())
    } else {
        Err(DomainError::invalid("login", format!("{login:?} is not a GitHub login (letters, digits and single hyphens, at most 39)")))
    }
}

pub struct UserAggregate;

impl Aggregate for UserAggregate {
    const NAME: &'static str = "user";
    type State = User;
    type Command = UserCommand;
    type Event = UserEvent;

    fn decide(state: &User, command: UserCommand) -> Result<Vec<UserEvent>, DomainError> {
        use UserCommand as C;
        use UserEvent as E;
        match command {
            C::SignIn { user_id, github_id, login, name, session_id, github_token, expires_at, at } => {
                validate_login(&login)?;
                if expires_at <= at {
                    return Err(DomainError::invalid("expires_at", "a session must end after it starts"));
                }
                let mut events = Vec::new();
                match (state.id, state.github_id) {
                    (None, _) => events.push(E::UserSignedUp { user_id, github_id, login: login.clone(), name, at }),
                    (Some(_), Some(existing)) if existing != github_id => {
                        return Err(DomainError::Refused(format!("user {user_id} belongs to another GitHub account")));
                    }
                    _ => {}
                }
                if state.id.is_some() && state.login.as_deref() != Some(login.as_str()) {
                    events.push(E::UserLoginChanged { login, at });
                }
                if state.sessions.contains_key(&session_id) {
                    return Err(DomainError::AlreadyExists { entity: "session", id: session_id.to_string() });
                }
                events.push(E::SessionStarted { session_id, github_token, expires_at, at });
                Ok(events)
            }
            C::SignOut { session_id, at } => {
                Ok(state.sessions.contains_key(&session_id).then_some(E::SessionEnded { session_id, at }).into_iter().collect())
            }
            C::CreateApiToken { token_id, name, hash, at } => {
                if state.id.is_none() {
                    return Err(DomainError::NotFound { entity: "user", id: "(not signed up)".into() });
                }
                let name = name.trim().to_string();
                if name.is_empty() || name.chars().count() > 100 {
                    return Err(DomainError::invalid("name", "a token's name is 1 to 100 characters"));
                }
                if hash.len() != 64 || !hash.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(DomainError::invalid("hash", "a token is kept as its hex SHA-256"));
                }
                if state.api_tokens.len() >= MAX_API_TOKENS {
                    return Err(DomainError::Refused(format!("at most {MAX_API_TOKENS} API tokens; revoke one first")));
                }
                if state.api_tokens.contains_key(&token_id) {
                    return Err(DomainError::AlreadyExists { entity: "api token", id: token_id.to_string() });
                }
                Ok(vec![E::ApiTokenCreated { token_id, name, hash, at }])
            }
            C::RevokeApiToken { token_id, at } => {
                if !state.api_tokens.contains_key(&token_id) {
                    return Err(DomainError::NotFound { entity: "api token", id: token_id.to_string() });
                }
                Ok(vec![E::ApiTokenRevoked { token_id, at }])
            }
            C::ResealGitHubToken { session_id, github_token, at } => {
                // An ended session's token is of no use: nothing to reseal.
                Ok(state
                    .sessions
                    .contains_key(&session_id)
                    .then_some(E::SessionTokenResealed { session_id, github_token, at })
                    .into_iter()
                    .collect())
            }
        }
    }

    fn apply(mut state: User, event: &UserEvent) -> User {
        use UserEvent as E;
        match event {
            E::UserSignedUp { user_id, github_id, login, name, .. } => {
                state.id = Some(*user_id);
                state.github_id = Some(*github_id);
                state.login = Some(login.clone());
                state.name = name.clone();
            }
            E::UserLoginChanged { login, .. } => state.login = Some(login.clone()),
            E::SessionStarted { session_id, expires_at, at, .. } => {
                state.sessions.retain(|_, s| s.expires_at > *at);
                state.sessions.insert(*session_id, Session { expires_at: *expires_at });
            }
            E::SessionEnded { session_id, .. } => {
                state.sessions.remove(session_id);
            }
            E::ApiTokenCreated { token_id, name, hash, at } => {
                state.api_tokens.insert(*token_id, ApiToken { name: name.clone(), hash: hash.clone(), created_at: *at });
            }
            E::ApiTokenRevoked { token_id, .. } => {
                state.api_tokens.remove(token_id);
            }
            E::SessionTokenResealed { .. } => {}
        }
        state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::given;
    use chrono::TimeZone;
    use UserCommand as C;
    use UserEvent as E;

    fn at(hour: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 12, 2, hour, 0, 0).single().expect("valid date")
    }
    fn sealed() -> SealedValue {
        SealedValue { key_id: "k".into(), nonce: "n".into(), ciphertext: "c".into() }
    }
    fn sign_in(login: &str, session: u128, hour: u32) -> C {
        C::SignIn {
            user_id: UserId(Uuid::from_u128(1)),
            github_id: 7,
            login: login.into(),
            name: None,
            session_id: Uuid::from_u128(session),
            github_token: sealed(),
            expires_at: at(hour + 8),
            at: at(hour),
        }
    }
    fn signed_up() -> Vec<E> {
        vec![
            E::UserSignedUp { user_id: UserId(Uuid::from_u128(1)), github_id: 7, login: "octo".into(), name: None, at: at(1) },
            E::SessionStarted { session_id: Uuid::from_u128(10), github_token: sealed(), expires_at: at(9), at: at(1) },
        ]
    }

    #[test]
    fn the_first_sign_in_signs_up() {
        given::<UserAggregate>(&[]).when(sign_in("octo", 10, 1)).then(&signed_up());
    }

    #[test]
    fn later_sign_ins_open_sessions_and_follow_renames() {
        given::<UserAggregate>(&signed_up()).when(sign_in("octo", 11, 2)).then(&[E::SessionStarted {
            session_id: Uuid::from_u128(11),
            github_token: sealed(),
            expires_at: at(10),
            at: at(2),
        }]);
        given::<UserAggregate>(&signed_up()).when(sign_in("octo-cat", 11, 2)).then(&[
            E::UserLoginChanged { login: "octo-cat".into(), at: at(2) },
            E::SessionStarted { session_id: Uuid::from_u128(11), github_token: sealed(), expires_at: at(10), at: at(2) },
        ]);
        given::<UserAggregate>(&signed_up()).when(sign_in("octo", 10, 2)).then_error(|e| matches!(e, DomainError::AlreadyExists { .. }));
        given::<UserAggregate>(&[]).when(sign_in("-bad", 10, 1)).then_error(|e| matches!(e, DomainError::Invalid { .. }));
    }

    #[test]
    fn expired_sessions_are_forgotten() {
        let mut history = signed_up();
        history.push(E::SessionStarted { session_id: Uuid::from_u128(11), github_token: sealed(), expires_at: at(20), at: at(12) });
        let state = UserAggregate::replay(&history);
        assert_eq!(state.sessions.keys().copied().collect::<Vec<_>>(), vec![Uuid::from_u128(11)]);
    }

    #[test]
    fn signing_out_ends_a_session_once() {
        given::<UserAggregate>(&signed_up())
            .when(C::SignOut { session_id: Uuid::from_u128(10), at: at(2) })
            .then(&[E::SessionEnded { session_id: Uuid::from_u128(10), at: at(2) }]);
        let mut ended = signed_up();
        ended.push(E::SessionEnded { session_id: Uuid::from_u128(10), at: at(2) });
        given::<UserAggregate>(&ended).when(C::SignOut { session_id: Uuid::from_u128(10), at: at(3) }).then(&[]);
    }

    #[test]
    fn api_tokens_are_named_hashed_and_revocable() {
        let hash = "ab".repeat(32);
        let create =
            |name: &str, hash: &str| C::CreateApiToken { token_id: Uuid::from_u128(5), name: name.into(), hash: hash.into(), at: at(2) };
        given::<UserAggregate>(&signed_up()).when(create(" ci ", &hash)).then(&[E::ApiTokenCreated {
            token_id: Uuid::from_u128(5),
            name: "ci".into(),
            hash: hash.clone(),
            at: at(2),
        }]);
        given::<UserAggregate>(&signed_up()).when(create("", &hash)).then_error(|e| matches!(e, DomainError::Invalid { .. }));
        given::<UserAggregate>(&signed_up()).when(create("ci", "plain-token")).then_error(|e| matches!(e, DomainError::Invalid { .. }));
        given::<UserAggregate>(&[]).when(create("ci", &hash)).then_error(|e| matches!(e, DomainError::NotFound { .. }));
        let mut created = signed_up();
        created.push(E::ApiTokenCreated { token_id: Uuid::from_u128(5), name: "ci".into(), hash, at: at(2) });
        given::<UserAggregate>(&created)
            .when(C::RevokeApiToken { token_id: Uuid::from_u128(5), at: at(3) })
            .then(&[E::ApiTokenRevoked { token_id: Uuid::from_u128(5), at: at(3) }]);
        given::<UserAggregate>(&signed_up())
            .when(C::RevokeApiToken { token_id: Uuid::from_u128(5), at: at(3) })
            .then_error(|e| matches!(e, DomainError::NotFound { .. }));
    }
}
