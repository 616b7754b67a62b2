"""Controller pieces, chained like optax transforms.

A :class:`Piece` is a pure ``init`` / ``update`` pair, as a controller is,
but it refines a :class:`Draft` of the coming cohort's plan instead of
making one: one piece folds the last round's noise estimates into its
state, another turns them into a batch target, another rounds the target
to the kernel's microbatch within each client's caps, another sets the
learning rate, another the local steps (which the local-work rule and
the time budget may cut later, once, in :func:`fedjax_bsa.plans.round_plan.
plan_round`). :func:`chain` runs pieces in order
and is a :class:`~fedjax_bsa.plans.controllers.Controller` (its state is
the tuple of the pieces' states), so ``noise_scale`` and ``goodput`` are
five-line compositions::

  chain(noise_estimate(ema_decay),            # B_k from the EMAs
        critical_batch_target(kappa, b0),     # or goodput's time-optimal
        round_batch(low, batch_max, mu),      # clip, quantize, caps
        adascale_rate(client_lr, b0, max_gain),
        fixed_steps(local_steps))

and v3 (:func:`~fedjax_bsa.plans.displacement.displacement`) is the noise
estimate followed by its own budget piece. Every piece is jittable and
``vmap``-able over experiments (its settings may be traced scalars).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa.core.types import Context
from fedjax_bsa.core.types import Controller
from fedjax_bsa.core.types import EmptyState
from fedjax_bsa.core.types import Feedback
from fedjax_bsa.core.types import Plan
from fedjax_bsa.kernel import noise
from fedjax_bsa.plans.noise_state import adascale_gain
from fedjax_bsa.plans.noise_state import client_noise_scales
from fedjax_bsa.plans.noise_state import noise_state_init
from fedjax_bsa.plans.noise_state import noise_state_update

__all__ = ["Draft", "Piece", "chain", "stateless", "noise_estimate",
           "critical_batch_target", "round_batch", "adascale_rate",
           "fixed_steps", "quantize",
           "rows"]


class Draft(NamedTuple):
  """The coming cohort's plan as the pieces refine it (``[K]`` arrays)."""
  batch: jax.Array      # a float32 target, int32 once rounded
  lr: jax.Array         # float32, the client learning rate
  steps: jax.Array      # int32, local steps
  b_simple: jax.Array   # float32, each client's noise scale B_k
  estimated: jax.Array  # bool, B_k rests on an estimate
  noise: Any = None     # the NoiseState behind them (noise_estimate's)


class Piece(NamedTuple):
  """``init(num_clients) -> state``; ``update(draft, state, feedback,
  context) -> (draft, state)``."""
  init: Callable[[int], Any]
  update: Callable[[Draft, Any, Feedback, Context], tuple[Draft, Any]]


def stateless(update) -> Piece:
  """A piece without state from ``update(draft, context) -> draft``."""
  return Piece(lambda num_clients: EmptyState(),
               lambda d, s, fb, ctx: (update(d, ctx), s))


def chain(*pieces: Piece) -> Controller:
  """A controller that runs ``pieces`` in order on an empty draft (batch
  and rate 0, steps 0, no estimate) and plans the final draft."""

  def init(num_clients: int):
    return tuple(p.init(num_clients) for p in pieces)

  def update(feedback: Feedback, state, ctx: Context):
    shape = ctx.cohort.shape
    zero = jnp.zeros(shape, jnp.float32)
    d = Draft(zero, zero, jnp.zeros(shape, jnp.int32), zero,
              jnp.zeros(shape, bool))
    new = []
    for p, s in zip(pieces, state):
      d, s = p.update(d, s, feedback, ctx)
      new.append(s)
    return Plan(d.batch, d.steps, d.lr), tuple(new)

  return Controller(init, update)


# ------------------------------------------------------------ helpers ---


def rows(ctx: Context):
  """Rows each cohort client holds, ``inf`` where the context has none."""
  if ctx.num_examples is None:
    return jnp.full(ctx.cohort.shape, jnp.inf, jnp.float32)
  return ctx.num_examples.astype(jnp.float32)


