"""How large the batch lever's headroom can be at all.

``python -m fedjax_bsa.bench.headroom_bound`` searches the synchronous round's
headroom (:func:`fedjax_bsa.plans.goodput.headroom`: the best round with one
common batch over the best with each client at its own) over two clients
whose noise scale ``B_k``, per-step overhead ``o_k`` and speed ``v_k`` range
over stated boxes, for several batch ranges ``[b_min, b_max]``. Two clients
suffice: the common batch is set by the clients whose best batches lie
furthest apart. The largest value found is a lower bound on the supremum
(random search, then the best point refined by a local search); the report
also gives the best point, so that anyone can evaluate it again.

It answers the regime study's question "why does no cell reach headroom 2":
with one noise scale shared by the clients (the IID limit) the headroom
stays near 1.5 over ``[8, 128]`` whatever the devices; above 2 needs clients
whose noise scales differ by well over 10x *and* devices whose
``o_k v_k`` differ by about 1000x, paired the right way (the noisy client
on the fast device with a large per-step overhead).
"""

from __future__ import annotations

import argparse

import numpy as np

from fedjax_bsa.bench import harness
from fedjax_bsa.plans import goodput

__all__ = ["BOXES", "search", "main"]

#: name -> (log10 ranges of B, o [s], v [examples/s]); B None: one B shared.
BOXES = {
    "shared_B": dict(B=(0.0, 3.0), o=(-3.0, -1.0), v=(2.0, 4.0),
                     shared=True),
    "B_1_to_20": dict(B=(0.0, 1.3), o=(-3.0, -1.0), v=(2.0, 4.0),
                      shared=False),
    "B_1_to_100": dict(B=(0.0, 2.0), o=(-3.0, -1.0), v=(2.0, 4.0),
                       shared=False),
    "B_1_to_1000": dict(B=(0.0, 3.0), o=(-3.0, -1.0), v=(2.0, 4.0),
                        shared=False),
}
RANGES = [(8, 32), (1, 128), (8, 128), (8, 512)]   # the study: [1, 128]


def _headroom(x, batches, steps_ref=20):
  b_simple, o, v = 10.0 ** x[0:2], 10.0 ** x[2:4], 10.0 ** x[4:6]
  return goodput.headroom(b_simple, [np.inf, np.inf], o, v, [0.0, 0.0],
                          steps_ref, batches)


def search(box: dict, batches, samples: int, seed: int = 0):
  """``(best headroom, point)`` over ``box`` (see :data:`BOXES`); point is
  ``{B, o, v}`` per client."""
  rng = np.random.default_rng(seed)
  lo = np.array([box["B"][0]] * 2 + [box["o"][0]] * 2 + [box["v"][0]] * 2)
  hi = np.array([box["B"][1]] * 2 + [box["o"][1]] * 2 + [box["v"][1]] * 2)

  def draw(center=None, scale=None):
    x = (rng.uniform(lo, hi) if center is None
         else np.clip(center + rng.normal(0, scale, 6), lo, hi))
    if box["shared"]:
      x[1] = x[0]
    return x

  best_x = draw()
  best = _headroom(best_x, batches)
  for _ in range(samples):
    x = draw()
    h = _headroom(x, batches)
    if h > best:
      best, best_x = h, x
  for scale in (0.3, 0.1, 0.03):           # local refinement
    for _ in range(samples // 6):
      x = draw(best_x, scale)
      h = _headroom(x, batches)
      if h > best:
        best, best_x = h, x
  point = dict(B=(10.0 ** best_x[0:2]).tolist(),
               o=(10.0 ** best_x[2:4]).tolist(),
               v=(10.0 ** best_x[4:6]).tolist())
  return float(best), point


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog="python -m fedjax_bsa.bench.headroom_bound",
      description=__doc__.split("\n\n")[0])
  p.add_argument("--samples", type=int, default=6000)
  p.add_argument("--quick", action="store_true",
                 help="a smoke test: 200 samples, written as "
                      "headroom_bound_quick.json")
  p.add_argument("--out", default=None, metavar="DIR",
                 help="headroom_bound[_quick].json: " + harness.OUT_HELP)
  a = p.parse_args(argv)
  a.out = harness.results_dir(a.out, a.quick)
  if a.quick:
    a.samples = 200
  report = harness.new_report("headroom_bound", dict(samples=a.samples))
  rows = []
  for name, box in BOXES.items():
    for b_min, b_max in RANGES:
      h, point = search(box, np.arange(b_min, b_max + 1), a.samples)
      rows.append(dict(box=name, box_log10=box, batch_range=[b_min, b_max],
                       headroom=h, point=point))
      print(f"{name:12s} batches [{b_min}, {b_max}]: headroom >= {h:.2f}",
            flush=True)
  report["rows"] = rows
  harness.write_report(harness.finish_report(report), a.out,
                       "headroom_bound_quick" if a.quick else "headroom_bound")
  return 0

