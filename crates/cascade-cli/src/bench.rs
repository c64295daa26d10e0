//! `cascade bench`: replay a recorded stream through a cascade (or a baseline).

use std::path::PathBuf;

use anyhow::{Context, Result};
use cascade_expert::LocalConfig;
use cascade_runtime::OnExpertFailure;
use clap::Args;

use crate::args::{default_local_model, ExpertKind, FailurePolicy};
use crate::experiments::replay::{replay, Baseline, ReplaySpec};

#[derive(Args, Debug)]
pub struct BenchArgs {
    /// Dataset folder (stream.jsonl.zst, labels.txt, split_test_ids.txt).
    #[arg(long)]
    data: PathBuf,
    /// `test` (split_test_ids.txt, in order), `all` (file order), or a file of ids.
    #[arg(long, default_value = "test")]
    stream: String,
    /// Replay only the first N items of the stream.
    #[arg(long)]
    limit: Option<usize>,
    /// The recorded answer field that plays the LLM.
    #[arg(long, default_value = "gpt35")]
    expert_field: String,
    /// `K:FIELD`: from the K-th item of the stream (0-based) on, the recorded
    /// field FIELD plays the LLM (a teacher that changes mid-stream, e.g.
    /// `6000:label` for gold).
    #[arg(long, value_parser = parse_switch)]
    expert_switch: Option<(usize, String)>,
    /// Share of student answers also sent to the LLM (counted as LLM calls,
    /// never learned); the drift detector watches them. Default 0 (the
    /// paper's replays), or 0.2 under a target, whose bound rests on them.
    #[arg(long)]
    audit_rate: Option<f64>,
    /// Do not re-open the cascade when the audits show a change.
    #[arg(long)]
    no_drift_recovery: bool,
    /// Learn the expert's label only, even when it gives probabilities.
    #[arg(long, conflicts_with = "soft_label_weight")]
    hard_labels: bool,
    /// Overrides the config's soft_label_weight: the expert's distribution's
    /// share in what is learned, in [0, 1].
    #[arg(long)]
    soft_label_weight: Option<f64>,
    /// Local expert: serve answers found in --expert-cache instead of
    /// computing them (repeated experiments; the model's time is then not
    /// measured).
    #[arg(long, requires = "expert_cache")]
    reuse_expert_cache: bool,
    /// Who plays the LLM: the recorded answers (`--expert-field`), or a local
    /// GGUF model run live on every deferred item.
    #[arg(long, value_enum, default_value = "recorded")]
    expert: ExpertKind,
    /// Local expert: the GGUF file. Default: the Gemma 3 270M that
    /// scripts/setup.sh fetches into the models folder.
    #[arg(long)]
    local_model: Option<PathBuf>,
    /// Local expert: texts are cut to this many tokens.
    #[arg(long, default_value_t = 384)]
    max_text_tokens: usize,
    /// Local expert: response cache. An LLM-only run fills it; a cascade run
    /// reads it after the stream (off the clock) to report agreement with the
    /// expert alone on every item. Deferred items are always computed live.
    #[arg(long)]
    expert_cache: Option<PathBuf>,
    /// Cascade config (TOML). Not needed for `--baseline llm-only`.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Task preset (imdb, hatespeech, isear, fever) or task file (tasks/*.toml).
    /// Default: the dataset folder's name if it is a preset, else label names
    /// from labels.txt.
    #[arg(long)]
    task: Option<String>,
    /// Overrides the config's mu (larger: fewer LLM calls).
    #[arg(long)]
    mu: Option<f64>,
    /// End the run with this many LLM calls, warm-up included, by pricing
    /// deferral online. Overrides the config's `llm_budget`/`llm_rate`. For
    /// `--baseline distilled`: how many train-half items the LLM labels.
    #[arg(long, conflicts_with = "llm_rate")]
    llm_budget: Option<u64>,
    /// Spend this share of the items on the LLM (for streams of unknown length).
    #[arg(long)]
    llm_rate: Option<f64>,
    /// Answer as the LLM would on at least this share of items (audits and
    /// the deferral price set from an anytime-valid bound); overrides the
    /// config's budget.
    #[arg(long, conflicts_with_all = ["llm_budget", "llm_rate"])]
    target_agreement: Option<f64>,
    /// The agreement target's confidence, 1 − δ (default 0.95).
    #[arg(long, requires = "target_agreement")]
    confidence: Option<f64>,
    /// Overrides the config's seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Run a baseline instead of the gated cascade.
    #[arg(long, value_enum)]
    baseline: Option<Baseline>,
    /// Online ensemble: each level's fixed probability of answering (one value
    /// for all levels, or one per level, comma-separated). Ignored under a budget,
    /// which sets them.
    #[arg(long, value_delimiter = ',', default_value = "0.5")]
    route_prob: Vec<f64>,
    /// Distilled baseline: the config level to distil (its name). Default: the last.
    #[arg(long)]
    level: Option<String>,
    /// Distilled baseline: passes over the LLM-labelled train items.
    #[arg(long, default_value_t = 3)]
    distill_epochs: usize,
    /// When the LLM gives no label: an LLM answer without a label (`error`,
    /// the paper's accounting), or the deepest student answers (`student`).
    #[arg(long, value_enum, default_value = "error")]
    on_expert_failure: FailurePolicy,
    /// Write the summary as JSON here.
    #[arg(long)]
    summary: Option<PathBuf>,
    /// Write one CSV row per item here: who answered, prediction, LLM label, gold, the answering student's probability of its answer, gate outputs.
    #[arg(long)]
    log: Option<PathBuf>,
    /// Folder of the models named in configs (`scripts/setup.sh` fills it).
    #[arg(long, env = "CASCADE_MODELS", default_value = "models")]
    models: PathBuf,
}

