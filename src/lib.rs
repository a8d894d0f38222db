//! mmrun — train small MiniMind-style language models end to end from one declarative TOML recipe.
//!
//! Data flows one way: [`recipe`] → [`plan`] → [`exec`] (for each stale stage) → a [`stages`]
//! plugin → [`train`] / [`model`] / [`data`] → an [`artifact::Artifact`] → [`cache`] → [`runs`].
//! See `ARCHITECTURE.md` at the repository root for the code map and its invariants.

pub mod align;
pub mod artifact;
pub mod cache;
pub mod cancel;
pub mod cli;
pub mod cpu;
pub mod data;
pub mod dist;
pub mod durable;
pub mod eval;
pub mod exec;
pub mod export;
pub mod fs_error;
pub mod hub;
pub mod infer;
pub mod model;
pub mod modelref;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod runs;
pub mod serve;
pub mod stages;
#[doc(hidden)]
pub mod testutil;
pub mod tools;
pub mod train;

/// The mmrun version recorded in run records and locks.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
