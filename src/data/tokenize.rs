//! Examples → `(input_ids, loss mask)` following the reference datasets (spec §7).
//!
//! * **Pretrain** (`Text`): `[bos] + encode(text)[..max_len-2] + [eos]`; every token is trained
//!   except pad ids (the reference masks pad, including a literal `<|endoftext|>` in the text).
//! * **SFT** (`Chat`): render with the chat template (no generation prompt), encode without added
//!   specials, truncate to `max_len`; the mask is 1 from the token after each
//!   `<|im_start|>assistant\n` up to and including the next `<|im_end|>\n` (or the end when
//!   truncated). The two marker sequences are encoded with the tokenizer at load time, never
//!   hard-coded.
//! * **DPO** (`Preference`): chosen and rejected conversations, each as SFT.
//! * **Prompt** (`PromptAnswer`, GRPO/eval): the user turn rendered with the generation prompt.
//!
//! Determinism: the reference injects a random system prompt (p = 0.2) into SFT data and deletes
//! the empty `<think>\n\n</think>\n\n` block with p = 0.8, unseeded. mmrun does neither by default
//! ([`ChatOptions::default`]): every sample keeps the empty think block, which is exactly what
//! inference prompts carry, and no system prompt is invented. Both can be switched on with
//! `system_prompt_ratio` / `drop_empty_think_ratio`; the coin is then a hash of (seed, sample
//! index), so a dataset always tokenises the same way.
//!
//! Samples are returned unpadded and unshifted; batching pads (pad id, mask 0) and the loss
//! shifts (labels are the ids where the mask is 1, else −100, as in the reference).

use super::chat::{ChatError, ChatTemplate};
use super::read::{Example, Message};
use std::path::Path;

/// Errors turning examples into tokens.
#[derive(Debug, thiserror::Error)]
pub enum TokenizeError {
    /// Loading `tokenizer.json` failed.
    #[error("{path}: cannot load tokenizer: {msg}")]
    Load {
        /// The file.
        path: String,
        /// What failed.
        msg: String,
    },
    /// A special token the layout needs is missing.
    #[error("tokenizer has no token '{0}'; mmrun needs the MiniMind special tokens (<|endoftext|>, <|im_start|>, <|im_end|>)")]
    MissingToken(String),
    /// Chat template problem.
    #[error(transparent)]
    Chat(#[from] ChatError),
    /// Encoding failed.
    #[error("tokenizer: {0}")]
    Encode(String),
}

/// The 10 system prompts the reference draws from (`lm_dataset.py` `pre_processing_chat`).
const SYSTEM_PROMPTS: &[&str] = &[
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
];

/// Chat-rendering choices (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ChatOptions {
    /// Probability of prepending a system prompt to a conversation without one (reference 0.2).
    pub system_prompt_ratio: f64,
    /// Probability of deleting the empty think block (reference 0.8).
    pub drop_empty_think_ratio: f64,
    /// Seed of both coins.
    pub seed: u64,
}

impl Default for ChatOptions {
    fn default() -> Self {
        Self { system_prompt_ratio: 0.0, drop_empty_think_ratio: 0.0, seed: 0 }
    }
}

fn coin(seed: u64, index: u64, salt: &str, p: f64) -> (bool, u64) {
    if p <= 0.0 {
        return (false, 0);
    }
    let h = blake3::hash(format!("{seed}:{index}:{salt}").as_bytes());
    let x = u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"));
    let y = u64::from_le_bytes(h.as_bytes()[8..16].try_into().expect("8 bytes"));
    ((x as f64 / u64::MAX as f64) < p, y)
}

/// One tokenised sequence: unpadded ids and a per-token loss mask (1 = trained).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 where the token is a training target.
    pub mask: Vec<u8>,
}

impl Sample {
    /// Labels in the reference convention: the id where trained, −100 elsewhere.
    pub fn labels(&self) -> Vec<i64> {
        self.ids.iter().zip(&self.mask).map(|(&i, &m)| if m == 1 { i as i64 } else { -100 }).collect()
    }

