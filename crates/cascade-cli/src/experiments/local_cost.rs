//! What a local expert cost in a replay, and its agreement with the run.

use anyhow::Result;
use cascade::{AnsweredBy, Summary};
use cascade_expert::{Item, LocalExpert};
use cascade_runtime::progress::Progress;

use super::replay::{LiveExpertReport, ReplaySpec};

/// The local expert's cost on the stream and, where its label of every item
/// is known (an LLM-only run, or a cascade run with `--expert-cache` after an
/// LLM-only run filled it), the expert alone's accuracy and the run's
/// agreement with it. Labels missing from the cache are computed here, after
/// the stream and outside its wall time.
pub(super) fn measure_local_expert(
    expert: &LocalExpert,
    spec: &ReplaySpec,
    stream: &[&Item],
    predictions: &[(AnsweredBy, Option<usize>)],
    summary: &mut Summary,
) -> Result<LiveExpertReport> {
    let compute = expert.compute_time();
    let peak_rss_mb = crate::bench_encoder::peak_rss_mb();
    let has_cache = spec
        .local_expert
        .as_ref()
        .is_some_and(|c| c.cache.is_some());
    let all_deferred = predictions.iter().all(|(by, _)| *by == AnsweredBy::Llm);
    let mut reference_items = 0;
    if has_cache || all_deferred {
        let mut progress = Progress::new(stream.len() as u64, "expert-alone labels");
        let (mut agree, mut expert_correct, mut with_gold) = (0u64, 0u64, 0u64);
        // The expert alone on the items the students answered.
        let (mut student_items_correct, mut student_items_with_gold) = (0u64, 0u64);
        for (item, (by, prediction)) in stream.iter().zip(predictions) {
            let reference = match by {
                AnsweredBy::Llm => *prediction,
                AnsweredBy::Level(_) => {
                    reference_items += 1;
                    Some(expert.label_now(&item.text, true)?.label)
                }
            };
            agree += u64::from(reference == *prediction);
            if let Some(gold) = item.gold {
                with_gold += 1;
                expert_correct += u64::from(reference == Some(gold));
                if *by != AnsweredBy::Llm {
                    student_items_with_gold += 1;
                    student_items_correct += u64::from(reference == Some(gold));
                }
            }
            progress.inc(1);
        }
        progress.finish();
        summary.agreement_with_llm = Some(agree as f64 / stream.len().max(1) as f64);
        summary.llm_accuracy = (with_gold > 0).then(|| expert_correct as f64 / with_gold as f64);
        summary.llm_accuracy_on_student_items = (student_items_with_gold > 0)
            .then(|| student_items_correct as f64 / student_items_with_gold as f64);
    }
    let seconds = compute.elapsed.as_secs_f64();
    let per_second = |n: u64| {
        if seconds > 0.0 {
            n as f64 / seconds
        } else {
            0.0
        }
    };
    Ok(LiveExpertReport {
        model: spec
            .local_expert
            .as_ref()
            .map(|c| c.model.display().to_string())
            .unwrap_or_default(),
        prompts: compute.prompts,
        prompt_tokens: compute.prompt_tokens,
        model_seconds: seconds,
        prompt_tokens_per_second: per_second(compute.prompt_tokens),
        labels_per_second: per_second(compute.prompts),
        reference_items,
        peak_rss_mb,
    })
}

pub fn print_live_expert(live: &LiveExpertReport, summary: &Summary) {
    println!(
        "local expert {}: {} prompts, {} prompt tokens in {:.1} s ({:.0} tokens/s, {:.2} labels/s), peak RSS {:.0} MB",
        live.model,
        live.prompts,
        live.prompt_tokens,
        live.model_seconds,
        live.prompt_tokens_per_second,
        live.labels_per_second,
        live.peak_rss_mb
    );
    if summary.agreement_with_llm.is_none() {
        println!("agreement with the expert alone: not measured (give --expert-cache filled by an LLM-only run)");
    } else if live.reference_items > 0 {
        println!(
            "agreement and LLM-alone accuracy use the expert's labels of {} student-answered items, from --expert-cache or computed after the stream",
            live.reference_items
        );
    }
}
