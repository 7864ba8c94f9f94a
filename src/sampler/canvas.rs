//! The canvas of one reverse process and the named steps the sampler's loop is made of: the rows
//! a step needs, committing predictions, and finishing rows (early stop). Samplers that differ in
//! their loop (LLaDA's, Fast-dLLM's, block diffusion's) reuse these.

use std::ops::Range;

use super::predict::Prediction;
use super::{Committed, Generation};
use crate::tokenizer::SpecialTokens;

/// Prompt + answer rows being denoised, with what was committed when.
pub(crate) struct Canvas {
    /// [B][L] token ids; masked positions hold the mask id.
    pub x: Vec<Vec<u32>>,
    /// Start of the answer region (positions before it are the prompt).
    pub p: usize,
    /// Positions not masked at the start (the prompt, including any unmasked infill context).
    pub is_prompt: Vec<Vec<bool>>,
    /// Global step at which each answer position was committed.
    unmask_step: Vec<Vec<Option<usize>>>,
    /// Rows whose answer is final (early stop): no longer predicted.
    finished: Vec<bool>,
    mask_id: u32,
}

impl Canvas {
    pub fn new(x: Vec<Vec<u32>>, p: usize, mask_id: u32) -> Self {
        let is_prompt = x
            .iter()
            .map(|r| r.iter().map(|&t| t != mask_id).collect())
            .collect();
        let (b, g) = (x.len(), x[0].len() - p);
        Canvas {
            x,
            p,
            is_prompt,
            unmask_step: vec![vec![None; g]; b],
            finished: vec![false; b],
            mask_id,
        }
    }

    /// Rows.
    pub fn batch(&self) -> usize {
        self.x.len()
    }

    /// Canvas length.
    pub fn len(&self) -> usize {
        self.x[0].len()
    }

    /// The answer region of every row.
    pub fn answers(&self) -> Vec<&[u32]> {
        self.x.iter().map(|r| &r[self.p..]).collect()
    }

    /// Masked positions of `block` in each row.
    pub fn masked_in(&self, block: Range<usize>) -> Vec<usize> {
        self.x
            .iter()
            .map(|r| {
                r[block.clone()]
                    .iter()
                    .filter(|&&t| t == self.mask_id)
                    .count()
            })
            .collect()
    }

    /// Which rows are still being denoised (not finished by an early stop).
    pub fn active(&self) -> Vec<bool> {
        self.finished.iter().map(|&f| !f).collect()
    }

    /// Whether an unfinished row still has a masked position in `block`.
    pub fn has_masks(&self, block: Range<usize>) -> bool {
        self.x
            .iter()
            .zip(&self.finished)
            .any(|(r, &f)| !f && r[block.clone()].contains(&self.mask_id))
    }

    /// The rows a step needs: per row, the masked positions of `window` (offsets from its start;
    /// none for finished rows), and their sorted union, the only logits read. When nothing is
    /// masked (a forward whose logits nobody reads, such as the cached loops' extra step) the
    /// union is the whole window.
    pub fn wanted(&self, window: &Range<usize>) -> (Vec<Vec<usize>>, Vec<usize>) {
        let wanted: Vec<Vec<usize>> = self
            .x
            .iter()
            .zip(&self.finished)
            .map(|(r, &f)| {
                if f {
                    return Vec::new();
                }
                window
                    .clone()
                    .filter(|&j| r[j] == self.mask_id)
                    .map(|j| j - window.start)
                    .collect()
            })
            .collect();
        let mut columns: Vec<usize> = wanted.iter().flatten().copied().collect();
        columns.sort_unstable();
        columns.dedup();
        if columns.is_empty() {
            columns = (0..window.len()).collect();
        }
        (wanted, columns)
    }

    /// Commits, in each row, the predictions `select(row, candidates)` chooses (window offsets;
    /// candidates are (offset, confidence)) at global step `step`; `window_start` is the offset
    /// origin of the predictions. Returns what each row committed, by answer index.
    pub fn commit(
        &mut self,
        preds: &[Vec<Prediction>],
        window_start: usize,
        mut select: impl FnMut(usize, &[(usize, f64)]) -> Vec<usize>,
        step: usize,
    ) -> Vec<Vec<Committed>> {
        let mut committed = Vec::with_capacity(preds.len());
        for (r, row_preds) in preds.iter().enumerate() {
            let cands: Vec<(usize, f64)> = row_preds
                .iter()
                .map(|pr| (pr.offset, pr.confidence))
                .collect();
            let mut done = Vec::new();
            for off in select(r, &cands) {
                let Some(pr) = row_preds.iter().find(|pr| pr.offset == off) else {
                    continue;
                };
                let pos = window_start + off;
                self.x[r][pos] = pr.token;
                let index = pos - self.p;
                if pr.token != self.mask_id {
                    self.unmask_step[r][index] = Some(step);
                }
                done.push(Committed {
                    index,
                    token: pr.token,
                    confidence: pr.confidence,
                });
            }
            done.sort_by_key(|c| c.index);
            committed.push(done);
        }
        committed
    }

    /// Early stop: marks the rows whose answer is final; true when every row's is.
    pub fn finish_rows(&mut self, special: &SpecialTokens) -> bool {
        for (r, f) in self.finished.iter_mut().enumerate() {
            *f = *f || special.answer_is_final(&self.x[r][self.p..]);
        }
        self.finished.iter().all(|&f| f)
    }

    /// The end of an early-stopped run: the rest of a finished answer is EOS padding.
    pub fn pad_finished(&mut self, eos: u32) {
        for (row, &f) in self.x.iter_mut().zip(&self.finished) {
            if f {
                for t in row[self.p..].iter_mut().filter(|t| **t == self.mask_id) {
                    *t = eos;
                }
            }
        }
    }

    pub fn into_generation(self, nfe: usize, steps: usize) -> Generation {
        Generation {
            generated_ids: self.x.iter().map(|r| r[self.p..].to_vec()).collect(),
            output_ids: self.x,
            unmask_step: self.unmask_step,
            nfe,
            steps,
        }
    }
}
