//! What a replay prints and logs: the per-item CSV and the summary table.

use std::path::Path;

use anyhow::{Context, Result};
use cascade::{AnsweredBy, Summary};
use cascade_expert::Item;
use cascade_expert::Task;

use super::replay::ItemRecord;

pub struct ItemLog {
    writer: csv::Writer<std::fs::File>,
    levels: Vec<String>,
}

impl ItemLog {
    pub fn create(path: &Path, levels: &[String]) -> Result<Self> {
        let mut writer =
            csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
        let mut header: Vec<String> = [
            "position",
            "id",
            "answered_by",
            "prediction",
            "llm_label",
            "gold",
            "probability",
        ]
        .map(String::from)
        .to_vec();
        header.extend(levels.iter().map(|name| format!("gate_{name}")));
        writer.write_record(&header)?;
        Ok(Self {
            writer,
            levels: levels.to_vec(),
        })
    }

    pub fn write(
        &mut self,
        position: usize,
        item: &Item,
        record: &ItemRecord,
        task: &Task,
    ) -> Result<()> {
        let label = |l: Option<usize>| l.map(|l| task.labels()[l].clone()).unwrap_or_default();
        let answered_by = match record.by {
            AnsweredBy::Level(j) => self.levels[j].clone(),
            AnsweredBy::Llm => "llm".into(),
        };
        let mut row = vec![
            position.to_string(),
            item.id.to_string(),
            answered_by,
            label(record.prediction),
            label(item.expert),
            label(item.gold),
            record
                .probability
                .map(|p| p.to_string())
                .unwrap_or_default(),
        ];
        for j in 0..self.levels.len() {
            let gate = record.gate_outputs.get(j).copied().flatten();
            row.push(gate.map(|g| g.to_string()).unwrap_or_default());
        }
        self.writer.write_record(&row)?;
        Ok(())
    }

    pub fn finish(mut self) -> Result<()> {
        self.writer.flush()?;
        Ok(())
    }
}

pub fn print_table(data: &Path, s: &Summary) {
    let fmt = |x: Option<f64>| x.map(|v| format!("{v:.5}")).unwrap_or_else(|| "-".into());
    println!(
        "{}: {} items, {} LLM calls ({:.2}%), accuracy {} (LLM alone {}), agreement with LLM {}",
        data.display(),
        s.items,
        s.llm_calls,
        100.0 * s.llm_fraction,
        fmt(s.accuracy),
        fmt(s.llm_accuracy),
        fmt(s.agreement_with_llm)
    );
    if s.recall.is_some() {
        println!(
            "label 1: precision {}  recall {}  f1 {}",
            fmt(s.precision),
            fmt(s.recall),
            fmt(s.f1)
        );
    }
    println!(
        "{:<12} {:>9} {:>8} {:>9}",
        "answered by", "items", "share", "accuracy"
    );
    for level in &s.per_level {
        println!(
            "{:<12} {:>9} {:>7.2}% {:>9}",
            level.name,
            level.answered,
            100.0 * level.answered as f64 / s.items.max(1) as f64,
            fmt(level.accuracy)
        );
    }
}
