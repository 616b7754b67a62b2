"""The regime study's markdown table and heatmap (from ``regimes.json``)."""

from __future__ import annotations

import math

import numpy as np

__all__ = ["markdown", "heatmap", "HEADLINE"]

#: The method the heatmap and the verdict show.
HEADLINE = "goodput+fednova"
_COLUMNS = ("goodput+fednova", "goodput+fedavg", "noise_scale+fednova",
            "adabatch+fednova", "resource_proportional+fednova",
            "fixed+fedavg", "fixed+fednova")
_LW = ("epochs", "steps", "deadline")


def _sp(m: dict | None, key: str = "speedup") -> str:
  if not m or not m.get(key) or m[key].get("median") is None:
    return "-"
  s = m[key]
  f = lambda x: "inf" if x is None else f"{x:.2f}"
  return f"{f(s['median'])}x [{f(s['lo'])}, {f(s['hi'])}]"


def _tuned(t: dict) -> str:
  """A tuned point: ``8``, or ``8@0.2`` for a (batch, rate) oracle."""
  return str(t["batch"]) + (f"@{t['lr']:g}" if t.get("lr") is not None
                            else "")


def _cost(c: dict | None) -> str:
  return "-" if not c else f"{c['runs']} ({c['sim_time_s'] / 60:.0f})"


def _order(c):
  return (str(c["dataset"]), c.get("alpha") or 0.0, c["devices"],
          _LW.index(c["local_work"]), c["comm_ratio"] or 0.0)


def _ref_time(c) -> str:
  t = [x for x in c["reference_runs"]["time_to_target_s"].values()
       if x is not None]
  return f"{np.median(t):.1f}" if t else "-"


def _minutes(seconds) -> str:
  return "an unknown time" if seconds is None else f"{seconds / 60:.1f} min"


def _replacements(rep: dict | None) -> list:
  """Lines naming the seeds run in place of seeds that could not draw a
  partition (none: no lines)."""
  if not rep:
    return []
  parts = []
  for alpha, kinds in sorted(rep.items()):
    for kind, m in sorted(kinds.items()):
      parts += [f"alpha {alpha}, {kind} seed {a} -> {b}"
                for a, b in sorted(m.items(), key=lambda kv: int(kv[0]))]
  return ["Seeds that could not draw their partition, and the seeds run in "
          "their place: " + "; ".join(parts) + ".", ""]


def markdown(rep: dict) -> str:
  """The study's tables, verdict and trends as markdown."""
  lines = ["# Regime study: speedup over the tuned fixed batch", "",
           "Speedup = the tuned fixed batch's simulated time to the cell "
           "target over the method's (median over reported seeds, "
           "[bootstrap 90% interval]); > 1 means faster. Target: 95% of the "
           "best fixed batch's final accuracy in the cell. Tuned fixed "
           "batch: chosen per cell and aggregation on tuning seeds that "
           "are not reported; the reference is the faster of the two.", ""]
  for name, d in rep["datasets"].items():
    st = d["settings"]
    lines += [f"## {name}", "",
              f"{len(d['cells'])} cells, {len(st['seeds'])} reported seeds, "
              f"{len(st['tuning'])} tuning seeds, {st['base']['rounds']} "
              f"rounds, batches {st['batches']}; its sweeps took "
              f"{_minutes(d.get('wall_s'))} on this machine.", ""]
    lines += _replacements(st.get("seed_replacements"))
    head = ["alpha", "devices", "local work", "comp/comm", "headroom",
            "target", "tuned b (avg/nova)", "ref s"] + list(_COLUMNS) + [
                f"{HEADLINE} acc gap (pts)", f"{HEADLINE} diverged",
            "tuning runs (sim. min)", f"{HEADLINE} incl. tuning"]
    lines += ["| " + " | ".join(head) + " |",
              "|" + "---|" * len(head)]
    for c in sorted(d["cells"], key=_order):
      m = c["methods"]
      gap = m.get(HEADLINE, {}).get("accuracy_gap_points")
      div = m.get(HEADLINE, {}).get("diverged")    # absent before it was kept
      row = [str(c.get("alpha") if c.get("alpha") is not None
                 else "natural"), c["devices"], c["local_work"],
             f"{c['comm_ratio']:g}",
             "-" if c.get("headroom") is None else f"{c['headroom']:.2f}",
             f"{c['target']:.3f}",
             "/".join(_tuned(c["tuned"][a]) for a in
                      ("fedavg", "fednova") if a in c["tuned"]),
             _ref_time(c)] + [_sp(m.get(k)) for k in _COLUMNS] + [
                 "-" if gap is None else f"{gap:+.1f}",
                 "-" if div is None else str(div),
                 _cost(c.get("tuning_cost")),
                 _sp(m.get(HEADLINE), "speedup_incl_tuning")]
      lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for part in d.get("parts", [d]):
      ps = part["settings"]
      lines += [f"Published trends, rechecked on the part with alphas "
                f"{ps['alphas']}, devices {ps['devices']}, local work "
                f"{ps['local_work']}, ratios {ps['comm']} "
                f"({_minutes(part.get('wall_s'))}):", ""]
      for k, t in part["trends"].items():
        detail = {x: y for x, y in t.items() if x not in ("claim",
                                                          "reproduced")}
        lines.append(f"- **{k}**: {t['claim']} - reproduced: "
                     f"**{t['reproduced']}** ({detail})")
      lines.append("")
  v = rep.get("verdict", [])
  q = [x for x in v if x["qualifies"]]
  met = [x for x in q if x["met"]]
  lines += ["## Target", "",
            f"`{HEADLINE}` >= 1.5x (median, interval above 1.0x, accuracy "
            f"within 1 point) in the non-IID, heterogeneous-device cells "
            f"with headroom >= 2: met in {len(met)} of {len(q)} qualifying "
            f"cells ({len(v)} non-IID heterogeneous cells in all).", ""]
  return "\n".join(lines) + "\n"


