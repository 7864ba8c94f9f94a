//! The trainer: exact resume, atomic checkpoints, data and configuration errors, the trained
//! tokenizer's format.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use llada::candle_core::Device;
use llada::train::data::{self, DataKind, PrepareOptions};
use llada::train::trainer::{latest_checkpoint, TrainConfig, Trainer};
use llada::Tokenizer;

/// A child process that stands for a running writer, killed however the test ends (a failed
/// assertion left it running, holding the test's output pipes).
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pretraining run of two steps in `dir/run` that keeps a checkpoint of each (no evaluation):
/// its config and folder.
fn two_saved_steps(dir: &Path) -> (TrainConfig, PathBuf) {
    let data = dataset(dir, DataKind::Pretrain);
    let mut cfg = config(dir, data, "run", 2, DataKind::Pretrain);
    cfg.save_every = 1;
    cfg.keep_checkpoints = 0;
    cfg.eval_every = 0;
    Trainer::new(cfg.clone(), &Device::Cpu)
        .unwrap()
        .run(&mut |_| {})
        .unwrap();
    (cfg, dir.join("run"))
}

fn config(dir: &Path, data: PathBuf, out: &str, steps: usize, kind: DataKind) -> TrainConfig {
    small_run(dir, data, out, steps, kind)
}

fn weights(t: &Trainer) -> Vec<Vec<u32>> {
    weight_bits(t)
}

#[test]
fn resume_is_bit_exact() {
    for kind in [DataKind::Pretrain, DataKind::Sft] {
        let d = tempfile::tempdir().unwrap();
        let data = dataset(d.path(), kind);
        let mut full = Trainer::new(
            config(d.path(), data.clone(), "full", 6, kind),
            &Device::Cpu,
        )
        .unwrap();
        full.run(&mut |_| {}).unwrap();

        let mut first =
            Trainer::new(config(d.path(), data, "split", 3, kind), &Device::Cpu).unwrap();
        first.run(&mut |_| {}).unwrap();
        drop(first);
        let mut resumed = Trainer::resume(&d.path().join("split"), Some(6), &Device::Cpu).unwrap();
        assert_eq!(resumed.state.step, 3);
        resumed.run(&mut |_| {}).unwrap();
        assert_eq!(resumed.state.step, 6);
        assert!(
            weights(&full) == weights(&resumed),
            "{kind:?}: 3 + resume + 3 steps differ from 6 steps"
        );
        assert_eq!(full.state.cursor, resumed.state.cursor);
        // the training moved the weights
        let init = Trainer::new(
            config(d.path(), dataset(d.path(), kind), "init", 1, kind),
            &Device::Cpu,
        )
        .unwrap();
        assert!(weights(&init) != weights(&full));
    }
}

#[test]
fn run_folder_has_config_metrics_and_loadable_checkpoints() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Pretrain);
    let mut cfg = config(d.path(), data, "run", 4, DataKind::Pretrain);
    cfg.save_every = 2;
    cfg.keep_checkpoints = 1;
    let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
    // the run config exists before the first step
    assert!(d.path().join("run/train_config.json").exists());
    let last = t.run(&mut |_| {}).unwrap();
    assert_eq!(latest_checkpoint(&d.path().join("run")), Some(last.clone()));
    // only the newest checkpoint is kept
    let n = std::fs::read_dir(d.path().join("run/checkpoints"))
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with("step-")
        })
        .count();
    assert_eq!(n, 1);
    // a checkpoint is a Hugging Face folder the engine loads
    let ck = llada::Checkpoint::load(&last, None, &Device::Cpu).unwrap();
    assert!(ck.tokenizer.is_some());
    let metrics = std::fs::read_to_string(d.path().join("run/metrics.jsonl")).unwrap();
    assert!(metrics.lines().count() >= 4);
    assert!(metrics.contains("eval_loss"));
    // the plot renders
    llada::train::plot::plot_run(&d.path().join("run"), &d.path().join("curves.png")).unwrap();
    assert!(
        std::fs::metadata(d.path().join("curves.png"))
            .unwrap()
            .len()
            > 1000
    );
}

