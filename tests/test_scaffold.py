"""SCAFFOLD removes client drift on a two-client quadratic; FedAvg does not."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import algorithms
from fedjax_bsa import federated
from fedjax_bsa import kernel as kernel_lib

# f_k(w) = a_k / 2 |w - c_k|^2; global optimum of f_1 + f_2:
# w* = (a_1 c_1 + a_2 c_2) / (a_1 + a_2)
A = np.array([1.0, 4.0], np.float32)
C = np.array([[2.0, -1.0], [-1.0, 3.0]], np.float32)
W_STAR = (A[:, None] * C).sum(0) / A.sum()


def _quadratic_loss(params, x, y):
  del y
  c, a = x[:, :2], x[:, 2]
  return 0.5 * a * jnp.sum((params["w"][None] - c) ** 2, -1)


def _simulate(algorithm: str, rounds=60, steps=50, lr=0.1):
  n = 4
  x = np.concatenate([np.repeat(C[:, None], n, 1),
                      np.repeat(A[:, None, None], n, 1)], -1)
  data = federated.FederatedData(jnp.asarray(x), jnp.zeros((2, n), jnp.int32),
                                 jnp.full((2,), n, jnp.int32))
  scaffold = algorithm == "scaffold"
  kern = jax.jit(kernel_lib.make_round_kernel(
      None, microbatch=n, lanes=2, noise_stats=False,
      per_client_outputs=scaffold, example_loss=_quadratic_loss))
  params = {"w": jnp.zeros(2)}
  c_server = {"w": jnp.zeros(2)}
  c_clients = {"w": jnp.zeros((2, 2))}
  cohort = jnp.arange(2, dtype=jnp.int32)
  plan = kernel_lib.Plan(jnp.full((2,), n, jnp.int32),
                         jnp.full((2,), steps, jnp.int32),
                         jnp.full((2,), lr, jnp.float32))
  weights = algorithms.aggregation_weights(algorithm, plan.batch_size *
                                           plan.steps, plan.steps,
                                           data.num_examples)
  for r in range(rounds):
    corr = None
    if scaffold:
      corr = jax.tree.map(lambda cs, cc: cs[None] - cc, c_server, c_clients)
    out = kern(params, data, cohort, plan, weights, jax.random.key(r), corr)
    if scaffold:
      c_server, c_clients = algorithms.scaffold_update(
          c_server, c_clients, cohort, out.client_delta, plan.steps, plan.lr,
          2)
    params = jax.tree.map(jnp.add, params, out.delta)
  return np.asarray(params["w"])


def test_scaffold_reaches_global_optimum_fedavg_stays_biased():
  w_avg = _simulate("fedavg")
  w_scaffold = _simulate("scaffold")
  # FedAvg with many local steps: each client reaches its own optimum, the
  # average of c_k is not w*
  assert np.linalg.norm(w_avg - W_STAR) > 0.5
  np.testing.assert_allclose(w_avg, C.mean(0), atol=0.05)
  np.testing.assert_allclose(w_scaffold, W_STAR, atol=1e-3)
