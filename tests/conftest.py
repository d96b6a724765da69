import os

import torch

# No GPU here: the Triton kernels run under Triton's interpreter, which must be chosen before
# anything imports triton (transformers may).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _torch_threads():
    """Each test starts with the suite's torch threads: an engine made with ``num_threads`` (the profile
    command's default is 1) sets them for the whole process, and every later test ran on one core."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def real_model_path():
    from splitserve.engine.default_model import default_model_path
    return default_model_path()


@pytest.fixture(scope="session")
def real_engine(real_model_path):
    """Our engine on the real SmolLM2 GGUF in fp32 (the exactness reference setting), without a prefix
    cache: every request computed cold, whatever came before."""
    from splitserve.engine.engine import LLMEngine
    return LLMEngine(model=real_model_path, dtype="float32", show_progress=False, prefix_caching=False,
                     kv_cache_memory=256 << 20, max_num_batched_tokens=256)


@pytest.fixture(scope="session")
def hf_real(real_model_path):
    """transformers' own implementation of the same GGUF, dequantized to fp32: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    folder, name = os.path.split(real_model_path)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tok


def assert_no_leaks(engine):
    """Every KV block back in the pool, every queue empty, nothing tracked."""
    assert engine.kv.num_free_blocks == engine.kv.num_blocks, "KV blocks leaked"
    assert engine.kv.holders() == [] and engine.kv.num_tracked() == 0
    assert not engine.scheduler.waiting and not engine.scheduler.running
    assert engine.requests == {} and engine.kv_streams == {}


@pytest.fixture()
def aengine(tmp_path):
    """An AsyncEngine over a tiny random model (fp32, 128 blocks); its loop thread is gone afterwards."""
    from helpers import make_tiny_model
    from splitserve.engine.async_engine import AsyncEngine
    from splitserve.engine.engine import LLMEngine
    make_tiny_model(str(tmp_path), "llama", max_position_embeddings=512)
    eng = AsyncEngine(LLMEngine(model=str(tmp_path), dtype="float32", show_progress=False, num_kv_blocks=128))
    yield eng
    eng.shutdown()
    assert not eng._thread.is_alive()
