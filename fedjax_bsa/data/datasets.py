"""Built-in datasets for the simulator (host-side numpy, never downloads).

Every loader returns a :class:`Dataset`: float32 features, int32 labels and,
where the data has a natural notion of clients, the owner of each training
example. Nothing in this module touches the network: ``digits`` ships with
scikit-learn, ``mnist1d`` is *generated* with the ``mnist1d`` package's
procedural generator, and ``synthetic`` is the Synthetic(alpha, beta) generator
of FedProx. File formats (LEAF, CIFAR-10, npz) live in
:mod:`fedjax_bsa.data.loaders`. The settings name them (``dataset=...``)
through :data:`fedjax_bsa.core.registry.DATASETS`, where
:mod:`fedjax_bsa.setup.experiment` registers each.
"""

from __future__ import annotations

import random
from typing import NamedTuple

import numpy as np

from fedjax_bsa.data.base import Dataset


class SyntheticParams(NamedTuple):
  """Per-client parameters of the Synthetic(alpha, beta) generator.

  Attributes:
    u: float64 ``[K]`` client model-mean offsets, ``u_k ~ N(0, alpha^2)``.
    B: float64 ``[K]`` client feature-mean offsets, ``B_k ~ N(0, beta^2)``.
    W: float64 ``[K, C, d]`` client weights, ``W_k ~ N(u_k, 1)``.
    b: float64 ``[K, C]`` client biases, ``b_k ~ N(u_k, 1)``.
    v: float64 ``[K, d]`` client feature means, ``v_k ~ N(B_k, 1)``.
    sigma_diag: float64 ``[d]`` diagonal of the feature covariance,
      ``Sigma_jj = j^-1.2`` for ``j = 1..d``.
    sizes: int64 ``[K]`` total examples per client (train + test).
  """
  u: np.ndarray
  B: np.ndarray
  W: np.ndarray
  b: np.ndarray
  v: np.ndarray
  sigma_diag: np.ndarray
  sizes: np.ndarray


def digits(seed: int = 0) -> Dataset:
  """Loads scikit-learn's bundled 8x8 digits (1797 images, offline).

  Args:
    seed: Unused; the train/test split is fixed (stratified, 20% test,
      ``random_state=0``) so results are comparable across seeds.

  Returns:
    A :class:`Dataset` with features float32 ``[n, 64]`` in ``[0, 1]``
    (pixel / 16), 10 classes and ``client_ids=None``.
  """
  del seed
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split
  bunch = load_digits()
  x = (bunch.data / 16.0).astype(np.float32)
  y = bunch.target.astype(np.int32)
  x_tr, x_te, y_tr, y_te = train_test_split(
      x, y, test_size=0.2, random_state=0, stratify=y)
  return Dataset("digits", np.ascontiguousarray(x_tr), y_tr.astype(np.int32),
                 np.ascontiguousarray(x_te), y_te.astype(np.int32), 10, None)


def mnist1d(num_examples: int = 4000, seed: int = 0) -> Dataset:
  """Generates MNIST-1D with the ``mnist1d`` package's offline generator.

  Uses ``mnist1d.data.make_dataset`` (pure generation; the package's
  ``get_dataset``, which may download, is never called). The generator seeds
  numpy's and Python's *global* RNGs; their states are saved and restored, so
  calling this has no side effect on global randomness.

  Args:
    num_examples: Total examples (train + test). The generator makes
      ``num_examples // 10`` per class, so the total is rounded down to a
      multiple of 10. Must be >= 10.
    seed: Generator seed; the same seed gives identical data.

  Returns:
    A :class:`Dataset` with float32 ``[n, 40]`` features standardized
    per feature with the training mean/std, 10 classes, the generator's own
    80/20 train/test split and ``client_ids=None``.

  Raises:
    ValueError: If ``num_examples < 10``.
  """
  if int(num_examples) < 10:
    raise ValueError(f"num_examples must be >= 10, got {num_examples}")
  from mnist1d.data import get_dataset_args, make_dataset
  args = get_dataset_args()
  args.num_samples = int(num_examples)
  args.seed = int(seed)
  np_state, py_state = np.random.get_state(), random.getstate()
  try:
    raw = make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)
  x_tr = np.asarray(raw["x"], np.float64)
  x_te = np.asarray(raw["x_test"], np.float64)
  mean = x_tr.mean(axis=0)
  std = np.maximum(x_tr.std(axis=0), 1e-8)
  return Dataset("mnist1d", ((x_tr - mean) / std).astype(np.float32),
                 np.asarray(raw["y"], np.int32),
                 ((x_te - mean) / std).astype(np.float32),
                 np.asarray(raw["y_test"], np.int32), 10, None)


def _check_synthetic_args(alpha, beta, num_clients, num_features, num_classes,
                          max_client_examples):
  if not alpha >= 0:
    raise ValueError(f"alpha must be >= 0, got {alpha}")
  if not beta >= 0:
    raise ValueError(f"beta must be >= 0, got {beta}")
  if int(num_clients) < 1:
    raise ValueError(f"num_clients must be >= 1, got {num_clients}")
  if int(num_features) < 1:
    raise ValueError(f"num_features must be >= 1, got {num_features}")
  if int(num_classes) < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}")
  if int(max_client_examples) < 50:
    raise ValueError(
        f"max_client_examples must be >= 50, got {max_client_examples}")


