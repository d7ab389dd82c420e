//! Reading an analysis: the tables mapped read-only, looked up per feature.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int8Type, UInt8Type, UInt16Type, UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch, StringArray};
use arrow_schema::SchemaRef;
use memmap2::Mmap;

use super::*;
use crate::store::Store;

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
        let listed = entry.find(file).ok_or_else(|| anyhow!("the analysis of {dict} lists no {file}"))?;
        let path = store.root().join(&listed.file);
        let file_handle = std::fs::File::open(&path)
            .with_context(|| format!("{} is listed but cannot be opened", path.display()))?;
        // SAFETY: listed files are immutable (written under a temporary name, then renamed).
        let map = Arc::new(unsafe { Mmap::map(&file_handle) }?);
        crate::fsutil::check_listed(&path, &map, listed.bytes, &listed.xxh3)?;
        let batch = crate::reader::decode_single_batch(&map)
            .map_err(|e| anyhow!("{} is not a valid table: {e}", path.display()))?;
        if batch.schema().fields() != schema.fields() {
            bail!("{} does not have the {file} schema", path.display());
        }
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

    fn col<T: arrow_array::types::ArrowPrimitiveType>(&self, name: &str) -> &[T::Native] {
        self.batch.column_by_name(name).expect("schema checked").as_primitive::<T>().values()
    }

    fn list<T: arrow_array::types::ArrowPrimitiveType>(&self, name: &str, row: usize) -> Vec<T::Native> {
        let list = self.batch.column_by_name(name).expect("schema checked").as_list::<i32>();
        list.value(row).as_primitive::<T>().values().to_vec()
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
        let features = Table::open(store, &entry, dict, FEATURES_TABLE, features_schema())?;
        if features.batch.num_rows() != n {
            bail!(
                "the analysis of {dict} lists {} features but {FEATURES_TABLE} has {} rows",
                entry.n_features,
                features.batch.num_rows()
            );
        }
        let features = features.indexed(n, FEATURES_TABLE)?;
        let open = |file: &str, schema| Table::open(store, &entry, dict, file, schema)?.indexed(n, file);
        let vocab = Table::open(store, &entry, dict, VOCAB_TABLE, vocab_schema())?;
        let vocab = vocab.batch.column(1).as_string::<i32>().clone();
        Ok(FeatureTables {
            features,
            top: open(TOP_EXAMPLES_TABLE, examples_schema(false))?,
            quantile: open(QUANTILE_EXAMPLES_TABLE, examples_schema(true))?,
            logits: if has(LOGITS_TABLE) { Some(open(LOGITS_TABLE, logits_schema())?) } else { None },
            neighbours: if has(NEIGHBOURS_TABLE) {
                Some(open(NEIGHBOURS_TABLE, neighbours_schema())?)
            } else {
                None
            },
            cooccurrence: open(COOCCURRENCE_TABLE, cooccurrence_schema())?,
            vocab,
            vocab_index: std::sync::OnceLock::new(),
            dict: dict.to_string(),
            entry,
        })
    }

    pub fn entry(&self) -> &FeaturesEntry {
        &self.entry
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
        let t = &self.features;
        let bool_col = |name: &str| t.batch.column_by_name(name).expect("checked").as_boolean().value(i);
        Ok(FeatureRow {
            feature_id: f,
            count: t.col::<UInt64Type>("count")[i],
            density: t.col::<Float32Type>("density")[i],
            mean_activation: t.col::<Float32Type>("mean_activation")[i],
            max_activation: t.col::<Float32Type>("max_activation")[i],
            dead: bool_col("dead"),
            dense: bool_col("dense"),
            hist_first_bin: t.col::<UInt16Type>("hist_first_bin")[i],
            hist: t.list::<UInt32Type>("hist", i),
        })
    }

    /// Feature `f`'s (dead, dense) flags, without reading the rest of its row; `f` must exist.
    pub fn flags(&self, f: u32) -> (bool, bool) {
        let col = |name: &str| {
            self.features.batch.column_by_name(name).expect("checked").as_boolean().value(f as usize)
        };
        (col("dead"), col("dense"))
    }

    /// Column views over all features (for sorting and filtering lists).
    pub fn densities(&self) -> &[f32] {
        self.features.col::<Float32Type>("density")
    }
    pub fn max_activations(&self) -> &[f32] {
        self.features.col::<Float32Type>("max_activation")
    }

    fn examples(t: &Table, f: usize, quantile: bool) -> Vec<Example> {
        t.rows(f)
            .map(|i| Example {
                feature_id: f as u32,
                rank: t.col::<UInt16Type>("rank")[i],
                activation: t.col::<Float32Type>("activation")[i],
                row: t.col::<UInt64Type>("row")[i],
                doc: t.col::<UInt32Type>("doc")[i],
                pos: t.col::<UInt32Type>("pos")[i],
                center: t.col::<UInt16Type>("center")[i],
                tokens: t.list::<UInt32Type>("tokens", i),
                activations: t.list::<Float32Type>("activations", i),
                bucket: quantile.then(|| Bucket {
                    index: t.col::<UInt8Type>("bucket")[i],
                    lo: t.col::<Float32Type>("bucket_lo")[i],
                    hi: t.col::<Float32Type>("bucket_hi")[i],
                    tokens: t.col::<UInt64Type>("bucket_tokens")[i],
                }),
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

    /// Feature `f`'s logit effects (most promoted first, then most suppressed), or none when the
    /// analysis had no unembedding for the dictionary's output space.
    pub fn logits(&self, f: u32) -> Result<Vec<LogitEffect>> {
        let i = self.check(f)?;
        let Some(t) = &self.logits else { return Ok(Vec::new()) };
        Ok(t.rows(i)
            .map(|r| LogitEffect {
                feature_id: f,
                rank: t.col::<Int8Type>("rank")[r],
                token: t.col::<UInt32Type>("token")[r],
                value: t.col::<Float32Type>("value")[r],
            })
            .collect())
    }

    /// Feature `f`'s most similar features by decoder direction.
    pub fn neighbours(&self, f: u32) -> Result<Vec<Neighbour>> {
        let i = self.check(f)?;
        let Some(t) = &self.neighbours else { return Ok(Vec::new()) };
        Ok(t.rows(i)
            .map(|r| Neighbour {
                feature_id: f,
                rank: t.col::<UInt8Type>("rank")[r],
                neighbour: t.col::<UInt32Type>("neighbour")[r],
                cosine: t.col::<Float32Type>("cosine")[r],
            })
            .collect())
    }

    /// The features that fire most often together with `f` (by Jaccard index).
    pub fn cooccurrence(&self, f: u32) -> Result<Vec<Cooccurrence>> {
        let i = self.check(f)?;
        let t = &self.cooccurrence;
        Ok(t.rows(i)
            .map(|r| Cooccurrence {
                feature_id: f,
                rank: t.col::<UInt8Type>("rank")[r],
                other: t.col::<UInt32Type>("other")[r],
                shared: t.col::<UInt64Type>("shared")[r],
                jaccard: t.col::<Float32Type>("jaccard")[r],
            })
            .collect())
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
