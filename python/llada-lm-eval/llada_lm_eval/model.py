"""The lm-eval model `llada`: a client of `llada serve`.

- `loglikelihood` → `POST /v1/score` (the Monte Carlo bound, `mc_num` samples, `cfg` guidance,
  the request's `seed`; a one-token continuation is scored exactly by one forward pass);
- `loglikelihood_rolling` → `POST /v1/score` with an empty prompt (the bound of the whole text,
  which must fit the model's context);
- `generate_until` → `POST /v1/completions` (or `/v1/chat/completions` with `chat=true` or lm-eval's
  `--apply_chat_template`), with lm-eval's `until` strings and `max_gen_toks` and the sampler
  fields of the model arguments.

Requests are sent `concurrency` at a time; the server batches what it can. Tokenisation is the
server's, with lm-eval's rule that a context's trailing whitespace moves to the continuation (as
`llada eval` does), so the two give the same scores.
"""

import concurrent.futures as cf
import json
import sys
import time
import urllib.error
import urllib.request

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from .presets import preset as preset_args

# model arguments forwarded to the server's generation requests as they are
SAMPLER_KEYS = (
    "steps",
    "block_length",
    "threshold",
    "factor",
    "cache",
    "early_stop",
    "remasking",
    "temperature",
    "cfg_scale",
    "logits_eos_inf",
    "confidence_eos_eot_inf",
    "top_p",
    "top_k",
    "alg",
    "alg_temp",
    "eps",
)

# what lm-eval adds to every model's arguments; a client of a server has no use for them
HARNESS_KEYS = ("batch_size", "max_batch_size", "device")

# a chat conversation travels from apply_chat_template to generate_until under this prefix
CHAT_PREFIX = "\x00llada-chat:"


class ServerError(RuntimeError):
    """A request the server refused or could not answer."""


def _bool(v):
    if isinstance(v, bool):
        return v
    return str(v).strip().lower() in ("1", "true", "yes", "on")


# sampler fields whose "off" is JSON null (`threshold=none` turns the default threshold off)
NULLABLE_KEYS = ("threshold",)


def _none_words(key, v):
    """`none`/`null`/`off` for a nullable field is JSON null; other values go as they are."""
    if key in NULLABLE_KEYS and isinstance(v, str) and v.strip().lower() in ("none", "null", "off"):
        return None
    return v


