"""Ragged client data: layout, merge, the swap-or-not shuffle, sharding.

The 8-device and 2-process checks run in subprocesses (this file run as a
script), since the device count is fixed when JAX starts.
"""

import itertools
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.scipy.stats import chi2

from fedjax_bsa.data import datasets
from fedjax_bsa.data import federated as fd
from fedjax_bsa.data import partition
from fedjax_bsa.run import distributed

DEVICES = 8
_M32 = np.uint64(0xFFFFFFFF)


# ------------------------------------------------------- numpy references
def _np_mix(h):
  h = h & _M32
  h ^= h >> np.uint64(16)
  h = (h * np.uint64(0x85EBCA6B)) & _M32
  h ^= h >> np.uint64(13)
  h = (h * np.uint64(0xC2B2AE35)) & _M32
  return h ^ (h >> np.uint64(16))


def _np_permute(seed, i, n):
  """Swap-or-not (Hoang, Morris, Rogaway 2012), in 64-bit numpy."""
  seed, x, n = np.broadcast_arrays(*(np.asarray(a).astype(np.uint64)
                                     for a in (seed, i, n)))
  x = x.copy()
  for r in range(fd.ROUNDS):
    c1 = np.uint64((2 * r + 1) * 0x9E3779B9 % 2**32)
    c2 = np.uint64((2 * r + 2) * 0x9E3779B9 % 2**32)
    k = _np_mix(seed ^ c1) % n
    partner = (k + n - x) % n
    swap = _np_mix(np.maximum(x, partner) ^ _np_mix(seed ^ c2)) >> np.uint64(31)
    x = np.where(swap == 1, partner, x)
  return x.astype(np.int64)


def _random_parts(rng, total, sizes):
  idx = rng.permutation(total)[:sum(sizes)]
  return np.split(idx, np.cumsum(sizes)[:-1])


def _p_value(counts):
  counts = np.asarray(counts, np.float64)
  expect = counts.sum() / len(counts)
  stat = ((counts - expect) ** 2 / expect).sum()
  return float(chi2.sf(stat, len(counts) - 1))


@pytest.fixture(scope="module")
def digits():
  return datasets.digits()


# ----------------------------------------------------------------- layout
def test_from_partition_round_trip(digits):
  rng = np.random.default_rng(0)
  parts = _random_parts(rng, len(digits.y_train), [7, 1, 40, 3, 12])
  parts.append(np.array([5, 5, parts[0][0]]))  # repeats and shared rows
  d = fd.from_partition(digits.x_train, digits.y_train, parts)
  assert d.x is digits.x_train  # stored once, not copied
  assert d.rows.dtype == d.offset.dtype == d.num_examples.dtype == np.int32
  assert d.num_examples.tolist() == [len(p) for p in parts]
  assert d.offset.tolist() == [0, 7, 8, 48, 51, 63]
  for k, p in enumerate(parts):
    np.testing.assert_array_equal(fd.client_rows(d, k), p)
    np.testing.assert_array_equal(d.x[fd.client_rows(d, k)],
                                  digits.x_train[p])
    np.testing.assert_array_equal(d.y[fd.client_rows(d, k)],
                                  digits.y_train[p])


def test_from_partition_errors():
  x, y = np.zeros((6, 2), np.float32), np.zeros(6, np.int32)
  with pytest.raises(ValueError, match=r"client 2 has 0 examples"):
    fd.from_partition(x, y, [np.array([0]), np.array([1]), np.array([], int)])
  with pytest.raises(ValueError, match=r"client 1 has row index 6: must be "
                     r"in \[0, 5\]"):
    fd.from_partition(x, y, [np.array([0, 1]), np.array([2, 6])])
  with pytest.raises(ValueError, match="one row per example"):
    fd.from_partition(x, y[:5], [np.array([0])])


def test_from_sizes_equals_quantity_partition(digits):
  t, n, seed = len(digits.y_train), 60, 3
  rng = np.random.default_rng(seed)
  sizes = fd.lognormal_sizes(t, n, 2.0, rng)
  got = fd.from_sizes(digits.x_train, digits.y_train, sizes, rng)
  parts = partition.quantity(t, n, seed, "lognormal", sigma=2.0,
                             min_examples=1)
  want = fd.from_partition(digits.x_train, digits.y_train, parts)
  for f in fd.FederatedData._fields:
    np.testing.assert_array_equal(getattr(got, f), getattr(want, f), f)
  assert sizes.max() > 20 * np.median(sizes)  # skewed indeed


