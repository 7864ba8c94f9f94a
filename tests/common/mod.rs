//! Shared helpers of the golden tests: the golden folder (`LLADA_GOLDEN_DIR`, default
//! `tests/golden/tiny`), its case files, the model loaded in the cases' compute dtype, and the
//! tolerances per dtype.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use llada::candle_core::{DType, Device};
use llada::Checkpoint;
use serde_json::Value;

pub mod golden;

/// The golden folder: `LLADA_GOLDEN_DIR` or the copy shipped in the repository.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("LLADA_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny"),
    }
}

/// A case file of `cases/`, or `None` when this golden folder has none (reported on stderr).
pub fn case_file(name: &str) -> Option<Value> {
    case_file_in(&golden_dir(), name)
}

/// A case file of `dir/cases/`, or `None` when that golden folder has none.
pub fn case_file_in(dir: &Path, name: &str) -> Option<Value> {
    let path = dir.join("cases").join(name);
    if !path.exists() {
        eprintln!(
            "note: {} absent: no cases of this kind in this golden folder",
            path.display()
        );
        return None;
    }
    let text = std::fs::read_to_string(&path).unwrap();
    Some(serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

/// The compute dtype the reference used (`meta.compute_dtype`).
pub fn compute_dtype(meta: &Value) -> DType {
    match meta["compute_dtype"].as_str().unwrap_or("float32") {
        "float32" => DType::F32,
        "bfloat16" => DType::BF16,
        "float16" => DType::F16,
        other => panic!("unknown compute_dtype {other}"),
    }
}

/// Tolerance on logits: max |ours − ref| ≤ abs + scale · max|ref| over a case.
///
/// * f32: 1e-4 absolute (the bound; observed ≤ 2.5e-5 on the tiny model).
/// * bf16: 4% of the case's largest logit. bf16 keeps 8 significand bits; the reference's own bf16
///   run (PyTorch, `shared/peer`) is 1.5–2.3% of that scale away from its f32 logits on the tiny
///   model, and two bf16 implementations round at different points (matmul outputs, norms,
///   residuals), so neither can be held to the other's rounding.
/// * f16: 1% (11 significand bits).
pub fn logits_tolerance(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (1e-4, 0.0),
        DType::BF16 => (0.0, 0.04),
        DType::F16 => (0.0, 0.01),
        _ => panic!("unsupported dtype"),
    }
}

/// The checkpoint of golden folder `dir`, loaded once per test binary per folder and dtype on the
/// CPU.
pub fn model_in(dir: &Path, dtype: DType) -> &'static Checkpoint {
    use std::collections::HashMap;
    use std::sync::Mutex;
    static LOADED: OnceLock<Mutex<HashMap<(PathBuf, String), &'static Checkpoint>>> =
        OnceLock::new();
    let mut map = LOADED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    map.entry((dir.to_path_buf(), format!("{dtype:?}")))
        .or_insert_with(|| {
            Box::leak(Box::new(
                Checkpoint::load(dir, Some(dtype), &Device::Cpu)
                    .unwrap_or_else(|e| panic!("loading {}: {e}", dir.display())),
            ))
        })
}

/// The golden checkpoint, loaded once per test binary in the given dtype on the CPU.
pub fn model(dtype: DType) -> &'static Checkpoint {
    static F32: OnceLock<Checkpoint> = OnceLock::new();
    static BF16: OnceLock<Checkpoint> = OnceLock::new();
    static F16: OnceLock<Checkpoint> = OnceLock::new();
    let cell = match dtype {
        DType::F32 => &F32,
        DType::BF16 => &BF16,
        _ => &F16,
    };
    cell.get_or_init(|| {
        Checkpoint::load(&golden_dir(), Some(dtype), &Device::Cpu)
            .unwrap_or_else(|e| panic!("loading {}: {e}", golden_dir().display()))
    })
}

/// `[[u32]]` from JSON.
pub fn ids2(v: &Value) -> Vec<Vec<u32>> {
    v.as_array().unwrap().iter().map(ids1).collect()
}

