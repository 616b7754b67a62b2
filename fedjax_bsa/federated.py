"""Clients' examples on device, as padded arrays, and on-device sampling."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FederatedData", "from_partition", "client_permutations",
           "example_index"]


class FederatedData(NamedTuple):
  """All clients' training examples, padded to the largest client.

  A pytree of arrays, so it is passed into jitted code (never closed over)
  and can be stacked over experiments or sharded over the client axis.
  """
  x: jax.Array             # float32 [N, n_max, *feature_shape]
  y: jax.Array             # int32 [N, n_max]
  num_examples: jax.Array  # int32 [N], valid rows of each client

  @property
  def num_clients(self) -> int:
    return self.y.shape[0]


def from_partition(x: np.ndarray, y: np.ndarray,
                   parts: Sequence[np.ndarray], n_max: int | None = None
                   ) -> FederatedData:
  """Packs a partition of ``(x, y)`` into padded per-client arrays.

  Args:
    x: ``[n, *feature_shape]`` training inputs (host).
    y: ``[n]`` integer labels (host).
    parts: one index array per client (a partition of ``range(n)``).
    n_max: pad every client to this many rows (default: the largest client);
      lets experiments with different partitions share one shape.

  Returns:
    A :class:`FederatedData` with numpy arrays (move with ``jax.device_put``).
  """
  sizes = np.array([len(p) for p in parts], np.int32)
  if (sizes < 1).any():
    raise ValueError(f"client {int(np.argmin(sizes))} has no examples: every "
                     "client needs at least one")
  n_max = int(sizes.max()) if n_max is None else int(n_max)
  if sizes.max() > n_max:
    raise ValueError(f"n_max={n_max} is too small: a client holds "
                     f"{sizes.max()} examples")
  xs = np.zeros((len(parts), n_max) + x.shape[1:], np.float32)
  ys = np.zeros((len(parts), n_max), np.int32)
  for k, idx in enumerate(parts):
    xs[k, :len(idx)] = x[idx]
    ys[k, :len(idx)] = y[idx]
  return FederatedData(xs, ys, sizes)


def client_permutations(key: jax.Array, client_ids: jax.Array,
                        num_examples: jax.Array, n_max: int) -> jax.Array:
  """A fresh shuffle of each client's valid rows, on device.

  Args:
    key: the round's key; client ``i`` uses ``fold_in(key, i)`` so its
      shuffle does not depend on the cohort's order or size.
    client_ids: int32 ``[K]`` global ids of the cohort.
    num_examples: int32 ``[K]`` valid rows of each cohort client.
    n_max: padded rows per client.

  Returns:
    int32 ``[K, n_max]``: row ``k`` starts with a permutation of
    ``range(num_examples[k])`` (padding rows sort last).
  """
  def one(cid, n):
    u = jax.random.uniform(jax.random.fold_in(key, cid), (n_max,))
    u = jnp.where(jnp.arange(n_max) < n, u, 2.0)
    return jnp.argsort(u).astype(jnp.int32)
  return jax.vmap(one)(client_ids, num_examples)


def example_index(perm: jax.Array, num_examples: jax.Array,
                  position: jax.Array) -> jax.Array:
  """Row used at ``position`` of a client's stream of examples this round.

  The client walks through its shuffled rows and starts over when it runs out
  (so a batch larger than the client repeats rows). Step ``t`` of batch ``b``
  uses positions ``t * b ... t * b + b - 1``.
  """
  return perm[position % jnp.maximum(num_examples, 1)]
