"""Checkpoints: keys round-trip, bad checkpoints fall back, a run killed with
SIGKILL and resumed ends bitwise equal to an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import cli
from fedjax_bsa.core.config import Config
from fedjax_bsa.run import checkpoint
from fedjax_bsa.run import sweep

SETTINGS = dict(rounds=40, eval_every=2, clients_per_round=4, num_clients=12,
                hidden=8, local_steps=2)


def _tree(i):
  return dict(w=jnp.arange(6.0) * i, step=jnp.int32(i),
              key=jax.random.fold_in(jax.random.key(0), i),
              nested=(jnp.ones((2, 3), jnp.int32) * i,))


def _same(a, b):
  a, b = checkpoint.keys_to_data(a), checkpoint.keys_to_data(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert np.asarray(x).dtype == np.asarray(y).dtype


def test_checkpointer_keeps_two_and_falls_back(tmp_path, capsys):
  ck = checkpoint.Checkpointer(str(tmp_path), keep=2)
  for i in (2, 4, 6):
    ck.save(i, _tree(i), dict(records=[i]), dict(a=np.arange(i)))
  assert ck.steps() == [6, 4]
  got = ck.restore(_tree(0))
  assert got.step == 6 and got.meta == dict(records=[6])
  _same(got.state, _tree(6))
  assert jax.dtypes.issubdtype(got.state["key"].dtype, jax.dtypes.prng_key)
  np.testing.assert_array_equal(got.host["a"], np.arange(6))
  # corrupt step 6, and leave a partial step 8 (no COMMIT.json)
  with open(tmp_path / "6" / "host.npz", "r+b") as fh:
    fh.seek(10)
    fh.write(b"\0garbage\0")
  os.makedirs(tmp_path / "8")
  got = ck.restore(_tree(0))
  err = capsys.readouterr().err
  assert got.step == 4
  _same(got.state, _tree(4))
  assert "8 is incomplete or corrupt (no COMMIT.json" in err
  assert "6 is incomplete or corrupt (files missing, extra or changed" in err
  assert ck.steps() == [4]  # bad ones removed, so they can be rewritten


def _cli(args, out_dir, cache, **popen):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=str(cache),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop("XLA_FLAGS", None)
  sets = [a for k, v in SETTINGS.items() for a in ("--set", f"{k}={v}")]
  cmd = [sys.executable, "-m", "fedjax_bsa.cli", "run", *args,
         "--no-progress"]
  if "--resume" not in args:
    cmd += [*sets, "--out", str(out_dir)]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **popen)


def _committed(folder):
  ck = folder / "checkpoints"
  if not ck.exists():
    return []
  return sorted(int(p.name) for p in ck.iterdir()
                if p.name.isdigit() and (p / "COMMIT.json").exists())


def _lines(path):
  return [{k: v for k, v in json.loads(l).items() if k != "wall_time_s"}
          for l in path.read_text().splitlines()]


def test_killed_run_resumes_bitwise(tmp_path):
  cache = tmp_path / "xla_cache"
  ref = _cli([], tmp_path / "ref", cache)
  out, err = ref.communicate(timeout=240)
  assert ref.returncode == 0, err[-4000:]

  run = tmp_path / "run"
  proc = _cli([], run, cache)
  deadline = time.time() + 240
  while len(_committed(run)) < 2 and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL, "the run ended before the kill"
  steps = _committed(run)
  assert 2 <= len(steps) <= 3 and steps[-1] < SETTINGS["rounds"]
  # damage the newest checkpoint: the resume warns and takes the previous
  newest = run / "checkpoints" / str(steps[-1])
  with open(newest / "host.npz", "ab") as fh:
    fh.write(b"torn write")
  res = _cli(["--resume", str(run)], run, cache)
  out, err = res.communicate(timeout=240)
  assert res.returncode == 0, err[-4000:]
  assert "incomplete or corrupt" in err
  assert f"resuming from step {steps[-2]}" in err

  got, want = _lines(run / "metrics.jsonl"), _lines(tmp_path / "ref" /
                                                    "metrics.jsonl")
  assert [r["round"] for r in got] == list(range(0, 41, 2))  # each once
  assert got == want  # bitwise: floats compared exactly
  with np.load(run / "clients.npz") as a, \
       np.load(tmp_path / "ref" / "clients.npz") as b:
    assert a.files == b.files
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k])
  sa = json.loads((run / "summary.json").read_text())
  sb = json.loads((tmp_path / "ref" / "summary.json").read_text())
  for k in ("final_test_accuracy", "final_test_loss", "sim_time_s",
            "rounds", "mean_batch_size"):
    assert sa[k] == sb[k], k


def test_sweep_resumes_from_checkpoint(tmp_path):
  base = Config(rounds=6, eval_every=2, clients_per_round=4, num_clients=12,
                hidden=8, local_steps=2, progress=False)
  ov = [dict(seed=0), dict(seed=1, client_lr=0.05)]
  full = sweep.run_sweep(base, ov, str(tmp_path), print_table=False)
  want = [_lines(tmp_path / f"exp_{e:03d}" / "metrics.jsonl")
          for e in range(2)]
  # as if killed after round 4's checkpoint, with round 6 written already
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(tmp_path / "checkpoints" / "6")
  assert cli.main(["sweep", "--resume", str(tmp_path), "--no-progress"]) == 0
  for e in range(2):
    got = _lines(tmp_path / f"exp_{e:03d}" / "metrics.jsonl")
    assert [r["round"] for r in got] == [0, 2, 4, 6]
    assert got == want[e]
    rec = [{k: v for k, v in r.items() if k != "wall_time_s"}
           for r in full.records[e]]
    assert got == rec
