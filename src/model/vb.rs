//! The one walk that builds a model, in the manner of candle's `VarBuilder`: each layer's
//! `new(cfg, vb)` asks `vb` for its weights by their Qwen3 name and shape, and the [`Weights`]
//! behind it either records the request ([`Source::Specs`], which is how [`super::param_specs`]
//! is derived), draws a fresh initialisation ([`Source::Init`]) or takes the tensor from a loaded
//! file ([`Source::Tensors`]). So a weight name is spelled exactly once, in the layer that uses
//! it, and the parameter list, the saved names and the loading checks all come from that walk.

use super::linear::Linear;
use super::{normal_vec, Init, ModelError};
use candle_core::{DType, Device, Result, Tensor, Var};
use std::collections::HashMap;

/// Where the walk's tensors come from.
pub(crate) enum Source {
    /// Record names and shapes only; the tensors handed out are broadcasts of one zero scalar, so
    /// walking a config allocates nothing.
    Specs,
    /// A fresh initialisation from a seeded stream, drawn in walk order.
    Init(Box<rand_chacha::ChaCha8Rng>),
    /// Named tensors read from a file (any float dtype; converted to f32 on the device).
    Tensors(HashMap<String, Tensor>),
}

/// One weight the walk asked for.
pub(crate) struct Spec {
    /// Qwen3 key name.
    pub name: String,
    /// Shape, PyTorch layout.
    pub shape: Vec<usize>,
    /// Initialisation.
    pub init: Init,
}

/// The state of one walk: the source, and everything the walk asked for, in order.
pub(crate) struct Weights {
    source: Source,
    device: Device,
    trainable: bool,
    /// Every weight asked for, in walk order (the order of [`super::param_specs`]).
    pub specs: Vec<Spec>,
    /// Every weight handed out, in walk order (what [`super::MiniMind::named_tensors`] returns).
    pub tensors: Vec<(String, Tensor)>,
    /// The `Var`s behind the tensors when trainable, in walk order.
    pub params: Vec<(String, Var)>,
    missing: Vec<String>,
    bad_shape: Option<ModelError>,
}

impl Weights {
    /// A walk over `source` placing tensors on `device`, as `Var`s when `trainable`.
    pub fn new(source: Source, device: &Device, trainable: bool) -> Self {
        Self {
            source,
            device: device.clone(),
            trainable,
            specs: Vec::new(),
            tensors: Vec::new(),
            params: Vec::new(),
            missing: Vec::new(),
            bad_shape: None,
        }
    }

    /// The device the tensors are placed on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The builder at the root of the key space.
    pub fn root(&mut self) -> Vb<'_> {
        Vb { weights: self, prefix: String::new() }
    }

    /// After the walk: what the source lacked, then what it had beyond the walk, then the first
    /// shape mismatch, each as the error loading reports.
    pub fn finish(self) -> std::result::Result<Self, ModelError> {
        if let Some(first) = self.missing.first() {
            return Err(ModelError::Missing { count: self.missing.len(), first: first.clone() });
        }
        if let Source::Tensors(left) = &self.source {
            if let Some(first) = left.keys().min() {
                return Err(ModelError::Unexpected { count: left.len(), first: first.clone() });
            }
        }
        match self.bad_shape {
            Some(e) => Err(e),
            None => Ok(self),
        }
    }

    fn get(&mut self, name: String, shape: &[usize], init: Init) -> Result<Tensor> {
        let placeholder = |dev: &Device| Tensor::zeros((), DType::F32, dev)?.broadcast_as(shape);
        let t = match &mut self.source {
            Source::Specs => placeholder(&self.device)?,
            Source::Init(rng) => {
                let n = shape.iter().product();
                let data = match init {
                    Init::Normal => normal_vec(rng, n, 0.02),
                    Init::Ones => vec![1.0f32; n],
                };
                Tensor::from_vec(data, shape, &self.device)?
            }
            Source::Tensors(map) => match map.remove(&name) {
                None => {
                    self.missing.push(name.clone());
                    placeholder(&self.device)?
                }
                Some(t) if t.dims() != shape => {
                    let got = t.dims().to_vec();
                    self.bad_shape.get_or_insert(ModelError::Shape { name: name.clone(), got, want: shape.to_vec() });
                    placeholder(&self.device)?
                }
                Some(t) => t.to_dtype(DType::F32)?.to_device(&self.device)?,
            },
        };
        let t = if self.trainable && !matches!(self.source, Source::Specs) {
            let var = Var::from_tensor(&t)?;
            self.params.push((name.clone(), var.clone()));
            var.as_tensor().clone()
        } else {
            t
        };
        self.specs.push(Spec { name: name.clone(), shape: shape.to_vec(), init });
        self.tensors.push((name, t.clone()));
        Ok(t)
    }
}

/// A position in the key space of one walk (`model.layers.3.self_attn`), like candle's
/// `VarBuilder::pp`.
pub(crate) struct Vb<'a> {
    weights: &'a mut Weights,
    prefix: String,
}

impl Vb<'_> {
    /// The builder one level down: `pp("mlp")` under `model.layers.0` is `model.layers.0.mlp`.
    pub fn pp(&mut self, name: impl std::fmt::Display) -> Vb<'_> {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Vb { weights: self.weights, prefix }
    }

    /// The tensor `<prefix>.<name>` of `shape`.
    pub fn get(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        let full = format!("{}.{name}", self.prefix);
        self.weights.get(full, shape, init)
    }

    /// A bias-free linear layer at this position: `weight` `[out, in]`, N(0, 0.02).
    pub fn linear(mut self, out: usize, inp: usize) -> Result<Linear> {
        let w = self.get("weight", &[out, inp], Init::Normal)?;
        Ok(Linear::new(self.prefix, w))
    }

    /// An RMSNorm weight at this position: `weight` `[dim]`, ones.
    pub fn norm(mut self, dim: usize) -> Result<Tensor> {
        self.get("weight", &[dim], Init::Ones)
    }
}
