//! The fuzz targets' bodies. cargo-fuzz runs them (`fuzz_targets/`, `scripts/fuzz`), and the test
//! suite runs them over every input kept in `fuzz/corpus/` (`tests/it/fuzz_corpora.rs`), so an
//! input that once found a bug stays checked on every run, without a nightly compiler.

pub mod graphql;
pub mod logs;
pub mod repository_file;
pub mod signature;
pub mod values;
pub mod webhook;
