//! `loupe graph`: the attribution graph of one prompt through a set of transcoders, into the
//! store's `circuits/graphs/<name>/`.
//!
//! Everything that can be checked is checked before the model runs: the graph's name (and that
//! it is new, unless `--overwrite`), the transcoders (each dictionary's recorded model against
//! the store's; the set covers every layer once, at the model's width) and the prompt's length
//! against the model's context. Then: tokenize (BOS first), [`attribute`], [`prune`], and the
//! kept nodes and edges streamed into the store a batch at a time ([`Store::start_graph`]).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use loupe_dict::transcoder::TranscoderSet;
use loupe_model::Session;
use loupe_model::tokenizer::Tokenizer;
use loupe_store::circuits::check_circuit_name;
use loupe_store::{GraphEdgeRow, GraphEntry, GraphNodeRow, GraphSettings, Progress, Store};

use super::attribute::attribute;
use super::prune::{Pruned, prune};
use super::{Node, NodeKind, RawGraph};

/// What `loupe graph` is asked.
#[derive(Clone, Debug)]
pub struct GraphJob {
    pub store: PathBuf,
    /// The model (default: the one the store records).
    pub model: Option<PathBuf>,
    /// The transcoders replacing the MLPs: one per layer, or one CLT.
    pub transcoders: Vec<String>,
    pub prompt: String,
    /// The graph's name (default: derived from the prompt).
    pub name: Option<String>,
    /// Replace a graph of the same name (without it, an existing name is an error).
    pub overwrite: bool,
    pub settings: GraphSettings,
}

/// Rows per record batch of the nodes and edges tables.
const BATCH_ROWS: usize = 65_536;

/// Build and write the graph; returns its name and manifest entry.
pub fn run(job: &GraphJob, progress: &dyn Progress) -> Result<(String, GraphEntry)> {
    let name = job.name.clone().unwrap_or_else(|| default_name(&job.prompt));
    check_circuit_name(&name)?;
    let store = Store::open_rw(&job.store)?;
    let manifest = store.manifest();
    if manifest.graphs.contains_key(&name) && !job.overwrite {
        bail!(
            "store {} already has an attribution graph named {name} (pass --overwrite to replace it, or give another --name)",
            job.store.display()
        );
    }
    check_models(&store, &job.transcoders)?;
    let session = Session::open(&manifest, job.model.as_deref(), Some("pass --model"))?;
    let model = session.model();
    let config = model.config().clone();
    progress.stage("loading transcoders");
    let transcoders = TranscoderSet::from_store(&store, &job.transcoders, config.n_layers)?;
    if transcoders.d_model != config.d_model || transcoders.n_layers() != config.n_layers {
        bail!(
            "the transcoders {} are of width {} over {} layers, but the model has width {} and {} layers",
            job.transcoders.join(", "),
            transcoders.d_model,
            transcoders.n_layers(),
            config.d_model,
            config.n_layers
        );
    }
    let tokenizer = session.tokenizer()?;
    let tokens = tokenize(tokenizer, &job.prompt)?;
    if tokens.len() > config.max_context {
        bail!(
            "the prompt is {} tokens (with BOS), longer than the model's context of {} tokens",
            tokens.len(),
            config.max_context
        );
    }
    let identity = crate::circuits::run::model_identity(&store, &session)?;

    let start = Instant::now();
    let raw = attribute(model, &transcoders, &tokens, &job.settings, progress)?;
    progress.stage("pruning");
    let pruned = prune(&raw, &job.settings)?;
    let wall_s = start.elapsed().as_secs_f64();

    progress.stage("writing");
    let (model_name, model_sha256) = identity;
    let entry = GraphEntry {
        prompt: job.prompt.clone(),
        token_strs: token_texts(tokenizer, &tokens),
        tokens,
        transcoders: transcoders.names.clone(),
        transcoder_kind: transcoders.kind.clone(),
        n_layers: config.n_layers as u32,
        settings: job.settings.clone(),
        active_features: raw.active_features,
        n_nodes: pruned.nodes.len() as u64,
        n_edges: pruned.edges.len() as u64,
        replacement_score: pruned.replacement_score,
        completeness_score: pruned.completeness_score,
        replacement_score_unpruned: pruned.replacement_score_unpruned,
        completeness_score_unpruned: pruned.completeness_score_unpruned,
        wall_s,
        model: model_name,
        model_sha256,
        files: Vec::new(),
    };
    write(&store, &name, &raw, &pruned, entry.clone())?;
    Ok((name, entry))
}

