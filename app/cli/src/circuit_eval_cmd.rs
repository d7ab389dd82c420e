//! `loupe circuit eval`: each fast method (attribution, discrete-sae) against the patching ground
//! truth on one task — node and edge ROC AUC (two definitions of a positive), faithfulness at
//! k ∈ {1, 2, 5, 10, 20, 50, 100} % of nodes, CPR, CMD and wall times — printed and written as
//! the store's `circuits/evals/<name>/`. A method's circuit is taken from the store when one was
//! made from this task and model, else computed and written too
//! ([`loupe_analysis::circuits::eval_run`]).

use std::path::PathBuf;

use anyhow::Result;
use loupe_analysis::circuits::eval_run::{self, EvalReport};
use loupe_model::Session;
use loupe_store::Store;

use crate::progress::Bar;

#[derive(clap::Args)]
pub struct Args {
    /// The store folder.
    #[arg(long)]
    pub(crate) store: PathBuf,
    /// The model (default: the one the store records).
    #[arg(long)]
    pub(crate) model: Option<PathBuf>,
    /// The task file.
    #[arg(long)]
    pub(crate) task: PathBuf,
    /// The evaluation's name in the store (default: the task file's stem).
    #[arg(long)]
    pub(crate) name: Option<String>,
}

pub fn run(args: &Args) -> Result<()> {
    let manifest = Store::open(&args.store)?.manifest();
    let session = Session::open(&manifest, args.model.as_deref(), Some("pass --model"))?;
    let store = Store::open_rw(&args.store)?;
    let bar = Bar::new("{prefix:24} {bar:30} {pos}/{len}  [{elapsed}]");
    let report = eval_run::eval(&store, &session, &args.task, args.name.as_deref(), &bar)?;
    bar.indicatif().finish_and_clear();
    print!("{}", table(&report));
    println!("wrote circuits/evals/{} in {}", report.name, args.store.display());
    Ok(())
}

/// The printed report: the task, where each circuit came from, the table and the curves.
fn table(r: &EvalReport) -> String {
    let t = &r.task;
    let mut out = format!(
        "task {}: {} pairs, {} clean {:.4}, corrupt {:.4}, accuracy {:.1} %\n",
        t.file,
        t.pairs,
        t.metric,
        t.metric_clean,
        t.metric_corrupt,
        100.0 * t.accuracy
    );
    for (method, name, computed) in &r.circuits {
        let how = if *computed { "computed now" } else { "from the store" };
        out += &format!("  {}: circuits/{name} ({how})\n", method.name());
    }
    let num = |v: f32| if v.is_nan() { "–".to_string() } else { format!("{v:.3}") };
    let opt = |v: Option<f32>| v.map_or("none".to_string(), num);
    out += &format!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>6} {:>6} {:>9} {:>9}\n",
        "method", "node top", "node abs", "edge top", "edge abs", "CPR", "CMD", "wall s", "speed-up"
    );
    for row in &r.rows {
        out += &format!(
            "{:<14} {:>9} {:>9} {:>9} {:>9} {:>6.3} {:>6.3} {:>9.3} {:>8.1}×\n",
            row.method,
            num(row.node_auc_top10),
            num(row.node_auc_abs),
            opt(row.edge_auc_top10),
            opt(row.edge_auc_abs),
            row.cpr,
            row.cmd,
            row.wall_s,
            row.speedup
        );
    }
    out += "node AUC over the heads alone (top 10 % of heads / |effect| ≥ 0.05):";
    for (method, top, abs) in &r.heads_auc {
        out += &format!(" {method} {} / {};", num(*top), num(*abs));
    }
    out += "\n";
    out += "(AUC of |score|; top: the top 10 % of nodes by |patching effect| are positive, abs: |effect| ≥ 0.05; \
            an edge is positive when both its nodes are; –: no positive or no negative; none: no edge scores)\nfaithfulness f(k), k = % of nodes kept:\n";
    out += &format!("{:<14}", "k");
    let ks: Vec<f32> = r.faithfulness.iter().filter(|f| f.method == r.rows[0].method).map(|f| f.k).collect();
    for k in &ks {
        out += &format!(" {:>7}", format!("{k}%"));
    }
    out += "\n";
    for row in &r.rows {
        out += &format!("{:<14}", row.method);
        for f in r.faithfulness.iter().filter(|f| f.method == row.method) {
            out += &format!(" {:>7.3}", f.f);
        }
        out += "\n";
    }
    out
}
