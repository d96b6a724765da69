"""The router's pure policy (routing.py), and the colocated baseline through real Ray actors."""

import asyncio

import pytest

from splitserve.platform.routing import (DecodeLoad, PrefillLoad, PrefillSpeeds, PrefixIndex, pick_prefill,
                                         rank_decodes)


def test_prefill_goes_to_the_fewest_queued_prompt_tokens():
    assert pick_prefill([PrefillLoad("p0", 900), PrefillLoad("p1", 10), PrefillLoad("p2", 300)]) == "p1"
    assert pick_prefill([]) is None


def test_prefill_speeds_are_measured_from_dispatches_and_weigh_the_queues():
    speeds = PrefillSpeeds(decay=0.5)
    assert speeds.speed("gpu") is None
    # gpu: busy from t=0, three prompts of 300 tokens done at 0.1, 0.1 (same step), 0.2: 900 tokens in 0.2 s
    for _ in range(3):
        speeds.sent("gpu", 0.0)
    speeds.done("gpu", 300, 0.1)
    speeds.done("gpu", 300, 0.1)
    speeds.done("gpu", 300, 0.2)
    assert speeds.speed("gpu") == pytest.approx((0.25 * 300 + 0.5 * 300 + 300) / (0.25 * 0.1 + 0.5 * 0 + 0.1))
    # cpu: idle until t=5 (idle time is not counted), then 300 tokens in 1 s; a refused request adds no sample
    speeds.sent("cpu", 5.0)
    speeds.done("cpu", 300, 6.0)
    speeds.sent("cpu", 7.0)
    speeds.dropped("cpu", 7.5)
    speeds.done("cpu", 300, 9.0)  # nothing outstanding any more: ignored
    assert speeds.speed("cpu") == pytest.approx(300.0)
    # the gpu worker with 3000 queued tokens is done with 300 more before the cpu worker with 100 queued
    loads = [PrefillLoad("cpu", 100, 0, speeds.speed("cpu")), PrefillLoad("gpu", 3000, 0, speeds.speed("gpu"))]
    assert pick_prefill(loads, 300) == "gpu"
    assert pick_prefill([PrefillLoad("cpu", 100, 0, 300.0), PrefillLoad("gpu", 9000, 0, speeds.speed("gpu"))],
                        300) == "cpu"
    # a worker not measured yet counts as fast as the fastest known (it gets work, and is measured)
    assert pick_prefill([*loads, PrefillLoad("new", 2000)], 300) == "new"
    assert pick_prefill([*loads, PrefillLoad("new", 3100)], 300) == "gpu"
    assert pick_prefill([PrefillLoad("p1", 10), PrefillLoad("p0", 10)], 300) == "p0"  # none known: the queues
    speeds.retain({"cpu"})
    assert speeds.speed("gpu") is None and speeds.speed("cpu") == pytest.approx(300.0)


def test_a_prompt_goes_to_the_worker_holding_its_prefix_unless_its_queue_outweighs_the_saving():
    index = PrefixIndex(block_size=16, capacity=8)
    system = list(range(100))  # 6 full blocks, then the request's own tokens
    a, b = system + [500, 501], system + [600]
    index.record("p0", index.hashes(a))
    assert index.cached_tokens("p0", index.hashes(b)) == 96 and index.cached_tokens("p1", index.hashes(b)) == 0
    assert index.cached_tokens("p0", index.hashes([9] + system[1:])) == 0  # the chain breaks at block 0
    assert index.hashes(system[:17]) == index.hashes(system[:32])[:1]  # the last token's block never counts

    def pick(queued0, queued1):
        return pick_prefill([PrefillLoad("p0", queued0, index.cached_tokens("p0", index.hashes(b))),
                             PrefillLoad("p1", queued1, index.cached_tokens("p1", index.hashes(b)))], len(b))

    assert pick(0, 0) == "p0"  # equal queues: the cached prefix decides
    assert pick(90, 0) == "p0"  # 90 queued tokens ahead < 96 tokens saved
    assert pick(100, 0) == "p1"  # the queue outweighs the saving
    index.record("p1", index.hashes(list(range(1000, 1200))))  # 12 blocks: p1 keeps its 8 newest
    assert index.cached_tokens("p1", index.hashes(list(range(1000, 1200)))) == 0  # its first blocks went first
    index.retain({"p1"})  # p0 left the pool: its cache is gone with it
    assert index.cached_tokens("p0", index.hashes(b)) == 0 and len(index) == 1


