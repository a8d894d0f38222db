//! `kind = "eval"`: score one or more models on held-out data and fixed prompts, producing an
//! `EvalReport` (`report.json`).
//!
//! Per model and per dataset (by format):
//! * `text`: perplexity over every token (BOS + text + EOS, as pretraining sees it);
//! * `prompt_answer`: exact-match accuracy of greedy answers (see [`crate::eval::answer`]) and the
//!   perplexity of the reference answers; records with `choices` are scored as multiple choice
//!   instead (schema in [`crate::eval`]);
//! * `prompt_answer` records with `tools` and `tool_call` (what `builtin:tool_use` writes): tool
//!   selection, argument validity and final-answer accuracy of a bounded call → run → answer loop
//!   ([`crate::eval::toolcall`]);
//! * chat formats (`sharegpt`, `openai`, `alpaca`): perplexity over assistant tokens, masked exactly
//!   as in SFT.
//!
//! Prompts are rendered per model: `prompt_style = "auto"` uses BOS + the raw question for models
//! produced by a `pretrain` stage (what the reference's `eval_llm.py` does for pretrain weights) and
//! the chat template with the generation prompt for everything else.

use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::artifact::{layout, Artifact, ArtifactKind};
use crate::data::spec::DataFormat;
use crate::data::tokenize::{ChatOptions, TextTokenizer};
use crate::data::{Example, Message, ResolvedDataset};
use crate::eval::score::ScoredSeq;
use crate::eval::toolcall::ToolTask;
use crate::eval::{DatasetReport, EvalReport, Evaluator, GenerationSample, McItem, ModelReport, PromptEncoder};
use crate::model::generate::GenerationConfig;
use crate::tools::ToolCall;
use anyhow::{anyhow, bail, Context};
use candle_core::Device;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How questions are turned into prompts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PromptStyle {
    /// `raw` for models from a `pretrain` stage, `chat` otherwise.
    #[default]
    Auto,
    /// The tokenizer's chat template with the generation prompt.
    Chat,
    /// BOS + the question as plain text.
    Raw,
}

/// Parameters of an `eval` stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EvalParams {
    /// Stages whose models are evaluated, e.g. `["base", "sft"]`.
    pub models: Vec<String>,
    /// Held-out datasets to score (see the stage docs for what each format measures).
    #[serde(default)]
    pub data: Vec<String>,
    /// Fixed prompts whose generations are kept in the report (for `mmrun diff`).
    #[serde(default)]
    pub prompts: Vec<String>,
    /// Decoding settings for exact match and the fixed prompts (greedy by default).
    #[serde(default)]
    pub generation: GenerationConfig,
    /// At most this many records per dataset (the first ones, in file order).
    #[serde(default = "default_max_samples")]
    pub max_samples: usize,
    /// `auto`, `chat` or `raw`.
    #[serde(default)]
    pub prompt_style: PromptStyle,
    /// Sequences per forward pass.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Longest scored sequence in tokens (longer ones keep their tail).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Graded exact-match samples (and tool-task traces) kept per dataset in the report.
    #[serde(default = "default_keep_samples")]
    pub keep_samples: usize,
    /// Generations per tool task: a model may call tools and see their results this many times
    /// minus one before its answer must stand.
    #[serde(default = "default_max_turns")]
    pub max_turns: usize,
    /// Compute precision of scoring and generation: `f32` (unset: f32 whatever the recipe's
    /// `precision`, so scores compare across runs and machines) or `bf16` (bf16 weights and KV
    /// cache, f32 accumulation: faster decoding; scores differ from f32's by bf16 rounding).
    #[serde(default)]
    pub precision: Option<EvalPrecision>,
}

/// The precision of an eval stage (explicit: `auto` would score differently per machine under
/// one key).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum EvalPrecision {
    /// f32 everywhere.
    F32,
    /// bf16 matmul operands and KV cache, f32 accumulation, softmax and logits.
    Bf16,
}

fn default_max_turns() -> usize {
    3
}

fn default_max_samples() -> usize {
    200
}
fn default_batch_size() -> usize {
    16
}
fn default_max_seq_len() -> usize {
    512
}
fn default_keep_samples() -> usize {
    5
}

