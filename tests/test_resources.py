"""Tests for fedjax_bsa.setup.resources: profiles, trace loading, validation."""

import json
import os
import pickle

import numpy as np
import pytest

from fedjax_bsa.core import registry
from fedjax_bsa.core.config import Config
from fedjax_bsa.setup import experiment
from fedjax_bsa.setup import resources
from fedjax_bsa.setup.resources import (DEFAULT_TIERS, ClientResources,
                                  describe, load_trace, make_resources)

PROFILES = ("uniform", "lognormal", "tiers", "trace")

_DTYPES = {"speed": np.float32, "step_overhead": np.float32,
           "memory_cap": np.int32, "bandwidth_up": np.float32,
           "bandwidth_down": np.float32, "latency": np.float32,
           "availability": np.float32, "tier": np.int32}

# FedScale-format trace: client id -> (ms per sample, kbps).
_TRACE = {3: (2.0, 800.0), 1: (4.0, 80.0), 7: (0.5, 12000.0)}
# Expected values for clients in sorted-id order (1, 3, 7).
_SPEED = np.array([1000 / 4.0, 1000 / 2.0, 1000 / 0.5])
_BW = np.array([80.0, 800.0, 12000.0]) * 125.0


def _write_trace(tmp_path, fmt, with_availability=False):
  path = os.path.join(tmp_path, f"trace.{fmt}")
  avail = {1: 0.5, 3: 1.0, 7: 0.25}
  recs = {cid: {"computation": ms, "communication": kbps}
          for cid, (ms, kbps) in _TRACE.items()}
  if with_availability:
    for cid in recs:
      recs[cid]["availability"] = avail[cid]
  if fmt == "pkl":
    with open(path, "wb") as f:
      pickle.dump(recs, f)
  elif fmt == "json":
    with open(path, "w") as f:
      json.dump([{"client_id": c, **r} for c, r in recs.items()], f)
  else:
    cols = ["client_id", "computation", "communication"]
    cols += ["availability"] if with_availability else []
    lines = [",".join(cols)]
    for cid, r in recs.items():
      lines.append(",".join(str(v) for v in [cid, *r.values()]))
    with open(path, "w") as f:
      f.write("\n".join(lines) + "\n")
  return path


# ---------------------------------------------------------------- profiles ---

@pytest.mark.parametrize("profile", ["uniform", "lognormal", "tiers"])
def test_shapes_and_dtypes(profile):
  res = make_resources(profile, 37, seed=0)
  assert isinstance(res, ClientResources)
  for name, dtype in _DTYPES.items():
    field = getattr(res, name)
    assert isinstance(field, np.ndarray), name
    assert field.shape == (37,), name
    assert field.dtype == dtype, name


def test_profiles_registered_with_their_properties():
  assert registry.RESOURCE_PROFILES.names()[:4] == PROFILES
  assert registry.RESOURCE_PROFILES.get("tiers") is resources.from_tiers
  assert [registry.RESOURCE_PROFILES.prop(p, "reads_file")
          for p in PROFILES] == [False, False, False, True]
  assert [registry.RESOURCE_PROFILES.prop(p, "tier_table")
          for p in PROFILES] == [None, None, resources.DEFAULT_TIERS, None]


@pytest.mark.parametrize("profile", ["uniform", "lognormal", "tiers"])
def test_a_config_builds_what_the_arguments_build(profile):
  # the simulator gives the profile the config with seed + 1
  cfg = Config(resources=profile, seed=4, base_speed=300.0, speed_sigma=0.7,
               memory_cap=64, memory_sigma=0.3, bandwidth=2e5,
               availability=0.9, step_overhead=0.02)
  got = experiment.make_resources(cfg, 23)
  want = make_resources(profile, 23, 5, base_speed=300.0, speed_sigma=0.7,
                        memory_cap=64, memory_sigma=0.3, bandwidth=2e5,
                        availability=0.9, step_overhead=0.02)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_uniform_is_constant_and_uses_arguments():
  res = make_resources("uniform", 10, seed=3, base_speed=123.0,
                       step_overhead=0.02, memory_cap=64, bandwidth=5e5,
                       availability=0.75, latency=0.1)
  np.testing.assert_array_equal(res.speed, np.full(10, 123.0, np.float32))
  np.testing.assert_allclose(res.step_overhead, 0.02)
  np.testing.assert_array_equal(res.memory_cap, 64)
  np.testing.assert_array_equal(res.bandwidth_up, 5e5)
  np.testing.assert_array_equal(res.bandwidth_down, 5e5)
  np.testing.assert_allclose(res.latency, 0.1)
  np.testing.assert_array_equal(res.availability, 0.75)
  np.testing.assert_array_equal(res.tier, 0)


