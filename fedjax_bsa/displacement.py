"""Ours, v3: how far each client moves per round, then the batch that buys it
fastest.

The controller decides one quantity for the whole cohort, the *displacement
budget* ``Lambda = eta_k S_k`` (the sum of a client's learning rates over
its local steps, shared so that plain averaging stays consistent), and per
client the batch ``b_k``, rate ``eta_k`` and steps ``S_k = Lambda / eta_k``
that deliver it in the least simulated time. Each round it:

1. folds the last round's per-client noise estimates into the EMAs of
   :mod:`fedjax_bsa.noise_state` (``B_k``);
2. measures how much of the cohort's local work survived into the average
   (:func:`survival`): ``sigma = (|mean_k h_k|^2 - noise) / mean_k
   |G_k|^2``, ``h_k`` a client's mean applied gradient and ``|G_k|^2`` the
   mean squared gradient norm along its path. ``sigma`` falls when a
   client's path bends and when the clients' moves cancel (client drift);
   under the model ``sigma = sigma_0 / (1 + Lambda / Lambda_d)``, with
   ``sigma_0`` the recent peak of the smoothed ``sigma``, its level gives
   the drift scale ``Lambda_d = Lambda sigma / (sigma_0 - sigma)``
   (:func:`drift_scale`): near a point where the clients' moves cancel
   ``sigma`` falls towards 0 and so does the budget;
3. sets the next budget (:func:`budget_step`) from the progress model
   ``P(Lambda) = sigma_0 Lambda / (1 + Lambda / Lambda_d)`` over the
   round's time ``C + Lambda kappa`` (``C`` its communication, ``kappa``
   the slowest client's compute seconds per unit of ``Lambda``), fastest at
   ``Lambda* = sqrt(C Lambda_d / kappa)``: communication-bound rounds and
   little drift move further, compute-bound rounds and strong drift less;
   ``Lambda`` changes at most 2x a round and stays within ``[Lambda_0 /
   band, Lambda_0 band]`` (``Lambda_0 = eta_0 S_0``);
4. picks each client's batch minimising its compute seconds per unit of
   ``Lambda``, ``(o_k + b / v_k) / eta(b)``, with the rate ``eta(b)`` that
   keeps the user's noise temperature ``eta c_eff(b, n)`` (``linear``, the
   default: ``eta_0 min(tau c_eff(b_0) / c_eff(b), max_gain)``) or the
   finite-client AdaScale gain (``adascale``) (:func:`batch_for_budget`);
5. anneals (``patience`` > 0; off by default): when the smoothed cohort
   loss has not fallen 1% in ``patience`` rounds, the temperature factor
   ``tau`` halves (a larger batch, or a lower rate, for the same
   ``Lambda``);
6. guards (``guard=backoff``): a non-finite or sharply rising cohort loss,
   or paths that no longer point anywhere (:func:`path_coherence` below
   :data:`INCOHERENT`), halves the budget and the rates, holds the gain
   at 1 for :data:`COOLDOWN` rounds and caps it for good at half the
   largest gain the failing plan used (:func:`guard_step`).

Derivation: ``docs/method.md`` (f).

References:
  McCandlish, Kaplan, Amodei and the OpenAI Dota team (2018), An Empirical
  Model of Large-Batch Training, arXiv:1812.06162.
  Johnson, Agrawal, Gu and Guestrin (2020), AdaScale SGD, ICML.
  Wang et al. (2021), A Field Guide to Federated Optimization,
  arXiv:2107.06917.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa import controllers
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import noise
from fedjax_bsa.noise_state import NoiseState

__all__ = ["GUARDS", "DisplacementState", "survival", "path_coherence",
           "drift_scale", "budget_step",
           "batch_for_budget", "guard_step", "displacement"]

Plan = controllers.Plan

#: The guard modes: ``backoff`` (back off on a bad round) or ``off``.
GUARDS = ("backoff", "off")
#: How a client's rate follows its batch: ``linear`` (the user's noise
#: temperature ``eta_0 c_eff(b_0) / c_eff(b)``) or ``adascale``.
SCALINGS = ("linear", "adascale")
#: A cohort loss above this multiple of its running average is a bad round.
LOSS_RISE = 2.0
#: A path coherence below this is an oscillating (incoherent) round.
INCOHERENT = 0.02
#: Rounds the gain stays at 1 and the budget may not grow after a back-off.
COOLDOWN = 5
#: Per-round decay of the survival's running peak ``sigma_0``.
PEAK_DECAY = 0.99
#: Steps are at most this multiple of ``local_steps`` times ``band``.
STEPS_FACTOR = 4


class DisplacementState(NamedTuple):
  """The v3 controller's state."""
  noise: NoiseState          # per-client EMAs of |G|^2 and tr(Sigma)
  budget: jax.Array          # float32 [], Lambda for the coming round
  survival: noise.EmaState   # [1] EMA of the survival sigma
  peak: jax.Array            # float32 [], its recent maximum
  loss: noise.EmaState       # [1] EMA of the cohort's training loss
  rate: jax.Array            # float32 [], back-off multiplier of the rates
  cool: jax.Array            # int32 [], rounds left of a back-off
  backoffs: jax.Array        # int32 [], back-offs so far
  rows: jax.Array            # float32 [N], rows of each client seen (inf)
  loss_peak: jax.Array       # float32 [], the largest cohort loss seen
  temp: jax.Array            # float32 [], noise temperature (1: the user's)
  best: jax.Array            # float32 [], lowest smoothed loss since anneal
  since: jax.Array           # int32 [], rounds without a 1% improvement
  ceiling: jax.Array         # float32 [], gain allowed (halved on a bad round)
  last_gain: jax.Array       # float32 [], largest gain of the last plan


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
  ``b_k S_k`` rows its round drew, :func:`fedjax_bsa.noise.fpc_coefficient`)
  and ``|G_k|^2`` the mean over its steps of the squared full-gradient norm
  (``ClientStats.grad_sq``, over the clients that estimated it). It is 1
  when every step of every client pointed the same way, and falls both
  when a client's path bends (its steps stop agreeing with each other) and
  when the clients' moves cancel in the average (client drift). Clipped to
  ``[0, 1]``.

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
  for an infinite client, :func:`fedjax_bsa.goodput.time_optimal_batch`).
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


