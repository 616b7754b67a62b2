"""The pieces of the v3 controller (:mod:`fedjax_bsa.plans.displacement`),
each a pure, jittable function of what the last round reported: how much
of the cohort's work survived into the average (:func:`survival`), how
straight the clients' paths were (:func:`path_coherence`), the drift scale
(:func:`drift_scale`), the next displacement budget (:func:`budget_step`),
each client's batch and rate for it (:func:`batch_for_budget`) and the
guard against bad rounds (:func:`guard_step`). Derivation:
``docs/method.md`` (f).
"""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_bsa.kernel import noise
from fedjax_bsa.plans import controllers

__all__ = ["LOSS_RISE", "INCOHERENT", "survival", "path_coherence",
           "drift_scale", "budget_step", "batch_for_budget", "guard_step"]

#: A cohort loss above this multiple of its running average is a bad round.
LOSS_RISE = 2.0
#: A path coherence below this is an oscillating (incoherent) round.
INCOHERENT = 0.02


def _round_noise(stats, trace, num_examples):
  """``nu_k = tr_k c_eff(b_k S_k, n_k)``: the sampling noise in ``|h_k|^2``
  of a round that drew ``b_k S_k`` rows (``ClientStats.examples``)."""
  return jnp.maximum(trace, 0.0) * noise.fpc_coefficient(
      jnp.maximum(stats.examples, 1), num_examples.astype(jnp.float32))


def survival(stats, update_sum_sq, trace, num_examples):
  """How much of the cohort's local work survived into the average:
  ``(sigma, valid)``.

  ``sigma = (|mean_k h_k|^2 - mean_k nu_k / K') / mean_k |G_k|^2``: ``h_k``
  is a client's mean applied gradient (its update over ``eta_k S_k``),
  ``nu_k = tr_k c_eff(b_k S_k, n_k)`` the sampling noise in it (the
  ``b_k S_k`` rows its round drew,
  :func:`fedjax_bsa.kernel.noise.fpc_coefficient`) and ``|G_k|^2`` the mean
  over its steps of the squared full-gradient norm (``ClientStats.grad_sq``,
  over the clients that estimated it). It is 1 when every step of every client
  pointed the same way, and falls both when a client's path bends (its steps
  stop agreeing with each other) and when the clients' moves cancel in the
  average (client drift). Clipped to ``[0, 1]``.

  Args:
    stats: the last round's :class:`~fedjax_bsa.kernel.ClientStats` [K].
    update_sum_sq: ``|sum_k h_k|^2`` over the clients that ran.
    trace: ``tr(Sigma_k)`` for each client [K] (smoothed).
    num_examples: rows each client holds [K].

  Returns:
    ``(sigma, valid)``: float32 [] and bool [] (False with fewer than two
    clients, or none that estimated ``|G_k|^2``).

  >>> from fedjax_bsa.kernel import ClientStats
  >>> one = jnp.ones((2,))
  >>> st = ClientStats(one, jnp.array([40, 40]), jnp.array([4, 4]),
  ...                  jnp.array([2.0, 2.0]), one, jnp.array([4, 4]),
  ...                  jnp.array([1.0, 1.0]))
  >>> s, ok = survival(st, 4.0, jnp.zeros(2), jnp.array([100, 100]))
  >>> float(s), bool(ok)     # |mean h|^2 = 1 against |G|^2 = 2, no noise
  (0.5, True)
  """
  ran = stats.steps > 0
  rep = ran & (stats.noise_steps > 0) & (stats.grad_sq > 0)
  k = jnp.maximum(ran.sum(), 1).astype(jnp.float32)
  nu = jnp.where(ran, _round_noise(stats, trace, num_examples), 0.0)
  num = update_sum_sq / (k * k) - nu.sum() / (k * k)
  den = jnp.where(rep, stats.grad_sq, 0.0).sum() / jnp.maximum(rep.sum(), 1)
  ok = (ran.sum() >= 2) & rep.any() & (den > 0) & jnp.isfinite(num)
  sigma = jnp.clip(num / jnp.where(den > 0, den, 1.0), 0.0, 1.0)
  return jnp.where(ok, sigma, 1.0).astype(jnp.float32), ok


