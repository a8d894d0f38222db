//! PEFT-compatible LoRA adapters for [`MiniMind`]: configurable targets, rank, alpha and dropout;
//! saved as `adapter_model.safetensors` + `adapter_config.json` with PEFT's key names, so
//! `PeftModel.from_pretrained(<exported base>, <adapter dir>)` loads them unchanged.
//!
//! The adapters hang on the model's [`super::linear::Linear`] hook; the base weights stay plain
//! tensors (build the model with `trainable = false`), so they get no gradients and no optimiser
//! state — only [`LoraAdapters::params`] is handed to the optimiser.
//!
//! Differences from the reference (spec §10, quirk 15), deliberate: the reference adapts only square
//! layers with scale 1 and N(0, 0.02) init; here targets, `alpha / rank` scaling and PEFT's
//! kaiming-uniform init of `A` are configurable and default to PEFT's behaviour.

use super::linear::{Dropout, Lora};
use super::MiniMind;
use candle_core::{DType, Device, Result as CResult, Tensor, Var};
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;

/// File name of the adapter weights (PEFT).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// File name of the adapter config (PEFT).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";
/// Prefix PEFT puts before module paths in saved keys (`PeftModel.base_model.model.<path>`).
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Leaf names of the linear layers LoRA can target (Qwen3 names); `all-linear` means all of them
/// (PEFT's `all-linear` also excludes the output layer; the MoE router is not adapted here).
pub const LINEAR_NAMES: &[&str] = &["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Errors attaching, loading or saving adapters.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    /// Bad hyper-parameters.
    #[error("invalid LoRA config: {0}")]
    Config(String),
    /// A target names no linear layer of the model.
    #[error("LoRA target `{target}` matches no linear layer of this model; use `all-linear` or some of: {}", LINEAR_NAMES.join(", "))]
    UnknownTarget {
        /// The target as written.
        target: String,
    },
    /// Attaching twice.
    #[error("`{0}` already has a LoRA adapter; merge or drop it before attaching another")]
    AlreadyAdapted(String),
    /// A file is missing or unreadable / malformed.
    #[error("{path}: {msg}")]
    File {
        /// The file.
        path: String,
        /// What is wrong and what to do.
        msg: String,
    },
    /// Candle failure.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Which linear layers get adapters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Targets {
    /// Every linear layer except the LM head (PEFT's `"all-linear"`).
    AllLinear,
    /// Module names as PEFT matches them: a leaf name (`q_proj`) matches every module whose path
    /// ends with `.q_proj`; a full path (`model.layers.0.self_attn.q_proj`, as PEFT saves
    /// `all-linear`) matches that module only.
    Modules(Vec<String>),
}

impl Targets {
    /// Parse `"all-linear"` or a comma-separated list such as `"q_proj,v_proj"`.
    pub fn parse(s: &str) -> Result<Self, LoraError> {
        let s = s.trim();
        if s == "all-linear" {
            return Ok(Targets::AllLinear);
        }
        let names: Vec<String> = s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
        Self::from_list(names)
    }

    /// From a list of names (an empty list is an error).
    pub fn from_list(names: Vec<String>) -> Result<Self, LoraError> {
        if names.is_empty() {
            return Err(LoraError::Config("`targets` is empty; use \"all-linear\" or e.g. \"q_proj,v_proj\"".into()));
        }
        for n in &names {
            let leaf = n.rsplit('.').next().unwrap_or(n);
            if !LINEAR_NAMES.contains(&leaf) {
                return Err(LoraError::UnknownTarget { target: n.clone() });
            }
        }
        Ok(Targets::Modules(names))
    }

    fn matches(&self, path: &str) -> bool {
        let leaf = path.rsplit('.').next().unwrap_or(path);
        match self {
            Targets::AllLinear => LINEAR_NAMES.contains(&leaf),
            Targets::Modules(m) => m.iter().any(|t| path == t || path.ends_with(&format!(".{t}"))),
        }
    }
}

/// LoRA hyper-parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r` (> 0).
    pub rank: usize,
    /// `lora_alpha`: the update is scaled by `alpha / rank`.
    pub alpha: f64,
    /// Dropout probability on the adapter input during training, in `[0, 1)`.
    pub dropout: f64,
    /// Adapted layers.
    pub targets: Targets,
    /// Seed of the `A` initialisation (and of dropout masks).
    pub seed: u64,
}

impl LoraConfig {
    /// The update scale `alpha / rank`.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    fn validate(&self) -> Result<(), LoraError> {
        if self.rank == 0 {
            return Err(LoraError::Config("`rank` must be at least 1".into()));
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return Err(LoraError::Config(format!("`alpha` must be a positive number, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(LoraError::Config(format!("`dropout` must be in [0, 1), got {}", self.dropout)));
        }
        Ok(())
    }
}

struct Module {
    path: String,
    a: Var,
    b: Var,
}

/// The adapters attached to one model.
pub struct LoraAdapters {
    config: LoraConfig,
    modules: Vec<Module>,
    dropout: Option<Arc<Dropout>>,
}

/// PEFT's default init of `A` (`kaiming_uniform_(a = sqrt(5))`): U(−1/√in, 1/√in).
fn kaiming_uniform(rng: &mut rand_chacha::ChaCha8Rng, rows: usize, fan_in: usize, dev: &Device) -> CResult<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let v: Vec<f32> = (0..rows * fan_in).map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32).collect();
    Tensor::from_vec(v, (rows, fan_in), dev)
}

