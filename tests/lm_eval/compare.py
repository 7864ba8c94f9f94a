#!/usr/bin/env python3
"""Checks that lm-eval through llada reproduces `llada eval` / `llada eval-chat` on the same data:
per question, the same log-likelihood of every choice (to JSON precision) and the same accuracy;
per case, the same answer and the same exact-match accuracy.

Usage: compare.py mc LM_EVAL_OUT LLADA_EVAL.json | compare.py chat LM_EVAL_OUT LLADA_EVAL_CHAT.json
"""
import glob
import json
import math
import sys


def lm_eval_files(out, task):
    results = sorted(glob.glob(f"{out}/**/results_*.json", recursive=True))
    samples = sorted(glob.glob(f"{out}/**/samples_{task}_*.jsonl", recursive=True))
    if not results or not samples:
        sys.exit(f"no lm-eval results/samples for {task} under {out}")
    res = json.load(open(results[-1]))["results"][task]
    rows = [json.loads(l) for l in open(samples[-1])]
    rows.sort(key=lambda r: r["doc_id"])
    return res, rows


def mc(out, ours_path):
    res, rows = lm_eval_files(out, "llada_mc")
    ours = json.load(open(ours_path))
    assert len(rows) == len(ours["results"]), (len(rows), len(ours["results"]))
    for r, o in zip(rows, ours["results"]):
        lls = [float(x[0]) for x in r["filtered_resps"]]
        for a, b in zip(lls, o["scores"]):
            assert math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9), (r["doc_id"], lls, o["scores"])
    for key, mine in [("acc,none", "accuracy"), ("acc_norm,none", "accuracy_norm")]:
        assert math.isclose(res[key], ours[mine], abs_tol=1e-12), (key, res[key], ours[mine])
    print(f"mc: {len(rows)} questions, every choice's score equal; acc {res['acc,none']:.4f} = llada eval's, acc_norm {res['acc_norm,none']:.4f} = llada eval's")


def chat(out, ours_path):
    res, rows = lm_eval_files(out, "llada_chat")
    ours = json.load(open(ours_path))
    assert len(rows) == len(ours["results"])
    for r, o in zip(rows, ours["results"]):
        answer = r["filtered_resps"][0]
        if isinstance(answer, list):
            answer = answer[0]
        assert answer.strip() == o["answer"].strip(), (r["doc_id"], answer, o["answer"])
    em = res["exact_match,trimmed"]
    assert math.isclose(em, ours["accuracy"], abs_tol=1e-12), (em, ours["accuracy"])
    print(f"chat: {len(rows)} cases, every answer equal; exact match {em:.4f} = llada eval-chat's")


if __name__ == "__main__":
    {"mc": mc, "chat": chat}[sys.argv[1]](sys.argv[2], sys.argv[3])
