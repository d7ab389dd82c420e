//! The strongest path of a stored (pruned) graph from the prompt's tokens into one node: the
//! path whose product of edge shares is largest, where an edge's share is its |weight| over the
//! sum of |weight| into its target (the row-normalised adjacency that circuit-tracer's influence
//! sums over: a path's product is its part of the influence). Errors have no inputs, so a path
//! starts at an embedding.

use loupe_store::{GraphEdgeRow, GraphNodeRow};

/// The strongest path into node row `target`: the node rows from an embedding to `target` and
/// the product of their edge shares; `None` when no embedding reaches `target`.
pub fn strongest_path(
    nodes: &[GraphNodeRow],
    edges: &[GraphEdgeRow],
    target: u32,
) -> Option<(Vec<u32>, f64)> {
    let n = nodes.len();
    let mut incoming: Vec<Vec<(u32, f64)>> = vec![Vec::new(); n];
    let mut total = vec![0.0f64; n];
    for e in edges {
        incoming[e.target as usize].push((e.source, f64::from(e.weight.abs())));
        total[e.target as usize] += f64::from(e.weight.abs());
    }
    // best[v]: the largest product over paths from an embedding to v, and v's predecessor on
    // it; computed in an order where sources come first (the graph is acyclic: every edge goes
    // from an earlier layer, or from an embedding, or into a logit).
    let rank = |row: &GraphNodeRow| match row.kind.as_str() {
        "embedding" => (0, 0),
        "logit" => (2, 0),
        _ => (1, row.layer),
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| rank(&nodes[i]));
    let mut best: Vec<Option<(f64, Option<u32>)>> = vec![None; n];
    for &v in &order {
        if nodes[v].kind == "embedding" {
            best[v] = Some((1.0, None));
            continue;
        }
        for &(u, w) in &incoming[v] {
            if let Some((p, _)) = best[u as usize] {
                let product = p * w / total[v];
                if best[v].is_none_or(|(q, _)| product > q) {
                    best[v] = Some((product, Some(u)));
                }
            }
        }
    }
    let (product, _) = best[target as usize]?;
    let mut path = vec![target];
    while let Some((_, Some(u))) = best[*path.last()? as usize] {
        path.push(u);
    }
    path.reverse();
    Some((path, product))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(node: u32, kind: &str, layer: u16) -> GraphNodeRow {
        GraphNodeRow {
            node,
            node_id: format!("{node}"),
            kind: kind.into(),
            layer,
            position: 0,
            feature: 0,
            activation: 0.0,
            probability: None,
            influence: 0.0,
        }
    }

    fn edge(source: u32, target: u32, weight: f32) -> GraphEdgeRow {
        GraphEdgeRow { source, target, weight }
    }

    /// Two routes into the logit: the one with the larger product of shares wins, even when
    /// its single strongest edge is weaker.
    #[test]
    fn picks_the_largest_product_of_shares() {
        let nodes = vec![
            node(0, "embedding", 0),
            node(1, "feature", 0),
            node(2, "feature", 1),
            node(3, "error", 0),
            node(4, "logit", 2),
        ];
        let edges = vec![
            edge(0, 1, 1.0),  // share 1 into 1
            edge(0, 2, -1.0), // share 0.1 into 2
            edge(3, 2, 9.0),  // share 0.9 into 2 (an error: no path starts there)
            edge(1, 4, 2.0),  // share 0.4
            edge(2, 4, -3.0), // share 0.6, but 0.1 · 0.6 < 1 · 0.4
        ];
        let (path, product) = strongest_path(&nodes, &edges, 4).unwrap();
        assert_eq!(path, vec![0, 1, 4]);
        assert!((product - 0.4).abs() < 1e-12);
        assert!(strongest_path(&nodes, &edges, 3).is_none());
    }
}
