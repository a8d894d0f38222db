//! Tokenised, memory-mapped shards: a dataset is tokenised once and read many times.
//!
//! Layout of a shard directory (all integers little-endian):
//!
//! | file | content |
//! |---|---|
//! | `chunk-NNNNN.ids` | token ids of every sequence, concatenated (`u16` when the vocabulary fits, else `u32`) |
//! | `chunk-NNNNN.mask` | one byte per token: 1 = loss target |
//! | `chunk-NNNNN.idx` | `u64` offsets, one per sequence plus the end |
//! | `chunk-NNNNN.json` | the chunk's counts; written last, so a chunk is complete iff it exists |
//! | `shards.json` | [`ShardsMeta`]; written last of all, so a shard set is complete iff it exists |
//! | `rejects.jsonl` | the records skipped while reading the dataset ([`REJECTS`]) |
//!
//! Building streams the records (memory is bounded by one chunk of `chunk_records` examples),
//! tokenises a chunk in parallel (rayon), and writes each chunk file atomically. A half-built
//! directory continues after its last complete chunk, so an interrupted build (SIGINT or SIGKILL)
//! never re-tokenises finished chunks. A DPO example is two consecutive sequences (chosen,
//! rejected). Sequences are stored unpadded; [`pad_batch`] and [`pack`] make fixed-length rows.
//!
//! [`tokenized`] caches shard sets in the cache's `shards-v1/<key>/` bucket
//! ([`Cache::derived`]), key = (dataset content hash, format, columns, tokenizer artifact key,
//! `max_seq_len`, chat options, layout version); the prepare stage builds the same layout inside
//! its own artifact. Either way the skipped records are stored with the shards and copied into
//! every run that uses them, so a run on cached shards reports the same rejects as the run that
//! built them.
//!
//! [`TokenShards::open`] trusts nothing: it checks every size, that offsets start at 0 and never
//! decrease, that masks are 0/1 and that every token id is inside the vocabulary, and reports
//! [`ShardError::Corrupt`] otherwise (which [`tokenized`] answers by rebuilding the set).

use super::read::{for_each_example, Example, ReadStats};
use super::rejects::{RejectLog, RejectSink};
use super::tokenize::{ChatOptions, Sample, TextTokenizer, TokenizeError};
use super::{DataError, ResolvedDataset};
use crate::artifact::Artifact;
use crate::cache::{Bucket, Cache, CacheError};
use crate::cancel::CancelToken;
use crate::data::spec::DataFormat;
use crate::durable::write_atomic;
use crate::fs_error::{IoContext, IoError};
use memmap2::Mmap;
use rand::SeedableRng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bump when the layout or the tokenisation rules change.
pub const LAYOUT_VERSION: u32 = 1;
/// The completion marker of a shard set.
pub const SHARDS_META: &str = "shards.json";
/// The records skipped while reading the dataset (`rejects.jsonl` lines, as in run records).
pub const REJECTS: &str = super::rejects::REJECTS;

/// Errors building or opening shards.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    /// Reading the dataset failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Tokenising failed.
    #[error(transparent)]
    Tokenize(#[from] TokenizeError),
    /// Cancelled; complete chunks are kept and the build continues next time.
    #[error(transparent)]
    Interrupted(#[from] crate::cancel::Interrupted),
    /// A shard directory is missing files or inconsistent.
    #[error("{path}: corrupt shard set: {msg}; delete the directory to rebuild it")]
    Corrupt {
        /// The directory or file.
        path: String,
        /// What is wrong.
        msg: String,
    },
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// I/O.
    #[error(transparent)]
    Io(#[from] IoError),
}

/// What kind of samples a shard set holds (from the dataset format).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SampleKind {
    /// `[bos] text [eos]`, all trained.
    Pretrain,
    /// Chat with assistant-only masks.
    Sft,
    /// Pairs: sequence 2i = chosen, 2i+1 = rejected.
    Dpo,
    /// Generation prompts (nothing trained).
    Prompt,
}

impl SampleKind {
    /// The kind a dataset format tokenises to.
    pub fn of(format: DataFormat) -> Self {
        match format {
            DataFormat::Text => SampleKind::Pretrain,
            DataFormat::Sharegpt | DataFormat::Openai | DataFormat::Alpaca => SampleKind::Sft,
            DataFormat::Dpo => SampleKind::Dpo,
            DataFormat::PromptAnswer => SampleKind::Prompt,
        }
    }

    /// Sequences per sample.
    pub fn width(self) -> usize {
        if self == SampleKind::Dpo {
            2
        } else {
            1
        }
    }
}

/// Output-affecting tokenisation parameters.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardParams {
    /// Longest sequence kept (longer ones are truncated, as in the reference).
    pub max_seq_len: usize,
    /// Examples per chunk (the unit of resumption and of memory).
    pub chunk_records: usize,
    /// Seeded chat choices.
    pub system_prompt_ratio: f64,
    /// Seeded chat choices.
    pub drop_empty_think_ratio: f64,
    /// Seed of the chat coins.
    pub seed: u64,
}

impl Default for ShardParams {
    fn default() -> Self {
        Self { max_seq_len: 512, chunk_records: 4096, system_prompt_ratio: 0.0, drop_empty_think_ratio: 0.0, seed: 0 }
    }
}

impl ShardParams {
    fn chat(&self) -> ChatOptions {
        ChatOptions {
            system_prompt_ratio: self.system_prompt_ratio,
            drop_empty_think_ratio: self.drop_empty_think_ratio,
            seed: self.seed,
        }
    }
}

