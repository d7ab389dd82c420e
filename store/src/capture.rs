//! The manifest's `capture` field: the settings and progress of the capture that filled the
//! store's hooks, committed atomically with the shards it describes. loupe-model's capture writes
//! it through [`CaptureState`]; every other reader (training metadata, splicing, on-the-fly
//! capture) reads the settings through [`Manifest::capture_settings`], so a malformed record is
//! an error that says so, never a silent default.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::manifest::{DType, Manifest};

/// What a capture was asked to do: the resume key (a capture resumes only with equal settings).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureSettings {
    /// sha256 of the model's weights file.
    pub model_sha256: String,
    /// The corpus path as given.
    pub corpus: String,
    pub corpus_files: usize,
    pub corpus_bytes: u64,
    /// xxh3-128 of the corpus contents. Absent in stores captured before it was recorded (issue
    /// 18): those resume on the other settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub corpus_xxh3: Option<String>,
    pub hooks: Vec<String>,
    /// Tokens per context, BOS included.
    pub context: usize,
    /// Tokens between context starts.
    pub stride: usize,
    /// Whether each context starts with the BOS token.
    pub bos: bool,
    pub dtype: DType,
    pub grads: bool,
    /// Contexts per forward pass.
    pub batch: usize,
    pub shard_rows: usize,
    pub max_tokens: Option<u64>,
}

/// The whole `capture` field: the settings and how far the capture got.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CaptureState {
    pub settings: CaptureSettings,
    /// First context not yet committed: document id and context index within it.
    pub next_doc: u32,
    pub next_context: u32,
    pub contexts: u64,
    pub tokens: u64,
    pub complete: bool,
}

impl Manifest {
    /// The capture that filled the hooks; `None` when the store records none (its activations
    /// were written some other way, or it holds none). A record that does not parse is an error.
    pub fn capture_state(&self) -> Result<Option<CaptureState>> {
        self.capture
            .as_ref()
            .map(|value| {
                serde_json::from_value(value.clone()).context("the store's capture state is malformed")
            })
            .transpose()
    }

    /// The settings of [`Manifest::capture_state`].
    pub fn capture_settings(&self) -> Result<Option<CaptureSettings>> {
        Ok(self.capture_state()?.map(|state| state.settings))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> serde_json::Value {
        serde_json::json!({
            "settings": {
                "model_sha256": "ab", "corpus": "c.txt", "corpus_files": 1, "corpus_bytes": 10,
                "corpus_xxh3": "ff", "hooks": ["blocks.0.hook_resid_post"], "context": 64, "stride": 63,
                "bos": true, "dtype": "f32", "grads": false, "batch": 8, "shard_rows": 100,
                "max_tokens": null
            },
            "next_doc": 1, "next_context": 0, "contexts": 2, "tokens": 126, "complete": true
        })
    }

    #[test]
    fn settings_are_read_typed_and_written_back_the_same() {
        let m = Manifest { capture: Some(state()), ..Manifest::default() };
        let s = m.capture_state().unwrap().unwrap();
        assert_eq!((s.settings.context, s.settings.bos, s.settings.corpus.as_str()), (64, true, "c.txt"));
        assert_eq!(serde_json::to_value(&s).unwrap(), state());
        assert_eq!(Manifest::default().capture_settings().unwrap(), None);
    }

    /// Stores captured before the corpus hash was recorded lack it: they still read.
    #[test]
    fn a_store_without_the_corpus_hash_reads() {
        let mut value = state();
        value["settings"].as_object_mut().unwrap().remove("corpus_xxh3");
        let m = Manifest { capture: Some(value.clone()), ..Manifest::default() };
        let s = m.capture_settings().unwrap().unwrap();
        assert_eq!(s.corpus_xxh3, None);
        assert_eq!(serde_json::to_value(m.capture_state().unwrap().unwrap()).unwrap(), value);
    }

    #[test]
    fn missing_or_malformed_settings_are_an_error() {
        for edit in [
            (|v: &mut serde_json::Value| drop(v["settings"].as_object_mut().unwrap().remove("context")))
                as fn(&mut serde_json::Value),
            |v| v["settings"]["context"] = "long".into(),
            |v| drop(v.as_object_mut().unwrap().remove("settings")),
        ] {
            let mut value = state();
            edit(&mut value);
            let m = Manifest { capture: Some(value), ..Manifest::default() };
            let err = format!("{:#}", m.capture_settings().unwrap_err());
            assert!(err.starts_with("the store's capture state is malformed"), "{err}");
        }
    }
}
