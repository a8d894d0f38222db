//! `kind = "agent"`: agent RL (spec §14): GRPO over multi-turn tool episodes.
//!
//! For each tool task (`prompt_answer` records with `tools` and `tool_call`, what
//! `builtin:tool_use` writes) the policy works through `num_generations` episodes: it generates,
//! mmrun parses its `<tool_call>`s, runs them with the built-in tool registry (`tools`, or each
//! task's own tools) and feeds the results back as `tool` turns, for at most `max_turns`
//! generations (the eval stage's tool loop, shared). Each episode gets the §14.3 reward, clipped
//! to ±3: `format` (unbalanced call markers), `calls` (valid calls against the task's one expected
//! call), `answer` (the reference answer found in the final answer), `unfinished` and
//! `repetition`. Advantages are normalised within each task's group and the GRPO or CISPO
//! objective with a k3 KL to the frozen reference is taken over the tokens the model generated
//! only; tool results and template tokens are in the sequence but get no gradient.
//!
//! Where the reference (`train_agent.py`) has a quirk, mmrun:
//! * **fixes** re-tokenisation drift: the reference re-renders the conversation after each tool
//!   turn and appends the token delta, assuming the re-tokenised prefix reproduces what the model
//!   generated. That is a bug (the same text can tokenise differently). mmrun keeps the ids the
//!   model generated and tokenises only the fed-back part, which starts after a special token.
//! * **fixes** the untrained end of turn: the reference drops the generated `<|im_end|>` and re-adds
//!   it with mask 0, so ending a turn is never trained; mmrun keeps it as a generated token.
//! * **changes** the no-tool branch: the reference scores an episode without calls by length,
//!   thinking format and a reward model and never checks its answer; mmrun scores every episode
//!   with the same terms (a missing call is a call gap, the answer counts).
//! * **fixes** numeric answers matched as substrings ("5" found in "150"): numbers compare as
//!   numbers.
//! * **keeps** the weights (+0.5/−0.5·gap, 2.5 × answers found, −0.5 unfinished, −0.5 per unbalanced
//!   marker, −repetition), the ±3 clip, the group advantage and the single update per rollout.
//! * **changes** the rollout: episodes of a batch generate together (the reference runs them one
//!   by one), the tools are mmrun's deterministic registry instead of `eval` with a 1 s alarm, and
//!   an episode still calling tools on its last turn ends there (the reference appends the results
//!   with mask 0 and never reads them).
//!
//! With `heldout = "<dataset>"` (held-out tool tasks, e.g. `builtin:tool_use` with
//! `split = "test"`) the stage measures tool selection, argument validity and answer accuracy
//! greedily before and after training (`heldout_before/…`, `heldout/…`). Per micro-batch
//! `metrics.jsonl` gets the reward, each term, tool success, calls, turns, the unfinished
//! fraction, KL, clip fraction and the response length.

use super::eval::{read_tool_tasks, TokEncoder};
use super::training::{training_params, LoraParams, Policy};
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::align::agent::{Agent, EpisodeConfig, TaskSet};
use crate::align::losses::{GrpoLossConfig, PolicyLossKind};
use crate::artifact::ArtifactKind;
use crate::data::spec::DataFormat;
use crate::data::tokenize::TextTokenizer;
use crate::eval::toolcall::ToolTask;
use crate::eval::Evaluator;
use crate::model::generate::GenerationConfig;
use crate::model::weights;
use crate::train::BatchSource;
use anyhow::{bail, Context};

