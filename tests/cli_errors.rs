//! Impossible settings and bad input make the binary exit non-zero with a message naming the value
//! and the rule, never a panic.

mod common;

use common::golden_dir;

fn llada(args: &[&str]) -> (bool, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llada"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
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
    use std::io::Write;
    let g = golden_dir();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llada"))
        .args([
            "chat",
            g.to_str().unwrap(),
            "--gen-length",
            "16",
            "--steps",
            "16",
            "--block-length",
            "8",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"Who is my shepherd?\nAnd then?\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // one answer line per turn
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
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
