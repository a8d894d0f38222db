//! Evaluation: perplexity, exact-match and multiple-choice accuracy, generations for reports.
//!
//! Everything here runs against [`crate::model::generate::CausalLm`] and plain token ids, so it is
//! tested on toy models; `stages::eval` wires it to artifacts, datasets and the report file.
//!
//! ## Multiple-choice records
//! A `prompt_answer` dataset whose records carry `choices` is scored as multiple choice
//! (C-Eval / MMLU style):
//! ```json
//! {"question": "2 + 2 = ?", "choices": ["3", "4", "5", "6"], "answer": "B"}
//! ```
//! `answer` is the letter (`"B"`), the 0-based index (`1`) or the text of the right choice (`"4"`).
//! The prompt lists the options as `A. 3\nB. 4\n…` followed by `Answer:`; each letter is scored by
//! its log-likelihood as the continuation and the most likely letter is the prediction.

pub mod answer;
pub mod score;
pub mod toolcall;

use crate::model::generate::{generate, CausalLm, GenerationConfig};
use score::{loglik, perplexity, ScoredSeq};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::ops::ControlFlow;

/// `report.json` of an eval stage.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    /// Per evaluated model (by stage name), in the order given.
    pub models: BTreeMap<String, ModelReport>,
    /// What each headline metric measures, in words, for the dataset it comes from
    /// (`"perplexity" → "per token of the 'test' reference answers …"`), so a report says which
    /// tokens a perplexity is over rather than leaving readers to guess.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub about: BTreeMap<String, String>,
}

/// The scores of a model on a dataset, or its headline scores (each from the first dataset that
/// has it). Flattened into the reports, so `report.json` reads `{"perplexity": …, "n": …}`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Scores {
    /// Perplexity over the scored tokens (all tokens for text, answers / assistant turns otherwise).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<f64>,
    /// Exact-match accuracy (0..1) on a `prompt_answer` dataset without choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exact_match: Option<f64>,
    /// Multiple-choice accuracy (0..1) on a dataset with choices.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mc_accuracy: Option<f64>,
    /// Tool tasks whose first call names the expected tool (0..1; [`toolcall`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_selection: Option<f64>,
    /// Tool tasks whose first call's arguments validate against the tool's schema (0..1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_args_valid: Option<f64>,
    /// Tool tasks answered right after running the model's calls (0..1).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_answer: Option<f64>,
}

impl Scores {
    /// Each score by its report name, in report order.
    pub fn named(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("perplexity", self.perplexity),
            ("exact_match", self.exact_match),
            ("mc_accuracy", self.mc_accuracy),
            ("tool_selection", self.tool_selection),
            ("tool_args_valid", self.tool_args_valid),
            ("tool_answer", self.tool_answer),
        ]
    }

    /// Fill the scores this lacks from `other` (headlines come from the first dataset that has one).
    pub fn or(self, other: Scores) -> Scores {
        Scores {
            perplexity: self.perplexity.or(other.perplexity),
            exact_match: self.exact_match.or(other.exact_match),
            mc_accuracy: self.mc_accuracy.or(other.mc_accuracy),
            tool_selection: self.tool_selection.or(other.tool_selection),
            tool_args_valid: self.tool_args_valid.or(other.tool_args_valid),
            tool_answer: self.tool_answer.or(other.tool_answer),
        }
    }
}

/// Metrics of one model.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// How prompts were rendered (`chat` or `raw`).
    pub prompt_style: String,
    /// The headline scores: each from the first dataset that has it; per-dataset values below.
    #[serde(flatten)]
    pub scores: Scores,
    /// Per-dataset metrics.
    pub datasets: BTreeMap<String, DatasetReport>,
    /// Outputs for the fixed prompts.
    pub generations: Vec<GenerationSample>,
}

/// Metrics of one model on one dataset.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DatasetReport {
    /// Records evaluated.
    pub n: usize,
    /// The scores on this dataset.
    #[serde(flatten)]
    pub scores: Scores,
    /// A few graded exact-match samples, so reports can be compared by eye.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<GradedSample>,
    /// A few tool-task traces (every generated turn), on a tool dataset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_traces: Vec<toolcall::ToolTrace>,
}

/// A fixed prompt and what the model answered.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationSample {
    /// The prompt as written in the recipe.
    pub prompt: String,
    /// The generated text (stop token excluded).
    pub output: String,
}

