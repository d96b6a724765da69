"""Engine lifecycle on a tiny random model: batching, chunked prefill, preemption,
abort, seeds and stop conditions. Every test ends with a leak check."""

import pytest
import torch

from conftest import assert_no_leaks
from helpers import hf_logits, make_tiny_model
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams

PROMPTS = ["a", "hello there", "the quick brown fox jumps over", "x" * 40, "0123456789" * 7, "mixed, lengths!"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """(path, the transformers model saved there: the independent reference)."""
    path = tmp_path_factory.mktemp("tiny")
    hf = make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path), hf


@pytest.fixture(scope="module")
def tiny_path(tiny_model):
    return tiny_model[0]


def engine(path, **kw):
    kw.setdefault("dtype", "float32")
    kw.setdefault("show_progress", False)
    kw.setdefault("num_kv_blocks", 256)
    return LLMEngine(model=path, **kw)


def greedy(n=24):
    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)


def test_batched_equals_alone_and_chunked_equals_unchunked(tiny_path):
    big = engine(tiny_path, max_num_batched_tokens=4096)
    alone = [big.generate([p], greedy())[0].token_ids for p in PROMPTS]
    together = [r.token_ids for r in big.generate(PROMPTS, greedy())]
    assert together == alone
    assert all(len(t) == 24 for t in alone)
    chunked = engine(tiny_path, max_num_batched_tokens=7)  # every prompt over 7 tokens is split
    assert [r.token_ids for r in chunked.generate(PROMPTS, greedy())] == alone
    assert_no_leaks(big)
    assert_no_leaks(chunked)


def test_preemption_and_recompute_give_the_same_output(tiny_path):
    prompts = PROMPTS[:4] + PROMPTS[5:]  # each fits alone (<= 80 tokens with its output)...
    roomy = engine(tiny_path)
    expected = [r.token_ids for r in roomy.generate(prompts, greedy(40))]
    tight = engine(tiny_path, num_kv_blocks=24, block_size=4)  # ...but not all together in 96 slots
    got = [r.token_ids for r in tight.generate(prompts, greedy(40))]
    assert tight.scheduler.num_preemptions > 0
    assert got == expected
    assert_no_leaks(roomy)
    assert_no_leaks(tight)


def test_seeded_sampling_is_reproducible_in_any_batch(tiny_path):
    eng = engine(tiny_path)
    seeded = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = eng.generate(["hello there"], seeded)[0].token_ids
    mixed = eng.generate(["a", "hello there", "zz"],
                         [SamplingParams(max_tokens=30, temperature=1.0, ignore_eos=True), seeded, greedy()])
    assert mixed[1].token_ids == alone
    other_seed = eng.generate(["hello there"], SamplingParams(max_tokens=20, temperature=0.9, seed=99,
                                                              ignore_eos=True))[0].token_ids
    assert other_seed != alone
    assert_no_leaks(eng)


def test_abort_frees_blocks_and_reports(tiny_path):
    eng = engine(tiny_path)
    a = eng.add_request("keep going please", greedy(50))
    b = eng.add_request("this one will be aborted", greedy(50))
    for _ in range(5):
        eng.step()
    assert eng.kv.num_free_blocks < eng.kv.num_blocks
    eng.abort(b)
    outs = []
    while eng.has_unfinished():
        outs += eng.step()
    final = {o.request_id: o for o in outs if o.finished}
    assert final[b].finish_reason == "abort" and final[a].finish_reason == "length"
    with pytest.raises(KeyError, match="no request"):
        eng.abort(b)
    # a waiting (never scheduled) request can be aborted too
    c = eng.add_request("never runs", greedy())
    eng.abort(c)
    assert [o.finish_reason for o in eng.step()] == ["abort"]
    assert_no_leaks(eng)


