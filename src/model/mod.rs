//! The MiniMind decoder in candle: config and presets, layers, MoE, LoRA hooks, KV cache,
//! generation, and weights I/O with Qwen3 key names.
//!
//! Layout conventions: activations are `[B, T, C]`; attention works on `[B, T, heads, D]` without
//! transposes; weights use PyTorch's `[out, in]` layout so checkpoints load unchanged.

pub mod config;
pub mod generate;
pub mod kv_cache;
mod layers;
pub mod linear;
pub mod lora;
pub mod ops;
pub mod packed;
pub mod reward;
pub mod rope;
pub mod sampling;
mod vb;
pub mod weights;

pub use config::{preset, ModelConfig};
pub use kv_cache::KvCache;
pub use packed::DocPositions;

use candle_core::{DType, Device, Result, Tensor, Var};
use layers::{Block, Ctx};
use linear::Linear;
use rand::SeedableRng;
use rope::RopeTables;
use std::collections::HashMap;
use vb::{Source, Weights};

/// How a parameter is initialised (spec §3.6: Linear/Embedding ~ N(0, 0.02), norms = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// N(0, 0.02).
    Normal,
    /// All ones.
    Ones,
}

/// Every trainable tensor of a config in a stable order, with its Qwen3 key name and shape.
/// With tied embeddings `lm_head.weight` is absent (the embedding is the head). Derived from the
/// same walk that builds the model, so it cannot disagree with it.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let mut w = Weights::new(Source::Specs, &Device::Cpu, false);
    Parts::walk(cfg, &mut w).expect("walking a config allocates nothing and cannot fail");
    w.specs.into_iter().map(|s| (s.name, s.shape, s.init)).collect()
}

/// Errors building a model from weights.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// A tensor the config needs is absent.
    #[error("weights are missing {count} tensor(s) the config needs, e.g. `{first}`; is config.json the one these weights were saved with?")]
    Missing {
        /// How many.
        count: usize,
        /// The first one.
        first: String,
    },
    /// Extra tensors nobody reads (strict loading, like the reference's eval).
    #[error("weights contain {count} tensor(s) this config does not use, e.g. `{first}` (LoRA adapters and MoE/dense mismatches show up here)")]
    Unexpected {
        /// How many.
        count: usize,
        /// The first one.
        first: String,
    },
    /// Shape mismatch.
    #[error("tensor `{name}` has shape {got:?} but the config needs {want:?}")]
    Shape {
        /// Key.
        name: String,
        /// On disk.
        got: Vec<usize>,
        /// From the config.
        want: Vec<usize>,
    },
    /// A compute dtype the model does not support.
    #[error("compute dtype {0:?} is not supported: use f32, or bf16 for mixed precision (f16 would need loss scaling, which mmrun does not do)")]
    ComputeDtype(DType),
    /// Config inconsistency.
    #[error(transparent)]
    Config(#[from] config::HfConfigError),
    /// Candle failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The weights of a decoder, built by one walk over the Qwen3 key space.
struct Parts {
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Option<Linear>,
}

impl Parts {
    fn walk(cfg: &ModelConfig, w: &mut Weights) -> Result<Self> {
        let mut vb = w.root();
        let mut model = vb.pp("model");
        let (v, c) = (cfg.vocab_size, cfg.hidden_size);
        let embed = model.pp("embed_tokens").get("weight", &[v, c], Init::Normal)?;
        let mut layers = model.pp("layers");
        let blocks = (0..cfg.num_hidden_layers).map(|l| Block::new(cfg, l, layers.pp(l))).collect::<Result<_>>()?;
        let norm = model.pp("norm").norm(c)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(vb.pp("lm_head").linear(v, c)?) };
        Ok(Self { embed, blocks, norm, lm_head })
    }
}

/// The MiniMind / Qwen3 decoder.
pub struct MiniMind {
    cfg: ModelConfig,
    device: Device,
    embed: Tensor,
    lm_head: Option<Linear>,
    blocks: Vec<Block>,
    norm: Tensor,
    rope: RopeTables,
    params: Vec<(String, Var)>,
    /// Every weight by key name in walk order (the same tensors the layers hold).
    tensors: Vec<(String, Tensor)>,
    compute_dtype: DType,
    /// Set with bf16 on the CPU: every matmul of the linear layers and the head runs through the
    /// bf16 kernel (`ops::linear_bf16`) while activations stay f32; this caches the tied head's
    /// packing (an untied head is a [`Linear`] with its own).
    cpu_bf16_head: Option<ops::linear_bf16::WeightCache>,
    /// The tied head `embed^T` stored `[C, V]` contiguous, set by [`Self::prepare_for_decoding`].
    head_t: Option<Tensor>,
}

