"""The host loop of prepared experiments (:func:`fedjax_bsa.run.driver.
prepare`): :func:`execute` runs the jitted round loop in chunks
(:func:`drive`), evaluating, writing records, checkpointing and stopping
diverged experiments, then writes each experiment's summary.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable

import jax
import numpy as np

from fedjax_bsa.core.config import ConfigError
from fedjax_bsa.run import checkpoint as checkpoint_lib
from fedjax_bsa.run import distributed
from fedjax_bsa.run.driver import Prepared
from fedjax_bsa.run.outputs import chunk_records

__all__ = ["execute", "drive", "checkpointer", "clear_checkpoints"]


def drive(rounds: int, chunk: int, state, step: Callable, evaluate: Callable,
          outputs: list, *, ckpt: checkpoint_lib.Checkpointer | None = None,
          checkpoint_every: int = 0, progress: bool = False, start=None,
          stream=None, resume: bool = False,
          stop: Callable[[], bool] | None = None,
          diverged_factor: float | None = None, round_lines: bool = False):
  """The host loop over chunks of rounds, for ``E >= 1`` experiments.

  Args:
    rounds: rounds to run in total.
    chunk: rounds per ``step`` call.
    state: the device state (restored from ``ckpt`` when it holds a step).
    step: ``step(state, rounds_left) -> (state, metrics)``, ``metrics`` a
      dict of numpy arrays ``[E, chunk, ...]``.
    evaluate: ``evaluate(state) -> (accuracy[E], loss[E], sim_time[E])``
      as numpy.
    outputs: one :class:`~fedjax_bsa.run.outputs.Outputs` per experiment.
    ckpt: where to checkpoint (None: nowhere).
    checkpoint_every: rounds between checkpoints (rounded up to whole
      chunks; 0: every chunk).
    progress: show a progress bar (process 0).
    start: ``time.perf_counter()`` at the start of the run.
    stream: where to print messages.
    resume: say from which round the run continues (or that it starts
      again from round 0 when no checkpoint is valid).
    stop: polled before and after every chunk; when it returns True the
      loop checkpoints the rounds done (if ``ckpt``), marks every active
      output ``interrupted`` and returns.
    diverged_factor: also stop an experiment whose test loss rises above
      this multiple of its first evaluation or becomes non-finite
      (:meth:`~fedjax_bsa.run.outputs.Outputs.check_diverged`; None: only a
      non-finite training loss).
    round_lines: print a line to stdout after every evaluation (process
      0; for runs without a progress bar, so that piped output streams).

  Returns:
    The final state.
  """
  start = time.perf_counter() if start is None else start
  stream = stream or sys.stderr
  wall0, done = 0.0, 0
  restored = ckpt.restore(state) if ckpt is not None else None
  if restored is not None:
    state, done = restored.state, restored.step
    wall0 = restored.meta["wall_time_s"]
    for e, out in enumerate(outputs):
      out.load(restored.meta["experiments"][e], restored.host, e, wall0)
  if resume and distributed.is_main():
    print(f"fedjax-bsa: resuming from step {done} (round {done} of "
          f"{rounds})" if restored is not None else "fedjax-bsa: no valid "
          f"checkpoint to resume from: restarting from round 0 of {rounds}",
          file=stream)
  wall = lambda: wall0 + time.perf_counter() - start
  for out in outputs:
    out.open()
  if restored is None:
    _evaluated(evaluate(state), outputs, done, wall(), None, 0)
  bar = _progress_bar(rounds, done) if progress else None
  say = _sayer(bar, stream)
  last_saved = done
  stop = stop or (lambda: False)
  while done < rounds and any(o.active for o in outputs):
    if stop():
      break
    left = rounds - done
    state, m = step(state, np.int32(left))
    n = min(chunk, left)
    for e, out in enumerate(outputs):
      if out.active:
        out.add_clients(jax.tree.map(lambda a: a[e], m), n)
    done += n
    if bar is not None:
      bar.update(n)
      losses = m["train_loss"][:, n - 1]
      finite = losses[np.isfinite(losses)]
      bar.set_postfix(loss=f"{finite.mean():.3f}" if finite.size else "nan")
    _evaluated(evaluate(state), outputs, done, wall(), m, n)
    if round_lines and distributed.is_main():
      print(_round_line(outputs, done, rounds), flush=True)
    for e, out in enumerate(outputs):
      msg = out.check_diverged(m["train_loss"][e, :n], done,
                               diverged_factor)
      if msg and distributed.is_main():
        say(msg)
    finished = done >= rounds or not any(o.active for o in outputs)
    if ckpt is not None and (finished or
                             done - last_saved >= checkpoint_every):
      _save(ckpt, state, outputs, done, wall())
      last_saved = done
  if done < rounds and stop():
    if ckpt is not None and last_saved < done:
      _save(ckpt, state, outputs, done, wall())
    for out in outputs:
      if out.active:
        out.interrupted = done
  if bar is not None:
    bar.close()
  return state


def _round_line(outputs: list, done: int, rounds: int) -> str:
  """``round 10/50: test accuracy ...`` of the experiments still active
  (their mean, min and max when there are several)."""
  recs = [o.records[-1] for o in outputs if o.active and o.records]
  acc = [r["test_accuracy"] for r in recs if r["test_accuracy"] is not None]
  line = f"round {done}/{rounds}: "
  if len(recs) == 1 and acc:
    loss = recs[0]["test_loss"]
    line += f"test accuracy {acc[0]:.4f}, test loss " + (
        f"{loss:.4f}" if loss is not None else "nan")
  elif acc:
    line += (f"test accuracy mean {np.mean(acc):.4f} (min {min(acc):.4f}, "
             f"max {max(acc):.4f}) over {len(recs)} experiments")
  else:
    line += "no finite test accuracy"
  return line + f", wall {recs[0]['wall_time_s']:.1f} s" if recs else line


def _sayer(bar, stream) -> Callable[[str], None]:
  """Prints a message on its own line (above the progress bar, if any)."""
  if bar is None:
    return lambda msg: print(msg, file=stream, flush=True)
  return lambda msg: bar.write(msg, file=stream)


def _progress_bar(rounds: int, done: int):
  if not distributed.is_main():
    return None
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=rounds, initial=done, desc="rounds", unit="round",
              file=sys.stderr, leave=False)


def _evaluated(evaluation, outputs: list, done: int, wall: float, chunk_m,
               n: int) -> None:
  """Records round ``done`` of every active experiment."""
  acc, loss, sim_time = evaluation
  for e, out in enumerate(outputs):
    if out.active:
      extra = (chunk_records(jax.tree.map(lambda a: a[e], chunk_m), n)
               if chunk_m is not None else None)
      out.record(done, float(sim_time[e]), wall, acc[e], loss[e], extra)


def _save(ckpt, state, outputs: list, done: int, wall: float) -> None:
  meta = dict(wall_time_s=wall, rounds=done,
              experiments=[o.meta() for o in outputs])
  host = {}
  for e, o in enumerate(outputs):
    host.update(o.host_arrays(e))
  ckpt.save(done, state, meta, host)


def execute(pre: Prepared, outputs: list, *, ckpt=None,
            checkpoint_every: int = 0, progress: bool = False, start=None,
            **drive_kw):
  """Runs prepared experiments to the end (see :func:`drive`, which takes
  ``drive_kw``: ``resume``, ``stop``, ``diverged_factor``).

  Returns:
    ``(state, compiles)``: the final state (leaves ``[E', ...]``) and the
    number of compiles of the round loop.
  """
  E = len(pre.configs)
  state = pre.init(pre.keys, pre.data, pre.inputs)
  x_test, y_test = pre.tests

  def step(st, left):
    st, m = pre.run_chunk(st, pre.data, pre.inputs, left)
    return st, {k: v[:E] for k, v in distributed.to_host(
        m._asdict()).items()}

  def evaluate_state(st):
    out = distributed.to_host((*pre.evaluate(st.params, x_test, y_test),
                               st.sim_time))
    return tuple(a[:E] for a in out)

  state = drive(pre.configs[0].rounds, pre.sim.chunk, state, step,
                evaluate_state, outputs, ckpt=ckpt,
                checkpoint_every=checkpoint_every, progress=progress,
                start=start, stream=sys.stderr, **drive_kw)
  return state, len(pre.sim.traces)


def checkpointer(out_dir: str | None, checkpoint_every: int | None,
                 resume: bool):
  """The checkpointer of an output folder (None: no checkpoints)."""
  if out_dir and (checkpoint_every or 0) >= 0:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, "checkpoints"))
    if not resume:
      clear_checkpoints(ckpt)
    return ckpt
  if resume:
    raise ConfigError("resume needs an output folder with checkpoints "
                      "(checkpoint_every=-1 disables them)")
  return None


def clear_checkpoints(ckpt: checkpoint_lib.Checkpointer) -> None:
  """Removes a previous run's checkpoints from a fresh run's folder."""
  if distributed.is_main():
    for step in ckpt.steps():
      shutil.rmtree(os.path.join(ckpt.directory, str(step)),
                    ignore_errors=True)
  distributed.sync("fedjax_bsa_ckpt_clear")
