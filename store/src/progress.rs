//! [`Progress`]: how a long job (capture, training, analysis, verification, auto-interp) reports
//! how far it has got, whoever shows it — a progress bar in the `loupe` command, the status line
//! of a background job in the desktop app, or nobody (`&()`, e.g. in tests).

/// What a long job reports while it runs: the stage it is in, how far that stage has got, and
/// lines worth keeping. Methods take `&self` (implementations keep their state in atomics or
/// locks), so one value can follow a job whose work runs on several threads.
pub trait Progress: Sync {
    /// A new stage begins (e.g. "encoding", "examples"); its count is unknown until [`set`](Progress::set).
    fn stage(&self, name: &str);

    /// `done` of `total` units (tokens, bytes, features) of the current stage.
    fn set(&self, done: u64, total: u64);

    /// A short status beside the count (rate, loss); replaces the previous one.
    fn message(&self, text: &str) {
        let _ = text;
    }

    /// A line worth keeping (a terminal prints it above its bar).
    fn note(&self, line: &str) {
        let _ = line;
    }
}

/// Reports to nobody.
impl Progress for () {
    fn stage(&self, _: &str) {}

    fn set(&self, _: u64, _: u64) {}
}
