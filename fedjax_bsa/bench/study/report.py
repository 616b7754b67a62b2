"""The regime study's analysis: targets, tuned baselines, speedups with
bootstrap intervals, headroom, published trends, tables and the heatmap.

Definitions (fixed before the runs; :mod:`fedjax_bsa.bench.study.cells` runs
them):

* **target** of a cell: 95% of the best mean (over tuning seeds) final test
  accuracy of any fixed batch under either aggregation in that cell;
* **tuned fixed batch**, per aggregation: the batch of ``BATCHES`` whose
  median (over tuning seeds) simulated time to the target is least (ties:
  the smaller batch); the **reference** is the faster of the two;
* **speedup** of a method on seed ``s``: the reference's simulated time to
  the target on ``s`` over the method's (0 if the method never reaches it;
  seeds where neither reaches it are left out); reported as the median
  over the reported seeds with a bootstrap 90% interval (2,000 resamples of
  the seeds);
* **tuning curve** of a cell: per aggregation and grid batch, the median
  (over tuning seeds) simulated time to the target (None: never reached);
* **tuning cost** of a cell: the tuning runs it took (every grid point on
  every tuning seed under either aggregation, and with successive halving
  the early rungs' shorter runs too) and their simulated time
  (each run's clock at its last evaluation, summed); a method's **speedup
  including tuning** divides the reference's time to target plus that cost
  by the method's (the adaptive methods are not tuned per cell);
* **cohort spread** of a cell: the median over its tuning runs' evaluations
  of the cohort's between-client spread of mean applied gradients (the
  ``heterogeneity`` metric; None before runs recorded it);
* **headroom**: :func:`fedjax_bsa.plans.goodput.headroom` for the cell's
clients,
  devices and links, at the median noise scale the cell's tuning runs
  measured;
* **diverged**: a method's runs in a cell whose training loss became
  non-finite (they stop there; a run that had not reached the target by
  then counts as never reaching it).
"""

from __future__ import annotations

import json
import math

import numpy as np

__all__ = ["TARGET_FRACTION", "expand", "time_to", "tune", "tuned_pairs",
           "speedup_stats", "cell_results", "trends", "verdict"]

TARGET_FRACTION = 0.95
_BOOT = 2000


def _key(cell: dict) -> str:
  return json.dumps(cell, sort_keys=True)


def expand(run: dict):
  """``(cell, point, seed, times)`` for each clock of a run: a wait_all run
  gives one per retimed ratio, a deadline run its own. ``point`` is the
  fixed batch (an int; None for a method) or, for a (batch, rate) grid, a
  ``(b, lr)`` tuple."""
  cell, batch, seed = json.loads(run["id"])
  if isinstance(batch, list):
    batch = tuple(batch)
  for ratio, times in run["sim_time"].items():
    c = dict(cell)
    if ratio != "run":
      c["comm_ratio"] = float(ratio)
    yield c, batch, seed, times


def time_to(run: dict, times: list, target: float):
  """``(seconds, round)`` of the first evaluation at or above ``target``;
  ``(inf, None)`` if never."""
  for rnd, acc, t in zip(run["rounds"], run["accuracy"], times):
    if acc is not None and acc >= target:
      return t, rnd
  return math.inf, None


def _fields(p) -> dict:
  """A grid point as report fields: ``batch`` (and ``lr`` for a pair)."""
  if isinstance(p, tuple):
    return dict(batch=int(p[0]), lr=float(p[1]))
  return dict(batch=int(p))


def point(fields: dict):
  """The grid point of ``tuned``/``reference`` fields (inverse of
  :func:`_fields`)."""
  if fields.get("lr") is not None:
    return (int(fields["batch"]), float(fields["lr"]))
  return int(fields["batch"])


def _label(p) -> str:
  return f"b{p[0]}_lr{p[1]:g}" if isinstance(p, tuple) else f"b{p}"


def _order(p):
  return p if isinstance(p, tuple) else (p, 0.0)


