"""Gradient-noise estimator: unbiased on a problem with a known answer."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.kernel import noise


def _truth(v, s2):
  """Linear regression, x ~ N(0, I_d), y = x.w* + eps, eps ~ N(0, s2).

  Per-example gradient at w = w* + v: g = x (x.v - eps). Then
  G = E g = v, and E g g^T = 2 v v^T + (|v|^2 + s2) I, so
  Sigma = v v^T + (|v|^2 + s2) I and tr(Sigma) = |v|^2 + d (|v|^2 + s2).
  """
  d = v.size
  vv = float(v @ v)
  return vv, vv + d * (vv + s2)


def _per_example_grads(rng, v, s2, shape):
  d = v.size
  x = rng.standard_normal(shape + (d,))
  eps = rng.standard_normal(shape) * np.sqrt(s2)
  return x * ((x @ v) - eps)[..., None]


@pytest.mark.parametrize("sizes", [
    (4, 4),            # B_big = 8, two microbatches
    (8, 8, 8, 8),      # B_big = 32
    (16, 16, 16, 5),   # a short last microbatch: harmonic-mean B_small
    (1, 1, 1),         # per-example gradients
])
def test_estimates_unbiased(sizes):
  rng = np.random.default_rng(0)
  d, s2, trials = 6, 0.5, 20000
  v = np.linspace(-0.6, 0.6, d)
  g_true, tr_true = _truth(v, s2)
  big = sum(sizes)
  g = _per_example_grads(rng, v, s2, (trials, big))
  small_sq, at = [], 0
  for n in sizes:
    small_sq.append(np.sum(g[:, at:at + n].mean(1) ** 2, -1))
    at += n
  small_sq = np.mean(small_sq, 0)
  big_sq = np.sum(g.mean(1) ** 2, -1)
  b_small = len(sizes) / sum(1.0 / n for n in sizes)
  est_g, est_t = noise.two_batch_estimates(jnp.asarray(small_sq), b_small,
                                           jnp.asarray(big_sq), big)
  est_g, est_t = np.asarray(est_g, np.float64), np.asarray(est_t, np.float64)
  for est, truth in ((est_g, g_true), (est_t, tr_true)):
    se = est.std() / np.sqrt(trials)
    assert abs(est.mean() - truth) < 3 * se, (est.mean(), truth, se)
  # and the estimator is informative: the trace is tightly estimated
  assert abs(est_t.mean() - tr_true) < 0.05 * tr_true


def test_biased_variant_is_detected():
  """Sanity: the test above can fail (B_small wrongly taken as the
  arithmetic mean of unequal microbatch sizes shifts the estimate)."""
  rng = np.random.default_rng(1)
  d, s2, trials = 6, 0.5, 20000
  v = np.linspace(-0.6, 0.6, d)
  _, tr_true = _truth(v, s2)
  sizes = (16, 1)
  g = _per_example_grads(rng, v, s2, (trials, 17))
  small_sq = (np.sum(g[:, :16].mean(1) ** 2, -1) +
              np.sum(g[:, 16:].mean(1) ** 2, -1)) / 2
  big_sq = np.sum(g.mean(1) ** 2, -1)
  _, wrong = noise.two_batch_estimates(small_sq, np.mean(sizes), big_sq, 17)
  se = np.std(wrong) / np.sqrt(trials)
  assert abs(np.mean(wrong) - tr_true) > 3 * se


def test_ema_bias_correction_exact_for_constant_signal():
  st = noise.ema_init(5)
  idx = jnp.array([1, 3], jnp.int32)
  for step in range(4):
    st = noise.ema_update(st, idx, jnp.array([2.5, -7.0]),
                          jnp.array([True, True]), 0.9)
    val = noise.ema_value(st)
    np.testing.assert_allclose(val[idx], [2.5, -7.0], rtol=1e-6)
    assert float(val[0]) == 0.0  # never updated


def test_ema_mask_and_per_entry_decay():
  st = noise.ema_init(3)
  idx = jnp.array([0, 1, 2], jnp.int32)
  st = noise.ema_update(st, idx, jnp.array([1.0, 1.0, 1.0]),
                        jnp.array([True, False, True]), 0.5)
  st = noise.ema_update(st, idx, jnp.array([3.0, 3.0, 3.0]),
                        jnp.array([True, True, True]),
                        jnp.array([0.5, 0.5, 0.0]))
  val = np.asarray(noise.ema_value(st))
  # entry 0: (0.5*0.5*1 + 0.5*3) / (1 - 0.25) = 1.75 / 0.75
  np.testing.assert_allclose(val, [1.75 / 0.75, 3.0, 3.0], rtol=1e-6)


def test_noise_scale_ratio():
  assert float(noise.simple_noise_scale(2.0, 8.0)) == 4.0
  assert float(noise.simple_noise_scale(1.0, -3.0)) == 0.0


# --- finite clients: windows of a uniform permutation ---------------------

def _population(rng, n, d=3, scale=1.5):
  """Fixed per-example gradients of a client of n rows: (g [n, d], |G|^2,
  tr(Sigma) with the population 1/n normalisation)."""
  g = rng.standard_normal((n, d)) * scale + np.linspace(0.3, 0.8, d)
  mean = g.mean(0)
  return g, float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())


def _windows(perms, start, size):
  """Rows at positions start .. start + size - 1 (mod n) of each perm."""
  n = perms.shape[1]
  return perms[:, (start + np.arange(size)) % n]


@pytest.mark.parametrize("n", [1, 2, 5, 12])
def test_fpc_coefficient_is_the_exact_window_expectation(n):
  rng = np.random.default_rng(n)
  g, g_sq, tr = _population(rng, n)
  if n <= 5:   # every permutation, exact
    perms = np.array(list(itertools.permutations(range(n))))
    tol = lambda est: 1e-9
  else:        # Monte Carlo over uniform permutations
    perms = np.argsort(rng.random((60000, n)), axis=1)
    tol = lambda est: 3 * est.std() / np.sqrt(len(est))
  for b in sorted({1, max(n - 1, 1), n, n + 1, 2 * n + 1, 3 * n}):
    for t in (0, 1, 2):           # step t starts at position t * b
      rows = _windows(perms, t * b, b)
      sq = np.sum(g[rows].mean(1) ** 2, -1)
      want = g_sq + tr * float(noise.fpc_coefficient(b, n))
      assert abs(sq.mean() - want) <= tol(sq) + 1e-6 * want, (b, t, sq.mean(),
                                                              want)


def test_fpc_coefficient_closed_form_and_limits():
  b = jnp.array([1, 3, 6, 7, 12, 13], jnp.int32)
  want = [1.0, 3 / 15, 0.0, 1 * 5 / (49 * 5), 0.0, 1 * 5 / (169 * 5)]
  np.testing.assert_allclose(noise.fpc_coefficient(b, 6), want, rtol=1e-6)
  np.testing.assert_allclose(noise.fpc_coefficient(b, jnp.inf), 1.0 / b,
                             rtol=1e-6)
  np.testing.assert_array_equal(noise.fpc_coefficient(b, 1), 0.0)
  # broadcasting [K] x [K, 1], dtype, jit
  c = jax.jit(noise.fpc_coefficient)(b, jnp.array([[5.0], [1e6]]))
  assert c.shape == (2, 6) and c.dtype == jnp.float32
  np.testing.assert_allclose(c[1], 1.0 / b, rtol=1e-4)


def _step_draws(g, perms, start, sizes):
  """Kernel-style statistics of one step: the microbatches are consecutive
  windows of the step's window. Returns (small_sq, c_small, b_small, big_sq,
  b) with b_small the harmonic mean (for the uncorrected estimator)."""
  n = g.shape[0]
  b = sum(sizes)
  rows = _windows(perms, start, b)
  small, at = [], 0
  for nj in sizes:
    small.append(np.sum(g[rows[:, at:at + nj]].mean(1) ** 2, -1))
    at += nj
  c_small = float(np.mean([noise.fpc_coefficient(nj, n) for nj in sizes]))
  b_small = len(sizes) / sum(1.0 / nj for nj in sizes)
  big_sq = np.sum(g[rows].mean(1) ** 2, -1)
  return np.mean(small, 0), c_small, b_small, big_sq, b


@pytest.mark.parametrize("n,sizes,t", [
    (12, (3, 3, 2), 0),       # b = 8 < n, short last microbatch
    (12, (3, 3, 2), 1),       # the second step (wraps around)
    (30, (4, 4, 2), 2),
    (12, (5, 5, 2), 0),       # b = n: the step is exact
    (5, (3, 3, 1), 1),        # b = 7 > n
    (2, (2, 1), 0),           # b = 3 > n = 2, one exact microbatch
])
def test_fpc_estimates_unbiased_where_uncorrected_is_not(n, sizes, t):
  rng = np.random.default_rng(n + len(sizes) + t)
  trials = 40000
  g, g_sq, tr = _population(rng, n)
  perms = np.argsort(rng.random((trials, n)), axis=1)
  small_sq, c_small, b_small, big_sq, b = _step_draws(g, perms, t * sum(sizes),
                                                      sizes)
  c_big = noise.fpc_coefficient(b, n)
  est_g, est_t, ok = noise.fpc_estimates(small_sq, c_small, big_sq, c_big)
  assert np.asarray(ok).all()
  est_g, est_t = np.asarray(est_g, np.float64), np.asarray(est_t, np.float64)
  for est, truth in ((est_g, g_sq), (est_t, tr)):
    se = est.std() / np.sqrt(trials)   # 0 for |G|^2 when b = n (exact)
    assert abs(est.mean() - truth) < 3 * se + 1e-5 * truth, (est.mean(),
                                                               truth, se)
  # the uncorrected estimator on the same draws reads |G|^2 low
  unc_g, _ = noise.two_batch_estimates(small_sq, b_small, big_sq, b)
  unc_g = np.asarray(unc_g, np.float64)
  se = unc_g.std() / np.sqrt(trials)
  assert unc_g.mean() < g_sq - 3 * se, (unc_g.mean(), g_sq, se)


def test_fpc_estimates_not_ok_where_undefined():
  c = noise.fpc_coefficient
  # n = 1; both windows exact (b = 2n, microbatches of n); equal coefficients
  _, _, ok = noise.fpc_estimates(jnp.ones(4), jnp.array(
      [c(1, 1), c(4, 4), 0.5, 0.5]), jnp.ones(4), jnp.array(
          [c(2, 1), c(8, 4), 0.5, 0.4999999]))
  assert np.asarray(ok).tolist() == [False, False, False, False]
  g, t, ok = noise.fpc_estimates(3.0, 1.0, 1.5, 0.25)
  assert bool(ok) and (float(g), float(t)) == (1.0, 2.0)


def test_cohort_estimates_unbiased_without_replacement():
  rng = np.random.default_rng(7)
  big_n, k, trials = 10, 4, 40000
  h = rng.standard_normal((big_n, 3)) + np.array([0.5, -0.2, 0.9])
  mean = h.mean(0)
  truth_g, truth_t = float(mean @ mean), float(((h - mean) ** 2).sum(1).mean())
  pick = np.argsort(rng.random((trials, big_n)), axis=1)[:, :k]
  hk = h[pick]                                        # [trials, k, 3]
  mcs = np.sum(hk ** 2, -1).mean(1)
  ms = np.sum(hk.mean(1) ** 2, -1)
  est_g, est_t = noise.cohort_estimates(mcs, ms, k, big_n)
  for est, truth in ((est_g, truth_g), (est_t, truth_t)):
    est = np.asarray(est, np.float64)
    se = est.std() / np.sqrt(trials)
    assert abs(est.mean() - truth) < 3 * se, (est.mean(), truth, se)
  # the whole population: exact; one client: nothing to estimate
  g, t = noise.cohort_estimates(np.sum(h ** 2, -1).mean(), truth_g, big_n,
                                big_n)
  np.testing.assert_allclose([g, t], [truth_g, truth_t], rtol=1e-5)
  assert [float(x) for x in noise.cohort_estimates(2.0, 2.0, 1, 10)] == [0, 0]


def test_effective_critical_batch_doubles_the_steps():
  rng = np.random.default_rng(0)
  big_b = rng.uniform(0.1, 500, 50)
  n = rng.integers(2, 400, 50)
  crit = np.asarray(noise.effective_critical_batch(big_b, n), np.float64)
  assert (crit < n).all() and (crit > 0).all()
  # S = S_min (1 + B c_eff(b, n)) = 2 S_min  <=>  B (n - b) / (b (n - 1)) = 1
  np.testing.assert_allclose(big_b * (n - crit) / (crit * (n - 1)), 1.0,
                             rtol=1e-4)
  # (1/B' + 1/n)^-1 with B' = B n / (n - 1); n -> inf: B; n = 1: 1
  np.testing.assert_allclose(crit, 1 / ((n - 1) / (big_b * n) + 1 / n),
                             rtol=1e-5)
  np.testing.assert_allclose(
      noise.effective_critical_batch(big_b, jnp.inf), big_b, rtol=1e-6)
  np.testing.assert_allclose(noise.effective_critical_batch(big_b, 1), 1.0)
  assert float(noise.effective_critical_batch(0.0, 50)) == 0.0
