//! The paper's Table 1 grid (`cascade reproduce`) on its own streams.
//!
//! For each dataset it runs the LLM alone, the small cascade and the larger
//! (3-level) cascade at the paper's three budgets, the paper's baselines at the
//! same budgets (distilled LR, distilled transformer, online ensemble), a mu
//! sweep, and for IMDB the length-ordered (shifted) stream. Every number goes
//! into one JSON file (`results/table1.json`); the table and the figures are generated from it only
//! (`cascade report` regenerates them without re-running).

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use super::replay::{replay, Baseline, ReplaySpec, Report};
use super::report;
use super::select::SELECTED_DIR;
pub use crate::reproduce::ReproduceArgs;

/// One dataset's row of the paper's Table 1 and the configs that run it.
pub struct DatasetSpec {
    pub name: &'static str,
    pub budgets: [u64; 3],
    /// The paper's accuracy (%) of online cascade learning at each budget.
    pub paper_accuracy: [f64; 3],
    /// The paper's accuracy (%) of its LLM (GPT-3.5) alone, on the full
    /// dataset (its Table 1); the recorded answers score our test stream.
    pub paper_llm_accuracy: f64,
    /// The paper's recall (%) at each budget, where it reports one.
    pub paper_recall: Option<[f64; 3]>,
    /// The configs `--select` starts from (small cascade, 3-level), and the
    /// authors' gate calibration for their BERT-base level, its start.
    pub base_config: &'static str,
    pub base_larger_config: &'static str,
    pub authors_calibration: f32,
    /// Budgets (indices) the larger cascade runs at.
    pub larger_budgets: &'static [usize],
    /// The cascade config's level the distilled transformer baseline trains.
    pub distilled_level: &'static str,
    pub mu_sweep: &'static [f64],
    /// An id list for the distribution-shift run, at the middle budget.
    pub shift_stream: Option<&'static str>,
    /// The goal beyond the paper: (budget, accuracy %) for the cascade.
    pub goal: Option<(u64, f64)>,
    /// A page of results/ on why cells stay short of the paper, if one was written.
    pub why_short: Option<&'static str>,
}

pub const GRID: [DatasetSpec; 3] = [
    DatasetSpec {
        name: "imdb",
        budgets: [1300, 3800, 5200],
        paper_accuracy: [87.95, 92.48, 93.01],
        paper_llm_accuracy: 94.15,
        paper_recall: None,
        base_config: "imdb-mpnet.toml",
        base_larger_config: "imdb-3level.toml",
        authors_calibration: 0.30,
        larger_budgets: &[1],
        distilled_level: "embed",
        mu_sweep: &[1e-4, 2e-4, 3e-4, 4e-4, 5e-4, 6e-4],
        shift_stream: Some("shift_length_order_ids.txt"),
        goal: Some((3800, 93.5)),
        why_short: None,
    },
    DatasetSpec {
        name: "hatespeech",
        budgets: [600, 2700, 4900],
        paper_accuracy: [82.66, 85.35, 83.26],
        paper_llm_accuracy: 83.34,
        paper_recall: Some([82.36, 77.20, 81.03]),
        base_config: "hatespeech-mpnet.toml",
        base_larger_config: "hatespeech-3level.toml",
        authors_calibration: 0.40,
        larger_budgets: &[1],
        distilled_level: "embed",
        mu_sweep: &[1e-4, 2e-4, 4e-4, 6e-4],
        shift_stream: None,
        goal: None,
        why_short: Some("hatespeech-ceiling.md"),
    },
    DatasetSpec {
        name: "isear",
        budgets: [1200, 1500, 2700],
        paper_accuracy: [60.78, 65.34, 69.75],
        paper_llm_accuracy: 70.34,
        paper_recall: None,
        base_config: "isear-mpnet.toml",
        base_larger_config: "isear-3level.toml",
        authors_calibration: 0.45,
        larger_budgets: &[0, 1, 2],
        distilled_level: "embed",
        mu_sweep: &[8e-4, 1e-3, 1.2e-3, 1.4e-3],
        shift_stream: None,
        goal: None,
        why_short: None,
    },
];

/// The configs a row runs (paths inside the configs folder).
pub struct RowConfigs {
    /// The small cascade (LR → transformer → LLM); the online ensemble and
    /// the distilled baselines use its students.
    pub cascade: String,
    /// The larger, 3-level cascade.
    pub larger: String,
    /// The same students with the paper's mechanisms only.
    pub paper_rules: Option<String>,
}

