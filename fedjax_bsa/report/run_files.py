"""Reading a finished run's directory, and the device groups of its clients.

A run directory (``fedjax-bsa run --out DIR``,
:func:`fedjax_bsa.run.runner.run`) holds ``config.json``, ``metrics.jsonl``,
``clients.npz`` and ``summary.json``; :func:`load_run` reads them into a
:class:`Run`, and :func:`client_groups` gives every client's device group
(the resource tiers for a profile registered with a ``tier_table``, as
``resources=tiers``, otherwise speed terciles). The figures are in
:mod:`fedjax_bsa.report.run_figures`; everything here is re-exported by
:mod:`fedjax_bsa.report.plot`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from typing import Mapping, NamedTuple

import numpy as np

from fedjax_bsa.core import registry as reg

__all__ = ["Run", "load_run", "client_groups", "is_sweep", "load_sweep"]


class Run(NamedTuple):
  """What one run directory holds (missing optional files are ``None``)."""
  path: str
  config: dict | None      # config.json
  records: list            # metrics.jsonl, one dict per evaluated round
  clients: dict | None     # clients.npz: round[R], cohort/batch/...[R, K]
  summary: dict | None     # summary.json

  @property
  def label(self) -> str:
    c = self.config or {}
    parts = [c.get("controller"), c.get("algorithm"), c.get("dataset")]
    return " / ".join(str(p) for p in parts if p) or os.path.basename(
        os.path.normpath(self.path))


# ---------------------------------------------------------------- loading ---

def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as fh:
    return json.load(fh)


def load_run(run_dir: str) -> Run:
  """Reads a run directory.

  Raises:
    ValueError: ``run_dir`` is not a directory, has no ``metrics.jsonl``, or
      that file holds no records.
  """
  run_dir = os.fspath(run_dir)
  if not os.path.isdir(run_dir):
    raise ValueError(f"{run_dir}: not a run directory (it does not exist or "
                     "is not a directory)")
  metrics = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(metrics):
    raise ValueError(f"{run_dir}: no metrics.jsonl here; expected the output "
                     "directory of `fedjax-bsa run --out DIR`")
  records = []
  with open(metrics) as fh:
    lines = [ln for ln in fh.read().splitlines() if ln.strip()]
  for i, line in enumerate(lines):
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError:
      if i == len(lines) - 1:  # a run still writing its last line
        break
      raise ValueError(f"{metrics}: line {i + 1} is not valid JSON") from None
  if not records:
    raise ValueError(f"{metrics}: no records (the run wrote nothing yet)")
  clients = None
  npz = os.path.join(run_dir, "clients.npz")
  if os.path.exists(npz):
    with np.load(npz) as z:
      clients = {k: np.asarray(z[k]) for k in z.files}
  return Run(run_dir, _read_json(os.path.join(run_dir, "config.json")),
             records, clients, _read_json(os.path.join(run_dir,
                                                       "summary.json")))


def is_sweep(folder: str) -> bool:
  """Whether ``folder`` is a sweep's output folder (``sweep.json``, no
  ``metrics.jsonl`` of its own)."""
  folder = os.fspath(folder)
  return (os.path.isfile(os.path.join(folder, "sweep.json")) and
          not os.path.exists(os.path.join(folder, "metrics.jsonl")))


def load_sweep(sweep_dir: str) -> dict:
  """The experiments of a sweep folder that have records, as
  ``{label: Run}`` in experiment order; each label is ``exp_NNN:`` and the
  settings that differ between the experiments (``key=value, ...``).

  Raises:
    ValueError: no experiment folder holds records.
  """
  sweep_dir = os.fspath(sweep_dir)
  runs = {}
  for name in sorted(os.listdir(sweep_dir)):
    path = os.path.join(sweep_dir, name)
    if name.startswith("exp_") and os.path.isfile(
        os.path.join(path, "metrics.jsonl")):
      try:
        runs[name] = load_run(path)
      except ValueError:
        continue  # an experiment that wrote nothing yet
  if not runs:
    raise ValueError(f"{sweep_dir}: a sweep folder, but no experiment "
                     "folder (exp_NNN) holds records yet")
  configs = {n: r.config or {} for n, r in runs.items()}
  keys = sorted({k for c in configs.values() for k in c})
  differ = [k for k in keys
            if len({json.dumps(c.get(k)) for c in configs.values()}) > 1]
  return {f"{n}: " + (", ".join(f"{k}={configs[n].get(k)}" for k in differ)
                      or "-"): r for n, r in runs.items()}


def series(records: list, x: str, y: str):
  """``(x, y)`` float arrays over the records where both are finite."""
  xs, ys = [], []
  for r in records:
    a, b = r.get(x), r.get(y)
    if a is None or b is None:
      continue
    if math.isfinite(a) and math.isfinite(b):
      xs.append(float(a))
      ys.append(float(b))
  return np.array(xs), np.array(ys)


# --------------------------------------------------------------- grouping ---

def _config_of(values: Mapping):
  """A :class:`~fedjax_bsa.core.config.Config` from ``config.json`` (keys this
  version does not know are dropped)."""
  from fedjax_bsa.core.config import Config
  known = {f.name for f in dataclasses.fields(Config)}
  return Config.from_dict({k: v for k, v in values.items() if k in known})


def _num_clients(run: Run) -> int | None:
  if run.summary and run.summary.get("num_clients"):
    return int(run.summary["num_clients"])
  if run.config and not reg.PARTITIONS.prop(run.config.get("partition"),
                                            "natural"):
    n = run.config.get("num_clients")
    if n:
      return int(n)
  if run.clients is not None and run.clients.get("cohort") is not None \
      and run.clients["cohort"].size:
    return int(run.clients["cohort"].max()) + 1
  return None


def client_groups(run: Run):
  """Device group of every client: ``(group[N] int array, names, caps)``.

  The resources are rebuilt from ``config.json`` (host numpy, seeded as in the
  run). With a profile registered with a ``tier_table`` (as
  ``resources=tiers``) the groups are its tiers, named by the table;
  otherwise clients are split into speed terciles ``slow / mid / fast``
  (one group ``all`` when speeds do not vary). ``caps`` gives each group's
  memory cap when it is shared by the whole group (else ``None``). Falls
  back to one group when the resources cannot be rebuilt (e.g. a trace file
  that is not here); a ``tier`` array saved in ``clients.npz`` wins over the
  rebuild.
  """
  n = _num_clients(run)
  if n is None:
    return np.zeros(0, np.int32), ["all"], [None]
  if run.config is None and not (run.clients and "tier" in run.clients):
    return np.zeros(n, np.int32), ["all"], [None]
  if run.clients is not None and "tier" in run.clients \
      and run.clients["tier"].shape == (n,):
    tier = run.clients["tier"].astype(np.int32)
    names = [f"tier {i}" for i in range(int(tier.max()) + 1)]
    return tier, names, [None] * len(names)
  try:
    # pylint: disable-next=g-import-not-at-top
    from fedjax_bsa.setup import experiment
    cfg = _config_of(run.config or {})
    res = experiment.make_resources(cfg, n)
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f"{run.path}: cannot rebuild the client resources ({e}); "
                  "plotting all clients as one group")
    return np.zeros(n, np.int32), ["all"], [None]
  caps_of = lambda g, k: [
      int(res.memory_cap[g == i][0])
      if (g == i).any() and np.all(res.memory_cap[g == i] ==
                                   res.memory_cap[g == i][0]) else None
      for i in range(k)]
  table = reg.RESOURCE_PROFILES.prop(cfg.resources, "tier_table")
  if table is not None:
    tier = np.asarray(res.tier, np.int32)
    names = [f"{t['name']} ({t['speed']:g}x speed)" for t in table]
    k = max(len(names), int(tier.max()) + 1)
    names += [f"tier {i}" for i in range(len(names), k)]
    return tier, names, caps_of(tier, k)
  speed = np.asarray(res.speed, np.float64)
  if np.unique(speed).size < 3:
    return np.zeros(n, np.int32), ["all"], caps_of(np.zeros(n, np.int32), 1)
  edges = np.quantile(speed, [1 / 3, 2 / 3])
  group = np.searchsorted(edges, speed, side="right").astype(np.int32)
  return group, ["slow third", "mid third", "fast third"], caps_of(group, 3)
