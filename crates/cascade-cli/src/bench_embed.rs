//! `cascade bench-embed`: the frozen encoder's throughput on a stream's texts,
//! f32 against int8 side by side (alternating rounds, medians), and how close
//! the int8 embeddings are to the f32 ones.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use cascade::config::{EmbeddingHeadConfig, Quantization};
use cascade_encoders::quantized::{use_kernel, Kernel};
use cascade_encoders::EmbeddingHead;
use cascade_expert::dataset::{Dataset, StreamOrder};
use cascade_expert::task::Task;
use clap::Args;

use crate::experiments::grid::machine_description;

#[derive(Args, Debug)]
pub struct BenchEmbedArgs {
    /// Dataset folder; its test stream's first `--texts` texts are embedded.
    #[arg(long, default_value = "../shared/data/imdb")]
    data: PathBuf,
    /// Task preset or file matching the data's labels.
    #[arg(long, default_value = "imdb")]
    task: String,
    /// A Hugging Face BERT or MPNet folder.
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    model: PathBuf,
    /// Tokens per text (longer texts are cut).
    #[arg(long, default_value_t = 256)]
    max_len: usize,
    /// Encoder layers pooled into the embedding, comma-separated (1-based);
    /// none pools the last.
    #[arg(long, value_delimiter = ',')]
    layers: Vec<usize>,
    /// How many texts.
    #[arg(long, default_value_t = 1000)]
    texts: usize,
    /// Rounds of each precision, alternating f32 and int8.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Write the f32 embeddings here (the int8 ones with `--only int8`), row
    /// after row of little-endian f32 (`scripts/bench/onnxruntime_embed.py
    /// --compare` reads them).
    #[arg(long)]
    save: Option<PathBuf>,
    /// Time one scheme alone (`f32` or `int8`), e.g. under a profiler.
    #[arg(long, value_parser = ["f32", "int8"])]
    only: Option<String>,
    /// The int8 integer kernel: avx512-vnni, avx-vnni, avx2 or scalar
    /// (default: the fastest this CPU has), to compare kernels on one machine.
    #[arg(long)]
    int8_kernel: Option<Kernel>,
}

pub fn run(args: &BenchEmbedArgs) -> Result<()> {
    if args.texts == 0 || args.rounds == 0 {
        bail!("--texts and --rounds must be at least 1");
    }
    use_kernel(args.int8_kernel).map_err(anyhow::Error::msg)?;
    let task = Task::load(&args.task)?;
    let dataset = Dataset::load(&args.data, &task, "gpt35")?;
    let stream = dataset.stream(&StreamOrder::Test)?;
    let texts: Vec<&str> = stream
        .iter()
        .take(args.texts)
        .map(|item| item.text.as_str())
        .collect();
    let config = |quantize| EmbeddingHeadConfig {
        model: args.model.to_string_lossy().into_owned(),
        max_len: args.max_len,
        layers: args.layers.clone(),
        quantize,
        ..EmbeddingHeadConfig::default()
    };
    println!(
        "{} · {} threads · int8 kernel {} · {} texts of {} · max_len {} · layers {:?}",
        machine_description(),
        candle_core::utils::get_num_threads(),
        Kernel::in_use().name(),
        texts.len(),
        args.data.display(),
        args.max_len,
        args.layers
    );
    println!(
        "{:<6} {:>5} {:>9} {:>8}",
        "scheme", "round", "texts/s", "seconds"
    );
    let schemes = [("f32", None), ("int8", Some(Quantization::Int8))];
    let mut rates = [Vec::new(), Vec::new()];
    let mut last: [Vec<Vec<f32>>; 2] = [Vec::new(), Vec::new()];
    for round in 1..=args.rounds {
        for (i, (name, quantize)) in schemes.iter().enumerate() {
            if args.only.as_deref().is_some_and(|only| only != *name) {
                continue;
            }
            // A fresh head per round: an empty in-memory cache, load time not counted.
            let mut head = EmbeddingHead::new(2, &config(*quantize))
                .with_context(|| format!("loading {}", args.model.display()))?;
            let start = Instant::now();
            last[i] = head.embeddings(&texts)?;
            let seconds = start.elapsed().as_secs_f64();
            let rate = texts.len() as f64 / seconds;
            rates[i].push(rate);
            println!("{name:<6} {round:>5} {rate:>9.2} {seconds:>8.2}");
        }
    }
    if let Some(path) = &args.save {
        let saved = if last[0].is_empty() {
            &last[1]
        } else {
            &last[0]
        };
        let bytes: Vec<u8> = saved
            .iter()
            .flatten()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))?;
    }
    if args.only.is_some() {
        return Ok(());
    }
    let medians = rates.map(|mut r| {
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    });
    let cosines: Vec<f64> = last[0]
        .iter()
        .zip(&last[1])
        .map(|(a, b)| cosine(a, b))
        .collect();
    let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
    let min = cosines.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "median texts/s: f32 {:.2}, int8 {:.2}, int8/f32 {:.2}×",
        medians[0],
        medians[1],
        medians[1] / medians[0]
    );
    println!(
        "cosine(int8, f32) over {} texts: mean {mean:.5}, min {min:.5}",
        cosines.len()
    );
    Ok(())
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(1e-12)
}
