//! The one path from a user's raw choices to a checked [`SamplerConfig`]: the CLI's flags and
//! the server's JSON fields both become a [`SamplerSettings`], and [`SamplerSettings::resolve`]
//! applies the defaulting rules and every check, so the two front ends cannot disagree.
//!
//! The rules, in order:
//! 1. `threshold` and `factor` are two commit rules: giving both is an error naming both.
//!    (`threshold: None` inside `Some`, the server's `"threshold": null`, only turns a default
//!    threshold off and combines with nothing.)
//! 2. Every choice left out takes the `base` value (the caller's defaults: the reference's for the
//!    CLI, the server's own for the server).
//! 3. A new `gen_length` carries the defaults along: one token per step (`steps` = it), and the
//!    base block unless the block no longer divides it (then one block: pure diffusion). An
//!    explicit `steps` or `block_length` still wins.
//! 4. A cache that came from `base` (not asked for) is turned off when classifier-free guidance
//!    is on: the caches do not support it. A cache that was asked for with `cfg_scale` > 0 is an
//!    error ([`SamplerConfig::validate`]).
//! 5. `alg` chooses Dream's `diffusion_generate` ([`Alg`]): Dream's schedule with `eps`
//!    (default 1e-3), the alg's confidence, top-k commits (`alg_temp` > 0: sampled ones;
//!    `origin`: random reveals) unless a threshold or factor is given, and, unless given, one
//!    block over the whole answer, no cache and no early stop (the official loop). `alg` with
//!    `remasking`, `origin` with a commit rule or `alg_temp`, `alg_temp` > 0 with a commit rule,
//!    and `eps` or `alg_temp` without `alg` are errors naming both. `top_p`/`top_k` filter the
//!    logits of any sampler.
//! 6. [`SamplerConfig::validate`].
//! 7. Block diffusion (a base with `block_diffusion`, LLaDA2's): `eos_early_stop`, `minimal_topk`,
//!    and LLaDA2.1's `editing_threshold`, `max_post_steps`, `num_to_transfer` (any of which
//!    selects LLaDA2.1's token-editing sampler); a new `gen_length` keeps the steps per block and
//!    the block. These keys with another base are errors naming the key.

use serde::{Deserialize, Deserializer, Serialize};

use super::{CacheMode, Commit, Remasking, SamplerConfig, Schedule};
use crate::error::{Error, Result};

/// Dream's `eps` default (`diffusion_generate`).
pub const DREAM_EPS: f64 = 1e-3;

/// Dream's `alg`: the official `diffusion_generate` sampler as a point of the sampler's axes
/// (schedule [`Schedule::Dream`], and the confidence or reveal rule). The names are Dream's, the
/// same for serde and clap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
#[value(rename_all = "snake_case")]
pub enum Alg {
    /// Each mask revealed with probability 1 − s/t per step (random even at temperature 0).
    Origin,
    /// The most probable predictions first.
    MaskgitPlus,
    /// The largest top-1 − top-2 probability margins first.
    TopkMargin,
    /// The lowest entropies first.
    Entropy,
}

impl Alg {
    /// The confidence this alg ranks by (`origin` draws its tokens as `maskgit_plus` does).
    pub fn remasking(self) -> Remasking {
        match self {
            Alg::Origin | Alg::MaskgitPlus => Remasking::MaskgitPlus,
            Alg::TopkMargin => Remasking::TopkMargin,
            Alg::Entropy => Remasking::Entropy,
        }
    }
}

impl std::fmt::Display for Alg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let v = clap::ValueEnum::to_possible_value(self);
        f.write_str(v.as_ref().map_or("", |v| v.get_name()))
    }
}

