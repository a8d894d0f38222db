//! `mmrun export <model> --to hf|gguf|ollama <dir>`: a resolved model ([`crate::modelref`]) written
//! as a transformers folder with a model card, a llama.cpp GGUF file, or an Ollama folder (GGUF +
//! `Modelfile`).
//!
//! Nothing partial ever appears at the target: everything is written into a temporary sibling
//! (`.<name>.mmrun-tmp-<pid>`) and renamed into place at the end. An existing target is refused
//! unless `force` is set, and then replaced only once the new export is complete.

pub mod gguf;
mod ollama;

use crate::modelref::{Origin, ResolvedModel};
use anyhow::{bail, Context};
use std::path::{Path, PathBuf};

pub use gguf::GgufDtype;

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A folder transformers loads (`AutoModelForCausalLM`, `AutoTokenizer`) with a model card.
    Hf,
    /// `model.gguf` for llama.cpp.
    Gguf,
    /// `model.gguf` + `Modelfile` for `ollama create`.
    Ollama,
}

/// What to export and how.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The format.
    pub format: Format,
    /// The target folder.
    pub out: PathBuf,
    /// GGUF tensor type.
    pub dtype: GgufDtype,
    /// Replace an existing target.
    pub force: bool,
    /// For a LoRA stage: export the adapter (PEFT layout) instead of the merged model.
    pub adapter: bool,
    /// Run records, to put the recipe, lock, metrics and eval table into the model card.
    pub runs_dir: Option<PathBuf>,
}

/// Files copied from a model folder into an `hf` export.
const MODEL_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];
/// Files of a PEFT adapter export.
const ADAPTER_FILES: &[&str] = &[
    "adapter_config.json",
    "adapter_model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// Export `model`; returns the target folder.
pub fn export(model: &ResolvedModel, opts: &ExportOptions) -> anyhow::Result<PathBuf> {
    let out = &opts.out;
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
    if out.exists() && !opts.force {
        bail!(
            "export of '{}': {} already exists; choose another folder or pass --force to replace it",
            model.reference,
            out.display()
        );
    }
    if opts.adapter && model.kind != crate::artifact::ArtifactKind::Adapter {
        bail!("export of '{}': --adapter needs a LoRA stage, but this is a full model", model.reference);
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).with_context(|| format!("creating {}", parent.display()))?;
    let tmp = parent.join(format!(".{name}.mmrun-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let res = write_into(model, opts, &name, &tmp).and_then(|()| replace(&tmp, out));
    if let Err(e) = res {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(disk_hint(e, model, &parent));
    }
    Ok(out.clone())
}

fn write_into(model: &ResolvedModel, opts: &ExportOptions, name: &str, tmp: &Path) -> anyhow::Result<()> {
    let src = match opts.format {
        _ if opts.adapter => model.dir.as_path(),
        Format::Hf => model.full_model_dir()?,
        Format::Gguf => model.text_model_dir("export to GGUF")?,
        Format::Ollama => model.text_model_dir("export to Ollama")?,
    };
    match opts.format {
        Format::Hf => {
            let files = if opts.adapter { ADAPTER_FILES } else { MODEL_FILES };
            copy_present(src, tmp, files)?;
            // Sharded weights: every file the index names.
            let index = src.join("model.safetensors.index.json");
            if !opts.adapter && index.is_file() {
                let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
                let mut shards: Vec<&str> = v["weight_map"]
                    .as_object()
                    .into_iter()
                    .flat_map(|m| m.values())
                    .filter_map(|s| s.as_str())
                    .collect();
                shards.sort();
                shards.dedup();
                for s in shards {
                    if s.contains('/') || s.contains("..") {
                        bail!("{}: shard name '{s}' leaves the folder", index.display());
                    }
                    copy_present(src, tmp, &[s])?;
                }
            }
            std::fs::write(tmp.join("README.md"), model_card(model, opts, name))?;
        }
        Format::Gguf => gguf::write(src, name, opts.dtype, &tmp.join("model.gguf"))?,
        Format::Ollama => {
            gguf::write(src, name, opts.dtype, &tmp.join("model.gguf"))?;
            std::fs::write(tmp.join("Modelfile"), ollama::modelfile(src, "./model.gguf")?)?;
        }
    }
    Ok(())
}

fn copy_present(src: &Path, dst: &Path, files: &[&str]) -> anyhow::Result<()> {
    for f in files {
        let p = src.join(f);
        if p.is_file() {
            std::fs::copy(&p, dst.join(f)).with_context(|| format!("copying {}", p.display()))?;
        }
    }
    Ok(())
}

/// Move the finished `tmp` to `out` durably ([`crate::durable::publish_dir`]: every file is
/// fsynced before the rename), replacing an existing `out` only now. The old `out` is moved to a
/// sibling of our own first and put back if the new one cannot take its place.
fn replace(tmp: &Path, out: &Path) -> anyhow::Result<()> {
    let publish = || {
        crate::durable::publish_dir(tmp, out)
            .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))
    };
    if std::fs::symlink_metadata(out).is_err() {
        return publish();
    }
    let name = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let old = tmp.with_file_name(format!(".{name}.mmrun-old-{}", std::process::id()));
    std::fs::rename(out, &old).with_context(|| format!("moving the old {} aside", out.display()))?;
    if let Err(e) = publish() {
        let _ = std::fs::rename(&old, out);
        return Err(e);
    }
    let _ = if old.is_dir() { std::fs::remove_dir_all(&old) } else { std::fs::remove_file(&old) };
    crate::durable::fsync_dir(out.parent().unwrap_or(Path::new(".")));
    Ok(())
}

/// Turn a full disk into one line that says what to do.
fn disk_hint(e: anyhow::Error, model: &ResolvedModel, parent: &Path) -> anyhow::Error {
    let full = e
        .chain()
        .any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::StorageFull));
    if full {
        anyhow::anyhow!(
            "export of '{}': not enough disk space in {} (nothing was left behind); free space or export elsewhere",
            model.reference,
            parent.display()
        )
    } else {
        e.context(format!("exporting '{}'", model.reference))
    }
}

