"""A sweep is one compiled program whose experiments equal separate runs."""

import json

from records_util import assert_records_close
import pytest

from fedjax_bsa import cli
from fedjax_bsa.core.config import Config, ConfigError
from fedjax_bsa.run import runner
from fedjax_bsa.run import sweep

BASE = dict(rounds=4, eval_every=2, clients_per_round=5, num_clients=15,
            hidden=8, local_steps=2, controller="noise_scale", progress=False)
RUN_FILES = {"config.json", "metrics.jsonl", "clients.npz", "summary.json"}


_close = assert_records_close


def test_grid_is_a_cartesian_product_in_order():
  grid = sweep.parse_grid(["seed=0,1", "client_lr=0.05,0.1,0.2"])
  ov = sweep.expand_grid(grid)
  assert len(ov) == 6
  assert ov[0] == dict(seed="0", client_lr="0.05")
  assert ov[1] == dict(seed="0", client_lr="0.1")
  assert ov[5] == dict(seed="1", client_lr="0.2")


@pytest.mark.parametrize("key", ["clients_per_round", "model", "algorithm",
                                 "controller", "microbatch", "rounds"])
def test_shape_or_structure_keys_are_rejected_naming_the_key(key):
  with pytest.raises(ConfigError, match=f"cannot sweep '{key}'"):
    sweep.check_sweepable([key])


def test_cli_rejects_bad_grid_with_one_line_error(capsys, tmp_path):
  out = str(tmp_path / "never")
  assert cli.main(["sweep", "--grid", "clients_per_round=2,3", "--out",
                   out]) == 2
  err = capsys.readouterr().err.strip()
  assert "clients_per_round" in err and len(err.splitlines()) == 1
  assert cli.main(["sweep", "--grid", "no_such_key=1,2"]) == 2
  assert "no_such_key" in capsys.readouterr().err
  assert cli.main(["sweep", "--grid", "client_lr=fast"]) == 2
  assert not (tmp_path / "never").exists()


def test_sweep_equals_separate_runs(tmp_path):
  """Experiments differing in every kind of sweepable setting (seed, traced
  hyperparameters, controller parameters, Dirichlet alpha: different
  partitions, padded to one shape, resources) equal separate runs; one
  compile."""
  base = Config(**BASE)
  ov = [dict(seed=0, client_lr=0.05, server_lr=1.0, kappa=1.0,
             ema_decay=0.9, alpha=0.3),
        dict(seed=3, client_lr=0.1, server_lr=0.5, kappa=2.0, ema_decay=0.5,
             alpha=1.0, speed_sigma=1.0)]
  # the two experiments' client jobs share one pool of kernel lanes
  res = sweep.run_sweep(base, ov, str(tmp_path), print_table=False)
  assert res.compiles == 1
  for e, o in enumerate(ov):
    ref = runner.run(base.replace(**o), print_table=False)
    _close(ref.records, res.records[e])
    folder = tmp_path / f"exp_{e:03d}"
    assert RUN_FILES <= {p.name for p in folder.iterdir()}
    saved = [json.loads(l) for l in
             (folder / "metrics.jsonl").read_text().splitlines()]
    assert saved == res.records[e]
    assert json.loads((folder / "config.json").read_text())["seed"] == \
        o["seed"]
  lines = [json.loads(l) for l in
           (tmp_path / "sweep.jsonl").read_text().splitlines()]
  assert [l["experiment"] for l in lines] == ["exp_000", "exp_001"]
  assert lines[1]["overrides"]["alpha"] == 1.0
  assert "exp_001" in (tmp_path / "table.txt").read_text()


def test_a_failing_experiment_is_marked_and_the_others_finish(tmp_path):
  """A partition that cannot be drawn for one experiment fails that
  experiment, named in the table and sweep.jsonl; the others run."""
  base = Config(**dict(BASE, num_clients=20, min_examples=20))
  res = sweep.run_sweep(base, [dict(alpha=0.01), dict(alpha=1.0)],
                        str(tmp_path), print_table=False)
  assert "partition=dirichlet" in res.summaries[0]["failed"]
  assert res.records[0] == []
  assert res.summaries[1]["rounds"] == BASE["rounds"]
  lines = [json.loads(l) for l in
           (tmp_path / "sweep.jsonl").read_text().splitlines()]
  assert "failed" in lines[0] and "final_test_accuracy" in lines[1]
  assert "failed: partition=dirichlet" in (tmp_path / "table.txt").read_text()


def test_a_diverging_experiment_does_not_touch_the_others():
  """Experiments share kernel lanes: one whose parameters become non-finite
  diverges alone (a one-hot sum over lanes would spread ``0 * inf`` to
  every experiment); the other still equals its separate run."""
  base = Config(**dict(BASE, rounds=6))
  ov = [dict(seed=1, client_lr=1e12), dict(seed=2, client_lr=0.1)]
  res = sweep.run_sweep(base, ov, None, print_table=False)
  assert res.summaries[0]["diverged_round"] is not None
  assert res.summaries[1]["diverged_round"] is None
  ref = runner.run(base.replace(**ov[1]), print_table=False)
  _close(ref.records, res.records[1])


def test_seeds_of_a_generated_dataset_with_different_test_sizes_sweep():
  """Synthetic(1, 1) draws its data per seed, so the test sets differ in
  size: the sweep pads them (label -1, left out of the metrics) and each
  experiment still equals its separate run."""
  base = Config(**dict(BASE, dataset="synthetic", partition="natural",
                       num_clients=12, clients_per_round=4))
  ov = [dict(seed=0), dict(seed=1)]
  from fedjax_bsa.setup import experiment as experiment_lib
  sizes = {len(experiment_lib.build(base.replace(**o)).dataset.y_test)
           for o in ov}
  assert len(sizes) == 2        # the case this test is about
  res = sweep.run_sweep(base, ov, None, print_table=False)
  for e, o in enumerate(ov):
    _close(runner.run(base.replace(**o), print_table=False).records,
           res.records[e])


def test_a_stopped_sweep_checkpoints_and_resumes_to_the_same_records(
    tmp_path, capsys):
  """A sweep takes a run's path: ``stop`` (SIGINT/SIGTERM on the command
  line) ends it at the end of a chunk with every experiment's summary
  naming the round, and ``resume_sweep`` continues it to the records of a
  sweep that was never stopped."""
  base = Config(**BASE)
  ov = [dict(seed=0), dict(seed=1, client_lr=0.2)]
  full = sweep.run_sweep(base, ov, str(tmp_path / "full"), print_table=False)
  out = str(tmp_path / "stopped")
  calls = []

  def stop():  # polled between chunks: asked after the first one
    calls.append(1)
    return len(calls) > 1

  cut = sweep.run_sweep(base, ov, out, print_table=False, stop=stop)
  assert [s["interrupted_round"] for s in cut.summaries] == [2, 2]
  assert [r[-1]["round"] for r in cut.records] == [2, 2]
  done = sweep.resume_sweep(out, print_table=False)
  assert [s["interrupted_round"] for s in done.summaries] == [None, None]
  for e in range(2):
    _close(full.records[e], done.records[e])
  capsys.readouterr()
