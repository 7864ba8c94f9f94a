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
    cfg["architectures"] = serde_json::json!(["BertForMaskedLM"]);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(
        e.contains("BertForMaskedLM") && e.contains("unsupported architecture"),
        "{e}"
    );
    // LLaDA-MoE is chosen by `architectures` and read with its own keys: LLaDA-8B's keys under
    // its name are an error naming the first key it needs
    cfg["architectures"] = serde_json::json!(["LLaDAMoEModelLM"]);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("hidden_size") && e.contains("absent"), "{e}");
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
    let (ok, err) = llada_bounded(&["info", d.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("truncated") && !err.contains("panicked"),
        "{err}"
    );
}

/// The binary on `args`, bounded in time: killed after 60 s (a command that blocks, e.g. opening a
/// FIFO, fails the test instead of hanging it; see `common::Llada`). Returns (success, stderr).
fn llada_bounded(args: &[&str]) -> (bool, String) {
    let r = llada_cmd(args)
        .limit(std::time::Duration::from_secs(60))
        .run();
    (r.ok(), r.stderr)
}

#[test]
fn a_long_error_does_not_block_the_bounded_runner() {
    // stderr was piped but not read while polling: a child writing more than a pipe holds
    // (64 KiB) blocked until the limit, and the test failed as if the command had hung
    let long = "x".repeat(100_000);
    let (ok, err) = llada_bounded(&["info", &long]);
    assert!(!ok);
    assert!(
        err.contains(&long) && !err.contains("panicked"),
        "{}",
        err.len()
    );
}

/// A sharded copy of the golden checkpoint in `dir`, whose index then names `shard` for every
/// tensor of its first shard (the shard's file moved to `to`, relative to `dir`).
fn sharded_with_first_shard_at(dir: &Path, shard: &str, to: &Path) {
    let ck = model(DType::F32);
    save_model_sharded(dir, &ck.raw, &ck.model, 200_000).unwrap();
    let index_path = dir.join("model.safetensors.index.json");
    let mut index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index_path).unwrap()).unwrap();
    let first = index["weight_map"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_str().unwrap().to_string())
        .min()
        .unwrap();
    assert!(first.starts_with("model-00001-of-"), "{first}");
    assert!(dir.join(&first).exists());
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::rename(dir.join(&first), to).unwrap();
    for v in index["weight_map"].as_object_mut().unwrap().values_mut() {
        if v.as_str() == Some(first.as_str()) {
            *v = serde_json::json!(shard);
        }
    }
    std::fs::write(&index_path, index.to_string()).unwrap();
}

#[test]
fn shard_paths_are_confined_to_the_checkpoint_folder() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("ck");
    // a valid shard outside the folder, named by "../" and by an absolute path: it was loaded
    let outside = t.path().join("outside.safetensors");
    sharded_with_first_shard_at(&dir, "../outside.safetensors", &outside);
    let e = load_err(&dir);
    assert!(
        e.contains("\"../outside.safetensors\"") && e.contains("inside the checkpoint folder"),
        "{e}"
    );
    let abs = outside.to_str().unwrap().to_string();
    let dir2 = t.path().join("ck2");
    let outside2 = t.path().join("outside2.safetensors");
    sharded_with_first_shard_at(&dir2, &outside2.to_string_lossy(), &outside2);
    let e = load_err(&dir2);
    assert!(e.contains("inside the checkpoint folder"), "{abs}: {e}");
    // a symlink inside the folder that leads out of it
    #[cfg(unix)]
    {
        let dir3 = t.path().join("ck3");
        let outside3 = t.path().join("outside3.safetensors");
        sharded_with_first_shard_at(&dir3, "link.safetensors", &outside3);
        std::os::unix::fs::symlink(&outside3, dir3.join("link.safetensors")).unwrap();
        let e = load_err(&dir3);
        assert!(
            e.contains("link.safetensors") && e.contains("outside the folder"),
            "{e}"
        );
        // a symlink that stays inside is fine, and so is a subfolder
        let dir4 = t.path().join("ck4");
        sharded_with_first_shard_at(
            &dir4,
            "sub/real.safetensors",
            &dir4.join("sub/real.safetensors"),
        );
        assert!(Checkpoint::load(&dir4, None, &Device::Cpu).is_ok());
    }
}