def path_coherence(stats, trace, num_examples):
  """How straight the clients' own paths were: ``(pi, valid)``.

  ``pi = sum_k (|h_k|^2 - nu_k) / sum_k |G_k|^2`` over the clients that
  estimated ``|G_k|^2`` (notation of :func:`survival`): 1 when each
  client's steps all pointed the same way, near 0 when its path bent back
  on itself (an oscillating, unstable client). Clipped to ``[0, 1]``.

  >>> from fedjax_bsa.kernel import ClientStats
  >>> one = jnp.ones((2,))
  >>> st = ClientStats(one, jnp.array([40, 40]), jnp.array([4, 4]),
  ...                  jnp.array([2.0, 2.0]), one, jnp.array([4, 4]),
  ...                  jnp.array([1.0, 1.0]))
  >>> pi, ok = path_coherence(st, jnp.zeros(2), jnp.array([100, 100]))
  >>> float(pi), bool(ok)
  (0.5, True)
  """
  rep = (stats.steps > 0) & (stats.noise_steps > 0) & (stats.grad_sq > 0)
  nu = _round_noise(stats, trace, num_examples)
  signal = jnp.where(rep, stats.update_sq - nu, 0.0).sum()
  den = jnp.where(rep, stats.grad_sq, 0.0).sum()
  ok = rep.any() & (den > 0) & jnp.isfinite(signal)
  pi = jnp.clip(signal / jnp.where(den > 0, den, 1.0), 0.0, 1.0)
  return jnp.where(ok, pi, 1.0).astype(jnp.float32), ok


def drift_scale(sigma, peak, lam):
  """``Lambda_d`` of the model ``sigma = sigma_0 / (1 + Lambda /
  Lambda_d)``, with ``sigma_0`` (the survival of a vanishing step) taken as
  ``peak``, the recent maximum of the smoothed ``sigma``:
  ``Lambda_d = Lambda sigma / (peak - sigma)`` (``inf`` when ``sigma`` is at
  its peak).

  >>> round(float(drift_scale(0.25, 0.5, 2.0)), 3)   # sigma halved at 2
  2.0
  """
  sigma = jnp.asarray(sigma, jnp.float32)
  gap = jnp.asarray(peak, jnp.float32) - sigma
  lam = jnp.asarray(lam, jnp.float32)
  return jnp.where(gap > 1e-6, lam * sigma / jnp.where(gap > 1e-6, gap, 1.0),
                   jnp.inf).astype(jnp.float32)


def budget_step(budget, lam_d, comm, kappa, low, high, grow=True):
  """The next budget: ``Lambda* = sqrt(C Lambda_d / kappa)``, at most 2x
  away from ``Lambda`` and within ``[low, high]`` (only down when ``grow``
  is False).

  Progress per round ``P = pi_0 Lambda / (1 + Lambda / Lambda_d)`` over a
  round of ``C + Lambda kappa`` seconds is fastest at ``Lambda* = sqrt(C
  Lambda_d / kappa)`` (``docs/method.md`` (f)); ``Lambda_d = inf`` (no
  drift seen) gives the top of the band.

  >>> round(float(budget_step(1.0, 4.0, 1.0, 1.0, 0.25, 4.0)), 3)
  2.0
  >>> round(float(budget_step(1.0, 1.0, 0.25, 1.0, 0.25, 4.0)), 3)
  0.5
  """
  budget = jnp.asarray(budget, jnp.float32)
  best = jnp.sqrt(jnp.asarray(comm, jnp.float32) * lam_d / jnp.maximum(
      jnp.asarray(kappa, jnp.float32), 1e-12))
  best = jnp.where(jnp.isfinite(lam_d), best, jnp.inf)
  best = jnp.clip(best, 0.5 * budget, 2.0 * budget)
  best = jnp.where(grow, best, jnp.minimum(best, budget))
  return jnp.clip(best, low, high).astype(jnp.float32)


