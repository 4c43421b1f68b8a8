//! The live view of a rollout: event lines on stdout (sentences, or one JSON document a line
//! with `--output json`), and a progress line on stderr, redrawn in place on a terminal and
//! written every few seconds otherwise, so logs stay readable.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::output::Output;

/// How often a progress line is written when stderr is not a terminal.
const PLAIN_PROGRESS_EVERY: Duration = Duration::from_secs(5);

/// Where a rollout's events and progress go.
#[derive(Debug)]
pub struct View {
    out: Output,
    terminal: bool,
    /// A progress line is on the terminal and must be cleared before other output.
    drawn: bool,
    last_plain: Option<Instant>,
    last_json_progress: Option<String>,
}

impl View {
    /// A view for `out`; progress is redrawn when stderr is a terminal.
    pub fn new(out: Output) -> View {
        View {
            out,
            terminal: std::io::stderr().is_terminal(),
            drawn: false,
            last_plain: None,
            last_json_progress: None,
        }
    }

    /// Whether JSON was asked for.
    pub fn json(&self) -> bool {
        self.out.json()
    }

    fn clear(&mut self) {
        if self.drawn {
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K");
            let _ = err.flush();
            self.drawn = false;
        }
    }

    /// An event: `json` (with its `event` field) in JSON mode, `human` otherwise.
    pub fn event(&mut self, json: &Value, human: impl AsRef<str>) {
        self.clear();
        if self.out.json() {
            self.out.json_line(json);
        } else {
            self.out.line(human);
        }
    }

    /// More human lines (nothing in JSON mode).
    pub fn lines<I: IntoIterator<Item = String>>(&mut self, lines: I) {
        self.clear();
        for line in lines {
            self.out.line(line);
        }
    }

    /// The current progress. JSON mode writes a `progress` event when `json` changed; human
    /// mode redraws `human` on a terminal, else writes it every few seconds.
    pub fn progress(&mut self, json: &Value, human: &str) {
        if self.out.json() {
            let text = json.to_string();
            if self.last_json_progress.as_ref() != Some(&text) {
                self.out.json_line(json);
                self.last_json_progress = Some(text);
            }
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.terminal {
            let _ = write!(err, "\r\x1b[K{human}");
            let _ = err.flush();
            self.drawn = true;
        } else if self
            .last_plain
            .is_none_or(|t| t.elapsed() >= PLAIN_PROGRESS_EVERY)
        {
            let _ = writeln!(err, "{human}");
            self.last_plain = Some(Instant::now());
        }
    }

    /// Clears the progress line (before the final summary).
    pub fn done(&mut self) {
        self.clear();
    }
}
