"""Kernels and the transforms that put them into a built model.

Today: the CPU linear dispatch (``cpu_linear``). Triton kernels (the GPU path),
quantized GEMMs and the dispatch by device arrive with the kernels issue.
"""
