"""Figures of finished runs, from the files a run writes (no display needed).

A run directory (``fedjax-bsa run --out DIR``, :func:`fedjax_bsa.runner.run`)
holds ``config.json``, ``metrics.jsonl``, ``clients.npz`` and
``summary.json``. :func:`plot_run` turns one into PNGs:

* ``accuracy.png``: test accuracy against simulated time and against rounds;
* ``batch_size.png``: every participating client's batch size per round, and
  the mean per device group (the resource tiers for ``resources=tiers``,
  otherwise speed terciles slow / mid / fast);
* ``noise_scale.png``: ``B_simple`` per round, median and inter-quartile band
  over the cohort, with the median batch for reference;
* ``padding_efficiency.png``: useful examples over kernel slots, per
  evaluated round.

:func:`plot_compare` draws several runs' accuracy against simulated time in
one figure. :func:`main` is the ``fedjax-bsa plot DIR [DIR ...] [--out OUT]``
command. Figures are built with :class:`matplotlib.figure.Figure` and written
by the Agg renderer: no pyplot state, no window, safe in notebooks and CI.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import warnings
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Run", "load_run", "client_groups", "accuracy_figure",
           "batch_figure", "noise_figure", "padding_figure",
           "compare_figure", "plot_run", "plot_compare", "main"]

DPI = 110


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


def _series(records: list, x: str, y: str):
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
  """A :class:`~fedjax_bsa.config.Config` from ``config.json`` (keys this
  version does not know are dropped)."""
  from fedjax_bsa.config import Config  # pylint: disable=g-import-not-at-top
  known = {f.name for f in dataclasses.fields(Config)}
  return Config.from_dict({k: v for k, v in values.items() if k in known})


def _num_clients(run: Run) -> int | None:
  if run.summary and run.summary.get("num_clients"):
    return int(run.summary["num_clients"])
  if run.config and run.config.get("partition") != "natural":
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
  run). With ``resources=tiers`` the groups are the tiers; otherwise clients
  are split into speed terciles ``slow / mid / fast`` (one group ``all``
  when speeds do not vary). ``caps`` gives each group's memory cap when it is
  shared by the whole group (else ``None``). Falls back to one group when the
  resources cannot be rebuilt (e.g. a trace file that is not here); a
  ``tier`` array saved in ``clients.npz`` wins over the rebuild.
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
    from fedjax_bsa import experiment  # pylint: disable=g-import-not-at-top
    from fedjax_bsa import resources as resources_lib  # pylint: disable=g-import-not-at-top
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
  if cfg.resources == "tiers":
    tier = np.asarray(res.tier, np.int32)
    table = resources_lib.DEFAULT_TIERS
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


# ---------------------------------------------------------------- figures ---

def _figure(width=6.4, height=4.0, ncols=1) -> Figure:
  fig = Figure(figsize=(width * ncols if ncols > 1 else width, height),
               dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _note(ax, text):
  ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes,
          color="0.4")


def _title(run: Run) -> str:
  c = run.config or {}
  bits = [f"controller={c['controller']}" if "controller" in c else None,
          f"algorithm={c['algorithm']}" if "algorithm" in c else None,
          f"resources={c['resources']}" if "resources" in c else None]
  return ", ".join(b for b in bits if b) or run.path


def accuracy_figure(run: Run) -> Figure:
  """Test accuracy against simulated time (left) and rounds (right)."""
  fig = _figure(5.0, 3.6, ncols=2)
  axes = fig.subplots(1, 2, sharey=True)
  for ax, key, xlabel in ((axes[0], "sim_time_s", "simulated time (s)"),
                          (axes[1], "round", "round")):
    x, y = _series(run.records, key, "test_accuracy")
    if x.size:
      ax.plot(x, y, marker="o", ms=3)
      best = int(np.argmax(y))
      ax.axhline(y[best], color="0.7", lw=0.8, ls="--")
    else:
      _note(ax, "no finite test accuracy")
    ax.set_xlabel(xlabel)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("test accuracy")
  fig.suptitle(_title(run), fontsize=10)
  return fig


def _participating(clients: dict):
  """``(rounds[R], cohort, batch, mask)`` with ``mask`` true where a cohort
  client actually trained (steps > 0)."""
  rounds = clients.get("round")
  cohort = np.asarray(clients["cohort"])
  batch = np.asarray(clients["batch"], np.float64)
  steps = clients.get("steps")
  mask = (np.asarray(steps) > 0) if steps is not None else np.ones_like(
      batch, bool)
  if rounds is None or np.shape(rounds) != (cohort.shape[0],):
    rounds = np.arange(1, cohort.shape[0] + 1)
  return rounds, cohort, batch, mask


def batch_figure(run: Run) -> Figure:
  """Batch size per round: each participating client (dots) and the mean of
  each device group (lines)."""
  fig = _figure(6.4, 4.0)
  ax = fig.subplots()
  if run.clients is None or "batch" not in run.clients or \
      run.clients["batch"].size == 0:
    _note(ax, "no clients.npz (per-client plans) in this run")
    return fig
  rounds, cohort, batch, mask = _participating(run.clients)
  group, names, caps = client_groups(run)
  g = group[cohort] if group.size else np.zeros_like(cohort)
  rng = np.random.default_rng(0)
  for i, name in enumerate(names):
    sel = mask & (g == i)
    if not sel.any():
      continue
    color = f"C{i}"
    rr = np.broadcast_to(rounds[:, None], batch.shape)[sel]
    jitter = rng.uniform(-0.2, 0.2, rr.shape) * (len(names) > 1)
    ax.scatter(rr + jitter, batch[sel], s=6, alpha=0.35, color=color,
               linewidths=0)
    count = sel.sum(1)
    mean = np.where(count > 0, np.where(sel, batch, 0).sum(1) /
                    np.maximum(count, 1), np.nan)
    ax.plot(rounds, mean, color=color, lw=1.6,
            label=f"{name}: mean over its clients")
  top = np.nanmax(batch[mask], initial=1) * 1.5
  shown = [c for c in caps if c is not None and c < top]
  if shown and len(set(caps)) == 1:
    ax.axhline(shown[0], color="0.4", lw=0.8, ls=":",
               label=f"memory cap {shown[0]}")
  elif shown:
    for i, cap in enumerate(caps):
      if cap is not None and cap < top:
        ax.axhline(cap, color=f"C{i}", lw=0.8, ls=":")
  ax.set_xlabel("round")
  ax.set_ylabel("batch size $b_k$")
  if np.nanmax(batch[mask], initial=1) / max(np.nanmin(batch[mask],
                                                       initial=1), 1) > 8:
    ax.set_yscale("log", base=2)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  ax.set_title("per-client batch size (dots), by device group; dotted: "
               "memory cap", fontsize=9)
  return fig


def noise_figure(run: Run) -> Figure:
  """``B_simple`` per round: cohort median and inter-quartile band."""
  fig = _figure(6.4, 4.0)
  ax = fig.subplots()
  c = run.clients
  if c is None or "b_simple" not in c or c["b_simple"].size == 0:
    _note(ax, "no clients.npz (per-client noise estimates) in this run")
    return fig
  rounds, _, batch, mask = _participating(c)
  bs = np.asarray(c["b_simple"], np.float64)
  have = np.isfinite(bs).any(1)
  if not have.any():
    _note(ax, "no noise-scale estimates in this run\n(noise_stats off, or "
          "every batch was a single microbatch)")
    ax.set_xlabel("round")
    return fig
  q25, med, q75 = np.full((3, len(rounds)), np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    q25[have], med[have], q75[have] = np.nanpercentile(bs[have], [25, 50, 75],
                                                       axis=1)
    mb = np.nanmedian(np.where(mask, batch, np.nan), axis=1)
  ax.fill_between(rounds, q25, q75, alpha=0.25, color="C0", lw=0,
                  label="$B_{simple}$ inter-quartile range")
  ax.plot(rounds, med, color="C0", marker="o", ms=2.5,
          label="$B_{simple}$ median over the cohort")
  ax.plot(rounds, mb, color="C1", ls="--", lw=1.2,
          label="median batch size $b_k$")
  finite = np.concatenate([q25[have], mb[np.isfinite(mb)]])
  pos = finite[finite > 0]
  if pos.size and pos.max() / pos.min() > 20:
    ax.set_yscale("log")
  ax.set_xlabel("round")
  ax.set_ylabel("examples")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  ax.set_title("gradient noise scale $B_{simple} = tr(\\Sigma) / |G|^2$ "
               "(this round's own estimates)", fontsize=9)
  return fig


def padding_figure(run: Run) -> Figure:
  """Kernel padding efficiency (useful examples / slot capacity) per
  evaluated round (the mean over the rounds since the last evaluation)."""
  fig = _figure(6.4, 3.4)
  ax = fig.subplots()
  x, y = _series(run.records, "round", "padding_efficiency")
  if x.size:
    ax.plot(x, y, marker="o", ms=3, color="C2")
    ax.set_ylim(0, 1.05)
    ax.axhline(float(np.mean(y)), color="0.6", ls="--", lw=0.8,
               label=f"mean {np.mean(y):.2f}")
    ax.legend(fontsize=8, loc="lower right")
  else:
    _note(ax, "no padding_efficiency in metrics.jsonl")
  ax.set_xlabel("round")
  ax.set_ylabel("useful examples / slot capacity")
  ax.grid(alpha=0.3)
  ax.set_title("round-kernel padding efficiency", fontsize=9)
  return fig


def _save(fig: Figure, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=DPI)
  return path


# -------------------------------------------------------------------- api ---

def plot_run(run_dir: str, out_dir: str | None = None) -> list[str]:
  """Writes the PNGs of one run.

  Args:
    run_dir: a run's output directory (holds ``metrics.jsonl``).
    out_dir: where to write (default ``run_dir/plots``).

  Returns:
    The paths written: ``accuracy.png``, ``batch_size.png``,
    ``noise_scale.png``, ``padding_efficiency.png`` (in that order).

  Raises:
    ValueError: ``run_dir`` holds no ``metrics.jsonl`` (the message names it).
  """
  run = load_run(run_dir)
  out_dir = os.fspath(out_dir) if out_dir else os.path.join(run.path, "plots")
  figures = (("accuracy.png", accuracy_figure),
             ("batch_size.png", batch_figure),
             ("noise_scale.png", noise_figure),
             ("padding_efficiency.png", padding_figure))
  return [_save(make(run), os.path.join(out_dir, name))
          for name, make in figures]


def compare_figure(runs: Mapping[str, Run], *, target: float | None = None,
                   x: str = "sim_time_s") -> Figure:
  """Test accuracy of several runs against ``x`` (``sim_time_s``,
  ``round`` or ``wall_time_s``), one line each."""
  xlabel = {"sim_time_s": "simulated time (s)", "round": "round",
            "wall_time_s": "host wall-clock time (s)"}.get(x, x)
  fig = _figure(6.4, 4.2)
  ax = fig.subplots()
  for i, (label, run) in enumerate(runs.items()):
    xs, ys = _series(run.records, x, "test_accuracy")
    ax.plot(xs, ys, marker="o", ms=2.5, color=f"C{i % 10}", label=label)
  if target is not None:
    ax.axhline(target, color="0.4", ls="--", lw=0.8,
               label=f"target {target:g}")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("test accuracy")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  return fig


def plot_compare(run_dirs: Mapping[str, str] | Sequence[str], out_path: str,
                 *, target: float | None = None,
                 x: str = "sim_time_s") -> str:
  """Accuracy against simulated time for several runs in one PNG.

  Args:
    run_dirs: ``{label: run_dir}`` (a list of directories is labelled by
      their names).
    out_path: the PNG to write.
    target: draw this accuracy as a dashed line (optional).
    x: the x axis: ``sim_time_s`` (default), ``round`` or ``wall_time_s``.

  Returns:
    ``out_path``.

  Raises:
    ValueError: no runs, or a directory without ``metrics.jsonl``.
  """
  if not isinstance(run_dirs, Mapping):
    run_dirs = _labels(list(run_dirs))
  if not run_dirs:
    raise ValueError("plot_compare: no run directories given")
  runs = {label: load_run(d) for label, d in run_dirs.items()}
  return _save(compare_figure(runs, target=target, x=x), os.fspath(out_path))


def _labels(dirs: list) -> dict:
  """Short unique labels: paths relative to the directories' common
  parent."""
  dirs = [os.path.normpath(os.fspath(d)) for d in dirs]
  if len(dirs) == 1:
    return {os.path.basename(dirs[0]) or dirs[0]: dirs[0]}
  try:
    base = os.path.commonpath([os.path.abspath(d) for d in dirs])
  except ValueError:
    base = ""
  out = {}
  for d in dirs:
    label = os.path.relpath(os.path.abspath(d), base) if base else d
    if label in (".", ""):
      label = d
    while label in out:
      label += "'"
    out[label] = d
  return out


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="fedjax-bsa plot",
      description="PNG figures of run directories (written by `fedjax-bsa "
      "run --out DIR`). One directory: accuracy, batch sizes, noise scale "
      "and padding efficiency. Several: each one's figures and a comparison "
      "of accuracy against simulated time.")
  p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories")
  p.add_argument("--out", metavar="OUTDIR", help="where to write (default: "
                 "DIR/plots for each run, and the runs' common parent for "
                 "the comparison); with several runs, each gets "
                 "OUTDIR/<its label>/")
  p.add_argument("--target", type=float, default=None,
                 help="accuracy drawn as a dashed line in the comparison")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """``fedjax-bsa plot DIR [DIR ...] [--out OUTDIR] [--target ACC]``.

  ``argv`` are the arguments after ``plot`` (a leading ``plot`` that is not
  a directory is skipped). Prints the files written; a bad directory is a
  one-line error on stderr and exit code 2.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  if argv and argv[0] == "plot" and not os.path.isdir("plot"):
    argv = argv[1:]
  args = _parser().parse_args(argv)
  try:
    for d in args.dirs:  # check every directory before writing anything
      load_run(d)
    labels = _labels(args.dirs)
    written = []
    for label, d in labels.items():
      out = None
      if args.out:
        out = args.out if len(labels) == 1 else os.path.join(args.out, label)
      written += plot_run(d, out)
    if len(labels) > 1:
      if args.out:
        where = args.out
      else:
        where = os.path.commonpath([os.path.abspath(d) for d in args.dirs])
        if where in ("", os.path.sep) or not os.access(where, os.W_OK):
          where = os.getcwd()
      written.append(plot_compare(labels, os.path.join(
          where, "compare_accuracy.png"), target=args.target))
  except ValueError as e:
    print(f"fedjax-bsa plot: error: {e}", file=sys.stderr)
    return 2
  for path in written:
    print(path)
  return 0


if __name__ == "__main__":
  sys.exit(main())
