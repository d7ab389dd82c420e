//! `loupe graph export`: a stored graph as circuit-tracer's JSON (the `Model` of its
//! `frontend/graph_models.py`, as `utils/create_graph_files.py` fills it): `metadata`, `qParams`,
//! `nodes` (node_id, feature, layer, ctx_idx, feature_type, token_prob, is_target_logit, run_idx,
//! reverse_ctx_idx, jsNodeId, clerp, influence, activation) and `links` (source, target, weight).
//!
//! The file is written node by node and link by link through a buffered writer into a temporary
//! file, renamed into place at the end: a big graph is never one document in memory, and a
//! failed export leaves no partial file.
//!
//! Two fields differ from circuit-tracer's by necessity: a feature's `clerp` is its explanation
//! from the store (its layer's dictionary, or the CLT's; empty when none), and `influence` (the
//! cumulative share of influence, most influential first) is the share over the kept nodes, as
//! the store keeps only those (circuit-tracer's total also counts the pruned nodes).

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use anyhow::{Context, Result, bail};
use loupe_model::Session;
use loupe_model::tokenizer::Tokenizer;
use loupe_store::fsutil::{commit_tmp, tmp_path};
use loupe_store::{GraphEntry, GraphNodeRow, Store};
use serde::Serialize;

/// circuit-tracer's `Node` (`frontend/graph_models.py`).
#[derive(Serialize)]
#[allow(non_snake_case)] // circuit-tracer's field names
struct JsonNode<'a> {
    node_id: &'a str,
    feature: i64,
    layer: String,
    ctx_idx: u32,
    feature_type: &'static str,
    token_prob: f32,
    is_target_logit: bool,
    run_idx: u32,
    reverse_ctx_idx: u32,
    jsNodeId: String,
    clerp: String,
    influence: Option<f32>,
    activation: Option<f32>,
}

/// circuit-tracer's `Link`.
#[derive(Serialize)]
struct JsonLink<'a> {
    source: &'a str,
    target: &'a str,
    weight: f32,
}

/// circuit-tracer's `Metadata`.
#[derive(Serialize)]
struct Metadata<'a> {
    slug: &'a str,
    scan: String,
    transcoder_list: &'a [String],
    prompt_tokens: &'a [String],
    prompt: &'a str,
    node_threshold: f32,
    schema_version: u32,
}

/// circuit-tracer's `QParams`, as `create_graph_files` leaves them.
#[derive(Serialize)]
#[allow(non_snake_case)]
struct QParams {
    pinnedIds: [String; 0],
    supernodes: [Vec<String>; 0],
    linkType: &'static str,
    clickedId: &'static str,
    sg_pos: &'static str,
}

/// The Cantor pairing circuit-tracer numbers features with (`_cantor_pairing`).
fn cantor(x: u64, y: u64) -> i64 {
    ((x + y) * (x + y + 1) / 2 + y) as i64
}

