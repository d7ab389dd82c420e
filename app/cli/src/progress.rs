//! [`Bar`]: the terminal side of [`loupe_store::Progress`] — an indicatif bar on stderr (drawn
//! only when stderr is a terminal) whose `{prefix}` is the stage and `{msg}` the job's message;
//! notes are printed above it.

use std::sync::Mutex;

use indicatif::{ProgressBar, ProgressStyle};
use loupe_store::Progress;

pub struct Bar {
    bar: ProgressBar,
    /// Printed once, when the first count arrives (so that a job refused before its first step
    /// prints only its error line).
    banner: Mutex<Option<String>>,
}

impl Bar {
    /// A bar drawn with indicatif's `template`.
    pub fn new(template: &str) -> Bar {
        let bar =
            ProgressBar::new(0).with_style(ProgressStyle::with_template(template).expect("valid template"));
        Bar { bar, banner: Mutex::new(None) }
    }

    /// Print `banner` when the first count arrives.
    pub fn with_banner(self, banner: String) -> Bar {
        *self.banner.lock().unwrap_or_else(|e| e.into_inner()) = Some(banner);
        self
    }

    /// The indicatif bar (to print other lines above it).
    pub fn indicatif(&self) -> &ProgressBar {
        &self.bar
    }
}

impl Progress for Bar {
    fn stage(&self, name: &str) {
        self.bar.set_prefix(name.to_string());
        self.bar.set_position(0);
    }

    fn set(&self, done: u64, total: u64) {
        if let Some(banner) = self.banner.lock().unwrap_or_else(|e| e.into_inner()).take() {
            self.note(&banner);
        }
        self.bar.set_length(total);
        self.bar.set_position(done);
    }

    fn message(&self, text: &str) {
        self.bar.set_message(text.to_string());
    }

    fn note(&self, line: &str) {
        self.bar.suspend(|| eprintln!("{line}"));
    }
}
