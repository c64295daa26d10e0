//! `cascade report`: Table 1 and its figures regenerated from a grid's JSON,
//! and selection.md from selection.json where one lies beside it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;

use crate::experiments::grid::GridResults;
use crate::experiments::report::write_all;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// The grid's JSON.
    #[arg(long, default_value = "results/table1.json")]
    pub json: PathBuf,
    /// Where table1.md and figures/ go. Default: the JSON's folder.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(args: &ReportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.json)
        .with_context(|| format!("reading {}", args.json.display()))?;
    let results: GridResults =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", args.json.display()))?;
    let out = match &args.out {
        Some(out) => out.clone(),
        None => args
            .json
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    write_all(&results, &out)?;
    let selection = args
        .json
        .with_file_name(crate::experiments::select::SELECTION_JSON);
    if selection.is_file() {
        crate::experiments::select::write_markdown(&selection, &out)?;
    }
    Ok(())
}
