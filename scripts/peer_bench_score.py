#!/usr/bin/env python3
"""Times the PyTorch peer's get_log_likelihood (../shared/peer/llada_torch.py) with the settings of
`llada bench --mode score`: seeded random prompt and answer, mc_num, batch. Prints one JSON line."""
import argparse, json, os, sys, time

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--peer", default=os.path.join(os.path.dirname(__file__), "../../shared/peer"))
ap.add_argument("--prompt-len", type=int, default=64)
ap.add_argument("--answer-len", type=int, default=32)
ap.add_argument("--mc-num", type=int, default=128)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--repeat", type=int, default=3)
ap.add_argument("--dtype", default="float32")
a = ap.parse_args()
sys.path.insert(0, a.peer)
import torch
import llada_torch as L

torch.set_num_threads(a.threads)
model = L.load(a.model, getattr(torch, a.dtype))
g = torch.Generator().manual_seed(0)
hi = min(model.mask_id, model.wte.shape[0]) - 1
prompt = torch.randint(0, hi, (a.prompt_len,), generator=g)
answer = torch.randint(0, hi, (a.answer_len,), generator=g)
L.get_log_likelihood(model, prompt, answer, mc_num=a.batch, batch_size=a.batch)  # warm-up
times = []
for _ in range(a.repeat):
    t = time.perf_counter()
    L.get_log_likelihood(model, prompt, answer, mc_num=a.mc_num, batch_size=a.batch)
    times.append(time.perf_counter() - t)
med = sorted(times)[len(times) // 2]
print(json.dumps({"impl": "llada_torch.py get_log_likelihood", "seconds_per_answer": med,
                  "answers_per_s": 1 / med, "mc_num": a.mc_num, "batch": a.batch,
                  "prompt_len": a.prompt_len, "answer_len": a.answer_len, "threads": a.threads}))
