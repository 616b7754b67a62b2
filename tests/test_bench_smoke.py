"""Smoke tests of the benchmarks (fedjax_bsa.bench): the quick kernel and
sweep benchmarks write consistent reports; the figures are exact on a
hand-made plan."""

import doctest
import json
import pathlib
import sys

import jax
import numpy as np
import pytest

from fedjax_bsa.bench import harness
from fedjax_bsa.bench.kernel import baselines
from fedjax_bsa.bench.kernel import figures
from fedjax_bsa.bench.kernel import main as kernel_main
from fedjax_bsa.bench.kernel import methods
from fedjax_bsa.bench.kernel import scenarios
from fedjax_bsa.bench.sweep import main as sweep_main


def test_padding_efficiency_is_exact_on_a_hand_made_plan():
  # mu = 16, L = 2. Slots per step ceil(b / 16) = [1, 2, 1], slots per job
  # s * m = [2, 2, 3]. Longest first: job 2 (3 slots) -> lane 0, job 0 (2)
  # -> lane 1, job 1 (2) -> lane 1 (load 2 < 3): loads [3, 4]; 4 slot steps
  # x 2 lanes = 8 microbatches = 128 example slots. Useful: 16 * 2 + 32 +
  # 8 * 3 = 88. Padded: K * s_max * b_max = 3 * 3 * 32 = 288.
  mix = scenarios.custom_mix([16, 32, 8], [2, 1, 3])
  w = methods.workload(mix)
  fn = jax.jit(baselines.kernel_fn(w.model, microbatch=16, lanes=2))
  out = fn(*w.args)
  assert (int(out.useful), int(out.slots)) == (88, 8)
  assert figures.kernel_efficiency(out, 16) == 88 / 128
  assert figures.padded_efficiency(mix.batch_size, mix.steps) == 88 / 288
  assert mix.padded_efficiency() == 88 / 288
  np.testing.assert_allclose(mix.weights, np.array([32, 32, 24]) / 88,
                             rtol=1e-6)


def test_mixes_follow_the_recipe():
  mix = scenarios.standard_mix()
  b, s = mix.batch_size, mix.steps
  assert mix.num_jobs == 64
  assert (b % scenarios.MU == 0).all() and b.min() >= 16 and b.max() <= 256
  assert s.min() >= 1 and abs(int((b * s).max()) - 2048) <= 256
  raw = scenarios.standard_mix(quantize=False)
  assert raw.batch_size.min() >= 8 and raw.batch_size.max() <= 256
  np.testing.assert_array_equal(scenarios.standard_mix().batch_size, b)
  u = scenarios.uniform_mix()
  assert (u.batch_size == 10).all() and (u.steps == 25).all()
  assert (np.asarray(u.data.num_examples) == 256).all()
  assert u.useful_examples == 64 * 250


@pytest.mark.parametrize("module", [harness, figures, scenarios, baselines,
                                    sweep_main])
def test_docstring_examples(module):
  failures, tried = doctest.testmod(module, verbose=False)
  assert tried >= 1 and failures == 0


def test_fedjax_is_skipped_without_the_repositorys_script(tmp_path,
                                                         monkeypatch):
  """FedJAX's runner is the repository's (the package imports neither FedJAX
  nor Haiku): found from a checkout wherever the command runs, at a path
  given, and when absent the baseline is skipped with one line."""
  monkeypatch.chdir(tmp_path)
  repo = pathlib.Path(__file__).resolve().parent.parent
  assert baselines.fedjax_script() == str(repo / baselines.FEDJAX_SCRIPT)
  assert baselines.fedjax_script(str(tmp_path / "none.py")) is None
  lines = []
  assert baselines.run_fedjax(sys.executable, None, None, 1, 8,
                              log=lines.append) is None
  assert len(lines) == 1 and "skipped" in lines[0], lines
  assert "--fedjax-script" in lines[0] and "\n" not in lines[0]


