"""Readers for user-supplied data files in standard formats (no downloads).

* LEAF JSON (FEMNIST, Shakespeare, ...): :func:`load_leaf`.
* CIFAR-10 "python version" pickled batches: :func:`load_cifar10`.
* numpy ``.npz`` archives: :func:`load_npz`.

Any missing, corrupt or inconsistent file raises :class:`DataFileError`, a
``ValueError`` whose message starts with the offending path. The character
vocabulary of LEAF text data (:data:`SHAKESPEARE_VOCAB`,
:data:`NUM_CHAR_CLASSES`, :func:`encode_text`) is in
:mod:`fedjax_bsa.data.vocab` and re-exported here.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import numpy as np

from fedjax_bsa.data.base import Dataset
from fedjax_bsa.data.vocab import encode_text
from fedjax_bsa.data.vocab import NUM_CHAR_CLASSES


class DataFileError(ValueError):
  """A data file is missing, unreadable or does not match its format."""

  def __init__(self, path, problem: str):
    self.path, self.problem = os.fspath(path), problem
    super().__init__(f"{self.path}: {problem}")


def _holdout(groups: np.ndarray, test_fraction: float, seed: int):
  """Sorted int64 (train, test) indices; ``test_fraction`` of each group is
  held out, each group keeping at least one training example."""
  rng = np.random.default_rng(seed)
  order = np.argsort(groups, kind="stable")
  _, starts = np.unique(groups[order], return_index=True)
  train, test = [], []
  for idx in np.split(order, starts[1:]):
    idx = idx[rng.permutation(len(idx))]
    n_test = min(int(round(test_fraction * len(idx))), len(idx) - 1)
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return (np.sort(np.concatenate(train)).astype(np.int64),
          np.sort(np.concatenate(test)).astype(np.int64))


def _check_fraction(test_fraction):
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")


# LEAF JSON ------------------------------------------------------------------


def _leaf_files(path) -> list[str]:
  path = os.fspath(path)
  if os.path.isdir(path):
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.endswith(".json"))
    if files:
      return files
    raise DataFileError(path, "directory contains no .json files")
  if not os.path.isfile(path):
    raise DataFileError(path, "no such file or directory")
  return [path]


def _read_leaf_file(path: str):
  """Returns ``[(user, xs, ys)]`` from one LEAF JSON file, fully validated."""
  try:
    with open(path, "rb") as f:
      blob = json.loads(f.read().decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataFileError(path, f"invalid JSON ({e})") from None
  except OSError as e:
    raise DataFileError(path, f"cannot read ({e.strerror or e})") from None
  if not isinstance(blob, dict):
    raise DataFileError(path, "top level must be a JSON object")
  for key in ("users", "num_samples", "user_data"):
    if key not in blob:
      raise DataFileError(path, f"missing key {key!r}")
  users, counts, data = blob["users"], blob["num_samples"], blob["user_data"]
  if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
    raise DataFileError(path, "'users' must be a list of strings")
  if not isinstance(counts, list) or not all(
      type(c) is int and c >= 0 for c in counts):
    raise DataFileError(path, "'num_samples' must list non-negative ints")
  if not isinstance(data, dict):
    raise DataFileError(path, "'user_data' must be an object")
  if len(counts) != len(users):
    raise DataFileError(path, f"length mismatch: {len(users)} users but "
                        f"{len(counts)} num_samples")
  if len(data) != len(users):
    raise DataFileError(path, f"length mismatch: {len(users)} users but "
                        f"{len(data)} entries in user_data")
  out = []
  for user, count in zip(users, counts):
    entry = data.get(user)
    if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
      raise DataFileError(path, f"user_data[{user!r}] is missing or lacks "
                          "keys 'x' and 'y'")
    xs, ys = entry["x"], entry["y"]
    if not isinstance(xs, list) or not isinstance(ys, list):
      raise DataFileError(path, f"user_data[{user!r}]: 'x' and 'y' must be "
                          "lists")
    if not len(xs) == len(ys) == count:
      raise DataFileError(path, f"length mismatch for user {user!r}: "
                          f"num_samples={count}, len(x)={len(xs)}, "
                          f"len(y)={len(ys)}")
    out.append((user, xs, ys))
  return out


def _leaf_arrays(path: str, xs: list, ys: list):
  """Converts raw LEAF examples to ``(x, y, is_text)`` arrays."""
  is_text = isinstance(xs[0], str)
  if is_text:
    if not all(isinstance(s, str) for s in xs):
      raise DataFileError(path, "mixed text and numeric examples in 'x'")
    if len({len(s) for s in xs}) != 1:
      raise DataFileError(path, "text examples in 'x' have different lengths")
    if not all(isinstance(c, str) and len(c) == 1 for c in ys):
      raise DataFileError(path, "text labels in 'y' must be single characters")
    x = np.stack([encode_text(s) for s in xs])
    y = encode_text("".join(ys))
    return x, y, True
  try:
    x = np.asarray(xs, dtype=np.float32)
  except (ValueError, TypeError):
    raise DataFileError(path, "'x' examples are not numeric arrays of one "
                        "shape") from None
  if not all(type(v) is int and v >= 0 for v in ys):
    raise DataFileError(path, "'y' must be a list of non-negative integers")
  return x, np.asarray(ys, dtype=np.int32), False


def _read_leaf(path, user_index: dict):
  """Reads a LEAF file or directory; returns ``(x, y, client, is_text)``."""
  xs, ys, owners = [], [], []
  for file in _leaf_files(path):
    for user, ux, uy in _read_leaf_file(file):
      owner = user_index.setdefault(user, len(user_index))
      xs.extend(ux)
      ys.extend(uy)
      owners.extend([owner] * len(ux))
  if not xs:
    raise DataFileError(path, "contains no examples")
  x, y, is_text = _leaf_arrays(os.fspath(path), xs, ys)
  return x, y, np.asarray(owners, np.int32), is_text


def load_leaf(path, test_path=None, *, seed=0, test_fraction: float = 0.2,
              num_classes: int | None = None) -> Dataset:
  """Reads a LEAF-format JSON dataset (FEMNIST, Shakespeare, ...).

  Each file has ``users`` (list of str), ``num_samples`` (list of int) and
  ``user_data`` (``{user: {"x": [...], "y": [...]}}``). Numeric examples
  (FEMNIST: 784 floats) become float32 ``[n, *example_shape]`` with int labels.
  Text examples (Shakespeare: an 80-character string whose label is the next
  character) become int32 ``[n, length]`` character ids with int labels, via
  :data:`SHAKESPEARE_VOCAB` (``string.printable``, id = index + 1, 0 =
  out-of-vocabulary), and ``num_classes`` defaults to
  :data:`NUM_CHAR_CLASSES`.

  Args:
    path: A LEAF JSON file or a directory whose ``*.json`` files are merged
      (in sorted file-name order).
    test_path: Optional file or directory with the test split. If ``None``, a
      ``test_fraction`` of every user's examples is held out (seeded; each
      user keeps at least one training example).
    seed: Seed of the hold-out split.
    test_fraction: Fraction held out when ``test_path`` is ``None``.
    num_classes: Number of classes; default ``max label + 1`` over train and
      test for numeric data (pass 62 for full FEMNIST).

  Returns:
    A :class:`Dataset` named ``"leaf"`` whose ``client_ids`` are user indices
    in order of first appearance.

  Raises:
    DataFileError: If a file is missing, not valid JSON, lacks a key, or its
      counts/shapes are inconsistent.
  """
  _check_fraction(test_fraction)
  users: dict = {}
  x, y, owners, is_text = _read_leaf(path, users)
  if test_path is None:
    tr, te = _holdout(owners, test_fraction, seed)
    x_tr, y_tr, ids, x_te, y_te = x[tr], y[tr], owners[tr], x[te], y[te]
  else:
    x_te, y_te, _, text_te = _read_leaf(test_path, users)
    if text_te != is_text or x_te.shape[1:] != x.shape[1:]:
      raise DataFileError(test_path, f"test examples have shape "
                          f"{x_te.shape[1:]}, train examples {x.shape[1:]}")
    x_tr, y_tr, ids = x, y, owners
  if num_classes is None:
    num_classes = (NUM_CHAR_CLASSES if is_text else
                   int(max(y_tr.max(), y_te.max(initial=0))) + 1)
  elif max(y_tr.max(), y_te.max(initial=0)) >= num_classes:
    raise DataFileError(path, f"labels exceed num_classes={num_classes}")
  return Dataset("leaf", x_tr, y_tr.astype(np.int32), x_te,
                 y_te.astype(np.int32), int(num_classes), ids.astype(np.int32))


# CIFAR-10 python batches ----------------------------------------------------

# The only globals a CIFAR-10 batch may reference (numpy arrays, protocol-2
# bytes); anything else is refused, so a malicious file cannot run code.
_SAFE_GLOBALS = {
    ("_codecs", "encode"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _SafeUnpickler(pickle.Unpickler):
  """Unpickles only the globals in ``_SAFE_GLOBALS``."""

  def find_class(self, module, name):
    if (module, name) not in _SAFE_GLOBALS:
      raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")
    return super().find_class(module, name)


def _read_cifar_batch(path: str):
  try:
    with open(path, "rb") as f:
      blob = _SafeUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
  except OSError as e:
    raise DataFileError(path, f"cannot read ({e.strerror or e})") from None
  except Exception as e:  # Corrupt pickles raise many exception types.
    raise DataFileError(path, f"not a valid pickled batch ({e})") from None
  if not isinstance(blob, dict):
    raise DataFileError(path, "batch must be a pickled dict")
  blob = {(k.decode("latin1") if isinstance(k, bytes) else k): v
          for k, v in blob.items()}
  for key in ("data", "labels"):
    if key not in blob:
      raise DataFileError(path, f"missing key b'{key}'")
  data = np.asarray(blob["data"])
  if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
    raise DataFileError(path, f"b'data' must be uint8 [n, 3072], got "
                        f"{data.dtype} {list(data.shape)}")
  try:
    labels = np.asarray(blob["labels"], dtype=np.int64)
  except (ValueError, TypeError):
    raise DataFileError(path, "b'labels' must be a list of ints") from None
  if labels.shape != (data.shape[0],):
    raise DataFileError(path, f"length mismatch: {data.shape[0]} images but "
                        f"{labels.size} labels")
  if labels.size and (labels.min() < 0 or labels.max() > 9):
    raise DataFileError(path, "labels must be in [0, 9]")
  x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return (x.astype(np.float32) / 255.0), labels.astype(np.int32)


def load_cifar10(directory) -> Dataset:
  """Reads the CIFAR-10 "python version" batches.

  Args:
    directory: Folder with ``data_batch_1`` ... ``data_batch_5`` (any
      non-empty subset is accepted) and ``test_batch``; each a pickled dict
      with ``b"data"`` uint8 ``[n, 3072]`` (channel-major 3x32x32) and
      ``b"labels"``. Only numpy arrays and plain containers are unpickled.

  Returns:
    A :class:`Dataset` with float32 ``[n, 32, 32, 3]`` images in ``[0, 1]``,
    10 classes and ``client_ids=None``.

  Raises:
    DataFileError: If the directory, every training batch or ``test_batch``
      is missing, or a batch is corrupt.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    raise DataFileError(directory, "no such directory")
  train_files = [f for f in (os.path.join(directory, f"data_batch_{i}")
                             for i in range(1, 6)) if os.path.isfile(f)]
  if not train_files:
    raise DataFileError(directory, "no data_batch_1..data_batch_5 found")
  test_file = os.path.join(directory, "test_batch")
  if not os.path.isfile(test_file):
    raise DataFileError(test_file, "missing file test_batch")
  parts = [_read_cifar_batch(f) for f in train_files]
  x_te, y_te = _read_cifar_batch(test_file)
  return Dataset("cifar10", np.concatenate([p[0] for p in parts]),
                 np.concatenate([p[1] for p in parts]), x_te, y_te, 10, None)