impl StageParams for EvalParams {
    // Batching only changes how rows are grouped into forward passes, never their values.
    const COSMETIC: &'static [&'static str] = &["batch_size"];

    fn inputs(&self) -> Vec<InputRef> {
        let mut v: Vec<InputRef> = self
            .models
            .iter()
            .map(|m| InputRef::Stage {
                param: "models",
                stage: m.clone(),
                accepts: ArtifactKind::MODEL_INPUTS.to_vec(),
            })
            .collect();
        v.extend(self.data.iter().map(|d| InputRef::Dataset {
            param: "data",
            dataset: d.clone(),
            accepts: EVAL_FORMATS,
        }));
        v
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        crate::stages::training::non_empty("models", &self.models, "name at least one stage that produces a model")?;
        if self.prompts.is_empty() {
            // Fixed prompts alone are an evaluation too (their generations go in the report).
            crate::stages::training::non_empty(
                "data",
                &self.data,
                "name at least one dataset, or give fixed prompts = [\"…\"]",
            )?;
        }
        crate::stages::training::at_least("max_seq_len", self.max_seq_len, 2)?;
        crate::stages::training::at_least("max_turns", self.max_turns, 1)
    }
}

/// What eval scores: text and conversations (perplexity), prompt/answer sets (accuracy).
const EVAL_FORMATS: &[DataFormat] =
    &[DataFormat::Text, DataFormat::Sharegpt, DataFormat::Openai, DataFormat::Alpaca, DataFormat::PromptAnswer];

/// The `eval` stage kind.
pub struct EvalStage;

impl StageKind for EvalStage {
    const KIND: &'static str = "eval";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::EvalReport;
    const DOC: &'static str =
        "Evaluate models: perplexity, exact-match and multiple-choice accuracy, generations for fixed prompts";
    type Params = EvalParams;
}

impl Stage for EvalStage {
    fn run(&self, ctx: &mut StageContext<'_>, params: &EvalParams) -> anyhow::Result<StageOutcome> {
        if params.models.is_empty() {
            bail!("eval stage '{}': `models` is empty; name at least one stage that produces a model", ctx.name);
        }
        let device = crate::train::device::select(ctx.recipe.meta.device)?;
        let mut gen = params.generation.clone();
        if gen.seed == 0 {
            gen.seed = ctx.recipe.meta.seed;
        }
        // Datasets are read once and shared by every model.
        let mut sets = Vec::new();
        for name in &params.data {
            let ds = ctx.inputs.dataset(name)?;
            sets.push((name.clone(), load_eval_set(ds, params.max_samples, ctx)?));
        }
        let mut report = EvalReport::default();
        // Headlines come from the first dataset that has each metric (`Scores::or`); so do their words.
        for (name, set) in sets.iter().rev() {
            report.about.extend(set.measures(name).into_iter().map(|(k, v)| (k.to_string(), v)));
        }
        let mut metrics = serde_json::Map::new();
        for model_name in &params.models {
            if ctx.cancel.is_cancelled() {
                return Err(crate::cancel::Interrupted.into());
            }
            let art = ctx.inputs.model(model_name, ctx.name)?;
            let mr = eval_model(ctx, art, model_name, params, &gen, &sets, &device)
                .with_context(|| format!("eval stage '{}': evaluating model '{model_name}'", ctx.name))?;
            for (k, v) in mr.scores.named() {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    metrics.insert(format!("{model_name}.{k}"), serde_json::json!(v));
                }
            }
            report.models.insert(model_name.clone(), mr);
        }
        write_report(ctx.out_dir, &report, &params.models)?;
        Ok(StageOutcome { metrics })
    }
}

/// `report.json`: the typed report plus a flat `generations` list (`prompt`, `model`, `output`)
/// that `mmrun diff` shows side by side.
fn write_report(out_dir: &std::path::Path, report: &EvalReport, order: &[String]) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(report)?;
    let mut flat = vec![];
    for m in order {
        if let Some(mr) = report.models.get(m) {
            for g in &mr.generations {
                flat.push(serde_json::json!({"prompt": g.prompt, "model": m, "output": g.output}));
            }
        }
    }
    v["generations"] = serde_json::Value::Array(flat);
    let path = out_dir.join(layout::REPORT_JSON);
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}

