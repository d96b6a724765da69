"""Workloads: what to send and when (pure Python + numpy, seeded, no I/O but the corpus).

* Text: a real English corpus available offline, the docstrings of Python's
  standard library modules, extracted in a fixed order (:func:`corpus_text`).
* Arrivals: Poisson (exponential gaps) or bursty gamma gaps with a chosen
  coefficient of variation, at a rate; or a fixed concurrency (closed loop).
* Lengths: fixed, uniform, or log-normal (long-tailed, chat-like), clipped.
* A shared prefix: every prompt can start with the same ``shared_prefix``
  tokens (a long system prompt, the case prefix caching is for).

``Workload.schedule(duration_s, seed)`` returns the requests with their send
times; prompts are token-exact slices of the corpus, decoded to text.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field

import numpy as np

_CORPUS_MODULES = ("argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions",
                   "functools", "heapq", "http", "inspect", "json", "logging", "pathlib", "pickle", "queue",
                   "random", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap",
                   "threading", "typing", "unittest", "urllib", "uuid", "zipfile")


def corpus_text(min_chars: int = 200_000) -> str:
    """Docstrings of standard-library modules and their public members, in a fixed order."""
    parts: list[str] = []
    for name in _CORPUS_MODULES:
        mod = importlib.import_module(name)
        if mod.__doc__:
            parts.append(mod.__doc__.strip())
        for attr in sorted(dir(mod)):
            if attr.startswith("_"):
                continue
            doc = getattr(getattr(mod, attr, None), "__doc__", None)
            if isinstance(doc, str) and len(doc) > 200 and doc not in parts:
                parts.append(doc.strip())
    text = "\n\n".join(parts)
    while len(text) < min_chars:
        text += "\n\n" + text
    return text


@dataclass(frozen=True)
class Lengths:
    """kind: "fixed" (a), "uniform" [a, b], "lognormal" (median a, sigma b), clipped to [lo, hi]."""

    kind: str
    a: float
    b: float = 0.0
    lo: int = 1
    hi: int = 1 << 20

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.kind == "fixed":
            x = np.full(n, self.a)
        elif self.kind == "uniform":
            x = rng.uniform(self.a, self.b, n)
        elif self.kind == "lognormal":
            x = rng.lognormal(np.log(self.a), self.b, n)
        else:
            raise ValueError(f"length kind must be fixed, uniform or lognormal; got {self.kind!r}")
        return np.clip(np.round(x), self.lo, self.hi).astype(int)


def arrival_times(rate: float, duration_s: float, rng: np.random.Generator, cv: float = 1.0) -> np.ndarray:
    """Send times in [0, duration): Poisson when cv == 1, gamma gaps (bursty when cv > 1) otherwise."""
    if rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    n_max = int(rate * duration_s * 3 + 20)
    if cv == 1.0:
        gaps = rng.exponential(1.0 / rate, n_max)
    else:  # gamma with mean 1/rate and coefficient of variation cv: shape k = 1/cv^2
        k = 1.0 / (cv * cv)
        gaps = rng.gamma(k, 1.0 / (rate * k), n_max)
    t = np.cumsum(gaps)
    return t[t < duration_s]


@dataclass(frozen=True)
class RequestSpec:
    index: int
    send_at: float  # seconds after the start (open loop); 0 for closed loop
    prompt: str
    prompt_tokens: int
    max_tokens: int
    kind: str = "default"


@dataclass(frozen=True)
class Workload:
    """A mix of request classes: (weight, prompt lengths, output lengths, class name); with
    ``shared_prefix`` > 0, every prompt starts with the corpus's first ``shared_prefix`` tokens (its own
    part follows, sampled as the class says)."""

    name: str
    classes: tuple = field(default_factory=tuple)
    shared_prefix: int = 0

    def specs(self, n: int, rng: np.random.Generator, tokenizer, corpus_ids: list[int]) -> list[RequestSpec]:
        weights = np.array([c[0] for c in self.classes], dtype=float)
        which = rng.choice(len(self.classes), size=n, p=weights / weights.sum())
        out = []
        for i, c in enumerate(which):
            _, plen, olen, kind = self.classes[c]
            p = int(plen.sample(rng, 1)[0])
            o = int(olen.sample(rng, 1)[0])
            start = int(rng.integers(self.shared_prefix, max(self.shared_prefix + 1, len(corpus_ids) - p)))
            ids = corpus_ids[:self.shared_prefix] + corpus_ids[start:start + p]
            out.append(RequestSpec(i, 0.0, tokenizer.decode(ids), len(ids), o, kind))
        return out

    def schedule(self, rate: float, duration_s: float, seed: int, tokenizer, corpus_ids: list[int],
                 cv: float = 1.0) -> list[RequestSpec]:
        rng = np.random.default_rng(seed)
        times = arrival_times(rate, duration_s, rng, cv)
        specs = self.specs(len(times), rng, tokenizer, corpus_ids)
        return [RequestSpec(s.index, float(t), s.prompt, s.prompt_tokens, s.max_tokens, s.kind)
                for s, t in zip(specs, times)]


WORKLOADS = {
    # (a) short chat: prompts ~100 tokens, outputs ~128
    "short_chat": Workload("short_chat", ((1.0, Lengths("lognormal", 100, 0.3, 16, 400),
                                           Lengths("lognormal", 128, 0.3, 8, 256), "chat"),)),
    # (b) mixed: mostly short chats, with long prompts (1-2k tokens) arriving among them
    "mixed": Workload("mixed", ((0.85, Lengths("lognormal", 100, 0.3, 16, 400),
                                 Lengths("lognormal", 128, 0.3, 8, 256), "chat"),
                                (0.15, Lengths("uniform", 1024, 2048), Lengths("fixed", 32), "long_prompt"))),
    # (d) a shared system prompt of 768 tokens before each short question (~64 tokens), short answers
    "shared_prefix": Workload("shared_prefix", ((1.0, Lengths("lognormal", 64, 0.3, 16, 160),
                                                 Lengths("lognormal", 48, 0.3, 8, 96), "chat"),), shared_prefix=768),
    # (c) the ramp uses short_chat requests at fixed concurrency 1 -> 32 (see runner.run_concurrency)
}
