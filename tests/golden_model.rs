//! Golden tests of the mask predictor: every case of `forward.json` in `LLADA_GOLDEN_DIR`, logits
//! compared element by element with the reference's (`forward_logits.safetensors`).

mod common;

use common::*;
use llada::candle_core::{DType, Device, Tensor};
use llada::Checkpoint;

#[test]
fn forward_logits_match_reference() {
    let Some(doc) = case_file("forward.json") else {
        return;
    };
    let dtype = compute_dtype(&doc["meta"]);
    for device in devices() {
        let ck = if device.is_cpu() {
            model(dtype)
        } else {
            Box::leak(Box::new(
                Checkpoint::load(&golden_dir(), Some(dtype), &device).unwrap(),
            ))
        };
        golden::check_forward(&golden_dir(), ck, &device, dtype);
    }
}

/// Running the golden checkpoint in bf16 stays within the stated bf16 tolerance of the f32
/// reference logits (weights rounded to bf16 included).
#[test]
fn forward_bf16_within_tolerance() {
    let Some(doc) = case_file("forward.json") else {
        return;
    };
    if compute_dtype(&doc["meta"]) != DType::F32 {
        return;
    }
    golden::check_forward(&golden_dir(), model(DType::BF16), &Device::Cpu, DType::BF16);
}

/// The argmax of every position matches the reference's wherever the top-2 gap is clear.
#[test]
fn forward_argmax_matches() {
    let Some(doc) = case_file("forward.json") else {
        return;
    };
    let dtype = compute_dtype(&doc["meta"]);
    let ck = model(dtype);
    for case in doc["cases"].as_array().unwrap() {
        let rows = ids2(&case["input_ids"]);
        let (b, l) = (rows.len(), rows[0].len());
        let ids = Tensor::from_vec(rows.concat(), (b, l), &Device::Cpu).unwrap();
        let mask = (!case["attention_mask"].is_null()).then(|| {
            Tensor::from_vec(ids2(&case["attention_mask"]).concat(), (b, l), &Device::Cpu).unwrap()
        });
        let am: Vec<Vec<u32>> = ck
            .model
            .forward(&ids, mask.as_ref())
            .unwrap()
            .argmax(2)
            .unwrap()
            .to_vec2()
            .unwrap();
        if case["min_top2_logit_gap"].as_f64().unwrap_or(1.0) > 1e-3 {
            assert_eq!(am, ids2(&case["argmax"]), "{}", case["name"]);
        }
    }
}

/// The training forward (differentiable ops, dense weights) computes the same logits as the
/// inference forward (packed weights, fused kernels) on the golden checkpoint, at lengths that
/// do not fit the kernels' tiles.
#[test]
fn training_forward_equals_inference_forward() {
    let ck = model(DType::F32);
    let tr = llada::train::Trainable::from_model(&ck.model).unwrap();
    let cfg = ck.model.config();
    for l in [7usize, 33, 70] {
        if l > cfg.max_sequence_length {
            continue;
        }
        let ids: Vec<u32> = (0..l as u32)
            .map(|i| (i * 37 + 11) % cfg.vocab_size as u32)
            .collect();
        let x = Tensor::from_vec(ids, (1, l), &Device::Cpu).unwrap();
        let a = ck.model.forward(&x, None).unwrap().squeeze(0).unwrap();
        let pos = Tensor::from_vec((0..l as u32).collect::<Vec<_>>(), l, &Device::Cpu).unwrap();
        let b = tr.model.forward_train_positions(&x, &pos).unwrap();
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(a.len(), b.len());
        let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
        let d = a
            .iter()
            .zip(&b)
            .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        assert!(d <= 1e-4 * scale, "L={l}: max |inference − training| = {d}");
    }
}

/// Logits of scattered rows (the masked positions a sampler reads) are exactly those rows of the
/// full forward, in f32 and bf16: only row-wise work (the last MLP, the head) is skipped.
#[test]
fn logits_of_chosen_rows_equal_the_full_forward() {
    for dtype in [DType::F32, DType::BF16] {
        let ck = model(dtype);
        let cfg = ck.model.config();
        let l = 40usize.min(cfg.max_sequence_length);
        let ids: Vec<u32> = (0..l as u32)
            .map(|i| (i * 53 + 5) % cfg.vocab_size as u32)
            .collect();
        let x = Tensor::from_vec([ids.clone(), ids].concat(), (2, l), &Device::Cpu).unwrap();
        let full = ck.model.forward(&x, None).unwrap();
        let rows: Vec<usize> = (0..l).filter(|i| i % 3 == 1 || *i == l - 1).collect();
        let mut p = ck.model.predictor();
        let some = p.logits_at(&x, None, &rows).unwrap();
        let row = |t: &Tensor, i: usize| -> Vec<f32> {
            t.narrow(1, i, 1)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        for (k, &r) in rows.iter().enumerate() {
            assert_eq!(row(&full, r), row(&some, k), "{dtype:?} row {r}");
        }
        // rows out of order or outside the canvas are refused
        assert!(p.logits_at(&x, None, &[3, 2]).is_err());
        assert!(p.logits_at(&x, None, &[l]).is_err());
    }
}
