"""What a new user hits on the command line: existing run folders, --out on
a file, help, settings, SIGINT/SIGTERM, divergence, non-finite data."""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fedjax_bsa import cli

TINY = ["--no-progress", "--set", "num_clients=10", "--set",
        "clients_per_round=2", "--set", "hidden=8", "--set",
        "controller=constant", "--set", "eval_every=1"]


def _one_error_line(capsys) -> str:
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  return err


def test_run_folder_is_refused_then_overwritten(tmp_path, capsys):
  out = tmp_path / "run"
  assert cli.main(["run", *TINY, "--set", "rounds=2", "--out",
                   str(out)]) == 0
  (out / "plots").mkdir()
  (out / "plots" / "accuracy.png").write_bytes(b"old plot")
  (out / "notes.txt").write_text("mine")
  before = (out / "metrics.jsonl").read_text()
  capsys.readouterr()

  assert cli.main(["run", *TINY, "--set", "rounds=1", "--out",
                   str(out)]) == 2
  err = _one_error_line(capsys)
  assert str(out) in err and "--resume" in err and "--overwrite" in err
  assert (out / "metrics.jsonl").read_text() == before  # untouched

  assert cli.main(["run", "--resume", str(out), "--overwrite"]) == 2
  assert "--overwrite" in _one_error_line(capsys)

  assert cli.main(["run", *TINY, "--set", "rounds=1", "--out", str(out),
                   "--overwrite"]) == 0
  assert not (out / "plots").exists()  # the old run's plots went with it
  assert (out / "notes.txt").read_text() == "mine"  # not a run's file
  rounds = [json.loads(l)["round"]
            for l in (out / "metrics.jsonl").read_text().splitlines()]
  assert rounds == [0, 1]
  assert json.loads((out / "summary.json").read_text())["rounds"] == 1


def test_sweep_folder_is_refused(tmp_path, capsys):
  out = tmp_path / "sw"
  out.mkdir()
  (out / "sweep.json").write_text("{}")
  assert cli.main(["sweep", *TINY, "--grid", "seed=0,1", "--out",
                   str(out)]) == 2
  assert "--overwrite" in _one_error_line(capsys)


@pytest.mark.parametrize("sub", ["", "inner"])
def test_out_naming_a_file_is_one_line_exit_2(tmp_path, capsys, sub):
  f = tmp_path / "afile"
  f.write_text("x")
  out = f / sub if sub else f
  assert cli.main(["run", *TINY, "--out", str(out)]) == 2
  err = _one_error_line(capsys)
  assert str(f) in err and "not a folder" in err
  assert f.read_text() == "x"


@pytest.mark.parametrize("every", ["0", "-3"])
def test_checkpoint_every_zero_or_below_minus_one_refused(tmp_path, capsys,
                                                          every):
  assert cli.main(["run", *TINY, "--checkpoint-every", every, "--out",
                   str(tmp_path / "r")]) == 2
  assert f"--checkpoint-every {every}" in _one_error_line(capsys)
  assert not (tmp_path / "r").exists()


def _help(capsys, argv) -> str:
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  assert e.value.code == 0
  return " ".join(capsys.readouterr().out.split())  # unwrapped


def _parsers():
  """Every parser of the command line: cli's subcommands, plot, the
  benchmarks and the study."""
  from fedjax_bsa.report import plot  # pylint: disable=g-import-not-at-top
  from fedjax_bsa.bench.kernel import main as kernel_main  # pylint: disable=g-import-not-at-top
  from fedjax_bsa.bench.study import main as study_main  # pylint: disable=g-import-not-at-top
  from fedjax_bsa.bench.sweep import main as sweep_main  # pylint: disable=g-import-not-at-top
  top = cli._parser()  # pylint: disable=protected-access
  subs = next(a for a in top._actions  # pylint: disable=protected-access
              if isinstance(a, argparse._SubParsersAction))  # pylint: disable=protected-access
  out = {f"{n}": p for n, p in subs.choices.items()
         if n not in ("study", "plot")}  # these two hand everything on
  out.update(plot=plot._parser(), kernel=kernel_main._parser(),  # pylint: disable=protected-access
             bench_sweep=sweep_main._parser(),  # pylint: disable=protected-access
             study=study_main._parser())  # pylint: disable=protected-access
  return out


