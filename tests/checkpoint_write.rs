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
/// bystander's absolute path (the shape of the issue's report).
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
    let inside: Vec<String> = std::fs::read_dir(&o)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(
        inside.iter().all(|n| !n.starts_with(".llada-")),
        "{inside:?}"
    );
}

/// The id of a process that has exited (and been reaped).
#[cfg(unix)]
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[cfg(unix)]
fn inode(p: &Path) -> u64 {
    std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).unwrap())
}

#[cfg(unix)]
#[test]
fn an_existing_empty_out_is_written_in_place_never_renamed() {
    // `out` may be a mount point (`docker -v …:/out`) or the working folder: it is never renamed,
    // so the folder is the same one (same inode) before and after
    let d = tempfile::tempdir().unwrap();
    let o = d.path().join("mounted");
    std::fs::create_dir(&o).unwrap();
    let ino = inode(&o);
    let cfg = golden_dir().join("config.json");
    let (ok, err) = llada(&[
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(inode(&o), ino);
    assert!(Checkpoint::load(&o, None, &Device::Cpu).is_ok());
    let names: Vec<String> = std::fs::read_dir(&o)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    assert_eq!(std::fs::read_dir(d.path()).unwrap().count(), 1);
}

#[cfg(unix)]
#[test]
fn a_checkpoint_out_is_replaced_with_the_users_files_kept_in_place() {
    let d = tempfile::tempdir().unwrap();
    let ck = model(DType::F32);
    let o = d.path().join("ck");
    save_model_sharded(&o, &ck.raw, &ck.model, 200_000).unwrap();
    std::fs::create_dir_all(o.join("notes")).unwrap();
    std::fs::write(o.join("notes/run.txt"), "keep").unwrap();
    std::fs::write(o.join("README.md"), "mine").unwrap();
    let (ino, readme, notes) = (
        inode(&o),
        inode(&o.join("README.md")),
        inode(&o.join("notes")),
    );
    let (ok, err) = llada(&[
        "export",
        golden_dir().to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(inode(&o), ino, "the folder itself is never renamed");
    assert_eq!(inode(&o.join("README.md")), readme);
    assert_eq!(inode(&o.join("notes")), notes);
    assert_eq!(
        std::fs::read_to_string(o.join("notes/run.txt")).unwrap(),
        "keep"
    );
    assert!(!o.join("model.safetensors.index.json").exists());
    assert!(!o.join("model-00001-of-00002.safetensors").exists());
    assert!(Checkpoint::load(&o, None, &Device::Cpu)
        .unwrap()
        .tokenizer
        .is_some());
}

#[cfg(unix)]
#[test]
fn leftovers_of_a_killed_write_are_cleaned_by_the_next_one() {
    let d = tempfile::tempdir().unwrap();
    let dead = dead_pid();
    let golden = golden_dir();
    let cfg = golden.join("config.json");
    // an existing folder: the killed write's temporary folders inside it
    let o = d.path().join("o");
    let new = o.join(format!(".llada-new-{dead}-0"));
    let old = o.join(format!(".llada-old-{dead}-0"));
    for t in [&new, &old] {
        std::fs::create_dir_all(t).unwrap();
        std::fs::write(t.join("model.safetensors"), "partial").unwrap();
    }
    // a running writer's folder is kept (this test process stands for it: the command is another)
    let live = o.join(format!(".llada-new-{}-0", std::process::id()));
    std::fs::create_dir_all(&live).unwrap();
    // only leftovers: still an empty folder for `init` without --force
    let (ok, err) = llada(&[
        "init",
        "--config",
        cfg.to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(!new.exists() && !old.exists());
    assert!(live.exists(), "a running writer's folder is kept");
    assert!(Checkpoint::load(&o, None, &Device::Cpu).is_ok());
    // a folder not there yet: the killed write's hidden sibling
    let o2 = d.path().join("o2");
    let sibling = d.path().join(format!(".o2.new-{dead}-0"));
    std::fs::create_dir_all(&sibling).unwrap();
    std::fs::write(sibling.join("model.safetensors"), "partial").unwrap();
    let (ok, err) = llada(&[
        "export",
        golden.to_str().unwrap(),
        "--out",
        o2.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(!sibling.exists());
    assert!(Checkpoint::load(&o2, None, &Device::Cpu).is_ok());
    // killed while it moved files: config.json already set aside, the new one not yet in (a
    // mixed folder with no config.json); the next export without --force finishes the job
    std::fs::write(o2.join("notes.txt"), "mine").unwrap();
    let old2 = o2.join(format!(".llada-old-{dead}-0"));
    let new2 = o2.join(format!(".llada-new-{dead}-0"));
    std::fs::create_dir_all(&old2).unwrap();
    std::fs::create_dir_all(&new2).unwrap();
    std::fs::rename(o2.join("config.json"), old2.join("config.json")).unwrap();
    std::fs::copy(golden.join("config.json"), new2.join("config.json")).unwrap();
    let (ok, err) = llada(&[
        "export",
        golden.to_str().unwrap(),
        "--out",
        o2.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(!old2.exists() && !new2.exists());
    assert!(Checkpoint::load(&o2, None, &Device::Cpu).is_ok());
    assert_eq!(
        std::fs::read_to_string(o2.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[test]
fn another_models_folder_is_not_a_checkpoint_to_replace() {
    // a Hugging Face folder of another architecture (BERT): refused without --force
    let d = tempfile::tempdir().unwrap();
    let o = d.path().join("bert");
    std::fs::create_dir_all(&o).unwrap();
    let cfg = r#"{"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 768, "num_attention_heads": 12, "num_hidden_layers": 12, "vocab_size": 30522}"#;
    std::fs::write(o.join("config.json"), cfg).unwrap();
    std::fs::write(o.join("model.safetensors"), "bert weights").unwrap();
    let (ok, err) = llada(&[
        "export",
        golden_dir().to_str().unwrap(),
        "--out",
        o.to_str().unwrap(),
    ]);
    assert!(
        !ok && err.contains("--force") && err.contains("no llada checkpoint"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(o.join("config.json")).unwrap(), cfg);
    assert_eq!(
        std::fs::read_to_string(o.join("model.safetensors")).unwrap(),
        "bert weights"
    );
}
