//! `cleave bench`: an open-loop load generator for any OpenAI-compatible endpoint.

use clap::Args;

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Base URL of the OpenAI-compatible server.
    #[arg(long, default_value = "http://127.0.0.1:8000")]
    pub url: String,
}

pub fn run(_args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("cleave bench is not built yet")
}
