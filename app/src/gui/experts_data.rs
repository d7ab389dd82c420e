//! What the Experts view reads and computes, no UI: one experts entry of the store
//! ([`Store::read_experts`]) made ready to draw — the expert order for each sort, each expert's
//! rows of the token, domain and co-activation tables, the co-activation heatmap's matrix over the
//! most used experts (built once, when the entry loads), and the token strings (the vocabulary an
//! analysis of the store recorded: one model per store, so any analysed dictionary's will do).
//!
//! Everything is per expert or capped: at 65,536 experts the view lays out only the visible rows
//! and the heatmap holds at most [`HEATMAP_MAX`]² cells.

use anyhow::{Result, bail};
use loupe_store::experts::ExpertsSource;
use loupe_store::features::{VOCAB_TABLE, VocabRow};
use loupe_store::table::{self, Columns};
use loupe_store::{
    CoactivationRow, ExpertDomainRow, ExpertRow, ExpertTokenRow, ExpertsData, ExpertsEntry, Store,
};

/// The heatmap shows the co-activation among at most this many of the most used experts.
pub const HEATMAP_MAX: usize = 128;

/// How the usage bars are ordered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Sort {
    /// By expert id.
    Id,
    /// Most used first.
    Usage,
    /// Largest domain specialization first (experts without one last).
    Domain,
    /// Largest top-token share first (vocabulary specialization).
    Token,
}

impl Sort {
    pub const ALL: [Sort; 4] = [Sort::Id, Sort::Usage, Sort::Domain, Sort::Token];

    pub fn name(self) -> &'static str {
        match self {
            Sort::Id => "id",
            Sort::Usage => "usage",
            Sort::Domain => "domain specialization",
            Sort::Token => "token specialization",
        }
    }
}

/// P(E_j | E_i) among the most used experts, row i, column j, both in usage order.
pub struct Heatmap {
    /// The experts of the rows and columns, most used first.
    pub experts: Vec<u32>,
    /// `experts.len()²` values, row-major; NaN where the table has no row for the pair.
    pub p: Vec<f32>,
}

impl Heatmap {
    pub fn len(&self) -> usize {
        self.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.experts.is_empty()
    }

    /// P(column expert | row expert); NaN when the table has no row for the pair.
    pub fn get(&self, row: usize, column: usize) -> f32 {
        self.p[row * self.len() + column]
    }
}

/// The token strings of the store's model, from an analysis' vocabulary.
pub struct Vocabulary {
    /// The analysed dictionary it was read from.
    pub dictionary: String,
    strings: Vec<String>,
}

/// One experts entry, ready for the view.
pub struct Experts {
    pub data: ExpertsData,
    /// Per expert id: its row in `data.tables.experts` ([`NONE`] when the table has none).
    row_of: Vec<u32>,
    /// Expert ids in each [`Sort`]'s order (index: the sort's position in [`Sort::ALL`]).
    orders: [Vec<u32>; 4],
    /// Rows of the token, domain and co-activation tables, ordered by expert (co-activation rows
    /// by `expert_i`, then the most likely partner first).
    vocab_rows: Vec<u32>,
    domain_rows: Vec<u32>,
    partner_rows: Vec<u32>,
    pub heatmap: Heatmap,
    /// The largest usage (the bars' full length).
    pub max_usage: f32,
    pub vocabulary: Option<Vocabulary>,
}

const NONE: u32 = u32::MAX;

/// Row indices `0..n` ordered by `key` (a stable sort: the tables are written grouped by expert,
/// so this is one pass over already ordered rows).
fn ordered<K: PartialOrd>(n: usize, key: impl Fn(usize) -> K) -> Vec<u32> {
    let mut rows: Vec<u32> = (0..n as u32).collect();
    rows.sort_by(|&a, &b| key(a as usize).partial_cmp(&key(b as usize)).unwrap_or(std::cmp::Ordering::Equal));
    rows
}

/// The rows (of `by_expert`, ordered by `expert(row)`) of expert `e`.
fn rows_of(by_expert: &[u32], expert: impl Fn(u32) -> u32, e: u32) -> &[u32] {
    let start = by_expert.partition_point(|&r| expert(r) < e);
    let end = by_expert.partition_point(|&r| expert(r) <= e);
    &by_expert[start..end]
}

impl Experts {
    /// Read the experts entry `name` of `store` and prepare it.
    pub fn load(store: &Store, name: &str) -> Result<Experts> {
        let Some(data) = store.read_experts(name)? else {
            bail!("the store has no experts entry {name:?}");
        };
        let vocabulary = vocabulary(store, &data.entry)?;
        Experts::new(data, vocabulary)
    }

