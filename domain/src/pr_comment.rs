//! The sticky PR comment: one table row per entrypoint, rendered from the environments of one
//! pull request. Pure: the reactor that writes it to GitHub lives in `projections`.

use chrono::{DateTime, Utc};

use crate::environment::{EnvironmentStatus, TestOutcome};
use crate::ids::ProjectId;

/// Where the comment's links point.
#[derive(Debug, Clone, PartialEq)]
pub struct CommentContext {
    /// Understudy's public URL, without a trailing slash.
    pub public_url: String,
    pub account: String,
    pub project: String,
    pub project_id: ProjectId,
    pub number: u64,
    /// The pull request comes from a fork and the project has secrets it did not get.
    pub without_secrets: bool,
}

/// One environment of the pull request.
#[derive(Debug, Clone, PartialEq)]
pub struct CommentRow {
    pub entrypoint: String,
    pub branch: String,
    pub status: EnvironmentStatus,
    pub tests: Vec<(String, TestOutcome)>,
    pub updated_at: DateTime<Utc>,
}

/// The hidden first line that identifies our comment on a pull request. It is only trusted on a
/// comment written by our own GitHub App, since anyone can paste it into a comment of theirs.
pub fn marker(project_id: ProjectId, number: u64) -> String {
    format!("<!-- understudy:pr-comment project={project_id} pr={number} -->")
}

/// `Jul 31, 2023 8:01am`, in UTC.
pub fn format_updated(at: DateTime<Utc>) -> String {
    at.format("%b %-d, %Y %-I:%M%P").to_string()
}

/// The dashboard links of one environment: its page (the preview) and its build log.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvironmentLinks {
    pub base: String,
    /// `?entrypoint=…` for any entrypoint but `main.w`, so each entrypoint has its own page.
    pub query: String,
}

impl EnvironmentLinks {
    pub fn new(public_url: &str, account: &str, project: &str, branch: &str, entrypoint: &str) -> Self {
        let base = format!("{}/dashboard/{}/{}/{}", public_url.trim_end_matches('/'), segment(account), segment(project), segment(branch));
        let query = if entrypoint == "main.w" { String::new() } else { format!("?entrypoint={}", segment(entrypoint)) };
        Self { base, query }
    }

    pub fn preview(&self) -> String {
        format!("{}{}", self.base, self.query)
    }

    pub fn build_log(&self) -> String {
        format!("{}/logs/build/{}", self.base, self.query)
    }

    pub fn test_log(&self, test: &str) -> String {
        format!("{}/logs/tests/{}{}", self.base, segment(test), self.query)
    }
}

/// Percent-encodes a URL path segment or query value (RFC 3986 unreserved characters pass through).
pub fn segment(raw: &str) -> String {
    raw.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => (b as char).to_string(),
            other => format!("%{other:02X}"),
        })
        .collect()
}

fn status_cell(status: EnvironmentStatus) -> &'static str {
    match status {
        EnvironmentStatus::Requested | EnvironmentStatus::Building | EnvironmentStatus::Starting => "🔄 Building",
        EnvironmentStatus::AwaitingApproval => "🔒 Awaiting approval",
        EnvironmentStatus::Ready => "✅ Ready",
        EnvironmentStatus::Failed => "❌ Failed",
        EnvironmentStatus::Stale => "⏸️ Stale",
        EnvironmentStatus::Terminated => "🛑 Terminated",
    }
}

/// The whole comment body: the marker, a heading and the table (rows sorted by entrypoint).
pub fn render(ctx: &CommentContext, rows: &[CommentRow]) -> String {
    let mut rows = rows.to_vec();
    rows.sort_by(|a, b| a.entrypoint.cmp(&b.entrypoint));
    let mut out = format!("{}\n### Understudy preview environments\n\n", marker(ctx.project_id, ctx.number));
    if rows.is_empty() {
        out.push_str("No entrypoint found at the head commit: add a `main.w` or `*.main.w` at the repository root, or list entrypoints in `understudy.toml`.\n");
        return out;
    }
    out.push_str("| Entry Point | Status | Preview | Tests | Updated (UTC) |\n");
    out.push_str("| --- | --- | --- | --- | --- |\n");
    for row in &rows {
        let links = EnvironmentLinks::new(&ctx.public_url, &ctx.account, &ctx.project, &row.branch, &row.entrypoint);
        let preview = match row.status {
            EnvironmentStatus::Ready => format!("[Visit Preview]({})", links.preview()),
            _ => "-".to_string(),
        };
        let tests = if row.tests.is_empty() {
            "-".to_string()
        } else {
            row.tests
                .iter()
                .map(|(name, outcome)| {
                    let icon = match outcome {
                        TestOutcome::Passed => "✅",
                        TestOutcome::Failed => "❌",
                    };
                    format!("{icon} [{}]({})", escape_cell(name), links.test_log(name))
                })
                .collect::<Vec<_>>()
                .join(" <br /> ")
        };
        out.push_str(&format!(
            "| {} | {} ([logs]({})) | {preview} | {tests} | {} |\n",
            escape_cell(&row.entrypoint),
            status_cell(row.status),
            links.build_log(),
            format_updated(row.updated_at)
        ));
    }
    if rows.iter().any(|row| row.status == EnvironmentStatus::AwaitingApproval) {
        out.push_str(
            "\n> This pull request comes from a fork: its previews are built only after a maintainer approves the commit \
             (Approve on the environment's page, or the `approveDeployment` mutation).\n",
        );
    }
    if ctx.without_secrets {
        out.push_str("\n> This pull request comes from a fork: its previews are built without the project's secrets.\n");
    }
    out
}

