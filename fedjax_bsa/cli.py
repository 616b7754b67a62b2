"""The ``fedjax-bsa`` command.

  fedjax-bsa run [--set key=value ...] [--config FILE] [--out DIR]
  fedjax-bsa partition [--set ...]      summary of a partition
  fedjax-bsa settings                   every setting, its default and range
  fedjax-bsa bench kernel [...]         the round-kernel benchmark
  fedjax-bsa sweep / study / plot       (see --help of each)

A wrong setting is a one-line error naming it, exit code 2, and nothing is
written.
"""

from __future__ import annotations

import argparse
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
  r.add_argument("--out", metavar="DIR", help="write config.json, "
                 "metrics.jsonl, clients.npz and summary.json here")
  r.add_argument("--no-progress", action="store_true")
  part = sub.add_parser("partition", help="print a partition's summary")
  _add_settings(part)
  sub.add_parser("settings", help="list every setting")
  b = sub.add_parser("bench", help="benchmarks")
  b.add_argument("what", choices=["kernel"])
  b.add_argument("rest", nargs=argparse.REMAINDER)
  return p


def _run(args) -> int:
  cfg = config_from_args(args)
  if args.no_progress:
    cfg = cfg.replace(progress=False)
  from fedjax_bsa import runner  # pylint: disable=g-import-not-at-top
  runner.run(cfg, args.out)
  if args.out:
    print(f"wrote {os.path.join(args.out, 'metrics.jsonl')} and "
          f"summary.json")
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
  args = _parser().parse_args(argv)
  try:
    if args.command == "run":
      return _run(args)
    if args.command == "partition":
      return _partition(args)
    if args.command == "settings":
      print(Config.describe())
      return 0
    if args.command == "bench":
      from benchmarks import round_kernel  # pylint: disable=g-import-not-at-top
      return round_kernel.main(args.rest)
  except ConfigError as e:
    print(f"fedjax-bsa: error: {e}", file=sys.stderr)
    return 2
  except ValueError as e:
    print(f"fedjax-bsa: error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
