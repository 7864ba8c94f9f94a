//! The model a run starts from when it starts from random weights: a `config.json` or a named
//! preset shape, with the vocabulary size and the special ids taken from the run's tokenizer
//! (nobody should copy `mask_token_id` by hand).

use std::path::Path;

use serde_json::{Map, Value};

use crate::config::RawConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Named model shapes (`--model-config NAME`): LLaDA's architecture, the vocabulary and special
/// ids from the tokenizer.
pub const PRESETS: &[(&str, &str, &str)] = &[
    (
        "tiny",
        "the shipped model's shape: d_model 384, 6 layers, 6 heads, MLP 1024, context 512 (15M parameters with a 6k vocabulary)",
        include_str!("presets/tiny.json"),
    ),
    (
        "small",
        "d_model 512, 8 layers, 8 heads, MLP 1408, context 1024 (32M parameters with a 6k vocabulary)",
        include_str!("presets/small.json"),
    ),
    (
        "bench-135m",
        "the benchmark model's shape: d_model 768, 12 layers, 12 heads, MLP 2048, context 4096 (135M parameters with a 32k vocabulary)",
        include_str!("presets/bench-135m.json"),
    ),
];

/// The preset names, for messages.
pub fn preset_names() -> String {
    PRESETS.iter().map(|p| p.0).collect::<Vec<_>>().join(", ")
}

/// The raw `config.json` of `spec`: an existing file, else a preset name.
pub fn read_model_config(spec: &Path) -> Result<Value> {
    if spec.is_file() {
        let text = crate::error::read_to_string(spec)?;
        return serde_json::from_str(&text).map_err(|e| Error::Json {
            path: spec.to_path_buf(),
            source: e,
        });
    }
    let name = spec.to_string_lossy();
    match PRESETS.iter().find(|p| p.0 == name) {
        Some(p) => serde_json::from_str(p.2).map_err(|e| Error::Json {
            path: spec.to_path_buf(),
            source: e,
        }),
        None => Err(Error::setting(
            "model_config",
            spec.display(),
            format!(
                "no such file, and not a preset ({}; see `llada train --help`)",
                preset_names()
            ),
        )),
    }
}

/// Whether a raw config is of LLaDA's own schema (`LLaDAModelLM`, the keys `vocab_size`,
/// `embedding_size`, `mask_token_id`, `eos_token_id`, `pad_token_id`).
fn is_llada_schema(v: &Map<String, Value>) -> bool {
    match v.get("architectures").and_then(Value::as_array) {
        None => true,
        Some(a) => a.iter().any(|x| x.as_str() == Some("LLaDAModelLM")),
    }
}

/// Fills the keys a model config must share with its tokenizer: absent ones are taken from it
/// (the vocabulary size; the mask, EOS and padding ids), given ones must agree with it (an error
/// names the key, both values and the tokenizer). Other architectures than LLaDA's get only
/// `mask_token_id` (the one llada key they add).
pub fn fill_from_tokenizer(cfg: &mut Value, tok: &Tokenizer, tok_dir: &Path) -> Result<()> {
    let Some(map) = cfg.as_object_mut() else {
        return Err(Error::setting(
            "model_config",
            "not an object",
            "a config.json is one JSON object",
        ));
    };
    let sp = tok.special();
    let vocab = tok.vocab_size();
    let llada = is_llada_schema(map);
    let mut ids: Vec<(&str, u32)> = vec![("mask_token_id", sp.mask)];
    if llada {
        ids.push(("eos_token_id", sp.eos));
        ids.push(("pad_token_id", sp.pad));
    }
    for (key, id) in ids {
        match map.get(key) {
            None | Some(Value::Null) => {
                map.insert(key.into(), Value::from(id));
            }
            Some(v) if v.as_u64() == Some(id as u64) => {}
            Some(v) => {
                return Err(Error::config(
                    key,
                    v,
                    format!(
                        "the tokenizer {} says {id}: leave the key out to take it from the tokenizer, or give the tokenizer the model was made for",
                        tok_dir.display()
                    ),
                ))
            }
        }
    }
    if llada {
        for key in ["vocab_size", "embedding_size"] {
            // an absent embedding_size is the vocabulary's size: a given vocab_size's if larger
            let fill = match (key, map.get("vocab_size").and_then(Value::as_u64)) {
                ("embedding_size", Some(v)) => v.max(vocab as u64),
                _ => vocab as u64,
            };
            match map.get(key) {
                None | Some(Value::Null) => {
                    map.insert(key.into(), Value::from(fill));
                }
                Some(v) if v.as_u64().is_some_and(|n| n >= vocab as u64) => {}
                Some(v) => {
                    return Err(Error::config(
                        key,
                        v,
                        format!(
                            "is smaller than the tokenizer {}'s {vocab} tokens: leave the key out to take it from the tokenizer",
                            tok_dir.display()
                        ),
                    ))
                }
            }
        }
    }
    Ok(())
}

