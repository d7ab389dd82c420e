//! What each expert of a mixture handles (`loupe experts`), counted over captured activations and
//! written as the tables of [`loupe_store::experts`].
//!
//! - [`routing`]: where the routing comes from — a dictionary with experts
//!   ([`loupe_dict::Dictionary::route`] over the hook it reads; Monet, MoE-X, whatever implements
//!   it) or a captured router hook of a real MoE model (`blocks.L.mlp.hook_expert_weights`, or
//!   `hook_router_probs` / `hook_router_logits` with a top-k);
//! - [`domains`]: corpus domains (each top-level folder or file of the corpus) and the domain of
//!   each document id;
//! - [`count`]: the two counting passes (usage, gates, entropy, vocabulary and domains; then the
//!   exact co-activation rows of the most used experts);
//! - [`tables`]: the store rows from the counts;
//! - [`run`]: the command — checks, passes, the entry, one manifest commit.
//!
//! Definitions (OLMoE, arXiv 2409.02060, for the specializations):
//! - usage of expert E: the tokens routed to E / all tokens counted; mean gate over those tokens;
//! - routing entropy of a token: the entropy (nats) of its chosen experts' gates normalised to
//!   sum 1 (histogram and mean). Where the source holds the full router distribution
//!   (`hook_router_probs`, `hook_router_logits`) the mean entropy of that full softmax is also
//!   recorded (`ExpertsEntry::mean_router_entropy`);
//! - co-activation P(E_j | E_i) = N(i ∧ j) / N(i) (see [`count`] for which pairs are exact);
//! - vocabulary specialization of E for token id t: count(E, t) / count(t); each expert's top
//!   token ids by count(E, t);
//! - domain specialization of E for domain d: N_E(d) / N(d); null with a single domain (it would
//!   be the expert's usage, not a specialization).

pub mod count;
pub mod domains;
pub mod routing;
pub mod run;
pub mod tables;

pub use run::{ExpertsConfig, Report, Source, run};
