"""Clients' examples stored once, ragged, and shuffled on device by a bijection.

Layout. Every example is stored once, in ``x [T, ...]`` / ``y [T]``; a client
is a run of row ids: client ``k``'s ``i``-th example is
``x[rows[offset[k] + i]]``, ``0 <= i < num_examples[k]``. Memory is the raw
examples plus 4 bytes per (client, row) pair plus ``O(N)``, whatever the
client sizes; the ``rows`` indirection lets several experiments over one
dataset (a sweep over partitions or seeds) share one copy of ``x``
(:func:`merge`).

Shuffles. Each round, client ``k`` walks through its rows in the order of a
keyed bijection ``permute(seed_k, ., n_k)`` of ``range(n_k)`` (position ``p``
reads row ``permute(seed_k, p mod n_k, n_k)``, :func:`example_rows`), so no
per-client sort and no ``n_max``-long arrays are needed: any position is
computed on its own, in ``O(ROUNDS)`` integer operations.

The bijection is the swap-or-not shuffle (Hoang, Morris and Rogaway, "An
enciphering scheme based on a card shuffle", CRYPTO 2012): round ``r`` draws
``K_r`` in ``[0, n)`` and pairs ``x`` with ``K_r - x (mod n)``; a keyed bit of
the pair decides whether both swap. Each round is an involution, so the
composition is a permutation of ``range(n)`` for any ``n`` (no power-of-two
domain, no cycle walking). It mixes far better on small domains than a
Feistel network: a ``ceil(log2 n)``-bit Feistel network keeps the XOR
difference of two inputs that share a half, and with ``n = 5`` (halves of 1
and 2 bits) the pair at positions ``(0, 1)`` was still visibly non-uniform
after 16 rounds even with ideal random round functions, while swap-or-not
passes a chi-square test on all 120 permutations of 5 after 16 rounds
(2,000,000 seeds). We use :data:`ROUNDS` = 24. The noise estimator needs
pairs: ``E|G_b|^2`` is a sum over pairs of a window's rows, so a window of
``b <= n`` positions (distinct rows, wrapping included) behaves as a uniform
``b``-subset when every pair of positions maps to a uniform pair of rows,
which the tests check. The round keys and the swap
bits come from the MurmurHash3 32-bit finalizer (Appleby, 2008) applied to
the seed, a per-round constant (multiples of the golden ratio, 0x9E3779B9)
and the pair.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FederatedData", "ROUNDS", "from_partition", "from_sizes",
           "lognormal_sizes", "merge", "client_rows", "permute",
           "shuffle_seeds", "example_rows"]

ROUNDS = 24
_MAX_ROWS = 2**31 - 1
_GOLDEN = 0x9E3779B9


class FederatedData(NamedTuple):
  """All clients' training examples, each stored once, clients as row runs.

  A pytree of arrays: pass it into jitted code (never close over it). Built
  on the host (numpy) by :func:`from_partition`, :func:`from_sizes` or
  :func:`merge`; move with ``jax.device_put`` or shard with
  :func:`fedjax_bsa.distributed.ragged_client_data`.
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
  rows = np.concatenate([_client_major(d) + base[g]
                         for d, g in zip(datas, group)])
  x = xs[0] if len(xs) == 1 else np.concatenate(xs)
  y = ys[0] if len(ys) == 1 else np.concatenate(ys)
  counts = np.array([d.num_clients for d in datas], np.int64)
  first = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int32)
  return _pack(x, y, rows, sizes), first


def _client_major(d: FederatedData) -> np.ndarray:
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


def _mix(h: jax.Array) -> jax.Array:
  """MurmurHash3's 32-bit finalizer (a bijection of uint32)."""
  h = h ^ (h >> 16)
  h = h * jnp.uint32(0x85EBCA6B)
  h = h ^ (h >> 13)
  h = h * jnp.uint32(0xC2B2AE35)
  return h ^ (h >> 16)


