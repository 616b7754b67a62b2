"""The noise-estimator check's rounds: kernel estimates and their recomputation.

Part of :mod:`fedjax_bsa.bench.noise_estimator` (whose
:mod:`~fedjax_bsa.bench.noise_estimator.main` describes the check): the
round kernel at frozen parameters (:func:`make_kernel`, :func:`round_jobs`,
:func:`kernel_estimates`), the rows each step read (:func:`local_rows`), the
same steps' statistics recomputed on the host from the Gram matrix
(:func:`recompute`), and :func:`run`, which does all of it for every case.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.bench.noise_estimator.problem import Case
from fedjax_bsa.bench.noise_estimator.problem import client_sizes
from fedjax_bsa.bench.noise_estimator.problem import FROZEN_LR
from fedjax_bsa.bench.noise_estimator.problem import make_cases
from fedjax_bsa.bench.noise_estimator.problem import make_setup
from fedjax_bsa.bench.noise_estimator.problem import MU
from fedjax_bsa.bench.noise_estimator.problem import Setup
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import noise
from fedjax_bsa.setup import models

__all__ = ["make_kernel", "round_jobs", "kernel_estimates", "local_rows",
           "recompute", "run"]


def make_kernel(model, lanes: int = 16, mu: int = MU):
  """The jitted round kernel for plain SGD (client state: none)."""
  tx = optax.identity()
  return jax.jit(kernel_lib.make_round_kernel(
      functools.partial(models.example_losses, model.apply), tx,
      lambda params, inp: tx.init(params), microbatch=mu, lanes=lanes))


def round_jobs(cases, rounds: int, key) -> kernel_lib.Jobs:
  """Jobs ``[rounds * len(cases)]``, round-major: job ``r * C + i`` is case
  ``i`` in round ``r``, with that round's shuffle seed for its client
  (``federated.shuffle_seeds`` of ``fold_in(key, r)``)."""
  C = len(cases)
  client = jnp.asarray([c.client for c in cases] * rounds, jnp.int32)
  keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(jnp.arange(rounds))
  seeds = jax.vmap(lambda k, ids: federated.shuffle_seeds(k, ids))(
      keys, client.reshape(rounds, C)).reshape(-1)
  tile = lambda v, dt: jnp.asarray(list(v) * rounds, dt)
  return kernel_lib.Jobs(
      client=client, exp=jnp.zeros((rounds * C,), jnp.int32),
      batch=tile([c.batch for c in cases], jnp.int32),
      steps=tile([c.steps for c in cases], jnp.int32),
      lr=jnp.full((rounds * C,), FROZEN_LR, jnp.float32),
      weight=jnp.zeros((rounds * C,), jnp.float32), seed=seeds)


def kernel_estimates(kernel, setup: Setup, cases, rounds: int, key):
  """The kernel's per-round estimates: ``(g_sq, trace, noise_steps, seeds)``
  each ``[rounds, C]``."""
  jobs = round_jobs(cases, rounds, key)
  params = jax.tree.map(lambda a: a[None], setup.params)
  out = kernel(params, setup.data, jobs, None)
  st = jax.tree.map(np.asarray, out.stats)
  shape = (rounds, len(cases))
  return (st.grad_sq.reshape(shape).astype(np.float64),
          st.trace.reshape(shape).astype(np.float64),
          st.noise_steps.reshape(shape), np.asarray(jobs.seed).reshape(shape))


@jax.jit
def _stream_rows(data, client, seeds, pos):
  """``example_rows`` for seeds ``[R, C]``, clients ``[C]``, positions
  ``[C, P]``: ``[R, C, P]``."""
  return federated.example_rows(data, client[None, :, None],
                                seeds[:, :, None], pos[None])


def local_rows(setup: Setup, cases, seeds) -> list[np.ndarray]:
  """Per case, the client-local indices ``[R, s, b]`` of the rows its steps
  read (``example_rows`` at positions ``t b + i``, mapped back to the
  client's stored order), every case in one compiled call.

  Args:
    setup: from :func:`make_setup`.
    cases: ``C`` cases.
    seeds: uint32 ``[R, C]`` shuffle seeds.
  """
  width = max(c.steps * c.batch for c in cases)
  pos = np.zeros((len(cases), width), np.int32)
  for i, c in enumerate(cases):
    pos[i, :c.steps * c.batch] = np.arange(c.steps * c.batch) % c.n
  rows = np.asarray(_stream_rows(
      setup.data, jnp.asarray([c.client for c in cases], jnp.int32),
      jnp.asarray(seeds), jnp.asarray(pos)))
  host = jax.tree.map(np.asarray, setup.data)
  out = []
  for i, c in enumerate(cases):
    own = federated.client_rows(host, c.client)
    local = np.full(host.x.shape[0], -1, np.int64)
    local[own] = np.arange(c.n)
    idx = local[rows[:, i, :c.steps * c.batch]]
    if np.any(idx < 0):
      raise AssertionError(f"example_rows left client {c.client}'s rows")
    out.append(idx.reshape(len(idx), c.steps, c.batch))
  return out


def recompute(setup: Setup, case: Case, idx: np.ndarray,
              mu: int = MU) -> dict:
  """Per-step statistics of ``case`` recomputed on the host (float64).

  The squared norm of the mean gradient of a multiset of the client's rows
  is a quadratic form in the Gram matrix of its per-example gradients.

  Args:
    setup: from :func:`make_setup`.
    case: the case.
    idx: int ``[R, s, b]`` client-local rows of each step
      (:func:`local_rows`).

  Returns:
    dict of ``[R, s]`` arrays ``small_sq``, ``big_sq``, ``g``, ``tr``
    (:func:`noise.fpc_estimates`), ``g_u``, ``tr_u``
    (:func:`noise.two_batch_estimates` at the harmonic-mean microbatch
    size), and the scalars ``c_small``, ``c_big``, ``b_small``.
  """
  b, n, k = case.batch, case.n, case.client
  K = setup.gram[k]
  sizes = client_sizes(b, mu)
  m = len(sizes)
  pad = m * mu - b
  idx_p = np.concatenate([idx, np.zeros(idx.shape[:-1] + (pad,), np.int64)],
                         -1).reshape(idx.shape[:-1] + (m, mu))
  mask = (np.arange(m * mu) < b).reshape(m, mu).astype(np.float64)
  blocks = K[idx_p[..., :, None], idx_p[..., None, :]]      # [R, s, m, mu, mu]
  blocks = blocks * mask[:, :, None] * mask[:, None, :]
  small = blocks.sum((-1, -2)) / sizes.astype(np.float64) ** 2
  small_sq = small.mean(-1)                                 # [R, s]
  counts = (idx[..., None] == np.arange(n)).sum(-2).astype(np.float64)
  big_sq = np.einsum("rsi,rsi->rs", counts @ K, counts) / float(b) ** 2
  c_small = float(np.mean(np.asarray(noise.fpc_coefficient(sizes, n))))
  c_big = float(noise.fpc_coefficient(b, n))
  g, tr, ok = noise.fpc_estimates(small_sq, c_small, big_sq, c_big)
  b_small = float(1.0 / np.mean(1.0 / sizes))
  g_u, tr_u = noise.two_batch_estimates(small_sq, b_small, big_sq, b)
  return dict(small_sq=small_sq, big_sq=big_sq, g=np.asarray(g, np.float64),
              tr=np.asarray(tr, np.float64), ok=np.asarray(ok),
              g_u=np.asarray(g_u, np.float64),
              tr_u=np.asarray(tr_u, np.float64), c_small=c_small,
              c_big=c_big, b_small=b_small)


def run(*, rounds: int, seed: int = 0, epochs: int = 3, lanes: int = 16,
        chunk: int = 200):
  """Everything: setup, kernel rounds (``chunk`` rounds per call, one
  compile), host recomputation of the same steps.

  Returns:
    ``(setup, cases, g_k, tr_k, recs, mismatch)``: the kernel's per-round
    estimates ``[R, C]``, per case the :func:`recompute` dict (arrays
    ``[R, s]``), and the largest difference between a kernel per-round
    estimate and the recomputed one, relative to ``mean small_sq`` (for
    ``|G|^2``) or ``mean small_sq / c_small`` (for ``tr``).
  """
  setup = make_setup(seed=seed, epochs=epochs)
  cases = make_cases(setup)
  kernel = make_kernel(setup.model, lanes)
  key = jax.random.key(seed + 1)
  want = np.array([c.steps for c in cases])
  parts = []
  for start in range(0, rounds, chunk):
    r = min(chunk, rounds - start)
    g, t, ns, sd = kernel_estimates(kernel, setup, cases, r,
                                    jax.random.fold_in(key, start))
    if not np.all(ns == want[None, :]):
      raise AssertionError(f"noise_steps {ns[0]} != steps {want}")
    recs = [recompute(setup, c, idx)
            for c, idx in zip(cases, local_rows(setup, cases, sd))]
    parts.append((g, t, recs))
  g_k = np.concatenate([p[0] for p in parts])
  tr_k = np.concatenate([p[1] for p in parts])
  recs = [{f: (np.concatenate([p[2][i][f] for p in parts])
               if np.ndim(parts[0][2][i][f]) else parts[0][2][i][f])
           for f in parts[0][2][i]} for i in range(len(cases))]
  mismatch = 0.0
  for i, rec in enumerate(recs):
    scale = rec["small_sq"].mean()
    mismatch = max(
        mismatch,
        float(np.max(np.abs(g_k[:, i] - rec["g"].mean(-1))) / scale),
        float(np.max(np.abs(tr_k[:, i] - rec["tr"].mean(-1)))
              * rec["c_small"] / scale))
  return setup, cases, g_k, tr_k, recs, mismatch
