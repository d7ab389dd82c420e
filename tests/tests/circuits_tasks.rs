//! The shipped circuit tasks (`assets/tasks/*.jsonl`, written by `assets/tasks/make_tasks.py`)
//! load with Gemma 3 270M's tokenizer through `Task::load`, have the pairs and metric they claim,
//! and the model solves them better than chance on its clean prompts (accuracy: the share of pairs
//! whose clean metric is above 0, printed). Skipped with a message when the GGUF is not in the cache.

use std::path::{Path, PathBuf};

use loupe_analysis::circuits::patch::Runs;
use loupe_analysis::circuits::{Metric, Task};
use loupe_model::tokenizer::Tokenizer;

/// The task files: name, metric, least number of pairs, least clean accuracy of Gemma 3 270M.
const TASKS: [(&str, Metric, usize, f32); 3] = [
    ("ioi.jsonl", Metric::LogitDiff, 100, 0.8),
    ("greater-than.jsonl", Metric::ProbDiff, 100, 0.8),
    ("induction.jsonl", Metric::LogitDiff, 100, 0.8),
];

fn task_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tasks").join(name)
}

/// The default GGUF, or None (with a message) when it has not been fetched.
fn gemma() -> Option<PathBuf> {
    let cache = std::env::var_os("LOUPE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/loupe"));
    let path = cache.join("models/gemma-3-270m-q4_k_m.gguf");
    if path.exists() {
        Some(path)
    } else {
        eprintln!("skipped: {} is missing (run `loupe fetch`)", path.display());
        None
    }
}

#[test]
fn shipped_tasks_load_with_gemmas_tokenizer() {
    let Some(gguf) = gemma() else { return };
    let tokenizer = Tokenizer::load(&gguf).unwrap();
    let digit = |d: u32| tokenizer.encode(&d.to_string(), false).unwrap()[0];
    for (name, metric, least, _) in TASKS {
        let task = Task::load(&task_path(name), &tokenizer).unwrap();
        println!("{name}: {} pairs, up to {} tokens", task.pairs.len(), task.max_len());
        assert_eq!(task.metric, metric, "{name}");
        assert!(task.pairs.len() >= least, "{name}: {} pairs, fewer than {least}", task.pairs.len());
        for pair in &task.pairs {
            assert_ne!(pair.clean, pair.corrupt, "{name}: a pair's prompts are the same");
        }
        if name == "greater-than.jsonl" {
            // The answer and wrong sets split the ten digits: every next tens digit is one or the other.
            for pair in &task.pairs {
                let mut all: Vec<u32> = pair.answers.iter().chain(&pair.wrongs).copied().collect();
                all.sort_unstable();
                let mut digits: Vec<u32> = (0..10).map(digit).collect();
                digits.sort_unstable();
                assert_eq!(all, digits, "{name}: the sets are not the ten digits");
            }
        }
    }
}

/// Gemma 3 270M's accuracy on each task (share of pairs with clean metric > 0) is well above
/// chance, and the corruption takes most of it away on average.
#[test]
fn gemma_solves_the_shipped_tasks() {
    let Some(gguf) = gemma() else { return };
    let tokenizer = Tokenizer::load(&gguf).unwrap();
    let model = loupe_model::load(&gguf).unwrap();
    for (name, _, _, least) in TASKS {
        let task = Task::load(&task_path(name), &tokenizer).unwrap();
        let runs = Runs::new(model.as_ref(), &task).unwrap();
        let n = task.pairs.len() as f32;
        let accuracy = runs.metric_clean.iter().filter(|&&m| m > 0.0).count() as f32 / n;
        let corrupt_accuracy = runs.metric_corrupt.iter().filter(|&&m| m > 0.0).count() as f32 / n;
        let (clean, corrupt) = (
            loupe_analysis::circuits::patch::mean(&runs.metric_clean),
            loupe_analysis::circuits::patch::mean(&runs.metric_corrupt),
        );
        println!(
            "{name}: accuracy {accuracy:.3} (corrupt {corrupt_accuracy:.3}), mean {} clean {clean:.3}, corrupt {corrupt:.3}",
            task.metric.name()
        );
        assert!(accuracy >= least, "{name}: accuracy {accuracy} below {least}");
        assert!(corrupt < clean, "{name}: the corruption does not lower the metric ({corrupt} vs {clean})");
    }
}