def synthetic_params(alpha: float, beta: float, num_clients: int, *,
                     num_features: int = 60, num_classes: int = 10,
                     seed: int = 0, iid: bool = False,
                     max_client_examples: int = 1000) -> SyntheticParams:
  """Draws the per-client parameters of Synthetic(alpha, beta).

  Follows Li et al., "Federated Optimization in Heterogeneous Networks"
  (FedProx, MLSys 2020) and its released generator. As in that generator,
  ``alpha`` and ``beta`` are the *standard deviations* of ``u_k`` and ``B_k``
  (the paper writes ``N(0, alpha)``; the two agree for the common
  Synthetic(1, 1) and Synthetic(0, 0)). Client sizes follow the paper's power
  law ``floor(lognormal(4, 2)) + 50``, capped at ``max_client_examples`` to
  keep the simulation tractable (uncapped draws reach tens of thousands).

  With ``iid=True`` (Synthetic-IID) every client shares one ``W, b ~ N(0, 1)``
  and ``v_k = 0``; ``alpha`` and ``beta`` are then ignored (``u = B = 0``).

  :func:`synthetic` with the same arguments uses exactly these parameters.

  Args:
    alpha: Spread of client models (std of ``u_k``), >= 0.
    beta: Spread of client feature means (std of ``B_k``), >= 0.
    num_clients: Number of clients ``K`` >= 1.
    num_features: Feature dimension ``d``.
    num_classes: Number of classes ``C`` >= 2.
    seed: Seed of the parameter stream.
    iid: Draw Synthetic-IID parameters.
    max_client_examples: Cap on the total examples per client (>= 50).

  Returns:
    A :class:`SyntheticParams`.

  Raises:
    ValueError: On out-of-range arguments.
  """
  _check_synthetic_args(alpha, beta, num_clients, num_features, num_classes,
                        max_client_examples)
  k, c, d = int(num_clients), int(num_classes), int(num_features)
  rng = np.random.default_rng([int(seed), 0])
  sizes = rng.lognormal(4.0, 2.0, k).astype(np.int64) + 50
  sizes = np.minimum(sizes, int(max_client_examples))
  sigma_diag = np.arange(1, d + 1, dtype=np.float64) ** -1.2
  if iid:
    u = np.zeros(k)
    bb = np.zeros(k)
    w_global = rng.normal(0.0, 1.0, (c, d))
    b_global = rng.normal(0.0, 1.0, c)
    w = np.broadcast_to(w_global, (k, c, d)).copy()
    b = np.broadcast_to(b_global, (k, c)).copy()
    v = np.zeros((k, d))
  else:
    u = rng.normal(0.0, float(alpha), k)
    bb = rng.normal(0.0, float(beta), k)
    w = rng.normal(u[:, None, None], 1.0, (k, c, d))
    b = rng.normal(u[:, None], 1.0, (k, c))
    v = rng.normal(bb[:, None], 1.0, (k, d))
  return SyntheticParams(u, bb, w, b, v, sigma_diag, sizes)


def synthetic(alpha: float, beta: float, num_clients: int, *,
              num_features: int = 60, num_classes: int = 10, seed: int = 0,
              iid: bool = False, test_fraction: float = 0.2,
              max_client_examples: int = 1000) -> Dataset:
  """Generates the Synthetic(alpha, beta) federated dataset of FedProx.

  For client ``k`` with parameters from :func:`synthetic_params`:
  ``x ~ N(v_k, diag(Sigma))`` and ``y = argmax(softmax(W_k x + b_k))``.
  A ``test_fraction`` of every client's examples (rounded, at least one
  example kept for training) is held out; training examples are ordered by
  client and carry their client id, test examples carry none.

  Args:
    alpha: Spread of client models (std of ``u_k``), >= 0.
    beta: Spread of client feature means (std of ``B_k``), >= 0.
    num_clients: Number of clients ``K`` >= 1.
    num_features: Feature dimension ``d`` (60 in the paper).
    num_classes: Number of classes (10 in the paper).
    seed: Seed; the same seed gives identical data.
    iid: Generate Synthetic-IID instead.
    test_fraction: Fraction of each client's examples held out, in [0, 1).
    max_client_examples: Cap on the total examples per client (>= 50).

  Returns:
    A :class:`Dataset` with float32 ``[n, d]`` features, ``num_classes``
    classes and int32 ``client_ids``.

  Raises:
    ValueError: On out-of-range arguments.
  """
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
  p = synthetic_params(alpha, beta, num_clients, num_features=num_features,
                       num_classes=num_classes, seed=seed, iid=iid,
                       max_client_examples=max_client_examples)
  rng = np.random.default_rng([int(seed), 1])
  std = np.sqrt(p.sigma_diag)
  xs_tr, ys_tr, ids_tr, xs_te, ys_te = [], [], [], [], []
  for k, n_k in enumerate(p.sizes):
    x = p.v[k] + std * rng.standard_normal((int(n_k), p.v.shape[1]))
    y = np.argmax(x @ p.W[k].T + p.b[k], axis=1)
    n_test = min(int(round(test_fraction * n_k)), int(n_k) - 1)
    xs_te.append(x[:n_test])
    ys_te.append(y[:n_test])
    xs_tr.append(x[n_test:])
    ys_tr.append(y[n_test:])
    ids_tr.append(np.full(int(n_k) - n_test, k, np.int32))
  tag = "synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})"
  return Dataset(tag,
                 np.concatenate(xs_tr).astype(np.float32),
                 np.concatenate(ys_tr).astype(np.int32),
                 np.concatenate(xs_te).astype(np.float32),
                 np.concatenate(ys_te).astype(np.int32),
                 int(num_classes), np.concatenate(ids_tr))
