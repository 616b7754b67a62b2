"""Config and CLI errors: one line naming the setting, exit 2, nothing written."""

import json

import pytest

from fedjax_bsa import cli
from fedjax_bsa.core.config import Config, ConfigError


@pytest.mark.parametrize("args,needle", [
    (["--set", "no_such_key=1"], "no_such_key"),
    (["--set", "clients_per_round=500"], "clients_per_round=500"),
    (["--set", "alpha=-1"], "alpha=-1"),
    (["--set", "rounds=abc"], "rounds='abc'"),
    (["--set", "controller=magic"], "controller='magic'"),
    (["--set", "round_policy=deadline_drop", "--set", "deadline_rule=fixed"],
     "deadline=0.0"),
    (["--set", "local_work=overtime"], "local_work='overtime'"),
    (["--set", "deadline_rule=soon"], "deadline_rule='soon'"),
    (["--set", "deadline_quantile=1.5"], "deadline_quantile=1.5"),
    (["--set", "deadline_quantile=0"], "deadline_quantile=0"),
    (["--set", "deadline=-2"], "deadline=-2"),
    (["--set", "local_work=deadline", "--set", "deadline_rule=fixed"],
     "local_work=deadline"),
    (["--set", "algorithm=fedsgdx"], "algorithm='fedsgdx'"),
    (["--set", "partition=dirichlet", "--set", "alpha=0.01",
      "--set", "min_examples=14", "--set", "rounds=2"], "partition=dirichlet"),
    (["--set", "dataset=npz", "--set", "data_path=/no/such.npz"],
     "/no/such.npz"),
])
def test_bad_setting_exits_2_and_writes_nothing(tmp_path, capsys, args,
                                                needle):
  out = tmp_path / "out"
  code = cli.main(["run", *args, "--out", str(out)])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert needle in err
  assert len(err.splitlines()) == 1
  assert not out.exists()


def test_config_file_yaml_and_json(tmp_path):
  y = tmp_path / "c.yaml"
  y.write_text("rounds: 7\nclient_lr: 0.2\ncontroller: random\n")
  j = tmp_path / "c.json"
  j.write_text(json.dumps({"rounds": 9, "alpha": 0.5}))

  class A:
    config = str(y)
    set = ["seed=3"]
  cfg = cli.config_from_args(A)
  assert (cfg.rounds, cfg.client_lr, cfg.controller, cfg.seed) == (
      7, 0.2, "random", 3)
  A.config = str(j)
  cfg = cli.config_from_args(A)
  assert (cfg.rounds, cfg.alpha) == (9, 0.5)


def test_bad_config_file_named(tmp_path, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  assert cli.main(["run", "--config", str(bad)]) == 2
  assert "bad.json" in capsys.readouterr().err


def test_validate_names_field_and_range():
  with pytest.raises(ConfigError, match=r"batch_min=64 .*batch_max=32"):
    Config(batch_min=64, batch_max=32).validate()
  with pytest.raises(ConfigError, match=r"availability=1.5 .*<= 1.0"):
    Config(availability=1.5).validate()
  with pytest.raises(ConfigError, match="client_lr=0.0"):
    Config(client_lr=0.0).validate()
  Config().validate()


def test_dotted_keys_and_types():
  from fedjax_bsa.core.config import parse_assignments
  vals = parse_assignments(["config.rounds=5", "noise_stats=false"])
  cfg = Config.from_dict(vals)
  assert cfg.rounds == 5 and cfg.noise_stats is False


def test_internal_errors_are_not_user_errors(monkeypatch):
  """A bug (an exception that is not a ConfigError) propagates with its
  traceback (exit 1 from the interpreter), never exit 2."""
  from fedjax_bsa.run import runner

  def broken(*a, **k):
    raise ValueError("an internal bug")

  monkeypatch.setattr(runner, "run", broken)
  with pytest.raises(ValueError, match="an internal bug"):
    cli.main(["run", "--set", "rounds=1"])


def test_diverged_run_exits_3_and_keeps_records(tmp_path, capsys):
  out = tmp_path / "div"
  code = cli.main(["run", "--no-progress", "--set", "rounds=20",
                   "--set", "client_lr=1e12", "--set", "num_clients=20",
                   "--set", "hidden=8", "--out", str(out)])
  assert code == 3
  assert "diverged" in capsys.readouterr().err
  assert (out / "metrics.jsonl").read_text().count("\n") >= 2