#[test]
fn an_interrupted_checkpoint_leaves_the_last_good_one() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Pretrain);
    let mut t = Trainer::new(
        config(d.path(), data, "run", 2, DataKind::Pretrain),
        &Device::Cpu,
    )
    .unwrap();
    let good = t.run(&mut |_| {}).unwrap();
    // a kill mid-write leaves a temporary folder; `latest` still names the good checkpoint
    let tmp = d.path().join("run/checkpoints/.tmp-step-0000003-1");
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("model.safetensors"), b"partial").unwrap();
    assert_eq!(latest_checkpoint(&d.path().join("run")), Some(good.clone()));
    let r = Trainer::resume(&d.path().join("run"), Some(3), &Device::Cpu).unwrap();
    assert_eq!(r.state.step, 2);
    // a corrupt checkpoint is a clear error on resume
    let f = good.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let e = Trainer::resume(&d.path().join("run"), Some(3), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn bad_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let tok = Tokenizer::open(&golden_dir()).unwrap();
    let empty = d.path().join("empty.txt");
    std::fs::write(&empty, "\n\n").unwrap();
    let opts = PrepareOptions {
        kind: DataKind::Pretrain,
        doc_per_line: true,
        val_fraction: 0.0,
        seed: 0,
        max_len: None,
    };
    let e = data::prepare(&[empty], &tok, &d.path().join("x"), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("empty corpus"), "{e}");
    let data = dataset(d.path(), DataKind::Pretrain);
    // sequence longer than the model supports (tiny: 256)
    let mut c = config(d.path(), data.clone(), "r1", 2, DataKind::Pretrain);
    c.seq_len = 512;
    let e = Trainer::new(c, &Device::Cpu).err().unwrap().to_string();
    assert!(
        e.contains("seq_len=512") && e.contains("max_sequence_length"),
        "{e}"
    );
    // vocabulary mismatch: data made by a tokenizer larger than the model
    let cfg_path = d.path().join("small-vocab.json");
    let mut cfgv: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("config.json")).unwrap())
            .unwrap();
    cfgv["vocab_size"] = 300.into();
    cfgv["embedding_size"] = 300.into();
    cfgv["mask_token_id"] = 299.into();
    cfgv["eos_token_id"] = 298.into();
    cfgv["pad_token_id"] = 298.into();
    std::fs::write(&cfg_path, cfgv.to_string()).unwrap();
    let mut c = config(d.path(), data.clone(), "r2", 2, DataKind::Pretrain);
    c.init_from = None;
    c.model_config = Some(cfg_path);
    let e = Trainer::new(c, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("vocabulary mismatch"), "{e}");
    // mode mismatch
    let e = Trainer::new(
        config(d.path(), data.clone(), "r3", 2, DataKind::Sft),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("mode"), "{e}");
    // unwritable output folder
    let blocker = d.path().join("file");
    std::fs::write(&blocker, "x").unwrap();
    let mut c = config(d.path(), data, "r4", 2, DataKind::Pretrain);
    c.out = blocker.join("run");
    assert!(Trainer::new(c, &Device::Cpu).is_err());
}

#[test]
fn trained_tokenizer_loads_like_a_published_one() {
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("t.txt");
    std::fs::write(&f, TEXT.repeat(50)).unwrap();
    let ids = llada::train::tokenizer::train_tokenizer(&[f], 300, &d.path().join("tok")).unwrap();
    assert_eq!(ids.vocab_size, 300);
    let tok = Tokenizer::open(&d.path().join("tok")).unwrap();
    let sp = tok.special();
    assert_eq!(
        (sp.mask, sp.eos, sp.eot, sp.bos),
        (ids.mask, ids.eos, Some(ids.eot), Some(ids.bos))
    );
    let text = tok
        .apply_chat_template(&[llada::Message::user("Hi")])
        .unwrap();
    assert!(
        text.starts_with("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>")
    );
    let enc = tok.encode("And God said, Let there be light").unwrap();
    assert_eq!(
        tok.decode(&enc, false).unwrap(),
        "And God said, Let there be light"
    );
    assert_eq!(tok.encode("<|mdm_mask|>").unwrap(), vec![ids.mask]);
}

