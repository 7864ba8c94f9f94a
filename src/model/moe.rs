//! A sparse mixture-of-experts feed-forward layer (LLaDA-MoE's `LLaDAMoESparseMoeBlock`): a
//! router (`gate`, no bias) scores every expert per token, softmax in f32, the `top_k` best are
//! kept **without renormalising their weights** (the official block hard-codes
//! `norm_topk_prob = False`), and the token's output is the weighted sum of those experts'
//! SwiGLU outputs (plus a shared expert's, if the model has one).
//!
//! Inference is grouped by expert: a denoising step routes every token of the window at once, so
//! the tokens of each expert are gathered and the expert runs as one matrix product over them
//! (its weights are read once per step, in the packed layout of the dense weights), then the
//! weighted outputs are added back per token in expert order, as the official `index_add_` loop.
//! Training uses the same grouping with differentiable ops, and returns the router logits for the
//! load-balancing loss ([`load_balancing_loss`]).

use candle_core::{DType, Device, Result, Tensor, D};

use super::layers::{Linear, Mlp};
pub use crate::config::Router;

/// The feed-forward part of a block: a dense SwiGLU, or a mixture of experts.
#[derive(Debug, Clone)]
pub enum Ffn {
    Dense(Mlp),
    Moe(SparseMoe),
}

impl Ffn {
    /// res + ffn(x) (inference).
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        match self {
            Ffn::Dense(m) => m.forward_add(x, res),
            Ffn::Moe(m) => m.forward_add(x, res),
        }
    }

    /// ffn(x) made of differentiable ops (training), with a mixture's router logits [N, E].
    pub fn forward_diff(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Ffn::Dense(m) => Ok((m.forward_diff(x)?, None)),
            Ffn::Moe(m) => {
                let (y, logits) = m.forward_diff(x)?;
                Ok((y, Some(logits)))
            }
        }
    }
}

/// The mixture-of-experts layer of one block.
#[derive(Debug, Clone)]
pub struct SparseMoe {
    /// The router [E, D].
    pub gate: Linear,
    pub experts: Vec<Mlp>,
    /// A shared expert every token also goes through (`shared_expert_intermediate_size`).
    pub shared: Option<Mlp>,
    /// A per-expert bias [E] (f32) added to the probabilities before top-k; the biased values
    /// weight the experts (`moe_router_enable_expert_bias`).
    pub expert_bias: Option<Vec<f32>>,
    pub top_k: usize,
    /// How the logits become experts and weights (LLaDA-MoE's softmax, LLaDA2's grouped sigmoid).
    pub router: Router,
}

/// The experts chosen for each of N tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    /// [N][k]: expert indices, in descending probability (as `torch.topk`; ties: lower index
    /// first).
    pub experts: Vec<Vec<u32>>,
    /// [N][k]: the weights of those experts (softmax probabilities, not renormalised).
    pub weights: Vec<Vec<f32>>,
}

/// Softmax over each row of `logits` ([N·E] row-major), in f32, as `F.softmax(dtype=float)`.
fn softmax_rows(logits: &mut [f32], e: usize) {
    for row in logits.chunks_mut(e) {
        let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        for x in row.iter_mut() {
            *x /= sum;
        }
    }
}

/// The `k` largest entries of `p` (indices, values), descending; ties go to the lower index. A
/// total order (NaN above every number, as `torch.topk` ranks it), so no input can break the sort.
fn top_k(p: &[f32], k: usize) -> (Vec<u32>, Vec<f32>) {
    let mut idx: Vec<u32> = (0..p.len() as u32).collect();
    idx.sort_by(|&a, &b| p[b as usize].total_cmp(&p[a as usize]).then(a.cmp(&b)));
    idx.truncate(k);
    let vals = idx.iter().map(|&i| p[i as usize]).collect();
    (idx, vals)
}

/// LLaDA2's group-limited sigmoid routing of one token's logits `row` [E] (see
/// [`Router::SigmoidGrouped`]): experts and weights, in descending biased score.
fn route_grouped(
    row: &[f32],
    bias: &[f32],
    n_group: usize,
    topk_group: usize,
    k: usize,
    scaling: f64,
) -> (Vec<u32>, Vec<f32>) {
    let e = row.len();
    let s: Vec<f32> = row.iter().map(|&x| 1.0 / (1.0 + (-x).exp())).collect();
    let mut biased: Vec<f32> = s.iter().zip(bias).map(|(a, b)| a + b).collect();
    let per = e / n_group;
    // a group's score: the sum of its two best biased scores
    let group_scores: Vec<f32> = biased
        .chunks(per)
        .map(|g| {
            let (_, v) = top_k(g, 2);
            v.iter().sum()
        })
        .collect();
    let (kept, _) = top_k(&group_scores, topk_group);
    for (g, chunk) in biased.chunks_mut(per).enumerate() {
        if !kept.contains(&(g as u32)) {
            chunk.fill(f32::NEG_INFINITY);
        }
    }
    let (idx, _) = top_k(&biased, k);
    let mut w: Vec<f32> = idx.iter().map(|&i| s[i as usize]).collect();
    if k > 1 {
        let sum: f32 = w.iter().sum::<f32>() + 1e-20;
        for x in w.iter_mut() {
            *x /= sum;
        }
    }
    for x in w.iter_mut() {
        *x *= scaling as f32;
    }
    (idx, w)
}