# npz ------------------------------------------------------------------------


def _int_labels(path: str, key: str, y: np.ndarray) -> np.ndarray:
  if y.ndim != 1:
    raise DataFileError(path, f"{key!r} must be 1-D, got shape {list(y.shape)}")
  if not (np.issubdtype(y.dtype, np.integer) or (
      np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
    raise DataFileError(path, f"{key!r} must hold integer labels")
  if y.size and y.min() < 0:
    raise DataFileError(path, f"{key!r} must hold non-negative labels")
  return y.astype(np.int32)


def _check_finite(path: str, key: str, x: np.ndarray) -> None:
  """Features must be finite (a NaN or inf would pass as a divergence)."""
  if not np.issubdtype(x.dtype, np.inexact):
    return
  bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
  if bad.any():
    raise DataFileError(path, f"{key!r} holds NaN or infinite values in "
                        f"{int(bad.sum())} example(s), the first at index "
                        f"{int(np.argmax(bad))}; features must be finite")


def load_npz(path, *, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
  """Reads a dataset from a numpy ``.npz`` archive.

  Args:
    path: Archive with ``x`` ``[n, ...]`` and ``y`` ``[n]`` (integer labels),
      optionally ``client_id`` ``[n]`` (any integer ids; remapped to dense
      ``0..K-1`` in increasing id order) and optionally both ``x_test`` and
      ``y_test``. Without a test set, a ``test_fraction`` is held out
      (seeded; per client when ``client_id`` is given, each client keeping at
      least one example).
    seed: Seed of the hold-out split.
    test_fraction: Fraction held out when there is no test set.

  Returns:
    A :class:`Dataset` named ``"npz"``; ``num_classes = max label + 1``.

  Raises:
    DataFileError: If the file is missing or invalid, a key is missing,
      lengths/shapes disagree, or features are NaN or infinite.
  """
  _check_fraction(test_fraction)
  shown = os.fspath(path)
  if not os.path.isfile(shown):
    raise DataFileError(shown, "no such file")
  try:
    with np.load(shown, allow_pickle=False) as z:
      arrays = {k: z[k] for k in z.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    raise DataFileError(shown, f"not a valid .npz archive ({e})") from None
  for key in ("x", "y"):
    if key not in arrays:
      raise DataFileError(shown, f"missing key {key!r}")
  x, y = arrays["x"], _int_labels(shown, "y", arrays["y"])
  if x.ndim < 1 or x.shape[0] != y.shape[0]:
    raise DataFileError(shown, f"length mismatch: x has shape "
                        f"{list(x.shape)}, y has {y.shape[0]} labels")
  if x.shape[0] == 0:
    raise DataFileError(shown, "contains no examples")
  if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
    raise DataFileError(shown, f"'x' must be numeric, got {x.dtype}")
  _check_finite(shown, "x", x)
  ids = None
  if "client_id" in arrays:
    raw = arrays["client_id"]
    if raw.shape != y.shape or not np.issubdtype(raw.dtype, np.integer):
      raise DataFileError(shown, f"'client_id' must be integer [{y.shape[0]}]"
                          f", got {raw.dtype} {list(raw.shape)}")
    ids = np.unique(raw, return_inverse=True)[1].reshape(-1).astype(np.int32)
  has_xt, has_yt = "x_test" in arrays, "y_test" in arrays
  if has_xt != has_yt:
    raise DataFileError(shown, "'x_test' and 'y_test' must be given together")
  if has_xt:
    x_te, y_te = arrays["x_test"], _int_labels(shown, "y_test",
                                               arrays["y_test"])
    if x_te.ndim < 1 or x_te.shape[0] != y_te.shape[0]:
      raise DataFileError(shown, f"length mismatch: x_test has shape "
                          f"{list(x_te.shape)}, y_test {y_te.shape[0]} labels")
    if x_te.shape[1:] != x.shape[1:]:
      raise DataFileError(shown, f"x_test examples have shape "
                          f"{list(x_te.shape[1:])}, x {list(x.shape[1:])}")
    if not (np.issubdtype(x_te.dtype, np.number) or x_te.dtype == np.bool_):
      raise DataFileError(shown, f"'x_test' must be numeric, got "
                          f"{x_te.dtype}")
    _check_finite(shown, "x_test", x_te)
    x_tr, y_tr = x, y
  else:
    groups = ids if ids is not None else np.zeros(len(y), np.int32)
    tr, te = _holdout(groups, test_fraction, seed)
    x_tr, y_tr, x_te, y_te = x[tr], y[tr], x[te], y[te]
    if ids is not None:
      ids = ids[tr]
  num_classes = int(max(y_tr.max(), y_te.max(initial=0))) + 1
  return Dataset("npz", x_tr.astype(np.float32), y_tr, x_te.astype(np.float32),
                 y_te, num_classes, ids)
