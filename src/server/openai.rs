//! OpenAI-compatible request and response shapes, and the one place where a raw request is checked
//! into typed settings ([`validate_generation`]).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::error::ApiError;
use crate::chat::Message;
use crate::error::Result as LibResult;
use crate::sampler::{Preset, SamplerConfig, SamplerSettings};

/// A field that is `Some(Value::Null)` when the request says `null` and `None` when it is absent.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

/// The OpenAI fields of a request that are not sampler settings (those are read into a
/// [`SamplerSettings`] from the same body).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RequestFields {
    #[serde(default, deserialize_with = "present")]
    pub max_tokens: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub max_completion_tokens: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub seed: Option<Value>,
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
    /// Not supported: asking for them is refused rather than silently ignored.
    #[serde(default, deserialize_with = "present")]
    pub logprobs: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub top_logprobs: Option<Value>,
    /// `{"include_usage": true}`: a last chunk with the usage before `[DONE]` (streams only).
    #[serde(default, deserialize_with = "present")]
    pub stream_options: Option<Value>,
    /// Not supported by a diffusion sampler: 0 (or absent) is accepted, anything else refused.
    #[serde(default, deserialize_with = "present")]
    pub frequency_penalty: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub presence_penalty: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    pub logit_bias: Option<Value>,
}

/// Most answers one request may ask for: `n` × the prompts of a completion request.
pub const MAX_ANSWERS: usize = 16;

/// Refuses the OpenAI fields that have no meaning for a diffusion sampler when they ask for
/// something: `frequency_penalty` / `presence_penalty` other than 0 (they penalise tokens by what
/// was generated *before* them, and a diffusion sampler commits tokens in parallel, in any order)
/// and a non-empty `logit_bias`. An answer that silently ignored them would look like a bug.
pub fn refuse_penalties(f: &RequestFields) -> Result<(), ApiError> {
    for (name, v) in [
        ("frequency_penalty", &f.frequency_penalty),
        ("presence_penalty", &f.presence_penalty),
    ] {
        match v {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_f64() == Some(0.0) => {}
            Some(Value::Number(n)) => {
                return Err(ApiError::invalid(
                    name,
                    format!("{name}={n} is not supported: a diffusion sampler commits tokens in parallel and in any order, so there are no earlier tokens to penalise (send 0 or leave it out; top_p, top_k and temperature shape the distribution)"),
                ))
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    name,
                    format!("{name} must be a number, got {v}"),
                ))
            }
        }
    }
    match &f.logit_bias {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(m)) if m.is_empty() => Ok(()),
        Some(_) => Err(ApiError::invalid(
            "logit_bias",
            "logit_bias is not supported by this server (send {} or leave it out)",
        )),
    }
}

/// A request's `seed`: absent or `null` is 0; otherwise an integer (a negative one wraps, as
/// OpenAI's clients send signed seeds); anything else names the field.
pub fn parse_seed(v: Option<&Value>) -> Result<u64, ApiError> {
    match v {
        Some(Value::Null) | None => Ok(0),
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_i64().map(|x| x as u64))
            .ok_or_else(|| ApiError::invalid("seed", format!("seed must be an integer, got {v}"))),
    }
}

/// Refuses `logprobs` / `top_logprobs` when they ask for anything (`null`, `false` and `0` ask
/// for nothing): this server returns no log-probabilities, and an answer without the asked-for
/// field would look like a bug in the client.
pub fn refuse_logprobs(f: &RequestFields) -> Result<(), ApiError> {
    for (name, v) in [("logprobs", &f.logprobs), ("top_logprobs", &f.top_logprobs)] {
        let asks = match v {
            None | Some(Value::Null) | Some(Value::Bool(false)) => false,
            Some(Value::Number(n)) => n.as_f64() != Some(0.0),
            Some(_) => true,
        };
        if asks {
            return Err(ApiError::invalid(
                name,
                format!("{name} is not supported by this server (it returns no log-probabilities; use POST /v1/score for likelihoods)"),
            ));
        }
    }
    Ok(())
}

/// The server's default answer length (`max_tokens`): the CLI's.
pub const DEFAULT_MAX_TOKENS: usize = crate::sampler::DEFAULT_GEN_LENGTH;

/// Server-wide defaults for fields a request leaves out.
#[derive(Debug, Clone, Serialize)]
pub struct Defaults {
    /// The base of every request's [`SamplerSettings::resolve`]; its `gen_length` is the default
    /// `max_tokens`.
    pub sampler: SamplerConfig,
    /// Longest answer a request may ask for.
    pub max_tokens_limit: usize,
}

impl Default for Defaults {
    /// The fast preset over `generate.py`'s defaults (LLaDA's architecture).
    fn default() -> Self {
        Defaults {
            sampler: Preset::Fast.apply(SamplerConfig::default(), true),
            max_tokens_limit: 1024,
        }
    }
}

