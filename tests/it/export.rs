//! `mmrun export`: transformers folders (files, model card, refusal of an existing target), GGUF
//! files read back by an independent reader (candle's GGUF reader and candle-transformers'
//! quantized Qwen3) with the same logits as mmrun, and Ollama Modelfiles.

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use mmrun::export::{export, ExportOptions, Format, GgufDtype};
use mmrun::model::weights;
use mmrun::modelref::{ResolvedModel, Resolver};
use std::path::{Path, PathBuf};

fn fixture(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(case)
}

/// A copy of a golden fixture with a byte-level BPE tokenizer (128 ids: three specials, then
/// byte-level characters) and the MiniMind chat template, as an mmrun model artifact holds.
fn model_folder(case: &str, root: &Path) -> PathBuf {
    let dir = root.join(case);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "model.safetensors", "golden.safetensors"] {
        std::fs::copy(fixture(case).join(f), dir.join(f)).unwrap();
    }
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for id in 3..128u32 {
        vocab.insert(char::from_u32(0x21 + id).unwrap().to_string(), id.into());
    }
    let added: Vec<_> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "special": true, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null, "decoder": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": [["d", "e"], ["f", "g"]]}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    let cfg = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "chat_template": mmrun::data::chat::REFERENCE_TEMPLATE,
    });
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let gen =
        serde_json::json!({"bos_token_id": 1, "eos_token_id": 2, "temperature": 0.85, "top_p": 0.85, "top_k": 50});
    std::fs::write(dir.join("generation_config.json"), gen.to_string()).unwrap();
    dir
}

fn resolve(dir: &Path) -> ResolvedModel {
    Resolver::default().resolve(dir.to_str().unwrap()).unwrap()
}

fn opts(format: Format, out: PathBuf, dtype: GgufDtype) -> ExportOptions {
    ExportOptions { format, out, dtype, force: false, adapter: false, runs_dir: None }
}