def test_lognormal_log_std_matches_sigma():
  n, sigma = 20000, 0.7
  res = make_resources("lognormal", n, seed=1, base_speed=500.0,
                       speed_sigma=sigma, bandwidth=2e6)
  log_speed = np.log(res.speed / 500.0)
  assert abs(np.std(log_speed) - sigma) < 0.03
  assert abs(np.mean(log_speed)) < 0.03
  log_bw = np.log(res.bandwidth_up / 2e6)
  assert abs(np.std(log_bw) - sigma) < 0.03
  np.testing.assert_array_equal(res.bandwidth_up, res.bandwidth_down)
  # Bandwidth is drawn independently of speed.
  assert abs(np.corrcoef(log_speed, log_bw)[0, 1]) < 0.05
  np.testing.assert_array_equal(res.memory_cap, 256)  # memory_sigma=0


def test_lognormal_memory_sigma():
  res = make_resources("lognormal", 20000, seed=2, memory_cap=100,
                       memory_sigma=0.5)
  assert res.memory_cap.min() >= 1
  assert abs(np.std(np.log(res.memory_cap / 100.0)) - 0.5) < 0.03
  tiny = make_resources("lognormal", 2000, seed=2, memory_cap=1,
                        memory_sigma=3.0)
  assert tiny.memory_cap.min() == 1  # rounded, never below 1


def test_lognormal_zero_sigma_is_uniform():
  res = make_resources("lognormal", 50, seed=0, speed_sigma=0.0)
  np.testing.assert_array_equal(res.speed, 1000.0)
  np.testing.assert_array_equal(res.bandwidth_up, 1e6)


@pytest.mark.parametrize("n", [1000, 9, 7, 1])
def test_default_tiers_shares_match(n):
  res = make_resources("tiers", n, seed=0, base_speed=100.0,
                       step_overhead=0.2)
  counts = np.bincount(res.tier, minlength=3)
  assert counts.sum() == n
  shares = np.array([t["share"] for t in DEFAULT_TIERS])
  assert np.all(np.abs(counts - shares * n) < 1.0)
  for i, t in enumerate(DEFAULT_TIERS):
    sel = res.tier == i
    np.testing.assert_allclose(res.speed[sel], 100.0 * t["speed"], rtol=1e-6)
    np.testing.assert_allclose(res.step_overhead[sel],
                               0.2 * t["overhead_scale"], rtol=1e-6)
    np.testing.assert_array_equal(res.memory_cap[sel], t["memory_cap"])
    np.testing.assert_allclose(res.bandwidth_down[sel], t["bandwidth"])
    np.testing.assert_allclose(res.bandwidth_up[sel], t["bandwidth_up"])
  expected = {1000: [532, 464, 4], 9: [5, 4, 0]}  # largest remainder
  if n in expected:
    assert counts.tolist() == expected[n]


def test_default_tiers_are_flash_femnist_measurements():
  # FLASH (Yang et al., WWW 2021) per-batch times of the FEMNIST CNN, batch
  # 10: 1642, 588, 179 ms; shares 18820 : 16428 : 159; median bandwidths.
  ms = [1642.0, 588.0, 179.0]
  assert resources.FLASH_FEMNIST_MS_PER_BATCH == tuple(ms)
  assert [t["name"] for t in DEFAULT_TIERS] == ["low", "mid", "high"]
  for t, m, w in zip(DEFAULT_TIERS, ms, [18820, 16428, 159]):
    assert t["speed"] == pytest.approx(588.0 / m, rel=1e-12)
    assert t["overhead_scale"] == pytest.approx(m / 588.0, rel=1e-12)
    assert t["share"] == pytest.approx(w / 35407, rel=1e-12)
    assert t["bandwidth"] == pytest.approx(4317.628571428571 * 1024)
    assert t["bandwidth_up"] == pytest.approx(3285.6857142857143 * 1024)
  assert resources.FEMNIST_CNN_PARAMS == (
      5 * 5 * 32 + 32 + 5 * 5 * 32 * 64 + 64 + 7 * 7 * 64 * 2048 + 2048
      + 2048 * 62 + 62)
  # Whatever the overhead / per-example split, a step of batch 10 costs the
  # measured per-batch time once the middle tier is set to 0.588 s.
  for phi in (0.1, 0.5, 0.75):
    res = make_resources("tiers", 1000, seed=1, step_overhead=phi * 0.588,
                         base_speed=10.0 / ((1.0 - phi) * 0.588))
    step = res.step_overhead.astype(np.float64) + 10.0 / res.speed
    for i, m in enumerate(ms):
      np.testing.assert_allclose(step[res.tier == i], m / 1000.0, rtol=1e-6)
    # uniform slow-down: overhead * speed is the same on every tier
    np.testing.assert_allclose(res.step_overhead * res.speed,
                               10.0 * phi / (1.0 - phi), rtol=1e-5)


