//! The MiniMind decoder in candle: config and presets, layers, MoE, LoRA hooks, KV cache,
//! generation, and weights I/O with Qwen3 key names.
//!
//! Layout conventions: activations are `[B, T, C]`; attention works on `[B, T, heads, D]` without
//! transposes; weights use PyTorch's `[out, in]` layout so checkpoints load unchanged.

pub mod config;
pub mod generate;
pub mod kv_cache;
pub mod linear;
pub mod lora;
pub mod ops;
pub mod rope;
pub mod sampling;
pub mod weights;

pub use config::{preset, ModelConfig};
pub use kv_cache::KvCache;

use candle_core::{DType, Device, Result, Tensor, Var, D};
use linear::Linear;
use rand::SeedableRng;
use rope::RopeTables;
use std::collections::HashMap;

/// How a parameter is initialised (spec §3.6: Linear/Embedding ~ N(0, 0.02), norms = 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Init {
    /// N(0, 0.02).
    Normal,
    /// All ones.
    Ones,
}

/// Every trainable tensor of a config in a stable order, with its Qwen3 key name and shape.
/// With tied embeddings `lm_head.weight` is absent (the embedding is the head).
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (c, d, h, kh) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![cfg.vocab_size, c], Init::Normal)];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        v.push((format!("{p}.self_attn.q_proj.weight"), vec![h * d, c], Init::Normal));
        v.push((format!("{p}.self_attn.k_proj.weight"), vec![kh * d, c], Init::Normal));
        v.push((format!("{p}.self_attn.v_proj.weight"), vec![kh * d, c], Init::Normal));
        v.push((format!("{p}.self_attn.o_proj.weight"), vec![c, h * d], Init::Normal));
        v.push((format!("{p}.self_attn.q_norm.weight"), vec![d], Init::Ones));
        v.push((format!("{p}.self_attn.k_norm.weight"), vec![d], Init::Ones));
        v.push((format!("{p}.input_layernorm.weight"), vec![c], Init::Ones));
        v.push((format!("{p}.post_attention_layernorm.weight"), vec![c], Init::Ones));
        let ffn = |v: &mut Vec<_>, q: &str, i: usize| {
            v.push((format!("{q}.gate_proj.weight"), vec![i, c], Init::Normal));
            v.push((format!("{q}.up_proj.weight"), vec![i, c], Init::Normal));
            v.push((format!("{q}.down_proj.weight"), vec![c, i], Init::Normal));
        };
        if cfg.use_moe {
            v.push((format!("{p}.mlp.gate.weight"), vec![cfg.num_experts, c], Init::Normal));
            for e in 0..cfg.num_experts {
                ffn(&mut v, &format!("{p}.mlp.experts.{e}"), cfg.moe_intermediate_size);
            }
        } else {
            ffn(&mut v, &format!("{p}.mlp"), cfg.intermediate_size);
        }
    }
    v.push(("model.norm.weight".to_string(), vec![c], Init::Ones));
    if !cfg.tie_word_embeddings {
        v.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, c], Init::Normal));
    }
    v
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

struct SwiGlu {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl SwiGlu {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let u = self.up.forward(x)?;
        self.down.forward(&ops::swiglu(&g, &u)?)
    }
}

struct Moe {
    router: Linear,
    experts: Vec<SwiGlu>,
}

enum Mlp {
    Dense(SwiGlu),
    Moe(Moe),
}

