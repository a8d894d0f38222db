//! The decoder's layers, each a `new(cfg, vb)` that names its weights once (see [`super::vb`]) and
//! a `forward`, as in candle-transformers' `qwen3.rs`: [`Mlp`] (SwiGLU), [`Moe`] (router + experts),
//! [`Attention`] (GQA with q/k norms and RoPE) and [`Block`] (pre-norm residual block).
//!
//! Mixed precision (see `MiniMind::set_compute_dtype`): the residual stream `x` stays f32; what
//! goes into a matmul is cast to the compute dtype and what comes out is cast back. For f32 every
//! `to_dtype` below is a no-op, so the f32 path is exactly the plain one.

use super::linear::Linear;
use super::ops;
use super::packed::DocPositions;
use super::rope::RopeTables;
use super::vb::Vb;
use super::{KvCache, ModelConfig};
use candle_core::{DType, Result, Tensor, D};

/// What every layer's forward needs besides its input.
pub(crate) struct Ctx<'a> {
    /// The model's config.
    pub cfg: &'a ModelConfig,
    /// RoPE tables.
    pub rope: &'a RopeTables,
    /// Positions already in the cache (RoPE positions start here).
    pub start_pos: usize,
    /// `[B, P+T]`, 1 = real token.
    pub key_mask: Option<&'a Tensor>,
    /// Packed rows: per-document positions and attention (no cache then).
    pub docs: Option<&'a DocPositions>,
    /// Compute dtype of the matmuls.
    pub dtype: DType,
    /// bf16 mixed precision on the CPU: activations f32, matmul operands rounded to bf16 by the
    /// kernels (the linear layers' and the attention's).
    pub cpu_bf16: bool,
    /// Training mode (the MoE aux loss is computed only then).
    pub train: bool,
    /// Batch and time of the input.
    pub b: usize,
    /// Time.
    pub t: usize,
}

/// SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`.
pub(crate) struct Mlp {
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Mlp {
    pub fn new(cfg: &ModelConfig, intermediate: usize, mut vb: Vb) -> Result<Self> {
        let c = cfg.hidden_size;
        Ok(Self {
            gate: vb.pp("gate_proj").linear(intermediate, c)?,
            up: vb.pp("up_proj").linear(intermediate, c)?,
            down: vb.pp("down_proj").linear(c, intermediate)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate.forward(x)?;
        let u = self.up.forward(x)?;
        self.down.forward(&ops::swiglu(&g, &u)?)
    }

    fn linears_mut(&mut self) -> [&mut Linear; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }
}

/// Mixture of experts (spec §4): softmax router, top-k, optional renormalisation, per-expert
/// dispatch, and the load-balancing aux loss when training.
pub(crate) struct Moe {
    router: Linear,
    experts: Vec<Mlp>,
}

impl Moe {
    pub fn new(cfg: &ModelConfig, mut vb: Vb) -> Result<Self> {
        let router = vb.pp("gate").linear(cfg.num_experts, cfg.hidden_size)?;
        let mut ev = vb.pp("experts");
        let experts =
            (0..cfg.num_experts).map(|e| Mlp::new(cfg, cfg.moe_intermediate_size, ev.pp(e))).collect::<Result<_>>()?;
        Ok(Self { router, experts })
    }

    /// `x: [N, C]` → (`[N, C]`, aux loss scalar).
    pub fn forward(&self, x: &Tensor, cfg: &ModelConfig, train: bool) -> Result<(Tensor, Tensor)> {
        let (n, c) = x.dims2()?;
        let (e_n, k) = (cfg.num_experts, cfg.num_experts_per_tok);
        // The router in f32 (logits and softmax): top-k picks are discontinuous, and bf16 logits
        // would flip near-ties between experts.
        let probs = ops::softmax_last(&self.router.forward(&x.to_dtype(DType::F32)?)?)?; // [N, E]
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
        for (e, expert) in self.experts.iter().enumerate() {
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
}

/// The feed-forward half of a block: dense or mixture of experts, by config.
pub(crate) enum FeedForward {
    Dense(Mlp),
    Moe(Moe),
}

/// Grouped-query self-attention with per-head RMSNorm on q and k and RoPE (Qwen3).
pub(crate) struct Attention {
    layer: usize,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Tensor,
    k_norm: Tensor,
}

impl Attention {
    pub fn new(cfg: &ModelConfig, layer: usize, mut vb: Vb) -> Result<Self> {
        let (c, d, h, kh) = (cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            layer,
            q: vb.pp("q_proj").linear(h * d, c)?,
            k: vb.pp("k_proj").linear(kh * d, c)?,
            v: vb.pp("v_proj").linear(kh * d, c)?,
            o: vb.pp("o_proj").linear(c, h * d)?,
            q_norm: vb.pp("q_norm").norm(d)?,
            k_norm: vb.pp("k_norm").norm(d)?,
        })
    }

    /// `hn: [B*T, C]` in the compute dtype → `[B*T, C]` in the compute dtype.
    pub fn forward(&self, hn: &Tensor, ctx: &Ctx, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let cfg = ctx.cfg;
        let (b, t, d, h, kh) = (ctx.b, ctx.t, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads);
        let (eps, f32) = (cfg.rms_norm_eps, DType::F32);
        let q = self.q.forward(hn)?.reshape((b, t, h, d))?.to_dtype(f32)?;
        let k = self.k.forward(hn)?.reshape((b, t, kh, d))?.to_dtype(f32)?;
        let v = self.v.forward(hn)?.reshape((b, t, kh, d))?;
        // q/k norms and RoPE in f32: the rotation of bf16 values by bf16 tables loses the
        // position signal at long range.
        let at = match ctx.docs {
            Some(d) => ops::Positions::Docs(d),
            None => ops::Positions::From(ctx.start_pos),
        };
        let q = ops::rope(&ops::rms_norm(&q, &self.q_norm, eps)?, ctx.rope, at)?.to_dtype(ctx.dtype)?;
        let k = ops::rope(&ops::rms_norm(&k, &self.k_norm, eps)?, ctx.rope, at)?.to_dtype(ctx.dtype)?;
        let (k, v) = match cache {
            Some(cache) => cache.append(self.layer, &k, &v)?,
            None => (k, v),
        };
        // The attention softmax itself runs in f32 inside `ops::attention` for every dtype.
        let o = ops::attention(&q, &k, &v, ctx.key_mask, ctx.docs, ctx.cpu_bf16)?.reshape((b * t, h * d))?;
        self.o.forward(&o)
    }
}

/// A pre-norm decoder block: `x + attn(norm(x))`, then `x + ffn(norm(x))`.
pub(crate) struct Block {
    attn: Attention,
    input_ln: Tensor,
    post_ln: Tensor,
    ffn: FeedForward,
}

impl Block {
    pub fn new(cfg: &ModelConfig, layer: usize, mut vb: Vb) -> Result<Self> {
        Ok(Self {
            attn: Attention::new(cfg, layer, vb.pp("self_attn"))?,
            input_ln: vb.pp("input_layernorm").norm(cfg.hidden_size)?,
            post_ln: vb.pp("post_attention_layernorm").norm(cfg.hidden_size)?,
            ffn: if cfg.use_moe {
                FeedForward::Moe(Moe::new(cfg, vb.pp("mlp"))?)
            } else {
                FeedForward::Dense(Mlp::new(cfg, cfg.intermediate_size, vb.pp("mlp"))?)
            },
        })
    }

    /// `x: [B*T, C]` f32 → (`[B*T, C]` f32, the MoE aux loss scalar for MoE blocks).
    pub fn forward(&self, x: &Tensor, ctx: &Ctx, cache: Option<&mut KvCache>) -> Result<(Tensor, Option<Tensor>)> {
        let (eps, f32) = (ctx.cfg.rms_norm_eps, DType::F32);
        let hn = ops::rms_norm(x, &self.input_ln, eps)?.to_dtype(ctx.dtype)?;
        let x = (x + self.attn.forward(&hn, ctx, cache)?.to_dtype(f32)?)?;
        let hn = ops::rms_norm(&x, &self.post_ln, eps)?.to_dtype(ctx.dtype)?;
        let (y, aux) = match &self.ffn {
            FeedForward::Dense(f) => (f.forward(&hn)?, None),
            FeedForward::Moe(m) => {
                let (y, a) = m.forward(&hn, ctx.cfg, ctx.train)?;
                (y, Some(a))
            }
        };
        Ok(((x + y.to_dtype(f32)?)?, aux))
    }

    /// Every linear layer of the block (the MoE router excepted: LoRA does not adapt it).
    pub fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let a = &mut self.attn;
        let mut v = vec![&mut a.q, &mut a.k, &mut a.v, &mut a.o];
        match &mut self.ffn {
            FeedForward::Dense(f) => v.extend(f.linears_mut()),
            FeedForward::Moe(m) => v.extend(m.experts.iter_mut().flat_map(Mlp::linears_mut)),
        }
        v
    }
}