/// `[u32]` from JSON.
pub fn ids1(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Whether a case is marked fragile (near ties): such cases may be skipped.
pub fn fragile(case: &Value) -> bool {
    case["fragile"].as_bool().unwrap_or(false)
}

/// Runs `body` on the CPU, and on the first CUDA GPU when built with `--features cuda` and one is
/// present (the `test_device!` pattern).
pub fn devices() -> Vec<Device> {
    let mut v = vec![Device::Cpu];
    if llada::candle_core::utils::cuda_is_available() {
        if let Ok(d) = Device::new_cuda(0) {
            v.push(d);
        }
    }
    v
}

/// What a run of the `llada` binary gave: its exit status and everything it wrote.
#[derive(Debug)]
pub struct Run {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Whether the binary exited with status 0.
    pub fn ok(&self) -> bool {
        self.status.success()
    }
}

/// A run of the `llada` binary bounded in time, the one way the tests start it: stdout and stderr
/// are drained on their own threads (a child writing more than a pipe holds never blocks), stdin
/// is fed on a thread and closed (or is empty), and a child still running after the time limit
/// (120 s unless set) is killed and fails the test naming the command. `RUST_LOG`,
/// `RUST_BACKTRACE` and `LLADA_MODEL` are removed from its environment so that the caller's
/// settings change neither its output nor the model it picks.
pub struct Llada {
    cmd: std::process::Command,
    shown: String,
    stdin: Vec<u8>,
    stdout: Option<std::process::Stdio>,
    limit: std::time::Duration,
}

/// The `llada` binary on `args` (see [`Llada`]).
pub fn llada_cmd<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Llada {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_llada"));
    cmd.args(args)
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .env_remove("LLADA_MODEL");
    let shown = std::iter::once("llada".to_string())
        .chain(
            args.iter()
                .map(|a| a.as_ref().to_string_lossy().to_string()),
        )
        .collect::<Vec<_>>()
        .join(" ");
    Llada {
        cmd,
        shown,
        stdin: Vec::new(),
        stdout: None,
        limit: std::time::Duration::from_secs(120),
    }
}

impl Llada {
    /// Feeds `text` on stdin (then closes it).
    pub fn stdin(mut self, text: &str) -> Self {
        self.stdin = text.as_bytes().to_vec();
        self
    }

    /// Sets an environment variable of the child.
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.cmd.env(key, value);
        self
    }

    /// Sends stdout there instead of capturing it (`Run::stdout` is then empty).
    pub fn stdout_to(mut self, to: impl Into<std::process::Stdio>) -> Self {
        self.stdout = Some(to.into());
        self
    }

    /// The time limit after which the child is killed and the test fails.
    pub fn limit(mut self, limit: std::time::Duration) -> Self {
        self.limit = limit;
        self
    }

    /// Runs the binary to its end, or kills it at the time limit and panics naming the command
    /// (with what it had written to stderr).
    pub fn run(mut self) -> Run {
        use std::io::{Read, Write};
        use std::process::Stdio;
        self.cmd
            .stdin(Stdio::piped())
            .stdout(self.stdout.take().unwrap_or_else(Stdio::piped))
            .stderr(Stdio::piped());
        let mut child = self
            .cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting `{}`: {e}", self.shown));
        let drain = |pipe: Option<Box<dyn Read + Send>>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                if let Some(mut p) = pipe {
                    let _ = p.read_to_end(&mut buf);
                }
                String::from_utf8_lossy(&buf).to_string()
            })
        };
        let out = drain(
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let err = drain(
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        );
        let mut stdin = child.stdin.take().unwrap();
        let input = std::mem::take(&mut self.stdin);
        // a child that exits without reading its input makes this write fail: that is no error
        let feed = std::thread::spawn(move || {
            let _ = stdin.write_all(&input);
        });
        let t0 = std::time::Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if t0.elapsed() < self.limit => {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    let err = err.join().unwrap_or_default();
                    panic!(
                        "`{}` still running after {} s: killed. Its stderr:\n{err}",
                        self.shown,
                        self.limit.as_secs()
                    );
                }
                Err(e) => panic!("waiting for `{}`: {e}", self.shown),
            }
        };
        let _ = feed.join();
        let stdout = out.join().unwrap();
        let stderr = err.join().unwrap();
        Run {
            status,
            stdout,
            stderr,
        }
    }
}

