"""SCAFFOLD removes client drift on a two-client quadratic; FedAvg does not."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import algorithms
from fedjax_bsa import Config
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.data import federated

# f_k(w) = a_k / 2 |w - c_k|^2; global optimum of f_1 + f_2:
# w* = (a_1 c_1 + a_2 c_2) / (a_1 + a_2)
A = np.array([1.0, 4.0], np.float32)
C = np.array([[2.0, -1.0], [-1.0, 3.0]], np.float32)
W_STAR = (A[:, None] * C).sum(0) / A.sum()


def _quadratic_loss(params, x, y):
  del y
  c, a = x[:, :2], x[:, 2]
  return 0.5 * a * jnp.sum((params["w"][None] - c) ** 2, -1)


def _simulate(name: str, rounds=60, steps=50, lr=0.1):
  n = 4
  x = np.concatenate([np.repeat(C[:, None], n, 1),
                      np.repeat(A[:, None, None], n, 1)], -1)
  data = jax.tree.map(jnp.asarray, federated.from_partition(
      x.reshape(2 * n, 3), np.zeros(2 * n, np.int32),
      [np.arange(n), np.arange(n, 2 * n)]))
  alg = algorithms.make_algorithm(Config(algorithm=name))
  kern = jax.jit(kernel_lib.make_round_kernel(
      _quadratic_loss, alg.client_tx, alg.client_init, microbatch=n,
      lanes=2, noise_stats=False, client_deltas=alg.client_deltas))
  params = {"w": jnp.zeros(2)}
  state = alg.init(params, 2)
  cohort = jnp.arange(2, dtype=jnp.int32)
  b = jnp.full((2,), n, jnp.int32)
  s = jnp.full((2,), steps, jnp.int32)
  lrs = jnp.full((2,), lr, jnp.float32)
  weights = alg.weights(b * s, s, data.num_examples, {})
  for r in range(rounds):
    jobs = kernel_lib.Jobs(cohort, jnp.zeros(2, jnp.int32), b, s, lrs,
                           weights, federated.shuffle_seeds(
                               jax.random.key(r), cohort))
    inputs = alg.client_inputs(state, cohort, {})
    out = kern(jax.tree.map(lambda a: a[None], params), data, jobs, inputs)
    result = algorithms.RoundResult(
        jax.tree.map(lambda a: a[0], out.delta), out.client_deltas, cohort,
        s, lrs, 2)
    delta, state = alg.server_update(state, result, {})
    params = jax.tree.map(jnp.add, params, delta)
  return np.asarray(params["w"])


def test_scaffold_reaches_global_optimum_fedavg_stays_biased():
  w_avg = _simulate("fedavg")
  w_scaffold = _simulate("scaffold")
  # FedAvg with many local steps: each client reaches its own optimum, the
  # average of c_k is not w*
  assert np.linalg.norm(w_avg - W_STAR) > 0.5
  np.testing.assert_allclose(w_avg, C.mean(0), atol=0.05)
  np.testing.assert_allclose(w_scaffold, W_STAR, atol=1e-3)
