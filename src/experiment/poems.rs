//! The paper's reversal poem protocol, run on any checkpoint (meaningful with LLaDA-8B-Instruct).

use std::path::Path;

use crate::checkpoint::Checkpoint;
use crate::error::Result;
use crate::rng::Rng;
use crate::sampler::{self, PromptBatch, SamplerConfig};
use crate::score::choice::Accuracy;

/// One line pair of the paper's poem set (`data/poem_data.json`).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Poem {
    pub first: String,
    pub second: String,
}

/// Settings of the paper's poem protocol (reference §8.2).
#[derive(Debug, Clone)]
pub struct PoemConfig {
    /// steps = gen_length = block_length (the reference's default 28).
    pub gen_length: usize,
    pub cfg_scale: f64,
    pub logits_eos_inf: bool,
}

impl Default for PoemConfig {
    fn default() -> Self {
        PoemConfig {
            gen_length: 28,
            cfg_scale: 0.0,
            logits_eos_inf: true,
        }
    }
}

/// Reads the poem set: a JSON list of `{"first", "second", "source"}`.
pub fn load_poems(path: &Path) -> Result<Vec<Poem>> {
    crate::error::read_json(path)
}

/// The paper's poem protocol: the Instruct template with one user message asking for the next
/// (forward) or previous (reversal) line, greedy generation with steps = gen_length =
/// block_length, and success iff the expected line occurs in the decoded answer.
pub fn poem_accuracy(
    ck: &Checkpoint,
    poems: &[Poem],
    reversal: bool,
    cfg: &PoemConfig,
    on_item: &mut dyn FnMut(usize, usize),
) -> Result<Accuracy> {
    let tok = ck.tokenizer()?;
    let sp = ck.special;
    let n = cfg.gen_length;
    let scfg = SamplerConfig {
        gen_length: n,
        steps: n,
        block_length: n,
        cfg_scale: cfg.cfg_scale,
        logits_eos_inf: cfg.logits_eos_inf,
        ..Default::default()
    };
    let mut correct = 0;
    for (i, p) in poems.iter().enumerate() {
        let (line, question, target) = if reversal {
            (&p.second, "的上一句是什么？", &p.first)
        } else {
            (&p.first, "的下一句是什么？", &p.second)
        };
        let prompt = format!("{line}{question} 直接输出句子即可。");
        let ids = tok.encode_chat(&[crate::chat::Message::user(prompt)])?;
        let mut m = ck.model.predictor();
        let g = sampler::generate(
            &mut m,
            &PromptBatch::single(ids),
            &scfg,
            &sp,
            &mut Rng::new(0),
            &mut sampler::no_progress,
        )?;
        let text = tok.decode(&g.generated_ids[0], true)?;
        correct += usize::from(text.contains(target.as_str()));
        on_item(i + 1, poems.len());
    }
    Ok(Accuracy::of(correct, poems.len()))
}
