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
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.core import registry as reg
from fedjax_bsa.core.types import ClientResources

__all__ = ["MAX_COUNT", "TIME_RTOL", "RoundOutcome", "apply_round_policy",
           "client_time", "comm_time", "deadline_drop", "deadline_partial",
           "fits_within", "local_time", "max_batch_within", "model_bytes",
           "round_outcome", "sample_available", "steps_within", "wait_all"]

ArrayLike = jax.typing.ArrayLike

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


def round_outcome(res: ClientResources, batch_size: ArrayLike,
                  steps: ArrayLike, available: ArrayLike,
                  model_bytes: ArrayLike, deadline: Optional[ArrayLike],
                  keep: Optional[Callable] = None) -> RoundOutcome:
  """Who is aggregated, with how many steps, and the round's length, once
  a policy has said (``keep``) what a client over the deadline keeps.

  A client is active when available with ``steps > 0``; inactive clients
  never participate, are not dropped and do not count towards the round
  time. Without ``keep`` nobody is over (``deadline`` is ignored, may be
  None) and the round lasts as long as its slowest participant (0 if
  none). With ``keep``, an active client is over when ``~fits_within(res,
  batch_size, steps, deadline, model_bytes)`` (so exactly when
  :func:`steps_within` ``< steps``), keeps ``keep(steps, over, deadline)``
  steps and is dropped if that is 0; the round lasts ``deadline`` if anyone
  was over, else its slowest participant, never longer than the deadline.

  Args:
    res: cohort resources, fields [K].
    batch_size, steps: examples per step, planned local steps (scalar or
      [K]).
    available: bool scalar or [K], e.g. from :func:`sample_available`.
    model_bytes: bytes sent each way, scalar.
    deadline: seconds, float or traced scalar (needed with ``keep``).
    keep: ``(steps int32 [K], over bool [K], deadline float32 []) -> int
      [K]``, the steps each client keeps (``steps`` where not over).

  Raises:
    ValueError: ``keep`` without a deadline.
  """
  if keep is not None and deadline is None:
    raise ValueError("deadline=None is invalid for a round policy that cuts "
                     "at the deadline; allowed: a float or scalar array of "
                     "seconds.")
  shape = jnp.broadcast_shapes(jnp.shape(res.speed), jnp.shape(batch_size),
                               jnp.shape(steps))
  steps = jnp.broadcast_to(jnp.asarray(steps, jnp.int32), shape)
  available = jnp.broadcast_to(jnp.asarray(available, jnp.bool_), shape)
  planned = jnp.broadcast_to(client_time(res, batch_size, steps, model_bytes),
                             shape)
  active = available & (steps > 0)
  if keep is None:
    over = jnp.zeros(steps.shape, jnp.bool_)
    kept, deadline = steps, jnp.float32(0.0)  # deadline unused: none is over
  else:
    deadline = jnp.asarray(deadline, jnp.float32)
    over = active & ~fits_within(res, batch_size, steps, deadline,
                                 model_bytes)
    kept = keep(steps, over, deadline)
  participated = active & (kept > 0)
  dropped = over & ~participated
  slowest = jnp.max(jnp.where(participated, planned, 0.0), initial=0.0)
  if keep is not None:  # within fits_within's slack of the deadline
    slowest = jnp.minimum(slowest, deadline)
  round_time = jnp.where(jnp.any(over), deadline, slowest)
  return RoundOutcome(
      steps=jnp.where(participated, kept, 0).astype(jnp.int32),
      participated=participated, dropped=dropped,
      round_time=round_time.astype(jnp.float32), client_time=planned)


# The policies: factories ``(cfg, hparams) -> policy(res, batch_size, steps,
# available, model_bytes, deadline) -> RoundOutcome``, registered by name.


@reg.ROUND_POLICIES.register("wait_all")
def wait_all(cfg, hparams):
  """Every available client with ``steps > 0`` participates with its
  planned steps; the round lasts as long as its slowest participant (0 if
  none). The deadline is ignored (may be None)."""
  del cfg, hparams
  return lambda res, batch_size, steps, available, model_bytes, deadline: (
      round_outcome(res, batch_size, steps, available, model_bytes, None))


@reg.ROUND_POLICIES.register("deadline_drop", needs_deadline=True)
def deadline_drop(cfg, hparams):
  """FedAvg with a deadline: clients over it are dropped; the round lasts
  the deadline if anyone was dropped, else its slowest participant."""
  del cfg, hparams
  drop = lambda steps, over, deadline: jnp.where(over, 0, steps)
  return lambda res, batch_size, steps, available, model_bytes, deadline: (
      round_outcome(res, batch_size, steps, available, model_bytes, deadline,
                    drop))


@reg.ROUND_POLICIES.register("deadline_partial", needs_deadline=True)
def deadline_partial(cfg, hparams):
  """FedProx-style partial work: a client over the deadline keeps
  ``steps_within(res, batch_size, deadline, model_bytes)`` steps and is
  dropped if that is 0; the round lasts the deadline if anyone was cut, else
  its slowest participant."""
  del cfg, hparams

  def policy(res, batch_size, steps, available, model_bytes, deadline):
    def keep(steps, over, deadline):
      partial = jnp.minimum(
          steps_within(res, batch_size, deadline, model_bytes), steps)
      return jnp.where(over, partial, steps)
    return round_outcome(res, batch_size, steps, available, model_bytes,
                         deadline, keep)
  return policy


def apply_round_policy(policy: str, res: ClientResources,
                       batch_size: ArrayLike, steps: ArrayLike,
                       available: ArrayLike, model_bytes: ArrayLike,
                       deadline: Optional[ArrayLike]) -> RoundOutcome:
  """The outcome (:func:`round_outcome`) of a round under the registered
  round policy named ``policy`` (static), built with no config or settings
  (the built-in ones read neither); ``deadline`` None: no deadline. An
  unknown name raises a ``ValueError`` naming ``round_policy`` and the
  registered policies.

  Example:
    >>> from fedjax_bsa.setup.resources import make_resources
    >>> res = make_resources("uniform", 3, 0, base_speed=100.0,
    ...                      step_overhead=0.0, bandwidth=1e9)
    >>> out = apply_round_policy("deadline_drop", res, 100, jnp.array([1, 2,
    ...                          5]), True, model_bytes=0, deadline=3.0)
    >>> out.steps.tolist(), out.dropped.tolist(), out.round_time.tolist()
    ([1, 2, 0], [False, False, True], 3.0)
  """
  make = reg.ROUND_POLICIES.get(policy)
  return make(None, None)(res, batch_size, steps, available, model_bytes,
                          deadline)


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
