"""Tests for fedjax_bsa.data.loaders (files written to tmp_path)."""

import json
import os
import pickle

import numpy as np
import pytest

from fedjax_bsa.core import registry
from fedjax_bsa.core.config import Config
from fedjax_bsa.data import loaders, vocab
from fedjax_bsa.data.loaders import DataFileError


def _femnist_blob(sizes, seed=0, prefix="f"):
  rng = np.random.default_rng(seed)
  users = [f"{prefix}{i:04d}" for i in range(len(sizes))]
  data = {}
  for u, n in zip(users, sizes):
    data[u] = {"x": rng.random((n, 784)).round(3).tolist(),
               "y": rng.integers(0, 62, n).tolist()}
  return {"users": users, "num_samples": list(sizes), "user_data": data}


def _write_json(path, blob):
  path.write_text(json.dumps(blob))
  return path


def _rows(x):
  return sorted(map(tuple, np.asarray(x, np.float32).tolist()))


# ---------------------------------------------------------------- LEAF


def test_leaf_femnist_holdout_per_user(tmp_path):
  blob = _femnist_blob([5, 3, 10])
  ds = loaders.load_leaf(_write_json(tmp_path / "train.json", blob))
  assert ds.x_train.shape == (14, 784) and ds.x_test.shape == (4, 784)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.client_ids.dtype == np.int32
  assert np.bincount(ds.client_ids).tolist() == [4, 2, 8]
  # Every user's train rows are that user's data, with matching labels.
  for k, user in enumerate(blob["users"]):
    ux = np.asarray(blob["user_data"][user]["x"], np.float32)
    uy = np.asarray(blob["user_data"][user]["y"])
    mine = ds.client_ids == k
    for row, label in zip(ds.x_train[mine], ds.y_train[mine]):
      hit = np.flatnonzero(np.all(ux == row, axis=1))
      assert hit.size == 1 and uy[hit[0]] == label
  all_x = np.concatenate([ds.x_train, ds.x_test])
  orig = np.concatenate([blob["user_data"][u]["x"] for u in blob["users"]])
  assert _rows(all_x) == _rows(orig)
  assert ds.num_classes == max(max(d["y"]) for d in
                               blob["user_data"].values()) + 1
  again = loaders.load_leaf(tmp_path / "train.json")
  np.testing.assert_array_equal(ds.x_test, again.x_test)


def test_leaf_test_path_and_directory_merge(tmp_path):
  (tmp_path / "train").mkdir()
  _write_json(tmp_path / "train" / "a.json", _femnist_blob([4, 6], 0, "a"))
  _write_json(tmp_path / "train" / "b.json", _femnist_blob([3], 1, "b"))
  (tmp_path / "train" / "notes.txt").write_text("ignored")
  test = _write_json(tmp_path / "test.json", _femnist_blob([2, 2], 2, "a"))
  ds = loaders.load_leaf(tmp_path / "train", test_path=test, num_classes=62)
  assert ds.x_train.shape == (13, 784) and ds.x_test.shape == (4, 784)
  assert ds.client_ids.tolist() == [0] * 4 + [1] * 6 + [2] * 3
  assert ds.num_classes == 62
  via_path = loaders.load_leaf(str(tmp_path / "train"),
                               test_path=str(test))
  np.testing.assert_array_equal(via_path.y_test, ds.y_test)
  # dataset=leaf reads the files in data_path (a test fraction held out)
  via_config = registry.DATASETS.get("leaf")(
      Config(dataset="leaf", data_path=str(tmp_path / "train")))
  np.testing.assert_array_equal(
      via_config.x_train, loaders.load_leaf(tmp_path / "train").x_train)


def test_leaf_shakespeare_text(tmp_path):
  text = "To be, or not to be, that is the question: Whether 'tis nobler ?"
  xs = [text[i:i + 10] for i in range(20)]
  ys = [text[i + 10] for i in range(20)]
  xs[0] = "caf\u00e9 au la"  # Non-ASCII maps to the unknown id 0.
  blob = {"users": ["HAMLET", "OPHELIA"], "num_samples": [12, 8],
          "user_data": {"HAMLET": {"x": xs[:12], "y": ys[:12]},
                        "OPHELIA": {"x": xs[12:], "y": ys[12:]}}}
  train = _write_json(tmp_path / "shakespeare.json", blob)
  ds = loaders.load_leaf(train, test_path=train)
  assert ds.x_train.shape == (20, 10) and ds.x_train.dtype == np.int32
  assert ds.num_classes == loaders.NUM_CHAR_CLASSES == 101
  chars = vocab.SHAKESPEARE_VOCAB
  assert ds.x_train[1].tolist() == [chars.index(c) + 1 for c in xs[1]]
  assert ds.x_train[0, 3] == 0 and ds.x_train[0, 0] == chars.index("c") + 1
  assert ds.y_train.tolist() == [chars.index(c) + 1 for c in ys]
  assert ds.client_ids.tolist() == [0] * 12 + [1] * 8
  held = loaders.load_leaf(train, seed=1)
  assert held.x_train.shape == (16, 10) and held.x_test.shape == (4, 10)