@register_model("llada")
class LladaLM(LM):
    """lm-eval's view of a model served by `llada serve`."""

    def __init__(
        self,
        base_url="http://127.0.0.1:8000/v1",
        preset=None,
        mc_num=None,
        cfg=None,
        batch=None,
        seed=0,
        gen_length=None,
        chat=False,
        concurrency=8,
        timeout=3600.0,
        model=None,
        **kwargs,
    ):
        super().__init__()
        base = preset_args(preset) if preset else {}
        for k in HARNESS_KEYS:
            kwargs.pop(k, None)
        unknown = [k for k in kwargs if k not in SAMPLER_KEYS]
        if unknown:
            raise ValueError(
                f"unknown model argument(s) {', '.join(unknown)} for model llada "
                f"(known: base_url, preset, mc_num, cfg, batch, seed, gen_length, chat, concurrency, "
                f"timeout, model, {', '.join(SAMPLER_KEYS)})"
            )
        self.base_url = str(base_url).rstrip("/")
        self.mc_num = int(mc_num if mc_num is not None else base.get("mc_num", 128))
        self.cfg = float(cfg if cfg is not None else base.get("cfg", 0.0))
        if batch is None:
            # the server's default mini-batch (16), or the largest power of two dividing mc_num
            batch = next(b for b in (16, 8, 4, 2, 1) if self.mc_num % b == 0)
        self.batch = int(batch)
        self.seed = int(seed)
        gl = gen_length if gen_length is not None else base.get("gen_length")
        self.gen_length = int(gl) if gl is not None else None
        self.chat = _bool(chat)
        self.concurrency = max(1, int(concurrency))
        self.timeout = float(timeout)
        self.model_name = model
        self.sampler = {k: v for k, v in base.items() if k in SAMPLER_KEYS}
        self.sampler.update({k: _none_words(k, v) for k, v in kwargs.items()})
        self.forwards = 0
        self.answer_tokens = 0

    # ---- HTTP ---------------------------------------------------------------------------

    def _post(self, path, body):
        if self.model_name:
            body = dict(body, model=self.model_name)
        data = json.dumps(body).encode()
        for attempt in range(8):
            req = urllib.request.Request(
                self.base_url + path, data=data, headers={"Content-Type": "application/json"}
            )
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    return json.loads(r.read())
            except urllib.error.HTTPError as e:
                text = e.read().decode(errors="replace")
                if e.code == 429 and attempt < 7:
                    # the server's queue is full: wait and send again
                    time.sleep(0.25 * 2**attempt)
                    continue
                try:
                    message = json.loads(text)["error"]["message"]
                except (ValueError, KeyError, TypeError):
                    message = text
                raise ServerError(f"POST {self.base_url}{path}: HTTP {e.code}: {message}") from None
            except urllib.error.URLError as e:
                raise ServerError(
                    f"POST {self.base_url}{path}: {e.reason} (is `llada serve` running there?)"
                ) from None
        raise ServerError(f"POST {self.base_url}{path}: the server stayed overloaded (429)")

    def _map(self, fn, requests, disable_tqdm, what):
        """`fn` over the requests, `concurrency` at a time, results in order."""
        try:
            from tqdm import tqdm
        except ImportError:  # pragma: no cover
            tqdm = None
        bar = None
        if tqdm is not None and not disable_tqdm:
            bar = tqdm(total=len(requests), desc=f"llada {what}")
        out = [None] * len(requests)
        f0, a0, t0 = self.forwards, self.answer_tokens, time.monotonic()
        with cf.ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(fn, r): i for i, r in enumerate(requests)}
            for f in cf.as_completed(futures):
                out[futures[f]] = f.result()
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        seconds = time.monotonic() - t0
        summary = {
            "what": what,
            "requests": len(requests),
            "seconds": round(seconds, 3),
            "forwards": round(self.forwards - f0, 2),
        }
        if what == "generate_until":
            summary["answer_tokens"] = self.answer_tokens - a0
            summary["tokens_per_s"] = round((self.answer_tokens - a0) / max(seconds, 1e-9), 2)
        # one line per request type on stderr, for speed figures a user can compare
        print("llada-lm-eval " + json.dumps(summary), file=sys.stderr, flush=True)
        return out

    # ---- lm-eval's interface ------------------------------------------------------------

    def _score(self, prompt, answer):
        if prompt.startswith(CHAT_PREFIX):
            raise ServerError(
                "a chat-templated context cannot be scored: use --apply_chat_template with "
                "generation tasks only"
            )
        body = {
            "prompt": prompt,
            "answer": answer,
            "mc_num": self.mc_num,
            "batch": self.batch,
            "cfg_scale": self.cfg,
            "seed": self.seed,
        }
        r = self._post("/score", body)
        # a forward pass shared by the candidates of a question counts once
        self.forwards += int(r.get("nfe", 0)) / max(1, int(r.get("batch_size", 1)))
        return float(r["log_likelihood"])

    def loglikelihood(self, requests, disable_tqdm=False):
        def one(req):
            context, continuation = req.args
            # lm-eval's rule: the context's trailing whitespace belongs to the continuation
            n = len(context) - len(context.rstrip())
            if n:
                continuation = context[-n:] + continuation
                context = context[:-n]
            # the bound gives no greedy flag; is_greedy is reported False
            return (self._score(context, continuation), False)

        return self._map(one, requests, disable_tqdm, "loglikelihood")

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        def one(req):
            (text,) = req.args
            return self._score("", text)

        return self._map(one, requests, disable_tqdm, "loglikelihood_rolling")

    def generate_until(self, requests, disable_tqdm=False):
        def one(req):
            context, gen_kwargs = req.args
            gk = dict(gen_kwargs or {})
            until = gk.get("until") or []
            if isinstance(until, str):
                until = [until]
            until = [u for u in until if u]
            body = {
                "max_tokens": int(self.gen_length or gk.get("max_gen_toks") or 256),
                "seed": self.seed,
            }
            if (
                "temperature" not in self.sampler
                and _bool(gk.get("do_sample", False))
                and gk.get("temperature") is not None
            ):
                body["temperature"] = float(gk["temperature"])
            body.update(self.sampler)
            if until:
                # the server takes 4 stop strings; every one is applied here too
                body["stop"] = until[:4]
            if context.startswith(CHAT_PREFIX):
                body["messages"] = json.loads(context[len(CHAT_PREFIX) :])
                path = "/chat/completions"
            elif self.chat:
                body["messages"] = [{"role": "user", "content": context}]
                path = "/chat/completions"
            else:
                body["prompt"] = context
                path = "/completions"
            r = self._post(path, body)
            info = r.get("llada", {})
            # the forward passes of a batch the request shared count once
            self.forwards += int(info.get("nfe", 0)) / max(1, int(info.get("batch_size", 1)))
            self.answer_tokens += int(r.get("usage", {}).get("completion_tokens", 0))
            choice = r["choices"][0]
            text = choice["message"]["content"] if "messages" in body else choice["text"]
            for u in until:
                text = text.split(u)[0]
            return text

        return self._map(one, requests, disable_tqdm, "generate_until")

    # ---- chat templates: the server renders them -----------------------------------------

    @property
    def tokenizer_name(self):
        return "llada-server"

    def chat_template(self, chat_template=False):
        return "llada-server" if chat_template else None

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        """The conversation itself, marked: the server applies the model's template."""
        return CHAT_PREFIX + json.dumps(list(chat_history))
