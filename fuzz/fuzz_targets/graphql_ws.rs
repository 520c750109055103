//! See `understudy_fuzz::graphql_ws` (fuzz/src/graphql_ws.rs), which the test suite also runs over the corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| understudy_fuzz::graphql_ws::run(data));
