//! Expert tables: `experts/<name>/<generation>/*.arrow`, written by `loupe experts` and read by the
//! app's Experts view, listed in the manifest's `experts` map (a [`Listing`]).
//!
//! The name is the source's: a dictionary with experts (Monet, MoE-X) or a captured router hook
//! (`blocks.L.mlp.hook_expert_weights`, …). An expert is a routing unit: a Monet expert (one
//! feature each), a MoE-X expert (a block of `features_per_expert` features), or one expert of a
//! real MoE layer (no features). Four tables:
//! - [`ExpertRow`] (`experts.arrow`, one row per expert, by expert id): usage and gates;
//! - [`CoactivationRow`] (`coactivation.arrow`): P(E_j | E_i) for the pairs kept (see
//!   [`ExpertsSettings::coactivation_top`]);
//! - [`ExpertTokenRow`] (`vocab.arrow`): each expert's top token ids;
//! - [`ExpertDomainRow`] (`domains.arrow`): each expert's tokens per corpus domain;
//!
//! plus the routing-entropy histogram ([`EntropyBin`], `entropy.arrow`). [`ExpertsEntry`] records
//! what was counted and how.
//!
//! [`Listing`]: crate::listing::Listing

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::dictionaries::FileEntry;
use crate::listing::Listed;
use crate::manifest::Manifest;
use crate::store::Store;
use crate::table::{self, table};

/// Folder of the expert tables, inside the store.
pub const EXPERTS_DIR: &str = "experts";
pub const EXPERTS_TABLE: &str = "experts.arrow";
pub const COACTIVATION_TABLE: &str = "coactivation.arrow";
pub const VOCAB_TABLE: &str = "vocab.arrow";
pub const DOMAINS_TABLE: &str = "domains.arrow";
pub const ENTROPY_TABLE: &str = "entropy.arrow";

table! {
    /// One expert's usage (a row of `experts.arrow`; one row per expert, ordered by expert id).
    #[derive(Clone, Debug, PartialEq)]
    pub struct ExpertRow, view ExpertColumns {
        pub expert: u32,
        /// Tokens routed to the expert (its gate above the floor, or chosen by the router).
        pub tokens: u64,
        /// `tokens` / all tokens counted.
        pub usage: f32,
        /// Mean gate (routing weight) over the tokens routed to it; 0 when it got none.
        pub mean_gate: f32,
        /// The largest share of its routed tokens that one token id has (vocabulary
        /// specialization of the expert); 0 when it got none.
        pub top_token_share: f32,
        /// Its most frequent token id (0 when it got none).
        pub top_token: u32,
        /// The largest domain specialization N_E(d) / N(d) over domains d; null when the corpus
        /// has a single domain, or the tokens counted come from one domain only.
        pub top_domain_specialization: Option<f32>,
        /// The domain index (into [`ExpertsEntry::domains`]) of that largest share (0 where
        /// `top_domain_specialization` is null).
        pub top_domain: u32,
    }
}

table! {
    /// P(E_j | E_i): of the tokens routed to expert `i`, the share also routed to `j`.
    #[derive(Clone, Debug, PartialEq)]
    pub struct CoactivationRow, view CoactivationColumns {
        pub expert_i: u32,
        pub expert_j: u32,
        /// Tokens routed to both.
        pub both: u64,
        /// `both` / tokens routed to `i`.
        pub p_j_given_i: f32,
    }
}

table! {
    /// One of an expert's top token ids (rows grouped by expert, most tokens first).
    #[derive(Clone, Debug, PartialEq)]
    pub struct ExpertTokenRow, view ExpertTokenColumns {
        pub expert: u32,
        pub token: u32,
        /// Occurrences of `token` routed to the expert.
        pub count: u64,
        /// `count` / the expert's routed tokens.
        pub share_of_expert: f32,
        /// Vocabulary specialization (OLMoE): `count` / all occurrences of `token`.
        pub share_of_token: f32,
    }
}

table! {
    /// An expert's tokens from one corpus domain (every domain with a count, per expert).
    #[derive(Clone, Debug, PartialEq)]
    pub struct ExpertDomainRow, view ExpertDomainColumns {
        pub expert: u32,
        /// Index into [`ExpertsEntry::domains`].
        pub domain: u16,
        pub count: u64,
        /// `count` / the expert's routed tokens.
        pub share_of_expert: f32,
        /// Domain specialization (OLMoE): `count` / the domain's tokens; null when the corpus has
        /// a single domain, or the tokens counted come from one domain only.
        pub specialization: Option<f32>,
    }
}

table! {
    /// A bin of the per-token routing entropy histogram (nats; equal-width bins over
    /// [0, ln n_experts]).
    #[derive(Clone, Debug, PartialEq)]
    pub struct EntropyBin, view EntropyColumns {
        pub lo: f32,
        pub hi: f32,
        pub tokens: u64,
    }
}

/// What the experts were read from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ExpertsSource {
    /// A dictionary with experts; `kind` is its manifest kind (`monet`, `moex`).
    Dictionary { name: String, kind: String, hook: String },
    /// A captured router hook of a real MoE model.
    Hook { hook: String },
}