/// Counts of one chunk (`chunk-NNNNN.json`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkMeta {
    /// Examples read into this chunk (including dropped ones).
    pub examples_read: usize,
    /// Samples kept.
    pub samples: usize,
    /// Sequences stored (samples × width).
    pub sequences: usize,
    /// Tokens stored.
    pub tokens: u64,
    /// Tokens with mask 1.
    pub trained_tokens: u64,
    /// Examples dropped because truncation left nothing to train on.
    pub dropped_no_loss: usize,
    /// Conversations kept but cut at `max_seq_len`: their later turns are not trained.
    #[serde(default)]
    pub truncated: usize,
}

/// `shards.json`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShardsMeta {
    /// [`LAYOUT_VERSION`].
    pub version: u32,
    /// Sample kind.
    pub kind: SampleKind,
    /// `"u16"` or `"u32"`.
    pub dtype: String,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// Pad id (`<|endoftext|>`).
    pub pad_id: u32,
    /// BOS id.
    pub bos_id: u32,
    /// EOS id.
    pub eos_id: u32,
    /// Parameters used.
    pub params: ShardParams,
    /// Content hash of the dataset.
    pub dataset_hash: String,
    /// Per chunk counts, in order.
    pub chunks: Vec<ChunkMeta>,
    /// Totals.
    pub totals: ChunkMeta,
    /// Reader counts of the last pass (bad/empty records skipped).
    pub read: ReadStats,
}

fn chunk_path(dir: &Path, i: usize, ext: &str) -> PathBuf {
    dir.join(format!("chunk-{i:05}.{ext}"))
}

/// The complete chunks already in `dir`, in order (stops at the first missing one).
fn complete_chunks(dir: &Path) -> Result<Vec<ChunkMeta>, ShardError> {
    let mut out = Vec::new();
    loop {
        let p = chunk_path(dir, out.len(), "json");
        let Ok(text) = std::fs::read_to_string(&p) else { break };
        let m: ChunkMeta = serde_json::from_str(&text)
            .map_err(|e| ShardError::Corrupt { path: p.display().to_string(), msg: e.to_string() })?;
        out.push(m);
    }
    Ok(out)
}

/// Progress callback: (examples done so far).
pub type Progress<'a> = &'a (dyn Fn(usize) + Sync);

/// Tokenise `ds` into `dir`, continuing after any complete chunks already there. Polls `cancel`
/// between chunks. Returns the finished meta (also written as `dir/shards.json`). Skipped
/// records go to `dir/rejects.jsonl` (see [`report_rejects`]).
pub fn build(
    ds: &ResolvedDataset,
    tok: &TextTokenizer,
    params: &ShardParams,
    dir: &Path,
    cancel: &CancelToken,
    progress: Progress<'_>,
) -> Result<ShardsMeta, ShardError> {
    let meta_path = dir.join(SHARDS_META);
    if let Ok(text) = std::fs::read_to_string(&meta_path) {
        if let Ok(m) = serde_json::from_str::<ShardsMeta>(&text) {
            return Ok(m);
        }
    }
    std::fs::create_dir_all(dir).ctx("creating", dir)?;
    let kind = SampleKind::of(ds.spec.format);
    let wide = tok.vocab_size() > u16::MAX as usize + 1;
    let mut chunks = complete_chunks(dir)?;
    let skip: usize = chunks.iter().map(|c| c.examples_read).sum();
    let chunk_records = params.chunk_records.max(1);
    let mut pending: Vec<Example> = Vec::with_capacity(chunk_records.min(1 << 16));
    let mut seen = 0usize;
    progress(skip);
    // The reader re-reads the dataset from the start (skipping what is chunked already), so it
    // reports every reject again: start the file afresh.
    let rejects_path = dir.join(REJECTS);
    match std::fs::remove_file(&rejects_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(IoError::new("removing", &rejects_path, e).into())
        }
        _ => {}
    }
    let rejects = RejectLog::open(&rejects_path).ctx("opening", &rejects_path)?;

    let flush = |pending: &mut Vec<Example>, chunks: &mut Vec<ChunkMeta>| -> Result<(), ShardError> {
        if pending.is_empty() {
            return Ok(());
        }
        let first_index = chunks.iter().map(|c| c.examples_read).sum::<usize>();
        let m = write_chunk(dir, chunks.len(), pending, first_index, kind, tok, params, wide)?;
        chunks.push(m);
        pending.clear();
        progress(first_index + chunks.last().map_or(0, |c| c.examples_read));
        if cancel.is_cancelled() {
            return Err(crate::cancel::Interrupted.into());
        }
        Ok(())
    };

    let read = for_each_example(ds, Some(&rejects as &dyn RejectSink), |ex| -> Result<(), ShardError> {
        seen += 1;
        if seen <= skip {
            return Ok(());
        }
        pending.push(ex);
        if pending.len() >= chunk_records {
            flush(&mut pending, &mut chunks)?;
        }
        Ok(())
    })?;
    flush(&mut pending, &mut chunks)?;

    let mut totals = ChunkMeta::default();
    for c in &chunks {
        totals.examples_read += c.examples_read;
        totals.samples += c.samples;
        totals.sequences += c.sequences;
        totals.tokens += c.tokens;
        totals.trained_tokens += c.trained_tokens;
        totals.dropped_no_loss += c.dropped_no_loss;
        totals.truncated += c.truncated;
    }
    if totals.samples == 0 {
        return Err(DataError::Empty {
            name: ds.name.clone(),
            files: format!("{} file(s)", ds.files.len()),
            skipped: totals.dropped_no_loss,
        }
        .into());
    }
    let meta = ShardsMeta {
        version: LAYOUT_VERSION,
        kind,
        dtype: if wide { "u32" } else { "u16" }.into(),
        vocab_size: tok.vocab_size(),
        pad_id: tok.pad,
        bos_id: tok.bos,
        eos_id: tok.eos,
        params: params.clone(),
        dataset_hash: ds.content_hash.clone(),
        chunks,
        totals,
        read,
    };
    let text = serde_json::to_vec_pretty(&meta).expect("meta serialises");
    write_atomic(&meta_path, &text).ctx("writing", &meta_path)?;
    Ok(meta)
}

