//! `kind = "model"`, usually written `[models.<name>] source = "…"`: a released model as a pipeline
//! input, so stages can start `from` it like from any model stage.
//!
//! The source is a local transformers folder or `hf://<owner>/<name>[@<rev>][/<folder>]`. A Hub
//! model is fetched by exec before planning, through the recipe's lock (`[models.<name>]` there:
//! commit, file list, sha256s; only configs, tokenizer files, chat templates and safetensors are
//! downloaded), so the stage key follows the pinned content; a local folder's files enter the key
//! by content. The stage reads Qwen3 / Qwen3-MoE checkpoints (safetensors, single or sharded;
//! f32/bf16/f16; tied or untied embeddings; MoE experts per expert or fused) through
//! [`crate::model::weights::load_dir`] and writes mmrun's model artifact (f32 safetensors with Qwen3
//! names, `config.json`) with the model's tokenizer files and chat template beside it.

use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::artifact::{layout, ArtifactKind};
use crate::hub::uri::{HubUri, RemoteKind};
use crate::model::weights;
use crate::recipe::RemoteSource;
use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Parameters of a model input.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelParams {
    /// `hf://<owner>/<name>[@<revision>][/<folder>]`, or a local transformers folder (relative to
    /// the recipe).
    pub source: String,
}

impl ModelParams {
    fn hub_uri(&self) -> Option<Result<HubUri, crate::hub::uri::HubUriError>> {
        self.source.starts_with("hf://").then(|| HubUri::parse(&self.source))
    }
}

/// The files of a local model folder that enter the key: the config, the weights (single, or the
/// index and every shard) and the tokenizer files that are present.
fn local_model_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![dir.join(layout::MODEL_CONFIG_JSON)];
    let index = dir.join(weights::SHARD_INDEX);
    if index.is_file() {
        files.push(index.clone());
        files.extend(weights::shard_files(&index).unwrap_or_default().into_iter().map(|f| dir.join(f)));
    } else {
        files.push(dir.join(layout::MODEL_WEIGHTS));
    }
    files.extend(weights::TOKENIZER_FILES.iter().map(|f| dir.join(f)).filter(|p| p.is_file()));
    files
}

impl StageParams for ModelParams {
    fn inputs(&self) -> Vec<InputRef> {
        Vec::new()
    }

    fn local_files(&self, recipe_dir: &Path) -> Vec<(&'static str, PathBuf)> {
        if self.hub_uri().is_some() {
            return Vec::new();
        }
        local_model_files(&recipe_dir.join(&self.source)).into_iter().map(|p| ("source", p)).collect()
    }

    fn remote_sources(&self) -> Vec<RemoteSource> {
        match self.hub_uri() {
            Some(Ok(uri)) => vec![RemoteSource { param: "source", kind: RemoteKind::Model, uri }],
            _ => Vec::new(),
        }
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        if self.source.trim().is_empty() {
            return Err(InvalidParam {
                key: "source",
                message: "the model source is empty".into(),
                hint: "write hf://<owner>/<name>[@<revision>] or a local transformers folder".into(),
            });
        }
        if let Some(Err(e)) = self.hub_uri() {
            return Err(InvalidParam {
                key: "source",
                message: e.problem,
                hint: "write hf://<owner>/<name>[@<revision>][/<folder>]".into(),
            });
        }
        Ok(())
    }
}

/// The model input stage.
pub struct ModelStage;

impl StageKind for ModelStage {
    const KIND: &'static str = "model";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Model;
    const DOC: &'static str =
        "A released model (Qwen3 / Qwen3-MoE safetensors, hf:// or a local folder) as a pipeline input; usually written [models.<name>]";
    type Params = ModelParams;
}

impl Stage for ModelStage {
    fn run(&self, ctx: &mut StageContext<'_>, params: &Self::Params) -> anyhow::Result<StageOutcome> {
        let src = &params.source;
        let dir = if src.starts_with("hf://") {
            let repo = ctx.inputs.remote("source")?;
            let config = repo.file_named(layout::MODEL_CONFIG_JSON).ok_or_else(|| {
                anyhow::anyhow!(
                    "model '{}': {src} has no config.json at commit {} (point at the folder holding the model)",
                    ctx.name,
                    repo.commit
                )
            })?;
            config.local_path.parent().map(Path::to_path_buf).unwrap_or_default()
        } else {
            let dir = ctx.recipe.path.parent().unwrap_or(Path::new(".")).join(src);
            if !dir.join(layout::MODEL_CONFIG_JSON).is_file() {
                bail!(
                    "model '{}': {} {}; point source at a transformers folder (config.json and *.safetensors; relative to the recipe) or write hf://<owner>/<name>",
                    ctx.name,
                    dir.display(),
                    if dir.is_dir() { "has no config.json" } else { "does not exist" }
                );
            }
            dir
        };
        weights::refuse_pickled(&dir).with_context(|| format!("model '{}' ({src})", ctx.name))?;
        if layout::is_reward_model(&dir) {
            bail!(
                "model '{}': {src} is a reward model (a *ForSequenceClassification config: a score head, no LM head), but a model stage imports a causal LM; point source at the causal LM it was trained from, or train a reward model in the recipe with a reward_model stage",
                ctx.name
            );
        }
        // Imported on the CPU in f32: the artifact is the same whatever device trains on it.
        let model = weights::load_dir(&dir, &candle_core::Device::Cpu, false)
            .with_context(|| format!("model '{}': loading {src}", ctx.name))?;
        weights::export(&model, Some(&dir), ctx.out_dir)?;
        if ctx.out_dir.join(layout::TOKENIZER_JSON).is_file() {
            crate::data::tokenize::TextTokenizer::from_dir(ctx.out_dir)
                .with_context(|| format!("model '{}': the tokenizer of {src} does not load", ctx.name))?;
        }
        let mut metrics = serde_json::Map::new();
        metrics.insert("source".into(), json!(src));
        metrics.insert("params".into(), json!(model.config().num_params()));
        Ok(StageOutcome { metrics })
    }
}