#[test]
fn hf_export_is_complete_refuses_existing_target_and_replaces_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let m = resolve(&model_folder("qwen3_tiny", tmp.path()));
    let out = tmp.path().join("exports/tiny");
    export(&m, &opts(Format::Hf, out.clone(), GgufDtype::F32)).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ] {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(card.contains("AutoModelForCausalLM") && card.contains("folder"), "{card}");
    // The exported folder loads back to the same logits.
    let a = weights::load_dir(&m.dir, &Device::Cpu, false).unwrap();
    let b = weights::load_dir(&out, &Device::Cpu, false).unwrap();
    let ids = Tensor::new(&[[1u32, 5, 9, 77]], &Device::Cpu).unwrap();
    let d = (a.forward_logits(&ids, None).unwrap() - b.forward_logits(&ids, None).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(d, 0.0);

    let e = export(&m, &opts(Format::Hf, out.clone(), GgufDtype::F32)).unwrap_err().to_string();
    assert!(e.contains("already exists") && e.contains("--force"), "{e}");
    std::fs::write(out.join("stale.txt"), "old").unwrap();
    export(&m, &ExportOptions { force: true, ..opts(Format::Hf, out.clone(), GgufDtype::F32) }).unwrap();
    assert!(!out.join("stale.txt").exists(), "--force replaces the whole folder");
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 1, "no temporary sibling left behind: {left:?}");

    // A failed export leaves nothing at the target.
    std::fs::remove_file(m.dir.join("tokenizer.json")).unwrap();
    let bad = tmp.path().join("exports/bad");
    assert!(export(&m, &opts(Format::Gguf, bad.clone(), GgufDtype::F32)).is_err());
    assert!(!bad.exists());
    let left: Vec<_> = std::fs::read_dir(out.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(left.len(), 1, "{left:?}");
}

fn last_logits_gguf(path: &Path, ids: &Tensor) -> Tensor {
    let mut f = std::fs::File::open(path).unwrap();
    let content = gguf_file::Content::read(&mut f).unwrap();
    let mut m =
        candle_transformers::models::quantized_qwen3::ModelWeights::from_gguf(content, &mut f, &Device::Cpu).unwrap();
    m.forward(ids, 0).unwrap().to_dtype(DType::F32).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    d / scale
}

#[test]
fn gguf_reads_back_in_candle_with_mmrun_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder("qwen3_tiny", tmp.path());
    let m = resolve(&dir);
    let golden = candle_core::safetensors::load(dir.join("golden.safetensors"), &Device::Cpu).unwrap();
    // candle's quantized Qwen3 runs one sequence at a time on the CPU.
    let ids = golden["input_ids"].to_dtype(DType::U32).unwrap().narrow(0, 0, 1).unwrap();
    let mmrun = weights::load_dir(&dir, &Device::Cpu, false).unwrap();
    let ours = mmrun.forward_logits(&ids, None).unwrap();
    let t = ids.dim(1).unwrap();
    let ours_last = ours.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap();

    // candle's quantized Qwen3 computes RoPE in f16 and, for q8_0, quantizes activations to 8 bits
    // too, so even the f32 file agrees to ~3e-4 of the largest logit, not bit for bit.
    for (dtype, tol) in
        [(GgufDtype::F32, 1e-3), (GgufDtype::F16, 3e-3), (GgufDtype::Bf16, 2e-2), (GgufDtype::Q8_0, 6e-2)]
    {
        let out = tmp.path().join(format!("gguf-{dtype:?}"));
        export(&m, &opts(Format::Gguf, out.clone(), dtype)).unwrap();
        let file = out.join("model.gguf");
        let mut f = std::fs::File::open(&file).unwrap();
        let c = gguf_file::Content::read(&mut f).unwrap();
        let md = |k: &str| c.metadata.get(k).unwrap_or_else(|| panic!("{k} missing"));
        assert_eq!(md("general.architecture").to_string().unwrap(), "qwen3");
        assert_eq!(md("tokenizer.ggml.model").to_string().unwrap(), "gpt2");
        assert_eq!(md("tokenizer.ggml.pre").to_string().unwrap(), "gpt-2");
        assert_eq!(md("tokenizer.ggml.tokens").to_vec().unwrap().len(), 128);
        assert_eq!(
            md("tokenizer.ggml.token_type").to_vec().unwrap()[1].to_i32().unwrap(),
            3,
            "specials are control tokens"
        );
        assert_eq!(md("tokenizer.ggml.merges").to_vec().unwrap()[0].to_string().unwrap(), "d e");
        assert_eq!(md("tokenizer.ggml.eos_token_id").to_u32().unwrap(), 2);
        assert!(md("tokenizer.chat_template").to_string().unwrap().contains("<|im_start|>"));
        for k in [
            "qwen3.block_count",
            "qwen3.context_length",
            "qwen3.embedding_length",
            "qwen3.feed_forward_length",
            "qwen3.attention.head_count",
            "qwen3.attention.head_count_kv",
            "qwen3.attention.key_length",
            "qwen3.attention.value_length",
            "qwen3.rope.freq_base",
            "qwen3.attention.layer_norm_rms_epsilon",
            "general.file_type",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.padding_token_id",
        ] {
            md(k);
        }
        for name in ["token_embd.weight", "output_norm.weight", "blk.1.attn_q_norm.weight", "blk.0.ffn_down.weight"] {
            assert!(c.tensor_infos.contains_key(name), "{name} missing");
        }
        assert!(!c.tensor_infos.contains_key("output.weight"), "tied embeddings are stored once");
        drop(f);

        let theirs = last_logits_gguf(&file, &ids);
        let d = max_rel_diff(&theirs, &ours_last);
        eprintln!("{dtype:?}: max |logit diff| / max |logit| = {d:.2e}");
        assert!(d < tol, "{dtype:?}: candle's quantized Qwen3 differs from mmrun by {d} (relative)");
    }
}

