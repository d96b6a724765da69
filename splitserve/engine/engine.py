"""The engine: one process, one model, continuous batching over a paged KV cache.

    add_request(prompt, params) -> request_id        validated here; bad input raises
    step() -> [RequestOutput]                         one iteration: schedule, run, sample, post-process
    abort(request_id)                                 frees its blocks; a final "abort" output follows

A request's life: WAITING (queued, no blocks) -> RUNNING (prefill chunks, then
one token per step) -> FINISHED (stop / length / abort / error; blocks freed),
with possible trips back to WAITING when preempted for blocks (its KV is then
recomputed), or to HELD when it moves to another engine (``moves.py``). All
of a request's state is on its ``Request`` record (``request.py``). ``step``
is the whole loop:

    propose()                           speculative drafts for decoding requests (if enabled)
    plan = scheduler.schedule()
    logits = runner.execute(plan)
    tokens = sample(logits)             or verify(drafts) -> accepted drafts + one token, KV rolled back
    return [post_process(request, tokens) ...]
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
import uuid
from dataclasses import dataclass, replace

import torch

from splitserve.engine.block_pool import KVCacheManager
from splitserve.engine.device import HOST, auto_dtype, resolve_device
from splitserve.engine.kv_cache import KVCacheSpec, allocate_kv_cache
from splitserve.engine.kv_stream import KVStream, layer_hook
from splitserve.engine.model import LlamaForCausalLM
from splitserve.engine.moves import MovesMixin
from splitserve.engine.output import CompletionResult, RequestOutput, StepLoad, TextState
from splitserve.engine.progress import progress
from splitserve.engine.request import Request, RequestStatus
from splitserve.engine.runner import ModelRunner, StepSequence
from splitserve.engine.sampler import TokenLogprob, apply_penalties, position_generator, sample, token_logprobs
from splitserve.engine.sampling_params import SamplingParams
from splitserve.engine.scheduler import Scheduler, SchedulerOutput
from splitserve.engine.spec_decode import SpeculativeMixin
from splitserve.engine.tokenizer import TextTokenizer
from splitserve.errors import InvalidRequestError, PromptTooLongError, UnknownRequestError
from splitserve.stats import EngineStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GRAPH_MODES = ("auto", "off", "eager")


@dataclass(frozen=True)
class EngineConfig:
    model: str | None = None  # .gguf file or HF directory; None = the default model
    # "cpu" | "cuda" | "cuda:N" | "auto" (a GPU if there is one; the generate command's default); see
    # engine/device.py. The library's default stays cpu: nothing moves to a GPU unless asked
    device: str = "cpu"
    dtype: str = "auto"  # "auto" (bfloat16 on a GPU; on CPU see dtype_name) | "float32" | "bfloat16"
    block_size: int = 16
    kv_cache_memory: int = 1 << 30  # bytes for the KV pool (ignored if num_kv_blocks is set)
    num_kv_blocks: int | None = None
    max_num_batched_tokens: int = 512  # per-step token budget (chunked prefill size)
    max_num_seqs: int = 64
    prefix_caching: bool = True  # share the KV of equal prompt prefixes between requests (block_pool.py)
    max_model_len: int | None = None  # default: the model's context, capped by the pool
    num_threads: int | None = None  # torch intra-op threads; default: all cores
    seed: int = 0  # for unseeded sampled requests
    # bf16 on CPU: single-row matmuls through fp16 GEMV (2x faster batch-1 decode,
    # one extra fp16 copy of the weights); see splitserve/kernels/cpu_linear.py
    gemv_dispatch: bool = True
    # decode-only steps on CPU run the whole forward in C++ (splitserve/kernels/cpu_decode.py);
    # false keeps the Python layer loop for every step (the baseline of bench_kernels.py)
    fused_decode: bool = True
    # decode-only steps on a GPU replay CUDA graphs captured per batch bucket (splitserve/engine/graphs.py):
    # "auto" (on a GPU) | "off" | "eager" (the graphs' buffers and padding, each replay an eager forward)
    cuda_graphs: str = "auto"
    # weight-only quantization of the linears: "none" | "int8" (per channel) | "int4" (group-wise);
    # GGUF Q4_0/Q4_1 tensors load straight into int4 (see splitserve/kernels/)
    quantization: str = "none"
    int4_group_size: int = 32
    # speculative decoding of decoding requests: "off" | "ngram" (prompt lookup) | "draft" (a draft model:
    # spec_draft_model, or None for the target itself quantized to int4); see engine/speculative.py
    speculative: str = "off"
    spec_draft_model: str | None = None
    spec_draft_kv_blocks: int | None = None  # the draft's own KV pool (default: a quarter of the target's)
    spec_max_draft_tokens: int = 4
    spec_max_batch: int = 4  # no drafts while more requests than this are running
    spec_draft_cost: float = 0.15  # verifying one more token, relative to a decode step (adaptive k)
    spec_calibrate: bool = True  # time verification steps at start-up for the adaptive k (~0.5 s)
    show_progress: bool = True


def dtype_name(name: str, device: torch.device = HOST) -> str:
    """The dtype ``name`` means on ``device`` of this machine: ``auto`` is bfloat16 on a GPU, and on CPU
    where it has AMX; else float32."""
    if name == "auto":
        gpu_bf16 = device.type != "cuda" or not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        return auto_dtype(device, device.type == "cpu" and _cpu_has_fast_bf16(), gpu_bf16)
    if name not in DTYPES:
        raise InvalidRequestError("dtype", f"dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return name


def resolve_dtype(name: str, device: torch.device = HOST) -> torch.dtype:
    return DTYPES[dtype_name(name, device)]


def _cpu_has_fast_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether bf16 GEMMs beat float32 here: only with AMX tiles. AVX512-BF16 alone is not enough: on an
    Intel Xeon with it (no AMX) torch's bf16 GEMMs ran at 0.55-0.65x float32 at prefill shapes, and the served
    int4 system was 1.1-1.5x faster with float32 activations and KV in each of 3 rounds
    (benchmarks/results/served_ramp.md)."""
    try:
        with open(cpuinfo) as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags


