//! Exact decimal arithmetic and the calculator's expression parser.
//!
//! A [`Dec`] is `mantissa / 10^scale` over a big integer, so sums and products of long numbers are
//! exact (what a small model cannot do in its head). Division rounds half away from zero to
//! [`DIV_PLACES`] decimal places. Every value is bounded to [`MAX_DIGITS`] digits and every input
//! to [`MAX_EXPR_CHARS`] characters, so no expression can take long or print a lot.

use num_bigint::BigInt;
use num_integer::Integer;
use num_traits::{Signed, ToPrimitive, Zero};
use std::fmt;

/// Most digits (before and after the point) any value may hold.
pub const MAX_DIGITS: usize = 120;
/// Decimal places kept by division.
pub const DIV_PLACES: u32 = 10;
/// Longest expression the calculator reads.
pub const MAX_EXPR_CHARS: usize = 256;
/// Deepest nesting of parentheses and unary signs.
const MAX_DEPTH: usize = 64;

/// An exact decimal number.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dec {
    m: BigInt,
    scale: u32,
}

fn pow10(n: u32) -> BigInt {
    num_traits::pow(BigInt::from(10u8), n as usize)
}

impl Dec {
    /// `n` as a decimal.
    pub fn int(n: i64) -> Self {
        Dec { m: BigInt::from(n), scale: 0 }
    }

    /// Read `-12.5`, `3`, `1e3`, `2.5E-2` (JSON number syntax, leading `+` allowed).
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let (neg, body) = match t.strip_prefix('-') {
            Some(b) => (true, b),
            None => (false, t.strip_prefix('+').unwrap_or(t)),
        };
        let (num, exp) = match body.find(['e', 'E']) {
            Some(i) => {
                let e: i32 = body[i + 1..].parse().map_err(|_| format!("'{s}' is not a number"))?;
                (&body[..i], e)
            }
            None => (body, 0),
        };
        let (ip, fp) = num.split_once('.').unwrap_or((num, ""));
        let ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
        if (ip.is_empty() && fp.is_empty()) || !ok(ip) || !ok(fp) || exp.unsigned_abs() > MAX_DIGITS as u32 {
            return Err(format!("'{s}' is not a number"));
        }
        let digits = format!("{ip}{fp}");
        if digits.trim_start_matches('0').len() > MAX_DIGITS {
            return Err(format!("'{s}' has more than {MAX_DIGITS} digits"));
        }
        let mut m: BigInt = digits.parse().unwrap_or_default();
        let mut scale = fp.len() as i64 - exp as i64;
        if scale < 0 {
            m *= pow10((-scale) as u32);
            scale = 0;
        }
        if neg {
            m = -m;
        }
        Dec { m, scale: scale as u32 }.checked()
    }

    /// Drop trailing fractional zeros.
    fn norm(mut self) -> Self {
        let ten = BigInt::from(10u8);
        while self.scale > 0 && (&self.m % &ten).is_zero() {
            self.m /= &ten;
            self.scale -= 1;
        }
        self
    }

    fn digits(&self) -> usize {
        if self.m.is_zero() {
            1
        } else {
            self.m.abs().to_str_radix(10).len()
        }
    }

    /// Normalised, or an error when it holds more than [`MAX_DIGITS`] digits.
    fn checked(self) -> Result<Self, String> {
        let d = self.norm();
        if d.digits() > MAX_DIGITS {
            return Err(format!("the result has more than {MAX_DIGITS} digits"));
        }
        Ok(d)
    }

    fn aligned(&self, other: &Dec) -> (BigInt, BigInt, u32) {
        let s = self.scale.max(other.scale);
        (&self.m * pow10(s - self.scale), &other.m * pow10(s - other.scale), s)
    }

    /// `self + other`.
    pub fn add(&self, other: &Dec) -> Result<Dec, String> {
        let (a, b, scale) = self.aligned(other);
        Dec { m: a + b, scale }.checked()
    }

    /// `self - other`.
    pub fn sub(&self, other: &Dec) -> Result<Dec, String> {
        let (a, b, scale) = self.aligned(other);
        Dec { m: a - b, scale }.checked()
    }

    /// `self × other`.
    pub fn mul(&self, other: &Dec) -> Result<Dec, String> {
        if self.digits() + other.digits() > MAX_DIGITS + 1 {
            return Err(format!("the result has more than {MAX_DIGITS} digits"));
        }
        Dec { m: &self.m * &other.m, scale: self.scale + other.scale }.checked()
    }

    /// `self ÷ other`, rounded half away from zero to [`DIV_PLACES`] places.
    pub fn div(&self, other: &Dec) -> Result<Dec, String> {
        if other.m.is_zero() {
            return Err("division by zero".into());
        }
        // (m1 / 10^s1) / (m2 / 10^s2) = m1·10^(s2+P) / (m2·10^s1) at scale P.
        let num = &self.m * pow10(other.scale + DIV_PLACES);
        let den = &other.m * pow10(self.scale);
        let (mut q, r) = num.div_rem(&den);
        if BigInt::from(2u8) * r.abs() >= den.abs() {
            q += if num.is_negative() != den.is_negative() { -1 } else { 1 };
        }
        Dec { m: q, scale: DIV_PLACES }.checked()
    }

    /// `self ^ exp` for an integer exponent (a negative one divides).
    pub fn pow(&self, exp: &Dec) -> Result<Dec, String> {
        if exp.scale != 0 {
            return Err("exponents must be whole numbers".into());
        }
        let n = exp.m.to_i64().filter(|n| n.unsigned_abs() <= 4 * MAX_DIGITS as u64);
        let n = n.ok_or_else(|| format!("the exponent {exp} is too large"))?;
        if self.m.is_zero() && n < 0 {
            return Err("division by zero".into());
        }
        let trivial = self.m.abs() == pow10(self.scale); // ±1
        if !trivial && !self.m.is_zero() && (self.digits() - 1).max(1) * n.unsigned_abs() as usize > MAX_DIGITS {
            return Err(format!("the result has more than {MAX_DIGITS} digits"));
        }
        let mut acc = Dec::int(1);
        for _ in 0..n.unsigned_abs() {
            acc = acc.mul(self)?;
        }
        if n < 0 {
            acc = Dec::int(1).div(&acc)?;
        }
        Ok(acc)
    }
}

