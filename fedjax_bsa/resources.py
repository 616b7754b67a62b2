"""Per-client system resources (compute, memory, network, availability).

Host-side numpy code that builds a :class:`ClientResources` pytree for a
population of ``N`` clients from one of the profiles in :data:`PROFILES`.
Every function returns numpy arrays; the caller moves them to the device
(e.g. ``jax.device_put(res)``) and gathers a cohort with
``jax.tree.map(lambda a: a[ids], res)``. The simulated clock in
:mod:`fedjax_bsa.clock` consumes these arrays.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pickle
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import numpy as np

__all__ = ["ClientResources", "DEFAULT_TIERS", "FEMNIST_CNN_PARAMS",
           "FLASH_CLASS_WEIGHTS", "FLASH_FEMNIST_BATCH",
           "FLASH_FEMNIST_MS_PER_BATCH", "FLASH_MEDIAN_DOWN_KBPS",
           "FLASH_MEDIAN_UP_KBPS", "PROFILES", "describe", "load_trace",
           "make_resources"]

Array = Any  # numpy.ndarray on the host, jax.Array once moved to a device.

PROFILES = ("uniform", "lognormal", "tiers", "trace")

# Published per-device measurements behind DEFAULT_TIERS (docs/devices.md
# says where each number comes from and how it was converted).
#
# FLASH (Yang et al., "Characterizing Impacts of Heterogeneity in Federated
# Learning upon Large-Scale Smartphone Data", WWW 2021), as shipped in its
# simulator (PKU-Chengxu/FLASH, models/utils/device_util/device_util.py) and
# reused by FedBalancer's simulator (Shin et al., MobiSys 2022): mean training
# time of one batch of 10 examples of the LEAF FEMNIST CNN (conv 5x5x32,
# conv 5x5x64, dense 2048, 62 classes) on its three device classes, slowest
# first, in milliseconds.
FLASH_FEMNIST_BATCH = 10
FLASH_FEMNIST_MS_PER_BATCH = (1642.0, 588.0, 179.0)
# The weights FLASH's simulator draws a device class with for a phone it
# cannot map to a class (``Device_Util.unknown``), slowest class first.
FLASH_CLASS_WEIGHTS = (18820, 16428, 159)
# Medians over the 19 per-user network records FLASH ships
# (models/speed_distri.json, "down_u"/"up_u" in KB/s with 1 KB = 1024 bytes).
FLASH_MEDIAN_DOWN_KBPS = 4317.628571428571
FLASH_MEDIAN_UP_KBPS = 3285.6857142857143
# Parameters of the LEAF FEMNIST CNN above (float32: 4 bytes each): the model
# the per-batch times were measured with; use it as the clock's model_bytes to
# keep the measured compute-to-communication ratio.
FEMNIST_CNN_PARAMS = 6_603_710

_MID = FLASH_FEMNIST_MS_PER_BATCH[1]

# Device classes from the measurements above. ``speed`` multiplies
# ``base_speed`` and ``overhead_scale`` multiplies the ``step_overhead``
# argument, both as the class's per-batch time relative to the middle class
# (the measurements have one batch size, so a class is modelled as uniformly
# slower or faster: overhead and per-example time scale together).
# ``memory_cap`` (examples) is assumed, not measured. ``bandwidth`` (download)
# and ``bandwidth_up`` are bytes/s, the same for every class (FLASH draws a
# phone's network independently of its device class). ``share`` is the
# fraction of clients in the class.
DEFAULT_TIERS = (
    {"name": "low", "device": "FLASH class 0 (slowest)",
     "share": FLASH_CLASS_WEIGHTS[0] / sum(FLASH_CLASS_WEIGHTS),
     "speed": _MID / FLASH_FEMNIST_MS_PER_BATCH[0],
     "overhead_scale": FLASH_FEMNIST_MS_PER_BATCH[0] / _MID,
     "memory_cap": 32, "bandwidth": FLASH_MEDIAN_DOWN_KBPS * 1024,
     "bandwidth_up": FLASH_MEDIAN_UP_KBPS * 1024},
    {"name": "mid", "device": "FLASH class 1",
     "share": FLASH_CLASS_WEIGHTS[1] / sum(FLASH_CLASS_WEIGHTS),
     "speed": 1.0, "overhead_scale": 1.0,
     "memory_cap": 128, "bandwidth": FLASH_MEDIAN_DOWN_KBPS * 1024,
     "bandwidth_up": FLASH_MEDIAN_UP_KBPS * 1024},
    {"name": "high", "device": "FLASH class 2 (fastest)",
     "share": FLASH_CLASS_WEIGHTS[2] / sum(FLASH_CLASS_WEIGHTS),
     "speed": _MID / FLASH_FEMNIST_MS_PER_BATCH[2],
     "overhead_scale": FLASH_FEMNIST_MS_PER_BATCH[2] / _MID,
     "memory_cap": 512, "bandwidth": FLASH_MEDIAN_DOWN_KBPS * 1024,
     "bandwidth_up": FLASH_MEDIAN_UP_KBPS * 1024},
)

_INT32_MAX = np.iinfo(np.int32).max


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


# ----------------------------------------------------------------- checks ---

# rule -> (predicate on a finite float, allowed range in words)
_RULES = {
    "positive": (lambda v: v > 0, "finite and > 0"),
    "nonneg": (lambda v: v >= 0, "finite and >= 0"),
    "probability": (lambda v: 0.0 < v <= 1.0, "(0, 1]"),
    "count": (lambda v: v.is_integer() and 1 <= v <= _INT32_MAX,
              f"integer in [1, {_INT32_MAX}]"),
}


def _checked(name: str, x: Any, rule: str) -> Any:
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


# --------------------------------------------------------------- builders ---

def _assemble(n: int, speed, step_overhead, memory_cap, bw_up, bw_down,
              latency, availability, tier) -> ClientResources:
  """Broadcasts every field to ``[n]`` with the documented dtypes."""
  f32 = lambda v: np.broadcast_to(np.asarray(v, np.float32), (n,)).copy()
  i32 = lambda v: np.broadcast_to(np.asarray(v, np.int32), (n,)).copy()
  return ClientResources(
      speed=f32(speed), step_overhead=f32(step_overhead),
      memory_cap=i32(memory_cap), bandwidth_up=f32(bw_up),
      bandwidth_down=f32(bw_down), latency=f32(latency),
      availability=f32(availability), tier=i32(tier))


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
        k: _checked(f"tiers[{i}][{k!r}]", t[k], rule)
        for k, rule in _TIER_KEYS.items() if k in t}})
  return out


def _tier_counts(shares: np.ndarray, n: int) -> np.ndarray:
  """Largest-remainder rounding of ``shares * n`` to integers summing to n."""
  exact = shares / shares.sum() * n
  counts = np.floor(exact).astype(np.int64)
  order = np.argsort(-(exact - counts), kind="stable")
  counts[order[: n - counts.sum()]] += 1
  return counts


class _SafeUnpickler(pickle.Unpickler):
  """Unpickler that refuses every global except numpy scalar/dtype helpers.

  A FedScale device profile is a dict of dicts of numbers, which needs no
  globals at all (or numpy scalar reconstruction), so anything else is
  rejected rather than executed.
  """
  _ALLOWED = {("numpy.core.multiarray", "scalar"),
              ("numpy._core.multiarray", "scalar"), ("numpy", "dtype")}

  def find_class(self, module, name):
    if (module, name) in self._ALLOWED:
      return super().find_class(module, name)
    raise pickle.UnpicklingError(f"disallowed global {module}.{name}")


def _read_trace_rows(path: str) -> list:
  """Parses a trace file into ``[(client_id, record_dict), ...]``."""
  if not os.path.isfile(path):
    raise ValueError(f"trace file {path!r} does not exist or is not a file.")
  with open(path, "rb") as f:
    raw = f.read()
  ext = os.path.splitext(path)[1].lower()
  readers = {".pkl": ("pickle",), ".pickle": ("pickle",), ".json": ("json",),
             ".csv": ("csv",)}.get(ext, ("pickle", "json", "csv"))
  errors = []
  for kind in readers:
    try:
      if kind == "pickle":
        data = _SafeUnpickler(io.BytesIO(raw)).load()
      elif kind == "json":
        data = json.loads(raw.decode("utf-8"))
      else:
        text = raw.decode("utf-8")
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "client_id" not in reader.fieldnames:
          raise ValueError("CSV header lacks a 'client_id' column")
        data = list(reader)
    except Exception as e:  # pylint: disable=broad-except
      errors.append(f"{kind}: {type(e).__name__}: {e}")
      continue
    if isinstance(data, Mapping):
      return [(k, v) for k, v in data.items()]
    if isinstance(data, list) and all(isinstance(r, Mapping) for r in data):
      if not all("client_id" in r for r in data):
        errors.append(f"{kind}: a record lacks 'client_id'")
        continue
      return [(r["client_id"], r) for r in data]
    errors.append(f"{kind}: top level is {type(data).__name__}, expected a "
                  "dict {client_id: {...}} or a list of records")
  raise ValueError(f"trace file {path!r} could not be read as a FedScale "
                   f"device trace ({'; '.join(errors)}).")


def load_trace(path: str) -> dict:
  """Reads a FedScale-format device trace.

  Accepted formats (by extension; an unknown extension tries all three):
    * ``.pkl``/``.pickle``: FedScale's pickled dict
      ``{client_id: {"computation": ms_per_sample, "communication": kbps}}``.
      Only plain data is unpickled; arbitrary objects are refused.
    * ``.json``: the same dict (string keys allowed) or a list of records
      with ``client_id``, ``computation``, ``communication``.
    * ``.csv``: header ``client_id,computation,communication``.
  Each client may also carry an ``availability`` in (0, 1].

  Args:
    path: file path.

  Returns:
    Dict of numpy arrays sorted by client id, each ``[R]`` for ``R`` rows:
    ``client_id`` int64, ``computation`` float64 (ms per sample),
    ``communication`` float64 (kbps), ``availability`` float64 (NaN where the
    file has none).

  Raises:
    ValueError: the file is missing, unreadable, empty, or holds a bad value;
      the message names the path.
  """
  path = os.fspath(path)
  rows = _read_trace_rows(path)
  if not rows:
    raise ValueError(f"trace file {path!r} contains no clients.")
  parsed = []
  for cid, rec in rows:
    try:
      if not isinstance(rec, Mapping):
        raise ValueError(f"record is a {type(rec).__name__}, expected a dict")
      av = rec.get("availability")
      parsed.append((
          int(cid),
          _checked("computation", float(rec["computation"]), "positive"),
          _checked("communication", float(rec["communication"]), "positive"),
          math.nan if av in (None, "") else
          _checked("availability", float(av), "probability")))
    except (KeyError, TypeError, ValueError) as e:
      raise ValueError(
          f"trace file {path!r}: bad record for client {cid!r} "
          f"({type(e).__name__}: {e}); expected 'computation' (ms/sample, "
          "> 0), 'communication' (kbps, > 0), optional 'availability' in "
          "(0, 1].") from None
  ids = [r[0] for r in parsed]
  if len(set(ids)) != len(ids):
    raise ValueError(f"trace file {path!r} repeats a client_id.")
  parsed.sort(key=lambda r: r[0])
  cols = list(zip(*parsed))
  return {"client_id": np.asarray(cols[0], np.int64),
          "computation": np.asarray(cols[1], np.float64),
          "communication": np.asarray(cols[2], np.float64),
          "availability": np.asarray(cols[3], np.float64)}


def make_resources(profile: str, num_clients: int, seed: Any, *,
                   base_speed: float = 1000.0, speed_sigma: float = 0.5,
                   step_overhead: float = 0.01, memory_cap: int = 256,
                   memory_sigma: float = 0.0, bandwidth: float = 1e6,
                   availability: float = 1.0, latency: float = 0.0,
                   tiers: Optional[Sequence[Mapping[str, Any]]] = None,
                   trace_path: Optional[str] = None) -> ClientResources:
  """Builds the resources of ``num_clients`` clients.

  Profiles:
    * ``"uniform"``: every client has ``speed=base_speed``,
      ``memory_cap``, ``bandwidth`` (up and down), ``step_overhead``,
      ``latency`` and ``availability``.
    * ``"lognormal"``: ``speed = base_speed * exp(N(0, speed_sigma))``; the
      link gets an independent factor ``exp(N(0, speed_sigma))`` (same factor
      for up and down): ``bandwidth_{up,down} = bandwidth * factor``;
      ``memory_cap = max(1, round(memory_cap * exp(N(0, memory_sigma))))``
      (constant when ``memory_sigma == 0``).
    * ``"tiers"``: device classes from ``tiers`` (default
      :data:`DEFAULT_TIERS`, from published measurements: docs/devices.md).
      Each tier dict has ``name``, ``share`` (normalized over tiers),
      ``speed`` (multiplier of ``base_speed``), ``memory_cap`` (examples),
      ``bandwidth`` (bytes/s, both ways) and optionally: ``bandwidth_up`` /
      ``bandwidth_down`` (bytes/s, override ``bandwidth`` one way);
      ``overhead_scale`` (the tier's step overhead is
      ``overhead_scale * step_overhead``) or ``step_overhead`` (absolute
      seconds, overriding the argument), not both; ``latency`` and
      ``availability`` overriding the arguments; ``device`` (free text).
      Tier sizes are ``share * num_clients`` rounded by largest remainder (so
      they sum to ``num_clients``), and clients are assigned to tiers by a
      seeded random permutation. Clients within a tier are identical;
      ``tier`` holds the tier index.
    * ``"trace"``: a FedScale device trace (see :func:`load_trace`):
      ``speed = 1000 / computation`` (ms/sample -> examples/s) and
      ``bandwidth_{up,down} = communication * 1000 / 8`` (kbps -> bytes/s).
      Rows are sorted by client id and client ``i`` gets row ``i % R``
      (cyclic reuse when ``num_clients > R``). A per-client
      ``availability`` in the file wins over the argument. Memory cap,
      step overhead and latency come from the arguments.

  Args:
    profile: one of :data:`PROFILES`.
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
    tiers: tier table for ``"tiers"`` only.
    trace_path: trace file for ``"trace"`` only (``None`` or ``""``: none).

  Returns:
    A :class:`ClientResources` of numpy ``[N]`` arrays.

  Raises:
    ValueError: unknown profile, invalid argument (the message names the
      argument, its value and the allowed range), or bad trace file.

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
  if profile not in PROFILES:
    raise ValueError(f"unknown profile {profile!r}; allowed: {PROFILES}.")
  n = _checked("num_clients", num_clients, "count")
  base_speed = _checked("base_speed", base_speed, "positive")
  speed_sigma = _checked("speed_sigma", speed_sigma, "nonneg")
  step_overhead = _checked("step_overhead", step_overhead, "nonneg")
  memory_cap = _checked("memory_cap", memory_cap, "count")
  memory_sigma = _checked("memory_sigma", memory_sigma, "nonneg")
  bandwidth = _checked("bandwidth", bandwidth, "positive")
  availability = _checked("availability", availability, "probability")
  latency = _checked("latency", latency, "nonneg")
  if not trace_path:  # None or "" (a config's unset value): no trace.
    trace_path = None
  if tiers is not None and profile != "tiers":
    raise ValueError(f"tiers={tiers!r} is only allowed with profile='tiers' "
                     f"(got profile={profile!r}).")
  if trace_path is not None and profile != "trace":
    raise ValueError(f"trace_path={trace_path!r} is only allowed with "
                     f"profile='trace' (got profile={profile!r}).")

  if profile == "uniform":
    return _assemble(n, base_speed, step_overhead, memory_cap, bandwidth,
                     bandwidth, latency, availability, 0)

  if profile == "lognormal":
    rng = np.random.default_rng(seed)
    z_speed, z_bw, z_mem = rng.standard_normal((3, n))
    speed = base_speed * np.exp(speed_sigma * z_speed)
    bw = bandwidth * np.exp(speed_sigma * z_bw)
    mem = np.full(n, memory_cap, np.int64)
    if memory_sigma > 0:
      mem = np.rint(memory_cap * np.exp(memory_sigma * z_mem))
      mem = np.clip(mem, 1, _INT32_MAX).astype(np.int64)
    return _assemble(n, speed, step_overhead, mem, bw, bw, latency,
                     availability, 0)

  if profile == "tiers":
    table = _validate_tiers(DEFAULT_TIERS if tiers is None else tiers)
    counts = _tier_counts(np.array([t["share"] for t in table]), n)
    rng = np.random.default_rng(seed)
    tier = rng.permutation(np.repeat(np.arange(len(table)), counts))
    per_client = lambda values: np.array(values, np.float64)[tier]
    col = lambda key, default: per_client([t.get(key, default) for t in table])
    overhead = per_client([
        t["step_overhead"] if "step_overhead" in t
        else step_overhead * t.get("overhead_scale", 1.0) for t in table])
    bw_up = per_client([t.get("bandwidth_up", t["bandwidth"]) for t in table])
    bw_down = per_client([t.get("bandwidth_down", t["bandwidth"])
                          for t in table])
    return _assemble(n, base_speed * col("speed", None), overhead,
                     col("memory_cap", None), bw_up, bw_down,
                     col("latency", latency),
                     col("availability", availability), tier)

  # profile == "trace"
  if trace_path is None:
    raise ValueError("trace_path=None is invalid for profile='trace'; "
                     "allowed: a path to a FedScale device trace file.")
  trace = load_trace(trace_path)
  rows = np.arange(n) % trace["client_id"].shape[0]
  speed = 1000.0 / trace["computation"][rows]
  bw = trace["communication"][rows] * 1000.0 / 8.0
  av = trace["availability"][rows]
  av = np.where(np.isnan(av), availability, av)
  return _assemble(n, speed, step_overhead, memory_cap, bw, bw, latency, av,
                   0)


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
