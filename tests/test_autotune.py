"""The kernel layout chosen by measurement (fedjax_bsa.run.autotune)."""

import json

import numpy as np
import pytest

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.core.config import Config
from fedjax_bsa.kernel import layout as layout_lib
from fedjax_bsa.run import autotune
from fedjax_bsa.run.runner import run
from fedjax_bsa.setup import experiment

SMALL = dict(num_clients=12, clients_per_round=8, hidden=16, batch_size=8,
             local_steps=3, eval_every=5, progress=False)
quiet = lambda _: None


@pytest.fixture
def measuring(monkeypatch, tmp_path):
  """Layouts are measured, cached under ``tmp_path``; counts the kernels
  built."""
  monkeypatch.delenv(autotune.ENV_LAYOUT, raising=False)
  monkeypatch.setenv(autotune.ENV_CACHE, str(tmp_path))
  built = []
  make = kernel_lib.make_round_kernel

  def counting(*a, **kw):
    built.append((kw["lanes"], kw["microbatch"], kw["per_slot"]))
    return make(*a, **kw)
  monkeypatch.setattr(kernel_lib, "make_round_kernel", counting)
  return built


def _exp(**kw):
  return experiment.build(Config(**{**SMALL, **kw}).validate())


def test_measures_when_it_pays_keeps_the_fastest_and_caches_it(measuring):
  # a short run: the rule, timed once, without compiling the others
  short = _exp(rounds=2)
  lay = autotune.choose_layout(short, 1, 8, log=quiet)
  mu = short.cfg.kernel_microbatch
  rule = layout_lib.choose("cpu", 8, mu, 8)
  assert lay.how == "rule" and "not measured" in lay.note
  assert lay[:3] == (rule.lanes, mu, rule.per_slot)
  assert len(measuring) == 1
  assert autotune.choose_layout(short, 1, 8, log=quiet).how == "cached"
  # a long one (the cached decision was for a shorter run): measured
  del measuring[:]
  exp = _exp(rounds=100_000)
  lay = autotune.choose_layout(exp, 1, 8, log=quiet)
  cands = layout_lib.candidates("cpu", 8, 8, True)
  assert len(cands) > 1 and cands[0] == (rule.lanes, mu, rule.per_slot)
  assert lay.how == "measured"
  assert [t[:3] for t in lay.timings] == cands
  assert sorted(measuring) == sorted(cands)       # each compiled once
  assert lay[:3] == cands[int(np.argmin([t[3] for t in lay.timings]))]
  with open(autotune.cache_path()) as f:
    entries = json.load(f)
  assert [lay.lanes, lay.microbatch, lay.per_slot] in [
      e["layout"] for e in entries.values()]
  del measuring[:]
  again = autotune.choose_layout(exp, 1, 8, log=quiet)
  assert again.how == "cached" and measuring == [] and again[:3] == lay[:3]


def test_what_is_searched():
  cfg = Config(**SMALL)
  mu = cfg.kernel_microbatch
  # noise statistics on: the microbatch (the estimator's samples) is kept
  assert {c[1] for c in autotune.candidates_for(cfg, 64)} == {mu}
  assert len(autotune.candidates_for(cfg, 64)) == 2      # 16 or 64 lanes
  # off: the microbatch too
  assert autotune.candidates_for(cfg.replace(noise_stats=False), 8, 5) == [
      (5, 8, 1), (5, 4, 2)]
  # a controller that quantizes its batches to mu keeps it
  gp = cfg.replace(controller="goodput", noise_stats=False)
  assert {c[1] for c in autotune.candidates_for(gp, 8)} == {
      gp.kernel_microbatch}
  # settings win
  assert autotune.candidates_for(cfg.replace(per_slot=3), 8, 5) == [
      (5, mu, 3)]
  lay = autotune.choose_layout(_exp(lanes=3, microbatch=4, per_slot=2), 1,
                               8, log=quiet)
  assert lay[:4] == (3, 4, 2, "set")
  assert autotune.choose_layout(_exp(layout="rule"), 1, 8,
                                log=quiet).how == "rule"


def test_a_run_records_its_layout_and_computes_the_same(measuring):
  cfg = Config(**{**SMALL, "rounds": 10})
  ruled = run(cfg.replace(layout="rule"), print_table=False)
  assert ruled.summary["layout"]["how"] == "rule"
  # a cached measurement that picked a layout other than the rule's
  pick = layout_lib.candidates("cpu", 8, 8, True)[-1]
  assert pick != (ruled.summary["lanes"], ruled.summary["microbatch"],
                  ruled.summary["per_slot"])
  key = autotune._work_key(  # pylint: disable=protected-access
      experiment.build(cfg), 1, 8, (0, 0, 0))
  with open(autotune.cache_path(), "w") as f:
    json.dump({key: dict(layout=list(pick), timings=[], note="")}, f)
  res = run(cfg, print_table=False)
  assert res.summary["layout"]["how"] == "cached"
  assert (res.summary["lanes"], res.summary["microbatch"],
          res.summary["per_slot"]) == pick
  assert len(ruled.records) == len(res.records) == 3   # rounds 0, 5, 10
  for a, b in zip(ruled.records, res.records):
    assert a["round"] == b["round"]
    for k in ("test_accuracy", "train_loss", "mean_batch_size"):
      if a.get(k) is not None:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-3, atol=1e-3)
