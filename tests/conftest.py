"""Shared fixtures: small data and models, compiled once per session.

XLA compiles are most of the suite's time, and many tests build the same
program (runs differing only in traced settings, the same run in a test
and in its subprocesses, the two xdist workers). The session therefore
shares one persistent compilation cache: a fresh folder made by the
controlling pytest process (inherited by the xdist workers and by every
subprocess a test starts) and removed at its exit. A program is still
traced by each run (the tests' compile counts count traces), only XLA's
compile of an identical program is skipped. Set
``JAX_COMPILATION_CACHE_DIR`` yourself to keep a cache between sessions.
Runs choose their kernel layout by the rule, not by timing
(``FEDJAX_BSA_LAYOUT=rule``, see :mod:`fedjax_bsa.run.autotune`).
"""

import atexit
import os
import shutil
import tempfile

if "PYTEST_XDIST_WORKER" not in os.environ and not os.environ.get(
    "JAX_COMPILATION_CACHE_DIR"):
  _CACHE_DIR = tempfile.mkdtemp(prefix="fedjax_bsa_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE_DIR
  atexit.register(shutil.rmtree, _CACHE_DIR, ignore_errors=True)
# every program is cached, however quick its compile
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# runs use the layout rule, so that no test's numbers depend on timing (the
# measured layout has its own tests, with their own cache folder)
os.environ["FEDJAX_BSA_LAYOUT"] = "rule"

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.data import datasets
from fedjax_bsa.data import federated
from fedjax_bsa.setup import models


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


FINISHED_RUN_ARGS = ["run", "--no-progress", "--set", "rounds=40",
                     "--set", "num_clients=30", "--set",
                     "clients_per_round=6", "--set", "hidden=32"]


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
  """``(exit code, folder)`` of one finished default run from the command
  line (40 rounds, 30 clients), shared by the tests that read a run's
  files; treat the folder as read-only."""
  from fedjax_bsa import cli  # pylint: disable=g-import-not-at-top
  out = tmp_path_factory.mktemp("finished_run") / "run"
  code = cli.main(FINISHED_RUN_ARGS + ["--out", str(out)])
  return code, out
