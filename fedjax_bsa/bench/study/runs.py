"""The regime study's runs (:mod:`fedjax_bsa.bench.study.cells`): a sweep run
once and cached (:func:`run_sweep_cached`), each run's summary with its
per-round parts (compute, upload, download), and the exact retiming of
``wait_all`` runs for another bandwidth (:func:`retime_parts`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import numpy as np

from fedjax_bsa.core.config import Config
from fedjax_bsa.plans import clock
from fedjax_bsa.report import regime
from fedjax_bsa.run import driver
from fedjax_bsa.run import loop
from fedjax_bsa.run.outputs import Outputs

__all__ = ["bandwidth_for", "round_parts", "retime_parts", "plan_spread",
           "run_summary", "run_sweep_cached", "retimed", "minutes",
           "log_to_stderr", "best_third", "listed"]


def bandwidth_for(cfg: Config, exp, ratio: float) -> float:
  """The bandwidth (bytes/s each way) at which the median client's local
  compute at the reference batch takes ``ratio`` times its communication
  (the model down and up), with the median device speed."""
  sizes = np.array([len(p) for p in exp.parts], np.float64)
  steps = np.median(regime.reference_steps(cfg, sizes))
  compute = steps * (cfg.step_overhead + cfg.batch_size / cfg.base_speed)
  return float(2.0 * exp.model_bytes * ratio / compute)


def round_parts(exp, clients: dict) -> dict:
  """Each round's per-participant compute and communication seconds at the
  run's own bandwidth (``took``: the client ran steps); what
  :func:`retime_parts` needs to retime a wait_all run to any bandwidth."""
  cohort = np.asarray(clients["cohort"], np.int64)
  batch, steps = np.asarray(clients["batch"]), np.asarray(clients["steps"])
  rc = type(exp.resources)(*[np.asarray(a)[cohort] for a in exp.resources])
  return dict(bandwidth=float(exp.cfg.bandwidth),
              local=np.asarray(clock.local_time(rc, batch, steps),
                               np.float64).tolist(),
              comm=np.asarray(clock.comm_time(rc, exp.model_bytes),
                              np.float64).tolist(),
              took=(steps > 0).tolist())


def retime_parts(parts: dict, rounds: list, bandwidth: float) -> list:
  """Simulated time at each of ``rounds`` had the bandwidth been
  ``bandwidth`` (``wait_all`` rounds: the slowest participant's compute
  plus its communication, which scales as 1 / bandwidth)."""
  comm = np.asarray(parts["comm"]) * (parts["bandwidth"] / bandwidth)
  t = np.asarray(parts["local"]) + comm
  round_time = np.where(np.asarray(parts["took"]), t, 0.0).max(axis=1)
  cum = np.concatenate([[0.0], np.cumsum(round_time)])
  return [float(cum[r]) for r in rounds]


def plan_spread(clients: dict) -> dict:
  """Mean and 10th/90th percentiles over every participant of every round
  of the batch, the learning rate, the local steps and ``eta * S`` (how
  far each client moved), from ``Outputs.clients()`` (None where no client
  ran).

  >>> sp = plan_spread(dict(batch=np.array([[4, 8]]), steps=np.array(
  ...     [[10, 0]]), lr=np.array([[0.1, 0.2]])))
  >>> sp["eta_s"]["mean"], sp["batch"]["p90"]
  (1.0, 4.0)
  """
  took = np.asarray(clients["steps"]) > 0
  b = np.asarray(clients["batch"], np.float64)[took]
  st = np.asarray(clients["steps"], np.float64)[took]
  lr = np.asarray(clients["lr"], np.float64)[took]

  def spread(v):
    if v.size == 0:
      return None
    return dict(mean=float(np.mean(v)), p10=float(np.percentile(v, 10)),
                p90=float(np.percentile(v, 90)))
  return dict(batch=spread(b), lr=spread(lr), steps=spread(st),
              eta_s=spread(lr * st))


def run_summary(exp, out: Outputs, bandwidths: dict | None) -> dict:
  """What the report needs of one run (compact, JSON)."""
  recs, cl = out.records, out.clients()
  took = np.asarray(cl["steps"]) > 0
  b_simple = [r["noise_scale"] for r in recs if r.get("noise_scale")]
  s = dict(rounds=[r["round"] for r in recs],
           accuracy=[r["test_accuracy"] for r in recs],
           final_accuracy=recs[-1]["test_accuracy"],
           examples=int(np.sum(np.asarray(cl["batch"]) * np.asarray(
               cl["steps"]))),
           bytes=int(2 * exp.model_bytes * took.sum()),
           diverged=out.diverged,
           failed_clients=int(sum(r.get("failed") or 0 for r in recs)),
           noise_scale=b_simple,
           # the cohort's between-client spread of mean applied gradients
           heterogeneity=[r["heterogeneity"] for r in recs
                          if r.get("heterogeneity") is not None],
           plan=plan_spread(cl))
  batch = s["plan"]["batch"]
  s["mean_batch"] = None if batch is None else batch["mean"]
  recorded = [r["sim_time_s"] for r in recs]
  if bandwidths is None:
    s["sim_time"] = {"run": recorded}
  else:
    parts = round_parts(exp, cl)
    again = retime_parts(parts, s["rounds"], exp.cfg.bandwidth)
    if not np.allclose(again, recorded, rtol=1e-4, atol=1e-3):
      raise AssertionError(f"retiming does not reproduce the clock: "
                           f"{again[-1]} vs {recorded[-1]}")
    s["sim_time"] = {str(k): retime_parts(parts, s["rounds"], bw)
                     for k, bw in bandwidths.items()}
    s["round_parts"] = parts     # to retime for ratios asked for later
  return s


def run_sweep_cached(base: Config, experiments: list, cache_dir: str,
                     key: str, retimes=None, log=print,
                     seconds: list | None = None) -> list:
  """Runs ``experiments`` (override dicts, each with an ``"id"``) as one
  packed sweep, or loads its cached results; returns one summary each.

  ``retimes`` (``{ratio: bandwidth}``) asks for retimed clocks (wait_all
  protocols); None keeps the recorded clock. A cached sweep that lacks a
  ratio is retimed from its stored round parts, or run again if it has
  none. The sweep's wall time when it
  ran (stored with the results; None if unknown) is appended to
  ``seconds``, so that a study resumed from its cache still reports what
  its sweeps took.
  """
  ids = [e["id"] for e in experiments]
  digest = hashlib.sha256(json.dumps(
      [base.to_dict(), experiments], sort_keys=True).encode()).hexdigest()
  path = os.path.join(cache_dir, f"{key}-{digest[:12]}.json")
  if os.path.exists(path):
    with open(path) as fh:
      doc = json.load(fh)
    runs = retimed(doc["runs"], retimes)
    if runs is not None:
      if seconds is not None:
        seconds.append(doc.get("wall_s"))
      return runs
    log(f"  {key}: cached without the clocks for the ratios asked; "
        f"running it again")
  overrides = [{k: v for k, v in e.items() if k != "id"} for e in experiments]
  t = time.perf_counter()
  pre = driver.prepare(base, overrides, mesh=None, keep_going=True)
  outs = [Outputs(c, None) for c in pre.configs]
  loop.execute(pre, outs)
  runs = [dict(id=i, failed=pre.failed.get(n)) for n, i in enumerate(ids)]
  for out, exp, n in zip(outs, pre.experiments, pre.kept):
    runs[n].update(run_summary(exp, out, retimes))
  wall = time.perf_counter() - t
  os.makedirs(cache_dir, exist_ok=True)
  with open(path + ".tmp", "w") as fh:
    json.dump(dict(key=key, base=base.to_dict(), runs=runs, wall_s=wall), fh)
  os.replace(path + ".tmp", path)
  if seconds is not None:
    seconds.append(wall)
  log(f"  {key}: {len(experiments)} experiments in {wall:.0f} s")
  return runs


def retimed(runs: list, retimes: dict | None) -> list | None:
  """Cached ``runs`` with a clock for every ratio ``retimes`` asks for,
  retimed from their stored round parts where missing; None when some
  clock is missing and cannot be rebuilt (an older cache: run again)."""
  if retimes is None:
    return runs
  out = []
  for run in runs:
    if run.get("failed") or "sim_time" not in run:
      out.append(run)
      continue
    missing = {str(k): bw for k, bw in retimes.items()
               if str(k) not in run["sim_time"]}
    if missing:
      if "round_parts" not in run:
        return None
      run = dict(run, sim_time=dict(run["sim_time"], **{
          k: retime_parts(run["round_parts"], run["rounds"], bw)
          for k, bw in missing.items()}))
    out.append(run)
  return out


def minutes(seconds: float) -> str:
  return (f"{seconds:.0f} s" if seconds < 90 else
          f"{seconds / 60:.0f} min")


def log_to_stderr(msg: str) -> None:
  print(msg, file=sys.stderr, flush=True)


def best_third(got: list, alive: dict) -> dict:
  """Per cell, the best third (at least one) of its alive grid points by
  mean final accuracy over the tuning seeds of a rung's runs ``got``."""
  acc = {}
  for run in got:
    if run.get("failed") or "rounds" not in run:
      continue
    cell, p, _ = json.loads(run["id"])
    key = (json.dumps(cell, sort_keys=True), json.dumps(p))
    acc.setdefault(key, []).append(run.get("final_accuracy") or 0.0)
  out = {}
  for ck, points in alive.items():
    score = lambda p: float(np.mean(acc.get((ck, json.dumps(p)), [0.0])))
    ranked = sorted(points, key=lambda p: (
        -score(p), tuple(p) if isinstance(p, list) else (p,)))
    out[ck] = sorted(ranked[:max(1, -(-len(points) // 3))],
                     key=lambda p: points.index(p))
  return out


def listed(p):
  """A grid point as it is written in a run id (``[b, lr]`` or ``b``)."""
  return list(p) if isinstance(p, tuple) else p
