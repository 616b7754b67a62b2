"""Tests for fedjax_bsa.plans.deadline: round-deadline rules and their helpers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.core import registry
from fedjax_bsa.plans import clock
from fedjax_bsa.plans import deadline
from fedjax_bsa.plans.deadline import (check_deadline_seconds, check_quantile,
                                 compute_comm_ratio, deadline_steps,
                                 one_epoch_time, round_deadline)
from fedjax_bsa.setup.resources import make_resources


def _rd(rule, t, active=True, **kw):
  t = jnp.asarray(t, jnp.float32)
  return float(round_deadline(rule, t, jnp.broadcast_to(active, t.shape),
                              **kw))


def _fedbalancer_reference(times, active):
  """Brute force over the candidate deadlines; ties to the smallest D."""
  cand = sorted(float(t) for t, a in zip(times, active) if a)
  if not cand:
    return 0.0
  best, best_rate = None, -1.0
  for d in cand:
    rate = sum(1 for t, a in zip(times, active) if a and t <= d) / d
    if rate > best_rate:
      best, best_rate = d, rate
  return best


# ------------------------------------------------------------- validation ---

BUILT_IN = ("fixed", "quantile", "fedbalancer")


def test_rules_registered_with_their_properties():
  assert registry.DEADLINE_RULES.names()[:3] == BUILT_IN
  assert registry.DEADLINE_RULES.get("fixed") is deadline.fixed_deadline
  assert [registry.DEADLINE_RULES.prop(r, "takes_deadline")
          for r in BUILT_IN] == [True, False, False]


@pytest.mark.parametrize("rule", ["median", "", None, 3, "Fixed"])
def test_unknown_rule_names_setting_and_allowed(rule):
  with pytest.raises(ValueError, match="deadline_rule") as e:
    round_deadline(rule, jnp.ones(3), True, seconds=1.0, quantile=0.5)
  assert repr(rule) in str(e.value)
  assert all(r in str(e.value) for r in BUILT_IN)
  assert "\n" not in str(e.value)


def test_a_registered_rule_is_looked_up_by_name():
  @registry.DEADLINE_RULES.register("test_max")
  def slowest(cfg, hp):
    del cfg, hp
    return lambda t, a: jnp.max(jnp.where(a, t, 0.0))
  try:
    assert _rd("test_max", [2.0, 7.0, 5.0], jnp.array([1, 0, 1], bool)) == 5
  finally:
    registry.DEADLINE_RULES._items.pop("test_max")  # pylint: disable=protected-access


@pytest.mark.parametrize("q", [0, 0.0, -0.1, 1.5, 1.0000001, float("nan"),
                               float("inf"), None, "0.5", True])
def test_bad_quantile(q):
  with pytest.raises(ValueError, match=r"deadline_quantile=.*\(0, 1\]") as e:
    check_quantile(q)
  assert repr(q) in str(e.value)
  with pytest.raises(ValueError, match="deadline_quantile"):
    round_deadline("quantile", jnp.ones(3), True, quantile=q)


@pytest.mark.parametrize("q", [1e-6, 0.5, 1, 1.0])
def test_good_quantile(q):
  assert check_quantile(q) == float(q)


@pytest.mark.parametrize("s", [0, 0.0, -1.0, -1e-9, float("nan"),
                               float("inf"), None, "5", False])
def test_bad_fixed_seconds(s):
  with pytest.raises(ValueError, match=r"deadline=.*fixed.*> 0") as e:
    check_deadline_seconds(s)
  assert repr(s) in str(e.value)
  with pytest.raises(ValueError, match="deadline="):
    round_deadline("fixed", jnp.ones(3), True, seconds=s)


def test_messages_are_one_line():
  for fn, bad in ((check_quantile, 2.0), (check_deadline_seconds, -1.0)):
    with pytest.raises(ValueError) as e:
      fn(bad)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- timing ---

def test_one_epoch_time_by_hand():
  res = make_resources("uniform", 4, 0, base_speed=20.0, step_overhead=0.25,
                       bandwidth=500.0, latency=0.5)
  n = jnp.array([0, 1, 20, 21])
  # comm = 1000/500 * 2 + 2 * 0.5 = 5 s; a step of 10 costs 0.25 + 0.5 s.
  got = one_epoch_time(res, 10, n, 1000)
  np.testing.assert_allclose(got, [5.0, 5.75, 6.5, 7.25], rtol=1e-6)
  assert got.dtype == jnp.float32 and got.shape == (4,)
  per_client_batch = one_epoch_time(res, jnp.array([1, 5, 20, 7]), n, 1000)
  # steps: 0, 1, 1, 3; step costs 0.3, 0.5, 1.25, 0.6
  np.testing.assert_allclose(per_client_batch, [5.0, 5.5, 6.25, 6.8],
                             rtol=1e-6)


def test_one_epoch_time_matches_formula_on_random_cohort():
  rng = np.random.default_rng(0)
  res = make_resources("lognormal", 64, seed=3, step_overhead=0.02)
  b = rng.integers(1, 100, 64)
  n = rng.integers(0, 500, 64)
  want = (np.ceil(n / b) * (res.step_overhead.astype(np.float64)
                            + b / res.speed.astype(np.float64))
          + 4e5 / res.bandwidth_down + 4e5 / res.bandwidth_up)
  np.testing.assert_allclose(one_epoch_time(res, b, n, 4e5), want,
                             rtol=2e-6)


# ----------------------------------------------------------------- rules ---

def test_fixed_rule_ignores_cohort():
  assert _rd("fixed", [1.0, 50.0], seconds=7.5) == 7.5
  assert _rd("fixed", [1.0, 50.0], False, seconds=7.5) == 7.5


@pytest.mark.parametrize("q, want", [(0.2, 1.0), (0.21, 2.0), (0.4, 2.0),
                                     (0.5, 3.0), (0.6, 3.0), (0.8, 4.0),
                                     (0.99, 5.0), (1.0, 5.0), (1e-6, 1.0)])
def test_quantile_by_hand(q, want):
  # ceil(q * 5)-th smallest of 5 active times
  assert _rd("quantile", [5.0, 1.0, 3.0, 2.0, 4.0], quantile=q) == want


def test_quantile_float32_rank_is_exact():
  t = np.arange(1.0, 11.0)  # 0.3 * 10 is 3.0000001 in float32
  for q, want in ((0.3, 3.0), (0.7, 7.0), (0.1, 1.0), (0.9, 9.0)):
    assert _rd("quantile", t, quantile=q) == want
    assert np.quantile(t, q, method="inverted_cdf") == want


_K = 32  # random cohorts are padded to this size with inactive clients


def _random_cohorts(seed, n, low, high, ties):
  """``n`` cohorts of ``_K`` times; a random prefix size and mask is active."""
  rng = np.random.default_rng(seed)
  t = rng.uniform(low, high, (n, _K)).astype(np.float32)
  tie = rng.random(n) < ties
  t[tie] = np.ceil(t[tie] / 5) * 5  # many equal times
  size = rng.integers(0, _K + 1, n)
  active = (np.arange(_K) < size[:, None]) & (rng.random((n, _K)) < 0.8)
  return rng, t, active


_QUANTILE_BATCH = jax.jit(jax.vmap(
    lambda t, a, q: round_deadline("quantile", t, a, quantile=q)))
_FEDBALANCER_BATCH = jax.jit(jax.vmap(
    lambda t, a: round_deadline("fedbalancer", t, a)))


def test_quantile_matches_numpy_inverted_cdf():
  rng, t, active = _random_cohorts(1, 300, 0.5, 100.0, ties=0.3)
  q = rng.uniform(0.01, 1.0, 300)
  q[:40] = 1.0
  q[40:80] = np.array([0.25, 0.5, 0.75, 0.1])[np.arange(40) % 4]
  got = np.asarray(_QUANTILE_BATCH(t, active, q.astype(np.float32)))
  for i in range(300):
    if not active[i].any():
      assert got[i] == 0.0
    else:
      want = np.quantile(t[i][active[i]].astype(np.float64),
                         q[i], method="inverted_cdf")
      assert got[i] == want, (t[i], active[i], q[i])


def test_ties():
  assert _rd("quantile", [2.0, 2.0, 2.0, 5.0], quantile=0.5) == 2.0
  assert _rd("quantile", [2.0, 2.0, 2.0, 5.0], quantile=0.76) == 5.0
  # fedbalancer: rates 1/1 = 2/2 (tie, smallest wins), 3/4.
  assert _rd("fedbalancer", [4.0, 2.0, 1.0]) == 1.0
  # duplicate times count together: at 2 -> 2/2, at 3 -> 3/3: tie -> 2.
  assert _rd("fedbalancer", [3.0, 2.0, 2.0]) == 2.0
  # at 2 -> 3/2 beats 4/3.
  assert _rd("fedbalancer", [3.0, 2.0, 2.0, 2.0]) == 2.0


def test_fedbalancer_by_hand():
  # rates: 1/2, 2/3, 3/4, 4/10 -> 4
  assert _rd("fedbalancer", [10.0, 2.0, 4.0, 3.0]) == 4.0
  # rates: 1/1, 2/9, 3/10 -> 1
  assert _rd("fedbalancer", [9.0, 1.0, 10.0]) == 1.0
  # rates: 1/5, 2/5.5, 3/6 -> 6
  assert _rd("fedbalancer", [5.0, 5.5, 6.0]) == 6.0


def test_one_active_client():
  t = [7.0, 3.0, 11.0]
  active = jnp.array([False, False, True])
  for q in (0.01, 0.5, 1.0):
    assert _rd("quantile", t, active, quantile=q) == 11.0
  assert _rd("fedbalancer", t, active) == 11.0
  assert _rd("fixed", t, active, seconds=2.0) == 2.0


def test_no_active_client():
  t = [7.0, 3.0, 11.0]
  assert _rd("quantile", t, False, quantile=0.5) == 0.0
  assert _rd("fedbalancer", t, False) == 0.0
  assert _rd("quantile", jnp.zeros((0,)), True, quantile=0.5) == 0.0
  assert _rd("fedbalancer", jnp.zeros((0,)), True) == 0.0


def test_unavailable_clients_are_excluded():
  t = [0.1, 3.0, 4.0, 1000.0]
  active = jnp.array([False, True, True, False])
  assert _rd("quantile", t, active, quantile=0.5) == 3.0
  assert _rd("quantile", t, active, quantile=1.0) == 4.0
  assert _rd("fedbalancer", t, active) == 4.0  # 1/3 < 2/4
  # with the fast client available, it wins: 1/0.1
  assert _rd("fedbalancer", t, True) == pytest.approx(0.1)


def test_fedbalancer_matches_candidate_brute_force():
  _, t, active = _random_cohorts(2, 300, 0.5, 60.0, ties=0.3)
  got = np.asarray(_FEDBALANCER_BATCH(t, active))
  for i in range(300):
    want = _fedbalancer_reference(t[i].astype(np.float64), active[i])
    if got[i] != want:  # float32 rates may only reorder exact-rate ties
      rate = lambda d, i=i: np.sum(active[i] & (t[i] <= d)) / d
      assert rate(got[i]) == pytest.approx(rate(want), rel=1e-6)


def test_fedbalancer_against_a_fine_grid_of_deadlines():
  _, t, active = _random_cohorts(3, 20, 1.0, 60.0, ties=0.0)
  active[:, 0] = True
  got = np.asarray(_FEDBALANCER_BATCH(t, active), np.float64)
  grid = np.linspace(0.5, 61.0, 200_001)
  h = grid[1] - grid[0]
  for i in range(20):
    ta = np.sort(t[i][active[i]].astype(np.float64))
    rate = np.searchsorted(ta, grid, side="right") / grid
    d_grid = grid[np.argmax(rate)]
    got_rate = np.sum(ta <= got[i]) / got[i]
    # the continuous optimum is at least the grid's best, and the grid's
    # best sits on the first grid point at or after it
    assert got_rate >= rate.max() - 1e-12
    assert got[i] <= d_grid <= got[i] + h


def test_fedbalancer_is_the_integer_scan_of_the_reference_code_when_whole():
  # On whole-second times the authors' scan D = 1, 2, ... (first maximum)
  # and the continuous rule pick the same deadline.
  rng = np.random.default_rng(4)
  t = rng.integers(1, 40, (100, _K)).astype(np.float32)
  active = np.arange(_K) < rng.integers(1, _K + 1, 100)[:, None]
  got = np.asarray(_FEDBALANCER_BATCH(t, active))
  for i in range(100):
    ta = t[i][active[i]]
    scan_best, scan_rate = -1, -1.0
    for d in range(1, int(ta.max()) + 1):
      r = np.sum(ta <= d) / d
      if scan_rate < r:
        scan_best, scan_rate = d, r
    assert got[i] == scan_best


# -------------------------------------------------------------- steps ---

def test_deadline_steps_by_hand():
  res = make_resources("uniform", 3, 0, base_speed=100.0, step_overhead=0.5,
                       bandwidth=1e3)
  # comm 2 s, a step of 50 costs 1 s
  got = deadline_steps(res, 50, jnp.array([1.5, 10.0, 10.5]), 1000,
                       max_steps=100)
  assert got.tolist() == [0, 8, 8]
  assert got.dtype == jnp.int32
  assert deadline_steps(res, 50, 10.0, 1000, max_steps=3).tolist() == [3] * 3
  caps = jnp.array([1, 20, 0])
  assert deadline_steps(res, 50, 10.0, 1000, caps).tolist() == [1, 8, 0]


def test_deadline_steps_fit_and_one_more_would_not():
  rng = np.random.default_rng(5)
  res = make_resources("lognormal", 200, seed=7, step_overhead=0.03,
                       speed_sigma=1.0)
  batch = rng.integers(1, 256, 200)
  mb = 2e5
  comm = np.asarray(clock.comm_time(res, mb), np.float64)
  dl = comm * rng.uniform(0.5, 6.0, 200)
  max_steps = 50
  s = np.asarray(deadline_steps(res, batch, dl, mb, max_steps))
  assert (s >= 0).all() and (s <= max_steps).all()
  t_s = np.asarray(clock.local_time(res, batch, s), np.float64) + comm
  t_next = np.asarray(clock.local_time(res, batch, s + 1), np.float64) + comm
  slack = 1e-5 * dl
  kept = s > 0
  assert (t_s[kept] <= dl[kept] + slack[kept]).all()  # the client fits
  below_cap = s < max_steps
  assert (t_next[below_cap] > dl[below_cap] - slack[below_cap]).all()
  assert ((comm > dl + slack) <= (s == 0)).all()  # no time to talk: dropped
  assert 0 < below_cap.sum() < 200 and (s == 0).any()


# ----------------------------------------------------------- regime ratio ---

def test_compute_comm_ratio_by_hand():
  res = make_resources("uniform", 4, 0, base_speed=100.0, step_overhead=0.1,
                       bandwidth=1e3)
  steps = jnp.array([1, 2, 4, 10])
  # a step of 40 costs 0.5 s; comm = 2 * 500 / 1000 = 1 s
  ratios = [0.5, 1.0, 2.0, 5.0]
  assert float(compute_comm_ratio(res, 40, steps, 500)) == 1.5
  assert float(compute_comm_ratio(
      res, 40, steps, 500, active=jnp.array([True, False, True, True]))) == 2.0
  assert math.isnan(float(compute_comm_ratio(res, 40, steps, 500,
                                             active=False)))
  np.testing.assert_allclose(
      compute_comm_ratio(res, 40, steps, 500), np.median(ratios))


def test_compute_comm_ratio_random_against_numpy():
  res = make_resources("lognormal", 33, seed=9, step_overhead=0.01)
  rng = np.random.default_rng(9)
  b, s = rng.integers(1, 64, 33), rng.integers(1, 100, 33)
  local = s * (res.step_overhead.astype(np.float64) + b / res.speed)
  comm = 3e5 / res.bandwidth_down + 3e5 / res.bandwidth_up
  np.testing.assert_allclose(compute_comm_ratio(res, b, s, 3e5),
                             np.median(local / comm), rtol=1e-5)


# -------------------------------------------------------- jit and vmap ---

def test_jit_and_vmap_over_quantiles_and_seconds_equal_eager():
  rng = np.random.default_rng(6)
  t = jnp.asarray(rng.uniform(1, 50, 17), jnp.float32)
  active = jnp.asarray(rng.random(17) < 0.7)
  qs = jnp.array([0.05, 0.3, 0.5, 0.77, 1.0], jnp.float32)
  vq = jax.jit(jax.vmap(
      lambda q: round_deadline("quantile", t, active, quantile=q)))(qs)
  for q, v in zip(qs.tolist(), vq.tolist()):
    assert v == float(round_deadline("quantile", t, active, quantile=q))
  secs = jnp.array([1.0, 2.5, 30.0])
  vs = jax.vmap(lambda s: round_deadline("fixed", t, active, seconds=s))(secs)
  np.testing.assert_array_equal(vs, secs)
  fb = jax.jit(lambda t, a: round_deadline("fedbalancer", t, a))(t, active)
  assert float(fb) == float(round_deadline("fedbalancer", t, active))


def test_vmap_over_experiments_equals_a_loop():
  rng = np.random.default_rng(8)
  e, k = 6, 12
  t = jnp.asarray(rng.uniform(1, 30, (e, k)), jnp.float32)
  active = jnp.asarray(rng.random((e, k)) < 0.6)
  qs = jnp.asarray(rng.uniform(0.1, 1.0, e), jnp.float32)
  for rule in ("quantile", "fedbalancer"):
    fn = jax.jit(jax.vmap(lambda t, a, q, rule=rule: round_deadline(
        rule, t, a, quantile=q if rule == "quantile" else None)))
    got = fn(t, active, qs)
    for i in range(e):
      want = round_deadline(rule, t[i], active[i],
                            quantile=float(qs[i]) if rule == "quantile"
                            else None)
      assert float(got[i]) == float(want)


def test_deadline_steps_and_ratio_under_jit_vmap():
  res = jax.device_put(make_resources("lognormal", 20, seed=1,
                                      step_overhead=0.02))
  deadlines = jnp.array([0.5, 2.0, 8.0, 40.0])
  fn = jax.jit(jax.vmap(lambda d: deadline_steps(res, 16, d, 1e5, 64)))
  got = fn(deadlines)
  for i, d in enumerate(deadlines.tolist()):
    np.testing.assert_array_equal(got[i], deadline_steps(res, 16, d, 1e5, 64))
  steps = jnp.arange(1, 21)
  assert float(jax.jit(compute_comm_ratio)(res, 16, steps, 1e5)) == \
      pytest.approx(float(compute_comm_ratio(res, 16, steps, 1e5)), rel=1e-6)
  epoch = jax.jit(one_epoch_time)(res, 16, jnp.arange(20) * 7, 1e5)
  np.testing.assert_allclose(epoch, one_epoch_time(res, 16,
                                                   jnp.arange(20) * 7, 1e5),
                             rtol=1e-6)


def test_no_recompilation_across_values():
  traces = []

  def f(t, a, q):
    traces.append(1)
    return round_deadline("quantile", t, a, quantile=q)

  jf = jax.jit(f)
  t = jnp.arange(1.0, 9.0)
  for q in (0.1, 0.5, 0.9):
    jf(t, t > 2, jnp.float32(q))
  assert len(traces) == 1


def test_module_all():
  assert set(deadline.__all__) >= {"one_epoch_time", "fixed_deadline",
                                   "round_deadline", "deadline_steps",
                                   "compute_comm_ratio"}
