"""Splitting a training set among simulated clients (host-side numpy).

Every partitioner returns ``list[np.ndarray]``: one sorted int64 array of
training-example indices per client, such that every example lands in exactly
one client. Randomness comes only from ``np.random.default_rng(seed)``, so the
same arguments always give the same partition. Bad arguments raise
``ValueError`` naming the argument, its value and the allowed range (the
checks are in :mod:`fedjax_bsa.data.partition_checks`). The settings name
them (``partition=...``) through :data:`fedjax_bsa.core.registry.PARTITIONS`,
where :mod:`fedjax_bsa.setup.experiment` registers each.
"""

from __future__ import annotations

import math

import numpy as np

from fedjax_bsa.data.partition_checks import as_labels
from fedjax_bsa.data.partition_checks import check_clients
from fedjax_bsa.data.partition_checks import check_min_examples

QUANTITY_METHODS = ("dirichlet", "lognormal")


def _finish(parts) -> list[np.ndarray]:
  return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(num_examples: int, num_clients: int, seed: int) -> list[np.ndarray]:
  """Uniformly random split into near-equal client shards.

  Args:
    num_examples: Number of training examples ``n`` >= 1.
    num_clients: Number of clients in ``[1, n]``.
    seed: RNG seed.

  Returns:
    ``num_clients`` int64 index arrays whose sizes differ by at most one.
  """
  k = check_clients(num_clients, num_examples)
  perm = np.random.default_rng(seed).permutation(int(num_examples))
  return _finish(np.array_split(perm, k))


def dirichlet(labels, num_clients: int, alpha: float, seed: int,
              min_examples: int = 10,
              max_tries: int = 1000) -> list[np.ndarray]:
  """Label-skewed split with Dirichlet proportions (NIID-Bench protocol).

  Li et al., "Federated Learning on Non-IID Data Silos: An Experimental
  Study" (ICDE 2022): for each class in turn, its shuffled examples are split
  among clients with proportions ``p ~ Dir(alpha)``; a client already holding
  more than ``n / num_clients`` examples gets proportion 0 for further classes
  (balancing). The whole draw is repeated until every client holds at least
  ``min_examples``. Small ``alpha`` gives few labels per client; large
  ``alpha`` approaches IID.

  Args:
    labels: int ``[n]`` training labels.
    num_clients: Number of clients in ``[1, n]``.
    alpha: Dirichlet concentration, > 0.
    seed: RNG seed.
    min_examples: Fewest examples any client may hold, with
      ``num_clients * min_examples <= n``.
    max_tries: Redraws allowed before giving up, >= 1.

  Returns:
    ``num_clients`` int64 index arrays.

  Raises:
    ValueError: On bad arguments, or if no draw within ``max_tries`` gives
      every client ``min_examples``.
  """
  y = as_labels(labels)
  n = y.size
  k = check_clients(num_clients, n)
  if not alpha > 0 or not math.isfinite(alpha):
    raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
  min_examples = check_min_examples(min_examples, k, n)
  if int(max_tries) < 1:
    raise ValueError(f"max_tries must be >= 1, got {max_tries}")
  rng = np.random.default_rng(seed)
  classes = [np.flatnonzero(y == c) for c in np.unique(y)]
  for _ in range(int(max_tries)):
    parts = [[] for _ in range(k)]
    sizes = np.zeros(k, np.int64)
    for idx in classes:
      idx = idx[rng.permutation(idx.size)]
      p = rng.dirichlet(np.full(k, float(alpha)))
      eligible = sizes < n / k
      p = np.where(eligible, p, 0.0)
      total = p.sum()
      if not (total > 0 and np.isfinite(total)):  # Underflow at tiny alpha.
        p = eligible.astype(np.float64)
        total = p.sum()
      cuts = (np.cumsum(p / total) * idx.size).astype(np.int64)[:-1]
      for j, chunk in enumerate(np.split(idx, cuts)):
        parts[j].append(chunk)
        sizes[j] += chunk.size
    if sizes.min() >= min_examples:
      return _finish([np.concatenate(p) for p in parts])
  raise ValueError(
      f"dirichlet partition failed: no draw in max_tries={max_tries} gave "
      f"every one of num_clients={k} clients min_examples={min_examples} "
      f"examples with alpha={alpha}; raise alpha or lower min_examples")


def _apportion_shards(counts: np.ndarray, total: int) -> np.ndarray:
  """Gives each label >= 1 shard, then the rest by largest examples/shard."""
  alloc = np.ones(counts.size, np.int64)
  for _ in range(total - counts.size):
    per_shard = np.where(alloc < counts, counts / alloc, -1.0)
    alloc[int(np.argmax(per_shard))] += 1
  return alloc