/// The bits of every weight of a trainer's model, in checkpoint order (bit-exact comparisons of
/// runs).
pub fn weight_bits(t: &llada::train::trainer::Trainer) -> Vec<Vec<u32>> {
    t.model()
        .named_tensors()
        .unwrap()
        .into_iter()
        .map(|(_, w)| tensor_bits(&w))
        .collect()
}

/// The bits of a tensor's values, as f32 (any dtype, any shape).
pub fn tensor_bits(t: &llada::candle_core::Tensor) -> Vec<u32> {
    t.to_dtype(llada::candle_core::DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

/// The bits of a run's trainable variables (every weight, or a LoRA adapter's factors).
pub fn var_bits(t: &llada::train::trainer::Trainer) -> Vec<Vec<u32>> {
    t.trainable
        .vars
        .iter()
        .map(|(_, v)| tensor_bits(v.as_tensor()))
        .collect()
}

/// max |a − b| over two tensors of one shape (f32).
pub fn max_diff(a: &llada::candle_core::Tensor, b: &llada::candle_core::Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A path inside the repository.
#[allow(dead_code)]
pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

pub const TEXT: &str = "In the beginning God created the heaven and the earth.\nAnd the earth was without form, and void; and darkness was upon the face of the deep.\nAnd the Spirit of God moved upon the face of the waters.\nAnd God said, Let there be light: and there was light.\nAnd God saw the light, that it was good: and God divided the light from the darkness.\nAnd God called the light Day, and the darkness he called Night.\n";

/// A small prepared dataset of `kind` in `dir` (Genesis 1, tokenized with the golden tokenizer).
pub fn dataset(dir: &Path, kind: llada::train::data::DataKind) -> PathBuf {
    let tok = llada::Tokenizer::open(&golden_dir()).unwrap();
    let f = dir.join(match kind {
        llada::train::data::DataKind::Sft => "chat.jsonl",
        llada::train::data::DataKind::Preference => "pairs.jsonl",
        llada::train::data::DataKind::Pretrain => "text.txt",
    });
    match kind {
        llada::train::data::DataKind::Preference => {
            // chosen: the verse; rejected: the next verse (a fluent but wrong answer)
            let lines: Vec<&str> = TEXT.lines().collect();
            let mut s = String::new();
            for (i, line) in lines.iter().enumerate() {
                let other = lines[(i + 1) % lines.len()];
                s += &serde_json::json!({"prompt": format!("Verse {i}?"), "chosen": line, "rejected": other}).to_string();
                s.push('\n');
            }
            std::fs::write(&f, s.repeat(5)).unwrap();
        }
        llada::train::data::DataKind::Pretrain => std::fs::write(&f, TEXT.repeat(20)).unwrap(),
        llada::train::data::DataKind::Sft => {
            let mut s = String::new();
            for (i, line) in TEXT.lines().enumerate() {
                s += &serde_json::json!({"messages": [{"role": "user", "content": format!("Verse {i}?")}, {"role": "assistant", "content": line}]}).to_string();
                s.push('\n');
            }
            std::fs::write(&f, s.repeat(5)).unwrap();
        }
    }
    let out = dir.join(format!("data-{kind:?}"));
    let opts = llada::train::data::PrepareOptions {
        kind,
        doc_per_line: true,
        val_fraction: 0.2,
        seed: 1,
        max_len: None,
    };
    llada::train::data::prepare(&[f], &tok, &out, &opts).unwrap();
    out
}

/// A short training run of the golden checkpoint on `data` (batch 4 × 32, 2 accumulated,
/// evaluated every 2 steps) into `dir/out`.
pub fn small_run(
    dir: &Path,
    data: PathBuf,
    out: &str,
    steps: usize,
    kind: llada::train::data::DataKind,
) -> llada::train::trainer::TrainConfig {
    llada::train::trainer::TrainConfig {
        mode: kind,
        init_from: Some(golden_dir()),
        data,
        out: dir.join(out),
        seq_len: 32,
        batch_size: 4,
        grad_accum: 2,
        steps,
        lr: 1e-3,
        eval_every: 2,
        eval_batches: 1,
        save_every: 0,
        random_length_prob: 0.3,
        ..Default::default()
    }
}