impl Defaults {
    /// The defaults for a model of `cfg` under `preset`: the same sampler as the CLI's
    /// `generate` ([`Preset::apply`] over [`SamplerConfig::for_model`]), so that a prompt gets
    /// the same answer from both.
    pub fn for_model(cfg: &crate::config::ModelConfig, preset: Preset) -> Self {
        Defaults {
            sampler: preset.apply(SamplerConfig::for_model(cfg), true),
            max_tokens_limit: cfg.max_sequence_length,
        }
    }

    /// A request's settings over the defaults. The answer length is always given (the request's
    /// or the default `max_tokens`), so `steps` and `block_length` follow it by the rule of
    /// [`SamplerSettings::resolve`] either way.
    pub fn resolve(
        &self,
        mut settings: SamplerSettings,
        max_tokens: Option<usize>,
    ) -> LibResult<SamplerConfig> {
        settings.gen_length = Some(max_tokens.unwrap_or(self.sampler.gen_length));
        settings.resolve(&self.sampler)
    }

    /// Checks the defaults themselves with the rules of a request: a request that gives nothing
    /// must be valid, and the default answer length must be one a request may ask for.
    pub fn check(&self) -> LibResult<()> {
        if self.sampler.gen_length > self.max_tokens_limit {
            return Err(crate::Error::setting(
                "default-max-tokens",
                self.sampler.gen_length,
                format!(
                    "must be at most the longest answer a request may ask for ({}, the model's context)",
                    self.max_tokens_limit
                ),
            ));
        }
        self.resolve(SamplerSettings::default(), None).map(drop)
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

fn as_bool(v: &Value, name: &str) -> Result<bool, ApiError> {
    v.as_bool()
        .ok_or_else(|| ApiError::invalid(name, format!("{name} must be true or false, got {v}")))
}

fn as_str<'a>(v: &'a Value, name: &str) -> Result<&'a str, ApiError> {
    v.as_str()
        .ok_or_else(|| ApiError::invalid(name, format!("{name} must be a string, got {v}")))
}

/// The server's own bounds on values from the network, on top of the sampler's rules.
fn check_limits(s: &SamplerSettings) -> Result<(), ApiError> {
    for (name, v, max) in [
        ("temperature", s.temperature, 100.0),
        ("cfg_scale", s.cfg_scale, 100.0),
        ("factor", s.factor, 1e6),
    ] {
        if let Some(x) = v.filter(|&x| x > max) {
            return Err(ApiError::invalid(
                name,
                format!("{name}={x} must be at most {max}"),
            ));
        }
    }
    Ok(())
}

/// Checked generation settings of a request.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidGeneration {
    pub cfg: SamplerConfig,
    pub seed: u64,
    pub stream: bool,
    pub denoise: bool,
    pub stop: Vec<String>,
    /// Answers per prompt (`n`): rows of one batch that draw different noise from `seed`.
    pub n: usize,
    /// A streamed request's last chunk carries the usage (`stream_options.include_usage`).
    pub include_usage: bool,
}

