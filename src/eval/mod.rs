//! Evaluation: perplexity, exact-match and multiple-choice accuracy, generations for reports.
