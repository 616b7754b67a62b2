"""Time-optimal batch, headroom and the goodput controller."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.kernel import ClientStats
from fedjax_bsa.plans import controllers as C
from fedjax_bsa.plans import goodput


def _c_eff(b, n):
  """c_eff by its definition: (n - b) / (b (n - 1)) for b <= n, and
  (r / b)^2 c(r) for b = q n + r > n."""
  if n <= 1:
    return 0.0
  r = b % n if b > n else b
  if r == 0 or r == n:
    return 0.0
  return (r / b) ** 2 * (n - r) / (r * (n - 1))


def _time(b, big_b, n, o, v):
  return (1.0 + big_b * _c_eff(b, n)) * (o + b / v)


def test_time_optimal_batch_is_the_integer_argmin():
  rng = np.random.default_rng(0)
  for _ in range(60):
    n = int(rng.integers(2, 300))
    big_b = float(rng.choice([rng.uniform(0, 3), rng.uniform(0, n),
                              rng.uniform(0, 4 * n)]))
    o, v = float(rng.lognormal(-3, 2)), float(rng.lognormal(5, 2))
    grid = np.arange(1, 3 * n + 1)         # batches above n included
    t = [_time(b, big_b, n, o, v) for b in grid]
    brute = grid[int(np.argmin(t))]
    rule = float(goodput.time_optimal_batch(big_b, n, o, v))
    assert abs(rule - brute) <= 1.0, (n, big_b, o, v, rule, brute)
    assert 1 <= rule <= n


def test_time_optimal_batch_limits():
  big_b, o, v = 40.0, 0.02, 3000.0
  inf_client = np.sqrt(big_b * o * v)           # McCandlish et al. 2018
  got = [float(goodput.time_optimal_batch(big_b, n, o, v))
         for n in (1e3, 1e5, 1e7)]
  err = np.abs(np.array(got) / inf_client - 1)
  assert err[0] > err[1] > err[2] and err[2] < 1e-4, got
  np.testing.assert_allclose(
      float(goodput.time_optimal_batch(big_b, jnp.inf, o, v)), inf_client,
      rtol=1e-6)
  # noise at least n - 1: T decreases up to n, so the whole client
  np.testing.assert_allclose(goodput.time_optimal_batch(
      jnp.array([19.0, 500.0]), 20, 1e-6, 1.0), [20.0, 20.0])
  # no noise: the smallest batch; vectorised over clients
  np.testing.assert_allclose(goodput.time_optimal_batch(
      jnp.zeros(3), jnp.array([5.0, 50.0, jnp.inf]), 1.0, 1.0), 1.0)


# --- the rule on a problem with a known answer -----------------------------

_D = 15            # noiseless linear regression, x ~ N(0, I_d): B = d + 1
_EPS = 0.05        # learning rate of the noise-free step (small-step regime)
_RATIO = 1e-3      # target: loss down by this factor
_GRID = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def _steps_to_target(batches, steps, bmax, seeds):
  """Plain SGD on L(w) = E (x.w)^2 / 2 (w* = 0) with fresh rows each step.

  The learning rate is AdaScale's (Johnson et al. 2020) from the noise-free
  rate: ``lr(b) = _EPS / (1 + B / b)``, i.e. ``lr(1) = _EPS / (1 + B)``
  scaled by the gain ``(1 + B) / (1 + B / b)``. Batches are ``bmax`` rows
  masked to ``b`` (one compile for a group of batches). Returns the mean
  over seeds of the first step with ``L <= _RATIO * L0``.
  """
  big_b = _D + 1

  def one(b, key):
    bf = b.astype(jnp.float32)
    lr = _EPS / (1.0 + big_b / bf)
    mask = (jnp.arange(bmax) < b).astype(jnp.float32)
    k0, k = jax.random.split(key)
    w0 = jax.random.normal(k0, (_D,))
    target = _RATIO * 0.5 * (w0 @ w0)

    def step(carry, kt):
      w, t, hit = carry
      x = jax.random.normal(kt, (bmax, _D))
      w = w - lr * x.T @ (mask * (x @ w)) / bf
      t = jnp.where(hit, t, t + 1)
      return (w, t, hit | (0.5 * (w @ w) <= target)), None

    (_, t, hit), _ = jax.lax.scan(step, (w0, 0, False),
                                  jax.random.split(k, steps))
    return jnp.where(hit, t, 10 * steps)

  keys = jax.random.split(jax.random.key(0, impl="unsafe_rbg"), seeds)
  f = jax.vmap(jax.vmap(one, (None, 0)), (0, None))
  return np.asarray(jax.jit(f)(jnp.asarray(batches), keys)).mean(1)


def test_rule_matches_the_fastest_fixed_batch_on_linear_regression():
  """Noiseless linear regression with x ~ N(0, I_d): per-example gradient
  g = x x^T v (v = w - w*), G = v, Sigma = v v^T + |v|^2 I, so
  B = tr(Sigma) / |G|^2 = d + 1 at every w, and H = I makes B_noise = B.

  With the learning rate scaled by AdaScale from a small noise-free rate
  (each step removes about ``_EPS (2 - _EPS) / (1 + B / b)`` of the loss),
  steps to a target follow S_min (1 + B / b) (McCandlish et al. 2018), and
  the batch reaching the target in the least simulated time
  ``steps * (o + b / v)`` should be within 1.5x of sqrt(B o v) on both an
  overhead-bound fast device and a compute-bound one.

  Not checked here (principled, measured while writing this test): with the
  learning rate tuned per batch instead, this isotropic quadratic leaves the
  small-step regime (a large batch with lr -> 1 is a Newton step, S_min ->
  a few steps) and the fastest batch was 192 (device A) and 8 (device B),
  2-3x the rule: the rule holds where each step makes small progress.
  """
  big_b = _D + 1
  s_min = np.log(1 / _RATIO) / (_EPS * (2 - _EPS))
  small = [b for b in _GRID if b < 16]
  large = [b for b in _GRID if b >= 16]
  steps = np.concatenate([
      _steps_to_target(small, int(1.3 * s_min * (1 + big_b)), 12, 4),
      _steps_to_target(large, int(2.6 * s_min), 256, 4)])
  assert (steps < 10 * s_min * (1 + big_b)).all(), steps   # all reached it
  # the measured steps follow S_min (1 + B / b) (within 10%)
  model = s_min * (1 + big_b / np.asarray(_GRID, float))
  np.testing.assert_allclose(steps, model, rtol=0.1)
  devices = {"overhead-bound, fast": (1.0, 256.0),      # b* = 64
             "compute-bound": (0.001, 1000.0)}          # b* = 4
  for name, (o, v) in devices.items():
    t = steps * (o + np.asarray(_GRID, float) / v)
    fastest = _GRID[int(np.argmin(t))]
    rule = float(goodput.time_optimal_batch(big_b, jnp.inf, o, v))
    ratio = max(fastest / rule, rule / fastest)
    assert ratio <= 1.5 + 1e-9, (name, fastest, rule, t / t.min())


# --- headroom ---------------------------------------------------------------

def test_headroom_identical_and_comm_only_clients_is_one():
  k = 5
  grid = np.arange(1, 257)
  one = dict(b_simple=[30.0] * k, n=[80] * k, overhead=[0.05] * k,
             speed=[400.0] * k, comm=[2.0] * k)
  assert goodput.headroom(**one, steps_ref=20, batches=grid) == pytest.approx(
      1.0, abs=1e-12)
  one["comm"] = [0.0, 1.0, 5.0, 2.0, 3.0]     # only comm differs
  assert goodput.headroom(**one, steps_ref=20, batches=grid) == pytest.approx(
      1.0, abs=1e-12)


def test_headroom_heterogeneous_clients_gain():
  rng = np.random.default_rng(3)
  k = 8
  h = goodput.headroom(rng.uniform(5, 100, k), rng.integers(20, 400, k),
                       rng.lognormal(-3, 1.5, k), rng.lognormal(6, 1, k),
                       rng.uniform(0, 1, k), 10, np.arange(1, 513))
  assert h > 1.05, h


def test_headroom_by_hand():
  """Two clients of n = 4 rows: c_eff(1) = 1, c_eff(2) = 1/3, c_eff(4) = 0.

  A: B = 3, o = 1, v = 1, comm = 1: T = 1 + (1 + 3c)(1 + b) = 9, 7, 6.
  B: B = 0, o = 0, v = 1/2, comm = 1/2: T = 1/2 + 2 b = 2.5, 4.5, 8.5.
  Own batches: max(6, 2.5) = 6. Common: max = 9, 7, 8.5 -> 7. Ratio 7/6.
  """
  h = goodput.headroom([3.0, 0.0], [4, 4], [1.0, 0.0], [1.0, 0.5],
                       [1.0, 0.5], 1, [1, 2, 4])
  assert h == pytest.approx(7 / 6, rel=1e-6)
  # steps_ref scales the compute, not the communication
  h2 = goodput.headroom([3.0, 0.0], [4, 4], [1.0, 0.0], [1.0, 0.5],
                        [1.0, 0.5], 2, [1, 2, 4])
  # A: 17, 13, 11; B: 4.5, 8.5, 16.5 -> own 11, common min(17, 13, 16.5)
  assert h2 == pytest.approx(13 / 11, rel=1e-6)
  with pytest.raises(ValueError, match="batches"):
    goodput.headroom([1.0], [4], [1.0], [1.0], [0.0], 1, [0, 2])


# --- the goodput controller -------------------------------------------------

MU = 4
N_CLIENTS = 10
# last round: clients 0, 1, 2 report B = 15, client 5 reports B = 60, and
# client 9 ran no noise step
_FB_COHORT = np.array([0, 1, 2, 5, 9])
_FB_G = np.array([1.0, 1.0, 1.0, 0.25, 7.0])
_FB_T = np.array([15.0, 15.0, 15.0, 15.0, 1.0])
_FB_NOISE = np.array([3, 3, 3, 3, 0])
# the coming cohort: 7 was never seen (cohort B = 15 / mean g = 15 / 0.8125)
_COHORT = np.array([0, 1, 2, 7, 9])
_N = np.array([32, 11, 1000, 200, 60])
_OVERHEAD = np.array([0.1, 0.1, 1.0, 0.02, 0.05])
_SPEED = np.array([192.0, 50.0, 500.0, 2000.0, 300.0])
_MEM = np.array([256, 256, 6, 256, 256])


def _feedback():
  k = len(_FB_COHORT)
  stats = ClientStats(
      loss=jnp.ones((k,)), examples=jnp.full((k,), 40, jnp.int32),
      steps=jnp.full((k,), 5, jnp.int32),
      grad_sq=jnp.asarray(_FB_G, jnp.float32),
      trace=jnp.asarray(_FB_T, jnp.float32),
      noise_steps=jnp.asarray(_FB_NOISE, jnp.int32),
      update_sq=jnp.ones((k,)))
  return C.Feedback(jnp.asarray(_FB_COHORT, jnp.int32), stats)


def _context():
  return C.Context(jnp.int32(1), jnp.asarray(_COHORT, jnp.int32),
                   jnp.asarray(_SPEED, jnp.float32),
                   jnp.asarray(_OVERHEAD, jnp.float32),
                   jnp.asarray(_MEM, jnp.int32), jax.random.key(0),
                   jnp.asarray(_N, jnp.int32))


def _plan_by_hand(b0, bmin, bmax, lr, max_gain):
  """The documented formula, in float64."""
  seen = _FB_NOISE > 0
  cohort_b = _FB_T[seen].mean() / _FB_G[seen].mean()
  own = dict(zip(_FB_COHORT[seen], (_FB_T / _FB_G)[seen]))
  big_b = np.array([own.get(k, cohort_b) for k in _COHORT])
  batch, rate = [], []
  for bb, n, o, v, mem in zip(big_b, _N, _OVERHEAD, _SPEED, _MEM):
    a = 1 - (1 + bb) / n
    best = min(np.sqrt(bb * o * v / a), n) if a > 0 else n
    cap = min(bmax, mem, max(n, bmin, 2 * MU))   # b > n never helps
    t = np.clip(best, max(bmin, 2 * MU), cap)
    if cap < MU:
      b = cap
    else:
      b = max(min(max(round(t / MU), 1) * MU, cap // MU * MU), MU)
    gain = (1 + bb * _c_eff(b0, n)) / (1 + bb * _c_eff(b, n))
    batch.append(b)
    rate.append(lr * min(gain, max_gain))
  return np.array(batch), np.array(rate)


def _goodput_plan(b0, bmax, lr, max_gain):
  ctrl = goodput.goodput(b0, 8, bmax, 7, lr, 0.0, MU, max_gain=max_gain)
  return ctrl.update(_feedback(), ctrl.init(N_CLIENTS), _context())


def test_goodput_plan_by_hand_and_under_jit():
  plan, state = jax.jit(_goodput_plan)(8, 64, 0.1, 4.0)
  batch, rate = _plan_by_hand(8, 8, 64, 0.1, 4.0)
  np.testing.assert_array_equal(plan.batch_size, batch)
  np.testing.assert_allclose(plan.lr, rate, rtol=1e-5)
  np.testing.assert_array_equal(plan.steps, 7)
  # literally: client 0 (B = 15, n = 32, o v = 19.2): a = 1/2,
  # b* = sqrt(15 * 19.2 / 0.5) = 24, gain (1 + 15 * 3/31) / (1 + 15 / 93);
  # client 1 (n = 11 <= B + 1): the whole client, capped at n and
  # quantized down to 8 (a batch above n would repeat rows);
  # client 2 (memory 6): one microbatch of 4
  assert plan.batch_size[:3].tolist() == [24, 8, 4]
  np.testing.assert_allclose(plan.lr[0], 0.1 * 228 / 108, rtol=1e-5)
  eager, _ = _goodput_plan(8, 64, 0.1, 4.0)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(plan)):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # before any estimate: the reference batch, gain 1
  ctrl = goodput.goodput(8, 8, 64, 7, 0.1, 0.0, MU)
  first, _ = ctrl.update(C.empty_feedback(5), ctrl.init(N_CLIENTS),
                         _context())
  assert first.batch_size.tolist() == [8, 8, 4, 8, 8]
  np.testing.assert_allclose(first.lr, 0.1)


def test_goodput_vmapped_over_hyperparameters_equals_hand_plans():
  sets = [dict(b0=8, bmax=64, lr=0.1, max_gain=4.0),
          dict(b0=16, bmax=16, lr=0.05, max_gain=1.5)]
  stacked = {k: jnp.asarray([s[k] for s in sets]) for k in sets[0]}
  plans, _ = jax.jit(jax.vmap(_goodput_plan))(**stacked)
  for i, s in enumerate(sets):
    batch, rate = _plan_by_hand(s["b0"], 8, s["bmax"], s["lr"],
                                s["max_gain"])
    np.testing.assert_array_equal(plans.batch_size[i], batch)
    np.testing.assert_allclose(plans.lr[i], rate, rtol=1e-5)
  assert not np.array_equal(plans.batch_size[0], plans.batch_size[1])
  assert (np.asarray(plans.lr[1]) <= 0.05 * 1.5 + 1e-7).all()


def test_goodput_needs_num_examples():
  ctrl = goodput.goodput(8, 8, 64, 7, 0.1, 0.0, MU)
  with pytest.raises(ValueError, match="num_examples"):
    ctrl.update(_feedback(), ctrl.init(N_CLIENTS),
                _context()._replace(num_examples=None))


def test_headroom_bound_search_finds_above_two_and_its_point_reproduces():
  """The headroom-bound search (fedjax_bsa.bench.headroom_bound): with noise
  scales 1-100 across clients, batches [8, 128] leave headroom above 2; its
  reported point gives the same value again; with one shared noise scale
  the search stays below 1.6 (the IID limit the study's cells measure)."""
  from fedjax_bsa.bench.headroom_bound import main as headroom_bound
  grid = np.arange(8, 129)
  h, pt = headroom_bound.search(headroom_bound.BOXES["B_1_to_100"], grid, 300)
  assert h > 2.0
  again = goodput.headroom(pt["B"], [np.inf, np.inf], pt["o"], pt["v"],
                           [0.0, 0.0], 20, grid)
  assert again == pytest.approx(h, rel=1e-6)
  shared, _ = headroom_bound.search(headroom_bound.BOXES["shared_B"], grid,
                                    300)
  assert 1.0 <= shared < 1.6
