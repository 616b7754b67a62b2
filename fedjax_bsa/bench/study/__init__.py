"""The regime study (``fedjax-bsa study``, ``python -m
fedjax_bsa.bench.study``).

* :mod:`~fedjax_bsa.bench.study.main`: the command; merges parts into
  ``regimes.json``.
* :mod:`~fedjax_bsa.bench.study.cells`: the cells, methods and tuning
  (what runs).
* :mod:`~fedjax_bsa.bench.study.runs`: sweeps run once and cached, run
  summaries, retiming for another bandwidth.
* :mod:`~fedjax_bsa.bench.study.report`: the analysis and its definitions.
* :mod:`~fedjax_bsa.bench.study.figures`: the markdown table and the
  heatmap.
"""