#[cfg(unix)]
#[test]
fn hub_snapshot_shards_may_link_into_the_repository_blobs() {
    // the hub's layout: snapshots/REV/<file> are symlinks to ../../blobs/<hash>
    let t = tempfile::tempdir().unwrap();
    let repo = t.path().join("models--o--n");
    let snap = repo.join("snapshots/abc");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    sharded_with_first_shard_at(&snap, "first.safetensors", &repo.join("blobs/h1"));
    std::os::unix::fs::symlink("../../blobs/h1", snap.join("first.safetensors")).unwrap();
    assert!(Checkpoint::load(&snap, None, &Device::Cpu).is_ok());
}

#[cfg(unix)]
#[test]
fn hub_snapshot_single_file_and_shards_are_confined_to_the_repository() {
    use std::os::unix::fs::symlink;
    let t = tempfile::tempdir().unwrap();
    // the repository's blobs folder is itself a symlink (to another disk, say): it was refused
    let repo = t.path().join("models--o--n");
    let snap = repo.join("snapshots/abc");
    copy_golden(&snap);
    std::fs::create_dir_all(t.path().join("real-blobs")).unwrap();
    symlink(t.path().join("real-blobs"), repo.join("blobs")).unwrap();
    std::fs::rename(snap.join("model.safetensors"), repo.join("blobs/h1")).unwrap();
    symlink("../../blobs/h1", snap.join("model.safetensors")).unwrap();
    let ck = Checkpoint::load(&snap, None, &Device::Cpu).unwrap();
    assert_eq!(logits(&ck), logits(model(DType::F32)));
    // a tampered snapshot whose model.safetensors links to a valid file elsewhere: it was loaded
    let outside = t.path().join("outside.safetensors");
    std::fs::rename(repo.join("blobs/h1"), &outside).unwrap();
    std::fs::remove_file(snap.join("model.safetensors")).unwrap();
    symlink(&outside, snap.join("model.safetensors")).unwrap();
    let e = load_err(&snap);
    assert!(
        e.contains("model.safetensors") && e.contains("outside this hub snapshot"),
        "{e}"
    );
    // a local folder (no hub layout) may link its model.safetensors anywhere the user chose
    let local = t.path().join("local");
    copy_golden(&local);
    std::fs::remove_file(local.join("model.safetensors")).unwrap();
    symlink(&outside, local.join("model.safetensors")).unwrap();
    assert!(Checkpoint::load(&local, None, &Device::Cpu).is_ok());
}

#[cfg(unix)]
#[test]
fn shard_path_returns_the_real_path_it_checked_and_allows_dot() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path().join("ck");
    // "./x" was refused as not a plain relative path
    sharded_with_first_shard_at(
        &dir,
        "./sub/first.safetensors",
        &dir.join("sub/first.safetensors"),
    );
    assert!(Checkpoint::load(&dir, None, &Device::Cpu).is_ok());
    // a link inside the folder: the path checked (its target) is the one returned and opened
    std::os::unix::fs::symlink("sub/first.safetensors", dir.join("link")).unwrap();
    let real = std::fs::canonicalize(dir.join("sub/first.safetensors")).unwrap();
    assert_eq!(llada::weights::shard_path(&dir, "link").unwrap(), real);
    assert_eq!(llada::weights::shard_path(&dir, "./link").unwrap(), real);
    assert!(llada::weights::shard_path(&dir, ".").is_err());
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_as_weight_files() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let f = d.path().join("model.safetensors");
    std::fs::remove_file(&f).unwrap();
    // a FIFO: opening it blocked until a writer came
    let made = std::process::Command::new("mkfifo")
        .arg(&f)
        .status()
        .unwrap();
    assert!(made.success());
    let (ok, err) = llada_bounded(&["info", d.path().to_str().unwrap()]);
    assert!(!ok, "a FIFO loaded");
    assert!(
        err.contains("model.safetensors") && err.contains("FIFO") && err.contains("regular"),
        "{err}"
    );
    // a device
    std::fs::remove_file(&f).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &f).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("a device") && e.contains("regular files"), "{e}");
}

