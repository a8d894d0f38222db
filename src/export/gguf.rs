//! GGUF files llama.cpp loads: `general.architecture = qwen3` (or `qwen3moe`), the hyper-parameter
//! keys its loader requires, the tokenizer as `tokenizer.ggml.model = gpt2`, and tensors under
//! llama.cpp's names. Facts follow llama.cpp's `convert_hf_to_gguf.py` and `gguf-py` constants
//! (`MODEL_TENSOR` names for `QWEN3` / `QWEN3MOE`, `LLAMA_FTYPE_*`, token types); candle-core's
//! GGUF writer does the byte layout (GGUF v2, 32-byte alignment) and the Q8_0 quantisation.

use crate::model::{weights, ModelConfig};
use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// Tensor data type of a GGUF export (`--dtype`). 1-D tensors (norms) and the MoE router stay
/// f32 whatever is chosen, as llama.cpp's converter does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufDtype {
    /// 32-bit floats (`LLAMA_FTYPE_ALL_F32`).
    F32,
    /// 16-bit floats (`MOSTLY_F16`).
    F16,
    /// bfloat16 (`MOSTLY_BF16`).
    Bf16,
    /// 8-bit blocks of 32 with an f16 scale (`MOSTLY_Q8_0`); rows not a multiple of 32 fall back to f16.
    #[value(name = "q8_0")]
    Q8_0,
}

impl GgufDtype {
    /// `general.file_type` (llama.cpp's `llama_ftype`).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::Bf16 => 32,
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            GgufDtype::F32 => GgmlDType::F32,
            GgufDtype::F16 => GgmlDType::F16,
            GgufDtype::Bf16 => GgmlDType::BF16,
            GgufDtype::Q8_0 => GgmlDType::Q8_0,
        }
    }
}

/// llama.cpp's token types (`gguf.TokenType`).
const TOKEN_NORMAL: i32 = 1;
const TOKEN_UNUSED: i32 = 5;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;

/// The Qwen2/Qwen3 split regex; llama.cpp names this pre-tokenizer `qwen2`.
const QWEN2_REGEX: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// llama.cpp's tensor name for a Qwen3 key (experts are stacked separately).
fn tensor_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let mapped = match tail {
        "input_layernorm.weight" => "attn_norm.weight",
        "self_attn.q_proj.weight" => "attn_q.weight",
        "self_attn.k_proj.weight" => "attn_k.weight",
        "self_attn.v_proj.weight" => "attn_v.weight",
        "self_attn.o_proj.weight" => "attn_output.weight",
        "self_attn.q_norm.weight" => "attn_q_norm.weight",
        "self_attn.k_norm.weight" => "attn_k_norm.weight",
        "post_attention_layernorm.weight" => "ffn_norm.weight",
        "mlp.gate_proj.weight" => "ffn_gate.weight",
        "mlp.up_proj.weight" => "ffn_up.weight",
        "mlp.down_proj.weight" => "ffn_down.weight",
        "mlp.gate.weight" => "ffn_gate_inp.weight",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}"))
}

