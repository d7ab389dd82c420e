//! Phase timings of a Monet training step, for profiling: with `LOUPE_MONET_PHASES` set, each
//! step prints one line to stderr with the milliseconds spent in each phase since the previous
//! mark (marks are set on the thread that drives the step). Unset, a mark only reads a flag.

use std::cell::RefCell;
use std::sync::OnceLock;
use std::time::Instant;

fn on() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("LOUPE_MONET_PHASES").is_some())
}

/// When the current phase began (`None`: no step is being timed), and the phases so far.
type Marks = (Option<Instant>, Vec<(&'static str, f64)>);

thread_local! {
    static MARKS: RefCell<Marks> = const { RefCell::new((None, Vec::new())) };
}

/// Starts a step's timings.
pub fn start() {
    if on() {
        MARKS.with_borrow_mut(|(t, v)| {
            *t = Some(Instant::now());
            v.clear();
        });
    }
}

/// Ends phase `name` (it ran since the previous mark or [`start`]).
pub fn mark(name: &'static str) {
    if on() {
        MARKS.with_borrow_mut(|(t, v)| {
            if let Some(last) = t {
                let now = Instant::now();
                v.push((name, (now - *last).as_secs_f64() * 1e3));
                *t = Some(now);
            }
        });
    }
}

/// Prints the step's phases.
pub fn report() {
    if on() {
        MARKS.with_borrow_mut(|(t, v)| {
            let total: f64 = v.iter().map(|p| p.1).sum();
            let parts: Vec<String> = v.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
            eprintln!("monet step {total:.1} ms: {}", parts.join(", "));
            *t = None;
        });
    }
}
