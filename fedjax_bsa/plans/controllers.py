"""Batch-size controllers: optax-style pure ``init`` / ``update`` pairs.

A controller is a :class:`Controller` of two pure functions,

* ``init(num_clients) -> state``, a ``NamedTuple`` of arrays;
* ``update(feedback, state, context) -> (plan, state)``: ``feedback`` is the
  previous round's :class:`Feedback` (the cohort that ran and its
  :class:`~fedjax_bsa.kernel.ClientStats`), ``context`` the coming round's
  :class:`Context`; the result is the coming cohort's
  :class:`Plan`.

They never call ``jit``; they are jittable and vmappable over experiments
(hyperparameters may be traced scalars). :func:`clamp` wraps any controller
and bounds its plan by each client's memory and time budget.

This module holds the contract, the plan helpers and the controllers; the
per-client noise state behind :func:`noise_scale` (:class:`NoiseState`,
:func:`noise_state_init`, :func:`noise_state_update`,
:func:`client_noise_scales`, :func:`adascale_gain`) is in
:mod:`fedjax_bsa.plans.noise_state` and re-exported here.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_bsa.core import registry
from fedjax_bsa.core.types import ClientResources
from fedjax_bsa.core.types import ClientStats
from fedjax_bsa.core.types import Context
from fedjax_bsa.core.types import Controller
from fedjax_bsa.core.types import EmptyState
from fedjax_bsa.core.types import Feedback
from fedjax_bsa.core.types import Plan
from fedjax_bsa.plans import clock
from fedjax_bsa.plans import pieces
from fedjax_bsa.plans.noise_state import adascale_gain
from fedjax_bsa.plans.noise_state import client_noise_scales
from fedjax_bsa.plans.noise_state import noise_state_init
from fedjax_bsa.plans.noise_state import noise_state_update
from fedjax_bsa.plans.noise_state import NoiseState
from fedjax_bsa.plans.pieces import quantize

__all__ = ["Plan", "Context", "Feedback", "Controller", "EmptyState",
           "NoiseState",
           "constant", "random", "schedule", "resource_proportional",
           "noise_scale", "clamp", "adascale_gain", "quantize",
           "empty_feedback",
           "noise_state_init", "noise_state_update", "client_noise_scales"]


def empty_feedback(cohort_size: int) -> Feedback:
  """Feedback before the first round: nobody ran."""
  z = jnp.zeros((cohort_size,), jnp.float32)
  zi = jnp.zeros((cohort_size,), jnp.int32)
  return Feedback(zi, ClientStats(z, zi, zi, z, z, zi, z),
                  jnp.float32(0.0))


def _full(ctx: Context, value, dtype):
  return jnp.full(ctx.cohort.shape, value, dtype)


def constant(batch_size, local_steps: int, client_lr) -> Controller:
  """Every client: the same batch, steps and learning rate, every round."""

  def update(feedback, state, ctx):
    del feedback
    plan = Plan(_full(ctx, batch_size, jnp.int32),
                _full(ctx, local_steps, jnp.int32),
                _full(ctx, client_lr, jnp.float32))
    return plan, state

  return Controller(lambda num_clients: EmptyState(), update)


def random(batch_min: int, batch_max: int, local_steps: int,
           client_lr) -> Controller:
  """Each cohort client draws its batch uniformly in ``[batch_min, batch_max]``
  every round (it exists to exercise the kernel)."""

  def update(feedback, state, ctx):
    del feedback
    b = jax.random.randint(ctx.key, ctx.cohort.shape, batch_min, batch_max + 1)
    plan = Plan(b.astype(jnp.int32), _full(ctx, local_steps, jnp.int32),
                _full(ctx, client_lr, jnp.float32))
    return plan, state

  return Controller(lambda num_clients: EmptyState(), update)


def schedule(rule: Callable, batch_size, batch_max, every: int,
             total_rounds: int, local_steps: int, client_lr,
             scale_lr: bool = False) -> Controller:
  """A batch size that grows with the round, the same for every client.

  Args:
    rule: ``rule(b_0, batch_max, every, total_rounds) -> (r -> batch)``,
      or the name of a registered one (:data:`~fedjax_bsa.core.registry.
      SCHEDULES`: ``step``, ``linear``, ``doubling``, or one a user
      registers).
    batch_size: initial batch.
    batch_max: largest batch.
    every: rounds between changes.
    total_rounds: length of the run (for ``linear``).
    local_steps: local steps per round.
    client_lr: learning rate at ``batch_size``.
    scale_lr: scale the learning rate linearly with the batch (AdaBatch
      does; off by default, as local SGD diverges with large rates).
  """
  if isinstance(rule, str):
    rule = registry.SCHEDULES.get(rule)

  def batch_at(r):
    b0 = jnp.asarray(batch_size, jnp.float32)
    b = rule(b0, batch_max, every, total_rounds)(r.astype(jnp.float32))
    return jnp.minimum(jnp.round(b), batch_max).astype(jnp.int32)

  def update(feedback, state, ctx):
    del feedback
    b = batch_at(ctx.round)
    lr = client_lr * (b / batch_size if scale_lr else 1.0)
    plan = Plan(_full(ctx, b, jnp.int32), _full(ctx, local_steps, jnp.int32),
                _full(ctx, lr, jnp.float32))
    return plan, state

  return Controller(lambda num_clients: EmptyState(), update)


def resource_proportional(batch_size, reference_speed, local_steps: int,
                          client_lr) -> Controller:
  """Batch proportional to device speed (Ma et al., IEEE TMC 2021).

  A client of speed ``reference_speed`` gets ``batch_size``; others scale
  with their speed, so all spend about the same compute time per step.
  """

  def update(feedback, state, ctx):
    del feedback
    b = jnp.maximum(jnp.round(batch_size * ctx.speed / reference_speed), 1)
    plan = Plan(b.astype(jnp.int32), _full(ctx, local_steps, jnp.int32),
                _full(ctx, client_lr, jnp.float32))
    return plan, state

  return Controller(lambda num_clients: EmptyState(), update)


def noise_scale(batch_size, batch_min, batch_max, kappa, local_steps: int,
                client_lr, ema_decay, microbatch: int,
                use_gain: bool = True, max_gain=4.0) -> Controller:
  """Ours (v1): batch from each client's own critical batch.

  ``b_k = clip(kappa * b_crit_k, batch_min, batch_max)`` quantized to the
  kernel's microbatch and at least two microbatches (so every step yields a
  noise estimate; memory caps and the time budget come from
  :func:`clamp`), with
  ``b_crit_k = effective_critical_batch(B_k, n_k)`` (the critical batch of
  a client of ``n_k`` rows,
  :func:`fedjax_bsa.kernel.noise.effective_critical_batch`; ``B_k`` itself when
  the context has no ``num_examples``). The learning rate is ``client_lr *
  min(r_k, max_gain)`` with the AdaScale gain ``r_k`` of ``b_k`` over
  ``batch_size`` (:func:`adascale_gain`); steps are ``local_steps`` (a
  time budget cuts them later, once). ``B_k`` comes from :func:`client_noise_scales`; before any
  estimate exists the batch is ``batch_size`` and the gain 1.

  Args:
    batch_size: reference batch ``b_0`` (the learning rate is tuned for it).
    batch_min: smallest batch (raised to two microbatches).
    batch_max: largest batch.
    kappa: target batch in units of the critical batch.
    local_steps: local steps.
    client_lr: learning rate at ``b_0``.
    ema_decay: EMA decay of the per-client estimates.
    microbatch: the kernel's ``mu``.
    use_gain: scale the learning rate by the AdaScale gain.
    max_gain: cap on the gain: local SGD with many steps tolerates less than
      the single-step analysis of AdaScale assumes.
  """
  low = max(int(batch_min), 2 * int(microbatch))
  return pieces.chain(
      pieces.noise_estimate(ema_decay),
      pieces.critical_batch_target(kappa, batch_size),
      pieces.round_batch(low, batch_max, microbatch),
      pieces.adascale_rate(client_lr, batch_size, max_gain, use_gain),
      pieces.fixed_steps(local_steps))


def clamp(inner: Controller, *, microbatch: int | None = None,
          time_budget=0.0) -> Controller:
  """Bounds any controller's batches by each client's memory and, with a
  time budget, by the largest batch one step of which fits it
  (:func:`fedjax_bsa.plans.clock.batch_within_compute`).

  The batch is the one decision made here; the steps that fit the budget
  are set once, after the local-work rule, by
  :func:`fedjax_bsa.plans.round_plan.plan_round`.

  Args:
    inner: the controller to bound.
    microbatch: if given, batches are also quantized to multiples of it.
    time_budget: local compute seconds per round (0: none).
  """

  def update(feedback, state, ctx):
    plan, state = inner.update(feedback, state, ctx)
    cap = ctx.memory_cap.astype(jnp.int32)
    cap = jnp.minimum(cap, clock.batch_within_compute(_compute(ctx),
                                                      time_budget))
    b = jnp.minimum(plan.batch_size, cap)
    if microbatch is not None:
      b = quantize(b, microbatch, cap)
    b = jnp.maximum(b, 1).astype(jnp.int32)
    return plan._replace(batch_size=b), state

  return Controller(inner.init, update)


def _compute(ctx: Context):
  """The compute side of a cohort's resources, from its context (the clock's
  functions read ``speed`` and ``step_overhead``; links are unused)."""
  ones = jnp.ones(ctx.cohort.shape, jnp.float32)
  return ClientResources(ctx.speed, ctx.step_overhead, ctx.memory_cap, ones,
                         ones, 0.0 * ones, ones, 0 * ctx.cohort)
