//! Values parsed at the edge into types that cannot be invalid. Past the edge nobody re-checks.

use serde::{Deserialize, Serialize};

use crate::DomainError;

macro_rules! string_value {
    ($(#[$doc:meta])* $name:ident, $field:literal, $check:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn parse(raw: impl Into<String>) -> Result<Self, DomainError> {
                let raw = raw.into();
                let check: fn(&str) -> Result<(), String> = $check;
                check(&raw).map_err(|reason| DomainError::invalid($field, format!("{raw:?}: {reason}")))?;
                Ok(Self(raw))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = DomainError;
            fn try_from(raw: String) -> Result<Self, DomainError> {
                Self::parse(raw)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_value!(
    /// A git branch name, by git's `check-ref-format` rules (the common subset).
    BranchName,
    "branch",
    |s| {
        if s.is_empty() || s.len() > 255 {
            return Err("must be 1 to 255 characters".into());
        }
        let bad_char = s.chars().any(|c| c.is_control() || " ~^:?*[\\".contains(c));
        if bad_char || s.contains("..") || s.contains("@{") || s.contains("//") {
            return Err("contains a character or sequence git does not allow in a branch name".into());
        }
        if s.starts_with('/') || s.ends_with('/') || s.ends_with('.') || s.ends_with(".lock") || s.starts_with('-') {
            return Err("must not start with '/' or '-', nor end with '/', '.' or '.lock'".into());
        }
        Ok(())
    }
);

string_value!(
    /// A full 40-character lowercase hex commit id.
    CommitSha,
    "commit",
    |s| {
        if s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            Ok(())
        } else {
            Err("must be a full 40-character lowercase hex commit id".into())
        }
    }
);

string_value!(
    /// `owner/name` of a GitHub repository (or of a repository of the local git provider).
    RepoFullName,
    "repository",
    |s| {
        let ok_part = |p: &str| {
            !p.is_empty() && p.len() <= 100 && p != "." && p != ".." && p.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        };
        match s.split_once('/') {
            Some((owner, name)) if ok_part(owner) && ok_part(name) => Ok(()),
            _ => Err("must be owner/name with letters, digits, '-', '_' or '.'".into()),
        }
    }
);

string_value!(
    /// The app an environment runs, as a path relative to the repository root (`main.w`,
    /// `api.main.w`, `apps/web`). Never absolute, never escaping the checkout.
    Entrypoint,
    "entrypoint",
    |s| {
        if s.is_empty() || s.len() > 255 {
            return Err("must be 1 to 255 characters".into());
        }
        if s.starts_with('/') || s.split('/').any(|part| part == ".." || part.is_empty()) || s.chars().any(char::is_control) {
            return Err("must be a relative path inside the repository".into());
        }
        Ok(())
    }
);

string_value!(
    /// A project's name: unique per account, used in URLs.
    ProjectName,
    "name",
    |s| {
        if s.is_empty() || s.len() > 100 {
            return Err("must be 1 to 100 characters".into());
        }
        if !s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) || s.starts_with('.') {
            return Err("may hold only letters, digits, '-', '_' and '.', and must not start with '.'".into());
        }
        Ok(())
    }
);

/// What an environment follows: a branch (production, a tier) or a pull request.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    Branch { branch: BranchName },
    PullRequest { number: u64, head_branch: BranchName },
}

impl Target {
    /// A stable key for the target, used to derive environment ids.
    pub fn key(&self) -> String {
        match self {
            Target::Branch { branch } => format!("branch:{branch}"),
            Target::PullRequest { number, .. } => format!("pr:{number}"),
        }
    }

    pub fn branch(&self) -> &BranchName {
        match self {
            Target::Branch { branch } => branch,
            Target::PullRequest { head_branch, .. } => head_branch,
        }
    }

    pub fn pull_request(&self) -> Option<u64> {
        match self {
            Target::Branch { .. } => None,
            Target::PullRequest { number, .. } => Some(*number),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_at_the_edge() {
        let cases: &[(&str, bool, bool)] = &[
            // (input, valid branch, valid entrypoint)
            ("main", true, true),
            ("feature/login", true, true),
            ("main.w", true, true),
            ("", false, false),
            ("a..b", false, true),
            ("/abs", false, false),
            ("with space", false, true),
            ("ends/", false, false),
            ("x.lock", false, true),
            ("../escape", false, false),
        ];
        for (input, branch_ok, entry_ok) in cases {
            assert_eq!(BranchName::parse(*input).is_ok(), *branch_ok, "branch {input:?}");
            assert_eq!(Entrypoint::parse(*input).is_ok(), *entry_ok, "entrypoint {input:?}");
        }
        assert!(CommitSha::parse("a".repeat(40)).is_ok());
        assert!(CommitSha::parse("A".repeat(40)).is_err());
        assert!(CommitSha::parse("abc").is_err());
        assert!(RepoFullName::parse("octo/hello-world").is_ok());
        assert!(RepoFullName::parse("octo").is_err());
        assert!(RepoFullName::parse("octo/../x").is_err());
        let err = BranchName::parse("a b").unwrap_err().to_string();
        assert!(err.starts_with("branch: \"a b\""), "{err}");
    }

    #[test]
    fn values_refuse_bad_json() {
        assert!(serde_json::from_str::<CommitSha>("\"nothex\"").is_err());
        let sha: CommitSha = serde_json::from_str(&format!("\"{}\"", "0".repeat(40))).unwrap();
        assert_eq!(sha.as_str(), "0".repeat(40));
    }
}
