//! `understudy bench`: measured side by side with a baseline from the same run.

use clap::Subcommand;

use crate::runtime::Runtime;

#[derive(Subcommand, Clone, Debug)]
pub enum Bench {
    /// Events/s through the full command path vs raw INSERTs of the same payloads.
    Append,
}

pub async fn run(_runtime: &Runtime, _what: Bench) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