/// Box-Muller standard normals from a seeded ChaCha stream (candle's CPU RNG cannot be seeded).
pub(crate) fn normal_vec(rng: &mut rand_chacha::ChaCha8Rng, n: usize, std: f32) -> Vec<f32> {
    use rand::Rng;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let a = 2.0 * std::f64::consts::PI * u2;
        out.push((r * a.cos()) as f32 * std);
        if out.len() < n {
            out.push((r * a.sin()) as f32 * std);
        }
    }
    out
}

impl MiniMind {
    /// A freshly initialised, fully trainable model (N(0, 0.02) / ones, from `seed`).
    pub fn new(cfg: &ModelConfig, seed: u64, device: &Device) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        let rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        Self::build(cfg, Weights::new(Source::Init(Box::new(rng)), device, true))
    }

    /// Build from named tensors (Qwen3 keys; any float dtype, converted to f32 on `device`).
    /// `trainable` wraps every tensor in a `Var` (listed by [`Self::params`]); otherwise the
    /// weights are frozen plain tensors (inference, or a frozen base for LoRA). With tied
    /// embeddings a redundant `lm_head.weight` (the reference's `.pth` has both) is accepted and
    /// ignored; other unknown keys are an error.
    pub fn from_tensors(
        cfg: &ModelConfig,
        mut tensors: HashMap<String, Tensor>,
        device: &Device,
        trainable: bool,
    ) -> std::result::Result<Self, ModelError> {
        cfg.validate()?;
        if cfg.tie_word_embeddings {
            if !tensors.contains_key("model.embed_tokens.weight") {
                if let Some(h) = tensors.remove("lm_head.weight") {
                    tensors.insert("model.embed_tokens.weight".into(), h);
                }
            }
            tensors.remove("lm_head.weight");
        }
        Self::build(cfg, Weights::new(Source::Tensors(tensors), device, trainable))
    }

    fn build(cfg: &ModelConfig, mut w: Weights) -> std::result::Result<Self, ModelError> {
        let Parts { embed, blocks, norm, lm_head } = Parts::walk(cfg, &mut w)?;
        let w = w.finish()?;
        Ok(Self {
            cfg: cfg.clone(),
            device: w.device().clone(),
            embed,
            lm_head,
            blocks,
            norm,
            rope: RopeTables::new(cfg),
            params: w.params,
            tensors: w.tensors,
            compute_dtype: DType::F32,
            cpu_bf16_head: None,
            head_t: None,
        })
    }

    /// The config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The dtype matmuls and the activations between them run in: f32 (the default) or bf16.
    pub fn compute_dtype(&self) -> DType {
        self.compute_dtype
    }

    /// Choose the compute dtype (mixed precision when bf16). Weights stay what they are (f32
    /// `Var`s for training, so gradients and optimizer state stay f32); the residual stream,
    /// RMSNorm, RoPE, the attention softmax, the MoE router and the logits stay f32, like PyTorch
    /// autocast.
    ///
    /// On the CPU, bf16 means the linear layers and the head multiply through the bf16 GEMM
    /// (`ops::linear_bf16`: operands rounded to bf16, f32 accumulation, forward and backward;
    /// `VDPBF16PS` where it outruns f32 FMAs), with each weight packed once per optimizer step;
    /// the activations between ops stay f32, so the fused f32 kernels keep running. On other
    /// devices the activations between matmuls are bf16 and the weights are cast at use.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> std::result::Result<(), ModelError> {
        match dtype {
            DType::F32 | DType::BF16 => {
                self.compute_dtype = dtype;
                let cpu_bf16 = dtype == DType::BF16 && self.device.is_cpu();
                for lin in self.blocks.iter_mut().flat_map(Block::linears_mut).chain(self.lm_head.as_mut()) {
                    lin.set_cpu_bf16(cpu_bf16);
                }
                self.cpu_bf16_head = cpu_bf16.then(Default::default);
                Ok(())
            }
            other => Err(ModelError::ComputeDtype(other)),
        }
    }

    /// The dtype of the activations that flow into the matmuls: the compute dtype, except for
    /// bf16 on the CPU, where the bf16 kernel takes f32 activations and rounds them itself.
    fn activation_dtype(&self) -> DType {
        if self.cpu_bf16_head.is_some() {
            DType::F32
        } else {
            self.compute_dtype
        }
    }

    /// Trainable parameters in a stable order with Qwen3 key names (empty for a frozen model).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Every weight by Qwen3 key name (tied: only `model.embed_tokens.weight`), for saving.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        self.tensors.clone()
    }

    /// Final hidden states `[B, T, C]` (after the final norm) and the summed MoE aux loss (a
    /// scalar; 0 for dense models or when `train` is false, as in the reference's eval mode).
    ///
    /// `start_pos` is the number of positions already in `cache` (RoPE positions are
    /// `start_pos..start_pos+T`, spec §3.2 — left padding shifts them, like the reference).
    /// `key_mask: [B, P+T]` (1 = real token) masks padded keys.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        cache: Option<&mut KvCache>,
        start_pos: usize,
        key_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_inner(input_ids, cache, start_pos, key_mask, None, train)
    }

    /// [`Self::forward_hidden`] of a full pass over rows that may pack several documents: with
    /// `docs`, every document is computed as if alone in its row (its own RoPE positions from 0,
    /// attention only within it). `None` is the plain causal pass.
    pub fn forward_hidden_packed(
        &self,
        input_ids: &Tensor,
        docs: Option<&DocPositions>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_inner(input_ids, None, 0, None, docs, train)
    }

    fn forward_inner(
        &self,
        input_ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        start_pos: usize,
        key_mask: Option<&Tensor>,
        docs: Option<&DocPositions>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t) = input_ids.dims2()?;
        let dtype = self.activation_dtype();
        let cpu_bf16 = self.cpu_bf16_head.is_some();
        let ctx = Ctx { cfg: &self.cfg, rope: &self.rope, start_pos, key_mask, docs, dtype, cpu_bf16, train, b, t };
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed.index_select(&ids, 0)?; // [N, C]
        let mut aux = Tensor::zeros((), DType::F32, &self.device)?;
        for blk in &self.blocks {
            let (y, a) = blk.forward(&x, &ctx, cache.as_deref_mut())?;
            x = y;
            if let Some(a) = a {
                aux = (aux + a)?;
            }
        }
        let x = ops::rms_norm(&x, &self.norm, self.cfg.rms_norm_eps)?;
        Ok((x.reshape((b, t, self.cfg.hidden_size))?, aux))
    }

    /// LM head on hidden states `[.., C]` → logits `[.., V]`, always f32 (the matmul runs in the
    /// compute dtype; log-softmax, cross-entropy and sampling downstream want f32).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let c = *dims.last().expect("rank >= 1");
        let n = hidden.elem_count() / c;
        let dt = self.activation_dtype();
        let h2 = hidden.reshape((n, c))?.to_dtype(dt)?;
        let out = match (&self.lm_head, &self.head_t, &self.cpu_bf16_head) {
            (Some(l), _, _) => l.forward(&h2)?,
            (None, _, Some(cache)) => ops::linear_bf16::linear(&h2, &self.embed, cache)?,
            (None, Some(t), None) if t.dtype() == dt => h2.matmul(t)?,
            (None, _, None) => h2.matmul(&self.embed.to_dtype(dt)?.t()?)?,
        }
        .to_dtype(DType::F32)?;
        let mut od = dims;
        *od.last_mut().expect("rank >= 1") = self.cfg.vocab_size;
        out.reshape(od)
    }

    /// Full-sequence logits `[B, T, V]` (eval mode: no cache, aux loss not computed).
    pub fn forward_logits(&self, input_ids: &Tensor, key_mask: Option<&Tensor>) -> Result<Tensor> {
        let (h, _) = self.forward_hidden(input_ids, None, 0, key_mask, false)?;
        self.logits(&h)
    }

    /// Training forward: returns `(loss, aux_loss)` as scalars. `labels: [B, T]` (i64, −100 =
    /// ignore) are aligned with `input_ids`, and the shift happens here like the reference
    /// (position t predicts `labels[t+1]`; spec §3.6). `loss` is the mean cross-entropy over
    /// non-ignored targets; the caller adds `aux_loss` (summed MoE load-balancing loss, 0 for
    /// dense) to it.
    pub fn forward_train(&self, input_ids: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
        self.forward_train_packed(input_ids, labels, None)
    }

    /// [`Self::forward_train`] on rows that may pack several documents (see
    /// [`Self::forward_hidden_packed`]). The labels must already ignore the first token of each
    /// document after the first (it is not predicted from the previous document).
    pub fn forward_train_packed(
        &self,
        input_ids: &Tensor,
        labels: &Tensor,
        docs: Option<&DocPositions>,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t) = input_ids.dims2()?;
        let (h, aux) = self.forward_hidden_packed(input_ids, docs, true)?;
        let h = h.reshape((b * t, self.cfg.hidden_size))?;
        let shifted = shift_labels(labels)?;
        // Only positions with a target go through the head: the others (padding, masked prompts,
        // each row's last position) add nothing to the loss or the gradients, and the head with
        // its cross-entropy over the vocabulary is the costliest part of a small model's step.
        let targets: Vec<u32> =
            shifted.to_vec1::<i64>()?.iter().enumerate().filter(|(_, &l)| l >= 0).map(|(i, _)| i as u32).collect();
        let (h, shifted) = if targets.is_empty() || targets.len() == b * t {
            (h, shifted)
        } else {
            let n = targets.len();
            let at = Tensor::from_vec(targets, n, h.device())?;
            (h.index_select(&at, 0)?, shifted.index_select(&at, 0)?)
        };
        let logits = self.logits(&h)?;
        let loss = ops::cross_entropy(&logits, &shifted)?;
        Ok((loss, aux))
    }

    /// Incremental decoding step: runs `input_ids: [B, T]` (the tokens not yet in `cache`) at
    /// positions `start_pos..` (normally `cache.len()`), appends their keys/values to `cache`, and
    /// returns the logits of the last position, `[B, V]`.
    pub fn forward_step(&self, input_ids: &Tensor, cache: &mut KvCache, start_pos: usize) -> Result<Tensor> {
        self.forward_step_masked(input_ids, cache, start_pos, None)
    }

    /// [`Self::forward_step`] with a key-padding mask `[B, start_pos + T]` (1 = real token) for
    /// batched prompts of different lengths (left padding).
    pub fn forward_step_masked(
        &self,
        input_ids: &Tensor,
        cache: &mut KvCache,
        start_pos: usize,
        key_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (_, t) = input_ids.dims2()?;
        let (h, _) = self.forward_hidden(input_ids, Some(cache), start_pos, key_mask, false)?;
        self.logits(&h.narrow(1, t - 1, 1)?.squeeze(1)?)
    }

    /// Lay the weights of a frozen model out for decoding: each linear weight is stored transposed
    /// (`[in, out]` contiguous, still seen as `[out, in]`), and a tied head gets a `[C, V]` copy.
    /// Why: candle's matmul with a transposed *view* of an `[out, in]` weight is fast for one row
    /// but 3–5× slower for 2–16 rows (measured at 512×6400: 0.9 ms for one row; 2.7 ms strided vs
    /// 0.55 ms contiguous for two), which is what batched decoding runs every step. The values are
    /// unchanged. A trainable model is left as is (its weights are `Var`s the optimizer updates).
    pub fn prepare_for_decoding(&mut self) -> Result<()> {
        if !self.params.is_empty() {
            return Ok(());
        }
        for lin in self.blocks.iter_mut().flat_map(Block::linears_mut).chain(self.lm_head.as_mut()) {
            lin.weight = lin.weight.t()?.contiguous()?.t()?;
        }
        if self.lm_head.is_none() {
            self.head_t = Some(self.embed.t()?.contiguous()?);
        }
        Ok(())
    }

    /// Every linear layer (each knows its module path, `model.layers.N.self_attn.q_proj`, ...),
    /// mutably; the MoE routers and the LM head are not included (LoRA adapts neither).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        self.blocks.iter_mut().flat_map(Block::linears_mut).collect()
    }

    /// Fold the adapters into the base weights (`W <- W + B A`) and drop them. Trainable base
    /// weights are updated in place; frozen ones are replaced (here and in the named list).
    pub fn merge_lora(&mut self) -> Result<()> {
        let params: HashMap<String, Var> = self.params.iter().cloned().collect();
        let mut replaced = HashMap::new();
        for lin in self.blocks.iter_mut().flat_map(Block::linears_mut) {
            if let Some(l) = lin.lora.take() {
                let merged = (&lin.weight + (l.b.matmul(&l.a)? * l.scale)?)?;
                let name = format!("{}.weight", lin.path);
                match params.get(&name) {
                    Some(var) => var.set(&merged)?,
                    None => {
                        lin.weight = merged.clone();
                        replaced.insert(name, merged);
                    }
                }
            }
        }
        for (name, t) in &mut self.tensors {
            if let Some(m) = replaced.remove(name.as_str()) {
                *t = m;
            }
        }
        ops::linear_bf16::weights_changed();
        Ok(())
    }

    /// A fresh KV cache sized for this model: bf16 for a bf16 model on the CPU (half the bytes a
    /// decode step reads; the attention reads it in place, in f32 arithmetic), else storing what
    /// the layers produce.
    pub fn new_cache(&self) -> KvCache {
        if self.cpu_bf16_head.is_some() {
            KvCache::with_dtype(self.cfg.num_hidden_layers, DType::BF16)
        } else {
            KvCache::new(self.cfg.num_hidden_layers)
        }
    }
}

/// `labels[:, 1:]` followed by −100: the target of position t is the label of t+1. Returns `[B*T]`.
pub fn shift_labels(labels: &Tensor) -> Result<Tensor> {
    let (b, t) = labels.dims2()?;
    let lv: Vec<i64> = labels.to_dtype(DType::I64)?.flatten_all()?.to_vec1()?;
    let mut out = vec![-100i64; b * t];
    for r in 0..b {
        for i in 0..t.saturating_sub(1) {
            out[r * t + i] = lv[r * t + i + 1];
        }
    }
    Tensor::from_vec(out, b * t, labels.device())
}

#[cfg(test)]
mod tests;
