"""Figures of finished runs, from the files a run writes (no display needed).

A run directory (``fedjax-bsa run --out DIR``,
:func:`fedjax_bsa.run.runner.run`) holds ``config.json``, ``metrics.jsonl``,
``clients.npz`` and ``summary.json``. :func:`plot_run` turns one into PNGs:

* ``accuracy.png``: test accuracy against simulated time and against rounds;
* ``batch_size.png``: every participating client's batch size per round, and
  the mean per device group (the resource tiers for ``resources=tiers``,
  otherwise speed terciles slow / mid / fast);
* ``noise_scale.png``: ``B_simple`` per round, median and inter-quartile band
  over the cohort, with the median batch for reference;
* ``padding_efficiency.png``: useful examples over kernel slots, per
  evaluated round.

:func:`plot_compare` draws several runs' accuracy against simulated time in
one figure; :func:`plot_sweep` does so for the experiments of a sweep folder
(``fedjax-bsa sweep --out DIR``), each line labelled by the settings that
differ. :func:`main` is the ``fedjax-bsa plot DIR [DIR ...] [--out OUT]``
command. Figures are built with :class:`matplotlib.figure.Figure` and written
by the Agg renderer: no pyplot state, no window, safe in notebooks and CI.

This module writes the files and holds the command; reading a run directory
(:class:`Run`, :func:`load_run`, :func:`client_groups`) is in
:mod:`fedjax_bsa.report.run_files` and the figures (:func:`accuracy_figure`,
:func:`batch_figure`, :func:`noise_figure`, :func:`padding_figure`,
:func:`compare_figure`) in :mod:`fedjax_bsa.report.run_figures`; both are
re-exported here.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

from matplotlib.figure import Figure

from fedjax_bsa.report.run_figures import accuracy_figure
from fedjax_bsa.report.run_figures import batch_figure
from fedjax_bsa.report.run_figures import compare_figure
from fedjax_bsa.report.run_figures import DPI
from fedjax_bsa.report.run_figures import noise_figure
from fedjax_bsa.report.run_figures import padding_figure
from fedjax_bsa.report.run_files import client_groups
from fedjax_bsa.report.run_files import is_sweep
from fedjax_bsa.report.run_files import load_run
from fedjax_bsa.report.run_files import load_sweep
from fedjax_bsa.report.run_files import Run

__all__ = ["Run", "load_run", "client_groups", "accuracy_figure",
           "batch_figure", "noise_figure", "padding_figure",
           "compare_figure", "plot_run", "plot_compare", "plot_sweep",
           "main"]


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


def plot_sweep(sweep_dir: str, out_dir: str | None = None, *,
               target: float | None = None) -> str:
  """One figure comparing a sweep's experiments: test accuracy against
  simulated time, each line labelled by its experiment and the settings
  that differ between the experiments.

  Args:
    sweep_dir: a sweep's output folder (``sweep.json``, ``exp_NNN/``).
    out_dir: where to write (default ``sweep_dir/plots``).
    target: draw this accuracy as a dashed line (optional).

  Returns:
    The path written, ``sweep_accuracy.png``.

  Raises:
    ValueError: no experiment of the sweep has records.
  """
  runs = load_sweep(sweep_dir)
  out_dir = os.fspath(out_dir) if out_dir else os.path.join(
      os.fspath(sweep_dir), "plots")
  return _save(compare_figure(runs, target=target),
               os.path.join(out_dir, "sweep_accuracy.png"))


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
      "of accuracy against simulated time. A sweep folder (`fedjax-bsa "
      "sweep --out DIR`): one figure comparing its experiments, each line "
      "labelled by the settings that differ (sweep_accuracy.png).")
  p.add_argument("dirs", nargs="+", metavar="DIR", help="run directories "
                 "or sweep folders")
  p.add_argument("--out", metavar="OUTDIR", help="where to write (default: "
                 "DIR/plots for each run or sweep, and the runs' common "
                 "parent for the comparison); with several folders, each "
                 "gets OUTDIR/<its label>/")
  p.add_argument("--target", type=float, default=None, metavar="ACC",
                 help="a target test accuracy (e.g. 0.9) drawn as a dashed "
                 "horizontal line in the comparison figure, to read off "
                 "when each run reaches it (default: none)")
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
    sweeps = [d for d in args.dirs if is_sweep(d)]
    dirs = [d for d in args.dirs if d not in sweeps]
    for d in sweeps:  # check every directory before writing anything
      load_sweep(d)
    for d in dirs:
      load_run(d)
    labels = _labels(args.dirs)
    several = len(labels) > 1
    written = []
    for label, d in labels.items():
      out = None
      if args.out:
        out = os.path.join(args.out, label) if several else args.out
      if is_sweep(d):
        written.append(plot_sweep(d, out, target=args.target))
      else:
        written += plot_run(d, out)
    labels = {k: d for k, d in labels.items() if not is_sweep(d)}
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