impl fmt::Display for Dec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.m.abs().to_str_radix(10);
        let sign = if self.m.is_negative() { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return write!(f, "{sign}{s}");
        }
        let s = format!("{s:0>width$}", width = scale + 1);
        let (ip, fp) = s.split_at(s.len() - scale);
        write!(f, "{sign}{ip}.{fp}")
    }
}

/// Evaluate an arithmetic expression: numbers, `+ - * / ^` (also `×`, `÷`, `**`), unary signs
/// and parentheses. Never evaluates anything else.
pub fn evaluate(expr: &str) -> Result<Dec, String> {
    if expr.chars().count() > MAX_EXPR_CHARS {
        return Err(format!("the expression is longer than {MAX_EXPR_CHARS} characters"));
    }
    let toks = lex(expr)?;
    let mut p = Parser { toks, pos: 0, depth: 0 };
    let v = p.expr()?;
    match p.toks.get(p.pos) {
        None => Ok(v),
        Some((t, at)) => Err(format!("unexpected '{t}' at character {}", at + 1)),
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Tok {
    Num(Dec),
    Op(char),
}

impl fmt::Display for Tok {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tok::Num(d) => write!(f, "{d}"),
            Tok::Op(c) => write!(f, "{c}"),
        }
    }
}

fn lex(expr: &str) -> Result<Vec<(Tok, usize)>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = vec![];
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '0'..='9' | '.' => {
                let start = i;
                while i < chars.len() && (chars[i].is_ascii_digit() || chars[i] == '.' || chars[i] == ',') {
                    i += 1;
                }
                // Thousands separators are accepted and dropped: "1,234" is 1234.
                let text: String = chars[start..i].iter().filter(|c| **c != ',').collect();
                out.push((
                    Tok::Num(Dec::parse(&text).map_err(|e| format!("{e} (at character {})", start + 1))?),
                    start,
                ));
            }
            '*' if chars.get(i + 1) == Some(&'*') => {
                out.push((Tok::Op('^'), i));
                i += 2;
            }
            '+' | '-' | '*' | '/' | '^' | '(' | ')' => {
                out.push((Tok::Op(c), i));
                i += 1;
            }
            '×' | 'x' | 'X' => {
                out.push((Tok::Op('*'), i));
                i += 1;
            }
            '÷' => {
                out.push((Tok::Op('/'), i));
                i += 1;
            }
            '−' => {
                out.push((Tok::Op('-'), i));
                i += 1;
            }
            other => {
                return Err(format!(
                    "unexpected '{other}' at character {}: only numbers, + - * / ^ and parentheses are allowed",
                    i + 1
                ))
            }
        }
    }
    Ok(out)
}

struct Parser {
    toks: Vec<(Tok, usize)>,
    pos: usize,
    depth: usize,
}

impl Parser {
    fn peek_op(&self) -> Option<char> {
        match self.toks.get(self.pos) {
            Some((Tok::Op(c), _)) => Some(*c),
            _ => None,
        }
    }

