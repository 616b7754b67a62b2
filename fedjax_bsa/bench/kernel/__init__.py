"""The round-kernel benchmark (``fedjax-bsa bench kernel``, ``python -m
fedjax_bsa.bench.kernel``): the lane-packed kernel against its baselines.

* :mod:`~fedjax_bsa.bench.kernel.main`: the command, its settings and
  report.
* :mod:`~fedjax_bsa.bench.kernel.per_mix`: one mix end to end.
* :mod:`~fedjax_bsa.bench.kernel.methods`: the lane sweep and the methods
  timed on a mix, interleaved.
* :mod:`~fedjax_bsa.bench.kernel.checks`: the kernel against the reference
  on the benchmarking machine (``python -m fedjax_bsa.bench.kernel.checks``)
  and the compile test.
* :mod:`~fedjax_bsa.bench.kernel.report`: the headline and the markdown
  table.
* :mod:`~fedjax_bsa.bench.kernel.scenarios`: the seeded workload mixes.
* :mod:`~fedjax_bsa.bench.kernel.figures`: padding efficiency, rates,
  FLOPs.
* :mod:`~fedjax_bsa.bench.kernel.baselines`: the padded layout, the naive
  loop, the ceiling, FedJAX in its own venv (the repository's
  ``benchmarks/fedjax_uniform.py``).
"""
