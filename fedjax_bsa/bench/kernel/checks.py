"""Checks of the round kernel on the machine that benchmarks it.

* :func:`check_against_reference`: the kernel (two experiments packed in
  one lane pool, noise statistics on) against
  :func:`fedjax_bsa.kernel.reference.reference_round` on a random plan, both at
  ``highest`` matmul precision (so that a GPU's TF32 default does not
  blur the comparison); ``python -m fedjax_bsa.bench.kernel.checks`` runs
  it and exits 1 when they differ.
* :func:`compile_test`: the kernel, jitted once, on many fresh random
  plans; a counter in the traced function counts compiles (must be 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.bench import harness
from fedjax_bsa.bench.kernel import baselines
from fedjax_bsa.bench.kernel import figures
from fedjax_bsa.bench.kernel import scenarios
from fedjax_bsa.kernel import reference

__all__ = ["check_against_reference", "compile_test", "main"]

RTOL, ATOL = 2e-4, 2e-6           # deltas and losses (as tests/)
STATS_RTOL, STATS_ATOL = 5e-3, 1e-4  # noise statistics


def _close(a, b, rtol, atol) -> tuple[bool, float]:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return bool(np.allclose(a, b, rtol=rtol, atol=atol)), float(
      np.max(np.abs(a - b), initial=0.0))


def check_against_reference(*, clients: int = 8, mu: int = 4,
                            lanes: int = 3, seed: int = 0) -> dict:
  """The kernel vs the per-job reference loop on a random 2-experiment plan.

  Returns:
    ``{"ok": bool, "fields": {name: {"allclose", "max_abs_err"}}, ...}``.
  """
  rng = np.random.default_rng(seed)
  b = rng.integers(1, 16, clients).astype(np.int32)
  s = rng.integers(0, 5, clients).astype(np.int32)
  mix = scenarios.custom_mix(b, s, rows=20, name="check")
  model = scenarios.model_of(mix)
  params = jax.tree.map(lambda *a: jnp.stack(a), *[
      model.init(jax.random.key(e)) for e in range(2)])
  jobs = scenarios.make_jobs(mix)._replace(
      exp=jnp.asarray(np.arange(clients) % 2, jnp.int32))
  data = jax.device_put(mix.data)
  alg = baselines.fedavg()
  loss = baselines.loss_of(model)
  with jax.default_matmul_precision("highest"):
    kern = jax.jit(kernel_lib.make_round_kernel(
        loss, alg.client_tx, alg.client_init, microbatch=mu, lanes=lanes,
        num_experiments=2, noise_stats=True))
    out = jax.block_until_ready(kern(params, data, jobs, None))
    delta, stats, _, usum = reference.reference_round(
        loss, alg.client_tx, alg.client_init, params, data, jobs, None,
        microbatch=mu)
  pairs = {"delta": (jax.tree.leaves(out.delta), jax.tree.leaves(delta),
                     RTOL, ATOL),
           "loss": (out.stats.loss, stats.loss, RTOL, ATOL),
           "grad_sq": (out.stats.grad_sq, stats.grad_sq, STATS_RTOL,
                       STATS_ATOL),
           "trace": (out.stats.trace, stats.trace, STATS_RTOL, STATS_ATOL),
           "update_sum_sq": (out.update_sum_sq, usum, STATS_RTOL,
                             STATS_ATOL)}
  fields = {}
  for name, (got, want, rtol, atol) in pairs.items():
    got = got if isinstance(got, list) else [got]
    want = want if isinstance(want, list) else [want]
    res = [_close(g, w_, rtol, atol) for g, w_ in zip(got, want)]
    fields[name] = {"allclose": all(r[0] for r in res),
                    "max_abs_err": max(r[1] for r in res),
                    "max_abs_reference": max(float(np.max(np.abs(
                        np.asarray(w_)), initial=0.0)) for w_ in want),
                    "rtol": rtol, "atol": atol}
  exact = int(out.useful) == mix.useful_examples
  return {"ok": exact and all(f["allclose"] for f in fields.values()),
          "fields": fields, "useful_exact": exact,
          "device": str(jax.devices()[0]), "matmul_precision": "highest",
          "plan": {"batch_size": b.tolist(), "steps": s.tolist(),
                   "experiments": 2, "microbatch": mu, "lanes": lanes}}


def compile_test(w, kernel, *, mu: int, rounds: int, seed: int = 123
                 ) -> dict:
  """Runs ``kernel`` (a :class:`~fedjax_bsa.bench.kernel.methods.Counted`
  jitted kernel of the workload, already compiled once) on ``rounds``
  fresh random plans of the workload's clients and counts its traces."""
  jitted = kernel.fn
  rng = np.random.default_rng(seed)
  shapes, sizes, effs = set(), set(), []
  t0 = time.perf_counter()
  for r in range(rounds):
    b, s, lr = scenarios.random_plan(rng, w.mix.num_jobs)
    mix = w.mix.with_plan(b, s, lr)
    out = jax.block_until_ready(jitted(
        w.args[0], w.data, scenarios.make_jobs(mix, round_seed=seed + r)))
    if int(out.slots):
      effs.append(figures.kernel_efficiency(out, mu))
    if (s > 0).any():
      shapes.add((int(s.max()), int(b[s > 0].max())))
      sizes.update(int(v) for v in b[s > 0])
  try:
    cache = int(jitted._cache_size())  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    cache = None
  return {"rounds": rounds, "compiles": len(kernel.traces),
          "jit_cache_size": cache, "microbatch": mu,
          "seconds": time.perf_counter() - t0,
          "plan": "fresh b_k log-uniform [1, 256], s_k uniform [0, 20], lr "
                  "log-uniform [0.01, 0.3] and shuffles each round; the "
                  "count includes the benchmark's own compile and its "
                  "other plans",
          "padding_efficiency_median": float(np.median(effs)) if effs
          else None,
          "padded_kernel_compiles": len(shapes),
          "naive_loop_compiles": len(sizes),
          "baselines_note": "counted, not run: the padded layout compiles "
                            "once per distinct (s_max, b_max), the naive "
                            "loop once per distinct batch size"}


def main(argv=None) -> int:
  """``python -m fedjax_bsa.bench.kernel.checks [--out DIR]``: exit 1 when
  the kernel differs from the reference on this device."""
  p = argparse.ArgumentParser(prog="python -m fedjax_bsa.bench.kernel.checks")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="also write check_<machine>.json here")
  args = p.parse_args(argv)
  chk = check_against_reference()
  for name, f in chk["fields"].items():
    print(f"{name:<14} allclose={f['allclose']} max abs err "
          f"{f['max_abs_err']:.2e} of values up to "
          f"{f['max_abs_reference']:.2e} (rtol {f['rtol']}, atol "
          f"{f['atol']})")
  print(f"kernel vs reference_round on {chk['device']}: "
        f"{'OK' if chk['ok'] else 'DIFFERENT'}")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"check_{harness.machine_name()}.json")
    with open(path, "w") as fh:
      json.dump(dict(chk, versions=harness.versions()), fh, indent=1)
  return 0 if chk["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