/// The pairs (token, expert slot) of a routing grouped by expert: `tokens` lists the token of
/// each pair in expert order (tokens increasing within an expert), `weights` its weight,
/// `counts[e]` how many pairs expert `e` has.
struct Groups {
    tokens: Vec<u32>,
    weights: Vec<f32>,
    counts: Vec<usize>,
}

impl Routing {
    fn groups(&self, num_experts: usize) -> Groups {
        let mut per: Vec<Vec<(u32, f32)>> = vec![Vec::new(); num_experts];
        for (t, (es, ws)) in self.experts.iter().zip(&self.weights).enumerate() {
            for (&e, &w) in es.iter().zip(ws) {
                per[e as usize].push((t as u32, w));
            }
        }
        let counts = per.iter().map(Vec::len).collect();
        let (tokens, weights) = per.into_iter().flatten().unzip();
        Groups {
            tokens,
            weights,
            counts,
        }
    }
}

impl SparseMoe {
    /// Number of experts.
    pub fn num_experts(&self) -> usize {
        self.experts.len()
    }

    /// Router logits [N, E] in f32 of `x` [N, D].
    fn router_logits(&self, x: &Tensor) -> Result<Tensor> {
        self.gate.forward_f32(x)?.to_dtype(DType::F32)
    }

    /// The routing of router logits [N, E] (f32), by the model's [`Router`].
    pub fn route_logits(&self, logits: &Tensor) -> Result<Routing> {
        let (n, e) = logits.dims2()?;
        let mut p = logits.flatten_all()?.to_vec1::<f32>()?;
        if let Router::SigmoidGrouped {
            n_group,
            topk_group,
            scaling,
        } = self.router
        {
            let zero = vec![0f32; e];
            let bias = self.expert_bias.as_deref().unwrap_or(&zero);
            let (mut experts, mut weights) = (Vec::with_capacity(n), Vec::with_capacity(n));
            for row in p.chunks(e) {
                let (i, w) = route_grouped(row, bias, n_group, topk_group, self.top_k, scaling);
                experts.push(i);
                weights.push(w);
            }
            return Ok(Routing { experts, weights });
        }
        softmax_rows(&mut p, e);
        if let Some(bias) = &self.expert_bias {
            for row in p.chunks_mut(e) {
                for (x, b) in row.iter_mut().zip(bias) {
                    *x += b;
                }
            }
        }
        let (mut experts, mut weights) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for row in p.chunks(e) {
            let (i, v) = top_k(row, self.top_k);
            experts.push(i);
            weights.push(v);
        }
        Ok(Routing { experts, weights })
    }

    /// The experts each token of `x` [N, D] goes to.
    pub fn route(&self, x: &Tensor) -> Result<Routing> {
        self.route_logits(&self.router_logits(x)?)
    }

    /// Σ over each token's routed experts of weight × expert(x), for `x` [N, D], grouped by
    /// expert: the tokens of each expert gathered (one `index_select`), each expert one product
    /// over its tokens, the weighted outputs added back per token in expert order (one
    /// `index_add`, as the official loop). `w` [N·k, 1] holds the pairs' weights in `g`'s order;
    /// they are cast to the hidden dtype before the product, as the official block does. With
    /// `diff`, differentiable ops only (training).
    fn combine(&self, x: &Tensor, g: &Groups, w: &Tensor, diff: bool) -> Result<Tensor> {
        let (n, d) = x.dims2()?;
        let dev = x.device();
        let idx = Tensor::from_slice(&g.tokens, g.tokens.len(), dev)?;
        let xs = x.index_select(&idx, 0)?; // [N·k, D], grouped by expert
        let mut outs = Vec::new();
        let mut at = 0;
        for (e, &c) in g.counts.iter().enumerate() {
            if c == 0 {
                continue;
            }
            let (xe, mlp) = (xs.narrow(0, at, c)?, &self.experts[e]);
            outs.push(if diff {
                mlp.forward_diff(&xe)?
            } else {
                mlp.forward(&xe)?
            });
            at += c;
        }
        let y = Tensor::cat(&outs, 0)?; // [N·k, D]
        let y = y.broadcast_mul(&w.to_dtype(y.dtype())?)?;
        Tensor::zeros((n, d), y.dtype(), dev)?.index_add(&idx, &y, 0)
    }

