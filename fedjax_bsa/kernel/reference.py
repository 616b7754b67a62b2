"""Baselines the round kernel is checked and measured against.

* :func:`reference_round`: a plain per-job Python loop with exact, unpadded
  shapes (one jitted gradient per distinct batch size). It is the
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

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import noise

__all__ = ["reference_round", "make_padded_kernel", "client_rows"]

tmap = jax.tree.map


@functools.lru_cache(maxsize=None)
def _grad_fn(loss_fn):
  def mean_loss(p, x, y):
    return jnp.mean(loss_fn(p, x, y))
  return jax.jit(jax.value_and_grad(mean_loss))


def _sq(tree):
  return float(sum(np.vdot(np.asarray(a, np.float64),
                           np.asarray(a, np.float64))
                   for a in jax.tree.leaves(tree)))


def client_rows(data, client: int, seed, positions) -> np.ndarray:
  """Rows of ``client`` at stream ``positions`` this round (numpy)."""
  return np.asarray(federated.example_rows(
      data, jnp.int32(client), jnp.asarray(seed),
      jnp.asarray(positions, jnp.int32)))


def reference_round(loss_fn: Callable, client_tx, client_init, server_params,
                    data, jobs, client_inputs=None, *, microbatch: int):
  """One round as a per-job loop with exact shapes (slow, obviously right).

  Args: as :func:`fedjax_bsa.kernel.make_round_kernel` and its kernel.

  Returns:
    ``(delta, stats, client_deltas, update_sum_sq)``: the aggregates ``[E,
    ...]``, a :class:`~fedjax_bsa.kernel.ClientStats` of numpy arrays, the
    list of per-job deltas and ``|sum_j h_j|^2`` per experiment. A job
    whose model goes non-finite is left out of the aggregates and of
    ``|sum_j h_j|^2`` (its listed delta is zero); its stats keep their
    non-finite values.
  """
  grad = _grad_fn(loss_fn)
  jb = jax.tree.map(np.asarray, jobs)
  J = len(jb.client)
  E = jax.tree.leaves(server_params)[0].shape[0]
  n_all = np.asarray(data.num_examples)
  x_all, y_all = np.asarray(data.x), np.asarray(data.y)
  out = {f: np.zeros(J, np.float32) for f in kernel_lib.ClientStats._fields}
  delta = tmap(lambda a: np.zeros(a.shape, np.float64), server_params)
  hsum = tmap(lambda a: np.zeros(a.shape, np.float64), server_params)
  deltas = []
  for j in range(J):
    e, c = int(jb.exp[j]), int(jb.client[j])
    b, s, lr = max(int(jb.batch[j]), 1), max(int(jb.steps[j]), 0), float(
        jb.lr[j])
    n = int(n_all[c])
    start = tmap(lambda a: a[e], server_params)
    inp = None if client_inputs is None else tmap(lambda a: a[j],
                                                  client_inputs)
    w, opt = start, client_init(start, inp)
    loss_sum = gsq = tr = 0.0
    nsteps = 0
    for t in range(s):
      rows = client_rows(data, c, jb.seed[j], (t * b + np.arange(b)) % n)
      x, y = x_all[rows], y_all[rows]
      loss, g = grad(w, x, y)
      loss_sum += float(loss) * b
      m = -(-b // microbatch)
      if m >= 2:
        sizes = [min(microbatch, b - i * microbatch) for i in range(m)]
        small = [_sq(grad(w, x[i * microbatch:i * microbatch + ni],
                          y[i * microbatch:i * microbatch + ni])[1])
                 for i, ni in enumerate(sizes)]
        c_small = float(np.mean([noise.fpc_coefficient(ni, n)
                                 for ni in sizes]))
        e_g, e_t, ok = noise.fpc_estimates(
            np.mean(small), c_small, _sq(g), noise.fpc_coefficient(b, n))
        if bool(ok):
          gsq, tr, nsteps = gsq + float(e_g), tr + float(e_t), nsteps + 1
      d, opt = client_tx.update(g, opt, w)
      w = tmap(lambda wi, di: wi - lr * di, w, d)
    dk = tmap(jnp.subtract, w, start)
    finite = all(bool(np.all(np.isfinite(a))) for a in jax.tree.leaves(dk))
    if not finite:   # a failed client: left out of every sum
      deltas.append(tmap(jnp.zeros_like, dk))
    else:
      deltas.append(dk)
    if s > 0:
      h = tmap(lambda dd: -np.asarray(dd, np.float64) / (lr * s), dk)
      out["update_sq"][j] = _sq(h) if finite else np.nan
    if s > 0 and finite:
      wj = float(jb.weight[j])
      delta = tmap(lambda a, dd: _add_at(a, e, wj * np.asarray(dd)), delta,
                   dk)
      hsum = tmap(lambda a, hh: _add_at(a, e, hh), hsum, h)
    out["loss"][j] = loss_sum / max(b * s, 1)
    out["examples"][j] = b * s
    out["steps"][j] = s
    out["grad_sq"][j] = gsq / max(nsteps, 1)
    out["trace"][j] = tr / max(nsteps, 1)
    out["noise_steps"][j] = nsteps
  usum = np.array([sum(float(np.sum(a[e] ** 2)) for a in jax.tree.leaves(
      hsum)) for e in range(E)])
  return delta, kernel_lib.ClientStats(**out), deltas, usum


def _add_at(a, e, v):
  a = np.array(a)
  a[e] += v
  return a


def make_padded_kernel(loss_fn: Callable, s_max: int, b_max: int):
  """The padded ``[clients, s_max, b_max]`` FedAvg kernel (a baseline).

  Every client runs ``s_max`` steps of ``b_max`` examples; masks make the
  surplus steps and rows no-ops. Shapes (hence compiles) depend on the
  largest plan, and the work on ``K * s_max * b_max``.

  Returns:
    ``padded(params, data, jobs) -> delta`` for one experiment.
  """

  def padded(params, data, jobs):
    n = data.num_examples[jobs.client]

    def client(cid, nk, seed, b, s, lr, wk):
      def step(w, t):
        pos = (t * b + jnp.arange(b_max)) % jnp.maximum(nk, 1)
        valid = jnp.arange(b_max) < b
        rows = federated.example_rows(data, cid, seed, pos)

        def loss(p):
          per = loss_fn(p, data.x[rows], data.y[rows])
          return jnp.sum(jnp.where(valid, per, 0.0)) / b

        g = jax.grad(loss)(w)
        new = tmap(lambda a, gi: a - lr * gi, w, g)
        return tmap(lambda a, o: jnp.where(t < s, a, o), new, w), None

      w, _ = jax.lax.scan(step, params, jnp.arange(s_max))
      return tmap(lambda a, p0: wk * (a - p0), w, params)

    d = jax.vmap(client)(jobs.client, n, jobs.seed, jobs.batch, jobs.steps,
                         jobs.lr, jobs.weight)
    return tmap(lambda a: a.sum(0), d)

  return padded
