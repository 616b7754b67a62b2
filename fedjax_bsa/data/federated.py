"""Clients' examples stored once, ragged, and shuffled on device by a bijection.

Layout. Every example is stored once and a client is a run of row ids into
it (:class:`FederatedData`). The layout and its host-side builders
(:func:`from_partition`, :func:`from_sizes`, :func:`lognormal_sizes`,
:func:`merge`, :func:`client_rows`) are in :mod:`fedjax_bsa.data.ragged`,
which describes them, and are re-exported here; this module holds the
shuffle.

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

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa.data.ragged import client_rows
from fedjax_bsa.data.ragged import FederatedData
from fedjax_bsa.data.ragged import from_partition
from fedjax_bsa.data.ragged import from_sizes
from fedjax_bsa.data.ragged import lognormal_sizes
from fedjax_bsa.data.ragged import merge

__all__ = ["FederatedData", "ROUNDS", "from_partition", "from_sizes",
           "lognormal_sizes", "merge", "client_rows", "permute",
           "shuffle_seeds", "example_rows"]

ROUNDS = 24
_GOLDEN = 0x9E3779B9


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
