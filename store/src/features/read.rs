//! Reading an analysis: the tables mapped read-only, looked up per feature.

use std::collections::HashMap;

use anyhow::{Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::UInt32Type;
use arrow_array::{Array, RecordBatch, StringArray};
use arrow_schema::SchemaRef;

use super::*;
use crate::store::Store;
use crate::table::{Columns, schema};

/// A table mapped read-only, with each feature's row range.
struct Table {
    batch: RecordBatch,
    /// Rows of feature f: `starts[f]..starts[f + 1]`.
    starts: Vec<u32>,
}

impl Table {
    /// Map the analysis' `file` (checked against its listing: size, checksum, schema).
    fn open(
        store: &Store,
        entry: &FeaturesEntry,
        dict: &str,
        file: &str,
        schema: SchemaRef,
    ) -> Result<Table> {
        let what = format!("the analysis of {dict}");
        let batch = store.read_listed_table(&entry.files, &what, file, &schema)?;
        Ok(Table { batch, starts: Vec::new() })
    }

    /// Index the rows by `feature_id` (the first column), for features `0..n`.
    fn indexed(mut self, n: usize, file: &str) -> Result<Table> {
        let ids = self.batch.column(0).as_primitive::<UInt32Type>().values();
        let mut starts = vec![0u32; n + 1];
        for (i, &f) in ids.iter().enumerate() {
            if f as usize >= n || (i > 0 && f < ids[i - 1]) {
                bail!("{file}: feature_id column is out of range or unsorted at row {i}");
            }
            starts[f as usize + 1] = i as u32 + 1;
        }
        for f in 1..=n {
            starts[f] = starts[f].max(starts[f - 1]);
        }
        self.starts = starts;
        Ok(self)
    }

    fn rows(&self, f: usize) -> std::ops::Range<usize> {
        self.starts[f] as usize..self.starts[f + 1] as usize
    }

    /// The column views of the table (its schema was checked when it was opened).
    fn view<T: Columns>(&self) -> T::View<'_> {
        T::view(&mut self.batch.columns().iter())
    }
}

/// An analysis opened read-only: per-feature lookups over the mapped tables.
pub struct FeatureTables {
    dict: String,
    entry: FeaturesEntry,
    features: Table,
    top: Table,
    quantile: Table,
    logits: Option<Table>,
    neighbours: Option<Table>,
    cooccurrence: Table,
    head_attribution: Option<Table>,
    vocab: StringArray,
    vocab_index: std::sync::OnceLock<HashMap<String, u32>>,
}

impl FeatureTables {
    /// Open the analysis of dictionary `dict`.
    pub fn open(store: &Store, dict: &str) -> Result<FeatureTables> {
        let entry = store.features(dict).ok_or_else(|| {
            anyhow!("store {} has no analysis of {dict:?}; run `loupe analyze` first", store.root().display())
        })?;
        let has = |file: &str| entry.find(file).is_some();
        let n = entry.n_features as usize;
        // The features table has one row per feature: check the listed count against it before
        // anything is sized by that count.
        let features = Table::open(store, &entry, dict, FEATURES_TABLE, schema::<FeatureRow>())?;
        if features.batch.num_rows() != n {
            bail!(
                "the analysis of {dict} lists {} features but {FEATURES_TABLE} has {} rows",
                entry.n_features,
                features.batch.num_rows()
            );
        }
        let features = features.indexed(n, FEATURES_TABLE)?;
        let open = |file: &str, schema| Table::open(store, &entry, dict, file, schema)?.indexed(n, file);
        let vocab = Table::open(store, &entry, dict, VOCAB_TABLE, schema::<VocabRow>())?;
        let vocab = vocab.view::<VocabRow>().string.clone();
        Ok(FeatureTables {
            features,
            top: open(TOP_EXAMPLES_TABLE, schema::<Example>())?,
            quantile: open(QUANTILE_EXAMPLES_TABLE, quantile_examples_schema())?,
            logits: if has(LOGITS_TABLE) { Some(open(LOGITS_TABLE, schema::<LogitEffect>())?) } else { None },
            neighbours: if has(NEIGHBOURS_TABLE) {
                Some(open(NEIGHBOURS_TABLE, schema::<Neighbour>())?)
            } else {
                None
            },
            cooccurrence: open(COOCCURRENCE_TABLE, schema::<Cooccurrence>())?,
            head_attribution: if has(HEAD_ATTRIBUTION_TABLE) {
                Some(open(HEAD_ATTRIBUTION_TABLE, schema::<HeadAttribution>())?)
            } else {
                None
            },
            vocab,
            vocab_index: std::sync::OnceLock::new(),
            dict: dict.to_string(),
            entry,
        })
    }

    pub fn entry(&self) -> &FeaturesEntry {
        &self.entry
    }

