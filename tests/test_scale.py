"""The scale benchmark's pieces, and a 10,000-client quantity-skewed run."""

import doctest
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.data import federated
from fedjax_bsa.kernel import layout as layout_lib

from benchmarks import scale

N = 10_000


@pytest.fixture(scope="module")
def fed():
  return scale.make_federation(N, seed=0)


def test_doctests():
  failures, tried = doctest.testmod(scale, optionflags=doctest.ELLIPSIS)
  assert tried >= 4 and failures == 0


def test_federation_is_quantity_skewed_and_stored_once(fed):
  total = N * scale.MEAN_EXAMPLES
  want = federated.lognormal_sizes(total, N, 2.0, 0, scale.MIN_EXAMPLES)
  np.testing.assert_array_equal(fed.sizes, want)
  assert fed.sizes.min() == scale.MIN_EXAMPLES
  assert fed.sizes.max() > 50 * np.median(fed.sizes)  # sigma = 2: heavy tail
  d = fed.data
  assert d.x.shape == (total, scale.NUM_FEATURES) and d.x.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(d.rows), np.arange(total))
  np.testing.assert_array_equal(
      np.asarray(d.offset), np.concatenate([[0], np.cumsum(want)[:-1]]))
  np.testing.assert_array_equal(np.asarray(d.num_examples), want)
  # bytes: raw x and y, 4 per row, 8 per client, nothing else
  b = scale.data_bytes(d)
  assert b["total"] == sum(a.nbytes for a in d)
  assert b["raw"] == total * (4 * scale.NUM_FEATURES + 4)
  assert b["total"] == b["raw"] + 4 * total + 8 * N
  assert b["total"] <= 1.1 * b["raw"] + 8 * N
  # every class occurs, clients differ (the feature means v_k)
  y = np.asarray(d.y)
  assert np.bincount(y, minlength=scale.NUM_CLASSES).min() > 0
  big = np.argsort(fed.sizes)[-2:]
  means = [np.asarray(d.x[o:o + n]).mean(0) for o, n in
           zip(np.asarray(d.offset)[big], fed.sizes[big])]
  assert np.abs(means[0] - means[1]).max() > 0.5


def _check_packing(slots, lanes, lane, start, load):
  busy = slots > 0
  assert (lane[~busy] == lanes).all() and (lane[busy] < lanes).all()
  for l in range(lanes):
    on = np.flatnonzero(busy & (lane == l))
    ends = sorted(zip(start[on], start[on] + slots[on]))
    # a lane's jobs follow each other from slot 0, without gap or overlap
    assert [a for a, _ in ends] == ([0] + [e for _, e in ends[:-1]])[
        :len(ends)]
    assert load[l] == slots[on].sum()


