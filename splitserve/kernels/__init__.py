"""Kernels and the transforms that put them into a built model.

    ops.py        the operations the model calls; each picks Triton (CUDA) or the torch CPU path
    dispatch.py   that choice (by device; SPLITSERVE_KERNELS=triton forces Triton)
    quant.py      int8 / int4 weight formats, quantizers, GGUF block conversion, references
    linear.py     QuantLinear / QuantEmbedding and quantize_model (the quantization transform)
    cpu_linear.py bf16 linear with an fp16 GEMV path for single rows (unquantized CPU serving)
    cpu_decode.py the C++ decode step (csrc/cpu_decode.cpp): its build, the weights' hand-over to it
    triton/       the Triton kernels, each beside its plain-torch reference
"""

from splitserve.kernels.dispatch import prepare_interpreter

prepare_interpreter()
