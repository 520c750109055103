//! Every input kept in `fuzz/corpus/` through its fuzz target's body (`fuzz/src/`), on the stable
//! compiler: what fuzzing once found, a crash fixed since or ground newly reached, stays checked
//! on every run. Fuzzing for new inputs is `scripts/fuzz`.

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::Duration;

// Their `run` entry points, with the fuzzer's two-second deadline, serve the fuzz binaries only.
#[allow(dead_code)]
#[path = "../../fuzz/src/lib.rs"]
mod targets;

/// A request may take this long here, not the fuzzer's two seconds: the suite shares the cores.
const DEADLINE: Duration = Duration::from_secs(30);

fn replay(target: &str, run: impl Fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target);
    let mut inputs: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the {target} corpus at {}: {e}", dir.display()))
        .map(|entry| entry.expect("a corpus entry").path())
        .collect();
    inputs.sort();
    assert!(inputs.len() >= 10, "the {target} corpus is kept in git, yet {} holds {} inputs", dir.display(), inputs.len());
    let failed: Vec<_> = inputs
        .iter()
        .filter(|path| {
            let data = std::fs::read(path).expect("a corpus input");
            std::panic::catch_unwind(AssertUnwindSafe(|| run(&data))).is_err()
        })
        .filter_map(|path| path.file_name())
        .collect();
    let first: Vec<_> = failed.iter().take(20).collect();
    assert!(failed.is_empty(), "{} of {} {target} inputs failed (each one's panic is above), first {first:?}", failed.len(), inputs.len());
}

/// The string targets see only valid UTF-8, as cargo-fuzz gives them.
fn text(run: fn(&str)) -> impl Fn(&[u8]) {
    move |data| {
        if let Ok(text) = std::str::from_utf8(data) {
            run(text);
        }
    }
}

#[test]
fn the_webhook_corpus_parses_without_a_panic() {
    replay("webhook", targets::webhook::run);
}

#[test]
fn the_signature_corpus_verifies_only_the_bodys_own_signature() {
    replay("signature", targets::signature::run);
}

#[test]
fn the_repository_file_corpus_reads_without_a_panic() {
    replay("repository_file", text(targets::repository_file::run));
}

#[test]
fn the_values_corpus_parses_and_round_trips() {
    replay("values", text(targets::values::run));
}

#[test]
fn the_graphql_corpus_is_answered_with_errors_in_time() {
    replay("graphql", |data| targets::graphql::run_within(data, DEADLINE));
}

#[test]
fn the_logs_corpus_is_routed_and_paged_as_served() {
    replay("logs", |data| targets::logs::run_within(data, DEADLINE));
}

#[test]
fn the_graphql_ws_corpus_is_answered_in_the_protocol_in_time() {
    replay("graphql_ws", |data| targets::graphql_ws::run_within(data, DEADLINE));
}