/// Replaces `dir/name` by a FIFO.
#[cfg(unix)]
fn fifo_at(dir: &Path, name: &str) {
    let f = dir.join(name);
    std::fs::remove_file(&f).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(&f)
        .status()
        .unwrap();
    assert!(made.success());
}

#[cfg(unix)]
#[test]
fn fifos_and_devices_are_refused_as_json_and_tokenizer_files() {
    // a FIFO config.json or tokenizer.json hung `llada info` (opened and read with no check); a
    // symlink to /dev/zero as tokenizer.json grew the process until it ran out of memory
    for name in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        let d = tempfile::tempdir().unwrap();
        copy_golden(d.path());
        fifo_at(d.path(), name);
        let (ok, err) = llada_bounded(&["info", d.path().to_str().unwrap()]);
        assert!(!ok, "{name}: a FIFO loaded");
        assert!(
            err.contains(name) && err.contains("a FIFO") && err.contains("regular files"),
            "{name}: {err}"
        );
        std::fs::remove_file(d.path().join(name)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", d.path().join(name)).unwrap();
        let e = load_err(d.path());
        assert!(
            e.contains(name) && e.contains("a device") && e.contains("regular files"),
            "{name}: {e}"
        );
    }
}

#[test]
fn oversized_json_and_tokenizer_files_are_refused_by_their_size() {
    // sparse files: the size costs no disk; they were read whole into memory
    for (name, size, limit) in [
        ("config.json", 65 << 20, "67108864 bytes (64 MiB)"),
        ("tokenizer.json", 257 << 20, "268435456 bytes (256 MiB)"),
    ] {
        let d = tempfile::tempdir().unwrap();
        copy_golden(d.path());
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join(name))
            .unwrap();
        f.set_len(size).unwrap();
        let e = load_err(d.path());
        assert!(
            e.contains(name) && e.contains(&format!("is {size} bytes, larger than the {limit}")),
            "{name}: {e}"
        );
    }
}

#[test]
fn non_finite_weights_load_with_a_warning_naming_the_tensor() {
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let name = "model.transformer.blocks.1.q_proj.weight";
    let t: Vec<_> = golden_tensors()
        .into_iter()
        .map(|(n, t)| {
            if n == name {
                let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
                v[3] = f32::NAN;
                v[7] = f32::INFINITY;
                (n, Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap())
            } else {
                (n, t)
            }
        })
        .collect();
    assert!(t.iter().any(|(n, _)| n == name));
    save_safetensors(d.path(), &t, u64::MAX).unwrap();
    let (ok, err) = llada_bounded(&["info", d.path().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        err.contains(name) && err.contains("2 of 4096 values are not finite"),
        "{err}"
    );
    // the golden checkpoint itself loads without one
    let (ok, err) = llada_bounded(&["info", golden_dir().to_str().unwrap()]);
    assert!(ok && !err.contains("not finite"), "{err}");
}

#[test]
fn impossible_numerics_in_config_are_named() {
    for (key, value) in [("rope_theta", "1e-300"), ("rms_norm_eps", "1e308")] {
        let d = tempfile::tempdir().unwrap();
        copy_golden(d.path());
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
                .unwrap();
        cfg[key] = serde_json::from_str(value).unwrap();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        let e = load_err(d.path());
        assert!(e.starts_with(&format!("config.json: {key}=")), "{key}: {e}");
    }
}

#[test]
fn a_huge_context_costs_nothing_until_used() {
    // RoPE tables were built for max_sequence_length at load: 10^7 positions took 1.28 GB,
    // 10^8 aborted
    let d = tempfile::tempdir().unwrap();
    copy_golden(d.path());
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("config.json")).unwrap())
            .unwrap();
    cfg["max_sequence_length"] = serde_json::json!(1_000_000_000u64);
    std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
    let ck = Checkpoint::load(d.path(), None, &Device::Cpu).unwrap();
    let m = ck.model.as_llada().unwrap();
    assert_eq!(m.rope().table_len(), 0);
    // the same logits as the golden model, with tables for the 7 positions used (rounded up)
    assert_eq!(logits(&ck), logits(model(DType::F32)));
    assert_eq!(m.rope().table_len(), 8);
}
