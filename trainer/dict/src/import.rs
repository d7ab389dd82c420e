//! `loupe import`: bring an SAELens or sparsify dictionary into a store, so that analysis and the
//! app treat it like one Loupe trained.
//!
//! The folder is read and checked in full ([`super::io::load_sae`]), then written back in Loupe's
//! SAELens layout under `dictionaries/<name>/` and listed (status `done`). The hook is the
//! checkpoint's `metadata.hook_name` unless given (sparsify names hooks after modules, e.g.
//! `layers.6`, which are not TransformerLens names); when the store has activations at that hook,
//! their width must match. A checkpoint made for another model than the store's is imported with
//! a `warning:` line naming both.
//!
//! A transcoder folder (SAELens 6's transcoder layout, [`super::transcode`]) is imported the same
//! way, reading its `metadata.hook_name` (unless `--hook` is given) and writing `hook_name_out`:
//! listed with both hooks, with the widths of each checked against the store's activations.

use std::path::Path;

use anyhow::{Result, bail};
use loupe_store::{DictEntry, Store};

use super::Dictionary;
use super::io::{SaeMeta, load_sae, save_sae};
use super::transcode;

/// Import the dictionary in `src` into the store at `store_path`; returns its name.
pub fn import(store_path: &Path, src: &Path, name: Option<&str>, hook: Option<&str>) -> Result<String> {
    if !src.is_dir() {
        bail!("{} is not a dictionary folder (expected cfg.json + safetensors weights)", src.display());
    }
    if transcode::is_transcoder_dir(src) {
        return import_transcoder(store_path, src, name, hook);
    }
    let (sae, mut meta) = load_sae(src)?;
    let hook = match hook {
        Some(h) => h.to_string(),
        None if meta.hook_name.contains("hook_") => meta.hook_name.clone(),
        None => bail!(
            "{} names no TransformerLens hook (metadata says {:?}); give --hook",
            src.display(),
            meta.hook_name
        ),
    };
    let store = Store::open_rw(store_path)?;
    let manifest = store.manifest();
    if let Some(entry) = manifest.hooks.get(&hook)
        && entry.spec.d as usize != sae.d_in()
    {
        bail!(
            "the dictionary reads width {}, but hook {hook} in the store has width {}",
            sae.d_in(),
            entry.spec.d
        );
    }
    let name = target_name(&manifest, src, name)?;
    let dir = store.dictionary_dir(&name);
    // Unlisted leftovers of an interrupted import are not part of the store: remove them, but
    // only if each is a file an import writes.
    loupe_store::fsutil::clear_leftovers(&dir, |f| IMPORT_FILES.contains(&f))?;
    meta.hook_name = hook.clone();
    check_model(&manifest, src, &mut meta);
    save_sae(&sae, &meta, &dir)?;
    let entry = DictEntry {
        hook,
        output_hook: None,
        kind: "sae".to_string(),
        variant: sae.spec.variant.name().to_string(),
        d_in: sae.d_in() as u32,
        n_features: sae.n_features() as u32,
        status: "done".to_string(),
        step: 0,
        tokens: 0,
        files: Vec::new(),
    };
    store.commit_dictionary(&name, entry, IMPORT_FILES)?;
    Ok(name)
}

/// The files an import writes into `dictionaries/<name>/`.
const IMPORT_FILES: &[&str] = &["cfg.json", "sae_weights.safetensors"];
/// The files a transcoder import writes.
const TRANSCODER_FILES: &[&str] = &["cfg.json", "sae_weights.safetensors", "circuit_tracer.safetensors"];

/// The dictionary's name in the store: given, or the folder's; checked and not yet taken.
fn target_name(manifest: &loupe_store::Manifest, src: &Path, name: Option<&str>) -> Result<String> {
    let name = name.map(str::to_string).unwrap_or_else(|| {
        src.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "imported".to_string())
    });
    loupe_store::dictionaries::check_dictionary_name(&name)?;
    if manifest.dictionaries.contains_key(&name) {
        bail!("the store already has a dictionary named {name} (give another --name)");
    }
    Ok(name)
}

/// Fill in the store's model name, or warn when the checkpoint names another model.
fn check_model(manifest: &loupe_store::Manifest, src: &Path, meta: &mut SaeMeta) {
    if let Some(model) = &manifest.model {
        if meta.model_name.is_empty() {
            meta.model_name = model.name.clone();
        } else if !same_model(&meta.model_name, &model.name) {
            eprintln!(
                "warning: {} was trained on model {:?}, but the store's activations come from {:?}; \
                 importing it anyway",
                src.display(),
                meta.model_name,
                model.name
            );
        }
    }
}

/// [`import`] for a transcoder folder: `hook` (or the file's `metadata.hook_name`) is the input
/// hook; the output hook is the file's `hook_name_out`.
fn import_transcoder(
    store_path: &Path,
    src: &Path,
    name: Option<&str>,
    hook: Option<&str>,
) -> Result<String> {
    let (tc, mut meta) = transcode::load(src)?;
    if let Some(h) = hook {
        meta.input_hook = Some(h.to_string());
    }
    let input = meta.input_hook.clone().unwrap_or_default();
    let output = meta.hook_name.clone();
    for h in [&input, &output] {
        if !h.contains("hook_") {
            bail!("{} names no TransformerLens hooks (input {input:?}, output {output:?})", src.display());
        }
    }
    let store = Store::open_rw(store_path)?;
    let manifest = store.manifest();
    for h in [&input, &output] {
        if let Some(entry) = manifest.hooks.get(h)
            && entry.spec.d as usize != tc.d_in()
        {
            bail!(
                "the transcoder has width {}, but hook {h} in the store has width {}",
                tc.d_in(),
                entry.spec.d
            );
        }
    }
    let name = target_name(&manifest, src, name)?;
    let dir = store.dictionary_dir(&name);
    loupe_store::fsutil::clear_leftovers(&dir, |f| TRANSCODER_FILES.contains(&f))?;
    check_model(&manifest, src, &mut meta);
    transcode::save(&tc, &meta, None, &dir, true)?;
    let entry = DictEntry {
        hook: input,
        output_hook: Some(output),
        kind: "sae".to_string(),
        variant: tc.sae.spec.variant.name().to_string(),
        d_in: tc.d_in() as u32,
        n_features: tc.n_features() as u32,
        status: "done".to_string(),
        step: 0,
        tokens: 0,
        files: Vec::new(),
    };
    store.commit_dictionary(&name, entry, TRANSCODER_FILES)?;
    Ok(name)
}

/// Whether two model names name the same model: equal up to case and an organisation prefix
/// (SAELens writes `gemma-3-270m` or `google/gemma-3-270m`).
fn same_model(a: &str, b: &str) -> bool {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_ascii_lowercase();
    base(a) == base(b)
}