    /// res + moe(x) for `x` [N, D] (inference).
    pub fn forward_add(&self, x: &Tensor, res: &Tensor) -> Result<Tensor> {
        let g = self.route(x)?.groups(self.num_experts());
        let w = Tensor::from_slice(&g.weights, (g.weights.len(), 1), x.device())?;
        let mut out = self.combine(x, &g, &w, false)?;
        if let Some(s) = &self.shared {
            out = crate::kernels::add(&out, &s.forward(x)?)?;
        }
        crate::kernels::add(res, &out.to_dtype(res.dtype())?)
    }

    /// moe(x) made of differentiable ops (training), with the router logits [N, E] (f32) for the
    /// load-balancing loss. The routing itself (a top-k) carries no gradient; the weights do.
    pub fn forward_diff(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.gate.forward_diff(x)?.to_dtype(DType::F32)?; // [N, E]
        let routing = self.route_logits(&logits.detach())?;
        let g = routing.groups(self.num_experts());
        let dev = x.device();
        // the weights of the pairs, gathered from the differentiable probabilities
        let e = self.num_experts() as u32;
        let mut flat = Vec::with_capacity(g.tokens.len());
        let mut at = 0;
        for (ex, &c) in g.counts.iter().enumerate() {
            flat.extend(g.tokens[at..at + c].iter().map(|&t| t * e + ex as u32));
            at += c;
        }
        let w = match self.router {
            Router::Softmax => {
                let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
                let probs = match &self.expert_bias {
                    Some(b) => probs.broadcast_add(&Tensor::from_slice(b, b.len(), dev)?)?,
                    None => probs,
                };
                probs
                    .flatten_all()?
                    .index_select(&Tensor::from_slice(&flat, flat.len(), dev)?, 0)?
                    .reshape((flat.len(), 1))?
            }
            Router::SigmoidGrouped { scaling, .. } => {
                // unbiased sigmoid scores of each token's chosen experts, renormalised per
                // token, then put in the pairs' expert order
                let s = candle_nn::ops::sigmoid(&logits)?.flatten_all()?;
                let k = self.top_k;
                let token_major: Vec<u32> = routing
                    .experts
                    .iter()
                    .enumerate()
                    .flat_map(|(t, es)| es.iter().map(move |&x| t as u32 * e + x))
                    .collect();
                let n = routing.experts.len();
                let mut w = s
                    .index_select(&Tensor::from_slice(&token_major, n * k, dev)?, 0)?
                    .reshape((n, k))?;
                if k > 1 {
                    w = w.broadcast_div(&(w.sum_keepdim(1)? + 1e-20)?)?;
                }
                let w = (w * scaling)?.flatten_all()?;
                // pair (t, expert x) sits at token_major index t·k + slot
                let slot: Vec<u32> = flat
                    .iter()
                    .map(|&f| {
                        let (t, x) = (f / e, f % e);
                        let j = routing.experts[t as usize]
                            .iter()
                            .position(|&y| y == x)
                            .unwrap_or(0);
                        t * k as u32 + j as u32
                    })
                    .collect();
                w.index_select(&Tensor::from_slice(&slot, slot.len(), dev)?, 0)?
                    .reshape((slot.len(), 1))?
            }
        };
        let mut out = self.combine(x, &g, &w, true)?;
        if let Some(s) = &self.shared {
            out = (out + s.forward_diff(x)?)?;
        }
        Ok((out, logits))
    }

    /// The weighted expert outputs without the grouping (one expert at a time over every token,
    /// dense): the slow reference the grouped path is tested against.
    #[doc(hidden)]
    pub fn forward_ungrouped(&self, x: &Tensor) -> Result<Tensor> {
        let routing = self.route(x)?;
        let (n, d) = x.dims2()?;
        let mut acc = vec![0f32; n * d];
        for (ex, mlp) in self.experts.iter().enumerate() {
            let y = mlp
                .forward(x)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            for t in 0..n {
                if let Some(j) = routing.experts[t].iter().position(|&e| e as usize == ex) {
                    let w = routing.weights[t][j];
                    for c in 0..d {
                        acc[t * d + c] += w * y[t * d + c];
                    }
                }
            }
        }
        let mut out = Tensor::from_vec(acc, (n, d), &Device::Cpu)?;
        if let Some(s) = &self.shared {
            out = (out
                + s.forward(x)?
                    .to_dtype(DType::F32)?
                    .to_device(&Device::Cpu)?)?;
        }
        out.to_device(x.device())
    }
}

