//! The engine: one thread that owns the model and runs jobs from a bounded queue. Handlers never
//! touch tensors; they send a [`Job`] carrying its own event channel and read the replies.
//! Greedy generation jobs with identical settings that are waiting together run as one batch
//! (one forward per step for all of them): of any prompt lengths, left-padded, where padding is
//! shown exact ([`Predictors::padding_is_exact`]: LLaDA, LLaDA-MoE with `mask_padding`, on the
//! CPU's portable path), else of one length (no padding); either way each result is exactly what
//! it would be alone. One-token answers to one prompt are scored together in one forward pass.

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use super::error::ApiError;
use crate::checkpoint::Checkpoint;
use crate::model::MaskPredictor;
use crate::rng::Rng;
use crate::sampler::{self, PromptBatch, SamplerConfig, StepEvent};
use crate::score::{self, ScoreConfig};
use crate::tokenizer::SpecialTokens;

/// What a job asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum JobKind {
    Generate {
        /// One or more prompts (token ids).
        prompts: Vec<Vec<u32>>,
        cfg: SamplerConfig,
        seed: u64,
        /// Send a [`Event::Step`] after every step.
        steps_wanted: bool,
    },
    Score {
        prompt: Vec<u32>,
        answer: Vec<u32>,
        cfg: ScoreConfig,
        seed: u64,
    },
}

/// One step of a generation, for one job.
#[derive(Debug, Clone)]
pub struct StepUpdate {
    pub step: usize,
    pub total_steps: usize,
    pub block: usize,
    pub nfe: usize,
    /// Answer canvas per prompt of the job (mask id where masked).
    pub canvas: Vec<Vec<u32>>,
    /// Positions committed this step, per prompt.
    pub committed: Vec<Vec<usize>>,
    pub elapsed: Duration,
}

/// The result of a job.
#[derive(Debug, Clone)]
pub enum Output {
    Generated {
        generated_ids: Vec<Vec<u32>>,
        nfe: usize,
        steps: usize,
        seconds: f64,
        /// Jobs that ran in the same batch (this one included).
        batch_size: usize,
    },
    /// The estimate, and the jobs that shared its forward passes (this one included).
    Scored(score::Estimate, usize),
}

/// What a job receives.
#[derive(Debug, Clone)]
pub enum Event {
    Step(StepUpdate),
    Done(Result<Output, ApiError>),
}

/// A request to the engine.
pub struct Job {
    pub kind: JobKind,
    pub events: UnboundedSender<Event>,
    pub cancel: Arc<AtomicBool>,
    pub deadline: Instant,
}

/// The handlers' side of the engine.
#[derive(Clone)]
pub struct EngineHandle {
    tx: SyncSender<Job>,
    waiting: Arc<AtomicUsize>,
    pub capacity: usize,
}

impl EngineHandle {
    /// Queues a job; a full queue is [`ApiError::Overloaded`].
    pub fn submit(&self, job: Job) -> Result<(), ApiError> {
        match self.tx.try_send(job) {
            Ok(()) => {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
            Err(TrySendError::Full(_)) => Err(ApiError::Overloaded),
            Err(TrySendError::Disconnected(_)) => Err(ApiError::Internal("the engine has stopped")),
        }
    }

    /// Jobs waiting in the queue.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Jobs that may wait; more are refused with 429.
    pub queue: usize,
    /// Most jobs in one batch.
    pub max_batch: usize,
    /// Called on the engine thread when it goes idle after work (no job waiting): the binary
    /// hands the allocator's freed pages back to the OS here, so a large request's memory does
    /// not stay with the process.
    pub on_idle: Option<fn()>,
}

impl EngineConfig {
    /// Checks the settings (each count at least 1), naming the option.
    pub fn validate(&self) -> crate::Result<()> {
        for (name, v) in [("queue", self.queue), ("max-batch", self.max_batch)] {
            if v == 0 {
                return Err(crate::Error::setting(name, v, "must be at least 1"));
            }
        }
        Ok(())
    }
}

/// What the engine runs jobs on: a fresh mask predictor for each job, and the special tokens.
/// A loaded [`Checkpoint`] is one; server tests use fake models.
pub trait Predictors: Send + 'static {
    /// A mask predictor for one job.
    fn predictor(&self) -> Box<dyn MaskPredictor + '_>;
    /// The special tokens (mask, padding, EOS).
    fn special(&self) -> &SpecialTokens;
    /// Whether a row of a left-padded batch decodes exactly as alone, so that greedy jobs of
    /// different prompt lengths may share a batch (`tests/batch_invariance.rs`). False unless
    /// known: then only prompts of one length batch together (no padding at all).
    fn padding_is_exact(&self) -> bool {
        false
    }
}