def test_max_tokens_eos_and_context_limit(tiny_path):
    eng = engine(tiny_path)
    out = eng.generate(["hello"], greedy(7))[0]
    assert len(out.token_ids) == 7 and out.finish_reason == "length"
    # make EOS the only outcome: a request whose every sampled token is EOS stops at once
    eos = next(iter(eng.tokenizer.eos_token_ids))
    eng.tokenizer.eos_token_ids = set(range(eng.model_config.vocab_size))
    try:
        stopped = eng.generate(["hello"], SamplingParams(max_tokens=7, temperature=0))[0]
        ignored = eng.generate(["hello"], greedy(7))[0]
    finally:
        eng.tokenizer.eos_token_ids = {eos}
    assert stopped.finish_reason == "stop" and len(stopped.token_ids) == 1 and stopped.text == ""
    assert ignored.finish_reason == "length" and len(ignored.token_ids) == 7  # ignore_eos
    # the context bounds generation: max_model_len 512 minus a 500-token prompt
    long = eng.generate([[65] * 500], greedy(100))[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 12
    assert_no_leaks(eng)


def test_each_step_reports_what_it_computed_for_the_step_time_models(tiny_path):
    from splitserve.autoscaler.signals import Recorder, step_recorder, worker_signals

    eng = engine(tiny_path, max_num_batched_tokens=16)
    loads, prefill_rec, decode_rec = [], Recorder(), Recorder()
    as_prefill, as_decode = step_recorder(prefill_rec, "prefill"), step_recorder(decode_rec, "decode")
    eng.on_step = lambda load: (loads.append(load), as_prefill(load), as_decode(load))
    n = len(eng.tokenizer.encode(PROMPTS[3]))
    assert n > 16  # the prompt takes two chunks
    eng.generate([PROMPTS[3]], greedy(8))
    assert all(load.seconds > 0 and load.sequences == 1 for load in loads)
    chunks = [16] * (n // 16) + ([n % 16] if n % 16 else [])
    assert [load.tokens for load in loads] == chunks + [1] * 7  # the 8th token is sampled, never fed
    ends = [sum(chunks[:i + 1]) for i in range(len(chunks))]
    assert [load.attention for load in loads[:len(chunks)]] == [k * e for k, e in zip(chunks, ends)]  # new x context
    assert [load.context for load in loads[len(chunks):]] == [n + i for i in range(1, 8)]
    row = {"name": "w", "pool": "prefill", "state": "up"}
    pre, dec = worker_signals(row, prefill_rec.export()), worker_signals(row, decode_rec.export())
    assert pre.steps == dec.steps == len(loads) and pre.busy_s == pytest.approx(sum(x.seconds for x in loads))
    assert pre.step_x == n + 7 and pre.step_y == sum(x.attention for x in loads)
    assert dec.step_x == len(loads) and dec.step_y == sum(x.context for x in loads)
    assert_no_leaks(eng)


REPEATING = [1, 5, 6, 7, 5, 6, 7, 5, 6, 7, 5, 6]  # n-gram drafts find matches: speculation verifies


@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_logprobs_are_the_models_own_at_each_position(tiny_model, speculative):
    """Each output token's log-probability and its top alternatives equal transformers' log-softmax at
    that position, for a plain step and for tokens accepted by speculative verification, greedy and
    seeded sampling alike (logprobs are the raw model's, before temperature)."""
    path, hf = tiny_model
    eng = engine(path, speculative=speculative, spec_calibrate=False)
    params = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3),
              SamplingParams(max_tokens=16, temperature=0.8, seed=3, ignore_eos=True, logprobs=0),
              SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)]
    results = eng.generate([REPEATING] * 3, params)
    if speculative == "ngram":
        assert eng.spec_stats.accepted > 0  # some tokens did come from verification
    for result, p in zip(results[:2], params):
        assert len(result.logprobs) == len(result.token_ids) == 16
        ref = torch.log_softmax(hf_logits(hf, REPEATING + result.token_ids), dim=-1)  # [T, V]
        for j, (token, (lp, top)) in enumerate(zip(result.token_ids, result.logprobs)):
            row = ref[len(REPEATING) - 1 + j]  # the position that predicted output token j
            assert lp == pytest.approx(row[token].item(), abs=1e-4)
            assert len(top) == p.logprobs
            assert [v for _, v in top] == pytest.approx(row.topk(p.logprobs).values.tolist(), abs=1e-4)
            assert all(v == pytest.approx(row[t].item(), abs=1e-4) for t, v in top)
            if p.greedy:
                assert lp == pytest.approx(row.max().item(), abs=1e-4)
    assert results[2].logprobs is None  # not asked: not computed
    assert_no_leaks(eng)