struct Block {
    input_ln: Tensor,
    post_ln: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
    mlp: Mlp,
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
    compute_dtype: DType,
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
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut map = HashMap::new();
        for (name, shape, init) in param_specs(cfg) {
            let n: usize = shape.iter().product();
            let data = match init {
                Init::Normal => normal_vec(&mut rng, n, 0.02),
                Init::Ones => vec![1.0f32; n],
            };
            map.insert(name, Tensor::from_vec(data, shape, device)?);
        }
        Self::from_tensors(cfg, map, device, true)
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
        let specs = param_specs(cfg);
        let missing: Vec<&String> = specs.iter().map(|s| &s.0).filter(|n| !tensors.contains_key(*n)).collect();
        if let Some(first) = missing.first() {
            return Err(ModelError::Missing { count: missing.len(), first: first.to_string() });
        }
        let known: std::collections::HashSet<&str> = specs.iter().map(|s| s.0.as_str()).collect();
        let mut extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k.as_str())).collect();
        extra.sort();
        if let Some(first) = extra.first() {
            return Err(ModelError::Unexpected { count: extra.len(), first: first.to_string() });
        }
        let mut params = Vec::new();
        let mut ready: HashMap<String, Tensor> = HashMap::new();
        for (name, shape, _) in &specs {
            let t = tensors.remove(name).expect("checked above");
            if t.dims() != shape.as_slice() {
                return Err(ModelError::Shape { name: name.clone(), got: t.dims().to_vec(), want: shape.clone() });
            }
            let t = t.to_dtype(DType::F32)?.to_device(device)?;
            let t = if trainable {
                let var = Var::from_tensor(&t)?;
                let t = var.as_tensor().clone();
                params.push((name.clone(), var));
                t
            } else {
                t
            };
            ready.insert(name.clone(), t);
        }
        let mut take = |n: &str| ready.remove(n).expect("spec key");
        let lin = |t: Tensor| Linear::new(t);
        let embed = take("model.embed_tokens.weight");
        let mut blocks = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut ffn = |q: &str| SwiGlu {
                gate: lin(take(&format!("{q}.gate_proj.weight"))),
                up: lin(take(&format!("{q}.up_proj.weight"))),
                down: lin(take(&format!("{q}.down_proj.weight"))),
            };
            let mlp = if cfg.use_moe {
                let experts = (0..cfg.num_experts).map(|e| ffn(&format!("{p}.mlp.experts.{e}"))).collect();
                Mlp::Moe(Moe { router: lin(take(&format!("{p}.mlp.gate.weight"))), experts })
            } else {
                Mlp::Dense(ffn(&format!("{p}.mlp")))
            };
            blocks.push(Block {
                q: lin(take(&format!("{p}.self_attn.q_proj.weight"))),
                k: lin(take(&format!("{p}.self_attn.k_proj.weight"))),
                v: lin(take(&format!("{p}.self_attn.v_proj.weight"))),
                o: lin(take(&format!("{p}.self_attn.o_proj.weight"))),
                q_norm: take(&format!("{p}.self_attn.q_norm.weight")),
                k_norm: take(&format!("{p}.self_attn.k_norm.weight")),
                input_ln: take(&format!("{p}.input_layernorm.weight")),
                post_ln: take(&format!("{p}.post_attention_layernorm.weight")),
                mlp,
            });
        }
        let norm = take("model.norm.weight");
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(lin(take("lm_head.weight"))) };
        Ok(Self {
            cfg: cfg.clone(),
            device: device.clone(),
            embed,
            lm_head,
            blocks,
            norm,
            rope: RopeTables::new(cfg),
            params,
            compute_dtype: DType::F32,
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
    /// `Var`s for training, so gradients and optimizer state stay f32) and are cast at use; the
    /// residual stream, RMSNorm, RoPE, the attention softmax, the MoE router and the logits stay
    /// f32, like PyTorch autocast. In bf16 the fused CPU kernels (f32-only) are bypassed wherever
    /// a tensor is bf16, and the composite ops run instead.
    pub fn set_compute_dtype(&mut self, dtype: DType) -> std::result::Result<(), ModelError> {
        match dtype {
            DType::F32 | DType::BF16 => {
                self.compute_dtype = dtype;
                Ok(())
            }
            other => Err(ModelError::ComputeDtype(other)),
        }
    }

    /// Trainable parameters in a stable order with Qwen3 key names (empty for a frozen model).
    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// Every weight by Qwen3 key name (tied: only `model.embed_tokens.weight`), for saving.
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("model.embed_tokens.weight".to_string(), self.embed.clone())];
        for (l, b) in self.blocks.iter().enumerate() {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.self_attn.q_proj.weight"), b.q.weight.clone()));
            v.push((format!("{p}.self_attn.k_proj.weight"), b.k.weight.clone()));
            v.push((format!("{p}.self_attn.v_proj.weight"), b.v.weight.clone()));
            v.push((format!("{p}.self_attn.o_proj.weight"), b.o.weight.clone()));
            v.push((format!("{p}.self_attn.q_norm.weight"), b.q_norm.clone()));
            v.push((format!("{p}.self_attn.k_norm.weight"), b.k_norm.clone()));
            v.push((format!("{p}.input_layernorm.weight"), b.input_ln.clone()));
            v.push((format!("{p}.post_attention_layernorm.weight"), b.post_ln.clone()));
            let ffn = |v: &mut Vec<(String, Tensor)>, q: String, f: &SwiGlu| {
                v.push((format!("{q}.gate_proj.weight"), f.gate.weight.clone()));
                v.push((format!("{q}.up_proj.weight"), f.up.weight.clone()));
                v.push((format!("{q}.down_proj.weight"), f.down.weight.clone()));
            };
            match &b.mlp {
                Mlp::Dense(f) => ffn(&mut v, format!("{p}.mlp"), f),
                Mlp::Moe(m) => {
                    v.push((format!("{p}.mlp.gate.weight"), m.router.weight.clone()));
                    for (e, f) in m.experts.iter().enumerate() {
                        ffn(&mut v, format!("{p}.mlp.experts.{e}"), f);
                    }
                }
            }
        }
        v.push(("model.norm.weight".to_string(), self.norm.clone()));
        if let Some(h) = &self.lm_head {
            v.push(("lm_head.weight".to_string(), h.weight.clone()));
        }
        v
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
        mut cache: Option<&mut KvCache>,
        start_pos: usize,
        key_mask: Option<&Tensor>,
        train: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (b, t) = input_ids.dims2()?;
        let cfg = &self.cfg;
        let (c, d, h, kh) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let eps = cfg.rms_norm_eps;
        // Mixed precision (see `set_compute_dtype`): `x`, the residual stream, stays f32; what
        // goes into a matmul is cast to `cd` and what comes out is cast back. For f32 every
        // `to_dtype` below is a no-op, so the f32 path is exactly the plain one.
        let (cd, f32) = (self.compute_dtype, DType::F32);
        let ids = input_ids.to_dtype(DType::U32)?.flatten_all()?;
        let mut x = self.embed.index_select(&ids, 0)?; // [N, C]
        let mut aux = Tensor::zeros((), DType::F32, &self.device)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            // Attention.
            let hn = ops::rms_norm(&x, &blk.input_ln, eps)?.to_dtype(cd)?;
            let q = blk.q.forward(&hn)?.reshape((b, t, h, d))?.to_dtype(f32)?;
            let k = blk.k.forward(&hn)?.reshape((b, t, kh, d))?.to_dtype(f32)?;
            let v = blk.v.forward(&hn)?.reshape((b, t, kh, d))?;
            // q/k norms and RoPE in f32: the rotation of bf16 values by bf16 tables loses the
            // position signal at long range.
            let q = ops::rope(&ops::rms_norm(&q, &blk.q_norm, eps)?, &self.rope, start_pos)?.to_dtype(cd)?;
            let k = ops::rope(&ops::rms_norm(&k, &blk.k_norm, eps)?, &self.rope, start_pos)?.to_dtype(cd)?;
            let (k, v) = match cache.as_deref_mut() {
                Some(cache) => cache.append(l, &k, &v)?,
                None => (k, v),
            };
            // The attention softmax itself runs in f32 inside `ops::attention` for every dtype.
            let o = ops::attention(&q, &k, &v, key_mask)?.reshape((b * t, h * d))?;
            x = (x + blk.o.forward(&o)?.to_dtype(f32)?)?;
            // Feed-forward.
            let hn = ops::rms_norm(&x, &blk.post_ln, eps)?.to_dtype(cd)?;
            let y = match &blk.mlp {
                Mlp::Dense(f) => f.forward(&hn)?,
                Mlp::Moe(m) => {
                    let (y, a) = self.moe_forward(m, &hn, train)?;
                    aux = (aux + a)?;
                    y
                }
            };
            x = (x + y.to_dtype(f32)?)?;
        }
        let x = ops::rms_norm(&x, &self.norm, eps)?;
        Ok((x.reshape((b, t, c))?, aux))
    }

    /// MoE FFN (spec §4) on `x: [N, C]`: softmax router, top-k, optional renormalisation,
    /// per-expert dispatch, and the load-balancing aux loss when training.
    fn moe_forward(&self, m: &Moe, x: &Tensor, train: bool) -> Result<(Tensor, Tensor)> {
        let cfg = &self.cfg;
        let (n, c) = x.dims2()?;
        let (e_n, k) = (cfg.num_experts, cfg.num_experts_per_tok);
        // The router in f32 (logits and softmax): top-k picks are discontinuous, and bf16 logits
        // would flip near-ties between experts.
        let probs = ops::softmax_last(&m.router.forward(&x.to_dtype(DType::F32)?)?)?; // [N, E]
        let pv: Vec<Vec<f32>> = probs.to_vec2()?;
        let mut idx = Vec::with_capacity(n * k);
        for row in &pv {
            let mut order: Vec<usize> = (0..e_n).collect();
            // Stable sort: ties keep the lower expert index, like torch.topk in practice.
            order.sort_by(|&a, &b| row[b].partial_cmp(&row[a]).unwrap_or(std::cmp::Ordering::Equal));
            idx.extend(order[..k].iter().map(|&e| e as u32));
        }
        let idx_t = Tensor::from_vec(idx.clone(), (n, k), x.device())?;
        let mut topw = probs.gather(&idx_t, 1)?; // [N, k]
        if cfg.norm_topk_prob {
            topw = topw.broadcast_div(&(topw.sum_keepdim(D::Minus1)? + 1e-20)?)?;
        }
        let topw_flat = topw.flatten_all()?.to_dtype(x.dtype())?;
        let mut out = Tensor::zeros((n, c), x.dtype(), x.device())?;
        let mut counts = vec![0f32; e_n];
        for (e, expert) in m.experts.iter().enumerate() {
            let mut rows = Vec::new();
            let mut slots = Vec::new();
            for (i, &ei) in idx.iter().enumerate() {
                if ei as usize == e {
                    rows.push((i / k) as u32);
                    slots.push(i as u32);
                }
            }
            counts[e] = rows.len() as f32;
            if rows.is_empty() {
                continue;
            }
            let rows_t = Tensor::from_vec(rows.clone(), rows.len(), x.device())?;
            let slots_t = Tensor::from_vec(slots, rows.len(), x.device())?;
            let ye = expert.forward(&x.index_select(&rows_t, 0)?)?;
            let we = topw_flat.index_select(&slots_t, 0)?.unsqueeze(1)?;
            out = out.index_add(&rows_t, &ye.broadcast_mul(&we)?, 0)?;
        }
        let aux = if train && cfg.router_aux_loss_coef > 0.0 {
            // f[e] summed over the k slots = count_e / N; P = mean router probs.
            let f: Vec<f32> = counts.iter().map(|c| c / n as f32).collect();
            let f = Tensor::from_vec(f, e_n, x.device())?;
            let p = probs.mean(0)?;
            ((p * f)?.sum_all()? * (e_n as f64 * cfg.router_aux_loss_coef))?
        } else {
            Tensor::zeros((), DType::F32, x.device())?
        };
        Ok((out, aux))
    }

    /// LM head on hidden states `[.., C]` → logits `[.., V]`, always f32 (the matmul runs in the
    /// compute dtype; log-softmax, cross-entropy and sampling downstream want f32).
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let dims = hidden.dims().to_vec();
        let c = *dims.last().expect("rank >= 1");
        let n = hidden.elem_count() / c;
        let h2 = hidden.reshape((n, c))?.to_dtype(self.compute_dtype)?;
        let out = match &self.lm_head {
            Some(l) => l.forward(&h2)?,
            None => h2.matmul(&self.embed.to_dtype(self.compute_dtype)?.t()?)?,
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
        let (b, t) = input_ids.dims2()?;
        let (h, aux) = self.forward_hidden(input_ids, None, 0, None, true)?;
        let logits = self.logits(&h.reshape((b * t, self.cfg.hidden_size))?)?;
        let shifted = shift_labels(labels)?;
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

    /// Every linear layer by module path (`model.layers.N.self_attn.q_proj`, ...), mutably.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut v = Vec::new();
        for (l, b) in self.blocks.iter_mut().enumerate() {
            let p = format!("model.layers.{l}");
            v.push((format!("{p}.self_attn.q_proj"), &mut b.q));
            v.push((format!("{p}.self_attn.k_proj"), &mut b.k));
            v.push((format!("{p}.self_attn.v_proj"), &mut b.v));
            v.push((format!("{p}.self_attn.o_proj"), &mut b.o));
            let ffns: Vec<(String, &mut SwiGlu)> = match &mut b.mlp {
                Mlp::Dense(f) => vec![(format!("{p}.mlp"), f)],
                Mlp::Moe(m) => {
                    m.experts.iter_mut().enumerate().map(|(e, f)| (format!("{p}.mlp.experts.{e}"), f)).collect()
                }
            };
            for (q, f) in ffns {
                let SwiGlu { gate, up, down } = f;
                v.push((format!("{q}.gate_proj"), gate));
                v.push((format!("{q}.up_proj"), up));
                v.push((format!("{q}.down_proj"), down));
            }
        }
        v
    }

    /// Fold the adapters into the base weights (`W <- W + B A`) and drop them. Trainable base
    /// weights are updated in place; frozen ones are replaced.
    pub fn merge_lora(&mut self) -> Result<()> {
        let params: HashMap<String, Var> = self.params.iter().cloned().collect();
        for (name, lin) in self.linears_mut() {
            if let Some(l) = lin.lora.take() {
                let merged = (&lin.weight + (l.b.matmul(&l.a)? * l.scale)?)?;
                match params.get(&format!("{name}.weight")) {
                    Some(var) => var.set(&merged)?,
                    None => lin.weight = merged,
                }
            }
        }
        Ok(())
    }

    /// A fresh KV cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.cfg.num_hidden_layers)
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