    /// Number of trained tokens.
    pub fn trained(&self) -> usize {
        self.mask.iter().filter(|&&m| m == 1).count()
    }
}

/// A tokenizer plus its chat template and the ids the loss masks need.
pub struct TextTokenizer {
    /// The HF tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// The chat template.
    pub template: ChatTemplate,
    /// `<|im_start|>` (BOS).
    pub bos: u32,
    /// `<|im_end|>` (EOS).
    pub eos: u32,
    /// `<|endoftext|>` (pad).
    pub pad: u32,
    /// Encoded `<|im_start|>assistant\n`.
    pub assistant_start: Vec<u32>,
    /// Encoded `<|im_end|>\n`.
    pub turn_end: Vec<u32>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer").field("vocab", &self.vocab_size()).finish()
    }
}

impl TextTokenizer {
    /// Load `tokenizer.json` and `tokenizer_config.json` from a directory (a Tokenizer or Model
    /// artifact). A config without a chat template gets the reference template.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizeError> {
        let tj = dir.join(crate::artifact::layout::TOKENIZER_JSON);
        let tokenizer = tokenizers::Tokenizer::from_file(&tj)
            .map_err(|e| TokenizeError::Load { path: tj.display().to_string(), msg: e.to_string() })?;
        let cfg = dir.join(crate::artifact::layout::TOKENIZER_CONFIG_JSON);
        let template = match ChatTemplate::from_tokenizer_config(&cfg) {
            Ok(t) => t,
            Err(ChatError::NoTemplate { .. }) => ChatTemplate::reference(),
            Err(ChatError::Config { .. }) if !cfg.exists() => ChatTemplate::reference(),
            Err(e) => return Err(e.into()),
        };
        Self::new(tokenizer, template)
    }

    /// The tokenizer of a `Tokenizer` or `Model` artifact.
    pub fn from_artifact(artifact: &crate::artifact::Artifact) -> Result<Self, TokenizeError> {
        Self::from_dir(&artifact.dir)
    }

    /// Wrap a tokenizer and template.
    pub fn new(tokenizer: tokenizers::Tokenizer, template: ChatTemplate) -> Result<Self, TokenizeError> {
        let id = |t: &str| tokenizer.token_to_id(t).ok_or_else(|| TokenizeError::MissingToken(t.into()));
        let (bos, eos, pad) = (id("<|im_start|>")?, id("<|im_end|>")?, id("<|endoftext|>")?);
        let mut me = Self { tokenizer, template, bos, eos, pad, assistant_start: vec![], turn_end: vec![] };
        me.assistant_start = me.encode("<|im_start|>assistant\n")?;
        me.turn_end = me.encode("<|im_end|>\n")?;
        Ok(me)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Encode text without adding special tokens (the reference tokenizer adds none anyway).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizeError> {
        let enc = self.tokenizer.encode_fast(text, false).map_err(|e| TokenizeError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Decode ids (special tokens skipped).
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        self.tokenizer.decode(ids, true).map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    /// Decode ids keeping special tokens (`<tool_call>` is one in the reference tokenizer), minus
    /// the padding and end-of-turn markers a generation may carry.
    pub fn decode_with_specials(&self, ids: &[u32]) -> Result<String, TokenizeError> {
        let ids: Vec<u32> = ids.iter().copied().filter(|&i| i != self.pad && i != self.eos).collect();
        self.tokenizer.decode(&ids, false).map_err(|e| TokenizeError::Encode(e.to_string()))
    }

    /// Pretrain sample: `[bos] + tokens + [eos]`, at most `max_len` tokens, pad ids masked.
    pub fn pretrain(&self, text: &str, max_len: usize) -> Result<Sample, TokenizeError> {
        let mut toks = self.encode(text)?;
        toks.truncate(max_len.saturating_sub(2));
        let mut ids = Vec::with_capacity(toks.len() + 2);
        ids.push(self.bos);
        ids.extend(toks);
        ids.push(self.eos);
        let mask = ids.iter().map(|&i| u8::from(i != self.pad)).collect();
        Ok(Sample { ids, mask })
    }

    /// Render a conversation with the options' (seeded) system-prompt and empty-think choices.
    pub fn render_chat(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        opts: &ChatOptions,
        index: u64,
    ) -> Result<String, TokenizeError> {
        let (inject, pick) = coin(opts.seed, index, "system", opts.system_prompt_ratio);
        let owned;
        let msgs = if inject && tools.is_none() && messages.first().is_some_and(|m| m.role != "system") {
            let mut v = vec![Message::new("system", SYSTEM_PROMPTS[(pick % SYSTEM_PROMPTS.len() as u64) as usize])];
            v.extend_from_slice(messages);
            owned = v;
            &owned[..]
        } else {
            messages
        };
        let mut text = self.template.render(msgs, tools, false, false)?;
        let (drop, _) = coin(opts.seed, index, "think", opts.drop_empty_think_ratio);
        if drop {
            text = text.replace("<think>\n\n</think>\n\n", "");
        }
        Ok(text)
    }

    /// SFT sample: rendered conversation, truncated to `max_len`, assistant-only mask.
    pub fn chat(
        &self,
        messages: &[Message],
        tools: Option<&[serde_json::Value]>,
        max_len: usize,
        opts: &ChatOptions,
        index: u64,
    ) -> Result<Sample, TokenizeError> {
        let text = self.render_chat(messages, tools, opts, index)?;
        let mut ids = self.encode(&text)?;
        ids.truncate(max_len);
        let mask = self.assistant_mask(&ids);
        Ok(Sample { ids, mask })
    }

    /// The reference's assistant-span scan (`lm_dataset.py` `generate_labels`).
    pub fn assistant_mask(&self, ids: &[u32]) -> Vec<u8> {
        let mut mask = vec![0u8; ids.len()];
        let (start, end) = (&self.assistant_start[..], &self.turn_end[..]);
        let mut i = 0;
        while i < ids.len() {
            if ids[i..].starts_with(start) {
                let s = i + start.len();
                let mut e = s;
                while e < ids.len() {
                    if ids[e..].starts_with(end) {
                        break;
                    }
                    e += 1;
                }
                let stop = (e + end.len()).min(ids.len());
                mask[s..stop].iter_mut().for_each(|m| *m = 1);
                i = if e < ids.len() { e + end.len() } else { ids.len() };
            } else {
                i += 1;
            }
        }
        mask
    }

    /// Generation prompt for a user question (GRPO, eval).
    pub fn prompt(&self, messages: &[Message], open_thinking: bool) -> Result<Vec<u32>, TokenizeError> {
        let text = self.template.render(messages, None, true, open_thinking)?;
        self.encode(&text)
    }

    /// Generation prompt for a conversation offered `tools` (tool evaluation).
    pub fn tool_prompt(&self, messages: &[Message], tools: &[serde_json::Value]) -> Result<Vec<u32>, TokenizeError> {
        let text = self.template.render(messages, Some(tools), true, false)?;
        self.encode(&text)
    }

    /// The ids that follow an assistant turn's `<|im_end|>` when tool `results` come back: the rest
    /// of the turn end, the `tool` turns and the next generation prompt, as the template renders
    /// them. Tokenised on their own, so a multi-turn loop appends them to the ids the model
    /// generated instead of re-tokenising the whole conversation (whose earlier turns may
    /// tokenise differently from what the model produced). The text starts right after a special
    /// token, so it tokenises as it would inside the full rendering.
    pub fn tool_results(&self, results: &[String]) -> Result<Vec<u32>, TokenizeError> {
        let mut msgs = vec![Message::new("user", ""), Message::new("assistant", "")];
        let before = self.template.render(&msgs, None, false, false)?;
        msgs.extend(results.iter().map(|r| Message::new("tool", r.clone())));
        let after = self.template.render(&msgs, None, true, false)?;
        const END: &str = "<|im_end|>";
        let cut = before.rfind(END).map(|i| i + END.len());
        let delta = cut.filter(|&c| after.starts_with(&before[..c])).map(|c| &after[c..]).ok_or_else(|| {
            TokenizeError::Encode("the chat template does not render tool results after the assistant turn".into())
        })?;
        self.encode(delta)
    }

    /// One untruncated scoring sequence for an example with its loss targets (eval perplexity):
    /// chat → assistant spans; preference → the chosen conversation; prompt/answer → the answer as
    /// an assistant turn; text → the pretrain layout. Default (deterministic) chat options.
    pub fn sft_example(&self, ex: &Example) -> Result<(Vec<u32>, Vec<bool>), TokenizeError> {
        let o = ChatOptions::default();
        let s = match ex {
            Example::Text { text } => self.pretrain(text, usize::MAX)?,
            Example::Chat { messages, tools } => self.chat(messages, tools.as_deref(), usize::MAX, &o, 0)?,
            Example::Preference { tools, .. } => {
                let (c, _) = ex.preference_conversations().expect("a preference");
                self.chat(&c, tools.as_deref(), usize::MAX, &o, 0)?
            }
            Example::PromptAnswer { prompt, answer, .. } => {
                let msgs = [Message::new("user", prompt.clone()), Message::new("assistant", answer.clone())];
                self.chat(&msgs, None, usize::MAX, &o, 0)?
            }
        };
        Ok((s.ids, s.mask.into_iter().map(|m| m == 1).collect()))
    }

    /// Tokenise one example. Returns one sample (text, chat, prompt) or two (chosen, rejected).
    pub fn example(
        &self,
        ex: &Example,
        max_len: usize,
        opts: &ChatOptions,
        index: u64,
    ) -> Result<Vec<Sample>, TokenizeError> {
        Ok(match ex {
            Example::Text { text } => vec![self.pretrain(text, max_len)?],
            Example::Chat { messages, tools } => vec![self.chat(messages, tools.as_deref(), max_len, opts, index)?],
            Example::Preference { tools, .. } => {
                let (c, r) = ex.preference_conversations().expect("a preference");
                // No system injection for DPO (as the reference); the think coin is per side.
                let o = ChatOptions { system_prompt_ratio: 0.0, ..*opts };
                vec![
                    self.chat(&c, tools.as_deref(), max_len, &o, index * 2)?,
                    self.chat(&r, tools.as_deref(), max_len, &o, index * 2 + 1)?,
                ]
            }
            Example::PromptAnswer { prompt, .. } => {
                let mut ids = self.prompt(&[Message::new("user", prompt.clone())], false)?;
                ids.truncate(max_len);
                let mask = vec![0; ids.len()];
                vec![Sample { ids, mask }]
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shared_data;

    fn tok() -> Option<TextTokenizer> {
        let d = shared_data()?;
        Some(TextTokenizer::from_dir(&d.join("minimind_tokenizer")).unwrap())
    }

    /// The trained spans decoded, one string per contiguous run of mask 1.
    fn spans(t: &TextTokenizer, s: &Sample) -> Vec<String> {
        let mut out = Vec::new();
        let mut cur = Vec::new();
        for (&id, &m) in s.ids.iter().zip(&s.mask) {
            if m == 1 {
                cur.push(id);
            } else if !cur.is_empty() {
                out.push(t.tokenizer.decode(&cur, false).unwrap());
                cur.clear();
            }
        }
        if !cur.is_empty() {
            out.push(t.tokenizer.decode(&cur, false).unwrap());
        }
        out
    }

    #[test]
    fn marker_ids_come_from_the_tokenizer() {
        let Some(t) = tok() else { return };
        assert_eq!(t.assistant_start, vec![1, 1388, 570, 811, 234]);
        assert_eq!(t.turn_end, vec![2, 234]);
        assert_eq!((t.bos, t.eos, t.pad), (1, 2, 0));
    }

    #[test]
    fn tool_results_continue_the_generated_turn_as_the_full_rendering_does() {
        let Some(t) = tok() else { return };
        let tools = [serde_json::json!({"type": "function", "function": {"name": "calculator"}})];
        let user = [Message::new("user", "What is 2+3?")];
        let prompt = t.tool_prompt(&user, &tools).unwrap();
        // The model's turn (here the canonical tokens of a call) ends with the eos it generated.
        let call = "<tool_call>\n{\"name\": \"calculator\", \"arguments\": {\"expression\": \"2+3\"}}\n</tool_call>";
        let mut ids = prompt.clone();
        ids.extend(t.encode(call).unwrap());
        ids.push(t.eos);
        let results = ["{\"result\": \"5\"}".to_string(), "{\"error\": \"x\"}".to_string()];
        ids.extend(t.tool_results(&results).unwrap());
        let mut conv = user.to_vec();
        conv.push(Message::new("assistant", call));
        conv.extend(results.iter().map(|r| Message::new("tool", r.clone())));
        let full = t.tool_prompt(&conv, &tools).unwrap();
        assert_eq!(t.decode_with_specials(&ids).unwrap(), t.decode_with_specials(&full).unwrap());
        assert_eq!(ids, full, "appending the delta gives the ids of the whole rendering");
    }

    #[test]
    fn pretrain_layout() {
        let Some(t) = tok() else { return };
        let s = t.pretrain("hello world", 512).unwrap();
        assert_eq!(s.ids[0], 1);
        assert_eq!(*s.ids.last().unwrap(), 2);
        assert!(s.mask.iter().all(|&m| m == 1));
        let s = t.pretrain("a <|endoftext|> b", 512).unwrap();
        assert!(s.ids.contains(&0));
        assert_eq!(s.labels()[s.ids.iter().position(|&i| i == 0).unwrap()], -100);
        let s = t.pretrain(&"word ".repeat(1000), 16).unwrap();
        assert_eq!(s.ids.len(), 16);
        assert_eq!(*s.ids.last().unwrap(), 2);
    }

    #[test]
    fn sft_masks_exact_spans() {
        let Some(t) = tok() else { return };
        let o = ChatOptions::default();
        let msgs = [
            Message::new("system", "S"),
            Message::new("user", "Hi"),
            Message::new("assistant", "Yo"),
            Message::new("user", "Again"),
            Message::new("assistant", "Sure"),
        ];
        let s = t.chat(&msgs, None, 512, &o, 0).unwrap();
        assert_eq!(
            spans(&t, &s),
            vec!["<think>\n\n</think>\n\nYo<|im_end|>\n", "<think>\n\n</think>\n\nSure<|im_end|>\n"]
        );
        // Reference convention: labels = ids inside spans, −100 elsewhere.
        let l = s.labels();
        assert_eq!(l.len(), s.ids.len());
        assert_eq!(l[0], -100);

        // Reasoning and tool calls are trained; tool responses (user turns) are not.
        let mut r = Message::new("assistant", "42");
        r.reasoning_content = Some("add".into());
        let mut call = Message::new("assistant", "");
        call.tool_calls = Some(vec![serde_json::json!({"name": "calc", "arguments": {"x": 1}})]);
        let tools = vec![serde_json::json!({"name": "calc"})];
        let msgs = [Message::new("user", "q"), call, Message::new("tool", "1"), r];
        let s = t.chat(&msgs, Some(&tools), 512, &o, 0).unwrap();
        assert_eq!(
            spans(&t, &s),
            vec![
                "<think>\n\n</think>\n\n<tool_call>\n{\"name\": \"calc\", \"arguments\": {\"x\": 1}}\n</tool_call><|im_end|>\n",
                "<think>\nadd\n</think>\n\n42<|im_end|>\n"
            ]
        );
        // Truncated inside an assistant turn: the span runs to the end.
        let s = t.chat(&msgs[..2], Some(&tools), 150, &o, 0).unwrap();
        assert_eq!(s.ids.len(), 150);
        assert_eq!(*s.mask.last().unwrap(), 1);
    }

    /// Every real chat file: one trained span per assistant turn, each starting right after the
    /// `<|im_start|>assistant\n` header and ending with `<|im_end|>\n` (untruncated).
    #[test]
    fn real_chat_files_have_one_span_per_assistant_turn() {
        let Some(d) = shared_data() else { return };
        let Some(t) = tok() else { return };
        for (f, fmt) in [
            ("medicalgpt/sft/glaive_toolcall_zh_demo.jsonl", crate::data::spec::DataFormat::Sharegpt),
            ("medicalgpt/sft/medical_sft_1K_format.jsonl", crate::data::spec::DataFormat::Sharegpt),
            ("medicalgpt_history/finetune/Belle_open_source_1k.json", crate::data::spec::DataFormat::Alpaca),
            ("minimind_pr802/tiny_sft.jsonl", crate::data::spec::DataFormat::Openai),
        ] {
            let ds = crate::data::ResolvedDataset {
                name: "t".into(),
                spec: crate::data::spec::DatasetSpec {
                    source: f.into(),
                    format: fmt,
                    columns: Default::default(),
                    on_bad_record: crate::data::spec::OnBadRecord::Error,
                    builtin: Default::default(),
                },
                files: vec![d.join(f)],
                content_hash: String::new(),
            };
            for (i, ex) in crate::data::read_examples(&ds, None).unwrap().iter().enumerate().take(300) {
                let Example::Chat { messages, tools } = ex else { panic!() };
                let s = t.chat(messages, tools.as_deref(), 1 << 20, &ChatOptions::default(), i as u64).unwrap();
                let sp = spans(&t, &s);
                assert_eq!(sp.len(), messages.iter().filter(|m| m.role == "assistant").count(), "{f} #{i}");
                for x in &sp {
                    assert!(x.starts_with("<think>") && x.ends_with("<|im_end|>\n"), "{f} #{i}: {x:?}");
                }
                // The header tokens right before each span are never trained.
                let starts: Vec<usize> = (1..s.ids.len()).filter(|&k| s.mask[k] == 1 && s.mask[k - 1] == 0).collect();
                for k in starts {
                    assert_eq!(&s.ids[k - 5..k], &t.assistant_start[..], "{f} #{i}");
                }
            }
        }
    }

    #[test]
    fn seeded_options_are_deterministic() {
        let Some(t) = tok() else { return };
        let o = ChatOptions { system_prompt_ratio: 0.5, drop_empty_think_ratio: 0.5, seed: 7 };
        let msgs = [Message::new("user", "Hi"), Message::new("assistant", "Yo")];
        let a: Vec<_> = (0..20).map(|i| t.render_chat(&msgs, None, &o, i).unwrap()).collect();
        let b: Vec<_> = (0..20).map(|i| t.render_chat(&msgs, None, &o, i).unwrap()).collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|s| s.starts_with("<|im_start|>system")));
        assert!(a.iter().any(|s| !s.contains("<think>")));
        let plain = t.render_chat(&msgs, None, &ChatOptions::default(), 3).unwrap();
        assert!(plain.starts_with("<|im_start|>user") && plain.contains("<think>\n\n</think>\n\n"));
    }

    #[test]
    fn dpo_and_prompt_samples() {
        let Some(t) = tok() else { return };
        let ex = Example::Preference {
            prompt: vec![Message::new("user", "1+1?")],
            chosen: vec![Message::new("assistant", "2")],
            rejected: vec![Message::new("assistant", "3")],
            tools: None,
        };
        let s = t.example(&ex, 64, &ChatOptions::default(), 0).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(spans(&t, &s[0]), vec!["<think>\n\n</think>\n\n2<|im_end|>\n"]);
        assert_eq!(spans(&t, &s[1]), vec!["<think>\n\n</think>\n\n3<|im_end|>\n"]);
        let (ids, targets) = t.sft_example(&ex).unwrap();
        assert_eq!(
            (ids, targets.iter().map(|&b| u8::from(b)).collect::<Vec<_>>()),
            (s[0].ids.clone(), s[0].mask.clone())
        );
        let p = Example::PromptAnswer { prompt: "1+1?".into(), answer: "2".into(), final_answer: Some("2".into()) };
        let s = t.example(&p, 64, &ChatOptions::default(), 0).unwrap();
        let text = t.tokenizer.decode(&s[0].ids, false).unwrap();
        assert_eq!(text, "<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n");
        assert_eq!(s[0].trained(), 0);
    }
}
