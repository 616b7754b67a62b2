"""v3 (`displacement`) on the committed study's diverging MNIST-1D settings.

In the regime study `goodput` and `noise_scale` diverged on MNIST-1D at
alpha 0.1 on heterogeneous devices, with FedAvg and one local epoch and with
FedNova under the FedBalancer deadline. This runs v3 there (3 seeds, 200
rounds, the study's settings and its ratio-1 bandwidth) and records, per
run, whether it diverged, its rounds, final accuracy and the clients whose
model went non-finite (left out of their round's average). It also runs
v3 with FedAvg and 20 local steps on both alphas and both device profiles,
where two of its twelve runs diverged before failed clients were left out
(2026-12-03).

  python -m benchmarks.v3_divergence           # benchmarks/results/pilot_v31
  python -m benchmarks.v3_divergence --quick   # 10 rounds, 1 seed

Writes ``v3_divergence.json`` (``--quick``: ``v3_divergence_quick.json`` in
``runs/benchmarks``) into ``--out``; the sweeps are cached in
``--out/regimes_cache`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fedjax_bsa.bench import harness
from fedjax_bsa.bench.study import cells

#: (local work, aggregation, alphas, devices)
SETTINGS = [("epochs", "fedavg", [0.1], ["heterogeneous"]),
            ("deadline", "fednova", [0.1], ["heterogeneous"]),
            ("steps", "fedavg", [0.1, 1.0], ["homogeneous", "heterogeneous"])]


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m benchmarks.v3_divergence",
                              description=__doc__.split("\n")[0])
  p.add_argument("--quick", action="store_true",
                 help="10 rounds, 1 seed, 600 examples (a smoke test)")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="where v3_divergence[_quick].json goes (default "
                 "benchmarks/results/pilot_v31; --quick: runs/benchmarks)")
  args = p.parse_args(argv)
  out_dir = args.out or (harness.QUICK_DIR if args.quick
                         else os.path.join(harness.RESULTS_DIR, "pilot_v31"))
  seeds = [0] if args.quick else [0, 1, 2]
  out = harness.new_report("v3_divergence", dict(
      settings=[f"{lw}+{agg}" for lw, agg, _, _ in SETTINGS], seeds=seeds,
      quick=args.quick))
  out["runs"] = {}
  for lw, agg, alphas, devices in SETTINGS:
    st = cells.Study("mnist1d", alphas=alphas, devices=devices,
                       local_work=[lw], comm=[1.0], seeds=seeds,
                       rounds=10 if args.quick else None,
                       cache_dir=os.path.join(out_dir, "regimes_cache"),
                       log=cells.log_to_stderr)
    if args.quick:
      st.base = st.base.replace(num_examples=600, num_clients=20)
    exps = [dict(ov, seed=s, id=json.dumps([cell, None, s], sort_keys=True))
            for cell, ov in st.cells(lw) for s in st.seeds]
    runs = st.sweep("report", lw, agg, "displacement",
                    cells.METHODS["displacement"], exps)
    out["runs"][f"{lw}+{agg}"] = [
        dict(cell=json.loads(r["id"])[0], seed=json.loads(r["id"])[2],
             diverged=r.get("diverged"),
             rounds=(r["rounds"][-1] if r.get("rounds") else None),
             final_accuracy=r.get("final_accuracy"),
             failed_clients=r.get("failed_clients"))
        for r in runs]
  out["diverged"] = sum(bool(r["diverged"]) for rs in out["runs"].values()
                        for r in rs)
  path = harness.write_report(
      out, out_dir, "v3_divergence_quick" if args.quick else "v3_divergence")
  print(f"{out['diverged']} diverged of "
        f"{sum(len(r) for r in out['runs'].values())}; wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
