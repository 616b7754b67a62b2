"""Per-client gradient-noise state of the ``noise_scale`` controller.

Pure ``jax.numpy`` functions over a :class:`NoiseState` (bias-corrected EMAs
of each client's and the cohort's ``|G|^2`` and ``tr(Sigma)`` estimates):
:func:`noise_state_init`, :func:`noise_state_update` (folds a round's
:class:`~fedjax_bsa.plans.controllers.Feedback` in), :func:`client_noise_scales`
(each cohort client's smoothed ``B_simple``) and :func:`adascale_gain` (the
learning-rate gain of a batch over the reference batch).
:func:`fedjax_bsa.plans.controllers.noise_scale` is the controller built on
them; everything here is re-exported by :mod:`fedjax_bsa.plans.controllers`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa.core.types import Context
from fedjax_bsa.core.types import Feedback
from fedjax_bsa.kernel import noise

__all__ = ["NoiseState", "adascale_gain", "client_noise_scales",
           "noise_state_init", "noise_state_update"]


def adascale_gain(b_simple, batch, ref_batch, n=jnp.inf):
  """AdaScale gain of batch ``b`` over the reference ``b0`` on a client of
  ``n`` rows (Johnson et al. 2020, with the finite-population coefficient).

  The gain is the ratio of expected squared gradient norms,
  ``E|G_b0|^2 / E|G_b|^2 = (1 + B c_eff(b0, n)) / (1 + B c_eff(b, n))``
  with ``B = tr(Sigma) / |G|^2`` and ``c_eff`` =
  :func:`fedjax_bsa.kernel.noise.fpc_coefficient`; for ``n = inf`` it is
  ``(1 + B / b0) / (1 + B / b)`` (AdaScale's ``r`` for ``S = b / b0``).

  Args:
    b_simple: ``B``, float ``[K]`` (or any shape).
    batch: ``b``, broadcastable.
    ref_batch: ``b0``, the batch the learning rate was tuned for.
    n: rows each client holds (``inf``: independent draws).

  Returns:
    float32 gain of the broadcast shape (1 for ``B = 0``; below 1 for
    ``b < b0``).

  References:
    Johnson, Agrawal, Gu and Guestrin (2020), AdaScale SGD: A User-Friendly
    Algorithm for Distributed Training, ICML.

  >>> round(float(adascale_gain(64.0, 64, 8)), 4)     # (1 + 8) / (1 + 1)
  4.5
  >>> # b = n = 10 is exact; c_eff(8, 10) = 2 / (8 * 9): 1 + 64 / 36
  >>> round(float(adascale_gain(64.0, 10, 8, n=10)), 4)
  2.7778
  """
  b_simple = jnp.maximum(jnp.asarray(b_simple, jnp.float32), 0.0)
  num = 1.0 + b_simple * noise.fpc_coefficient(ref_batch, n)
  den = 1.0 + b_simple * noise.fpc_coefficient(batch, n)
  return (num / den).astype(jnp.float32)


class NoiseState(NamedTuple):
  """Per-client gradient-noise estimates (bias-corrected EMAs)."""
  g_sq: noise.EmaState      # [N] EMA of |G|^2 estimates
  trace: noise.EmaState     # [N] EMA of tr(Sigma) estimates
  last: jax.Array           # int32 [N], round of each client's last estimate
  cohort_g_sq: noise.EmaState   # [1] EMA of the cohort mean of |G|^2
  cohort_trace: noise.EmaState  # [1] EMA of the cohort mean of tr(Sigma)


def noise_state_init(num_clients: int) -> NoiseState:
  """An empty :class:`NoiseState` for ``num_clients`` clients.

  >>> noise_state_init(3).last.tolist()
  [0, 0, 0]
  """
  return NoiseState(noise.ema_init(num_clients), noise.ema_init(num_clients),
                    jnp.zeros((num_clients,), jnp.int32),
                    noise.ema_init(1), noise.ema_init(1))


def noise_state_update(state: NoiseState, feedback: Feedback, ctx: Context,
                       ema_decay) -> NoiseState:
  """Folds the last round's per-client estimates into the EMAs.

  A client's EMAs decay by ``ema_decay ** rounds_since_its_last_estimate``
  (so a rarely sampled client's old estimates fade as fast as the
  cohort's); clients without a noise step keep theirs. The cohort EMAs take
  the mean over the reporting clients, once per round.

  Args:
    state: the per-client and cohort EMAs (``N`` clients).
    feedback: last round's cohort ``[K]`` and its stats.
    ctx: the coming round (its ``round`` index).
    ema_decay: decay per round in ``[0, 1)`` (may be traced).

  Returns:
    The new :class:`NoiseState`.

  >>> from fedjax_bsa.plans.controllers import Context, empty_feedback
  >>> st = noise_state_init(4)
  >>> fb = empty_feedback(2)._replace(cohort=jnp.array([1, 3]))
  >>> fb = fb._replace(stats=fb.stats._replace(
  ...     grad_sq=jnp.array([1.0, 2.0]), trace=jnp.array([8.0, 8.0]),
  ...     noise_steps=jnp.array([3, 0])))
  >>> ctx = Context(jnp.int32(1), jnp.array([0, 1]), *([None] * 4))
  >>> noise.ema_value(noise_state_update(st, fb, ctx, 0.9).trace).tolist()
  [0.0, 8.0, 0.0, 0.0]
  """
  st = feedback.stats
  # a failed client (non-finite model, ``update_sq`` NaN) reports nothing
  seen = ((st.noise_steps > 0) & jnp.isfinite(st.grad_sq)
          & jnp.isfinite(st.trace) & jnp.isfinite(st.update_sq))
  gap = jnp.maximum(ctx.round - state.last[feedback.cohort], 1)
  decay = jnp.asarray(ema_decay, jnp.float32) ** gap.astype(jnp.float32)
  g_sq = noise.ema_update(state.g_sq, feedback.cohort, st.grad_sq, seen,
                          decay)
  trace = noise.ema_update(state.trace, feedback.cohort, st.trace, seen,
                           decay)
  last = state.last.at[feedback.cohort].set(
      jnp.where(seen, ctx.round, state.last[feedback.cohort]))
  any_seen = seen.any()
  cnt = jnp.maximum(seen.sum(), 1)
  one = jnp.zeros((1,), jnp.int32)
  cg = noise.ema_update(state.cohort_g_sq, one,
                        jnp.where(seen, st.grad_sq, 0.0).sum()[None] / cnt,
                        any_seen[None], ema_decay)
  ct = noise.ema_update(state.cohort_trace, one,
                        jnp.where(seen, st.trace, 0.0).sum()[None] / cnt,
                        any_seen[None], ema_decay)
  return NoiseState(g_sq, trace, last, cg, ct)


def client_noise_scales(state: NoiseState, cohort):
  """Each cohort client's smoothed ``B_simple`` and whether one exists.

  ``B_k`` is the ratio of the client's bias-corrected EMAs of ``tr(Sigma)``
  and ``|G|^2``; a client never seen, or whose smoothed estimates are not
  both positive, takes the cohort EMAs' ratio.

  Args:
    state: the EMAs.
    cohort: int32 ``[K]`` client ids.

  Returns:
    ``(b_simple, estimated)``: float32 ``[K]`` and bool ``[K]`` (False
    before any estimate exists; ``b_simple`` is then meaningless).

  >>> b, est = client_noise_scales(noise_state_init(3), jnp.array([0, 2]))
  >>> est.tolist()
  [False, False]
  """
  own_g = noise.ema_value(state.g_sq)[cohort]
  own_t = noise.ema_value(state.trace)[cohort]
  coh_g = noise.ema_value(state.cohort_g_sq)[0]
  coh_t = noise.ema_value(state.cohort_trace)[0]
  known = (state.g_sq.weight[cohort] > 0) & (own_g > 0) & (own_t > 0)
  have_cohort = (state.cohort_g_sq.weight[0] > 0) & (coh_g > 0) & (coh_t > 0)
  b_simple = jnp.where(known, noise.simple_noise_scale(own_g, own_t),
                       noise.simple_noise_scale(coh_g, coh_t))
  return b_simple, known | have_cohort