/// What one dataset contributes to an evaluation.
enum EvalSet {
    /// Documents or conversations for perplexity.
    Scored(Vec<Example>),
    /// Question / reference pairs.
    PromptAnswer(Vec<(String, String)>),
    /// Multiple-choice items.
    MultipleChoice(Vec<McItem>),
    /// Tool tasks (`prompt_answer` records with `tools` and `tool_call`).
    ToolUse(Vec<ToolTask>),
}

fn load_eval_set(ds: &ResolvedDataset, max: usize, ctx: &StageContext<'_>) -> anyhow::Result<EvalSet> {
    if ds.spec.format == DataFormat::PromptAnswer {
        if let Some(tasks) = read_tool_tasks(ds, max)? {
            return Ok(EvalSet::ToolUse(tasks));
        }
        if let Some(items) = read_mc_items(ds, max)? {
            return Ok(EvalSet::MultipleChoice(items));
        }
    }
    let mut examples = crate::data::read_examples(ds, Some(ctx.run as _))
        .with_context(|| format!("reading dataset '{}' for evaluation", ds.name))?;
    examples.truncate(max);
    Ok(match ds.spec.format {
        DataFormat::Text | DataFormat::Sharegpt | DataFormat::Openai | DataFormat::Alpaca => EvalSet::Scored(examples),
        DataFormat::PromptAnswer => EvalSet::PromptAnswer(
            examples
                .into_iter()
                .filter_map(|e| match e {
                    Example::PromptAnswer { prompt, answer, .. } => Some((prompt, answer)),
                    _ => None,
                })
                .collect(),
        ),
        DataFormat::Dpo => bail!(
            "dataset '{}' has format dpo, which eval cannot score; use a text, chat or prompt_answer dataset",
            ds.name
        ),
    })
}

impl EvalSet {
    /// What each metric this set yields measures, in words (see `EvalReport::about`).
    fn measures(&self, ds: &str) -> Vec<(&'static str, String)> {
        match self {
            EvalSet::Scored(ex) if matches!(ex.first(), Some(Example::Text { .. })) => vec![(
                "perplexity",
                format!("per token of the '{ds}' texts (BOS + text + EOS, as pretraining sees them)"),
            )],
            EvalSet::Scored(_) => {
                vec![("perplexity", format!("per assistant token of the '{ds}' conversations (SFT's mask)"))]
            }
            EvalSet::PromptAnswer(_) => vec![
                (
                    "perplexity",
                    format!(
                        "per token of the '{ds}' reference answers after their questions: the reply and \
                         the end of the turn, as SFT trains them (raw-prompted base models: after the \
                         bare question)"
                    ),
                ),
                (
                    "exact_match",
                    format!(
                        "share of '{ds}' questions whose greedy answer has the reference's final value \
                         (`####`, <answer>, \"the answer is\", else the last number)"
                    ),
                ),
            ],
            EvalSet::MultipleChoice(_) => vec![(
                "mc_accuracy",
                format!("share of '{ds}' questions whose most likely option letter is the right one"),
            )],
            EvalSet::ToolUse(_) => vec![
                ("tool_selection", format!("share of '{ds}' tool tasks whose first call names the expected tool")),
                (
                    "tool_args_valid",
                    format!("share of '{ds}' tool tasks whose first call's arguments validate against the schema"),
                ),
                (
                    "tool_answer",
                    format!(
                        "share of '{ds}' tool tasks answered right after running the model's calls (bounded turns)"
                    ),
                ),
            ],
        }
    }
}

