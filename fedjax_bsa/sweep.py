"""Many experiments as one compiled program: seeds and hyperparameters
``vmap``-ped (PureJaxRL style), sharded over an ``experiments`` mesh axis.

Each experiment's host-side pieces (partition, padded client rows, resources,
hyperparameters, key, test set) are built on the host and stacked on a
leading ``[E]`` axis, the rows padded to one ``n_max``; :mod:`simulate`'s
pure ``init`` / ``run_chunk`` / ``evaluate`` are ``vmap``-ped over it and,
with several devices, wrapped in ``jax.shard_map`` so each device runs its
``E / D`` experiments (``E`` is padded to a multiple of ``D`` by repeating
the last experiment; the padding is dropped). One compile serves all ``E``.
Only settings that keep shapes and the program's structure can vary
(:data:`SWEEPABLE`); anything else is rejected naming the key.

Outputs under ``out_dir``: ``sweep.json`` (the base settings and each
experiment's overrides, for ``--resume``), one folder per experiment
(``exp_000``, ...: the files of a run), ``sweep.jsonl`` (one line per
experiment: its overrides and summary), ``table.txt``, and
``checkpoints/``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from typing import Any, NamedTuple

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from fedjax_bsa import checkpoint as checkpoint_lib
from fedjax_bsa import distributed
from fedjax_bsa import federated
from fedjax_bsa import runner
from fedjax_bsa import simulate
from fedjax_bsa.config import Config, ConfigError, parse_assignments
from fedjax_bsa.experiment import build, load_dataset
from fedjax_bsa.outputs import Outputs

__all__ = ["SWEEPABLE", "SweepResult", "Prepared", "parse_grid",
           "expand_grid", "check_sweepable", "prepare", "default_group",
           "run_sweep",
           "resume_sweep", "format_sweep"]

EXPERIMENTS_AXIS = "experiments"
_VMAP_AXIS = "experiment"  # the vmap axis within a device

#: Settings a sweep may vary: traced hyperparameters, or inputs built on the
#: host whose shapes do not change (partitions, resources, seeds).
SWEEPABLE = (
    "seed", "client_lr", "server_lr", "kappa", "ema_decay",   # traced
    "alpha", "min_examples", "quantity_sigma", "shards_per_client",
    "synthetic_alpha", "synthetic_beta",                      # data
    "speed_sigma", "memory_sigma", "memory_cap", "base_speed",
    "step_overhead", "bandwidth", "availability",              # resources
)
_DATASET_KEYS = ("dataset", "data_path", "num_examples", "synthetic_alpha",
                 "synthetic_beta", "num_clients")


class SweepResult(NamedTuple):
  records: list     # per experiment, its metrics.jsonl objects
  summaries: list   # per experiment, its summary
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


def check_sweepable(keys) -> None:
  """Raises ``ConfigError`` naming the first key a sweep cannot vary."""
  for key in keys:
    if key not in SWEEPABLE:
      raise ConfigError(
          f"cannot sweep {key!r} in one compiled program: it changes array "
          "shapes or the program's static structure (run separate sweeps "
          f"for each value); sweepable settings: {', '.join(SWEEPABLE)}")


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
    div = "" if s["diverged_round"] is None else " (diverged)"
    lines.append(f"{name:<10} {text[:40]:<40} "
                 f"{s['final_test_accuracy']:>9.4f} "
                 f"{s['best_test_accuracy']:>8.4f} {s['sim_time_s']:>9.1f} "
                 f"{s['rounds']:>6}{div}")
  return "\n".join(lines)


def _datasets(cfgs: list[Config]) -> list:
  """Each config's dataset, loaded once per distinct dataset setting."""
  cache, out = {}, []
  for c in cfgs:
    key = tuple(getattr(c, k) for k in _DATASET_KEYS) + (
        c.seed if c.dataset in ("mnist1d", "synthetic") else None,)
    if key not in cache:
      cache[key] = load_dataset(c)
    out.append(cache[key])
  return out


def _check_same(exps, what: str, get) -> None:
  first = get(exps[0])
  for e, exp in enumerate(exps[1:], 1):
    if get(exp) != first:
      raise ConfigError(f"experiment {e} has {what} {get(exp)} but "
                        f"experiment 0 has {first}: a sweep needs one shape")


class Prepared(NamedTuple):
  """A sweep ready to run: stacked inputs and jitted batched functions."""
  configs: list      # per experiment, its Config
  experiments: list  # per experiment, its Experiment (data not built)
  sim: simulate.Simulation
  inputs: tuple      # (data, resources, hparams, key_data, x_test, y_test)
  init: Any          # jit: (key_data, data, res, hp) -> state [E', ...]
  run_chunk: Any     # jit: (state, data, res, hp, rounds_left) -> (state, m)
  evaluate: Any      # jit: (params, x_test, y_test) -> (acc, loss) [E']
  mesh: Any          # the experiments mesh, or None


