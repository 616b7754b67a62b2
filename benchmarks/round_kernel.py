"""The round-kernel benchmark: the lane-packed kernel against its baselines.

  fedjax-bsa bench kernel [--quick] [--out DIR] [...]
  python -m benchmarks.round_kernel [--quick] [--out DIR] [...]

Workloads are the seeded mixes of :mod:`benchmarks.mixes` (standard: 64
clients, large: 1024 clients, uniform: FedJAX's batch-10 setting). On each,
side by side in one process and after warm-up:

* **kernel**: ``jax.jit(make_round_kernel(model.apply, microbatch=mu,
  lanes=L, noise_stats=False))``; a sweep over lane counts, all reported;
  the headline is the fewest lanes whose median is within 5% of the fastest
  median (:data:`LANES_RULE`); the same with ``noise_stats=True``. With
  ``--cpu-devices N`` (CPU) also the kernel's ``mesh`` path, its lanes split
  over ``N`` forced host devices.
* **padded**: :func:`fedjax_bsa.reference.make_padded_kernel` with the mix's
  ``s_max, b_max`` (``[clients, s_max, b_max]``).
* **reference_round** (standard mix): :func:`fedjax_bsa.reference.
  reference_round`, the correctness reference, which also computes the noise
  statistics; compared with the kernel with ``noise_stats=True``.
* **naive loop**: :class:`NaiveLoop`, exact shapes, one jitted SGD step per
  distinct batch size called from a Python loop over clients and steps (a
  stronger baseline than :func:`fedjax_bsa.reference.reference_round`,
  which also computes noise statistics on the host). Its first, cold round
  (compiling one step per distinct batch size) is reported separately.
* **FedJAX 0.0.17** (uniform mix only) in its own virtualenv, through
  :mod:`benchmarks.fedjax_uniform` as a subprocess (``--fedjax-python``,
  default ``$FEDJAX_PYTHON`` or ``/tmp/fjvenv/bin/python``; ``null`` when
  absent). Install line: :data:`FEDJAX_INSTALL`.

Timing: every method is compiled and run once (warm-up), then the methods
are run in turn, round-robin, ``--reps`` times each (so machine noise hits
them alike); each time is one full round blocked with
``jax.block_until_ready``. Reported: median, min, max.

Counts and rates:

* ``padding_efficiency``: useful examples / example slots computed. For the
  kernel, exactly ``RoundOutput.useful / (RoundOutput.slots * mu)``; for the
  padded kernel ``sum(b * s) / (K * s_max * b_max)``; 1 for the naive loop.
* ``useful_examples_per_s``: ``sum_k b_k s_k`` / round time.
* FLOPs: forward + backward matmul FLOPs of the useful examples only, for the
  MLP ``6 * (64 * 256 + 256 * 10) = 113,664`` per example (2 forward, 4
  backward per matmul weight); for other models 3x XLA's forward-pass FLOP
  count (``cost_analysis``). ``fraction_of_matmul_peak`` divides the
  achieved rate by this machine's dense float32 matmul rate (median of 7
  2048 x 2048 ``jnp.dot``, measured at the start and at the end of the
  run; the faster of the two, since other processes only lower it).
* memory: XLA's compiled ``memory_analysis()`` of each jitted function
  (argument + output + temp bytes: device memory the compiled program needs),
  and the process's peak resident set size (``getrusage``, cumulative, so it
  grows from mix to mix).
* compiles: the kernel jitted once is run for ``--rounds`` rounds with a fresh
  random plan each round (:func:`benchmarks.mixes.random_plan`); a Python
  counter inside the traced function counts traces, and ``_cache_size()``
  the cache entries. For the baselines the same plans are counted, not run:
  the padded kernel compiles once per distinct ``(s_max, b_max)``, the naive
  loop once per distinct batch size.

Writes ``round_kernel_<machine>.json`` and ``.md`` into ``--out``
(default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import federated
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import models
from fedjax_bsa import reference

from benchmarks import mixes

__all__ = ["main", "NaiveLoop", "kernel_efficiency", "padded_efficiency",
           "machine_name", "FEDJAX_INSTALL"]

tmap = jax.tree.map

FEDJAX_INSTALL = (
    'python3 -m venv /tmp/fjvenv && /tmp/fjvenv/bin/pip install '
    'fedjax==0.0.17 "jax[cpu]==0.4.13" jaxlib==0.4.13 dm-haiku==0.0.10 '
    'optax==0.1.7 chex==0.1.82 "numpy<2" "scipy<1.12"')
DEFAULT_FEDJAX_PYTHON = "/tmp/fjvenv/bin/python"
FEDJAX_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                             "fedjax_uniform.py")


# ----------------------------------------------------------------- helpers

def machine_name() -> str:
  """``cpu-<n>core`` or ``gpu-<card>`` (lower case, dashes)."""
  dev = jax.devices()[0]
  if dev.platform == "cpu":
    return f"cpu-{os.cpu_count()}core"
  kind = re.sub(r"[^a-z0-9]+", "-", dev.device_kind.lower()).strip("-")
  return f"{dev.platform}-{kind}"


def _versions() -> dict:
  import jaxlib  # pylint: disable=g-import-not-at-top
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "python": platform.python_version(), "numpy": np.__version__}


def _machine_info() -> dict:
  dev = jax.devices()[0]
  info = {"name": machine_name(), "platform": dev.platform,
          "device_kind": dev.device_kind, "devices": jax.device_count(),
          "cpu_count": os.cpu_count(), "processor": platform.processor(),
          "system": platform.platform()}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu_model"] = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return info


def _loadavg():
  try:
    return [round(v, 2) for v in os.getloadavg()]
  except OSError:
    return None


def _rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def summarize(times) -> dict:
  t = np.asarray(times, np.float64)
  return {"median": float(np.median(t)), "min": float(t.min()),
          "max": float(t.max()), "n": int(t.size),
          "all": [round(float(v), 6) for v in t]}


def _rate(count: float, time_stats: dict) -> dict:
  """``count / time``: median from the median time, min from the max."""
  return {"median": count / time_stats["median"],
          "min": count / time_stats["max"], "max": count / time_stats["min"]}


def interleaved(fns: dict, reps: int) -> dict:
  """Runs each ``fn()`` (already warm) ``reps`` times, round-robin."""
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, fn in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)
  return times


def memory_of(compiled) -> dict | None:
  """XLA's compiled memory needs (bytes), or None where unavailable."""
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