def heatmap(rep: dict, path: str) -> None:
  """``HEADLINE``'s median speedup across local work x compute/comm ratio,
  one panel per dataset x alpha x devices, headroom in each square."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  panels = {}
  for c in rep["cells"]:
    panels.setdefault((c["dataset"], c.get("alpha"), c["devices"]),
                      []).append(c)
  keys = sorted(panels, key=lambda k: (k[0], k[1] or 0.0, k[2]))
  cols = 2
  rows = max(1, math.ceil(len(keys) / cols))
  fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.2 * rows),
                           squeeze=False, layout="constrained")
  norm = matplotlib.colors.LogNorm(vmin=0.25, vmax=4.0)
  im = None
  for ax, key in zip(axes.flat, keys):
    cs = panels[key]
    ratios = sorted({c["comm_ratio"] for c in cs})
    lws = [lw for lw in _LW if any(c["local_work"] == lw for c in cs)]
    grid = np.full((len(lws), len(ratios)), np.nan)
    for c in cs:
      i, j = lws.index(c["local_work"]), ratios.index(c["comm_ratio"])
      sp = c["methods"].get(HEADLINE, {}).get("speedup", {})
      med = sp.get("median")
      grid[i, j] = np.clip(med, 0.25, 4.0) if med is not None else np.nan
      h = c.get("headroom")
      # a median of 0: most seeds never reached the target
      label = ("-" if med is None else "target\nnot reached" if med == 0
               else f"{med:.2f}x")
      ax.text(j, i, label +
              ("" if h is None else f"\nheadroom {h:.2f}"),
              ha="center", va="center", fontsize=8,
              color="white" if med is not None and not 0.4 < med < 2.5
              else "black")
    ran = {(c["local_work"], c["comm_ratio"]) for c in cs}
    for i, lw in enumerate(lws):
      for j, r in enumerate(ratios):
        if (lw, r) not in ran:   # grey, not white (white reads as 1x)
          ax.text(j, i, "not run", ha="center", va="center", fontsize=8,
                  color="dimgray")
    cmap = matplotlib.colormaps["RdBu"].with_extremes(bad="#d9d9d9")
    im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
    ax.set_xticks(range(len(ratios)), [f"{r:g}" for r in ratios])
    ax.set_yticks(range(len(lws)), lws)
    ax.set_xlabel("compute / communication")
    alpha = "natural clients" if key[1] is None else f"alpha {key[1]:g}"
    ax.set_title(f"{key[0]}, {alpha}, {key[2]}", fontsize=9)
  for ax in list(axes.flat)[len(keys):]:
    ax.axis("off")
  if im is not None:
    bar = fig.colorbar(im, ax=axes, shrink=0.8,
                       label=f"{HEADLINE} speedup over the tuned fixed "
                       "batch")
    ticks = [0.25, 0.5, 1.0, 2.0, 4.0]
    bar.set_ticks(ticks, labels=[f"{t:g}x" for t in ticks])
    bar.minorticks_off()
  fig.savefig(path, dpi=110, bbox_inches="tight")
  plt.close(fig)