def _ok(run) -> bool:
  return not run.get("failed") and "rounds" in run


def tune(tune_runs: dict, batches: list) -> dict:
  """Targets and tuned batches per cell from the tuning sweeps
  (``{(lw, agg): runs}``)."""
  finals, by, costs = {}, {}, {}
  for (_, agg), runs in tune_runs.items():
    for run in filter(_ok, runs):
      for cell, b, s, times in expand(run):
        k = _key(cell)
        c = costs.setdefault(k, [0, 0.0])
        c[0] += 1
        c[1] += float(times[-1]) if times else 0.0
        if run.get("rung") is not None:   # an early rung: cost only
          continue
        finals.setdefault(k, {}).setdefault((agg, b), []).append(
            run["final_accuracy"] or 0.0)
        by.setdefault(k, {}).setdefault((agg, b), []).append((run, times))
  out = {}
  for k, acc in finals.items():
    target = TARGET_FRACTION * max(np.mean(v) for v in acc.values())
    per_agg, curve = {}, {}
    for (agg, b), pairs in sorted(by[k].items(),
                                  key=lambda kv: (kv[0][0], _order(kv[0][1]))):
      med = float(np.median([time_to(r, t, target)[0] for r, t in pairs]))
      curve[f"{agg}_{_label(b)}"] = med if math.isfinite(med) else None
      best = per_agg.get(agg)
      if best is None or med < best[1]:
        per_agg[agg] = (b, med)
    ref = min(per_agg, key=lambda a: (per_agg[a][1], a))
    noise = [x for pairs in by[k].values() for r, _ in pairs
             for x in r.get("noise_scale") or []]
    spread = [x for pairs in by[k].values() for r, _ in pairs
              for x in r.get("heterogeneity") or []]
    out[k] = dict(cell=json.loads(k), target=float(target),
                  tuned={a: dict(_fields(b), median_time_s=m)
                         for a, (b, m) in per_agg.items()},
                  reference=dict(aggregation=ref,
                                 **_fields(per_agg[ref][0])),
                  tuning_noise_scale=float(np.median(noise))
                  if noise else None,
                  cohort_spread=float(np.median(spread)) if spread
                  else None,
                  tuning_final={f"{a}_{_label(b)}": float(np.mean(v))
                                for (a, b), v in acc.items()},
                  tuning_curve=curve,
                  tuning_cost=dict(runs=costs[k][0],
                                   sim_time_s=costs[k][1]))
  return out


def tuned_pairs(tuning: dict) -> dict:
  """``{(lw, agg): [(cell without ratio if wait_all, batch)]}``: the runs
  phase B needs (a wait_all cell's batch may differ per ratio)."""
  out = {}
  for t in tuning.values():
    cell = dict(t["cell"])
    if cell["local_work"] != "deadline":
      cell["comm_ratio"] = None
    for agg, v in t["tuned"].items():
      pair = (cell, point(v))
      lst = out.setdefault((cell["local_work"], agg), [])
      if pair not in lst:
        lst.append(pair)
  return out


def speedup_stats(ref: dict, got: dict, rng) -> dict:
  """Median and bootstrap 90% interval of per-seed speedups; ``ref`` and
  ``got`` map seed -> time to target."""
  seeds = sorted(set(ref) & set(got))
  sp = []
  for s in seeds:
    a, b = ref[s], got[s]
    if math.isinf(a) and math.isinf(b):
      continue
    sp.append(0.0 if math.isinf(b) else (math.inf if math.isinf(a)
                                         else a / b))
  if not sp:
    return dict(median=None, lo=None, hi=None, seeds=0)
  sp = np.array(sp)
  boot = np.median(rng.choice(sp, size=(_BOOT, sp.size)), axis=1)
  fin = lambda x: float(x) if math.isfinite(x) else None
  return dict(median=fin(np.median(sp)), lo=fin(np.percentile(boot, 5)),
              hi=fin(np.percentile(boot, 95)), seeds=int(sp.size),
              per_seed=[fin(x) for x in sp])


