//! The `loupe` crate's library part: the egui desktop app (`loupe gui`), kept apart from the
//! headless subcommands in `main.rs` so that the GUI tests (egui_kittest) and the GUI benchmark
//! can drive it without a window.

pub mod gui;