    /// For an attention-output SAE (`blocks.L.attn.hook_z`): feature `f`'s weight-based head
    /// attribution w_f(h), one value per head summing to 1; `None` for other dictionaries (or
    /// analyses made before head attribution existed).
    pub fn head_attribution(&self, f: u32) -> Option<&[f32]> {
        let t = self.head_attribution.as_ref()?;
        let rows = t.rows(self.check(f).ok()?);
        (rows.len() == 1).then(|| t.view::<HeadAttribution>().weights.get(rows.start))
    }

    /// The `n` features most attributed to `head` (by w_f(head), largest first; ties by feature
    /// id), with their weights; dead features are left out. Empty when the analysis has no head
    /// attribution or the dictionary no such head.
    pub fn top_features_for_head(&self, head: usize, n: usize) -> Vec<(u32, f32)> {
        let Some(t) = &self.head_attribution else { return Vec::new() };
        let view = t.view::<HeadAttribution>();
        let ids = view.feature_id;
        let mut out: Vec<(u32, f32)> = (0..ids.len())
            .filter(|&r| !self.flags(ids[r]).0)
            .filter_map(|r| view.weights.get(r).get(head).map(|&w| (ids[r], w)))
            .collect();
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        out.truncate(n);
        out
    }

    pub fn n_features(&self) -> usize {
        self.entry.n_features as usize
    }

    fn check(&self, f: u32) -> Result<usize> {
        if f as usize >= self.n_features() {
            bail!("feature {f} does not exist ({} has {} features)", self.dict, self.n_features());
        }
        Ok(f as usize)
    }

    /// Feature `f`'s statistics.
    pub fn stats(&self, f: u32) -> Result<FeatureRow> {
        let i = self.check(f)?;
        Ok(FeatureRow { feature_id: f, ..self.features.view::<FeatureRow>().row(i) })
    }

    /// Feature `f`'s (dead, dense) flags, without reading the rest of its row; `f` must exist.
    pub fn flags(&self, f: u32) -> (bool, bool) {
        let columns = self.features.view::<FeatureRow>();
        (columns.dead.value(f as usize), columns.dense.value(f as usize))
    }

    /// Column views over all features (for sorting and filtering lists).
    pub fn densities(&self) -> &[f32] {
        self.features.view::<FeatureRow>().density
    }
    pub fn max_activations(&self) -> &[f32] {
        self.features.view::<FeatureRow>().max_activation
    }

    fn examples(t: &Table, f: usize, quantile: bool) -> Vec<Example> {
        let examples = t.view::<Example>();
        // The bucket columns follow the example columns (quantile examples only).
        let buckets = quantile.then(|| {
            let mut columns = t.batch.columns().iter();
            Example::view(&mut columns);
            Bucket::view(&mut columns)
        });
        t.rows(f)
            .map(|i| Example {
                feature_id: f as u32,
                bucket: buckets.as_ref().map(|b| b.row(i)),
                ..examples.row(i)
            })
            .collect()
    }

    /// Feature `f`'s top-activating examples, largest first.
    pub fn top_examples(&self, f: u32) -> Result<Vec<Example>> {
        Ok(Self::examples(&self.top, self.check(f)?, false))
    }

    /// Feature `f`'s quantile examples, lowest bucket first.
    pub fn quantile_examples(&self, f: u32) -> Result<Vec<Example>> {
        Ok(Self::examples(&self.quantile, self.check(f)?, true))
    }

    /// The rows of feature `f` in table `t`, each with `feature_id` `f`.
    fn rows_of<T: Columns>(t: &Table, f: usize) -> Vec<T> {
        let view = t.view::<T>();
        t.rows(f).map(|i| T::get(&view, i)).collect()
    }

    /// Feature `f`'s logit effects (most promoted first, then most suppressed), or none when the
    /// analysis had no unembedding for the dictionary's output space.
    pub fn logits(&self, f: u32) -> Result<Vec<LogitEffect>> {
        let i = self.check(f)?;
        Ok(self.logits.as_ref().map(|t| Self::rows_of(t, i)).unwrap_or_default())
    }

    /// Feature `f`'s most similar features by decoder direction.
    pub fn neighbours(&self, f: u32) -> Result<Vec<Neighbour>> {
        let i = self.check(f)?;
        Ok(self.neighbours.as_ref().map(|t| Self::rows_of(t, i)).unwrap_or_default())
    }

    /// The features that fire most often together with `f` (by Jaccard index).
    pub fn cooccurrence(&self, f: u32) -> Result<Vec<Cooccurrence>> {
        let i = self.check(f)?;
        Ok(Self::rows_of(&self.cooccurrence, i))
    }

    /// The string of token `id` (`"<unk:id>"` outside the vocabulary).
    pub fn token_string(&self, id: u32) -> String {
        if (id as usize) < self.vocab.len() {
            self.vocab.value(id as usize).to_string()
        } else {
            format!("<unk:{id}>")
        }
    }

    /// The token id of `string`, if it is in the vocabulary.
    pub fn token_id(&self, string: &str) -> Option<u32> {
        let index = self.vocab_index.get_or_init(|| {
            (0..self.vocab.len()).map(|i| (self.vocab.value(i).to_string(), i as u32)).collect()
        });
        index.get(string).copied()
    }
}
