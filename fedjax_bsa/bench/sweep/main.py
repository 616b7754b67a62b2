"""Sweep benchmark: E experiments as one packed sweep vs E separate runs.

  fedjax-bsa bench sweep [--quick] [--experiments 8] [--out DIR]

The E experiments differ in seed and client learning rate
(:func:`overrides`). For each controller (the adaptive ``noise_scale`` and
a ``constant`` batch) two measures, each interleaved over repetitions:

* **compiled loop only**: one chunk of ``--rounds`` rounds after
  ``--skip-chunks`` untimed ones (so that adaptive batches have grown),
  compile excluded (every program is warmed up first, compile times
  reported apart). *packed*: the sweep's program
  (:func:`fedjax_bsa.run.driver.prepare` of all E; every experiment's client
  jobs share one lane pool). *sequential*: each experiment's own
  single-run program called in turn (one compile serves them all when
  their shapes agree).
* **end to end**: what a user waits for: :func:`fedjax_bsa.run.sweep.
  run_sweep` of the E experiments against E :func:`fedjax_bsa.run.runner.run`
  calls one after another, each building its inputs, compiling, running
  ``--e2e-rounds`` rounds and evaluating every ``eval_every``; in one
  process, no output files, one device.

Speedup = sequential time / packed time. Every controller's compiled loop
is measured first, then the whole runs; ``sweep_<machine>[_quick].json``
and ``.md`` are written into ``--out`` when it has finished (a run cut
short writes nothing: the rule of ``benchmarks/README.md``).

The full run (8 experiments, both controllers) is
``fedjax-bsa bench sweep``; ``--quick`` is the same at a few rounds and
repetitions.
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import numpy as np

from fedjax_bsa.bench import harness
from fedjax_bsa.core.config import Config, parse_assignments
from fedjax_bsa.run import driver
from fedjax_bsa.run import runner
from fedjax_bsa.run import sweep as sweep_lib

__all__ = ["overrides", "compiled_loop", "end_to_end", "main"]

TARGETS = {"compiled_loop": 3.0, "end_to_end": 5.0}
TARGET_EXPERIMENTS = 8


def overrides(n: int) -> list[dict]:
  """E experiments: seeds ``e // 2``, client learning rates 0.05 / 0.1.

  >>> overrides(3)
  [{'seed': 0, 'client_lr': 0.05}, {'seed': 0, 'client_lr': 0.1}, \
{'seed': 1, 'client_lr': 0.05}]
  """
  lrs = (0.05, 0.1)
  return [dict(seed=e // 2, client_lr=lrs[e % 2]) for e in range(n)]


def _shapes(tree):
  return jax.tree.structure(tree), [(a.shape, a.dtype)
                                    for a in jax.tree.leaves(tree)]


def _chunk_call(pre, run_chunk, left, skip: int = 0):
  """``fn()`` running one chunk with ``run_chunk`` from ``pre``'s state
  after ``skip`` untimed chunks (an adaptive controller's batches have
  grown by then); the first call compiles."""
  state = pre.init(pre.keys, pre.data, pre.inputs)
  for _ in range(skip):
    state, _ = run_chunk(state, pre.data, pre.inputs, left)
  state = jax.block_until_ready(state)
  return lambda: run_chunk(state, pre.data, pre.inputs, left)


def _metrics_of(out) -> dict:
  m = out[1]
  return {"padding_efficiency": float(np.mean(m.padding_efficiency)),
          "mean_batch": float(np.mean(m.mean_batch_size)),
          "max_batch": float(np.max(m.max_batch_size)),
          "examples_per_round": float(np.mean(np.sum(
              np.asarray(m.examples), axis=0)))}


def compiled_loop(base: Config, ovs: list[dict], reps: int, log,
                  skip: int = 0) -> dict:
  """Packed vs sequential, one chunk of ``base.rounds`` rounds each after
  ``skip`` untimed chunks, compile excluded."""
  left = np.int32(base.rounds)

  def warm(pre, run_chunk):
    """``(fn, its first output, seconds to build its state and compile)``"""
    t0 = time.perf_counter()
    fn = _chunk_call(pre, run_chunk, left, skip)
    out = jax.block_until_ready(fn())
    return fn, out, time.perf_counter() - t0

  packed = driver.prepare(base, ovs, mesh=None)
  p_fn, p_out, p_compile = warm(packed, packed.run_chunk)
  seqs = [driver.prepare(base, [o], mesh=None) for o in ovs]
  first = _shapes((seqs[0].data, seqs[0].inputs))
  fns, s_compile = [], []
  for pre in seqs:
    shared = _shapes((pre.data, pre.inputs)) == first
    fn, _, secs = warm(pre, (seqs[0] if shared else pre).run_chunk)
    s_compile.append(secs)
    fns.append(fn)
  run_all = lambda: [jax.block_until_ready(f()) for f in fns]
  t = harness.interleaved({"packed": p_fn, "sequential": run_all}, reps)
  st = {k: harness.summarize(v) for k, v in t.items()}
  work = len(ovs) * base.rounds
  out = {"experiments": len(ovs), "rounds": base.rounds,
         "timed_rounds": [skip * base.rounds + 1,
                          (skip + 1) * base.rounds],
         "setup_note": "setup_s: compile, the untimed chunks and the first "
                       "timed chunk (per experiment for sequential)",
         "packed": dict(st["packed"], lanes=packed.sim.lanes,
                        setup_s=p_compile,
                        compiles=len(packed.sim.traces),
                        **_metrics_of(p_out)),
         "sequential": dict(st["sequential"], lanes=seqs[0].sim.lanes,
                            setup_s=s_compile,
                            compiles=sum(len(p.sim.traces) for p in seqs))}
  for k in ("packed", "sequential"):
    out[k]["experiment_rounds_per_s"] = work / st[k]["median"]
  out["speedup"] = st["sequential"]["median"] / st["packed"]["median"]
  log(f"  compiled loop, E={len(ovs)}: packed {st['packed']['median']:.3f}"
      f" s, sequential {st['sequential']['median']:.3f} s, speedup "
      f"{out['speedup']:.2f}x")
  return out


def end_to_end(base: Config, ovs: list[dict], reps: int, log) -> dict:
  """Whole runs: one :func:`run_sweep` vs E :func:`runner.run` calls."""
  def packed():
    sweep_lib.run_sweep(base, ovs, None, print_table=False, mesh=None)

  def sequential():
    for o in ovs:
      runner.run(base.replace(**o), None, print_table=False, mesh=None)

  t = {"packed": [], "sequential": []}
  for _ in range(reps):
    for name, fn in (("packed", packed), ("sequential", sequential)):
      t0 = time.perf_counter()
      fn()
      t[name].append(time.perf_counter() - t0)
  st = {k: harness.summarize(v) for k, v in t.items()}
  work = len(ovs) * base.rounds
  out = {"experiments": len(ovs), "rounds": base.rounds,
         "eval_every": base.eval_every}
  for k in st:
    out[k] = dict(st[k], experiment_rounds_per_s=work / st[k]["median"])
  out["speedup"] = st["sequential"]["median"] / st["packed"]["median"]
  log(f"  end to end, E={len(ovs)}, {base.rounds} rounds: packed "
      f"{st['packed']['median']:.1f} s, sequential "
      f"{st['sequential']['median']:.1f} s, speedup {out['speedup']:.2f}x")
  return out


def _parser():
  p = argparse.ArgumentParser(prog="fedjax-bsa bench sweep",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="a smoke test within 90 s on 2 cores: 4 experiments, "
                 "the constant controller, 5 rounds, 2 repetitions, end to "
                 "end once")
  p.add_argument("--experiments", type=int, default=None,
                 help="experiments in the sweep, run packed and one after "
                 f"another (default {TARGET_EXPERIMENTS}, quick 4)")
  p.add_argument("--controllers", default=None,
                 help="comma list of controllers, each timed separately "
                 "(default noise_scale,constant; quick constant)")
  p.add_argument("--rounds", type=int, default=None,
                 help="rounds of the timed chunk (default 10, quick 5)")
  p.add_argument("--reps", type=int, default=None,
                 help="repetitions of the compiled loop (default 7, quick 2)")
  p.add_argument("--skip-chunks", type=int, default=None,
                 help="untimed chunks before the timed one, so that adaptive "
                 "batches have grown (default 2, quick 0)")
  p.add_argument("--measures", default="compiled_loop,end_to_end",
                 help="which measures to take (comma list)")
  p.add_argument("--e2e-rounds", type=int, default=None,
                 help="rounds of each whole run (default 30, quick 5)")
  p.add_argument("--e2e-reps", type=int, default=None,
                 help="repetitions of the whole runs (default 3, quick 1)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a setting of the base config (repeatable)")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="sweep_<machine>[_quick].json and .md: "
                 + harness.OUT_HELP)
  p.add_argument("--machine", default=None, help="the machine's name in "
                 "the file name (default: from the device, e.g. cpu-2core)")
  return p


def _settings(args) -> dict:
  q = args.quick
  for m in args.measures.split(","):
    if m and m not in TARGETS:
      raise SystemExit(f"--measures {m}: not allowed, one of "
                       f"{','.join(TARGETS)}")
  ctrls = args.controllers or ("constant" if q else "noise_scale,constant")
  return dict(
      quick=q, experiments=args.experiments or (4 if q else
                                                TARGET_EXPERIMENTS),
      controllers=[c for c in ctrls.split(",") if c],
      rounds=args.rounds or (5 if q else 10), reps=args.reps or (2 if q else 7),
      skip_chunks=(args.skip_chunks if args.skip_chunks is not None
                   else 0 if q else 2),
      measures=[m for m in args.measures.split(",") if m],
      e2e_rounds=args.e2e_rounds or (5 if q else 30),
      e2e_reps=args.e2e_reps or (1 if q else 3), set=list(args.set))


def headline(report: dict) -> dict:
  """Speedups per controller and measure, and the targets at E = 8."""
  h = {}
  for ctrl, r in report["results"].items():
    for measure in ("compiled_loop", "end_to_end"):
      if measure in r:
        sp = r[measure]["speedup"]
        h[f"{ctrl}: {measure} speedup (E={r[measure]['experiments']})"] = sp
        if r[measure]["experiments"] == TARGET_EXPERIMENTS:
          h[f"{ctrl}: {measure} target >= {TARGETS[measure]}x met"] = (
              sp >= TARGETS[measure])
  return h


def markdown(report: dict) -> str:
  m = report["machine"]
  lines = [f"# Sweep benchmark: {m['name']}", "",
           f"{m.get('cpu_model', m['device_kind'])}, {m['cpu_count']} CPU "
           f"cores, jax {report['versions']['jax']}, {report['timestamp']}."
           f" Load average start/end: {report['loadavg_start']} / "
           f"{report.get('loadavg_end')}.", "",
           "Settings: " + ", ".join(f"{k}={v}" for k, v in
                                    report["settings"].items()), "",
           "| controller | measure | E | rounds | packed s | sequential s |"
           " speedup |", "|---|---|---|---|---|---|---|"]
  for ctrl, r in report["results"].items():
    for measure in ("compiled_loop", "end_to_end"):
      if measure in r:
        x = r[measure]
        lines.append(
            f"| {ctrl} | {measure.replace('_', ' ')} | {x['experiments']} |"
            f" {x['rounds']} | {x['packed']['median']:.3f} | "
            f"{x['sequential']['median']:.3f} | {x['speedup']:.2f}x |")
  lines += ["", "Times: median of the repetitions (min and max in the "
            "JSON). Compiled loop: compile excluded; end to end: build, "
            "compile, rounds and evaluation.", ""]
  lines += [f"- {k}: {v:.3g}" if isinstance(v, float) else f"- {k}: {v}"
            for k, v in report.get("headline", {}).items()]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  args.out = harness.results_dir(args.out, args.quick)
  st = _settings(args)
  log = functools.partial(print, flush=True)
  report = harness.new_report("sweep", st)
  if args.machine:
    report["machine"]["name"] = args.machine
  stem = f"sweep_{report['machine']['name']}" + ("_quick" if st["quick"]
                                                else "")
  given = parse_assignments(st["set"])
  ovs = overrides(st["experiments"])
  report["overrides"], report["results"] = ovs, {}
  # every controller's compiled loop first, then the (slow) whole runs
  for measure in [m for m in TARGETS if m in st["measures"]]:
    for ctrl in st["controllers"]:
      log(f"controller {ctrl}")
      base = Config(progress=False, controller=ctrl).replace(**given)
      res = report["results"].setdefault(ctrl, {})
      res.setdefault("config", base.to_dict())
      if measure == "compiled_loop":
        res[measure] = compiled_loop(
            base.replace(rounds=st["rounds"], eval_every=st["rounds"]), ovs,
            st["reps"], log, st["skip_chunks"])
      else:
        res[measure] = end_to_end(
            base.replace(rounds=st["e2e_rounds"],
                         eval_every=min(10, st["e2e_rounds"])), ovs,
            st["e2e_reps"], log)
      report["headline"] = headline(report)
  md = markdown(harness.finish_report(report))
  path = harness.write_report(report, args.out, stem, md)
  log(md)
  log(f"wrote {path} and .md")
  return 0