impl LoraAdapters {
    /// Attach fresh adapters (`A` kaiming-uniform from `config.seed`, `B = 0`, so the model's output
    /// is unchanged) to every targeted linear layer of `model`.
    pub fn attach(model: &mut MiniMind, config: &LoraConfig) -> Result<Self, LoraError> {
        config.validate()?;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(config.seed);
        let dev = model.device().clone();
        let dropout = (config.dropout > 0.0).then(|| Arc::new(Dropout::new(config.dropout, config.seed ^ 0x5eed)));
        let mut modules = Vec::new();
        for lin in model.linears_mut() {
            let path = lin.path.clone();
            if !config.targets.matches(&path) {
                continue;
            }
            if lin.lora.is_some() {
                return Err(LoraError::AlreadyAdapted(path));
            }
            let (out, inp) = lin.weight.dims2()?;
            let a = Var::from_tensor(&kaiming_uniform(&mut rng, config.rank, inp, &dev)?)?;
            let b = Var::from_tensor(&Tensor::zeros((out, config.rank), DType::F32, &dev)?)?;
            lin.lora = Some(Lora {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: config.scale(),
                dropout: dropout.clone(),
            });
            modules.push(Module { path, a, b });
        }
        if let Targets::Modules(names) = &config.targets {
            for n in names {
                if !modules.iter().any(|m| m.path == *n || m.path.ends_with(&format!(".{n}"))) {
                    return Err(LoraError::UnknownTarget { target: n.clone() });
                }
            }
        }
        Ok(Self { config: config.clone(), modules, dropout })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &LoraConfig {
        &self.config
    }

    /// Trainable adapter tensors with PEFT key names
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`, …), A before B per module.
    pub fn params(&self) -> Vec<(String, Var)> {
        let mut v = Vec::with_capacity(2 * self.modules.len());
        for m in &self.modules {
            v.push((format!("{PEFT_PREFIX}{}.lora_A.weight", m.path), m.a.clone()));
            v.push((format!("{PEFT_PREFIX}{}.lora_B.weight", m.path), m.b.clone()));
        }
        v
    }

    /// Number of trainable adapter scalars.
    pub fn num_params(&self) -> usize {
        self.modules.iter().map(|m| m.a.elem_count() + m.b.elem_count()).sum()
    }

    /// Module paths that carry an adapter, in model order.
    pub fn module_paths(&self) -> Vec<&str> {
        self.modules.iter().map(|m| m.path.as_str()).collect()
    }

    /// Enable dropout masks (training) or disable them (evaluation). No-op without dropout.
    pub fn set_training(&self, on: bool) {
        if let Some(d) = &self.dropout {
            d.set_active(on);
        }
    }

    /// Reseed the dropout masks (see [`Dropout::reseed`]). No-op without dropout.
    pub fn reseed_dropout(&self, seed: u64) {
        if let Some(d) = &self.dropout {
            d.reseed(seed);
        }
    }

    /// `adapter_config.json` contents (PEFT `LoraConfig` fields).
    pub fn peft_config_json(&self, base_model: Option<&str>) -> serde_json::Value {
        // Leaf names, as PEFT writes them for a list of names; full paths when the recipe named
        // individual modules, so the saved config adapts exactly the same set.
        let full = matches!(&self.config.targets, Targets::Modules(m) if m.iter().any(|t| t.contains('.')));
        let leaves: BTreeSet<&str> = if full {
            self.modules.iter().map(|m| m.path.as_str()).collect()
        } else {
            self.modules.iter().filter_map(|m| m.path.rsplit('.').next()).collect()
        };
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "base_model_name_or_path": base_model,
            "revision": null,
            "r": self.config.rank,
            "lora_alpha": self.config.alpha,
            "lora_dropout": self.config.dropout,
            "target_modules": leaves.into_iter().collect::<Vec<_>>(),
            "bias": "none",
            "fan_in_fan_out": false,
            "inference_mode": true,
            "init_lora_weights": true,
            "modules_to_save": null,
            "use_rslora": false,
            "use_dora": false,
            "layers_to_transform": null,
            "layers_pattern": null,
            "rank_pattern": {},
            "alpha_pattern": {},
        })
    }

    /// Write `adapter_model.safetensors` (f32, PEFT keys) and `adapter_config.json` into `dir`.
    pub fn save(&self, dir: &Path, base_model: Option<&str>) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        let named: Vec<(String, Tensor)> =
            self.params().into_iter().map(|(n, v)| (n, v.as_tensor().detach())).collect();
        super::weights::save_tensors(&named, &dir.join(ADAPTER_WEIGHTS))?;
        let cfg = serde_json::to_string_pretty(&self.peft_config_json(base_model))?;
        std::fs::write(dir.join(ADAPTER_CONFIG), cfg + "\n")?;
        Ok(())
    }

    /// Read a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`) and
    /// attach it to `model` with the saved values. Keys must match the model's modules exactly.
    pub fn load(model: &mut MiniMind, dir: &Path, seed: u64) -> Result<Self, LoraError> {
        let cfg_path = dir.join(ADAPTER_CONFIG);
        let file_err = |p: &Path, msg: String| LoraError::File { path: p.display().to_string(), msg };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| {
            file_err(&cfg_path, format!("cannot read the adapter config ({e}); is this a PEFT adapter directory?"))
        })?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| file_err(&cfg_path, format!("not valid JSON: {e}")))?;
        let config = config_from_peft(&json, seed).map_err(|m| file_err(&cfg_path, m))?;
        let w_path = dir.join(ADAPTER_WEIGHTS);
        let mut tensors: HashMap<String, Tensor> = candle_core::safetensors::load(&w_path, model.device())
            .map_err(|e| file_err(&w_path, format!("cannot read adapter weights: {e}")))?;
        // Some tools keep the adapter name in the key (`lora_A.default.weight`); accept it.
        let renamed: Vec<(String, String)> = tensors
            .keys()
            .filter(|k| k.contains(".lora_A.default.") || k.contains(".lora_B.default."))
            .map(|k| (k.clone(), k.replace(".default.", ".")))
            .collect();
        for (old, new) in renamed {
            let t = tensors.remove(&old).expect("listed");
            tensors.insert(new, t);
        }
        let adapters = Self::attach(model, &config)?;
        for (name, var) in adapters.params() {
            let t = tensors.remove(&name).ok_or_else(|| {
                file_err(
                    &w_path,
                    format!("lacks `{name}` that adapter_config.json implies; was it saved for another model?"),
                )
            })?;
            if t.dims() != var.dims() {
                return Err(file_err(
                    &w_path,
                    format!("`{name}` has shape {:?}, the model needs {:?}", t.dims(), var.dims()),
                ));
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        if let Some(extra) = tensors.keys().min() {
            return Err(file_err(
                &w_path,
                format!("has {} tensor(s) this model does not adapt, e.g. `{extra}` (bias, DoRA or modules_to_save are not supported)", tensors.len()),
            ));
        }
        Ok(adapters)
    }

    /// Fold the adapters into the base weights (`W ← W + scale · B A`) and remove them.
    pub fn merge(self, model: &mut MiniMind) -> CResult<()> {
        model.merge_lora()
    }

    /// Remove the adapters from `model` without merging (the base model is restored).
    pub fn detach(self, model: &mut MiniMind) {
        for lin in model.linears_mut() {
            lin.lora = None;
        }
    }

    /// Named adapter values keyed by PEFT name (for tests and checkpoints).
    pub fn named_tensors(&self) -> BTreeMap<String, Tensor> {
        self.params().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect()
    }
}

