//! Weights I/O: safetensors with Qwen3 key names, and export of a folder `transformers` loads as
//! `Qwen3ForCausalLM` / `Qwen3MoeForCausalLM` (spec §5).

use super::{MiniMind, ModelConfig, ModelError};
use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Save every weight as f32 safetensors with Qwen3 key names. Tied embeddings are stored once,
/// as `model.embed_tokens.weight` (what transformers expects for a tied Qwen3).
pub fn save(model: &MiniMind, path: &Path) -> anyhow::Result<()> {
    save_tensors(&model.named_tensors(), path)
}

/// Save named tensors as f32 safetensors, atomically and durably ([`crate::durable`]).
pub fn save_tensors(named: &[(String, Tensor)], path: &Path) -> anyhow::Result<()> {
    let mut map = HashMap::new();
    for (n, t) in named {
        map.insert(n.clone(), t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?.contiguous()?);
    }
    crate::durable::write_atomic_with(path, |tmp| {
        candle_core::safetensors::save(&map, tmp).map_err(std::io::Error::other)
    })
    .with_context(|| format!("writing weights to {}", path.display()))
}

/// Read every tensor of a safetensors file (f32, bf16 or f16 on disk) as f32 on `device`.
pub fn load_tensors(path: &Path, device: &Device) -> anyhow::Result<HashMap<String, Tensor>> {
    let raw = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("reading safetensors weights from {} (is it a safetensors file?)", path.display()))?;
    let mut out = HashMap::with_capacity(raw.len());
    for (k, t) in raw {
        let t = t.to_dtype(DType::F32)?.to_device(device)?;
        out.insert(k, t);
    }
    Ok(out)
}

/// Read a model folder's `config.json` (Qwen3 / Qwen3-MoE / MiniMind layout).
pub fn load_config(dir: &Path) -> anyhow::Result<ModelConfig> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
    ModelConfig::from_hf_json(&v).with_context(|| format!("interpreting {}", p.display()))
}

/// Load a weights file into a model for `cfg`. `trainable` makes the weights `Var`s.
pub fn load(cfg: &ModelConfig, path: &Path, device: &Device, trainable: bool) -> anyhow::Result<MiniMind> {
    let tensors = unfuse_experts(load_tensors(path, device)?)?;
    MiniMind::from_tensors(cfg, tensors, device, trainable)
        .map_err(|e: ModelError| anyhow::anyhow!(e))
        .with_context(|| format!("loading weights from {}", path.display()))
}

/// Load a model folder: `config.json` plus `model.safetensors` (or the sharded
/// `model.safetensors.index.json` form of transformers), e.g. a MiniMind release or an mmrun export.
pub fn load_dir(dir: &Path, device: &Device, trainable: bool) -> anyhow::Result<MiniMind> {
    let cfg = load_config(dir)?;
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return load(&cfg, &single, device, trainable);
    }
    let index = dir.join(SHARD_INDEX);
    if index.is_file() {
        let mut all = HashMap::new();
        for f in shard_files(&index)? {
            all.extend(load_tensors(&dir.join(&f), device)?);
        }
        return MiniMind::from_tensors(&cfg, unfuse_experts(all)?, device, trainable)
            .map_err(|e: ModelError| anyhow::anyhow!(e))
            .with_context(|| format!("loading weights from {}", dir.display()));
    }
    refuse_pickled(dir)?;
    anyhow::bail!("{} has no model.safetensors (or model.safetensors.index.json); is it a model folder?", dir.display())
}

/// The index of a sharded checkpoint (transformers' `save_pretrained` with `max_shard_size`).
pub const SHARD_INDEX: &str = "model.safetensors.index.json";

/// The shard file names an index's `weight_map` points at, sorted, each once. Names are checked to
/// stay inside the folder (an index is data from the network).
pub fn shard_files(index: &Path) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(index).with_context(|| format!("reading {}", index.display()))?;
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", index.display()))?;
    let map =
        v["weight_map"].as_object().ok_or_else(|| anyhow::anyhow!("{} has no `weight_map` object", index.display()))?;
    let mut files: Vec<String> = map.values().filter_map(|x| x.as_str().map(String::from)).collect();
    files.sort();
    files.dedup();
    if let Some(bad) = files.iter().find(|f| f.is_empty() || f.contains(['/', '\\']) || f.starts_with('.')) {
        anyhow::bail!("{}: shard name '{bad}' is not a file name in the model folder", index.display());
    }
    Ok(files)
}

