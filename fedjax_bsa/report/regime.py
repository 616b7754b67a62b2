"""Which regime a configuration is in: compute against communication, and
how much the batch lever can gain at most (headroom).

Both are printed in every run's summary (``compute_comm_ratio``,
``headroom``) and used by the regime study, so that a result of 1.0x in a
cell with no headroom reads as what it is. See ``docs/method.md`` (e).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from fedjax_bsa.core import config as config_lib
from fedjax_bsa.core import registry as reg
from fedjax_bsa.plans import clock
from fedjax_bsa.plans import deadline as deadline_lib
from fedjax_bsa.plans import goodput

__all__ = ["describe", "reference_steps", "headroom"]


def reference_steps(cfg, sizes: np.ndarray) -> np.ndarray:
  """Each client's local steps at the reference batch ``batch_size`` under
  the configured local-work protocol: ``ceil(local_epochs n_k / b_0)`` for
  one registered with ``steps_from_epochs`` (``epochs``), else
  ``local_steps`` (``steps``, ``deadline``)."""
  if reg.LOCAL_WORK.prop(cfg.local_work, "steps_from_epochs"):
    return np.maximum(np.ceil(cfg.local_epochs * sizes / cfg.batch_size), 1)
  return np.full(sizes.shape, float(cfg.local_steps))


def describe(exp, records) -> dict:
  """The regime of an experiment, for its summary.

  Returns:
    ``compute_comm_ratio``: median over clients of local compute time at the
    reference batch over communication time; ``headroom``: the batch
    lever's largest possible gain (:func:`fedjax_bsa.plans.goodput.headroom`) at
    the run's median measured within-client noise scale, None when the run
    measured none (``noise_stats=false``).
  """
  cfg, res = exp.cfg, exp.resources
  sizes = np.array([len(p) for p in exp.parts], np.float64)
  steps = reference_steps(cfg, sizes)
  ratio = float(deadline_lib.compute_comm_ratio(
      res, cfg.batch_size, steps, exp.model_bytes))
  measured = [r["noise_scale"] for r in records
              if r.get("noise_scale") is not None]
  room = None
  if measured:
    room = headroom(exp, float(np.median(measured)))
  return dict(compute_comm_ratio=ratio, headroom=room,
              regime=_words(ratio))


def headroom(exp, b_simple: float) -> float:
  """The batch lever's largest possible gain for ``exp`` at noise scale
  ``b_simple``, under its protocol: with a local work that reads the
  deadline (registered with ``needs_deadline``, as ``local_work=deadline``)
  the progress a deadline round gains (:func:`fedjax_bsa.plans.goodput.
  deadline_headroom`, the deadline from the configured rule over every
  client's predicted one-epoch time at the reference batch), otherwise the
  time a synchronous round saves for the same progress
  (:func:`fedjax_bsa.plans.goodput.headroom`)."""
  cfg, res = exp.cfg, exp.resources
  sizes = np.array([len(p) for p in exp.parts], np.float64)
  comm = np.asarray(clock.comm_time(res, exp.model_bytes), np.float64)
  batches = np.arange(1, cfg.batch_max + 1)
  if not reg.LOCAL_WORK.prop(cfg.local_work, "needs_deadline"):
    steps = float(np.median(reference_steps(cfg, sizes)))
    return goodput.headroom(b_simple, sizes, res.step_overhead, res.speed,
                            comm, steps, batches)
  predicted = deadline_lib.one_epoch_time(res, cfg.batch_size, sizes,
                                          exp.model_bytes)
  rule = reg.DEADLINE_RULES.get(cfg.deadline_rule)(cfg, config_lib.hparams(
      cfg))
  d = float(rule(jnp.asarray(predicted), jnp.ones(sizes.shape, bool)))
  return goodput.deadline_headroom(b_simple, sizes, res.step_overhead,
                                   res.speed, comm, d, cfg.local_steps,
                                   batches)


def _words(ratio: float) -> str:
  if not math.isfinite(ratio):
    return "compute-bound"
  if ratio >= 3:
    return "compute-bound"
  if ratio <= 1 / 3:
    return "communication-bound"
  return "balanced"
