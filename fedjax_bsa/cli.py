"""The ``fedjax-bsa`` command.

  fedjax-bsa run [--set key=value ...] [--config FILE] [--out DIR]
  fedjax-bsa run --resume DIR           continue a killed run
  fedjax-bsa sweep --grid seed=0,1,2 --grid client_lr=0.05,0.1 --out DIR
                                        experiments as one compiled program
  fedjax-bsa partition [--set ...]      summary of a partition
  fedjax-bsa settings                   every setting, its default and range
  fedjax-bsa bench kernel [...]         the round-kernel benchmark

``run`` and ``sweep`` join a multi-process JAX job with ``--coordinator
HOST:PORT --num-processes N --process-id I`` (or ``FEDJAX_BSA_COORDINATOR``,
``FEDJAX_BSA_NUM_PROCESSES``, ``FEDJAX_BSA_PROCESS_ID``); only process 0
writes.

Exit codes: 0 success; 2 a user error (a wrong setting or file: one line
naming it, nothing written); 3 a run whose training loss became non-finite
(the records so far are kept); 1 anything else (a bug: with its traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from fedjax_bsa.config import Config, ConfigError, load_config_file
from fedjax_bsa.config import parse_assignments

__all__ = ["main", "config_from_args"]


def _add_settings(p: argparse.ArgumentParser) -> None:
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a setting (repeatable); see `fedjax-bsa settings`")
  p.add_argument("--config", metavar="FILE",
                 help="settings from a JSON or YAML file (--set wins)")


def _add_scale_out(p: argparse.ArgumentParser, what: str) -> None:
  p.add_argument("--out", metavar="DIR", help=f"write the {what}'s files "
                 "here")
  p.add_argument("--resume", metavar="DIR", help=f"continue the {what} "
                 "whose outputs are in DIR from its newest valid checkpoint")
  p.add_argument("--checkpoint-every", type=int, metavar="ROUNDS",
                 help="rounds between checkpoints (default: every "
                 "eval_every rounds; -1: none)")
  p.add_argument("--no-progress", action="store_true")
  g = p.add_argument_group("several processes (one per host)")
  g.add_argument("--coordinator", metavar="HOST:PORT",
                 help="process 0's address (or $FEDJAX_BSA_COORDINATOR)")
  g.add_argument("--num-processes", metavar="N",
                 help="processes in the job (or $FEDJAX_BSA_NUM_PROCESSES)")
  g.add_argument("--process-id", metavar="I",
                 help="this process (or $FEDJAX_BSA_PROCESS_ID)")


def _initialize(args) -> None:
  from fedjax_bsa import distributed  # pylint: disable=g-import-not-at-top
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
      "per-client batch sizes.")
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
  sub.add_parser("settings", help="list every setting")
  b = sub.add_parser("bench", help="benchmarks: kernel (the round kernel "
                     "vs its baselines) or sweep (a packed sweep vs "
                     "separate runs); add --help after the name")
  b.add_argument("what", choices=["kernel", "sweep"])
  b.add_argument("rest", nargs=argparse.REMAINDER)
  # no options of its own: every argument, --help included, goes to the
  # study (a REMAINDER alone does not take arguments starting with "-")
  st = sub.add_parser("study", prefix_chars="+", add_help=False,
                      help="the regime study (fedjax_bsa.bench.regimes; "
                      "--quick for a small one, --help for its options)")
  st.add_argument("rest", nargs=argparse.REMAINDER)
  pl = sub.add_parser("plot", help="PNG plots of run folders: plot DIR "
                      "[DIR ...] [--out OUTDIR]")
  pl.add_argument("rest", nargs=argparse.REMAINDER)
  return p


def _out_dir(args) -> str | None:
  if args.resume and args.out and (os.path.abspath(args.resume) !=
                                   os.path.abspath(args.out)):
    raise ConfigError(f"--out {args.out} is not allowed with --resume "
                      f"{args.resume}: a resumed run writes into its own "
                      "folder")
  return args.resume or args.out


def _run(args) -> int:
  out = _out_dir(args)
  cfg = _resumed_config(args, out) if args.resume else config_from_args(args)
  if args.no_progress:
    cfg = cfg.replace(progress=False)
  _initialize(args)
  from fedjax_bsa import distributed  # pylint: disable=g-import-not-at-top
  from fedjax_bsa import runner  # pylint: disable=g-import-not-at-top
  result = runner.run(cfg, out, resume=bool(args.resume),
                      checkpoint_every=args.checkpoint_every)
  if out and distributed.is_main():
    print(f"wrote {os.path.join(out, 'metrics.jsonl')} and summary.json")
  if result.summary["diverged_round"] is not None:
    return runner.DIVERGED_EXIT_CODE
  return 0


def _sweep(args) -> int:
  from fedjax_bsa import sweep  # pylint: disable=g-import-not-at-top
  out = _out_dir(args)
  if args.resume:
    if args.grid or args.set or args.config:
      raise ConfigError("--grid/--set/--config are not allowed with "
                        "--resume: the sweep's settings are in "
                        f"{os.path.join(args.resume, 'sweep.json')}")
    _initialize(args)
    kw = dict(progress=False) if args.no_progress else {}
    sweep.resume_sweep(out, checkpoint_every=args.checkpoint_every, **kw)
    return 0
  cfg = config_from_args(args)
  if args.no_progress:
    cfg = cfg.replace(progress=False)
  grid = sweep.parse_grid(args.grid)
  overrides = sweep.expand_grid(grid)
  _initialize(args)
  sweep.run_sweep(cfg, overrides, out, checkpoint_every=args.checkpoint_every)
  return 0


def _partition(args) -> int:
  cfg = config_from_args(args)
  from fedjax_bsa import experiment  # pylint: disable=g-import-not-at-top
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
  on stderr, nothing written); 3 a run whose training loss became
  non-finite (its records so far are kept); 1 anything else (a bug: the
  traceback is printed).
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
    from fedjax_bsa.bench import sweep_bench  # pylint: disable=g-import-not-at-top
    return sweep_bench.main(args.rest)
  from fedjax_bsa.bench import kernel_main  # pylint: disable=g-import-not-at-top
  return kernel_main.main(args.rest)


def _study(args) -> int:
  from fedjax_bsa.bench import regimes_main  # pylint: disable=g-import-not-at-top
  return regimes_main.main(args.rest)


def _plot(args) -> int:
  from fedjax_bsa import plot  # pylint: disable=g-import-not-at-top
  return plot.main(args.rest)


if __name__ == "__main__":
  sys.exit(main())
