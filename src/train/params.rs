//! The trainable form of a model: every tensor a `Var` (f32), the model built on them.

use std::collections::HashMap;

use candle_core::{DType, Tensor, TensorId, Var};

use crate::error::{Error, Result};
use crate::model::lora::{peft_name, LoraSettings};
use crate::model::{Llada, Model};
use crate::rng::Rng;

/// A model whose tensors are trainable variables: every tensor (full training), or only the
/// low-rank factors of a LoRA adapter over frozen base weights.
pub struct Trainable {
    pub model: Llada,
    /// (name, variable): checkpoint names in [`crate::model::tensor_specs`] order; with LoRA,
    /// PEFT's names of the factors (A then B of each adapted weight, block by block).
    pub vars: Vec<(String, Var)>,
    /// A row that gets no gradient (LLaDA-MoE's `padding_idx` embedding row): (variable, row).
    frozen_row: Option<(usize, usize)>,
    /// With LoRA: the settings and, per adapted weight, its checkpoint name and the indices of
    /// its A and B in `vars`.
    pub lora: Option<(LoraSettings, Vec<LoraIndex>)>,
}

/// An adapted weight's checkpoint name and the indices of its A and B in [`Trainable::vars`].
pub type LoraIndex = (String, usize, usize);

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
            lora: None,
        })
    }

    /// LoRA over `m`: its weights frozen and held in `base_dtype` (f32, or bf16 for mixed
    /// precision), an update s·B·A on each target of every block, with PEFT's initialisation:
    /// A ~ U(−1/√in, 1/√in) (Kaiming-uniform with a = √5), B = 0, so the adapted model starts
    /// as the base model. A and B (f32) are the only variables.
    pub fn with_lora(m: &Llada, s: &LoraSettings, base_dtype: DType, seed: u64) -> Result<Self> {
        s.validate()?;
        let mut map = HashMap::new();
        // the linear maps in base_dtype; the embedding and norms (read by the residual stream,
        // which stays f32) in f32
        let wte = crate::model::llada::PREFIX.to_string() + ".wte.weight";
        for (name, t) in m.named_tensors()? {
            let dt = if t.rank() == 2 && name != wte {
                base_dtype
            } else {
                DType::F32
            };
            map.insert(name, t.to_device(m.device())?.to_dtype(dt)?);
        }
        let names: std::collections::HashSet<String> = map.keys().cloned().collect();
        let mut model = Llada::load(m.config(), &map)?;
        drop(map);
        let mut rng = Rng::new(seed ^ 0x104A_5EED);
        let mut vars = Vec::new();
        let mut updates = Vec::new();
        let device = m.device().clone();
        for (i, block) in model.blocks.iter_mut().enumerate() {
            for part in &s.targets {
                let weight = crate::model::llada::block_weight_name(i, part);
                if !names.contains(&weight) {
                    return Err(Error::setting(
                        "lora",
                        format!("{:?}", m.config().architecture),
                        format!("LoRA is implemented for LLaDA-8B's architecture (LLaDAModelLM, weights named model.transformer.blocks.N.*); this model has no {weight}"),
                    ));
                }
                let Some(lin) = block.linear_mut(part) else {
                    return Err(Error::setting(
                        "lora targets",
                        part,
                        "this model's feed-forward part is a mixture of experts: LoRA targets its attention projections (q_proj,k_proj,v_proj,attn_out) only",
                    ));
                };
                let (out, inp) = lin.dims();
                let bound = 1.0 / (inp as f64).sqrt();
                let a: Vec<f32> = (0..s.rank * inp)
                    .map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                let a = Var::from_tensor(&Tensor::from_vec(a, (s.rank, inp), &device)?)?;
                let b = Var::from_tensor(&Tensor::zeros((out, s.rank), DType::F32, &device)?)?;
                *lin =
                    lin.clone()
                        .with_lora(a.as_tensor().clone(), b.as_tensor().clone(), s.scale());
                updates.push((weight.clone(), vars.len(), vars.len() + 1));
                vars.push((peft_name(&weight, "A"), a));
                vars.push((peft_name(&weight, "B"), b));
            }
        }
        Ok(Trainable {
            model,
            vars,
            frozen_row: None,
            lora: Some((s.clone(), updates)),
        })
    }

    /// The adapter's factors: (adapted weight, A, B).
    pub fn lora_updates(&self) -> Vec<(String, Tensor, Tensor)> {
        let Some((_, ups)) = &self.lora else {
            return Vec::new();
        };
        ups.iter()
            .map(|(w, a, b)| {
                (
                    w.clone(),
                    self.vars[*a].1.as_tensor().clone(),
                    self.vars[*b].1.as_tensor().clone(),
                )
            })
            .collect()
    }

    /// The variables' tensor ids, in `vars` order.
    pub fn var_ids(&self) -> Vec<TensorId> {
        self.vars.iter().map(|(_, v)| v.as_tensor().id()).collect()
    }

    /// Each variable's gradient from a map of gradients by tensor id (activation
    /// checkpointing), zeros where none flowed; the frozen row as in [`Trainable::gradients`].
    pub fn gradients_from(&self, map: &HashMap<TensorId, Tensor>) -> Result<Vec<Tensor>> {
        let mut grads = self
            .vars
            .iter()
            .map(|(_, v)| match map.get(&v.as_tensor().id()) {
                Some(g) => Ok(g.clone()),
                None => Ok(v.as_tensor().zeros_like()?),
            })
            .collect::<Result<Vec<_>>>()?;
        if let Some((i, row)) = self.frozen_row {
            grads[i] = crate::model::llada_moe::zero_row(&grads[i], row)?;
        }
        Ok(grads)
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
