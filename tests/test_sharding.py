"""Clients sharded over 8 (fake CPU) devices give one device's results.

The device count is fixed when JAX starts, so the checks run in one
subprocess with ``--xla_force_host_platform_device_count=8`` (this file,
run as a script); the tests read its JSON report.
"""

import functools
import json
import os
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_bsa import algorithms
from fedjax_bsa import kernel as kernel_lib
from fedjax_bsa.core.config import Config
from fedjax_bsa.data import datasets
from fedjax_bsa.data import federated
from fedjax_bsa.kernel import reference
from fedjax_bsa.run import distributed
from fedjax_bsa.run import runner
from fedjax_bsa.run import sweep
from fedjax_bsa.setup import models


DEVICES = 8


def test_8_devices_equal_one_device(tmp_path):
  """In one subprocess with 8 CPU devices (one test, so that parallel test
  workers do not start it twice):

  * kernel: K=5 clients on 8 devices (lanes rounded up to 8; clients 22, 23
    on the last device), with momentum, and with SCAFFOLD's per-client
    outputs and corrections, equals the per-client loop;
  * run: 20 clients (padded to 24) sharded over a ``clients`` axis, a cohort
    of 6 (not a multiple of 8), gives the one-device run's metrics with one
    compile;
  * sweep: 3 experiments (padded to 8) sharded over an ``experiments`` axis
    equal the one-device vmapped sweep.
  """
  out = tmp_path / "report.json"
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform"
                      f"_device_count={DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run([sys.executable, __file__, str(out)], env=env,
                        capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  report = json.loads(out.read_text())
  assert report["devices"] == DEVICES
  for part in ("kernel", "run", "sweep"):
    assert report[part] == "ok", f"{part}: {report[part]}"
  assert report["run_compiles"] == 1
  assert report["run_devices"] == DEVICES


# --------------------------------------------------------------- the script
def _close_records(a, b, rtol=2e-4, atol=2e-5,
                   skip=("wall_time_s", "padding_efficiency")):
  assert len(a) == len(b), (len(a), len(b))
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      if k in skip:
        continue
      if ra[k] is None or rb[k] is None:
        assert ra[k] == rb[k], (k, ra[k], rb[k])
      else:
        np.testing.assert_allclose(ra[k], rb[k], rtol=rtol, atol=atol,
                                   err_msg=f"round {ra['round']} {k}")


def _check_kernel():
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from kernel_util import make_jobs  # pylint: disable=g-import-not-at-top
  digits = datasets.digits()
  rng = np.random.default_rng(0)
  sizes = rng.integers(5, 41, size=24)
  idx = rng.permutation(len(digits.y_train))
  parts = np.split(idx[:sizes.sum()], np.cumsum(sizes)[:-1])
  host = federated.from_partition(digits.x_train, digits.y_train, parts)
  mesh = distributed.make_mesh("clients")
  data = distributed.replicated(host, mesh)
  mlp = models.make_model("mlp", (64,), 10, hidden=16)
  loss = functools.partial(models.example_losses, mlp.apply)
  K, mu = 5, 4
  cases = [  # (cohort, b, s, lanes, algorithm settings)
      ([0, 4, 9, 22, 23], [3, 9, 4, 1, 12], [2, 3, 0, 4, 1], 2,
       dict(client_momentum=0.9)),
      ([0, 1, 2, 3, 4], [3, 5, 8, 2, 6], [2, 1, 3, 0, 2], K,
       dict(algorithm="scaffold")),
  ]
  for i, (cohort, b, s, lanes, kw) in enumerate(cases):
    alg = algorithms.make_algorithm(Config(**kw))
    params = jax.tree.map(lambda a: a[None], mlp.init(jax.random.key(i)))
    jobs = make_jobs(cohort, b, s, np.linspace(0.05, 0.3, K), key=100 + i)
    inputs = None
    if alg.client_deltas:
      state = alg.init(jax.tree.map(lambda a: a[0], params), 24)
      state = state._replace(clients=jax.tree.map(
          lambda a: 0.01 * jax.random.normal(jax.random.key(3), a.shape),
          state.clients))
      inputs = alg.client_inputs(state, jobs.client, {})
    kern = jax.jit(kernel_lib.make_round_kernel(
        loss, alg.client_tx, alg.client_init, microbatch=mu, lanes=lanes,
        client_deltas=alg.client_deltas, mesh=mesh))
    out = kern(params, data, jobs, inputs)
    ref, stats, deltas, _ = reference.reference_round(
        loss, alg.client_tx, alg.client_init, params, jax.device_put(host),
        jobs, inputs, microbatch=mu)
    for x, y in zip(jax.tree.leaves(out.delta), jax.tree.leaves(ref)):
      np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)
    for f in stats._fields:
      np.testing.assert_allclose(getattr(out.stats, f), getattr(stats, f),
                                 rtol=5e-3, atol=1e-4, err_msg=f)
    assert int(out.slots) % len(jax.devices()) == 0
    if alg.client_deltas:
      stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *deltas)
      for x, y in zip(jax.tree.leaves(out.client_deltas),
                      jax.tree.leaves(stacked)):
        np.testing.assert_allclose(x, y, rtol=2e-4, atol=2e-6)


def _small_config(**kw):
  base = dict(rounds=4, eval_every=2, clients_per_round=6, num_clients=20,
              hidden=16, local_steps=3, controller="noise_scale",
              progress=False)
  base.update(kw)
  return Config(**base)


def main(path):
  report = dict(devices=jax.device_count())

  def attempt(name, fn):
    try:
      fn()
      report[name] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      report[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"

  t = time.perf_counter()
  attempt("kernel", _check_kernel)
  report["kernel_s"] = time.perf_counter() - t

  def check_run():
    cfg = _small_config()
    t = time.perf_counter()
    one = runner.run(cfg, mesh=None, print_table=False)
    many = runner.run(cfg, print_table=False)
    report["run_s"] = time.perf_counter() - t
    # the lanes differ (2 on one device, 8 on eight), hence the padding
    _close_records(one.records, many.records,
                   skip=("wall_time_s", "padding_efficiency"))
    report["run_compiles"] = many.compiles
    report["run_devices"] = len(many.summary["devices"])
  attempt("run", check_run)

  def check_sweep():
    base = _small_config(clients_per_round=4)
    ov = [dict(seed=0, client_lr=0.05), dict(seed=1, alpha=1.0),
          dict(seed=2, kappa=2.0, server_lr=0.5)]
    t = time.perf_counter()
    one = sweep.run_sweep(base, ov, mesh=None, print_table=False)
    many = sweep.run_sweep(base, ov, print_table=False)
    assert many.compiles == 1
    assert many.state.sim_time.shape[0] == 8  # padded to the device count
    for a, b in zip(one.records, many.records):
      _close_records(a, b)
    report["sweep_s"] = time.perf_counter() - t
  attempt("sweep", check_sweep)
  with open(path, "w") as fh:
    json.dump(report, fh)


if __name__ == "__main__":
  main(sys.argv[1])