/// Fail, saying why and how to convert, when `dir` holds pickled weights (`*.bin`, `*.pth`, …)
/// and no safetensors: unpickling runs arbitrary code, so mmrun never does it.
pub fn refuse_pickled(dir: &Path) -> anyhow::Result<()> {
    let has_safetensors = dir.join(crate::artifact::layout::MODEL_WEIGHTS).is_file() || dir.join(SHARD_INDEX).is_file();
    let mut pickled: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| crate::hub::names::is_pickled(n))
                .collect()
        })
        .unwrap_or_default();
    pickled.sort();
    if has_safetensors || pickled.is_empty() {
        return Ok(());
    }
    anyhow::bail!(
        "{} has only pickled weights ({}); mmrun reads safetensors only, because loading a pickle can run \
         arbitrary code. Convert once with transformers: `python -c \"from transformers import \
         AutoModelForCausalLM as M; M.from_pretrained('<dir>').save_pretrained('<out>', safe_serialization=True)\"` \
         and point at <out>",
        dir.display(),
        pickled.join(", ")
    )
}

/// Split the fused MoE expert tensors transformers >= 5 writes into mmrun's per-expert ones (spec
/// §5.2): `…mlp.experts.gate_up_proj` `[E, 2I, C]` (per expert, gate stacked over up) becomes
/// `…mlp.experts.<e>.gate_proj.weight` and `….up_proj.weight` `[I, C]`, and
/// `…mlp.experts.down_proj` `[E, C, I]` becomes `…mlp.experts.<e>.down_proj.weight` `[C, I]`.
/// Checkpoints already per expert pass through unchanged.
pub fn unfuse_experts(mut tensors: HashMap<String, Tensor>) -> anyhow::Result<HashMap<String, Tensor>> {
    let fused: Vec<String> = tensors
        .keys()
        .filter(|k| k.ends_with(".mlp.experts.gate_up_proj") || k.ends_with(".mlp.experts.down_proj"))
        .cloned()
        .collect();
    for key in fused {
        let t = tensors.remove(&key).expect("listed above");
        let (prefix, which) = key.rsplit_once('.').expect("the suffix has dots");
        let (e, rows, _) = t.dims3().with_context(|| format!("fused expert tensor {key} is not 3-D"))?;
        for i in 0..e {
            let expert = t.get(i)?;
            if which == "gate_up_proj" {
                anyhow::ensure!(
                    rows % 2 == 0,
                    "fused {key} has an odd number of rows ({rows}), not gate and up stacked"
                );
                let half = rows / 2;
                tensors.insert(format!("{prefix}.{i}.gate_proj.weight"), expert.narrow(0, 0, half)?.contiguous()?);
                tensors.insert(format!("{prefix}.{i}.up_proj.weight"), expert.narrow(0, half, half)?.contiguous()?);
            } else {
                tensors.insert(format!("{prefix}.{i}.down_proj.weight"), expert.contiguous()?);
            }
        }
    }
    Ok(tensors)
}

/// Tokenizer files copied by [`export`] when present in the tokenizer folder.
pub const TOKENIZER_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

/// Write a folder `transformers` loads with `AutoModelForCausalLM.from_pretrained`: `config.json`,
/// `model.safetensors`, `generation_config.json` (with bos/eos/pad ids, unlike the reference), and
/// the tokenizer files found in `tokenizer_dir` (if given).
pub fn export(model: &MiniMind, tokenizer_dir: Option<&Path>, out_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let cfg = model.config();
    let cfg_path = out_dir.join("config.json");
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg.to_hf_json())? + "\n")
        .with_context(|| format!("writing {}", cfg_path.display()))?;
    let gen = serde_json::json!({
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": 0,
        "do_sample": true,
        "temperature": 0.85,
        "top_p": 0.85,
        "top_k": 50,
    });
    let gen_path = out_dir.join("generation_config.json");
    std::fs::write(&gen_path, serde_json::to_string_pretty(&gen)? + "\n")
        .with_context(|| format!("writing {}", gen_path.display()))?;
    save(model, &out_dir.join("model.safetensors"))?;
    if let Some(tdir) = tokenizer_dir {
        copy_tokenizer_files(tdir, out_dir)?;
    }
    Ok(())
}

/// Copy the [`TOKENIZER_FILES`] present in `tokenizer_dir` into `out_dir`.
pub fn copy_tokenizer_files(tokenizer_dir: &Path, out_dir: &Path) -> anyhow::Result<()> {
    for f in TOKENIZER_FILES {
        let src = tokenizer_dir.join(f);
        if src.is_file() {
            std::fs::copy(&src, out_dir.join(f))
                .with_context(|| format!("copying {} into {}", src.display(), out_dir.display()))?;
        }
    }
    Ok(())
}
