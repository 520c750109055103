//! Any `understudy.toml`: reading its entrypoints and planning a build answer, never panic
//! (the error's line number is computed from the parser's byte span).

/// One input.
pub fn run(text: &str) {
    let _ = understudy_adapters::preview::stack::configured_entrypoints(text);
    let _ = understudy_adapters::preview::stack::check_config(text);
}