/// Each transcoder's recorded model (`cfg.json`'s `metadata.model_name`), where it records one,
/// against the store's model. Unknown names are left to [`TranscoderSet::from_store`].
fn check_models(store: &Store, names: &[String]) -> Result<()> {
    let manifest = store.manifest();
    let Some(model) = &manifest.model else { return Ok(()) };
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_ascii_lowercase();
    for name in names.iter().filter(|n| manifest.dictionaries.contains_key(*n)) {
        let cfg = store.dictionary_dir(name).join("cfg.json");
        let Ok(text) = std::fs::read_to_string(&cfg) else { continue };
        let cfg: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{} is not JSON", cfg.display()))?;
        let recorded = cfg["metadata"]["model_name"].as_str().or(cfg["model_name"].as_str()).unwrap_or("");
        if !recorded.is_empty() && base(recorded) != base(&model.name) {
            bail!(
                "transcoder {name} was trained on model {recorded:?}, but the store's model is {:?}",
                model.name
            );
        }
    }
    Ok(())
}

/// The prompt's tokens, BOS first.
fn tokenize(tokenizer: &Tokenizer, prompt: &str) -> Result<Vec<u32>> {
    let bos = tokenizer.bos_id().context("the model's tokenizer has no BOS token")?;
    let mut tokens = vec![bos];
    tokens.extend(tokenizer.encode(prompt, false)?);
    Ok(tokens)
}

/// Each token's text as a reader sees it (decoded alone; its vocabulary spelling when that
/// decodes to nothing or to no valid text).
pub fn token_texts(tokenizer: &Tokenizer, tokens: &[u32]) -> Vec<String> {
    let spelled = tokenizer.token_strings(tokens);
    tokens
        .iter()
        .zip(spelled)
        .map(|(&t, spelled)| match tokenizer.decode(&[t]) {
            Ok(text) if !text.is_empty() && !text.contains('\u{FFFD}') => text,
            _ => spelled,
        })
        .collect()
}

/// circuit-tracer's `node_id` of a node (`create_graph_files.py`): `{layer}_{feature}_{pos}` for a
/// feature, `0_{layer}_{pos}` for an error, `E_{token}_{pos}` for an embedding,
/// `{n_layers + 1}_{token}_{pos}` for a logit. (circuit-tracer's error ids can equal a layer-0
/// feature's: error `0_3_5` and feature 3 of layer 0 at position 5.)
pub fn node_id(node: &Node, n_layers: usize) -> String {
    match node.kind {
        NodeKind::Feature => format!("{}_{}_{}", node.layer, node.feature, node.position),
        NodeKind::Error => format!("0_{}_{}", node.layer, node.position),
        NodeKind::Embedding => format!("E_{}_{}", node.feature, node.position),
        NodeKind::Logit => format!("{}_{}_{}", n_layers + 1, node.feature, node.position),
    }
}

/// The kept nodes and edges as the store's rows, a batch at a time, then the entry.
pub(crate) fn write(
    store: &Store,
    name: &str,
    raw: &RawGraph,
    pruned: &Pruned,
    entry: GraphEntry,
) -> Result<()> {
    let n_layers = entry.n_layers as usize;
    // Edges refer to the kept nodes' row numbers.
    let mut row_of = vec![u32::MAX; raw.nodes.len()];
    for (row, &i) in pruned.nodes.iter().enumerate() {
        row_of[i as usize] = row as u32;
    }
    let mut writer = store.start_graph(name)?;
    for chunk in pruned.nodes.chunks(BATCH_ROWS) {
        let rows: Vec<GraphNodeRow> = chunk
            .iter()
            .map(|&i| {
                let node = &raw.nodes[i as usize];
                GraphNodeRow {
                    node: row_of[i as usize],
                    node_id: node_id(node, n_layers),
                    kind: node.kind.name().to_string(),
                    layer: node.layer as u16,
                    position: node.position as u32,
                    feature: node.feature,
                    activation: node.activation,
                    probability: node.probability,
                    influence: pruned.influence[i as usize],
                }
            })
            .collect();
        writer.write_nodes(&rows)?;
    }
    for chunk in pruned.edges.chunks(BATCH_ROWS) {
        let rows: Vec<GraphEdgeRow> = chunk
            .iter()
            .map(|&(s, t, weight)| GraphEdgeRow {
                source: row_of[s as usize],
                target: row_of[t as usize],
                weight,
            })
            .collect();
        writer.write_edges(&rows)?;
    }
    writer.commit(entry)
}

/// The default name of a prompt's graph.
pub fn default_name(prompt: &str) -> String {
    let words: String = prompt
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
        .collect();
    let words: Vec<&str> = words.split('-').filter(|w| !w.is_empty()).take(6).collect();
    if words.is_empty() { "graph".to_string() } else { words.join("-") }
}

/// Where `loupe graph export` writes when no `--out` is given.
pub fn default_export_path(name: &str) -> PathBuf {
    Path::new(&format!("{name}.json")).to_path_buf()
}