def _doc_tier_table():
  path = os.path.join(os.path.dirname(__file__), "..", "docs", "devices.md")
  with open(path, encoding="utf-8") as f:
    text = f.read()
  body = text.split("<!-- tiers:begin -->")[1].split("<!-- tiers:end -->")[0]
  rows = [[c.strip() for c in line.strip().strip("|").split("|")]
          for line in body.strip().splitlines()]
  header, rows = rows[0], [r for r in rows[2:]]
  return [dict(zip(header, r)) for r in rows]


def test_docs_tier_table_matches_default_tiers():
  rows = _doc_tier_table()
  assert [r["name"] for r in rows] == [t["name"] for t in DEFAULT_TIERS]
  for r, t in zip(rows, DEFAULT_TIERS):
    for key, doc_key in (("share", "share"), ("speed", "speed"),
                         ("overhead_scale", "overhead_scale"),
                         ("bandwidth", "bandwidth_down"),
                         ("bandwidth_up", "bandwidth_up")):
      assert float(r[doc_key]) == pytest.approx(t[key], rel=1e-6), key
    assert int(r["memory_cap"]) == t["memory_cap"]
  # and the builder applies them as documented
  res = make_resources("tiers", 5000, seed=2, base_speed=50.0,
                       step_overhead=0.1)
  for i, r in enumerate(rows):
    sel = res.tier == i
    assert sel.any()
    np.testing.assert_allclose(res.speed[sel], 50.0 * float(r["speed"]),
                               rtol=2e-6)
    np.testing.assert_allclose(res.step_overhead[sel],
                               0.1 * float(r["overhead_scale"]), rtol=2e-6)
    np.testing.assert_allclose(res.bandwidth_down[sel],
                               float(r["bandwidth_down"]), rtol=2e-6)
    np.testing.assert_allclose(res.bandwidth_up[sel],
                               float(r["bandwidth_up"]), rtol=2e-6)
    np.testing.assert_array_equal(res.memory_cap[sel], int(r["memory_cap"]))
  speeds = [float(r["speed"]) for r in rows]
  assert speeds == sorted(speeds)  # low, mid, high
  assert all(0.0 < float(r["share"]) < 1.0 for r in rows)


def test_tier_overhead_scale_and_absolute_overhead():
  table = [
      {"name": "a", "share": 1, "speed": 1.0, "memory_cap": 4,
       "bandwidth": 1e3, "overhead_scale": 3.0},
      {"name": "b", "share": 1, "speed": 1.0, "memory_cap": 4,
       "bandwidth": 1e3, "step_overhead": 0.7, "bandwidth_down": 5e3},
      {"name": "c", "share": 1, "speed": 1.0, "memory_cap": 4,
       "bandwidth": 1e3, "bandwidth_up": 2e3, "device": "any text"},
  ]
  res = make_resources("tiers", 30, seed=0, step_overhead=0.1, tiers=table)
  a, b, c = (res.tier == i for i in range(3))
  np.testing.assert_allclose(res.step_overhead[a], 0.3, rtol=1e-6)
  np.testing.assert_allclose(res.step_overhead[b], 0.7, rtol=1e-6)
  np.testing.assert_allclose(res.step_overhead[c], 0.1, rtol=1e-6)
  np.testing.assert_allclose(res.bandwidth_down[b], 5e3)
  np.testing.assert_allclose(res.bandwidth_up[b], 1e3)
  np.testing.assert_allclose(res.bandwidth_up[c], 2e3)
  np.testing.assert_allclose(res.bandwidth_down[c], 1e3)
  both = [dict(table[0], step_overhead=0.5)]
  with pytest.raises(ValueError, match="overhead_scale.*step_overhead|"
                     "step_overhead.*overhead_scale"):
    make_resources("tiers", 3, 0, tiers=both)
  with pytest.raises(ValueError, match="overhead_scale"):
    make_resources("tiers", 3, 0, tiers=[dict(table[0], overhead_scale=-1)])
  with pytest.raises(ValueError, match="bandwidth_up"):
    make_resources("tiers", 3, 0, tiers=[dict(table[2], bandwidth_up=0.0)])


