"""The benchmark harness itself: arrivals, lengths, timing bookkeeping, goodput search, JSON, plots."""

import asyncio
import json
import time

import numpy as np
import pytest

from splitserve.bench import metrics, report
from splitserve.bench.runner import run_concurrency, run_open_loop
from splitserve.bench.workload import WORKLOADS, Lengths, RequestSpec, arrival_times, corpus_text


def test_poisson_and_bursty_arrivals_have_the_asked_statistics():
    rng = np.random.default_rng(0)
    t = arrival_times(rate=5.0, duration_s=2000, rng=rng)
    gaps = np.diff(t)
    assert abs(len(t) / 2000 - 5.0) < 0.15  # rate
    assert abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # exponential: CV 1
    b = np.diff(arrival_times(rate=5.0, duration_s=2000, rng=rng, cv=3.0))
    assert abs(b.mean() - 0.2) < 0.02 and abs(b.std() / b.mean() - 3.0) < 0.3  # gamma: same mean, CV 3
    with pytest.raises(ValueError, match="rate must be > 0"):
        arrival_times(0, 10, rng)


def test_length_distributions():
    rng = np.random.default_rng(1)
    assert set(Lengths("fixed", 32).sample(rng, 100)) == {32}
    u = Lengths("uniform", 1024, 2048).sample(rng, 2000)
    assert u.min() >= 1024 and u.max() <= 2048 and abs(u.mean() - 1536) < 30
    ln = Lengths("lognormal", 100, 0.5, 10, 1000).sample(rng, 5000)
    assert abs(np.median(ln) - 100) < 5 and ln.max() <= 1000 and ln.mean() > np.median(ln)  # long right tail
    with pytest.raises(ValueError, match="fixed, uniform or lognormal"):
        Lengths("zipf", 1).sample(rng, 1)


class WordTokenizer:
    """Stand-in tokenizer (one token per word) so workload tests need no model."""

    def __init__(self):
        self.vocab, self.words = {}, []

    def encode(self, text):
        ids = []
        for w in text.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.words)
                self.words.append(w)
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids):
        return " ".join(self.words[i] for i in ids)


def test_workloads_are_deterministic_real_text_with_the_asked_lengths():
    text = corpus_text()
    assert text == corpus_text() and len(text) > 100_000
    assert all(w in text for w in (" the ", " return ", " file "))  # English prose, from the stdlib's docs
    tok = WordTokenizer()
    ids = tok.encode(text)
    a = WORKLOADS["mixed"].schedule(2.0, 300, seed=7, tokenizer=tok, corpus_ids=ids)
    b = WORKLOADS["mixed"].schedule(2.0, 300, seed=7, tokenizer=tok, corpus_ids=ids)
    assert a == b and len(a) > 400
    long = [s for s in a if s.kind == "long_prompt"]
    assert 0.08 < len(long) / len(a) < 0.22  # ~15% long prompts among short chats
    assert all(1024 <= s.prompt_tokens <= 2048 and len(s.prompt.split()) == s.prompt_tokens for s in long)
    assert all(s.send_at < 300 for s in a) and [s.send_at for s in a] == sorted(s.send_at for s in a)


class ScriptedClient:
    """A fake server stream with known timing: first token after ``ttft``, then one every ``gap``."""

    def __init__(self, ttft=0.05, gap=0.02, fail_on=(), hang_on=()):
        self.ttft, self.gap, self.fail_on, self.hang_on = ttft, gap, fail_on, hang_on

    async def stream(self, request_id, prompt, max_tokens):
        i = int(request_id.split("-")[1])
        if i in self.fail_on:
            raise RuntimeError("server said no")
        if i in self.hang_on:
            await asyncio.sleep(3600)
        await asyncio.sleep(self.ttft)
        for k in range(max_tokens):
            if k:
                await asyncio.sleep(self.gap)
            yield 1


