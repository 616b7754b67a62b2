"""End-to-end runs: files, learning, compile counts, divergence."""

import json

import numpy as np
import pytest

from fedjax_bsa.core.config import Config
from fedjax_bsa.run.runner import run

SMALL = dict(num_clients=30, clients_per_round=6, hidden=32, eval_every=10,
             progress=False, min_examples=5)

REQUIRED = ("round", "sim_time_s", "wall_time_s", "test_accuracy",
            "test_loss", "mean_batch_size", "min_batch_size",
            "max_batch_size", "noise_scale")


def test_cli_run_writes_files_and_learns(finished_run):
  code, out = finished_run
  assert code == 0
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["rounds"] == 40
  lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text()
           .splitlines()]
  assert [r["round"] for r in lines] == [0, 10, 20, 30, 40]
  for r in lines:
    for key in REQUIRED:
      assert key in r
  sims = [r["sim_time_s"] for r in lines]
  assert all(b > a for a, b in zip(sims, sims[1:]))
  # chance is 0.1 on digits; a short run learns well above it
  assert lines[-1]["test_accuracy"] > 0.6
  summary = json.loads((out / "summary.json").read_text())
  assert summary["rounds"] == 40 and summary["compiles"] == 1
  clients = np.load(out / "clients.npz")
  assert clients["batch"].shape == (40, 6)


def test_compiles_do_not_grow_with_rounds():
  counts = []
  for rounds in (20, 60):
    res = run(Config(rounds=rounds, controller="random", batch_min=1,
                     batch_max=40, **SMALL), print_table=False)
    counts.append(res.compiles)
    # the random controller really varied the plan
    assert len(np.unique(res.clients["batch"])) > 10
  assert counts[0] == counts[1] == 1


def test_partial_last_chunk_runs_exact_round_count():
  res = run(Config(rounds=13, **SMALL), print_table=False)
  assert [r["round"] for r in res.records] == [0, 10, 13]
  assert res.clients["batch"].shape[0] == 13
  assert res.compiles == 1


def test_divergence_stops_with_round_named(tmp_path, capsys):
  out = tmp_path / "div"
  res = run(Config(rounds=40, client_lr=1e12, **SMALL),
            str(out), print_table=False)
  err = capsys.readouterr().err
  assert res.summary["diverged_round"] is not None
  assert f"round {res.summary['diverged_round']}" in err
  lines = (out / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == len(res.records) >= 2
  assert res.summary["rounds"] == 10  # stopped at the end of the first chunk
  assert (out / "summary.json").exists()


def test_learning_rate_decay_follows_fedscale_rule():
  """FedScale's step decay: every client's rate times ``lr_decay`` every
  ``lr_decay_every`` rounds, never below ``lr_min``; by hand."""
  res = run(Config(rounds=8, controller="constant", client_lr=0.2,
                   lr_decay=0.5, lr_decay_every=2, lr_min=0.03,
                   **dict(SMALL, eval_every=1)), print_table=False)
  got = [(r["round"], r["mean_lr"], r["min_lr"], r["max_lr"])
         for r in res.records[1:]]
  # the record of round r describes the plan of round r - 1
  want = [0.2, 0.2, 0.1, 0.1, 0.05, 0.05, 0.03, 0.03]
  assert [g[0] for g in got] == list(range(1, 9))
  for (_, mean, lo, hi), w in zip(got, want):
    assert mean == pytest.approx(w) and lo == pytest.approx(w)
    assert hi == pytest.approx(w)
