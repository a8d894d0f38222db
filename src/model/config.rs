//! Model configuration (the Qwen3 `config.json` fields) and the reference presets.

use serde::{Deserialize, Serialize};

/// Architecture of a MiniMind / Qwen3-style decoder.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Model width C.
    pub hidden_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads H.
    pub num_attention_heads: usize,
    /// Key/value heads K (GQA; H % K == 0).
    pub num_key_value_heads: usize,
    /// Per-head width D.
    pub head_dim: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Vocabulary size V.
    pub vocab_size: usize,
    /// RoPE table length.
    pub max_position_embeddings: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Embedding and LM head share one tensor.
    pub tie_word_embeddings: bool,
    /// Dropout probability (embedding, attention, residual).
    pub dropout: f64,
    /// `<|im_start|>`.
    pub bos_token_id: u32,
    /// `<|im_end|>`.
    pub eos_token_id: u32,
    /// Mixture-of-experts FFN.
    pub use_moe: bool,
    /// Experts per MoE layer.
    pub num_experts: usize,
    /// Top-k.
    pub num_experts_per_tok: usize,
    /// Expert FFN width.
    pub moe_intermediate_size: usize,
    /// Renormalise the top-k gate weights.
    pub norm_topk_prob: bool,
    /// Load-balancing loss coefficient.
    pub router_aux_loss_coef: f64,
    /// Static YaRN RoPE scaling (spec §3.2); `None` = plain RoPE.
    #[serde(default)]
    pub rope_scaling: Option<RopeScaling>,
}

/// YaRN parameters (the reference's `rope_scaling` dict; spec §1 and §3.2).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// Frequency division factor for the low-frequency band (reference: 16).
    pub factor: f64,
    /// Context length the model was trained at (reference: 2048).
    pub original_max_position_embeddings: usize,
    /// Fast-rotation boundary (reference: 32).
    pub beta_fast: f64,
    /// Slow-rotation boundary (reference: 1).
    pub beta_slow: f64,
    /// Multiplies both cos and sin tables (reference: 1.0).
    pub attention_factor: f64,
}

impl RopeScaling {
    /// The reference's `inference_rope_scaling=True` values.
    pub fn reference_yarn() -> Self {
        Self {
            factor: 16.0,
            original_max_position_embeddings: 2048,
            beta_fast: 32.0,
            beta_slow: 1.0,
            attention_factor: 1.0,
        }
    }
}

/// Why a Hugging Face `config.json` could not be turned into a [`ModelConfig`].
#[derive(Debug, thiserror::Error)]
pub enum HfConfigError {
    /// Not JSON / not an object.
    #[error("config.json is not a JSON object: {0}")]
    NotObject(String),
    /// A required field is absent or has the wrong type.
    #[error("config.json: field `{0}` is missing or not a {1}; a Qwen3 config.json needs it")]
    Field(&'static str, &'static str),
    /// An architecture mmrun cannot run.
    #[error("config.json: model_type `{0}` is not supported (expected `qwen3`, `qwen3_moe` or `minimind`)")]
    ModelType(String),
    /// Features of Qwen3-MoE that the MiniMind layout does not have.
    #[error("config.json: {0}")]
    Unsupported(String),
}

/// The reference's intermediate-size rule: `ceil(hidden * pi / 64) * 64`.
pub fn default_intermediate_size(hidden: usize) -> usize {
    ((hidden as f64 * std::f64::consts::PI / 64.0).ceil() as usize) * 64
}

impl ModelConfig {
    /// A dense config with the reference defaults for everything but the shape.
    pub fn dense(hidden: usize, layers: usize, heads: usize, kv_heads: usize) -> Self {
        let intermediate = default_intermediate_size(hidden);
        Self {
            hidden_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim: hidden / heads,
            intermediate_size: intermediate,
            vocab_size: 6400,
            max_position_embeddings: 32768,
            rope_theta: 1e6,
            rms_norm_eps: 1e-6,
            tie_word_embeddings: true,
            dropout: 0.0,
            bos_token_id: 1,
            eos_token_id: 2,
            use_moe: false,
            num_experts: 4,
            num_experts_per_tok: 1,
            moe_intermediate_size: intermediate,
            norm_topk_prob: true,
            router_aux_loss_coef: 5e-4,
            rope_scaling: None,
        }
    }

