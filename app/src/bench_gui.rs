//! `loupe bench gui`: the desktop app's frame time on a synthetic store of `--features` features
//! (default 1,000,000) — scrolling the feature list, redrawing a feature page, opening pages — and
//! the time to open that store, against the targets (p99 < 8 ms a frame, < 1 s to open); and the
//! Graph view panning and zooming a synthetic attribution graph of 100,000 nodes and 1,000,000
//! edges (p99 < 16 ms a frame); and the Experts view on 65,536 synthetic experts (p99 < 8 ms a
//! frame; `bench_gui_experts.rs`).
//!
//! The app is driven headlessly, as eframe drives it but with no window: each frame is one
//! `Context::run_ui` (layout and the app's code) plus `Context::tessellate` (shapes to meshes),
//! timed together as the frame's CPU time; only the GPU upload and the painting are left out.
//! Input is a 1400 × 900 screen with the pointer over the list (or the page), a mouse wheel step
//! of 60 points a frame, and clock time advancing 1/60 s a frame.

use std::collections::HashSet;
use std::hint::black_box;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use egui::{Event, MouseWheelSource, MouseWheelUnit, Pos2, RawInput, Rect, TouchPhase, pos2, vec2};
use loupe_app::gui::data::DictData;
use loupe_app::gui::jobs::Progress;
use loupe_app::gui::{LoupeApp, Options};
use loupe_store::{FeatureTables, Store};

use loupe_cli::bench::synthetic_store::{self, DICT};

#[path = "bench_gui_experts.rs"]
mod experts;

#[derive(clap::Args)]
pub struct Args {
    /// Features in the synthetic dictionary.
    #[arg(long, default_value_t = 1_000_000)]
    features: u32,
    /// Where the synthetic store lives (reused when it is complete; default:
    /// ~/.cache/loupe/bench-gui-<features>).
    #[arg(long)]
    store: Option<PathBuf>,
    /// Frames timed in each measurement (after 10 warm-up frames).
    #[arg(long, default_value_t = 600)]
    frames: usize,
    /// Which cases to run: the feature list and pages, the attribution graph, the Experts view,
    /// or all.
    #[arg(long, value_enum, default_value = "all")]
    case: Case,
    /// Where the synthetic attribution graph lives (reused when complete; default:
    /// ~/.cache/loupe/bench-gui-graph).
    #[arg(long)]
    graph_store: Option<PathBuf>,
    /// Experts in the synthetic experts entry (the Experts view's case).
    #[arg(long, default_value_t = 65_536)]
    experts: u32,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
enum Case {
    All,
    Features,
    Graph,
    Experts,
}

const WARM_UP: usize = 10;
const FRAME_TARGET_MS: f64 = 8.0;
const GRAPH_FRAME_TARGET_MS: f64 = 16.0;
const OPEN_TARGET_MS: f64 = 1000.0;
/// The pointer over the feature list (left panel) and over the feature page (central panel).
const OVER_LIST: Pos2 = pos2(250.0, 500.0);
const OVER_PAGE_X: f32 = 1000.0;

/// An egui context driven frame by frame without a window.
struct Driver {
    ctx: egui::Context,
    time: f64,
    /// The features whose list row was drawn (checked between the timed parts of a frame).
    rows_seen: HashSet<u32>,
    /// The feature page heading drawn last.
    heading: Option<String>,
}

impl Driver {
    fn new() -> Driver {
        Driver { ctx: egui::Context::default(), time: 0.0, rows_seen: HashSet::new(), heading: None }
    }

