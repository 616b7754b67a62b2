"""Tests for fedjax_bsa.plans.clock: time model, budgets, round policies."""

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.core import registry
from fedjax_bsa.plans import policies
from fedjax_bsa.plans.clock import (MAX_COUNT, TIME_RTOL, client_time,
                                   comm_time, fits_within, local_time,
                                   max_batch_within, model_bytes,
                                   sample_available, steps_within)
from fedjax_bsa.plans.policies import RoundOutcome, apply_round_policy
from fedjax_bsa.setup.resources import ClientResources, make_resources

_SETTINGS = hypothesis.settings(max_examples=60, deadline=None)
POLICIES = ("wait_all", "deadline_drop", "deadline_partial")

# Hand-built cohort: comm = 1e5/1e6 * 2 + 2 * 0.05 = 0.3 s for everyone;
# with batch 10 a step costs 0.1 + 10/speed = 0.2, 0.3, 1.1 s, so 5 steps
# take 1.3, 1.8 and 5.8 s in total.
_MODEL_BYTES = 1e5
_BATCH = 10
_STEPS = np.array([5, 5, 5], np.int32)


def _cohort():
  f = lambda *v: np.array(v, np.float32)
  return ClientResources(
      speed=f(100.0, 50.0, 10.0), step_overhead=f(0.1, 0.1, 0.1),
      memory_cap=np.array([64, 64, 64], np.int32),
      bandwidth_up=f(1e6, 1e6, 1e6), bandwidth_down=f(1e6, 1e6, 1e6),
      latency=f(0.05, 0.05, 0.05), availability=f(1.0, 1.0, 1.0),
      tier=np.zeros(3, np.int32))


def _policy(policy, deadline, available=True, steps=_STEPS):
  return apply_round_policy(policy, _cohort(), _BATCH, steps, available,
                            _MODEL_BYTES, deadline)


# -------------------------------------------------------------- time model ---

def test_local_comm_and_client_time_by_hand():
  res = _cohort()
  np.testing.assert_allclose(local_time(res, _BATCH, _STEPS),
                             [1.0, 1.5, 5.5], rtol=1e-6)
  np.testing.assert_allclose(comm_time(res, _MODEL_BYTES), [0.3] * 3,
                             rtol=1e-6)
  ct = client_time(res, _BATCH, _STEPS, _MODEL_BYTES)
  np.testing.assert_allclose(ct, [1.3, 1.8, 5.8], rtol=1e-6)
  assert ct.dtype == jnp.float32 and ct.shape == (3,)
  # Per-client batch sizes and asymmetric links.
  res = res._replace(bandwidth_up=np.array([1e5, 1e6, 1e6], np.float32))
  np.testing.assert_allclose(
      client_time(res, np.array([0, 10, 20]), 2, _MODEL_BYTES),
      [2 * 0.1 + 0.1 + 1.0 + 0.1, 2 * 0.3 + 0.3, 2 * 2.1 + 0.3], rtol=1e-6)


def test_steps_within_by_hand():
  res = _cohort()
  # (3.05 - 0.3) / per-step 0.2, 0.3, 1.1 -> 13.75, 9.17, 2.5 -> 13, 9, 2
  np.testing.assert_array_equal(
      steps_within(res, _BATCH, 3.05, _MODEL_BYTES), [13, 9, 2])
  # Not even the communication fits.
  np.testing.assert_array_equal(
      steps_within(res, _BATCH, 0.2, _MODEL_BYTES), [0, 0, 0])
  # Steps that cost nothing saturate at MAX_COUNT.
  free = res._replace(step_overhead=np.zeros(3, np.float32))
  np.testing.assert_array_equal(
      steps_within(free, 0, 1.0, _MODEL_BYTES), [MAX_COUNT] * 3)
  assert steps_within(res, _BATCH, 3.05, _MODEL_BYTES).dtype == jnp.int32


def test_max_batch_within_by_hand():
  res = _cohort()
  # 4 steps in 2.35 - 0.3 = 2.05 s: 0.5125 s a step, 0.4125 s of compute
  # -> 41.25, 20.6, 4.1 examples.
  b = max_batch_within(res, 4, 2.35, _MODEL_BYTES)
  np.testing.assert_array_equal(b, [41, 20, 4])
  assert b.dtype == jnp.int32
  capped = max_batch_within(res._replace(memory_cap=np.array([8, 64, 64],
                                                             np.int32)),
                            4, 2.35, _MODEL_BYTES, cap_to_memory=True)
  np.testing.assert_array_equal(capped, [8, 20, 4])
  np.testing.assert_array_equal(max_batch_within(res, 4, 0.5, _MODEL_BYTES),
                                [0, 0, 0])


