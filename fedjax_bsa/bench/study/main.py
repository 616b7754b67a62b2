"""``fedjax-bsa study``: runs the regime study and writes its report.

  fedjax-bsa study --quick                         # CI: about a minute
  fedjax-bsa study --datasets digits               # one dataset, all axes
  fedjax-bsa study --datasets mnist1d --local-work deadline --comm 1,10
  fedjax-bsa study --report-only                   # tables from the cache

See :mod:`fedjax_bsa.bench.study.cells` (what runs) and
:mod:`fedjax_bsa.bench.study.report` (definitions). ``regimes.json``
merges every dataset and every part studied so far: a run over some axes
replaces the cells it ran (same dataset, alpha, devices, local work and
ratio) and keeps the others, so a dataset can be studied axis by axis
(each part keeps its settings, trends and time under ``parts``); the
markdown table and the heatmap are rebuilt from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

from fedjax_bsa.bench import harness
from fedjax_bsa.bench.study import cells as study_cells
from fedjax_bsa.bench.study import figures
from fedjax_bsa.bench.study import report
from fedjax_bsa.report import regime
from fedjax_bsa.setup import experiment as experiment_lib

__all__ = ["main", "QUICK"]

QUICK = dict(datasets=["digits"], alphas=[0.1], devices=["heterogeneous"],
             local_work=["deadline"], comm=[1.0], seeds=[0], tuning=[100],
             batches=[8, 32], methods=["goodput"], aggregations=["fednova"],
             rounds=10)


def _floats(text):
  return None if text is None else [float(x) for x in text.split(",")]


def _strs(text):
  return None if text is None else text.split(",")


def parse_seeds(text: str, start: int) -> list:
  """``"3"`` -> ``start .. start + 2``; ``"20-24"`` -> 20..24; ``"30,31"``
  -> [30, 31] (ranges and lists mix: ``"1,4-6"``).

  >>> parse_seeds("3", 100), parse_seeds("20-22", 0), parse_seeds("1,4-5", 0)
  ([100, 101, 102], [20, 21, 22], [1, 4, 5])
  """
  text = text.strip()
  if text.isdigit():
    if int(text) < 1:
      raise ValueError(f"a seed count must be >= 1, got {text}")
    return list(range(start, start + int(text)))
  out = []
  for part in text.split(","):
    lo, sep, hi = part.strip().partition("-")
    if not lo.isdigit() or (sep and not hi.isdigit()):
      raise ValueError(f"{part!r} is neither a seed nor a range a-b")
    a, b = int(lo), int(hi) if sep else int(lo)
    if b < a:
      raise ValueError(f"range {part!r} is empty")
    out.extend(range(a, b + 1))
  if len(set(out)) != len(out):
    raise ValueError(f"seeds {text!r} repeat a seed")
  return out


def _seed_list(start: int):
  def parse(text):
    try:
      return parse_seeds(text, start)
    except ValueError as e:
      raise argparse.ArgumentTypeError(str(e)) from None
  return parse


def _parser():
  p = argparse.ArgumentParser(prog="fedjax-bsa study",
                              description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="CI smoke run: one tiny cell of digits")
  p.add_argument("--datasets", default="digits,synthetic,mnist1d",
                 help="comma list of datasets to study (default "
                 "%(default)s; --quick: digits)")
  p.add_argument("--alpha", help="Dirichlet alphas, e.g. 0.1,1.0")
  p.add_argument("--devices", help="homogeneous,heterogeneous")
  p.add_argument("--local-work", help="epochs,steps,deadline")
  p.add_argument("--comm", help="compute/communication ratios, e.g. 0.1,1,10")
  p.add_argument("--seeds", type=_seed_list(0),
                 help="reported seeds: a count N (0..N-1), a range (20-24) "
                 "or a list (20,22,23) (default per dataset)")
  p.add_argument("--tuning-seeds", type=_seed_list(100),
                 help="tuning seeds: a count N (100..100+N-1), a range or a "
                 "list, none of them reported (default per dataset)")
  p.add_argument("--rounds", type=int, help="rounds (default per dataset)")
  p.add_argument("--lr-factors", help="the tuning grid's client rates as "
                 "factors of the dataset's client_lr, e.g. 0.5,1,2,4 (the "
                 "oracle over batch x rate); default 1: the batch alone")
  p.add_argument("--halving", action="store_true",
                 help="successive halving over the tuning grid: every point "
                 "runs rounds/9, the best third (accuracy) rounds/3, the "
                 "best third of those all rounds (a third of the full "
                 "grid's cost; the report counts every run as tuning "
                 "cost)")
  p.add_argument("--methods", help="comma list of methods besides the "
                 "tuned fixed batch (default: "
                 f"{','.join(study_cells.DEFAULT_METHODS)}; also "
                 + ",".join(m for m in study_cells.METHODS
                            if m not in study_cells.DEFAULT_METHODS) + ")")
  p.add_argument("--aggregations", help="comma list of aggregations "
                 f"(default: {','.join(study_cells.AGGREGATIONS)})")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="regimes[_quick].json, .md, _heatmap.png and the "
                 "resumable cache regimes_cache/: " + harness.OUT_HELP)
  p.add_argument("--report-only", action="store_true",
                 help="rebuild the table and heatmap from regimes.json")
  return p


def _headroom(study: study_cells.Study, cell: dict, b_simple) -> float | None:
  """The cell's headroom at the noise scale its tuning runs measured."""
  if b_simple is None:
    return None
  lw = cell["local_work"]
  cfg = study.base.replace(**study_cells.LOCAL_WORK[lw],
                           speed_sigma=study_cells.DEVICES[cell["devices"]],
                           seed=study.seeds_for(cell.get("alpha"))[1][0])
  if cell.get("alpha") is not None:
    cfg = cfg.replace(alpha=cell["alpha"])
  exp = experiment_lib.build(cfg)
  cfg = cfg.replace(bandwidth=study_cells.bandwidth_for(cfg, exp,
                                                    cell["comm_ratio"]))
  exp = experiment_lib.build(cfg, exp.dataset)
  return regime.headroom(exp, b_simple)


