"""The round-kernel benchmark: the lane-packed kernel against its baselines.

  fedjax-bsa bench kernel [--quick] [--out DIR] [--mixes standard,large,...]

Mixes (:mod:`fedjax_bsa.bench.kernel.scenarios`): standard (64 clients),
large (1024), uniform (FedJAX's 64 x 256 rows, batch 10, one epoch), cnn1d
and cnn2d. On each, in one process and after warm-up, interleaved
round-robin (:mod:`fedjax_bsa.bench.kernel.per_mix`): a lane sweep of the
kernel over ``(lanes, microbatch)``, then the headline kernel against the
kernel with noise statistics, the padded layout, the naive loop (subsets
scaled up when too big), on the standard mix also the unquantized plan and
(full runs) :func:`fedjax_bsa.kernel.reference.reference_round`, on the
uniform mix FedJAX 0.0.17 in its own venv (``--fedjax-python``; the runner
script is the repository's ``benchmarks/fedjax_uniform.py``, not installed
with the package, or ``--fedjax-script``; null when either is absent).
Then the compile test (:func:`fedjax_bsa.bench.kernel.checks.compile_test`)
and, with ``--check``, the kernel against the reference first.

Figures: :mod:`fedjax_bsa.bench.kernel.figures`; the matmul peak is
measured at the start and at the end, the faster kept (other processes only
lower it). Writes ``round_kernel_<machine>[_quick].json`` and ``.md`` into
``--out`` (default ``benchmarks/results``) when it has finished; a run cut
short writes nothing (the rule of ``benchmarks/README.md``).
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import numpy as np

from fedjax_bsa.bench import harness
from fedjax_bsa.bench.kernel import baselines
from fedjax_bsa.bench.kernel import checks
from fedjax_bsa.bench.kernel import figures
from fedjax_bsa.bench.kernel import methods as km
from fedjax_bsa.bench.kernel import per_mix
from fedjax_bsa.bench.kernel import report as kernel_report
from fedjax_bsa.bench.kernel import scenarios as sc

__all__ = ["main", "default_settings", "build_mix"]

MIXES = ("standard", "large", "uniform", "cnn1d", "cnn2d")
# (lanes, microbatches) per mix and machine kind.
_GRIDS = {
    "quick": {"standard": ([2, 4], [16]), "large": ([4], [16]),
              "uniform": ([2], [10]), "cnn1d": ([2], [16]),
              "cnn2d": ([2], [16])},
    "cpu": {"standard": ([4, 8, 16, 32], [16]), "large": ([8, 16, 64], [16]),
            "uniform": ([8, 16, 64], [10, 16]), "cnn1d": ([8, 16, 64], [16]),
            "cnn2d": ([4, 8, 16], [16])},
    "gpu": {"standard": ([16, 64, 256], [4, 16]),
            "large": ([16, 64, 256], [4, 16]),
            "uniform": ([16, 64], [10, 16]), "cnn1d": ([64, 256], [16]),
            "cnn2d": ([16, 64], [16])},
}


def build_mix(name: str, quick: bool, quantize: bool = True) -> sc.Mix:
  """The mix ``name`` at full or quick size (``quantize``: standard only)."""
  if name == "standard":
    return sc.standard_mix(6, max_examples=256, quantize=quantize) if quick \
        else sc.standard_mix(quantize=quantize)
  if name == "large":
    return sc.standard_mix(16, max_examples=128, name="large") if quick else (
        sc.large_mix())
  if name == "uniform":
    return sc.uniform_mix(8) if quick else sc.uniform_mix()
  if name == "cnn1d":
    return sc.cnn1d_mix(8, max_examples=128) if quick else sc.cnn1d_mix()
  if name == "cnn2d":
    return sc.cnn2d_mix(4, rows=16, max_examples=32) if quick else (
        sc.cnn2d_mix())
  raise ValueError(f"mix {name!r} is not allowed: one of {', '.join(MIXES)}")


def _ints(text):
  return [int(v) for v in text.split(",") if v] if text else None


def _parser():
  p = argparse.ArgumentParser(prog="fedjax-bsa bench kernel",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes, 2 "
                 "repetitions, no FedJAX, noise stats on the standard mix "
                 "only (a smoke test)")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="round_kernel_<machine>[_quick].json and .md: "
                 + harness.OUT_HELP)
  p.add_argument("--mixes", default=None, help="comma list of "
                 f"{','.join(MIXES)} (default: standard,large,uniform; "
                 "quick: standard,uniform)")
  p.add_argument("--reps", type=int, default=None,
                 help="timed repetitions per method (default 7, GPU 5, "
                 "quick 2)")
  p.add_argument("--large-reps", type=int, default=None,
                 help="repetitions on the large and cnn mixes (default "
                 "min(reps, 5), GPU 3)")
  p.add_argument("--lanes", default=None, help="lane counts of every "
                 "mix's sweep (default: per mix and machine)")
  p.add_argument("--microbatches", default=None, help="microbatches of "
                 "every mix's sweep (default: per mix and machine)")
  p.add_argument("--rounds", type=int, default=None,
                 help="random plans of the compile test (default 50, "
                 "quick 5)")
  p.add_argument("--fedjax-python", default=None, metavar="PATH",
                 help="python of a FedJAX 0.0.17 venv (default "
                 "$FEDJAX_PYTHON or /tmp/fjvenv/bin/python)")
  p.add_argument("--fedjax-script", default=None, metavar="PATH",
                 help="FedJAX's runner (default: the repository's "
                 "benchmarks/fedjax_uniform.py under the working folder or "
                 "beside the package's source; not installed with the "
                 "package: FedJAX is skipped without it)")
  p.add_argument("--no-fedjax", action="store_true",
                 help="do not time FedJAX 0.0.17 (never timed with "
                 "--quick)")
  p.add_argument("--check", action="store_true", help="first check the "
                 "kernel against the reference loop (exit 1 if different)")
  p.add_argument("--reference", action=argparse.BooleanOptionalAction,
                 default=None, help="time reference_round on the standard "
                 "mix (default: on CPU full runs)")
  p.add_argument("--padded-max-slots", type=float, default=None,
                 help="time the padded layout on a client subset above "
                 "this many example slots (default 2.5e6 CPU, 4e8 GPU)")
  p.add_argument("--naive-max-steps", type=int, default=None,
                 help="time the naive loop on a client subset above this "
                 "many steps (default 20000 CPU, 4000 GPU, quick 20)")
  p.add_argument("--cpu-devices", type=int, default=1, help="CPU: also time "
                 "the kernel's lanes over this many forced host devices")
  p.add_argument("--machine", default=None, help="override the machine name")
  return p


def default_settings(args, gpu: bool) -> dict:
  """Every size and limit of the run, from the arguments and the device."""
  quick = args.quick
  kind = "quick" if quick else ("gpu" if gpu else "cpu")
  reps = args.reps or (2 if quick else 5 if gpu else 7)
  mixes = (args.mixes.split(",") if args.mixes else
           ["standard", "uniform"] if quick else
           ["standard", "large", "uniform"])
  for m in mixes:
    if m not in MIXES:
      raise SystemExit(f"--mixes {m}: not allowed, one of {','.join(MIXES)}")
  grids = {}
  for m in mixes:
    lanes, mus = _GRIDS[kind][m]
    lanes, mus = _ints(args.lanes) or lanes, _ints(args.microbatches) or mus
    grids[m] = [(L, mu) for mu in mus for L in lanes]
  fj = script = None
  if not (args.no_fedjax or quick):
    fj = (args.fedjax_python or os.environ.get("FEDJAX_PYTHON")
          or baselines.DEFAULT_FEDJAX_PYTHON)
    script = baselines.fedjax_script(args.fedjax_script)
  return dict(
      quick=quick, kind=kind, reps=reps, mixes=mixes, grids=grids,
      large_reps=args.large_reps or (2 if quick else 3 if gpu else
                                     min(reps, 5)),
      compile_test_rounds=args.rounds if args.rounds is not None else (
          5 if quick else 50),
      padded_max_slots=args.padded_max_slots or (4e8 if gpu else 2.5e6),
      naive_max_steps=args.naive_max_steps or (
          20 if quick else 4000 if gpu else 20000),
      reference=(args.reference if args.reference is not None
                 else not (quick or gpu)),
      fedjax_python=fj, fedjax_script=script, cpu_devices=args.cpu_devices,
      check=args.check)


def _run_mix(name: str, st: dict, peak: float, mesh, log) -> dict:
  """Benchmarks one mix; returns its report entry (on the standard mix
  also the compile test's)."""
  mix = build_mix(name, st["quick"])
  w = km.workload(mix)
  flops_ex, formula = figures.flops_per_example(w.model, w.params)
  reps = st["reps"] if name in ("standard", "uniform") else st["large_reps"]
  ctx = km.Ctx(reps, peak, flops_ex, st["padded_max_slots"],
               st["naive_max_steps"], log)
  if name == "uniform":
    res = per_mix.bench_uniform(w, st["grids"][name], ctx,
                                fedjax_python=st["fedjax_python"],
                                fedjax_script=st["fedjax_script"])
  else:
    other = {}
    if name == "standard":
      other["kernel_unquantized"] = build_mix(name, st["quick"], False)
    res, kern = per_mix.bench_mix(
        w, st["grids"][name], ctx, other_plans=other,
        noise_stats=name == "standard" or not st["quick"],
        with_reference=st["reference"] and name == "standard",
        mesh=mesh if name == "standard" else None)
    if name == "standard":
      res["compile_test"] = checks.compile_test(
          w, kern, mu=res["microbatch"], rounds=st["compile_test_rounds"])
      res["compiles"] = res["compile_test"]["compiles"]
      log(f"  compiles over {st['compile_test_rounds']} random plans: "
          f"{res['compiles']}")
  res["flops_formula"] = formula
  return res


def _force_cpu_devices(n: int) -> None:
  """Asks XLA for ``n`` host devices (before the backend starts)."""
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = (
        f"{flags} --xla_force_host_platform_device_count={n}").strip()
  if jax.devices()[0].platform == "cpu" and jax.device_count() < n:
    raise SystemExit(f"--cpu-devices={n}: JAX already started with "
                     f"{jax.device_count()} device(s); run in a fresh "
                     "process")


def _large_vs_standard(report: dict) -> None:
  s, lg = report["mixes"].get("standard"), report["mixes"].get("large")
  if s and lg:
    tr = (lg["kernel"]["time_per_round_s"]["median"] /
          s["kernel"]["time_per_round_s"]["median"])
    er = lg["mix"]["useful_examples"] / s["mix"]["useful_examples"]
    report["large_vs_standard"] = {
        "time_ratio": tr, "examples_ratio": er,
        "time_per_example_ratio": tr / er,
        "note": "near 1: the cost grows linearly with the examples"}


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  args.out = harness.results_dir(args.out, args.quick)
  if args.cpu_devices > 1:
    _force_cpu_devices(args.cpu_devices)
  gpu = jax.devices()[0].platform != "cpu"
  st = default_settings(args, gpu)
  log = functools.partial(print, flush=True)
  report = harness.new_report("round_kernel", st)
  if args.machine:
    report["machine"]["name"] = args.machine
  stem = f"round_kernel_{report['machine']['name']}" + (
      "_quick" if st["quick"] else "")
  log(f"round-kernel benchmark on {report['machine']['name']} "
      f"({jax.devices()[0].device_kind})")
  if st["check"]:
    report["check"] = checks.check_against_reference()
    log(f"check vs reference_round: {report['check']['ok']}")
    if not report["check"]["ok"]:
      harness.write_report(report, args.out, stem)
      return 1
  size = (512, 3) if st["quick"] else (2048, 7)
  report["matmul_peak"] = dict(harness.matmul_peak(*size),
                               measured="at the start")
  peak = report["matmul_peak"]["flops_per_s"]
  log(f"matmul peak: {peak / 1e9:.1f} GFLOP/s")
  mesh = None
  if args.cpu_devices > 1 and not gpu:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:args.cpu_devices]),
                             ("clients",))
  report["mixes"] = {}
  for name in st["mixes"]:
    log(f"{name} mix")
    res = report["mixes"][name] = _run_mix(name, st, peak, mesh, log)
    if "compile_test" in res:
      report["compile_test"] = dict(res.pop("compile_test"),
                                    lanes=res["lanes"], mix=name)
    _large_vs_standard(report)
    report["headline"] = kernel_report.headline(report)
  end = harness.matmul_peak(*size)
  report["matmul_peak_start"] = report["matmul_peak"]
  report["matmul_peak_end"] = end
  if end["flops_per_s"] > peak:
    report["matmul_peak"] = dict(end, measured="at the end (faster)")
    figures.apply_peak(report["mixes"], end["flops_per_s"])
  report["headline"] = kernel_report.headline(report)
  md = kernel_report.markdown(harness.finish_report(report))
  path = harness.write_report(report, args.out, stem, md)
  log(md)
  log(f"wrote {path} and .md ({report['wall_s']:.0f}s)")
  return 0

