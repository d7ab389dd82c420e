//! `loupe bench gui --case experts`: the Experts view on a synthetic entry of `--experts` experts
//! (default 65,536; [`loupe_app::gui::experts_synthetic`]) written to a temporary store — the time
//! to open it, then frames scrolling the usage bars (with a jump deep into the list half-way),
//! hovering the co-activation heatmap cell by cell, and selecting a different expert every frame
//! (its panel drawn anew), against the 8 ms target of the feature list.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use loupe_app::gui::experts_synthetic::synthetic;
use loupe_app::gui::navigation::Item;
use loupe_app::gui::{LoupeApp, Options, Tab};
use loupe_store::Store;

use super::{Driver, FRAME_TARGET_MS, WARM_UP, ms, report, report_against, thread_cpu, wheel};

/// The entry's name in the temporary store.
const NAME: &str = "synthetic";
/// The pointer over the usage bars (left panel).
const OVER_BARS: egui::Pos2 = egui::pos2(190.0, 500.0);

/// One frame: its wall time, and this thread's CPU time.
fn timed(
    driver: &mut Driver,
    app: &mut LoupeApp,
    pointer: egui::Pos2,
    events: Vec<egui::Event>,
) -> (Duration, Duration) {
    let cpu = thread_cpu();
    let wall = driver.frame(app, pointer, events);
    (wall, thread_cpu().saturating_sub(cpu))
}

/// Run the case; returns the worst p99 of its frames (ms).
pub fn experts_case(n: u32, frames: usize) -> Result<f64> {
    let tmp = tempfile::tempdir()?;
    let path = tmp.path().join("store");
    let started = Instant::now();
    let (tables, entry) = synthetic(n);
    Store::create(&path)?.write_experts(NAME, &tables, entry)?;
    println!(
        "experts: {n} synthetic experts ({} co-activation rows, {} token rows) written in {:.1} ms",
        tables.coactivation.len(),
        tables.vocab.len(),
        ms(started.elapsed())
    );
    drop(tables);

    // Open: from nothing to the first frame showing the bars (the tables are read and indexed,
    // and the heatmap's matrix built, on a background thread).
    let mut driver = Driver::new();
    let options = Options {
        store: path.clone(),
        view: Some(Tab::Experts),
        experts: Some(NAME.into()),
        ..Default::default()
    };
    let started = Instant::now();
    let mut app = LoupeApp::new(options);
    let mut loading = 0;
    while app.experts_view().experts().is_none() || app.experts_view().rows_drawn == 0 {
        if let Some(e) = app.error() {
            bail!("the app failed to open {}: {e}", path.display());
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the Experts view did not show {NAME} in 2 minutes");
        }
        if loading > 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        driver.frame(&mut app, OVER_BARS, Vec::new());
        loading += 1;
    }
    let open = started.elapsed();
    let first = driver.frame(&mut app, OVER_BARS, Vec::new());
    println!(
        "experts open: {:.1} ms to the first frame with the bars ({loading} frames; the next frame {:.2} ms)",
        ms(open),
        ms(first)
    );

    // Scrolling the bars.
    let total = WARM_UP + frames;
    let (mut scroll, mut cpu) = (Vec::with_capacity(frames), Vec::with_capacity(3 * frames));
    let mut most_rows = 0;
    for i in 0..total {
        let step = if i == WARM_UP + frames / 2 { -(n as f32) * 9.0 } else { -60.0 };
        let (t, c) = timed(&mut driver, &mut app, OVER_BARS, vec![wheel(step)]);
        most_rows = most_rows.max(app.experts_view().rows_drawn);
        if i >= WARM_UP {
            scroll.push(t);
            cpu.push(c);
        }
    }
    if most_rows == 0 || most_rows > 200 {
        bail!("the bars drew {most_rows} rows in a frame (expected only the rows in view)");
    }

    // Hovering the heatmap, a different cell every frame.
    let Some(rect) = app.experts_view().heatmap_rect else { bail!("the heatmap was not drawn") };
    let k = app.experts_view().experts().map_or(0, |e| e.heatmap.len());
    let mut hover = Vec::with_capacity(frames);
    for i in 0..total {
        let (x, y) = ((i * 37 % 997) as f32 / 997.0, (i * 53 % 991) as f32 / 991.0);
        let at = rect.min + egui::vec2(x * rect.width(), y * rect.height());
        let (t, c) = timed(&mut driver, &mut app, at, Vec::new());
        if i >= WARM_UP {
            hover.push(t);
            cpu.push(c);
        }
    }

    // Selecting a different expert every frame.
    let mut select = Vec::with_capacity(frames);
    for i in 0..total {
        let expert = ((i as u64 * 7919) % n as u64) as u32;
        app.open_item(Item::Expert { source: NAME.into(), expert });
        let (t, c) = timed(&mut driver, &mut app, OVER_BARS, Vec::new());
        if i >= WARM_UP {
            select.push(t);
            cpu.push(c);
        }
    }
    if app.current_expert().map(|(_, e)| e) != Some(((total as u64 - 1) * 7919 % n as u64) as u32) {
        bail!("the last expert selected is not shown ({:?})", app.current_expert());
    }
    println!(
        "experts: {n} experts, a {k}×{k} heatmap, at most {most_rows} bar rows laid out a frame; {frames} frames \
         each (after {WARM_UP} warm-up frames), 1400×900 points, CPU time of run_ui + tessellate"
    );
    // On a machine shared with other work the wall time includes waiting for a core: the
    // thread's own CPU time over all three is shown too.
    report_against("experts frame (this thread's CPU time)", &cpu, FRAME_TARGET_MS);
    let worst = [
        report("experts scroll frame", &scroll),
        report("experts heatmap hover frame", &hover),
        report("experts select frame", &select),
    ]
    .into_iter()
    .fold(0.0, f64::max);
    println!(
        "gui experts frame p99: {worst:.2} ms, ratio {:.2} vs {FRAME_TARGET_MS} ms target",
        FRAME_TARGET_MS / worst
    );
    Ok(worst)
}
