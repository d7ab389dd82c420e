//! Per-feature resume: each finished record (an explanation or a score, failed or not) is
//! appended to a JSON-lines journal beside the tables and synced before the run goes on. A
//! restarted run reads the journal and skips what it finished; the journal is deleted once its
//! records are committed to the store. A line torn by a kill is ignored.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use anyhow::{Context, Result};
use serde::Serialize;
use serde::de::DeserializeOwned;

pub struct Journal {
    path: PathBuf,
    file: Mutex<std::fs::File>,
}

impl Journal {
    /// Open (creating) the journal at `path`, with the records it already holds.
    pub fn open<T: DeserializeOwned>(path: &Path) -> Result<(Journal, Vec<T>)> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
        };
        let mut records = Vec::new();
        let mut good = 0;
        for line in text.split_inclusive('\n') {
            match serde_json::from_str::<T>(line.trim_end()) {
                Ok(r) if line.ends_with('\n') => {
                    records.push(r);
                    good += line.len();
                }
                _ => break,
            }
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        // Drop a torn tail so the next record starts on a line of its own.
        file.set_len(good as u64).with_context(|| format!("cannot truncate {}", path.display()))?;
        Ok((Journal { path: path.to_path_buf(), file: Mutex::new(file) }, records))
    }

    pub fn append<T: Serialize>(&self, record: &T) -> Result<()> {
        let mut line = serde_json::to_string(record)?;
        line.push('\n');
        let mut file = self.file.lock().expect("journal lock");
        file.write_all(line.as_bytes())
            .and_then(|_| file.sync_data())
            .with_context(|| format!("cannot write {}", self.path.display()))
    }

    /// Delete the journal (its records are in the store now).
    pub fn remove(self) -> Result<()> {
        std::fs::remove_file(&self.path).with_context(|| format!("cannot remove {}", self.path.display()))
    }
}
