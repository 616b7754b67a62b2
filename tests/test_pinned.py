"""The same seeds give the same metrics across restructurings of the code:
the shared default run (``finished_run``) against the metrics the code
wrote before the package was split into layers (``tests/data/
pinned_default_run.json``, commit ce29a58). On the CPU that wrote them the
comparison is exact; on another CPU, XLA may order float sums differently,
so the comparison allows small differences there (and says so)."""

import json
import math
import pathlib

import numpy as np

from fedjax_bsa.run import autotune

PINNED = pathlib.Path(__file__).parent / "data" / "pinned_default_run.json"


def _close(a, b, exact: bool, rtol: float) -> bool:
  if a is None or b is None:
    return a is b
  if exact:
    return a == b
  return math.isclose(a, b, rel_tol=rtol, abs_tol=rtol)


def test_default_run_matches_the_pinned_metrics(finished_run):
  code, out = finished_run
  assert code == 0
  pinned = json.loads(PINNED.read_text())
  exact = pinned["cpu"] == (autotune.cpu_model() or "")
  got = [json.loads(l) for l in (out / "metrics.jsonl").read_text()
         .splitlines()]
  assert [r["round"] for r in got] == [r["round"] for r in pinned["records"]]
  rtol = 0.0 if exact else 0.05
  bad = []
  for want, have in zip(pinned["records"], got):
    assert set(want) <= set(have), set(want) - set(have)
    for key, value in want.items():
      if isinstance(value, (int, float)) or value is None:
        if not _close(value, have[key], exact, rtol):
          bad.append(f"round {want['round']} {key}: {have[key]} != {value}")
  assert not bad, "\n".join(bad)
  clients = np.load(out / "clients.npz")
  for key, value in pinned["clients"].items():
    value = np.asarray(value)
    if exact:
      np.testing.assert_array_equal(clients[key], value, err_msg=key)
    else:  # plans may flip where a float crosses an integer boundary
      assert np.mean(clients[key] != value) < 0.2, key