fn step_names(run: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(run.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-"))
        .collect();
    v.sort();
    v
}

fn all_finite(dir: &Path) -> bool {
    let ck = llada::Checkpoint::load(dir, None, &Device::Cpu).unwrap();
    ck.model.named_tensors().unwrap().iter().all(|(_, t)| {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| x.is_finite())
    })
}

#[test]
fn a_diverging_run_stops_naming_the_step_and_never_saves_non_finite_weights() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Pretrain);
    let mut cfg = config(d.path(), data, "run", 6, DataKind::Pretrain);
    cfg.lr = 1e30;
    cfg.save_every = 1;
    cfg.keep_checkpoints = 1;
    cfg.eval_every = 0;
    let mut t = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let e = t.run(&mut |_| {}).unwrap_err().to_string();
    assert!(e.contains("diverged at step 2") && e.contains("lr"), "{e}");
    // the last finite checkpoint (step 1) is kept and is finite
    let run = d.path().join("run");
    assert_eq!(step_names(&run), vec!["step-0000001"]);
    assert_eq!(
        latest_checkpoint(&run),
        Some(run.join("checkpoints/step-0000001"))
    );
    assert!(all_finite(&run.join("checkpoints/step-0000001")));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert!(!metrics.contains("\"loss\":null"), "{metrics}");

    // skip: the non-finite steps are skipped (no update), the run ends with a finite checkpoint
    cfg.out = d.path().join("skip");
    cfg.on_nonfinite = llada::train::trainer::OnNonFinite::Skip;
    cfg.max_consecutive_skips = 0;
    let mut t = Trainer::new(cfg.clone(), &Device::Cpu).unwrap();
    let mut skipped = Vec::new();
    let last = t.run(&mut |r| skipped.push(r.skipped)).unwrap();
    assert_eq!(skipped, vec![false, true, true, true, true, true]);
    assert_eq!(t.state.skipped_steps, 5);
    assert_eq!(t.state.adam_t, 1);
    assert!(all_finite(&last));
    let metrics = std::fs::read_to_string(d.path().join("skip/metrics.jsonl")).unwrap();
    assert_eq!(metrics.matches("\"skipped\":true").count(), 5, "{metrics}");
    // …but not forever
    cfg.out = d.path().join("skip3");
    cfg.max_consecutive_skips = 3;
    let mut t = Trainer::new(cfg, &Device::Cpu).unwrap();
    let e = t.run(&mut |_| {}).unwrap_err().to_string();
    assert!(
        e.contains("step 4") && e.contains("3 steps in a row"),
        "{e}"
    );
}

/// Rewrites a checkpoint's optimizer moments with NaN.
fn poison_optimizer(ck: &Path) {
    let path = ck.join("optimizer.safetensors");
    let files = llada::weights::SafetensorsFiles::open_file(&path).unwrap();
    let names: Vec<String> = files.names().map(str::to_string).collect();
    let mut t = Vec::new();
    for n in names {
        let shape = files.shape(&n).unwrap().to_vec();
        let x = files
            .load(&n, &shape, llada::candle_core::DType::F32, &Device::Cpu)
            .unwrap();
        t.push((n, (x * f64::NAN).unwrap()));
    }
    llada::weights::atomic_write(&path, &llada::weights::safetensors_bytes(&t).unwrap()).unwrap();
}

