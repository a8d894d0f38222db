//! The recipe loader: TOML text (+ `--set` overrides) → a validated [`Recipe`], or every problem
//! found, each pointing at its span.
//!
//! Phases: (1) parse with spans (syntax errors stop here); (2) apply overrides to a plain
//! `toml::Table`; (3) type each section (`[recipe]`, `[model]`, `[datasets.*]`, `[stages.*]`, the
//! latter through its kind's params struct) and map serde's messages back to the key's span;
//! (4) check references, artifact types and cycles. Loading never panics on user input.

use super::diag::{suggestion, Diagnostic, Location, SourceMap};
use super::kind::{DynStageKind, InputRef, ParamsError};
use super::overrides::{self, Applied};
use super::spans::SpanIndex;
use super::{
    resolve_model, DeviceClass, DeviceSpec, ModelSpec, Recipe, RecipeMeta, Resources, StageSpec, UnknownDevice,
};
use crate::data::spec::DatasetSpec;
use crate::fs_error::{IoContext, IoError};
use crate::hub::uri::HubUri;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

/// Why a recipe could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    /// The file could not be read.
    #[error("{0}; check the recipe's path")]
    Io(IoError),
    /// The recipe is malformed; every problem found, in file order where possible.
    #[error("{}", Rendered(.0))]
    Invalid(Vec<Diagnostic>),
}

impl RecipeError {
    /// The diagnostics (empty for I/O errors).
    pub fn diagnostics(&self) -> &[Diagnostic] {
        match self {
            RecipeError::Invalid(d) => d,
            RecipeError::Io(_) => &[],
        }
    }
}

struct Rendered<'a>(&'a [Diagnostic]);

impl fmt::Display for Rendered<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{d}")?;
        }
        if self.0.len() > 1 {
            write!(f, "\n{} problems in the recipe", self.0.len())?;
        }
        Ok(())
    }
}

/// Load and validate a recipe against the stage kinds `registry` (mmrun's are
/// `crate::stages::kinds()`, wired in by `crate::exec::pipeline`; tests use stub kinds).
pub fn load(path: &Path, overrides: &[String], registry: &[&dyn DynStageKind]) -> Result<Recipe, RecipeError> {
    let bytes = std::fs::read(path).ctx("reading recipe", path).map_err(RecipeError::Io)?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let bytes = e.as_bytes();
        let at = e.utf8_error().valid_up_to();
        let line_start = bytes[..at].iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let source_line = String::from_utf8_lossy(&bytes[line_start..]).lines().next().unwrap_or("").to_string();
        RecipeError::Invalid(vec![Diagnostic {
            file: path.to_path_buf(),
            location: Location::File {
                line: bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1,
                column: String::from_utf8_lossy(&bytes[line_start..at]).chars().count() + 1,
                source_line,
                width: 1,
            },
            key: None,
            message: format!("the recipe is not UTF-8 text: byte 0x{:02x} at byte offset {at}", bytes[at]),
            hint: Some("save the recipe as UTF-8 (TOML files must be UTF-8)".into()),
        }])
    })?;
    load_str(path, text, overrides, registry)
}

/// [`load`] on text already in memory; `path` is used for messages and relative paths only.
pub fn load_str(
    path: &Path,
    text: String,
    overrides: &[String],
    registry: &[&dyn DynStageKind],
) -> Result<Recipe, RecipeError> {
    let sm = SourceMap { text: &text };
    let spanned = match toml::de::DeTable::parse(&text) {
        Ok(t) => t,
        Err(e) => {
            let location = e.span().map(|s| sm.locate(s)).unwrap_or(Location::WholeFile);
            return Err(RecipeError::Invalid(vec![Diagnostic {
                file: path.to_path_buf(),
                location,
                key: None,
                message: format!("TOML syntax error: {}", e.message().trim_end()),
                hint: Some("see https://toml.io for the syntax".into()),
            }]));
        }
    };
    let spans = SpanIndex::build(&spanned);
    let mut doc: toml::Table = match text.parse() {
        Ok(t) => t,
        Err(e) => {
            // DeTable accepted it, so this is unreachable in practice; still no panic.
            return Err(RecipeError::Invalid(vec![Diagnostic {
                file: path.to_path_buf(),
                location: Location::WholeFile,
                key: None,
                message: format!("TOML error: {}", e.message()),
                hint: None,
            }]));
        }
    };
    let applied = overrides::apply(path, &mut doc, overrides).map_err(RecipeError::Invalid)?;
    let mut l = Loader { file: path, sm, spans, applied, diags: Vec::new(), registry };
    let recipe = l.typed(&doc, &text, overrides);
    if l.diags.is_empty() {
        Ok(recipe.expect("no diagnostics means every section typed"))
    } else {
        // Read top to bottom: file positions in order, then command-line overrides.
        l.diags.sort_by_key(|d| match &d.location {
            Location::WholeFile => (0, 0, 0),
            Location::File { line, column, .. } => (1, *line, *column),
            Location::Override(_) => (2, 0, 0),
        });
        Err(RecipeError::Invalid(l.diags))
    }
}

