//! `cascade reproduce --select`: each dataset's cascade settings chosen on
//! the train half (`split_train_ids.txt`, its recorded LLM answers playing
//! the LLM, its gold labels scoring the candidates) at the paper's budgets.
//! No test item is read (only the test split's length, to scale the
//! budgets). Writes the chosen configs (`selected/` in the configs folder,
//! which the grid runs) and the evidence (`selection.json`, `selection.md`).
//!
//! The search is in two stages, from a start taken from the paper and the
//! authors' code (the embedding head's default step, the authors' gate
//! calibration for their BERT-base level, no option beyond the paper):
//! 1. every combination of the structural options (the encoder layer read,
//!    `combine_levels`, `replay`, the budget's pacing), then the best of
//!    them with the other budget pricing (`budget_prices`: every gate, or
//!    the last one);
//! 2. at the best structure, the head's step size × its gate's calibration.
//!
//! A candidate's score is its mean margin over the paper across budgets and
//! seeds, where a cell's margin is the worse of accuracy and (HateSpeech)
//! recall minus the paper's: a cell is short of the paper if either is.

use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cascade::config::{PricedLevels, StudentKind};
use cascade::CascadeConfig;
use serde::{Deserialize, Serialize};

use super::grid::{machine_description, write_json, DatasetSpec, GRID, QUICK_ITEMS};
use super::replay::{replay, stream_texts, ReplaySpec};
use crate::reproduce::ReproduceArgs;
use cascade_encoders::embedding_head::fill_caches;
use cascade_runtime::progress::Progress;
use cascade_runtime::{load_config, Overrides};

/// Where the chosen configs go, inside the configs folder.
pub const SELECTED_DIR: &str = "selected";
pub const SELECTION_JSON: &str = "selection.json";

/// One point of the search: the options the shipped configs once took from
/// test-stream scores.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Candidate {
    /// Encoder layers the embedding head reads (empty: the last).
    pub layers: Vec<usize>,
    /// The embedding head's AdaGrad step.
    pub head_lr: f32,
    /// The embedding level's gate calibration.
    pub calibration: f32,
    pub combine_levels: bool,
    /// Past labels replayed per training pass, on the LR and embedding levels.
    pub replay: usize,
    /// The budget's spending curve exponent.
    pub pacing: f64,
    /// Which gates the budget prices. A record from before it was searched
    /// reads as every gate; `--reuse-scores` scores the best record again,
    /// so records scored otherwise (ISEAR's, "last") are not kept.
    #[serde(default)]
    pub prices: PricedLevels,
}

/// The start: the embedding head's default step, the authors' calibration for
/// their BERT-base level, none of our options, the base config's pricing.
fn start(spec: &DatasetSpec, base: &CascadeConfig) -> Candidate {
    Candidate {
        layers: Vec::new(),
        head_lr: 0.5,
        calibration: spec.authors_calibration,
        combine_levels: false,
        replay: 0,
        pacing: 1.0,
        prices: base.budget_prices,
    }
}

/// The encoder layers stage 1 compares: the last, and layer 8.
const LAYER_CHOICES: [&[usize]; 2] = [&[], &[8]];

/// Stage 1: every structure at the start's step and calibration.
fn structures(start: &Candidate) -> Vec<Candidate> {
    let mut all = Vec::new();
    for layers in LAYER_CHOICES.map(<[usize]>::to_vec) {
        for combine_levels in [false, true] {
            for replay in [0, 64] {
                for pacing in [1.0, 0.7] {
                    all.push(Candidate {
                        layers: layers.clone(),
                        combine_levels,
                        replay,
                        pacing,
                        ..start.clone()
                    });
                }
            }
        }
    }
    all
}

/// Stage 1, last: the best structure with the other pricing.
fn other_pricing(best: &Candidate) -> Candidate {
    let prices = match best.prices {
        PricedLevels::All => PricedLevels::Last,
        PricedLevels::Last => PricedLevels::All,
    };
    Candidate {
        prices,
        ..best.clone()
    }
}

