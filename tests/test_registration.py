"""Choices registered from Python run everywhere a built-in one does:
validation (which asks their registered properties), a run, its summary
(the regime's headroom asks the deadline rule, the local work being one
that reads the deadline) and a sweep (a seeded dataset is built per seed);
a round policy and a resource profile of one's own in validation and a
run."""

import jax.numpy as jnp
import numpy as np
import pytest

from fedjax_bsa.core import registry
from fedjax_bsa.core.config import Config, ConfigError
from fedjax_bsa.data import datasets
from fedjax_bsa.plans import deadline as deadline_lib
from fedjax_bsa.plans import policies
from fedjax_bsa.run.runner import run
from fedjax_bsa.run.sweep import run_sweep
from fedjax_bsa.setup import experiment
from fedjax_bsa.setup import resources


LOADED = []   # the seeds noisy_digits was built for


@pytest.fixture(scope="module")
def registered():
  @registry.DATASETS.register("noisy_digits", seeded=True)
  def noisy(cfg):
    LOADED.append(cfg.seed)
    ds = datasets.digits()
    rng = np.random.default_rng(cfg.seed)
    return ds._replace(name="noisy_digits", x_train=(
        ds.x_train + rng.normal(0, 0.5, ds.x_train.shape)).astype(
            np.float32))

  @registry.DEADLINE_RULES.register("twice", takes_deadline=True)
  def twice(cfg, hp):
    del cfg
    return lambda predicted, active: 2.0 * hp["deadline"]

  @registry.LOCAL_WORK.register("half_fit", needs_deadline=True)
  def half_fit(cfg, hp):
    del cfg, hp

    def steps(plan, ctx, res, deadline, model_bytes):
      del ctx
      fit = deadline_lib.deadline_steps(res, plan.batch_size, deadline,
                                        model_bytes, plan.steps)
      return jnp.where(fit > 0, jnp.maximum(fit // 2, 1), 0)
    return steps

  @registry.SCHEDULES.register("tripling")
  def tripling(b0, batch_max, every, total_rounds):
    del batch_max, total_rounds
    return lambda r: b0 * 3.0 ** jnp.floor(r / every)

  return Config(dataset="noisy_digits", deadline_rule="twice", deadline=50.0,
                local_work="half_fit", local_steps=8, controller="schedule",
                schedule="tripling", schedule_every=2, batch_size=2,
                batch_min=1, batch_max=64, rounds=6, eval_every=1,
                num_clients=20, clients_per_round=5, hidden=16,
                progress=False)


def test_unknown_properties_are_refused():
  with pytest.raises(ValueError, match="unknown property needs_dedline"):
    registry.LOCAL_WORK.register("typo", needs_dedline=True)


def test_validation_asks_the_registered_properties(registered):
  with pytest.raises(ConfigError, match="local_work=half_fit with "
                     "deadline_rule=twice needs deadline > 0"):
    registered.replace(deadline=0.0).validate()
  with pytest.raises(ConfigError, match="deadline=5.0 is not allowed with "
                     "deadline_rule=quantile"):
    registered.replace(deadline_rule="quantile", deadline=5.0).validate()


def test_a_run_its_summary_and_a_sweep(registered):
  res = run(registered, print_table=False)
  got = [(r["round"], r["mean_batch_size"], r["mean_steps"])
         for r in res.records[1:]]
  # the record of round r describes round r - 1's plan: the tripling
  # schedule every 2 rounds, half of the local_steps that fit 2 x 50 s
  assert [g[0] for g in got] == list(range(1, 7))
  assert [g[1] for g in got] == [2, 2, 6, 6, 18, 18]
  assert all(g[2] == 4 for g in got)
  assert res.summary["headroom"] >= 1.0      # regime.describe ran
  del LOADED[:]
  sw = run_sweep(registered, [dict(seed=0), dict(seed=1)],
                 print_table=False)
  assert [r["test_loss"] for r in sw.records[0]] == pytest.approx(
      [r["test_loss"] for r in res.records], rel=1e-4)
  # seeded: each experiment built its own (differently noisy) data
  assert sorted(LOADED) == [0, 1]
  assert sw.records[1][-1]["test_loss"] != sw.records[0][-1]["test_loss"]


@pytest.fixture(scope="module")
def policy_and_profile():
  @registry.RESOURCE_PROFILES.register("two_speeds")
  def two_speeds(cfg, num_clients):
    """Every other client 10x slower than ``base_speed``."""
    res = resources.make_resources(
        "uniform", num_clients, cfg.seed, base_speed=cfg.base_speed,
        step_overhead=cfg.step_overhead, memory_cap=cfg.memory_cap,
        bandwidth=cfg.bandwidth)
    slow = np.arange(num_clients) % 2 == 1
    return res._replace(speed=np.where(slow, res.speed / 10,
                                       res.speed).astype(np.float32))

  @registry.ROUND_POLICIES.register("keep_one", needs_deadline=True)
  def keep_one(cfg, hp):
    """A client over the deadline keeps one step."""
    del cfg, hp
    keep = lambda steps, over, deadline: jnp.where(over, 1, steps)
    return lambda res, batch, steps, available, model_bytes, deadline: (
        policies.round_outcome(res, batch, steps, available, model_bytes,
                            deadline, keep))

  # 10 steps of 8 take 0.14 s on a fast client, 0.5 s on a slow one
  return Config(resources="two_speeds", round_policy="keep_one",
                deadline_rule="fixed", deadline=0.3, controller="constant",
                batch_size=8, local_steps=10, base_speed=2000.0,
                step_overhead=0.01, model="logreg", rounds=4, eval_every=1,
                num_clients=10, clients_per_round=4, noise_stats=False,
                progress=False)


def test_a_round_policy_and_a_resource_profile_of_ones_own(
    policy_and_profile):
  cfg = policy_and_profile
  with pytest.raises(ConfigError, match="round_policy=keep_one with "
                     "deadline_rule=fixed needs deadline > 0"):
    cfg.replace(deadline=0.0)
  with pytest.raises(ConfigError, match="resources='three_speeds' is not "
                     "allowed: choose one of .*two_speeds"):
    cfg.replace(resources="three_speeds")
  speeds = experiment.build(cfg).resources.speed
  assert sorted(set(speeds.tolist())) == [200.0, 2000.0]
  res = run(cfg, print_table=False)
  rounds = res.records[1:]
  assert len(rounds) == 4
  for r in rounds:
    assert r["participants"] == 4 and r["dropped"] == 0
    slow = r["mean_steps"] < 10          # a slow client kept one step
    assert r["deadline_s"] == pytest.approx(0.3)
    assert r["round_time_s"] == pytest.approx(0.3) if slow else (
        r["round_time_s"] < 0.3)
  assert any(r["mean_steps"] < 10 for r in rounds)