def test_every_option_of_every_command_is_explained():
  for name, p in _parsers().items():
    for a in p._actions:  # pylint: disable=protected-access
      if isinstance(a, argparse._HelpAction):  # pylint: disable=protected-access
        continue
      assert a.help, f"{name}: {a.option_strings or a.dest} has no help"


def test_help_of_plot_bench_and_study_lists_their_options(capsys):
  text = _help(capsys, ["plot", "--help"])
  assert "--target" in text and "dashed" in text and "--out" in text
  assert "positional arguments: rest" not in text
  text = _help(capsys, ["bench", "--help"])
  assert "kernel:" in text and "sweep:" in text and "--help" in text
  text = _help(capsys, ["bench", "sweep", "--help"])
  assert "--experiments EXPERIMENTS experiments in the sweep" in text
  assert re.search(r"--experiments EXPERIMENTS [^-]*\(default 8, quick 4\)",
                   text)
  assert "sweep_<machine>[_quick].json" in text and "runs/benchmarks" in text
  text = _help(capsys, ["study", "--help"])
  assert "default digits,synthetic,mnist1d" in text
  assert "default: benchmarks/results" in text
  text = _help(capsys, ["run", "--help"])
  assert "--overwrite" in text and "no progress bar" in text


def test_settings_has_a_header_and_aligned_columns(capsys):
  assert cli.main(["settings"]) == 0
  text = capsys.readouterr().out
  head, rows = text.split("\n\n", 1)
  assert "traced" in head and "host" in head and "sweep" in head
  lines = rows.splitlines()
  assert lines[0].split() == ["setting", "default", "sweep", "allowed",
                              "meaning"]
  cols = [lines[0].index(w) for w in ("default", "sweep", "allowed",
                                      "meaning")]
  rows = [l for l in lines[1:] if not l.startswith("#") and l[0] != " "]
  assert len(rows) > 40
  for line in rows:  # no value runs into the next column
    assert all(line[c - 2:c] == "  " for c in cols if c < len(line)), line
    assert line[cols[1]:cols[2]].strip() in ("traced", "host", "-"), line
  client_lr = next(l for l in rows if l.startswith("client_lr "))
  assert client_lr[cols[1]:cols[2]].strip() == "traced"


def test_nonfinite_npz_features_are_a_data_error(tmp_path, capsys):
  x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
  x[17, 2] = np.nan
  path = tmp_path / "bad.npz"
  np.savez(path, x=x, y=np.arange(60) % 3)
  out = tmp_path / "r"
  assert cli.main(["run", *TINY, "--set", "dataset=npz", "--set",
                   f"data_path={path}", "--out", str(out)]) == 2
  err = _one_error_line(capsys)
  assert str(path) in err and "NaN or infinite" in err and "17" in err
  assert not out.exists()


def test_test_loss_far_above_its_start_is_divergence(tmp_path, capsys):
  """A learning rate that wrecks the model but keeps the loss finite ends
  in exit 3 with one line naming the round and client_lr, on its own line
  even under the progress bar."""
  out = tmp_path / "div"
  code = cli.main(["run", *[a for a in TINY if a != "--no-progress"],
                   "--set", "rounds=30", "--set", "client_lr=1000",
                   "--out", str(out)])
  err = capsys.readouterr().err
  assert code == 3
  # the last thing drawn on each terminal line (after any \r)
  shown = [seg.split("\r")[-1] for seg in err.split("\n")]
  lines = [l for l in shown if "diverged" in l]
  assert len(lines) == 1 and lines[0].startswith("diverged: "), err
  summary = json.loads((out / "summary.json").read_text())
  assert f"round {summary['diverged_round']}" in lines[0]
  assert "client_lr=1000" in lines[0]
  records = [json.loads(l) for l in (out / "metrics.jsonl").read_text()
             .splitlines()]
  last = records[-1]["test_loss"]
  assert last is None or last > 10 * records[0]["test_loss"]


# --------------------------------------------------------------- signals ---

def _start(out, *extra):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  cmd = [sys.executable, "-m", "fedjax_bsa.cli", "run", *TINY,
         "--set", "eval_every=2", "--set", "rounds=100000", *extra,
         "--out", str(out)]
  return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc, out):
  deadline = time.time() + 120
  ck = out / "checkpoints"
  while proc.poll() is None:
    if ck.exists() and any((p / "COMMIT.json").exists()
                           for p in ck.iterdir() if p.name.isdigit()):
      return
    assert time.time() < deadline, "no checkpoint appeared"
    time.sleep(0.05)
  raise AssertionError(f"the run ended first: {proc.communicate()[1]}")