/// Stage 2: the head's step × the gate's calibration at the best structure.
fn tunings(best: &Candidate) -> Vec<Candidate> {
    let mut all = Vec::new();
    for head_lr in [0.2, 0.5, 1.0] {
        for calibration in [0.30, 0.35, 0.40, 0.45] {
            all.push(Candidate {
                head_lr,
                calibration,
                ..best.clone()
            });
        }
    }
    all
}

impl Candidate {
    /// The config with this candidate's options. `gate` also sets the
    /// embedding level's gate calibration (the 3-level config keeps the
    /// authors' values for its three gates). Fine-tuned transformer levels
    /// are left as they are.
    pub fn apply(&self, base: &CascadeConfig, gate: bool) -> CascadeConfig {
        let mut config = base.clone();
        config.combine_levels = self.combine_levels;
        config.budget_pacing = self.pacing;
        config.budget_prices = self.prices;
        for level in &mut config.levels {
            match level.kind {
                StudentKind::Logreg => level.replay = self.replay,
                StudentKind::EmbeddingHead => {
                    level.replay = self.replay;
                    level.embedding_head.layers = self.layers.clone();
                    level.embedding_head.lr = self.head_lr;
                    if gate {
                        level.gate.calibration = self.calibration;
                    }
                }
                StudentKind::Transformer => {}
            }
        }
        config
    }

    fn describe(&self) -> String {
        format!(
            "layer {}, head lr {}, calibration {:.2}, combine_levels {}, replay {}, pacing {}, prices {}",
            self.layers_text(),
            self.head_lr,
            self.calibration,
            self.combine_levels,
            self.replay,
            self.pacing,
            self.prices_text()
        )
    }

    fn prices_text(&self) -> &'static str {
        match self.prices {
            PricedLevels::All => "all",
            PricedLevels::Last => "last",
        }
    }

    fn layers_text(&self) -> String {
        if self.layers.is_empty() {
            "last".into()
        } else {
            format!("{:?}", self.layers)
        }
    }
}

/// The paper's mechanisms only, with the chosen students: no level
/// combination, no replay (mu and the 0.5 threshold then set the calls).
pub fn paper_rules(config: &CascadeConfig) -> CascadeConfig {
    let mut config = config.clone();
    config.combine_levels = false;
    for level in &mut config.levels {
        level.replay = 0;
    }
    config
}

