"""The simulated clock: how long a client's work and transfers take, and
what fits a time budget (every such decision goes through
:func:`fits_within`). The round policies built on it are in
:mod:`fedjax_bsa.plans.policies`.

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
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.core.types import ClientResources

__all__ = ["MAX_COUNT", "TIME_RTOL", "batch_within_compute", "client_time",
           "comm_time", "fits_within", "local_time", "max_batch_within",
           "model_bytes", "sample_available", "steps_within",
           "steps_within_compute"]

ArrayLike = jax.typing.ArrayLike

# Largest count steps_within / max_batch_within report (2**24 - 1: every
# integer up to it is exact in float32, so the search below stays exact).
MAX_COUNT = 2**24 - 1
_SEARCH_BITS = 24
# Relative slack of every "fits the budget" test (see fits_within).
TIME_RTOL = 2.0**-20


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


def _compute_only(res: ClientResources) -> ClientResources:
  """``res`` with no latency: with ``model_bytes=0`` its communication
  costs nothing, so :func:`fits_within` judges compute alone."""
  return res._replace(latency=jnp.zeros_like(
      jnp.asarray(res.latency, jnp.float32)))


def batch_within_compute(res: ClientResources,
                         time_budget: ArrayLike) -> jax.Array:
  """The largest batch one step of which fits ``time_budget`` seconds of
  compute (at least 1); :data:`MAX_COUNT` where the budget is 0 (none).

  >>> from fedjax_bsa.setup.resources import make_resources
  >>> res = make_resources("uniform", 1, 0, base_speed=100.0,
  ...                      step_overhead=0.5)
  >>> batch_within_compute(res, 2.0).tolist()    # (2 - 0.5) * 100
  [150]
  """
  budget = jnp.asarray(time_budget, jnp.float32)
  b = max_batch_within(_compute_only(res), 1, budget, 0)
  return jnp.where(budget > 0, jnp.maximum(b, 1), MAX_COUNT).astype(
      jnp.int32)


def steps_within_compute(res: ClientResources, batch_size: ArrayLike,
                         time_budget: ArrayLike,
                         max_steps: ArrayLike) -> jax.Array:
  """The local steps of ``batch_size`` that fit ``time_budget`` seconds of
  compute, in ``[1, max_steps]`` (0 where ``max_steps`` is 0);
  ``max_steps`` where the budget is 0 (none).

  >>> from fedjax_bsa.setup.resources import make_resources
  >>> res = make_resources("uniform", 1, 0, base_speed=100.0,
  ...                      step_overhead=0.5)
  >>> steps_within_compute(res, 50, 3.0, 10).tolist()   # 3 / (0.5 + 0.5)
  [3]
  """
  budget = jnp.asarray(time_budget, jnp.float32)
  fit = steps_within(_compute_only(res), batch_size, budget, 0)
  cut = jnp.clip(fit, 1, max_steps)
  return jnp.where(budget > 0, cut, max_steps).astype(jnp.int32)


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
