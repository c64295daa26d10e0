//! `cascade bench-encoder`: forward and training-step timings of the encoder,
//! built exactly like `../shared/bench/pytorch_minilm.py` so the two can be
//! compared in one session (same token batch, head init, optimiser and loss).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use cascade_encoders::{AdamW, AdamWConfig, BertConfig, BertEncoder, TextEncoder, Trainable};
use clap::Args;

#[derive(Args, Debug)]
pub struct BenchEncoderArgs {
    /// A Hugging Face BERT folder (config.json, tokenizer.json, model.safetensors).
    #[arg(long, default_value = "models/all-minilm-l6-v2")]
    model: PathBuf,
    /// Run one configuration, `fwd:BATCH:SEQ` or `train:BATCH:SEQ`, instead of the table.
    #[arg(long)]
    only: Option<String>,
    /// Timed iterations per configuration (after warm-up).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    /// Training: freeze the embeddings (no gradient, no AdamW for 12M weights).
    #[arg(long)]
    freeze_embeddings: bool,
}

/// The configurations of the comparison table.
const TABLE: [&str; 3] = ["fwd:1:128", "fwd:16:256", "train:8:256"];

/// The PyTorch script's text, repeated 40 times and sliced into rows.
const TEXT: &str = "I went into this film with modest expectations and came out genuinely surprised. The lead performance is layered and restrained, the supporting cast is uniformly strong, and the script finds humour in places you would not expect. The middle act drags a little, but the final twenty minutes are moving without being manipulative. ";

pub fn run(args: &BenchEncoderArgs) -> Result<()> {
    match &args.only {
        Some(spec) => {
            let line = run_one(args, spec)?;
            println!("{line}");
            Ok(())
        }
        None => run_table(args),
    }
}

