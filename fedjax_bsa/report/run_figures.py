"""Figures of finished runs, as :class:`matplotlib.figure.Figure` objects.

One run (a :class:`~fedjax_bsa.report.run_files.Run`): :func:`accuracy_figure`,
:func:`batch_figure`, :func:`noise_figure`, :func:`padding_figure`; several
runs: :func:`compare_figure`. Figures are built without pyplot state and
drawn by the Agg renderer (no window). :mod:`fedjax_bsa.report.plot` writes
them to PNG files and re-exports everything here.
"""

from __future__ import annotations

import warnings
from typing import Mapping

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

from fedjax_bsa.report.run_files import client_groups
from fedjax_bsa.report.run_files import Run
from fedjax_bsa.report.run_files import series

__all__ = ["DPI", "accuracy_figure", "batch_figure", "noise_figure",
           "padding_figure", "compare_figure"]

DPI = 110
# line i of a comparison: colour C(i mod 10), style and marker by i // 10,
# so 40 lines stay distinct
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D")


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
    x, y = series(run.records, key, "test_accuracy")
    if x.size:
      ax.plot(x, y, marker="o", ms=3)
      best = int(np.argmax(y))
      ax.axhline(y[best], color="0.7", lw=0.8, ls="--",
                 label=f"best {y[best]:.4f}")
      ax.legend(fontsize=8, loc="lower right")
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
    # a tick at every power of two, written as plain numbers
    ax.yaxis.set_major_locator(LogLocator(base=2, numticks=20))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="best")
  ax.set_title("per-client batch size (dots), by device group"
               + ("; dotted: memory cap" if shown else ""), fontsize=9)
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
  x, y = series(run.records, "round", "padding_efficiency")
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


def compare_figure(runs: Mapping[str, Run], *, target: float | None = None,
                   x: str = "sim_time_s") -> Figure:
  """Test accuracy of several runs against ``x`` (``sim_time_s``,
  ``round`` or ``wall_time_s``), one line each (colours cycle every 10
  lines; line style and marker change with each cycle)."""
  xlabel = {"sim_time_s": "simulated time (s)", "round": "round",
            "wall_time_s": "host wall-clock time (s)"}.get(x, x)
  many = len(runs) > 10
  fig = _figure(8.4 if many else 6.4, 4.2)
  ax = fig.subplots()
  for i, (label, run) in enumerate(runs.items()):
    xs, ys = series(run.records, x, "test_accuracy")
    ax.plot(xs, ys, marker=_MARKERS[i // 10 % len(_MARKERS)], ms=2.5,
            color=f"C{i % 10}", ls=_STYLES[i // 10 % len(_STYLES)],
            label=label)
  if target is not None:
    ax.axhline(target, color="0.4", ls="--", lw=0.8,
               label=f"target {target:g}")
  ax.set_xlabel(xlabel)
  ax.set_ylabel("test accuracy")
  ax.grid(alpha=0.3)
  if many:  # beside the axes, so that it hides no line
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
  else:
    ax.legend(fontsize=8, loc="lower right")
  return fig
