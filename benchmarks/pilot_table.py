"""The method pilot's table: each method's speedup over the tuned fixed
batch, per cell and aggregation, from a study's ``regimes.json``.

``python -m benchmarks.pilot_table benchmarks/results/pilot_v31/regimes.json
--methods displacement,displacement_adascale,displacement_v30`` prints a
markdown table (median [90% interval] (seeds that reached the target,
diverged runs, final-accuracy gap in points)) and, per method, the median
over its rows.
"""

from __future__ import annotations

import argparse
import json

import numpy as np


def _fmt(m: dict | None) -> str:
  if not m:
    return "-"
  sp = m.get("speedup") or {}
  med, lo, hi = (sp.get(k) for k in ("median", "lo", "hi"))
  gap = m.get("accuracy_gap_points")
  num = lambda x: "inf" if x is None or not np.isfinite(x) else f"{x:.2f}"
  body = f"{num(med)}x [{num(lo)}, {num(hi)}]" if med is not None else "-"
  gap_s = "?" if gap is None else f"{gap:+.1f}"
  return (f"{body} ({m.get('reached', '?')}, div {m.get('diverged', 0)}, "
          f"gap {gap_s})")


def table(doc: dict, methods: list[str]) -> str:
  head = ("| dataset | alpha | local work | agg | tuned b | "
          + " | ".join(methods) + " |")
  lines = [head, "|" + "---|" * (5 + len(methods))]
  medians = {m: [] for m in methods}
  for name, ds in doc["datasets"].items():
    for c in ds["cells"]:
      for agg in ("fedavg", "fednova"):
        if f"fixed+{agg}" not in c["methods"]:
          continue
        row = [name, str(c["alpha"]), c["local_work"], agg,
               str(c["tuned"][agg]["batch"])]
        for m in methods:
          got = c["methods"].get(f"{m}+{agg}")
          row.append(_fmt(got))
          med = ((got or {}).get("speedup") or {}).get("median")
          if med is not None:
            medians[m].append(med)
        lines.append("| " + " | ".join(row) + " |")
  lines.append("")
  for m in methods:
    v = medians[m]
    lines.append(f"- `{m}`: median over {len(v)} rows "
                 f"{np.median(v):.2f}x (range {min(v):.2f}-{max(v):.2f}x)"
                 if v else f"- `{m}`: no rows")
  return "\n".join(lines)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("paths", nargs="+", help="regimes.json files")
  ap.add_argument("--methods", required=True, help="comma list")
  a = ap.parse_args(argv)
  doc = {"datasets": {}}
  for p in a.paths:
    with open(p) as fh:
      doc["datasets"].update(json.load(fh)["datasets"])
  print(table(doc, a.methods.split(",")))


if __name__ == "__main__":
  main()
