//! Corpus domains: each top-level folder or file of the corpus root is a domain (a corpus that is
//! one file is one domain), and every document id maps to the domain of the file it was read from
//! — found by walking the corpus with [`Corpus::for_each`] asking for no text, so nothing of the
//! documents is held.
//!
//! Which corpus: `--corpus`, or the one the store's capture records; when the store records the
//! corpus's xxh3, the corpus read must have it (document ids would mean other documents).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use loupe_model::corpus::Corpus;
use loupe_store::Manifest;

/// The domains of a corpus and the domain of each document id.
#[derive(Clone, Debug, PartialEq)]
pub struct Domains {
    pub names: Vec<String>,
    /// Domain index per document id.
    pub of_doc: Vec<u16>,
    /// The corpus read.
    pub corpus: PathBuf,
}

impl Domains {
    /// The domain of document `doc`, or an error naming it when the corpus has no such document.
    pub fn of(&self, doc: u32) -> Result<u16> {
        match self.of_doc.get(doc as usize) {
            Some(&d) => Ok(d),
            None => bail!(
                "document {doc} is beyond the {} documents of corpus {}: not the corpus the store was captured from (pass --corpus)",
                self.of_doc.len(),
                self.corpus.display()
            ),
        }
    }
}

/// Open the corpus (`corpus`, or the store's recorded one), check it against the recorded hash,
/// and map its documents to domains.
pub fn open(manifest: &Manifest, corpus: Option<&Path>) -> Result<Domains> {
    let settings = manifest.capture_state()?.map(|s| s.settings);
    let path = match (corpus, &settings) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(s)) => PathBuf::from(&s.corpus),
        (None, None) => {
            bail!("the store records no capture corpus: pass --corpus (the corpus its rows came from)")
        }
    };
    if !path.exists() {
        let hint =
            if corpus.is_some() { "" } else { " (pass --corpus: the corpus the store was captured from)" };
        bail!("corpus not found: {} does not exist{hint}", path.display());
    }
    let opened = Corpus::open(&path)?;
    if let Some(expected) = settings.as_ref().and_then(|s| s.corpus_xxh3.as_deref()) {
        let found = opened.xxh3()?;
        if found != expected {
            let hint = if corpus.is_some() { "" } else { " (pass --corpus with the right one)" };
            bail!(
                "corpus {} has changed since the capture (xxh3 {found}, the store records {expected}){hint}",
                path.display()
            );
        }
    }
    map_documents(&opened, &path)
}

/// Walk `corpus` (opened at `root`) and map each document id to its domain.
pub fn map_documents(corpus: &Corpus, root: &Path) -> Result<Domains> {
    let mut names: Vec<String> = Vec::new();
    let mut file_domain = Vec::with_capacity(corpus.files().len());
    for file in corpus.files() {
        let name = match file.strip_prefix(root).ok().and_then(|rel| rel.components().next()) {
            Some(first) => first.as_os_str().to_string_lossy().into_owned(),
            None => file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        };
        if names.last() != Some(&name) {
            names.push(name);
        }
        if names.len() > u16::MAX as usize {
            bail!("corpus {} has more than {} top-level entries (domains)", root.display(), u16::MAX);
        }
        file_domain.push((names.len() - 1) as u16);
    }
    let displays: Vec<String> = corpus.files().iter().map(|f| f.display().to_string()).collect();
    let mut of_doc: Vec<u16> = Vec::new();
    let mut cursor = 0usize;
    corpus.for_each(0, Some(0), |doc, _| {
        // Documents come in file order: a plain file's source is its path, a JSONL line's
        // `path:line`.
        let of_file = |f: &str| {
            doc.source == f
                || doc
                    .source
                    .strip_prefix(f)
                    .and_then(|r| r.strip_prefix(':'))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        };
        while cursor < displays.len() && !of_file(&displays[cursor]) {
            cursor += 1;
        }
        if cursor == displays.len() {
            bail!("corpus document {} ({}) is not from a corpus file", doc.id, doc.source);
        }
        // Skipped documents (not UTF-8) keep their ids: they take the domain of what follows.
        of_doc.resize(doc.id as usize + 1, file_domain[cursor]);
        Ok(true)
    })?;
    Ok(Domains { names, of_doc, corpus: root.to_path_buf() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_level_entries_are_domains_and_jsonl_lines_documents() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("a/deep")).unwrap();
        std::fs::create_dir_all(root.join("b")).unwrap();
        std::fs::write(root.join("a/1.txt"), "one").unwrap();
        std::fs::write(root.join("a/deep/2.txt"), "two").unwrap();
        std::fs::write(root.join("b/x.jsonl"), "{\"text\":\"p\"}\n\n{\"text\":\"q\"}\n").unwrap();
        std::fs::write(root.join("c.txt"), "three").unwrap();
        let d = map_documents(&Corpus::open(root).unwrap(), root).unwrap();
        assert_eq!(d.names, ["a", "b", "c.txt"]);
        assert_eq!(d.of_doc, [0, 0, 1, 1, 2]);
        assert!(d.of(5).unwrap_err().to_string().contains("beyond the 5 documents"));

        let one = map_documents(&Corpus::open(&root.join("c.txt")).unwrap(), &root.join("c.txt")).unwrap();
        assert_eq!((one.names, one.of_doc), (vec!["c.txt".to_string()], vec![0]));
    }
}
