#!/usr/bin/env python3
"""Sends N malformed or hostile requests (seeded) and checks that each gets a 4xx JSON error (never
a 5xx or a dropped connection), then the hostile shapes of issue 16 with their exact answers
(content type, origin, body size, score work bounds and seed, logprobs, partial headers, the
connection cap), and that the server is healthy afterwards.
Usage: fuzz.py BASE_URL [N] [--max-connections C]  (C: the server's --max-connections, to test the cap)"""
import json, random, socket, sys, time, urllib.error, urllib.parse, urllib.request

args = [a for a in sys.argv[1:]]
max_connections = None
if "--max-connections" in args:
    i = args.index("--max-connections")
    max_connections = int(args[i + 1])
    del args[i:i + 2]
base = args[0]
n = int(args[1]) if len(args) > 1 else 500
rng = random.Random(1234)
paths = ["/v1/chat/completions", "/v1/completions", "/v1/score"]
fields = ["max_tokens", "temperature", "steps", "block_length", "threshold", "cache", "seed", "cfg_scale",
          "remasking", "stream", "n", "mc_num", "batch", "stop", "denoise", "factor", "early_stop",
          "alg", "alg_temp", "eps", "top_p", "top_k"]
weird = [None, -1, -10**30, 10**30, 1e308, float("-inf") if False else -1e308, "", "x" * 5000, [], {}, [1, 2],
         {"a": {"b": {"c": [1]}}}, True, 0, 0.0, "none", "dual", "random", -0.0, 2**64, "💥", "\u0000",
         "entropy", "origin", 0.5]


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


def post(path, data, headers):
    """(status, parsed JSON body or None) of one POST."""
    req = urllib.request.Request(base + path, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            code, payload = r.status, r.read()
    except urllib.error.HTTPError as e:
        code, payload = e.code, e.read()
    try:
        return code, json.loads(payload)
    except Exception:
        return code, None


JSON = {"content-type": "application/json"}
words = " ".join(["word"] * 60)
host = urllib.parse.urlparse(base).netloc
shapes = [
    # (what, path, body, headers, status, param or None)
    ("text/plain POST", "/v1/completions", b'{"prompt": "hi", "max_tokens": 4}', {"content-type": "text/plain"}, 415, None),
    ("no content type", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', {}, 415, None),
    ("form POST", "/v1/score", b"prompt=a&answer=b", {"content-type": "application/x-www-form-urlencoded"}, 415, None),
    ("another origin", "/v1/completions", b'{"prompt": "hi", "max_tokens": 4}', {**JSON, "origin": "http://evil.example"}, 403, None),
    ("origin null", "/v1/completions", b'{"prompt": "hi", "max_tokens": 4}', {**JSON, "origin": "null"}, 403, None),
    ("own origin", "/v1/completions", b'{"prompt": "hi", "max_tokens": 4}', {**JSON, "origin": "http://" + host}, 200, None),
    ("body past the limit", "/v1/completions", json.dumps({"prompt": "x" * (3 << 20)}).encode(), JSON, 413, None),
    ("score seed abc", "/v1/score", json.dumps({"prompt": "a", "answer": " b", "seed": "abc"}).encode(), JSON, 422, "seed"),
    ("score batch x tokens", "/v1/score", json.dumps({"prompt": words, "answer": " " + words, "mc_num": 256, "batch": 256}).encode(), JSON, 422, "batch"),
    ("score mc_num", "/v1/score", json.dumps({"prompt": "a", "answer": " b c", "mc_num": 1 << 20, "batch": 1}).encode(), JSON, 422, "mc_num"),
    ("logprobs", "/v1/completions", json.dumps({"prompt": "a", "logprobs": 2}).encode(), JSON, 422, "logprobs"),
    ("chat logprobs", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a"}], "logprobs": True}).encode(), JSON, 422, "logprobs"),
    ("top_logprobs", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 1}).encode(), JSON, 422, "top_logprobs"),
]
for what, path, data, headers, want, param in shapes:
    code, v = post(path, data, headers)
    if code != want:
        bad.append(f"{what}: {code}, want {want}: {v}")
    elif want != 200 and not (v and isinstance(v.get("error", {}).get("message"), str)):
        bad.append(f"{what}: no OpenAI-style JSON error: {v}")
    elif param and v["error"].get("param") != param:
        bad.append(f"{what}: param {v['error'].get('param')}, want {param}")
    codes[code] = codes.get(code, 0) + 1

addr = urllib.parse.urlparse(base)
addr = (addr.hostname, addr.port)


def read_all(sock, limit):
    """What the server sends until it closes the connection (None: still open after `limit` s)."""
    sock.settimeout(limit)
    out = b""
    try:
        while True:
            d = sock.recv(65536)
            if not d:
                return out
            out += d
    except socket.timeout:
        return None


# a client that never finishes its headers is disconnected (the server's --header-timeout)
s = socket.create_connection(addr)
s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
if read_all(s, 60) is None:
    bad.append("partial headers: the connection stayed open for 60 s")
s.close()

# beyond the connection cap: a 503 JSON error, and the server serves again once they close
if max_connections:
    held = [socket.create_connection(addr) for _ in range(max_connections)]
    time.sleep(0.5)
    s = socket.create_connection(addr)
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    out = read_all(s, 30) or b""
    s.close()
    head, _, payload = out.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 503"):
        bad.append(f"connection cap: {head[:40]!r}, want 503")
    else:
        try:
            assert "max-connections" in json.loads(payload)["error"]["message"]
        except Exception:
            bad.append(f"connection cap: no JSON error: {payload[:80]!r}")
    for h in held:
        h.close()
    for _ in range(100):
        try:
            with urllib.request.urlopen(base + "/health", timeout=10) as r:
                if r.status == 200:
                    break
        except Exception:
            time.sleep(0.1)

with urllib.request.urlopen(base + "/health", timeout=10) as r:
    health = json.loads(r.read())
assert health["status"] == "ok", health
print(json.dumps({"requests": n, "codes": codes, "bad": bad[:10]}))
if bad:
    raise SystemExit(f"{len(bad)} bad answers")
print("fuzz: ok, server healthy")
