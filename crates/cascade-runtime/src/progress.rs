//! Progress on long work: a bar on a terminal, and a plain line every tenth of
//! the way otherwise, so logs of background runs and CI show it too.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    len: u64,
    done: u64,
    next_line: u64,
    message: String,
    started: Instant,
}

impl Progress {
    /// `what` names the work, e.g. "items" or "texts encoded".
    pub fn new(len: u64, what: &str) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(len);
            let template =
                format!("{{bar:40}} {{pos}}/{{len}} {what} {{per_sec}} eta {{eta}} {{msg}}");
            if let Ok(style) = ProgressStyle::with_template(&template) {
                bar.set_style(style);
            }
            bar
        });
        Self {
            bar,
            what: what.to_string(),
            len,
            done: 0,
            next_line: len / 10,
            message: String::new(),
            started: Instant::now(),
        }
    }

    /// Shows nothing: for runs whose caller reports progress itself.
    pub fn hidden() -> Self {
        Self {
            bar: None,
            what: String::new(),
            len: 0,
            done: 0,
            next_line: 0,
            message: String::new(),
            started: Instant::now(),
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(bar) => bar.inc(n),
            None if self.done >= self.next_line.max(1) && self.done < self.len => {
                self.next_line += (self.len / 10).max(1);
                eprintln!(
                    "{}/{} {} ({:.0} s) {}",
                    self.done,
                    self.len,
                    self.what,
                    self.started.elapsed().as_secs_f64(),
                    self.message
                );
            }
            None => {}
        }
    }

    pub fn set_message(&mut self, message: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(message.clone());
        }
        self.message = message;
    }

    pub fn finish(self) {
        if let Some(bar) = self.bar {
            bar.finish_and_clear();
        }
    }
}
