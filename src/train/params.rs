//! The trainable form of a model: every tensor a `Var` (f32), the model built on them.

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::{Llada, Model};

/// A model whose tensors are trainable variables.
pub struct Trainable {
    pub model: Llada,
    /// (checkpoint name, variable), in [`crate::model::tensor_specs`] order.
    pub vars: Vec<(String, Var)>,
    /// A row that gets no gradient (LLaDA-MoE's `padding_idx` embedding row): (variable, row).
    frozen_row: Option<(usize, usize)>,
}

impl Trainable {
    /// Variables (f32, on the model's device) initialised from `m`'s tensors (the trainer
    /// implements LLaDA-8B's architecture).
    pub fn from_model(m: &Model) -> Result<Self> {
        Self::from_llada(m.as_llada()?)
    }

    /// Variables (f32, on the model's device) initialised from a LLaDA-8B model's tensors.
    pub fn from_llada(m: &Llada) -> Result<Self> {
        let mut vars = Vec::new();
        let mut map = std::collections::HashMap::new();
        for (name, t) in m.named_tensors()? {
            let v = Var::from_tensor(&t.to_device(m.device())?.to_dtype(DType::F32)?)?;
            map.insert(name.clone(), v.as_tensor().clone());
            vars.push((name, v));
        }
        let model = Llada::load(m.config(), &map)?;
        let frozen_row = crate::model::llada_moe::padding_row(m.config())
            .and_then(|(name, row)| vars.iter().position(|(n, _)| *n == name).map(|i| (i, row)));
        Ok(Trainable {
            model,
            vars,
            frozen_row,
        })
    }

    /// Backpropagates `loss` and returns each variable's gradient (zeros where none flowed).
    /// LLaDA-MoE's padding embedding row (`padding_idx`) gets none, as in the official model.
    pub fn gradients(&self, loss: &Tensor) -> Result<Vec<Tensor>> {
        let store = loss.backward()?;
        let mut grads = self
            .vars
            .iter()
            .map(|(name, v)| match store.get(v.as_tensor()) {
                Some(g) => Ok(g.clone()),
                None => {
                    tracing::debug!("no gradient reached {name}");
                    Ok(v.as_tensor().zeros_like()?)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some((i, row)) = self.frozen_row {
            grads[i] = crate::model::llada_moe::zero_row(&grads[i], row)?;
        }
        Ok(grads)
    }

    /// The variable of a checkpoint name.
    pub fn var(&self, name: &str) -> Result<&Var> {
        self.vars
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .ok_or_else(|| Error::MissingTensor {
                name: name.into(),
                path: "<trainable model>".into(),
            })
    }

    /// Number of trainable scalars.
    pub fn parameter_count(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }
}