def _resources_from(vals):
  speed, overhead, bw_up, bw_down, latency = (np.array(v, np.float32)
                                              for v in zip(*vals))
  k = len(vals)
  return ClientResources(speed, overhead, np.full(k, 64, np.int32), bw_up,
                         bw_down, latency, np.ones(k, np.float32),
                         np.zeros(k, np.int32))


def _check_largest(count, fits, next_fits, times, budget):
  """``count`` fits the budget (unless 0) and ``count + 1`` does not; fitting
  is ``client_time <= budget`` up to the documented slack."""
  count = np.asarray(count)
  assert count.dtype == np.int32
  assert np.all((count >= 0) & (count <= MAX_COUNT))
  assert np.all((count == 0) | np.asarray(fits))
  assert np.all((count == MAX_COUNT) | ~np.asarray(next_fits))
  assert np.all((count == 0) | (np.asarray(times) <= np.float32(budget)
                                * (1 + 4 * TIME_RTOL) + 1e-6))


@jax.jit
def _steps_within_check(res, batch, budget, mbytes):
  s = steps_within(res, batch, budget, mbytes)
  return (s, fits_within(res, batch, s, budget, mbytes),
          fits_within(res, batch, s + 1, budget, mbytes),
          client_time(res, batch, s, mbytes))


@jax.jit
def _max_batch_within_check(res, steps, budget, mbytes):
  b = max_batch_within(res, steps, budget, mbytes)
  return (b, fits_within(res, b, steps, budget, mbytes),
          fits_within(res, b + 1, steps, budget, mbytes),
          client_time(res, b, steps, mbytes))


_f32 = lambda lo, hi: st.floats(lo, hi, width=32)
# speed, step_overhead, bandwidth_up, bandwidth_down, latency of 4 clients.
_clients = st.lists(st.tuples(_f32(1.0, 1e5), _f32(0.0, 1.0), _f32(1e3, 1e8),
                              _f32(1e3, 1e8), _f32(0.0, 0.5)),
                    min_size=4, max_size=4)


@_SETTINGS
@hypothesis.given(vals=_clients, batch=st.integers(0, 512),
                  budget=_f32(0.0, 100.0), mbytes=st.integers(0, 10**7))
def test_steps_within_is_largest_fitting(vals, batch, budget, mbytes):
  res = _resources_from(vals)
  _check_largest(*_steps_within_check(res, batch, budget, mbytes), budget)


@_SETTINGS
@hypothesis.given(vals=_clients, steps=st.integers(1, 100),
                  budget=_f32(0.0, 100.0), mbytes=st.integers(0, 10**7))
def test_max_batch_within_is_largest_fitting(vals, steps, budget, mbytes):
  res = _resources_from(vals)
  _check_largest(*_max_batch_within_check(res, steps, budget, mbytes), budget)


# ---------------------------------------------------------------- policies ---

def test_wait_all_waits_for_slowest():
  out = _policy("wait_all", None)
  assert isinstance(out, RoundOutcome)
  np.testing.assert_array_equal(out.steps, _STEPS)
  np.testing.assert_array_equal(out.participated, [True] * 3)
  np.testing.assert_array_equal(out.dropped, [False] * 3)
  assert out.round_time == pytest.approx(5.8, rel=1e-6)
  # The deadline is ignored.
  assert _policy("wait_all", 1.0).round_time == pytest.approx(5.8, rel=1e-6)


def test_deadline_drop_drops_exactly_the_stragglers():
  out = _policy("deadline_drop", 3.0)
  np.testing.assert_array_equal(out.steps, [5, 5, 0])
  np.testing.assert_array_equal(out.participated, [True, True, False])
  np.testing.assert_array_equal(out.dropped, [False, False, True])
  assert float(out.round_time) == pytest.approx(3.0)
  out = _policy("deadline_drop", 1.6)
  np.testing.assert_array_equal(out.dropped, [False, True, True])
  assert float(out.round_time) == pytest.approx(1.6)
  # Nobody late: the round ends with its slowest participant.
  out = _policy("deadline_drop", 10.0)
  np.testing.assert_array_equal(out.participated, [True] * 3)
  assert out.round_time == pytest.approx(5.8, rel=1e-6)
  np.testing.assert_allclose(out.client_time, [1.3, 1.8, 5.8], rtol=1e-6)


def test_deadline_partial_keeps_partial_steps():
  for deadline in (3.0, 1.6):
    out = _policy("deadline_partial", deadline)
    fit = np.asarray(steps_within(_cohort(), _BATCH, deadline, _MODEL_BYTES))
    expected = np.minimum(fit, _STEPS)
    np.testing.assert_array_equal(out.steps, expected)
    np.testing.assert_array_equal(out.participated, expected > 0)
    np.testing.assert_array_equal(out.dropped, [False] * 3)
    assert float(out.round_time) == pytest.approx(deadline)
  np.testing.assert_array_equal(_policy("deadline_partial", 3.0).steps,
                                [5, 5, 2])
  np.testing.assert_array_equal(_policy("deadline_partial", 1.6).steps,
                                [5, 4, 1])
  # Nothing fits for two clients -> they are dropped.
  out = _policy("deadline_partial", 0.55)
  np.testing.assert_array_equal(out.steps, [1, 0, 0])
  np.testing.assert_array_equal(out.dropped, [False, True, True])
  assert float(out.round_time) == pytest.approx(0.55)


