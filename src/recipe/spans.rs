//! Where every key and value of the recipe text lives, by dotted path.
//!
//! The typed loader works on a plain `toml::Table` (so `--set` overrides can be applied to it);
//! this index, built once from toml's spanned `DeTable`, maps any path back to the file.

use std::collections::HashMap;
use std::ops::Range;
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Spans of one entry.
#[derive(Clone, Debug)]
pub(crate) struct Entry {
    /// The key (for a `[table]` header, the last segment of the header).
    pub(crate) key: Range<usize>,
    /// The value.
    pub(crate) value: Range<usize>,
}

/// Path → spans, for every table entry and array element in the file.
#[derive(Default, Debug)]
pub(crate) struct SpanIndex {
    entries: HashMap<Vec<String>, Entry>,
}

impl SpanIndex {
    /// Index a parsed document.
    pub(crate) fn build(doc: &Spanned<DeTable<'_>>) -> Self {
        let mut idx = SpanIndex::default();
        idx.walk_table(&mut Vec::new(), doc.get_ref());
        idx
    }

    fn walk_table(&mut self, path: &mut Vec<String>, t: &DeTable<'_>) {
        for (k, v) in t.iter() {
            path.push(k.get_ref().to_string());
            self.entries.insert(path.clone(), Entry { key: k.span(), value: v.span() });
            self.walk_value(path, v.get_ref());
            path.pop();
        }
    }

    fn walk_value(&mut self, path: &mut Vec<String>, v: &DeValue<'_>) {
        match v {
            DeValue::Table(t) => self.walk_table(path, t),
            DeValue::Array(a) => {
                for (i, e) in a.iter().enumerate() {
                    path.push(i.to_string());
                    self.entries.insert(path.clone(), Entry { key: e.span(), value: e.span() });
                    self.walk_value(path, e.get_ref());
                    path.pop();
                }
            }
            _ => {}
        }
    }

    /// Spans of `path`, if it is written in the file.
    pub(crate) fn get(&self, path: &[String]) -> Option<&Entry> {
        self.entries.get(path)
    }

    /// Spans of `path` or of its closest written ancestor.
    pub(crate) fn nearest(&self, path: &[String]) -> Option<&Entry> {
        (1..=path.len()).rev().find_map(|n| self.entries.get(&path[..n]))
    }
}
