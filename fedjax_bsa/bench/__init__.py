"""Benchmarks of fedjax_bsa, installed with it (``fedjax-bsa bench ...``).

* :mod:`~fedjax_bsa.bench.harness`: interleaved timing, medians and
  spreads, the machine, the matmul peak, XLA memory, JSON/markdown reports.
* :mod:`~fedjax_bsa.bench.scenarios`: the seeded workload mixes.
* :mod:`~fedjax_bsa.bench.figures`: padding efficiency, rates, FLOPs.
* :mod:`~fedjax_bsa.bench.baselines`: the padded layout, the naive loop,
  FedJAX in its own venv.
* :mod:`~fedjax_bsa.bench.kernel_mixes`, :mod:`~fedjax_bsa.bench.
  kernel_bench`, :mod:`~fedjax_bsa.bench.kernel_checks`,
  :mod:`~fedjax_bsa.bench.kernel_report`, :mod:`~fedjax_bsa.bench.
  kernel_main`: the round-kernel benchmark (``fedjax-bsa bench kernel``).
* :mod:`~fedjax_bsa.bench.sweep_bench`: a packed sweep vs separate runs
  (``fedjax-bsa bench sweep``).
* :mod:`~fedjax_bsa.bench.regimes` (+ ``regimes_report``, ``regimes_figures``,
  ``regimes_main``): the regime study (``fedjax-bsa study``).
"""
