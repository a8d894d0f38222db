//! `kind = "grpo"`: Group Relative Policy Optimisation (spec §13) with verifiable rewards.
//!
//! For each prompt the policy samples `num_generations` completions, the recipe's `rewards` score
//! them, advantages are normalised within each prompt's group, and the clipped-ratio objective
//! with a per-token k3 KL to the frozen reference is optimised (or CISPO with
//! `loss_type = "cispo"`, the reference's default). Prompts come from a `prompt_answer` dataset
//! (question + answer: exact-match rewards compare against its final answer) or from a chat
//! dataset, whose last assistant turn is dropped (no answer: only answer-free rewards apply).
//!
//! Prompts longer than `max_prompt_len` are skipped and counted (a truncated question may no
//! longer determine its answer; the reference keeps the tail instead). With `lora = { … }` only
//! adapters train and are merged into the output model. Per micro-batch the run's `metrics.jsonl`
//! gets reward mean/std, the mean group std, zero-std groups, each reward term, KL, clip fraction,
//! completion length and the truncated fraction; the loop's own line adds loss, lr and grad norm.
//! With `reward_eval_prompts = N` the stage also measures the mean reward on the first N prompts
//! before and after training with identical sampling seeds (`reward_before` / `reward_after`).

use super::training::{training_params, LoraParams, Policy};
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::align::grpo::{Grpo, Prompt, PromptSet, RolloutConfig};
use crate::align::losses::{GrpoLossConfig, PolicyLossKind};
use crate::align::rewards::{RewardSet, RewardSpec};
use crate::artifact::ArtifactKind;
use crate::data::spec::DataFormat;
use crate::data::tokenize::TextTokenizer;
use crate::data::{Example, Message};
use crate::model::generate::GenerationConfig;
use crate::model::weights;
use crate::train::BatchSource;
use anyhow::{bail, Context};

training_params! {
    /// Parameters of a `grpo` stage.
    pub struct GrpoParams {
        /// Stage whose model is the starting policy (and, by default, the frozen reference).
        pub from: String,
        /// Stage whose model is the frozen KL reference (default: the starting policy's weights).
        #[serde(default)]
        pub reference: Option<String>,
        /// Prompts: a `prompt_answer` dataset, or a chat dataset (its last assistant turn is dropped).
        pub data: String,
        /// Reward terms, summed: `[{ kind = "exact_match", weight = 1.0 }, { kind = "format", pattern = "…" }]`.
        pub rewards: Vec<RewardSpec>,
        /// Completions sampled per prompt (the group; reference 6).
        #[serde(default = "default_generations")]
        pub num_generations: usize,
        /// Sampling temperature of the rollouts (reference 0.8); must be positive.
        #[serde(default = "default_temperature")]
        pub temperature: f32,
        /// Top-k filter of the rollouts (reference 50; 0 = off).
        #[serde(default = "default_top_k")]
        pub top_k: usize,
        /// Nucleus filter of the rollouts (reference 0.85; 1 = off).
        #[serde(default = "default_top_p")]
        pub top_p: f32,
        /// Most tokens per completion (reference 1024).
        #[serde(default = "default_max_new_tokens")]
        pub max_new_tokens: usize,
        /// Longest prompt in tokens (reference 768); longer prompts are skipped and counted.
        #[serde(default = "default_max_prompt_len")]
        pub max_prompt_len: usize,
        /// `"grpo"` (clipped ratio, the default) or `"cispo"` (the reference's default).
        #[serde(default = "default_loss_type")]
        pub loss_type: PolicyLossKind,
        /// KL coefficient to the reference (reference 0.1).
        #[serde(default = "default_beta")]
        pub beta: f64,
        /// Lower clip range of the ratio (`grpo`).
        #[serde(default = "default_clip")]
        pub clip_low: f64,
        /// Upper clip range (`grpo`: ratio clipped at 1 + clip_high, default 0.2; `cispo`: weight
        /// truncated at clip_high, default 5.0).
        #[serde(default)]
        pub clip_high: Option<f64>,
        /// Train LoRA adapters instead of all weights (merged into the output model).
        #[serde(default)]
        pub lora: Option<LoraParams>,
        /// Measure the mean reward on the first N prompts before and after training (0 = off).
        #[serde(default)]
        pub reward_eval_prompts: usize,
    }
    defaults { lr: 3e-7, batch_size: 2, epochs: 1, save_every: 0, log_every: 1 }
}

fn default_generations() -> usize {
    6
}
pub(super) fn default_temperature() -> f32 {
    0.8
}
pub(super) fn default_top_k() -> usize {
    50
}
pub(super) fn default_top_p() -> f32 {
    0.85
}
pub(super) fn default_max_new_tokens() -> usize {
    1024
}
pub(super) fn default_max_prompt_len() -> usize {
    768
}
fn default_loss_type() -> PolicyLossKind {
    PolicyLossKind::Grpo
}
fn default_beta() -> f64 {
    0.1
}
fn default_clip() -> f64 {
    0.2
}