/// Multiple-choice items when the records of a `prompt_answer` dataset carry `choices` (checked on
/// the first record); `None` otherwise. Column renames (`columns = { question = "q" }`) apply.
fn read_mc_items(ds: &ResolvedDataset, max: usize) -> anyhow::Result<Option<Vec<McItem>>> {
    let col = |name: &str| ds.spec.columns.get(name).cloned().unwrap_or_else(|| name.to_string());
    let (qcol, ccol, acol) = (col("question"), col("choices"), col("answer"));
    let mut items = vec![];
    for file in &ds.files {
        let Some(records) = raw_records(file)? else {
            return if items.is_empty() { Ok(None) } else { Err(not_like_earlier_files(file, "multiple choice")) };
        };
        for (line, rec) in records {
            let Some(choices) = rec.get(&ccol) else {
                if items.is_empty() {
                    return Ok(None);
                }
                bail!("{}:{line}: record has no `{ccol}` but earlier records are multiple choice", file.display());
            };
            let choices: Vec<String> = choices
                .as_array()
                .ok_or_else(|| anyhow!("{}:{line}: `{ccol}` must be an array of strings", file.display()))?
                .iter()
                .map(|c| c.as_str().map(str::to_string).unwrap_or_else(|| c.to_string()))
                .collect();
            let question =
                rec.get(&qcol).or_else(|| rec.get("prompt")).and_then(|q| q.as_str()).ok_or_else(|| {
                    anyhow!("{}:{line}: multiple-choice record needs a string `{qcol}`", file.display())
                })?;
            let answer = rec.get(&acol).ok_or_else(|| anyhow!("{}:{line}: record has no `{acol}`", file.display()))?;
            items.push(
                McItem::new(question.to_string(), choices, answer)
                    .map_err(|e| anyhow!("{}:{line}: {e}", file.display()))?,
            );
            if items.len() >= max {
                return Ok(Some(items));
            }
        }
    }
    Ok(if items.is_empty() { None } else { Some(items) })
}

/// A later file of a dataset whose first files were read as `what`, but which holds no JSON records:
/// an error, because skipping it would leave its items out of the score without a word.
fn not_like_earlier_files(file: &std::path::Path, what: &str) -> anyhow::Error {
    anyhow!(
        "{}:1: not JSON records, but the earlier files of this dataset are {what}; give every file \
         the same kind of records, or split them into two datasets",
        file.display()
    )
}

/// The JSON records of a file with their line numbers (1-based; the index in a JSON array), or
/// `None` when its first line is not JSON (not ours to report: the regular reader does that).
fn raw_records(file: &std::path::Path) -> anyhow::Result<Option<Vec<(usize, serde_json::Value)>>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    if text.trim_start().starts_with('[') {
        let arr: Vec<serde_json::Value> =
            serde_json::from_str(&text).with_context(|| format!("{}: not a JSON array", file.display()))?;
        return Ok(Some(arr.into_iter().enumerate().map(|(i, v)| (i + 1, v)).collect()));
    }
    let mut v = vec![];
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str(line) {
            Ok(j) => v.push((i + 1, j)),
            Err(_) if v.is_empty() => return Ok(None),
            Err(e) => bail!("{}:{}: invalid JSON: {e}", file.display(), i + 1),
        }
    }
    Ok(Some(v))
}

/// Tool tasks when the records of a `prompt_answer` dataset carry `tool_call` (checked on the
/// first record); `None` otherwise. Every named tool must be a built-in one.
pub(super) fn read_tool_tasks(ds: &ResolvedDataset, max: usize) -> anyhow::Result<Option<Vec<ToolTask>>> {
    let col = |name: &str| ds.spec.columns.get(name).cloned().unwrap_or_else(|| name.to_string());
    let (qcol, acol) = (col("question"), col("answer"));
    let mut tasks = vec![];
    for file in &ds.files {
        let Some(records) = raw_records(file)? else {
            return if tasks.is_empty() { Ok(None) } else { Err(not_like_earlier_files(file, "tool tasks")) };
        };
        for (line, rec) in records {
            let at = || format!("{}:{line}", file.display());
            let Some(call) = rec.get("tool_call") else {
                if tasks.is_empty() {
                    return Ok(None);
                }
                bail!("{}: record has no `tool_call` but earlier records are tool tasks", at());
            };
            let expected = ToolCall::from_value(call).map_err(|e| anyhow!("{}: `tool_call`: {e}", at()))?;
            let tools = match rec.get("tools") {
                Some(t) => crate::data::builtin_tools::parse_tool_names(t).map_err(|e| anyhow!("{}: {e}", at()))?,
                None => vec![],
            };
            if !tools.contains(&expected.name.as_str()) {
                bail!("{}: the expected tool '{}' is not among the record's `tools`", at(), expected.name);
            }
            let question = rec.get(&qcol).and_then(|q| q.as_str());
            let question = question.ok_or_else(|| anyhow!("{}: tool task needs a string `{qcol}`", at()))?;
            let answer = match rec.get(&acol) {
                Some(serde_json::Value::String(s)) => s.clone(),
                Some(n @ serde_json::Value::Number(_)) => n.to_string(),
                _ => bail!("{}: tool task needs an `{acol}`", at()),
            };
            tasks.push(ToolTask { question: question.to_string(), answer, tools, expected });
            if tasks.len() >= max {
                return Ok(Some(tasks));
            }
        }
    }
    Ok(if tasks.is_empty() { None } else { Some(tasks) })
}