    /// Index `data`'s tables and build the heatmap.
    pub fn new(data: ExpertsData, vocabulary: Option<Vocabulary>) -> Result<Experts> {
        let t = &data.tables;
        let n = data.entry.n_experts as usize;
        let mut row_of = vec![NONE; n];
        for (i, r) in t.experts.iter().enumerate() {
            let Some(slot) = row_of.get_mut(r.expert as usize) else {
                bail!(
                    "the expert tables {}: expert {} in experts.arrow, but the entry has {n} experts",
                    data.name,
                    r.expert
                );
            };
            *slot = i as u32;
        }
        let ids: Vec<u32> = t.experts.iter().map(|r| r.expert).collect();
        let by = |key: &dyn Fn(&ExpertRow) -> (f32, u32)| -> Vec<u32> {
            ordered(t.experts.len(), |i| key(&t.experts[i])).into_iter().map(|i| ids[i as usize]).collect()
        };
        // Descending by a value (ties by id): sort on its negation. NaN and null go last.
        let desc = |v: f32| if v.is_finite() { -v } else { f32::INFINITY };
        let orders = [
            by(&|r| (0.0, r.expert)),
            by(&|r| (desc(r.usage), r.expert)),
            by(&|r| (desc(r.top_domain_specialization.unwrap_or(f32::NAN)), r.expert)),
            by(&|r| (desc(r.top_token_share), r.expert)),
        ];
        let vocab_rows = ordered(t.vocab.len(), |i| t.vocab[i].expert);
        let domain_rows = ordered(t.domains.len(), |i| t.domains[i].expert);
        let partner_rows = ordered(t.coactivation.len(), |i| {
            (t.coactivation[i].expert_i, desc(t.coactivation[i].p_j_given_i))
        });
        let max_usage = t.experts.iter().map(|r| r.usage).filter(|u| u.is_finite()).fold(0.0, f32::max);
        let heatmap = heatmap(&orders[1], &t.coactivation, HEATMAP_MAX);
        Ok(Experts {
            data,
            row_of,
            orders,
            vocab_rows,
            domain_rows,
            partner_rows,
            heatmap,
            max_usage,
            vocabulary,
        })
    }

    pub fn name(&self) -> &str {
        &self.data.name
    }

    pub fn entry(&self) -> &ExpertsEntry {
        &self.data.entry
    }

    /// Experts with a row (those the bars list).
    pub fn len(&self) -> usize {
        self.data.tables.experts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.data.tables.experts.is_empty()
    }

    /// Expert ids in `sort`'s order.
    pub fn order(&self, sort: Sort) -> &[u32] {
        let i = Sort::ALL.iter().position(|&s| s == sort).expect("a listed sort");
        &self.orders[i]
    }

    /// Expert `e`'s row, if the table has one.
    pub fn expert(&self, e: u32) -> Option<&ExpertRow> {
        let row = *self.row_of.get(e as usize)?;
        (row != NONE).then(|| &self.data.tables.experts[row as usize])
    }

    /// Expert `e`'s top tokens, most first.
    pub fn tokens(&self, e: u32) -> Vec<&ExpertTokenRow> {
        let v = &self.data.tables.vocab;
        let mut rows: Vec<&ExpertTokenRow> =
            rows_of(&self.vocab_rows, |r| v[r as usize].expert, e).iter().map(|&r| &v[r as usize]).collect();
        rows.sort_by(|a, b| b.count.cmp(&a.count).then(a.token.cmp(&b.token)));
        rows
    }

    /// Expert `e`'s rows per domain, in the entry's domain order.
    pub fn domains(&self, e: u32) -> Vec<&ExpertDomainRow> {
        let d = &self.data.tables.domains;
        let mut rows: Vec<&ExpertDomainRow> =
            rows_of(&self.domain_rows, |r| d[r as usize].expert, e).iter().map(|&r| &d[r as usize]).collect();
        rows.sort_by_key(|r| r.domain);
        rows
    }

    /// Expert `e`'s most likely partners (P(E_j | E_e), most likely first, itself left out), at
    /// most `n`.
    pub fn partners(&self, e: u32, n: usize) -> Vec<&CoactivationRow> {
        let c = &self.data.tables.coactivation;
        rows_of(&self.partner_rows, |r| c[r as usize].expert_i, e)
            .iter()
            .map(|&r| &c[r as usize])
            .filter(|r| r.expert_j != e)
            .take(n)
            .collect()
    }

    /// A domain's name (its index when the entry does not list it).
    pub fn domain_name(&self, d: u16) -> String {
        self.entry().domains.get(d as usize).cloned().unwrap_or_else(|| format!("domain {d}"))
    }

    /// Token `t` as the vocabulary spells it (`#t` without a vocabulary).
    pub fn token(&self, t: u32) -> String {
        match self.vocabulary.as_ref().and_then(|v| v.strings.get(t as usize)) {
            Some(s) => format!("{s:?}"),
            None => format!("#{t}"),
        }
    }

    /// The dictionary whose units the experts are, and its features per expert; None for a
    /// router's experts.
    pub fn dictionary(&self) -> Option<(&str, u32)> {
        match &self.entry().source {
            ExpertsSource::Dictionary { name, .. } => Some((name, self.entry().features_per_expert.max(1))),
            ExpertsSource::Hook { .. } => None,
        }
    }

