//! Reading a model's streamed output: stop strings that may straddle token boundaries, and the
//! chat template's markup — `<think>…</think>` (reasoning) and `<tool_call>{json}</tool_call>`
//! (tool calls) — split from the answer as it streams.
//!
//! Both hold back only the shortest tail that could still turn into a stop string or a tag, so
//! text reaches the user as soon as it is certain.

/// Finds stop strings in streamed text. Text is released only when no stop string can start in
/// it any more.
#[derive(Clone, Debug, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    /// A matcher for `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    /// Feed a delta; returns `(text safe to emit, whether a stop string was found)`. After a
    /// stop, the text before it has been returned and the rest must be discarded.
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (delta.to_string(), false);
        }
        self.held.push_str(delta);
        let first = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min();
        if let Some(at) = first {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        let keep = self.stops.iter().map(|s| partial_suffix(&self.held, s)).max().unwrap_or(0);
        let out = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..self.held.len() - keep);
        (out, false)
    }

    /// Whatever is still held back (the generation ended without a stop string).
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `pat` (on char
/// boundaries).
fn partial_suffix(text: &str, pat: &str) -> usize {
    let max = pat.len().saturating_sub(1).min(text.len());
    (1..=max)
        .rev()
        .find(|&n| text.is_char_boundary(text.len() - n) && pat.starts_with(&text[text.len() - n..]))
        .unwrap_or(0)
}

/// One piece of parsed model output.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    /// Answer text.
    Content(String),
    /// Text inside `<think>…</think>`.
    Reasoning(String),
    /// A complete `<tool_call>` block: the function name and its arguments as JSON text.
    ToolCall {
        /// Function name.
        name: String,
        /// Arguments, a JSON object serialised.
        arguments: String,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Content,
    Think,
    Tool,
}

const THINK_OPEN: &str = "<think>";
const THINK_CLOSE: &str = "</think>";
const TOOL_OPEN: &str = "<tool_call>";
const TOOL_CLOSE: &str = "</tool_call>";

/// Splits streamed output into content, reasoning and tool calls.
#[derive(Clone, Debug)]
pub struct OutputParser {
    mode: Mode,
    held: String,
    tool: String,
    /// Strip the newlines the template puts around tags (`<think>\n`, `</think>\n\n`).
    trim_next: bool,
}

impl OutputParser {
    /// A parser; `in_thinking` when the prompt ended with an open `<think>` (thinking enabled).
    pub fn new(in_thinking: bool) -> Self {
        Self {
            mode: if in_thinking { Mode::Think } else { Mode::Content },
            held: String::new(),
            tool: String::new(),
            trim_next: true,
        }
    }

    /// Feed a text delta; returns the pieces that are now certain.
    pub fn push(&mut self, delta: &str) -> Vec<Piece> {
        self.held.push_str(delta);
        let mut out = Vec::new();
        loop {
            if self.trim_next {
                let t = self.held.trim_start_matches('\n');
                if t.is_empty() {
                    self.held.clear();
                    return out;
                }
                self.held = t.to_string();
                self.trim_next = false;
            }
            let tags: &[&str] = match self.mode {
                Mode::Content => &[THINK_OPEN, TOOL_OPEN, THINK_CLOSE],
                Mode::Think => &[THINK_CLOSE],
                Mode::Tool => &[TOOL_CLOSE],
            };
            let hit = tags.iter().filter_map(|t| self.held.find(t).map(|at| (at, *t))).min();
            match hit {
                Some((at, tag)) => {
                    // The newlines the template puts before a tag belong to the markup.
                    let before = self.held[..at].trim_end_matches('\n').to_string();
                    self.held.drain(..at + tag.len());
                    self.emit(before, &mut out);
                    match tag {
                        THINK_OPEN => self.mode = Mode::Think,
                        TOOL_OPEN => self.mode = Mode::Tool,
                        TOOL_CLOSE => {
                            out.push(tool_piece(&std::mem::take(&mut self.tool)));
                            self.mode = Mode::Content;
                        }
                        // `</think>` (also a stray one in content, when the prompt opened the block).
                        _ => self.mode = Mode::Content,
                    }
                    self.trim_next = true;
                }
                None => {
                    let keep = tags.iter().map(|t| partial_suffix(&self.held, t)).max().unwrap_or(0);
                    // Hold trailing newlines too: a tag may follow them.
                    let keep = keep + self.held[..self.held.len() - keep].len()
                        - self.held[..self.held.len() - keep].trim_end_matches('\n').len();
                    let ready = self.held[..self.held.len() - keep].to_string();
                    self.held.drain(..self.held.len() - keep);
                    self.emit(ready, &mut out);
                    return out;
                }
            }
        }
    }

    /// The generation ended: flush what is held (an unterminated tool call is content).
    pub fn finish(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let rest = std::mem::take(&mut self.held);
        if self.mode == Mode::Tool {
            let text = format!("{TOOL_OPEN}{}{rest}", std::mem::take(&mut self.tool));
            out.push(Piece::Content(text));
        } else {
            self.emit(rest, &mut out);
        }
        out
    }

    fn emit(&mut self, text: String, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        match self.mode {
            Mode::Content => out.push(Piece::Content(text)),
            Mode::Think => out.push(Piece::Reasoning(text)),
            Mode::Tool => self.tool.push_str(&text),
        }
    }
}

/// A tool call block's JSON (`{"name": …, "arguments": {…}}`); not JSON of that shape → the
/// block is passed through as content, so nothing the model wrote is lost.
fn tool_piece(body: &str) -> Piece {
    let parsed: Option<(String, String)> = serde_json::from_str::<serde_json::Value>(body.trim()).ok().and_then(|v| {
        let name = v.get("name")?.as_str()?.to_string();
        let args = match v.get("arguments") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(a) => a.to_string(),
            None => "{}".into(),
        };
        Some((name, args))
    });
    match parsed {
        Some((name, arguments)) => Piece::ToolCall { name, arguments },
        None => Piece::Content(format!("{TOOL_OPEN}{body}{TOOL_CLOSE}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feed `text` split at every possible place into `n` pieces and collect merged output.
    fn parse_chunks(text: &str, step: usize, thinking: bool) -> Vec<Piece> {
        let mut p = OutputParser::new(thinking);
        let mut out = vec![];
        let chars: Vec<char> = text.chars().collect();
        for c in chars.chunks(step) {
            out.extend(p.push(&c.iter().collect::<String>()));
        }
        out.extend(p.finish());
        merge(out)
    }

    fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
        let mut out: Vec<Piece> = vec![];
        for p in pieces {
            match (out.last_mut(), &p) {
                (Some(Piece::Content(a)), Piece::Content(b)) => a.push_str(b),
                (Some(Piece::Reasoning(a)), Piece::Reasoning(b)) => a.push_str(b),
                _ => out.push(p),
            }
        }
        out
    }

    #[test]
    fn thinking_content_and_tool_calls_split_at_any_chunking() {
        let text = "<think>\nLet me see.\n</think>\n\nIt is sunny.\n<tool_call>\n{\"name\": \"weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>";
        for step in 1..=text.len() {
            assert_eq!(
                parse_chunks(text, step, false),
                vec![
                    Piece::Reasoning("Let me see.".into()),
                    Piece::Content("It is sunny.".into()),
                    Piece::ToolCall { name: "weather".into(), arguments: "{\"city\":\"Paris\"}".into() },
                ],
                "step {step}"
            );
        }
        // The prompt opened the think block (thinking enabled).
        for step in 1..12 {
            assert_eq!(
                parse_chunks("hmm 1 < 2\n</think>\n\nYes.", step, true),
                vec![Piece::Reasoning("hmm 1 < 2".into()), Piece::Content("Yes.".into())]
            );
        }
    }

    #[test]
    fn malformed_or_unfinished_tool_calls_stay_content() {
        assert_eq!(
            parse_chunks("a<tool_call>not json</tool_call>", 3, false),
            vec![Piece::Content("a<tool_call>not json</tool_call>".into())]
        );
        assert_eq!(parse_chunks("a<tool_call>{\"na", 2, false), vec![Piece::Content("a<tool_call>{\"na".into())]);
        // A lone '<' that never becomes a tag is released at the end.
        assert_eq!(parse_chunks("x <", 1, false), vec![Piece::Content("x <".into())]);
    }

    #[test]
    fn stop_strings_straddle_chunks() {
        let mut s = StopStrings::new(&["END".into(), "\n\n".into()]);
        assert_eq!(s.push("abc E"), ("abc ".into(), false));
        assert_eq!(s.push("N"), ("".into(), false));
        assert_eq!(s.push("X fine"), ("ENX fine".into(), false));
        assert_eq!(s.push(" E"), (" ".into(), false));
        assert_eq!(s.push("ND tail"), ("".into(), true));
        let mut s = StopStrings::new(&["\n\n".into()]);
        assert_eq!(s.push("line\n"), ("line".into(), false));
        assert_eq!(s.finish(), "\n");
        let mut none = StopStrings::new(&[]);
        assert_eq!(none.push("é"), ("é".into(), false));
        // Multi-byte characters around a partial match.
        let mut s = StopStrings::new(&["éé".into()]);
        assert_eq!(s.push("aé"), ("a".into(), false));
        assert_eq!(s.push("é!"), ("".into(), true));
    }
}
