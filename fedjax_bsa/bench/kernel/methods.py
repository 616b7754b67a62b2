"""The round kernel against its baselines on one mix.

:func:`lane_sweep` compiles the kernel for a grid of ``(lanes, mu)`` and
times them interleaved; the headline configuration is the fewest lanes
whose median is within 5% of the fastest (:data:`LANES_RULE`).
:func:`compare` then times, interleaved, the headline kernel, the kernel
with noise statistics, the padded layout, the naive loop and the optional
extras (another plan on the same kernel, the per-job reference loop, the
lanes over a mesh, FedJAX between two halves of the repetitions). Each
method is a :class:`Method`: a function to time and how to turn its time
statistics into a report entry.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from fedjax_bsa.bench import harness
from fedjax_bsa.bench.kernel import baselines
from fedjax_bsa.bench.kernel import figures
from fedjax_bsa.bench.kernel import scenarios
from fedjax_bsa.kernel import reference

__all__ = ["Workload", "workload", "Ctx", "Method", "Counted", "counted_jit",
           "lane_sweep", "kernel_method", "noise_method", "plan_method",
           "padded_method", "naive_method", "reference_method",
           "mesh_method", "compare", "LANES_RULE"]

LANES_RULE = ("headline: the fewest lanes (then the smallest microbatch) "
              "whose median round time is within 5% of the fastest of the "
              "sweep (differences below that are run-to-run noise here; "
              "fewer lanes pad less and use less memory)")


class Workload(NamedTuple):
  """A mix on device and the arguments every kernel takes."""
  mix: scenarios.Mix
  model: Any
  params: Any      # one experiment's params tree
  data: Any        # device FederatedData
  jobs: Any        # device Jobs

  @property
  def args(self):
    """``(params[1, ...], data, jobs)``: the kernel's arguments."""
    return (jax.tree.map(lambda a: a[None], self.params), self.data,
            self.jobs)


def workload(mix: scenarios.Mix, model=None, params=None) -> Workload:
  """Puts ``mix`` on the device (model and params from the mix if absent)."""
  model = model or scenarios.model_of(mix)
  params = params if params is not None else model.init(jax.random.key(0))
  return Workload(mix, model, params, jax.device_put(mix.data),
                  scenarios.make_jobs(mix))


class Ctx(NamedTuple):
  """Settings shared by the methods of one benchmark run."""
  reps: int
  peak: float               # matmul FLOP/s
  flops_ex: float           # FLOPs per useful example
  padded_max_slots: float   # above: time the padded layout on a subset
  naive_max_steps: int      # above: time the naive loop on a subset
  log: Callable = print


class Method(NamedTuple):
  """A timed method: ``fn()`` runs one round (warm); ``finish(stats)``
  turns its time statistics into a report entry."""
  fn: Callable
  finish: Callable


def _key(lanes: int, mu: int) -> str:
  return f"L{lanes}_mu{mu}"


class Counted(NamedTuple):
  """A jitted function and the list its traces append to (compiles)."""
  fn: Callable
  traces: list


def counted_jit(fn: Callable) -> Counted:
  """``jax.jit(fn)`` that counts its traces."""
  traces = []

  def traced(*args):
    traces.append(1)
    return fn(*args)
  return Counted(jax.jit(traced), traces)