const TOP_LEVEL: &[&str] = &["recipe", "model", "models", "datasets", "stages", "cache"];

/// The stage kind a `[models.<name>]` table declares (its only key is the kind's `source`).
const MODEL_INPUT_KIND: &str = "model";

struct Loader<'a> {
    file: &'a Path,
    sm: SourceMap<'a>,
    spans: SpanIndex,
    applied: Vec<Applied>,
    diags: Vec<Diagnostic>,
    registry: &'a [&'a dyn DynStageKind],
}

fn p(segs: &[&str]) -> Vec<String> {
    segs.iter().map(|s| s.to_string()).collect()
}

/// `stages.base.data.1` → `stages.base.data[1]`.
fn dotted(path: &[String]) -> String {
    let mut s = String::new();
    for seg in path {
        if seg.parse::<usize>().is_ok() && !s.is_empty() {
            s.push_str(&format!("[{seg}]"));
        } else {
            if !s.is_empty() {
                s.push('.');
            }
            s.push_str(seg);
        }
    }
    s
}

/// How a table is named in messages: `[stages.base]`.
fn section(path: &[String]) -> String {
    format!("[{}]", path.join("."))
}

/// Names are used as file names (fingerprints, run directories): keep them tame.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// Where `path` is: the override that set it, its value (or key) span, or its nearest ancestor.
fn locate(applied: &[Applied], spans: &SpanIndex, sm: &SourceMap<'_>, path: &[String], prefer_key: bool) -> Location {
    if let Some(a) = applied.iter().rev().find(|a| path.starts_with(&a.path)) {
        return Location::Override(a.raw.clone());
    }
    match spans.get(path) {
        Some(e) => sm.locate(if prefer_key { e.key.clone() } else { e.value.clone() }),
        None => match spans.nearest(path) {
            Some(e) => sm.locate(e.key.clone()),
            None => Location::WholeFile,
        },
    }
}

impl Recipe {
    /// A diagnostic about the value at `path` (`["stages", "base", "devices", "2"]`) of this
    /// loaded recipe, pointed at as the loader points (the `--set` that wrote it, else its place in
    /// the file): for problems found after loading, against the machine the recipe runs on.
    pub fn diagnostic_at(&self, path: &[&str], message: String, hint: String) -> Diagnostic {
        let path = p(path);
        let sm = SourceMap { text: &self.source_text };
        let spans = toml::de::DeTable::parse(&self.source_text).map(|t| SpanIndex::build(&t)).unwrap_or_default();
        let mut doc: toml::Table = self.source_text.parse().unwrap_or_default();
        let applied = overrides::apply(&self.path, &mut doc, &self.overrides).unwrap_or_default();
        Diagnostic {
            file: self.path.clone(),
            location: locate(&applied, &spans, &sm, &path, false),
            key: Some(dotted(&path)),
            message,
            hint: Some(hint),
        }
    }
}

/// All `` `quoted` `` words in a serde message after `from`.
fn backticked(s: &str) -> Vec<&str> {
    s.split('`').skip(1).step_by(2).collect()
}

