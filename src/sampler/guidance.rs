//! The guidance axis: unsupervised classifier-free guidance (reference §4.6). The unconditional
//! input masks every prompt position (BOS, template, user text and left padding: every position
//! that was not masked when generation started); logits combine as ℓ_u + (w + 1)(ℓ_c − ℓ_u).

use candle_core::{Result, Tensor};

/// Guidance of a sampler.
#[derive(Debug, Clone, Copy, PartialEq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Guidance {
    #[default]
    None,
    /// Unsupervised CFG with scale w > 0.
    Cfg { scale: f64 },
}

impl Guidance {
    /// `cfg_scale` as the reference takes it: guidance is active only when w > 0.
    pub fn from_scale(scale: f64) -> Self {
        if scale > 0.0 {
            Guidance::Cfg { scale }
        } else {
            Guidance::None
        }
    }

    /// Rows of the model's input for a canvas of `b` rows: `b`, or 2`b` with CFG.
    pub fn rows(&self, b: usize) -> usize {
        match self {
            Guidance::None => b,
            Guidance::Cfg { .. } => 2 * b,
        }
    }

    /// The model's input for canvas `x` [B][L], flattened: its rows, then with CFG their
    /// unconditional copies (every prompt position masked).
    pub fn input_rows(&self, x: &[Vec<u32>], is_prompt: &[Vec<bool>], mask_id: u32) -> Vec<u32> {
        let mut flat: Vec<u32> = x.concat();
        if let Guidance::Cfg { .. } = self {
            for (r, pr) in x.iter().zip(is_prompt) {
                flat.extend(unconditional(r, pr, mask_id));
            }
        }
        flat
    }

    /// The key-padding mask [B, L] of the canvas as the input's ([2B, L] with CFG).
    pub fn key_mask(&self, m: &Tensor) -> Result<Tensor> {
        match self {
            Guidance::None => Ok(m.clone()),
            Guidance::Cfg { .. } => Tensor::cat(&[m, m], 0),
        }
    }

    /// The guided logits [B, W, V] from the model's logits of the input rows ([B or 2B, W, V]).
    pub fn apply(&self, logits: &Tensor, b: usize) -> Result<Tensor> {
        match *self {
            Guidance::None => Ok(logits.clone()),
            Guidance::Cfg { scale } => {
                let cond = logits.narrow(0, 0, b)?;
                let unc = logits.narrow(0, b, b)?;
                combine(&cond, &unc, scale)
            }
        }
    }
}

/// The unconditional copy of a canvas row: prompt positions replaced by the mask id.
pub fn unconditional(row: &[u32], is_prompt: &[bool], mask_id: u32) -> Vec<u32> {
    row.iter()
        .zip(is_prompt)
        .map(|(&t, &p)| if p { mask_id } else { t })
        .collect()
}

/// ℓ_u + (w + 1)(ℓ_c − ℓ_u) = (1 + w)ℓ_c − wℓ_u, on logits of any shape.
pub fn combine(cond: &Tensor, uncond: &Tensor, scale: f64) -> Result<Tensor> {
    uncond + ((cond - uncond)? * (scale + 1.0))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn reference_example() {
        // w = 1, ℓ_c = 2, ℓ_u = 1 → 1 + 2·(2 − 1) = 3
        let c = Tensor::new(&[2f32], &Device::Cpu).unwrap();
        let u = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        assert_eq!(
            combine(&c, &u, 1.0).unwrap().to_vec1::<f32>().unwrap(),
            vec![3.0]
        );
    }

    #[test]
    fn masks_prompt_only() {
        assert_eq!(
            unconditional(&[1, 2, 9, 4], &[true, true, false, false], 9),
            vec![9, 9, 9, 4]
        );
    }
}