#[test]
fn a_corrupt_latest_checkpoint_falls_back_and_interrupted_saves_are_cleaned() {
    let d = tempfile::tempdir().unwrap();
    let (_, run) = two_saved_steps(d.path());
    let ckd = run.join("checkpoints");
    // leftovers of saves killed mid-write
    let dead = dead_pid();
    let leftovers = [
        ckd.join(format!(".tmp-step-0000003-{dead}")),
        ckd.join(format!(".latest.{dead}.tmp")),
        run.join(format!(".train_config.json.{dead}.tmp")),
        ckd.join(format!(".step-0000002.old-{dead}-0")),
    ];
    // a save in progress by a running trainer (this test process stands for one) is kept
    let running = Running(
        std::process::Command::new("sleep")
            .arg("60")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let live = ckd.join(format!(".tmp-step-0000009-{}", running.0.id()));
    std::fs::create_dir_all(&live).unwrap();
    std::fs::create_dir_all(&leftovers[0]).unwrap();
    std::fs::write(leftovers[0].join("model.safetensors"), b"partial").unwrap();
    std::fs::write(&leftovers[1], b"step-").unwrap();
    std::fs::write(&leftovers[2], b"{").unwrap();
    std::fs::create_dir_all(&leftovers[3]).unwrap();
    // a user's file in the run folder is not a leftover
    std::fs::write(run.join("notes.tmp"), b"mine").unwrap();
    // the latest checkpoint (step 2) has NaN optimizer moments
    poison_optimizer(&ckd.join("step-0000002"));
    let mut r = Trainer::resume(&run, Some(3), &Device::Cpu).unwrap();
    assert_eq!(r.resumed_from, Some(ckd.join("step-0000001")));
    assert_eq!(r.state.step, 1);
    for p in &leftovers {
        assert!(!p.exists(), "{} left", p.display());
    }
    assert!(run.join("notes.tmp").exists());
    assert!(live.exists(), "a running trainer's save is not a leftover");
    drop(running);
    std::fs::remove_dir(&live).unwrap();
    // the passed-over checkpoint is set aside, never overwritten
    let unusable = ckd.join("step-0000002.unusable");
    let poisoned = std::fs::read(unusable.join("optimizer.safetensors")).unwrap();
    // the run goes on from step 1: step 2 is written anew, then 3
    r.run(&mut |_| {}).unwrap();
    assert_eq!(
        step_names(&run),
        vec![
            "step-0000001",
            "step-0000002",
            "step-0000002.unusable",
            "step-0000003"
        ]
    );
    assert_eq!(
        std::fs::read(unusable.join("optimizer.safetensors")).unwrap(),
        poisoned
    );
    assert_eq!(latest_checkpoint(&run), Some(ckd.join("step-0000003")));
    let again = Trainer::resume(&run, Some(3), &Device::Cpu).unwrap();
    assert_eq!(again.resumed_from, Some(ckd.join("step-0000003")));
    assert_eq!(
        std::fs::read_dir(&ckd).unwrap().count(),
        5,
        "3 steps + the unusable one + latest"
    );

    // none usable: the error names each checkpoint and why
    for s in ["step-0000001", "step-0000002", "step-0000003"] {
        poison_optimizer(&ckd.join(s));
    }
    let e = Trainer::resume(&run, Some(4), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("no usable checkpoint")
            && e.contains("step-0000001 (")
            && e.contains("optimizer.safetensors")
            && e.contains("non-finite"),
        "{e}"
    );
    // with none usable, none is renamed
    assert_eq!(step_names(&run).len(), 4);
}

/// The id of a process that has exited (and been reaped).
fn dead_pid() -> u32 {
    let mut c = std::process::Command::new("true").spawn().unwrap();
    let pid = c.id();
    c.wait().unwrap();
    pid
}

#[test]
fn a_fresh_run_into_an_earlier_runs_folder_needs_resume_or_force() {
    let d = tempfile::tempdir().unwrap();
    let (mut cfg, run) = two_saved_steps(d.path());
    let weights = run.join("checkpoints/step-0000002/model.safetensors");
    let before = std::fs::read(&weights).unwrap();
    std::fs::write(run.join("notes.txt"), "mine").unwrap();
    // a new run (another seed) without --resume: refused, the earlier run untouched
    cfg.seed = 7;
    cfg.steps = 1;
    let e = Trainer::new(cfg.clone(), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains(&run.display().to_string()) && e.contains("--resume") && e.contains("--force"),
        "{e}"
    );
    assert_eq!(std::fs::read(&weights).unwrap(), before);
    assert_eq!(step_names(&run), vec!["step-0000001", "step-0000002"]);
    assert_eq!(
        latest_checkpoint(&run),
        Some(run.join("checkpoints/step-0000002"))
    );
    // force, starting from one of the checkpoints it would remove: refused, nothing removed
    let mut from_own = cfg.clone();
    from_own.init_from = Some(run.join("checkpoints/step-0000001"));
    from_own.model_config = None;
    let e = Trainer::start(from_own, &Device::Cpu, true)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("init_from") && e.contains("step-0000001"), "{e}");
    assert_eq!(step_names(&run), vec!["step-0000001", "step-0000002"]);
    // with force: the earlier run's checkpoints and metrics go, the user's file stays
    let last = Trainer::start(cfg, &Device::Cpu, true)
        .unwrap()
        .run(&mut |_| {})
        .unwrap();
    assert_eq!(last, run.join("checkpoints/step-0000001"));
    assert_eq!(step_names(&run), vec!["step-0000001"]);
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1, "{metrics}");
    assert_eq!(
        std::fs::read_to_string(run.join("notes.txt")).unwrap(),
        "mine"
    );
}

