//! `kind = "tokenizer"`: train a byte-level BPE tokenizer exactly as the reference does (spec §6.1)
//! or adopt an existing one (`source = "<dir or tokenizer.json>"`).
//!
//! Training: HF `tokenizers` BPE, ByteLevel pre-tokenizer (no prefix space, GPT-2 regex) and
//! decoder, no normalizer, no post-processor; the 36 MiniMind special tokens take ids 0..35 (the
//! first 21 special, the tool/think/buffer ones `special: false` so decoding keeps them), then the
//! 256 byte tokens. The training text of one record is the newline-join of its non-empty texts
//! (for chat: all message contents, as the reference). `tokenizer_config.json` carries the
//! reference fields and chat template.
//!
//! Adopting copies `tokenizer.json` (and `tokenizer_config.json`, adding the reference template
//! when it has none) unchanged, so encodings are preserved bit for bit.

use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::artifact::{layout, ArtifactKind};
use crate::cancel::Interrupted;
use crate::data::chat::REFERENCE_TEMPLATE;
use crate::data::read::{for_each_example, Example};
use crate::data::spec::DataFormat;
use crate::data::tokenize::TextTokenizer;
use crate::data::DataError;
use crate::hub::uri::{HubUri, RemoteKind};
use crate::hub::FetchedRepo;
use crate::recipe::RemoteSource;
use anyhow::{bail, Context};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

/// The 36 MiniMind special tokens, ids 0..35 (spec §6.2).
pub const SPECIAL_TOKENS: [&str; 36] = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<|audio_pad|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|buffer1|>",
    "<|buffer2|>",
    "<|buffer3|>",
    "<|buffer4|>",
    "<|buffer5|>",
    "<|buffer6|>",
    "<|buffer7|>",
    "<|buffer8|>",
    "<|buffer9|>",
];

/// Tokens from this id on are written `special: false` (tool/think/buffer tags).
pub const FIRST_NON_SPECIAL: usize = 21;

/// Parameters of the tokenizer stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenizerParams {
    /// Datasets whose text trains the BPE (any format).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub data: Vec<String>,
    /// Adopt an existing tokenizer instead of training: a directory holding `tokenizer.json`, or
    /// the file itself (relative to the recipe), or an `hf://` URI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Vocabulary size, special and byte tokens included.
    #[serde(default = "default_vocab")]
    pub vocab_size: usize,
    /// Train on at most this many records (0 = all; the reference uses 10000 lines).
    #[serde(default)]
    pub max_texts: usize,
}

fn default_vocab() -> usize {
    6400
}

impl StageParams for TokenizerParams {
    fn inputs(&self) -> Vec<InputRef> {
        self.data
            .iter()
            .map(|d| InputRef::Dataset { param: "data", dataset: d.clone(), accepts: DataFormat::ALL })
            .collect()
    }

    /// An adopted local tokenizer: `tokenizer.json` and, when present, its `tokenizer_config.json`
    /// (the two files [`adopt`] copies). `hf://` sources are [`Self::remote_sources`] instead.
    fn local_files(&self, recipe_dir: &Path) -> Vec<(&'static str, PathBuf)> {
        let Some(src) = self.source.as_deref().filter(|s| !s.starts_with("hf://")) else { return Vec::new() };
        let p = recipe_dir.join(src);
        let tj = if p.is_dir() { p.join(layout::TOKENIZER_JSON) } else { p };
        let cfg = tj.with_file_name(layout::TOKENIZER_CONFIG_JSON);
        let mut v = vec![("source", tj)];
        if cfg.is_file() {
            v.push(("source", cfg));
        }
        v
    }

