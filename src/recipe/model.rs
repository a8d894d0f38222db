//! `[model]` → [`ModelConfig`]: a preset, explicit fields on top, and the shape checks that would
//! otherwise surface as a tensor shape error deep inside training.

use super::diag::suggestion;
use super::ModelSpec;
use crate::model::config::{default_intermediate_size, preset, ModelConfig, RopeScaling, PRESETS};

/// Why a `[model]` section cannot be turned into a model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}{}", hint.as_ref().map(|h| format!(" ({h})")).unwrap_or_default())]
pub struct ModelSpecError {
    /// The `[model]` key at fault, when one is (for pointing at the recipe).
    pub key: Option<&'static str>,
    /// What is wrong.
    pub message: String,
    /// What to do.
    pub hint: Option<String>,
}

fn err(key: &'static str, message: String, hint: impl Into<Option<String>>) -> ModelSpecError {
    ModelSpecError { key: Some(key), message, hint: hint.into() }
}

/// Build the model config: start from the preset (if any), let explicit fields win, take the
/// vocabulary size from the tokenizer when known, then check the shape is buildable.
///
/// Fields derived from the width (`head_dim`, `intermediate_size`, `moe_intermediate_size`) are
/// recomputed when the width or head count is overridden but they are not, so `preset = "tiny"`
/// with `hidden_size = 128` gives a consistent model rather than the preset's stale widths.
pub fn resolve_model(spec: &ModelSpec, vocab_from_tokenizer: Option<usize>) -> Result<ModelConfig, ModelSpecError> {
    let base = match &spec.preset {
        Some(name) => Some(preset(name).ok_or_else(|| {
            let names: Vec<&str> = PRESETS.iter().map(|p| p.name).collect();
            err(
                "preset",
                format!("unknown model preset '{name}'{}", suggestion(name, names.iter().copied())),
                format!("known presets: {}", names.join(", ")),
            )
        })?),
        None => None,
    };
    let need = |v: Option<usize>, from_base: Option<usize>, key: &'static str| {
        v.or(from_base).ok_or_else(|| {
            err(
                key,
                format!("[model] needs '{key}' (or a preset)"),
                format!(
                    "set preset = \"tiny\" (or another of: {}), or give hidden_size, num_hidden_layers and num_attention_heads",
                    PRESETS.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let hidden = need(spec.hidden_size, base.as_ref().map(|b| b.hidden_size), "hidden_size")?;
    let layers = need(spec.num_hidden_layers, base.as_ref().map(|b| b.num_hidden_layers), "num_hidden_layers")?;
    let heads = need(spec.num_attention_heads, base.as_ref().map(|b| b.num_attention_heads), "num_attention_heads")?;
    let kv = spec.num_key_value_heads.or(base.as_ref().map(|b| b.num_key_value_heads)).unwrap_or(heads);
    for (key, v) in [
        ("hidden_size", hidden),
        ("num_hidden_layers", layers),
        ("num_attention_heads", heads),
        ("num_key_value_heads", kv),
    ] {
        if v == 0 {
            return Err(err(key, format!("[model] {key} must be positive"), None));
        }
    }

    let mut cfg = ModelConfig::dense(hidden, layers, heads, kv);
    if let Some(b) = &base {
        let same_width = b.hidden_size == hidden;
        cfg.head_dim = if same_width && b.num_attention_heads == heads { b.head_dim } else { cfg.head_dim };
        cfg.intermediate_size = if same_width { b.intermediate_size } else { default_intermediate_size(hidden) };
        cfg.moe_intermediate_size = if same_width { b.moe_intermediate_size } else { cfg.intermediate_size };
        cfg.vocab_size = b.vocab_size;
        cfg.max_position_embeddings = b.max_position_embeddings;
        cfg.rope_theta = b.rope_theta;
        cfg.rms_norm_eps = b.rms_norm_eps;
        cfg.tie_word_embeddings = b.tie_word_embeddings;
        cfg.dropout = b.dropout;
        cfg.bos_token_id = b.bos_token_id;
        cfg.eos_token_id = b.eos_token_id;
        cfg.use_moe = b.use_moe;
        cfg.num_experts = b.num_experts;
        cfg.num_experts_per_tok = b.num_experts_per_tok;
        cfg.norm_topk_prob = b.norm_topk_prob;
        cfg.router_aux_loss_coef = b.router_aux_loss_coef;
        cfg.rope_scaling = b.rope_scaling.clone();
    }
    if let Some(v) = spec.head_dim {
        cfg.head_dim = v;
    } else if !hidden.is_multiple_of(heads) {
        return Err(err(
            "num_attention_heads",
            format!("[model] num_attention_heads = {heads} does not divide hidden_size = {hidden}"),
            format!("pick a head count that divides {hidden}, or set head_dim explicitly"),
        ));
    }
    if let Some(v) = spec.intermediate_size {
        cfg.intermediate_size = v;
        if spec.moe_intermediate_size.is_none() {
            cfg.moe_intermediate_size = v;
        }
    }
    macro_rules! take {
        ($($f:ident),*) => { $( if let Some(v) = spec.$f { cfg.$f = v; } )* };
    }
    take!(
        max_position_embeddings,
        rope_theta,
        rms_norm_eps,
        tie_word_embeddings,
        dropout,
        use_moe,
        num_experts,
        num_experts_per_tok,
        moe_intermediate_size,
        norm_topk_prob,
        router_aux_loss_coef
    );
    if let Some(on) = spec.inference_rope_scaling {
        cfg.rope_scaling = on.then(RopeScaling::reference_yarn);
    }
    match (spec.vocab_size, vocab_from_tokenizer) {
        (Some(v), Some(t)) if v != t => {
            return Err(err(
                "vocab_size",
                format!("[model] vocab_size = {v} but the tokenizer has {t} tokens"),
                "remove vocab_size from [model]; it is taken from the tokenizer".to_string(),
            ))
        }
        (_, Some(t)) => cfg.vocab_size = t,
        (Some(v), None) => cfg.vocab_size = v,
        (None, None) => {}
    }
    validate(&cfg)?;
    Ok(cfg)
}

/// Shape checks on a complete config.
fn validate(c: &ModelConfig) -> Result<(), ModelSpecError> {
    if !c.num_attention_heads.is_multiple_of(c.num_key_value_heads) {
        return Err(err(
            "num_key_value_heads",
            format!(
                "[model] num_key_value_heads = {} does not divide num_attention_heads = {}",
                c.num_key_value_heads, c.num_attention_heads
            ),
            "grouped-query attention shares each kv head among a whole number of query heads".to_string(),
        ));
    }
    if c.head_dim == 0 || !c.head_dim.is_multiple_of(2) {
        return Err(err(
            "head_dim",
            format!("[model] head_dim = {} must be positive and even (RoPE rotates pairs)", c.head_dim),
            None,
        ));
    }
    for (key, v) in [
        ("intermediate_size", c.intermediate_size),
        ("vocab_size", c.vocab_size),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if v == 0 {
            return Err(err(key, format!("[model] {key} must be positive"), None));
        }
    }
    if c.rope_theta.is_nan() || c.rope_theta <= 0.0 {
        return Err(err("rope_theta", format!("[model] rope_theta = {} must be positive", c.rope_theta), None));
    }
    if c.rms_norm_eps.is_nan() || c.rms_norm_eps <= 0.0 {
        return Err(err("rms_norm_eps", format!("[model] rms_norm_eps = {} must be positive", c.rms_norm_eps), None));
    }
    if !(0.0..1.0).contains(&c.dropout) {
        return Err(err("dropout", format!("[model] dropout = {} must be in [0, 1)", c.dropout), None));
    }
    if c.use_moe {
        if c.num_experts == 0 || c.moe_intermediate_size == 0 {
            return Err(err(
                "num_experts",
                "[model] use_moe needs num_experts and moe_intermediate_size > 0".into(),
                None,
            ));
        }
        if c.num_experts_per_tok == 0 || c.num_experts_per_tok > c.num_experts {
            return Err(err(
                "num_experts_per_tok",
                format!(
                    "[model] num_experts_per_tok = {} must be between 1 and num_experts = {}",
                    c.num_experts_per_tok, c.num_experts
                ),
                None,
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(preset: &str) -> ModelSpec {
        ModelSpec { preset: Some(preset.into()), ..Default::default() }
    }

    #[test]
    fn preset_with_overrides_and_tokenizer_vocab() {
        let c = resolve_model(&spec("minimind-small"), Some(6400)).unwrap();
        assert_eq!(c, ModelConfig::dense(512, 8, 8, 4));
        let mut s = spec("tiny");
        s.hidden_size = Some(128);
        s.num_hidden_layers = Some(3);
        let c = resolve_model(&s, Some(1000)).unwrap();
        assert_eq!((c.hidden_size, c.num_hidden_layers, c.head_dim, c.vocab_size), (128, 3, 32, 1000));
        assert_eq!(c.intermediate_size, default_intermediate_size(128));
        let mut yarn = spec("tiny");
        yarn.inference_rope_scaling = Some(true);
        assert_eq!(resolve_model(&yarn, None).unwrap().rope_scaling, Some(RopeScaling::reference_yarn()));
        let moe = resolve_model(&spec("minimind-3-moe"), None).unwrap();
        assert!(moe.use_moe && moe.num_experts == 4);
        let tiny_moe = resolve_model(&spec("tiny-moe"), Some(400)).unwrap();
        assert!(tiny_moe.use_moe && tiny_moe.num_experts == 4 && tiny_moe.router_aux_loss_coef > 0.0);
        assert_eq!((tiny_moe.hidden_size, tiny_moe.vocab_size), (64, 400));
    }

    #[test]
    fn explicit_shape_without_preset() {
        let s = ModelSpec {
            hidden_size: Some(96),
            num_hidden_layers: Some(2),
            num_attention_heads: Some(6),
            num_key_value_heads: Some(2),
            ..Default::default()
        };
        let c = resolve_model(&s, None).unwrap();
        assert_eq!((c.head_dim, c.num_key_value_heads), (16, 2));
        let e = resolve_model(&ModelSpec::default(), None).unwrap_err();
        assert_eq!(e.key, Some("hidden_size"));
    }

    #[test]
    fn shape_errors_name_the_key() {
        let e = resolve_model(&spec("minimind-smal"), None).unwrap_err();
        assert_eq!(e.key, Some("preset"));
        assert!(e.message.contains("did you mean 'minimind-small'?"), "{e}");

        let mut s = spec("tiny");
        s.num_attention_heads = Some(3);
        assert_eq!(resolve_model(&s, None).unwrap_err().key, Some("num_attention_heads"));

        let mut s = spec("tiny");
        s.num_key_value_heads = Some(3);
        assert_eq!(resolve_model(&s, None).unwrap_err().key, Some("num_key_value_heads"));

        let mut s = spec("tiny");
        s.vocab_size = Some(100);
        assert_eq!(resolve_model(&s, Some(6400)).unwrap_err().key, Some("vocab_size"));

        let mut s = spec("minimind-3-moe");
        s.num_experts_per_tok = Some(5);
        assert_eq!(resolve_model(&s, None).unwrap_err().key, Some("num_experts_per_tok"));
    }
}
