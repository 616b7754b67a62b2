"""The :class:`ClientResources` pytree, the range checks of its settings.

Host-side numpy. :func:`fedjax_bsa.setup.resources.make_resources` builds a
population from a profile; this module holds what every profile shares: the
pytree itself, the check every setting passes (an error names the setting,
its value and the allowed range), the broadcast of per-profile values to
``[N]`` arrays of the documented dtypes, and :func:`describe`. Everything
here is re-exported by :mod:`fedjax_bsa.setup.resources`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fedjax_bsa.core.types import ClientResources

__all__ = ["ClientResources", "describe"]

Array = Any  # numpy.ndarray on the host, jax.Array once moved to a device.

INT32_MAX = np.iinfo(np.int32).max


# ----------------------------------------------------------------- checks ---

# rule -> (predicate on a finite float, allowed range in words)
_RULES = {
    "positive": (lambda v: v > 0, "finite and > 0"),
    "nonneg": (lambda v: v >= 0, "finite and >= 0"),
    "probability": (lambda v: 0.0 < v <= 1.0, "(0, 1]"),
    "count": (lambda v: v.is_integer() and 1 <= v <= INT32_MAX,
              f"integer in [1, {INT32_MAX}]"),
}


def checked(name: str, x: Any, rule: str) -> Any:
  """Returns ``x`` as float (int for "count") or raises a ValueError."""
  ok_fn, allowed = _RULES[rule]
  try:
    v = float(x)
    ok = (not isinstance(x, (bool, str)) and math.isfinite(v) and ok_fn(v)
          and (rule != "count" or isinstance(x, (int, np.integer))))
  except (TypeError, ValueError):
    ok = False
  if not ok:
    raise ValueError(f"{name}={x!r} is invalid; allowed range: {allowed}.")
  return int(v) if rule == "count" else v


# ---------------------------------------------------------------- assembly ---

def assemble(n: int, speed, step_overhead, memory_cap, bw_up, bw_down,
              latency, availability, tier) -> ClientResources:
  """Broadcasts every field to ``[n]`` with the documented dtypes."""
  f32 = lambda v: np.broadcast_to(np.asarray(v, np.float32), (n,)).copy()
  i32 = lambda v: np.broadcast_to(np.asarray(v, np.int32), (n,)).copy()
  return ClientResources(
      speed=f32(speed), step_overhead=f32(step_overhead),
      memory_cap=i32(memory_cap), bandwidth_up=f32(bw_up),
      bandwidth_down=f32(bw_down), latency=f32(latency),
      availability=f32(availability), tier=i32(tier))


def describe(res: ClientResources) -> dict:
  """Small human-readable summary of a population.

  Args:
    res: resources with ``[N]`` fields (numpy or jax arrays).

  Returns:
    Dict of Python scalars: ``num_clients``; ``speed``, ``memory_cap``,
    ``bandwidth_up`` and ``bandwidth_down`` as ``{"min", "median", "max"}``;
    ``availability_mean``; ``tier_counts`` as ``{tier_index: count}``.
  """
  def stats(x):
    x = np.asarray(x)
    return {"min": float(x.min()), "median": float(np.median(x)),
            "max": float(x.max())}
  tiers, counts = np.unique(np.asarray(res.tier), return_counts=True)
  return {
      "num_clients": int(np.asarray(res.speed).shape[0]),
      "speed": stats(res.speed),
      "memory_cap": stats(res.memory_cap),
      "bandwidth_up": stats(res.bandwidth_up),
      "bandwidth_down": stats(res.bandwidth_down),
      "availability_mean": float(np.mean(np.asarray(res.availability))),
      "tier_counts": {int(t): int(c) for t, c in zip(tiers, counts)},
  }
