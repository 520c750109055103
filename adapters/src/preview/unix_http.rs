//! HTTP/1.1 to a preview over its bridge's unix socket: the health check here, the proxy in `api`.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// Opens an HTTP/1.1 connection to the app behind `socket`. The connection task supports
/// upgrades (WebSocket), so the proxy can use it for those too.
pub async fn connect<B>(socket: &Path) -> std::io::Result<hyper::client::conn::http1::SendRequest<B>>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let stream = connect_socket(socket).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = connection.with_upgrades().await;
    });
    Ok(sender)
}

/// Connects to a unix socket at any path length. A socket address holds at most 107 bytes of
/// path, and work dirs can be deeper than that: a long path is reached through the directory's
/// file descriptor (`/proc/self/fd/N/name`), which is short whatever the directory's depth.
pub async fn connect_socket(socket: &Path) -> std::io::Result<UnixStream> {
    use std::os::fd::AsRawFd;
    if socket.as_os_str().len() < 100 {
        return UnixStream::connect(socket).await;
    }
    let (Some(dir), Some(name)) = (socket.parent(), socket.file_name()) else {
        return UnixStream::connect(socket).await;
    };
    let dir = std::fs::File::open(dir)?;
    let short = Path::new("/proc/self/fd").join(dir.as_raw_fd().to_string()).join(name);
    let stream = UnixStream::connect(&short).await;
    drop(dir);
    stream
}

/// One health probe: the status `GET path` answers with, or why there was none.
pub async fn probe(socket: &Path, path: &str, timeout: Duration) -> Result<u16, String> {
    let attempt = async { Ok(send_get(socket, path).await?.status().as_u16()) };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
}

/// `GET path`'s status and body (at most `limit` bytes), or why there was none.
pub async fn get(socket: &Path, path: &str, timeout: Duration, limit: usize) -> Result<(u16, Bytes), String> {
    use http_body_util::BodyExt;
    let attempt = async {
        let response = send_get(socket, path).await?;
        let status = response.status().as_u16();
        let body = http_body_util::Limited::new(response.into_body(), limit).collect().await.map_err(|e| e.to_string())?;
        Ok((status, body.to_bytes()))
    };
    tokio::time::timeout(timeout, attempt).await.map_err(|_| format!("no answer within {}s", timeout.as_secs()))?
}

async fn send_get(socket: &Path, path: &str) -> Result<hyper::Response<hyper::body::Incoming>, String> {
    let mut sender = connect::<Empty<Bytes>>(socket).await.map_err(|e| e.to_string())?;
    let request = hyper::Request::get(path)
        .header(hyper::header::HOST, "localhost")
        .header(hyper::header::USER_AGENT, "understudy-health-check")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    sender.send_request(request).await.map_err(|e| e.to_string())
}
