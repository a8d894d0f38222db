//! Masked next-token cross-entropy from composite candle ops (all with backward). The model's
//! fused loss is faster; this one is the reference implementation for tests and toy models.

use super::batch::IGNORE;
use candle_core::{DType, Result, Tensor, D};

/// Mean cross-entropy of `logits[:, :-1]` against `labels[:, 1:]` over positions whose label is
/// not [`IGNORE`] (the reference model's loss). `logits`: `[b, t, v]`; `labels`: `[b, t]` i64.
/// Returns 0 (with a gradient of zeros) when no position carries a label.
pub fn causal_lm_loss(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if t < 2 {
        return logits.sum_all()?.affine(0.0, 0.0);
    }
    let logits = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?.to_dtype(DType::F32)?;
    let labels = labels.narrow(1, 1, t - 1)?.flatten_all()?.to_dtype(DType::I64)?;
    let keep = labels.ne(IGNORE)?;
    let safe = keep.where_cond(&labels, &labels.zeros_like()?)?.to_dtype(DType::U32)?;
    let mask = keep.to_dtype(DType::F32)?;
    let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = logp.gather(&safe.unsqueeze(1)?, 1)?.squeeze(1)?;
    let n = mask.sum_all()?.to_scalar::<f32>()?.max(1.0);
    ((picked * mask)?.sum_all()? / (-(n as f64)))?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn uniform_logits_give_log_v_and_mask_is_respected() -> Result<()> {
        let logits = Tensor::zeros((1, 3, 8), DType::F32, &Device::Cpu)?;
        let labels = Tensor::from_slice(&[5i64, 3, IGNORE], (1, 3), &Device::Cpu)?;
        let l = causal_lm_loss(&logits, &labels)?.to_scalar::<f32>()?;
        assert!((l - 8f32.ln()).abs() < 1e-6);
        // A confident right answer at the only unmasked position drives the loss near 0.
        let mut v = vec![0f32; 24];
        v[3] = 20.0; // position 0 predicts label at position 1 = 3
        let logits = Tensor::from_vec(v, (1, 3, 8), &Device::Cpu)?;
        let l = causal_lm_loss(&logits, &labels)?.to_scalar::<f32>()?;
        assert!(l < 1e-6, "{l}");
        Ok(())
    }
}