#[allow(clippy::too_many_arguments)]
fn write_chunk(
    dir: &Path,
    index: usize,
    examples: &[Example],
    first_index: usize,
    kind: SampleKind,
    tok: &TextTokenizer,
    params: &ShardParams,
    wide: bool,
) -> Result<ChunkMeta, ShardError> {
    let opts = params.chat();
    let samples: Vec<Result<(Vec<Sample>, bool), TokenizeError>> = examples
        .par_iter()
        .enumerate()
        .map(|(i, ex)| {
            let index = (first_index + i) as u64;
            let s = tok.example(ex, params.max_seq_len, &opts, index)?;
            // Only a conversation that reached the limit may have been cut: tokenise it uncut to know.
            let cut = kind == SampleKind::Sft
                && s.iter().any(|x| x.ids.len() >= params.max_seq_len)
                && tok.example(ex, usize::MAX, &opts, index)?.iter().any(|x| x.ids.len() > params.max_seq_len);
            Ok((s, cut))
        })
        .collect();
    let mut meta = ChunkMeta { examples_read: examples.len(), ..Default::default() };
    let (mut ids, mut mask, mut idx) = (Vec::new(), Vec::new(), vec![0u64]);
    for s in samples {
        let (s, cut) = s?;
        // Never emit a chat/DPO sample with nothing to train on (e.g. a prompt longer than max_seq_len).
        if kind != SampleKind::Prompt && s.iter().any(|x| x.trained() == 0) {
            meta.dropped_no_loss += 1;
            continue;
        }
        meta.truncated += usize::from(cut);
        meta.samples += 1;
        for seq in s {
            meta.sequences += 1;
            meta.tokens += seq.ids.len() as u64;
            meta.trained_tokens += seq.trained() as u64;
            for &t in &seq.ids {
                if wide {
                    ids.extend_from_slice(&t.to_le_bytes());
                } else {
                    ids.extend_from_slice(&(t as u16).to_le_bytes());
                }
            }
            mask.extend_from_slice(&seq.mask);
            idx.push(meta.tokens);
        }
    }
    let idx_bytes: Vec<u8> = idx.iter().flat_map(|o| o.to_le_bytes()).collect();
    for (ext, bytes) in [("ids", &ids), ("mask", &mask), ("idx", &idx_bytes)] {
        let p = chunk_path(dir, index, ext);
        write_atomic(&p, bytes).ctx("writing", &p)?;
    }
    let p = chunk_path(dir, index, "json");
    write_atomic(&p, &serde_json::to_vec(&meta).expect("serialises")).ctx("writing", &p)?;
    Ok(meta)
}

struct Chunk {
    ids: Mmap,
    mask: Mmap,
    offsets: Vec<u64>,
}

/// An opened shard set: an indexable dataset of samples, backed by memory maps.
pub struct TokenShards {
    dir: PathBuf,
    meta: ShardsMeta,
    chunks: Vec<Chunk>,
    /// First global sequence index of each chunk.
    starts: Vec<usize>,
}

impl std::fmt::Debug for TokenShards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenShards").field("dir", &self.dir).field("samples", &self.len()).finish()
    }
}

