"""Engine lifecycle on a tiny random model: batching, chunked prefill, preemption,
abort, seeds and stop conditions. Every test ends with a leak check."""

import pytest

from conftest import assert_no_leaks
from helpers import make_tiny_model
from splitserve.engine.engine import LLMEngine
from splitserve.engine.sampling_params import SamplingParams

PROMPTS = ["a", "hello there", "the quick brown fox jumps over", "x" * 40, "0123456789" * 7, "mixed, lengths!"]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path)


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