/// The tokenizer's GGUF metadata, read from `tokenizer.json` + `tokenizer_config.json`.
fn tokenizer_metadata(dir: &Path, cfg: &ModelConfig) -> anyhow::Result<Vec<(String, Value)>> {
    let tj = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&tj)
        .with_context(|| format!("reading {} (a GGUF export needs the model's tokenizer)", tj.display()))?;
    let t: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("parsing {}", tj.display()))?;
    if t["model"]["type"] != "BPE" {
        bail!(
            "{}: tokenizer model {} is not BPE; GGUF export supports byte-level BPE (gpt2) tokenizers",
            tj.display(),
            t["model"]["type"]
        );
    }
    let pre = pre_tokenizer_name(&t["pre_tokenizer"])
        .with_context(|| format!("{}: choosing llama.cpp's pre-tokenizer", tj.display()))?;
    let mut tokens: BTreeMap<u32, (String, i32)> = BTreeMap::new();
    for (tok, id) in t["model"]["vocab"].as_object().context("tokenizer.json: model.vocab is not an object")? {
        let id = id.as_u64().context("tokenizer.json: a vocab id is not a number")? as u32;
        tokens.insert(id, (tok.clone(), TOKEN_NORMAL));
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let (Some(id), Some(content)) = (a["id"].as_u64(), a["content"].as_str()) else { continue };
        let ty = if a["special"].as_bool() == Some(true) { TOKEN_CONTROL } else { TOKEN_USER_DEFINED };
        tokens.insert(id as u32, (content.to_string(), ty));
    }
    // The embedding may be padded past the tokenizer (as the converter does: `[PAD<id>]`, unused).
    let n = (cfg.vocab_size as u32).max(tokens.keys().next_back().map_or(0, |k| k + 1));
    let mut names = Vec::with_capacity(n as usize);
    let mut types = Vec::with_capacity(n as usize);
    for id in 0..n {
        let (name, ty) = tokens.remove(&id).unwrap_or_else(|| (format!("[PAD{id}]"), TOKEN_UNUSED));
        names.push(Value::String(name));
        types.push(Value::I32(ty));
    }
    let merges: Vec<Value> = t["model"]["merges"]
        .as_array()
        .context("tokenizer.json: model.merges is missing")?
        .iter()
        .map(|m| match m {
            serde_json::Value::String(s) => Ok(Value::String(s.clone())),
            serde_json::Value::Array(p) if p.len() == 2 => {
                Ok(Value::String(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or(""))))
            }
            other => bail!("tokenizer.json: unexpected merge entry {other}"),
        })
        .collect::<anyhow::Result<_>>()?;

    let tc: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or_default();
    let id_of = |field: &str| -> Option<u32> {
        let tok = tc[field].as_str().or_else(|| tc[field]["content"].as_str())?;
        names.iter().position(|v| matches!(v, Value::String(s) if s == tok)).map(|i| i as u32)
    };
    let pad = id_of("pad_token").unwrap_or(cfg.eos_token_id);
    let mut md = vec![
        ("tokenizer.ggml.model".to_string(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), Value::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), Value::Array(names)),
        ("tokenizer.ggml.token_type".to_string(), Value::Array(types)),
        ("tokenizer.ggml.merges".to_string(), Value::Array(merges)),
        ("tokenizer.ggml.bos_token_id".to_string(), Value::U32(cfg.bos_token_id)),
        ("tokenizer.ggml.eos_token_id".to_string(), Value::U32(cfg.eos_token_id)),
        ("tokenizer.ggml.padding_token_id".to_string(), Value::U32(pad)),
        ("tokenizer.ggml.add_bos_token".to_string(), Value::Bool(false)),
    ];
    if let Some(tmpl) = super::chat_template(dir) {
        md.push(("tokenizer.chat_template".to_string(), Value::String(tmpl)));
    }
    Ok(md)
}

/// llama.cpp's `tokenizer.ggml.pre` for a `tokenizer.json` pre-tokenizer: a plain byte-level
/// pre-tokenizer with its GPT-2 regex is `gpt-2`; Qwen's split regex before a regex-free byte level
/// is `qwen2`. Anything else would tokenize differently in llama.cpp, so it is refused.
fn pre_tokenizer_name(p: &serde_json::Value) -> anyhow::Result<&'static str> {
    let byte_level = |v: &serde_json::Value| v["type"] == "ByteLevel";
    if byte_level(p) && p["use_regex"].as_bool() != Some(false) {
        return Ok("gpt-2");
    }
    if p["type"] == "Sequence" {
        if let Some([split, bl]) = p["pretokenizers"].as_array().map(Vec::as_slice) {
            if split["type"] == "Split"
                && split["pattern"]["Regex"].as_str() == Some(QWEN2_REGEX)
                && byte_level(bl)
                && bl["use_regex"].as_bool() == Some(false)
            {
                return Ok("qwen2");
            }
        }
    }
    bail!(
        "pre-tokenizer {p} is neither GPT-2's byte level nor Qwen2's split regex; llama.cpp would tokenize differently"
    )
}