impl StageParams for GrpoParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

    fn inputs(&self) -> Vec<InputRef> {
        super::training::policy_inputs(&self.from, self.reference.as_deref(), &self.data, GRPO_FORMATS)
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        self.validate_training()?;
        if let Err(e) = RewardSet::new(&self.rewards) {
            let hint = "e.g. rewards = [{ kind = \"exact_match\" }]".into();
            return Err(InvalidParam { key: "rewards", message: e.to_string(), hint });
        }
        validate_sampling(self.num_generations, self.temperature, self.top_p, self.max_new_tokens, self.beta)
    }
}

/// The checks every sampled-group RL stage (grpo, agent) makes of its group and sampling params.
pub(super) fn validate_sampling(
    num_generations: usize,
    temperature: f32,
    top_p: f32,
    max_new_tokens: usize,
    beta: f64,
) -> Result<(), InvalidParam> {
    super::training::in_range("top_p", top_p as f64, |p| p > 0.0 && p <= 1.0, "use a top_p in (0, 1]")?;
    super::training::in_range("beta", beta, |b| b >= 0.0, "use beta >= 0 (0 turns the KL term off)")?;
    let bad = |key, message: String, hint: &str| Err(InvalidParam { key, message, hint: hint.into() });
    if num_generations < 2 {
        let m = format!("num_generations = {num_generations} leaves one sample per group, so every advantage is 0");
        return bad("num_generations", m, "use 2 or more (the reference samples 4 to 6)");
    }
    if !(temperature > 0.0 && temperature.is_finite()) {
        let m = format!("temperature = {temperature} makes every sample of a group identical (no signal)");
        return bad("temperature", m, "sample with a positive temperature, e.g. 0.8");
    }
    if max_new_tokens == 0 {
        return bad("max_new_tokens", "max_new_tokens = 0 generates nothing".into(), "use at least 1");
    }
    if !(beta >= 0.0 && beta.is_finite()) {
        return bad("beta", format!("beta = {beta} is not a KL coefficient"), "use a number >= 0, e.g. 0.1");
    }
    Ok(())
}

/// The objective's settings; `clip_high` defaults by surrogate (GRPO 0.2, CISPO 5.0).
pub(super) fn loss_config(kind: PolicyLossKind, clip_low: f64, clip_high: Option<f64>, beta: f64) -> GrpoLossConfig {
    let clip_high = clip_high.unwrap_or(match kind {
        PolicyLossKind::Grpo => 0.2,
        PolicyLossKind::Cispo => 5.0,
    });
    GrpoLossConfig { kind, clip_low, clip_high, beta }
}

/// One `metrics.jsonl` point of an RL micro-step: the step's metrics with `micro_step` and each
/// reward term flattened to `reward/<name>`.
pub(super) fn metric_point(i: usize, m: &impl serde::Serialize) -> serde_json::Value {
    let mut point = serde_json::to_value(m).expect("metrics serialise");
    if let Some(o) = point.as_object_mut() {
        o.insert("micro_step".into(), (i + 1).into());
        if let Some(serde_json::Value::Object(parts)) = o.remove("rewards") {
            for (k, v) in parts {
                o.insert(format!("reward/{k}"), v);
            }
        }
    }
    point
}

impl GrpoParams {
    fn loss_config(&self) -> GrpoLossConfig {
        loss_config(self.loss_type, self.clip_low, self.clip_high, self.beta)
    }
}

/// What GRPO reads: prompts with verifiable answers, or conversations (their user turns).
pub(super) const GRPO_FORMATS: &[DataFormat] =
    &[DataFormat::PromptAnswer, DataFormat::Sharegpt, DataFormat::Openai, DataFormat::Alpaca];

/// The `grpo` stage kind.
pub struct GrpoStage;

impl StageKind for GrpoStage {
    const KIND: &'static str = "grpo";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str =
        "GRPO: sampled groups per prompt, verifiable rewards, clipped objective with a KL to a frozen reference";
    type Params = GrpoParams;
}

impl Stage for GrpoStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &GrpoParams) -> anyhow::Result<StageOutcome> {
        let stage = ctx.name.to_string();
        let rewards = RewardSet::new(&p.rewards).map_err(|e| anyhow::anyhow!("grpo stage '{stage}': {e}"))?;
        let compute = ctx.compute()?;
        let seed = p.seed_or(ctx.recipe.meta.seed);
        let from = ctx.inputs.model(&p.from, &stage)?;
        let tok = TextTokenizer::from_artifact(from)
            .with_context(|| format!("grpo stage '{stage}': loading the tokenizer of stage '{}'", p.from))?;