/// Write graph `name` of `store` to `out`; returns the nodes and links written.
pub fn export(store: &Store, name: &str, out: &Path) -> Result<(u64, u64)> {
    if !store.manifest().graphs.contains_key(name) {
        let names = store.graph_names();
        let names = if names.is_empty() { "none".to_string() } else { names.join(", ") };
        bail!("store {} has no attribution graph named {name:?} (it has: {names})", store.root().display());
    }
    let graph = store.read_graph(name)?.context("the graph vanished while being read")?;
    let entry = &graph.entry;
    let clerps = Clerps::load(store, entry)?;
    let tokenizer = Session::locate(&store.manifest(), None, None)
        .ok()
        .flatten()
        .and_then(|path| Tokenizer::load(&path).ok());
    let cumulative = cumulative_shares(&graph.nodes);

    let tmp = tmp_path(out);
    let result = (|| -> Result<()> {
        let file = File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        let mut w = BufWriter::new(file);
        let scan = match entry.transcoders.as_slice() {
            [one] => one.clone(),
            many => format!("custom-{}", many.join("-")),
        };
        let metadata = Metadata {
            slug: name,
            scan,
            transcoder_list: &entry.transcoders,
            prompt_tokens: &entry.token_strs,
            prompt: &entry.prompt,
            node_threshold: entry.settings.node_threshold,
            schema_version: 1,
        };
        let qparams = QParams { pinnedIds: [], supernodes: [], linkType: "both", clickedId: "", sg_pos: "" };
        write!(w, "{{\"metadata\":")?;
        serde_json::to_writer(&mut w, &metadata)?;
        write!(w, ",\"qParams\":")?;
        serde_json::to_writer(&mut w, &qparams)?;
        write!(w, ",\"nodes\":[")?;
        let first_logit = graph.nodes.iter().position(|n| n.kind == "logit");
        for (i, node) in graph.nodes.iter().enumerate() {
            if i > 0 {
                write!(w, ",")?;
            }
            let target = first_logit == Some(i);
            let node = json_node(node, entry, &clerps, tokenizer.as_ref(), cumulative[i], target);
            serde_json::to_writer(&mut w, &node)?;
        }
        write!(w, "],\"links\":[")?;
        for (i, edge) in graph.edges.iter().enumerate() {
            if i > 0 {
                write!(w, ",")?;
            }
            let link = JsonLink {
                source: &graph.nodes[edge.source as usize].node_id,
                target: &graph.nodes[edge.target as usize].node_id,
                weight: edge.weight,
            };
            serde_json::to_writer(&mut w, &link)?;
        }
        write!(w, "]}}")?;
        let file = w.into_inner().map_err(|e| e.into_error())?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tmp);
        return Err(e.context(format!("cannot write {}", out.display())));
    }
    commit_tmp(&tmp, out)?;
    Ok((graph.nodes.len() as u64, graph.edges.len() as u64))
}

/// One stored node as circuit-tracer's JSON node (`Node.feature_node`, `error_node`,
/// `token_node`, `logit_node`).
fn json_node<'a>(
    node: &'a GraphNodeRow,
    entry: &GraphEntry,
    clerps: &Clerps,
    tokenizer: Option<&Tokenizer>,
    cumulative: f32,
    target_logit: bool,
) -> JsonNode<'a> {
    let (layer, pos) = (u64::from(node.layer), node.position);
    let mut json = JsonNode {
        node_id: &node.node_id,
        feature: 0,
        layer: layer.to_string(),
        ctx_idx: pos,
        feature_type: "",
        token_prob: 0.0,
        is_target_logit: false,
        run_idx: 0,
        reverse_ctx_idx: 0,
        jsNodeId: String::new(),
        clerp: String::new(),
        influence: Some(cumulative),
        activation: None,
    };
    match node.kind.as_str() {
        "feature" => {
            json.feature = cantor(layer, u64::from(node.feature));
            json.feature_type = "cross layer transcoder";
            json.jsNodeId = format!("{layer}_{}-0", node.feature);
            json.clerp = clerps.get(node.layer as usize, node.feature);
            json.activation = Some(node.activation);
        }
        "error" => {
            json.feature = -1;
            json.feature_type = "mlp reconstruction error";
            json.jsNodeId = format!("{layer}_{pos}-0");
        }
        "embedding" => {
            json.feature = i64::from(pos);
            json.layer = "E".to_string();
            json.feature_type = "embedding";
            json.jsNodeId = format!("E_{}-{pos}", node.feature);
        }
        _ => {
            let p = node.probability.unwrap_or(0.0);
            let token = match tokenizer.and_then(|t| t.decode(&[node.feature]).ok()) {
                Some(text) => text,
                None => format!("#{}", node.feature),
            };
            json.feature = i64::from(node.feature);
            json.layer = (entry.n_layers + 1).to_string();
            json.feature_type = "logit";
            json.token_prob = p;
            json.is_target_logit = target_logit;
            json.jsNodeId = format!("L_{}-{pos}", node.feature);
            json.clerp = format!("Output \"{token}\" (p={p:.3})");
            json.influence = None;
        }
    }
    json
}