def _corrupt_leaf_cases():
  good = _femnist_blob([2, 3])
  missing = {k: v for k, v in good.items() if k != "user_data"}
  short = dict(good, num_samples=[2])
  wrong_count = dict(good, num_samples=[2, 4])
  return {
      "truncated": (json.dumps(good)[:100], "invalid JSON"),
      "missing_key": (json.dumps(missing), "missing key 'user_data'"),
      "num_samples_len": (json.dumps(short), "length mismatch"),
      "user_count": (json.dumps(wrong_count), "length mismatch"),
      "not_object": ("[1, 2]", "JSON object"),
  }


@pytest.mark.parametrize("case", sorted(_corrupt_leaf_cases()))
def test_leaf_corrupt_files_raise_data_file_error(tmp_path, case):
  text, what = _corrupt_leaf_cases()[case]
  path = tmp_path / f"bad_{case}.json"
  path.write_text(text)
  with pytest.raises(DataFileError, match=what) as err:
    loaders.load_leaf(path)
  assert str(path) in str(err.value)
  assert isinstance(err.value, ValueError)


def test_leaf_missing_file_and_empty_directory(tmp_path):
  with pytest.raises(DataFileError, match="nope.json"):
    loaders.load_leaf(tmp_path / "nope.json")
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataFileError, match="empty.*no .json"):
    loaders.load_leaf(tmp_path / "empty")
  good = _write_json(tmp_path / "ok.json", _femnist_blob([2]))
  with pytest.raises(DataFileError, match="missing_test.json"):
    loaders.load_leaf(good, test_path=tmp_path / "missing_test.json")


# ---------------------------------------------------------------- CIFAR-10


def _write_batch(path, n, seed, protocol=2):
  rng = np.random.default_rng(seed)
  data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
  labels = rng.integers(0, 10, n).tolist()
  with open(path, "wb") as f:
    pickle.dump({b"batch_label": b"x", b"data": data, b"labels": labels}, f,
                protocol=protocol)
  return data, labels


def test_cifar10_reads_subset_of_batches(tmp_path):
  d1, l1 = _write_batch(tmp_path / "data_batch_1", 4, 0)
  d3, l3 = _write_batch(tmp_path / "data_batch_3", 3, 1, protocol=5)
  dt, lt = _write_batch(tmp_path / "test_batch", 2, 2)
  ds = loaders.load_cifar10(tmp_path)
  assert ds.x_train.shape == (7, 32, 32, 3)
  assert ds.x_test.shape == (2, 32, 32, 3)
  assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
  assert ds.y_train.tolist() == l1 + l3 and ds.y_test.tolist() == lt
  assert ds.client_ids is None
  data = np.concatenate([d1, d3])
  # Pixel (row r, col c, channel ch) is data[ch * 1024 + r * 32 + c] / 255.
  for i, r, c, ch in [(0, 0, 0, 0), (2, 5, 7, 1), (6, 31, 30, 2)]:
    assert ds.x_train[i, r, c, ch] == pytest.approx(
        data[i, ch * 1024 + r * 32 + c] / 255.0)
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  # dataset=cifar10 reads the folder in data_path
  via_config = registry.DATASETS.get("cifar10")(
      Config(dataset="cifar10", data_path=str(tmp_path)))
  np.testing.assert_array_equal(via_config.x_test, ds.x_test)


def test_cifar10_missing_files(tmp_path):
  _write_batch(tmp_path / "data_batch_1", 2, 0)
  with pytest.raises(DataFileError, match="test_batch"):
    loaders.load_cifar10(tmp_path)
  (tmp_path / "data_batch_1").unlink()
  _write_batch(tmp_path / "test_batch", 2, 0)
  with pytest.raises(DataFileError, match="data_batch"):
    loaders.load_cifar10(tmp_path)
  with pytest.raises(DataFileError, match="no_such_dir"):
    loaders.load_cifar10(tmp_path / "no_such_dir")


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned",))


