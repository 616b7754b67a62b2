"""The one driver: ``E >= 1`` experiments from settings to files.

A run is a sweep of one experiment. :func:`prepare` builds every
experiment's host pieces (dataset, partition, resources, traced settings),
lays the clients' rows out once (:mod:`fedjax_bsa.data.federated`: the
experiments' partitions share the rows of one dataset), picks the mesh, and
jits the round loop of :mod:`fedjax_bsa.run.simulate`;
:func:`fedjax_bsa.run.loop.execute` runs it in chunks, evaluating, writing
records, checkpointing and stopping diverged experiments.

Devices. With one device everything is one ``jit``. With several devices
(or processes) a single experiment splits the round kernel's lanes over a
``clients`` mesh axis and shards the clients' rows over it; a sweep of
several experiments shards the experiments over an ``experiments`` axis
instead (each device packs its experiments' jobs into its own lane pool).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from fedjax_bsa.core import config as config_lib
from fedjax_bsa.core import registry as reg
from fedjax_bsa.core.config import Config, ConfigError
from fedjax_bsa.data import federated
from fedjax_bsa.run import autotune
from fedjax_bsa.run import distributed
from fedjax_bsa.run import simulate
from fedjax_bsa.setup import experiment as experiment_lib

__all__ = ["Prepared", "prepare", "CLIENTS_AXIS", "EXPERIMENTS_AXIS"]

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
  :func:`fedjax_bsa.run.distributed.stacked`. Test sets of different sizes
  (e.g. Synthetic's, drawn per seed) are padded to the largest with label
  -1, which :func:`fedjax_bsa.setup.models.evaluate_model` leaves out."""
  n_test = max(len(x.dataset.y_test) for x in exps)

  def build(e):
    x = exps[e]
    hp = config_lib.hparams(
        x.cfg, experiment_lib.reference_speed(x.resources))
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
      :data:`~fedjax_bsa.core.config.SWEEPABLE` keys (``[{}]``: one run).
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
