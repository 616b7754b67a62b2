"""Gradient-noise statistics (McCandlish et al. 2018, appendix A.1).

With ``E|G_B|^2 = |G|^2 + tr(Sigma) / B`` for the mean gradient ``G_B`` of
``B`` examples, the norms of gradients at two batch sizes give unbiased
estimates of the true squared gradient norm and of the trace of the
per-example covariance:

  |G|^2     ~ (B_big |G_big|^2 - B_small |G_small|^2) / (B_big - B_small)
  tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / B_small - 1 / B_big)

Inside the round kernel ``G_small`` are a step's microbatch gradients (their
mean squared norm, with ``B_small`` the harmonic mean of their sizes, so that
a short last microbatch keeps the estimate unbiased) and ``G_big`` is the
step's full-batch gradient. The simple noise scale is
``B_simple = tr(Sigma) / |G|^2``; numerator and denominator are smoothed with
separate, bias-corrected EMAs and the ratio is taken after.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["two_batch_estimates", "EmaState", "ema_init", "ema_update",
           "ema_value", "noise_scale"]


def two_batch_estimates(small_sq, b_small, big_sq, b_big):
  """Unbiased ``(|G|^2, tr(Sigma))`` from squared norms at two batch sizes.

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


def noise_scale(g_sq, trace, floor=1e-12):
  """``B_simple = tr(Sigma) / |G|^2``, clipped to be non-negative."""
  return jnp.maximum(trace, 0.0) / jnp.maximum(g_sq, floor)
