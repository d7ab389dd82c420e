//! The on-disk response cache: one JSON file per answered request, named by the SHA-256 of the
//! exact request body (model, messages, sampling parameters — never the API key, which is not
//! in the body). A rerun, or a run restarted after a kill, reads answers from here instead of
//! sending the request again.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::client::ChatResponse;

/// A cache folder (e.g. `~/.cache/loupe/llm-cache`).
#[derive(Clone, Debug)]
pub struct Cache {
    dir: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    key: String,
    response: ChatResponse,
}

/// The hex SHA-256 of a request body: the cache key, and the `prompt_hash` of what it asked.
pub fn request_key(body: &serde_json::Value) -> String {
    hex(&Sha256::digest(serde_json::to_vec(body).expect("JSON values serialize")))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Cache {
    pub fn open(dir: &Path) -> Result<Cache> {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create the cache folder {}", dir.display()))?;
        Ok(Cache { dir: dir.to_path_buf() })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.json"))
    }

    /// The cached answer to the request with this key. A torn or foreign file counts as a miss
    /// (and is overwritten by the next answer).
    pub fn get(&self, key: &str) -> Option<ChatResponse> {
        let text = std::fs::read(self.path(key)).ok()?;
        let entry: Entry = serde_json::from_slice(&text).ok()?;
        (entry.key == key).then_some(entry.response)
    }

    /// Remember an answer: written under a temporary name and renamed, so a kill leaves either
    /// the whole entry or none.
    pub fn put(&self, key: &str, response: &ChatResponse) -> Result<()> {
        let path = self.path(key);
        let parent = path.parent().expect("cache entries live in a subfolder");
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
        let entry = Entry { key: key.to_string(), response: response.clone() };
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec(&entry)?)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("cannot write {}", path.display()))
    }
}