/// The Switch-Transformer load-balancing loss of the official code
/// (`load_balancing_loss_func`): over the router logits of every layer's tokens concatenated
/// ([N_total, E] f32), `E · Σ_{j<k, e} f[j, e] · P[e]`, where `f[j, e]` is the fraction of tokens
/// whose j-th choice is expert e and `P[e]` the mean router probability of e. A uniform router
/// gives exactly k. The gradient flows through `P` only (the choices are discrete).
pub fn load_balancing_loss(router_logits: &[Tensor], k: usize) -> Result<Tensor> {
    let logits = Tensor::cat(router_logits, 0)?; // [N, E]
    let (n, e) = logits.dims2()?;
    let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
    let p = probs.detach().flatten_all()?.to_vec1::<f32>()?;
    // f summed over the k slots: the counts of each expert among the tokens' choices / N
    let mut f = vec![0f32; e];
    for row in p.chunks(e) {
        let (idx, _) = top_k(row, k);
        for i in idx {
            f[i as usize] += 1.0;
        }
    }
    for x in f.iter_mut() {
        *x /= n as f32;
    }
    let f = Tensor::from_vec(f, (1, e), logits.device())?;
    let mean_p = probs.mean_keepdim(0)?; // [1, E]
    ((f * mean_p)?.sum_all()? * e as f64)?.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_is_descending_and_breaks_ties_by_index() {
        let (i, v) = top_k(&[0.1, 0.4, 0.1, 0.4], 3);
        assert_eq!(i, vec![1, 3, 0]);
        assert_eq!(v, vec![0.4, 0.4, 0.1]);
    }

    #[test]
    fn the_aux_loss_of_a_skewed_router_is_its_hand_computed_value() {
        // p = [0.5, 0.3, 0.2] and [0.1, 0.6, 0.3], top 2: {0, 1} and {1, 2}; the choice counts
        // over N = 2 tokens are f = [1/2, 1, 1/2], the mean probabilities P = [0.3, 0.45, 0.25]:
        // E · Σ f·P = 3 · (0.15 + 0.45 + 0.125) = 2.175
        let p = [0.5f32, 0.3, 0.2, 0.1, 0.6, 0.3];
        let logits: Vec<f32> = p.iter().map(|x| x.ln()).collect();
        let logits = Tensor::from_vec(logits, (2, 3), &Device::Cpu).unwrap();
        let l = load_balancing_loss(&[logits], 2)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 2.175).abs() < 1e-5, "{l}");
    }

    #[test]
    fn the_expert_bias_shifts_the_choice_and_is_the_weight() {
        use crate::model::layers::Linear;
        // two tokens, three experts; the bias makes expert 2 win for the first token
        let gate = Linear::dense(
            Tensor::from_vec(vec![1f32, 0., 0., 1., 0., 0.], (3, 2), &Device::Cpu).unwrap(),
        );
        let moe = SparseMoe {
            gate,
            experts: Vec::new(),
            shared: None,
            expert_bias: Some(vec![0.0, 0.0, 0.5]),
            top_k: 1,
            router: Router::Softmax,
        };
        let x = Tensor::from_vec(vec![2f32, 0., 0., 3.], (2, 2), &Device::Cpu).unwrap();
        let r = moe.route(&x).unwrap();
        // token 0: logits [2, 0, 0] → p ≈ [0.787, 0.107, 0.107], + bias → [0.787, 0.107, 0.607]
        let p0 = 2f32.exp() / (2f32.exp() + 2.0);
        assert_eq!(r.experts[0], vec![0]);
        assert!((r.weights[0][0] - p0).abs() < 1e-6);
        // token 1: logits [0, 3, 0] → p ≈ [0.045, 0.910, 0.045], + bias → [0.045, 0.910, 0.545]
        assert_eq!(r.experts[1], vec![1]);
        let moe = SparseMoe {
            expert_bias: Some(vec![0.0, 0.0, 0.7]),
            ..moe
        };
        let r = moe.route(&x).unwrap();
        // token 0 now: expert 2 (0.107 + 0.7 = 0.807 > 0.787), weighted by the biased value
        assert_eq!(r.experts[0], vec![2]);
        let q = 1.0 / (2f32.exp() + 2.0);
        assert!(
            (r.weights[0][0] - (q + 0.7)).abs() < 1e-6,
            "{:?}",
            r.weights
        );
    }

    /// LLaDA2's router by hand: groups by their two best biased scores, experts by biased score
    /// within the kept groups, weights the unbiased sigmoid scores renormalised and scaled.
    #[test]
    fn the_grouped_sigmoid_router_by_hand() {
        let sig = |x: f32| 1.0 / (1.0 + (-x).exp());
        // 4 experts in 2 groups; the bias lifts expert 3 so that group 1 wins (0.2+0.9+0.5 vs…)
        let row = [2.0f32, 1.5, 0.0, -1.0];
        let bias = [0.0f32, 0.0, 0.9, 1.5];
        let s: Vec<f32> = row.iter().map(|&x| sig(x)).collect();
        let g0 = s[0] + s[1];
        let g1 = (s[2] + 0.9) + (s[3] + 1.5);
        assert!(g1 > g0);
        let (idx, w) = route_grouped(&row, &bias, 2, 1, 2, 2.5);
        // within group 1: expert 3 (biased 0.269 + 1.5) before expert 2 (0.5 + 0.9)
        assert_eq!(idx, vec![3, 2]);
        let sum = s[3] + s[2] + 1e-20;
        assert!((w[0] - s[3] / sum * 2.5).abs() < 1e-6, "{w:?}");
        assert!((w[1] - s[2] / sum * 2.5).abs() < 1e-6, "{w:?}");
        // top-1: not renormalised, only scaled
        let (idx, w) = route_grouped(&row, &bias, 2, 1, 1, 2.5);
        assert_eq!((idx[0], (w[0] - s[3] * 2.5).abs() < 1e-6), (3, true));
    }

    /// The training form of LLaDA2's mixture (differentiable weights) computes what inference
    /// computes.
    #[test]
    fn the_grouped_router_trains_what_it_infers() {
        use crate::model::layers::Linear;
        let mut rng = crate::rng::Rng::new(3);
        let mut t = |r: usize, c: usize| {
            let v: Vec<f32> = (0..r * c).map(|_| rng.normal() as f32 * 0.5).collect();
            Tensor::from_vec(v, (r, c), &Device::Cpu).unwrap()
        };
        let (d, f, e) = (8, 6, 8);
        let mlp = |t: &mut dyn FnMut(usize, usize) -> Tensor| {
            Mlp::new(
                Linear::dense(t(f, d)),
                Linear::dense(t(f, d)),
                Linear::dense(t(d, f)),
            )
        };
        let experts: Vec<Mlp> = (0..e).map(|_| mlp(&mut t)).collect();
        let moe = SparseMoe {
            gate: Linear::dense(t(e, d)),
            experts,
            shared: Some(mlp(&mut t)),
            expert_bias: Some(vec![0.1, -0.2, 0.0, 0.3, 0.0, 0.05, -0.1, 0.2]),
            top_k: 3,
            router: Router::SigmoidGrouped {
                n_group: 4,
                topk_group: 2,
                scaling: 2.5,
            },
        };
        let x = t(5, d);
        let zero = Tensor::zeros((5, d), DType::F32, &Device::Cpu).unwrap();
        let inf = moe.forward_add(&x, &zero).unwrap();
        let (train, _) = moe.forward_diff(&x).unwrap();
        let diff = (inf - train)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-5, "{diff}");
    }

    #[test]
    fn top_k_never_panics_on_nan() {
        let (i, _) = top_k(&[0.1, f32::NAN, 0.5, f32::NAN], 2);
        assert_eq!(i, vec![1, 3]);
    }

    #[test]
    fn the_aux_loss_of_a_uniform_router_is_k() {
        // every probability 1/E: Σ_e f_e · (1/E) · E = Σ_e f_e = k, whatever the tie-breaking
        for (e, k) in [(8, 2), (64, 8), (4, 1)] {
            let logits = Tensor::zeros((37, e), DType::F32, &Device::Cpu).unwrap();
            let l = load_balancing_loss(&[logits.clone(), logits], k)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!((l - k as f32).abs() < 1e-5, "E={e} k={k}: {l}");
        }
        // a router that sends every token to the same experts with certainty: E·(k·1)·(1/k)…
        // here top-1 of 4 experts always expert 0 with p≈1: f = [1,0,0,0], P ≈ [1,0,0,0] → 4
        let mut v = vec![-30f32; 10 * 4];
        for r in 0..10 {
            v[r * 4] = 30.0;
        }
        let logits = Tensor::from_vec(v, (10, 4), &Device::Cpu).unwrap();
        let l = load_balancing_loss(&[logits], 1)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((l - 4.0).abs() < 1e-4, "{l}");
    }
}
