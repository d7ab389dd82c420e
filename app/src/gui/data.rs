//! What the app reads of one dictionary: its analysis ([`FeatureTables`], memory-mapped), per-
//! feature flags for the list's filters, and — loaded second, on its own thread, so that the list
//! shows before a million explanations are read — its explanations and scores ([`Notes`]).
//! Shared read-only (`Arc`) by every view.

use std::sync::{Arc, OnceLock};

use anyhow::Result;
use loupe_store::{Explanation, FeatureTables, Score, Store};

use super::jobs::Progress;

/// Marks "no explanation" in [`Notes::shown`].
const NONE: u32 = u32::MAX;
const DEAD: u8 = 1;
const DENSE: u8 = 2;

/// A dictionary's explanations and scores, with per-feature summaries for the list.
pub struct Notes {
    pub explanations: Vec<Explanation>,
    pub scores: Vec<Score>,
    /// Per feature: the row of `explanations` the list shows (a successful one, LLM explainers
    /// before the offline one), or [`NONE`].
    shown: Vec<u32>,
    /// Per feature: the mean headline score of the shown explanation (NaN when unscored).
    pub score: Vec<f32>,
    /// Rows of `explanations` and of `scores` ordered by feature (for a page's lookups).
    explanations_by_feature: Vec<u32>,
    scores_by_feature: Vec<u32>,
}

/// One analysed dictionary, as the views read it.
pub struct DictData {
    pub name: String,
    /// `sae/topk`, `monet/monet`, ...: kind and variant from the manifest.
    pub kind: String,
    pub hook: String,
    pub tables: FeatureTables,
    /// Per feature: [`DEAD`] | [`DENSE`] bits.
    flags: Vec<u8>,
    /// Filled by [`DictData::load_notes`]; `Err` when reading them failed.
    notes: OnceLock<Result<Notes, String>>,
    /// Whether the store has a semantic-search index over the explanations.
    pub has_index: bool,
    /// Whether the explanations were made from an earlier analysis than the one shown.
    pub stale: bool,
    /// Whether every feature writes a fixed direction (SAEs; not Monet experts), so the prompt
    /// lab can steer with it.
    pub steerable: bool,
}

