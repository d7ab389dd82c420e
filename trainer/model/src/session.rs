//! The model that goes with a store, resolved one way for every stage that runs it (splicing a
//! dictionary in, analysis' logit effects and on-the-fly capture, the intervention scorer, the
//! app's prompt lab): the user's `--model` when given, else the model the store's manifest
//! records (where its weights were read from at capture).
//!
//! Resolution fails before anything long starts, with one line: the store records no model, or
//! its model is not on this machine (each completed by the caller's `remedy`: what the user can
//! do), or a given model does not exist. The tokenizer is loaded from the same path on first use.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{Result, bail};
use loupe_store::Manifest;

use crate::HookedModel;
use crate::tokenizer::Tokenizer;

/// A loaded model and (on first use) its tokenizer.
pub struct Session {
    path: PathBuf,
    model: Box<dyn HookedModel>,
    tokenizer: OnceLock<Tokenizer>,
}

impl Session {
    /// Which model goes with the store of `manifest`: `given` (a user's `--model`) when set, else
    /// the one the store records; `Ok(None)` when neither names one. The path must exist: a
    /// given one that does not is "model not found"; the store's own one is "not on this machine",
    /// followed by `remedy` in parentheses when there is one.
    pub fn locate(
        manifest: &Manifest,
        given: Option<&Path>,
        remedy: Option<&str>,
    ) -> Result<Option<PathBuf>> {
        if let Some(path) = given {
            if !path.exists() {
                bail!("model not found: {} does not exist", path.display());
            }
            return Ok(Some(path.to_path_buf()));
        }
        let Some(info) = &manifest.model else { return Ok(None) };
        let path = PathBuf::from(&info.path);
        if !path.exists() {
            match remedy {
                Some(remedy) => {
                    bail!("the store's model {} is not on this machine ({remedy})", path.display())
                }
                None => bail!("the store's model {} is not on this machine", path.display()),
            }
        }
        Ok(Some(path))
    }

    /// [`Session::locate`], where naming no model is an error too: "the store records no model",
    /// followed by `; remedy` when there is one.
    pub fn require(manifest: &Manifest, given: Option<&Path>, remedy: Option<&str>) -> Result<PathBuf> {
        match Self::locate(manifest, given, remedy)? {
            Some(path) => Ok(path),
            None => match remedy {
                Some(remedy) => bail!("the store records no model; {remedy}"),
                None => bail!("the store records no model"),
            },
        }
    }

    /// Load the model at `path` (a GGUF file or an HF directory).
    pub fn load(path: &Path) -> Result<Session> {
        Ok(Session { path: path.to_path_buf(), model: crate::load(path)?, tokenizer: OnceLock::new() })
    }

    /// [`Session::require`], then [`Session::load`].
    pub fn open(manifest: &Manifest, given: Option<&Path>, remedy: Option<&str>) -> Result<Session> {
        Self::load(&Self::require(manifest, given, remedy)?)
    }

    /// Where the model was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The model file's name (a GGUF file's or an HF directory's), for provenance.
    pub fn name(&self) -> String {
        self.path.file_name().map_or("model".into(), |n| n.to_string_lossy().into_owned())
    }

    pub fn model(&self) -> &dyn HookedModel {
        self.model.as_ref()
    }

    /// The model's tokenizer, loaded from the same path the first time it is asked for.
    pub fn tokenizer(&self) -> Result<&Tokenizer> {
        if let Some(t) = self.tokenizer.get() {
            return Ok(t);
        }
        let loaded = Tokenizer::load(&self.path)?;
        Ok(self.tokenizer.get_or_init(|| loaded))
    }
}

#[cfg(test)]
mod tests {
    use loupe_store::ModelInfo;

    use super::*;

    fn tiny() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gpt2-tiny")
    }

    fn recording(path: &Path) -> Manifest {
        let model = ModelInfo {
            name: "tiny".into(),
            architecture: "gpt2".into(),
            path: path.display().to_string(),
            sha256: String::new(),
        };
        Manifest { model: Some(model), ..Manifest::default() }
    }

    fn error(r: Result<impl Sized>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => format!("{e:#}"),
        }
    }

    #[test]
    fn the_given_model_wins_over_the_store_s() {
        let gone = Path::new("/nonexistent/model.gguf");
        let store = recording(gone);
        let s = Session::open(&store, Some(&tiny()), None).unwrap();
        assert_eq!(s.path(), tiny());
        assert_eq!(s.name(), "gpt2-tiny");
        assert_eq!(s.model().config().architecture, "gpt2");
        assert_eq!(Session::open(&recording(&tiny()), None, None).unwrap().path(), tiny());
        assert_eq!(
            error(Session::locate(&store, Some(gone), None)),
            "model not found: /nonexistent/model.gguf does not exist"
        );
    }

    #[test]
    fn a_store_without_a_usable_model_gets_one_line_with_the_remedy() {
        let none = Manifest::default();
        assert_eq!(Session::locate(&none, None, Some("pass --model")).unwrap(), None);
        assert_eq!(error(Session::require(&none, None, None)), "the store records no model");
        assert_eq!(
            error(Session::open(&none, None, Some("start the app with --model to run prompts"))),
            "the store records no model; start the app with --model to run prompts"
        );
        let gone = recording(Path::new("/nonexistent/model.gguf"));
        assert_eq!(
            error(Session::locate(&gone, None, Some("pass --model"))),
            "the store's model /nonexistent/model.gguf is not on this machine (pass --model)"
        );
        assert_eq!(
            error(Session::require(&gone, None, None)),
            "the store's model /nonexistent/model.gguf is not on this machine"
        );
    }

    /// The fixture has no tokenizer.json: asking for the tokenizer is an error, every time, and
    /// the model stays usable.
    #[test]
    fn the_tokenizer_is_loaded_on_first_use() {
        let s = Session::load(&tiny()).unwrap();
        assert!(s.tokenizer().is_err());
        assert!(s.tokenizer().is_err());
        assert_eq!(s.model().config().architecture, "gpt2");
        let dir = tempfile::tempdir().unwrap();
        for file in ["config.json", "model.safetensors"] {
            std::fs::copy(tiny().join(file), dir.path().join(file)).unwrap();
        }
        let vocab: serde_json::Map<String, serde_json::Value> =
            [("a", 0), ("b", 1)].iter().map(|(k, v)| (k.to_string(), (*v).into())).collect();
        let tokenizer = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "(?s)."}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "a"},
        });
        std::fs::write(dir.path().join("tokenizer.json"), tokenizer.to_string()).unwrap();
        let s = Session::load(dir.path()).unwrap();
        assert_eq!(s.tokenizer().unwrap().encode("ab", false).unwrap(), [0, 1]);
        assert!(std::ptr::eq(s.tokenizer().unwrap(), s.tokenizer().unwrap()));
    }
}
