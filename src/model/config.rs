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
        }
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
];

/// Find a preset by name.
pub fn preset(name: &str) -> Option<ModelConfig> {
    PRESETS.iter().find(|p| p.name == name).map(|p| (p.build)())
}
