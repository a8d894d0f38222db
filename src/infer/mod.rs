//! Talking to trained models: load a model (found by `crate::modelref`) with its tokenizer and chat
//! template, render conversations, and generate through the batching [`engine`]; the model's
//! output is split into answer, reasoning and tool calls by [`parse`]. `mmrun chat` ([`chat`])
//! and `mmrun serve` (`crate::serve`) are thin front ends over this module.

pub mod chat;
pub mod engine;
pub mod parse;
#[doc(hidden)]
pub mod testmodels;

use crate::data::read::Message;
use crate::data::tokenize::TextTokenizer;
use crate::recipe::Precision;
use anyhow::Context;
use std::path::PathBuf;
use std::sync::Arc;

/// A model folder found from a reference, with the name clients use for it.
#[derive(Clone, Debug)]
pub struct ModelRef {
    /// The name shown to clients (`/v1/models`): the stage name, the folder's or repository's name.
    pub name: String,
    /// A transformers-layout folder (`config.json`, `model.safetensors`, tokenizer files).
    pub dir: PathBuf,
}

impl ModelRef {
    /// The full model of a resolved reference (a LoRA stage needs `merge = true`), named after
    /// its stage, folder or repository.
    pub fn from_resolved(r: &crate::modelref::ResolvedModel) -> Result<Self, crate::modelref::ModelRefError> {
        use crate::modelref::Origin;
        let dir = r.text_model_dir("chat or serve")?.to_path_buf();
        let name = match &r.origin {
            Origin::Stage { stage, .. } | Origin::Run { stage, .. } => stage.clone(),
            Origin::Hub { repo_id, .. } => repo_id.rsplit('/').next().unwrap_or(repo_id).to_string(),
            Origin::Folder(p) => p
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| r.reference.clone()),
        };
        Ok(Self { name, dir })
    }
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
    /// Load a model folder on the CPU to generate in f32 (like eval).
    pub fn load(r: &ModelRef) -> anyhow::Result<Self> {
        Self::load_in(r, Precision::F32)
    }

    /// Load a model folder on the CPU to generate in `precision` (`auto` as a recipe resolves it
    /// on this CPU). bf16 decodes from bf16 weight rows with a bf16 KV cache, faster where decoding
    /// is bound by reading weights; the logits differ from f32 by bf16 rounding.
    pub fn load_in(r: &ModelRef, precision: Precision) -> anyhow::Result<Self> {
        let cpu = candle_core::Device::Cpu;
        let mut model = crate::model::weights::load_dir(&r.dir, &cpu, false)
            .with_context(|| format!("loading model '{}' from {}", r.name, r.dir.display()))?;
        match crate::train::device::compute_dtype(precision, &cpu) {
            candle_core::DType::F32 => model.prepare_for_decoding()?,
            dtype => model.set_compute_dtype(dtype)?,
        }
        let tok = TextTokenizer::from_dir(&r.dir)
            .with_context(|| format!("loading the tokenizer of '{}' from {}", r.name, r.dir.display()))?;
        Ok(Self { name: r.name.clone(), dir: r.dir.clone(), model, tok: Arc::new(tok) })
    }
}

/// `--precision` of `chat` and `serve`: `f32`, `bf16` or `auto`.
pub fn parse_precision(s: &str) -> Result<Precision, String> {
    match s {
        "f32" => Ok(Precision::F32),
        "bf16" => Ok(Precision::Bf16),
        "auto" => Ok(Precision::Auto),
        other => Err(format!("unknown precision '{other}': use f32, bf16 or auto")),
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
