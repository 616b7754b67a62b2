"""The kernel's gradient-noise estimates against exact values on digits.

For clients of 12, 40 and 200 rows drawn from an IID and a Dirichlet(0.1)
partition of the digits training set, at the parameters of an MLP after a
few epochs of plain minibatch SGD, this compares

* the exact per-client ``|G|^2 = |mean_i g_i|^2`` and
  ``tr(Sigma) = mean_i |g_i - G|^2`` (population normalisation), from the
  per-example gradients ``jax.vmap(jax.grad(...))`` over the client's rows;
* the means of the round kernel's per-step estimates
  (:func:`fedjax_bsa.kernel.make_round_kernel`, ``ClientStats.grad_sq`` and
  ``.trace``: finite-population coefficients, ``docs/method.md`` (a)) over
  many rounds of fresh shuffles at frozen parameters (learning rate
  ``1e-12``);
* the uncorrected estimates (:func:`fedjax_bsa.kernel.noise.two_batch_estimates`
  with the harmonic mean of the microbatch sizes, as the old kernel did) on
  the same draws.

Each client runs four batches: below ``n`` (a multiple of the microbatch),
below ``n`` with a short last microbatch, ``n`` and above ``n``. A *round* is
one job per (client, batch) with its own shuffle seed; each job's estimate is
the mean over its steps, so the rounds are independent and the standard
errors are over rounds (steps within a round share a permutation and are
correlated).

The per-step microbatch and step norms are also recomputed on the host from
the rows :func:`fedjax_bsa.data.federated.example_rows` gives and the Gram
matrix of the per-example gradients (float64); the kernel's per-round
estimates must match that recomputation, and the uncorrected estimates come
from it.

Run::

    python -m fedjax_bsa.bench.noise_estimator [--quick] [--out DIR]

which writes ``noise_estimator.json`` (``--quick``:
``noise_estimator_quick.json``) into ``--out`` (default
``benchmarks/results``). Nothing is timed.

This module holds the command and its report (:func:`main`,
:func:`format_table`); the setup and exact values are in
:mod:`fedjax_bsa.bench.noise_estimator.problem`, the kernel rounds and the
host recomputation (:func:`~fedjax_bsa.bench.noise_estimator.rounds.run`)
in :mod:`fedjax_bsa.bench.noise_estimator.rounds`, and the standard errors
and acceptance in :mod:`fedjax_bsa.bench.noise_estimator.stats`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time

import jax
import numpy as np
import optax

from fedjax_bsa.bench import harness
from fedjax_bsa.bench.noise_estimator.problem import ALPHA
from fedjax_bsa.bench.noise_estimator.problem import FROZEN_LR
from fedjax_bsa.bench.noise_estimator.problem import HIDDEN
from fedjax_bsa.bench.noise_estimator.problem import MU
from fedjax_bsa.bench.noise_estimator.problem import POOL
from fedjax_bsa.bench.noise_estimator.problem import SIZES
from fedjax_bsa.bench.noise_estimator.rounds import run
from fedjax_bsa.bench.noise_estimator.stats import overall
from fedjax_bsa.bench.noise_estimator.stats import summarize

__all__ = ["format_table", "main"]


def _versions() -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "numpy": np.__version__, "optax": optax.__version__,
          "python": platform.python_version()}


def _machine() -> dict:
  dev = jax.devices()[0]
  info = {"platform": dev.platform, "device_kind": dev.device_kind,
          "cpu_count": os.cpu_count(), "system": platform.platform()}
  model = harness.cpu_model()
  if model is not None:
    info["cpu_model"] = model
  return info


def _commit() -> str | None:
  try:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], capture_output=True, text=True,
        cwd=os.path.dirname(os.path.abspath(__file__)),
        check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def format_table(rows) -> str:
  head = (f"{'part':>9} {'n':>4} {'b':>4} {'B exact':>8} | corrected "
          f"{'|G|^2':>12} {'tr':>12} {'B':>12} | uncorrected {'|G|^2':>12}"
          f" {'tr':>12} {'B':>12}")
  lines = [head]
  f = lambda d, k: f"{d[k + '_ratio']:6.3f}+-{d[k + '_ratio_se']:.3f}"
  for r in rows:
    c, u = r["corrected"], r["uncorrected"]
    lines.append(
        f"{r['partition']:>9} {r['n']:>4} {r['batch']:>4} "
        f"{r['exact']['b_simple']:8.1f} |           {f(c, 'g_sq'):>12} "
        f"{f(c, 'trace'):>12} {f(c, 'b_simple'):>12} |             "
        f"{f(u, 'g_sq'):>12} {f(u, 'trace'):>12} {f(u, 'b_simple'):>12}")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m fedjax_bsa.bench.noise_estimator",
      description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="200 rounds instead of 10000")
  p.add_argument("--rounds", type=int, default=None)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--epochs", type=int, default=3,
                 help="epochs of plain SGD before the parameters freeze")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="noise_estimator[_quick].json: " + harness.OUT_HELP)
  a = p.parse_args(argv)
  a.out = harness.results_dir(a.out, a.quick)
  rounds = a.rounds or (200 if a.quick else 10000)
  start = time.time()
  setup, cases, g_k, tr_k, recs, mismatch = run(rounds=rounds, seed=a.seed,
                                                epochs=a.epochs)
  rows = summarize(setup, cases, g_k, tr_k, recs)
  report = dict(
      what="noise estimates / exact values, digits MLP at a trained state, "
           "frozen parameters",
      settings=dict(dataset="digits", model="mlp", hidden=HIDDEN,
                    train=dict(optimizer="sgd", epochs=a.epochs, lr=0.1,
                               batch=32, train_accuracy=setup.train_accuracy),
                    microbatch=MU, sizes=list(SIZES),
                    partitions=dict(iid=f"partition.iid into {POOL}",
                                    dirichlet=f"partition.dirichlet alpha="
                                    f"{ALPHA} into {POOL}"),
                    client_rows="uniform n-subset of the smallest unused "
                                "pool client with >= n rows",
                    lr=FROZEN_LR, rounds=rounds, seed=a.seed,
                    acceptance="|mean - exact| <= max(0.1 |exact|, 3 se)",
                    se="over rounds (per-round estimate = mean over the "
                       "round's steps); B_simple = mean tr / mean |G|^2, "
                       "delta-method se"),
      kernel_vs_recompute_max_rel_diff=mismatch,
      summary=overall(rows),
      fields=dict(
          ratio="mean over rounds of the estimate / exact value (B_simple: "
                "mean tr / mean |G|^2 over exact B)",
          ratio_se="standard error of the ratio over rounds",
          predicted_g_sq_ratio="uncorrected: expectation from E small_sq ="
                               " |G|^2 + tr c_small, E big_sq = |G|^2 + tr "
                               "c_big (docs/method.md (a))",
          passes="|G|^2, tr and B_simple all within max(10%, 3 se)"),
      cases=rows,
      machine=_machine(), versions=_versions(), commit=_commit(),
      timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"),
      wall_s=round(time.time() - start, 1))
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "noise_estimator_quick.json" if a.quick
                      else "noise_estimator.json")
  with open(path, "w") as f:
    json.dump(report, f, indent=1)
  print(format_table(rows))
  print(f"kernel vs host recomputation: max rel diff {mismatch:.2e}")
  for which, d in report["summary"].items():
    dev = ", ".join(f"{f} {v:.3f}" for f, v in
                    d["max_abs_ratio_minus_1"].items())
    print(f"{which}: all within max(10%, 3 se): {d['all_pass']}; "
          f"max |ratio - 1|: {dev}")
  print(f"wrote {path} ({report['wall_s']} s)")
  return 0

