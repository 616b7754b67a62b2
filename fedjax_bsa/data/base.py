"""The in-memory dataset every loader returns."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Dataset"]


class Dataset(NamedTuple):
  """An in-memory classification dataset.

  Attributes:
    name: Human-readable dataset name.
    x_train: float32 ``[n_train, *feature_shape]`` training features (int32
      token ids for character data such as LEAF Shakespeare).
    y_train: int32 ``[n_train]`` training labels in ``[0, num_classes)``.
    x_test: float32 ``[n_test, *feature_shape]`` test features.
    y_test: int32 ``[n_test]`` test labels.
    num_classes: Number of classes.
    client_ids: int32 ``[n_train]`` natural owner of each training example
      (dense ids ``0..K-1``), or ``None`` when the data has no natural clients.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  client_ids: np.ndarray | None

