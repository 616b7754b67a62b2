"""A round's metrics: :class:`RoundMetrics` (per-round scalars and the
cohort's plans) from its plan and what its clients reported
(:func:`round_metrics`), inside the compiled round loop of
:mod:`fedjax_bsa.run.simulate`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import plans
from fedjax_bsa.kernel import noise

__all__ = ["RoundMetrics", "round_metrics", "round_train_loss",
           "masked_median"]


class RoundMetrics(NamedTuple):
  """Per-round scalars (stacked over a chunk) and per-client plans; a
  scalar has the name its chunk aggregate has in ``metrics.jsonl``."""
  train_loss: jax.Array
  round_time_s: jax.Array
  sim_time_s: jax.Array
  deadline_s: jax.Array
  mean_batch_size: jax.Array
  min_batch_size: jax.Array
  max_batch_size: jax.Array
  batch_over_memory_cap: jax.Array  # clients whose batch exceeded their
                                    # memory cap
  noise_scale: jax.Array      # median within-client B_simple of reporters
  cohort_noise_scale: jax.Array  # B_simple across clients (mean updates)
  mean_adascale_gain: jax.Array  # mean lr_k / client_lr over participants
  mean_lr: jax.Array          # client learning rates over participants
  min_lr: jax.Array
  max_lr: jax.Array
  mean_steps: jax.Array       # local steps over participants
  min_steps: jax.Array
  max_steps: jax.Array
  heterogeneity: jax.Array
  participants: jax.Array
  dropped: jax.Array
  failed: jax.Array           # clients whose model went non-finite (left out)
  no_fit: jax.Array           # clients with no step that fits the deadline
  partial: jax.Array          # clients whose steps were cut by a deadline
  examples: jax.Array
  padding_efficiency: jax.Array
  done: jax.Array             # this round ran (False past the last round)
  cohort: jax.Array           # int32 [K]
  batch: jax.Array            # int32 [K]
  steps: jax.Array            # int32 [K]
  lr: jax.Array               # float32 [K]
  b_simple: jax.Array         # float32 [K], this round's own estimate


def masked_median(x, mask):
  """Median of ``x[mask]`` (0 if empty), with static shapes."""
  k = mask.sum()
  srt = jnp.sort(jnp.where(mask, x, jnp.inf))
  lo = srt[jnp.maximum((k - 1) // 2, 0)]
  hi = srt[jnp.maximum(k // 2, 0)]
  return jnp.where(k > 0, 0.5 * (lo + hi), 0.0)


def round_train_loss(stats):
  """A round's training loss and its failed clients: ``(loss, failed)``.

  A client whose model went non-finite (``update_sq`` or its loss not
  finite) was left out of the round's average by the kernel
  (:func:`fedjax_bsa.kernel.lanes.job_end`); the loss is the example-weighted
  mean over the clients that ran and did not fail, and NaN when every client
  that ran failed (the experiment then diverges).

  >>> from fedjax_bsa.kernel import ClientStats
  >>> z = jnp.zeros(3)
  >>> st = ClientStats(jnp.array([1.0, 3.0, jnp.nan]), jnp.array([10, 30, 20]),
  ...                  jnp.array([1, 1, 1]), z, z, jnp.array([1, 1, 1]),
  ...                  jnp.array([0.1, 0.1, jnp.nan]))
  >>> loss, failed = round_train_loss(st)
  >>> float(loss), failed.tolist()       # (10 * 1 + 30 * 3) / 40
  (2.5, [False, False, True])
  """
  ran = stats.steps > 0
  failed = kernel_lib.failed_jobs(stats)
  ok = ran & ~failed
  ex = jnp.where(ok, stats.examples, 0)
  loss = jnp.sum(jnp.where(ok, stats.loss, 0.0) * ex) / jnp.maximum(
      ex.sum(), 1)
  return jnp.where(ran.any() & ~ok.any(), jnp.nan, loss), failed


def round_metrics(hp, cohort, rc, rp: plans.RoundPlan, stats, usum, sim_time,
             num_clients) -> RoundMetrics:
  """One experiment's round metrics."""
  run, outcome = rp.plan, rp.outcome
  took = outcome.participated & (run.steps > 0)
  ftook = took.astype(jnp.float32)
  nt = jnp.maximum(ftook.sum(), 1.0)
  bf = run.batch_size.astype(jnp.float32)
  b_simple = noise.simple_noise_scale(stats.grad_sq, stats.trace)
  # a round's |G|^2 estimate can be <= 0 (it is unbiased, not positive):
  # its ratio is no estimate of B, and is left out of the record
  reporting = took & (stats.noise_steps > 0) & (stats.grad_sq > 0)
  mean_sq = jnp.sum(stats.update_sq * ftook) / nt
  c_g, c_t = noise.cohort_estimates(mean_sq, usum / nt ** 2, took.sum(),
                                    num_clients)
  train_loss, failed = round_train_loss(stats)
  return RoundMetrics(
      train_loss=train_loss, failed=failed.sum(),
      round_time_s=outcome.round_time, sim_time_s=sim_time,
      deadline_s=rp.deadline,
      mean_batch_size=jnp.sum(bf * ftook) / nt,
      min_batch_size=jnp.min(jnp.where(took, bf, jnp.inf)),
      max_batch_size=jnp.max(jnp.where(took, bf, 0.0)),
      batch_over_memory_cap=jnp.sum(took & (run.batch_size > rc.memory_cap)),
      noise_scale=masked_median(b_simple, reporting),
      cohort_noise_scale=jnp.where(took.sum() >= 2,
                                   noise.simple_noise_scale(c_g, c_t), jnp.nan),
      mean_adascale_gain=jnp.sum(run.lr / hp["client_lr"] * ftook) / nt,
      mean_lr=jnp.sum(run.lr * ftook) / nt,
      min_lr=jnp.min(jnp.where(took, run.lr, jnp.inf)),
      max_lr=jnp.max(jnp.where(took, run.lr, 0.0)),
      mean_steps=jnp.sum(run.steps * ftook) / nt,
      min_steps=jnp.min(jnp.where(took, run.steps, 2**30)),
      max_steps=jnp.max(jnp.where(took, run.steps, 0)),
      heterogeneity=jnp.maximum(mean_sq - usum / nt ** 2, 0.0),
      participants=took.sum(), dropped=outcome.dropped.sum(),
      no_fit=rp.no_fit.sum(),
      partial=jnp.sum(took & (outcome.steps < rp.planned_steps)),
      examples=(run.batch_size * run.steps).sum(),
      padding_efficiency=jnp.float32(0.0), done=jnp.bool_(True),
      cohort=cohort,
      batch=run.batch_size, steps=run.steps, lr=run.lr,
      b_simple=jnp.where(reporting, b_simple, jnp.nan))
