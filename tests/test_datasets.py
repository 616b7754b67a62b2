"""Tests for fedjax_bsa.data.datasets."""

import random
import socket
import urllib.request

import numpy as np
import pytest

from fedjax_bsa.data import datasets


def _label_tv_per_client(ds):
  """Mean total-variation distance of client label mixes to the global one."""
  c = ds.num_classes
  glob = np.bincount(ds.y_train, minlength=c) / ds.y_train.size
  tvs = []
  for k in np.unique(ds.client_ids):
    y = ds.y_train[ds.client_ids == k]
    tvs.append(0.5 * np.abs(np.bincount(y, minlength=c) / y.size - glob).sum())
  return float(np.mean(tvs))


# ---------------------------------------------------------------- digits


def test_digits_shapes_range_and_classes():
  ds = datasets.digits()
  assert ds.name == "digits"
  assert ds.x_train.shape == (1437, 64) and ds.x_test.shape == (360, 64)
  assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  assert ds.x_train.min() >= 0.0 and ds.x_train.max() == 1.0
  assert ds.x_test.min() >= 0.0 and ds.x_test.max() <= 1.0
  assert ds.num_classes == 10 and ds.client_ids is None
  # Stratified: every class in both splits, test share ~20% per class.
  tr = np.bincount(ds.y_train, minlength=10)
  te = np.bincount(ds.y_test, minlength=10)
  assert np.all(te > 0)
  np.testing.assert_allclose(te / (tr + te), 0.2, atol=0.02)


def test_digits_split_is_fixed_across_calls_and_seeds():
  a, b, c = datasets.digits(), datasets.digits(), datasets.digits(seed=123)
  for other in (b, c):
    np.testing.assert_array_equal(a.x_train, other.x_train)
    np.testing.assert_array_equal(a.y_test, other.y_test)
    np.testing.assert_array_equal(a.x_test, other.x_test)


# ---------------------------------------------------------------- mnist1d


def test_mnist1d_shapes_classes_and_standardization():
  ds = datasets.mnist1d(num_examples=1000, seed=0)
  assert ds.x_train.shape == (800, 40) and ds.x_test.shape == (200, 40)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.num_classes == 10 and ds.client_ids is None
  assert set(np.unique(ds.y_train)) == set(range(10))
  assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == [
      100] * 10
  np.testing.assert_allclose(ds.x_train.mean(0), 0.0, atol=1e-4)
  np.testing.assert_allclose(ds.x_train.std(0), 1.0, atol=1e-3)


def test_mnist1d_deterministic_by_seed_and_keeps_global_rng():
  np.random.seed(7)
  random.seed(7)
  before_np, before_py = np.random.get_state()[1].copy(), random.getstate()
  a = datasets.mnist1d(num_examples=200, seed=3)
  np.testing.assert_array_equal(np.random.get_state()[1], before_np)
  assert random.getstate() == before_py
  b = datasets.mnist1d(num_examples=200, seed=3)
  c = datasets.mnist1d(num_examples=200, seed=4)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.x_train, c.x_train)