@pytest.mark.parametrize("policy", POLICIES)
def test_unavailable_clients_are_neither_kept_nor_dropped(policy):
  out = _policy(policy, 3.0, available=np.array([True, True, False]))
  np.testing.assert_array_equal(out.participated, [True, True, False])
  np.testing.assert_array_equal(out.dropped, [False] * 3)
  np.testing.assert_array_equal(out.steps, [5, 5, 0])
  assert out.round_time == pytest.approx(1.8, rel=1e-6)  # straggler absent
  none = _policy(policy, 3.0, available=False)
  assert float(none.round_time) == 0.0
  assert not np.any(none.participated) and not np.any(none.dropped)


@pytest.mark.parametrize("policy", POLICIES)
def test_zero_planned_steps_do_not_participate(policy):
  out = _policy(policy, 3.0, steps=np.array([5, 0, 5], np.int32))
  assert not out.participated[1] and not out.dropped[1]
  assert out.steps[1] == 0


def test_outcome_dtypes():
  out = _policy("deadline_partial", 3.0)
  assert out.steps.dtype == jnp.int32
  assert out.participated.dtype == jnp.bool_
  assert out.dropped.dtype == jnp.bool_
  assert out.round_time.dtype == jnp.float32 and out.round_time.shape == ()
  assert out.client_time.dtype == jnp.float32


def test_errors():
  with pytest.raises(ValueError, match="fastest_first") as e:
    _policy("fastest_first", 3.0)
  for p in POLICIES:
    assert p in str(e.value)
  with pytest.raises(ValueError, match="deadline"):
    _policy("deadline_drop", None)


# ------------------------------------------------------------ jit and vmap ---

def _assert_same(a, b):
  """Exact for ints/bools; floats to 1 ulp-ish (XLA may fuse mul-add)."""
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype and a.shape == b.shape
  if a.dtype == np.float32:
    np.testing.assert_allclose(a, b, rtol=1e-6)
  else:
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("policy", POLICIES)
def test_jit_and_vmap_over_deadlines_match(policy):
  res = jax.device_put(_cohort())
  # 7.5 is a tie: 36 steps of client 0 take 7.5 s up to float32 rounding,
  # which a fused multiply-add under jit rounds the other way.
  deadlines = jnp.array([0.55, 1.6, 3.0, 7.5, 10.0], jnp.float32)
  steps = np.array([5, 36, 5], np.int32)
  traces = []

  def run(r, deadline):
    traces.append(1)
    return apply_round_policy(policy, r, _BATCH, steps, True, _MODEL_BYTES,
                              deadline)

  jitted = jax.jit(run)
  batched = jax.jit(jax.vmap(run, in_axes=(None, 0)))(res, deadlines)
  for i, d in enumerate(deadlines):
    eager = run(_cohort(), float(d))
    compiled = jitted(res, d)
    for e, c, v in zip(eager, compiled, batched):
      _assert_same(e, c)
      _assert_same(e, np.asarray(v)[i])
  # One eager call per deadline, one jit trace, one vmap trace: no retracing.
  assert len(traces) == len(deadlines) + 2


@jax.jit
def _policies_check(res, batch, steps, avail, deadline):
  return (steps_within(res, batch, deadline, 1e4),
          apply_round_policy("deadline_partial", res, batch, steps, avail,
                             1e4, deadline),
          apply_round_policy("deadline_drop", res, batch, steps, avail, 1e4,
                             deadline))


@_SETTINGS
@hypothesis.given(vals=_clients, seed=st.integers(0, 2**31 - 1),
                  deadline=_f32(0.0, 50.0))
def test_partial_policy_consistent_with_steps_within(vals, seed, deadline):
  res = _resources_from(vals)
  rng = np.random.default_rng(seed)
  k = len(vals)
  steps = rng.integers(0, 50, k).astype(np.int32)
  batch = rng.integers(1, 256, k).astype(np.int32)
  avail = rng.random(k) < 0.8
  fit, part, drop = _policies_check(res, batch, steps, avail, deadline)
  fit = np.asarray(fit)
  active = avail & (steps > 0)
  over = active & (fit < steps)
  np.testing.assert_array_equal(drop.dropped, over)
  np.testing.assert_array_equal(part.steps,
                                np.where(active, np.minimum(fit, steps), 0))
  np.testing.assert_array_equal(part.dropped, over & (fit == 0))
  for out in (part, drop):
    assert not np.any(out.participated & ~active)
    if over.any():
      assert float(out.round_time) == np.float32(deadline)
    else:
      assert float(out.round_time) <= np.float32(deadline) * (1 + 1e-6)


