//! `manifest.json`: the single source of truth for what a store holds.
//!
//! A reader trusts only what the manifest lists. Writers change it last, atomically (see [`crate::fsutil`]).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

/// The store layout version this build reads and writes.
pub const STORE_VERSION: u32 = 1;
/// The value of the manifest's `format` field.
pub const STORE_FORMAT: &str = "loupe-store";

/// Element type of the `act` and `grad` columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F16 => "f16",
            DType::F32 => "f32",
        })
    }
}

impl std::str::FromStr for DType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "f16" => Ok(DType::F16),
            "f32" => Ok(DType::F32),
            other => bail!("unknown dtype {other:?} (expected f16 or f32)"),
        }
    }
}

/// The model whose activations the store holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelInfo {
    /// Human name, e.g. `gemma-3-270m`.
    pub name: String,
    /// Architecture key, e.g. `gemma3`, `gpt2`, `bert`.
    pub architecture: String,
    /// Where the weights were read from when the store was made.
    pub path: String,
    /// sha256 of the weights file (GGUF or safetensors), hex.
    pub sha256: String,
}

/// The tokenizer that produced the `token` column.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `gguf` (built from GGUF metadata) or `hf` (a tokenizer.json).
    pub kind: String,
    pub vocab_size: u32,
    pub bos: Option<u32>,
    pub eos: Option<u32>,
}

/// Shape of one hook's activation table; every shard of the hook has exactly this schema.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookSpec {
    /// Width of one activation row.
    pub d: u32,
    pub dtype: DType,
    /// Whether shards carry a `grad` column (loss gradient w.r.t. the activation).
    pub grad: bool,
}

impl std::fmt::Display for HookSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let grad = if self.grad { "with grad" } else { "without grad" };
        write!(f, "d={} {} {grad}", self.d, self.dtype)
    }
}

/// One committed shard file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// File name inside `activations/<hook>/`, e.g. `00000.arrow`.
    pub file: String,
    pub rows: u64,
    pub bytes: u64,
    /// xxh3-128 of the whole file, 32 lowercase hex digits.
    pub xxh3: String,
}

/// Everything stored for one hook point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookEntry {
    #[serde(flatten)]
    pub spec: HookSpec,
    pub shards: Vec<ShardEntry>,
}

impl HookEntry {
    pub fn rows(&self) -> u64 {
        self.shards.iter().map(|s| s.rows).sum()
    }
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

/// The parsed `manifest.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    #[serde(default)]
    pub model: Option<ModelInfo>,
    #[serde(default)]
    pub tokenizer: Option<TokenizerInfo>,
    /// Activation tables by TransformerLens hook name.
    #[serde(default)]
    pub hooks: BTreeMap<String, HookEntry>,
    /// Settings and progress of the capture that filled `hooks`, committed atomically with the
    /// shards it describes. Read it typed, through [`Manifest::capture_state`]
    /// ([`crate::capture::CaptureState`]); kept as JSON here so that a malformed record is an
    /// error for the readers that need it, not for every reader of the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capture: Option<serde_json::Value>,
    /// Dictionaries by name (`dictionaries/<name>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dictionaries: BTreeMap<String, crate::dictionaries::DictEntry>,
    /// Feature analyses by dictionary name (`features/<dict>/`, `index/<dict>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub features: BTreeMap<String, crate::features::FeaturesEntry>,
    /// Explanations and scores by dictionary name (`explanations/<dict>/`, `index/<dict>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub explanations: BTreeMap<String, crate::explanations::ExplanationsEntry>,
    /// Attention-head scores by name (`heads/<name>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub heads: BTreeMap<String, crate::heads::HeadsEntry>,
    /// Task circuits by name (`circuits/<name>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub circuits: BTreeMap<String, crate::circuits::CircuitEntry>,
    /// Evaluations of the circuit methods on a task, by name (`circuits/evals/<name>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub circuit_evals: BTreeMap<String, crate::circuits::CircuitEvalEntry>,
    /// Attribution graphs by name (`circuits/graphs/<name>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub graphs: BTreeMap<String, crate::graphs::GraphEntry>,
    /// Hand-made supernodes by graph name (`circuits/supernodes/<graph>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub graph_supernodes: BTreeMap<String, crate::graphs::SupernodesEntry>,
    /// Expert tables by source name (`experts/<dict or hook>/`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub experts: BTreeMap<String, crate::experts::ExpertsEntry>,
}

