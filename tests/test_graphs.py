"""Decode steps through the CUDA-graph runner (``engine/graphs.py``).

Without a GPU the runner's "eager" mode runs the same static buffers, padding
rows and buckets, each replay an eager forward: the outputs of an engine whose
decode steps go through it must equal an engine without it, token for token,
while batches shrink through every bucket (padding rows write their K/V into
the pad block; a padding row that wrote anywhere else would change what real
requests read). With a GPU the graphs are captured and replayed for real.
"""

import pytest
import torch

from conftest import assert_no_leaks
from helpers import make_tiny_model
from splitserve.engine.engine import LLMEngine
from splitserve.engine.graphs import DEFAULT_LADDER, GraphRunner, ladder_for
from splitserve.engine.runner import StepSequence, prepare_step
from splitserve.engine.sampling_params import SamplingParams
from splitserve.errors import InvalidRequestError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PROMPTS = [f"prompt number {i}: " + "abc " * (3 * i + 1) for i in range(6)]
# different lengths: the batch shrinks 6 -> 1 as they finish, through the buckets 8, 4, 2 and 1
PARAMS = [SamplingParams(max_tokens=6 + 5 * i, temperature=0, ignore_eos=True) for i in range(5)] + \
         [SamplingParams(max_tokens=20, temperature=0.7, top_k=30, seed=3, ignore_eos=True)]


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_graphs")
    make_tiny_model(str(path), "llama", max_position_embeddings=512)
    return str(path)


def engine(path, **kw):
    return LLMEngine(model=path, dtype="float32", show_progress=False, block_size=4, num_kv_blocks=96,
                     max_num_seqs=8, fused_decode=False, spec_calibrate=False, **kw)


def test_the_ladder_ends_at_the_engines_batch_limit():
    assert ladder_for(8) == (1, 2, 4, 8)
    assert ladder_for(3) == (1, 2, 3)
    assert ladder_for(64) == (1, 2, 4, 8, 16, 24, 32, 48, 64)
    assert ladder_for(300) == DEFAULT_LADDER + (300,)


def test_decode_steps_through_the_graph_buffers_equal_the_plain_engine(tiny_path):
    expected = engine(tiny_path, cuda_graphs="off").generate(PROMPTS, PARAMS)
    eng = engine(tiny_path, cuda_graphs="eager")
    graphs = eng.runner.decoder
    assert isinstance(graphs, GraphRunner) and graphs.buckets == (1, 2, 4, 8)
    assert eng.kv_cache.shape[1] == eng.kv.num_blocks + 1 and graphs.pad_block == eng.kv.num_blocks
    got = eng.generate(PROMPTS, PARAMS)
    for g, e in zip(got, expected):
        assert g.token_ids == e.token_ids and g.finish_reason == e.finish_reason == "length"
    # every bucket served steps, most of them padded (6, 5 rows in 8; 3 in 4)
    assert all(graphs.replays[n] > 0 for n in graphs.buckets), graphs.replays
    assert graphs.eager_steps == 0
    assert_no_leaks(eng)


def test_a_batch_bigger_than_every_bucket_runs_the_model_eagerly(tiny_path):
    eng = engine(tiny_path, cuda_graphs="off")
    cache = torch.zeros(eng.kv_cache.shape[0], eng.kv_cache.shape[1] + 1, *eng.kv_cache.shape[2:])
    runner = GraphRunner(eng.model, cache, 4, eng.max_model_len, (1, 2), mode="eager")
    seqs = [StepSequence([5 + i], 2, (i,), True) for i in range(3)]  # 3 decodes at position 2
    step = prepare_step(seqs, 4)
    plain = eng.model(step.input_ids, cache.clone(), step.meta, step.logits_indices)
    torch.testing.assert_close(runner(step, cache), plain)
    assert runner.eager_steps == 1 and runner.replays == {1: 0, 2: 0}
    torch.testing.assert_close(runner(prepare_step(seqs[:2], 4), cache), plain[:2])  # bucket 2, no padding
    assert runner.replays[2] == 1


