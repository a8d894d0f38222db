//! Built-in verifiable rewards for GRPO, declared in the recipe, each with a weight:
//! exact-match answer (GSM8K `#### n`, `<answer>…</answer>`, last number — the same extraction and
//! normalisation as the eval stage's exact match), a format regex, a length window and a
//! repetition penalty (the reference's 3-gram rule, spec §12 step 3).

use regex::Regex;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// One reward term as written in the recipe (`{ kind = "exact_match", weight = 1.0 }`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum RewardSpec {
    /// `weight` when the completion's extracted answer equals the example's final answer, else 0.
    ExactMatch {
        /// Multiplier.
        #[serde(default = "one")]
        weight: f64,
    },
    /// `weight` when `pattern` (a Rust regex) matches somewhere in the completion, else 0.
    Format {
        /// The regex.
        pattern: String,
        /// Multiplier.
        #[serde(default = "one")]
        weight: f64,
    },
    /// `+weight` when the trimmed completion has `min_chars..=max_chars` characters, else `-weight`.
    Length {
        /// Shortest good length.
        #[serde(default)]
        min_chars: usize,
        /// Longest good length.
        max_chars: usize,
        /// Multiplier.
        #[serde(default = "one")]
        weight: f64,
    },
    /// `-weight * min(0.5, repeated 3-gram fraction)` over lowercase word/punctuation tokens.
    Repetition {
        /// Multiplier.
        #[serde(default = "one")]
        weight: f64,
    },
}

fn one() -> f64 {
    1.0
}

impl RewardSpec {
    /// Short name used in metrics and errors.
    pub fn name(&self) -> &'static str {
        match self {
            RewardSpec::ExactMatch { .. } => "exact_match",
            RewardSpec::Format { .. } => "format",
            RewardSpec::Length { .. } => "length",
            RewardSpec::Repetition { .. } => "repetition",
        }
    }

    fn weight(&self) -> f64 {
        match self {
            RewardSpec::ExactMatch { weight }
            | RewardSpec::Format { weight, .. }
            | RewardSpec::Length { weight, .. }
            | RewardSpec::Repetition { weight } => *weight,
        }
    }
}

/// Invalid reward declarations and non-finite reward values.
#[derive(Debug, thiserror::Error)]
pub enum RewardError {
    /// A declaration is unusable.
    #[error("rewards[{index}] ({name}): {msg}")]
    Spec {
        /// Position in the recipe's list.
        index: usize,
        /// Reward kind.
        name: &'static str,
        /// What is wrong.
        msg: String,
    },
    /// A reward evaluated to NaN or infinity.
    #[error("reward `{name}` returned {value} for completion #{completion}; rewards must be finite numbers")]
    NonFinite {
        /// Reward kind.
        name: &'static str,
        /// The value.
        value: f64,
        /// Which completion.
        completion: usize,
    },
}

enum Compiled {
    Exact,
    Format(Regex),
    Length(usize, usize),
    Repetition,
}

/// A validated, compiled list of rewards.
pub struct RewardSet {
    terms: Vec<(RewardSpec, Compiled)>,
}

impl RewardSet {
    /// Validate weights and windows and compile regexes; an empty list is an error.
    pub fn new(specs: &[RewardSpec]) -> Result<Self, RewardError> {
        if specs.is_empty() {
            return Err(RewardError::Spec {
                index: 0,
                name: "rewards",
                msg: "no rewards declared; add e.g. `rewards = [{ kind = \"exact_match\" }]`".into(),
            });
        }
        let mut terms = Vec::new();
        for (index, s) in specs.iter().enumerate() {
            let bad = |msg: String| RewardError::Spec { index, name: s.name(), msg };
            if !s.weight().is_finite() {
                return Err(bad(format!("weight must be a finite number, got {}", s.weight())));
            }
            let c = match s {
                RewardSpec::ExactMatch { .. } => Compiled::Exact,
                RewardSpec::Format { pattern, .. } => {
                    Compiled::Format(Regex::new(pattern).map_err(|e| bad(format!("invalid regex: {e}")))?)
                }
                RewardSpec::Length { min_chars, max_chars, .. } => {
                    if min_chars > max_chars {
                        return Err(bad(format!("min_chars ({min_chars}) is above max_chars ({max_chars})")));
                    }
                    Compiled::Length(*min_chars, *max_chars)
                }
                RewardSpec::Repetition { .. } => Compiled::Repetition,
            };
            terms.push((s.clone(), c));
        }
        Ok(Self { terms })
    }