@pytest.mark.parametrize("payload,what", [
    (b"\x80\x02garbage", "not a valid pickled batch"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "labels"),
    (pickle.dumps({b"data": np.zeros((2, 100), np.uint8),
                   b"labels": [0, 1]}), "3072"),
    (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8),
                   b"labels": [0]}), "length mismatch"),
    (pickle.dumps([1, 2]), "dict"),
    (pickle.dumps(_Evil()), "refusing"),
])
def test_cifar10_corrupt_batch(tmp_path, payload, what):
  _write_batch(tmp_path / "data_batch_1", 2, 0)
  (tmp_path / "test_batch").write_bytes(payload)
  with pytest.raises(DataFileError, match=what) as err:
    loaders.load_cifar10(tmp_path)
  assert str(tmp_path / "test_batch") in str(err.value)


# ---------------------------------------------------------------- npz


def test_npz_with_client_id_and_test_set(tmp_path):
  rng = np.random.default_rng(0)
  x = rng.random((30, 4, 2))
  y = rng.integers(0, 5, 30)
  cid = np.repeat([10, 7, 42], 10)
  path = tmp_path / "fed.npz"
  np.savez(path, x=x, y=y, client_id=cid, x_test=x[:6], y_test=y[:6])
  ds = loaders.load_npz(path)
  assert ds.x_train.shape == (30, 4, 2) and ds.x_train.dtype == np.float32
  assert ds.x_test.shape == (6, 4, 2) and ds.y_test.dtype == np.int32
  np.testing.assert_allclose(ds.x_train, x.astype(np.float32))
  np.testing.assert_array_equal(ds.y_train, y)
  # Ids are densified in increasing id order: 7 -> 0, 10 -> 1, 42 -> 2.
  assert ds.client_ids.tolist() == [1] * 10 + [0] * 10 + [2] * 10
  assert ds.num_classes == max(y.max(), y[:6].max()) + 1


def test_npz_holdout_without_test_set(tmp_path):
  x = np.arange(50, dtype=np.float64).reshape(25, 2)
  y = np.arange(25) % 3
  np.savez(tmp_path / "plain.npz", x=x, y=y)
  ds = loaders.load_npz(str(tmp_path / "plain.npz"), seed=1)
  assert ds.x_train.shape == (20, 2) and ds.x_test.shape == (5, 2)
  assert ds.client_ids is None
  assert _rows(np.concatenate([ds.x_train, ds.x_test])) == _rows(x)
  # Labels still match their rows after the split.
  np.testing.assert_array_equal(ds.y_train, (ds.x_train[:, 0] // 2) % 3)
  np.savez(tmp_path / "fed.npz", x=x, y=y, client_id=np.arange(25) % 2)
  fed = loaders.load_npz(tmp_path / "fed.npz")
  assert np.bincount(fed.client_ids).tolist() == [10, 10]  # 13->10, 12->10.
  assert fed.x_test.shape == (5, 2)


@pytest.mark.parametrize("arrays,what", [
    (dict(x=np.zeros((3, 2))), "missing key 'y'"),
    (dict(x=np.zeros((3, 2)), y=np.zeros(4, int)), "length mismatch"),
    (dict(x=np.zeros((3, 2)), y=np.array([0.5, 1, 2])), "integer"),
    (dict(x=np.zeros((3, 2)), y=np.zeros(3, int), x_test=np.zeros((1, 2))),
     "together"),
    (dict(x=np.zeros((3, 2)), y=np.zeros(3, int), client_id=np.zeros(2, int)),
     "client_id"),
])
def test_npz_invalid_contents(tmp_path, arrays, what):
  path = tmp_path / "broken.npz"
  np.savez(path, **arrays)
  with pytest.raises(DataFileError, match=what) as err:
    loaders.load_npz(path)
  assert str(path) in str(err.value)


def test_npz_missing_and_corrupt_file(tmp_path):
  with pytest.raises(DataFileError, match="absent.npz"):
    loaders.load_npz(tmp_path / "absent.npz")
  bad = tmp_path / "garbage.npz"
  bad.write_bytes(b"PK\x03\x04 not really a zip")
  with pytest.raises(DataFileError, match="garbage.npz"):
    loaders.load_npz(bad)
