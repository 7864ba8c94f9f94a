#!/usr/bin/env python3
"""Load test on loopback: CONCURRENCY clients send TOTAL requests; only deliberate 429s are
allowed. Prints one JSON line: throughput and p50/p99 latency.
Usage: load.py BASE_URL [--concurrency 32] [--total 200] [--max-tokens 16] [--same-prompt]"""
import argparse, json, threading, time, urllib.error, urllib.request

ap = argparse.ArgumentParser()
ap.add_argument("base")
ap.add_argument("--concurrency", type=int, default=32)
ap.add_argument("--total", type=int, default=200)
ap.add_argument("--max-tokens", type=int, default=16)
ap.add_argument("--same-prompt", action="store_true", help="identical prompts (batchable)")
ap.add_argument("--timeout", type=float, default=600)
a = ap.parse_args()

prompts = ["In the beginning", "And God said", "Blessed are the meek", "The LORD is my shepherd",
           "What is 3 + 4?", "Reverse the list: bread, water.", "Repeat after me: light of the world."]
lock = threading.Lock()
next_i = 0
lat, codes, errors, tokens = [], {}, [], 0


def worker():
    global next_i, tokens
    while True:
        with lock:
            if next_i >= a.total:
                return
            i = next_i
            next_i += 1
        p = prompts[0] if a.same_prompt else prompts[i % len(prompts)]
        body = json.dumps({"messages": [{"role": "user", "content": p}], "max_tokens": a.max_tokens}).encode()
        req = urllib.request.Request(a.base + "/v1/chat/completions", data=body, headers={"content-type": "application/json"})
        t = time.perf_counter()
        try:
            with urllib.request.urlopen(req, timeout=a.timeout) as r:
                v = json.loads(r.read())
                code = r.status
                with lock:
                    tokens += a.max_tokens
        except urllib.error.HTTPError as e:
            code = e.code
            if code != 429:
                with lock:
                    errors.append(f"{code}: {e.read()[:200]}")
        except Exception as e:  # connection errors
            code = -1
            with lock:
                errors.append(repr(e))
        dt = time.perf_counter() - t
        with lock:
            codes[code] = codes.get(code, 0) + 1
            if code == 200:
                lat.append(dt)


t0 = time.perf_counter()
threads = [threading.Thread(target=worker) for _ in range(a.concurrency)]
for t in threads:
    t.start()
for t in threads:
    t.join()
wall = time.perf_counter() - t0
lat.sort()
pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None
out = {"concurrency": a.concurrency, "total": a.total, "codes": codes, "seconds": round(wall, 3),
       "requests_per_s": round(codes.get(200, 0) / wall, 3), "tokens_per_s": round(tokens / wall, 2),
       "p50_s": pct(0.5), "p99_s": pct(0.99), "errors": errors[:5]}
print(json.dumps(out))
if errors:
    raise SystemExit(f"{len(errors)} unexpected errors")
if codes.get(200, 0) == 0:
    raise SystemExit("no request succeeded")