    fn remote_sources(&self) -> Vec<RemoteSource> {
        let uri = self.source.as_deref().filter(|s| s.starts_with("hf://")).and_then(|s| HubUri::parse(s).ok());
        uri.map(|uri| RemoteSource { param: "source", kind: RemoteKind::Tokenizer, uri }).into_iter().collect()
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        if let Some(Err(e)) = self.source.as_deref().filter(|s| s.starts_with("hf://")).map(HubUri::parse) {
            return Err(InvalidParam {
                key: "source",
                message: e.problem,
                hint: "write hf://<owner>/<name>[@<revision>][/<folder or tokenizer.json>]".into(),
            });
        }
        if self.source.is_none() {
            // Training one needs text; adopting one (`source = …`) reads none.
            crate::stages::training::non_empty(
                "data",
                &self.data,
                "name at least one dataset, e.g. data = [\"text\"]",
            )?;
        }
        if self.source.is_none() && self.vocab_size < MIN_VOCAB_SIZE {
            // Caught here, at the recipe's line, rather than when the stage starts training.
            return Err(crate::recipe::InvalidParam {
                key: "vocab_size",
                message: format!("vocab_size = {} cannot hold the tokenizer's fixed tokens", self.vocab_size),
                hint: format!(
                    "use {MIN_VOCAB_SIZE} or more ({} special + 256 byte tokens; MiniMind uses 6400)",
                    SPECIAL_TOKENS.len()
                ),
            });
        }
        crate::stages::training::at_least("vocab_size", self.vocab_size, 2)
    }
}

/// The tokenizer stage.
pub struct TokenizerStage;

impl StageKind for TokenizerStage {
    const KIND: &'static str = "tokenizer";
    const VERSION: u32 = 1;
    const OUTPUT: ArtifactKind = ArtifactKind::Tokenizer;
    const DOC: &'static str =
        "Train a byte-level BPE tokenizer (MiniMind special tokens and chat template) or adopt one";
    type Params = TokenizerParams;
}

impl Stage for TokenizerStage {
    fn run(&self, ctx: &mut StageContext<'_>, params: &Self::Params) -> anyhow::Result<StageOutcome> {
        let started = std::time::Instant::now();
        let mut metrics = serde_json::Map::new();
        match (&params.source, params.data.is_empty()) {
            (Some(_), false) => bail!("stage '{}': give either `source` (adopt) or `data` (train), not both", ctx.name),
            (None, true) => bail!("stage '{}': set `data = [\"<dataset>\", …]` to train a tokenizer or `source = \"<path>\"` to adopt one", ctx.name),
            (Some(src), true) => {
                let recipe_dir = ctx.recipe.path.parent().unwrap_or(Path::new("."));
                let tj = if src.starts_with("hf://") {
                    fetched_tokenizer(src, ctx.inputs.remote("source")?)
                } else {
                    adopt_location(src, recipe_dir)
                };
                tj.and_then(|tj| adopt(&tj, ctx.out_dir)).with_context(|| format!("stage '{}'", ctx.name))?;
                metrics.insert("adopted".into(), json!(src));
            }
            (None, false) => {
                let (tok, count) = train_streaming(ctx, params)?;
                write_trained(&tok, ctx.out_dir)?;
                metrics.insert("texts".into(), json!(count));
            }
        }
        // Validate what we wrote: it loads and has the markers the loss masks need.
        let t = TextTokenizer::from_dir(ctx.out_dir).context("the tokenizer artifact does not load")?;
        metrics.insert("vocab_size".into(), json!(t.vocab_size()));
        metrics.insert("seconds".into(), json!(started.elapsed().as_secs_f64()));
        Ok(StageOutcome { metrics })
    }
}