    fn deeper(&mut self) -> Result<(), String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("the expression nests deeper than {MAX_DEPTH} levels"));
        }
        Ok(())
    }

    fn expr(&mut self) -> Result<Dec, String> {
        let mut v = self.term()?;
        while let Some(op @ ('+' | '-')) = self.peek_op() {
            self.pos += 1;
            let r = self.term()?;
            v = if op == '+' { v.add(&r)? } else { v.sub(&r)? };
        }
        Ok(v)
    }

    fn term(&mut self) -> Result<Dec, String> {
        let mut v = self.unary()?;
        while let Some(op @ ('*' | '/')) = self.peek_op() {
            self.pos += 1;
            let r = self.unary()?;
            v = if op == '*' { v.mul(&r)? } else { v.div(&r)? };
        }
        Ok(v)
    }

    fn unary(&mut self) -> Result<Dec, String> {
        match self.peek_op() {
            Some(op @ ('+' | '-')) => {
                self.pos += 1;
                self.deeper()?;
                let v = self.unary()?;
                self.depth -= 1;
                if op == '-' {
                    Dec::int(0).sub(&v)
                } else {
                    Ok(v)
                }
            }
            _ => self.power(),
        }
    }

    fn power(&mut self) -> Result<Dec, String> {
        let base = self.atom()?;
        if self.peek_op() == Some('^') {
            self.pos += 1;
            self.deeper()?;
            let exp = self.unary()?; // right-associative: 2^3^2 = 2^9
            self.depth -= 1;
            return base.pow(&exp);
        }
        Ok(base)
    }

    fn atom(&mut self) -> Result<Dec, String> {
        let Some((tok, at)) = self.toks.get(self.pos).cloned() else {
            return Err("the expression ends too early".into());
        };
        self.pos += 1;
        match tok {
            Tok::Num(d) => Ok(d),
            Tok::Op('(') => {
                self.deeper()?;
                let v = self.expr()?;
                self.depth -= 1;
                if self.peek_op() != Some(')') {
                    return Err(format!("missing ')' for the '(' at character {}", at + 1));
                }
                self.pos += 1;
                Ok(v)
            }
            t => Err(format!("unexpected '{t}' at character {}", at + 1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(s: &str) -> String {
        evaluate(s).map(|d| d.to_string()).unwrap_or_else(|e| format!("ERR {e}"))
    }

    #[test]
    fn exact_big_arithmetic_and_precedence() {
        assert_eq!(ev("48213 * 90731"), "4374413703");
        assert_eq!(ev("123456789123456789 + 987654321987654321"), "1111111111111111110");
        assert_eq!(ev("2^100"), "1267650600228229401496703205376");
        assert_eq!(ev("2 + 3 * 4"), "14");
        assert_eq!(ev("(2 + 3) * 4"), "20");
        assert_eq!(ev("2 ** 3 ^ 2"), "512");
        assert_eq!(ev("-3 - -2"), "-1");
        assert_eq!(ev("0.1 + 0.2"), "0.3");
        assert_eq!(ev("1 / 3"), "0.3333333333");
        assert_eq!(ev("2 / 3"), "0.6666666667");
        assert_eq!(ev("-2 / 3"), "-0.6666666667");
        assert_eq!(ev("10 / 4"), "2.5");
        assert_eq!(ev("1,234 × 2"), "2468");
        assert_eq!(ev("2^-2"), "0.25");
        assert_eq!(ev("1.50 * 2"), "3");
        assert_eq!(ev("0.001 * 0.001"), "0.000001");
    }

    #[test]
    fn bad_expressions_are_errors_not_panics() {
        for (e, msg) in [
            ("1 / 0", "division by zero"),
            ("2 +", "ends too early"),
            ("(1 + 2", "missing ')'"),
            ("1 2", "unexpected '2' at character 3"),
            ("import os", "unexpected 'i' at character 1"),
            ("__import__('os')", "unexpected '_'"),
            ("1.2.3", "not a number"),
            ("2 ^ 0.5", "whole numbers"),
            ("10 ^ 200", "more than 120 digits"),
            ("9 ^ 99999999999999999999", "too large"),
            ("0 ^ -1", "division by zero"),
        ] {
            let got = ev(e);
            assert!(got.starts_with("ERR") && got.contains(msg), "{e}: {got}");
        }
        let long = "1+".repeat(200) + "1";
        assert!(ev(&long).contains("longer than 256"));
        let deep = "(".repeat(100) + "1" + &")".repeat(100);
        assert!(ev(&deep).contains("deeper than 64"));
        let digits = "9".repeat(MAX_DIGITS + 1);
        assert!(ev(&digits).contains("more than 120 digits"));
        let big = "9".repeat(70);
        assert!(ev(&format!("{big} * {big}")).contains("more than 120 digits"));
        assert_eq!(ev("1 ^ 400"), "1");
    }

    #[test]
    fn numbers_parse_in_json_syntax() {
        assert_eq!(Dec::parse("1e3").unwrap().to_string(), "1000");
        assert_eq!(Dec::parse("2.5E-2").unwrap().to_string(), "0.025");
        assert_eq!(Dec::parse("-0.50").unwrap().to_string(), "-0.5");
        assert!(Dec::parse("e5").is_err());
        assert!(Dec::parse("").is_err());
        assert!(Dec::parse("1e999").is_err());
    }
}