fn eval_model(
    ctx: &StageContext<'_>,
    art: &Artifact,
    name: &str,
    params: &EvalParams,
    gen: &GenerationConfig,
    sets: &[(String, EvalSet)],
    device: &Device,
) -> anyhow::Result<ModelReport> {
    let mut model = crate::model::weights::load_dir(&art.dir, device, false)
        .with_context(|| format!("loading model '{name}' from {}", art.dir.display()))?;
    if params.precision == Some(EvalPrecision::Bf16) {
        model.set_compute_dtype(candle_core::DType::BF16)?;
    }
    let style = match params.prompt_style {
        PromptStyle::Auto if art.manifest.stage_kind == "pretrain" => PromptStyle::Raw,
        PromptStyle::Auto => PromptStyle::Chat,
        s => s,
    };
    let enc = TokEncoder::load(art, style)?;
    let mut gen = gen.clone();
    if gen.stop_token_ids.is_empty() {
        gen.stop_token_ids = vec![enc.eos_id()];
    }
    let ev = Evaluator { model: &model, enc: &enc, batch_size: params.batch_size, max_len: params.max_seq_len };
    let mut mr = ModelReport {
        prompt_style: if style == PromptStyle::Raw { "raw" } else { "chat" }.to_string(),
        ..Default::default()
    };
    for (ds_name, set) in sets {
        if ctx.cancel.is_cancelled() {
            return Err(crate::cancel::Interrupted.into());
        }
        let mut dr = DatasetReport::default();
        match set {
            EvalSet::Scored(examples) => {
                dr.n = examples.len();
                let mut seqs = vec![];
                for ex in examples {
                    seqs.extend(enc.scored(ex, params.max_seq_len)?);
                }
                dr.scores.perplexity = Some(ev.perplexity(&seqs)?);
            }
            EvalSet::PromptAnswer(items) => {
                dr.n = items.len();
                let (acc, samples) = ev.exact_match(items, &gen, params.keep_samples)?;
                dr.scores.exact_match = Some(acc);
                dr.samples = samples;
                dr.scores.perplexity = Some(ev.answer_perplexity(items)?);
            }
            EvalSet::MultipleChoice(items) => {
                dr.n = items.len();
                dr.scores.mc_accuracy = Some(ev.multiple_choice(items)?);
            }
            EvalSet::ToolUse(tasks) => {
                dr.n = tasks.len();
                let (scores, mut traces) = ev.tool_use(tasks, &gen, params.max_turns)?;
                dr.scores.tool_selection = Some(scores.selection);
                dr.scores.tool_args_valid = Some(scores.args_valid);
                dr.scores.tool_answer = Some(scores.answer);
                traces.truncate(params.keep_samples);
                dr.tool_traces = traces;
            }
        }
        mr.scores = mr.scores.or(dr.scores);
        ctx.run_metric(name, ds_name, &dr);
        mr.datasets.insert(ds_name.clone(), dr);
    }
    if !params.prompts.is_empty() {
        let outputs = ev.generate_texts(&params.prompts, &gen)?;
        mr.generations = params
            .prompts
            .iter()
            .zip(outputs)
            .map(|(p, o)| GenerationSample { prompt: p.clone(), output: o })
            .collect();
    }
    Ok(mr)
}

/// Prompt encoding with the model's own tokenizer files (the data layer's tokenizer, so prompts
/// and masks are exactly what training produced).
pub(super) struct TokEncoder {
    tok: TextTokenizer,
    chat: bool,
}

impl TokEncoder {
    /// A chat model's encoder (RL stages that run the tool loop).
    pub(super) fn chat(tok: TextTokenizer) -> Self {
        Self { tok, chat: true }
    }

    fn load(art: &Artifact, style: PromptStyle) -> anyhow::Result<Self> {
        let tok = TextTokenizer::from_dir(&art.dir)
            .with_context(|| format!("loading the tokenizer of model artifact {}", art.dir.display()))?;
        Ok(Self { tok, chat: style == PromptStyle::Chat })
    }

