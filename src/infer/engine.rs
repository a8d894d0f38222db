//! The generation engine behind `chat` and `serve`: one thread owns the candle models and decodes
//! every active request together — one forward per decoding step (continuous batching).
//!
//! Requests arrive through a bounded queue. Each is prefilled alone, then joins a *group*: the
//! sequences of one model that share one batched KV cache and decode in lockstep. A group has a
//! position counter `pos` (the RoPE position of its next token); a newcomer with an `L`-token
//! prompt is prefilled at positions `pos - L ..`, so its keys sit exactly where the group will
//! attend to them, and the shorter side's cache is padded at the front and masked. Attention
//! under RoPE depends only on relative positions, so each row computes what it would alone.
//! Finished rows leave the batch (their cache rows are dropped) at once. A prompt longer than
//! every group's `pos` starts a new group, so there is one forward per group per step (one in the
//! steady state, when the prompts are no longer than what the running group has decoded).
//!
//! Sampling is the model module's [`Sampler`] (the same as eval and GRPO), seeded per request,
//! so a seeded request gives the same answer whatever else shares the batch.

use super::parse::StopStrings;
use crate::data::tokenize::TextTokenizer;
use crate::model::generate::{text_delta, FinishReason};
use crate::model::sampling::{Sampler, SamplingParams};
use crate::model::{KvCache, MiniMind};
use candle_core::{DType, Tensor};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use tokio::sync::mpsc::UnboundedSender;

/// One generation request.
pub struct GenRequest {
    /// Index of the model (in the order given to [`spawn`]).
    pub model: usize,
    /// Prompt token ids (the rendered chat template, or raw text).
    pub prompt: Vec<u32>,
    /// Most tokens to generate.
    pub max_tokens: usize,
    /// How to pick tokens.
    pub sampling: SamplingParams,
    /// Seed of this request's sampling RNG.
    pub seed: u64,
    /// Token ids that end the answer (not included in it).
    pub stop_ids: Vec<u32>,
    /// Strings that end the answer (not included), matched across token boundaries.
    pub stop_strings: Vec<String>,
    /// Where the answer streams to, each event tagged with `tag`; when the receiver is dropped
    /// the request stops.
    pub events: UnboundedSender<(usize, GenEvent)>,
    /// Tells this request's events apart when several share one channel (`n` choices).
    pub tag: usize,
    /// Raised by the requester to stop the answer (Ctrl-C in `chat`).
    pub cancel: Arc<AtomicBool>,
}

impl GenRequest {
    fn send(&self, e: GenEvent) -> Result<(), ()> {
        self.events.send((self.tag, e)).map_err(|_| ())
    }
}

/// What a request's receiver gets, in order: text deltas, then exactly one `Done` or `Error`.
#[derive(Clone, Debug, PartialEq)]
pub enum GenEvent {
    /// New answer text (complete UTF-8 characters, stop strings removed).
    Text(String),
    /// The answer ended.
    Done {
        /// Why.
        finish: FinishReason,
        /// Prompt tokens.
        prompt_tokens: usize,
        /// Generated tokens (the stop token excluded).
        completion_tokens: usize,
    },
    /// The model failed on this request.
    Error(String),
}

/// Why a request was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// The queue is full; try again shortly.
    #[error("the generation queue is full")]
    Full,
    /// The engine thread has stopped.
    #[error("the generation engine has stopped")]
    Closed,
}

/// A model the engine serves.
pub struct EngineModel {
    /// The weights (moved onto the engine thread).
    pub model: MiniMind,
    /// Its tokenizer (shared with whoever renders prompts).
    pub tok: Arc<TextTokenizer>,
}

/// Counters the engine keeps (`/health` shows them).
#[derive(Debug, Default)]
pub struct EngineStats {
    /// Requests waiting to start.
    pub queued: AtomicUsize,
    /// Requests being decoded now.
    pub active: AtomicUsize,
    /// Decoding forwards run so far.
    pub steps: AtomicUsize,
    /// The most sequences one forward has carried.
    pub peak_batch: AtomicUsize,
    /// Requests stopped by their client (disconnect or Ctrl-C).
    pub cancelled: AtomicUsize,
}

/// The submitting side of the engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    tx: Sender<GenRequest>,
    queue: usize,
    /// Live counters.
    pub stats: Arc<EngineStats>,
}

impl Engine {
    /// Queue a request without blocking; `Full` when `queue` requests already wait to start.
    pub fn submit(&self, req: GenRequest) -> Result<(), SubmitError> {
        if self.stats.queued.fetch_add(1, Ordering::SeqCst) >= self.queue {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(SubmitError::Full);
        }
        self.tx.send(req).map_err(|_| {
            self.stats.queued.fetch_sub(1, Ordering::SeqCst);
            SubmitError::Closed
        })
    }
}