/// The raw sampler choices of a user: `None` = not given (take the default). Deserialized from
/// the server's JSON (keys as below; `null` is rejected except for `threshold`, where it turns a
/// default threshold off) and filled from the CLI's flags.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(default)]
pub struct SamplerSettings {
    /// Answer length in tokens.
    #[serde(deserialize_with = "given")]
    pub gen_length: Option<usize>,
    /// Denoising steps over all blocks.
    #[serde(deserialize_with = "given")]
    pub steps: Option<usize>,
    /// Semi-autoregressive block length.
    #[serde(deserialize_with = "given")]
    pub block_length: Option<usize>,
    /// Confidence scoring.
    #[serde(deserialize_with = "given")]
    pub remasking: Option<Remasking>,
    /// Gumbel-max temperature; 0 = greedy.
    #[serde(deserialize_with = "given")]
    pub temperature: Option<f64>,
    /// Classifier-free guidance scale; 0 = off.
    #[serde(deserialize_with = "given")]
    pub cfg_scale: Option<f64>,
    /// Never generate EOS.
    #[serde(deserialize_with = "given")]
    pub logits_eos_inf: Option<bool>,
    /// EOS/EOT predictions get confidence 0.
    #[serde(deserialize_with = "given")]
    pub confidence_eos_eot_inf: Option<bool>,
    /// Fast-dLLM threshold rule: `Some(Some(τ))` commits every prediction with confidence ≥ τ,
    /// `Some(None)` turns a default threshold off (the reference top-k schedule).
    #[serde(deserialize_with = "given_or_null")]
    pub threshold: Option<Option<f64>>,
    /// Fast-dLLM factor rule.
    #[serde(deserialize_with = "given")]
    pub factor: Option<f64>,
    /// Key/value cache between the steps of a block.
    #[serde(deserialize_with = "given")]
    pub cache: Option<CacheMode>,
    /// Stop as soon as the answer is final.
    #[serde(deserialize_with = "given")]
    pub early_stop: Option<bool>,
    /// Dream's `diffusion_generate` algorithm.
    #[serde(deserialize_with = "given")]
    pub alg: Option<Alg>,
    /// Dream's `alg_temp`: > 0 draws the committed positions from softmax(confidence / alg_temp).
    #[serde(deserialize_with = "given")]
    pub alg_temp: Option<f64>,
    /// Dream's `eps`: the last timestep of its schedule.
    #[serde(deserialize_with = "given")]
    pub eps: Option<f64>,
    /// Nucleus filter of the logits (1 = off).
    #[serde(deserialize_with = "given")]
    pub top_p: Option<f64>,
    /// Top-k filter of the logits.
    #[serde(deserialize_with = "given")]
    pub top_k: Option<usize>,
    /// Block diffusion (LLaDA2): return as soon as the answer up to its first EOS is decoded.
    #[serde(deserialize_with = "given")]
    pub eos_early_stop: Option<bool>,
    /// Block diffusion: steps per block are at most `gen_length / minimal_topk`.
    #[serde(deserialize_with = "given")]
    pub minimal_topk: Option<usize>,
    /// LLaDA2.1's token editing threshold (giving any LLaDA2.1 key selects its sampler).
    #[serde(deserialize_with = "given")]
    pub editing_threshold: Option<f64>,
    /// LLaDA2.1: steps a block may take after its last mask is decoded.
    #[serde(deserialize_with = "given")]
    pub max_post_steps: Option<usize>,
    /// LLaDA2.1: positions a step decodes when too few pass the threshold.
    #[serde(deserialize_with = "given")]
    pub num_to_transfer: Option<usize>,
}