/// Keeps user-controlled text (test names, entrypoints) from breaking the table or injecting markup.
fn escape_cell(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '|' => "\\|".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '[' => "\\[".to_string(),
            ']' => "\\]".to_string(),
            '\n' | '\r' => " ".to_string(),
            other => other.to_string(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use uuid::Uuid;

    #[test]
    fn a_fork_is_told_its_previews_have_no_secrets() {
        let plain = render(&ctx(), &[]);
        assert!(!plain.contains("fork"));
        let rows = [CommentRow {
            entrypoint: "main.w".into(),
            branch: "feature".into(),
            status: EnvironmentStatus::Ready,
            tests: vec![],
            updated_at: at(8, 1),
        }];
        let fork = render(&CommentContext { without_secrets: true, ..ctx() }, &rows);
        assert!(fork.contains("comes from a fork: its previews are built without the project's secrets"), "{fork}");
        assert!(!render(&ctx(), &rows).contains("fork"));
    }

    #[test]
    fn a_preview_awaiting_approval_says_so() {
        let rows = [CommentRow {
            entrypoint: "main.w".into(),
            branch: "feature".into(),
            status: EnvironmentStatus::AwaitingApproval,
            tests: vec![],
            updated_at: at(8, 1),
        }];
        let body = render(&ctx(), &rows);
        assert!(body.contains("🔒 Awaiting approval"), "{body}");
        assert!(body.contains("built only after a maintainer approves the commit"), "{body}");
    }

    fn ctx() -> CommentContext {
        CommentContext {
            public_url: "https://understudy.example".into(),
            account: "octo-team".into(),
            project: "hello".into(),
            project_id: ProjectId(Uuid::from_u128(1)),
            number: 2,
            without_secrets: false,
        }
    }

    fn at(hour: u32, minute: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2023, 7, 31, hour, minute, 0).single().expect("valid date")
    }

    #[test]
    fn updated_is_formatted_like_github_users_expect() {
        assert_eq!(format_updated(at(8, 1)), "Jul 31, 2023 8:01am");
        assert_eq!(format_updated(at(20, 45)), "Jul 31, 2023 8:45pm");
    }

    #[test]
    fn the_comment_has_a_row_per_entrypoint() {
        let rows = vec![
            CommentRow {
                entrypoint: "main.w".into(),
                branch: "feature/login".into(),
                status: EnvironmentStatus::Ready,
                tests: vec![("sanity".into(), TestOutcome::Passed), ("E2E".into(), TestOutcome::Failed)],
                updated_at: at(8, 1),
            },
            CommentRow {
                entrypoint: "failed.main.w".into(),
                branch: "feature/login".into(),
                status: EnvironmentStatus::Failed,
                tests: vec![],
                updated_at: at(8, 2),
            },
            CommentRow {
                entrypoint: "api.main.w".into(),
                branch: "feature/login".into(),
                status: EnvironmentStatus::Building,
                tests: vec![],
                updated_at: at(8, 3),
            },
            CommentRow {
                entrypoint: "old.main.w".into(),
                branch: "feature/login".into(),
                status: EnvironmentStatus::Terminated,
                tests: vec![("a|b <script>".into(), TestOutcome::Passed)],
                updated_at: at(9, 0),
            },
            CommentRow {
                entrypoint: "zzz.main.w".into(),
                branch: "feature/login".into(),
                status: EnvironmentStatus::Stale,
                tests: vec![],
                updated_at: at(9, 5),
            },
        ];
        insta::assert_snapshot!(render(&ctx(), &rows));
    }

    #[test]
    fn a_pull_request_without_entrypoints_says_what_to_do() {
        insta::assert_snapshot!(render(&ctx(), &[]));
    }
}
