//! `cascade label`: label a JSONL stream with the expert alone (the LLM-only
//! baseline for live experts). Resumable: answers are cached per (model,
//! prompt, text), so a re-run pays only for what the last run did not finish.
//! The input is streamed: at most `--chunk` lines of at most
//! `--max-line-bytes` each are held at once.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cascade_expert::local::DEFAULT_MODEL;
use cascade_expert::Task;
use cascade_expert::{label_all, Expert, LocalConfig, LocalExpert, OpenAiConfig, OpenAiExpert};
use clap::{Args, ValueEnum};
use serde_json::json;

use cascade_runtime::input::{
    count_lines, read_item, ItemId, LineReader, Record, DEFAULT_MAX_LINE_BYTES,
};
use cascade_runtime::progress::Progress;

#[derive(Args, Debug)]
pub struct LabelArgs {
    /// Task file with the prompt (tasks/imdb.toml, ...).
    #[arg(long)]
    task: String,
    /// JSONL with {"id", "text"} per line, or plain text lines; `-` for stdin.
    #[arg(long, default_value = "-")]
    input: String,
    /// JSONL output, one record per input line; `-` for stdout.
    #[arg(long, default_value = "-")]
    output: String,
    /// `openai`: an OpenAI-compatible chat-completions API. `local`: a GGUF
    /// model (Gemma 3) on this machine, asked with the task's few-shot prompt.
    #[arg(long, value_enum, default_value = "openai")]
    expert: LabelExpert,
    /// Local expert: the GGUF file.
    #[arg(long, default_value = DEFAULT_MODEL)]
    local_model: PathBuf,
    /// Local expert: texts are cut to this many tokens.
    #[arg(long, default_value_t = 384)]
    max_text_tokens: usize,
    /// Expert settings as TOML (the fields of the chat-completions expert);
    /// flags below override it.
    #[arg(long)]
    expert_config: Option<PathBuf>,
    /// OpenAI-compatible endpoint, e.g. http://127.0.0.1:8080/v1.
    #[arg(long)]
    base_url: Option<String>,
    #[arg(long)]
    model: Option<String>,
    /// Environment variable holding the API key (never logged).
    #[arg(long)]
    api_key_env: Option<String>,
    /// Requests in flight at once.
    #[arg(long)]
    concurrency: Option<usize>,
    #[arg(long)]
    requests_per_minute: Option<u32>,
    #[arg(long)]
    tokens_per_minute: Option<u32>,
    /// Per-request timeout in seconds.
    #[arg(long)]
    timeout: Option<f64>,
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Ask for logprobs and report a probability per label.
    #[arg(long)]
    logprobs: bool,
    /// Response cache (append-only JSONL). Default: .cache/responses/<model>.jsonl.
    #[arg(long)]
    cache: Option<PathBuf>,
    /// Lines handed to the expert at once (memory bound; order is kept).
    #[arg(long, default_value_t = 256)]
    chunk: usize,
    /// Longer lines get a bad_input record and are never held whole.
    #[arg(long, default_value_t = DEFAULT_MAX_LINE_BYTES)]
    max_line_bytes: usize,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum LabelExpert {
    Openai,
    Local,
}

fn expert_config(args: &LabelArgs) -> Result<OpenAiConfig> {
    let mut config = cascade_runtime::experts::openai_config(
        args.expert_config.as_deref(),
        args.base_url.as_deref(),
        args.model.as_deref(),
    )?;
    if let Some(v) = &args.api_key_env {
        config.api_key_env = v.clone();
    }
    if let Some(v) = args.concurrency {
        config.concurrency = v;
    }
    if let Some(v) = args.requests_per_minute {
        config.requests_per_minute = Some(v);
    }
    if let Some(v) = args.tokens_per_minute {
        config.tokens_per_minute = Some(v);
    }
    if let Some(v) = args.timeout {
        config.timeout_secs = v;
    }
    if let Some(v) = args.max_attempts {
        config.max_attempts = v;
    }
    config.logprobs |= args.logprobs;
    if let Some(v) = &args.cache {
        config.cache = Some(v.clone());
    }
    if config.cache.is_none() {
        config.cache = Some(default_cache(&config.model));
    }
    Ok(config)
}

/// .cache/responses/<model, as a file name>.jsonl
fn default_cache(model: &str) -> PathBuf {
    let name: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from(".cache/responses").join(format!("{name}.jsonl"))
}

pub fn run(args: &LabelArgs) -> Result<()> {
    let task = Task::load(&args.task)?;
    match args.expert {
        LabelExpert::Openai => {
            let expert = OpenAiExpert::new(expert_config(args)?, task.clone())?;
            label_stream(args, &task, &expert)
        }
        LabelExpert::Local => {
            let model_name = args
                .local_model
                .file_name()
                .map(|n| format!("local-{}", n.to_string_lossy()))
                .unwrap_or_else(|| "local".into());
            let config = LocalConfig {
                model: args.local_model.clone(),
                max_text_tokens: args.max_text_tokens,
                cache: Some(
                    args.cache
                        .clone()
                        .unwrap_or_else(|| default_cache(&model_name)),
                ),
                ..LocalConfig::default()
            };
            let expert = LocalExpert::load(&config, task.clone()).with_context(|| {
                format!("loading the local expert {}", args.local_model.display())
            })?;
            label_stream(args, &task, &expert)
        }
    }
}

/// Labels the input with `expert`, chunk by chunk, and writes one record per
/// input line.
fn label_stream(args: &LabelArgs, task: &Task, expert: &dyn Expert) -> Result<()> {
    anyhow::ensure!(
        args.max_line_bytes > 0,
        "--max-line-bytes must be at least 1"
    );
    let (reader, total): (Box<dyn BufRead>, u64) = match args.input.as_str() {
        "-" => (Box::new(std::io::stdin().lock()), 0),
        path => (
            Box::new(BufReader::new(
                File::open(path).with_context(|| format!("opening {path}"))?,
            )),
            count_lines(Path::new(path)).with_context(|| format!("reading {path}"))?,
        ),
    };
    let mut input = LineReader::new(reader, args.max_line_bytes);
    let mut output: Box<dyn Write> = match args.output.as_str() {
        "-" => Box::new(BufWriter::new(std::io::stdout().lock())),
        path => Box::new(BufWriter::new(
            File::create(path).with_context(|| format!("creating {path}"))?,
        )),
    };
    let runtime = cascade_runtime::async_runtime()?;
    let mut progress = Progress::new(total, "lines labelled");
    let chunk = args.chunk.max(1);
    let (mut ok, mut failed) = (0u64, 0u64);
    loop {
        let mut items = Vec::new();
        while items.len() < chunk {
            let Some(raw) = input.next_line().context("reading the input")? else {
                break;
            };
            let line = input.lines as usize;
            items.push((line, read_item(line, raw, args.max_line_bytes)));
        }
        if items.is_empty() {
            break;
        }
        // The texts move to the expert: each line is held once.
        let texts: Vec<String> = items
            .iter_mut()
            .filter_map(|(_, item)| item.as_mut().ok().map(|i| std::mem::take(&mut i.text)))
            .collect();
        let mut answers = runtime.block_on(label_all(expert, &texts)).into_iter();
        drop(texts);
        for (line, item) in items {
            let (id, outcome) = match item {
                Err(reason) => {
                    failed += 1;
                    (
                        ItemId::null(),
                        json!({"label": null, "status": "bad_input", "error": reason}),
                    )
                }
                Ok(item) => match answers.next() {
                    Some(Ok(answer)) => {
                        ok += 1;
                        (
                            item.id,
                            json!({"label": task.labels()[answer.label], "probs": answer.probs,
                                   "status": "ok", "cached": answer.cached}),
                        )
                    }
                    Some(Err(e)) => {
                        failed += 1;
                        (
                            item.id,
                            json!({"label": null, "status": "error", "error": e.to_string()}),
                        )
                    }
                    None => anyhow::bail!("the expert returned fewer answers than items"),
                },
            };
            // The id exactly as the input wrote it: a Value would round ids
            // beyond 64 bits.
            let record = Record {
                line: Some(line),
                id: &id,
                fields: outcome,
            };
            serde_json::to_writer(&mut output, &record)?;
            output.write_all(b"\n")?;
            progress.inc(1);
        }
        output.flush()?;
        let usage = expert.usage();
        progress.set_message(format!(
            "{} requests, {} cached, {} retries",
            usage.requests, usage.cache_hits, usage.retries
        ));
    }
    progress.finish();
    let usage = expert.usage();
    eprintln!(
        "{ok} labelled, {failed} without a label; {} requests ({} retries), {} from the cache, {} prompt + {} completion tokens",
        usage.requests, usage.retries, usage.cache_hits, usage.prompt_tokens, usage.completion_tokens
    );
    Ok(())
}
