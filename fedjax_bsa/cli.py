"""The ``fedjax-bsa`` command.

  fedjax-bsa run [--set key=value ...] [--config FILE] [--out DIR]
  fedjax-bsa run --resume DIR           continue a stopped run
  fedjax-bsa run --out DIR --overwrite  replace the run in DIR
  fedjax-bsa sweep --grid seed=0,1,2 --grid client_lr=0.05,0.1 --out DIR
                                        experiments as one compiled program
  fedjax-bsa partition [--set ...]      summary of a partition
  fedjax-bsa settings                   every setting, its default and range
  fedjax-bsa bench kernel|sweep [...]   the round-kernel or sweep benchmark
  fedjax-bsa study [...]                the regime study
  fedjax-bsa plot DIR [DIR ...]         PNG figures of runs or a sweep

``run`` and ``sweep`` join a multi-process JAX job with ``--coordinator
HOST:PORT --num-processes N --process-id I`` (or ``FEDJAX_BSA_COORDINATOR``,
``FEDJAX_BSA_NUM_PROCESSES``, ``FEDJAX_BSA_PROCESS_ID``); only process 0
writes.

Exit codes: 0 success; 2 a user error (a wrong setting or file: one line
naming it, nothing written); 3 a run that diverged (every client of a
round failed, so its training loss became non-finite; or its test loss
became non-finite or rose above 10x its first evaluation; the records so
far are kept); 130 a run or sweep stopped by SIGINT or
SIGTERM (checkpointed, its summary written, resumable); 1 anything else (a
bug: with its traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import sys
import threading

from fedjax_bsa.core.config import Config, ConfigError, load_config_file
from fedjax_bsa.core.config import parse_assignments

__all__ = ["main", "config_from_args", "INTERRUPTED_EXIT_CODE"]


def _add_settings(p: argparse.ArgumentParser) -> None:
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a setting (repeatable); see `fedjax-bsa settings`")
  p.add_argument("--config", metavar="FILE",
                 help="settings from a JSON or YAML file (--set wins)")


#: Exit code of a run stopped by SIGINT or SIGTERM (128 + SIGINT).
INTERRUPTED_EXIT_CODE = 130


def _add_scale_out(p: argparse.ArgumentParser, what: str) -> None:
  p.add_argument("--out", metavar="DIR", help=f"write the {what}'s files "
                 "here (created if missing; default: write nothing). A "
                 "folder that already holds a run is refused unless "
                 "--resume or --overwrite is given")
  p.add_argument("--overwrite", action="store_true",
                 help="--out DIR may hold a run: its files (plots "
                 "included) are removed first")
  p.add_argument("--resume", metavar="DIR", help=f"continue the {what} "
                 "whose outputs are in DIR from its newest valid checkpoint")
  p.add_argument("--checkpoint-every", type=int, metavar="ROUNDS",
                 help="rounds between checkpoints, rounded up to chunks of "
                 "eval_every rounds (default: every chunk; -1: none)")
  p.add_argument("--no-progress", action="store_true",
                 help="no progress bar; one line per evaluated round on "
                 "stdout instead (default: a bar on stderr, unless the "
                 "progress setting is false)")
  g = p.add_argument_group("several processes (one per host)")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="process 0's address (or $FEDJAX_BSA_COORDINATOR)")
  g.add_argument("--num-processes", metavar="N",
                 help="processes in the job (or $FEDJAX_BSA_NUM_PROCESSES)")
  g.add_argument("--process-id", metavar="I",
                 help="this process (or $FEDJAX_BSA_PROCESS_ID)")


def _initialize(args) -> None:
  from fedjax_bsa.run import distributed  # pylint: disable=g-import-not-at-top
  distributed.initialize(args.coordinator, args.num_processes,
                         args.process_id)


_RESUME_MAY_CHANGE = ("rounds", "progress")


def _resumed_config(args, out_dir: str) -> Config:
  """The saved config of ``out_dir``; ``--set`` may change only
  ``rounds`` and ``progress``."""
  path = os.path.join(out_dir, "config.json")
  try:
    with open(path) as fh:
      saved = Config.from_dict(json.load(fh))
  except OSError as e:
    raise ConfigError(f"--resume {out_dir}: cannot read {path}: "
                      f"{e.strerror}") from None
  given = {}
  if args.config:
    given.update(load_config_file(args.config))
  given.update(parse_assignments(args.set))
  cfg = saved.replace(**given)
  for key in given:
    if getattr(cfg, key) != getattr(saved, key) and (
        key not in _RESUME_MAY_CHANGE):
      raise ConfigError(f"--set {key}={given[key]} cannot change a resumed "
                        f"run (saved: {getattr(saved, key)!r}); only "
                        f"{', '.join(_RESUME_MAY_CHANGE)} may change")
  return cfg


def config_from_args(args) -> Config:
  """The validated config from ``--config`` then ``--set``."""
  values = {}
  if args.config:
    values.update(load_config_file(args.config))
  values.update(parse_assignments(args.set))
  return Config.from_dict(values)


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="fedjax-bsa",
      description="Vectorized federated-learning simulator with adaptive "
      "per-client batch sizes.",
      epilog="Exit codes: 0 done; 2 a wrong setting or file; 3 a run that "
      "diverged; 130 stopped by SIGINT/SIGTERM (resumable); 1 a bug.")
  sub = p.add_subparsers(dest="command", required=True)
  r = sub.add_parser("run", help="run one simulation")
  _add_settings(r)
  _add_scale_out(r, "run")
  s = sub.add_parser("sweep", help="run a grid of experiments as one "
                     "vmapped, compiled program")
  _add_settings(s)
  s.add_argument("--grid", action="append", default=[],
                 metavar="KEY=V1,V2,...", help="values of a setting to sweep "
                 "(repeatable; the cartesian product is run)")
  _add_scale_out(s, "sweep")
  part = sub.add_parser("partition", help="print a partition's summary")
  _add_settings(part)
  sub.add_parser("settings", help="list every setting: default, allowed "
                 "values, whether a sweep may vary it, meaning",
                 description="Lists every setting of `--set key=value`.")
  b = sub.add_parser("bench", help="benchmarks: kernel (the round kernel "
                     "vs its baselines) or sweep (a packed sweep vs "
                     "separate runs); add --help after the name",
                     description="Benchmarks. `fedjax-bsa bench kernel "
                     "--help` and `fedjax-bsa bench sweep --help` list each "
                     "one's options (sizes, repetitions, --quick, --out).")
  b.add_argument("what", choices=["kernel", "sweep"],
                 help="kernel: the round kernel against the padded layout, "
                 "a naive per-client loop and FedJAX; sweep: experiments "
                 "packed into one sweep against separate runs")
  b.add_argument("rest", nargs=argparse.REMAINDER, metavar="OPTIONS",
                 help="the benchmark's options (see its --help)")
  # no options of its own: every argument, --help included, goes to the
  # study (a REMAINDER alone does not take arguments starting with "-")
  st = sub.add_parser("study", prefix_chars="+", add_help=False,
                      help="the regime study (fedjax_bsa.bench.study; "
                      "--quick for a small one, --help for its options)")
  st.add_argument("rest", nargs=argparse.REMAINDER)
  # like study: every argument, --help included, goes to the plot command
  pl = sub.add_parser("plot", prefix_chars="+", add_help=False,
                      help="PNG plots of run folders or a sweep folder: "
                      "plot DIR [DIR ...] [--out OUTDIR] [--target ACC] "
                      "(--help for its options)")
  pl.add_argument("rest", nargs=argparse.REMAINDER)
  return p


def _out_dir(args) -> str | None:
  """The output folder; checks ``--out`` against a run already there."""
  if args.resume and args.out and (os.path.abspath(args.resume) !=
                                   os.path.abspath(args.out)):
    raise ConfigError(f"--out {args.out} is not allowed with --resume "
                      f"{args.resume}: a resumed run writes into its own "
                      "folder")
  if args.resume and args.overwrite:
    raise ConfigError(f"--overwrite is not allowed with --resume "
                      f"{args.resume}: a resumed run keeps its records")
  if args.resume and os.path.exists(args.resume) and not os.path.isdir(
      args.resume):
    raise ConfigError(f"--resume {args.resume} is a file, not a run folder")
  if args.checkpoint_every is not None and (args.checkpoint_every == 0 or
                                            args.checkpoint_every < -1):
    raise ConfigError(f"--checkpoint-every {args.checkpoint_every} is not "
                      "allowed: give rounds >= 1, or -1 for no checkpoints")
  if args.out and not args.resume:
    from fedjax_bsa.run import outputs  # pylint: disable=g-import-not-at-top
    outputs.check_out_dir(args.out, args.overwrite)
  return args.resume or args.out


class _StopRequest:
  """SIGINT and SIGTERM ask a run to stop at the end of its chunk of rounds
  (``stop()`` is then true); a second signal stops it at once
  (``KeyboardInterrupt``). Installed only in the main thread."""

  def __init__(self):
    self.signum = None
    self._old = {}

  def __call__(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise KeyboardInterrupt
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for sig in (signal.SIGINT, signal.SIGTERM):
        self._old[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


def _resume_hint(args, out: str | None, command: str = "run") -> str:
  """Where an interrupted run or sweep can be continued from (one
  clause)."""
  if not out:
    return "nothing was saved to resume from (no --out)"
  if args.checkpoint_every == -1:
    return (f"its records are in {out}, but it cannot be resumed "
            "(--checkpoint-every -1: no checkpoints)")
  cmd = f"fedjax-bsa {command} --resume {shlex.quote(out)}"
  if args.checkpoint_every is not None:
    cmd += f" --checkpoint-every {args.checkpoint_every}"
  return f"resume with: {cmd}"


def _run(args) -> int:
  out = _out_dir(args)
  cfg = _resumed_config(args, out) if args.resume else config_from_args(args)
  if args.no_progress:
    cfg = cfg.replace(progress=False)
  _initialize(args)
  from fedjax_bsa.run import distributed  # pylint: disable=g-import-not-at-top
  from fedjax_bsa.run import runner  # pylint: disable=g-import-not-at-top
  with _StopRequest() as stop:
    try:
      result = runner.run(cfg, out, resume=bool(args.resume),
                          checkpoint_every=args.checkpoint_every, stop=stop,
                          round_lines=not cfg.progress)
    except KeyboardInterrupt:  # a second signal: stopped at once
      _remove_checkpoint_temporaries(out)
      print("fedjax-bsa: stopped at once by a second signal; the newest "
            "complete checkpoint is kept: "
            + _resume_hint(args, out), file=sys.stderr)
      return INTERRUPTED_EXIT_CODE
  stopped = result.summary["interrupted_round"]
  if stopped is not None:
    name = signal.Signals(stop.signum).name
    print(f"fedjax-bsa: stopped by {name} after round {stopped} of "
          f"{cfg.rounds}; " + _resume_hint(args, out),
          file=sys.stderr)
    return INTERRUPTED_EXIT_CODE
  if out and distributed.is_main():
    print(f"wrote {os.path.join(out, 'metrics.jsonl')} and summary.json")
  if result.summary["diverged_round"] is not None:
    return runner.DIVERGED_EXIT_CODE
  return 0


def _remove_checkpoint_temporaries(out: str | None) -> None:
  """Deletes orbax's temporary folders of a save cut short."""
  folder = os.path.join(out, "checkpoints") if out else None
  if not folder or not os.path.isdir(folder):
    return
  import shutil  # pylint: disable=g-import-not-at-top
  for name in os.listdir(folder):
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def _sweep(args) -> int:
  from fedjax_bsa.run import sweep  # pylint: disable=g-import-not-at-top
  out = _out_dir(args)
  if args.resume:
    if args.grid or args.set or args.config:
      raise ConfigError("--grid/--set/--config are not allowed with "
                        "--resume: the sweep's settings are in "
                        f"{os.path.join(args.resume, 'sweep.json')}")
    _initialize(args)
    kw = dict(progress=False) if args.no_progress else {}
    go = lambda stop: sweep.resume_sweep(
        out, checkpoint_every=args.checkpoint_every,
        round_lines=bool(args.no_progress), stop=stop, **kw)
    rounds = None
  else:
    cfg = config_from_args(args)
    if args.no_progress:
      cfg = cfg.replace(progress=False)
    grid = sweep.parse_grid(args.grid)
    overrides = sweep.expand_grid(grid)
    _initialize(args)
    go = lambda stop: sweep.run_sweep(
        cfg, overrides, out, checkpoint_every=args.checkpoint_every,
        round_lines=not cfg.progress, stop=stop)
    rounds = cfg.rounds
  with _StopRequest() as stop:
    try:
      result = go(stop)
    except KeyboardInterrupt:  # a second signal: stopped at once
      _remove_checkpoint_temporaries(out)
      print("fedjax-bsa: stopped at once by a second signal; the newest "
            "complete checkpoint is kept: "
            + _resume_hint(args, out, "sweep"), file=sys.stderr)
      return INTERRUPTED_EXIT_CODE
  stopped = [s["interrupted_round"] for s in result.summaries
             if s.get("interrupted_round") is not None]
  if stopped:
    name = signal.Signals(stop.signum).name
    of = f" of {rounds}" if rounds else ""
    print(f"fedjax-bsa: sweep stopped by {name} after round {max(stopped)}"
          f"{of}; " + _resume_hint(args, out, "sweep"), file=sys.stderr)
    return INTERRUPTED_EXIT_CODE
  return 0