def test_mnist1d_never_touches_network(monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("network access attempted")

  import mnist1d.data
  import requests
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  monkeypatch.setattr(urllib.request, "urlopen", no_network)
  monkeypatch.setattr(requests, "get", no_network)
  monkeypatch.setattr(mnist1d.data, "get_dataset", no_network)
  ds = datasets.mnist1d(num_examples=100, seed=0)
  assert ds.x_train.shape == (80, 40)


def test_mnist1d_rejects_tiny_size():
  with pytest.raises(ValueError, match="num_examples"):
    datasets.mnist1d(num_examples=5)


# ---------------------------------------------------------------- synthetic


def test_synthetic_sizes_ids_and_holdout():
  ds = datasets.synthetic(1.0, 1.0, 40, seed=0)
  p = datasets.synthetic_params(1.0, 1.0, 40, seed=0)
  assert np.all(p.sizes >= 50) and np.all(p.sizes <= 1000)
  assert p.sizes.std() > 0  # Power law, not constant.
  counts = np.bincount(ds.client_ids, minlength=40)
  n_test = np.round(0.2 * p.sizes).astype(int)
  np.testing.assert_array_equal(counts, p.sizes - n_test)
  assert ds.x_test.shape == (n_test.sum(), 60)
  assert ds.x_train.shape == (counts.sum(), 60)
  assert ds.x_train.dtype == np.float32 and ds.client_ids.dtype == np.int32
  assert ds.num_classes == 10
  assert np.all(np.diff(ds.client_ids) >= 0)  # Ordered by client.


def test_synthetic_labels_are_argmax_of_client_model():
  ds = datasets.synthetic(0.5, 0.5, 30, num_classes=5, seed=2)
  p = datasets.synthetic_params(0.5, 0.5, 30, num_classes=5, seed=2)
  k = ds.client_ids
  logits = np.einsum("nd,ncd->nc", ds.x_train.astype(np.float64),
                     p.W[k]) + p.b[k]
  mismatch = np.mean(np.argmax(logits, 1) != ds.y_train)
  assert mismatch < 1e-3  # Only float32 rounding at near-ties may flip.
  assert ds.y_train.max() < 5


def test_synthetic_feature_covariance_follows_power_law():
  ds = datasets.synthetic(1.0, 1.0, 50, seed=0)
  p = datasets.synthetic_params(1.0, 1.0, 50, seed=0)
  resid = ds.x_train.astype(np.float64) - p.v[ds.client_ids]
  n = resid.shape[0]
  assert n > 8000
  j = np.arange(1, 61)
  np.testing.assert_allclose(p.sigma_diag, j ** -1.2)
  # Var of a sample variance is 2 sigma^4 / n: 10% is >7 standard errors.
  np.testing.assert_allclose(resid.var(0) / j ** -1.2, 1.0, rtol=0.1)
  assert np.all(np.abs(resid.mean(0)) < 5 * np.sqrt(j ** -1.2 / n))


def test_synthetic_parameter_statistics_follow_formula():
  alpha, beta, k = 2.0, 3.0, 400
  p = datasets.synthetic_params(alpha, beta, k, seed=1)
  assert p.W.shape == (k, 10, 60) and p.b.shape == (k, 10)
  assert p.v.shape == (k, 60)
  # u ~ N(0, alpha^2), B ~ N(0, beta^2): relative SE of a variance ~7%.
  assert abs(p.u.var() / alpha**2 - 1) < 0.3
  assert abs(p.B.var() / beta**2 - 1) < 0.3
  # W_k ~ N(u_k, 1), b_k ~ N(u_k, 1), v_k ~ N(B_k, 1).
  dw = p.W - p.u[:, None, None]
  dv = p.v - p.B[:, None]
  assert abs(dw.mean()) < 0.01 and abs(dw.var() - 1) < 0.02
  assert abs(dv.var() - 1) < 0.05
  assert abs((p.b - p.u[:, None]).var() - 1) < 0.1
  # Feature means spread across clients with variance beta^2 + 1.
  assert abs(p.v.var() / (beta**2 + 1) - 1) < 0.3


def test_synthetic_iid_shares_model_and_label_mix():
  p = datasets.synthetic_params(0.0, 0.0, 20, seed=0, iid=True)
  assert np.all(p.W == p.W[0]) and np.all(p.b == p.b[0])
  assert np.all(p.v == 0)
  iid = datasets.synthetic(0.0, 0.0, 30, seed=0, iid=True)
  skewed = datasets.synthetic(1.0, 1.0, 30, seed=0)
  assert _label_tv_per_client(iid) < 0.2
  assert _label_tv_per_client(skewed) > 0.5


def test_synthetic_seeded():
  a = datasets.synthetic(1.0, 1.0, 5, seed=4)
  b = datasets.synthetic(1.0, 1.0, 5, seed=4)
  c = datasets.synthetic(1.0, 1.0, 5, seed=5)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert a.x_train.shape != c.x_train.shape or not np.array_equal(
      a.x_train, c.x_train)


@pytest.mark.parametrize("kwargs,word", [
    (dict(alpha=-1.0), "alpha"), (dict(beta=-0.1), "beta"),
    (dict(num_clients=0), "num_clients"), (dict(num_classes=1), "num_classes"),
    (dict(test_fraction=1.0), "test_fraction"),
])
def test_synthetic_rejects_bad_arguments(kwargs, word):
  args = dict(alpha=1.0, beta=1.0, num_clients=3)
  args.update(kwargs)
  with pytest.raises(ValueError, match=word):
    datasets.synthetic(**args)


# ---------------------------------------------------------------- load


def test_registered_datasets_load_and_unknown_is_refused():
  # the settings name a dataset through the registry, where
  # setup.experiment registers each (imported with fedjax_bsa)
  from fedjax_bsa.core import registry
  from fedjax_bsa.core.config import Config, ConfigError
  cfg = Config(dataset="synthetic", synthetic_alpha=0.0, synthetic_beta=0.0,
               num_clients=3, clients_per_round=3)
  ds = registry.DATASETS.get("synthetic")(cfg)
  assert ds.client_ids is not None and ds.num_classes == 10
  want = datasets.synthetic(0.0, 0.0, 3, seed=0)
  np.testing.assert_array_equal(ds.x_train, want.x_train)
  assert registry.DATASETS.get("digits")(Config()).x_train.shape == (1437,
                                                                     64)
  with pytest.raises(ConfigError, match="'mnist'.*digits.*npz"):
    Config(dataset="mnist")


def test_datasets_and_partitions_registered_with_their_properties():
  from fedjax_bsa.core import registry
  names = ("digits", "mnist1d", "synthetic", "leaf", "cifar10", "npz")
  assert registry.DATASETS.names()[:6] == names
  assert [registry.DATASETS.prop(d, "auto_model") for d in names] == [
      None, "cnn1d", "logreg", None, None, None]
  parts = ("iid", "dirichlet", "shards", "quantity", "natural")
  assert registry.PARTITIONS.names()[:5] == parts
  assert [registry.PARTITIONS.prop(p, "natural") for p in parts] == [
      False, False, False, False, True]
