//! `kind = "lora"`: train LoRA adapters on a frozen model with SFT-format data (same chat template
//! and assistant-only masks as SFT). The artifact is an `Adapter` in PEFT's layout
//! (`adapter_model.safetensors` + `adapter_config.json`, loadable by `peft` onto the exported base)
//! plus the tokenizer files; with `merge = true` it also holds the merged full model
//! (`config.json` + `model.safetensors`), which `dpo` can start from.

use super::training::{training_params, LoraParams};
use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::align::sft_lora::train_lora;
use crate::artifact::ArtifactKind;
use crate::data::shards::ShardParams;
use crate::data::spec::DataFormat;
use crate::model::lora::LoraAdapters;
use crate::model::weights;
use crate::train::batch::PaddedRows;
use anyhow::{bail, Context};

training_params! {
    /// Parameters of a `lora` stage.
    pub struct LoraStageParams {
        /// Stage whose model is the frozen base.
        pub from: String,
        /// A dataset in a chat format (`sharegpt`, `openai`, `alpaca`).
        pub data: String,
        /// Adapter rank (reference 16).
        #[serde(default = "default_rank")]
        pub rank: usize,
        /// `lora_alpha` (scale alpha / rank); default `2 * rank`.
        #[serde(default)]
        pub alpha: Option<f64>,
        /// Dropout on the adapter input while training.
        #[serde(default)]
        pub dropout: f64,
        /// `"all-linear"` or a comma-separated list of module names (`"q_proj,v_proj"`).
        #[serde(default = "default_targets")]
        pub targets: String,
        /// Also write the merged full model into the artifact.
        #[serde(default)]
        pub merge: bool,
        /// Longest tokenised conversation (reference 340).
        #[serde(default = "default_max_len")]
        pub max_seq_len: usize,
        /// Pack several short conversations into each row of up to `max_seq_len` tokens (far
        /// fewer pad tokens). Each keeps its own causal attention and RoPE positions, as if alone
        /// in its row, and its first token is not predicted from the previous one, so every
        /// conversation's loss and gradient are exactly the unpacked ones; what changes is that a
        /// row (the unit of `batch_size` and of an epoch's steps) holds several conversations.
        #[serde(default = "crate::stages::training::yes")]
        pub packing: bool,
    }
    defaults { lr: 1e-4, batch_size: 32, epochs: 10, save_every: 0, log_every: 10 }
}

fn default_rank() -> usize {
    16
}
fn default_targets() -> String {
    "all-linear".into()
}
fn default_max_len() -> usize {
    340
}

impl StageParams for LoraStageParams {
    const COSMETIC: &'static [&'static str] = super::training::COSMETIC;

    fn inputs(&self) -> Vec<InputRef> {
        vec![
            InputRef::Stage { param: "from", stage: self.from.clone(), accepts: vec![ArtifactKind::Model] },
            InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: DataFormat::CHAT },
        ]
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        self.validate_training()?;
        crate::stages::training::at_least("max_seq_len", self.max_seq_len, 2)?;
        crate::stages::training::at_least("rank", self.rank, 1)
    }
}

/// The `lora` stage kind.
pub struct LoraStage;

impl StageKind for LoraStage {
    const KIND: &'static str = "lora";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Adapter;
    const DOC: &'static str = "Train PEFT-compatible LoRA adapters on a frozen model with SFT data (optionally merged)";
    type Params = LoraStageParams;
}

