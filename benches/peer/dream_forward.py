#!/usr/bin/env python3
"""Times one forward pass of a Dream checkpoint in eager PyTorch, built from the speed peer's
LLaDA implementation (../shared/peer/llada_torch.py: its RMSNorm, RoPE tables and rotation, SDPA
attention, SwiGLU) with Dream's differences added here: the Hugging Face Qwen2 tensor names and
the q/k/v projection biases. Dream's logit shift does not change the cost of a forward.

    python benches/peer/dream_forward.py --peer ../shared/peer --model DIR --len 96 --threads 2 \
        --dtype bfloat16 --runs 3

Prints one JSON line: the median and all timed runs (after one warm-up forward).
"""
import argparse
import importlib.util
import json
import os
import sys
import time

import torch
import torch.nn.functional as F


def peer_module(path):
    spec = importlib.util.spec_from_file_location("llada_torch", os.path.join(path, "llada_torch.py"))
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--len", type=int, default=96)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    peer = peer_module(a.peer)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[a.dtype]
    with open(os.path.join(a.model, "config.json")) as f:
        dc = json.load(f)
    # Dream's config in the peer's (LLaDA) keys
    cfg = {"d_model": dc["hidden_size"], "n_heads": dc["num_attention_heads"],
           "n_kv_heads": dc.get("num_key_value_heads"), "n_layers": dc["num_hidden_layers"],
           "rms_norm_eps": dc["rms_norm_eps"], "rope_theta": dc["rope_theta"],
           "mask_token_id": dc.get("mask_token_id"), "eos_token_id": dc.get("eos_token_id"),
           "weight_tying": dc.get("tie_word_embeddings", False), "max_sequence_length": a.len}
    sd = peer.read_weights(a.model)  # strips the leading "model."
    rename = {"embed_tokens.weight": "transformer.wte.weight", "norm.weight": "transformer.ln_f.weight",
              "lm_head.weight": "transformer.ff_out.weight"}
    parts = {"input_layernorm": "attn_norm", "self_attn.q_proj": "q_proj", "self_attn.k_proj": "k_proj",
             "self_attn.v_proj": "v_proj", "self_attn.o_proj": "attn_out", "post_attention_layernorm": "ff_norm",
             "mlp.gate_proj": "ff_proj", "mlp.up_proj": "up_proj", "mlp.down_proj": "ff_out"}
    w, biases = {}, {}
    for k, v in sd.items():
        if k in rename:
            w[rename[k]] = v
            continue
        _, i, rest = k.split(".", 2)
        part, kind = rest.rsplit(".", 1)
        if kind == "bias":
            biases[(int(i), parts[part])] = v.to(dtype)
        else:
            w[f"transformer.blocks.{i}.{parts[part]}.weight"] = v
    del sd
    model = peer.LLaDA(cfg, w, dtype=dtype).eval()
    del w
    for i, layer in enumerate(model.layers):
        layer["biases"] = {n: biases[(i, n)] for n in ("q_proj", "k_proj", "v_proj")}

    def forward(ids):
        # the peer's forward with the q/k/v biases of Qwen2
        B, T = ids.shape
        x = F.embedding(ids, model.wte)
        sin, cos = model.rope_tables(T, x.device)
        for L in model.layers:
            h = model.rms(x, L["attn_norm"])
            bq, bk, bv = (L["biases"][n] for n in ("q_proj", "k_proj", "v_proj"))
            q = F.linear(h, L["q_proj"], bq).view(B, T, model.nh, model.hd).transpose(1, 2)
            k = F.linear(h, L["k_proj"], bk).view(B, T, model.nkv, model.hd).transpose(1, 2)
            v = F.linear(h, L["v_proj"], bv).view(B, T, model.nkv, model.hd).transpose(1, 2)
            q = model.rotate(q.float(), sin, cos).to(h.dtype)
            k = model.rotate(k.float(), sin, cos).to(h.dtype)
            if model.nkv != model.nh:
                rep = model.nh // model.nkv
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            att = F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
            x = x + F.linear(att.transpose(1, 2).contiguous().view(B, T, model.d), L["attn_out"])
            h = model.rms(x, L["ff_norm"])
            x = x + F.linear(F.silu(F.linear(h, L["ff_proj"])) * F.linear(h, L["up_proj"]), L["ff_out"])
        return F.linear(model.rms(x, model.ln_f), model.head)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (1, a.len), generator=g)
    times = []
    with torch.no_grad():
        forward(ids)
        for _ in range(a.runs):
            t0 = time.perf_counter()
            out = forward(ids)
            times.append(time.perf_counter() - t0)
    assert torch.isfinite(out.float()).all()
    med = sorted(times)[len(times) // 2]
    print(json.dumps({"impl": "eager PyTorch (llada_torch.py blocks + Qwen2 biases)", "model": os.path.abspath(a.model),
                      "dtype": a.dtype, "threads": a.threads, "len": a.len, "seconds": round(med, 4),
                      "seconds_all": [round(t, 4) for t in times], "torch": torch.__version__}))


if __name__ == "__main__":
    sys.exit(main())
