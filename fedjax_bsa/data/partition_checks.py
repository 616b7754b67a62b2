"""Argument checks shared by the partitioners (host-side numpy).

Each raises ``ValueError`` naming the argument, its value and the allowed
range; :mod:`fedjax_bsa.data.partition` (the partitioners and their
statistics) uses them on every call.
"""

from __future__ import annotations

import numpy as np


def as_labels(labels, name: str = "labels") -> np.ndarray:
  arr = np.asarray(labels)
  if arr.ndim != 1 or arr.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array, got shape "
                     f"{list(arr.shape)}")
  if not np.issubdtype(arr.dtype, np.integer) and not (
      np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr))):
    raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
  if name == "labels" and arr.min() < 0:
    raise ValueError(f"labels must be >= 0, got min {arr.min()}")
  return arr.astype(np.int64)


def check_clients(num_clients, num_examples) -> int:
  if int(num_examples) < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  if not 1 <= int(num_clients) <= int(num_examples):
    raise ValueError(f"num_clients must be in [1, num_examples={num_examples}]"
                     f", got {num_clients}")
  return int(num_clients)


def check_min_examples(min_examples, num_clients, num_examples) -> int:
  if int(min_examples) < 0:
    raise ValueError(f"min_examples must be >= 0, got {min_examples}")
  if num_clients * int(min_examples) > num_examples:
    raise ValueError(f"min_examples={min_examples} is too large for "
                     f"num_clients={num_clients}, num_examples={num_examples}"
                     f"; allowed range is [0, {num_examples // num_clients}]")
  return int(min_examples)