def quantize(batch, microbatch: int, cap):
  """Rounds ``batch`` to a multiple of ``microbatch`` not above ``cap``.

  The nearest multiple is taken, then lowered to fit ``cap``; when ``cap``
  is below one microbatch the batch is ``cap`` itself.
  """
  mu = microbatch
  q = jnp.maximum(jnp.round(batch / mu), 1).astype(jnp.int32) * mu
  q = jnp.minimum(q, (cap // mu) * mu)
  return jnp.where(cap < mu, cap, jnp.maximum(q, mu)).astype(jnp.int32)


# ------------------------------------------------------------- pieces ---


def noise_estimate(ema_decay) -> Piece:
  """Folds the last round's per-client noise estimates into EMAs
  (:func:`~fedjax_bsa.plans.noise_state.noise_state_update`) and sets each
  cohort client's ``B_k`` (its own, or the cohort's for a client not yet
  seen: :func:`~fedjax_bsa.plans.noise_state.client_noise_scales`)."""

  def update(d: Draft, state, feedback, ctx):
    state = noise_state_update(state, feedback, ctx, ema_decay)
    b_simple, estimated = client_noise_scales(state, ctx.cohort)
    return d._replace(b_simple=b_simple, estimated=estimated,
                      noise=state), state

  return Piece(noise_state_init, update)


def critical_batch_target(kappa, batch_size) -> Piece:
  """Batch target ``kappa`` times each client's critical batch
  (:func:`~fedjax_bsa.kernel.noise.effective_critical_batch`, finite
  client), ``batch_size`` before any estimate (``noise_scale``, v1)."""

  def update(d: Draft, ctx):
    crit = noise.effective_critical_batch(d.b_simple, rows(ctx))
    return d._replace(batch=jnp.where(d.estimated, kappa * crit, batch_size))

  return stateless(update)


def round_batch(low: int, batch_max, microbatch: int,
                client_caps: bool = False) -> Piece:
  """Clips the target to ``[low, cap]`` and rounds it to the kernel's
  microbatch (:func:`quantize`). ``cap`` is ``batch_max``, or with
  ``client_caps`` ``min(batch_max, memory_cap_k, max(n_k, low))`` (a batch
  above a client's rows never helps, ``docs/method.md`` (c); a client
  smaller than ``low`` still gets ``low``)."""

  def update(d: Draft, ctx):
    if client_caps:
      rows_cap = jnp.maximum(ctx.num_examples.astype(jnp.int32), low)
      cap = jnp.minimum(jnp.minimum(jnp.asarray(batch_max, jnp.int32),
                                    ctx.memory_cap.astype(jnp.int32)),
                        rows_cap)
      target = jnp.clip(d.batch, low, cap.astype(jnp.float32))
    else:
      cap = jnp.asarray(batch_max, jnp.int32)
      target = jnp.clip(d.batch, low, batch_max)
    return d._replace(batch=quantize(target, microbatch, cap))

  return stateless(update)


def adascale_rate(client_lr, batch_size, max_gain, use_gain=True) -> Piece:
  """Learning rate ``client_lr * min(r_k, max_gain)``, ``r_k`` the
  finite-client AdaScale gain of the drafted batch over ``batch_size``
  (:func:`~fedjax_bsa.plans.noise_state.adascale_gain`); gain 1 before any
  estimate or without ``use_gain``."""

  def update(d: Draft, ctx):
    gain = adascale_gain(d.b_simple, d.batch, batch_size, rows(ctx))
    gain = jnp.where(d.estimated & use_gain, jnp.minimum(gain, max_gain),
                     1.0)
    return d._replace(lr=(client_lr * gain).astype(jnp.float32))

  return stateless(update)


def fixed_steps(local_steps: int) -> Piece:
  """``local_steps`` local steps for every client (a local-work rule may
  set them afterwards, outside the controller)."""
  return stateless(lambda d, ctx: d._replace(
      steps=jnp.full(ctx.cohort.shape, local_steps, jnp.int32)))