def test_custom_tiers_override_and_optional_fields():
  table = [
      {"name": "a", "share": 1, "speed": 2.0, "memory_cap": 8,
       "bandwidth": 10.0, "latency": 0.5, "availability": 0.5},
      {"name": "b", "share": 3, "speed": 0.5, "memory_cap": 16,
       "bandwidth": 20.0},
  ]
  res = make_resources("tiers", 100, seed=5, tiers=table, latency=0.1)
  assert np.bincount(res.tier).tolist() == [25, 75]  # shares normalized
  a, b = res.tier == 0, res.tier == 1
  np.testing.assert_allclose(res.speed[a], 2000.0)
  np.testing.assert_allclose(res.latency[a], 0.5)
  np.testing.assert_allclose(res.latency[b], 0.1)
  np.testing.assert_allclose(res.availability[a], 0.5)
  np.testing.assert_allclose(res.availability[b], 1.0)
  np.testing.assert_array_equal(res.memory_cap[b], 16)


@pytest.mark.parametrize("profile", ["lognormal", "tiers"])
def test_seeded_reproducibility(profile):
  a = make_resources(profile, 200, seed=11)
  b = make_resources(profile, 200, seed=11)
  c = make_resources(profile, 200, seed=12)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  differs = [not np.array_equal(x, z) for x, z in zip(a, c)]
  assert any(differs)


@pytest.mark.parametrize("name, value", [
    ("num_clients", 0), ("num_clients", 2.5), ("base_speed", 0.0),
    ("base_speed", float("nan")), ("speed_sigma", -0.1),
    ("step_overhead", -1.0), ("memory_cap", 0), ("memory_cap", 3.5),
    ("memory_sigma", -1.0), ("bandwidth", 0.0), ("bandwidth", -5.0),
    ("availability", 0.0), ("availability", 1.5), ("latency", -0.1),
])
def test_bad_arguments_name_the_argument(name, value):
  kwargs = {"num_clients": 10}
  kwargs[name] = value
  n = kwargs.pop("num_clients")
  with pytest.raises(ValueError, match=name) as e:
    make_resources("lognormal", n, 0, **kwargs)
  assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_unknown_profile_lists_allowed():
  with pytest.raises(ValueError, match="gaussian") as e:
    make_resources("gaussian", 10, 0)
  assert "resources='gaussian'" in str(e.value)
  for p in PROFILES:
    assert p in str(e.value)


@pytest.mark.parametrize("table, needle", [
    ([{"name": "x", "share": 1.0, "speed": 1.0, "memory_cap": 4}],
     "bandwidth"),
    ([{"name": "x", "share": -1.0, "speed": 1.0, "memory_cap": 4,
       "bandwidth": 1.0}], "share"),
    ([{"name": "x", "share": 1.0, "speed": 1.0, "memory_cap": 4,
       "bandwidth": 1.0, "color": "red"}], "color"),
    ([], "tiers"),
])
def test_bad_tier_tables(table, needle):
  with pytest.raises(ValueError, match=needle):
    make_resources("tiers", 10, 0, tiers=table)


def test_profile_specific_arguments_are_checked():
  with pytest.raises(ValueError, match="tiers"):
    make_resources("uniform", 10, 0, tiers=DEFAULT_TIERS)
  with pytest.raises(ValueError, match="trace_path"):
    make_resources("uniform", 10, 0, trace_path="x.pkl")
  with pytest.raises(ValueError, match="trace_path"):
    make_resources("trace", 10, 0)
  make_resources("uniform", 10, 0, trace_path="")  # a config's unset value
  with pytest.raises(ValueError, match="resources=lognormal: trace_path"):
    experiment.make_resources(Config(trace_path="x.pkl"), 10)


def test_describe():
  res = make_resources("tiers", 10, seed=0, base_speed=100.0)
  d = describe(res)
  assert d["num_clients"] == 10
  assert d["tier_counts"] == {0: 5, 1: 5}  # the fast tier is 0.45 %
  assert d["speed"]["min"] == pytest.approx(100.0 * 588 / 1642, rel=1e-6)
  assert d["speed"]["max"] == pytest.approx(100.0)
  assert d["memory_cap"]["max"] == 128
  d = describe(make_resources("tiers", 1000, seed=0, base_speed=100.0))
  assert d["speed"]["max"] == pytest.approx(100.0 * 588 / 179, rel=1e-6)
  assert d["memory_cap"]["max"] == 512
  assert set(d) >= {"speed", "memory_cap", "bandwidth_up", "bandwidth_down",
                    "availability_mean", "tier_counts"}