def _partition(args) -> int:
  cfg = config_from_args(args)
  from fedjax_bsa.setup import experiment  # pylint: disable=g-import-not-at-top
  from fedjax_bsa.data import partition  # pylint: disable=g-import-not-at-top
  ds = experiment.load_dataset(cfg)
  parts = experiment.make_parts(cfg, ds)
  print(f"dataset={cfg.dataset} partition={cfg.partition} "
        f"clients={len(parts)}")
  print(partition.format_summary(partition.summarize(parts, ds.y_train,
                                                     ds.num_classes)))
  return 0


def main(argv=None) -> int:
  """Runs the command; returns its exit code.

  Exit codes: 0 success; 2 a user error (a bad setting or file: one line
  on stderr, nothing written); 3 a run that diverged (its records so far
  are kept); 130 a run or sweep stopped by SIGINT or SIGTERM (checkpointed and
  resumable); 1 anything else (a bug: the traceback is printed).
  """
  args = _parser().parse_args(argv)
  commands = dict(run=_run, sweep=_sweep, partition=_partition,
                  settings=_settings, bench=_bench, study=_study, plot=_plot)
  try:
    return commands[args.command](args)
  except ConfigError as e:
    print(f"fedjax-bsa: error: {e}", file=sys.stderr)
    return 2


def _settings(args) -> int:
  del args
  print(Config.describe())
  return 0


def _bench(args) -> int:
  if args.what == "sweep":
    from fedjax_bsa.bench.sweep import main as sweep
    return sweep.main(args.rest)
  from fedjax_bsa.bench.kernel import main as kernel
  return kernel.main(args.rest)


def _study(args) -> int:
  from fedjax_bsa.bench.study import main as study
  return study.main(args.rest)


def _plot(args) -> int:
  from fedjax_bsa.report import plot  # pylint: disable=g-import-not-at-top
  return plot.main(args.rest)


if __name__ == "__main__":
  sys.exit(main())
