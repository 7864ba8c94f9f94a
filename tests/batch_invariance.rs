//! Batch invariance: a prompt gets the same answer (greedy) and the same score whatever else is in
//! its batch, on the CPU path: a left-padded batch of eight prompts of different lengths decodes
//! each row exactly as alone, with the reference sampler and with the fast one (threshold, dual
//! cache, early stop); and scores do not depend on what was scored before.

mod common;

use llada::candle_core::{DType, Device};
use llada::sampler::{self, Preset, PromptBatch, SamplerConfig};
use llada::score::{self, ScoreConfig};
use llada::{Checkpoint, Message, Rng};

const QUESTIONS: [&str; 8] = [
    "Ruth lives in Hebron and keeps 10 horses. What does Ruth keep?",
    "What is 28 + 17?",
    "Reverse the list: bread, water.",
    "Where does Abel live? Abel lives in Bethel and keeps 7 sheep.",
    "Copy the list: apple, river, stone, fire.",
    "What is 9 - 4?",
    "Hi",
    "Continue: The LORD is my shepherd",
];

fn shipped() -> Checkpoint {
    Checkpoint::load(&llada::hub::shipped_model(), Some(DType::F32), &Device::Cpu).unwrap()
}

fn prompts(ck: &Checkpoint) -> Vec<Vec<u32>> {
    let tok = ck.tokenizer().unwrap();
    QUESTIONS
        .iter()
        .map(|q| tok.encode_chat(&[Message::user(*q)]).unwrap())
        .collect()
}

fn run(ck: &Checkpoint, batch: &PromptBatch, cfg: &SamplerConfig) -> Vec<Vec<u32>> {
    let mut m = ck.model.predictor();
    sampler::generate(
        &mut m,
        batch,
        cfg,
        &ck.special,
        &mut Rng::new(0),
        &mut sampler::no_progress,
    )
    .unwrap()
    .generated_ids
}

/// The claim is for the portable path (`LLADA_NO_AVX512=1` on AVX-512 CPUs; CI runs this file so
/// too): the AVX-512 kernels' vectorised sums may round a left-shifted row differently.
fn portable_path() -> bool {
    let portable = !llada::kernels::gemm::cpu_features().avx512f;
    if !portable {
        eprintln!("batch invariance is claimed on the portable path: run with LLADA_NO_AVX512=1");
    }
    portable
}

fn check_rows_as_alone(cfg: &SamplerConfig, what: &str) {
    if !portable_path() {
        return;
    }
    let ck = shipped();
    let ps = prompts(&ck);
    assert!(ps.iter().any(|p| p.len() != ps[0].len()), "lengths differ");
    let batched = run(&ck, &PromptBatch::left_padded(&ps, ck.special.pad), cfg);
    for (i, p) in ps.iter().enumerate() {
        let alone = run(&ck, &PromptBatch::single(p.clone()), cfg);
        assert_eq!(
            batched[i], alone[0],
            "{what}: row {i} ({:?}) differs in a batch of 8",
            QUESTIONS[i]
        );
    }
}

#[test]
fn greedy_answers_do_not_depend_on_the_batch_reference_sampler() {
    let cfg = Preset::Reference.apply(
        SamplerConfig {
            gen_length: 32,
            steps: 32,
            block_length: 32,
            ..Default::default()
        },
        true,
    );
    check_rows_as_alone(&cfg, "reference");
}

#[test]
fn greedy_answers_do_not_depend_on_the_batch_fast_sampler() {
    let cfg = Preset::Fast.apply(SamplerConfig::default(), true);
    check_rows_as_alone(&cfg, "fast");
}

/// A score is a function of its pair and seed: scoring other pairs first changes nothing.
#[test]
fn scores_do_not_depend_on_what_came_before() {
    let ck = shipped();
    let tok = ck.tokenizer().unwrap();
    let cfg = ScoreConfig {
        mc_num: 16,
        batch: 8,
        cfg_scale: 0.0,
    };
    let pair = score::choice::encode_pair(tok, "What is 2 + 3?", " 2 + 3 = 5.").unwrap();
    let other = score::choice::encode_pair(tok, "Hi", " Hello there, friend.").unwrap();
    let mut m = ck.model.predictor();
    let alone = score::log_likelihood(
        &mut m,
        &pair.0,
        &pair.1,
        &cfg,
        ck.special.mask,
        &mut Rng::new(3),
    )
    .unwrap();
    let _ = score::log_likelihood(
        &mut m,
        &other.0,
        &other.1,
        &cfg,
        ck.special.mask,
        &mut Rng::new(3),
    )
    .unwrap();
    let after = score::log_likelihood(
        &mut m,
        &pair.0,
        &pair.1,
        &cfg,
        ck.special.mask,
        &mut Rng::new(3),
    )
    .unwrap();
    assert_eq!(
        alone.log_likelihood.to_bits(),
        after.log_likelihood.to_bits()
    );
}

/// A one-token candidate scores the same alone (`/v1/score`, the estimator's exact path) as in a
/// candidate set (`llada eval`'s one forward pass for all of them), to the bit: lm-eval through
/// the server and `llada eval` agree exactly.
#[test]
fn a_candidate_scores_the_same_alone_and_in_its_set() {
    let ck = shipped();
    let tok = ck.tokenizer().unwrap();
    let prompt = tok
        .encode("Ruth lives in Hebron and keeps 10 horses. Ruth keeps")
        .unwrap();
    let cands: Vec<u32> = [" horses", " sheep", " goats"]
        .iter()
        .map(|w| tok.encode(w).unwrap()[0])
        .collect();
    for cfg_scale in [0.0, 0.5] {
        let mut m = ck.model.predictor();
        let set =
            score::single_token_candidates(&mut m, &prompt, &cands, cfg_scale, ck.special.mask)
                .unwrap();
        let cfg = ScoreConfig {
            mc_num: 1,
            batch: 1,
            cfg_scale,
        };
        for (c, s) in cands.iter().zip(&set) {
            let alone = score::log_likelihood(
                &mut m,
                &prompt,
                &[*c],
                &cfg,
                ck.special.mask,
                &mut Rng::new(0),
            )
            .unwrap();
            assert_eq!(
                alone.log_likelihood.to_bits(),
                s.to_bits(),
                "cfg {cfg_scale}: token {c}"
            );
        }
    }
}
