"""One run end to end: :func:`run` is a sweep of one experiment (it takes
the sweep's path, :func:`fedjax_bsa.run.sweep.execute_experiments`).

Writes, under ``out_dir``: ``config.json`` (first), ``metrics.jsonl`` (one
object per evaluated round, flushed as it goes), ``clients.npz`` (per-client
plans per round), ``summary.json`` (last) and, between chunks,
``checkpoints/<round>/`` (the last two), from which ``run(...,
resume=True)`` continues. A fresh run first removes a previous run's files
from ``out_dir`` (plots included: :func:`fedjax_bsa.run.outputs.clear_run`);
the command line refuses such a folder unless given ``--overwrite``. Only
process 0 writes. See :mod:`fedjax_bsa.run.driver` for devices and processes.
"""

from __future__ import annotations

import sys
from typing import Any, NamedTuple

from fedjax_bsa.core.config import Config, ConfigError
from fedjax_bsa.run import distributed
from fedjax_bsa.run import sweep
from fedjax_bsa.run.outputs import format_table

__all__ = ["RunResult", "run", "DIVERGED_EXIT_CODE"]

#: Exit code of ``fedjax-bsa run`` when the run diverged (the records
#: written so far are kept).
DIVERGED_EXIT_CODE = 3


class RunResult(NamedTuple):
  records: list          # the metrics.jsonl objects
  summary: dict
  compiles: int          # traces of the chunk function
  clients: dict          # per-client trajectories (numpy)
  state: Any             # final SimState (leaves [1, ...])


def run(cfg: Config, out_dir: str | None = None, *,
        print_table: bool = True, stream=None, mesh: Any = "auto",
        resume: bool = False, checkpoint_every: int | None = None,
        stop=None, round_lines: bool = False) -> RunResult:
  """Runs one simulation end to end.

  Args:
    cfg: the settings (validated here).
    out_dir: where to write the outputs (None: write nothing).
    print_table: print the final table to ``stream``.
    stream: text stream for messages (default ``sys.stdout``).
    mesh: ``"auto"`` (a ``clients`` mesh over every device when there are
      several, else none), a ``jax.sharding.Mesh`` with a ``clients`` axis,
      or None (one device, required to be a single process).
    resume: continue from the newest valid checkpoint in
      ``out_dir/checkpoints`` (start afresh if there is none).
    checkpoint_every: rounds between checkpoints when ``out_dir`` is given
      (None or 0: after every chunk of ``eval_every`` rounds; -1: never).
    stop: ``stop() -> bool``, polled between chunks of rounds: when true,
      the run checkpoints the rounds done and ends early (e.g. on SIGINT).
    round_lines: print one line per evaluated round as it comes (the
      command line's ``--no-progress``).

  Returns:
    A :class:`RunResult`; ``summary["diverged_round"]`` is the round at
    which the training loss became non-finite, or at which the test loss
    became non-finite or rose above
    :data:`~fedjax_bsa.run.outputs.DIVERGED_FACTOR` times its first evaluation
    (None if neither); ``summary["interrupted_round"]`` is the round at
    which ``stop`` ended the run (None if it did not).
  """
  cfg = cfg.validate()
  if resume and not out_dir:
    raise ConfigError("resume needs out_dir: the run's output folder")
  done = sweep.execute_experiments(
      cfg, [{}], [out_dir], out_dir=out_dir, tags=[""], keep_going=False,
      stream=stream, mesh=mesh, resume=resume,
      checkpoint_every=checkpoint_every, stop=stop, round_lines=round_lines)
  out, summary = done.outputs[0], done.summaries[0]
  if print_table and distributed.is_main():
    print(format_table(out.records, summary), file=stream or sys.stdout)
  return RunResult(out.records, summary, done.compiles, out.clients(),
                   done.state)
