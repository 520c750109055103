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

string_value!(
    /// A tier's name (`dev`, `staging`, `production`): lowercase letters, digits and '-', at most
    /// 32 characters, starting with a letter.
    TierName,
    "tier",
    |s| {
        let ok = !s.is_empty()
            && s.len() <= 32
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if ok {
            Ok(())
        } else {
            Err("must be 1 to 32 lowercase letters, digits or '-', starting with a letter".into())
        }
    }
);

string_value!(
    /// Which branches a tier follows: a branch name in which `*` stands for any run of
    /// characters (`main`, `dev-*`, `release/*`).
    BranchPattern,
    "branches",
    |s| {
        if s.is_empty() || s.len() > 255 {
            return Err("must be 1 to 255 characters".into());
        }
        // With each `*` read as one letter, the pattern must be a branch name itself.
        BranchName::parse(s.replace('*', "x")).map(|_| ()).map_err(|_| "must be a branch name, with `*` for any characters".into())
    }
);

impl BranchPattern {
    /// Whether `branch` is one of the branches the pattern names.
    pub fn matches(&self, branch: &BranchName) -> bool {
        glob(self.as_str().as_bytes(), branch.as_str().as_bytes())
    }

    /// A pattern without `*` names one branch.
    pub fn is_exact(&self) -> bool {
        !self.as_str().contains('*')
    }
}

/// `*` matches any run of bytes (including `/`); everything else matches itself. Linear in
/// practice: the greedy star backtracks only to the last star seen.
fn glob(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((star_p, star_t)) = star {
            p = star_p + 1;
            t = star_t + 1;
            star = Some((star_p, star_t + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// What an environment follows: a branch (production, a tier's branch), a pull request, or a
/// tier fed by promotion (one environment per entrypoint, whatever branch its commit came from).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    Branch { branch: BranchName },
    PullRequest { number: u64, head_branch: BranchName },
    Tier { tier: TierName },
}

impl Target {
    /// A stable key for the target, used to derive environment ids.
    pub fn key(&self) -> String {
        match self {
            Target::Branch { branch } => format!("branch:{branch}"),
            Target::PullRequest { number, .. } => format!("pr:{number}"),
            Target::Tier { tier } => format!("tier:{tier}"),
        }
    }

    /// The branch it follows; for a promoted tier, the tier's name.
    pub fn label(&self) -> &str {
        match self {
            Target::Branch { branch } => branch.as_str(),
            Target::PullRequest { head_branch, .. } => head_branch.as_str(),
            Target::Tier { tier } => tier.as_str(),
        }
    }

    /// `branch`, `pull_request` or `tier`, as read models store it.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Branch { .. } => "branch",
            Target::PullRequest { .. } => "pull_request",
            Target::Tier { .. } => "tier",
        }
    }

    pub fn pull_request(&self) -> Option<u64> {
        match self {
            Target::Branch { .. } | Target::Tier { .. } => None,
            Target::PullRequest { number, .. } => Some(*number),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branch_patterns_match_whole_names_with_stars_for_any_run() {
        let cases: &[(&str, &str, bool)] = &[
            ("main", "main", true),
            ("main", "main2", false),
            ("main", "xmain", false),
            ("dev-*", "dev-alice", true),
            ("dev-*", "dev-", true),
            ("dev-*", "dev", false),
            ("dev-*", "feature/dev-x", false),
            ("release/*", "release/1.2/hotfix", true),
            ("*-rc", "v1-rc", true),
            ("*-rc", "v1-rc-2", false),
            ("a*b*c", "aXXbYYbZc", true),
            ("a*b*c", "aXXbYYbZ", false),
            ("*", "anything/at-all", true),
        ];
        for (pattern, branch, expected) in cases {
            let pattern = BranchPattern::parse(*pattern).expect("valid pattern");
            assert_eq!(pattern.matches(&BranchName::parse(*branch).expect("branch")), *expected, "{pattern} ~ {branch}");
        }
        for bad in ["", "a b", "dev-[x]", "x..y", "/x", "x?"] {
            assert!(BranchPattern::parse(bad).is_err(), "{bad:?} is no pattern");
        }
        assert!(TierName::parse("staging").is_ok());
        for bad in ["", "Staging", "1st", "a_b", &"x".repeat(33)] {
            assert!(TierName::parse(bad).is_err(), "{bad:?} is no tier name");
        }
    }

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
