"""fedjax_bsa.report.plot: PNGs of a real (tiny) run, comparison, errors, CLI."""

import os
import shutil

import matplotlib.image
import numpy as np
import pytest

from fedjax_bsa.core import registry
from fedjax_bsa.core.config import Config
from fedjax_bsa.report import plot
from fedjax_bsa.setup import resources

NAMES = ["accuracy.png", "batch_size.png", "noise_scale.png",
         "padding_efficiency.png"]


@pytest.fixture(scope="module")
def run_dir(finished_run):
  code, out = finished_run
  assert code == 0
  return str(out)


def _check_png(path):
  assert os.path.exists(path), path
  assert os.path.getsize(path) > 5000, f"{path}: suspiciously small"
  img = matplotlib.image.imread(path)
  assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 300
  assert float(np.std(img[..., :3])) > 0.01, f"{path}: blank image"


def test_plot_run_writes_valid_pngs(run_dir, tmp_path):
  out = tmp_path / "figs"
  paths = plot.plot_run(run_dir, str(out))
  assert [os.path.basename(p) for p in paths] == NAMES
  for p in paths:
    assert os.path.dirname(p) == str(out)
    _check_png(p)


def test_plot_run_default_out_dir(run_dir, tmp_path):
  copy = tmp_path / "run"
  shutil.copytree(run_dir, copy)
  paths = plot.plot_run(str(copy))
  assert paths == [str(copy / "plots" / n) for n in NAMES]
  for p in paths:
    _check_png(p)


def test_plot_run_without_clients_file(run_dir, tmp_path):
  """A run that wrote only metrics (e.g. interrupted) still plots."""
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(os.path.join(run_dir, "metrics.jsonl"), partial)
  paths = plot.plot_run(str(partial), str(tmp_path / "figs"))
  assert len(paths) == 4
  for p in paths:
    assert os.path.getsize(p) > 1000


def test_noise_plot_without_estimates(run_dir, tmp_path):
  run = tmp_path / "nonoise"
  shutil.copytree(run_dir, run)
  with np.load(run / "clients.npz") as z:
    clients = {k: z[k] for k in z.files}
  clients["b_simple"] = np.full_like(clients["b_simple"], np.nan)
  np.savez(run / "clients.npz", **clients)
  paths = plot.plot_run(str(run))
  _check_png(paths[2])


def test_load_run_contents(run_dir):
  run = plot.load_run(run_dir)
  assert [r["round"] for r in run.records] == [0, 10, 20, 30, 40]
  assert run.config["rounds"] == 40
  assert run.clients["batch"].shape == (40, 6)
  assert run.summary["num_clients"] == 30


def test_plot_compare(run_dir, tmp_path):
  other = tmp_path / "other"
  shutil.copytree(run_dir, other)
  out = tmp_path / "cmp" / "compare.png"
  got = plot.plot_compare({"a": run_dir, "b": str(other)}, str(out),
                          target=0.5)
  assert got == str(out)
  _check_png(got)
  got = plot.plot_compare([run_dir, str(other)], str(tmp_path / "c2.png"))
  _check_png(got)