/// A [`LoraConfig`] from PEFT's `adapter_config.json` values; the error says which field is wrong.
pub fn config_from_peft(json: &serde_json::Value, seed: u64) -> Result<LoraConfig, String> {
    if let Some(t) = json.get("peft_type").and_then(|v| v.as_str()) {
        if t != "LORA" {
            return Err(format!("peft_type is `{t}`; only LORA adapters are supported"));
        }
    }
    for flag in ["use_dora", "use_rslora"] {
        if json.get(flag).and_then(|v| v.as_bool()) == Some(true) {
            return Err(format!("`{flag} = true` is not supported; retrain the adapter without it"));
        }
    }
    if json.get("bias").and_then(|v| v.as_str()).is_some_and(|b| b != "none") {
        return Err("`bias` other than \"none\" is not supported".into());
    }
    for pat in ["rank_pattern", "alpha_pattern"] {
        if json.get(pat).and_then(|v| v.as_object()).is_some_and(|o| !o.is_empty()) {
            return Err(format!("`{pat}` (per-module ranks) is not supported"));
        }
    }
    let rank = json.get("r").and_then(|v| v.as_u64()).ok_or("missing integer field `r`")? as usize;
    let alpha = json.get("lora_alpha").and_then(|v| v.as_f64()).ok_or("missing number field `lora_alpha`")?;
    let dropout = json.get("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let targets = match json.get("target_modules") {
        Some(serde_json::Value::String(s)) => Targets::parse(s).map_err(|e| e.to_string())?,
        Some(serde_json::Value::Array(a)) => {
            let names: Option<Vec<String>> = a.iter().map(|v| v.as_str().map(str::to_string)).collect();
            Targets::from_list(names.ok_or("`target_modules` must be a list of strings")?).map_err(|e| e.to_string())?
        }
        _ => return Err("missing field `target_modules` (a list of module names or \"all-linear\")".into()),
    };
    Ok(LoraConfig { rank, alpha, dropout, targets, seed })
}

#[cfg(test)]
mod tests;
