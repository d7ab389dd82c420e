//! Corpora: a UTF-8 text file (one document), a folder of them (every regular, non-hidden file,
//! in path order; `.jsonl` files inside count as JSONL), or JSONL with a `text` field per line (one
//! document per line).
//!
//! Documents are numbered in that order, so a document id means the same thing on every run
//! (capture resumes by id). A document that is not valid UTF-8 is skipped and counted — it keeps
//! its id — so one bad file does not stop a long capture; a malformed JSONL line is an error that
//! names the file and line.
//!
//! Reading is streamed: a JSONL line is parsed as it is read (struson), so a reader asked for at
//! most `max_doc_bytes` of each document holds only that much of it, however long the line or
//! file (the rest is read past, not kept). [`Corpus::xxh3`] identifies a corpus by its contents.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use struson::reader::{JsonReader, JsonStreamReader, ReaderError, ValueType};
use xxhash_rust::xxh3::Xxh3;

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
    root: PathBuf,
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
        Ok(Corpus { root: path.to_path_buf(), files, bytes })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Total size of the corpus files.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// xxh3-128 (hex) of the corpus: each file's path inside the corpus, length and bytes, in
    /// order. Any edit, even one that keeps every size, changes it.
    pub fn xxh3(&self) -> Result<String> {
        let mut hasher = Xxh3::new();
        let mut buf = vec![0u8; 1 << 20];
        for file in &self.files {
            let name = file.strip_prefix(&self.root).unwrap_or(file).to_string_lossy();
            hasher.update(&(name.len() as u64).to_le_bytes());
            hasher.update(name.as_bytes());
            let mut f = File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
            let mut len = 0u64;
            loop {
                let n = f.read(&mut buf).with_context(|| format!("cannot read {}", file.display()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            hasher.update(&len.to_le_bytes());
        }
        Ok(loupe_store::fsutil::hex128(hasher.digest128()))
    }

    /// Visit documents from id `first` on, in order; `visit` gets each document and the corpus
    /// bytes read so far, and returns false to stop. With `max_doc_bytes`, a document's text is
    /// its first that many bytes (cut back to a whole character); only those are read into
    /// memory. Returns what was skipped.
    pub fn for_each(
        &self,
        first: u32,
        max_doc_bytes: Option<u64>,
        mut visit: impl FnMut(Document, u64) -> Result<bool>,
    ) -> Result<Skipped> {
        let cap = max_doc_bytes.unwrap_or(u64::MAX);
        let mut skipped = Skipped::default();
        let mut id = 0u32;
        let mut done_bytes = 0u64;
        for file in &self.files {
            let open = || File::open(file).with_context(|| format!("cannot open {}", file.display()));
            let is_jsonl = file.extension().is_some_and(|e| e == "jsonl");
            if is_jsonl {
                let mut reader = BufReader::new(open()?);
                let mut line_no = 0u64;
                while !reader
                    .fill_buf()
                    .with_context(|| format!("cannot read {}", file.display()))?
                    .is_empty()
                {
                    line_no += 1;
                    let source = format!("{}:{line_no}", file.display());
                    let mut line = LineReader::new(&mut reader);
                    let blank = line.skip_blank().with_context(|| format!("cannot read {source}"))?;
                    let this = id;
                    let read = (!blank && this >= first).then(|| read_text(&mut line, cap));
                    io::copy(&mut line, &mut io::sink()).with_context(|| format!("cannot read {source}"))?;
                    done_bytes += line.bytes;
                    let text = match read {
                        None => None,
                        Some(_) if !line.utf8.valid() => {
                            skip(&mut skipped, &source);
                            None
                        }
                        Some(Ok(bytes)) => {
                            Some(text_of(bytes, cap).with_context(|| format!("{source}: not UTF-8"))?)
                        }
                        Some(Err(LineError::NoText)) => {
                            bail!("{source}: JSONL line has no string field \"text\"")
                        }
                        Some(Err(LineError::Bad(why))) => bail!("{source}: not a JSON object ({why})"),
                    };
                    if blank {
                        continue;
                    }
                    id += 1;
                    if let Some(text) = text
                        && !visit(Document { id: this, source, text }, done_bytes)?
                    {
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
                open()?
                    .take(cap)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                let source = file.display().to_string();
                match text_of(bytes, cap) {
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

/// `bytes` as text; when they were cut at `cap`, a character cut in two at the end is dropped.
fn text_of(mut bytes: Vec<u8>, cap: u64) -> Result<String, std::string::FromUtf8Error> {
    if bytes.len() as u64 == cap
        && let Err(e) = std::str::from_utf8(&bytes)
        && e.error_len().is_none()
    {
        bytes.truncate(e.valid_up_to());
    }
    String::from_utf8(bytes)
}

/// Why a JSONL line (that is UTF-8) gave no text.
enum LineError {
    NoText,
    Bad(String),
}

impl From<io::Error> for LineError {
    fn from(e: io::Error) -> LineError {
        LineError::Bad(e.to_string())
    }
}

impl From<ReaderError> for LineError {
    fn from(e: ReaderError) -> LineError {
        LineError::Bad(e.to_string())
    }
}

/// The first `cap` bytes of the string field `text` of the JSON object on `line`.
fn read_text(line: &mut LineReader<'_, impl BufRead>, cap: u64) -> Result<Vec<u8>, LineError> {
    let mut json = JsonStreamReader::new(line);
    json.begin_object()?;
    let mut text = None;
    while json.has_next()? {
        if json.next_name()? == "text" && text.is_none() && json.peek()? == ValueType::String {
            let mut reader = json.next_string_reader()?;
            let mut bytes = Vec::new();
            (&mut reader).take(cap).read_to_end(&mut bytes)?;
            io::copy(&mut reader, &mut io::sink())?;
            text = Some(bytes);
        } else {
            json.skip_value()?;
        }
    }
    json.end_object()?;
    json.consume_trailing_whitespace()?;
    text.ok_or(LineError::NoText)
}

/// One line of a buffered reader as a reader: ends before the line's `\n` (which it consumes),
/// counts the bytes it consumed and checks that they are UTF-8.
struct LineReader<'a, R> {
    inner: &'a mut R,
    ended: bool,
    bytes: u64,
    utf8: Utf8Check,
}

/// Whether a stream of bytes, fed in pieces, is UTF-8.
#[derive(Default)]
struct Utf8Check {
    /// The start of a character cut off at the end of the last piece.
    carry: [u8; 4],
    carried: usize,
    bad: bool,
}

impl Utf8Check {
    fn feed(&mut self, mut bytes: &[u8]) {
        while self.carried > 0 && !bytes.is_empty() && !self.bad {
            self.carry[self.carried] = bytes[0];
            self.carried += 1;
            bytes = &bytes[1..];
            match std::str::from_utf8(&self.carry[..self.carried]) {
                Ok(_) => self.carried = 0,
                Err(e) => self.bad = e.error_len().is_some(),
            }
        }
        if self.bad {
            return;
        }
        if let Err(e) = std::str::from_utf8(bytes) {
            if e.error_len().is_some() {
                self.bad = true;
            } else {
                let rest = &bytes[e.valid_up_to()..];
                self.carry[..rest.len()].copy_from_slice(rest);
                self.carried = rest.len();
            }
        }
    }

    /// Everything fed so far is UTF-8 (no character cut off at the end).
    fn valid(&self) -> bool {
        !self.bad && self.carried == 0
    }
}

impl<'a, R: BufRead> LineReader<'a, R> {
    fn new(inner: &'a mut R) -> LineReader<'a, R> {
        LineReader { inner, ended: false, bytes: 0, utf8: Utf8Check::default() }
    }

    /// Consume leading whitespace; true when the line holds nothing else.
    fn skip_blank(&mut self) -> io::Result<bool> {
        loop {
            let buf = self.inner.fill_buf()?;
            if buf.is_empty() {
                self.ended = true;
                return Ok(true);
            }
            let ws = buf.iter().take_while(|&&b| b.is_ascii_whitespace() && b != b'\n').count();
            if ws < buf.len() {
                let newline = buf[ws] == b'\n';
                let n = ws + usize::from(newline);
                self.inner.consume(n);
                self.bytes += n as u64;
                self.ended = newline;
                return Ok(newline);
            }
            let n = buf.len();
            self.inner.consume(n);
            self.bytes += n as u64;
        }
    }
}

impl<R: BufRead> Read for LineReader<'_, R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.ended || out.is_empty() {
            return Ok(0);
        }
        let buf = self.inner.fill_buf()?;
        let limit = buf.len().min(out.len());
        let (n, consumed) = match buf[..limit].iter().position(|&b| b == b'\n') {
            Some(i) => {
                self.ended = true;
                (i, i + 1)
            }
            None => (limit, limit),
        };
        out[..n].copy_from_slice(&buf[..n]);
        self.utf8.feed(&out[..n]);
        self.inner.consume(consumed);
        self.bytes += consumed as u64;
        if n == 0 && !self.ended {
            self.ended = true; // end of file
        }
        Ok(n)
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
            .for_each(0, None, |d, _| {
                docs.push((d.id, d.text));
                Ok(true)
            })
            .unwrap();
        assert_eq!(docs, vec![(0, "first document".into()), (2, "line one".into()), (3, "line two".into())]);
        assert_eq!(skipped.invalid_utf8, 1);
        assert!(skipped.first.unwrap().ends_with("b.txt"));
        let mut later = Vec::new();
        corpus
            .for_each(3, None, |d, _| {
                later.push(d.id);
                Ok(true)
            })
            .unwrap();
        assert_eq!(later, vec![3]);

        std::fs::write(dir.path().join("d.jsonl"), "{\"txt\": 1}\n").unwrap();
        let err = Corpus::open(dir.path()).unwrap().for_each(0, None, |_, _| Ok(true)).unwrap_err();
        assert!(format!("{err:#}").contains("d.jsonl:1: JSONL line has no string field"), "{err:#}");
        assert!(Corpus::open(&dir.path().join("missing")).is_err());
    }
}
