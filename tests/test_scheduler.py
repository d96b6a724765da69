"""The scheduler policy, driven with fake model outputs (no torch, no model)."""

import random

from splitserve.engine.block_pool import KVCacheManager
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler


def _req(rid, n_prompt, max_tokens=4, arrival=0):
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=max_tokens, temperature=0), arrival)


def _run(sched: Scheduler, max_steps=500, inspect=lambda plan: None):
    """Drive the scheduler like the engine does, with a fake sampler; returns the plans. ``inspect(plan)``
    sees each plan before the step runs."""
    plans = []
    for _ in range(max_steps):
        if not sched.has_work:
            break
        plan = sched.schedule()
        assert not plan.empty, "work is pending but nothing was scheduled"
        inspect(plan)
        plans.append(plan)
        sched.on_step_finished(plan)
        for c in plan.chunks:
            r = c.request
            if c.samples:
                r.output_token_ids.append(1000 + r.num_output_tokens)
                if r.num_output_tokens >= r.params.max_tokens:
                    sched.finish(r, RequestStatus.FINISHED_LENGTH)
    return plans


def _assert_clean(sched):
    assert sched.kv.num_free_blocks == sched.kv.num_blocks and sched.kv.holders() == []
    assert not sched.waiting and not sched.running


def test_budget_decodes_first_and_chunked_prefill():
    sched = Scheduler(KVCacheManager(100, 4), max_num_batched_tokens=8, max_num_seqs=8)
    sched.add(_req("long", 20, max_tokens=2, arrival=0))
    plans = _run(sched)
    # 20 prompt tokens under a budget of 8: 8 + 8 + 4, and only the last chunk samples
    assert [(c.num_new_tokens, c.samples) for p in plans[:3] for c in p.chunks] == [(8, False), (8, False), (4, True)]
    sched.add(_req("a", 3, max_tokens=3, arrival=1))
    sched.add(_req("b", 30, max_tokens=3, arrival=2))
    plans = _run(sched)
    for p in plans:
        assert p.num_tokens <= 8
        continuing = [c.start > 0 for c in p.chunks]  # running requests vs fresh admissions
        assert continuing == sorted(continuing, reverse=True), "running requests must be planned first"
    # once "a" decodes, it is scheduled in the same steps as b's prefill chunks
    assert any(len(p.chunks) == 2 for p in plans)
    _assert_clean(sched)


def test_fcfs_admission_is_bounded_by_free_blocks():
    sched = Scheduler(KVCacheManager(6, 4), max_num_batched_tokens=64, max_num_seqs=8)
    for i in range(3):
        sched.add(_req(f"r{i}", 8, max_tokens=1, arrival=i))  # 2 blocks each for the prompt
    plan = sched.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["r0", "r1", "r2"]
    sched2 = Scheduler(KVCacheManager(5, 4), max_num_batched_tokens=64, max_num_seqs=8)
    for i in range(3):
        sched2.add(_req(f"r{i}", 8, max_tokens=1, arrival=i))
    plan = sched2.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["r0", "r1"]  # r2 waits, not dropped
    assert [r.request_id for r in sched2.waiting] == ["r2"]


def test_preemption_by_recompute_when_blocks_run_out():
    # 4 blocks of 4 slots; two requests that each grow to 12 tokens cannot both fit
    sched = Scheduler(KVCacheManager(4, 4), max_num_batched_tokens=64, max_num_seqs=8)
    a, b = _req("a", 6, max_tokens=6, arrival=0), _req("b", 6, max_tokens=6, arrival=1)
    sched.add(a)
    sched.add(b)
    plans = _run(sched)
    assert sched.num_preemptions >= 1 and b.num_preemptions >= 1 and a.num_preemptions == 0  # newest goes
    # the preempted request was recomputed from scratch: a chunk starting at 0 covering its outputs too
    restarts = [c for p in plans for c in p.chunks if c.request is b and c.start == 0]
    assert len(restarts) == 1 + b.num_preemptions and restarts[-1].num_new_tokens > 6
    assert a.num_output_tokens == 6 and b.num_output_tokens == 6  # nothing dropped
    assert b.output_token_ids == [1000 + i for i in range(6)]
    _assert_clean(sched)


def test_random_workload_never_drops_and_never_leaks():
    rng = random.Random(0)
    sched = Scheduler(KVCacheManager(12, 4), max_num_batched_tokens=16, max_num_seqs=5)
    reqs = [_req(f"r{i}", rng.randint(1, 20), max_tokens=rng.randint(1, 12), arrival=i) for i in range(40)]
    for r in reqs:
        sched.add(r)
    plans = _run(sched, max_steps=5000)
    for p in plans:
        assert p.num_tokens <= 16 and len({c.request.request_id for c in p.chunks}) == len(p.chunks)
    assert all(r.status is RequestStatus.FINISHED_LENGTH and r.num_output_tokens == r.params.max_tokens
               for r in reqs)
    _assert_clean(sched)


def test_shared_prefixes_are_reused_never_written_and_never_leak():
    """Requests with common prompt prefixes under block pressure (preemption, eviction): each admission
    starts at a cached prefix; no step writes into a cached block; everything is freed at the end."""
    rng = random.Random(1)
    kv = KVCacheManager(14, 4, prefix_caching=True)
    sched = Scheduler(kv, max_num_batched_tokens=16, max_num_seqs=4)
    system = [[7] * 9, list(range(50, 63))]  # two "system prompts" of 9 and 13 tokens
    reqs = []
    for i in range(40):
        prompt = system[i % 2] + [rng.randint(100, 200) for _ in range(rng.randint(1, 8))]
        reqs.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=rng.randint(1, 8), temperature=0), i))
        sched.add(reqs[-1])
    writes = []

    def no_write_into_the_cache(plan):
        for c in plan.chunks:  # the blocks this chunk writes: those of positions start .. end-1
            table = kv.block_table(c.request.request_id)
            for b in {table[p // 4] for p in range(c.start, c.end)}:
                assert b not in kv.pool._hash_of, f"step writes into cached block {b}"
                assert kv.pool.ref_count(b) == 1, f"step writes into shared block {b}"
                writes.append(b)

    _run(sched, max_steps=5000, inspect=no_write_into_the_cache)
    assert writes and all(r.status is RequestStatus.FINISHED_LENGTH for r in reqs)
    assert kv.prefix_hit_tokens >= 4 * 30  # most requests found at least their system prompt's first block
    assert sched.num_preemptions > 0 and kv.pool.num_evictions > 0  # the pressure was real
    _assert_clean(sched)
    assert kv.num_tracked() == 0