impl Default for Manifest {
    fn default() -> Self {
        Manifest {
            format: STORE_FORMAT.to_string(),
            version: STORE_VERSION,
            model: None,
            tokenizer: None,
            hooks: BTreeMap::new(),
            capture: None,
            dictionaries: BTreeMap::new(),
            features: BTreeMap::new(),
            explanations: BTreeMap::new(),
            heads: BTreeMap::new(),
            circuits: BTreeMap::new(),
            circuit_evals: BTreeMap::new(),
            graphs: BTreeMap::new(),
            graph_supernodes: BTreeMap::new(),
            experts: BTreeMap::new(),
        }
    }
}

impl Manifest {
    /// Parse manifest text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Manifest> {
        // Check format and version before the full parse so that a newer layout gets a version
        // error, not a confusing missing-field error.
        let value: serde_json::Value =
            serde_json::from_str(text).with_context(|| format!("{} is not valid JSON", path.display()))?;
        let format = value.get("format").and_then(|v| v.as_str());
        if format != Some(STORE_FORMAT) {
            bail!(
                "{} is not a Loupe manifest (format is {format:?}, expected {STORE_FORMAT:?})",
                path.display()
            );
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(u64::from(STORE_VERSION)) {
            let shown = version.map_or("missing".to_string(), |v| v.to_string());
            bail!(
                "store version {shown} in {} is not supported (this loupe reads version {STORE_VERSION})",
                path.display()
            );
        }
        let manifest: Manifest =
            serde_json::from_value(value).with_context(|| format!("{} is malformed", path.display()))?;
        for (hook, entry) in &manifest.hooks {
            check_hook_name(hook).with_context(|| format!("{} is malformed", path.display()))?;
            if entry.spec.d == 0 {
                bail!("{} is malformed: hook {hook} has d = 0", path.display());
            }
            for shard in &entry.shards {
                check_file_name(&shard.file)
                    .with_context(|| format!("{} is malformed (hook {hook})", path.display()))?;
            }
        }
        for (name, entry) in &manifest.dictionaries {
            crate::dictionaries::check_dictionary_name(name)
                .with_context(|| format!("{} is malformed", path.display()))?;
            for file in &entry.files {
                let ok = file.file.split('/').all(|part| check_file_name(part).is_ok());
                if !ok {
                    bail!("{} is malformed: dictionary {name} lists file {:?}", path.display(), file.file);
                }
            }
        }
        for (name, entry) in &manifest.features {
            crate::dictionaries::check_dictionary_name(name)
                .with_context(|| format!("{} is malformed", path.display()))?;
            let ok = |file: &str| {
                let mut parts = file.split('/');
                matches!(parts.next(), Some(crate::features::FEATURES_DIR | crate::features::INDEX_DIR))
                    && parts.next() == Some(name.as_str())
                    && parts.all(|part| check_file_name(part).is_ok())
            };
            if let Some(file) = entry.files.iter().find(|f| !ok(&f.file)) {
                bail!("{} is malformed: the analysis of {name} lists file {:?}", path.display(), file.file);
            }
        }
        for (name, entry) in &manifest.explanations {
            crate::dictionaries::check_dictionary_name(name)
                .with_context(|| format!("{} is malformed", path.display()))?;
            let ok = |file: &str| {
                let mut parts = file.split('/');
                matches!(
                    parts.next(),
                    Some(crate::explanations::EXPLANATIONS_DIR | crate::features::INDEX_DIR)
                ) && parts.next() == Some(name.as_str())
                    && parts.all(|part| check_file_name(part).is_ok())
            };
            if let Some(file) = entry.files.iter().find(|f| !ok(&f.file)) {
                bail!(
                    "{} is malformed: the explanations of {name} list file {:?}",
                    path.display(),
                    file.file
                );
            }
        }
        Ok(manifest)
    }

    pub fn to_json(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).expect("manifest serializes");
        text.push('\n');
        text
    }
}

/// Hook names become directory names, so they are restricted to TransformerLens-style characters.
pub fn check_hook_name(hook: &str) -> Result<()> {
    let ok_chars = hook.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if hook.is_empty() || !ok_chars || hook.starts_with('.') || hook.contains("..") {
        bail!(
            "invalid hook name {hook:?} (expected a TransformerLens name such as blocks.6.hook_resid_post)"
        );
    }
    Ok(())
}

fn check_file_name(file: &str) -> Result<()> {
    let ok = !file.is_empty()
        && !file.starts_with('.')
        && file.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-');
    if !ok {
        bail!("invalid shard file name {file:?}");
    }
    Ok(())
}
