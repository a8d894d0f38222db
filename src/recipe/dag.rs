//! The stage graph of a recipe (the loader rejects cycles with it; the planner orders stages by it): nodes are stages, an edge `a → b` means "b reads a's artifact".

use super::{InputRef, StageSpec};
use petgraph::graph::{DiGraph, NodeIndex};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

/// Build the graph (node weight = index into `stages`). References to unknown stages are skipped:
/// the loader reports those with spans.
pub fn graph(stages: &[StageSpec]) -> DiGraph<usize, ()> {
    let mut g = DiGraph::new();
    let nodes: Vec<NodeIndex> = (0..stages.len()).map(|i| g.add_node(i)).collect();
    let by_name: HashMap<&str, NodeIndex> = stages.iter().zip(&nodes).map(|(s, n)| (s.name.as_str(), *n)).collect();
    for (s, &to) in stages.iter().zip(&nodes) {
        for input in &s.inputs {
            if let InputRef::Stage { stage, .. } = input {
                if let Some(&from) = by_name.get(stage.as_str()) {
                    if g.find_edge(from, to).is_none() {
                        g.add_edge(from, to, ());
                    }
                }
            }
        }
    }
    g
}

/// Stage indices in topological order, ties broken by file order (so the order is stable and
/// reads like the recipe). On a cycle, the names of the stages in it, in data-flow order.
pub fn topo_order(stages: &[StageSpec]) -> Result<Vec<usize>, Vec<String>> {
    let g = graph(stages);
    let mut indeg: Vec<usize> =
        g.node_indices().map(|n| g.neighbors_directed(n, petgraph::Direction::Incoming).count()).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..stages.len()).filter(|&i| indeg[i] == 0).map(Reverse).collect();
    let mut order = Vec::with_capacity(stages.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for n in g.neighbors(NodeIndex::new(i)) {
            indeg[n.index()] -= 1;
            if indeg[n.index()] == 0 {
                ready.push(Reverse(n.index()));
            }
        }
    }
    if order.len() == stages.len() {
        return Ok(order);
    }
    Err(find_cycle(&g, &indeg).into_iter().map(|i| stages[i].name.clone()).collect())
}

/// One cycle among the nodes Kahn's algorithm could not free (all have in-degree > 0, so walking
/// backwards along incoming edges from any of them must revisit a node).
fn find_cycle(g: &DiGraph<usize, ()>, indeg: &[usize]) -> Vec<usize> {
    let start = (0..indeg.len()).find(|&i| indeg[i] > 0).expect("a cycle exists");
    let mut seen: HashMap<usize, usize> = HashMap::new();
    let mut walk = Vec::new();
    let mut cur = start;
    loop {
        if let Some(&pos) = seen.get(&cur) {
            // `walk[pos..]` follows edges backwards (reader → producer); reverse it to data flow,
            // then rotate so the cycle starts at its earliest stage in file order.
            let mut cyc: Vec<usize> = walk[pos..].iter().rev().copied().collect();
            let min_at = (0..cyc.len()).min_by_key(|&k| cyc[k]).unwrap_or(0);
            cyc.rotate_left(min_at);
            return cyc;
        }
        seen.insert(cur, walk.len());
        walk.push(cur);
        cur = g
            .neighbors_directed(NodeIndex::new(cur), petgraph::Direction::Incoming)
            .map(|n| n.index())
            .filter(|&n| indeg[n] > 0)
            .min()
            .expect("a node left by Kahn's algorithm has an unfreed producer");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::ArtifactKind;

    fn st(name: &str, from: &[&str]) -> StageSpec {
        StageSpec {
            name: name.into(),
            kind: "x".into(),
            params: serde_json::json!({}),
            inputs: from
                .iter()
                .map(|f| InputRef::Stage { param: "from", stage: f.to_string(), accepts: vec![ArtifactKind::Model] })
                .collect(),
            resources: Default::default(),
        }
    }

    #[test]
    fn order_is_topological_and_stable() {
        // d reads b; b reads a; c independent; file order a, d, c, b.
        let s = vec![st("a", &[]), st("d", &["b"]), st("c", &[]), st("b", &["a"])];
        let names: Vec<&str> = topo_order(&s).unwrap().iter().map(|&i| s[i].name.as_str()).collect();
        assert_eq!(names, ["a", "c", "b", "d"]);
    }

    #[test]
    fn cycle_is_named_in_flow_order() {
        let s = vec![st("x", &[]), st("a", &["c"]), st("b", &["a"]), st("c", &["b"]), st("d", &["a"])];
        assert_eq!(topo_order(&s).unwrap_err(), ["a", "b", "c"]);
        let s = vec![st("p", &["q"]), st("q", &["p"])];
        assert_eq!(topo_order(&s).unwrap_err(), ["p", "q"]);
    }
}
