//! Planning: the stage DAG (petgraph), type checks, stage keys and staleness with reasons.

pub mod dag;