/// How the tables were counted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertsSettings {
    /// Tokens (activation rows) counted.
    pub tokens: u64,
    /// Gates at or below this are not a routing (Monet's floor); `None` for a router's choice.
    pub gate_floor: Option<f32>,
    /// Experts chosen per token by a top-k router (`None` when the number varies, as in Monet).
    pub top_k: Option<u32>,
    /// Co-activation rows kept: for each expert its `coactivation_top` most likely partners, and
    /// every pair among the `coactivation_experts` most used experts (the view's heatmap).
    pub coactivation_top: u32,
    pub coactivation_experts: u32,
    /// Top token ids kept per expert.
    pub vocab_top: u32,
    /// The model the routing is of (name and sha256 as the manifest recorded them).
    pub model: String,
    pub model_sha256: String,
}

/// An experts entry of the manifest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ExpertsEntry {
    pub source: ExpertsSource,
    pub n_experts: u32,
    /// Features per expert where the experts are dictionary units (Monet 1, MoE-X its expert
    /// width; expert e owns features e·m … e·m + m − 1); 0 for a real router.
    pub features_per_expert: u32,
    /// Corpus domains (each top-level folder or file of the corpus) and their token counts.
    pub domains: Vec<String>,
    pub domain_tokens: Vec<u64>,
    /// Mean experts routed per token, and mean routing entropy per token (nats).
    pub mean_active: f32,
    pub mean_entropy: f32,
    /// Mean entropy (nats) of the router's full softmax over all experts, where the source holds
    /// it (`hook_router_probs`, `hook_router_logits`); `mean_entropy` and `entropy.arrow` are
    /// over each token's chosen experts' gates, normalised.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mean_router_entropy: Option<f32>,
    pub settings: ExpertsSettings,
    /// Files relative to the store root (`experts/<name>/<generation>/…`).
    pub files: Vec<FileEntry>,
}

impl ExpertsEntry {
    /// Whether domain specialization is defined (the corpus has at least two domains).
    pub fn has_domains(&self) -> bool {
        self.domains.len() >= 2
    }
}

impl Listed for ExpertsEntry {
    const WHAT: &'static str = "expert tables";
    const FOLDERS: &'static [&'static str] = &[EXPERTS_DIR];
    fn entries(manifest: &mut Manifest) -> &mut BTreeMap<String, Self> {
        &mut manifest.experts
    }
    fn files(&self) -> &[FileEntry] {
        &self.files
    }
    fn files_mut(&mut self) -> &mut Vec<FileEntry> {
        &mut self.files
    }
}

/// Every table of an experts entry, as rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ExpertsTables {
    pub experts: Vec<ExpertRow>,
    pub coactivation: Vec<CoactivationRow>,
    pub vocab: Vec<ExpertTokenRow>,
    pub domains: Vec<ExpertDomainRow>,
    pub entropy: Vec<EntropyBin>,
}

/// A listed experts entry, read whole (tables are per expert: at 65,536 experts a few MB).
#[derive(Clone, Debug)]
pub struct ExpertsData {
    pub name: String,
    pub entry: ExpertsEntry,
    pub tables: ExpertsTables,
}

impl Store {
    /// Write `tables` as the experts entry `name`, replacing the previous one in one manifest
    /// commit.
    pub fn write_experts(&self, name: &str, tables: &ExpertsTables, entry: ExpertsEntry) -> Result<()> {
        let mut listing = self.start_listing::<ExpertsEntry>(name)?;
        listing.write_table(EXPERTS_DIR, EXPERTS_TABLE, &table::batch(&tables.experts)?)?;
        listing.write_table(EXPERTS_DIR, COACTIVATION_TABLE, &table::batch(&tables.coactivation)?)?;
        listing.write_table(EXPERTS_DIR, VOCAB_TABLE, &table::batch(&tables.vocab)?)?;
        listing.write_table(EXPERTS_DIR, DOMAINS_TABLE, &table::batch(&tables.domains)?)?;
        listing.write_table(EXPERTS_DIR, ENTROPY_TABLE, &table::batch(&tables.entropy)?)?;
        self.commit_listing(listing, entry)
    }

    /// The names of the listed experts entries.
    pub fn experts_names(&self) -> Vec<String> {
        self.manifest().experts.keys().cloned().collect()
    }