    /// Names of the terms, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.terms.iter().map(|(s, _)| s.name()).collect()
    }

    /// Total reward and the weighted value of each term for one completion. `answer` is the
    /// example's normalised final answer (exact match scores 0 without one). `completion` is the
    /// index used in error messages.
    pub fn score(&self, text: &str, answer: Option<&str>, completion: usize) -> Result<(f64, Vec<f64>), RewardError> {
        let mut parts = Vec::with_capacity(self.terms.len());
        for (spec, c) in &self.terms {
            let w = spec.weight();
            let v = match c {
                Compiled::Exact => match answer {
                    Some(a) if crate::eval::answer::is_correct(text, a) => w,
                    _ => 0.0,
                },
                Compiled::Format(re) => {
                    if re.is_match(text) {
                        w
                    } else {
                        0.0
                    }
                }
                Compiled::Length(lo, hi) => {
                    let n = text.trim().chars().count();
                    if (*lo..=*hi).contains(&n) {
                        w
                    } else {
                        -w
                    }
                }
                Compiled::Repetition => -w * repetition_penalty(text),
            };
            check_finite(spec.name(), v, completion)?;
            parts.push(v);
        }
        let total: f64 = parts.iter().sum();
        check_finite("total", total, completion)?;
        Ok((total, parts))
    }
}

/// Error unless `value` is finite (the one place NaN rewards are caught, named by reward).
pub fn check_finite(name: &'static str, value: f64, completion: usize) -> Result<(), RewardError> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(RewardError::NonFinite { name, value, completion })
    }
}

/// The reference's repetition penalty: over lowercase `\w+|[^\w\s]` tokens,
/// `min(0.5, (#3-grams − #distinct 3-grams) / #3-grams)`, 0 with fewer than 3 tokens.
pub fn repetition_penalty(text: &str) -> f64 {
    static TOK: std::sync::OnceLock<Regex> = std::sync::OnceLock::new();
    let re = TOK.get_or_init(|| Regex::new(r"\w+|[^\w\s]").expect("static regex"));
    let lower = text.to_lowercase();
    let toks: Vec<&str> = re.find_iter(&lower).map(|m| m.as_str()).collect();
    if toks.len() < 3 {
        return 0.0;
    }
    let grams: Vec<&[&str]> = toks.windows(3).collect();
    let distinct: std::collections::HashSet<&[&str]> = grams.iter().copied().collect();
    ((grams.len() - distinct.len()) as f64 / grams.len() as f64).min(0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(specs: &str) -> RewardSet {
        #[derive(Deserialize)]
        struct W {
            rewards: Vec<RewardSpec>,
        }
        let w: W = toml::from_str(specs).unwrap();
        RewardSet::new(&w.rewards).unwrap()
    }

    #[test]
    fn exact_match_uses_the_eval_extraction() {
        let r = set(r#"rewards = [{ kind = "exact_match", weight = 2.0 }]"#);
        assert_eq!(r.score("so 3 + 4 = 7\n#### 7", Some("7"), 0).unwrap().0, 2.0);
        assert_eq!(r.score("<answer> 1,000 </answer>", Some("1000"), 0).unwrap().0, 2.0);
        assert_eq!(r.score("I think it is 12 or maybe 13", Some("13"), 0).unwrap().0, 2.0, "last number");
        assert_eq!(r.score("#### 8", Some("7"), 0).unwrap().0, 0.0);
        assert_eq!(r.score("#### 7", None, 0).unwrap().0, 0.0, "no gold answer: no reward");
    }

    #[test]
    fn format_length_and_repetition_terms_add_up() {
        let r = set(r#"rewards = [
                { kind = "format", pattern = "^<answer>.*</answer>$", weight = 0.5 },
                { kind = "length", min_chars = 5, max_chars = 20, weight = 0.25 },
                { kind = "repetition", weight = 1.0 },
            ]"#);
        assert_eq!(r.names(), vec!["format", "length", "repetition"]);
        let (t, parts) = r.score("<answer>42</answer>", None, 0).unwrap();
        assert_eq!(parts, vec![0.5, 0.25, -0.0]);
        assert_eq!(t, 0.75);
        let (_, parts) = r.score("42", None, 0).unwrap();
        assert_eq!(parts[..2], [0.0, -0.25]);
        // "a b c a b c a b c": 7 trigrams, 3 distinct → 4/7 capped at 0.5.
        assert_eq!(repetition_penalty("a b c a b c a b c"), 0.5);
        // "a b c d a b": 4 trigrams, 4 distinct... "a b c","b c d","c d a","d a b" → 0.
        assert_eq!(repetition_penalty("a b c d a b"), 0.0);
        // "x y z x y z w": trigrams xyz,yzx,zxy,xyz,yzw → 1 repeat of 5.
        assert!((repetition_penalty("X y z x y z w") - 0.2).abs() < 1e-12);
        assert_eq!(repetition_penalty("hi !"), 0.0);
    }

    #[test]
    fn bad_declarations_and_nan_are_explained() {
        let w = |s: RewardSpec| RewardSet::new(&[s]).err().unwrap().to_string();
        assert!(w(RewardSpec::Format { pattern: "(".into(), weight: 1.0 }).contains("invalid regex"));
        assert!(w(RewardSpec::Length { min_chars: 9, max_chars: 3, weight: 1.0 }).contains("min_chars"));
        assert!(w(RewardSpec::ExactMatch { weight: f64::NAN }).contains("finite"));
        assert!(RewardSet::new(&[]).err().unwrap().to_string().contains("no rewards"));
        let e = check_finite("custom", f64::NAN, 3).unwrap_err().to_string();
        assert!(e.contains("custom") && e.contains("#3") && e.contains("finite"), "{e}");
    }
}
