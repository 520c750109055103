//! The loops the roles run: a queue-draining role takes one item, again and again while there is
//! work, and when there is none waits for a wake-up or a poll interval ([`drain`]); a
//! reconciler makes one pass every so often ([`every`]). Both stop when cancelled.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Runs `step` until `cancel`. `step` returns whether it found work; an error is logged and
/// treated as "no work" (the item stays queued and is retried after `idle`).
pub async fn drain<F, Fut>(what: &'static str, idle: Duration, wake: Arc<Notify>, cancel: CancellationToken, mut step: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = sqlx::Result<bool>>,
{
    loop {
        let worked = match step().await {
            Ok(worked) => worked,
            Err(error) => {
                tracing::warn!(error = %error, "{what} failed; retrying");
                false
            }
        };
        if cancel.is_cancelled() {
            return;
        }
        if !worked {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = wake.notified() => {}
                _ = tokio::time::sleep(idle) => {}
            }
        }
    }
}

/// Runs `pass` every `period` until `cancel`; a failed pass is logged and tried again at the next.
pub async fn every<F, Fut, T, E>(what: &'static str, period: Duration, cancel: CancellationToken, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    loop {
        if let Err(error) = pass().await {
            tracing::warn!(%error, "{what} failed; retrying");
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
    }
}
