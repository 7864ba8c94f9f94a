//! Impossible settings and bad input make the binary exit non-zero with a message naming the value
//! and the rule, never a panic.

mod common;

use common::golden_dir;

fn llada(args: &[&str]) -> (bool, String, String) {
    let r = common::llada_cmd(args).run();
    (r.ok(), r.stdout, r.stderr)
}

fn fails_with(args: &[&str], needles: &[&str]) {
    let (ok, _, err) = llada(args);
    assert!(!ok, "{args:?} succeeded");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    for n in needles {
        assert!(err.contains(n), "{args:?}: {err:?} lacks {n:?}");
    }
}

#[test]
fn generate_rejects_impossible_settings() {
    let g = golden_dir();
    let m = g.to_str().unwrap();
    let base = ["generate", m, "--prompt", "In the beginning"];
    let with = |extra: &[&str]| -> Vec<String> {
        base.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let cases: Vec<(Vec<String>, Vec<&str>)> = vec![
        (
            with(&["--gen-length", "30", "--block-length", "8", "--steps", "8"]),
            vec!["gen_length=30", "block_length=8"],
        ),
        (
            with(&["--gen-length", "32", "--block-length", "8", "--steps", "10"]),
            vec!["steps=10", "blocks=4"],
        ),
        (
            with(&["--gen-length", "32", "--steps", "0"]),
            vec!["steps=0"],
        ),
        (
            with(&[
                "--gen-length",
                "32",
                "--steps",
                "64",
                "--block-length",
                "32",
            ]),
            vec!["steps=64", "gen_length"],
        ),
        (
            with(&[
                "--gen-length",
                "8",
                "--steps",
                "8",
                "--block-length",
                "8",
                "--temperature",
                "-1",
            ]),
            vec!["temperature=-1"],
        ),
        (
            with(&[
                "--gen-length",
                "8",
                "--steps",
                "8",
                "--block-length",
                "8",
                "--cfg-scale",
                "-0.5",
            ]),
            vec!["cfg_scale=-0.5"],
        ),
        (
            with(&[
                "--gen-length",
                "8",
                "--steps",
                "8",
                "--block-length",
                "8",
                "--threshold",
                "1.5",
            ]),
            vec!["threshold=1.5"],
        ),
        (
            with(&[
                "--gen-length",
                "512",
                "--steps",
                "512",
                "--block-length",
                "512",
            ]),
            vec!["max_sequence_length=256"],
        ),
        (
            with(&[
                "--gen-length",
                "8",
                "--steps",
                "8",
                "--block-length",
                "8",
                "--remasking",
                "lowest",
            ]),
            // clap rejects an unknown choice, listing the choices
            vec!["lowest", "--remasking", "low_confidence"],
        ),
        (
            with(&[
                "--gen-length",
                "8",
                "--steps",
                "8",
                "--block-length",
                "8",
                "--threshold",
                "0.5",
                "--factor",
                "1",
            ]),
            vec!["threshold=0.5", "factor=1"],
        ),
    ];
    for (args, needles) in cases {
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        fails_with(&a, &needles);
    }
    fails_with(
        &[
            "generate",
            m,
            "--prompt",
            "",
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
        ],
        &["prompt"],
    );
    fails_with(
        &[
            "generate",
            m,
            "--prompt-ids",
            "1,2,508",
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
        ],
        &["mask"],
    );
    fails_with(
        &[
            "generate",
            m,
            "--prompt-ids",
            "1,99999",
            "--gen-length",
            "8",
            "--steps",
            "8",
            "--block-length",
            "8",
        ],
        &["99999"],
    );
    fails_with(
        &["generate", "/nonexistent/model", "--prompt", "x"],
        &["/nonexistent/model"],
    );
}

#[test]
fn infill_rejects_unknown_span_syntax() {
    let g = golden_dir();
    let m = g.to_str().unwrap();
    fails_with(
        &["infill", m, "--text", "a <mask> b"],
        &["<mask>", "mask-span"],
    );
    fails_with(&["infill", m, "--text", "a <mask:x> b"], &["<mask:x>"]);
    fails_with(
        &["infill", m, "--text", "no spans here"],
        &["no masked span"],
    );
    fails_with(
        &["infill", m, "--text", "a <mask:2> b", "--steps", "5"],
        &["steps=5"],
    );
}

#[test]
fn generate_json_has_the_documented_fields() {
    let g = golden_dir();
    let (ok, out, err) = llada(&[
        "generate",
        g.to_str().unwrap(),
        "--prompt",
        "And God said",
        "--gen-length",
        "16",
        "--steps",
        "16",
        "--block-length",
        "8",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["generated_ids"].as_array().unwrap().len(), 16);
    assert!(v["text"].is_string());
    assert_eq!(v["nfe"], 16);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
}

#[test]
fn chat_keeps_history_over_turns() {
    let g = golden_dir();
    let r = common::llada_cmd(&[
        "chat",
        g.to_str().unwrap(),
        "--gen-length",
        "16",
        "--steps",
        "16",
        "--block-length",
        "8",
    ])
    .stdin("Who is my shepherd?\nAnd then?\n")
    .run();
    assert!(r.ok(), "{}", r.stderr);
    // one answer line per turn
    assert_eq!(r.stdout.lines().count(), 2);
}

#[test]
fn scoring_rejects_bad_input() {
    let g = golden_dir();
    let m = g.to_str().unwrap();
    fails_with(
        &["score", m, "--prompt", "In the beginning", "--answer", ""],
        &["answer", "empty"],
    );
    fails_with(
        &[
            "score", m, "--prompt", "a", "--answer", " b", "--mc-num", "100", "--batch", "16",
        ],
        &["mc_num=100", "batch size=16"],
    );
    fails_with(
        &["ppl", m, "/nonexistent/file.txt"],
        &["/nonexistent/file.txt"],
    );
    fails_with(
        &["eval", m, "/nonexistent/tasks.jsonl"],
        &["/nonexistent/tasks.jsonl"],
    );
    let d = tempfile::tempdir().unwrap();
    let f = d.path().join("t.jsonl");
    std::fs::write(&f, "{\"context\": \"a\", \"choices\": [\"x\", \"y\"], \"answer\": 0}\n{\"context\": \"a\", \"choices\": [\"x\"\n").unwrap();
    fails_with(&["eval", m, f.to_str().unwrap()], &["t.jsonl:2:"]);
}

#[test]
fn score_json_has_the_documented_fields() {
    let g = golden_dir();
    let (ok, out, err) = llada(&[
        "score",
        g.to_str().unwrap(),
        "--prompt",
        "In the beginning God created",
        "--answer",
        " the heaven and the earth.",
        "--mc-num",
        "32",
        "--batch",
        "16",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["log_likelihood"].as_f64().unwrap() < 0.0);
    assert!(v["stderr"].as_f64().unwrap() > 0.0);
}

/// The binary with `stdin` fed in (and closed) and `env` set, bounded in time (see
/// `common::Llada`). Returns (success, stderr).
fn llada_with(args: &[&str], stdin: &str, env: &[(&str, &std::path::Path)]) -> (bool, String) {
    let mut cmd = common::llada_cmd(args).stdin(stdin);
    for (k, v) in env {
        cmd = cmd.env(k, v);
    }
    let r = cmd.run();
    (r.ok(), r.stderr)
}

#[test]
fn infill_checks_span_sizes_against_the_context_before_allocating() {
    let g = golden_dir();
    let m = g.to_str().unwrap();
    // 10^9 masks were allocated (4-8 GB) before the context was checked; usize::MAX panicked
    for n in ["1000000000", "18446744073709551615", "257"] {
        let tag = format!("<mask:{n}>");
        let text = format!("a {tag} b");
        fails_with(
            &["infill", m, "--text", &text],
            &[&tag, &format!("+ {n} masked"), "max_sequence_length=256"],
        );
    }
    // the spans together, and the text after them, count too
    fails_with(
        &["infill", m, "--text", "a <mask:200> b <mask:100> c"],
        &["<mask:100>", "max_sequence_length=256"],
    );
    // a number past usize is no span size at all
    fails_with(
        &["infill", m, "--text", "a <mask:99999999999999999999999> b"],
        &["<mask:99999999999999999999999>", "mask-span syntax"],
    );
}

#[test]
fn infill_rejects_a_literal_mask_token() {
    let g = golden_dir();
    let m = g.to_str().unwrap();
    // it was an unreported extra mask (filled, but in no span)
    fails_with(
        &["infill", m, "--text", "a <|mdm_mask|> b <mask:2> c"],
        &["<|mdm_mask|>", "must not contain the mask token"],
    );
    fails_with(
        &["infill", m, "--text", "a <mask:2> b <|mdm_mask|>"],
        &["<|mdm_mask|>", "must not contain the mask token"],
    );
}

#[test]
fn lengths_near_usize_max_are_errors_not_panics() {
    let g = golden_dir();
    let m = g.to_str().unwrap();
    let max = "18446744073709551615";
    let too_long = [
        "gen_length=18446744073709551615",
        "= 18446744073709551616 exceeds the model's max_sequence_length=256",
    ];
    fails_with(
        &["generate", m, "--prompt", "a", "--gen-length", max],
        &too_long,
    );
    fails_with(
        &["generate", m, "--ar", "--prompt", "a", "--gen-length", max],
        &too_long,
    );
    // chat and bench reached the sampler, which allocated the canvas before checking it
    let (ok, err) = llada_with(&["chat", m, "--gen-length", max], "a\n", &[]);
    assert!(!ok && !err.contains("panicked"), "{err}");
    assert!(err.contains("gen_length=18446744073709551615"), "{err}");
    fails_with(
        &[
            "bench",
            m,
            "--runs",
            "1",
            "--warmup",
            "0",
            "--gen-length",
            max,
        ],
        &["gen_length=18446744073709551615", "max_sequence_length=256"],
    );
    fails_with(
        &[
            "bench",
            m,
            "--runs",
            "1",
            "--warmup",
            "0",
            "--prompt-len",
            max,
        ],
        &["max_sequence_length=256"],
    );
    for mode in ["forward", "train"] {
        fails_with(
            &["bench", m, "--mode", mode, "--runs", "1", "--len", max],
            &["max_sequence_length=256"],
        );
    }
}

#[test]
fn threads_are_bounded() {
    let g = golden_dir();
    let m = g.to_str().unwrap();
    let max = 4 * std::thread::available_parallelism().unwrap().get();
    let over = (max + 1).to_string();
    for n in ["0", over.as_str(), "1000000"] {
        fails_with(
            &["info", m, "--threads", n],
            &[
                &format!("threads={n}"),
                &format!("must be between 1 and {max}"),
            ],
        );
    }
    let (ok, _, err) = llada(&["info", m, "--threads", &max.to_string()]);
    assert!(ok, "{err}");
}

#[cfg(unix)]
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let g = golden_dir();
    // `llada info | head -0`: the reader is gone before the first line is written
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = common::llada_cmd(&["info", g.to_str().unwrap()])
        .stdout_to(writer)
        .run();
    let err = &out.stderr;
    // before: "failed printing to stdout: Broken pipe" panic, exit 101
    assert!(err.is_empty(), "{err}");
    // ended by SIGPIPE (13 on Linux and macOS), as `cat` is
    assert_eq!(out.status.signal(), Some(13), "{:?}", out.status);
}

#[test]
fn hub_refs_main_cannot_point_outside_the_cache() {
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let repo = cache.join("models--o--n");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    // a valid checkpoint outside the cache, which `refs/main` = "../../../outside" reached
    let outside = t.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        let tiny = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/tiny");
        std::fs::copy(tiny.join(f), outside.join(f)).unwrap();
    }
    std::fs::write(repo.join("refs/main"), "../../../outside").unwrap();
    let (ok, err) = llada_with(&["info", "o/n"], "", &[("HF_HUB_CACHE", &cache)]);
    assert!(!ok, "loaded the checkpoint outside the cache");
    assert!(
        err.contains("refs/main") && err.contains("not a revision") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn the_runner_kills_a_command_past_its_limit_and_names_it() {
    // `llada_with` waited without a limit: a command that never ends (here a server on a free
    // loopback port) hung the test run
    let g = golden_dir();
    let m = g.to_str().unwrap().to_string();
    let caught = std::panic::catch_unwind(move || {
        common::llada_cmd(&["serve", &m, "--host", "127.0.0.1", "--port", "0"])
            .limit(std::time::Duration::from_secs(10))
            .run()
    });
    let payload = caught.expect_err("the server ended on its own");
    let msg = payload
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    assert!(
        msg.contains("`llada serve ") && msg.contains("still running after 10 s: killed"),
        "{msg}"
    );
    // what it wrote before it was killed is shown
    assert!(msg.contains("llada serving"), "{msg}");
}

#[cfg(unix)]
#[test]
fn hub_refs_main_must_be_a_small_regular_file() {
    // a FIFO as refs/main hung `llada info o/n` (read with no check)
    let t = tempfile::tempdir().unwrap();
    let cache = t.path().join("hub");
    let repo = cache.join("models--o--n");
    std::fs::create_dir_all(repo.join("snapshots/abc")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(repo.join("refs/main"))
        .status()
        .unwrap();
    assert!(made.success());
    let (ok, err) = llada_with(&["info", "o/n"], "", &[("HF_HUB_CACHE", &cache)]);
    assert!(!ok);
    assert!(
        err.contains("refs/main") && err.contains("a FIFO") && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn init_refuses_a_config_whose_parameters_do_not_fit() {
    // the count saturated, tensor sizes wrapped, and `llada init` allocated from them
    let t = tempfile::tempdir().unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(golden_dir().join("config.json")).unwrap())
            .unwrap();
    cfg["d_model"] = serde_json::json!(1u64 << 40);
    cfg["mlp_hidden_size"] = serde_json::json!(1u64 << 40);
    let c = t.path().join("huge.json");
    std::fs::write(&c, cfg.to_string()).unwrap();
    let out = t.path().join("out");
    fails_with(
        &[
            "init",
            "--config",
            c.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
        &["d_model=1099511627776", "address space"],
    );
    assert!(!out.exists());
}
