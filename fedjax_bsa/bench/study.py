"""The study: does noise-scale batch adaptation reach target accuracy sooner?

Methods x Dirichlet alpha x resources x seeds, on digits (MLP) and MNIST-1D
(1-D CNN). Each (dataset, method) is one vmapped sweep over alpha, resources
and seeds (one compile), so the whole study is a handful of compiled
programs. Per cell (dataset, alpha, resources, method) it reports, over
seeds: simulated time and rounds to the target accuracy, final accuracy
(mean +- std), examples computed and bytes communicated. The target is 95%
of the best final accuracy any method reaches on that dataset; because the
most non-IID cells may never reach a dataset-wide target, a per-cell target
(95% of the best final accuracy in that cell) is reported too.

  fedjax-bsa study --quick      # CI: minutes
  fedjax-bsa study              # full (see README)
  python -m benchmarks.time_to_accuracy [--quick]   (from the repository)

This module is self-contained (it uses only the public sweep API), so the
study's design can be replaced without touching the other benchmarks.

Writes ``benchmarks/results/time_to_accuracy.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

METHODS = {
    "fedavg_b8": dict(controller="constant", batch_size=8),
    "fedavg_b32": dict(controller="constant", batch_size=32),
    "fedavg_b128": dict(controller="constant", batch_size=128),
    "fednova_b32": dict(controller="constant", batch_size=32,
                        algorithm="fednova"),
    "adabatch": dict(controller="schedule", schedule="doubling",
                     batch_size=8, batch_max=128),
    "resource_prop": dict(controller="resource_proportional", batch_size=32),
    "noise_scale": dict(controller="noise_scale", batch_size=8,
                        batch_min=8, batch_max=128),
    "noise_scale_fednova": dict(controller="noise_scale", batch_size=8,
                                batch_min=8, batch_max=128,
                                algorithm="fednova"),
}
FIXED = ("fedavg_b8", "fedavg_b32", "fedavg_b128")
RESOURCES = {
    "homogeneous": dict(speed_sigma=0.0, memory_sigma=0.0, memory_cap=256),
    "heterogeneous": dict(speed_sigma=1.0, memory_sigma=1.0, memory_cap=64),
}
DATASETS = {
    "digits": dict(dataset="digits", num_clients=50, clients_per_round=10,
                   min_examples=5, hidden=256, client_lr=0.1),
    "mnist1d": dict(dataset="mnist1d", num_examples=20000, num_clients=200,
                    clients_per_round=20, min_examples=2, client_lr=0.1),
}
COMMON = dict(local_work="epochs", local_epochs=1.0, microbatch=4, resources="lognormal",
              eval_every=5, progress=False, noise_stats=True)


def _modes(quick: bool):
  if quick:
    return dict(datasets=["digits"], methods=["fedavg_b32", "noise_scale"],
                alphas=[0.5], resources=["heterogeneous"], seeds=[0],
                rounds={"digits": 10})
  return dict(datasets=list(DATASETS), methods=list(METHODS),
              alphas=[0.1, 0.5, 10.0], resources=list(RESOURCES),
              seeds=[0, 1, 2], rounds={"digits": 100, "mnist1d": 40})


def _first_reach(records, target, key):
  for r in records:
    if r["test_accuracy"] is not None and r["test_accuracy"] >= target:
      return r[key]
  return None


def _bytes_and_examples(exp_dir, model_bytes):
  clients = np.load(os.path.join(exp_dir, "clients.npz"))
  took = clients["steps"] > 0
  examples = int((clients["batch"] * clients["steps"] * took).sum())
  return examples, int(took.sum()) * 2 * model_bytes


def run_group(dataset, method, mode, out_root):
  """One (dataset, method) sweep over alpha x resources x seeds."""
  from fedjax_bsa import experiment, sweep  # pylint: disable=g-import-not-at-top
  from fedjax_bsa.config import Config  # pylint: disable=g-import-not-at-top
  base = Config().replace(**COMMON, **DATASETS[dataset], **METHODS[method],
                          rounds=mode["rounds"][dataset])
  if base.controller == "schedule":
    base = base.replace(schedule_every=max(1, base.rounds // 4))
  overrides, cells = [], []
  for alpha in mode["alphas"]:
    for res in mode["resources"]:
      for seed in mode["seeds"]:
        overrides.append(dict(alpha=alpha, seed=seed, **RESOURCES[res]))
        cells.append((alpha, res, seed))
  out_dir = os.path.join(out_root, f"{dataset}_{method}")
  t0 = time.perf_counter()
  result = sweep.run_sweep(base, overrides, out_dir, print_table=False)
  wall = time.perf_counter() - t0
  mbytes = experiment.build(base.replace(**overrides[0])).model_bytes
  runs = []
  for e, ((alpha, res, seed), recs) in enumerate(zip(cells,
                                                     result.records)):
    examples, nbytes = _bytes_and_examples(
        os.path.join(out_dir, f"exp_{e:03d}"), mbytes)
    runs.append(dict(alpha=alpha, resources=res, seed=seed, records=recs,
                     examples=examples, bytes=nbytes))
  return dict(runs=runs, wall_s=wall, compiles=result.compiles)


def _mean_std(xs):
  xs = [x for x in xs if x is not None]
  if not xs:
    return None, None
  return float(np.mean(xs)), float(np.std(xs))


def summarize(results, mode):
  """Cells, targets, speedups and the published-trend checks."""
  cells, targets = [], {}
  for ds in mode["datasets"]:
    finals = {}
    for m in mode["methods"]:
      for r in results[ds][m]["runs"]:
        finals.setdefault((m, r["alpha"], r["resources"]), []).append(
            r["records"][-1]["test_accuracy"] or 0.0)
    best = max(np.mean(v) for v in finals.values())
    targets[ds] = 0.95 * best
    for alpha in mode["alphas"]:
      for res in mode["resources"]:
        cell_best = max(np.mean(finals[(m, alpha, res)])
                        for m in mode["methods"])
        for m in mode["methods"]:
          runs = [r for r in results[ds][m]["runs"]
                  if r["alpha"] == alpha and r["resources"] == res]
          row = dict(dataset=ds, alpha=alpha, resources=res, method=m)
          for name, tgt in (("", targets[ds]), ("cell_", 0.95 * cell_best)):
            t = [_first_reach(r["records"], tgt, "sim_time_s") for r in runs]
            k = [_first_reach(r["records"], tgt, "round") for r in runs]
            reached = [x for x in t if x is not None]
            row[f"{name}target"] = tgt
            row[f"{name}reached"] = f"{len(reached)}/{len(runs)}"
            # a seed that never reaches counts as not reached: the mean is
            # over seeds only when all reach
            row[f"{name}time_to_target_s"] = (
                float(np.mean(t)) if len(reached) == len(runs) else None)
            row[f"{name}rounds_to_target"] = (
                float(np.mean(k)) if len(reached) == len(runs) else None)
          fa = [r["records"][-1]["test_accuracy"] or 0.0 for r in runs]
          row["final_accuracy_mean"], row["final_accuracy_std"] = (
              _mean_std(fa))
          row["examples"] = float(np.mean([r["examples"] for r in runs]))
          row["bytes"] = float(np.mean([r["bytes"] for r in runs]))
          row["sim_time_s"] = float(np.mean(
              [r["records"][-1]["sim_time_s"] for r in runs]))
          ns = [[x["noise_scale"] for x in r["records"]
                 if x.get("noise_scale")] for r in runs]
          ns = [v for v in ns if len(v) >= 2]
          row["noise_scale_growth"] = (float(np.mean([v[-1] / v[0]
                                                      for v in ns]))
                                       if ns else None)
          cells.append(row)
  return cells, targets


def speedups(cells, mode):
  """Ours vs the best fixed batch, per cell (per-cell target)."""
  out = []
  keyf = lambda r: (r["dataset"], r["alpha"], r["resources"])
  by = {}
  for r in cells:
    by.setdefault(keyf(r), {})[r["method"]] = r
  for key, rows in by.items():
    fixed = [rows[m] for m in FIXED if m in rows and
             rows[m]["cell_time_to_target_s"] is not None]
    ours = [rows[m] for m in ("noise_scale", "noise_scale_fednova")
            if m in rows]
    if not ours:
      continue
    best_fixed = min(fixed, key=lambda r: r["cell_time_to_target_s"],
                     default=None)
    best_fixed_acc = max((rows[m]["final_accuracy_mean"] for m in FIXED
                          if m in rows), default=None)
    for o in ours:
      t = o["cell_time_to_target_s"]
      sp = (best_fixed["cell_time_to_target_s"] / t
            if best_fixed is not None and t else None)
      out.append(dict(
          dataset=key[0], alpha=key[1], resources=key[2], method=o["method"],
          best_fixed=best_fixed["method"] if best_fixed else None,
          speedup_vs_best_fixed=sp,
          accuracy_gap_points=(100 * (o["final_accuracy_mean"] -
                                      best_fixed_acc)
                               if best_fixed_acc is not None else None)))
  return out


def trends(cells, mode):
  """Published trends, each with whether this simulator reproduces it."""
  out = {}
  rows = [r for r in cells if r["resources"] == mode["resources"][0]]
  mc = [r for r in rows if r["alpha"] == min(mode["alphas"])]
  rk = {r["method"]: r["cell_rounds_to_target"] for r in mc
        if r["dataset"] == mode["datasets"][0]}
  if all(m in rk for m in FIXED):
    seq = [rk[m] for m in FIXED]
    ok = all(a is not None for a in seq[:2]) and (
        seq[1] is None and seq[0] is not None or
        all(b is None or (a is not None and a <= b)
            for a, b in zip(seq, seq[1:])))
    out["mcmahan_smaller_batches_fewer_rounds"] = dict(
        rounds_to_target=dict(zip(FIXED, seq)), reproduced=bool(ok),
        setting=f"{mode['datasets'][0]}, alpha={min(mode['alphas'])}, "
        f"{mode['resources'][0]}, 1 local epoch")
  fa = {(r["dataset"], r["alpha"], r["resources"], r["method"]):
        r["final_accuracy_mean"] for r in cells}
  pairs = [(k[:3], fa[k], fa.get(k[:3] + ("fedavg_b32",)))
           for k in fa if k[3] == "fednova_b32"]
  if pairs:
    wins = sum(1 for _, nova, avg in pairs if avg is not None and nova > avg)
    out["fednova_beats_fedavg"] = dict(
        cells_won=f"{wins}/{len(pairs)}", reproduced=wins > len(pairs) / 2,
        note="final accuracy, FedNova vs FedAvg at batch 32; local step "
        "counts differ because clients hold different amounts of data")
  growth = [r["noise_scale_growth"] for r in cells
            if r["method"] == "noise_scale" and r["noise_scale_growth"]]
  if growth:
    out["b_simple_grows"] = dict(
        median_growth_first_to_last_eval=float(np.median(growth)),
        reproduced=float(np.median(growth)) > 1.0,
        note="McCandlish et al. report >= 10x over a full training run")
  return out


def markdown(report) -> str:
  lines = [f"# Time to accuracy ({report['mode']} mode)", "",
           f"{report['machine']}, jax {report['versions']['jax']}, "
           f"study wall time {report['wall_time_s']:.0f} s. Targets: " +
           ", ".join(f"{k} {v:.3f}" for k, v in report["targets"].items()),
           "", "| dataset | alpha | resources | method | final acc | "
           "sim s to cell target | rounds | reached | examples | MB sent |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  fmt = lambda v, f: "-" if v is None else f.format(v)
  for r in report["cells"]:
    lines.append(
        f"| {r['dataset']} | {r['alpha']} | {r['resources']} | {r['method']}"
        f" | {fmt(r['final_accuracy_mean'], '{:.3f}')} +- "
        f"{fmt(r['final_accuracy_std'], '{:.3f}')} | "
        f"{fmt(r['cell_time_to_target_s'], '{:.1f}')} | "
        f"{fmt(r['cell_rounds_to_target'], '{:.0f}')} | "
        f"{r['cell_reached']} | {r['examples']:.3g} | "
        f"{r['bytes'] / 1e6:.1f} |")
  lines += ["", "Ours vs the best fixed batch (per-cell target):", "",
            "| dataset | alpha | resources | method | best fixed | speedup | "
            "acc gap (points) |", "|---|---|---|---|---|---|---|"]
  for s in report["speedups"]:
    lines.append(
        f"| {s['dataset']} | {s['alpha']} | {s['resources']} | "
        f"{s['method']} | {s['best_fixed'] or '-'} | "
        f"{fmt(s['speedup_vs_best_fixed'], '{:.2f}x')} | "
        f"{fmt(s['accuracy_gap_points'], '{:+.1f}')} |")
  lines += ["", "Published trends:", ""]
  for k, v in report["trends"].items():
    lines.append(f"- {k}: reproduced={v['reproduced']} "
                 f"({json.dumps({a: b for a, b in v.items() if a != 'reproduced'})})")
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="fedjax-bsa study")
  p.add_argument("--quick", action="store_true", help="CI size (minutes)")
  p.add_argument("--out", default="benchmarks/results")
  p.add_argument("--datasets", default=None,
                 help="comma-separated subset of digits,mnist1d (full mode)")
  p.add_argument("--rounds", type=int, default=None,
                 help="override the rounds of every dataset")
  p.add_argument("--seeds", default=None,
                 help="comma-separated seeds (default 0,1,2 in full mode)")
  p.add_argument("--runs", default=None,
                 help="where the sweeps' run folders go (default OUT/study_"
                 "runs_<mode>)")
  args = p.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  mode = _modes(args.quick)
  if args.datasets:
    mode["datasets"] = args.datasets.split(",")
  if args.seeds:
    mode["seeds"] = [int(s) for s in args.seeds.split(",")]
  if args.rounds:
    mode["rounds"] = {d: args.rounds for d in mode["datasets"]}
  name = "quick" if args.quick else "full"
  runs_dir = args.runs or os.path.join(args.out, f"study_runs_{name}")
  start = time.perf_counter()
  results = {}
  for ds in mode["datasets"]:
    results[ds] = {}
    for m in mode["methods"]:
      t = time.perf_counter()
      results[ds][m] = run_group(ds, m, mode, runs_dir)
      print(f"[study] {ds} {m}: {len(results[ds][m]['runs'])} experiments "
            f"in {time.perf_counter() - t:.0f} s", file=sys.stderr,
            flush=True)
  cells, targets = summarize(results, mode)
  report = dict(
      mode=name, machine=f"{platform.processor() or platform.machine()}, "
      f"{os.cpu_count()} CPU cores", versions=dict(
          jax=jax.__version__, python=platform.python_version()),
      wall_time_s=time.perf_counter() - start, settings=dict(
          method_settings={m: METHODS[m] for m in mode["methods"]},
          resource_settings=RESOURCES, dataset_settings=DATASETS,
          common=COMMON, **mode),
      targets=targets, cells=cells, speedups=speedups(cells, mode),
      trends=trends(cells, mode))
  os.makedirs(args.out, exist_ok=True)
  suffix = "" if name == "full" else "_quick"
  if args.datasets and name == "full":
    suffix = "_" + "_".join(mode["datasets"])
  with open(os.path.join(args.out, f"time_to_accuracy{suffix}.json"),
            "w") as fh:
    json.dump(report, fh, indent=1)
  md = markdown(report)
  with open(os.path.join(args.out, f"time_to_accuracy{suffix}.md"),
            "w") as fh:
    fh.write(md)
  print(md)
  return 0


if __name__ == "__main__":
  sys.exit(main())
