//! Every integration test in one binary: one link of the library, its dependencies and the
//! test harness instead of one per file (each link wrote ~400 MB and took seconds on CI's 2 cores).
//! `tests/hub_env.rs` stays a separate binary: it sets process-wide environment variables.

mod cli_chat;
mod cli_errors;
mod cli_load_errors;
mod cli_pipeline;
mod cli_ppo;
mod cli_resume;
mod cli_show;
mod cluster_slurm;
mod common;
mod data_parallel;
mod dpo_memory;
mod export;
mod golden_logits;
mod hub_client;
mod hub_data;
mod hub_hostile;
mod hub_medical_e2e;
mod hub_model;
mod hub_parquet;
mod hub_push;
mod hub_tokenizer;
mod layers;
mod model_bench;
mod moe;
mod peft_golden;
mod quickstart;
mod quickstart_rl;
mod recipes;
mod remote_cache;
mod serve_api;
mod tool_use;
mod train_stages;
mod web_browser;