def _check_stopped(out, err, name):
  summary = json.loads((out / "summary.json").read_text())
  stopped = summary["interrupted_round"]
  assert stopped is not None and 0 < stopped < 100000, err[-2000:]
  assert summary["rounds"] == stopped
  assert not [p for p in (out / "checkpoints").iterdir() if "tmp" in p.name]
  assert (out / "checkpoints" / str(stopped) / "COMMIT.json").exists()
  lines = [l for l in err.splitlines() if l.strip()]
  assert lines[-1] == (f"fedjax-bsa: stopped by {name} after round "
                       f"{stopped} of 100000; resume with: fedjax-bsa run "
                       f"--resume {out}"), err[-2000:]
  assert "Traceback" not in err
  return stopped


def test_sigterm_and_sigint_stop_cleanly_and_resume(tmp_path, capsys):
  """SIGTERM to a ``fedjax-bsa run`` process, and SIGINT to a run in this
  process (the same handler; a thread sends it once a checkpoint exists):
  exit 130, a summary with interrupted_round, a committed checkpoint and
  no orbax temporary, one line with the resume command; then the resume
  says where it continues."""
  term = tmp_path / "term"
  proc = _start(term)  # runs beside the in-process run below
  _wait_for_checkpoint(proc, term)
  # --no-progress streams a line per evaluated round through the pipe
  first = proc.stdout.readline()
  assert first.startswith("round 2/100000: test accuracy "), first
  assert proc.poll() is None  # printed while the run goes on
  proc.send_signal(signal.SIGTERM)

  out = tmp_path / "int"

  def interrupt():
    deadline = time.time() + 120
    while time.time() < deadline:
      ck = out / "checkpoints"
      if ck.exists() and any((p / "COMMIT.json").exists()
                             for p in ck.iterdir() if p.name.isdigit()):
        os.kill(os.getpid(), signal.SIGINT)
        return
      time.sleep(0.05)

  sender = threading.Thread(target=interrupt)
  sender.start()
  code = cli.main(["run", *TINY, "--set", "eval_every=2", "--set",
                   "rounds=100000", "--out", str(out)])
  sender.join()
  err = capsys.readouterr().err
  assert code == 130, err[-2000:]
  stopped = _check_stopped(out, err, "SIGINT")
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  _check_stopped(term, err, "SIGTERM")

  assert cli.main(["run", "--resume", str(out), "--no-progress", "--set",
                   f"rounds={stopped + 2}"]) == 0
  err = capsys.readouterr().err
  assert f"resuming from step {stopped} (round {stopped} of " in err
  summary = json.loads((out / "summary.json").read_text())
  assert summary["interrupted_round"] is None
  assert summary["rounds"] == stopped + 2