def test_decode_workers_are_ranked_by_free_blocks_among_those_that_fit():
    loads = [DecodeLoad("d0", 10, 1, 16), DecodeLoad("d1", 50, 9, 16), DecodeLoad("d2", 50, 2, 16)]
    assert rank_decodes(loads, 161) == ["d2", "d1"]  # tie on free blocks: the smaller running batch first
    assert rank_decodes(loads, 161, exclude={"d2"}) == ["d1"]  # d2 just refused
    assert rank_decodes(loads, 900) == []  # nobody has 900 tokens of room: wait, then RESOURCE_EXHAUSTED
    assert rank_decodes(loads, 160) == ["d2", "d1", "d0"]  # all fit: the prefill worker tries them in order


def test_serve_config_from_yaml(tmp_path):
    from splitserve.platform.config import ServeConfig
    f = tmp_path / "c.yaml"
    f.write_text("mode: colocated\nprefill: {replicas: 2, threads: 1}\ndecode: {kv_cache_memory_mb: 64}\n")
    cfg = ServeConfig.from_yaml(str(f), http_port=1234)
    assert cfg.mode == "colocated" and cfg.prefill.replicas == 2 and cfg.decode.kv_cache_memory_mb == 64
    assert cfg.http_port == 1234
    f.write_text("mode: sideways\n")
    with pytest.raises(ValueError, match="mode must be"):
        ServeConfig.from_yaml(str(f))
    with pytest.raises(ValueError, match="http_port and grpc_port must differ.*both are 1234"):
        ServeConfig(http_port=1234, grpc_port=1234)
    f.write_text("modle: colocated\n")
    with pytest.raises(ValueError, match=r"unknown config keys \['modle'\]"):
        ServeConfig.from_yaml(str(f))


def test_dtype_auto_is_resolved_once_for_every_worker(monkeypatch):
    # KV moves between workers only in one dtype: auto is resolved where the workers are started, so a
    # prefill node with AMX and a decode node without it cannot pick different ones
    from splitserve.engine import engine
    from splitserve.platform.config import ServeConfig, engine_kwargs
    cfg = ServeConfig()
    assert cfg.dtype == "auto"
    for amx, want in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(engine, "_cpu_has_fast_bf16", lambda amx=amx: amx)
        got = {engine_kwargs(cfg, cfg.prefill, decodes=False)["dtype"], engine_kwargs(cfg, cfg.decode)["dtype"]}
        assert got == {want}
    assert engine_kwargs(ServeConfig(dtype="float32"), cfg.decode)["dtype"] == "float32"  # explicit: as given


@pytest.mark.parametrize("chunked", [True, False])
def test_colocated_baseline_through_ray(tmp_path, chunked):
    import ray
    from helpers import make_tiny_model
    from splitserve.engine.engine import LLMEngine
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.platform.config import PoolConfig, ServeConfig
    from splitserve.platform.pools import Pools, make_router
    from splitserve.platform.server import init_ray

    make_tiny_model(str(tmp_path), "llama", max_position_embeddings=512)
    prompt = list(range(3, 60))
    expected = LLMEngine(model=str(tmp_path), dtype="float32", show_progress=False, num_kv_blocks=64).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0].token_ids
    init_ray(None, num_cpus=2, dashboard=False)  # tried twice: a local Ray sometimes fails to start
    try:
        cfg = ServeConfig(model=str(tmp_path), dtype="float32", mode="colocated",
                          decode=PoolConfig(kv_cache_memory_mb=16, max_num_batched_tokens=16,
                                            chunked_prefill=chunked))
        pools = Pools(cfg).start()
        router = make_router(pools.handles())

        async def run():
            return [o async for o in router.generate("r", prompt, {"max_tokens": 10, "temperature": 0,
                                                                    "ignore_eos": True})]

        outs = asyncio.run(run())
        assert [t for o in outs for t in o.new_token_ids] == expected
        stats = pools.all_stats()
        assert all(s.engine.num_free_kv_blocks == s.engine.num_kv_blocks for s in stats.values())
        pools.shutdown()
    finally:
        ray.shutdown(wait_for_processes=True)
