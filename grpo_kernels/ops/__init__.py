"""Triton kernels, one op per file; each file holds the `@triton.jit` kernels and their launchers."""