/// Train on the stage's datasets. The texts stream to the BPE trainer on its own thread through a
/// bounded channel, so memory holds the trainer's word counts (they grow with the distinct words,
/// not with the text) and never the corpus. This thread polls Ctrl-C while it reads and while the
/// trainer counts and merges, which the `tokenizers` crate cannot be asked to stop: on Ctrl-C the
/// stage returns [`Interrupted`] at once and the abandoned trainer thread ends with the process.
/// Nothing is written before training finished, so an interrupted stage leaves nothing behind.
fn train_streaming(ctx: &StageContext<'_>, params: &TokenizerParams) -> anyhow::Result<(tokenizers::Tokenizer, usize)> {
    check_vocab_size(params.vocab_size)?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<String>(256);
    let vocab_size = params.vocab_size;
    let trainer = std::thread::Builder::new()
        .name("bpe-trainer".into())
        .spawn(move || train(rx, vocab_size))
        .context("cannot start the tokenizer trainer thread")?;
    let limit = params.max_texts;
    let mut count = 0usize;
    for name in &params.data {
        let ds = ctx.inputs.dataset(name)?;
        let res = for_each_example(ds, Some(ctx.run as _), |ex| {
            if ctx.cancel.is_cancelled() {
                return Err(Stop::Cancelled);
            }
            if limit == 0 || count < limit {
                tx.send(training_text(&ex)).map_err(|_| Stop::TrainerFailed)?;
                count += 1;
            }
            Ok(())
        });
        match res {
            Err(Stop::Cancelled) => return Err(Interrupted.into()),
            Err(Stop::Data(e)) => return Err(e).with_context(|| format!("stage '{}'", ctx.name)),
            // The trainer stopped reading: `join` below reports why.
            Err(Stop::TrainerFailed) => break,
            Ok(_) => {}
        }
    }
    drop(tx);
    let bar = crate::data::progress_spinner(&format!("training BPE tokenizer on {count} texts"));
    while !trainer.is_finished() {
        if ctx.cancel.is_cancelled() {
            bar.abandon();
            return Err(Interrupted.into());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bar.finish_and_clear();
    let tok = trainer.join().map_err(|_| anyhow::anyhow!("stage '{}': the tokenizer trainer panicked", ctx.name))??;
    Ok((tok, count))
}

/// Why the texts stopped flowing to the trainer.
enum Stop {
    Cancelled,
    Data(DataError),
    TrainerFailed,
}

impl From<DataError> for Stop {
    fn from(e: DataError) -> Self {
        Stop::Data(e)
    }
}

/// The text one record contributes to tokenizer training.
pub fn training_text(ex: &Example) -> String {
    let join = |msgs: &mut dyn Iterator<Item = &crate::data::Message>| {
        msgs.filter(|m| !m.content.is_empty()).map(|m| m.content.as_str()).collect::<Vec<_>>().join("\n")
    };
    match ex {
        Example::Text { text } => text.clone(),
        Example::Chat { messages, .. } => join(&mut messages.iter()),
        Example::Preference { prompt, chosen, rejected, .. } => join(&mut prompt.iter().chain(chosen).chain(rejected)),
        Example::PromptAnswer { prompt, answer, .. } => format!("{prompt}\n{answer}"),
    }
}

/// A trained vocabulary holds every special token and every byte.
const MIN_VOCAB_SIZE: usize = SPECIAL_TOKENS.len() + 256;

fn check_vocab_size(vocab_size: usize) -> anyhow::Result<()> {
    if vocab_size < MIN_VOCAB_SIZE {
        bail!(
            "vocab_size = {vocab_size} is too small: it must be at least {MIN_VOCAB_SIZE} ({} special + 256 byte tokens)",
            SPECIAL_TOKENS.len()
        );
    }
    Ok(())
}

/// Train a byte-level BPE with the MiniMind special tokens (ids 0..35). The texts are consumed as
/// they come: memory holds the word counts, not the corpus.
pub fn train<I, S>(texts: I, vocab_size: usize) -> anyhow::Result<tokenizers::Tokenizer>
where
    I: IntoIterator<Item = S>,
    I::IntoIter: Send,
    S: AsRef<str> + Send,
{
    use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper};
    check_vocab_size(vocab_size)?;
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(vocab_size)
        .min_frequency(0)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(SPECIAL_TOKENS.iter().map(|s| AddedToken::from(s.to_string(), true)).collect())
        .build();
    let mut tok = tokenizers::TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(ByteLevel::new(false, true, true).into()))
    .with_post_processor(None)
    .with_decoder(Some(ByteLevel::new(false, true, true).into()))
    .build()
    .map_err(|e| anyhow::anyhow!("building the tokenizer: {e}"))?;
    tok.train(&mut trainer, texts.into_iter()).map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    // As the reference: rewrite the tool/think/buffer tags to `special: false` in tokenizer.json.
    let generic: tokenizers::Tokenizer = tok.into();
    let mut j: Value = serde_json::from_str(&generic.to_string(false).map_err(|e| anyhow::anyhow!("{e}"))?)?;
    if let Some(added) = j.get_mut("added_tokens").and_then(Value::as_array_mut) {
        for t in added {
            let id = t.get("id").and_then(Value::as_u64).unwrap_or(0) as usize;
            t["special"] = json!(id < FIRST_NON_SPECIAL);
        }
    }
    let out: tokenizers::Tokenizer = j.to_string().parse().map_err(|e| anyhow::anyhow!("reloading: {e}"))?;
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        if out.token_to_id(s) != Some(i as u32) {
            bail!("internal: special token {s} did not get id {i}");
        }
    }
    Ok(out)
}