    /// What the experts were read from, in words.
    pub fn source(&self) -> String {
        match &self.entry().source {
            ExpertsSource::Dictionary { name, kind, hook } => format!("{kind} dictionary {name} at {hook}"),
            ExpertsSource::Hook { hook } => format!("router hook {hook}"),
        }
    }
}

/// The features of expert `e` of a dictionary with `per_expert` features per expert.
pub fn features_of(e: u32, per_expert: u32) -> std::ops::Range<u32> {
    e * per_expert..(e + 1) * per_expert
}

/// P(E_j | E_i) among the `max` most used experts (`by_usage`: ids, most used first).
pub fn heatmap(by_usage: &[u32], coactivation: &[CoactivationRow], max: usize) -> Heatmap {
    let experts: Vec<u32> = by_usage.iter().take(max).copied().collect();
    let k = experts.len();
    let mut index = std::collections::HashMap::with_capacity(k);
    for (i, &e) in experts.iter().enumerate() {
        index.insert(e, i);
    }
    let mut p = vec![f32::NAN; k * k];
    for r in coactivation {
        if let (Some(&i), Some(&j)) = (index.get(&r.expert_i), index.get(&r.expert_j)) {
            p[i * k + j] = r.p_j_given_i;
        }
    }
    for i in 0..k {
        // Every token routed to i is routed to i.
        p[i * k + i] = 1.0;
    }
    Heatmap { experts, p }
}

/// The vocabulary of the source dictionary's analysis, else of the first analysed dictionary of
/// the store (one model per store); None when nothing is analysed.
fn vocabulary(store: &Store, entry: &ExpertsEntry) -> Result<Option<Vocabulary>> {
    let manifest = store.manifest();
    let own = match &entry.source {
        ExpertsSource::Dictionary { name, .. } => manifest.features.get_key_value(name),
        ExpertsSource::Hook { .. } => None,
    };
    let Some((dict, features)) = own.or_else(|| manifest.features.iter().next()) else {
        return Ok(None);
    };
    let what = format!("the analysis of {dict}");
    let batch = store.read_listed_table(&features.files, &what, VOCAB_TABLE, &table::schema::<VocabRow>())?;
    let view = table::view::<VocabRow>(&batch)?;
    let strings = (0..batch.num_rows()).map(|i| VocabRow::get(&view, i).string).collect();
    Ok(Some(Vocabulary { dictionary: dict.clone(), strings }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(expert_i: u32, expert_j: u32, p: f32) -> CoactivationRow {
        CoactivationRow { expert_i, expert_j, both: 1, p_j_given_i: p }
    }

    #[test]
    fn the_heatmap_holds_the_pairs_among_the_most_used() {
        let rows = [row(5, 2, 0.25), row(2, 5, 0.5), row(5, 9, 0.75), row(9, 5, 0.1), row(7, 5, 0.3)];
        let h = heatmap(&[5, 2, 9, 7], &rows, 3);
        assert_eq!(h.experts, [5, 2, 9]);
        assert_eq!((h.get(0, 1), h.get(1, 0), h.get(0, 2), h.get(2, 0)), (0.25, 0.5, 0.75, 0.1));
        assert_eq!((h.get(0, 0), h.get(1, 1)), (1.0, 1.0));
        assert!(h.get(1, 2).is_nan(), "no row for 2 → 9");
    }

    #[test]
    fn sorts_lookups_and_a_bad_expert_id() {
        let (tables, entry) = crate::gui::experts_synthetic::synthetic(300);
        let data = ExpertsData { name: "x".into(), entry: entry.clone(), tables: tables.clone() };
        let e = Experts::new(data, None).unwrap();
        let usage = |id: u32| e.expert(id).unwrap().usage;
        assert!(e.order(Sort::Usage).windows(2).all(|w| usage(w[0]) >= usage(w[1])));
        assert_eq!(e.order(Sort::Id), (0..300).collect::<Vec<u32>>());
        assert_eq!(e.heatmap.len(), 128);
        assert_eq!(e.heatmap.experts[..], e.order(Sort::Usage)[..128]);
        let partners = e.partners(7, 100);
        assert!(partners.windows(2).all(|w| w[0].p_j_given_i >= w[1].p_j_given_i));
        assert!(!partners.is_empty() && partners.iter().all(|r| r.expert_i == 7 && r.expert_j != 7));
        assert_eq!(e.tokens(7).len(), 8);
        assert_eq!(e.domains(7).iter().map(|d| d.domain).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(e.token(5), "#5", "no vocabulary: ids");
        let mut bad = tables;
        bad.experts[0].expert = 300;
        let err = Experts::new(ExpertsData { name: "x".into(), entry, tables: bad }, None).err().unwrap();
        assert!(
            err.to_string().contains("expert 300 in experts.arrow, but the entry has 300 experts"),
            "{err}"
        );
    }

    #[test]
    fn an_expert_owns_a_block_of_features() {
        assert_eq!(features_of(3, 1), 3..4);
        assert_eq!(features_of(3, 4), 12..16);
    }
}
