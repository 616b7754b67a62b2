"""The simulated clock: how long a round takes under each round policy.

Pure ``jax.numpy`` functions over a cohort's :class:`ClientResources` (every
field ``[K]``, gathered with ``jax.tree.map(lambda a: a[ids], res)``). They
are jittable and vmappable (e.g. over a batch of deadlines); the caller owns
the ``jit`` boundary. Simulated seconds are float32 and unrelated to the
host's wall clock.

Time model for ``s`` local steps of batch ``b`` on client ``k``::

  local_k = s * (step_overhead_k + b / speed_k)
  comm_k  = model_bytes / bandwidth_down_k + model_bytes / bandwidth_up_k
            + 2 * latency_k
  client_time_k = local_k + comm_k
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.core.types import ClientResources

__all__ = ["MAX_COUNT", "POLICIES", "TIME_RTOL", "RoundOutcome",
           "apply_round_policy", "client_time", "comm_time", "fits_within",
           "local_time", "max_batch_within", "model_bytes",
           "sample_available", "steps_within"]

ArrayLike = jax.typing.ArrayLike

POLICIES = ("wait_all", "deadline_drop", "deadline_partial")

# Largest count steps_within / max_batch_within report (2**24 - 1: every
# integer up to it is exact in float32, so the search below stays exact).
MAX_COUNT = 2**24 - 1
_SEARCH_BITS = 24
# Relative slack of every "fits the budget" test (see fits_within).
TIME_RTOL = 2.0**-20


class RoundOutcome(NamedTuple):
  """What one round's policy decided for a cohort of ``K`` clients.

  Attributes:
    steps: int32 [K], local steps kept for aggregation (0 if not aggregated).
    participated: bool [K], the client's update is aggregated.
    dropped: bool [K], the client was selected and available but dropped
      (missed the deadline with no usable work).
    round_time: float32 [], simulated seconds of this round.
    client_time: float32 [K], each client's own time as planned (before the
      policy), for all clients including unavailable ones.
  """
  steps: jax.Array
  participated: jax.Array
  dropped: jax.Array
  round_time: jax.Array
  client_time: jax.Array


def local_time(res: ClientResources, batch_size: ArrayLike,
               steps: ArrayLike) -> jax.Array:
  """Compute time of ``steps`` local steps with batch ``batch_size``.

  Args:
    res: cohort resources, fields [K].
    batch_size: examples per step, scalar or [K].
    steps: local steps, scalar or [K].

  Returns:
    float32 [K], ``steps * (step_overhead + batch_size / speed)`` seconds.

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 2, 0, base_speed=100.0,
    ...                      step_overhead=0.5)
    >>> local_time(res, 50, jnp.array([1, 4])).tolist()
    [1.0, 4.0]
  """
  b = jnp.asarray(batch_size, jnp.float32)
  s = jnp.asarray(steps, jnp.float32)
  return s * (jnp.asarray(res.step_overhead, jnp.float32)
              + b / jnp.asarray(res.speed, jnp.float32))


def comm_time(res: ClientResources, model_bytes: ArrayLike) -> jax.Array:
  """Download plus upload time of a model of ``model_bytes`` bytes.

  Args:
    res: cohort resources, fields [K].
    model_bytes: bytes sent each way, scalar.

  Returns:
    float32 [K], ``model_bytes / bandwidth_down + model_bytes / bandwidth_up
    + 2 * latency`` seconds.
  """
  m = jnp.asarray(model_bytes, jnp.float32)
  return (m / jnp.asarray(res.bandwidth_down, jnp.float32)
          + m / jnp.asarray(res.bandwidth_up, jnp.float32)
          + 2.0 * jnp.asarray(res.latency, jnp.float32))


def client_time(res: ClientResources, batch_size: ArrayLike,
                steps: ArrayLike, model_bytes: ArrayLike) -> jax.Array:
  """A client's whole round: local compute plus communication.

  Args:
    res: cohort resources, fields [K].
    batch_size: examples per step, scalar or [K].
    steps: local steps, scalar or [K].
    model_bytes: bytes sent each way, scalar.

  Returns:
    float32 [K], ``local_time + comm_time`` seconds.
  """
  return local_time(res, batch_size, steps) + comm_time(res, model_bytes)


def fits_within(res: ClientResources, batch_size: ArrayLike,
                steps: ArrayLike, time_budget: ArrayLike,
                model_bytes: ArrayLike) -> jax.Array:
  """Whether a plan fits a time budget: ``client_time <= time_budget``.

  The comparison allows a slack of ``TIME_RTOL * (|time_budget| + comm)``
  (about 8 float32 ulps): XLA may round the same expression differently
  under ``jit``/``vmap`` than eagerly (it contracts multiply-adds and hoists
  reciprocals of broadcast divisors), and without the slack an exact tie,
  common with round configuration numbers (e.g. 200 steps of 0.05 s against
  a 10 s deadline), could fall either way. Every budget decision in this
  module (:func:`steps_within`, :func:`max_batch_within`, the deadline
  policies) uses this one test.

  Args:
    res: cohort resources, fields [K].
    batch_size: examples per step, scalar or [K].
    steps: local steps, scalar or [K].
    time_budget: seconds, scalar or [K].
    model_bytes: bytes sent each way, scalar.

  Returns:
    bool [K].
  """
  budget = jnp.asarray(time_budget, jnp.float32)
  comm = comm_time(res, model_bytes)
  slack = TIME_RTOL * (jnp.abs(budget) + comm)
  return local_time(res, batch_size, steps) <= (budget - comm) + slack


def _largest_count(fits, shape) -> jax.Array:
  """Largest ``c`` in [0, MAX_COUNT] with ``fits(c)``, elementwise.

  ``fits`` must be monotone (true at ``c`` implies true below ``c``). A
  fixed-length binary search on the bits of ``c``: exact and branch-free; it
  evaluates the time model itself, so rounding in a closed-form division can
  never put the answer off by one. Returns 0 where nothing fits.
  """
  count = jnp.zeros(shape, jnp.int32)
  for bit in reversed(range(_SEARCH_BITS)):
    candidate = count + (1 << bit)
    count = jnp.where(fits(candidate), candidate, count)
  return count


def steps_within(res: ClientResources, batch_size: ArrayLike,
                 time_budget: ArrayLike, model_bytes: ArrayLike) -> jax.Array:
  """The most local steps whose client time fits in ``time_budget``.

  Args:
    res: cohort resources, fields [K].
    batch_size: examples per step, scalar or [K].
    time_budget: seconds, scalar or [K].
    model_bytes: bytes sent each way, scalar.

  Returns:
    int32 [K], the largest ``s`` in [0, MAX_COUNT] with
    ``client_time(res, batch_size, s, model_bytes) <= time_budget``, as
    decided by :func:`fits_within`; 0 also where not even the communication
    fits; MAX_COUNT where steps cost nothing.

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 1, 0, base_speed=100.0,
    ...                      step_overhead=0.5, bandwidth=1e3)
    >>> steps_within(res, 50, 10.0, model_bytes=1000).tolist()  # (10-2)/1
    [8]
  """
  budget = jnp.asarray(time_budget, jnp.float32)
  shape = jnp.broadcast_shapes(jnp.shape(res.speed), jnp.shape(batch_size),
                               jnp.shape(budget))
  return _largest_count(
      lambda s: fits_within(res, batch_size, s, budget, model_bytes), shape)


def max_batch_within(res: ClientResources, steps: ArrayLike,
                     time_budget: ArrayLike, model_bytes: ArrayLike, *,
                     cap_to_memory: bool = False) -> jax.Array:
  """The largest batch such that ``steps`` steps fit in ``time_budget``.

  Gives a controller ``b_max_k`` from the round deadline.

  Args:
    res: cohort resources, fields [K].
    steps: local steps, scalar or [K].
    time_budget: seconds, scalar or [K].
    model_bytes: bytes sent each way, scalar.
    cap_to_memory: static; also cap the result at ``res.memory_cap``.

  Returns:
    int32 [K], the largest ``b`` in [0, MAX_COUNT] with
    ``client_time(res, b, steps, model_bytes) <= time_budget`` (decided by
    :func:`fits_within`; 0 also where
    even ``b = 0`` misses the budget; MAX_COUNT where ``steps == 0`` and the
    communication fits), then ``min(b, memory_cap)`` if ``cap_to_memory``.

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 1, 0, base_speed=100.0,
    ...                      step_overhead=0.5, bandwidth=1e3)
    >>> max_batch_within(res, 4, 10.0, model_bytes=1000).tolist()  # 8/4=2 s
    [150]
  """
  budget = jnp.asarray(time_budget, jnp.float32)
  shape = jnp.broadcast_shapes(jnp.shape(res.speed), jnp.shape(steps),
                               jnp.shape(budget))
  b = _largest_count(
      lambda b: fits_within(res, b, steps, budget, model_bytes), shape)
  if cap_to_memory:
    b = jnp.minimum(b, jnp.asarray(res.memory_cap, jnp.int32))
  return b


def _over_and_kept(policy: str, res: ClientResources, batch_size: ArrayLike,
                   steps: jax.Array, active: jax.Array,
                   model_bytes: ArrayLike, deadline: Optional[ArrayLike]):
  """``(over [K], kept [K], deadline [])`` of :func:`apply_round_policy`.

  ``over``: active clients that miss the deadline (none for ``wait_all``);
  ``kept``: the steps each client keeps under the policy, before dropping
  inactive ones; ``deadline``: float32 (0, unused, for ``wait_all``).
  """
  if policy == "wait_all":
    over = jnp.zeros(steps.shape, jnp.bool_)
    return over, steps, jnp.float32(0.0)  # deadline unused: none is over.
  deadline = jnp.asarray(deadline, jnp.float32)
  # Same test as steps_within: over <=> steps_within(...) < steps.
  over = active & ~fits_within(res, batch_size, steps, deadline, model_bytes)
  if policy == "deadline_drop":
    return over, jnp.where(over, 0, steps), deadline
  # deadline_partial
  partial = jnp.minimum(
      steps_within(res, batch_size, deadline, model_bytes), steps)
  return over, jnp.where(over, partial, steps), deadline


def apply_round_policy(policy: str, res: ClientResources,
                       batch_size: ArrayLike, steps: ArrayLike,
                       available: ArrayLike, model_bytes: ArrayLike,
                       deadline: Optional[ArrayLike]) -> RoundOutcome:
  """Decides who is aggregated, with how many steps, and the round's length.

  Policies (``policy`` is static):
    * ``"wait_all"``: every available client with ``steps > 0``
      participates with its planned steps; the round lasts as long as its
      slowest participant (0 if none). ``deadline`` is ignored (may be None).
    * ``"deadline_drop"`` (FedAvg with a deadline): clients whose
      ``client_time > deadline`` are dropped; the round lasts ``deadline`` if
      anyone was dropped, else its slowest participant.
    * ``"deadline_partial"`` (FedProx-style partial work): a client over the
      deadline keeps ``steps_within(res, batch_size, deadline, model_bytes)``
      steps and is dropped if that is 0; the round lasts ``deadline`` if
      anyone was cut, else its slowest participant.
  Unavailable clients never participate, are not counted as dropped and do
  not count towards the round time; nor do clients planned with 0 steps.
  "Over the deadline" is ``~fits_within(...)``, the test that
  :func:`steps_within` uses, so a client is over exactly when
  ``steps_within(res, batch_size, deadline, model_bytes) < steps``; a round
  under a deadline policy never lasts longer than the deadline.

  Args:
    policy: one of :data:`POLICIES`.
    res: cohort resources, fields [K].
    batch_size: examples per step, scalar or [K].
    steps: planned local steps, int scalar or [K].
    available: bool scalar or [K], e.g. from :func:`sample_available`.
    model_bytes: bytes sent each way, scalar.
    deadline: seconds, float or traced scalar.

  Returns:
    A :class:`RoundOutcome`.

  Raises:
    ValueError: unknown policy, or no deadline for a deadline policy.

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 3, 0, base_speed=100.0,
    ...                      step_overhead=0.0, bandwidth=1e9)
    >>> out = apply_round_policy("deadline_drop", res, 100, jnp.array([1, 2,
    ...                          5]), True, model_bytes=0, deadline=3.0)
    >>> out.steps.tolist(), out.dropped.tolist(), out.round_time.tolist()
    ([1, 2, 0], [False, False, True], 3.0)
  """
  if policy not in POLICIES:
    raise ValueError(f"unknown round policy {policy!r}; allowed: {POLICIES}.")
  if policy != "wait_all" and deadline is None:
    raise ValueError(f"deadline=None is invalid for policy={policy!r}; "
                     "allowed: a float or scalar array of seconds.")
  shape = jnp.broadcast_shapes(jnp.shape(res.speed), jnp.shape(batch_size),
                               jnp.shape(steps))
  steps = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), shape)
  available = jnp.broadcast_to(jnp.asarray(available, jnp.bool_), shape)
  planned = jnp.broadcast_to(client_time(res, batch_size, steps, model_bytes),
                             shape)
  active = available & (steps > 0)
  over, kept, deadline = _over_and_kept(policy, res, batch_size, steps,
                                        active, model_bytes, deadline)
  participated = active & (kept > 0)
  dropped = over & ~participated
  slowest = jnp.max(jnp.where(participated, planned, 0.0), initial=0.0)
  if policy != "wait_all":  # within fits_within's slack of the deadline
    slowest = jnp.minimum(slowest, deadline)
  round_time = jnp.where(jnp.any(over), deadline, slowest)
  return RoundOutcome(
      steps=jnp.where(participated, kept, 0).astype(jnp.int32),
      participated=participated, dropped=dropped,
      round_time=round_time.astype(jnp.float32), client_time=planned)


def model_bytes(params: Any) -> int:
  """Bytes to send a model once: parameter count times bytes per parameter.

  Host-side. Each leaf counts ``size * dtype.itemsize`` bytes (4 per float32
  parameter); leaves without a dtype (Python numbers) count 4 bytes each.

  Args:
    params: a pytree of arrays (or ``jax.ShapeDtypeStruct``s).

  Returns:
    Python int.

  Example:
    >>> model_bytes({"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)})
    64
  """
  total = 0
  for leaf in jax.tree.leaves(params):
    shape = getattr(leaf, "shape", np.shape(leaf))
    dtype = getattr(leaf, "dtype", None)
    itemsize = np.dtype(dtype).itemsize if dtype is not None else 4
    total += math.prod(shape) * itemsize
  return int(total)


def sample_available(key: jax.Array, availability: ArrayLike) -> jax.Array:
  """Draws who is available this round.

  Args:
    key: PRNG key.
    availability: float [K], per-client probability in (0, 1].

  Returns:
    bool [K], independent Bernoulli(availability) draws.
  """
  return jax.random.bernoulli(key, jnp.asarray(availability, jnp.float32))
