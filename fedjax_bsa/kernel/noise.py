"""Gradient-noise statistics: two-batch estimates, finite clients, cohorts.

McCandlish et al. (2018, appendix A.1) estimate the squared norm of the true
gradient ``|G|^2`` and the trace of the per-example covariance ``tr(Sigma)``
from the squared norms of mean gradients at two batch sizes. For batches of
``b`` independent draws ``E|G_b|^2 = |G|^2 + tr(Sigma) / b``
(:func:`two_batch_estimates`, kept for comparison).

A client holds ``n`` rows and walks through a per-round random permutation of
them: a batch is a window of ``b`` consecutive positions of that permutation
(taken mod ``n``), i.e. rows drawn *without replacement*. Then

  E|G_b|^2 = |G|^2 + tr(Sigma) c_eff(b, n),
  c_eff(b, n) = r (n - r) / (b^2 (n - 1)),  r = b mod n,

with ``tr(Sigma)`` the population covariance trace (``1/n`` normalisation)
of the client's per-example gradients (:func:`fpc_coefficient`; for
``b <= n`` it is Cochran's finite-population correction
``(n - b) / (b (n - 1))``). The uncorrected estimates read ``|G|^2`` low by
``tr(Sigma) / (n - 1)``, which on clients of tens of rows is the whole
signal; :func:`fpc_estimates` removes that bias. :func:`cohort_estimates`
applies the same estimator across clients (clients' mean gradients as the
"examples", drawn without replacement from the population of clients), and
:func:`effective_critical_batch` is the batch a client of ``n`` rows can use
profitably. The derivations are in ``docs/method.md``.

Inside the round kernel the small batches are a step's microbatches (the
mean of their ``|g_j|^2`` and the mean of their ``c_eff(n_j, n)``) and the
big batch is the step. The simple noise scale is
``B_simple = tr(Sigma) / |G|^2``; numerator and denominator are smoothed
with separate, bias-corrected EMAs and the ratio is taken after.

References:
  McCandlish, Kaplan, Amodei and the OpenAI Dota team (2018), An Empirical
  Model of Large-Batch Training, arXiv:1812.06162.
  Cochran (1977), Sampling Techniques, 3rd ed., theorem 2.2 (variance of
  the mean of a sample drawn without replacement).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["two_batch_estimates", "fpc_coefficient", "fpc_estimates",
           "cohort_estimates", "effective_critical_batch", "EmaState",
           "ema_init", "ema_update", "ema_value", "simple_noise_scale"]

# fpc_estimates: coefficient gaps below this fraction of c_small are not
# divided by (float32 cancellation and a useless, huge-variance estimate).
FPC_RTOL = 1e-3


def two_batch_estimates(small_sq, b_small, big_sq, b_big):
  """Unbiased ``(|G|^2, tr(Sigma))`` from squared norms at two batch sizes,
  for batches of independent draws (McCandlish et al. 2018, A.1).

  Args:
    small_sq: mean of ``|G_small|^2`` over the small batches.
    b_small: size of the small batches (harmonic mean if they differ).
    big_sq: ``|G_big|^2`` of the mean gradient over the big batch.
    b_big: size of the big batch; must exceed ``b_small``.

  Returns:
    ``(g_sq, trace)``, arrays of the broadcast shape of the inputs.

  >>> g, t = two_batch_estimates(3.0, 1.0, 1.5, 4.0)
  >>> float(g), float(t)
  (1.0, 2.0)
  """
  b_small = jnp.asarray(b_small, jnp.float32)
  b_big = jnp.asarray(b_big, jnp.float32)
  g_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
  trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
  return g_sq, trace


def fpc_coefficient(batch, n):
  """Noise coefficient of a window of ``batch`` consecutive positions of a
  uniform random permutation of ``n`` rows.

  ``E|G_b|^2 = |G|^2 + tr(Sigma) c_eff(b, n)`` with ``tr(Sigma)`` the
  population (``1/n``) covariance trace of the ``n`` per-example gradients.
  Writing ``b = q n + r`` (``0 <= r < n``), the window holds every row ``q``
  times plus ``r`` distinct rows once more, so its mean is
  ``G + (r / b)(G_r - G)`` and (Cochran 1977, thm 2.2)

    c_eff(b, n) = (r / b)^2 (n - r) / (r (n - 1)) = r (n - r) / (b^2 (n - 1)),

  which is ``(n - b) / (b (n - 1))`` for ``b <= n``, 0 when ``n`` divides
  ``b``, 0 where ``n <= 1`` and ``1 / b`` where ``n`` is ``inf`` (independent
  draws). Derivation: ``docs/method.md`` (a).

  Args:
    batch: window sizes ``b >= 1``, any shape (int or float).
    n: rows held, broadcastable with ``batch``; ``inf`` allowed.

  Returns:
    float32 array of the broadcast shape.

  >>> c = fpc_coefficient(jnp.array([1, 4, 5, 7, 10]), 5)
  >>> [round(float(x), 4) for x in c]     # b = 7 = 5 + 2: 2*3 / (49*4)
  [1.0, 0.0625, 0.0, 0.0306, 0.0]
  """
  b = jnp.maximum(jnp.asarray(batch, jnp.float32), 1.0)
  n = jnp.asarray(n, jnp.float32)
  finite = jnp.isfinite(n)
  n_f = jnp.where(finite, n, 2.0)
  r = jnp.where(finite, jnp.mod(b, jnp.maximum(n_f, 1.0)), b)
  # (n - r) / (n - 1), which is 1 for an infinite client
  frac = jnp.where(finite, (n_f - r) / jnp.maximum(n_f - 1.0, 1.0), 1.0)
  c = r * frac / (b * b)
  return jnp.where(finite & (n_f <= 1.0), 0.0, c).astype(jnp.float32)


def fpc_estimates(small_sq, c_small, big_sq, c_big):
  """Unbiased ``(|G|^2, tr(Sigma))`` on a finite client, and where defined.

  McCandlish et al.'s (2018, A.1) two-batch estimator with the
  without-replacement coefficients of :func:`fpc_coefficient`.

  With ``E[small_sq] = |G|^2 + tr c_small`` and
  ``E[big_sq] = |G|^2 + tr c_big`` (two linear equations):

    tr    = (small_sq - big_sq) / (c_small - c_big)
    |G|^2 = big_sq - c_big tr

  Inside the kernel ``small_sq`` is the mean over a step's microbatches of
  ``|g_j|^2`` and ``c_small`` the mean over them of
  ``fpc_coefficient(n_j, n)`` (unbiased even with a short last microbatch,
  as expectation is linear); ``big_sq = |G_b|^2`` of the step and
  ``c_big = fpc_coefficient(b, n)``. With ``c = 1 / size`` this is
  :func:`two_batch_estimates`.

  Args:
    small_sq: mean squared norm of the small batches' mean gradients.
    c_small: mean of their coefficients.
    big_sq: squared norm of the big batch's mean gradient.
    c_big: its coefficient.
    (All broadcastable to one shape.)

  Returns:
    ``(g_sq, trace, ok)``: float32 estimates and a bool ``ok``, False (and
    both estimates 0) where ``c_small - c_big <= FPC_RTOL * c_small``:
    ``n <= 1``, both windows exact (multiples of ``n``), or a coefficient
    gap too small to divide by.

  >>> g, t, ok = fpc_estimates(3.0, 1.0, 1.5, 0.25)
  >>> float(g), float(t), bool(ok)
  (1.0, 2.0, True)
  >>> bool(fpc_estimates(3.0, 0.0, 1.5, 0.0)[2])
  False
  """
  small_sq = jnp.asarray(small_sq, jnp.float32)
  big_sq = jnp.asarray(big_sq, jnp.float32)
  c_small = jnp.asarray(c_small, jnp.float32)
  c_big = jnp.asarray(c_big, jnp.float32)
  gap = c_small - c_big
  ok = gap > FPC_RTOL * c_small
  ok = ok & (gap > 0)
  trace = (small_sq - big_sq) / jnp.where(ok, gap, 1.0)
  g_sq = big_sq - c_big * trace
  return jnp.where(ok, g_sq, 0.0), jnp.where(ok, trace, 0.0), ok


def cohort_estimates(mean_client_sq, mean_sq, num_reporting, num_clients):
  """``(|H|^2, tr)`` across clients: the cohort as a sample of clients.

  McCandlish et al.'s two-batch estimator with clients as the examples:
  the ``K'`` reporting clients' mean applied gradients ``h_k`` are drawn
  without replacement from the ``N`` clients, ``mean_client_sq`` is
  ``mean_k |h_k|^2`` (small batches of one client, coefficient
  ``c_eff(1, N) = 1``) and ``mean_sq = |mean_k h_k|^2`` (one big batch,
  ``c_eff(K', N)``). For fixed ``h_k`` the results are unbiased for the
  squared norm of the population mean ``|H|^2`` and the population trace
  ``(1/N) sum_k |h_k - H|^2``. Under non-IID data that trace is mostly
  between-client heterogeneity, not sampling noise; the clients' own
  within-round noise adds ``(N - 1)/N`` of its mean to the trace and
  ``1/N`` of it to ``|H|^2`` (``docs/method.md`` (d)).

  Args:
    mean_client_sq: ``mean_k |h_k|^2``, any shape.
    mean_sq: ``|mean_k h_k|^2``, same shape.
    num_reporting: ``K'`` clients averaged, broadcastable.
    num_clients: population ``N``, broadcastable.

  Returns:
    ``(g_sq, trace)``, float32; both 0 where ``K' < 2`` or ``N < 2``.

  >>> g, t = cohort_estimates(5.0, 2.0, 4, 4)   # the whole population
  >>> float(g), float(t)
  (2.0, 3.0)
  """
  k = jnp.asarray(num_reporting, jnp.float32)
  g_sq, trace, ok = fpc_estimates(mean_client_sq, 1.0, mean_sq,
                                  fpc_coefficient(k, num_clients))
  ok = ok & (k >= 2)
  return jnp.where(ok, g_sq, 0.0), jnp.where(ok, trace, 0.0)


def effective_critical_batch(b_simple, n):
  """The critical batch of a client of ``n`` rows: ``(1/B' + 1/n)^-1``.

  Steps to a given loss are ``S = S_min (1 + B c_eff(b, n))`` (McCandlish
  et al. 2018 with the finite-population coefficient); ``S = 2 S_min``
  where ``B (n - b) / (b (n - 1)) = 1``, i.e. at

    b_crit = (1 / B' + 1 / n)^-1,   B' = B n / (n - 1),

  ``B'`` being the noise scale with the sample (``1/(n - 1)``) covariance.
  It is below ``n`` and tends to ``B`` as ``n`` grows (``n = inf``: ``B``);
  1 for ``n = 1`` (``B > 0``), 0 for ``B = 0``. Derivation:
  ``docs/method.md`` (b).

  Args:
    b_simple: ``B = tr(Sigma) / |G|^2`` (population covariance), any shape.
    n: rows held, broadcastable; ``inf`` allowed.

  Returns:
    float32 array of the broadcast shape.

  >>> b = effective_critical_batch(jnp.array([0.0, 9.0, 1e9]), 10)
  >>> [round(float(x), 4) for x in b]     # B = 9, n = 10: B' = 10
  [0.0, 5.0, 10.0]
  """
  b = jnp.maximum(jnp.asarray(b_simple, jnp.float32), 0.0)
  n = jnp.asarray(n, jnp.float32)
  # 1 / b_crit = (n - 1) / (B n) + 1 / n = (1 - 1/n) / B + 1 / n
  inv_n = 1.0 / jnp.maximum(n, 1.0)
  inv = (1.0 - inv_n) / jnp.where(b > 0, b, 1.0) + inv_n
  return jnp.where(b > 0, 1.0 / inv, 0.0).astype(jnp.float32)


class EmaState(NamedTuple):
  """Bias-corrected exponential moving averages of per-client signals."""
  value: jax.Array   # float32 [N, ...], uncorrected EMA
  weight: jax.Array  # float32 [N], 1 - decay ** (updates seen)


def ema_init(shape) -> EmaState:
  """An empty EMA for ``shape = (N, ...)`` signals."""
  shape = tuple(shape) if not isinstance(shape, int) else (shape,)
  return EmaState(jnp.zeros(shape, jnp.float32),
                  jnp.zeros(shape[:1], jnp.float32))


def ema_update(state: EmaState, index, sample, mask, decay) -> EmaState:
  """Folds ``sample[k]`` into entry ``index[k]`` where ``mask[k]``.

  Args:
    state: the EMA.
    index: int32 ``[K]`` entries to update (distinct).
    sample: ``[K, ...]`` new observations.
    mask: bool ``[K]``; entries with ``False`` keep their value.
    decay: EMA decay in ``[0, 1)``, a scalar or ``[K]`` (per entry).

  Returns:
    The new :class:`EmaState`.
  """
  old_v = state.value[index]
  old_w = state.weight[index]
  m = mask.reshape(mask.shape + (1,) * (old_v.ndim - 1))
  decay = jnp.asarray(decay, jnp.float32)
  dv = decay.reshape(decay.shape + (1,) * (old_v.ndim - decay.ndim))
  new_v = jnp.where(m, dv * old_v + (1.0 - dv) * sample, old_v)
  new_w = jnp.where(mask, decay * old_w + (1.0 - decay), old_w)
  return EmaState(state.value.at[index].set(new_v),
                  state.weight.at[index].set(new_w))


def ema_value(state: EmaState) -> jax.Array:
  """Bias-corrected value (exact for a constant signal); 0 where unseen."""
  w = state.weight.reshape(state.weight.shape + (1,) *
                           (state.value.ndim - 1))
  return jnp.where(w > 0, state.value / jnp.where(w > 0, w, 1.0), 0.0)


def simple_noise_scale(g_sq, trace, floor=1e-12):
  """``B_simple = tr(Sigma) / |G|^2``, clipped to be non-negative."""
  return jnp.maximum(trace, 0.0) / jnp.maximum(g_sq, floor)