    /// Number of query heads per key/value head.
    pub fn n_rep(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Check the shape invariants the model relies on; the message says which field to fix.
    pub fn validate(&self) -> Result<(), HfConfigError> {
        let bad = |m: String| Err(HfConfigError::Unsupported(m));
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return bad(format!(
                "num_attention_heads ({}) must be a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even and > 0 for RoPE", self.head_dim));
        }
        if self.hidden_size == 0 || self.vocab_size == 0 || self.intermediate_size == 0 {
            return bad("hidden_size, vocab_size and intermediate_size must be > 0".into());
        }
        if self.use_moe
            && (self.num_experts == 0 || self.num_experts_per_tok == 0 || self.num_experts_per_tok > self.num_experts)
        {
            return bad(format!(
                "MoE needs 0 < num_experts_per_tok ({}) <= num_experts ({})",
                self.num_experts_per_tok, self.num_experts
            ));
        }
        Ok(())
    }

    /// Total parameter count (tied embedding counted once).
    pub fn num_params(&self) -> usize {
        let (c, d) = (self.hidden_size, self.head_dim);
        let attn = c * self.num_attention_heads * d * 2 + c * self.num_key_value_heads * d * 2 + 2 * d;
        let mlp = if self.use_moe {
            self.num_experts * 3 * c * self.moe_intermediate_size + self.num_experts * c
        } else {
            3 * c * self.intermediate_size
        };
        let per_layer = attn + mlp + 2 * c;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * c };
        self.vocab_size * c + self.num_hidden_layers * per_layer + c + head
    }

    /// The Hugging Face `config.json` (Qwen3 / Qwen3-MoE layout, spec §5.2) that `transformers`
    /// loads as `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM`. Unlike the reference exporter it
    /// carries bos/eos/pad ids (spec §18 item 4).
    pub fn to_hf_json(&self) -> serde_json::Value {
        use serde_json::json;
        let rope_scaling = match &self.rope_scaling {
            None => serde_json::Value::Null,
            Some(r) => json!({
                "rope_type": "yarn",
                "factor": r.factor,
                "original_max_position_embeddings": r.original_max_position_embeddings,
                "beta_fast": r.beta_fast,
                "beta_slow": r.beta_slow,
                "attention_factor": r.attention_factor,
            }),
        };
        let mut v = json!({
            "architectures": [if self.use_moe { "Qwen3MoeForCausalLM" } else { "Qwen3ForCausalLM" }],
            "attention_bias": false,
            "attention_dropout": self.dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": 0,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "layer_types": vec!["full_attention"; self.num_hidden_layers],
            "max_position_embeddings": self.max_position_embeddings,
            "max_window_layers": self.num_hidden_layers,
            "model_type": if self.use_moe { "qwen3_moe" } else { "qwen3" },
            "num_attention_heads": self.num_attention_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "num_key_value_heads": self.num_key_value_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_scaling": rope_scaling,
            "rope_theta": self.rope_theta,
            "sliding_window": null,
            "tie_word_embeddings": self.tie_word_embeddings,
            "torch_dtype": "float32",
            "use_cache": true,
            "use_sliding_window": false,
            "vocab_size": self.vocab_size,
        });
        if self.use_moe {
            let o = v.as_object_mut().expect("object");
            o.insert("num_experts".into(), json!(self.num_experts));
            o.insert("num_experts_per_tok".into(), json!(self.num_experts_per_tok));
            o.insert("moe_intermediate_size".into(), json!(self.moe_intermediate_size));
            o.insert("norm_topk_prob".into(), json!(self.norm_topk_prob));
            o.insert("router_aux_loss_coef".into(), json!(self.router_aux_loss_coef));
            o.insert("decoder_sparse_step".into(), json!(1));
            o.insert("mlp_only_layers".into(), json!([]));
            o.insert("output_router_logits".into(), json!(false));
        }
        v
    }

    /// Parse a Hugging Face `config.json` (`qwen3`, `qwen3_moe`, or the reference's own
    /// `minimind` model_type, whose field names are the same).
    pub fn from_hf_json(v: &serde_json::Value) -> Result<Self, HfConfigError> {
        let o = v.as_object().ok_or_else(|| HfConfigError::NotObject(v.to_string()))?;
        let usize_f = |k: &'static str| -> Result<usize, HfConfigError> {
            o.get(k).and_then(|x| x.as_u64()).map(|x| x as usize).ok_or(HfConfigError::Field(k, "non-negative integer"))
        };
        let f64_or = |k: &str, d: f64| o.get(k).and_then(|x| x.as_f64()).unwrap_or(d);
        let bool_or = |k: &str, d: bool| o.get(k).and_then(|x| x.as_bool()).unwrap_or(d);
        let model_type = o.get("model_type").and_then(|x| x.as_str()).unwrap_or("qwen3").to_string();
        let moe = match model_type.as_str() {
            "qwen3" => false,
            "qwen3_moe" => true,
            "minimind" => bool_or("use_moe", false),
            other => return Err(HfConfigError::ModelType(other.to_string())),
        };
        let hidden = usize_f("hidden_size")?;
        let heads = usize_f("num_attention_heads")?;
        let mut cfg = ModelConfig::dense(hidden, usize_f("num_hidden_layers")?, heads, usize_f("num_key_value_heads")?);
        if let Ok(d) = usize_f("head_dim") {
            cfg.head_dim = d;
        }
        cfg.intermediate_size = usize_f("intermediate_size").unwrap_or(cfg.intermediate_size);
        cfg.vocab_size = usize_f("vocab_size")?;
        cfg.max_position_embeddings = usize_f("max_position_embeddings").unwrap_or(cfg.max_position_embeddings);
        cfg.rope_theta = f64_or("rope_theta", cfg.rope_theta);
        cfg.rms_norm_eps = f64_or("rms_norm_eps", cfg.rms_norm_eps);
        cfg.tie_word_embeddings = bool_or("tie_word_embeddings", true);
        cfg.dropout = f64_or("attention_dropout", f64_or("dropout", 0.0));
        if let Some(b) = o.get("bos_token_id").and_then(|x| x.as_u64()) {
            cfg.bos_token_id = b as u32;
        }
        if let Some(e) = o.get("eos_token_id").and_then(|x| x.as_u64()) {
            cfg.eos_token_id = e as u32;
        }
        if bool_or("attention_bias", false) {
            return Err(HfConfigError::Unsupported(
                "attention_bias=true is not supported (MiniMind has no biases)".into(),
            ));
        }
        if let Some(act) = o.get("hidden_act").and_then(|x| x.as_str()) {
            if act != "silu" {
                return Err(HfConfigError::Unsupported(format!("hidden_act `{act}` is not supported (only silu)")));
            }
        }
        if bool_or("use_sliding_window", false) {
            return Err(HfConfigError::Unsupported("use_sliding_window=true is not supported".into()));
        }
        if moe {
            cfg.use_moe = true;
            // transformers 5 writes `num_local_experts`, 4.x writes `num_experts`.
            cfg.num_experts = usize_f("num_experts").or_else(|_| usize_f("num_local_experts"))?;
            cfg.num_experts_per_tok = usize_f("num_experts_per_tok")?;
            cfg.moe_intermediate_size = usize_f("moe_intermediate_size").unwrap_or(cfg.intermediate_size);
            cfg.norm_topk_prob = bool_or("norm_topk_prob", true);
            cfg.router_aux_loss_coef = f64_or("router_aux_loss_coef", cfg.router_aux_loss_coef);
            if model_type == "qwen3_moe" {
                let step = usize_f("decoder_sparse_step").unwrap_or(1);
                let dense_layers = o.get("mlp_only_layers").and_then(|x| x.as_array()).map(|a| a.len()).unwrap_or(0);
                if step != 1 || dense_layers != 0 {
                    return Err(HfConfigError::Unsupported(
                        "Qwen3-MoE with dense layers (decoder_sparse_step != 1 or mlp_only_layers non-empty) is not \
                         supported; MiniMind MoE uses experts in every layer"
                            .into(),
                    ));
                }
            }
            if o.get("n_shared_experts").and_then(|x| x.as_u64()).unwrap_or(0) > 0 {
                return Err(HfConfigError::Unsupported("shared experts are not supported (spec §4)".into()));
            }
        } else {
            cfg.moe_intermediate_size = cfg.intermediate_size;
        }
        // transformers 5 folds `rope_theta` and `rope_scaling` into `rope_parameters`.
        let params = o.get("rope_parameters").filter(|p| p.is_object());
        if let Some(theta) = params.and_then(|p| p.get("rope_theta")).and_then(|x| x.as_f64()) {
            cfg.rope_theta = theta;
        }
        let scaling = match o.get("rope_scaling") {
            Some(r) if r.is_object() => Some(r),
            _ => params,
        };
        let kind_of = |r: &serde_json::Value| {
            r.get("rope_type").or_else(|| r.get("type")).and_then(|x| x.as_str()).unwrap_or("default").to_string()
        };
        cfg.rope_scaling = match scaling {
            None => None,
            Some(r) if kind_of(r) == "default" => None,
            Some(r) => {
                let kind = kind_of(r);
                if kind != "yarn" {
                    return Err(HfConfigError::Unsupported(format!(
                        "rope_scaling type `{kind}` is not supported (only yarn)"
                    )));
                }
                let d = RopeScaling::reference_yarn();
                let g = |k: &str, dv: f64| r.get(k).and_then(|x| x.as_f64()).unwrap_or(dv);
                Some(RopeScaling {
                    factor: g("factor", d.factor),
                    original_max_position_embeddings: r
                        .get("original_max_position_embeddings")
                        .and_then(|x| x.as_u64())
                        .map(|x| x as usize)
                        .unwrap_or(d.original_max_position_embeddings),
                    beta_fast: g("beta_fast", d.beta_fast),
                    beta_slow: g("beta_slow", d.beta_slow),
                    attention_factor: g("attention_factor", d.attention_factor),
                })
            }
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The same config with MoE switched on.
    pub fn with_moe(mut self, experts: usize, top_k: usize) -> Self {
        self.use_moe = true;
        self.num_experts = experts;
        self.num_experts_per_tok = top_k;
        self
    }
}

