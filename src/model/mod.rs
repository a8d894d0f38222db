//! The MiniMind decoder in candle: config and presets, layers, MoE, LoRA, KV cache, generation,
//! and weights I/O with Qwen3 key names.

pub mod config;
pub mod generate;
pub mod sampling;

pub use config::ModelConfig;
