#!/usr/bin/env python3
"""Sends N malformed or hostile requests (seeded) and checks that each gets a 4xx JSON error (never
a 5xx or a dropped connection) and that the server is healthy afterwards. Usage: fuzz.py BASE_URL [N]"""
import json, random, sys, urllib.error, urllib.request

base = sys.argv[1]
n = int(sys.argv[2]) if len(sys.argv) > 2 else 500
rng = random.Random(1234)
paths = ["/v1/chat/completions", "/v1/completions", "/v1/score"]
fields = ["max_tokens", "temperature", "steps", "block_length", "threshold", "cache", "seed", "cfg_scale",
          "remasking", "stream", "n", "mc_num", "batch", "stop", "denoise", "factor", "early_stop"]
weird = [None, -1, -10**30, 10**30, 1e308, float("-inf") if False else -1e308, "", "x" * 5000, [], {}, [1, 2],
         {"a": {"b": {"c": [1]}}}, True, 0, 0.0, "none", "dual", "random", -0.0, 2**64, "💥", "\u0000"]


def body():
    kind = rng.randrange(8)
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))  # random bytes
    if kind == 1:
        return b"{" * rng.randrange(1, 3000)  # unterminated / deeply nested
    if kind == 2:
        return json.dumps(rng.choice(weird)).encode()  # not an object
    if kind == 3:
        return b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}'  # invalid UTF-8
    d = {}
    if rng.random() < 0.7:
        d["messages"] = rng.choice([[{"role": "user", "content": "hi"}], [], "hi", [{"role": 5}], [{"content": []}], None])
    if rng.random() < 0.7:
        d["prompt"] = rng.choice(["hi", 5, [], [1, 2], None, ["a"] * 40, "word " * 500])
    if rng.random() < 0.5:
        d["answer"] = rng.choice(["", " x", 5, None])
    for f in rng.sample(fields, rng.randrange(1, 6)):
        d[f] = rng.choice(weird)
    if rng.random() < 0.3:
        d["max_tokens"] = rng.choice([0, -5, 10**12, "8", 8.5])
    return json.dumps(d).encode()


bad = []
codes = {}
for i in range(n):
    path = rng.choice(paths)
    b = body()
    req = urllib.request.Request(base + path, data=b, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            code = r.status
            r.read()
    except urllib.error.HTTPError as e:
        code = e.code
        payload = e.read()
        try:
            json.loads(payload)
        except Exception:
            bad.append(f"{path} {b[:80]!r}: non-JSON error body {payload[:80]!r}")
    except Exception as e:
        code = -1
        bad.append(f"{path} {b[:80]!r}: {e!r}")
    codes[code] = codes.get(code, 0) + 1
    if code >= 500 or code < 0:
        bad.append(f"{path} {b[:120]!r} -> {code}")
with urllib.request.urlopen(base + "/health", timeout=10) as r:
    health = json.loads(r.read())
assert health["status"] == "ok", health
print(json.dumps({"requests": n, "codes": codes, "bad": bad[:10]}))
if bad:
    raise SystemExit(f"{len(bad)} bad answers")
print("fuzz: ok, server healthy")
