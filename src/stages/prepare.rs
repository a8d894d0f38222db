//! `kind = "prepare"`: tokenise a dataset with a tokenizer artifact into memory-mapped shards
//! (see [`crate::data::shards`] for the layout). The shards are the `Dataset` artifact.
//!
//! Resumable: chunks are built in `work_dir/shards/` (each written atomically); an interrupted
//! run (Ctrl-C between chunks, or SIGKILL at any moment) continues after the last complete chunk.
//! On success the files move into `out_dir`.

use super::{InputRef, InvalidParam, Stage, StageContext, StageKind, StageOutcome, StageParams};
use crate::artifact::ArtifactKind;
use crate::data::shards::{self, ShardError, ShardParams};
use crate::data::spec::DataFormat;
use crate::data::tokenize::TextTokenizer;
use anyhow::Context;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// Parameters of the prepare stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PrepareParams {
    /// The tokenizer stage (or a model stage: its tokenizer files are used).
    pub tokenizer: String,
    /// The dataset to tokenise.
    pub data: String,
    /// Longest sequence kept; longer ones are truncated (as the reference).
    #[serde(default = "default_max_seq_len")]
    pub max_seq_len: usize,
    /// Examples per shard chunk (the unit of resumption and of memory while building).
    #[serde(default = "default_chunk")]
    pub chunk_records: usize,
    /// Probability of a seeded random system prompt on chat data without one (reference 0.2).
    #[serde(default)]
    pub system_prompt_ratio: f64,
    /// Probability of a seeded removal of the empty think block (reference 0.8).
    #[serde(default)]
    pub drop_empty_think_ratio: f64,
}

fn default_max_seq_len() -> usize {
    512
}

fn default_chunk() -> usize {
    4096
}

impl StageParams for PrepareParams {
    fn inputs(&self) -> Vec<InputRef> {
        vec![
            InputRef::Stage {
                param: "tokenizer",
                stage: self.tokenizer.clone(),
                accepts: vec![ArtifactKind::Tokenizer, ArtifactKind::Model],
            },
            InputRef::Dataset { param: "data", dataset: self.data.clone(), accepts: DataFormat::ALL },
        ]
    }

    fn validate(&self) -> Result<(), InvalidParam> {
        crate::stages::training::at_least("max_seq_len", self.max_seq_len, 2)
    }
}

/// The prepare stage.
pub struct PrepareStage;

impl StageKind for PrepareStage {
    const KIND: &'static str = "prepare";
    const VERSION: u32 = shards::LAYOUT_VERSION;
    const OUTPUT: ArtifactKind = ArtifactKind::Dataset;
    const DOC: &'static str =
        "Tokenise a dataset once into memory-mapped shards (pretrain, SFT, DPO or prompt samples)";
    type Params = PrepareParams;
}

impl Stage for PrepareStage {
    fn run(&self, ctx: &mut StageContext<'_>, params: &Self::Params) -> anyhow::Result<StageOutcome> {
        let started = std::time::Instant::now();
        let ds = ctx.inputs.dataset(&params.data)?;
        let art = ctx.inputs.artifact(&params.tokenizer)?;
        let tok = TextTokenizer::from_dir(&art.dir).with_context(|| format!("stage '{}'", ctx.name))?;
        if params.max_seq_len < 4 {
            anyhow::bail!("stage '{}': max_seq_len = {} is too small (at least 4)", ctx.name, params.max_seq_len);
        }
        let sp = ShardParams {
            max_seq_len: params.max_seq_len,
            chunk_records: params.chunk_records,
            system_prompt_ratio: params.system_prompt_ratio,
            drop_empty_think_ratio: params.drop_empty_think_ratio,
            seed: ctx.recipe.meta.seed,
        };
        let work = ctx.work_dir.join("shards");
        let bar = crate::data::progress_spinner(&format!("tokenising {}", ds.name));
        let report = |n: usize| bar.set_message(format!("tokenising {}: {n} records", ds.name));
        let meta = match shards::build(ds, &tok, &sp, &work, ctx.cancel, &report) {
            Ok(m) => m,
            Err(ShardError::Interrupted(i)) => return Err(i.into()),
            Err(e) => return Err(e).with_context(|| format!("stage '{}': tokenising dataset '{}'", ctx.name, ds.name)),
        };
        bar.finish_and_clear();
        // Hard-link the finished shards into the artifact (same file system; a copy otherwise). The
        // work directory stays complete until the executor publishes and removes it, so a crash in
        // between never leaves a half-moved shard set behind.
        for entry in std::fs::read_dir(&work).with_context(|| work.display().to_string())? {
            let p = entry?.path();
            // Skip temp files of an interrupted atomic write (tempfile names start with a dot).
            let hidden = p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if hidden || !p.is_file() {
                continue;
            }
            let dst = ctx.out_dir.join(p.file_name().expect("a file name"));
            if std::fs::hard_link(&p, &dst).is_err() {
                std::fs::copy(&p, &dst).with_context(|| format!("copying {} to {}", p.display(), dst.display()))?;
            }
        }
        shards::TokenShards::open(ctx.out_dir).with_context(|| format!("stage '{}': verifying shards", ctx.name))?;
        let secs = started.elapsed().as_secs_f64();
        let t = &meta.totals;
        let mut metrics = serde_json::Map::new();
        metrics.insert("samples".into(), json!(t.samples));
        metrics.insert("tokens".into(), json!(t.tokens));
        metrics.insert("trained_tokens".into(), json!(t.trained_tokens));
        metrics.insert("skipped_bad_records".into(), json!(meta.read.skipped_bad));
        metrics.insert("skipped_empty_records".into(), json!(meta.read.skipped_empty));
        metrics.insert("dropped_no_loss".into(), json!(t.dropped_no_loss));
        metrics.insert("truncated".into(), json!(t.truncated));
        metrics.insert("seconds".into(), json!(secs));
        metrics.insert("tokens_per_s".into(), json!(t.tokens as f64 / secs.max(1e-9)));
        Ok(StageOutcome { metrics })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::Cache;
    use crate::cancel::CancelToken;
    use crate::data::spec::{DataFormat, DatasetSpec, OnBadRecord};
    use crate::recipe::{Recipe, RecipeMeta};
    use crate::runs::RunSink;
    use crate::stages::Inputs;

    #[test]
    fn tokenizer_then_prepare_on_builtin_data_with_resume() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("cache")).unwrap();
        let run = RunSink::create(tmp.path().join("run")).unwrap();
        let recipe = Recipe {
            path: tmp.path().join("r.toml"),
            source_text: String::new(),
            overrides: vec![],
            meta: RecipeMeta {
                name: "t".into(),
                description: None,
                seed: 1,
                device: crate::recipe::DeviceSpec::Cpu,
                precision: Default::default(),
                executor: Default::default(),
                resources: Default::default(),
            },
            model: Default::default(),
            datasets: Default::default(),
            stages: vec![],
            cache: Default::default(),
        };
        let spec = |format| DatasetSpec {
            source: "builtin:arithmetic".into(),
            format,
            columns: Default::default(),
            on_bad_record: OnBadRecord::Error,
            builtin: serde_json::from_value(json!({"count": 300})).unwrap(),
        };
        let text = crate::data::resolve("text", &spec(DataFormat::Text), tmp.path(), &cache).unwrap();
        let sft = crate::data::resolve("sft", &spec(DataFormat::Sharegpt), tmp.path(), &cache).unwrap();