/// Write `model` (the folder `dir`: config, safetensors, tokenizer) as one GGUF file at `out`.
pub fn write(dir: &Path, name: &str, dtype: GgufDtype, out: &Path) -> anyhow::Result<()> {
    let model = weights::load_dir(dir, &Device::Cpu, false)?;
    let cfg = model.config().clone();
    let arch = if cfg.use_moe { "qwen3moe" } else { "qwen3" };
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(arch.into())),
        ("general.name".into(), Value::String(name.into())),
        ("general.file_type".into(), Value::U32(dtype.file_type())),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let a = |k: &str| format!("{arch}.{k}");
    let u = |v: usize| Value::U32(v as u32);
    md.extend([
        (a("block_count"), u(cfg.num_hidden_layers)),
        (a("context_length"), u(cfg.max_position_embeddings)),
        (a("embedding_length"), u(cfg.hidden_size)),
        (a("feed_forward_length"), u(cfg.intermediate_size)),
        (a("attention.head_count"), u(cfg.num_attention_heads)),
        (a("attention.head_count_kv"), u(cfg.num_key_value_heads)),
        (a("attention.key_length"), u(cfg.head_dim)),
        (a("attention.value_length"), u(cfg.head_dim)),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps as f32)),
    ]);
    if cfg.use_moe {
        md.extend([
            (a("expert_count"), u(cfg.num_experts)),
            (a("expert_used_count"), u(cfg.num_experts_per_tok)),
            (a("expert_feed_forward_length"), u(cfg.moe_intermediate_size)),
        ]);
    }
    if let Some(y) = &cfg.rope_scaling {
        md.extend([
            (a("rope.scaling.type"), Value::String("yarn".into())),
            (a("rope.scaling.factor"), Value::F32(y.factor as f32)),
            (a("rope.scaling.original_context_length"), u(y.original_max_position_embeddings)),
        ]);
    }
    md.extend(tokenizer_metadata(dir, &cfg)?);

    // Per-expert weights are stacked into llama.cpp's `[n_expert, rows, cols]` tensors.
    let mut experts: BTreeMap<(String, String), Vec<(usize, Tensor)>> = BTreeMap::new();
    let mut tensors: Vec<(String, QTensor)> = Vec::new();
    for (hf, t) in model.named_tensors() {
        if let Some((layer, e, proj)) = expert_key(&hf) {
            experts.entry((layer, proj)).or_default().push((e, t));
            continue;
        }
        let gguf = tensor_name(&hf).with_context(|| format!("no llama.cpp name for tensor {hf}"))?;
        let keep_f32 = t.rank() == 1 || gguf.ends_with("ffn_gate_inp.weight");
        tensors.push((gguf, quantize(&t, dtype, keep_f32)?));
    }
    for ((layer, proj), mut list) in experts {
        list.sort_by_key(|(e, _)| *e);
        let stacked = Tensor::stack(&list.into_iter().map(|(_, t)| t).collect::<Vec<_>>(), 0)?;
        tensors.push((format!("blk.{layer}.ffn_{proj}_exps.weight"), quantize(&stacked, dtype, false)?));
    }
    let mdr: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tr: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?);
    candle_core::quantized::gguf_file::write(&mut f, &mdr, &tr)
        .with_context(|| format!("writing {}", out.display()))?;
    use std::io::Write;
    f.flush().with_context(|| format!("writing {}", out.display()))?;
    Ok(())
}

/// `model.layers.<l>.mlp.experts.<e>.<proj>_proj.weight` → (l, e, proj).
fn expert_key(hf: &str) -> Option<(String, usize, String)> {
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once(".mlp.experts.")?;
    let (e, proj) = tail.split_once('.')?;
    let proj = proj.strip_suffix("_proj.weight")?;
    Some((layer.to_string(), e.parse().ok()?, proj.to_string()))
}

fn quantize(t: &Tensor, dtype: GgufDtype, keep_f32: bool) -> anyhow::Result<QTensor> {
    let t = t.to_dtype(candle_core::DType::F32)?.contiguous()?;
    let mut q = if keep_f32 { GgmlDType::F32 } else { dtype.ggml() };
    if q == GgmlDType::Q8_0 && t.dims().last().is_some_and(|d| d % q.block_size() != 0) {
        q = GgmlDType::F16;
    }
    Ok(QTensor::quantize(&t, q)?)
}

/// Names of the tensors a GGUF file holds and its metadata keys (for tests and `--json` output).
pub fn summary(path: &Path) -> anyhow::Result<(HashMap<String, Value>, Vec<String>)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let c = candle_core::quantized::gguf_file::Content::read(&mut f)?;
    Ok((c.metadata, c.tensor_infos.into_keys().collect()))
}
