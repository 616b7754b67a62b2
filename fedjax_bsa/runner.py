"""The host loop of one run: compiled chunks, evaluation, files, checkpoints.

Writes, under ``out_dir`` (DESIGN.md section 6): ``config.json`` (first),
``metrics.jsonl`` (one object per evaluated round, flushed as it goes),
``clients.npz`` (per-client plans per round), ``summary.json`` (last) and,
between chunks, ``checkpoints/<round>/`` (the last two), from which
``run(..., resume=True)`` continues. Only process 0 writes.

With several devices (or processes) the clients' data is sharded over a
``clients`` mesh axis spanning all of them, and the round kernel's lanes with
it (:mod:`fedjax_bsa.distributed`).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_bsa import checkpoint as checkpoint_lib
from fedjax_bsa import distributed
from fedjax_bsa import simulate
from fedjax_bsa.config import Config
from fedjax_bsa.experiment import build
from fedjax_bsa.outputs import Outputs, chunk_records, format_table

__all__ = ["RunResult", "run", "drive", "clear_checkpoints", "chunk_records",
           "format_table", "Outputs", "CLIENTS_AXIS"]

CLIENTS_AXIS = "clients"


class RunResult(NamedTuple):
  records: list          # the metrics.jsonl objects
  summary: dict
  compiles: int          # traces of the chunk function
  clients: dict          # per-client trajectories (numpy)
  state: Any             # final SimState


def drive(rounds: int, chunk: int, state, step: Callable, evaluate: Callable,
          outputs: list, *, ckpt: checkpoint_lib.Checkpointer | None = None,
          checkpoint_every: int = 0, progress: bool = False, start=None,
          stream=None):
  """The host loop over chunks of rounds, for ``E >= 1`` experiments.

  Args:
    rounds: rounds to run in total.
    chunk: rounds per ``step`` call.
    state: the device state (restored from ``ckpt`` when it holds a step).
    step: ``step(state, rounds_left) -> (state, metrics)``, ``metrics`` a
      dict of numpy arrays ``[E, chunk, ...]``.
    evaluate: ``evaluate(state) -> (accuracy[E], loss[E], sim_time[E])``
      as numpy.
    outputs: one :class:`Outputs` per experiment.
    ckpt: where to checkpoint (None: nowhere).
    checkpoint_every: rounds between checkpoints (rounded up to whole
      chunks; 0: every chunk).
    progress: show a progress bar (process 0).
    start: ``time.perf_counter()`` at the start of the run.
    stream: where to print messages.

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
  wall = lambda: wall0 + time.perf_counter() - start
  for out in outputs:
    out.open()

  def evaluated(chunk_m, n):
    acc, loss, sim_time = evaluate(state)
    for e, out in enumerate(outputs):
      if out.active:
        extra = (chunk_records(jax.tree.map(lambda a: a[e], chunk_m), n)
                 if chunk_m is not None else None)
        out.record(done, float(sim_time[e]), wall(), acc[e], loss[e], extra)

  if restored is None:
    evaluated(None, 0)
  bar = None
  if progress and distributed.is_main():
    from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
    bar = tqdm(total=rounds, initial=done, desc="rounds", unit="round",
               file=sys.stderr, leave=False)
  last_saved = done
  while done < rounds and any(o.active for o in outputs):
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
    evaluated(m, n)
    for e, out in enumerate(outputs):
      bad = ~np.isfinite(m["train_loss"][e, :n])
      if out.active and bad.any():
        out.diverged = done - n + int(np.argmax(bad)) + 1
        if distributed.is_main():
          print(f"diverged{out.label}: the training loss became non-finite "
                f"at round {out.diverged}; stopped after round {done}, "
                f"keeping the {len(out.records)} records written",
                file=stream)
    finished = done >= rounds or not any(o.active for o in outputs)
    if ckpt is not None and (finished or
                             done - last_saved >= checkpoint_every):
      meta = dict(wall_time_s=wall(), rounds=done,
                  experiments=[o.meta() for o in outputs])
      host = {}
      for e, o in enumerate(outputs):
        host.update(o.host_arrays(e))
      ckpt.save(done, state, meta, host)
      last_saved = done
  if bar is not None:
    bar.close()
  return state