/// The model config a run from random weights starts with: `spec` (a file or a preset name)
/// completed from the tokenizer in `tokenizer` when there is one.
pub fn model_config_for_run(spec: &Path, tokenizer: Option<&Path>) -> Result<RawConfig> {
    let mut v = read_model_config(spec)?;
    if let Some(dir) = tokenizer {
        let tok = Tokenizer::open(dir)?;
        fill_from_tokenizer(&mut v, &tok, dir)?;
    }
    RawConfig::from_value(v, spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> std::path::PathBuf {
        crate::hub::shipped_model()
    }

    #[test]
    fn a_preset_takes_its_vocabulary_and_ids_from_the_tokenizer() {
        let raw = model_config_for_run(Path::new("tiny"), Some(&shipped())).unwrap();
        let mc = raw.resolve().unwrap();
        let (_, shipped_cfg) = crate::checkpoint::read_config(&shipped()).unwrap();
        assert_eq!(mc.mask_token_id, shipped_cfg.mask_token_id);
        assert_eq!(mc.eos_token_id, shipped_cfg.eos_token_id);
        assert_eq!(mc.embedding_size, shipped_cfg.embedding_size);
        assert_eq!(mc.d_model, shipped_cfg.d_model);
        assert_eq!(mc.n_layers, shipped_cfg.n_layers);
        for (name, _, _) in PRESETS {
            model_config_for_run(Path::new(name), Some(&shipped()))
                .unwrap()
                .resolve()
                .unwrap();
        }
    }

    #[test]
    fn ids_that_disagree_with_the_tokenizer_are_errors_naming_the_key() {
        let tok = Tokenizer::open(&shipped()).unwrap();
        let mut v = read_model_config(Path::new("tiny")).unwrap();
        v["mask_token_id"] = Value::from(5);
        let e = fill_from_tokenizer(&mut v, &tok, &shipped())
            .unwrap_err()
            .to_string();
        assert!(e.contains("mask_token_id") && e.contains('5'), "{e}");
        assert!(e.contains(&tok.special().mask.to_string()), "{e}");
        let mut v = read_model_config(Path::new("tiny")).unwrap();
        v["vocab_size"] = Value::from(100);
        let e = fill_from_tokenizer(&mut v, &tok, &shipped())
            .unwrap_err()
            .to_string();
        assert!(e.contains("vocab_size"), "{e}");
        // a larger embedding than the vocabulary is the real LLaDA's case: kept
        let mut v = read_model_config(Path::new("tiny")).unwrap();
        v["embedding_size"] = Value::from(8192);
        fill_from_tokenizer(&mut v, &tok, &shipped()).unwrap();
        assert_eq!(v["embedding_size"], 8192);
        // a larger vocab_size alone: the embedding follows it
        let mut v = read_model_config(Path::new("tiny")).unwrap();
        v["vocab_size"] = Value::from(8192);
        fill_from_tokenizer(&mut v, &tok, &shipped()).unwrap();
        assert_eq!(v["embedding_size"], 8192);
        RawConfig::from_value(v, Path::new("tiny"))
            .unwrap()
            .resolve()
            .unwrap();
    }

    #[test]
    fn an_unknown_name_lists_the_presets() {
        let e = read_model_config(Path::new("huge"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("huge") && e.contains("tiny, small, bench-135m"),
            "{e}"
        );
    }
}
