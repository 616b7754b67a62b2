"""``python -m fedjax_bsa.bench.known_answer``: v3 against the fixed grid on
the known-answer problem (:mod:`fedjax_bsa.bench.known_answer.problem`),
for small and large heterogeneity, with annealing on and at the default;
prints, writes nothing."""

from __future__ import annotations

import argparse

import numpy as np

from fedjax_bsa.bench.known_answer.problem import ANNEAL
from fedjax_bsa.bench.known_answer.problem import seed_study

__all__ = ["main"]


def main(argv=None) -> int:
  argparse.ArgumentParser(prog="python -m fedjax_bsa.bench.known_answer",
                          description=__doc__.split("\n\n")[0]).parse_args(
                              argv)
  seeds = range(8)
  for patience, what in ((ANNEAL, "annealing on (anneal_patience 3)"),
                         (0, "the default (anneal_patience 0)")):
    print(f"v3 with {what}:")
    for zeta in (0.0, 3.0):
      r = seed_study(zeta, seeds, patience=patience)
      print(f"  zeta {zeta}, {len(seeds)} seeds: best fixed (b, eta, S) = "
            f"{r['best']} (eta S = {r['best_budget']:.2f}) in a median "
            f"{r['best_seconds']:.1f} s; v3 {r['v3_seconds']:.1f} s (target "
            f"reached on {r['hits']}/{len(seeds)} seeds, median eta S "
            f"{np.median(r['budget']):.2f}, batch "
            f"{np.median(r['batch']):.1f}); best / v3 = {r['ratio']:.2f}; "
            f"per seed, the best of the grid on that seed / v3: median "
            f"{np.median(r['oracle']):.2f}")
  return 0
