"""The noise-estimator check's setup: digits, chosen clients, exact values.

Part of :mod:`fedjax_bsa.bench.noise_estimator` (whose
:mod:`~fedjax_bsa.bench.noise_estimator.main` describes the check): the
settings (:data:`MU`, :data:`SIZES`, :data:`PARTITIONS`, ...), one client
per (partition, size) drawn from the digits training set
(:func:`choose_clients`), the MLP trained by plain SGD (:func:`train`),
every client's per-example gradients and their Gram matrix, the exact
``|G|^2`` and ``tr(Sigma)`` (:func:`exact_stats`), and the (client, batch)
cases (:func:`case_batches`, :func:`make_cases`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.data import datasets
from fedjax_bsa.data import federated
from fedjax_bsa.data import partition
from fedjax_bsa.setup import models

__all__ = ["MU", "SIZES", "PARTITIONS", "Case", "Setup", "choose_clients",
           "train", "per_example_grads", "exact_stats", "make_setup",
           "case_batches", "make_cases"]

MU = 4                       # kernel microbatch
SIZES = (12, 40, 200)        # client rows
PARTITIONS = ("iid", "dirichlet")
ALPHA = 0.1                  # Dirichlet concentration
HIDDEN = 32                  # MLP width
FROZEN_LR = 1e-12            # steps do not move float32 parameters
POOL = 7                     # clients in each partition drawn from


class Case(NamedTuple):
  """One (client, batch) pair."""
  partition: str   # "iid" or "dirichlet"
  n: int           # client rows
  client: int      # client index in the data
  batch: int
  steps: int       # steps per round


class Setup(NamedTuple):
  model: models.Model
  params: dict               # trained parameters (one experiment, no axis)
  data: federated.FederatedData  # device arrays, the chosen clients
  clients: dict              # (partition, n) -> client index
  gram: dict                 # client -> float64 [n, n] g g^T
  exact: dict                # client -> (|G|^2, tr(Sigma))
  train_accuracy: float


def choose_clients(labels, sizes=SIZES, seed: int = 0):
  """Row indices of one client per (partition, size).

  Each partition splits the training set into :data:`POOL` clients
  (``partition.iid`` and ``partition.dirichlet(alpha=0.1)``); the client of
  ``n`` rows is a uniformly random ``n``-subset of the smallest unused
  client holding at least ``n`` rows (so it keeps that client's label mix).

  Returns:
    ``[(partition, n, rows)]``.
  """
  rng = np.random.default_rng(seed)
  pools = {"iid": partition.iid(len(labels), POOL, seed),
           "dirichlet": partition.dirichlet(labels, POOL, ALPHA, seed,
                                            min_examples=min(sizes))}
  out = []
  for name in PARTITIONS:
    parts, used = pools[name], set()
    for n in sizes:
      fits = [k for k in np.argsort([len(p) for p in parts], kind="stable")
              if len(parts[k]) >= n and k not in used]
      if not fits:
        raise ValueError(f"partition={name} (seed={seed}) has no unused "
                         f"client of >= {n} rows")
      used.add(fits[0])
      out.append((name, n, rng.choice(parts[fits[0]], n, replace=False)))
  return out


def train(model, x, y, *, epochs: int = 3, lr: float = 0.1,
          batch: int = 32, seed: int = 0):
  """Plain minibatch SGD on ``(x, y)``: the "trained state" parameters."""
  params = model.init(jax.random.key(seed))
  loss = lambda p, xb, yb: jnp.mean(models.example_losses(model.apply, p, xb,
                                                          yb))
  steps = len(y) // batch

  @jax.jit
  def epoch(p, key):
    order = jax.random.permutation(key, len(y))[:steps * batch]
    idx = order.reshape(steps, batch)

    def step(p, i):
      g = jax.grad(loss)(p, x[i], y[i])
      return jax.tree.map(lambda a, b: a - lr * b, p, g), None

    return jax.lax.scan(step, p, idx)[0]

  x, y = jnp.asarray(x), jnp.asarray(y)
  for e in range(epochs):
    params = epoch(params, jax.random.key(1000 + seed * 100 + e))
  return params


def per_example_grads(model, params, x, y) -> np.ndarray:
  """float64 ``[n, P]``: every row's gradient, flattened."""
  def one(xi, yi):
    g = jax.grad(lambda p: models.example_losses(
        model.apply, p, xi[None], yi[None])[0])(params)
    return ravel_pytree(g)[0]
  return np.asarray(jax.jit(jax.vmap(one))(jnp.asarray(x), jnp.asarray(y)),
                    np.float64)


def exact_stats(gram: np.ndarray) -> tuple[float, float]:
  """``(|G|^2, tr(Sigma))`` from the Gram matrix ``K = g g^T`` ``[n, n]``:
  ``|G|^2 = mean(K)``, ``tr = mean(diag K) - |G|^2`` (``1/n``).

  >>> g = np.array([[1.0, 0.0], [3.0, 2.0]])   # G = (2, 1)
  >>> exact_stats(g @ g.T)                     # |G|^2 = 5, tr = (2 + 2) / 2
  (5.0, 2.0)
  """
  g_sq = float(gram.mean())
  return g_sq, float(np.mean(np.diag(gram)) - g_sq)


def make_setup(*, seed: int = 0, epochs: int = 3, hidden: int = HIDDEN,
               sizes=SIZES) -> Setup:
  """Digits, the chosen clients, the trained MLP and exact statistics."""
  ds = datasets.digits()
  model = models.make_model("mlp", (64,), 10, hidden=hidden)
  params = train(model, ds.x_train, ds.y_train, epochs=epochs, seed=seed)
  logits = model.apply(params, jnp.asarray(ds.x_train))
  acc = float(jnp.mean(jnp.argmax(logits, -1) == ds.y_train))
  chosen = choose_clients(ds.y_train, sizes, seed)
  data = federated.from_partition(ds.x_train, ds.y_train,
                                  [rows for _, _, rows in chosen])
  every = np.concatenate([rows for _, _, rows in chosen])
  grads = per_example_grads(model, params, ds.x_train[every],
                            ds.y_train[every])   # one compile for all
  clients, gram, exact = {}, {}, {}
  at = 0
  for k, (name, n, _) in enumerate(chosen):
    clients[name, n] = k
    g = grads[at:at + n]
    at += n
    gram[k] = g @ g.T
    exact[k] = exact_stats(gram[k])
  return Setup(model, params, jax.tree.map(jnp.asarray, data), clients, gram,
               exact, acc)


def case_batches(n: int, mu: int = MU) -> list[tuple[int, int]]:
  """``(batch, steps)`` per client size: below ``n`` (a multiple of ``mu``),
  below ``n`` with a short last microbatch, ``n``, above ``n`` (not a
  multiple of ``n``); steps cover about one pass, at least two.

  >>> case_batches(12), case_batches(200)[-1]
  ([(8, 2), (10, 2), (12, 2), (18, 2)], (252, 2))
  """
  lo = max(2 * mu, (min(n, 4 * mu) // mu) * mu)
  if lo >= n:
    lo = 2 * mu
  short = lo + mu // 2 if lo + mu // 2 < n else lo - mu // 2
  above = n + max(n // 4, mu) + 2 if n % mu == 0 else n + n // 4
  out = []
  for b in (lo, short, n, above):
    out.append((b, max(2, -(-n // b))))
  return out


def make_cases(setup: Setup, sizes=SIZES, mu: int = MU) -> list[Case]:
  return [Case(name, n, setup.clients[name, n], b, s)
          for name in PARTITIONS for n in sizes
          for b, s in case_batches(n, mu)]


def client_sizes(b: int, mu: int) -> np.ndarray:
  """Microbatch sizes of a batch of ``b``: full ``mu``s, then the rest."""
  m = -(-b // mu)
  return np.array([min(mu, b - j * mu) for j in range(m)])
