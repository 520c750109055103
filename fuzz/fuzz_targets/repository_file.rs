//! See `understudy_fuzz::repository_file` (fuzz/src/repository_file.rs), which the test suite also runs over the corpus.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| understudy_fuzz::repository_file::run(text));