impl TokenShards {
    /// Open a complete shard directory, checking everything later reads rely on (see the
    /// module docs): a damaged set is [`ShardError::Corrupt`], never a panic or a bad token id.
    pub fn open(dir: &Path) -> Result<Self, ShardError> {
        let corrupt = |msg: String| ShardError::Corrupt { path: dir.display().to_string(), msg };
        let meta_path = dir.join(SHARDS_META);
        let text = std::fs::read_to_string(&meta_path).ctx("reading", &meta_path)?;
        let meta: ShardsMeta = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        if meta.version != LAYOUT_VERSION {
            return Err(corrupt(format!("layout version {} (expected {LAYOUT_VERSION})", meta.version)));
        }
        let width: u64 = match meta.dtype.as_str() {
            "u16" if meta.vocab_size <= 1 << 16 => 2,
            "u32" if meta.vocab_size as u64 <= 1 << 32 => 4,
            other => {
                return Err(corrupt(format!("token type '{other}' cannot hold a vocabulary of {}", meta.vocab_size)))
            }
        };
        let vocab = meta.vocab_size as u64;
        if let Some(id) = [meta.pad_id, meta.bos_id, meta.eos_id].into_iter().find(|&id| u64::from(id) >= vocab) {
            return Err(corrupt(format!("special token id {id} is outside the vocabulary of {vocab}")));
        }
        let (mut samples, mut sequences) = (0usize, 0usize);
        let mut chunks = Vec::with_capacity(meta.chunks.len());
        let mut starts = Vec::with_capacity(meta.chunks.len());
        for (i, cm) in meta.chunks.iter().enumerate() {
            let bad = |msg: String| corrupt(format!("chunk {i}: {msg}"));
            let map = |ext: &str| -> Result<Mmap, ShardError> {
                let p = chunk_path(dir, i, ext);
                let f = std::fs::File::open(&p).ctx("opening", &p)?;
                // SAFETY: shard files are written once (atomically) and never modified afterwards.
                Ok(unsafe { Mmap::map(&f) }.ctx("mapping", &p)?)
            };
            let (ids, mask, idx) = (map("ids")?, map("mask")?, map("idx")?);
            if idx.len() % 8 != 0 {
                return Err(bad(format!("index of {} bytes is not a whole number of offsets", idx.len())));
            }
            let offsets: Vec<u64> =
                idx.chunks_exact(8).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes"))).collect();
            if cm.sequences.checked_add(1) != Some(offsets.len()) {
                return Err(bad(format!("{} offsets for {} sequences", offsets.len(), cm.sequences)));
            }
            if cm.sequences != cm.samples.saturating_mul(meta.kind.width()) {
                return Err(bad(format!("{} sequences for {} samples", cm.sequences, cm.samples)));
            }
            if offsets[0] != 0 {
                return Err(bad(format!("the first offset is {}, not 0", offsets[0])));
            }
            if let Some(j) = offsets.windows(2).position(|w| w[1] < w[0]) {
                return Err(bad(format!("offset {} ({}) is below offset {j} ({})", j + 1, offsets[j + 1], offsets[j])));
            }
            let tokens = *offsets.last().expect("at least one offset");
            if tokens != cm.tokens {
                return Err(bad(format!("the index ends at token {tokens}, the meta says {}", cm.tokens)));
            }
            if ids.len() as u64 != tokens.saturating_mul(width) || mask.len() as u64 != tokens {
                return Err(bad(format!(
                    "{} id bytes and {} mask bytes for {tokens} tokens of {width} bytes",
                    ids.len(),
                    mask.len()
                )));
            }
            if let Some(at) = mask.iter().position(|&m| m > 1) {
                return Err(bad(format!("mask byte {at} is {}, not 0 or 1", mask[at])));
            }
            let out_of_vocab = if width == 2 {
                ids.chunks_exact(2).map(|b| u64::from(u16::from_le_bytes([b[0], b[1]]))).position(|t| t >= vocab)
            } else {
                ids.chunks_exact(4)
                    .map(|b| u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
                    .position(|t| t >= vocab)
            };
            if let Some(at) = out_of_vocab {
                return Err(bad(format!("token {at} is outside the vocabulary of {vocab}")));
            }
            starts.push(sequences);
            samples += cm.samples;
            sequences += cm.sequences;
            chunks.push(Chunk { ids, mask, offsets });
        }
        if (samples, sequences) != (meta.totals.samples, meta.totals.sequences) {
            return Err(corrupt(format!(
                "chunks hold {samples} samples and {sequences} sequences, the totals say {} and {}",
                meta.totals.samples, meta.totals.sequences
            )));
        }
        Ok(Self { dir: dir.to_path_buf(), meta, chunks, starts })
    }

    /// The shards of a `prepare` stage's `Dataset` artifact.
    pub fn from_artifact(artifact: &Artifact) -> Result<Self, ShardError> {
        Self::open(&artifact.dir)
    }

    /// Where it lives.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its meta.
    pub fn meta(&self) -> &ShardsMeta {
        &self.meta
    }

    /// Number of samples (DPO: pairs).
    pub fn len(&self) -> usize {
        self.meta.totals.samples
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Number of stored sequences.
    pub fn num_sequences(&self) -> usize {
        self.meta.totals.sequences
    }

    /// Sequence `i` (global index).
    pub fn sequence(&self, i: usize) -> Sample {
        let c = self.starts.partition_point(|&s| s <= i) - 1;
        let ch = &self.chunks[c];
        let j = i - self.starts[c];
        let (a, b) = (ch.offsets[j] as usize, ch.offsets[j + 1] as usize);
        let ids = if self.meta.dtype == "u32" {
            ch.ids[a * 4..b * 4].chunks_exact(4).map(|x| u32::from_le_bytes(x.try_into().expect("4"))).collect()
        } else {
            ch.ids[a * 2..b * 2].chunks_exact(2).map(|x| u16::from_le_bytes(x.try_into().expect("2")) as u32).collect()
        };
        Sample { ids, mask: ch.mask[a..b].to_vec() }
    }

    /// Sample `i`: one sequence, or (chosen, rejected) for DPO.
    pub fn get(&self, i: usize) -> Vec<Sample> {
        let w = self.meta.kind.width();
        (0..w).map(|k| self.sequence(i * w + k)).collect()
    }

    /// Sample `i` (first sequence) padded to `seq_len`: `(input_ids, labels)` with −100 where not
    /// trained (reference convention; the loss shifts).
    pub fn padded(&self, i: usize, seq_len: usize) -> (Vec<u32>, Vec<i64>) {
        let s = self.get(i).swap_remove(0);
        let b = pad_batch(&[s], seq_len, self.meta.pad_id);
        (b.input_ids, b.labels)
    }
}

/// A fixed-length batch, row-major `[rows, seq_len]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Rows.
    pub rows: usize,
    /// Columns.
    pub seq_len: usize,
    /// Token ids, pad where empty.
    pub input_ids: Vec<u32>,
    /// Ids where trained, −100 elsewhere (pad included).
    pub labels: Vec<i64>,
    /// 1 where trained.
    pub mask: Vec<u8>,
    /// Non-pad tokens.
    pub real_tokens: usize,
    /// Pad tokens.
    pub pad_tokens: usize,
}

/// Right-pad (or truncate) samples to `seq_len` rows.
pub fn pad_batch(samples: &[Sample], seq_len: usize, pad_id: u32) -> Batch {
    let rows = samples.len();
    let mut b = Batch {
        rows,
        seq_len,
        input_ids: vec![pad_id; rows * seq_len],
        labels: vec![-100; rows * seq_len],
        mask: vec![0; rows * seq_len],
        real_tokens: 0,
        pad_tokens: 0,
    };
    for (r, s) in samples.iter().enumerate() {
        let n = s.ids.len().min(seq_len);
        for k in 0..n {
            let at = r * seq_len + k;
            b.input_ids[at] = s.ids[k];
            if s.mask[k] == 1 {
                b.labels[at] = s.ids[k] as i64;
                b.mask[at] = 1;
            }
        }
        b.real_tokens += n;
    }
    b.pad_tokens = rows * seq_len - b.real_tokens;
    b
}

/// Packing of short documents: rows of whole sequences (in the given order) whose total length
/// fits `seq_len`, filled greedily. Documents are not split (each was truncated to `max_seq_len`
/// at tokenisation). The trainer keeps them apart: attention and RoPE positions per document,
/// and no label across a boundary (`train::batch`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packing {
    /// Sequence indices per row.
    pub rows: Vec<Vec<usize>>,
    /// Real tokens over all rows.
    pub real_tokens: usize,
    /// Pad tokens over all rows.
    pub pad_tokens: usize,
}

