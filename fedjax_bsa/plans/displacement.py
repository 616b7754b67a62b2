"""Ours, v3: how far each client moves per round, then the batch that buys it
fastest.

The controller decides one quantity for the whole cohort, the *displacement
budget* ``Lambda = eta_k S_k`` (the sum of a client's learning rates over
its local steps, shared so that plain averaging stays consistent), and per
client the batch ``b_k``, rate ``eta_k`` and steps ``S_k = Lambda / eta_k``
that deliver it in the least simulated time. Each round it:

1. folds the last round's per-client noise estimates into the EMAs of
   :mod:`fedjax_bsa.plans.noise_state` (``B_k``);
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

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.core.config import GUARDS
from fedjax_bsa.core.config import RATE_SCALINGS
from fedjax_bsa.kernel import noise
from fedjax_bsa.plans import controllers
from fedjax_bsa.plans import pieces
from fedjax_bsa.plans.displacement_rules import batch_for_budget
from fedjax_bsa.plans.displacement_rules import budget_step
from fedjax_bsa.plans.displacement_rules import drift_scale
from fedjax_bsa.plans.displacement_rules import guard_step
from fedjax_bsa.plans.displacement_rules import INCOHERENT
from fedjax_bsa.plans.displacement_rules import LOSS_RISE
from fedjax_bsa.plans.displacement_rules import path_coherence
from fedjax_bsa.plans.displacement_rules import survival

__all__ = ["LOSS_RISE", "INCOHERENT",
           "DisplacementState", "survival", "path_coherence",
           "drift_scale", "budget_step",
           "batch_for_budget", "guard_step", "displacement"]

#: Rounds the gain stays at 1 and the budget may not grow after a back-off.
COOLDOWN = 5
#: Per-round decay of the survival's running peak ``sigma_0``.
PEAK_DECAY = 0.99
#: Steps are at most this multiple of ``local_steps`` times ``band``.
STEPS_FACTOR = 4


class DisplacementState(NamedTuple):
  """The state of v3's budget piece (the noise EMAs are the state of the
  chain's first piece, :func:`~fedjax_bsa.plans.pieces.noise_estimate`)."""
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
    guard: ``backoff`` or ``off``
      (:data:`~fedjax_bsa.core.config.GUARDS`).
    patience: rounds without a 1% (``improve``) fall of the smoothed cohort
      loss before the temperature halves (0: never; may be traced).
    scaling: ``linear`` (the user's noise temperature ``eta_0 c_eff(b_0) /
      c_eff(b)``) or ``adascale``
      (:data:`~fedjax_bsa.core.config.RATE_SCALINGS`).
    temp_min: the lowest temperature factor.
    improve: the relative fall that counts as progress.

  Returns:
    A :class:`~fedjax_bsa.plans.controllers.Controller`, the chain
    (:mod:`fedjax_bsa.plans.pieces`) of the shared noise estimate and v3's
    budget piece (state: ``(NoiseState, DisplacementState)``); its plan's
    steps are ``ceil(Lambda / eta_k)`` (a deadline may cut them later).

  >>> ctrl = displacement(8, 1, 64, 10, 0.1, 0.9)
  >>> ctx = controllers.Context(jnp.int32(0), jnp.array([0, 1]),
  ...     jnp.array([100.0, 100.0]), jnp.array([0.1, 0.1]),
  ...     jnp.array([64, 64]), None, jnp.array([50, 50]))
  >>> plan, _ = ctrl.update(controllers.empty_feedback(2), ctrl.init(3), ctx)
  >>> plan.batch_size.tolist(), plan.steps.tolist()   # nothing known yet
  ([8, 8], [10, 10])
  """
  if scaling not in RATE_SCALINGS:
    raise ValueError(f"rate_scaling={scaling!r} is not allowed: choose one "
                     f"of {', '.join(RATE_SCALINGS)}")
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
    return DisplacementState(initial_budget(), noise.ema_init(1),
                             jnp.float32(0.0),
                             noise.ema_init(1), jnp.float32(1.0),
                             jnp.int32(0), jnp.int32(0),
                             jnp.full((num_clients,), jnp.inf, jnp.float32),
                             jnp.float32(0.0), jnp.float32(1.0),
                             jnp.float32(jnp.inf), jnp.int32(0),
                             jnp.asarray(max_gain, jnp.float32),
                             jnp.float32(1.0))

  def update(d: pieces.Draft, state, feedback, ctx):
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
    # 1. noise (the chain's noise_estimate piece folded it in)
    ns = d.noise
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
    b_simple, estimated = d.b_simple, d.estimated
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
    new = DisplacementState(lam, surv, peak, lossema, rate, cool,
                            state.backoffs + bad.astype(jnp.int32),
                            state.rows.at[ctx.cohort].set(n),
                            jnp.where(anyran & ~bad & jnp.isfinite(loss),
                                      jnp.maximum(state.loss_peak, loss),
                                      state.loss_peak), temp, best, since,
                            ceiling, jnp.max(gain * rate))
    return d._replace(batch=b, steps=steps.astype(jnp.int32),
                      lr=lr.astype(jnp.float32)), new

  return pieces.chain(pieces.noise_estimate(ema_decay),
                      pieces.Piece(init, update))