/// The reference `tokenizer_config.json` (spec §6.2) with the reference chat template.
pub fn reference_config() -> Value {
    let mut decoder = serde_json::Map::new();
    for (i, s) in SPECIAL_TOKENS.iter().enumerate() {
        decoder.insert(
            i.to_string(),
            json!({"content": s, "lstrip": false, "normalized": false, "rstrip": false,
                   "single_word": false, "special": i < FIRST_NON_SPECIAL}),
        );
    }
    json!({
        "add_bos_token": false,
        "add_eos_token": false,
        "add_prefix_space": false,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": SPECIAL_TOKENS[1..FIRST_NON_SPECIAL],
        "bos_token": "<|im_start|>",
        "clean_up_tokenization_spaces": false,
        "eos_token": "<|im_end|>",
        "legacy": true,
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "sp_model_kwargs": {},
        "spaces_between_special_tokens": false,
        "unk_token": "<|endoftext|>",
        "chat_template": REFERENCE_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    })
}

fn write_trained(tok: &tokenizers::Tokenizer, out: &Path) -> anyhow::Result<()> {
    let tj = out.join(layout::TOKENIZER_JSON);
    tok.save(&tj, false).map_err(|e| anyhow::anyhow!("{}: {e}", tj.display()))?;
    let cfg = out.join(layout::TOKENIZER_CONFIG_JSON);
    std::fs::write(&cfg, serde_json::to_string_pretty(&reference_config())?)
        .with_context(|| cfg.display().to_string())?;
    Ok(())
}

/// The tokenizer file of an `hf://` source, among the files exec fetched through the lock (the
/// `.json` file that is not `tokenizer_config.json`, which [`RemoteKind::Tokenizer`] selects next
/// to it).
fn fetched_tokenizer(src: &str, fetched: &FetchedRepo) -> anyhow::Result<PathBuf> {
    fetched
        .files
        .iter()
        .find(|f| !f.repo_path.ends_with(layout::TOKENIZER_CONFIG_JSON))
        .map(|f| f.local_path.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "tokenizer source '{src}': no tokenizer.json at commit {} (point at the folder holding it, or the file)",
                fetched.commit
            )
        })
}

/// Where a local adopted tokenizer's file is.
fn adopt_location(src: &str, recipe_dir: &Path) -> anyhow::Result<PathBuf> {
    let p = recipe_dir.join(src);
    let dir = if p.is_dir() { p.clone() } else { p.parent().map(Path::to_path_buf).unwrap_or_default() };
    let tj = if p.is_dir() { p.join(layout::TOKENIZER_JSON) } else { p.clone() };
    if !tj.is_file() {
        bail!("tokenizer source '{src}': {} not found (give a folder with tokenizer.json, or the file)", tj.display());
    }
    Ok(dir.join(tj.file_name().expect("a file name")))
}

