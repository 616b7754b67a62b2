"""Round policies: who is aggregated, with how many steps, and how long
the round lasts, once each client's plan and the round's deadline are
known. Each policy is registered in
:data:`~fedjax_bsa.core.registry.ROUND_POLICIES` where it is defined; all
are built on :func:`round_outcome` and the clock's one "fits the budget"
test (:func:`fedjax_bsa.plans.clock.fits_within`).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from fedjax_bsa.core import registry as reg
from fedjax_bsa.core.types import ClientResources
from fedjax_bsa.plans.clock import client_time
from fedjax_bsa.plans.clock import fits_within
from fedjax_bsa.plans.clock import steps_within

__all__ = ["RoundOutcome", "round_outcome", "wait_all", "deadline_drop",
           "deadline_partial", "apply_round_policy"]

ArrayLike = jax.typing.ArrayLike


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