#[cfg(unix)]
#[test]
fn resume_takes_the_newest_complete_step_and_passes_io_errors_up() {
    let d = tempfile::tempdir().unwrap();
    let (_, run) = two_saved_steps(d.path());
    let ckd = run.join("checkpoints");
    // killed after step 2 was renamed into place, before `latest` was rewritten
    std::fs::write(ckd.join("latest"), "step-0000001").unwrap();
    let r = Trainer::resume(&run, Some(3), &Device::Cpu).unwrap();
    assert_eq!(r.resumed_from, Some(ckd.join("step-0000002")));
    drop(r);
    // an I/O error reading step 2 (here: a symbolic-link loop) is not a corrupt checkpoint:
    // no fallback to step 1, and step 2 is not set aside
    let state = ckd.join("step-0000002/trainer_state.json");
    std::fs::remove_file(&state).unwrap();
    std::os::unix::fs::symlink("trainer_state.json", &state).unwrap();
    let e = Trainer::resume(&run, Some(3), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("trainer_state.json") && !e.contains("no usable checkpoint"),
        "{e}"
    );
    assert_eq!(step_names(&run), vec!["step-0000001", "step-0000002"]);
}

#[test]
fn checkpoints_after_a_resume_stay_self_contained_once_the_source_is_pruned() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Pretrain);
    let mut cfg = config(d.path(), data, "run", 2, DataKind::Pretrain);
    cfg.save_every = 1;
    cfg.keep_checkpoints = 1;
    cfg.eval_every = 0;
    Trainer::new(cfg, &Device::Cpu)
        .unwrap()
        .run(&mut |_| {})
        .unwrap();
    let run = d.path().join("run");
    let mut r = Trainer::resume(&run, Some(4), &Device::Cpu).unwrap();
    let last = r.run(&mut |_| {}).unwrap();
    // step 2 (resumed from) was pruned at step 3; steps 3 and 4 still carry the tokenizer
    assert_eq!(step_names(&run), vec!["step-0000004"]);
    for f in llada::checkpoint::TOKENIZER_FILES {
        assert_eq!(
            golden_dir().join(f).exists(),
            last.join(f).exists(),
            "{f} in {}",
            last.display()
        );
    }
    let ck = llada::Checkpoint::load(&last, None, &Device::Cpu).unwrap();
    assert!(ck.tokenizer.is_some());
    // and a second resume (from step 4) keeps them too
    let mut r = Trainer::resume(&run, Some(5), &Device::Cpu).unwrap();
    let last = r.run(&mut |_| {}).unwrap();
    assert!(last.join("tokenizer.json").exists());
}