def run_dataset(name: str, kw: dict, log) -> dict:
  """Runs one dataset's study; returns its cells, trends and timings."""
  t0 = time.perf_counter()
  study = study_cells.Study(name, log=log, **kw)
  log(f"{name}: tuning the fixed batch ({len(study.batches)} batches x "
      f"{len(study.lr_factors)} rates x {len(study.tuning)} tuning seeds)")
  tune_runs = study.tune()
  tuning = report.tune(tune_runs, study.batches)
  log(f"{name}: tuned baseline and {len(study.methods)} methods x "
      f"{len(study.seeds)} seeds")
  runs = study.report_runs(report.tuned_pairs(tuning))
  cells = report.cell_results(tuning, runs, study.methods,
                              study.aggregations)
  for c in cells:
    c["dataset"] = name
    c["headroom"] = _headroom(study, c, c["tuning_noise_scale"])
  return dict(cells=cells, trends=report.trends(tune_runs, runs, tuning,
                                                cells),
              # what the sweeps took when they ran (a resumed study reads
              # it from its cache); None if some sweep's time is unknown
              wall_s=_total(study.sweep_seconds),
              this_call_s=time.perf_counter() - t0,
              settings=dict(base=study.base.to_dict(), alphas=study.alphas,
                            devices=study.devices,
                            local_work=study.local_work, comm=study.comm,
                            seeds=study.seeds, tuning=study.tuning,
                            seed_replacements=study.replaced,
                            batches=study.batches,
                            lr_factors=list(study.lr_factors),
                            halving=study.halving,
                            methods=study.methods,
                            aggregations=study.aggregations))


def _cell_key(c: dict) -> tuple:
  return (c.get("alpha"), c["devices"], c["local_work"], c["comm_ratio"])


def _merge_dataset(old: dict | None, new: dict) -> dict:
  """One dataset's entry after a new part: the new cells replace the old
  ones with the same key; a part whose cells have all been replaced by
  later parts (one or several) is dropped, so times are not counted
  twice."""
  part = lambda d: dict(settings=d["settings"], trends=d["trends"],
                        wall_s=d["wall_s"],
                        cells=[list(_cell_key(c)) for c in d["cells"]])
  if old is None:
    return dict(new, parts=[part(new)])
  keys = {_cell_key(c) for c in new["cells"]}
  parts, later = [], set()
  for p in reversed(old.get("parts", [part(old)]) + [part(new)]):
    own = {tuple(k) for k in p["cells"]}
    if not own <= later:
      parts.insert(0, p)
    later |= own
  cells = [c for c in old["cells"] if _cell_key(c) not in keys]
  return dict(cells=cells + new["cells"], parts=parts,
              wall_s=_total(p["wall_s"] for p in parts),
              settings=new["settings"], trends=new["trends"])


def _total(xs):
  xs = list(xs)
  return None if any(x is None for x in xs) else sum(xs)


def _merge(path: str, results: dict) -> dict:
  old = {}
  if os.path.exists(path):
    with open(path) as fh:
      old = json.load(fh)
  datasets = dict(old.get("datasets", {}))
  for name, new in results.items():
    datasets[name] = _merge_dataset(datasets.get(name), new)
  cells = [c for d in datasets.values() for c in d["cells"]]
  return dict(
      created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
      machine=dict(platform=platform.platform(),
                   processor=platform.processor(), cpus=os.cpu_count()),
      definitions=report.__doc__, datasets=datasets, cells=cells,
      verdict=report.verdict(cells))


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  args.out = harness.results_dir(args.out, args.quick)
  log = study_cells.log_to_stderr
  name = "regimes_quick" if args.quick else "regimes"
  path = os.path.join(args.out, f"{name}.json")
  if not args.report_only:
    if args.quick:
      q = dict(QUICK)
      datasets, kw = q.pop("datasets"), q
    else:
      datasets = _strs(args.datasets)
      kw = dict(alphas=_floats(args.alpha), devices=_strs(args.devices),
                local_work=_strs(args.local_work), comm=_floats(args.comm),
                seeds=args.seeds, tuning=args.tuning_seeds,
                methods=_strs(args.methods), rounds=args.rounds,
                lr_factors=_floats(args.lr_factors),
                halving=args.halving,
                aggregations=_strs(args.aggregations))
    kw["cache_dir"] = os.path.join(args.out, "regimes_cache")
    results = {d: run_dataset(d, kw, log) for d in datasets}
    for d, r in results.items():
      took = ("unknown" if r["wall_s"] is None
              else f"{r['wall_s'] / 60:.1f} min")
      log(f"{d}: {len(r['cells'])} cells; sweeps took {took} when they "
          f"ran, this call {r['this_call_s'] / 60:.1f} min")
    rep = _merge(path, results)
    os.makedirs(args.out, exist_ok=True)
    with open(path, "w") as fh:
      json.dump(rep, fh, indent=1)
  with open(path) as fh:
    rep = json.load(fh)
  with open(os.path.join(args.out, f"{name}.md"), "w") as fh:
    fh.write(figures.markdown(rep))
  figures.heatmap(rep, os.path.join(args.out, f"{name}_heatmap.png"))
  log(f"wrote {path}, {name}.md and {name}_heatmap.png")
  return 0