/// Copy tokenizer file `tj` (and the `tokenizer_config.json` next to it) into `out`.
fn adopt(tj: &Path, out: &Path) -> anyhow::Result<()> {
    std::fs::copy(tj, out.join(layout::TOKENIZER_JSON)).with_context(|| format!("copying {}", tj.display()))?;
    let cfg_src = tj.with_file_name(layout::TOKENIZER_CONFIG_JSON);
    let cfg_dst = out.join(layout::TOKENIZER_CONFIG_JSON);
    if cfg_src.is_file() {
        let text = std::fs::read_to_string(&cfg_src).with_context(|| cfg_src.display().to_string())?;
        let mut cfg: Value = serde_json::from_str(&text).with_context(|| cfg_src.display().to_string())?;
        if cfg.get("chat_template").is_none() {
            cfg["chat_template"] = json!(REFERENCE_TEMPLATE);
            std::fs::write(&cfg_dst, serde_json::to_string_pretty(&cfg)?)?;
        } else {
            // Byte-identical copy: keeps every field the source model expects.
            std::fs::copy(&cfg_src, &cfg_dst)?;
        }
    } else {
        std::fs::write(&cfg_dst, serde_json::to_string_pretty(&reference_config())?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_reference_layout() {
        let p = crate::data::builtin::ArithmeticParams {
            count: 400,
            seed: 1,
            test: false,
            max_operand: 50,
            solution: crate::data::builtin::Solution::Equation,
        };
        let texts: Vec<String> = crate::data::builtin::arithmetic(&p)
            .iter()
            .map(|pr| format!("{}\n{}", pr.question, pr.reply))
            .chain(["天龙八部 传染病是指由病原微生物".to_string()])
            .collect();
        let tok = train(&texts, 600).unwrap();
        // A tiny corpus runs out of merges before 600; the size is an upper bound.
        assert!((500..=600).contains(&tok.get_vocab_size(true)), "{}", tok.get_vocab_size(true));
        let j: Value = serde_json::from_str(&tok.to_string(false).unwrap()).unwrap();
        let added = j["added_tokens"].as_array().unwrap();
        assert_eq!(added.len(), 36);
        assert_eq!(added[2]["content"], "<|im_end|>");
        assert_eq!(added[2]["special"], true);
        assert_eq!(added[25]["content"], "<think>");
        assert_eq!(added[25]["special"], false);
        assert!(j["normalizer"].is_null() && j["post_processor"].is_null());
        assert_eq!(j["pre_tokenizer"]["type"], "ByteLevel");
        assert_eq!(j["pre_tokenizer"]["add_prefix_space"], false);
        assert_eq!(tok.token_to_id("!"), Some(36));
        // Round trip, any bytes; think tags survive skip_special decoding.
        let s = "What is 12 plus 7? <think>\n\n</think> 天龙 🙂";
        let ids = tok.encode(s, false).unwrap().get_ids().to_vec();
        assert_eq!(tok.decode(&ids, true).unwrap(), s);
        assert_eq!(tok.encode("<|im_start|>", false).unwrap().get_ids(), &[1]);

        let dir = tempfile::tempdir().unwrap();
        write_trained(&tok, dir.path()).unwrap();
        let t = TextTokenizer::from_dir(dir.path()).unwrap();
        assert_eq!(t.assistant_start[0], 1);
        assert_eq!(t.turn_end[0], 2);
        assert!(train(&texts, 100).unwrap_err().to_string().contains("too small"));
    }

    #[test]
    fn adopting_preserves_encodings() {
        let Some(d) = crate::testutil::shared_data() else { return };
        let out = tempfile::tempdir().unwrap();
        let adopt = |src: &str, d: &Path, out: &Path| adopt_location(src, d).and_then(|tj| adopt(&tj, out));
        adopt("minimind_tokenizer", &d, out.path()).unwrap();
        let t = TextTokenizer::from_dir(out.path()).unwrap();
        assert_eq!(t.encode("<|im_start|>assistant\n").unwrap(), vec![1, 1388, 570, 811, 234]);
        assert_eq!(t.vocab_size(), 6400);
        let orig = std::fs::read(d.join("minimind_tokenizer/tokenizer.json")).unwrap();
        assert_eq!(std::fs::read(out.path().join("tokenizer.json")).unwrap(), orig);
        // The file form works too; a missing one says what to do.
        let out2 = tempfile::tempdir().unwrap();
        adopt("minimind_tokenizer/tokenizer.json", &d, out2.path()).unwrap();
        let e = adopt("nope", &d, out2.path()).unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
        // Our reference config equals the shipped one field by field.
        let shipped: Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("minimind_tokenizer/tokenizer_config.json")).unwrap())
                .unwrap();
        let ours = reference_config();
        for (k, v) in ours.as_object().unwrap() {
            assert_eq!(&shipped[k], v, "{k}");
        }
    }
}