impl Loader<'_> {
    /// Where `path` is: the override that set it, its value (or key) span, or its nearest ancestor.
    fn locate(&self, path: &[String], prefer_key: bool) -> Location {
        locate(&self.applied, &self.spans, &self.sm, path, prefer_key)
    }

    fn error(&mut self, path: &[String], prefer_key: bool, message: String, hint: Option<String>) {
        let location = self.locate(path, prefer_key);
        let key = (!path.is_empty()).then(|| dotted(path));
        self.diags.push(Diagnostic { file: self.file.to_path_buf(), location, key, message, hint });
    }

    /// Map a serde message about table `at` (whose content is `table`) to the key it is about.
    fn serde_error(&mut self, at: &[String], table: &toml::Table, msg: &str) {
        let sec = section(at);
        if let Some(rest) = msg.strip_prefix("unknown field `") {
            let (name, rest) = rest.split_once('`').unwrap_or((rest, ""));
            let known = backticked(rest);
            // The key may sit in a nested table (`generation = { temprature = 1 }`): find it.
            let mut path = at.to_vec();
            path.extend(find_key(table, name).unwrap_or_else(|| vec![name.to_string()]));
            let sec = section(&path[..path.len() - 1]);
            let hint = if known.is_empty() {
                format!("{sec} takes no other keys")
            } else {
                format!("known keys in {sec}: {}", known.join(", "))
            };
            self.error(
                &path,
                true,
                format!("unknown key '{name}' in {sec}{}", suggestion(name, known.iter().copied())),
                Some(hint),
            );
        } else if let Some(rest) = msg.strip_prefix("missing field `") {
            let name = rest.split('`').next().unwrap_or(rest);
            self.error(
                at,
                true,
                format!("missing required key '{name}' in {sec}"),
                Some(format!("add `{name} = …` to {sec}")),
            );
        } else if let Some(rest) = msg.strip_prefix("unknown variant `") {
            let (v, rest) = rest.split_once('`').unwrap_or((rest, ""));
            let known = backticked(rest);
            let found = find_leaf(table, &|x| matches!(x, toml::Value::String(s) if s == v));
            let mut path = at.to_vec();
            path.extend(found.clone().unwrap_or_default());
            let keyname = found.map(|f| dotted(&f)).unwrap_or_else(|| "a key".into());
            self.error(
                &path,
                false,
                format!("unknown value '{v}' for {keyname} in {sec}{}", suggestion(v, known.iter().copied())),
                Some(format!("expected one of: {}", known.join(", "))),
            );
        } else if let Some((unexpected, expected)) = msg
            .strip_prefix("invalid type: ")
            .or_else(|| msg.strip_prefix("invalid value: "))
            .and_then(|r| r.split_once(", expected "))
        {
            let found = find_leaf(table, &|x| matches_unexpected(x, unexpected));
            match found {
                Some(rel) => {
                    let mut path = at.to_vec();
                    path.extend(rel.iter().cloned());
                    self.error(
                        &path,
                        false,
                        format!("wrong type for '{}' in {sec}: expected {expected}, found {unexpected}", dotted(&rel)),
                        Some(format!("{} takes {}", dotted(&rel), human_type(expected))),
                    );
                }
                None => self.error(at, true, format!("invalid {sec}: {msg}"), None),
            }
        } else {
            self.error(at, true, format!("invalid {sec}: {msg}"), None);
        }
    }

    /// Deserialize `value` (the table at `at`) into `T`, reporting failures.
    fn typed_section<T: serde::de::DeserializeOwned>(&mut self, at: &[String], value: &toml::Value) -> Option<T> {
        let toml::Value::Table(t) = value else {
            self.error(
                at,
                false,
                format!("'{}' must be a table, found {}", dotted(at), overrides::type_name(value)),
                Some(format!("write it as {}", section(at))),
            );
            return None;
        };
        match value.clone().try_into::<T>() {
            Ok(v) => Some(v),
            Err(e) => {
                self.serde_error(at, t, e.message());
                None
            }
        }
    }

    /// `[recipe]` with `device` parsed here rather than by serde, so a bad one is reported at its
    /// value with the known spellings (and the rest of the table still loads).
    fn device_checked(&mut self, recipe: &toml::Value) -> toml::Value {
        let mut recipe = recipe.clone();
        if let Some(t) = recipe.as_table_mut() {
            if let Some(toml::Value::String(d)) = t.get("device") {
                if let Err(e) = d.parse::<DeviceSpec>() {
                    self.error(
                        &p(&["recipe", "device"]),
                        false,
                        format!("{e}{}", suggestion(d, ["auto", "cpu", "cuda"])),
                        Some(UnknownDevice::HINT.into()),
                    );
                    t.remove("device");
                }
            }
        }
        recipe
    }

    fn typed(&mut self, doc: &toml::Table, text: &str, overrides: &[String]) -> Option<Recipe> {
        for k in doc.keys() {
            if !TOP_LEVEL.contains(&k.as_str()) {
                self.error(
                    &p(&[k]),
                    true,
                    format!("unknown top-level key '{k}'{}", suggestion(k, TOP_LEVEL.iter().copied())),
                    Some(
                        "a recipe has the tables [recipe], [model], [models.<name>], [datasets.<name>], [stages.<name>] and [cache]"
                            .into(),
                    ),
                );
            }
        }

        let meta = match doc.get("recipe") {
            Some(v) => {
                let v = self.device_checked(v);
                self.typed_section::<RecipeMeta>(&p(&["recipe"]), &v)
            }
            None => {
                self.error(
                    &[],
                    true,
                    "the recipe has no [recipe] table".into(),
                    Some("start the file with [recipe] and name = \"my-recipe\"".into()),
                );
                None
            }
        };
        if let Some(m) = &meta {
            for e in m.resources.validate() {
                self.error(
                    &p(&["recipe", "resources", e.key]),
                    false,
                    format!("{} in [recipe.resources]", e.message),
                    Some(e.hint),
                );
            }
            if !valid_name(&m.name) {
                self.error(
                    &p(&["recipe", "name"]),
                    false,
                    format!("recipe name '{}' is not usable as a directory name", m.name),
                    Some("use letters, digits, '_' and '-'".into()),
                );
            }
            if m.device.explicit_class() == Some(DeviceClass::Cuda) && !cfg!(feature = "cuda") {
                self.error(
                    &p(&["recipe", "device"]),
                    false,
                    format!("device '{}' needs CUDA, but this mmrun was built without it", m.device),
                    Some("use device = \"auto\" or \"cpu\", or build mmrun with `--features cuda`".into()),
                );
            }
        }

        let model = match doc.get("model") {
            Some(v) => {
                let spec = self.typed_section::<ModelSpec>(&p(&["model"]), v);
                if let Some(s) = &spec {
                    // A recipe may train no model at all (tokenizer only), so an absent [model]
                    // is fine; a present one must be buildable.
                    if let Err(e) = resolve_model(s, None) {
                        let path = match e.key {
                            Some(k) if s.preset.is_some() || k != "hidden_size" => p(&["model", k]),
                            _ => p(&["model"]),
                        };
                        self.error(&path, false, e.message, e.hint);
                    }
                }
                spec
            }
            None => Some(ModelSpec::default()),
        };

        let mut datasets = BTreeMap::new();
        match doc.get("datasets") {
            None => {}
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    let at = p(&["datasets", name]);
                    if !valid_name(name) {
                        self.error(
                            &at,
                            true,
                            format!("dataset name '{name}' has characters other than letters, digits, '_' and '-'"),
                            None,
                        );
                    }
                    if let Some(spec) = self.typed_section::<DatasetSpec>(&at, v) {
                        self.check_source(&at, &spec.source);
                        self.check_builtin(&at, &spec);
                        datasets.insert(name.clone(), spec);
                    }
                }
            }
            Some(other) => self.error(
                &p(&["datasets"]),
                false,
                format!("'datasets' must be a table of tables, found {}", overrides::type_name(other)),
                Some("declare each dataset as [datasets.<name>]".into()),
            ),
        }

        // `[models.<name>]` are stages of kind `model` that come first, so `from = "<name>"` and
        // eval's `models` name them like any model stage.
        let mut stages = Vec::new();
        let model_names: Vec<String> = match doc.get("models") {
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    if doc.get("stages").and_then(|s| s.get(name)).is_some() {
                        self.error(
                            &p(&["models", name]),
                            true,
                            format!("'{name}' is both a model and a stage"),
                            Some("rename one of them: stages and models share one namespace".into()),
                        );
                    } else if let Some(s) = self.stage("models", name, v) {
                        stages.push(s);
                    }
                }
                t.keys().cloned().collect()
            }
            None => Vec::new(),
            Some(other) => {
                self.error(
                    &p(&["models"]),
                    false,
                    format!("'models' must be a table of tables, found {}", overrides::type_name(other)),
                    Some("declare each model as [models.<name>] with source = \"hf://<owner>/<name>\"".into()),
                );
                Vec::new()
            }
        };
        match doc.get("stages") {
            None => self.error(
                &[],
                true,
                "the recipe has no stages".into(),
                Some("add at least one [stages.<name>] table with kind = \"…\"".into()),
            ),
            Some(toml::Value::Table(t)) => {
                for (name, v) in t {
                    if let Some(s) = self.stage("stages", name, v) {
                        stages.push(s);
                    }
                }
            }
            Some(other) => self.error(
                &p(&["stages"]),
                false,
                format!("'stages' must be a table of tables, found {}", overrides::type_name(other)),
                Some("declare each stage as [stages.<name>]".into()),
            ),
        }
        let mut all_stage_names: Vec<String> = match doc.get("stages") {
            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        };
        all_stage_names.extend(model_names);
        let dataset_names: Vec<String> = match doc.get("datasets") {
            Some(toml::Value::Table(t)) => t.keys().cloned().collect(),
            _ => Vec::new(),
        };
        self.check_references(&stages, &all_stage_names, &dataset_names, &datasets);
        if self.diags.is_empty() {
            self.check_cycles(&stages);
        }

        let cache = match doc.get("cache") {
            Some(v) => self.cache_section(v)?,
            None => super::CacheSpec::default(),
        };
        let meta = meta?;
        for s in &mut stages {
            s.resources = s.resources.over(&meta.resources);
        }
        Some(Recipe {
            path: self.file.to_path_buf(),
            source_text: text.to_string(),
            overrides: overrides.to_vec(),
            meta,
            model: model?,
            datasets,
            stages,
            cache,
        })
    }

    /// A `builtin:` generator that exists, asked for a number of records it can make.
    fn check_builtin(&mut self, at: &[String], spec: &DatasetSpec) {
        use crate::data::spec::{builtin_formats, BUILTIN_GENERATORS, MAX_BUILTIN_COUNT};
        let Some(gen) = spec.source.strip_prefix("builtin:") else { return };
        if !BUILTIN_GENERATORS.contains(&gen) {
            let mut path = at.to_vec();
            path.push("source".into());
            self.error(
                &path,
                false,
                format!(
                    "unknown builtin dataset 'builtin:{gen}' in {}{}",
                    section(at),
                    suggestion(gen, BUILTIN_GENERATORS.iter().copied())
                ),
                Some(format!(
                    "available: {}",
                    BUILTIN_GENERATORS.iter().map(|g| format!("builtin:{g}")).collect::<Vec<_>>().join(", ")
                )),
            );
        }
        if let Some(formats) = builtin_formats(gen).filter(|f| !f.contains(&spec.format)) {
            let mut path = at.to_vec();
            path.push("format".into());
            let names: Vec<&str> = formats.iter().map(|f| f.as_str()).collect();
            self.error(
                &path,
                false,
                format!("builtin:{gen} in {} cannot write format '{}'", section(at), spec.format.as_str()),
                Some(format!("use one of: {}", names.join(", "))),
            );
        }
        if let Some(tools) = spec.builtin.get("tools") {
            let known = crate::tools::names();
            let bad: Vec<String> = tools
                .as_array()
                .into_iter()
                .flatten()
                .filter(|t| !t.as_str().is_some_and(|n| known.contains(&n)))
                .map(|t| t.to_string())
                .collect();
            if gen != "tool_use" || tools.as_array().is_none_or(|a| a.is_empty()) || !bad.is_empty() {
                let mut path = at.to_vec();
                path.extend(["builtin".to_string(), "tools".to_string()]);
                let what = if gen != "tool_use" {
                    format!("builtin:{gen} in {} takes no tools", section(at))
                } else if bad.is_empty() {
                    format!("builtin tools in {} must be a non-empty list of tool names", section(at))
                } else {
                    format!("unknown tool {} in {}", bad.join(", "), section(at))
                };
                self.error(&path, false, what, Some(format!("known tools: {}", known.join(", "))));
            }
        }
        if let Some(count) = spec.builtin.get("count") {
            if count.as_u64().is_none_or(|n| n == 0 || n > MAX_BUILTIN_COUNT) {
                let mut path = at.to_vec();
                path.extend(["builtin".to_string(), "count".to_string()]);
                self.error(
                    &path,
                    false,
                    format!("builtin count {count} in {} is not a number of records mmrun can generate", section(at)),
                    Some(format!("use a whole number from 1 to {MAX_BUILTIN_COUNT}")),
                );
            }
        }
    }

    fn check_source(&mut self, at: &[String], source: &str) {
        let mut path = at.to_vec();
        path.push("source".into());
        if source.trim().is_empty() {
            self.error(
                &path,
                false,
                format!("{} has an empty source", section(at)),
                Some("give a local path, glob or directory, an hf:// URI, or builtin:<name>".into()),
            );
        } else if source.starts_with("hf://") {
            if let Err(e) = HubUri::parse(source) {
                self.error(
                    &path,
                    false,
                    format!("invalid hf:// URI in {}: {}", section(at), e.problem),
                    Some(
                        "expected hf://datasets/<owner>/<name>[@<revision>]/<path-or-glob> or hf://<owner>/<name>[@<revision>]/<path>"
                            .into(),
                    ),
                );
            }
        } else if let Some(scheme) = source.split_once("://").map(|(s, _)| s) {
            self.error(
                &path,
                false,
                format!("unsupported source scheme '{scheme}://' in {}", section(at)),
                Some("use a local path, an hf:// URI or builtin:<name>".into()),
            );
        }
    }

    /// A stage from `[<table>.<name>]`: `table` is `stages`, or `models` for a released model
    /// (a stage of kind [`MODEL_INPUT_KIND`] that takes its kind from the table).
    fn stage(&mut self, table: &str, name: &str, v: &toml::Value) -> Option<StageSpec> {
        let at = p(&[table, name]);
        let toml::Value::Table(t) = v else {
            self.error(
                &at,
                false,
                format!("stage '{name}' must be a table, found {}", overrides::type_name(v)),
                Some(match table {
                    "models" => format!("write it as [models.{name}] with source = \"hf://<owner>/<name>\""),
                    _ => format!("write it as [stages.{name}] with kind = \"…\""),
                }),
            );
            return None;
        };
        if !valid_name(name) {
            self.error(
                &at,
                true,
                format!("stage name '{name}' has characters other than letters, digits, '_' and '-'"),
                None,
            );
        }
        let known: Vec<&str> = self.registry.iter().map(|s| s.kind()).collect();
        let known_list = if known.is_empty() { "(none registered)".to_string() } else { known.join(", ") };
        let kind = match t.get("kind") {
            _ if table == "models" && t.contains_key("kind") => {
                self.error(
                    &p(&[table, name, "kind"]),
                    true,
                    format!("[models.{name}] takes no 'kind': it is a released model"),
                    Some("remove `kind`; write only source = \"hf://<owner>/<name>\" or a local folder".into()),
                );
                return None;
            }
            _ if table == "models" => MODEL_INPUT_KIND.to_string(),
            Some(toml::Value::String(k)) => k.clone(),
            Some(other) => {
                self.error(
                    &p(&[table, name, "kind"]),
                    false,
                    format!("'kind' of stage '{name}' must be a string, found {}", overrides::type_name(other)),
                    Some(format!("known kinds: {known_list}")),
                );
                return None;
            }
            None => {
                self.error(
                    &at,
                    true,
                    format!("stage '{name}' has no 'kind'"),
                    Some(format!("add kind = \"…\" (known kinds: {known_list})")),
                );
                return None;
            }
        };
        let Some(stage) = self.registry.iter().find(|s| s.kind() == kind) else {
            self.error(
                &p(&[table, name, "kind"]),
                false,
                format!("unknown stage kind '{kind}'{} known kinds: {known_list}", {
                    let s = suggestion(&kind, known.iter().copied());
                    if s.is_empty() {
                        " —".to_string()
                    } else {
                        s
                    }
                }),
                None,
            );
            return None;
        };
        let mut params = t.clone();
        params.remove("kind");
        // Where the stage runs is the executor's business, not the stage kind's (and not its key).
        let resources = match params.remove("resources") {
            Some(v) => self.resources(&p(&["stages", name, "resources"]), &v).unwrap_or_default(),
            None => Resources::default(),
        };
        match stage.parse_params(&params) {
            Ok(parsed) => Some(StageSpec {
                name: name.to_string(),
                kind,
                params: parsed.canonical,
                inputs: parsed.inputs,
                resources,
            }),
            Err(ParamsError::Serde(msg)) => {
                self.serde_error(&at, &params, &msg);
                None
            }
            Err(ParamsError::Invalid(e)) => {
                let mut path = at.clone();
                path.push(e.key.to_string());
                self.error(&path, false, format!("{} in {}", e.message, section(&at)), Some(e.hint));
                None
            }
        }
    }

    /// `[cache]`, with its `remote` URL checked at its value.
    fn cache_section(&mut self, v: &toml::Value) -> Option<super::CacheSpec> {
        let spec = self.typed_section::<super::CacheSpec>(&p(&["cache"]), v)?;
        if let Some(url) = &spec.remote {
            if let Err(why) = super::check_remote_url(url) {
                self.error(&p(&["cache", "remote"]), false, format!("bad remote cache {url:?}"), Some(why));
                return None;
            }
        }
        Some(spec)
    }

    /// Type and check a `resources` table at `at`.
    fn resources(&mut self, at: &[String], v: &toml::Value) -> Option<Resources> {
        let r = self.typed_section::<Resources>(at, v)?;
        for e in r.validate() {
            let mut path = at.to_vec();
            path.push(e.key.to_string());
            self.error(&path, false, format!("{} in {}", e.message, section(at)), Some(e.hint));
        }
        Some(r)
    }

    /// Path of the value that names `target` in `stages.<stage>.<param>` (a string or an array).
    fn ref_path(&self, stage: &str, param: &str, target: &str, value: Option<&serde_json::Value>) -> Vec<String> {
        let mut path = p(&["stages", stage, param]);
        if let Some(serde_json::Value::Array(a)) = value {
            if let Some(i) = a.iter().position(|v| v.as_str() == Some(target)) {
                path.push(i.to_string());
            }
        }
        path
    }

    fn check_references(
        &mut self,
        stages: &[StageSpec],
        all_stages: &[String],
        datasets: &[String],
        specs: &BTreeMap<String, DatasetSpec>,
    ) {
        let kinds: BTreeMap<&str, &str> = stages.iter().map(|s| (s.name.as_str(), s.kind.as_str())).collect();
        for s in stages {
            for input in &s.inputs {
                match input {
                    InputRef::Stage { param, stage, accepts } => {
                        let path = self.ref_path(&s.name, param, stage, s.params.get(*param));
                        if stage == &s.name {
                            self.error(
                                &path,
                                false,
                                format!("stage '{}' takes {param} = '{stage}', which is itself", s.name),
                                Some("a stage reads the output of another, earlier stage".into()),
                            );
                        } else if !all_stages.contains(stage) {
                            let others = all_stages.iter().filter(|n| *n != &s.name).map(String::as_str);
                            self.error(
                                &path,
                                false,
                                format!(
                                    "stage '{}' takes {param} = '{stage}', but there is no stage '{stage}'{}",
                                    s.name,
                                    suggestion(stage, others.clone())
                                ),
                                Some(format!("stages in this recipe: {}", others.collect::<Vec<_>>().join(", "))),
                            );
                        } else if let Some(up_kind) = kinds.get(stage.as_str()) {
                            let Some(up) = self.registry.iter().find(|r| r.kind() == *up_kind) else { continue };
                            if !accepts.contains(&up.output()) {
                                let wanted: Vec<&str> = accepts.iter().map(|k| k.describe()).collect();
                                let producers: Vec<&str> = self
                                    .registry
                                    .iter()
                                    .filter(|r| accepts.contains(&r.output()))
                                    .map(|r| r.kind())
                                    .collect();
                                self.error(
                                    &path,
                                    false,
                                    format!(
                                        "stage '{}' takes {param} = '{stage}', but '{stage}' (kind {up_kind}) produces {}, not {}",
                                        s.name,
                                        up.output().describe(),
                                        wanted.join(" or ")
                                    ),
                                    Some(format!(
                                        "point {param} at a stage of kind {}",
                                        if producers.is_empty() { "(none known)".into() } else { producers.join(" or ") }
                                    )),
                                );
                            }
                        }
                    }
                    InputRef::Dataset { param, dataset, accepts } => {
                        if let Some(spec) = specs.get(dataset).filter(|d| !accepts.contains(&d.format)) {
                            let path = self.ref_path(&s.name, param, dataset, s.params.get(*param));
                            let wanted: Vec<&str> = accepts.iter().map(|f| f.as_str()).collect();
                            self.error(
                                &path,
                                false,
                                format!(
                                    "stage '{}' (kind {}) takes {param} = '{dataset}', but dataset '{dataset}' has format \
                                     {}; a {} stage reads {}",
                                    s.name,
                                    s.kind,
                                    spec.format.as_str(),
                                    s.kind,
                                    wanted.join(" or ")
                                ),
                                Some(format!(
                                    "point {param} at a dataset of format {}, or set [datasets.{dataset}] format",
                                    wanted.join(" or ")
                                )),
                            );
                        } else if !datasets.contains(dataset) {
                            let path = self.ref_path(&s.name, param, dataset, s.params.get(*param));
                            self.error(
                                &path,
                                false,
                                format!(
                                    "stage '{}' takes {param} = '{dataset}', but there is no dataset '{dataset}'{}",
                                    s.name,
                                    suggestion(dataset, datasets.iter().map(String::as_str))
                                ),
                                Some(if datasets.is_empty() {
                                    format!("declare it as [datasets.{dataset}] with source and format")
                                } else {
                                    format!(
                                        "datasets in this recipe: {} (or declare [datasets.{dataset}])",
                                        datasets.join(", ")
                                    )
                                }),
                            );
                        }
                    }
                }
            }
        }
    }

    fn check_cycles(&mut self, stages: &[StageSpec]) {
        if let Err(cycle) = super::dag::topo_order(stages) {
            // Point at the reference that closes the cycle: the first stage's input from the last.
            let first = &cycle[0];
            let last = cycle.last().expect("a cycle has stages");
            let spec = stages.iter().find(|s| &s.name == first).expect("cycle names recipe stages");
            let param = spec
                .inputs
                .iter()
                .find_map(|i| match i {
                    InputRef::Stage { param, stage, .. } if stage == last => Some(*param),
                    _ => None,
                })
                .unwrap_or("from");
            let path = self.ref_path(first, param, last, spec.params.get(param));
            let mut ring = cycle.clone();
            ring.push(cycle[0].clone());
            self.error(
                &path,
                false,
                format!("stages depend on each other in a cycle: {}", ring.join(" → ")),
                Some(
                    "each arrow reads \"feeds\"; break the cycle by pointing one of these inputs at an earlier stage"
                        .into(),
                ),
            );
        }
    }
}

