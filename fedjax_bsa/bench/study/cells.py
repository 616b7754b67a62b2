"""The regime study: where per-client batch adaptation pays off, against a
fixed batch tuned per cell under the same protocol.

Cells: dataset x Dirichlet alpha x devices (homogeneous / heterogeneous:
lognormal speeds and links, sigma 1) x local work (one epoch, 20 steps, or
the steps that fit a FedBalancer deadline) x compute-to-communication ratio
(0.1, 1, 10, set through the bandwidth). Methods, each with FedAvg and
FedNova aggregation: a fixed batch from ``BATCHES`` tuned per cell on
tuning seeds that are not reported, AdaBatch doubling, resource-proportional
batches, ``noise_scale`` (v1), ``goodput`` (v2) and ``displacement`` (v3,
ours). Every method of a cell runs under the same protocol and deadline
rule, except the untuned defaults people run (``mcmahan``: FedAvg's B = 10,
E = 1; ``fedscale``: FedScale's batch 30, 20 steps, rate 0.05 decaying),
which bring their own local work.

How it runs: one packed sweep (one compile) per (phase, local work,
aggregation, controller), its experiments spanning alpha, devices, seeds,
batches and (for deadline rounds) bandwidths. Under ``wait_all`` rounds (one
epoch, 20 steps) the bandwidth changes only the clock, never the training
(no controller reads it), so those runs are simulated once and *retimed*
exactly for each ratio from their per-round plans (:func:`retime_parts`;
with the run's own bandwidth it reproduces the recorded clock, which is
checked).
Every finished sweep is cached under ``<out>/regimes_cache/`` so a study
that stops resumes where it was.

  fedjax-bsa study --quick                       # CI: about a minute
  fedjax-bsa study --datasets digits             # one dataset (~1-2 h here)
  fedjax-bsa study --datasets mnist1d --local-work deadline --comm 1

Writes ``regimes.json`` (every dataset run so far merged), ``regimes.md``
and ``regimes_heatmap.png`` into ``--out`` (default
``benchmarks/results``); see :mod:`fedjax_bsa.bench.study.report`.
"""

from __future__ import annotations

import functools
import json
import os
import time


from fedjax_bsa.bench.study.runs import bandwidth_for
from fedjax_bsa.bench.study.runs import best_third
from fedjax_bsa.bench.study.runs import listed
from fedjax_bsa.bench.study.runs import log_to_stderr
from fedjax_bsa.bench.study.runs import minutes
from fedjax_bsa.bench.study.runs import retime_parts
from fedjax_bsa.bench.study.runs import round_parts
from fedjax_bsa.bench.study.runs import run_sweep_cached
from fedjax_bsa.core.config import Config, ConfigError
from fedjax_bsa.setup import experiment as experiment_lib

__all__ = ["DATASETS", "BATCHES", "METHODS", "DEFAULT_METHODS",
           "AGGREGATIONS", "LOCAL_WORK", "DEVICES", "COMM_RATIOS", "Study",
           "round_parts", "retime_parts", "bandwidth_for",
           "run_sweep_cached", "log_to_stderr"]

#: Per dataset: base settings, the Dirichlet alphas (None: natural
#: clients), reported and tuning seeds.
DATASETS = {
    "digits": dict(
        base=dict(dataset="digits", num_clients=50, clients_per_round=10,
                  min_examples=5, hidden=64, client_lr=0.1, rounds=100),
        alphas=[0.1, 1.0], seeds=[0, 1, 2, 3, 4], tuning=[100, 101]),
    "synthetic": dict(
        base=dict(dataset="synthetic", synthetic_alpha=1.0,
                  synthetic_beta=1.0, num_clients=100, partition="natural",
                  clients_per_round=10, client_lr=0.05, rounds=200),
        alphas=[None], seeds=[0, 1, 2, 3, 4], tuning=[100, 101]),
    "mnist1d": dict(
        base=dict(dataset="mnist1d", num_examples=40000, num_clients=200,
                  clients_per_round=10, min_examples=5, client_lr=0.1,
                  rounds=200),
        alphas=[0.1, 1.0], seeds=[0, 1, 2], tuning=[100]),
}
#: Free seeds tried in place of one whose partition cannot be drawn.
MAX_SEED_TRIES = 20
#: layout=rule: the study's figures never depend on a timing made on the
#: machine that runs it (a measured layout changes the order of float sums)
COMMON = dict(resources="lognormal", memory_sigma=0.0, memory_cap=128,
              microbatch=4, batch_size=8, batch_min=8, batch_max=128,
              eval_every=5, progress=False, noise_stats=True,
              deadline_rule="fedbalancer", layout="rule")