def _sharding(mesh):
  return {} if mesh is None else dict(
      out_shardings=NamedSharding(mesh, P()))


def run(cfg: Config, out_dir: str | None = None, *,
        print_table: bool = True, stream=None, mesh: Any = "auto",
        resume: bool = False, checkpoint_every: int | None = None
        ) -> RunResult:
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

  Returns:
    A :class:`RunResult`.
  """
  stream = stream or sys.stdout
  start = time.perf_counter()
  cfg = cfg.validate()
  if isinstance(mesh, str):
    if mesh != "auto":
      raise ValueError(f"mesh={mesh!r} is not allowed: 'auto', a Mesh or "
                       "None")
    mesh = (distributed.make_mesh(CLIENTS_AXIS) if jax.device_count() > 1
            else None)
  if mesh is None and jax.process_count() > 1:
    raise ValueError("mesh=None is not allowed with several processes")
  if resume and not out_dir:
    raise ValueError("resume needs out_dir: the run's output folder")
  if out_dir:
    distributed.check_same_everywhere(os.path.abspath(out_dir), "--out")
  exp = build(cfg, with_data=False)
  ds = exp.dataset
  n_max = max(len(p) for p in exp.parts)
  data = distributed.client_data(ds.x_train, ds.y_train, exp.parts, n_max,
                                 mesh, CLIENTS_AXIS)
  sim = simulate.make_simulation(exp, mesh=mesh, axis_name=CLIENTS_AXIS)
  res, hp, kd, x_test, y_test = distributed.replicated(
      (exp.resources, simulate.hparams_of(cfg, exp.resources),
       np.asarray(jax.random.key_data(jax.random.key(cfg.seed))),
       np.asarray(ds.x_test, np.float32), np.asarray(ds.y_test)), mesh)
  kw = _sharding(mesh)
  init = jax.jit(lambda k, *a: sim.init(jax.random.wrap_key_data(k), *a),
                 **kw)
  run_chunk = jax.jit(sim.run_chunk, **kw)
  evaluate = jax.jit(sim.evaluate, **kw)
  state = init(kd, data, res, hp)

  def step(st, left):
    st, m = run_chunk(st, data, res, hp, left)
    return st, {k: v[None] for k, v in distributed.to_host(
        m._asdict()).items()}

  def evaluate_state(st):
    acc, loss, sim_time = distributed.to_host(
        (*evaluate(st.params, x_test, y_test), st.sim_time))
    return acc[None], loss[None], sim_time[None]

  out = Outputs(cfg, out_dir)
  ckpt = None
  if out_dir and (checkpoint_every or 0) >= 0:
    ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, "checkpoints"))
    if not resume:
      clear_checkpoints(ckpt)
  elif resume:
    raise ValueError("resume needs checkpoints: checkpoint_every=-1 "
                     "disables them")
  state = drive(cfg.rounds, sim.chunk, state, step, evaluate_state, [out],
                ckpt=ckpt, checkpoint_every=checkpoint_every or 0,
                progress=cfg.progress, start=start, stream=sys.stderr)
  summary = out.finish(compiles=len(sim.traces), lanes=exp.lanes,
                       num_clients=len(exp.parts), wall=time.perf_counter()
                       - start + out.wall_offset,
                       devices=[str(d) for d in jax.devices()])
  if print_table and distributed.is_main():
    print(format_table(out.records, summary), file=stream)
  return RunResult(out.records, summary, len(sim.traces), out.clients(),
                   state)


def clear_checkpoints(ckpt: checkpoint_lib.Checkpointer) -> None:
  """Removes a previous run's checkpoints from a fresh run's folder."""
  if distributed.is_main():
    for step in ckpt.steps():
      shutil.rmtree(os.path.join(ckpt.directory, str(step)),
                    ignore_errors=True)
  distributed.sync("fedjax_bsa_ckpt_clear")
