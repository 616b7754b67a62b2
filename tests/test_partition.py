"""Tests for fedjax_bsa.data.partition."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_bsa.data import partition


def _labels(counts, seed=0):
  """Shuffled labels with the given per-class counts."""
  y = np.repeat(np.arange(len(counts)), counts)
  return np.random.default_rng(seed).permutation(y)


def _assert_exact_cover(parts, n):
  assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _same(a, b):
  return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def _label_hist(parts, y, c):
  return np.stack([np.bincount(y[p], minlength=c) for p in parts])


Y = _labels([300, 150, 220, 180, 260, 200, 90, 240, 170, 190])  # n = 2000


# ---------------------------------------------------------------- iid


def test_iid_cover_balance_and_seeding():
  parts = partition.iid(1003, 10, seed=0)
  _assert_exact_cover(parts, 1003)
  assert {len(p) for p in parts} == {100, 101}
  assert _same(parts, partition.iid(1003, 10, seed=0))
  assert not _same(parts, partition.iid(1003, 10, seed=1))


@pytest.mark.parametrize("n,k", [(10, 0), (10, 11), (0, 1)])
def test_iid_rejects_bad_sizes(n, k):
  with pytest.raises(ValueError, match="num_clients|num_examples"):
    partition.iid(n, k, seed=0)


# ---------------------------------------------------------------- dirichlet


def test_dirichlet_cover_min_size_and_seeding():
  parts = partition.dirichlet(Y, 20, alpha=0.3, seed=0, min_examples=25)
  _assert_exact_cover(parts, Y.size)
  assert len(parts) == 20 and min(len(p) for p in parts) >= 25
  assert _same(parts, partition.dirichlet(Y, 20, 0.3, seed=0, min_examples=25))
  assert not _same(parts, partition.dirichlet(Y, 20, 0.3, seed=1,
                                              min_examples=25))


def test_dirichlet_small_alpha_concentrates_labels():
  parts = partition.dirichlet(Y, 20, alpha=0.05, seed=0)
  hist = _label_hist(parts, Y, 10)
  top2 = np.sort(hist, axis=1)[:, -2:].sum(1) / hist.sum(1)
  assert np.mean(top2 >= 0.8) >= 0.7


def test_dirichlet_large_alpha_is_near_iid():
  parts = partition.dirichlet(Y, 20, alpha=1000.0, seed=0)
  hist = _label_hist(parts, Y, 10)
  dist = hist / hist.sum(1, keepdims=True)
  glob = np.bincount(Y) / Y.size
  tv = 0.5 * np.abs(dist - glob).sum(1)
  assert tv.mean() < 0.1


def test_dirichlet_errors_name_arguments():
  with pytest.raises(ValueError, match="alpha"):
    partition.dirichlet(Y, 10, alpha=0.0, seed=0)
  with pytest.raises(ValueError, match="min_examples=300"):
    partition.dirichlet(Y, 10, alpha=1.0, seed=0, min_examples=300)
  with pytest.raises(ValueError, match="num_clients"):
    partition.dirichlet(Y, 0, alpha=1.0, seed=0)
  # One class, tiny alpha: nearly everything goes to one client every time.
  with pytest.raises(ValueError, match=r"min_examples=10.*alpha=0\.01"):
    partition.dirichlet(np.zeros(100, int), 10, alpha=0.01, seed=0,
                        min_examples=10, max_tries=20)


# ---------------------------------------------------------------- shards


@pytest.mark.parametrize("k,spc", [(50, 2), (7, 2), (13, 3), (100, 1)])
def test_shards_cover_and_label_purity(k, spc):
  parts = partition.shards(Y, k, seed=0, shards_per_client=spc)
  _assert_exact_cover(parts, Y.size)
  assert len(parts) == k
  labels_per_client = (_label_hist(parts, Y, 10) > 0).sum(1)
  assert labels_per_client.max() <= spc
  assert min(len(p) for p in parts) > 0


def test_shards_two_per_client_gives_at_most_two_labels_and_seeding():
  parts = partition.shards(Y, 100, seed=3)
  assert (_label_hist(parts, Y, 10) > 0).sum(1).max() <= 2
  assert _same(parts, partition.shards(Y, 100, seed=3))
  assert not _same(parts, partition.shards(Y, 100, seed=4))


def test_shards_fewer_shards_than_labels_still_covers():
  parts = partition.shards(Y, 2, seed=0)  # 4 shards, 10 labels.
  _assert_exact_cover(parts, Y.size)


def test_shards_rejects_too_many_shards():
  with pytest.raises(ValueError, match="shards_per_client"):
    partition.shards(np.arange(10) % 2, 4, seed=0, shards_per_client=3)


# ---------------------------------------------------------------- quantity


def test_quantity_lognormal_gives_unequal_sizes_with_minimum():
  parts = partition.quantity(5000, 50, seed=0, method="lognormal", sigma=1.0,
                             min_examples=10)
  _assert_exact_cover(parts, 5000)
  sizes = np.array([len(p) for p in parts])
  assert sizes.min() >= 10
  assert sizes.std() / sizes.mean() > 0.5
  flat = partition.quantity(5000, 50, seed=0, method="lognormal", sigma=0.0)
  assert {len(p) for p in flat} == {100}


def test_quantity_dirichlet_and_errors():
  parts = partition.quantity(1000, 8, seed=2, method="dirichlet", alpha=0.5,
                             min_examples=20)
  _assert_exact_cover(parts, 1000)
  assert min(len(p) for p in parts) >= 20
  assert _same(parts, partition.quantity(1000, 8, seed=2, method="dirichlet",
                                         alpha=0.5, min_examples=20))
  with pytest.raises(ValueError, match="method"):
    partition.quantity(100, 4, seed=0, method="zipf")
  with pytest.raises(ValueError, match="sigma"):
    partition.quantity(100, 4, seed=0, method="lognormal", sigma=-1.0)
  with pytest.raises(ValueError, match="min_examples"):
    partition.quantity(100, 4, seed=0, min_examples=26)


# ---------------------------------------------------------------- natural


def test_natural_groups_by_id_in_id_order():
  parts = partition.natural(np.array([5, 3, 5, 9, 3, -1]))
  assert [p.tolist() for p in parts] == [[5], [1, 4], [0, 2], [3]]


def test_registered_partitions_dispatch_and_errors():
  # the settings name a partition through the registry, where
  # setup.experiment registers each (imported with fedjax_bsa)
  from fedjax_bsa.core.config import Config, ConfigError
  from fedjax_bsa.data.base import Dataset
  from fedjax_bsa.setup import experiment
  ids = np.repeat(np.arange(4), 5)
  y = np.arange(20) % 3
  x = np.zeros((20, 1), np.float32)
  ds = Dataset("t", x, y, x, y, 3, ids)
  cfg = Config(num_clients=2, clients_per_round=2, min_examples=2)
  natural = cfg.replace(partition="natural")
  assert len(experiment.make_parts(natural, ds)) == 4   # num_clients unread
  with pytest.raises(ValueError, match="client_ids"):
    experiment.make_parts(natural, ds._replace(client_ids=None))
  with pytest.raises(ConfigError, match="'pathological'.*dirichlet"):
    cfg.replace(partition="pathological")
  for name in ("iid", "dirichlet", "shards", "quantity"):
    parts = experiment.make_parts(cfg.replace(partition=name), ds)
    _assert_exact_cover(parts, 20)
  want = partition.dirichlet(y, 2, 0.3, 0, min_examples=2)
  got = experiment.make_parts(cfg.replace(partition="dirichlet"), ds)
  assert [p.tolist() for p in got] == [p.tolist() for p in want]


# ---------------------------------------------------------------- summary


def test_summarize_exact_values_and_format():
  y = np.array([0, 0, 1, 1, 2, 2])
  parts = [np.array([0, 1]), np.array([2, 3, 4, 5])]
  s = partition.summarize(parts, y, 3)
  assert s["sizes"] == [2, 4] and s["size_min"] == 2 and s["size_max"] == 4
  assert s["size_median"] == 3.0 and s["size_mean"] == 3.0
  assert s["label_histograms"] == [[2, 0, 0], [0, 2, 2]]
  assert s["mean_label_entropy"] == pytest.approx(0.5 * np.log(2) / np.log(3))
  assert s["global_label_entropy"] == pytest.approx(1.0)
  text = partition.format_summary(s)
  assert "clients 2" in text and "examples 6" in text
  assert len(text.splitlines()) == 6
  with pytest.raises(ValueError, match="num_classes"):
    partition.summarize(parts, y, 2)


def test_summary_entropy_orders_partitions():
  iid = partition.summarize(partition.iid(Y.size, 20, 0), Y, 10)
  sh = partition.summarize(partition.shards(Y, 20, 0), Y, 10)
  assert iid["mean_label_entropy"] > 0.9 > 0.4 > sh["mean_label_entropy"]
  many = partition.format_summary(iid, max_rows=3)
  assert "17 more clients" in many


# ---------------------------------------------------------------- property


@settings(max_examples=60, deadline=None)
@given(n=st.integers(12, 150), num_classes=st.integers(1, 6),
       num_clients=st.integers(1, 12),
       alpha=st.floats(0.01, 100.0), seed=st.integers(0, 2**31 - 1))
def test_every_example_exactly_once(n, num_classes, num_clients, alpha, seed):
  y = np.random.default_rng(seed).integers(0, num_classes, n)
  _assert_exact_cover(partition.dirichlet(y, num_clients, alpha, seed,
                                          min_examples=0), n)
  _assert_exact_cover(partition.iid(n, num_clients, seed), n)
  spc = min(2, n // num_clients)
  parts = partition.shards(y, num_clients, seed, shards_per_client=spc)
  _assert_exact_cover(parts, n)
  if num_clients * spc >= num_classes:
    assert (_label_hist(parts, y, num_classes) > 0).sum(1).max() <= spc
  _assert_exact_cover(partition.quantity(n, num_clients, seed,
                                         method="dirichlet", alpha=alpha,
                                         min_examples=1), n)
  try:
    parts = partition.dirichlet(y, num_clients, alpha, seed, min_examples=1,
                                max_tries=5)
  except ValueError as e:
    assert "alpha" in str(e) and "min_examples" in str(e)
  else:
    _assert_exact_cover(parts, n)
    assert min(len(p) for p in parts) >= 1
