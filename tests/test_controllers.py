"""Controllers: pure, jittable, vmappable, and every plan within bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.kernel import ClientStats
from fedjax_bsa.plans import controllers as C

N, K, MU = 12, 5, 4


def _ctx(rnd=3, seed=0):
  rng = np.random.default_rng(seed)
  return C.Context(
      round=jnp.int32(rnd),
      cohort=jnp.array(rng.choice(N, K, replace=False), jnp.int32),
      speed=jnp.array(rng.lognormal(0, 1, K) * 500, jnp.float32),
      step_overhead=jnp.full((K,), 0.01, jnp.float32),
      memory_cap=jnp.array([10, 64, 3, 200, 33], jnp.int32),
      key=jax.random.key(seed))


def _feedback(seed=1, g=0.5, tr=20.0):
  rng = np.random.default_rng(seed)
  cohort = jnp.array(rng.choice(N, K, replace=False), jnp.int32)
  ones = jnp.ones((K,), jnp.float32)
  stats = ClientStats(loss=ones, examples=jnp.full((K,), 40, jnp.int32),
                      steps=jnp.full((K,), 5, jnp.int32),
                      grad_sq=g * jnp.array(rng.uniform(0.5, 2, K),
                                            jnp.float32),
                      trace=tr * ones, noise_steps=jnp.full((K,), 5,
                                                            jnp.int32),
                      update_sq=ones)
  return C.Feedback(cohort, stats)


def _controllers(time_budget=0.0):
  ns = C.noise_scale(8, 8, 128, 1.0, 10, 0.1, 0.9, MU)
  return {
      "constant": C.clamp(C.constant(32, 10, 0.1), time_budget=time_budget),
      "random": C.clamp(C.random(1, 300, 10, 0.1), time_budget=time_budget),
      "schedule": C.clamp(C.schedule("doubling", 8, 256, 2, 50, 10, 0.1),
                          time_budget=time_budget),
      "resource_proportional": C.clamp(
          C.resource_proportional(16, 500.0, 10, 0.1),
          time_budget=time_budget),
      "noise_scale": C.clamp(ns, microbatch=MU, time_budget=time_budget),
  }


def _run(ctrl, n_rounds=4, seed=0):
  state = ctrl.init(N)
  plans = []
  fb = C.empty_feedback(K)
  for r in range(n_rounds):
    plan, state = ctrl.update(fb, state, _ctx(r, seed + r))
    plans.append(plan)
    fb = _feedback(seed + r)
  return plans, state


def _by_hand(name, fb, ctx):
  """One update from the initial state, in numpy: ``(batch, steps, lr)``
  of :func:`_controllers`' ``name`` (no time budget), or None (random)."""
  cap = np.asarray(ctx.memory_cap)
  speed = np.asarray(ctx.speed, np.float64)
  K_ = cap.shape[0]
  if name == "constant":
    return np.minimum(32, cap), np.full(K_, 10), np.full(K_, 0.1)
  if name == "schedule":  # doubling from 8 every 2 rounds: round 3 -> 16
    assert int(ctx.round) == 3
    return np.minimum(16, cap), np.full(K_, 10), np.full(K_, 0.1)
  if name == "resource_proportional":
    b = np.maximum(np.round(16 * speed / 500.0), 1)
    return np.minimum(b, cap), np.full(K_, 10), np.full(K_, 0.1)
  if name == "noise_scale":
    # after one update from empty EMAs, each EMA's bias-corrected value is
    # the sample itself: a reporting client's B = tr / |G|^2; any other
    # takes the cohort's mean(tr) / mean(|G|^2)
    g = np.asarray(fb.stats.grad_sq, np.float64)
    tr = np.asarray(fb.stats.trace, np.float64)
    own = dict(zip(np.asarray(fb.cohort).tolist(), tr / g))
    cohort_b = tr.mean() / g.mean()
    big_b = np.array([own.get(c, cohort_b)
                      for c in np.asarray(ctx.cohort).tolist()])
    # kappa = 1, n = inf: the target is B, clipped to [max(8, 2 MU), 128]
    # and rounded to a multiple of MU = 4
    b = np.round(np.clip(big_b, 8, 128) / MU) * MU
    # AdaScale gain over b0 = 8, capped at 4, before the memory clamp
    lr = 0.1 * np.minimum((1 + big_b / 8) / (1 + big_b / b), 4.0)
    # clamp: below the cap, a multiple of MU unless the cap is below MU
    b = np.where(cap < MU, cap, np.minimum(b, cap // MU * MU))
    return b, np.full(K_, 10), lr
  return None


@pytest.mark.parametrize("name", list(_controllers()))
def test_plan_by_hand_eager_and_jit(name):
  """One round's plan against :func:`_by_hand` (eager and under ``jit``);
  the random controller's batches are uniform in [1, 300] under the caps."""
  ctrl = _controllers()[name]
  state = ctrl.init(N)
  fb, ctx = _feedback(), _ctx()
  want = _by_hand(name, fb, ctx)
  for update in (ctrl.update, jax.jit(ctrl.update)):
    plan, new_state = update(fb, state, ctx)
    if want is not None:
      np.testing.assert_array_equal(plan.batch_size, want[0])
      np.testing.assert_array_equal(plan.steps, want[1])
      np.testing.assert_allclose(plan.lr, want[2], rtol=1e-5)
  if name == "noise_scale":
    # the cohort's estimates now sit in the state: the next round with no
    # feedback gives the same plan (the EMAs do not move)
    again, _ = jax.jit(ctrl.update)(C.empty_feedback(K), new_state, ctx)
    np.testing.assert_array_equal(again.batch_size, want[0])
  if name == "random":
    keys = jax.random.split(jax.random.key(5), 2000)
    draws = jax.jit(jax.vmap(lambda k: ctrl.update(
        fb, state, ctx._replace(key=k))[0].batch_size))(keys)
    draws = np.asarray(draws)
    cap = np.asarray(ctx.memory_cap)
    assert (draws >= 1).all() and (draws <= cap).all()
    # a draw at or above the cap is clamped to it: client 3 (cap 200) is
    # at 200 with P = 101 / 300, client 1 (cap 64) at 64 with P = 237 / 300;
    # uniform below the cap
    np.testing.assert_allclose((draws[:, 3] == 200).mean(), 101 / 300,
                               atol=0.04)
    np.testing.assert_allclose((draws[:, 1] == 64).mean(), 237 / 300,
                               atol=0.04)
    np.testing.assert_allclose((draws[:, 3] <= 100).mean(), 100 / 300,
                               atol=0.04)
    # a client's draws change with the round's key
    assert len(np.unique(draws[:, 3])) > 100


@pytest.mark.parametrize("budget", [0.0, 0.05])
@pytest.mark.parametrize("name", list(_controllers()))
def test_plans_respect_memory_budget_and_quantization(name, budget):
  ctrl = _controllers(budget)[name]
  for seed in range(3):
    plans, _ = _run(ctrl, seed=seed)
    for r, plan in enumerate(plans):
      ctx = _ctx(r, seed + r)
      b = np.asarray(plan.batch_size)
      s = np.asarray(plan.steps)
      assert (b >= 1).all() and (s >= 1).all()
      cap = np.asarray(ctx.memory_cap)
      if budget:  # one step of the batch fits the budget (the clock's slack)
        by_time = np.maximum(np.floor(
            (budget * (1 + 1e-6) - 0.01) * np.asarray(ctx.speed)), 1)
        cap = np.minimum(cap, by_time)
      assert (b <= cap).all(), (b, cap)
      if name == "noise_scale":
        assert (b[cap >= MU] % MU == 0).all(), b


def test_vmap_over_states_and_hyperparameters_equals_one_by_one():
  kappas = jnp.array([0.5, 1.0, 3.0])
  lrs = jnp.array([0.05, 0.1, 0.2])
  fbs = [_feedback(seed=s, g=0.2 * (s + 1)) for s in range(3)]
  ctx = _ctx()

  def one(kappa, lr, fb):
    ctrl = C.clamp(C.noise_scale(8, 8, 128, kappa, 10, lr, 0.9, MU),
                   microbatch=MU)
    state = ctrl.init(N)
    _, state = ctrl.update(fb, state, ctx)   # fold in the feedback
    return ctrl.update(fb, state, ctx)[0]

  stacked_fb = jax.tree.map(lambda *x: jnp.stack(x), *fbs)
  batched = jax.jit(jax.vmap(one, in_axes=(0, 0, 0)))(kappas, lrs, stacked_fb)
  for i in range(3):
    single = one(kappas[i], lrs[i], fbs[i])
    for a, b in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-6)
  # the experiments really differ
  assert not np.array_equal(batched.batch_size[0], batched.batch_size[2])


def test_noise_scale_follows_b_simple_and_gain():
  ctrl = C.noise_scale(8, 8, 1024, 1.0, 10, 0.1, 0.0, MU, max_gain=100.0)
  state = ctrl.init(N)
  ctx = _ctx()
  # before any estimate: batch_size and gain 1
  plan, state = ctrl.update(C.empty_feedback(K), state, ctx)
  np.testing.assert_array_equal(plan.batch_size, 8)
  np.testing.assert_allclose(plan.lr, 0.1)
  # the cohort reports |G|^2 = 0.25, tr = 16: B_simple = 64 for everyone
  stats = _feedback().stats._replace(grad_sq=jnp.full((K,), 0.25),
                                     trace=jnp.full((K,), 16.0))
  fb = C.Feedback(ctx.cohort, stats)
  plan, state = ctrl.update(fb, state, ctx)
  np.testing.assert_array_equal(plan.batch_size, 64)
  # AdaScale gain of b = 64 over b0 = 8 (no num_examples: infinite clients)
  gain = (1 + 64 / 8) / (1 + 64 / 64)
  np.testing.assert_allclose(plan.lr, 0.1 * gain, rtol=1e-5)
  # a client never seen gets the cohort estimate
  other = ctx._replace(cohort=jnp.array(
      [i for i in range(N) if i not in np.asarray(ctx.cohort)][:K],
      jnp.int32))
  plan, _ = ctrl.update(C.empty_feedback(K), state, other)
  np.testing.assert_array_equal(plan.batch_size, 64)


def test_noise_scale_per_client_estimates_differ():
  ctrl = C.noise_scale(8, 8, 1024, 1.0, 10, 0.1, 0.0, MU)
  ctx = _ctx()
  stats = _feedback().stats._replace(
      grad_sq=jnp.array([1.0, 0.5, 0.25, 0.125, 1.0]),
      trace=jnp.full((K,), 16.0))
  _, state = ctrl.update(C.Feedback(ctx.cohort, stats), ctrl.init(N), ctx)
  plan, _ = ctrl.update(C.empty_feedback(K), state, ctx)
  np.testing.assert_array_equal(plan.batch_size, [16, 32, 64, 128, 16])


def test_schedule_rules():
  ctx = _ctx()
  for rule, expect in (("doubling", [8, 8, 16, 16, 32, 32]),
                       ("step", [8, 8, 16, 16, 16, 16])):
    ctrl = C.schedule(rule, 8, 256, 2, 6, 10, 0.1)
    got = [int(ctrl.update(None, (), ctx._replace(round=jnp.int32(r)))[0]
               .batch_size[0]) for r in range(6)]
    assert got == expect, rule
  ctrl = C.schedule("linear", 8, 108, 1, 11, 10, 0.1)
  got = [int(ctrl.update(None, (), ctx._replace(round=jnp.int32(r)))[0]
             .batch_size[0]) for r in (0, 5, 10)]
  assert got == [8, 58, 108]


def test_resource_proportional():
  ctx = _ctx()
  ctrl = C.resource_proportional(16, 500.0, 10, 0.1)
  plan, _ = ctrl.update(None, (), ctx)
  np.testing.assert_allclose(plan.batch_size,
                             np.maximum(np.round(16 * np.asarray(ctx.speed)
                                                 / 500.0), 1))


def test_noise_scale_uses_the_critical_batch_of_finite_clients():
  """B = 64 everywhere; clients of n rows: b_crit = (1/B' + 1/n)^-1 with
  B' = B n / (n - 1), then quantized to MU = 4; the gain is
  (1 + B c(8, n)) / (1 + B c(b, n)), c(b, n) = (n - b) / (b (n - 1))."""
  ctrl = C.noise_scale(8, 8, 1024, 1.0, 10, 0.1, 0.0, MU, max_gain=100.0)
  n = np.array([40, 10, 1000, 65, 7])
  ctx = _ctx()._replace(num_examples=jnp.asarray(n, jnp.int32))
  stats = _feedback().stats._replace(grad_sq=jnp.full((K,), 0.25),
                                     trace=jnp.full((K,), 16.0))
  plan, _ = ctrl.update(C.Feedback(ctx.cohort, stats), ctrl.init(N), ctx)
  crit = 1 / ((n - 1) / (64.0 * n) + 1 / n)   # 24.85, 8.65, 60.2, 32.5, 6.2
  want = np.maximum(np.round(crit / MU), 2) * MU
  np.testing.assert_array_equal(plan.batch_size, want)
  assert plan.batch_size.tolist() == [24, 8, 60, 32, 8]

  def c(b, nk):
    r = b % nk if b > nk else b
    return 0.0 if r in (0, nk) else (r / b) ** 2 * (nk - r) / (r * (nk - 1))

  gain = [(1 + 64 * c(8, nk)) / (1 + 64 * c(b, nk)) for b, nk in zip(want, n)]
  np.testing.assert_allclose(plan.lr, 0.1 * np.array(gain), rtol=1e-5)
  # client 0: c(8, 40) = 4/39, c(24, 40) = 2/117; client 1: b = b0
  np.testing.assert_allclose(plan.lr[:2], [0.1 * 885 / 245, 0.1], rtol=1e-5)


def test_adascale_gain_reference_batch():
  """r = E|G_b0|^2 / E|G_b|^2 (Johnson et al. 2020): with b0 = 1 it is the
  old (B + 1) / (B / S + 1); with b0 > 1 it is not."""
  big_b = jnp.array([0.0, 3.0, 64.0])
  np.testing.assert_allclose(C.adascale_gain(big_b, 16, 1),
                             (big_b + 1) / (big_b / 16 + 1), rtol=1e-6)
  np.testing.assert_allclose(C.adascale_gain(big_b, 64, 8),
                             (1 + big_b / 8) / (1 + big_b / 64), rtol=1e-6)
  np.testing.assert_allclose(C.adascale_gain(big_b, 8, 8), 1.0)
  # a client of 20 rows: b = 20 removes all noise
  np.testing.assert_allclose(C.adascale_gain(big_b, 20, 4, n=20),
                             1 + big_b * 16 / (4 * 19), rtol=1e-6)


@pytest.mark.parametrize("budget", [0.0, 0.05, 0.5])
def test_the_time_budget_cuts_steps_once_after_local_work(budget):
  """The time budget sets the steps in one place, after the local-work
  rule (``plan_round``): the most steps of the bounded batch that fit it
  (at least one), never more than the rule's; none without a budget."""
  from fedjax_bsa.core.config import Config, hparams
  from fedjax_bsa.core.types import ClientResources
  from fedjax_bsa.plans import round_plan
  cfg = Config(controller="constant", batch_size=32, local_steps=10,
               time_budget=budget)
  hp = hparams(cfg, np.float32(500.0))
  ctrl = round_plan.make_controller(cfg, hp)
  ctx = _ctx()._replace(num_examples=jnp.full((K,), 100, jnp.int32))
  ones = jnp.ones((K,), jnp.float32)
  res = ClientResources(ctx.speed, ctx.step_overhead, ctx.memory_cap,
                        ones * 1e9, ones * 1e9, 0.0 * ones, ones,
                        jnp.zeros((K,), jnp.int32))
  rp, _ = round_plan.plan_round(cfg, hp, ctrl, C.empty_feedback(K),
                                ctrl.init(N), ctx, res,
                                jnp.ones((K,), bool), 0)
  b = np.asarray(rp.plan.batch_size, np.float64)
  s = np.asarray(rp.planned_steps)
  per_step = 0.01 + b / np.asarray(ctx.speed, np.float64)
  if not budget:
    assert (s == 10).all()
    return
  want = np.clip(np.floor(budget / per_step * (1 + 1e-6)), 1, 10)
  np.testing.assert_array_equal(s, want)
  assert ((s == 1) | (s * per_step <= budget * (1 + 1e-6))).all()