training_params! {
    /// Parameters of an `agent` stage.
    pub struct AgentParams {
        /// Stage whose model is the starting policy (and, by default, the frozen reference).
        pub from: String,
        /// Stage whose model is the frozen KL reference (default: the starting policy's weights).
        #[serde(default)]
        pub reference: Option<String>,
        /// Tool tasks: a `prompt_answer` dataset whose records carry `tools` and `tool_call`.
        pub data: String,
        /// Held-out tool tasks measured before and after training (greedy), if any.
        #[serde(default)]
        pub heldout: Option<String>,
        /// Most held-out tasks measured.
        #[serde(default = "default_heldout_tasks")]
        pub heldout_tasks: usize,
        /// The built-in tools offered and run in every episode (default: each task's own tools).
        #[serde(default)]
        pub tools: Option<Vec<String>>,
        /// Generations per episode: the model may call tools and see their results this many
        /// times (reference 3).
        #[serde(default = "default_max_turns")]
        pub max_turns: usize,
        /// Episodes sampled per task (the group; reference 4).
        #[serde(default = "default_generations")]
        pub num_generations: usize,
        /// Sampling temperature of the episodes (reference 0.8); must be positive.
        #[serde(default = "super::grpo::default_temperature")]
        pub temperature: f32,
        /// Top-k filter of the episodes (0 = off).
        #[serde(default = "super::grpo::default_top_k")]
        pub top_k: usize,
        /// Nucleus filter of the episodes (1 = off).
        #[serde(default = "super::grpo::default_top_p")]
        pub top_p: f32,
        /// Most tokens per generated turn (reference 768).
        #[serde(default = "default_max_new_tokens")]
        pub max_new_tokens: usize,
        /// Longest prompt in tokens (tool declarations included); longer tasks are skipped and
        /// counted.
        #[serde(default = "super::grpo::default_max_prompt_len")]
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
        /// Upper clip range (`grpo`: 1 + clip_high, default 0.2; `cispo`: weight cap, default 5.0).
        #[serde(default)]
        pub clip_high: Option<f64>,
        /// Train LoRA adapters instead of all weights (merged into the output model).
        #[serde(default)]
        pub lora: Option<LoraParams>,
    }
    defaults { lr: 3e-7, batch_size: 2, epochs: 1, save_every: 0, log_every: 1 }
}

fn default_heldout_tasks() -> usize {
    64
}
fn default_max_turns() -> usize {
    3
}
fn default_generations() -> usize {
    4
}
fn default_max_new_tokens() -> usize {
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

impl StageParams for AgentParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

    fn inputs(&self) -> Vec<InputRef> {
        let mut v = super::training::policy_inputs(&self.from, self.reference.as_deref(), &self.data, TASK_FORMATS);
        if let Some(h) = &self.heldout {
            v.push(InputRef::Dataset { param: "heldout", dataset: h.clone(), accepts: TASK_FORMATS });
        }
        v
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        self.validate_training()?;
        // Episodes are sampled per process; splitting a batch's groups across ranks is untested.
        super::training::single_rank("agent", self.world_size, &self.devices)?;
        super::grpo::validate_sampling(
            self.num_generations,
            self.temperature,
            self.top_p,
            self.max_new_tokens,
            self.beta,
        )?;
        super::training::at_least("max_turns", self.max_turns, 1)?;
        if let Some(tools) = &self.tools {
            let known = crate::tools::names().join(", ");
            let bad = |message: String| InvalidParam { key: "tools", message, hint: format!("known tools: {known}") };
            if tools.is_empty() {
                return Err(bad("tools = [] offers no tool".into()));
            }
            if let Some(t) = tools.iter().find(|t| crate::tools::get(t).is_none()) {
                return Err(bad(format!("unknown tool '{t}'")));
            }
        }
        Ok(())
    }
}

impl AgentParams {
    fn loss_config(&self) -> GrpoLossConfig {
        super::grpo::loss_config(self.loss_type, self.clip_low, self.clip_high, self.beta)
    }
}

/// What an agent stage reads: tool tasks.
const TASK_FORMATS: &[DataFormat] = &[DataFormat::PromptAnswer];

/// The `agent` stage kind.
pub struct AgentStage;

impl StageKind for AgentStage {
    const KIND: &'static str = "agent";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str =
        "Agent RL: multi-turn tool episodes, rewards for valid calls and right answers, GRPO/CISPO on generated tokens";
    type Params = AgentParams;
}

/// The tool tasks of dataset `name`, offered `tools` when the stage names them.
fn tool_tasks(
    ctx: &StageContext<'_>,
    name: &str,
    tools: Option<&[String]>,
    max: usize,
) -> anyhow::Result<Vec<ToolTask>> {
    let stage = ctx.name;
    let ds = ctx.inputs.dataset(name)?;
    let Some(mut tasks) = read_tool_tasks(ds, max)? else {
        bail!(
            "agent stage '{stage}': dataset '{name}' holds no tool tasks; it needs `prompt_answer` records with \
             `tools` and `tool_call`, e.g. source = \"builtin:tool_use\" with format = \"prompt_answer\""
        );
    };
    if let Some(tools) = tools {
        let offered: Vec<&'static str> = tools.iter().filter_map(|t| crate::tools::get(t)).map(|t| t.name).collect();
        for t in &mut tasks {
            if !offered.contains(&t.expected.name.as_str()) {
                bail!(
                    "agent stage '{stage}': a task of dataset '{name}' needs tool '{}', which `tools` does not offer; \
                     add it to `tools`",
                    t.expected.name
                );
            }
            t.tools = offered.clone();
        }
    }
    Ok(tasks)
}