/// Pack `order` (sequence indices, e.g. a shuffled epoch) into rows of `seq_len`.
pub fn pack(shards: &TokenShards, order: &[usize], seq_len: usize) -> Packing {
    pack_by(order, seq_len, |i| shards.sequence_len(i))
}

/// Pack `order` (indices of documents whose token counts `len_of` gives) into rows of `seq_len`;
/// a document longer than a row gets a row of its own (cut to `seq_len`).
pub fn pack_by(order: &[usize], seq_len: usize, len_of: impl Fn(usize) -> usize) -> Packing {
    let mut rows: Vec<Vec<usize>> = Vec::new();
    let (mut cur, mut used, mut real) = (Vec::new(), 0usize, 0usize);
    for &i in order {
        let len = len_of(i).min(seq_len);
        if used + len > seq_len && !cur.is_empty() {
            rows.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(i);
        used += len;
        real += len;
    }
    if !cur.is_empty() {
        rows.push(cur);
    }
    let pad = rows.len() * seq_len - real;
    Packing { rows, real_tokens: real, pad_tokens: pad }
}

impl TokenShards {
    /// Length of sequence `i` without reading it.
    pub fn sequence_len(&self, i: usize) -> usize {
        let c = self.starts.partition_point(|&s| s <= i) - 1;
        let j = i - self.starts[c];
        (self.chunks[c].offsets[j + 1] - self.chunks[c].offsets[j]) as usize
    }

    /// One packed row: the concatenation of `row`'s sequences, cut at `seq_len`.
    pub fn packed(&self, row: &[usize], seq_len: usize) -> Sample {
        let mut s = Sample::default();
        for &i in row {
            let x = self.sequence(i);
            s.ids.extend(x.ids);
            s.mask.extend(x.mask);
        }
        s.ids.truncate(seq_len);
        s.mask.truncate(seq_len);
        s
    }
}

/// A deterministic, resumable sample order: a fresh seeded permutation per epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shuffler {
    /// Number of samples.
    pub n: usize,
    /// Seed.
    pub seed: u64,
    /// Current epoch.
    pub epoch: u64,
    /// Next position within the epoch.
    pub pos: usize,
    #[serde(skip)]
    perm: Vec<usize>,
}

impl Shuffler {
    /// Start at epoch 0, position 0.
    pub fn new(n: usize, seed: u64) -> Self {
        Self { n, seed, epoch: 0, pos: 0, perm: Vec::new() }
    }

    /// The permutation of one epoch.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        use rand::seq::SliceRandom;
        let mut v: Vec<usize> = (0..self.n).collect();
        let mut rng =
            rand_chacha::ChaCha8Rng::seed_from_u64(self.seed.wrapping_add(epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15)));
        v.shuffle(&mut rng);
        v
    }

    /// The next `k` sample indices (crossing into the next epoch when needed).
    pub fn next_batch(&mut self, k: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(k);
        while out.len() < k && self.n > 0 {
            if self.perm.len() != self.n {
                self.perm = self.epoch_order(self.epoch);
            }
            out.push(self.perm[self.pos]);
            self.pos += 1;
            if self.pos == self.n {
                self.pos = 0;
                self.epoch += 1;
                self.perm.clear();
            }
        }
        out
    }
}

