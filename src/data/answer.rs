//! The checkable final answer of a `prompt_answer` record, taken when the data is read (a model's
//! generated answers are extracted and compared by [`crate::eval::answer`]).

/// The checkable final answer: the value after GSM8K's `#### ` (which must be a number; thousands
/// commas removed); in a one-line worked answer ending "The answer is N." (what `builtin:arithmetic`
/// writes), that number; else a bare one-line answer (commas removed when it is a number).
/// Multi-line text without `####` has no extractable answer.
pub fn normalize_answer(answer: &str) -> Option<String> {
    if let Some(idx) = answer.rfind("####") {
        let v = answer[idx + 4..].trim();
        return normalize_number(v);
    }
    let t = answer.trim();
    if t.is_empty() || t.contains('\n') {
        return None;
    }
    const SAYS: &str = "The answer is ";
    if let Some(idx) = t.rfind(SAYS) {
        if let Some(n) = normalize_number(&t[idx + SAYS.len()..]) {
            return Some(n);
        }
    }
    Some(normalize_number(t).unwrap_or_else(|| t.to_string()))
}

/// `"1,234"` → `"1234"`, `"−3"` → `"-3"`, `"5.0"` stays; `None` if not a number.
pub fn normalize_number(s: &str) -> Option<String> {
    let cleaned: String = s.trim().replace('\u{2212}', "-").chars().filter(|c| *c != ',' && *c != '$').collect();
    let cleaned = cleaned.trim_end_matches('.');
    cleaned.parse::<f64>().ok().filter(|x| x.is_finite())?;
    Some(cleaned.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_normalise() {
        assert_eq!(normalize_answer("a\nb\n#### 1,234").as_deref(), Some("1234"));
        assert_eq!(normalize_answer("x\n#### seven"), None);
        assert_eq!(normalize_answer("x\ny"), None);
        assert_eq!(normalize_answer(" 56 ").as_deref(), Some("56"));
        assert_eq!(normalize_answer("−3").as_deref(), Some("-3"));
        assert_eq!(normalize_answer("食管克罗恩病").as_deref(), Some("食管克罗恩病"));
        assert_eq!(normalize_answer("9 - 5 = 4. The answer is 4.").as_deref(), Some("4"));
        assert_eq!(normalize_answer("The answer is 1,204").as_deref(), Some("1204"));
        // Not a number after it: the whole line is the answer, as before.
        assert_eq!(normalize_answer("The answer is yes").as_deref(), Some("The answer is yes"));
    }
}
