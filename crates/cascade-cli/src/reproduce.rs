//! `cascade reproduce`: the paper's Table 1 grid (experiments::grid).

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::experiments::grid::RunKind;

#[derive(Args, Debug)]
pub struct ReproduceArgs {
    /// Folder holding the imdb, hatespeech and isear dataset folders.
    #[arg(long, default_value = "../shared/data")]
    pub data_root: PathBuf,
    /// Where table1.json, table1.md and figures/ go.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
    /// A small subset for CI: the first 200 items of each stream, one budget
    /// scaled to that length, one mu; checks the pipeline end to end.
    #[arg(long)]
    pub quick: bool,
    /// Only these datasets (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub datasets: Vec<String>,
    /// Only these kinds of run (comma-separated: llm-only, cascade, larger,
    /// distilled-lr, distilled-transformer, online-ensemble, mu-sweep, shift,
    /// paper-rules).
    #[arg(long, value_delimiter = ',', value_enum)]
    pub kinds: Vec<RunKind>,
    /// The recorded answer field that plays the LLM (any annotation column).
    #[arg(long, default_value = "gpt35")]
    pub expert_field: String,
    /// Folder of the models named in configs (`scripts/setup.sh` fills it).
    #[arg(long, env = "CASCADE_MODELS", default_value = "models")]
    pub models: PathBuf,
    /// Folder of the grid's cascade configs: the grid runs `selected/`,
    /// which `--select` writes from the base configs beside it.
    #[arg(long, default_value = "configs")]
    pub configs: PathBuf,
    /// Choose the settings on each dataset's train half instead of running
    /// the grid: writes `<configs>/selected/*.toml`, selection.json and
    /// selection.md (in --out). No test item is read.
    #[arg(long)]
    pub select: bool,
    /// Seeds per cascade cell of the grid (the config's, then the next ones);
    /// the table shows mean ± sd.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub seeds: u64,
    /// Seeds per candidate and budget in `--select` (ISEAR moves by 2 points
    /// from seed to seed).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub select_seeds: u64,
    /// With --select: keep the candidates selection.json already scored with
    /// the same base config, budgets and seeds, and score only new ones. The
    /// best of them is scored again first; any difference (the code changed
    /// its decisions) discards them all.
    #[arg(long, requires = "select")]
    pub reuse_scores: bool,
}

pub fn run(args: &ReproduceArgs) -> Result<()> {
    if args.select {
        crate::experiments::select::run(args)
    } else {
        crate::experiments::grid::run(args)
    }
}