/// Shards of `ds` tokenised with `tokenizer`, built once into the cache's `shards-v1/<key>/`
/// ([`Cache::derived`]: locked against concurrent builders, resumable, verified against its
/// manifest) and memory-mapped. Never re-tokenises a finished, intact set; a damaged or
/// [`ShardError::Corrupt`] one is rebuilt, and the run record says so. The set's rejects are
/// copied into `sink`'s run.
pub fn tokenized(
    cache: &Cache,
    ds: &ResolvedDataset,
    tokenizer: &Artifact,
    params: &ShardParams,
    cancel: &CancelToken,
    sink: Option<&dyn RejectSink>,
) -> Result<TokenShards, ShardError> {
    let key = shard_key(ds, tokenizer.key(), params);
    let mut rebuilt_corrupt = false;
    loop {
        let entry = cache.derived(Bucket::Shards, &key, |dir| -> Result<(), ShardError> {
            let tok = TextTokenizer::from_dir(&tokenizer.dir)?;
            build(ds, &tok, params, dir, cancel, &|_| {}).map(|_| ())
        })?;
        if let Some(damage) = &entry.replaced {
            note(sink, format!("dataset '{}': cached shards {key} were damaged ({damage}); rebuilt them", ds.name));
        }
        match TokenShards::open(&entry.dir) {
            Ok(shards) => {
                if let Some(sink) = sink {
                    report_rejects(&entry.dir, sink)?;
                }
                return Ok(shards);
            }
            // Matches its manifest, yet is inconsistent (e.g. written by a buggy build): once.
            Err(ShardError::Corrupt { msg, .. }) if !rebuilt_corrupt => {
                rebuilt_corrupt = true;
                note(sink, format!("dataset '{}': cached shards {key} are corrupt ({msg}); rebuilding them", ds.name));
                let _lock = cache.lock(&key, || {})?;
                cache.discard(Bucket::Shards, &key)?;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Copy the rejects stored with the shard set in `dir` into the run behind `sink` (each
/// record once per run, however many stages use the set).
pub fn report_rejects(dir: &Path, sink: &dyn RejectSink) -> Result<(), ShardError> {
    let p = dir.join(REJECTS);
    Ok(sink.adopt_rejects(&p).ctx("copying rejects from", &p)?)
}

fn note(sink: Option<&dyn RejectSink>, msg: String) {
    match sink {
        Some(sink) => sink.note(&msg),
        None => tracing::warn!("{msg}"),
    }
}

/// The cache key of a shard set.
pub fn shard_key(ds: &ResolvedDataset, tokenizer_key: &str, params: &ShardParams) -> String {
    let ident = serde_json::json!({
        "layout": LAYOUT_VERSION,
        "dataset": ds.content_hash,
        "format": ds.spec.format,
        "columns": ds.spec.columns,
        "tokenizer": tokenizer_key,
        "params": params,
    });
    blake3::hash(ident.to_string().as_bytes()).to_hex()[..32].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shared_data;
    use crate::data::spec::{DatasetSpec, OnBadRecord};

    fn builtin_ds(cache: &Cache, format: DataFormat, count: usize) -> ResolvedDataset {
        let spec = DatasetSpec {
            source: "builtin:arithmetic".into(),
            format,
            columns: Default::default(),
            on_bad_record: OnBadRecord::Error,
            builtin: serde_json::from_value(serde_json::json!({"count": count})).unwrap(),
        };
        crate::data::resolve("arith", &spec, cache.root(), cache).unwrap()
    }

    #[test]
    fn build_open_resume_and_batch() {
        let Some(d) = shared_data() else { return };
        let tok = TextTokenizer::from_dir(&d.join("minimind_tokenizer")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("c")).unwrap();
        let ds = builtin_ds(&cache, DataFormat::Sharegpt, 250);
        let params = ShardParams { max_seq_len: 128, chunk_records: 100, ..Default::default() };

        // Reference build in one go.
        let full = tmp.path().join("full");
        let m = build(&ds, &tok, &params, &full, &CancelToken::new(), &|_| {}).unwrap();
        assert_eq!((m.chunks.len(), m.totals.samples, m.dtype.as_str()), (3, 250, "u16"));

        // Cancelled after the first chunk, then resumed: identical files, finished chunks untouched.
        let part = tmp.path().join("part");
        let cancel = CancelToken::new();
        cancel.cancel();
        let e = build(&ds, &tok, &params, &part, &cancel, &|_| {}).unwrap_err();
        assert!(matches!(e, ShardError::Interrupted(_)));
        assert!(part.join("chunk-00000.json").is_file() && !part.join("chunk-00001.json").exists());
        let t0 = std::fs::metadata(part.join("chunk-00000.ids")).unwrap().modified().unwrap();
        let m2 = build(&ds, &tok, &params, &part, &CancelToken::new(), &|_| {}).unwrap();
        assert_eq!(m2, m);
        assert_eq!(std::fs::metadata(part.join("chunk-00000.ids")).unwrap().modified().unwrap(), t0);
        for f in ["chunk-00001.ids", "chunk-00002.mask", "chunk-00002.idx"] {
            assert_eq!(std::fs::read(full.join(f)).unwrap(), std::fs::read(part.join(f)).unwrap(), "{f}");
        }

        let sh = TokenShards::open(&part).unwrap();
        assert_eq!(sh.len(), 250);
        // Stored samples equal direct tokenisation.
        let exs = crate::data::read_examples(&ds, None).unwrap();
        for i in [0, 99, 100, 249] {
            let direct = tok.example(&exs[i], 128, &ChatOptions::default(), i as u64).unwrap();
            assert_eq!(sh.get(i), direct);
        }
        let (ids, labels) = sh.padded(0, 64);
        assert_eq!((ids.len(), labels.len()), (64, 64));
        assert_eq!(*ids.last().unwrap(), 0);
        assert_eq!(*labels.last().unwrap(), -100);
        assert!(labels.iter().any(|&l| l >= 0));

        // Shuffler: deterministic, resumable mid-epoch, a permutation per epoch.
        let mut a = Shuffler::new(250, 9);
        let first: Vec<usize> = a.next_batch(100);
        let saved = serde_json::to_string(&a).unwrap();
        let rest_a = a.next_batch(300);
        let mut b: Shuffler = serde_json::from_str(&saved).unwrap();
        assert_eq!(b.next_batch(300), rest_a);
        let mut epoch0 = first.clone();
        epoch0.extend(&rest_a[..150]);
        epoch0.sort();
        assert_eq!(epoch0, (0..250).collect::<Vec<_>>());

        // Packing: fewer rows than samples, real + pad = rows × seq_len.
        let order: Vec<usize> = (0..sh.num_sequences()).collect();
        let p = pack(&sh, &order, 256);
        assert!(p.rows.len() < 250 / 3);
        assert_eq!(p.real_tokens + p.pad_tokens, p.rows.len() * 256);
        assert_eq!(p.real_tokens as u64, sh.meta().totals.tokens);
        let row = sh.packed(&p.rows[0], 256);
        assert!(row.ids.len() <= 256);
        let batch = pad_batch(&[row, sh.sequence(0)], 256, 0);
        assert_eq!(batch.input_ids.len(), 512);
        assert_eq!(batch.real_tokens + batch.pad_tokens, 512);

        // Cached: the second call opens what the first built.
        let tok_art = fake_tokenizer_artifact(&d, tmp.path());
        let s1 = tokenized(&cache, &ds, &tok_art, &params, &CancelToken::new(), None).unwrap();
        let stamp = std::fs::metadata(s1.dir().join(SHARDS_META)).unwrap().modified().unwrap();
        let s2 = tokenized(&cache, &ds, &tok_art, &params, &CancelToken::new(), None).unwrap();
        assert_eq!(s1.dir(), s2.dir());
        assert_eq!(std::fs::metadata(s2.dir().join(SHARDS_META)).unwrap().modified().unwrap(), stamp);
        let other = ShardParams { max_seq_len: 64, ..params.clone() };
        assert_ne!(shard_key(&ds, "k", &params), shard_key(&ds, "k", &other));
    }

    #[test]
    fn dpo_pairs_and_huge_record() {
        let Some(d) = shared_data() else { return };
        let tok = TextTokenizer::from_dir(&d.join("minimind_tokenizer")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("c")).unwrap();
        let ds = builtin_ds(&cache, DataFormat::Dpo, 20);
        let m =
            build(&ds, &tok, &ShardParams::default(), &tmp.path().join("dpo"), &CancelToken::new(), &|_| {}).unwrap();
        assert_eq!((m.totals.samples, m.totals.sequences), (20, 40));
        let sh = TokenShards::open(&tmp.path().join("dpo")).unwrap();
        let pair = sh.get(3);
        assert_eq!(pair.len(), 2);
        assert_ne!(pair[0], pair[1]);

        // A 1 MiB record is truncated to max_seq_len; the second record is kept too.
        let spec = DatasetSpec {
            source: "x".into(),
            format: DataFormat::Sharegpt,
            columns: Default::default(),
            on_bad_record: OnBadRecord::Error,
            builtin: Default::default(),
        };
        let ds = crate::data::resolve("huge", &spec_with(&spec, "bad/huge_record_1mb.jsonl"), &d, &cache).unwrap();
        let m =
            build(&ds, &tok, &ShardParams::default(), &tmp.path().join("huge"), &CancelToken::new(), &|_| {}).unwrap();
        assert_eq!(m.totals.samples, 2);
        assert!(m.totals.tokens <= 1024);
        assert_eq!(m.totals.truncated, 1, "the cut is counted");
    }

    /// A valid two-chunk shard set written by hand (no tokenizer needed): `(ids, mask)` per sequence.
    fn write_set(dir: &Path, chunks: &[Vec<(Vec<u16>, Vec<u8>)>], vocab: usize) {
        std::fs::create_dir_all(dir).unwrap();
        let mut metas = Vec::new();
        for (i, seqs) in chunks.iter().enumerate() {
            let (mut ids, mut mask, mut idx) = (Vec::new(), Vec::new(), vec![0u64]);
            let mut m = ChunkMeta {
                examples_read: seqs.len(),
                samples: seqs.len(),
                sequences: seqs.len(),
                ..Default::default()
            };
            for (t, k) in seqs {
                ids.extend(t.iter().flat_map(|x| x.to_le_bytes()));
                mask.extend(k);
                m.tokens += t.len() as u64;
                m.trained_tokens += k.iter().filter(|&&b| b == 1).count() as u64;
                idx.push(m.tokens);
            }
            std::fs::write(chunk_path(dir, i, "ids"), ids).unwrap();
            std::fs::write(chunk_path(dir, i, "mask"), mask).unwrap();
            std::fs::write(chunk_path(dir, i, "idx"), idx.iter().flat_map(|o| o.to_le_bytes()).collect::<Vec<_>>())
                .unwrap();
            metas.push(m);
        }
        let mut totals = ChunkMeta::default();
        for m in &metas {
            totals.examples_read += m.examples_read;
            totals.samples += m.samples;
            totals.sequences += m.sequences;
            totals.tokens += m.tokens;
            totals.trained_tokens += m.trained_tokens;
        }
        let meta = ShardsMeta {
            version: LAYOUT_VERSION,
            kind: SampleKind::Pretrain,
            dtype: "u16".into(),
            vocab_size: vocab,
            pad_id: 0,
            bos_id: 1,
            eos_id: 2,
            params: ShardParams::default(),
            dataset_hash: "h".into(),
            chunks: metas,
            totals,
            read: ReadStats::default(),
        };
        std::fs::write(dir.join(SHARDS_META), serde_json::to_vec(&meta).unwrap()).unwrap();
    }

    fn read_all(s: &TokenShards) -> usize {
        let mut n = 0;
        for i in 0..s.len() {
            n += s.get(i).iter().map(|x| x.ids.len()).sum::<usize>();
        }
        let order: Vec<usize> = (0..s.num_sequences()).collect();
        for row in pack(s, &order, 8).rows {
            n += s.packed(&row, 8).ids.len();
        }
        n
    }

    #[test]
    fn open_rejects_decreasing_offsets_and_ids_outside_the_vocabulary() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("s");
        let seqs = vec![(vec![1, 5, 2], vec![0, 1, 1]), (vec![1, 7, 7, 2], vec![0, 1, 1, 1])];
        write_set(&dir, std::slice::from_ref(&seqs), 10);
        assert_eq!(TokenShards::open(&dir).unwrap().sequence(1).ids, [1, 7, 7, 2]);
        // Offsets 0, 5, 7: the first sequence would end after the second starts... as 0, 3, 7 -> 0, 5, 3.
        let idx: Vec<u8> = [0u64, 5, 3].iter().flat_map(|o| o.to_le_bytes()).collect();
        std::fs::write(chunk_path(&dir, 0, "idx"), idx).unwrap();
        let e = TokenShards::open(&dir).unwrap_err();
        assert!(matches!(&e, ShardError::Corrupt { msg, .. } if msg.contains("is below offset")), "{e}");
        write_set(&dir, &[seqs], 7);
        let e = TokenShards::open(&dir).unwrap_err();
        assert!(matches!(&e, ShardError::Corrupt { msg, .. } if msg.contains("outside the vocabulary of 7")), "{e}");
    }

    /// Seeded random damage to every file of a shard set: opening (and, when it opens, reading
    /// every sample) must never panic; it either works or says `Corrupt` / an I/O error.
    #[test]
    fn mutated_shard_files_never_panic() {
        use rand::{Rng, SeedableRng};
        let tmp = tempfile::tempdir().unwrap();
        let good = tmp.path().join("good");
        let chunk = |k: u16| (0..5).map(|j| (vec![1, 3 + k + j, 4, 2], vec![0, 1, 1, 1])).collect::<Vec<_>>();
        write_set(&good, &[chunk(0), chunk(5)], 64);
        let expected = read_all(&TokenShards::open(&good).unwrap());
        let files: Vec<PathBuf> = {
            let mut v: Vec<PathBuf> = std::fs::read_dir(&good).unwrap().map(|e| e.unwrap().path()).collect();
            v.sort();
            v
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0x5eed);
        let (mut corrupt, mut intact) = (0, 0);
        for case in 0..400 {
            let dir = tmp.path().join(format!("m{case}"));
            std::fs::create_dir_all(&dir).unwrap();
            for f in &files {
                std::fs::copy(f, dir.join(f.file_name().unwrap())).unwrap();
            }
            let victim = dir.join(files[rng.random_range(0..files.len())].file_name().unwrap());
            let mut bytes = std::fs::read(&victim).unwrap();
            match rng.random_range(0..5) {
                0 if !bytes.is_empty() => {
                    let at = rng.random_range(0..bytes.len());
                    bytes[at] ^= 1 << rng.random_range(0..8);
                }
                1 => bytes.truncate(rng.random_range(0..=bytes.len())),
                2 => bytes.extend((0..rng.random_range(1..16)).map(|_| rng.random::<u8>())),
                3 if bytes.len() >= 8 => {
                    let at = rng.random_range(0..bytes.len() - 7);
                    bytes[at..at + 8].copy_from_slice(&rng.random::<u64>().to_le_bytes());
                }
                _ => bytes.iter_mut().for_each(|b| *b = rng.random()),
            }
            std::fs::write(&victim, &bytes).unwrap();
            let outcome = std::panic::catch_unwind(|| TokenShards::open(&dir).map(|s| read_all(&s)));
            match outcome {
                Err(_) => panic!("case {case}: mutating {} panicked", victim.display()),
                Ok(Ok(n)) => {
                    // A mutation that keeps the set consistent (e.g. another valid token id).
                    assert_eq!(n, expected, "case {case}");
                    intact += 1;
                }
                Ok(Err(ShardError::Corrupt { .. } | ShardError::Io(_))) => corrupt += 1,
                Ok(Err(e)) => panic!("case {case}: unexpected error {e}"),
            }
        }
        assert!(corrupt > 300 && intact > 0, "{corrupt} corrupt, {intact} intact");
    }

    /// Throughput figures for the report: `cargo test --lib -- --ignored tokenise_throughput --nocapture`.
    #[test]
    #[ignore]
    fn tokenise_throughput() {
        let Some(d) = shared_data() else { return };
        let tok = TextTokenizer::from_dir(&d.join("minimind_tokenizer")).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let cache = Cache::open(tmp.path().join("c")).unwrap();
        let base = DatasetSpec {
            source: String::new(),
            format: DataFormat::Text,
            columns: Default::default(),
            on_bad_record: OnBadRecord::Skip,
            builtin: Default::default(),
        };
        for (i, (src, fmt)) in [
            ("tinyshakespeare/input.txt", DataFormat::Text),
            ("medicalgpt/sft/sharegpt_zh_1K_format.jsonl", DataFormat::Sharegpt),
            ("medicalgpt/sft/glaive_toolcall_zh_demo.jsonl", DataFormat::Sharegpt),
            ("medicalgpt/reward/dpo_zh_500.jsonl", DataFormat::Dpo),
        ]
        .into_iter()
        .enumerate()
        {
            let spec = DatasetSpec { format: fmt, ..spec_with(&base, src) };
            let ds = crate::data::resolve("b", &spec, &d, &cache).unwrap();
            let bytes: u64 = ds.files.iter().map(|f| std::fs::metadata(f).unwrap().len()).sum();
            let params = ShardParams { max_seq_len: 100_000, ..Default::default() };
            let t = std::time::Instant::now();
            let m = build(&ds, &tok, &params, &tmp.path().join(i.to_string()), &CancelToken::new(), &|_| {}).unwrap();
            let s = t.elapsed().as_secs_f64();
            eprintln!(
                "{src}: {} samples, {} tokens ({} trained) in {s:.2}s = {:.0} tokens/s, {:.2} MB/s",
                m.totals.samples,
                m.totals.tokens,
                m.totals.trained_tokens,
                m.totals.tokens as f64 / s,
                bytes as f64 / s / 1e6
            );
        }
    }

    fn spec_with(s: &DatasetSpec, source: &str) -> DatasetSpec {
        DatasetSpec { source: source.into(), ..s.clone() }
    }

    fn fake_tokenizer_artifact(d: &Path, tmp: &Path) -> Artifact {
        let dir = tmp.join("tokart");
        std::fs::create_dir_all(&dir).unwrap();
        for f in ["tokenizer.json", "tokenizer_config.json"] {
            std::fs::copy(d.join("minimind_tokenizer").join(f), dir.join(f)).unwrap();
        }
        Artifact {
            dir,
            manifest: crate::artifact::Manifest {
                kind: crate::artifact::ArtifactKind::Tokenizer,
                stage_kind: "tokenizer".into(),
                key: "tokkey".into(),
                mmrun_version: crate::VERSION.into(),
                created_unix: 0,
                files: vec![],
                metrics: Default::default(),
            },
        }
    }
}