/// A present field must hold a value (`null` is an error, as a wrong type is).
fn given<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A present field is `Some(None)` when it is `null`.
fn given_or_null<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl SamplerSettings {
    /// Reads the settings from the keys of a JSON object; other keys are ignored (a request body
    /// carries more than sampler settings). A value of the wrong type, `null` where a value is
    /// needed or an unknown choice is an error naming its key.
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        Self::deserialize(v).map_err(|e| {
            // serde's message does not name the field: find the first key that fails alone
            let culprit = v.as_object().and_then(|m| {
                m.iter().find(|(k, x)| {
                    let one = serde_json::Value::Object(
                        [((*k).clone(), (*x).clone())].into_iter().collect(),
                    );
                    Self::deserialize(&one).is_err()
                })
            });
            match culprit {
                Some((k, x)) => Error::setting(k, x, e.to_string()),
                None => Error::setting("sampler settings", v, e.to_string()),
            }
        })
    }

    /// Rules 1–4 of the module: the settings over `base`, without the final
    /// [`SamplerConfig::validate`]. For callers that check the layout against something else
    /// (infilling, whose answer region comes from the text; left-to-right sampling, which has no
    /// blocks); everyone else calls [`SamplerSettings::resolve`].
    pub fn merge(&self, base: &SamplerConfig) -> Result<SamplerConfig> {
        if let (Some(Some(tau)), Some(f)) = (self.threshold, self.factor) {
            return Err(Error::setting(
                "threshold",
                tau,
                format!(
                    "cannot be combined with factor={f}: give one commit rule, threshold or factor"
                ),
            ));
        }
        let mut c = base.clone();
        if let Some(v) = self.gen_length {
            c.gen_length = v;
            // block diffusion's steps are per block, and its blocks need not divide the answer
            if c.block_diffusion.is_none() {
                c.steps = v;
                if v == 0 || !v.is_multiple_of(c.block_length.max(1)) {
                    c.block_length = v;
                }
            }
        }
        if let Some(v) = self.steps {
            c.steps = v;
        }
        if let Some(v) = self.block_length {
            c.block_length = v;
        }
        if let Some(v) = self.remasking {
            c.remasking = v;
        }
        if let Some(v) = self.temperature {
            c.temperature = v;
        }
        if let Some(v) = self.cfg_scale {
            c.cfg_scale = v;
        }
        if let Some(v) = self.logits_eos_inf {
            c.logits_eos_inf = v;
        }
        if let Some(v) = self.confidence_eos_eot_inf {
            c.confidence_eos_eot_inf = v;
        }
        match (self.threshold, self.factor) {
            (Some(Some(tau)), _) => c.commit = Commit::Threshold { tau },
            (_, Some(f)) => c.commit = Commit::Factor { f },
            (Some(None), None) => c.commit = Commit::TopK,
            (None, None) => {}
        }
        match self.cache {
            Some(m) => c.cache = m,
            None if c.cfg_scale > 0.0 => c.cache = CacheMode::None,
            None => {}
        }
        if let Some(v) = self.early_stop {
            c.early_stop = v;
        }
        self.merge_dream(&mut c)?;
        if let Some(p) = self.top_p {
            c.filter.top_p = Some(p);
        }
        if let Some(k) = self.top_k {
            c.filter.top_k = Some(k);
        }
        self.merge_block_diffusion(&mut c)?;
        Ok(c)
    }

    /// Rule 7: block diffusion's keys, only for a block-diffusion base (an LLaDA2 model); any of
    /// LLaDA2.1's keys selects its token-editing sampler.
    fn merge_block_diffusion(&self, c: &mut SamplerConfig) -> Result<()> {
        let keys: [(&str, Option<String>); 5] = [
            ("eos_early_stop", self.eos_early_stop.map(|v| v.to_string())),
            ("minimal_topk", self.minimal_topk.map(|v| v.to_string())),
            (
                "editing_threshold",
                self.editing_threshold.map(|v| v.to_string()),
            ),
            ("max_post_steps", self.max_post_steps.map(|v| v.to_string())),
            (
                "num_to_transfer",
                self.num_to_transfer.map(|v| v.to_string()),
            ),
        ];
        let Some(bd) = c.block_diffusion.as_mut() else {
            if let Some((k, Some(v))) = keys.iter().find(|(_, v)| v.is_some()) {
                return Err(Error::setting(
                    k,
                    v,
                    "is a block-diffusion setting: it needs an LLaDA2 model (LLaDA2MoeModelLM)",
                ));
            }
            return Ok(());
        };
        if let Some(v) = self.eos_early_stop {
            bd.eos_early_stop = v;
        }
        if let Some(v) = self.minimal_topk {
            bd.minimal_topk = v;
        }
        if self.editing_threshold.is_some()
            || self.max_post_steps.is_some()
            || self.num_to_transfer.is_some()
        {
            let mut e = bd
                .editing
                .unwrap_or(super::block_diffusion::DEFAULT_EDITING);
            if let Some(v) = self.editing_threshold {
                e.editing_threshold = v;
            }
            if let Some(v) = self.max_post_steps {
                e.max_post_steps = v;
            }
            if let Some(v) = self.num_to_transfer {
                e.num_to_transfer = v;
            }
            bd.editing = Some(e);
            // LLaDA2.1's mask cannot be cached: a default cache (not asked for) is dropped
            if self.cache.is_none() {
                c.cache = super::CacheMode::None;
            }
        }
        Ok(())
    }

    /// Rule 5: `alg`, `alg_temp`, `eps`.
    fn merge_dream(&self, c: &mut SamplerConfig) -> Result<()> {
        let Some(alg) = self.alg else {
            if let Some(e) = self.eps {
                return Err(Error::setting(
                    "eps",
                    e,
                    "needs alg (it is a setting of Dream's schedule)",
                ));
            }
            if let Some(t) = self.alg_temp {
                return Err(Error::setting(
                    "alg_temp",
                    t,
                    "needs alg (it is a setting of Dream's samplers)",
                ));
            }
            return Ok(());
        };
        if let Some(r) = self.remasking {
            return Err(Error::setting(
                "remasking",
                r,
                format!("cannot be combined with alg={alg}: the alg chooses the confidence"),
            ));
        }
        let rule = match (self.threshold, self.factor) {
            (Some(Some(t)), _) => Some(format!("threshold={t}")),
            (_, Some(f)) => Some(format!("factor={f}")),
            _ => None,
        };
        let temp = self.alg_temp.filter(|&t| t != 0.0);
        c.schedule = Schedule::Dream {
            eps: self.eps.unwrap_or(DREAM_EPS),
        };
        c.remasking = alg.remasking();
        match (alg, temp, rule) {
            (Alg::Origin, Some(t), _) => {
                return Err(Error::setting(
                    "alg_temp",
                    t,
                    "cannot be combined with alg=origin, which ranks no confidences",
                ))
            }
            (Alg::Origin, None, Some(r)) => {
                return Err(Error::setting(
                    "alg",
                    alg,
                    format!("reveals at random and cannot be combined with {r}"),
                ))
            }
            (Alg::Origin, None, None) => c.commit = Commit::Origin,
            (_, Some(t), Some(r)) => {
                return Err(Error::setting(
                    "alg_temp",
                    t,
                    format!("cannot be combined with {r}: give one commit rule"),
                ))
            }
            (_, Some(t), None) => c.commit = Commit::Sampled { temp: t },
            (_, None, None) => c.commit = Commit::TopK,
            (_, None, Some(_)) => {} // the threshold or factor set above
        }
        // the official loop, unless asked otherwise: one block, no cache, no early stop
        // (a base block of 0, infilling's whole region, is already one block)
        if self.block_length.is_none() && c.block_length != 0 {
            c.block_length = c.gen_length;
        }
        if self.cache.is_none() {
            c.cache = CacheMode::None;
        }
        if self.early_stop.is_none() {
            c.early_stop = false;
        }
        Ok(())
    }

    /// Every rule of the module: the settings over `base`, checked.
    pub fn resolve(&self, base: &SamplerConfig) -> Result<SamplerConfig> {
        let c = self.merge(base)?;
        c.validate()?;
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampler::Schedule;
    use serde_json::json;

    fn base() -> SamplerConfig {
        SamplerConfig {
            gen_length: 64,
            steps: 64,
            block_length: 32,
            commit: Commit::Threshold { tau: 0.9 },
            cache: CacheMode::Dual,
            early_stop: true,
            ..Default::default()
        }
    }

    fn name_of(e: Error) -> String {
        match e {
            Error::InvalidSetting { name, .. } => name,
            Error::TooLong { .. } => "gen_length".into(),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn nothing_given_is_the_base() {
        assert_eq!(SamplerSettings::default().resolve(&base()).unwrap(), base());
        assert_eq!(
            SamplerSettings::default()
                .resolve(&SamplerConfig::default())
                .unwrap(),
            SamplerConfig::default()
        );
    }

    #[test]
    fn block_diffusion_keys_need_a_block_diffusion_base_and_select_llada2_1() {
        let s = SamplerSettings {
            minimal_topk: Some(2),
            ..Default::default()
        };
        assert_eq!(name_of(s.resolve(&base()).unwrap_err()), "minimal_topk");
        let bd_base = SamplerConfig {
            cache: CacheMode::Dual,
            ..SamplerConfig::block_diffusion_default()
        };
        // a new answer length keeps the steps per block and the block
        let s = SamplerSettings {
            gen_length: Some(100),
            eos_early_stop: Some(true),
            ..Default::default()
        };
        let c = s.resolve(&bd_base).unwrap();
        assert_eq!((c.gen_length, c.steps, c.block_length), (100, 32, 32));
        let bd = c.block_diffusion.unwrap();
        assert!(bd.eos_early_stop && bd.editing.is_none());
        // an LLaDA2.1 key selects its sampler, with the other keys' defaults, and drops the
        // default cache (its mask cannot be cached); an asked-for cache is an error
        let s = SamplerSettings {
            max_post_steps: Some(3),
            ..Default::default()
        };
        let c = s.resolve(&bd_base).unwrap();
        let e = c.block_diffusion.unwrap().editing.unwrap();
        assert_eq!((e.max_post_steps, e.editing_threshold), (3, 0.9));
        assert_eq!(c.cache, CacheMode::None);
        let s = SamplerSettings {
            max_post_steps: Some(3),
            cache: Some(CacheMode::Dual),
            ..Default::default()
        };
        assert_eq!(name_of(s.resolve(&bd_base).unwrap_err()), "cache");
        // LLaDA's own settings that block diffusion has no use for are refused
        let s = SamplerSettings {
            remasking: Some(Remasking::Random),
            ..Default::default()
        };
        assert_eq!(name_of(s.resolve(&bd_base).unwrap_err()), "remasking");
    }

    #[test]
    fn threshold_with_factor_is_an_error_naming_both() {
        let s = SamplerSettings {
            threshold: Some(Some(0.8)),
            factor: Some(1.5),
            ..Default::default()
        };
        let e = s.resolve(&base()).unwrap_err().to_string();
        assert!(
            e.contains("threshold=0.8") && e.contains("factor=1.5"),
            "{e}"
        );
        // the same in merge (infilling, --ar)
        assert!(s.merge(&base()).is_err());
        // `null` only turns the default off, so it combines with a factor
        let s = SamplerSettings {
            threshold: Some(None),
            factor: Some(1.5),
            ..Default::default()
        };
        assert_eq!(
            s.resolve(&base()).unwrap().commit,
            Commit::Factor { f: 1.5 }
        );
        // a factor replaces a default threshold, `null` turns it off
        let s = SamplerSettings {
            factor: Some(2.0),
            ..Default::default()
        };
        assert_eq!(
            s.resolve(&base()).unwrap().commit,
            Commit::Factor { f: 2.0 }
        );
        let s = SamplerSettings {
            threshold: Some(None),
            ..Default::default()
        };
        assert_eq!(s.resolve(&base()).unwrap().commit, Commit::TopK);
    }

    #[test]
    fn cache_with_guidance_errs_when_asked_for_and_is_dropped_when_defaulted() {
        let asked = SamplerSettings {
            cfg_scale: Some(1.0),
            cache: Some(CacheMode::Prefix),
            ..Default::default()
        };
        let e = asked.resolve(&base()).unwrap_err().to_string();
        assert!(
            e.contains("cache=prefix") && e.contains("cfg_scale=1"),
            "{e}"
        );
        let defaulted = SamplerSettings {
            cfg_scale: Some(1.0),
            ..Default::default()
        };
        let c = defaulted.resolve(&base()).unwrap();
        assert_eq!((c.cache, c.cfg_scale), (CacheMode::None, 1.0));
        // an explicit `none` is fine, and a cache without guidance stays
        let none = SamplerSettings {
            cfg_scale: Some(1.0),
            cache: Some(CacheMode::None),
            ..Default::default()
        };
        assert_eq!(none.resolve(&base()).unwrap().cache, CacheMode::None);
        let zero = SamplerSettings {
            cfg_scale: Some(0.0),
            ..Default::default()
        };
        assert_eq!(zero.resolve(&base()).unwrap().cache, CacheMode::Dual);
    }

    #[test]
    fn a_new_gen_length_carries_steps_and_block_length_along() {
        let with = |g: usize| SamplerSettings {
            gen_length: Some(g),
            ..Default::default()
        };
        let c = with(96).resolve(&base()).unwrap();
        assert_eq!((c.gen_length, c.steps, c.block_length), (96, 96, 32));
        let c = with(48).resolve(&base()).unwrap();
        assert_eq!((c.gen_length, c.steps, c.block_length), (48, 48, 48));
        let s = SamplerSettings {
            gen_length: Some(48),
            steps: Some(12),
            block_length: Some(16),
            ..Default::default()
        };
        let c = s.resolve(&base()).unwrap();
        assert_eq!((c.gen_length, c.steps, c.block_length), (48, 12, 16));
        // a base block of 0 (infilling: the whole region) is kept
        let infill = SamplerConfig {
            steps: 5,
            block_length: 0,
            ..Default::default()
        };
        let c = with(8).merge(&infill).unwrap();
        assert_eq!((c.steps, c.block_length), (8, 0));
    }

    #[test]
    fn every_choice_overrides_the_base() {
        let s = SamplerSettings {
            remasking: Some(Remasking::Random),
            temperature: Some(0.5),
            logits_eos_inf: Some(true),
            confidence_eos_eot_inf: Some(true),
            threshold: Some(Some(0.7)),
            cache: Some(CacheMode::Prefix),
            early_stop: Some(false),
            ..Default::default()
        };
        let c = s.resolve(&base()).unwrap();
        assert_eq!(
            c,
            SamplerConfig {
                remasking: Remasking::Random,
                temperature: 0.5,
                logits_eos_inf: true,
                confidence_eos_eot_inf: true,
                commit: Commit::Threshold { tau: 0.7 },
                cache: CacheMode::Prefix,
                early_stop: false,
                ..base()
            }
        );
    }

    #[test]
    fn each_bad_value_is_an_error_naming_its_field() {
        for (s, field) in [
            (json!({"gen_length": 0}), "gen_length"),
            (json!({"gen_length": 60, "block_length": 7}), "gen_length"),
            (json!({"steps": 0}), "steps"),
            (json!({"steps": 11}), "steps"),
            (json!({"block_length": 0}), "block_length"),
            (json!({"temperature": -1.0}), "temperature"),
            (json!({"cfg_scale": -0.5}), "cfg_scale"),
            (json!({"threshold": 1.5}), "threshold"),
            (json!({"threshold": 0.0}), "threshold"),
            (json!({"factor": 0.0}), "factor"),
            (json!({"cfg_scale": 2.0, "cache": "dual"}), "cache"),
            (json!({"threshold": 0.5, "factor": 1.0}), "threshold"),
        ] {
            let settings = SamplerSettings::from_json(&s).unwrap();
            let e = settings.resolve(&base()).unwrap_err();
            assert_eq!(name_of(e), field, "{s}");
        }
    }

    #[test]
    fn alg_is_dreams_official_loop_over_any_base() {
        let alg = |a: Alg| SamplerSettings {
            alg: Some(a),
            gen_length: Some(32),
            steps: Some(16),
            ..Default::default()
        };
        // over the server-like base (threshold, dual cache, early stop, blocks of 32)
        let c = alg(Alg::Entropy).resolve(&base()).unwrap();
        assert_eq!(c.schedule, Schedule::Dream { eps: DREAM_EPS });
        assert_eq!(c.remasking, Remasking::Entropy);
        assert_eq!(c.commit, Commit::TopK);
        assert_eq!(
            (c.block_length, c.cache, c.early_stop),
            (32, CacheMode::None, false)
        );
        let c = alg(Alg::Origin).resolve(&base()).unwrap();
        assert_eq!(
            (c.commit, c.remasking),
            (Commit::Origin, Remasking::MaskgitPlus)
        );
        // alg_temp: 0 is the top-k path, > 0 draws
        let mut s = alg(Alg::MaskgitPlus);
        s.alg_temp = Some(0.0);
        assert_eq!(s.resolve(&base()).unwrap().commit, Commit::TopK);
        s.alg_temp = Some(0.5);
        assert_eq!(
            s.resolve(&base()).unwrap().commit,
            Commit::Sampled { temp: 0.5 }
        );
        // explicit choices stay: a threshold, a cache, a block, eps, filters
        let s = SamplerSettings {
            threshold: Some(Some(0.9)),
            cache: Some(CacheMode::Dual),
            block_length: Some(8),
            eps: Some(0.1),
            top_p: Some(0.9),
            top_k: Some(5),
            ..alg(Alg::MaskgitPlus)
        };
        let c = s.resolve(&base()).unwrap();
        assert_eq!(c.commit, Commit::Threshold { tau: 0.9 });
        assert_eq!((c.cache, c.block_length), (CacheMode::Dual, 8));
        assert_eq!(c.schedule, Schedule::Dream { eps: 0.1 });
        assert_eq!((c.filter.top_p, c.filter.top_k), (Some(0.9), Some(5)));
        // Dream's schedule lets steps outnumber the tokens (steps that reveal nothing)
        let s = SamplerSettings {
            gen_length: Some(16),
            steps: Some(24),
            ..alg(Alg::MaskgitPlus)
        };
        assert_eq!(s.resolve(&base()).unwrap().steps, 24);
    }

    #[test]
    fn alg_conflicts_are_errors_naming_the_settings() {
        let alg = |a: Alg| SamplerSettings {
            alg: Some(a),
            ..Default::default()
        };
        for (s, names) in [
            (
                SamplerSettings {
                    remasking: Some(Remasking::Random),
                    ..alg(Alg::Entropy)
                },
                vec!["remasking=random", "alg=entropy"],
            ),
            (
                SamplerSettings {
                    threshold: Some(Some(0.9)),
                    ..alg(Alg::Origin)
                },
                vec!["alg=origin", "threshold=0.9"],
            ),
            (
                SamplerSettings {
                    alg_temp: Some(0.5),
                    ..alg(Alg::Origin)
                },
                vec!["alg_temp=0.5", "origin"],
            ),
            (
                SamplerSettings {
                    alg_temp: Some(0.5),
                    factor: Some(1.0),
                    ..alg(Alg::MaskgitPlus)
                },
                vec!["alg_temp=0.5", "factor=1"],
            ),
            (
                SamplerSettings {
                    alg_temp: Some(-1.0),
                    ..alg(Alg::MaskgitPlus)
                },
                vec!["alg_temp=-1"],
            ),
            (
                SamplerSettings {
                    eps: Some(0.0),
                    ..alg(Alg::MaskgitPlus)
                },
                vec!["eps=0"],
            ),
            (
                SamplerSettings {
                    eps: Some(1e-3),
                    ..Default::default()
                },
                vec!["eps=0.001", "needs alg"],
            ),
            (
                SamplerSettings {
                    alg_temp: Some(0.5),
                    ..Default::default()
                },
                vec!["alg_temp=0.5", "needs alg"],
            ),
            (
                SamplerSettings {
                    threshold: Some(Some(0.9)),
                    ..alg(Alg::Entropy)
                },
                vec!["remasking=entropy"],
            ),
            (
                SamplerSettings {
                    top_p: Some(0.0),
                    ..Default::default()
                },
                vec!["top_p=0"],
            ),
            (
                SamplerSettings {
                    top_k: Some(0),
                    ..Default::default()
                },
                vec!["top_k=0"],
            ),
        ] {
            let e = s
                .resolve(&SamplerConfig::default())
                .unwrap_err()
                .to_string();
            for n in names {
                assert!(e.contains(n), "{n} in {e}");
            }
        }
        // Dream's steps may outnumber the tokens, up to a bound
        let s = SamplerSettings {
            gen_length: Some(16),
            steps: Some(1000),
            ..alg(Alg::MaskgitPlus)
        };
        let e = s
            .resolve(&SamplerConfig::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps=1000") && e.contains("256"), "{e}");
        // infilling's whole-region block (0) is kept
        let infill = SamplerConfig {
            block_length: 0,
            ..Default::default()
        };
        assert_eq!(alg(Alg::Entropy).merge(&infill).unwrap().block_length, 0);
        // the JSON spelling of the server
        let s =
            SamplerSettings::from_json(&json!({"alg": "topk_margin", "alg_temp": 0.3, "top_k": 4}))
                .unwrap();
        assert_eq!(
            (s.alg, s.alg_temp, s.top_k),
            (Some(Alg::TopkMargin), Some(0.3), Some(4))
        );
        let e = SamplerSettings::from_json(&json!({"alg": "greedy"})).unwrap_err();
        assert_eq!(name_of(e), "alg");
    }

    #[test]
    fn json_types_and_choices_are_checked_naming_the_key() {
        let s = SamplerSettings::from_json(&json!({
            "steps": 8, "remasking": "random", "cache": "prefix", "threshold": null,
            "early_stop": false, "prompt": "other keys are ignored", "max_tokens": 5
        }))
        .unwrap();
        assert_eq!(
            s,
            SamplerSettings {
                steps: Some(8),
                remasking: Some(Remasking::Random),
                cache: Some(CacheMode::Prefix),
                threshold: Some(None),
                early_stop: Some(false),
                ..Default::default()
            }
        );
        for (v, field) in [
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"steps": -1}), "steps"),
            (json!({"steps": 2.5}), "steps"),
            (json!({"steps": null}), "steps"),
            (json!({"cache": "quad"}), "cache"),
            (json!({"remasking": "lowest"}), "remasking"),
            (json!({"early_stop": "yes", "steps": 4}), "early_stop"),
            (json!({"threshold": "high"}), "threshold"),
        ] {
            let e = SamplerSettings::from_json(&v).unwrap_err();
            assert_eq!(name_of(e), field, "{v}");
        }
    }

    #[test]
    fn serde_and_clap_spell_the_choices_alike() {
        use clap::ValueEnum;
        for m in CacheMode::value_variants() {
            let name = m.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(serde_json::to_value(m).unwrap(), json!(name));
            assert_eq!(name.parse::<CacheMode>().unwrap(), *m);
            assert_eq!(m.to_string(), name);
        }
        for r in Remasking::value_variants() {
            let name = r.to_possible_value().unwrap().get_name().to_string();
            assert_eq!(serde_json::to_value(r).unwrap(), json!(name));
            assert_eq!(name.parse::<Remasking>().unwrap(), *r);
            assert_eq!(r.to_string(), name);
        }
        assert_eq!(Remasking::LowConfidence.to_string(), "low_confidence");
    }
}
