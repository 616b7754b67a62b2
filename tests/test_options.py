"""Every dataset / partition / algorithm / optimizer / resource option runs
and learns through the compile-once kernel (short runs, well above chance)
and changes the run (against the base run). One round of each algorithm and
server optimizer is checked against a hand computation in
``test_round.py``."""

import pickle

import numpy as np
import pytest

from fedjax_bsa.core.config import Config
from fedjax_bsa.run.runner import run
from fedjax_bsa.setup import experiment

BASE = dict(rounds=20, eval_every=20, num_clients=30, clients_per_round=6,
            hidden=32, progress=False, controller="constant", batch_size=8,
            microbatch=4)

OPTIONS = [
    dict(dataset="mnist1d", num_examples=2000, rounds=30, client_lr=0.1),
    dict(dataset="synthetic", partition="natural", rounds=30, client_lr=0.05),
    dict(partition="iid"),
    dict(partition="shards"),
    dict(partition="quantity"),
    dict(algorithm="fedprox", prox_mu=0.1),
    dict(algorithm="fednova"),
    dict(algorithm="scaffold"),
    dict(server_optimizer="momentum", server_lr=0.5),
    dict(server_optimizer="adam", server_lr=0.01),
    dict(server_optimizer="yogi", server_lr=0.01),
    dict(resources="uniform"),
    dict(resources="tiers"),
    dict(resources="trace"),
    dict(round_policy="deadline_drop", deadline_rule="fixed", deadline=0.15),
    dict(round_policy="deadline_partial", deadline_rule="fixed",
         deadline=0.15),
    dict(controller="noise_scale"),
    dict(controller="schedule", schedule_every=5),
    dict(controller="resource_proportional"),
]


def _id(o):
  return ",".join(f"{k}={v}" for k, v in o.items() if k not in
                  ("rounds", "client_lr", "num_examples", "num_clients"))


def _fingerprint(res):
  """What an option could change: the final loss, time and batches."""
  last = res.records[-1]
  return (round(last["test_loss"], 6), round(last["sim_time_s"], 6),
          float(np.mean(res.clients["batch"])))


@pytest.fixture(scope="module")
def base_run():
  return run(Config(**BASE), print_table=False)


@pytest.mark.parametrize("option", OPTIONS, ids=_id)
def test_option_runs_and_learns(option, tmp_path, base_run):
  kw = dict(BASE)
  kw.update(option)
  if kw.get("resources") == "trace":
    trace = {i: {"computation": 0.2 + 0.1 * (i % 5),
                 "communication": 5000.0 + 1000 * i} for i in range(10)}
    path = tmp_path / "device_info.pkl"
    with open(path, "wb") as fh:
      pickle.dump(trace, fh)
    kw["trace_path"] = str(path)
  res = run(Config(**kw), print_table=False)
  acc = res.summary["final_test_accuracy"]
  assert res.compiles == 1
  assert res.summary["diverged_round"] is None
  # well above chance: the majority class's share of the test set (0.1 on
  # the balanced datasets; synthetic's labels are skewed)
  y = experiment.load_dataset(Config(**kw)).y_test
  majority = np.bincount(y).max() / len(y)
  assert acc > majority + 0.15, (acc, majority)
  # and the option was not ignored: the run differs from the base run
  # (a dropped prox_mu or a server optimizer falling back to sgd would not)
  assert _fingerprint(res) != _fingerprint(base_run), option
  last = res.records[-1]
  if kw.get("round_policy") == "deadline_drop":
    assert last["round_time_s"] <= 0.15 + 1e-6
  if kw.get("round_policy", "wait_all") != "wait_all":
    assert sum(r.get("dropped") or 0 for r in res.records) + sum(
        r.get("partial") or 0 for r in res.records) > 0