        let Policy { model: mut policy, adapters, reference, params } =
            Policy::load(ctx, &compute, &p.from, p.reference.as_deref(), p.lora.as_ref(), seed)?;
        let max_prompt = p.max_prompt_len.min(policy.config().max_position_embeddings.saturating_sub(1));
        let needs_answers = rewards.names().contains(&"exact_match");
        let (prompts, skipped_long) = load_prompts(ctx, "grpo", &p.data, &tok, needs_answers, max_prompt)?;
        let data = PromptSet::new(prompts, tok.pad);
        let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
        let generation = GenerationConfig {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: 1.0,
            stop_token_ids: vec![tok.eos],
            seed,
        };
        let grpo = Grpo {
            policy: &policy,
            params: &params,
            reference: &reference,
            adapters: adapters.as_ref(),
            rewards: &rewards,
            rollout: RolloutConfig { num_generations: p.num_generations, generation, pad_id: tok.pad },
            loss: p.loss_config(),
            decode: &decode,
        };
        let eval_set: Vec<&Prompt> = (0..p.reward_eval_prompts.min(data.len())).map(|i| data.get(i)).collect();
        // A fixed seed apart from the training streams: before and after see the same draws.
        let eval_seed = seed ^ 0x5EED_F00D;
        let reward_before =
            if eval_set.is_empty() { None } else { Some(grpo.mean_reward(&eval_set, p.batch_size, eval_seed)?) };

        let opts = p.train_options(ctx);

        let run = ctx.run;
        let (mut reward_sum, mut zero_std, mut groups, mut steps) = (0f64, 0usize, 0usize, 0usize);
        let summary = grpo.train(&data, &opts, ctx.cancel, |i, m| {
            reward_sum += m.reward_mean;
            zero_std += m.zero_std_groups;
            groups += m.groups;
            steps += 1;
            // Metrics are best effort: a full disk must not kill a training run.
            let _ = run.metric(&stage, metric_point(i, m));
        })?;
        if zero_std > 0 {
            tracing::info!(
                stage = %stage,
                "{zero_std} of {groups} rollout groups had identical rewards (no policy signal)"
            );
        }
        let reward_after =
            if eval_set.is_empty() { None } else { Some(grpo.mean_reward(&eval_set, p.batch_size, eval_seed)?) };

        if let Some(a) = adapters {
            a.merge(&mut policy)?;
        }
        weights::export(&policy, Some(&from.dir), ctx.out_dir)
            .with_context(|| format!("grpo stage '{stage}': writing the model"))?;

        let mut metrics = summary.to_metrics();
        metrics.insert("prompts".into(), data.len().into());
        metrics.insert("skipped_long_prompts".into(), skipped_long.into());
        if steps > 0 {
            metrics.insert("reward_mean".into(), (reward_sum / steps as f64).into());
            metrics.insert("zero_std_groups".into(), zero_std.into());
            metrics.insert("groups".into(), groups.into());
        }
        if let (Some(b), Some(a)) = (reward_before, reward_after) {
            metrics.insert("reward_before".into(), b.into());
            metrics.insert("reward_after".into(), a.into());
        }
        Ok(StageOutcome { metrics })
    }
}

/// Generation prompts (chat template, assistant header) and final answers from dataset `data` of
/// a `kind` stage (an RL stage: grpo, ppo); prompts longer than `max_prompt` tokens are left out
/// and counted. `needs_answers`: a reward compares against reference answers, so the data must
/// have them.
pub(super) fn load_prompts(
    ctx: &StageContext<'_>,
    kind: &str,
    data: &str,
    tok: &TextTokenizer,
    needs_answers: bool,
    max_prompt: usize,
) -> anyhow::Result<(Vec<Prompt>, usize)> {
    let stage = ctx.name;
    let ds = ctx.inputs.dataset(data)?;
    let has_answers = match ds.spec.format {
        DataFormat::PromptAnswer => true,
        DataFormat::Sharegpt | DataFormat::Openai | DataFormat::Alpaca => false,
        f => bail!(
            "{kind} stage '{stage}': dataset '{data}' has format {f:?}; it needs prompts: format = \"prompt_answer\" \
             (with answers for exact-match rewards) or a chat format"
        ),
    };
    if !has_answers && needs_answers {
        bail!(
            "{kind} stage '{stage}': the exact_match reward needs reference answers, but dataset '{data}' is a chat \
             dataset; use format = \"prompt_answer\" or drop that reward"
        );
    }
    let examples = crate::data::read_examples(ds, Some(ctx.run as _))
        .with_context(|| format!("{kind} stage '{stage}': reading dataset '{data}'"))?;
    let (mut prompts, mut skipped) = (Vec::new(), 0usize);
    for ex in examples {
        let (messages, answer) = match ex {
            Example::PromptAnswer { prompt, final_answer, .. } => (vec![Message::new("user", prompt)], final_answer),
            Example::Chat { mut messages, .. } => {
                if messages.last().is_some_and(|m| m.role == "assistant") {
                    messages.pop();
                }
                (messages, None)
            }
            _ => continue,
        };
        let ids = tok.prompt(&messages, false)?;
        if ids.len() > max_prompt {
            skipped += 1;
            continue;
        }
        prompts.push(Prompt { ids, answer });
    }
    if skipped > 0 {
        tracing::warn!(stage, "{skipped} prompts longer than {max_prompt} tokens were skipped");
    }
    if prompts.is_empty() {
        bail!(
            "{kind} stage '{stage}': no usable prompts in '{data}' ({skipped} longer than max_prompt_len = \
             {max_prompt}); raise max_prompt_len or check the data"
        );
    }
    Ok((prompts, skipped))
}