def _runs_of(runs: list, cell: dict, batch) -> dict:
  """seed -> (run, times) of a method's runs in ``cell``."""
  out = {}
  for run in filter(_ok, runs):
    for c, b, s, times in expand(run):
      if c == cell and b == batch:
        out[s] = (run, times)
  return out


def _summary(pairs: dict, target: float) -> dict:
  tt = {s: time_to(r, t, target) for s, (r, t) in pairs.items()}
  return dict(
      time_to_target_s={str(s): (v[0] if math.isfinite(v[0]) else None)
                        for s, v in tt.items()},
      rounds_to_target={str(s): v[1] for s, v in tt.items()},
      final_accuracy=float(np.median([r["final_accuracy"] or 0.0
                                      for r, _ in pairs.values()]))
      if pairs else None,
      examples=float(np.median([r["examples"] for r, _ in pairs.values()]))
      if pairs else None,
      bytes=float(np.median([r["bytes"] for r, _ in pairs.values()]))
      if pairs else None,
      reached=f"{sum(math.isfinite(v[0]) for v in tt.values())}/{len(tt)}",
      diverged=sum(bool(r.get("diverged")) for r, _ in pairs.values()))


def cell_results(tuning: dict, runs: dict, methods: list,
                 aggregations: list, seed: int = 0) -> list:
  """One entry per cell: the tuned baseline and every method's speedup
  over it (``runs[(lw, agg, method or "fixed")]``)."""
  rng = np.random.default_rng(seed)
  cells = []
  for k, t in sorted(tuning.items()):
    cell, target = t["cell"], t["target"]
    lw = cell["local_work"]
    ref = t["reference"]
    ref_pairs = _runs_of(runs.get((lw, ref["aggregation"], "fixed"), []),
                         cell, point(ref))
    ref_tt = {s: time_to(r, tm, target)[0] for s, (r, tm) in
              ref_pairs.items()}
    ref_sum = _summary(ref_pairs, target)
    cost = t.get("tuning_cost")
    ref_incl = ({s: v + cost["sim_time_s"] for s, v in ref_tt.items()}
                if cost else None)
    out = dict(cell, target=target, tuned=t["tuned"], reference=ref,
               reference_runs=ref_sum, methods={},
               tuning_noise_scale=t["tuning_noise_scale"],
               cohort_spread=t.get("cohort_spread"),
               tuning_curve=t.get("tuning_curve"), tuning_cost=cost)
    for agg in aggregations:
      names = [("fixed", point(t["tuned"][agg]))] + [(m, None)
                                                        for m in methods]
      for m, b in names:
        pairs = _runs_of(runs.get((lw, agg, m), []), cell, b)
        s = _summary(pairs, target)
        got = {sd: time_to(r, tm, target)[0] for sd, (r, tm) in
               pairs.items()}
        s["speedup"] = speedup_stats(ref_tt, got, rng)
        if ref_incl is not None and m != "fixed":
          s["speedup_incl_tuning"] = speedup_stats(ref_incl, got, rng)
        if s["final_accuracy"] is not None and ref_sum["final_accuracy"]:
          s["accuracy_gap_points"] = 100 * (s["final_accuracy"] -
                                            ref_sum["final_accuracy"])
        out["methods"][f"{m}+{agg}"] = s
    cells.append(out)
  return cells


def verdict(cells: list, method: str = "goodput+fednova") -> list:
  """The project's target per qualifying cell: non-IID (alpha 0.1 or
  natural clients), heterogeneous devices, headroom >= 2: the method's
  median speedup >= 1.5x with the interval's lower end above 1.0x and
  final accuracy within 1 point of the reference."""
  out = []
  for c in cells:
    noniid = c.get("alpha") in (None, 0.1)
    if not (noniid and c["devices"] == "heterogeneous"):
      continue
    m = c["methods"].get(method, {})
    sp = m.get("speedup", {})
    gap = m.get("accuracy_gap_points")
    met = (sp.get("median") is not None and sp["median"] >= 1.5
           and (sp.get("lo") or 0) > 1.0 and gap is not None
           and abs(gap) <= 1.0)
    out.append(dict(cell={k: c[k] for k in ("dataset", "alpha", "devices",
                                            "local_work", "comm_ratio")
                          if k in c},
                    headroom=c.get("headroom"),
                    qualifies=(c.get("headroom") or 0) >= 2.0,
                    speedup=sp, accuracy_gap_points=gap, met=bool(met)))
  return out


