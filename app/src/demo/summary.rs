//! The demo's closing summary, read back from the store: each dictionary's held-out FVU, CE-loss
//! recovered and dead fraction, the top induction heads, the IOI circuit's top nodes per method
//! and the evaluation's AUCs, the graph, the experts, the exports, and every stage's time.

use std::fmt::Write;

use anyhow::Result;
use loupe_store::Store;
use loupe_store::heads::DEFAULT_HEADS_NAME;
use serde_json::Value;

use super::stages_analysis::{CIRCUITS, EVAL, GRAPH, export_dir, graph_json, transcoder};
use super::stages_dict::{LAYERS, MOEX, MUTUAL, SAES, TOPK};
use super::{Ctx, Timed};

/// A dictionary's held-out evaluation (`eval.json`).
struct Eval {
    fvu: f64,
    /// CE-loss recovered, when it was measured.
    ce: Option<f64>,
    dead: f64,
}

fn eval_of(store: &Store, name: &str) -> Result<Eval> {
    let path = store.dictionary_dir(name).join("eval.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    let num = |p: &str| v.pointer(p).and_then(Value::as_f64);
    Ok(Eval {
        fvu: num("/held_out/fvu").unwrap_or(f64::NAN),
        ce: num("/splice/ce_loss_recovered"),
        dead: num("/held_out/dead_fraction").unwrap_or(f64::NAN),
    })
}

pub fn summary(ctx: &Ctx, timed: &[Timed], total_s: f64) -> Result<String> {
    let store = ctx.open()?;
    let m = store.manifest();
    let b = &ctx.budget;
    let mut s = String::new();
    match b.name {
        "quick" => writeln!(
            s,
            "summary (QUICK budget: {} tokens, small dictionaries, {} IOI pairs — a check of the pipeline, not worth browsing)",
            b.tokens, b.ioi_pairs
        )?,
        _ => writeln!(s, "summary ({} budget: {} tokens of Moby-Dick)", b.name, b.tokens)?,
    }
    writeln!(s, "store: {}", ctx.store.display())?;

    writeln!(s, "dictionaries (held-out FVU, CE-loss recovered spliced in, dead features):")?;
    for (name, what) in
        [(TOPK, "TopK SAE"), (MUTUAL, "Mutual Choice SAE"), (MOEX, "MoE-X transcoder, layer 6")]
    {
        let Eval { fvu, ce, dead } = eval_of(&store, name)?;
        let ce = ce.map_or("not measured".into(), |c| format!("{c:.3}"));
        writeln!(
            s,
            "  {name:<20} {what:<26} FVU {fvu:.3}  CE-loss recovered {ce}  dead {:.1} %",
            100.0 * dead
        )?;
    }
    let mut fvus = Vec::new();
    for l in 0..LAYERS {
        fvus.push(eval_of(&store, &transcoder(l))?);
    }
    let mean = |f: fn(&Eval) -> f64| fvus.iter().map(f).sum::<f64>() / fvus.len() as f64;
    writeln!(
        s,
        "  {:<20} {:<26} mean FVU {:.3}  (CE not measured per layer)  mean dead {:.1} %",
        format!("{}…{}", transcoder(0), LAYERS - 1),
        "18 per-layer transcoders",
        mean(|e| e.fvu),
        100.0 * mean(|e| e.dead)
    )?;

    let mut explained = Vec::new();
    for d in SAES {
        let e = store.explanations(d)?;
        let ok = e.explanations.iter().filter(|r| r.explanation.is_some()).count();
        explained.push(format!("{d} {ok} explained, {} scores", e.scores.len()));
    }
    writeln!(s, "explanations: {}", explained.join("; "))?;

    if let Some(heads) = store.read_heads(DEFAULT_HEADS_NAME)? {
        let mut rows: Vec<_> = heads.rows.iter().filter(|r| r.induction.is_finite()).collect();
        rows.sort_by(|a, b| b.induction.total_cmp(&a.induction));
        let top: Vec<String> =
            rows.iter().take(5).map(|r| format!("{}.{} {:.3}", r.layer, r.head, r.induction)).collect();
        writeln!(s, "top induction heads (induction score): {}", top.join(", "))?;
    }

    writeln!(s, "IOI circuit, top nodes by |score|:")?;
    for name in CIRCUITS {
        if let Some(c) = store.read_circuit(name)? {
            let mut nodes: Vec<_> = c.nodes.iter().collect();
            nodes.sort_by(|a, b| b.score.abs().total_cmp(&a.score.abs()));
            let top: Vec<String> =
                nodes.iter().take(5).map(|n| format!("{} {:.3}", n.node, n.score)).collect();
            writeln!(
                s,
                "  {:<14} ({} pairs, {:.1} s): {}",
                c.entry.method,
                c.entry.task.pairs,
                c.entry.wall_s,
                top.join(", ")
            )?;
        }
    }
    if let Some(e) = store.read_circuit_eval(EVAL)? {
        let rows: Vec<String> = e
            .rows
            .iter()
            .filter(|r| r.method != "patching")
            .map(|r| {
                format!(
                    "{} node AUC {:.3} (top 10 %) / {:.3} (|effect| ≥ 0.05), {:.1}× faster",
                    r.method, r.node_auc_top10, r.node_auc_abs, r.speedup
                )
            })
            .collect();
        writeln!(s, "  circuit eval against patching: {}", rows.join("; "))?;
    }

    if let Some(g) = m.graphs.get(GRAPH) {
        writeln!(
            s,
            "attribution graph {GRAPH} ({} tokens): {} nodes, {} edges of {} active features; replacement score {:.3}, completeness {:.3}; exported to {}",
            g.tokens.len(),
            g.n_nodes,
            g.n_edges,
            g.active_features,
            g.replacement_score,
            g.completeness_score,
            graph_json(ctx).display()
        )?;
    }

    if let Some(x) = store.read_experts(MOEX)? {
        let e = &x.entry;
        let used = x.tables.experts.iter().filter(|r| r.tokens > 0).count();
        let mut by_use: Vec<_> = x.tables.experts.iter().collect();
        by_use.sort_by(|a, b| b.usage.total_cmp(&a.usage));
        let top: Vec<String> =
            by_use.iter().take(3).map(|r| format!("{} {:.1} %", r.expert, 100.0 * r.usage)).collect();
        writeln!(
            s,
            "experts of {MOEX}: {used} of {} used, {:.2} per token, routing entropy {:.3} nats; most used {}",
            e.n_experts,
            e.mean_active,
            e.mean_entropy,
            top.join(", ")
        )?;
    }
    writeln!(s, "explanations export: {}", export_dir(ctx).display())?;

    let n = timed.len() + 1;
    writeln!(s, "stages:")?;
    for (i, t) in timed.iter().enumerate() {
        let how = if t.already_done { "  (already done)" } else { "" };
        writeln!(s, "  [{:>2}/{n}] {:>7.1} s  {}{how}", i + 1, t.seconds, t.title)?;
    }
    writeln!(s, "total {total_s:.1} s")?;
    writeln!(s, "browse: loupe gui {}", ctx.store.display())?;
    Ok(s)
}
