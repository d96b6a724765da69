"""Speculative decoding: proposer and policy units, exact verification, and the engine with drafts."""

from __future__ import annotations

import collections

import pytest
import torch

from conftest import assert_no_leaks
from helpers import make_tiny_model
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.speculative import NGramProposer, choose_k, verify_greedy, verify_sampled


# ---------------------------------------------------------------- units

def test_ngram_proposer_continues_the_latest_longest_match():
    p = NGramProposer(max_n=3)
    #        0  1  2  3  4  5  6  7  8  9
    toks = [5, 6, 7, 8, 1, 6, 7, 9, 2, 6, 7]
    # suffix [6, 7]: latest earlier occurrence at 5 -> continues with 9, 2, 6
    assert p.propose(toks, 3) == ([9, 2, 6], None)
    # a 3-gram match wins over a later 2-gram one
    toks = [1, 2, 3, 4, 9, 2, 3, 5, 1, 2, 3]
    assert p.propose(toks, 2) == ([4, 9], None)
    assert p.propose([1, 2, 3], 4) == ([], None)  # nothing repeats
    assert p.propose([4, 4], 3) == ([4], None)  # follow runs up to the end


def test_choose_k_grows_with_acceptance_and_stops_when_it_does_not_pay():
    assert choose_k(0.95, 4, 0.1) == 4
    assert choose_k(0.02, 4, 0.1) == 0
    assert choose_k(0.5, 8, 0.1) < choose_k(0.9, 8, 0.1)
    assert choose_k(0.9, 4, 2.0) == 0  # verifying is too expensive: never speculate


def test_verify_greedy_accepts_the_matching_prefix_then_the_target_token():
    logits = torch.full((4, 10), -1.0)
    for i, t in enumerate([3, 5, 7, 1]):
        logits[i, t] = 1.0
    assert verify_greedy(logits, [3, 5, 2]) == [3, 5, 7]  # third draft rejected: target's 7 instead
    assert verify_greedy(logits, [3, 5, 7]) == [3, 5, 7, 1]  # all accepted + bonus
    assert verify_greedy(logits, [4, 5, 7]) == [3]


@pytest.mark.parametrize("with_q", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(with_q):
    """First emitted token ~ p_1 exactly, whatever the proposal: chi-square over 20k draws."""
    g = torch.Generator().manual_seed(0)
    vocab, n = 6, 20000
    p = torch.softmax(torch.randn(3, vocab, generator=g), dim=-1)  # target at 3 positions (k = 2)
    q = torch.softmax(torch.randn(2, vocab, generator=g) * 2, dim=-1) if with_q else None
    counts = collections.Counter()
    for _ in range(n):
        drafts = ([int(torch.multinomial(q[i], 1, generator=g)) for i in range(2)] if with_q else [2, 4])
        counts[verify_sampled(p, drafts, q, g)[0]] += 1
    observed = torch.tensor([counts[v] for v in range(vocab)], dtype=torch.float64)
    expected = p[0].double() * n
    chi2 = ((observed - expected) ** 2 / expected).sum().item()
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001


# ---------------------------------------------------------------- the engine

@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_spec")
    make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path)


def _engine(path, spec, **kw):
    kw.setdefault("num_kv_blocks", 96)
    kw.setdefault("spec_calibrate", False)  # costs 1 + 0.15 k: deterministic k choices in tests
    return LLMEngine(model=path, dtype="float32", show_progress=False, block_size=4, speculative=spec, **kw)


# token-id prompts with repeats, so n-gram lookup has something to propose
PROMPTS = [list(range(40, 60)) * 3, [7, 8, 9, 10] * 8 + [7, 8], list(range(100, 131)), [1, 2] * 5]


