"""The figures the benchmarks report, each computed one way.

* padding efficiency: useful examples over the example slots computed;
  for the kernel exactly ``RoundOutput.useful / (RoundOutput.slots * mu)``
  (:func:`kernel_efficiency`), for the padded layout
  ``sum(b s) / (K s_max b_max)`` (:func:`padded_efficiency`);
* useful examples per second and the achieved FLOP rate as a fraction of
  the measured matmul peak (:func:`entry`), with FLOPs per example from
  :func:`flops_per_example`: ``6 x`` the MLP's matmul weights, or ``3 x``
  XLA's forward-pass cost for other models.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.bench import harness
from fedjax_bsa.setup import models

__all__ = ["kernel_efficiency", "padded_efficiency", "flops_per_example",
           "entry", "apply_peak", "total_bytes"]


def kernel_efficiency(out, mu: int) -> float:
  """Exact useful examples / example slots of one kernel round.

  Args:
    out: a :class:`~fedjax_bsa.kernel.RoundOutput` (``useful``, ``slots``).
    mu: the kernel's microbatch.

  >>> class Out: useful, slots = 88, 8
  >>> kernel_efficiency(Out, 16)
  0.6875
  """
  return int(out.useful) / (int(out.slots) * int(mu))


def padded_efficiency(batch_size, steps) -> float:
  """``sum(b s) / (K s_max b_max)``, exactly.

  >>> padded_efficiency([16, 32, 8], [2, 1, 3])
  0.3055555555555556
  """
  b = np.asarray(batch_size, np.int64)
  s = np.asarray(steps, np.int64)
  return float((b * s).sum()) / float(len(b) * s.max() * b.max())


def flops_per_example(model: models.Model, params) -> tuple[float, str]:
  """Forward + backward FLOPs of one example, and the formula used.

  The MLP: 2 forward and 4 backward FLOPs per matmul weight (biases
  excluded; the first layer's input gradient, which is not needed, is
  counted). Other models: 3 x XLA's ``cost_analysis`` of a forward pass
  of 256 examples, per example.

  >>> m = models.make_model("mlp", (64,), 10, hidden=256)
  >>> flops_per_example(m, m.init(jax.random.key(0)))[0]
  113664.0
  """
  if model.name in ("mlp", "logreg"):
    matmul = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params)
                 if a.ndim == 2)
    return 6.0 * matmul, (f"6 * matmul weights ({matmul}) per example "
                          "(2 forward + 4 backward FLOPs per weight)")
  batch = 256
  x = jnp.zeros((batch,) + tuple(model.input_shape), jnp.float32)
  cost = jax.jit(model.apply).lower(params, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  fwd = float(cost["flops"]) / batch
  return 3.0 * fwd, ("3 * XLA cost_analysis forward FLOPs per example "
                     f"({fwd:.0f})")


def entry(times: dict, useful: int, flops_ex: float, peak: float,
          **extra) -> dict:
  """One method's row: its time stats, useful examples per second, FLOP
  rate and fraction of the matmul peak, plus ``extra`` fields.

  >>> e = entry(harness.summarize([0.5]), 100, 2.0, 1000.0)
  >>> e["useful_examples_per_s"]["median"], e["fraction_of_matmul_peak"]
  (200.0, 0.4)
  """
  r = harness.rate(useful, times)
  achieved = r["median"] * flops_ex
  out = {"time_per_round_s": times, "useful_examples_per_s": r,
         "flops_per_s": achieved, "fraction_of_matmul_peak": achieved / peak}
  out.update(extra)
  return out


def apply_peak(obj, peak: float) -> None:
  """Recomputes every ``fraction_of_matmul_peak`` below ``obj`` from its
  entry's ``flops_per_s`` (after a later, faster peak measurement)."""
  if isinstance(obj, dict):
    for v in obj.values():
      apply_peak(v, peak)
    if "flops_per_s" in obj and "fraction_of_matmul_peak" in obj:
      obj["fraction_of_matmul_peak"] = obj["flops_per_s"] / peak
    elif "fraction_of_matmul_peak" in obj and isinstance(obj.get("kernel"),
                                                          dict):
      obj["fraction_of_matmul_peak"] = obj["kernel"]["fraction_of_matmul_peak"]
  elif isinstance(obj, list):
    for v in obj:
      apply_peak(v, peak)


def total_bytes(e: dict | None):
  """An entry's XLA ``memory.total_bytes`` (None when unknown)."""
  return ((e or {}).get("memory") or {}).get("total_bytes")
