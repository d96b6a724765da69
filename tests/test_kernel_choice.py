"""Kernel choice per shape (``kernels/choice.py``, ``kernels/cases.py``): the fastest correct implementation,
never a wrong or failing one; a model's cases cover every op and bucket; the table round-trips through its
file and a second start reads it instead of measuring. On CPU the candidates are torch's paths and the Triton
kernels under the interpreter (the interpreter is slow: torch wins every case here; on a GPU the same code
times compiled kernels)."""

import time

import pytest
import torch

from helpers import make_tiny_model
from splitserve.kernels import cases, choice
from splitserve.kernels.choice import Case, KernelTable, key, measure


def test_buckets_and_keys():
    assert key("rotary", 1) == "rotary|1|0" and key("rotary", 2) == "rotary|4|0"
    assert key("rotary", 5000) == key("rotary", 10 ** 6) == "rotary|8192|0"
    assert key("paged_decode_attention", 3, 600) == "paged_decode_attention|4|2048"
    empty = KernelTable()  # nothing measured: torch's paths, but in-place Triton reads for these two
    assert empty.choose("anything", 3) == "torch" and empty.choose("add_rms_norm", 3) == "torch"
    assert empty.choose("paged_decode_attention", 64, 32768) == "triton"
    assert empty.choose("linear_int4_64x128", 16) == "triton-gemv" and empty.choose("linear_int4_64x128", 17) == "triton"


def test_the_fastest_correct_candidate_wins_and_wrong_or_failing_ones_never_do():
    x = torch.randn(64, 64)

    def slow_right():
        time.sleep(0.002)
        return x * 2

    def boom():
        raise RuntimeError("no kernel for this shape")

    table = measure([
        Case("op", 1, 0, {"torch": slow_right, "fast-wrong": lambda: x * 2.1, "fails": boom,
                          "nan": lambda: x * float("nan")}),
        Case("op", 16, 0, {"torch": slow_right, "fast-right": lambda: (x, x * 2 + 1e-5)}),  # tuples: last item
        Case("op", 64, 0, {"torch": boom, "fast-right": lambda: x}),  # no reference: no entry, the default
    ])
    assert key("op", 64) not in table.choices and table.choose("op", 64) == "torch"
    assert table.timings[key("op", 64)]["torch"].startswith("failed: RuntimeError")
    assert table.choose("op", 1) == "torch" and table.choose("op", 16) == "fast-right"
    wrong = table.timings[key("op", 1)]
    assert "error" in wrong["fast-wrong"] and wrong["fails"].startswith("failed: RuntimeError")
    assert "error nan" in wrong["nan"] and wrong["torch"] >= 0.002


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton's interpreter on CPU tensors: no GPU")
def test_a_models_cases_cover_every_op_and_the_table_is_measured_once(tmp_path, monkeypatch):
    from splitserve.engine.engine import LLMEngine
    make_tiny_model(str(tmp_path / "m"), "llama", max_position_embeddings=512)
    from splitserve.kernels.dispatch import force_backend
    with force_backend("triton"):  # the quantized linears in the canonical (GPU) layout, as on a GPU
        eng = LLMEngine(model=str(tmp_path / "m"), dtype="float32", show_progress=False, num_kv_blocks=64,
                        quantization="int8", fused_decode=False)
    model_cases = cases.model_cases(eng.model, torch.device("cpu"), 16, 8, rows=(1, 16), contexts=(512,))
    ops = {c.op.split("_", 2)[0] if c.op.startswith("linear") else c.op for c in model_cases}
    assert ops == {"add_rms_norm", "silu_and_mul", "rotary", "paged_decode_attention", "linear"}
    linear = [c for c in model_cases if c.op.startswith("linear")]
    assert {c.rows for c in linear} == {1, 16} and all("triton-gemv" in c.candidates for c in linear)

    path = tmp_path / "table.json"
    monkeypatch.setenv("SPLITSERVE_KERNEL_TABLE", str(path))
    calls = []
    real = choice.measure

    def counted(cs, **kw):
        calls.append(len(cs))
        return real(cs, timer=lambda fn: choice.wall_timer(fn, 1), **kw)  # one timed run: the interpreter is slow

    monkeypatch.setattr(choice, "measure", counted)
    before = choice.current()
    small = dict(rows=(1, 16), contexts=(512,))  # (the interpreter crawls while big tensors are alive)
    try:
        table = cases.prepare(eng.model, torch.device("cpu"), 16, 8, "int8", **small)
        assert calls == [len(model_cases)] and path.exists()
        assert choice.current() is table and set(table.choices.values()) == {"torch"}
        assert len(table.choices) == len(model_cases)
        for k, timings in table.timings.items():  # every Triton candidate ran and matched torch's output
            assert all(isinstance(v, float) for v in timings.values()), (k, timings)
        again = cases.prepare(eng.model, torch.device("cpu"), 16, 8, "int8", **small)
        assert calls == [calls[0]] and again.choices == table.choices and again.meta["quantization"] == "int8"
    finally:
        choice.install(before)


def test_cpu_tensors_take_torchs_paths_whatever_the_table_says():
    from splitserve.kernels.dispatch import backend_for, force_backend
    before = choice.current()
    choice.install(KernelTable({key("rotary", 1): "triton"}))
    try:
        assert choice.choose("rotary", 1) == "triton" and choice.choose("rotary", 64) == "torch"
        assert backend_for(torch.zeros(1), "rotary", 1) == "torch"
        with force_backend("triton"):
            assert backend_for(torch.zeros(1), "rotary", 64) == "triton"  # forced: the interpreter tests
        if torch.cuda.is_available():
            cuda = torch.zeros(1, device="cuda")
            assert backend_for(cuda, "rotary", 1) == "triton" and backend_for(cuda, "rotary", 64) == "torch"
    finally:
        choice.install(before)
