"""One experiment's host-side results and files: records, tables, summary.

:class:`Outputs` collects what a run reports (the ``metrics.jsonl`` records,
per-client plans per round, the round it diverged at) and writes it under
its folder (process 0 only): ``config.json``, ``metrics.jsonl`` (flushed as
it goes; rewritten from the checkpoint on resume, so each evaluated round
appears once), ``clients.npz`` and ``summary.json``. A run has one, a sweep
one per experiment.

:func:`check_out_dir` and :func:`clear_run` are the rules for an output
folder that already holds a run (the command line refuses it unless asked
to replace it); :meth:`Outputs.check_diverged` is the divergence rule.
"""

from __future__ import annotations

import json
import math
import os
import shutil

import numpy as np

from fedjax_bsa.core.config import Config, ConfigError
from fedjax_bsa.run import distributed

__all__ = ["Outputs", "chunk_records", "format_table", "PER_CLIENT",
           "RUN_FILES", "DIVERGED_FACTOR", "holds_run", "check_out_dir",
           "clear_run"]

PER_CLIENT = ("cohort", "batch", "steps", "lr", "b_simple")
_EMPTY = dict(train_loss=None, mean_batch_size=None, min_batch_size=None,
              max_batch_size=None, mean_lr=None, min_lr=None, max_lr=None,
              mean_steps=None, min_steps=None, max_steps=None,
              noise_scale=None, cohort_noise_scale=None)


#: What a run or sweep writes into its folder (``plots`` and the PNGs by
#: ``fedjax-bsa plot``, ``exp_*`` by a sweep): a folder holding one of the
#: first four holds a run; replacing a run removes all of these.
RUN_FILES = ("metrics.jsonl", "summary.json", "sweep.json", "checkpoints",
             "config.json", "clients.npz", "sweep.jsonl", "table.txt",
             "plots", "compare_accuracy.png", "sweep_accuracy.png")
_MARKS = RUN_FILES[:4]

#: A run whose test loss rises above this multiple of its first evaluation
#: (round 0) is reported as diverged, as is one whose loss is non-finite.
DIVERGED_FACTOR = 10.0


def holds_run(folder: str) -> bool:
  """Whether ``folder`` holds a run's or a sweep's files."""
  return os.path.isdir(folder) and any(
      os.path.exists(os.path.join(folder, m)) for m in _MARKS)


def check_out_dir(out_dir: str, overwrite: bool = False) -> None:
  """Checks that ``out_dir`` can take a new run's files.

  Raises:
    ConfigError: ``out_dir`` (or a folder above it) is a file, or
      ``out_dir`` already holds a run and ``overwrite`` is false (the
      message names the folder and the two ways on).
  """
  path = os.path.abspath(out_dir)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    raise ConfigError(f"--out {out_dir}: {path} is a file, not a folder; "
                      "give a folder (it is created if missing)")
  if holds_run(out_dir) and not overwrite:
    raise ConfigError(
        f"--out {out_dir} already holds a run: continue it with --resume "
        f"{out_dir}, or replace it (its files and plots) with --overwrite")


def clear_run(out_dir: str) -> None:
  """Removes a previous run's or sweep's files (:data:`RUN_FILES` and the
  experiment folders ``exp_*``) from ``out_dir`` if it holds a run
  (:func:`holds_run`); other files stay."""
  if not holds_run(out_dir):
    return
  for name in os.listdir(out_dir):
    path = os.path.join(out_dir, name)
    if name in RUN_FILES or (name.startswith("exp_") and
                             os.path.isdir(path)):
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)


def _f(x) -> float | None:
  x = float(x)
  return x if math.isfinite(x) else None


def chunk_records(m: dict, n: int) -> dict:
  """Aggregates the first ``n`` rounds of a chunk's metrics (numpy)."""
  took = m["participants"][:n] > 0
  b_simple = m["noise_scale"][:n][took & (m["noise_scale"][:n] > 0)]
  cohort_b = m["cohort_noise_scale"][:n]
  cohort_b = cohort_b[took & np.isfinite(cohort_b) & (cohort_b > 0)]
  mins = m["min_batch_size"][:n][took]
  maxs = m["max_batch_size"][:n][took]
  return dict(
      train_loss=_f(m["train_loss"][n - 1]),
      mean_batch_size=_f(np.mean(m["mean_batch_size"][:n][took])) if took.any()
      else None,
      min_batch_size=_f(mins.min()) if mins.size else None,
      max_batch_size=_f(maxs.max()) if maxs.size else None,
      batch_over_memory_cap=int(m["batch_over_memory_cap"][:n].sum()),
      noise_scale=_f(np.median(b_simple)) if b_simple.size else None,
      cohort_noise_scale=_f(np.median(cohort_b)) if cohort_b.size else None,
      **_spread(m, n, took, "lr"), **_spread(m, n, took, "steps"),
      mean_adascale_gain=_f(np.mean(m["mean_adascale_gain"][:n][took]))
      if took.any() else None,
      heterogeneity=_f(np.mean(m["heterogeneity"][:n])),
      round_time_s=_f(m["round_time_s"][n - 1]),
      participants=int(m["participants"][n - 1]),
      dropped=int(m["dropped"][:n].sum()),
      failed=int(m["failed"][:n].sum()),
      no_fit=int(m["no_fit"][:n].sum()),
      empty_rounds=int((~took).sum()),
      deadline_s=_f(m["deadline_s"][n - 1]),
      partial=int(m["partial"][:n].sum()),
      examples=int(m["examples"][:n].sum()),
      padding_efficiency=_f(np.mean(m["padding_efficiency"][:n][took]))
      if took.any() else None)


