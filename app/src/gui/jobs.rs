//! Work off the UI thread: a [`Job`] runs one computation on its own thread and the UI polls it
//! each frame; a [`Progress`] is what the job reports while it runs (it implements
//! [`loupe_store::Progress`], so a job can hand it to a capture, training or analysis). Panics in a
//! job become its error, so a bug shows as a message in the UI rather than a crash.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What a running job reports: a stage name and, when it knows them, done/total counts.
#[derive(Default)]
pub struct Progress {
    stage: Mutex<String>,
    done: AtomicU64,
    total: AtomicU64,
}

impl Progress {
    pub fn stage(&self, stage: impl Into<String>) {
        *self.stage.lock().unwrap_or_else(|e| e.into_inner()) = stage.into();
        self.done.store(0, Ordering::Relaxed);
        self.total.store(0, Ordering::Relaxed);
    }

    /// Stage text and the fraction done, when known.
    pub fn read(&self) -> (String, Option<f32>) {
        let stage = self.stage.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let (done, total) = (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed));
        (stage, (total > 0).then(|| done as f32 / total as f32))
    }
}

/// The app's side of the pipeline's progress: the stage's text and fraction under the spinner
/// (messages and notes are not shown).
impl loupe_store::Progress for Progress {
    fn stage(&self, name: &str) {
        Progress::stage(self, name);
    }

    fn set(&self, done: u64, total: u64) {
        self.done.store(done, Ordering::Relaxed);
        self.total.store(total, Ordering::Relaxed);
    }
}

/// A computation running on its own thread.
pub struct Job<T> {
    rx: Receiver<Result<T, String>>,
    progress: Arc<Progress>,
}

impl<T: Send + 'static> Job<T> {
    /// Start `work` on a new thread; `ctx` is asked to repaint when it ends.
    pub fn spawn(
        ctx: &egui::Context,
        stage: &str,
        work: impl FnOnce(&Progress) -> anyhow::Result<T> + Send + 'static,
    ) -> Job<T> {
        let (tx, rx) = channel();
        let progress = Arc::new(Progress::default());
        progress.stage(stage);
        let (p, ctx) = (progress.clone(), ctx.clone());
        std::thread::spawn(move || {
            let result = match catch_unwind(AssertUnwindSafe(|| work(&p))) {
                Ok(Ok(value)) => Ok(value),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(panic) => Err(format!("internal error (please report): {}", panic_text(&panic))),
            };
            let _ = tx.send(result);
            ctx.request_repaint();
        });
        Job { rx, progress }
    }

    /// The result once the job has ended.
    pub fn poll(&self) -> Option<Result<T, String>> {
        match self.rx.try_recv() {
            Ok(r) => Some(r),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err("the background job ended without a result".into())),
        }
    }

    pub fn progress(&self) -> &Progress {
        &self.progress
    }
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "a panic with no message".into())
}

/// A value computed in the background: not asked for, being computed, ready, or failed.
#[derive(Default)]
pub enum Loading<T> {
    #[default]
    Idle,
    Running(Job<T>),
    Ready(T),
    Failed(String),
}

impl<T: Send + 'static> Loading<T> {
    pub fn start(
        ctx: &egui::Context,
        stage: &str,
        work: impl FnOnce(&Progress) -> anyhow::Result<T> + Send + 'static,
    ) -> Loading<T> {
        Loading::Running(Job::spawn(ctx, stage, work))
    }

    /// Move a finished job's result in; returns true when it changed this frame.
    pub fn poll(&mut self) -> bool {
        let Loading::Running(job) = self else { return false };
        match job.poll() {
            Some(Ok(v)) => *self = Loading::Ready(v),
            Some(Err(e)) => *self = Loading::Failed(e),
            None => return false,
        }
        true
    }

    pub fn ready(&self) -> Option<&T> {
        match self {
            Loading::Ready(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_running(&self) -> bool {
        matches!(self, Loading::Running(_))
    }

    /// A spinner with the job's stage and a progress bar while it runs (and a repaint soon, to
    /// poll again), or the error in red when it failed.
    pub fn status_ui(&self, ui: &mut egui::Ui) {
        match self {
            Loading::Running(job) => {
                let (stage, fraction) = job.progress().read();
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label(stage);
                    if let Some(f) = fraction {
                        ui.add(egui::ProgressBar::new(f).desired_width(160.0).show_percentage());
                    }
                });
                ui.ctx().request_repaint_after(Duration::from_millis(100));
            }
            Loading::Failed(e) => error_ui(ui, e),
            _ => {}
        }
    }
}

/// One error line in the UI's error colour.
pub fn error_ui(ui: &mut egui::Ui, message: &str) {
    ui.colored_label(ui.visuals().error_fg_color, format!("Error: {message}"));
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn a_job_shows_what_the_pipeline_reports() {
        let progress = Progress::default();
        let report: &dyn loupe_store::Progress = &progress;
        report.stage("encoding");
        report.set(1, 4);
        report.message("not shown");
        assert_eq!(progress.read(), ("encoding".to_string(), Some(0.25)));
        report.stage("examples");
        assert_eq!(progress.read(), ("examples".to_string(), None));
    }
}