    /// The experts entry `name`, read and checked against its listing; `None` when not listed.
    pub fn read_experts(&self, name: &str) -> Result<Option<ExpertsData>> {
        let Some(entry) = self.manifest().experts.get(name).cloned() else {
            return Ok(None);
        };
        let what = format!("the expert tables {name}");
        fn rows<R: table::Columns>(
            store: &Store,
            entry: &ExpertsEntry,
            what: &str,
            file: &str,
        ) -> Result<Vec<R>> {
            let batch = store.read_listed_table(&entry.files, what, file, &table::schema::<R>())?;
            let view = table::view::<R>(&batch).with_context(|| format!("{what}: {file}"))?;
            Ok((0..batch.num_rows()).map(|i| R::get(&view, i)).collect())
        }
        let tables = ExpertsTables {
            experts: rows(self, &entry, &what, EXPERTS_TABLE)?,
            coactivation: rows(self, &entry, &what, COACTIVATION_TABLE)?,
            vocab: rows(self, &entry, &what, VOCAB_TABLE)?,
            domains: rows(self, &entry, &what, DOMAINS_TABLE)?,
            entropy: rows(self, &entry, &what, ENTROPY_TABLE)?,
        };
        Ok(Some(ExpertsData { name: name.to_string(), entry, tables }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> ExpertsEntry {
        ExpertsEntry {
            source: ExpertsSource::Hook { hook: "blocks.0.mlp.hook_expert_weights".into() },
            n_experts: 2,
            features_per_expert: 0,
            domains: vec!["moby-dick".into(), "sotu".into()],
            domain_tokens: vec![3, 1],
            mean_active: 1.5,
            mean_entropy: 0.3,
            mean_router_entropy: None,
            settings: ExpertsSettings {
                tokens: 4,
                gate_floor: None,
                top_k: Some(2),
                coactivation_top: 8,
                coactivation_experts: 64,
                vocab_top: 16,
                model: "m".into(),
                model_sha256: "00".into(),
            },
            files: Vec::new(),
        }
    }

    fn tables() -> ExpertsTables {
        let expert = |e: u32, domain: Option<u32>| ExpertRow {
            expert: e,
            tokens: 3,
            usage: 0.75,
            mean_gate: 0.5,
            top_token_share: 0.6,
            top_token: 7,
            top_domain_specialization: domain.map(|_| 0.9),
            top_domain: domain.unwrap_or(0),
        };
        ExpertsTables {
            experts: vec![expert(0, Some(1)), expert(1, None)],
            coactivation: vec![CoactivationRow { expert_i: 0, expert_j: 1, both: 2, p_j_given_i: 0.66 }],
            vocab: vec![ExpertTokenRow {
                expert: 0,
                token: 7,
                count: 2,
                share_of_expert: 0.6,
                share_of_token: 1.0,
            }],
            domains: vec![ExpertDomainRow {
                expert: 0,
                domain: 1,
                count: 1,
                share_of_expert: 0.3,
                specialization: None,
            }],
            entropy: vec![EntropyBin { lo: 0.0, hi: 0.5, tokens: 4 }],
        }
    }

    #[test]
    fn removing_a_dictionary_removes_the_expert_tables_made_from_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        std::fs::create_dir_all(store.dictionary_dir("monet")).unwrap();
        std::fs::write(store.dictionary_dir("monet").join("w.bin"), b"w").unwrap();
        let dict = crate::DictEntry {
            hook: "blocks.0.hook_resid_post".into(),
            output_hook: None,
            kind: "monet".into(),
            variant: "vd".into(),
            d_in: 4,
            n_features: 2,
            status: "done".into(),
            step: 1,
            tokens: 1,
            files: Vec::new(),
        };
        store.commit_dictionary("monet", dict, &["w.bin"]).unwrap();
        let from_dict = ExpertsEntry {
            source: ExpertsSource::Dictionary {
                name: "monet".into(),
                kind: "monet".into(),
                hook: "h".into(),
            },
            ..entry()
        };
        store.write_experts("renamed", &tables(), from_dict).unwrap();
        store.write_experts("blocks.0.mlp.hook_expert_weights", &tables(), entry()).unwrap();
        let files = store.manifest().experts["renamed"].files.clone();
        store.remove_dictionary("monet").unwrap();
        assert_eq!(store.experts_names(), ["blocks.0.mlp.hook_expert_weights"], "the hook's entry stays");
        assert!(files.iter().all(|f| !store.root().join(&f.file).exists()), "its tables are deleted");
        assert!(store.verify(&()).problems.is_empty());
    }

    #[test]
    fn experts_round_trip_and_replace_the_previous_listing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::create(dir.path()).unwrap();
        assert!(store.read_experts("blocks.0.mlp.hook_expert_weights").unwrap().is_none());
        store.write_experts("blocks.0.mlp.hook_expert_weights", &tables(), entry()).unwrap();
        let first = store.manifest().experts["blocks.0.mlp.hook_expert_weights"].files.clone();
        let read = store.read_experts("blocks.0.mlp.hook_expert_weights").unwrap().unwrap();
        assert_eq!(read.tables, tables());
        assert_eq!(read.entry.source, entry().source);
        assert!(read.entry.has_domains());

        store.write_experts("blocks.0.mlp.hook_expert_weights", &ExpertsTables::default(), entry()).unwrap();
        let read = store.read_experts("blocks.0.mlp.hook_expert_weights").unwrap().unwrap();
        assert!(read.tables.experts.is_empty());
        assert!(!store.root().join(&first[0].file).exists(), "the previous tables are removed");
        assert_eq!(store.experts_names(), ["blocks.0.mlp.hook_expert_weights"]);
        assert!(store.verify(&()).problems.is_empty());
    }
}
