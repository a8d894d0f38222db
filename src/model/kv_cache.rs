//! Per-layer key/value cache for incremental decoding. Keys are stored after q/k-norm and RoPE,
//! before GQA repetition, as `[B, P, K, D]` (spec §3.3 step 4).
//!
//! A cache may store its keys and values in a dtype of its own ([`KvCache::with_dtype`]): a bf16
//! model on the CPU keeps f32 activations but a bf16 cache, half the bytes every decode step
//! reads (`ops::attention` reads it directly, in f32 arithmetic).

use candle_core::{DType, Result, Tensor};

/// Growable per-layer K/V buffers. Appending writes in place into a preallocated buffer (doubling
/// when full), so a decode step costs O(new tokens), not O(cached length).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<Option<LayerCache>>,
    /// What keys and values are stored as (`None`: as they come).
    dtype: Option<DType>,
}

#[derive(Debug, Clone)]
struct LayerCache {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerCache {
    /// A cache holding exactly `k`, `v` (`[B, P, K, D]`) with room to grow.
    fn with_room(k: Tensor, v: Tensor) -> Result<Self> {
        let (b, len, kh, d) = k.dims4()?;
        let cap = (len * 2).max(64);
        let kb = Tensor::zeros((b, cap, kh, d), k.dtype(), k.device())?;
        let vb = Tensor::zeros((b, cap, kh, d), v.dtype(), v.device())?;
        kb.slice_set(&k.contiguous()?, 1, 0)?;
        vb.slice_set(&v.contiguous()?, 1, 0)?;
        Ok(Self { k: kb, v: vb, len })
    }
}

impl KvCache {
    /// An empty cache for `num_layers` layers, storing keys and values in the dtype they come in.
    pub fn new(num_layers: usize) -> Self {
        Self { layers: vec![None; num_layers], dtype: None }
    }

    /// An empty cache for `num_layers` layers that stores keys and values as `dtype` (converted
    /// on [`Self::append`], which then hands out `dtype` views).
    pub fn with_dtype(num_layers: usize, dtype: DType) -> Self {
        Self { layers: vec![None; num_layers], dtype: Some(dtype) }
    }

    /// The dtype keys and values are stored as, when the cache converts them.
    pub fn dtype(&self) -> Option<DType> {
        self.dtype
    }

    /// Number of cached positions (0 when empty).
    pub fn len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.len).unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget everything (keeps no buffers).
    pub fn clear(&mut self) {
        for l in &mut self.layers {
            *l = None;
        }
    }

    /// Append `k`, `v` (`[B, T, K, D]`) to layer `layer` and return views of the whole cached
    /// `[B, P+T, K, D]` keys and values (in the cache's dtype).
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let (k, v) = match self.dtype {
            Some(dt) => (k.to_dtype(dt)?, v.to_dtype(dt)?),
            None => (k.clone(), v.clone()),
        };
        let (b, t, kh, d) = k.dims4()?;
        let slot = &mut self.layers[layer];
        match slot {
            None => {
                let cap = (t * 2).max(64);
                let kb = Tensor::zeros((b, cap, kh, d), k.dtype(), k.device())?;
                let vb = Tensor::zeros((b, cap, kh, d), v.dtype(), v.device())?;
                kb.slice_set(&k.contiguous()?, 1, 0)?;
                vb.slice_set(&v.contiguous()?, 1, 0)?;
                *slot = Some(LayerCache { k: kb, v: vb, len: t });
            }
            Some(c) => {
                let cap = c.k.dim(1)?;
                if c.len + t > cap {
                    let new_cap = (c.len + t).max(cap * 2);
                    let grow = |x: &Tensor| -> Result<Tensor> {
                        let nb = Tensor::zeros((b, new_cap, kh, d), x.dtype(), x.device())?;
                        nb.slice_set(&x.narrow(1, 0, c.len)?.contiguous()?, 1, 0)?;
                        Ok(nb)
                    };
                    c.k = grow(&c.k)?;
                    c.v = grow(&c.v)?;
                }
                c.k.slice_set(&k.contiguous()?, 1, c.len)?;
                c.v.slice_set(&v.contiguous()?, 1, c.len)?;
                c.len += t;
            }
        }
        let c = slot.as_ref().expect("just set");
        Ok((c.k.narrow(1, 0, c.len)?, c.v.narrow(1, 0, c.len)?))
    }

    /// Keep only the sequences `rows` (in that order), e.g. when some rows of a serving batch
    /// finished.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        for c in self.layers.iter_mut().flatten() {
            let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<_>>(), rows.len(), c.k.device())?;
            let pick = |x: &Tensor| x.narrow(1, 0, c.len)?.contiguous()?.index_select(&idx, 0);
            let (k, v) = (pick(&c.k)?, pick(&c.v)?);
            *c = LayerCache::with_room(k, v)?;
        }
        Ok(())
    }

    /// Add `other`'s sequences after this cache's. The shorter side is padded with zero
    /// positions at the front so both have the same length; the caller masks those keys
    /// (`key_mask` of `forward_step_masked`). RoPE is relative, so a row's own positions only
    /// have to be consistent with each other, which padding at the front keeps.
    pub fn append_rows(&mut self, other: &KvCache) -> Result<()> {
        if self.layers.len() != other.layers.len() || self.dtype != other.dtype {
            candle_core::bail!(
                "append_rows: caches of {} layers ({:?}) and {} layers ({:?})",
                self.layers.len(),
                self.dtype,
                other.layers.len(),
                other.dtype
            );
        }
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            let Some(t) = theirs else { continue };
            let Some(m) = mine else {
                *mine = Some(t.clone());
                continue;
            };
            let len = m.len.max(t.len);
            let padded = |x: &Tensor, n: usize| -> Result<Tensor> {
                let x = x.narrow(1, 0, n)?;
                if n == len {
                    return Ok(x);
                }
                let (b, _, kh, d) = x.dims4()?;
                Tensor::cat(&[&Tensor::zeros((b, len - n, kh, d), x.dtype(), x.device())?, &x], 1)
            };
            let k = Tensor::cat(&[padded(&m.k, m.len)?, padded(&t.k, t.len)?], 0)?;
            let v = Tensor::cat(&[padded(&m.v, m.len)?, padded(&t.v, t.len)?], 0)?;
            *m = LayerCache::with_room(k, v)?;
        }
        Ok(())
    }

    /// Forget the first `n` positions of every sequence (positions that are padding for all rows).
    pub fn trim_front(&mut self, n: usize) -> Result<()> {
        for c in self.layers.iter_mut().flatten() {
            let keep = c.len.saturating_sub(n);
            let (k, v) = (c.k.narrow(1, c.len - keep, keep)?, c.v.narrow(1, c.len - keep, keep)?);
            *c = LayerCache::with_room(k, v)?;
        }
        Ok(())
    }
}