def _specs(n, max_tokens=6, spacing=0.01):
    return [RequestSpec(i, i * spacing, "p", 10, max_tokens) for i in range(n)]


def test_ttft_tpot_bookkeeping_on_a_scripted_stream():
    records = asyncio.run(run_open_loop(ScriptedClient(ttft=0.05, gap=0.02), _specs(5), progress=False))
    assert len(records) == 5
    for r in records:
        assert r.ok and r.output_tokens == 6 and len(r.gaps) == 5
        assert 0.045 <= r.ttft <= 0.09
        assert 0.018 <= r.tpot <= 0.035
        assert r.e2e == pytest.approx(r.ttft + sum(r.gaps), abs=0.01)
    s = metrics.summarize(records, slo_ttft=0.2, slo_tpot=0.05)
    assert s["slo_attainment"] == 1.0 and s["num_errors"] == 0
    assert metrics.summarize(records, slo_ttft=0.01, slo_tpot=0.05)["slo_attainment"] == 0.0


def test_errors_and_timeouts_are_recorded_never_hang():
    client = ScriptedClient(fail_on={1}, hang_on={2})
    start = time.monotonic()
    records = asyncio.run(run_open_loop(client, _specs(4), request_timeout_s=0.5, progress=False))
    assert time.monotonic() - start < 3
    by = {r.index: r for r in records}
    assert "server said no" in by[1].error and "timed out" in by[2].error
    assert by[0].ok and by[3].ok
    s = metrics.summarize(records, slo_ttft=10, slo_tpot=10)
    assert s["num_errors"] == 2 and s["slo_attainment"] == 0.5


def test_closed_loop_keeps_the_concurrency():
    client = ScriptedClient(ttft=0.05, gap=0.0)
    start = time.monotonic()
    records = asyncio.run(run_concurrency(client, _specs(8, max_tokens=1), concurrency=4, progress=False))
    elapsed = time.monotonic() - start
    assert len(records) == 8 and all(r.ok for r in records)
    assert 0.09 < elapsed < 0.3  # two waves of four, not eight in a row and not all at once


def test_goodput_search_on_a_synthetic_latency_model():
    # attainment falls off a cliff past 3.3 req/s
    calls = []

    async def measure(rate):
        calls.append(rate)
        return 0.97 if rate <= 3.3 else 0.4

    good, seen = asyncio.run(metrics.search_goodput(measure, [0.5, 1, 2, 4, 8], refine=3))
    assert 3.0 <= good <= 3.3 and 8 not in calls  # the sweep stops at the first failing rate
    assert metrics.goodput({1: 0.95, 2: 0.91, 3: 0.5}) == 2
    assert metrics.goodput({1: 0.5}) == 0.0
    assert metrics.goodput({1: 0.83, 2: 1.0}) == 0.0  # a pass above a failing rate is noise, not goodput


def test_json_report_and_plots(tmp_path):
    records = asyncio.run(run_open_loop(ScriptedClient(), _specs(4), progress=False))
    summary = metrics.summarize(records, 1.0, 0.1)
    path = tmp_path / "bench.json"
    report.write_json(str(path), {"rate": 1}, summary, records, sweep={"attainment": {1.0: 1.0}, "goodput": 1.0})
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == report.JSON_SCHEMA_VERSION
    assert set(doc) == {"schema_version", "config", "summary", "sweep", "records"}
    assert {"ttft_s", "tpot_s", "itl_s", "e2e_s", "slo_attainment", "output_token_throughput"} <= set(doc["summary"])
    assert len(doc["records"]) == 4 and {"ttft", "tpot", "token_times", "error"} <= set(doc["records"][0])
    report.plot_cdfs(str(tmp_path / "cdf.png"), {"a": records})
    report.plot_sweep(str(tmp_path / "sweep.png"), {"a": {1.0: 1.0, 2.0: 0.5}}, {"a": 1.0})
    for f in ("cdf.png", "sweep.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
