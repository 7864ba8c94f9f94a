//! Left-to-right sampling for the autoregressive twin (a model whose config says
//! `causal_attention: true`): one token per forward, the next-token distribution read at the last
//! position. Used to compare the reverse process with classic decoding on equal terms.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor};

use super::{gumbel, Generation, MaskPredictor, StepEvent};
use crate::error::{Error, Result};
use crate::rng::Rng;
use crate::tokenizer::SpecialTokens;

/// Generates up to `max_new` tokens after `prompt`, greedy at temperature 0 (else a Gumbel-max
/// sample in f64), stopping after EOS/EOT when `stop_at_eos`.
#[allow(clippy::too_many_arguments)]
pub fn generate_ar(
    model: &mut dyn MaskPredictor,
    prompt: &[u32],
    max_new: usize,
    temperature: f64,
    stop_at_eos: bool,
    special: &SpecialTokens,
    rng: &mut Rng,
    on_step: &mut dyn FnMut(&StepEvent) -> ControlFlow<()>,
) -> Result<Generation> {
    if prompt.is_empty() {
        return Err(Error::setting(
            "prompt",
            "empty",
            "needs at least one token",
        ));
    }
    if max_new == 0 {
        return Err(Error::setting("gen_length", 0, "must be at least 1"));
    }
    if !temperature.is_finite() || temperature < 0.0 {
        return Err(Error::setting(
            "temperature",
            temperature,
            "must be a finite number >= 0",
        ));
    }
    super::prompt::check_length(prompt.len(), max_new, model.max_sequence_length())?;
    let device = model.device();
    let mut x = prompt.to_vec();
    let mut nfe = 0;
    let mut unmask = Vec::new();
    for step in 0..max_new {
        let l = x.len();
        let t = Tensor::from_slice(&x, (1, l), &device)?;
        let logits = model.logits(&t, None, l - 1..l)?; // [1, 1, V]
        nfe += 1;
        let row: Vec<f32> = logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let next = if temperature == 0.0 {
            gumbel::argmax(&row, None)
        } else {
            gumbel::sample(&row, temperature, None, rng)
        };
        x.push(next);
        unmask.push(Some(step));
        let answer = &x[prompt.len()..];
        let committed = [vec![super::Committed {
            index: answer.len() - 1,
            token: next,
            confidence: 1.0,
        }]];
        let event = StepEvent {
            block: 0,
            step_in_block: step,
            step,
            total_steps: max_new,
            canvas: vec![answer],
            committed: &committed,
            nfe,
            mask_id: special.mask,
        };
        if on_step(&event).is_break() {
            return Err(Error::Cancelled);
        }
        if stop_at_eos && special.ends_answer(next) {
            break;
        }
    }
    let generated = x[prompt.len()..].to_vec();
    Ok(Generation {
        output_ids: vec![x],
        generated_ids: vec![generated],
        unmask_step: vec![unmask],
        nfe,
        steps: nfe,
    })
}