def lane_sweep(w: Workload, grid, ctx: Ctx, headline_mu=None) -> dict:
  """Compiles and times the kernel for every ``(lanes, mu)`` of ``grid``.

  Returns:
    ``{"rows": {key: entry}, "best": key, "jitted": {key: Counted}}``;
    ``best`` is chosen among microbatch ``headline_mu`` (any if None). The
    jitted kernels are compiled (ahead of time, which also serves their
    calls) and count their traces.
  """
  jitted, info, useful = {}, {}, w.mix.useful_examples
  for lanes, mu in grid:
    k = _key(lanes, mu)
    jitted[k] = counted_jit(baselines.kernel_fn(w.model, microbatch=mu,
                                                lanes=lanes))
    compiled, cs = harness.compile_timed(jitted[k].fn, *w.args)
    out, first = harness.timed_call(jitted[k].fn, *w.args)
    info[k] = dict(lanes=lanes, microbatch=mu, compile_s=cs,
                   first_run_s=first,
                   padding_efficiency=figures.kernel_efficiency(out, mu),
                   kernel_slots=int(out.slots), kernel_useful=int(out.useful),
                   memory=harness.memory_of(compiled))
    ctx.log(f"  kernel {k}: compiled in {cs:.1f}s, padding efficiency "
            f"{info[k]['padding_efficiency']:.3f}")
  t = harness.interleaved({k: functools.partial(c.fn, *w.args)
                           for k, c in jitted.items()}, ctx.reps)
  rows = {k: figures.entry(harness.summarize(t[k]), useful, ctx.flops_ex,
                           ctx.peak, **info[k]) for k in jitted}
  cands = {(i["lanes"], i["microbatch"]): float(np.median(t[k]))
           for k, i in info.items()
           if headline_mu is None or i["microbatch"] == headline_mu}
  best = _key(*harness.pick_fewest(cands))
  ms = rows[best]["time_per_round_s"]["median"] * 1e3
  ctx.log(f"  headline {best}: {ms:.1f} ms")
  return {"rows": rows, "best": best, "jitted": jitted}


def kernel_method(w: Workload, compiled, ctx: Ctx, **extra) -> Method:
  """An already compiled (or jitted and warm) kernel on the workload."""
  def finish(st):
    return figures.entry(st, w.mix.useful_examples, ctx.flops_ex, ctx.peak,
                         **extra)
  return Method(functools.partial(compiled, *w.args), finish)


def noise_method(w: Workload, lanes: int, mu: int, ctx: Ctx,
                 per_slot: int = 1) -> Method:
  """The kernel with ``noise_stats=True`` at a layout (the headline's, or
  another's)."""
  fn = baselines.kernel_fn(w.model, microbatch=mu, lanes=lanes,
                           per_slot=per_slot, noise_stats=True)
  compiled, cs = harness.compile_timed(fn, *w.args)
  out, _ = harness.timed_call(compiled, *w.args)
  return kernel_method(w, compiled, ctx, lanes=lanes, microbatch=mu,
                       per_slot=per_slot, noise_stats=True, compile_s=cs,
                       padding_efficiency=figures.kernel_efficiency(out, mu),
                       memory=harness.memory_of(compiled))


def plan_method(w: Workload, compiled, mix: scenarios.Mix, mu: int,
                ctx: Ctx) -> Method:
  """The headline kernel (same compile) on another plan of the clients."""
  other = workload(mix, w.model, w.params)
  out, _ = harness.timed_call(compiled, *other.args)

  def finish(st):
    return figures.entry(
        st, mix.useful_examples, ctx.flops_ex, ctx.peak, mix=mix.summary(),
        padding_efficiency=figures.kernel_efficiency(out, mu),
        padded_padding_efficiency=mix.padded_efficiency())
  return Method(functools.partial(compiled, *other.args), finish)


def padded_method(w: Workload, ctx: Ctx) -> Method:
  """The padded layout; on a job subset (time scaled by ``K / k``, its work
  being linear in ``K``) above ``ctx.padded_max_slots`` example slots."""
  mix, K = w.mix, w.mix.num_jobs
  fn = baselines.padded_fn(w.model, mix.s_max, mix.b_max)
  k = K
  if K * mix.s_max * mix.b_max > ctx.padded_max_slots:
    k = min(K, max(8, int(0.6 * ctx.padded_max_slots //
                          (mix.s_max * mix.b_max))))
  part = w if k == K else w._replace(
      jobs=scenarios.make_jobs(mix.subset(k)))
  compiled, cs = harness.compile_timed(fn, *part.args)
  _, first = harness.timed_call(compiled, *part.args)
  memory = harness.memory_of(compiled if k == K else
                             harness.compile_timed(fn, *w.args)[0])
  ctx.log(f"  padded: compiled in {cs:.1f}s, first run {first:.2f}s"
          + ("" if k == K else f" ({k} of {K} clients)"))

  def finish(st):
    st = st if k == K else harness.scaled(st, K / k)
    return figures.entry(
        st, mix.useful_examples, ctx.flops_ex, ctx.peak, s_max=mix.s_max,
        b_max=mix.b_max, padding_efficiency=figures.padded_efficiency(
            mix.batch_size, mix.steps), compile_s=cs, first_run_s=first,
        memory=memory, memory_note="compiled for all clients",
        timed_clients=k, extrapolated=None if k == K else (
            f"timed on the first {k} of {K} clients (same s_max, b_max), "
            f"scaled by {K / k:g}: its work K * s_max * b_max is linear "
            "in K"))
  return Method(functools.partial(compiled, *part.args), finish)


