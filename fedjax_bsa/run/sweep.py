"""Many experiments as one compiled program (PureJaxRL style).

Each experiment's host-side pieces (partition, resources, traced settings,
key, test set) are built on the host; the round loop steps every
experiment's model together, and the client jobs of all experiments share
one pool of kernel lanes, so a sweep costs its total work
(:mod:`fedjax_bsa.run.simulate`, :mod:`fedjax_bsa.run.driver`). Only settings
that keep shapes and the program's structure can vary
(:data:`~fedjax_bsa.core.config.SWEEPABLE`, declared in the config's metadata);
anything else is rejected naming the key.

Outputs under ``out_dir``: ``sweep.json`` (the base settings and each
experiment's overrides, for ``--resume``), one folder per experiment
(``exp_000``, ...: the files of a run), ``sweep.jsonl`` (one line per
experiment: its overrides and summary), ``table.txt``, and
``checkpoints/``. A fresh sweep first removes a previous run's or sweep's
files from ``out_dir`` (:func:`fedjax_bsa.run.outputs.clear_run`).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax

from fedjax_bsa.core.config import check_sweepable
from fedjax_bsa.core.config import parse_assignments
from fedjax_bsa.core.config import SWEEPABLE, Config, ConfigError
from fedjax_bsa.report import regime
from fedjax_bsa.run import distributed
from fedjax_bsa.run import driver
from fedjax_bsa.run import loop
from fedjax_bsa.run.outputs import DIVERGED_FACTOR, Outputs, clear_run

__all__ = ["SWEEPABLE", "SweepResult", "parse_grid", "expand_grid",
           "check_sweepable", "run_sweep", "resume_sweep", "format_sweep"]


class SweepResult(NamedTuple):
  records: list     # per experiment, its metrics.jsonl objects ([] if it
                    # failed to build)
  summaries: list   # per experiment, its summary (``{"failed": why}`` if
                    # its data, partition or resources could not be built)
  overrides: list   # per experiment, the settings that differ from the base
  compiles: int     # traces of the chunk function (1 for the whole sweep)
  state: Any        # the final stacked state ``[E', ...]``


def parse_grid(items: list[str]) -> dict[str, list[str]]:
  """Parses ``["seed=0,1,2", "client_lr=0.05,0.1"]`` (``--grid``)."""
  grid = {}
  for item in items:
    if "=" not in item:
      raise ConfigError(f"--grid {item!r} is not allowed: expected "
                        "key=v1,v2,...")
    key, values = item.split("=", 1)
    key = key.strip().split(".")[-1]
    vals = [v.strip() for v in values.split(",") if v.strip()]
    if not vals:
      raise ConfigError(f"--grid {item!r} is not allowed: give at least one "
                        "value")
    for v in vals:
      parse_assignments([f"{key}={v}"])  # names an unknown key or value
    grid[key] = vals
  return grid


def expand_grid(grid: dict[str, list]) -> list[dict]:
  """The cartesian product of ``grid``, in order, as override dicts."""
  check_sweepable(grid)
  keys = list(grid)
  return [dict(zip(keys, values))
          for values in itertools.product(*(grid[k] for k in keys))]


def format_sweep(names: list, overrides: list, summaries: list) -> str:
  """One line per experiment: overrides, final and best accuracy, times."""
  head = (f"{'experiment':<10} {'settings':<40} {'final_acc':>9} "
          f"{'best_acc':>8} {'sim_s':>9} {'rounds':>6}")
  lines = [head]
  for name, o, s in zip(names, overrides, summaries):
    text = ",".join(f"{k}={v}" for k, v in o.items()) or "-"
    if "failed" in s:
      lines.append(f"{name:<10} {text[:40]:<40} failed: {s['failed']}")
      continue
    div = "" if s["diverged_round"] is None else " (diverged)"
    lines.append(f"{name:<10} {text[:40]:<40} "
                 f"{s['final_test_accuracy']:>9.4f} "
                 f"{s['best_test_accuracy']:>8.4f} {s['sim_time_s']:>9.1f} "
                 f"{s['rounds']:>6}{div}")
  return "\n".join(lines)


class Executed(NamedTuple):
  """Experiments run to the end by :func:`execute_experiments`."""
  prepared: Any     # the driver's Prepared
  outputs: list     # per prepared experiment, its Outputs
  summaries: list   # per override, its summary ({"failed": why} if its
                    # data, partition or resources could not be built)
  compiles: int
  wall: float
  state: Any


def execute_experiments(base: Config, overrides: list[dict],
                        out_dirs: list, *, out_dir: str | None, tags: list,
                        keep_going: bool, stream, mesh, resume: bool,
                        checkpoint_every: int | None, stop, round_lines: bool,
                        sweep_spec: dict | None = None) -> Executed:
  """The one path of a run and a sweep: prepare the experiments (build,
  place, jit: :func:`fedjax_bsa.run.driver.prepare`), clear ``out_dir``
  of a previous run (unless resuming), run the loop
  (:func:`fedjax_bsa.run.loop.execute`: evaluation, records, checkpoints,
  divergence, ``stop``) and write each experiment's summary."""
  stream = stream or sys.stdout
  start = time.perf_counter()
  if out_dir:
    distributed.check_same_everywhere(os.path.abspath(out_dir), "--out")
  pre = driver.prepare(base, overrides, mesh, keep_going=keep_going,
                       log=distributed.main_printer(stream))
  if out_dir and not resume and distributed.is_main():
    clear_run(out_dir)  # a previous run's or sweep's files, plots included
  outs = [Outputs(c, out_dirs[i], tags[i])
          for c, i in zip(pre.configs, pre.kept)]
  if sweep_spec is not None and out_dir and distributed.is_main():
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sweep.json"), "w") as fh:
      json.dump(sweep_spec, fh, indent=1)
  for i, why in sorted(pre.failed.items()):
    print(f"failed{tags[i]}: {why}", file=sys.stderr)
  ckpt = loop.checkpointer(out_dir, checkpoint_every, resume)
  state, compiles = loop.execute(pre, outs, ckpt=ckpt,
                                 checkpoint_every=checkpoint_every or 0,
                                 progress=base.progress, start=start,
                                 resume=resume, stop=stop,
                                 diverged_factor=DIVERGED_FACTOR,
                                 round_lines=round_lines)
  wall = time.perf_counter() - start + (outs[0].wall_offset if outs else 0)
  summaries = [dict(failed=pre.failed.get(i)) for i in range(len(overrides))]
  E = len(pre.configs)
  for o, x, i in zip(outs, pre.experiments, pre.kept):
    extra = (dict(overrides=overrides[i], experiments=E)
             if sweep_spec is not None else {})
    summaries[i] = o.finish(compiles=compiles, lanes=pre.sim.lanes,
                            microbatch=pre.sim.microbatch,
                            per_slot=pre.sim.per_slot,
                            layout=pre.layout.summary(),
                            num_clients=x.num_clients, wall=wall,
                            devices=[str(d) for d in jax.devices()],
                            **extra, **regime.describe(x, o.records))
  return Executed(pre, outs, summaries, compiles, wall, state)