@pytest.mark.parametrize("proposer", ["ngram", "draft-self-int4", "draft-path"])
def test_greedy_with_speculation_equals_greedy_without(tiny_path, proposer):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    ref = _engine(tiny_path, "off").generate(PROMPTS, params)
    if proposer == "ngram":
        spec = _engine(tiny_path, "ngram")
    else:  # the target quantized to int4 as its own draft, or a draft model given by path (here: the same one)
        spec = _engine(tiny_path, "draft", spec_draft_model=None if proposer == "draft-self-int4" else tiny_path)
    alone = [spec.generate([p], params)[0] for p in PROMPTS]
    together = spec.generate(PROMPTS, params)  # mixed batch: different lengths and acceptance
    for r, a, t in zip(ref, alone, together):
        assert a.token_ids == r.token_ids and t.token_ids == r.token_ids
    stats = spec.stats().spec
    assert stats.proposed > 0 and stats.accepted > 0  # speculation really ran
    assert stats.tokens_per_step > 1
    if proposer == "draft-path":  # a draft identical to the target proposes what the target picks
        assert stats.acceptance_rate > 0.95
    assert_no_leaks(spec)
    if proposer != "ngram":
        assert spec.proposer.kv.num_free_blocks == spec.proposer.kv.num_blocks  # the draft's pool too


def test_opt_out_batch_limit_and_stop_conditions(tiny_path):
    spec = _engine(tiny_path, "ngram", spec_max_batch=2)
    greedy = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    out = spec.generate([PROMPTS[0]], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True,
                                                     speculative=False))
    assert spec.stats().spec.proposed == 0 and len(out[0].token_ids) == 30  # opted out
    spec.generate(PROMPTS[:3], greedy)  # three running > spec_max_batch=2 while all are in
    assert spec.stats().spec.skipped_batch > 0
    # max_tokens is exact even when a verified step would emit past it
    for n in (1, 2, 3, 7):
        res = spec.generate([PROMPTS[1]], SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))[0]
        assert len(res.token_ids) == n and res.finish_reason == "length"
    assert_no_leaks(spec)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_rollbacks_aborts_and_preemption_leave_no_blocks_behind(tiny_path, proposer):
    # a pool small enough that four 60-token-prompt requests preempt each other
    spec = _engine(tiny_path, proposer, num_kv_blocks=40, max_num_batched_tokens=64, spec_max_batch=8)
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    ref = _engine(tiny_path, "off").generate(PROMPTS, params)
    got = spec.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert spec.scheduler.num_preemptions > 0 and spec.stats().spec.accepted > 0
    rid = spec.add_request(PROMPTS[0], params)
    for _ in range(4):
        spec.step()
    spec.abort(rid)
    while spec.has_unfinished():
        spec.step()
    assert_no_leaks(spec)
    if proposer == "draft":  # the draft model's own pool and bookkeeping too
        assert spec.proposer.kv.num_free_blocks == spec.proposer.kv.num_blocks and not spec.proposer.computed


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_sampling_with_speculation_matches_without(tiny_path, proposer):
    """Joint distribution of the first two sampled tokens, speculation on vs off (total variation bound).
    The second token goes through verification (a one-token draft after the first)."""
    # The prompt is the model's own greedy text, so n-gram drafts are often (not always) what it
    # would sample: both verification branches, acceptance and residual resampling, get exercised.
    off_engine = _engine(tiny_path, "off", num_kv_blocks=800, max_num_seqs=256, max_num_batched_tokens=4096)
    seed_ids = [3, 1, 4, 1, 5, 9, 2, 6]
    prompt = seed_ids + off_engine.generate([seed_ids], SamplingParams(max_tokens=100, temperature=0,
                                                                       ignore_eos=True))[0].token_ids
    params = [SamplingParams(max_tokens=3, temperature=0.8, top_k=4, seed=s, ignore_eos=True) for s in range(1500)]

    def joint(engine):
        return collections.Counter(tuple(r.token_ids[:2]) for r in engine.generate([prompt] * len(params), params))

    extra = {"spec_draft_kv_blocks": 8000} if proposer == "draft" else {}  # draft: the int4 self-draft (q != p)
    spec = _engine(tiny_path, proposer, num_kv_blocks=800, max_num_seqs=256, max_num_batched_tokens=4096,
                   spec_max_batch=1024, **extra)
    on = joint(spec)
    off = joint(off_engine)
    assert spec.stats().spec.proposed > 400  # the second token went through verification (ngram ~740)
    assert 0 < spec.stats().spec.acceptance_rate < 1  # both branches: accepted, and resampled
    tv = 0.5 * sum(abs(on[k] - off[k]) for k in set(on) | set(off)) / len(params)
    print(f"\nspec stats {spec.stats().spec}, TV {tv:.3f}")
    assert tv < 0.08  # measured 0.02; always accepting the draft would give ~0.35
    assert_no_leaks(spec)