impl Stage for AgentStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &AgentParams) -> anyhow::Result<StageOutcome> {
        let stage = ctx.name.to_string();
        let compute = ctx.compute()?;
        let seed = p.seed_or(ctx.recipe.meta.seed);
        let from = ctx.inputs.model(&p.from, &stage)?;
        let tok = TextTokenizer::from_artifact(from)
            .with_context(|| format!("agent stage '{stage}': loading the tokenizer of stage '{}'", p.from))?;
        let (pad, eos) = (tok.pad, tok.eos);
        let enc = TokEncoder::chat(tok);

        let Policy { model: mut policy, adapters, reference, params } =
            Policy::load(ctx, &compute, &p.from, p.reference.as_deref(), p.lora.as_ref(), seed)?;
        let max_prompt = p.max_prompt_len.min(policy.config().max_position_embeddings.saturating_sub(1));
        let tasks = tool_tasks(ctx, &p.data, p.tools.as_deref(), usize::MAX)?;
        let all = TaskSet::new(tasks, &enc, pad)?;
        let (data, skipped_long) = all.without_longer_than(max_prompt);
        if skipped_long > 0 {
            tracing::warn!(stage, "{skipped_long} tool tasks longer than {max_prompt} tokens were skipped");
        }
        if data.is_empty() {
            bail!(
                "agent stage '{stage}': no usable tool tasks in '{}' ({skipped_long} longer than max_prompt_len = \
                 {max_prompt}); raise max_prompt_len or check the data",
                p.data
            );
        }
        let heldout = match &p.heldout {
            Some(h) => tool_tasks(ctx, h, p.tools.as_deref(), p.heldout_tasks)?,
            None => vec![],
        };
        let generation = GenerationConfig {
            max_new_tokens: p.max_new_tokens,
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: 1.0,
            stop_token_ids: vec![eos],
            seed,
        };
        let agent = Agent {
            policy: &policy,
            params: &params,
            reference: &reference,
            adapters: adapters.as_ref(),
            enc: &enc,
            episodes: EpisodeConfig {
                num_generations: p.num_generations,
                max_turns: p.max_turns,
                generation: generation.clone(),
                pad_id: pad,
            },
            loss: p.loss_config(),
        };
        // Held-out success is measured greedily, so before and after differ only by the weights.
        let greedy = GenerationConfig { temperature: 0.0, ..generation };
        let measure = |tag: &str| -> anyhow::Result<serde_json::Map<String, serde_json::Value>> {
            let mut m = serde_json::Map::new();
            if heldout.is_empty() {
                return Ok(m);
            }
            if let Some(a) = &adapters {
                a.set_training(false);
            }
            let ev = Evaluator {
                model: &policy,
                enc: &enc,
                batch_size: p.batch_size * p.num_generations,
                max_len: usize::MAX,
            };
            let (s, _) = ev.tool_use(&heldout, &greedy, p.max_turns)?;
            for (k, v) in
                [("tool_selection", s.selection), ("tool_args_valid", s.args_valid), ("tool_answer", s.answer)]
            {
                m.insert(format!("{tag}/{k}"), v.into());
            }
            Ok(m)
        };
        let before = measure("heldout_before")?;

        let opts = p.train_options(ctx);
        let run = ctx.run;
        let (mut reward_sum, mut success_sum, mut steps) = (0f64, 0f64, 0usize);
        let summary = agent.train(&data, &opts, ctx.cancel, |i, m| {
            reward_sum += m.reward_mean;
            success_sum += m.tool_success;
            steps += 1;
            // Metrics are best effort: a full disk must not kill a training run.
            let _ = run.metric(&stage, super::grpo::metric_point(i, m));
        })?;
        let after = measure("heldout")?;

        if let Some(a) = adapters {
            a.merge(&mut policy)?;
        }
        weights::export(&policy, Some(&from.dir), ctx.out_dir)
            .with_context(|| format!("agent stage '{stage}': writing the model"))?;

        let mut metrics = summary.to_metrics();
        metrics.insert("tasks".into(), data.len().into());
        metrics.insert("skipped_long_prompts".into(), skipped_long.into());
        if steps > 0 {
            metrics.insert("reward_mean".into(), (reward_sum / steps as f64).into());
            metrics.insert("tool_success".into(), (success_sum / steps as f64).into());
        }
        if !heldout.is_empty() {
            metrics.insert("heldout_tasks".into(), heldout.len().into());
        }
        metrics.extend(before);
        metrics.extend(after);
        Ok(StageOutcome { metrics })
    }
}
