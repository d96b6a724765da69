"""Kernel choice per shape (``kernels/choice.py``, ``kernels/cases.py``): the fastest correct implementation,
never a wrong or failing one; a model's cases cover every op and bucket; the table round-trips through its
file and a second start reads it instead of measuring. On CPU the candidates are torch's paths and the Triton
kernels under the interpreter (the interpreter is slow: torch wins nearly every case here; on a GPU the same
code times compiled kernels)."""

import time

import pytest
import torch

from helpers import make_tiny_model
from splitserve.kernels import cases, choice
from splitserve.kernels.choice import Case, KernelTable, key, measure


def test_buckets_and_keys():
    assert key("rotary", 1) == "rotary||1|0" and key("rotary", 2) == "rotary||4|0"
    assert key("rotary", 5000) == key("rotary", 10 ** 6) == "rotary||8192|0"
    assert key("paged_decode_attention", 3, 600, (9, 64, 3)) == "paged_decode_attention|9x64x3|4|2048"
    assert key("add_rms_norm", 1, dims=(576,)) != key("add_rms_norm", 1, dims=(64,))
    empty = KernelTable()  # nothing measured: torch's paths, but in-place Triton reads for these two
    assert empty.choose("anything", 3) == "torch" and empty.choose("add_rms_norm", 3) == "torch"
    assert empty.choose("paged_decode_attention", 64, 32768) == "triton"
    assert empty.choose("linear_int4", 16, dims=(64, 128, 32)) == "triton-gemv"
    assert empty.choose("linear_int4", 17, dims=(64, 128, 32)) == "triton"


def test_a_merged_table_keeps_each_models_choices_apart():
    target = KernelTable({key("add_rms_norm", 1, dims=(576,)): "triton"}, meta={"model": "576"})
    draft = KernelTable({key("add_rms_norm", 1, dims=(64,)): "torch",
                         key("linear_int4", 1, dims=(64, 128, 32)): "torch"}, meta={"model": "64"})
    both = target.merged(draft)
    assert both.choose("add_rms_norm", 1, dims=(576,)) == "triton"
    assert both.choose("add_rms_norm", 1, dims=(64,)) == "torch"
    assert both.choose("linear_int4", 1, dims=(64, 128, 32)) == "torch"  # measured, not the default's GEMV
    assert both.meta["model"] == "576" and both.meta["merged"] == [{"model": "64"}]
    assert target.choose("add_rms_norm", 1, dims=(64,)) == "torch"  # merging left the target's table as it was


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
    ops = {c.op for c in model_cases}
    assert ops == {"add_rms_norm", "silu_and_mul", "rotary", "paged_decode_attention", "linear_int8"}
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
        assert choice.current() is table and len(table.choices) == len(model_cases)
        for k, timings in table.timings.items():  # every Triton candidate ran and matched torch's output
            assert all(isinstance(v, float) for v in timings.values()), (k, timings)
            assert table.choices[k] == min(timings, key=timings.get)  # (which wins here is the machine's
            #                                                            business: torch, unless it is preempted)
        again = cases.prepare(eng.model, torch.device("cpu"), 16, 8, "int8", **small)
        assert calls == [calls[0]] and again.choices == table.choices and again.meta["quantization"] == "int8"
    finally:
        choice.install(before)


def _engine(path, quantization, **overrides):
    from splitserve.engine.engine import LLMEngine
    from splitserve.kernels.dispatch import force_backend
    make_tiny_model(str(path), "llama", max_position_embeddings=512, **overrides)
    with force_backend("triton"):  # the quantized linears in the canonical (GPU) layout, as on a GPU
        return LLMEngine(model=str(path), dtype="float32", show_progress=False, num_kv_blocks=64,
                         quantization=quantization, fused_decode=False)


def test_the_keys_a_forward_asks_for_are_the_keys_measured_for_a_target_and_a_draft_of_other_shapes(
        tmp_path, monkeypatch):
    """A key the forward asks for that no case measures silently takes the op's default: the draft model's
    ops (other widths, int4 where the target is int8) once looked up the target's entries."""
    from splitserve.engine.sampling_params import SamplingParams
    from splitserve.kernels import linear, ops
    from splitserve.kernels.dispatch import key_dims
    engines = {"target": _engine(tmp_path / "t", "int8"),
               "draft": _engine(tmp_path / "d", "int4", hidden_size=32, intermediate_size=96,
                                num_attention_heads=2, num_key_value_heads=1)}
    asked = {name: set() for name in engines}
    for name, eng in engines.items():
        def record(t, op=None, rows=0, context=0, dims=None, name=name):  # the key backend_for looks up
            if op is not None:
                asked[name].add(key(op, rows, context, key_dims(t, dims)))
            return "torch"
        monkeypatch.setattr(ops, "backend_for", record)
        monkeypatch.setattr(linear, "backend_for", record)
        eng.generate(["hello there"], SamplingParams(max_tokens=4, temperature=0.0))  # 12 tokens, then 1
        monkeypatch.undo()
    measured = {name: {key(c.op, c.rows, c.context, c.dims) for c in cases.model_cases(
        eng.model, torch.device("cpu"), eng.kv_spec.block_size, 8, rows=(1, 16), contexts=(512,))}
        for name, eng in engines.items()}
    for name in engines:
        ops_asked = {k.split("|")[0] for k in asked[name]}
        assert ops_asked == {"add_rms_norm", "silu_and_mul", "rotary", "paged_decode_attention", "linear_int8",
                             *(["linear_int4"] if name == "draft" else [])}, ops_asked  # (the LM head: int8)
        assert asked[name] <= measured[name], asked[name] - measured[name]
    assert not asked["target"] & asked["draft"]  # no shape in common: no entry of one serves the other

    # both installed in one process: the target's table, then the draft's merged into it
    monkeypatch.setenv("SPLITSERVE_KERNEL_TABLE", str(tmp_path / "table.json"))
    monkeypatch.setattr(choice, "measure", lambda cs, **kw: KernelTable(
        {key(c.op, c.rows, c.context, c.dims): "torch" for c in cs}))  # the choices' wiring, not timings
    before = choice.current()
    try:
        small = dict(rows=(1, 16), contexts=(512,))
        cases.prepare(engines["target"].model, torch.device("cpu"), 16, 8, "int8", **small)
        monkeypatch.setenv("SPLITSERVE_KERNEL_TABLE", str(tmp_path / "draft.json"))
        cases.prepare(engines["draft"].model, torch.device("cpu"), 16, 8, "int4", merge=True, **small)
        assert asked["target"] | asked["draft"] <= set(choice.current().choices)
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