#[test]
fn a_corrupt_trainer_state_is_an_error_naming_the_file_and_field() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Sft);
    let cfg = config(d.path(), data, "run", 1, DataKind::Sft);
    let last = Trainer::new(cfg, &Device::Cpu)
        .unwrap()
        .run(&mut |_| {})
        .unwrap();
    let path = last.join("trainer_state.json");
    let good: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (field, value, expect) in [
        (
            "cursor",
            serde_json::json!({"epoch": 0, "index": 1_000_000_000u64}),
            "cursor.index",
        ),
        ("adam_t", serde_json::json!(99), "adam_t"),
        // values that would overflow counters once the run goes on
        (
            "cursor",
            serde_json::json!({"epoch": u64::MAX, "index": 0}),
            "cursor.epoch",
        ),
        ("tokens_seen", serde_json::json!(u64::MAX), "tokens_seen"),
        ("skipped_steps", serde_json::json!(99), "skipped_steps"),
        (
            "elapsed_seconds",
            serde_json::json!(-1.0),
            "elapsed_seconds",
        ),
    ] {
        let mut v = good.clone();
        v[field] = value;
        std::fs::write(&path, v.to_string()).unwrap();
        let e = Trainer::resume(&d.path().join("run"), Some(3), &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("trainer_state.json") && e.contains(expect),
            "{e}"
        );
    }
}

/// A corrupt `.examples` file of an SFT dataset (an example past the token stream, a prompt
/// longer than its example) is an error naming the file when the dataset opens; it used to pass
/// and panic (index out of bounds) at the first batch that drew that example.
#[test]
fn a_corrupt_examples_file_is_an_error_naming_it() {
    let d = tempfile::tempdir().unwrap();
    let data = dataset(d.path(), DataKind::Sft);
    assert!(data::Dataset::open(&data).is_ok());
    let f = data.join("train.examples");
    let good = std::fs::read(&f).unwrap();
    let corrupt = |at: usize, bytes: &[u8]| {
        let mut b = good.clone();
        b[at..at + bytes.len()].copy_from_slice(bytes);
        std::fs::write(&f, b).unwrap();
        match data::Dataset::open(&data) {
            Ok(_) => panic!("a corrupt examples file opened"),
            Err(e) => e.to_string(),
        }
    };
    // the first example's offset far past the stream
    let e = corrupt(0, &(1u64 << 40).to_le_bytes());
    assert!(
        e.contains("train.examples") && e.contains("example 0"),
        "{e}"
    );
    // an offset that overflows with the length
    let e = corrupt(16, &u64::MAX.to_le_bytes());
    assert!(e.contains("example 1"), "{e}");
    // the prompt longer than the example
    let e = corrupt(12, &u32::MAX.to_le_bytes());
    assert!(e.contains("prompt 4294967295"), "{e}");
}

/// A save killed after it set the existing `step-N` aside (to replace it) and before it renamed
/// the new one in: the next start puts the set-aside one back (it was removed as a leftover,
/// losing the checkpoint).
#[test]
fn a_checkpoint_set_aside_by_an_interrupted_replace_is_put_back() {
    let d = tempfile::tempdir().unwrap();
    let (_, run) = two_saved_steps(d.path());
    let ckd = run.join("checkpoints");
    let dead = dead_pid();
    let aside = ckd.join(format!(".step-0000002.old-{dead}-0"));
    std::fs::rename(ckd.join("step-0000002"), &aside).unwrap();
    let partial = ckd.join(format!(".tmp-step-0000002-{dead}"));
    std::fs::create_dir_all(&partial).unwrap();
    let r = Trainer::resume(&run, Some(3), &Device::Cpu).unwrap();
    assert_eq!(r.resumed_from, Some(ckd.join("step-0000002")));
    assert!(!aside.exists() && !partial.exists());
}

/// `llada train` on `data` into `out` with a small shape (sequences of 32, batches of 2, no
/// evaluation) and `extra` flags.
fn small_train(data: &Path, out: &Path, extra: &[&str]) -> common::Run {
    let mut args = vec![
        "train".to_string(),
        "--data".into(),
        data.to_str().unwrap().into(),
        "--out".into(),
        out.to_str().unwrap().into(),
        "--seq-len".into(),
        "32".into(),
        "--batch-size".into(),
        "2".into(),
        "--eval-every".into(),
        "0".into(),
    ];
    args.extend(extra.iter().map(|a| a.to_string()));
    llada_cmd(&args).run()
}