impl DatasetSpec {
    /// What `--select` wrote for this dataset; for one not selected yet, the
    /// base configs (whose settings came from test-stream scores: the table
    /// says so) and no paper's-rules run.
    pub fn configs(&self, configs: &Path) -> RowConfigs {
        let selected = |suffix: &str| format!("{SELECTED_DIR}/{}{suffix}.toml", self.name);
        if configs.join(selected("")).is_file() {
            RowConfigs {
                cascade: selected(""),
                larger: selected("-3level"),
                paper_rules: Some(selected("-paper-rules")),
            }
        } else {
            eprintln!(
                "{}: no {}; running the base configs (run `cascade reproduce --select --datasets {}`)",
                self.name,
                configs.join(selected("")).display(),
                self.name
            );
            RowConfigs {
                cascade: self.base_config.into(),
                larger: self.base_larger_config.into(),
                paper_rules: None,
            }
        }
    }
}

/// The annotation column holding the paper's LLM (GPT-3.5): only runs that
/// replay it sit beside the paper's numbers.
pub const PAPER_EXPERT_FIELD: &str = "gpt35";

/// The grid's JSON inside `--out`.
pub const RESULTS_JSON: &str = "table1.json";

/// Items per stream in `--quick` mode.
pub const QUICK_ITEMS: usize = 200;

/// What a grid run is, as the table and figures group them.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RunKind {
    LlmOnly,
    Cascade,
    Larger,
    DistilledLr,
    DistilledTransformer,
    OnlineEnsemble,
    MuSweep,
    Shift,
    /// The same students with the paper's mechanisms only, mu found for the budget.
    PaperRules,
}

impl RunKind {
    pub fn label(self) -> &'static str {
        match self {
            Self::LlmOnly => "LLM only",
            Self::Cascade => "cascade (LR -> transformer -> LLM)",
            Self::Larger => "3-level cascade",
            Self::DistilledLr => "distilled LR",
            Self::DistilledTransformer => "distilled transformer",
            Self::OnlineEnsemble => "online ensemble",
            Self::MuSweep => "cascade, fixed mu",
            Self::Shift => "cascade, length-ordered stream",
            Self::PaperRules => "cascade, paper's rules",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridRun {
    pub dataset: String,
    pub kind: RunKind,
    /// The LLM-call budget the run targeted, if any.
    pub budget: Option<u64>,
    /// The paper's accuracy at this budget, for cascade runs.
    pub paper_accuracy: Option<f64>,
    pub paper_recall: Option<f64>,
    pub report: Report,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GridResults {
    pub quick: bool,
    pub machine: String,
    pub expert_field: String,
    pub total_wall_seconds: f64,
    pub runs: Vec<GridRun>,
}

/// The grid's row for a dataset.
pub fn grid_row(dataset: &str) -> Option<&'static DatasetSpec> {
    GRID.iter().find(|g| g.name == dataset)
}

impl GridResults {
    /// Whether the paper's numbers apply: full streams, the paper's LLM.
    pub fn beside_paper(&self) -> bool {
        !self.quick && self.expert_field == PAPER_EXPERT_FIELD
    }

    /// The dataset's row of the paper's grid, where its numbers apply here.
    pub fn paper_row(&self, dataset: &str) -> Option<&'static DatasetSpec> {
        grid_row(dataset).filter(|_| self.beside_paper())
    }
}

/// The grid's datasets that `--datasets` names (all by default).
pub fn selected_specs(args: &ReproduceArgs) -> Result<Vec<&'static DatasetSpec>> {
    let specs: Vec<&DatasetSpec> = GRID
        .iter()
        .filter(|d| args.datasets.is_empty() || args.datasets.iter().any(|n| n == d.name))
        .collect();
    if specs.is_empty() {
        bail!(
            "no dataset matches {:?}; the grid has imdb, hatespeech, isear",
            args.datasets
        );
    }
    Ok(specs)
}