def trends(tune_runs: dict, runs: dict, tuning: dict, cells: list) -> dict:
  """Published trends rechecked on this study's runs."""
  out = {}
  # McMahan et al. 2017: under non-IID data, smaller batches need fewer
  # rounds (one local epoch, FedAvg): rounds to the cell target by batch
  by_batch = {}
  for run in filter(_ok, tune_runs.get(("epochs", "fedavg"), [])):
    if run.get("rung") is not None:     # an early rung of the halving
      continue
    for cell, b, _, times in expand(run):
      if cell.get("alpha") not in (None, 0.1):
        continue
      t = tuning.get(_key(cell))
      if t is None or cell.get("comm_ratio") not in (None, 1.0):
        continue
      r = time_to(run, times, t["target"])[1]
      by_batch.setdefault(b, []).append(math.inf if r is None else r)
  # a (batch, rate) grid: each batch at its best rate
  per_point = {p: float(np.median(v)) for p, v in by_batch.items()}
  med = {}
  for p, v in sorted(per_point.items(), key=lambda kv: _order(kv[0])):
    b = p[0] if isinstance(p, tuple) else p
    med[b] = min(med.get(b, math.inf), v)
  vals = list(med.values())
  out["mcmahan_2017"] = dict(
      claim="under non-IID data smaller batches reach the target in fewer "
            "rounds (one epoch, FedAvg)",
      median_rounds_by_batch={str(b): (v if math.isfinite(v) else None)
                              for b, v in med.items()},
      # not measurable when no batch reaches the target (inf <= inf)
      reproduced=None if not any(map(math.isfinite, vals)) else all(
          x <= y for x, y in zip(vals, vals[1:])))
  # Wang et al. 2020: FedNova beats FedAvg when local steps differ
  # (deadline rounds on heterogeneous devices: the tuned fixed batch of each)
  wins = total = 0
  for c in cells:
    if c["local_work"] != "deadline" or c["devices"] != "heterogeneous":
      continue
    a = c["methods"].get("fixed+fedavg", {}).get("time_to_target_s", {})
    n = c["methods"].get("fixed+fednova", {}).get("time_to_target_s", {})
    if not a or not n:
      continue
    ta = np.median([x if x is not None else math.inf for x in a.values()])
    tn = np.median([x if x is not None else math.inf for x in n.values()])
    if math.isfinite(min(ta, tn)):
      total += 1
      wins += int(tn < ta)
  out["wang_2020"] = dict(
      claim="FedNova reaches the target sooner than FedAvg when clients "
            "run different numbers of local steps (deadline rounds, "
            "heterogeneous devices; tuned fixed batch of each)",
      fednova_faster_cells=f"{wins}/{total}",
      reproduced=None if total == 0 else wins > total / 2)
  # McCandlish et al. 2018: the noise scale grows during training (>= 10x)
  growth = []
  for (lw, agg, m), rs in runs.items():
    if m != "goodput":
      continue
    for run in filter(_ok, rs):
      ns = run.get("noise_scale") or []
      k = max(1, len(ns) // 5)
      if len(ns) >= 4:
        growth.append(np.median(ns[-k:]) / max(np.median(ns[:k]), 1e-12))
  g = float(np.median(growth)) if growth else None
  out["mccandlish_2018"] = dict(
      claim="the gradient noise scale grows >= 10x over training",
      median_growth_last_over_first_fifth=g, runs=len(growth),
      reproduced=None if g is None else ("yes" if g >= 10 else (
          "in direction only" if g > 1 else "no")))
  return out
