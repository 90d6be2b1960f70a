"""fusedaccum's benchmark suite: ``python -m benchmarks`` (``--tiny`` for a seconds-long smoke run, ``--full`` for
every sweep). Results go to ``benchmarks/results/<device>-<date>.json`` with PNG plots beside them.

* :mod:`benchmarks.bench_accumulate` — one accumulation micro-step, fusedaccum against native PyTorch.
* :mod:`benchmarks.bench_numerics` — error of bf16 accumulation against fp32 masters as N grows.
* :mod:`benchmarks.bench_end_to_end` — training with ``fusedaccum.GradAccumulator`` (skipped until it exists).
* :mod:`benchmarks.plots` — PNGs from a results JSON (``python -m benchmarks.plots results.json``).
* :mod:`benchmarks.common` — timers, copy bandwidth, kernel-launch counts, machine metadata.
"""
