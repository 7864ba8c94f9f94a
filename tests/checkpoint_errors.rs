//! Bad checkpoints give clear errors naming the tensor or file, never a panic; sharded and
//! low-precision checkpoints load.

mod common;

use std::path::Path;

use common::*;
use llada::candle_core::{DType, Device, Tensor};
use llada::checkpoint::{save_model_sharded, Checkpoint};
use llada::weights::save_safetensors;

/// A single-file copy of the golden checkpoint in `to`, whatever the golden folder's layout
/// (single or sharded safetensors, any stored dtype): its config and tokenizer files, and its
/// tensors written as one `model.safetensors`.
fn copy_golden(to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let src = golden_dir().join(f);
        if src.exists() {
            std::fs::copy(src, to.join(f)).unwrap();
        }
    }
    save_safetensors(to, &golden_tensors(), u64::MAX).unwrap();
    assert!(to.join("model.safetensors").exists());
}

fn load_err(dir: &Path) -> String {
    match Checkpoint::load(dir, None, &Device::Cpu) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn golden_tensors() -> Vec<(String, Tensor)> {
    model(DType::F32).model.named_tensors().unwrap()
}

#[test]
fn truncated_file_is_an_error_naming_the_file() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let f = d.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
    file.set_len(len / 2).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("truncated"),
        "{e}"
    );
}

#[test]
fn corrupt_header_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let f = d.path().join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[8..16].copy_from_slice(b"garbage!");
    std::fs::write(&f, bytes).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors") && e.contains("not a valid safetensors"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let missing = "model.transformer.blocks.1.ff_out.weight";
    let t: Vec<_> = golden_tensors()
        .into_iter()
        .filter(|(n, _)| n != missing)
        .collect();
    save_safetensors(d.path(), &t, u64::MAX).unwrap();
    let e = load_err(d.path());
    assert!(e.contains(missing) && e.contains("missing"), "{e}");
}

#[test]
fn wrong_shape_names_tensor_expected_and_found() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let name = "model.transformer.blocks.0.q_proj.weight";
    let t: Vec<_> = golden_tensors()
        .into_iter()
        .map(|(n, t)| {
            if n == name {
                (n, t.narrow(1, 0, 32).unwrap())
            } else {
                (n, t)
            }
        })
        .collect();
    save_safetensors(d.path(), &t, u64::MAX).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains(name) && e.contains("[64, 64]") && e.contains("[64, 32]"),
        "{e}"
    );
}

#[test]
fn unsupported_config_value_is_named() {
    for (key, value) in [
        ("alibi", "true"),
        ("block_group_size", "2"),
        ("layer_norm_type", "\"default\""),
    ] {
        let d = tempfile::tempdir().unwrap();
        copy_golden(d.path());
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
                .unwrap();
        cfg[key] = serde_json::from_str(value).unwrap();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        let e = load_err(d.path());
        assert!(e.contains(key), "{key}: {e}");
    }
}

#[test]
fn unsupported_architecture_is_an_error() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    cfg["architectures"] = serde_json::json!(["LLaDAMoEModelLM"]);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("LLaDAMoEModelLM") && e.contains("unsupported architecture"),
        "{e}"
    );
}

#[test]
fn missing_files_are_errors() {
    let d = tempfile::tempdir().unwrap();
    assert!(load_err(d.path()).contains("config.json"));
    copy_golden(d.path());
    std::fs::remove_file(d.path().join("model.safetensors")).unwrap();
    assert!(load_err(d.path()).contains("no model.safetensors"));
    assert!(load_err(&d.path().join("nope")).contains("not a folder"));
}

fn logits(ck: &Checkpoint) -> Vec<f32> {
    let ids = Tensor::new(&[[40u32, 77, 258, 294, 508, 508, 13]], &Device::Cpu).unwrap();
    ck.model
        .forward(&ids, None)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn sharded_checkpoint_loads_identically_and_absent_shard_is_named() {
    let d = tempfile::tempdir().unwrap();
    let ck = model(DType::F32);
    save_model_sharded(d.path(), &ck.raw, &ck.model, 200_000).unwrap();
    assert!(d.path().join("model.safetensors.index.json").exists());
    assert!(!d.path().join("model.safetensors").exists());
    let sharded = Checkpoint::load(d.path(), None, &Device::Cpu).unwrap();
    assert!(sharded.files.len() > 1);
    assert_eq!(logits(&sharded), logits(ck));
    let shard = sharded.files[1].clone();
    std::fs::remove_file(&shard).unwrap();
    let e = load_err(d.path());
    let name = shard.file_name().unwrap().to_string_lossy().to_string();
    assert!(e.contains(&name) && e.contains("absent"), "{e}");
}

#[test]
fn bf16_and_f16_stored_checkpoints_load() {
    let ck = model(DType::F32);
    let reference = logits(ck);
    for dtype in [DType::BF16, DType::F16] {
        let d = tempfile::tempdir().unwrap();
        let m = ck
            .model
            .named_tensors()
            .unwrap()
            .into_iter()
            .map(|(n, t)| (n, t.to_dtype(dtype).unwrap()))
            .collect::<Vec<_>>();
        save_safetensors(d.path(), &m, u64::MAX).unwrap();
        llada::checkpoint::write_config(d.path(), &ck.raw).unwrap();
        let loaded = Checkpoint::load(d.path(), Some(DType::F32), &Device::Cpu).unwrap();
        assert_eq!(loaded.stored_dtype, llada::device::dtype_name(dtype));
        let ours = logits(&loaded);
        let scale = reference.iter().fold(0f32, |m, x| m.max(x.abs()));
        let max = ours
            .iter()
            .zip(&reference)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        // Only the weights are rounded (compute is f32): well inside the bf16 logits tolerance.
        assert!(max < 0.04 * scale, "{dtype:?}: {max} vs scale {scale}");
    }
}

#[test]
fn cli_reports_errors_without_panicking() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let f = d.path().join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llada"))
        .args(["info", d.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("truncated") && !err.contains("panicked"),
        "{err}"
    );
}