def compile_timed(fn: Callable, *args):
  """``(compiled, seconds to lower + compile)`` of ``jax.jit(fn)``."""
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t0


def matmul_peak(n: int = 2048, reps: int = 7) -> dict:
  """Dense float32 ``[n, n] @ [n, n]`` FLOP rate (median of ``reps``)."""
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  f = jax.jit(jnp.dot)
  jax.block_until_ready(f(a, b))
  jax.block_until_ready(f(a, b))
  t = [0.0] * reps
  for i in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a, b))
    t[i] = time.perf_counter() - t0
  s = summarize(t)
  flops = 2.0 * n ** 3
  return {"n": n, "flops_per_s": flops / s["median"],
          "flops_per_s_min": flops / s["max"],
          "flops_per_s_max": flops / s["min"], "times_s": s}


def flops_per_example(model: models.Model, params) -> tuple[float, str]:
  """Forward + backward FLOPs per example, and the formula used."""
  if model.name == "mlp":
    leaves = jax.tree.leaves(params)
    matmul = sum(int(np.prod(a.shape)) for a in leaves if a.ndim == 2)
    return 6.0 * matmul, (f"6 * matmul weights ({matmul}) per example "
                          "(2 forward + 4 backward FLOPs per weight)")
  batch = 256
  x = jnp.zeros((batch,) + model.input_shape, jnp.float32)
  cost = jax.jit(model.apply).lower(params, x).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0]
  fwd = float(cost["flops"]) / batch
  return 3.0 * fwd, ("3 * XLA cost_analysis forward FLOPs per example "
                     f"({fwd:.0f})")


# ----------------------------------------------------------------- methods

class Workload:
  """A mix on device: the arguments every method takes."""

  def __init__(self, mix: mixes.Mix, model: models.Model, params):
    self.mix, self.model, self.params = mix, model, params
    self.data = jax.device_put(mix.data)
    self.cohort = jnp.asarray(mix.cohort)
    self.plan = kernel_lib.Plan(jnp.asarray(mix.batch_size),
                                jnp.asarray(mix.steps), jnp.asarray(mix.lr))
    self.weights = jnp.asarray(mix.weights)
    self.key = jax.random.key(1)

  @property
  def args(self):
    return (self.params, self.data, self.cohort, self.plan, self.weights,
            self.key)


LANES_RULE = ("headline lanes: the fewest lanes whose median round time is "
              "within 5% of the fastest median of the sweep (differences "
              "below that are within this machine's run-to-run noise; fewer "
              "lanes pad less and use less memory)")


def pick_lanes(medians: dict, tolerance: float = 0.05):
  """The fewest lanes within ``tolerance`` of the fastest median time."""
  fastest = min(medians.values())
  return min(k for k, v in medians.items() if v <= fastest * (1 + tolerance))


def kernel_efficiency(out: kernel_lib.RoundOutput, mu: int) -> float:
  """Exact useful examples / example slots of one kernel round."""
  return int(out.useful) / (int(out.slots) * int(mu))


def padded_efficiency(batch_size, steps) -> float:
  """``sum(b * s) / (K * s_max * b_max)``, exactly."""
  b = np.asarray(batch_size, np.int64)
  s = np.asarray(steps, np.int64)
  return float((b * s).sum()) / float(len(b) * s.max() * b.max())


class NaiveLoop:
  """A per-client Python loop with exact shapes (the naive baseline).

  One jitted SGD step per distinct batch size ``b`` (gathering the client's
  rows ``perm[(t * b + i) mod n]`` on device, as the kernel does), called
  ``s_k`` times per client; a jitted weighted add aggregates the deltas.
  """

  def __init__(self, apply_fn):
    loss_fn = functools.partial(models.example_losses, apply_fn)

    @functools.partial(jax.jit, static_argnums=0)
    def step(b, w, x, y, perm, cid, n, t, lr):
      rows = federated.example_index(perm, n, t * b + jnp.arange(b))
      g = jax.grad(lambda p: jnp.mean(loss_fn(p, x[cid, rows], y[cid, rows])))(
          w)
      return tmap(lambda a, gi: a - lr * gi, w, g)

    @jax.jit
    def accumulate(agg, w, w0, wk):
      return tmap(lambda a, x, y: a + wk * (x - y), agg, w, w0)

    self.step = step
    self.accumulate = accumulate
    self.perms = jax.jit(federated.client_permutations, static_argnums=3)

  def __call__(self, params, data, mix: mixes.Mix, key, clients=None):
    cohort = jnp.asarray(mix.cohort)
    n = data.num_examples[cohort]
    perm = self.perms(key, cohort, n, data.y.shape[1])
    agg = tmap(jnp.zeros_like, params)
    idx = range(mix.num_clients) if clients is None else clients
    for k in idx:
      cid, b = int(mix.cohort[k]), int(mix.batch_size[k])
      lr, wk = float(mix.lr[k]), float(mix.weights[k])
      w, pk, nk = params, perm[k], n[k]
      for t in range(int(mix.steps[k])):
        w = self.step(b, w, data.x, data.y, pk, cid, nk, t, lr)
      agg = self.accumulate(agg, w, params, wk)
    return agg

  def step_memory(self, params, data, b: int):
    perm = jnp.zeros((data.y.shape[1],), jnp.int32)
    c = self.step.lower(b, params, data.x, data.y, perm, 0, jnp.int32(1), 0,
                        0.1).compile()
    return memory_of(c)


def _fmt_rate(r):
  return f"{r['median']:.3g}"


def _entry(time_stats: dict, useful: int, flops_ex: float, peak: float,
           **extra) -> dict:
  rate = _rate(useful, time_stats)
  achieved = rate["median"] * flops_ex
  e = {"time_per_round_s": time_stats, "useful_examples_per_s": rate,
       "flops_per_s": achieved, "fraction_of_matmul_peak": achieved / peak}
  e.update(extra)
  return e


# ----------------------------------------------------------------- per mix