def test_from_sizes_reuse():
  x, y = np.zeros((10, 1), np.float32), np.arange(10)
  with pytest.raises(ValueError, match="sizes sum to 25 rows but x has 10"):
    fd.from_sizes(x, y, [5, 20], seed=0)
  with pytest.raises(ValueError, match=r"client 1 has 0 examples"):
    fd.from_sizes(x, y, [5, 0], seed=0)
  d = fd.from_sizes(x, y, [5, 20], seed=0, reuse=True)
  # three permutations dealt: 5 rows to three clients' slots, 5 to two
  assert sorted(np.bincount(d.rows, minlength=10)) == [2] * 5 + [3] * 5
  assert len(set(fd.client_rows(d, 0))) == 5  # within one permutation


def test_merge_shares_equal_data_and_renumbers(digits):
  rng = np.random.default_rng(1)
  t = len(digits.y_train)
  parts_a = _random_parts(rng, t, [5, 9, 2])
  parts_b = _random_parts(rng, t, [30, 1])
  a = fd.from_partition(digits.x_train, digits.y_train, parts_a)
  b = fd.from_partition(digits.x_train.copy(), digits.y_train.copy(),
                        parts_b)  # equal content, another object
  other_x = np.arange(40, dtype=np.float32).reshape(5, 8)
  c = fd.from_partition(np.repeat(other_x, 8, axis=1), np.arange(5),
                        [np.array([4, 2]), np.array([0])])
  # a client-major layout that is not packed: offsets out of order
  e = fd.FederatedData(digits.x_train, digits.y_train,
                       np.array([10, 11, 12, 20], np.int32),
                       np.array([3, 0], np.int32), np.array([1, 3], np.int32))
  m, first = fd.merge([a, b, c, e])
  assert first.tolist() == [0, 3, 5, 7]
  assert m.x.shape == (t + 5, 64) and m.y.shape == (t + 5,)  # a, b, e share
  assert m.num_clients == 9
  want = ([digits.x_train[p] for p in parts_a + parts_b]
          + [np.repeat(other_x, 8, axis=1)[[4, 2]],
             np.repeat(other_x, 8, axis=1)[[0]],
             digits.x_train[[20]], digits.x_train[[10, 11, 12]]])
  for k, w in enumerate(want):
    np.testing.assert_array_equal(m.x[fd.client_rows(m, k)], w)
  np.testing.assert_array_equal(m.offset,
                                np.cumsum([0] + [len(w) for w in want])[:-1])
  with pytest.raises(ValueError, match="experiment 1 has examples of shape"):
    fd.merge([a, fd.from_partition(np.zeros((3, 2)), np.zeros(3),
                                   [np.array([0])])])


# ------------------------------------------------------------ permutation
_N_MAX = 3000


@jax.jit
def _permute_range(seed0, n):
  """``permute`` of every position < n (padded to ``_N_MAX``), 16 seeds,
  and its inverse; one compile for every ``n``."""
  seeds = (seed0 + jnp.arange(16, dtype=jnp.uint32))[:, None]
  pos = jnp.minimum(jnp.arange(_N_MAX, dtype=jnp.int32), n - 1)[None, :]
  p = fd.permute(seeds, pos, n)
  return p, fd.permute(seeds, p, n, inverse=True)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, _N_MAX), seed0=st.integers(0, 2**32 - 17))
def test_permute_is_a_bijection(n, seed0):
  p, back = _permute_range(jnp.uint32(seed0), jnp.int32(n))
  p, back = np.asarray(p)[:, :n], np.asarray(back)[:, :n]
  assert p.dtype == np.int32
  np.testing.assert_array_equal(np.sort(p, axis=1),
                                np.broadcast_to(np.arange(n), (16, n)))
  np.testing.assert_array_equal(back, np.broadcast_to(np.arange(n), (16, n)))


def test_permute_large_domains():
  f = jax.jit(fd.permute)
  n = 2**20 + 7  # every position (one compile serves every n)
  p = np.asarray(f(jnp.uint32(12345), jnp.arange(n, dtype=jnp.int32), n))
  assert (np.bincount(p, minlength=n) == 1).all()
  rng = np.random.default_rng(0)
  for n in (2**24 - 1, 2**31 - 1):  # sampled: in range, inverse, distinct
    i = rng.choice(n, 50_000, replace=False).astype(np.int32)
    p = np.asarray(f(jnp.uint32(7), i, n))
    assert p.min() >= 0 and p.max() < n and len(np.unique(p)) == len(i)
    np.testing.assert_array_equal(
        jax.jit(fd.permute, static_argnums=3)(jnp.uint32(7), p, n, True), i)