/// An exact-match item and its grade.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GradedSample {
    /// The question.
    pub prompt: String,
    /// The model's output.
    pub output: String,
    /// The reference answer.
    pub reference: String,
    /// Whether the extracted answers matched.
    pub correct: bool,
}

/// A multiple-choice item (see the module docs for the record schema).
#[derive(Clone, Debug, PartialEq)]
pub struct McItem {
    /// The question.
    pub question: String,
    /// The options, in letter order.
    pub choices: Vec<String>,
    /// Index of the right option.
    pub answer: usize,
}

impl McItem {
    /// Build from a record's fields; `answer` may be a letter, an index or the choice text.
    pub fn new(question: String, choices: Vec<String>, answer: &serde_json::Value) -> Result<Self, String> {
        if choices.len() < 2 || choices.len() > 26 {
            return Err(format!("`choices` must hold 2 to 26 options, found {}", choices.len()));
        }
        let idx = match answer {
            serde_json::Value::Number(n) => n.as_u64().map(|i| i as usize),
            serde_json::Value::String(s) => {
                let t = s.trim();
                let letter = t.chars().next().filter(|_| t.chars().count() == 1).map(|c| c.to_ascii_uppercase());
                match letter {
                    Some(c @ 'A'..='Z') if ((c as u8 - b'A') as usize) < choices.len() => {
                        Some((c as u8 - b'A') as usize)
                    }
                    _ => choices.iter().position(|c| c.trim() == t),
                }
            }
            _ => None,
        };
        match idx {
            Some(i) if i < choices.len() => Ok(Self { question, choices, answer: i }),
            _ => Err(format!(
                "`answer` {answer} is neither a letter A..{}, an index below {} nor one of the choices",
                letter(choices.len() - 1),
                choices.len()
            )),
        }
    }

    /// The question with lettered options, ending in `Answer:`.
    pub fn prompt_text(&self) -> String {
        let mut s = self.question.trim_end().to_string();
        for (i, c) in self.choices.iter().enumerate() {
            s.push_str(&format!("\n{}. {}", letter(i), c.trim()));
        }
        s.push_str("\nAnswer:");
        s
    }
}

/// `A`, `B`, … for option `i`.
pub fn letter(i: usize) -> char {
    (b'A' + i as u8) as char
}

/// How questions become token ids for one model.
pub trait PromptEncoder {
    /// Ids of the prompt for `user_text`, ready for the model to continue (chat template with the
    /// generation prompt, or BOS + text for raw base models).
    fn prompt_ids(&self, user_text: &str) -> anyhow::Result<Vec<u32>>;
    /// Ids of a continuation text (no special tokens added).
    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>>;
    /// Text of generated ids (special tokens skipped).
    fn decode(&self, ids: &[u32]) -> String;
    /// The id that ends an answer (`<|im_end|>`).
    fn eos_id(&self) -> u32;
    /// `reference` as the answer to `question`, scored on the answer's tokens. This default
    /// appends the answer's ids and the eos to the prompt; encoders for chat models override it
    /// to render the exchange through the chat template with SFT's assistant mask, so the score is
    /// of exactly the tokens SFT trained on.
    fn answer_seq(&self, question: &str, reference: &str) -> anyhow::Result<ScoredSeq> {
        let mut cont = self.encode(reference)?;
        cont.push(self.eos_id());
        Ok(ScoredSeq::continuation(&self.prompt_ids(question)?, &cont))
    }

    /// Text of generated ids with special tokens kept (tool-call markers); `decode` by default.
    fn decode_with_specials(&self, ids: &[u32]) -> String {
        self.decode(ids)
    }
    /// Ids of a conversation offered `tools` (OpenAI declarations), ready for the next assistant
    /// turn (tool evaluation).
    fn chat_ids(&self, _messages: &[crate::data::Message], _tools: &[serde_json::Value]) -> anyhow::Result<Vec<u32>> {
        anyhow::bail!("this prompt encoder cannot render tool conversations")
    }
    /// Ids that follow a generated assistant turn (after its eos) when tool `results` come back:
    /// the `tool` turns and the next generation prompt (see
    /// [`crate::data::tokenize::TextTokenizer::tool_results`]).
    fn tool_results_ids(&self, _results: &[String]) -> anyhow::Result<Vec<u32>> {
        anyhow::bail!("this prompt encoder cannot render tool results")
    }
}

