//! See `understudy_fuzz::logs` (fuzz/src/logs.rs), which the test suite also runs over the corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| understudy_fuzz::logs::run(data));