def _spread(m: dict, n: int, took, name: str) -> dict:
  """Mean, min and max of a per-client plan value over a chunk's rounds."""
  if not took.any():
    return {f"{k}_{name}": None for k in ("mean", "min", "max")}
  return {f"mean_{name}": _f(np.mean(m[f"mean_{name}"][:n][took])),
          f"min_{name}": _f(np.min(m[f"min_{name}"][:n][took])),
          f"max_{name}": _f(np.max(m[f"max_{name}"][:n][took]))}


def _range_cell(r: dict, name: str, fmt: str) -> str | None:
  """``mean (min-max)`` of a record's plan value, None if absent."""
  mean, lo, hi = (r.get(f"{k}_{name}") for k in ("mean", "min", "max"))
  if mean is None or lo is None or hi is None:
    return None
  return (f"{mean:{fmt}} ({lo:{fmt}}-{hi:{fmt}})")


def format_table(records: list, summary: dict) -> str:
  """A short text table of the evaluated rounds (at most ~12 rows): the
  plan columns give each value's mean over the cohorts since the last row,
  with its min-max across clients and rounds."""
  records = [dict(r, _batch=_range_cell(r, "batch_size", ".0f"),
                  _lr=_range_cell(r, "lr", ".2g"),
                  _steps=_range_cell(r, "steps", ".0f")) for r in records]
  cols = [("round", "{:>6}"), ("sim_time_s", "{:>10.1f}"),
          ("wall_time_s", "{:>8.1f}"), ("test_accuracy", "{:>8.4f}"),
          ("test_loss", "{:>8.4f}"), ("_batch", "{:>12}"),
          ("_lr", "{:>18}"), ("_steps", "{:>11}"),
          ("noise_scale", "{:>9.2f}")]
  head = ["round", "sim_s", "wall_s", "test_acc", "test_loss", "batch",
          "lr", "steps", "B_simple"]
  widths = [6, 10, 8, 8, 8, 12, 18, 11, 9]
  lines = [" ".join(h.rjust(w) for h, w in zip(head, widths))]
  step = max(1, math.ceil(len(records) / 12))
  rows = records[::step]
  if records and rows[-1] is not records[-1]:
    rows.append(records[-1])
  for r in rows:
    cells = []
    for (key, fmt), w in zip(cols, widths):
      v = r.get(key)
      cells.append(fmt.format(v) if v is not None else "-".rjust(w))
    lines.append(" ".join(cells))
  lines.append(
      f"final test accuracy {summary['final_test_accuracy']:.4f}, best "
      f"{summary['best_test_accuracy']:.4f}, simulated "
      f"{summary['sim_time_s']:.1f} s, wall {summary['wall_time_s']:.1f} s, "
      f"{summary['compiles']} compile(s) of the round loop")
  if "compute_comm_ratio" in summary:
    room = summary.get("headroom")
    lines.append(
        f"regime: compute/communication {summary['compute_comm_ratio']:.3g} "
        f"({summary['regime']}), headroom "
        + (f"{room:.2f}x" if room is not None else "n/a")
        + f"; {summary['empty_rounds']} round(s) with no participant, "
        f"{summary['no_fit']} client(s) with no step fitting the deadline")
  return "\n".join(lines)