#[test]
fn gguf_moe_uses_qwen3moe_names() {
    let tmp = tempfile::tempdir().unwrap();
    let m = resolve(&model_folder("qwen3_moe_tiny", tmp.path()));
    let out = tmp.path().join("moe");
    export(&m, &opts(Format::Gguf, out.clone(), GgufDtype::F32)).unwrap();
    let (md, names) = mmrun::export::gguf::summary(&out.join("model.gguf")).unwrap();
    assert_eq!(md["general.architecture"].to_string().unwrap(), "qwen3moe");
    assert_eq!(md["qwen3moe.expert_count"].to_u32().unwrap(), 4);
    assert_eq!(md["qwen3moe.expert_used_count"].to_u32().unwrap(), 2);
    assert_eq!(md["qwen3moe.expert_feed_forward_length"].to_u32().unwrap(), 48);
    for n in [
        "blk.0.ffn_gate_inp.weight",
        "blk.0.ffn_gate_exps.weight",
        "blk.1.ffn_up_exps.weight",
        "blk.1.ffn_down_exps.weight",
    ] {
        assert!(names.iter().any(|x| x == n), "{n} missing from {names:?}");
    }
    let mut f = std::fs::File::open(out.join("model.gguf")).unwrap();
    let c = gguf_file::Content::read(&mut f).unwrap();
    let exps = c.tensor(&mut f, "blk.0.ffn_gate_exps.weight", &Device::Cpu).unwrap();
    assert_eq!(exps.shape().dims(), &[4, 48, 64], "[n_expert, ff, hidden] as llama.cpp stacks them");
}

#[test]
fn ollama_modelfile_translates_the_chat_template() {
    let tmp = tempfile::tempdir().unwrap();
    let m = resolve(&model_folder("qwen3_tiny", tmp.path()));
    let out = tmp.path().join("ollama");
    export(&m, &opts(Format::Ollama, out.clone(), GgufDtype::Q8_0)).unwrap();
    assert!(out.join("model.gguf").is_file());
    let mf = std::fs::read_to_string(out.join("Modelfile")).unwrap();
    assert!(mf.starts_with("FROM ./model.gguf\n"), "{mf}");
    assert!(mf.contains("<|im_start|>user\n{{ .Content }}<|im_end|>\n"), "{mf}");
    assert!(mf.contains("<|im_start|>system\n{{ .Content }}<|im_end|>\n"), "{mf}");
    assert!(mf.contains("<|im_start|>assistant\n<think>\n\n</think>\n\n{{ end }}"), "generation prompt: {mf}");
    assert!(mf.contains("PARAMETER stop \"<|im_end|>\""), "{mf}");
    assert!(mf.contains("PARAMETER temperature 0.85\nPARAMETER top_p 0.85\nPARAMETER top_k 50\n"), "{mf}");
}

#[test]
fn cli_exports_a_folder_and_names_what_it_tried() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model_folder("qwen3_tiny", tmp.path());
    let out = tmp.path().join("cli-gguf");
    let mmrun = || {
        let mut c = assert_cmd::Command::cargo_bin("mmrun").unwrap();
        c.current_dir(tmp.path())
            .env("MMRUN_HOME", tmp.path().join("home"))
            .env("MMRUN_RUNS_DIR", tmp.path().join("runs"));
        c
    };
    mmrun()
        .args(["export", dir.to_str().unwrap(), "--to", "gguf", "--dtype", "q8_0", out.to_str().unwrap()])
        .assert()
        .success();
    assert!(out.join("model.gguf").is_file());
    let o = mmrun().args(["export", "nosuch", "--to", "hf", "x"]).assert().code(1);
    let err = String::from_utf8_lossy(&o.get_output().stderr).to_string();
    assert!(err.contains("model 'nosuch' not found; tried") && err.contains("--recipe"), "{err}");
    assert!(!tmp.path().join("x").exists());
}

/// Writes `mmrun export --to hf` folders of the dense and MoE fixtures (with their tokenizer and
/// mmrun's logits in `golden.safetensors`) under `$MMRUN_EXPORT_DIR`, for
/// `scripts/check-hf-export.py`. A no-op without the variable.
#[test]
fn hf_export_for_transformers() {
    let Some(root) = std::env::var_os("MMRUN_EXPORT_DIR") else { return };
    let tmp = tempfile::tempdir().unwrap();
    for (case, name) in [("qwen3_tiny", "dense"), ("qwen3_moe_tiny", "moe")] {
        let dir = model_folder(case, tmp.path());
        let out = Path::new(&root).join(name);
        export(&resolve(&dir), &ExportOptions { force: true, ..opts(Format::Hf, out.clone(), GgufDtype::F32) })
            .unwrap();
        let m = weights::load_dir(&out, &Device::Cpu, false).unwrap();
        let ids =
            Tensor::from_vec((0..24u32).map(|i| (i * 37) % 128).collect::<Vec<_>>(), (2, 12), &Device::Cpu).unwrap();
        let map = std::collections::HashMap::from([
            ("input_ids".to_string(), ids.to_dtype(DType::I64).unwrap()),
            ("logits".to_string(), m.forward_logits(&ids, None).unwrap()),
        ]);
        candle_core::safetensors::save(&map, out.join("golden.safetensors")).unwrap();
    }
}