def test_presence_and_frequency_penalties_follow_a_plain_reference(tiny_model):
    """Greedy with penalties picks, at each step, the argmax of transformers' logits less
    presence_penalty once and frequency_penalty per earlier occurrence of each output token; an
    engine that speculates gives the same tokens (penalized requests do not speculate)."""
    path, hf = tiny_model
    presence, frequency = 0.4, 1.5
    ids, out = list(REPEATING), []
    for _ in range(20):
        logits = hf_logits(hf, ids)[-1].clone()
        counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.shape[0]).float()
        logits -= frequency * counts + presence * (counts > 0).float()
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    penalized = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, presence_penalty=presence,
                               frequency_penalty=frequency)
    for speculative in ("off", "ngram"):
        eng = engine(path, speculative=speculative, spec_calibrate=False)
        got, plain = eng.generate([REPEATING, REPEATING], [penalized, greedy(20)])
        assert got.token_ids == out
        assert plain.token_ids != out  # the penalty changed the output
        assert_no_leaks(eng)
    assert len(set(out)) > len(set(plain.token_ids))  # and spread it over more tokens


@pytest.mark.parametrize("field,value", [("presence_penalty", 2.5), ("frequency_penalty", -3),
                                         ("frequency_penalty", float("nan")), ("logprobs", 21),
                                         ("logprobs", -1), ("logprobs", True)])
def test_penalty_and_logprobs_bounds_are_refused_with_the_field(field, value):
    from splitserve.errors import InvalidRequestError
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(**{field: value})
    assert e.value.field == field and field in str(e.value)


@pytest.mark.parametrize("speculative", ["off", "ngram"])
def test_prefix_cache_hits_give_exactly_the_tokens_of_a_cold_run(tiny_path, speculative):
    """Prompts sharing a 45-token "system prompt": an engine without the cache is the reference; one
    with it (roomy; and tight enough to evict and preempt, with chunked prefill) skips the cached blocks
    and must give the same tokens, greedy and seeded, speculating or not; cached blocks outlive their
    requests and are all free at the end."""
    system = [(7 * i) % 250 + 3 for i in range(45)]
    prompts = [system + REPEATING[:k] + [40 + k] for k in range(1, 7)]
    params = [greedy(16) if k % 2 else SamplingParams(max_tokens=16, temperature=0.9, seed=k, ignore_eos=True)
              for k in range(len(prompts))]
    cold = engine(tiny_path, prefix_caching=False, speculative=speculative, spec_calibrate=False)
    expected = [cold.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    assert cold.kv.prefix_hit_tokens == 0
    # tight: 96 slots for 6 x ~68 tokens, prompts in chunks of at most 12 tokens
    for kw in ({}, {"num_kv_blocks": 24, "block_size": 4, "max_num_batched_tokens": 12}):
        warm = engine(tiny_path, speculative=speculative, spec_calibrate=False, **kw)
        bs = warm.kv.block_size
        # the first computes the system prompt, the others start from its blocks; then, again, whole
        # prompts are cached but their last token. (Batched, seeded speculation would draft differently
        # from the cold run, alone: its requests go one by one.)
        runs = [[p] for p in prompts] + ([prompts] if speculative == "off" else [[p] for p in prompts])
        got = [r.token_ids for run in runs
               for r in warm.generate(run, [params[prompts.index(p)] for p in run])]
        assert got == expected + expected
        assert warm.kv.prefix_hit_tokens >= 5 * (45 // bs) * bs  # every later request skipped the system prompt
        assert warm.stats().prefix_hit_tokens == warm.kv.prefix_hit_tokens
        if kw:
            assert warm.kv.pool.num_evictions > 0
        else:
            assert warm.kv.pool.num_cached > 0  # kept after every request ended
        assert_no_leaks(warm)
    assert_no_leaks(cold)
