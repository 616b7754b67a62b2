"""Shared fixtures: small data and models, compiled once per session."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa import models
from fedjax_bsa.data import datasets
from fedjax_bsa.data import federated

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


@pytest.fixture(scope="session")
def digits():
  return datasets.digits()


@pytest.fixture(scope="session")
def small_fed(digits):
  """20 clients of 5..40 digits examples each, on device (ragged)."""
  rng = np.random.default_rng(0)
  sizes = rng.integers(5, 41, size=20)
  idx = rng.permutation(len(digits.y_train))
  parts, at = [], 0
  for s in sizes:
    parts.append(idx[at:at + s])
    at += s
  data = federated.from_partition(digits.x_train, digits.y_train, parts)
  return jax.tree.map(jnp.asarray, data)


@pytest.fixture(scope="session")
def small_mlp():
  return models.make_model("mlp", (64,), 10, hidden=16)
