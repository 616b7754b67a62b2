"""One mix of the round-kernel benchmark, end to end.

:func:`bench_mix`: the lane sweep, then the headline kernel against the
kernel with noise statistics, the padded layout, the naive loop and the
extras the caller asks for. :func:`bench_uniform`: the same on the uniform
mix (microbatch = its batch for the best hand-tuned layout), plus the
kernel at the default settings a run gets (the microbatch and layout of
:func:`fedjax_bsa.kernel.layout.resolve_microbatch` and
:func:`fedjax_bsa.kernel.layout.choose`, noise estimates on) and the ceiling (a
plain vmapped scan over pre-gathered batches), with FedJAX timed between
two halves of the repetitions. Both return the mix's report entry.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_bsa.bench import harness
from fedjax_bsa.bench.kernel import baselines
from fedjax_bsa.bench.kernel import figures
from fedjax_bsa.bench.kernel import methods as km
from fedjax_bsa.bench.kernel import scenarios
from fedjax_bsa.kernel import layout as layout_lib
from fedjax_bsa.run import autotune

__all__ = ["bench_mix", "bench_uniform", "summary_fields"]


def _best_layout(sweep: dict):
  row = sweep["rows"][sweep["best"]]
  return row["lanes"], row["microbatch"]


def summary_fields(res: dict) -> dict:
  """The figures every mix reports, from its entries (in place)."""
  k = res["kernel"]
  med = lambda name: res[name]["time_per_round_s"]["median"]
  res["padding_efficiency"] = k["padding_efficiency"]
  res["useful_examples_per_s"] = k["useful_examples_per_s"]
  res["fraction_of_matmul_peak"] = k["fraction_of_matmul_peak"]
  res["speedup_vs_padded"] = med("padded") / med("kernel")
  res["speedup_vs_naive_loop"] = med("naive_loop") / med("kernel")
  fj = res.get("fedjax")
  res["speedup_vs_fedjax"] = (med("fedjax") / med("kernel")
                              if isinstance(fj, dict) and
                              "time_per_round_s" in fj else None)
  if "kernel_noise_stats" in res:
    res["noise_stats_overhead"] = med("kernel_noise_stats") / med("kernel")
    res["speedup_vs_padded_noise_stats"] = (med("padded") /
                                            med("kernel_noise_stats"))
  if "reference_round" in res:
    res["speedup_vs_reference_round_noise_stats"] = (
        med("reference_round") / med("kernel_noise_stats"))
  if "kernel_mesh" in res:
    res["speedup_vs_naive_loop_mesh"] = med("naive_loop") / med(
        "kernel_mesh")
  res["peak_memory_bytes"] = {
      "kernel": figures.total_bytes(k),
      "kernel_noise_stats": figures.total_bytes(
          res.get("kernel_noise_stats")),
      "padded": figures.total_bytes(res["padded"]),
      "naive_loop_step": figures.total_bytes(res["naive_loop"]),
      "fedjax_process_rss": (fj or {}).get("peak_rss_bytes"),
      "process_peak_rss_so_far": harness.rss_bytes()}
  res.setdefault("compiles", 1)
  return res


def bench_mix(w: km.Workload, grid, ctx: km.Ctx, *, noise_stats=True,
              other_plans: dict | None = None, with_reference=False,
              mesh: Any = None) -> dict:
  """The lane sweep and the comparison on one mix.

  Args:
    w: the mix on device.
    grid: ``[(lanes, mu), ...]`` of the lane sweep.
    ctx: repetitions, peak, FLOPs per example, baseline size limits.
    noise_stats: also time the kernel with noise statistics.
    other_plans: ``{name: Mix}``, other plans of the same clients run by the
      headline kernel (same compile).
    with_reference: also time
    :func:`fedjax_bsa.kernel.reference.reference_round`. mesh: also time the
    kernel's lanes over this mesh.

  Returns:
    ``(entry, headline)``: the mix's report entry and the headline kernel
    (a :class:`~fedjax_bsa.bench.kernel.methods.Counted` jitted function).
  """
  sweep = km.lane_sweep(w, grid, ctx)
  lanes, mu = _best_layout(sweep)
  best = sweep["jitted"][sweep["best"]].fn
  methods = {"kernel": km.kernel_method(
      w, best, ctx, **{k: v for k, v in sweep["rows"][sweep["best"]].items()
                       if k not in ("time_per_round_s",
                                    "useful_examples_per_s", "flops_per_s",
                                    "fraction_of_matmul_peak")})}
  if noise_stats:
    methods["kernel_noise_stats"] = km.noise_method(w, lanes, mu, ctx)
  for name, mix in (other_plans or {}).items():
    methods[name] = km.plan_method(w, best, mix, mu, ctx)
  methods["padded"] = km.padded_method(w, ctx)
  methods["naive_loop"] = km.naive_method(w, ctx)
  if with_reference:
    methods["reference_round"] = km.reference_method(w, mu, ctx)
  if mesh is not None:
    methods["kernel_mesh"] = km.mesh_method(w, lanes, mu, mesh, ctx)
  entries, _ = km.compare(methods, ctx)
  res = {"mix": w.mix.summary(), "lane_sweep": sweep["rows"],
         "headline": sweep["best"], "lanes": lanes, "microbatch": mu,
         "lanes_rule": km.LANES_RULE, "flops_per_example": ctx.flops_ex}
  res.update(entries)
  return summary_fields(res), sweep["jitted"][sweep["best"]]


def bench_uniform(w: km.Workload, grid, ctx: km.Ctx, *,
                  fedjax_python: str | None,
                  fedjax_script: str | None = None) -> dict:
  """The uniform mix: headline microbatch = its batch size; FedJAX (in its
  own venv, when ``fedjax_python`` is given and it and ``fedjax_script``
  (:func:`~fedjax_bsa.bench.kernel.baselines.fedjax_script`) exist) timed
  between two halves of the repetitions of the other methods, all
  pooled."""
  batch = int(w.mix.batch_size[0])
  sweep = km.lane_sweep(w, grid, ctx, headline_mu=batch)
  best = sweep["best"]
  row = sweep["rows"][best]
  keep = {k: v for k, v in row.items() if k not in (
      "time_per_round_s", "useful_examples_per_s", "flops_per_s",
      "fraction_of_matmul_peak")}
  methods = {"kernel": km.kernel_method(w, sweep["jitted"][best].fn, ctx,
                                        **keep),
             "kernel_default": default_method(w, ctx),
             "ceiling": ceiling_method(w, ctx),
             "padded": km.padded_method(w, ctx),
             "naive_loop": km.naive_method(w, ctx)}
  between = None
  if fedjax_python:
    between = lambda: baselines.run_fedjax(
        fedjax_python, fedjax_script, w.mix, ctx.reps, scenarios.HIDDEN,
        log=ctx.log)
  entries, fj = km.compare(methods, ctx, between)
  res = {"mix": w.mix.summary(), "lane_sweep": sweep["rows"],
         "headline": best, "lanes": row["lanes"], "microbatch": batch,
         "lanes_rule": km.LANES_RULE + "; microbatch = the uniform batch",
         "flops_per_example": ctx.flops_ex}
  res.update(entries)
  if fj and "times_s" in fj:
    res["fedjax"] = figures.entry(
        harness.summarize(fj["times_s"]), w.mix.useful_examples,
        ctx.flops_ex, ctx.peak, **{k: v for k, v in fj.items()
                                   if k != "times_s"})
  else:
    res["fedjax"] = fj
  res = summary_fields(res)
  med = lambda name: res[name]["time_per_round_s"]["median"]
  res["default_layout"] = {k: res["kernel_default"][k] for k in (
      "lanes", "microbatch", "per_slot", "noise_stats")}
  res["speedup_vs_fedjax_default"] = (
      med("fedjax") / med("kernel_default")
      if res["speedup_vs_fedjax"] is not None else None)
  res["fraction_of_ceiling_default"] = med("ceiling") / med("kernel_default")
  res["fraction_of_ceiling"] = med("ceiling") / med("kernel")
  return res


def default_method(w: km.Workload, ctx: km.Ctx) -> km.Method:
  """The kernel as a run builds it with every layout setting at its
  default (``layout=measure``, noise estimates on): the candidates of
  :func:`fedjax_bsa.kernel.layout.candidates` timed on this workload by
  :func:`fedjax_bsa.run.autotune.search`, the fastest kept (its entry records
  every candidate's time)."""
  batch = int(w.mix.batch_size[0])
  cands = layout_lib.candidates(jax.default_backend(), len(w.mix.clients),
                                batch, True)
  build = lambda lanes, mu, r: baselines.kernel_fn(
      w.model, microbatch=mu, lanes=lanes, per_slot=r, noise_stats=True)
  best, timings, _ = autotune.search(build, w.args, cands, log=ctx.log)
  lanes, mu, r = cands[best]
  ctx.log(f"  kernel at the default settings: L{lanes} mu{mu} R{r}, "
          f"noise estimates on (measured: {autotune.describe(timings)})")
  m = km.noise_method(w, lanes, mu, ctx, per_slot=r)
  return m._replace(finish=lambda st: dict(m.finish(st), layout_candidates=[
      dict(lanes=a, microbatch=b, per_slot=c, round_s=t)
      for a, b, c, t in timings]))


def ceiling_method(w: km.Workload, ctx: km.Ctx) -> km.Method:
  """The same round as a plain vmapped ``lax.scan`` over batches gathered
  before the clock starts (:func:`~fedjax_bsa.bench.kernel.baselines.
  ceiling_fn`)."""
  batch, steps = int(w.mix.batch_size[0]), int(w.mix.steps[0])
  xs, ys = baselines.gather_batches(w.data, w.jobs, steps, batch)
  fn = baselines.ceiling_fn(w.model)
  args = (w.params, xs, ys, jnp.asarray(w.mix.lr), jnp.asarray(
      w.mix.weights))
  compiled, cs = harness.compile_timed(fn, *args)
  ctx.log(f"  ceiling (vmapped scan, pre-gathered): compiled in {cs:.1f}s")

  def finish(st):
    return figures.entry(st, w.mix.useful_examples, ctx.flops_ex, ctx.peak,
                         compile_s=cs)
  return km.Method(functools.partial(compiled, *args), finish)
