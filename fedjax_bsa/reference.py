"""Baselines the round kernel is checked and measured against.

* :func:`reference_round`: a plain per-client Python loop with exact,
  unpadded shapes (one jitted gradient per distinct batch size). It is the
  correctness reference of :mod:`fedjax_bsa.kernel` and the "naive loop" of
  the round-kernel benchmark.
* :func:`make_padded_kernel`: the plain padded layout, clients vmapped over
  ``[clients, s_max, b_max]`` with masks: the layout the kernel replaces.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import federated
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import models
from fedjax_bsa import noise

__all__ = ["reference_round", "make_padded_kernel"]

tmap = jax.tree.map


@functools.lru_cache(maxsize=None)
def _grad_fn(apply_fn):
  def mean_loss(p, x, y):
    return jnp.mean(models.example_losses(apply_fn, p, x, y))
  return jax.jit(jax.value_and_grad(mean_loss))


def _sq(tree):
  return float(sum(np.vdot(np.asarray(a), np.asarray(a))
                   for a in jax.tree.leaves(tree)))


def reference_round(apply_fn: Callable, params, data, cohort, plan, weights,
                    key, *, microbatch: int, prox_mu: float = 0.0,
                    momentum: float = 0.0, correction=None):
  """One round as a per-client loop with exact shapes (slow, obviously right).

  Args: as :func:`fedjax_bsa.kernel.make_round_kernel`'s kernel.

  Returns:
    ``(delta, stats, client_deltas)``: the aggregate ``sum_k w_k (x_k - x)``,
    a :class:`~fedjax_bsa.kernel.ClientStats` of numpy arrays and the list of
    per-client deltas.
  """
  grad = _grad_fn(apply_fn)
  cohort = np.asarray(cohort)
  n_max = data.y.shape[1]
  n = np.asarray(data.num_examples)[cohort]
  perm = np.asarray(federated.client_permutations(
      key, jnp.asarray(cohort), jnp.asarray(n), n_max))
  K = len(cohort)
  b_all = np.maximum(np.asarray(plan.batch_size), 1)
  s_all = np.maximum(np.asarray(plan.steps), 0)
  out = {f: np.zeros(K, np.float32) for f in kernel_lib.ClientStats._fields}
  delta = tmap(jnp.zeros_like, params)
  deltas = []
  for k in range(K):
    b, s, lr = int(b_all[k]), int(s_all[k]), float(plan.lr[k])
    w, v = params, tmap(jnp.zeros_like, params)
    loss_sum = gsq = tr = 0.0
    nsteps = 0
    for t in range(s):
      rows = perm[k][(t * b + np.arange(b)) % max(n[k], 1)]
      x = data.x[cohort[k]][rows]
      y = data.y[cohort[k]][rows]
      loss, g = grad(w, x, y)
      loss_sum += float(loss) * b
      m = -(-b // microbatch)
      if m >= 2:
        sizes = [min(microbatch, b - j * microbatch) for j in range(m)]
        small = [_sq(grad(w, x[j * microbatch:j * microbatch + nj],
                          y[j * microbatch:j * microbatch + nj])[1])
                 for j, nj in enumerate(sizes)]
        b_small = m / sum(1.0 / nj for nj in sizes)
        e_g, e_t = noise.two_batch_estimates(np.mean(small), b_small, _sq(g),
                                             b)
        gsq, tr, nsteps = gsq + float(e_g), tr + float(e_t), nsteps + 1
      d = g
      if prox_mu:
        d = tmap(lambda a, wi, w0: a + prox_mu * (wi - w0), d, w, params)
      if correction is not None:
        d = tmap(lambda a, cc: a + cc[k], d, correction)
      v = tmap(lambda vi, a: momentum * vi + a, v, d) if momentum else d
      w = tmap(lambda wi, vi: wi - lr * vi, w, v)
    dk = tmap(jnp.subtract, w, params)
    deltas.append(dk)
    if s > 0:
      delta = tmap(lambda a, dd: a + float(weights[k]) * dd, delta, dk)
      out["update_sq"][k] = _sq(dk) / (lr * s) ** 2
    out["loss"][k] = loss_sum / max(b * s, 1)
    out["examples"][k] = b * s
    out["steps"][k] = s
    out["grad_sq"][k] = gsq / max(nsteps, 1)
    out["trace"][k] = tr / max(nsteps, 1)
    out["noise_steps"][k] = nsteps
  return delta, kernel_lib.ClientStats(**out), deltas


def make_padded_kernel(apply_fn: Callable, s_max: int, b_max: int):
  """The padded ``[clients, s_max, b_max]`` FedAvg kernel (a baseline).

  Every client runs ``s_max`` steps of ``b_max`` examples; masks make the
  surplus steps and rows no-ops. Shapes (hence compiles) depend on the
  largest plan, and the work on ``K * s_max * b_max``.

  Returns:
    ``padded(params, data, cohort, plan, weights, key) -> delta``.
  """
  loss_fn = functools.partial(models.example_losses, apply_fn)

  def padded(params, data, cohort, plan, weights, key):
    n_max = data.y.shape[1]
    n = data.num_examples[cohort]
    perm = federated.client_permutations(key, cohort, n, n_max)

    def client(cid, nk, pk, b, s, lr, wk):
      def step(w, t):
        pos = t * b + jnp.arange(b_max)
        valid = jnp.arange(b_max) < b
        rows = federated.example_index(pk, nk, pos)

        def loss(p):
          per = loss_fn(p, data.x[cid, rows], data.y[cid, rows])
          return jnp.sum(jnp.where(valid, per, 0.0)) / b

        g = jax.grad(loss)(w)
        new = tmap(lambda a, gi: a - lr * gi, w, g)
        return tmap(lambda a, o: jnp.where(t < s, a, o), new, w), None

      w, _ = jax.lax.scan(step, params, jnp.arange(s_max))
      return tmap(lambda a, p0: wk * (a - p0), w, params)

    d = jax.vmap(client)(cohort, n, perm, plan.batch_size, plan.steps,
                         plan.lr, weights)
    return tmap(lambda a: a.sum(0), d)

  return padded
