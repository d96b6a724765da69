"""Triton kernels: the GPU path of ``splitserve.kernels``.

One file per kernel: the ``@triton.jit`` kernel, ``launch`` (checks shapes,
dtypes and strides, then launches) and ``reference`` (plain torch, what the
tests compare against). Without a GPU the tests run them under
``TRITON_INTERPRET=1`` on CPU tensors (``dispatch.triton_module`` sets it).

    w8_matmul        y = x @ (int8 W * per-channel scale)^T (+ bias)
    w4_matmul        y = x @ ((int4 W - 8) * group scale + group zero)^T (+ bias)
    rmsnorm          residual += delta (in place); y = rmsnorm(residual) * weight
    silu_mul         y = silu(gate) * up from one [M, 2I] tensor
    rotary           rotary embedding applied in place to q and k
    paged_attention  grouped-query decode attention reading K/V through block tables
    kv_quant         int8 KV rows with one scale per (token, head), and back
"""