/// One run of a candidate on the train half.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainRun {
    pub budget: u64,
    pub seed: u64,
    pub accuracy: f64,
    pub recall: Option<f64>,
    pub llm_calls: u64,
    pub forced_answers: u64,
    pub forced_deferrals: u64,
    /// The worse of accuracy and recall minus the paper's, in points.
    pub margin: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scored {
    pub stage: u8,
    pub candidate: Candidate,
    pub runs: Vec<TrainRun>,
    /// Mean margin over budgets and seeds.
    pub score: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DatasetSelection {
    pub dataset: String,
    pub base_config: String,
    pub budgets: Vec<u64>,
    pub candidates: Vec<Scored>,
    /// Index into `candidates`.
    pub chosen: usize,
    pub wall_seconds: f64,
    /// Candidates kept from an earlier search (`--reuse-scores`), not scored
    /// in `wall_seconds`.
    #[serde(default)]
    pub reused: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Selection {
    pub quick: bool,
    pub machine: String,
    pub seeds: Vec<u64>,
    pub datasets: Vec<DatasetSelection>,
}

pub fn run(args: &ReproduceArgs) -> Result<()> {
    let specs = super::grid::selected_specs(args)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let selected_dir = args.configs.join(SELECTED_DIR);
    std::fs::create_dir_all(&selected_dir)
        .with_context(|| format!("creating {}", selected_dir.display()))?;
    let json_path = args.out.join(SELECTION_JSON);
    let mut selection = Selection {
        quick: args.quick,
        machine: machine_description(),
        seeds: Vec::new(),
        datasets: Vec::new(),
    };
    // Selecting some datasets keeps the others' evidence.
    // An earlier search's datasets (and the seeds they were scored with),
    // for `--reuse-scores`.
    let mut reusable: Vec<DatasetSelection> = Vec::new();
    let mut reusable_seeds: Vec<u64> = Vec::new();
    if let Ok(text) = std::fs::read_to_string(&json_path) {
        if let Ok(earlier) = serde_json::from_str::<Selection>(&text) {
            if earlier.quick == args.quick {
                let (again, kept) = earlier
                    .datasets
                    .into_iter()
                    .partition(|d| specs.iter().any(|s| s.name == d.dataset));
                selection.datasets = kept;
                if args.reuse_scores {
                    reusable = again;
                    reusable_seeds = earlier.seeds;
                }
            }
        }
    }
    for spec in specs {
        let base_path = args.configs.join(spec.base_config);
        let base = read_config(&base_path)?;
        let seeds: Vec<u64> = (0..args.select_seeds).map(|k| base.seed + k).collect();
        selection.seeds = seeds.clone();
        let reuse = reusable.iter().find(|d| {
            d.dataset == spec.name && d.base_config == spec.base_config && reusable_seeds == seeds
        });
        let chosen = select_dataset(spec, &base, &base_path, &seeds, reuse, args)?;
        let candidate = &chosen.candidates[chosen.chosen].candidate;
        eprintln!("{}: chose {}", spec.name, candidate.describe());
        write_selected(spec, candidate, &base, args)?;
        selection.datasets.retain(|d| d.dataset != spec.name);
        selection.datasets.push(chosen);
        selection
            .datasets
            .sort_by_key(|d| GRID.iter().position(|g| g.name == d.dataset));
        write_json(&json_path, &selection)?;
    }
    write_markdown(&json_path, &args.out)?;
    eprintln!("and {}", selected_dir.display());
    Ok(())
}

/// selection.md in `out`, from a selection's JSON alone.
pub fn write_markdown(json: &Path, out: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?;
    let selection: Selection =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", json.display()))?;
    let md = out.join("selection.md");
    std::fs::write(&md, selection_markdown(&selection))
        .with_context(|| format!("writing {}", md.display()))?;
    eprintln!("wrote {}", md.display());
    Ok(())
}

fn read_config(path: &Path) -> Result<CascadeConfig> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    CascadeConfig::from_toml(&text).with_context(|| format!("in {}", path.display()))
}

fn select_dataset(
    spec: &DatasetSpec,
    base: &CascadeConfig,
    base_path: &Path,
    seeds: &[u64],
    reuse: Option<&DatasetSelection>,
    args: &ReproduceArgs,
) -> Result<DatasetSelection> {
    let started = Instant::now();
    let data = args.data_root.join(spec.name);
    let train = data.join("split_train_ids.txt");
    let limit = args.quick.then_some(QUICK_ITEMS);
    let length = match limit {
        Some(items) => items as u64,
        None => super::grid::stream_length(&train)?,
    };
    // The paper's budgets, as shares of its test stream, on the train half.
    let test_length = super::grid::stream_length(&data.join("split_test_ids.txt"))?;
    let indices: Vec<usize> = if args.quick { vec![1] } else { vec![0, 1, 2] };
    let budgets: Vec<u64> = indices
        .iter()
        .map(|&i| (spec.budgets[i] as f64 * length as f64 / test_length as f64).round() as u64)
        .collect();
    let scratch = Scratch::new(spec.name)?;
    let mut train_spec = ReplaySpec::new(
        data.clone(),
        Some(base_path.to_path_buf()),
        args.models.clone(),
    );
    train_spec.stream = train.display().to_string();
    train_spec.limit = limit;
    train_spec.expert_field = args.expert_field.clone();
    encode_once(&train_spec, base_path, args)?;
    let start = start(spec, base);
    let mut candidates: Vec<Scored> = Vec::new();
    let stage_one = structures(&start);
    let total = stage_one.len() + 1 + tunings(&start).len() - 1;
    let score = |stage: u8, candidate: Candidate, done: usize| -> Result<Scored> {
        let path = scratch.0.join(format!("candidate-{done}.toml"));
        write_config(&path, &candidate.apply(base, true), "a candidate")?;
        let mut runs = Vec::new();
        for (&index, &budget) in indices.iter().zip(&budgets) {
            for &seed in seeds {
                let mut replay_spec = train_spec.clone();
                replay_spec.config = Some(path.clone());
                replay_spec.llm_budget = Some(budget);
                replay_spec.seed = Some(seed);
                replay_spec.quiet = true;
                let report = replay(&replay_spec, false).with_context(|| {
                    format!(
                        "{} on the train half: {} (from {})",
                        spec.name,
                        candidate.describe(),
                        base_path.display()
                    )
                })?;
                let s = &report.summary;
                let accuracy = s.accuracy.unwrap_or(0.0);
                let mut margin = 100.0 * accuracy - spec.paper_accuracy[index];
                if let (Some(recall), Some(paper)) = (s.recall, spec.paper_recall) {
                    margin = margin.min(100.0 * recall - paper[index]);
                }
                runs.push(TrainRun {
                    budget,
                    seed,
                    accuracy,
                    recall: s.recall.filter(|_| spec.paper_recall.is_some()),
                    llm_calls: report.total_llm_calls(),
                    forced_answers: report.forced_answers.unwrap_or(0),
                    forced_deferrals: report.forced_deferrals.unwrap_or(0),
                    margin,
                });
            }
        }
        let score = runs.iter().map(|r| r.margin).sum::<f64>() / runs.len() as f64;
        eprintln!(
            "[{}/{total}] {} {}: score {score:+.2}",
            done + 1,
            spec.name,
            candidate.describe()
        );
        Ok(Scored {
            stage,
            candidate,
            runs,
            score,
        })
    };
    // An interrupted search resumes: candidates it scored are kept.
    let mut partial = Partial {
        dataset: spec.name.into(),
        quick: args.quick,
        base: base.clone(),
        budgets: budgets.clone(),
        seeds: seeds.to_vec(),
        candidates: Vec::new(),
    };
    let partial_path = args
        .out
        .join(format!("selection-{}.partial.json", spec.name));
    let mut earlier = Partial::read(&partial_path, &partial);
    if let Some(reuse) = reuse.filter(|r| earlier.is_empty() && r.budgets == budgets) {
        earlier = check_reuse(reuse, |stage, candidate| score(stage, candidate, 0))?;
    }
    let reused = earlier.len();
    let mut next = |stage: u8, candidate: Candidate, candidates: &mut Vec<Scored>| {
        let kept = earlier
            .iter()
            .position(|s| s.stage == stage && s.candidate == candidate);
        let scored = match kept {
            Some(i) => earlier.swap_remove(i),
            None => score(stage, candidate, candidates.len())?,
        };
        candidates.push(scored);
        partial.candidates = candidates.clone();
        write_json(&partial_path, &partial)
    };
    for candidate in stage_one {
        next(1, candidate, &mut candidates)?;
    }
    let best_structure = candidates[best(&candidates)].candidate.clone();
    next(1, other_pricing(&best_structure), &mut candidates)?;
    let best_structure = candidates[best(&candidates)].candidate.clone();
    for candidate in tunings(&best_structure) {
        if candidates.iter().any(|c| c.candidate == candidate) {
            continue;
        }
        next(2, candidate, &mut candidates)?;
    }
    // The search is whole: selection.json takes it from here.
    let _ = std::fs::remove_file(&partial_path);
    let chosen = best(&candidates);
    Ok(DatasetSelection {
        dataset: spec.name.into(),
        base_config: spec.base_config.into(),
        budgets,
        candidates,
        chosen,
        wall_seconds: started.elapsed().as_secs_f64(),
        reused: reused - earlier.len(),
    })
}

/// An earlier search's candidates, if its best scores the same again (same
/// runs, bit for bit); none otherwise: the code has changed its decisions.
fn check_reuse(
    earlier: &DatasetSelection,
    mut score: impl FnMut(u8, Candidate) -> Result<Scored>,
) -> Result<Vec<Scored>> {
    let best = &earlier.candidates[best(&earlier.candidates)];
    eprintln!(
        "{}: scoring the earlier search's best again before reusing its {} candidates",
        earlier.dataset,
        earlier.candidates.len()
    );
    let again = score(best.stage, best.candidate.clone())?;
    if again.runs == best.runs {
        Ok(earlier.candidates.clone())
    } else {
        eprintln!(
            "{}: its runs differ now (score {:+.2}, was {:+.2}): every candidate is scored again",
            earlier.dataset, again.score, best.score
        );
        Ok(Vec::new())
    }
}

/// The candidates scored so far for one dataset, written after each, so an
/// interrupted search (IMDB's takes the better part of an hour) resumes.
#[derive(Serialize, Deserialize)]
struct Partial {
    dataset: String,
    quick: bool,
    base: CascadeConfig,
    budgets: Vec<u64>,
    seeds: Vec<u64>,
    candidates: Vec<Scored>,
}

impl Partial {
    /// The scored candidates of an earlier search with the same dataset,
    /// base config, budgets and seeds; none otherwise.
    fn read(path: &Path, now: &Partial) -> Vec<Scored> {
        let Some(earlier) = std::fs::read_to_string(path)
            .ok()
            .and_then(|text| serde_json::from_str::<Partial>(&text).ok())
        else {
            return Vec::new();
        };
        let same = earlier.dataset == now.dataset
            && earlier.quick == now.quick
            && earlier.base == now.base
            && earlier.budgets == now.budgets
            && earlier.seeds == now.seeds;
        if same {
            eprintln!(
                "{}: resuming a search with {} candidates scored ({})",
                now.dataset,
                earlier.candidates.len(),
                path.display()
            );
            earlier.candidates
        } else {
            Vec::new()
        }
    }
}

/// Encodes the train half once for every layer choice: the encoder runs to
/// its last layer and fills layer 8's cache on the way, so the candidates
/// then read caches (two separate passes cost 8/12 more on IMDB's reviews).
fn encode_once(train: &ReplaySpec, base_path: &Path, args: &ReproduceArgs) -> Result<()> {
    let config = load_config(base_path, &Overrides::default(), &args.models)
        .with_context(|| format!("reading {}", base_path.display()))?;
    let texts = stream_texts(train)?;
    let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
    let choices = LAYER_CHOICES.map(<[usize]>::to_vec);
    for level in &config.levels {
        if level.kind != StudentKind::EmbeddingHead {
            continue;
        }
        let mut progress = Progress::new(texts.len() as u64, "texts embedded (each layer choice)");
        for chunk in texts.chunks(512) {
            fill_caches(&level.embedding_head, &choices, chunk)
                .with_context(|| format!("encoding with {}", level.embedding_head.model))?;
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
    }
    Ok(())
}

/// A folder for the candidates' configs, removed when dropped.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(dataset: &str) -> Result<Self> {
        let dir =
            std::env::temp_dir().join(format!("cascade-select-{dataset}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The highest score's index; the earlier candidate (closer to the start) on a tie.
fn best(candidates: &[Scored]) -> usize {
    (0..candidates.len())
        .reduce(|a, b| {
            if candidates[b].score > candidates[a].score {
                b
            } else {
                a
            }
        })
        .unwrap_or(0)
}

/// The grid's configs for a dataset: the cascade (and the distilled and
/// ensemble baselines), the 3-level cascade and the paper-rules cascade.
fn write_selected(
    spec: &DatasetSpec,
    chosen: &Candidate,
    base: &CascadeConfig,
    args: &ReproduceArgs,
) -> Result<()> {
    let dir = args.configs.join(SELECTED_DIR);
    let cascade = chosen.apply(base, true);
    let larger_base = read_config(&args.configs.join(spec.base_larger_config))?;
    let what = |from: &str, how: &str| {
        format!(
            "`cascade reproduce --select` from configs/{from}: {how} (results/selection.md); \
             regenerate rather than edit."
        )
    };
    write_config(
        &dir.join(format!("{}.toml", spec.name)),
        &cascade,
        &what(
            spec.base_config,
            &format!("chosen on the train half, {}", chosen.describe()),
        ),
    )?;
    write_config(
        &dir.join(format!("{}-3level.toml", spec.name)),
        &chosen.apply(&larger_base, false),
        &what(
            spec.base_larger_config,
            &format!(
                "the options chosen for the 2-level cascade on the train half ({}), the authors' gate calibrations kept",
                chosen.describe()
            ),
        ),
    )?;
    write_config(
        &dir.join(format!("{}-paper-rules.toml", spec.name)),
        &paper_rules(&cascade),
        &what(
            &format!("{SELECTED_DIR}/{}.toml", spec.name),
            "the same students with the paper's mechanisms only (no combine_levels, no replay)",
        ),
    )
}

fn write_config(path: &Path, config: &CascadeConfig, what: &str) -> Result<()> {
    let mut value = toml::Value::try_from(config).context("writing a config as TOML")?;
    shortest_floats(&mut value);
    drop_other_kinds_sections(&mut value);
    let body = toml::to_string(&value).context("writing a config as TOML")?;
    let mut text = String::new();
    for line in textwrap(&format!("Generated by {what}"), 76) {
        let _ = writeln!(text, "# {line}");
    }
    text.push_str(&body);
    // What is written must read back as the same config.
    let back = CascadeConfig::from_toml(&text)
        .with_context(|| format!("the config written to {}", path.display()))?;
    if &back != config {
        bail!("{} does not read back as written", path.display());
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// f32 fields widened to f64 print as 0.0010000000474974513: write the
/// shortest decimal that reads back as the same f32 (the read-back check
/// in `write_config` catches an f64 field this would change).
fn shortest_floats(value: &mut toml::Value) {
    match value {
        toml::Value::Float(f) => {
            let narrow = *f as f32;
            if f64::from(narrow) == *f {
                if let Ok(short) = narrow.to_string().parse::<f64>() {
                    *f = short;
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(shortest_floats),
        toml::Value::Table(table) => table.iter_mut().for_each(|(_, v)| shortest_floats(v)),
        _ => {}
    }
}

/// A level's sections for the other student kinds hold only defaults: leave
/// them out, as a hand-written config does.
fn drop_other_kinds_sections(value: &mut toml::Value) {
    let Some(levels) = value.get_mut("levels").and_then(|l| l.as_array_mut()) else {
        return;
    };
    for level in levels.iter_mut().filter_map(|l| l.as_table_mut()) {
        let kind = level.get("kind").and_then(|k| k.as_str()).map(String::from);
        for section in ["logreg", "transformer", "embedding_head"] {
            if kind.as_deref() != Some(section) {
                level.remove(section);
            }
        }
    }
}

/// Words wrapped at `width` columns, for the generated header.
fn textwrap(text: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in text.split_whitespace() {
        let line = lines.last_mut().expect("one line at least");
        if !line.is_empty() && line.len() + 1 + word.len() > width {
            lines.push(word.to_string());
        } else {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        }
    }
    lines
}

fn selection_markdown(selection: &Selection) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# Settings chosen on the train half\n\n\
         Generated by `cascade reproduce --select{}` into `{SELECTION_JSON}` (regenerate this \
         page with `cascade report`); do not edit by hand.\n\n\
         - Machine: {}. Seeds: {:?}.\n\
         - Each dataset's train half (`split_train_ids.txt`, the authors' order) is replayed with its \
           recorded GPT-3.5 answers as the LLM at the paper's budgets; its gold labels score the \
           candidates. No test item is read (only the test split's length, to scale the budgets).\n\
         - Start (from the paper and the authors' code, not from any score): the encoder's last \
           layer, the embedding head's default step 0.5, the authors' gate calibration for their \
           BERT-base level, no `combine_levels`, no replay, even pacing (1.0), the base config's \
           `budget_prices`.\n\
         - Stage 1: every combination of layer (last, 8), `combine_levels`, `replay` (0, 64) and \
           pacing (1.0, 0.7), then the best of them with the other `budget_prices` (every gate \
           priced, or only the last; the earlier gates then never above 0.5). Stage 2: at the \
           best structure, head step (0.2, 0.5, 1.0) × calibration (0.30-0.45).\n\
         - Score: the mean over budgets and seeds of the worse of (accuracy − paper) and, for \
           HateSpeech, (recall of hate − paper), in points. Higher is better; ties keep the earlier.\n\
         - Settings not searched come from the base config (mu, the gates' step, decay and \
           regularization from the authors' scripts; the LR student's features, \
           results/lr-cascade.md).\n",
        if selection.quick { " --quick" } else { "" },
        selection.machine,
        selection.seeds
    );
    for d in &selection.datasets {
        let chosen = &d.candidates[d.chosen];
        let _ = writeln!(
            md,
            "## {}\n\nBase `configs/{}`; budgets on the train half {:?}; {} candidates in {:.1} min{}.\n\n\
             **Chosen: {}** (score {:+.2}), written to `configs/{SELECTED_DIR}/{}.toml` \
             (and `-3level.toml`, `-paper-rules.toml`).\n",
            d.dataset,
            d.base_config,
            d.budgets,
            d.candidates.len(),
            d.wall_seconds / 60.0,
            if d.reused > 0 {
                format!(
                    " ({} of them scored by an earlier search and kept with `--reuse-scores`, \
                     after its best scored the same again, run for run)",
                    d.reused
                )
            } else {
                String::new()
            },
            chosen.candidate.describe(),
            chosen.score,
            d.dataset
        );
        let recall = d
            .candidates
            .iter()
            .any(|c| c.runs.iter().any(|r| r.recall.is_some()));
        let mut header =
            "| stage | layer | head lr | calibration | combine | replay | pacing | prices |"
                .to_string();
        for b in &d.budgets {
            let _ = write!(header, " acc @{b} |");
            if recall {
                let _ = write!(header, " recall @{b} |");
            }
        }
        header.push_str(" forced (all runs) | score |");
        let _ = writeln!(
            md,
            "{header}\n|{}",
            "---|".repeat(header.matches('|').count() - 1)
        );
        let mut order: Vec<usize> = (0..d.candidates.len()).collect();
        order.sort_by(|&a, &b| d.candidates[b].score.total_cmp(&d.candidates[a].score));
        for i in order {
            let c = &d.candidates[i];
            let k = &c.candidate;
            let mark = if i == d.chosen { "**" } else { "" };
            let mut row = format!(
                "| {} | {} | {} | {:.2} | {} | {} | {} | {} |",
                c.stage,
                k.layers_text(),
                k.head_lr,
                k.calibration,
                k.combine_levels,
                k.replay,
                k.pacing,
                k.prices_text()
            );
            for &b in &d.budgets {
                let at: Vec<&TrainRun> = c.runs.iter().filter(|r| r.budget == b).collect();
                let mean = |f: &dyn Fn(&TrainRun) -> f64| {
                    100.0 * at.iter().map(|r| f(r)).sum::<f64>() / at.len().max(1) as f64
                };
                let _ = write!(row, " {:.2} |", mean(&|r| r.accuracy));
                if recall {
                    let _ = write!(row, " {:.2} |", mean(&|r| r.recall.unwrap_or(0.0)));
                }
            }
            let forced: u64 = c
                .runs
                .iter()
                .map(|r| r.forced_answers + r.forced_deferrals)
                .sum();
            let _ = writeln!(row, " {forced} | {mark}{:+.2}{mark} |", c.score);
            md.push_str(&row);
        }
        let _ = writeln!(md);
    }
    md
}
