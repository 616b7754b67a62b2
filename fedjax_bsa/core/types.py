"""The types shared by the layers: what the kernel, the plans and the run
loop pass each other (all ``NamedTuple`` pytrees of arrays).

* :class:`Jobs`, :class:`ClientStats`: a round's client jobs and what each
  reported (:mod:`fedjax_bsa.kernel`);
* :class:`Plan`, :class:`Context`, :class:`Feedback`, :class:`Controller`,
  :class:`EmptyState`: the controller contract
  (:mod:`fedjax_bsa.plans.controllers`);
* :class:`ClientResources`: each client's device and link
  (:mod:`fedjax_bsa.setup.resources` builds them).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

__all__ = ["Jobs", "ClientStats", "Plan", "Context", "Feedback",
           "Controller", "EmptyState", "ClientResources"]

Array = Any  # numpy.ndarray on the host, jax.Array once moved to a device.


class Jobs(NamedTuple):
  """The round's client jobs, of every experiment, flattened to ``[J]``."""
  client: jax.Array  # int32 [J], client index into the data
  exp: jax.Array     # int32 [J], experiment (index into server params)
  batch: jax.Array   # int32 [J], >= 1
  steps: jax.Array   # int32 [J], >= 0
  lr: jax.Array      # float32 [J]
  weight: jax.Array  # float32 [J], aggregation coefficient c_j
  seed: jax.Array    # uint32 [J, ...], the client's shuffle seed this round


class ClientStats(NamedTuple):
  """Per job statistics of one round (zeros for idle jobs)."""
  loss: jax.Array         # float32 [J], mean training loss over its examples
  examples: jax.Array     # int32 [J], examples processed (b_j * s_j)
  steps: jax.Array        # int32 [J], local steps taken
  grad_sq: jax.Array      # float32 [J], mean over noise steps of |G|^2 est.
  trace: jax.Array        # float32 [J], mean over noise steps of tr(Sigma)
  noise_steps: jax.Array  # int32 [J], steps that gave an estimate
  update_sq: jax.Array    # float32 [J], |mean applied gradient|^2 (NaN:
                          # the job's model went non-finite and was left
                          # out of the aggregate)


class Plan(NamedTuple):
  """What each cohort client does this round (a controller's output)."""
  batch_size: jax.Array  # int32 [K], >= 1
  steps: jax.Array       # int32 [K], >= 0 (0: the client does nothing)
  lr: jax.Array          # float32 [K]


class Context(NamedTuple):
  """What a controller knows about the coming round."""
  round: jax.Array       # int32 [], 0-based round index
  cohort: jax.Array      # int32 [K], client ids
  speed: jax.Array       # float32 [K], examples per simulated second
  step_overhead: jax.Array  # float32 [K], simulated seconds per step
  memory_cap: jax.Array  # int32 [K], largest batch each client can hold
  key: jax.Array         # PRNG key for this round's plan
  num_examples: jax.Array | None = None  # int32 [K], examples each holds
  comm: jax.Array | None = None  # float32 [K], seconds to send the model
                                 # down and back up


class Feedback(NamedTuple):
  """The last round's cohort and what its clients reported."""
  cohort: jax.Array                # int32 [K]
  stats: ClientStats    # per cohort client
  update_sum_sq: jax.Array | float = 0.0  # |sum_k h_k|^2 over the clients
                                          # that ran (h_k: mean applied
                                          # gradient)


class Controller(NamedTuple):
  init: Callable[[int], Any]
  update: Callable[[Feedback, Any, Context], tuple[Plan, Any]]


class EmptyState(NamedTuple):
  """State of stateless controllers."""


class ClientResources(NamedTuple):
  """System resources of ``N`` clients (a pytree of ``[N]`` arrays).

  Attributes:
    speed: float32 [N], examples per simulated second of compute.
    step_overhead: float32 [N], fixed seconds per local step.
    memory_cap: int32 [N], largest batch (examples) the client can hold.
    bandwidth_up: float32 [N], upload bytes per second.
    bandwidth_down: float32 [N], download bytes per second.
    latency: float32 [N], seconds per transfer (added once each way).
    availability: float32 [N], probability of being available in a round,
      in (0, 1].
    tier: int32 [N], device-class index (0 for profiles without tiers).
  """
  speed: Array
  step_overhead: Array
  memory_cap: Array
  bandwidth_up: Array
  bandwidth_down: Array
  latency: Array
  availability: Array
  tier: Array
