//! Evaluation: perplexity, exact-match and multiple-choice accuracy, generations for reports.

pub mod answer;