/// A named preset.
pub struct Preset {
    /// Name used in `[model] preset = "..."`.
    pub name: &'static str,
    /// What it is.
    pub doc: &'static str,
    /// Builds the config.
    pub build: fn() -> ModelConfig,
}

/// The reference sizes (spec §2) plus tiny shapes for tests and the quickstart.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "minimind-3",
        doc: "64M dense, 768x8, 8 q / 4 kv heads (reference default)",
        build: || ModelConfig::dense(768, 8, 8, 4),
    },
    Preset {
        name: "minimind-3-moe",
        doc: "198M-A64M, 768x8, 4 experts top-1",
        build: || ModelConfig::dense(768, 8, 8, 4).with_moe(4, 1),
    },
    Preset {
        name: "minimind-small",
        doc: "30M dense, 512x8, 8 q / 4 kv heads (the CPU baseline shape)",
        build: || ModelConfig::dense(512, 8, 8, 4),
    },
    Preset {
        name: "minimind2-small",
        doc: "29M dense, 512x8, 8 q / 2 kv heads (historical 26M)",
        build: || ModelConfig::dense(512, 8, 8, 2),
    },
    Preset {
        name: "minimind2-moe",
        doc: "138M-A44M, 640x8, 8 q / 2 kv heads, 4 experts top-1",
        build: || ModelConfig::dense(640, 8, 8, 2).with_moe(4, 1),
    },
    Preset {
        name: "minimind2",
        doc: "118M dense, 768x16, 8 q / 2 kv heads (historical 104M)",
        build: || ModelConfig::dense(768, 16, 8, 2),
    },
    Preset {
        name: "tiny",
        doc: "~0.5M dense, 64x2, 4 q / 2 kv heads: tests and the quickstart",
        build: || ModelConfig::dense(64, 2, 4, 2),
    },
    Preset {
        name: "tiny-moe",
        doc: "~0.8M-A0.5M, 64x2, 4 q / 2 kv heads, 4 experts top-1: MoE tests and quickstarts",
        build: || ModelConfig::dense(64, 2, 4, 2).with_moe(4, 1),
    },
];