def displacement(batch_size, batch_min, batch_max: int, local_steps,
                 client_lr, ema_decay, max_gain=4.0, budget=0.0, band=4.0,
                 guard: str = "backoff", patience=0,
                 scaling: str = "linear", temp_min: float = 1 / 64,
                 improve: float = 0.01) -> controllers.Controller:
  """Ours, v3: a shared displacement budget, each client at the batch that
  delivers it fastest (module docstring; ``docs/method.md`` (f)).

  Args:
    batch_size: reference batch ``b_0`` (the user's; rates are tuned for it).
    batch_min: smallest batch (1 allowed).
    batch_max: largest batch (static: the candidate grid).
    local_steps: reference steps ``S_0``.
    client_lr: reference rate ``eta_0``.
    ema_decay: decay of the noise and coherence EMAs.
    max_gain: cap on ``eta_k / eta_0`` (>= 1).
    budget: the first round's ``Lambda`` (0: ``eta_0 S_0``).
    band: ``Lambda`` stays within ``[Lambda_0 / band, Lambda_0 band]``.
    guard: ``backoff`` or ``off``.
    patience: rounds without a 1% (``improve``) fall of the smoothed cohort
      loss before the temperature halves (0: never; may be traced).
    scaling: ``linear`` or ``adascale`` (:data:`SCALINGS`).
    temp_min: the lowest temperature factor.
    improve: the relative fall that counts as progress.

  Returns:
    A :class:`~fedjax_bsa.controllers.Controller`; its plan's steps are
    ``ceil(Lambda / eta_k)`` (a deadline may cut them later).

  >>> ctrl = displacement(8, 1, 64, 10, 0.1, 0.9)
  >>> ctx = controllers.Context(jnp.int32(0), jnp.array([0, 1]),
  ...     jnp.array([100.0, 100.0]), jnp.array([0.1, 0.1]),
  ...     jnp.array([64, 64]), None, jnp.array([50, 50]))
  >>> plan, _ = ctrl.update(controllers.empty_feedback(2), ctrl.init(3), ctx)
  >>> plan.batch_size.tolist(), plan.steps.tolist()   # nothing known yet
  ([8, 8], [10, 10])
  """
  if scaling not in SCALINGS:
    raise ValueError(f"rate_scaling={scaling!r} is not allowed: choose one "
                     f"of {', '.join(SCALINGS)}")
  if guard not in GUARDS:
    raise ValueError(f"guard={guard!r} is not allowed: choose one of "
                     f"{', '.join(GUARDS)}")
  grid_max = int(batch_max)

  def initial_budget():
    """``Lambda_0``: ``budget``, or ``eta_0 S_0`` when it is 0."""
    given = jnp.asarray(budget, jnp.float32)
    return jnp.where(given > 0, given, jnp.asarray(client_lr, jnp.float32)
                     * jnp.asarray(local_steps, jnp.float32))

  def init(num_clients):
    return DisplacementState(controllers.noise_state_init(num_clients),
                             initial_budget(), noise.ema_init(1),
                             jnp.float32(0.0),
                             noise.ema_init(1), jnp.float32(1.0),
                             jnp.int32(0), jnp.int32(0),
                             jnp.full((num_clients,), jnp.inf, jnp.float32),
                             jnp.float32(0.0), jnp.float32(1.0),
                             jnp.float32(jnp.inf), jnp.int32(0),
                             jnp.asarray(max_gain, jnp.float32),
                             jnp.float32(1.0))

  def update(feedback, state, ctx):
    if ctx.num_examples is None:
      raise ValueError("displacement needs Context.num_examples (rows per "
                       "client), got None")
    eta0 = jnp.asarray(client_lr, jnp.float32)
    s0 = jnp.asarray(local_steps, jnp.float32)
    lam0 = initial_budget()
    low_lam, high_lam = lam0 / band, lam0 * band
    st = feedback.stats
    ran = st.steps > 0
    anyran = ran.any()
    # 1. noise
    ns = controllers.noise_state_update(state.noise, feedback, ctx,
                                        ema_decay)
    own_t = noise.ema_value(ns.trace)[feedback.cohort]
    coh_t = noise.ema_value(ns.cohort_trace)[0]
    known = ns.trace.weight[feedback.cohort] > 0
    tr_fb = jnp.where(known, own_t, coh_t)
    # 2. coherence and the round's loss
    rows_fb = state.rows[feedback.cohort]
    sig, sig_ok = survival(st, feedback.update_sum_sq, tr_fb, rows_fb)
    pi_now, pi_ok = path_coherence(st, tr_fb, rows_fb)
    pi_ok = pi_ok & anyran
    one = jnp.zeros((1,), jnp.int32)
    ex = jnp.where(ran, st.examples, 0).astype(jnp.float32)
    loss = jnp.sum(jnp.where(ran, st.loss, 0.0) * ex) / jnp.maximum(
        ex.sum(), 1.0)
    finite = ~kernel_lib.failed_jobs(st).any()
    ref = noise.ema_value(state.loss)[0]
    have_ref = state.loss.weight[0] > 0
    bad = anyran & guard_step(loss, ref, have_ref, pi_now, pi_ok, finite,
                              state.loss_peak)
    if guard == "off":
      bad = jnp.zeros((), bool)
    surv = noise.ema_update(state.survival, one, sig[None],
                            (sig_ok & ~bad)[None], ema_decay)
    sig_s = noise.ema_value(surv)[0]
    have_sig = surv.weight[0] > 0
    peak = jnp.where(have_sig, jnp.maximum(PEAK_DECAY * state.peak, sig_s),
                     state.peak)
    lossema = noise.ema_update(state.loss, one, loss[None],
                               (anyran & ~bad & jnp.isfinite(loss))[None],
                               ema_decay)
    # 3. the batch each client would use, and what a unit of Lambda costs
    b_simple, estimated = controllers.cohort_noise_scale(ns, ctx.cohort)
    n = ctx.num_examples.astype(jnp.float32)
    cool = jnp.maximum(state.cool - 1, 0)
    cool = jnp.where(bad, COOLDOWN, cool)
    # a bad round halves the largest gain the last plan used, for good
    ceiling = jnp.where(bad, jnp.maximum(0.5 * state.last_gain, 1.0),
                        state.ceiling)
    ceiling = jnp.minimum(ceiling, jnp.asarray(max_gain, jnp.float32))
    gain_cap = jnp.where(cool > 0, 1.0, ceiling)
    rows_cap = jnp.maximum(ctx.num_examples.astype(jnp.int32), 1)
    cap = jnp.minimum(jnp.minimum(jnp.int32(grid_max),
                                  ctx.memory_cap.astype(jnp.int32)), rows_cap)
    # plateau: the smoothed loss has not improved for `patience` rounds
    lv = noise.ema_value(lossema)[0]
    good = anyran & ~bad & (lossema.weight[0] > 0)
    better = good & (lv < (1.0 - improve) * state.best)
    since = jnp.where(better, 0, state.since + good.astype(jnp.int32))
    best = jnp.where(better, lv, state.best)
    pat = jnp.asarray(patience, jnp.int32)
    anneal = (pat > 0) & (since >= jnp.maximum(pat, 1))
    temp = jnp.where(anneal, jnp.maximum(0.5 * state.temp, temp_min),
                     state.temp)
    since = jnp.where(anneal, 0, since)
    best = jnp.where(anneal, lv, best)
    best_b, gain = batch_for_budget(b_simple, n, ctx.step_overhead,
                                    ctx.speed, batch_size, gain_cap,
                                    batch_min, cap, grid_max, temp, scaling)
    b0 = jnp.minimum(jnp.asarray(batch_size, jnp.int32), cap)
    b = jnp.where(estimated, best_b, b0).astype(jnp.int32)
    gain = jnp.where(estimated, gain, jnp.minimum(1.0, temp))
    rate = jnp.where(bad, 0.5 * state.rate,
                     jnp.where(cool > 0, state.rate,
                               jnp.minimum(1.0, 1.25 * state.rate)))
    rate = jnp.maximum(rate, 1.0 / 64)
    lr = eta0 * gain * rate
    # 4. the budget
    lam_d = drift_scale(sig_s, peak, state.budget)
    kappa = jnp.max((ctx.step_overhead + b.astype(jnp.float32) / ctx.speed)
                    / lr)
    comm = (jnp.max(ctx.comm) if ctx.comm is not None else jnp.float32(0.0))
    lam = jnp.where(have_sig & ~bad,
                    budget_step(state.budget, lam_d, comm, kappa, low_lam,
                                high_lam, grow=cool == 0),
                    state.budget)
    lam = jnp.where(bad, jnp.maximum(0.5 * state.budget, low_lam), lam)
    max_steps = jnp.maximum(STEPS_FACTOR * band * s0, 1.0)
    steps = jnp.clip(jnp.ceil(lam / lr - 1e-4), 1.0, max_steps)
    new = DisplacementState(ns, lam, surv, peak, lossema, rate, cool,
                            state.backoffs + bad.astype(jnp.int32),
                            state.rows.at[ctx.cohort].set(n),
                            jnp.where(anyran & ~bad & jnp.isfinite(loss),
                                      jnp.maximum(state.loss_peak, loss),
                                      state.loss_peak), temp, best, since,
                            ceiling, jnp.max(gain * rate))
    return Plan(b, steps.astype(jnp.int32), lr.astype(jnp.float32)), new

  return controllers.Controller(init, update)