/// Path (relative to `t`) of the first key called `name`, searching nested tables in file order.
fn find_key(t: &toml::Table, name: &str) -> Option<Vec<String>> {
    if t.contains_key(name) {
        return Some(vec![name.to_string()]);
    }
    t.iter().find_map(|(k, v)| match v {
        toml::Value::Table(inner) => find_key(inner, name).map(|mut p| {
            p.insert(0, k.clone());
            p
        }),
        _ => None,
    })
}

/// serde's name for an expected type, in recipe terms.
fn human_type(expected: &str) -> String {
    let e = expected.trim();
    match e {
        "f32" | "f64" => "a number, e.g. 3e-4 or 0.5".into(),
        "u8" | "u16" | "u32" | "u64" | "usize" => "a non-negative whole number, e.g. 32".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number, e.g. 32".into(),
        "a boolean" => "true or false".into(),
        "a string" => "a quoted string, e.g. \"text\"".into(),
        "a sequence" => "an array, e.g. [\"a\", \"b\"]".into(),
        "a map" => "a table, e.g. { key = \"value\" }".into(),
        other => other.to_string(),
    }
}

/// The first leaf (in file order) of `t` for which `pred` holds, as a path relative to `t`.
fn find_leaf(t: &toml::Table, pred: &dyn Fn(&toml::Value) -> bool) -> Option<Vec<String>> {
    fn walk(v: &toml::Value, pred: &dyn Fn(&toml::Value) -> bool, path: &mut Vec<String>) -> bool {
        if pred(v) {
            return true;
        }
        match v {
            toml::Value::Table(t) => {
                for (k, x) in t {
                    path.push(k.clone());
                    if walk(x, pred, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            toml::Value::Array(a) => {
                for (i, x) in a.iter().enumerate() {
                    path.push(i.to_string());
                    if walk(x, pred, path) {
                        return true;
                    }
                    path.pop();
                }
                false
            }
            _ => false,
        }
    }
    for (k, v) in t {
        let mut path = vec![k.clone()];
        if walk(v, pred, &mut path) {
            return Some(path);
        }
    }
    None
}

/// Whether `v` is what serde's `Unexpected` description (`string "x"`, ``integer `5` ``, `map`, …)
/// describes.
fn matches_unexpected(v: &toml::Value, unexpected: &str) -> bool {
    let tick = || backticked(unexpected).first().copied();
    match v {
        toml::Value::String(s) => unexpected.starts_with("string ") && unexpected == format!("string {s:?}"),
        toml::Value::Integer(i) => unexpected.starts_with("integer") && tick() == Some(&i.to_string()),
        toml::Value::Float(f) => {
            unexpected.starts_with("floating point") && tick().and_then(|t| t.parse::<f64>().ok()) == Some(*f)
        }
        toml::Value::Boolean(b) => unexpected.starts_with("boolean") && tick() == Some(&b.to_string()),
        toml::Value::Table(_) => unexpected == "map",
        toml::Value::Array(_) => unexpected == "sequence",
        toml::Value::Datetime(_) => false,
    }
}