/// Find a preset by name.
pub fn preset(name: &str) -> Option<ModelConfig> {
    PRESETS.iter().find(|p| p.name == name).map(|p| (p.build)())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reference_param_counts() {
        // Spec §2 table (measured on the reference code).
        assert_eq!(ModelConfig::dense(512, 8, 8, 4).num_params(), 30_025_216);
        assert_eq!(ModelConfig::dense(768, 8, 8, 4).num_params(), 63_912_192);
        assert_eq!(ModelConfig::dense(512, 8, 8, 2).num_params(), 28_976_640);
    }

    #[test]
    fn hf_json_roundtrip_dense_and_moe() {
        for cfg in [
            preset("minimind-small").unwrap(),
            preset("minimind-3-moe").unwrap(),
            ModelConfig { rope_scaling: Some(RopeScaling::reference_yarn()), ..preset("tiny").unwrap() },
        ] {
            let j = cfg.to_hf_json();
            let back = ModelConfig::from_hf_json(&j).unwrap();
            assert_eq!(back, cfg);
        }
        let j = preset("minimind-3-moe").unwrap().to_hf_json();
        assert_eq!(j["architectures"][0], "Qwen3MoeForCausalLM");
        assert_eq!(j["model_type"], "qwen3_moe");
    }

    #[test]
    fn hf_json_rejects_unsupported() {
        let mut j = preset("tiny").unwrap().to_hf_json();
        j["model_type"] = "llama".into();
        let e = ModelConfig::from_hf_json(&j).unwrap_err().to_string();
        assert!(e.contains("llama"), "{e}");
        let mut j = preset("tiny").unwrap().to_hf_json();
        j.as_object_mut().unwrap().remove("hidden_size");
        assert!(ModelConfig::from_hf_json(&j).unwrap_err().to_string().contains("hidden_size"));
    }
}
