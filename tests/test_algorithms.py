"""Algorithm pieces against hand computations; the registry.

Whole rounds of every algorithm and server optimizer are checked against
numpy in ``test_round.py``."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa import algorithms
from fedjax_bsa import Config
from fedjax_bsa import ConfigError
from fedjax_bsa.core import registry


def test_fednova_momentum_norm():
  rho, tau = 0.9, 5
  # |a|_1 = sum_{t<tau} (1 - rho^(tau - t)) / (1 - rho)
  by_sum = sum((1 - rho ** (tau - t)) / (1 - rho) for t in range(tau))
  np.testing.assert_allclose(
      algorithms.fednova_a_norm(jnp.array([tau]), rho), [by_sum], rtol=1e-5)


def test_fednova_weights_by_hand():
  steps, sizes = jnp.array([2, 7, 0]), jnp.array([30, 10, 50])
  p = np.array([0.75, 0.25])
  tau_eff = p @ np.array([2.0, 7.0])
  want = [tau_eff * p[0] / 2, tau_eff * p[1] / 7, 0.0]
  np.testing.assert_allclose(algorithms.fednova_weights(steps, sizes), want,
                             rtol=1e-6)


def test_fednova_weights_with_per_client_rates():
  """Clients with constant gradients g_k run S_k steps at their own rate
  eta_k, so x_k - x = -eta_k S_k g_k: the aggregate is the mean gradient
  times tau_eff = sum_k p_k eta_k S_k, whatever the mix of rate and steps
  (steps alone would weigh a client by its rate); one rate for all gives
  the plain formula."""
  steps, sizes = jnp.array([2, 8, 4, 0]), jnp.array([10, 30, 20, 40])
  lr = jnp.array([0.4, 0.1, 0.05, 0.3])
  g = np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [5.0, 5.0]])
  delta = -(np.asarray(lr) * np.asarray(steps))[:, None] * g
  c = np.asarray(algorithms.fednova_weights(steps, sizes, lr=lr))
  p = np.array([10, 30, 20, 0]) / 60.0
  tau_eff = p @ (np.asarray(lr) * np.asarray(steps))
  np.testing.assert_allclose(c @ delta, -tau_eff * (p @ g), rtol=1e-6)
  same = algorithms.fednova_weights(steps, sizes, lr=jnp.full((4,), 0.3))
  np.testing.assert_allclose(same, algorithms.fednova_weights(steps, sizes),
                             rtol=1e-6)


def test_fedavg_weights_by_examples_and_absent_clients():
  w = algorithms.example_weights(jnp.array([10, 30, 0]), jnp.array([1, 3, 0]),
                                 jnp.array([5, 5, 5]))
  np.testing.assert_allclose(w, [0.25, 0.75, 0.0])


def test_scaffold_control_update_by_hand():
  c = {"w": jnp.array([1.0, 2.0])}
  cc = {"w": jnp.zeros((4, 2))}
  delta = {"w": jnp.array([[-0.2, 0.4], [0.0, 0.0]])}
  c_new, cc_new = algorithms.scaffold_update(
      c, cc, jnp.array([1, 3]), delta, jnp.array([2, 0]),
      jnp.array([0.1, 0.1]), num_clients=4)
  # c_1+ = c_1 - c + (x - x_1) / (tau lr) = 0 - [1, 2] + [0.2, -0.4] / 0.2
  np.testing.assert_allclose(cc_new["w"][1], [0.0, -4.0], atol=1e-6)
  np.testing.assert_allclose(cc_new["w"][3], [0.0, 0.0])  # absent: unchanged
  # c+ = c + (1/N) sum (c_k+ - c_k) = [1, 2] + [0, -4] / 4
  np.testing.assert_allclose(c_new["w"], [1.0, 1.0], atol=1e-6)


def test_unknown_algorithm_names_the_registered_ones():
  with pytest.raises(ConfigError, match="algorithm='nope' is not allowed: "
                     "choose one of fedavg, fedprox, fednova, feddyn, scaffold"):
    Config(algorithm="nope").validate()


def test_a_user_registered_algorithm_is_a_valid_setting():
  @registry.ALGORITHMS.register("half_avg")
  def half_avg(cfg):
    base = algorithms.make_algorithm(cfg.replace(algorithm="fedavg"))
    return base._replace(weights=lambda e, s, n, hp=None, lr=None: 0.5 *
                         algorithms.example_weights(e, s, n))

  cfg = Config(algorithm="half_avg").validate()
  alg = algorithms.make_algorithm(cfg)
  np.testing.assert_allclose(alg.weights(jnp.array([1, 3]), jnp.array([1, 1]),
                                         None), [0.125, 0.375])
