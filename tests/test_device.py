"""The engine's device: names, ``dtype: auto`` per device, and the plumbing.

There is no GPU here, so the plumbing is checked the other way round: a CPU
engine runs every step while torch's default device is ``meta``. A tensor the
step path makes without naming its device then lands on ``meta`` and the step
fails (a meta tensor has no data to index, copy or read back), so equal output
proves every step tensor (inputs, masks, sampler rows, penalties, logprobs,
speculative verification, KV read for a transfer and written on arrival) is
made on the engine's device or explicitly on the host. The CUDA tests run the
same engine on a GPU where one is present.
"""

import pytest
import torch

from conftest import assert_no_leaks
from helpers import make_tiny_model
from splitserve.engine.device import HOST, resolve_device
from splitserve.engine.engine import LLMEngine, dtype_name
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import InvalidRequestError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = ["the device test prompt, long enough for a few blocks of four", "another one"]
PARAMS = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2),
          SamplingParams(max_tokens=24, temperature=0.8, top_k=20, top_p=0.9, seed=5, ignore_eos=True,
                         frequency_penalty=0.5, presence_penalty=0.3)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_device")
    make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path)


def engine(path, **kw):
    # 16 tokens a step: prompts prefill in chunks; no C++ decode step: the Python path's decode tensors too
    return LLMEngine(model=path, dtype="float32", show_progress=False, block_size=4, num_kv_blocks=128,
                     spec_calibrate=False, max_num_batched_tokens=16, fused_decode=False, **kw)


def test_device_names_resolve_or_fail_with_what_is_allowed():
    assert resolve_device("cpu") == HOST
    assert resolve_device(torch.device("cpu")) == HOST
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else HOST)
    for bad in ("tpu", "cuda:x", "gpu", "", 3, None):
        with pytest.raises(InvalidRequestError, match="device must be one of auto, cpu, cuda, cuda:N"):
            resolve_device(bad)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(InvalidRequestError, match=f"'cuda:{gpus}' is not on this machine"):
        resolve_device(f"cuda:{gpus}")
    if not gpus:
        with pytest.raises(InvalidRequestError, match="no CUDA device \\(allowed here: cpu, auto\\)"):
            LLMEngine(device="cuda", show_progress=False)  # refused before the model loads


def test_auto_dtype_is_bfloat16_on_a_gpu_and_the_cpu_rule_on_cpu(monkeypatch):
    gpu = torch.device("cuda", 0)  # a device name only: nothing runs on it
    assert dtype_name("auto", gpu) == "bfloat16"
    assert dtype_name("float32", gpu) == "float32"  # an explicit dtype is kept
    from splitserve.engine.device import auto_dtype
    assert auto_dtype(gpu, False, gpu_has_bf16=False) == "float32"  # a GPU older than Ampere
    import splitserve.engine.engine as eng
    monkeypatch.setattr(eng, "_cpu_has_fast_bf16", lambda: False)
    assert dtype_name("auto", HOST) == "float32"
    monkeypatch.setattr(eng, "_cpu_has_fast_bf16", lambda: True)
    assert dtype_name("auto", HOST) == "bfloat16"


def _handoff_run(a, b, prompt: str, params: SamplingParams):
    """Prefill on engine A (held), move its KV layer by layer to engine B (read_kv -> write_kv, as the KV
    plane does), commit and finish on B; returns the request's token ids."""
    a.add_request(prompt, params, request_id="r", hold_kv=True)
    first = []
    while "r" not in a.held:
        for out in a.step():
            first += out.new_token_ids
    snap, table = a.held_snapshot("r"), a.held_block_table("r")
    dest = b.reserve("r", snap.num_tokens)
    for layer in range(a.model_config.num_layers):
        b.write_kv("r", layer, 0, a.read_kv(table, layer))
    b.commit(snap)
    a.release("r")
    a.step()  # the release's output
    rest = []
    while b.has_unfinished():
        for out in b.step():
            rest += out.new_token_ids
    assert len(dest) >= len(table)
    return first + rest