/// Each configuration runs in its own process so its peak RSS is its own.
fn run_table(args: &BenchEncoderArgs) -> Result<()> {
    let exe = std::env::current_exe()?;
    println!(
        "model {} · {} threads · {} timed iterations",
        args.model.display(),
        candle_core::utils::get_num_threads(),
        args.iters
    );
    println!(
        "{:<7} {:>5} {:>4} {:>10} {:>9} {:>9} {:>8}  check",
        "mode", "batch", "seq", "median_ms", "min_ms", "max_ms", "rss_mb"
    );
    for spec in TABLE {
        let mut cmd = Command::new(&exe);
        cmd.args([
            "bench-encoder",
            "--only",
            spec,
            "--iters",
            &args.iters.to_string(),
            "--model",
        ])
        .arg(&args.model);
        if args.freeze_embeddings {
            cmd.arg("--freeze-embeddings");
        }
        let output = cmd.output().context("running a benchmark child process")?;
        if !output.status.success() {
            bail!("{spec} failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        print!("{}", String::from_utf8_lossy(&output.stdout));
    }
    Ok(())
}

fn run_one(args: &BenchEncoderArgs, spec: &str) -> Result<String> {
    let parts: Vec<&str> = spec.split(':').collect();
    let (mode, batch, seq) = match parts.as_slice() {
        [mode, batch, seq] => (*mode, batch.parse::<usize>()?, seq.parse::<usize>()?),
        _ => bail!("--only takes MODE:BATCH:SEQ, e.g. train:8:256; got `{spec}`"),
    };
    let device = Device::Cpu;
    let config =
        BertConfig::from_file(&args.model.join("config.json")).map_err(anyhow::Error::msg)?;
    let hidden = config.hidden_size;
    let (ids, mask) = token_batch(&args.model, batch, seq, &device)?;
    let mut times = Vec::new();
    let check = match mode {
        "fwd" => {
            let encoder = BertEncoder::load(&args.model, config, Trainable::NONE, &device)?;
            let mut checksum = 0.0;
            for i in 0..args.iters + 2 {
                let t = Instant::now();
                let h = encoder.forward(&ids, &mask)?;
                checksum = h.mean(1)?.sum_all()?.to_scalar::<f32>()?;
                if i >= 2 {
                    times.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            format!("checksum={checksum:.4}")
        }
        "train" => {
            let trainable = Trainable {
                enabled: true,
                embeddings: !args.freeze_embeddings,
                frozen_layers: 0,
            };
            let encoder = BertEncoder::load(&args.model, config, trainable, &device)?;
            // The script's head: weight[i] = sin(i)·0.02, bias 0.
            let w: Vec<f32> = (0..2 * hidden).map(|i| (i as f32).sin() * 0.02).collect();
            let head_w = Var::from_tensor(&Tensor::from_vec(w, (2, hidden), &device)?)?;
            let head_b = Var::from_tensor(&Tensor::zeros(2, candle_core::DType::F32, &device)?)?;
            let labels =
                Tensor::from_vec((0..batch as u32).map(|i| i % 2).collect(), batch, &device)?;
            let mut vars: Vec<Var> = encoder.vars().iter().map(|(_, v)| v.clone()).collect();
            vars.extend([head_w.clone(), head_b.clone()]);
            let mut opt = AdamW::new(
                vars,
                AdamWConfig {
                    lr: 2e-5,
                    ..AdamWConfig::default()
                },
            );
            let mut losses = Vec::new();
            // Per phase, to see where a step's time goes: forward, backward, AdamW.
            let mut phases = [Vec::new(), Vec::new(), Vec::new()];
            for i in 0..args.iters + 1 {
                let t = Instant::now();
                let h = encoder.forward(&ids, &mask)?;
                let logits = h
                    .mean(1)?
                    .matmul(&head_w.as_tensor().t()?)?
                    .broadcast_add(head_b.as_tensor())?;
                let loss = candle_nn::loss::cross_entropy(&logits, &labels)?;
                let forward_done = t.elapsed();
                let grads = loss.backward()?;
                let backward_done = t.elapsed();
                opt.step(&grads)?;
                losses.push(loss.to_scalar::<f32>()?);
                if i >= 1 {
                    let total = t.elapsed();
                    times.push(total.as_secs_f64() * 1e3);
                    phases[0].push(forward_done.as_secs_f64() * 1e3);
                    phases[1].push((backward_done - forward_done).as_secs_f64() * 1e3);
                    phases[2].push((total - backward_done).as_secs_f64() * 1e3);
                }
            }
            let first: Vec<String> = losses.iter().take(3).map(|l| format!("{l:.6}")).collect();
            let [fwd, bwd, adamw] = phases.map(|mut p| {
                p.sort_by(f64::total_cmp);
                p[p.len() / 2]
            });
            format!(
                "losses={} fwd/bwd/adamw={fwd:.0}/{bwd:.0}/{adamw:.0}ms",
                first.join(",")
            )
        }
        other => bail!("unknown mode `{other}`; use fwd or train"),
    };
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok(format!(
        "{mode:<7} {batch:>5} {seq:>4} {median:>10.1} {:>9.1} {:>9.1} {:>8.0}  {check}",
        times[0],
        times[times.len() - 1],
        peak_rss_mb()
    ))
}

/// Rows `[CLS] ids[r·7 .. r·7+seq−2] [SEP]`, as the PyTorch script builds them.
fn token_batch(
    model: &Path,
    batch: usize,
    seq: usize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let encoder =
        TextEncoder::load(&model.join("tokenizer.json"), seq).map_err(anyhow::Error::msg)?;
    let body = encoder
        .body_ids(&TEXT.repeat(40))
        .map_err(anyhow::Error::msg)?;
    let mut ids = Vec::with_capacity(batch * seq);
    for r in 0..batch {
        let slice = body
            .get(r * 7..r * 7 + seq - 2)
            .context("text too short for this batch")?;
        ids.extend(encoder.wrap(slice));
    }
    let ids = Tensor::from_vec(ids, (batch, seq), device)?;
    let mask = Tensor::ones((batch, seq), candle_core::DType::F32, device)?;
    Ok((ids, mask))
}

/// Peak resident set size of this process (VmHWM), in MB.
pub fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}