/// The chat template of a model folder (`tokenizer_config.json`, else `chat_template.jinja`).
pub(crate) fn chat_template(dir: &Path) -> Option<String> {
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).ok()?).ok()?;
    match tc.get("chat_template") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
    }
}

/// `README.md`: what the model is, how it was made (recipe, lock, metrics, eval table) and how
/// to load it.
fn model_card(model: &ResolvedModel, opts: &ExportOptions, name: &str) -> String {
    let mut s = format!(
        "---\nlibrary_name: {}\ntags:\n- mmrun\n- minimind\n---\n\n# {name}\n\nExported by mmrun {} from {}.\n\n",
        if opts.adapter { "peft" } else { "transformers" },
        crate::VERSION,
        model.origin
    );
    if opts.adapter {
        s += "A LoRA adapter in PEFT's layout; load it onto its base model with `peft.PeftModel.from_pretrained`.\n\n";
    } else {
        let auto = if model.kind == crate::artifact::ArtifactKind::RewardModel {
            s += "A reward model (`Qwen3ForSequenceClassification`, `num_labels = 1`): it scores a conversation at its last non-pad token.\n\n";
            "AutoModelForSequenceClassification"
        } else {
            "AutoModelForCausalLM"
        };
        s += &format!("```python\nfrom transformers import {auto}, AutoTokenizer\n");
        s += &format!(
            "tok = AutoTokenizer.from_pretrained(\"{name}\")\nmodel = {auto}.from_pretrained(\"{name}\")\n```\n\n"
        );
    }
    let key = match &model.origin {
        Origin::Stage { key, .. } | Origin::Run { key, .. } => Some(key.as_str()),
        _ => None,
    };
    let run = match &model.origin {
        Origin::Run { run_dir, .. } => crate::runs::find_run(run_dir, &run_dir.display().to_string()).ok(),
        _ => key.and_then(|k| newest_run_with(opts.runs_dir.as_deref()?, k)),
    };
    let Some(run) = run else {
        s += "No mmrun run record was found for this model, so its recipe is not included.\n";
        return s;
    };
    let r = &run.record;
    s += &format!("## How it was made\n\nRun `{}` of recipe `{}` ({}).\n\n", r.id, r.recipe_name, r.recipe_path);
    if !r.overrides.is_empty() {
        s += &format!("Overrides: `{}`\n\n", r.overrides.join("` `"));
    }
    s += &format!("### Recipe\n\n```toml\n{}\n```\n\n", r.recipe_text.trim_end());
    if let Ok(lock) = serde_json::to_string_pretty(&r.lock) {
        s += &format!("### Lock (datasets, stage keys, mmrun version)\n\n```json\n{lock}\n```\n\n");
    }
    s += "### Stage metrics\n\n| stage | kind | status | metrics |\n|---|---|---|---|\n";
    for st in &r.stages {
        let m: Vec<String> = st.metrics.iter().map(|(k, v)| format!("{k}={v}")).collect();
        s += &format!("| {} | {} | {} | {} |\n", st.name, st.kind, st.status.as_str(), m.join(", "));
    }
    let evals: Vec<_> = r.stages.iter().filter(|st| st.kind == "eval" && !st.metrics.is_empty()).collect();
    if !evals.is_empty() {
        s += "\n### Evaluation\n\n| eval stage | metric | value |\n|---|---|---|\n";
        for st in evals {
            for (k, v) in &st.metrics {
                s += &format!("| {} | {k} | {v} |\n", st.name);
            }
        }
    }
    s
}

/// The newest run record that built or used stage key `key`.
fn newest_run_with(runs_dir: &Path, key: &str) -> Option<crate::runs::RunSummary> {
    crate::runs::list_runs(runs_dir).ok()?.into_iter().rev().find(|r| r.record.stages.iter().any(|s| s.key == key))
}

#[cfg(test)]
mod tests {
    use super::replace;

    fn names(dir: &std::path::Path) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }

    #[test]
    fn replace_swaps_folders_and_restores_the_old_one_when_the_new_one_cannot_be_published() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("tiny");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("a.txt"), "old").unwrap();
        // A file of the user's whose name looks like one of ours is never touched.
        std::fs::write(t.path().join(".tiny.old"), "mine").unwrap();

        // The new folder vanished before it could be published: the old one is back in place.
        let gone = t.path().join(".tiny.mmrun-tmp-1");
        assert!(replace(&gone, &out).is_err());
        assert_eq!(std::fs::read_to_string(out.join("a.txt")).unwrap(), "old");
        assert_eq!(names(t.path()), [".tiny.old", "tiny"]);

        let new = t.path().join(".tiny.mmrun-tmp-2");
        std::fs::create_dir(&new).unwrap();
        std::fs::write(new.join("b.txt"), "new").unwrap();
        replace(&new, &out).unwrap();
        assert_eq!(names(&out), ["b.txt"]);
        assert_eq!(names(t.path()), [".tiny.old", "tiny"], "nothing left beside it");
        assert_eq!(std::fs::read_to_string(t.path().join(".tiny.old")).unwrap(), "mine");
    }
}