def bench_kernel_mix(w: Workload, *, mu: int, lanes: list[int], reps: int,
                     peak: float, flops_ex: float, padded_max_slots: float,
                     naive_max_steps: int, with_reference: bool = False,
                     extra_plans: dict | None = None, mesh=None,
                     log=print) -> dict:
  """Kernel lane sweep, noise stats, padded kernel and naive loop on a mix."""
  mix = w.mix
  useful = mix.useful_examples
  res = {"mix": mix.summary(), "microbatch": mu}

  # --- kernel: compile each lane count, then time them interleaved.
  kernels, outs, info = {}, {}, {}
  for L in lanes:
    fn = kernel_lib.make_round_kernel(w.model.apply, microbatch=mu, lanes=L,
                                      noise_stats=False)
    compiled, cs = compile_timed(fn, *w.args)
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*w.args))
    first = time.perf_counter() - t0
    kernels[L], outs[L] = compiled, out
    info[L] = {"compile_s": cs, "first_run_s": first,
               "padding_efficiency": kernel_efficiency(out, mu),
               "kernel_slots": int(out.slots), "kernel_useful": int(out.useful),
               "memory": memory_of(compiled)}
    log(f"  kernel L={L}: compiled in {cs:.1f}s, efficiency "
        f"{info[L]['padding_efficiency']:.3f}")
  sweep = interleaved({L: functools.partial(kernels[L], *w.args)
                       for L in lanes}, reps)
  lane_rows = {}
  for L in lanes:
    st = summarize(sweep[L])
    lane_rows[str(L)] = _entry(st, useful, flops_ex, peak, **info[L])
  best = pick_lanes({L: np.median(sweep[L]) for L in lanes})
  res["lane_sweep"] = lane_rows
  res["lanes"] = best
  res["lanes_rule"] = LANES_RULE
  log(f"  best lanes: {best} "
      f"({np.median(sweep[best]) * 1e3:.1f} ms median)")

  # --- the headline comparison, interleaved.
  fns = {"kernel": functools.partial(kernels[best], *w.args)}
  ns_fn = kernel_lib.make_round_kernel(w.model.apply, microbatch=mu,
                                       lanes=best, noise_stats=True)
  ns_compiled, ns_cs = compile_timed(ns_fn, *w.args)
  jax.block_until_ready(ns_compiled(*w.args))
  fns["kernel_noise_stats"] = functools.partial(ns_compiled, *w.args)

  # padded kernel (all clients, or a subset scaled up when too big)
  K = mix.num_clients
  slots_full = K * mix.s_max * mix.b_max
  pk = K
  if slots_full > padded_max_slots:
    pk = max(1, int(0.6 * padded_max_slots // (mix.s_max * mix.b_max)))
    pk = min(K, max(pk, 8))
  pmix = mix if pk == K else mix.subset(pk)
  pw = w if pk == K else Workload(pmix, w.model, w.params)
  pfn = reference.make_padded_kernel(w.model.apply, mix.s_max, mix.b_max)
  p_compiled, p_cs = compile_timed(pfn, *pw.args)
  t0 = time.perf_counter()
  jax.block_until_ready(p_compiled(*pw.args))
  p_first = time.perf_counter() - t0
  fns["padded"] = functools.partial(p_compiled, *pw.args)
  p_memory = memory_of(p_compiled)
  if pk != K:  # compiled (not run) at full size, for its memory needs
    p_memory = memory_of(compile_timed(pfn, *w.args)[0])
  log(f"  padded: compiled in {p_cs:.1f}s, first run {p_first:.1f}s"
      + ("" if pk == K else f" ({pk} of {K} clients)"))

  # naive loop (all clients, or a subset scaled up)
  naive = NaiveLoop(w.model.apply)
  total_steps = int(mix.steps.sum())
  nclients = None
  if total_steps > naive_max_steps:
    csum = np.cumsum(mix.steps)
    nk = int(np.searchsorted(csum, naive_max_steps)) + 1
    nclients = list(range(min(nk, K)))
  naive_steps = total_steps if nclients is None else int(
      mix.steps[:len(nclients)].sum())
  naive_useful = useful if nclients is None else int(
      (mix.batch_size[:len(nclients)].astype(np.int64)
       * mix.steps[:len(nclients)]).sum())
  run_naive = functools.partial(naive, w.params, w.data, mix, w.key,
                                clients=nclients)
  t0 = time.perf_counter()
  jax.block_until_ready(run_naive())
  n_cold = time.perf_counter() - t0
  fns["naive_loop"] = run_naive
  log(f"  naive loop: cold round {n_cold:.1f}s"
      + ("" if nclients is None else f" ({len(nclients)} of {K} clients)"))

  if mesh is not None:
    m_fn = kernel_lib.make_round_kernel(w.model.apply, microbatch=mu,
                                        lanes=best, noise_stats=False,
                                        mesh=mesh)
    m_compiled, m_cs = compile_timed(m_fn, *w.args)
    m_out = jax.block_until_ready(m_compiled(*w.args))
    fns["kernel_mesh"] = functools.partial(m_compiled, *w.args)

  if with_reference:
    ref = functools.partial(reference.reference_round, w.model.apply,
                            *w.args, microbatch=mu)
    t0 = time.perf_counter()
    jax.block_until_ready(ref()[0])
    r_cold = time.perf_counter() - t0
    fns["reference_round"] = lambda: ref()[0]
    log(f"  reference_round: cold round {r_cold:.1f}s")

  extra_fns = {}
  for name, plan_mix in (extra_plans or {}).items():
    ew = Workload(plan_mix, w.model, w.params)
    extra_fns[name] = (ew, functools.partial(kernels[best], *ew.args))
    fns[name] = extra_fns[name][1]

  t = interleaved(fns, reps)
  st = {k: summarize(v) for k, v in t.items()}

  # kernel
  kern = _entry(st["kernel"], useful, flops_ex, peak, lanes=best,
                noise_stats=False, **info[best])
  res["kernel"] = kern
  res["kernel_noise_stats"] = _entry(
      st["kernel_noise_stats"], useful, flops_ex, peak, lanes=best,
      noise_stats=True, compile_s=ns_cs, memory=memory_of(ns_compiled))
  res["noise_stats_overhead"] = (st["kernel_noise_stats"]["median"]
                                 / st["kernel"]["median"])

  # padded: scale times to all clients (its cost is linear in K)
  scale = K / pk
  p_st = st["padded"] if pk == K else _scaled(st["padded"], scale)
  res["padded"] = _entry(
      p_st, useful, flops_ex, peak, s_max=mix.s_max, b_max=mix.b_max,
      padding_efficiency=padded_efficiency(mix.batch_size, mix.steps),
      compile_s=p_cs, first_run_s=p_first, memory=p_memory,
      memory_note=("compiled for all clients" if pk == K else
                   f"compiled, not run, for all {K} clients"),
      timed_clients=pk,
      extrapolated=(None if pk == K else
                    f"timed on the first {pk} of {K} clients (same s_max, "
                    f"b_max) and scaled by {scale:g}: the padded kernel's "
                    "work is K * s_max * b_max, linear in K"))

  # naive loop
  n_scale = useful / naive_useful
  n_st = st["naive_loop"] if nclients is None else _scaled(
      st["naive_loop"], n_scale)
  res["naive_loop"] = _entry(
      n_st, useful, flops_ex, peak, padding_efficiency=1.0,
      cold_round_s=n_cold * (1 if nclients is None else n_scale),
      compile_s=max(0.0, n_cold - st["naive_loop"]["median"]),
      distinct_batch_sizes=int(len(set(mix.batch_size.tolist()))),
      steps_per_round=total_steps,
      memory=naive.step_memory(w.params, w.data, mix.b_max),
      memory_note="one step at b_max", timed_clients=(
          K if nclients is None else len(nclients)),
      extrapolated=(None if nclients is None else
                    f"timed on the first {len(nclients)} of {K} clients "
                    f"({naive_steps} of {total_steps} steps, {naive_useful} "
                    f"of {useful} examples) and scaled by examples "
                    f"({n_scale:.3g}x)"))

  if mesh is not None:
    res["kernel_mesh"] = _entry(
        st["kernel_mesh"], useful, flops_ex, peak, lanes=best,
        devices=int(mesh.devices.size), noise_stats=False, compile_s=m_cs,
        padding_efficiency=kernel_efficiency(m_out, mu),
        memory=memory_of(m_compiled),
        note=f"lanes split over {mesh.devices.size} forced host devices "
             "(--cpu-devices) with the kernel's mesh argument")
    res["speedup_vs_naive_loop_mesh"] = (
        res["naive_loop"]["time_per_round_s"]["median"]
        / st["kernel_mesh"]["median"])

  if with_reference:
    res["reference_round"] = _entry(
        st["reference_round"], useful, flops_ex, peak, padding_efficiency=1.0,
        cold_round_s=r_cold,
        note="fedjax_bsa.reference.reference_round: the per-client loop "
             "with exact shapes that also computes the noise statistics "
             "(a jitted gradient per microbatch, norms on the host); "
             "compare with kernel_noise_stats")
    res["speedup_vs_reference_round_noise_stats"] = (
        st["reference_round"]["median"] / st["kernel_noise_stats"]["median"])

  for name, (ew, _) in extra_fns.items():
    out = jax.block_until_ready(kernels[best](*ew.args))
    res[name] = _entry(st[name], ew.mix.useful_examples, flops_ex, peak,
                       lanes=best, padding_efficiency=kernel_efficiency(
                           out, mu), mix=ew.mix.summary(),
                       padded_padding_efficiency=ew.mix.padded_efficiency())

  k_med = st["kernel"]["median"]
  res["padding_efficiency"] = kern["padding_efficiency"]
  res["useful_examples_per_s"] = kern["useful_examples_per_s"]
  res["fraction_of_matmul_peak"] = kern["fraction_of_matmul_peak"]
  res["speedup_vs_padded"] = p_st["median"] / k_med
  res["speedup_vs_naive_loop"] = n_st["median"] / k_med
  res["speedup_vs_fedjax"] = None  # FedJAX runs the uniform mix only
  res["compiles"] = 1
  res["speedup_vs_padded_noise_stats"] = (
      p_st["median"] / st["kernel_noise_stats"]["median"])
  res["speedup_vs_naive_loop_noise_stats"] = (
      n_st["median"] / st["kernel_noise_stats"]["median"])
  res["peak_memory_bytes"] = {
      "kernel": (kern["memory"] or {}).get("total_bytes"),
      "padded": (res["padded"]["memory"] or {}).get("total_bytes"),
      "naive_loop_step": (res["naive_loop"]["memory"] or {}).get(
          "total_bytes"),
      "process_peak_rss_so_far": _rss_bytes()}
  return res


def _scaled(st: dict, factor: float) -> dict:
  out = {k: (v * factor if k in ("median", "min", "max") else v)
         for k, v in st.items()}
  out["all"] = [round(v * factor, 6) for v in st["all"]]
  out["scaled_by"] = factor
  return out


def compile_test(w: Workload, *, mu: int, lanes: int, rounds: int,
                 seed: int = 123) -> dict:
  """Runs the kernel, jitted once, on ``rounds`` fresh random plans."""
  traces = [0]
  fn = kernel_lib.make_round_kernel(w.model.apply, microbatch=mu,
                                    lanes=lanes, noise_stats=False)

  def counted(*args):
    traces[0] += 1
    return fn(*args)

  jitted = jax.jit(counted)
  rng = np.random.default_rng(seed)
  K = w.mix.num_clients
  shapes, bsizes = set(), set()
  t0 = time.perf_counter()
  effs = []
  for r in range(rounds):
    b, s, lr = mixes.random_plan(rng, K)
    ex = (b.astype(np.float64) * s)
    wts = (ex / max(ex.sum(), 1.0)).astype(np.float32)
    plan = kernel_lib.Plan(jnp.asarray(b), jnp.asarray(s), jnp.asarray(lr))
    out = jax.block_until_ready(jitted(
        w.params, w.data, w.cohort, plan, jnp.asarray(wts),
        jax.random.fold_in(w.key, r)))
    if int(out.slots):
      effs.append(kernel_efficiency(out, mu))
    active = s > 0
    if active.any():
      shapes.add((int(s.max()), int(b[active].max())))
      bsizes.update(int(v) for v in b[active])
  try:
    cache = int(jitted._cache_size())  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    cache = None
  return {"rounds": rounds, "compiles": traces[0], "jit_cache_size": cache,
          "lanes": lanes, "noise_stats": False,
          "seconds": time.perf_counter() - t0,
          "plan": "fresh b_k log-uniform [1, 256], s_k uniform [0, 20], lr "
                  "log-uniform [0.01, 0.3] each round (unquantized)",
          "padding_efficiency_median": float(np.median(effs)) if effs else None,
          "padded_kernel_compiles": len(shapes),
          "naive_loop_compiles": len(bsizes),
          "baselines_note": "counted, not run: the padded kernel compiles "
                            "once per distinct (s_max, b_max), the naive "
                            "loop once per distinct batch size"}


def run_fedjax(python: str | None, mix: mixes.Mix, reps: int,
               log=print) -> dict | None:
  """The uniform mix through FedJAX in its own venv; None when absent."""
  if not python or not os.path.exists(python):
    log(f"  FedJAX: no interpreter at {python!r}: recording null "
        f"(install: {FEDJAX_INSTALL})")
    return None
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "uniform.npz")
    np.savez(path, x=np.asarray(mix.data.x), y=np.asarray(mix.data.y),
             num_classes=mix.num_classes)
    cmd = [python, FEDJAX_SCRIPT, path, "--reps", str(reps), "--warmup", "2",
           "--batch", str(int(mix.batch_size[0])),
           "--lr", str(float(mix.lr[0])), "--hidden", str(mixes.HIDDEN)]
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.setdefault("JAX_PLATFORMS", "cpu")
    try:
      p = subprocess.run(cmd, capture_output=True, text=True, timeout=900,
                         env=env, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
      log(f"  FedJAX failed: {e}")
      return {"error": str(e)}
  if p.returncode != 0:
    log(f"  FedJAX failed (exit {p.returncode}): {p.stderr[-2000:]}")
    return {"error": p.stderr[-2000:], "returncode": p.returncode}
  out = json.loads(p.stdout.strip().splitlines()[-1])
  out["python_path"] = python
  out["install"] = FEDJAX_INSTALL
  return out


def bench_uniform(w: Workload, *, lanes: list[int], reps: int, peak: float,
                  flops_ex: float, fedjax_python: str | None,
                  also_mu16: bool = True, log=print) -> dict:
  """The uniform mix: kernel (mu = batch and mu = 16), padded, naive, FedJAX."""
  mix = w.mix
  useful = mix.useful_examples
  batch = int(mix.batch_size[0])
  res = {"mix": mix.summary()}
  fns, info = {}, {}
  for mu in sorted({batch, mixes.MU} if also_mu16 else {batch}):
    for L in lanes:
      fn = kernel_lib.make_round_kernel(w.model.apply, microbatch=mu,
                                        lanes=L, noise_stats=False)
      compiled, cs = compile_timed(fn, *w.args)
      out = jax.block_until_ready(compiled(*w.args))
      name = f"kernel_mu{mu}_L{L}"
      fns[name] = functools.partial(compiled, *w.args)
      info[name] = {"microbatch": mu, "lanes": L, "compile_s": cs,
                    "padding_efficiency": kernel_efficiency(out, mu),
                    "memory": memory_of(compiled)}
      log(f"  {name}: compiled in {cs:.1f}s, efficiency "
          f"{info[name]['padding_efficiency']:.3f}")
  pfn = reference.make_padded_kernel(w.model.apply, mix.s_max, mix.b_max)
  p_compiled, p_cs = compile_timed(pfn, *w.args)
  jax.block_until_ready(p_compiled(*w.args))
  fns["padded"] = functools.partial(p_compiled, *w.args)
  naive = NaiveLoop(w.model.apply)
  run_naive = functools.partial(naive, w.params, w.data, mix, w.key)
  t0 = time.perf_counter()
  jax.block_until_ready(run_naive())
  n_cold = time.perf_counter() - t0
  fns["naive_loop"] = run_naive

  # ours before and after FedJAX's subprocess, pooled (noise drifts).
  t1 = interleaved(fns, reps)
  fj = run_fedjax(fedjax_python, mix, reps, log=log)
  t2 = interleaved(fns, reps)
  st = {k: summarize(t1[k] + t2[k]) for k in fns}

  sweep = {}
  for name in info:
    sweep[name] = _entry(st[name], useful, flops_ex, peak, **info[name])
  # headline: microbatch = the uniform batch (every b_k equals it), best L.
  cands = {info[n]["lanes"]: st[n]["median"] for n in info
           if info[n]["microbatch"] == batch}
  best = f"kernel_mu{batch}_L{pick_lanes(cands)}"
  res["kernel_sweep"] = sweep
  res["kernel"] = sweep[best]
  res["kernel_config"] = best
  res["lanes_rule"] = LANES_RULE + "; microbatch = the uniform batch size"
  mu16 = {info[n]["lanes"]: st[n]["median"] for n in info
          if info[n]["microbatch"] == mixes.MU}
  best16 = f"kernel_mu{mixes.MU}_L{pick_lanes(mu16)}" if mu16 else None
  res["kernel_mu16"] = sweep[best16] if best16 else None
  res["padded"] = _entry(st["padded"], useful, flops_ex, peak,
                         padding_efficiency=padded_efficiency(
                             mix.batch_size, mix.steps),
                         compile_s=p_cs, memory=memory_of(p_compiled))
  res["naive_loop"] = _entry(
      st["naive_loop"], useful, flops_ex, peak, padding_efficiency=1.0,
      cold_round_s=n_cold,
      compile_s=max(0.0, n_cold - st["naive_loop"]["median"]),
      memory=naive.step_memory(w.params, w.data, batch),
      memory_note="one step at b = 10")
  k_med = st[best]["median"]
  res["padding_efficiency"] = info[best]["padding_efficiency"]
  res["useful_examples_per_s"] = res["kernel"]["useful_examples_per_s"]
  res["fraction_of_matmul_peak"] = res["kernel"]["fraction_of_matmul_peak"]
  res["speedup_vs_padded"] = st["padded"]["median"] / k_med
  res["speedup_vs_naive_loop"] = st["naive_loop"]["median"] / k_med
  if fj and "times_s" in fj:
    f_st = summarize(fj["times_s"])
    res["fedjax"] = _entry(f_st, useful, flops_ex, peak, **{
        k: v for k, v in fj.items() if k != "times_s"})
    res["speedup_vs_fedjax"] = f_st["median"] / k_med
    if best16:
      res["speedup_vs_fedjax_mu16"] = f_st["median"] / st[best16]["median"]
  else:
    res["fedjax"] = fj
    res["speedup_vs_fedjax"] = None
  res["peak_memory_bytes"] = {
      "kernel": (res["kernel"]["memory"] or {}).get("total_bytes"),
      "padded": (res["padded"]["memory"] or {}).get("total_bytes"),
      "fedjax_process_rss": (fj or {}).get("peak_rss_bytes"),
      "process_peak_rss_so_far": _rss_bytes()}
  return res


def check_against_reference(model, params, *, clients: int = 6,
                            mu: int = mixes.MU, lanes: int = 3,
                            seed: int = 0) -> dict:
  """Kernel vs :func:`reference.reference_round` on a small random plan."""
  rng = np.random.default_rng(seed)
  b = rng.integers(1, 48, clients).astype(np.int32)
  s = rng.integers(0, 5, clients).astype(np.int32)
  mix = mixes.custom_mix(b, s, examples_per_client=20, name="check")
  if model.name != "mlp":
    raise ValueError("check uses the digits MLP")
  w = Workload(mix, model, params)
  fn = jax.jit(kernel_lib.make_round_kernel(model.apply, microbatch=mu,
                                            lanes=lanes, noise_stats=True))
  out = fn(*w.args)
  delta, stats, _ = reference.reference_round(
      model.apply, w.params, w.data, w.cohort, w.plan, w.weights, w.key,
      microbatch=mu)
  errs = [float(jnp.max(jnp.abs(a - b_))) for a, b_ in zip(
      jax.tree.leaves(out.delta), jax.tree.leaves(delta))]
  ok = all(np.allclose(np.asarray(a), np.asarray(b_), rtol=1e-4, atol=1e-5)
           for a, b_ in zip(jax.tree.leaves(out.delta),
                            jax.tree.leaves(delta)))
  ok_loss = bool(np.allclose(np.asarray(out.stats.loss), stats.loss,
                             rtol=1e-4, atol=1e-5))
  return {"allclose_delta": bool(ok), "allclose_loss": ok_loss,
          "max_abs_err": max(errs), "device": str(jax.devices()[0]),
          "plan": {"batch_size": b.tolist(), "steps": s.tolist()},
          "rtol": 1e-4, "atol": 1e-5}


# ----------------------------------------------------------------- report

def _pct(x):
  return "n/a" if x is None else f"{100 * x:.1f}%"


def _x(x):
  return "n/a" if x is None else f"{x:.2f}x"


def _ms(st):
  return (f"{st['median'] * 1e3:.1f} ({st['min'] * 1e3:.1f}-"
          f"{st['max'] * 1e3:.1f})")


def markdown(report: dict) -> str:
  m = report["machine"]
  lines = [
      f"# Round-kernel benchmark: {m['name']}",
      "",
      f"{m.get('cpu_model', m['device_kind'])}, {m['cpu_count']} CPU cores, "
      f"jax {report['versions']['jax']}, python "
      f"{report['versions']['python']}, {report['timestamp']}. "
      f"Load average at start/end: {report['loadavg_start']} / "
      f"{report['loadavg_end']}.",
      "",
      f"Dense float32 matmul ({report['matmul_peak']['n']}^2): "
      f"{report['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s (the faster "
      "of two medians of 7, at the start and at the end of the run). "
      f"FLOPs: {report['flops_formula']}.",
      "",
      "Times per round in ms: median (min-max) of "
      f"{report['settings']['reps']} interleaved repetitions after warm-up "
      f"({report['settings']['large_reps']} on the large and cnn mixes). "
      "'speedup of kernel' = the method's median time / the kernel's "
      "(noise stats off; with noise stats for reference_round). Memory: XLA's "
      "argument + output + temp bytes of the compiled round (naive loop: "
      "one step at b_max).",
      "",
      "| mix | method | padding eff. | ms / round | useful ex/s | "
      "% matmul peak | speedup of kernel | memory (XLA) |",
      "|---|---|---|---|---|---|---|---|",
  ]

  def row(mix, name, e, speed=None):
    mem = (e.get("memory") or {}).get("total_bytes")
    mem_s = "n/a" if mem is None else f"{mem / 2 ** 20:.1f} MiB"
    eff = e.get("padding_efficiency")
    lines.append(
        f"| {mix} | {name} | {_pct(eff)} | {_ms(e['time_per_round_s'])} | "
        f"{_fmt_rate(e['useful_examples_per_s'])} | "
        f"{100 * e['fraction_of_matmul_peak']:.1f}% | "
        f"{'' if speed is None else _x(speed)} | {mem_s} |")

  for key in ("standard", "large", "cnn"):
    r = report["mixes"].get(key)
    if not r:
      continue
    K = r["mix"]["clients"]
    name = f"{key} ({K})"
    row(name, f"kernel L={r['lanes']}", r["kernel"])
    row(name, "kernel + noise stats", r["kernel_noise_stats"])
    if "kernel_mesh" in r:
      row(name, f"kernel, lanes over {r['kernel_mesh']['devices']} CPU "
          "devices", r["kernel_mesh"])
    if "kernel_unquantized" in r:
      row(name, "kernel, b unquantized", r["kernel_unquantized"])
    pad_note = " (extrapolated)" if r["padded"].get("extrapolated") else ""
    row(name, "padded" + pad_note, r["padded"], r["speedup_vs_padded"])
    nv_note = " (extrapolated)" if r["naive_loop"].get("extrapolated") else ""
    row(name, "naive loop" + nv_note, r["naive_loop"],
        r["speedup_vs_naive_loop"])
    if "reference_round" in r:
      row(name, "reference_round (with stats)", r["reference_round"],
          r["speedup_vs_reference_round_noise_stats"])
  r = report["mixes"].get("uniform")
  if r:
    name = f"uniform ({r['mix']['clients']})"
    row(name, r["kernel_config"].replace("_", " "), r["kernel"])
    if r.get("kernel_mu16"):
      row(name, "kernel mu=16", r["kernel_mu16"])
    row(name, "padded", r["padded"], r["speedup_vs_padded"])
    row(name, "naive loop", r["naive_loop"], r["speedup_vs_naive_loop"])
    if r.get("speedup_vs_fedjax") is not None:
      row(name, "FedJAX 0.0.17", r["fedjax"], r["speedup_vs_fedjax"])
    else:
      lines.append(f"| {name} | FedJAX 0.0.17 | not run (no venv) | | | | | |")
  lines.append("")
  s = report["mixes"].get("standard")
  if s:
    lines.append("Lane sweep (standard mix, noise stats off):")
    lines.append("")
    lines.append("| lanes | padding eff. | ms / round | useful ex/s |")
    lines.append("|---|---|---|---|")
    for L, e in s["lane_sweep"].items():
      lines.append(f"| {L} | {_pct(e['padding_efficiency'])} | "
                   f"{_ms(e['time_per_round_s'])} | "
                   f"{_fmt_rate(e['useful_examples_per_s'])} |")
    lines.append("")
  h = report["headline"]
  lines.append("Headline:")
  lines.append("")
  for k, v in h.items():
    if isinstance(v, float):
      v = f"{v:.3g}"
    lines.append(f"- {k}: {v}")
  lines.append("")
  return "\n".join(lines)


def headline(report: dict) -> dict:
  mx = report["mixes"]
  h = {}
  s = mx.get("standard")
  if s:
    h["standard padding efficiency"] = s["padding_efficiency"]
    h["standard padding efficiency, b unquantized"] = s.get(
        "kernel_unquantized", {}).get("padding_efficiency")
    h["standard useful examples/s (median)"] = s["useful_examples_per_s"][
        "median"]
    h["standard speedup vs padded"] = s["speedup_vs_padded"]
    h["standard speedup vs naive loop"] = s["speedup_vs_naive_loop"]
    h["standard fraction of matmul peak"] = s["fraction_of_matmul_peak"]
    h["noise_stats_overhead (time ratio on/off)"] = s["noise_stats_overhead"]
  c = report.get("compile_test")
  if c:
    h[f"compiles over {c['rounds']} rounds of random plans"] = c["compiles"]
  u = mx.get("uniform")
  if u:
    h["uniform speedup vs FedJAX"] = u.get("speedup_vs_fedjax")
  lg = mx.get("large")
  if lg and s:
    h["large/standard time per round"] = report["large_vs_standard"][
        "time_ratio"]
    h["large/standard useful examples"] = report["large_vs_standard"][
        "examples_ratio"]
  return h


# ----------------------------------------------------------------- main

def _parser():
  p = argparse.ArgumentParser(
      prog="fedjax-bsa bench kernel",
      description="Round-kernel benchmark (see benchmarks/round_kernel.py).")
  p.add_argument("--quick", action="store_true",
                 help="tiny sizes, 2 repetitions, no large mix, no FedJAX "
                      "(a smoke test)")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="where to write round_kernel_<machine>.json/.md "
                      "(default: benchmarks/results)")
  p.add_argument("--reps", type=int, default=None,
                 help="timed repetitions per method (default 7, quick 2)")
  p.add_argument("--large-reps", type=int, default=None,
                 help="repetitions on the large and cnn mixes (default: "
                      "min(reps, 5))")
  p.add_argument("--lanes", default=None,
                 help="lane counts for the standard mix (default 4,8,16,32)")
  p.add_argument("--large-lanes", default=None,
                 help="lane counts for the large mix (default 8,16,64 on CPU, "
                      "64,256,512 on GPU)")
  p.add_argument("--uniform-lanes", default=None,
                 help="lane counts for the uniform mix (default 8,16,64)")
  p.add_argument("--mixes", default=None,
                 help="comma list of standard,large,uniform,cnn (default: "
                      "standard,large,uniform; quick: standard,uniform)")
  p.add_argument("--rounds", type=int, default=None,
                 help="rounds of the compile test (default 50, quick 5)")
  p.add_argument("--fedjax-python", default=None, metavar="PATH",
                 help="python of a FedJAX 0.0.17 venv (default "
                      "$FEDJAX_PYTHON or /tmp/fjvenv/bin/python)")
  p.add_argument("--no-fedjax", action="store_true")
  p.add_argument("--check", action="store_true",
                 help="first check the kernel against the reference loop")
  p.add_argument("--padded-max-slots", type=float, default=None,
                 help="time the padded kernel on a client subset above this "
                      "many example slots (default 2.5e6 on CPU, 4e8 on GPU)"
                      "; the subset is sized to 60%% of it")
  p.add_argument("--naive-max-steps", type=int, default=None,
                 help="time the naive loop on a client subset above this "
                      "many steps (default 20000 on CPU, 40000 on GPU)")
  p.add_argument("--cpu-devices", type=int, default=1,
                 help="CPU only: also time the kernel with its lanes split "
                      "over this many forced host devices (the kernel's mesh "
                      "argument, one thread each); must be set before JAX "
                      "starts its backend")
  p.add_argument("--machine", default=None, help="override the machine name")
  return p


def apply_peak(obj, peak: float) -> None:
  """Sets every ``fraction_of_matmul_peak`` from its entry's ``flops_per_s``
  (idempotent: entries shared between a sweep and a headline are fine)."""
  if isinstance(obj, dict):
    for v in obj.values():
      apply_peak(v, peak)
    if "flops_per_s" in obj and "fraction_of_matmul_peak" in obj:
      obj["fraction_of_matmul_peak"] = obj["flops_per_s"] / peak
    elif "fraction_of_matmul_peak" in obj and isinstance(obj.get("kernel"),
                                                          dict):
      obj["fraction_of_matmul_peak"] = obj["kernel"]["fraction_of_matmul_peak"]
  elif isinstance(obj, list):
    for v in obj:
      apply_peak(v, peak)


def _force_cpu_devices(n: int) -> None:
  """Asks XLA for ``n`` host devices (before the backend starts)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    flags = os.environ.get("XLA_FLAGS", "")
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={n}").strip()
  if jax.devices()[0].platform == "cpu" and jax.device_count() < n:
    raise ValueError(f"--cpu-devices={n}: JAX already started with "
                     f"{jax.device_count()} device(s); run in a fresh process")


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  quick = args.quick
  if args.cpu_devices > 1:
    _force_cpu_devices(args.cpu_devices)
  gpu = jax.devices()[0].platform != "cpu"
  reps = args.reps or (2 if quick else 7)
  ints = lambda s: [int(v) for v in s.split(",") if v]
  lanes = ints(args.lanes) if args.lanes else ([2, 4] if quick else
                                               [4, 8, 16, 32])
  large_lanes = ints(args.large_lanes) if args.large_lanes else (
      [64, 256, 512] if gpu else [8, 16, 64])
  uniform_lanes = ints(args.uniform_lanes) if args.uniform_lanes else (
      [4] if quick else [8, 16, 64])
  which = (args.mixes.split(",") if args.mixes else
           (["standard", "uniform"] if quick else
            ["standard", "large", "uniform"]))
  rounds = args.rounds if args.rounds is not None else (5 if quick else 50)
  padded_max = args.padded_max_slots or (4e8 if gpu else 2.5e6)
  naive_max = args.naive_max_steps or (40000 if gpu else 20000)
  large_reps = args.large_reps or min(reps, 5)
  fj_python = None
  if not (args.no_fedjax or quick):
    fj_python = (args.fedjax_python or os.environ.get("FEDJAX_PYTHON")
                 or DEFAULT_FEDJAX_PYTHON)
  out_dir = args.out or os.path.join(os.path.dirname(
      os.path.abspath(__file__)), "results")
  os.makedirs(out_dir, exist_ok=True)
  log = functools.partial(print, flush=True)
  t_start = time.perf_counter()

  report = {"benchmark": "round_kernel", "machine": _machine_info(),
            "versions": _versions(),
            "timestamp": datetime.datetime.now(datetime.timezone.utc)
                         .isoformat(timespec="seconds"),
            "loadavg_start": _loadavg(),
            "settings": {"quick": quick, "reps": reps, "mixes": which,
                         "lanes": lanes, "large_lanes": large_lanes,
                         "uniform_lanes": uniform_lanes,
                         "compile_test_rounds": rounds,
                         "large_reps": large_reps,
                         "padded_max_slots": padded_max,
                         "naive_max_steps": naive_max,
                         "microbatch": mixes.MU,
                         "cpu_devices": args.cpu_devices},
            "mixes": {}}
  if args.machine:
    report["machine"]["name"] = args.machine
  name = report["machine"]["name"]
  log(f"round-kernel benchmark on {name} ({jax.devices()[0].device_kind})")

  peak = matmul_peak(512 if quick else 2048, 3 if quick else 7)
  report["matmul_peak"] = peak
  log(f"matmul peak: {peak['flops_per_s'] / 1e9:.1f} GFLOP/s")
  peak_f = peak["flops_per_s"]

  mlp = models.make_model("mlp", (64,), 10, hidden=mixes.HIDDEN)
  params = mlp.init(jax.random.key(0))
  flops_ex, formula = flops_per_example(mlp, params)
  report["flops_per_example"] = flops_ex
  report["flops_formula"] = formula

  if args.check:
    chk = check_against_reference(mlp, params)
    report["check"] = chk
    log(f"check vs reference: delta allclose={chk['allclose_delta']} "
        f"loss allclose={chk['allclose_loss']} "
        f"(max abs err {chk['max_abs_err']:.2e})")

  mesh = None
  if args.cpu_devices > 1 and not gpu:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:args.cpu_devices]),
                             ("clients",))
  common = dict(reps=reps, peak=peak_f, padded_max_slots=padded_max,
                naive_max_steps=naive_max, mesh=mesh, log=log)
  if "standard" in which:
    log("standard mix")
    if quick:
      mix = mixes.standard_mix(8, max_examples=256)
      mix_u = mixes.standard_mix(8, max_examples=256, quantize=False)
    else:
      mix = mixes.standard_mix()
      mix_u = mixes.standard_mix(quantize=False)
    w = Workload(mix, mlp, params)
    res = bench_kernel_mix(w, mu=mixes.MU, lanes=lanes, flops_ex=flops_ex,
                           extra_plans={"kernel_unquantized": mix_u},
                           with_reference=not quick, **common)
    report["mixes"]["standard"] = res
    log("compile test")
    report["compile_test"] = compile_test(w, mu=mixes.MU, lanes=res["lanes"],
                                          rounds=rounds)
    res["compiles"] = report["compile_test"]["compiles"]
    log(f"  {report['compile_test']['compiles']} compile(s) over {rounds} "
        "rounds")

  if "large" in which:
    log("large mix")
    mix = mixes.large_mix()
    w = Workload(mix, mlp, params)
    res = bench_kernel_mix(w, mu=mixes.MU, lanes=large_lanes,
                           flops_ex=flops_ex,
                           **dict(common, reps=large_reps))
    res["compiles"] = 1
    res["compiles_note"] = ("one per lane count: shapes depend on K, mu, L "
                            "only (see compile_test)")
    report["mixes"]["large"] = res
    s = report["mixes"].get("standard")
    if s:
      tr = (res["kernel"]["time_per_round_s"]["median"]
            / s["kernel"]["time_per_round_s"]["median"])
      er = res["mix"]["useful_examples"] / s["mix"]["useful_examples"]
      report["large_vs_standard"] = {
          "time_ratio": tr, "examples_ratio": er,
          "clients_ratio": res["mix"]["clients"] / s["mix"]["clients"],
          "time_per_example_ratio": tr / er,
          "note": "time_per_example_ratio near 1: cost grows linearly "
                  "with the examples (clients)"}

  if "cnn" in which:
    log("cnn mix")
    mix = mixes.cnn_mix(8 if quick else 1024, max_examples=(
        128 if quick else mixes.MAX_EXAMPLES))
    cnn = models.make_model("cnn1d", mix.input_shape, mix.num_classes)
    cparams = cnn.init(jax.random.key(0))
    c_flops, c_formula = flops_per_example(cnn, cparams)
    w = Workload(mix, cnn, cparams)
    res = bench_kernel_mix(w, mu=mixes.MU, lanes=lanes if quick else
                           large_lanes, flops_ex=c_flops,
                           **dict(common, reps=large_reps))
    res["flops_per_example"] = c_flops
    res["flops_formula"] = c_formula
    report["mixes"]["cnn"] = res

  if "uniform" in which:
    log("uniform mix")
    mix = mixes.uniform_mix(8 if quick else 64)
    w = Workload(mix, mlp, params)
    res = bench_uniform(w, lanes=uniform_lanes, reps=reps, peak=peak_f,
                        flops_ex=flops_ex, fedjax_python=fj_python,
                        also_mu16=not quick, log=log)
    res["compiles"] = 1
    report["mixes"]["uniform"] = res

  # The matmul rate again: other processes only ever lower it, so the
  # faster of the two medians is the peak (both are kept).
  peak_end = matmul_peak(512 if quick else 2048, 3 if quick else 7)
  report["matmul_peak_start"] = peak
  report["matmul_peak_end"] = peak_end
  if peak_end["flops_per_s"] > peak_f:
    report["matmul_peak"] = dict(peak_end, measured="at the end (faster)")
    apply_peak(report["mixes"], peak_end["flops_per_s"])
  else:
    report["matmul_peak"]["measured"] = "at the start (faster)"
  report["loadavg_end"] = _loadavg()
  report["process_peak_rss_bytes"] = _rss_bytes()
  report["wall_s"] = time.perf_counter() - t_start
  report["fedjax_install"] = FEDJAX_INSTALL
  report["headline"] = headline(report)
  base = os.path.join(out_dir, f"round_kernel_{name}")
  with open(base + ".json", "w") as f:
    json.dump(report, f, indent=1, default=_json_default)
  md = markdown(report)
  with open(base + ".md", "w") as f:
    f.write(md)
  log(md)
  log(f"wrote {base}.json and {base}.md ({report['wall_s']:.0f}s)")
  return 0


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f"not JSON serializable: {type(o)}")


if __name__ == "__main__":
  sys.exit(main())