def naive_method(w: Workload, ctx: Ctx) -> Method:
  """The naive loop; on the first jobs (time scaled by examples) above
  ``ctx.naive_max_steps`` steps."""
  mix, naive = w.mix, baselines.NaiveLoop(w.model)
  total = int(mix.steps.sum())
  only = None
  if total > ctx.naive_max_steps:
    n = int(np.searchsorted(np.cumsum(mix.steps), ctx.naive_max_steps)) + 1
    only = list(range(min(n, mix.num_jobs)))
  run = functools.partial(naive, w.params, w.data, w.jobs, only)
  _, cold = harness.timed_call(run)
  sub = mix if only is None else mix.subset(len(only))
  factor = mix.useful_examples / sub.useful_examples
  ctx.log(f"  naive loop: cold round {cold:.2f}s"
          + ("" if only is None else f" ({len(only)} of {mix.num_jobs} "
             "clients)"))

  def finish(st):
    compile_s = max(0.0, cold - st["median"])
    st = st if only is None else harness.scaled(st, factor)
    return figures.entry(
        st, mix.useful_examples, ctx.flops_ex, ctx.peak,
        padding_efficiency=1.0, cold_round_s=cold * factor,
        compile_s=compile_s, distinct_batch_sizes=len(set(mix.batch_size)),
        steps_per_round=total, timed_clients=sub.num_jobs,
        memory=harness.memory_of(naive.step_compiled(w.params, w.data,
                                                     mix.b_max)),
        memory_note="one step at b_max", extrapolated=None if only is None
        else (f"timed on the first {sub.num_jobs} of {mix.num_jobs} "
              f"clients ({sub.useful_examples} examples), scaled by "
              f"{factor:.3g}"))
  return Method(run, finish)


def reference_method(w: Workload, mu: int, ctx: Ctx) -> Method:
  """:func:`fedjax_bsa.kernel.reference.reference_round` (with noise stats)."""
  alg = baselines.fedavg()
  run = lambda: reference.reference_round(
      baselines.loss_of(w.model), alg.client_tx, alg.client_init, *w.args,
      None, microbatch=mu)[0]
  _, cold = harness.timed_call(run)
  ctx.log(f"  reference_round: cold round {cold:.1f}s")

  def finish(st):
    return figures.entry(
        st, w.mix.useful_examples, ctx.flops_ex, ctx.peak,
        padding_efficiency=1.0, cold_round_s=cold,
        note="per-job loop with exact shapes that also computes the noise "
             "statistics (a jitted gradient per microbatch, norms on the "
             "host); compare with kernel_noise_stats")
  return Method(run, finish)


def mesh_method(w: Workload, lanes: int, mu: int, mesh, ctx: Ctx) -> Method:
  """The kernel with its lanes split over ``mesh``'s ``clients`` axis."""
  fn = baselines.kernel_fn(w.model, microbatch=mu, lanes=lanes, mesh=mesh)
  compiled, cs = harness.compile_timed(fn, *w.args)
  out, _ = harness.timed_call(compiled, *w.args)
  return kernel_method(
      w, compiled, ctx, lanes=lanes, microbatch=mu,
      devices=int(mesh.devices.size), compile_s=cs,
      padding_efficiency=figures.kernel_efficiency(out, mu),
      memory=harness.memory_of(compiled))


def compare(methods: dict, ctx: Ctx, between: Callable | None = None):
  """Times ``methods`` interleaved (``ctx.reps`` each, twice around
  ``between()`` when given) and returns ``({name: entry}, between's
  result)``."""
  fns = {k: m.fn for k, m in methods.items()}
  t = harness.interleaved(fns, ctx.reps)
  extra = None
  if between is not None:
    extra = between()
    t2 = harness.interleaved(fns, ctx.reps)
    t = {k: t[k] + t2[k] for k in t}
  return ({k: m.finish(harness.summarize(t[k])) for k, m in methods.items()},
          extra)
