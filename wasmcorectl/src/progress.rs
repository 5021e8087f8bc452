//! A progress line on stderr for long work, on a terminal only: what is happening and for
//! how long, redrawn in place (indicatif), cleared when done. Off a terminal nothing is
//! printed.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

/// A live progress line; cleared on drop.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// Show `what` with the elapsed time while the value lives (a no-op off a terminal).
    pub fn start(what: impl Into<String>) -> Progress {
        if !std::io::stderr().is_terminal() {
            return Progress {
                bar: ProgressBar::hidden(),
            };
        }
        let bar = ProgressBar::new_spinner();
        if let Ok(style) = ProgressStyle::with_template("{msg} {elapsed_precise}") {
            bar.set_style(style);
        }
        bar.set_message(what.into());
        bar.enable_steady_tick(Duration::from_millis(100));
        Progress { bar }
    }

    /// Change what is shown (the elapsed time keeps counting).
    pub fn set(&self, what: impl Into<String>) {
        self.bar.set_message(what.into());
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
