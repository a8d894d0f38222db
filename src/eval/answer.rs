//! Answer extraction and normalisation for exact-match scoring.
//!
//! A model's output (and a reference answer, which may be a whole GSM8K solution) is reduced to one
//! short answer string, tried in this order:
//! 1. GSM8K's `#### <answer>` (the text after the last `####`),
//! 2. `<answer>…</answer>` (the last one),
//! 3. "the answer is X" (case-insensitive, the last one; its first number if it has one),
//! 4. "answer: X" (the last one; the number after its last `=`, so a truncated
//!    "Answer: 12 + 7 = 19. The" still gives 19),
//! 5. the last number in the text,
//! 6. the whole text, trimmed.
//!
//! Normalisation lowercases, trims surrounding whitespace and punctuation, drops `$`/`%` signs and
//! thousands separators, and writes numbers canonically (`3.0` → `3`, `-0.50` → `-0.5`), so
//! `"$1,000."` and `"1000"` match.

use regex::Regex;
use std::sync::OnceLock;

fn re(cell: &'static OnceLock<Regex>, pat: &str) -> &'static Regex {
    cell.get_or_init(|| Regex::new(pat).expect("static regex compiles"))
}

fn number_re() -> &'static Regex {
    static R: OnceLock<Regex> = OnceLock::new();
    re(&R, r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
}

/// The answer part of `text` (see the module docs for the rules), not yet normalised.
pub fn extract_answer(text: &str) -> String {
    if let Some(i) = text.rfind("####") {
        let rest = text[i + 4..].trim();
        let line = rest.lines().next().unwrap_or("").trim();
        if !line.is_empty() {
            return line.to_string();
        }
    }
    static TAG: OnceLock<Regex> = OnceLock::new();
    if let Some(c) = re(&TAG, r"(?s)<answer>(.*?)</answer>").captures_iter(text).last() {
        return c[1].trim().to_string();
    }
    static SAYS: OnceLock<Regex> = OnceLock::new();
    if let Some(c) = re(&SAYS, r"(?i)the\s+(?:final\s+)?answer\s+is\s*:?\s*([^\n]+)").captures_iter(text).last() {
        return first_number_or(c[1].trim());
    }
    static LABEL: OnceLock<Regex> = OnceLock::new();
    if let Some(c) = re(&LABEL, r"(?i)answer\s*[:：]\s*([^\n]+)").captures_iter(text).last() {
        // "Answer: 12 + 7 = 19" → the result after the last `=`.
        let tail = c[1].trim();
        let tail = tail.rsplit_once('=').map(|(_, r)| r.trim()).unwrap_or(tail);
        return first_number_or(tail);
    }
    if let Some(m) = number_re().find_iter(text).last() {
        return m.as_str().to_string();
    }
    text.trim().to_string()
}

/// "42 apples." → "42"; text without a number stays as it is.
fn first_number_or(tail: &str) -> String {
    match number_re().find(tail) {
        Some(m) => m.as_str().to_string(),
        None => tail.to_string(),
    }
}

/// Canonical form of an answer string (see the module docs).
pub fn normalize(answer: &str) -> String {
    let s = answer.trim().to_lowercase();
    let s = s.trim_matches(|c: char| c.is_whitespace() || ".,;:!?。，！？\"'`*".contains(c));
    let compact: String = s.chars().filter(|c| !matches!(c, '$' | '%' | ',')).collect();
    if let Ok(v) = compact.parse::<f64>() {
        if v.is_finite() {
            return canonical_number(v);
        }
    }
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn canonical_number(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        let s = format!("{v}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

/// Whether a model output answers like the reference: both are extracted and normalised.
pub fn is_correct(output: &str, reference: &str) -> bool {
    let pred = normalize(&extract_answer(output));
    let gold = normalize(&extract_answer(reference));
    !gold.is_empty() && pred == gold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extraction_rules_in_order() {
        assert_eq!(extract_answer("She pays 5*2=<<5*2=10>>10 dollars.\n#### 10"), "10");
        assert_eq!(extract_answer("think 3 then <answer> 42 </answer> done 7"), "42");
        assert_eq!(extract_answer("so 3+4=7. The answer is 7 apples."), "7");
        assert_eq!(extract_answer("Answer: B"), "B");
        assert_eq!(extract_answer(" Answer: 12 + 7 = 19. The"), "19");
        assert_eq!(extract_answer("Answer: 12 + 7 = 19. The answer is 19."), "19");
        assert_eq!(extract_answer("12 + 30 = 42"), "42");
        assert_eq!(extract_answer("x = -3.5 or so"), "-3.5");
        assert_eq!(extract_answer("  Paris "), "Paris");
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalize("$1,000."), "1000");
        assert_eq!(normalize("3.0"), "3");
        assert_eq!(normalize("-0.50"), "-0.5");
        assert_eq!(normalize(" Paris. "), "paris");
        assert_eq!(normalize("50%"), "50");
    }

    #[test]
    fn correctness_compares_normalised_extractions() {
        assert!(is_correct("The answer is 1,000", "#### 1000"));
        assert!(is_correct("<answer>18</answer>", "Janet sells 16-3-4=9 eggs... 9*2=18\n#### 18"));
        assert!(!is_correct("17", "#### 18"));
        assert!(is_correct("7", "7"));
        assert!(!is_correct("anything", ""));
    }
}