@pytest.mark.parametrize("spec", ["off", "ngram", "draft"])
def test_every_step_tensor_is_made_on_the_engines_device(tiny_path, spec):
    ref = engine(tiny_path, device="cpu", speculative=spec)
    expected = ref.generate(PROMPTS + PROMPTS[:1], PARAMS + [PARAMS[0]])  # the third shares a prefix
    moved_expected = _handoff_run(ref, engine(tiny_path, device="cpu", speculative=spec), PROMPTS[1], PARAMS[1])

    eng, a, b = (engine(tiny_path, device="cpu", speculative=spec) for _ in range(3))
    with torch.device("meta"):  # any tensor a step makes without its device lands here and fails the step
        got = eng.generate(PROMPTS + PROMPTS[:1], PARAMS + [PARAMS[0]])
        moved = _handoff_run(a, b, PROMPTS[1], PARAMS[1])
    for g, e in zip(got, expected):
        assert g.finish_reason == "length" and not g.error
        assert g.token_ids == e.token_ids and len(g.token_ids) == 24
    assert [lp[0] for lp in got[0].logprobs] == pytest.approx([lp[0] for lp in expected[0].logprobs], abs=1e-5)
    assert moved == moved_expected and len(moved) == 24
    for e in (eng, a, b):
        assert_no_leaks(e)
        assert e.kv_cache.device == HOST and e.model.rope.cos.device == HOST


@cuda
def test_the_engine_on_cuda_equals_cpu_float32_greedy(tiny_path):
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)] * 2
    cpu = engine(tiny_path, device="cpu").generate(PROMPTS, params)
    gpu_engine = engine(tiny_path, device="cuda")
    assert gpu_engine.kv_cache.is_cuda and gpu_engine.runner.decoder is None
    got = gpu_engine.generate(PROMPTS, params)
    assert [g.token_ids for g in got] == [c.token_ids for c in cpu]
    moved = _handoff_run(gpu_engine, engine(tiny_path, device="cpu"), PROMPTS[1], PARAMS[1])  # GPU -> CPU
    assert moved == _handoff_run(engine(tiny_path, device="cpu"), engine(tiny_path, device="cpu"), PROMPTS[1],
                                 PARAMS[1])
    assert_no_leaks(gpu_engine)


def test_a_pool_on_cuda_asks_ray_for_a_gpu_and_the_servers_auto_dtype_follows_it(monkeypatch):
    pytest.importorskip("ray")  # (the GPU machine's image has no Ray)
    from splitserve.platform.config import ServeConfig, engine_kwargs
    from splitserve.platform.pools import actor_options
    import splitserve.engine.engine as eng
    monkeypatch.setattr(eng, "_cpu_has_fast_bf16", lambda: False)  # this machine's CPU rule: float32

    cpu = ServeConfig()
    assert engine_kwargs(cpu, cpu.decode)["dtype"] == "float32" and engine_kwargs(cpu, cpu.decode)["device"] == "cpu"
    assert "num_gpus" not in actor_options(cpu, "decode", "d0")[0]

    mixed = ServeConfig(prefill={"device": "cuda"}, decode={"threads": 2})  # prefill on GPUs, decode on CPUs
    pre, dec = engine_kwargs(mixed, mixed.prefill, decodes=False), engine_kwargs(mixed, mixed.decode)
    assert (pre["device"], dec["device"]) == ("cuda", "cpu")
    assert pre["dtype"] == dec["dtype"] == "bfloat16"  # KV moves between the pools in one dtype
    options, _ = actor_options(mixed, "prefill", "p0")
    assert options["num_gpus"] == 1 and options["num_cpus"] == 1 and "GPU" not in options["resources"]
    assert "num_gpus" not in actor_options(mixed, "decode", "d0")[0]
    assert engine_kwargs(ServeConfig(dtype="float32", decode={"device": "cuda"}), mixed.decode)["dtype"] == "float32"

    for bad, match in (({"device": "cuda:1"}, "prefill.device must be one of \\('cpu', 'cuda'\\)"),
                       ({"device": "gpu"}, "prefill.device must be one of"),
                       ({"resources": {"GPU": 1}}, "prefill.resources cannot name CPU or GPU.*device: cuda")):
        with pytest.raises(ValueError, match=match):
            ServeConfig.from_dict({"prefill": bad})


def test_cuda_graphs_off_in_yaml_reaches_the_engines(tmp_path):
    import yaml
    from splitserve.platform.config import ServeConfig, engine_kwargs
    path = tmp_path / "serve.yaml"
    path.write_text("cuda_graphs: off\ndecode: {device: cuda}\n")  # a bare off: YAML's false
    cfg = ServeConfig.from_yaml(str(path))
    assert yaml.safe_load(path.read_text())["cuda_graphs"] is False
    assert engine_kwargs(cfg, cfg.decode)["cuda_graphs"] == "off" and engine_kwargs(cfg, cfg.decode)["device"] == "cuda"
    assert engine_kwargs(ServeConfig(), ServeConfig().decode)["cuda_graphs"] == "auto"
    with pytest.raises(ValueError, match="cuda_graphs must be 'auto' or 'off'; got 'eager'"):
        ServeConfig(cuda_graphs="eager")