impl Predictors for Checkpoint {
    fn predictor(&self) -> Box<dyn MaskPredictor + '_> {
        self.model.predictor()
    }
    fn special(&self) -> &SpecialTokens {
        &self.special
    }
    /// LLaDA's and LLaDA-MoE's (with `mask_padding`) forward ignores padded keys and positions
    /// count from the row's first token; Dream's shifted outputs and LLaDA2's block-causal
    /// attention are left out (their rows run alone or with prompts of their length). Only on
    /// the CPU's portable path, where `tests/batch_invariance.rs` shows it: the AVX-512 kernels'
    /// vectorised softmax sums and a GPU's GEMMs may round a shifted row differently.
    fn padding_is_exact(&self) -> bool {
        let c = &self.config;
        let portable_cpu = matches!(self.model.predictor().device(), candle_core::Device::Cpu)
            && !crate::kernels::gemm::cpu_features().avx512f;
        portable_cpu
            && c.mask_padding
            && !c.logits_shift
            && matches!(
                c.architecture,
                crate::model::Architecture::Llada | crate::model::Architecture::LladaMoe
            )
    }
}

/// Starts the engine thread on `model` (a [`Checkpoint`], or any [`Predictors`]).
pub fn start(model: impl Predictors, cfg: EngineConfig) -> EngineHandle {
    let ck: Box<dyn Predictors> = Box::new(model);
    let (tx, rx) = sync_channel::<Job>(cfg.queue.max(1));
    let waiting = Arc::new(AtomicUsize::new(0));
    let w = waiting.clone();
    std::thread::Builder::new()
        .name("llada-engine".into())
        .spawn(move || run(ck, rx, w, cfg))
        .ok();
    EngineHandle {
        tx,
        waiting,
        capacity: cfg.queue.max(1),
    }
}

/// Whether two jobs can share a batch exactly: greedy generation, same settings, one prompt
/// each, of the same length unless left padding is exact for the model (`any_length`).
fn compatible(a: &JobKind, b: &JobKind, any_length: bool) -> bool {
    match (a, b) {
        (
            JobKind::Generate {
                prompts: pa,
                cfg: ca,
                ..
            },
            JobKind::Generate {
                prompts: pb,
                cfg: cb,
                ..
            },
        ) => {
            ca == cb
                && ca.temperature == 0.0
                && ca.remasking == sampler::Remasking::LowConfidence
                && pa.len() == 1
                && pb.len() == 1
                && (any_length || pa[0].len() == pb[0].len())
        }
        // one-token answers to one prompt: one forward pass scores them all, each exactly as
        // alone (the candidates of a multiple-choice question)
        (
            JobKind::Score {
                prompt: pa,
                answer: aa,
                cfg: ca,
                ..
            },
            JobKind::Score {
                prompt: pb,
                answer: ab,
                cfg: cb,
                ..
            },
        ) => aa.len() == 1 && ab.len() == 1 && pa == pb && ca.cfg_scale == cb.cfg_scale,
        _ => false,
    }
}

