//! Any string through every value parser at the edge: Ok or an error, never a panic, and what
//! parses round-trips.
use understudy_domain::values::{BranchName, CommitSha, Entrypoint, ProjectName, RepoFullName};

/// One input.
pub fn run(text: &str) {
    if let Ok(value) = BranchName::parse(text) {
        assert_eq!(value.as_str(), text);
    }
    if let Ok(value) = Entrypoint::parse(text) {
        assert_eq!(value.as_str(), text);
    }
    let _ = CommitSha::parse(text);
    let _ = ProjectName::parse(text);
    let _ = RepoFullName::parse(text);
    let _ = understudy_domain::project::validate_secret_name(text);
}
