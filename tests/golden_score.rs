//! Golden tests of the likelihood estimator: every case of `likelihood.json` — fixed masks give the
//! reference's per-row terms, per-token cross-entropies and result (1e-4 relative); the random
//! estimator lands within 3 standard errors of the reference's mean.

mod common;

use common::*;
use llada::candle_core::DType;
use llada::score::{self, ScoreConfig};
use llada::Rng;
use serde_json::Value;

fn close(a: f64, b: f64, rel: f64) -> bool {
    (a - b).abs() <= rel * b.abs().max(1e-6)
}

fn masks_of(case: &Value, lp: usize) -> Vec<Vec<Vec<bool>>> {
    case["batches"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            ids2(&b["is_mask"])
                .into_iter()
                .map(|row| row[lp..].iter().map(|&x| x == 1).collect())
                .collect()
        })
        .collect()
}

#[test]
fn fixed_masks_reproduce_reference_terms() {
    let Some(doc) = case_file("likelihood.json") else {
        return;
    };
    let ck = model(compute_dtype(&doc["meta"]));
    let mut ran = 0;
    for case in doc["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let prompt = ids1(&case["prompt_ids"]);
        let answer = ids1(&case["answer_ids"]);
        let mask_id = case["mask_id"]
            .as_u64()
            .map(|m| m as u32)
            .unwrap_or(ck.special.mask);
        // the prompt columns of the reference masks are never masked
        for b in case["batches"].as_array().unwrap() {
            for row in ids2(&b["is_mask"]) {
                assert!(
                    row[..prompt.len()].iter().all(|&x| x == 0),
                    "{name}: prompt masked"
                );
            }
        }
        let masks = masks_of(case, prompt.len());
        for (key, v) in case.as_object().unwrap() {
            let Some(cfg_scale) = v.get("cfg_scale").and_then(|c| c.as_f64()) else {
                continue;
            };
            if v.get("per_batch").is_none() {
                continue;
            }
            let mut m = ck.model.predictor();
            let est = score::log_likelihood_with_masks(
                &mut m, &prompt, &answer, &masks, cfg_scale, mask_id,
            )
            .unwrap();
            let per_batch = v["per_batch"].as_array().unwrap();
            assert_eq!(per_batch.len(), est.batches.len(), "{name} {key}");
            for (i, (ours, refb)) in est.batches.iter().zip(per_batch).enumerate() {
                let rt: Vec<f64> = refb["row_terms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap())
                    .collect();
                for (r, (a, b)) in ours.row_terms.iter().zip(&rt).enumerate() {
                    assert!(
                        close(*a, *b, 1e-4),
                        "{name} {key} batch {i} row {r}: {a} vs {b}"
                    );
                }
                for (r, (a, b)) in ours
                    .token_ce
                    .iter()
                    .zip(refb["token_ce"].as_array().unwrap())
                    .enumerate()
                {
                    let b: Vec<f64> = b
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|x| x.as_f64().unwrap())
                        .collect();
                    assert_eq!(
                        a.len(),
                        b.len(),
                        "{name} {key} batch {i} row {r}: masked count"
                    );
                    for (x, y) in a.iter().zip(&b) {
                        assert!(
                            (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                            "{name} {key} batch {i} row {r}: CE {x} vs {y}"
                        );
                    }
                }
                let bl = refb["batch_loss"].as_f64().unwrap();
                assert!(
                    close(ours.batch_loss, bl, 1e-4),
                    "{name} {key} batch {i}: {} vs {bl}",
                    ours.batch_loss
                );
            }
            let rv = v["returned_value"].as_f64().unwrap();
            assert!(
                close(est.log_likelihood, rv, 1e-4),
                "{name} {key}: {} vs {rv}",
                est.log_likelihood
            );
            ran += 1;
        }
    }
    assert!(ran > 0);
}

#[test]
fn random_estimator_agrees_with_reference_mean() {
    let Some(doc) = case_file("likelihood.json") else {
        return;
    };
    let ck = model(compute_dtype(&doc["meta"]));
    for case in doc["cases"].as_array().unwrap() {
        let Some(stats) = case.get("mc128_stats").filter(|s| !s.is_null()) else {
            continue;
        };
        let name = case["name"].as_str().unwrap();
        let prompt = ids1(&case["prompt_ids"]);
        let answer = ids1(&case["answer_ids"]);
        let mean = stats["mean"].as_f64().unwrap();
        let sd = stats["std_ddof1"].as_f64().unwrap(); // spread of one mc_num=128 estimate
        let cfg = ScoreConfig {
            mc_num: 128,
            batch: 16,
            cfg_scale: 0.0,
        };
        let mut m = ck.model.predictor();
        let est = score::log_likelihood(
            &mut m,
            &prompt,
            &answer,
            &cfg,
            ck.special.mask,
            &mut Rng::new(7),
        )
        .unwrap();
        assert!(
            (est.log_likelihood - mean).abs() <= 3.0 * sd,
            "{name}: {} vs {mean} ± {sd}",
            est.log_likelihood
        );
        // the estimator's own standard error is of the reference's spread's order
        assert!(
            est.stderr > 0.2 * sd && est.stderr < 5.0 * sd,
            "{name}: stderr {} vs sd {sd}",
            est.stderr
        );
    }
}

#[test]
fn single_token_fast_path_is_exact() {
    let ck = model(DType::F32);
    let prompt = vec![40u32, 77, 258, 294];
    let mut m = ck.model.predictor();
    let cands = [258u32, 13, 72];
    let fast =
        score::single_token_candidates(&mut m, &prompt, &cands, 0.0, ck.special.mask).unwrap();
    for (c, f) in cands.iter().zip(&fast) {
        let est = score::log_likelihood(
            &mut m,
            &prompt,
            &[*c],
            &ScoreConfig::default(),
            ck.special.mask,
            &mut Rng::new(0),
        )
        .unwrap();
        assert!(
            (est.log_likelihood - f).abs() < 1e-5,
            "{c}: {} vs {f}",
            est.log_likelihood
        );
        assert_eq!(est.nfe, 1);
    }
}