    /// Note the list rows and the page heading among `shapes`.
    fn watch(&mut self, shapes: &[egui::epaint::ClippedShape]) {
        fn visit(d: &mut Driver, shape: &egui::Shape) {
            match shape {
                egui::Shape::Vec(v) => v.iter().for_each(|s| visit(d, s)),
                egui::Shape::Text(t) => {
                    let text = t.galley.text();
                    if let Some(f) = text.strip_prefix("feature ").and_then(|f| f.parse().ok())
                        && t.pos.x < OVER_LIST.x
                    {
                        d.rows_seen.insert(f);
                    }
                    if text.starts_with("Feature ") {
                        d.heading = Some(text.to_string());
                    }
                }
                _ => {}
            }
        }
        for s in shapes {
            visit(self, &s.shape);
        }
    }

    /// One frame with the pointer at `pointer` and `events` after it; returns its CPU time.
    fn frame(&mut self, app: &mut LoupeApp, pointer: Pos2, events: Vec<Event>) -> Duration {
        let mut all = vec![Event::PointerMoved(pointer)];
        all.extend(events);
        let input = RawInput {
            screen_rect: Some(Rect::from_min_size(Pos2::ZERO, vec2(1400.0, 900.0))),
            time: Some(self.time),
            predicted_dt: 1.0 / 60.0,
            events: all,
            focused: true,
            ..Default::default()
        };
        self.time += 1.0 / 60.0;
        let started = Instant::now();
        let output = self.ctx.run_ui(input, |ui| app.show(ui));
        let mut elapsed = started.elapsed();
        let egui::FullOutput { shapes, pixels_per_point, mut textures_delta, .. } = output;
        self.watch(&shapes);
        let started = Instant::now();
        let meshes = self.ctx.tessellate(shapes, pixels_per_point);
        elapsed += started.elapsed();
        black_box(meshes);
        // No painter here to upload font-atlas updates to.
        textures_delta.clear();
        elapsed
    }
}

fn wheel(dy: f32) -> Event {
    Event::MouseWheel {
        unit: MouseWheelUnit::Point,
        delta: vec2(0.0, dy),
        phase: TouchPhase::Move,
        source: MouseWheelSource::Wheel,
        modifiers: Default::default(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// p50 and p99 of frame times in ms.
fn percentiles(times: &[Duration]) -> (f64, f64) {
    let mut v: Vec<f64> = times.iter().map(|&d| ms(d)).collect();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| v[((v.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99))
}

fn report(name: &str, times: &[Duration]) -> f64 {
    report_against(name, times, FRAME_TARGET_MS)
}

fn report_against(name: &str, times: &[Duration], target: f64) -> f64 {
    let (p50, p99) = percentiles(times);
    let max = times.iter().max().map_or(0.0, |&d| ms(d));
    println!("gui {name} p50: {p50:.2} ms, ratio {:.2} vs {target} ms target", target / p50);
    println!("gui {name} p99: {p99:.2} ms, ratio {:.2} vs {target} ms target", target / p99);
    println!("  ({name}: {} frames, max {max:.2} ms)", times.len());
    p99
}

pub fn run(args: &Args) -> Result<()> {
    if args.features < 100 || args.frames < 10 {
        bail!("bench gui: need at least 100 features and 10 frames");
    }
    let graph = match args.case {
        Case::Features | Case::Experts => None,
        Case::All | Case::Graph => Some(graph_case(args)?),
    };
    if matches!(args.case, Case::All | Case::Experts) {
        if args.experts < 2 {
            bail!("bench gui: need at least 2 experts");
        }
        experts::experts_case(args.experts, args.frames)?;
    }
    if matches!(args.case, Case::All | Case::Features) {
        features_case(args)?;
    }
    if let Some(p99) = graph {
        println!(
            "gui graph frame p99: {p99:.2} ms, ratio {:.2} vs {GRAPH_FRAME_TARGET_MS} ms target",
            GRAPH_FRAME_TARGET_MS / p99
        );
    }
    Ok(())
}

/// The feature list and pages on the synthetic dictionary (the headline: `gui frame p99`).
fn features_case(args: &Args) -> Result<()> {
    let path = args
        .store
        .clone()
        .unwrap_or_else(|| loupe_cli::fetch::cache_dir().join(format!("bench-gui-{}", args.features)));
    synthetic_store::ensure(&path, args.features)?;

    // Open: from nothing to the first frame showing the feature list. The dictionary loads on
    // a background thread; the UI draws a frame, then looks again 1 ms later (eframe would wait
    // for the loader's repaint request, at vsync).
    let started = Instant::now();
    let mut driver = Driver::new();
    let options = Options { store: path.clone(), ..Default::default() };
    let mut app = LoupeApp::new(options);
    let created = started.elapsed();
    let mut loading_frames = Vec::new();
    while !app.is_loaded() {
        if let Some(e) = app.error() {
            bail!("the app failed to open {}: {e}", path.display());
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the app did not load {} in 10 minutes", path.display());
        }
        if !loading_frames.is_empty() {
            std::thread::sleep(Duration::from_millis(1));
        }
        loading_frames.push(driver.frame(&mut app, OVER_LIST, Vec::new()));
    }
    let loaded_at = started.elapsed();
    let list_frame = *loading_frames.last().expect("one frame at least");
    let next_frame = driver.frame(&mut app, OVER_LIST, Vec::new());
    let open = started.elapsed();
    // The explanations load on a second thread once the list shows; wait for them (and the
    // frame that sorts again with them) before measuring frames.
    while !app.notes_loaded() {
        if started.elapsed() > Duration::from_secs(600) {
            bail!("the app did not load the explanations of {} in 10 minutes", path.display());
        }
        std::thread::sleep(Duration::from_millis(1));
        driver.frame(&mut app, OVER_LIST, Vec::new());
    }
    let with_notes = driver.frame(&mut app, OVER_LIST, Vec::new());
    let notes_at = started.elapsed();
    // Allocating a million explanations is much slower the first time (fresh pages from the
    // OS) than again (pages the allocator kept): both are shown.
    let (first, again) = (stages(&path)?, stages(&path)?);
    println!(
        "open stages: LoupeApp::new {:.1} ms; loaded seen after {:.1} ms ({} frames); the frame that first \
         drew the list {:.1} ms; the next frame {:.1} ms",
        ms(created),
        ms(loaded_at),
        loading_frames.len(),
        ms(list_frame),
        ms(next_frame)
    );
    println!(
        "explanations in the list after {:.1} ms (read on a second thread once the list shows; the frame \
         that sorted again with them {:.1} ms)",
        ms(notes_at),
        ms(with_notes)
    );
    println!("open stages, timed one by one on this thread: {first}");
    println!("open stages, once more (memory reused): {again}");

    // Scrolling the list: the wheel steadily, one jump deep into the list half-way, steadily on.
    let total = WARM_UP + args.frames;
    let mut scroll = Vec::with_capacity(args.frames);
    for i in 0..total {
        let step = if i == WARM_UP + args.frames / 2 { -(args.features as f32) * 10.0 } else { -60.0 };
        let t = driver.frame(&mut app, OVER_LIST, vec![wheel(step)]);
        if i >= WARM_UP {
            scroll.push(t);
        }
    }

    let (first, last) = (driver.rows_seen.iter().min().copied(), driver.rows_seen.iter().max().copied());
    println!("scrolling drew the rows of {} features (ids {first:?}..={last:?})", driver.rows_seen.len());
    if driver.rows_seen.len() < args.frames {
        bail!("the list did not scroll: it drew only {} rows", driver.rows_seen.len());
    }

    // A feature page: open one with examples, then redraw it with the pointer moving over it.
    let f =
        (args.features / 3..args.features).find(|&f| !synthetic_store::is_dead(f)).expect("a live feature");
    app.open(f);
    let over_page = |i: usize| pos2(OVER_PAGE_X + (i % 7) as f32 * 20.0, 80.0 + (i * 37 % 760) as f32);
    let mut redraw = Vec::with_capacity(args.frames);
    for i in 0..total {
        let t = driver.frame(&mut app, over_page(i), Vec::new());
        if i >= WARM_UP {
            redraw.push(t);
        }
    }
    let heading = driver.heading.take().unwrap_or_default();
    if app.current_feature() != Some(f) || !heading.starts_with(&format!("Feature {f} ")) {
        bail!("the page of feature {f} is not shown (now {:?}, heading {heading:?})", app.current_feature());
    }
    println!("page redraw: {heading:?}");

    // Opening pages: a different feature every frame.
    let mut opening = Vec::with_capacity(args.frames);
    for i in 0..total {
        let g = ((f as u64 + 7919 * (i as u64 + 1)) % args.features as u64) as u32;
        app.open(g);
        let t = driver.frame(&mut app, over_page(i), Vec::new());
        if i >= WARM_UP {
            opening.push(t);
        }
    }

    println!(
        "{} features, {} frames each (after {WARM_UP} warm-up frames), 1400×900 points, CPU time of \
         run_ui + tessellate",
        args.features, args.frames
    );
    let open_ms = ms(open);
    println!(
        "gui open: {open_ms:.1} ms, ratio {:.2} vs {OPEN_TARGET_MS} ms target",
        OPEN_TARGET_MS / open_ms
    );
    let scroll_p99 = report("scroll frame", &scroll);
    let redraw_p99 = report("page redraw frame", &redraw);
    let opening_p99 = report("page open frame", &opening);
    let worst = scroll_p99.max(redraw_p99).max(opening_p99);
    println!(
        "gui frame p99: {worst:.2} ms, ratio {:.2} vs {FRAME_TARGET_MS} ms target",
        FRAME_TARGET_MS / worst
    );
    Ok(())
}

/// The loading stages of a dictionary, timed one by one (the page cache is warm by now).
fn stages(path: &std::path::Path) -> Result<String> {
    let lap = |started: Instant| ms(started.elapsed());
    let t = Instant::now();
    let store = Store::open(path)?;
    let open = lap(t);
    let t = Instant::now();
    let tables = FeatureTables::open(&store, DICT)?;
    let tables_ms = lap(t);
    drop(tables);
    let t = Instant::now();
    let all = store.explanations(DICT)?;
    let explanations = lap(t);
    let t = Instant::now();
    drop(all);
    let drop_ms = lap(t);
    let t = Instant::now();
    let data = DictData::load(&store, DICT, &Progress::default())?;
    data.load_notes(&store);
    let load = lap(t);
    let t = Instant::now();
    drop(data);
    let data_drop = lap(t);
    Ok(format!(
        "Store::open {open:.1} ms, FeatureTables::open {tables_ms:.1} ms, Store::explanations {explanations:.1} ms \
         (dropping them {drop_ms:.1} ms), DictData::load in all {load:.1} ms (dropping it {data_drop:.1} ms)"
    ))
}

/// The Graph view on the synthetic graph of 100,000 nodes and 1,000,000 edges: zoom in about the
/// canvas' centre, drag to pan, zoom out, pan back, over and over; returns the frames' p99 (ms).
fn graph_case(args: &Args) -> Result<f64> {
    use loupe_app::gui::Tab;
    let path =
        args.graph_store.clone().unwrap_or_else(|| loupe_cli::fetch::cache_dir().join("bench-gui-graph"));
    synthetic_store::ensure_graph(&path)?;
    let mut driver = Driver::new();
    let options = Options {
        store: path.clone(),
        view: Some(Tab::Graph),
        graph: Some(synthetic_store::GRAPH.into()),
        ..Default::default()
    };
    let started = Instant::now();
    let mut app = LoupeApp::new(options);
    let first = driver.frame(&mut app, OVER_GRAPH, Vec::new());
    let opened = started.elapsed();
    if app.graph_view().graph_name() != Some(synthetic_store::GRAPH) {
        bail!("the Graph view did not show {} ({:?})", synthetic_store::GRAPH, app.error());
    }
    println!(
        "graph open: {:.1} ms to the first frame (reading the tables and preparing the layout on the UI \
         thread; that frame {:.1} ms)",
        ms(opened),
        ms(first)
    );
    let total = WARM_UP + args.frames;
    let (mut times, mut most) = (Vec::with_capacity(args.frames), loupe_app::gui::graph::Drawn::default());
    let (mut zooms, mut max_zoom) = (0usize, 1f32);
    let mut pointer = OVER_GRAPH;
    let mut frames = Vec::with_capacity(args.frames);
    let mut cpu_times = Vec::with_capacity(args.frames);
    let mut pans = Vec::with_capacity(total);
    for i in 0..total {
        // A cycle of 240 frames: zoom in 60, pan right 60, zoom out 60, pan left 60.
        let phase = i % 240;
        let mut events = Vec::new();
        match phase {
            0..60 => events.push(Event::Zoom(1.06)),
            120..180 => events.push(Event::Zoom(1.0 / 1.06)),
            _ => {
                let step = if phase < 120 { vec2(-6.0, 1.0) } else { vec2(6.0, -1.0) };
                if phase == 60 || phase == 180 {
                    pointer = OVER_GRAPH;
                    events.push(button(pointer, true));
                }
                pointer += step;
                if phase == 119 || phase == 239 {
                    events.push(button(pointer, false));
                }
            }
        }
        let cpu_before = thread_cpu();
        let t = driver.frame(&mut app, pointer, events);
        let cpu = thread_cpu().saturating_sub(cpu_before);
        let view = app.graph_view();
        if view.zoom() > 1.0 {
            zooms += 1;
        }
        max_zoom = max_zoom.max(view.zoom());
        pans.push(view.pan());
        let d = view.drawn;
        most = loupe_app::gui::graph::Drawn {
            nodes: most.nodes.max(d.nodes),
            bins: most.bins.max(d.bins),
            edges: most.edges.max(d.edges),
        };
        if i >= WARM_UP {
            times.push(t);
            frames.push((t, d, view.zoom()));
            cpu_times.push(cpu);
        }
    }
    // The slowest frames and what they drew.
    frames.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (t, d, zoom) in frames.iter().take(3) {
        println!("  slow graph frame: {:.2} ms at zoom {zoom:.1} ({d:?})", ms(*t));
    }
    if zooms < args.frames / 4 || max_zoom < 4.0 {
        bail!("the graph did not zoom (zoom > 1 in {zooms} frames, at most {max_zoom:.1})");
    }
    // Panning: the drags moved the view (beyond what zooming about the pointer does).
    let dragged = pans
        .windows(2)
        .enumerate()
        .filter(|(i, w)| (i + 1) % 240 >= 60 && (i + 1) % 240 < 120 && w[0] != w[1])
        .count();
    if dragged < 30.min(args.frames / 8) {
        bail!("the graph did not pan (the view moved in {dragged} frames of dragging)");
    }
    println!(
        "graph: {} nodes, {} edges; zoom up to {max_zoom:.1}×; at most {} nodes drawn one by one, {} density bins, \
         {} edges in a frame",
        synthetic_store::GRAPH_NODES,
        synthetic_store::GRAPH_EDGES,
        most.nodes,
        most.bins,
        most.edges
    );
    // On a machine shared with other work the wall time includes waiting for a core: the
    // thread's own CPU time is shown too.
    report_against("graph pan/zoom frame (this thread's CPU time)", &cpu_times, GRAPH_FRAME_TARGET_MS);
    Ok(report_against("graph pan/zoom frame", &times, GRAPH_FRAME_TARGET_MS))
}

/// The pointer over the Graph view's canvas (left of its side panel).
const OVER_GRAPH: Pos2 = pos2(520.0, 480.0);

fn button(pos: Pos2, pressed: bool) -> Event {
    Event::PointerButton { pos, button: egui::PointerButton::Primary, pressed, modifiers: Default::default() }
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec into `t`, which outlives the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
}
