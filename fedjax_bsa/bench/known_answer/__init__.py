"""A known-answer check of the displacement controller (``python -m
fedjax_bsa.bench.known_answer``).

* :mod:`~fedjax_bsa.bench.known_answer.problem`: the problem, the fixed
  grid, v3's runs and the seed study.
* :mod:`~fedjax_bsa.bench.known_answer.main`: the command (prints).
"""