def test_missing_dir_errors(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(ValueError, match="nope"):
    plot.plot_run(str(missing))
  empty = tmp_path / "empty_run"
  empty.mkdir()
  with pytest.raises(ValueError, match="empty_run.*metrics.jsonl"):
    plot.plot_run(str(empty))
  with pytest.raises(ValueError, match="empty_run"):
    plot.plot_compare({"x": str(empty)}, str(tmp_path / "c.png"))
  with pytest.raises(ValueError, match="no run directories"):
    plot.plot_compare({}, str(tmp_path / "c.png"))
  (empty / "metrics.jsonl").write_text("")
  with pytest.raises(ValueError, match="no records"):
    plot.plot_run(str(empty))


def test_truncated_last_line_is_tolerated(run_dir, tmp_path):
  run = tmp_path / "writing"
  shutil.copytree(run_dir, run)
  with open(run / "metrics.jsonl", "a") as fh:
    fh.write('{"round": 50, "sim_ti')
  assert len(plot.load_run(str(run)).records) == 5


def test_client_groups_tiers_and_terciles():
  base = Config(num_clients=60, clients_per_round=4).to_dict()
  tiers = plot.Run("x", dict(base, resources="tiers"), [], None,
                   {"num_clients": 60})
  group, names, caps = plot.client_groups(tiers)
  assert group.shape == (60,)
  assert names[0].startswith("low") and len(names) == 3
  # FLASH's class shares 18820 : 16428 : 159 of 60 clients, by largest
  # remainder: 31.9, 27.9, 0.3 -> 32, 28, 0 (the fast class is absent)
  assert np.bincount(group, minlength=3).tolist() == [32, 28, 0]
  assert caps == [32, 128, None]
  logn = plot.Run("x", dict(base, resources="lognormal"), [], None,
                  {"num_clients": 60})
  group, names, _ = plot.client_groups(logn)
  assert names == ["slow third", "mid third", "fast third"]
  assert np.bincount(group).tolist() == [20, 20, 20]
  uni = plot.Run("x", dict(base, resources="uniform"), [], None,
                 {"num_clients": 60})
  group, names, caps = plot.client_groups(uni)
  assert names == ["all"] and not group.any() and caps == [128]


def test_client_groups_ask_the_registered_properties():
  """A profile of one's own registered with a tier table is grouped by its
  tiers, named by the table; a partition of one's own registered as
  natural, as ``natural``, does not count ``num_clients`` clients."""
  table = [dict(name="slow", share=1, speed=0.5, memory_cap=16,
                bandwidth=1e5),
           dict(name="fast", share=1, speed=2.0, memory_cap=64,
                bandwidth=1e6)]

  @registry.RESOURCE_PROFILES.register("two_tiers", tier_table=table)
  def two_tiers(cfg, num_clients):
    return resources.from_tiers(
        resources.ResourceSettings(seed=cfg.seed, tiers=table), num_clients)

  @registry.PARTITIONS.register("by_owner", natural=True)
  def by_owner(cfg, ds):
    return registry.PARTITIONS.get("natural")(cfg, ds)

  base = Config(num_clients=60, clients_per_round=4).to_dict()
  run = plot.Run("x", dict(base, resources="two_tiers"), [], None,
                 {"num_clients": 60})
  group, names, caps = plot.client_groups(run)
  assert names == ["slow (0.5x speed)", "fast (2x speed)"]
  assert np.bincount(group).tolist() == [30, 30] and caps == [16, 64]
  cohorts = {"cohort": np.array([[0, 7]])}   # no summary: count from these
  for partition, n in (("natural", 8), ("by_owner", 8), ("iid", 60)):
    run = plot.Run("x", dict(base, partition=partition), [], cohorts, None)
    assert plot.client_groups(run)[0].shape == (n,), partition


def test_main(run_dir, tmp_path, capsys):
  other = tmp_path / "other"
  shutil.copytree(run_dir, other)
  assert plot.main([run_dir, "--out", str(tmp_path / "one")]) == 0
  printed = capsys.readouterr().out.split()
  assert printed == [str(tmp_path / "one" / n) for n in NAMES]
  out = tmp_path / "many"
  assert plot.main(["plot", run_dir, str(other), "--out", str(out)]) == 0
  printed = capsys.readouterr().out.split()
  assert len(printed) == 9 and all(os.path.exists(p) for p in printed)
  assert printed[-1] == str(out / "compare_accuracy.png")
  # each run's figures go under OUTDIR/<label>, labels unique
  assert len({os.path.dirname(p) for p in printed[:-1]}) == 2
  assert all(p.startswith(str(out) + os.sep) for p in printed)
  assert plot.main([str(other), str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err
  assert "missing" in err and err.count("\n") == 1
