"""The round kernel equals a per-client loop with exact shapes, compiles once."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import reference

K = 5
MU = 4


@functools.lru_cache(maxsize=None)
def _jitted(apply_fn, lanes, momentum, prox_mu, noise_stats=True,
            per_client=False):
  return jax.jit(kernel_lib.make_round_kernel(
      apply_fn, microbatch=MU, lanes=lanes, noise_stats=noise_stats,
      prox_mu=prox_mu, momentum=momentum, per_client_outputs=per_client))


def _close(a, b, rtol=2e-4, atol=2e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _check(small_fed, small_mlp, cohort, b, s, lr, lanes, momentum=0.0,
           prox_mu=0.0, seed=0, correction=None, per_client=False):
  params = small_mlp.init(jax.random.key(seed))
  plan = kernel_lib.Plan(jnp.array(b, jnp.int32), jnp.array(s, jnp.int32),
                         jnp.array(lr, jnp.float32))
  w = jnp.linspace(0.5, 1.5, len(cohort)).astype(jnp.float32)
  key = jax.random.key(seed + 1)
  cohort = jnp.array(cohort, jnp.int32)
  out = _jitted(small_mlp.apply, lanes, momentum, prox_mu,
                per_client=per_client)(params, small_fed, cohort, plan, w,
                                       key, correction)
  ref, stats, deltas = reference.reference_round(
      small_mlp.apply, params, small_fed, cohort, plan, w, key,
      microbatch=MU, momentum=momentum, prox_mu=prox_mu,
      correction=correction)
  _close(out.delta, ref)
  for f in ("loss", "examples", "steps", "noise_steps"):
    np.testing.assert_allclose(getattr(out.stats, f), getattr(stats, f),
                               rtol=2e-4, atol=1e-5, err_msg=f)
  for f in ("grad_sq", "trace", "update_sq"):
    np.testing.assert_allclose(getattr(out.stats, f), getattr(stats, f),
                               rtol=5e-3, atol=1e-4, err_msg=f)
  useful = int(np.sum(np.maximum(np.array(b), 1) * np.array(s)))
  assert int(out.useful) == useful
  assert int(out.slots) * MU >= useful
  if per_client:
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *deltas)
    _close(out.client_delta, stacked)
  return out


plans = st.tuples(
    st.lists(st.integers(1, 13), min_size=K, max_size=K),
    st.lists(st.integers(0, 5), min_size=K, max_size=K),
    st.lists(st.floats(0.01, 0.5), min_size=K, max_size=K),
    st.lists(st.integers(0, 19), min_size=K, max_size=K, unique=True),
    st.sampled_from([1, 2, 5]),
)


@settings(max_examples=12, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans)
def test_kernel_matches_reference_random_plans(small_fed, small_mlp, plan):
  b, s, lr, cohort, lanes = plan
  _check(small_fed, small_mlp, cohort, b, s, lr, lanes)


@pytest.mark.parametrize("momentum,prox_mu", [(0.9, 0.0), (0.0, 0.3)])
def test_kernel_matches_reference_momentum_and_prox(small_fed, small_mlp,
                                                    momentum, prox_mu):
  _check(small_fed, small_mlp, [0, 4, 7, 9, 13], [3, 9, 4, 1, 12],
         [2, 3, 0, 4, 1], [0.1, 0.2, 0.3, 0.05, 0.1], 2, momentum, prox_mu)


def test_kernel_extreme_skew(small_fed, small_mlp):
  """One client with 100x the steps, b=1, an absent client (s=0)."""
  out = _check(small_fed, small_mlp, [1, 2, 3, 4, 5], [1, 8, 5, 1, 4],
               [100, 1, 0, 1, 1], [0.02, 0.1, 0.1, 0.1, 0.1], 2)
  assert int(out.stats.steps[2]) == 0 and float(out.stats.loss[2]) == 0.0
  # the long client alone bounds the loop: 100 slots on its lane
  assert int(out.slots) == 2 * 100


def test_kernel_per_client_outputs_and_correction(small_fed, small_mlp):
  params = small_mlp.init(jax.random.key(0))
  corr = jax.tree.map(
      lambda a: 0.01 * jax.random.normal(jax.random.key(3), (K,) + a.shape),
      params)
  _check(small_fed, small_mlp, [0, 1, 2, 3, 4], [3, 5, 8, 2, 6],
         [2, 1, 3, 0, 2], [0.1] * 5, K, correction=corr, per_client=True)


def test_pack_lanes_is_longest_first_and_complete():
  slots = jnp.array([5, 0, 9, 3, 3, 7], jnp.int32)
  lane, start, load = kernel_lib.pack_lanes(slots, 2)
  lane, start, load = map(np.asarray, (lane, start, load))
  assert lane[1] == 2  # no slots: on no lane
  assert load.sum() == slots.sum()
  for l in range(2):
    mine = [k for k in range(6) if lane[k] == l]
    spans = sorted((start[k], start[k] + int(slots[k])) for k in mine)
    assert spans[0][0] == 0
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
      assert a1 == b0  # back to back, no gaps
  # LPT on [9,7,5,3,3] with 2 lanes: {9,3,3}=15? no: 9|7 -> 9|12 -> 12|12 -> 15|12
  assert sorted(load.tolist()) == [12, 15]


def test_kernel_compiles_once_for_many_plans(small_fed, small_mlp):
  traces = []
  base = kernel_lib.make_round_kernel(small_mlp.apply, microbatch=MU, lanes=2)

  def counted(*args):
    traces.append(1)
    return base(*args)

  kern = jax.jit(counted)
  params = small_mlp.init(jax.random.key(0))
  rng = np.random.default_rng(0)
  for r in range(6):
    plan = kernel_lib.Plan(jnp.array(rng.integers(1, 40, K), jnp.int32),
                           jnp.array(rng.integers(0, 30, K), jnp.int32),
                           jnp.full((K,), 0.1, jnp.float32))
    out = kern(params, small_fed, jnp.arange(K, dtype=jnp.int32), plan,
               jnp.ones(K) / K, jax.random.key(r))
    jax.block_until_ready(out.delta)
  assert len(traces) == 1