def shards(labels, num_clients: int, seed: int,
           shards_per_client: int = 2) -> list[np.ndarray]:
  """Pathological non-IID split of McMahan et al. (2017), label-aligned.

  The examples are grouped by label and cut into
  ``S = num_clients * shards_per_client`` shards; each client receives
  ``shards_per_client`` random shards. Unlike McMahan's contiguous cuts, when
  ``S >= number of distinct labels`` (the usual case) every shard is
  label-pure: label ``l`` with ``c_l`` examples gets ``s_l >= 1`` shards
  (assigned one at a time to the label with the most examples per shard, so
  shard sizes stay as even as possible) and its shuffled examples are cut into
  ``s_l`` near-equal pieces. Each client then holds at most
  ``shards_per_client`` labels. When ``S`` is smaller than the number of
  labels, shards cannot be pure and are cut contiguously in label-sorted order
  as in McMahan et al. Every example is assigned (no remainder is dropped).

  Args:
    labels: int ``[n]`` training labels.
    num_clients: Number of clients, >= 1.
    seed: RNG seed.
    shards_per_client: Shards per client, >= 1, with ``S <= n``.

  Returns:
    ``num_clients`` int64 index arrays.
  """
  y = as_labels(labels)
  n = y.size
  k = check_clients(num_clients, n)
  if int(shards_per_client) < 1:
    raise ValueError(f"shards_per_client must be >= 1, got {shards_per_client}")
  total = k * int(shards_per_client)
  if total > n:
    raise ValueError(f"shards_per_client={shards_per_client} is too large "
                     f"for num_clients={k}, num_examples={n}; allowed range "
                     f"is [1, {n // k}]")
  rng = np.random.default_rng(seed)
  uniq, counts = np.unique(y, return_counts=True)
  if total >= uniq.size:
    alloc = _apportion_shards(counts, total)
    pieces = []
    for label, s in zip(uniq, alloc):
      idx = np.flatnonzero(y == label)
      pieces.extend(np.array_split(idx[rng.permutation(idx.size)], s))
  else:
    order = np.argsort(y + rng.random(n) * 0.5, kind="stable")
    pieces = np.array_split(order, total)
  order = rng.permutation(total).reshape(k, int(shards_per_client))
  return _finish([np.concatenate([pieces[s] for s in row]) for row in order])


def quantity(num_examples: int, num_clients: int, seed: int,
             method: str = "dirichlet", alpha: float = 0.5,
             sigma: float = 1.0, min_examples: int = 10) -> list[np.ndarray]:
  """Quantity-skewed split: unequal client sizes, labels IID within them.

  Client weights are ``w ~ Dir(alpha)`` (``method="dirichlet"``, as in
  NIID-Bench) or ``w ~ lognormal(0, sigma)`` (``method="lognormal"``). Each
  client first gets ``min_examples``; the other ``n - K * min_examples``
  examples are apportioned in proportion to ``w`` (largest remainder, so the
  sizes sum to ``n`` exactly). This guarantees the minimum without
  redrawing. Examples are assigned by a uniform random permutation.

  Args:
    num_examples: Number of training examples ``n`` >= 1.
    num_clients: Number of clients in ``[1, n]``.
    seed: RNG seed.
    method: ``"dirichlet"`` or ``"lognormal"``.
    alpha: Dirichlet concentration (> 0) for ``method="dirichlet"``.
    sigma: Lognormal sigma (>= 0) for ``method="lognormal"``.
    min_examples: Fewest examples per client, ``K * min_examples <= n``.

  Returns:
    ``num_clients`` int64 index arrays.
  """
  n = int(num_examples)
  k = check_clients(num_clients, n)
  min_examples = check_min_examples(min_examples, k, n)
  rng = np.random.default_rng(seed)
  if method == "dirichlet":
    if not alpha > 0 or not math.isfinite(alpha):
      raise ValueError(f"alpha must be a finite number > 0, got {alpha}")
    w = rng.dirichlet(np.full(k, float(alpha)))
  elif method == "lognormal":
    if not sigma >= 0 or not math.isfinite(sigma):
      raise ValueError(f"sigma must be a finite number >= 0, got {sigma}")
    w = rng.lognormal(0.0, float(sigma), k)
  else:
    raise ValueError(f"method must be in {QUANTITY_METHODS}, got {method!r}")
  if not (w.sum() > 0 and np.all(np.isfinite(w))):
    w = np.ones(k)
  rest = n - k * min_examples
  exact = rest * w / w.sum()
  extra = np.floor(exact).astype(np.int64)
  short = rest - int(extra.sum())
  extra[np.argsort(-(exact - extra), kind="stable")[:short]] += 1
  sizes = min_examples + extra
  return _finish(np.split(rng.permutation(n), np.cumsum(sizes)[:-1]))


