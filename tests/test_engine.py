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
