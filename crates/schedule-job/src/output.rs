//! Where things are printed: results on stdout (human text or JSON), progress and notes on stderr.

use std::io::Write;

use serde::Serialize;

use crate::cli::OutputFormat;

/// Prints results in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Output {
    /// Human text or JSON.
    pub format: OutputFormat,
    /// Written before every human line (empty for the binary; the one-process tutorial uses it
    /// to tell the job service's output from the device's).
    pub label: &'static str,
}

impl Output {
    /// Whether JSON was asked for.
    pub fn json(&self) -> bool {
        self.format == OutputFormat::Json
    }

    /// Prints a line of human output to stdout (nothing in JSON mode).
    pub fn line(&self, text: impl AsRef<str>) {
        if !self.json() {
            let mut out = std::io::stdout().lock();
            // A closed stdout (e.g. `| head`) is not worth failing over.
            let _ = writeln!(out, "{}{}", self.label, text.as_ref());
        }
    }

    /// Prints one compact JSON document on its own line (JSON mode only).
    pub fn json_line<T: Serialize + ?Sized>(&self, value: &T) {
        if self.json() {
            let mut out = std::io::stdout().lock();
            if let Ok(text) = serde_json::to_string(value) {
                let _ = writeln!(out, "{text}");
            }
        }
    }

    /// Prints one pretty JSON document (JSON mode only).
    pub fn document<T: Serialize + ?Sized>(&self, value: &T) {
        if self.json() {
            let mut out = std::io::stdout().lock();
            if let Ok(text) = serde_json::to_string_pretty(value) {
                let _ = writeln!(out, "{text}");
            }
        }
    }
}

/// A note for the operator on stderr (both formats).
pub fn note(text: impl AsRef<str>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "{}", text.as_ref());
}
