"""Sweep throughput: N experiments vmapped in one program vs one after another.

For N in {1, 8, 32} experiments (seeds x client learning rates), measures
experiments x rounds per second of

* ``vmapped``: :func:`fedjax_bsa.sweep.prepare`'s batched ``run_chunk``, all
  N experiments in one call, on one device;
* ``vmapped_sharded``: the same, sharded over an ``experiments`` mesh axis
  spanning every device (only with several devices);
* ``sequential``: the single-experiment ``run_chunk`` (the program ``run``
  compiles on one device), called for each experiment in turn, on the same
  inputs;
* ``sequential_sharded``: the same with the clients (lanes) sharded over
  every device, as ``run`` does by default with several devices.

Compilation is excluded from the rates (each program is warmed up first;
compile times are reported apart). Repetitions cycle through the variants;
the JSON holds every repetition, the median and the spread, under
``benchmarks/results/sweep_<machine>[_<label>].json``. ``speedup`` is the
best vmapped rate over the best sequential rate, ``speedup_one_device``
``vmapped`` over ``sequential``.

``--end-to-end 1,8`` also times whole runs, as a user waits for them:
``run_sweep`` of N experiments against N ``run`` calls one after another
(each builds its inputs and compiles), one device, build and compile
included.

On a CPU, ``--cpu-devices D`` splits the host into ``D`` XLA devices (one
per core) so that the sharded variants can use every core.

  python -m benchmarks.sweep [--reps 5] [--rounds 5] [--sizes 1,8,32]
      [--cpu-devices 2] [--end-to-end 1,8] [--set key=value ...]
      [--label NAME] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import time


def _overrides(n: int) -> list[dict]:
  lrs = (0.05, 0.1)
  return [dict(seed=e // 2, client_lr=lrs[e % 2]) for e in range(n)]


def measure(base, n: int, reps: int) -> dict:
  """Times N experiments vmapped and sequential; returns a result dict."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_bsa import distributed  # pylint: disable=g-import-not-at-top
  from fedjax_bsa import simulate  # pylint: disable=g-import-not-at-top
  from fedjax_bsa import sweep  # pylint: disable=g-import-not-at-top

  block = jax.block_until_ready
  left = np.int32(base.rounds)
  calls = {}
  compile_s = {}

  def timed_first(name, fn):
    t = time.perf_counter()
    fn()
    compile_s[name] = time.perf_counter() - t
    calls[name] = fn

  meshes = [("vmapped", None)]
  if jax.device_count() > 1:
    meshes.append(("vmapped_sharded", "auto"))
  pre = None
  for name, mesh in meshes:
    pre = sweep.prepare(base, _overrides(n), mesh=mesh)
    data, res, hp, kd, _, _ = pre.inputs
    state = block(pre.init(kd, data, res, hp))
    timed_first(name, lambda f=pre.run_chunk, a=(state, data, res, hp, left):
                block(f(*a)))

  host = [jax.tree.map(np.asarray, pre.inputs)]
  one = lambda tree, e: jax.tree.map(lambda a: a[e], tree)
  seq = [("sequential", None)]
  if jax.device_count() > 1:
    seq.append(("sequential_sharded",
                distributed.make_mesh("clients")))
  for name, mesh in seq:
    sim = simulate.make_simulation(pre.experiments[0], mesh=mesh)
    chunk = jax.jit(sim.run_chunk)
    init = jax.jit(lambda k, *a, s=sim: s.init(jax.random.wrap_key_data(k),
                                                *a))
    args = []
    for e in range(n):
      data, res, hp, kd, _, _ = one(host[0], e)
      if mesh is not None:
        nc = len(pre.experiments[e].parts)
        pad = distributed.padded(nc, mesh) - nc
        data = jax.tree.map(
            lambda a: np.concatenate([a, np.zeros((pad,) + a.shape[1:],
                                                  a.dtype)]), data)
        data = jax.device_put(data, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec("clients")))
      data, res, hp = jax.device_put((data, res, hp)) if mesh is None else (
          data, *distributed.replicated((res, hp), mesh))
      kd = jax.device_put(kd) if mesh is None else distributed.replicated(
          kd, mesh)
      args.append((block(init(kd, data, res, hp)), data, res, hp, left))

    def run_all(chunk=chunk, args=args):
      for a in args:
        block(chunk(*a))
    t = time.perf_counter()
    block(chunk(*args[0]))
    compile_s[name] = time.perf_counter() - t
    calls[name] = run_all

  times = {k: [] for k in calls}
  for _ in range(reps):
    for k, fn in calls.items():
      t = time.perf_counter()
      fn()
      times[k].append(time.perf_counter() - t)
  work = n * base.rounds
  out = dict(experiments=n, rounds=base.rounds,
             group=sweep.default_group(),
             compiles_vmapped=len(pre.sim.traces))
  for k, ts in times.items():
    rates = [work / x for x in ts]
    out[k] = dict(seconds=ts, median_s=float(np.median(ts)),
                  exp_rounds_per_s=work / float(np.median(ts)),
                  spread_exp_rounds_per_s=[min(rates), max(rates)],
                  compile_s=compile_s[k])
  best = lambda prefix: max(v["exp_rounds_per_s"] for k, v in out.items()
                            if k.startswith(prefix) and isinstance(v, dict))
  out["speedup"] = best("vmapped") / best("sequential")
  out["speedup_one_device"] = (out["vmapped"]["exp_rounds_per_s"] /
                               out["sequential"]["exp_rounds_per_s"])
  return out