    /// Sequences scored for perplexity: text as pretraining sees it (every token), conversations
    /// with the SFT assistant-only mask.
    fn scored(&self, ex: &Example, max_len: usize) -> anyhow::Result<Vec<ScoredSeq>> {
        let samples = self.tok.example(ex, max_len, &ChatOptions::default(), 0)?;
        Ok(samples
            .into_iter()
            .map(|s| ScoredSeq { targets: s.mask.iter().map(|&m| m == 1).collect(), ids: s.ids })
            .collect())
    }
}

impl PromptEncoder for TokEncoder {
    fn prompt_ids(&self, user_text: &str) -> anyhow::Result<Vec<u32>> {
        if self.chat {
            return Ok(self.tok.prompt(&[Message::new("user", user_text)], false)?);
        }
        let mut ids = vec![self.tok.bos];
        ids.extend(self.tok.encode(user_text)?);
        Ok(ids)
    }

    fn encode(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        Ok(self.tok.encode(text)?)
    }

    fn decode(&self, ids: &[u32]) -> String {
        self.tok.decode(ids).unwrap_or_default()
    }

    fn eos_id(&self) -> u32 {
        self.tok.eos
    }

    fn answer_seq(&self, question: &str, reference: &str) -> anyhow::Result<ScoredSeq> {
        if !self.chat {
            let mut cont = self.encode(reference)?;
            cont.push(self.eos_id());
            return Ok(ScoredSeq::continuation(&self.prompt_ids(question)?, &cont));
        }
        let ex = Example::Chat {
            messages: vec![Message::new("user", question), Message::new("assistant", reference)],
            tools: None,
        };
        // No length cap here: `Evaluator::max_len` keeps the tail of long sequences, as elsewhere.
        let mut seqs = self.scored(&ex, usize::MAX)?;
        anyhow::ensure!(seqs.len() == 1, "one exchange renders to one sequence");
        Ok(seqs.remove(0))
    }

    fn decode_with_specials(&self, ids: &[u32]) -> String {
        self.tok.decode_with_specials(ids).unwrap_or_default()
    }

    fn chat_ids(&self, messages: &[Message], tools: &[serde_json::Value]) -> anyhow::Result<Vec<u32>> {
        Ok(self.tok.tool_prompt(messages, tools)?)
    }

    fn tool_results_ids(&self, results: &[String]) -> anyhow::Result<Vec<u32>> {
        Ok(self.tok.tool_results(results)?)
    }
}

trait RunMetric {
    fn run_metric(&self, model: &str, dataset: &str, dr: &DatasetReport);
}