class LLMEngine(MovesMixin, SpeculativeMixin):
    def __init__(self, config: EngineConfig | None = None, **overrides):
        from splitserve.engine.default_model import default_model_path
        from splitserve.engine.weights import load_model

        cfg = config or EngineConfig()
        if overrides:
            cfg = EngineConfig(**{**cfg.__dict__, **overrides})
        self.config = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.cuda_graphs not in GRAPH_MODES:
            raise InvalidRequestError("cuda_graphs", f"cuda_graphs must be one of {', '.join(GRAPH_MODES)}; "
                                                     f"got {cfg.cuda_graphs!r}")
        self.model_path = cfg.model or default_model_path()
        bar = (lambda items, desc: progress(items, desc)) if cfg.show_progress else None
        from splitserve.kernels.linear import QUANTIZATION_MODES, quantize_model
        from splitserve.kernels.quant import INT4_GROUP_SIZES
        if cfg.quantization not in QUANTIZATION_MODES:
            raise InvalidRequestError("quantization", f"quantization must be one of {', '.join(QUANTIZATION_MODES)}; "
                                                      f"got {cfg.quantization!r}")
        if cfg.int4_group_size not in INT4_GROUP_SIZES:
            raise InvalidRequestError("int4_group_size", f"int4 group size must be one of {INT4_GROUP_SIZES}; "
                                                         f"got {cfg.int4_group_size}")
        loaded = load_model(self.model_path, bar, cfg.quantization, cfg.int4_group_size)
        self.model_config = loaded.config
        if isinstance(loaded.tokenizer_source, str):
            self.tokenizer = TextTokenizer.from_hf_dir(loaded.tokenizer_source)
        else:
            self.tokenizer = TextTokenizer.from_gguf(loaded.tokenizer_source)

        if cfg.num_kv_blocks:
            spec = KVCacheSpec(self.model_config.num_layers, cfg.num_kv_blocks, cfg.block_size,
                               self.model_config.num_kv_heads, self.model_config.head_dim, self.dtype)
        else:
            spec = KVCacheSpec.for_memory(self.model_config, cfg.kv_cache_memory, cfg.block_size, self.dtype)
        self.kv_spec = spec
        self.max_model_len = min(self.model_config.max_position_embeddings, spec.num_blocks * spec.block_size,
                                 cfg.max_model_len or 1 << 62)
        self.model = LlamaForCausalLM.from_state_dict(self.model_config, loaded.state, self.dtype,
                                                      self.max_model_len, self.device)
        quantize_model(self.model, cfg.quantization, cfg.int4_group_size)  # float linears left (HF dirs)
        on_cpu = self.device.type == "cpu"  # the CPU-only transforms: GEMV dispatch, the C++ decode step
        if not on_cpu:  # each kernel op per shape: the implementation measured fastest on this GPU (cached)
            from splitserve.kernels.cases import prepare
            with self.on_device():
                prepare(self.model, self.device, spec.block_size, cfg.max_num_seqs, cfg.quantization, bar,
                        max_context=self.max_model_len)
        if on_cpu and cfg.gemv_dispatch and self.dtype == torch.bfloat16 and cfg.quantization == "none":
            from splitserve.kernels.cpu_linear import use_gemv_dispatch
            use_gemv_dispatch(self.model)
        graphs = {"auto": "off" if on_cpu else "capture"}.get(cfg.cuda_graphs, cfg.cuda_graphs)
        # with graphs: one block more than the pool hands out, which the graphs' padding rows write to
        self.kv_cache = allocate_kv_cache(replace(spec, num_blocks=spec.num_blocks + (graphs != "off")), self.device)
        self.kv = KVCacheManager(spec.num_blocks, spec.block_size, cfg.prefix_caching)
        self.scheduler = Scheduler(self.kv, cfg.max_num_batched_tokens, cfg.max_num_seqs)
        decoder = None
        if graphs != "off":
            from splitserve.engine.graphs import GraphRunner, ladder_for
            decoder = GraphRunner(self.model, self.kv_cache, spec.block_size, self.max_model_len,
                                  ladder_for(cfg.max_num_seqs), graphs)
        elif on_cpu and cfg.fused_decode:
            from splitserve.kernels.cpu_decode import FusedDecoder
            decoder = FusedDecoder.wrap(self.model)
        self.runner = ModelRunner(self.model, self.kv_cache, spec.block_size, decoder)
        self.generator = torch.Generator().manual_seed(cfg.seed)
        # every per-request map (a leak check covers them all; the records hold everything else)
        self.requests: dict[str, Request] = {}  # queued or running
        self.held: dict[str, Request] = {}  # suspended: blocks kept while the KV travels (moves.py)
        self.reserved: dict[str, int] = {}  # receiving: request id -> reserved tokens, KV arriving
        self.pinned: dict[str, list[int]] = {}  # live migration: blocks pinned while they are read
        self.kv_streams: dict[str, KVStream] = {}  # prefilling: KV handed out layer by layer (kv_stream.py)
        self._pending: list[RequestOutput] = []  # outputs produced outside step (aborts, moves)
        self._arrivals = itertools.count()
        self.on_step = None  # called with each model step's StepLoad (in the engine's thread)
        if graphs == "capture":  # before any step (speculation's calibration runs some)
            with self.on_device():
                decoder.capture(bar)
        with self.on_device():
            self._init_speculation(cfg)

    def on_device(self):
        """The engine's GPU as the current one (Triton launches, streams and graphs use the current device;
        it is per thread, and the engine's steps run in its loop thread); nothing on CPU."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    # -- requests -----------------------------------------------------------

    def add_request(self, prompt: str | list[int] | None = None, params: SamplingParams | None = None, *,
                    messages: list[dict] | None = None, request_id: str | None = None,
                    hold_kv: bool = False, kv_stream: KVStream | None = None) -> str:
        """Validate and queue a request; raises InvalidRequestError (nothing queued) on bad input.
        ``kv_stream`` (with ``hold_kv``): its KV is handed out layer by layer as it is computed."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params", f"params must be a SamplingParams, got {type(params).__name__}")
        request_id = request_id or uuid.uuid4().hex
        self._check_new_id(request_id)
        token_ids = self._prompt_tokens(prompt, messages)
        limit = self.max_model_len - 1
        if len(token_ids) > limit:
            which = "the model's context" if limit + 1 == self.model_config.max_position_embeddings \
                else f"this engine's max_model_len ({self.max_model_len})"
            raise PromptTooLongError(len(token_ids), limit, which)
        req = Request(request_id, token_ids, params, next(self._arrivals), hold_kv=hold_kv,
                      text=TextState(self.tokenizer, params.stop))
        self._queue(req, kv_stream)
        return request_id

    def _queue(self, req: Request, kv_stream: KVStream | None) -> None:
        """A checked new request into the queue; with ``kv_stream`` (a request held after its prefill),
        its KV is handed out layer by layer as it is computed (``kv_stream.py``)."""
        if kv_stream is not None and not req.hold_kv:
            raise InvalidRequestError("kv_stream", "only a request held after its prefill (hold_kv) can stream "
                                                   "its KV")
        self.requests[req.request_id] = req
        self.scheduler.add(req)
        if kv_stream is not None:
            self.kv_streams[req.request_id] = kv_stream

    def _prompt_tokens(self, prompt, messages) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt (text or token ids) and messages")
        if messages is not None:
            if not isinstance(messages, list) or not messages:
                raise InvalidRequestError("messages", "messages must be a non-empty list of {role, content}")
            return self.tokenizer.apply_chat_template(messages)
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt is empty; send at least one character of text")
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise InvalidRequestError("prompt", "prompt token list is empty; send at least one token id")
            vocab = self.model_config.vocab_size
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("prompt", f"prompt token ids must be integers in [0, {vocab}); "
                                                    f"got {bad[:3]}")
            return list(prompt)
        raise InvalidRequestError("prompt", f"prompt must be a string or a list of token ids, "
                                            f"got {type(prompt).__name__}")

    def abort(self, request_id: str) -> None:
        req = self.requests.get(request_id)
        if req is None:
            raise UnknownRequestError(f"no request with id {request_id!r} is in the engine")
        self._finish(req, RequestStatus.FINISHED_ABORTED)
        self._pending.append(self._output(req, [], final=True))

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    # -- the loop -------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self.proposer is not None:
            self._propose()
        plan = self.scheduler.schedule()
        if plan.empty:
            return outputs
        started = time.perf_counter()
        hook = layer_hook(plan.chunks, self.kv_streams, self.kv_cache, self.kv.block_size) if self.kv_streams \
            else None
        try:
            with self.on_device():
                logits, order = self.runner.execute(self._step_sequences(plan), hook)
            if self.device.type == "cuda":  # the step's time is its GPU time (the sampling waits for it anyway)
                torch.cuda.synchronize(self.device)
        except Exception as e:  # a failed forward fails the requests in it, with the reason
            return outputs + self._fail_all(plan, f"model step failed: {type(e).__name__}: {e}")
        if self.on_step is not None:
            self.on_step(self._step_load(plan, time.perf_counter() - started))
        self.scheduler.on_step_finished(plan)
        # rows of one chunk are adjacent: one row = a plain sample, 1 + k rows = k drafts to verify
        groups: list[tuple[int, int, int]] = []  # (chunk index, first row, row count)
        for row, i in enumerate(order):
            if groups and groups[-1][0] == i:
                groups[-1] = (i, groups[-1][1], groups[-1][2] + 1)
            else:
                groups.append((i, row, 1))
        plain = [(i, row) for i, row, count in groups if count == 1]
        sampled = [plan.chunks[i].request for i, _ in plain]
        rows = [row for _, row in plain]
        plain_logits = logits if len(rows) == logits.shape[0] else logits[rows]  # no copy without drafts
        params = [r.params for r in sampled]
        if any(p.penalized for p in params):  # (penalized requests never speculate: all are plain rows)
            plain_logits = apply_penalties(plain_logits, params, [r.output_token_ids for r in sampled])
        plain_tokens = sample(plain_logits, params, [position_generator(r.params, r.num_output_tokens)
                                                     for r in sampled], self.generator)
        tokens = {i: [t] for (i, _), t in zip(plain, plain_tokens)}
        for i, row, count in groups:
            if count > 1:
                tokens[i] = self._verify(plan.chunks[i].request, logits[row:row + count])
        logprobs = self._logprobs(plan, groups, logits, tokens)
        for i, _, _ in groups:
            outputs.append(self._post_process(plan.chunks[i].request, tokens[i], logprobs.get(i)))
        return outputs

    @staticmethod
    def _logprobs(plan: SchedulerOutput, groups: list[tuple[int, int, int]], logits: torch.Tensor,
                  tokens: dict[int, list[int]]) -> dict[int, list[TokenLogprob]]:
        """Chunk index -> its new tokens' log-probabilities, for the requests that asked; token j of a
        chunk came from its row j (a plain sample's one row, or a verification's rows in order)."""
        rows: list[int] = []
        chosen: list[int] = []
        top: list[int] = []
        spans: list[tuple[int, int]] = []  # (chunk index, tokens)
        for i, row, _ in groups:
            k = plan.chunks[i].request.params.logprobs
            if k is not None:
                n = len(tokens[i])
                rows += range(row, row + n)
                chosen += tokens[i]
                top += [k] * n
                spans.append((i, n))
        if not rows:
            return {}
        flat = token_logprobs(logits[rows], chosen, top)
        out, at = {}, 0
        for i, n in spans:
            out[i], at = flat[at:at + n], at + n
        return out

    # -- post-processing ------------------------------------------------------------

    @staticmethod
    def _step_load(plan: SchedulerOutput, seconds: float) -> StepLoad:
        chunks = plan.chunks
        return StepLoad(seconds, len(chunks), plan.num_tokens, sum(c.num_new_tokens * c.end for c in chunks),
                        sum(c.end for c in chunks))

    def _step_sequences(self, plan: SchedulerOutput) -> list[StepSequence]:
        return [StepSequence(c.request.token_ids(c.start, c.end - c.num_draft_tokens) + c.request.draft_token_ids,
                             c.start, c.block_table, c.samples, 1 + c.num_draft_tokens)
                for c in plan.chunks]

    def _post_process(self, req: Request, token_ids: list[int],
                      logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        """Append the step's new tokens (one, or several after speculation) until one finishes the request;
        ``logprobs``: theirs, when the request asked."""
        emitted: list[int] = []
        try:
            status = None
            text = req.text
            for token_id in token_ids:
                req.output_token_ids.append(token_id)
                emitted.append(token_id)
                if token_id in self.tokenizer.eos_token_ids and not req.params.ignore_eos:
                    status = RequestStatus.FINISHED_STOPPED
                elif text.add(token_id):
                    status = RequestStatus.FINISHED_STOPPED
                elif req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= self.max_model_len:
                    status = RequestStatus.FINISHED_LENGTH
                if status is not None:
                    break
            logprobs = logprobs[:len(emitted)] if logprobs is not None else None
            if status is not None:
                self._finish(req, status)
            elif req.hold_kv:  # prefill role: hand the rest to a decode worker
                return self._hold(req, emitted[-1], logprobs)
            return self._output(req, emitted, final=status is not None, logprobs=logprobs)
        except Exception as e:  # isolate: only this request fails
            req.error = f"post-processing failed: {type(e).__name__}: {e}"
            self._finish(req, RequestStatus.FINISHED_ERROR)
            return self._output(req, emitted, final=True)

    def _hold(self, req: Request, token_id: int, logprobs: list[TokenLogprob] | None) -> RequestOutput:
        """Prefill role: suspend after the first token; the output says "prefilled" (the text is not
        flushed: the decode side continues it)."""
        self.suspend(req.request_id)
        return RequestOutput(req.request_id, [token_id], req.text.take(final=False), True,
                             RequestStatus.FINISHED_PREFILLED.finish_reason, req.num_prompt_tokens,
                             req.num_output_tokens, logprobs=logprobs)

    def _output(self, req: Request, new_ids: list[int], final: bool,
                logprobs: list[TokenLogprob] | None = None) -> RequestOutput:
        if final:
            req.text.finish()
        return RequestOutput(req.request_id, new_ids, req.text.take(final), final, req.status.finish_reason,
                             req.num_prompt_tokens, req.num_output_tokens, req.error, logprobs=logprobs)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        self.scheduler.finish(req, status)
        self.requests.pop(req.request_id, None)
        self._end_speculation(req.request_id)
        stream = self.kv_streams.pop(req.request_id, None)
        if stream is not None:  # it will never be held: its consumer stops waiting
            stream.close()

    def _fail_all(self, plan: SchedulerOutput, reason: str) -> list[RequestOutput]:
        outs = []
        for c in plan.chunks:
            c.request.error = reason
            self._finish(c.request, RequestStatus.FINISHED_ERROR)
            outs.append(self._output(c.request, [], final=True))
        return outs

    # -- conveniences -------------------------------------------------------------

    def generate(self, prompts: list, params: SamplingParams | list[SamplingParams] | None = None,
                 use_chat: bool = False) -> list[CompletionResult]:
        """Run prompts to completion together (batched); results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        ids = [self.add_request(messages=p, params=sp) if use_chat else self.add_request(p, sp)
               for p, sp in zip(prompts, params_list)]
        results = {i: CompletionResult(i) for i in ids}
        while any(r.finish_reason is None for r in results.values()):
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].add(out)
        return [results[i] for i in ids]

    def leaks(self) -> dict:
        """Every per-request structure by size (blocks: those not back in the pool): all zero when idle."""
        draft = getattr(self.proposer, "kv", None)
        return {"requests": len(self.requests), "held": len(self.held), "reserved": len(self.reserved),
                "pinned": len(self.pinned), "kv_streams": len(self.kv_streams),
                "waiting": len(self.scheduler.waiting),
                "running": len(self.scheduler.running), "pending_outputs": len(self._pending),
                "kv_blocks_in_use": self.kv.num_blocks - self.kv.num_free_blocks,
                "block_tables": self.kv.num_tracked(),
                "draft_requests": len(getattr(self.proposer, "computed", {})),
                "draft_blocks_in_use": draft.num_blocks - draft.num_free_blocks if draft is not None else 0}

    def stats(self) -> EngineStats:
        """A reading of the engine's gauges and counters (lock-free: good enough between steps)."""
        costs = self.spec_config.step_costs
        return EngineStats(
            num_waiting=len(self.scheduler.waiting), num_running=len(self.scheduler.running),
            num_kv_blocks=self.kv.num_blocks, num_free_kv_blocks=self.kv.num_free_blocks,
            num_cached_kv_blocks=self.kv.pool.num_cached, num_held=len(self.held), num_reserved=len(self.reserved),
            num_pinned=len(self.pinned), max_model_len=self.max_model_len,
            num_held_blocks=sum(len(self.kv.block_table(r)) for r in list(self.held)),
            num_reserved_blocks=sum(len(self.kv.block_table(r)) for r in list(self.reserved)),
            num_preemptions=self.scheduler.num_preemptions, prefix_queried_tokens=self.kv.prefix_queried_tokens,
            prefix_hit_tokens=self.kv.prefix_hit_tokens, speculative=self.spec_config.proposer,
            spec_step_costs=tuple(costs) if costs is not None else None, spec=dataclasses.replace(self.spec_stats))

