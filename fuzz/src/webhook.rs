//! Any body under any event name: parsing answers Ok or a PayloadError, never panics.

const EVENTS: &[&str] = &["pull_request", "push", "installation", "installation_repositories", "delete", "ping", "unknown"];

/// One input.
pub fn run(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else { return };
    let event = EVENTS[selector as usize % EVENTS.len()];
    let _ = understudy_adapters::github::webhook::parse(event, body);
}
