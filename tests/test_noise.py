"""Gradient-noise estimator: unbiased on a problem with a known answer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa import noise


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
  assert float(noise.noise_scale(2.0, 8.0)) == 4.0
  assert float(noise.noise_scale(1.0, -3.0)) == 0.0
