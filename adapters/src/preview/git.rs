//! Fetching one commit of a repository into a work dir: shallow, by commit id, with a timeout.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use super::logs::LogStream;

/// Where a project's repository is fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub url: String,
    /// An installation token for GitHub over HTTPS; never logged, passed in an HTTP header.
    pub token: Option<String>,
}

/// `{base}/{owner}/{name}.git`, where `base` is `GITHUB_GIT_URL` (`https://github.com` unless set;
/// a `file://` base serves repositories from disk).
pub fn github_remote(base: &str, full_name: &str, token: Option<String>) -> Remote {
    Remote { url: format!("{}/{full_name}.git", base.trim_end_matches('/')), token }
}

/// Fetches `commit` alone (depth 1) into `dir`, which must not exist yet, and checks it out.
/// Every git line goes to `log`. An error is an infrastructure fault unless the commit is missing.
pub async fn fetch(remote: &Remote, commit: &str, dir: &Path, log: &LogStream, timeout: Duration) -> Result<(), FetchError> {
    std::fs::create_dir_all(dir).map_err(|e| FetchError::Infra(format!("creating {}: {e}", dir.display())))?;
    log.line(format!("$ git fetch --depth 1 {} {commit}", remote.url));
    let steps: [Vec<String>; 3] = [
        vec!["init".into(), "--quiet".into()],
        ["fetch", "--quiet", "--no-tags", "--depth", "1", &remote.url, commit].map(String::from).to_vec(),
        vec!["checkout".into(), "--quiet".into(), "--detach".into(), "FETCH_HEAD".into()],
    ];
    for args in steps {
        let status = git(remote, &args, dir, log, timeout).await?;
        if !status.success() {
            let what = if args.iter().any(|a| a == "fetch") { "fetch" } else { args[0].as_str() };
            return Err(FetchError::Failed(format!("git {what} of {commit} failed ({status}); see the build log")));
        }
    }
    Ok(())
}

/// Pushes `commit` (which the remote has: it came from there) to `branch` of the remote, from
/// the checkout in `dir`; not forced, so a branch that moved elsewhere refuses.
pub async fn push(remote: &Remote, commit: &str, branch: &str, dir: &Path, log: &LogStream, timeout: Duration) -> Result<(), FetchError> {
    log.line(format!("$ git push {} {commit}:refs/heads/{branch}", remote.url));
    let args = ["push", "--quiet", &remote.url, &format!("{commit}:refs/heads/{branch}")].map(String::from);
    let status = git(remote, &args, dir, log, timeout).await?;
    if status.success() {
        Ok(())
    } else {
        Err(FetchError::Failed(format!("git push of {commit} to {branch} failed ({status}); see the log")))
    }
}

/// Runs one git command in `dir`, its output into `log`. Configuration goes through the
/// environment, not arguments: a token in argv is visible to every process of the host that
/// lists processes.
async fn git(
    remote: &Remote,
    args: &[String],
    dir: &Path,
    log: &LogStream,
    timeout: Duration,
) -> Result<std::process::ExitStatus, FetchError> {
    // Fetching by commit id from a repository on disk needs the serving side to allow it.
    let mut config = vec![("uploadpack.allowAnySHA1InWant".to_string(), "true".to_string())];
    if let Some(token) = &remote.token {
        use base64::Engine;
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("x-access-token:{token}"));
        config.push(("http.extraHeader".into(), format!("Authorization: Basic {basic}")));
    }
    let mut command = Command::new("git");
    command
        .args(args)
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .env("GIT_CONFIG_COUNT", config.len().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (i, (key, value)) in config.iter().enumerate() {
        command.env(format!("GIT_CONFIG_KEY_{i}"), key).env(format!("GIT_CONFIG_VALUE_{i}"), value);
    }
    let mut child = command.spawn().map_err(|e| FetchError::Infra(format!("cannot run git: {e}")))?;
    let (out, err) = (child.stdout.take(), child.stderr.take());
    let pipes = async {
        if let Some(out) = out {
            log.pipe(out).await;
        }
    };
    let pipes_err = async {
        if let Some(err) = err {
            log.pipe(err).await;
        }
    };
    let run = async {
        let (_, _, status) = tokio::join!(pipes, pipes_err, child.wait());
        status
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Err(FetchError::Infra(format!("git {} timed out after {}s", args[0], timeout.as_secs()))),
        Ok(Err(e)) => Err(FetchError::Infra(format!("git {}: {e}", args[0]))),
        Ok(Ok(status)) => Ok(status),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The machine's fault (git missing, disk, timeout): worth retrying.
    #[error("{0}")]
    Infra(String),
    /// git ran and refused (no such repository or commit, no access): retrying will not help soon.
    #[error("{0}")]
    Failed(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The token reaches the server as GitHub expects it (basic auth, user `x-access-token`),
    /// and a refusal is a user fault, not an infrastructure one.
    #[tokio::test]
    async fn a_token_goes_in_an_authorization_header_and_a_refusal_is_not_retried() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.expect("accept");
            let mut head = vec![0u8; 4096];
            let n = socket.read(&mut head).await.expect("read");
            socket.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await.expect("write");
            String::from_utf8_lossy(&head[..n]).to_string()
        });
        let remote = github_remote(&format!("http://{addr}"), "octo/private", Some("s3cret-token".into()));
        let dir = tempfile::tempdir().expect("tmp");
        let result = fetch(&remote, &"a".repeat(40), &dir.path().join("src"), &LogStream::discard(), Duration::from_secs(20)).await;
        assert!(matches!(result, Err(FetchError::Failed(_))), "{result:?}");
        let request = server.await.expect("request");
        assert!(request.starts_with("GET /octo/private.git/info/refs"), "{request}");
        let expected = format!(
            "Authorization: Basic {}",
            base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "x-access-token:s3cret-token")
        );
        assert!(request.lines().any(|l| l.eq_ignore_ascii_case(&expected)), "{request}");
    }
}