impl RunMetric for StageContext<'_> {
    /// One `metrics.jsonl` line per (model, dataset), so runs record eval numbers as they appear.
    fn run_metric(&self, model: &str, dataset: &str, dr: &DatasetReport) {
        let _ = self.run.metric(
            self.name,
            serde_json::json!({"model": model, "dataset": dataset, "n": dr.n, "perplexity": dr.scores.perplexity,
                "exact_match": dr.scores.exact_match, "mc_accuracy": dr.scores.mc_accuracy,
                "tool_selection": dr.scores.tool_selection, "tool_args_valid": dr.scores.tool_args_valid,
                "tool_answer": dr.scores.tool_answer}),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifact::Manifest;
    use crate::model::MiniMind;
    use crate::stages::Inputs;
    use std::path::Path;

    /// A model artifact directory: random tiny MiniMind + the reference tokenizer.
    fn model_artifact(dir: &Path, tok_dir: &Path, stage_kind: &str) -> Artifact {
        std::fs::create_dir_all(dir).unwrap();
        let mut cfg = crate::model::ModelConfig::dense(32, 1, 2, 1);
        cfg.max_position_embeddings = 512;
        let model = MiniMind::new(&cfg, 1, &Device::Cpu).unwrap();
        crate::model::weights::save(&model, &dir.join(layout::MODEL_WEIGHTS)).unwrap();
        std::fs::write(dir.join(layout::MODEL_CONFIG_JSON), cfg.to_hf_json().to_string()).unwrap();
        for f in [layout::TOKENIZER_JSON, layout::TOKENIZER_CONFIG_JSON] {
            std::fs::copy(tok_dir.join(f), dir.join(f)).unwrap();
        }
        let manifest = Manifest {
            kind: ArtifactKind::Model,
            stage_kind: stage_kind.into(),
            key: stage_kind.into(),
            mmrun_version: crate::VERSION.into(),
            created_unix: 0,
            files: vec![],
            metrics: Default::default(),
        };
        Artifact { dir: dir.to_path_buf(), manifest }
    }

    /// A dataset whose first file is multiple choice and whose second holds no JSON is refused,
    /// naming the second file, instead of being scored as if it had no items at all.
    #[test]
    fn a_later_file_unlike_the_first_is_an_error_not_a_silent_fallback() {
        let tmp = tempfile::tempdir().unwrap();
        let (mc, txt) = (tmp.path().join("a.jsonl"), tmp.path().join("b.txt"));
        std::fs::write(&mc, "{\"question\":\"Sky?\",\"choices\":[\"blue\",\"red\"],\"answer\":\"A\"}\n").unwrap();
        std::fs::write(&txt, "plain words, no JSON\n").unwrap();
        let ds = |files: Vec<std::path::PathBuf>| ResolvedDataset {
            name: "mc".into(),
            spec: crate::data::spec::DatasetSpec {
                source: "x".into(),
                format: DataFormat::PromptAnswer,
                columns: Default::default(),
                on_bad_record: Default::default(),
                builtin: Default::default(),
            },
            files,
            content_hash: "h".into(),
        };
        assert_eq!(read_mc_items(&ds(vec![mc.clone()]), 10).unwrap().unwrap().len(), 1);
        assert!(read_mc_items(&ds(vec![txt.clone()]), 10).unwrap().is_none(), "a dataset of text is simply not MC");
        let e = read_mc_items(&ds(vec![mc, txt.clone()]), 10).unwrap_err().to_string();
        assert!(e.starts_with(&format!("{}:1: not JSON records", txt.display())), "{e}");
        assert!(e.contains("are multiple choice"), "{e}");
    }

    #[test]
    fn eval_stage_writes_a_report_for_every_model_and_metric() {
        let Some(shared) = crate::testutil::shared_data() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let t = tmp.path();
        let tok_dir = shared.join("minimind_tokenizer");
        std::fs::write(
            t.join("qa.jsonl"),
            "{\"question\":\"1+1?\",\"answer\":\"2\"}\n{\"question\":\"2+3?\",\"answer\":\"#### 5\"}\n",
        )
        .unwrap();
        std::fs::write(
            t.join("mc.jsonl"),
            "{\"question\":\"Sky?\",\"choices\":[\"blue\",\"red\"],\"answer\":\"A\"}\n{\"question\":\"2+2?\",\"choices\":[\"3\",\"4\",\"5\"],\"answer\":1}\n",
        )
        .unwrap();
        std::fs::write(t.join("text.jsonl"), "{\"text\":\"hello world\"}\n").unwrap();
        std::fs::write(
            t.join("chat.jsonl"),
            "{\"conversations\":[{\"from\":\"human\",\"value\":\"hi\"},{\"from\":\"gpt\",\"value\":\"hello\"}]}\n",
        )
        .unwrap();
        let ds = |file: &str, format: DataFormat| crate::data::spec::DatasetSpec {
            source: file.into(),
            format,
            columns: Default::default(),
            on_bad_record: Default::default(),
            builtin: Default::default(),
        };
        let recipe = crate::recipe::Recipe {
            path: t.join("r.toml"),
            source_text: String::new(),
            overrides: vec![],
            meta: crate::recipe::RecipeMeta {
                name: "t".into(),
                description: None,
                seed: 1,
                device: crate::recipe::DeviceSpec::Cpu,
                precision: Default::default(),
                executor: Default::default(),
                resources: Default::default(),
            },
            model: Default::default(),
            datasets: [
                ("qa", ds("qa.jsonl", DataFormat::PromptAnswer)),
                ("mc", ds("mc.jsonl", DataFormat::PromptAnswer)),
                ("text", ds("text.jsonl", DataFormat::Text)),
                ("chat", ds("chat.jsonl", DataFormat::Sharegpt)),
            ]
            .into_iter()
            .map(|(n, d)| (n.to_string(), d))
            .collect(),
            stages: vec![],
            cache: Default::default(),
        };
        let mut inputs = Inputs::default();
        inputs.artifacts.insert("base".into(), model_artifact(&t.join("base"), &tok_dir, "pretrain"));
        inputs.artifacts.insert("sft".into(), model_artifact(&t.join("sft"), &tok_dir, "sft"));
        for (name, file, format) in [
            ("qa", "qa.jsonl", DataFormat::PromptAnswer),
            ("mc", "mc.jsonl", DataFormat::PromptAnswer),
            ("text", "text.jsonl", DataFormat::Text),
            ("chat", "chat.jsonl", DataFormat::Sharegpt),
        ] {
            let spec = recipe.datasets[name].clone();
            assert_eq!(spec.format, format);
            inputs.datasets.insert(
                name.into(),
                ResolvedDataset { name: name.into(), spec, files: vec![t.join(file)], content_hash: name.into() },
            );
        }
        let cache = crate::cache::Cache::open(t.join("cache")).unwrap();
        let run = crate::runs::RunSink::create(t.join("run")).unwrap();
        let cancel = crate::cancel::CancelToken::new();
        let out = t.join("out");
        std::fs::create_dir_all(&out).unwrap();
        let work = t.join("work");
        let mut ctx = StageContext {
            name: "report",
            key: "k",
            recipe: &recipe,
            inputs: &inputs,
            out_dir: &out,
            work_dir: &work,
            cache: &cache,
            run: &run,
            cancel: &cancel,
            rank: None,
        };
        let params = EvalParams {
            models: vec!["base".into(), "sft".into()],
            data: vec!["qa".into(), "mc".into(), "text".into(), "chat".into()],
            prompts: vec!["Hello".into()],
            generation: GenerationConfig { max_new_tokens: 4, ..Default::default() },
            max_samples: 10,
            prompt_style: PromptStyle::Auto,
            batch_size: 2,
            max_seq_len: 128,
            keep_samples: 1,
            max_turns: 3,
            precision: None,
        };
        let outcome = EvalStage.run(&mut ctx, &params).unwrap();
        let report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join(layout::REPORT_JSON)).unwrap()).unwrap();
        for (m, style) in [("base", "raw"), ("sft", "chat")] {
            let r = &report["models"][m];
            assert_eq!(r["prompt_style"], style);
            let em = r["exact_match"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&em));
            let mc = r["mc_accuracy"].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&mc));
            assert_eq!(r["datasets"]["mc"]["n"], 2);
            assert_eq!(r["datasets"]["qa"]["samples"].as_array().unwrap().len(), 1);
            for ds in ["qa", "text", "chat"] {
                let ppl = r["datasets"][ds]["perplexity"].as_f64().unwrap();
                // A random model is near-uniform over 6400 tokens.
                assert!(ppl > 1000.0 && ppl < 20000.0, "{m}/{ds}: perplexity {ppl}");
            }
            assert_eq!(r["generations"][0]["prompt"], "Hello");
            assert!(outcome.metrics.contains_key(&format!("{m}.exact_match")));
            assert!(outcome.metrics.contains_key(&format!("{m}.perplexity")));
        }
        // The headline perplexity comes from 'qa', the first dataset with one, and says so.
        let about = &report["about"];
        assert!(about["perplexity"].as_str().unwrap().contains("'qa' reference answers"), "{about}");
        assert!(about["exact_match"].as_str().unwrap().contains("'qa'"), "{about}");
        assert!(about["mc_accuracy"].as_str().unwrap().contains("'mc'"), "{about}");
        let flat = report["generations"].as_array().unwrap();
        assert_eq!(flat.len(), 2);
        assert_eq!(flat[1]["model"], "sft");
        // Every (model, dataset) pair was logged to the run's metrics.
        let lines = std::fs::read_to_string(run.dir().join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 8);

        // `precision = "bf16"` scores in bf16: within bf16 rounding of f32's perplexity, not equal.
        let bf16 = EvalParams { precision: Some(EvalPrecision::Bf16), ..params };
        let bf = EvalStage.run(&mut ctx, &bf16).unwrap();
        for m in ["base", "sft"] {
            let key = format!("{m}.perplexity");
            let (a, b) = (outcome.metrics[&key].as_f64().unwrap(), bf.metrics[&key].as_f64().unwrap());
            assert!(a != b && (b / a - 1.0).abs() < 0.02, "{m}: bf16 perplexity {b} vs f32 {a}");
        }
    }
}
