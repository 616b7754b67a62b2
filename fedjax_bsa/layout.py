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

__all__ = ["Layout", "pack_lanes", "make_layout", "slots_per_step"]


class Layout(NamedTuple):
  """The placement of ``J`` jobs on ``L`` lanes."""
  order: jax.Array   # int32 [J], jobs sorted by (lane, start); idle jobs last
  count: jax.Array   # int32 [L], jobs on each lane
  begin: jax.Array   # int32 [L], first entry of each lane in ``order``
  load: jax.Array    # int32 [L], slots on each lane
  lane_of: jax.Array  # int32 [J], lane of each job (L: none)


def slots_per_step(batch, microbatch: int):
  """``ceil(b / mu)``: slots of one local step of batch ``b``."""
  return (batch + microbatch - 1) // microbatch


def pack_lanes(slots: jax.Array, lanes: int):
  """Longest-processing-time-first packing of jobs onto lanes.

  Args:
    slots: int32 ``[J]`` slots each job needs (0: not packed).
    lanes: number of lanes ``L``.

  Returns:
    ``(lane, start, load)``: int32 ``[J]`` lane of each job (``L`` for
    jobs with no slots), its first slot on that lane, and int32 ``[L]``
    slots per lane.

  >>> lane, start, load = pack_lanes(jnp.array([5, 0, 9, 3]), 2)
  >>> lane.tolist(), start.tolist(), load.tolist()
  ([1, 2, 0, 1], [0, 0, 0, 5], [9, 8])
  """
  order = jnp.argsort(-slots, stable=True)

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
