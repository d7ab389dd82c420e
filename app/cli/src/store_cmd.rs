//! `loupe store info|verify`.

use std::path::Path;

use anyhow::{Result, bail};
use loupe_store::Store;

use crate::progress::Bar;

/// Human-readable byte count.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 { format!("{n} B") } else { format!("{value:.1} {}", UNITS[unit]) }
}

pub fn info(dir: &Path) -> Result<()> {
    let store = Store::open(dir)?;
    let m = store.manifest();
    println!("store      {}", dir.display());
    println!("version    {}", m.version);
    match &m.model {
        Some(model) => println!(
            "model      {} ({}) sha256 {} from {}",
            model.name, model.architecture, model.sha256, model.path
        ),
        None => println!("model      (none recorded)"),
    }
    match &m.tokenizer {
        Some(t) => {
            let id = |i: Option<u32>| i.map_or("none".to_string(), |i| i.to_string());
            println!("tokenizer  {} vocab {} bos {} eos {}", t.kind, t.vocab_size, id(t.bos), id(t.eos))
        }
        None => println!("tokenizer  (none recorded)"),
    }
    println!("hooks      {}", m.hooks.len());
    let mut missing = Vec::new();
    for (hook, entry) in &m.hooks {
        println!(
            "  {hook}  {}  {} shards  {} rows  {}",
            entry.spec,
            entry.shards.len(),
            entry.rows(),
            bytes(entry.bytes())
        );
        let acts = store.activations(hook)?;
        for (i, shard) in entry.shards.iter().enumerate() {
            let path = acts.shard_path(i);
            match std::fs::metadata(&path) {
                Err(_) => missing.push(format!(
                    "shard {} is listed in the manifest but the file is missing",
                    path.display()
                )),
                Ok(meta) if meta.len() != shard.bytes => missing.push(format!(
                    "shard {} is {} bytes but the manifest says {} (truncated or replaced)",
                    path.display(),
                    meta.len(),
                    shard.bytes
                )),
                Ok(_) => {}
            }
        }
    }
    println!("dictionaries {}", m.dictionaries.len());
    for (name, d) in &m.dictionaries {
        let hooks = match &d.output_hook {
            Some(out) => format!("{} → {out}", d.hook),
            None => d.hook.clone(),
        };
        println!(
            "  {name}  {} {} on {hooks}  d {} → {} features  {} (step {}, {} tokens)",
            d.kind, d.variant, d.d_in, d.n_features, d.status, d.step, d.tokens
        );
        for file in &d.files {
            missing.extend(size_problem(&store.dictionary_dir(name), file));
        }
    }
    println!("analyses {}", m.features.len());
    for (name, a) in &m.features {
        let bytes_total: u64 = a.files.iter().map(|f| f.bytes).sum();
        println!(
            "  {name}  on {}  {} features, {} tokens, {} files, {}",
            a.hook,
            a.n_features,
            a.tokens,
            a.files.len(),
            bytes(bytes_total)
        );
        for file in &a.files {
            missing.extend(size_problem(store.root(), file));
        }
    }
    println!("explanations {}", m.explanations.len());
    for (name, e) in &m.explanations {
        let index =
            e.index_model.as_deref().map_or("no search index".to_string(), |m| format!("indexed by {m}"));
        let stale = if store.explanations_stale(name) {
            " (stale: made from an earlier analysis; re-run `loupe explain --redo`)"
        } else {
            ""
        };
        println!("  {name}  {} explanations, {} scores, {index}{stale}", e.n_explanations, e.n_scores);
        for file in &e.files {
            missing.extend(size_problem(store.root(), file));
        }
    }
    if let Some(first) = missing.first() {
        bail!("{first}{}", more(missing.len()));
    }
    Ok(())
}

/// A listed file (relative to `dir`) that is missing or not of its listed size.
fn size_problem(dir: &Path, file: &loupe_store::FileEntry) -> Option<String> {
    let path = dir.join(&file.file);
    match std::fs::metadata(&path) {
        Err(_) => Some(format!("{} is listed in the manifest but missing", path.display())),
        Ok(meta) if meta.len() != file.bytes => {
            Some(format!("{} is {} bytes but the manifest says {}", path.display(), meta.len(), file.bytes))
        }
        Ok(_) => None,
    }
}

fn more(n: usize) -> String {
    if n > 1 { format!(" (and {} more problems; run `loupe store verify`)", n - 1) } else { String::new() }
}

pub fn verify(dir: &Path) -> Result<()> {
    let store = Store::open(dir)?;
    let bar = Bar::new("{prefix} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}");
    let report = store.verify(&bar);
    bar.indicatif().finish_and_clear();
    for path in &report.unlisted {
        eprintln!(
            "note: {} is not listed in the manifest (left by an interrupted write; ignored)",
            path.display()
        );
    }
    if !report.is_ok() {
        for problem in &report.problems[..report.problems.len() - 1] {
            eprintln!("error: {problem}");
        }
        bail!("{}", report.problems.last().expect("not ok means at least one problem"));
    }
    println!(
        "ok: {} verified: {} hooks, {} shards, {} rows, {}, {} dictionaries, {} analyses, {} explanation sets",
        dir.display(),
        report.hooks,
        report.shards,
        report.rows,
        bytes(report.bytes),
        report.dictionaries,
        report.analyses,
        report.explanations
    );
    Ok(())
}