LOCAL_WORK = {
    "epochs": dict(local_work="epochs", local_epochs=1.0),
    "steps": dict(local_work="steps", local_steps=20),
    "deadline": dict(local_work="deadline", local_steps=50),
}
DEVICES = {"homogeneous": 0.0, "heterogeneous": 1.0}   # speed_sigma
COMM_RATIOS = [0.1, 1.0, 10.0]
BATCHES = [4, 8, 16, 32, 64, 128]
#: Rates of the tuning grid as factors of the dataset's ``client_lr`` (1:
#: the batch alone; the oracle of study v2 uses e.g. 0.5,1,2,4, 8x).
LR_FACTORS = (1.0,)
AGGREGATIONS = ["fedavg", "fednova"]
METHODS = {
    "adabatch": dict(controller="schedule", schedule="doubling"),
    "resource_proportional": dict(controller="resource_proportional"),
    "noise_scale": dict(controller="noise_scale"),
    "goodput": dict(controller="goodput"),
    # v3 picks its own batch from 1 up (the other methods keep batch_min 8)
    "displacement": dict(controller="displacement", batch_min=1),
    # v3's variants, for the pilot: the rate by AdaScale's gain instead of
    # the linear rule, with annealing on (the pilot of 2026-12-03 ran them
    # when annealing was the default, so its `displacement` is this one),
    # and annealing off (the default since)
    "displacement_adascale": dict(controller="displacement", batch_min=1,
                                  rate_scaling="adascale",
                                  anneal_patience=3),
    "displacement_anneal": dict(controller="displacement", batch_min=1,
                                anneal_patience=3),
    "displacement_no_anneal": dict(controller="displacement", batch_min=1,
                                   anneal_patience=0),
    # untuned defaults, as people run them, each with its own local work in
    # every cell: FedAvg as in McMahan et al. 2017 (B = 10, E = 1) at the
    # dataset's rate; FedScale's defaults (fedscale/cloud/config_parser.py,
    # SymbioticLab/FedScale 0f1a07ea: batch_size 30, local_steps 20,
    # learning_rate 0.05, decay_factor 0.98 every decay_round 10,
    # min_learning_rate 5e-5)
    "mcmahan": dict(controller="constant", batch_size=10,
                    local_work="epochs", local_epochs=1.0),
    "fedscale": dict(controller="constant", batch_size=30,
                     local_work="steps", local_steps=20, client_lr=0.05,
                     lr_decay=0.98, lr_decay_every=10, lr_min=5e-5),
}


#: Methods a study runs unless ``methods`` names them (v3's variants are
#: for the method pilot only).
DEFAULT_METHODS = [m for m in METHODS if not m.startswith("displacement_")]


