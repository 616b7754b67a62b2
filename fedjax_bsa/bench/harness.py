"""The timing harness every benchmark shares.

* :func:`interleaved`: warm-up, then round-robin repetitions of several
  methods (machine noise hits them alike); :func:`summarize` their times
  (median, min, max, every value).
* The machine: :func:`machine_info` (devices, CPU model, versions),
  :func:`loadavg`, :func:`rss_bytes` and :func:`matmul_peak`, the dense
  float32 matmul rate that FLOP rates are compared with.
* XLA's compiled memory needs: :func:`compile_timed`, :func:`memory_of`.
* Reports: :func:`new_report` (machine, versions, time, load) and
  :func:`write_report` (``<stem>.json`` and ``<stem>.md``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import resource
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.run.autotune import cpu_model

__all__ = ["summarize", "rate", "scaled", "interleaved", "timed_call",
           "compile_timed", "memory_of", "matmul_peak", "machine_name",
           "cpu_model",
           "machine_info", "versions", "loadavg", "rss_bytes", "new_report",
           "finish_report", "write_report", "pick_fewest"]


def summarize(times) -> dict:
  """Median, min, max, count and every value of ``times`` (seconds).

  >>> summarize([3.0, 1.0, 2.0])["median"]
  2.0
  """
  t = np.asarray(times, np.float64)
  return {"median": float(np.median(t)), "min": float(t.min()),
          "max": float(t.max()), "n": int(t.size),
          "all": [round(float(v), 6) for v in t]}


def rate(count: float, stats: dict) -> dict:
  """``count / time``: the median from the median time, the min from the
  max time and the max from the min time.

  >>> rate(10.0, summarize([1.0, 2.0, 5.0]))
  {'median': 5.0, 'min': 2.0, 'max': 10.0}
  """
  return {"median": count / stats["median"], "min": count / stats["max"],
          "max": count / stats["min"]}


def scaled(stats: dict, factor: float) -> dict:
  """``stats`` with every time multiplied by ``factor`` (extrapolations).

  >>> scaled(summarize([1.0, 3.0]), 2.0)["median"]
  4.0
  """
  out = {k: (v * factor if k in ("median", "min", "max") else v)
         for k, v in stats.items()}
  out["all"] = [round(v * factor, 6) for v in stats["all"]]
  out["scaled_by"] = factor
  return out


def timed_call(fn: Callable, *args):
  """``(fn(*args) blocked, seconds)``."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t0


def interleaved(fns: dict, reps: int, warmup: int = 0) -> dict:
  """Times each ``fn()`` ``reps`` times, round-robin over the methods.

  Args:
    fns: ``{name: fn}``, each ``fn()`` returning arrays (blocked here).
    reps: timed repetitions per method.
    warmup: untimed calls per method first (0 when already warm).

  Returns:
    ``{name: [seconds, ...]}``, ``reps`` values each.

  >>> t = interleaved({"a": lambda: 1}, reps=2, warmup=1)
  >>> len(t["a"])
  2
  """
  for _ in range(warmup):
    for fn in fns.values():
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return times


def compile_timed(fn: Callable, *args):
  """``(compiled, seconds to lower and compile)`` of ``jax.jit(fn)``."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def memory_of(compiled) -> dict | None:
  """XLA's memory needs of a compiled program (bytes), None if unknown.

  ``total_bytes`` is argument + output + temp - aliased bytes: the device
  memory the program needs while it runs.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if m is None:
    return None
  arg, out = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  tmp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  return {"argument_bytes": arg, "output_bytes": out, "temp_bytes": tmp,
          "alias_bytes": alias, "total_bytes": arg + out + tmp - alias,
          "source": "jit(...).lower(...).compile().memory_analysis()"}


def matmul_peak(n: int = 2048, reps: int = 7) -> dict:
  """This device's dense float32 ``[n, n] @ [n, n]`` rate (median of
  ``reps`` after two warm-up calls), in FLOP/s.

  Returns:
    ``{"n", "flops_per_s", "flops_per_s_min", "flops_per_s_max",
    "times_s"}``.
  """
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  t = interleaved({"dot": lambda: f(a, b)}, reps, warmup=2)["dot"]
  s = summarize(t)
  flops = 2.0 * n ** 3
  return {"n": n, "flops_per_s": flops / s["median"],
          "flops_per_s_min": flops / s["max"],
          "flops_per_s_max": flops / s["min"], "times_s": s}


