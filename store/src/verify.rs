//! `loupe store verify`: check every listed shard, dictionary file and analysis file against the
//! manifest.
//!
//! For each shard: the file exists, has the listed size and xxh3-128, decodes as Arrow IPC with the
//! hook's schema, and holds the listed number of rows. Files the manifest does not list (leftovers
//! of interrupted writes) are reported as notes: readers ignore them, so they do not make a store
//! invalid.

use std::collections::BTreeSet;
use std::path::PathBuf;

use crate::Progress;
use crate::fsutil::file_xxh3;
use crate::store::Store;

/// What verification found.
#[derive(Debug, Default)]
pub struct Report {
    pub hooks: usize,
    pub shards: usize,
    pub rows: u64,
    pub bytes: u64,
    pub dictionaries: usize,
    /// Feature analyses checked.
    pub analyses: usize,
    /// Explanation sets checked.
    pub explanations: usize,
    /// One line per problem; empty when the store is sound.
    pub problems: Vec<String>,
    /// Files under `activations/` that no manifest entry names.
    pub unlisted: Vec<PathBuf>,
}

impl Report {
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

impl Store {
    /// Verify every shard; `progress` follows the bytes checked.
    pub fn verify(&self, progress: &dyn Progress) -> Report {
        let manifest = self.manifest();
        let total: u64 = manifest.hooks.values().map(|h| h.bytes()).sum();
        progress.stage("verifying");
        let mut report = Report { hooks: manifest.hooks.len(), ..Report::default() };
        let mut checked = 0u64;
        for (hook, entry) in &manifest.hooks {
            let acts = match self.activations(hook) {
                Ok(a) => a,
                Err(e) => {
                    report.problems.push(format!("{e:#}"));
                    continue;
                }
            };
            for (i, shard) in entry.shards.iter().enumerate() {
                report.shards += 1;
                report.rows += shard.rows;
                report.bytes += shard.bytes;
                if let Err(problem) = check_shard(&acts, i) {
                    report.problems.push(problem);
                }
                checked += shard.bytes;
                progress.set(checked, total);
            }
        }
        for (name, entry) in &manifest.dictionaries {
            report.dictionaries += 1;
            let dir = self.dictionary_dir(name);
            for file in &entry.files {
                report.problems.extend(check_file(&format!("dictionary {name}"), &dir, file));
            }
        }
        for (name, entry) in &manifest.features {
            report.analyses += 1;
            for file in &entry.files {
                report.problems.extend(check_file(&format!("analysis of {name}"), self.root(), file));
            }
        }
        for (name, entry) in &manifest.explanations {
            report.explanations += 1;
            for file in &entry.files {
                report.problems.extend(check_file(&format!("explanations of {name}"), self.root(), file));
            }
        }
        for (name, entry) in &manifest.heads {
            for file in &entry.files {
                report.problems.extend(check_file(&format!("head scores {name}"), self.root(), file));
            }
        }
        for (name, entry) in &manifest.circuits {
            for file in &entry.files {
                report.problems.extend(check_file(&format!("circuit {name}"), self.root(), file));
            }
        }
        for (name, entry) in &manifest.circuit_evals {
            for file in &entry.files {
                report.problems.extend(check_file(&format!("circuit evaluation {name}"), self.root(), file));
            }
        }
        for (name, entry) in &manifest.graphs {
            for file in &entry.files {
                report.problems.extend(check_file(&format!("attribution graph {name}"), self.root(), file));
            }
        }
        for (name, entry) in &manifest.experts {
            for file in &entry.files {
                report.problems.extend(check_file(&format!("expert tables {name}"), self.root(), file));
            }
        }
        for (name, entry) in &manifest.graph_supernodes {
            for file in &entry.files {
                report.problems.extend(check_file(&format!("supernodes of {name}"), self.root(), file));
            }
        }
        if report.problems.is_empty() {
            // The files are as listed: now check that the listings agree with each other.
            report.problems.extend(self.consistency_problems(&manifest));
        }
        report.unlisted = unlisted_files(self);
        report
    }
}

impl Store {
    /// What the listings say of each other: an analysis and explanations belong to a listed
    /// dictionary of the same width, and their tables open with the sizes the manifest records.
    fn consistency_problems(&self, manifest: &crate::Manifest) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, entry) in &manifest.features {
            match manifest.dictionaries.get(name) {
                None => problems.push(format!("the analysis of {name} belongs to no listed dictionary")),
                Some(dict) if dict.n_features != entry.n_features => problems.push(format!(
                    "the analysis of {name} has {} features, the dictionary {}",
                    entry.n_features, dict.n_features
                )),
                Some(_) => {
                    if let Err(e) = crate::FeatureTables::open(self, name) {
                        problems.push(format!("analysis of {name}: {e:#}"));
                    }
                }
            }
        }
        for (name, entry) in &manifest.explanations {
            let n = match manifest.dictionaries.get(name) {
                Some(dict) => dict.n_features,
                None => {
                    problems.push(format!("the explanations of {name} belong to no listed dictionary"));
                    continue;
                }
            };
            match self.explanations(name) {
                Err(e) => problems.push(format!("explanations of {name}: {e:#}")),
                Ok(all) => {
                    if all.explanations.len() != entry.n_explanations as usize
                        || all.scores.len() != entry.n_scores as usize
                    {
                        problems.push(format!(
                            "the explanations of {name} list {} explanations and {} scores, the tables hold {} and {}",
                            entry.n_explanations,
                            entry.n_scores,
                            all.explanations.len(),
                            all.scores.len()
                        ));
                    }
                    let ids = all
                        .explanations
                        .iter()
                        .map(|e| e.feature_id)
                        .chain(all.scores.iter().map(|s| s.feature_id));
                    if let Some(bad) = ids.into_iter().find(|&f| f >= n) {
                        problems.push(format!(
                            "the explanations of {name} name feature {bad}, but it has {n} features"
                        ));
                    }
                }
            }
        }
        problems
    }
}

