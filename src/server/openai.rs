//! OpenAI-compatible request and response shapes, and the one place where a raw request is checked
//! into typed settings ([`validate_generation`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::chat::Message;
use crate::sampler::{CacheMode, Commit, Remasking, SamplerConfig};

/// A field that is `Some(Value::Null)` when the request says `null` and `None` when it is absent
/// (`"threshold": null` turns the default threshold off).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// Sampler options accepted as extra fields of the OpenAI requests.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SamplerFields {
    #[serde(default, deserialize_with = "present")]
    pub max_tokens: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub max_completion_tokens: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub temperature: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub seed: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub steps: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub block_length: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub remasking: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub cfg_scale: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub threshold: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub factor: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub cache: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub early_stop: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub logits_eos_inf: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub confidence_eos_eot_inf: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub n: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub stream: Option<Value>,
    /// llada extension: stream every denoising step's canvas as `event: denoise` SSE events.
    #[serde(default, deserialize_with = "present")]
    pub denoise: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub stop: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub model: Option<Value>,
}

/// Server-wide defaults for fields a request leaves out.
#[derive(Debug, Clone, Serialize)]
pub struct Defaults {
    pub max_tokens: usize,
    pub block_length: usize,
    pub threshold: Option<f64>,
    pub cache: CacheMode,
    pub early_stop: bool,
    /// Longest answer a request may ask for.
    pub max_tokens_limit: usize,
}

impl Default for Defaults {
    fn default() -> Self {
        Defaults {
            max_tokens: 64,
            block_length: 32,
            threshold: Some(0.9),
            cache: CacheMode::Dual,
            early_stop: true,
            max_tokens_limit: 1024,
        }
    }
}

fn as_usize(v: &Value, name: &str, min: usize, max: usize) -> Result<usize, ApiError> {
    let n = v.as_u64().ok_or_else(|| {
        ApiError::invalid(
            name,
            format!("{name} must be an integer between {min} and {max}, got {v}"),
        )
    })?;
    if (n as u128) < min as u128 || (n as u128) > max as u128 {
        return Err(ApiError::invalid(
            name,
            format!("{name}={n} must be between {min} and {max}"),
        ));
    }
    Ok(n as usize)
}

fn as_f64(v: &Value, name: &str, min: f64, max: f64) -> Result<f64, ApiError> {
    let x = v
        .as_f64()
        .ok_or_else(|| ApiError::invalid(name, format!("{name} must be a number, got {v}")))?;
    if !x.is_finite() || x < min || x > max {
        return Err(ApiError::invalid(
            name,
            format!("{name}={x} must be between {min} and {max}"),
        ));
    }
    Ok(x)
}

fn as_bool(v: &Value, name: &str) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| ApiError::invalid(name, format!("{name} must be true or false, got {v}")))
}

fn as_str<'a>(v: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    v.as_str()
        .ok_or_else(|| ApiError::invalid(name, format!("{name} must be a string, got {v}")))
}

/// Checked generation settings of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGeneration {
    pub cfg: SamplerConfig,
    pub seed: u64,
    pub stream: bool,
    pub denoise: bool,
    pub stop: Vec<String>,
}

/// Checks the sampler fields into settings; `None` values take the server defaults.
pub fn validate_generation(f: &SamplerFields, d: &Defaults) -> Result<ValidGeneration, ApiError> {
    if let Some(n) = &f.n {
        if as_usize(n, "n", 1, 1)? != 1 {
            return Err(ApiError::invalid("n", "only n=1 is supported"));
        }
    }
    let max_tokens = match (&f.max_completion_tokens, &f.max_tokens) {
        (Some(v), _) => as_usize(v, "max_completion_tokens", 1, d.max_tokens_limit)?,
        (None, Some(v)) => as_usize(v, "max_tokens", 1, d.max_tokens_limit)?,
        (None, None) => d.max_tokens,
    };
    let mut cfg = SamplerConfig {
        gen_length: max_tokens,
        steps: max_tokens,
        block_length: if max_tokens.is_multiple_of(d.block_length) {
            d.block_length
        } else {
            max_tokens
        },
        cache: d.cache,
        early_stop: d.early_stop,
        commit: match d.threshold {
            Some(tau) => Commit::Threshold { tau },
            None => Commit::TopK,
        },
        ..Default::default()
    };
    if let Some(v) = &f.steps {
        cfg.steps = as_usize(v, "steps", 1, max_tokens)?;
    }
    if let Some(v) = &f.block_length {
        cfg.block_length = as_usize(v, "block_length", 1, max_tokens)?;
    }
    if let Some(v) = &f.temperature {
        cfg.temperature = as_f64(v, "temperature", 0.0, 100.0)?;
    }
    if let Some(v) = &f.remasking {
        cfg.remasking = as_str(v, "remasking")?.parse::<Remasking>().map_err(|_| {
            ApiError::invalid("remasking", "remasking must be low_confidence or random")
        })?;
    }
    if let Some(v) = &f.cfg_scale {
        cfg.cfg_scale = as_f64(v, "cfg_scale", 0.0, 100.0)?;
        if cfg.cfg_scale > 0.0 && f.cache.is_none() {
            cfg.cache = CacheMode::None; // the caches do not support guidance
        }
    }
    match (&f.threshold, &f.factor) {
        (Some(Value::Null), _) => cfg.commit = Commit::TopK,
        (Some(v), _) => {
            cfg.commit = Commit::Threshold {
                tau: as_f64(v, "threshold", f64::MIN_POSITIVE, 1.0)?,
            }
        }
        (None, Some(v)) => {
            cfg.commit = Commit::Factor {
                f: as_f64(v, "factor", f64::MIN_POSITIVE, 1e6)?,
            }
        }
        (None, None) => {}
    }
    if let Some(v) = &f.cache {
        cfg.cache = as_str(v, "cache")?
            .parse::<CacheMode>()
            .map_err(|_| ApiError::invalid("cache", "cache must be none, prefix or dual"))?;
    }
    if let Some(v) = &f.early_stop {
        cfg.early_stop = as_bool(v, "early_stop")?;
    }
    if let Some(v) = &f.logits_eos_inf {
        cfg.logits_eos_inf = as_bool(v, "logits_eos_inf")?;
    }
    if let Some(v) = &f.confidence_eos_eot_inf {
        cfg.confidence_eos_eot_inf = as_bool(v, "confidence_eos_eot_inf")?;
    }
    if f.steps.is_none() && cfg.commit == Commit::TopK {
        cfg.steps = max_tokens;
    }
    cfg.validate().map_err(ApiError::from)?;
    let seed = match &f.seed {
        Some(Value::Null) | None => 0,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|x| x as u64))
            .ok_or_else(|| {
                ApiError::invalid("seed", format!("seed must be an integer, got {v}"))
            })?,
    };
    let stream = match &f.stream {
        Some(Value::Null) | None => false,
        Some(v) => as_bool(v, "stream")?,
    };
    let denoise = match &f.denoise {
        Some(Value::Null) | None => false,
        Some(v) => as_bool(v, "denoise")?,
    };
    let stop = match &f.stop {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| as_str(x, "stop").map(str::to_string))
            .collect::<Result<_, _>>()?,
        Some(v) => {
            return Err(ApiError::invalid(
                "stop",
                format!("stop must be a string or a list of strings, got {v}"),
            ))
        }
    };
    if stop.len() > 4 || stop.iter().any(|s| s.is_empty()) {
        return Err(ApiError::invalid(
            "stop",
            "stop takes at most 4 non-empty strings",
        ));
    }
    Ok(ValidGeneration {
        cfg,
        seed,
        stream,
        denoise,
        stop,
    })
}

