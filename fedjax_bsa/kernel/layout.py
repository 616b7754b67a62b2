"""Where each client job runs: lanes, slots and the order of jobs on a lane.

The round kernel (:mod:`fedjax_bsa.kernel`) runs every client job of a round
(of one experiment, or of several experiments packed together) as a
sequence of *slots* of ``mu`` examples: job ``j`` with batch ``b_j`` and
``s_j`` steps needs ``s_j * ceil(b_j / mu)`` slots. Jobs are packed one
after another onto ``L`` lanes, longest first onto the least-loaded lane
(LPT, Graham 1969); the lanes advance in lock step for as many slots as the
fullest lane needs. This module computes that layout on device, with static
shapes (``[J]`` jobs, ``[L]`` lanes).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fedjax_bsa.core.config import resolve_microbatch  # re-exported

__all__ = ["Layout", "pack_lanes", "make_layout", "slots_per_step",
           "resolve_microbatch", "Choice", "choose", "candidates"]


class Layout(NamedTuple):
  """The placement of ``J`` jobs on ``L`` lanes."""
  order: jax.Array   # int32 [J], jobs sorted by (lane, start); idle jobs last
  count: jax.Array   # int32 [L], jobs on each lane
  begin: jax.Array   # int32 [L], first entry of each lane in ``order``
  load: jax.Array    # int32 [L], slots on each lane
  lane_of: jax.Array  # int32 [J], lane of each job (L: none)


def slots_per_step(batch, microbatch: int, per_slot: int = 1):
  """``ceil(ceil(b / mu) / R)``: slots of one local step of batch ``b``
  with ``R`` microbatches of ``mu`` examples per slot."""
  return ((batch + microbatch - 1) // microbatch + per_slot - 1) // per_slot


def pack_lanes(slots: jax.Array, lanes: int):
  """Longest-processing-time-first packing of jobs onto lanes.

  Args:
    slots: int32 ``[J]`` slots each job needs (0: not packed).
    lanes: number of lanes ``L``.

  Returns:
    ``(lane, start, load)``: int32 ``[J]`` lane of each job (``L`` for
    jobs with no slots), its first slot on that lane, and int32 ``[L]``
    slots per lane. With ``L >= J`` (accelerators) job ``j`` simply runs on
    lane ``j``; otherwise the greedy placement is a ``lax.scan`` over the
    jobs (sequential, ~0.2 us per job on a CPU).

  >>> lane, start, load = pack_lanes(jnp.array([5, 0, 9, 3]), 2)
  >>> lane.tolist(), start.tolist(), load.tolist()
  ([1, 2, 0, 1], [0, 8, 0, 5], [9, 8])
  """
  order = jnp.argsort(-slots, stable=True)
  if lanes >= slots.shape[0]:  # one job per lane: nothing to pack
    lane = jnp.arange(slots.shape[0], dtype=jnp.int32)
    load = jnp.zeros((lanes,), jnp.int32).at[lane].set(slots)
    return (jnp.where(slots > 0, lane, lanes), jnp.zeros_like(slots),
            load)

  def place(load, j):
    lane = jnp.argmin(load).astype(jnp.int32)
    start = load[lane]
    return load.at[lane].add(slots[j]), (lane, start)

  load, (lane_o, start_o) = jax.lax.scan(
      place, jnp.zeros((lanes,), jnp.int32), order)
  lane = jnp.zeros_like(slots).at[order].set(lane_o)
  start = jnp.zeros_like(slots).at[order].set(start_o)
  return jnp.where(slots > 0, lane, lanes), start, load


def make_layout(slots: jax.Array, lanes: int) -> Layout:
  """The :class:`Layout` of jobs needing ``slots`` on ``lanes`` lanes."""
  lane_of, start, load = pack_lanes(slots.astype(jnp.int32), lanes)
  order = jnp.lexsort((start, lane_of)).astype(jnp.int32)
  count = jnp.bincount(lane_of, length=lanes + 1)[:lanes].astype(jnp.int32)
  begin = (jnp.cumsum(count) - count).astype(jnp.int32)
  return Layout(order, count, begin, load, lane_of)


class Choice(NamedTuple):
  """Lanes and microbatches per slot for a backend (see :func:`choose`)."""
  lanes: int
  per_slot: int


#: Per-backend constants of the cost model of :func:`choose`: the largest
#: lane pool worth running, and whether lanes are packed (several jobs a
#: lane) or one job a lane.
_BACKENDS = {"cpu": dict(max_lanes=16, packed=True),
             "gpu": dict(max_lanes=4096, packed=False),
             "tpu": dict(max_lanes=4096, packed=False)}


def choose(backend: str, jobs: int, microbatch: int, batch: int) -> Choice:
  """The lane pool and slot width for ``jobs`` client jobs per round.

  Cost model. One loop iteration costs ``t_fix + L R mu f / P(L R mu)``:
  a fixed cost ``t_fix`` (loop control, gathers, the select over the lane
  state, the client transformation's update; tens of microseconds on any
  backend) plus the compute of ``L`` lanes of ``R`` microbatches of ``mu``
  examples at ``f`` FLOPs each, at a rate ``P`` that grows with the rows
  computed at once until the backend is saturated. A round takes ``max(W /
  (L R), S / R)`` iterations for ``W`` microbatches in all and ``S`` on the
  longest job.

  * Every backend: slots as wide as a step at the reference batch (``R =
    ceil(batch / mu)``, at most 16), so that a step is one iteration and
    ``t_fix`` is paid once a step (measured on the 2-core CPU, 64 clients
    of batch 10 with noise statistics: ``mu = 5, R = 2`` 164 ms a round
    against 252 ms for ``mu = 4, R = 1``; ``benchmarks/results``).
  * A **CPU** (two to a few dozen cores) saturates at a few hundred rows of
    a small model: beyond ~16 lanes the iteration's compute grows as fast
    as the iterations fall, and per-lane state falls out of cache
    (measured: 8-16 lanes fastest on the 2-core machine); so about four
    jobs per lane, at most 16 lanes.
  * A **GPU/TPU** saturates only at thousands of rows, and ``t_fix`` (a
    few kernel launches) dominates narrow iterations: so one job per lane
    (up to 4096 lanes, every experiment's jobs in one pool).

  Settings ``lanes`` and ``per_slot`` override the choice; results never
  depend on it (only the padding efficiency and the speed do).

  >>> choose("cpu", 10, 4, 8), choose("gpu", 100, 4, 32)
  (Choice(lanes=3, per_slot=2), Choice(lanes=100, per_slot=8))
  """
  consts = _BACKENDS.get(backend, _BACKENDS["gpu"])
  per_slot = max(1, min(-(-int(batch) // int(microbatch)), 16))
  if consts["packed"]:
    return Choice(max(1, min(-(-jobs // 4), consts["max_lanes"])), per_slot)
  return Choice(max(1, min(jobs, consts["max_lanes"])), per_slot)


def candidates(backend: str, jobs: int, batch: int, noise_stats: bool, *,
               lanes: int = 0, microbatch: int = 0,
               per_slot: int = 0) -> list[tuple[int, int, int]]:
  """The layouts ``(L, mu, R)`` a run times before it starts
  (:mod:`fedjax_bsa.run.autotune`); a setting above 0 is kept as given.

  * ``mu``: with noise statistics the rule's (half the reference batch):
    the microbatches are the estimator's samples, so another ``mu`` would
    change the estimates a controller plans from, not only the speed;
    without, the batch and half of it.
  * ``R``: a step at ``b_0`` per slot (``ceil(b_0 / mu)``, at most 16).
  * ``L``: on a CPU the rule of :func:`choose` (about four jobs a lane)
    and four times as many lanes, up to one job a lane; on an
    accelerator one job a lane.

  >>> candidates("cpu", 64, 10, True)
  [(16, 5, 2), (64, 5, 2)]
  >>> candidates("cpu", 64, 10, False, lanes=8)
  [(8, 10, 1), (8, 5, 2)]
  >>> candidates("gpu", 100, 1, True)
  [(100, 1, 1)]
  """
  b = max(int(batch), 1)
  if microbatch:
    mus = [int(microbatch)]
  elif noise_stats:
    mus = [-(-b // 2)]
  else:
    mus = [b] + ([-(-b // 2)] if b >= 2 else [])
  rule = choose(backend, jobs, mus[0], b).lanes
  if lanes:
    pool = [int(lanes)]
  elif _BACKENDS.get(backend, _BACKENDS["gpu"])["packed"]:
    pool = sorted({rule, max(1, min(int(jobs), 4 * rule))})
  else:
    pool = [rule]
  out = []
  for L in pool:
    for mu in dict.fromkeys(mus):
      R = int(per_slot) or max(1, min(-(-b // mu), 16))
      out.append((L, mu, R))
  return out