class Study:
  """One dataset's study over the chosen axes (see the module docstring)."""

  def __init__(self, dataset: str, *, alphas=None, devices=None,
               local_work=None, comm=None, seeds=None, tuning=None,
               batches=None, methods=None, aggregations=None, rounds=None,
               lr_factors=None, halving=False,
               cache_dir: str = "benchmarks/results/regimes_cache",
               log=print):
    spec = DATASETS[dataset]
    self.dataset, self.log = dataset, log
    self.alphas = spec["alphas"] if alphas is None else alphas
    self.devices = list(DEVICES) if devices is None else devices
    self.local_work = list(LOCAL_WORK) if local_work is None else local_work
    self.comm = COMM_RATIOS if comm is None else comm
    self.seeds = spec["seeds"] if seeds is None else seeds
    self.tuning = spec["tuning"] if tuning is None else tuning
    self.batches = BATCHES if batches is None else batches
    #: the oracle's rates, as factors of the dataset's client_lr: (1.0,)
    #: tunes the batch alone (study v1, ids [cell, b, seed]); more tune
    #: (batch, rate) pairs (ids [cell, [b, lr], seed])
    self.lr_factors = tuple(LR_FACTORS if lr_factors is None
                            else lr_factors)
    self.halving = bool(halving)
    self.methods = list(DEFAULT_METHODS) if methods is None else methods
    self.aggregations = AGGREGATIONS if aggregations is None else aggregations
    base = dict(spec["base"], **COMMON)
    if rounds is not None:
      base["rounds"] = rounds
    base["schedule_every"] = max(1, base["rounds"] // 4)
    self.base = Config(**base)
    self.cache_dir = os.path.join(cache_dir, dataset)
    self.sweep_seconds = []    # each sweep's wall time when it ran
    #: alpha -> ``{"reported"|"tuning": {asked seed: seed used}}``: seeds
    #: whose partition cannot be drawn, and the free seeds run instead
    self.replaced = {}
    self._seed_sets = {}
    self.clock = time.perf_counter   # progress lines' clock
    self._progress = None

  # ---------------------------------------------------------------- seeds
  def _drawable(self, alpha, seed: int) -> bool:
    """Whether ``seed``'s data and partition can be drawn at ``alpha``."""
    cfg = self.base.replace(seed=seed)
    if alpha is not None:
      cfg = cfg.replace(alpha=alpha)
    try:
      experiment_lib.make_parts(cfg, experiment_lib.load_dataset(cfg))
    except ConfigError:
      return False
    return True

  def seeds_for(self, alpha) -> tuple[list, list]:
    """``(reported, tuning)`` seeds of the cells at ``alpha``: each asked
    seed whose partition cannot be drawn (a Dirichlet draw that cannot give
    every client ``min_examples`` rows) is replaced by the next seed above
    every asked one that can, recorded in :attr:`replaced`."""
    if alpha in self._seed_sets:
      return self._seed_sets[alpha]
    used = set(self.seeds) | set(self.tuning)
    nxt = max(used) + 1
    out = []
    for kind, asked in (("reported", self.seeds), ("tuning", self.tuning)):
      got = []
      for s in asked:
        if self._drawable(alpha, s):
          got.append(s)
          continue
        tried = 0
        while nxt in used or not self._drawable(alpha, nxt):
          nxt += 1
          tried += 1
          if tried >= MAX_SEED_TRIES:
            raise ConfigError(
                f"alpha={alpha}: seed {s} cannot draw its partition and "
                f"neither can the next {MAX_SEED_TRIES} free seeds; raise "
                "alpha or lower min_examples")
        self.log(f"{self.dataset}: alpha={alpha}: seed {s} cannot draw its "
                 f"partition; {kind} seed {nxt} runs in its place")
        self.replaced.setdefault(str(alpha), {}).setdefault(kind, {})[
            str(s)] = nxt
        used.add(nxt)
        got.append(nxt)
      out.append(got)
    self._seed_sets[alpha] = tuple(out)
    return self._seed_sets[alpha]

  # ------------------------------------------------------------- plumbing
  def config(self, lw: str, agg: str, controller_kw: dict) -> Config:
    # a method's own local work (the untuned defaults) replaces the cell's
    return self.base.replace(**dict(LOCAL_WORK[lw], algorithm=agg,
                                    **controller_kw))

  @functools.lru_cache(maxsize=None)
  def _bandwidths(self, lw: str) -> dict:
    """Ratio -> bandwidth for local work ``lw`` (from the first alpha)."""
    cfg = self.base.replace(**LOCAL_WORK[lw])
    if self.alphas[0] is not None:
      cfg = cfg.replace(alpha=self.alphas[0])
    exp = experiment_lib.build(cfg)
    return {r: bandwidth_for(cfg, exp, r) for r in self.comm}

  def cells(self, lw: str):
    """``(cell id, overrides)`` of the host/traced axes of ``lw``; deadline
    rounds have one cell per ratio, wait_all rounds one for all ratios."""
    ratios = self.comm if lw == "deadline" else [None]
    out = []
    for a in self.alphas:
      for dev in self.devices:
        for r in ratios:
          ov = dict(speed_sigma=DEVICES[dev])
          if a is not None:
            ov["alpha"] = a
          ov["bandwidth"] = self._bandwidths(lw)[
              r if r is not None else self._run_ratio]
          out.append((dict(alpha=a, devices=dev, local_work=lw,
                           comm_ratio=r), ov))
    return out

  @property
  def _run_ratio(self) -> float:
    """The ratio wait_all runs are simulated at (then retimed)."""
    return 1.0 if 1.0 in self.comm else self.comm[0]

  def _retimes(self, lw):
    if lw == "deadline":
      return None
    return self._bandwidths(lw)

  def total_runs(self) -> int:
    """Runs the whole study takes (the tuned fixed batch counted as one
    batch per cell)."""
    n = 0
    for lw in self.local_work:
      cells = self.cells(lw)
      tune = sum(len(self.seeds_for(c["alpha"])[1]) for c, _ in cells)
      report = sum(len(self.seeds_for(c["alpha"])[0]) for c, _ in cells)
      g, points = len(self.grid()), 0
      for _ in self.rungs():
        points += g
        g = -(-g // 3)
      n += len(self.aggregations) * (tune * points
                                     + report * (1 + len(self.methods)))
    return n

  def sweep(self, phase: str, lw: str, agg: str, name: str, kw: dict,
            experiments: list) -> list:
    """One packed sweep (or its cached results); within the study's
    phases, then a progress line: runs done of the study's, time spent, and
    the time left estimated from the runs that ran (not those read from the
    cache)."""
    key = f"{phase}-{lw}-{agg}-{name}"
    t0 = self.clock()
    out = run_sweep_cached(self.config(lw, agg, kw), experiments,
                           self.cache_dir, key, self._retimes(lw), self.log,
                           self.sweep_seconds)
    if self._progress is None:     # a sweep run on its own, not a phase's
      return out
    pr = self._progress
    took = self.clock() - t0
    pr["done"] += len(experiments)
    if took > 1.0:          # ran (a cached sweep loads in milliseconds)
      pr["ran"] += len(experiments)
      pr["ran_s"] += took
    left = max(pr["total"] - pr["done"], 0)
    eta = (f", about {minutes(pr['ran_s'] / pr['ran'] * left)} left"
           if pr["ran"] and left else "")
    self.log(f"{self.dataset}: {pr['done']}/{pr['total']} runs, "
             f"{minutes(self.clock() - pr['start'])} spent{eta}")
    return out

  # ---------------------------------------------------------------- phases
  def grid(self) -> list:
    """The tuning grid's points: batches (one rate), or ``[b, lr]``."""
    if self.lr_factors == (1.0,):
      return list(self.batches)
    return [[b, float(f"{self.base.client_lr * f:.6g}")]
            for b in self.batches for f in self.lr_factors]

  @staticmethod
  def point_settings(p) -> dict:
    """The settings of a grid point (a batch, or ``[b, lr]``)."""
    if isinstance(p, (list, tuple)):
      return dict(batch_size=int(p[0]), client_lr=float(p[1]))
    return dict(batch_size=int(p))

  def _begin(self) -> None:
    """Starts the progress lines of the phases (once per study)."""
    if self._progress is None:
      self._progress = dict(total=self.total_runs(), done=0, ran=0,
                            ran_s=0.0, start=self.clock())

  def rungs(self) -> list:
    """Rounds of each rung of the tuning grid: the full run, or with
    :attr:`halving` ``R / 9``, ``R / 3`` and ``R``."""
    R = self.base.rounds
    if not self.halving:
      return [R]
    return sorted({max(1, R // 9), max(1, R // 3), R})

  def tune(self) -> dict:
    """Phase A: every point of the tuning grid on the tuning seeds. With
    :attr:`halving` (successive halving, Jamieson and Talwalkar 2016,
    eta = 3): every point runs ``R / 9`` rounds, the best third per cell
    and aggregation (mean accuracy over the tuning seeds at the rung's
    end; ties: the smaller point) runs ``R / 3``, the best third of those
    the full ``R``; earlier rungs' runs are kept with their ``rung`` (the
    report counts them as tuning cost only)."""
    self._begin()
    runs = {}
    for lw in self.local_work:
      for agg in self.aggregations:
        cells = self.cells(lw)
        alive = {json.dumps(c, sort_keys=True): self.grid() for c, _ in cells}
        kept, rungs = [], self.rungs()
        for i, r in enumerate(rungs):
          exps = [dict(ov, seed=s, **self.point_settings(p),
                       id=json.dumps([cell, p, s], sort_keys=True))
                  for cell, ov in cells
                  for p in alive[json.dumps(cell, sort_keys=True)]
                  for s in self.seeds_for(cell["alpha"])[1]]
          last = i == len(rungs) - 1
          name = "fixed" if last else f"fixed-rung{r}"
          kw = dict(controller="constant") if last else dict(
              controller="constant", rounds=r)
          got = self.sweep("tune", lw, agg, name, kw, exps)
          if last:
            kept += got
          else:
            kept += [dict(g, rung=r) for g in got]
            alive = best_third(got, alive)
        runs[(lw, agg)] = kept
    return runs

  def report_runs(self, tuned: dict) -> dict:
    """Phase B: the tuned fixed batch and every method on the reported
    seeds. ``tuned[(lw, agg)]`` lists ``(cell, batch)`` pairs to run."""
    self._begin()
    runs = {}
    for lw in self.local_work:
      for agg in self.aggregations:
        pairs = {(json.dumps(c, sort_keys=True),
                  tuple(p) if isinstance(p, (list, tuple)) else p)
                 for c, p in tuned[(lw, agg)]}
        by_cell = {json.dumps(c, sort_keys=True): ov
                   for c, ov in self.cells(lw)}
        exps = [dict(by_cell[cj], seed=s, **self.point_settings(p),
                     id=json.dumps([json.loads(cj), listed(p), s],
                                   sort_keys=True))
                for cj, p in sorted(pairs)
                for s in self.seeds_for(json.loads(cj)["alpha"])[0]]
        runs[(lw, agg, "fixed")] = self.sweep(
            "report", lw, agg, "fixed", dict(controller="constant"), exps)
        for m in self.methods:
          exps = [dict(ov, seed=s, id=json.dumps([cell, None, s],
                                                 sort_keys=True))
                  for cell, ov in self.cells(lw)
                  for s in self.seeds_for(cell["alpha"])[0]]
          runs[(lw, agg, m)] = self.sweep("report", lw, agg, m, METHODS[m],
                                          exps)
    return runs