pub fn run(args: &ReproduceArgs) -> Result<()> {
    let started = Instant::now();
    let specs = selected_specs(args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let json_path = args.out.join(RESULTS_JSON);
    let mut results = GridResults {
        quick: args.quick,
        machine: machine_description(),
        expert_field: args.expert_field.clone(),
        total_wall_seconds: 0.0,
        runs: Vec::new(),
    };
    // Re-running some datasets or kinds keeps the other runs of an earlier grid.
    let selected = |dataset: &str, kind: RunKind| {
        specs.iter().any(|s| s.name == dataset)
            && (args.kinds.is_empty() || args.kinds.contains(&kind))
    };
    let mut earlier_seconds = 0.0;
    if !args.datasets.is_empty() || !args.kinds.is_empty() {
        if let Ok(text) = std::fs::read_to_string(&json_path) {
            let earlier: GridResults = serde_json::from_str(&text)
                .with_context(|| format!("parsing {}", json_path.display()))?;
            if earlier.quick == args.quick && earlier.expert_field == args.expert_field {
                results.runs = earlier
                    .runs
                    .into_iter()
                    .filter(|r| !selected(&r.dataset, r.kind))
                    .collect();
                earlier_seconds = results.runs.iter().map(|r| r.report.wall_seconds).sum();
                // Kept runs name the machine they ran on.
                if !results.runs.is_empty() && !earlier.machine.contains(&results.machine) {
                    results.machine = format!(
                        "{} (this run); runs kept from an earlier grid: {}",
                        results.machine, earlier.machine
                    );
                }
            }
        }
    }
    let beside_paper = results.beside_paper();
    let mut plan = Vec::new();
    for spec in &specs {
        let runs = plan_runs(spec, args)?.into_iter();
        plan.extend(
            runs.filter(|p| selected(spec.name, p.kind))
                .map(|p| (*spec, p)),
        );
    }
    for (index, (spec, planned)) in plan.iter().enumerate() {
        eprintln!(
            "[{}/{}] {} {}{}",
            index + 1,
            plan.len(),
            spec.name,
            planned.kind.label(),
            planned
                .replay
                .llm_budget
                .map(|b| format!(" @ {b} LLM calls"))
                .or(planned.replay.mu.map(|mu| format!(" mu {mu}")))
                .unwrap_or_default()
        );
        let report = match (planned.kind, planned.replay.llm_budget) {
            (RunKind::PaperRules, Some(budget)) => mu_for_budget(&planned.replay, budget),
            _ => replay(&planned.replay, false),
        }
        .with_context(|| format!("{} {}", spec.name, planned.kind.label()))?;
        eprintln!(
            "    {} LLM calls, accuracy {}, {:.1} s",
            report.total_llm_calls(),
            report
                .summary
                .accuracy
                .map_or("-".into(), |a| format!("{:.4}", a)),
            report.wall_seconds
        );
        let slot = planned.budget_index.filter(|_| {
            beside_paper
                && matches!(
                    planned.kind,
                    RunKind::Cascade | RunKind::Larger | RunKind::PaperRules
                )
        });
        results.runs.push(GridRun {
            dataset: spec.name.into(),
            kind: planned.kind,
            budget: planned.replay.llm_budget,
            paper_accuracy: slot.map(|i| spec.paper_accuracy[i]),
            paper_recall: slot.and_then(|i| spec.paper_recall.map(|r| r[i])),
            report,
        });
        // Written after every run, so an interrupted grid keeps what it computed.
        results.total_wall_seconds = earlier_seconds + started.elapsed().as_secs_f64();
        write_json(&json_path, &results)?;
    }
    report::write_all(&results, &args.out)?;
    eprintln!(
        "grid done in {:.1} min: {}",
        results.total_wall_seconds / 60.0,
        args.out.display()
    );
    Ok(())
}

struct Planned {
    kind: RunKind,
    budget_index: Option<usize>,
    replay: ReplaySpec,
}

fn plan_runs(spec: &DatasetSpec, args: &ReproduceArgs) -> Result<Vec<Planned>> {
    let data = args.data_root.join(spec.name);
    let limit = args.quick.then_some(QUICK_ITEMS);
    let length = stream_length(&data.join("split_test_ids.txt"))?;
    let scale = |budget: u64| match limit {
        // Scale the paper's budget to the quick stream's length.
        Some(items) => (budget as f64 * items as f64 / length as f64).round() as u64,
        None => budget,
    };
    let base = |config: Option<&str>| {
        let mut r = ReplaySpec::new(
            data.clone(),
            config.map(|c| args.configs.join(c)),
            args.models.clone(),
        );
        r.limit = limit;
        r.expert_field = args.expert_field.clone();
        r.quiet = true;
        r
    };
    let budget_indices: Vec<usize> = if args.quick { vec![1] } else { vec![0, 1, 2] };
    let configs = spec.configs(&args.configs);
    let mut runs = vec![Planned {
        kind: RunKind::LlmOnly,
        budget_index: None,
        replay: ReplaySpec {
            baseline: Some(Baseline::LlmOnly),
            ..base(None)
        },
    }];
    for &i in &budget_indices {
        let budget = Some(scale(spec.budgets[i]));
        let at_budget = |kind, config: &str, baseline, level: Option<&str>| Planned {
            kind,
            budget_index: Some(i),
            replay: ReplaySpec {
                llm_budget: budget,
                baseline,
                level: level.map(String::from),
                ..base(Some(config))
            },
        };
        // The cascades at the config's seed and the next ones: mean ± sd.
        for seed in seeds(&configs.cascade, args)? {
            let mut kinds = vec![(RunKind::Cascade, &configs.cascade)];
            kinds.extend(
                configs
                    .paper_rules
                    .as_ref()
                    .map(|c| (RunKind::PaperRules, c)),
            );
            for (kind, config) in kinds {
                let mut run = at_budget(kind, config, None, None);
                run.replay.seed = seed;
                runs.push(run);
            }
        }
        if args.quick || spec.larger_budgets.contains(&i) {
            runs.push(at_budget(RunKind::Larger, &configs.larger, None, None));
        }
        runs.push(at_budget(
            RunKind::DistilledLr,
            &configs.cascade,
            Some(Baseline::Distilled),
            Some("lr"),
        ));
        runs.push(at_budget(
            RunKind::DistilledTransformer,
            &configs.cascade,
            Some(Baseline::Distilled),
            Some(spec.distilled_level),
        ));
        runs.push(at_budget(
            RunKind::OnlineEnsemble,
            &configs.cascade,
            Some(Baseline::OnlineEnsemble),
            None,
        ));
    }
    let sweep = if args.quick {
        &spec.mu_sweep[..1]
    } else {
        spec.mu_sweep
    };
    for &mu in sweep {
        runs.push(Planned {
            kind: RunKind::MuSweep,
            budget_index: None,
            replay: ReplaySpec {
                mu: Some(mu),
                ..base(Some(&configs.cascade))
            },
        });
    }
    if let Some(ids) = spec.shift_stream {
        runs.push(Planned {
            kind: RunKind::Shift,
            budget_index: Some(1),
            replay: ReplaySpec {
                stream: data.join(ids).display().to_string(),
                llm_budget: Some(scale(spec.budgets[1])),
                ..base(Some(&configs.cascade))
            },
        });
    }
    Ok(runs)
}

/// The seeds a cascade cell runs with: `None` (the config's own), then the
/// config's seed + 1, + 2, ...
fn seeds(config: &str, args: &ReproduceArgs) -> Result<Vec<Option<u64>>> {
    let path = args.configs.join(config);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {}; `cascade reproduce --select` writes it",
            path.display()
        )
    })?;
    let base = cascade::CascadeConfig::from_toml(&text)
        .with_context(|| format!("in {}", path.display()))?;
    Ok((0..args.seeds)
        .map(|k| (k > 0).then_some(base.seed + k))
        .collect())
}