def batch_for_budget(b_simple, n, overhead, speed, ref_batch, max_gain,
                     low, cap, grid_max: int, temp=1.0, scaling="adascale"):
  """Each client's batch with the fewest compute seconds per unit of
  ``Lambda``, and the gain it brings.

  Moving ``Lambda`` at rate ``eta(b) = eta_0 min(r(b), g)`` takes
  ``Lambda / eta(b)`` steps of ``o + b / v`` seconds, so the batch minimises
  ``(o + b / v) / min(r(b), g)`` with ``r(b) = (1 + B c_eff(b_0, n)) /
  (1 + B c_eff(b, n))`` (AdaScale with the finite-client coefficient). Below
  the cap that is McCandlish et al.'s time-optimal batch (``sqrt(B o v)``
  for an infinite client, :func:`fedjax_bsa.plans.goodput.time_optimal_batch`).
  The minimum is taken over the integers ``1 .. grid_max`` within ``[low,
  cap_k]``, so the finite client and the cap are exact.

  With ``scaling="linear"`` the rate is ``eta_0 min(temp c_eff(b_0, n) /
  c_eff(b, n), g)`` (the user's noise temperature ``eta c_eff(b, n)``
  times ``temp``); with ``"adascale"`` also at most ``eta_0 r(b)``.

  Args:
    b_simple: ``B_k`` [K].
    n: rows [K] (float; ``inf`` allowed).
    overhead, speed: ``o_k``, ``v_k`` [K].
    ref_batch: ``b_0``.
    max_gain: ``g`` (may be traced).
    low: smallest batch (>= 1).
    cap: largest batch per client [K] (int).
    grid_max: static largest candidate.
    temp: the annealing factor ``tau`` of the temperature (1: the user's).
    scaling: ``adascale`` or ``linear``.

  Returns:
    ``(batch int32 [K], gain float32 [K])``.

  >>> b, g = batch_for_budget(jnp.array([16.0]), jnp.array([jnp.inf]),
  ...     jnp.array([1.0]), jnp.array([64.0]), 8, 100.0, 1,
  ...     jnp.array([128]), 128)
  >>> int(b[0])                                  # sqrt(16 * 1 * 64)
  32
  """
  grid = jnp.arange(1, grid_max + 1, dtype=jnp.float32)            # [J]
  nn = jnp.asarray(n, jnp.float32)[:, None]
  c0 = noise.fpc_coefficient(jnp.asarray(ref_batch, jnp.float32), nn)
  cb = noise.fpc_coefficient(grid[None, :], nn)
  tcap = jnp.where(cb > 0, jnp.asarray(temp, jnp.float32) * c0
                   / jnp.where(cb > 0, cb, 1.0), jnp.inf)
  gain = jnp.minimum(tcap, max_gain)
  if scaling == "adascale":
    gain = jnp.minimum(gain, controllers.adascale_gain(
        jnp.asarray(b_simple, jnp.float32)[:, None], grid[None, :],
        ref_batch, nn))
  cost = (overhead[:, None] + grid[None, :] / speed[:, None]) / gain
  ok = (grid[None, :] >= low) & (grid[None, :] <= cap[:, None])
  ok = ok.at[:, 0].set(ok[:, 0] | ~ok.any(axis=1))   # nothing fits: b = 1
  idx = jnp.argmin(jnp.where(ok, cost, jnp.inf), axis=1)
  batch = (idx + 1).astype(jnp.int32)
  return batch, jnp.take_along_axis(gain, idx[:, None], axis=1)[:, 0]


def guard_step(loss, ref_loss, have_ref, pi, pi_ok, finite, peak=0.0):
  """Whether the last round was bad: a non-finite value, a cohort loss
  above :data:`LOSS_RISE` times its running average and above half the
  largest cohort loss seen (``peak``: late in training a cohort of other
  clients can double a small loss without anything going wrong), or a
  coherence below :data:`INCOHERENT`.

  >>> bool(guard_step(5.0, 2.0, True, 0.5, True, True, peak=2.3))
  True
  >>> bool(guard_step(1.0, 2.0, True, 0.5, True, True, peak=2.3))
  False
  >>> bool(guard_step(0.07, 0.02, True, 0.5, True, True, peak=2.3))
  False
  """
  loss = jnp.asarray(loss, jnp.float32)
  rise = (jnp.asarray(have_ref, bool) & (loss > LOSS_RISE * ref_loss)
          & (loss > 0.5 * jnp.asarray(peak, jnp.float32)))
  wobble = jnp.asarray(pi_ok, bool) & (jnp.asarray(pi) < INCOHERENT)
  return ~jnp.asarray(finite, bool) | rise | wobble | ~jnp.isfinite(loss)
