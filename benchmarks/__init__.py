"""Benchmarks of grpo_kernels' ops next to what users would run instead.

`python -m benchmarks --help` runs them (sweeps of shapes, modes and providers; results.json, results.md and plots);
`pytest benchmarks/` runs tiny cases through pytest-benchmark. `providers` says what is measured, `runner` how, and
`report` what is written.
"""