def measure_end_to_end(base, n: int, rounds: int, reps: int) -> dict:
  """Wall time of ``run_sweep`` of N experiments against N ``run`` calls one
  after another (no output folder), each building its data and compiling:
  what a user waits for."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_bsa import runner  # pylint: disable=g-import-not-at-top
  from fedjax_bsa import sweep  # pylint: disable=g-import-not-at-top

  base = base.replace(rounds=rounds, eval_every=min(10, rounds))
  ov = _overrides(n)
  times = dict(vmapped=[], sequential=[])
  for _ in range(reps):
    t = time.perf_counter()
    sweep.run_sweep(base, ov, None, print_table=False, mesh=None)
    times["vmapped"].append(time.perf_counter() - t)
    t = time.perf_counter()
    for o in ov:
      runner.run(base.replace(**o), None, print_table=False, mesh=None)
    times["sequential"].append(time.perf_counter() - t)
  work = n * rounds
  out = dict(experiments=n, rounds=rounds, eval_every=base.eval_every)
  for k, ts in times.items():
    rates = [work / x for x in ts]
    out[k] = dict(seconds=ts, median_s=float(np.median(ts)),
                  exp_rounds_per_s=work / float(np.median(ts)),
                  spread_exp_rounds_per_s=[min(rates), max(rates)])
  out["speedup"] = (out["vmapped"]["exp_rounds_per_s"] /
                    out["sequential"]["exp_rounds_per_s"])
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="benchmarks.sweep", description=__doc__,
                              formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--reps", type=int, default=5)
  p.add_argument("--rounds", type=int, default=5,
                 help="rounds per timed call (one chunk)")
  p.add_argument("--sizes", default="1,8,32")
  p.add_argument("--end-to-end", default="",
                 help="also time whole runs (build + compile + rounds) for "
                 "these N, e.g. 1,8")
  p.add_argument("--e2e-rounds", type=int, default=30)
  p.add_argument("--e2e-reps", type=int, default=3)
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="split a CPU host into this many XLA devices (0: "
                 "leave as is)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--label", default="", help="a name for this setting, "
                 "added to the results file name")
  p.add_argument("--out", help="JSON path (default: benchmarks/results/"
                 "sweep_<machine>[_<label>].json)")
  args = p.parse_args(argv)
  if args.cpu_devices:  # read when the CPU backend starts, not at import
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_"
                               "force_host_platform_device_count="
                               f"{args.cpu_devices}").strip()
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from fedjax_bsa import config  # pylint: disable=g-import-not-at-top
  if args.cpu_devices and jax.device_count() != args.cpu_devices:
    raise SystemExit(f"--cpu-devices {args.cpu_devices}: JAX already "
                     f"started with {jax.device_count()} device(s); set "
                     "XLA_FLAGS=--xla_force_host_platform_device_count="
                     f"{args.cpu_devices} before starting instead")

  load_before = os.getloadavg()
  base = config.Config().replace(**config.parse_assignments(args.set))
  base = base.replace(rounds=args.rounds, eval_every=args.rounds,
                      progress=False)
  results = []
  for n in (int(s) for s in args.sizes.split(",")):
    r = measure(base, n, args.reps)
    results.append(r)
    rates = ", ".join(f"{k} {v['exp_rounds_per_s']:.1f}" for k, v in r.items()
                      if isinstance(v, dict))
    print(f"N={n:>3}: {rates} exp*rounds/s; speedup {r['speedup']:.2f}x "
          f"(one device {r['speedup_one_device']:.2f}x)", flush=True)
  e2e = []
  for n in (int(s) for s in args.end_to_end.split(",") if s):
    r = measure_end_to_end(base, n, args.e2e_rounds, args.e2e_reps)
    e2e.append(r)
    print(f"end to end, N={n:>3}, {args.e2e_rounds} rounds: vmapped "
          f"{r['vmapped']['exp_rounds_per_s']:.1f}, sequential "
          f"{r['sequential']['exp_rounds_per_s']:.1f} exp*rounds/s; speedup "
          f"{r['speedup']:.2f}x", flush=True)
  machine = socket.gethostname().split(".")[0] or "machine"
  suffix = f"_{args.label}" if args.label else ""
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"sweep_{machine}{suffix}.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  doc = dict(
      benchmark="sweep", description=__doc__.split("\n\n")[0],
      label=args.label, settings=args.set,
      machine=dict(hostname=machine, platform=platform.platform(),
                   processor=platform.processor(), cpus=os.cpu_count(),
                   devices=[str(d) for d in jax.devices()],
                   xla_flags=os.environ.get("XLA_FLAGS", ""),
                   load_average_before=load_before,
                   load_average_after=os.getloadavg()),
      versions=dict(jax=jax.__version__, numpy=np.__version__,
                    python=platform.python_version()),
      config=base.to_dict(), reps=args.reps,
      metric="experiments x rounds per second (median of reps); compile "
      "excluded", results=results,
      end_to_end_metric="experiments x rounds per second of whole runs "
      "(build, compile, evaluation, rounds; one device; median of reps)",
      end_to_end=e2e)
  with open(out, "w") as fh:
    json.dump(doc, fh, indent=1)
  print(f"wrote {out}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