/// Each stored node's cumulative share of the stored influence, most influential first (logits,
/// whose stored influence is their probability, count as circuit-tracer's zero).
fn cumulative_shares(nodes: &[GraphNodeRow]) -> Vec<f32> {
    let influence: Vec<f64> =
        nodes.iter().map(|n| if n.kind == "logit" { 0.0 } else { f64::from(n.influence) }).collect();
    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.sort_by(|&a, &b| influence[b].total_cmp(&influence[a]));
    let total: f64 = influence.iter().sum();
    let mut out = vec![0.0f32; nodes.len()];
    let mut sum = 0.0;
    for i in order {
        sum += influence[i];
        out[i] = (sum / total.max(f64::MIN_POSITIVE)) as f32;
    }
    out
}

/// The explanations of the graph's transcoders, by (layer, feature).
struct Clerps {
    /// Per-layer dictionaries: layer → feature → text; a CLT: one map for every layer.
    by_layer: HashMap<usize, HashMap<u32, String>>,
    clt: Option<HashMap<u32, String>>,
}

impl Clerps {
    fn load(store: &Store, entry: &GraphEntry) -> Result<Clerps> {
        let manifest = store.manifest();
        let texts = |dict: &str| -> Result<HashMap<u32, String>> {
            let mut map = HashMap::new();
            // delphi explanations before offline ones: the first kept wins.
            let mut all = store.explanations(dict)?.explanations;
            all.sort_by_key(|e| e.explainer != "delphi");
            for e in all {
                if let Some(text) = e.explanation {
                    map.entry(e.feature_id).or_insert(text);
                }
            }
            Ok(map)
        };
        if entry.transcoder_kind == "clt" {
            let clt = match entry.transcoders.first() {
                Some(name) => Some(texts(name)?),
                None => None,
            };
            return Ok(Clerps { by_layer: HashMap::new(), clt });
        }
        let mut by_layer = HashMap::new();
        for name in &entry.transcoders {
            let Some(dict) = manifest.dictionaries.get(name) else { continue };
            if let Some(layer) = hook_layer(&dict.hook) {
                by_layer.insert(layer, texts(name)?);
            }
        }
        Ok(Clerps { by_layer, clt: None })
    }

    fn get(&self, layer: usize, feature: u32) -> String {
        let map = self.clt.as_ref().or_else(|| self.by_layer.get(&layer));
        map.and_then(|m| m.get(&feature)).cloned().unwrap_or_default()
    }
}

/// The layer of a `blocks.L.…` hook.
fn hook_layer(hook: &str) -> Option<usize> {
    hook.strip_prefix("blocks.")?.split('.').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cantor_matches_circuit_tracer() {
        // (x + y)(x + y + 1)/2 + y
        assert_eq!(cantor(0, 0), 0);
        assert_eq!(cantor(3, 1024), 1027 * 1028 / 2 + 1024);
        assert_eq!(hook_layer("blocks.12.ln2.hook_normalized"), Some(12));
        assert_eq!(hook_layer("hook_embed"), None);
    }
}

#[cfg(test)]
mod export_tests {
    use loupe_store::GraphSettings;
    use serde_json::Value;

    use super::*;
    use crate::graphs::prune::prune;
    use crate::graphs::prune::tests::cases;
    use crate::graphs::run;

