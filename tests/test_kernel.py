"""The round kernel equals a per-job loop with exact shapes, packs several
experiments into one lane pool, and compiles once."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from fedjax_bsa import algorithms
from fedjax_bsa import Config
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.kernel import layout
from fedjax_bsa.kernel import reference
from kernel_util import close, loss_of, make_jobs, stack

MU = 4
_CACHE = {}


def _kernel(model, alg, lanes, E, noise_stats=True, per_slot=1):
  key = (model.name, id(alg.client_tx), lanes, E, noise_stats, per_slot)
  if key not in _CACHE:
    _CACHE[key] = jax.jit(kernel_lib.make_round_kernel(
        loss_of(model), alg.client_tx, alg.client_init, microbatch=MU,
        lanes=lanes, num_experiments=E, noise_stats=noise_stats,
        client_deltas=alg.client_deltas, per_slot=per_slot))
  return _CACHE[key]


_ALGS = {}


def _alg(**kw):
  key = tuple(sorted(kw.items()))
  if key not in _ALGS:
    _ALGS[key] = algorithms.make_algorithm(Config(**kw))
  return _ALGS[key]


def _check(data, model, jobs, lanes, alg, E=1, inputs=None, seed=0,
           per_slot=1):
  params = stack(*[model.init(jax.random.key(seed + e)) for e in range(E)])
  out = _kernel(model, alg, lanes, E, per_slot=per_slot)(params, data, jobs,
                                                         inputs)
  ref, stats, deltas, usum = reference.reference_round(
      loss_of(model), alg.client_tx, alg.client_init, params, data, jobs,
      inputs, microbatch=MU)
  close(out.delta, ref)
  for f in ("loss", "examples", "steps", "noise_steps"):
    np.testing.assert_allclose(getattr(out.stats, f), getattr(stats, f),
                               rtol=2e-4, atol=1e-5, err_msg=f)
  for f in ("grad_sq", "trace", "update_sq"):
    np.testing.assert_allclose(getattr(out.stats, f), getattr(stats, f),
                               rtol=5e-3, atol=1e-4, err_msg=f)
  np.testing.assert_allclose(out.update_sum_sq, usum, rtol=2e-3, atol=1e-5)
  b = np.maximum(np.asarray(jobs.batch), 1)
  useful = int(np.sum(b * np.asarray(jobs.steps)))
  assert int(out.useful) == useful
  assert int(out.slots) * MU >= useful
  if alg.client_deltas:
    close(out.client_deltas, stack(*deltas))
  return out


plans = st.tuples(
    st.lists(st.integers(1, 13), min_size=6, max_size=6),
    st.lists(st.integers(0, 5), min_size=6, max_size=6),
    st.lists(st.floats(0.01, 0.5), min_size=6, max_size=6),
    st.lists(st.integers(0, 19), min_size=6, max_size=6, unique=True),
    st.sampled_from([1, 2, 5, 8]),  # 8 >= 6 jobs: one job per lane
    st.lists(st.integers(0, 1), min_size=6, max_size=6),
)


@settings(max_examples=10, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plans)
def test_kernel_matches_reference_random_plans(small_fed, small_mlp, plan):
  """Random plans of two experiments packed into one lane pool."""
  b, s, lr, cohort, lanes, exp = plan
  jobs = make_jobs(cohort, b, s, lr, exp=exp, key=sum(cohort))
  _check(small_fed, small_mlp, jobs, lanes, _alg(), E=2)


@pytest.mark.parametrize("kw", [
    dict(client_momentum=0.9), dict(client_optimizer="adam"),
    dict(algorithm="fedprox", prox_mu=0.3)])
def test_kernel_runs_any_client_transformation(small_fed, small_mlp, kw):
  alg = _alg(**kw)
  jobs = make_jobs([0, 4, 7, 9, 13], [3, 9, 4, 1, 12], [2, 3, 0, 4, 1],
                   [0.1, 0.2, 0.3, 0.05, 0.1])
  inputs = alg.client_inputs(None, jobs.client, dict(prox_mu=0.3))
  _check(small_fed, small_mlp, jobs, 2, alg, inputs=inputs)


def test_kernel_client_deltas_and_correction(small_fed, small_mlp):
  alg = _alg(algorithm="scaffold")
  params = small_mlp.init(jax.random.key(0))
  state = alg.init(params, 20)
  state = state._replace(clients=jax.tree.map(
      lambda a: 0.01 * jax.random.normal(jax.random.key(3), a.shape),
      state.clients))
  jobs = make_jobs([0, 1, 2, 3, 4], [3, 5, 8, 2, 6], [2, 1, 3, 0, 2],
                   [0.1] * 5)
  _check(small_fed, small_mlp, jobs, 3, alg,
         inputs=alg.client_inputs(state, jobs.client, {}))


@pytest.mark.parametrize("per_slot", [2, 3])
def test_wide_slots_change_nothing(small_fed, small_mlp, per_slot):
  """R microbatches per loop iteration (a layout choice) give the same
  round, noise estimates included."""
  jobs = make_jobs([0, 4, 7, 9, 13], [3, 9, 4, 1, 13], [2, 3, 1, 4, 2],
                   [0.1, 0.2, 0.3, 0.05, 0.1])
  _check(small_fed, small_mlp, jobs, 2, _alg(), per_slot=per_slot)


@pytest.mark.parametrize("kw", [{}, dict(client_momentum=0.9)])
def test_rounds_of_one_slot_steps_match_the_reference(small_fed, small_mlp,
                                                      kw):
  """Every step fits one slot (batches <= R mu): the kernel runs without
  its step accumulator (lanes.run_lanes' one-slot loop) and still computes
  the reference round, noise estimates and a stateful client optimizer
  included."""
  jobs = make_jobs([0, 4, 7, 9, 13], [3, 9, 12, 1, 7], [2, 3, 1, 4, 0],
                   [0.1, 0.2, 0.3, 0.05, 0.1])
  assert int(jnp.max(layout.slots_per_step(jobs.batch, MU, 3))) == 1
  _check(small_fed, small_mlp, jobs, 2, _alg(**kw), per_slot=3)


@pytest.mark.parametrize("E", [1, 2])
def test_a_failed_job_is_left_out(small_fed, small_mlp, E):
  """A job whose model goes non-finite (learning rate 1e30) is left out of
  the aggregate, of ``|sum h|^2`` and of the client deltas, as the
  reference leaves it out; its stats stay non-finite so that a controller
  sees it, and the other jobs are untouched."""
  alg = _alg(algorithm="scaffold")
  lr = [0.1, 1e30, 0.2, 0.05, 0.1]
  jobs = make_jobs([0, 4, 7, 9, 13], [3, 9, 4, 1, 6], [2, 3, 1, 4, 2], lr,
                   exp=[0, 0, E - 1, 0, E - 1])
  params = stack(*[small_mlp.init(jax.random.key(e)) for e in range(E)])
  state = alg.init(jax.tree.map(lambda a: a[0], params), 20)
  inputs = alg.client_inputs(state, jobs.client, {})
  out = _kernel(small_mlp, alg, 2, E)(params, small_fed, jobs, inputs)
  ref, stats, deltas, usum = reference.reference_round(
      loss_of(small_mlp), alg.client_tx, alg.client_init, params, small_fed,
      jobs, inputs, microbatch=MU)
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(out.delta))
  close(out.delta, ref)
  close(out.client_deltas, stack(*deltas))
  assert all(float(jnp.abs(a[1]).max()) == 0.0
             for a in jax.tree.leaves(out.client_deltas))
  np.testing.assert_allclose(out.update_sum_sq, usum, rtol=2e-3, atol=1e-5)
  assert not np.isfinite(float(out.stats.update_sq[1]))
  assert not np.isfinite(float(stats.update_sq[1]))
  keep = np.array([0, 2, 3, 4])
  for f in ("loss", "update_sq", "grad_sq", "trace"):
    np.testing.assert_allclose(np.asarray(getattr(out.stats, f))[keep],
                               np.asarray(getattr(stats, f))[keep],
                               rtol=5e-3, atol=1e-4, err_msg=f)


def test_kernel_extreme_skew(small_fed, small_mlp):
  """One job with 100x the steps, b=1, an absent job (s=0)."""
  jobs = make_jobs([1, 2, 3, 4, 5], [1, 8, 5, 1, 4], [100, 1, 0, 1, 1],
                   [0.02, 0.1, 0.1, 0.1, 0.1])
  out = _check(small_fed, small_mlp, jobs, 2, _alg())
  assert int(out.stats.steps[2]) == 0 and float(out.stats.loss[2]) == 0.0
  # the long job alone bounds the loop: 100 slots on its lane
  assert int(out.slots) == 2 * 100


def test_packed_experiments_equal_separate_kernels(small_fed, small_mlp):
  """Jobs of three experiments in one pool give each experiment what its
  own kernel gives it."""
  alg = _alg()
  E = 3
  exp = [0, 1, 2, 0, 1, 2, 2]
  jobs = make_jobs([0, 3, 5, 7, 9, 11, 13], [4, 8, 3, 12, 5, 7, 2],
                   [3, 2, 5, 1, 4, 2, 6], [0.1] * 7, exp=exp)
  params = stack(*[small_mlp.init(jax.random.key(e)) for e in range(E)])
  packed = _kernel(small_mlp, alg, 3, E)(params, small_fed, jobs, None)
  for e in range(E):
    mine = np.nonzero(np.asarray(exp) == e)[0]
    sub = jax.tree.map(lambda a: a[mine], jobs)._replace(
        exp=jnp.zeros(len(mine), jnp.int32))
    one = _kernel(small_mlp, alg, 1, 1)(
        jax.tree.map(lambda a: a[e:e + 1], params), small_fed, sub, None)
    close(jax.tree.map(lambda a: a[e], packed.delta),
          jax.tree.map(lambda a: a[0], one.delta), rtol=1e-4, atol=1e-6)
    for f in one.stats._fields:
      np.testing.assert_allclose(getattr(packed.stats, f)[mine],
                                 getattr(one.stats, f), rtol=1e-4,
                                 atol=1e-6, err_msg=f)


def test_pack_lanes_is_longest_first_and_complete():
  slots = jnp.array([5, 0, 9, 3, 3, 7], jnp.int32)
  lane, start, load = layout.pack_lanes(slots, 2)
  lane, start, load = map(np.asarray, (lane, start, load))
  assert lane[1] == 2  # no slots: on no lane
  assert load.sum() == slots.sum()
  for l in range(2):
    mine = [k for k in range(6) if lane[k] == l]
    spans = sorted((start[k], start[k] + int(slots[k])) for k in mine)
    assert spans[0][0] == 0
    for (a0, a1), (b0, _) in zip(spans, spans[1:]):
      assert a1 == b0  # back to back, no gaps
  # LPT on [9,7,5,3,3] with 2 lanes: 9|7 -> 9|12 -> 12|12 -> 15|12
  assert sorted(load.tolist()) == [12, 15]


def test_kernel_compiles_once_for_many_plans(small_fed, small_mlp):
  alg = _alg()
  base = kernel_lib.make_round_kernel(loss_of(small_mlp), alg.client_tx,
                                      alg.client_init, microbatch=MU,
                                      lanes=2)
  chex.clear_trace_counter()
  # a second trace (a plan-dependent shape) raises inside the loop below
  kern = jax.jit(chex.assert_max_traces(base, n=1))
  params = stack(small_mlp.init(jax.random.key(0)))
  rng = np.random.default_rng(0)
  for r in range(6):
    jobs = make_jobs(np.arange(5), rng.integers(1, 40, 5),
                     rng.integers(0, 30, 5), np.full(5, 0.1), key=r)
    out = kern(params, small_fed, jobs, None)
    jax.block_until_ready(out.delta)
  assert kern._cache_size() == 1