def test_a_bucket_without_a_captured_graph_runs_eagerly(tiny_path):
    """Steps before the capture (speculation's start-up calibration runs some) find no graph: eager."""
    eng = engine(tiny_path, cuda_graphs="off")
    cache = torch.zeros(eng.kv_cache.shape[0], eng.kv_cache.shape[1] + 1, *eng.kv_cache.shape[2:])
    runner = GraphRunner(eng.model, cache, 4, eng.max_model_len, (1, 2), mode="capture")  # nothing captured
    step = prepare_step([StepSequence([5], 2, (0,), True)], 4)
    torch.testing.assert_close(runner(step, cache), eng.model(step.input_ids, cache.clone(), step.meta,
                                                               step.logits_indices))
    assert runner.eager_steps == 1 and runner.replays == {1: 0, 2: 0}


def test_padding_rows_write_only_the_pad_block(tiny_path):
    """A step smaller than its bucket after a bigger one: the rows it does not use are padding again, not
    the last step's requests (whose blocks may belong to another request by now)."""
    eng = engine(tiny_path, cuda_graphs="off")
    cache = torch.randn(eng.kv_cache.shape[0], 9, *eng.kv_cache.shape[2:])  # blocks 0..7 and the pad block 8
    runner = GraphRunner(eng.model, cache, 4, eng.max_model_len, (2,), mode="eager")
    runner(prepare_step([StepSequence([5], 2, (0,), True), StepSequence([7], 2, (1,), True)], 4), cache)
    cache[:, 1] = torch.randn_like(cache[:, 1])  # block 1 freed and filled by someone else
    before = cache.clone()
    runner(prepare_step([StepSequence([5], 3, (0,), True)], 4), cache)  # 1 row in bucket 2
    changed = {b for b in range(9) if not torch.equal(cache[:, b], before[:, b])}
    assert changed == {0, 8}  # the real row's slot, and the padding row's pad block
    assert runner.slot_blocks[1] == 8 and runner.context_lens[1] == 1 and runner.replays[2] == 2


def test_bad_graph_modes_are_refused(tiny_path):
    with pytest.raises(InvalidRequestError, match="cuda_graphs must be one of auto, off, eager; got 'on'"):
        engine(tiny_path, cuda_graphs="on")
    assert engine(tiny_path).runner.decoder is None or torch.cuda.is_available()  # auto on CPU: no graphs


@cuda
def test_captured_graphs_replay_what_the_eager_model_computes(tiny_path):
    eager = engine(tiny_path, device="cuda", cuda_graphs="off").generate(PROMPTS[:5], PARAMS[:5])
    eng = engine(tiny_path, device="cuda")
    assert set(eng.runner.decoder.graphs) == {1, 2, 4, 8}
    got = eng.generate(PROMPTS[:5], PARAMS[:5])
    assert [g.token_ids for g in got] == [e.token_ids for e in eager]
    assert sum(eng.runner.decoder.replays.values()) > 0
    assert_no_leaks(eng)


def test_the_gpu_benchmark_runs_its_code_at_tiny_shapes(tmp_path):
    """``bench_gpu.py --smoke``: every section (kernels beside torch, eager vs graph-buffer decode,
    transformers' static cache) on CPU, so the GPU run cannot fail on the script itself."""
    import json
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_gpu.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "TRITON_INTERPRET": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads((tmp_path / "gpu_smoke.json").read_text())
    kinds = {r["kernel"] for r in out["kernels"]}
    assert kinds == {"int8 GEMV", "int4 GEMV", "int8 GEMM", "int4 GEMM", "paged decode attention", "add+RMSNorm",
                     "SiLU-and-mul"}
    assert all(r["ours_us"] > 0 and r["baseline_us"] > 0 for r in out["kernels"])
    assert [r["batch"] for r in out["decode"]] == [1, 8] and [r["batch"] for r in out["hf"]] == [1, 8]
    assert "| decode batch |" in (tmp_path / "gpu_smoke.md").read_text()
