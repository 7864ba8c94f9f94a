#!/usr/bin/env python3
"""The official `openai` client against `llada serve` on loopback: models, completion, chat,
streaming chat, extra sampler fields. Usage: openai_client.py BASE_URL"""
import sys

from openai import OpenAI

base = sys.argv[1]
client = OpenAI(base_url=f"{base}/v1", api_key="not-needed")

models = client.models.list()
name = models.data[0].id
print("models:", [m.id for m in models.data])

c = client.completions.create(model=name, prompt="In the beginning God created", max_tokens=16)
assert c.choices[0].text is not None and c.choices[0].finish_reason in ("stop", "length"), c
print("completion:", repr(c.choices[0].text))

r = client.chat.completions.create(
    model=name,
    messages=[{"role": "user", "content": "The LORD is my shepherd; I shall not want."}],
    max_tokens=32,
    extra_body={"steps": 32, "block_length": 8, "threshold": None, "cache": "none"},
)
msg = r.choices[0].message
assert msg.role == "assistant" and isinstance(msg.content, str), r
assert r.usage.prompt_tokens > 0
print("chat:", repr(msg.content))

pieces = []
finish = None
stream = client.chat.completions.create(
    model=name,
    messages=[{"role": "user", "content": "Blessed are the meek"}],
    max_tokens=32,
    stream=True,
    extra_body={"threshold": 0.9, "cache": "dual"},
)
for chunk in stream:
    d = chunk.choices[0].delta
    if d.content:
        pieces.append(d.content)
    if chunk.choices[0].finish_reason:
        finish = chunk.choices[0].finish_reason
assert finish in ("stop", "length"), finish
print("stream:", repr("".join(pieces)), finish)

# stream_options.include_usage: the last chunk has no choices and the usage
usage = None
for chunk in client.chat.completions.create(
    model=name,
    messages=[{"role": "user", "content": "Blessed are the meek"}],
    max_tokens=16,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.usage is not None:
        assert chunk.choices == [], chunk
        usage = chunk.usage
assert usage is not None and usage.prompt_tokens > 0, usage
print("stream usage:", usage)

# n answers of one prompt
r = client.chat.completions.create(
    model=name, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=2, temperature=0.8, seed=3
)
assert [c.index for c in r.choices] == [0, 1], r
print("n=2:", [c.message.content for c in r.choices])

# penalties a diffusion sampler cannot honour are refused, naming the field
try:
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=8, frequency_penalty=0.5)
    raise SystemExit("frequency_penalty=0.5 was accepted")
except Exception as e:
    assert "frequency_penalty" in str(e), e

try:
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "x"}], max_tokens=-1)
    raise SystemExit("max_tokens=-1 was accepted")
except Exception as e:  # openai.UnprocessableEntityError
    assert "max_tokens" in str(e), e
print("openai client: ok")