def test_permute_matches_numpy_reference():
  rng = np.random.default_rng(2)
  seeds = rng.integers(0, 2**32, 500, dtype=np.uint64)
  n = rng.integers(1, 2**24, 500)
  i = (rng.random(500) * n).astype(np.int64)
  got = jax.jit(fd.permute)(seeds.astype(np.uint32), i.astype(np.int32),
                            n.astype(np.int32))
  np.testing.assert_array_equal(got, _np_permute(seeds, i, n))


_PERMUTE = jax.jit(fd.permute)


def _uniformity(n, samples, positions, key=0, fresh=False):
  seeds = jax.random.bits(jax.random.key(key), (samples, 1), jnp.uint32)
  # fresh: traced anew, to read a patched ROUNDS
  permute = jax.jit(lambda *a: fd.permute(*a)) if fresh else _PERMUTE
  p = np.asarray(permute(seeds, jnp.array(positions, jnp.int32)[None, :], n))
  first = np.bincount(p[:, 0], minlength=n)
  pvals = [_p_value(first)]
  iu = np.triu_indices(n, 1)
  for a, b in [(0, 1), (2, 3)][:len(positions) // 2]:  # columns
    lo, hi = np.minimum(p[:, a], p[:, b]), np.maximum(p[:, a], p[:, b])
    pairs = np.bincount(lo * n + hi, minlength=n * n).reshape(n, n)[iu]
    assert pairs.sum() == samples  # distinct rows
    pvals.append(_p_value(pairs))
  return pvals


@pytest.mark.parametrize("n", [5, 12])
def test_permute_windows_are_uniform(n):
  """First position uniform over rows; the unordered pairs at positions
  (0, 1) and (n - 2, n - 1) uniform over pairs (chi-square, 300,000 seeds)."""
  p0, p01, pt = _uniformity(n, 300_000, [0, 1, n - 2, n - 1])
  assert min(p0, p01, pt) > 1e-4, (p0, p01, pt)


def test_permute_all_permutations_of_4_are_uniform():
  seeds = jax.random.bits(jax.random.key(5), (240_000, 1), jnp.uint32)
  p = np.asarray(jax.jit(fd.permute)(seeds, jnp.arange(4)[None, :], 4))
  code = (p * 4 ** np.arange(4)).sum(1)
  perms = [sum(q[i] * 4**i for i in range(4))
           for q in itertools.permutations(range(4))]
  counts = np.bincount(code, minlength=256)[perms]
  assert counts.sum() == len(p)
  assert _p_value(counts) > 1e-4


def test_uniformity_test_has_power(monkeypatch):
  """The same test rejects swap-or-not cut to 4 rounds."""
  monkeypatch.setattr(fd, "ROUNDS", 4)
  assert min(_uniformity(12, 300_000, [0, 1, 10, 11], fresh=True)) < 1e-4


# ------------------------------------------------------------ example rows
def test_shuffle_seeds_depend_on_key_and_id_only():
  key = jax.random.key(3)
  a = fd.shuffle_seeds(key, jnp.array([3, 5, 9]))
  b = fd.shuffle_seeds(key, jnp.array([[9, 3]]))
  assert a.dtype == jnp.uint32 and b.shape == (1, 2)
  assert b.tolist() == [[int(a[2]), int(a[0])]]
  assert len(set(a.tolist())) == 3
  assert (fd.shuffle_seeds(jax.random.key(4), jnp.array([3, 5, 9])) != a).all()


def test_example_rows_against_numpy(digits):
  rng = np.random.default_rng(4)
  sizes = list(rng.integers(1, 60, 25)) + [1, 2]
  parts = _random_parts(rng, len(digits.y_train), sizes)
  host = fd.from_partition(digits.x_train, digits.y_train, parts)
  dev = jax.device_put(host)
  client = rng.integers(0, len(parts), 2000).astype(np.int32)
  pos = rng.integers(0, 500, 2000).astype(np.int32)
  all_seeds = fd.shuffle_seeds(jax.random.key(9), jnp.arange(len(parts)))
  seed = np.asarray(all_seeds)[client]
  got = jax.jit(fd.example_rows)(dev, client, seed, pos)
  n = np.array(sizes)[client]
  j = _np_permute(seed, pos % n, n)
  want = [parts[c][i] for c, i in zip(client, j)]
  np.testing.assert_array_equal(got, want)
  # the kernel's use: vmapped over lanes, a [mu] window per step
  b, steps = 7, 9
  lanes = jnp.array([0, 5, 26], jnp.int32)
  win = jax.jit(jax.vmap(lambda c, s: jax.vmap(
      lambda t: fd.example_rows(dev, c, s, t * b + jnp.arange(b)))(
          jnp.arange(steps))))(lanes, all_seeds[lanes])
  for c, w in zip(lanes.tolist(), np.asarray(win)):
    n = sizes[c]
    stream = parts[c][_np_permute(int(all_seeds[c]), np.arange(steps * b) % n,
                                  n)]
    np.testing.assert_array_equal(w.reshape(-1), stream)
    if n >= b:  # a window of b <= n positions is b distinct rows
      assert all(len(set(row)) == b for row in w.tolist())


# ----------------------------------------------------------------- memory
def _nbytes(tree):
  return sum(a.nbytes for a in jax.tree.leaves(tree))


@pytest.mark.parametrize("layout", ["iid", "lognormal"])
def test_device_memory_is_the_raw_examples(digits, layout):
  x, y = digits.x_train, digits.y_train
  if layout == "iid":
    parts = partition.iid(len(y), 50, seed=0)
  else:
    parts = partition.quantity(len(y), 200, 0, "lognormal", sigma=2.0,
                               min_examples=1)
  data = jax.device_put(fd.from_partition(x, y, parts))
  raw = x.nbytes + y.nbytes
  n = len(parts)
  assert _nbytes(data) <= 1.1 * raw + 8 * n
  assert _nbytes(data) == raw + 4 * len(y) + 8 * n  # rows, offset, sizes
  if layout == "lognormal":  # the padded layout would take 5x more
    assert n * max(len(p) for p in parts) * (x[0].nbytes + 4) > 5 * raw


# ------------------------------------------------------- 8 devices, 2 hosts
def _subprocess_env(devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                      f"_device_count={devices}").strip()
  return env


def test_8_devices_hold_client_ranges(tmp_path):
  out = tmp_path / "report.json"
  proc = subprocess.run([sys.executable, __file__, "devices", str(out)],
                        env=_subprocess_env(DEVICES), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  report = json.loads(out.read_text())
  assert report["devices"] == DEVICES
  assert report["checks"] == "ok", report["checks"]
  d, rows, big = DEVICES, report["rows"], report["max_client"]
  per = (rows + report["padding_rows"]) // d
  assert max(-(-rows // d), big) <= per <= -(-rows // d) + big - 1


def _min_max_ranges(sizes, d):
  """The least largest-range row count over contiguous splits (DP)."""
  cum = np.concatenate([[0], np.cumsum(sizes)])
  n = len(sizes)
  best = [0] + [np.inf] * n  # best[k]: first k clients in the ranges so far
  for _ in range(d):
    best = [min(max(best[j], cum[k] - cum[j]) for j in range(k + 1))
            for k in range(n + 1)]
  return best[n]


@pytest.mark.parametrize("seed", range(6))
def test_client_ranges_are_contiguous_and_least_full(seed):
  rng = np.random.default_rng(seed)
  sizes = np.maximum(1, rng.lognormal(1.0, 1.5, rng.integers(1, 25))
                     ).astype(int)
  d = int(rng.integers(1, 9))
  bounds = distributed.client_ranges(sizes, d)
  assert bounds[0] == 0 and bounds[-1] == len(sizes) and len(bounds) == d + 1
  assert (np.diff(bounds) >= 0).all()
  cum = np.concatenate([[0], np.cumsum(sizes)])
  assert np.diff(cum[bounds]).max() == _min_max_ranges(sizes, d)


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_2_processes_build_only_their_shards(tmp_path):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, __file__, "process", str(tmp_path / f"p{i}.json"),
       str(port), str(i)], env=_subprocess_env(2), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outs = [p.communicate(timeout=240) for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, o[-2000:] + e[-4000:]
  reports = [json.loads((tmp_path / f"p{i}.json").read_text())
             for i in range(2)]
  built = [r["built"] for r in reports]
  assert sorted(built[0] + built[1]) == [0, 1, 2, 3]
  assert not set(built[0]) & set(built[1])
  for r in reports:
    assert r["checks"] == "ok", r["checks"]


# ------------------------------------------------------------- the scripts
def _skewed_parts(num_clients, seed):
  digits = datasets.digits()
  parts = partition.quantity(len(digits.y_train), num_clients, seed,
                             "lognormal", sigma=2.0, min_examples=1)
  return digits, parts


def _check_layout(data, x, y, parts, axis_size):
  """Every client's examples as given; each shard only its range's rows."""
  rows, offset = distributed.to_host((data.rows, data.offset))
  sizes = np.array([len(p) for p in parts])
  total = int(sizes.sum())
  per = data.x.shape[0] // axis_size
  bounds = distributed.client_ranges(sizes, axis_size)
  cum = np.concatenate([[0], np.cumsum(sizes)])
  assert per == max(1, int(np.diff(cum[bounds]).max()))
  assert per < total  # no device holds every client's rows
  assert data.x.sharding.spec[0] == "clients"
  for a in (data.rows, data.offset, data.num_examples):
    assert a.sharding.is_fully_replicated
  for shard, yshard in zip(data.x.addressable_shards,
                           data.y.addressable_shards):
    d = shard.index[0].start // per
    mine = np.concatenate([np.zeros(0, int)] + list(parts[bounds[d]:
                                                          bounds[d + 1]]))
    want = np.zeros((per,) + x.shape[1:], np.float32)
    want[:len(mine)] = x[mine]
    np.testing.assert_array_equal(np.asarray(shard.data), want)
    np.testing.assert_array_equal(np.asarray(yshard.data)[:len(mine)],
                                  y[mine])
    for k in range(bounds[d], bounds[d + 1]):  # its clients' rows point here
      assert (rows[offset[k]:offset[k] + sizes[k]] // per == d).all()
  return per * axis_size - total


def _devices_main(path):
  report = dict(devices=jax.device_count())
  try:
    digits, parts = _skewed_parts(40, seed=1)
    x, y = digits.x_train, digits.y_train
    mesh = distributed.make_mesh("clients")
    data = distributed.ragged_client_data(x, y, parts, mesh, "clients")
    report["padding_rows"] = _check_layout(data, x, y, parts, DEVICES)
    report["rows"] = int(sum(len(p) for p in parts))
    report["max_client"] = max(len(p) for p in parts)
    host = distributed.to_host(data)
    for k, p in enumerate(parts):
      np.testing.assert_array_equal(host.x[fd.client_rows(host, k)], x[p])
      np.testing.assert_array_equal(host.y[fd.client_rows(host, k)], y[p])
    # the same examples as the one-device layout, read on device
    one = jax.device_put(fd.from_partition(x, y, parts), jax.devices()[0])
    rng = np.random.default_rng(0)
    client = jnp.asarray(rng.integers(0, len(parts), (64, 1)), jnp.int32)
    seeds = fd.shuffle_seeds(jax.random.key(2), client)
    pos = jnp.asarray(rng.integers(0, 300, (64, 16)), jnp.int32)
    read = jax.jit(lambda d, c, s, q: d.x[fd.example_rows(d, c, s, q)])
    np.testing.assert_array_equal(read(data, client, seeds, pos),
                                  read(one, client, seeds, pos))
    hlo = read.lower(data, client, seeds, pos).compile().as_text()
    assert "all-gather" not in hlo, "x was gathered whole"
    # more devices than clients: empty ranges
    few = distributed.ragged_client_data(x, y, parts[:5], mesh, "clients")
    _check_layout(few, x, y, parts[:5], DEVICES)
    # one device: from_partition moved to the device
    plain = distributed.ragged_client_data(x, y, parts, None, "clients")
    np.testing.assert_array_equal(plain.rows, one.rows)
    report["checks"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    report["checks"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
  with open(path, "w") as fh:
    json.dump(report, fh)


def _process_main(path, port, pid):
  distributed.initialize(f"127.0.0.1:{port}", 2, pid)
  report = dict(built=[])
  try:
    digits, parts = _skewed_parts(30, seed=2)
    x, y = digits.x_train, digits.y_train
    mesh = distributed.make_mesh("clients")
    assert mesh.devices.size == 4 and len(jax.local_devices()) == 2
    data = distributed.ragged_client_data(x, y, parts, mesh, "clients")
    assert not data.x.is_fully_addressable
    per = data.x.shape[0] // 4
    report["built"] = sorted(s.index[0].start // per
                             for s in data.x.addressable_shards)
    _check_layout(data, x, y, parts, 4)
    report["checks"] = "ok"
  except Exception as e:  # pylint: disable=broad-except
    import traceback  # pylint: disable=g-import-not-at-top
    report["checks"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
  with open(path, "w") as fh:
    json.dump(report, fh)
  distributed.sync("done")


if __name__ == "__main__":
  if sys.argv[1] == "devices":
    _devices_main(sys.argv[2])
  else:
    _process_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
