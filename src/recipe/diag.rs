//! Recipe diagnostics: `file:line:col`, the source line, a caret under the offending span and a hint,
//! rendered the way rustc does.
//!
//! Spans are byte ranges into the recipe text. A value that came from a `--set` override has no
//! place in the file, so its diagnostic points at the override instead.

use std::fmt;
use std::ops::Range;
use std::path::PathBuf;

/// Where a diagnostic points.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A span in the recipe file, already translated to 1-based line and column.
    File {
        /// 1-based line.
        line: usize,
        /// 1-based column (in characters).
        column: usize,
        /// The whole source line (for the snippet).
        source_line: String,
        /// Number of characters to underline (at least 1).
        width: usize,
    },
    /// A `--set key=value` override given on the command line.
    Override(String),
    /// The file as a whole (e.g. a required table is missing entirely).
    WholeFile,
}

/// One problem found in a recipe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The recipe file.
    pub file: PathBuf,
    /// Where in it.
    pub location: Location,
    /// The dotted key path the problem is about (`stages.base.lr`), when there is one.
    pub key: Option<String>,
    /// What is wrong, in one line (may already include "did you mean …").
    pub message: String,
    /// What to do about it.
    pub hint: Option<String>,
}

impl Diagnostic {
    /// 1-based line, when the diagnostic points into the file.
    pub fn line(&self) -> Option<usize> {
        match &self.location {
            Location::File { line, .. } => Some(*line),
            _ => None,
        }
    }

    /// 1-based column, when the diagnostic points into the file.
    pub fn column(&self) -> Option<usize> {
        match &self.location {
            Location::File { column, .. } => Some(*column),
            _ => None,
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "error: {}", self.message)?;
        match &self.location {
            Location::File { line, column, source_line, width } => {
                let gutter = line.to_string().len();
                let pad = " ".repeat(gutter);
                writeln!(f, "{pad}--> {}:{line}:{column}", self.file.display())?;
                writeln!(f, "{pad} |")?;
                writeln!(f, "{line} | {source_line}")?;
                let lead: String =
                    source_line.chars().take(column - 1).map(|c| if c == '\t' { '\t' } else { ' ' }).collect();
                writeln!(f, "{pad} | {lead}{}", "^".repeat(*width))?;
                if let Some(h) = &self.hint {
                    writeln!(f, "{pad} = help: {h}")?;
                }
            }
            Location::Override(o) => {
                writeln!(f, "  --> --set {o} (command line, applied to {})", self.file.display())?;
                if let Some(h) = &self.hint {
                    writeln!(f, "   = help: {h}")?;
                }
            }
            Location::WholeFile => {
                writeln!(f, "  --> {}", self.file.display())?;
                if let Some(h) = &self.hint {
                    writeln!(f, "   = help: {h}")?;
                }
            }
        }
        Ok(())
    }
}

/// The recipe text plus helpers to turn byte spans into [`Location`]s.
pub(crate) struct SourceMap<'a> {
    pub(crate) text: &'a str,
}

impl SourceMap<'_> {
    /// Translate a byte span into line/column and the source line it starts on.
    pub(crate) fn locate(&self, span: Range<usize>) -> Location {
        let start = span.start.min(self.text.len());
        let line_start = self.text[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
        let line_end = self.text[start..].find('\n').map(|i| start + i).unwrap_or(self.text.len());
        let line = self.text[..start].matches('\n').count() + 1;
        let column = self.text[line_start..start].chars().count() + 1;
        let source_line = self.text[line_start..line_end].trim_end_matches('\r').to_string();
        let end = span.end.clamp(start, line_end);
        let width = self.text[start..end].chars().count().max(1);
        Location::File { line, column, source_line, width }
    }
}

/// The closest candidate to `given`, if it is close enough to be a plausible typo.
pub fn did_you_mean<'c>(given: &str, candidates: impl IntoIterator<Item = &'c str>) -> Option<&'c str> {
    let mut best: Option<(&str, usize)> = None;
    for c in candidates {
        let d = strsim::damerau_levenshtein(given, c);
        if best.is_none_or(|(_, bd)| d < bd) {
            best = Some((c, d));
        }
    }
    let (c, d) = best?;
    // Short names tolerate one edit; longer ones about a third of their length.
    let limit = if given.chars().count() <= 3 { 1 } else { given.chars().count().div_ceil(3) };
    let prefix_match = c.starts_with(given) || given.starts_with(c);
    (d <= limit || (prefix_match && d <= limit + 2)).then_some(c)
}

/// `" — did you mean 'x'?"` or the empty string.
pub(crate) fn suggestion<'c>(given: &str, candidates: impl IntoIterator<Item = &'c str>) -> String {
    did_you_mean(given, candidates).map(|c| format!(" — did you mean '{c}'?")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_typos_and_rejects_noise() {
        assert_eq!(did_you_mean("lrr", ["lr", "batch_size"]), Some("lr"));
        assert_eq!(did_you_mean("bsae", ["base", "sft"]), Some("base"));
        assert_eq!(did_you_mean("pretrian", ["tokenizer", "pretrain", "sft"]), Some("pretrain"));
        assert_eq!(did_you_mean("zzz", ["lr", "batch_size"]), None);
        assert_eq!(did_you_mean("x", Vec::<&str>::new()), None);
    }

    #[test]
    fn locate_counts_lines_and_columns_from_one() {
        let sm = SourceMap { text: "a = 1\n  bb = 2\n" };
        match sm.locate(8..10) {
            Location::File { line, column, source_line, width } => {
                assert_eq!((line, column, width), (2, 3, 2));
                assert_eq!(source_line, "  bb = 2");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn renders_like_rustc() {
        let d = Diagnostic {
            file: "r.toml".into(),
            location: SourceMap { text: "[s]\nlrr = 1\n" }.locate(4..7),
            key: Some("s.lrr".into()),
            message: "unknown key 'lrr' in [s] — did you mean 'lr'?".into(),
            hint: Some("known keys: lr".into()),
        };
        let s = d.to_string();
        assert_eq!(
            s,
            "error: unknown key 'lrr' in [s] — did you mean 'lr'?\n --> r.toml:2:1\n  |\n2 | lrr = 1\n  | ^^^\n  = help: known keys: lr\n"
        );
    }
}