/// Limits of the engine.
#[derive(Clone, Copy, Debug)]
pub struct EngineLimits {
    /// Requests waiting to start before [`Engine::submit`] says `Full`.
    pub queue: usize,
    /// Most sequences decoded together per model.
    pub max_batch: usize,
}

/// Start the engine thread for `models`. It runs until every [`Engine`] clone is dropped.
pub fn spawn(models: Vec<EngineModel>, limits: EngineLimits) -> std::io::Result<(Engine, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let stats = Arc::new(EngineStats::default());
    let st = stats.clone();
    let handle = std::thread::Builder::new().name("mmrun-engine".into()).spawn(move || {
        Worker { models, groups: vec![], waiting: VecDeque::new(), max_batch: limits.max_batch.max(1), stats: st }
            .run(rx)
    })?;
    Ok((Engine { tx, queue: limits.queue.max(1), stats }, handle))
}

/// One active request.
struct Row {
    req: GenRequest,
    sampler: Sampler,
    /// Prompt and generated ids (the repetition penalty looks at both).
    seen: Vec<u32>,
    generated: Vec<u32>,
    emitted: String,
    stops: StopStrings,
    /// Logits for this row's next token.
    logits: Vec<f32>,
    /// Leading padding positions of this row in the group's cache.
    pad: usize,
    /// Most tokens this row may still generate (request budget and position table).
    budget: usize,
}

/// Sequences of one model decoding in lockstep over one batched cache.
struct Group {
    model: usize,
    cache: KvCache,
    /// RoPE position of the next token.
    pos: usize,
    rows: Vec<Row>,
}

struct Worker {
    models: Vec<EngineModel>,
    groups: Vec<Group>,
    /// Requests taken off the channel that wait for room in their model's batch.
    waiting: VecDeque<GenRequest>,
    max_batch: usize,
    stats: Arc<EngineStats>,
}

/// Drop the padding columns every row has once this many accumulate (a copy of the cache).
const TRIM_AT: usize = 32;

