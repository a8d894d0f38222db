//! RoPE tables (spec §3.2): NeoX "rotate_half" convention, optional static YaRN scaling.

use super::config::ModelConfig;
use candle_core::{Device, Result, Tensor};
use std::sync::Arc;

/// Precomputed cos/sin tables, `[max_position_embeddings, head_dim / 2]` (the two halves of the
/// reference's `[.., D]` tables are identical, so only one half is stored).
#[derive(Clone, Debug)]
pub struct RopeTables {
    /// Half head width D/2.
    pub half: usize,
    /// Number of positions in the table.
    pub max_pos: usize,
    /// `cos(t * inv_freq[i]) * attention_factor`, row-major `[max_pos, half]`.
    pub cos: Arc<Vec<f32>>,
    /// `sin(t * inv_freq[i]) * attention_factor`, row-major `[max_pos, half]`.
    pub sin: Arc<Vec<f32>>,
}

/// The inverse frequencies, YaRN-scaled when the config asks for it (spec §3.2).
pub fn inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.head_dim;
    let theta = cfg.rope_theta;
    // The reference computes these in float32: 1 / theta^(arange(0, D, 2)/D).
    let mut inv: Vec<f32> = (0..d / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / d as f64)) as f32).collect();
    if let Some(y) = &cfg.rope_scaling {
        let orig = y.original_max_position_embeddings as f64;
        if cfg.max_position_embeddings as f64 / orig > 1.0 {
            let corr = |b: f64| d as f64 * (orig / (b * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln());
            let low = corr(y.beta_fast).floor().max(0.0);
            let high = corr(y.beta_slow).ceil().min((d / 2 - 1) as f64);
            for (i, f) in inv.iter_mut().enumerate() {
                let ramp = ((i as f64 - low) / (high - low).max(0.001)).clamp(0.0, 1.0);
                *f = (*f as f64 * ((1.0 - ramp) + ramp / y.factor)) as f32;
            }
        }
    }
    inv
}

impl RopeTables {
    /// Build the tables for a config.
    pub fn new(cfg: &ModelConfig) -> Self {
        let inv = inv_freq(cfg);
        let half = inv.len();
        let max_pos = cfg.max_position_embeddings;
        let att = cfg.rope_scaling.as_ref().map(|y| y.attention_factor as f32).unwrap_or(1.0);
        let mut cos = Vec::with_capacity(max_pos * half);
        let mut sin = Vec::with_capacity(max_pos * half);
        for t in 0..max_pos {
            for &f in &inv {
                // float32 product like torch.outer(t.float(), inv_freq) in the reference.
                let a = t as f32 * f;
                cos.push(a.cos() * att);
                sin.push(a.sin() * att);
            }
        }
        Self { half, max_pos, cos: Arc::new(cos), sin: Arc::new(sin) }
    }

    /// Full-width `[len, D]` cos and sin tensors for positions `start..start+len` (composite path).
    pub fn full_tables(&self, start: usize, len: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let pos: Vec<u32> = (start as u32..(start + len) as u32).collect();
        self.tables_at(&pos, device)
    }

    /// Full-width `[n, D]` cos and sin tensors for the positions `pos` (composite path).
    pub fn tables_at(&self, pos: &[u32], device: &Device) -> Result<(Tensor, Tensor)> {
        if let Some(&p) = pos.iter().find(|&&p| p as usize >= self.max_pos) {
            candle_core::bail!(
                "position {} exceeds max_position_embeddings {}; raise it in the model config",
                p as usize + 1,
                self.max_pos
            );
        }
        let h = self.half;
        let mk = |src: &[f32]| -> Result<Tensor> {
            let mut v = Vec::with_capacity(pos.len() * 2 * h);
            for &t in pos {
                let row = &src[t as usize * h..(t as usize + 1) * h];
                v.extend_from_slice(row);
                v.extend_from_slice(row);
            }
            Tensor::from_vec(v, (pos.len(), 2 * h), device)
        };
        Ok((mk(&self.cos)?, mk(&self.sin)?))
    }
}
