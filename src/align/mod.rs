//! Alignment: LoRA training, DPO, reward models, GRPO, PPO, agent RL and distillation. The loss math lives in
//! [`losses`] as pure candle functions (tested on tiny hand-computed tensors); the stages in
//! `crate::stages` wire it to the model, the data and the shared training loop.

pub mod agent;
pub mod distill;
pub mod dpo;
pub mod grpo;
pub mod losses;
pub mod ppo;
pub mod reward;
pub mod rewards;
pub mod sft_lora;