impl Worker {
    fn run(mut self, rx: Receiver<GenRequest>) {
        loop {
            if self.groups.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(r) => self.waiting.push_back(r),
                    Err(_) => return,
                }
            }
            while let Ok(r) = rx.try_recv().map_err(|e| e == TryRecvError::Disconnected) {
                self.waiting.push_back(r);
            }
            // Start what fits, in arrival order per model.
            let mut still = VecDeque::new();
            while let Some(r) = self.waiting.pop_front() {
                let rows: usize = self.groups.iter().filter(|g| g.model == r.model).map(|g| g.rows.len()).sum();
                if rows < self.max_batch && !still.iter().any(|w: &GenRequest| w.model == r.model) {
                    self.stats.queued.fetch_sub(1, Ordering::SeqCst);
                    self.admit(r);
                } else {
                    still.push_back(r);
                }
            }
            self.waiting = still;
            if self.groups.is_empty() {
                // Everything waiting failed to start (errors were sent); wait for more.
                continue;
            }
            self.step();
            let active = self.groups.iter().map(|g| g.rows.len()).sum();
            self.stats.active.store(active, Ordering::Relaxed);
        }
    }

    /// Prefill a new request and put it into a group.
    fn admit(&mut self, req: GenRequest) {
        let Some(m) = self.models.get(req.model) else {
            let _ = req.send(GenEvent::Error(format!("no model #{}", req.model)));
            return;
        };
        let max_pos = m.model.config().max_position_embeddings;
        let len = req.prompt.len();
        if len == 0 || len >= max_pos {
            let _ = req.send(GenEvent::Error(format!(
                "the prompt has {len} tokens; this model takes 1 to {} (its position table is {max_pos})",
                max_pos - 1
            )));
            return;
        }
        let want = req.max_tokens.min(max_pos - len);
        let slot = self.groups.iter().position(|g| {
            g.model == req.model && g.pos >= len && g.rows.len() < self.max_batch && g.pos + want <= max_pos
        });
        let start = slot.map(|i| self.groups[i].pos - len).unwrap_or(0);
        let mut cache = m.model.new_cache();
        let logits = Tensor::from_vec(req.prompt.clone(), (1, len), m.model.device())
            .and_then(|ids| m.model.forward_step(&ids, &mut cache, start))
            .and_then(|l| l.to_dtype(DType::F32)?.squeeze(0)?.to_vec1::<f32>());
        let logits = match logits {
            Ok(l) => l,
            Err(e) => {
                let _ = req.send(GenEvent::Error(format!("model forward failed: {e}")));
                return;
            }
        };
        let mut row = Row {
            sampler: Sampler::new(req.sampling.clone(), req.seed),
            seen: req.prompt.clone(),
            generated: vec![],
            emitted: String::new(),
            stops: StopStrings::new(&req.stop_strings),
            logits,
            pad: 0,
            budget: want,
            req,
        };
        match slot {
            Some(i) => {
                let g = &mut self.groups[i];
                let before = g.cache.len();
                if let Err(e) = g.cache.append_rows(&cache) {
                    let _ = row.req.send(GenEvent::Error(format!("joining the batch failed: {e}")));
                    return;
                }
                let after = g.cache.len();
                for r in &mut g.rows {
                    r.pad += after - before;
                }
                row.pad = after - len;
                g.rows.push(row);
            }
            None => {
                self.groups.push(Group { model: row.req.model, cache, pos: len, rows: vec![row] });
            }
        }
    }

    /// One decoding step for every group: sample each row's next token, retire finished rows,
    /// run one forward over the rest.
    fn step(&mut self) {
        let mut i = 0;
        while i < self.groups.len() {
            let tok = self.models[self.groups[i].model].tok.clone();
            let g = &mut self.groups[i];
            let mut next = Vec::with_capacity(g.rows.len());
            let mut keep = Vec::with_capacity(g.rows.len());
            for (r, row) in g.rows.iter_mut().enumerate() {
                match advance(row, &tok) {
                    Ok(t) => {
                        next.push(t);
                        keep.push(r);
                    }
                    Err(FinishReason::Cancelled) => {
                        self.stats.cancelled.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
            if keep.is_empty() {
                self.groups.remove(i);
                continue;
            }
            self.stats.steps.fetch_add(1, Ordering::Relaxed);
            self.stats.peak_batch.fetch_max(keep.len(), Ordering::Relaxed);
            if let Err(e) = forward_group(g, &self.models[g.model].model, &keep, next) {
                for row in &g.rows {
                    let _ = row.req.send(GenEvent::Error(format!("model forward failed: {e}")));
                }
                self.groups.remove(i);
                continue;
            }
            i += 1;
        }
    }
}

/// Sample `row`'s next token and stream it. `Ok(token)` to feed it to the model, `Err(why)`
/// when the row has finished (its `Done` was sent).
fn advance(row: &mut Row, tok: &TextTokenizer) -> Result<u32, FinishReason> {
    let decode = |ids: &[u32]| tok.decode(ids).unwrap_or_default();
    // `flush`: release what is held back (an incomplete character, a partial stop string).
    let done = |row: &mut Row, finish: FinishReason, flush: bool| {
        if flush {
            let full = decode(&row.generated);
            let mut rest = full.strip_prefix(row.emitted.as_str()).unwrap_or_default().to_string();
            let (mut text, stopped) = row.stops.push(&rest);
            if !stopped {
                text.push_str(&row.stops.finish());
            }
            rest = text;
            if !rest.is_empty() {
                let _ = row.req.send(GenEvent::Text(rest));
            }
        }
        let _ = row.req.send(GenEvent::Done {
            finish,
            prompt_tokens: row.req.prompt.len(),
            completion_tokens: row.generated.len(),
        });
        Err(finish)
    };
    if row.req.cancel.load(Ordering::Relaxed) || row.req.events.is_closed() {
        return done(row, FinishReason::Cancelled, false);
    }
    let t = row.sampler.sample(&row.logits, &row.seen);
    if row.req.stop_ids.contains(&t) {
        return done(row, FinishReason::Stop, true);
    }
    row.seen.push(t);
    row.generated.push(t);
    let delta = text_delta(&decode, &row.generated, &mut row.emitted);
    let (text, stopped) = row.stops.push(&delta);
    if !text.is_empty() && row.req.send(GenEvent::Text(text)).is_err() {
        return done(row, FinishReason::Cancelled, false);
    }
    if stopped {
        return done(row, FinishReason::Stop, false);
    }
    if row.generated.len() >= row.budget {
        return done(row, FinishReason::Length, true);
    }
    Ok(t)
}

/// Keep rows `keep` of `g` and run their `next` tokens through the model.
fn forward_group(g: &mut Group, model: &MiniMind, keep: &[usize], next: Vec<u32>) -> candle_core::Result<()> {
    if keep.len() < g.rows.len() {
        g.cache.select_rows(keep)?;
        let mut old: Vec<Option<Row>> = std::mem::take(&mut g.rows).into_iter().map(Some).collect();
        g.rows = keep.iter().map(|&r| old[r].take().expect("each row kept once")).collect();
    }
    let min_pad = g.rows.iter().map(|r| r.pad).min().unwrap_or(0);
    if min_pad >= TRIM_AT {
        g.cache.trim_front(min_pad)?;
        g.rows.iter_mut().for_each(|r| r.pad -= min_pad);
    }
    let b = g.rows.len();
    let ids = Tensor::from_vec(next, (b, 1), model.device())?;
    let logits = if g.rows.iter().all(|r| r.pad == 0) {
        model.forward_step(&ids, &mut g.cache, g.pos)?
    } else {
        let width = g.cache.len() + 1;
        let mask: Vec<f32> =
            g.rows.iter().flat_map(|r| (0..width).map(move |j| if j < r.pad { 0.0 } else { 1.0 })).collect();
        let mask = Tensor::from_vec(mask, (b, width), model.device())?;
        model.forward_step_masked(&ids, &mut g.cache, g.pos, Some(&mask))?
    };
    g.pos += 1;
    let rows: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2()?;
    for (row, l) in g.rows.iter_mut().zip(rows) {
        row.logits = l;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::generate::{generate, GenerationConfig};
    use std::ops::ControlFlow;

    fn load_random() -> (tempfile::TempDir, crate::infer::LoadedModel, crate::infer::LoadedModel) {
        let dir = tempfile::tempdir().unwrap();
        crate::infer::testmodels::random_model(&dir.path().join("m")).unwrap();
        let r = crate::infer::ModelRef { name: "m".into(), dir: dir.path().join("m") };
        let a = crate::infer::LoadedModel::load(&r).unwrap();
        let b = crate::infer::LoadedModel::load(&r).unwrap();
        (dir, a, b)
    }

    /// Requests that join a running batch at different times, with prompts shorter and longer
    /// than what the batch has decoded, and that leave at different times (so rows are dropped
    /// and padding is trimmed), produce exactly what each produces alone.
    #[test]
    fn joining_and_leaving_the_batch_changes_no_answer() {
        let (_d, reference, served) = load_random();
        let tok = served.tok.clone();
        let prompts: Vec<Vec<u32>> =
            ["hello world", "what", "the answer is what is the answer world hello 1 2 3 4", "hi 5", "x"]
                .iter()
                .map(|t| {
                    let mut ids = vec![tok.bos];
                    ids.extend(tok.encode(t).unwrap());
                    ids
                })
                .collect();
        let budgets = [60usize, 7, 45, 3, 80];
        let stops = vec![tok.eos, tok.pad];
        let alone: Vec<Vec<u32>> =
            prompts
                .iter()
                .zip(budgets)
                .map(|(p, n)| {
                    let cfg =
                        GenerationConfig { max_new_tokens: n, stop_token_ids: stops.clone(), ..Default::default() };
                    let g = generate(&reference.model, std::slice::from_ref(p), &cfg, None, |_, _, _| {
                        ControlFlow::Continue(())
                    });
                    g.unwrap().remove(0).tokens
                })
                .collect();
        let (engine, _infos, _h) = crate::infer::start(vec![served], EngineLimits { queue: 8, max_batch: 8 }).unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let submit = |i: usize| {
            engine
                .submit(GenRequest {
                    model: 0,
                    prompt: prompts[i].clone(),
                    max_tokens: budgets[i],
                    sampling: SamplingParams::greedy(),
                    seed: 0,
                    stop_ids: stops.clone(),
                    stop_strings: vec![],
                    events: tx.clone(),
                    tag: i,
                    cancel: Default::default(),
                })
                .unwrap()
        };
        // Start one, and add the next each time the previous has streamed a few deltas.
        submit(0);
        let mut texts = vec![String::new(); prompts.len()];
        let mut done = vec![None; prompts.len()];
        let mut next = 1;
        let mut deltas = 0;
        while done.iter().any(Option::is_none) {
            let (i, ev) = rx.blocking_recv().unwrap();
            match ev {
                GenEvent::Text(t) => {
                    texts[i].push_str(&t);
                    deltas += 1;
                    if next < prompts.len() && deltas % 4 == 0 {
                        submit(next);
                        next += 1;
                    }
                }
                GenEvent::Done { finish, completion_tokens, .. } => done[i] = Some((finish, completion_tokens)),
                GenEvent::Error(e) => panic!("request {i}: {e}"),
            }
        }
        for i in 0..prompts.len() {
            assert_eq!(texts[i], tok.decode(&alone[i]).unwrap(), "request {i}");
            assert_eq!(done[i].unwrap().1, alone[i].len());
        }
        assert!(engine.stats.peak_batch.load(Ordering::Relaxed) >= 3, "requests overlapped");
    }
}