/// The messages of a chat request: `{role, content}` with string content (or a list of text
/// parts).
pub fn parse_messages(v: &Value) -> Result<Vec<Message>, ApiError> {
    let arr = v.as_array().ok_or_else(|| {
        ApiError::invalid("messages", "messages must be a list of {role, content}")
    })?;
    if arr.is_empty() {
        return Err(ApiError::invalid("messages", "messages must not be empty"));
    }
    arr.iter()
        .enumerate()
        .map(|(i, m)| {
            let role = m.get("role").and_then(Value::as_str).ok_or_else(|| {
                ApiError::invalid(&format!("messages[{i}].role"), "role must be a string")
            })?;
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| {
                        p.get("text")
                            .and_then(Value::as_str)
                            .map(str::to_string)
                            .ok_or_else(|| {
                                ApiError::invalid(
                                    &format!("messages[{i}].content"),
                                    "content parts must be {type: text, text}",
                                )
                            })
                    })
                    .collect::<Result<Vec<_>, _>>()?
                    .join(""),
                _ => {
                    return Err(ApiError::invalid(
                        &format!("messages[{i}].content"),
                        "content must be a string",
                    ))
                }
            };
            Ok(Message::new(role, content))
        })
        .collect()
}

/// The prompts of a completion request: a string or a list of strings.
pub fn parse_prompts(v: Option<&Value>) -> Result<Vec<String>, ApiError> {
    match v {
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if !a.is_empty() && a.len() <= 16 => a
            .iter()
            .map(|x| as_str(x, "prompt").map(str::to_string))
            .collect(),
        Some(Value::Array(_)) => Err(ApiError::invalid(
            "prompt",
            "prompt lists take 1 to 16 strings",
        )),
        None => Err(ApiError::invalid("prompt", "prompt is required")),
        Some(v) => Err(ApiError::invalid(
            "prompt",
            format!("prompt must be a string or a list of strings, got {v}"),
        )),
    }
}

/// Usage counts of a response.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub total_tokens: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: serde_json::Value) -> SamplerFields {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn defaults_and_overrides() {
        let d = Defaults::default();
        let g = validate_generation(&fields(serde_json::json!({"max_tokens": 32})), &d).unwrap();
        assert_eq!(g.cfg.gen_length, 32);
        assert_eq!(g.cfg.cache, CacheMode::Dual);
        let g = validate_generation(&fields(serde_json::json!({"max_tokens": 16, "threshold": null, "cache": "none", "steps": 8, "block_length": 16})), &d).unwrap();
        assert_eq!(
            (g.cfg.commit, g.cfg.cache, g.cfg.steps),
            (Commit::TopK, CacheMode::None, 8)
        );
    }

    #[test]
    fn bad_values_name_the_field() {
        let d = Defaults::default();
        for (v, field) in [
            (serde_json::json!({"max_tokens": -1}), "max_tokens"),
            (serde_json::json!({"max_tokens": 1e30}), "max_tokens"),
            (serde_json::json!({"max_tokens": "ten"}), "max_tokens"),
            (serde_json::json!({"temperature": -0.5}), "temperature"),
            (
                serde_json::json!({"max_tokens": 32, "block_length": 7, "threshold": null}),
                "gen_length",
            ),
            (serde_json::json!({"cache": "quad"}), "cache"),
            (serde_json::json!({"n": 3}), "n"),
            (serde_json::json!({"stream": "yes"}), "stream"),
        ] {
            match validate_generation(&fields(v.clone()), &d) {
                Err(ApiError::Invalid { param, .. }) => assert_eq!(param, field, "{v}"),
                other => panic!("{v}: {other:?}"),
            }
        }
    }
}
