//! Corpora: a UTF-8 text file (one document), a folder of them (every regular, non-hidden file,
//! in path order; `.jsonl` files inside count as JSONL), or JSONL with a `text` field per line (one
//! document per line).
//!
//! Documents are numbered in that order, so a document id means the same thing on every run
//! (capture resumes by id). A document that is not valid UTF-8 is skipped and counted — it keeps
//! its id — so one bad file does not stop a long capture; a malformed JSONL line is an error that
//! names the file and line.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// One document of a corpus.
#[derive(Clone, Debug, PartialEq)]
pub struct Document {
    /// Position in the corpus, from 0.
    pub id: u32,
    /// `path` or `path:line`, for messages.
    pub source: String,
    pub text: String,
}

/// A corpus on disk: the files to read, in order.
#[derive(Clone, Debug)]
pub struct Corpus {
    files: Vec<PathBuf>,
    bytes: u64,
}

/// What reading skipped.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Skipped {
    pub invalid_utf8: u64,
    /// Source of the first skipped document.
    pub first: Option<String>,
}

impl Corpus {
    pub fn open(path: &Path) -> Result<Corpus> {
        if !path.exists() {
            bail!("corpus not found: {} does not exist", path.display());
        }
        let mut files = Vec::new();
        if path.is_dir() {
            collect_files(path, &mut files)?;
            files.sort();
            if files.is_empty() {
                bail!("corpus folder {} holds no files", path.display());
            }
        } else {
            files.push(path.to_path_buf());
        }
        let bytes = files.iter().map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0)).sum();
        Ok(Corpus { files, bytes })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Total size of the corpus files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Visit documents from id `first` on, in order; `visit` gets each document and the corpus
    /// bytes read so far, and returns false to stop. Returns what was skipped.
    pub fn for_each(
        &self,
        first: u32,
        mut visit: impl FnMut(Document, u64) -> Result<bool>,
    ) -> Result<Skipped> {
        let mut skipped = Skipped::default();
        let mut id = 0u32;
        let mut done_bytes = 0u64;
        for file in &self.files {
            let is_jsonl = file.extension().is_some_and(|e| e == "jsonl");
            if is_jsonl {
                let reader = BufReader::new(
                    File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
                );
                for (line_no, line) in reader.split(b'\n').enumerate() {
                    let line = line.with_context(|| format!("cannot read {}", file.display()))?;
                    done_bytes += line.len() as u64 + 1;
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let this = id;
                    id += 1;
                    if this < first {
                        continue;
                    }
                    let source = format!("{}:{}", file.display(), line_no + 1);
                    let Ok(text) = std::str::from_utf8(&line) else {
                        skip(&mut skipped, &source);
                        continue;
                    };
                    let value: serde_json::Value =
                        serde_json::from_str(text).with_context(|| format!("{source}: not a JSON object"))?;
                    let Some(text) = value.get("text").and_then(|t| t.as_str()) else {
                        bail!("{source}: JSONL line has no string field \"text\"");
                    };
                    if !visit(Document { id: this, source, text: text.to_string() }, done_bytes)? {
                        return Ok(skipped);
                    }
                }
            } else {
                let this = id;
                id += 1;
                let len = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
                done_bytes += len;
                if this < first {
                    continue;
                }
                let mut bytes = Vec::new();
                File::open(file)
                    .and_then(|mut f| f.read_to_end(&mut bytes))
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let source = file.display().to_string();
                match String::from_utf8(bytes) {
                    Ok(text) => {
                        if !visit(Document { id: this, source, text }, done_bytes)? {
                            return Ok(skipped);
                        }
                    }
                    Err(_) => skip(&mut skipped, &source),
                }
            }
        }
        Ok(skipped)
    }
}

fn skip(skipped: &mut Skipped, source: &str) {
    skipped.invalid_utf8 += 1;
    skipped.first.get_or_insert_with(|| source.to_string());
}

fn collect_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        if path.is_dir() {
            collect_files(&path, out)?;
        } else if path.is_file() {
            out.push(path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_files_folders_and_jsonl_and_skips_invalid_utf8() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.txt"), "first document").unwrap();
        std::fs::write(dir.path().join("b.txt"), b"bad \xff bytes").unwrap();
        std::fs::write(dir.path().join("c.jsonl"), "{\"text\": \"line one\"}\n\n{\"text\": \"line two\"}\n")
            .unwrap();
        std::fs::write(dir.path().join(".hidden"), "ignored").unwrap();
        let corpus = Corpus::open(dir.path()).unwrap();
        let mut docs = Vec::new();
        let skipped = corpus
            .for_each(0, |d, _| {
                docs.push((d.id, d.text));
                Ok(true)
            })
            .unwrap();
        assert_eq!(docs, vec![(0, "first document".into()), (2, "line one".into()), (3, "line two".into())]);
        assert_eq!(skipped.invalid_utf8, 1);
        assert!(skipped.first.unwrap().ends_with("b.txt"));
        let mut later = Vec::new();
        corpus
            .for_each(3, |d, _| {
                later.push(d.id);
                Ok(true)
            })
            .unwrap();
        assert_eq!(later, vec![3]);

        std::fs::write(dir.path().join("d.jsonl"), "{\"txt\": 1}\n").unwrap();
        let err = Corpus::open(dir.path()).unwrap().for_each(0, |_, _| Ok(true)).unwrap_err();
        assert!(format!("{err:#}").contains("d.jsonl:1: JSONL line has no string field"), "{err:#}");
        assert!(Corpus::open(&dir.path().join("missing")).is_err());
    }
}