    /// A fixture graph pruned, written through `loupe graph`'s writer and exported: the JSON has
    /// circuit-tracer's structure, every kept node and edge, links between node ids of the file.
    /// With `LOUPE_CT_PYTHON` set (circuit-tracer's venv), circuit-tracer's own models check it
    /// too (`tests/fixtures/graph_export_check.py`).
    #[test]
    fn export_writes_circuit_tracer_json() {
        let case = &cases()[1];
        let pruned = prune(&case.raw, &case.settings).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path().join("store")).unwrap();
        let n_pos = case.raw.nodes.iter().filter(|n| n.kind == crate::graphs::NodeKind::Embedding).count();
        let entry = GraphEntry {
            prompt: "a b c".into(),
            tokens: (0..n_pos as u32).map(|p| 100 + p).collect(),
            token_strs: (0..n_pos).map(|p| format!("t{p}")).collect(),
            transcoders: vec!["tc0".into(), "tc1".into(), "tc2".into()],
            transcoder_kind: "plt".into(),
            n_layers: 3,
            settings: GraphSettings::default(),
            active_features: 10,
            n_nodes: pruned.nodes.len() as u64,
            n_edges: pruned.edges.len() as u64,
            replacement_score: pruned.replacement_score,
            completeness_score: pruned.completeness_score,
            replacement_score_unpruned: pruned.replacement_score_unpruned,
            completeness_score_unpruned: pruned.completeness_score_unpruned,
            wall_s: 0.5,
            model: "m".into(),
            model_sha256: "00".into(),
            files: Vec::new(),
        };
        run::write(&store, "g", &case.raw, &pruned, entry).unwrap();
        let out = dir.path().join("g.json");
        let (nodes, links) = export(&store, "g", &out).unwrap();
        assert_eq!((nodes, links), (pruned.nodes.len() as u64, pruned.edges.len() as u64));
        assert!(!tmp_path(&out).exists());

        let json: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
        // (serde_json's maps are sorted by key.)
        let keys = |v: &Value| -> Vec<String> { v.as_object().unwrap().keys().cloned().collect() };
        assert_eq!(keys(&json), ["links", "metadata", "nodes", "qParams"]);
        assert_eq!(json["metadata"]["slug"], "g");
        assert_eq!(json["metadata"]["prompt_tokens"].as_array().unwrap().len(), n_pos);
        let json_nodes = json["nodes"].as_array().unwrap();
        assert_eq!(json_nodes.len(), pruned.nodes.len());
        let mut node_keys = [
            "node_id",
            "feature",
            "layer",
            "ctx_idx",
            "feature_type",
            "token_prob",
            "is_target_logit",
            "run_idx",
            "reverse_ctx_idx",
            "jsNodeId",
            "clerp",
            "influence",
            "activation",
        ];
        node_keys.sort();
        let ids: std::collections::HashSet<&str> =
            json_nodes.iter().map(|n| n["node_id"].as_str().unwrap()).collect();
        for (n, &i) in json_nodes.iter().zip(&pruned.nodes) {
            assert_eq!(keys(n), node_keys);
            let raw = &case.raw.nodes[i as usize];
            assert_eq!(n["ctx_idx"], raw.position);
            match raw.kind {
                crate::graphs::NodeKind::Feature => {
                    assert_eq!(n["feature_type"], "cross layer transcoder");
                    assert_eq!(n["node_id"], format!("{}_{}_{}", raw.layer, raw.feature, raw.position));
                    assert_eq!(n["activation"].as_f64().unwrap() as f32, raw.activation);
                }
                crate::graphs::NodeKind::Logit => {
                    assert_eq!(n["layer"], "4");
                    assert!(n["influence"].is_null());
                    assert_eq!(n["token_prob"].as_f64().unwrap() as f32, raw.probability.unwrap());
                }
                _ => assert!(n["activation"].is_null()),
            }
        }
        assert_eq!(json_nodes.iter().filter(|n| n["is_target_logit"] == true).count(), 1);
        let json_links = json["links"].as_array().unwrap();
        assert_eq!(json_links.len(), pruned.edges.len());
        for (l, &(_, _, w)) in json_links.iter().zip(&pruned.edges) {
            assert!(
                ids.contains(l["source"].as_str().unwrap()) && ids.contains(l["target"].as_str().unwrap())
            );
            assert_eq!(l["weight"].as_f64().unwrap() as f32, w);
        }

        if let Ok(python) = std::env::var("LOUPE_CT_PYTHON") {
            let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/graph_export_check.py");
            let status = std::process::Command::new(python).arg(script).arg(&out).status().unwrap();
            assert!(status.success(), "circuit-tracer's models reject the export");
        }

        let err = export(&store, "nope", &dir.path().join("nope.json")).unwrap_err();
        assert!(err.to_string().contains("no attribution graph named \"nope\""), "{err}");
        assert!(!dir.path().join("nope.json").exists());
    }
}