        // Tokenizer stage.
        let mut inputs = Inputs::default();
        inputs.datasets.insert("text".into(), text);
        inputs.datasets.insert("sft".into(), sft);
        let tok_out = tmp.path().join("tok");
        std::fs::create_dir_all(&tok_out).unwrap();
        let cancel = CancelToken::new();
        let mut ctx = StageContext {
            name: "tok",
            key: "tokkey",
            recipe: &recipe,
            inputs: &inputs,
            out_dir: &tok_out,
            work_dir: &tmp.path().join("work-tok"),
            cache: &cache,
            run: &run,
            cancel: &cancel,
            rank: None,
        };
        let p = TokenizerParamsForTest::params();
        let out = crate::stages::tokenizer::TokenizerStage.run(&mut ctx, &p).unwrap();
        assert_eq!(out.metrics["vocab_size"], 400);

        // Prepare stage, cancelled after the first chunk then resumed.
        let art = crate::artifact::Artifact {
            dir: tok_out.clone(),
            manifest: crate::artifact::Manifest {
                kind: ArtifactKind::Tokenizer,
                stage_kind: "tokenizer".into(),
                key: "tokkey".into(),
                mmrun_version: crate::VERSION.into(),
                created_unix: 0,
                files: vec![],
                metrics: Default::default(),
            },
        };
        inputs.artifacts.insert("tok".into(), art);
        let pp = PrepareParams {
            tokenizer: "tok".into(),
            data: "sft".into(),
            max_seq_len: 64,
            chunk_records: 100,
            system_prompt_ratio: 0.0,
            drop_empty_think_ratio: 0.0,
        };
        let out_dir = tmp.path().join("prep");
        std::fs::create_dir_all(&out_dir).unwrap();
        let work = tmp.path().join("work-prep");
        let cancelled = CancelToken::new();
        cancelled.cancel();
        let mut ctx = StageContext {
            name: "prep",
            key: "prepkey",
            recipe: &recipe,
            inputs: &inputs,
            out_dir: &out_dir,
            work_dir: &work,
            cache: &cache,
            run: &run,
            cancel: &cancelled,
            rank: None,
        };
        let e = PrepareStage.run(&mut ctx, &pp).unwrap_err();
        assert!(e.downcast_ref::<crate::cancel::Interrupted>().is_some(), "{e:#}");
        assert!(work.join("shards/chunk-00000.json").is_file());
        ctx.cancel = &cancel;
        let out = PrepareStage.run(&mut ctx, &pp).unwrap();
        assert_eq!(out.metrics["samples"], 300);
        let sh = crate::data::shards::TokenShards::open(&out_dir).unwrap();
        assert_eq!(sh.len(), 300);
        assert!(sh.meta().totals.trained_tokens > 0);
    }

    struct TokenizerParamsForTest;
    impl TokenizerParamsForTest {
        fn params() -> crate::stages::tokenizer::TokenizerParams {
            crate::stages::tokenizer::TokenizerParams {
                data: vec!["text".into(), "sft".into()],
                source: None,
                vocab_size: 400,
                max_texts: 0,
            }
        }
    }
}
