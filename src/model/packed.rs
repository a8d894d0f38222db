//! Rows that hold several documents (packing): each token's position within its own document.
//!
//! The positions alone describe the per-document attention: documents are contiguous, so the
//! document of token `i` starts at `i - pos[i]`, and query `i` sees exactly the keys
//! `i - pos[i] ..= i` (a block-diagonal causal mask). RoPE rotates each token by its position in
//! its document, so a packed document is computed exactly as if it were alone in its row.

use candle_core::{bail, Device, Result, Tensor};
use std::sync::{Arc, OnceLock};

/// Per-token document positions of a `[B, T]` batch of packed rows (row-major, restarting at 0
/// where a document starts). Cheap to clone.
#[derive(Clone, Debug)]
pub struct DocPositions {
    b: usize,
    t: usize,
    pos: Arc<Vec<u32>>,
    /// The composite path's additive `[B, 1, T, T]` mask, built once per batch (every layer
    /// uses the same one).
    mask: Arc<OnceLock<Tensor>>,
}

impl DocPositions {
    /// `pos` is `[b, t]` row-major; each row starts at 0 and every position is 0 (a new document)
    /// or the previous one plus 1.
    pub fn new(pos: Vec<u32>, b: usize, t: usize) -> Result<Self> {
        if pos.len() != b * t {
            bail!("document positions: {} values for a [{b}, {t}] batch", pos.len());
        }
        for (r, row) in pos.chunks(t.max(1)).enumerate() {
            if let Some(i) = (0..row.len()).find(|&i| row[i] != 0 && (i == 0 || row[i] != row[i - 1] + 1)) {
                bail!("document positions: row {r} column {i} is {} (must be 0 or the previous + 1)", row[i]);
            }
        }
        Ok(Self { b, t, pos: Arc::new(pos), mask: Arc::default() })
    }

    /// From the token lengths of the documents of each row; the rest of a row (padding) counts
    /// as one more document, so padding never shares attention with real tokens.
    pub fn from_lengths(rows: &[Vec<usize>], t: usize) -> Result<Self> {
        let mut pos = Vec::with_capacity(rows.len() * t);
        for (r, docs) in rows.iter().enumerate() {
            let start = pos.len();
            for &n in docs {
                pos.extend(0..n as u32);
            }
            if pos.len() - start > t {
                bail!("document positions: row {r} holds {} tokens, more than {t}", pos.len() - start);
            }
            let rest = t - (pos.len() - start);
            pos.extend(0..rest as u32);
        }
        Self::new(pos, rows.len(), t)
    }

    /// Batch and time.
    pub fn dims(&self) -> (usize, usize) {
        (self.b, self.t)
    }

    /// The positions, `[B * T]` row-major.
    pub fn positions(&self) -> &Arc<Vec<u32>> {
        &self.pos
    }

    /// Whether query `i` of row `r` sees key `j` (same document, `j <= i`).
    pub fn visible(&self, r: usize, i: usize, j: usize) -> bool {
        j <= i && j + self.pos[r * self.t + i] as usize >= i
    }

    /// The additive mask `[B, 1, T, T]` (0 where visible, −inf elsewhere) on `device`, built
    /// once and shared by every layer.
    pub fn additive_mask(&self, device: &Device) -> Result<Tensor> {
        if let Some(m) = self.mask.get() {
            if m.device().same_device(device) {
                return Ok(m.clone());
            }
        }
        let (b, t) = (self.b, self.t);
        let mut v = vec![f32::NEG_INFINITY; b * t * t];
        for r in 0..b {
            for i in 0..t {
                let start = i - self.pos[r * t + i] as usize;
                v[(r * t + i) * t + start..=(r * t + i) * t + i].iter_mut().for_each(|x| *x = 0.0);
            }
        }
        let m = Tensor::from_vec(v, (b, 1, t, t), device)?;
        let _ = self.mask.set(m.clone());
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_restart_per_document_and_define_the_mask() {
        let d = DocPositions::from_lengths(&[vec![2, 3], vec![4]], 6).unwrap();
        assert_eq!(d.positions().as_slice(), &[0, 1, 0, 1, 2, 0, 0, 1, 2, 3, 0, 1]);
        assert!(d.visible(0, 4, 2) && d.visible(0, 4, 4) && !d.visible(0, 4, 1) && !d.visible(0, 2, 3));
        assert!(!d.visible(1, 4, 3), "padding is its own document");
        let m: Vec<Vec<f32>> =
            d.additive_mask(&Device::Cpu).unwrap().get(0).unwrap().get(0).unwrap().to_vec2().unwrap();
        for (i, row) in m.iter().enumerate() {
            for (j, &x) in row.iter().enumerate() {
                assert_eq!(x == 0.0, d.visible(0, i, j), "({i}, {j})");
            }
        }
        assert!(DocPositions::new(vec![0, 2], 1, 2).is_err());
        assert!(DocPositions::new(vec![1, 2], 1, 2).is_err());
        assert!(DocPositions::from_lengths(&[vec![4, 3]], 6).is_err());
    }
}