/// Steps of the search for the mu that spends a budget.
const MU_SEARCH_STEPS: usize = 12;

/// The paper's cascade reaches a budget through mu alone (threshold 0.5, no
/// price): the fixed-mu run whose LLM calls come closest to the budget,
/// found by bisection on log mu (calls fall as mu grows; the search reads
/// call counts only, never the answers' accuracy).
fn mu_for_budget(spec: &ReplaySpec, budget: u64) -> Result<Report> {
    let (mut low, mut high) = (-7.0f64, -1.0f64);
    let mut best: Option<Report> = None;
    for _ in 0..MU_SEARCH_STEPS {
        let log_mu = 0.5 * (low + high);
        let report = replay(
            &ReplaySpec {
                mu: Some(10f64.powf(log_mu)),
                llm_budget: None,
                ..spec.clone()
            },
            false,
        )?;
        let calls = report.total_llm_calls();
        if calls > budget {
            low = log_mu;
        } else {
            high = log_mu;
        }
        let closer = best
            .as_ref()
            .is_none_or(|b| calls.abs_diff(budget) < b.total_llm_calls().abs_diff(budget));
        if closer {
            best = Some(report);
        }
        if calls.abs_diff(budget) as f64 <= 0.005 * budget as f64 {
            break;
        }
    }
    best.context("no run in the mu search")
}

/// Items listed in an id file (a split).
pub fn stream_length(path: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(text.lines().filter(|l| !l.trim().is_empty()).count() as u64)
}

pub fn write_json(path: &Path, results: &impl Serialize) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_string_pretty(results)?;
    std::fs::write(&tmp, json + "\n").with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// CPU model and core count, for the record.
pub fn machine_description() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}
