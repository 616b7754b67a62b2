"""Per-client system resources (compute, memory, network, availability).

Host-side numpy code that builds a :class:`ClientResources` pytree for a
population of ``N`` clients from a resource profile. Every function returns
numpy arrays; the caller moves them to the device (e.g.
``jax.device_put(res)``) and gathers a cohort with
``jax.tree.map(lambda a: a[ids], res)``. The simulated clock in
:mod:`fedjax_bsa.plans.clock` consumes these arrays.

The built-in profiles register themselves here in
:data:`~fedjax_bsa.core.registry.RESOURCE_PROFILES`, each a function
``(cfg, num_clients)`` that reads its settings from ``cfg`` by the names of
:class:`ResourceSettings`: ``uniform`` (:func:`uniform`: every client
alike), ``lognormal`` (:func:`lognormal`: lognormal speeds, links and
memory), ``tiers`` (:func:`from_tiers`: device classes from a tier table,
registered with ``tier_table``, the :data:`DEFAULT_TIERS` a config gets)
and ``trace`` (:func:`from_trace`: a FedScale device trace, registered with
``reads_file``). :func:`make_resources` builds a population from a profile's
name and the settings as arguments.

This module holds the profiles and :func:`make_resources`; the pytree, its
range checks and :func:`describe` are in
:mod:`fedjax_bsa.setup.client_resources`, the published tier table and its
measurements in :mod:`fedjax_bsa.setup.device_tiers`, and :func:`load_trace` in
:mod:`fedjax_bsa.setup.fedscale_trace`. All are re-exported here.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

from fedjax_bsa.core import registry as reg
from fedjax_bsa.setup.client_resources import assemble
from fedjax_bsa.setup.client_resources import checked
from fedjax_bsa.setup.client_resources import ClientResources
from fedjax_bsa.setup.client_resources import describe
from fedjax_bsa.setup.client_resources import INT32_MAX
from fedjax_bsa.setup.device_tiers import DEFAULT_TIERS
from fedjax_bsa.setup.device_tiers import FEMNIST_CNN_PARAMS
from fedjax_bsa.setup.device_tiers import FLASH_CLASS_WEIGHTS
from fedjax_bsa.setup.device_tiers import FLASH_FEMNIST_BATCH
from fedjax_bsa.setup.device_tiers import FLASH_FEMNIST_MS_PER_BATCH
from fedjax_bsa.setup.device_tiers import FLASH_MEDIAN_DOWN_KBPS
from fedjax_bsa.setup.device_tiers import FLASH_MEDIAN_UP_KBPS
from fedjax_bsa.setup.fedscale_trace import load_trace

__all__ = ["ClientResources", "DEFAULT_TIERS", "FEMNIST_CNN_PARAMS",
           "FLASH_CLASS_WEIGHTS", "FLASH_FEMNIST_BATCH",
           "FLASH_FEMNIST_MS_PER_BATCH", "FLASH_MEDIAN_DOWN_KBPS",
           "FLASH_MEDIAN_UP_KBPS", "ResourceSettings", "describe",
           "from_tiers", "from_trace", "load_trace", "lognormal",
           "make_resources", "profile_settings", "uniform"]

# ------------------------------------------------------------ tier tables ---

_TIER_KEYS = {"share": "positive", "speed": "positive",
              "memory_cap": "count", "bandwidth": "positive",
              "bandwidth_up": "positive", "bandwidth_down": "positive",
              "step_overhead": "nonneg", "overhead_scale": "nonneg",
              "latency": "nonneg", "availability": "probability"}
_TIER_REQUIRED = ("name", "share", "speed", "memory_cap", "bandwidth")
_TIER_TEXT_KEYS = ("name", "device")  # free text, not validated
_TIER_OPTIONAL = tuple(k for k in (*_TIER_TEXT_KEYS, *_TIER_KEYS)
                       if k not in _TIER_REQUIRED)


def _validate_tiers(tiers: Sequence[Mapping[str, Any]]) -> list:
  """Checks a tier table; returns a list of dicts of validated values."""
  if isinstance(tiers, (Mapping, str)) or not isinstance(tiers, Sequence) \
      or not tiers:
    raise ValueError(f"tiers={tiers!r} is invalid; allowed: a non-empty "
                     "sequence of dicts with keys " + ", ".join(_TIER_REQUIRED))
  out = []
  for i, t in enumerate(tiers):
    if not isinstance(t, Mapping):
      raise ValueError(f"tiers[{i}]={t!r} is invalid; allowed: a dict.")
    missing = [k for k in _TIER_REQUIRED if k not in t]
    unknown = [k for k in t if k not in _TIER_TEXT_KEYS and k not in _TIER_KEYS]
    if missing or unknown:
      raise ValueError(f"tiers[{i}]={dict(t)!r} is invalid: missing keys "
                       f"{missing}, unknown keys {unknown}; allowed keys: "
                       f"{list(_TIER_REQUIRED)} (required), then "
                       f"{list(_TIER_OPTIONAL)}.")
    if "step_overhead" in t and "overhead_scale" in t:
      raise ValueError(f"tiers[{i}] sets both step_overhead="
                       f"{t['step_overhead']!r} (seconds) and overhead_scale="
                       f"{t['overhead_scale']!r} (multiplier of the "
                       "step_overhead argument); allowed: at most one.")
    out.append({"name": str(t["name"]), **{
        k: checked(f"tiers[{i}][{k!r}]", t[k], rule)
        for k, rule in _TIER_KEYS.items() if k in t}})
  return out


def _tier_counts(shares: np.ndarray, n: int) -> np.ndarray:
  """Largest-remainder rounding of ``shares * n`` to integers summing to n."""
  exact = shares / shares.sum() * n
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[: n - counts.sum()]] += 1
  return counts


# --------------------------------------------------------------- profiles ---

class ResourceSettings(NamedTuple):
  """What a resource profile reads, by the names of the
  :class:`~fedjax_bsa.core.config.Config` settings (a config has no
  ``latency`` or ``tiers``: they take these defaults). :func:`make_resources`
  gives a profile its arguments as one of these; the simulator gives it the
  config, its ``seed`` raised by 1."""
  seed: Any = 0
  base_speed: float = 1000.0
  speed_sigma: float = 0.5
  step_overhead: float = 0.01
  memory_cap: int = 256
  memory_sigma: float = 0.0
  bandwidth: float = 1e6
  availability: float = 1.0
  latency: float = 0.0
  tiers: Optional[Sequence[Mapping[str, Any]]] = None
  trace_path: Optional[str] = None


_CHECKS = (("base_speed", "positive"), ("speed_sigma", "nonneg"),
           ("step_overhead", "nonneg"), ("memory_cap", "count"),
           ("memory_sigma", "nonneg"), ("bandwidth", "positive"),
           ("availability", "probability"), ("latency", "nonneg"))


def profile_settings(cfg, num_clients: int, *, tiers: bool = False,
                     trace: bool = False) -> tuple[int, ResourceSettings]:
  """``(N, the checked settings)`` of a profile given ``cfg`` (a config or
  a :class:`ResourceSettings`): each error names the setting, its value and
  the allowed range. ``tiers``, ``trace``: whether the profile reads a tier
  table, a trace file (the others refuse them; ``trace_path=""``, a
  config's unset value, is no trace)."""
  get = lambda name: getattr(cfg, name, ResourceSettings._field_defaults[name])
  n = checked("num_clients", num_clients, "count")
  values = {name: checked(name, get(name), rule) for name, rule in _CHECKS}
  table, path = get("tiers"), get("trace_path") or None
  if table is not None and not tiers:
    raise ValueError(f"tiers={table!r} is only allowed with profile='tiers'.")
  if path is not None and not trace:
    raise ValueError(f"trace_path={path!r} is only allowed with "
                     "profile='trace'.")
  return n, ResourceSettings(seed=get("seed"), tiers=table, trace_path=path,
                             **values)


@reg.RESOURCE_PROFILES.register("uniform")
def uniform(cfg, num_clients: int) -> ClientResources:
  """Every client has ``speed=base_speed``, ``memory_cap``, ``bandwidth``
  (up and down), ``step_overhead``, ``latency`` and ``availability``."""
  n, s = profile_settings(cfg, num_clients)
  return assemble(n, s.base_speed, s.step_overhead, s.memory_cap,
                  s.bandwidth, s.bandwidth, s.latency, s.availability, 0)


@reg.RESOURCE_PROFILES.register("lognormal")
def lognormal(cfg, num_clients: int) -> ClientResources:
  """``speed = base_speed * exp(N(0, speed_sigma))``; the link gets an
  independent factor ``exp(N(0, speed_sigma))`` (same factor for up and
  down): ``bandwidth_{up,down} = bandwidth * factor``; ``memory_cap =
  max(1, round(memory_cap * exp(N(0, memory_sigma))))`` (constant when
  ``memory_sigma == 0``). Seeded by ``seed``."""
  n, s = profile_settings(cfg, num_clients)
  rng = np.random.default_rng(s.seed)
  z_speed, z_bw, z_mem = rng.standard_normal((3, n))
  speed = s.base_speed * np.exp(s.speed_sigma * z_speed)
  bw = s.bandwidth * np.exp(s.speed_sigma * z_bw)
  mem = np.full(n, s.memory_cap, np.int64)
  if s.memory_sigma > 0:
    mem = np.rint(s.memory_cap * np.exp(s.memory_sigma * z_mem))
    mem = np.clip(mem, 1, INT32_MAX).astype(np.int64)
  return assemble(n, speed, s.step_overhead, mem, bw, bw, s.latency,
                  s.availability, 0)


@reg.RESOURCE_PROFILES.register("tiers", tier_table=DEFAULT_TIERS)
def from_tiers(cfg, num_clients: int) -> ClientResources:
  """Device classes from ``tiers`` (default :data:`DEFAULT_TIERS`, from
  published measurements: docs/devices.md). Each tier dict has ``name``,
  ``share`` (normalized over tiers), ``speed`` (multiplier of
  ``base_speed``), ``memory_cap`` (examples), ``bandwidth`` (bytes/s, both
  ways) and optionally: ``bandwidth_up`` / ``bandwidth_down`` (bytes/s,
  override ``bandwidth`` one way); ``overhead_scale`` (the tier's step
  overhead is ``overhead_scale * step_overhead``) or ``step_overhead``
  (absolute seconds, overriding the setting), not both; ``latency`` and
  ``availability`` overriding the settings; ``device`` (free text). Tier
  sizes are ``share * num_clients`` rounded by largest remainder (so they
  sum to ``num_clients``), and clients are assigned to tiers by a permutation
  seeded by ``seed``. Clients within a tier are identical; ``tier`` holds the
  tier index."""
  n, s = profile_settings(cfg, num_clients, tiers=True)
  table = _validate_tiers(DEFAULT_TIERS if s.tiers is None else s.tiers)
  counts = _tier_counts(np.array([t["share"] for t in table]), n)
  rng = np.random.default_rng(s.seed)
  tier = rng.permutation(np.repeat(np.arange(len(table)), counts))
  per_client = lambda values: np.array(values, np.float64)[tier]
  col = lambda key, default: per_client([t.get(key, default) for t in table])
  overhead = per_client([
      t["step_overhead"] if "step_overhead" in t
      else s.step_overhead * t.get("overhead_scale", 1.0) for t in table])
  bw_up = per_client([t.get("bandwidth_up", t["bandwidth"]) for t in table])
  bw_down = per_client([t.get("bandwidth_down", t["bandwidth"])
                        for t in table])
  return assemble(n, s.base_speed * col("speed", None), overhead,
                  col("memory_cap", None), bw_up, bw_down,
                  col("latency", s.latency),
                  col("availability", s.availability), tier)


@reg.RESOURCE_PROFILES.register("trace", reads_file=True)
def from_trace(cfg, num_clients: int) -> ClientResources:
  """A FedScale device trace in ``trace_path`` (see :func:`load_trace`):
  ``speed = 1000 / computation`` (ms/sample -> examples/s) and
  ``bandwidth_{up,down} = communication * 1000 / 8`` (kbps -> bytes/s).
  Rows are sorted by client id and client ``i`` gets row ``i % R`` (cyclic
  reuse when ``num_clients > R``). A per-client ``availability`` in the file
  wins over the setting. Memory cap, step overhead and latency come from
  the settings."""
  n, s = profile_settings(cfg, num_clients, trace=True)
  if s.trace_path is None:
    raise ValueError("trace_path=None is invalid for profile='trace'; "
                     "allowed: a path to a FedScale device trace file.")
  trace = load_trace(s.trace_path)
  rows = np.arange(n) % trace["client_id"].shape[0]
  speed = 1000.0 / trace["computation"][rows]
  bw = trace["communication"][rows] * 1000.0 / 8.0
  av = trace["availability"][rows]
  av = np.where(np.isnan(av), s.availability, av)
  return assemble(n, speed, s.step_overhead, s.memory_cap, bw, bw,
                  s.latency, av, 0)


def make_resources(profile: str, num_clients: int, seed: Any, *,
                   base_speed: float = 1000.0, speed_sigma: float = 0.5,
                   step_overhead: float = 0.01, memory_cap: int = 256,
                   memory_sigma: float = 0.0, bandwidth: float = 1e6,
                   availability: float = 1.0, latency: float = 0.0,
                   tiers: Optional[Sequence[Mapping[str, Any]]] = None,
                   trace_path: Optional[str] = None) -> ClientResources:
  """Builds the resources of ``num_clients`` clients with the registered
  profile named ``profile``, given these arguments (as a
  :class:`ResourceSettings`).

  The built-in profiles (``uniform``, ``lognormal``, ``tiers``, ``trace``)
  are :func:`uniform`, :func:`lognormal`, :func:`from_tiers` and
  :func:`from_trace`.

  Args:
    profile: a name in :data:`~fedjax_bsa.core.registry.RESOURCE_PROFILES`.
    num_clients: ``N >= 1``.
    seed: seed for ``np.random.default_rng`` (used by lognormal and tiers).
    base_speed: examples per second, > 0.
    speed_sigma: log-std of speed and bandwidth for lognormal, >= 0.
    step_overhead: seconds per local step, >= 0.
    memory_cap: largest batch in examples, >= 1.
    memory_sigma: log-std of memory cap for lognormal, >= 0.
    bandwidth: bytes per second (up and down), > 0.
    availability: per-round availability probability, in (0, 1].
    latency: seconds per transfer, >= 0 (an addition to the original spec;
      ``ClientResources.latency`` needs a source).
    tiers: tier table for ``"tiers"`` only (default :data:`DEFAULT_TIERS`).
    trace_path: trace file for ``"trace"`` only (``None`` or ``""``: none).

  Returns:
    A :class:`ClientResources` of numpy ``[N]`` arrays.

  Raises:
    ValueError: unknown profile (naming ``resources`` and the registered
      profiles), invalid argument (the message names the argument, its value
      and the allowed range), or bad trace file.

  Example:
    >>> res = make_resources("tiers", 10, seed=0)
    >>> res.speed.shape, res.speed.dtype, res.memory_cap.dtype
    ((10,), dtype('float32'), dtype('int32'))
    >>> sorted(describe(res)["tier_counts"].items())
    [(0, 5), (1, 5)]
    >>> res = make_resources("tiers", 3, seed=0, base_speed=100.0,
    ...                      step_overhead=0.5, tiers=[
    ...     {"name": "slow", "share": 1, "speed": 0.5, "overhead_scale": 2.0,
    ...      "memory_cap": 8, "bandwidth": 1e6, "bandwidth_up": 2e5}])
    >>> res.speed.tolist(), res.step_overhead.tolist(), res.bandwidth_up[0]
    ([50.0, 50.0, 50.0], [1.0, 1.0, 1.0], np.float32(200000.0))
  """
  given = ResourceSettings(seed, base_speed, speed_sigma, step_overhead,
                           memory_cap, memory_sigma, bandwidth, availability,
                           latency, tiers, trace_path)
  return reg.RESOURCE_PROFILES.get(profile)(given, num_clients)