def run_sweep(base: Config, overrides: list[dict], out_dir: str | None = None,
              *, print_table: bool = True, stream=None, mesh: Any = "auto",
              resume: bool = False,
              checkpoint_every: int | None = None,
              round_lines: bool = False, stop=None) -> SweepResult:
  """Runs ``len(overrides)`` experiments as one vmapped program.

  Args:
    base: the settings shared by every experiment.
    overrides: per experiment, ``{key: value}`` of :data:`SWEEPABLE` keys.
    out_dir: where to write (None: nothing).
    print_table: print the summary table to ``stream``.
    stream: text stream (default ``sys.stdout``).
    mesh: as :func:`fedjax_bsa.run.driver.prepare`.
    resume: continue from ``out_dir/checkpoints``.
    checkpoint_every: as :func:`fedjax_bsa.run.runner.run`.
    round_lines: print one line per evaluated round as it comes.
    stop: ``stop() -> bool``, polled between chunks (as in a run).

  Returns:
    A :class:`SweepResult`; each experiment's records equal a separate
    :func:`~fedjax_bsa.run.runner.run` with its settings (float32 tolerance).
  """
  names = [f"exp_{e:03d}" for e in range(len(overrides))]
  done = execute_experiments(
      base, overrides,
      [os.path.join(out_dir, n) if out_dir else None for n in names],
      out_dir=out_dir, tags=[f" ({n})" for n in names], keep_going=True,
      stream=stream, mesh=mesh, resume=resume,
      checkpoint_every=checkpoint_every, stop=stop, round_lines=round_lines,
      sweep_spec=dict(base=base.to_dict(), overrides=overrides))
  stream = stream or sys.stdout
  pre, outs, summaries = done.prepared, done.outputs, done.summaries
  E, compiles, wall, state = len(pre.configs), done.compiles, done.wall, \
      done.state
  records = [[] for _ in overrides]
  for o, i in zip(outs, pre.kept):
    records[i] = o.records
  table = format_sweep(names, overrides, summaries)
  if out_dir and distributed.is_main():
    with open(os.path.join(out_dir, "sweep.jsonl"), "w") as fh:
      for n, s in zip(names, summaries):
        fh.write(json.dumps(dict(experiment=n, **s)) + "\n")
    with open(os.path.join(out_dir, "table.txt"), "w") as fh:
      fh.write(table + "\n")
  if print_table and distributed.is_main():
    print(table, file=stream)
    print(f"{E} experiments ({len(pre.failed)} failed to build), "
          f"{compiles} compile(s) of the round "
          f"loop, wall {wall:.1f} s", file=stream)
  return SweepResult(records, summaries, list(overrides), compiles, state)


def resume_sweep(out_dir: str, **kwargs) -> SweepResult:
  """Continues the sweep whose outputs are in ``out_dir``."""
  path = os.path.join(out_dir, "sweep.json")
  try:
    with open(path) as fh:
      spec = json.load(fh)
  except OSError as e:
    raise ConfigError(f"--resume {out_dir}: cannot read {path}: "
                     f"{e.strerror}") from None
  base = Config.from_dict(spec["base"])
  if "progress" in kwargs:
    base = base.replace(progress=kwargs.pop("progress"))
  return run_sweep(base, spec["overrides"], out_dir, resume=True, **kwargs)