def test_waterfill_pack_lanes_is_a_valid_packing_close_to_lpt(fed):
  rng = np.random.default_rng(0)
  fill = jax.jit(scale.waterfill_pack_lanes, static_argnums=1)
  lpt_pack = jax.jit(layout_lib.pack_lanes, static_argnums=1)
  for lanes, jobs in ((1, 7), (3, 2), (16, 1000), (250, 1000)):
    skewed = -(-fed.sizes[rng.choice(N, jobs, replace=False)] // 8)
    for slots in (skewed, rng.integers(0, 60, size=jobs)):
      slots = slots.astype(np.int32)
      slots[rng.integers(0, jobs, jobs // 10)] = 0
      out = fill(jnp.asarray(slots), lanes)
      lane, start, load = map(np.asarray, out)
      _check_packing(slots, lanes, lane, start, load)
      lpt = int(np.asarray(lpt_pack(jnp.asarray(slots), lanes)[2]).max())
      p = np.sort(slots)[::-1]
      lower = max(int(p[0]), -(-int(slots.sum()) // lanes))
      assert lower <= load.max() <= max(lpt, lower) * 1.5
      if jobs > lanes:  # the docstring's bound, with H <= sum / L
        assert load.max() <= max(p[0], slots.sum() / lanes + p[lanes])


@pytest.mark.parametrize("kind", ["library", "topk", "permute"])
def test_sample_cohort_draws_distinct_clients(kind):
  draw = jax.jit(lambda k: scale.sample_cohort(kind, k, 50, 10))
  counts = np.zeros(50)
  for i in range(400):
    c = np.asarray(draw(jax.random.key(i)))
    assert len(set(c.tolist())) == 10 and c.min() >= 0 and c.max() < 50
    counts[c] += 1
  # each client is in 10/50 of the cohorts: 80 of 400, sd 8
  assert np.abs(counts - 80).max() < 40


def test_the_library_variant_runs_the_librarys_sampler(fed):
  """The benchmarked ``library`` path is the library's: the round loop is
  given :func:`fedjax_bsa.run.simulate.sample_cohort` itself, and the
  benchmark's compiled rounds draw the cohorts the library's own
  simulation (no sampler given) draws for the same seed. A what-if variant
  changes the cohorts the loop draws, and only them."""
  from fedjax_bsa.run import simulate
  assert scale.SAMPLERS["library"] is simulate.sample_cohort
  assert scale.cohort_sampler("library") is simulate.sample_cohort
  rounds = 2

  def timed(kind):
    t = scale._Timed(fed, 16, kind, 0, rounds, {})  # pylint: disable=protected-access
    for _ in range(rounds):
      t.step(record=True)
    return t

  lib = timed("library")
  assert lib.sample is simulate.sample_cohort
  sim = simulate.make_simulation(lib.run.exp, 1, chunk=1)
  st = scale._init(sim, fed, lib.run, 0)  # pylint: disable=protected-access
  step = jax.jit(sim.run_chunk)
  for got in lib.cohorts:
    st, m = step(st, fed.data, lib.run.inputs, np.int32(1))
    np.testing.assert_array_equal(got, np.asarray(m.cohort)[0, 0])
  other = timed("permute")
  assert other.sample is scale.SAMPLERS["permute"]
  for got, want in zip(other.cohorts, lib.cohorts):
    assert len(set(got.tolist())) == 16
    assert set(got.tolist()) != set(want.tolist())
  with pytest.raises(ValueError, match="sampler='nope'"):
    scale.cohort_sampler("nope")


def test_linearity_splits_the_cost_ratio():
  def res(cost, eff):
    steps = [int(1e-3 / cost), int(2e-3 / cost)]
    return {"cost_s_per_example": {"median": cost},
            "padding_efficiency": {"median": eff},
            "per_round": {"time_s": [0.002 + 1e-4 * n for n in steps],
                          "slot_steps": steps}}
  out = scale._linearity(  # pylint: disable=protected-access
      {"10": res(3e-6, 0.5), "100": res(1.2e-6, 0.9), "1000": res(1e-6, 1.0)},
      "library", "epochs")
  c = out["cohorts"]
  assert out["ratios"] == {"10": 3.0, "100": 1.2, "1000": 1.0}
  assert c["10"]["imbalance_ratio"] == 2.0
  assert c["10"]["overhead_ratio"] == pytest.approx(1.5)
  assert c["100"]["overhead_ratio"] == pytest.approx(1.2 * 0.9)
  assert [c[k]["within_target"] for k in ("10", "100", "1000")] == [
      False, True, True]
  assert not out["met"]
  fit = out["round_time_fit"]
  assert fit["fixed_s_per_round"] == pytest.approx(0.002)
  assert fit["s_per_slot_step"] == pytest.approx(1e-4)


def test_ten_thousand_client_run_learns(fed, tmp_path):
  # main regenerates the same federation (make_federation's jit is warm)
  majority = np.bincount(np.asarray(fed.y_test)).max() / len(fed.y_test)
  report = scale.main([
      "--clients", str(N), "--cohorts", "200", "--rounds", "3",
      "--warmup", "1", "--variants", "library", "--prepare-path", "yes",
      "--out", str(tmp_path), "--machine", "test"])
  saved = json.loads((tmp_path / "scale_test.json").read_text())
  assert saved["workload"]["clients"] == N
  assert saved["data_bytes"]["ratio_to_raw_plus_per_client"] <= 1.1
  runs = saved["variants"]["library"]["cohorts"]
  assert set(runs) == {"200"}
  for r in runs.values():
    # what the simulator processed is what one epoch of batch 8 asks
    assert r["examples_equal_protocol"]
    assert r["compiles"] == 1
    assert 0 < r["padding_efficiency"]["min"] <= 1
    assert r["time_per_round_s"]["median"] > 0
  acc0, acc1 = runs["200"]["test_accuracy"]
  assert acc0 < majority < majority + 0.05 < acc1
  ratios = saved["variants"]["library"]["ratios"]
  assert ratios == {"200": 1.0}
  prof = saved["profile"]
  assert prof["cohort"] == 200
  assert prof["makespan_lower_bound"] <= prof["makespan_pack_lanes"]
  assert set(prof["seconds"]) >= {"sample_library", "sample_choice", "pack_lanes",
                                  "kernel"}
  assert "driver.prepare (total)" in saved["prepare_path"]
  assert report["variants"]["library"]["ratios"] == ratios
