//! What the app reads of one dictionary: its analysis ([`FeatureTables`], memory-mapped), its
//! explanations and scores, and per-feature summaries for the feature list. Loaded once per
//! dictionary on a background thread, then shared read-only (`Arc`) by every view.

use std::sync::Arc;

use anyhow::Result;
use loupe_store::{Explanation, FeatureTables, Score, Store};

use super::jobs::Progress;

/// Marks "no explanation" in [`DictData::shown`].
const NONE: u32 = u32::MAX;

/// One analysed dictionary, as the views read it.
pub struct DictData {
    pub name: String,
    /// `sae/topk`, `monet/monet`, ...: kind and variant from the manifest.
    pub kind: String,
    pub hook: String,
    pub tables: FeatureTables,
    pub explanations: Vec<Explanation>,
    pub scores: Vec<Score>,
    /// Per feature: the row of `explanations` the list shows (a successful one, LLM explainers
    /// before the offline one), or [`NONE`].
    shown: Vec<u32>,
    /// Per feature: the mean headline score of the shown explanation (NaN when unscored).
    pub score: Vec<f32>,
    /// Whether the store has a semantic-search index over the explanations.
    pub has_index: bool,
    /// Whether every feature writes a fixed direction (SAEs; not Monet experts), so the prompt
    /// lab can steer with it.
    pub steerable: bool,
}

impl DictData {
    /// Load dictionary `dict` of `store` (which has been analysed).
    pub fn load(store: &Store, dict: &str, progress: &Progress) -> Result<DictData> {
        progress.stage(format!("opening the analysis of {dict}"));
        let tables = FeatureTables::open(store, dict)?;
        let n = tables.n_features();
        let manifest = store.manifest();
        let entry = manifest.dictionaries.get(dict);
        let kind = entry.map_or("unknown".into(), |e| format!("{}/{}", e.kind, e.variant));
        let steerable = entry.is_some_and(|e| e.kind == "sae");
        let has_index = manifest.explanations.get(dict).is_some_and(|e| e.index_model.is_some());
        progress.stage(format!("reading the explanations of {dict}"));
        let all = if manifest.explanations.contains_key(dict) {
            store.explanations(dict)?
        } else {
            Default::default()
        };
        let mut shown = vec![NONE; n];
        for (i, e) in all.explanations.iter().enumerate() {
            let f = e.feature_id as usize;
            if f >= n || e.explanation.is_none() {
                continue;
            }
            let better = shown[f] == NONE || all.explanations[shown[f] as usize].explainer == "offline";
            if better {
                shown[f] = i as u32;
            }
        }
        let (mut sum, mut count) = (vec![0f32; n], vec![0u32; n]);
        for s in &all.scores {
            let f = s.feature_id as usize;
            let (Some(v), true) = (s.score, f < n) else { continue };
            if shown[f] != NONE
                && all.explanations[shown[f] as usize].explainer == s.explainer
                && v.is_finite()
            {
                sum[f] += v;
                count[f] += 1;
            }
        }
        let score =
            sum.iter().zip(&count).map(|(&s, &c)| if c > 0 { s / c as f32 } else { f32::NAN }).collect();
        Ok(DictData {
            name: dict.to_string(),
            kind,
            hook: tables.entry().hook.clone(),
            tables,
            explanations: all.explanations,
            scores: all.scores,
            shown,
            score,
            has_index,
            steerable,
        })
    }

    pub fn n_features(&self) -> usize {
        self.shown.len()
    }

    /// The explanation the list shows for feature `f`, if any.
    pub fn explanation(&self, f: u32) -> Option<&str> {
        let i = *self.shown.get(f as usize)?;
        (i != NONE).then(|| self.explanations[i as usize].explanation.as_deref()).flatten()
    }

    /// Every explanation of feature `f` with its scores.
    pub fn explanations_of(&self, f: u32) -> Vec<(&Explanation, Vec<&Score>)> {
        self.explanations
            .iter()
            .filter(|e| e.feature_id == f)
            .map(|e| {
                let scores =
                    self.scores.iter().filter(|s| s.feature_id == f && s.explainer == e.explainer).collect();
                (e, scores)
            })
            .collect()
    }
}

/// The dictionaries of `store` that have an analysis (what the app can show).
pub fn analysed(store: &Store) -> Vec<String> {
    store.manifest().features.keys().cloned().collect()
}

pub type Shared = Arc<DictData>;
