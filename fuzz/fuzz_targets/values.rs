//! See `understudy_fuzz::values` (fuzz/src/values.rs), which the test suite also runs over the corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| understudy_fuzz::values::run(text));
