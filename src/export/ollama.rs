//! The Ollama `Modelfile`: `FROM` the GGUF, a Go `TEMPLATE` translated from the model's Jinja chat
//! template, its stop tokens, and the sampling defaults of `generation_config.json`.
//!
//! The translation renders the Jinja template on marker messages and reads off what it puts around
//! each role's content and what the generation prompt adds, so any ChatML-like template (MiniMind's,
//! Qwen3's) becomes the equivalent Go template without hand-written per-model strings.

use crate::data::chat::ChatTemplate;
use crate::data::read::Message;
use anyhow::{bail, Context};
use std::path::Path;

const MARK: &str = "\u{1}MMRUN\u{1}";

fn msg(role: &str) -> Message {
    Message { role: role.into(), content: MARK.into(), reasoning_content: None, tool_calls: None }
}

/// (text before, text after) the content of a `role` message rendered after `context`.
fn around(t: &ChatTemplate, context: &[Message], role: &str) -> anyhow::Result<(String, String)> {
    let base = if context.is_empty() { String::new() } else { t.render(context, None, false, false)? };
    let mut all = context.to_vec();
    all.push(msg(role));
    let full = t.render(&all, None, false, false)?;
    let tail = full.strip_prefix(&base).context("the template re-renders earlier turns differently")?;
    let (pre, post) = tail.split_once(MARK).with_context(|| format!("the template drops {role} content"))?;
    Ok((pre.to_string(), post.to_string()))
}

/// The Go template equivalent to the Jinja chat template.
pub fn translate(t: &ChatTemplate) -> anyhow::Result<String> {
    let (sys_pre, sys_post) = around(t, &[], "system")?;
    let (user_pre, user_post) = around(t, &[], "user")?;
    let user = Message { content: "u".into(), ..msg("user") };
    let (asst_pre, asst_post) = around(t, std::slice::from_ref(&user), "assistant")?;
    let plain = t.render(std::slice::from_ref(&user), None, false, false)?;
    let gen = t.render(std::slice::from_ref(&user), None, true, false)?;
    let gen = gen.strip_prefix(&plain).context("the generation prompt changes earlier text")?.to_string();
    for piece in [&sys_pre, &sys_post, &user_pre, &user_post, &asst_pre, &asst_post, &gen] {
        if piece.contains("{{") {
            bail!("the chat template emits '{{{{', which a Go template cannot hold literally");
        }
    }
    Ok(format!(
        "{{{{- range $i, $_ := .Messages }}}}\n{{{{- $last := eq (len (slice $.Messages $i)) 1 }}}}\n\
{{{{- if eq .Role \"system\" }}}}{sys_pre}{{{{ .Content }}}}{sys_post}\n\
{{{{- else if eq .Role \"user\" }}}}{user_pre}{{{{ .Content }}}}{user_post}\n\
{{{{- else if eq .Role \"assistant\" }}}}{asst_pre}{{{{ .Content }}}}{{{{ if not $last }}}}{asst_post}{{{{ end }}}}\n\
{{{{- end }}}}\n{{{{- if and $last (ne .Role \"assistant\") }}}}{gen}{{{{ end }}}}\n{{{{- end }}}}"
    ))
}

/// The whole `Modelfile` for the model folder `dir`, pointing at `gguf`.
pub fn modelfile(dir: &Path, gguf: &str) -> anyhow::Result<String> {
    let tmpl_src = super::chat_template(dir)
        .with_context(|| format!("{}: no chat template; Ollama needs one to chat", dir.display()))?;
    let tmpl = ChatTemplate::new(&tmpl_src)?;
    let go = translate(&tmpl).context("translating the chat template for Ollama")?;
    let mut s = format!("FROM {gguf}\n\nTEMPLATE \"\"\"{go}\"\"\"\n\n");
    // Stop on the turn markers the template uses and on the eos token.
    let tc: serde_json::Value = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let mut stops: Vec<String> = ["<|im_end|>", "<|im_start|>", "<|endoftext|>"]
        .iter()
        .filter(|m| tmpl_src.contains(*m))
        .map(|m| m.to_string())
        .collect();
    if let Some(eos) = tc["eos_token"].as_str().or_else(|| tc["eos_token"]["content"].as_str()) {
        if !stops.iter().any(|s| s == eos) {
            stops.push(eos.to_string());
        }
    }
    for stop in stops {
        s += &format!("PARAMETER stop \"{stop}\"\n");
    }
    let gc: serde_json::Value = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    for key in ["temperature", "top_p", "top_k", "repetition_penalty"] {
        if let Some(v) = gc.get(key).filter(|v| v.is_number()) {
            let name = if key == "repetition_penalty" { "repeat_penalty" } else { key };
            s += &format!("PARAMETER {name} {v}\n");
        }
    }
    Ok(s)
}