fn run(ck: Box<dyn Predictors>, rx: Receiver<Job>, waiting: Arc<AtomicUsize>, cfg: EngineConfig) {
    let mut pending: VecDeque<Job> = VecDeque::new();
    let any_length = ck.padding_is_exact();
    let mut worked = false;
    loop {
        let first = match pending.pop_front() {
            Some(j) => j,
            None => {
                let next = match rx.try_recv() {
                    Ok(j) => Ok(j),
                    Err(_) => {
                        if let (true, Some(f)) = (worked, cfg.on_idle) {
                            f();
                        }
                        worked = false;
                        rx.recv()
                    }
                };
                match next {
                    Ok(j) => {
                        waiting.fetch_sub(1, Ordering::SeqCst);
                        j
                    }
                    Err(_) => return,
                }
            }
        };
        let mut batch = vec![first];
        while batch.len() < cfg.max_batch {
            match rx.try_recv() {
                Ok(j) => {
                    waiting.fetch_sub(1, Ordering::SeqCst);
                    if compatible(&batch[0].kind, &j.kind, any_length) {
                        batch.push(j);
                    } else {
                        pending.push_back(j);
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        // drop jobs whose client is gone or whose time is up before starting them
        batch.retain(|j| {
            if j.cancel.load(Ordering::SeqCst) {
                return false;
            }
            if Instant::now() > j.deadline {
                let _ = j.events.send(Event::Done(Err(ApiError::Timeout)));
                return false;
            }
            true
        });
        if batch.is_empty() {
            continue;
        }
        worked = true;
        // a failure inside one job must not take the engine (and every later request) down
        let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match &batch[0].kind {
            JobKind::Score { .. } if batch.len() > 1 => run_score_set(&*ck, &batch),
            JobKind::Score { .. } => run_score(&*ck, &batch[0]),
            JobKind::Generate { .. } => run_generate(&*ck, &batch),
        }));
        if ran.is_err() {
            tracing::error!("a job panicked in the engine; it was answered with an error");
            for j in &batch {
                let _ = j.events.send(Event::Done(Err(ApiError::Internal(
                    "the engine failed on this request",
                ))));
            }
        }
    }
}

/// One-token answers to one prompt ([`compatible`]) in one forward pass.
fn run_score_set(ck: &dyn Predictors, jobs: &[Job]) {
    let JobKind::Score { prompt, cfg, .. } = &jobs[0].kind else {
        return;
    };
    let cands: Vec<u32> = jobs
        .iter()
        .filter_map(|j| match &j.kind {
            JobKind::Score { answer, .. } => answer.first().copied(),
            _ => None,
        })
        .collect();
    let mut m = ck.predictor();
    let r = score::single_token_estimates(&mut m, prompt, &cands, cfg.cfg_scale, ck.special().mask)
        .map_err(ApiError::from);
    for (k, j) in jobs.iter().enumerate() {
        let out = match &r {
            Ok(es) => Ok(Output::Scored(es[k].clone(), jobs.len())),
            Err(e) => Err(e.clone()),
        };
        let _ = j.events.send(Event::Done(out));
    }
}

fn run_score(ck: &dyn Predictors, job: &Job) {
    let JobKind::Score {
        prompt,
        answer,
        cfg,
        seed,
    } = &job.kind
    else {
        return;
    };
    let mut m = ck.predictor();
    // between mini-batches: stop for a client that went away or a deadline that passed
    let mut go_on = || {
        if job.cancel.load(Ordering::SeqCst) || Instant::now() > job.deadline {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let r = score::log_likelihood_until(
        &mut m,
        prompt,
        answer,
        cfg,
        ck.special().mask,
        &mut Rng::new(*seed),
        &mut go_on,
    );
    let out = match r {
        Err(crate::Error::Cancelled) if job.cancel.load(Ordering::SeqCst) => return,
        Err(crate::Error::Cancelled) => Err(ApiError::Timeout),
        r => r.map(|e| Output::Scored(e, 1)).map_err(ApiError::from),
    };
    let _ = job.events.send(Event::Done(out));
}

fn run_generate(ck: &dyn Predictors, jobs: &[Job]) {
    let JobKind::Generate { cfg, seed, .. } = &jobs[0].kind else {
        return;
    };
    // rows of each job in the batch
    let mut prompts = Vec::new();
    let mut spans = Vec::new();
    for j in jobs {
        if let JobKind::Generate { prompts: p, .. } = &j.kind {
            spans.push(prompts.len()..prompts.len() + p.len());
            prompts.extend(p.iter().cloned());
        }
    }
    let batch = PromptBatch::left_padded(&prompts, ck.special().pad);
    let t0 = Instant::now();
    let mut done = vec![false; jobs.len()];
    let mut on_step = |e: &StepEvent| {
        for (k, j) in jobs.iter().enumerate() {
            if done[k] {
                continue;
            }
            if j.cancel.load(Ordering::SeqCst) {
                done[k] = true;
                continue;
            }
            if Instant::now() > j.deadline {
                let _ = j.events.send(Event::Done(Err(ApiError::Timeout)));
                j.cancel.store(true, Ordering::SeqCst);
                done[k] = true;
                continue;
            }
            if let JobKind::Generate {
                steps_wanted: true, ..
            } = j.kind
            {
                let rows = spans[k].clone();
                let update = StepUpdate {
                    step: e.step,
                    total_steps: e.total_steps,
                    block: e.block,
                    nfe: e.nfe,
                    canvas: e.canvas[rows.clone()].iter().map(|r| r.to_vec()).collect(),
                    committed: e.committed[rows]
                        .iter()
                        .map(|c| c.iter().map(|x| x.index).collect())
                        .collect(),
                    elapsed: t0.elapsed(),
                };
                if j.events.send(Event::Step(update)).is_err() {
                    done[k] = true;
                }
            }
        }
        if done.iter().all(|&d| d) {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let mut m = ck.predictor();
    let r = sampler::generate(
        &mut m,
        &batch,
        cfg,
        ck.special(),
        &mut Rng::new(*seed),
        &mut on_step,
    );
    let seconds = t0.elapsed().as_secs_f64();
    let r = match r {
        Ok(g) => Ok(g),
        Err(crate::Error::Cancelled) => return,
        Err(e) => Err(ApiError::from(e)),
    };
    for (k, j) in jobs.iter().enumerate() {
        if j.cancel.load(Ordering::SeqCst) {
            continue;
        }
        let out = match &r {
            Ok(g) => Ok(Output::Generated {
                generated_ids: g.generated_ids[spans[k].clone()].to_vec(),
                nfe: g.nfe,
                steps: g.steps,
                seconds,
                batch_size: jobs.len(),
            }),
            Err(e) => Err(e.clone()),
        };
        let _ = j.events.send(Event::Done(out));
    }
}
