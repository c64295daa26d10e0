//! Throughput of the logistic-regression student on real IMDB reviews:
//! featurize + predict, and featurize + one training step.
//!
//! cargo bench -p cascade-cli --bench logreg

use std::path::Path;

use cascade::config::LogRegConfig;
use cascade::student::{Demonstration, LogReg, Student};
use cascade_expert::Task;
use cascade_expert::{Dataset, StreamOrder};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

const TEXTS: usize = 1000;

fn imdb_reviews() -> Vec<(String, usize)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/imdb");
    let task = Task::preset("imdb").expect("imdb preset");
    let data = Dataset::load(&dir, &task, "gpt35").expect("IMDB data in ../shared/data/imdb");
    let stream = data.stream(&StreamOrder::Test).expect("test split");
    stream
        .iter()
        .filter_map(|item| Some((item.text.clone(), item.expert?)))
        .take(2 * TEXTS)
        .collect()
}

fn bench_logreg(c: &mut Criterion) {
    let reviews = imdb_reviews();
    let (train, test) = reviews.split_at(TEXTS);
    let mut student = LogReg::new(2, &LogRegConfig::default());
    for (text, _) in &reviews {
        student.observe(text);
    }
    let demos: Vec<Demonstration> = train
        .iter()
        .map(|(text, label)| Demonstration {
            text,
            label: *label,
            probs: None,
        })
        .collect();
    student.learn(&demos).expect("learn");
    let texts: Vec<&str> = test.iter().map(|(t, _)| t.as_str()).collect();

    let mut group = c.benchmark_group("logreg");
    group.throughput(Throughput::Elements(TEXTS as u64));
    group.sample_size(20);
    group.bench_function("featurize+predict 1000 reviews", |b| {
        b.iter(|| student.predict_proba(&texts).expect("predict"))
    });
    group.bench_function("featurize+learn 1000 reviews", |b| {
        b.iter(|| student.learn(&demos).expect("learn"))
    });
    group.finish();
}

criterion_group!(benches, bench_logreg);
criterion_main!(benches);