def test_exact_ties_fit_the_same_everywhere():
  # Round numbers: 200 steps of 10 / 1000 + 0.04 = 0.05 s against 10 s.
  res = make_resources("uniform", 4, 0, base_speed=1000.0,
                       step_overhead=0.04)
  run = lambda r, d: apply_round_policy("deadline_drop", r, 10, 200, True, 0,
                                        d)
  outs = [run(res, 10.0), jax.jit(run)(res, 10.0),
          jax.vmap(run, in_axes=(None, 0))(res, jnp.array([10.0]))]
  for out in outs:
    np.testing.assert_array_equal(np.ravel(out.participated), True)
    np.testing.assert_array_equal(np.ravel(out.dropped), False)
    np.testing.assert_allclose(np.ravel(out.round_time), 10.0)
  closed = jax.jit(lambda d: steps_within(res, 10, d, 0))
  assert steps_within(res, 10, 10.0, 0).tolist() == [200] * 4
  assert closed(10.0).tolist() == [200] * 4
  assert jax.vmap(closed)(jnp.array([10.0, 10.0])).tolist() == [[200] * 4] * 2
  assert bool(fits_within(res, 10, 200, 10.0, 0).all())
  assert not bool(fits_within(res, 10, 201, 10.0, 0).any())


def test_budget_helpers_under_jit_and_vmap():
  res = _cohort()
  budgets = jnp.array([0.2, 1.0, 3.0, 7.5], jnp.float32)  # 7.5: ties
  fn = jax.jit(lambda r, t: (steps_within(r, _BATCH, t, _MODEL_BYTES),
                             max_batch_within(r, 3, t, _MODEL_BYTES)))
  s_v, b_v = jax.vmap(fn, in_axes=(None, 0))(res, budgets)
  for i, t in enumerate(budgets):
    s, b = fn(res, t)
    np.testing.assert_array_equal(s, s_v[i])
    np.testing.assert_array_equal(
        s, steps_within(res, _BATCH, float(t), _MODEL_BYTES))
    np.testing.assert_array_equal(b, b_v[i])
    np.testing.assert_array_equal(
        b, max_batch_within(res, 3, float(t), _MODEL_BYTES))


def test_works_on_a_gathered_cohort():
  res = jax.device_put(make_resources("lognormal", 50, seed=0))
  ids = jnp.array([3, 17, 42])
  cohort = jax.tree.map(lambda a: a[ids], res)
  ct = client_time(cohort, 32, 4, 4000)
  want = 4 * (res.step_overhead[ids] + 32 / res.speed[ids]) + (
      4000 / res.bandwidth_down[ids] + 4000 / res.bandwidth_up[ids])
  np.testing.assert_allclose(ct, want, rtol=1e-6)


# ----------------------------------------------------------------- helpers ---

def test_model_bytes():
  params = {"dense": {"w": jnp.zeros((3, 4)), "b": jnp.zeros(4)},
            "out": [np.zeros((4, 2), np.float32)]}
  assert model_bytes(params) == 4 * (12 + 4 + 8)
  assert model_bytes({"w": jax.ShapeDtypeStruct((10, 10), jnp.float32)}) == 400
  assert model_bytes({}) == 0


def test_sample_available():
  key = jax.random.PRNGKey(0)
  p = jnp.concatenate([jnp.full(20000, 0.3), jnp.full(20000, 1.0)])
  avail = sample_available(key, p)
  assert avail.dtype == jnp.bool_ and avail.shape == (40000,)
  assert abs(float(avail[:20000].mean()) - 0.3) < 0.02
  assert bool(avail[20000:].all())
  again = jax.jit(sample_available)(key, p)
  np.testing.assert_array_equal(avail, again)
  assert not np.array_equal(avail, sample_available(jax.random.PRNGKey(1), p))


def test_policies_registered_with_their_properties():
  assert registry.ROUND_POLICIES.names()[:3] == POLICIES
  assert registry.ROUND_POLICIES.get("wait_all") is policies.wait_all
  assert [registry.ROUND_POLICIES.prop(p, "needs_deadline")
          for p in POLICIES] == [False, True, True]


def test_round_outcome_with_a_policy_of_ones_own():
  # clients over the deadline keep one step
  out = policies.round_outcome(_cohort(), _BATCH, _STEPS, True, _MODEL_BYTES,
                            1.6, lambda s, over, d: jnp.where(over, 1, s))
  np.testing.assert_array_equal(out.steps, [5, 1, 1])
  np.testing.assert_array_equal(out.participated, True)
  assert float(out.round_time) == pytest.approx(1.6)
