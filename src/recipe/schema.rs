//! JSON Schema of recipes, generated from the Rust types (schemars), so editors can validate and
//! complete recipes (e.g. Taplo / Even Better TOML: `#:schema ./schemas/recipe.schema.json`).
//!
//! Stage tables are a `oneOf` keyed by `kind`: each branch is the kind's params struct plus
//! `kind = "<const>"`. The committed copy lives in `schemas/recipe.schema.json`; a test fails when it
//! is stale. Regenerate with `MMRUN_BLESS=1 cargo test --lib schema`.

use super::DynStageKind;
use super::{CacheSpec, ModelSpec, RecipeMeta, Resources};
use crate::data::spec::DatasetSpec;
use schemars::generate::SchemaSettings;
use serde_json::{json, Value};

/// The repository-relative path of the committed schema.
pub const SCHEMA_PATH: &str = "schemas/recipe.schema.json";

/// The recipe schema for a set of stage kinds (mmrun's are `crate::stages::kinds()`).
pub fn recipe_schema(registry: &[&dyn DynStageKind]) -> Value {
    let mut gen = SchemaSettings::draft2020_12().for_deserialize().into_generator();
    let meta = gen.subschema_for::<RecipeMeta>().to_value();
    let model = gen.subschema_for::<ModelSpec>().to_value();
    let dataset = gen.subschema_for::<DatasetSpec>().to_value();
    let resources = gen.subschema_for::<Resources>().to_value();
    let cache = gen.subschema_for::<CacheSpec>().to_value();

    let mut branches = Vec::new();
    for stage in registry {
        let mut s = stage.params_schema(&mut gen).to_value();
        let obj = s.as_object_mut().expect("a params struct's schema is an object");
        obj.insert("title".into(), json!(stage.kind()));
        obj.insert(
            "description".into(),
            json!(format!(
                "{} Produces {}. Cosmetic (not part of the stage key): {}.",
                stage.doc(),
                stage.output().describe(),
                if stage.cosmetic().is_empty() { "none".to_string() } else { stage.cosmetic().join(", ") }
            )),
        );
        let props = obj.entry("properties").or_insert_with(|| json!({}));
        if let Some(p) = props.as_object_mut() {
            // Editors can show which params never invalidate the cache.
            for name in stage.cosmetic() {
                if let Some(Value::Object(prop)) = p.get_mut(*name) {
                    prop.insert("x-mmrun-cosmetic".into(), json!(true));
                }
            }
            // `kind` first, for readability of the generated file.
            let mut with_kind = serde_json::Map::new();
            with_kind.insert("kind".into(), json!({ "const": stage.kind(), "description": "Stage kind." }));
            with_kind.extend(std::mem::take(p));
            // Every kind takes `resources` (read by the executor, not by the stage).
            with_kind.insert(
                "resources".into(),
                json!({ "$ref": resources["$ref"], "description": "What a cluster job for this stage asks for; unset fields take [recipe.resources]. Not part of the stage key." }),
            );
            *p = with_kind;
        }
        let req = obj.entry("required").or_insert_with(|| json!([]));
        if let Some(r) = req.as_array_mut() {
            r.insert(0, json!("kind"));
        }
        branches.push(s);
    }
    // `[models.<name>]` holds a `model` stage's params (its kind is implied).
    let model_input = registry.iter().find(|s| s.kind() == "model").map(|s| s.params_schema(&mut gen).to_value());
    let stage_schema = if branches.is_empty() {
        json!({ "type": "object", "required": ["kind"], "properties": { "kind": { "type": "string" } } })
    } else {
        json!({ "oneOf": branches })
    };
    let defs: serde_json::Map<String, Value> = gen.take_definitions(true).into_iter().collect();

    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/mmrun/mmrun/schemas/recipe.schema.json",
        "title": "mmrun recipe",
        "description": "A declarative mmrun training recipe: [recipe], [model], [models.<name>], [datasets.<name>], [stages.<name>], [cache].",
        "type": "object",
        "additionalProperties": false,
        "required": ["recipe", "stages"],
        "properties": {
            "recipe": meta,
            "model": model,
            "datasets": {
                "description": "Named datasets that stages read (`data = \"<name>\"`).",
                "type": "object",
                "additionalProperties": dataset,
            },
            "models": {
                "description": "Released models as pipeline inputs (`from = \"<name>\"`): `source = \"hf://<owner>/<name>[@<rev>]\"` or a local transformers folder.",
                "type": "object",
                "additionalProperties": model_input.unwrap_or_else(|| json!({ "type": "object" })),
            },
            "stages": {
                "description": "Named stages; each is dispatched on `kind` to that kind's parameters.",
                "type": "object",
                "additionalProperties": stage_schema,
            },
            "cache": cache,
        },
        "$defs": defs,
    })
}

/// The schema as committed: pretty JSON with a trailing newline.
pub fn render(schema: &Value) -> String {
    let mut s = serde_json::to_string_pretty(schema).expect("schema serialises");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schema_has_a_branch_per_kind_keyed_by_kind() {
        let s = recipe_schema(&crate::recipe::testing::registry());
        let branches = s["properties"]["stages"]["additionalProperties"]["oneOf"].as_array().unwrap();
        let kinds: Vec<&str> = branches.iter().map(|b| b["properties"]["kind"]["const"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["tokenizer", "pretrain", "sft", "eval"]);
        let pre = &branches[1];
        assert_eq!(pre["additionalProperties"], json!(false));
        assert!(pre["required"].as_array().unwrap().contains(&json!("tokenizer")));
        assert!(pre["properties"]["lr"].is_object());
        assert_eq!(pre["properties"]["log_every"]["x-mmrun-cosmetic"], json!(true));
        assert!(pre["properties"]["lr"].get("x-mmrun-cosmetic").is_none());
        assert!(s["$defs"]["RecipeMeta"]["properties"]["seed"].is_object());
        assert_eq!(s["properties"]["recipe"]["$ref"], json!("#/$defs/RecipeMeta"));
    }

    /// Keeps `schemas/recipe.schema.json` in sync with the Rust types.
    #[test]
    fn committed_schema_is_up_to_date() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(SCHEMA_PATH);
        let fresh = render(&recipe_schema(&crate::stages::kinds()));
        if std::env::var("MMRUN_BLESS").as_deref() == Ok("1") {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &fresh).unwrap();
            return;
        }
        let committed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            committed == fresh,
            "{SCHEMA_PATH} is stale (the recipe or stage param types changed).\n\
             Regenerate it with:  MMRUN_BLESS=1 cargo test --lib schema\n\
             and commit the result."
        );
    }
}
