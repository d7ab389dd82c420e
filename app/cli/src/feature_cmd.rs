//! `loupe feature`: print what the analysis of a dictionary found for one feature — stats, top
//! and quantile examples (the example token in «»), logit effects, neighbours and co-occurring
//! features — read from the store's `features/<dict>/` tables.

use anyhow::Result;
use loupe_store::{Example, FeatureTables, Store};

use crate::dict_args::{self, DictArgs};

#[derive(clap::Args)]
#[command(mut_args(dict_args::required))]
pub struct Args {
    #[command(flatten)]
    pub(crate) target: DictArgs,
    /// The feature id.
    pub(crate) feature: u32,
    /// Top examples to print.
    #[arg(long, default_value_t = 5)]
    pub(crate) examples: usize,
}

/// A value with 4 significant digits, in exponent form when small (Monet gates are ~1e-3).
fn num(v: f32) -> String {
    if v != 0.0 && v.abs() < 0.01 { format!("{v:.3e}") } else { format!("{v:.3}") }
}

/// An example's window as text, the example token in «», tokens the feature fired on in [].
fn window(tables: &FeatureTables, e: &Example) -> String {
    let mut out = String::new();
    for (i, (&t, &a)) in e.tokens.iter().zip(&e.activations).enumerate() {
        let text = tables.token_string(t).replace('\n', "⏎");
        match (i == e.center as usize, a > 0.0) {
            (true, _) => out.push_str(&format!("«{text}»")),
            (false, true) => out.push_str(&format!("[{text}]")),
            (false, false) => out.push_str(&text),
        }
    }
    out
}

pub fn run(args: &Args) -> Result<()> {
    let store = Store::open(args.target.store()?)?;
    let dictionary = args.target.dictionary()?;
    let tables = FeatureTables::open(&store, dictionary)?;
    let f = args.feature;
    let s = tables.stats(f)?;
    let flags = match (s.dead, s.dense) {
        (true, _) => " (dead)",
        (_, true) => " (dense)",
        _ => "",
    };
    println!(
        "feature {f} of {dictionary}{flags}: fired on {} of {} tokens (density {:.3e}), mean {}, max {}",
        s.count,
        tables.entry().tokens,
        s.density,
        num(s.mean_activation),
        num(s.max_activation)
    );
    println!("top examples:");
    for e in tables.top_examples(f)?.iter().take(args.examples) {
        println!("  {:>9}  doc {} pos {}: {}", num(e.activation), e.doc, e.pos, window(&tables, e));
    }
    println!("quantile examples (one per bucket):");
    for e in tables.quantile_examples(f)?.iter().filter(|e| e.rank == 0) {
        let b = e.bucket.expect("quantile examples have buckets");
        println!(
            "  [{}, {}) {:>6} tokens  {:>9}: {}",
            num(b.lo),
            num(b.hi),
            b.tokens,
            num(e.activation),
            window(&tables, e)
        );
    }
    let logits = tables.logits(f)?;
    if !logits.is_empty() {
        let list = |up: bool| -> String {
            logits
                .iter()
                .filter(|l| (l.rank > 0) == up)
                .map(|l| format!("{:?} {:+.2}", tables.token_string(l.token), l.value))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!("promotes:   {}", list(true));
        println!("suppresses: {}", list(false));
    }
    let neighbours: Vec<String> =
        tables.neighbours(f)?.iter().map(|n| format!("{} ({:.2})", n.neighbour, n.cosine)).collect();
    if !neighbours.is_empty() {
        println!("neighbours (decoder cosine): {}", neighbours.join(", "));
    }
    let co: Vec<String> =
        tables.cooccurrence(f)?.iter().map(|c| format!("{} ({:.2})", c.other, c.jaccard)).collect();
    if !co.is_empty() {
        println!("co-occurring features (Jaccard): {}", co.join(", "));
    }
    Ok(())
}