/// A listed file (relative to `dir`): present, of the listed size and checksum.
fn check_file(owner: &str, dir: &std::path::Path, file: &crate::FileEntry) -> Option<String> {
    let path = dir.join(&file.file);
    match std::fs::metadata(&path) {
        Err(_) => Some(format!("{owner}: {} is missing", path.display())),
        Ok(meta) if meta.len() != file.bytes => Some(format!(
            "{owner}: {} has {} bytes, the manifest says {}",
            path.display(),
            meta.len(),
            file.bytes
        )),
        Ok(_) => match file_xxh3(&path) {
            Ok(hash) if hash == file.xxh3 => None,
            Ok(_) => Some(format!("{owner}: {} is corrupt (checksum mismatch)", path.display())),
            Err(e) => Some(format!("{owner}: {e:#}")),
        },
    }
}

/// Presence and size, the checksum, then schema, rows and finite values: what every reader
/// checks the first time it maps the shard, in the same words.
fn check_shard(acts: &crate::Activations, i: usize) -> Result<(), String> {
    acts.open_shard(i).map(|_| ()).map_err(|e| format!("{e:#}"))
}

fn unlisted_files(store: &Store) -> Vec<PathBuf> {
    let manifest = store.manifest();
    let root = store.root().join("activations");
    let mut listed = BTreeSet::new();
    for (hook, entry) in &manifest.hooks {
        listed.extend(entry.shards.iter().map(|s| root.join(hook).join(&s.file)));
    }
    let mut out = Vec::new();
    let Ok(hooks) = std::fs::read_dir(&root) else { return out };
    for hook_dir in hooks.flatten() {
        let Ok(files) = std::fs::read_dir(hook_dir.path()) else {
            out.push(hook_dir.path());
            continue;
        };
        for file in files.flatten() {
            if !listed.contains(&file.path()) {
                out.push(file.path());
            }
        }
    }
    out.sort();
    out
}