def test_resume_with_every_checkpoint_corrupt_says_round_0(tmp_path, capsys):
  out = tmp_path / "r"
  assert cli.main(["run", *TINY, "--set", "rounds=2", "--out",
                   str(out)]) == 0
  for step in (out / "checkpoints").iterdir():
    (step / "COMMIT.json").write_text("{broken")
  capsys.readouterr()
  assert cli.main(["run", "--resume", str(out), "--no-progress"]) == 0
  err = capsys.readouterr().err
  assert "restarting from round 0 of 2" in err
  assert [json.loads(l)["round"] for l in
          (out / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


# ------------------------------------------------------------- benchmarks ---

def test_quick_benchmark_writes_quick_name_outside_committed_results(
    tmp_path, monkeypatch):
  """A quick run with no --out writes *_quick.* under runs/benchmarks (not
  committed), never into benchmarks/results or the package."""
  from fedjax_bsa.bench.headroom_bound import main as headroom_bound  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)
  monkeypatch.setattr(headroom_bound, "search",
                      lambda box, batches, samples: (1.0, {}))
  assert headroom_bound.main(["--quick"]) == 0
  written = sorted(str(p.relative_to(tmp_path))
                   for p in tmp_path.rglob("*") if p.is_file())
  assert written == [os.path.join("runs", "benchmarks",
                                  "headroom_bound_quick.json")]
  assert headroom_bound.main([]) == 0  # a full run: the committed name
  assert (tmp_path / "benchmarks" / "results" /
          "headroom_bound.json").exists()


def test_benchmark_cut_short_writes_nothing(tmp_path, monkeypatch):
  from fedjax_bsa.bench.sweep import main as sweep_main  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(sweep_main, "compiled_loop",
                      lambda *a, **k: dict(speedup=1.5, experiments=2))

  def cut_short(*a, **k):
    raise KeyboardInterrupt

  monkeypatch.setattr(sweep_main, "end_to_end", cut_short)
  with pytest.raises(KeyboardInterrupt):
    sweep_main.main(["--quick", "--experiments", "2", "--controllers",
                     "constant", "--out", str(tmp_path / "out"),
                     "--machine", "test"])
  assert not (tmp_path / "out").exists() or not list(
      (tmp_path / "out").iterdir())


# ------------------------------------------------------------------ plots ---

def _fake_sweep(folder, n=12):
  """A sweep folder by hand: sweep.json and n experiments over seed and
  client_lr (the settings that differ), each with two records."""
  folder.mkdir()
  (folder / "sweep.json").write_text("{}")
  for e in range(n):
    d = folder / f"exp_{e:03d}"
    d.mkdir()
    cfg = dict(dataset="digits", rounds=2, seed=e // 2,
               client_lr=(0.05, 0.1)[e % 2])
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "metrics.jsonl").write_text("".join(
        json.dumps(dict(round=r, sim_time_s=float(r), wall_time_s=0.0,
                        test_accuracy=0.1 + 0.01 * e * r, test_loss=2.0))
        + "\n" for r in (0, 1, 2)))


def test_plot_of_a_sweep_folder_compares_its_experiments(tmp_path, capsys):
  from fedjax_bsa.report import plot  # pylint: disable=g-import-not-at-top
  sw = tmp_path / "sweep"
  _fake_sweep(sw)
  assert cli.main(["plot", str(sw)]) == 0
  assert capsys.readouterr().out.split() == [
      str(sw / "plots" / "sweep_accuracy.png")]
  assert (sw / "plots" / "sweep_accuracy.png").stat().st_size > 0
  runs = plot.load_sweep(str(sw))
  assert list(runs)[3] == "exp_003: client_lr=0.1, seed=1"  # only these
  fig = plot.compare_figure(runs)
  lines = fig.axes[0].get_lines()
  assert len(lines) == 12
  looks = {(l.get_color(), l.get_linestyle()) for l in lines}
  assert len(looks) == 12  # colours repeat after 10, styles then differ
  labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
  assert labels == list(runs)


def test_run_figures_say_what_they_draw():
  from fedjax_bsa.report import plot  # pylint: disable=g-import-not-at-top
  rounds, k = 6, 4
  batch = np.array([[1, 4, 16, 64]] * rounds)
  clients = dict(round=np.arange(1, rounds + 1),
                 cohort=np.tile(np.arange(k), (rounds, 1)), batch=batch,
                 steps=np.ones((rounds, k), int))
  records = [dict(round=r, sim_time_s=float(r), test_accuracy=0.1 * r)
             for r in range(3)]
  run = plot.Run("x", None, records, clients, None)
  ax = plot.batch_figure(run).axes[0]
  assert "memory cap" not in ax.get_title()  # no cap line is drawn
  lo, hi = ax.get_ylim()
  ticks = [t for t in ax.get_yticks() if lo <= t <= hi]
  assert {1, 4, 16, 64} <= set(ticks)  # every power of two, not two ticks
  acc = plot.accuracy_figure(run).axes[0]
  dashed = [l for l in acc.get_lines() if l.get_linestyle() == "--"]
  assert dashed and dashed[0].get_label() == "best 0.2000"
  assert "best 0.2000" in [t.get_text()
                           for t in acc.get_legend().get_texts()]


def test_checkpoint_of_another_shape_is_one_warning_line(tmp_path, capsys):
  """orbax's multi-line mismatch message is cut to its first line."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from fedjax_bsa.run import checkpoint  # pylint: disable=g-import-not-at-top
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(2, dict(a=jnp.ones(3)), dict(x=1))
  assert ck.restore(dict(a=jnp.ones(3), b=jnp.zeros(2))) is None
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1, err
  assert "2 is incomplete or corrupt" in err