impl Stage for LoraStage {
    fn run(&self, ctx: &mut StageContext<'_>, p: &LoraStageParams) -> anyhow::Result<StageOutcome> {
        let stage = ctx.name.to_string();
        let compute = ctx.compute()?;
        let seed = p.seed_or(ctx.recipe.meta.seed);
        let from = ctx.inputs.artifact(&p.from)?;
        let sp = ShardParams { max_seq_len: p.max_seq_len, seed, ..ShardParams::default() };
        let shards = super::fit::tokenize(ctx, &p.data, from, &sp)?;
        let (mut rows, mut no_loss) = (Vec::new(), 0usize);
        for i in 0..shards.len() {
            let s = shards.get(i).swap_remove(0);
            if s.trained() == 0 {
                no_loss += 1;
            } else {
                rows.push((s.ids.clone(), s.labels()));
            }
        }
        if rows.is_empty() {
            bail!("lora stage '{stage}': no trainable rows in '{}' ({no_loss} have no answer tokens within max_seq_len = {})", p.data, p.max_seq_len);
        }
        let n_rows = rows.len();
        let mut data = PaddedRows::new(rows, shards.meta().pad_id, None);
        if p.packing {
            data = data.packed(p.max_seq_len, seed);
        }

        let mut model = compute
            .load_model(&from.dir, false)
            .with_context(|| format!("lora stage '{stage}': loading model from stage '{}'", p.from))?;
        let lp = LoraParams { rank: p.rank, alpha: p.alpha, dropout: p.dropout, targets: p.targets.clone() };
        let adapters = LoraAdapters::attach(&mut model, &lp.to_config(seed)?)?;

        let opts = p.train_options(ctx);
        let summary = train_lora(&model, &adapters, &data, &opts, ctx.cancel)?;

        adapters
            .save(ctx.out_dir, Some(&p.from))
            .with_context(|| format!("lora stage '{stage}': saving the adapter"))?;
        let mut metrics = summary.to_metrics();
        metrics.insert("adapter_params".into(), adapters.num_params().into());
        metrics.insert("rows".into(), n_rows.into());
        metrics.insert("skipped_no_loss".into(), no_loss.into());
        if p.merge {
            adapters.merge(&mut model)?;
            weights::export(&model, Some(&from.dir), ctx.out_dir)
                .with_context(|| format!("lora stage '{stage}': writing the merged model"))?;
        } else {
            for f in weights::TOKENIZER_FILES {
                let src = from.dir.join(f);
                if src.is_file() {
                    std::fs::copy(&src, ctx.out_dir.join(f)).with_context(|| format!("copying {}", src.display()))?;
                }
            }
        }
        Ok(StageOutcome { metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::super::find;
    use super::*;

    fn table(s: &str) -> toml::Table {
        toml::from_str(s).unwrap()
    }

    #[test]
    fn lora_and_dpo_params_parse_with_defaults_and_reject_typos() {
        let l = find("lora").expect("lora is registered");
        let p = l.parse_params(&table("from = \"sft\"\ndata = \"med\"\nrank = 8")).unwrap();
        assert_eq!(p.canonical["targets"], "all-linear");
        assert_eq!(p.canonical["merge"], false);
        assert_eq!(p.inputs.len(), 2);
        assert!(l
            .parse_params(&table("from = \"sft\"\ndata = \"d\"\nrnak = 8"))
            .unwrap_err()
            .to_string()
            .contains("rnak"));
        assert_eq!(l.output(), ArtifactKind::Adapter);

        let d = find("dpo").expect("dpo is registered");
        let p = d.parse_params(&table("from = \"lora\"\ndata = \"prefs\"\nlora = { rank = 4 }")).unwrap();
        assert_eq!(p.canonical["beta"], 0.15);
        assert_eq!(p.canonical["lora"]["targets"], "all-linear");
        let accepts_adapter =
            |i: &InputRef| matches!(i, InputRef::Stage { accepts, .. } if accepts.contains(&ArtifactKind::Adapter));
        assert!(p.inputs.iter().any(accepts_adapter));
        assert!(d
            .parse_params(&table("from = \"a\"\ndata = \"p\"\nlora = { rank = 4, alpah = 2 }"))
            .unwrap_err()
            .to_string()
            .contains("alpah"));
        let lp: LoraParams = serde_json::from_value(p.canonical["lora"].clone()).unwrap();
        let c = lp.to_config(1).unwrap();
        assert_eq!((c.rank, c.alpha), (4, 8.0), "alpha defaults to 2 * rank");
    }
}