/// A reward model exports as the transformers classifier folder it is, and is refused, in one line
/// naming it and the fix, wherever text would have to be generated: GGUF, Ollama, chat, serve, and
/// as a `[models]` source for a stage that trains a causal LM.
#[test]
fn reward_models_export_to_hf_and_are_refused_where_text_is_generated() {
    use crate::common::{Sandbox, SMALL_RECIPE};
    let sb = Sandbox::new();
    let recipe = format!(
        "{SMALL_RECIPE}\n[datasets.pairs]\nsource = \"builtin:arithmetic\"\nformat = \"dpo\"\nbuiltin = {{ count = 16, seed = 4 }}\n\n\
         [stages.base]\nkind = \"pretrain\"\ntokenizer = \"tok\"\ndata = \"text\"\nmax_seq_len = 32\nbatch_size = 4\nmax_steps = 2\n\n\
         [stages.rm]\nkind = \"reward_model\"\nfrom = \"base\"\ndata = \"pairs\"\nmax_seq_len = 64\nbatch_size = 4\nmax_steps = 2\n"
    );
    sb.write("r.toml", &recipe);
    sb.run_ok(&["r.toml"]);
    let run = sb.last_run()["id"].as_str().unwrap().to_string();

    sb.run_ok(&["export", "rm", "--recipe", "r.toml", "--to", "hf", "rm_hf"]);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(sb.root().join("rm_hf/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "Qwen3ForSequenceClassification", "{cfg:#}");
    let tensors = weights::load_tensors(&sb.root().join("rm_hf/model.safetensors"), &Device::Cpu).unwrap();
    assert!(tensors.contains_key("score.weight") && !tensors.contains_key("lm_head.weight"));
    let card = std::fs::read_to_string(sb.root().join("rm_hf/README.md")).unwrap();
    assert!(card.contains("AutoModelForSequenceClassification"), "{card}");

    let refused = |args: &[&str], names: &str, purpose: &str| {
        let o = sb.run(args);
        assert_eq!(o.code, Some(1), "{args:?} should fail:\n{}", o.stderr);
        let line = o.stderr.lines().find(|l| l.contains("is a reward model")).unwrap_or_else(|| panic!("{}", o.stderr));
        for part in [names, purpose, "use the model it was trained from", "--to hf"] {
            assert!(line.contains(part), "{args:?}: {part:?} missing from: {line}");
        }
    };
    refused(&["export", "rm", "--recipe", "r.toml", "--to", "gguf", "g"], "stage 'rm'", "export to GGUF");
    refused(&["export", "rm", "--recipe", "r.toml", "--to", "ollama", "o"], "stage 'rm'", "export to Ollama");
    refused(&["export", "rm_hf", "--to", "gguf", "g"], "folder rm_hf", "export to GGUF");
    assert!(!sb.root().join("g").exists() && !sb.root().join("o").exists(), "nothing is left behind");
    let rm = format!("{run}:rm");
    refused(&["chat", &rm, "-p", "What is 1 plus 1?"], &format!("stage 'rm' of run {run}"), "chat or serve");
    refused(&["serve", &rm], "stage 'rm'", "chat or serve");

    // A released reward model is not a causal LM to fine-tune.
    sb.write(
        "import.toml",
        &format!("{SMALL_RECIPE}\n[models.ext]\nsource = \"rm_hf\"\n\n[stages.tune]\nkind = \"sft\"\nfrom = \"ext\"\ndata = \"chat\"\nmax_steps = 1\n"),
    );
    let o = sb.run(&["import.toml"]);
    assert_eq!(o.code, Some(1), "{}", o.stderr);
    assert!(
        o.stderr.contains("model 'ext': rm_hf is a reward model") && o.stderr.contains("point source at the causal LM"),
        "{}",
        o.stderr
    );
}