def default_group() -> int | None:
  """Experiments vmapped together per step on a device: 8 on CPUs (larger
  batches fall out of cache), all of them on accelerators."""
  return 8 if jax.default_backend() == "cpu" else None


def prepare(base: Config, overrides: list[dict], mesh: Any = "auto",
            group: int | None | str = "auto") -> Prepared:
  """Builds and stacks every experiment's inputs; batches the functions.

  Args:
    base: the settings shared by every experiment.
    overrides: per experiment, ``{key: value}`` of :data:`SWEEPABLE` keys.
    mesh: ``"auto"`` (an ``experiments`` mesh over every device when there
      are several), a ``Mesh`` with an ``experiments`` axis, or None.
    group: experiments ``vmap``-ped together on a device; a device holding
      more runs its groups one after another (``lax.map``), still in one
      program. None: all at once; ``"auto"``: :func:`default_group`.

  Returns:
    A :class:`Prepared`; stacked leaves are ``[E', ...]`` with ``E'`` the
    experiment count padded (by repeating the last experiment) to a multiple
    of the device count times the group size.
  """
  if not overrides:
    raise ConfigError("a sweep needs at least one experiment")
  for o in overrides:
    check_sweepable(o)
  cfgs = [base.replace(**o) for o in overrides]
  E = len(cfgs)
  if isinstance(mesh, str):
    mesh = (distributed.make_mesh(EXPERIMENTS_AXIS)
            if jax.device_count() > 1 else None)
  if mesh is None and jax.process_count() > 1:
    raise ValueError("mesh=None is not allowed with several processes")
  exps = [build(c, with_data=False, dataset=ds)
          for c, ds in zip(cfgs, _datasets(cfgs))]
  _check_same(exps, "num_clients", lambda x: len(x.parts))
  _check_same(exps, "input shape", lambda x: x.dataset.x_train.shape[1:])
  _check_same(exps, "test set shape", lambda x: x.dataset.x_test.shape)
  n_max = max(max(len(p) for p in x.parts) for x in exps)

  def host_inputs(e):
    x = exps[e]
    ds = x.dataset
    return (federated.from_partition(ds.x_train, ds.y_train, x.parts, n_max),
            x.resources, simulate.hparams_of(x.cfg, x.resources),
            np.asarray(jax.random.key_data(jax.random.key(x.cfg.seed))),
            np.asarray(ds.x_test, np.float32), np.asarray(ds.y_test))

  devices = 1 if mesh is None else mesh.devices.size
  per_device = -(-E // devices)
  group = default_group() if group == "auto" else group
  if group is not None and int(group) < 1:
    raise ValueError(f"group={group} is out of range: must be >= 1 (or "
                     "None: all experiments at once)")
  group = min(int(group or per_device), per_device)
  total = distributed.padded(E, mesh, group)
  inputs = distributed.stacked(E, host_inputs, mesh, EXPERIMENTS_AXIS, total)
  sim = simulate.make_simulation(exps[0], batch_axis=_VMAP_AXIS)

  def batched(f, in_axes):
    g = _grouped(jax.vmap(f, in_axes=in_axes, axis_name=_VMAP_AXIS),
                 in_axes, group)
    if mesh is not None:
      g = jax.shard_map(
          g, mesh=mesh, out_specs=P(EXPERIMENTS_AXIS), check_vma=False,
          in_specs=tuple(P(EXPERIMENTS_AXIS) if a == 0 else P()
                         for a in in_axes))
    return jax.jit(g)

  return Prepared(
      cfgs, exps, sim, inputs,
      batched(lambda k, *a: sim.init(jax.random.wrap_key_data(k), *a),
              (0, 0, 0, 0)),
      batched(sim.run_chunk, (0, 0, 0, 0, None)),
      batched(sim.evaluate, (0, 0, 0)), mesh)


def _grouped(vf, in_axes, group: int):
  """``vf`` (vmapped over axis 0 of the ``in_axes == 0`` arguments) applied
  to ``[n * group, ...]`` inputs as ``n`` steps of ``group`` (``lax.map``)."""

  def run(*args):
    n = next(a for a, ax in zip(args, in_axes) if ax == 0)
    n = jax.tree.leaves(n)[0].shape[0] // group
    if n <= 1:
      return vf(*args)
    split = lambda t: jax.tree.map(
        lambda a: a.reshape((n, group) + a.shape[1:]), t)
    mapped = tuple(split(a) if ax == 0 else None
                   for a, ax in zip(args, in_axes))

    def one(xs):
      return vf(*(x if ax == 0 else a
                  for x, a, ax in zip(xs, args, in_axes)))

    out = jax.lax.map(one, mapped)
    return jax.tree.map(lambda a: a.reshape((n * group,) + a.shape[2:]),
                        out)
  return run


def run_sweep(base: Config, overrides: list[dict], out_dir: str | None = None,
              *, print_table: bool = True, stream=None, mesh: Any = "auto",
              group: int | None | str = "auto", resume: bool = False,
              checkpoint_every: int | None = None) -> SweepResult:
  """Runs ``len(overrides)`` experiments as one vmapped program.

  Args:
    base: the settings shared by every experiment.
    overrides: per experiment, ``{key: value}`` of :data:`SWEEPABLE` keys.
    out_dir: where to write (None: nothing).
    print_table: print the summary table to ``stream``.
    stream: text stream (default ``sys.stdout``).
    mesh: as :func:`prepare`.
    group: as :func:`prepare`.
    resume: continue from ``out_dir/checkpoints``.
    checkpoint_every: as :func:`fedjax_bsa.runner.run`.

  Returns:
    A :class:`SweepResult`; each experiment's records equal a separate
    :func:`~fedjax_bsa.runner.run` with its settings (float32 tolerance).
  """
  stream = stream or sys.stdout
  start = time.perf_counter()
  if out_dir:
    distributed.check_same_everywhere(os.path.abspath(out_dir), "--out")
  pre = prepare(base, overrides, mesh, group)
  E, sim = len(pre.configs), pre.sim
  data, res, hp, kd, x_test, y_test = pre.inputs
  state = pre.init(kd, data, res, hp)

  def step(st, left):
    st, m = pre.run_chunk(st, data, res, hp, left)
    return st, {k: v[:E] for k, v in distributed.to_host(
        m._asdict()).items()}

  def evaluate_state(st):
    out = distributed.to_host((*pre.evaluate(st.params, x_test, y_test),
                               st.sim_time))
    return tuple(a[:E] for a in out)

  names = [f"exp_{e:03d}" for e in range(E)]
  outs = [Outputs(c, os.path.join(out_dir, n) if out_dir else None,
                  f" ({n})") for c, n in zip(pre.configs, names)]
  ckpt = None
  if out_dir:
    if distributed.is_main():
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, "sweep.json"), "w") as fh:
        json.dump(dict(base=base.to_dict(), overrides=overrides), fh,
                  indent=1)
    if (checkpoint_every or 0) >= 0:
      ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir,
                                                      "checkpoints"))
      if not resume:
        runner.clear_checkpoints(ckpt)
  if resume and ckpt is None:
    raise ValueError("resume needs out_dir and checkpoints")
  state = runner.drive(base.rounds, sim.chunk, state, step, evaluate_state,
                       outs, ckpt=ckpt, checkpoint_every=checkpoint_every or 0,
                       progress=base.progress, start=start, stream=sys.stderr)
  wall = time.perf_counter() - start + outs[0].wall_offset
  summaries = [o.finish(compiles=len(sim.traces), lanes=x.lanes,
                        num_clients=len(x.parts), wall=wall,
                        devices=[str(d) for d in jax.devices()],
                        overrides=ov, experiments=E)
               for o, x, ov in zip(outs, pre.experiments, overrides)]
  table = format_sweep(names, overrides, summaries)
  if out_dir and distributed.is_main():
    with open(os.path.join(out_dir, "sweep.jsonl"), "w") as fh:
      for n, s in zip(names, summaries):
        fh.write(json.dumps(dict(experiment=n, **s)) + "\n")
    with open(os.path.join(out_dir, "table.txt"), "w") as fh:
      fh.write(table + "\n")
  if print_table and distributed.is_main():
    print(table, file=stream)
    print(f"{E} experiments, {len(sim.traces)} compile(s) of the round "
          f"loop, wall {wall:.1f} s", file=stream)
  return SweepResult([o.records for o in outs], summaries, list(overrides),
                     len(sim.traces), state)


def resume_sweep(out_dir: str, **kwargs) -> SweepResult:
  """Continues the sweep whose outputs are in ``out_dir``."""
  path = os.path.join(out_dir, "sweep.json")
  try:
    with open(path) as fh:
      spec = json.load(fh)
  except OSError as e:
    raise ValueError(f"--resume {out_dir}: cannot read {path}: "
                     f"{e.strerror}") from None
  base = Config.from_dict(spec["base"])
  if "progress" in kwargs:
    base = base.replace(progress=kwargs.pop("progress"))
  return run_sweep(base, spec["overrides"], out_dir, resume=True, **kwargs)
