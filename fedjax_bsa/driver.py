"""The one driver: ``E >= 1`` experiments from settings to files.

A run is a sweep of one experiment. :func:`prepare` builds every
experiment's host pieces (dataset, partition, resources, traced settings),
lays the clients' rows out once (:mod:`fedjax_bsa.data.federated`: the
experiments' partitions share the rows of one dataset), picks the mesh, and
jits the round loop of :mod:`fedjax_bsa.simulate`; :func:`execute` runs it
in chunks (:func:`drive`), evaluating, writing records, checkpointing and
stopping diverged experiments, then writes each experiment's summary.

Devices. With one device everything is one ``jit``. With several devices
(or processes) a single experiment splits the round kernel's lanes over a
``clients`` mesh axis and shards the clients' rows over it; a sweep of
several experiments shards the experiments over an ``experiments`` axis
instead (each device packs its experiments' jobs into its own lane pool).
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

from fedjax_bsa import autotune
from fedjax_bsa import checkpoint as checkpoint_lib
from fedjax_bsa import config as config_lib
from fedjax_bsa import distributed
from fedjax_bsa import experiment as experiment_lib
from fedjax_bsa import registry as reg
from fedjax_bsa import simulate
from fedjax_bsa.config import Config, ConfigError
from fedjax_bsa.data import federated
from fedjax_bsa.outputs import chunk_records

__all__ = ["Prepared", "prepare", "execute", "drive", "clear_checkpoints",
           "CLIENTS_AXIS", "EXPERIMENTS_AXIS"]

CLIENTS_AXIS = "clients"
EXPERIMENTS_AXIS = "experiments"
_DATASET_KEYS = ("dataset", "data_path", "num_examples", "synthetic_alpha",
                 "synthetic_beta", "num_clients")


class Prepared(NamedTuple):
  """Experiments ready to run: device inputs and jitted functions."""
  configs: list      # per experiment, its Config
  experiments: list  # per experiment, its Experiment
  sim: simulate.Simulation
  data: federated.FederatedData
  inputs: simulate.Inputs   # leaves [E', ...]
  keys: Any          # uint32 key data [E', ...]
  tests: tuple       # (x_test [E', ...], y_test [E', ...])
  init: Callable     # (key_data, data, inputs) -> state
  run_chunk: Callable  # (state, data, inputs, rounds_left) -> (state, m)
  evaluate: Callable   # (params, x, y) -> (accuracy [E'], loss [E'])
  mesh: Any
  mode: str          # "one", "lanes" or "experiments"
  kept: list         # index in ``overrides`` of each prepared experiment
  failed: dict       # index in ``overrides`` -> why it could not be built
  layout: autotune.KernelLayout  # the kernel's layout and how it was chosen


def _datasets(cfgs: list[Config], failed: dict) -> list:
  """Each config's dataset, loaded once per distinct dataset setting; a
  dataset that cannot be loaded fails its experiments (``failed``)."""
  cache, out = {}, []
  for i, c in enumerate(cfgs):
    key = tuple(getattr(c, k) for k in _DATASET_KEYS) + (
        c.seed if reg.DATASETS.prop(c.dataset, "seeded") else None,)
    if key not in cache:
      try:
        cache[key] = experiment_lib.load_dataset(c)
      except ConfigError as e:
        cache[key] = e
    if isinstance(cache[key], ConfigError):
      failed[i] = str(cache[key])
    out.append(cache[key])
  if len(failed) == len(cfgs):
    raise next(iter(v for v in cache.values()))
  return out


def _check_same(exps, what: str, get) -> None:
  first = get(exps[0])
  for e, exp in enumerate(exps[1:], 1):
    if get(exp) != first:
      raise ConfigError(f"experiment {e} has {what} {get(exp)} but "
                        f"experiment 0 has {first}: a sweep needs one shape")


def _mode(E: int, mesh) -> str:
  if mesh is None:
    return "one"
  return "lanes" if E == 1 else "experiments"


def _host_inputs(exps, first_client):
  """Per-experiment host inputs, as ``build(e) -> pytree`` for
  :func:`fedjax_bsa.distributed.stacked`. Test sets of different sizes
  (e.g. Synthetic's, drawn per seed) are padded to the largest with label
  -1, which :func:`fedjax_bsa.simulate.evaluate_model` leaves out."""
  n_test = max(len(x.dataset.y_test) for x in exps)

  def build(e):
    x = exps[e]
    hp = config_lib.hparams(x.cfg)
    hp["reference_speed"] = experiment_lib.reference_speed(x.resources)
    sizes = np.array([len(p) for p in x.parts], np.int32)
    inputs = simulate.Inputs(x.resources, hp, np.int32(first_client[e]),
                             sizes)
    key = np.asarray(jax.random.key_data(jax.random.key(x.cfg.seed)))
    ds, pad = x.dataset, n_test - len(x.dataset.y_test)
    x_test = np.asarray(ds.x_test, np.float32)
    return inputs, key, (
        np.concatenate([x_test, np.zeros((pad,) + x_test.shape[1:],
                                         np.float32)]),
        np.concatenate([np.asarray(ds.y_test, np.int32),
                        np.full((pad,), -1, np.int32)]))
  return build


def prepare(base: Config, overrides: list[dict], mesh: Any = "auto",
            lanes: int | None = None, keep_going: bool = False,
            log: Callable | None = None) -> Prepared:
  """Builds and places every experiment's inputs; jits the round loop.

  Args:
    base: the settings shared by every experiment.
    overrides: per experiment, ``{key: value}`` of
      :data:`~fedjax_bsa.config.SWEEPABLE` keys (``[{}]``: one run).
    mesh: ``"auto"`` (a mesh over every device when there are several),
      a one-axis ``Mesh`` (axis ``clients`` for one experiment,
      ``experiments`` for several), or None (one device).
    lanes: the kernel's lane pool (default: ``base.lanes`` or the backend's
      choice for the pool's jobs).
    keep_going: an experiment whose data, partition or resources cannot be
      built is left out and reported in ``Prepared.failed`` (default: the
      :class:`ConfigError` is raised).
    log: where a layout measurement says what it does (default: nowhere).
  """
  if not overrides:
    raise ConfigError("a sweep needs at least one experiment")
  for o in overrides:
    config_lib.check_sweepable(o)
  cfgs, exps, kept, failed = _build(base, overrides, keep_going)
  E = len(cfgs)
  mesh = _mesh(mesh, E)
  mode = _mode(E, mesh)
  axis = mesh.axis_names[0] if mesh is not None else None
  total = E if mode != "experiments" else distributed.padded(E, mesh)
  per_device = total // (mesh.devices.size if mode == "experiments" else 1)
  data, (inputs, keys, tests), max_rows = _place(
      exps, mode, mesh, axis, total, base.clients_per_round)
  lay = autotune.choose_layout(exps[0], per_device, base.clients_per_round,
                               lanes=lanes or 0, mesh=mesh,
                               log=log or (lambda _: None))
  sim = simulate.make_simulation(
      exps[0], per_device, lanes=lay.lanes,
      mesh=mesh if mode == "lanes" else None,
      axis_name=axis or CLIENTS_AXIS, max_rows=max_rows,
      microbatch=lay.microbatch, per_slot=lay.per_slot)
  return Prepared(cfgs, exps, sim, data, inputs, keys, tests,
                  *_jitted(sim, mode, mesh, axis), mesh, mode, kept, failed,
                  lay)


def _build(base: Config, overrides: list[dict], keep_going: bool):
  """Each experiment's host pieces; ``(configs, experiments, kept,
  failed)`` with the experiments that could not be built left out."""
  cfgs = [base.replace(**o) for o in overrides]
  exps, failed = [], {}
  for i, (c, ds) in enumerate(zip(cfgs, _datasets(cfgs, failed))):
    if i in failed:
      if not keep_going:
        raise ConfigError(failed[i])
      continue
    try:
      exps.append(experiment_lib.build(c, ds))
    except ConfigError as e:
      if not keep_going:
        raise
      failed[i] = str(e)
  if not exps:
    why = {}
    for i, m in sorted(failed.items()):
      why.setdefault(m, []).append(str(i))
    raise ConfigError("every experiment failed to build: " + "; ".join(
        f"experiment {','.join(ids)}: {m}" for m, ids in why.items()))
  _check_same(exps, "num_clients", lambda x: x.num_clients)
  _check_same(exps, "input shape", lambda x: x.dataset.x_train.shape[1:])
  _check_same(exps, "test input shape", lambda x: x.dataset.x_test.shape[1:])
  kept = [i for i in range(len(cfgs)) if i not in failed]
  return [cfgs[i] for i in kept], exps, kept, failed


def _mesh(mesh, E: int):
  if isinstance(mesh, str):
    if mesh != "auto":
      raise ValueError(f"mesh={mesh!r} is not allowed: 'auto', a Mesh or "
                       "None")
    mesh = (distributed.make_mesh(CLIENTS_AXIS if E == 1 else
                                  EXPERIMENTS_AXIS)
            if jax.device_count() > 1 else None)
  if mesh is None and jax.process_count() > 1:
    raise ValueError("mesh=None is not allowed with several processes")
  return mesh


def _place(exps, mode: str, mesh, axis, total: int, K: int):
  """The clients' rows and the per-experiment inputs on the devices:
  ``(data, (inputs, keys, tests), max_rows)``."""
  if mode == "lanes":  # rows sharded by client ranges over the mesh
    x0 = exps[0]
    data = distributed.ragged_client_data(
        x0.dataset.x_train, x0.dataset.y_train, x0.parts, mesh, axis)
    first = np.zeros((1,), np.int32)
    max_rows = int(np.sort([len(p) for p in x0.parts])[::-1][:K].sum())
    return data, _replicated_inputs(exps, first, mesh), max_rows
  merged, first = federated.merge([
      federated.from_partition(x.dataset.x_train, x.dataset.y_train,
                               x.parts) for x in exps])
  data = distributed.replicated(merged, mesh)
  return data, distributed.stacked(
      len(exps), _host_inputs(exps, first),
      mesh if mode == "experiments" else None, axis, total), None


def _jitted(sim: simulate.Simulation, mode: str, mesh, axis):
  """``(init, run_chunk, evaluate)`` jitted for the device mode."""
  init = lambda k, d, i: sim.init(jax.random.wrap_key_data(k), d, i)
  fns = (init, sim.run_chunk, sim.evaluate)
  if mode == "experiments":
    e, r = P(axis), P()
    specs = ((e, r, e), (e, r, e, r), (e, e, e))
    return tuple(jax.jit(jax.shard_map(f, mesh=mesh, in_specs=s,
                                       out_specs=e, check_vma=False))
                 for f, s in zip(fns, specs))
  if mode == "lanes":
    out = NamedSharding(mesh, P())
    return tuple(jax.jit(f, out_shardings=out) for f in fns)
  return tuple(jax.jit(f) for f in fns)


def _replicated_inputs(exps, first, mesh):
  build = _host_inputs(exps, first)
  one = build(0)
  return distributed.replicated(jax.tree.map(lambda a: np.asarray(a)[None],
                                             one), mesh)


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
    outputs: one :class:`~fedjax_bsa.outputs.Outputs` per experiment.
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
      (:meth:`~fedjax_bsa.outputs.Outputs.check_diverged`; None: only a
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