def permute(seed, i, n, inverse: bool = False) -> jax.Array:
  """A keyed bijection of ``range(n)``: the swap-or-not shuffle.

  Elementwise over the broadcast of ``seed``, ``i`` and ``n``; jittable and
  vmappable, static trip count (:data:`ROUNDS` rounds, no loop on data).

  Args:
    seed: uint32 seeds (one permutation per seed and ``n``).
    i: int32 positions, ``0 <= i < n``.
    n: int32 domain sizes, ``1 <= n <= 2**31 - 1``.
    inverse: apply the inverse permutation (``permute(s, permute(s, i, n),
      n, inverse=True) == i``).

  Returns:
    int32, the broadcast shape: the image of ``i``, in ``[0, n)``.

  >>> p = permute(jnp.uint32(7), jnp.arange(6), 6)
  >>> sorted(p.tolist())
  [0, 1, 2, 3, 4, 5]
  >>> permute(jnp.uint32(7), p, 6, inverse=True).tolist()
  [0, 1, 2, 3, 4, 5]
  """
  seed = jnp.asarray(seed).astype(jnp.uint32)
  x = jnp.asarray(i).astype(jnp.uint32)
  n = jnp.asarray(n).astype(jnp.uint32)
  shape = jnp.broadcast_shapes(seed.shape, x.shape, n.shape)
  seed, n = jnp.broadcast_arrays(seed, n)
  # round keys at the shape of (seed, n) only: [K, 1] seeds for [K, mu]
  # positions cost K, not K * mu, key computations
  order = range(ROUNDS - 1, -1, -1) if inverse else range(ROUNDS)
  for r in order:  # each round is an involution: the inverse reverses them
    c_pair = np.uint32((2 * r + 1) * _GOLDEN % 2**32)
    c_bit = np.uint32((2 * r + 2) * _GOLDEN % 2**32)
    k = jax.lax.rem(_mix(seed ^ c_pair), n)
    bit_key = _mix(seed ^ c_bit)
    partner = jnp.where(k >= x, k - x, k + n - x)  # (k - x) mod n, n < 2**31
    swap = _mix(jnp.maximum(x, partner) ^ bit_key) >> 31
    x = jnp.where(swap == 1, partner, x)
  x = jnp.broadcast_to(x, shape)
  return x.astype(jnp.int32)


def shuffle_seeds(key: jax.Array, client_ids) -> jax.Array:
  """Per-client uint32 seeds of one round's shuffles.

  Client ``c``'s seed is drawn from ``fold_in(key, c)``: it depends on the
  round key and the client's id only, not on the cohort's order or size.

  Args:
    key: the round's PRNG key (typed or raw).
    client_ids: int32 global client ids, any shape ``[K, ...]``.

  Returns:
    uint32 seeds, the shape of ``client_ids``.

  >>> s = shuffle_seeds(jax.random.key(0), jnp.array([3, 5]))
  >>> bool(s[1] == shuffle_seeds(jax.random.key(0), jnp.array([5, 9]))[0])
  True
  """
  ids = jnp.asarray(client_ids, jnp.int32)
  bits = jax.vmap(lambda c: jax.random.bits(jax.random.fold_in(key, c), (),
                                            jnp.uint32))(ids.reshape(-1))
  return bits.reshape(ids.shape)


def example_rows(data: FederatedData, client, seed, position) -> jax.Array:
  """Row of ``data.x`` read at stream ``position`` of ``client`` this round.

  ``rows[offset[c] + permute(seed, position mod n_c, n_c)]``: the client
  walks through its shuffled rows and starts over when it runs out, so any
  ``b <= n_c`` consecutive positions are ``b`` distinct rows. Step ``t`` of
  batch ``b`` uses positions ``t * b ... t * b + b - 1``.

  Args:
    data: a :class:`FederatedData` (device or host arrays).
    client: int32 client ids.
    seed: uint32 seeds from :func:`shuffle_seeds` (one per client).
    position: int32 positions ``>= 0``.

  Returns:
    int32 row ids into ``data.x``, the broadcast shape of the arguments.

  >>> x = np.arange(12, dtype=np.float32).reshape(6, 2)
  >>> d = from_partition(x, np.arange(6), [np.array([4, 0]), np.arange(1, 4)])
  >>> s = shuffle_seeds(jax.random.key(0), jnp.array([1]))[0]
  >>> r = example_rows(d, 1, s, jnp.arange(6)).tolist()
  >>> sorted(r[:3]), r[3:] == r[:3]
  ([1, 2, 3], True)
  """
  client = jnp.asarray(client, jnp.int32)
  n = jnp.asarray(data.num_examples)[client]
  off = jnp.asarray(data.offset)[client]
  pos = jnp.asarray(position, jnp.int32) % n
  return jnp.asarray(data.rows)[off + permute(seed, pos, n)]
