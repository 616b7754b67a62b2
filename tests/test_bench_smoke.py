"""Smoke test of the round-kernel benchmark (benchmarks/round_kernel.py)."""

import json
import os

import jax
import numpy as np
import pytest

from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa import models

from benchmarks import mixes
from benchmarks import round_kernel


@pytest.fixture(scope="module")
def mlp():
  model = models.make_model("mlp", (64,), 10, hidden=mixes.HIDDEN)
  return model, model.init(jax.random.key(0))


def test_padding_efficiency_is_exact_on_a_hand_made_plan(mlp):
  # mu = 16, L = 2. Slots per step m = ceil(b / 16) = [1, 2, 1], slots per
  # client s * m = [2, 2, 3]. Longest first: client 2 (3 slots) -> lane 0,
  # client 0 (2) -> lane 1, client 1 (2) -> lane 1 (load 2 < 3): loads
  # [3, 4], 4 slot steps x 2 lanes = 8 microbatches = 128 example slots.
  # Useful examples: 16 * 2 + 32 * 1 + 8 * 3 = 88.
  model, params = mlp
  mix = mixes.custom_mix([16, 32, 8], [2, 1, 3])
  assert mix.useful_examples == 88
  w = round_kernel.Workload(mix, model, params)
  fn = jax.jit(kernel_lib.make_round_kernel(model.apply, microbatch=16,
                                            lanes=2, noise_stats=False))
  out = fn(*w.args)
  assert int(out.useful) == 88
  assert int(out.slots) == 8
  assert round_kernel.kernel_efficiency(out, 16) == 88 / 128
  # padded: K * s_max * b_max = 3 * 3 * 32 = 288 example slots.
  assert round_kernel.padded_efficiency(mix.batch_size, mix.steps) == 88 / 288
  assert mix.padded_efficiency() == 88 / 288


def test_mixes_follow_the_recipe():
  mix = mixes.standard_mix()
  b, s = mix.batch_size, mix.steps
  assert mix.num_clients == 64
  assert (b % mixes.MU == 0).all() and b.min() >= 16 and b.max() <= 256
  assert s.min() >= 1
  assert abs(int((b * s).max()) - 2048) <= 256  # the fastest: ~2048
  raw = mixes.standard_mix(quantize=False)
  assert raw.batch_size.min() >= 8 and raw.batch_size.max() <= 256
  again = mixes.standard_mix()
  np.testing.assert_array_equal(again.batch_size, b)  # seeded
  u = mixes.uniform_mix()
  assert (u.batch_size == 10).all() and (u.steps == 16).all()
  assert u.useful_examples == 64 * 160


def test_quick_benchmark_writes_the_report(tmp_path):
  rc = round_kernel.main(["--quick", "--out", str(tmp_path), "--lanes", "2",
                          "--uniform-lanes", "2", "--rounds", "3",
                          "--machine", "test-machine"])
  assert rc == 0
  path = tmp_path / "round_kernel_test-machine.json"
  assert path.exists()
  assert (tmp_path / "round_kernel_test-machine.md").exists()
  rep = json.loads(path.read_text())
  for key in ("machine", "versions", "timestamp", "matmul_peak",
              "compile_test", "headline", "mixes"):
    assert key in rep, key
  for key in ("jax", "jaxlib", "python"):
    assert rep["versions"][key]
  assert rep["matmul_peak"]["flops_per_s"] > 0
  assert rep["compile_test"]["compiles"] == 1
  assert set(rep["mixes"]) == {"standard", "uniform"}
  for name, r in rep["mixes"].items():
    for key in ("padding_efficiency", "compiles", "useful_examples_per_s",
                "speedup_vs_padded", "speedup_vs_naive_loop",
                "speedup_vs_fedjax", "fraction_of_matmul_peak",
                "peak_memory_bytes"):
      assert key in r, (name, key)
    rate = r["useful_examples_per_s"]
    assert rate["min"] <= rate["median"] <= rate["max"]
    assert 0 < r["padding_efficiency"] <= 1
    assert r["speedup_vs_padded"] > 0 and r["speedup_vs_naive_loop"] > 0
  assert rep["mixes"]["uniform"]["speedup_vs_fedjax"] is None  # quick: off
  s = rep["mixes"]["standard"]
  k = s["kernel"]
  # efficiency is the exact count the kernel returned
  assert k["padding_efficiency"] == k["kernel_useful"] / (
      k["kernel_slots"] * mixes.MU)
  assert k["kernel_useful"] == s["mix"]["useful_examples"]
  m = s["mix"]
  assert s["padded"]["padding_efficiency"] == pytest.approx(
      m["useful_examples"] / (m["clients"] * m["s_max"] * m["b_max"]))
  assert s["noise_stats_overhead"] > 0
  assert rep["mixes"]["uniform"]["padding_efficiency"] == 1.0  # mu = 10