/// Runs the metrics of one model.
pub struct Evaluator<'a, M: CausalLm, E: PromptEncoder> {
    /// The model.
    pub model: &'a M,
    /// Its prompt encoding.
    pub enc: &'a E,
    /// Sequences per forward pass when scoring / generating.
    pub batch_size: usize,
    /// Longest scored sequence (longer ones keep their tail).
    pub max_len: usize,
}

impl<M: CausalLm, E: PromptEncoder> Evaluator<'_, M, E> {
    /// Generate for each user prompt; returns the decoded outputs.
    pub fn generate_texts(&self, prompts: &[String], cfg: &GenerationConfig) -> anyhow::Result<Vec<String>> {
        let ids = prompts.iter().map(|p| self.enc.prompt_ids(p)).collect::<anyhow::Result<Vec<_>>>()?;
        let mut outputs = Vec::with_capacity(prompts.len());
        for chunk in ids.chunks(self.batch_size.max(1)) {
            let gens = generate(self.model, chunk, cfg, None, |_, _, _| ControlFlow::Continue(()))?;
            outputs.extend(gens.iter().map(|g| self.enc.decode(&g.tokens)));
        }
        Ok(outputs)
    }

    /// Exact-match accuracy of greedy answers on `(question, reference)` pairs; keeps the first
    /// `keep_samples` graded samples.
    pub fn exact_match(
        &self,
        items: &[(String, String)],
        cfg: &GenerationConfig,
        keep_samples: usize,
    ) -> anyhow::Result<(f64, Vec<GradedSample>)> {
        let prompts: Vec<String> = items.iter().map(|(q, _)| q.clone()).collect();
        let outputs = self.generate_texts(&prompts, cfg)?;
        let mut correct = 0usize;
        let mut samples = vec![];
        for ((q, reference), output) in items.iter().zip(outputs) {
            let ok = answer::is_correct(&output, reference);
            correct += ok as usize;
            if samples.len() < keep_samples {
                samples.push(GradedSample { prompt: q.clone(), output, reference: reference.clone(), correct: ok });
            }
        }
        Ok((correct as f64 / items.len().max(1) as f64, samples))
    }

    /// Per-token perplexity of the reference answers given their questions
    /// ([`PromptEncoder::answer_seq`]: the answer's tokens and the end of the turn are scored).
    pub fn answer_perplexity(&self, items: &[(String, String)]) -> anyhow::Result<f64> {
        let seqs = items.iter().map(|(q, a)| self.enc.answer_seq(q, a)).collect::<anyhow::Result<Vec<_>>>()?;
        self.perplexity(&seqs)
    }

    /// Perplexity over the scored tokens of pre-tokenised sequences.
    pub fn perplexity(&self, seqs: &[ScoredSeq]) -> anyhow::Result<f64> {
        Ok(perplexity(&loglik(self.model, seqs, self.batch_size, self.max_len)?))
    }

    /// Ids of option letter `i` as an answer: `" A"` when that is one token (what follows
    /// `Answer:` in text), else `"A"`.
    pub fn letter_ids(&self, i: usize) -> anyhow::Result<Vec<u32>> {
        let spaced = self.enc.encode(&format!(" {}", letter(i)))?;
        if spaced.len() == 1 {
            return Ok(spaced);
        }
        self.enc.encode(&letter(i).to_string())
    }

    /// Multiple-choice accuracy: the letter with the highest log-likelihood after the prompt.
    pub fn multiple_choice(&self, items: &[McItem]) -> anyhow::Result<f64> {
        let mut seqs = vec![];
        let mut spans = vec![];
        for item in items {
            let prompt = self.enc.prompt_ids(&item.prompt_text())?;
            spans.push((seqs.len(), item.choices.len()));
            for i in 0..item.choices.len() {
                seqs.push(ScoredSeq::continuation(&prompt, &self.letter_ids(i)?));
            }
        }
        let scores = loglik(self.model, &seqs, self.batch_size, self.max_len)?;
        let mut correct = 0usize;
        for (item, (start, n)) in items.iter().zip(spans) {
            let best = (0..n)
                .max_by(|&a, &b| {
                    scores[start + a].sum.partial_cmp(&scores[start + b].sum).unwrap_or(std::cmp::Ordering::Equal)
                })
                .unwrap_or(0);
            correct += (best == item.answer) as usize;
        }
        Ok(correct as f64 / items.len().max(1) as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generate::tests::ToyLm;
    use candle_core::Device;

    /// One char = one token (byte value), BOS = 1, eos = 2.
    struct ByteEnc;
    impl PromptEncoder for ByteEnc {
        fn prompt_ids(&self, user_text: &str) -> anyhow::Result<Vec<u32>> {
            let mut v = vec![1];
            v.extend(user_text.bytes().map(|b| b as u32 % 11));
            Ok(v)
        }
        fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
            Ok(text.bytes().map(|b| b as u32 % 11).collect())
        }
        fn decode(&self, ids: &[u32]) -> String {
            ids.iter().map(|i| char::from(b'0' + (*i % 10) as u8)).collect()
        }
        fn eos_id(&self) -> u32 {
            2
        }
    }

    #[test]
    fn mc_item_answers_by_letter_index_or_text() {
        let ch = || vec!["3".to_string(), "4".to_string(), "5".to_string()];
        assert_eq!(McItem::new("q".into(), ch(), &serde_json::json!("B")).unwrap().answer, 1);
        assert_eq!(McItem::new("q".into(), ch(), &serde_json::json!("c")).unwrap().answer, 2);
        assert_eq!(McItem::new("q".into(), ch(), &serde_json::json!(0)).unwrap().answer, 0);
        assert_eq!(McItem::new("q".into(), ch(), &serde_json::json!("4")).unwrap().answer, 1);
        assert!(McItem::new("q".into(), ch(), &serde_json::json!("D")).is_err());
        assert!(McItem::new("q".into(), vec!["x".into()], &serde_json::json!(0)).is_err());
        let item = McItem::new("2+2?".into(), ch(), &serde_json::json!("B")).unwrap();
        assert_eq!(item.prompt_text(), "2+2?\nA. 3\nB. 4\nC. 5\nAnswer:");
    }

    #[test]
    fn evaluator_metrics_are_consistent_with_the_model() {
        let m = ToyLm { vocab: 11, device: Device::Cpu };
        let ev = Evaluator { model: &m, enc: &ByteEnc, batch_size: 3, max_len: 256 };
        let cfg = GenerationConfig { max_new_tokens: 4, stop_token_ids: vec![99], ..Default::default() };
        let qs: Vec<String> = (0..5).map(|i| format!("q{i}")).collect();
        let outs = ev.generate_texts(&qs, &cfg).unwrap();
        // References equal to the model's own (greedy) outputs → accuracy 1; shifted ones → 0.
        let right: Vec<(String, String)> = qs.iter().cloned().zip(outs.iter().cloned()).collect();
        let (acc, samples) = ev.exact_match(&right, &cfg, 2).unwrap();
        assert!(outs.iter().all(|o| !o.is_empty()));
        assert_eq!(acc, 1.0);
        assert_eq!(samples.len(), 2);
        let wrong: Vec<(String, String)> = qs.iter().cloned().map(|q| (q, "this is not it".to_string())).collect();
        assert_eq!(ev.exact_match(&wrong, &cfg, 0).unwrap().0, 0.0);
        let ppl = ev.answer_perplexity(&right).unwrap();
        assert!(ppl.is_finite() && ppl >= 1.0);
        // MC: the model's most likely letter is "right" by construction → accuracy 1.
        let base = McItem::new("q".into(), vec!["a".into(), "b".into(), "c".into()], &serde_json::json!(0)).unwrap();
        let prompt = ByteEnc.prompt_ids(&base.prompt_text()).unwrap();
        let seqs: Vec<ScoredSeq> =
            (0..3).map(|i| ScoredSeq::continuation(&prompt, &ev.letter_ids(i).unwrap())).collect();
        let ll = loglik(&m, &seqs, 8, 256).unwrap();
        let best = (0..3).max_by(|&a, &b| ll[a].sum.partial_cmp(&ll[b].sum).unwrap()).unwrap();
        let item = McItem { answer: best, ..base.clone() };
        assert_eq!(ev.multiple_choice(std::slice::from_ref(&item)).unwrap(), 1.0);
        let wrong_item = McItem { answer: (best + 1) % 3, ..base };
        assert_eq!(ev.multiple_choice(&[item, wrong_item]).unwrap(), 0.5);
    }
}
