//! `mmrun chat <model>`: a streaming terminal chat (multi-turn, `/reset`, `/save`), or one answer
//! for scripts (`-p`, or stdin when it is not a terminal).
//!
//! Ctrl-C while an answer streams stops that answer (the turn keeps what was shown); at the
//! prompt it only reminds how to leave. Reasoning (`<think>`) is dimmed, tool calls are shown as
//! such.

use super::engine::{Engine, GenEvent, GenRequest};
use super::parse::{OutputParser, Piece};
use super::ModelInfo;
use crate::data::read::Message;
use crate::model::generate::FinishReason;
use crate::model::sampling::SamplingParams;
use std::io::{BufRead, IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Sampling flags shared by `chat` (and documented in its `--help`).
#[derive(Clone, Debug, clap::Args)]
pub struct SamplingArgs {
    /// Softmax temperature (0 = greedy).
    #[arg(long, default_value_t = 0.7)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
    #[arg(long, default_value_t = 0.9)]
    pub top_p: f32,
    /// Keep only the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Penalise tokens already in the conversation (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Most tokens per answer.
    #[arg(long, default_value_t = 512)]
    pub max_tokens: usize,
    /// Seed of the sampling RNG (the same seed and conversation give the same answer).
    #[arg(long)]
    pub seed: Option<u64>,
}

/// `mmrun chat` options.
#[derive(Clone, Debug, clap::Args)]
pub struct ChatArgs {
    /// The model: `<run>:<stage>` (see `mmrun show`), a model folder, or `hf://<owner>/<name>`.
    pub model: String,
    /// Ask one question, print the answer, exit.
    #[arg(short, long, value_name = "TEXT")]
    pub prompt: Option<String>,
    /// System prompt.
    #[arg(long)]
    pub system: Option<String>,
    /// Let the model think first (opens a `<think>` block, as `enable_thinking`).
    #[arg(long)]
    pub think: bool,
    /// Do not print the model's reasoning (`<think>…</think>`).
    #[arg(long)]
    pub hide_thinking: bool,
    /// Chat turn by turn even when stdin is not a terminal (each line is a message).
    #[arg(short, long)]
    pub interactive: bool,
    /// Compute precision of generation: `f32`, `bf16` (bf16 weights and KV cache, f32
    /// accumulation: faster, as decoding is bound by reading weights) or `auto` (bf16 where a
    /// recipe's `precision = "auto"` trains in bf16 on this CPU).
    #[arg(long, default_value = "f32", value_parser = super::parse_precision)]
    pub precision: crate::recipe::Precision,
    #[command(flatten)]
    #[allow(missing_docs)]
    pub sampling: SamplingArgs,
}

/// How answers are printed.
struct Style {
    color: bool,
    hide_thinking: bool,
}

const DIM: &str = "\x1b[2m";
const CYAN: &str = "\x1b[36m";
const RESET: &str = "\x1b[0m";

/// One conversation with one model.
pub struct Session {
    engine: Engine,
    model: ModelInfo,
    args: ChatArgs,
    history: Vec<Message>,
    turns: u64,
    interrupt: Arc<AtomicBool>,
}

impl Session {
    /// A session on `model` (index 0 of `engine`).
    pub fn new(engine: Engine, model: ModelInfo, args: ChatArgs) -> std::io::Result<Self> {
        let interrupt = Arc::new(AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGINT, interrupt.clone())?;
        let mut s = Self { engine, model, args, history: vec![], turns: 0, interrupt };
        s.reset();
        Ok(s)
    }

    fn reset(&mut self) {
        self.history.clear();
        if let Some(sys) = &self.args.system {
            self.history.push(Message::new("system", sys.clone()));
        }
    }

    /// Run: one-shot (`-p` or piped stdin) or the interactive loop.
    pub fn run(mut self) -> anyhow::Result<()> {
        let stdin = std::io::stdin();
        let style = Style { color: std::io::stdout().is_terminal(), hide_thinking: self.args.hide_thinking };
        if let Some(p) = self.args.prompt.clone() {
            return self.answer(&p, &style).map(|_| ());
        }
        let tty = stdin.is_terminal();
        if !tty && !self.args.interactive {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut stdin.lock(), &mut text)?;
            return self.answer(text.trim_end(), &style).map(|_| ());
        }
        if tty {
            eprintln!(
                "chatting with {} — /reset starts over, /save <file> writes the conversation, /exit or Ctrl-D quits; \
                 Ctrl-C stops an answer",
                self.model.name
            );
        }
        // Lines come from a reader thread so Ctrl-C at the prompt can be noticed.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in stdin.lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        loop {
            if tty {
                eprint!("> ");
            }
            let line = loop {
                match rx.recv_timeout(std::time::Duration::from_millis(100)) {
                    Ok(l) => break Some(l),
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        if self.interrupt.swap(false, Ordering::SeqCst) {
                            eprint!("\n(/exit or Ctrl-D to quit)\n> ");
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break None,
                }
            };
            let Some(line) = line else { break };
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            match line.split_once(' ').map(|(c, r)| (c, r.trim())).unwrap_or((line, "")) {
                ("/exit" | "/quit", _) => break,
                ("/reset", _) => {
                    self.reset();
                    eprintln!("(conversation reset)");
                }
                ("/save", path) => {
                    if path.is_empty() {
                        eprintln!("usage: /save <file.json>");
                    } else {
                        match self.save(std::path::Path::new(path)) {
                            Ok(()) => eprintln!("(saved {} messages to {path})", self.history.len()),
                            Err(e) => eprintln!("error: could not save to {path}: {e:#}"),
                        }
                    }
                }
                ("/help", _) => eprintln!("/reset, /save <file>, /exit; anything else is a message"),
                (c, _) if c.starts_with('/') => eprintln!("unknown command {c}; /help lists them"),
                _ => {
                    self.answer(line, &style)?;
                }
            }
        }
        Ok(())
    }

    /// `/save`: the conversation as OpenAI-style JSON messages.
    fn save(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let v = serde_json::json!({"model": self.model.name, "messages": self.history});
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&v)? + "\n")?;
        std::fs::rename(&tmp, path)?;
        Ok(())
    }

    /// Send one user message, stream the answer to stdout, keep both in the history.
    fn answer(&mut self, text: &str, style: &Style) -> anyhow::Result<FinishReason> {
        self.history.push(Message::new("user", text));
        let prompt = self.model.chat_prompt(&self.history, None, self.args.think)?;
        let s = &self.args.sampling;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        self.interrupt.store(false, Ordering::SeqCst);
        // Each turn draws its own stream from the seed, so a seeded session replays exactly.
        let seed = s.seed.map(|x| x.wrapping_add(self.turns)).unwrap_or_else(rand::random);
        self.turns += 1;
        self.engine.submit(GenRequest {
            model: 0,
            prompt,
            max_tokens: s.max_tokens,
            sampling: SamplingParams {
                temperature: s.temperature,
                top_k: s.top_k,
                top_p: s.top_p,
                repetition_penalty: s.repetition_penalty,
            },
            seed,
            stop_ids: self.model.stop_ids(),
            stop_strings: vec![],
            events: tx,
            tag: 0,
            cancel: self.interrupt.clone(),
        })?;
        let mut parser = OutputParser::new(self.args.think);
        let mut out = std::io::stdout().lock();
        let mut reply = Message::new("assistant", "");
        let mut reasoning = String::new();
        let mut in_reasoning = false;
        let mut show = |pieces: Vec<Piece>, out: &mut std::io::StdoutLock<'_>| -> std::io::Result<()> {
            for p in pieces {
                match p {
                    Piece::Reasoning(t) => {
                        reasoning.push_str(&t);
                        if style.hide_thinking {
                            continue;
                        }
                        if !in_reasoning {
                            in_reasoning = true;
                            write!(out, "{}", if style.color { DIM } else { "<think>\n" })?;
                        }
                        write!(out, "{t}")?;
                    }
                    other => {
                        if in_reasoning {
                            in_reasoning = false;
                            write!(out, "{}", if style.color { format!("{RESET}\n") } else { "\n</think>\n".into() })?;
                        }
                        match other {
                            Piece::Content(t) => {
                                reply.content.push_str(&t);
                                write!(out, "{t}")?;
                            }
                            Piece::ToolCall { name, arguments } => {
                                let (c, r) = if style.color { (CYAN, RESET) } else { ("", "") };
                                write!(out, "\n{c}[tool call] {name}({arguments}){r}\n")?;
                                let args: serde_json::Value =
                                    serde_json::from_str(&arguments).unwrap_or(serde_json::Value::String(arguments));
                                reply
                                    .tool_calls
                                    .get_or_insert_with(Vec::new)
                                    .push(serde_json::json!({"name": name, "arguments": args}));
                            }
                            Piece::Reasoning(_) => unreachable!("handled above"),
                        }
                    }
                }
            }
            out.flush()
        };
        let finish = loop {
            match rx.blocking_recv() {
                Some((_, GenEvent::Text(t))) => show(parser.push(&t), &mut out)?,
                Some((_, GenEvent::Done { finish, .. })) => {
                    show(parser.finish(), &mut out)?;
                    break finish;
                }
                Some((_, GenEvent::Error(e))) => anyhow::bail!("generation failed: {e}"),
                None => anyhow::bail!("the generation engine stopped"),
            }
        };
        if in_reasoning && style.color {
            write!(out, "{RESET}")?;
        }
        writeln!(out)?;
        match finish {
            FinishReason::Cancelled => eprintln!("[stopped]"),
            FinishReason::Length => eprintln!("[reached --max-tokens {}]", s.max_tokens),
            FinishReason::Stop => {}
        }
        if !reasoning.is_empty() {
            reply.reasoning_content = Some(reasoning);
        }
        self.history.push(reply);
        Ok(finish)
    }
}

/// `mmrun chat`: load the model `args.model` resolved to, then talk.
pub fn run(args: ChatArgs, model: &super::ModelRef) -> anyhow::Result<()> {
    let loaded = super::LoadedModel::load_in(model, args.precision)?;
    let (engine, mut infos, _worker) =
        super::start(vec![loaded], super::engine::EngineLimits { queue: 1, max_batch: 1 })?;
    Session::new(engine, infos.remove(0), args)?.run()
}