impl From<&BenchArgs> for ReplaySpec {
    fn from(a: &BenchArgs) -> Self {
        Self {
            data: a.data.clone(),
            stream: a.stream.clone(),
            limit: a.limit,
            expert_field: a.expert_field.clone(),
            expert_switch: a.expert_switch.clone(),
            audit_rate: a.audit_rate,
            no_drift_recovery: a.no_drift_recovery,
            hard_labels: a.hard_labels,
            soft_label_weight: a.soft_label_weight,
            local_expert: (a.expert == ExpertKind::Local).then(|| LocalConfig {
                model: a
                    .local_model
                    .clone()
                    .unwrap_or_else(|| default_local_model(&a.models)),
                max_text_tokens: a.max_text_tokens,
                cache: a.expert_cache.clone(),
                reuse_cached: a.reuse_expert_cache,
            }),
            config: a.config.clone(),
            task: a.task.clone(),
            mu: a.mu,
            llm_budget: a.llm_budget,
            llm_rate: a.llm_rate,
            target_agreement: a.target_agreement,
            confidence: a.confidence,
            seed: a.seed,
            baseline: a.baseline,
            route_prob: a.route_prob.clone(),
            level: a.level.clone(),
            distill_epochs: a.distill_epochs,
            log: a.log.clone(),
            models: a.models.clone(),
            on_failure: OnExpertFailure::from(a.on_expert_failure),
            quiet: false,
        }
    }
}

/// `K:FIELD` of `--expert-switch`.
fn parse_switch(value: &str) -> std::result::Result<(usize, String), String> {
    let (position, field) = value
        .split_once(':')
        .ok_or_else(|| format!("expected K:FIELD (e.g. 6000:label), got `{value}`"))?;
    let position = position
        .parse()
        .map_err(|_| format!("K must be an item position, got `{position}`"))?;
    if field.is_empty() {
        return Err("FIELD is empty".into());
    }
    Ok((position, field.to_string()))
}

pub fn run(args: &BenchArgs) -> Result<()> {
    if args.expert == ExpertKind::Openai {
        anyhow::bail!("bench replays with --expert recorded or local; label a stream with a live API through `cascade label` or `cascade run`");
    }
    let report = replay(&ReplaySpec::from(args), true)?;
    if let (Some(target), Some(bound)) = (report.target_agreement, report.agreement_bound) {
        let realized = report.agreement_checks.last().map_or(f64::NAN, |c| c.1);
        println!(
            "agreement target {target}: agreement with the LLM {realized:.4}, bound {bound:.4} (holding at every point); {} audits, {} LLM calls in all",
            report.audits,
            report.total_llm_calls()
        );
    }
    if let Some(path) = &args.summary {
        let json = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
