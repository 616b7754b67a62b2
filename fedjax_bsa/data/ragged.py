"""Clients' examples stored once, ragged: the layout and its host builders.

Every example is stored once, in ``x [T, ...]`` / ``y [T]``; a client is a
run of row ids: client ``k``'s ``i``-th example is
``x[rows[offset[k] + i]]``, ``0 <= i < num_examples[k]``. Memory is the raw
examples plus 4 bytes per (client, row) pair plus ``O(N)``, whatever the
client sizes; the ``rows`` indirection lets several experiments over one
dataset (a sweep over partitions or seeds) share one copy of ``x``
(:func:`merge`).

This module holds :class:`FederatedData` and its host-side (numpy) builders
(:func:`from_partition`, :func:`from_sizes`, :func:`lognormal_sizes`,
:func:`merge`, :func:`client_rows`); the on-device shuffle that reads a
client's rows is in :mod:`fedjax_bsa.data.federated`, which re-exports
everything here.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np

__all__ = ["FederatedData", "from_partition", "from_sizes",
           "lognormal_sizes", "merge", "client_rows"]

_MAX_ROWS = 2**31 - 1


class FederatedData(NamedTuple):
  """All clients' training examples, each stored once, clients as row runs.

  A pytree of arrays: pass it into jitted code (never close over it). Built
  on the host (numpy) by :func:`from_partition`, :func:`from_sizes` or
  :func:`merge`; move with ``jax.device_put`` or shard with
  :func:`fedjax_bsa.run.distributed.ragged_client_data`.
  """
  x: jax.Array             # float32 [T, *feature_shape], every example once
  y: jax.Array             # int32 [T]
  rows: jax.Array          # int32 [R], client-major row ids into x / y
  offset: jax.Array        # int32 [N], client k's rows start at rows[offset[k]]
  num_examples: jax.Array  # int32 [N], >= 1; rows[offset[k]:offset[k] + n_k]

  @property
  def num_clients(self) -> int:
    return self.num_examples.shape[0]


def _check_sizes(sizes: np.ndarray, what: str) -> None:
  if sizes.ndim != 1 or sizes.size == 0:
    raise ValueError(f"{what} must give at least one client, got shape "
                     f"{sizes.shape}")
  empty = np.flatnonzero(sizes < 1)
  if empty.size:
    k = int(empty[0])
    raise ValueError(f"client {k} has {int(sizes[k])} examples ({what}[{k}]"
                     f"): every client needs at least one")
  if sizes.sum() > _MAX_ROWS:
    raise ValueError(f"{what} sum to {int(sizes.sum())} rows: at most "
                     f"{_MAX_ROWS} (int32 row ids)")


def _features(x, y) -> tuple[np.ndarray, np.ndarray]:
  x = np.asarray(x, np.float32)  # no copy when already float32
  y = np.asarray(y)
  if x.ndim < 1 or y.shape != x.shape[:1]:
    raise ValueError(f"x and y must have one row per example: x.shape="
                     f"{x.shape}, y.shape={y.shape}")
  if len(x) > _MAX_ROWS:
    raise ValueError(f"x has {len(x)} rows: at most {_MAX_ROWS}")
  return x, y.astype(np.int32, copy=False)


def _pack(x, y, rows: np.ndarray, sizes: np.ndarray) -> FederatedData:
  offset = np.zeros(len(sizes), np.int64)
  np.cumsum(sizes[:-1], out=offset[1:])
  return FederatedData(x, y, rows.astype(np.int32, copy=False),
                       offset.astype(np.int32), sizes.astype(np.int32))


def from_partition(x, y, parts: Sequence[np.ndarray]) -> FederatedData:
  """Clients' examples as row runs into one copy of ``(x, y)``.

  Args:
    x: ``[T, *feature_shape]`` inputs (host; kept as is when float32).
    y: ``[T]`` integer labels.
    parts: one integer index array per client, each non-empty, with values
      in ``[0, T)`` (clients may share rows).

  Returns:
    A host (numpy) :class:`FederatedData` with ``R = sum(len(p))`` rows.

  Raises:
    ValueError: a client is empty or an index is out of range.

  >>> x = np.arange(12, dtype=np.float32).reshape(6, 2)
  >>> d = from_partition(x, np.arange(6), [np.array([4, 0]), np.arange(1, 4)])
  >>> d.rows.tolist(), d.offset.tolist(), d.num_examples.tolist()
  ([4, 0, 1, 2, 3], [0, 2], [2, 3])
  >>> client_rows(d, 1).tolist()
  [1, 2, 3]
  """
  x, y = _features(x, y)
  sizes = np.fromiter((len(p) for p in parts), np.int64, count=len(parts))
  _check_sizes(sizes, "parts")
  rows = np.concatenate([np.asarray(p).reshape(-1) for p in parts])
  if not np.issubdtype(rows.dtype, np.integer):
    raise ValueError(f"parts must hold integer row indices, got dtype "
                     f"{rows.dtype}")
  bad = np.flatnonzero((rows < 0) | (rows >= len(x)))
  if bad.size:
    k = int(np.searchsorted(np.cumsum(sizes), bad[0], side="right"))
    raise ValueError(f"client {k} has row index {int(rows[bad[0]])}: must "
                     f"be in [0, {len(x) - 1}]")
  return _pack(x, y, rows, sizes)


def lognormal_sizes(num_examples: int, num_clients: int, sigma: float,
                    seed: int | np.random.Generator, min_examples: int = 1
                    ) -> np.ndarray:
  """Quantity-skewed client sizes: ``min_examples`` each, the rest shared in
  proportion to ``w ~ lognormal(0, sigma)`` (largest remainder, summing to
  ``num_examples``): the rule of ``partition.quantity(method="lognormal")``,
  with the same draws for the same seed.

  Args:
    num_examples: examples to share, ``>= num_clients * min_examples``.
    num_clients: clients ``N >= 1``.
    sigma: lognormal sigma, ``>= 0``.
    seed: an int or a ``np.random.Generator`` (advanced by ``N`` draws).
    min_examples: fewest examples per client, ``>= 1``.

  Returns:
    int64 ``[N]`` sizes summing to ``num_examples``.

  >>> lognormal_sizes(100, 4, 2.0, seed=0).tolist()
  [19, 12, 51, 18]
  """
  n, k, m = int(num_examples), int(num_clients), int(min_examples)
  if k < 1 or m < 1 or k * m > n:
    raise ValueError(f"num_clients={k}, min_examples={m} are not allowed "
                     f"with num_examples={n}: need num_clients >= 1, "
                     f"min_examples >= 1 and num_clients * min_examples <= "
                     f"num_examples")
  if not sigma >= 0 or not np.isfinite(sigma):
    raise ValueError(f"sigma={sigma} is not allowed: a finite number >= 0")
  rng = np.random.default_rng(seed)
  w = rng.lognormal(0.0, float(sigma), k)
  if not (w.sum() > 0 and np.all(np.isfinite(w))):
    w = np.ones(k)
  rest = n - k * m
  exact = rest * w / w.sum()
  extra = np.floor(exact).astype(np.int64)
  short = rest - int(extra.sum())
  extra[np.argsort(-(exact - extra), kind="stable")[:short]] += 1
  return m + extra


def from_sizes(x, y, sizes, seed: int | np.random.Generator,
               reuse: bool = False) -> FederatedData:
  """Deals randomly permuted rows of ``(x, y)`` to clients of given sizes.

  Vectorised (no loop over clients): 100,000 clients take a fraction of a
  second. With the generator that drew the sizes it reproduces
  ``partition.quantity``: ``rng = np.random.default_rng(s)``,
  ``from_sizes(x, y, lognormal_sizes(T, N, sigma, rng), rng)`` equals
  ``from_partition(x, y, quantity(T, N, s, "lognormal", sigma=sigma,
  min_examples=1))``.

  Args:
    x: ``[T, *feature_shape]`` inputs (host).
    y: ``[T]`` labels.
    sizes: int ``[N]``, each ``>= 1``.
    seed: an int or a ``np.random.Generator``.
    reuse: allow ``sum(sizes) > T``: the rows are dealt from as many fresh
      permutations as needed, so a row may belong to several clients (and,
      rarely, twice to a client that straddles two permutations).

  Returns:
    A host :class:`FederatedData`, each client's rows in increasing order;
    clients are disjoint when ``sum(sizes) <= T``.

  >>> x = np.zeros((10, 3), np.float32)
  >>> d = from_sizes(x, np.zeros(10, np.int32), [3, 1, 6], seed=0)
  >>> d.offset.tolist(), sorted(d.rows.tolist()) == list(range(10))
  ([0, 3, 4], True)
  """
  x, y = _features(x, y)
  sizes = np.asarray(sizes)
  if not np.issubdtype(sizes.dtype, np.integer):
    raise ValueError(f"sizes must be integers, got dtype {sizes.dtype}")
  _check_sizes(sizes, "sizes")
  total, t = int(sizes.sum()), len(x)
  if total > t and not reuse:
    raise ValueError(f"sizes sum to {total} rows but x has {t}: at most "
                     f"{t} without reuse=True")
  if t == 0:
    raise ValueError("x has no rows")
  rng = np.random.default_rng(seed)
  rows = np.concatenate([rng.permutation(t) for _ in range(-(-total // t))])
  sizes = sizes.astype(np.int64)
  # each client's rows in increasing order, as the partitioners give them
  key = np.repeat(np.arange(len(sizes), dtype=np.int64) * t, sizes)
  key += rows[:total]
  key.sort()
  return _pack(x, y, key % t, sizes)


def _same(a: np.ndarray, b: np.ndarray) -> bool:
  return a is b or (a.shape == b.shape and a.dtype == b.dtype
                    and np.array_equal(a, b))


def merge(datas: Sequence[FederatedData]) -> tuple[FederatedData, np.ndarray]:
  """Several experiments' data as one, with one copy of each distinct dataset.

  Experiments whose ``(x, y)`` are equal share them: equality is by content
  (``np.array_equal``, with identity as the fast path), so datasets loaded
  twice are still stored once; comparing costs one pass over the data per
  pair of distinct arrays, on the host. Other datasets are concatenated.

  Args:
    datas: ``E >= 1`` host :class:`FederatedData`.

  Returns:
    ``(merged, first_client)``: experiment ``e``'s client ``k`` is the merged
    client ``first_client[e] + k`` (int32 ``[E]``), with the same examples.

  >>> x = np.arange(8, dtype=np.float32).reshape(4, 2)
  >>> a = from_partition(x, np.arange(4), [np.array([0, 1]), np.array([2])])
  >>> b = from_partition(x.copy(), np.arange(4), [np.array([3, 2, 1, 0])])
  >>> m, first = merge([a, b])
  >>> m.x.shape, first.tolist(), client_rows(m, first[1]).tolist()
  ((4, 2), [0, 2], [3, 2, 1, 0])
  """
  if not datas:
    raise ValueError("datas is empty: merge needs at least one experiment")
  datas = [FederatedData(*(np.asarray(a) for a in d)) for d in datas]
  xs, ys, base, group = [], [], [0], []
  for e, d in enumerate(datas):
    if d.x.shape[1:] != datas[0].x.shape[1:]:
      raise ValueError(f"experiment {e} has examples of shape "
                       f"{d.x.shape[1:]}, experiment 0 {datas[0].x.shape[1:]}"
                       ": merged experiments need one feature shape")
    g = next((j for j in range(len(xs))
              if _same(xs[j], d.x) and _same(ys[j], d.y)), None)
    if g is None:
      g = len(xs)
      xs.append(d.x)
      ys.append(d.y)
      base.append(base[-1] + len(d.x))
    group.append(g)
  if base[-1] > _MAX_ROWS:
    raise ValueError(f"the merged datasets have {base[-1]} rows: at most "
                     f"{_MAX_ROWS}")
  sizes = np.concatenate([d.num_examples.astype(np.int64) for d in datas])
  _check_sizes(sizes, "num_examples")
  rows = np.concatenate([client_major(d) + base[g]
                         for d, g in zip(datas, group)])
  x = xs[0] if len(xs) == 1 else np.concatenate(xs)
  y = ys[0] if len(ys) == 1 else np.concatenate(ys)
  counts = np.array([d.num_clients for d in datas], np.int64)
  first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  return _pack(x, y, rows, sizes), first


def client_major(d: FederatedData) -> np.ndarray:
  """``d``'s rows in client order (``rows`` itself when already packed)."""
  n = d.num_examples.astype(np.int64)
  packed = np.concatenate([[0], np.cumsum(n)[:-1]])
  if np.array_equal(d.offset, packed) and len(d.rows) == n.sum():
    return d.rows.astype(np.int64)
  start = np.repeat(d.offset.astype(np.int64) - packed, n)
  return d.rows.astype(np.int64)[start + np.arange(n.sum())]


def client_rows(data: FederatedData, k: int) -> np.ndarray:
  """Row ids of client ``k`` (host), in stored order: int32 ``[n_k]``."""
  o, n = int(data.offset[k]), int(data.num_examples[k])
  return np.asarray(data.rows[o:o + n])