/// A new user's run: a preset shape with the vocabulary and ids from the tokenizer (nothing
/// copied by hand), a warm-up scaled to a short run, a progress line every N steps when stderr
/// is a log, and the run folder (or its `checkpoints/latest`) loading as a model.
#[test]
fn a_run_from_a_preset_needs_no_hand_work_and_loads_as_a_model() {
    let t = tempfile::tempdir().unwrap();
    let data = dataset(t.path(), DataKind::Pretrain);
    let run = t.path().join("run");
    let g = golden_dir();
    let g_str = g.to_str().unwrap();
    let r = small_train(
        &data,
        &run,
        &[
            "--model-config",
            "tiny",
            "--tokenizer",
            g_str,
            "--steps",
            "12",
            "--save-every",
            "0",
            "--log-every",
            "5",
        ],
    );
    assert!(r.ok(), "{}", r.stderr);
    let lines: Vec<&str> = r
        .stderr
        .lines()
        .filter(|l| l.starts_with("step ") && l.contains(" · loss "))
        .collect();
    assert_eq!(lines.len(), 3, "{}", r.stderr);
    for (l, step) in lines
        .iter()
        .zip(["step 5/12 ·", "step 10/12 ·", "step 12/12 ·"])
    {
        assert!(
            l.starts_with(step) && l.contains("loss ") && l.contains("ETA "),
            "{l}"
        );
    }
    assert!(!r.stderr.contains("never reaches its peak"), "{}", r.stderr);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("train_config.json")).unwrap())
            .unwrap();
    assert_eq!(cfg["schedule"]["warmup"], 1, "{cfg}");
    // the checkpoint's config has the tokenizer's ids
    let ck = latest_checkpoint(&run).unwrap();
    let (_, mc) = llada::checkpoint::read_config(&ck).unwrap();
    let tok = Tokenizer::open(&g).unwrap();
    assert_eq!(mc.mask_token_id, Some(tok.special().mask));
    assert_eq!(mc.embedding_size, tok.vocab_size());
    // the run folder, its checkpoints/ and checkpoints/latest stand for the last checkpoint
    for p in [
        run.clone(),
        run.join("checkpoints"),
        run.join("checkpoints/latest"),
        run.join("checkpoints/.."),
    ] {
        assert_eq!(
            llada::train::trainer::run_checkpoint(&p),
            Some(std::fs::canonicalize(&ck).unwrap()),
            "{}",
            p.display()
        );
    }
    assert_eq!(llada::train::trainer::run_checkpoint(&ck), None);
    for model in [run.clone(), run.join("checkpoints/latest")] {
        let r = llada_cmd(&[
            "generate",
            model.to_str().unwrap(),
            "--prompt-ids",
            "1,2,3",
            "--gen-length",
            "8",
            "--json",
        ])
        .run();
        assert!(r.ok(), "{}: {}", model.display(), r.stderr);
    }
    // a run folder is a starting point too (SFT-style continuation from the run's last step)
    let r = small_train(
        &data,
        &t.path().join("run-from-run"),
        &["--init-from", run.to_str().unwrap(), "--steps", "1"],
    );
    assert!(r.ok(), "{}", r.stderr);
    // a warm-up longer than the run is said
    let r = small_train(
        &data,
        &t.path().join("run2"),
        &[
            "--model-config",
            "tiny",
            "--tokenizer",
            g_str,
            "--steps",
            "2",
            "--warmup",
            "5",
        ],
    );
    assert!(r.ok(), "{}", r.stderr);
    assert!(r.stderr.contains("never reaches its peak"), "{}", r.stderr);
    // an unknown preset names the ones there are
    let r = small_train(
        &data,
        &t.path().join("run3"),
        &["--model-config", "huge", "--tokenizer", g_str],
    );
    assert!(!r.ok());
    assert!(r.stderr.contains("tiny, small, bench-135m"), "{}", r.stderr);
}