impl Notes {
    fn load(store: &Store, dict: &str, n: usize) -> Result<Notes> {
        let all = if store.manifest().explanations.contains_key(dict) {
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
            if shown[f] == NONE || all.explanations[shown[f] as usize].explainer == "offline" {
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
        let by_feature = |ids: Vec<u32>| {
            let mut rows: Vec<u32> = (0..ids.len() as u32).collect();
            rows.sort_by_key(|&r| ids[r as usize]);
            rows
        };
        Ok(Notes {
            explanations_by_feature: by_feature(all.explanations.iter().map(|e| e.feature_id).collect()),
            scores_by_feature: by_feature(all.scores.iter().map(|s| s.feature_id).collect()),
            explanations: all.explanations,
            scores: all.scores,
            shown,
            score,
        })
    }

    /// The rows (of a table whose rows `by_feature` orders by `feature(row)`) of feature `f`.
    fn rows_of(by_feature: &[u32], feature: impl Fn(u32) -> u32, f: u32) -> &[u32] {
        let start = by_feature.partition_point(|&r| feature(r) < f);
        let end = by_feature.partition_point(|&r| feature(r) <= f);
        &by_feature[start..end]
    }
}

impl DictData {
    /// Open the analysis of dictionary `dict` of `store` (the explanations come later, from
    /// [`DictData::load_notes`]).
    pub fn load(store: &Store, dict: &str, progress: &Progress) -> Result<DictData> {
        progress.stage(format!("opening the analysis of {dict}"));
        let tables = FeatureTables::open(store, dict)?;
        let flags = (0..tables.n_features() as u32)
            .map(|f| {
                let (dead, dense) = tables.flags(f);
                (u8::from(dead) * DEAD) | (u8::from(dense) * DENSE)
            })
            .collect();
        let manifest = store.manifest();
        let entry = manifest.dictionaries.get(dict);
        Ok(DictData {
            name: dict.to_string(),
            kind: entry.map_or("unknown".into(), |e| format!("{}/{}", e.kind, e.variant)),
            hook: tables.entry().hook.clone(),
            steerable: entry.is_some_and(|e| matches!(e.kind.as_str(), "sae" | "moex")),
            has_index: manifest.explanations.get(dict).is_some_and(|e| e.index_model.is_some()),
            stale: store.explanations_stale(dict),
            tables,
            flags,
            notes: OnceLock::new(),
        })
    }

    /// Read the explanations and scores (once; later calls do nothing).
    pub fn load_notes(&self, store: &Store) {
        self.notes
            .get_or_init(|| Notes::load(store, &self.name, self.n_features()).map_err(|e| format!("{e:#}")));
    }

    /// The explanations and scores, once loaded (`Some(Err)` when reading them failed).
    pub fn notes(&self) -> Option<Result<&Notes, &str>> {
        self.notes.get().map(|r| r.as_ref().map_err(String::as_str))
    }

    fn ready_notes(&self) -> Option<&Notes> {
        self.notes().and_then(Result::ok)
    }

    pub fn n_features(&self) -> usize {
        self.flags.len()
    }

    pub fn is_dead(&self, f: u32) -> bool {
        self.flags[f as usize] & DEAD != 0
    }

    pub fn is_dense(&self, f: u32) -> bool {
        self.flags[f as usize] & DENSE != 0
    }

    /// The list's score column: the mean score of each feature's shown explanation (NaN when
    /// unscored; empty until the notes are loaded).
    pub fn scores(&self) -> &[f32] {
        self.ready_notes().map_or(&[], |n| &n.score)
    }

    /// Feature `f`'s list score (NaN when unscored or not loaded yet).
    pub fn score(&self, f: u32) -> f32 {
        self.scores().get(f as usize).copied().unwrap_or(f32::NAN)
    }

    /// The explanation the list shows for feature `f` (a successful one), if any.
    fn shown(&self, f: u32) -> Option<&Explanation> {
        let notes = self.ready_notes()?;
        let i = *notes.shown.get(f as usize)?;
        (i != NONE).then(|| &notes.explanations[i as usize])
    }

    /// The text of the explanation the list shows for feature `f`, if any, without the label its
    /// explainer may open it with (that goes in a column of its own: [`DictData::explainer`]).
    pub fn explanation(&self, f: u32) -> Option<&str> {
        let e = self.shown(f)?;
        e.explanation.as_deref().map(|text| without_label(text, &e.explainer))
    }

    /// The explainer of the explanation the list shows for feature `f`, if any.
    pub fn explainer(&self, f: u32) -> Option<&str> {
        self.shown(f).map(|e| e.explainer.as_str())
    }

    /// Every explanation of feature `f` with its scores.
    pub fn explanations_of(&self, f: u32) -> Vec<(&Explanation, Vec<&Score>)> {
        let Some(notes) = self.ready_notes() else { return Vec::new() };
        let scores = Notes::rows_of(&notes.scores_by_feature, |r| notes.scores[r as usize].feature_id, f);
        Notes::rows_of(&notes.explanations_by_feature, |r| notes.explanations[r as usize].feature_id, f)
            .iter()
            .map(|&r| {
                let e = &notes.explanations[r as usize];
                let of_e =
                    scores.iter().map(|&s| &notes.scores[s as usize]).filter(|s| s.explainer == e.explainer);
                (e, of_e.collect())
            })
            .collect()
    }
}

/// `text` without a leading label of its explainer, `<explainer> explainer[ (…)]: ` (the offline
/// explainer opens every text with "offline explainer (token statistics): "), which would hide the
/// text in a narrow column; other texts whole. No allocation: the list filters a million texts
/// through it per keystroke.
pub fn without_label<'a>(text: &'a str, explainer: &str) -> &'a str {
    let label_end = || {
        let rest = text.strip_prefix(explainer)?.strip_prefix(" explainer")?;
        let rest = match rest.strip_prefix(" (") {
            Some(r) => &r[r.find(')')? + 1..],
            None => rest,
        };
        rest.strip_prefix(": ")
    };
    label_end().unwrap_or(text)
}

/// The dictionaries of `store` that have an analysis (what the app can show).
pub fn analysed(store: &Store) -> Vec<String> {
    store.manifest().features.keys().cloned().collect()
}

/// Load `dict` on this thread, then start reading its notes on another; `done` runs when they
/// are in (to ask the UI for a repaint).
pub fn load_in_stages(
    store: Arc<Store>,
    dict: &str,
    progress: &Progress,
    done: impl FnOnce() + Send + 'static,
) -> Result<Arc<DictData>> {
    let data = Arc::new(DictData::load(&store, dict, progress)?);
    let d = data.clone();
    std::thread::spawn(move || {
        d.load_notes(&store);
        done();
    });
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::without_label;

    #[test]
    fn only_the_explainers_own_label_is_taken_off() {
        let offline = "offline explainer (token statistics): fires on \" whale\" (40%)";
        assert_eq!(without_label(offline, "offline"), "fires on \" whale\" (40%)");
        assert_eq!(without_label("delphi explainer: nouns", "delphi"), "nouns");
        for (text, explainer) in [
            (offline, "delphi"),
            ("offline explainer (token statistics) fires", "offline"),
            ("offline explainer (unclosed: x", "offline"),
            ("Months of the year: names", "offline"),
            ("", "offline"),
        ] {
            assert_eq!(without_label(text, explainer), text, "{text:?} by {explainer}");
        }
    }
}