def natural(client_ids) -> list[np.ndarray]:
  """Groups examples by their natural owner.

  Args:
    client_ids: int ``[n]`` owner of each training example.

  Returns:
    One int64 index array per distinct id, in increasing id order.
  """
  ids = as_labels(client_ids, "client_ids")
  order = np.argsort(ids, kind="stable")
  _, starts = np.unique(ids[order], return_index=True)
  return _finish(np.split(order, starts[1:]))


def _norm_entropy(hist: np.ndarray, num_classes: int) -> np.ndarray:
  """Entropy of each row's distribution divided by log(num_classes)."""
  hist = np.atleast_2d(hist).astype(np.float64)
  tot = hist.sum(axis=1, keepdims=True)
  p = np.divide(hist, tot, out=np.zeros_like(hist), where=tot > 0)
  ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), 1)
  ent = np.maximum(ent, 0.0)  # No -0.0 from rounding.
  return ent / math.log(num_classes) if num_classes > 1 else ent * 0.0


def summarize(parts, labels, num_classes: int) -> dict:
  """Statistics of a partition.

  Args:
    parts: One index array per client.
    labels: int ``[n]`` training labels.
    num_classes: Number of classes ``C`` (labels must be below it).

  Returns:
    A JSON-serializable dict with ``num_clients``, ``num_examples``,
    ``num_classes``, ``sizes`` (list), ``size_min``, ``size_median``,
    ``size_max``, ``size_mean``, ``size_cv`` (std / mean),
    ``label_histograms`` (``[num_clients][C]`` counts),
    ``labels_per_client_mean`` (labels present, averaged),
    ``mean_label_entropy`` (each client's label entropy divided by
    ``log C``, averaged over clients; empty clients count as 0) and
    ``global_label_entropy`` (same normalization, all assigned examples).
  """
  y = as_labels(labels)
  if int(num_classes) < 1 or y.max() >= int(num_classes):
    raise ValueError(f"num_classes must be > max label {y.max()}, got "
                     f"{num_classes}")
  if not parts:
    raise ValueError("parts must hold at least one client, got 0")
  c = int(num_classes)
  hist = np.stack([np.bincount(y[np.asarray(p, np.int64)], minlength=c)
                   for p in parts])
  sizes = hist.sum(axis=1)
  mean = float(sizes.mean())
  return {
      "num_clients": len(parts), "num_examples": int(sizes.sum()),
      "num_classes": c, "sizes": sizes.tolist(),
      "size_min": int(sizes.min()), "size_median": float(np.median(sizes)),
      "size_max": int(sizes.max()), "size_mean": mean,
      "size_cv": float(sizes.std() / mean) if mean > 0 else 0.0,
      "label_histograms": hist.tolist(),
      "labels_per_client_mean": float((hist > 0).sum(1).mean()),
      "mean_label_entropy": float(_norm_entropy(hist, c).mean()),
      "global_label_entropy": float(_norm_entropy(hist.sum(0), c)[0]),
  }


def format_summary(summary: dict, max_rows: int = 10) -> str:
  """Renders :func:`summarize` output as a short text table.

  Args:
    summary: The dict returned by :func:`summarize`.
    max_rows: Most client rows to show (the rest are counted).

  Returns:
    Multi-line human-readable text (no trailing newline).
  """
  s, c = summary, summary["num_classes"]
  lines = [
      f"clients {s['num_clients']} | examples {s['num_examples']} | "
      f"classes {c}",
      f"client sizes: min {s['size_min']}  median {s['size_median']:g}  mean "
      f"{s['size_mean']:.1f}  max {s['size_max']}  (cv {s['size_cv']:.2f})",
      f"label entropy / log(C): per-client mean {s['mean_label_entropy']:.3f}"
      f", global {s['global_label_entropy']:.3f}; labels per client "
      f"{s['labels_per_client_mean']:.1f}",
      f"{'client':>6} {'size':>7} {'labels':>6} {'top share':>9} entropy",
  ]
  hist = np.asarray(s["label_histograms"], np.int64).reshape(-1, c)
  ent = _norm_entropy(hist, c)
  for i in range(min(len(hist), max_rows)):
    size = int(hist[i].sum())
    top = hist[i].max() / size if size else 0.0
    lines.append(f"{i:>6} {size:>7} {int((hist[i] > 0).sum()):>6} "
                 f"{top:>9.2f} {ent[i]:>7.3f}")
  if len(hist) > max_rows:
    lines.append(f"  ... {len(hist) - max_rows} more clients")
  return "\n".join(lines)