def machine_name() -> str:
  """``cpu-<cores>core`` or ``<platform>-<device kind>`` (lower case).

  >>> machine_name().startswith(("cpu-", "gpu-", "cuda-", "tpu-"))
  True
  """
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"cpu-{os.cpu_count()}core"
  kind = re.sub(r"[^a-z0-9]+", "-", dev.device_kind.lower()).strip("-")
  return f"{dev.platform}-{kind}"


def versions() -> dict:
  """Versions of python, jax, jaxlib, numpy, flax and optax."""
  import jaxlib  # pylint: disable=g-import-not-at-top
  out = {"python": platform.python_version(), "jax": jax.__version__,
         "jaxlib": jaxlib.__version__, "numpy": np.__version__}
  for name in ("flax", "optax"):
    try:
      out[name] = __import__(name).__version__
    except (ImportError, AttributeError):
      out[name] = None
  return out


def machine_info() -> dict:
  """The devices, the host's CPU model and core count, XLA flags."""
  dev = jax.devices()[0]
  info = {"name": machine_name(), "platform": dev.platform,
          "device_kind": dev.device_kind, "devices": jax.device_count(),
          "cpu_count": os.cpu_count(), "processor": platform.processor(),
          "system": platform.platform(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "compilation_cache_dir": jax.config.jax_compilation_cache_dir}
  model = cpu_model()
  if model is not None:
    info["cpu_model"] = model
  return info


def loadavg() -> list | None:
  """The 1, 5 and 15 minute load averages (None where unknown)."""
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def rss_bytes() -> int:
  """This process's peak resident set size so far (bytes)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def new_report(benchmark: str, settings: dict) -> dict:
  """A report's header: what ran, where, with which versions, when."""
  return {"benchmark": benchmark, "machine": machine_info(),
          "versions": versions(),
          "timestamp": datetime.datetime.now(datetime.timezone.utc)
                       .isoformat(timespec="seconds"),
          "loadavg_start": loadavg(), "settings": settings,
          "_start": time.perf_counter()}


def finish_report(report: dict) -> dict:
  """Adds the end load average, peak RSS and wall time (idempotent)."""
  report["loadavg_end"] = loadavg()
  report["process_peak_rss_bytes"] = rss_bytes()
  report["wall_s"] = time.perf_counter() - report["_start"]
  return report


def _json_default(o):
  if isinstance(o, np.integer):
    return int(o)
  if isinstance(o, np.floating):
    return float(o)
  if isinstance(o, (np.ndarray, jax.Array)):
    return np.asarray(o).tolist()
  raise TypeError(f"not JSON serializable: {type(o)}")


#: Where a full benchmark run writes by default (its results are committed).
RESULTS_DIR = os.path.join("benchmarks", "results")
#: Where a ``--quick`` run writes by default (ignored by git): a quick run
#: never touches committed results unless ``--out`` says so.
QUICK_DIR = os.path.join("runs", "benchmarks")
OUT_HELP = ("where the results go (default: benchmarks/results; with "
            "--quick: runs/benchmarks, not committed, and every name ends "
            "in _quick)")


def results_dir(out: str | None, quick: bool) -> str:
  """``--out`` if given, else :data:`QUICK_DIR` for a quick run and
  :data:`RESULTS_DIR` for a full one (the rule of benchmarks/README.md)."""
  return out or (QUICK_DIR if quick else RESULTS_DIR)


def write_report(report: dict, out_dir: str, stem: str,
                 markdown: str | None = None) -> str:
  """Writes ``out_dir/<stem>.json`` (and ``.md`` when given); returns the
  JSON path. Safe to call after every part of a run (partial results)."""
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"{stem}.json")
  doc = {k: v for k, v in finish_report(report).items() if k != "_start"}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(doc, f, indent=1, default=_json_default)
  os.replace(tmp, path)
  if markdown is not None:
    with open(os.path.join(out_dir, f"{stem}.md"), "w") as f:
      f.write(markdown)
  return path


def pick_fewest(medians: dict, tolerance: float = 0.05):
  """The smallest key whose median time is within ``tolerance`` of the
  fastest (fewer lanes pad less and use less memory; differences below
  the tolerance are run-to-run noise).

  >>> pick_fewest({4: 1.0, 8: 0.97, 16: 0.8, 32: 0.79})
  16
  """
  fastest = min(medians.values())
  return min(k for k, v in medians.items() if v <= fastest * (1 + tolerance))
