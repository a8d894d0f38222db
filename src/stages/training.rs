//! The loop and optimiser parameters every training stage shares, declared once.
//!
//! Recipes keep them flat (`lr = …` next to `data = …`), and unknown keys must stay errors; serde's
//! `flatten` cannot be combined with `deny_unknown_fields`, so [`training_params!`] writes the
//! shared fields into each stage's struct instead, with that stage's defaults, and derives the
//! loop's [`crate::train::TrainOptions`] from them in one place.

/// Declare a training stage's parameter struct: the fields written inside, then the fields every
/// trainer shares (`lr`, `batch_size`, `epochs`, `max_steps`, `accumulation_steps`, `grad_clip`,
/// `warmup_steps`, `weight_decay`, `seed`, `save_every`, `save_every_secs`, `log_every`, and the
/// data-parallel `world_size` and `devices`) with this stage's defaults,
/// plus `seed_or()` and `train_options()`. It defines `default_lr`, `default_batch_size`,
/// `default_epochs`, `default_save_every` and `default_log_every` in the calling module.
macro_rules! training_params {
    (
        $(#[$meta:meta])*
        pub struct $name:ident { $($fields:tt)* }
        defaults { lr: $lr:expr, batch_size: $batch:expr, epochs: $epochs:expr, save_every: $save:expr, log_every: $log:expr $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
        #[serde(deny_unknown_fields)]
        pub struct $name {
            $($fields)*
            /// Peak learning rate (cosine decay to 10 % of it, spec §8).
            #[serde(default = "default_lr")]
            pub lr: f64,
            /// Examples (rows, pairs or prompts) per micro-batch, on each rank when `world_size` > 1.
            #[serde(default = "default_batch_size")]
            pub batch_size: usize,
            /// Passes over the data (ignored when `max_steps` is set).
            #[serde(default = "default_epochs")]
            pub epochs: usize,
            /// Stop after this many optimiser steps instead (wrapping epochs as needed).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub max_steps: Option<usize>,
            /// Micro-batches per optimiser step.
            #[serde(default = "crate::stages::training::one")]
            pub accumulation_steps: usize,
            /// Global gradient-norm clip (0 disables).
            #[serde(default = "crate::stages::training::default_grad_clip")]
            pub grad_clip: f64,
            /// Linear warmup in micro-steps before the cosine (the reference has none).
            #[serde(default)]
            pub warmup_steps: usize,
            /// AdamW decoupled weight decay (on every parameter, like the reference).
            #[serde(default = "crate::stages::training::default_weight_decay")]
            pub weight_decay: f64,
            /// Seed for initialisation, data order and sampling (default: the recipe's).
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub seed: Option<u64>,
            /// Checkpoint every N optimiser steps (0: not by count). Cosmetic: resuming is exact
            /// either way.
            #[serde(default = "default_save_every")]
            pub save_every: usize,
            /// Also checkpoint when this many seconds have passed since the last checkpoint
            /// (0: after every step), so a crash or `kill -9` loses at most this much training.
            /// Cosmetic.
            #[serde(default = "crate::stages::training::default_save_every_secs")]
            pub save_every_secs: u64,
            /// Progress refresh every N steps (cosmetic; metrics are logged every step).
            #[serde(default = "default_log_every")]
            pub log_every: usize,
            /// Data-parallel ranks: mmrun starts one process per rank, each trains on its slice of
            /// every batch, and gradients are summed before each step. `batch_size` is per rank, so
            /// the global batch is `world_size × batch_size`. Default: one rank per entry of
            /// `devices`, else 1.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            pub world_size: Option<usize>,
            /// One device per rank (`["cuda:0", "cuda:1"]`), instead of the recipe's `device`.
            #[serde(default, skip_serializing_if = "Vec::is_empty")]
            pub devices: Vec<crate::recipe::DeviceSpec>,
        }

        fn default_lr() -> f64 {
            $lr
        }
        fn default_batch_size() -> usize {
            $batch
        }
        fn default_epochs() -> usize {
            $epochs
        }
        fn default_save_every() -> usize {
            $save
        }
        fn default_log_every() -> usize {
            $log
        }

        impl $name {
            /// The seed this stage uses: its own `seed`, else the recipe's.
            pub fn seed_or(&self, recipe_seed: u64) -> u64 {
                self.seed.unwrap_or(recipe_seed)
            }

            /// Reject shared loop values that can never train (`batch_size = 0`, `max_steps = 0`, a
            /// learning rate that is not a positive number).
            pub fn validate_training(&self) -> Result<(), crate::recipe::InvalidParam> {
                crate::stages::training::positive_lr(self.lr)?;
                crate::stages::training::at_least("batch_size", self.batch_size, 1)?;
                crate::stages::training::at_least("accumulation_steps", self.accumulation_steps, 1)?;
                if let Some(n) = self.max_steps {
                    crate::stages::training::at_least("max_steps", n, 1)?;
                }
                crate::stages::training::ranks(self.world_size, &self.devices)?;
                crate::stages::training::save_every_secs(self.save_every_secs)
            }

            /// The shared loop's options for this stage: checkpoints in its work dir, per-step
            /// metrics and the loss curve in the run, a progress bar when stderr is a terminal.
            pub fn train_options(&self, ctx: &crate::stages::StageContext<'_>) -> crate::train::TrainOptions {
                let mut o = crate::train::TrainOptions::new(ctx.name, ctx.work_dir.to_path_buf());
                o.lr = self.lr;
                o.warmup_steps = self.warmup_steps;
                o.adamw.weight_decay = self.weight_decay;
                o.grad_clip = self.grad_clip;
                o.accumulation_steps = self.accumulation_steps.max(1);
                o.batch_size = self.batch_size.max(1);
                o.epochs = self.epochs;
                o.max_steps = self.max_steps;
                o.save_every = self.save_every;
                o.save_interval = Some(std::time::Duration::from_secs(self.save_every_secs));
                o.log_every = self.log_every;
                o.seed = self.seed_or(ctx.recipe.meta.seed);
                o.metrics_path = Some(ctx.run.dir().join(crate::runs::files::METRICS));
                o.plot_path = Some(ctx.run.dir().join(format!("{}-loss.png", ctx.name)));
                o.progress = crate::progress::enabled();
                if let Some(r) = &ctx.rank {
                    o.collective = r.collective.clone();
                }
                o
            }
        }
    };
}

pub(crate) use training_params;

/// The cosmetic params of every training stage: checkpoint cadence and progress output never
/// change the trained weights (resuming is exact either way).
pub(crate) const COSMETIC: &[&str] = &["save_every", "save_every_secs", "log_every"];

/// `world_size` and `devices` agree, and each device is named once (two ranks on one GPU would
/// only slow each other down; CPU ranks may share the CPU).
pub(crate) fn ranks(
    world_size: Option<usize>,
    devices: &[crate::recipe::DeviceSpec],
) -> Result<(), crate::recipe::InvalidParam> {
    use crate::recipe::DeviceSpec;
    if let Some(n) = world_size {
        at_least("world_size", n, 1)?;
        if !devices.is_empty() && devices.len() != n {
            return Err(crate::recipe::InvalidParam {
                key: "world_size",
                message: format!("world_size = {n} but `devices` lists {} devices", devices.len()),
                hint: "give one device per rank, or drop world_size (it defaults to the number of devices)".into(),
            });
        }
    }
    for (i, d) in devices.iter().enumerate() {
        if *d == DeviceSpec::Auto {
            return Err(crate::recipe::InvalidParam {
                key: "devices",
                message: "`auto` does not say which device a rank gets".into(),
                hint: "list devices explicitly, e.g. devices = [\"cuda:0\", \"cuda:1\"]".into(),
            });
        }
        if matches!(d, DeviceSpec::Cuda(_)) && devices[..i].contains(d) {
            return Err(crate::recipe::InvalidParam {
                key: "devices",
                message: format!("{d} is listed twice"),
                hint: "give each rank its own GPU".into(),
            });
        }
    }
    if let Some(d) = devices.iter().find(|d| matches!(d, DeviceSpec::Cuda(_))).filter(|_| !cfg!(feature = "cuda")) {
        return Err(crate::recipe::InvalidParam {
            key: "devices",
            message: format!("device '{d}' needs CUDA, but this mmrun was built without it"),
            hint: "list \"cpu\" devices, or build mmrun with `--features cuda`".into(),
        });
    }
    Ok(())
}

/// For stages whose loop does not run data parallel (PPO's own loop): `world_size` and `devices`
/// are refused when the recipe loads rather than ignored.
pub(crate) fn single_rank(
    kind: &str,
    world_size: Option<usize>,
    devices: &[crate::recipe::DeviceSpec],
) -> Result<(), crate::recipe::InvalidParam> {
    if world_size.unwrap_or(1) > 1 || devices.len() > 1 {
        return Err(crate::recipe::InvalidParam {
            key: if devices.len() > 1 { "devices" } else { "world_size" },
            message: format!("{kind} stages do not train data parallel yet"),
            hint: "remove world_size/devices from this stage (pretrain, sft, lora, dpo, grpo, distill and reward_model accept them)".into(),
        });
    }
    Ok(())
}

/// Default of `save_every_secs`: a crash loses at most five minutes of training, and a
/// checkpoint (a few seconds for the largest models mmrun trains) stays a small share of that.
pub(crate) fn default_save_every_secs() -> u64 {
    300
}

/// The longest `save_every_secs` accepted: a day. Anything longer is almost surely a unit slip
/// (milliseconds), which would silently turn off crash recovery.
const MAX_SAVE_EVERY_SECS: u64 = 86_400;

/// `save_every_secs` is at most [`MAX_SAVE_EVERY_SECS`].
pub(crate) fn save_every_secs(secs: u64) -> Result<(), crate::recipe::InvalidParam> {
    if secs <= MAX_SAVE_EVERY_SECS {
        return Ok(());
    }
    Err(crate::recipe::InvalidParam {
        key: "save_every_secs",
        message: format!("save_every_secs = {secs} is more than a day: a crash would lose all of that training"),
        hint: format!(
            "give seconds between checkpoints, at most {MAX_SAVE_EVERY_SECS} (default {}; 0 = after every step)",
            default_save_every_secs()
        ),
    })
}

/// The inputs of a stage that optimises a policy `from` a model against a frozen `reference`
/// (DPO, GRPO): both accept a model or a merged LoRA stage; `data` has one of the formats `accepts`.
pub(crate) fn policy_inputs(
    from: &str,
    reference: Option<&str>,
    data: &str,
    accepts: &'static [crate::data::spec::DataFormat],
) -> Vec<super::InputRef> {
    use super::InputRef;
    use crate::artifact::ArtifactKind;
    let models = ArtifactKind::MODEL_INPUTS.to_vec();
    let mut v = vec![InputRef::Stage { param: "from", stage: from.to_string(), accepts: models.clone() }];
    if let Some(r) = reference {
        v.push(InputRef::Stage { param: "reference", stage: r.to_string(), accepts: models });
    }
    v.push(InputRef::Dataset { param: "data", dataset: data.to_string(), accepts });
    v
}

/// `key` (an integer param) is at least `min`.
pub(crate) fn at_least(key: &'static str, value: usize, min: usize) -> Result<(), crate::recipe::InvalidParam> {
    if value >= min {
        return Ok(());
    }
    Err(crate::recipe::InvalidParam {
        key,
        message: format!("{key} = {value} can never work"),
        hint: format!("use {min} or more"),
    })
}

/// A learning rate is a positive, finite number (`nan` and `inf` would also collide in the key).
pub(crate) fn positive_lr(lr: f64) -> Result<(), crate::recipe::InvalidParam> {
    if lr > 0.0 && lr.is_finite() {
        return Ok(());
    }
    Err(crate::recipe::InvalidParam {
        key: "lr",
        message: format!("lr = {lr} cannot train a model"),
        hint: "use a small positive number, e.g. lr = 5e-4".into(),
    })
}

/// A value that must be a finite number in a range.
pub(crate) fn in_range(
    key: &'static str,
    value: f64,
    ok: impl FnOnce(f64) -> bool,
    hint: &str,
) -> Result<(), crate::recipe::InvalidParam> {
    if value.is_finite() && ok(value) {
        return Ok(());
    }
    Err(crate::recipe::InvalidParam { key, message: format!("{key} = {value} is out of range"), hint: hint.into() })
}

/// A list param that must name at least one thing.
pub(crate) fn non_empty<T>(key: &'static str, v: &[T], hint: &str) -> Result<(), crate::recipe::InvalidParam> {
    if !v.is_empty() {
        return Ok(());
    }
    Err(crate::recipe::InvalidParam { key, message: format!("{key} is empty"), hint: hint.into() })
}

/// Default of `accumulation_steps`.
pub(crate) fn one() -> usize {
    1
}

/// Default of `packing` where it is on (sft, lora, distill).
pub(crate) fn yes() -> bool {
    true
}

/// Default of `grad_clip` (the reference's).
pub(crate) fn default_grad_clip() -> f64 {
    1.0
}

/// Default of `weight_decay` (PyTorch's AdamW default, which the reference keeps).
pub(crate) fn default_weight_decay() -> f64 {
    0.01
}

/// LoRA settings inside a training stage (`lora = { rank = 8 }`).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LoraParams {
    /// Adapter rank.
    pub rank: usize,
    /// `lora_alpha` (update scale alpha / rank); default `2 * rank`.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// Dropout on the adapter input while training.
    #[serde(default)]
    pub dropout: f64,
    /// `"all-linear"` or a comma-separated list of module names (`"q_proj,v_proj"`).
    #[serde(default = "default_targets")]
    pub targets: String,
}

fn default_targets() -> String {
    "all-linear".into()
}

impl LoraParams {
    /// The model-level config (seeded from the stage seed).
    pub fn to_config(&self, seed: u64) -> anyhow::Result<crate::model::lora::LoraConfig> {
        Ok(crate::model::lora::LoraConfig {
            rank: self.rank,
            alpha: self.alpha.unwrap_or(2.0 * self.rank as f64),
            dropout: self.dropout,
            targets: crate::model::lora::Targets::parse(&self.targets)?,
            seed,
        })
    }
}

/// The model a preference or RL stage (DPO, GRPO) optimises and its frozen reference, loaded from
/// the `from`, `reference` and `lora` params that [`policy_inputs`] declares.
pub(crate) struct Policy {
    /// The policy; its own weights are frozen when LoRA adapters train instead.
    pub model: crate::model::MiniMind,
    /// The LoRA adapters attached to `model`, when the stage trains adapters.
    pub adapters: Option<crate::model::lora::LoraAdapters>,
    /// The frozen reference: the `reference` stage's model, or the starting policy's weights.
    pub reference: crate::model::MiniMind,
    /// What the optimiser updates: the adapters' tensors, or every weight of the policy.
    pub params: Vec<(String, candle_core::Var)>,
}

impl Policy {
    /// Load stage `from`'s model as the policy (in `compute`'s precision), attach adapters seeded
    /// by `seed` when `lora` is set, and load or copy the reference.
    pub fn load(
        ctx: &super::StageContext<'_>,
        compute: &crate::train::device::Compute,
        from: &str,
        reference: Option<&str>,
        lora: Option<&LoraParams>,
        seed: u64,
    ) -> anyhow::Result<Self> {
        use anyhow::Context;
        let stage = ctx.name;
        let mut model = compute
            .load_model(&ctx.inputs.model(from, stage)?.dir, lora.is_none())
            .with_context(|| format!("stage '{stage}': loading model from stage '{from}'"))?;
        let adapters = match lora {
            Some(l) => Some(crate::model::lora::LoraAdapters::attach(&mut model, &l.to_config(seed)?)?),
            None => None,
        };
        let reference = match reference {
            Some(r) => compute
                .load_model(&ctx.inputs.model(r, stage)?.dir, false)
                .with_context(|| format!("stage '{stage}': loading reference from stage '{r}'"))?,
            None => crate::align::dpo::frozen_reference(&model)?,
        };
        let params = match &adapters {
            Some(a) => a.params(),
            None => model.params().to_vec(),
        };
        Ok(Self { model, adapters, reference, params })
    }
}

/// Refuse model `theirs` when its tokenizer differs from `ours`: every token must have the same id,
/// or a stage that hands one model's token ids to the other (distillation's teacher, PPO's reward
/// model) compares unrelated ids. The roles name the two in the message; `why` says what breaks.
pub(crate) fn same_vocabulary(
    (ours, our_role): (&crate::artifact::Artifact, &str),
    (theirs, their_role): (&crate::artifact::Artifact, &str),
    why: &str,
) -> anyhow::Result<()> {
    let vocab = |a: &crate::artifact::Artifact| -> anyhow::Result<std::collections::HashMap<String, u32>> {
        let p = a.tokenizer_json();
        let tok = tokenizers::Tokenizer::from_file(&p)
            .map_err(|e| anyhow::anyhow!("cannot load tokenizer {}: {e}", p.display()))?;
        Ok(tok.get_vocab(true))
    };
    let (s, t) = (vocab(ours)?, vocab(theirs)?);
    if s == t {
        return Ok(());
    }
    let mut differing: Vec<(u32, &str)> = s
        .iter()
        .filter(|(tok, id)| t.get(tok.as_str()) != Some(*id))
        .map(|(tok, &id)| (id, tok.as_str()))
        .chain(t.iter().filter(|(tok, _)| !s.contains_key(*tok)).map(|(tok, &id)| (id, tok.as_str())))
        .collect();
    differing.sort();
    let tok = differing[0].1;
    anyhow::bail!(
        "the {their_role}'s vocabulary differs from the {our_role}'s ({} vs {} tokens, {} differ; e.g. token {tok:?}: \
         id {} for the {our_role}, {} for the {their_role}); {why}",
        s.len(),
        t.len(),
        differing.len(),
        s.get(tok).map_or("none".into(), |i| i.to_string()),
        t.get(tok).map_or("none".into(), |i| i.to_string()),
    )
}
