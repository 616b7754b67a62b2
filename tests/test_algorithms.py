"""Aggregation rules against hand computations; server optimizers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_bsa import algorithms
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import reference


def test_fednova_two_clients_by_hand(small_fed, small_mlp):
  params = small_mlp.init(jax.random.key(0))
  cohort = jnp.array([2, 9], jnp.int32)
  b = jnp.array([4, 6], jnp.int32)
  s = jnp.array([2, 7], jnp.int32)             # different step counts
  lr = jnp.array([0.1, 0.1], jnp.float32)
  plan = kernel_lib.Plan(b, s, lr)
  sizes = np.asarray(small_fed.num_examples)[[2, 9]]
  w = algorithms.aggregation_weights("fednova", b * s, s,
                                     jnp.asarray(sizes))
  kern = jax.jit(kernel_lib.make_round_kernel(small_mlp.apply, microbatch=4,
                                              lanes=2))
  key = jax.random.key(5)
  out = kern(params, small_fed, cohort, plan, w, key)
  _, _, deltas = reference.reference_round(
      small_mlp.apply, params, small_fed, cohort, plan, jnp.ones(2), key,
      microbatch=4)
  # by hand: p_i = n_i / (n_1 + n_2), |a_i|_1 = tau_i, tau_eff = sum p_i tau_i
  # x+ = x - tau_eff * sum_i p_i d_i / tau_i with d_i = x - x_i
  p = sizes / sizes.sum()
  tau = np.array([2.0, 7.0])
  tau_eff = float(p @ tau)
  for got, d0, d1 in zip(jax.tree.leaves(out.delta), jax.tree.leaves(deltas[0]),
                         jax.tree.leaves(deltas[1])):
    d = [-np.asarray(d0), -np.asarray(d1)]   # d_i = x - x_i
    update = -tau_eff * (p[0] * d[0] / tau[0] + p[1] * d[1] / tau[1])
    np.testing.assert_allclose(got, update, rtol=1e-4, atol=1e-7)
  # and it differs from FedAvg's weighting here
  fedavg = algorithms.aggregation_weights("fedavg", b * s, s,
                                          jnp.asarray(sizes))
  assert not np.allclose(w, fedavg)


def test_fednova_momentum_norm():
  rho, tau = 0.9, 5
  # |a|_1 = sum_{t<tau} (1 - rho^(tau - t)) / (1 - rho)
  by_sum = sum((1 - rho ** (tau - t)) / (1 - rho) for t in range(tau))
  np.testing.assert_allclose(
      algorithms.fednova_a_norm(jnp.array([tau]), rho), [by_sum], rtol=1e-5)


def test_fedavg_weights_by_examples_and_absent_clients():
  w = algorithms.aggregation_weights("fedavg", jnp.array([10, 30, 0]),
                                     jnp.array([1, 3, 0]), jnp.array([5, 5, 5]))
  np.testing.assert_allclose(w, [0.25, 0.75, 0.0])


def test_server_optimizers():
  params = {"w": jnp.ones(3)}
  pseudo_grad = {"w": jnp.array([1.0, -2.0, 0.5])}
  tx = algorithms.server_optimizer("sgd", 1.0)
  up, _ = tx.update(pseudo_grad, tx.init(params), params)
  np.testing.assert_allclose(optax.apply_updates(params, up)["w"],
                             [0.0, 3.0, 0.5])
  for name in ("momentum", "adam", "yogi"):
    tx = algorithms.server_optimizer(name, 0.1)
    state = tx.init(params)
    up, state = tx.update(pseudo_grad, state, params)
    new = optax.apply_updates(params, up)["w"]
    assert np.all(np.sign(np.asarray(new) - 1.0) == -np.sign(
        np.asarray(pseudo_grad["w"]))), name


def test_scaffold_control_update_by_hand():
  c = {"w": jnp.array([1.0, 2.0])}
  cc = {"w": jnp.zeros((4, 2))}
  delta = {"w": jnp.array([[-0.2, 0.4], [0.0, 0.0]])}
  c_new, cc_new = algorithms.scaffold_update(
      c, cc, jnp.array([1, 3]), delta, jnp.array([2, 0]),
      jnp.array([0.1, 0.1]), num_clients=4)
  # c_1+ = c_1 - c + (x - x_1) / (tau lr) = 0 - c + [0.2, -0.4] / 0.2
  np.testing.assert_allclose(cc_new["w"][1], [0.0, -4.0], atol=1e-6)
  np.testing.assert_allclose(cc_new["w"][3], [0.0, 0.0])  # absent: unchanged
  # c+ = c + (1/N) sum (c_k+ - c_k) = [1, 2] + [0, -4] / 4
  np.testing.assert_allclose(c_new["w"], [1.0, 1.0], atol=1e-6)