/// Checks a request body into settings: the OpenAI fields here, the sampler fields through
/// [`SamplerSettings`] over the server defaults.
pub fn validate_generation(body: &Value, d: &Defaults) -> Result<ValidGeneration, ApiError> {
    let f: RequestFields = serde_json::from_value(body.clone())
        .map_err(|e| ApiError::invalid("body", e.to_string()))?;
    let n = match &f.n {
        None | Some(Value::Null) => 1,
        Some(v) => as_usize(v, "n", 1, MAX_ANSWERS)?,
    };
    let max_tokens = match (&f.max_completion_tokens, &f.max_tokens) {
        (Some(v), _) => Some(as_usize(v, "max_completion_tokens", 1, d.max_tokens_limit)?),
        (None, Some(v)) => Some(as_usize(v, "max_tokens", 1, d.max_tokens_limit)?),
        (None, None) => None,
    };
    refuse_logprobs(&f)?;
    refuse_penalties(&f)?;
    let settings = SamplerSettings::from_json(body)?;
    check_limits(&settings)?;
    let cfg = d.resolve(settings, max_tokens)?;
    let seed = parse_seed(f.seed.as_ref())?;
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
    if stream && n > 1 {
        return Err(ApiError::invalid(
            "n",
            format!(
                "n={n} with stream: a stream carries one answer (ask without stream for several)"
            ),
        ));
    }
    let include_usage = match &f.stream_options {
        None | Some(Value::Null) => false,
        Some(_) if !stream => {
            return Err(ApiError::invalid(
                "stream_options",
                "stream_options is only allowed with stream: true",
            ))
        }
        Some(Value::Object(o)) => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(v) => as_bool(v, "stream_options.include_usage")?,
        },
        Some(v) => {
            return Err(ApiError::invalid(
                "stream_options",
                format!(
                    "stream_options must be an object such as {{\"include_usage\": true}}, got {v}"
                ),
            ))
        }
    };
    Ok(ValidGeneration {
        cfg,
        seed,
        stream,
        denoise,
        stop,
        n,
        include_usage,
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
    use crate::sampler::{CacheMode, Commit};

    #[test]
    fn defaults_and_overrides() {
        let d = Defaults::default();
        let g = validate_generation(&(serde_json::json!({"max_tokens": 32})), &d).unwrap();
        assert_eq!(g.cfg.gen_length, 32);
        assert_eq!(g.cfg.cache, CacheMode::Dual);
        let g = validate_generation(&(serde_json::json!({"max_tokens": 16, "threshold": null, "cache": "none", "steps": 8, "block_length": 16})), &d).unwrap();
        assert_eq!(
            (g.cfg.commit, g.cfg.cache, g.cfg.steps),
            (Commit::TopK, CacheMode::None, 8)
        );
    }

    #[test]
    fn the_defaults_are_the_servers() {
        let d = Defaults::default();
        d.check().unwrap();
        let g = validate_generation(&serde_json::json!({}), &d).unwrap();
        assert_eq!(
            (g.cfg.gen_length, g.cfg.steps, g.cfg.block_length),
            (128, 128, 32)
        );
        assert_eq!(g.cfg.commit, Commit::Threshold { tau: 0.9 });
        assert!(g.cfg.early_stop);
        // an answer length the default block does not divide is one block
        let g = validate_generation(&serde_json::json!({"max_tokens": 48}), &d).unwrap();
        assert_eq!((g.cfg.steps, g.cfg.block_length), (48, 48));
        // the default cache gives way to guidance; an asked-for one is an error
        let g = validate_generation(&serde_json::json!({"cfg_scale": 1.5}), &d).unwrap();
        assert_eq!(g.cfg.cache, CacheMode::None);
        let e = validate_generation(&serde_json::json!({"cfg_scale": 1.5, "cache": "dual"}), &d);
        assert!(matches!(e, Err(ApiError::Invalid { param, .. }) if param == "cache"));
        // a factor replaces the default threshold; with an explicit threshold it is an error
        let g = validate_generation(&serde_json::json!({"factor": 2.0}), &d).unwrap();
        assert_eq!(g.cfg.commit, Commit::Factor { f: 2.0 });
        let e = validate_generation(&serde_json::json!({"threshold": 0.8, "factor": 2.0}), &d);
        match e {
            Err(ApiError::Invalid { param, message }) => {
                assert_eq!(param, "threshold");
                assert!(message.contains("factor=2"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn openai_fields_that_ask_for_nothing_are_accepted() {
        let d = Defaults::default();
        let g = validate_generation(
            &serde_json::json!({"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}, "n": null, "top_p": 0.9}),
            &d,
        )
        .unwrap();
        assert_eq!((g.n, g.include_usage), (1, false));
        assert_eq!(g.cfg.filter.top_p, Some(0.9));
        let g = validate_generation(
            &serde_json::json!({"stream": true, "stream_options": {"include_usage": true}}),
            &d,
        )
        .unwrap();
        assert!(g.include_usage && g.stream);
        let g = validate_generation(&serde_json::json!({"n": 4}), &d).unwrap();
        assert_eq!(g.n, 4);
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
            (serde_json::json!({"n": 17}), "n"),
            (serde_json::json!({"n": 0}), "n"),
            (serde_json::json!({"n": 2, "stream": true}), "n"),
            (
                serde_json::json!({"frequency_penalty": 0.5}),
                "frequency_penalty",
            ),
            (
                serde_json::json!({"presence_penalty": -1}),
                "presence_penalty",
            ),
            (
                serde_json::json!({"presence_penalty": "high"}),
                "presence_penalty",
            ),
            (
                serde_json::json!({"logit_bias": {"50256": -100}}),
                "logit_bias",
            ),
            (
                serde_json::json!({"stream_options": {"include_usage": true}}),
                "stream_options",
            ),
            (
                serde_json::json!({"stream": true, "stream_options": {"include_usage": "yes"}}),
                "stream_options.include_usage",
            ),
            (
                serde_json::json!({"stream": true, "stream_options": 1}),
                "stream_options",
            ),
            (serde_json::json!({"stream": "yes"}), "stream"),
            (serde_json::json!({"temperature": "hot"}), "temperature"),
            (serde_json::json!({"temperature": 1000.0}), "temperature"),
            (serde_json::json!({"steps": null}), "steps"),
            (serde_json::json!({"remasking": "lowest"}), "remasking"),
            (serde_json::json!({"factor": 1e7}), "factor"),
            (serde_json::json!({"logprobs": true}), "logprobs"),
            (serde_json::json!({"logprobs": 5}), "logprobs"),
            (serde_json::json!({"top_logprobs": 2}), "top_logprobs"),
            (serde_json::json!({"seed": "abc"}), "seed"),
        ] {
            match validate_generation(&v, &d) {
                Err(ApiError::Invalid { param, .. }) => assert_eq!(param, field, "{v}"),
                other => panic!("{v}: {other:?}"),
            }
        }
    }
}