class Outputs:
  """Records, per-client histories and files of one experiment.

  Args:
    cfg: the experiment's settings (written to ``config.json``).
    out_dir: its folder (None: keep everything in memory only).
    label: a name used in messages (e.g. ``" (exp_003)"``).
  """

  def __init__(self, cfg: Config, out_dir: str | None, label: str = ""):
    self.cfg, self.out_dir, self.label = cfg, out_dir, label
    self.records: list = []
    self.diverged: int | None = None
    self.interrupted: int | None = None  # the round a stop request ended at
    self.wall_offset = 0.0
    self._clients = {k: [] for k in PER_CLIENT}
    self._file = None
    self._write = bool(out_dir) and distributed.is_main()

  @property
  def active(self) -> bool:
    """Still running (not diverged)."""
    return self.diverged is None

  def check_diverged(self, train_loss, done: int,
                     factor: float | None = DIVERGED_FACTOR) -> str | None:
    """Marks the experiment diverged if it is; returns the one-line report.

    Diverged: the training loss of a round of the chunk just run is
    non-finite, or (``factor`` given) the test loss just recorded is
    non-finite or above ``factor`` times the first evaluation's.

    Args:
      train_loss: the chunk's training losses, ``[n]`` (numpy).
      done: rounds done after the chunk.
      factor: the test-loss multiple (None: the training loss only).
    """
    if not self.active:
      return None
    n = len(train_loss)
    bad = ~np.isfinite(train_loss)
    first, last = (self.records[0]["test_loss"],
                   self.records[-1]["test_loss"])
    if bad.any():
      self.diverged = done - n + int(np.argmax(bad)) + 1
      why = (f"the training loss became non-finite at round "
             f"{self.diverged}")
    elif factor is not None and first is not None and (
        last is None or last > factor * first):
      self.diverged = done
      why = ("the test loss became non-finite" if last is None else
             f"the test loss {last:.4g} is over {factor:g}x its first "
             f"evaluation ({first:.4g})") + f" at round {done}"
    else:
      return None
    return (f"diverged{self.label}: {why}; stopped after round {done}, "
            f"keeping the {len(self.records)} records written; likely "
            f"cause: too large a learning rate (client_lr="
            f"{self.cfg.client_lr:g})")

  # --------------------------------------------------------- checkpoints
  def meta(self) -> dict:
    return dict(records=self.records, diverged=self.diverged)

  def host_arrays(self, e: int) -> dict:
    return {f"{e}.{k}": v for k, v in self.clients().items()
            if k in PER_CLIENT}

  def load(self, meta: dict, host: dict, e: int, wall_offset: float = 0.0
           ) -> None:
    """Takes the state saved by :meth:`meta` / :meth:`host_arrays`."""
    self.records = list(meta["records"])
    self.diverged = meta["diverged"]
    self.wall_offset = wall_offset
    self._clients = {k: [host[f"{e}.{k}"]] for k in PER_CLIENT}

  # -------------------------------------------------------------- files
  def open(self) -> None:
    """Writes ``config.json`` and (re)writes ``metrics.jsonl`` with the
    records held so far."""
    if not self._write:
      return
    os.makedirs(self.out_dir, exist_ok=True)
    with open(os.path.join(self.out_dir, "config.json"), "w") as fh:
      json.dump(self.cfg.to_dict(), fh, indent=1)
    self._file = open(os.path.join(self.out_dir, "metrics.jsonl"), "w")
    for r in self.records:
      self._file.write(json.dumps(r) + "\n")
    self._file.flush()

  def record(self, done: int, sim_time, wall: float, acc, loss,
             extra: dict | None) -> None:
    """Adds (and writes) the record of round ``done``."""
    r = dict(round=int(done), sim_time_s=_f(sim_time), wall_time_s=wall,
             test_accuracy=_f(acc), test_loss=_f(loss),
             **(_EMPTY if extra is None else extra))
    self.records.append(r)
    if self._file is not None:
      self._file.write(json.dumps(r) + "\n")
      self._file.flush()

  def add_clients(self, m: dict, n: int) -> None:
    """Appends the first ``n`` rounds of a chunk's per-client plans."""
    for k in PER_CLIENT:
      self._clients[k].append(np.asarray(m[k][:n]))

  def clients(self) -> dict:
    """Per-client plans of every round run: ``[rounds, K]`` each."""
    out = {k: np.concatenate(v) if v else np.zeros((0,))
           for k, v in self._clients.items()}
    out["round"] = np.arange(1, len(out["cohort"]) + 1)
    return out

  def finish(self, *, compiles: int, lanes: int, num_clients: int,
             wall: float, devices: list, **extra) -> dict:
    """The summary; writes ``clients.npz`` and ``summary.json``."""
    records = self.records
    accs = [r["test_accuracy"] for r in records
            if r["test_accuracy"] is not None]
    batches = [r["mean_batch_size"] for r in records[1:]
               if r["mean_batch_size"] is not None]
    summary = dict(
        rounds=records[-1]["round"], diverged_round=self.diverged,
        interrupted_round=self.interrupted,
        final_test_accuracy=records[-1]["test_accuracy"] or 0.0,
        best_test_accuracy=max(accs) if accs else 0.0,
        final_test_loss=records[-1]["test_loss"],
        sim_time_s=records[-1]["sim_time_s"], wall_time_s=wall,
        compiles=compiles, num_clients=num_clients, lanes=lanes,
        mean_batch_size=float(np.mean(batches)) if batches else None,
        dropped=sum(r.get("dropped") or 0 for r in records),
        no_fit=sum(r.get("no_fit") or 0 for r in records),
        empty_rounds=sum(r.get("empty_rounds") or 0 for r in records),
        devices=devices, **extra)
    if self._write:
      if self._file is not None:
        self._file.close()
        self._file = None
      np.savez(os.path.join(self.out_dir, "clients.npz"), **self.clients())
      with open(os.path.join(self.out_dir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=1)
    return summary
