//! Writing a checkpoint never deletes anything outside what it writes: an existing index naming
//! `../` or absolute paths deletes nothing, a folder of other files is refused without force (and
//! kept with it), an existing checkpoint is replaced whole, with the user's other files kept.

mod common;

use std::path::Path;

use common::*;
use llada::candle_core::{DType, Device};
use llada::checkpoint::{save_model_into, save_model_sharded, Checkpoint, Existing};
use llada::weights::save_safetensors;

/// A folder `o` next to a bystander file `v.txt`, with an index naming `../v.txt` and the
/// bystander's absolute path (the shape of the report).
fn hostile_out(root: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let victim = root.join("v.txt");
    std::fs::write(&victim, "x").unwrap();
    let o = root.join("o");
    std::fs::create_dir_all(&o).unwrap();
    let index = serde_json::json!({"weight_map": {
        "a": "../v.txt",
        "b": victim.display().to_string(),
    }});
    std::fs::write(o.join("model.safetensors.index.json"), index.to_string()).unwrap();
    (o, victim)
}

fn llada(args: &[&str]) -> (bool, String) {
    let r = llada_cmd(args).run();
    (r.ok(), r.stderr)
}

#[test]
fn export_and_init_never_delete_files_named_by_an_existing_index() {
    let d = tempfile::tempdir().unwrap();
    let (o, victim) = hostile_out(d.path());
    let o_s = o.to_str().unwrap();
    let golden = golden_dir();
    // not a checkpoint (no config.json): refused, nothing touched
    let (ok, err) = llada(&["export", golden.to_str().unwrap(), "--out", o_s]);
    assert!(
        !ok && err.contains("--force") && err.contains("not empty"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "x");
    assert!(o.join("model.safetensors.index.json").exists());
    // with --force the checkpoint is written; the bystander outside --out survives
    let (ok, err) = llada(&["export", golden.to_str().unwrap(), "--out", o_s, "--force"]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "x");
    assert!(!o.join("model.safetensors.index.json").exists());
    assert!(Checkpoint::load(&o, None, &Device::Cpu)
        .unwrap()
        .tokenizer
        .is_some());

    // init, the same
    let d = tempfile::tempdir().unwrap();
    let (o, victim) = hostile_out(d.path());
    let o_s = o.to_str().unwrap();
    let cfg = golden.join("config.json");
    let (ok, err) = llada(&["init", "--config", cfg.to_str().unwrap(), "--out", o_s]);
    assert!(!ok && err.contains("--force"), "{err}");
    let (ok, err) = llada(&[
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        o_s,
        "--force",
    ]);
    assert!(ok, "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "x");
    assert!(Checkpoint::load(&o, None, &Device::Cpu).is_ok());
    // init refuses to replace a checkpoint without --force
    let (ok, err) = llada(&["init", "--config", cfg.to_str().unwrap(), "--out", o_s]);
    assert!(!ok && err.contains("already holds a checkpoint"), "{err}");
}

#[test]
fn the_safetensors_writer_removes_only_its_own_stale_shards() {
    let d = tempfile::tempdir().unwrap();
    let (o, victim) = hostile_out(d.path());
    // a stale shard of this folder (named in the index) goes; the bystander stays
    let stale = o.join("model-00001-of-00002.safetensors");
    std::fs::write(&stale, "old shard").unwrap();
    let idx = serde_json::json!({"weight_map": {
        "a": "../v.txt",
        "b": victim.display().to_string(),
        "c": "model-00001-of-00002.safetensors",
    }});
    std::fs::write(o.join("model.safetensors.index.json"), idx.to_string()).unwrap();
    let tensors = model(DType::F32).model.named_tensors().unwrap();
    save_safetensors(&o, &tensors, u64::MAX).unwrap();
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "x");
    assert!(!stale.exists());
    assert!(!o.join("model.safetensors.index.json").exists());
    assert!(o.join("model.safetensors").exists());
}

#[test]
fn replacing_a_checkpoint_is_whole_and_keeps_the_users_other_files() {
    let d = tempfile::tempdir().unwrap();
    let ck = model(DType::F32);
    let o = d.path().join("ck");
    // a sharded checkpoint with a README and a stray temporary file of an interrupted write
    save_model_sharded(&o, &ck.raw, &ck.model, 200_000).unwrap();
    assert!(o.join("model.safetensors.index.json").exists());
    std::fs::write(o.join("README.md"), "my notes").unwrap();
    std::fs::write(o.join(".model.safetensors.123.tmp"), "partial").unwrap();
    // replaced by a single-file checkpoint with tokenizer files: no stale shard or index remains
    save_model_into(
        &o,
        &ck.raw,
        &ck.model,
        u64::MAX,
        Some(&golden_dir()),
        Existing::ReplaceCheckpoint,
    )
    .unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&o)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let mut expect = vec![
        "README.md",
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ];
    for f in ["tokenizer_config.json", "special_tokens_map.json"] {
        if golden_dir().join(f).exists() {
            expect.push(f);
        }
    }
    expect.sort();
    assert_eq!(names, expect);
    assert_eq!(
        std::fs::read_to_string(o.join("README.md")).unwrap(),
        "my notes"
    );
    // no temporary sibling is left next to it
    let siblings: Vec<String> = std::fs::read_dir(d.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(siblings, vec!["ck".to_string()]);
    assert!(Checkpoint::load(&o, None, &Device::Cpu)
        .unwrap()
        .tokenizer
        .is_some());
    // Refuse: an existing checkpoint stays as it is
    let e = save_model_into(&o, &ck.raw, &ck.model, u64::MAX, None, Existing::Refuse)
        .unwrap_err()
        .to_string();
    assert!(e.contains("already holds a checkpoint"), "{e}");
    // a folder of other files is refused unless Any, and with Any its files are kept
    let other = d.path().join("other");
    std::fs::create_dir_all(other.join("sub")).unwrap();
    std::fs::write(other.join("sub/data.txt"), "keep").unwrap();
    let e = save_model_into(
        &other,
        &ck.raw,
        &ck.model,
        u64::MAX,
        None,
        Existing::ReplaceCheckpoint,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not empty") && e.contains("--force"), "{e}");
    save_model_into(&other, &ck.raw, &ck.model, u64::MAX, None, Existing::Any).unwrap();
    assert_eq!(
        std::fs::read_to_string(other.join("sub/data.txt")).unwrap(),
        "keep"
    );
    assert!(Checkpoint::load(&other, None, &Device::Cpu).is_ok());
    // a file is never a checkpoint folder
    let file = d.path().join("file");
    std::fs::write(&file, "x").unwrap();
    let e = save_model_into(&file, &ck.raw, &ck.model, u64::MAX, None, Existing::Any)
        .unwrap_err()
        .to_string();
    assert!(e.contains("not a folder"), "{e}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "x");
}

#[cfg(unix)]
#[test]
fn a_failed_write_leaves_the_old_checkpoint_and_no_temporary_folder() {
    let d = tempfile::tempdir().unwrap();
    let ck = model(DType::F32);
    let o = d.path().join("ck");
    save_model_sharded(&o, &ck.raw, &ck.model, u64::MAX).unwrap();
    let before = std::fs::read(o.join("model.safetensors")).unwrap();
    // the tokenizer source is unreadable: the write fails after the weights
    let bad = d.path().join("badtok");
    std::fs::create_dir_all(bad.join("tokenizer.json")).unwrap();
    let r = save_model_into(
        &o,
        &ck.raw,
        &ck.model,
        1000,
        Some(&bad),
        Existing::ReplaceCheckpoint,
    );
    assert!(r.is_err());
    assert_eq!(std::fs::read(o.join("model.safetensors")).unwrap(), before);
    assert!(!o.join("model.safetensors.index.json").exists());
    let siblings = std::fs::read_dir(d.path()).unwrap().count();
    assert_eq!(siblings, 2, "only ck and badtok");
}