# ------------------------------------------------------------------- trace ---

@pytest.mark.parametrize("fmt", ["pkl", "json", "csv"])
def test_trace_units(tmp_path, fmt):
  path = _write_trace(tmp_path, fmt)
  res = make_resources("trace", 3, seed=0, trace_path=path, memory_cap=32,
                       step_overhead=0.05, availability=0.9)
  np.testing.assert_allclose(res.speed, _SPEED, rtol=1e-6)
  np.testing.assert_allclose(res.bandwidth_up, _BW, rtol=1e-6)
  np.testing.assert_allclose(res.bandwidth_down, _BW, rtol=1e-6)
  np.testing.assert_array_equal(res.memory_cap, 32)
  np.testing.assert_allclose(res.step_overhead, 0.05)
  np.testing.assert_allclose(res.availability, 0.9)
  for name, dtype in _DTYPES.items():
    assert getattr(res, name).dtype == dtype


def test_trace_json_dict_with_string_keys(tmp_path):
  path = os.path.join(tmp_path, "trace.json")
  with open(path, "w") as f:
    json.dump({str(c): {"computation": ms, "communication": kb}
               for c, (ms, kb) in _TRACE.items()}, f)
  res = make_resources("trace", 3, 0, trace_path=path)
  np.testing.assert_allclose(res.speed, _SPEED, rtol=1e-6)


def test_trace_numpy_scalars_and_unknown_extension(tmp_path):
  path = os.path.join(tmp_path, "device_info")  # FedScale ships no suffix
  recs = {np.int64(c): {"computation": np.float64(ms),
                        "communication": np.float32(kb)}
          for c, (ms, kb) in _TRACE.items()}
  with open(path, "wb") as f:
    pickle.dump(recs, f)
  res = make_resources("trace", 3, 0, trace_path=path)
  np.testing.assert_allclose(res.bandwidth_up, _BW, rtol=1e-6)


@pytest.mark.parametrize("fmt", ["pkl", "csv"])
def test_trace_cyclic_assignment_and_availability(tmp_path, fmt):
  path = _write_trace(tmp_path, fmt, with_availability=True)
  res = make_resources("trace", 7, 0, trace_path=path)
  rows = np.arange(7) % 3
  np.testing.assert_allclose(res.speed, _SPEED[rows], rtol=1e-6)
  np.testing.assert_allclose(res.availability,
                             np.array([0.5, 1.0, 0.25])[rows])
  t = load_trace(path)
  assert t["client_id"].tolist() == [1, 3, 7]


def test_missing_trace_names_path(tmp_path):
  path = os.path.join(tmp_path, "nope.pkl")
  with pytest.raises(ValueError, match="nope.pkl"):
    make_resources("trace", 3, 0, trace_path=path)


@pytest.mark.parametrize("name, content", [
    ("bad.pkl", b"\x80\x04this is not a pickle"),
    ("bad.json", b"{not json"),
    ("bad.csv", b"id,ms\n1,2\n"),
    ("bad.bin", b"\x00\x01\x02garbage"),
    ("empty.json", b"{}"),
    ("list.json", b"[1, 2, 3]"),
])
def test_corrupt_trace_names_path(tmp_path, name, content):
  path = os.path.join(tmp_path, name)
  with open(path, "wb") as f:
    f.write(content)
  with pytest.raises(ValueError) as e:
    make_resources("trace", 3, 0, trace_path=path)
  assert path in str(e.value)


@pytest.mark.parametrize("record, needle", [
    ({"computation": -1.0, "communication": 10.0}, "computation"),
    ({"computation": 1.0, "communication": 0.0}, "communication"),
    ({"computation": 1.0}, "communication"),
    ({"computation": 1.0, "communication": 1.0, "availability": 2.0},
     "availability"),
])
def test_trace_bad_values_name_path_and_field(tmp_path, record, needle):
  path = os.path.join(tmp_path, "t.pkl")
  with open(path, "wb") as f:
    pickle.dump({0: record}, f)
  with pytest.raises(ValueError, match=needle) as e:
    make_resources("trace", 3, 0, trace_path=path)
  assert path in str(e.value)


def test_trace_pickle_refuses_code(tmp_path):
  path = os.path.join(tmp_path, "evil.pkl")
  with open(path, "wb") as f:
    pickle.dump({0: {"computation": os.getcwd, "communication": 1.0}}, f)
  with pytest.raises(ValueError, match="disallowed"):
    resources.load_trace(path)