def test_quick_kernel_benchmark_report(tmp_path):
  rc = kernel_main.main(["--quick", "--out", str(tmp_path), "--mixes",
                         "standard", "--lanes", "2", "--rounds", "3",
                         "--machine", "test"])
  assert rc == 0
  rep = json.loads((tmp_path / "round_kernel_test_quick.json").read_text())
  assert (tmp_path / "round_kernel_test_quick.md").exists()
  for key in ("machine", "versions", "timestamp", "matmul_peak",
              "loadavg_start", "loadavg_end", "compile_test", "headline"):
    assert key in rep, key
  assert rep["versions"]["jax"] == jax.__version__
  assert rep["matmul_peak"]["flops_per_s"] > 0
  assert rep["compile_test"]["compiles"] == 1
  s = rep["mixes"]["standard"]
  k, m = s["kernel"], s["mix"]
  # the efficiency is the exact count the kernel returned
  assert k["kernel_useful"] == m["useful_examples"]
  assert s["padding_efficiency"] == k["kernel_useful"] / (
      k["kernel_slots"] * k["microbatch"])
  assert s["padded"]["padding_efficiency"] == pytest.approx(
      m["useful_examples"] / (m["clients"] * m["s_max"] * m["b_max"]))
  t = lambda e: e["time_per_round_s"]["median"]
  assert s["speedup_vs_padded"] == pytest.approx(t(s["padded"]) / t(k))
  assert s["speedup_vs_naive_loop"] == pytest.approx(
      t(s["naive_loop"]) / t(k))
  assert s["noise_stats_overhead"] == pytest.approx(
      t(s["kernel_noise_stats"]) / t(k))
  rate = s["useful_examples_per_s"]
  assert rate["median"] == pytest.approx(m["useful_examples"] / t(k))
  assert rate["min"] <= rate["median"] <= rate["max"]
  peak = rep["matmul_peak"]["flops_per_s"]
  assert s["fraction_of_matmul_peak"] == pytest.approx(
      rate["median"] * s["flops_per_example"] / peak)
  assert s["flops_per_example"] == 6 * (64 * 256 + 256 * 10)
  assert s["kernel_unquantized"]["padding_efficiency"] < 1.0
  assert s["peak_memory_bytes"]["kernel"] > 0


def test_quick_sweep_benchmark_report(tmp_path):
  rc = sweep_main.main(["--quick", "--experiments", "2", "--rounds", "2",
                        "--reps", "1", "--controllers", "constant",
                        "--skip-chunks", "1",
                        "--measures", "compiled_loop", "--set",
                        "noise_stats=false",
                        "--out", str(tmp_path), "--machine", "test"])
  assert rc == 0
  rep = json.loads((tmp_path / "sweep_test_quick.json").read_text())
  r = rep["results"]["constant"]["compiled_loop"]
  assert r["experiments"] == 2 and r["rounds"] == 2
  assert r["timed_rounds"] == [3, 4]  # after one untimed chunk of 2
  assert r["packed"]["compiles"] == 1
  assert r["sequential"]["compiles"] == 1  # one program serves both runs
  assert r["speedup"] == pytest.approx(
      r["sequential"]["median"] / r["packed"]["median"])
  assert r["packed"]["experiment_rounds_per_s"] == pytest.approx(
      4 / r["packed"]["median"])
  assert 0 < r["packed"]["padding_efficiency"] <= 1
  assert rep["overrides"] == sweep_main.overrides(2)


def test_cli_hands_every_argument_to_the_benchmarks():
  from fedjax_bsa import cli  # pylint: disable=g-import-not-at-top
  p = cli._parser()  # pylint: disable=protected-access
  a = p.parse_args(["bench", "kernel", "--quick", "--out", "x"])
  assert (a.command, a.what, a.rest) == ("bench", "kernel",
                                         ["--quick", "--out", "x"])
  a = p.parse_args(["study", "--quick", "--out", "x", "-h"])
  assert (a.command, a.rest) == ("study", ["--quick", "--out", "x", "-h"])
