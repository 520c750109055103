//! The bridge: PID 1's helper inside a running preview's sandbox. It starts the app, accepts
//! connections on a unix socket in `/run/understudy` (the one path the host shares with the
//! sandbox) and connects each to the app's `$PORT` on the sandbox's own loopback. So the proxy
//! reaches the app while the app has no network route to anything of the host.
//!
//! It exits with the app's exit code when the app exits, and stops the app on SIGTERM.
//!
//! Reversed ([`run_reverse`]), it is PID 1's helper in a smoke test's sandbox: it listens on the
//! sandbox's own loopback and connects each connection to the app's unix socket, so the smoke
//! test reaches exactly one app over plain HTTP and nothing else.

use std::path::Path;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::process::Command;

/// Runs `argv` and bridges `socket` to `127.0.0.1:port` until the app exits; returns its code.
pub async fn run(socket: &Path, port: u16, argv: &[String]) -> anyhow::Result<i32> {
    anyhow::ensure!(!argv.is_empty(), "the bridge needs a command to run");
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", socket.display()))?;
    let mut app = Command::new(&argv[0]).args(&argv[1..]).kill_on_drop(true).spawn()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            status = app.wait() => {
                let status = status?;
                let _ = std::fs::remove_file(socket);
                return Ok(status.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)));
            }
            _ = terminate.recv() => {
                let _ = app.start_kill();
            }
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else { continue };
                tokio::spawn(async move {
                    // Not listening yet (still starting): dropping the connection tells the
                    // health check to try again.
                    if let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", port)).await {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }
    }
}

/// Runs `argv` while bridging `127.0.0.1:port` to the unix `socket`; returns its exit code.
pub async fn run_reverse(socket: &Path, port: u16, argv: &[String]) -> anyhow::Result<i32> {
    anyhow::ensure!(!argv.is_empty(), "the bridge needs a command to run");
    let listener = TcpListener::bind(("127.0.0.1", port)).await.map_err(|e| anyhow::anyhow!("cannot listen on port {port}: {e}"))?;
    let mut command = Command::new(&argv[0]).args(&argv[1..]).kill_on_drop(true).spawn()?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            status = command.wait() => {
                let status = status?;
                return Ok(status.code().unwrap_or(128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)));
            }
            _ = terminate.recv() => {
                let _ = command.start_kill();
            }
            accepted = listener.accept() => {
                let Ok((mut inbound, _)) = accepted else { continue };
                let socket = socket.to_path_buf();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = UnixStream::connect(&socket).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }
    }
}
