//! Talking to trained models: find a model by reference, load it with its tokenizer and chat
//! template, render conversations, and generate through the batching [`engine`]; the model's
//! output is split into answer, reasoning and tool calls by [`parse`]. `mmrun chat` ([`chat`])
//! and `mmrun serve` (`crate::serve`) are thin front ends over this module.

pub mod chat;
pub mod engine;
pub mod parse;

use crate::data::read::Message;
use crate::data::tokenize::TextTokenizer;
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A model folder found from a reference, with the name clients use for it.
#[derive(Clone, Debug)]
pub struct ModelRef {
    /// The name shown to clients (`/v1/models`): the stage name, or the folder's name.
    pub name: String,
    /// A transformers-layout folder (`config.json`, `model.safetensors`, tokenizer files).
    pub dir: PathBuf,
}

/// Resolve a model reference: `<run>:<stage>` (a run directory name or unique prefix, and one of
/// its stages that produced a model) or a model folder.
pub fn resolve(reference: &str, runs_dir: &Path, home: &Path) -> anyhow::Result<ModelRef> {
    let as_dir = Path::new(reference);
    if as_dir.join(crate::artifact::layout::MODEL_CONFIG_JSON).is_file() {
        let name = as_dir
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| reference.to_string());
        return Ok(ModelRef { name, dir: as_dir.to_path_buf() });
    }
    let Some((run, stage)) = reference.rsplit_once(':') else {
        anyhow::bail!(
            "'{reference}' is neither a model folder (no config.json there) nor <run>:<stage>; \
             `mmrun show` lists the models of the last run"
        );
    };
    let found = crate::runs::find_run(runs_dir, run)?;
    let Some(st) = found.record.stage(stage) else {
        let names: Vec<&str> = found.record.stages.iter().map(|s| s.name.as_str()).collect();
        anyhow::bail!("run {} has no stage '{stage}' (it has: {})", found.record.id, names.join(", "));
    };
    let cache = crate::cache::Cache::open(home).with_context(|| format!("opening the cache {}", home.display()))?;
    let Some(art) = cache.object(&st.key) else {
        anyhow::bail!(
            "stage '{stage}' of run {} is not in the cache {} (removed by `mmrun gc`?); rerun the recipe to rebuild it",
            found.record.id,
            home.display()
        );
    };
    if !art.model_weights().is_file() {
        anyhow::bail!(
            "stage '{stage}' of run {} produced {}, not a model you can talk to",
            found.record.id,
            art.kind().describe()
        );
    }
    Ok(ModelRef { name: stage.to_string(), dir: art.dir })
}

/// A loaded model: weights plus tokenizer and chat template.
pub struct LoadedModel {
    /// Name shown to clients.
    pub name: String,
    /// Where it was loaded from.
    pub dir: PathBuf,
    /// The weights (moved into the engine).
    pub model: crate::model::MiniMind,
    /// Tokenizer and chat template, shared by the engine and the prompt renderers.
    pub tok: Arc<TextTokenizer>,
}

impl LoadedModel {
    /// Load a model folder on the CPU (generation runs in f32, like eval).
    pub fn load(r: &ModelRef) -> anyhow::Result<Self> {
        let model = crate::model::weights::load_dir(&r.dir, &candle_core::Device::Cpu, false)
            .with_context(|| format!("loading model '{}' from {}", r.name, r.dir.display()))?;
        let tok = TextTokenizer::from_dir(&r.dir)
            .with_context(|| format!("loading the tokenizer of '{}' from {}", r.name, r.dir.display()))?;
        Ok(Self { name: r.name.clone(), dir: r.dir.clone(), model, tok: Arc::new(tok) })
    }
}

/// What the engine needs to know about a model to build requests, without the weights.
#[derive(Clone)]
pub struct ModelInfo {
    /// Name shown to clients.
    pub name: String,
    /// Tokenizer and chat template.
    pub tok: Arc<TextTokenizer>,
    /// Position table size (prompt + answer must fit).
    pub max_positions: usize,
}

/// Start the engine for `models`; returns it with what callers need to render prompts.
pub fn start(
    models: Vec<LoadedModel>,
    limits: engine::EngineLimits,
) -> std::io::Result<(engine::Engine, Vec<ModelInfo>, std::thread::JoinHandle<()>)> {
    let infos = models
        .iter()
        .map(|m| ModelInfo {
            name: m.name.clone(),
            tok: m.tok.clone(),
            max_positions: m.model.config().max_position_embeddings,
        })
        .collect();
    let em = models.into_iter().map(|m| engine::EngineModel { model: m.model, tok: m.tok }).collect();
    let (engine, handle) = engine::spawn(em, limits)?;
    Ok((engine, infos, handle))
}

impl ModelInfo {
    /// The prompt for a conversation: the chat template with the generation prompt, `tools`
    /// offered, and an open `<think>` when `thinking`.
    pub fn chat_prompt(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        thinking: bool,
    ) -> anyhow::Result<Vec<u32>> {
        let text = self.tok.template.render(messages, tools, true, thinking)?;
        Ok(self.tok.encode(&text)?)
    }

    /// A raw completion prompt: BOS then the text, as eval's raw prompts.
    pub fn raw_prompt(&self, text: &str) -> anyhow::Result<Vec<u32>> {
        let mut ids = vec![self.tok.bos];
        ids.extend(self.tok.encode(text)?);
        Ok(ids)
    }

    /// Token ids that end an answer: the turn end (`<|im_end|>`) and `<|endoftext|>`.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut v = vec![self.tok.eos];
        if self.tok.pad != self.tok.eos {
            v.push(self.tok.pad);
        }
        v
    }
}
