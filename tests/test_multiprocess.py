"""Two JAX processes on 127.0.0.1 (jax.distributed, gloo CPU collectives)
give one process's metrics; only process 0 writes."""

import json
import os
import socket
import subprocess
import sys

from records_util import assert_records_close

from fedjax_bsa.core.config import Config
from fedjax_bsa.run import runner
from fedjax_bsa.run import sweep

SETTINGS = dict(rounds=4, eval_every=2, clients_per_round=5, num_clients=15,
                hidden=8, local_steps=2, controller="noise_scale")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(args, out_dir, use_env: bool):
  """Runs ``fedjax-bsa ARGS`` as processes 0 and 1 of a two-process job."""
  port = _free_port()
  sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
  procs = []
  for i in range(2):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "fedjax_bsa.cli", *args, *sets,
           "--no-progress", "--out", str(out_dir)]
    if use_env:
      env.update(FEDJAX_BSA_COORDINATOR=f"127.0.0.1:{port}",
                 FEDJAX_BSA_NUM_PROCESSES="2", FEDJAX_BSA_PROCESS_ID=str(i))
    else:
      cmd += ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
              "--process-id", str(i)]
    procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = []
  try:
    for p in procs:
      outs.append(p.communicate(timeout=240))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  for p, (o, e) in zip(procs, outs):
    assert p.returncode == 0, o[-2000:] + e[-4000:]
  return outs


def _read(path):
  with open(path) as fh:
    return [json.loads(line) for line in fh]


def _close(a, b):
  # lanes are rounded up to a multiple of the device count, so the layout's
  # padding may differ; the training metrics may not
  assert_records_close(a, b)


def test_two_process_run_equals_one_process(tmp_path):
  outs = _launch(["run"], tmp_path / "run", use_env=True)
  ref = runner.run(Config(progress=False, **SETTINGS), print_table=False)
  got = _read(tmp_path / "run" / "metrics.jsonl")
  _close(ref.records, got)
  assert [r["round"] for r in got] == [0, 2, 4]
  summary = json.loads((tmp_path / "run" / "summary.json").read_text())
  assert len(summary["devices"]) == 2
  assert "wrote" in outs[0][0] and "wrote" not in outs[1][0]
  assert "final test accuracy" in outs[0][0]
  assert "final test accuracy" not in outs[1][0]  # nor the table


def test_two_process_sweep_equals_one_process(tmp_path):
  """Experiments sharded over the two processes (each builds only its own
  experiment's data)."""
  _launch(["sweep", "--grid", "seed=0,1", "--grid", "client_lr=0.05"],
          tmp_path / "sw", use_env=False)
  ref = sweep.run_sweep(Config(progress=False, **SETTINGS),
                        [dict(seed="0", client_lr="0.05"),
                         dict(seed="1", client_lr="0.05")], mesh=None,
                        print_table=False)
  for e in range(2):
    got = _read(tmp_path / "sw" / f"exp_{e:03d}" / "metrics.jsonl")
    _close(ref.records[e], got)
  folder = tmp_path / "sw"
  assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [
      "checkpoints", "exp_000", "exp_001"]
  assert len((folder / "sweep.jsonl").read_text().splitlines()) == 2
  spec = json.loads((folder / "sweep.json").read_text())
  assert spec["overrides"][1] == dict(seed="1", client_lr="0.05")
  cfg = json.loads((folder / "exp_001" / "config.json").read_text())
  assert (cfg["seed"], cfg["client_lr"]) == (1, 0.05)
  summary = json.loads((folder / "exp_001" / "summary.json").read_text())
  assert summary["compiles"] == 1 and summary["experiments"] == 2
