//! The distilled baseline: one student trained offline on the LLM's labels of
//! train-half items, then alone on the stream.

use anyhow::{bail, Context, Result};
use cascade::Demonstration;
use cascade_expert::{Dataset, Item, StreamOrder, Task};
use cascade_runtime::progress::Progress;
use cascade_runtime::students::build_student;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::replay::{read_config, uses_embedding_cache, ReplaySpec};

/// The distilled baseline: trains one configured student offline on the LLM's
/// labels of the first `llm_budget` items of split_train_ids.txt (items the
/// LLM gave no label teach nothing but were still paid for), in a seeded
/// shuffled order per epoch. IDF statistics see the train texts only.
pub(super) fn distil(
    spec: &ReplaySpec,
    task: &Task,
    dataset: &Dataset,
    stream: &[&Item],
) -> Result<(String, Box<dyn cascade::Student>, u64)> {
    let calls = spec
        .llm_budget
        .context("--baseline distilled needs --llm-budget N (train items the LLM labels)")?;
    let (config, path) = read_config(spec)?;
    let level = match &spec.level {
        Some(name) => config
            .levels
            .iter()
            .find(|l| &l.name() == name)
            .with_context(|| format!("{} has no level named `{name}`", path.display()))?,
        None => config.levels.last().context("config has no levels")?,
    };
    let train_ids = spec.data.join("split_train_ids.txt");
    let train = dataset.stream(&StreamOrder::Ids(train_ids.clone()))?;
    if (train.len() as u64) < calls {
        bail!(
            "{} lists {} items, fewer than the {calls} to distil from",
            train_ids.display(),
            train.len()
        );
    }
    let train = &train[..calls as usize];
    let mut student = build_student(level, task.num_labels(), config.seed)?;
    let texts: Vec<&str> = train.iter().map(|i| i.text.as_str()).collect();
    for text in &texts {
        student.observe(text);
    }
    if uses_embedding_cache(level) {
        let all: Vec<&str> = texts
            .iter()
            .copied()
            .chain(stream.iter().map(|i| i.text.as_str()))
            .collect();
        let mut progress = Progress::new(all.len() as u64, "texts embedded");
        for chunk in all.chunks(512) {
            student.precompute(chunk)?;
            progress.inc(chunk.len() as u64);
        }
        progress.finish();
    }
    let mut demos: Vec<Demonstration> = train
        .iter()
        .filter_map(|item| {
            item.expert.map(|label| Demonstration {
                text: &item.text,
                label,
                probs: None,
            })
        })
        .collect();
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let batch = level.batch();
    let mut progress = Progress::new(
        (spec.distill_epochs * demos.len()) as u64,
        "distillation examples",
    );
    for _ in 0..spec.distill_epochs {
        demos.shuffle(&mut rng);
        for chunk in demos.chunks(batch) {
            student.learn(chunk)?;
            progress.inc(chunk.len() as u64);
        }
    }
    progress.finish();
    Ok((level.name(), student, calls))
}
